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
import mmap
import os
import socket
import stat
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from . import _wire
from ._checks import MAX_REGION_BYTES, check_access, check_nbytes, loan_is_writable, resolve_shape
from ._libc import page_round, shm_open, shm_unlink
from ._shm import (
    F_ADD_SEALS,
    F_SEAL_WRITE,
    HAS_MEMFD,
    SEAL_READ_ONLY,
    RegionKind,
    Resources,
    create_shm_fd,
    fd_seals,
    new_anonymous_fd,
    normalize_name,
    open_shm_fd,
    os_reason,
    temporary_shm_name,
    write_all,
)
from .errors import RegionError

if TYPE_CHECKING:
    import torch

__all__ = ["Access", "Region", "RegionKind", "MAX_REGION_BYTES"]

Access = Literal["rw", "ro"]


class _State(enum.Enum):
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


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
        self._res = Resources(-1, None)
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
        self._res = Resources(fd, unlink_name)
        # Registered before anything else can fail: holds only the Resources, never self.
        self._finalizer = weakref.finalize(self, Resources.release, self._res)
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
        self._sealed = kind == "memfd" and bool(fd_seals(fd) & F_SEAL_WRITE)
        self._state = _State.OPEN
        return self

    def _map(self, access: Access) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if access == "rw" else 0)
        # The host maps nbytes (the kernel rounds the mapping up to whole pages anyway);
        # CPython refuses a length past the end of a regular file.
        try:
            mm = mmap.mmap(self._res.fd, self._nbytes, flags=mmap.MAP_SHARED, prot=prot)
        except (OSError, ValueError) as e:
            reason = os_reason(e) if isinstance(e, OSError) else str(e)
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
        n = check_nbytes(nbytes)
        size = page_round(n)
        if name is None:
            fd, kind = new_anonymous_fd(size)
            return cls._setup(fd, nbytes=n, access="rw", kind=kind, name=None, unlink_name=None)
        bare = normalize_name(name)
        path = "/" + bare
        fd = create_shm_fd(path, unlink_now=False)
        res = Resources(fd, path)
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            res.release()
            raise RegionError(
                f"cannot size shared memory object {path!r} to {size} bytes: {os_reason(e)}"
            ) from e
        return cls._setup(fd, nbytes=n, access="rw", kind="shm", name=bare, unlink_name=path)

    @classmethod
    def open(cls, name: str, *, access: Access = "rw") -> Region:
        """Open an existing POSIX shm object by name; the Region does not own the name.

        ``nbytes`` is the object's size, i.e. the creator's :attr:`mapped_nbytes` (whole
        pages), not necessarily the creator's ``nbytes``. close() leaves the name in place.

        Raises RegionError if the name is invalid or missing, or access is denied.
        """
        acc = check_access(access)
        bare = normalize_name(name)
        fd, size = open_shm_fd("/" + bare, acc, MAX_REGION_BYTES)
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
        acc = check_access(access)
        spath = os.fspath(path)
        flags = (os.O_RDWR if acc == "rw" else os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(spath, flags)
        except OSError as e:
            raise RegionError(f"cannot open file {spath!r} ({acc}): {os_reason(e)}") from e
        res = Resources(fd, None)
        try:
            st = os.fstat(fd)
        except OSError as e:
            res.release()
            raise RegionError(f"cannot stat file {spath!r}: {os_reason(e)}") from e
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
        n = check_nbytes(mv.nbytes, "len(data)")
        size = page_round(n)
        if HAS_MEMFD:
            fd, kind = new_anonymous_fd(size)
            res = Resources(fd, None)
            try:
                write_all(fd, mv)
                if seal:
                    if F_ADD_SEALS is None:
                        raise RegionError("this platform cannot seal a memfd")
                    fcntl.fcntl(fd, F_ADD_SEALS, SEAL_READ_ONLY)
            except OSError as e:
                res.release()
                raise RegionError(f"cannot fill memfd region with {n} bytes: {os_reason(e)}") from e
            except BaseException:
                res.release()
                raise
            return cls._setup(
                fd, nbytes=n, access="ro" if seal else "rw", kind=kind, name=None, unlink_name=None
            )
        # Portable fallback: fill a named shm object, keep only a read-only fd of it.
        path = temporary_shm_name()
        wfd = create_shm_fd(path, unlink_now=False)
        res = Resources(wfd, path)
        try:
            os.ftruncate(wfd, size)
            write_all(wfd, mv)
            fd = shm_open(path, os.O_RDONLY, 0) if seal else os.dup(wfd)
        except OSError as e:
            res.release()
            raise RegionError(f"cannot fill shm region with {n} bytes: {os_reason(e)}") from e
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
        acc = check_access(access)
        if kind not in ("memfd", "shm", "file"):
            raise RegionError(f"kind must be 'memfd', 'shm' or 'file', got {kind!r}")
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 0:
            raise RegionError(f"fd must be a non-negative int, got {fd!r}")
        try:
            st = os.fstat(fd)
            mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as e:
            raise RegionError(f"fd {fd} is not usable: {os_reason(e)}") from e
        if stat.S_ISDIR(st.st_mode) or not (stat.S_ISREG(st.st_mode) or kind == "shm"):
            raise RegionError(f"fd {fd} is not a regular file or shared memory object; cannot map it")
        if nbytes is None:
            if st.st_size <= 0:
                raise RegionError(f"fd {fd} has size 0; a region needs at least 1 byte")
            n = check_nbytes(st.st_size, f"size of fd {fd}")
        else:
            n = check_nbytes(nbytes)
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
        if acc == "rw" and fd_seals(fd) & F_SEAL_WRITE:
            raise RegionError(f"fd {fd} is sealed read-only (F_SEAL_WRITE); use access='ro'")
        bare = normalize_name(name) if (name is not None and kind == "shm") else name
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
            header = {
                "nbytes": self._nbytes,
                "access": self._access,
                "kind": self._kind,
                "name": self._name,
                "sealed": self.sealed,
            }
            try:
                _wire.send(sock, fd, header)
            except OSError as e:
                raise RegionError(f"cannot send {self._label()} over the socket: {os_reason(e)}") from e

    @classmethod
    def receive(cls, sock: socket.socket) -> Region:
        """Receive a region sent by :meth:`send`; the new Region owns the received fd.

        ``sealed`` is read from the fd itself (F_GET_SEALS), not trusted from the header.
        A received shm name is never unlinked by this side.

        Raises RegionError if the peer closed the socket, sent no fd, or sent garbage.
        """
        header, received = _wire.receive(sock)
        try:
            return cls.from_fd(
                received.fd,
                access=header["access"],
                nbytes=header["nbytes"],
                kind=header["kind"],
                name=header["name"],
            )
        except RegionError as e:
            received.release()
            raise RegionError(f"received region is unusable: {e}") from e

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
        return page_round(self._nbytes)

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
            self._sealed = bool(fd_seals(self._res.fd) & F_SEAL_WRITE)
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
            if self._kind != "memfd" or F_ADD_SEALS is None:
                raise RegionError(f"seal() needs a Linux memfd region; {self._label()} is {self._kind}")
            if self.sealed:
                return
            writable_loans = [ln for ln in list(self._loans) if loan_is_writable(ln)]
            if writable_loans:
                raise RegionError(
                    f"cannot seal {self._label()}: {len(writable_loans)} writable loan(s) are attached; "
                    "release them first"
                )
            was_rw = self._access == "rw"
            if was_rw:
                self._unmap_or_raise()
            try:
                fcntl.fcntl(fd, F_ADD_SEALS, SEAL_READ_ONLY)
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
                raise RegionError(f"cannot seal {self._label()}: {os_reason(e)}") from e
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
            count, dims, off = resolve_shape(shape, dt.itemsize, offset, self._nbytes, dt)
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
            count, dims, off = resolve_shape(shape, itemsize, offset, self._nbytes, tdt)
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
                shm_unlink(path)
            except FileNotFoundError as e:
                raise RegionError(f"shared memory object {path!r} was already unlinked") from e
            except OSError as e:
                raise RegionError(f"cannot unlink shared memory object {path!r}: {os_reason(e)}") from e

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

    def attach_loan(self, loan: object) -> None:
        """Track ``loan`` (weakly); close() calls its ``_on_region_closed()``. RegionError if closed."""
        with self._lock:
            if self._state is not _State.OPEN:
                raise RegionError(f"{self._label()} is closed")
            self._loans.add(loan)

    def detach_loan(self, loan: object) -> None:
        """Stop tracking ``loan``; never raises (works while closing and after close)."""
        self._loans.discard(loan)

    _attach_loan = attach_loan
    _detach_loan = detach_loan

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


_CONSTRUCT = object()
