"""Tensor-parallel ranks sharing one controller service: rank 0 leads, the others follow.

vLLM's CPU build runs no tensor parallelism on this machine's cores, so two processors
stand for two ranks of one engine: the same real :class:`BatchUpdate` s and logits go to
both, as vLLM gives every rank the same batch. The service is real and holds room for
exactly the steered requests: a follower that added its own sequences would be refused
one and answer differently.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate

from conftest import controller_id
from wasmshare.vllm.processor import WasmshareLogitsProcessor

VOCAB = 49152


@pytest.fixture
def shared_service(
    wasmshare_python: str,
    model_folder: str,
    controllers_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    sock = str(tmp_path / "service.sock")
    command = [wasmshare_python, "-m", "wasmshare.vllm.service", sock, model_folder, "--persist"]
    command += ["--capacity", "2", "--vocab-size", str(VOCAB), "--controllers-dir", str(controllers_dir)]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while not Path(sock).exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    monkeypatch.setenv("WASMSHARE_SERVICE_SOCKET", sock)
    yield sock
    process.terminate()
    process.wait(10)


def _rank(rank: int, model_folder: str) -> WasmshareLogitsProcessor:
    config = SimpleNamespace(
        model_config=SimpleNamespace(
            model=model_folder, get_vocab_size=lambda: VOCAB, hf_config=SimpleNamespace(eos_token_id=2)
        ),
        scheduler_config=SimpleNamespace(max_num_seqs=2),
        parallel_config=SimpleNamespace(tensor_parallel_size=2, rank=rank),
        instance_id="tp-test",
    )
    return WasmshareLogitsProcessor(config, torch.device("cpu"), False)


def test_ranks_share_one_service_and_apply_identical_masks(shared_service: str, model_folder: str) -> None:
    leader, follower = _rank(0, model_folder), _rank(1, model_folder)
    requests: list[dict[str, Any]] = [
        {"wasmshare_regex": "[0-9]{6}"},
        {"wasmshare_controller": controller_id("allow_list"), "wasmshare_arg": [100, 200, 300]},
    ]
    outputs: dict[str, list[list[int]]] = {"leader": [[], []], "follower": [[], []]}

    def update(processor: WasmshareLogitsProcessor, mine: list[list[int]], first: bool) -> None:
        added = [
            (i, SamplingParams(extra_args=extra), [1, 2, 3], mine[i]) for i, extra in enumerate(requests)
        ]
        processor.update_state(BatchUpdate(batch_size=2, removed=[], added=added if first else [], moved=[]))

    generator = torch.Generator().manual_seed(0)
    for step in range(8):
        update(leader, outputs["leader"], step == 0)
        update(follower, outputs["follower"], step == 0)
        logits = torch.randn(2, VOCAB, generator=generator)
        mine = follower.apply(logits.clone())  # a follower may ask first: it waits for the leader's step
        theirs = leader.apply(logits.clone())
        assert torch.equal(mine, theirs), step
        assert torch.isinf(theirs).any(dim=1).all()  # both rows steered at every step
        for i, token in enumerate(theirs.argmax(dim=1).tolist()):
            outputs["leader"][i].append(token)
            outputs["follower"][i].append(token)
    assert set(outputs["leader"][1]) <= {100, 200, 300}
    digits = outputs["leader"][0]
    assert digits[-1] == 2 and len(digits) >= 3  # the regex ended with EOS forced on both ranks
