"""Writing a step's sampled tokens into the batch's step slots, vectorised where it can be.

An engine loop hands one token per sequence as an int array: the usual case is then one
store across every slot. The mapping form (any number of tokens per sequence, for joins,
fast-forwards and tests) writes each sequence's token area in turn. Every token id is
checked against the vocabulary before it reaches a guest. Used from the batch's thread only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import WasmshareError
from . import _layout as L
from ._regions import BatchRegions

__all__ = ["StepInputs"]


class _Stepped(Protocol):
    sequence_id: int
    slot: int


class StepInputs:
    """The step slots' token words of one batch, and the checked writes of sampled tokens."""

    def __init__(self, regions: BatchRegions) -> None:
        self.vocab_size = regions.vocab_size
        self.words = regions.step_words()
        self._token_areas = [regions.token_area(slot) for slot in range(regions.capacity)]
        self._ones = np.ones(regions.capacity, dtype=np.int64)

    def check_prompt(self, prompt: Sequence[int], arg: bytes) -> np.ndarray[Any, Any]:
        """``prompt`` as int64 ids, checked against the vocabulary and, with ``arg``, the slot size.

        Raises :class:`WasmshareError` naming the limit; nothing is written."""
        tokens = np.asarray(prompt, dtype=np.int64)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise WasmshareError(f"prompt token ids must be in [0, {self.vocab_size})")
        nbytes = self._token_areas[0].nbytes  # the same for every slot
        if tokens.size * 4 + len(arg) > nbytes:
            raise WasmshareError(
                f"prompt ({tokens.size} tokens) and argument ({len(arg)} bytes) exceed the "
                f"{nbytes}-byte step slot; raise step_slot_bytes"
            )
        return tokens

    def write_prompt(self, slot: int, tokens: np.ndarray[Any, Any], arg: bytes) -> int:
        """Write a checked prompt, then ``arg``, into ``slot``'s token area; returns the
        argument's byte offset in the area."""
        area = self._token_areas[slot]
        area[: tokens.size] = tokens
        arg_offset = tokens.size * 4
        area.view(np.uint8)[arg_offset : arg_offset + len(arg)] = np.frombuffer(arg, np.uint8)
        return int(arg_offset)

    def write_sampled(
        self,
        sampled: Any,
        order: Sequence[_Stepped],
        slots: np.ndarray[Any, Any],
        index: slice | np.ndarray[Any, Any],
        *,
        small_batch: int,
    ) -> np.ndarray[Any, Any]:
        """Write ``sampled`` (None, a mapping of token lists, or one id per sequence of ``order``,
        -1 for none) into the slots; returns the count of tokens per sequence of ``order``.

        ``slots`` and ``index`` are the slots of ``order`` as an array and as an index (a
        slice when contiguous); up to ``small_batch`` sequences, a partial array is written
        with scalar stores. Raises :class:`WasmshareError` for an id outside the vocabulary,
        a sequence not in ``order`` or a shape that does not match."""
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
                self.write_tokens(order[i], new)
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
        values = tokens.tolist()  # one call: cheaper than two numpy reductions on a cold path
        low, high = min(values), max(values)
        if high >= self.vocab_size or low < -1:
            raise WasmshareError(f"token ids must be in [0, {self.vocab_size}) (or -1 for none)")
        words = self.words
        if low >= 0:  # every sequence got one token: the common case, one store
            words[index, L.W_TOKENS] = tokens
            return self._ones[: len(order)]
        if len(values) <= small_batch:  # some got none (fast-forwarded): a few scalar stores
            for slot, token in zip(slots.tolist(), values):
                if token >= 0:
                    words[slot, L.W_TOKENS] = token
            return np.array([token >= 0 for token in values], dtype=np.int64)
        present = tokens >= 0
        words[slots[present], L.W_TOKENS] = tokens[present]
        return present.astype(np.int64)

    def write_tokens(self, seq: _Stepped, new: Sequence[int]) -> None:
        """Write one sequence's ``new`` tokens at the start of its slot's token area (checked)."""
        tokens = np.asarray(new, dtype=np.int64)
        if tokens.size == 0:
            return
        if tokens.min() < 0 or tokens.max() >= self.vocab_size:
            raise WasmshareError(f"sequence {seq.sequence_id}: token ids must be in [0, {self.vocab_size})")
        area = self._token_areas[seq.slot]
        if tokens.size > area.size:
            raise WasmshareError(f"sequence {seq.sequence_id}: {tokens.size} tokens exceed the step slot")
        area[: tokens.size] = tokens
