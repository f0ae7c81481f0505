"""Reading what a runner left in a slot: its status record and its step result, checked.

A controller writes its ``ws_step_result`` into shared memory, and a runner (a thread or a
worker process) reports how the call ended in the slot's status record. Neither is
trusted: these functions turn them into a :class:`SequenceFailed` or a
:class:`StepResult`, refusing any value outside the controller ABI, so a hostile guest
can end its own sequence and nothing more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import _layout as L
from .results import OUTPUT_BY_CODE, Action, SequenceFailed, StepResult

__all__ = ["SparsePairs", "check_result", "sparse_pairs", "status_failure", "unusual_rows"]

SparsePairs = tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]
"""A sparse bias: int64 token ids and their float32 values."""

_CAUSES = {
    L.STATUS_TRAP: "trap",
    L.STATUS_RETURNED_ERROR: "error code",
    L.STATUS_INVALID_RESULT: "invalid result",
    L.STATUS_HOST_ERROR: "host error",
}


def status_failure(status: Any, label: str, sequence_id: int, what: str) -> SequenceFailed | None:
    """The failure a status record reports (one :data:`~wasmshare.llm._layout.STATUS`), or None.

    ``label`` names the controller and ``what`` the call in the message of a runner that
    wrote none."""
    code = int(status["status"])
    if code == L.STATUS_OK:
        return None
    message = bytes(status["message"])[: int(status["message_len"])].decode("utf-8", "replace")
    if code == L.STATUS_LIMIT:
        cause = L.LIMIT_NAMES.get(int(status["detail"]), "limit")
    else:
        cause = _CAUSES.get(code, "unknown")
    return SequenceFailed(
        message or f"controller '{label}' seq {sequence_id}: {what} failed ({cause})",
        guest=label,
        sequence=sequence_id,
        cause=cause,
    )


def check_result(
    record: Any,
    *,
    label: str,
    sequence_id: int,
    length: int,
    vocab_size: int,
    take_sparse_bias: Callable[[int], str | None],
) -> tuple[SequenceFailed | None, StepResult | None]:
    """Check a ``ws_step_result`` record against the ABI: the failure, or the result.

    ``length`` is the sequence's length in tokens (the most it may backtrack);
    ``take_sparse_bias(n_bias)`` checks and keeps a sparse bias, returning why it is invalid.
    """
    action, output = int(record["action"]), int(record["output"])
    backtrack, n_ff = int(record["backtrack"]), int(record["n_ff"])
    problem = None
    if action not in (L.ACTION_CONTINUE, L.ACTION_STOP):
        problem = f"action {action} is not WS_CONTINUE or WS_STOP"
    elif not 0 <= output < len(OUTPUT_BY_CODE):
        problem = f"output {output} is not a WS_OUTPUT_* value"
    elif n_ff > L.MAX_FF_TOKENS:
        problem = f"n_ff {n_ff} exceeds WS_MAX_FF_TOKENS ({L.MAX_FF_TOKENS})"
    elif backtrack > length:
        problem = f"backtrack {backtrack} exceeds the sequence length {length}"
    elif output == L.OUTPUT_SPARSE_BIAS:
        problem = take_sparse_bias(int(record["n_bias"]))
    ff = record["ff_tokens"][:n_ff] if problem is None else np.empty(0, np.uint32)
    if problem is None and ff.size and int(ff.max()) >= vocab_size:
        problem = f"fast-forward token {int(ff.max())} is outside the vocabulary ({vocab_size})"
    if problem is not None:
        return SequenceFailed(
            f"controller '{label}' seq {sequence_id}: invalid step result: {problem}",
            guest=label,
            sequence=sequence_id,
            cause="invalid result",
        ), None
    return None, StepResult(
        sequence_id,
        Action.STOP if action == L.ACTION_STOP else Action.CONTINUE,
        OUTPUT_BY_CODE[output],
        backtrack,
        tuple(int(t) for t in ff),
        None,
    )


def sparse_pairs(
    row: np.ndarray[Any, Any], n_bias: int, vocab_size: int
) -> tuple[str | None, SparsePairs | None]:
    """Check the sparse bias of ``n_bias`` entries in a bias ``row``: (why it is invalid, None)
    or (None, its pairs copied out of the row, a repeated id summed into one entry).

    The ids sit in the row's first words (as uint32), the values from ``vocab_size // 2`` on.
    The copies are what gets applied, so a guest that writes its row again after the check
    changes nothing."""
    if n_bias > vocab_size // 2:
        return f"n_bias {n_bias} exceeds vocab_size / 2 ({vocab_size // 2})", None
    ids = row.view(np.uint32)[:n_bias].astype(np.int64)
    if n_bias and int(ids.max()) >= vocab_size:
        return f"sparse bias token {int(ids.max())} is outside the vocabulary ({vocab_size})", None
    half = vocab_size // 2
    values = row[half : half + n_bias].copy()
    unique, inverse = np.unique(ids, return_inverse=True)
    if unique.size != ids.size:
        summed = np.zeros(unique.size, dtype=np.float32)
        np.add.at(summed, inverse, values)
        ids, values = unique, summed
    return None, (ids, values)


# A sparse bias is validated every step (its ids index the logits), so it counts as unusual.
_ORDINARY_LIMITS = np.array([L.ACTION_STOP, L.OUTPUT_BIAS, 0, 0], dtype=np.uint32)


def unusual_rows(
    header: np.ndarray[Any, Any], status: np.ndarray[Any, Any], *, small_batch: int
) -> list[int]:
    """The rows whose result needs a closer look than the vectorised read of the step.

    ``header`` is ``[n, 4]`` uint32 (action, output, backtrack, n_ff) and ``status`` the ``[n]``
    status codes: one comparison against the largest ordinary values finds every row with a
    stop, a sparse bias, fast-forward, backtrack, a failure or a value outside the ABI (a
    negative action or output reads as a huge unsigned value). Up to ``small_batch`` rows, a
    few list operations are cheaper than a chain of numpy calls."""
    if len(status) <= small_batch:
        return [
            i
            for i, ((a, o, b, f), st) in enumerate(zip(header.tolist(), status.tolist()))
            if a > L.ACTION_STOP or o > L.OUTPUT_BIAS or b or f or st != L.STATUS_OK
        ]
    unusual = (header > _ORDINARY_LIMITS).any(axis=1)
    unusual |= status != L.STATUS_OK
    return np.flatnonzero(unusual).tolist() if unusual.any() else []
