"""Property-based attacks (hypothesis): request bodies against the server, and arbitrary
controller result records against the batch. Bounded: a fixed number of examples, drawn
the same way every run (derandomized), so the suite's time and outcome do not vary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("torch", reason="the server generates with torch")
pytest.importorskip("fastapi", reason="the server needs FastAPI")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_server import CONTROLLERS, LiveServer  # noqa: E402
from wasmshare.llm import Controller  # noqa: E402
from wasmshare.llm import constraints as C  # noqa: E402
from wasmshare.llm.batch import Action, ControllerBatch  # noqa: E402
from wasmshare.llm.tokens import TokenTable  # noqa: E402

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("fuzz"))
    yield server
    server.close()


# Text with the characters that break things: lone surrogates, NUL, controls, long runs.
texts = st.one_of(
    st.text(max_size=40), st.sampled_from(["\ud800", "a\udfffb", "\x00", "", " " * 300, "{", "(?"])
)
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 1e-300, 5e-324, 2**63, 2**64 - 1, 10**30, 2.0, 2.0000001]),
)
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=12,
)
small_ints = st.one_of(st.integers(min_value=-3, max_value=4), junk)
fields = {
    "prompt": st.one_of(
        texts, st.lists(st.integers(-5, 60000), max_size=8), st.lists(texts, max_size=3), junk
    ),
    "max_tokens": small_ints,
    "temperature": st.one_of(numbers, junk),
    "top_p": st.one_of(numbers, junk),
    "n": small_ints,
    "seed": st.one_of(numbers, junk),
    "stop": st.one_of(texts, st.lists(texts, max_size=6), junk),
    "stream": st.one_of(st.booleans(), junk),
    "regex": st.one_of(texts, st.sampled_from(["[a-z]+", "(a|b", "a{99999}", "\\p{L}+"])),
    "choice": st.one_of(st.lists(texts, max_size=3), junk),
    "grammar": st.one_of(texts, st.just("start: /[0-9]+/")),
    "response_format": st.one_of(
        junk,
        st.fixed_dictionaries(
            {
                "type": st.sampled_from(["text", "json_object", "json_schema", "xml"]),
                "json_schema": st.one_of(junk, st.fixed_dictionaries({"schema": junk})),
            }
        ),
    ),
    "controller": st.one_of(texts, st.just("0" * 64)),
    "controller_arg": st.one_of(texts, st.lists(st.integers(-1, 2**33), max_size=4)),
    "logprobs": junk,
    "messages": st.one_of(
        junk,
        st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.one_of(texts, st.sampled_from(["user", "system", "assistant"])),
                    "content": st.one_of(texts, junk),
                }
            ),
            max_size=3,
        ),
    ),
}
bodies = st.one_of(
    st.fixed_dictionaries({}, optional=fields),
    junk,
)


def check_answer(r: Any) -> None:
    assert r.status_code in (200, 400, 404, 413, 422), (r.status_code, r.text)
    if r.status_code != 200:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and "Traceback" not in error["message"]


@FUZZ
@given(body=bodies, chat=st.booleans())
def test_no_request_body_makes_the_server_fail(live: LiveServer, body: Any, chat: bool) -> None:
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body.get("stream") is not True:
        body["max_tokens"] = max(
            -1, min(body["max_tokens"], 3)
        )  # keep generation short; invalid stays invalid
    raw = json.dumps(body, allow_nan=True).encode()
    with live.http() as http:
        r = http.post(
            "/v1/chat/completions" if chat else "/v1/completions",
            content=raw,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text[-200:]
        else:
            check_answer(r)
        assert http.get("/health").json()["status"] == "ok"


# -- the controller result record -------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> TokenTable:
    return TokenTable.deepseek()


u32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 3, 4, 2**31, 2**32 - 1, 64, 65]))
records = st.fixed_dictionaries(
    {
        "action": st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 2, -1]),
        "output": st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 2, 3, 4, -1]),
        "backtrack": u32,
        "n_ff": u32,
        "n_bias": u32,
        "ff_tokens": st.lists(u32, min_size=0, max_size=16),
    }
)


@FUZZ
@given(record=records, tokens=st.lists(st.integers(0, 1000), max_size=3))
def test_no_result_record_makes_the_batch_fail(
    table: TokenTable, record: dict[str, Any], tokens: list[int]
) -> None:
    """Whatever a controller writes into its result record, the step returns; the sequence
    either goes on with a valid result or ends alone with an error, and the constraint beside
    it goes on."""
    with ControllerBatch(table, capacity=2) as batch:
        sid = batch.add(Controller(CONTROLLERS / "hostile_controller.wasm", "ok"), [1, 2, 3])
        other = batch.add(C.choice(["yes", "no"]))
        batch.step()
        instance = batch._sequences[sid].instance
        assert instance is not None
        real_step = instance.step

        def forged() -> None:
            real_step()
            result = instance._result  # type: ignore[union-attr]
            for name in ("action", "output", "backtrack", "n_ff", "n_bias"):
                result[name] = record[name]
            result["ff_tokens"][: len(record["ff_tokens"])] = record["ff_tokens"]

        instance.step = forged  # type: ignore[method-assign]
        step = batch.step({sid: tokens, other: []})
        mine, theirs = step.results[sid], step.results[other]
        assert theirs.action is Action.CONTINUE
        if mine.action is Action.ERROR:
            assert "invalid step result" in str(mine.error) and sid not in batch.sequences
        else:
            assert mine.backtrack <= 3 + len(tokens) and all(
                0 <= t < table.vocab_size for t in mine.fast_forward
            )
