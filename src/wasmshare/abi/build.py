"""Compile C guests to WebAssembly with Zig's clang (``pip install 'wasmshare[sdk]'``).

:func:`build_guest` is what ``wasmshare build`` runs.  It drives
``python -m ziglang cc`` from the ``ziglang`` wheel, so no system compiler,
wasi-sdk or LLVM install is needed, and checks that the result is a module
wasmtime accepts before returning.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence
from typing import Literal

from wasmshare._libc import WASM_PAGE_SIZE
from wasmshare.errors import BuildError

__all__ = ["include_dir", "build_guest", "compiler_command", "Optimize"]

Optimize = Literal["debug", "fast", "small"]

# Zig's clang emits DWARF (with absolute source paths) even at -O2, so optimised
# builds say -g0: small, reproducible modules that keep their name section.  Debug
# builds enable UBSan as zig does by default, but trapping (`unreachable`) instead
# of calling a runtime that freestanding guests do not have.
_OPT_FLAGS: dict[str, tuple[str, ...]] = {
    "debug": ("-O0", "-g", "-fsanitize-trap=undefined"),
    "fast": ("-O2", "-g0"),
    "small": ("-Oz", "-g0"),
}
# Longest compiler output quoted in a BuildError, in characters.
_MAX_STDERR_CHARS = 4000


def include_dir() -> pathlib.Path:
    """Return the folder holding ``wasmshare.h``; pass it to the compiler as ``-I``."""
    return pathlib.Path(__file__).resolve().parent / "include"


def _check_memory(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of bytes or None, not {type(value).__name__}")
    if value <= 0 or value % WASM_PAGE_SIZE != 0 or value > 2**32:
        raise ValueError(
            f"{name}={value} must be a positive multiple of {WASM_PAGE_SIZE} bytes (one wasm page), at most 4 GiB"
        )


def compiler_command(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    wasi: bool = False,
    optimize: Optimize = "fast",
    simd: bool = True,
    initial_memory: int | None = None,
    max_memory: int | None = None,
    extra_flags: Sequence[str] = (),
) -> list[str]:
    """Return the ``zig cc`` command line :func:`build_guest` runs, without running it.

    Arguments are those of :func:`build_guest`.  Useful to print the command or
    to copy it into a Makefile.
    """
    if optimize not in _OPT_FLAGS:
        raise ValueError(f"optimize must be one of {sorted(_OPT_FLAGS)}, not {optimize!r}")
    _check_memory("initial_memory", initial_memory)
    _check_memory("max_memory", max_memory)
    if initial_memory is not None and max_memory is not None and initial_memory > max_memory:
        raise ValueError(f"initial_memory={initial_memory} is larger than max_memory={max_memory}")
    if isinstance(extra_flags, str):
        raise TypeError("extra_flags must be a sequence of strings, not one string")

    cmd = [sys.executable, "-m", "ziglang", "cc"]
    if wasi:
        # A reactor: no main(); wasi-libc's _initialize export runs constructors.
        cmd += ["--target=wasm32-wasi", "-mexec-model=reactor"]
    else:
        cmd += ["--target=wasm32-freestanding", "-nostdlib"]
    cmd += list(_OPT_FLAGS[optimize])
    cmd += ["-Wl,--no-entry", "-Wl,--export-dynamic"]
    cmd += ["-msimd128"] if simd else ["-mno-simd128"]
    cmd += ["-mbulk-memory"]
    if initial_memory is not None:
        cmd.append(f"-Wl,--initial-memory={initial_memory}")
    if max_memory is not None:
        cmd.append(f"-Wl,--max-memory={max_memory}")
    cmd.append(f"-I{include_dir()}")
    cmd += [str(flag) for flag in extra_flags]
    cmd += ["-o", os.fspath(output)]
    cmd += [os.fspath(src) for src in sources]
    return cmd


def _trim(text: str) -> str:
    text = text.strip()
    if len(text) > _MAX_STDERR_CHARS:
        text = "...\n" + text[-_MAX_STDERR_CHARS:]
    return text


def build_guest(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    wasi: bool = False,
    optimize: Optimize = "fast",
    simd: bool = True,
    initial_memory: int | None = None,
    max_memory: int | None = None,
    extra_flags: Sequence[str] = (),
) -> pathlib.Path:
    """Compile C sources into one wasm guest module and return its path.

    Parameters
    ----------
    sources
        C files (or objects) linked into the module; ``wasmshare.h`` is on the
        include path.
    output
        Path of the ``.wasm`` file to write; its folder is created if needed.
    wasi
        Target ``wasm32-wasi`` with wasi-libc (``malloc``, ``printf``, ...) as a
        reactor.  The module then exports ``_initialize``, which the host must
        call once before anything else, and may import ``wasi_snapshot_preview1``.
        The default, ``wasm32-freestanding`` without libc, gives small modules
        with no imports but the ``wasmshare`` ones.
    optimize
        ``"fast"`` (``-O2``), ``"small"`` (``-Oz``) or ``"debug"`` (``-O0 -g``, with
        undefined behaviour caught by UBSan as a trap).  Optimised builds carry no
        DWARF, so they are reproducible: same sources, output file name and Zig
        version give the same bytes wherever they are built.
    simd
        Allow 128-bit SIMD (``-msimd128``); wasmtime supports it everywhere.
    initial_memory, max_memory
        Linear memory limits in bytes, multiples of 65536.  ``None`` keeps the
        linker defaults (just enough for data and a 64 KiB stack; no maximum).
        The host's own memory limit applies on top of ``max_memory``.
    extra_flags
        More compiler/linker flags, passed after ours (``-Wl,...`` for the linker).

    Raises
    ------
    BuildError
        ``ziglang`` is not installed, a source is missing, the compiler failed
        (its messages are in the error), or the output is not a valid module.
    ValueError, TypeError
        An argument is out of range or of the wrong type.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if len(sources) == 0:
        raise BuildError("no source files given to build_guest(); pass at least one .c file")
    missing = [os.fspath(src) for src in sources if not pathlib.Path(src).is_file()]
    if missing:
        raise BuildError(f"guest source file not found: {', '.join(missing)}")
    if importlib.util.find_spec("ziglang") is None:
        raise BuildError(
            "building C guests needs the Zig toolchain from PyPI, which is not installed in "
            f"this Python ({sys.executable}); install it with: pip install 'wasmshare[sdk]'"
        )

    out = pathlib.Path(output)
    cmd = compiler_command(
        sources,
        out,
        wasi=wasi,
        optimize=optimize,
        simd=simd,
        initial_memory=initial_memory,
        max_memory=max_memory,
        extra_flags=extra_flags,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    except OSError as exc:
        raise BuildError(f"could not run the Zig compiler ({sys.executable} -m ziglang): {exc}") from exc
    names = ", ".join(os.fspath(src) for src in sources)
    if proc.returncode != 0:
        detail = _trim(proc.stderr) or _trim(proc.stdout) or "(no output)"
        raise BuildError(
            f"compiling guest {out.name} from {names} failed (zig cc exit code {proc.returncode}):\n{detail}"
        )
    _validate(out, names)
    return out


def _validate(out: pathlib.Path, names: str) -> None:
    """Raise BuildError unless ``out`` is a module wasmtime accepts."""
    import wasmtime  # local: keep `import wasmshare.abi` cheap

    try:
        data = out.read_bytes()
    except OSError as exc:
        raise BuildError(f"the compiler reported success but {out} cannot be read: {exc}") from exc
    try:
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        out.unlink(missing_ok=True)
        raise BuildError(f"compiling {names} produced a module wasmtime rejects: {exc}") from exc
