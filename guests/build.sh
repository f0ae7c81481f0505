#!/bin/sh
# Rebuild every guests/*.c into the checked-in guests/*.wasm next to it, with
# the same settings tests/test_build.py checks against (build_guest defaults).
# Usage: guests/build.sh [python]   (default: .venv/bin/python, else python3)
set -eu
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PYTHONPATH=src "$PY" - <<'PYEOF'
import pathlib
from wasmshare.abi import build_guest

for src in sorted(pathlib.Path("guests").glob("*.c")):
    out = build_guest([src], src.with_suffix(".wasm"))
    print(f"{out} ({out.stat().st_size} bytes)")
PYEOF
