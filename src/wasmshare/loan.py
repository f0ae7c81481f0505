"""Loan: a shared region mapped into a guest's linear memory.

A loan places the pages of a :class:`~wasmshare.region.Region` at a page-aligned guest
address with ``mmap(MAP_SHARED | MAP_FIXED)``. The guest then reads and writes the
region through an ordinary pointer, the host through numpy or torch views of the same
physical pages, and other processes through their own mappings: nothing is copied.

Placement keeps to the one rule the engine needs: a loan sits only inside memory the
guest can already reach (``[0, memory_nbytes)``), because wasmtime relies on the pages
past the end being inaccessible for its bounds checks. ``at="grow"`` grows the memory
first and uses the new pages; ``at="alloc"`` uses a block from the guest's
``ws_loan_alloc`` export; an int is an explicit address.

Protection is enforced by the MMU: a read-only loan traps a guest write, a revoked loan
traps any guest access (``GuestTrap`` with ``MEMORY_OUT_OF_BOUNDS``); the host and other
guests carry on. On platforms other than Linux (or with ``WASMSHARE_FORCE_COPY=1``) the
same API copies the region into the guest before each call and back after it, with one
warning; protection is then advisory.
"""

from __future__ import annotations

import ctypes
import enum
import math
import os
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from . import _libc
from ._libc import PAGE_SIZE, round_up
from ._memory import GuestMemory, MemoryOwner, Placement, Protection
from .errors import LoanError, LoanRevoked, RegionError

if TYPE_CHECKING:
    import torch

    from .region import Region

__all__ = ["Loan", "LoanSlice", "LoanState", "Access", "Protection", "Placement", "zero_copy_supported"]

Access = Literal["rw", "ro"]

_PROT = {
    "rw": _libc.PROT_READ | _libc.PROT_WRITE,
    "ro": _libc.PROT_READ,
    "none": _libc.PROT_NONE,
}
_warned_copy = False


def zero_copy_supported() -> bool:
    """True where loans map pages (Linux), False where they fall back to copying."""
    return bool(_libc.IS_LINUX) and os.environ.get("WASMSHARE_FORCE_COPY", "") in ("", "0")


def _warn_copy_once() -> None:
    global _warned_copy
    if not _warned_copy:
        _warned_copy = True
        warnings.warn(
            "wasmshare: zero-copy loans need Linux; this platform copies each loaned region into "
            "the guest before every call and back after it (protection is advisory)",
            RuntimeWarning,
            stacklevel=4,
        )


class LoanState(enum.Enum):
    """Lifecycle of a loan: mapped, revoked (pages trap), or closed (unmapped)."""

    ACTIVE = "active"
    REVOKED = "revoked"
    CLOSED = "closed"


class Loan:
    """A region (or a page-aligned part of it) mapped into one guest's linear memory.

    Create with :meth:`Guest.lend`. ``ptr`` is the guest address, ``nbytes`` the lent
    length. Views from :meth:`array` and :meth:`tensor` alias the same pages as the guest
    and stay valid as long as they are referenced (they view the region's host mapping,
    so they outlive the loan). Use as a context manager to bound a borrow to a block.

    Errors: :class:`LoanError` for a bad placement, overlap, size, alignment or access;
    :class:`LoanRevoked` for using a closed loan.
    """

    guest: MemoryOwner
    """The guest the region is lent into (a :class:`~wasmshare.guest.Guest`)."""
    region: Region
    """The lent region."""
    offset: int
    """Byte offset of the loan inside the region."""
    nbytes: int
    """Lent length in bytes."""
    dtype: np.dtype[Any]
    """Element type used when the loan is passed as ``(ptr, len)``."""
    ptr: int
    """Guest address of the first lent byte (page-aligned, never 0)."""
    _memory: GuestMemory
    _map_nbytes: int
    _window_nbytes: int
    _zero_copy: bool
    _protection: Protection
    _state: LoanState
    _placement: str

    def __init__(self) -> None:  # pragma: no cover - use Guest.lend
        raise TypeError("create loans with Guest.lend(region, access)")

    # -- creation ----------------------------------------------------------------------

    @classmethod
    def _create(
        cls,
        memory: GuestMemory,
        region: Region,
        access: Access,
        *,
        at: Placement | int,
        offset: int,
        nbytes: int | None,
        dtype: npt.DTypeLike,
    ) -> Loan:
        if access not in ("rw", "ro"):
            raise LoanError(f"access must be 'rw' or 'ro', got {access!r}")
        memory.require()
        if region.closed:
            raise LoanError(f"cannot lend closed region {region!r}")
        if access == "rw" and not region.writable:
            raise LoanError(f"cannot lend read-only region {region!r} read-write; lend it with access='ro'")
        if not isinstance(offset, int) or offset < 0 or offset % PAGE_SIZE:
            raise LoanError(
                f"offset must be a non-negative multiple of the page size ({PAGE_SIZE}), got {offset!r}"
            )
        if nbytes is None:
            nbytes = region.nbytes - offset
        if not isinstance(nbytes, int) or nbytes <= 0 or offset + nbytes > region.nbytes:
            raise LoanError(
                f"loan of {nbytes!r} bytes at offset {offset} does not fit in region {region!r} "
                f"({region.nbytes} bytes); a loan cannot outlive or outgrow its region"
            )
        self = cls.__new__(cls)
        self._memory = memory
        self.guest = memory.owner
        self.region = region
        self.offset = offset
        self.nbytes = nbytes
        self.dtype = np.dtype(dtype)
        self._map_nbytes = round_up(nbytes, PAGE_SIZE)
        self._zero_copy = zero_copy_supported()
        self._protection = access
        self._state = LoanState.ACTIVE
        self._placement = at if isinstance(at, str) else "fixed"
        ptr, window = memory.place(at, self._map_nbytes, nbytes, zero_copy=self._zero_copy)
        self.ptr = ptr
        self._window_nbytes = window
        try:
            if self._zero_copy:
                host = memory.base + ptr
                _libc.map_fixed(host, self._map_nbytes, _PROT[access], _libc.MAP_SHARED, region.fd, offset)
            else:
                _warn_copy_once()
                memory.start_copying(self)
            region.attach_loan(self)
        except (OSError, RegionError) as e:
            self._restore_window()
            raise LoanError(f"cannot map {region!r} into guest '{self.guest.name}' at {ptr:#x}: {e}") from e
        memory.add_loan(self, self._guest_closing)
        return self

    # -- properties --------------------------------------------------------------------

    @property
    def state(self) -> LoanState:
        """ACTIVE, REVOKED or CLOSED."""
        return self._state

    @property
    def closed(self) -> bool:
        """True once the loan is released (explicitly, or by its region or guest closing)."""
        return self._state is LoanState.CLOSED

    @property
    def access(self) -> Protection:
        """Current guest access: ``"rw"``, ``"ro"`` or ``"none"`` (revoked)."""
        return self._protection

    @property
    def zero_copy(self) -> bool:
        """True when the guest sees the region's own pages (Linux); False in copy mode."""
        return self._zero_copy

    @property
    def mapped_nbytes(self) -> int:
        """``nbytes`` rounded up to whole host pages: the span mapped into the guest."""
        return self._map_nbytes

    @property
    def window_nbytes(self) -> int:
        """Guest bytes the loan owns from ``ptr`` (the mapping, and the unmapped rest of a
        grown window, which traps)."""
        return self._window_nbytes

    def describe(self) -> str:
        """A short human description used in error messages."""
        kind = {"rw": "read-write", "ro": "read-only", "none": "revoked"}[self._protection]
        return f"{kind} loan [{self.ptr:#x}, {self.ptr + self.nbytes:#x})"

    def __repr__(self) -> str:
        return f"<Loan {self.describe()} of {self.region!r} in guest '{self.guest.name}' {self._state.value}>"

    def _require_open(self) -> None:
        if self._state is LoanState.CLOSED:
            raise LoanRevoked(f"{self.describe()} in guest '{self.guest.name}' is closed")

    # -- views and parameters -------------------------------------------------------------

    def array(
        self, dtype: npt.DTypeLike = np.uint8, shape: int | tuple[int, ...] | None = None, *, offset: int = 0
    ) -> np.ndarray[Any, Any]:
        """A zero-copy numpy view of the lent bytes (the same pages the guest sees).

        ``offset`` is in bytes from the start of the loan. The view aliases the region's
        host mapping and stays valid while referenced, even after the loan closes.
        """
        self._require_open()
        dt = np.dtype(dtype)
        if offset < 0 or offset > self.nbytes:
            raise LoanError(f"offset {offset} is outside the loan ({self.nbytes} bytes)")
        if shape is None:
            shape = (self.nbytes - offset) // dt.itemsize
        count = shape if isinstance(shape, int) else math.prod(shape)
        if offset + count * dt.itemsize > self.nbytes:
            raise LoanError(
                f"a view of {shape} {dt} at offset {offset} exceeds the loan ({self.nbytes} bytes)"
            )
        view: np.ndarray[Any, Any] = self.region.array(dt, shape, offset=self.offset + offset)
        return view

    def tensor(self, dtype: Any = "float32", shape: Any = None, *, offset: int = 0) -> torch.Tensor:
        """A zero-copy torch view of the lent bytes (needs torch); valid while referenced."""
        self._require_open()
        tensor: torch.Tensor = self.region.tensor(dtype, shape, offset=self.offset + offset)
        return tensor

    def slice(
        self, dtype: npt.DTypeLike | None = None, start: int = 0, count: int | None = None
    ) -> LoanSlice:
        """A typed sub-range to pass to a guest function as ``(ptr, len)``; units are elements."""
        return LoanSlice(self, np.dtype(dtype) if dtype is not None else self.dtype, start, count)

    def as_param(self) -> tuple[int, int]:
        """``(guest pointer, element count)`` for a ``borrow<list<T>>`` parameter."""
        self._require_open()
        return self.ptr, self.nbytes // self.dtype.itemsize

    # -- protection and lifetime ------------------------------------------------------------

    def protect(self, access: Protection) -> None:
        """Change the guest's access: ``"rw"``, ``"ro"``, or ``"none"`` (guest access traps).

        Costs one ``mprotect`` system call. A read-write upgrade needs a
        writable region. The host's own views are unaffected.
        """
        self._require_open()
        if access not in _PROT:
            raise LoanError(f"access must be 'rw', 'ro' or 'none', got {access!r}")
        if access == "rw" and not self.region.writable:
            raise LoanError(f"{self.region!r} is read-only; its loans cannot become read-write")
        if access == self._protection:
            return
        if self._zero_copy:
            try:
                _libc.protect(self._memory.base + self.ptr, self._map_nbytes, _PROT[access])
            except OSError as e:
                raise LoanError(f"cannot change {self.describe()} to {access}: {e}") from e
        elif access == "none":
            ctypes.memset(self._memory.base + self.ptr, 0, self._map_nbytes)
        self._protection = access
        self._state = LoanState.REVOKED if access == "none" else LoanState.ACTIVE

    def revoke(self) -> None:
        """Make every guest access to the loan trap; :meth:`protect` can restore it."""
        self.protect("none")

    def close(self) -> None:
        """End the loan: unmap the region from the guest. Safe to call twice.

        A window grown for the loan stays inaccessible (a stale guest pointer traps) and
        is reused by the next loan; a block from ``ws_loan_alloc`` or an explicit address
        gets fresh zero pages back (and ``ws_loan_free`` is called).
        """
        if self._state is LoanState.CLOSED:
            return
        memory = self._memory
        memory.stop_copying(self)
        self._state = LoanState.CLOSED
        if not self.guest.closed:
            self._restore_window()
            if self._placement == "alloc":
                memory.free_block(self.ptr)
        memory.remove_loan(self)
        self.region.detach_loan(self)

    def _restore_window(self) -> None:
        self._memory.restore_window(self.ptr, self._window_nbytes, self._placement, zero_copy=self._zero_copy)

    def __enter__(self) -> Loan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_region_closed(self) -> None:
        """The region is closing: revoke and release so the guest can no longer reach it."""
        self.close()

    def _guest_closing(self) -> None:
        """The guest's store is going away with its memory; just detach."""
        if self._state is LoanState.CLOSED:
            return
        self._state = LoanState.CLOSED
        self.region.detach_loan(self)


class LoanSlice:
    """A typed sub-range of a loan, passed to guest functions as ``(ptr, count)``."""

    def __init__(self, loan: Loan, dtype: np.dtype[Any], start: int = 0, count: int | None = None) -> None:
        total = loan.nbytes // dtype.itemsize
        if count is None:
            count = total - start
        if start < 0 or count < 0 or start + count > total:
            raise LoanError(
                f"slice [{start}, {start + count}) of {dtype} is outside {loan.describe()} ({total} elements)"
            )
        if loan.ptr % dtype.itemsize:
            raise LoanError(f"{loan.describe()} is not aligned for {dtype}")
        self.loan = loan
        self.dtype = dtype
        self.start = start
        self.count = count

    def as_param(self) -> tuple[int, int]:
        """``(guest pointer, element count)``."""
        self.loan._require_open()
        return self.loan.ptr + self.start * self.dtype.itemsize, self.count

    def array(self) -> np.ndarray[Any, Any]:
        """The zero-copy numpy view of this slice."""
        return self.loan.array(self.dtype, self.count, offset=self.start * self.dtype.itemsize)


def lend_into(
    memory: GuestMemory,
    region: Region,
    access: Access,
    *,
    at: Placement | int = "grow",
    offset: int = 0,
    nbytes: int | None = None,
    dtype: npt.DTypeLike = np.uint8,
) -> Loan:
    """Place a loan of ``region`` in the guest memory ``memory`` keeps: what :meth:`Guest.lend` runs.

    See :class:`Loan` for the rules and the errors.
    """
    return Loan._create(memory, region, access, at=at, offset=offset, nbytes=nbytes, dtype=dtype)
