#!/bin/sh
# Rebuild every guests/*.c, guests/controllers/*.c and guests/plugins/*.c into the
# checked-in .wasm next to it (build_guest defaults: wasm32-freestanding, -O2; warnings
# are errors and do not change the code), as tests/test_build.py,
# tests/test_controller_guests.py and tests/test_plugins.py check.
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

for folder in ("guests", "guests/controllers", "guests/plugins"):
    for src in sorted(pathlib.Path(folder).glob("*.c")):
        out = build_guest([src], src.with_suffix(".wasm"), extra_flags=["-Wall", "-Wextra", "-Werror"])
        print(f"{out} ({out.stat().st_size} bytes)")
PYEOF
