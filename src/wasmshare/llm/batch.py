"""ControllerBatch: the controllers of one decode batch, stepped in parallel, zero-copy.

The batch owns four shared regions: the token bitmask ``[capacity, ceil(V/32)]`` (int32,
the layout llguidance and xgrammar use), the bias ``[capacity, V]`` (float32), the step
records and a control region. Every sequence gets a slot; its controller (one wasm guest)
has the slot's rows lent into its own memory, so what it writes *is* the batch tensor.

One :meth:`ControllerBatch.step` writes the sampled tokens into the step records, runs
every controller in parallel (threads: wasm calls release the GIL; or worker processes
woken by a futex in shared memory), checks each result, and returns them. Then
:meth:`ControllerBatch.apply` masks and biases a torch logits tensor in one vectorised op.

Fault policy: a controller that traps, runs past its deadline, exhausts its fuel or
memory, returns an error code or an invalid result — or whose worker process dies —
ends *its own* sequence with :class:`SequenceFailed` in its step result; its mask row is
reset to all-allowed and its bias row to zeros, and it is never applied. The rest of the
batch carries on.
"""

from __future__ import annotations

import enum
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import GuestError, WasmshareError
from . import _futex
from . import _layout as L
from ._worker import CMD_MESSAGE, CMD_STEP, recv_message, send_message
from .controller import BatchRegions, Controller, ControllerInstance, Limits, module_path_or_bytes
from .tokens import TokenTable

if TYPE_CHECKING:
    import torch

__all__ = ["ControllerBatch", "StepResult", "BatchStep", "SequenceFailed", "BatchFull", "Action", "Output"]

Mode = Literal["threads", "workers"]


class Action(str, enum.Enum):
    """What a sequence does after a step."""

    CONTINUE = "continue"
    STOP = "stop"
    ERROR = "error"


class Output(str, enum.Enum):
    """Which output slot a controller wrote this step."""

    NONE = "none"
    BITMASK = "bitmask"
    BIAS = "bias"


_OUTPUTS = {L.OUTPUT_NONE: Output.NONE, L.OUTPUT_BITMASK: Output.BITMASK, L.OUTPUT_BIAS: Output.BIAS}


class SequenceFailed(GuestError):
    """A sequence's controller failed; the sequence ended. ``cause`` says how (trap, limit, ...)."""

    def __init__(self, message: str, *, guest: str | None, sequence: int | None, cause: str) -> None:
        super().__init__(message, guest=guest, sequence=sequence)
        self.cause = cause


class BatchFull(WasmshareError):
    """Every slot of the batch is taken."""


@dataclass(frozen=True)
class StepResult:
    """One sequence's answer for one step.

    ``fast_forward`` tokens are appended (after removing ``backtrack`` tokens) without
    sampling; then, unless ``action`` is STOP or ERROR, the next token is sampled with
    ``output`` applied. ``error`` is set when ``action`` is ERROR.
    """

    sequence_id: int
    action: Action
    output: Output = Output.NONE
    backtrack: int = 0
    fast_forward: tuple[int, ...] = ()
    error: SequenceFailed | None = None
    elapsed_us: float = 0.0


@dataclass
class BatchStep:
    """The results of one :meth:`ControllerBatch.step`, in the order the sequences stepped."""

    results: dict[int, StepResult]
    sequences: tuple[int, ...]
    slots: tuple[int, ...]
    elapsed_us: float
    outputs: tuple[Output, ...] = field(default=())

    @property
    def failed(self) -> list[StepResult]:
        """The results whose sequence ended with an error."""
        return [r for r in self.results.values() if r.action is Action.ERROR]


@dataclass
class _Sequence:
    sequence_id: int
    slot: int
    controller: Controller
    length: int
    step: int = 0
    worker: int = -1
    instance: ControllerInstance | None = None


class ControllerBatch:
    """The wasm controllers of one engine batch (see the module docstring).

    Parameters
    ----------
    token_table:
        The tokenizer's :class:`TokenTable`; its region is lent read-only to every controller.
    capacity:
        Maximum concurrent sequences (slots). Regions are sized for it once.
    mode:
        ``"threads"`` runs controllers on a thread pool in this process; ``"workers"`` in
        worker processes sharing the same regions (Linux).
    workers:
        Threads or worker processes (default: the CPU count, at most ``capacity``).
    deadline_ms, fuel, memory_limit_bytes:
        Per-controller limits, per call (``memory_limit_bytes`` covers the lent rows too).
    step_slot_bytes:
        Bytes per sequence for the step record, the prompt and the argument.
    """

    def __init__(
        self,
        token_table: TokenTable,
        *,
        capacity: int = 64,
        mode: Mode = "threads",
        workers: int | None = None,
        deadline_ms: float | None = 50.0,
        fuel: int | None = None,
        memory_limit_bytes: int | None = 256 << 20,
        step_slot_bytes: int = L.DEFAULT_STEP_SLOT_BYTES,
    ) -> None:
        if not isinstance(capacity, int) or capacity <= 0:
            raise WasmshareError(f"capacity must be a positive int, got {capacity!r}")
        if mode not in ("threads", "workers"):
            raise WasmshareError(f"mode must be 'threads' or 'workers', got {mode!r}")
        if mode == "workers" and not _futex.AVAILABLE:
            raise WasmshareError("mode='workers' needs Linux (futex wake-ups); use mode='threads'")
        if step_slot_bytes < L.TOKENS_OFFSET + 4096:
            raise WasmshareError(f"step_slot_bytes must be at least {L.TOKENS_OFFSET + 4096}")
        self.token_table = token_table
        self.vocab_size = token_table.vocab_size
        self.capacity = capacity
        self.mode: Mode = mode
        self.limits = Limits(deadline_ms=deadline_ms, fuel=fuel, memory_limit_bytes=memory_limit_bytes)
        n = workers if workers is not None else min(os.cpu_count() or 1, capacity)
        if not isinstance(n, int) or n <= 0:
            raise WasmshareError(f"workers must be a positive int, got {workers!r}")
        if mode == "workers" and n > BatchRegions.MAX_WORKERS:
            raise WasmshareError(f"at most {BatchRegions.MAX_WORKERS} workers")
        self.n_workers = n
        self.regions = BatchRegions.create(token_table.region, self.vocab_size, capacity, step_slot_bytes)
        self._mask_rows = self.regions.mask_rows()
        self._bias_rows = self.regions.bias_rows()
        self._mask_rows[:] = -1
        self._run_flags = self.regions.run_flags()
        self._sequences: dict[int, _Sequence] = {}
        self._free_slots = list(range(capacity - 1, -1, -1))
        self._next_id = 0
        self._slot_output = [Output.NONE] * capacity
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._workers: list[_WorkerHandle] = []
        self._torch: dict[str, Any] = {}
        self._copy_event: Any = None
        self._last_step: BatchStep | None = None
        if mode == "threads":
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="wasmshare-ctrl")
        else:
            self._workers = [_WorkerHandle(self, i) for i in range(n)]

    # -- views ---------------------------------------------------------------------------------

    @property
    def mask(self) -> np.ndarray[Any, Any]:
        """Zero-copy ``[capacity, ceil(V/32)]`` int32 view of the batch bitmask (row = slot)."""
        return self._mask_rows

    @property
    def bias(self) -> np.ndarray[Any, Any]:
        """Zero-copy ``[capacity, V]`` float32 view of the batch bias (row = slot)."""
        return self._bias_rows

    def mask_tensor(self) -> torch.Tensor:
        """Zero-copy torch view of :attr:`mask` (CPU; page-locked when CUDA is available)."""
        tensor: torch.Tensor = self._torch_views()["mask"]
        return tensor

    def bias_tensor(self) -> torch.Tensor:
        """Zero-copy torch view of :attr:`bias`."""
        tensor: torch.Tensor = self._torch_views()["bias"]
        return tensor

    @property
    def sequences(self) -> tuple[int, ...]:
        """Ids of the live sequences, in slot order."""
        return tuple(s.sequence_id for s in sorted(self._sequences.values(), key=lambda s: s.slot))

    def slot(self, sequence_id: int) -> int:
        """The slot (row of :attr:`mask` / :attr:`bias`) of a live sequence."""
        return self._get(sequence_id).slot

    def _get(self, sequence_id: int) -> _Sequence:
        seq = self._sequences.get(sequence_id)
        if seq is None:
            raise WasmshareError(f"no live sequence {sequence_id} in this batch")
        return seq

    def _require_open(self) -> None:
        if self._closed:
            raise WasmshareError("the controller batch is closed")

    # -- joining and leaving ---------------------------------------------------------------------

    def add(self, controller: Controller, prompt: Sequence[int] = (), *, sequence_id: int | None = None) -> int:
        """Start a sequence: instantiate its controller in a free slot and run ``ws_ctrl_create``.

        Returns the sequence id. Raises :class:`BatchFull`, :class:`GuestError` (bad module,
        ABI mismatch) or :class:`SequenceFailed` (create trapped or returned an error); the
        slot is freed again in every failure case.
        """
        self._require_open()
        if not self._free_slots:
            raise BatchFull(f"all {self.capacity} slots of the batch are taken")
        if sequence_id is None:
            sequence_id = self._next_id
        if sequence_id in self._sequences:
            raise WasmshareError(f"sequence {sequence_id} is already in the batch")
        self._next_id = max(self._next_id, sequence_id + 1)
        tokens = np.asarray(prompt, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise WasmshareError(f"prompt token ids must be in [0, {self.vocab_size})")
        arg = controller.arg_bytes
        area = self.regions.token_area(0)  # same size for every slot
        arg_offset = tokens.size * 4
        if arg_offset + len(arg) > area.nbytes:
            raise WasmshareError(
                f"prompt ({tokens.size} tokens) and argument ({len(arg)} bytes) exceed the "
                f"{area.nbytes}-byte step slot; raise step_slot_bytes"
            )
        slot = self._free_slots.pop()
        seq = _Sequence(sequence_id, slot, controller, length=int(tokens.size))
        try:
            self._reset_slot(slot)
            area = self.regions.token_area(slot)
            area[: tokens.size] = tokens
            area.view(np.uint8)[arg_offset : arg_offset + len(arg)] = np.frombuffer(arg, np.uint8)
            if self.mode == "threads":
                seq.instance = ControllerInstance(controller, self.regions, slot, sequence_id, self.limits)
                seq.instance.create(int(tokens.size), arg_offset, len(arg))
            else:
                seq.worker = min(range(self.n_workers), key=lambda w: len(self._workers[w].slots))
                self._workers[seq.worker].create(seq, int(tokens.size), arg_offset, len(arg))
            failure = self._status_failure(seq, "ws_ctrl_create")
            if failure is not None:
                raise failure
        except BaseException:
            self._drop(seq)
            raise
        self._sequences[sequence_id] = seq
        return sequence_id

    def remove(self, sequence_id: int) -> None:
        """End a sequence: tear its controller down and free its slot."""
        seq = self._get(sequence_id)
        del self._sequences[sequence_id]
        self._drop(seq)

    def _drop(self, seq: _Sequence) -> None:
        if seq.instance is not None:
            seq.instance.close()
            seq.instance = None
        if seq.worker >= 0:
            self._workers[seq.worker].remove(seq.slot)
            seq.worker = -1
        self._reset_slot(seq.slot)
        self._run_flags[seq.slot] = 0
        self._slot_output[seq.slot] = Output.NONE
        if seq.slot not in self._free_slots:
            self._free_slots.append(seq.slot)

    def _reset_slot(self, slot: int) -> None:
        """The safe value of a slot: every token allowed, no bias."""
        self._mask_rows[slot] = -1
        self._bias_rows[slot] = 0.0

    # -- stepping -----------------------------------------------------------------------------------

    def step(self, sampled: Mapping[int, Sequence[int]] | None = None) -> BatchStep:
        """Run every live controller once, in parallel.

        ``sampled`` maps sequence ids to the tokens sampled for them since their last step
        (missing: none, as at step 0). Returns every sequence's :class:`StepResult`;
        failed sequences are removed from the batch (their ``action`` is ERROR).
        """
        self._require_open()
        started = time.perf_counter()
        if self._copy_event is not None:
            self._copy_event.synchronize()  # the device copy of the last masks has finished
            self._copy_event = None
        sampled = sampled or {}
        unknown = set(sampled) - set(self._sequences)
        if unknown:
            raise WasmshareError(f"sampled tokens for sequences not in the batch: {sorted(unknown)}")
        order = sorted(self._sequences.values(), key=lambda s: s.slot)
        for seq in order:
            new = np.asarray(sampled.get(seq.sequence_id, ()), dtype=np.int64)
            if new.size and (new.min() < 0 or new.max() >= self.vocab_size):
                raise WasmshareError(f"sequence {seq.sequence_id}: token ids must be in [0, {self.vocab_size})")
            area = self.regions.token_area(seq.slot)
            if new.size > area.size:
                raise WasmshareError(f"sequence {seq.sequence_id}: {new.size} tokens exceed the step slot")
            area[: new.size] = new
            record = self.regions.input_record(seq.slot)[0]
            record["step"] = seq.step
            record["n_tokens"] = new.size
            seq.length += int(new.size)
            self._run_flags[seq.slot] = 1
        if self.mode == "threads":
            self._run_threads(order)
        else:
            self._run_workers(order)
        results: dict[int, StepResult] = {}
        for seq in order:
            self._run_flags[seq.slot] = 0
            result = self._collect(seq)
            results[seq.sequence_id] = result
            seq.step += 1
            if result.action is Action.ERROR:
                self._sequences.pop(seq.sequence_id, None)
                self._drop(seq)
            else:
                self._slot_output[seq.slot] = result.output
                seq.length += len(result.fast_forward) - result.backtrack
        outputs = tuple(results[s.sequence_id].output for s in order)
        self._last_step = BatchStep(
            results=results,
            sequences=tuple(s.sequence_id for s in order),
            slots=tuple(s.slot for s in order),
            elapsed_us=(time.perf_counter() - started) * 1e6,
            outputs=outputs,
        )
        return self._last_step

    def _run_threads(self, order: list[_Sequence]) -> None:
        assert self._pool is not None
        chunks: list[list[ControllerInstance]] = [[] for _ in range(self.n_workers)]
        for i, seq in enumerate(order):
            assert seq.instance is not None
            chunks[i % self.n_workers].append(seq.instance)
        chunks = [c for c in chunks if c]
        if len(chunks) == 1:
            _run_chunk(chunks[0])
            return
        futures = [self._pool.submit(_run_chunk, c) for c in chunks[1:]]
        _run_chunk(chunks[0])  # the calling thread works too
        for f in futures:
            f.result()

    def _run_workers(self, order: list[_Sequence]) -> None:
        busy = sorted({seq.worker for seq in order})
        for w in busy:
            self._workers[w].start_step()
        for w in busy:
            self._workers[w].finish_step(self.limits)

    def _status_failure(self, seq: _Sequence, what: str) -> SequenceFailed | None:
        status = self.regions.status_record(seq.slot)[0]
        code = int(status["status"])
        if code == L.STATUS_OK:
            return None
        message = bytes(status["message"])[: int(status["message_len"])].decode("utf-8", "replace")
        cause = {
            L.STATUS_TRAP: "trap",
            L.STATUS_LIMIT: L.LIMIT_NAMES.get(int(status["detail"]), "limit"),
            L.STATUS_RETURNED_ERROR: "error code",
            L.STATUS_INVALID_RESULT: "invalid result",
            L.STATUS_HOST_ERROR: "host error",
        }.get(code, "unknown")
        return SequenceFailed(
            message or f"controller '{seq.controller.label}' seq {seq.sequence_id}: {what} failed ({cause})",
            guest=seq.controller.label, sequence=seq.sequence_id, cause=cause,
        )

    def _collect(self, seq: _Sequence) -> StepResult:
        status = self.regions.status_record(seq.slot)[0]
        elapsed_us = int(status["elapsed_ns"]) / 1000
        failure = self._status_failure(seq, "ws_ctrl_step")
        if failure is None:
            failure, result = self._validate(seq, elapsed_us)
            if failure is None and result is not None:
                return result
        assert failure is not None
        self._reset_slot(seq.slot)  # a half-written mask is never applied
        return StepResult(seq.sequence_id, Action.ERROR, error=failure, elapsed_us=elapsed_us)

    def _validate(self, seq: _Sequence, elapsed_us: float) -> tuple[SequenceFailed | None, StepResult | None]:
        record = self.regions.result_record(seq.slot)[0]
        action, output = int(record["action"]), int(record["output"])
        backtrack, n_ff = int(record["backtrack"]), int(record["n_ff"])
        problem = None
        if action not in (L.ACTION_CONTINUE, L.ACTION_STOP):
            problem = f"action {action} is not WS_CONTINUE or WS_STOP"
        elif output not in _OUTPUTS:
            problem = f"output {output} is not a WS_OUTPUT_* value"
        elif n_ff > L.MAX_FF_TOKENS:
            problem = f"n_ff {n_ff} exceeds WS_MAX_FF_TOKENS ({L.MAX_FF_TOKENS})"
        elif backtrack > seq.length:
            problem = f"backtrack {backtrack} exceeds the sequence length {seq.length}"
        ff = record["ff_tokens"][:n_ff] if problem is None else np.empty(0, np.uint32)
        if problem is None and ff.size and int(ff.max()) >= self.vocab_size:
            problem = f"fast-forward token {int(ff.max())} is outside the vocabulary ({self.vocab_size})"
        if problem is not None:
            return SequenceFailed(
                f"controller '{seq.controller.label}' seq {seq.sequence_id}: invalid step result: {problem}",
                guest=seq.controller.label, sequence=seq.sequence_id, cause="invalid result",
            ), None
        return None, StepResult(
            seq.sequence_id,
            Action.STOP if action == L.ACTION_STOP else Action.CONTINUE,
            _OUTPUTS[output],
            backtrack,
            tuple(int(t) for t in ff),
            None,
            elapsed_us,
        )

    # -- applying to logits -------------------------------------------------------------------------------

    def _torch_views(self) -> dict[str, Any]:
        if not self._torch:
            import torch

            mask = torch.from_numpy(self._mask_rows)
            bias = torch.from_numpy(self._bias_rows)
            views: dict[str, Any] = {"mask": mask, "bias": bias, "pinned": False}
            if torch.cuda.is_available():
                cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
                for region in (self.regions.mask, self.regions.bias):
                    err = cudart.cudaHostRegister(region.address, region.mapped_nbytes, 0)
                    if int(err) != 0:
                        raise WasmshareError(f"cudaHostRegister of the batch regions failed ({err})")
                views["pinned"] = True
            shifts = torch.arange(8, dtype=torch.uint8)
            views["bit_weights"] = torch.bitwise_left_shift(torch.ones(8, dtype=torch.uint8), shifts)
            self._torch = views
        return self._torch

    def apply(self, logits: torch.Tensor, step: BatchStep | None = None) -> torch.Tensor:
        """Apply the last step's masks and biases to ``logits`` in place and return it.

        Row ``i`` of ``logits`` ([n, V'] with V' ≥ V; extra columns are masked when a mask
        applies) belongs to ``step.sequences[i]`` (default: the last step's order). Masked
        tokens get ``-inf``; biases are added. Works on CPU and CUDA tensors; on CUDA the
        page-locked rows are copied without blocking and the next :meth:`step` waits for
        the copy before controllers write again.
        """
        import torch

        step = step or self._last_step_or_fail()
        views = self._torch_views()
        if logits.dim() != 2 or logits.shape[0] != len(step.sequences) or logits.shape[1] < self.vocab_size:
            raise WasmshareError(
                f"logits must be [{len(step.sequences)}, >= {self.vocab_size}], got {list(logits.shape)}"
            )
        device = logits.device
        mask_idx = [i for i, o in enumerate(step.outputs) if o is Output.BITMASK]
        bias_idx = [i for i, o in enumerate(step.outputs) if o is Output.BIAS]
        copy_event = None
        if mask_idx:
            slots = torch.tensor([step.slots[i] for i in mask_idx])
            words = views["mask"].index_select(0, slots)
            if device.type != "cpu":
                words = words.to(device, non_blocking=True)
            allowed = _unpack_bitmask(words, views["bit_weights"].to(device), logits.shape[1])
            rows = torch.tensor(mask_idx, device=device)
            sub = logits.index_select(0, rows).masked_fill_(~allowed, float("-inf"))
            logits.index_copy_(0, rows, sub)
        if bias_idx:
            slots = torch.tensor([step.slots[i] for i in bias_idx])
            bias = views["bias"].index_select(0, slots)
            if device.type != "cpu":
                bias = bias.to(device, non_blocking=True)
            rows = torch.tensor(bias_idx, device=device)
            sub = logits.index_select(0, rows)
            sub[:, : self.vocab_size] += bias.to(sub.dtype)
            logits.index_copy_(0, rows, sub)
        if device.type == "cuda" and (mask_idx or bias_idx):
            copy_event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copy_event.record()
        self._copy_event = copy_event
        return logits

    def _last_step_or_fail(self) -> BatchStep:
        if self._last_step is None:
            raise WasmshareError("apply() needs a step: call step() first")
        return self._last_step

    # -- lifetime ----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Tear down every controller, stop threads or workers, release the regions. Safe twice."""
        if self._closed:
            return
        self._closed = True
        for seq in list(self._sequences.values()):
            if seq.instance is not None:
                seq.instance.close()
        self._sequences.clear()
        for worker in self._workers:
            worker.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._torch.get("pinned"):
            import torch

            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            for region in (self.regions.mask, self.regions.bias):
                cudart.cudaHostUnregister(region.address)
        self._torch.clear()
        self.regions.close()

    def __enter__(self) -> ControllerBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<ControllerBatch {len(self._sequences)}/{self.capacity} sequences, V={self.vocab_size}, "
            f"{self.mode} x{self.n_workers}{' closed' if self._closed else ''}>"
        )


def _run_chunk(instances: list[ControllerInstance]) -> None:
    for instance in instances:
        instance.step()


def _unpack_bitmask(words: torch.Tensor, bit_weights: torch.Tensor, width: int) -> torch.Tensor:
    """``[n, W]`` int32 words → ``[n, width]`` bool, bit ``t % 32`` of word ``t // 32``."""
    import torch

    n, w = words.shape
    as_bytes = words.contiguous().view(torch.uint8).view(n, w * 4, 1)  # little-endian bytes
    bits = torch.bitwise_and(as_bytes, bit_weights).ne(0).view(n, w * 32)
    if bits.shape[1] >= width:
        return bits[:, :width]
    pad = torch.zeros((n, width - bits.shape[1]), dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)


class _WorkerHandle:
    """The engine's side of one worker process."""

    def __init__(self, batch: ControllerBatch, index: int) -> None:
        self.batch = batch
        self.index = index
        self.slots: set[int] = set()
        self._words = batch.regions.worker_words(index)
        self._go = batch.regions.worker_word_address(index, 0)
        self._done = batch.regions.worker_word_address(index, 1)
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wasmshare.llm._worker", str(child.fileno()), str(self.index)],
            pass_fds=(child.fileno(),), env=env,
        )
        child.close()
        self.sock = parent
        regions = self.batch.regions
        limits = self.batch.limits
        send_message(parent, {
            "geometry": regions.geometry(),
            "limits": {"deadline_ms": limits.deadline_ms, "fuel": limits.fuel,
                       "memory_limit_bytes": limits.memory_limit_bytes},
        })
        for region in (regions.token_table, regions.mask, regions.bias, regions.step, regions.control):
            region.send(parent)
        parent.settimeout(60)
        reply, _ = recv_message(parent)
        parent.settimeout(None)
        if not reply.get("ok"):
            raise WasmshareError(f"controller worker {self.index} failed to start: {reply}")
        self._words[1] = self._words[0]

    def _bump(self, command: int) -> int:
        self._words[2] = command
        go = (int(self._words[0]) + 1) & 0xFFFFFFFF
        self._words[0] = go
        _futex.wake(self._go)
        return go

    def _wait_done(self, go: int, timeout_s: float) -> bool:
        """Wait until the worker acknowledges ``go``; False if it died or timed out."""
        deadline = time.monotonic() + timeout_s
        while int(self._words[1]) != go:
            if self.process.poll() is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _futex.wait(self._done, int(self._words[1]), min(remaining, 0.05))
        return True

    def _message(self, message: dict[str, Any], payload: bytes = b"", timeout_s: float = 60.0) -> dict[str, Any]:
        go = self._bump(CMD_MESSAGE)
        try:
            send_message(self.sock, message, payload)
            self.sock.settimeout(timeout_s)
            reply, _ = recv_message(self.sock)
        except (OSError, EOFError) as e:
            self._crashed(f"lost contact while sending {message['kind']}: {e}")
            raise WasmshareError(f"controller worker {self.index} crashed; restarted") from e
        finally:
            self.sock.settimeout(None)
        if not self._wait_done(go, timeout_s):
            self._crashed(f"did not finish {message['kind']}")
        return reply

    def create(self, seq: _Sequence, n_prompt: int, arg_offset: int, arg_len: int) -> None:
        module = module_path_or_bytes(seq.controller)
        is_bytes = isinstance(module, bytes)
        reply = self._message(
            {"kind": "create", "slot": seq.slot, "sequence_id": seq.sequence_id, "name": seq.controller.label,
             "module": None if is_bytes else module, "module_is_bytes": is_bytes,
             "n_prompt": n_prompt, "arg_offset": arg_offset, "arg_len": arg_len},
            module if isinstance(module, bytes) else b"",
        )
        if not reply.get("ok"):
            error_type = reply.get("type", "GuestError")
            from .. import errors

            cls = getattr(errors, error_type, GuestError)
            if not (isinstance(cls, type) and issubclass(cls, GuestError)):
                cls = GuestError
            raise cls(reply.get("error", "controller creation failed"), guest=seq.controller.label, sequence=seq.sequence_id)
        self.slots.add(seq.slot)

    def remove(self, slot: int) -> None:
        if slot in self.slots:
            self.slots.discard(slot)
            if self.process.poll() is None:
                self._message({"kind": "remove", "slot": slot})

    def start_step(self) -> None:
        self._pending = self._bump(CMD_STEP)

    def finish_step(self, limits: Limits) -> None:
        per_call = (limits.deadline_ms or 1000.0) / 1000
        timeout = max(2.0, 2 * per_call * max(1, len(self.slots)) + 1.0)
        if not self._wait_done(self._pending, timeout):
            self._crashed("died during a step" if self.process.poll() is not None else f"did not answer within {timeout:.1f} s")

    def _crashed(self, what: str) -> None:
        """Fail this worker's sequences with a clear error, then restart it."""
        code = self.process.poll()
        if code is None:
            self.process.kill()
            code = self.process.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        message = f"controller worker {self.index} (pid {self.process.pid}) {what} ({how}); its sequences ended"
        regions = self.batch.regions
        from .controller import write_status

        for slot in self.slots:
            write_status(regions.status_record(slot)[0], L.STATUS_HOST_ERROR, 0, message)
        self.slots.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        self.restarts += 1
        self._start()

    def shutdown(self) -> None:
        if self.process.poll() is None:
            try:
                self._message({"kind": "shutdown"}, timeout_s=5)
            except WasmshareError:
                pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            self.sock.close()
        except OSError:
            pass
