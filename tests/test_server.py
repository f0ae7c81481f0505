"""The OpenAI-compatible server on localhost, driven by the official ``openai`` client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch", reason="the server generates with torch")
pytest.importorskip("fastapi", reason="the server needs FastAPI")
openai = pytest.importorskip("openai", reason="the tests drive the server with the openai client")
httpx = pytest.importorskip("httpx2", reason="raw HTTP checks use httpx2 (the openai client's HTTP library)")
jsonschema = pytest.importorskip("jsonschema")

import uvicorn  # noqa: E402

from wasmshare.llm.models import ModelError, load_model  # noqa: E402
from wasmshare.server import ServerConfig  # noqa: E402
from wasmshare.server.main import build_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTROLLERS = ROOT / "guests" / "controllers"
KEY = "test-key"

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]},
        "population_millions": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["city", "population_millions"],
    "additionalProperties": False,
}


class LiveServer:
    def __init__(self, tmp: Path) -> None:
        import torch

        torch.set_num_threads(2)
        try:
            load_model("smollm2-135m")
        except ModelError as e:
            pytest.skip(f"embedded model not installed: {e}")
        self.config = ServerConfig(
            api_key=KEY,
            max_concurrent=3,
            max_waiting=16,
            max_tokens=200,
            default_max_tokens=32,
            max_body_bytes=64 << 10,
            max_controller_bytes=256 << 10,
            controller_deadline_ms=50.0,
            controllers_dir=tmp / "controllers",
        )
        self.app, self.service, self.store = build_server("smollm2-135m", self.config)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = KEY) -> Any:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key or "no-key", max_retries=0, timeout=120)

    def http(self) -> Any:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.service.close()
        self.store.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("server"))
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(live: LiveServer) -> Any:
    return live.client()


def upload(live: LiveServer, name: str) -> str:
    with live.http() as http:
        r = http.post(
            "/v1/controllers", params={"name": name}, content=(CONTROLLERS / f"{name}.wasm").read_bytes()
        )
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


# -- plain endpoints ---------------------------------------------------------------------------------


def test_models_health_and_metrics(live: LiveServer, client: Any) -> None:
    assert [m.id for m in client.models.list()] == ["smollm2-135m"]
    with httpx.Client(base_url=live.base) as http:  # health and metrics need no key
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["model"] == "smollm2-135m"
        client.completions.create(model="smollm2-135m", prompt="Hello", max_tokens=2, temperature=0)
        text = http.get("/metrics").text
    for metric in (
        "wasmshare_requests_total",
        "wasmshare_generated_tokens_total",
        "wasmshare_queue_depth",
        "wasmshare_controller_seconds_total",
        "wasmshare_controller_faults_total",
        "wasmshare_time_to_first_token_seconds_bucket",
    ):
        assert metric in text, metric
    assert 'endpoint="/v1/completions",status="200"' in text


def test_completion_matches_the_engine(live: LiveServer, client: Any) -> None:
    from wasmshare.llm.engine import GenerationRequest

    r = client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    from wasmshare.errors import WasmshareError
    from wasmshare.llm.engine import Engine

    ids = live.service.loaded.encode_prompt("The capital of France is", chat=False)
    with pytest.raises(WasmshareError, match="already decoding"):  # the server's loop owns its engine
        live.service.engine.generate([GenerationRequest(ids, max_tokens=8)])
    with Engine(live.service.loaded, max_batch=1) as engine:
        direct = engine.generate([GenerationRequest(ids, max_tokens=8)])[0]
    assert r.choices[0].text == direct.text and "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == len(ids)
    assert r.choices[0].finish_reason == "length"


def test_chat_streaming_and_stop(client: Any) -> None:
    messages = [{"role": "user", "content": "List three colors, separated by commas."}]
    whole = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=24, temperature=0
    )
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and text
    pieces = []
    finish = None
    stream = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == text and finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    # A stop string ends the answer and is not included, streamed or not.
    stop = text.strip()[3:6]
    cut = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smollm2-135m",
            prompt="One, two, three, four,",
            max_tokens=12,
            temperature=0,
            stop=[" six"],
            stream=True,
        )
        if c.choices
    )
    assert (
        " six" not in streamed
        and streamed
        == client.completions.create(
            model="smollm2-135m",
            prompt="One, two, three, four,",
            max_tokens=12,
            temperature=0,
            stop=[" six"],
        )
        .choices[0]
        .text
    )


def test_sampling_with_seed_and_n(client: Any) -> None:
    kwargs: dict[str, Any] = dict(
        model="smollm2-135m", prompt="Once upon a time", max_tokens=10, temperature=1.0, top_p=0.9, seed=7
    )
    first = client.completions.create(n=2, **kwargs)
    again = client.completions.create(n=2, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1]


# -- structured output ------------------------------------------------------------------------------


def test_response_format_json_schema_validates(client: Any) -> None:
    r = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Which city is the capital of Italy? Answer in JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    )
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_a_schema_llguidance_refuses_is_answered_with_checks_and_says_so(client: Any) -> None:
    """``uniqueItems`` and ``not`` are left to checks; the answer validates and the choice says
    how it was enforced. A schema no answer meets ends in a 422 ``schema_violation`` naming the
    keyword, while a plain request sent beside it is answered in full."""
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3, "uniqueItems": True},
            "name": {"type": "string", "maxLength": 8, "not": {"const": "Bob"}},
        },
        "required": ["tags", "name"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": 'Reply with JSON like {"tags": [1, 1, 1], "name": "Bob"}.'}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    )
    choice = r.choices[0]
    jsonschema.validate(json.loads(choice.message.content), schema)
    extra = choice.model_extra["wasmshare"]
    assert extra["enforced_by"].startswith("grammar + checks (") and "uniqueItems" in extra["enforced_by"]
    assert extra["backtracks"] > 0
    impossible = {"type": "string", "maxLength": 2, "not": {"pattern": "^"}}
    outcome: dict[str, Any] = {}

    def plain() -> None:
        outcome["plain"] = client.completions.create(
            model="smollm2-135m", prompt="Hello", max_tokens=8, temperature=0
        )

    beside = threading.Thread(target=plain)
    beside.start()
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.completions.create(
            model="smollm2-135m",
            prompt="x",
            max_tokens=40,
            extra_body={
                "response_format": {"type": "json_schema", "json_schema": {"name": "i", "schema": impossible}}
            },
        )
    beside.join()
    assert failed.value.code == "schema_violation" and "'not' at $" in failed.value.message
    assert outcome["plain"].choices[0].finish_reason in ("length", "stop")  # answered in full


def test_json_object_regex_and_choice(client: Any) -> None:
    obj = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}],
        max_tokens=80,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert obj.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    date = client.completions.create(
        model="smollm2-135m",
        prompt="Today's date is",
        max_tokens=20,
        temperature=0,
        extra_body={"regex": r" \d{4}-\d{2}-\d{2}"},
    )
    assert len(date.choices[0].text) == 11 and date.choices[0].text[5] == "-"
    pick = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        max_tokens=5,
        temperature=0,
        extra_body={"choice": ["yes", "no"]},
    )
    assert pick.choices[0].message.content in ("yes", "no")
    lark = client.completions.create(
        model="smollm2-135m",
        prompt="My favourite colour is",
        max_tokens=8,
        temperature=0,
        extra_body={"grammar": 'start: " " COLOUR "."\nCOLOUR: "red" | "green" | "blue"'},
    )
    assert lark.choices[0].text in (" red.", " green.", " blue.")


def test_bad_schema_and_conflicting_constraints_are_clear_errors(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="smollm2-135m",
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "x",
                    "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}},
                },
            },
        )
    assert "nonsense" in bad.value.message or "type" in bad.value.message
    with pytest.raises(openai.BadRequestError, match="use one of"):
        client.completions.create(
            model="smollm2-135m", prompt="x", extra_body={"regex": "a", "choice": ["b"]}
        )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smollm2-135m", prompt="x", max_tokens=100000)
    with pytest.raises(openai.BadRequestError, match="logprobs is not supported"):
        client.completions.create(model="smollm2-135m", prompt="x", logprobs=2)


# -- controllers ----------------------------------------------------------------------------------------


def test_uploaded_controller_steers_the_answer(live: LiveServer, client: Any) -> None:
    tokenizer = live.service.loaded.tokenizer
    answer = tokenizer.encode(" forty-two", add_special_tokens=False)
    ident = upload(live, "force_answer")
    assert upload(live, "force_answer") == ident  # same bytes, same id
    r = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is the answer?"}],
        max_tokens=20,
        temperature=0,
        extra_body={"controller": ident, "controller_arg": answer},
    )
    assert r.choices[0].message.content == " forty-two"
    with live.http() as http:
        listed = http.get("/v1/controllers").json()["data"]
        assert any(c["id"] == ident and c["name"] == "force_answer" for c in listed)
        assert http.delete(f"/v1/controllers/{ident}").json()["deleted"] is True
        assert http.get(f"/v1/controllers/{ident}").status_code == 404
    with pytest.raises(openai.NotFoundError, match="upload it"):
        client.completions.create(model="smollm2-135m", prompt="x", extra_body={"controller": ident})


def test_bad_uploads_are_refused(live: LiveServer) -> None:
    with live.http() as http:
        junk = http.post("/v1/controllers", content=b"\x00asm but not really")
        assert junk.status_code == 400 and "controller rejected" in junk.json()["error"]["message"]
        old = http.post("/v1/controllers", content=(CONTROLLERS / "old_abi.wasm").read_bytes())
        assert old.status_code == 400 and "ABI" in old.json()["error"]["message"]
        plain = http.post("/v1/controllers", content=(ROOT / "guests" / "calls.wasm").read_bytes())
        assert plain.status_code == 400
        huge = http.post("/v1/controllers", content=b"\x00" * (300 << 10))
        assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
        assert http.post("/v1/controllers", content=b"").status_code == 400


def _faults(live: LiveServer) -> float:
    with live.http() as http:
        line = next(
            x
            for x in http.get("/metrics").text.splitlines()
            if x.startswith("wasmshare_controller_faults_total ")
        )
    return float(line.split()[1])


def test_hostile_controller_fails_only_its_own_request(live: LiveServer, client: Any) -> None:
    ident = upload(live, "hostile_controller")
    faults_before = _faults(live)
    outcome: dict[str, Any] = {}

    def good() -> None:
        outcome["good"] = client.completions.create(
            model="smollm2-135m", prompt="The sky is", max_tokens=16, temperature=0
        )

    worker = threading.Thread(target=good)
    worker.start()
    with pytest.raises(openai.UnprocessableEntityError) as spin:
        client.completions.create(
            model="smollm2-135m",
            prompt="x",
            max_tokens=8,
            extra_body={"controller": ident, "controller_arg": "spin"},
        )
    assert "deadline" in spin.value.message or "interrupt" in spin.value.message.lower()
    with pytest.raises(openai.APIError, match="trap"):  # streamed: the error arrives as an event
        for _ in client.completions.create(
            model="smollm2-135m",
            prompt="x",
            max_tokens=8,
            stream=True,
            extra_body={"controller": ident, "controller_arg": "trap_mid_mask"},
        ):
            pass
    worker.join(timeout=120)
    assert outcome["good"].choices[0].finish_reason == "length"
    with httpx.Client(base_url=live.base) as http:
        assert http.get("/health").json()["status"] == "ok"
        assert "wasmshare_controller_faults_total " in http.get("/metrics").text
    assert _faults(live) == faults_before + 2


# -- limits, auth, continuous batching -------------------------------------------------------------------


def test_auth_is_required_when_configured(live: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").completions.create(model="smollm2-135m", prompt="x", max_tokens=1)
    with live.http() as http:
        assert http.post("/v1/controllers", content=b"x", headers={"Authorization": ""}).status_code == 401


def test_oversize_body_is_refused(client: Any) -> None:
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="smollm2-135m", prompt="word " * 20000, max_tokens=1)
    assert err.value.status_code == 413 and "limit" in err.value.message


def test_more_requests_than_slots_queue_and_all_finish(live: LiveServer, client: Any) -> None:
    results: list[Any] = [None] * 7

    def ask(i: int) -> None:
        results[i] = client.completions.create(
            model="smollm2-135m", prompt=f"Number {i} is", max_tokens=6, temperature=0
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert all(r is not None for r in results)  # every request queued, ran and finished
    for r in results:  # greedy decoding may meet EOS early on some CPUs: then it says so
        finish = r.choices[0].finish_reason
        assert (finish, r.usage.completion_tokens) == ("length", 6) or (
            finish == "stop" and r.usage.completion_tokens < 6
        )


def test_client_disconnect_frees_the_slot(live: LiveServer) -> None:
    before = live.service.engine.stats.generated_tokens
    with live.http() as http:
        with http.stream(
            "POST",
            "/v1/completions",
            json={"prompt": "Tell a long story.", "max_tokens": 200, "temperature": 0, "stream": True},
        ) as response:
            lines = response.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:
                    break
    deadline = time.monotonic() + 60
    while live.service.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.service.running == 0
    assert live.service.engine.stats.generated_tokens - before < 200
    with httpx.Client(base_url=live.base) as http:
        assert "wasmshare_cancelled_total 1.0" in http.get("/metrics").text


def test_a_constrained_answer_cut_by_max_tokens_says_length_and_json_is_compact(client: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA}}
    messages = [{"role": "user", "content": "Name a European capital as JSON."}]
    cut = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=3, temperature=0, response_format=fmt
    )
    assert cut.choices[0].finish_reason == "length"
    whole = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=60, temperature=0, response_format=fmt
    )
    text = whole.choices[0].message.content
    assert whole.choices[0].finish_reason == "stop" and "\n" not in text and ", " not in text
    jsonschema.validate(json.loads(text), SCHEMA)
    flexible = {**SCHEMA, "x-guidance": {"whitespace_flexible": True}}  # a client may opt back in
    again = client.chat.completions.create(
        model="smollm2-135m",
        messages=messages,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": flexible}},
    )
    jsonschema.validate(json.loads(again.choices[0].message.content), SCHEMA)
