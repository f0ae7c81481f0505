"""ControllerBatch: the controllers of one decode batch, stepped in parallel, zero-copy.

The batch owns four shared regions: the token bitmask ``[capacity, ceil(V/32)]`` (int32,
the layout llguidance and xgrammar use), the bias ``[capacity, V]`` (float32), the step
records and a control region. Every sequence gets a slot; its controller (one wasm guest)
has the slot's rows lent into its own memory, so what it writes *is* the batch tensor.

One :meth:`ControllerBatch.step` writes the sampled tokens into the step records, runs
every controller in parallel (threads: wasm calls release the GIL; or worker processes
woken by a futex in shared memory, where constrained sequences run as well, so their
llguidance work is not serialised by one GIL), checks each result, and returns them. Then
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
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from .._engine import child_env
from .._framing import recv_message, send_message
from ..errors import GuestError, WasmshareError
from . import _futex
from . import _layout as L
from ._protocol import CMD_MESSAGE, CMD_STEP
from .constraints import (
    Backend,
    ConstraintError,
    ConstraintInstance,
    ConstraintSpec,
    compile_constraint,
    parse_backend,
)
from .controller import (
    BatchRegions,
    Controller,
    ControllerInstance,
    fail_instance,
    module_path_or_bytes,
)
from .limits import Limits
from .tokens import TokenTable

if TYPE_CHECKING:
    import torch

__all__ = [
    "ControllerBatch",
    "StepResult",
    "BatchStep",
    "SequenceFailed",
    "BatchFull",
    "Action",
    "Output",
    "RowOutput",
]

Mode = Literal["threads", "workers"]

# Constrained sequences carry a Controller record only for its name; it is never instantiated.
_CONSTRAINT_PLACEHOLDER = b"\0asm\x01\0\0\0"

# A sparse bias is validated every step (its ids index the logits), so it counts as unusual.
_ORDINARY_LIMITS = np.array([L.ACTION_STOP, L.OUTPUT_BIAS, 0, 0], dtype=np.uint32)
_SMALL_BATCH = 32  # up to this many sequences, per-step checks run on Python lists
_SPIN_S = 300e-6  # the engine polls a worker's done word this long before sleeping

PROBE_EVERY = 64
"""Thread mode re-measures the slower of inline and pooled runs every this many steps."""


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
    SPARSE_BIAS = "sparse_bias"


_OUTPUTS = {
    L.OUTPUT_NONE: Output.NONE,
    L.OUTPUT_BITMASK: Output.BITMASK,
    L.OUTPUT_BIAS: Output.BIAS,
    L.OUTPUT_SPARSE_BIAS: Output.SPARSE_BIAS,
}
_ACTIONS = {L.ACTION_CONTINUE: Action.CONTINUE, L.ACTION_STOP: Action.STOP}


class SequenceFailed(GuestError):
    """A sequence's controller failed; the sequence ended. ``cause`` says how (trap, limit, ...)."""

    def __init__(self, message: str, *, guest: str | None, sequence: int | None, cause: str) -> None:
        super().__init__(message, guest=guest, sequence=sequence)
        self.cause = cause


class BatchFull(WasmshareError):
    """Every slot of the batch is taken."""


class StepResult(NamedTuple):
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


_ACTION_BY_CODE = (Action.CONTINUE, Action.STOP, Action.ERROR)
_OUTPUT_BY_CODE = (Output.NONE, Output.BITMASK, Output.BIAS, Output.SPARSE_BIAS)
ACTION_ERROR_CODE = 2


class BatchStep:
    """The results of one :meth:`ControllerBatch.step`, in slot order.

    The per-sequence outcome is held as arrays (``sequence_ids``, ``slots``,
    ``action_codes``: 0 continue / 1 stop / 2 error, ``output_codes``: 0 none / 1 bitmask /
    2 bias / 3 sparse bias), which is what an engine loop consumes; :attr:`results` builds
    :class:`StepResult` objects on first use. Only the sequences with fast-forward,
    backtrack, a sparse bias (checked every step) or an error carry a StepResult from the
    start (:attr:`special`).
    """

    def __init__(
        self,
        sequence_ids: np.ndarray[Any, Any],
        slots: np.ndarray[Any, Any],
        action_codes: np.ndarray[Any, Any],
        output_codes: np.ndarray[Any, Any],
        special: dict[int, StepResult],
        elapsed_us: float,
        controller_us: float,
    ) -> None:
        self.sequence_ids = sequence_ids
        self.slots = slots
        self.action_codes = action_codes
        self.output_codes = output_codes
        self.special = special
        self.elapsed_us = elapsed_us
        """Wall time of the whole step (bookkeeping included), µs."""
        self.controller_us = controller_us
        """Wall time of the controller phase alone, µs."""
        self._results: dict[int, StepResult] | None = None

    @property
    def sequences(self) -> tuple[int, ...]:
        """The sequence ids, in the order of the arrays (slot order)."""
        return tuple(self.sequence_ids.tolist())

    @property
    def outputs(self) -> tuple[Output, ...]:
        return tuple(_OUTPUT_BY_CODE[c] for c in self.output_codes.tolist())

    @property
    def results(self) -> dict[int, StepResult]:
        """Every sequence's :class:`StepResult`, by sequence id."""
        if self._results is None:
            results: dict[int, StepResult] = {}
            for sid, action, output in zip(
                self.sequence_ids.tolist(), self.action_codes.tolist(), self.output_codes.tolist()
            ):
                special = self.special.get(sid)
                results[sid] = (
                    special
                    if special is not None
                    else StepResult(sid, _ACTION_BY_CODE[action], _OUTPUT_BY_CODE[output])
                )
            self._results = results
        return self._results

    @property
    def failed(self) -> list[StepResult]:
        """The results whose sequence ended with an error."""
        return [r for r in self.special.values() if r.action is Action.ERROR]


@dataclass
class PreparedOutputs:
    """A step's masks and biases as tensors (see :meth:`ControllerBatch.prepare`)."""

    sequence_ids: tuple[int, ...]
    additive: Any  # float32 [n, width]: -inf where a mask forbids a token, plus the biases; or None


class RowOutput:
    """One sequence's mask or bias of a step, in the form that is cheapest to apply to its row.

    A mask is held as a private copy of its bitmask words (``words``, uint32; bits past the
    vocabulary cleared), so it outlives the next step. :meth:`allows` tests one token (a
    word and a bit), so a sampler can draw from the unmasked row first and look at the
    mask as a whole only when the draw is forbidden. When the mask allows at most half the
    vocabulary, :attr:`allowed` holds those ids (sorted; empty when it allows nothing):
    they are cheap to find then, as every allowed id sits in one of the few non-zero
    words; it is worked out on first use. Otherwise :meth:`forbidden` lists the forbidden
    ids. A bias is ``bias``, a float32 ``[V]`` view of the sequence's bias slot in the
    shared region (no copy), valid until the batch steps again. A sparse bias is
    ``sparse_bias``: int64 token ids and their float32 values (copies, ``n_bias`` long),
    each value added to its id's logit (a repeated id adds up).

    A *deferred* mask (a constraint's, when the step was asked to defer it) is not computed
    yet: :meth:`allows` asks the constraint about the one token, and the mask is computed
    (into the shared row, then copied) only when :attr:`allowed`, :meth:`forbidden` or
    :attr:`words` is needed. Like a bias view, it is valid until the batch steps again.
    """

    __slots__ = ("_words", "bias", "sparse_bias", "vocab_size", "_allowed", "_analysed", "_check", "_load")

    def __init__(
        self,
        vocab_size: int,
        *,
        words: np.ndarray[Any, Any] | None = None,
        bias: np.ndarray[Any, Any] | None = None,
        sparse_bias: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None,
        check: Callable[[int], bool] | None = None,
        load: Callable[[], np.ndarray[Any, Any]] | None = None,
    ) -> None:
        if (check is None) != (load is None):
            raise ValueError("a deferred mask needs both check and load")
        self.vocab_size = vocab_size
        self._words = words
        self.bias = bias
        self.sparse_bias = sparse_bias
        self._check = check
        self._load = load
        self._allowed: np.ndarray[Any, Any] | None = None
        self._analysed = words is None and load is None

    @property
    def words(self) -> np.ndarray[Any, Any] | None:
        """The mask's private uint32 words (computed now if deferred); None for a bias."""
        if self._load is not None:
            self._words = self._load()
            self._load = self._check = None
        return self._words

    @property
    def deferred(self) -> bool:
        """True while a deferred mask has not been computed."""
        return self._load is not None

    @property
    def allowed(self) -> np.ndarray[Any, Any] | None:
        """Sorted int64 ids the mask allows, when it allows at most half the vocabulary;
        else None (and always None for a bias). Computed on first use (a popcount of the
        row, then its non-zero words), then kept."""
        if not self._analysed:
            words = self.words
            assert words is not None
            if int(np.bitwise_count(words).sum()) * 2 <= self.vocab_size:
                self._allowed = _set_bit_ids(words, self.vocab_size)
            self._analysed = True
        return self._allowed

    @property
    def analysed(self) -> bool:
        """True once :attr:`allowed` has been worked out (always for a bias)."""
        return self._analysed

    def allows(self, token: int) -> bool:
        """True when the mask allows ``token`` (always for a bias)."""
        if self._check is not None:
            return 0 <= token < self.vocab_size and self._check(token)
        words = self._words
        if words is None:
            return True
        return 0 <= token < self.vocab_size and bool((int(words[token >> 5]) >> (token & 31)) & 1)

    def forbidden(self) -> np.ndarray[Any, Any]:
        """Sorted int64 ids ``< V`` the mask forbids (empty for a bias)."""
        words = self.words
        if words is None:
            return np.empty(0, dtype=np.int64)
        return _set_bit_ids(~words, self.vocab_size)


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
        self._mask_rows = self.regions.mask_rows()
        self._bias_rows = self.regions.bias_rows()
        self._mask_rows[:] = -1
        self._run_flags = self.regions.run_flags()
        self._step_words = self.regions.step_words()
        self._status_words = self.regions.status_words()
        self._status_elapsed = self.regions.status_elapsed_ns()
        self._token_areas = [self.regions.token_area(slot) for slot in range(capacity)]
        self._result_records = [self.regions.result_record(slot)[0] for slot in range(capacity)]
        self._status_records = [self.regions.status_record(slot)[0] for slot in range(capacity)]
        self._sequences: dict[int, _Sequence] = {}
        self._free_slots = list(range(capacity - 1, -1, -1))
        self._next_id = 0
        self._slot_output = np.zeros(capacity, dtype=np.int8)
        self._steps = np.zeros(capacity, dtype=np.int64)  # per slot: the next step number
        self._lengths = np.zeros(capacity, dtype=np.int64)  # per slot: tokens in the sequence
        self._sequence_ids = np.full(capacity, -1, dtype=np.int64)
        self._ones = np.ones(capacity, dtype=np.int64)
        self._order_cache: (
            tuple[list[_Sequence], np.ndarray[Any, Any], slice | np.ndarray[Any, Any]] | None
        ) = None
        self._calls_cache: list[list[ControllerInstance | ConstraintInstance]] | None = None
        self._run_cost = [0.0, 0.0]
        self._runs = 0
        self._force_parallel = parallel
        self.grammar_backend: Backend = parse_backend(grammar_backend)
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._workers: list[_WorkerHandle] = []
        self._torch: dict[str, Any] = {}
        self._copy_event: Any = None
        self._last_step: BatchStep | None = None
        self._deferred: dict[int, ConstraintInstance] = {}  # slot -> constraint whose mask waits
        # slot -> the last sparse bias that passed validation, copied out of the guest's slot
        # then (the guest may write its slot again before the pairs are applied)
        self._sparse_pairs: dict[int, tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]] = {}
        # slot -> why its worker's sequences ended when the worker died outside a step; the
        # next step reports it (a step resets every stepped slot's status first)
        self._lost: dict[int, str] = {}
        self._flagged: list[ConstraintInstance] = []  # constraints told to defer at the last step
        self._generation = 0  # steps so far: a deferred RowOutput answers for its own step only
        if mode == "threads":
            self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="wasmshare-ctrl")
        else:
            self._workers = [_WorkerHandle(self, i) for i in range(n)]

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

    def mask_tensor(self) -> torch.Tensor:
        """Zero-copy torch view of :attr:`mask` (CPU; page-locked when CUDA is available).

        Rows whose mask the last step deferred are stale until :meth:`fill_deferred_masks`."""
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
        seq = _Sequence(sequence_id, slot, controller)
        try:
            self._reset_slot(slot)
            area = self.regions.token_area(slot)
            area[: tokens.size] = tokens
            area.view(np.uint8)[arg_offset : arg_offset + len(arg)] = np.frombuffer(arg, np.uint8)
            lane = self._constraint_lane() if compiled is not None else -1
            if lane >= 0:
                # Worker processes each have their own GIL: constrained sequences spread over
                # them and this thread compute their masks truly in parallel, still in place
                # in the shared rows.
                assert spec is not None
                seq.worker = lane
                self._workers[lane].constrain(seq, spec)
            elif compiled is not None:
                seq.instance = ConstraintInstance(compiled, self.regions, slot, sequence_id)
                seq.instance.create(int(tokens.size), arg_offset, len(arg))
            elif self.mode == "threads":
                seq.instance = ControllerInstance(
                    controller, self.regions, slot, sequence_id, self.limits, tokenizer=self.token_table
                )
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
        best = min(range(self.n_workers - 1), key=lambda w: len(self._workers[w].slots))
        return best if len(self._workers[best].slots) < local else -1

    def remove(self, sequence_id: int) -> None:
        """End a sequence: tear its controller down and free its slot."""
        seq = self._get(sequence_id)
        del self._sequences[sequence_id]
        self._drop(seq)

    def _drop(self, seq: _Sequence) -> None:
        self._deferred.pop(seq.slot, None)
        self._lost.pop(seq.slot, None)
        if seq.instance is not None:
            seq.instance.close()
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

    def _reset_slot(self, slot: int) -> None:
        """The safe value of a slot: every token allowed, no bias."""
        self._mask_rows[slot] = -1
        self._bias_rows[slot] = 0.0
        self._sparse_pairs.pop(slot, None)

    # -- stepping -----------------------------------------------------------------------------------

    def step(
        self,
        sampled: Mapping[int, Sequence[int]] | np.ndarray[Any, Any] | Sequence[int] | None = None,
        *,
        only: Iterable[int] | None = None,
        defer_masks: Container[int] = (),
    ) -> BatchStep:
        """Run every live controller once, in parallel where it pays.

        ``sampled`` gives the tokens sampled since each sequence's last step: a mapping
        ``{sequence_id: [tokens]}`` (missing: none, as at step 0), or — the fast form for
        an engine loop — one token per sequence as an int array aligned with
        :attr:`sequences` (-1: none). Returns a :class:`BatchStep`; failed sequences are
        removed from the batch (their action is ERROR). ``only`` restricts the step to some
        sequences (the others keep their state and their rows); ``sampled`` must then be a
        mapping over those.

        ``defer_masks``: sequence ids whose *constraint* masks are left uncomputed (threads
        mode, llguidance constraints; others compute theirs as usual; worker mode computes
        every mask). A greedy sampler
        mostly draws a token the mask allows, and asking the constraint about that one token
        costs under a microsecond where a mask costs tens to hundreds:
        :meth:`row_outputs` hands such rows out as deferred :class:`RowOutput` s, which
        compute the mask only when it is needed. :meth:`prepare` and :meth:`apply` compute
        the deferred masks they read; :meth:`fill_deferred_masks` computes them all (say,
        before reading :attr:`mask` directly).

        The bookkeeping is vectorised over the step region, so the engine-side cost per
        sequence is well under the cost of the controller call itself.
        """
        self._require_open()
        started = time.perf_counter()
        if self._copy_event is not None:
            self._copy_event.synchronize()  # the device copy of the last masks has finished
            self._copy_event = None
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
        counts = self._write_sampled(sampled, order, slots, index)
        words = self._step_words
        self._lengths[index] += counts
        steps = self._steps[index]
        words[index, L.W_STEP] = steps
        words[index, L.W_N_TOKENS] = counts
        words[index, L.W_RESULT : L.W_RESULT + 6] = L.RESULT_RESET
        self._status_words[index, 0] = L.STATUS_OK  # runners write only failures
        if self._lost:
            from .controller import write_status

            for seq in order:
                message = self._lost.get(seq.slot)
                if message is not None:
                    write_status(self._status_records[seq.slot], L.STATUS_HOST_ERROR, 0, message)
        self._generation += 1
        self._mark_deferred(order, defer_masks, partial=only is not None)
        phase_start = time.perf_counter()
        if self.mode == "threads":
            # A sequence's first step may do one-off work (an engine computes a joining
            # constraint's first mask and defers the later ones): not a fair sample of the cost.
            self._run_threads(order, measure=bool(steps.all())) if only is None else _run_chunk(
                [seq.instance for seq in order if seq.instance is not None]
            )
        else:
            self._run_flags[index] = 1
            self._run_workers(order)
            self._run_flags[index] = 0
        controller_us = (time.perf_counter() - phase_start) * 1e6
        steps += 1
        self._steps[index] = steps
        for instance in self._flagged:
            if instance.mask_deferred:
                self._deferred[instance.slot] = instance
        self._last_step = self._collect_all(order, slots, index, started, controller_us)
        return self._last_step

    def _mark_deferred(self, order: list[_Sequence], defer_masks: Container[int], *, partial: bool) -> None:
        """Tell the constraints of ``defer_masks`` to leave this step's mask uncomputed.

        Every flag of an earlier step is cleared first, stepped now or not. The stepped
        sequences' waiting masks are forgotten (they are about to move on); with ``partial``
        (a step with ``only=``) the others' stay, as their state does."""
        for flagged in self._flagged:
            flagged.defer_mask = False
        self._flagged = []
        if not partial:
            self._deferred.clear()
        elif self._deferred:
            for seq in order:
                self._deferred.pop(seq.slot, None)
        if not defer_masks or self.mode != "threads":
            return
        for seq in order:
            instance = seq.instance
            if (
                isinstance(instance, ConstraintInstance)
                and instance.can_defer
                and seq.sequence_id in defer_masks
            ):
                instance.defer_mask = True
                self._flagged.append(instance)

    def fill_deferred_masks(self, slots: Iterable[int] | None = None) -> None:
        """Compute the last step's deferred masks (of ``slots``, default all) into the bitmask."""
        if not self._deferred:
            return
        for slot in list(self._deferred) if slots is None else slots:
            instance = self._deferred.pop(int(slot), None)
            if instance is not None:
                instance.fill_mask()

    def _deferred_output(self, slot: int, instance: ConstraintInstance) -> RowOutput:
        """A RowOutput for a deferred mask, valid until the next step (then it raises)."""
        generation = self._generation

        def current() -> None:
            if self._generation != generation or self._closed:
                raise WasmshareError("a deferred mask is only valid until the batch steps again")

        def check(token: int) -> bool:
            current()
            return instance.allows(token)

        def load() -> np.ndarray[Any, Any]:
            current()
            return self._load_deferred(slot)

        return RowOutput(self.vocab_size, check=check, load=load)

    def deferred_mask_error(self, sequence_id: int) -> str | None:
        """Why a deferred mask computed on demand allows nothing (the constraint's error), if it failed."""
        seq = self._sequences.get(sequence_id)
        instance = seq.instance if seq is not None else None
        return instance.mask_error if isinstance(instance, ConstraintInstance) else None

    def _load_deferred(self, slot: int) -> np.ndarray[Any, Any]:
        """Compute one deferred mask and return a private copy of its words."""
        self.fill_deferred_masks((slot,))
        words: np.ndarray[Any, Any] = self._private_mask_words([slot])[0]
        return words

    def _private_mask_words(self, slots: Sequence[int] | np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """A copy of the mask rows of ``slots`` as uint32 words, bits past the vocabulary cleared."""
        words = self._mask_rows.view(np.uint32)[slots]  # fancy indexing: a private copy
        if self.vocab_size % 32:
            words[:, -1] &= np.uint32((1 << (self.vocab_size % 32)) - 1)
        return words

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
            self._calls_cache = None
        return self._order_cache

    def _invalidate_order(self) -> None:
        self._order_cache = None
        self._calls_cache = None

    def _write_sampled(
        self,
        sampled: Any,
        order: list[_Sequence],
        slots: np.ndarray[Any, Any],
        index: slice | np.ndarray[Any, Any],
    ) -> np.ndarray[Any, Any]:
        if sampled is None:
            return np.zeros(len(order), dtype=np.int64)
        if not isinstance(sampled, np.ndarray) and isinstance(sampled, Mapping):
            counts = np.zeros(len(order), dtype=np.int64)
            position = {seq.sequence_id: i for i, seq in enumerate(order)}
            for sid, new in sampled.items():
                i = position.get(sid)
                if i is None:
                    raise WasmshareError(
                        f"sampled tokens for a sequence not in the batch (or not stepped): {sid}"
                    )
                self._write_tokens(order[i], new)
                counts[i] = len(new)
            return counts
        tokens = np.asarray(sampled)
        if tokens.shape != (len(order),) or tokens.dtype.kind not in "iu":
            raise WasmshareError(
                f"one sampled token id per live sequence expected: shape ({len(order)},) ints, "
                f"got shape {tokens.shape} {tokens.dtype}"
            )
        if not tokens.size:
            return np.zeros(0, dtype=np.int64)
        values = tokens.tolist()  # one call; two numpy reductions cost ~20x more on a cold path
        low, high = min(values), max(values)
        if high >= self.vocab_size or low < -1:
            raise WasmshareError(f"token ids must be in [0, {self.vocab_size}) (or -1 for none)")
        words = self._step_words
        if low >= 0:  # every sequence got one token: the common case, one store
            words[index, L.W_TOKENS] = tokens
            return self._ones[: len(order)]
        if len(values) <= _SMALL_BATCH:  # some got none (fast-forwarded): a few scalar stores
            for slot, token in zip(slots.tolist(), values):
                if token >= 0:
                    words[slot, L.W_TOKENS] = token
            return np.array([token >= 0 for token in values], dtype=np.int64)
        present = tokens >= 0
        words[slots[present], L.W_TOKENS] = tokens[present]
        return present.astype(np.int64)

    def _write_tokens(self, seq: _Sequence, new: Sequence[int]) -> None:
        tokens = np.asarray(new, dtype=np.int64)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise WasmshareError(f"sequence {seq.sequence_id}: token ids must be in [0, {self.vocab_size})")
        area = self._token_areas[seq.slot]
        if tokens.size > area.size:
            raise WasmshareError(f"sequence {seq.sequence_id}: {tokens.size} tokens exceed the step slot")
        area[: tokens.size] = tokens

    def _collect_all(
        self,
        order: list[_Sequence],
        slots: np.ndarray[Any, Any],
        index: slice | np.ndarray[Any, Any],
        started: float,
        controller_us: float,
    ) -> BatchStep:
        # action, output, backtrack, n_ff as uint32: one comparison against the largest
        # ordinary values finds every sequence that needs a closer look (a negative action
        # or output reads as a huge unsigned value).
        header = self._step_words[index, L.W_RESULT + 1 : L.W_RESULT + 5]
        status = self._status_words[index, 0]
        if len(order) <= _SMALL_BATCH:  # a few list operations beat a chain of numpy calls
            candidates = [
                i
                for i, ((a, o, b, f), st) in enumerate(zip(header.tolist(), status.tolist()))
                if a > L.ACTION_STOP or o > L.OUTPUT_BIAS or b or f or st != L.STATUS_OK
            ]
        else:
            unusual = (header > _ORDINARY_LIMITS).any(axis=1)
            unusual |= status != L.STATUS_OK
            candidates = np.flatnonzero(unusual).tolist() if unusual.any() else []
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
        """Run the controllers on this thread, or spread over the pool, whichever is faster.

        A trivial controller call costs about a microsecond, less than handing work to
        another thread and contending for the GIL around it, while controllers that
        compute for longer run in parallel (wasm calls release the GIL). The batch measures
        both ways on its own workload and keeps the faster, probing the other now and then;
        a step run with ``measure=False`` counts for neither.
        """
        assert self._pool is not None
        if self._calls_cache is None:
            n = self.n_workers
            chunks: list[list[ControllerInstance | ConstraintInstance]] = [[] for _ in range(n)]
            for i, seq in enumerate(order):
                assert seq.instance is not None
                chunks[i % n].append(seq.instance)
            self._calls_cache = [c for c in chunks if c]
            self._run_cost = [0.0, 0.0]  # EWMA µs of a step run inline, and on the pool
        chunks = self._calls_cache
        if not chunks:
            return
        parallel = self._choose_parallel(len(chunks))
        started = time.perf_counter()
        if not parallel:
            for chunk in chunks:
                _run_chunk(chunk)
        else:
            futures = [self._pool.submit(_run_chunk, c) for c in chunks[1:]]
            _run_chunk(chunks[0])  # the calling thread works too
            for f in futures:
                f.result()
        if not measure:
            return
        cost = (time.perf_counter() - started) * 1e6
        previous = self._run_cost[parallel]
        self._run_cost[parallel] = cost if previous == 0.0 else 0.8 * previous + 0.2 * cost

    def _choose_parallel(self, n_chunks: int) -> bool:
        if n_chunks < 2:
            return False
        if self._force_parallel is not None:
            return self._force_parallel
        self._runs += 1
        inline, pooled = self._run_cost
        if inline == 0.0 or pooled == 0.0:
            return inline != 0.0  # measure each way once
        best = pooled < inline
        return (not best) if self._runs % PROBE_EVERY == 0 else best

    def _run_workers(self, order: list[_Sequence]) -> None:
        busy = sorted({seq.worker for seq in order if seq.worker >= 0})
        for w in busy:
            self._workers[w].start_step()
        local = [seq.instance for seq in order if seq.worker < 0 and seq.instance is not None]
        if local:  # constrained sequences run here while the workers run their controllers
            _run_chunk(local)
        for w in busy:
            self._workers[w].finish_step(self.limits)

    def _status_failure(self, seq: _Sequence, what: str) -> SequenceFailed | None:
        status = self._status_records[seq.slot]
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
            guest=seq.controller.label,
            sequence=seq.sequence_id,
            cause=cause,
        )

    def _collect(self, seq: _Sequence) -> StepResult:
        failure = self._status_failure(seq, "ws_ctrl_step")
        if failure is None:
            failure, result = self._validate(seq)
            if failure is None and result is not None:
                return result
        assert failure is not None
        self._reset_slot(seq.slot)  # a half-written mask is never applied
        return StepResult(seq.sequence_id, Action.ERROR, error=failure)

    def _validate(self, seq: _Sequence) -> tuple[SequenceFailed | None, StepResult | None]:
        record = self._result_records[seq.slot]
        action, output = int(record["action"]), int(record["output"])
        backtrack, n_ff = int(record["backtrack"]), int(record["n_ff"])
        problem = None
        if action not in (L.ACTION_CONTINUE, L.ACTION_STOP):
            problem = f"action {action} is not WS_CONTINUE or WS_STOP"
        elif output not in _OUTPUTS:
            problem = f"output {output} is not a WS_OUTPUT_* value"
        elif n_ff > L.MAX_FF_TOKENS:
            problem = f"n_ff {n_ff} exceeds WS_MAX_FF_TOKENS ({L.MAX_FF_TOKENS})"
        elif backtrack > int(self._lengths[seq.slot]):
            problem = f"backtrack {backtrack} exceeds the sequence length {int(self._lengths[seq.slot])}"
        elif output == L.OUTPUT_SPARSE_BIAS:
            problem = self._take_sparse_bias(seq.slot, int(record["n_bias"]))
        ff = record["ff_tokens"][:n_ff] if problem is None else np.empty(0, np.uint32)
        if problem is None and ff.size and int(ff.max()) >= self.vocab_size:
            problem = f"fast-forward token {int(ff.max())} is outside the vocabulary ({self.vocab_size})"
        if problem is not None:
            return SequenceFailed(
                f"controller '{seq.controller.label}' seq {seq.sequence_id}: invalid step result: {problem}",
                guest=seq.controller.label,
                sequence=seq.sequence_id,
                cause="invalid result",
            ), None
        return None, StepResult(
            seq.sequence_id,
            Action.STOP if action == L.ACTION_STOP else Action.CONTINUE,
            _OUTPUTS[output],
            backtrack,
            tuple(int(t) for t in ff),
            None,
        )

    def _take_sparse_bias(self, slot: int, n_bias: int) -> str | None:
        """Check the sparse bias of ``n_bias`` entries in ``slot`` and, when valid, copy its
        pairs out of the slot for :meth:`_sparse_bias` (a repeated id summed into one entry,
        so every device adds them alike). Returns why it is invalid, or None."""
        if n_bias > self.vocab_size // 2:
            return f"n_bias {n_bias} exceeds vocab_size / 2 ({self.vocab_size // 2})"
        row = self._bias_rows[slot]
        ids = row.view(np.uint32)[:n_bias].astype(np.int64)
        if n_bias and int(ids.max()) >= self.vocab_size:
            return f"sparse bias token {int(ids.max())} is outside the vocabulary ({self.vocab_size})"
        half = self.vocab_size // 2
        values = row[half : half + n_bias].copy()
        unique, inverse = np.unique(ids, return_inverse=True)
        if unique.size != ids.size:
            summed = np.zeros(unique.size, dtype=np.float32)
            np.add.at(summed, inverse, values)
            ids, values = unique, summed
        self._sparse_pairs[slot] = (ids, values)
        return None

    def _sparse_bias(self, slot: int) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """The slot's last validated sparse bias: int64 ids and their float32 values (copies
        taken at validation, never read from the guest's slot again)."""
        empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
        return self._sparse_pairs.get(slot, empty)

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
            self._torch = views
        return self._torch

    def apply(
        self, logits: torch.Tensor, step: BatchStep | None = None, *, sequences: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Apply the last step's masks and biases to ``logits`` in place and return it.

        Row ``i`` of ``logits`` ([n, V'] with V' ≥ V; extra columns are masked when a mask
        applies) belongs to ``step.sequences[i]`` (default: the last step's order), or to
        ``sequences[i]`` when given (each with what its controller last wrote). Masked
        tokens get ``-inf``; biases are added. Works on CPU and CUDA tensors; on CUDA the
        page-locked rows are copied without blocking and the next :meth:`step` waits for
        the copy before controllers write again. (The engine samples from
        :meth:`row_outputs` instead on CPU; applying a mask that forbids tens of thousands
        of ids row by row was slower than this one dense pass.)
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
        copy_event = None
        if logits.device.type == "cuda" and prepared.additive is not None:
            import torch

            copy_event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copy_event.record()
        self._copy_event = copy_event
        return logits

    def prepare(self, step: BatchStep, width: int, device: Any = "cpu") -> PreparedOutputs:
        """Turn a step's masks and biases into one additive tensor, ready to apply to the logits.

        Each bitmask byte is looked up in a 256×8 table of 0 / -inf (one gather, no
        per-bit unpacking or boolean fill, about ten times faster than ``masked_fill``); the
        biases are added to the same tensor, so :meth:`apply_prepared` is a single in-place
        add. Columns past the vocabulary are forbidden when a row has a mask.
        """
        import torch

        views = self._torch_views()
        codes = step.output_codes
        n = len(step.sequence_ids)
        additive = None
        mask_idx = np.flatnonzero(codes == L.OUTPUT_BITMASK)
        bias_idx = np.flatnonzero(codes == L.OUTPUT_BIAS)
        sparse_idx = np.flatnonzero(codes == L.OUTPUT_SPARSE_BIAS)
        if mask_idx.size:
            if self._deferred:
                self.fill_deferred_masks(step.slots[mask_idx].tolist())
            rows = views["mask"].index_select(0, torch.from_numpy(step.slots[mask_idx]))
            if mask_idx.size == n:
                words = rows
            else:  # rows without a mask allow everything
                words = torch.full((n, self.regions.mask_words), -1, dtype=torch.int32)
                words.index_copy_(0, torch.from_numpy(mask_idx), rows)
            words = words.to(device, non_blocking=True)
            additive = _mask_to_additive(words, _byte_table(device), width)
            if width > self.vocab_size:  # past the vocabulary: forbidden under a mask, else untouched
                additive[:, self.vocab_size :] = float("-inf")
                if mask_idx.size != n:
                    others = np.setdiff1d(np.arange(n), mask_idx)
                    additive[torch.from_numpy(others).to(device), self.vocab_size :] = 0.0
        if bias_idx.size or sparse_idx.size:
            bias = torch.zeros((n, self.vocab_size), dtype=torch.float32)
            if bias_idx.size:
                bias[torch.from_numpy(bias_idx)] = views["bias"].index_select(
                    0, torch.from_numpy(step.slots[bias_idx])
                )
            for i in sparse_idx.tolist():
                ids, values = self._sparse_bias(int(step.slots[i]))
                bias[i].index_add_(0, torch.from_numpy(ids), torch.from_numpy(values))
            bias = bias.to(device, non_blocking=True)
            if additive is None:
                additive = torch.zeros((n, width), dtype=torch.float32, device=device)
            additive[:, : self.vocab_size] += bias
        return PreparedOutputs(tuple(int(s) for s in step.sequence_ids.tolist()), additive)

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
        outputs: dict[int, RowOutput] = {}
        vocab = self.vocab_size
        codes = step.output_codes.tolist()
        sequence_ids = step.sequence_ids.tolist()
        masked = [i for i, code in enumerate(codes) if code == L.OUTPUT_BITMASK]
        if masked and self._deferred and step is self._last_step:
            slots = step.slots.tolist()
            waiting = [i for i in masked if slots[i] in self._deferred]
            for i in waiting:
                slot, sid = slots[i], sequence_ids[i]
                out = outputs[sid] = self._deferred_output(slot, self._deferred[slot])
                if sid in analyse:
                    out.allowed  # noqa: B018 - computed now, off the caller's critical path
            masked = [i for i in masked if slots[i] not in self._deferred]
        if masked:
            words = self._private_mask_words(step.slots[masked])
            for k, i in enumerate(masked):
                out = outputs[sequence_ids[i]] = RowOutput(vocab, words=words[k])
                if sequence_ids[i] in analyse:
                    out.allowed  # noqa: B018 - worked out now, off the caller's critical path
        for i, code in enumerate(codes):
            if code == L.OUTPUT_BIAS:
                outputs[sequence_ids[i]] = RowOutput(vocab, bias=self._bias_rows[int(step.slots[i])])
            elif code == L.OUTPUT_SPARSE_BIAS:
                outputs[sequence_ids[i]] = RowOutput(vocab, sparse_bias=self._sparse_bias(int(step.slots[i])))
        return outputs

    def apply_prepared(
        self, logits: torch.Tensor, prepared: PreparedOutputs, rows: Sequence[int] | None = None
    ) -> None:
        """Apply :meth:`prepare`'s tensor to ``logits`` in place (one add).

        ``rows[i]`` is the row of ``logits`` for ``prepared.sequence_ids[i]`` (default: the
        same order, all rows).
        """
        import torch

        if prepared.additive is None:
            return
        additive = (
            prepared.additive
            if prepared.additive.dtype == logits.dtype
            else prepared.additive.to(logits.dtype)
        )
        if rows is None or list(rows) == list(range(logits.shape[0])):
            logits.add_(additive)
            return
        index = torch.tensor(list(rows), device=logits.device)
        logits.index_add_(0, index, additive)

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


def _run_chunk(instances: list[ControllerInstance | ConstraintInstance]) -> None:
    """Step each instance; an exception out of one (a host bug, not a guest fault, which the
    instances report themselves) ends that sequence alone through its status record."""
    for instance in instances:
        try:
            instance.step()
        except Exception as e:  # noqa: BLE001 - contained to the one sequence
            fail_instance(instance, e)


def _set_bit_ids(words: np.ndarray[Any, Any], limit: int) -> np.ndarray[Any, Any]:
    """Sorted int64 ids ``t < limit`` whose bit ``t % 32`` of ``words[t // 32]`` is set.

    Only the non-zero words are unpacked. Every search is a ``flatnonzero`` of a bool
    array, which numpy does several times faster than ``nonzero`` of integers.
    """
    flat = np.ascontiguousarray(words).reshape(-1)
    nonzero = np.flatnonzero(flat != 0)
    if not nonzero.size:
        return np.empty(0, dtype=np.int64)
    bits = np.unpackbits(flat[nonzero].view(np.uint8), bitorder="little")
    where = np.flatnonzero(bits.view(np.bool_))
    ids: np.ndarray[Any, Any] = nonzero[where >> 5] * 32 + (where & 31)
    return ids[: np.searchsorted(ids, limit)] if ids[-1] >= limit else ids


_BYTE_TABLES: dict[str, Any] = {}


def _byte_table(device: Any) -> torch.Tensor:
    """``[256, 8]`` float32: entry ``[b, k]`` is 0 when bit ``k`` of byte ``b`` is set, else -inf."""
    import torch

    key = str(device)
    table = _BYTE_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = torch.where(bits.bool(), 0.0, float("-inf")).to(torch.float32).to(device)
        _BYTE_TABLES[key] = table
    return table


def _mask_to_additive(words: torch.Tensor, table: torch.Tensor, width: int) -> torch.Tensor:
    """``[n, W]`` int32 bitmask words → ``[n, width]`` float32 of 0 (bit ``t % 32`` of word
    ``t // 32`` set) or -inf; columns past ``32 W`` are -inf."""
    import torch
    import torch.nn.functional as F

    n, w = words.shape
    as_bytes = words.contiguous().view(torch.uint8).view(n, w * 4).int()  # little-endian bytes
    additive = F.embedding(as_bytes, table).view(n, w * 32)
    if additive.shape[1] >= width:
        return additive[:, :width]
    pad = torch.full((n, width - additive.shape[1]), float("-inf"), device=additive.device)
    return torch.cat([additive, pad], dim=1)


_WORKER_GRACE_S = 10.0
"""How long past its controllers' deadlines a worker may take to answer a step."""


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
        env = child_env()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wasmshare.llm._worker", str(child.fileno()), str(self.index)],
            pass_fds=(child.fileno(),),
            env=env,
        )
        child.close()
        self.sock = parent
        regions = self.batch.regions
        limits = self.batch.limits
        table = self.batch.token_table
        send_message(
            parent,
            {
                "geometry": regions.geometry(),
                "limits": {
                    "deadline_ms": limits.deadline_ms,
                    "fuel": limits.fuel,
                    "memory_limit_bytes": limits.memory_limit_bytes,
                },
                "tokenizer": {
                    "sha256": table.sha256,
                    "vocab_size": table.vocab_size,
                    "eos_token": table.eos_token,
                    "name": table.name,
                },
            },
            (table.tokenizer_json or "").encode(),
        )
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
        words = self._words
        spin_until = time.perf_counter() + _SPIN_S
        while int(words[1]) != go and time.perf_counter() < spin_until:
            os.sched_yield()
        deadline = time.monotonic() + timeout_s
        while int(self._words[1]) != go:
            if self.process.poll() is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _futex.wait(self._done, int(self._words[1]), min(remaining, 0.05))
        return True

    def _message(
        self, message: dict[str, Any], payload: bytes = b"", timeout_s: float = 60.0
    ) -> dict[str, Any]:
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
            {
                "kind": "create",
                "slot": seq.slot,
                "sequence_id": seq.sequence_id,
                "name": seq.controller.label,
                "module": None if is_bytes else module,
                "module_is_bytes": is_bytes,
                "n_prompt": n_prompt,
                "arg_offset": arg_offset,
                "arg_len": arg_len,
            },
            module if isinstance(module, bytes) else b"",
        )
        if not reply.get("ok"):
            error_type = reply.get("type", "GuestError")
            from .. import errors

            cls = getattr(errors, error_type, GuestError)
            if not (isinstance(cls, type) and issubclass(cls, GuestError)):
                cls = GuestError
            raise cls(
                reply.get("error", "controller creation failed"),
                guest=seq.controller.label,
                sequence=seq.sequence_id,
            )
        self.slots.add(seq.slot)

    def constrain(self, seq: _Sequence, spec: ConstraintSpec) -> None:
        """Run a constrained sequence in this worker (compiled there, cached per process)."""
        reply = self._message(
            {
                "kind": "constrain",
                "slot": seq.slot,
                "sequence_id": seq.sequence_id,
                "spec_kind": spec.kind,
                "spec_source": spec.source,
            }
        )
        if not reply.get("ok"):
            raise ConstraintError(reply.get("error", "the worker could not compile the constraint"))
        self.slots.add(seq.slot)

    def remove(self, slot: int) -> None:
        if slot in self.slots:
            self.slots.discard(slot)
            if self.process.poll() is None:
                self._message({"kind": "remove", "slot": slot})

    def start_step(self) -> None:
        self._pending = self._bump(CMD_STEP)

    def finish_step(self, limits: Limits) -> None:
        # Every call a worker makes is bounded by its deadline (the epoch stops wasm, the host
        # functions check the rest), so a step takes at most the sum of its controllers'
        # deadlines; the grace covers a loaded machine's scheduling delays, where a worker can
        # wait seconds for a core, and still catches a worker that hangs.
        per_call = (limits.deadline_ms or 1000.0) / 1000
        timeout = 2 * per_call * max(1, len(self.slots)) + _WORKER_GRACE_S
        if not self._wait_done(self._pending, timeout):
            self._crashed(
                "died during a step"
                if self.process.poll() is not None
                else f"did not answer within {timeout:.1f} s"
            )

    def _crashed(self, what: str) -> None:
        """Fail this worker's sequences with a clear error, then restart it."""
        code = self.process.poll()
        if code is None:
            self.process.kill()
            code = self.process.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        message = (
            f"controller worker {self.index} (pid {self.process.pid}) {what} ({how}); its sequences ended"
        )
        regions = self.batch.regions
        from .controller import write_status

        for slot in self.slots:
            write_status(regions.status_record(slot)[0], L.STATUS_HOST_ERROR, 0, message)
            self.batch._lost[slot] = message  # reported by the next step if this one does not
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
