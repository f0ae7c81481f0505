"""The guest side of wasmshare: the C header's constants and the guest compiler.

``ABI_VERSION`` and the constants below mirror ``include/wasmshare.h``; a test
parses the header and checks that they agree.  See ``docs/abi.md`` for the
ABI itself.
"""

from __future__ import annotations

from typing import Final

from wasmshare.abi.build import build_guest, include_dir

__all__ = [
    "ABI_VERSION",
    "PAGE_SIZE",
    "ACCESS_RO",
    "ACCESS_RW",
    "OK",
    "ERR_BAD_HANDLE",
    "ERR_ACCESS",
    "ERR_NOT_BORROWED",
    "ERR_FAILED",
    "IMPORT_MODULE",
    "build_guest",
    "include_dir",
]

#: Value of ``WASMSHARE_ABI_VERSION``; guests report it from ``ws_abi_version()``.
ABI_VERSION: Final = 1
#: Wasm page size in bytes; every loan window is aligned to it (``WS_PAGE_SIZE``).
PAGE_SIZE: Final = 65536

#: ``access`` argument of the ``ws_borrow`` import: read-only.
ACCESS_RO: Final = 1
#: ``access`` argument of the ``ws_borrow`` import: read-write.
ACCESS_RW: Final = 2

#: Status codes returned by the host imports (``WS_OK``, ``WS_ERR_*``).
OK: Final = 0
ERR_BAD_HANDLE: Final = -1
ERR_ACCESS: Final = -2
ERR_NOT_BORROWED: Final = -3
ERR_FAILED: Final = -4

#: Module name of the host functions guests import (``ws_borrow``, ...).
IMPORT_MODULE: Final = "wasmshare"
