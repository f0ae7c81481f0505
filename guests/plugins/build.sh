#!/bin/sh
# Rebuild every guests/plugins/*.c into the checked-in .wasm next to it
# (build_guest defaults: wasm32-freestanding, -O2), as tests/test_plugins.py checks.
# Usage: guests/plugins/build.sh [python]   (default: .venv/bin/python, else python3)
set -eu
cd "$(dirname "$0")/../.."
PY="${1:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PYTHONPATH=src "$PY" - <<'PYEOF'
import pathlib
from wasmshare.abi import build_guest

for src in sorted(pathlib.Path("guests/plugins").glob("*.c")):
    out = build_guest([src], src.with_suffix(".wasm"), extra_flags=["-Wall", "-Wextra", "-Werror"])
    print(f"{out} ({out.stat().st_size} bytes)")
PYEOF
