"""Messages between the engine and a controller worker: framed JSON plus an optional payload."""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

CMD_STEP = 1
CMD_MESSAGE = 2

_HEADER = struct.Struct("<II")  # json length, payload length


def send_message(sock: socket.socket, message: dict[str, Any], payload: bytes = b"") -> None:
    """Send one framed message: a JSON header and an optional binary payload."""
    data = json.dumps(message).encode()
    sock.sendall(_HEADER.pack(len(data), len(payload)) + data + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Receive one framed message."""
    json_len, payload_len = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    message = json.loads(_recv_exact(sock, json_len))
    payload = _recv_exact(sock, payload_len) if payload_len else b""
    return message, payload
