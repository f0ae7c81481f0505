"""WasmshareLogitsProcessor: per-request wasmshare steering for vLLM's V1 model runner.

Register it with ``LLM(..., logits_processors=[WasmshareLogitsProcessor])`` or
``--logits-processors wasmshare.vllm.processor:WasmshareLogitsProcessor``. A request asks
for steering with ``wasmshare_`` keys in ``SamplingParams.extra_args`` (``vllm_xargs`` over
HTTP), checked by :mod:`.steering`.

This module imports only what vLLM's environment has (stdlib, numpy, torch, vLLM) and the
wasmtime-free :mod:`wasmshare.region` / :mod:`wasmshare._framing`: vLLM's pins keep
wasmshare's own dependencies out of its environment. The controllers run in the service
(:mod:`.service`), started on first use with ``$WASMSHARE_PYTHON`` (the Python of
wasmshare's environment) and ``$WASMSHARE_CONTROLLERS_DIR`` (the stored controllers). The
service's mask and bias regions are mapped here, so a controller's mask is read in place.

Requests without wasmshare keys cost nothing: :meth:`apply` returns at once when no row
is steered, and the service is not started until a steered request arrives. A steered
request that stops gets only EOS allowed; tokens a constraint fast-forwards are forced one
per step (vLLM samples one token a step), and the step's mask applies after them; one whose controller fails (or whose service
died) gets only EOS too, and the error is logged with the request's row and key.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import _framing
from ..region import Region
from .steering import request_tag, steering_of

if TYPE_CHECKING:
    _Base = object
else:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _Base

__all__ = ["WasmshareLogitsProcessor"]

log = logging.getLogger("wasmshare.vllm")

SERVICE_START_S = 120.0
"""How long the service may take to build its token table and start listening."""
_NEG_INF_BITS = np.uint32(0xFF800000)  # float32 -inf


class _ServiceClient:
    """The connection to one controller service process, and its mapped regions."""

    def __init__(self, model: str, vocab_size: int, capacity: int) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        shared = os.environ.get("WASMSHARE_SERVICE_SOCKET")
        if shared:  # a service its owner started for every worker of this node
            path = shared
        else:
            python = os.environ.get("WASMSHARE_PYTHON")
            if not python:
                raise RuntimeError(
                    "wasmshare steering needs WASMSHARE_PYTHON (the python of wasmshare's own "
                    "environment) or WASMSHARE_SERVICE_SOCKET (a running controller service)"
                )
            self._dir = tempfile.TemporaryDirectory(prefix="wasmshare-vllm-")
            path = os.path.join(self._dir.name, "service.sock")
            command = [python, "-m", "wasmshare.vllm.service", path, model, "--capacity", str(capacity)]
            command += ["--vocab-size", str(vocab_size)]
            controllers = os.environ.get("WASMSHARE_CONTROLLERS_DIR")
            if controllers:
                command += ["--controllers-dir", controllers]
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self._finalizer = weakref.finalize(self, _stop_service, self.process, self._dir)
        self.sock = self._connect(path)
        reply = self.request({"op": "hello"})
        self.mask_region = Region.receive(self.sock)
        self.bias_region = Region.receive(self.sock)
        self.vocab_size = int(reply["vocab_size"])
        self.eos: int | None = reply["eos"]
        rows, words = int(reply["capacity"]), int(reply["mask_words"])
        self.mask = np.lib.stride_tricks.as_strided(
            self.mask_region.array(np.int32), (rows, words), (int(reply["mask_stride"]), 4), writeable=False
        )
        self.bias = np.lib.stride_tricks.as_strided(
            self.bias_region.array(np.float32),
            (rows, self.vocab_size),
            (int(reply["bias_stride"]), 4),
            writeable=False,
        )

    def _connect(self, path: str) -> socket.socket:
        return _framing.connect_unix(path, SERVICE_START_S, self.process)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        _framing.send_message(self.sock, message)
        reply, _ = _framing.recv_message(self.sock)
        return reply

    def close(self) -> None:
        self.sock.close()
        self._finalizer()


def _stop_service(
    process: subprocess.Popen[bytes] | None, folder: tempfile.TemporaryDirectory[str] | None
) -> None:
    """End the service this client started (it also ends when its last client disconnects)."""
    if process is None or folder is None:
        return  # a shared service belongs to its owner
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
    folder.cleanup()


def _write_replacing(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole: through a temporary file renamed over it, so a reader
    in another process never sees a half-written file."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


@dataclass
class _Stats:
    """Time the processor adds to vLLM's critical path, written to ``path`` when one is given.

    ``apply_s`` is every :meth:`WasmshareLogitsProcessor.apply` call with steered rows (the
    wait for the service included), ``wait_s`` the part spent waiting for the controllers,
    ``send_s`` sending the tokens before the forward pass. The file (JSON, rewritten after
    every step, outside the times it counts) is for benchmarks: ``$WASMSHARE_VLLM_STATS``."""

    path: str | None
    steps: int = 0
    apply_s: float = 0.0
    wait_s: float = 0.0
    send_s: float = 0.0

    def count(self, apply_s: float) -> None:
        self.steps += 1
        self.apply_s += apply_s
        if self.path:
            figures = {
                "steps": self.steps,
                "apply_s": self.apply_s,
                "wait_s": self.wait_s,
                "send_s": self.send_s,
            }
            _write_replacing(self.path, json.dumps(figures))


@dataclass
class _Row:
    key: str
    tag: str | None  # the gateway's name for the request, for its status file
    output_ids: list[int]  # vLLM's live list: sampled tokens are appended to it
    sent: int = 0  # how many of output_ids the service has seen
    ended: str | None = None  # "stop", or the error that ended the request
    logged: bool = False
    forced: list[int] = field(default_factory=list)  # fast-forward tokens still to emit
    skip: int = 0  # forced tokens emitted that the service must not see again
    after_forced: dict[str, Any] | None = None  # the step result that applies once forced ones are out


def _report(row: _Row) -> None:
    """Leave a failed request's error where ``wasmshare vllm serve`` reads it (tagged requests)."""
    folder = os.environ.get("WASMSHARE_STATUS_DIR")
    if row.tag is None or not folder or row.ended is None:
        return
    try:
        _write_replacing(os.path.join(folder, f"{row.tag}.error"), row.ended)
    except OSError as e:
        log.warning("cannot write the status of %s: %s", row.key, e)


def _tensor_parallel_rank(vllm_config: Any) -> tuple[int, int]:
    """This worker's tensor-parallel rank and the number of ranks ((0, 1) when not parallel)."""
    ranks = int(getattr(getattr(vllm_config, "parallel_config", None), "tensor_parallel_size", 1) or 1)
    if ranks <= 1:
        return 0, 1
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank()), ranks
    except (ImportError, AssertionError, RuntimeError):
        rank = getattr(vllm_config.parallel_config, "rank", None)  # the worker's global rank
        return (int(rank) % ranks, ranks) if isinstance(rank, int) else (0, 1)


class WasmshareLogitsProcessor(_Base):
    """vLLM V1 logits processor giving each request that asks its own wasmshare steering.

    Follows vLLM's persistent batch (rows: removed, then added, then moved or swapped);
    a moved request keeps its service key, a removed one is removed from the service, and
    a preempted one comes back as an added row whose controller replays its output so far.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self._model = str(vllm_config.model_config.model)
        self._vocab_size = int(vllm_config.model_config.get_vocab_size())
        self._capacity = int(vllm_config.scheduler_config.max_num_seqs)
        self._device = device
        self._rows: dict[int, _Row] = {}
        self._client: _ServiceClient | None = None
        self._next_key = 0
        self._in_flight = False  # a step message sent, its reply not read yet
        self._ready: dict[str, dict[str, Any]] = {}  # this step's answers, by key
        self._stats = _Stats(os.environ.get("WASMSHARE_VLLM_STATS"))
        # Tensor parallelism with a shared service: rank 0 leads (adds, removes and steps the
        # sequences), the other ranks follow (read the same step's answers and the same rows),
        # so each controller runs once per step and every rank applies the same masks. Keys
        # are named by the engine's instance, which every rank of it shares.
        rank, ranks = _tensor_parallel_rank(vllm_config)
        shared = bool(os.environ.get("WASMSHARE_SERVICE_SOCKET"))
        instance = str(getattr(vllm_config, "instance_id", "") or "")
        self._shared_tp = shared and ranks > 1 and bool(instance)
        self._follower = self._shared_tp and rank > 0
        self._group = instance if self._shared_tp else f"{os.getpid()}-{id(self):x}"
        self._step_id = 0
        eos = getattr(vllm_config.model_config.hf_config, "eos_token_id", None)
        self._eos: int | None = (
            eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
        )

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse (ValueError, so HTTP 400) steering that is malformed or cannot be honoured.

        A stop is carried out by allowing only EOS, so ``ignore_eos`` and ``min_tokens``
        would make a controller's stop impossible."""
        steer = steering_of(sampling_params.extra_args)
        if steer is None:
            return
        if sampling_params.ignore_eos:
            raise ValueError("wasmshare steering ends a request with EOS: it cannot be used with ignore_eos")
        if sampling_params.min_tokens:
            raise ValueError("wasmshare steering ends a request with EOS: it cannot be used with min_tokens")

    def is_argmax_invariant(self) -> bool:
        """Masks and biases change the greedy choice."""
        return False

    # -- the persistent batch ---------------------------------------------------------------

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None:
            self._begin_step()
            return
        self._collect()  # a step vLLM ran without sampling: its answers stay ready
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._drop(index)  # an added request may replace the row's previous one
            try:
                steer, tag = steering_of(params.extra_args), request_tag(params.extra_args)
            except ValueError:
                steer, tag = None, None  # validate_params refused it already; never crash the worker
            if steer is not None:
                self._rows[index] = self._start(steer, tag, prompt_ids or [], output_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if direction.name == "SWAP":
                if row_a is not None:
                    self._rows[b] = row_a
                if row_b is not None:
                    self._rows[a] = row_b
            else:  # UNIDIRECTIONAL: a's request replaces b's
                if row_b is not None:
                    self._remove_key(row_b)
                if row_a is not None:
                    self._rows[b] = row_a
        self._begin_step()

    def _start(
        self, steer: dict[str, Any], tag: str | None, prompt: list[int], output_ids: list[int]
    ) -> _Row:
        key = f"{self._group}.{self._next_key}"  # unique among the engines sharing a service
        self._next_key += 1
        row = _Row(key, tag, output_ids)
        if self._follower:  # the leader adds it; a follower only needs the regions mapped
            try:
                self._service()
            except (OSError, EOFError, RuntimeError, ValueError) as e:
                self._lost(e)
                row.ended = f"wasmshare controller service unavailable: {e}"
            return row
        message = {"op": "add", "key": key, "steer": steer, "prompt": list(prompt)}
        for attempt in range(2):
            fresh = self._client is None
            try:
                reply = self._service().request(message)
                break
            except (OSError, EOFError, RuntimeError, ValueError) as e:
                self._lost(e)
                if fresh or attempt:  # a connection that was idle may have outlived its service: retry once
                    row.ended = f"wasmshare controller service unavailable: {e}"
                    return row
        if not reply.get("ok"):
            row.ended = str(reply.get("error", "refused"))
        return row

    def _drop(self, index: int) -> None:
        row = self._rows.pop(index, None)
        if row is not None:
            self._remove_key(row)

    def _remove_key(self, row: _Row) -> None:
        # A row that ended on a stop still holds its service slot; the service ignores keys it
        # already dropped (a failed controller's), so every row is removed.
        if self._client is None or self._follower:
            return
        try:
            self._client.request({"op": "remove", "key": row.key})
        except (OSError, EOFError, ValueError) as e:
            self._lost(e)

    def _service(self) -> _ServiceClient:
        if self._client is None:
            self._client = _ServiceClient(self._model, self._vocab_size, self._capacity)
        return self._client

    def _lost(self, error: BaseException) -> None:
        """The service is gone: every live steered request ends; the next one starts a new service."""
        log.warning("wasmshare controller service lost: %s", error)
        self._in_flight = False
        for row in self._rows.values():
            if row.ended is None:
                row.ended = f"wasmshare controller service lost: {error}"
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- applying -----------------------------------------------------------------------------

    def _begin_step(self) -> None:
        """Send this step's sampled tokens to the service, so controllers run beside the forward pass.

        vLLM calls :meth:`update_state` before the model runs and :meth:`apply` after it;
        the tokens sampled at the last step are already in each row's output list, so the
        controllers' work overlaps the forward pass and :meth:`apply` only collects it.
        Rows that already hold an answer (a step vLLM ran without sampling) are not stepped.
        """
        if self._in_flight or not self._rows:
            return
        tokens: dict[str, list[int]] = {}
        for row in self._rows.values():
            if row.key in self._ready:
                continue
            known = row.output_ids[row.sent :]
            if -1 in known:  # asynchronous scheduling: a placeholder until the token is known
                known = known[: known.index(-1)]
            row.sent += len(known)
            dropped = min(row.skip, len(known))
            new, row.skip = known[dropped:], row.skip - dropped
            if row.ended is not None:
                continue
            if row.forced:
                self._ready[row.key] = {"action": "continue", "output": "none", "force": row.forced.pop(0)}
                row.skip += 1
            elif row.after_forced is not None:
                self._ready[row.key], row.after_forced = row.after_forced, None
            else:
                tokens[row.key] = new
        # ranks of one engine step together even when nothing was sampled, so they agree on step ids
        if (tokens or self._shared_tp) and self._client is not None:
            self._step_id += 1
            if self._follower:  # the leader sends the same tokens; _collect reads its answers
                self._in_flight = True
                return
            started = time.perf_counter()
            message = {"op": "step", "tokens": tokens, "group": self._group, "step_id": self._step_id}
            try:
                _framing.send_message(self._client.sock, message)
                self._in_flight = True
            except (OSError, ValueError) as e:
                self._lost(e)
            self._stats.send_s += time.perf_counter() - started

    def _collect(self) -> None:
        """Read the outstanding step's reply into :attr:`_ready` (waiting if the service is at work)."""
        if not self._in_flight:
            return
        self._in_flight = False
        client = self._client
        assert client is not None
        started = time.perf_counter()
        try:
            if self._follower:
                _framing.send_message(
                    client.sock, {"op": "follow", "group": self._group, "step_id": self._step_id}
                )
            reply, _ = _framing.recv_message(client.sock)
            if not reply.get("ok"):
                raise ValueError(reply.get("error", "step refused"))
            self._ready.update(reply["results"])
        except (OSError, EOFError, ValueError) as e:
            self._lost(e)
        self._stats.wait_s += time.perf_counter() - started

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            self._ready.clear()
            return logits
        started = time.perf_counter()
        n = logits.shape[0]
        self._begin_step()  # a no-op unless update_state did not run for this step
        self._collect()
        results, self._ready = self._ready, {}
        rows = {i: r for i, r in self._rows.items() if i < n}
        masked: list[tuple[int, int]] = []
        forced: list[tuple[int, int]] = []
        biased: list[tuple[int, int]] = []
        only_eos: list[int] = []
        for index, row in rows.items():
            result = results.get(row.key) if row.ended is None else None
            if row.ended is None and result is None:
                row.ended = "no answer from the wasmshare controller service"
            if result is not None and result.get("forced"):
                # vLLM samples one token a step: emit the forced ones first, then the output
                row.forced = [int(t) for t in result["forced"]]
                row.after_forced = {k: v for k, v in result.items() if k != "forced"}
                result = {"action": "continue", "output": "none", "force": row.forced.pop(0)}
                row.skip += 1
            if result is not None:
                action = result.get("action")
                if "force" in result:
                    forced.append((index, int(result["force"])))
                elif action == "error":
                    row.ended = str(result.get("error") or "controller failed")
                elif action == "stop":
                    row.ended = "stop"
                elif result["output"] == "bitmask":
                    masked.append((index, int(result["slot"])))
                elif result["output"] == "bias":
                    biased.append((index, int(result["slot"])))
                elif result["output"] == "sparse":
                    ids = torch.tensor(result["ids"], dtype=torch.long, device=logits.device)
                    values = torch.tensor(result["values"], dtype=logits.dtype, device=logits.device)
                    logits[index].index_add_(0, ids, values)
            if row.ended is not None:
                if row.ended != "stop" and not row.logged:
                    log.warning(
                        "wasmshare steering of request row %d (%s) ended: %s", index, row.key, row.ended
                    )
                    row.logged = True
                    if not self._follower:
                        _report(row)
                only_eos.append(index)
        if masked:
            self._apply_masks(logits, masked)
        if biased:
            self._apply_biases(logits, biased)
        if only_eos:
            self._force_eos(logits, only_eos)
        for index, token in forced:
            logits[index].fill_(float("-inf"))
            logits[index, token] = 0.0
        self._stats.count(time.perf_counter() - started)
        return logits

    def _apply_masks(self, logits: torch.Tensor, masked: list[tuple[int, int]]) -> None:
        """Forbidden tokens to -inf, in place: the rows' mask bits unpacked once, one add.

        Bit ``t % 32`` of little-endian word ``t // 32`` allows token ``t``. Adding -inf
        (its bit pattern is built with integer arithmetic) is several times faster on the
        CPU than a masked fill; tokens past the controllers' vocabulary (vLLM pads the
        logits) are forbidden."""
        client = self._client
        assert client is not None
        width = logits.shape[1]
        v = min(width, client.vocab_size)
        rows = torch.tensor([i for i, _ in masked], dtype=torch.long, device=logits.device)
        words = client.mask[[s for _, s in masked]]  # a copy of just these rows
        allowed = np.unpackbits(words.view(np.uint8), axis=1, count=v, bitorder="little")
        add = ((1 - allowed).astype(np.uint32) * _NEG_INF_BITS).view(np.float32)
        logits[:, :v].index_add_(0, rows, torch.from_numpy(add).to(logits.device, logits.dtype))
        if v < width:
            logits[:, v:].index_fill_(0, rows, float("-inf"))

    def _apply_biases(self, logits: torch.Tensor, biased: list[tuple[int, int]]) -> None:
        client = self._client
        assert client is not None
        index = torch.tensor([i for i, _ in biased], dtype=torch.long, device=logits.device)
        v = min(logits.shape[1], client.vocab_size)
        bias = torch.from_numpy(np.ascontiguousarray(client.bias[[s for _, s in biased], :v]))
        logits[:, :v].index_add_(0, index, bias.to(logits.device, logits.dtype))

    def _force_eos(self, logits: torch.Tensor, indices: list[int]) -> None:
        eos = self._client.eos if self._client is not None and self._client.eos is not None else self._eos
        index = torch.tensor(indices, dtype=torch.long, device=logits.device)
        logits.index_fill_(0, index, float("-inf"))
        if eos is not None:
            logits[index, eos] = 0.0
