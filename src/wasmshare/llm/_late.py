"""Steps that may be cut short: each controller its own task, and those still running after the cut.

With ``ControllerBatch.step(cut=...)`` every controller of the step runs as a task of its
own (an instance in this process on a thread of its own, a worker process through its
futex) and the step returns with whatever answered as soon as the :class:`StepCut` is
set. The others keep running in their slots, which no later step touches, until
``ControllerBatch.collect_late`` takes their answers. A local controller gets a thread of
its own, up to one per slot: with a pool the size of the CPU count, two slow controllers
would hold every thread and queue the fast ones behind them. A worker process runs its
slots one after another, so in worker mode a cut step leaves all of a slow worker's
sequences late, not only the slow one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from ._threads import Steppable, run_chunk
from ._workers import WorkerPool

__all__ = ["Flight", "Flights", "StepCut"]

POLL_S = 0.0005
"""How often a wait looks at worker processes' done words (local tasks notify instead)."""


class _Stepped(Protocol):
    @property
    def sequence_id(self) -> int: ...
    @property
    def slot(self) -> int: ...
    @property
    def worker(self) -> int: ...
    @property
    def instance(self) -> Steppable | None: ...


class StepCut:
    """Ends a ``ControllerBatch.step(cut=...)`` early: after :meth:`set` it returns with the
    controllers that have answered. Thread-safe; one per step.

    The step does not wait for the sequences in ``expendable`` at all: it returns as soon
    as the others have answered (an engine names those that were late at their last step,
    which will most likely be late again)."""

    def __init__(self, wake: threading.Condition, expendable: frozenset[int] = frozenset()) -> None:
        self._wake = wake
        self._set = False
        self.expendable = expendable

    def set(self) -> None:
        """Cut the step now (from any thread)."""
        with self._wake:
            self._set = True
            self._wake.notify_all()

    def is_set(self) -> bool:
        """True once :meth:`set` was called."""
        return self._set


@dataclass
class Flight:
    """One sequence's step started by a cuttable step: on a local thread or a worker."""

    sequence_id: int
    slot: int
    worker: int  # -1: a local instance, run by ``future``
    future: Future[None] | None = None
    over: bool = False  # a worker flight whose step was already finished (see :meth:`Flights.finish_workers`)


class Flights:
    """The tasks of cuttable steps and the registry of those still running (:attr:`running`).

    Starting, waiting and landing happen on the batch's thread; the local tasks run on
    this object's pool and only notify :attr:`wake` when they end.
    """

    def __init__(self, capacity: int, workers: WorkerPool) -> None:
        self.wake = threading.Condition()
        self.running: dict[int, Flight] = {}
        """Sequence id → its flight, for every step that was started and not landed."""
        self._capacity = capacity
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def new_cut(self, expendable: Iterable[int] = ()) -> StepCut:
        """A cut for the next step, woken with this registry's condition."""
        return StepCut(self.wake, frozenset(expendable))

    @property
    def busy_workers(self) -> set[int]:
        """Workers with a step still running."""
        return {f.worker for f in self.running.values() if f.worker >= 0}

    def start(self, stepped: Sequence[_Stepped]) -> list[Flight]:
        """Start a step of each of ``stepped`` (their worker slots' run flags already set)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._capacity, thread_name_prefix="wasmshare-ctrl")
        flights: list[Flight] = []
        busy: set[int] = set()
        for seq in stepped:
            if seq.worker >= 0:
                flight = Flight(seq.sequence_id, seq.slot, seq.worker)
                busy.add(seq.worker)
            elif seq.instance is not None:
                future = self._pool.submit(run_chunk, [seq.instance])
                future.add_done_callback(self._notify)
                flight = Flight(seq.sequence_id, seq.slot, -1, future)
            else:
                continue
            flights.append(flight)
            self.running[seq.sequence_id] = flight
        for w in sorted(busy):
            self._workers[w].start_step()
        return flights

    def _notify(self, _future: Future[None]) -> None:
        with self.wake:
            self.wake.notify_all()

    def answered(self, flight: Flight) -> bool:
        """Without waiting: True once ``flight``'s step is over (for a worker: answered, dead or hung)."""
        if flight.future is not None:
            return flight.future.done()
        return flight.over or self._workers[flight.worker].step_answered()

    def wait(
        self,
        flights: Iterable[Flight],
        cut: StepCut | None = None,
        *,
        first: bool = False,
        timeout_s: float | None = None,
    ) -> None:
        """Wait until every one of ``flights`` is over (the expendable ones of ``cut`` aside),
        ``cut`` is set, or ``timeout_s`` has passed; with ``first``, until any one is over."""
        pending = list(flights)
        if cut is not None and cut.expendable:
            pending = [f for f in pending if f.sequence_id not in cut.expendable]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.wake:
            while True:
                left = [f for f in pending if not self.answered(f)]
                if not left or (first and len(left) < len(pending)) or (cut is not None and cut.is_set()):
                    return
                pending = pending if first else left
                timeout = POLL_S if any(f.future is None for f in left) else None
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return
                    timeout = remaining if timeout is None else min(timeout, remaining)
                self.wake.wait(timeout=timeout)

    def land(self, flights: Iterable[Flight]) -> list[Flight]:
        """Take over answered ``flights``: finish their workers' steps and forget them; returns them."""
        landed = [f for f in flights if self.running.get(f.sequence_id) is f]
        self._finish([f for f in landed if f.worker >= 0 and not f.over])
        for flight in landed:
            del self.running[flight.sequence_id]
        return landed

    def finish_workers(self, workers: Iterable[int]) -> list[Flight]:
        """Wait until ``workers`` are idle, so they can take a new step; returns their flights.

        The flights stay :attr:`running` (their results wait for the batch to land them) but
        are marked over, as the next step moves the workers' counters on."""
        chosen = set(workers)
        flights = [f for f in self.running.values() if f.worker in chosen and not f.over]
        self.wait(flights)
        self._finish(flights)
        return flights

    def _finish(self, flights: list[Flight]) -> None:
        for w in sorted({f.worker for f in flights}):
            self._workers[w].finish_step()  # answered: returns at once, or restarts a dead worker
        for flight in flights:
            flight.over = True

    def close(self) -> None:
        """Wait for every running step and stop the pool."""
        self.wait(list(self.running.values()))
        self.land(list(self.running.values()))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
