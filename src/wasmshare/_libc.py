"""Thin wrappers over the libc calls that place and protect loans, and the page sizes.

Python's :mod:`mmap` cannot map at a fixed address or change protection, so the loan
layer calls libc directly. Every wrapper raises :class:`OSError` with ``errno`` set.
POSIX shared-memory names go through :func:`shm_open` / :func:`shm_unlink` here, the one
place that touches CPython's private ``_posixshmem``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Iterator

PAGE_SIZE: int = mmap.PAGESIZE
"""The host's page size in bytes: the unit of every mapping and protection change."""
WASM_PAGE_SIZE: int = 65536
"""A WebAssembly page in bytes: the unit of ``memory.grow`` and of loan windows."""

PROT_NONE = 0
PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE
MAP_SHARED = mmap.MAP_SHARED
MAP_PRIVATE = mmap.MAP_PRIVATE
MAP_ANONYMOUS: int = getattr(mmap, "MAP_ANONYMOUS", 0x20)
MAP_FIXED: int = 0x10 if sys.platform.startswith("linux") else 0x0010

IS_LINUX: bool = sys.platform.startswith("linux")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_mmap = _libc.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mprotect = _libc.mprotect
_mprotect.restype = ctypes.c_int
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

usleep = _libc.usleep
"""libc ``usleep``: sleeps in C with the GIL released; pass a ``ctypes.c_uint`` of microseconds."""
usleep.restype = ctypes.c_int

_MAP_FAILED = ctypes.c_void_p(-1).value


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def map_fixed(address: int, nbytes: int, prot: int, flags: int, fd: int, offset: int) -> None:
    """Map ``fd`` at exactly ``address``, replacing whatever was mapped there."""
    result = _mmap(address, nbytes, prot, flags | MAP_FIXED, fd, offset)
    if result == _MAP_FAILED or result is None:
        _raise_errno("mmap")
    if result != address:  # pragma: no cover - MAP_FIXED either succeeds in place or fails
        raise OSError(0, f"mmap placed the mapping at {result:#x}, not {address:#x}")


def map_anonymous_fixed(address: int, nbytes: int, prot: int) -> None:
    """Replace ``[address, address+nbytes)`` with fresh zero pages of private memory."""
    map_fixed(address, nbytes, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)


def protect(address: int, nbytes: int, prot: int) -> None:
    """Change the protection of a page-aligned range."""
    if _mprotect(address, nbytes, prot) != 0:
        _raise_errno("mprotect")


def round_up(n: int, multiple: int) -> int:
    """Round ``n`` up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def page_round(nbytes: int) -> int:
    """Round ``nbytes`` up to whole host pages (:data:`PAGE_SIZE`)."""
    return round_up(nbytes, PAGE_SIZE)


def shm_open(name: str, flags: int, mode: int) -> int:
    """Open a POSIX shared-memory object by ``name`` ("/x"); return its fd.

    Raises :class:`OSError` (``FileNotFoundError``, ``FileExistsError``, ...) as ``os.open`` does.
    """
    import _posixshmem

    return int(_posixshmem.shm_open(name, flags, mode))


def shm_unlink(name: str) -> None:
    """Remove the POSIX shared-memory name ``name`` ("/x"); open descriptors keep working."""
    import _posixshmem

    _posixshmem.shm_unlink(name)


_FAULT_SIGNALS = (11, 7, 4, 8)  # SIGSEGV, SIGBUS, SIGILL, SIGFPE on Linux
_SIGACTION_BYTES = 256  # larger than struct sigaction on every Linux ABI; treated as opaque


@contextlib.contextmanager
def preserve_fault_handlers() -> Iterator[None]:
    """Restore the process's fault-signal handlers after the block.

    wasmtime turns a guest's out-of-bounds access into a trap through its SIGSEGV/SIGBUS
    handlers. Some libraries install their own handler when imported (tvm-ffi, which
    xgrammar loads, prints a backtrace and aborts), which would turn every guest trap
    into a crash of the whole process. Import such libraries inside this block.
    """
    if not IS_LINUX:
        yield
        return
    saved = []
    for sig in _FAULT_SIGNALS:
        buf = ctypes.create_string_buffer(_SIGACTION_BYTES)
        if _libc.sigaction(sig, None, buf) == 0:
            saved.append((sig, buf))
    try:
        yield
    finally:
        for sig, buf in saved:
            _libc.sigaction(sig, buf, None)
