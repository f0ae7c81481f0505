"""The result types of a controller batch: what one step reports, per sequence and per row.

:class:`BatchStep` is what :meth:`~wasmshare.llm.batch.ControllerBatch.step` returns: the
outcome of every sequence as arrays an engine loop consumes without building objects, and
:class:`StepResult` objects on demand. :class:`RowOutput` is one sequence's mask or bias in
the form that is cheapest to apply to its row of logits. :class:`SequenceFailed` ends one
sequence; :class:`BatchFull` refuses a new one. Everything here is numpy only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ..errors import BatchFull, SequenceFailed

__all__ = [
    "ACTION_BY_CODE",
    "ACTION_ERROR_CODE",
    "Action",
    "BatchFull",
    "BatchStep",
    "OUTPUT_BY_CODE",
    "Output",
    "PreparedOutputs",
    "RowOutput",
    "SequenceFailed",
    "StepResult",
]


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


ACTION_BY_CODE = (Action.CONTINUE, Action.STOP, Action.ERROR)
"""Each :class:`Action` at the index of its code in :attr:`BatchStep.action_codes`."""
OUTPUT_BY_CODE = (Output.NONE, Output.BITMASK, Output.BIAS, Output.SPARSE_BIAS)
"""Each :class:`Output` at the index of its ``WS_OUTPUT_*`` code (:attr:`BatchStep.output_codes`)."""
ACTION_ERROR_CODE = 2
"""The action code of a sequence that ended with an error (not an ABI value: the batch's own)."""


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
        late: tuple[int, ...] = (),
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
        self.late = late
        """Sequences stepped but not answered when the step was cut (``step(cut=...)``): they
        are still running, have no result here, and answer in a later
        :meth:`ControllerBatch.collect_late`."""
        self._results: dict[int, StepResult] | None = None

    @property
    def sequences(self) -> tuple[int, ...]:
        """The sequence ids, in the order of the arrays (slot order)."""
        return tuple(self.sequence_ids.tolist())

    @property
    def outputs(self) -> tuple[Output, ...]:
        return tuple(OUTPUT_BY_CODE[c] for c in self.output_codes.tolist())

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
                    else StepResult(sid, ACTION_BY_CODE[action], OUTPUT_BY_CODE[output])
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
