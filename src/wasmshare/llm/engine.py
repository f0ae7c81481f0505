"""Engine: batched decoding over a transformers causal LM, steered by controllers and constraints.

Every request is a row of one running batch over one :class:`~wasmshare.llm._kv_cache.KVCache`.
Rows join between steps (their prompt is prefilled and merged into the cache) and leave
when they finish; a backtrack masks the trimmed cache positions, and fast-forward tokens
are fed in the next forward pass together with the other rows' sampled tokens.
Constrained rows are sequences of a :class:`~wasmshare.llm.batch.ControllerBatch`.

The controller phase for step *t* needs only the token sampled at *t-1*, so it runs on a
helper thread while the model computes the forward pass of that token (wasm calls,
llguidance and torch release the GIL); what is left of it on the critical path is
counted in :attr:`EngineStats.critical_controller_s`. No torch op runs on the helper:
torch ops on both threads compete for the cores the forward pass uses.

Masks reach the logits densely (one additive ``[B, V]`` tensor, cheap on an accelerator)
or sparsely (each draw checked against its row's mask, see :mod:`~wasmshare.llm.sampling`),
which on a CPU keeps the mask work off the cores the forward pass fills. Requests, results
and the queue are in :mod:`~wasmshare.llm.requests`, the counters in :mod:`~wasmshare.llm.stats`.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
import time
from collections.abc import Callable, Container, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from ..errors import WasmshareError
from ._actions import apply_dense, take_actions
from ._kv_cache import KVCache
from ._late_rows import NO_ANSWERS, STEP_BUDGET_FRACTION, LateAnswers, LateRows
from ._rows import PendingPrefill, Row, RowText, accept_tokens, build_row, plan_controller_phase, start_error
from .batch import ControllerBatch, StepCut
from .constraints import Backend
from .limits import Limits
from .requests import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    QueueFull,
    RequestQueue,
    StallPolicy,
    check_stall_settings,
    default_max_work,
)
from .results import BatchStep, Output, RowOutput
from .sampling import first_choices, sample, sample_steered, unusable_reason
from .stats import EngineStats

if TYPE_CHECKING:
    import torch

    from .models import LoadedModel

__all__ = [
    "Engine",
    "EngineStats",
    "FinishReason",
    "GenerationRequest",
    "GenerationResult",
    "MaskApply",
    "QueueFull",
    "RequestQueue",
    "STEP_BUDGET_FRACTION",
    "StallPolicy",
    "default_max_work",
]

MaskApply = Literal["auto", "sparse", "dense"]


OnToken = Callable[[int, int, str], None]
OnFinish = Callable[[int, GenerationResult], None]


class _ControllerPhase(NamedTuple):
    """What the helper thread hands back: the step, and its outputs as ids (sparse apply) or None."""

    step: BatchStep
    outputs: dict[int, RowOutput] | None


class Engine:
    """Batched, steered generation for one :class:`~wasmshare.llm.models.LoadedModel`.

    ``max_batch`` rows decode together; more wait in the queue and join as others finish.
    ``mode``, ``limits`` and ``grammar_backend`` go to the :class:`ControllerBatch`.
    ``overlap=False`` runs the controller phase after the forward pass instead of beside it.

    ``mask_apply`` says how masks reach the logits: ``"sparse"`` (the default on the CPU)
    checks each draw against its row's mask and looks at the mask as a whole only when the
    draw is forbidden (:func:`~wasmshare.llm.sampling.sample_steered`); ``"dense"`` (the
    default on other devices) adds one additive ``[B, V]`` tensor built from the bitmasks.
    Both give the same greedy tokens; seeded sampling draws from the same distribution, not
    with the same random numbers. ``defer_masks`` (sparse only) leaves greedy rows'
    constraint masks uncomputed beside the forward pass until a draw needs one (a joining
    row's first mask is computed beside its prefill); wasm controllers' masks, dense masks
    and masks in ``mode="workers"`` are always computed beside the forward pass.

    ``prefill_chunk_tokens`` bounds the prompt tokens one step prefills: a longer prompt is
    prefilled a chunk per step in a cache of its own while the running rows decode, and
    joins the batch (its controller starts then) when it is done.

    ``stall_policy`` says what the batch does about a controller that has not answered when
    the forward pass is done. ``"sit_out"`` (the default) waits at most the step budget
    (``step_budget_ms``, or :data:`STEP_BUDGET_FRACTION` of the forward pass and prefill),
    then samples the rows that have answered and goes on without the others: a late row
    keeps its logits, is fed nothing, and when its controller answers (a later step) it
    samples from those logits under that answer and rejoins with the token. Nothing is
    sampled without its controller's output, so greedy outputs are those of ``"wait"``,
    which holds every row until every controller has answered. A row late at its last
    step is not waited for at all (its answer is taken when it comes). The hard limits
    (:class:`Limits`) still end a runaway controller's sequence with its error. A request
    may set its own ``stall_policy``. Sitting out needs ``overlap``; a late row's
    cancellation waits for its running call (at most its deadline). Counted in
    :class:`EngineStats` (``sat_out_steps``, ``late_answers``, ``max_lag_steps``) and per
    result (``sat_out_steps``).

    What fails: an invalid request (empty prompt, ``max_tokens <= 0``, a prompt as long as
    :attr:`LoadedModel.context_length`) raises :class:`~wasmshare.errors.WasmshareError`
    from :meth:`generate` and ends alone with an error under :meth:`run`; a controller that
    fails, or whose output leaves nothing to draw, ends its row with an error before any
    draw; a row that reaches the context ends with ``"length"``. One :meth:`run` or
    :meth:`generate` at a time per engine: a second concurrent call raises.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        max_batch: int = 8,
        mode: Literal["threads", "workers"] = "threads",
        limits: Limits | None = None,
        overlap: bool = True,
        grammar_backend: Backend = "llguidance",
        mask_apply: MaskApply = "auto",
        defer_masks: bool = True,
        prefill_chunk_tokens: int = 256,
        stall_policy: StallPolicy = "sit_out",
        step_budget_ms: float | None = None,
    ) -> None:
        if max_batch <= 0:
            raise WasmshareError(f"max_batch must be positive, got {max_batch}")
        check_stall_settings(stall_policy, step_budget_ms)
        self.stall_policy: StallPolicy = stall_policy
        self.step_budget_ms = step_budget_ms
        if not isinstance(prefill_chunk_tokens, int) or prefill_chunk_tokens <= 0:
            raise WasmshareError(f"prefill_chunk_tokens must be a positive int, got {prefill_chunk_tokens!r}")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.context_length: int | None = loaded.context_length
        self._prefilling: list[PendingPrefill] = []
        if mask_apply not in ("auto", "sparse", "dense"):
            raise WasmshareError(f"mask_apply must be 'auto', 'sparse' or 'dense', got {mask_apply!r}")
        self.loaded = loaded
        self.model = loaded.model
        self.max_batch = max_batch
        self.overlap = overlap
        self.batch = ControllerBatch(
            loaded.token_table,
            capacity=max_batch,
            mode=mode,
            limits=limits,
            grammar_backend=grammar_backend,
        )
        self.device = next(self.model.parameters()).device
        self.sparse_apply = mask_apply == "sparse" or (mask_apply == "auto" and self.device.type == "cpu")
        self.defer_masks = defer_masks and self.sparse_apply
        self.stats = EngineStats()
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wasmshare-engine")
        self._text = RowText(loaded.tokenizer, set(loaded.eos_token_ids))
        self._width = int(loaded.vocab_size)
        self._inflight: Future[_ControllerPhase] | None = None
        self._inflight_cut: StepCut | None = None
        self._busy = threading.Lock()
        self._kv = KVCache(self.device)
        self._late = LateRows(self.batch, self.stats, stall_policy, step_budget_ms)

    def close(self) -> None:
        """Stop the controller batch and helper thread. Safe to call twice."""
        self._helper.shutdown(wait=True)
        self.batch.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _attn(self) -> torch.Tensor | None:
        """The running cache's attention mask (None while no row decodes)."""
        return self._kv.mask

    # -- public --------------------------------------------------------------------------------

    def generate(
        self, requests: Iterable[GenerationRequest], on_token: OnToken | None = None
    ) -> list[GenerationResult]:
        """Complete every request; results come back in request order.

        ``on_token(request_index, token_id, text_so_far)`` is called as tokens are accepted
        (for streaming). A request whose controller fails ends with ``finish_reason ==
        "error"`` and the error text; the others are unaffected. A request that is invalid
        in itself (empty prompt, ``max_tokens <= 0``) raises before anything runs.
        """
        queue = RequestQueue()
        keys = [queue.submit(r) for r in requests]
        queue.close()
        # Built (prompts encoded, requests checked) before anything runs; run() admits these rows.
        prebuilt = {key: self._make_row(key, request) for key, request in queue.take(len(keys))}
        results: dict[int, GenerationResult] = {}
        self._run_guarded(queue, on_token, results.__setitem__, False, prebuilt)
        return [results[k] for k in keys]

    def run(
        self,
        queue: RequestQueue,
        *,
        on_token: OnToken | None = None,
        on_finish: OnFinish | None = None,
        contain_failures: bool = False,
    ) -> None:
        """Continuous batching: decode requests from ``queue`` until it is closed and drained.

        A request joins the running batch at the next step after it is submitted and leaves
        it as soon as it finishes or is cancelled (:meth:`RequestQueue.cancel`), freeing its
        slot. ``on_token(key, token_id, text_so_far)`` streams accepted tokens and
        ``on_finish(key, result)`` delivers each result, keyed by what
        :meth:`RequestQueue.submit` returned. An invalid request finishes with an error.
        With ``contain_failures`` an unexpected failure of a step (the model raising, say)
        ends the requests in that batch with an error and decoding goes on with the rest of
        the queue, instead of raising.
        """
        self._run_guarded(queue, on_token, on_finish, contain_failures, {})

    # -- the loop ------------------------------------------------------------------------------

    def _run_guarded(
        self,
        queue: RequestQueue,
        on_token: OnToken | None,
        on_finish: OnFinish | None,
        contain_failures: bool,
        prebuilt: dict[int, Row],
    ) -> None:
        """:meth:`run` for one caller at a time; ``prebuilt`` rows are admitted before the queue's."""
        if not self._busy.acquire(blocking=False):
            raise WasmshareError(
                "this Engine is already decoding (one run or generate at a time); use another Engine"
            )
        try:
            self._run_queue(queue, on_token, on_finish, contain_failures, prebuilt)
        finally:
            self._busy.release()

    def _run_queue(
        self,
        queue: RequestQueue,
        on_token: OnToken | None,
        on_finish: OnFinish | None,
        contain_failures: bool,
        prebuilt: dict[int, Row],
    ) -> None:
        finish = on_finish or (lambda key, result: None)
        while True:
            rows: list[Row] = []
            joining: list[Row] = []
            try:
                self._run_batch(queue, rows, joining, on_token, finish, prebuilt)
                return
            except Exception as e:  # noqa: BLE001 - contained by request, see docstring
                inflight, self._inflight = self._inflight, None
                if inflight is not None:
                    if self._inflight_cut is not None:  # take what answered; remove() waits for the rest
                        self._inflight_cut.set()
                    concurrent.futures.wait([inflight])  # the controller phase must end before cleanup
                pending, self._prefilling = [p.row for p in self._prefilling], []
                for row in rows + joining + pending:
                    if row.reported:
                        continue  # finished before the failure, its result already handed over
                    if row.finish is None:
                        row.finish, row.error = "error", f"engine failure: {type(e).__name__}: {e}"
                    self._report(row, finish)
                self._kv.clear()
                if not contain_failures:
                    raise

    def _run_batch(
        self,
        queue: RequestQueue,
        rows: list[Row],
        joining: list[Row],
        on_token: OnToken | None,
        finish: OnFinish,
        prebuilt: dict[int, Row],
    ) -> None:
        """The decode loop of :meth:`run`; ``rows`` (filled in place) are the live sequences and
        ``joining`` those admitted but not yet in ``rows`` (both finished by the caller if a step fails)."""
        import torch

        self._kv.clear()
        logits: torch.Tensor | None = None
        ctrl: BatchStep | None = None
        outputs: dict[int, RowOutput] | None = None
        late: LateAnswers = NO_ANSWERS
        with torch.inference_mode():
            while True:
                if not rows and not prebuilt and not self._prefilling and not queue.wait_for_work():
                    return
                started = time.perf_counter()
                cancelled = queue.take_cancelled()
                if cancelled and rows:
                    assert logits is not None
                    for row in rows:
                        if row.index in cancelled:
                            row.finish = "cancelled"
                            self._report(row, finish)
                    rows[:], logits = self._drop_finished(rows, logits)
                if cancelled and self._prefilling:
                    for pending in [p for p in self._prefilling if p.row.index in cancelled]:
                        self._prefilling.remove(pending)
                        pending.row.finish = "cancelled"
                        self._report(pending.row, finish)
                if rows:
                    assert logits is not None
                    ended = self._take_actions(rows, ctrl, on_token) + self._take_actions(
                        rows, late[0], on_token
                    )
                    for row in ended:
                        self._report(row, finish)
                    rows[:], logits = self._drop_finished(rows, logits)
                sampled: dict[int, int] = {}
                if rows:
                    assert logits is not None
                    sampled = self._draw(rows, logits, ctrl, outputs, late, on_token)
                    for row in rows:
                        self._check_limits(row)
                        if row.finish is not None:
                            self._report(row, finish)
                    keep = [i for i, r in enumerate(rows) if r.finish is None]
                    if len(keep) != len(rows):
                        self._select_rows(keep)
                        rows[:] = [rows[i] for i in keep]
                new_rows = joining
                self._admit(queue, rows, new_rows, prebuilt, finish)
                # A long prompt advances by one chunk; once all but its last token are cached
                # it joins the running rows and that token is its first feed.
                if self._prefilling:
                    self._advance_prefill(rows, finish)
                # The controller phase for the next step runs beside the prefill and the forward pass.
                future: Future[_ControllerPhase] | None = None
                ctrl, outputs, late = None, None, NO_ANSWERS
                has_controllers, analyse, defer = plan_controller_phase(
                    rows, new_rows, defer_masks=self.defer_masks, overlap=self.overlap
                )
                cut = self._late.cut_for(rows, new_rows) if has_controllers and self.overlap else None
                steer: np.ndarray[Any, Any] | dict[int, list[int]]
                steer = (
                    self._sampled_by_slot(rows, sampled) if cut is None else self._late.steer(rows, sampled)
                )
                waiting = self.batch.late  # before this step's own flights start
                submitted = time.perf_counter()
                if has_controllers and self.overlap:
                    future = self._inflight = self._helper.submit(
                        self._timed_step, steer, analyse, defer, cut
                    )
                    self._inflight_cut = cut
                prefill_started = time.perf_counter()
                prefilled = self._prefill(new_rows) if new_rows else None
                prefill_s = time.perf_counter() - prefill_started
                feeds = [r.feed or ([sampled[id(r)]] if id(r) in sampled else []) for r in rows]  # late: []
                idle = bool(rows) and not new_rows and not any(feeds)  # every row waits for its controller
                decoded = bool(rows) and not idle
                if decoded:
                    for r in rows:
                        if r.sequence_id in waiting:
                            self._late.sit_out(r)
                        else:
                            r.steps += 1
                        r.feed = []
                    forward_started = time.perf_counter()
                    logits = self._forward(feeds, rows)
                    self.stats.forward_s += time.perf_counter() - forward_started
                if new_rows:
                    assert prefilled is not None
                    new_logits, new_cache = prefilled
                    self._kv.merge(new_cache)  # after the forward of the rows already running
                    logits = new_logits if not rows else torch.cat([logits, new_logits], dim=0)  # type: ignore[list-item]
                    rows.extend(new_rows)
                    new_rows.clear()
                if has_controllers:
                    wait_started = time.perf_counter()
                    ctrl, outputs = (
                        self._late.await_phase(future, cut, wait_started - submitted)
                        if future is not None
                        else self._timed_step(steer, analyse, defer)
                    )
                    self._inflight = None
                    if cut is not None:
                        assert logits is not None
                        late = self._late.note(
                            rows, logits, ctrl, analyse, sparse=self.sparse_apply, idle=idle
                        )
                    self.stats.critical_controller_s += time.perf_counter() - wait_started
                if decoded:
                    self.stats.steps += 1
                    self.stats.decode_s += time.perf_counter() - started - prefill_s
                self.stats.bytes_copied = self.batch.bytes_copied  # what the guests' counters record

    def _draw(
        self,
        rows: list[Row],
        logits: torch.Tensor,
        ctrl: BatchStep | None,
        outputs: dict[int, RowOutput] | None,
        late: LateAnswers,
        on_token: OnToken | None,
    ) -> dict[int, int]:
        """Draw and accept each row's next token under its controller's output; ``id(row)`` → token.

        A row still to feed fast-forward tokens draws after the next forward pass; a row
        whose controller is late sits this step out; a row whose late answer came (``late``)
        draws from the logits it kept. A row whose draw fails, or that is left with nothing
        sound to draw from, ends alone with an error.
        """
        late_ctrl, late_outputs = late
        returning = self._late.restore(rows, logits, late_ctrl)
        steps = [step for step in (ctrl, late_ctrl) if step is not None]
        dense = not self.sparse_apply and bool(steps) and any(r.sequence_id is not None for r in rows)
        if dense:
            apply_started = time.perf_counter()
            for step in steps:
                apply_dense(self.batch, rows, logits, step, self._width)
            self.stats.apply_s += time.perf_counter() - apply_started
        if late_outputs:
            outputs = {**(outputs or {}), **late_outputs}
        firsts = first_choices(logits, masked=dense, greedy=(r.request.temperature == 0 for r in rows))
        sampled: dict[int, int] = {}
        waiting = self.batch.late
        for i, row in enumerate(rows):
            if row.sequence_id in waiting:
                continue  # its controller is late: it sits this step out
            row.lag = 0
            if row.feed:
                continue  # its logits predate a fast-forward: it samples after the next forward
            out = outputs.get(row.sequence_id) if outputs and row.sequence_id is not None else None
            first = firsts[i] if firsts is not None else None
            if first is not None and first < 0:  # nothing sound to draw from
                answered = late_ctrl if row.sequence_id in returning else ctrl
                kind = _output_kind(answered, row.sequence_id) if dense else None
                self._end_with_unusable_output(row, first, kind)
                continue
            request = row.request
            if request.temperature > 0:
                first = None
            try:
                if out is None:
                    token = (
                        first
                        if first is not None
                        else sample(logits[i], request.temperature, request.top_p, row.generator)
                    )
                else:
                    steered = self._sample_steered(row, logits[i], out, first)
                    if steered is None:
                        continue  # the row ended with an error
                    token = steered
            except Exception as e:  # noqa: BLE001 - one row's draw must not end the batch
                row.finish = "error"
                row.error = f"request {row.index}: sampling failed: {type(e).__name__}: {e}"
                continue
            sampled[id(row)] = token
            self._accept(row, [token], on_token)
        return sampled

    def _admit(
        self,
        queue: RequestQueue,
        rows: list[Row],
        new_rows: list[Row],
        prebuilt: dict[int, Row],
        finish: OnFinish,
    ) -> None:
        """Admit waiting requests while there is room: short prompts to ``new_rows`` (prefilled
        this step), long ones to the chunked prefill; a request that cannot start ends alone."""
        room = self.max_batch - len(rows) - len(self._prefilling)
        admitted: list[tuple[int, GenerationRequest, Row | None]] = []
        for key in list(itertools.islice(prebuilt, room)):
            built = prebuilt.pop(key)
            admitted.append((key, built.request, built))
        admitted += [(key, request, None) for key, request in queue.take(room - len(admitted))]
        for key, request, prepared_row in admitted:
            try:
                row = prepared_row if prepared_row is not None else self._make_row(key, request)
                if len(row.prompt) > self.prefill_chunk_tokens:
                    # Its controller starts when it joins.
                    self._prefilling.append(PendingPrefill(row, KVCache(self.device)))
                    continue
                self._start_controller(row)
            except Exception as e:  # noqa: BLE001 - a request that cannot start ends alone
                row = Row(request, key, [])
                row.finish = "error"
                row.error = start_error(key, e)
                self._report(row, finish)
                continue
            new_rows.append(row)

    # -- rows ------------------------------------------------------------------------------------

    def _make_row(self, index: int, request: GenerationRequest) -> Row:
        return build_row(
            index,
            request,
            encode=lambda text, chat: self.loaded.encode_prompt(text, chat=chat),
            vocab_size=self._width,
            context_length=self.context_length,
            device=self.device,
        )

    def _check_limits(self, row: Row) -> None:
        """End ``row`` past its work bound (an error naming it) or at the model's context (``"length"``)."""
        if row.finish is not None:
            return
        if row.over_work_limit:
            row.finish = "error"
            sid = row.sequence_id
            known = sid is not None and sid in self.batch.sequences
            who = f"controller '{self.batch.label(sid)}' seq {sid}" if sid is not None and known else None
            row.error = row.work_limit_error(who or f"request {row.index}")
        elif self.context_length is not None and len(row.prompt) + len(row.tokens) >= self.context_length:
            row.finish = "length"

    def _start_controller(self, row: Row) -> None:
        steer = row.request.steer
        if steer is not None:
            row.sequence_id = self.batch.add(steer, row.prompt)

    def _report(self, row: Row, finish: OnFinish) -> None:
        """Hand ``row``'s result to ``finish``, once: a row reported before a failing step is
        not reported again by the failure handler."""
        result = self._finish(row)
        row.reported = True
        finish(row.index, result)

    def _finish(self, row: Row) -> GenerationResult:
        if row.sequence_id is not None and row.sequence_id in self.batch.sequences:
            self.batch.remove(row.sequence_id)
        return row.result(self._text.decode(row.tokens))

    def _text_so_far(self, row: Row) -> str:
        """The decoded output so far (see :meth:`RowText.so_far <wasmshare.llm._rows.RowText.so_far>`)."""
        return self._text.so_far(row)

    def _accept(self, row: Row, tokens: list[int], on_token: OnToken | None) -> None:
        """Append accepted tokens; mark the row finished on EOS, length or a stop string."""
        self.stats.generated_tokens += accept_tokens(row, tokens, self._text, on_token)

    # -- controller results ------------------------------------------------------------------------

    def _sampled_by_slot(self, rows: list[Row], sampled: dict[int, int]) -> np.ndarray[Any, Any]:
        """Each batch sequence's sampled token (-1: none), aligned with ``batch.sequences``:
        the batch's fast form, one vectorised store instead of a write per sequence."""
        token_of = {r.sequence_id: sampled.get(id(r), -1) for r in rows if r.sequence_id is not None}
        live = self.batch.sequences
        return np.fromiter((token_of.get(sid, -1) for sid in live), dtype=np.int64, count=len(live))

    def _timed_step(
        self,
        steer: np.ndarray[Any, Any] | dict[int, list[int]],
        analyse: Container[int] = (),
        defer: Container[int] = (),
        cut: StepCut | None = None,
    ) -> _ControllerPhase:
        """Run the controller phase, timed into ``stats.controller_s``; on the helper thread when overlapping.

        Under sparse application the outputs are also copied out per row: sequences in
        ``analyse`` (those that sample) get their allowed ids, masks of those in ``defer``
        stay uncomputed. No torch op runs here (dense application builds its tensor on the
        engine thread), and this thread's Python holds the GIL that the forward pass needs
        between its kernels, so the work here is kept short.
        """
        started = time.perf_counter()
        if cut is None:
            step = self.batch.step(steer, defer_masks=defer)
        else:
            assert isinstance(steer, dict)
            step = self.batch.step(steer, only=steer, defer_masks=defer, cut=cut)
        outputs = self.batch.row_outputs(step, analyse=analyse) if self.sparse_apply else None
        self.stats.controller_s += time.perf_counter() - started
        return _ControllerPhase(step, outputs)

    def _take_actions(self, rows: list[Row], ctrl: BatchStep | None, on_token: OnToken | None) -> list[Row]:
        """Apply the step's stop / error / backtrack / fast-forward (:func:`take_actions`); the rows it ended."""
        return take_actions(
            rows,
            ctrl,
            self._kv,
            accept=lambda row, tokens: self._accept(row, tokens, on_token),
            check_limits=self._check_limits,
            stats=self.stats,
        )

    def _drop_finished(self, rows: list[Row], logits: torch.Tensor) -> tuple[list[Row], torch.Tensor]:
        keep = [i for i, r in enumerate(rows) if r.finish is None]
        if len(keep) == len(rows):
            return rows, logits
        self._select_rows(keep)
        return [rows[i] for i in keep], logits[keep]

    def _end_with_unusable_output(self, row: Row, code: int, kind: str | None) -> None:
        """End ``row`` with an error: nothing sound to draw from (``code`` from ``soundness``).

        ``kind`` is the controller output to blame ("mask" or "bias"); None blames the model.
        """
        row.finish = "error"
        sid, at = row.sequence_id, len(row.tokens)
        if kind is None or sid is None:
            row.error = f"the model's logits at output token {at} {unusable_reason(code, plural=True)}"
            return
        cause = self.batch.deferred_mask_error(sid)
        row.error = f"controller '{self.batch.label(sid)}' seq {sid}: its {kind} {unusable_reason(code)}"
        row.error += f" at output token {at}" + (f" ({cause})" if cause is not None else "")

    def _sample_steered(
        self, row: Row, line: torch.Tensor, out: RowOutput, first: int | None = None
    ) -> int | None:
        """Draw ``line`` under its controller's output (:func:`~wasmshare.llm.sampling.sample_steered`).

        A mask or bias that leaves nothing to draw ends the row with an error (returns None).
        """
        request = row.request
        token = sample_steered(
            line, out, request.temperature, request.top_p, row.generator, self.stats, first
        )
        if token < 0:
            kind = "bias" if out.bias is not None or out.sparse_bias is not None else "mask"
            self._end_with_unusable_output(row, token, kind)
            return None
        return token

    # -- the model and its cache ---------------------------------------------------------------------

    def _prefill(self, rows: list[Row]) -> tuple[torch.Tensor, KVCache]:
        """Run the prompts of new rows in a cache of their own; their logits and that cache (merged later)."""
        started = time.perf_counter()
        cache = KVCache(self.device)
        logits = cache.prefill(self.model, [r.prompt for r in rows])
        for row in rows:
            row.position = len(row.prompt)
        self.stats.prefill_s += time.perf_counter() - started
        return logits, cache

    def _select_rows(self, keep: list[int]) -> None:
        """Keep only the cache rows at ``keep``."""
        self._kv.select(keep)

    def _advance_prefill(self, rows: list[Row], finish: OnFinish) -> None:
        """Prefill the next chunk of the oldest long prompt; when all but its last token are
        cached, start its controller and add its row to ``rows`` with that token to feed."""
        pending = self._prefilling[0]
        row = pending.row
        end = min(pending.done + self.prefill_chunk_tokens, len(row.prompt) - 1)
        started = time.perf_counter()
        pending.cache.prefill_chunk(self.model, row.prompt[pending.done : end], pending.done)
        pending.done = end
        self.stats.prefill_s += time.perf_counter() - started
        if end < len(row.prompt) - 1:
            return
        self._prefilling.pop(0)
        try:
            self._start_controller(row)
        except Exception as e:  # noqa: BLE001 - a request that cannot start ends alone
            row.finish = "error"
            row.error = start_error(row.index, e)
            self._report(row, finish)
            return
        self._kv.merge(pending.cache)
        row.position = end
        row.feed = [row.prompt[-1]]
        rows.append(row)

    def _forward(self, feeds: list[list[int]], rows: list[Row]) -> torch.Tensor:
        """Feed each row its tokens (any number, zero included) in one pass; logits at each row's last token."""
        logits = self._kv.forward(self.model, feeds, [r.position for r in rows])
        for row, feed in zip(rows, feeds):
            row.position += len(feed)
        return logits


def _output_kind(ctrl: BatchStep | None, sequence_id: int | None) -> str | None:
    """ "mask" or "bias" when ``sequence_id`` answered one in ``ctrl``, else None."""
    result = ctrl.results.get(sequence_id) if ctrl is not None and sequence_id is not None else None
    if result is not None and result.output in (Output.BITMASK, Output.BIAS, Output.SPARSE_BIAS):
        return "mask" if result.output is Output.BITMASK else "bias"
    return None
