"""Never stall the batch: a late controller sits its own row out, the others go on, no output changes.

The slow controller (``guests/controllers/slow.wasm``) burns a fixed amount of work per
step, calibrated here to about four forward passes of this machine, so it is late at
every step; greedy outputs are compared with the same requests without it and alone.
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="generation needs torch")
pytest.importorskip("transformers", reason="generation needs transformers")

from wasmshare.errors import WasmshareError  # noqa: E402
from wasmshare.llm import Controller  # noqa: E402
from wasmshare.llm import constraints as C  # noqa: E402
from wasmshare.llm.batch import ControllerBatch  # noqa: E402
from wasmshare.llm.engine import Engine, GenerationRequest, GenerationResult, RequestQueue  # noqa: E402
from wasmshare.llm.limits import Limits  # noqa: E402
from wasmshare.llm.models import ModelError, load_model  # noqa: E402

CONTROLLERS = Path(__file__).resolve().parent.parent / "guests" / "controllers"
ROOMY = Limits(deadline_ms=120_000)  # the slow controller is slow on purpose: no hard limit in the way
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def loaded() -> Iterator[Any]:
    """The embedded model, run on one torch thread: the slow controller's thread has a core
    of its own, so the forward pass keeps the pace it was calibrated at."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield load_model("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"embedded model not installed: {e}")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(loaded: Any) -> dict[str, float]:
    """The slow controller's work units for four forward passes of a small batch here, and
    the forward pass in ms."""
    with Engine(loaded, max_batch=4, stall_policy="wait") as engine:
        engine.generate([GenerationRequest("Hello there.", max_tokens=4)] * 3)
        forward_s = engine.stats.forward_s / engine.stats.steps
    with ControllerBatch(loaded.token_table, capacity=1, limits=ROOMY) as batch:
        sid = batch.add(slow(2000))
        batch.step({sid: []}, only=[sid])  # warm
        started = time.perf_counter()
        for _ in range(3):
            batch.step({sid: []}, only=[sid])
        unit_s = (time.perf_counter() - started) / 3 / 2000
    return {"units": math.ceil(4 * forward_s / unit_s), "forward_ms": forward_s * 1000}


def slow(
    units: float, backtrack_at: int = 0, forward_at: int = 0, token: int = 0, slow_from: int = 0
) -> Controller:
    arg = struct.pack("<5I", int(units), backtrack_at, forward_at, token, slow_from)
    return Controller(CONTROLLERS / "slow.wasm", arg)


def others() -> list[GenerationRequest]:
    """The well-behaved rows: plain, a JSON Schema constraint, a wasm mask."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
    }
    return [
        GenerationRequest("Name three colours.", max_tokens=MAX_TOKENS),
        GenerationRequest("Give a person as JSON.", max_tokens=MAX_TOKENS, steer=C.json_schema(schema)),
        GenerationRequest(
            "Say something.",
            max_tokens=MAX_TOKENS,
            steer=Controller(CONTROLLERS / "allow_list.wasm", struct.pack("<3I", 9906, 9907, 28)),
        ),
    ]


def slow_request(units: float, **kw: Any) -> GenerationRequest:
    policy = kw.pop("stall_policy", None)
    return GenerationRequest(
        "Count to ten.", max_tokens=MAX_TOKENS, steer=slow(units, **kw), stall_policy=policy
    )


def generate(
    loaded: Any, requests: Sequence[GenerationRequest], **kw: Any
) -> tuple[list[GenerationResult], Any]:
    kw.setdefault("limits", ROOMY)
    with Engine(loaded, max_batch=8, **kw) as engine:
        return engine.generate(requests), engine.stats


@pytest.fixture(scope="module")
def references(loaded: Any, work: dict[str, float]) -> dict[str, Any]:
    """The others without the slow row, and the slow row alone (both under ``wait``)."""
    base, _ = generate(loaded, others(), stall_policy="wait")
    alone, _ = generate(loaded, [slow_request(work["units"])], stall_policy="wait")
    return {"base": [r.tokens for r in base], "alone": alone[0].tokens}


@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_a_slow_controller_sits_out_and_no_output_changes(
    loaded: Any, work: dict[str, float], references: dict[str, Any], mode: str
) -> None:
    """Under sit_out the slow row sits out steps (counted) and every output equals its output
    without the slow row or alone; under wait the same outputs and nothing sits out."""
    results, stats = generate(
        loaded, [*others(), slow_request(work["units"])], stall_policy="sit_out", mode=mode
    )
    assert [r.error for r in results] == [None] * 4
    assert [r.tokens for r in results[:3]] == references["base"]
    assert results[3].tokens == references["alone"]
    assert results[3].sat_out_steps > 0
    assert stats.sat_out_steps >= results[3].sat_out_steps and stats.late_answers > 0
    assert stats.max_lag_steps >= 1
    if mode == "threads":
        waited, wait_stats = generate(loaded, [*others(), slow_request(work["units"])], stall_policy="wait")
        assert [r.tokens for r in waited] == [*references["base"], references["alone"]]
        assert wait_stats.sat_out_steps == 0 and all(r.sat_out_steps == 0 for r in waited)


def test_a_slow_controller_past_its_deadline_ends_alone_with_its_error(
    loaded: Any, work: dict[str, float], references: dict[str, Any]
) -> None:
    """The hard deadline still holds for a late controller: its row ends with the deadline
    error, after sitting out; the others are unchanged. (Slow from its third token on: ten
    forward passes of work against a deadline of five, so it is late at the cut first.)"""
    deadline = Limits(deadline_ms=work["forward_ms"] * 5)
    doomed = slow_request(work["units"] * 10 / 4, slow_from=2)
    results, _ = generate(loaded, [*others(), doomed], stall_policy="sit_out", limits=deadline)
    assert [r.tokens for r in results[:3]] == references["base"]
    assert results[3].finish_reason == "error" and "deadline" in str(results[3].error)
    assert results[3].sat_out_steps >= 1


def test_sitting_out_keeps_backtrack_and_fast_forward_exact(loaded: Any, work: dict[str, float]) -> None:
    """A late answer that backtracks or fast-forwards acts as it does in time: each output
    equals the same controller's alone, the forced tokens included."""
    units = work["units"]
    backtracking = dict(backtrack_at=2)
    forwarding = dict(forward_at=2, token=351)
    alone = [
        generate(loaded, [slow_request(units, **kw)], stall_policy="wait")[0][0]
        for kw in (backtracking, forwarding)
    ]
    results, stats = generate(
        loaded,
        [others()[0], slow_request(units, **backtracking), slow_request(units, **forwarding)],
        stall_policy="sit_out",
    )
    assert [r.tokens for r in results[1:]] == [a.tokens for a in alone]
    # the token sampled again after the backtrack and all after it are even, the first odd
    assert [t % 2 for t in results[1].tokens] == [1] + [0] * (len(results[1].tokens) - 1)
    assert results[2].tokens[2:4] == [351, 353]  # fast-forwarded at the third token
    assert results[1].sat_out_steps > 0 and results[2].sat_out_steps > 0
    assert stats.fast_forward_tokens == 2


def test_sitting_out_under_dense_masks_and_beside_biases_changes_no_output(
    loaded: Any, work: dict[str, float], references: dict[str, Any]
) -> None:
    """With masks applied as one dense tensor, a late answer's mask reaches its kept logits
    the same way; biases (whole-row and sparse) beside it are unchanged."""
    boosts = [
        GenerationRequest(
            "List numbers.", max_tokens=MAX_TOKENS, steer=Controller(CONTROLLERS / f"{n}.wasm", "seven\t30")
        )
        for n in ("boost_words", "boost_words_sparse")
    ]
    beside, _ = generate(loaded, boosts, stall_policy="wait")
    results, stats = generate(
        loaded, [*boosts, slow_request(work["units"])], stall_policy="sit_out", mask_apply="dense"
    )
    assert [r.tokens for r in results[:2]] == [r.tokens for r in beside]
    assert results[0].tokens == results[1].tokens  # the sparse bias is the whole-row bias
    assert results[2].tokens == references["alone"] and results[2].sat_out_steps > 0


@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_a_constraint_answers_in_a_cut_step_beside_a_late_controller(loaded: Any, mode: str) -> None:
    """Constraints run as tasks of a cut step too: a choice constraint answers its mask while
    a slow controller is late, and its next step goes on while the slow one still runs."""
    import numpy as np

    with ControllerBatch(loaded.token_table, capacity=4, mode=mode, limits=ROOMY) as batch:
        late = batch.add(slow(1_000_000))
        choice = batch.add(C.choice(["yes", "no"]))
        step = batch.step({late: [], choice: []}, only=[late, choice], cut=batch.new_cut(expendable=[late]))
        assert step.late == (late,) and step.sequences == (choice,)
        allowed = batch.row_outputs(step)[choice].allowed
        assert 0 < len(allowed) < 100 and batch.late == {late}
        first = int(np.asarray(allowed)[0])
        again = batch.step({choice: [first]}, only=[choice], cut=batch.new_cut(expendable=[late]))
        assert again.sequences == (choice,) and late in batch.late
        answer = batch.collect_late(wait=[late])
        assert answer is not None and answer.sequences == (late,)


def test_a_request_sets_its_own_policy(
    loaded: Any, work: dict[str, float], references: dict[str, Any]
) -> None:
    """A request's stall_policy overrides the engine's, both ways."""
    waited, _ = generate(
        loaded, [others()[0], slow_request(work["units"], stall_policy="wait")], stall_policy="sit_out"
    )
    assert waited[1].sat_out_steps == 0 and waited[1].tokens == references["alone"]
    sat, _ = generate(
        loaded, [others()[0], slow_request(work["units"], stall_policy="sit_out")], stall_policy="wait"
    )
    assert sat[1].sat_out_steps > 0 and sat[1].tokens == references["alone"]
    # The same two rows either way: a batch of 2, not the 3 of references["base"], whose bf16
    # sums may round differently on some CPUs.
    assert waited[0].tokens == sat[0].tokens


def test_a_late_row_that_is_cancelled_ends_and_the_others_go_on(
    loaded: Any, work: dict[str, float], references: dict[str, Any]
) -> None:
    """Cancelling a row while its controller is late waits for that call, ends the row as
    cancelled and frees its slot; the row beside it is unchanged."""
    with Engine(loaded, max_batch=2, limits=ROOMY) as engine:
        queue = RequestQueue()
        results: dict[int, GenerationResult] = {}
        plain = queue.submit(others()[0])
        late = queue.submit(slow_request(work["units"]))
        after = queue.submit(others()[0])  # waits for a free slot

        def on_token(key: int, token: int, text: str) -> None:
            if key == plain and len(text) > 0 and late not in results:
                queue.cancel(late)

        queue.close()
        engine.run(queue, on_token=on_token, on_finish=results.__setitem__)
    assert results[late].finish_reason == "cancelled"
    assert results[plain].tokens == results[after].tokens == references["base"][0]
    assert not engine.batch.late


def test_bad_stall_settings_are_refused(loaded: Any) -> None:
    for bad in ({"stall_policy": "never"}, {"step_budget_ms": -1.0}, {"step_budget_ms": float("nan")}):
        with pytest.raises(WasmshareError, match="stall_policy|step_budget_ms"):
            Engine(loaded, **bad)
    with Engine(loaded, max_batch=1) as engine:
        with pytest.raises(WasmshareError, match="request 0: stall_policy must be 'wait' or 'sit_out'"):
            engine.generate([GenerationRequest("Hi", max_tokens=1, stall_policy="later")])  # type: ignore[arg-type]


# -- the server: a late uploaded controller beside a plain stream ------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, loaded: Any) -> Any:
    """``wasmshare serve``'s app on a free port, with a roomy controller deadline."""
    import threading

    import uvicorn

    from wasmshare.server import ServerConfig
    from wasmshare.server.main import build_server

    config = ServerConfig(
        max_concurrent=4,
        controller_deadline_ms=120_000.0,
        controllers_dir=tmp_path_factory.mktemp("controllers"),
    )
    app, service, store = build_server("smollm2-135m", config)
    live = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not live.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    port = live.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    live.should_exit = True
    thread.join(timeout=30)
    service.close()
    store.close()


def test_a_late_uploaded_controller_sits_out_beside_a_plain_stream(
    server: str, work: dict[str, float]
) -> None:
    """Over HTTP: a stream beside a late controller gets the tokens it gets alone, the late
    request's answer equals its answer under ``stall_policy: "wait"``, and /metrics counts the
    steps sat out; a bad stall_policy is a 400."""
    import concurrent.futures

    import httpx2 as httpx
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
    with httpx.Client(base_url=server, timeout=60) as http:
        uploaded = http.post(
            "/v1/controllers", params={"name": "slow"}, content=(CONTROLLERS / "slow.wasm").read_bytes()
        )
        assert uploaded.status_code == 200, uploaded.text
        slow_id = uploaded.json()["id"]

        def plain() -> str:
            chunks = client.completions.create(
                model="smollm2-135m",
                prompt="Name three colours.",
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
            return "".join(c.choices[0].text for c in chunks)

        def steered(policy: str) -> str:
            answer = client.completions.create(
                model="smollm2-135m",
                prompt="Count to ten.",
                max_tokens=MAX_TOKENS,
                temperature=0,
                extra_body={
                    "controller": slow_id,
                    "controller_arg": [work["units"], 0, 0, 0],
                    "stall_policy": policy,
                },
            )
            return answer.choices[0].text

        alone = plain()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            late = pool.submit(steered, "sit_out")
            beside = pool.submit(plain)
            late_text, beside_text = late.result(), beside.result()
        assert beside_text == alone
        assert late_text == steered("wait")
        metrics = http.get("/metrics").text
        sat_out = next(
            line for line in metrics.splitlines() if line.startswith("wasmshare_sat_out_steps_total")
        )
        assert float(sat_out.split()[-1]) > 0
        refused = http.post(
            "/v1/completions", json={"model": "smollm2-135m", "prompt": "Hi", "stall_policy": "later"}
        )
        assert refused.status_code == 400 and "stall_policy" in refused.text
