"""wasmshare: zero-copy shared memory between a Python host and its WebAssembly guests.

The core, bottom up: a :class:`Region` is fd-backed shared memory; a :class:`Guest` is a
wasm instance whose linear memory never moves; a :class:`Loan` maps a region into a
guest's memory so the guest, numpy/torch and other processes see the same pages.
"""

from __future__ import annotations

import importlib
import typing

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

if typing.TYPE_CHECKING:
    from ._abi import ABI_VERSION
    from ._fastcall import GuestFunc
    from .guest import Guest
    from .loan import Loan, LoanSlice, LoanState, zero_copy_supported
    from .region import Region

# Loaded on first use, so that a process that needs only a region (a vLLM worker with
# the thin client, which has no wasmtime) can import the package.
_LAZY = {
    "ABI_VERSION": "._abi",
    "GuestFunc": "._fastcall",
    "Guest": ".guest",
    "Loan": ".loan",
    "LoanSlice": ".loan",
    "LoanState": ".loan",
    "zero_copy_supported": ".loan",
    "Region": ".region",
}


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wasmshare' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


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
