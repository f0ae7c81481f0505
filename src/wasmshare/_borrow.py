"""The ``wasmshare`` host imports a guest calls to borrow offered regions itself.

:meth:`Guest.offer` puts a region under a handle; the guest's ``ws_borrow(handle,
access)`` maps it (a loan placed on first use, re-protected afterwards) and returns its
address, ``ws_release(handle)`` makes its pages trap again, and every borrow still held
ends with the outermost call into the guest. ``ws_log`` lets a guest write to the
host's log. Status codes are those of :mod:`wasmshare._abi`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._abi import ACCESS_RO, ACCESS_RW, ERR_BAD_HANDLE, ERR_NOT_BORROWED, OK
from ._memory import GuestMemory
from .errors import GuestError, LoanError
from .loan import Access, Loan, lend_into

if TYPE_CHECKING:
    from .region import Region

log = logging.getLogger("wasmshare.guest")

_WS_ACCESS: dict[int, Access] = {ACCESS_RO: "ro", ACCESS_RW: "rw"}
_LOG_MAX_BYTES = 4096


class Offer:
    """A region offered to the guest under one handle, and its loan once borrowed."""

    __slots__ = ("region", "access", "loan")

    def __init__(self, region: Region, access: Access) -> None:
        self.region = region
        self.access = access
        self.loan: Loan | None = None


class Borrows:
    """One guest's offered regions and the handles it holds borrowed now.

    ``borrowed`` is the set the fast call path reads after each call: non-empty means
    borrows must end.
    """

    def __init__(self, memory: GuestMemory) -> None:
        self._memory = memory
        self.offers: dict[int, Offer] = {}
        self.borrowed: set[int] = set()

    def host_functions(self) -> dict[str, Callable[..., Any]]:
        """The ``wasmshare`` imports by name."""
        return {
            "ws_borrow": self.borrow,
            "ws_release": self.release,
            "ws_region_size": self.region_size,
            "ws_log": self.log,
        }

    def offer(self, region: Region, access: Access, handle: int | None) -> int:
        """Offer ``region`` under ``handle`` (the next free one if None); LoanError if taken or bad."""
        name = self._memory.owner.name
        if handle is None:
            handle = max(self.offers, default=0) + 1
        if not isinstance(handle, int) or handle < 0 or handle > 0x7FFFFFFF:
            raise LoanError(f"handle must be a non-negative i32, got {handle!r}")
        if handle in self.offers:
            raise LoanError(f"guest '{name}': handle {handle} is already offered")
        if access == "rw" and not region.writable:
            raise LoanError(f"cannot offer read-only region {region!r} for read-write borrowing")
        self.offers[handle] = Offer(region, access)
        return handle

    def withdraw(self, handle: int) -> None:
        """Take back an offered region; its window is released and traps on access."""
        offer = self.offers.pop(handle, None)
        if offer is None:
            raise LoanError(f"guest '{self._memory.owner.name}': no region offered under handle {handle}")
        self.borrowed.discard(handle)
        if offer.loan is not None:
            offer.loan.close()

    def clear(self) -> None:
        """Forget every offer (the guest is closing; its loans are detached already)."""
        self.offers.clear()

    def end_all(self) -> None:
        """At the end of the outermost call, every borrow the guest still holds is released."""
        for handle in list(self.borrowed):
            self.release(handle)

    # -- the host imports -------------------------------------------------------------

    def borrow(self, handle: int, access_code: int) -> int:
        """``ws_borrow``: the guest address of the borrowed region, or 0 if refused."""
        offer = self.offers.get(handle)
        access = _WS_ACCESS.get(access_code)
        if offer is None or access is None:
            return 0
        if access == "rw" and offer.access != "rw":
            return 0
        try:
            if offer.loan is None or offer.loan.closed:
                offer.loan = lend_into(self._memory, offer.region, access)
            else:
                offer.loan.protect(access)
        except LoanError as e:
            log.warning("guest '%s': ws_borrow(%d) failed: %s", self._memory.owner.name, handle, e)
            return 0
        self.borrowed.add(handle)
        return int(offer.loan.ptr)

    def release(self, handle: int) -> int:
        """``ws_release``: make a borrowed region's pages trap again."""
        offer = self.offers.get(handle)
        if offer is None:
            return ERR_BAD_HANDLE
        if handle not in self.borrowed or offer.loan is None:
            return ERR_NOT_BORROWED
        self.borrowed.discard(handle)
        offer.loan.protect("none")
        return OK

    def region_size(self, handle: int) -> int:
        """``ws_region_size``: the offered region's size in bytes."""
        offer = self.offers.get(handle)
        return ERR_BAD_HANDLE if offer is None else offer.region.nbytes

    def log(self, address: int, length: int) -> None:
        """``ws_log``: log up to 4 KiB of UTF-8 text from guest memory at INFO."""
        name = self._memory.owner.name
        try:
            self._memory.check_host_access(address, min(max(length, 0), _LOG_MAX_BYTES), write=False)
        except GuestError:
            log.warning("guest '%s': ws_log with a message the host may not read", name)
            return
        if length < 0:
            return
        text = self._memory.read(address, min(length, _LOG_MAX_BYTES)).decode("utf-8", "replace")
        log.info("guest '%s': %s", name, text)
