"""Framed messages over a Unix socket between a host and its worker processes.

Each message is a JSON object plus an optional binary payload, behind an 8-byte header of
their lengths. The controller workers and the plugin workers both speak it; the JSON part is
bounded so a confused peer cannot make the other side allocate without limit.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import time
from typing import Any

_HEADER = struct.Struct("<II")  # JSON length, payload length
MAX_JSON = 1 << 20


def send_message(sock: socket.socket, message: dict[str, Any], payload: bytes = b"") -> None:
    """Send one framed message."""
    data = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data), len(payload)) + data + payload)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes; EOFError if the peer closes first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_message(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """Receive one framed message; EOFError if the peer closed, ValueError for garbage."""
    json_len, payload_len = _HEADER.unpack(recv_exact(sock, _HEADER.size))
    if json_len > MAX_JSON:
        raise ValueError(f"message header of {json_len} bytes is too large")
    message = json.loads(recv_exact(sock, json_len))
    if not isinstance(message, dict):
        raise ValueError("message is not a JSON object")
    payload = recv_exact(sock, payload_len) if payload_len else b""
    return message, payload


def connect_unix(path: str, timeout_s: float, server: subprocess.Popen[bytes] | None = None) -> socket.socket:
    """Connect to the Unix socket at ``path``, retrying while its ``server`` process starts.

    Raises ChildProcessError when ``server`` exits first, TimeoutError when nothing
    listens within ``timeout_s`` (both OSError, with a one-line message)."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = None if server is None else server.poll()
        if code is not None:
            raise ChildProcessError(f"the wasmshare controller service exited with code {code}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the wasmshare controller service did not listen at {path} within {timeout_s:.0f} s"
                ) from None
            time.sleep(0.05)
