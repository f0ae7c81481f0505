"""The plugin module: the ABI a plugin's wasm must export, and how a module is found, read and checked.

:class:`~wasmshare.plugins.PluginHost`, :func:`~wasmshare.plugins.embed_plugin` and the
plugin process all load plugin modules; the checks live here so that each refuses a bad
module with the same message before doing any work. Module paths come from users: a
file is read only if it is a regular file of at most :data:`MODULE_FILE_MAX_BYTES`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PluginModuleError
from ._safe_input import read_user_file
from ._wasm import exports as wasm_exports

__all__ = [
    "REQUIRED_EXPORTS",
    "PLUGIN_ABI_VERSION",
    "MODULE_FILE_MAX_BYTES",
    "WSP_ERRORS",
    "default_plugin_module",
    "check_plugin_module",
    "read_plugin_module",
]

REQUIRED_EXPORTS: dict[str, int] = {
    "memory": 2,
    "ws_abi_version": 0,
    "plugin_abi_version": 0,
    "plugin_init": 0,
    "plugin_check": 0,
}
"""What a plugin module must export (name → wasm export kind: 0 function, 2 memory)."""

PLUGIN_ABI_VERSION = 1
"""What ``plugin_abi_version()`` must return (``WSP_ABI_VERSION`` of ``wasmshare_plugin.h``)."""

MODULE_FILE_MAX_BYTES = 256 * 1024 * 1024
"""Largest plugin module file read (``.wasm``/``.wat``), checked before reading.

Real plugins are KiBs (the type-check plugin) to tens of MiB (debug builds); the bytes
are held, validated and compiled in the host, so a bound keeps a wrong path from
filling its memory.
"""

WSP_ERRORS = {
    -101: "bad magic",
    -102: "unsupported format version",
    -103: "an offset or length out of bounds",
    -104: "no schema loaded (plugin_init failed)",
    -105: "a malformed program",
    -106: "nesting or paths too deep",
}
"""The negative status codes ``plugin_init`` and ``plugin_check`` return, and what each means."""


def default_plugin_module() -> Path:
    """The type-check plugin (``guests/plugins/typecheck.wasm`` of the source tree).

    Raises :class:`PluginModuleError` when neither the source tree holding this package
    nor the working directory has it (an installed wheel ships no guests).
    """
    name = Path("guests") / "plugins" / "typecheck.wasm"
    candidates = [Path(__file__).resolve().parents[3] / name, Path.cwd() / name]
    for path in candidates:
        if path.is_file():
            return path
    raise PluginModuleError(
        f"the type-check plugin {name} is not in {candidates[0].parent}; run from a wasmshare source checkout "
        "or pass module=PATH"
    )


def check_plugin_module(module: str | os.PathLike[str] | bytes, what: str | None = None) -> None:
    """Raise :class:`PluginModuleError` unless ``module`` is valid wasm exporting the plugin ABI.

    The message names every missing export. Reads only the module's export section
    (plus wasmtime's validation), so it is cheap enough to run before spawning. A path
    must name a regular file of at most :data:`MODULE_FILE_MAX_BYTES`; a FIFO, a device
    or a larger file is refused before it is read.
    """
    import wasmtime

    if isinstance(module, (bytes, bytearray)):
        wasm, label = bytes(module), what or "the plugin module"
    else:
        label = what or f"plugin module {os.fspath(module)}"
        wasm = read_plugin_module(module, label)
    try:
        wasmtime.Module.validate(wasmtime.Engine(), wasm)
    except wasmtime.WasmtimeError as e:
        raise PluginModuleError(f"{label} is not a valid wasm module: {str(e).splitlines()[0]}") from e
    have = wasm_exports(wasm)
    missing = [name for name, kind in REQUIRED_EXPORTS.items() if have.get(name) != kind]
    if missing:
        raise PluginModuleError(
            f"{label} does not export {', '.join(missing)}: a plugin must export "
            f"{', '.join(REQUIRED_EXPORTS)} (see docs/plugins.md)"
        )


def read_plugin_module(module: str | os.PathLike[str], label: str | None = None) -> bytes:
    """The bytes of the plugin module file ``module``, read with the checks of a user's path.

    Raises :class:`PluginModuleError`, in one line, unless it is a regular file of at
    most :data:`MODULE_FILE_MAX_BYTES`: a FIFO or a device such as ``/dev/zero`` is
    refused at once instead of blocking or reading forever. ``label`` names the file in
    that message (default: ``plugin module PATH``).
    """
    return read_user_file(
        module,
        label=label or f"plugin module {os.fspath(module)}",
        max_bytes=MODULE_FILE_MAX_BYTES,
        limit_name="MODULE_FILE_MAX_BYTES",
        error=PluginModuleError,
    )
