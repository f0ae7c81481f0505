"""The engine's per-request state: a row of the running batch, built and checked from a request.

A :class:`Row` lives on the engine thread from admission until its result is handed over.
:func:`build_row` checks everything about a request that can be checked before it runs,
so an invalid request fails alone and before any model call.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import WasmshareError
from .constraints import ConstraintSpec, enforcement
from .requests import STALL_POLICIES, FinishReason, GenerationRequest, GenerationResult, default_max_work

if TYPE_CHECKING:
    import torch

    from ._kv_cache import KVCache

__all__ = [
    "PendingPrefill",
    "Row",
    "RowText",
    "accept_tokens",
    "build_row",
    "plan_controller_phase",
    "start_error",
]

# torch takes generator seeds below 2**64 only.
SEED_MODULUS = 1 << 63


@dataclass
class Row:
    """One request decoding in the batch: its prompt, output so far, and why it ended (``finish``)."""

    request: GenerationRequest
    index: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    sequence_id: int | None = None
    position: int = 0
    generator: Any = None
    finish: FinishReason | None = None
    error: str | None = None
    feed: list[int] = field(default_factory=list)  # tokens for the next forward instead of a sampled one
    text_cache: str = ""  # decoded text of tokens[:read_offset] (see RowText.so_far)
    prefix_offset: int = 0
    read_offset: int = 0
    reported: bool = False  # its result has been handed to the caller
    work: int = 0  # tokens produced: sampled and fast-forwarded, backtracked ones included
    steps: int = 0  # decode steps taken in the batch (sat-out ones not counted)
    work_limit: int = 0
    kept_logits: Any = None  # its logits while its controller is late: drawn from when it answers
    late_last: bool = False  # its controller was late at its last step (the next cut need not wait)
    sat_out: int = 0  # steps the batch took without it while its controller was late
    lag: int = 0  # of them, the ones in a row up to now
    backtracks: int = 0  # steps whose controller or constraint went back (schema repairs included)

    @property
    def over_work_limit(self) -> bool:
        """True once the row produced more than ``work_limit`` tokens or took twice as many steps."""
        return self.work > self.work_limit or self.steps > 2 * self.work_limit

    def work_limit_error(self, who: str) -> str:
        """The error of a row past its work bound; ``who`` names its controller or request."""
        return (
            f"{who}: produced {self.work:,} tokens in {self.steps:,} steps (fast-forwarded and backtracked "
            f"ones count) for max_tokens {self.request.max_tokens:,}; the limit is {self.work_limit:,} "
            f"tokens and {2 * self.work_limit:,} steps"
        )

    def result(self, text: str) -> GenerationResult:
        """The row's result, ``text`` (its decoded output) cut at the first stop string."""
        finish = self.finish or "stop"
        if finish == "controller" and isinstance(self.request.steer, ConstraintSpec):
            finish = "stop"  # a constraint that completes ends the answer like a stop string
        for stop in self.request.stop_strings():
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        steer = self.request.steer
        return GenerationResult(
            self.request,
            len(self.prompt),
            list(self.tokens),
            text,
            finish,
            self.error,
            self.sat_out,
            self.backtracks,
            enforcement(steer) if isinstance(steer, ConstraintSpec) else None,
        )


@dataclass
class PendingPrefill:
    """A long prompt prefilled a chunk per step in a cache of its own before its row joins the batch."""

    row: Row
    cache: KVCache
    done: int = 0  # prompt tokens already in the cache


def build_row(
    index: int,
    request: GenerationRequest,
    *,
    encode: Callable[[str, bool | None], list[int]],
    vocab_size: int,
    context_length: int | None,
    device: torch.device,
) -> Row:
    """The row of ``request``, its prompt encoded with ``encode(text, chat)``.

    Raises :class:`~wasmshare.errors.WasmshareError` naming request ``index`` for a prompt
    that is empty, holds ids outside ``vocab_size`` or reaches ``context_length``, and for
    a bad ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``max_work`` or ``stall_policy``.
    """
    import torch

    if isinstance(request.prompt, str):
        prompt = encode(request.prompt, request.chat)
    else:
        try:
            prompt = [operator.index(t) for t in request.prompt]
        except TypeError:
            raise WasmshareError(f"request {index}: a prompt of token ids must hold integers") from None
        outside = [t for t in prompt if not 0 <= t < vocab_size]
        if outside:
            raise WasmshareError(
                f"request {index}: token id {outside[0]} is outside the vocabulary (0..{vocab_size - 1})"
            )
    if not prompt:
        raise WasmshareError(f"request {index}: the prompt is empty")
    if request.max_tokens <= 0:
        raise WasmshareError(f"request {index}: max_tokens must be positive")
    if not (math.isfinite(request.temperature) and request.temperature >= 0) or not 0 < request.top_p <= 1:
        raise WasmshareError(f"request {index}: temperature must be a finite number >= 0 and top_p in (0, 1]")
    if context_length is not None and len(prompt) >= context_length:
        raise WasmshareError(
            f"request {index}: the prompt is {len(prompt):,} tokens; the model's context is "
            f"{context_length:,} tokens"
        )
    seed = 0x5EED + index if request.seed is None else request.seed
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise WasmshareError(f"request {index}: seed must be an int, got {type(seed).__name__}")
    limit = default_max_work(request.max_tokens) if request.max_work is None else request.max_work
    if not isinstance(limit, int) or limit < request.max_tokens:
        raise WasmshareError(f"request {index}: max_work must be an int >= max_tokens, got {limit!r}")
    if request.stall_policy is not None and request.stall_policy not in STALL_POLICIES:
        raise WasmshareError(
            f"request {index}: stall_policy must be 'wait' or 'sit_out', got {request.stall_policy!r}"
        )
    row = Row(request, index, prompt, work_limit=limit)
    if request.temperature > 0:
        row.generator = torch.Generator(device=device)  # multinomial draws where the logits are
        row.generator.manual_seed(seed % SEED_MODULUS)
    return row


class RowText:
    """Decodes rows' output tokens to text with the model's tokenizer, end-of-sequence ids left out."""

    def __init__(self, tokenizer: Any, eos: set[int]) -> None:
        self.tokenizer = tokenizer
        self.eos = eos

    def decode(self, tokens: list[int]) -> str:
        """The text of ``tokens``, special tokens skipped."""
        text = self.tokenizer.decode([t for t in tokens if t not in self.eos], skip_special_tokens=True)
        return text if isinstance(text, str) else "".join(text)

    def so_far(self, row: Row) -> str:
        """The decoded output of ``row`` so far, decoding only its last few tokens per call.

        Decoding every token again at each step costs O(n) per token; instead the text of
        ``tokens[:read_offset]`` is kept and only ``tokens[prefix_offset:]`` is decoded (the
        few tokens before ``read_offset`` give the tokenizer its context). A tail that ends in
        an incomplete UTF-8 character is held back until the next token completes it.
        """
        tokens = row.tokens
        prefix = self.decode(tokens[row.prefix_offset : row.read_offset])
        new = self.decode(tokens[row.prefix_offset :])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            row.text_cache += new[len(prefix) :]
            row.prefix_offset, row.read_offset = max(0, len(tokens) - 4), len(tokens)
        return row.text_cache


def accept_tokens(
    row: Row, tokens: Sequence[int], text: RowText, on_token: Callable[[int, int, str], None] | None
) -> int:
    """Append accepted tokens to ``row``, ending it on end-of-sequence, length or a stop string.

    ``on_token(row.index, token, text_so_far)`` is called for each token kept. Returns how
    many tokens were produced (an end-of-sequence token counts, though it is not kept).
    """
    produced = 0
    for token in tokens:
        if row.finish is not None:
            break
        row.tokens.append(token)
        row.work += 1
        produced += 1
        if token in text.eos:
            row.tokens.pop()
            row.finish = "stop"
            break
        if row.request.stop or on_token is not None:
            so_far = text.so_far(row)
            if on_token is not None:
                on_token(row.index, token, so_far)
            if any(s in so_far for s in row.request.stop):
                row.finish = "stop"
                break
        if len(row.tokens) >= row.request.max_tokens:
            row.finish = "length"
            break
    return produced


def plan_controller_phase(
    rows: Sequence[Row], joining: Sequence[Row], *, defer_masks: bool, overlap: bool
) -> tuple[bool, set[int], set[int]]:
    """Whether any row has a controller; the sequences that sample; those whose masks may wait.

    Sampling rows get their allowed ids worked out beside the forward pass. Greedy rows'
    masks wait until a draw needs them (with ``defer_masks``), except a ``joining`` row's
    first under ``overlap``, which its prefill (a pass over the whole prompt) hides.
    """
    has_controllers = False
    analyse: set[int] = set()
    defer: set[int] = set()
    running = len(rows)
    for n, r in enumerate([*rows, *joining]):
        if r.sequence_id is not None:
            has_controllers = True
            if r.request.temperature > 0:
                analyse.add(r.sequence_id)
            elif defer_masks and (n < running or not overlap):
                defer.add(r.sequence_id)
    return has_controllers, analyse, defer


def start_error(index: int, error: Exception) -> str:
    """The error text of request ``index`` that could not start: a WasmshareError's own message."""
    return (
        str(error)
        if isinstance(error, WasmshareError)
        else f"request {index}: {type(error).__name__}: {error}"
    )
