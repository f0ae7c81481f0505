"""WasmshareLogitsProcessor: per-request wasmshare steering for vLLM's V1 model runner.

Register it with ``LLM(..., logits_processors=[WasmshareLogitsProcessor])`` or
``--logits-processors wasmshare.vllm.processor:WasmshareLogitsProcessor``. A request asks
for steering with flat keys in ``SamplingParams.extra_args`` (over HTTP, ``vllm_xargs``
allows only flat str / int / float / list values, hence no nesting): exactly one of
``wasmshare_json_schema`` (JSON text), ``wasmshare_regex``, ``wasmshare_choice`` (list of
str), ``wasmshare_grammar`` (Lark text) or ``wasmshare_controller`` (the sha256 of a
stored ``.wasm``, with an optional ``wasmshare_arg``: a str, or a list of uint32 ids).

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
import re
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

if TYPE_CHECKING:
    _Base = object
else:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _Base

__all__ = ["WasmshareLogitsProcessor", "steering_of"]

log = logging.getLogger("wasmshare.vllm")

PREFIX = "wasmshare_"
STEERING_KEYS = ("json_schema", "regex", "choice", "grammar", "controller")
_KNOWN = {PREFIX + k for k in (*STEERING_KEYS, "arg")}
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_STEERING_BYTES = 256 << 10
"""Largest schema, regex, grammar, choice list or controller argument a request may send."""
SERVICE_START_S = 120.0
"""How long the service may take to build its token table and start listening."""

# Bit j of byte value b: one gather turns mask bytes into allowed flags (little-endian words).
_BIT_TABLE = torch.tensor([[(b >> j) & 1 for j in range(8)] for b in range(256)], dtype=torch.bool)


def steering_of(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``steer`` message of a request's ``extra_args``, or None when it asks for nothing.

    Raises ValueError (one line) for an unknown ``wasmshare_`` key, two steerings at once,
    a value of the wrong type, a schema that is not JSON, or an argument without a controller.
    """
    if not extra_args:
        return None
    ours = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(PREFIX)}
    if not ours:
        return None
    unknown = sorted(set(ours) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown wasmshare key {unknown[0]!r}; known: {', '.join(sorted(_KNOWN))}")
    chosen = [k for k in STEERING_KEYS if PREFIX + k in ours]
    if len(chosen) > 1:
        raise ValueError(f"give one wasmshare steering, not {' and '.join(PREFIX + k for k in chosen)}")
    if not chosen:
        raise ValueError(f"{PREFIX}arg needs {PREFIX}controller")
    kind = chosen[0]
    value = ours[PREFIX + kind]
    for key, given in ours.items():
        size = sum(len(str(v)) for v in given) if isinstance(given, list) else len(str(given))
        if size > MAX_STEERING_BYTES:
            raise ValueError(f"{key} is {size:,} characters; the limit is {MAX_STEERING_BYTES:,}")
    if PREFIX + "arg" in ours and kind != "controller":
        raise ValueError(f"{PREFIX}arg needs {PREFIX}controller")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(o, str) and o for o in value):
            raise ValueError(f"{PREFIX}choice must be a non-empty list of non-empty strings")
        return {"kind": "choice", "options": value}
    if kind == "controller":
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise ValueError(f"{PREFIX}controller must be a lower-case sha256 hex digest")
        arg = ours.get(PREFIX + "arg", "")
        if isinstance(arg, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 32 for t in arg):
                raise ValueError(f"{PREFIX}arg as a list holds uint32 token ids")
        elif not isinstance(arg, str):
            raise ValueError(f"{PREFIX}arg must be a string or a list of token ids")
        return {"kind": "controller", "sha256": value, "arg": arg}
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{PREFIX}{kind} must be a non-empty string")
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{PREFIX}json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{PREFIX}json_schema must be a JSON object or boolean")
    return {"kind": kind, "source": value}


class _ServiceClient:
    """The connection to one controller service process, and its mapped regions."""

    def __init__(self, model: str, vocab_size: int, capacity: int) -> None:
        python = os.environ.get("WASMSHARE_PYTHON")
        if not python:
            raise RuntimeError(
                "wasmshare steering needs WASMSHARE_PYTHON: the python of wasmshare's own environment"
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
        deadline = time.monotonic() + SERVICE_START_S
        while True:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the wasmshare controller service exited with code {code} at start")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the wasmshare controller service did not listen within {SERVICE_START_S:.0f} s"
                    ) from None
                time.sleep(0.05)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        _framing.send_message(self.sock, message)
        reply, _ = _framing.recv_message(self.sock)
        return reply

    def close(self) -> None:
        self.sock.close()
        self._finalizer()


def _stop_service(process: subprocess.Popen[bytes], folder: tempfile.TemporaryDirectory[str]) -> None:
    """End the service (it also ends by itself when its last client disconnects)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
    folder.cleanup()


@dataclass
class _Row:
    key: str
    output_ids: list[int]  # vLLM's live list: sampled tokens are appended to it
    sent: int = 0  # how many of output_ids the service has seen
    ended: str | None = None  # "stop", or the error that ended the request
    logged: bool = False
    forced: list[int] = field(default_factory=list)  # fast-forward tokens still to emit
    skip: int = 0  # forced tokens emitted that the service must not see again
    after_forced: dict[str, Any] | None = None  # the step result that applies once forced ones are out


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
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt_ids, output_ids in batch_update.added:
            self._drop(index)  # an added request may replace the row's previous one
            try:
                steer = steering_of(params.extra_args)
            except ValueError:
                steer = None  # validate_params refused it already; never crash the worker
            if steer is not None:
                self._rows[index] = self._start(steer, prompt_ids or [], output_ids)
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

    def _start(self, steer: dict[str, Any], prompt: list[int], output_ids: list[int]) -> _Row:
        key = f"r{self._next_key}"
        self._next_key += 1
        row = _Row(key, output_ids)
        try:
            reply = self._service().request({"op": "add", "key": key, "steer": steer, "prompt": list(prompt)})
        except (OSError, EOFError, RuntimeError, ValueError) as e:
            self._lost(e)
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
        if self._client is None:
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
        for row in self._rows.values():
            if row.ended is None:
                row.ended = f"wasmshare controller service lost: {error}"
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- applying -----------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        n = logits.shape[0]
        rows = {i: r for i, r in self._rows.items() if i < n}
        tokens: dict[str, list[int]] = {}
        held: dict[str, dict[str, Any]] = {}  # rows that need no step this time
        for row in rows.values():
            new = row.output_ids[row.sent :]
            row.sent += len(new)
            dropped = min(row.skip, len(new))
            new, row.skip = new[dropped:], row.skip - dropped
            if row.ended is not None:
                continue
            if row.forced:
                held[row.key] = {"action": "continue", "output": "none", "force": row.forced.pop(0)}
                row.skip += 1
            elif row.after_forced is not None:
                held[row.key], row.after_forced = row.after_forced, None
            else:
                tokens[row.key] = [t for t in new if t >= 0]
        results: dict[str, Any] = {}
        if tokens and self._client is not None:
            try:
                reply = self._client.request({"op": "step", "tokens": tokens})
                if not reply.get("ok"):
                    raise ValueError(reply.get("error", "step refused"))
                results = reply["results"]
            except (OSError, EOFError, ValueError) as e:
                self._lost(e)
        results.update(held)
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
        return logits

    def _apply_masks(self, logits: torch.Tensor, masked: list[tuple[int, int]]) -> None:
        """Forbidden tokens to -inf: the rows' mask bytes through the bit table, one fill."""
        client = self._client
        assert client is not None
        index = torch.tensor([i for i, _ in masked], dtype=torch.long, device=logits.device)
        words = np.ascontiguousarray(client.mask[[s for _, s in masked]])
        allowed = _BIT_TABLE[torch.from_numpy(words.view(np.uint8)).long()].reshape(len(masked), -1)
        width = logits.shape[1]
        forbid = torch.ones((len(masked), width), dtype=torch.bool)
        v = min(width, client.vocab_size)
        forbid[:, :v] = ~allowed[:, :v]
        sub = logits.index_select(0, index)
        sub.masked_fill_(forbid.to(logits.device), float("-inf"))
        logits.index_copy_(0, index, sub)

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
