"""What a controller step's results do to the engine's rows: stop, error, backtrack, fast-forward, masks.

Used by the engine thread between two forward passes, for the step that ran beside the
last one and for late answers alike (:mod:`._late_rows`): each result finds its row by
sequence id, so a step that covers some rows only leaves the others as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ._kv_cache import KVCache
from ._rows import Row
from .batch import ControllerBatch
from .results import Action, BatchStep, PreparedOutputs
from .stats import EngineStats

if TYPE_CHECKING:
    import torch

__all__ = ["apply_dense", "backtrack", "refeed_last", "take_actions"]


def take_actions(
    rows: list[Row],
    ctrl: BatchStep | None,
    kv: KVCache,
    *,
    accept: Callable[[Row, list[int]], None],
    check_limits: Callable[[Row], None],
    stats: EngineStats,
) -> list[Row]:
    """Apply stop / error / backtrack / fast-forward from ``ctrl`` to ``rows``; the rows it ended.

    Fast-forward tokens are accepted now (``accept``) and fed in the *next* forward pass
    together with the other rows' sampled tokens (the row samples again after it), instead
    of costing an extra forward pass of their own. A backtrack with nothing to splice
    re-feeds the last kept token so the row samples from the trimmed state.
    """
    if ctrl is None:
        return []
    done: list[Row] = []
    actions = dict(zip(ctrl.sequence_ids.tolist(), ctrl.action_codes.tolist()))
    for i, row in enumerate(rows):
        if row.sequence_id is None:
            continue
        result = ctrl.special.get(row.sequence_id)
        if result is None:
            if actions.get(row.sequence_id) == 1:  # STOP without fast-forward
                row.finish = "controller"
                done.append(row)
            continue
        if result.action is Action.ERROR:
            row.finish, row.error = "error", str(result.error)
            done.append(row)
            continue
        if result.backtrack:
            row.backtracks += 1
            backtrack(kv, i, row, result.backtrack)
        if result.fast_forward:
            stats.fast_forward_tokens += len(result.fast_forward)
            accept(row, list(result.fast_forward))
            row.feed = list(result.fast_forward)
        elif result.backtrack:
            refeed_last(kv, i, row)
        if result.action is Action.STOP and row.finish is None:
            row.finish = "controller"
        check_limits(row)
        if row.finish is not None:
            done.append(row)
    if any(r.backtrack for r in ctrl.special.values()):
        kv.compact()
    return done


def refeed_last(kv: KVCache, i: int, row: Row) -> None:
    """Forget the last cached position of row ``i`` and feed its token again next step."""
    kv.forget(i, 1)
    row.position -= 1
    row.feed = [row.tokens[-1] if row.tokens else row.prompt[-1]]


def backtrack(kv: KVCache, i: int, row: Row, count: int) -> None:
    """Forget the last ``count`` tokens of row ``i``: trim its output, mask its cache positions."""
    count = min(count, len(row.tokens))
    if count == 0:
        return
    del row.tokens[-count:]
    row.text_cache, row.prefix_offset, row.read_offset = "", 0, 0  # decode afresh
    kv.forget(i, count)
    row.position -= count


def apply_dense(
    batch: ControllerBatch, rows: list[Row], logits: torch.Tensor, ctrl: BatchStep, width: int
) -> None:
    """Masks and biases of ``ctrl`` for the constrained rows: one add of the prepared tensor into ``logits``."""
    prepared = batch.prepare(ctrl, width, logits.device)
    if prepared.additive is None:
        return
    row_of = {r.sequence_id: i for i, r in enumerate(rows) if r.sequence_id is not None}
    live = set(batch.sequences)
    targets = [row_of.get(sid, -1) if sid in live else -1 for sid in prepared.sequence_ids]
    if -1 not in targets:  # the usual case: every prepared row lands, in any order
        batch.apply_prepared(logits, prepared, targets)
        return
    keep = [k for k, i in enumerate(targets) if i >= 0]
    if keep:
        import torch

        subset = PreparedOutputs(
            tuple(prepared.sequence_ids[k] for k in keep),
            prepared.additive.index_select(0, torch.tensor(keep, device=logits.device)),
        )
        batch.apply_prepared(logits, subset, [targets[k] for k in keep])
