#!/bin/sh
# Rebuild every guests/*.c, guests/controllers/*.c and guests/plugins/*.c into the
# checked-in .wasm next to it (build_guest defaults: wasm32-freestanding, -O2; warnings
# are errors and do not change the code), as tests/test_build.py,
# tests/test_controller_guests.py and tests/test_plugins.py check; and the SDK examples,
# sdk/rust/examples/*.rs (when a rustc with the wasm32 target is found) and
# sdk/zig/examples/*.zig, as tests/test_rust_guests.py and tests/test_zig_guests.py check.
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

from wasmshare.abi.rust import build_rust_guest, find_rustc

if find_rustc() is None:
    print("sdk/rust/examples: skipped, no rustc with the wasm32-unknown-unknown target")
else:
    for src in sorted(pathlib.Path("sdk/rust/examples").glob("*.rs")):
        out = build_rust_guest(src, src.with_suffix(".wasm"))
        print(f"{out} ({out.stat().st_size} bytes)")

from wasmshare.abi.zig import build_zig_guest

for src in sorted(pathlib.Path("sdk/zig/examples").glob("*.zig")):
    out = build_zig_guest(src, src.with_suffix(".wasm"))
    print(f"{out} ({out.stat().st_size} bytes)")
PYEOF
