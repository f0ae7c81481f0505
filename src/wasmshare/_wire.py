"""The message of :meth:`Region.send` / :meth:`Region.receive`: one fd and a small JSON header.

Layout: the magic ``b"WSRG"``, a big-endian uint32 header length, then the JSON header;
the fd travels as ``SCM_RIGHTS`` ancillary data with the first bytes. The header is
checked field by field, because the peer may be hostile.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from ._shm import Resources, os_reason
from .errors import RegionError

MAGIC = b"WSRG"
PREFIX = struct.Struct(">4sI")
MAX_HEADER_BYTES = 64 * 1024
VERSION = 1


def send(sock: socket.socket, fd: int, header: dict[str, Any]) -> None:
    """Send ``fd`` with ``header`` (``VERSION`` is added as ``"v"``); raises OSError."""
    body = json.dumps({"v": VERSION, **header}, separators=(",", ":")).encode()
    msg = PREFIX.pack(MAGIC, len(body)) + body
    sent = socket.send_fds(sock, [msg], [fd])
    if sent < len(msg):
        sock.sendall(msg[sent:])


def receive(sock: socket.socket) -> tuple[dict[str, Any], Resources]:
    """Receive one message: its checked header and the received fd, owned by the caller.

    Raises RegionError if the peer closed the socket, sent no fd or several, or sent
    garbage; every received fd is closed then.
    """
    try:
        data, fds, _flags, _addr = socket.recv_fds(sock, MAX_HEADER_BYTES + PREFIX.size, 4)
    except OSError as e:
        raise RegionError(f"cannot receive a region from the socket: {os_reason(e)}") from e
    owned = [Resources(f, None) for f in fds]

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
        while len(buf) < PREFIX.size:
            more = sock.recv(PREFIX.size - len(buf))
            if not more:
                raise fail("peer closed the socket in the middle of a region header")
            buf += more
        magic, hlen = PREFIX.unpack_from(buf)
        if magic != MAGIC or hlen > MAX_HEADER_BYTES:
            raise fail("peer sent garbage, not a wasmshare region message")
        total = PREFIX.size + hlen
        while len(buf) < total:
            more = sock.recv(total - len(buf))
            if not more:
                raise fail("peer closed the socket in the middle of a region header")
            buf += more
    except OSError as e:
        raise fail(f"cannot receive a region header: {os_reason(e)}") from e
    try:
        header = json.loads(bytes(buf[PREFIX.size : total]))
    except (ValueError, UnicodeDecodeError) as e:
        raise fail("peer sent a malformed region header (not JSON)") from e
    if (
        not isinstance(header, dict)
        or header.get("v") != VERSION
        or header.get("access") not in ("rw", "ro")
        or header.get("kind") not in ("memfd", "shm", "file")
        or not isinstance(header.get("nbytes"), int)
        or not (header.get("name") is None or isinstance(header.get("name"), str))
    ):
        raise fail(f"peer sent an invalid region header: {header!r}")
    return header, owned[0]
