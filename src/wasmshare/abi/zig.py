"""Compile Zig guests against the wasmshare Zig SDK (``sdk/zig/wasmshare.zig``).

:func:`build_zig_guest` is what ``wasmshare build x.zig`` runs. It drives ``python -m ziglang
build-exe`` from the ``ziglang`` wheel (the compiler C guests use too, so nothing else needs
installing), with the SDK passed on the command line as the module ``wasmshare`` (the guest
writes ``@import("wasmshare")``; no ``build.zig`` or package manager), for
``wasm32-freestanding`` with no entry point and the guest's exports kept.

Why these choices:

* The default ``fast`` build is ``ReleaseSafe``, not ``ReleaseFast``: bounds, overflow and
  ``unreachable`` checks stay in, and in freestanding wasm a failed one (like any panic)
  compiles to a trap (``unreachable``), so a buggy guest ends its own sequence instead of
  writing past a slice into its own state and answering garbage.
* Builds are stripped (``-fstrip``) and run in a scratch directory with fresh compiler
  caches, so no absolute path or stale cache entry reaches the module: the same source
  text, SDK and Zig version give the same bytes wherever they are built, which lets the
  tests compare the checked-in modules with fresh builds byte for byte.
* The result is validated by wasmtime before it is returned, as :func:`build_guest` does.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Mapping

from wasmshare.abi.build import Optimize
from wasmshare.errors import BuildError

__all__ = ["build_zig_guest", "zig_command", "zig_sdk_dir", "zig_sdk_path", "ZIG_OPTIMIZE_MODES"]

#: ``optimize`` argument -> Zig ``-O`` mode. ``fast`` keeps the safety checks (see above).
ZIG_OPTIMIZE_MODES: Mapping[str, str] = {"fast": "ReleaseSafe", "small": "ReleaseSmall", "debug": "Debug"}
# Longest compiler output quoted in a BuildError, in characters (as build.py).
_MAX_STDERR_CHARS = 4000
# A Zig build of one guest takes seconds; this only stops a wedged compiler.
_TIMEOUT_S = 600


def zig_sdk_dir() -> pathlib.Path:
    """Return the folder of the Zig SDK, holding ``wasmshare.zig``.

    It is the repository's ``sdk/zig``, reached through this package's ``sdk`` link.
    """
    return pathlib.Path(__file__).resolve().parent / "sdk" / "zig"


def zig_sdk_path() -> pathlib.Path:
    """Return the SDK source file, ``wasmshare.zig``, passed to Zig as module ``wasmshare``."""
    return zig_sdk_dir() / "wasmshare.zig"


def zig_command(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    optimize: Optimize = "fast",
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Return the ``zig build-exe`` command line :func:`build_zig_guest` runs, without running it.

    ``cache_dir``: a folder for Zig's local and global caches (``build_zig_guest`` passes a
    fresh one); ``None`` leaves Zig's defaults. Useful to print the command or to copy it
    into a Makefile.
    """
    if optimize not in ZIG_OPTIMIZE_MODES:
        raise ValueError(f"optimize must be one of {sorted(ZIG_OPTIMIZE_MODES)}, not {optimize!r}")
    cmd = [sys.executable, "-m", "ziglang", "build-exe"]
    if cache_dir is not None:
        cache = pathlib.Path(cache_dir)
        cmd += ["--cache-dir", os.fspath(cache / "local"), "--global-cache-dir", os.fspath(cache / "global")]
    # -fno-entry: a guest is a library of exports, not a program; -rdynamic: keep the
    # `export`/@export functions as wasm exports (Zig drops them from an exe otherwise).
    cmd += ["-target", "wasm32-freestanding", "-fno-entry", "-rdynamic", "-O", ZIG_OPTIMIZE_MODES[optimize]]
    if optimize != "debug":
        cmd.append("-fstrip")  # no DWARF or names: smaller modules, no paths embedded
    # Module flags apply to the next -M: the root module depends on `wasmshare`, the SDK.
    cmd += ["--dep", "wasmshare", f"-Mroot={os.fspath(source)}", f"-Mwasmshare={zig_sdk_path()}"]
    cmd.append(f"-femit-bin={os.fspath(output)}")
    return cmd


def _trim(text: str) -> str:
    text = text.strip()
    if len(text) > _MAX_STDERR_CHARS:
        text = "...\n" + text[-_MAX_STDERR_CHARS:]
    return text


def build_zig_guest(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    optimize: Optimize = "fast",
) -> pathlib.Path:
    """Compile one Zig source file that does ``@import("wasmshare")`` into a guest module.

    Parameters
    ----------
    source
        The root ``.zig`` file; the SDK is importable as ``wasmshare``, and ``std`` as usual.
    output
        Path of the ``.wasm`` file to write; its folder is created if needed.
    optimize
        ``"fast"`` (``ReleaseSafe``: optimised, safety checks kept, a failed one traps),
        ``"small"`` (``ReleaseSmall``: no safety checks, so an out-of-bounds index is
        undefined behaviour, as in C) or ``"debug"`` (``Debug``, with debug info).

    Returns the path of the module, which wasmtime accepts.

    Raises
    ------
    BuildError
        ``ziglang`` is not installed, the source or the SDK is missing, the compiler
        failed (its messages are in the error), or the output is not a valid module.
    ValueError
        ``optimize`` is not one of the three.
    """
    if optimize not in ZIG_OPTIMIZE_MODES:
        raise ValueError(f"optimize must be one of {sorted(ZIG_OPTIMIZE_MODES)}, not {optimize!r}")
    src = pathlib.Path(source).resolve()
    if not src.is_file():
        raise BuildError(f"Zig guest source file not found: {os.fspath(source)}")
    if not zig_sdk_path().is_file():
        raise BuildError(f"the wasmshare Zig SDK is missing: {zig_sdk_path()} (a broken install?)")
    if importlib.util.find_spec("ziglang") is None:
        raise BuildError(
            "building Zig guests needs the Zig toolchain from PyPI, which is not installed in "
            f"this Python ({sys.executable}); install it with: pip install 'wasmshare[sdk]'"
        )
    out = pathlib.Path(output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="wasmshare-zig-") as tmp:
        cmd = zig_command(src, out, optimize=optimize, cache_dir=tmp)
        try:
            # cwd: Zig looks for a build.zig and writes caches relative to it; keep both here.
            proc = subprocess.run(
                cmd,
                cwd=tmp,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BuildError(f"compiling Zig guest {out.name} from {src} took over {_TIMEOUT_S} s") from None
        except OSError as exc:
            raise BuildError(f"could not run the Zig compiler ({sys.executable} -m ziglang): {exc}") from exc
    if proc.returncode != 0:
        detail = _trim(proc.stderr) or _trim(proc.stdout) or "(no output)"
        raise BuildError(
            f"compiling Zig guest {out.name} from {src} failed (zig build-exe exit code {proc.returncode}):\n"
            f"{detail}"
        )
    _validate(out, src)
    return out


def _validate(out: pathlib.Path, src: pathlib.Path) -> None:
    """Raise BuildError unless ``out`` is a module wasmtime accepts."""
    import wasmtime  # local: keep `import wasmshare.abi.zig` cheap

    try:
        data = out.read_bytes()
    except OSError as exc:
        raise BuildError(f"zig reported success but {out} cannot be read: {exc}") from exc
    try:
        wasmtime.Module.validate(wasmtime.Engine(), data)
    except wasmtime.WasmtimeError as exc:
        out.unlink(missing_ok=True)
        raise BuildError(f"compiling {src} produced a module wasmtime rejects: {exc}") from exc
