"""Fixtures of the vLLM tests: they run in vLLM's environment, with wasmshare's next to it.

Run as ``WASMSHARE_PYTHON=.venv/bin/python .venv-vllm/bin/python -m pytest tests_vllm``.
vLLM reads its environment at import, so the CPU KV-cache size is set before anything
imports it; the controller service is started by the processor with ``$WASMSHARE_PYTHON``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parent.parent

# A small JSON Schema the steered requests answer under.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="session")
def wasmshare_python() -> str:
    python = os.environ.get("WASMSHARE_PYTHON")
    if not python:
        pytest.skip("set WASMSHARE_PYTHON to the python of wasmshare's own environment")
    return python


@pytest.fixture(scope="session")
def model_folder(wasmshare_python: str) -> str:
    """wasmshare's converted SmolLM2-135M folder (downloaded and converted on first use)."""
    code = "from wasmshare.llm.models import load_model; print(load_model('smollm2-135m').path)"
    done = subprocess.run([wasmshare_python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


CONTROLLERS = ("allow_list", "boost_words", "hostile_controller")


def controller_id(name: str) -> str:
    """The id (sha256) a guest under ``guests/controllers`` is stored by."""
    return hashlib.sha256((ROOT / "guests" / "controllers" / f"{name}.wasm").read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def controllers_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A controllers folder holding :data:`CONTROLLERS` as ``<sha256>.wasm``; exported to the service."""
    folder = tmp_path_factory.mktemp("controllers")
    for name in CONTROLLERS:
        shutil.copy(ROOT / "guests" / "controllers" / f"{name}.wasm", folder / f"{controller_id(name)}.wasm")
    os.environ["WASMSHARE_CONTROLLERS_DIR"] = str(folder)
    return folder
