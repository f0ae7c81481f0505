"""Options that ``wasmshare run`` and ``wasmshare serve`` share, and their check (one line on failure)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import WasmshareError
from ..llm.limits import DEFAULT_DEADLINE_MS
from ..llm.requests import StallPolicy, check_stall_settings
from ._output import fail

__all__ = [
    "DEFAULT_DEADLINE_MS",
    "ControllerDeadlineOption",
    "StallPolicyOption",
    "StepBudgetOption",
    "check_stall_options",
]

StallPolicyOption = Annotated[
    str,
    typer.Option(help="sit_out (default): a late controller's row sits the step out; wait: hold the batch."),
]
StepBudgetOption = Annotated[
    float | None,
    typer.Option(help="How long past the forward pass to wait for controllers (default: 10% of it)."),
]
ControllerDeadlineOption = Annotated[float, typer.Option(help="Per-step deadline of a controller, in ms.")]


def check_stall_options(stall_policy: str, step_budget_ms: float | None) -> StallPolicy:
    """``--stall-policy`` as the engine takes it; a bad value or ``--step-budget-ms`` fails."""
    try:
        check_stall_settings(stall_policy, step_budget_ms, names=("--stall-policy", "--step-budget-ms"))
    except WasmshareError as e:
        raise fail(str(e)) from None
    return stall_policy  # type: ignore[return-value]  # checked just above
