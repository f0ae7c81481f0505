"""Reading the files a user names: opened without blocking, checked before one byte is read.

A path from the user may name a FIFO (a plain ``open`` blocks until some writer comes,
perhaps never), a device such as ``/dev/zero`` (a read that never ends), a directory,
or a file far larger than its kind can be. :func:`open_user_file` opens without
blocking, refuses anything but a regular file and anything over the caller's size
limit, before one byte is read; :func:`read_user_file` then reads at most that limit.
Every file the plugin layer reads on a user's behalf (programs, plugin modules, blob
files, artifact metadata, named blobs under ``/dev/shm``) goes through them.
"""

from __future__ import annotations

import os
import stat

from ..errors import PluginError

__all__ = ["open_user_file", "read_user_file"]

_READ_CHUNK_BYTES = 1 << 20


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "an unknown kind of file"


def _refuse_unless_regular(st: os.stat_result, label: str, error: type[PluginError]) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise error(f"cannot read {label}: it is {_file_kind(st.st_mode)}, not a regular file")


def open_user_file(
    path: str | os.PathLike[str],
    *,
    label: str,
    max_bytes: int | None,
    limit_name: str = "",
    error: type[PluginError] = PluginError,
) -> tuple[int, int]:
    """Open the regular file ``path`` read-only; returns ``(fd, size_bytes)``, the caller closes ``fd``.

    ``label`` names the file in messages (``"plugin module '/x.wasm'"``); ``max_bytes``
    (None: no limit) and ``limit_name`` (the constant behind it) give the size limit.
    Raises ``error`` (a :class:`PluginError`), in one line, when the path cannot be
    opened, is not a regular file (FIFO, device, directory, socket) or is over the
    limit. The ``stat`` before the open spares devices an open's side effects; the
    ``fstat`` after it, on the fd itself, is the check that counts (the path may have
    been swapped in between). ``O_NONBLOCK`` keeps the open of a FIFO from waiting for
    a writer; the fd is made blocking again once it is known to be a regular file.
    """
    name = os.fspath(path)
    try:
        _refuse_unless_regular(os.stat(name), label, error)
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror or e}") from e
    try:
        st = os.fstat(fd)
        _refuse_unless_regular(st, label, error)
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(
                f"cannot read {label}: it is {st.st_size:,} bytes, over {_limit(max_bytes, limit_name)}"
            )
        os.set_blocking(fd, True)
    except OSError as e:
        os.close(fd)
        raise error(f"cannot read {label}: {e.strerror or e}") from e
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_user_file(
    path: str | os.PathLike[str],
    *,
    label: str,
    max_bytes: int,
    limit_name: str = "",
    error: type[PluginError] = PluginError,
) -> bytes:
    """The contents of the regular file ``path``, at most ``max_bytes`` of them.

    Checks as :func:`open_user_file` does, before reading. A file that grows past the
    limit while it is read (or whose size ``stat`` does not tell, as in ``/proc``) is
    refused once the limit is crossed, so at most ``max_bytes + 1`` bytes are ever held.
    """
    fd, size = open_user_file(path, label=label, max_bytes=max_bytes, limit_name=limit_name, error=error)
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(size)
            more: list[bytes] = []
            total = len(data)
            while chunk := f.read(min(_READ_CHUNK_BYTES, max_bytes + 1 - total)):
                more.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise error(
                        f"cannot read {label}: it grew past {_limit(max_bytes, limit_name)} as it was read"
                    )
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror or e}") from e
    return b"".join([data, *more]) if more else data


def _limit(max_bytes: int, limit_name: str) -> str:
    return f"the {max_bytes:,}-byte limit" + (f" ({limit_name})" if limit_name else "")
