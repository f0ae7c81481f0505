"""Host functions that let a wasm controller use the host's grammar engine.

A controller imports them from module ``wasmshare`` (declared in
``wasmshare_controller.h``): it opens a constraint by spec, asks the host to fill the
token mask for the constraint's current state straight into its own mask slot, advances
it by the tokens the engine sampled, and asks whether it is accepting or finished. The
controller keeps its own logic (free text until a marker, a tool call constrained by a
schema, then stop) while the mask itself costs what llguidance costs: no copy.

Status codes follow the core ABI: 0 or a positive value for success, negative for errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import GuestError, WasmshareError
from . import _layout as L
from . import constraints as C

log = logging.getLogger("wasmshare.llm")

KIND_JSON_SCHEMA = 1
KIND_REGEX = 2
KIND_GRAMMAR = 3
KIND_CHOICE = 4
KIND_STOP = 5
ERR_BAD_HANDLE = -1
ERR_SPEC = -2
ERR_REJECTED = -3
ERR_BOUNDS = -4
MAX_OPEN = 16


class TokenizerSource(Protocol):
    """What compiling a constraint needs to know about the tokenizer."""

    sha256: str
    tokenizer_json: str | None
    vocab_size: int
    eos_token: int | None
    name: str


class TokenizerInfo:
    """A :class:`TokenizerSource` rebuilt from its parts (in a worker process)."""

    def __init__(
        self, sha256: str, tokenizer_json: str | None, vocab_size: int, eos_token: int | None, name: str
    ):
        self.sha256 = sha256
        self.tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token = eos_token
        self.name = name


MAX_SPEC_BYTES = 256 << 10
"""The longest constraint spec a controller may pass to ``ws_constraint_open``."""


def prepare_tokenizer(tokenizer: TokenizerSource) -> None:
    """Build the grammar engine's view of ``tokenizer`` now, so no later call pays for it.

    The first constraint compiled for a tokenizer builds it, which takes long for a large
    vocabulary; a controller that opens a constraint mid-generation would otherwise
    pay that inside a step's deadline. Tokenizers without their JSON are left alone (their
    constraints fail with the reason when opened)."""
    if tokenizer.tokenizer_json is None:
        return
    try:
        C.prepare_tokenizer(tokenizer)  # type: ignore[arg-type]
    except WasmshareError as e:
        log.warning("preparing tokenizer %r for constraints failed: %s", tokenizer.name, e)


def constraint_imports(
    guest_of: Callable[[], Any],
    tokenizer: TokenizerSource,
    check_budget: Callable[[str], None] | None = None,
) -> dict[tuple[str, str], Callable[..., int]]:
    """The ``ws_constraint_*`` host functions for one controller guest.

    ``guest_of()`` returns the :class:`~wasmshare.guest.Guest` once it exists (the imports
    are defined before instantiation). Matchers live as long as the guest.
    ``check_budget(name)`` raises when the current call is past its deadline; it runs
    before and after each function's work, so host work counts against the deadline like
    the guest's own. Every guest pointer is checked against the guest's loans
    (:meth:`~wasmshare.guest.Guest.check_host_access`) before the host touches it.
    """
    matchers: dict[int, Any] = {}
    opened: dict[
        int, tuple[C.CompiledConstraint, list[int]]
    ] = {}  # what each handle was built from, and its tokens
    words = L.mask_words(tokenizer.vocab_size)

    def read_spec(kind: int, ptr: int, length: int) -> C.ConstraintSpec:
        if not 0 <= length <= MAX_SPEC_BYTES:
            raise C.ConstraintError(f"a spec of {length} bytes (at most {MAX_SPEC_BYTES})")
        text = guest_of().read_memory(ptr, length).decode("utf-8")
        if kind == KIND_JSON_SCHEMA:
            return C.json_schema(text)
        if kind == KIND_REGEX:
            return C.regex(text)
        if kind == KIND_GRAMMAR:
            return C.grammar(text)
        if kind == KIND_CHOICE:
            import json

            return C.choice(json.loads(text))
        if kind == KIND_STOP:
            import json

            return C.stop(json.loads(text))
        raise C.ConstraintError(f"unknown constraint kind {kind}")

    def ws_constraint_open(kind: int, ptr: int, length: int) -> int:
        guest = guest_of()
        if len(matchers) >= MAX_OPEN:
            log.warning("controller '%s': more than %d open constraints", guest.name, MAX_OPEN)
            return ERR_SPEC
        try:
            spec = read_spec(kind, ptr, length)
        except GuestError:
            raise  # a pointer the host may not read: the guest traps
        except (WasmshareError, UnicodeDecodeError, ValueError, RecursionError) as e:
            log.warning("controller '%s': ws_constraint_open failed: %s", guest.name, e)
            return ERR_SPEC
        try:
            compiled = C.compile_constraint(spec, tokenizer)  # type: ignore[arg-type]
        except (WasmshareError, UnicodeDecodeError, ValueError) as e:
            log.warning("controller '%s': ws_constraint_open failed: %s", guest.name, e)
            return ERR_SPEC
        if compiled.plan is not None and compiled.plan.needs_checks:
            # The controller drives the matcher token by token; the host cannot repair its
            # answer, so a grammar that only over-approximates the schema is not offered.
            log.warning(
                "controller '%s': ws_constraint_open: the schema needs checks (%s), which controllers cannot use",
                guest.name,
                ", ".join(compiled.plan.keywords),
            )
            return ERR_SPEC
        handle = max(matchers, default=0) + 1
        matchers[handle] = compiled.matcher()
        opened[handle] = (compiled, [])
        return handle

    def renew(handle: int) -> Any | None:
        """Rebuild a matcher whose shared lexer hit llguidance's size cap (see CompiledConstraint)."""
        compiled, history = opened[handle]
        if not compiled.recovers_from(str(matchers[handle].get_error())):
            return None
        try:
            matchers[handle] = compiled.renewed_matcher(history)
        except WasmshareError as e:
            log.warning("controller '%s': rebuilding constraint %d failed: %s", guest_of().name, handle, e)
            return None
        return matchers[handle]

    def ws_constraint_fill_mask(handle: int, mask_ptr: int, mask_words: int) -> int:
        matcher = matchers.get(handle)
        if matcher is None:
            return ERR_BAD_HANDLE
        guest = guest_of()
        nbytes = words * 4
        if mask_words != words or mask_ptr <= 0:
            return ERR_BOUNDS
        try:
            guest.check_host_access(mask_ptr, nbytes, write=True)
        except GuestError as e:
            log.warning("controller '%s': ws_constraint_fill_mask refused: %s", guest.name, e)
            return ERR_BOUNDS
        # The mask lands in the controller's memory (its lent mask row): no copy.
        matcher.unsafe_compute_mask_ptr(guest.memory_address + mask_ptr, nbytes)
        if matcher.is_error() and (matcher := renew(handle)) is not None:
            matcher.unsafe_compute_mask_ptr(guest.memory_address + mask_ptr, nbytes)
        return ERR_REJECTED if matcher is None or matcher.is_error() else 0

    def ws_constraint_consume(handle: int, token: int) -> int:
        matcher = matchers.get(handle)
        if matcher is None:
            return ERR_BAD_HANDLE
        token &= 0xFFFFFFFF
        ok = matcher.consume_token(token)
        if not ok and (matcher := renew(handle)) is not None:
            ok = matcher.consume_token(token)
        if ok:
            opened[handle][1].append(token)
        return 0 if ok else ERR_REJECTED

    def ws_constraint_is_accepting(handle: int) -> int:
        matcher = matchers.get(handle)
        return ERR_BAD_HANDLE if matcher is None else int(bool(matcher.is_accepting()))

    def ws_constraint_is_stopped(handle: int) -> int:
        matcher = matchers.get(handle)
        return ERR_BAD_HANDLE if matcher is None else int(bool(matcher.is_stopped()))

    def ws_constraint_close(handle: int) -> int:
        opened.pop(handle, None)
        return 0 if matchers.pop(handle, None) is not None else ERR_BAD_HANDLE

    functions: dict[str, Callable[..., int]] = {
        "ws_constraint_open": ws_constraint_open,
        "ws_constraint_fill_mask": ws_constraint_fill_mask,
        "ws_constraint_consume": ws_constraint_consume,
        "ws_constraint_is_accepting": ws_constraint_is_accepting,
        "ws_constraint_is_stopped": ws_constraint_is_stopped,
        "ws_constraint_close": ws_constraint_close,
    }
    if check_budget is None:
        return {("wasmshare", name): fn for name, fn in functions.items()}
    return {("wasmshare", name): _budgeted(name, fn, check_budget) for name, fn in functions.items()}


def _budgeted(name: str, fn: Callable[..., int], check_budget: Callable[[str], None]) -> Callable[..., int]:
    """``fn`` with the call's deadline checked before and after it."""

    def call(*args: Any) -> int:
        check_budget(name)
        result = fn(*args)
        check_budget(name)
        return result

    return call
