"""Exceptions raised by wasmshare.

Every error the library raises on purpose derives from :class:`WasmshareError`::

    WasmshareError
    ├── RegionError            a shared-memory region could not be created, opened or used
    ├── BuildError             a guest source file could not be compiled
    ├── LoanError              a region could not be lent into a guest (placement, access, overlap)
    │   └── LoanRevoked        the loan was revoked or its region closed
    └── GuestError             a guest module failed (carries .guest and .sequence)
        ├── GuestBusy          the guest is already running on another thread
        ├── AbiMismatch        the guest was built for another wasmshare ABI version
        ├── GuestTrap          the guest trapped (carries .trap_code)
        └── GuestLimitExceeded the guest hit a limit: fuel, memory or deadline (carries .limit)

wasmtime's own errors are chained as ``__cause__``.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "WasmshareError",
    "RegionError",
    "BuildError",
    "LoanError",
    "LoanRevoked",
    "GuestError",
    "GuestBusy",
    "AbiMismatch",
    "GuestTrap",
    "GuestLimitExceeded",
    "LimitKind",
]

LimitKind = Literal["fuel", "memory", "deadline"]


class WasmshareError(Exception):
    """Base class of every error wasmshare raises on purpose."""


class RegionError(WasmshareError):
    """A shared-memory region could not be created, opened, mapped or used."""


class BuildError(WasmshareError):
    """A guest could not be compiled: missing toolchain or a compiler error (in the message)."""


class LoanError(WasmshareError):
    """A region could not be lent into a guest, or a loan was used wrongly."""


class LoanRevoked(LoanError):
    """The loan was revoked, released, or its region was closed."""


class GuestError(WasmshareError):
    """A guest module could not be loaded, instantiated or called.

    ``guest`` is the guest's name; ``sequence`` is the caller-assigned sequence id
    (for LLM controllers), or ``None``.
    """

    def __init__(self, message: str, *, guest: str | None = None, sequence: int | None = None) -> None:
        super().__init__(message)
        self.guest = guest
        self.sequence = sequence


class GuestBusy(GuestError):
    """The guest is already executing on another thread; a guest is single-threaded."""


class AbiMismatch(GuestError):
    """The guest reports a wasmshare ABI version this host does not speak."""


class GuestTrap(GuestError):
    """The guest trapped: out-of-bounds access, unreachable, a revoked loan, ...

    ``trap_code`` is the :class:`wasmtime.TrapCode` member, or ``None`` when wasmtime
    gave none (for example a trap raised by a host function).
    """

    def __init__(
        self,
        message: str,
        *,
        guest: str | None = None,
        sequence: int | None = None,
        trap_code: object | None = None,
    ) -> None:
        super().__init__(message, guest=guest, sequence=sequence)
        self.trap_code = trap_code


class GuestLimitExceeded(GuestTrap):
    """The guest ran past a limit set by the host: ``limit`` is fuel, memory or deadline."""

    def __init__(
        self,
        message: str,
        *,
        limit: LimitKind,
        guest: str | None = None,
        sequence: int | None = None,
        trap_code: object | None = None,
    ) -> None:
        super().__init__(message, guest=guest, sequence=sequence, trap_code=trap_code)
        self.limit: LimitKind = limit
