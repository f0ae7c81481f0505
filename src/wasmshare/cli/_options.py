"""Option checks that ``wasmshare run`` and ``wasmshare serve`` share, each failing in one line."""

from __future__ import annotations

import math

from ..llm.requests import STALL_POLICIES, StallPolicy
from ._output import fail

__all__ = ["check_stall_options"]


def check_stall_options(stall_policy: str, step_budget_ms: float | None) -> StallPolicy:
    """``--stall-policy`` as the engine takes it; a bad value or ``--step-budget-ms`` fails."""
    if stall_policy not in STALL_POLICIES:
        raise fail(f"--stall-policy must be sit_out or wait, got {stall_policy!r}")
    if step_budget_ms is not None and not (math.isfinite(step_budget_ms) and step_budget_ms >= 0):
        raise fail(f"--step-budget-ms must be a finite number >= 0, got {step_budget_ms}")
    return stall_policy
