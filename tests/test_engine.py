"""End-to-end generation on the real embedded model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="generation needs torch")
pytest.importorskip("transformers", reason="generation needs transformers")
jsonschema = pytest.importorskip("jsonschema", reason="outputs are validated with jsonschema")

from wasmshare.llm import Controller  # noqa: E402
from wasmshare.llm import constraints as C  # noqa: E402
from wasmshare.llm.engine import Engine, GenerationRequest  # noqa: E402
from wasmshare.llm.hf import WasmshareLogitsProcessor  # noqa: E402
from wasmshare.llm.models import ModelError, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ROOT / "guests" / "controllers"
MASKBENCH = ROOT.parent / "shared" / "maskbench" / "maskbench-dev.jsonl.gz"


@pytest.fixture(scope="module")
def loaded() -> Any:
    torch.set_num_threads(2)
    try:
        return load_model("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"embedded model not installed: {e}")


def _short_scalar(prop: dict[str, Any]) -> bool:
    """A property whose value a small model can finish: bounded, not free-running digits."""
    kind = prop.get("type")
    if kind in ("integer", "boolean"):
        return True
    return kind == "string" and ("enum" in prop or 0 < int(prop.get("maxLength", 0)) <= 40)


def small_schemas(count: int) -> list[dict[str, Any]]:
    """The first ``count`` MaskBench schemas that are closed objects of 1-3 required, bounded scalars.

    (A small model asked for an open object keeps inventing properties until max_tokens.)
    """
    if not MASKBENCH.is_file():
        pytest.skip(f"MaskBench data not found at {MASKBENCH}")
    picked: list[dict[str, Any]] = []
    with gzip.open(MASKBENCH, "rt") as f:
        for line in f:
            row = json.loads(line)
            schema = row["schema"]
            props = schema.get("properties") if isinstance(schema, dict) else None
            if not isinstance(props, dict) or not 1 <= len(props) <= 3:
                continue
            if set(schema.get("required", [])) != set(props) or schema.get("additionalProperties") is not False:
                continue
            if not any(t["valid"] for t in row["tests"]):
                continue
            if not all(isinstance(p, dict) and _short_scalar(p) for p in props.values()):
                continue
            picked.append(row)
            if len(picked) == count:
                break
    return picked


def _example(row: dict[str, Any]) -> Any:
    return next(t["data"] for t in row["tests"] if t["valid"])


def test_json_schema_outputs_validate_for_real_schemas(loaded: Any) -> None:
    rows = small_schemas(10)
    assert len(rows) == 10
    requests = [
        GenerationRequest(
            f"Reply with one JSON object of the same shape as this example: {json.dumps(_example(row))}",
            max_tokens=120, steer=C.json_schema(row["schema"]),
        )
        for row in rows
    ]
    with Engine(loaded, max_batch=8) as engine:
        results = engine.generate(requests)
        assert engine.stats.bytes_copied == 0
    for row, result in zip(rows, results):
        assert result.error is None, result.error
        value = json.loads(result.text)
        jsonschema.validate(value, row["schema"])


def test_hf_adapter_and_engine_agree_under_greedy(loaded: Any) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
    prompt = "Name a city in Norway as JSON."
    with Engine(loaded, max_batch=1) as engine:
        ours = engine.generate([GenerationRequest(prompt, max_tokens=24, steer=C.json_schema(schema))])[0]
    ids = torch.tensor([loaded.encode_prompt(prompt)])
    processor = WasmshareLogitsProcessor(loaded.token_table, C.json_schema(schema), eos_token_id=loaded.eos_token_ids[0])
    with torch.inference_mode():
        out = loaded.model.generate(
            ids, attention_mask=torch.ones_like(ids), logits_processor=[processor], max_new_tokens=24,
            do_sample=False, eos_token_id=list(loaded.eos_token_ids), pad_token_id=loaded.eos_token_ids[0],
        )
    processor.close()
    theirs = [t for t in out[0, ids.shape[1]:].tolist() if t not in loaded.eos_token_ids]
    assert ours.tokens == theirs
    jsonschema.validate(json.loads(ours.text), schema)


def test_fast_forward_and_backtrack_produce_what_the_controller_asked(loaded: Any) -> None:
    table = loaded.token_table
    answer = loaded.tokenizer.encode(" The answer is 42.", add_special_tokens=False)
    replacement = loaded.tokenizer.encode(" banana", add_special_tokens=False)[0]
    with Engine(loaded, max_batch=2) as engine:
        forced, backtracked = engine.generate([
            GenerationRequest("Say anything.", max_tokens=40,
                              steer=Controller(CONTROLLERS / "force_answer.wasm", struct.pack(f"<{len(answer)}I", *answer))),
            GenerationRequest("Count: one two three", max_tokens=6,
                              steer=Controller(CONTROLLERS / "backtrack.wasm", struct.pack("<2I", 3, replacement))),
        ])
    assert forced.tokens == answer and forced.text == " The answer is 42." and forced.finish_reason == "controller"
    # After three sampled tokens the controller replaced the third with " banana".
    assert backtracked.tokens[2] == replacement and table.decode([backtracked.tokens[2]]) == b" banana"
    assert engine.stats.fast_forward_tokens >= len(answer) + 1


def test_a_mixed_batch_of_eight_finishes_each_with_its_own_result(loaded: Any) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    yes = loaded.tokenizer.encode("yes", add_special_tokens=False)
    requests = [
        GenerationRequest("Is water wet? Answer in JSON.", max_tokens=30, steer=C.json_schema(schema)),
        GenerationRequest("Pick a colour.", max_tokens=10, steer=C.choice(["red", "green", "blue"])),
        GenerationRequest("Give a code.", max_tokens=12, steer=C.regex(r"[A-Z]{3}-[0-9]{3}")),
        GenerationRequest("Say hi.", max_tokens=8),
        GenerationRequest("Say yes.", max_tokens=10,
                          steer=Controller(CONTROLLERS / "force_answer.wasm", struct.pack(f"<{len(yes)}I", *yes))),
        GenerationRequest("Tell a story.", max_tokens=30, steer=Controller(CONTROLLERS / "max_tokens.wasm", "5")),
        GenerationRequest("List numbers.", max_tokens=10,
                          steer=Controller(CONTROLLERS / "boost_words.wasm", "seven\t30")),
        GenerationRequest("Misbehave.", max_tokens=10, steer=Controller(CONTROLLERS / "hostile_controller.wasm", "trap_mid_mask")),
    ]
    with Engine(loaded, max_batch=8) as engine:
        results = engine.generate(requests)
    by = dict(enumerate(results))
    jsonschema.validate(json.loads(by[0].text), schema)
    assert by[1].text in {"red", "green", "blue"}
    import re

    assert re.fullmatch(r"[A-Z]{3}-[0-9]{3}", by[2].text)
    assert by[3].error is None and by[3].tokens
    assert by[4].text == "yes"
    assert len(by[5].tokens) == 5 and by[5].finish_reason == "controller"
    assert "seven" in by[6].text.lower()
    assert by[7].finish_reason == "error" and "hostile_controller" in (by[7].error or "") and "trap" in (by[7].error or "")
    assert [r.error is not None for r in results].count(True) == 1


def test_engine_input_errors(loaded: Any) -> None:
    from wasmshare.errors import WasmshareError

    with Engine(loaded, max_batch=1) as engine:
        with pytest.raises(WasmshareError, match="max_tokens must be positive"):
            engine.generate([GenerationRequest("x", max_tokens=0)])
        bad = engine.generate([GenerationRequest("x", steer=C.json_schema({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]}))])
        assert bad[0].finish_reason == "error" and "oneOf" in (bad[0].error or "")
