"""Structured output: JSON Schema, regex, Lark grammar and choice constraints.

A :class:`ConstraintSpec` says *what* output is allowed; :func:`json_schema`,
:func:`any_json`, :func:`regex`, :func:`grammar`, :func:`choice` and :func:`stop` build one. Compiling a
spec for a tokenizer gives a :class:`CompiledConstraint`, cached by (spec, tokenizer) and
shared by every sequence that uses it; each sequence gets its own cheap matcher from it.

The token masks come from llguidance, written *in place* into the sequence's row of the
batch bitmask (``unsafe_compute_mask_ptr``, no copy): :class:`ConstraintInstance` plays the role of a wasm controller in a
:class:`~wasmshare.llm.batch.ControllerBatch`, so constrained and controller-driven
sequences share one batch, one bitmask and one ``apply``. Mask computation drops the GIL, so
a batch computes its constrained rows in parallel on its thread pool.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import ConstraintError
from . import _layout as L
from ._answer_checks import AnswerChecks
from ._layout import write_status
from .schema_checks import SchemaChecker, Violation
from .schema_plan import SchemaPlan, one_line, plan_schema

if TYPE_CHECKING:
    from ._regions import BatchRegions
    from .tokens import TokenTable

__all__ = [
    "ConstraintSpec",
    "ConstraintError",
    "CompiledConstraint",
    "ConstraintInstance",
    "json_schema",
    "any_json",
    "regex",
    "grammar",
    "choice",
    "stop",
    "compile_constraint",
]

Kind = Literal["json_schema", "regex", "grammar", "choice", "stop"]
Backend = Literal["llguidance", "xgrammar"]
BACKENDS: tuple[Backend, ...] = ("llguidance", "xgrammar")


def parse_backend(name: object) -> Backend:
    """``name`` as a :data:`Backend`, or :class:`ConstraintError` naming the choices."""
    for backend in BACKENDS:
        if name == backend:
            return backend
    raise ConstraintError(f"grammar_backend must be one of {', '.join(BACKENDS)}, got {name!r}")


@dataclass(frozen=True)
class ConstraintSpec:
    """What a sequence's output must match. Build one with the functions of this module.

    ``source`` is the canonical text of the constraint (the schema as compact JSON, the
    pattern, the grammar, or the choices as a JSON list); specs with equal ``kind`` and
    ``source`` share one compiled constraint.
    """

    kind: Kind
    source: str

    @property
    def key(self) -> str:
        """A stable hash of the spec."""
        return hashlib.sha256(f"{self.kind}\0{self.source}".encode()).hexdigest()

    @property
    def stop_strings(self) -> list[str]:
        """For a :func:`stop` constraint, its strings (the engine cuts the output there); else []."""
        return list(json.loads(self.source)) if self.kind == "stop" else []

    def describe(self) -> str:
        """A short label for messages."""
        text = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"{self.kind} {text}"


Whitespace = Literal["compact", "flexible"]


def json_schema(
    schema: dict[str, Any] | str | Path | bool,
    *,
    coerce_one_of: bool = False,
    whitespace: Whitespace = "compact",
) -> ConstraintSpec:
    """Output is JSON valid under ``schema`` (a dict, JSON text, or a path to a ``.json`` file).

    Every keyword llguidance implements is enforced; a schema using one it does not raises
    :class:`ConstraintError` at compile time naming it. ``coerce_one_of=True`` opts in to
    approximating ``oneOf`` by ``anyOf`` (the output may then match several branches).

    ``whitespace="compact"`` (the default) allows exactly one separator form between items
    and after keys (``{"a": 1, "b": 2}``); ``"flexible"`` allows any JSON whitespace there.
    Flexible whitespace lets a small model wander (newlines between a value and its comma,
    padding until the token limit); compact answers are shorter and complete more often (see
    ``bench/results/json_whitespace.json``). A schema that sets
    ``"x-guidance": {"whitespace_flexible": ...}`` itself keeps its own choice.
    """
    if whitespace not in ("compact", "flexible"):
        raise ConstraintError(f"whitespace must be 'compact' or 'flexible', got {whitespace!r}")
    if isinstance(schema, Path):
        try:
            schema = json.loads(schema.read_text())
        except (OSError, ValueError) as e:
            raise ConstraintError(f"cannot read JSON schema {schema}: {e}") from e
    elif isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ConstraintError(f"JSON schema is not valid JSON: {e}") from e
    if not isinstance(schema, (dict, bool)):
        raise ConstraintError(f"a JSON schema is an object or a boolean, got {type(schema).__name__}")
    if coerce_one_of:
        if not isinstance(schema, dict):
            raise ConstraintError("coerce_one_of needs an object schema")
        schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), "coerce_one_of": True}}
    if isinstance(schema, dict):
        guidance = schema.get("x-guidance")
        if not isinstance(guidance, dict) or "whitespace_flexible" not in guidance:
            guidance = guidance if isinstance(guidance, dict) else {}
            schema = {**schema, "x-guidance": {**guidance, "whitespace_flexible": whitespace == "flexible"}}
    # Key order is kept: properties are generated in the order the schema lists them.
    try:
        return ConstraintSpec("json_schema", json.dumps(schema, separators=(",", ":")))
    except RecursionError:
        raise ConstraintError("the JSON schema is nested too deep") from None


def check_spec(spec: ConstraintSpec) -> None:
    """Raise :class:`ConstraintError` (one line) for a spec the grammar engine would refuse,
    without a tokenizer: a malformed regex, grammar or schema, or an unsupported keyword.

    For checking user input before loading a model; compiling for a tokenizer
    (:func:`compile_constraint`) can still refuse what only the vocabulary reveals."""
    import llguidance

    text = _to_grammar(spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, None)
    if is_error:
        reason = one_line(messages)
        if spec.kind != "grammar":  # positions are in the grammar built from the spec, not in the spec
            reason = re.sub(r"^at \d+\(\d+\): ", "", reason)
        raise ConstraintError(f"{spec.describe()}: {reason}")


def any_json() -> ConstraintSpec:
    """Output is any JSON object (``{"type": "object"}``)."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> ConstraintSpec:
    """Output matches the regular expression ``pattern`` entirely (Rust regex syntax)."""
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError("regex pattern must be a non-empty string")
    return ConstraintSpec("regex", pattern)


def grammar(lark: str) -> ConstraintSpec:
    """Output is generated by a Lark grammar (llguidance's Lark dialect; ``start`` rule)."""
    if not isinstance(lark, str) or not lark.strip():
        raise ConstraintError("grammar must be non-empty Lark text")
    rules = len(_LARK_RULE.findall(lark))
    if rules > MAX_GRAMMAR_RULES:
        raise ConstraintError(f"grammar: {rules:,} rules; at most {MAX_GRAMMAR_RULES:,}")
    depth = deepest = 0
    for ch in lark:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    if deepest > MAX_GRAMMAR_NESTING:
        raise ConstraintError(f"grammar: brackets nested {deepest} deep; at most {MAX_GRAMMAR_NESTING}")
    return ConstraintSpec("grammar", lark)


MAX_GRAMMAR_RULES = 1000
"""Rules a Lark grammar may define. llguidance checks a grammar recursively on the native
stack: a chain of about 2,800 rules that each refer to the next crashed the process
(SIGSEGV) instead of raising, so grammars from clients are bounded well below that."""
MAX_GRAMMAR_NESTING = 64
"""Deepest bracket nesting in a Lark grammar, for the same reason."""
_LARK_RULE = re.compile(r"^[ \t]*[?!]?[A-Za-z_][\w.]*(?:\{[^}\n]*\})?(?:\[[^\]\n]*\])?[ \t]*:", re.M)


def choice(options: Sequence[str]) -> ConstraintSpec:
    """Output is exactly one of ``options``."""
    if isinstance(options, str) or not options or not all(isinstance(o, str) and o for o in options):
        raise ConstraintError("choice needs a list of non-empty strings")
    return ConstraintSpec("choice", json.dumps(list(options)))


def stop(strings: Sequence[str]) -> ConstraintSpec:
    """Free text that ends as soon as one of ``strings`` has been generated.

    The sequence stops right after the stop string (no token after it is sampled) and the
    engine leaves the string out of the output. Unlike the engine's ``stop=`` option this is
    a constraint, so it works wherever constraints do: in a bare :class:`ControllerBatch`, the
    transformers adapter, and a controller's ``ws_constraint_*`` imports. llguidance backend only.
    """
    if isinstance(strings, str) or not strings or not all(isinstance(s, str) and s for s in strings):
        raise ConstraintError("stop needs a list of non-empty strings")
    return ConstraintSpec("stop", json.dumps(list(strings)))


def _rust_regex_literal(text: str) -> str:
    """``text`` as a Rust regex matching it literally (every non-alphanumeric as ``\\x{..}``)."""
    return "".join(c if c.isascii() and c.isalnum() else f"\\x{{{ord(c):X}}}" for c in text)


# -- compiling -------------------------------------------------------------------------------


@dataclass
class CompiledConstraint:
    """A spec compiled for one tokenizer; :meth:`matcher` starts a sequence on it."""

    spec: ConstraintSpec
    grammar: str
    compile_ms: float
    warnings: tuple[str, ...]
    _engine: Any
    _template: Any
    backend: Backend = "llguidance"
    checker: SchemaChecker | None = None
    """For a JSON Schema (llguidance backend): the whole schema, checked on completed values."""

    @property
    def plan(self) -> SchemaPlan | None:
        """For a JSON Schema: the grammar's relaxations (see :mod:`.schema_plan`)."""
        return self.checker.plan if self.checker is not None else None

    def matcher(self) -> Any:
        """A fresh matcher at the start of the constraint (llguidance ``LLMatcher``).

        Copied from a pristine matcher built once at compile time, so a new sequence does
        not pay the grammar's construction again.
        """
        return self._template.deep_copy()

    def recovers_from(self, error: str) -> bool:
        """Whether ``error`` is llguidance's cap on a shared lexer's size, which
        :meth:`renewed_matcher` recovers from."""
        return self.backend == "llguidance" and "too many expressions constructed" in error

    def matcher_at(self, history: Sequence[int]) -> Any:
        """A fresh matcher advanced by ``history`` (a sequence going back to an earlier point)."""
        fresh = self.matcher()
        if history and not fresh.consume_tokens(list(history)):
            raise ConstraintError(
                f"{self.spec.describe()}: replaying {len(history)} tokens failed: {fresh.get_error()}"
            )
        return fresh

    def renewed_matcher(self, history: Sequence[int]) -> Any:
        """A matcher on a newly built lexer, advanced by ``history``.

        Copies of one template share its lexer, which grows with every sequence that uses
        it; llguidance caps its size ("too many expressions constructed"). When a sequence
        hits that cap, the template is rebuilt (later sequences use the new one) and the
        sequence goes on from a copy of it. llguidance backend only.
        """
        import llguidance

        with _lock:
            self._template = llguidance.LLMatcher(self._engine, self.grammar, log_level=0)
        return self.matcher_at(history)


_tokenizers: dict[str, Any] = {}
MAX_COMPILED_CONSTRAINTS = 256
"""Compiled constraints kept per process (least recently used dropped): specs come from clients."""
_compiled: OrderedDict[tuple[str, str, str], CompiledConstraint] = OrderedDict()
_lock = threading.Lock()


def prepare_tokenizer(table: TokenTable) -> None:
    """Build llguidance's tokenizer for ``table`` now (it is built once per process and kept),
    and load the schema checks' validator and format checkers, so no step deadline pays for them."""
    _engine_tokenizer(table)
    import jsonschema

    _ = jsonschema.Draft7Validator.FORMAT_CHECKER


def _engine_tokenizer(table: TokenTable) -> Any:
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - llguidance is a dependency of the llm extra
        raise ConstraintError("structured output needs llguidance: pip install 'wasmshare[llm]'") from e
    with _lock:
        engine = _tokenizers.get(table.sha256)
        if engine is None:
            if table.tokenizer_json is None:
                raise ConstraintError(
                    f"token table {table.name!r} was not built from a Hugging Face tokenizer; "
                    "constraints need one (TokenTable.from_file / from_tokenizer / deepseek)"
                )
            engine = llguidance.LLTokenizer(
                table.tokenizer_json,
                n_vocab=table.vocab_size,
                eos_token=table.eos_token if table.eos_token is not None else None,
            )
            _tokenizers[table.sha256] = engine
        return engine


def _to_grammar(spec: ConstraintSpec) -> str:
    import llguidance

    try:
        if spec.kind == "json_schema":
            return schema_plan(spec).grammar  # built (and accepted) while planning
        if spec.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.source))
        if spec.kind == "grammar":
            return str(llguidance.LLMatcher.grammar_from_lark(spec.source))
        if spec.kind == "stop":
            ends = "|".join(_rust_regex_literal(s) for s in json.loads(spec.source))
            return str(
                llguidance.LLMatcher.grammar_from_lark(f"start: text\ntext[stop=/(?:{ends})/]: /(?s:.*)/")
            )
        options = json.loads(spec.source)
        return str(llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(o) for o in options)))
    except Exception as e:  # noqa: BLE001 - llguidance raises ValueError and others; a plan, ConstraintError
        raise ConstraintError(f"{spec.describe()}: {e}") from e


@functools.lru_cache(maxsize=MAX_COMPILED_CONSTRAINTS)
def schema_plan(spec: ConstraintSpec) -> SchemaPlan:
    """How a ``json_schema`` spec is enforced: the grammar llguidance compiles and the keywords
    left to checks (see :mod:`.schema_plan`). Raises :class:`ConstraintError` for a schema
    that cannot be planned (a remote ``$ref``, a schema too large)."""
    if spec.kind != "json_schema":
        raise ConstraintError(f"{spec.describe()}: not a JSON Schema")
    return plan_schema(json.loads(spec.source))


def enforcement(spec: ConstraintSpec) -> str | None:
    """How answers under ``spec`` are enforced, for results and reports: ``grammar``,
    ``grammar + checks (not, oneOf)``, or None for a spec that is not a JSON Schema."""
    if spec.kind != "json_schema":
        return None
    try:
        return schema_plan(spec).describe()
    except ConstraintError:
        return None


def compile_constraint(
    spec: ConstraintSpec, table: TokenTable, *, backend: Backend = "llguidance"
) -> CompiledConstraint:
    """Compile ``spec`` for ``table``'s tokenizer, once per process (cached).

    ``backend`` chooses the grammar engine: llguidance (the default: widest JSON Schema
    coverage, fast compiles, forced tokens) or xgrammar (optional; install it with
    ``pip install --no-deps xgrammar`` and its small dependencies). Raises
    :class:`ConstraintError` naming the unsupported feature (for example a JSON Schema
    keyword the engine does not implement): nothing is silently ignored.
    """
    backend = parse_backend(backend)
    key = (spec.key, table.sha256, backend)
    with _lock:
        hit = _compiled.get(key)
        if hit is not None:
            _compiled.move_to_end(key)
    if hit is not None:
        return hit
    compiled = _compile_xgrammar(spec, table) if backend == "xgrammar" else _compile_llguidance(spec, table)
    with _lock:
        _compiled.setdefault(key, compiled)
        _compiled.move_to_end(key)
        while len(_compiled) > MAX_COMPILED_CONSTRAINTS:
            _compiled.popitem(last=False)
        return _compiled[key]


def _compile_llguidance(spec: ConstraintSpec, table: TokenTable) -> CompiledConstraint:
    import llguidance

    engine = _engine_tokenizer(table)
    started = time.perf_counter()
    text = _to_grammar(spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, engine)
    if is_error:
        raise ConstraintError(f"{spec.describe()}: {one_line(messages)}")
    matcher = llguidance.LLMatcher(engine, text, log_level=0)  # builds the lexer once
    if matcher.is_error():
        raise ConstraintError(f"{spec.describe()}: {matcher.get_error()}")
    checker = None
    if spec.kind == "json_schema":
        try:
            checker = SchemaChecker(schema_plan(spec))
        except ConstraintError as e:
            raise ConstraintError(f"{spec.describe()}: {e}") from e
    return CompiledConstraint(
        spec, text, (time.perf_counter() - started) * 1e3, tuple(messages), engine, matcher, checker=checker
    )


def _compile_xgrammar(spec: ConstraintSpec, table: TokenTable) -> CompiledConstraint:
    from . import _xgrammar

    try:
        compiled = _xgrammar.compile_grammar(spec.kind, spec.source, table)
    except ImportError as e:
        raise ConstraintError("the xgrammar backend needs xgrammar: pip install --no-deps xgrammar") from e
    except ValueError as e:
        raise ConstraintError(f"{spec.describe()}: xgrammar: {e}") from e
    return CompiledConstraint(
        spec, str(spec.source), compiled.compile_ms, (), compiled.compiler, compiled.template, "xgrammar"
    )


# -- running in a batch ------------------------------------------------------------------------

MAX_REPAIRS_PER_STEP = 16
"""Repairs one step may make before it gives up: a repair whose grammar-forced continuation fails
again at once costs a round of its own."""


class ConstraintInstance:
    """A constrained sequence in a batch slot: the host-side counterpart of a controller.

    Each step it consumes the tokens the engine sampled (read from the slot's step record),
    computes the forced tokens (reported as fast-forward and consumed), and writes the token
    mask straight into the slot's row of the batch bitmask. It reports through the same
    result and status records as a wasm controller, so the batch treats both alike.
    """

    def __init__(
        self,
        compiled: CompiledConstraint,
        regions: BatchRegions,
        slot: int,
        sequence_id: int,
        *,
        can_backtrack: bool = True,
    ) -> None:
        self.compiled = compiled
        self.regions = regions
        self.slot = slot
        self.sequence_id = sequence_id
        self.matcher = compiled.matcher()
        self._mask_address = regions.mask.address + slot * regions.mask_stride
        self._mask_nbytes = regions.mask_words * 4
        # A memoryview of the slot's step words: reading or writing one word through it costs
        # a small part of a numpy scalar access, and a step does several per sequence.
        self._words = memoryview(regions.step_words()[slot])
        self._status = regions.status_record(slot)
        self._label = f"constraint {compiled.spec.describe()}"
        self._history: list[int] = []  # every token consumed, to replay on a rebuilt lexer
        self.name = f"constraint:{compiled.spec.kind}"
        engine = compiled._engine if compiled.backend == "llguidance" else None
        self._eos: int | None = getattr(engine, "eos_token", None)
        # Deferred masks (llguidance only: it can test a token without a mask): the batch sets
        # defer_mask before a step to leave the mask uncomputed; mask_deferred then says so
        # until fill_mask(). allows() answers for single tokens meanwhile.
        self.can_defer = compiled.backend == "llguidance"
        self.defer_mask = False
        self.mask_deferred = False
        self.mask_error: str | None = None  # why the last mask computed on demand allows nothing
        # Schema checks (JSON Schema, llguidance): every token consumed is followed; a value
        # that fails is repaired by backtracking (when the batch can splice) or ends the row.
        self.can_backtrack = can_backtrack
        self.checks: AnswerChecks | None = None
        if compiled.checker is not None and engine is not None:
            self.checks = AnswerChecks(compiled.checker, lambda t: bytes(engine.decode_bytes([t])), self._eos)

    def create(self, n_prompt_tokens: int, arg_offset_bytes: int, arg_len: int) -> None:
        """Nothing to run at creation (the prompt is not constrained); reports OK."""
        write_status(self._status, L.STATUS_OK)

    def _fail(self, message: str) -> None:
        write_status(
            self._status, L.STATUS_RETURNED_ERROR, -1, f"{self._label} seq {self.sequence_id}: {message}"
        )

    def step(self) -> None:
        """Consume the sampled tokens, fast-forward what is forced, write the next mask.

        A lexer that reached llguidance's size cap (shared by every copy of the compiled
        template) is rebuilt once and the step redone from the sequence's history.
        """
        words = self._words
        n = words[L.W_N_TOKENS]
        tokens = words[L.W_TOKENS : L.W_TOKENS + n].tolist() if n else []
        base = len(self._history)
        repairs = self.checks.repairs if self.checks is not None else 0
        self.mask_deferred = False
        error = self._step_once(tokens)
        if error is not None and self.compiled.recovers_from(error):
            if self.checks is not None and (self.checks.repairs != repairs or len(self._history) < base):
                self._fail(error)  # a repair already moved the answer: no clean state to redo from
                return
            del self._history[base:]
            if self.checks is not None:
                self.checks.rewind(base)
            try:
                self.matcher = self.compiled.renewed_matcher(self._history)
            except ConstraintError as e:
                self._fail(str(e))
                return
            words[L.W_RESULT + 1] = L.ACTION_CONTINUE
            words[L.W_RESULT + 3] = 0
            words[L.W_RESULT + 4] = 0
            error = self._step_once(tokens)
        if error is not None:
            self._fail(error)

    def _step_once(self, tokens: list[int]) -> str | None:
        """One step on the current matcher; the error message, or None.

        The step's result is a splice of the engine's copy of the answer: ``backtrack`` drops
        the tokens after the lowest point a repair went back to (``low``), and the forced
        tokens are everything after it now."""
        words = self._words
        checks = self.checks
        if tokens:
            if not self.matcher.consume_tokens(tokens):
                return f"sampled tokens {tokens} rejected: {self.matcher.get_error() or 'not allowed here'}"
            self._history.extend(tokens)
        held = low = len(self._history)  # what the engine holds now; the lowest point kept
        if tokens and checks is not None and (violation := checks.push(tokens, forced=False)) is not None:
            error = self._repair(violation)
            if error is not None:
                return error
            low = min(low, len(self._history))
        stopped = False
        for _ in range(MAX_REPAIRS_PER_STEP):
            matcher = self.matcher
            if matcher.is_stopped():
                violation = checks.finish() if checks is not None else None
                if violation is None:
                    stopped = True
                    break
            else:
                forced = matcher.compute_ff_tokens()
                if matcher.is_error():
                    return str(matcher.get_error())
                forced = forced[: max(0, L.MAX_FF_TOKENS - (len(self._history) - low))]
                if not forced:
                    break
                if not matcher.consume_tokens(forced):
                    return f"forced tokens rejected: {matcher.get_error()}"
                self._history.extend(forced)
                violation = checks.push(forced, forced=True) if checks is not None else None
                if violation is None:
                    if matcher.is_stopped():
                        continue
                    break
            error = self._repair(violation)
            if error is not None:
                return error
            low = min(low, len(self._history))
        else:
            return f"no valid answer after {MAX_REPAIRS_PER_STEP} repairs in one step"
        if held > low:
            words[L.W_RESULT + 3] = held - low
        spliced = self._history[low:]
        if spliced:
            words[L.W_RESULT + 4] = len(spliced)
            words[L.W_FF_TOKENS : L.W_FF_TOKENS + len(spliced)] = array.array("I", spliced)
        if stopped:
            words[L.W_RESULT + 1] = L.ACTION_STOP
            return None
        if self.defer_mask and self.can_defer:
            self.mask_deferred = True
        else:
            error = self._compute_mask()
            if error is not None:
                return error
        words[L.W_RESULT + 2] = L.OUTPUT_BITMASK
        return None

    def _repair(self, violation: Violation) -> str | None:
        """Go back out of the value ``violation`` names; the error when that cannot be done."""
        checks = self.checks
        assert checks is not None
        repair = checks.repair(violation, self._history) if self.can_backtrack else None
        if repair is None:
            tries = f" after {checks.repairs} repairs" if checks.repairs else ""
            return f"answer violates the schema{tries}: {violation.describe()}"
        try:
            self.matcher = self.compiled.matcher_at(self._history[: repair.keep])
        except ConstraintError as e:
            return str(e)
        del self._history[repair.keep :]
        checks.rewind(repair.keep, repair.token)
        return None

    def _compute_mask(self) -> str | None:
        """Write the matcher's mask into the slot's row of the batch bitmask; its error, or None.

        Tokens a repair forbade here are taken out; when nothing is left, the repair failed."""
        self.matcher.unsafe_compute_mask_ptr(self._mask_address, self._mask_nbytes)
        if self.matcher.is_error():
            return str(self.matcher.get_error())
        checks = self.checks
        if checks is None:
            return None
        forbidden = checks.forbidden_now()
        eos = self._eos
        ending = checks.end_fails() if eos is not None else None
        if ending is not None and eos is not None:
            forbidden = {*forbidden, eos}  # ending here would return an invalid answer
        if not forbidden:
            return None
        row = (ctypes.c_uint32 * (self._mask_nbytes // 4)).from_address(self._mask_address)
        for token in forbidden:
            if token >> 5 < len(row):
                row[token >> 5] &= ~(1 << (token & 31)) & 0xFFFFFFFF
        if any(row):
            return None
        violation = checks.last or ending
        assert violation is not None
        tries = f" after {checks.repairs} repairs" if checks.repairs else ""
        return f"answer violates the schema{tries}: {violation.describe()}"

    def allows(self, token: int) -> bool:
        """Whether this step's mask allows ``token``, asked of the matcher without computing
        the mask (a small fraction of a mask's cost). Valid between
        a step and the next; the batch calls it for a deferred mask."""
        if self.checks is not None and token in self.checks.forbidden_now():
            return False
        if token == self._eos:  # a stopped matcher refuses EOS in validate_tokens, not in its mask
            if self.checks is not None and self.checks.end_fails() is not None:
                return False
            return bool(self.matcher.is_accepting())
        return bool(self.matcher.validate_tokens([token]) == 1)

    def fill_mask(self) -> None:
        """Compute a deferred mask into the slot's row of the batch bitmask (no-op otherwise)."""
        if not self.mask_deferred:
            return
        self.mask_deferred = False
        self.mask_error = None
        error = self._compute_mask()
        if error is not None and self.compiled.recovers_from(error):
            try:  # the shared lexer reached its cap: go on from a rebuilt one, as step() does
                self.matcher = self.compiled.renewed_matcher(self._history)
                error = self._compute_mask()
            except ConstraintError as e:
                error = str(e)
        if error is not None:  # allow nothing: the sampler ends the row, with this error
            self.mask_error = f"{self._label} seq {self.sequence_id}: {error}"
            ctypes.memset(self._mask_address, 0, self._mask_nbytes)

    @property
    def bytes_copied(self) -> int:
        """Always 0: the mask is computed straight into the shared row, nothing is copied."""
        return 0

    def close(self) -> None:
        """Nothing to release: the matcher is garbage-collected."""


def unsafe_fill_mask(matcher: Any, mask: np.ndarray[Any, Any]) -> None:
    """Compute ``matcher``'s next-token mask into a C-contiguous int32 numpy row."""
    if mask.dtype != np.int32 or not mask.flags.c_contiguous:
        raise ConstraintError("mask must be a C-contiguous int32 array")
    matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
