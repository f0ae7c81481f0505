"""What one controller may spend per call: the one limits object every layer passes down.

The engine, the HF adapter, the server and the batch take a :class:`Limits` and hand the same
object to each controller, so a deadline set at the edge (``--controller-deadline-ms``, an
``Engine(limits=...)``) is the deadline every guest call gets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import WasmshareError

DEFAULT_DEADLINE_MS = 100.0
"""The per-call deadline a controller gets unless the caller sets one."""


@dataclass(frozen=True)
class Limits:
    """Per-controller limits, each per call: wall-clock deadline, fuel, memory.

    ``deadline_ms`` is wall time per guest call, enforced by epoch interruption (None: no
    deadline); ``fuel`` counts wasm instructions per call (None: unmetered);
    ``memory_limit_bytes`` caps the guest's linear memory, lent rows included. A guest past a
    limit traps and its sequence ends with :class:`GuestLimitExceeded`; the others go on.
    """

    deadline_ms: float | None = DEFAULT_DEADLINE_MS
    fuel: int | None = None
    memory_limit_bytes: int | None = 256 << 20

    def __post_init__(self) -> None:
        d = self.deadline_ms
        if d is not None and (
            isinstance(d, bool) or not isinstance(d, (int, float)) or not math.isfinite(d) or d <= 0
        ):
            raise WasmshareError(f"deadline_ms must be a positive number of milliseconds or None, got {d!r}")
        for name in ("fuel", "memory_limit_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise WasmshareError(f"{name} must be a positive int or None, got {value!r}")
