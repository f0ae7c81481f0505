"""Compile Rust guests against the wasmshare Rust SDK (``sdk/rust``, crate ``wasmshare_guest``).

:func:`build_rust_guest` is what ``wasmshare build x.rs`` runs. It drives ``rustc``
directly, not cargo: the SDK has no dependencies and a guest is one file, so two
``rustc`` calls (the SDK as an rlib, then the guest as a ``cdylib``) build it with no
crate registry, which guests are built without. It needs a ``rustc`` with the
``wasm32-unknown-unknown`` standard library (Debian: ``apt-get install rustc
libstd-rust-dev-wasm32``); :func:`find_rustc` finds one.

Builds are reproducible: paths are remapped and debug info is stripped, so the same
source, SDK and ``rustc`` give the same bytes wherever they are built, which is what
the tests' check that the checked-in modules are up to date relies on.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from wasmshare.abi.build import Optimize
from wasmshare.errors import BuildError

__all__ = ["build_rust_guest", "find_rustc", "rust_sdk_dir", "RUST_TARGET"]

RUST_TARGET = "wasm32-unknown-unknown"

# opt-level per optimize mode. "debug" keeps overflow checks and debug assertions, which
# trap like any panic; the optimised builds keep bounds checks (Rust always does).
_OPT_FLAGS: dict[str, tuple[str, ...]] = {
    "fast": ("-C", "opt-level=3"),
    "small": ("-C", "opt-level=z"),
    "debug": ("-C", "opt-level=0", "-C", "debug-assertions=on", "-C", "overflow-checks=on"),
}
# The same 64 KiB stack as C guests: Rust's wasm layout puts the stack first, so an
# overflow runs below address 0 and traps rather than corrupting static data.
_COMMON_FLAGS = (
    "--edition",
    "2021",
    "--target",
    RUST_TARGET,
    "-C",
    "panic=abort",
    "-C",
    "target-feature=+bulk-memory,+simd128",
    "-C",
    "strip=debuginfo",
)
_MAX_STDERR_CHARS = 4000


def rust_sdk_dir() -> pathlib.Path:
    """Return the folder of the Rust SDK crate (``Cargo.toml``, ``src/lib.rs``)."""
    return pathlib.Path(__file__).resolve().parent / "sdk" / "rust"


def _has_wasm_target(rustc: str) -> bool:
    try:
        out = subprocess.run(
            [rustc, "--print", "target-libdir", "--target", RUST_TARGET],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    libdir = pathlib.Path(out.stdout.strip())
    return out.returncode == 0 and libdir.is_dir() and any(libdir.glob("libcore-*.rlib"))


@functools.cache
def find_rustc() -> str | None:
    """The first ``rustc`` with the wasm32 standard library, or None.

    Looked for in order: ``$WASMSHARE_RUSTC``, ``rustc`` on ``PATH``, ``/usr/bin/rustc``
    (a rustup toolchain without the target often shadows Debian's, which has it).
    """
    candidates = [os.environ.get("WASMSHARE_RUSTC"), shutil.which("rustc"), "/usr/bin/rustc"]
    for rustc in candidates:
        if rustc and _has_wasm_target(rustc):
            return rustc
    return None


def _run(cmd: Sequence[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except subprocess.TimeoutExpired:
        raise BuildError(f"rustc took over 600 s on {what}") from None
    if proc.returncode != 0:
        text = proc.stderr.strip()
        if len(text) > _MAX_STDERR_CHARS:
            text = "...\n" + text[-_MAX_STDERR_CHARS:]
        raise BuildError(f"rustc failed on {what}:\n{text}")


def build_rust_guest(
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    optimize: Optimize = "fast",
) -> pathlib.Path:
    """Compile one Rust source file that uses ``wasmshare_guest`` into a guest module.

    The source is a crate root (``#![no_std]``; the SDK brings the panic handler) and is
    built as a ``cdylib`` for ``wasm32-unknown-unknown``. Raises :class:`BuildError`
    with rustc's message when it does not compile, when no suitable ``rustc`` is found,
    or when wasmtime refuses the result.
    """
    if optimize not in _OPT_FLAGS:
        raise ValueError(f"optimize must be one of {sorted(_OPT_FLAGS)}, not {optimize!r}")
    src = pathlib.Path(source).resolve()  # absolute, so the remapping below applies to it
    if not src.is_file():
        raise BuildError(f"no Rust source at {src}")
    rustc = find_rustc()
    if rustc is None:
        raise BuildError(
            f"no rustc with the {RUST_TARGET} target found (Debian: apt-get install rustc "
            "libstd-rust-dev-wasm32; or set WASMSHARE_RUSTC)"
        )
    out = pathlib.Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    sdk = rust_sdk_dir()
    opt = _OPT_FLAGS[optimize]
    with tempfile.TemporaryDirectory(prefix="wasmshare-rust-") as tmp:
        rlib = pathlib.Path(tmp) / "libwasmshare_guest.rlib"
        _run(
            [
                rustc,
                *_COMMON_FLAGS,
                *opt,
                "--crate-name",
                "wasmshare_guest",
                "--crate-type",
                "rlib",
                f"--remap-path-prefix={sdk}=wasmshare_guest",
                "-o",
                str(rlib),
                str(sdk / "src" / "lib.rs"),
            ],
            "the wasmshare_guest SDK",
        )
        crate = src.stem.replace("-", "_")
        _run(
            [
                rustc,
                *_COMMON_FLAGS,
                *opt,
                "--crate-name",
                crate,
                "--crate-type",
                "cdylib",
                "-C",
                "link-arg=-zstack-size=65536",
                f"--remap-path-prefix={src.parent}=.",
                f"--remap-path-prefix={tmp}=.",
                "--extern",
                f"wasmshare_guest={rlib}",
                "-o",
                str(out),
                str(src),
            ],
            str(src),
        )
    _check_module(out)
    return out


def _check_module(path: pathlib.Path) -> None:
    import wasmtime

    try:
        wasmtime.Module.validate(wasmtime.Engine(), path.read_bytes())
    except Exception as e:  # noqa: BLE001 - wasmtime raises several types for invalid modules
        raise BuildError(f"rustc produced a module wasmtime refuses: {e}") from e
