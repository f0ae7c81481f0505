"""The descriptors behind a region: memfds, POSIX shm names, seals, and their release.

:class:`wasmshare.region.Region` owns one of these descriptors; this module makes and
checks them. Every function raises :class:`~wasmshare.errors.RegionError` with the OS
reason, except where it says otherwise.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import sys
from typing import Literal

from ._libc import shm_open, shm_unlink
from .errors import RegionError

RegionKind = Literal["memfd", "shm", "file"]

HAS_MEMFD = hasattr(os, "memfd_create") and sys.platform.startswith("linux")
"""Whether anonymous regions are Linux memfds (sealable); elsewhere they are unlinked shm objects."""
F_ADD_SEALS: int | None = getattr(fcntl, "F_ADD_SEALS", None)
F_GET_SEALS: int | None = getattr(fcntl, "F_GET_SEALS", None)
SEAL_READ_ONLY = (
    getattr(fcntl, "F_SEAL_WRITE", 0)
    | getattr(fcntl, "F_SEAL_SHRINK", 0)
    | getattr(fcntl, "F_SEAL_GROW", 0)
    | getattr(fcntl, "F_SEAL_SEAL", 0)
)
"""The seals that make a memfd read-only forever."""
F_SEAL_WRITE: int = getattr(fcntl, "F_SEAL_WRITE", 0)

_NAME_RE = re.compile(r"/?[A-Za-z0-9._-]{1,200}")
_NAME_RULE = "1-200 characters from [A-Za-z0-9._-], optionally with one leading '/', and not '.' or '..'"


class Resources:
    """What a region's finalizer releases: its fd and an owned shm name; holds no Region."""

    __slots__ = ("fd", "unlink_name")

    def __init__(self, fd: int, unlink_name: str | None) -> None:
        self.fd = fd
        self.unlink_name = unlink_name  # "/name" to shm_unlink on release, or None

    def release(self) -> None:
        """Unlink the owned name and close the fd; safe to call twice, never raises OSError."""
        name, self.unlink_name = self.unlink_name, None
        if name is not None:
            try:
                shm_unlink(name)
            except OSError:
                pass
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


def os_reason(e: OSError) -> str:
    """The OS's words for ``e`` (its strerror), for error messages."""
    return e.strerror or str(e)


def normalize_name(name: object) -> str:
    """Return the shm name without its leading '/', or raise RegionError."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise RegionError(f"invalid shared memory name {name!r}: use {_NAME_RULE}")
    bare = name[1:] if name.startswith("/") else name
    if bare in (".", ".."):
        raise RegionError(f"invalid shared memory name {name!r}: use {_NAME_RULE}")
    return bare


def fd_seals(fd: int) -> int:
    """The fd's seals (memfd on Linux), or 0 where sealing is unsupported."""
    if F_GET_SEALS is None:
        return 0
    try:
        return int(fcntl.fcntl(fd, F_GET_SEALS))
    except OSError:
        return 0


def temporary_shm_name() -> str:
    """A fresh "/wasmshare-<pid>-<random>" name for a shm object unlinked soon after."""
    return f"/wasmshare-{os.getpid()}-{secrets.token_hex(8)}"


def new_anonymous_fd(nbytes_on_disk: int) -> tuple[int, RegionKind]:
    """A fresh, zero-filled, unnamed fd of the given size: memfd, or unlinked shm elsewhere."""
    if HAS_MEMFD:
        try:
            fd = os.memfd_create("wasmshare", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise RegionError(f"memfd_create failed: {os_reason(e)}") from e
        kind: RegionKind = "memfd"
    else:
        fd = create_shm_fd(temporary_shm_name(), unlink_now=True)
        kind = "shm"
    try:
        os.ftruncate(fd, nbytes_on_disk)
    except OSError as e:
        os.close(fd)
        raise RegionError(f"cannot size {kind} region to {nbytes_on_disk} bytes: {os_reason(e)}") from e
    return fd, kind


def create_shm_fd(path: str, *, unlink_now: bool) -> int:
    """Create the shm object ``path`` exclusively (mode 0600); ``unlink_now`` drops its name at once."""
    try:
        fd = shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except FileExistsError as e:
        raise RegionError(
            f"shared memory object {path!r} already exists; pick another name, "
            "or use Region.open() to attach to it"
        ) from e
    except OSError as e:
        raise RegionError(f"cannot create shared memory object {path!r}: {os_reason(e)}") from e
    if unlink_now:
        try:
            shm_unlink(path)
        except OSError:
            pass
    return fd


def write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` at the start of ``fd``; raises OSError."""
    pos = 0
    while pos < data.nbytes:
        pos += os.pwrite(fd, data[pos:], pos)


def open_shm_fd(path: str, access: Literal["rw", "ro"], max_nbytes: int) -> tuple[int, int]:
    """Open the existing shm object ``path`` for ``access``; return ``(fd, size in bytes)``.

    The object must be sized, 1 byte to ``max_nbytes``; the fd is closed on any failure.
    """
    flags = os.O_RDWR if access == "rw" else os.O_RDONLY
    try:
        fd = shm_open(path, flags, 0)
    except FileNotFoundError as e:
        raise RegionError(
            f"no shared memory object named {path!r} (never created, or already unlinked)"
        ) from e
    except OSError as e:
        raise RegionError(f"cannot open shared memory object {path!r} ({access}): {os_reason(e)}") from e
    res = Resources(fd, None)
    try:
        size = os.fstat(fd).st_size
    except OSError as e:
        res.release()
        raise RegionError(f"cannot stat shared memory object {path!r}: {os_reason(e)}") from e
    if size <= 0:
        res.release()
        raise RegionError(f"shared memory object {path!r} has size 0 (its creator has not sized it yet)")
    if size > max_nbytes:
        res.release()
        raise RegionError(
            f"shared memory object {path!r} is {size} bytes: a wasm32 guest cannot address more than 4 GiB"
        )
    return fd, size
