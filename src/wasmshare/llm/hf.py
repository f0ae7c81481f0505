"""A transformers ``LogitsProcessor`` that runs wasmshare controllers and constraints.

For users of plain ``model.generate``::

    processor = WasmshareLogitsProcessor(table, constraints.json_schema(schema))
    model.generate(input_ids, logits_processor=[processor], max_new_tokens=64)

Every row of the generate batch becomes a sequence of a :class:`ControllerBatch`; each call
feeds the token sampled for each row, runs the controllers, and applies their masks and
biases to the scores in place. Fast-forward tokens are forced one call at a time (generate
has no way to append several tokens at once); a stop or a failed controller forces the
end-of-sequence token (the error is kept in :attr:`errors`). Backtracking cannot be expressed
in ``generate``: a controller that asks for it ends its row with an error (use
:class:`~wasmshare.llm.engine.Engine` for that).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import WasmshareError
from .batch import ControllerBatch
from .constraints import ConstraintSpec
from .controller import Controller
from .limits import Limits
from .results import Action, BatchStep
from .sampling import GENERATE_LOGIT_LIMIT, soundness, unusable_reason

if TYPE_CHECKING:
    import torch

    from .tokens import TokenTable

__all__ = ["WasmshareLogitsProcessor"]

try:  # subclass the real base class when transformers is installed (it is only a marker)
    from transformers import LogitsProcessor as _Base
except ImportError:  # pragma: no cover
    _Base = object  # type: ignore[assignment,misc]


class WasmshareLogitsProcessor(_Base):
    """Steer ``model.generate`` with a controller or constraint per row (see the module docstring).

    ``steer`` is one :class:`ConstraintSpec` / :class:`Controller` for every row, or a list
    with one per row (None: unconstrained). ``eos_token_id`` is forced when a row stops.
    """

    def __init__(
        self,
        token_table: TokenTable,
        steer: ConstraintSpec | Controller | Sequence[ConstraintSpec | Controller | None],
        *,
        eos_token_id: int | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.token_table = token_table
        self.steer = steer
        self.eos_token_id = eos_token_id if eos_token_id is not None else token_table.eos_token
        self.limits = limits
        self.batch: ControllerBatch | None = None
        self.errors: dict[int, str] = {}
        """Row index → error text, for rows whose controller failed."""
        self._rows: list[int | None] = []
        self._forced: list[deque[int]] = []
        self._feed: list[bool] = []
        self._finished: list[bool] = []

    def close(self) -> None:
        """Release the controllers (also done when the processor is garbage-collected)."""
        if self.batch is not None:
            self.batch.close()
            self.batch = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass

    def _start(self, input_ids: torch.Tensor) -> None:
        rows = input_ids.shape[0]
        steers = list(self.steer) if isinstance(self.steer, (list, tuple)) else [self.steer] * rows
        if len(steers) != rows:
            raise WasmshareError(f"{len(steers)} steers for a batch of {rows} rows")
        self.batch = ControllerBatch(self.token_table, capacity=rows, limits=self.limits)
        self.batch.constraint_repairs = False  # generate() cannot take tokens back
        for row, steer in enumerate(steers):
            if steer is None:
                self._rows.append(None)
            else:
                prompt = [t for t in input_ids[row].tolist() if 0 <= t < self.token_table.vocab_size]
                self._rows.append(self.batch.add(steer, prompt))  # type: ignore[arg-type]
            self._forced.append(deque())
            self._feed.append(False)
            self._finished.append(False)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Step the controllers that need it, then mask/bias (or force) every row's scores."""
        if self.batch is None:
            self._start(input_ids)
            assert self.batch is not None
            to_step = [sid for sid in self._rows if sid is not None]
            sampled: dict[int, list[int]] = {}
        else:
            # A row whose last token was sampled under its controller's mask feeds it now;
            # a row whose last token was forced (fast-forward) already has its next mask.
            sampled = {
                sid: [int(input_ids[row, -1])]
                for row, sid in enumerate(self._rows)
                if sid is not None and self._feed[row] and not self._finished[row]
            }
            to_step = list(sampled)
        if to_step:
            assert self.batch is not None
            self._absorb(self.batch.step(sampled, only=to_step))
        return self._mask(scores)

    def _absorb(self, step: BatchStep) -> None:
        for row, sid in enumerate(self._rows):
            if sid is None or self._finished[row]:
                continue
            result = step.results.get(sid)
            if result is None:
                continue
            if result.action is Action.ERROR or result.backtrack:
                self.errors[row] = (
                    str(result.error) if result.error else "backtrack is not supported by generate()"
                )
                self._end(row)
                continue
            self._forced[row].extend(result.fast_forward)
            if result.action is Action.STOP:
                self._end(row, keep_forced=True)

    def _end(self, row: int, *, keep_forced: bool = False) -> None:
        """The row's controller is done: force its remaining tokens, then end-of-sequence."""
        self._finished[row] = True
        if not keep_forced:
            self._forced[row].clear()
        if self.eos_token_id is not None:
            self._forced[row].append(self.eos_token_id)
        sid = self._rows[row]
        if sid is not None and self.batch is not None and sid in self.batch.sequences:
            self.batch.remove(sid)

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        import torch

        assert self.batch is not None
        masked: list[tuple[int, int]] = []
        for row, sid in enumerate(self._rows):
            self._feed[row] = False
            if self._forced[row]:
                token = self._forced[row].popleft()
                scores[row].fill_(float("-inf"))
                scores[row, token] = 0.0
            elif sid is not None and not self._finished[row]:
                masked.append((row, sid))
                self._feed[row] = True
        if masked and len(masked) == scores.shape[0]:  # every row, in order: in place
            self.batch.apply(scores, sequences=[sid for _, sid in masked])
        elif masked:
            index = torch.tensor([row for row, _ in masked], device=scores.device)
            sub = scores.index_select(0, index)
            self.batch.apply(sub, sequences=[sid for _, sid in masked])
            scores.index_copy_(0, index, sub)
        if masked:
            self._end_unusable_rows(scores, masked)
        return scores

    def _end_unusable_rows(self, scores: torch.Tensor, masked: list[tuple[int, int]]) -> None:
        """End each masked row left with nothing to draw from with end-of-sequence and an error.

        Nothing to draw: all ``-inf`` over the vocabulary, or a largest value that is NaN,
        ``+inf`` or beyond :data:`~wasmshare.llm.sampling.GENERATE_LOGIT_LIMIT`. ``generate``
        would otherwise pick an arbitrary token, or fail to sample (on CUDA, with a
        device-side assert that breaks the process's CUDA context). Raises
        :class:`~wasmshare.errors.WasmshareError` when there is no end-of-sequence token.
        """
        assert self.batch is not None
        rows = [row for row, _ in masked]
        vocab = self.batch.vocab_size  # columns past it are the model's padding, not draws
        best = scores[:, :vocab].amax(dim=-1)[rows]  # reduce the view: no copy of the rows
        codes = [soundness(peak, GENERATE_LOGIT_LIMIT) for peak in best.tolist()]  # one transfer
        for (row, sid), code in zip(masked, codes):
            if not code:
                continue
            what = unusable_reason(code)
            error = f"controller '{self.batch.label(sid)}' seq {sid}: its output {what}"
            if self.eos_token_id is None:
                raise WasmshareError(
                    f"row {row}: {error}, and there is no end-of-sequence token to end it with"
                )
            self.errors[row] = error
            self._end(row)
            self._forced[row].clear()
            self._feed[row] = False
            scores[row].fill_(float("-inf"))
            scores[row, self.eos_token_id] = 0.0
