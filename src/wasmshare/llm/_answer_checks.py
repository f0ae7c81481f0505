"""One constrained sequence's schema checks: its answer so far, forbidden tokens, repairs made.

A :class:`~.constraints.ConstraintInstance` whose schema left keywords to checks feeds every
token it consumes here. When a completed value fails, :meth:`AnswerChecks.repair` picks where
to go back to: the first token of that value the model chose (tokens the grammar forced
would come out the same), or, for a container that ended too soon (``required``,
``minProperties``, ``contains``, ...), its closing bracket. That token is then forbidden at
that position, so the next attempt differs. Forbidden tokens hold only while the answer before them is unchanged. After
``max_repairs`` repairs, or when a value has no chosen token to change, the sequence ends
with the violation: the keyword and the JSON path.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .schema_checks import Completed, JsonScanner, Path, SchemaChecker, Violation

__all__ = ["AnswerChecks", "Repair", "MAX_REPAIRS"]

MAX_REPAIRS = 32
"""Repairs (backtracks out of a failed value) one answer may make before it ends with the error."""


_WANTS_MORE = frozenset(
    {"required", "minProperties", "dependencies", "dependentRequired", "contains", "minContains", "minItems"}
)
"""Keywords a container fails by ending too soon: repaired at its closing bracket."""


@dataclass(frozen=True)
class Repair:
    """Go back to ``keep`` tokens and forbid ``token`` there."""

    keep: int
    token: int
    violation: Violation


class AnswerChecks:
    """The checks of one answer (see the module docstring)."""

    def __init__(
        self,
        checker: SchemaChecker,
        token_bytes: Callable[[int], bytes],
        eos: int | None,
        *,
        max_repairs: int = MAX_REPAIRS,
    ) -> None:
        self.checker = checker
        self._token_bytes = token_bytes
        self._eos = eos
        self.max_repairs = max_repairs
        self.repairs = 0
        self.scanner = JsonScanner()
        self._ends: list[int] = []  # byte offset where each consumed token ends
        self._forced: list[bool] = []  # whether the grammar forced each token
        self.forbidden: dict[int, set[int]] = {}  # position -> tokens not allowed there
        self._root_checked = False
        self.last: Violation | None = None  # the violation of the last repair
        self._end_checked_at = -1  # answer length end_fails() last looked at
        self._end_violation: Violation | None = None

    def push(self, tokens: Sequence[int], *, forced: bool) -> Violation | None:
        """Follow ``tokens`` (just consumed); the first violation of a value they complete."""
        found: Violation | None = None
        for token in tokens:
            data = b"" if token == self._eos else self._token_bytes(token)
            completed = self.scanner.feed(data)
            self._ends.append(len(self.scanner.data))
            self._forced.append(forced)
            if found is None:
                found = self._check(completed)
        return found

    def finish(self) -> Violation | None:
        """The answer is over (the grammar stopped): its last checks, the whole schema included."""
        found = self._check(self.scanner.finish())
        if found is None and not self._root_checked:
            self._root_checked = True
            try:
                value = json.loads(bytes(self.scanner.data))
            except ValueError as e:
                return Violation("type", (), f"the answer is not JSON: {e}")
            found = self.checker.check((), value)
        return found

    def end_fails(self) -> Violation | None:
        """What ending the answer here would violate, for a number or literal at the root (the
        end is what completes it: the engine ends a row on EOS without another step). None when
        the end is fine or completes nothing."""
        scanner = self.scanner
        if not scanner.open_root_scalar:
            return None
        size = len(scanner.data)
        if self._end_checked_at != size:
            self._end_checked_at = size
            try:
                self._end_violation = self.checker.check((), json.loads(bytes(scanner.data)))
            except ValueError:
                self._end_violation = None  # not a value yet: the grammar does not allow the end either
        return self._end_violation

    def _check(self, completed: Sequence[Completed]) -> Violation | None:
        checker, data = self.checker, self.scanner.data
        for value in completed:
            path = value.path
            if path and isinstance(path[-1], int) and path[-1] > 0 and checker.unique_items(path[:-1]):
                duplicate = self._duplicate(path)
                if duplicate is not None:
                    return duplicate
            if not checker.wants(path):
                continue
            if not path:
                self._root_checked = True
            try:
                parsed = json.loads(bytes(data[value.start : value.end]))
            except ValueError:
                continue  # not JSON yet by our lenient scan; the grammar has the last word
            found = checker.check(path, parsed)
            if found is not None:
                return found
        return None

    def _duplicate(self, path: Path) -> Violation | None:
        """The element at ``path`` as a violation when an earlier element of its array equals it."""
        spans, data = self.scanner.spans, self.scanner.data
        *parent, index = path
        assert isinstance(index, int)

        def canonical(span: tuple[int, int]) -> str | None:
            try:
                return json.dumps(json.loads(bytes(data[span[0] : span[1]])), sort_keys=True)
            except ValueError:
                return None

        mine = canonical(spans[path])
        if mine is None:
            return None
        for earlier in range(index):
            span = spans.get((*parent, earlier))
            if span is not None and canonical(span) == mine:
                return Violation(
                    "uniqueItems",
                    path,
                    f"item {index} repeats item {earlier} ({mine[:60]}) in a uniqueItems array",
                )
        return None

    def repair(self, violation: Violation, history: Sequence[int]) -> Repair | None:
        """Where to go back to for ``violation``, or None when it cannot be repaired."""
        if self.repairs >= self.max_repairs:
            return None
        starts = self.scanner.starts
        path = violation.path
        while path and path not in starts:
            path = path[:-1]
        chosen = None
        span = self.scanner.spans.get(path)
        if violation.keyword in _WANTS_MORE and span is not None and self.scanner.data[span[1] - 1] in b"]}":
            # The container lacks something: go back to its closing bracket and forbid it there,
            # so the next attempt goes on instead of ending the same way.
            closing = bisect.bisect_right(self._ends, span[1] - 1)
            if closing < len(self._forced) and not self._forced[closing]:
                chosen = closing
        if chosen is None:
            first = bisect.bisect_right(self._ends, starts.get(path, 0))
            chosen = next((i for i in range(first, len(self._forced)) if not self._forced[i]), None)
        if chosen is None:
            return None
        self.repairs += 1
        self.last = violation
        return Repair(chosen, history[chosen], violation)

    def rewind(self, keep: int, forbid: int | None = None) -> None:
        """Forget every token after the first ``keep``; forbid ``forbid`` at position ``keep``."""
        if keep < len(self._ends):
            data = bytes(self.scanner.data[: self._ends[keep - 1] if keep else 0])
            del self._ends[keep:]
            del self._forced[keep:]
            self.scanner = JsonScanner()
            self.scanner.feed(data)
            self._root_checked = False
        for position in [p for p in self.forbidden if p > keep]:
            del self.forbidden[position]
        if forbid is not None:
            self.forbidden.setdefault(keep, set()).add(forbid)

    def forbidden_now(self) -> set[int]:
        """Tokens not allowed at the next position."""
        return self.forbidden.get(len(self._ends), set())
