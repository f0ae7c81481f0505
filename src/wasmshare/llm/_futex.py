"""Futex wait/wake on a 32-bit word in shared memory (Linux), for waking worker processes.

A worker sleeps in ``FUTEX_WAIT`` on a word of a shared region until the engine
increments it and calls ``FUTEX_WAKE``: one syscall each way, no socket round trip.
The calls go through ctypes, which releases the GIL while the thread sleeps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import sys

_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "arm64": 98}.get(platform.machine())
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
AVAILABLE = sys.platform.startswith("linux") and _SYS_FUTEX is not None

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def wait(address: int, expected: int, timeout_s: float | None) -> bool:
    """Sleep while the u32 at ``address`` equals ``expected``.

    Returns False on timeout, True when woken or when the value already differs
    (spurious wake-ups return True too: callers re-check the word).
    """
    if _SYS_FUTEX is None:  # pragma: no cover - non-Linux
        raise OSError(errno.ENOSYS, "futex needs Linux")
    ts = None
    if timeout_s is not None:
        sec = int(timeout_s)
        ts = ctypes.byref(_Timespec(sec, int((timeout_s - sec) * 1e9)))
    result = _syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(address),
        ctypes.c_int(_FUTEX_WAIT),
        ctypes.c_uint32(expected & 0xFFFFFFFF),
        ts,
        None,
        ctypes.c_int(0),
    )
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ETIMEDOUT:
        return False
    if err in (errno.EAGAIN, errno.EINTR):
        return True
    raise OSError(err, f"futex wait failed: {errno.errorcode.get(err, err)}")


def wake(address: int, count: int = 1) -> None:
    """Wake up to ``count`` waiters on the word at ``address``."""
    if _SYS_FUTEX is None:  # pragma: no cover - non-Linux
        raise OSError(errno.ENOSYS, "futex needs Linux")
    _syscall(
        ctypes.c_long(_SYS_FUTEX),
        ctypes.c_void_p(address),
        ctypes.c_int(_FUTEX_WAKE),
        ctypes.c_int(count),
        None,
        None,
        ctypes.c_int(0),
    )
