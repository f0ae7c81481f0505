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

import time
from collections.abc import Container, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import WasmshareError
from . import _layout as L
from . import _records
from ._late import StepCut
from ._slots import BatchSlots, SlotSequence
from ._threads import run_chunk
from .constraints import (
    ConstraintInstance,
)
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
    "StepCut",
    "StepResult",
]

_SMALL_BATCH = 32  # up to this many sequences, per-step writes and checks run on Python lists


class ControllerBatch(BatchSlots):
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

    # -- stepping -----------------------------------------------------------------------------------

    def step(
        self,
        sampled: Mapping[int, Sequence[int]] | np.ndarray[Any, Any] | Sequence[int] | None = None,
        *,
        only: Iterable[int] | None = None,
        defer_masks: Container[int] = (),
        cut: StepCut | None = None,
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

        ``cut`` (from :meth:`new_cut`) makes the step cuttable: every controller runs as a
        task of its own (:mod:`._late`), and once the cut is set (from any thread) the step
        returns with those that have answered. The others are listed in
        :attr:`BatchStep.late`: they keep running, no step may include them, and
        :meth:`collect_late` hands over their results when they answer. A sequence's hard
        limits (deadline, fuel) hold as ever; a late controller that overruns them fails
        in its late result.

        The bookkeeping is vectorised over the step region, so the engine-side cost per
        sequence stays below the cost of the controller call itself.
        """
        self._require_open()
        started = time.perf_counter()
        outputs = self._outputs
        if outputs.copy_event is not None:
            outputs.wait_for_copy()  # before controllers write the rows being copied again
        order, slots, index = self._order()
        running = self._flights.running
        if only is None and running:
            raise WasmshareError(
                f"sequences {sorted(running)} are still in a step that was cut: step the others "
                "with only=, and take their results with collect_late()"
            )
        if only is not None:
            chosen = set(only)
            for sid in chosen:
                self._get(sid)
                if sid in running:
                    raise WasmshareError(
                        f"sequence {sid} is still in a step that was cut: take its result with collect_late()"
                    )
            self._settle_busy_workers(chosen)
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
        running_slots = {f.slot for f in running.values()}
        outputs.new_step(
            order,
            defer_masks if self.mode == "threads" else (),
            partial=only is not None,
            running=running_slots,
        )
        phase_start = time.perf_counter()
        if cut is not None:
            return self._step_until_cut(order, index, steps, cut, started, phase_start)
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

    def new_cut(self, expendable: Iterable[int] = ()) -> StepCut:
        """A :class:`StepCut` for one cuttable :meth:`step`; it does not wait for ``expendable``."""
        return self._flights.new_cut(expendable)

    @property
    def late(self) -> frozenset[int]:
        """Sequences still in a step that was cut (see :meth:`step`)."""
        return frozenset(self._flights.running)

    def _step_until_cut(
        self,
        order: list[SlotSequence],
        index: slice | np.ndarray[Any, Any],
        steps: np.ndarray[Any, Any],
        cut: StepCut,
        started: float,
        phase_start: float,
    ) -> BatchStep:
        """The controller phase of a cuttable :meth:`step`: run each controller as its own
        task, return with those that answered by the cut; the others stay in flight."""
        self._steps[index] = steps + 1  # a late sequence is not stepped again before it answers
        self._run_flags[index] = 1  # read by worker processes only
        flights = self._flights.start(order)
        self._flights.wait(flights, cut)
        answered = [f for f in flights if self._flights.answered(f)]
        controller_us = (time.perf_counter() - phase_start) * 1e6
        self._land(answered)
        late = tuple(f.sequence_id for f in flights if f.sequence_id in self._flights.running)
        self._outputs.end_step(late={f.slot for f in self._flights.running.values()})
        landed = {f.sequence_id for f in answered}
        answered_order = [seq for seq in order if seq.sequence_id in landed]
        self._last_step = self._collect_subset(answered_order, started, controller_us)
        self._last_step.late = late
        return self._last_step

    def collect_late(
        self, *, wait: Iterable[int] = (), first: bool = False, timeout_s: float | None = None
    ) -> BatchStep | None:
        """The results of late sequences (see :meth:`step`) that have answered since; None if none.

        Waits first for those of ``wait`` still running (each at most its deadline; with
        ``first``, for any one of them; at most ``timeout_s`` when given). The results are
        read like a step's: :meth:`row_outputs`, :meth:`prepare` and :meth:`apply` take the
        returned step until the next :meth:`step`.
        """
        self._require_open()
        running = self._flights.running
        if not running:
            return None
        started = time.perf_counter()
        must = [running[sid] for sid in set(wait) if sid in running]
        if must:
            self._flights.wait(must, first=first, timeout_s=timeout_s)
        answered = [f for f in running.values() if self._flights.answered(f)]
        if not answered:
            return None
        landed = {f.sequence_id for f in self._land(answered)}
        self._outputs.settle_late(f.slot for f in answered)
        order = [seq for seq in self._order()[0] if seq.sequence_id in landed]
        self._last_late = self._collect_subset(order, started, 0.0)
        return self._last_late

    def _settle_busy_workers(self, chosen: Container[int]) -> None:
        """Before stepping ``chosen``: wait for the running steps of the workers they live on
        (a worker runs one step at a time; rare, as new sequences avoid busy workers)."""
        if self.mode != "workers" or not self._flights.running:
            return
        workers = {seq.worker for sid, seq in self._sequences.items() if sid in chosen and seq.worker >= 0}
        for flight in self._flights.finish_workers(workers):
            self._run_flags[flight.slot] = 0  # answered: the next step must not run it again

    def _collect_subset(self, order: list[SlotSequence], started: float, controller_us: float) -> BatchStep:
        """:meth:`_collect_all` over some sequences (in slot order)."""
        slots = np.array([seq.slot for seq in order], dtype=np.intp)
        return self._collect_all(order, slots, slots, started, controller_us)

    def fill_deferred_masks(self, slots: Iterable[int] | None = None) -> None:
        """Compute the last step's deferred masks (of ``slots``, default all) into the bitmask."""
        self._outputs.fill_deferred(slots)

    def deferred_mask_error(self, sequence_id: int) -> str | None:
        """Why a deferred mask computed on demand allows nothing (the constraint's error), if it failed."""
        seq = self._sequences.get(sequence_id)
        instance = seq.instance if seq is not None else None
        return instance.mask_error if isinstance(instance, ConstraintInstance) else None

    def _collect_all(
        self,
        order: list[SlotSequence],
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
        dropped: list[SlotSequence] = []
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

    def _run_threads(self, order: list[SlotSequence], *, measure: bool = True) -> None:
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

    def _run_workers(self, order: list[SlotSequence]) -> None:
        busy = sorted({seq.worker for seq in order if seq.worker >= 0})
        # constrained sequences run here while the workers run their controllers
        self._workers.step(
            busy, lambda: run_chunk([s.instance for s in order if s.worker < 0 and s.instance is not None])
        )

    def _collect(self, seq: SlotSequence) -> StepResult:
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
        latest = step is self._last_step or step is self._last_late
        return self._outputs.row_outputs(step, analyse=analyse, latest=latest)

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
        self._flights.close()  # no controller is torn down under a running call
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
