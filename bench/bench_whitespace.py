"""JSON answers under compact against flexible whitespace, on the held-out schemas the tests use.

The schemas are the first ``COUNT`` MaskBench development schemas that are closed objects of
one to three required, bounded scalars (the selection of ``tests/test_engine.py``'s
``small_schemas``, here 24 instead of the tests' few). Each is asked of the embedded
SmolLM2-135M-Instruct (greedy, batch 8, ``max_tokens`` 128) with the prompt "Give one example
of a JSON object for this schema: ...", once with ``json_schema(schema)`` (compact
separators, the default) and once with ``json_schema(schema, whitespace="flexible")``.

A second row asks the four questions of ``examples/prompts.jsonl`` under
``examples/answer.json`` (what the README's batch command runs), where a free-text field lets
flexible whitespace wander.

Figures per mode: answers that are complete and validate under the full schema (jsonschema),
tokens per answer, wall time per answer. The row compares compact (ours) with flexible
(baseline): ``ratio = baseline_us / ours_us`` of the wall time per answer.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "whitespace"
ROOT = Path(__file__).resolve().parent.parent
MASKBENCH = ROOT.parent / "shared" / "maskbench" / "maskbench-dev.jsonl.gz"
COUNT = 24
MAX_TOKENS = 128


def _bounded(prop: Any) -> bool:
    if not isinstance(prop, dict):
        return False
    kind = prop.get("type")
    if kind in ("integer", "boolean"):
        return True
    return kind == "string" and ("enum" in prop or 0 < int(prop.get("maxLength", 0)) <= 40)


def schemas(count: int) -> list[dict[str, Any]]:
    """The held-out schemas (see the module docstring), in file order."""
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
            if not any(t["valid"] for t in row["tests"]) or not all(_bounded(p) for p in props.values()):
                continue
            picked.append(schema)
            if len(picked) == count:
                break
    return picked


def _measure(
    engine: Any, picked: list[dict[str, Any]], whitespace: str, prompts: list[str] | None = None
) -> dict[str, Any]:
    import jsonschema

    from wasmshare.llm import constraints as C
    from wasmshare.llm.engine import GenerationRequest

    prompts = prompts or [
        f"Give one example of a JSON object for this schema: {json.dumps(s)}" for s in picked
    ]
    requests = [
        GenerationRequest(p, max_tokens=MAX_TOKENS, steer=C.json_schema(s, whitespace=whitespace))  # type: ignore[arg-type]
        for p, s in zip(prompts, picked)
    ]
    started = time.perf_counter()
    results = engine.generate(requests)
    wall = time.perf_counter() - started
    valid = 0
    for schema, r in zip(picked, results):
        try:
            jsonschema.validate(json.loads(r.text), schema)
            valid += r.finish_reason != "length"
        except (ValueError, jsonschema.ValidationError):
            pass
    return {
        "valid": valid,
        "answers": len(results),
        "tokens": [len(r.tokens) for r in results],
        "cut": sum(r.finish_reason == "length" for r in results),
        "wall_s": wall,
    }


def run(quick: bool = False) -> list[dict[str, Any]]:
    import torch

    from wasmshare.llm.engine import Engine
    from wasmshare.llm.models import load_model

    picked = schemas(8 if quick else COUNT)
    loaded = load_model("smollm2-135m")
    lines = [
        json.loads(line)
        for line in (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
        if line.strip()
    ]
    questions = [x["prompt"] if isinstance(x, dict) else x for x in lines]
    answer = json.loads((ROOT / "examples" / "answer.json").read_text())
    out: dict[str, dict[str, Any]] = {}
    with Engine(loaded, max_batch=8) as engine, torch.inference_mode():
        for mode in ("compact", "flexible"):
            out[mode] = _measure(engine, picked, mode)
            out["examples-" + mode] = _measure(engine, [answer] * len(questions), mode, questions)
    return [
        _row(
            f"{len(picked)} held-out MaskBench schemas, wall time per answer", out["compact"], out["flexible"]
        ),
        _row(
            "examples/prompts.jsonl under examples/answer.json, wall time per answer",
            out["examples-compact"],
            out["examples-flexible"],
        ),
    ]


def _row(case: str, ours: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    ours_us = ours["wall_s"] / ours["answers"] * 1e6
    base_us = base["wall_s"] / base["answers"] * 1e6
    return {
        "case": case,
        "ours_us": round(ours_us, 1),
        "baseline": "flexible whitespace",
        "baseline_us": round(base_us, 1),
        "ratio": round(base_us / ours_us, 3),
        "valid_compact": ours["valid"],
        "valid_flexible": base["valid"],
        "answers": ours["answers"],
        "cut_compact": ours["cut"],
        "cut_flexible": base["cut"],
        "tokens_per_answer_compact": round(statistics.mean(ours["tokens"]), 1),
        "tokens_per_answer_flexible": round(statistics.mean(base["tokens"]), 1),
        "max_tokens": MAX_TOKENS,
    }


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "target": f"compact whitespace gives at least as many valid answers as flexible ({row['case'].split(',')[0]})",
            "met": row["valid_compact"] >= row["valid_flexible"],
            "value": f"{row['valid_compact']} vs {row['valid_flexible']} of {row['answers']}",
        }
        for row in rows
    ]


def main(argv: list[str] | None = None) -> int:
    return _common.bench_main(NAME, __doc__, argv, lambda quick: run(quick=quick), targets)


if __name__ == "__main__":
    raise SystemExit(main())
