"""One engine loop for the whole server, fed from asyncio handlers.

The :class:`~wasmshare.llm.engine.Engine` decodes on its own thread with continuous
batching (:meth:`Engine.run` over a :class:`RequestQueue`): a request joins the running
batch at the next step and leaves it when it finishes or its client goes away. Tokens and
results cross to the event loop with ``call_soon_threadsafe`` into a per-request
:class:`asyncio.Queue`; nothing per token is copied between controllers and the model (the
masks and biases are the engine's shared regions).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import Overloaded, QueueFull
from ..llm.constraints import Backend
from ..llm.engine import Engine
from ..llm.limits import Limits
from ..llm.requests import GenerationRequest, GenerationResult, RequestQueue, StallPolicy
from ..llm.stats import EngineStats
from .metrics import ServerMetrics

if TYPE_CHECKING:
    from ..llm.models import LoadedModel

__all__ = ["EngineService", "Ticket", "TokenEvent", "Overloaded"]


@dataclass
class TokenEvent:
    """A token accepted for a request, with the whole text decoded so far."""

    token: int
    text: str


@dataclass
class Ticket:
    """One submitted request as the handler sees it: its events, in order, end with the result."""

    key: int
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[TokenEvent | GenerationResult] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    result: GenerationResult | None = None

    async def stream(self) -> AsyncIterator[TokenEvent | GenerationResult]:
        """Token events as they come, then the :class:`GenerationResult`."""
        while True:
            event = await self.events.get()
            yield event
            if isinstance(event, GenerationResult):
                return

    async def wait(self) -> GenerationResult:
        """The result, skipping token events."""
        async for event in self.stream():
            if isinstance(event, GenerationResult):
                return event
        raise AssertionError("unreachable: a ticket's stream always ends with its result")


class EngineService:
    """The server's engine loop on a daemon thread, with metrics.

    ``max_batch`` sequences decode at once; up to ``max_waiting`` more wait for a slot
    before :meth:`submit` refuses with :class:`Overloaded`.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = 8,
        max_waiting: int = 256,
        controller_limits: Limits | None = None,
        metrics: ServerMetrics | None = None,
        grammar_backend: Backend = "llguidance",
        stall_policy: StallPolicy = "sit_out",
        step_budget_ms: float | None = None,
    ) -> None:
        self.loaded = loaded
        self.engine = Engine(
            loaded,
            max_batch=max_batch,
            limits=controller_limits,
            grammar_backend=grammar_backend,
            stall_policy=stall_policy,
            step_budget_ms=step_budget_ms,
        )
        self.queue = RequestQueue(max_waiting=max_waiting)
        self.metrics = metrics or ServerMetrics()
        self.metrics.watch(self)
        self._tickets: dict[int, Ticket] = {}
        self._lock = threading.Lock()
        self._started_keys: set[int] = set()
        self._thread = threading.Thread(target=self._loop, name="wasmshare-engine-loop", daemon=True)
        self._failure: BaseException | None = None
        self._thread.start()

    # -- handler side -------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Ticket:
        """Queue a request for the engine; call from the event loop's thread."""
        loop = asyncio.get_running_loop()
        with self._lock:
            try:
                key = self.queue.submit(request)
            except QueueFull as e:
                raise Overloaded(str(e)) from None
            ticket = Ticket(key, request, loop)
            self._tickets[key] = ticket
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The client went away: free the request's slot at the next step (or drop it from the queue)."""
        if ticket.result is not None:
            return
        if self.queue.cancel(ticket.key):  # never admitted: no result will come
            with self._lock:
                self._tickets.pop(ticket.key, None)
        self.metrics.cancelled.inc()

    @property
    def alive(self) -> bool:
        """False when the engine loop has died (the server then reports unhealthy)."""
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        """Requests decoding now (submitted, admitted, not finished)."""
        return max(0, len(self._tickets) - self.queue.waiting)

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return self.queue.waiting

    @property
    def stats(self) -> EngineStats:
        """The engine's running totals, which the metrics read at every scrape."""
        return self.engine.stats

    def cancel_all(self) -> None:
        """End every request now, as the server shuts down; safe from any thread.

        Running requests stop at the next step with ``"cancelled"``; waiting ones get a
        cancelled result at once.
        """
        self.queue.close()
        with self._lock:
            tickets = list(self._tickets.values())
        for ticket in tickets:
            if ticket.result is not None:
                continue
            if self.queue.cancel(ticket.key):  # never admitted: answer it here
                with self._lock:
                    self._tickets.pop(ticket.key, None)
                result = GenerationResult(
                    ticket.request, 0, [], "", "cancelled", "the server is shutting down"
                )
                ticket.result = result
                ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, result)

    def close(self) -> None:
        """Cancel what runs and waits, then stop the loop and the engine.

        This returns within a step or two: a step's work is bounded, long prompts included.
        """
        self.cancel_all()
        self._thread.join(timeout=30)
        self.engine.close()

    # -- engine thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self.engine.run(
                self.queue, on_token=self._on_token, on_finish=self._on_finish, contain_failures=True
            )
        except BaseException as e:  # pragma: no cover - run() contains failures by request
            self._failure = e
            raise

    def _on_token(self, key: int, token: int, text: str) -> None:
        ticket = self._tickets.get(key)
        if ticket is None:
            return
        if key not in self._started_keys:
            self._started_keys.add(key)
            self.metrics.time_to_first_token.observe(time.perf_counter() - ticket.submitted)
        self.metrics.tokens.inc()
        ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, TokenEvent(token, text))

    def _on_finish(self, key: int, result: GenerationResult) -> None:
        with self._lock:
            ticket = self._tickets.pop(key, None)
        self._started_keys.discard(key)
        self.metrics.finished(result)
        if ticket is None:
            return
        ticket.result = result
        ticket.loop.call_soon_threadsafe(ticket.events.put_nowait, result)
