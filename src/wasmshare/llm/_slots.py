"""A batch's slots: the sequences that join and leave them, their controllers, regions and runners.

The part of :class:`~wasmshare.llm.batch.ControllerBatch` that owns state: the shared
regions, one slot per sequence and the instance, worker or constraint that runs in it,
and the views of the rows. Stepping and reading outputs are in :mod:`.batch`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import WasmshareError
from . import _futex, _records
from . import _layout as L
from ._inputs import StepInputs
from ._late import Flight, Flights
from ._outputs import OutputRows
from ._regions import BatchRegions
from ._threads import ThreadRunner
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
from .results import BatchFull, BatchStep, SequenceFailed
from .tokens import TokenTable

if TYPE_CHECKING:
    from .logits import Tensor

__all__ = ["BatchSlots", "Mode", "SlotSequence"]

Mode = Literal["threads", "workers"]

# Constrained sequences carry a Controller record only for its name; it is never instantiated.
_CONSTRAINT_PLACEHOLDER = b"\0asm\x01\0\0\0"


@dataclass
class SlotSequence:
    """One sequence in its slot, and what runs it: a local instance or a worker process."""

    sequence_id: int
    slot: int
    controller: Controller
    worker: int = -1
    instance: ControllerInstance | ConstraintInstance | None = None


class BatchSlots:
    """The slots of a :class:`~wasmshare.llm.batch.ControllerBatch` and the sequences in them."""

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
        self._sequences: dict[int, SlotSequence] = {}
        self._free_slots = list(range(capacity - 1, -1, -1))
        self._next_id = 0
        self._slot_output = np.zeros(capacity, dtype=np.int8)
        self._steps = np.zeros(capacity, dtype=np.int64)  # per slot: the next step number
        self._lengths = np.zeros(capacity, dtype=np.int64)  # per slot: tokens in the sequence
        self._sequence_ids = np.full(capacity, -1, dtype=np.int64)
        self._order_cache: (
            tuple[list[SlotSequence], np.ndarray[Any, Any], slice | np.ndarray[Any, Any]] | None
        ) = None
        self.grammar_backend: Backend = parse_backend(grammar_backend)
        # Whoever steps this batch can splice a sequence (drop tokens, add forced ones): then a
        # JSON Schema answer that fails a check backtracks out of the value. A logits processor
        # cannot take tokens back; it sets this False and such an answer ends with the error.
        self.constraint_repairs = True
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
        self._flights = Flights(capacity, self._workers)
        self._last_late: BatchStep | None = None

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

    def _get(self, sequence_id: int) -> SlotSequence:
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
        seq = SlotSequence(sequence_id, slot, controller)
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
                self._workers[lane].constrain(slot, sequence_id, spec, repairs=self.constraint_repairs)
            elif compiled is not None:
                seq.instance = ConstraintInstance(
                    compiled, self.regions, slot, sequence_id, can_backtrack=self.constraint_repairs
                )
                seq.instance.create(int(tokens.size), arg_offset, len(arg))
            elif self.mode == "threads":
                seq.instance = ControllerInstance(
                    controller, self.regions, slot, sequence_id, self.limits, tokenizer=self.token_table
                )
                seq.instance.create(int(tokens.size), arg_offset, len(arg))
            else:
                seq.worker = self._workers.least_loaded(avoid=self._flights.busy_workers)
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
        best = self._workers.least_loaded(among=self.n_workers - 1, avoid=self._flights.busy_workers)
        return best if len(self._workers[best].slots) < local else -1

    def remove(self, sequence_id: int) -> None:
        """End a sequence: tear its controller down and free its slot.

        A sequence still in a step that was cut is waited for first (at most its deadline):
        its controller cannot be torn down under a running call."""
        seq = self._get(sequence_id)
        flight = self._flights.running.get(sequence_id)
        if flight is not None:
            self._flights.wait([flight])
            self._land([flight])
        del self._sequences[sequence_id]
        self._drop(seq)

    def _drop(self, seq: SlotSequence) -> None:
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

    def _order(self) -> tuple[list[SlotSequence], np.ndarray[Any, Any], slice | np.ndarray[Any, Any]]:
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

    def _land(self, flights: list[Flight]) -> list[Flight]:
        """Take over answered flights: their worker steps finished, their run flags cleared."""
        landed = self._flights.land(flights)
        for flight in landed:
            self._run_flags[flight.slot] = 0
        return landed

    def _status_failure(self, seq: SlotSequence, what: str) -> SequenceFailed | None:
        label = seq.controller.label
        return _records.status_failure(self._status_records[seq.slot], label, seq.sequence_id, what)

    def _torch_views(self) -> dict[str, Any]:
        return self._outputs.torch_views()

    @property
    def _torch(self) -> dict[str, Any]:
        """The torch views made so far (``{}`` before the first use): see :mod:`.logits`."""
        return self._outputs.torch
