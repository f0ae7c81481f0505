"""Module sources for a guest: wasm bytes, WAT text, files, ``.cwasm`` artifacts; and its linker.

Every failure raises :class:`~wasmshare.errors.GuestError` naming the source;
:func:`wasmtime_error_summary` keeps wasmtime's causes and drops its backtrace.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import wasmtime

from ._abi import ABI_VERSION, IMPORT_MODULE
from .errors import AbiMismatch, GuestError

ModuleSource = str | os.PathLike[str] | bytes | bytearray
"""A module: a path to ``.wasm``/``.wat``, wasm bytes, or WAT text."""

HostFunction = Callable[..., Any]


def compiled_artifact(source: ModuleSource) -> Path | None:
    """The path of a precompiled ``.cwasm`` artifact, or None for any other module source."""
    if isinstance(source, (bytes, bytearray)) or (
        isinstance(source, str) and source.lstrip().startswith("(module")
    ):
        return None
    path = Path(source)
    if path.suffix != ".cwasm":
        return None
    if not path.is_file():
        raise GuestError(f"no compiled module at {path}")
    return path


def load_wasm_bytes(source: ModuleSource) -> tuple[bytes, str]:
    """Return wasm bytes and a default name (the file stem, else ``"guest"``) for ``source``."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        if data[:4] == b"\0asm":
            return data, "guest"
        try:
            return bytes(wasmtime.wat2wasm(data.decode("utf-8"))), "guest"
        except (UnicodeDecodeError, wasmtime.WasmtimeError) as e:
            raise GuestError(f"bytes are neither a wasm binary nor valid WAT text: {e}") from e
    if isinstance(source, str) and source.lstrip().startswith("(module"):
        try:
            return bytes(wasmtime.wat2wasm(source)), "guest"
        except wasmtime.WasmtimeError as e:
            raise GuestError(f"invalid WAT text: {e}") from e
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise GuestError(f"no module at {path}") from e
    except IsADirectoryError as e:
        raise GuestError(f"{path} is a directory, not a wasm module") from e
    except OSError as e:
        raise GuestError(f"cannot read module {path}: {e.strerror}") from e
    name = path.stem
    if data[:4] == b"\0asm":
        return data, name
    try:
        return bytes(wasmtime.wat2wasm(data.decode("utf-8"))), name
    except (UnicodeDecodeError, wasmtime.WasmtimeError) as e:
        raise GuestError(f"{path} is neither a wasm binary nor valid WAT text: {e}", guest=name) from e


def wasmtime_error_summary(e: BaseException) -> str:
    """The informative part of a wasmtime error or trap: its causes, not the backtrace."""
    text = str(e).strip()
    if "Caused by:" in text:
        causes = [
            re.sub(r"^\d+:\s*", "", line.strip()).removeprefix("wasm trap: ")
            for line in text.split("Caused by:", 1)[1].splitlines()
            if line.strip()
        ]
        if causes:
            return causes[-1] + (f" ({'; '.join(causes[:-1])})" if len(causes) > 1 else "")
    for line in text.splitlines():
        line = line.strip()
        if line and "backtrace" not in line and not line.startswith("note:"):
            return line.removeprefix("wasm trap: ")
    return type(e).__name__


def fault_address(trap: wasmtime.Trap) -> int | None:
    """The guest address of a memory fault, when wasmtime reports one."""
    match = re.search(r"memory fault at wasm address (0x[0-9a-fA-F]+)", str(trap))
    return int(match.group(1), 16) if match else None


def make_linker(
    engine: wasmtime.Engine,
    store: wasmtime.Store,
    module: wasmtime.Module,
    guest_name: str,
    *,
    imports: Mapping[tuple[str, str], HostFunction],
    builtins: Mapping[str, HostFunction],
    wasi: bool | None,
    wrap: Callable[[str, HostFunction], Callable[..., Any]],
) -> wasmtime.Linker:
    """A linker that defines every import ``module`` declares, or GuestError / AbiMismatch.

    ``builtins`` are the host's own ``wasmshare`` functions by name, used where ``imports``
    does not override them; ``wrap(what, func)`` turns a host function into what wasmtime
    calls (with the caller). WASI is linked when asked, or (``wasi=None``) when the module
    imports it; the store then gets the process's stdout and stderr.
    """
    linker = wasmtime.Linker(engine)
    declared = {(imp.module, imp.name or ""): imp.type for imp in module.imports}
    uses_wasi = any(mod.startswith("wasi_") for mod, _ in declared)
    linked_wasi = bool(wasi or (wasi is None and uses_wasi))
    if linked_wasi:
        linker.define_wasi()
        config = wasmtime.WasiConfig()
        config.inherit_stdout()
        config.inherit_stderr()
        store.set_wasi(config)
    provided: set[tuple[str, str]] = set()
    for (mod, field), ty in declared.items():
        if mod == IMPORT_MODULE and (mod, field) not in imports:
            if not isinstance(ty, wasmtime.FuncType) or field not in builtins:
                raise AbiMismatch(
                    f"guest '{guest_name}' imports unknown wasmshare function '{field}' "
                    f"(this host speaks ABI v{ABI_VERSION}: {', '.join(sorted(builtins))})",
                    guest=guest_name,
                )
            linker.define_func(mod, field, ty, wrap(field, builtins[field]), access_caller=True)
            provided.add((mod, field))
    for key, func in imports.items():
        if key not in declared:
            continue  # the module does not import it; harmless
        ty = declared[key]
        if not isinstance(ty, wasmtime.FuncType):
            raise GuestError(
                f"guest '{guest_name}': import {key[0]}.{key[1]} is not a function", guest=guest_name
            )
        linker.define_func(key[0], key[1], ty, wrap(f"{key[0]}.{key[1]}", func), access_caller=True)
        provided.add(key)
    missing = [
        f"{m}.{n}"
        for (m, n) in declared
        if (m, n) not in provided and not (linked_wasi and m.startswith("wasi_"))
    ]
    if missing:
        raise GuestError(
            f"guest '{guest_name}' needs imports the host does not provide: {', '.join(sorted(missing))}",
            guest=guest_name,
        )
    return linker
