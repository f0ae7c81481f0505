"""Fast typed calls into a guest: the one module that touches wasmtime-py's internals.

wasmtime-py's ``Func.__call__`` checks and converts every argument (tens of µs a call).
:class:`GuestFunc` checks an export's signature once, then calls
``wasmtime_func_call_unchecked`` with a preallocated ``wasmtime_val_raw_t`` array through
code generated for that signature. Everything here that reaches into wasmtime-py's
private modules and attributes (``_bindings``, ``_ffi``, ``Store._context()``,
``Func._func``, ``Trap._from_ptr``, ``WasmtimeError._from_ptr``, the library's ctypes
handle) stays in this module.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import wasmtime
import wasmtime._bindings
import wasmtime._func

from ._module import HostFunction, wasmtime_error_summary
from .errors import GuestError
from .loan import Loan, LoanSlice

# Private function pointers into the same wasmtime library, without ctypes argtypes:
# argument conversion through argtypes would cost more than the call itself.
# Every argument we pass is already a ctypes object of the exact C type.
_ffi = wasmtime._bindings
_dll = ctypes.CDLL(wasmtime._ffi.dll._name)
_raw_call_unchecked = _dll["wasmtime_func_call_unchecked"]
_raw_call_unchecked.restype = ctypes.c_void_p
_raw_set_epoch_deadline = _dll["wasmtime_context_set_epoch_deadline"]
_raw_set_epoch_deadline.restype = None
_raw_set_fuel = _dll["wasmtime_context_set_fuel"]
_raw_set_fuel.restype = ctypes.c_void_p
_set_epoch_deadline = _ffi._wasmtime_context_set_epoch_deadline
_set_fuel = _ffi._wasmtime_context_set_fuel
# Calls that keep the GIL (a PyDLL): the epoch increment is one atomic add.
_dll_gil = ctypes.PyDLL(wasmtime._ffi.dll._name)
_raw_increment_epoch = _dll_gil["wasmtime_engine_increment_epoch"]
_raw_increment_epoch.restype = None

_VAL_KINDS = {
    str(wasmtime.ValType.i32()): "i32",
    str(wasmtime.ValType.i64()): "i64",
    str(wasmtime.ValType.f32()): "f32",
    str(wasmtime.ValType.f64()): "f64",
}


def epoch_increment_call(engine: wasmtime.Engine) -> tuple[Callable[[Any], None], Any]:
    """``(increment, engine pointer)``: ``increment(pointer)`` bumps ``engine``'s epoch.

    The call keeps the GIL (it is one atomic add), so a ticker thread takes the GIL once
    a tick for a few bytecodes only.
    """
    increment: Callable[[Any], None] = _raw_increment_epoch
    return increment, engine.ptr()


def clear_last_exception() -> None:
    """Forget the exception wasmtime-py stashed from our host function (we keep our own)."""
    wasmtime._func.LAST_EXCEPTION = None


class CallGate:
    """What every call into one guest shares: run token, slow-path flag, limits, host hand-off.

    One per guest, made by the guest over its store. ``idle`` is the guest's single run
    token: ``list.pop()`` and ``list.append()`` are atomic under the GIL and cost a third
    of a Lock round trip, and an empty list means some thread is inside the guest.
    ``slow_path`` and ``borrowed`` are plain attributes because the fast path reads them
    on every call. ``caller`` is the active caller while a host function runs (wasmtime
    requires it instead of the store); ``host_error`` keeps the first exception a host
    function raised during the current call.
    """

    def __init__(
        self, store: wasmtime.Store, *, deadline_ticks: int, fuel: int | None, borrowed: set[int]
    ) -> None:
        self.store = store
        self.context = store._context()
        self.deadline_ticks = deadline_ticks
        self.fuel = fuel
        self.idle: list[bool] = [True]
        self.slow_path = True
        self.borrowed = borrowed
        self.caller: wasmtime.Caller | None = None
        self.host_error: BaseException | None = None

    def storelike(self) -> wasmtime.Store | wasmtime.Caller:
        """The store, or the active caller while a host function runs."""
        return self.caller if self.caller is not None else self.store

    def prime_limits(self) -> None:
        """Reset the epoch deadline and the fuel for the next call."""
        if self.deadline_ticks:
            _set_epoch_deadline(self.context, self.deadline_ticks)
        if self.fuel is not None:
            _set_fuel(self.context, self.fuel)

    def take_host_error(self) -> BaseException | None:
        """Return and forget the host function's exception of this call, if any."""
        error, self.host_error = self.host_error, None
        return error


def wrap_host_function(gate: CallGate, what: str, func: HostFunction) -> Callable[..., Any]:
    """Wrap a host function for wasmtime: expose the caller, keep the first exception.

    The wrapper holds the gate weakly (the store keeps the wrapper): once the guest is
    gone, a call traps.
    """
    gate_ref = weakref.ref(gate)

    def call(caller: wasmtime.Caller, *args: Any) -> Any:
        current = gate_ref()
        if current is None:
            raise wasmtime.Trap("guest is gone")
        previous = current.caller
        current.caller = caller
        try:
            return func(*args)
        except BaseException as e:
            if current.host_error is None:
                current.host_error = e
            raise wasmtime.Trap(f"host function {what} failed: {e}") from e
        finally:
            current.caller = previous

    return call


class CallHooks(NamedTuple):
    """The guest's own steps around a call, given to each :class:`GuestFunc`."""

    enter: Callable[[], None]
    """Take the run token and copy copy-mode loans in (the general path)."""
    exit: Callable[[], None]
    """End borrows, copy copy-mode loans out, give the token back (the general path)."""
    end_borrows: Callable[[], None]
    """Release every borrow the guest still holds."""
    raise_busy: Callable[[], None]
    """Raise GuestBusy."""
    translate_trap: Callable[[wasmtime.Trap, str], GuestError]
    """Map a trap in the named export to the project's exception."""


class NamedGuest(Protocol):
    """What a GuestFunc needs of its guest: the name used in messages."""

    name: str


_FAST_CALL_TEMPLATE = """
def fast_call(self, *args):
    if gate.slow_path or len(args) != {nparams}:
        return general(args)
    {unpack}
    try:
        take()
    except IndexError:
        busy()
    try:
        try:
{sets}
        except TypeError:
            return general_locked(args)
{limits}
        error = raw_call(ctx, func_ref, raw, nslots, trap_ref)
        if error or trap:
            failure(error)
        return {result}
    finally:
        give_back(True)
        if gate.borrowed:
            end_borrows()
"""


class GuestFunc:
    """A guest export with its signature checked once; call it like a function.

    Arguments are Python ints/floats, or a :class:`~wasmshare.loan.Loan` /
    :class:`~wasmshare.loan.LoanSlice`, which expands to two i32 parameters
    ``(ptr, len)`` with ``len`` counted in the loan's element type (a
    ``borrow<list<T>>``). Returns ``None``, one value, or a tuple. Traps raise
    :class:`GuestTrap` / :class:`GuestLimitExceeded` naming the guest.

    The fast path (``fast=True``) writes the arguments into a preallocated
    ``wasmtime_val_raw_t`` array and calls ``wasmtime_func_call_unchecked``; the
    signature was checked here, once, which is what makes the unchecked entry safe.
    The GIL is released for the duration of the wasm call.
    """

    def __init__(
        self,
        guest: NamedGuest,
        name: str,
        func: wasmtime.Func,
        *,
        fast: bool,
        gate: CallGate,
        hooks: CallHooks,
    ) -> None:
        self.guest = guest
        """The guest that exports the function."""
        self.name = name
        self.fast = fast
        self._func = func
        self._gate = gate
        self._hooks = hooks
        ty = func.type(gate.store)
        kinds = []
        for t in list(ty.params) + list(ty.results):
            kind = _VAL_KINDS.get(str(t))
            if kind is None:
                raise GuestError(
                    f"guest '{guest.name}': export '{name}' uses type {t}; only i32/i64/f32/f64 are supported",
                    guest=guest.name,
                )
            kinds.append(kind)
        self.param_kinds: tuple[str, ...] = tuple(kinds[: len(ty.params)])
        self.result_kinds: tuple[str, ...] = tuple(kinds[len(ty.params) :])
        self._nparams = len(self.param_kinds)
        self._nresults = len(self.result_kinds)
        slots = max(self._nparams, self._nresults, 1)
        self._raw = (_ffi.wasmtime_val_raw_t * slots)()
        self._slots = [self._raw[i] for i in range(slots)]
        self._trap = ctypes.POINTER(_ffi.wasm_trap_t)()
        self._fast_call = self._compile_fast_call(slots) if fast else None
        if self._fast_call is not None:
            # The generated function becomes this object's own __call__ (special methods are
            # looked up on the type): one Python frame per call instead of two.
            self.__class__ = type(
                "GuestFunc", (GuestFunc,), {"__call__": self._fast_call, "__doc__": GuestFunc.__doc__}
            )

    def _compile_fast_call(self, nslots: int) -> Callable[..., Any]:
        gate = self._gate
        names = [f"a{i}" for i in range(self._nparams)]
        unpack = f"{', '.join(names)}, = args" if names else "pass"
        set_lines = []
        for i, kind in enumerate(self.param_kinds):
            if kind == "i32":  # ctypes would wrap silently; out-of-range ints take the checked path
                set_lines.append(f"            if not -2147483648 <= a{i} <= 4294967295: raise TypeError")
            elif kind == "i64":
                set_lines.append(
                    f"            if not -9223372036854775808 <= a{i} <= 18446744073709551615: raise TypeError"
                )
            set_lines.append(f"            s{i}.{kind} = a{i}")
        sets = "\n".join(set_lines) or "            pass"
        limits = []
        if gate.deadline_ticks:
            limits.append("        set_deadline(ctx, deadline)")
        if gate.fuel is not None:
            limits.append("        set_fuel(ctx, fuel)")
        if self._nresults == 0:
            result = "None"
        elif self._nresults == 1:
            result = f"s0.{self.result_kinds[0]}"
        else:
            result = "(" + ", ".join(f"s{i}.{k}" for i, k in enumerate(self.result_kinds)) + ",)"
        source = _FAST_CALL_TEMPLATE.format(
            nparams=self._nparams,
            unpack=unpack,
            sets=sets,
            limits="\n".join(limits) or "        pass",
            result=result,
        )
        namespace: dict[str, Any] = {
            "gate": gate,
            "general": self._call_general,
            "general_locked": self._call_general_locked,
            "take": gate.idle.pop,
            "give_back": gate.idle.append,
            "busy": self._hooks.raise_busy,
            "end_borrows": self._hooks.end_borrows,
            "raw_call": _raw_call_unchecked,
            "ctx": gate.context,
            "func_ref": ctypes.byref(self._func._func),
            "raw": self._raw,
            "nslots": ctypes.c_size_t(nslots),
            "trap_ref": ctypes.byref(self._trap),
            "trap": self._trap,
            "failure": self._raise_failure,
            "set_deadline": _raw_set_epoch_deadline,
            "deadline": ctypes.c_uint64(gate.deadline_ticks),
            "set_fuel": _raw_set_fuel,
            "fuel": ctypes.c_uint64(gate.fuel or 0),
        }
        for i, slot in enumerate(self._slots):
            namespace[f"s{i}"] = slot
        exec(compile(source, f"<wasmshare fast call {self.guest.name}.{self.name}>", "exec"), namespace)
        fast_call: Callable[..., Any] = namespace["fast_call"]
        return fast_call

    def __repr__(self) -> str:
        return f"<GuestFunc {self.guest.name}.{self.name}({', '.join(self.param_kinds)}) -> ({', '.join(self.result_kinds)})>"

    def __call__(self, *args: Any) -> Any:
        """Call the export (the fast path replaces this method on fast instances)."""
        return self._call_general(args)

    # -- the general path: loans, argument checks, copy-mode loans, the slow binding ---------

    def _expand(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        out: list[Any] = []
        for a in args:
            if isinstance(a, (Loan, LoanSlice)):
                ptr, length = a.as_param()
                out.append(ptr)
                out.append(length)
            else:
                out.append(a)
        return tuple(out)

    def _check_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        args = self._expand(args)
        who = f"guest '{self.guest.name}': {self.name}"
        if len(args) != self._nparams:
            raise GuestError(
                f"{who} takes {self._nparams} wasm parameters ({', '.join(self.param_kinds) or 'none'}), "
                f"got {len(args)} (a loan counts as two: pointer and length)",
                guest=self.guest.name,
            )
        for i, (a, kind) in enumerate(zip(args, self.param_kinds)):
            if kind in ("i32", "i64"):
                if not isinstance(a, int) or isinstance(a, bool):
                    raise GuestError(
                        f"{who} argument {i} must be an int ({kind}), got {a!r}", guest=self.guest.name
                    )
                bits = 32 if kind == "i32" else 64
                if not -(1 << (bits - 1)) <= a < (1 << bits):  # signed or unsigned spelling
                    raise GuestError(f"{who} argument {i} = {a} does not fit {kind}", guest=self.guest.name)
            elif not isinstance(a, (int, float)) or isinstance(a, bool):
                raise GuestError(
                    f"{who} argument {i} must be a number ({kind}), got {a!r}", guest=self.guest.name
                )
        return args

    def _call_general(self, args: tuple[Any, ...]) -> Any:
        if self._fast_call is not None and not self._gate.slow_path:
            expanded = self._expand(args)
            if len(expanded) == self._nparams and len(expanded) != len(args):
                return self._fast_call(self, *expanded)  # loans expanded: back to the fast path
        self._hooks.enter()
        try:
            return self._invoke(self._check_args(args))
        finally:
            self._hooks.exit()

    def _call_general_locked(self, args: tuple[Any, ...]) -> Any:
        # Entered from the fast path with the guest's run token taken; it gives it back.
        return self._invoke(self._check_args(args))

    def _invoke(self, args: tuple[Any, ...]) -> Any:
        if not self.fast:
            return self._call_slow(args)
        gate = self._gate
        slots = self._slots
        for slot, kind, value in zip(slots, self.param_kinds, args):
            setattr(slot, kind, value)
        gate.prime_limits()
        error = _raw_call_unchecked(
            gate.context,
            ctypes.byref(self._func._func),
            self._raw,
            ctypes.c_size_t(len(slots)),
            ctypes.byref(self._trap),
        )
        if error or self._trap:
            self._raise_failure(error)
        if self._nresults == 0:
            return None
        if self._nresults == 1:
            return getattr(slots[0], self.result_kinds[0])
        return tuple(getattr(slots[i], k) for i, k in enumerate(self.result_kinds))

    def _raise_failure(self, error: Any) -> None:
        name = self.guest.name
        if self._trap:
            address = ctypes.cast(self._trap, ctypes.c_void_p).value
            ctypes.memset(ctypes.addressof(self._trap), 0, ctypes.sizeof(self._trap))
            trap = wasmtime.Trap._from_ptr(
                ctypes.cast(ctypes.c_void_p(address), ctypes.POINTER(_ffi.wasm_trap_t))
            )
            clear_last_exception()
            raise self._hooks.translate_trap(trap, self.name) from trap
        err = wasmtime.WasmtimeError._from_ptr(
            ctypes.cast(
                ctypes.c_void_p(
                    int(error) if isinstance(error, int) else ctypes.cast(error, ctypes.c_void_p).value
                ),
                ctypes.POINTER(_ffi.wasmtime_error_t),
            )
        )
        clear_last_exception()
        raise self._failure(err, name)

    def _failure(self, err: wasmtime.WasmtimeError, name: str) -> GuestError:
        """The error a failed call raises: a host function's own verdict on the guest (a
        deadline, a refused pointer), a host function's crash, or wasmtime's reason."""
        host_error = self._gate.take_host_error()
        if isinstance(host_error, GuestError):
            return host_error
        if host_error is not None:
            failure = GuestError(
                f"guest '{name}': host function failed in {self.name}: {host_error!r}", guest=name
            )
        else:
            failure = GuestError(
                f"guest '{name}': call to {self.name} failed: {wasmtime_error_summary(err)}", guest=name
            )
        failure.__cause__ = host_error if host_error is not None else err  # as `raise ... from`
        failure.__suppress_context__ = True
        return failure

    def _call_slow(self, args: tuple[Any, ...]) -> Any:
        gate = self._gate
        name = self.guest.name
        gate.prime_limits()
        try:
            result = self._func(gate.store, *args)
        except wasmtime.Trap as trap:
            clear_last_exception()
            raise self._hooks.translate_trap(trap, self.name) from trap
        except wasmtime.WasmtimeError as err:
            clear_last_exception()
            failure = self._failure(err, name)
            raise failure from failure.__cause__ or err
        if self._nresults > 1:
            return tuple(result)
        return result
