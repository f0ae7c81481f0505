"""Embedded data: one plugin file that carries the schema blob in its own data segment.

:func:`embed_plugin` appends the blob to a plugin module as an active data segment at a
64 KiB-aligned offset past the module's own memory (exporting ``plugin_blob_ptr`` and
``plugin_blob_len`` globals that say where), compiles the result once with wasmshare's
engine, and writes wasmtime's native artifact (``.cwasm``) to disk. Every plugin process
then loads it with ``Module.deserialize_file``: wasmtime maps the artifact and
initializes linear memory copy-on-write from the file's pages (``memory_init_cow``, on
by default), so all processes share one copy of the data in the page cache, and a page
becomes private only if a guest writes to it.

An artifact is tied to the wasmtime version and to the engine settings it was compiled
for (fuel metering, epoch deadlines): build it with the same ``deadline``/``fuel`` choice
as the plugin host that loads it (:class:`~wasmshare.plugins.PluginHost` checks).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import wasmtime

from .. import _engine
from ..errors import PluginError, PluginModuleError
from ._safe_input import read_user_file
from ._wasm import embed_data
from .blob import BLOB_FILE_MAX_BYTES, SchemaBlob
from .module import check_plugin_module, default_plugin_module, read_plugin_module
from .publish import Publication

__all__ = ["EmbeddedPlugin", "embed_plugin"]

PTR_GLOBAL = "plugin_blob_ptr"
LEN_GLOBAL = "plugin_blob_len"
_FORMAT = 1
METADATA_FILE_MAX_BYTES = 1024 * 1024
"""Largest artifact metadata file (``<artifact>.json``) read; the real ones are under 1 KiB."""


@dataclass(frozen=True)
class EmbeddedPlugin:
    """A compiled plugin artifact with the blob inside; ``path`` is the ``.cwasm`` file.

    The metadata is also written next to it (``<path>.json``), so :meth:`load` can
    reopen an artifact built earlier.
    """

    path: Path
    blob_offset: int
    """Guest address of the blob in the plugin's linear memory."""
    blob_nbytes: int
    memory_pages: int
    """Initial linear memory of the module, blob included (64 KiB pages)."""
    epoch: bool
    """Compiled for epoch deadlines (a host with ``deadline_ms``)."""
    fuel: bool
    """Compiled with fuel metering (a host with ``fuel``)."""
    blob_sha256: str
    module_sha256: str
    wasmtime: str
    compile_s: float = 0.0
    """Seconds the compilation took when the artifact was built."""

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EmbeddedPlugin:
        """Reopen an artifact from its metadata file; raises :class:`PluginError` if it is missing or stale."""
        p = Path(path)
        meta = Path(str(p) + ".json")
        raw = read_user_file(
            meta,
            label=f"embedded plugin metadata {meta}",
            max_bytes=METADATA_FILE_MAX_BYTES,
            limit_name="METADATA_FILE_MAX_BYTES",
        )
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise PluginError(f"embedded plugin metadata {meta} is not JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not p.is_file():
            raise PluginError(f"{p} is not an embedded plugin artifact of this wasmshare")
        if data.get("wasmtime") != _wasmtime_version():
            raise PluginError(
                f"{p} was compiled by wasmtime {data.get('wasmtime')}; this is wasmtime {_wasmtime_version()}: rebuild it"
            )
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "path"}
        return cls(path=p, **fields)


def _wasmtime_version() -> str:
    return importlib.metadata.version("wasmtime")


def embed_plugin(
    blob: bytes | str | os.PathLike[str] | Publication,
    *,
    module: str | os.PathLike[str] | bytes | None = None,
    out: str | os.PathLike[str] | None = None,
    deadline: bool = True,
    fuel: bool = False,
    progress: Callable[[str, float], None] | None = None,
) -> EmbeddedPlugin:
    """Build (or reuse from the cache) a ``.cwasm`` plugin with ``blob`` in its data segment.

    ``module`` is the plugin's wasm (default: the type-check plugin); ``out`` the artifact
    path (default: the module cache, keyed by module, blob, settings and wasmtime
    version, so a second call with the same inputs reuses the file). ``deadline`` and
    ``fuel`` select the engine settings (they must match the host's limits).

    Raises :class:`BlobFormatError` for an invalid blob and :class:`PluginModuleError`
    for a module without the plugin ABI; a failed build leaves no artifact behind.
    """
    wasm = _module_bytes(module)
    check_plugin_module(wasm, "the plugin module")
    if isinstance(blob, Publication):
        data: bytes | memoryview = memoryview(blob.region.array().data).cast("B")
    elif isinstance(blob, (bytes, bytearray, memoryview)):
        data = bytes(blob)
    else:
        data = read_user_file(
            blob,
            label=f"blob file {os.fspath(blob)!r}",
            max_bytes=BLOB_FILE_MAX_BYTES,
            limit_name="BLOB_FILE_MAX_BYTES",
        )
    SchemaBlob(data).release()  # validate before anything is written
    options = _engine.EngineOptions(fuel=fuel, epoch=deadline)
    blob_sha = hashlib.sha256(data).hexdigest()
    module_sha = hashlib.sha256(wasm).hexdigest()
    if out is None:
        root = _engine.default_cache_dir() / "plugins"
        path = (
            root
            / f"{module_sha[:16]}-{blob_sha[:16]}-{options.cache_tag}-wasmtime{_wasmtime_version()}.cwasm"
        )
        try:
            cached = EmbeddedPlugin.load(path)
        except PluginError:
            cached = None
        if cached is not None and cached.blob_sha256 == blob_sha and cached.module_sha256 == module_sha:
            return cached
    else:
        path = Path(out)
    if progress is not None:
        progress("embedding", 0.0)
    embedded = embed_data(wasm, data, ptr_global=PTR_GLOBAL, len_global=LEN_GLOBAL)
    del data
    if progress is not None:
        progress("compiling", 0.2)
    t0 = time.perf_counter()
    try:
        compiled = wasmtime.Module(_engine.engine_for(options), embedded.wasm)
    except wasmtime.WasmtimeError as e:
        raise PluginModuleError(f"the plugin module with the blob embedded does not compile: {e}") from e
    artifact = compiled.serialize()
    compile_s = time.perf_counter() - t0
    del compiled
    if progress is not None:
        progress("writing", 0.9)
    plugin = EmbeddedPlugin(
        path=path,
        blob_offset=embedded.data_offset,
        blob_nbytes=embedded.data_nbytes,
        memory_pages=embedded.memory_pages,
        epoch=deadline,
        fuel=fuel,
        blob_sha256=blob_sha,
        module_sha256=module_sha,
        wasmtime=_wasmtime_version(),
        compile_s=compile_s,
    )
    meta = {k: v for k, v in asdict(plugin).items() if k != "path"}
    _write_synced(path, artifact)
    _write_synced(Path(str(path) + ".json"), json.dumps({"format": _FORMAT, **meta}, indent=1).encode())
    if progress is not None:
        progress("writing", 1.0)
    return plugin


def _module_bytes(module: str | os.PathLike[str] | bytes | None) -> bytes:
    if module is None:
        module = default_plugin_module()
    if isinstance(module, (bytes, bytearray)):
        return bytes(module)
    return read_plugin_module(module, f"plugin module {os.fspath(module)!r}")


def _write_synced(path: Path, data: bytes | bytearray) -> None:
    """Write atomically and fsync: dirty page-cache pages of a fresh artifact are not shared as clean ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
