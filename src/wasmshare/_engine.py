"""Engines, the epoch ticker and the compiled-module cache shared by every guest.

wasmtime compiles a module for one engine configuration, so wasmshare keeps one
engine per combination of the options that change code generation (fuel metering
and epoch interruption). Every engine keeps linear memories in place
(``memory_may_move = False`` with the default 4 GiB reservation): that is what lets a
loan map a region at a fixed address inside a guest's memory.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from ._fastcall import epoch_increment_call
from ._libc import usleep

TICK_PERIODS_MS = (1, 2, 5, 10)
"""Epoch tick periods an engine may use; see :func:`tick_ms_for`."""


def tick_ms_for(deadline_ms: float | None) -> int:
    """The epoch tick period for a per-call deadline: the longest of :data:`TICK_PERIODS_MS`
    that is at most a tenth of it (1 ms for deadlines under 20 ms).

    Every tick wakes the ticker thread, which takes the GIL from whatever Python code
    runs, so the period is as long as the deadline's precision allows: a tenth of it keeps
    the deadline within 10 %.
    """
    if deadline_ms is None:
        return 1
    fitting = [p for p in TICK_PERIODS_MS if p * 10 <= deadline_ms]
    return fitting[-1] if fitting else TICK_PERIODS_MS[0]


@dataclass(frozen=True)
class EngineOptions:
    """The engine settings that change compiled code, and the epoch tick period; one
    engine exists per value (a module compiled for one engine is used by its guests only)."""

    fuel: bool = False
    epoch: bool = False
    tick_ms: int = 1

    @classmethod
    def for_limits(cls, fuel: int | None, deadline_ms: float | None) -> EngineOptions:
        """The options of a guest with these limits (fuel metering, epoch ticks for the deadline)."""
        return cls(fuel=fuel is not None, epoch=deadline_ms is not None, tick_ms=tick_ms_for(deadline_ms))

    @property
    def cache_tag(self) -> str:
        """Names the compiled code in on-disk caches (the tick period does not change it)."""
        return f"fuel{int(self.fuel)}-epoch{int(self.epoch)}"


_engines: dict[EngineOptions, wasmtime.Engine] = {}
_engines_lock = threading.Lock()


def engine_for(options: EngineOptions) -> wasmtime.Engine:
    """Return the process-wide engine for ``options``, creating it on first use."""
    with _engines_lock:
        engine = _engines.get(options)
        if engine is None:
            config = wasmtime.Config()
            config.memory_may_move = False
            config.consume_fuel = options.fuel
            config.epoch_interruption = options.epoch
            engine = wasmtime.Engine(config)
            _engines[options] = engine
        return engine


class EpochTicker:
    """Increments an engine's epoch every ``tick_ms`` while any guest needs it.

    The ticker is a daemon thread; it parks on a condition variable while no guest with
    a deadline is alive, so an idle process pays nothing. wasm calls release the GIL,
    so the ticker runs while the main thread is inside a guest.
    """

    def __init__(self, engine: wasmtime.Engine, tick_ms: int = 1) -> None:
        self._engine = engine
        self.tick_ms = tick_ms
        self._users = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Register one guest that needs ticks; starts the thread on first use."""
        with self._cond:
            self._users += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wasmshare-epoch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def release(self) -> None:
        """Unregister a guest; the thread parks when no guest is left."""
        with self._cond:
            self._users = max(0, self._users - 1)

    def _run(self) -> None:
        # Sleep through a raw C call that releases the GIL, and increment through one that
        # keeps it (an atomic add): the thread takes the GIL once a tick, for a few
        # bytecodes, so it barely competes with the threads that call into wasm (a
        # time.sleep + Engine.increment_epoch loop slowed a worker process running 32
        # controllers several-fold).
        increment, engine_ptr = epoch_increment_call(self._engine)
        sleep = usleep
        tick_us = ctypes.c_uint(self.tick_ms * 1000)
        cond = self._cond
        while True:
            if self._users == 0:
                with cond:
                    while self._users == 0:
                        cond.wait()
            sleep(tick_us)
            increment(engine_ptr)


_tickers: dict[int, EpochTicker] = {}


def ticker_for(engine: wasmtime.Engine, tick_ms: int = 1) -> EpochTicker:
    """Return the ticker of ``engine`` (one per engine; ``tick_ms`` is its options' period)."""
    with _engines_lock:
        ticker = _tickers.get(id(engine))
        if ticker is None:
            ticker = EpochTicker(engine, tick_ms)
            _tickers[id(engine)] = ticker
        return ticker


def deadline_ticks(deadline_ms: float, tick_ms: int = 1) -> int:
    """Epoch ticks of ``tick_ms`` to allow so that at least ``deadline_ms`` passes before the trap."""
    return max(1, int(-(-deadline_ms // tick_ms))) + 1


def default_cache_dir() -> Path:
    """``$WASMSHARE_CACHE_DIR``, else ``$XDG_CACHE_HOME/wasmshare``, else ``~/.cache/wasmshare``."""
    explicit = os.environ.get("WASMSHARE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "wasmshare"


_WASMTIME_VERSION = importlib.metadata.version("wasmtime")
MAX_MEMORY_MODULES = 64
"""Compiled modules kept in process (least recently used dropped; guests keep their own)."""
MAX_DISK_MODULES = 256
"""``.cwasm`` artifacts kept in the disk cache (oldest removed when a new one is written)."""
_memory_modules: OrderedDict[tuple[str, EngineOptions], wasmtime.Module] = OrderedDict()
_memory_lock = threading.Lock()


def evict_module(digest: str, *, cache_dir: Path | None = None) -> None:
    """Forget every compiled form of the wasm with sha256 ``digest``: in process and on disk.

    Guests already running it keep their module; the next use compiles it again."""
    with _memory_lock:
        for key in [k for k in _memory_modules if k[0] == digest]:
            del _memory_modules[key]
    root = (cache_dir or default_cache_dir()) / "modules"
    for path in root.glob(f"{digest}-*.cwasm") if root.is_dir() else ():
        path.unlink(missing_ok=True)


def _trim_disk_cache(folder: Path) -> None:
    try:
        files = sorted(folder.glob("*.cwasm"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for path in files[: max(0, len(files) - MAX_DISK_MODULES)]:
        path.unlink(missing_ok=True)


def compile_module(
    wasm: bytes, options: EngineOptions, *, cache_dir: Path | None | bool = None
) -> tuple[wasmtime.Module, str]:
    """Compile ``wasm`` for ``options``, through an in-process and an on-disk cache.

    Returns the module and the wasm's sha256. The on-disk cache stores wasmtime's
    native artifact (``.cwasm``) keyed by the wasm hash, the engine options and the
    wasmtime version, so a second process start deserializes (mapping the file) instead
    of recompiling. ``cache_dir=False`` disables the disk cache. Raises
    :class:`wasmtime.WasmtimeError` for an invalid module.
    """
    digest = hashlib.sha256(wasm).hexdigest()
    key = (digest, options)
    with _memory_lock:
        cached = _memory_modules.get(key)
        if cached is not None:
            _memory_modules.move_to_end(key)
    if cached is not None:
        return cached, digest
    engine = engine_for(options)
    module: wasmtime.Module | None = None
    path: Path | None = None
    if cache_dir is not False:
        root = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
        path = _artifact_path(root, digest, options)
        if path.is_file():
            try:
                module = wasmtime.Module.deserialize_file(engine, str(path))
            except wasmtime.WasmtimeError:
                module = None  # stale or corrupt artifact: recompile and overwrite it
    if module is None:
        module = wasmtime.Module(engine, wasm)
        if path is not None:
            _write_atomically(path, bytes(module.serialize()))
            _trim_disk_cache(path.parent)
    with _memory_lock:
        _memory_modules.setdefault(key, module)
        _memory_modules.move_to_end(key)
        while len(_memory_modules) > MAX_MEMORY_MODULES:
            _memory_modules.popitem(last=False)
        return _memory_modules[key], digest


def _artifact_path(root: Path, digest: str, options: EngineOptions) -> Path:
    return root / "modules" / f"{digest}-{options.cache_tag}-wasmtime{_WASMTIME_VERSION}.cwasm"


def is_compiled(wasm: bytes, options: EngineOptions) -> bool:
    """Whether ``wasm`` is compiled for ``options`` in process or in the disk cache.

    A caller that must not compile on a latency-critical thread checks this first and
    compiles with :func:`compile_in_child` when it is False (the disk cache is bounded, so
    an artifact can be gone since the module was last used)."""
    digest = hashlib.sha256(wasm).hexdigest()
    with _memory_lock:
        if (digest, options) in _memory_modules:
            return True
    return _artifact_path(default_cache_dir(), digest, options).is_file()


def child_env() -> dict[str, str]:
    """This process's environment for a Python child that must import this same wasmshare.

    The package's source folder goes first on ``PYTHONPATH``, so a child started from an
    editable install, a checkout or a wheel imports the code its parent runs.
    """
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


COMPILE_MEMORY_BYTES = 2 << 30
"""Address space of a compile child: a module that needs more to compile is refused."""


def compile_in_child(
    wasm: bytes, options: EngineOptions, *, timeout_s: float, memory_limit_bytes: int = COMPILE_MEMORY_BYTES
) -> None:
    """Compile ``wasm`` for ``options`` in a child process into the disk cache, within ``timeout_s``.

    wasmtime cannot stop a compilation once started, and a hostile module can take a long
    time (hundreds of thousands of functions) and much memory: in a child it can be killed,
    and its address space is capped at ``memory_limit_bytes``. Raises TimeoutError past the
    budget and ValueError with a one-line reason for an invalid module or one that needs
    more memory. The caller then loads the artifact from the cache."""
    import subprocess
    import sys

    command = [
        sys.executable,
        "-m",
        "wasmshare._compile_child",
        str(int(options.fuel)),
        str(int(options.epoch)),
        str(int(memory_limit_bytes)),
    ]
    env = child_env()
    env.setdefault("WASMSHARE_CACHE_DIR", str(default_cache_dir()))
    try:
        done = subprocess.run(
            command, input=wasm, capture_output=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"compiling the module took longer than {timeout_s:g} s") from None
    if b"memory allocation of" in done.stderr or b"MemoryError" in done.stderr:
        raise ValueError(f"compiling the module needed more than {memory_limit_bytes:,} bytes of memory")
    if done.returncode < 0:
        raise ValueError(f"the compiler was killed by signal {-done.returncode}")
    if done.returncode != 0:
        lines = [line for line in done.stderr.decode("utf-8", "replace").splitlines() if line.strip()]
        raise ValueError(lines[-1] if lines else f"the compiler exited with code {done.returncode}")


def load_compiled(path: Path, options: EngineOptions) -> wasmtime.Module:
    """Map a ``.cwasm`` artifact compiled for ``options`` (no compilation, data shared copy-on-write).

    Raises :class:`wasmtime.WasmtimeError` for a file compiled by another wasmtime version
    or engine configuration.
    """
    return wasmtime.Module.deserialize_file(engine_for(options), str(path))


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".cwasm")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache directory only costs a recompile next time
