"""One guest's linear-memory bookkeeping: its loans, their windows, placement and copy mode.

A :class:`GuestMemory` belongs to one :class:`~wasmshare.guest.Guest`; loans talk to it
instead of to the guest. It knows where guest address 0 sits in the host
(``base``), which loans are placed where, which windows of returned loans may be reused,
and which loans copy (where pages cannot be shared). It holds its guest weakly, so the
guest's lifetime is the guest's own. Single-threaded like its guest.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import _libc
from ._libc import PAGE_SIZE, WASM_PAGE_SIZE, round_up
from .errors import GuestError, GuestLimitExceeded, LoanError

if TYPE_CHECKING:
    import wasmtime

    from .region import Region

Protection = Literal["rw", "ro", "none"]
"""A loan's guest access: read-write, read-only, or none (revoked)."""
Placement = Literal["grow", "alloc"]
"""Where a loan goes: in newly grown memory, or in a block from ``ws_loan_alloc``."""


class MemoryOwner(Protocol):
    """What the bookkeeping needs of its guest (a :class:`~wasmshare.guest.Guest`)."""

    name: str
    sequence: int | None

    @property
    def closed(self) -> bool: ...

    @property
    def has_memory(self) -> bool: ...

    @property
    def memory_nbytes(self) -> int: ...

    @property
    def module(self) -> wasmtime.Module: ...

    def grow_memory(self, pages: int) -> int: ...

    def call(self, name: str, *args: Any) -> Any: ...


class PlacedLoan(Protocol):
    """What the bookkeeping reads of a loan (a :class:`~wasmshare.loan.Loan`)."""

    region: Region
    offset: int
    nbytes: int
    ptr: int

    @property
    def access(self) -> Protection: ...

    @property
    def mapped_nbytes(self) -> int: ...

    @property
    def window_nbytes(self) -> int: ...

    def describe(self) -> str: ...


class GuestMemory:
    """The loans placed in one guest's linear memory, their windows and copy mode.

    ``base`` is the host address of guest address 0 (0 until the guest has a memory);
    it never changes, because every engine keeps linear memory in place.
    ``on_copy_mode_change`` is called whenever a loan starts or stops copying (the guest
    then switches its calls to or from the path that copies); it is held weakly.
    """

    def __init__(self, owner: MemoryOwner, on_copy_mode_change: Callable[[], None]) -> None:
        self._owner = weakref.ref(owner)
        self._listener = weakref.WeakMethod(on_copy_mode_change)
        self.base = 0
        self.bytes_copied = 0
        """Bytes the host copied into or out of this memory (copy paths only)."""
        self._loans: list[PlacedLoan] = []
        self._on_guest_closed: dict[int, Callable[[], None]] = {}
        self._retired_windows: list[tuple[int, int]] = []  # (guest address, nbytes) free for reuse
        self._copy_loans: list[PlacedLoan] = []

    @property
    def owner(self) -> MemoryOwner:
        """The guest; GuestError once it is gone."""
        owner = self._owner()
        if owner is None:
            raise GuestError("the guest of this memory is gone")
        return owner

    # -- the loan registry ----------------------------------------------------------

    @property
    def loans(self) -> tuple[PlacedLoan, ...]:
        """The loans currently placed, oldest first."""
        return tuple(self._loans)

    def require(self) -> None:
        """Raise unless loans can be placed: GuestError when closed, LoanError without a memory."""
        owner = self.owner
        if owner.closed:
            raise GuestError(f"guest '{owner.name}' is closed", guest=owner.name, sequence=owner.sequence)
        if not owner.has_memory:
            raise LoanError(
                f"guest '{owner.name}' exports no memory named 'memory'; nothing can be lent into it"
            )

    def add_loan(self, loan: PlacedLoan, on_guest_closed: Callable[[], None]) -> None:
        """Register a placed loan; ``on_guest_closed`` runs if the guest closes first."""
        self._loans.append(loan)
        self._on_guest_closed[id(loan)] = on_guest_closed

    def remove_loan(self, loan: PlacedLoan) -> None:
        """Forget a loan (safe if it is not registered)."""
        if loan in self._loans:
            self._loans.remove(loan)
        self._on_guest_closed.pop(id(loan), None)

    def detach_all(self) -> None:
        """The guest is closing with its memory: tell every loan, forget them all."""
        for loan in list(self._loans):
            self._on_guest_closed.pop(id(loan), lambda: None)()
        self._loans.clear()
        self._on_guest_closed.clear()

    def loan_at(self, address: int) -> PlacedLoan | None:
        """The loan whose lent bytes contain guest ``address``, if any."""
        for loan in self._loans:
            if loan.ptr <= address < loan.ptr + loan.nbytes:
                return loan
        return None

    # -- placement ------------------------------------------------------------------

    def place(self, at: Placement | int, map_nbytes: int, nbytes: int, *, zero_copy: bool) -> tuple[int, int]:
        """Choose the guest address of a new loan; return ``(ptr, window bytes it owns)``.

        ``"grow"`` reuses a retired window that fits, else grows the memory (never placing
        at address 0, which means "failed" in the ABI); ``"alloc"`` asks the guest's
        ``ws_loan_alloc``; an int is checked as an explicit address. Raises LoanError.
        """
        owner = self.owner
        if isinstance(at, bool) or not (isinstance(at, int) or at in ("grow", "alloc")):
            raise LoanError(f"at must be 'grow', 'alloc' or a guest address, got {at!r}")
        if at == "grow":
            window = round_up(map_nbytes, WASM_PAGE_SIZE)
            for i, (start, size) in enumerate(self._retired_windows):
                if size >= window:
                    del self._retired_windows[i]
                    if zero_copy:
                        _libc.map_anonymous_fixed(self.base + start, size, _libc.PROT_READ | _libc.PROT_WRITE)
                    return start, size
            pages = window // WASM_PAGE_SIZE
            if owner.memory_nbytes == 0:
                pages += 1  # never place a loan at guest address 0 (0 means "failed" in the ABI)
            try:
                old_pages = owner.grow_memory(pages)
            except GuestLimitExceeded as e:
                raise LoanError(f"guest '{owner.name}': no room for a {nbytes}-byte loan: {e}") from e
            start = old_pages * WASM_PAGE_SIZE
            if start == 0:
                start = WASM_PAGE_SIZE
                window = (pages - 1) * WASM_PAGE_SIZE
            return start, window
        if at == "alloc":
            if "ws_loan_alloc" not in {e.name for e in owner.module.exports}:
                raise LoanError(f"guest '{owner.name}' does not export ws_loan_alloc; use at='grow'")
            ptr = int(owner.call("ws_loan_alloc", map_nbytes))
            if ptr == 0:
                raise LoanError(f"guest '{owner.name}': ws_loan_alloc({map_nbytes}) refused the loan")
            ptr &= 0xFFFFFFFF
            self.check_fixed(ptr, map_nbytes)
            return ptr, map_nbytes
        self.check_fixed(at, map_nbytes)
        return at, map_nbytes

    def check_fixed(self, ptr: int, map_nbytes: int) -> None:
        """LoanError unless ``[ptr, ptr+map_nbytes)`` is page-aligned, reachable and free."""
        owner = self.owner
        if ptr <= 0 or ptr % PAGE_SIZE:
            raise LoanError(
                f"guest address {ptr:#x} is not a positive multiple of the page size ({PAGE_SIZE})"
            )
        end = ptr + map_nbytes
        if end > owner.memory_nbytes:
            raise LoanError(
                f"loan [{ptr:#x}, {end:#x}) lies outside guest '{owner.name}''s reachable memory "
                f"[0, {owner.memory_nbytes:#x}); grow the memory first or use at='grow'"
            )
        for other in self._loans:
            if ptr < other.ptr + other.window_nbytes and other.ptr < end:
                raise LoanError(
                    f"loan [{ptr:#x}, {end:#x}) overlaps {other.describe()} in guest '{owner.name}'"
                )

    def restore_window(self, ptr: int, window_nbytes: int, placement: str, *, zero_copy: bool) -> None:
        """Give a loan's window back: a grown window becomes inaccessible and reusable,
        any other gets fresh zero pages."""
        if placement == "grow":
            if zero_copy:
                _libc.map_anonymous_fixed(self.base + ptr, window_nbytes, _libc.PROT_NONE)
            self._retired_windows.append((ptr, window_nbytes))
        elif zero_copy:
            _libc.map_anonymous_fixed(self.base + ptr, window_nbytes, _libc.PROT_READ | _libc.PROT_WRITE)

    def free_block(self, ptr: int) -> None:
        """Return a ``ws_loan_alloc`` block through the guest's ``ws_loan_free``, if it has one."""
        owner = self.owner
        if "ws_loan_free" in {e.name for e in owner.module.exports}:
            try:
                owner.call("ws_loan_free", ptr)
            except Exception:  # noqa: BLE001 - a faulty guest free must not leak the loan
                pass

    # -- copy mode ------------------------------------------------------------------

    @property
    def copying(self) -> bool:
        """True while some loan copies instead of sharing pages."""
        return bool(self._copy_loans)

    def start_copying(self, loan: PlacedLoan) -> None:
        """Copy ``loan`` into the guest now and around every call from now on."""
        self._copy_loans.append(loan)
        self._notify()
        self.copy_in(loan)

    def stop_copying(self, loan: PlacedLoan) -> None:
        """Copy ``loan`` out one last time and stop copying it (nothing if it does not copy)."""
        if loan in self._copy_loans:
            self.copy_out(loan)
            self._copy_loans.remove(loan)
            self._notify()

    def copy_in_all(self) -> None:
        """Before a call: copy every copying loan's region into the guest."""
        for loan in self._copy_loans:
            self.copy_in(loan)

    def copy_out_all(self) -> None:
        """After a call: copy every copying read-write loan back into its region."""
        for loan in self._copy_loans:
            self.copy_out(loan)

    def copy_in(self, loan: PlacedLoan) -> None:
        """Copy the loan's bytes from its region into the guest (unless revoked)."""
        if loan.access == "none":
            return
        ctypes.memmove(self.base + loan.ptr, loan.region.address + loan.offset, loan.nbytes)
        self.bytes_copied += loan.nbytes

    def copy_out(self, loan: PlacedLoan) -> None:
        """Copy the loan's bytes from the guest back into its region (read-write loans only)."""
        if loan.access != "rw":
            return
        ctypes.memmove(loan.region.address + loan.offset, self.base + loan.ptr, loan.nbytes)
        self.bytes_copied += loan.nbytes

    def _notify(self) -> None:
        listener = self._listener()
        if listener is not None:
            listener()

    # -- host access ----------------------------------------------------------------

    def check_host_access(self, address: int, nbytes: int, *, write: bool) -> None:
        """GuestError unless the host may read (or write) ``[address, address+nbytes)``.

        Bounds are not enough: a range that overlaps a read-only loan (for a write), a
        revoked loan, a loan's unmapped tail or a retired loan window is refused too. Those
        pages are protected, so a host access there would fault in the host process
        instead of trapping the guest.
        """
        self.require()
        owner = self.owner
        size = owner.memory_nbytes
        if address < 0 or nbytes < 0 or address + nbytes > size:
            raise GuestError(
                f"guest '{owner.name}': {'write' if write else 'read'} of {nbytes} bytes at {address:#x} is outside "
                f"its memory ({size} bytes)",
                guest=owner.name,
                sequence=owner.sequence,
            )
        if nbytes == 0:
            return
        end = address + nbytes
        for loan in self._loans:
            start, mapped, window = loan.ptr, loan.ptr + loan.mapped_nbytes, loan.ptr + loan.window_nbytes
            if end <= start or address >= window:
                continue
            denied = loan.access == "none" or (write and loan.access != "rw") or end > mapped
            if denied:
                raise GuestError(
                    f"guest '{owner.name}': host {'write' if write else 'read'} of {nbytes} bytes at {address:#x} "
                    f"overlaps {loan.describe()}, which the guest may not {'write' if write else 'read'} through the host",
                    guest=owner.name,
                    sequence=owner.sequence,
                )
        for start, size in self._retired_windows:
            if address < start + size and end > start:
                raise GuestError(
                    f"guest '{owner.name}': host access of {nbytes} bytes at {address:#x} overlaps a returned loan's "
                    "window",
                    guest=owner.name,
                    sequence=owner.sequence,
                )

    def read(self, address: int, nbytes: int) -> bytes:
        """Copy ``nbytes`` of guest memory at ``address`` (checked by :meth:`check_host_access`)."""
        self.check_host_access(address, nbytes, write=False)
        self.bytes_copied += nbytes
        return ctypes.string_at(self.base + address, nbytes)

    def write(self, address: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``address`` (checked by :meth:`check_host_access`)."""
        self.check_host_access(address, len(data), write=True)
        ctypes.memmove(self.base + address, data, len(data))
        self.bytes_copied += len(data)
