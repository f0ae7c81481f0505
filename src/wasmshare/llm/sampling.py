"""Drawing the next token from a row of logits, plain or under a controller's mask or bias.

Shared by the :class:`~wasmshare.llm.engine.Engine` and the ``model.generate`` adapter
(:mod:`wasmshare.llm.hf`). Both must end a row whose logits leave nothing to draw from
before any draw: an all ``-inf`` row has no argmax, and sampling from NaN, ``+inf`` or
values that overflow when divided by the temperature fails (on CUDA, with a device-side
assert that breaks the process's CUDA context). :func:`soundness` is that one check; the
largest magnitude it lets through is the caller's, because the engine divides by the
temperature in float64 after subtracting the peak (any finite value is sound) while
``generate`` divides the raw scores in float32 (:data:`GENERATE_LOGIT_LIMIT`).

Sparse application (:func:`sample_steered`) looks at a mask as a whole only when it must:
a draw from the unmasked row that the mask allows is kept, which is exact (greedy: it is
the masked argmax; sampling: a rejected draw is redrawn from the masked distribution).
Every function here runs on the engine thread and takes one row (float32, on any device).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from .results import RowOutput
    from .stats import EngineStats

__all__ = [
    "DEVICE_RETRIES",
    "GENERATE_LOGIT_LIMIT",
    "NOTHING_ALLOWED",
    "RETRY_BUDGET",
    "UNSOUND",
    "distribution",
    "first_choices",
    "sample",
    "sample_steered",
    "soundness",
    "unusable_reason",
]

#: :func:`soundness` of a row with nothing to draw from: every logit is ``-inf``.
NOTHING_ALLOWED = -1
#: :func:`soundness` of a row whose largest logit is NaN, ``+inf`` or beyond the limit.
UNSOUND = -2

#: The largest logit magnitude ``model.generate`` can sample from: it divides the scores by
#: the temperature in float32 (at most 3.4e38) after the processors, and biases of ±1e9 or
#: so are the usual way to forbid or force tokens.
GENERATE_LOGIT_LIMIT = 1e30

#: Logits a greedy row whose deferred mask forbids its draw scans in further argmax passes
#: before the mask is computed, on the CPU: a pass is a small fraction of a mask's cost.
RETRY_BUDGET = 1 << 20
#: Further argmax passes on an accelerator, where each waits for the device.
DEVICE_RETRIES = 2


def soundness(peak: float, limit: float = math.inf) -> int:
    """0 when a row whose largest logit is ``peak`` can be drawn from, else a negative code.

    :data:`NOTHING_ALLOWED` for ``-inf`` (a mask that allows no token), :data:`UNSOUND` for
    NaN, ``+inf`` or a magnitude beyond ``limit``. With the default limit every finite
    peak is sound: :func:`distribution` subtracts it before dividing, in float64.
    """
    if peak == -math.inf:
        return NOTHING_ALLOWED
    if not math.isfinite(peak) or abs(peak) > limit:
        return UNSOUND
    return 0


def unusable_reason(code: int, *, plural: bool = False) -> str:
    """What is wrong with logits of :func:`soundness` ``code``, as a verb phrase for a message."""
    if code == NOTHING_ALLOWED:
        return "allow no token" if plural else "allows no token"
    return f"{'hold' if plural else 'holds'} NaN, +inf or values too large to sample from"


def distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of ``logits / temperature`` that holds for every temperature > 0 and finite logit.

    The largest logit is subtracted first and the division is done in float64: in float32
    a tiny temperature rounds to 0 (``0 / 0`` is NaN) and a large logit over a small
    temperature overflows, either of which makes ``torch.multinomial`` raise. Here the
    largest entry maps to 0 and the others to values <= 0 (or ``-inf``, probability 0), so
    the sum is at least 1.
    """
    import torch

    scaled = logits.double()
    scaled = (scaled - scaled.max()) / temperature
    return torch.softmax(scaled, dim=-1)


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Any) -> int:
    """The position in ``logits`` (one row) of the next token: argmax at temperature 0, else a draw.

    Greedy ties go to the lowest position. On the CPU the argmax is numpy's, which is
    vectorised where torch's is not. ``generator`` is the request's ``torch.Generator``
    on the logits' device (unused when greedy).
    """
    import torch

    if temperature == 0:
        if logits.device.type == "cpu":
            return int(logits.numpy().argmax())
        return int(torch.argmax(logits))
    probs = distribution(logits, temperature)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # keeps the first always
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        choice = int(torch.multinomial(sorted_probs, 1, generator=generator))
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def first_choices(logits: torch.Tensor, *, masked: bool, greedy: Iterable[bool]) -> list[int] | None:
    """Every row's argmax, or a negative :func:`soundness` code; None when none is needed.

    Needed on an accelerator when a row is greedy (one transfer instead of a wait for the
    device per row) and after a dense mask was added (``masked``), where a row left with
    nothing sound to draw from must end before any draw. A row that samples, or whose bias
    is still to be added, uses its entry only for that check. ``greedy`` (one flag per
    row) is consumed only when needed.
    """
    import torch

    on_cpu = logits.device.type == "cpu"
    if on_cpu and not masked:
        return None
    if not masked and not any(greedy):
        return None
    if on_cpu:
        values = logits.numpy()
        ids = values.argmax(axis=1)  # the first NaN where there is one
        peaks: list[float] = values[np.arange(len(ids)), ids].tolist()
        indices: list[int] = ids.tolist()
    else:
        best, top = logits.max(dim=-1)  # NaN propagates
        both = torch.stack([best.double(), top.double()]).tolist()  # one transfer
        peaks, indices = both[0], [int(i) for i in both[1]]
    return [index if code == 0 else code for index, code in zip(indices, (soundness(p) for p in peaks))]


def sample_steered(
    line: torch.Tensor,
    out: RowOutput,
    temperature: float,
    top_p: float,
    generator: Any,
    stats: EngineStats,
    first: int | None = None,
) -> int:
    """The next token of row ``line`` under its controller's mask or bias, or a negative code.

    A greedy row, and a sampled row with ``top_p == 1`` whose mask allows more than half
    the vocabulary, draws from the unmasked row first and keeps the draw when the mask allows it. A
    greedy row whose deferred mask forbids its draw tries the next few argmaxes before
    computing the mask. Otherwise a mask that allows few ids samples among them (their
    logits gathered), else ``-inf`` goes at the forbidden ids; with ``top_p < 1`` the mask
    always comes first. A bias is added in place from its shared view. ``first`` is the
    row's unmasked argmax when the caller already has it (None for sampled rows).

    Returns :data:`NOTHING_ALLOWED` or :data:`UNSOUND` (from :func:`soundness`) when the
    mask or bias leaves nothing to draw; the caller ends the row. Only the mask and bias
    work is added to ``stats.apply_s``; ``deferred_masks``, ``late_masks`` and
    ``runner_up_draws`` are counted too.
    """
    import torch

    started = time.perf_counter()
    vocab = out.vocab_size
    bias, sparse_bias = out.bias, out.sparse_bias
    if bias is not None or sparse_bias is not None:
        if bias is not None:
            line[:vocab].add_(torch.from_numpy(bias).to(line.device))
        elif sparse_bias is not None:
            bias_ids, bias_values = sparse_bias
            line.index_add_(
                0,
                torch.from_numpy(bias_ids).to(line.device),
                torch.from_numpy(bias_values).to(line.device),
            )
        stats.apply_s += time.perf_counter() - started
        # A greedy draw lands on the largest value (argmax picks NaN first): one value to test.
        token = sample(line, temperature, top_p, generator) if temperature == 0 else None
        code = soundness(float(line[token] if token is not None else line.max()))
        if code:
            return code
        return token if token is not None else sample(line, temperature, top_p, generator)
    deferred = out.deferred
    if deferred:
        stats.deferred_masks += 1
    if temperature == 0 or (top_p >= 1 and out.allowed is None):
        stats.apply_s += time.perf_counter() - started
        token = first if first is not None else sample(line, temperature, top_p, generator)
        started = time.perf_counter()
        if out.allows(token):
            stats.apply_s += time.perf_counter() - started
            return token
        if deferred and temperature == 0:
            # The masked argmax is most often the runner-up: each further pass puts the
            # forbidden draw at -inf, so ties still go to the lowest id.
            passes = max(1, RETRY_BUDGET // line.shape[0]) if line.device.type == "cpu" else DEVICE_RETRIES
            for _ in range(passes):
                line[token] = float("-inf")
                token = sample(line, temperature, top_p, generator)
                if out.allows(token):
                    stats.apply_s += time.perf_counter() - started
                    stats.runner_up_draws += 1
                    return token
    if deferred:
        stats.late_masks += 1
    allowed = out.allowed
    if allowed is not None:
        if not allowed.size:
            return NOTHING_ALLOWED
        values = line.index_select(0, torch.from_numpy(allowed).to(line.device))
        stats.apply_s += time.perf_counter() - started
        return int(allowed[sample(values, temperature, top_p, generator)])
    line.index_fill_(0, torch.from_numpy(out.forbidden()).to(line.device), float("-inf"))
    if line.shape[0] > vocab:
        line[vocab:] = float("-inf")
    stats.apply_s += time.perf_counter() - started
    return sample(line, temperature, top_p, generator)
