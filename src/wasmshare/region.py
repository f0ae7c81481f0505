"""Shared-memory regions: one fd-backed mapping seen by the host and by wasm guests.

A :class:`Region` owns a file descriptor (a Linux memfd, a POSIX shared-memory
object, or an ordinary file) and one host mapping of it. numpy arrays and torch
tensors made by :meth:`Region.array` / :meth:`Region.tensor` are zero-copy views of
that host mapping. ``loan.py`` maps the same descriptor (``region.fd``) with
``mmap(MAP_FIXED)`` into a guest's linear memory, so the host, every guest holding a
loan and every process the fd was sent to (:meth:`Region.send`) see the same bytes.

View lifetime: a view keeps the host mapping's pages alive as long as the view (or
anything derived from it) is referenced, even after :meth:`Region.close`; it never
dangles and never segfaults. After close it no longer aliases any loan (closing a
region revokes its loans first).

Linux is the main platform. POSIX shm (by name) and files also work on macOS;
memfd and sealing are Linux only, and there ``create()`` without a name falls back
to an immediately unlinked shm object.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import json
import mmap
import operator
import os
import re
import secrets
import socket
import stat
import struct
import sys
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Literal, SupportsIndex

import numpy as np
import numpy.typing as npt

from wasmshare.errors import RegionError

if TYPE_CHECKING:
    import torch

__all__ = ["Access", "Region", "RegionKind", "MAX_REGION_BYTES"]

Access = Literal["rw", "ro"]
RegionKind = Literal["memfd", "shm", "file"]

#: A wasm32 guest addresses at most 4 GiB of linear memory.
MAX_REGION_BYTES = 4 * 1024 * 1024 * 1024

_NAME_RE = re.compile(r"/?[A-Za-z0-9._-]{1,200}")
_NAME_RULE = "1-200 characters from [A-Za-z0-9._-], optionally with one leading '/', and not '.' or '..'"

# Wire format of send()/receive(): magic, big-endian uint32 header length, JSON header.
_WIRE_MAGIC = b"WSRG"
_WIRE_PREFIX = struct.Struct(">4sI")
_WIRE_MAX_HEADER = 64 * 1024
_WIRE_VERSION = 1

_HAS_MEMFD = hasattr(os, "memfd_create") and sys.platform.startswith("linux")
_F_ADD_SEALS: int | None = getattr(fcntl, "F_ADD_SEALS", None)
_F_GET_SEALS: int | None = getattr(fcntl, "F_GET_SEALS", None)
_SEAL_READ_ONLY = (
    getattr(fcntl, "F_SEAL_WRITE", 0)
    | getattr(fcntl, "F_SEAL_SHRINK", 0)
    | getattr(fcntl, "F_SEAL_GROW", 0)
    | getattr(fcntl, "F_SEAL_SEAL", 0)
)
_F_SEAL_WRITE: int = getattr(fcntl, "F_SEAL_WRITE", 0)


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class _Resources:
    """What the finalizer releases; holds no reference to the Region."""

    __slots__ = ("fd", "unlink_name")

    def __init__(self, fd: int, unlink_name: str | None) -> None:
        self.fd = fd
        self.unlink_name = unlink_name  # "/name" to shm_unlink on release, or None

    def release(self) -> None:
        name, self.unlink_name = self.unlink_name, None
        if name is not None:
            try:
                _shm_unlink(name)
            except OSError:
                pass
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


# --- small helpers --------------------------------------------------------------


def _page_round(nbytes: int) -> int:
    page = mmap.PAGESIZE
    return (nbytes + page - 1) // page * page


def _check_nbytes(nbytes: object, what: str = "nbytes") -> int:
    if isinstance(nbytes, bool):
        raise RegionError(f"{what} must be an int, got bool {nbytes!r}")
    if not isinstance(nbytes, SupportsIndex):
        raise RegionError(f"{what} must be an int, got {type(nbytes).__name__}")
    n = operator.index(nbytes)
    if n <= 0:
        raise RegionError(f"{what} must be > 0, got {n}")
    if n > MAX_REGION_BYTES:
        raise RegionError(
            f"{what} {n} is larger than 4 GiB ({MAX_REGION_BYTES} bytes): "
            "a wasm32 guest cannot address more than 4 GiB"
        )
    return int(n)


def _check_access(access: object) -> Access:
    if access == "rw":
        return "rw"
    if access == "ro":
        return "ro"
    raise RegionError(f"access must be 'rw' or 'ro', got {access!r}")


def _normalize_name(name: object) -> str:
    """Return the name without its leading '/', or raise RegionError."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise RegionError(f"invalid shared memory name {name!r}: use {_NAME_RULE}")
    bare = name[1:] if name.startswith("/") else name
    if bare in (".", ".."):
        raise RegionError(f"invalid shared memory name {name!r}: use {_NAME_RULE}")
    return bare


def _shm_open(path: str, flags: int, mode: int) -> int:
    import _posixshmem

    return int(_posixshmem.shm_open(path, flags, mode))


def _shm_unlink(path: str) -> None:
    import _posixshmem

    _posixshmem.shm_unlink(path)


def _os_reason(e: OSError) -> str:
    return e.strerror or str(e)


def _fd_seals(fd: int) -> int:
    """The fd's seals (memfd on Linux), or 0 where sealing is unsupported."""
    if _F_GET_SEALS is None:
        return 0
    try:
        return int(fcntl.fcntl(fd, _F_GET_SEALS))
    except OSError:
        return 0


def _loan_is_writable(loan: object) -> bool:
    """A loan counts as writable unless it says otherwise (``writable`` False or ``access`` 'ro')."""
    w = getattr(loan, "writable", None)
    if isinstance(w, bool):
        return w
    return getattr(loan, "access", None) != "ro"


def _new_anonymous_fd(nbytes_on_disk: int) -> tuple[int, RegionKind]:
    """A fresh, zero-filled, unnamed fd of the given size: memfd, or unlinked shm elsewhere."""
    if _HAS_MEMFD:
        try:
            fd = os.memfd_create("wasmshare", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as e:
            raise RegionError(f"memfd_create failed: {_os_reason(e)}") from e
        kind: RegionKind = "memfd"
    else:
        fd = _create_shm_fd(f"/wasmshare-{os.getpid()}-{secrets.token_hex(8)}", unlink_now=True)
        kind = "shm"
    try:
        os.ftruncate(fd, nbytes_on_disk)
    except OSError as e:
        os.close(fd)
        raise RegionError(f"cannot size {kind} region to {nbytes_on_disk} bytes: {_os_reason(e)}") from e
    return fd, kind


def _create_shm_fd(path: str, *, unlink_now: bool) -> int:
    try:
        fd = _shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    except FileExistsError as e:
        raise RegionError(
            f"shared memory object {path!r} already exists; pick another name, "
            "or use Region.open() to attach to it"
        ) from e
    except OSError as e:
        raise RegionError(f"cannot create shared memory object {path!r}: {_os_reason(e)}") from e
    if unlink_now:
        try:
            _shm_unlink(path)
        except OSError:
            pass
    return fd


def _resolve_shape(
    shape: int | tuple[int, ...] | None, itemsize: int, offset: object, nbytes: int, dtype: object
) -> tuple[int, tuple[int, ...], int]:
    """Check offset and shape against the region; return (count, shape, offset).

    ``dtype`` is only formatted into error messages (formatting a dtype costs
    microseconds, and views are made on hot paths).
    """
    if isinstance(offset, bool):
        raise RegionError(f"offset must be an int, got bool {offset!r}")
    try:
        off = operator.index(offset)  # type: ignore[arg-type]
    except TypeError:
        raise RegionError(f"offset must be an int, got {type(offset).__name__}") from None
    if off < 0 or off > nbytes:
        raise RegionError(f"offset {off} is outside the region (0..{nbytes} bytes)")
    # Alignment: itemsize for power-of-two sizes (all numeric dtypes), else 1 byte.
    align = itemsize if itemsize > 0 and itemsize & (itemsize - 1) == 0 else 1
    if off % align:
        raise RegionError(f"offset {off} is not aligned to dtype {dtype} itemsize {itemsize}")
    if itemsize <= 0:
        raise RegionError(f"dtype {dtype} has itemsize {itemsize}; cannot view bytes as it")
    avail = nbytes - off
    if shape is None:
        count = avail // itemsize
        if count == 0:
            raise RegionError(
                f"no whole dtype {dtype} element (itemsize {itemsize}) fits in {avail} bytes after offset {off}"
            )
        return count, (count,), off
    dims_in = (shape,) if not isinstance(shape, tuple) else shape
    dims: list[int] = []
    for d in dims_in:
        if isinstance(d, bool):
            raise RegionError(f"shape entries must be ints, got {shape!r}")
        try:
            di = operator.index(d)
        except TypeError:
            raise RegionError(f"shape entries must be ints, got {shape!r}") from None
        if di < 0:
            raise RegionError(f"shape entries must be >= 0, got {shape!r}")
        dims.append(di)
    count = 1
    for di in dims:
        count *= di
    if count * itemsize > avail:
        raise RegionError(
            f"shape {tuple(dims)} of dtype {dtype} needs {count * itemsize} bytes, but only {avail} "
            f"bytes are left after offset {off} in a {nbytes}-byte region"
        )
    return count, tuple(dims), off


# --- Region ---------------------------------------------------------------------


class Region:
    """An fd-backed shared-memory mapping shared by the host, guests and other processes.

    Make one with :meth:`create`, :meth:`open`, :meth:`from_file`, :meth:`from_bytes`,
    :meth:`from_fd` or :meth:`receive`; the constructor is private.

    Ownership: the Region owns its fd and its host mapping and releases them on
    :meth:`close` (safe to call twice), on ``with`` exit, or when garbage collected.
    A Region made by ``create(name=...)`` also owns the shm name and unlinks it.

    Views from :meth:`array` / :meth:`tensor` stay valid as long as they are
    referenced, even after ``close()``; after close they no longer alias any loan.

    After close, every method raises :class:`RegionError`; the descriptive
    properties (``nbytes``, ``kind``, ``name``, ``access``, ``closed``, ...) stay readable.
    """

    _loans: weakref.WeakSet[Any]

    def __init__(self, *, _token: object = None) -> None:
        if _token is not _CONSTRUCT:
            raise RegionError(
                "use Region.create(), open(), from_file(), from_bytes(), from_fd() or receive()"
            )
        self._state = _State.CLOSED  # until _setup succeeds
        self._lock = threading.RLock()
        self._loans = weakref.WeakSet()
        self._mm: mmap.mmap | None = None
        self._address = 0
        self._nbytes = 0
        self._access: Access = "ro"
        self._kind: RegionKind = "memfd"
        self._name: str | None = None
        self._sealed = False
        self._res = _Resources(-1, None)
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @classmethod
    def _setup(
        cls,
        fd: int,
        *,
        nbytes: int,
        access: Access,
        kind: RegionKind,
        name: str | None,
        unlink_name: str | None,
        release_fd_on_error: bool = True,
    ) -> Region:
        """Take ownership of ``fd`` (already validated), register cleanup, map it."""
        self = cls(_token=_CONSTRUCT)
        self._res = _Resources(fd, unlink_name)
        # Registered before anything else can fail: holds only the _Resources, never self.
        self._finalizer = weakref.finalize(self, _Resources.release, self._res)
        self._nbytes = nbytes
        self._access = access
        self._kind = kind
        self._name = name
        try:
            self._map(access)
        except BaseException:
            if not release_fd_on_error:
                self._finalizer.detach()
                self._res.fd = -1
            self._finalizer()
            raise
        self._sealed = kind == "memfd" and bool(_fd_seals(fd) & _F_SEAL_WRITE)
        self._state = _State.OPEN
        return self

    def _map(self, access: Access) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if access == "rw" else 0)
        # The host maps nbytes (the kernel rounds the mapping up to whole pages anyway);
        # CPython refuses a length past the end of a regular file.
        try:
            mm = mmap.mmap(self._res.fd, self._nbytes, flags=mmap.MAP_SHARED, prot=prot)
        except (OSError, ValueError) as e:
            reason = _os_reason(e) if isinstance(e, OSError) else str(e)
            raise RegionError(f"cannot map {self._label()} ({self._nbytes} bytes, {access}): {reason}") from e
        probe = np.frombuffer(mm, dtype=np.uint8, count=1)
        self._address = int(probe.__array_interface__["data"][0])
        del probe
        self._mm = mm

    # --- constructors -----------------------------------------------------------

    @classmethod
    def create(cls, nbytes: int, *, name: str | None = None) -> Region:
        """Create a new zero-filled read-write region of ``nbytes`` bytes (at most 4 GiB).

        ``name=None``: an anonymous Linux memfd (``MFD_CLOEXEC | MFD_ALLOW_SEALING``),
        so :meth:`seal` works; off Linux, an shm object unlinked at once.
        With a name: a POSIX shm object created exclusively; this Region owns the name and
        unlinks it on :meth:`close`. The fd is sized to :attr:`mapped_nbytes` so every mapped
        page is backed.

        Raises RegionError for a bad size or name, or if the name already exists.
        """
        n = _check_nbytes(nbytes)
        size = _page_round(n)
        if name is None:
            fd, kind = _new_anonymous_fd(size)
            return cls._setup(fd, nbytes=n, access="rw", kind=kind, name=None, unlink_name=None)
        bare = _normalize_name(name)
        path = "/" + bare
        fd = _create_shm_fd(path, unlink_now=False)
        res = _Resources(fd, path)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            res.release()
            raise RegionError(
                f"cannot size shared memory object {path!r} to {size} bytes: {_os_reason(e)}"
            ) from e
        return cls._setup(fd, nbytes=n, access="rw", kind="shm", name=bare, unlink_name=path)

    @classmethod
    def open(cls, name: str, *, access: Access = "rw") -> Region:
        """Open an existing POSIX shm object by name; the Region does not own the name.

        ``nbytes`` is the object's size, i.e. the creator's :attr:`mapped_nbytes` (whole
        pages), not necessarily the creator's ``nbytes``. close() leaves the name in place.

        Raises RegionError if the name is invalid or missing, or access is denied.
        """
        acc = _check_access(access)
        bare = _normalize_name(name)
        path = "/" + bare
        flags = os.O_RDWR if acc == "rw" else os.O_RDONLY
        try:
            fd = _shm_open(path, flags, 0)
        except FileNotFoundError as e:
            raise RegionError(
                f"no shared memory object named {path!r} (never created, or already unlinked)"
            ) from e
        except OSError as e:
            raise RegionError(f"cannot open shared memory object {path!r} ({acc}): {_os_reason(e)}") from e
        res = _Resources(fd, None)
        try:
            size = os.fstat(fd).st_size
        except OSError as e:
            res.release()
            raise RegionError(f"cannot stat shared memory object {path!r}: {_os_reason(e)}") from e
        if size <= 0:
            res.release()
            raise RegionError(f"shared memory object {path!r} has size 0 (its creator has not sized it yet)")
        if size > MAX_REGION_BYTES:
            res.release()
            raise RegionError(
                f"shared memory object {path!r} is {size} bytes: a wasm32 guest cannot address more than 4 GiB"
            )
        return cls._setup(fd, nbytes=size, access=acc, kind="shm", name=bare, unlink_name=None)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, access: Access = "ro") -> Region:
        """Map a regular file. ``"rw"`` maps it ``MAP_SHARED``, so writes reach the file.

        The file is not resized: ``nbytes`` is its size (1 byte .. 4 GiB). If another
        process truncates the file while it is mapped, touching the lost pages raises SIGBUS;
        nothing here can prevent that. ``name`` is the path.

        Raises RegionError (with the path and the OS reason) for a missing, unreadable,
        empty or too-large file, a directory or other non-regular file, or ``"rw"`` on a
        read-only file.
        """
        acc = _check_access(access)
        spath = os.fspath(path)
        flags = (os.O_RDWR if acc == "rw" else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(spath, flags)
        except OSError as e:
            raise RegionError(f"cannot open file {spath!r} ({acc}): {_os_reason(e)}") from e
        res = _Resources(fd, None)
        try:
            st = os.fstat(fd)
        except OSError as e:
            res.release()
            raise RegionError(f"cannot stat file {spath!r}: {_os_reason(e)}") from e
        if not stat.S_ISREG(st.st_mode):
            res.release()
            what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise RegionError(f"cannot map {spath!r}: it is {what}")
        if st.st_size == 0:
            res.release()
            raise RegionError(f"cannot map file {spath!r}: it is empty (a region needs at least 1 byte)")
        if st.st_size > MAX_REGION_BYTES:
            res.release()
            raise RegionError(
                f"file {spath!r} is {st.st_size} bytes: a wasm32 guest cannot address more than 4 GiB"
            )
        return cls._setup(fd, nbytes=st.st_size, access=acc, kind="file", name=spath, unlink_name=None)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, *, seal: bool = True) -> Region:
        """A new region holding a copy of ``data``; sealed read-only forever by default.

        Sealing (Linux memfd) means no process, and no guest, can ever write the bytes, so
        the region can be lent to untrusted guests. With ``seal=False`` the region is
        read-write. Off Linux, ``seal=True`` gives a read-only fd of an unlinked shm object
        (``sealed`` is False there: a read-only fd, not a kernel seal).

        Raises RegionError for empty or over-4-GiB data.
        """
        try:
            mv = memoryview(data)
        except TypeError:
            raise RegionError(f"data must be bytes-like, got {type(data).__name__}") from None
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        mv = mv.cast("B")
        n = _check_nbytes(mv.nbytes, "len(data)")
        size = _page_round(n)
        if _HAS_MEMFD:
            fd, kind = _new_anonymous_fd(size)
            res = _Resources(fd, None)
            try:
                _write_all(fd, mv)
                if seal:
                    if _F_ADD_SEALS is None:
                        raise RegionError("this platform cannot seal a memfd")
                    fcntl.fcntl(fd, _F_ADD_SEALS, _SEAL_READ_ONLY)
            except OSError as e:
                res.release()
                raise RegionError(f"cannot fill memfd region with {n} bytes: {_os_reason(e)}") from e
            except BaseException:
                res.release()
                raise
            return cls._setup(
                fd, nbytes=n, access="ro" if seal else "rw", kind=kind, name=None, unlink_name=None
            )
        # Portable fallback: fill a named shm object, keep only a read-only fd of it.
        path = f"/wasmshare-{os.getpid()}-{secrets.token_hex(8)}"
        wfd = _create_shm_fd(path, unlink_now=False)
        res = _Resources(wfd, path)
        try:
            os.ftruncate(wfd, size)
            _write_all(wfd, mv)
            fd = _shm_open(path, os.O_RDONLY, 0) if seal else os.dup(wfd)
        except OSError as e:
            res.release()
            raise RegionError(f"cannot fill shm region with {n} bytes: {_os_reason(e)}") from e
        res.release()
        return cls._setup(
            fd, nbytes=n, access="ro" if seal else "rw", kind="shm", name=None, unlink_name=None
        )

    @classmethod
    def from_fd(
        cls,
        fd: int,
        *,
        access: Access = "rw",
        nbytes: int | None = None,
        kind: RegionKind = "memfd",
        name: str | None = None,
    ) -> Region:
        """Wrap an open descriptor; on success the Region owns ``fd`` and closes it.

        If this raises, the fd is left open and still belongs to the caller.
        ``nbytes`` defaults to the fd's size (fstat). ``kind`` and ``name`` are taken on
        trust (they label the region; a shm ``name`` given here is never unlinked on close).

        Raises RegionError for a bad fd, a size of 0 or over 4 GiB, ``nbytes`` past the end
        of the fd, or ``"rw"`` on a read-only or sealed fd.
        """
        acc = _check_access(access)
        if kind not in ("memfd", "shm", "file"):
            raise RegionError(f"kind must be 'memfd', 'shm' or 'file', got {kind!r}")
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise RegionError(f"fd must be a non-negative int, got {fd!r}")
        try:
            st = os.fstat(fd)
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as e:
            raise RegionError(f"fd {fd} is not usable: {_os_reason(e)}") from e
        if stat.S_ISDIR(st.st_mode) or not (stat.S_ISREG(st.st_mode) or kind == "shm"):
            raise RegionError(f"fd {fd} is not a regular file or shared memory object; cannot map it")
        if nbytes is None:
            if st.st_size <= 0:
                raise RegionError(f"fd {fd} has size 0; a region needs at least 1 byte")
            n = _check_nbytes(st.st_size, f"size of fd {fd}")
        else:
            n = _check_nbytes(nbytes)
            if n > st.st_size:
                raise RegionError(
                    f"nbytes {n} is past the end of fd {fd} ({st.st_size} bytes); mapping it would fault"
                )
        if mode == os.O_WRONLY:
            raise RegionError(f"fd {fd} is write-only; a region needs a readable fd")
        if acc == "rw" and mode != os.O_RDWR:
            raise RegionError(
                f"fd {fd} is open read-only; cannot make an 'rw' region of it (use access='ro')"
            )
        if acc == "rw" and _fd_seals(fd) & _F_SEAL_WRITE:
            raise RegionError(f"fd {fd} is sealed read-only (F_SEAL_WRITE); use access='ro'")
        bare = _normalize_name(name) if (name is not None and kind == "shm") else name
        return cls._setup(
            fd, nbytes=n, access=acc, kind=kind, name=bare, unlink_name=None, release_fd_on_error=False
        )

    # --- fd passing -------------------------------------------------------------

    def send(self, sock: socket.socket) -> None:
        """Send this region's fd over a Unix socket (SCM_RIGHTS) with a small JSON header.

        The peer calls :meth:`receive`. The kernel duplicates the fd into the peer, so
        closing this Region afterwards does not affect the peer's copy. The header carries
        ``nbytes``, ``access``, ``kind``, ``name`` and ``sealed``.

        Raises RegionError if closed or if the socket send fails.
        """
        with self._lock:
            fd = self._require_open_fd()
            header = json.dumps(
                {
                    "v": _WIRE_VERSION,
                    "nbytes": self._nbytes,
                    "access": self._access,
                    "kind": self._kind,
                    "name": self._name,
                    "sealed": self.sealed,
                },
                separators=(",", ":"),
            ).encode()
            msg = _WIRE_PREFIX.pack(_WIRE_MAGIC, len(header)) + header
            try:
                sent = socket.send_fds(sock, [msg], [fd])
                if sent < len(msg):
                    sock.sendall(msg[sent:])
            except OSError as e:
                raise RegionError(f"cannot send {self._label()} over the socket: {_os_reason(e)}") from e

    @classmethod
    def receive(cls, sock: socket.socket) -> Region:
        """Receive a region sent by :meth:`send`; the new Region owns the received fd.

        ``sealed`` is read from the fd itself (F_GET_SEALS), not trusted from the header.
        A received shm name is never unlinked by this side.

        Raises RegionError if the peer closed the socket, sent no fd, or sent garbage.
        """
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, _WIRE_MAX_HEADER + _WIRE_PREFIX.size, 4)
        except OSError as e:
            raise RegionError(f"cannot receive a region from the socket: {_os_reason(e)}") from e
        owned = [_Resources(f, None) for f in fds]

        def fail(msg: str) -> RegionError:
            for r in owned:
                r.release()
            return RegionError(msg)

        if not data and not fds:
            raise fail("peer closed the socket without sending a region")
        if len(fds) != 1:
            raise fail(f"expected exactly 1 fd from the peer, got {len(fds)}: not a wasmshare region message")
        try:
            buf = bytearray(data)
            while len(buf) < _WIRE_PREFIX.size:
                more = sock.recv(_WIRE_PREFIX.size - len(buf))
                if not more:
                    raise fail("peer closed the socket in the middle of a region header")
                buf += more
            magic, hlen = _WIRE_PREFIX.unpack_from(buf)
            if magic != _WIRE_MAGIC or hlen > _WIRE_MAX_HEADER:
                raise fail("peer sent garbage, not a wasmshare region message")
            total = _WIRE_PREFIX.size + hlen
            while len(buf) < total:
                more = sock.recv(total - len(buf))
                if not more:
                    raise fail("peer closed the socket in the middle of a region header")
                buf += more
        except OSError as e:
            raise fail(f"cannot receive a region header: {_os_reason(e)}") from e
        try:
            header = json.loads(bytes(buf[_WIRE_PREFIX.size : total]))
        except (ValueError, UnicodeDecodeError) as e:
            raise fail("peer sent a malformed region header (not JSON)") from e
        if (
            not isinstance(header, dict)
            or header.get("v") != _WIRE_VERSION
            or header.get("access") not in ("rw", "ro")
            or header.get("kind") not in ("memfd", "shm", "file")
            or not isinstance(header.get("nbytes"), int)
            or not (header.get("name") is None or isinstance(header.get("name"), str))
        ):
            raise fail(f"peer sent an invalid region header: {header!r}")
        try:
            return cls.from_fd(
                fds[0],
                access=header["access"],
                nbytes=header["nbytes"],
                kind=header["kind"],
                name=header["name"],
            )
        except RegionError as e:
            raise fail(f"received region is unusable: {e}") from e

    # --- properties ---------------------------------------------------------------

    @property
    def fd(self) -> int:
        """The underlying descriptor, owned by this Region (do not close it). RegionError if closed."""
        return self._require_open_fd()

    @property
    def nbytes(self) -> int:
        """Size in bytes that views may cover (the requested size)."""
        return self._nbytes

    @property
    def mapped_nbytes(self) -> int:
        """``nbytes`` rounded up to ``mmap.PAGESIZE``: the span a loan maps.

        memfd and shm regions made here are sized to this, so every mapped page is backed.
        """
        return _page_round(self._nbytes)

    @property
    def access(self) -> Access:
        """``"rw"`` or ``"ro"``; becomes ``"ro"`` after :meth:`seal`."""
        return self._access

    @property
    def writable(self) -> bool:
        """True when ``access == "rw"``."""
        return self._access == "rw"

    @property
    def kind(self) -> RegionKind:
        """``"memfd"``, ``"shm"`` or ``"file"``."""
        return self._kind

    @property
    def name(self) -> str | None:
        """The shm name without its leading '/', the path for a file region, else None."""
        return self._name

    @property
    def sealed(self) -> bool:
        """True when the fd is a memfd sealed against writes (F_SEAL_WRITE), by anyone."""
        if self._state is not _State.CLOSED and self._res.fd >= 0 and self._kind == "memfd":
            self._sealed = bool(_fd_seals(self._res.fd) & _F_SEAL_WRITE)
        return self._sealed

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._state is _State.CLOSED

    @property
    def address(self) -> int:
        """Base address of the host mapping, for unsafe pointer users.

        Valid only while the region is open and not re-mapped (:meth:`seal` re-maps).
        Raises RegionError if closed.
        """
        with self._lock:
            self._require_open()
            return self._address

    # --- operations ---------------------------------------------------------------

    def seal(self) -> None:
        """Make a memfd region read-only forever (F_SEAL_WRITE|SHRINK|GROW|SEAL).

        The host's read-write mapping is dropped and replaced by a read-only one, so
        ``address`` changes and ``access`` becomes ``"ro"``. Sealing an already-sealed
        region does nothing.

        Raises RegionError for a non-memfd region; while numpy/torch views of the
        read-write mapping are alive; while a writable loan is attached (a loan counts as
        writable unless its ``writable`` is False or its ``access`` is ``"ro"``); or when any
        other shared mapping of the read-write fd exists (EBUSY: Linux refuses F_SEAL_WRITE
        even for a PROT_READ mapping made from a read-write fd, so a read-only zero-copy loan
        or another process's mapping also blocks it). On failure the region is unchanged.
        """
        with self._lock:
            fd = self._require_open_fd()
            if self._kind != "memfd" or _F_ADD_SEALS is None:
                raise RegionError(f"seal() needs a Linux memfd region; {self._label()} is {self._kind}")
            if self.sealed:
                return
            writable_loans = [ln for ln in list(self._loans) if _loan_is_writable(ln)]
            if writable_loans:
                raise RegionError(
                    f"cannot seal {self._label()}: {len(writable_loans)} writable loan(s) are attached; "
                    "release them first"
                )
            was_rw = self._access == "rw"
            if was_rw:
                self._unmap_or_raise()
            try:
                fcntl.fcntl(fd, _F_ADD_SEALS, _SEAL_READ_ONLY)
            except OSError as e:
                if was_rw:
                    self._map("rw")
                if e.errno == errno.EBUSY:
                    n_loans = len(self._loans)
                    who = f"{n_loans} attached loan(s), " if n_loans else ""
                    raise RegionError(
                        f"cannot seal {self._label()}: another shared mapping of its read-write fd "
                        f"exists ({who}another process or a guest); the kernel refuses the seal "
                        "even for mappings made with PROT_READ, so release them first"
                    ) from e
                if e.errno == errno.EPERM:
                    raise RegionError(
                        f"cannot seal {self._label()}: the memfd does not allow new seals "
                        "(created without MFD_ALLOW_SEALING, or already F_SEAL_SEAL)"
                    ) from e
                raise RegionError(f"cannot seal {self._label()}: {_os_reason(e)}") from e
            self._access = "ro"
            if was_rw:
                self._map("ro")
            self._sealed = True

    def array(
        self,
        dtype: npt.DTypeLike = np.uint8,
        shape: int | tuple[int, ...] | None = None,
        *,
        offset: int = 0,
    ) -> np.ndarray[Any, np.dtype[Any]]:
        """A zero-copy numpy view of the host mapping, starting ``offset`` bytes in.

        ``shape=None`` gives a 1-D array of as many whole elements as fit. The array is
        read-only (``writeable=False``) when ``access == "ro"``. It stays valid as long as it
        is referenced, even after :meth:`close` (then it no longer aliases any loan); while it
        lives, :meth:`seal` is refused.

        Raises RegionError if closed, for an offset out of bounds or not aligned to the
        itemsize, or for a shape that does not fit.
        """
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise RegionError(f"invalid numpy dtype {dtype!r}: {e}") from e
        with self._lock:
            mm = self._require_mapping()
            count, dims, off = _resolve_shape(shape, dt.itemsize, offset, self._nbytes, dt)
            arr = np.frombuffer(mm, dtype=dt, count=count, offset=off)
        return arr.reshape(dims)

    def tensor(
        self,
        dtype: torch.dtype | str = "float32",
        shape: int | tuple[int, ...] | None = None,
        *,
        offset: int = 0,
    ) -> torch.Tensor:
        """A zero-copy CPU torch view of the host mapping (torch is imported here, lazily).

        Same bounds, alignment and lifetime rules as :meth:`array`. For a read-only region
        the tensor is backed by read-only memory: torch has no read-only tensors, so its
        "buffer is not writable" warning is suppressed here, and writing to such a tensor
        crashes the process (SIGSEGV) — do not write to it.

        Raises RegionError if torch is missing, for an unknown dtype, or as :meth:`array`.
        """
        try:
            import torch
        except ImportError as e:
            raise RegionError("Region.tensor() needs torch: pip install 'wasmshare[torch]'") from e
        if isinstance(dtype, str):
            tdt = getattr(torch, dtype.removeprefix("torch."), None)
            if not isinstance(tdt, torch.dtype):
                raise RegionError(f"unknown torch dtype {dtype!r}")
        elif isinstance(dtype, torch.dtype):
            tdt = dtype
        else:
            raise RegionError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
        itemsize = tdt.itemsize
        with self._lock:
            mm = self._require_mapping()
            count, dims, off = _resolve_shape(shape, itemsize, offset, self._nbytes, tdt)
            if count == 0:
                return torch.empty(dims, dtype=tdt)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
                t = torch.frombuffer(mm, dtype=tdt, count=count, offset=off)
        return t.reshape(dims)

    def close(self) -> None:
        """Revoke loans, unlink an owned shm name, close the fd, drop the host mapping.

        Safe to call twice. Each attached loan's ``_on_region_closed()`` is called first; if
        one raises, closing still completes and the first such error is re-raised. Views
        still referenced keep their pages (never dangling) but no longer alias any loan.
        """
        with self._lock:
            if self._state is not _State.OPEN:
                return
            self._state = _State.CLOSING
            first_error: BaseException | None = None
            try:
                for loan in list(self._loans):
                    try:
                        loan._on_region_closed()
                    except Exception as e:  # a broken loan must not keep the region open
                        if first_error is None:
                            first_error = e
                self._loans.clear()
                mm, self._mm = self._mm, None
                if mm is not None:
                    try:
                        mm.close()
                    except BufferError:
                        pass  # views alive: they keep the pages until garbage collected
                self._address = 0
                if self._finalizer is not None:
                    self._finalizer()
            finally:
                self._state = _State.CLOSED
            if first_error is not None:
                raise first_error

    def unlink(self) -> None:
        """Remove the shm name now; every open Region of it keeps working.

        An owning Region will then not unlink it again on close.
        Raises RegionError if closed, not shm, nameless, or the name is already gone.
        """
        with self._lock:
            self._require_open()
            if self._kind != "shm" or self._name is None:
                raise RegionError(f"unlink() needs a named shm region; {self._label()} has no shm name")
            path = "/" + self._name
            self._res.unlink_name = None
            try:
                _shm_unlink(path)
            except FileNotFoundError as e:
                raise RegionError(f"shared memory object {path!r} was already unlinked") from e
            except OSError as e:
                raise RegionError(f"cannot unlink shared memory object {path!r}: {_os_reason(e)}") from e

    def __enter__(self) -> Region:
        self._require_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        label = f" {self._name!r}" if self._name is not None else ""
        extra = " sealed" if self._sealed else ""
        return f"<Region {self._kind}{label} nbytes={self._nbytes} {self._access}{extra} {self._state.value}>"

    # --- for loan.py ------------------------------------------------------------

    def _attach_loan(self, loan: object) -> None:
        """Track ``loan`` (weakly); close() calls its ``_on_region_closed()``. RegionError if closed."""
        with self._lock:
            if self._state is not _State.OPEN:
                raise RegionError(f"{self._label()} is closed")
            self._loans.add(loan)

    def _detach_loan(self, loan: object) -> None:
        """Stop tracking ``loan``; never raises (works while closing and after close)."""
        self._loans.discard(loan)

    # --- internals --------------------------------------------------------------

    def _label(self) -> str:
        return f"region {self._name}" if self._name is not None else f"region {self._kind}"

    def _require_open(self) -> None:
        if self._state is _State.CLOSED:
            raise RegionError(f"{self._label()} is closed")

    def _require_open_fd(self) -> int:
        self._require_open()
        return self._res.fd

    def _require_mapping(self) -> mmap.mmap:
        self._require_open()
        if self._mm is None:
            raise RegionError(f"{self._label()} has no host mapping")
        return self._mm

    def _unmap_or_raise(self) -> None:
        mm = self._mm
        if mm is None:
            return
        try:
            mm.close()
        except BufferError as e:
            raise RegionError(
                f"cannot seal {self._label()}: numpy arrays or torch tensors from array()/tensor() "
                "still view its writable mapping; delete them (and anything derived from them) first"
            ) from e
        self._mm = None
        self._address = 0


def _write_all(fd: int, data: memoryview) -> None:
    pos = 0
    while pos < data.nbytes:
        pos += os.pwrite(fd, data[pos:], pos)


_CONSTRUCT = object()
