"""ControllerBatch: the controllers of one decode batch, stepped in parallel, writing in place.

The batch owns four shared regions: the token bitmask ``[capacity, ceil(V/32)]`` (int32,
the layout llguidance and xgrammar use), the bias ``[capacity, V]`` (float32), the step
records and a control region. Every sequence gets a slot; its controller (one wasm guest)
has the slot's rows lent into its own memory, so what it writes *is* the batch tensor and
nothing is copied between the guests and the engine where loans map pages.

One :meth:`ControllerBatch.step` writes the sampled tokens into the step records, runs
every controller in parallel (threads, as wasm calls release the GIL; or worker processes
woken by a futex in shared memory, where constrained sequences run as well, so their
llguidance work is not serialised by one GIL), checks each result, and returns them. Then
:meth:`ControllerBatch.apply` masks and biases a torch logits tensor in one vectorised op
(:mod:`.logits`), or :meth:`ControllerBatch.row_outputs` hands each row's output to a
sampler that works per row.

Fault policy: a controller that traps, runs past its deadline, exhausts its fuel or
memory, returns an error code or an invalid result, or whose worker process dies, ends
*its own* sequence with :class:`SequenceFailed` in its step result; its mask row is reset
to all-allowed and its bias row to zeros, and it is never applied. The rest of the batch
carries on.
"""

from __future__ import annotations

import os
import time
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import WasmshareError
from . import _futex, _records
from . import _layout as L
from ._inputs import StepInputs
from ._outputs import OutputRows
from ._regions import BatchRegions
from ._threads import ThreadRunner, run_chunk
from ._workers import WorkerPool
from .constraints import (
    Backend,
    ConstraintInstance,
    ConstraintSpec,
    compile_constraint,
    parse_backend,
)
from .controller import Controller, ControllerInstance
from .limits import Limits
from .results import (
    ACTION_ERROR_CODE,
    Action,
    BatchFull,
    BatchStep,
    Output,
    PreparedOutputs,
    RowOutput,
    SequenceFailed,
    StepResult,
)
from .tokens import TokenTable

if TYPE_CHECKING:
    from .logits import Tensor

__all__ = [
    "Action",
    "BatchFull",
    "BatchStep",
    "ControllerBatch",
    "Output",
    "PreparedOutputs",
    "RowOutput",
    "SequenceFailed",
    "StepResult",
]

Mode = Literal["threads", "workers"]

# Constrained sequences carry a Controller record only for its name; it is never instantiated.
_CONSTRAINT_PLACEHOLDER = b"\0asm\x01\0\0\0"
_SMALL_BATCH = 32  # up to this many sequences, per-step writes and checks run on Python lists


@dataclass
class _Sequence:
    sequence_id: int
    slot: int
    controller: Controller
    worker: int = -1
    instance: ControllerInstance | ConstraintInstance | None = None


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
    limits:
        Per-controller limits, per call (default :class:`Limits`; its memory cap covers
        the lent rows too).
    step_slot_bytes:
        Bytes per sequence for the step record, the prompt and the argument.
    grammar_backend:
        The engine that computes the masks of constrained sequences: ``"llguidance"``
        (default) or ``"xgrammar"`` (optional dependency).
    parallel:
        Thread mode only: ``None`` measures inline and pooled runs and keeps the faster;
        ``True`` always spreads a step over the pool; ``False`` always runs inline.
    """

    def __init__(
        self,
        token_table: TokenTable,
        *,
        capacity: int = 64,
        mode: Mode = "threads",
        workers: int | None = None,
        limits: Limits | None = None,
        step_slot_bytes: int = L.DEFAULT_STEP_SLOT_BYTES,
        parallel: bool | None = None,
        grammar_backend: Backend = "llguidance",
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
        self.limits = limits if limits is not None else Limits()
        n = workers if workers is not None else min(os.cpu_count() or 1, capacity)
        if not isinstance(n, int) or n <= 0:
            raise WasmshareError(f"workers must be a positive int, got {workers!r}")
        if mode == "workers" and n > BatchRegions.MAX_WORKERS:
            raise WasmshareError(f"at most {BatchRegions.MAX_WORKERS} workers")
        self.n_workers = n
        self.regions = BatchRegions.create(token_table.region, self.vocab_size, capacity, step_slot_bytes)
        self._outputs = OutputRows(self.regions)
        self._mask_rows = self._outputs.mask_rows
        self._bias_rows = self._outputs.bias_rows
        self._run_flags = self.regions.run_flags()
        self._inputs = StepInputs(self.regions)
        self._step_words = self._inputs.words
        self._status_words = self.regions.status_words()
        self._result_records = [self.regions.result_record(slot)[0] for slot in range(capacity)]
        self._status_records = [self.regions.status_record(slot)[0] for slot in range(capacity)]
        self._sequences: dict[int, _Sequence] = {}
        self._free_slots = list(range(capacity - 1, -1, -1))
        self._next_id = 0
        self._slot_output = np.zeros(capacity, dtype=np.int8)
        self._steps = np.zeros(capacity, dtype=np.int64)  # per slot: the next step number
        self._lengths = np.zeros(capacity, dtype=np.int64)  # per slot: tokens in the sequence
        self._sequence_ids = np.full(capacity, -1, dtype=np.int64)
        self._order_cache: (
            tuple[list[_Sequence], np.ndarray[Any, Any], slice | np.ndarray[Any, Any]] | None
        ) = None
        self.grammar_backend: Backend = parse_backend(grammar_backend)
        self._closed = False
        self._threads: ThreadRunner | None = None
        self._ended_copied = 0  # bytes copied by the guests this process ran that have ended
        self._last_step: BatchStep | None = None
        # slot -> why its worker's sequences ended when the worker died outside a step; the
        # next step reports it (a step resets every stepped slot's status first)
        self._lost: dict[int, str] = {}
        if mode == "threads":
            self._threads = ThreadRunner(n, parallel)
        n_processes = n if mode == "workers" else 0
        self._workers = WorkerPool(self.regions, self.limits, token_table, n_processes, self.lose_slot)

    # -- views ---------------------------------------------------------------------------------

    @property
    def mask(self) -> np.ndarray[Any, Any]:
        """Zero-copy ``[capacity, ceil(V/32)]`` int32 view of the batch bitmask (row = slot).

        Rows whose mask the last step deferred are stale until :meth:`fill_deferred_masks`."""
        return self._mask_rows

    @property
    def bias(self) -> np.ndarray[Any, Any]:
        """Zero-copy ``[capacity, V]`` float32 view of the batch bias (row = slot). The row
        of a sequence that answered a sparse bias holds its (id, value) pairs, not a dense
        bias: :meth:`row_outputs` and :meth:`apply` read them as checked."""
        return self._bias_rows

    def mask_tensor(self) -> Tensor:
        """Zero-copy torch view of :attr:`mask` (CPU; page-locked when CUDA is available).

        Rows whose mask the last step deferred are stale until :meth:`fill_deferred_masks`."""
        tensor: Tensor = self._torch_views()["mask"]
        return tensor

    def bias_tensor(self) -> Tensor:
        """Zero-copy torch view of :attr:`bias`."""
        tensor: Tensor = self._torch_views()["bias"]
        return tensor

    @property
    def sequences(self) -> tuple[int, ...]:
        """Ids of the live sequences, in slot order."""
        return tuple(s.sequence_id for s in sorted(self._sequences.values(), key=lambda s: s.slot))

    def slot(self, sequence_id: int) -> int:
        """The slot (row of :attr:`mask` / :attr:`bias`) of a live sequence."""
        return self._get(sequence_id).slot

    @property
    def bytes_copied(self) -> int:
        """Bytes copied between the host and this batch's guests so far, ended guests included.

        The sum of every controller guest's own counter (:attr:`~wasmshare.guest.Guest.bytes_copied`):
        0 where loans map the regions' pages into the guests and no host function copies;
        in copy mode, each lent row copied in before a call and out after it. In worker mode
        each worker reports its guests' sum in the control region at the end of every
        command. Constraints copy nothing: their masks are computed in place."""
        total = self._ended_copied
        for seq in self._sequences.values():
            if seq.instance is not None:
                total += seq.instance.bytes_copied
        return total + self._workers.bytes_copied

    def label(self, sequence_id: int) -> str:
        """The name of a live sequence's controller or constraint, as error messages give it."""
        return self._get(sequence_id).controller.label

    def _get(self, sequence_id: int) -> _Sequence:
        seq = self._sequences.get(sequence_id)
        if seq is None:
            raise WasmshareError(f"no live sequence {sequence_id} in this batch")
        return seq

    def _require_open(self) -> None:
        if self._closed:
            raise WasmshareError("the controller batch is closed")

    # -- joining and leaving ---------------------------------------------------------------------

    def add(
        self,
        controller: Controller | ConstraintSpec,
        prompt: Sequence[int] = (),
        *,
        sequence_id: int | None = None,
    ) -> int:
        """Start a sequence in a free slot, driven by a wasm controller or a constraint.

        A :class:`Controller` is instantiated and its ``ws_ctrl_create`` runs; a
        :class:`~wasmshare.llm.constraints.ConstraintSpec` (JSON Schema, regex, grammar,
        choice) is compiled for the batch's tokenizer (cached) and runs on the host, writing
        its masks into the same bitmask. Returns the sequence id. Raises :class:`BatchFull`,
        :class:`ConstraintError`, :class:`GuestError` (bad module, ABI mismatch) or
        :class:`SequenceFailed` (create trapped or returned an error); the slot is freed
        again in every failure case.
        """
        self._require_open()
        compiled = None
        spec: ConstraintSpec | None = None
        if isinstance(controller, ConstraintSpec):
            spec = controller
            compiled = compile_constraint(spec, self.token_table, backend=self.grammar_backend)
            controller = Controller(_CONSTRAINT_PLACEHOLDER, name=f"constraint:{spec.kind}")
        if not self._free_slots:
            raise BatchFull(f"all {self.capacity} slots of the batch are taken")
        if sequence_id is None:
            sequence_id = self._next_id
        if sequence_id in self._sequences:
            raise WasmshareError(f"sequence {sequence_id} is already in the batch")
        self._next_id = max(self._next_id, sequence_id + 1)
        arg = controller.arg_bytes
        tokens = self._inputs.check_prompt(prompt, arg)
        slot = self._free_slots.pop()
        seq = _Sequence(sequence_id, slot, controller)
        try:
            self._reset_slot(slot)
            arg_offset = self._inputs.write_prompt(slot, tokens, arg)
            lane = self._constraint_lane() if compiled is not None else -1
            if lane >= 0:
                # Worker processes each have their own GIL: constrained sequences spread over
                # them and this thread compute their masks truly in parallel, still in place
                # in the shared rows.
                assert spec is not None
                seq.worker = lane
                self._workers[lane].constrain(slot, sequence_id, spec)
            elif compiled is not None:
                seq.instance = ConstraintInstance(compiled, self.regions, slot, sequence_id)
                seq.instance.create(int(tokens.size), arg_offset, len(arg))
            elif self.mode == "threads":
                seq.instance = ControllerInstance(
                    controller, self.regions, slot, sequence_id, self.limits, tokenizer=self.token_table
                )
                seq.instance.create(int(tokens.size), arg_offset, len(arg))
            else:
                seq.worker = self._workers.least_loaded()
                self._workers[seq.worker].create(
                    slot, sequence_id, controller, int(tokens.size), arg_offset, len(arg)
                )
            failure = self._status_failure(seq, "ws_ctrl_create")
            if failure is not None:
                raise failure
        except BaseException:
            self._drop(seq)
            raise
        self._sequences[sequence_id] = seq
        self._steps[slot] = 0
        self._lengths[slot] = tokens.size
        self._sequence_ids[slot] = sequence_id
        self._invalidate_order()
        return sequence_id

    def _constraint_lane(self) -> int:
        """Where a new constrained sequence runs: -1 for this thread, else a worker index.

        In worker mode (llguidance backend) the lanes are this thread, which would otherwise
        wait for the workers, and all workers but one (so lanes match cores); the emptiest
        lane wins.
        """
        if self.mode != "workers" or self.grammar_backend != "llguidance" or self.n_workers < 2:
            return -1
        local = sum(
            1 for q in self._sequences.values() if q.worker < 0 and isinstance(q.instance, ConstraintInstance)
        )
        best = self._workers.least_loaded(among=self.n_workers - 1)
        return best if len(self._workers[best].slots) < local else -1

    def remove(self, sequence_id: int) -> None:
        """End a sequence: tear its controller down and free its slot."""
        seq = self._get(sequence_id)
        del self._sequences[sequence_id]
        self._drop(seq)

    def _drop(self, seq: _Sequence) -> None:
        self._outputs.forget(seq.slot)
        self._lost.pop(seq.slot, None)
        if seq.instance is not None:
            seq.instance.close()
            self._ended_copied += seq.instance.bytes_copied
            seq.instance = None
        if seq.worker >= 0:
            self._workers[seq.worker].remove(seq.slot)
            seq.worker = -1
        self._reset_slot(seq.slot)
        self._run_flags[seq.slot] = 0
        self._slot_output[seq.slot] = L.OUTPUT_NONE
        self._sequence_ids[seq.slot] = -1
        self._invalidate_order()
        if seq.slot not in self._free_slots:
            self._free_slots.append(seq.slot)

    def lose_slot(self, slot: int, message: str) -> None:
        """End the sequence of ``slot`` with ``message`` because its runner (a worker) died.

        The slot's status record says so at once; the batch also keeps the message, so the
        next step reports it even when the runner died outside a step (a step resets every
        stepped slot's status first). Called by the worker handles."""
        L.write_status(self._status_records[slot], L.STATUS_HOST_ERROR, 0, message)
        self._lost[slot] = message

    def _reset_slot(self, slot: int) -> None:
        """The safe value of a slot: every token allowed, no bias."""
        self._outputs.reset(slot)

    # -- stepping -----------------------------------------------------------------------------------

    def step(
        self,
        sampled: Mapping[int, Sequence[int]] | np.ndarray[Any, Any] | Sequence[int] | None = None,
        *,
        only: Iterable[int] | None = None,
        defer_masks: Container[int] = (),
    ) -> BatchStep:
        """Run every live controller once, in parallel where it pays, and check what each wrote.

        ``sampled`` gives the tokens sampled since each sequence's last step: a mapping
        ``{sequence_id: [tokens]}`` (missing: none, as at step 0), or, the fast form for an
        engine loop, one token per sequence as an int array aligned with :attr:`sequences`
        (-1: none). Returns a :class:`BatchStep`; failed sequences are removed from the
        batch (their action is ERROR). ``only`` restricts the step to some sequences (the
        others keep their state and their rows); ``sampled`` must then be a mapping over
        those. Raises :class:`WasmshareError` for a closed batch, an unknown sequence or a
        token id outside the vocabulary; a controller's fault never raises.

        ``defer_masks``: sequence ids whose *constraint* masks are left uncomputed (threads
        mode, llguidance constraints; others compute theirs as usual; worker mode computes
        every mask). A greedy sampler mostly draws a token the mask allows, and asking the
        constraint about that one token is far cheaper than computing the mask:
        :meth:`row_outputs` hands such rows out as deferred :class:`RowOutput` s, which
        compute the mask only when it is needed. :meth:`prepare` and :meth:`apply` compute
        the deferred masks they read; :meth:`fill_deferred_masks` computes them all (say,
        before reading :attr:`mask` directly).

        The bookkeeping is vectorised over the step region, so the engine-side cost per
        sequence stays below the cost of the controller call itself.
        """
        self._require_open()
        started = time.perf_counter()
        outputs = self._outputs
        if outputs.copy_event is not None:
            outputs.wait_for_copy()  # before controllers write the rows being copied again
        order, slots, index = self._order()
        if only is not None:
            chosen = set(only)
            for sid in chosen:
                self._get(sid)
            order = [seq for seq in order if seq.sequence_id in chosen]
            slots = np.array([seq.slot for seq in order], dtype=np.intp)
            index = slots
            if sampled is not None and not isinstance(sampled, Mapping):
                raise WasmshareError("with only=, give sampled tokens as a mapping")
        counts = self._inputs.write_sampled(sampled, order, slots, index, small_batch=_SMALL_BATCH)
        words = self._step_words
        self._lengths[index] += counts
        steps = self._steps[index]
        words[index, L.W_STEP] = steps
        words[index, L.W_N_TOKENS] = counts
        words[index, L.W_RESULT : L.W_RESULT + 6] = L.RESULT_RESET
        self._status_words[index, 0] = L.STATUS_OK  # runners write only failures
        if self._lost:
            for seq in order:
                message = self._lost.get(seq.slot)
                if message is not None:
                    L.write_status(self._status_records[seq.slot], L.STATUS_HOST_ERROR, 0, message)
        outputs.new_step(order, defer_masks if self.mode == "threads" else (), partial=only is not None)
        phase_start = time.perf_counter()
        if self.mode == "threads":
            # A sequence's first step may do one-off work (an engine computes a joining
            # constraint's first mask and defers the later ones): not a fair sample of the cost.
            self._run_threads(order, measure=bool(steps.all())) if only is None else run_chunk(
                [seq.instance for seq in order if seq.instance is not None]
            )
        else:
            self._run_flags[index] = 1
            self._run_workers(order)
            self._run_flags[index] = 0
        controller_us = (time.perf_counter() - phase_start) * 1e6
        steps += 1
        self._steps[index] = steps
        outputs.end_step()
        self._last_step = self._collect_all(order, slots, index, started, controller_us)
        return self._last_step

    def fill_deferred_masks(self, slots: Iterable[int] | None = None) -> None:
        """Compute the last step's deferred masks (of ``slots``, default all) into the bitmask."""
        self._outputs.fill_deferred(slots)

    def deferred_mask_error(self, sequence_id: int) -> str | None:
        """Why a deferred mask computed on demand allows nothing (the constraint's error), if it failed."""
        seq = self._sequences.get(sequence_id)
        instance = seq.instance if seq is not None else None
        return instance.mask_error if isinstance(instance, ConstraintInstance) else None

    def _order(self) -> tuple[list[_Sequence], np.ndarray[Any, Any], slice | np.ndarray[Any, Any]]:
        """Live sequences in slot order, their slots, and an index for the per-slot arrays:
        a slice when the slots are contiguous (the usual case: basic slicing is several
        times cheaper than fancy indexing), else the slot array."""
        if self._order_cache is None:
            order = sorted(self._sequences.values(), key=lambda s: s.slot)
            slots = np.array([s.slot for s in order], dtype=np.intp)
            index: slice | np.ndarray[Any, Any] = slots
            if len(order) and int(slots[-1]) - int(slots[0]) + 1 == len(order):
                index = slice(int(slots[0]), int(slots[-1]) + 1)
            self._order_cache = (order, slots, index)
        return self._order_cache

    def _invalidate_order(self) -> None:
        self._order_cache = None
        if self._threads is not None:
            self._threads.forget()

    def _collect_all(
        self,
        order: list[_Sequence],
        slots: np.ndarray[Any, Any],
        index: slice | np.ndarray[Any, Any],
        started: float,
        controller_us: float,
    ) -> BatchStep:
        header = self._step_words[index, L.W_RESULT + 1 : L.W_RESULT + 5]
        status = self._status_words[index, 0]
        candidates = _records.unusual_rows(header, status, small_batch=_SMALL_BATCH)
        action, output = header[:, 0].astype(np.int8), header[:, 1].astype(np.int8)
        special: dict[int, StepResult] = {}
        dropped: list[_Sequence] = []
        for i in candidates:
            seq = order[i]
            result = self._collect(seq)
            special[seq.sequence_id] = result
            if result.action is Action.ERROR:
                action[i], output[i] = ACTION_ERROR_CODE, L.OUTPUT_NONE
                dropped.append(seq)
            else:
                self._lengths[seq.slot] += len(result.fast_forward) - result.backtrack
        self._slot_output[index] = output
        sequence_ids = self._sequence_ids[index].copy()
        for seq in dropped:
            self._sequences.pop(seq.sequence_id, None)
            self._drop(seq)
        return BatchStep(
            sequence_ids,
            slots.copy(),
            action,
            output,
            special,
            elapsed_us=(time.perf_counter() - started) * 1e6,
            controller_us=controller_us,
        )

    def _run_threads(self, order: list[_Sequence], *, measure: bool = True) -> None:
        """Step the controllers inline or on the pool, whichever measures faster (:mod:`._threads`).

        The line-up is dealt again after the sequences change; a step run with
        ``measure=False`` counts for neither way."""
        threads = self._threads
        assert threads is not None
        if not threads.lined_up:
            threads.line_up([seq.instance for seq in order if seq.instance is not None])
        threads.run(measure=measure)

    @property
    def _run_cost(self) -> list[float]:
        """The thread runner's measured step costs, µs: ``[inline, pooled]`` (0.0: not yet)."""
        return self._threads.run_cost if self._threads is not None else [0.0, 0.0]

    def _run_workers(self, order: list[_Sequence]) -> None:
        busy = sorted({seq.worker for seq in order if seq.worker >= 0})
        # constrained sequences run here while the workers run their controllers
        self._workers.step(
            busy, lambda: run_chunk([s.instance for s in order if s.worker < 0 and s.instance is not None])
        )

    def _status_failure(self, seq: _Sequence, what: str) -> SequenceFailed | None:
        label = seq.controller.label
        return _records.status_failure(self._status_records[seq.slot], label, seq.sequence_id, what)

    def _collect(self, seq: _Sequence) -> StepResult:
        failure = self._status_failure(seq, "ws_ctrl_step")
        if failure is None:
            failure, result = _records.check_result(
                self._result_records[seq.slot],
                label=seq.controller.label,
                sequence_id=seq.sequence_id,
                length=int(self._lengths[seq.slot]),
                vocab_size=self.vocab_size,
                take_sparse_bias=lambda n_bias: self._take_sparse_bias(seq.slot, n_bias),
            )
            if failure is None and result is not None:
                return result
        assert failure is not None
        self._reset_slot(seq.slot)  # a half-written mask is never applied
        return StepResult(seq.sequence_id, Action.ERROR, error=failure)

    def _take_sparse_bias(self, slot: int, n_bias: int) -> str | None:
        return self._outputs.take_sparse_bias(slot, n_bias)

    def _sparse_bias(self, slot: int) -> _records.SparsePairs:
        return self._outputs.sparse_bias(slot)

    # -- applying to logits -------------------------------------------------------------------------------

    def _torch_views(self) -> dict[str, Any]:
        return self._outputs.torch_views()

    @property
    def _torch(self) -> dict[str, Any]:
        """The torch views made so far (``{}`` before the first use): see :mod:`.logits`."""
        return self._outputs.torch

    def apply(
        self, logits: Tensor, step: BatchStep | None = None, *, sequences: Sequence[int] | None = None
    ) -> Tensor:
        """Apply the last step's masks and biases to ``logits`` in place and return it.

        Row ``i`` of ``logits`` ([n, V'] with V' ≥ V; extra columns are masked when a mask
        applies) belongs to ``step.sequences[i]`` (default: the last step's order), or to
        ``sequences[i]`` when given (each with what its controller last wrote). Masked
        tokens get ``-inf``; biases are added. Works on CPU and CUDA tensors; on CUDA the
        page-locked rows are copied without blocking and the next :meth:`step` waits for
        the copy before controllers write again. One dense pass over the rows, where
        :meth:`row_outputs` serves a sampler that works row by row.
        """
        if sequences is not None:
            chosen = [self._get(int(sid)).slot for sid in sequences]
            slot_array = np.array(chosen, dtype=np.intp)
            step = BatchStep(
                np.asarray(sequences, dtype=np.int64),
                slot_array,
                np.zeros(len(chosen), np.int8),
                self._slot_output[slot_array],
                {},
                0.0,
                0.0,
            )
        step = step or self._last_step_or_fail()
        n = len(step.sequence_ids)
        if logits.dim() != 2 or logits.shape[0] != n or logits.shape[1] < self.vocab_size:
            raise WasmshareError(f"logits must be [{n}, >= {self.vocab_size}], got {list(logits.shape)}")
        # One mechanism for both entry points: unpack with prepare(), fill with apply_prepared().
        prepared = self.prepare(step, logits.shape[1], logits.device)
        self.apply_prepared(logits, prepared)
        self._outputs.record_copy(logits, prepared)
        return logits

    def prepare(self, step: BatchStep, width: int, device: Any = "cpu") -> PreparedOutputs:
        """Turn a step's masks and biases into one additive tensor, ready to apply to the logits.

        Each bitmask byte is looked up in a 256×8 table of 0 / -inf (one gather, no per-bit
        unpacking or boolean fill); the biases are added to the same tensor, so
        :meth:`apply_prepared` is a single in-place add. Columns past the vocabulary are
        forbidden when a row has a mask. Computes the deferred masks it reads.
        """
        return self._outputs.prepare(step, width, device)

    def row_outputs(self, step: BatchStep, *, analyse: Container[int] = ()) -> dict[int, RowOutput]:
        """The step's masks and biases per sequence id, for sparse application (numpy only).

        A mask's work then follows a sampler's draw or the tokens the mask allows, not a
        pass over the whole ``[n, V]`` logits: a JSON constraint mostly allows a handful of
        tokens, or (inside a string) nearly all, and a model that follows its prompt mostly
        draws an allowed token anyway. This takes one copy of the masked rows (bits past the
        vocabulary cleared); each :class:`RowOutput` works out its allowed ids on first use,
        and at once for the sequence ids in ``analyse`` (say, the rows that will be sampled
        rather than decoded greedily, on a thread beside the forward pass). Sequences
        without output are left out (a mask that allows every token stays: it still
        forbids the columns past the vocabulary). Masks the step deferred (``defer_masks``)
        are handed out deferred: nothing is computed or copied for them until needed.
        """
        return self._outputs.row_outputs(step, analyse=analyse, latest=step is self._last_step)

    def apply_prepared(
        self, logits: Tensor, prepared: PreparedOutputs, rows: Sequence[int] | None = None
    ) -> None:
        """Apply :meth:`prepare`'s tensor to ``logits`` in place (one add).

        ``rows[i]`` is the row of ``logits`` for ``prepared.sequence_ids[i]`` (default: the
        same order, all rows).
        """
        if prepared.additive is None:
            return
        from .logits import add_prepared

        add_prepared(logits, prepared.additive, rows)

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
                self._ended_copied += seq.instance.bytes_copied
        self._sequences.clear()
        self._workers.shutdown()
        if self._threads is not None:
            self._threads.close()
        self._outputs.close()
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
