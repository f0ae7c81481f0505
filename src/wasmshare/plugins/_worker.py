"""A plugin process: one wasm guest with the schema blob, answering check queries.

Started by :class:`~wasmshare.plugins.PluginHost` as ``python -m wasmshare.plugins._worker FD``.
FD is a Unix socket to the host. It brings an init message, the query region (by fd)
and, by mode, the blob: its fd (loan), its shm name (loan by name, with a lease),
nothing (the embedded artifact holds it), or its bytes (copy, read straight into the
guest's memory). Then each query names the program's length in the shared query
region; the guest reads the program and writes diagnostics there in place, and the
worker answers with the guest's return code. Errors are sent back as
``{"ok": false, "type": ..., "message": ...}``; the process survives a guest trap.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import socket
import sys
from typing import Any

from .._framing import recv_message, send_message


def _error(e: BaseException) -> dict[str, Any]:
    reply: dict[str, Any] = {"ok": False, "type": type(e).__name__, "message": str(e)}
    limit = getattr(e, "limit", None)
    if limit is not None:
        reply["limit"] = limit
    code = getattr(e, "trap_code", None)
    if code is not None:
        reply["trap_code"] = getattr(code, "name", str(code))
    return reply


def _recv_into(sock: socket.socket, address: int, nbytes: int) -> None:
    view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
    pos = 0
    while pos < nbytes:
        n = sock.recv_into(view[pos:], min(nbytes - pos, 1 << 22))
        if n == 0:
            raise EOFError("the host closed the socket in the middle of the blob")
        pos += n


class _Plugin:
    """The worker's state: guest, regions, where the blob is."""

    def __init__(self, sock: socket.socket, init: dict[str, Any]) -> None:
        from .._libc import WASM_PAGE_SIZE
        from ..errors import BlobFormatError, GuestLimitExceeded, LoanError, PluginModuleError
        from ..guest import Guest
        from ..region import Region
        from .module import PLUGIN_ABI_VERSION, WSP_ERRORS
        from .publish import BlobLease

        self.lease: BlobLease | None = None
        self.blob_region: Region | None = None
        self.io = Region.receive(sock)
        mode = init["mode"]
        nbytes = int(init["blob_nbytes"])
        if mode == "loan":
            if init.get("blob_name"):
                self.lease = BlobLease.attach(init["blob_name"])
                self.blob_region = self.lease.region
            else:
                self.blob_region = Region.receive(sock)
        self.guest = Guest(
            init["module"],
            name=init["name"],
            memory_limit_bytes=init["memory_limit_bytes"],
            deadline_ms=init["deadline_ms"],
            fuel=init["fuel"],
        )
        exported = {e.name for e in self.guest.module.exports}
        missing = [n for n in ("plugin_abi_version", "plugin_init", "plugin_check") if n not in exported]
        if missing or not self.guest.has_memory:
            raise PluginModuleError(
                f"plugin module {init['module']} does not export {', '.join(missing) or 'memory'}"
            )
        version = self.guest.call("plugin_abi_version")
        if version != PLUGIN_ABI_VERSION:
            raise PluginModuleError(
                f"plugin '{init['name']}' speaks plugin ABI v{version}; this host speaks v{PLUGIN_ABI_VERSION}"
            )
        if mode == "loan":
            assert self.blob_region is not None
            try:
                self.loan = self.guest.lend(self.blob_region, "ro")
            except LoanError as e:
                if isinstance(e.__cause__, GuestLimitExceeded):
                    raise GuestLimitExceeded(
                        f"plugin '{init['name']}': the {nbytes:,}-byte blob does not fit its memory limit "
                        f"({init['memory_limit_bytes']:,} bytes)",
                        limit="memory",
                        guest=init["name"],
                    ) from e
                raise
            self.blob_ptr, self.blob_nbytes = self.loan.ptr, nbytes
        elif mode == "copy":
            pages = -(-nbytes // WASM_PAGE_SIZE)
            self.blob_ptr = self.guest.grow_memory(pages) * WASM_PAGE_SIZE
            self.blob_nbytes = nbytes
            _recv_into(sock, self.guest.memory_address + self.blob_ptr, nbytes)
        elif mode == "embedded":
            self.blob_ptr, self.blob_nbytes = int(init["blob_ptr"]), nbytes
            self._write_protect_blob()
        else:
            self.blob_ptr, self.blob_nbytes = 0, 0
        rc = self.guest.call("plugin_init", self.blob_ptr, self.blob_nbytes)
        if rc != 0:
            raise BlobFormatError(
                f"plugin '{init['name']}' rejected the schema blob: {WSP_ERRORS.get(rc, 'error')} (code {rc})"
            )
        self.io_loan = self.guest.lend(self.io, "rw")
        self.check = self.guest.func("plugin_check")

    def _write_protect_blob(self) -> None:
        """Make the embedded blob's whole pages read-only in the guest's memory.

        They stay mapped copy-on-write from the artifact (shared by every plugin); without
        this a guest write would silently make a private copy of the page. With it, a write
        traps like a write to a read-only loan. The last page, if the blob ends inside it,
        stays writable: it may hold other data of the guest.
        """
        from .._libc import PAGE_SIZE, PROT_READ, protect

        start = -(-self.blob_ptr // PAGE_SIZE) * PAGE_SIZE
        end = (self.blob_ptr + self.blob_nbytes) // PAGE_SIZE * PAGE_SIZE
        if end > start:
            protect(self.guest.memory_address + start, end - start, PROT_READ)

    def touch(self) -> int:
        """Read one byte per page of the blob, from the guest's memory (maps every page)."""
        if self.blob_nbytes == 0:
            return 0
        import numpy as np

        base = self.guest.memory_address + self.blob_ptr
        pages = -(-self.blob_nbytes // 4096)
        view = np.ctypeslib.as_array((ctypes.c_uint8 * self.blob_nbytes).from_address(base))
        int(view[::4096].sum())
        return pages

    def close(self) -> None:
        self.guest.close()
        self.io.close()
        if self.lease is not None:
            self.lease.close()  # unlinks the name if this was the last holder
        elif self.blob_region is not None:
            self.blob_region.close()


def main(argv: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints this worker's stack
    sock = socket.socket(fileno=int(argv[0]))
    try:
        init, _ = recv_message(sock)
    except (EOFError, OSError, ValueError):
        return 1
    try:
        plugin = _Plugin(sock, init)
    except Exception as e:  # noqa: BLE001 - reported to the host, which raises it
        try:
            send_message(sock, _error(e))
        except OSError:
            pass
        return 1
    send_message(sock, {"ok": True, "pid": os.getpid(), "blob_ptr": plugin.blob_ptr})
    io_ptr = plugin.io_loan.ptr
    try:
        while True:
            try:
                message, _ = recv_message(sock)
            except (EOFError, OSError, ValueError):
                return 0  # the host is gone
            op = message.get("op")
            try:
                if op == "check":
                    length, out, cap = int(message["len"]), int(message["out"]), int(message["cap"])
                    if length < 0 or out < length or cap < 0 or out + cap > plugin.io.nbytes:
                        raise ValueError("query outside the shared query region")
                    rc = plugin.check(io_ptr, length, io_ptr + out, cap)
                    reply: dict[str, Any] = {"ok": True, "rc": rc}
                elif op == "touch":
                    reply = {"ok": True, "pages": plugin.touch()}
                elif op == "close":
                    return 0
                else:
                    reply = {"ok": False, "type": "PluginError", "message": f"unknown request {op!r}"}
            except Exception as e:  # noqa: BLE001 - this query fails, the plugin carries on
                reply = _error(e)
            send_message(sock, reply)
    finally:
        plugin.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
