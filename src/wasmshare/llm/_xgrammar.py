"""The optional xgrammar backend of constraints, imported only when a constraint chooses it.

xgrammar is an optional dependency, so nothing imports this module until a constraint is
compiled with ``backend="xgrammar"``. Importing xgrammar lets its tvm-ffi runtime install
its own SIGSEGV handler, which would turn a guest's trap into a crash of the process, so
the import keeps the process's fault handlers. Failures come out as :class:`ImportError`
(xgrammar missing) or :class:`ValueError` (a spec it refuses); :mod:`.constraints` turns
them into :class:`~wasmshare.llm.constraints.ConstraintError` naming the spec.
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._libc import preserve_fault_handlers
from . import _layout as L

if TYPE_CHECKING:
    from .tokens import TokenTable

__all__ = ["XGrammarCompiled", "XGrammarMatcher", "compile_grammar"]

_compilers: dict[str, Any] = {}  # tokenizer sha256 -> xgrammar.GrammarCompiler
_lock = threading.Lock()


class XGrammarCompiled(NamedTuple):
    """One compiled grammar: the tokenizer's compiler, a pristine matcher, the compile time (ms)."""

    compiler: Any
    template: XGrammarMatcher
    compile_ms: float


def _import_xgrammar() -> Any:
    with preserve_fault_handlers():
        import xgrammar
    return xgrammar


def compile_grammar(kind: str, source: str, table: TokenTable) -> XGrammarCompiled:
    """Compile a constraint of ``kind`` with canonical text ``source`` for ``table``'s tokenizer.

    The tokenizer's compiler is built once per process and kept. Raises :class:`ImportError`
    without xgrammar and :class:`ValueError` (chained to xgrammar's error) for a spec that
    xgrammar refuses, stop constraints included (they need llguidance).
    """
    xgrammar = _import_xgrammar()
    with _lock:
        compiler = _compilers.get(table.sha256)
        if compiler is None:
            # The token table already holds the exact bytes of every token: a RAW vocabulary.
            vocab = [table.token_bytes(t) for t in range(table.vocab_size)]
            stops = [table.eos_token] if table.eos_token is not None else None
            info = xgrammar.TokenizerInfo(
                vocab, xgrammar.VocabType.RAW, vocab_size=table.vocab_size, stop_token_ids=stops
            )
            compiler = xgrammar.GrammarCompiler(info, max_threads=1)
            _compilers[table.sha256] = compiler
    started = time.perf_counter()
    try:
        if kind == "json_schema":
            grammar = compiler.compile_json_schema(source)
        elif kind == "regex":
            grammar = compiler.compile_regex(source)
        elif kind == "grammar":
            grammar = compiler.compile_lark(source)
        elif kind == "stop":
            raise ValueError("stop constraints need the llguidance backend")
        else:
            grammar = compiler.compile_regex("|".join(re.escape(o) for o in json.loads(source)))
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError and others for bad input
        raise ValueError(str(e)) from e
    template = XGrammarMatcher(xgrammar.GrammarMatcher(grammar), grammar, L.mask_words(table.vocab_size))
    return XGrammarCompiled(compiler, template, (time.perf_counter() - started) * 1e3)


class XGrammarMatcher:
    """xgrammar's GrammarMatcher behind the matcher interface of llguidance that the batch uses.

    Not thread-safe: one sequence owns each matcher (:meth:`deep_copy` starts another).
    """

    def __init__(self, matcher: Any, grammar: Any, words: int) -> None:
        self._matcher = matcher
        self._grammar = grammar
        self._words = words
        self._error = ""

    def deep_copy(self) -> XGrammarMatcher:
        """A fresh matcher at the start of the same grammar."""
        xgrammar = _import_xgrammar()
        return XGrammarMatcher(xgrammar.GrammarMatcher(self._grammar), self._grammar, self._words)

    def consume_token(self, token: int) -> bool:
        """Advance by ``token``; False (and an error kept) when the grammar refuses it."""
        if self._error:
            return False
        if not self._matcher.accept_token(token):
            self._error = f"token {token} is not allowed here"
            return False
        return True

    def consume_tokens(self, tokens: list[int]) -> bool:
        """Advance by each of ``tokens``; False at the first refused."""
        return all(self.consume_token(t) for t in tokens)

    def is_stopped(self) -> bool:
        """True when the grammar admits no further token."""
        return bool(self._matcher.is_terminated())

    def is_accepting(self) -> bool:
        """True when the output so far is a complete match."""
        return bool(self._matcher.is_completed())

    def is_error(self) -> bool:
        """True once a token was refused."""
        return bool(self._error)

    def get_error(self) -> str:
        """Why a token was refused ("" when none was)."""
        return self._error

    def compute_ff_tokens(self) -> list[int]:
        """Always empty: xgrammar forces strings, not tokens, so nothing is fast-forwarded."""
        return []

    def unsafe_compute_mask_ptr(self, address: int, nbytes: int) -> None:
        """Write the next-token bitmask to the ``nbytes`` at host ``address`` (unchecked pointer).

        Raises :class:`ValueError` when ``nbytes`` is not the size of one mask row."""
        if nbytes != self._words * 4:
            raise ValueError(f"mask of {nbytes} bytes, expected {self._words * 4}")
        row = np.ctypeslib.as_array((ctypes.c_int32 * self._words).from_address(address)).reshape(
            1, self._words
        )
        self._matcher.fill_next_token_bitmask(row, 0)
