"""The running batch's KV cache and the attention mask that says which of its positions are real.

One row per sequence, one shared time axis. Rows of different lengths are left-padded when
they are merged, rows fed different numbers of tokens in one step are padded on the right,
and backtracked positions are masked out rather than removed; :meth:`KVCache.compact` drops
the columns no row uses once they are a large part of the cache. Position ids are the
caller's, per row, so none of this moves a token's position.

The layers are a ``transformers.DynamicCache``; torch and transformers are imported on first
use. Used by the engine thread only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import WasmshareError

if TYPE_CHECKING:
    import torch

__all__ = ["KVCache"]

# Cache columns no row uses that are tolerated before compacting (besides half the longest row).
COMPACT_SLACK = 64


class KVCache:
    """A batch of rows of KV cache for one model, with the attention mask over them.

    Empty until :meth:`prefill`, :meth:`prefill_chunk` or :meth:`merge` fills it;
    :meth:`select` with no rows, and :meth:`clear`, empty it again. Methods that need rows
    raise :class:`~wasmshare.errors.WasmshareError` on an empty cache.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._layers: Any = None
        self._mask: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor | None:
        """The attention mask, int64 ``[rows, width]`` (1 marks a real position); None while empty."""
        return self._mask

    def clear(self) -> None:
        """Drop every row."""
        self._layers, self._mask = None, None

    def prefill(self, model: Any, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Fill this empty cache with ``prompts``, left-padded; float32 logits at each one's last token."""
        import torch
        from transformers import DynamicCache

        length = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), length), dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        positions = torch.zeros((len(prompts), length), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            n = len(prompt)
            ids[i, length - n :] = torch.tensor(prompt)
            mask[i, length - n :] = 1
            positions[i, length - n :] = torch.arange(n)
        layers = DynamicCache()
        out = model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            cache=layers,
            use_cache=True,
            logits_to_keep=1,
        )
        self._layers, self._mask = layers, mask.to(self.device)
        logits: torch.Tensor = out.logits[:, -1, :].float()
        return logits

    def prefill_chunk(self, model: Any, tokens: Sequence[int], start: int) -> None:
        """Extend a one-row cache that holds positions ``0..start-1`` by ``tokens`` (no logits kept)."""
        import torch
        from transformers import DynamicCache

        if self._layers is None:
            self._layers = DynamicCache()
        end = start + len(tokens)
        chunk = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, end, dtype=torch.long, device=self.device)[None, :]
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        model(
            input_ids=chunk,
            attention_mask=mask,
            position_ids=positions,
            cache=self._layers,
            use_cache=True,
            logits_to_keep=1,
        )
        self._mask = mask

    def merge(self, other: KVCache) -> None:
        """Append ``other``'s rows after these, both left-padded to the wider; ``other`` is emptied."""
        import torch

        layers, mask = other._layers, other._mask
        other.clear()
        if mask is None:
            return
        if self._mask is None:
            self._layers, self._mask = layers, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])
        self._mask = torch.cat([_left_pad(self._mask, width, 1), _left_pad(mask, width, 1)], dim=0)
        for old_layer, new_layer in zip(self._layers.layers, layers.layers):
            old_layer.keys = torch.cat(
                [_left_pad(old_layer.keys, width, 2), _left_pad(new_layer.keys, width, 2)]
            )
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, width, 2), _left_pad(new_layer.values, width, 2)]
            )

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep``, in that order, then :meth:`compact`."""
        import torch

        if self._mask is None:
            return
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.device)
        self._layers.batch_select_indices(index)
        self._mask = self._mask.index_select(0, index)
        self.compact()

    def forget(self, row: int, count: int) -> None:
        """Mask out the last ``count`` real positions of ``row`` (a backtrack)."""
        mask = self._rows("forget positions of")
        real = mask[row].nonzero().flatten()
        mask[row, real[-count:]] = 0

    def compact(self) -> None:
        """Drop the positions no row uses when they are a large part of the cache.

        Backtracked positions are masked, not removed, and so are the columns left by rows
        that finished: without this a controller that backtracks every step grows the cache
        (and every step's attention) without bound at a constant length. Each row's real
        positions keep their order and are right-aligned. Skipped for caches whose layers
        do not all span the mask (sliding-window layers keep only their window).
        """
        import torch

        mask = self._mask
        if mask is None:
            return
        width = mask.shape[1]
        longest = int(mask.sum(dim=1).max())
        if width - longest <= max(COMPACT_SLACK, longest // 2):
            return
        layers = self._layers.layers
        if any(layer.keys is None or layer.keys.shape[2] != width for layer in layers):
            return
        keep = torch.argsort(mask, dim=1, stable=True)[:, width - longest :]  # zeros first, order kept
        self._mask = mask.gather(1, keep)
        for layer in layers:
            b, h, _, d = layer.keys.shape
            layer.keys = layer.keys.gather(2, keep[:, None, :, None].expand(b, h, longest, d))
            b, h, _, d = layer.values.shape
            layer.values = layer.values.gather(2, keep[:, None, :, None].expand(b, h, longest, d))

    def forward(self, model: Any, feeds: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """Feed each row its tokens (any number, zero included) in one pass.

        ``starts[i]`` is the position id of row ``i``'s first fed token. Returns float32
        logits ``[rows, V]`` at each row's last fed token (a row fed nothing gets the
        logits of a padding position, which the caller ignores).
        """
        import torch

        past = self._rows("feed")
        width = max(1, max(len(f) for f in feeds))
        batch = len(feeds)
        ids = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        for i, (feed, start) in enumerate(zip(feeds, starts)):
            n = len(feed)
            if n:
                ids[i, :n] = torch.tensor(feed)
                mask[i, :n] = 1
                positions[i, :n] = torch.arange(start, start + n)
                positions[i, n:] = start + n - 1
                last[i] = n - 1
            else:
                positions[i, :] = max(start - 1, 0)
        attention = torch.cat([past, mask.to(self.device)], dim=1)
        out = model(
            input_ids=ids.to(self.device),
            attention_mask=attention,
            position_ids=positions.to(self.device),
            cache=self._layers,
            use_cache=True,
        )
        self._mask = attention
        logits: torch.Tensor = out.logits[torch.arange(batch), last.to(self.device)].float()
        return logits

    def _rows(self, action: str) -> torch.Tensor:
        if self._mask is None:
            raise WasmshareError(f"cannot {action} an empty KV cache")
        return self._mask


def _left_pad(tensor: torch.Tensor, width: int, axis: int) -> torch.Tensor:
    """Pad ``tensor`` with zeros on the left of its time ``axis`` to ``width``."""
    import torch

    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=axis)
