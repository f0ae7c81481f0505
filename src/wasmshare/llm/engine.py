"""Engine: batched decoding over a transformers causal LM, steered by controllers and constraints.

Every request is a sequence in one running batch with one KV cache. Sequences join between
steps (their prompt is prefilled and merged into the cache) and leave when they finish;
backtracking masks the trimmed cache positions; fast-forward tokens are fed in one forward
pass. Constrained sequences live in a :class:`~wasmshare.llm.batch.ControllerBatch`, whose
masks and biases are applied to the batch logits in one vectorised op.

The controller phase for step *t* needs only the token sampled at *t-1*, so it runs on a
helper thread *while* the model computes the forward pass of that token (wasm calls,
llguidance and torch all release the GIL): its cost is hidden unless it is longer than the
forward pass. The time left on the critical path is reported per step.

The cache layout: one row per sequence, one shared time axis; an attention mask marks
which positions of each row are real (padding from merging rows of different lengths, from
feeding different numbers of tokens in one step, and from backtracking are masked out), and
position ids are tracked per row.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import operator
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from ..errors import WasmshareError
from .batch import Action, BatchStep, ControllerBatch, Output, PreparedOutputs, RowOutput
from .constraints import Backend, ConstraintSpec
from .controller import Controller
from .limits import Limits

if TYPE_CHECKING:
    import torch

    from .models import LoadedModel

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "EngineStats", "RequestQueue", "QueueFull"]

FinishReason = Literal["stop", "length", "controller", "error", "cancelled"]
MaskApply = Literal["auto", "sparse", "dense"]


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

    def stop_strings(self) -> list[str]:
        """Where the output is cut: ``stop`` plus the strings of a :func:`~wasmshare.llm.constraints.stop` steer."""
        extra = self.steer.stop_strings if isinstance(self.steer, ConstraintSpec) else []
        return [*self.stop, *extra]


def default_max_work(max_tokens: int) -> int:
    """The work bound of a request that sets none (``4 × max_tokens + 64``): room for a
    controller to backtrack and redo three times what it keeps, and a margin for short answers."""
    return 4 * max_tokens + 64


@dataclass
class GenerationResult:
    """A finished request: its tokens, text, why it ended, and an error if it failed."""

    request: GenerationRequest
    prompt_tokens: int
    tokens: list[int]
    text: str
    finish_reason: FinishReason
    error: str | None = None


@dataclass
class EngineStats:
    """Counters over the life of an engine (times in seconds unless named otherwise)."""

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
    deferred_masks: int = 0  # constraint masks left uncomputed beside the forward pass
    late_masks: int = 0  # of those, computed after it because the draw was forbidden
    runner_up_draws: int = 0  # of those, not computed: one of the next few argmaxes was allowed

    @property
    def controller_us_per_step(self) -> float:
        """The controller phase per step (µs), hidden by the overlap or not (:attr:`work_us_per_step`
        adds the work after the forward pass)."""
        return self.controller_s / self.steps * 1e6 if self.steps else 0.0

    @property
    def work_us_per_step(self) -> float:
        """All controller/mask work per step (µs): the controller phase plus applying and
        checking outputs after the forward pass (deferred masks computed there included)."""
        return (self.controller_s + self.apply_s) / self.steps * 1e6 if self.steps else 0.0

    @property
    def critical_us_per_step(self) -> float:
        """Controller/mask work left on the critical path per step after the overlap, plus apply (µs)."""
        return (self.critical_controller_s + self.apply_s) / self.steps * 1e6 if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of decoding (prefill excluded)."""
        return self.generated_tokens / self.decode_s if self.decode_s else 0.0


class QueueFull(WasmshareError):
    """The request queue already holds its ``max_waiting`` requests."""


class RequestQueue:
    """Thread-safe inbox of an :meth:`Engine.run` loop (continuous batching).

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


@dataclass
class _Row:
    request: GenerationRequest
    index: int
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    sequence_id: int | None = None
    position: int = 0
    generator: Any = None
    finish: FinishReason | None = None
    error: str | None = None
    feed: list[int] = field(default_factory=list)  # tokens for the next forward instead of a sampled one
    text_cache: str = ""  # decoded text of tokens[:read_offset] (see _text_so_far)
    prefix_offset: int = 0
    read_offset: int = 0
    reported: bool = False  # its result has been handed to the caller
    work: int = 0  # tokens produced: sampled and fast-forwarded, backtracked ones included
    steps: int = 0  # decode steps taken in the batch
    work_limit: int = 0


@dataclass
class _Prefill:
    """A long prompt prefilled a chunk per step in a cache of its own (see
    ``Engine.prefill_chunk_tokens``) before its row joins the batch."""

    row: _Row
    cache: Any = None
    done: int = 0  # prompt tokens already in the cache


class Engine:
    """Batched generation for one :class:`~wasmshare.llm.models.LoadedModel`.

    ``max_batch`` sequences decode together (more wait and join as others finish).
    ``mode``, ``limits`` and ``grammar_backend`` go to the :class:`ControllerBatch`.
    ``overlap=False`` runs the controller phase after the forward pass instead of beside
    it (for measuring what the overlap hides).

    ``mask_apply`` says how masks reach the logits. ``"sparse"`` (the default on CPU):
    beside the forward pass the helper thread copies the masks out
    (:meth:`ControllerBatch.row_outputs`). After the forward pass a greedy row takes its
    unmasked argmax when the mask allows it (one bit to test) and only otherwise looks
    at the mask as a whole: it picks among the allowed ids when they are at most half the
    vocabulary, else puts ``-inf`` at the forbidden ones. A sampled row does the same with
    its allowed ids worked out on the helper thread (exact in both cases, see
    :meth:`_sample_steered`). The mask work left on the critical path then follows the
    draw and the allowed ids, not ``B × V``. ``"dense"`` (the default on CUDA, where
    the device does it in microseconds): one additive ``[B, V]`` tensor from the bitmask,
    added to the logits. Both give the same greedy tokens; seeded sampling draws from the
    same distribution, but not with the same random numbers. Under either, a controller
    output that leaves nothing to draw (a mask that allows no token, a bias of ``-inf``
    everywhere, NaN or ``+inf``)
    ends that row alone with an error before any draw.

    ``defer_masks`` (sparse application, llguidance constraints, greedy rows): the
    constraint's mask is not computed beside the forward pass at all. After it the
    constraint is asked about the unmasked argmax alone (under a microsecond); when it
    forbids that token, about the next few argmaxes (``EngineStats.runner_up_draws``), and
    only when it forbids those too is the mask computed (``EngineStats.late_masks``). A
    joining row's first mask is computed beside its prefill instead. A mask
    costs tens to hundreds of µs of CPU, which on a machine whose cores the forward pass
    already fills comes out of the forward pass. Wasm controllers' masks, every mask under
    dense application and every mask in ``mode="workers"`` are computed beside the forward
    pass as before.

    ``prefill_chunk_tokens`` bounds the prompt tokens one step prefills for a long prompt:
    a longer prompt is prefilled in chunks of that size, one per step, in a cache of its
    own while the running rows go on decoding, and joins the batch when it is done (its
    controller starts then), so one long prompt cannot stall every stream. A prompt must be
    shorter than the model's context (:attr:`LoadedModel.context_length`); a row that
    reaches the context ends with ``"length"``.
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
    ) -> None:
        if max_batch <= 0:
            raise WasmshareError(f"max_batch must be positive, got {max_batch}")
        if not isinstance(prefill_chunk_tokens, int) or prefill_chunk_tokens <= 0:
            raise WasmshareError(f"prefill_chunk_tokens must be a positive int, got {prefill_chunk_tokens!r}")
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.context_length: int | None = loaded.context_length
        self._prefilling: list[_Prefill] = []
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
        self._eos = set(loaded.eos_token_ids)
        self._width = int(loaded.vocab_size)
        self._inflight: Future[_ControllerPhase] | None = None
        self._busy = threading.Lock()
        self._cache: Any = None
        self._attn: torch.Tensor | None = None

    def close(self) -> None:
        """Stop the controller batch and helper thread. Safe to call twice."""
        self._helper.shutdown(wait=True)
        self.batch.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public --------------------------------------------------------------------------------

    def generate(
        self,
        requests: Iterable[GenerationRequest],
        on_token: Callable[[int, int, str], None] | None = None,
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
        on_token: Callable[[int, int, str], None] | None = None,
        on_finish: Callable[[int, GenerationResult], None] | None = None,
        contain_failures: bool = False,
    ) -> None:
        """Continuous batching: decode requests from ``queue`` until it is closed and drained.

        A request joins the running batch at the next step after it is submitted and leaves
        it as soon as it finishes or is cancelled (:meth:`RequestQueue.cancel`), freeing its
        slot; up to ``max_batch`` decode together and the rest wait in the queue.
        ``on_token(key, token_id, text_so_far)`` streams accepted tokens and
        ``on_finish(key, result)`` delivers each result, keyed by what
        :meth:`RequestQueue.submit` returned. An invalid request finishes with an error.
        With ``contain_failures`` an unexpected failure of a step (the model raising, say)
        ends the requests in that batch with an error and decoding goes on with the rest of
        the queue, instead of raising.
        """
        self._run_guarded(queue, on_token, on_finish, contain_failures, {})

    def _run_guarded(
        self,
        queue: RequestQueue,
        on_token: Callable[[int, int, str], None] | None,
        on_finish: Callable[[int, GenerationResult], None] | None,
        contain_failures: bool,
        prebuilt: dict[int, _Row],
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
        on_token: Callable[[int, int, str], None] | None,
        on_finish: Callable[[int, GenerationResult], None] | None,
        contain_failures: bool,
        prebuilt: dict[int, _Row],
    ) -> None:
        finish = on_finish or (lambda key, result: None)
        while True:
            rows: list[_Row] = []
            joining: list[_Row] = []
            try:
                self._run_batch(queue, rows, joining, on_token, finish, prebuilt)
                return
            except Exception as e:  # noqa: BLE001 - contained by request, see docstring
                inflight, self._inflight = self._inflight, None
                if inflight is not None:
                    concurrent.futures.wait([inflight])  # the controller phase must end before cleanup
                pending, self._prefilling = [p.row for p in self._prefilling], []
                for row in rows + joining + pending:
                    if row.reported:
                        continue  # finished before the failure, its result already handed over
                    if row.finish is None:
                        row.finish, row.error = "error", f"engine failure: {type(e).__name__}: {e}"
                    self._report(row, finish)
                self._cache, self._attn = None, None
                if not contain_failures:
                    raise

    def _run_batch(
        self,
        queue: RequestQueue,
        rows: list[_Row],
        joining: list[_Row],
        on_token: Callable[[int, int, str], None] | None,
        finish: Callable[[int, GenerationResult], None],
        prebuilt: dict[int, _Row],
    ) -> None:
        """The decode loop of :meth:`run`; ``rows`` (filled in place) are the live sequences and
        ``joining`` those admitted but not yet in ``rows`` (both finished by the caller if a step fails)."""
        import torch

        self._cache = None
        self._attn = None
        logits: torch.Tensor | None = None
        ctrl: BatchStep | None = None
        outputs: dict[int, RowOutput] | None = None
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
                    logits, ctrl_rows_done = self._handle_controller_results(rows, logits, ctrl, on_token)
                    for row in ctrl_rows_done:
                        self._report(row, finish)
                    rows[:], logits = self._drop_finished(rows, logits)
                sampled: dict[int, int] = {}
                if rows:
                    assert logits is not None
                    dense = (
                        outputs is None and ctrl is not None and any(r.sequence_id is not None for r in rows)
                    )
                    if dense:
                        assert ctrl is not None
                        apply_started = time.perf_counter()
                        self._apply(rows, logits, ctrl)
                        self.stats.apply_s += time.perf_counter() - apply_started
                    firsts = self._first_choices(rows, logits, dense)
                    for i, row in enumerate(rows):
                        if row.feed:
                            continue  # its logits predate a fast-forward: it samples after the next forward
                        out = (
                            outputs.get(row.sequence_id) if outputs and row.sequence_id is not None else None
                        )
                        first = firsts[i] if firsts is not None else None
                        if first is not None and first < 0:  # nothing sound to draw from
                            kind = _output_kind(ctrl, row.sequence_id) if dense else None
                            self._end_with_unusable_output(row, first, kind)
                            continue
                        if row.request.temperature > 0:
                            first = None
                        try:
                            if out is None:
                                token = first if first is not None else self._sample(row, logits[i])
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
                    for row in rows:
                        self._check_limits(row)
                        if row.finish is not None:
                            self._report(row, finish)
                    keep = [i for i, r in enumerate(rows) if r.finish is None]
                    if len(keep) != len(rows):
                        self._select_rows(keep)
                        rows[:] = [rows[i] for i in keep]
                # Admit waiting requests while there is room.
                new_rows = joining
                room = self.max_batch - len(rows) - len(self._prefilling)
                admitted: list[tuple[int, GenerationRequest, _Row | None]] = []
                for key in list(itertools.islice(prebuilt, room)):
                    built = prebuilt.pop(key)
                    admitted.append((key, built.request, built))
                admitted += [(key, request, None) for key, request in queue.take(room - len(admitted))]
                for key, request, prepared_row in admitted:
                    try:
                        row = prepared_row if prepared_row is not None else self._make_row(key, request)
                        if len(row.prompt) > self.prefill_chunk_tokens:
                            self._prefilling.append(_Prefill(row))  # its controller starts when it joins
                            continue
                        self._start_controller(row)
                    except Exception as e:  # noqa: BLE001 - a request that cannot start ends alone
                        row = _Row(request, key, [])
                        row.finish = "error"
                        row.error = (
                            str(e)
                            if isinstance(e, WasmshareError)
                            else f"request {key}: {type(e).__name__}: {e}"
                        )
                        self._report(row, finish)
                        continue
                    new_rows.append(row)
                # A long prompt advances by one chunk; once all but its last token are cached
                # it joins the running rows and that token is its first feed.
                if self._prefilling:
                    self._advance_prefill(rows, finish)
                # The controller phase for the next step runs beside the joining rows' prefill
                # and the forward pass.
                steer = self._sampled_by_slot(rows, sampled)
                future: Future[_ControllerPhase] | None = None
                ctrl, outputs = None, None
                # Sampled rows get their allowed ids worked out beside the forward pass;
                # greedy rows' constraint masks wait until a draw needs them, except a joining
                # row's first, which its prefill (a pass over the whole prompt) hides.
                has_controllers = False
                analyse: set[int] = set()
                defer: set[int] = set()
                running = len(rows)
                for n, r in enumerate(rows + new_rows):
                    if r.sequence_id is not None:
                        has_controllers = True
                        if r.request.temperature > 0:
                            analyse.add(r.sequence_id)
                        elif self.defer_masks and (n < running or not self.overlap):
                            defer.add(r.sequence_id)
                if has_controllers and self.overlap:
                    future = self._inflight = self._helper.submit(self._timed_step, steer, analyse, defer)
                prefill_started = time.perf_counter()
                prefilled = self._prefill(new_rows) if new_rows else None
                prefill_s = time.perf_counter() - prefill_started
                decoded = bool(rows)
                if rows:
                    for r in rows:
                        r.steps += 1
                    feeds = [r.feed if r.feed else [sampled[id(r)]] for r in rows]
                    for r in rows:
                        r.feed = []
                    forward_started = time.perf_counter()
                    logits = self._forward(feeds, rows)
                    self.stats.forward_s += time.perf_counter() - forward_started
                if new_rows:
                    assert prefilled is not None
                    new_logits, new_cache, new_attn = prefilled
                    self._merge_cache(new_cache, new_attn)  # after the forward of the rows already running
                    logits = new_logits if not rows else torch.cat([logits, new_logits], dim=0)  # type: ignore[list-item]
                    rows.extend(new_rows)
                    new_rows.clear()
                if has_controllers:
                    wait_started = time.perf_counter()
                    ctrl, outputs = (
                        future.result() if future is not None else self._timed_step(steer, analyse, defer)
                    )
                    self._inflight = None
                    self.stats.critical_controller_s += time.perf_counter() - wait_started
                if decoded:
                    self.stats.steps += 1
                    self.stats.decode_s += time.perf_counter() - started - prefill_s
                self.stats.bytes_copied = 0  # masks and biases are shared pages; nothing is copied

    # -- rows ------------------------------------------------------------------------------------

    def _make_row(self, index: int, request: GenerationRequest) -> _Row:
        import torch

        if isinstance(request.prompt, str):
            prompt = self.loaded.encode_prompt(request.prompt, chat=request.chat)
        else:
            try:
                prompt = [operator.index(t) for t in request.prompt]
            except TypeError:
                raise WasmshareError(f"request {index}: a prompt of token ids must hold integers") from None
            outside = [t for t in prompt if not 0 <= t < self._width]
            if outside:
                raise WasmshareError(
                    f"request {index}: token id {outside[0]} is outside the vocabulary (0..{self._width - 1})"
                )
        if not prompt:
            raise WasmshareError(f"request {index}: the prompt is empty")
        if request.max_tokens <= 0:
            raise WasmshareError(f"request {index}: max_tokens must be positive")
        if (
            not (math.isfinite(request.temperature) and request.temperature >= 0)
            or not 0 < request.top_p <= 1
        ):
            raise WasmshareError(
                f"request {index}: temperature must be a finite number >= 0 and top_p in (0, 1]"
            )
        if self.context_length is not None and len(prompt) >= self.context_length:
            raise WasmshareError(
                f"request {index}: the prompt is {len(prompt):,} tokens; the model's context is "
                f"{self.context_length:,} tokens"
            )
        seed = 0x5EED + index if request.seed is None else request.seed
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise WasmshareError(f"request {index}: seed must be an int, got {type(seed).__name__}")
        limit = default_max_work(request.max_tokens) if request.max_work is None else request.max_work
        if not isinstance(limit, int) or limit < request.max_tokens:
            raise WasmshareError(f"request {index}: max_work must be an int >= max_tokens, got {limit!r}")
        row = _Row(request, index, prompt, work_limit=limit)
        if request.temperature > 0:
            row.generator = torch.Generator(device=self.device)  # multinomial draws where the logits are
            row.generator.manual_seed(seed % _SEED_MODULUS)  # torch takes seeds below 2**64 only
        return row

    def _check_limits(self, row: _Row) -> None:
        """End ``row`` past its work bound (an error naming it) or at the model's context (``"length"``)."""
        if row.finish is not None:
            return
        if row.work > row.work_limit or row.steps > 2 * row.work_limit:
            row.finish = "error"
            who = (
                f"controller '{self.batch.label(row.sequence_id)}' seq {row.sequence_id}"
                if (row.sequence_id is not None and row.sequence_id in self.batch.sequences)
                else f"request {row.index}"
            )
            row.error = (
                f"{who}: produced {row.work:,} tokens in {row.steps:,} steps (fast-forwarded and backtracked ones "
                f"count) for max_tokens {row.request.max_tokens:,}; the limit is {row.work_limit:,} tokens "
                f"and {2 * row.work_limit:,} steps"
            )
        elif self.context_length is not None and len(row.prompt) + len(row.tokens) >= self.context_length:
            row.finish = "length"

    def _start_controller(self, row: _Row) -> None:
        steer = row.request.steer
        if steer is not None:
            row.sequence_id = self.batch.add(steer, row.prompt)

    def _report(self, row: _Row, finish: Callable[[int, GenerationResult], None]) -> None:
        """Hand ``row``'s result to ``finish``, once: a row reported before a failing step is
        not reported again by the failure handler."""
        result = self._finish(row)
        row.reported = True
        finish(row.index, result)

    def _finish(self, row: _Row) -> GenerationResult:
        if row.sequence_id is not None and row.sequence_id in self.batch.sequences:
            self.batch.remove(row.sequence_id)
        tokens = list(row.tokens)
        text = self._decode(tokens)
        finish = row.finish or "stop"
        if finish == "controller" and isinstance(row.request.steer, ConstraintSpec):
            finish = "stop"  # a constraint that completes ends the answer like a stop string
        for stop in row.request.stop_strings():
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return GenerationResult(row.request, len(row.prompt), tokens, text, finish, row.error)

    def _decode(self, tokens: list[int]) -> str:
        text = self.loaded.tokenizer.decode(
            [t for t in tokens if t not in self._eos], skip_special_tokens=True
        )
        return text if isinstance(text, str) else "".join(text)

    def _text_so_far(self, row: _Row) -> str:
        """The decoded output so far, decoding only the last few tokens per call.

        Decoding every token again at each step costs O(n) per token; instead the text of
        ``tokens[:read_offset]`` is kept and only ``tokens[prefix_offset:]`` is decoded (the
        few tokens before ``read_offset`` give the tokenizer its context). A tail that ends in
        an incomplete UTF-8 character is held back until the next token completes it.
        """
        tokens = row.tokens
        prefix = self._decode(tokens[row.prefix_offset : row.read_offset])
        new = self._decode(tokens[row.prefix_offset :])
        if len(new) > len(prefix) and not new.endswith("\ufffd"):
            row.text_cache += new[len(prefix) :]
            row.prefix_offset, row.read_offset = max(0, len(tokens) - 4), len(tokens)
        return row.text_cache

    def _accept(self, row: _Row, tokens: list[int], on_token: Callable[[int, int, str], None] | None) -> None:
        """Append accepted tokens; mark the row finished on EOS, length or a stop string."""
        for token in tokens:
            if row.finish is not None:
                return
            row.tokens.append(token)
            row.work += 1
            self.stats.generated_tokens += 1
            if token in self._eos:
                row.tokens.pop()
                row.finish = "stop"
                return
            if row.request.stop or on_token is not None:
                text = self._text_so_far(row)
                if on_token is not None:
                    on_token(row.index, token, text)
                if any(s in text for s in row.request.stop):
                    row.finish = "stop"
                    return
            if len(row.tokens) >= row.request.max_tokens:
                row.finish = "length"
                return

    # -- controller results ------------------------------------------------------------------------

    def _sampled_by_slot(self, rows: list[_Row], sampled: dict[int, int]) -> np.ndarray[Any, Any]:
        """Each batch sequence's sampled token (-1: none), aligned with ``batch.sequences``:
        the batch's fast form, one vectorised store instead of a write per sequence."""
        token_of = {r.sequence_id: sampled.get(id(r), -1) for r in rows if r.sequence_id is not None}
        live = self.batch.sequences
        return np.fromiter((token_of.get(sid, -1) for sid in live), dtype=np.int64, count=len(live))

    def _timed_step(
        self, steer: np.ndarray[Any, Any], analyse: Container[int] = (), defer: Container[int] = ()
    ) -> _ControllerPhase:
        """The controller phase (on the helper thread while the forward pass runs).

        With sparse application the masks are also copied out here, and the rows of
        sequences in ``analyse`` (those that sample) turned into their allowed ids; a
        greedy row only looks at its mask as a whole when its unmasked argmax is forbidden.
        The helper's Python holds the GIL, which the forward pass needs between its
        kernels, so it is kept short. No torch op runs on this thread: building a dense
        additive tensor here made the torch ops of both threads fight over the cores and
        slowed the forward pass (in a trial on a 2-core machine, 42 -> 70 ms a step at
        batch 8), so the dense path builds it on the main thread.
        """
        started = time.perf_counter()
        step = self.batch.step(steer, defer_masks=defer)
        outputs = self.batch.row_outputs(step, analyse=analyse) if self.sparse_apply else None
        self.stats.controller_s += time.perf_counter() - started
        return _ControllerPhase(step, outputs)

    def _handle_controller_results(
        self,
        rows: list[_Row],
        logits: torch.Tensor,
        ctrl: BatchStep | None,
        on_token: Callable[[int, int, str], None] | None,
    ) -> tuple[torch.Tensor, list[_Row]]:
        """Apply stop / error / backtrack / fast-forward from the controller phase.

        Fast-forward tokens are accepted now and fed in the *next* forward pass together with
        the other rows' sampled tokens (the row samples again after it), instead of costing an
        extra forward pass of their own. A backtrack with nothing to splice re-feeds the last
        kept token so the row samples from the trimmed state.
        """
        if ctrl is None:
            return logits, []
        done: list[_Row] = []
        actions = dict(zip(ctrl.sequence_ids.tolist(), ctrl.action_codes.tolist()))
        for i, row in enumerate(rows):
            if row.sequence_id is None:
                continue
            result = ctrl.special.get(row.sequence_id)
            if result is None:
                if actions.get(row.sequence_id) == 1:  # STOP without fast-forward
                    row.finish = "controller"
                    done.append(row)
                continue
            if result.action is Action.ERROR:
                row.finish, row.error = "error", str(result.error)
                done.append(row)
                continue
            if result.backtrack:
                self._backtrack(i, row, result.backtrack)
            if result.fast_forward:
                self.stats.fast_forward_tokens += len(result.fast_forward)
                self._accept(row, list(result.fast_forward), on_token)
                row.feed = list(result.fast_forward)
            elif result.backtrack:
                self._refeed_last(i, row)
            if result.action is Action.STOP and row.finish is None:
                row.finish = "controller"
            self._check_limits(row)
            if row.finish is not None:
                done.append(row)
        if any(r.backtrack for r in ctrl.special.values()):
            self._compact_cache()
        return logits, done

    def _refeed_last(self, i: int, row: _Row) -> None:
        """Forget the last cached position of row ``i`` and feed its token again next step."""
        assert self._attn is not None
        real = self._attn[i].nonzero().flatten()
        self._attn[i, real[-1]] = 0
        row.position -= 1
        row.feed = [row.tokens[-1] if row.tokens else row.prompt[-1]]

    def _backtrack(self, i: int, row: _Row, count: int) -> None:
        """Forget the last ``count`` tokens of row ``i``: trim its output, mask its cache positions."""
        count = min(count, len(row.tokens))
        if count == 0:
            return
        del row.tokens[-count:]
        row.text_cache, row.prefix_offset, row.read_offset = "", 0, 0  # decode afresh
        assert self._attn is not None
        real = self._attn[i].nonzero().flatten()
        self._attn[i, real[-count:]] = 0
        row.position -= count

    def _drop_finished(self, rows: list[_Row], logits: torch.Tensor) -> tuple[list[_Row], torch.Tensor]:
        keep = [i for i, r in enumerate(rows) if r.finish is None]
        if len(keep) == len(rows):
            return rows, logits
        self._select_rows(keep)
        return [rows[i] for i in keep], logits[keep]

    def _first_choices(self, rows: list[_Row], logits: torch.Tensor, masked: bool) -> list[int] | None:
        """Every row's argmax, or a negative code where the row has nothing sound to draw
        from (:func:`_soundness`); None when the caller needs none of it.

        Wanted on an accelerator (greedy rows there would otherwise wait for the device once
        per row: this is one transfer) and after dense application (``masked``), where a
        controller output that leaves nothing to draw must end its row before a draw: an
        all ``-inf`` row has no argmax, and sampling from a row with NaN, ``+inf`` or values
        that overflow when divided by the temperature fails (on CUDA, with a device-side
        assert that breaks the process's CUDA context). A row whose bias is still to be
        added, or that samples, uses its entry only for that check (:meth:`_sample_steered`).
        """
        import torch

        on_cpu = logits.device.type == "cpu"
        if on_cpu and not masked:
            return None
        if not masked and not any(r.request.temperature == 0 for r in rows):
            return None
        if on_cpu:
            values = logits.numpy()
            ids = values.argmax(axis=1)  # the first NaN where there is one
            peaks: list[float] = values[np.arange(len(ids)), ids].tolist()
            indices: list[int] = ids.tolist()
        else:
            best, top = logits.max(dim=-1)  # NaN propagates
            both = torch.stack([best.double(), top.double()]).tolist()  # one transfer
            peaks, indices = both[0], [int(i) for i in both[1]]
        return [index if code == 0 else code for index, code in zip(indices, (_soundness(p) for p in peaks))]

    def _end_with_unusable_output(self, row: _Row, code: int, kind: str | None) -> None:
        """End ``row`` with an error: nothing sound to draw from (``code`` from
        :func:`_soundness`). ``kind`` is the controller output that made it so ("mask" or
        "bias"); None blames the model's own logits."""
        row.finish = "error"
        if kind is None or row.sequence_id is None:
            what = (
                "allow no token"
                if code == _NOTHING_ALLOWED
                else "hold NaN, +inf or values too large to sample from"
            )
            row.error = f"the model's logits at output token {len(row.tokens)} {what}"
            return
        what = (
            "allows no token"
            if code == _NOTHING_ALLOWED
            else "holds NaN, +inf or values too large to sample from"
        )
        row.error = (
            f"controller '{self.batch.label(row.sequence_id)}' seq {row.sequence_id}: "
            f"its {kind} {what} at output token {len(row.tokens)}"
        )
        cause = self.batch.deferred_mask_error(row.sequence_id)
        if cause is not None:
            row.error += f" ({cause})"

    def _sample_steered(
        self, row: _Row, line: torch.Tensor, out: RowOutput, first: int | None = None
    ) -> int | None:
        """Sample row ``line`` under its controller's mask or bias (sparse application).

        Greedy rows, and sampled rows whose mask allows most ids, draw from the unmasked row
        first and keep the draw when the mask allows it, which is exact (greedy: the masked
        argmax; sampling: a draw from the masked distribution, since a rejected draw is
        redrawn from it). Otherwise, and after a rejected draw: a mask that allows few ids
        samples among them (their logits gathered), else ``-inf`` goes at the forbidden ids
        and the row is drawn again; with ``top_p < 1`` the mask always comes first. A bias
        is added from its shared view. Only the mask and bias work is counted as apply
        time. A mask that allows no token, or a bias that leaves nothing sound to draw (-inf
        everywhere, NaN or +inf), ends the row with an error (returns None). ``first``
        is the row's unmasked argmax when the caller already has it (greedy rows on an
        accelerator; None for sampled rows).
        """
        import torch

        started = time.perf_counter()
        vocab = out.vocab_size
        request = row.request
        if out.bias is not None or out.sparse_bias is not None:
            if out.bias is not None:
                line[:vocab].add_(torch.from_numpy(out.bias).to(line.device))
            else:
                assert out.sparse_bias is not None
                bias_ids, bias_values = out.sparse_bias
                line.index_add_(
                    0,
                    torch.from_numpy(bias_ids).to(line.device),
                    torch.from_numpy(bias_values).to(line.device),
                )
            self.stats.apply_s += time.perf_counter() - started
            # The row's largest value must be sound (_soundness). A greedy draw lands on it
            # (argmax picks NaN first): one value to test.
            token = self._sample(row, line) if request.temperature == 0 else None
            code = _soundness(float(line[token] if token is not None else line.max()))
            if code:
                self._end_with_unusable_output(row, code, "bias")
                return None
            return token if token is not None else self._sample(row, line)
        deferred = out.deferred
        if deferred:
            self.stats.deferred_masks += 1
        if request.temperature == 0 or (request.top_p >= 1 and out.allowed is None):
            self.stats.apply_s += time.perf_counter() - started
            token = first if first is not None else self._sample(row, line)
            started = time.perf_counter()
            if out.allows(token):
                self.stats.apply_s += time.perf_counter() - started
                return token
            if deferred and request.temperature == 0:
                # The masked argmax is most often the runner-up: a few more passes of argmax
                # (each with the forbidden draw at -inf, so ties still go to the lowest id)
                # cost less than computing the mask.
                passes = (
                    max(1, _RETRY_BUDGET // line.shape[0]) if line.device.type == "cpu" else _DEVICE_RETRIES
                )
                for _ in range(passes):
                    line[token] = float("-inf")
                    token = self._sample(row, line)
                    if out.allows(token):
                        self.stats.apply_s += time.perf_counter() - started
                        self.stats.runner_up_draws += 1
                        return token
        if deferred:
            self.stats.late_masks += 1
        allowed = out.allowed
        if allowed is not None:
            if not allowed.size:
                self._end_with_unusable_output(row, _NOTHING_ALLOWED, "mask")  # its own mask's doing
                return None
            values = line.index_select(0, torch.from_numpy(allowed).to(line.device))
            self.stats.apply_s += time.perf_counter() - started
            return int(allowed[self._sample(row, values)])
        line.index_fill_(0, torch.from_numpy(out.forbidden()).to(line.device), float("-inf"))
        if line.shape[0] > vocab:
            line[vocab:] = float("-inf")
        self.stats.apply_s += time.perf_counter() - started
        return self._sample(row, line)

    def _apply(self, rows: list[_Row], logits: torch.Tensor, ctrl: BatchStep) -> None:
        """Masks and biases for the constrained rows: one add of the prepared tensor into the logits."""
        prepared = self.batch.prepare(ctrl, self._width, self.device)
        if prepared.additive is None:
            return
        row_of = {r.sequence_id: i for i, r in enumerate(rows) if r.sequence_id is not None}
        live = set(self.batch.sequences)
        targets = [row_of.get(sid, -1) if sid in live else -1 for sid in prepared.sequence_ids]
        if -1 not in targets:  # the usual case: every prepared row lands, in any order
            self.batch.apply_prepared(logits, prepared, targets)
            return
        keep = [k for k, i in enumerate(targets) if i >= 0]
        if keep:
            import torch

            subset = PreparedOutputs(
                tuple(prepared.sequence_ids[k] for k in keep),
                prepared.additive.index_select(0, torch.tensor(keep, device=logits.device)),
            )
            self.batch.apply_prepared(logits, subset, [targets[k] for k in keep])

    # -- sampling -------------------------------------------------------------------------------------

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        """The position in ``logits`` (one row, float32) of the request's next token."""
        import torch

        request = row.request
        if request.temperature == 0:
            if logits.device.type == "cpu":
                # numpy's argmax is vectorised; torch's CPU argmax took 7x longer over a
                # 49k-token row (45 vs 6 µs). Both return the first maximum.
                return int(logits.numpy().argmax())
            return int(torch.argmax(logits))
        probs = _distribution(logits, request.temperature)
        if request.top_p < 1:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < request.top_p  # keeps the first always
            sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
            choice = int(torch.multinomial(sorted_probs, 1, generator=row.generator))
            return int(order[choice])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    # -- the model and its cache ---------------------------------------------------------------------

    def _prefill(self, rows: list[_Row]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Run the prompts of new rows; return their logits, cache and attention mask (merged later)."""
        import torch
        from transformers import DynamicCache

        started = time.perf_counter()
        length = max(len(r.prompt) for r in rows)
        pad = 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        attn = torch.zeros((len(rows), length), dtype=torch.long)
        positions = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.prompt)
            ids[i, length - n :] = torch.tensor(row.prompt)
            attn[i, length - n :] = 1
            positions[i, length - n :] = torch.arange(n)
            row.position = n
        cache = DynamicCache()
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=attn.to(self.device),
            position_ids=positions.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float()
        self.stats.prefill_s += time.perf_counter() - started
        return logits, cache, attn.to(self.device)

    def _merge_cache(self, cache: Any, attn: torch.Tensor) -> None:
        import torch

        if self._cache is None:
            self._cache, self._attn = cache, attn
            return
        assert self._attn is not None
        old_t, new_t = self._attn.shape[1], attn.shape[1]
        width = max(old_t, new_t)
        self._attn = torch.cat([_left_pad(self._attn, width, 2), _left_pad(attn, width, 2)], dim=0)
        for old_layer, new_layer in zip(self._cache.layers, cache.layers):
            old_layer.keys = torch.cat(
                [_left_pad(old_layer.keys, width, 3), _left_pad(new_layer.keys, width, 3)]
            )
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, width, 3), _left_pad(new_layer.values, width, 3)]
            )

    def _select_rows(self, keep: list[int]) -> None:
        import torch

        if self._cache is None or self._attn is None:
            return
        if not keep:
            self._cache, self._attn = None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._cache.batch_select_indices(index)
        self._attn = self._attn.index_select(0, index)
        self._compact_cache()

    def _compact_cache(self) -> None:
        """Drop cache positions no row uses when they are a large part of the cache.

        Backtracked positions are masked out, not removed, and so are the columns left by
        rows that finished: without this a controller that backtracks every step grows the
        cache (and every step's attention) without bound at a constant length. Each row's
        real positions keep their order and are right-aligned; positions ids are per row,
        so nothing else changes. Skipped for caches whose layers do not all span the mask
        (sliding-window layers keep only their window)."""
        import torch

        attn = self._attn
        if attn is None or self._cache is None:
            return
        width = attn.shape[1]
        longest = int(attn.sum(dim=1).max())
        if width - longest <= max(_COMPACT_SLACK, longest // 2):
            return
        layers = self._cache.layers
        if any(layer.keys is None or layer.keys.shape[2] != width for layer in layers):
            return
        keep = torch.argsort(attn, dim=1, stable=True)[:, width - longest :]  # zeros first, order kept
        self._attn = attn.gather(1, keep)
        for layer in layers:
            b, h, _, d = layer.keys.shape
            index = keep[:, None, :, None].expand(b, h, longest, d)
            layer.keys = layer.keys.gather(2, index)
            b, h, _, d = layer.values.shape
            layer.values = layer.values.gather(2, keep[:, None, :, None].expand(b, h, longest, d))

    def _advance_prefill(self, rows: list[_Row], finish: Callable[[int, GenerationResult], None]) -> None:
        """Prefill the next chunk of the oldest long prompt; when all but its last token are
        cached, start its controller and add its row to ``rows`` with that token to feed."""
        import torch
        from transformers import DynamicCache

        pending = self._prefilling[0]
        row = pending.row
        end = min(pending.done + self.prefill_chunk_tokens, len(row.prompt) - 1)
        started = time.perf_counter()
        if pending.cache is None:
            pending.cache = DynamicCache()
        chunk = torch.tensor([row.prompt[pending.done : end]], dtype=torch.long, device=self.device)
        positions = torch.arange(pending.done, end, dtype=torch.long, device=self.device)[None, :]
        self.model(
            input_ids=chunk,
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
            position_ids=positions,
            cache=pending.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        pending.done = end
        self.stats.prefill_s += time.perf_counter() - started
        if end < len(row.prompt) - 1:
            return
        self._prefilling.pop(0)
        try:
            self._start_controller(row)
        except Exception as e:  # noqa: BLE001 - a request that cannot start ends alone
            row.finish = "error"
            row.error = (
                str(e) if isinstance(e, WasmshareError) else f"request {row.index}: {type(e).__name__}: {e}"
            )
            self._report(row, finish)
            return
        self._merge_cache(pending.cache, torch.ones((1, end), dtype=torch.long, device=self.device))
        row.position = end
        row.feed = [row.prompt[-1]]
        rows.append(row)

    def _forward(self, feeds: list[list[int]], rows: list[_Row]) -> torch.Tensor:
        """Feed each row its tokens (any number, zero included) in one pass; logits at each row's last token."""
        import torch

        assert self._attn is not None
        width = max(1, max(len(f) for f in feeds))
        batch = len(rows)
        ids = torch.zeros((batch, width), dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        positions = torch.zeros((batch, width), dtype=torch.long)
        last = torch.zeros(batch, dtype=torch.long)
        for i, (row, feed) in enumerate(zip(rows, feeds)):
            n = len(feed)
            if n:
                ids[i, :n] = torch.tensor(feed)
                mask[i, :n] = 1
                positions[i, :n] = torch.arange(row.position, row.position + n)
                positions[i, n:] = row.position + n - 1
                last[i] = n - 1
            else:
                positions[i, :] = max(row.position - 1, 0)
            row.position += n
        attn = torch.cat([self._attn, mask.to(self.device)], dim=1)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=attn,
            position_ids=positions.to(self.device),
            cache=self._cache,
            use_cache=True,
        )
        self._attn = attn
        picked: torch.Tensor = out.logits[torch.arange(batch), last.to(self.device)].float()
        return picked


# What _soundness says of a row with nothing to draw from: all -inf (a mask that allows no
# token), or a largest value that is NaN, +inf or too large to divide by the temperature.
_NOTHING_ALLOWED = -1
_SEED_MODULUS = 1 << 63
# Cache columns no row uses that are tolerated before compacting (besides half the longest row).
_COMPACT_SLACK = 64
_NOT_FINITE = -2

# The logits a greedy row whose draw its deferred mask forbids scans in further argmax passes
# before computing the mask: 21 passes over a 49k-entry row, 4 over a 262k one. Each pass
# costs about 3 / 20 µs and the mask 250-400 µs; in the generation benchmark the masked
# argmax was the runner-up in most such draws, and rarely past the 15th.
_RETRY_BUDGET = 1 << 20
# On an accelerator every pass waits for the device (a sync of tens of µs, whatever the width).
_DEVICE_RETRIES = 2


def _soundness(peak: float) -> int:
    """0 when a row whose largest logit is ``peak`` can be drawn from, else
    ``_NOTHING_ALLOWED`` (all ``-inf``) or ``_NOT_FINITE`` (NaN or ``+inf``).

    Any finite peak is sound at any temperature: :func:`_distribution` subtracts it before
    dividing, in float64."""
    if peak == -math.inf:
        return _NOTHING_ALLOWED
    if not math.isfinite(peak):
        return _NOT_FINITE
    return 0


def _distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of ``logits / temperature`` that holds for every temperature > 0 and every
    finite logit: the largest logit is subtracted first and the division is done in float64.

    In float32 a temperature like 1e-300 rounds to 0 (``0 / 0`` is NaN) and a large logit
    over a small temperature overflows; either made ``torch.multinomial`` raise. Here the
    largest entry maps to 0 and the others to values <= 0 (or ``-inf``, probability 0), so
    the sum is at least 1.
    """
    import torch

    scaled = logits.double()
    scaled = (scaled - scaled.max()) / temperature
    return torch.softmax(scaled, dim=-1)


def _output_kind(ctrl: BatchStep | None, sequence_id: int | None) -> str | None:
    """ "mask" or "bias" when ``sequence_id`` answered one in ``ctrl``, else None."""
    result = ctrl.results.get(sequence_id) if ctrl is not None and sequence_id is not None else None
    if result is not None and result.output in (Output.BITMASK, Output.BIAS, Output.SPARSE_BIAS):
        return "mask" if result.output is Output.BITMASK else "bias"
    return None


class _ControllerPhase(NamedTuple):
    """What the helper thread hands back: the step, and its outputs as ids (sparse apply) or None."""

    step: BatchStep
    outputs: dict[int, RowOutput] | None


def _left_pad(tensor: torch.Tensor, width: int, ndim: int) -> torch.Tensor:
    """Pad the time axis (dim 1 of a mask, dim 2 of a cache tensor) on the left to ``width``."""
    import torch

    axis = 1 if ndim == 2 else 2
    missing = width - tensor.shape[axis]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=axis)
