"""Compile Zig guests against the wasmshare Zig SDK (``sdk/zig/wasmshare.zig``).

:func:`build_zig_guest` is what ``wasmshare build x.zig`` runs. It drives ``python -m
ziglang build-exe`` from the ``ziglang`` wheel (the compiler C guests use too), with the
SDK passed as the module ``wasmshare`` (``@import("wasmshare")``), for
``wasm32-freestanding`` with no entry point and the exported functions kept.

The default ``fast`` build is ``ReleaseSafe``: bounds, overflow and ``unreachable`` checks
stay in, and a failed one (or any panic) compiles to a wasm trap, so a buggy guest ends
itself instead of writing past a slice into its own state. Builds are stripped and run in a
scratch directory (the compiler's caches included), so the same source, SDK and Zig give
the same bytes wherever they are built.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

from wasmshare.abi.build import Optimize
from wasmshare.errors import BuildError

__all__ = ["build_zig_guest", "zig_command", "zig_sdk_dir"]

_OPT_MODES: dict[str, str] = {"fast": "ReleaseSafe", "small": "ReleaseSmall", "debug": "Debug"}
_MAX_STDERR_CHARS = 4000


def zig_sdk_dir() -> pathlib.Path:
    """Return the folder of the Zig SDK (``wasmshare.zig``)."""
    return pathlib.Path(__file__).resolve().parent / "sdk" / "zig"


def zig_command(
    source: str | os.PathLike[str], output: str | os.PathLike[str], *, optimize: Optimize = "fast"
) -> list[str]:
    """Return the ``zig build-exe`` command line :func:`build_zig_guest` runs."""
    if optimize not in _OPT_MODES:
        raise ValueError(f"optimize must be one of {sorted(_OPT_MODES)}, not {optimize!r}")
    cmd = [sys.executable, "-m", "ziglang", "build-exe", "-target", "wasm32-freestanding"]
    cmd += ["-fno-entry", "-rdynamic", "-O", _OPT_MODES[optimize]]
    if optimize != "debug":
        cmd.append("-fstrip")
    cmd += ["--dep", "wasmshare", f"-Mroot={os.fspath(source)}"]
    cmd += [f"-Mwasmshare={zig_sdk_dir() / 'wasmshare.zig'}", f"-femit-bin={os.fspath(output)}"]
    return cmd


def build_zig_guest(
    source: str | os.PathLike[str], output: str | os.PathLike[str], *, optimize: Optimize = "fast"
) -> pathlib.Path:
    """Compile one Zig source file that imports ``wasmshare`` into a guest module.

    Raises :class:`BuildError` with the compiler's message when it does not compile, or
    when wasmtime refuses the result.
    """
    if _ziglang_missing():
        raise BuildError("building Zig guests needs the ziglang package: pip install 'wasmshare[sdk]'")
    src = pathlib.Path(source).resolve()
    if not src.is_file():
        raise BuildError(f"no Zig source at {src}")
    out = pathlib.Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wasmshare-zig-") as tmp:
        cmd = zig_command(src, out, optimize=optimize)
        cmd[4:4] = [
            "--cache-dir",
            os.path.join(tmp, "cache"),
            "--global-cache-dir",
            os.path.join(tmp, "global"),
        ]
        try:
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            raise BuildError(f"zig took over 600 s on {src}") from None
    if proc.returncode != 0:
        text = proc.stderr.strip()
        if len(text) > _MAX_STDERR_CHARS:
            text = "...\n" + text[-_MAX_STDERR_CHARS:]
        raise BuildError(f"zig failed on {src}:\n{text}")
    _check_module(out)
    return out


def _ziglang_missing() -> bool:
    """Whether the ``ziglang`` package is absent."""
    import importlib.util

    return importlib.util.find_spec("ziglang") is None


def _check_module(path: pathlib.Path) -> None:
    import wasmtime

    try:
        wasmtime.Module.validate(wasmtime.Engine(), path.read_bytes())
    except Exception as e:  # noqa: BLE001 - wasmtime raises several types for invalid modules
        raise BuildError(f"zig produced a module wasmtime refuses: {e}") from e
