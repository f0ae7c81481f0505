"""PluginHost: sandboxed plugin processes that all read one schema blob.

Each plugin is a separate process (``python -m wasmshare.plugins._worker``) running one
wasm guest with limits (``memory_limit_bytes``, ``deadline_ms``, ``fuel``). How the
blob reaches the guest is the ``mode``:

* ``"loan"``: a :class:`~wasmshare.plugins.Publication` is sent by fd (or opened by
  name) and lent read-only into the guest: one copy in RAM for every plugin;
* ``"embedded"``: the plugin is an :class:`~wasmshare.plugins.EmbeddedPlugin` artifact
  whose data segment holds the blob, mapped copy-on-write from the file;
* ``"copy"``: the baseline: the host streams the blob through the socket into each
  guest's own linear memory (a private copy per plugin);
* ``"none"``: no schema (every resource type is unknown); the reference for start time.

Queries travel over a Unix socket with a small framed protocol; the program itself and
the diagnostics go through a small read-write region (``io_nbytes``) that the host and
the guest share, so nothing but a few bytes of header is copied per query. A plugin
that traps, hits a limit or dies fails that query alone (with
:class:`~wasmshare.errors.GuestTrap`, :class:`~wasmshare.errors.GuestLimitExceeded` or
:class:`~wasmshare.plugins.PluginCrashed`); the others carry on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._engine import child_env
from .._framing import recv_message, send_message
from .._libc import WASM_PAGE_SIZE
from ..errors import (
    BlobFormatError,
    GuestError,
    GuestLimitExceeded,
    GuestTrap,
    LimitKind,
    PluginCrashed,
    PluginError,
    PluginModuleError,
    ProgramError,
    WasmshareError,
)
from ..region import Region
from ._safe_input import open_user_file
from .blob import BLOB_FILE_MAX_BYTES
from .memory import MemoryUsage, memory_usage
from .module import WSP_ERRORS, check_plugin_module, default_plugin_module, read_plugin_module
from .program import Diagnostic, Program, decode_diagnostics, encode_program, parse_program
from .publish import Publication

if TYPE_CHECKING:
    from .embedded import EmbeddedPlugin

__all__ = ["PluginHost", "Plugin", "CheckResult", "Mode"]

Mode = Literal["loan", "embedded", "copy", "none"]
MODES: tuple[Mode, ...] = ("loan", "embedded", "copy", "none")


@dataclass(frozen=True)
class CheckResult:
    """A plugin's answer to one program."""

    plugin: str
    diagnostics: list[Diagnostic]
    total: int
    """Diagnostics found; more than ``len(diagnostics)`` when the output buffer was full."""
    elapsed_us: float
    """Host-measured round trip of the query."""

    @property
    def ok(self) -> bool:
        """True when the program type-checks."""
        return self.total == 0

    @property
    def truncated(self) -> bool:
        return self.total > len(self.diagnostics)


def _error_from_reply(reply: dict[str, Any], plugin: str) -> WasmshareError:
    kind = reply.get("type")
    message = str(reply.get("message", "unknown error"))
    if kind == "GuestLimitExceeded":
        limits: dict[Any, LimitKind] = {"fuel": "fuel", "memory": "memory", "deadline": "deadline"}
        return GuestLimitExceeded(
            message,
            limit=limits.get(reply.get("limit"), "memory"),
            guest=plugin,
            trap_code=reply.get("trap_code"),
        )
    if kind == "GuestTrap":
        return GuestTrap(message, guest=plugin, trap_code=reply.get("trap_code"))
    if kind == "BlobFormatError":
        return BlobFormatError(message)
    if kind == "PluginModuleError":
        return PluginModuleError(message)
    if kind in ("GuestError", "AbiMismatch", "GuestBusy"):
        return GuestError(message, guest=plugin)
    return PluginError(f"plugin '{plugin}': {message}")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class Plugin:
    """The host's handle on one plugin process. Made by :meth:`PluginHost.spawn`.

    :meth:`check` is thread-safe (one query at a time per plugin; different plugins in
    parallel). ``spawn_s``/``ready_s`` are ``time.perf_counter()`` stamps around start-up.
    """

    def __init__(self, host: PluginHost, index: int, name: str, module: str | None) -> None:
        self.host = host
        self.index = index
        self.name = name
        self._lock = threading.Lock()
        self._dead_reason: str | None = None
        self.spawn_s = time.perf_counter()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "wasmshare.plugins._worker", str(child.fileno())],
                pass_fds=(child.fileno(),),
                env=child_env(),
            )
        except OSError as e:
            parent.close()
            raise PluginError(f"cannot start plugin process '{name}': {e}") from e
        finally:
            child.close()
        self.pid: int = self.process.pid
        self._sock = parent
        self._finalizer = weakref.finalize(self, _kill_quietly, self.process, parent)
        self._io = Region.create(host.io_nbytes)
        self._io_view = self._io.array()
        self._module = module
        self.ready_s = 0.0
        self.blob_ptr = 0

    # -- start-up ----------------------------------------------------------------------

    def _send_init(self) -> None:
        host = self.host
        init = {
            "name": self.name,
            "mode": host.mode,
            "module": self._module,
            "memory_limit_bytes": host._guest_memory_limit(),
            "deadline_ms": host.deadline_ms,
            "fuel": host.fuel,
            "blob_nbytes": host.blob_nbytes,
            "blob_name": host.blob_name,
            "blob_ptr": host._embedded.blob_offset if host._embedded is not None else 0,
        }
        sock = self._sock
        try:
            send_message(sock, init)
            self._io.send(sock)
            if host.mode == "loan" and host.blob_name is None:
                assert host._publication is not None
                host._publication.send(sock)
            elif host.mode == "copy":
                host._stream_blob(sock)
        except (OSError, WasmshareError) as e:
            raise self._crashed("while starting", e) from e

    def _wait_ready(self, timeout_s: float) -> None:
        sock = self._sock
        sock.settimeout(timeout_s)
        try:
            reply, _ = recv_message(sock)
        except (OSError, EOFError, ValueError) as e:
            raise self._crashed("while starting", e) from e
        finally:
            sock.settimeout(None)
        if not reply.get("ok"):
            self.kill()
            raise _error_from_reply(reply, self.name)
        self.ready_s = time.perf_counter()
        self.blob_ptr = int(reply.get("blob_ptr", 0))

    # -- queries -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """True while the process runs and answers."""
        return self._dead_reason is None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the process is gone (-N: killed by signal N)."""
        return self.process.poll()

    def _crashed(self, when: str, cause: BaseException | None = None) -> PluginCrashed:
        try:
            code = self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._dead_reason = f"plugin '{self.name}' (pid {self.pid}) {_describe_exit(code)} {when}"
        if isinstance(cause, socket.timeout):
            self._dead_reason = (
                f"plugin '{self.name}' (pid {self.pid}) did not answer in time {when}; it was killed"
            )
        return PluginCrashed(self._dead_reason, plugin=self.name, returncode=code)

    def _request(self, message: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
        if self._dead_reason is not None:
            raise PluginCrashed(self._dead_reason, plugin=self.name, returncode=self.process.poll())
        sock = self._sock
        try:
            send_message(sock, message)
            sock.settimeout(timeout_s)
            reply, _ = recv_message(sock)
        except (OSError, EOFError, ValueError) as e:
            if isinstance(e, socket.timeout):
                self.process.kill()
            raise self._crashed(f"during {message.get('op')}", e) from e
        finally:
            try:
                sock.settimeout(None)
            except OSError:
                pass
        if not reply.get("ok"):
            raise _error_from_reply(reply, self.name)
        return reply

    def check(self, program: Program | str | bytes) -> CheckResult:
        """Type-check ``program`` (a :class:`Program` or YAML text) in this plugin.

        Raises :class:`ProgramError` for a bad or oversized program, the plugin's own
        error (:class:`GuestTrap`, :class:`GuestLimitExceeded`) for this query, and
        :class:`PluginCrashed` if the process died.
        """
        prog = program if isinstance(program, Program) else parse_program(program)
        encoded = encode_program(prog)
        return self._check_encoded(prog, encoded)

    def _check_encoded(self, prog: Program, encoded: bytes) -> CheckResult:
        io = self._io_view
        out_off = -(-len(encoded) // 64) * 64
        cap = io.nbytes - out_off
        if cap < 4096:
            raise ProgramError(
                f"the encoded program is {len(encoded):,} bytes; it does not fit the plugin's "
                f"{io.nbytes:,}-byte I/O buffer (raise io_nbytes)"
            )
        with self._lock:
            t0 = time.perf_counter()
            io[: len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
            reply = self._request(
                {"op": "check", "len": len(encoded), "out": out_off, "cap": cap}, self.host.query_timeout_s
            )
            rc = int(reply["rc"])
            if rc < 0:
                raise PluginError(
                    f"plugin '{self.name}' rejected the query: {WSP_ERRORS.get(rc, 'error')} (code {rc})"
                )
            diagnostics, total = decode_diagnostics(io[out_off:], prog)
            elapsed = (time.perf_counter() - t0) * 1e6
        return CheckResult(self.name, diagnostics, total, elapsed)

    def touch_blob(self) -> int:
        """Make the guest read one byte of every page of the blob (as a plugin reading all of it would).

        Returns the number of pages. Used to measure memory with every page mapped.
        """
        with self._lock:
            return int(self._request({"op": "touch"}, self.host.query_timeout_s)["pages"])

    def memory(self) -> MemoryUsage:
        """The process's PSS and RSS now."""
        return memory_usage(self.pid)

    def kill(self) -> None:
        """SIGKILL the process (tests of crash handling use this)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self, timeout_s: float = 5.0) -> None:
        """Ask the plugin to exit, kill it if it does not. Safe to call twice."""
        if self.process.poll() is None and self._dead_reason is None:
            try:
                send_message(self._sock, {"op": "close"})
                self.process.wait(timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self._finalizer()
        self._dead_reason = self._dead_reason or f"plugin '{self.name}' was closed"
        del self._io_view
        self._io_view = np.zeros(0, dtype=np.uint8)
        self._io.close()

    def __repr__(self) -> str:
        return f"<Plugin '{self.name}' pid {self.pid} {'alive' if self.alive else 'gone'}>"


def _kill_quietly(process: subprocess.Popen[bytes], sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
    if process.poll() is None:
        try:
            process.wait(timeout=2.0)  # a closed socket makes the worker exit
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class PluginHost:
    """Starts plugin processes that share one schema blob, and sends them programs to check.

    Parameters
    ----------
    blob:
        A :class:`Publication` (``mode="loan"``, or ``"copy"``), an
        :class:`EmbeddedPlugin` (``"embedded"``), a blob file path or bytes (``"copy"``),
        or None (``"none"``).
    mode:
        ``"loan"``, ``"embedded"``, ``"copy"`` or ``"none"``; inferred from ``blob`` when
        omitted (a path or bytes means ``"copy"``).
    module:
        The plugin's wasm (default: the type-check plugin); checked for the plugin ABI
        here, before any process starts. Not used in ``"embedded"`` mode (the artifact is
        the module).
    by:
        In ``"loan"`` mode, how plugins get the blob: ``"fd"`` (sent over the socket) or
        ``"name"`` (opened by the publication's shm name, with a lease).
    memory_limit_bytes:
        Each plugin guest's own memory budget; the pages holding the blob come on top.
    deadline_ms, fuel:
        Per-query limits of each guest (``None``: no limit).
    io_nbytes:
        Size of each plugin's shared query buffer (program in, diagnostics out).
    """

    def __init__(
        self,
        blob: Publication | EmbeddedPlugin | str | os.PathLike[str] | bytes | None = None,
        *,
        mode: Mode | None = None,
        module: str | os.PathLike[str] | None = None,
        by: Literal["fd", "name"] = "fd",
        memory_limit_bytes: int = 32 * 1024 * 1024,
        deadline_ms: float | None = 5000.0,
        fuel: int | None = None,
        io_nbytes: int = 1024 * 1024,
        name: str = "plugin",
        start_timeout_s: float = 120.0,
        query_timeout_s: float | None = 120.0,
    ) -> None:
        from .embedded import EmbeddedPlugin

        self.mode: Mode = mode if mode is not None else _infer_mode(blob)
        if self.mode not in MODES:
            raise PluginError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if by not in ("fd", "name"):
            raise PluginError(f"by must be 'fd' or 'name', got {by!r}")
        if not isinstance(memory_limit_bytes, int) or memory_limit_bytes < WASM_PAGE_SIZE:
            raise PluginError(
                f"memory_limit_bytes must be an int of at least {WASM_PAGE_SIZE}, got {memory_limit_bytes!r}"
            )
        if not isinstance(io_nbytes, int) or io_nbytes < 8192:
            raise PluginError(f"io_nbytes must be an int of at least 8192, got {io_nbytes!r}")
        self.memory_limit_bytes = memory_limit_bytes
        self.deadline_ms = deadline_ms
        self.fuel = fuel
        self.io_nbytes = io_nbytes
        self.name = name
        self.start_timeout_s = start_timeout_s
        self.query_timeout_s = query_timeout_s
        self._publication: Publication | None = None
        self._embedded: EmbeddedPlugin | None = None
        self._copy_source: Any = None
        self.blob_name: str | None = None
        self.blob_nbytes = 0
        self._plugins: list[Plugin] = []
        self._closed = False

        if self.mode == "loan":
            if not isinstance(blob, Publication):
                raise PluginError("mode 'loan' needs a Publication (Publication.publish(blob))")
            blob.require_open()
            self._publication = blob
            self.blob_nbytes = blob.nbytes
            if by == "name":
                if blob.name is None:
                    raise PluginError(
                        "by='name' needs a blob published with a name (Publication.publish(blob, name=...))"
                    )
                self.blob_name = blob.name
        elif self.mode == "embedded":
            if not isinstance(blob, EmbeddedPlugin):
                raise PluginError("mode 'embedded' needs an EmbeddedPlugin (embed_plugin(blob))")
            if blob.epoch != (deadline_ms is not None) or blob.fuel != (fuel is not None):
                raise PluginError(
                    f"the embedded plugin {blob.path.name} was compiled for deadline={blob.epoch}, fuel={blob.fuel}; "
                    f"this host has deadline_ms={deadline_ms}, fuel={fuel}: rebuild it with matching settings"
                )
            if module is not None:
                raise PluginError("mode 'embedded' runs the artifact itself; do not pass module=")
            self._embedded = blob
            self.blob_nbytes = blob.blob_nbytes
        elif self.mode == "copy":
            if isinstance(blob, Publication):
                blob.require_open()
                self.blob_nbytes = blob.nbytes
            elif isinstance(blob, (bytes, bytearray)):
                self.blob_nbytes = len(blob)
            elif isinstance(blob, (str, os.PathLike)):
                fd, self.blob_nbytes = _open_blob_file(blob)
                os.close(fd)
            else:
                raise PluginError("mode 'copy' needs a Publication, a blob file path or bytes")
            self._copy_source = blob
        elif blob is not None:
            raise PluginError("mode 'none' runs plugins without a schema; pass blob=None")
        self.module: str | None = None
        if self.mode != "embedded":
            path = Path(module) if module is not None else default_plugin_module()
            label = f"plugin module {os.fspath(path)}"
            wasm = read_plugin_module(path, label)
            check_plugin_module(wasm, label)
            self.module = str(path.resolve())
            self._warm_module_cache(wasm)
        else:
            assert self._embedded is not None
            self.module = str(self._embedded.path)

    def _warm_module_cache(self, wasm: bytes) -> None:
        """Compile the module once here, so plugin processes map the cached artifact instead of compiling."""
        from .. import _engine

        try:
            _engine.compile_module(wasm, _engine.EngineOptions.for_limits(self.fuel, self.deadline_ms))
        except Exception:  # noqa: BLE001 - the plugin process reports a bad module itself
            pass

    def _guest_memory_limit(self) -> int:
        window = -(-self.blob_nbytes // WASM_PAGE_SIZE) * WASM_PAGE_SIZE if self.mode != "none" else 0
        return self.memory_limit_bytes + window + WASM_PAGE_SIZE

    def _stream_blob(self, sock: socket.socket) -> None:
        """Copy mode: send the whole blob through the socket (sendfile from a file or memfd)."""
        source = self._copy_source
        if isinstance(source, (bytes, bytearray)):
            sock.sendall(source)
            return
        if isinstance(source, Publication):
            fd = os.dup(source.region.fd)
        else:
            fd, nbytes = _open_blob_file(source)
            if nbytes != self.blob_nbytes:
                os.close(fd)
                raise PluginError(
                    f"blob file {os.fspath(source)!r} changed size ({self.blob_nbytes:,} to {nbytes:,} bytes) "
                    "since the host opened it"
                )
        try:
            offset = 0
            while offset < self.blob_nbytes:
                sent = os.sendfile(sock.fileno(), fd, offset, self.blob_nbytes - offset)
                if sent == 0:
                    raise PluginError("the blob file ended early")
                offset += sent
        finally:
            os.close(fd)

    # -- plugins -----------------------------------------------------------------------

    @property
    def plugins(self) -> tuple[Plugin, ...]:
        """Every plugin started, alive or not, in start order."""
        return tuple(self._plugins)

    def spawn(self, n: int = 1) -> list[Plugin]:
        """Start ``n`` plugin processes and wait until each has its guest instantiated.

        The processes start together; each then receives its blob (fd, name, or the
        copy) and answers "ready". If any fails to start, the ones started by this call
        are stopped and the first error is raised: :class:`BlobFormatError` when the
        guest rejects the blob, :class:`GuestLimitExceeded` when its memory does not fit
        the limit, :class:`PluginModuleError`, or :class:`PluginCrashed`.
        """
        if self._closed:
            raise PluginError("the plugin host is closed")
        if not isinstance(n, int) or n < 1:
            raise PluginError(f"n must be a positive int, got {n!r}")
        if self._publication is not None and self._publication.released:
            raise PluginError("the publication was released; publish the blob again")
        started = []
        try:
            for _ in range(n):
                index = len(self._plugins)
                plugin = Plugin(self, index, f"{self.name}-{index}", self.module)
                self._plugins.append(plugin)
                started.append(plugin)
                if self._publication is not None:
                    self._publication.watch(plugin.pid)
            for plugin in started:
                plugin._send_init()
            for plugin in started:
                plugin._wait_ready(self.start_timeout_s)
        except BaseException:
            for plugin in started:
                plugin.kill()
                plugin.close()
                self._plugins.remove(plugin)
            raise
        return started

    def _plugin(self, plugin: int | Plugin) -> Plugin:
        if isinstance(plugin, Plugin):
            return plugin
        try:
            return self._plugins[plugin]
        except (IndexError, TypeError):
            raise PluginError(f"no plugin {plugin!r} (this host started {len(self._plugins)})") from None

    def check(self, program: Program | str | bytes, *, plugin: int | Plugin = 0) -> CheckResult:
        """Type-check ``program`` in one plugin (by index or handle); see :meth:`Plugin.check`."""
        return self._plugin(plugin).check(program)

    def check_all(self, program: Program | str | bytes) -> list[CheckResult | WasmshareError]:
        """Send ``program`` to every live plugin at once; one result or error per plugin, in order.

        The plugins run in parallel (one process each); a plugin that fails gives its
        error in its place and the others' answers still come back.
        """
        prog = program if isinstance(program, Program) else parse_program(program)
        encoded = encode_program(prog)
        results: list[CheckResult | WasmshareError | None] = [None] * len(self._plugins)

        def run(i: int, p: Plugin) -> None:
            try:
                results[i] = p._check_encoded(prog, encoded)
            except WasmshareError as e:
                results[i] = e

        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(self._plugins)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r if r is not None else PluginError("no answer") for r in results]

    def memory(self) -> list[MemoryUsage]:
        """PSS and RSS of every live plugin process."""
        out = []
        for p in self._plugins:
            if p.alive:
                try:
                    out.append(p.memory())
                except OSError:
                    pass
        return out

    def close(self) -> None:
        """Stop every plugin. The blob itself belongs to its :class:`Publication`. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for p in self._plugins:
            p.close()

    def __enter__(self) -> PluginHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        alive = sum(1 for p in self._plugins if p.alive)
        return f"<PluginHost mode={self.mode} {alive}/{len(self._plugins)} plugins alive>"


def _open_blob_file(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(fd, size_bytes)`` of a blob file, checked as a user's path (regular, at most :data:`BLOB_FILE_MAX_BYTES`)."""
    return open_user_file(
        path,
        label=f"blob file {os.fspath(path)!r}",
        max_bytes=BLOB_FILE_MAX_BYTES,
        limit_name="BLOB_FILE_MAX_BYTES",
    )


def _infer_mode(blob: object) -> Mode:
    from .embedded import EmbeddedPlugin

    if blob is None:
        return "none"
    if isinstance(blob, Publication):
        return "loan"
    if isinstance(blob, EmbeddedPlugin):
        return "embedded"
    if isinstance(blob, (bytes, bytearray, str, os.PathLike)):
        return "copy"
    raise PluginError(
        f"cannot run plugins on a {type(blob).__name__}; pass a Publication, EmbeddedPlugin, path or bytes"
    )
