"""Applying a batch's masks and biases to torch logits: one additive tensor, one in-place add.

The only module of the controller layer that imports torch, so the rest of the layer (and
every worker process) runs without it. A batch's mask and bias regions are viewed as
tensors without a copy and, where CUDA is available, registered as page-locked memory so
their rows reach the device asynchronously. Each bitmask byte becomes eight columns of 0 /
-inf through one table gather, which avoids unpacking bits or filling a boolean mask; the
biases are added to the same tensor, so applying a step is a single add.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import WasmshareError
from ._regions import BatchRegions

__all__ = ["Tensor", "add_prepared", "additive_tensor", "copy_event", "release_views", "torch_views"]

Tensor = torch.Tensor

SparseBias = tuple[int, np.ndarray[Any, Any], np.ndarray[Any, Any]]
"""One row's sparse bias: its row in the step, int64 token ids and float32 values."""


def torch_views(
    regions: BatchRegions, mask_rows: np.ndarray[Any, Any], bias_rows: np.ndarray[Any, Any]
) -> dict[str, Any]:
    """Zero-copy tensors over a batch's rows: ``{"mask", "bias", "pinned"}``.

    With CUDA available the mask and bias regions are page-locked (``pinned`` is then True)
    until :func:`release_views`; the tensors are valid while the regions are open.
    Raises :class:`WasmshareError` when CUDA refuses to register them."""
    views: dict[str, Any] = {
        "mask": torch.from_numpy(mask_rows),
        "bias": torch.from_numpy(bias_rows),
        "pinned": False,
    }
    if torch.cuda.is_available():
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        for region in (regions.mask, regions.bias):
            err = cudart.cudaHostRegister(region.address, region.mapped_nbytes, 0)
            if int(err) != 0:
                raise WasmshareError(f"cudaHostRegister of the batch regions failed ({err})")
        views["pinned"] = True
    return views


def release_views(views: dict[str, Any], regions: BatchRegions) -> None:
    """Undo :func:`torch_views`' page-locking, before the regions close."""
    if views.get("pinned"):
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        for region in (regions.mask, regions.bias):
            cudart.cudaHostUnregister(region.address)


def additive_tensor(
    views: dict[str, Any],
    slots: np.ndarray[Any, Any],
    mask_idx: np.ndarray[Any, Any],
    bias_idx: np.ndarray[Any, Any],
    sparse: Sequence[SparseBias],
    *,
    vocab_size: int,
    mask_words: int,
    width: int,
    device: Any,
) -> Tensor | None:
    """The ``[len(slots), width]`` float32 tensor to add to a step's logits, or None when no row has output.

    Row ``i`` belongs to slot ``slots[i]``; ``mask_idx`` lists the rows with a bitmask,
    ``bias_idx`` those with a dense bias (read from the bias rows) and ``sparse`` those with
    a sparse bias. A masked token gets -inf, and so does every column past the vocabulary
    of a masked row; the other columns of rows without a mask stay 0."""
    n = len(slots)
    additive = None
    if mask_idx.size:
        rows = views["mask"].index_select(0, torch.from_numpy(slots[mask_idx]))
        if mask_idx.size == n:
            words = rows
        else:  # rows without a mask allow everything
            words = torch.full((n, mask_words), -1, dtype=torch.int32)
            words.index_copy_(0, torch.from_numpy(mask_idx), rows)
        words = words.to(device, non_blocking=True)
        additive = _mask_to_additive(words, _byte_table(device), width)
        if width > vocab_size:  # past the vocabulary: forbidden under a mask, else untouched
            additive[:, vocab_size:] = float("-inf")
            if mask_idx.size != n:
                others = np.setdiff1d(np.arange(n), mask_idx)
                additive[torch.from_numpy(others).to(device), vocab_size:] = 0.0
    if bias_idx.size or sparse:
        bias = torch.zeros((n, vocab_size), dtype=torch.float32)
        if bias_idx.size:
            bias[torch.from_numpy(bias_idx)] = views["bias"].index_select(
                0, torch.from_numpy(slots[bias_idx])
            )
        for i, ids, values in sparse:
            bias[i].index_add_(0, torch.from_numpy(ids), torch.from_numpy(values))
        bias = bias.to(device, non_blocking=True)
        if additive is None:
            additive = torch.zeros((n, width), dtype=torch.float32, device=device)
        additive[:, :vocab_size] += bias
    return additive


def add_prepared(logits: Tensor, additive: Tensor, rows: Sequence[int] | None = None) -> None:
    """Add ``additive`` to ``logits`` in place: row ``i`` to ``logits[rows[i]]`` (default: row ``i``)."""
    if additive.dtype != logits.dtype:
        additive = additive.to(logits.dtype)
    if rows is None or list(rows) == list(range(logits.shape[0])):
        logits.add_(additive)
        return
    index = torch.tensor(list(rows), device=logits.device)
    logits.index_add_(0, index, additive)


def copy_event(logits: Tensor) -> Any:
    """A CUDA event recorded after the copies into ``logits``' device, or None on the CPU.

    The batch waits on it before its controllers write the page-locked rows again."""
    if logits.device.type != "cuda":
        return None
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record()
    return event


_BYTE_TABLES: dict[str, Tensor] = {}


def _byte_table(device: Any) -> Tensor:
    """``[256, 8]`` float32: entry ``[b, k]`` is 0 when bit ``k`` of byte ``b`` is set, else -inf."""
    key = str(device)
    table = _BYTE_TABLES.get(key)
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = torch.where(bits.bool(), 0.0, float("-inf")).to(torch.float32).to(device)
        _BYTE_TABLES[key] = table
    return table


def _mask_to_additive(words: Tensor, table: Tensor, width: int) -> Tensor:
    """``[n, W]`` int32 bitmask words → ``[n, width]`` float32 of 0 (bit ``t % 32`` of word
    ``t // 32`` set) or -inf; columns past ``32 W`` are -inf."""
    n, w = words.shape
    as_bytes = words.contiguous().view(torch.uint8).view(n, w * 4).int()  # little-endian bytes
    additive = F.embedding(as_bytes, table).view(n, w * 32)
    if additive.shape[1] >= width:
        return additive[:, :width]
    pad = torch.full((n, width - additive.shape[1]), float("-inf"), device=additive.device)
    return torch.cat([additive, pad], dim=1)
