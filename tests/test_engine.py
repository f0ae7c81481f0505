"""End-to-end generation on the real embedded model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import gzip
import json
import re
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
            if (
                set(schema.get("required", [])) != set(props)
                or schema.get("additionalProperties") is not False
            ):
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
            max_tokens=120,
            steer=C.json_schema(row["schema"]),
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
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    prompt = "Name a city in Norway as JSON."
    # Flexible whitespace: with compact separators this prompt reaches a near-tie of two tokens
    # that the engine's batched attention and generate's round differently in bfloat16.
    with Engine(loaded, max_batch=1) as engine:
        ours = engine.generate(
            [GenerationRequest(prompt, max_tokens=24, steer=C.json_schema(schema, whitespace="flexible"))]
        )[0]
    ids = torch.tensor([loaded.encode_prompt(prompt)])
    processor = WasmshareLogitsProcessor(
        loaded.token_table, C.json_schema(schema, whitespace="flexible"), eos_token_id=loaded.eos_token_ids[0]
    )
    with torch.inference_mode():
        out = loaded.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            logits_processor=[processor],
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(loaded.eos_token_ids),
            pad_token_id=loaded.eos_token_ids[0],
        )
    processor.close()
    theirs = [t for t in out[0, ids.shape[1] :].tolist() if t not in loaded.eos_token_ids]
    assert ours.tokens == theirs
    jsonschema.validate(json.loads(ours.text), schema)


def test_hf_adapter_applies_a_sparse_bias_like_the_whole_row(loaded: Any) -> None:
    """The same boost as (id, value) pairs or as a whole bias row steers the HF adapter, and
    the engine, to the same greedy tokens."""
    prompt = "List numbers."
    ids = torch.tensor([loaded.encode_prompt(prompt)])
    tokens = {}
    for name in ("boost_words", "boost_words_sparse"):
        processor = WasmshareLogitsProcessor(
            loaded.token_table,
            Controller(CONTROLLERS / f"{name}.wasm", "seven\t30"),
            eos_token_id=loaded.eos_token_ids[0],
        )
        with torch.inference_mode():
            out = loaded.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                logits_processor=[processor],
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=list(loaded.eos_token_ids),
                pad_token_id=loaded.eos_token_ids[0],
            )
        processor.close()
        tokens[name] = out[0, ids.shape[1] :].tolist()
    assert tokens["boost_words"] == tokens["boost_words_sparse"]
    assert "seven" in loaded.tokenizer.decode(tokens["boost_words_sparse"]).lower()
    with Engine(loaded, max_batch=1) as engine:
        ours = engine.generate(
            [
                GenerationRequest(
                    prompt,
                    max_tokens=6,
                    steer=Controller(CONTROLLERS / "boost_words_sparse.wasm", "seven\t30"),
                )
            ]
        )[0]
    assert ours.tokens == [t for t in tokens["boost_words_sparse"] if t not in loaded.eos_token_ids]


def test_hf_adapter_ends_a_row_whose_output_leaves_nothing_to_draw(loaded: Any) -> None:
    prompts = ["Misbehave.", "Say hi.", "Misbehave with NaN."]
    steer = [
        Controller(CONTROLLERS / "hostile_controller.wasm", "empty_mask"),
        C.regex(r"[a-z]{2,6}"),
        Controller(CONTROLLERS / "hostile_controller.wasm", "nan_bias"),
    ]
    tokenizer = loaded.tokenizer
    encoded = [loaded.encode_prompt(p) for p in prompts]
    width = max(map(len, encoded))
    pad = loaded.eos_token_ids[0]
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    attention = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    processor = WasmshareLogitsProcessor(loaded.token_table, steer, eos_token_id=pad)
    with torch.inference_mode():
        out = loaded.model.generate(
            ids.to(loaded.device),
            attention_mask=attention.to(loaded.device),
            logits_processor=[processor],
            max_new_tokens=8,
            do_sample=True,
            temperature=0.8,
            eos_token_id=list(loaded.eos_token_ids),
            pad_token_id=pad,
        )
    processor.close()
    assert set(processor.errors) == {0, 2}
    assert (
        "allows no token" in processor.errors[0]
        and "holds NaN, +inf or values too large" in processor.errors[2]
    )
    assert out[0, width] == pad and out[2, width] == pad  # both rows ended at once
    text = tokenizer.decode([t for t in out[1, width:].tolist() if t not in loaded.eos_token_ids])
    assert re.fullmatch(r"[a-z]{2,6}", text), text


def test_fast_forward_and_backtrack_produce_what_the_controller_asked(loaded: Any) -> None:
    table = loaded.token_table
    answer = loaded.tokenizer.encode(" The answer is 42.", add_special_tokens=False)
    replacement = loaded.tokenizer.encode(" banana", add_special_tokens=False)[0]
    with Engine(loaded, max_batch=2) as engine:
        forced, backtracked = engine.generate(
            [
                GenerationRequest(
                    "Say anything.",
                    max_tokens=40,
                    steer=Controller(
                        CONTROLLERS / "force_answer.wasm", struct.pack(f"<{len(answer)}I", *answer)
                    ),
                ),
                GenerationRequest(
                    "Count: one two three",
                    max_tokens=6,
                    steer=Controller(CONTROLLERS / "backtrack.wasm", struct.pack("<2I", 3, replacement)),
                ),
            ]
        )
    assert (
        forced.tokens == answer
        and forced.text == " The answer is 42."
        and forced.finish_reason == "controller"
    )
    # After three sampled tokens the controller replaced the third with " banana".
    assert backtracked.tokens[2] == replacement and table.decode([backtracked.tokens[2]]) == b" banana"
    assert engine.stats.fast_forward_tokens >= len(answer) + 1
    # A backtrack with nothing spliced in: the token is sampled again from the trimmed state,
    # which under greedy decoding is the same token, so the output is the plain one.
    with Engine(loaded, max_batch=2) as engine:
        plain, again = engine.generate(
            [
                GenerationRequest("Count: one two three", max_tokens=8),
                GenerationRequest(
                    "Count: one two three",
                    max_tokens=8,
                    steer=Controller(CONTROLLERS / "backtrack.wasm", struct.pack("<2I", 3, 0xFFFFFFFF)),
                ),
            ]
        )
    assert again.tokens == plain.tokens and again.error is None


def test_a_mixed_batch_of_eight_finishes_each_with_its_own_result(loaded: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    yes = loaded.tokenizer.encode("yes", add_special_tokens=False)
    requests = [
        GenerationRequest("Is water wet? Answer in JSON.", max_tokens=30, steer=C.json_schema(schema)),
        GenerationRequest("Pick a colour.", max_tokens=10, steer=C.choice(["red", "green", "blue"])),
        GenerationRequest("Give a code.", max_tokens=12, steer=C.regex(r"[A-Z]{3}-[0-9]{3}")),
        GenerationRequest("Say hi.", max_tokens=8),
        GenerationRequest(
            "Say yes.",
            max_tokens=10,
            steer=Controller(CONTROLLERS / "force_answer.wasm", struct.pack(f"<{len(yes)}I", *yes)),
        ),
        GenerationRequest(
            "Tell a story.", max_tokens=30, steer=Controller(CONTROLLERS / "max_tokens.wasm", "5")
        ),
        GenerationRequest(
            "List numbers.", max_tokens=10, steer=Controller(CONTROLLERS / "boost_words.wasm", "seven\t30")
        ),
        GenerationRequest(
            "Misbehave.",
            max_tokens=10,
            steer=Controller(CONTROLLERS / "hostile_controller.wasm", "trap_mid_mask"),
        ),
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
    assert (
        by[7].finish_reason == "error"
        and "hostile_controller" in (by[7].error or "")
        and "trap" in (by[7].error or "")
    )
    assert [r.error is not None for r in results].count(True) == 1


def test_engine_input_errors(loaded: Any) -> None:
    from wasmshare.errors import WasmshareError

    with Engine(loaded, max_batch=1) as engine:
        with pytest.raises(WasmshareError, match="max_tokens must be positive"):
            engine.generate([GenerationRequest("x", max_tokens=0)])
        bad = engine.generate(
            [GenerationRequest("x", steer=C.json_schema({"$ref": "https://example.com/remote.json"}))]
        )
        assert bad[0].finish_reason == "error" and "example.com/remote.json" in (bad[0].error or "")
        with pytest.raises(WasmshareError, match="must hold integers"):
            engine.generate([GenerationRequest([1, 2.5], max_tokens=2)])  # type: ignore[list-item]
        with pytest.raises(WasmshareError, match=r"token id -3 is outside the vocabulary \(0\.\.49151\)"):
            engine.generate([GenerationRequest([1, -3], max_tokens=2)])


def test_run_ends_a_request_that_cannot_start_alone(loaded: Any) -> None:
    """In continuous batching a request that cannot start (token ids outside the vocabulary,
    say) ends with its error; the requests beside it decode."""
    from wasmshare.llm.engine import RequestQueue

    with Engine(loaded, max_batch=4) as engine:
        queue = RequestQueue()
        results: dict[int, Any] = {}
        before = queue.submit(GenerationRequest("Say hi.", max_tokens=3))
        bad = queue.submit(GenerationRequest([5, 10**9], max_tokens=3))
        after = queue.submit(GenerationRequest("Say bye.", max_tokens=3, steer=C.choice(["bye", "goodbye"])))
        queue.close()
        engine.run(queue, on_finish=results.__setitem__)
    assert results[bad].finish_reason == "error" and "outside the vocabulary" in str(results[bad].error)
    assert results[before].error is None and len(results[before].tokens) == 3
    assert results[after].error is None and results[after].text in ("bye", "goodbye")


def test_a_result_is_handed_over_once_even_when_the_step_after_it_fails(
    loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row that finished just before a step failed keeps its own result: the failure
    handler does not report it a second time as an engine failure."""
    from wasmshare.llm.engine import RequestQueue

    with Engine(loaded, max_batch=2) as engine:
        real_select = engine._select_rows
        calls = {"n": 0}

        def failing_select(keep: list[int]) -> None:  # first called once the short row has finished
            calls["n"] += 1
            real_select(keep)
            if calls["n"] == 1:
                raise RuntimeError("cache trim failed")

        monkeypatch.setattr(engine, "_select_rows", failing_select)
        queue = RequestQueue()
        delivered: list[tuple[int, Any]] = []
        short = queue.submit(GenerationRequest("Say hi.", max_tokens=1))
        long = queue.submit(GenerationRequest("Say hi.", max_tokens=8))
        queue.close()
        engine.run(
            queue, on_finish=lambda key, result: delivered.append((key, result)), contain_failures=True
        )
    keys = [key for key, _ in delivered]
    assert sorted(keys) == [short, long]  # each once
    result = dict(delivered)
    assert result[short].finish_reason == "length" and result[short].error is None
    assert result[long].finish_reason == "error" and "cache trim failed" in str(result[long].error)


def test_continuous_batching_joins_running_batch_and_cancel_frees_the_slot(loaded: Any) -> None:
    """Requests submitted while others decode join at the next step; a cancelled one ends at once."""
    import threading

    from wasmshare.llm.engine import QueueFull, RequestQueue

    prompt = "Count from one to fifty in words."
    with Engine(loaded, max_batch=2) as engine:
        alone = engine.generate([GenerationRequest(prompt, max_tokens=12)])[0]
        queue = RequestQueue(max_waiting=3)
        results: dict[int, Any] = {}
        first_tokens: dict[int, int] = {}
        key_box: dict[str, int] = {}

        def on_token(key: int, token: int, text: str) -> None:
            first_tokens.setdefault(key, engine.stats.steps)
            # Once the first request decodes, a second one arrives and a third that is cancelled.
            if key == key_box["long"] and len(results) == 0 and "late" not in key_box:
                key_box["late"] = queue.submit(GenerationRequest(prompt, max_tokens=12))
                key_box["doomed"] = queue.submit(GenerationRequest(prompt, max_tokens=500))
                key_box["waiting"] = queue.submit(GenerationRequest(prompt, max_tokens=5))
                with pytest.raises(QueueFull):
                    queue.submit(GenerationRequest(prompt, max_tokens=5))
            if key == key_box.get("doomed") and len(text) > 0 and "cancelled" not in key_box:
                key_box["cancelled"] = int(not queue.cancel(key))
            if key == key_box.get("long") and "late" in key_box and key_box["late"] in results:
                queue.close()

        key_box["long"] = queue.submit(GenerationRequest(prompt, max_tokens=60))
        runner = threading.Thread(
            target=engine.run, args=(queue,), kwargs={"on_token": on_token, "on_finish": results.__setitem__}
        )
        runner.start()
        runner.join(timeout=300)
        assert not runner.is_alive()
    late = results[key_box["late"]]
    assert late.tokens == alone.tokens  # joining a running batch changes nothing for greedy decoding
    assert first_tokens[key_box["late"]] > first_tokens[key_box["long"]]
    doomed = results[key_box["doomed"]]
    assert key_box["cancelled"] == 1 and doomed.finish_reason == "cancelled" and len(doomed.tokens) < 500
    assert results[key_box["waiting"]].finish_reason == "length"
    assert results[key_box["long"]].finish_reason in ("length", "stop")


def test_run_contains_a_failing_step_to_its_requests(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With contain_failures a model failure ends only the batch in flight; later requests decode."""
    from wasmshare.llm.engine import RequestQueue

    with Engine(loaded, max_batch=2) as engine:
        real_forward = engine._forward
        calls = {"n": 0}

        def flaky(feeds: Any, rows: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("device lost")
            return real_forward(feeds, rows)

        monkeypatch.setattr(engine, "_forward", flaky)
        queue = RequestQueue()
        results: dict[int, Any] = {}
        first = queue.submit(GenerationRequest("Say hi.", max_tokens=8))
        queue.close()
        engine.run(queue, on_finish=results.__setitem__, contain_failures=True)
        assert results[first].finish_reason == "error" and "device lost" in str(results[first].error)
        queue = RequestQueue()
        second = queue.submit(GenerationRequest("Say hi.", max_tokens=4))
        queue.close()
        engine.run(queue, on_finish=results.__setitem__, contain_failures=True)
        assert results[second].finish_reason == "length"


def test_stop_constraint_ends_the_answer_without_the_stop_string(loaded: Any) -> None:
    with Engine(loaded, max_batch=2) as engine:
        prompt = "List three facts about the sea, one short sentence each."
        free = engine.generate([GenerationRequest(prompt, max_tokens=40)])[0]
        cut = engine.generate([GenerationRequest(prompt, max_tokens=40, steer=C.stop(["."]))])[0]
    assert "." in free.text[: free.text.rindex(".")]  # the free answer goes on past its first "."
    assert cut.text == free.text[: free.text.index(".")] and cut.finish_reason == "stop"
    assert len(cut.tokens) < len(free.tokens)


def test_incremental_text_matches_a_full_decode(loaded: Any) -> None:
    """Streaming decodes only the last tokens each step; multi-byte characters are held back whole."""
    from wasmshare.llm._rows import Row as _Row

    text = "héllo 世界 🙂 naïve façade — done"
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    with Engine(loaded, max_batch=1) as engine:
        row = _Row(GenerationRequest("x"), 0, [1])
        seen = []
        for token in ids:
            row.tokens.append(token)
            partial = engine._text_so_far(row)
            assert text.startswith(partial) and "\ufffd" not in partial
            seen.append(partial)
        assert seen[-1] == text
        assert len(set(seen)) < len(ids)  # some steps held a partial character back


def test_sparse_and_dense_mask_application_agree(loaded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sparse application (few allowed ids, or a draw checked against the mask) gives the dense tokens."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    requests = [
        GenerationRequest("Describe a person as JSON.", max_tokens=30, steer=C.json_schema(schema)),
        GenerationRequest("Give a code.", max_tokens=12, steer=C.regex(r"[A-Z]{3}-[0-9]{3}")),
        GenerationRequest("Pick a colour.", max_tokens=6, steer=C.choice(["red", "green", "blue"])),
        GenerationRequest(
            "Write a sentence about dogs.",
            max_tokens=16,
            steer=Controller(CONTROLLERS / "ban_strings.wasm", "the\nThe\nTHE\ntHe\nthE\nTHe\ntHE\nThE"),
        ),
        GenerationRequest(
            "List numbers.", max_tokens=10, steer=Controller(CONTROLLERS / "boost_words.wasm", "seven\t30")
        ),
        GenerationRequest("Say hi.", max_tokens=8),
        GenerationRequest(
            "List numbers.",
            max_tokens=10,
            steer=Controller(CONTROLLERS / "boost_words_sparse.wasm", "seven\t30"),
        ),
    ]
    from wasmshare.llm.batch import ControllerBatch, RowOutput

    fallbacks = {"n": 0, "masks": 0, "analysed": 0}
    real_forbidden, real_allowed, real_row_outputs = (
        RowOutput.forbidden,
        RowOutput.allowed,
        ControllerBatch.row_outputs,
    )

    def counted(self: RowOutput) -> Any:
        fallbacks["n"] += 1
        return real_forbidden(self)

    def counted_allowed(self: RowOutput) -> Any:
        fallbacks["analysed"] += not self.analysed
        return real_allowed.fget(self)  # type: ignore[attr-defined]

    def counted_row_outputs(self: ControllerBatch, step: Any, **kw: Any) -> Any:
        outputs = real_row_outputs(self, step, **kw)
        fallbacks["masks"] += sum(out.bias is None and out.sparse_bias is None for out in outputs.values())
        return outputs

    outcomes = {}
    monkeypatch.setattr(RowOutput, "forbidden", counted)
    monkeypatch.setattr(RowOutput, "allowed", property(counted_allowed))
    monkeypatch.setattr(ControllerBatch, "row_outputs", counted_row_outputs)
    stats = {}
    for how in ("sparse", "sparse-eager", "dense"):
        apply = "dense" if how == "dense" else "sparse"
        with Engine(loaded, max_batch=6, mask_apply=apply, defer_masks=how == "sparse") as engine:  # type: ignore[arg-type]
            assert engine.sparse_apply == (how != "dense")
            outcomes[how] = [(r.tokens, r.error) for r in engine.generate(requests)]
            stats[how] = engine.stats
    assert outcomes["sparse"] == outcomes["sparse-eager"] == outcomes["dense"]
    assert (
        outcomes["sparse"][6] == outcomes["sparse"][4]
    )  # the same boost as (id, value) pairs or a whole row
    assert all(error is None for _, error in outcomes["sparse"])
    # Deferred constraint masks: most greedy draws are allowed, so most masks are never computed.
    deferred, late = stats["sparse"].deferred_masks, stats["sparse"].late_masks
    assert 0 < late < deferred / 2, (late, deferred)
    assert stats["sparse"].runner_up_draws > 0  # some forbidden draws were settled without a mask
    assert stats["sparse-eager"].deferred_masks == stats["dense"].deferred_masks == 0
    assert "the" not in loaded.tokenizer.decode(outcomes["sparse"][3][0]).lower()
    assert fallbacks["n"] > 0  # some greedy draw was forbidden and the row was masked after it
    # Greedy rows look at a mask as a whole only after a forbidden draw: most never do.
    assert 0 < fallbacks["analysed"] < fallbacks["masks"] / 2, fallbacks
    with Engine(loaded, max_batch=2) as engine:
        sampled = engine.generate(
            [
                GenerationRequest(
                    requests[3].prompt, max_tokens=24, temperature=1.0, seed=s, steer=requests[3].steer
                )
                for s in (1, 2)
            ]
        )
    assert all(r.error is None and "the" not in r.text.lower() for r in sampled)


@pytest.mark.parametrize("mask_apply", ["auto", "dense"])
def test_a_mask_that_allows_no_token_ends_only_its_sequence(loaded: Any, mask_apply: str) -> None:
    """Sampled and greedy rows alike; ``dense`` (the default on CUDA) checks the masked logits
    before any draw, since sampling from an all ``-inf`` row fails (on CUDA, for the whole
    process)."""
    requests = [
        GenerationRequest(
            "Misbehave.",
            max_tokens=10,
            temperature=0.8,
            seed=1,
            steer=Controller(CONTROLLERS / "hostile_controller.wasm", "empty_mask"),
        ),
        GenerationRequest("Say hi.", max_tokens=8, temperature=0.8, seed=2),
        GenerationRequest(
            "Give a code.", max_tokens=12, temperature=0.8, seed=3, steer=C.regex(r"[A-Z]{3}-[0-9]{3}")
        ),
        GenerationRequest(
            "Misbehave greedily.",
            max_tokens=10,
            steer=Controller(CONTROLLERS / "hostile_controller.wasm", "empty_mask"),
        ),
    ]
    with Engine(loaded, max_batch=4, mask_apply=mask_apply) as engine:  # type: ignore[arg-type]
        bad, free, code, bad_greedy = engine.generate(requests)
    for result in (bad, bad_greedy):
        assert (
            result.finish_reason == "error"
            and "allows no token" in (result.error or "")
            and not result.tokens
        )
    assert free.error is None and free.tokens
    import re

    assert code.error is None and re.fullmatch(r"[A-Z]{3}-[0-9]{3}", code.text)


@pytest.mark.parametrize("mask_apply", ["auto", "dense"])
def test_a_bias_with_nan_inf_or_nothing_allowed_ends_only_its_sequence(loaded: Any, mask_apply: str) -> None:
    """A controller's bias row is its own to write: NaN or +inf in it (greedy or sampled, dense or sparse), or -inf
    everywhere ends that sequence with an error before any draw; a huge finite value
    (3e38) is simply the largest logit, greedy or sampled (sampling subtracts the peak
    before dividing by the temperature, so nothing overflows)."""

    def hostile(mode: str) -> Controller:
        return Controller(CONTROLLERS / "hostile_controller.wasm", mode)

    requests = [
        GenerationRequest("One.", max_tokens=6, temperature=0.8, seed=1, steer=hostile("nan_bias")),
        GenerationRequest("Two.", max_tokens=6, steer=hostile("nan_bias")),
        GenerationRequest("Three.", max_tokens=6, steer=hostile("inf_bias")),
        GenerationRequest("Four.", max_tokens=6, temperature=0.8, seed=4, steer=hostile("inf_bias")),
        GenerationRequest("Five.", max_tokens=6, steer=hostile("forbid_all_bias")),
        GenerationRequest("Six.", max_tokens=6, temperature=0.8, seed=6, steer=hostile("huge_bias")),
        GenerationRequest("Eight.", max_tokens=6, steer=hostile("sparse_nan")),
        GenerationRequest("Seven.", max_tokens=3, steer=hostile("huge_bias")),
        GenerationRequest("Say hi.", max_tokens=6, temperature=0.8, seed=2),
        GenerationRequest("Give a code.", max_tokens=12, steer=C.regex(r"[A-Z]{3}-[0-9]{3}")),
    ]
    with Engine(loaded, max_batch=len(requests), mask_apply=mask_apply) as engine:  # type: ignore[arg-type]
        *bad, huge_greedy, free, code = engine.generate(requests)
    huge_sampled = bad.pop(5)
    assert huge_sampled.error is None and huge_sampled.tokens == [loaded.vocab_size // 2] * 6
    for result in bad[:4] + bad[5:]:
        assert result.finish_reason == "error" and "bias holds NaN, +inf or values too large" in (
            result.error or ""
        ), result.error
        assert not result.tokens
    assert bad[4].finish_reason == "error" and "bias allows no token" in (bad[4].error or ""), bad[4].error
    assert huge_greedy.error is None and huge_greedy.tokens == [loaded.vocab_size // 2] * 3
    assert free.error is None and free.tokens
    assert code.error is None and re.fullmatch(r"[A-Z]{3}-[0-9]{3}", code.text)


def test_run_contains_a_failing_prefill_to_the_rows_it_was_admitting(
    loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that fails while joining a running batch (its prefill raises) still gets its
    result, an error, like the rows already decoding; its controller slot is freed."""
    from wasmshare.llm.engine import RequestQueue

    with Engine(loaded, max_batch=2) as engine:
        real_prefill = engine._prefill
        calls = {"n": 0}

        def flaky(rows: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("out of memory")
            return real_prefill(rows)

        monkeypatch.setattr(engine, "_prefill", flaky)
        queue = RequestQueue()
        results: dict[int, Any] = {}
        joined = {"done": False}
        first = queue.submit(GenerationRequest("Say hi.", max_tokens=16, steer=C.regex(r"[a-z ]+")))

        def on_token(key: int, token: int, text: str) -> None:
            if not joined["done"]:
                joined["done"] = True
                joined["key"] = queue.submit(
                    GenerationRequest("Say bye.", max_tokens=4, steer=C.choice(["bye"]))
                )
                queue.close()

        engine.run(queue, on_token=on_token, on_finish=results.__setitem__, contain_failures=True)
        late = results[joined["key"]]
        assert late.finish_reason == "error" and "out of memory" in str(late.error)
        assert results[first].finish_reason == "error"
        assert not engine.batch.sequences  # both controller slots were given back
        queue = RequestQueue()
        again = queue.submit(GenerationRequest("Say hi.", max_tokens=4, steer=C.choice(["hi", "hello"])))
        queue.close()
        engine.run(queue, on_finish=results.__setitem__, contain_failures=True)
        assert results[again].error is None and results[again].text in ("hi", "hello")


@pytest.mark.parametrize("allowed_rank", [1, 2, 40])
def test_a_forbidden_greedy_draw_takes_the_best_allowed_token(loaded: Any, allowed_rank: int) -> None:
    """A greedy row whose deferred mask forbids its argmax gets the masked argmax, ties to the
    lowest id: from further argmax passes while the budget lasts, else from the computed mask."""
    import numpy as np
    import torch

    from wasmshare.llm._rows import Row as _Row
    from wasmshare.llm.batch import RowOutput

    width = loaded.vocab_size
    line = torch.zeros(width)
    ranked = [7, 3, 11, 5] + list(range(100, 100 + 60))  # ids from the largest logit down
    for rank, token in enumerate(ranked):
        line[token] = 100.0 - rank
    line[2] = line[3]  # a tie with the runner-up at a lower id, which the mask forbids
    allowed = {ranked[allowed_rank], ranked[-1]}
    loads = {"n": 0}

    def load() -> Any:
        loads["n"] += 1
        words = np.zeros((width + 31) // 32, dtype=np.uint32)
        for t in allowed:
            words[t >> 5] |= np.uint32(1 << (t & 31))
        return words

    with Engine(loaded, max_batch=1) as engine:
        row = _Row(GenerationRequest("x"), 0, [1])
        out = RowOutput(width, check=lambda t: t in allowed, load=load)
        assert engine._sample_steered(row, line.clone(), out) == ranked[allowed_rank]
    within_budget = allowed_rank <= max(1, 1_048_576 // width)
    assert loads["n"] == (0 if within_budget else 1)
    assert engine.stats.runner_up_draws == int(within_budget) and engine.stats.late_masks == int(
        not within_budget
    )


# -- bounds on what one request costs ----------------------------------------------------------------


def test_a_long_prompt_is_prefilled_in_chunks_and_answers_the_same(loaded: Any) -> None:
    """A prompt longer than prefill_chunk_tokens joins after a chunk per step, decoding the
    same greedy tokens as a one-pass prefill, while a short request beside it gets its first
    token before the long prompt's prefill is done."""
    text = " ".join(f"item {i} is blue;" for i in range(120)) + " So the colour of item 7 is"
    long_request = GenerationRequest(text, max_tokens=6, chat=False)
    steered = GenerationRequest(text, max_tokens=6, chat=False, steer=C.regex(r" ?[a-z]+"))
    short = GenerationRequest("The capital of France is", max_tokens=12, chat=False)
    with Engine(loaded, max_batch=3) as engine:
        assert len(loaded.encode_prompt(text, chat=False)) > 600
        expected = engine.generate([long_request, steered])
    order: list[int] = []
    with Engine(loaded, max_batch=3, prefill_chunk_tokens=64) as engine:
        results = engine.generate([long_request, steered, short], on_token=lambda i, t, s: order.append(i))
    assert [r.tokens for r in results[:2]] == [r.tokens for r in expected]
    assert all(r.error is None and r.tokens for r in results)
    assert order.index(2) < min(
        order.index(0), order.index(1)
    )  # the short one decoded while the long ones prefilled


def test_an_endless_backtracker_ends_at_its_work_bound_and_its_cache_stays_small(loaded: Any) -> None:
    """A controller that drops every sampled token never grows its output; the work bound ends
    it with an error naming the bound, and the cache it backtracks over is compacted."""
    widths: list[int] = []
    with Engine(loaded, max_batch=2) as engine:
        real_forward = engine._forward

        def watch(feeds: Any, rows: Any) -> Any:
            assert engine._attn is not None
            widths.append(int(engine._attn.shape[1]))
            return real_forward(feeds, rows)

        engine._forward = watch  # type: ignore[method-assign]
        hostile, plain = engine.generate(
            [
                GenerationRequest(
                    "Hi",
                    max_tokens=5,
                    max_work=300,
                    steer=Controller(CONTROLLERS / "hostile_host_calls.wasm", "endless_backtrack"),
                ),
                GenerationRequest("Count: one, two,", max_tokens=40),
            ]
        )
    assert hostile.finish_reason == "error" and "the limit is 300 tokens" in (hostile.error or ""), (
        hostile.error
    )
    assert plain.error is None and len(plain.tokens) == 40
    assert max(widths) < 40 + 64 + 40  # without compaction the width passes 300


def test_a_prompt_at_the_context_is_refused(loaded: Any) -> None:
    """generate() refuses it before anything runs; in a running batch (the server's run()) it
    ends alone with the same error."""
    from wasmshare.errors import WasmshareError
    from wasmshare.llm.engine import RequestQueue

    context = loaded.context_length
    assert isinstance(context, int) and context > 0
    with Engine(loaded, max_batch=2) as engine:
        with pytest.raises(WasmshareError, match="the model's context is"):
            engine.generate([GenerationRequest([42] * context, max_tokens=2)])
        queue = RequestQueue()
        results: dict[int, Any] = {}
        too_long = queue.submit(GenerationRequest([42] * context, max_tokens=2))
        fine = queue.submit(GenerationRequest("Hello", max_tokens=2))
        queue.close()
        engine.run(queue, on_finish=results.__setitem__)
    assert results[too_long].finish_reason == "error" and "context" in (results[too_long].error or "")
    assert results[fine].error is None and results[fine].tokens


def test_a_controller_that_imports_constraints_gets_its_tokenizer_before_any_step(loaded: Any) -> None:
    """One-off start-up work (the grammar engine's tokenizer) happens when the controller is
    created, never inside a step's deadline."""
    from wasmshare.llm.batch import ControllerBatch

    C._tokenizers.pop(loaded.token_table.sha256, None)
    with ControllerBatch(loaded.token_table, capacity=1) as batch:
        batch.add(Controller(CONTROLLERS / "tool_call.wasm", "<tool>\n{}"))
        assert loaded.token_table.sha256 in C._tokenizers
