"""Requests to an :class:`~wasmshare.llm.engine.Engine`, their results, and the queue that feeds it.

:class:`RequestQueue` is the inbox of :meth:`Engine.run <wasmshare.llm.engine.Engine.run>`
(continuous batching): any thread submits and cancels, the engine thread takes requests
between steps. :meth:`Engine.generate <wasmshare.llm.engine.Engine.generate>` fills one for
a fixed list of requests.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import QueueFull, WasmshareError
from .constraints import ConstraintSpec
from .controller import Controller

__all__ = [
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "QueueFull",
    "RequestQueue",
    "STALL_POLICIES",
    "StallPolicy",
    "check_stall_settings",
    "default_max_work",
]

FinishReason = Literal["stop", "length", "controller", "error", "cancelled"]
StallPolicy = Literal["wait", "sit_out"]
STALL_POLICIES: tuple[StallPolicy, ...] = ("wait", "sit_out")


@dataclass
class GenerationRequest:
    """One prompt to complete.

    ``prompt`` is text (put through the chat template when the model has one and ``chat``
    is not False) or token ids. ``steer`` is a constraint spec, a wasm :class:`Controller`,
    or None. ``temperature == 0`` is greedy; otherwise sampling with ``top_p`` and a per
    request ``seed``. ``stop`` strings end the output (and are not included).

    ``max_work`` bounds what the sequence may cost beyond ``max_tokens``: every token it
    produces counts, fast-forwarded and later backtracked ones included, so a controller
    that backtracks and fast-forwards forever ends with an error instead of running on at
    a constant length. None means :func:`default_max_work` of ``max_tokens``.

    ``stall_policy`` overrides the engine's for this request: ``"sit_out"`` lets the batch
    go on without it while its controller is late, ``"wait"`` holds the batch for it
    (see :class:`~wasmshare.llm.engine.Engine`); None takes the engine's.
    """

    prompt: str | Sequence[int]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    steer: ConstraintSpec | Controller | None = None
    stop: Sequence[str] = ()
    chat: bool | None = None
    max_work: int | None = None
    stall_policy: StallPolicy | None = None

    def stop_strings(self) -> list[str]:
        """Where the output is cut: ``stop`` plus the strings of a :func:`~wasmshare.llm.constraints.stop` steer."""
        extra = self.steer.stop_strings if isinstance(self.steer, ConstraintSpec) else []
        return [*self.stop, *extra]


def check_stall_settings(
    stall_policy: object,
    step_budget_ms: object,
    *,
    names: tuple[str, str] = ("stall_policy", "step_budget_ms"),
) -> None:
    """Raise :class:`WasmshareError` for a stall policy or step budget an engine cannot take.

    ``names`` are what the message calls the two settings (the CLI names its flags)."""
    if stall_policy not in STALL_POLICIES:
        raise WasmshareError(f"{names[0]} must be 'wait' or 'sit_out', got {stall_policy!r}")
    if step_budget_ms is not None and (
        isinstance(step_budget_ms, bool)
        or not isinstance(step_budget_ms, (int, float))
        or not math.isfinite(step_budget_ms)
        or step_budget_ms < 0
    ):
        raise WasmshareError(f"{names[1]} must be a finite number >= 0 or None, got {step_budget_ms!r}")


def default_max_work(max_tokens: int) -> int:
    """The work bound of a request that sets none: ``4 × max_tokens + 64`` tokens.

    Room for a controller to backtrack and redo three times what it keeps, and a margin for
    short answers.
    """
    return 4 * max_tokens + 64


@dataclass
class GenerationResult:
    """A finished request: its tokens, text, why it ended, and an error if it failed.

    ``sat_out_steps`` counts the decode steps the batch took without this request while
    its controller was late (``stall_policy="sit_out"``). ``backtracks`` counts the steps at
    which its controller or constraint went back, a JSON Schema's repairs included.
    ``enforced_by`` says how a JSON Schema answer was held to its schema: ``grammar``, or
    ``grammar + checks (...)`` naming the keywords checked on each completed value."""

    request: GenerationRequest
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: FinishReason
    error: str | None = None
    sat_out_steps: int = 0
    backtracks: int = 0
    enforced_by: str | None = None


class RequestQueue:
    """Thread-safe inbox of an :meth:`Engine.run <wasmshare.llm.engine.Engine.run>` loop.

    Any thread may :meth:`submit` and :meth:`cancel`; the engine thread takes requests
    between steps. ``max_waiting`` bounds the requests waiting for a slot (None: no bound).
    :meth:`close` lets the loop return once everything submitted has finished.
    """

    def __init__(self, max_waiting: int | None = None) -> None:
        self.max_waiting = max_waiting
        self._waiting: dict[int, GenerationRequest] = {}
        self._cancelled: set[int] = set()
        self._next_key = 0
        self._closed = False
        self._changed = threading.Condition()

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted to the batch."""
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed

    def submit(self, request: GenerationRequest) -> int:
        """Queue a request; returns its key (used by ``on_token``/``on_finish`` and :meth:`cancel`)."""
        with self._changed:
            if self._closed:
                raise WasmshareError("the request queue is closed")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for a slot")
            key = self._next_key
            self._next_key += 1
            self._waiting[key] = request
            self._changed.notify_all()
            return key

    def cancel(self, key: int) -> bool:
        """Drop a waiting request, or end a running one at the next step (reason ``cancelled``).

        Returns True when the request was still waiting (it will never be reported).
        """
        with self._changed:
            if self._waiting.pop(key, None) is not None:
                return True
            if 0 <= key < self._next_key:
                self._cancelled.add(key)
                self._changed.notify_all()
            return False

    def close(self) -> None:
        """Accept no more requests; the engine loop returns once the rest are done."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    # -- the engine's side -------------------------------------------------------------------------

    def take(self, room: int) -> list[tuple[int, GenerationRequest]]:
        """Up to ``room`` waiting requests, oldest first."""
        if room <= 0 or not self._waiting:
            return []
        with self._changed:
            keys = list(itertools.islice(self._waiting, room))
            return [(k, self._waiting.pop(k)) for k in keys]

    def take_cancelled(self) -> set[int]:
        """Keys cancelled since the last call."""
        if not self._cancelled:
            return set()
        with self._changed:
            cancelled, self._cancelled = self._cancelled, set()
            return cancelled

    def wait_for_work(self) -> bool:
        """Block until a request waits; False once the queue is closed and empty."""
        with self._changed:
            while not self._waiting:
                if self._closed:
                    return False
                self._changed.wait()
                self._cancelled.clear()  # nothing runs while idle: stale cancellations
            return True
