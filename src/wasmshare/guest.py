"""Guest: one WebAssembly instance whose linear memory never moves.

A :class:`Guest` owns a wasmtime Store and Instance. Its engine keeps linear memory at
a fixed address (``memory_may_move = False``), which is what lets :mod:`wasmshare.loan`
map shared regions into it. A guest is single-threaded: a call from a second thread
while one is running raises :class:`GuestBusy` instead of corrupting the store. Different
guests run in parallel on different threads (wasm calls release the GIL).

The guest composes private parts: :mod:`wasmshare._module` loads and links the module,
:mod:`wasmshare._memory` keeps the loans' bookkeeping, :mod:`wasmshare._borrow` serves
the ``wasmshare`` imports, and :mod:`wasmshare._fastcall` makes the calls.
"""

from __future__ import annotations

import ctypes
import enum
import os
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import wasmtime

from . import _engine
from ._abi import ABI_VERSION
from ._borrow import Borrows
from ._fastcall import CallGate, CallHooks, GuestFunc, wrap_host_function
from ._libc import WASM_PAGE_SIZE
from ._memory import GuestMemory, Placement
from ._module import (
    HostFunction,
    ModuleSource,
    compiled_artifact,
    fault_address,
    load_wasm_bytes,
    make_linker,
    wasmtime_error_summary,
)
from .errors import AbiMismatch, GuestBusy, GuestError, GuestLimitExceeded, GuestTrap
from .loan import Access, Loan, lend_into

if TYPE_CHECKING:
    import numpy.typing as npt

    from .region import Region

__all__ = ["Guest", "GuestFunc", "ABI_VERSION", "ModuleSource", "load_wasm_bytes", "wasmtime_error_summary"]

MAX_TABLE_ELEMENTS = 1 << 20
"""Elements a guest with a memory limit may have in each table (a C guest's function table
holds a few hundred)."""


class _State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


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
        artifact = compiled_artifact(module)
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

        self._book = GuestMemory(self, self._refresh_slow_path)
        self._borrows = Borrows(self._book)
        self._funcs: dict[str, GuestFunc] = {}
        self._deadline_ticks = (
            _engine.deadline_ticks(deadline_ms, self._options.tick_ms) if deadline_ms is not None else 0
        )

        store = wasmtime.Store(self._engine)
        self._store = store
        self._gate = CallGate(
            store, deadline_ticks=self._deadline_ticks, fuel=fuel, borrowed=self._borrows.borrowed
        )
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

        gate = self._gate
        linker = make_linker(
            self._engine,
            store,
            self._module,
            self.name,
            imports=imports or {},
            builtins=self._borrows.host_functions(),
            wasi=wasi,
            wrap=lambda what, func: wrap_host_function(gate, what, func),
        )
        self._state = _State.OPEN
        self._refresh_slow_path()
        try:
            self._gate.prime_limits()
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
        self._book.base = self._read_memory_base()
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
        error = self._gate.take_host_error()
        if error is not None:
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
        self._book.detach_all()
        self._borrows.clear()
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
        state = (
            "closed"
            if self.closed
            else f"{self.memory_nbytes} bytes of memory, {len(self._book.loans)} loans"
        )
        return f"<Guest '{self.name}' {state}>"

    # -- store access --------------------------------------------------------------

    def _read_memory_base(self) -> int:
        if self._memory is None:
            return 0
        return ctypes.addressof(self._memory.data_ptr(self._gate.storelike()).contents)

    @property
    def running(self) -> bool:
        """True while some thread is executing inside this guest."""
        return not self._gate.idle

    @property
    def has_memory(self) -> bool:
        """Whether the module exports a linear memory named ``memory``."""
        return self._memory is not None

    def _require_memory(self) -> wasmtime.Memory:
        self._book.require()
        if self._memory is None:  # pragma: no cover - require() raised already
            raise GuestError(f"guest '{self.name}' exports no memory", guest=self.name)
        return self._memory

    @property
    def memory_nbytes(self) -> int:
        """Current size of the guest's linear memory in bytes (0 if it has none)."""
        if self._memory is None or self.closed:
            return 0
        return int(self._memory.data_len(self._gate.storelike()))

    @property
    def memory_address(self) -> int:
        """Host address of guest address 0. Stable for the guest's life (memory never moves)."""
        self._require_memory()
        return self._book.base

    @property
    def bytes_copied(self) -> int:
        """Bytes the host copied into or out of this guest's memory (copy paths only)."""
        return self._book.bytes_copied

    @bytes_copied.setter
    def bytes_copied(self, value: int) -> None:
        self._book.bytes_copied = value

    def grow_memory(self, pages: int) -> int:
        """Grow linear memory by ``pages`` 64 KiB pages; return the old size in pages.

        Raises :class:`GuestLimitExceeded` (``limit="memory"``) past the memory limit.
        """
        memory = self._require_memory()
        try:
            old = int(memory.grow(self._gate.storelike(), pages))
        except wasmtime.WasmtimeError as e:
            raise GuestLimitExceeded(
                f"guest '{self.name}': growing memory by {pages} pages exceeds its memory limit "
                f"({self.memory_limit_bytes} bytes) or its declared maximum",
                limit="memory",
                guest=self.name,
                sequence=self.sequence,
            ) from e
        if self._read_memory_base() != self._book.base:  # pragma: no cover - the engine forbids moves
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
        self._book.check_host_access(address, nbytes, write=write)

    def read_memory(self, address: int, nbytes: int) -> bytes:
        """Copy ``nbytes`` of guest memory at ``address`` (checked by :meth:`check_host_access`)."""
        return self._book.read(address, nbytes)

    def write_memory(self, address: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``address`` (checked by :meth:`check_host_access`)."""
        self._book.write(address, data)

    # -- calls ---------------------------------------------------------------------

    def func(self, name: str, *, fast: bool = True) -> GuestFunc:
        """Return a callable for the export ``name``, its signature checked once.

        ``fast=True`` calls through wasmtime's unchecked C entry with a preallocated
        argument array; ``fast=False`` goes through ``wasmtime.Func.__call__``, several
        times slower. Both give identical results and errors.
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
        hooks = CallHooks(
            self._enter, self._exit, self._borrows.end_all, self._raise_busy, self._translate_trap
        )
        gf = GuestFunc(self, name, export, fast=fast, gate=self._gate, hooks=hooks)
        self._funcs[key] = gf
        return gf

    def call(self, name: str, *args: Any) -> Any:
        """Call the export ``name`` (fast path). Loans and slices pass as ``(ptr, len)``."""
        return self.func(name)(*args)

    def _refresh_slow_path(self) -> None:
        """Recompute whether calls must take the general path (closed, or copy-mode loans)."""
        self._gate.slow_path = self._state is not _State.OPEN or self._book.copying

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
            self._gate.idle.pop()
        except IndexError:
            self._raise_busy()
        self._book.copy_in_all()

    def _exit(self) -> None:
        try:
            self._borrows.end_all()
            self._book.copy_out_all()
        finally:
            self._gate.idle.append(True)

    def _translate_trap(self, trap: wasmtime.Trap, where: str) -> GuestError:
        """Map a wasmtime trap to the project's exception for this guest."""
        host_error = self._gate.take_host_error()
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
        fault = fault_address(trap)
        loan = (
            self._book.loan_at(fault)
            if code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS and fault is not None
            else None
        )
        if loan is not None:
            what = "access to" if loan.access == "none" else "write to"
            detail = f"{what} {loan.describe()} at {fault:#x} ({detail})"
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
        return lend_into(self._book, region, access, at=at, offset=offset, nbytes=nbytes, dtype=dtype)

    @property
    def loans(self) -> tuple[Loan, ...]:
        """The loans currently placed in this guest."""
        return tuple(loan for loan in self._book.loans if isinstance(loan, Loan))

    def offer(self, region: Region, access: Access = "rw", *, handle: int | None = None) -> int:
        """Let the guest borrow ``region`` itself through the ``ws_borrow`` import.

        Returns the handle the guest passes to ``ws_borrow(handle, access)``. A borrow is
        mapped on first use, lasts until ``ws_release(handle)`` or the end of the outermost
        call into the guest, and its pages trap when not borrowed.
        """
        self._require_open()
        return self._borrows.offer(region, access, handle)

    def withdraw(self, handle: int) -> None:
        """Take back an offered region; its window is released and traps on access."""
        self._borrows.withdraw(handle)


def _release_ticker(ticker: _engine.EpochTicker | None) -> None:
    if ticker is not None:
        ticker.release()
