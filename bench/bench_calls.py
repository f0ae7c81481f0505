"""Call overhead: wasmshare's fast path against the plain wasmtime binding.

Issue target: a call costs at most 2 µs and is at least 15× faster than
``wasmtime.Func.__call__``. Same guest (``guests/calls.wasm``), same run, for 0, 2 and 4
i32 arguments (``nop``, ``add``, ``add4``):

* ours: ``g.func(name)(*args)`` (``fast=True``);
* baseline: the raw export, ``export(store, *args)`` — ``wasmtime.Func.__call__`` with
  no wasmshare wrapper around it.

Each row also records ``fast_false_us``: ``g.func(name, fast=False)`` (wasmshare's
wrapper over ``Func.__call__``), for information only.

Run from the repo root: ``PYTHONPATH=src .venv/bin/python bench/bench_calls.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "calls"
GUEST = Path(__file__).resolve().parent.parent / "guests" / "calls.wasm"
CASES = [("call 0 args", "nop", ()), ("call 2 args", "add", (1, 2)), ("call 4 args", "add4", (1, 2, 3, 4))]
BASELINE = "wasmtime.Func.__call__ (raw export)"
MAX_US = 2.0
MIN_RATIO = 15.0


def run(quick: bool = False) -> list[dict[str, Any]]:
    import wasmtime

    from wasmshare import Guest

    timing: dict[str, Any] = {"repeat": 3, "min_time_s": 0.05} if quick else {"repeat": 7, "min_time_s": 0.3}
    rows: list[dict[str, Any]] = []
    with Guest(GUEST) as g:
        store = g._store
        exports = g._instance.exports(store)
        for case, name, args in CASES:
            fast = g.func(name)
            slow = g.func(name, fast=False)
            export = exports[name]
            if not isinstance(export, wasmtime.Func):
                raise TypeError(f"export {name!r} is not a function")
            expected = export(store, *args)
            if fast(*args) != expected or slow(*args) != expected:
                raise AssertionError(f"{name}{args}: fast/slow paths disagree with the raw export")
            if args:
                ours = _common.timeit_us(lambda f=fast, a=args: f(*a), **timing)
                base = _common.timeit_us(lambda e=export, a=args: e(store, *a), **timing)
                wrapped = _common.timeit_us(lambda f=slow, a=args: f(*a), **timing)
            else:
                ours = _common.timeit_us(lambda f=fast: f(), **timing)
                base = _common.timeit_us(lambda e=export: e(store), **timing)
                wrapped = _common.timeit_us(lambda f=slow: f(), **timing)
            rows.append(
                _common.make_row(
                    case,
                    ours,
                    BASELINE,
                    base,
                    export=name,
                    nargs=len(args),
                    fast_false_us=round(wrapped["median_us"], 4),
                )
            )
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for row in rows:
        out.append(
            {
                "target": f"{row['case']}: ours ≤ {MAX_US} µs",
                "met": row["ours_us"] <= MAX_US,
                "value": row["ours_us"],
            }
        )
        out.append(
            {
                "target": f"{row['case']}: ≥ {MIN_RATIO:g}× faster than Func.__call__",
                "met": row["ratio"] >= MIN_RATIO,
                "value": row["ratio"],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    return _common.bench_main(NAME, __doc__, argv, lambda quick: run(quick=quick), targets)


if __name__ == "__main__":
    raise SystemExit(main())
