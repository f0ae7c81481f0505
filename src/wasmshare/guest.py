"""Guest: one WebAssembly instance whose linear memory never moves.

A :class:`Guest` owns a wasmtime Store and Instance. Its engine keeps linear memory at
a fixed address (``memory_may_move = False``), which is what lets :mod:`wasmshare.loan`
map shared regions into it. A guest is single-threaded: a call from a second thread
while one is running raises :class:`GuestBusy` instead of corrupting the store. Different
guests run in parallel on different threads (wasm calls release the GIL).
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import wasmtime
from wasmtime import _bindings as _ffi

from . import _engine
from ._libc import WASM_PAGE_SIZE
from .errors import AbiMismatch, GuestBusy, GuestError, GuestLimitExceeded, GuestTrap, LoanError
from .loan import Access, Loan, LoanSlice

if TYPE_CHECKING:
    import numpy.typing as npt

    from .loan import Placement
    from .region import Region

__all__ = ["Guest", "GuestFunc", "ABI_VERSION", "ModuleSource"]

ABI_VERSION = 1
"""The wasmshare guest ABI this host speaks (``WASMSHARE_ABI_VERSION`` in ``wasmshare.h``)."""

ModuleSource = str | os.PathLike[str] | bytes | bytearray
"""A module: a path to ``.wasm``/``.wat``, wasm bytes, or WAT text."""

HostFunction = Callable[..., Any]

log = logging.getLogger("wasmshare.guest")

_WS_ACCESS: dict[int, Access] = {1: "ro", 2: "rw"}
WS_OK = 0
WS_ERR_BAD_HANDLE = -1
WS_ERR_ACCESS = -2
WS_ERR_NOT_BORROWED = -3
WS_ERR_FAILED = -4

_call_unchecked = _ffi._wasmtime_func_call_unchecked
_set_epoch_deadline = _ffi._wasmtime_context_set_epoch_deadline
_set_fuel = _ffi._wasmtime_context_set_fuel
_VAL_KINDS = {
    str(wasmtime.ValType.i32()): "i32",
    str(wasmtime.ValType.i64()): "i64",
    str(wasmtime.ValType.f32()): "f32",
    str(wasmtime.ValType.f64()): "f64",
}


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


def _compiled_artifact(source: ModuleSource) -> Path | None:
    """The path of a precompiled ``.cwasm`` artifact, or None for any other module source."""
    if isinstance(source, (bytes, bytearray)) or (
        isinstance(source, str) and source.lstrip().startswith("(module")
    ):
        return None
    path = Path(source)
    if path.suffix != ".cwasm":
        return None
    if not path.is_file():
        raise GuestError(f"no compiled module at {path}")
    return path


def load_wasm_bytes(source: ModuleSource) -> tuple[bytes, str]:
    wasm, name = _load_wasm(source)
    return bytes(wasm), name


def _load_wasm(source: ModuleSource) -> tuple[bytes | bytearray, str]:
    """Return wasm bytes and a default name for ``source``."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if data[:4] == b"\0asm":
            return data, "guest"
        try:
            return wasmtime.wat2wasm(data.decode("utf-8")), "guest"
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as e:
            raise GuestError(f"bytes are neither a wasm binary nor valid WAT text: {e}") from e
    if isinstance(source, str) and source.lstrip().startswith("(module"):
        try:
            return wasmtime.wat2wasm(source), "guest"
        except wasmtime.WasmtimeError as e:
            raise GuestError(f"invalid WAT text: {e}") from e
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise GuestError(f"no module at {path}") from e
    except IsADirectoryError as e:
        raise GuestError(f"{path} is a directory, not a wasm module") from e
    except OSError as e:
        raise GuestError(f"cannot read module {path}: {e.strerror}") from e
    name = path.stem
    if data[:4] == b"\0asm":
        return data, name
    try:
        return wasmtime.wat2wasm(data.decode("utf-8")), name
    except (UnicodeDecodeError, wasmtime.WasmtimeError) as e:
        raise GuestError(f"{path} is neither a wasm binary nor valid WAT text: {e}", guest=name) from e


class Guest:
    """A WebAssembly instance with a non-moving linear memory, limits and fast calls.

    Parameters
    ----------
    module:
        A path to a ``.wasm`` or ``.wat`` file, wasm bytes, or WAT text; or a path to a
        ``.cwasm`` artifact that wasmtime compiled earlier for wasmshare's engine with the
        same fuel/deadline settings (``Module.serialize()``), which is mapped from the file
        instead of compiled: its data segments are then shared copy-on-write by every
        process that loads it. Load only artifacts you built: they are native code.
    name:
        Used in every error message; defaults to the file stem.
    imports:
        Host functions by ``(module, name)``. Their wasm signature is read from the
        module's import declaration; Python values are passed and returned.
        The ``wasmshare`` import module (``ws_borrow`` & co.) is always provided; layers
        above the core add their own ``wasmshare`` functions here (the LLM runtime adds
        the ``ws_constraint_*`` family).
    memory_limit_bytes:
        Cap on linear memory (including pages grown for loans). ``memory.grow`` past it
        returns -1 to the guest; a guest that then traps raises
        :class:`GuestLimitExceeded` with ``limit="memory"``.
    fuel:
        Instructions-ish budget per call (wasmtime fuel); exhaustion raises
        :class:`GuestLimitExceeded` with ``limit="fuel"``.
    deadline_ms:
        Wall-clock budget per call, enforced with epoch interruption (ticks of a tenth of
        the deadline, 1 to 10 ms, so the guest stops within about 10 % past it); raises
        :class:`GuestLimitExceeded` with ``limit="deadline"``.
    sequence:
        An id reported in errors (the LLM layer uses the sequence number).
    cache_dir:
        Where compiled modules are cached; ``None`` for the default, ``False`` for none.

    A guest is used from one thread at a time; concurrent calls raise :class:`GuestBusy`.
    ``close()`` releases every loan, then the store.
    """

    def __init__(
        self,
        module: ModuleSource,
        *,
        name: str | None = None,
        imports: Mapping[tuple[str, str], HostFunction] | None = None,
        memory_limit_bytes: int | None = None,
        fuel: int | None = None,
        deadline_ms: float | None = None,
        sequence: int | None = None,
        cache_dir: str | os.PathLike[str] | Literal[False] | None = None,
        wasi: bool | None = None,
    ) -> None:
        self._state = _State.CLOSED
        artifact = _compiled_artifact(module)
        wasm, default_name = (b"", artifact.stem) if artifact is not None else load_wasm_bytes(module)
        self.name: str = name or default_name
        self.sequence = sequence
        self._check_limits(memory_limit_bytes, fuel, deadline_ms)
        self.memory_limit_bytes = memory_limit_bytes
        self.fuel = fuel
        self.deadline_ms = deadline_ms
        self._options = _engine.EngineOptions.for_limits(fuel, deadline_ms)
        self._engine = _engine.engine_for(self._options)
        cache = None if cache_dir is None else (False if cache_dir is False else Path(cache_dir))
        self._artifact = artifact
        self._module_sha256: str | None = None
        try:
            if artifact is not None:
                self._module = _engine.load_compiled(artifact, self._options)
            else:
                self._module, self._module_sha256 = _engine.compile_module(
                    wasm, self._options, cache_dir=cache
                )
        except wasmtime.WasmtimeError as e:
            what = (
                f"cannot load compiled module {artifact}" if artifact is not None else "invalid wasm module"
            )
            raise GuestError(
                f"guest '{self.name}': {what}: {wasmtime_error_summary(e)}", guest=self.name
            ) from e

        # The guest's single run token. list.pop() and list.append() are atomic under the
        # GIL and cost a third of a Lock round trip on the fast call path: an empty list
        # means some thread is inside the guest.
        self._idle: list[bool] = [True]
        self._caller: wasmtime.Caller | None = None
        self._host_error: BaseException | None = None
        self._loans: list[Loan] = []
        self._retired_windows: list[tuple[int, int]] = []  # (guest address, nbytes) free for reuse
        self._offers: dict[int, _Offer] = {}
        self._borrowed: set[int] = set()
        self._copy_loans: list[Loan] = []
        self._slow_path = True  # until instantiated; see _refresh_slow_path
        self._funcs: dict[str, GuestFunc] = {}
        self.bytes_copied = 0
        """Bytes the host copied into or out of this guest's memory (copy paths only)."""
        self._deadline_ticks = (
            _engine.deadline_ticks(deadline_ms, self._options.tick_ms) if deadline_ms is not None else 0
        )

        store = wasmtime.Store(self._engine)
        self._store = store
        if memory_limit_bytes is not None:
            # Tables are guest memory too (8 bytes an element here), and one table.fill over a
            # huge table runs without an epoch check: bound them with the memory.
            store.set_limits(
                memory_size=memory_limit_bytes, table_elements=MAX_TABLE_ELEMENTS, tables=16, instances=1
            )
        self._ticker: _engine.EpochTicker | None = None
        if self._options.epoch:
            self._ticker = _engine.ticker_for(self._engine, self._options.tick_ms)
            self._ticker.acquire()
        self._finalizer = weakref.finalize(self, _release_ticker, self._ticker)

        linker = self._make_linker(imports or {}, wasi)
        self._state = _State.OPEN
        self._refresh_slow_path()
        try:
            self._prime_limits()
            self._instance = linker.instantiate(store, self._module)
        except wasmtime.Trap as e:
            self._state = _State.CLOSED
            self._refresh_slow_path()
            raise self._translate_trap(e, "instantiation") from e
        except wasmtime.WasmtimeError as e:
            self._state = _State.CLOSED
            self._refresh_slow_path()
            raise self._translate_instantiation_error(e) from e
        exports = self._instance.exports(store)
        memory = exports.get("memory") if "memory" in {e.name for e in self._module.exports} else None
        self._memory: wasmtime.Memory | None = memory if isinstance(memory, wasmtime.Memory) else None
        self._memory_base = self._read_memory_base()
        if "_initialize" in {e.name for e in self._module.exports}:
            self.call("_initialize")  # WASI reactor modules set up libc here
        self._check_abi()

    # -- construction helpers -------------------------------------------------------

    @staticmethod
    def _check_limits(memory_limit_bytes: int | None, fuel: int | None, deadline_ms: float | None) -> None:
        if memory_limit_bytes is not None and (
            not isinstance(memory_limit_bytes, int) or memory_limit_bytes <= 0
        ):
            raise GuestError(f"memory_limit_bytes must be a positive int, got {memory_limit_bytes!r}")
        if fuel is not None and (not isinstance(fuel, int) or fuel <= 0):
            raise GuestError(f"fuel must be a positive int, got {fuel!r}")
        if deadline_ms is not None and (not isinstance(deadline_ms, (int, float)) or deadline_ms <= 0):
            raise GuestError(f"deadline_ms must be a positive number, got {deadline_ms!r}")

    def _make_linker(
        self, imports: Mapping[tuple[str, str], HostFunction], wasi: bool | None
    ) -> wasmtime.Linker:
        linker = wasmtime.Linker(self._engine)
        declared = {(imp.module, imp.name): imp.type for imp in self._module.imports}
        uses_wasi = any(mod.startswith("wasi_") for mod, _ in declared)
        if wasi or (wasi is None and uses_wasi):
            linker.define_wasi()
            config = wasmtime.WasiConfig()
            config.inherit_stdout()
            config.inherit_stderr()
            self._store.set_wasi(config)
        provided: set[tuple[str, str]] = set()
        self_ref = weakref.ref(self)
        for (mod, field), ty in declared.items():
            if mod == "wasmshare" and (mod, field) not in imports:
                if not isinstance(ty, wasmtime.FuncType) or field not in _WASMSHARE_IMPORTS:
                    raise AbiMismatch(
                        f"guest '{self.name}' imports unknown wasmshare function '{field}' "
                        f"(this host speaks ABI v{ABI_VERSION}: {', '.join(sorted(_WASMSHARE_IMPORTS))})",
                        guest=self.name,
                    )
                impl = _WASMSHARE_IMPORTS[field]
                linker.define_func(
                    mod, field, ty, _host_call(self_ref, field, impl, pass_guest=True), access_caller=True
                )
                provided.add((mod, field))
        for key, func in imports.items():
            if key not in declared:
                continue  # the module does not import it; harmless
            ty = declared[key]
            if not isinstance(ty, wasmtime.FuncType):
                raise GuestError(
                    f"guest '{self.name}': import {key[0]}.{key[1]} is not a function", guest=self.name
                )
            linker.define_func(
                key[0], key[1], ty, _host_call(self_ref, f"{key[0]}.{key[1]}", func), access_caller=True
            )
            provided.add(key)
        linked_wasi = bool(wasi or (wasi is None and uses_wasi))
        missing = [
            f"{m}.{n}"
            for (m, n) in declared
            if (m, n) not in provided and not (linked_wasi and m.startswith("wasi_"))
        ]
        if missing:
            raise GuestError(
                f"guest '{self.name}' needs imports the host does not provide: {', '.join(sorted(missing))}",
                guest=self.name,
            )
        return linker

    def _translate_instantiation_error(self, e: wasmtime.WasmtimeError) -> GuestError:
        text = str(e)
        if "memory" in text and ("limit" in text or "exceeds" in text):
            return GuestLimitExceeded(
                f"guest '{self.name}': initial memory exceeds the memory limit of "
                f"{self.memory_limit_bytes} bytes: {wasmtime_error_summary(e)}",
                limit="memory",
                guest=self.name,
                sequence=self.sequence,
            )
        if self._host_error is not None:
            error, self._host_error = self._host_error, None
            return GuestError(
                f"guest '{self.name}': a host function failed during instantiation: {error}", guest=self.name
            )
        return GuestError(
            f"guest '{self.name}': instantiation failed: {wasmtime_error_summary(e)}", guest=self.name
        )

    def _check_abi(self) -> None:
        exported = {e.name for e in self._module.exports}
        imports_ws = any(imp.module == "wasmshare" for imp in self._module.imports)
        if "ws_abi_version" not in exported:
            if imports_ws:
                raise AbiMismatch(
                    f"guest '{self.name}' imports wasmshare host functions but does not export "
                    "ws_abi_version (build it with wasmshare.h)",
                    guest=self.name,
                )
            return
        version = self.call("ws_abi_version")
        if version != ABI_VERSION:
            raise AbiMismatch(
                f"guest '{self.name}' was built for wasmshare ABI v{version}; this host speaks v{ABI_VERSION}",
                guest=self.name,
                sequence=self.sequence,
            )

    # -- state ---------------------------------------------------------------------

    @property
    def module(self) -> wasmtime.Module:
        """The compiled module: its ``exports`` and ``imports`` describe what the guest offers."""
        return self._module

    @property
    def module_sha256(self) -> str:
        """sha256 of the module's wasm bytes (of the artifact file for a ``.cwasm``, hashed on first use)."""
        if self._module_sha256 is None:
            self._module_sha256 = _engine.file_sha256(self._artifact) if self._artifact is not None else ""
        return self._module_sha256

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._state is _State.CLOSED

    def _require_open(self) -> None:
        if self._state is not _State.OPEN:
            raise GuestError(f"guest '{self.name}' is closed", guest=self.name, sequence=self.sequence)

    def close(self) -> None:
        """Release every loan, then the store. Safe to call twice."""
        if self._state is _State.CLOSED:
            return
        for loan in list(self._loans):
            loan._guest_closing()
        self._loans.clear()
        self._offers.clear()
        self._state = _State.CLOSED
        self._refresh_slow_path()
        self._finalizer()
        self._funcs.clear()
        self._store.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.memory_nbytes} bytes of memory, {len(self._loans)} loans"
        return f"<Guest '{self.name}' {state}>"

    # -- store access --------------------------------------------------------------

    def _storelike(self) -> wasmtime.Store | wasmtime.Caller:
        """The store, or the active caller while a host function runs (wasmtime requires it)."""
        return self._caller if self._caller is not None else self._store

    def _read_memory_base(self) -> int:
        if self._memory is None:
            return 0
        return ctypes.addressof(self._memory.data_ptr(self._storelike()).contents)

    @property
    def running(self) -> bool:
        """True while some thread is executing inside this guest."""
        return not self._idle

    @property
    def has_memory(self) -> bool:
        """Whether the module exports a linear memory named ``memory``."""
        return self._memory is not None

    def _require_memory(self) -> wasmtime.Memory:
        self._require_open()
        if self._memory is None:
            raise LoanError(
                f"guest '{self.name}' exports no memory named 'memory'; nothing can be lent into it"
            )
        return self._memory

    @property
    def memory_nbytes(self) -> int:
        """Current size of the guest's linear memory in bytes (0 if it has none)."""
        if self._memory is None or self.closed:
            return 0
        return int(self._memory.data_len(self._storelike()))

    @property
    def memory_address(self) -> int:
        """Host address of guest address 0. Stable for the guest's life (memory never moves)."""
        self._require_memory()
        return self._memory_base

    def grow_memory(self, pages: int) -> int:
        """Grow linear memory by ``pages`` 64 KiB pages; return the old size in pages.

        Raises :class:`GuestLimitExceeded` (``limit="memory"``) past the memory limit.
        """
        memory = self._require_memory()
        try:
            old = int(memory.grow(self._storelike(), pages))
        except wasmtime.WasmtimeError as e:
            raise GuestLimitExceeded(
                f"guest '{self.name}': growing memory by {pages} pages exceeds its memory limit "
                f"({self.memory_limit_bytes} bytes) or its declared maximum",
                limit="memory",
                guest=self.name,
                sequence=self.sequence,
            ) from e
        if self._read_memory_base() != self._memory_base:  # pragma: no cover - the engine forbids moves
            raise GuestError(f"guest '{self.name}': linear memory moved; loans are invalid", guest=self.name)
        return old

    def check_host_access(self, address: int, nbytes: int, *, write: bool) -> None:
        """Raise :class:`GuestError` unless the host may read (or write) ``[address, address+nbytes)``
        of this guest's memory on the guest's behalf.

        Bounds are not enough: a range that overlaps a read-only loan (for a write), a
        revoked loan, a loan's unmapped tail or a retired loan window is refused too. Those
        pages are protected, so a host access there would fault in the host process
        instead of trapping the guest. Every host function that takes a guest pointer
        checks it here before touching the memory.
        """
        self._require_memory()
        if address < 0 or nbytes < 0 or address + nbytes > self.memory_nbytes:
            raise GuestError(
                f"guest '{self.name}': {'write' if write else 'read'} of {nbytes} bytes at {address:#x} is outside "
                f"its memory ({self.memory_nbytes} bytes)",
                guest=self.name,
                sequence=self.sequence,
            )
        if nbytes == 0:
            return
        end = address + nbytes
        for loan in self._loans:
            start, mapped, window = loan.ptr, loan.ptr + loan._map_nbytes, loan.ptr + loan._window_nbytes
            if end <= start or address >= window:
                continue
            denied = loan.access == "none" or (write and loan.access != "rw") or end > mapped
            if denied:
                raise GuestError(
                    f"guest '{self.name}': host {'write' if write else 'read'} of {nbytes} bytes at {address:#x} "
                    f"overlaps {loan.describe()}, which the guest may not {'write' if write else 'read'} through the host",
                    guest=self.name,
                    sequence=self.sequence,
                )
        for start, size in self._retired_windows:
            if address < start + size and end > start:
                raise GuestError(
                    f"guest '{self.name}': host access of {nbytes} bytes at {address:#x} overlaps a returned loan's "
                    "window",
                    guest=self.name,
                    sequence=self.sequence,
                )

    def read_memory(self, address: int, nbytes: int) -> bytes:
        """Copy ``nbytes`` of guest memory at ``address`` (checked by :meth:`check_host_access`)."""
        self.check_host_access(address, nbytes, write=False)
        self.bytes_copied += nbytes
        return ctypes.string_at(self._memory_base + address, nbytes)

    def write_memory(self, address: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``address`` (checked by :meth:`check_host_access`)."""
        self.check_host_access(address, len(data), write=True)
        ctypes.memmove(self._memory_base + address, data, len(data))
        self.bytes_copied += len(data)

    # -- calls ---------------------------------------------------------------------

    def func(self, name: str, *, fast: bool = True) -> GuestFunc:
        """Return a callable for the export ``name``, its signature checked once.

        ``fast=True`` calls through wasmtime's unchecked C entry with a preallocated
        argument array (about 2 µs a call); ``fast=False`` goes through
        ``wasmtime.Func.__call__`` (tens of µs). Both give identical results and errors.
        """
        self._require_open()
        key = f"{name}:{int(fast)}"
        existing = self._funcs.get(key)
        if existing is not None:
            return existing
        if name not in {e.name for e in self._module.exports}:
            exported = sorted(e.name for e in self._module.exports if isinstance(e.type, wasmtime.FuncType))
            raise GuestError(
                f"guest '{self.name}' exports no function '{name}' (it exports: {', '.join(exported) or 'none'})",
                guest=self.name,
            )
        export = self._instance.exports(self._store)[name]
        if not isinstance(export, wasmtime.Func):
            raise GuestError(f"guest '{self.name}': export '{name}' is not a function", guest=self.name)
        gf = GuestFunc(self, name, export, fast=fast)
        self._funcs[key] = gf
        return gf

    def call(self, name: str, *args: Any) -> Any:
        """Call the export ``name`` (fast path). Loans and slices pass as ``(ptr, len)``."""
        return self.func(name)(*args)

    def _refresh_slow_path(self) -> None:
        """Recompute whether calls must take the general path (closed, or copy-mode loans).

        A plain attribute, not a property: the fast call path reads it on every call.
        """
        self._slow_path = self._state is not _State.OPEN or bool(self._copy_loans)

    def _raise_busy(self) -> None:
        raise GuestBusy(
            f"guest '{self.name}' is already running on another thread; a guest is single-threaded "
            "(give each thread its own guest)",
            guest=self.name,
            sequence=self.sequence,
        )

    def _enter(self) -> None:
        self._require_open()
        try:
            self._idle.pop()
        except IndexError:
            self._raise_busy()
        for loan in self._copy_loans:
            loan._copy_in()

    def _exit(self) -> None:
        try:
            self._end_borrows()
            for loan in self._copy_loans:
                loan._copy_out()
        finally:
            self._idle.append(True)

    def _end_borrows(self) -> None:
        """At the end of the outermost call, every borrow the guest still holds is released."""
        for handle in list(self._borrowed):
            self._release_borrow(handle)

    def _prime_limits(self) -> None:
        ctx = self._store._context()
        if self._deadline_ticks:
            _set_epoch_deadline(ctx, self._deadline_ticks)
        if self.fuel is not None:
            _set_fuel(ctx, self.fuel)

    def _translate_trap(self, trap: wasmtime.Trap, where: str) -> GuestError:
        """Map a wasmtime trap to the project's exception for this guest."""
        host_error, self._host_error = self._host_error, None
        code = trap.trap_code
        who = f"guest '{self.name}'" + (f" seq {self.sequence}" if self.sequence is not None else "")
        if host_error is not None:
            if isinstance(host_error, GuestError):
                return host_error
            return GuestError(
                f"{who}: host function failed in {where}: {host_error!r}",
                guest=self.name,
                sequence=self.sequence,
            )
        if code == wasmtime.TrapCode.INTERRUPT:
            return GuestLimitExceeded(
                f"{who}: deadline {self.deadline_ms:g} ms exceeded in {where}",
                limit="deadline",
                guest=self.name,
                sequence=self.sequence,
                trap_code=code,
            )
        if code == wasmtime.TrapCode.OUT_OF_FUEL:
            return GuestLimitExceeded(
                f"{who}: fuel limit {self.fuel} exhausted in {where}",
                limit="fuel",
                guest=self.name,
                sequence=self.sequence,
                trap_code=code,
            )
        detail = wasmtime_error_summary(trap)
        if (
            self.memory_limit_bytes is not None
            and self._memory is not None
            and code in (wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS, wasmtime.TrapCode.UNREACHABLE)
            and self.memory_nbytes + WASM_PAGE_SIZE > self.memory_limit_bytes
        ):
            return GuestLimitExceeded(
                f"{who}: memory limit {self.memory_limit_bytes} bytes reached (memory.grow refused) "
                f"and the guest then trapped in {where}: {detail}",
                limit="memory",
                guest=self.name,
                sequence=self.sequence,
                trap_code=code,
            )
        fault = _fault_address(trap)
        if code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS and fault is not None:
            for loan in self._loans:
                if loan.ptr <= fault < loan.ptr + loan.nbytes:
                    what = "access to" if loan.access == "none" else "write to"
                    detail = f"{what} {loan.describe()} at {fault:#x} ({detail})"
                    break
        return GuestTrap(
            f"{who} trapped in {where}: {detail}", guest=self.name, sequence=self.sequence, trap_code=code
        )

    # -- loans -----------------------------------------------------------------------

    def lend(
        self,
        region: Region,
        access: Access = "rw",
        *,
        at: Placement | int = "grow",
        offset: int = 0,
        nbytes: int | None = None,
        dtype: npt.DTypeLike = "uint8",
    ) -> Loan:
        """Map ``region`` (or ``[offset, offset+nbytes)`` of it) into this guest's memory.

        ``at="grow"`` grows the guest's memory and places the loan in the new pages;
        ``at="alloc"`` asks the guest's ``ws_loan_alloc`` export for a block; an int is
        an explicit, page-aligned guest address inside current memory. ``dtype`` is the
        element type when the loan is passed to a guest function as ``(ptr, len)``. See
        :class:`wasmshare.loan.Loan` for the rules and errors.
        """
        from .loan import Loan

        return Loan._create(self, region, access, at=at, offset=offset, nbytes=nbytes, dtype=dtype)

    @property
    def loans(self) -> tuple[Loan, ...]:
        """The loans currently placed in this guest."""
        return tuple(self._loans)

    def offer(self, region: Region, access: Access = "rw", *, handle: int | None = None) -> int:
        """Let the guest borrow ``region`` itself through the ``ws_borrow`` import.

        Returns the handle the guest passes to ``ws_borrow(handle, access)``. A borrow is
        mapped on first use, lasts until ``ws_release(handle)`` or the end of the outermost
        call into the guest, and its pages trap when not borrowed.
        """
        self._require_open()
        if handle is None:
            handle = max(self._offers, default=0) + 1
        if not isinstance(handle, int) or handle < 0 or handle > 0x7FFFFFFF:
            raise LoanError(f"handle must be a non-negative i32, got {handle!r}")
        if handle in self._offers:
            raise LoanError(f"guest '{self.name}': handle {handle} is already offered")
        if access == "rw" and not region.writable:
            raise LoanError(f"cannot offer read-only region {region!r} for read-write borrowing")
        self._offers[handle] = _Offer(region, access)
        return handle

    def withdraw(self, handle: int) -> None:
        """Take back an offered region; its window is released and traps on access."""
        offer = self._offers.pop(handle, None)
        if offer is None:
            raise LoanError(f"guest '{self.name}': no region offered under handle {handle}")
        self._borrowed.discard(handle)
        if offer.loan is not None:
            offer.loan.close()

    def _release_borrow(self, handle: int) -> int:
        offer = self._offers.get(handle)
        if offer is None:
            return WS_ERR_BAD_HANDLE
        if handle not in self._borrowed or offer.loan is None:
            return WS_ERR_NOT_BORROWED
        self._borrowed.discard(handle)
        offer.loan.protect("none")
        return WS_OK


class _Offer:
    __slots__ = ("region", "access", "loan")

    def __init__(self, region: Region, access: Access) -> None:
        self.region = region
        self.access = access
        self.loan: Loan | None = None


MAX_TABLE_ELEMENTS = 1 << 20
"""Elements a guest with a memory limit may have in each table (a C guest's function table
holds a few hundred)."""


def _release_ticker(ticker: _engine.EpochTicker | None) -> None:
    if ticker is not None:
        ticker.release()


def _fault_address(trap: wasmtime.Trap) -> int | None:
    """The guest address of a memory fault, when wasmtime reports one."""
    import re

    match = re.search(r"memory fault at wasm address (0x[0-9a-fA-F]+)", str(trap))
    return int(match.group(1), 16) if match else None


def wasmtime_error_summary(e: BaseException) -> str:
    """The informative part of a wasmtime error or trap: its causes, not the backtrace."""
    import re

    text = str(e).strip()
    if "Caused by:" in text:
        causes = [
            re.sub(r"^\d+:\s*", "", line.strip()).removeprefix("wasm trap: ")
            for line in text.split("Caused by:", 1)[1].splitlines()
            if line.strip()
        ]
        if causes:
            return causes[-1] + (f" ({'; '.join(causes[:-1])})" if len(causes) > 1 else "")
    for line in text.splitlines():
        line = line.strip()
        if line and "backtrace" not in line and not line.startswith("note:"):
            return line.removeprefix("wasm trap: ")
    return type(e).__name__


# -- host functions of the "wasmshare" import module -----------------------------------


def _host_call(
    guest_ref: weakref.ref[Guest], what: str, func: HostFunction, *, pass_guest: bool = False
) -> Callable[..., Any]:
    """Wrap a host function: expose the caller to the guest, keep the first exception."""

    def call(caller: wasmtime.Caller, *args: Any) -> Any:
        guest = guest_ref()
        if guest is None:
            raise wasmtime.Trap("guest is gone")
        previous = guest._caller
        guest._caller = caller
        try:
            return func(guest, *args) if pass_guest else func(*args)
        except BaseException as e:
            if guest._host_error is None:
                guest._host_error = e
            raise wasmtime.Trap(f"host function {what} failed: {e}") from e
        finally:
            guest._caller = previous

    return call


def _ws_borrow(guest: Guest, handle: int, access_code: int) -> int:
    offer = guest._offers.get(handle)
    access = _WS_ACCESS.get(access_code)
    if offer is None or access is None:
        return 0
    if access == "rw" and offer.access != "rw":
        return 0
    try:
        if offer.loan is None or offer.loan.closed:
            offer.loan = guest.lend(offer.region, access)
        else:
            offer.loan.protect(access)
    except LoanError as e:
        log.warning("guest '%s': ws_borrow(%d) failed: %s", guest.name, handle, e)
        return 0
    guest._borrowed.add(handle)
    return int(offer.loan.ptr)


def _ws_release(guest: Guest, handle: int) -> int:
    return guest._release_borrow(handle)


def _ws_region_size(guest: Guest, handle: int) -> int:
    offer = guest._offers.get(handle)
    return WS_ERR_BAD_HANDLE if offer is None else offer.region.nbytes


def _ws_log(guest: Guest, address: int, length: int) -> None:
    try:
        guest.check_host_access(address, min(max(length, 0), 4096), write=False)
    except GuestError:
        log.warning("guest '%s': ws_log with a message the host may not read", guest.name)
        return
    if length < 0:
        return
    text = guest.read_memory(address, min(length, 4096)).decode("utf-8", "replace")
    log.info("guest '%s': %s", guest.name, text)


_WASMSHARE_IMPORTS: dict[str, Callable[..., Any]] = {
    "ws_borrow": _ws_borrow,
    "ws_release": _ws_release,
    "ws_region_size": _ws_region_size,
    "ws_log": _ws_log,
}


# -- fast typed calls ------------------------------------------------------------------

# Private function pointers into the same wasmtime library, without ctypes argtypes:
# argument conversion through argtypes costs ~0.6 µs a call, more than the call itself.
# Every argument we pass is already a ctypes object of the exact C type.
_dll = ctypes.CDLL(wasmtime._ffi.dll._name)
_raw_call_unchecked = _dll["wasmtime_func_call_unchecked"]
_raw_call_unchecked.restype = ctypes.c_void_p
_raw_set_epoch_deadline = _dll["wasmtime_context_set_epoch_deadline"]
_raw_set_epoch_deadline.restype = None
_raw_set_fuel = _dll["wasmtime_context_set_fuel"]
_raw_set_fuel.restype = ctypes.c_void_p

_FAST_CALL_TEMPLATE = """
def fast_call(self, *args):
    if guest._slow_path or len(args) != {nparams}:
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
        if guest._borrowed:
            guest._end_borrows()
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

    def __init__(self, guest: Guest, name: str, func: wasmtime.Func, *, fast: bool) -> None:
        self.guest = guest
        self.name = name
        self.fast = fast
        self._func = func
        ty = func.type(guest._store)
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
        guest = self.guest
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
        if guest._deadline_ticks:
            limits.append("        set_deadline(ctx, deadline)")
        if guest.fuel is not None:
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
            "guest": guest,
            "general": self._call_general,
            "general_locked": self._call_general_locked,
            "take": guest._idle.pop,
            "give_back": guest._idle.append,
            "busy": guest._raise_busy,
            "raw_call": _raw_call_unchecked,
            "ctx": guest._store._context(),
            "func_ref": ctypes.byref(self._func._func),
            "raw": self._raw,
            "nslots": ctypes.c_size_t(nslots),
            "trap_ref": ctypes.byref(self._trap),
            "trap": self._trap,
            "failure": self._raise_failure,
            "set_deadline": _raw_set_epoch_deadline,
            "deadline": ctypes.c_uint64(guest._deadline_ticks),
            "set_fuel": _raw_set_fuel,
            "fuel": ctypes.c_uint64(guest.fuel or 0),
        }
        for i, slot in enumerate(self._slots):
            namespace[f"s{i}"] = slot
        exec(compile(source, f"<wasmshare fast call {guest.name}.{self.name}>", "exec"), namespace)
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
        guest = self.guest
        if self._fast_call is not None and not guest._slow_path:
            expanded = self._expand(args)
            if len(expanded) == self._nparams and len(expanded) != len(args):
                return self._fast_call(self, *expanded)  # loans expanded: back to the fast path
        guest._enter()
        try:
            return self._invoke(self._check_args(args))
        finally:
            guest._exit()

    def _call_general_locked(self, args: tuple[Any, ...]) -> Any:
        # Entered from the fast path with the guest lock held; it releases it.
        return self._invoke(self._check_args(args))

    def _invoke(self, args: tuple[Any, ...]) -> Any:
        guest = self.guest
        if not self.fast:
            return self._call_slow(args)
        slots = self._slots
        for slot, kind, value in zip(slots, self.param_kinds, args):
            setattr(slot, kind, value)
        guest._prime_limits()
        error = _raw_call_unchecked(
            guest._store._context(),
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
        guest = self.guest
        if self._trap:
            address = ctypes.cast(self._trap, ctypes.c_void_p).value
            ctypes.memset(ctypes.addressof(self._trap), 0, ctypes.sizeof(self._trap))
            trap = wasmtime.Trap._from_ptr(
                ctypes.cast(ctypes.c_void_p(address), ctypes.POINTER(_ffi.wasm_trap_t))
            )
            _clear_wasmtime_last_exception()
            raise guest._translate_trap(trap, self.name) from trap
        err = wasmtime.WasmtimeError._from_ptr(
            ctypes.cast(
                ctypes.c_void_p(
                    int(error) if isinstance(error, int) else ctypes.cast(error, ctypes.c_void_p).value
                ),
                ctypes.POINTER(_ffi.wasmtime_error_t),
            )
        )
        _clear_wasmtime_last_exception()
        host_error, guest._host_error = guest._host_error, None
        if isinstance(host_error, GuestError):
            raise host_error  # a host function's verdict on the guest (a deadline, a refused pointer)
        if host_error is not None:
            raise GuestError(
                f"guest '{guest.name}': host function failed in {self.name}: {host_error!r}", guest=guest.name
            ) from host_error
        raise GuestError(
            f"guest '{guest.name}': call to {self.name} failed: {wasmtime_error_summary(err)}",
            guest=guest.name,
        ) from err

    def _call_slow(self, args: tuple[Any, ...]) -> Any:
        guest = self.guest
        guest._prime_limits()
        try:
            result = self._func(guest._store, *args)
        except wasmtime.Trap as trap:
            _clear_wasmtime_last_exception()
            raise guest._translate_trap(trap, self.name) from trap
        except wasmtime.WasmtimeError as err:
            _clear_wasmtime_last_exception()
            host_error, guest._host_error = guest._host_error, None
            if isinstance(host_error, GuestError):
                raise host_error from err
            if host_error is not None:
                raise GuestError(
                    f"guest '{guest.name}': host function failed in {self.name}: {host_error!r}",
                    guest=guest.name,
                ) from host_error
            raise GuestError(
                f"guest '{guest.name}': call to {self.name} failed: {wasmtime_error_summary(err)}",
                guest=guest.name,
            ) from err
        if self._nresults > 1:
            return tuple(result)
        return result


def _clear_wasmtime_last_exception() -> None:
    """Forget the exception wasmtime-py stashed from our host function (we keep our own)."""
    from wasmtime import _func

    _func.LAST_EXCEPTION = None
