"""Child process of :func:`wasmshare._engine.compile_in_child`: compile stdin's wasm into the cache.

Arguments: fuel and epoch flags (0 or 1), then the address-space limit in bytes, applied
before wasmtime loads. Exit 0 once the artifact is written; on an invalid module, exit 1
with the reason as the last line of stderr.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import resource

    limit = int(argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import wasmtime

    from ._engine import EngineOptions, compile_module

    wasm = sys.stdin.buffer.read()
    options = EngineOptions(fuel=argv[0] == "1", epoch=argv[1] == "1")
    try:
        compile_module(wasm, options)
    except wasmtime.WasmtimeError as e:
        from ._module import wasmtime_error_summary

        print(f"invalid wasm module: {wasmtime_error_summary(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
