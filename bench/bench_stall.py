"""A slow controller in a batch of 8: what the other 7 rows keep under ``wait`` and ``sit_out``.

Batch 8 on the embedded SmolLM2-135M-Instruct, greedy, ``max_tokens`` ``TOKENS`` for every
row. Seven well-behaved rows (three plain, two JSON Schema constraints, a regex, a wasm
``allow_list`` mask) and one row steered by ``guests/controllers/slow.wasm``, which burns a
fixed amount of work per step: calibrated at the start of the run to ``SLOW_FORWARDS`` times
this machine's forward pass of the batch, so it is late at every step.

``torch.set_num_threads(1)`` for every case: on this 2-core machine the slow controller's
thread then has the other core, and what is measured is the stall, not two threads fighting
for one core (the baseline runs with the same setting).

Cases, interleaved round-robin over ``REPEATS`` rounds so a slow spell of the shared machine
hits each alike, each its own :class:`~wasmshare.llm.engine.Engine` over the same model:

* baseline: the 7 rows alone (``stall_policy="sit_out"``, nothing is late);
* baseline, wait: the 7 rows alone under ``stall_policy="wait"``: what the default costs a
  batch with no late controller (each controller a task of its own, against the thread
  runner's chunks);
* wait: the 7 rows and the slow one, ``stall_policy="wait"`` (every step waits for it);
* sit_out: the same 8, ``stall_policy="sit_out"`` (the default step budget);
* alone: the slow row alone: its own pace, set by its controller.

The 7 rows' tokens/s: their tokens ÷ the time from the start of the run to the last of them
finishing (``Engine.run``'s ``on_finish``), median over rounds. The slow row's tokens/s the
same way for its own tokens. Its controller's bound: 1 ÷ its measured step time (a
:class:`ControllerBatch` step of the slow controller alone, timed in the calibration). Also
reported: steps sat out, late answers, the longest lag and the outputs' equality with the
baseline and the slow row alone (greedy: they must be equal).
"""

from __future__ import annotations

import math
import statistics
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "stall"
ROOT = Path(__file__).resolve().parent.parent
SLOW = ROOT / "guests" / "controllers" / "slow.wasm"
TOKENS = 32
REPEATS = 3
SLOW_FORWARDS = 3.0
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def _others(tokens: int) -> list[Any]:
    from wasmshare.llm import Controller
    from wasmshare.llm import constraints as C
    from wasmshare.llm.engine import GenerationRequest

    allow = Controller(
        ROOT / "guests" / "controllers" / "allow_list.wasm", struct.pack("<3I", 9906, 9907, 28)
    )
    return [
        GenerationRequest("Name three colours.", max_tokens=tokens),
        GenerationRequest("Tell me about the sea.", max_tokens=tokens),
        GenerationRequest("Write a line about trees.", max_tokens=tokens),
        GenerationRequest("Give a person as JSON.", max_tokens=tokens, steer=C.json_schema(SCHEMA)),
        GenerationRequest("Give a pilot as JSON.", max_tokens=tokens, steer=C.json_schema(SCHEMA)),
        GenerationRequest("Say yes or no.", max_tokens=tokens, steer=C.regex("(yes|no)( (yes|no))*")),
        GenerationRequest("Say something.", max_tokens=tokens, steer=allow),
    ]


def _slow_request(units: int, tokens: int) -> Any:
    from wasmshare.llm import Controller
    from wasmshare.llm.engine import GenerationRequest

    return GenerationRequest(
        "Count to ten.", max_tokens=tokens, steer=Controller(SLOW, struct.pack("<4I", units, 0, 0, 0))
    )


def _calibrate(loaded: Any, limits: Any, tokens: int) -> dict[str, float]:
    """The slow controller's work units for SLOW_FORWARDS forward passes of the batch, and its step time."""
    from wasmshare.llm import Controller
    from wasmshare.llm.batch import ControllerBatch
    from wasmshare.llm.engine import Engine

    with Engine(loaded, max_batch=8, limits=limits) as engine:
        engine.generate([*_others(min(tokens, 8)), _others(1)[0]])
        forward_s = engine.stats.forward_s / engine.stats.steps
    with ControllerBatch(loaded.token_table, capacity=1, limits=limits) as batch:
        probe = 5000
        sid = batch.add(Controller(SLOW, struct.pack("<4I", probe, 0, 0, 0)))
        batch.step({sid: []}, only=[sid])
        started = time.perf_counter()
        for _ in range(3):
            batch.step({sid: []}, only=[sid])
        unit_s = (time.perf_counter() - started) / 3 / probe
        units = math.ceil(SLOW_FORWARDS * forward_s / unit_s)
        batch.remove(sid)
        sid = batch.add(Controller(SLOW, struct.pack("<4I", units, 0, 0, 0)))
        samples = []
        for _ in range(3):
            started = time.perf_counter()
            batch.step({sid: []}, only=[sid])
            samples.append(time.perf_counter() - started)
    return {"units": units, "forward_s": forward_s, "controller_step_s": statistics.median(samples)}


def _run_case(loaded: Any, limits: Any, requests: list[Any], policy: str) -> dict[str, Any]:
    from wasmshare.llm.engine import Engine, RequestQueue

    with Engine(loaded, max_batch=8, limits=limits, stall_policy=policy) as engine:  # type: ignore[arg-type]
        queue = RequestQueue()
        keys = [queue.submit(r) for r in requests]
        queue.close()
        finished: dict[int, float] = {}
        results: dict[int, Any] = {}

        def on_finish(key: int, result: Any) -> None:
            finished[key] = time.perf_counter()
            results[key] = result

        started = time.perf_counter()
        engine.run(queue, on_finish=on_finish)
        stats = engine.stats
    return {
        "results": [results[k] for k in keys],
        "elapsed": [finished[k] - started for k in keys],
        "sat_out_steps": stats.sat_out_steps,
        "late_answers": stats.late_answers,
        "max_lag_steps": stats.max_lag_steps,
        "budget_wait_s": stats.budget_wait_s,
        "steps": stats.steps,
    }


def _rate(results: list[Any], elapsed: list[float]) -> float:
    return sum(len(r.tokens) for r in results) / max(elapsed)


def run(quick: bool = False) -> list[dict[str, Any]]:
    import torch

    from wasmshare.llm.limits import Limits
    from wasmshare.llm.models import load_model

    torch.set_num_threads(1)
    tokens = 8 if quick else TOKENS
    repeats = 1 if quick else REPEATS
    loaded = load_model("smollm2-135m")
    limits = Limits(deadline_ms=120_000)  # the slow controller is slow on purpose
    cal = _calibrate(loaded, limits, tokens)
    units = int(cal["units"])
    cases: dict[str, list[dict[str, Any]]] = {
        "baseline": [],
        "baseline_wait": [],
        "wait": [],
        "sit_out": [],
        "alone": [],
    }
    order = list(cases)
    for round_ in range(repeats):
        for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
            print(f"round {round_ + 1}/{repeats}: {name}", file=sys.stderr, flush=True)
            if name in ("baseline", "baseline_wait"):
                policy = "sit_out" if name == "baseline" else "wait"
                cases[name].append(_run_case(loaded, limits, _others(tokens), policy))
            elif name == "alone":
                cases[name].append(_run_case(loaded, limits, [_slow_request(units, tokens)], "wait"))
            else:
                cases[name].append(
                    _run_case(loaded, limits, [*_others(tokens), _slow_request(units, tokens)], name)
                )

    def others_rate(run_: dict[str, Any]) -> float:
        return _rate(run_["results"][:7], run_["elapsed"][:7])

    def slow_rate(run_: dict[str, Any]) -> float:
        return _rate(run_["results"][-1:], run_["elapsed"][-1:])

    base = statistics.median(others_rate(r) for r in cases["baseline"])
    reference = [r.tokens for r in cases["baseline"][0]["results"]]
    alone_tokens = cases["alone"][0]["results"][0].tokens
    bound = 1 / cal["controller_step_s"]
    rows = []
    for policy in ("wait", "sit_out"):
        runs = cases[policy]
        ours = statistics.median(others_rate(r) for r in runs)
        slow = statistics.median(slow_rate(r) for r in runs)
        rows.append(
            {
                "case": f"7 rows beside a slow controller, {policy}: their tokens/s",
                "ours_us": round(1e6 / ours, 1),
                "baseline": "the 7 rows without it",
                "baseline_us": round(1e6 / base, 1),
                "ratio": round((1e6 / base) / (1e6 / ours), 3),
                "others_tokens_per_s": round(ours, 2),
                "baseline_tokens_per_s": round(base, 2),
                "kept": round(ours / base, 3),
                "slow_tokens_per_s": round(slow, 3),
                "slow_alone_tokens_per_s": round(statistics.median(slow_rate(r) for r in cases["alone"]), 3),
                "slow_controller_bound_tokens_per_s": round(bound, 3),
                "slow_of_bound": round(slow / bound, 3),
                "sat_out_steps": statistics.median(r["sat_out_steps"] for r in runs),
                "late_answers": statistics.median(r["late_answers"] for r in runs),
                "max_lag_steps": max(r["max_lag_steps"] for r in runs),
                "others_equal": all([x.tokens for x in r["results"][:7]] == reference for r in runs),
                "slow_equal": all(r["results"][-1].tokens == alone_tokens for r in runs),
                "forward_ms": round(cal["forward_s"] * 1000, 1),
                "slow_controller_step_ms": round(cal["controller_step_s"] * 1000, 1),
                "tokens": tokens,
                "repeats": repeats,
                "detail_others_tokens_per_s": [round(others_rate(r), 2) for r in runs],
            }
        )
    waited = statistics.median(others_rate(r) for r in cases["baseline_wait"])
    rows.append(
        {
            "case": "7 rows, no slow row: sit_out (the default) against wait, their tokens/s",
            "ours_us": round(1e6 / base, 1),
            "baseline": "the same 7 rows under wait",
            "baseline_us": round(1e6 / waited, 1),
            "ratio": round(base / waited, 3),
            "others_tokens_per_s": round(base, 2),
            "baseline_tokens_per_s": round(waited, 2),
            "sat_out_steps": statistics.median(r["sat_out_steps"] for r in cases["baseline"]),
            "others_equal": all(
                [x.tokens for x in r["results"]] == reference for r in cases["baseline_wait"]
            ),
            "tokens": tokens,
            "repeats": repeats,
            "detail_sit_out_tokens_per_s": [round(others_rate(r), 2) for r in cases["baseline"]],
            "detail_wait_tokens_per_s": [round(others_rate(r), 2) for r in cases["baseline_wait"]],
        }
    )
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {("sit_out" if "sit_out:" in r["case"] else "wait"): r for r in rows[:2]}
    sit, wait, idle = by["sit_out"], by["wait"], rows[2]
    return [
        {
            "target": "under sit_out the 7 rows keep >= 0.95 of their tokens/s without the slow row",
            "met": sit["kept"] >= 0.95,
            "value": sit["kept"],
            "timing": True,
        },
        {
            "target": "what wait keeps (reported, no target)",
            "met": True,
            "value": wait["kept"],
            "timing": True,
        },
        {
            "target": "the slow row under sit_out runs at its controller's pace (>= 0.75 of 1 / its step time)",
            "met": sit["slow_of_bound"] >= 0.75,
            "value": sit["slow_of_bound"],
            "timing": True,
        },
        {
            "target": "without a late controller sit_out keeps wait's tokens/s (reported: a ratio inside the spread is a tie)",
            "met": True,
            "value": idle["ratio"],
            "timing": True,
        },
        {
            "target": "every output equals its output without the slow row or alone (greedy)",
            "met": all(r["others_equal"] and r.get("slow_equal", True) for r in rows),
            "value": {k: (r["others_equal"], r["slow_equal"]) for k, r in by.items()},
        },
    ]


def main(argv: list[str] | None = None) -> int:
    return _common.bench_main(NAME, __doc__, argv, lambda quick: run(quick=quick), targets)


if __name__ == "__main__":
    raise SystemExit(main())
