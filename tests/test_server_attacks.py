"""Attacks on ``wasmshare serve`` the way a hostile client makes them, each beside a
well-behaved request that must finish normally, with ``/health`` answering promptly and
no 500 anywhere."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

pytest.importorskip("torch", reason="the server generates with torch")
pytest.importorskip("fastapi", reason="the server needs FastAPI")
httpx = pytest.importorskip("httpx2", reason="raw HTTP checks use httpx2 (the openai client's HTTP library)")

from test_server import CONTROLLERS, KEY, LiveServer  # noqa: E402

GOOD = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("attacks"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def good_text(live: LiveServer) -> str:
    """What the well-behaved request answers when nothing else runs."""
    with live.http() as http:
        r = http.post("/v1/completions", json=GOOD)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def beside_good(live: LiveServer, good_text: str, attack: Callable[[Any], Any]) -> Any:
    """Run ``attack(http)`` while a well-behaved request and /health polls run beside it.

    Checks that the good request gives its solo answer, every /health answers ok within
    a second, and no response was a 500. Returns what the attack returned."""
    outcome: dict[str, Any] = {}
    health_s: list[float] = []
    stop = threading.Event()

    def good() -> None:
        with live.http() as http:
            outcome["good"] = http.post("/v1/completions", json=GOOD)

    def health() -> None:
        with httpx.Client(base_url=live.base, timeout=30) as http:
            while not stop.is_set():
                started = time.monotonic()
                r = http.get("/health")
                health_s.append(time.monotonic() - started)
                assert r.status_code == 200 and r.json()["status"] == "ok"
                time.sleep(0.05)

    threads = [threading.Thread(target=good), threading.Thread(target=health)]
    for t in threads:
        t.start()
    try:
        with live.http() as http:
            result = attack(http)
    finally:
        threads[0].join(timeout=120)
        stop.set()
        threads[1].join(timeout=30)
    r = outcome["good"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == good_text
    assert health_s and max(health_s) < 1.0, f"/health took up to {max(health_s):.2f} s"
    return result


def no_500(r: Any) -> Any:
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        error = r.json()["error"]
        assert error["message"] and "Traceback" not in error["message"]
    return r


def upload_bytes(http: Any, wasm: bytes | str, name: str = "attack") -> Any:
    return no_500(
        http.post(
            "/v1/controllers", params={"name": name}, content=wasm.encode() if isinstance(wasm, str) else wasm
        )
    )


# -- 1. sampling parameters that used to fail the whole batch ------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-300},
        {"top_p": 1e-46, "temperature": 1.0},
        {"temperature": 5e-324, "top_p": 5e-324},
        {"temperature": 2.0, "top_p": 1.0},
    ],
)
def test_extreme_sampling_parameters_sample_and_hurt_no_one(
    live: LiveServer, good_text: str, fields: dict[str, Any]
) -> None:
    def attack(http: Any) -> Any:
        return no_500(
            http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "seed": 3, **fields})
        )

    r = beside_good(live, good_text, attack)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# -- 2. wrong export signatures ---------------------------------------------------------------------


WRONG_STEP = """(module
  (memory (export "memory") 1)
  (func (export "ws_ctrl_abi_version") (result i32) i32.const 1)
  (func (export "ws_ctrl_create") (param i32 i32) (result i32) i32.const 0)
  (func (export "ws_ctrl_step") (param i32 i32)))"""

WRONG_VERSION_TYPE = """(module
  (memory (export "memory") 1)
  (func (export "ws_ctrl_abi_version") (result f64) f64.const 1)
  (func (export "ws_ctrl_create") (param i32 i32) (result i32) i32.const 0)
  (func (export "ws_ctrl_step") (param i32 i32) (result i32) i32.const 0))"""


@pytest.mark.parametrize(
    "module,what", [(WRONG_STEP, "ws_ctrl_step"), (WRONG_VERSION_TYPE, "ws_ctrl_abi_version")]
)
def test_a_controller_with_the_wrong_export_signature_is_refused_at_upload(
    live: LiveServer, good_text: str, module: str, what: str
) -> None:
    r = beside_good(live, good_text, lambda http: upload_bytes(http, module))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_controller"
    assert what in r.json()["error"]["message"] and "controller ABI needs" in r.json()["error"]["message"]


# -- 3. host functions pointed at the loans -----------------------------------------------------------


def steered(http: Any, controller: str, arg: str, max_tokens: int = 8) -> Any:
    return no_500(
        http.post(
            "/v1/completions",
            json={
                "prompt": "Hi",
                "max_tokens": max_tokens,
                "temperature": 0,
                "controller": controller,
                "controller_arg": arg,
            },
        )
    )


def test_a_mask_aimed_at_the_read_only_token_table_ends_that_request(
    live: LiveServer, good_text: str
) -> None:
    with live.http() as http:
        cid = upload_bytes(http, (CONTROLLERS / "hostile_host_calls.wasm").read_bytes(), "host_calls").json()[
            "id"
        ]
    r = beside_good(live, good_text, lambda http: steered(http, cid, "fill_token_table"))
    assert r.status_code == 422 and "returned error" in r.json()["error"]["message"]
    # A read of the token table is allowed (it fails as a spec, not as a fault).
    r = beside_good(live, good_text, lambda http: steered(http, cid, "open_from_table"))
    assert r.status_code == 422
    with live.http() as http:
        assert no_500(http.post("/v1/completions", json=GOOD)).json()["choices"][0]["text"] == good_text


# -- 4. WASI and host time ------------------------------------------------------------------------------


WASI_SLEEPER = (CONTROLLERS / "wasi_sleeper.wat").read_text()


def test_a_controller_gets_no_wasi(live: LiveServer, good_text: str) -> None:
    r = beside_good(live, good_text, lambda http: upload_bytes(http, WASI_SLEEPER))
    assert r.status_code == 400 and "wasi_snapshot_preview1.poll_oneoff" in r.json()["error"]["message"]


def test_host_work_counts_against_the_deadline(live: LiveServer, good_text: str) -> None:
    with live.http() as http:
        cid = upload_bytes(http, (CONTROLLERS / "hostile_host_calls.wasm").read_bytes(), "host_calls").json()[
            "id"
        ]
    started = time.monotonic()
    r = beside_good(live, good_text, lambda http: steered(http, cid, "slow_opens", max_tokens=200))
    assert r.status_code == 422 and "deadline 50 ms exceeded" in r.json()["error"]["message"], r.text
    assert "GuestLimitExceeded(" not in r.json()["error"]["message"]
    assert time.monotonic() - started < 60


# -- 5. work per request ----------------------------------------------------------------------------------


def test_an_endless_backtracker_ends_at_its_work_bound(live: LiveServer, good_text: str) -> None:
    with live.http() as http:
        cid = upload_bytes(http, (CONTROLLERS / "hostile_host_calls.wasm").read_bytes(), "host_calls").json()[
            "id"
        ]
    r = beside_good(live, good_text, lambda http: steered(http, cid, "endless_backtrack", max_tokens=8))
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "for max_tokens 8; the limit is 96 tokens" in message, message


# -- 6. prompt length and shutdown ---------------------------------------------------------------------------


def test_a_prompt_past_the_context_is_refused(live: LiveServer, good_text: str) -> None:
    context = live.service.loaded.context_length
    assert context is not None

    def attack(http: Any) -> list[Any]:
        long_ids = no_500(
            http.post("/v1/completions", json={"prompt": [42] * (context + 808), "max_tokens": 4})
        )
        chat = no_500(
            http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "hi " * 20}] * 600, "max_tokens": 4},
            )
        )
        over = no_500(http.post("/v1/completions", json={"prompt": [42] * (context - 10), "max_tokens": 50}))
        return [long_ids, chat, over]

    for r in beside_good(live, good_text, attack):
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text


# -- 7. slow uploads ------------------------------------------------------------------------------------------


def many_functions(n: int) -> bytes:
    """A valid wasm module of ``n`` empty functions (slow to compile, small to send)."""

    def uleb(v: int) -> bytes:
        out = bytearray()
        while True:
            byte, v = v & 0x7F, v >> 7
            out.append(byte | (0x80 if v else 0))
            if not v:
                return bytes(out)

    def section(code: int, payload: bytes) -> bytes:
        return bytes([code]) + uleb(len(payload)) + payload

    types = section(1, uleb(1) + b"\x60\x00\x00")
    funcs = section(3, uleb(n) + b"\x00" * n)
    code = section(10, uleb(n) + b"\x02\x00\x0b" * n)
    return b"\x00asm\x01\x00\x00\x00" + types + funcs + code


def test_a_slow_upload_neither_freezes_the_server_nor_outlives_its_budget(
    live: LiveServer, good_text: str
) -> None:
    big = many_functions(60_000)
    r = beside_good(live, good_text, lambda http: upload_bytes(http, big, "big"))
    assert r.status_code == 400  # it compiles, then has no controller exports
    budget = live.store.compile_budget_s
    live.store.compile_budget_s = 0.01
    try:
        r = beside_good(live, good_text, lambda http: upload_bytes(http, many_functions(60_001), "big"))
    finally:
        live.store.compile_budget_s = budget
    assert r.status_code == 400 and "took longer than 0.01 s" in r.json()["error"]["message"]


# -- 8. leaks --------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_upload_and_delete_cycles_keep_memory_and_disk_flat(live: LiveServer) -> None:
    from wasmshare import _engine

    base = (CONTROLLERS / "allow_list.wasm").read_bytes()
    padding = os.urandom(256 << 10 - 1 << 10)  # a custom section makes each module ~250 KB and unique

    def module(i: int) -> bytes:
        payload = b"\x04pad" + struct.pack("<I", i) + padding[: (200 << 10)]
        size, n = bytearray(), len(payload)
        while True:
            byte, n = n & 0x7F, n >> 7
            size.append(byte | (0x80 if n else 0))
            if not n:
                break
        return base + b"\x00" + bytes(size) + payload

    cache = _engine.default_cache_dir() / "modules"

    def cycle(i: int) -> str:
        with live.http() as http:
            cid = upload_bytes(http, module(i), "cycle").json()["id"]
            r = no_500(
                http.post(
                    "/v1/completions",
                    json={"prompt": "Hi", "max_tokens": 2, "controller": cid, "controller_arg": [5, 6, 7, 8]},
                )
            )
            assert r.status_code == 200, r.text
            assert no_500(http.delete(f"/v1/controllers/{cid}")).status_code == 200
        return str(cid)

    for i in range(3):
        cycle(i)
    rss, files = rss_bytes(), len(list(cache.glob("*.cwasm")))
    ids = [cycle(i) for i in range(3, 15)]
    assert not [k for k in _engine._memory_modules if k[0] in ids]
    assert not [p for p in cache.glob("*.cwasm") if p.name.split("-")[0] in ids]
    assert len(list(cache.glob("*.cwasm"))) <= files
    grown = rss_bytes() - rss
    assert grown < 40 << 20, f"RSS grew {grown / 2**20:.0f} MiB over 12 cycles"


def test_distinct_constraints_are_a_bounded_cache(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from wasmshare.llm import constraints

    monkeypatch.setattr(constraints, "MAX_COMPILED_CONSTRAINTS", 4)
    with live.http() as http:
        for i in range(8):
            r = no_500(
                http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "regex": f"x{i}[a-z]+"})
            )
            assert r.status_code == 200
    assert len(constraints._compiled) <= 4


# -- 9. what used to answer 500 -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "bad \ud800 text", "max_tokens": 2},
        {"prompt": "x", "max_tokens": 2, "regex": "a\ud800"},
        {"prompt": "x", "max_tokens": 2, "stop": ["\udfff"]},
        {"prompt": "x", "max_tokens": 2, "controller": "0" * 64, "controller_arg": "\ud800"},
        {"prompt": "x", "max_tokens": 2, "seed": 10**30},
        {"prompt": "x", "max_tokens": 2, "seed": 2**64 - 1},
    ],
)
def test_bad_text_and_seeds_answer_400(live: LiveServer, body: dict[str, Any]) -> None:
    with live.http() as http:
        raw = json.dumps(body).encode()  # json.dumps escapes a lone surrogate as \\ud800
        r = no_500(http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))
    assert r.status_code == 400, r.text


def test_a_chat_with_a_lone_surrogate_answers_400(live: LiveServer) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi \ud800"}], "max_tokens": 2}).encode()
    with live.http() as http:
        r = no_500(
            http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        )
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]


def test_the_largest_seed_works_for_every_choice(live: LiveServer) -> None:
    with live.http() as http:
        r = no_500(
            http.post(
                "/v1/completions",
                json={"prompt": "Hi", "max_tokens": 2, "temperature": 0.7, "seed": 2**63 - 1, "n": 2},
            )
        )
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


@pytest.mark.parametrize(
    "body",
    [
        b"int main(void) { return 0; }\n",
        os.urandom(4096),
        b"\xff\xfe(module",
        b"\x00asm\x01\x00\x00\x00\x05",
        b"(module (func $f (param",
    ],
)
def test_a_body_that_is_not_wasm_answers_400(live: LiveServer, body: bytes) -> None:
    with live.http() as http:
        r = upload_bytes(http, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_controller"
    assert "\n" not in r.json()["error"]["message"]


# -- 12. a client that hangs up ------------------------------------------------------------------------------


def test_a_client_that_hangs_up_cancels_its_non_streaming_request(live: LiveServer) -> None:
    cancelled = live.service.metrics.cancelled._value.get()
    body = json.dumps({"prompt": "Count to a thousand:", "max_tokens": 190, "temperature": 0}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + 30
        while live.service.running == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.service.running == 1
    deadline = time.monotonic() + 10
    while live.service.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.service.running == 0
    assert live.service.metrics.cancelled._value.get() == cancelled + 1


# -- every upload error path ----------------------------------------------------------------------------


def test_every_upload_error_answers_a_clear_4xx(live: LiveServer, good_text: str) -> None:
    no_exports = '(module (memory (export "memory") 1))'
    cases = [
        (b"", {}, 400, "the upload is empty"),
        ((CONTROLLERS / "allow_list.wasm").read_bytes(), {"name": "bad name!"}, 400, "name: 1-64 characters"),
        (b"\0asm\x01\0\0\0" + b"\0" * (live.config.max_controller_bytes + 1), {}, 413, "byte limit"),
        ((CONTROLLERS / "old_abi.wasm").read_bytes(), {}, 400, "controller ABI"),
        (no_exports.encode(), {}, 400, "does not export ws_ctrl_abi_version"),
    ]

    def attack(http: Any) -> list[Any]:
        return [
            no_500(http.post("/v1/controllers", params=params, content=body)) for body, params, _, _ in cases
        ]

    for r, (_, _, status, message) in zip(beside_good(live, good_text, attack), cases):
        assert r.status_code == status and message in r.json()["error"]["message"], r.text
    limit = live.store.max_controllers
    live.store.max_controllers = 0
    try:
        with live.http() as http:
            r = upload_bytes(http, no_exports + " ")
    finally:
        live.store.max_controllers = limit
    assert r.status_code == 400 and "delete some first" in r.json()["error"]["message"]


def test_a_long_prompt_is_prefilled_beside_the_other_streams(live: LiveServer, good_text: str) -> None:
    """A 3,000-token prompt joins in chunks while the good request decodes; both answer."""
    r = beside_good(
        live,
        good_text,
        lambda http: no_500(
            http.post(
                "/v1/completions", json={"prompt": [42, 1045] * 1500, "max_tokens": 2, "temperature": 0}
            )
        ),
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3000


def test_shutdown_cancels_what_runs_and_waits_promptly(live: LiveServer) -> None:
    """Closing the service (what Ctrl-C does) ends a long request at once, not after its tokens."""
    import asyncio

    from wasmshare.llm.engine import GenerationRequest
    from wasmshare.server.service import EngineService

    service = EngineService(live.service.loaded, max_batch=2)

    async def scenario() -> tuple[Any, Any, float]:
        running = service.submit(GenerationRequest("Count to a thousand:", max_tokens=2000))
        long_prompt = service.submit(GenerationRequest([42] * 3000, max_tokens=2000))
        waiting = service.submit(GenerationRequest("Hello", max_tokens=2000))
        async for _event in running.stream():
            break  # the first token: it is decoding
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, service.close)
        closed_s = time.monotonic() - started
        results = await asyncio.gather(running.wait(), long_prompt.wait(), waiting.wait())
        return results, closed_s, started

    results, closed_s, _ = asyncio.run(scenario())
    assert closed_s < 15, f"close took {closed_s:.1f} s"
    assert all(r.finish_reason == "cancelled" for r in results), [r.finish_reason for r in results]
    assert len(results[0].tokens) < 2000


def test_a_grammar_that_would_overflow_the_native_stack_is_refused(live: LiveServer, good_text: str) -> None:
    """A long chain of rules crashed llguidance's recursive check (SIGSEGV) at about 2,800 rules;
    grammars are bounded before they reach it, from a request or from a controller."""
    n = 1200
    chain = (
        "start: "
        + "|".join(f"r{i}" for i in range(n))
        + "\n"
        + "\n".join(f'r{i}: "x{i}" r{i + 1}?' for i in range(n))
        + f'\nr{n}: "end"\n'
    )
    nested = "start: " + "(" * 100 + '"a"' + ")" * 100 + "\n"

    def attack(http: Any) -> list[Any]:
        return [
            no_500(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "grammar": g}))
            for g in (chain, nested)
        ]

    for r in beside_good(live, good_text, attack):
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_constraint", r.text


def test_a_huge_table_is_refused_like_a_huge_memory(live: LiveServer, good_text: str) -> None:
    module = """(module
      (table 400000000 funcref)
      (memory (export "memory") 1)
      (func (export "ws_ctrl_abi_version") (result i32) i32.const 1)
      (func (export "ws_ctrl_create") (param i32 i32) (result i32) i32.const 0)
      (func (export "ws_ctrl_step") (param i32 i32) (result i32) i32.const 0))"""
    r = beside_good(live, good_text, lambda http: upload_bytes(http, module))
    assert r.status_code == 400 and "table limits" in r.json()["error"]["message"], r.text


# -- 11. the controller store under pressure -------------------------------------------------------------------


def minimal_controller(marker: int) -> str:
    """A valid controller that steers nothing; ``marker`` makes its bytes (and id) distinct."""
    return f"""(module
  (memory (export "memory") 1)
  (func (export "ws_ctrl_abi_version") (result i32) i32.const 1)
  (func (export "ws_ctrl_create") (param i32 i32) (result i32) i32.const 0)
  (func (export "ws_ctrl_step") (param i32 i32) (result i32) i32.const {marker} i32.const 0 i32.mul))"""


def test_a_stored_controller_whose_artifact_was_evicted_compiles_in_a_child(
    live: LiveServer, good_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hashlib

    import wasmtime

    from wasmshare import _engine
    from wasmshare.llm import controller_store as controllers

    with live.http() as http:
        r = upload_bytes(http, minimal_controller(7), "evicted")
    assert r.status_code == 200, r.text
    digest = r.json()["id"]
    binary = bytes(wasmtime.wat2wasm(minimal_controller(7)))
    _engine.evict_module(hashlib.sha256(binary).hexdigest())  # what a flood of other uploads does
    children: list[int] = []
    real = controllers.compile_in_child

    def counted(wasm: bytes, options: Any, **kw: Any) -> None:
        children.append(len(wasm))
        real(wasm, options, **kw)

    monkeypatch.setattr(controllers, "compile_in_child", counted)
    r = beside_good(live, good_text, lambda http: steered(http, digest, ""))
    assert r.status_code == 200, r.text
    assert len(children) == 1  # compiled again in a budgeted child, not on the engine thread
    r = beside_good(live, good_text, lambda http: steered(http, digest, ""))
    assert r.status_code == 200 and len(children) == 1  # and only once
    assert live.store.delete(digest)
    options = _engine.EngineOptions.for_limits(live.store.limits.fuel, live.store.limits.deadline_ms)
    assert not _engine.is_compiled(binary, options)  # deleting a WAT upload drops its artifact too


def test_concurrent_uploads_never_pass_the_controller_cap(live: LiveServer) -> None:
    from wasmshare.errors import ControllerRejected

    store = live.store
    before = {c.id for c in store.list()}
    cap = store.max_controllers
    store.max_controllers = len(before) + 2
    outcomes: list[str] = []

    def add(marker: int) -> None:
        try:
            outcomes.append(store.add(minimal_controller(100 + marker).encode(), f"racer-{marker}").id)
        except ControllerRejected as e:
            outcomes.append(f"rejected: {e}")

    try:
        threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        added = {c.id for c in store.list()} - before
    finally:
        store.max_controllers = cap
        for controller_id in {c.id for c in store.list()} - before:
            store.delete(controller_id)
    assert len(outcomes) == 6
    assert len(added) == 2, outcomes
    assert sum(o.startswith("rejected: ") for o in outcomes) == 4, outcomes


def test_a_module_that_needs_too_much_memory_to_compile_is_refused() -> None:
    import wasmtime

    from wasmshare._engine import EngineOptions, compile_in_child

    options = EngineOptions(fuel=False, epoch=True)
    limit = 256 << 20
    compile_in_child(
        bytes(wasmtime.wat2wasm(minimal_controller(11))), options, timeout_s=60, memory_limit_bytes=limit
    )
    with pytest.raises(ValueError, match="needed more than 268,435,456 bytes of memory"):
        compile_in_child(many_functions(60_003), options, timeout_s=60, memory_limit_bytes=limit)
