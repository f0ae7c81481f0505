"""Stepping a batch's slot runners in this process: inline, or spread over a thread pool.

A trivial controller call is cheaper than handing work to another thread and contending
for the GIL around it, while controllers that compute for longer run in parallel (wasm
calls and llguidance's mask computation release the GIL). :class:`ThreadRunner` measures
both ways on the batch's own workload and keeps the faster, probing the other now and then.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from ._regions import SlotRunner, fail_instance

__all__ = ["PROBE_EVERY", "Steppable", "ThreadRunner", "run_chunk"]

PROBE_EVERY = 64
"""Steps between two runs the slower way, to notice when the faster way changes."""


class Steppable(SlotRunner, Protocol):
    """A slot runner that can be stepped: a controller or a constraint instance."""

    def step(self) -> None: ...


def run_chunk(instances: Sequence[Steppable]) -> None:
    """Step each instance; an exception out of one (a host bug, not a guest fault, which the
    instances report themselves) ends that sequence alone through its status record."""
    for instance in instances:
        try:
            instance.step()
        except Exception as e:  # noqa: BLE001 - contained to the one sequence
            fail_instance(instance, e)


class ThreadRunner:
    """The thread pool of a batch in thread mode, and the choice between it and running inline.

    :meth:`line_up` sets the instances to step (in slot order) whenever the batch's
    sequences change, which also forgets the costs measured for the previous line-up.
    ``parallel`` forces the choice (True: always the pool, False: always inline).
    Used from the batch's thread only; :meth:`close` stops the pool.
    """

    def __init__(self, n_threads: int, parallel: bool | None) -> None:
        self.n_threads = n_threads
        self.pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="wasmshare-ctrl")
        self.run_cost = [0.0, 0.0]
        """Moving averages of a step's cost (µs) run inline and on the pool; 0 until measured."""
        self._force_parallel = parallel
        self._runs = 0
        self._chunks: list[list[Steppable]] | None = None

    @property
    def lined_up(self) -> bool:
        """True while the last :meth:`line_up` still holds."""
        return self._chunks is not None

    def line_up(self, instances: Sequence[Steppable]) -> None:
        """Deal ``instances`` round-robin into one chunk per thread and start measuring afresh."""
        chunks: list[list[Steppable]] = [[] for _ in range(self.n_threads)]
        for i, instance in enumerate(instances):
            chunks[i % self.n_threads].append(instance)
        self._chunks = [c for c in chunks if c]
        self.run_cost = [0.0, 0.0]

    def forget(self) -> None:
        """Drop the line-up: the batch's sequences changed."""
        self._chunks = None

    def run(self, *, measure: bool = True) -> None:
        """Step every lined-up instance once; with ``measure``, the cost counts for the choice."""
        chunks = self._chunks
        if not chunks:
            return
        parallel = self._choose_parallel(len(chunks))
        started = time.perf_counter()
        if not parallel:
            for chunk in chunks:
                run_chunk(chunk)
        else:
            futures = [self.pool.submit(run_chunk, c) for c in chunks[1:]]
            run_chunk(chunks[0])  # the calling thread works too
            for f in futures:
                f.result()
        if not measure:
            return
        cost = (time.perf_counter() - started) * 1e6
        previous = self.run_cost[parallel]
        self.run_cost[parallel] = cost if previous == 0.0 else 0.8 * previous + 0.2 * cost

    def _choose_parallel(self, n_chunks: int) -> bool:
        if n_chunks < 2:
            return False
        if self._force_parallel is not None:
            return self._force_parallel
        self._runs += 1
        inline, pooled = self.run_cost
        if inline == 0.0 or pooled == 0.0:
            return inline != 0.0  # measure each way once
        best = pooled < inline
        return (not best) if self._runs % PROBE_EVERY == 0 else best

    def close(self) -> None:
        """Wait for the pool's threads and stop them."""
        self.pool.shutdown(wait=True)
