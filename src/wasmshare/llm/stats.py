"""Counters over the life of an :class:`~wasmshare.llm.engine.Engine`.

Times are seconds of wall clock on the engine thread unless a name says otherwise;
``controller_s`` is measured on the helper thread that runs the controller phase beside
the forward pass, so it may overlap ``forward_s``. Written by the engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineStats"]


@dataclass
class EngineStats:
    """Counters over the life of an engine (times in seconds unless named otherwise).

    ``deferred_masks`` counts the constraint masks left uncomputed beside the forward pass;
    ``late_masks`` those of them computed after it because the draw was forbidden, and
    ``runner_up_draws`` those never computed because one of the next few argmaxes was allowed.

    Under ``stall_policy="sit_out"``: ``sat_out_steps`` counts row-steps the batch took
    without a row whose controller was late, ``late_answers`` the late controller answers
    taken up afterwards, ``max_lag_steps`` the most steps in a row one sequence sat out,
    and ``budget_wait_s`` the time spent waiting for controllers past the forward pass
    within the step budget.
    """

    steps: int = 0
    generated_tokens: int = 0
    forward_s: float = 0.0
    prefill_s: float = 0.0
    controller_s: float = 0.0
    critical_controller_s: float = 0.0
    apply_s: float = 0.0
    decode_s: float = 0.0
    fast_forward_tokens: int = 0
    bytes_copied: int = 0
    deferred_masks: int = 0
    late_masks: int = 0
    runner_up_draws: int = 0
    sat_out_steps: int = 0
    late_answers: int = 0
    max_lag_steps: int = 0
    budget_wait_s: float = 0.0

    @property
    def controller_us_per_step(self) -> float:
        """The controller phase per step (µs), hidden by the overlap or not.

        :attr:`work_us_per_step` adds the work after the forward pass.
        """
        return self.controller_s / self.steps * 1e6 if self.steps else 0.0

    @property
    def work_us_per_step(self) -> float:
        """All controller and mask work per step (µs).

        The controller phase plus applying and checking outputs after the forward pass
        (deferred masks computed there included).
        """
        return (self.controller_s + self.apply_s) / self.steps * 1e6 if self.steps else 0.0

    @property
    def critical_us_per_step(self) -> float:
        """Controller/mask work left on the critical path per step after the overlap, plus apply (µs)."""
        return (self.critical_controller_s + self.apply_s) / self.steps * 1e6 if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding (prefill excluded)."""
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0
