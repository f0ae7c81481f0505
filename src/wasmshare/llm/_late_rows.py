"""The engine's side of controllers that answer late: when to cut a step, who sits out, what comes back.

Under ``stall_policy="sit_out"`` the engine waits for the controller phase at most the
step budget past the forward pass, then cuts the step (:class:`~wasmshare.llm._late.StepCut`).
A row whose controller has not answered keeps the logits of that forward pass and is fed
nothing until its answer comes; then it draws from those logits under that answer, so
nothing is ever sampled without its controller's output. Used from the engine thread only,
except :meth:`LateRows.await_phase`'s cut, which the helper thread's step sees.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Container, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, TypeVar

from ._rows import Row
from .batch import BatchStep, ControllerBatch, RowOutput, StepCut
from .requests import StallPolicy
from .stats import EngineStats

if TYPE_CHECKING:
    import torch

__all__ = ["IDLE_WAIT_S", "STEP_BUDGET_FRACTION", "LateAnswers", "LateRows"]

STEP_BUDGET_FRACTION = 0.1
"""The step budget without ``step_budget_ms``: how long past the forward pass (as a fraction
of the time it and the prefill took) the batch waits for controllers that have not answered."""

IDLE_WAIT_S = 0.05
"""How long a batch whose every row waits for a late controller waits before it looks at the queue again."""

LateAnswers = tuple[BatchStep | None, dict[int, RowOutput] | None]
"""Late controller answers taken up after a step, and their outputs as ids (sparse apply) or None."""

NO_ANSWERS: LateAnswers = (None, None)

_Phase = TypeVar("_Phase")


class LateRows:
    """One engine's stall policy at work over its :class:`ControllerBatch` (see the module docstring).

    ``policy`` and ``step_budget_ms`` come checked (:func:`~wasmshare.llm.requests.check_stall_settings`)."""

    def __init__(
        self,
        batch: ControllerBatch,
        stats: EngineStats,
        policy: StallPolicy,
        step_budget_ms: float | None,
    ) -> None:
        self.batch = batch
        self.stats = stats
        self.default: StallPolicy = policy
        self.step_budget_ms = step_budget_ms

    def policy(self, row: Row) -> StallPolicy:
        """The row's own policy, else the engine's."""
        return row.request.stall_policy or self.default

    def cut_for(self, rows: Sequence[Row], joining: Sequence[Row]) -> StepCut | None:
        """A cut for this step's controller phase when any row may sit out (None: wait for all).

        Rows late at their last step are expendable: the step does not wait for them (their
        answer is taken when it comes)."""
        steered = [r for r in (*rows, *joining) if r.sequence_id is not None]
        if not self.batch.late and all(self.policy(r) == "wait" for r in steered):
            return None
        expendable = [
            r.sequence_id
            for r in steered
            if r.sequence_id is not None and r.late_last and self.policy(r) == "sit_out"
        ]
        return self.batch.new_cut(expendable)

    def steer(self, rows: Sequence[Row], sampled: dict[int, int]) -> dict[int, list[int]]:
        """What a cuttable step gets: each sequence not still late, with its sampled token if any."""
        waiting = self.batch.late
        steer: dict[int, list[int]] = {sid: [] for sid in self.batch.sequences if sid not in waiting}
        for r in rows:
            if r.sequence_id in steer and id(r) in sampled:
                steer[r.sequence_id] = [sampled[id(r)]]
        return steer

    def await_phase(self, future: Future[_Phase], cut: StepCut | None, spent_s: float) -> _Phase:
        """The controller phase's result; with ``cut``, waited for at most the step budget
        (``spent_s``: the time the forward pass and prefill took since it was submitted)."""
        if cut is None:
            return future.result()
        budget = (
            self.step_budget_ms / 1000 if self.step_budget_ms is not None else STEP_BUDGET_FRACTION * spent_s
        )
        started = time.perf_counter()
        try:
            phase = future.result(timeout=budget)
        except concurrent.futures.TimeoutError:
            cut.set()
            phase = future.result()
        self.stats.budget_wait_s += time.perf_counter() - started
        return phase

    def note(
        self,
        rows: Sequence[Row],
        logits: torch.Tensor,
        ctrl: BatchStep | None,
        analyse: Container[int],
        *,
        sparse: bool,
        idle: bool = False,
    ) -> LateAnswers:
        """After a cuttable step: rows left late keep their logits; late answers that came
        are taken up (waited for, for rows whose policy is ``"wait"``); returns those.

        ``idle``: no row had anything to feed, so no forward pass ran; rather than spin,
        wait for the first late answer (at most :data:`IDLE_WAIT_S`, then look at the queue)."""
        late_now = set(ctrl.late) if ctrl is not None else set()
        answered = set(ctrl.sequence_ids.tolist()) if ctrl is not None else set()
        must_wait = []
        for i, row in enumerate(rows):
            sid = row.sequence_id
            if sid in late_now:
                row.kept_logits = logits[i].clone()
                row.late_last = True
                if self.policy(row) == "wait":
                    must_wait.append(sid)
            elif sid in answered:
                row.late_last = False
        if not self.batch.late:
            return NO_ANSWERS
        if idle and not must_wait:
            step = self.batch.collect_late(wait=self.batch.late, first=True, timeout_s=IDLE_WAIT_S)
        else:
            step = self.batch.collect_late(wait=must_wait)
        if step is None:
            return NO_ANSWERS
        self.stats.late_answers += len(step.sequence_ids)
        return step, (self.batch.row_outputs(step, analyse=analyse) if sparse else None)

    def restore(self, rows: Sequence[Row], logits: torch.Tensor, late: BatchStep | None) -> set[int]:
        """Put back the kept logits of the rows whose late answer came; returns their sequence ids.

        A row whose answer feeds tokens (fast-forward, backtrack) drops its kept logits: it
        draws after the next forward pass instead."""
        returning = set(late.sequence_ids.tolist()) if late is not None else set()
        for i, row in enumerate(rows):
            if row.kept_logits is not None and row.sequence_id in returning:
                if not row.feed:
                    logits[i] = row.kept_logits
                row.kept_logits = None
        return returning

    def sit_out(self, row: Row) -> None:
        """Count a step the batch takes without ``row`` (its controller is late)."""
        row.sat_out += 1
        row.lag += 1
        self.stats.sat_out_steps += 1
        self.stats.max_lag_steps = max(self.stats.max_lag_steps, row.lag)
