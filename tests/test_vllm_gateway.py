"""The ``wasmshare vllm serve`` gateway's own checks, without vLLM: what it refuses before anything is queued.

The end-to-end tests (real vLLM behind the gateway, the official client) are in
``tests_vllm/test_gateway.py``; these run in wasmshare's environment, where vLLM is not
installed, with no server behind the gateway at all.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("httpx2")
from starlette.testclient import TestClient  # noqa: E402

from wasmshare.errors import APIError  # noqa: E402
from wasmshare.llm.controller_store import ControllerStore  # noqa: E402
from wasmshare.llm.tokens import TokenTable  # noqa: E402
from wasmshare.vllm.gateway import GatewayConfig, ServiceHandle, create_gateway, translate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "s3cret"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # nothing listens there once the probe is closed


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    folder = tmp_path_factory.mktemp("gateway")
    store = ControllerStore(folder / "controllers", TokenTable.deepseek())
    config = GatewayConfig(f"http://127.0.0.1:{_closed_port()}", folder, api_key=KEY, max_body_bytes=64 << 10)
    service = ServiceHandle(["false"], str(folder / "service.sock"), start_s=1.0)
    with TestClient(
        create_gateway(config, store, service), headers={"Authorization": f"Bearer {KEY}"}
    ) as client:
        yield client
    store.close()


@pytest.mark.parametrize(
    ("body", "xargs"),
    [
        ({"regex": "[0-9]+"}, {"wasmshare_regex": "[0-9]+"}),
        ({"choice": ["a", "b"]}, {"wasmshare_choice": ["a", "b"]}),
        ({"grammar": 'start: "x"'}, {"wasmshare_grammar": 'start: "x"'}),
        (
            {"controller": "a" * 64, "controller_arg": [1, 2]},
            {"wasmshare_controller": "a" * 64, "wasmshare_arg": [1, 2]},
        ),
        ({"response_format": {"type": "json_object"}}, {"wasmshare_json_schema": '{"type": "object"}'}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "n", "schema": {"type": "integer"}},
                }
            },
            {"wasmshare_json_schema": '{"type": "integer"}'},
        ),
        ({"response_format": {"type": "text"}}, None),
        ({"regex": None}, None),
        ({"stall_policy": "wait"}, None),  # what vLLM does anyway
    ],
)
def test_steering_fields_become_vllm_xargs(body: dict[str, Any], xargs: dict[str, Any] | None) -> None:
    forwarded, ours = translate({"model": "m", "prompt": "p", **body})
    assert ours == xargs
    assert forwarded == {"model": "m", "prompt": "p"}  # the steering fields never reach vLLM as such


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"regex": "a", "choice": ["a"]}, "use one of response_format, regex, choice, grammar, controller"),
        ({"controller_arg": "x"}, "controller_arg needs controller"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format.type"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "JSON Schema object"),
        ({"vllm_xargs": {"wasmshare_tag": "0" * 32}}, "set by this server"),
        ({"vllm_xargs": ["x"]}, "vllm_xargs must be an object"),
        ({"regex": "a", "structured_outputs": {"regex": "b"}}, "cannot be combined"),
        ({"choice": "red"}, "choice must be a non-empty list"),
        ({"controller": "../../etc/passwd"}, "sha256"),
        ({"controller": "a" * 64, "controller_arg": [-1]}, "controller_arg as a list holds uint32"),
        ({"regex": "a" * (300 << 10)}, "the limit is 262,144"),
        ({"stall_policy": "sit_out"}, "a row cannot sit out here"),
        ({"stall_policy": 3}, "a row cannot sit out here"),
    ],
)
def test_bad_steering_is_refused_in_one_line(body: dict[str, Any], message: str) -> None:
    with pytest.raises(APIError) as refused:
        translate({"prompt": "p", **body})
    assert refused.value.status == 400 and message in refused.value.message
    assert "\n" not in refused.value.message and "wasmshare_" not in refused.value.message.replace(
        "wasmshare_tag", ""
    )


def test_the_api_key_guards_every_v1_route(gateway: TestClient) -> None:
    for method, path in (("post", "/v1/completions"), ("get", "/v1/controllers"), ("get", "/v1/models")):
        r = getattr(gateway, method)(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path


def test_bodies_are_refused_before_anything_is_forwarded(gateway: TestClient) -> None:
    r = gateway.post("/v1/completions", content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = gateway.post("/v1/completions", content=b"[1, 2]")
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = gateway.post("/v1/completions", content=json.dumps({"prompt": "x" * (100 << 10)}).encode())
    assert r.status_code == 413
    r = gateway.post("/v1/completions", json={"prompt": "x", "controller": "b" * 64})
    assert r.status_code == 404 and "upload it to /v1/controllers" in r.json()["error"]["message"]


def test_a_missing_vllm_is_a_503_not_a_traceback(gateway: TestClient) -> None:
    r = gateway.post("/v1/completions", json={"model": "m", "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "vllm_unavailable"
    assert "\n" not in r.json()["error"]["message"]


def test_a_service_that_cannot_start_is_a_503(gateway: TestClient) -> None:
    r = gateway.post("/v1/completions", json={"prompt": "x", "regex": "[0-9]+"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"


def test_controllers_are_uploaded_checked_listed_and_deleted(gateway: TestClient) -> None:
    wasm = (ROOT / "guests" / "controllers" / "allow_list.wasm").read_bytes()
    r = gateway.post("/v1/controllers", params={"name": "allow"}, content=wasm)
    assert r.status_code == 200, r.text
    ident = r.json()["id"]
    assert [c["id"] for c in gateway.get("/v1/controllers").json()["data"]] == [ident]
    assert gateway.get(f"/v1/controllers/{ident}").json()["name"] == "allow"
    r = gateway.post("/v1/controllers", content=b"\x00asm garbage")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_controller"
    assert gateway.delete(f"/v1/controllers/{ident}").json()["deleted"] is True
    assert gateway.get(f"/v1/controllers/{ident}").status_code == 404
