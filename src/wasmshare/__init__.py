"""wasmshare: zero-copy shared memory between a Python host and its WebAssembly guests.

The core, bottom up: a :class:`Region` is fd-backed shared memory; a :class:`Guest` is a
wasm instance whose linear memory never moves; a :class:`Loan` maps a region into a
guest's memory so the guest, numpy/torch and other processes see the same pages.
"""

from ._abi import ABI_VERSION
from ._fastcall import GuestFunc
from .errors import (
    AbiMismatch,
    BuildError,
    GuestBusy,
    GuestError,
    GuestLimitExceeded,
    GuestTrap,
    LoanError,
    LoanRevoked,
    RegionError,
    WasmshareError,
)
from .guest import Guest
from .loan import Loan, LoanSlice, LoanState, zero_copy_supported
from .region import Region

__version__ = "0.1.0"

__all__ = [
    "ABI_VERSION",
    "AbiMismatch",
    "BuildError",
    "Guest",
    "GuestBusy",
    "GuestError",
    "GuestFunc",
    "GuestLimitExceeded",
    "GuestTrap",
    "Loan",
    "LoanError",
    "LoanRevoked",
    "LoanSlice",
    "LoanState",
    "Region",
    "RegionError",
    "WasmshareError",
    "zero_copy_supported",
    "__version__",
]
