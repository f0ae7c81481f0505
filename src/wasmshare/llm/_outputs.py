"""A batch's mask and bias rows as its last step left them, and the ways to read them out.

The controllers write their rows in place; this is the engine's side of those rows: a
slot's safe reset, the sparse biases copied out when a step is checked, the constraint
masks a step left uncomputed (deferred until a sampler needs them), the per-row
:class:`RowOutput` for samplers that work row by row, and the one additive tensor for
:mod:`.logits`. Used from the batch's thread only.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import WasmshareError
from . import _layout as L
from ._records import SparsePairs, sparse_pairs
from ._regions import BatchRegions
from .constraints import ConstraintInstance
from .results import BatchStep, PreparedOutputs, RowOutput

if TYPE_CHECKING:
    from .logits import Tensor

__all__ = ["OutputRows"]


class _Stepped(Protocol):
    @property
    def sequence_id(self) -> int: ...
    @property
    def slot(self) -> int: ...
    @property
    def instance(self) -> object: ...


class OutputRows:
    """The mask and bias rows of one batch (row = slot), and what its last step left in them.

    A *deferred* mask belongs to a constraint told to skip computing it at a step
    (:meth:`new_step`); it stays uncomputed until :meth:`fill_deferred` or a deferred
    :class:`RowOutput` needs it, and a RowOutput handed out for it is valid until the next
    step. The torch views (:meth:`torch_views`) are made on first use and released by
    :meth:`close`.
    """

    def __init__(self, regions: BatchRegions) -> None:
        self.regions = regions
        self.vocab_size = regions.vocab_size
        self.mask_rows = regions.mask_rows()
        self.bias_rows = regions.bias_rows()
        self.mask_rows[:] = -1
        self.torch: dict[str, Any] = {}
        self.copy_event: Any = None  # the CUDA copy of the last applied rows, until it is waited for
        # slot -> the last sparse bias that passed validation, copied out of the guest's slot
        # then (the guest may write its slot again before the pairs are applied)
        self._sparse_pairs: dict[int, SparsePairs] = {}
        self.deferred: dict[int, ConstraintInstance] = {}  # slot -> constraint whose mask waits
        self._flagged: list[ConstraintInstance] = []  # constraints told to defer at the last step
        self._generation = 0  # steps so far: a deferred RowOutput answers for its own step only
        self._closed = False

    # -- slots -------------------------------------------------------------------------------------

    def reset(self, slot: int) -> None:
        """The safe value of a slot: every token allowed, no bias."""
        self.mask_rows[slot] = -1
        self.bias_rows[slot] = 0.0
        self._sparse_pairs.pop(slot, None)

    def forget(self, slot: int) -> None:
        """The sequence of ``slot`` left: its waiting mask, if any, is never computed."""
        self.deferred.pop(slot, None)

    def take_sparse_bias(self, slot: int, n_bias: int) -> str | None:
        """Check the sparse bias of ``n_bias`` entries in ``slot`` and, when valid, keep a copy
        of its pairs for :meth:`sparse_bias`. Returns why it is invalid, or None."""
        problem, pairs = sparse_pairs(self.bias_rows[slot], n_bias, self.vocab_size)
        if pairs is not None:
            self._sparse_pairs[slot] = pairs
        return problem

    def sparse_bias(self, slot: int) -> SparsePairs:
        """The slot's last validated sparse bias: int64 ids and their float32 values (copies
        taken at validation, never read from the guest's slot again)."""
        empty = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32))
        return self._sparse_pairs.get(slot, empty)

    # -- deferred masks ----------------------------------------------------------------------------

    def new_step(
        self,
        stepped: Sequence[_Stepped],
        defer_masks: Container[int],
        *,
        partial: bool,
        running: Container[int] = (),
    ) -> None:
        """A step of the ``stepped`` sequences begins: tell the constraints of ``defer_masks``
        to leave this step's mask uncomputed.

        Every flag of an earlier step is cleared first, stepped now or not, except those of
        the slots in ``running`` (constraints still in a step that was cut, which read their
        flag and are settled by :meth:`settle_late`). The stepped sequences' waiting masks
        are forgotten (they are about to move on); with ``partial`` (a step with ``only=``)
        the others' stay, as their state does. Only llguidance constraints can defer; the
        others compute their masks as usual."""
        self._generation += 1
        kept = []
        for flagged in self._flagged:
            if flagged.slot in running:
                kept.append(flagged)
            else:
                flagged.defer_mask = False
        self._flagged = kept
        if not partial:
            self.deferred.clear()
        elif self.deferred:
            for seq in stepped:
                self.deferred.pop(seq.slot, None)
        if not defer_masks:
            return
        for seq in stepped:
            instance = seq.instance
            if (
                isinstance(instance, ConstraintInstance)
                and instance.can_defer
                and seq.sequence_id in defer_masks
            ):
                instance.defer_mask = True
                self._flagged.append(instance)

    def end_step(self, late: Container[int] = ()) -> None:
        """The step ran: the flagged constraints that left their mask uncomputed now wait.

        Those of the slots in ``late`` are still running (the step was cut): they wait for
        :meth:`settle_late` instead."""
        for instance in self._flagged:
            if instance.slot not in late and instance.mask_deferred:
                self.deferred[instance.slot] = instance

    def settle_late(self, slots: Iterable[int]) -> None:
        """The late steps of ``slots`` are over: their deferred masks wait like this step's."""
        chosen = set(slots)
        kept = []
        for instance in self._flagged:
            if instance.slot in chosen:
                instance.defer_mask = False
                if instance.mask_deferred:
                    self.deferred[instance.slot] = instance
            else:
                kept.append(instance)
        self._flagged = kept

    def fill_deferred(self, slots: Iterable[int] | None = None) -> None:
        """Compute the last step's deferred masks (of ``slots``, default all) into the bitmask."""
        if not self.deferred:
            return
        for slot in list(self.deferred) if slots is None else slots:
            instance = self.deferred.pop(int(slot), None)
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
            self.fill_deferred((slot,))
            words: np.ndarray[Any, Any] = self._private_mask_words([slot])[0]
            return words

        return RowOutput(self.vocab_size, check=check, load=load)

    def _private_mask_words(self, slots: Sequence[int] | np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """A copy of the mask rows of ``slots`` as uint32 words, bits past the vocabulary cleared."""
        words = self.mask_rows.view(np.uint32)[slots]  # fancy indexing: a private copy
        if self.vocab_size % 32:
            words[:, -1] &= np.uint32((1 << (self.vocab_size % 32)) - 1)
        return words

    # -- reading out -------------------------------------------------------------------------------

    def row_outputs(
        self, step: BatchStep, *, analyse: Container[int] = (), latest: bool = True
    ) -> dict[int, RowOutput]:
        """``step``'s masks and biases per sequence id (see :meth:`ControllerBatch.row_outputs`).

        ``latest`` says ``step`` is the batch's last step, whose deferred masks are the
        waiting ones; an older step's rows are read as they are."""
        outputs: dict[int, RowOutput] = {}
        vocab = self.vocab_size
        codes = step.output_codes.tolist()
        sequence_ids = step.sequence_ids.tolist()
        masked = [i for i, code in enumerate(codes) if code == L.OUTPUT_BITMASK]
        deferred = self.deferred
        if masked and deferred and latest:
            slots = step.slots.tolist()
            waiting = [i for i in masked if slots[i] in deferred]
            for i in waiting:
                slot, sid = slots[i], sequence_ids[i]
                out = outputs[sid] = self._deferred_output(slot, deferred[slot])
                if sid in analyse:
                    out.allowed  # noqa: B018 - computed now, off the caller's critical path
            masked = [i for i in masked if slots[i] not in deferred]
        if masked:
            words = self._private_mask_words(step.slots[masked])
            for k, i in enumerate(masked):
                out = outputs[sequence_ids[i]] = RowOutput(vocab, words=words[k])
                if sequence_ids[i] in analyse:
                    out.allowed  # noqa: B018 - worked out now, off the caller's critical path
        for i, code in enumerate(codes):
            if code == L.OUTPUT_BIAS:
                outputs[sequence_ids[i]] = RowOutput(vocab, bias=self.bias_rows[int(step.slots[i])])
            elif code == L.OUTPUT_SPARSE_BIAS:
                outputs[sequence_ids[i]] = RowOutput(vocab, sparse_bias=self.sparse_bias(int(step.slots[i])))
        return outputs

    def torch_views(self) -> dict[str, Any]:
        """Zero-copy torch views of the rows (see :func:`.logits.torch_views`), made on first use."""
        if not self.torch:
            from .logits import torch_views

            self.torch = torch_views(self.regions, self.mask_rows, self.bias_rows)
        return self.torch

    def prepare(self, step: BatchStep, width: int, device: Any) -> PreparedOutputs:
        """``step``'s masks and biases as one additive tensor (see :meth:`ControllerBatch.prepare`)."""
        from .logits import additive_tensor

        views = self.torch_views()
        codes = step.output_codes
        mask_idx = np.flatnonzero(codes == L.OUTPUT_BITMASK)
        if mask_idx.size and self.deferred:
            self.fill_deferred(step.slots[mask_idx].tolist())
        sparse = [
            (i, *self.sparse_bias(int(step.slots[i])))
            for i in np.flatnonzero(codes == L.OUTPUT_SPARSE_BIAS).tolist()
        ]
        additive = additive_tensor(
            views,
            step.slots,
            mask_idx,
            np.flatnonzero(codes == L.OUTPUT_BIAS),
            sparse,
            vocab_size=self.vocab_size,
            mask_words=self.regions.mask_words,
            width=width,
            device=device,
        )
        return PreparedOutputs(tuple(int(s) for s in step.sequence_ids.tolist()), additive)

    def record_copy(self, logits: Tensor, prepared: PreparedOutputs) -> None:
        """Remember the device copy of ``prepared`` into ``logits``, which :meth:`wait_for_copy` awaits."""
        if prepared.additive is None:
            self.copy_event = None
            return
        from .logits import copy_event

        self.copy_event = copy_event(logits)

    def wait_for_copy(self) -> None:
        """Block until the device copy of the last applied rows has finished (no-op if none)."""
        if self.copy_event is not None:
            self.copy_event.synchronize()
            self.copy_event = None

    def close(self) -> None:
        """Release the torch views; deferred RowOutputs refuse use from now on. Safe twice."""
        self._closed = True
        if self.torch:
            from .logits import release_views

            release_views(self.torch, self.regions)
        self.torch.clear()
