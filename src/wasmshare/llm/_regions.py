"""The shared regions of one controller batch, and the views every runner reads them through.

The batch, its controller guests, its constraints and its worker processes all work on the
same pages; this module is the one description of where each slot's rows, records and
words sit in them, so the engine and a worker agree without sending any of it per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .._libc import page_round
from ..region import Region
from . import _layout as L

__all__ = ["BatchRegions", "SlotRunner", "fail_instance"]


@dataclass
class BatchRegions:
    """The shared regions of one batch and their geometry.

    * ``mask``: ``capacity`` rows of ``mask_words`` uint32, each row starting on a page
      (``mask_stride`` bytes apart) so it can be lent on its own;
    * ``bias``: ``capacity`` rows of ``vocab_size`` float32, ``bias_stride`` apart;
    * ``step``: ``capacity`` step slots of ``step_stride`` bytes (see ``_layout``);
    * ``control``: the worker blocks, the status records and the run flags (never lent to
      guests);
    * ``token_table``: the tokenizer's sealed token table.

    Each worker block (``WORKER_BLOCK_BYTES``) holds ``go``, ``done`` and ``command`` (u32)
    and, at byte 16, the u64 count of bytes the worker's guests have copied.
    """

    token_table: Region
    mask: Region
    bias: Region
    step: Region
    control: Region
    capacity: int
    vocab_size: int
    mask_stride: int
    bias_stride: int
    step_stride: int

    CONTROL_HEADER_BYTES = 4096
    WORKER_BLOCK_BYTES = 64
    WORKER_BYTES_COPIED_OFFSET = 16
    MAX_WORKERS = CONTROL_HEADER_BYTES // WORKER_BLOCK_BYTES

    @classmethod
    def create(
        cls, token_table: Region, vocab_size: int, capacity: int, step_slot_bytes: int
    ) -> BatchRegions:
        """New regions for ``capacity`` slots of a ``vocab_size`` vocabulary (the caller closes them)."""
        mask_stride = page_round(L.mask_words(vocab_size) * 4)
        bias_stride = page_round(vocab_size * 4)
        step_stride = page_round(step_slot_bytes)
        control_bytes = cls.CONTROL_HEADER_BYTES + capacity * L.STATUS_RECORD_BYTES + capacity
        return cls(
            token_table=token_table,
            mask=Region.create(capacity * mask_stride),
            bias=Region.create(capacity * bias_stride),
            step=Region.create(capacity * step_stride),
            control=Region.create(control_bytes),
            capacity=capacity,
            vocab_size=vocab_size,
            mask_stride=mask_stride,
            bias_stride=bias_stride,
            step_stride=step_stride,
        )

    @property
    def mask_words(self) -> int:
        """Words (uint32) of one mask row."""
        return L.mask_words(self.vocab_size)

    def geometry(self) -> dict[str, int]:
        """Everything but the regions, for handing the layout to a worker."""
        return {
            "capacity": self.capacity,
            "vocab_size": self.vocab_size,
            "mask_stride": self.mask_stride,
            "bias_stride": self.bias_stride,
            "step_stride": self.step_stride,
        }

    def mask_rows(self) -> np.ndarray[Any, Any]:
        """``[capacity, mask_words]`` int32 view of the mask region (rows page-strided)."""
        flat = self.mask.array(np.int32)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity, self.mask_words), strides=(self.mask_stride, 4), writeable=True
        )

    def bias_rows(self) -> np.ndarray[Any, Any]:
        """``[capacity, vocab_size]`` float32 view of the bias region."""
        flat = self.bias.array(np.float32)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity, self.vocab_size), strides=(self.bias_stride, 4), writeable=True
        )

    def input_record(self, slot: int) -> np.ndarray[Any, Any]:
        """The slot's ``ws_step_input`` (one :data:`~wasmshare.llm._layout.STEP_INPUT`)."""
        return self.step.array(L.STEP_INPUT, 1, offset=slot * self.step_stride + L.STEP_INPUT_OFFSET)

    def result_record(self, slot: int) -> np.ndarray[Any, Any]:
        """The slot's ``ws_step_result`` (one :data:`~wasmshare.llm._layout.STEP_RESULT`)."""
        return self.step.array(L.STEP_RESULT, 1, offset=slot * self.step_stride + L.STEP_RESULT_OFFSET)

    def token_area(self, slot: int) -> np.ndarray[Any, Any]:
        """The uint32 area of the slot that holds tokens, then argument bytes."""
        count = (self.step_stride - L.TOKENS_OFFSET) // 4
        return self.step.array(np.uint32, count, offset=slot * self.step_stride + L.TOKENS_OFFSET)

    def step_words(self) -> np.ndarray[Any, Any]:
        """``[capacity, step_stride / 4]`` uint32 view of every step slot (for vectorised access)."""
        return self.step.array(np.uint32).reshape(self.capacity, self.step_stride // 4)

    def status_words(self) -> np.ndarray[Any, Any]:
        """``[capacity, 5]`` int32 view of every slot's status words.

        Columns: status, detail, elapsed_ns (low, high), message_len.
        """
        flat = self.control.array(np.int32, offset=self.CONTROL_HEADER_BYTES)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity, 5), strides=(L.STATUS_RECORD_BYTES, 4), writeable=True
        )

    def status_elapsed_ns(self) -> np.ndarray[Any, Any]:
        """``[capacity]`` uint64 view of every slot's last call duration."""
        flat = self.control.array(np.uint64, offset=self.CONTROL_HEADER_BYTES + 8)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity,), strides=(L.STATUS_RECORD_BYTES,), writeable=True
        )

    def status_record(self, slot: int) -> np.ndarray[Any, Any]:
        """The slot's status record (one :data:`~wasmshare.llm._layout.STATUS`)."""
        return self.control.array(
            L.STATUS, 1, offset=self.CONTROL_HEADER_BYTES + slot * L.STATUS_RECORD_BYTES
        )

    def run_flags(self) -> np.ndarray[Any, Any]:
        """One byte per slot: 1 when the slot's controller must run this step."""
        return self.control.array(
            np.uint8, self.capacity, offset=self.CONTROL_HEADER_BYTES + self.capacity * L.STATUS_RECORD_BYTES
        )

    def worker_words(self, index: int) -> np.ndarray[Any, Any]:
        """A worker's control words: ``[go, done, command]`` (u32); go and done are futex words."""
        return self.control.array(np.uint32, 3, offset=index * self.WORKER_BLOCK_BYTES)

    def worker_word_address(self, index: int, word: int) -> int:
        """Host address of word ``word`` (0 go, 1 done) of worker ``index``, for futex calls."""
        return self.control.address + index * self.WORKER_BLOCK_BYTES + 4 * word

    def worker_bytes_copied(self, index: int) -> np.ndarray[Any, Any]:
        """``[1]`` uint64: the bytes worker ``index``'s guests have copied, ended guests included.

        The worker writes it before it acknowledges a command, so the engine reads it once
        the command is done."""
        offset = index * self.WORKER_BLOCK_BYTES + self.WORKER_BYTES_COPIED_OFFSET
        return self.control.array(np.uint64, 1, offset=offset)

    def close(self) -> None:
        """Close the batch's own regions (the token table belongs to its :class:`TokenTable`)."""
        for region in (self.mask, self.bias, self.step, self.control):
            region.close()


class SlotRunner(Protocol):
    """What runs one slot: a controller or a constraint instance."""

    regions: BatchRegions
    slot: int
    sequence_id: int


def fail_instance(instance: SlotRunner, error: BaseException) -> None:
    """Record ``error`` as the host failure of ``instance`` in its slot's status record."""
    L.write_status(
        instance.regions.status_record(instance.slot)[0],
        L.STATUS_HOST_ERROR,
        0,
        f"{getattr(instance, 'name', 'controller')} seq {instance.sequence_id}: the host failed while stepping it: "
        f"{type(error).__name__}: {error}",
    )
