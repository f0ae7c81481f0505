"""The package surface: exports, typing marker, and the core's light imports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import wasmshare
from conftest import PYTHON, child_env


def test_all_names_exist_and_are_public() -> None:
    for name in wasmshare.__all__:
        assert hasattr(wasmshare, name), name
    public = {n for n in dir(wasmshare) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(wasmshare.__all__), public - set(wasmshare.__all__)


def test_ships_type_information() -> None:
    assert (Path(wasmshare.__file__).parent / "py.typed").is_file()


def test_core_import_does_not_pull_heavy_layers() -> None:
    code = (
        "import sys, wasmshare; "
        "heavy = [m for m in ('torch', 'fastapi', 'transformers', 'typer', 'wasmshare.cli') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([PYTHON, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
