"""The guest side of wasmshare: the C header's constants and the guest compilers.

C guests build with :func:`build_guest`; Rust and Zig guests with
:func:`wasmshare.abi.rust.build_rust_guest` and :func:`wasmshare.abi.zig.build_zig_guest`,
against the SDKs in ``sdk/`` (reached through this package's ``sdk`` link).

``ABI_VERSION`` and the constants exported here mirror ``include/wasmshare.h``
(the host defines them in :mod:`wasmshare._abi`); a test parses the header and
checks that they agree.  See ``docs/abi.md`` for the
ABI itself.
"""

from __future__ import annotations

from typing import Final

from wasmshare._abi import (
    ABI_VERSION,
    ACCESS_RO,
    ACCESS_RW,
    ERR_ACCESS,
    ERR_BAD_HANDLE,
    ERR_FAILED,
    ERR_NOT_BORROWED,
    IMPORT_MODULE,
    OK,
)
from wasmshare._libc import WASM_PAGE_SIZE
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

#: Wasm page size in bytes; every loan window is aligned to it (``WS_PAGE_SIZE``).
PAGE_SIZE: Final = WASM_PAGE_SIZE
