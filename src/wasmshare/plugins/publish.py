"""Publishing a schema blob once for many plugin processes, and how long it lives.

:meth:`Publication.publish` copies a blob (bytes, a file, or a region) into shared
memory once, makes it read-only, validates it *after* it can no longer change, and only
then hands it out. Two ways to reach it from another process:

* **by fd** (default): a Linux memfd sealed with ``F_SEAL_WRITE|SHRINK|GROW|SEAL``, sent
  over a Unix socket (``SCM_RIGHTS``). The kernel counts references: the memory lives
  while any process holds the fd or a mapping, and is freed when the last one goes,
  however it goes (exit, crash, ``SIGKILL``). Nothing can leak and nobody can write it.
* **by name** (``name=...``): a POSIX shm object (``/dev/shm/NAME``, mode 0400) for
  plugins the host did not start. Names outlive processes, so a lease scheme unlinks it:
  every holder (the publisher, each plugin) keeps a *shared* ``flock`` on its open fd,
  which the kernel drops when the process dies, even by ``SIGKILL``. Whoever leaves and
  then gets the lock *exclusively* knows nobody holds it and unlinks the name: the last
  plugin to close it, or the publisher's reaper thread, which waits on the pidfds of
  the plugins it knows about and checks after each one exits. A blob whose every
  holder was killed is removed by the next :meth:`Publication.publish` of that name or
  by :func:`sweep_stale_blobs`. Only the kernel's file mode protects a named blob
  from its owner (no sealing on shm); loans of it are read-only all the same.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from ..errors import BlobFormatError, PluginError, RegionError
from ..region import Region
from ._safe_input import open_user_file
from .blob import BLOB_FILE_MAX_BYTES, SchemaBlob

__all__ = ["Publication", "BlobLease", "sweep_stale_blobs", "blob_holders"]

BlobSource = bytes | bytearray | memoryview | str | os.PathLike[str] | Region

SHM_DIR = Path("/dev/shm")
STALE_AFTER_S = 10.0
"""A named blob nobody holds is only swept once it is this old (its publisher may be filling it)."""


def _shm_open(path: str, flags: int, mode: int = 0) -> int:
    from .._libc import shm_open

    return shm_open(path, flags, mode)


def _shm_unlink(path: str) -> None:
    from .._libc import shm_unlink

    shm_unlink(path)


def _bare(name: str) -> str:
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or bare in (".", ".."):
        raise PluginError(f"invalid blob name {name!r}: use 1-200 characters from [A-Za-z0-9._-]")
    return bare


def _shm_open_regular(path: str) -> int:
    """Open shm ``path`` read-only without blocking; OSError unless it is a regular file.

    Anyone may create names in ``/dev/shm``: a FIFO there would block a plain open.
    """
    fd = _shm_open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a FIFO or device in /dev/shm?)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _unlink_if_unused(path: str, inode: int) -> bool:
    """Unlink shm ``path`` if it still names ``inode`` and no process holds a lease on it."""
    try:
        fd = _shm_open_regular(path)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_ino != inode:
            return False  # the name was reused for a new blob
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # somebody still holds it
        try:
            _shm_unlink(path)
        except FileNotFoundError:
            return False
        return True
    finally:
        os.close(fd)


def _is_blob(path: Path) -> bool:
    """Whether the shm object at ``path`` starts with the blob magic (never touch anyone else's)."""
    try:
        fd, _ = open_user_file(path, label=f"shared memory object {str(path)!r}", max_bytes=None)
    except PluginError:
        return False  # not there any more, or not a regular file (a FIFO would block a plain open)
    try:
        return os.pread(fd, 8, 0) == b"WSSCHEMA"
    except OSError:
        return False
    finally:
        os.close(fd)


def sweep_stale_blobs(prefix: str = "", *, min_age_s: float = STALE_AFTER_S) -> list[str]:
    """Unlink named blobs under ``/dev/shm`` that no process holds (every holder died).

    Only names starting with ``prefix`` and carrying the blob magic are considered, and
    only those older than ``min_age_s``. Returns the names removed.
    """
    removed: list[str] = []
    if not SHM_DIR.is_dir():
        return removed
    now = time.time()
    for entry in SHM_DIR.iterdir():
        if not entry.name.startswith(prefix):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue
        if now - st.st_ctime < min_age_s or not _is_blob(entry):
            continue
        if _unlink_if_unused("/" + entry.name, st.st_ino):
            removed.append(entry.name)
    return removed


def blob_holders(inode: int, device: int) -> list[int]:
    """Pids of this user's processes that hold an fd to, or map, the file ``(device, inode)``.

    Reads ``/proc/PID/fd`` and ``/proc/PID/maps``; processes it cannot read are skipped.
    """
    holders = []
    maps_dev = f"{os.major(device):02x}:{os.minor(device):02x}"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        pid = int(proc.name)
        found = False
        try:
            for fd in (proc / "fd").iterdir():
                try:
                    st = os.stat(fd)
                except OSError:
                    continue
                if st.st_ino == inode and st.st_dev == device:
                    found = True
                    break
            if not found:
                with open(proc / "maps", encoding="ascii", errors="replace") as f:
                    for line in f:
                        parts = line.split(None, 5)
                        if len(parts) >= 5 and parts[4] == str(inode) and parts[3] == maps_dev:
                            found = True
                            break
        except OSError:
            continue
        if found:
            holders.append(pid)
    return holders


class _Reaper:
    """Unlinks a released named blob once every watched plugin process has exited."""

    def __init__(self, path: str, inode: int) -> None:
        self.path = path
        self.inode = inode
        self.pidfds: dict[int, int] = {}
        self.lock = threading.Lock()
        self.released = False
        self.done = False
        self.thread: threading.Thread | None = None
        self.wake_r, self.wake_w = os.pipe()

    def watch(self, pid: int) -> None:
        if self.done:
            return
        try:
            fd = os.pidfd_open(pid)
        except (OSError, AttributeError):
            return  # already gone, or no pidfds (old kernel): the plugin's own exit unlinks
        with self.lock:
            self.pidfds[fd] = pid
        os.write(self.wake_w, b"w")

    def release(self) -> None:
        """The publisher is done: unlink now if nobody holds the blob, else when the last watched one exits."""
        with self.lock:
            self.released = True
        if _unlink_if_unused(self.path, self.inode):
            self.stop()
            return
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="wasmshare-blob-reaper", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while not self.done:
            with self.lock:
                fds = list(self.pidfds)
            if not fds:
                break  # nobody left to wait for: holders we never knew unlink it as they leave
            ready, _, _ = select.select([*fds, self.wake_r], [], [])
            if self.wake_r in ready:
                os.read(self.wake_r, 64)
            exited = [fd for fd in ready if fd != self.wake_r]
            with self.lock:
                for fd in exited:
                    self.pidfds.pop(fd, None)
                    os.close(fd)
            if exited and _unlink_if_unused(self.path, self.inode):
                break
        self.stop()

    def stop(self) -> None:
        with self.lock:
            if self.done:
                return
            self.done = True
            for fd in self.pidfds:
                os.close(fd)
            self.pidfds.clear()
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class Publication:
    """A schema blob published once, read-only, for any number of plugin processes.

    Make one with :meth:`publish`. ``region`` is the publisher's own read-only view;
    :meth:`send` hands the blob to a process over a Unix socket, or a plugin opens it by
    ``name`` (:class:`BlobLease`). :meth:`release` (or ``with``) says the publisher is
    done: plugins that hold the blob keep it, and the memory (and the name) goes when the
    last one exits. Safe to call twice.
    """

    def __init__(
        self, region: Region, *, name: str | None, inode: int, device: int, _token: object = None
    ) -> None:
        if _token is not _CONSTRUCT:
            raise PluginError("use Publication.publish(blob)")
        self.region = region
        self.name = name
        """The shm name plugins attach to (without '/'), or None for an fd-only (memfd) blob."""
        self.nbytes: int = region.nbytes
        self.inode = inode
        self.device = device
        self._reaper = _Reaper("/" + name, inode) if name is not None else None
        self._released = False
        self._schema: SchemaBlob | None = None
        self._finalizer = weakref.finalize(self, _release_quietly, region, self._reaper)

    @classmethod
    def publish(cls, blob: BlobSource, *, name: str | None = None, check_json: bool = True) -> Publication:
        """Publish ``blob`` (bytes, a file path, or a region) as a read-only shared blob.

        The blob is copied once into a sealed memfd (or, with ``name``, into a new shm
        object of that name, mode 0400), then validated (:class:`SchemaBlob`, including the
        JSON checksum unless ``check_json=False``) from the memory plugins will read.
        A sealed memfd region is published as is, without a copy.

        Raises :class:`BlobFormatError` for an invalid blob, :class:`PluginError` when the
        name is taken by a live blob or the source cannot be read; in every failure case
        nothing stays published (the memfd is closed, the name unlinked).
        """
        if name is None:
            region = _sealed_memfd(blob)
        else:
            region = _named_shm(blob, _bare(name))
        try:
            st = os.fstat(region.fd)
            schema = SchemaBlob(region.array(), check_json=check_json)
        except BaseException:
            if name is not None:
                try:
                    _shm_unlink("/" + _bare(name))
                except OSError:
                    pass
            region.close()
            raise
        pub = cls(
            region,
            name=None if name is None else _bare(name),
            inode=st.st_ino,
            device=st.st_dev,
            _token=_CONSTRUCT,
        )
        pub._schema = schema
        return pub

    @property
    def schema(self) -> SchemaBlob:
        """A reader of the published blob, over the publisher's own mapping (no copy)."""
        self.require_open()
        if self._schema is None:
            self._schema = SchemaBlob(self.region.array(), check_json=False)
        return self._schema

    @property
    def sealed(self) -> bool:
        """True for a sealed memfd: no process can ever write the bytes."""
        return not self.region.closed and self.region.sealed

    @property
    def released(self) -> bool:
        """True once :meth:`release` ran."""
        return self._released

    def require_open(self) -> None:
        """Raise :class:`PluginError` once the publication is released (its blob may be gone)."""
        if self._released:
            raise PluginError("the publication was released; publish the blob again")

    def send(self, sock: Any) -> None:
        """Hand the blob's fd to the process at the other end of a Unix socket (see :meth:`Region.send`)."""
        self.require_open()
        self.region.send(sock)

    def watch(self, pid: int) -> None:
        """Count process ``pid`` as a holder: after :meth:`release`, the name is unlinked once it exits.

        Only meaningful for a named blob; :class:`PluginHost` watches the plugins it starts.
        """
        if self._reaper is not None:
            self._reaper.watch(pid)

    def holders(self) -> list[int]:
        """Pids of this user's processes that hold or map the blob (this one included while unreleased)."""
        return blob_holders(self.inode, self.device)

    def name_exists(self) -> bool:
        """Whether the blob's shm name is still linked (False for an fd-only blob)."""
        if self.name is None:
            return False
        try:
            return os.stat(SHM_DIR / self.name).st_ino == self.inode
        except OSError:
            return False

    def release(self) -> None:
        """The publisher is done with the blob; plugins holding it keep it. Safe to call twice."""
        if self._released:
            return
        self._released = True
        if self._schema is not None:
            self._schema.release()
            self._schema = None
        self._finalizer.detach()
        _release_quietly(self.region, self._reaper)

    close = release

    def __enter__(self) -> Publication:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        how = f"name {self.name!r}" if self.name else "memfd"
        state = "released" if self._released else ("sealed" if self.sealed else "read-only")
        return f"<Publication {self.nbytes:,} bytes, {how}, {state}>"


def _release_quietly(region: Region, reaper: _Reaper | None) -> None:
    try:
        region.close()  # closes the fd: drops the publisher's lease
    except Exception:  # noqa: BLE001 - releasing must not fail
        pass
    if reaper is not None:
        reaper.release()


# --------------------------------------------------------------------------- filling the memory


def _source_size(blob: BlobSource) -> tuple[int, int | None, memoryview | None]:
    """(size, fd to copy from or None, bytes to copy or None); the caller closes the fd."""
    if isinstance(blob, Region):
        if blob.closed:
            raise PluginError(f"cannot publish closed region {blob!r}")
        return blob.nbytes, os.dup(blob.fd), None
    if isinstance(blob, (bytes, bytearray, memoryview)):
        mv = memoryview(blob).cast("B")
        return mv.nbytes, None, mv
    path = os.fspath(blob)
    fd, size = open_user_file(
        path, label=f"blob file {path!r}", max_bytes=BLOB_FILE_MAX_BYTES, limit_name="BLOB_FILE_MAX_BYTES"
    )
    return size, fd, None


def _copy_into(dst_fd: int, size: int, src_fd: int | None, data: memoryview | None) -> None:
    if data is not None:
        pos = 0
        while pos < size:
            pos += os.pwrite(dst_fd, data[pos:], pos)
        return
    assert src_fd is not None
    # In-kernel copies only: a user-space bounce buffer of this size would stay in the
    # publisher's heap (glibc raises its mmap threshold after the first large free).
    pos = 0
    use_sendfile = False
    while pos < size:
        if not use_sendfile:
            try:
                n = os.copy_file_range(src_fd, dst_fd, size - pos, pos, pos)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_sendfile = True  # across filesystems (a file into tmpfs): sendfile
                os.lseek(dst_fd, pos, os.SEEK_SET)
                continue
        else:
            n = os.sendfile(dst_fd, src_fd, pos, min(size - pos, 1 << 30))
        if n == 0:
            raise PluginError(f"blob source ended after {pos} of {size} bytes")
        pos += n


def _sealed_memfd(blob: BlobSource) -> Region:
    if isinstance(blob, Region) and blob.kind == "memfd" and blob.sealed:
        return Region.from_fd(os.dup(blob.fd), access="ro", nbytes=blob.nbytes)
    size, src_fd, data = _source_size(blob)
    try:
        if size < 64:
            raise BlobFormatError(f"schema blob is {size} bytes, shorter than its 64-byte header")
        if data is not None:
            return Region.from_bytes(data, seal=True)
        region = Region.create(size)
        try:
            _copy_into(region.fd, size, src_fd, None)
            region.seal()
        except BaseException:
            region.close()
            raise
        return region
    except (OSError, RegionError) as e:
        raise PluginError(f"cannot publish the blob: {e}") from e
    finally:
        if src_fd is not None:
            os.close(src_fd)


def _named_shm(blob: BlobSource, bare: str) -> Region:
    path = "/" + bare
    size, src_fd, data = _source_size(blob)
    fd = -1
    try:
        if size < 64:
            raise BlobFormatError(f"schema blob is {size} bytes, shorter than its 64-byte header")
        for attempt in range(2):
            try:
                fd = _shm_open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                break
            except FileExistsError:
                st = os.stat(SHM_DIR / bare)
                if attempt == 0 and _is_blob(SHM_DIR / bare) and _unlink_if_unused(path, st.st_ino):
                    continue  # a stale blob whose every holder died
                raise PluginError(
                    f"a blob named {bare!r} is already published and in use; pick another name"
                ) from None
        # The publisher's lease, taken before the contents are visible under the name.
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            os.ftruncate(fd, size)  # exactly the blob: an attacher's region is the blob's size
            _copy_into(fd, size, src_fd, data)
            os.fchmod(fd, 0o400)
            region = Region.from_fd(fd, access="ro", nbytes=size, kind="shm", name=bare)
        except BaseException:
            _shm_unlink(path)
            raise
        fd = -1  # owned by the region now
        return region
    except (OSError, RegionError) as e:
        raise PluginError(f"cannot publish the blob as {bare!r}: {e}") from e
    finally:
        if fd >= 0:
            os.close(fd)
        if src_fd is not None:
            os.close(src_fd)


# --------------------------------------------------------------------------- the plugin side


class BlobLease:
    """A plugin's hold on a named blob: its read-only region plus a shared lease.

    :meth:`attach` opens the name and takes the lease; :meth:`close` drops both and, if
    this was the last holder (the publisher released it and no other plugin holds it),
    unlinks the name. A plugin killed before closing loses its lease with its process;
    the publisher's reaper or the last surviving holder then unlinks the name.
    """

    def __init__(self, region: Region, name: str, inode: int, _token: object = None) -> None:
        if _token is not _CONSTRUCT:
            raise PluginError("use BlobLease.attach(name)")
        self.region = region
        self.name = name
        self.inode = inode
        self._closed = False

    @classmethod
    def attach(cls, name: str) -> BlobLease:
        """Open the blob published as ``name``, read-only, and hold a lease on it.

        Raises :class:`PluginError` when no such blob exists or it was withdrawn.
        """
        bare = _bare(name)
        path = "/" + bare
        try:
            fd = _shm_open_regular(path)
        except FileNotFoundError as e:
            raise PluginError(
                f"no blob is published as {bare!r} (never published, or already released)"
            ) from e
        except OSError as e:
            raise PluginError(f"cannot open blob {bare!r}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            inode = os.fstat(fd).st_ino
            try:
                linked = os.stat(SHM_DIR / bare).st_ino == inode
            except OSError:
                linked = False
            if not linked:
                raise PluginError(f"blob {bare!r} was withdrawn while attaching")
            region = Region.from_fd(fd, access="ro", kind="shm", name=bare)
        except BaseException:
            os.close(fd)
            raise
        return cls(region, bare, inode, _token=_CONSTRUCT)

    def close(self) -> None:
        """Drop the lease; unlink the name if nobody holds it any more. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.region.close()
        _unlink_if_unused("/" + self.name, self.inode)

    def __enter__(self) -> BlobLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CONSTRUCT = object()
