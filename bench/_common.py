"""Shared helpers for the wasmshare benchmarks: timing, machine info, result files.

Result file format (DESIGN.md, "Benchmark result format"): each benchmark writes
``bench/results/<bench>.json`` as one JSON *object*::

    {"bench": name, "machine": {...}, "rows": [row, ...], "targets": [...], ...}

DESIGN asks for "a list of rows ... plus any extra fields"; the rows list sits under
``"rows"`` and the extra fields (the machine record, ``targets`` and whatever a bench
adds) sit beside it, so the file is an object, not a bare list. Every row has at least
``{"case": str, "ours_us": float, "baseline": str, "baseline_us": float, "ratio": float}``
with ``ratio = baseline_us / ours_us`` (above 1 means wasmshare is faster); a bench may
add more fields to a row. A target is ``{"target": str, "met": bool, "value": ...}``.

This module is loaded by file path (the bench scripts put their own folder on
``sys.path``); ``bench`` is not a package.
"""

from __future__ import annotations

import datetime as _dt
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

__all__ = ["RESULTS_DIR", "machine_info", "timeit_us", "make_row", "report"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Cores, CPU model, Python, platform, wasmtime/numpy versions and the date."""
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "wasmtime": _version("wasmtime"),
        "numpy": _version("numpy"),
        "wasmshare": _version("wasmshare"),
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _loop_ns(fn: Callable[[], Any], number: int) -> int:
    rng = range(number)
    t0 = time.perf_counter_ns()
    for _ in rng:
        fn()
    return time.perf_counter_ns() - t0


def timeit_us(
    fn: Callable[[], Any],
    *,
    repeat: int = 7,
    number: int | None = None,
    min_time_s: float = 0.2,
) -> dict[str, Any]:
    """Time ``fn()`` and return per-call microseconds.

    ``number`` calls make one repeat; when ``None`` it is chosen so one repeat lasts
    about ``min_time_s / repeat``. A warmup runs first. The garbage collector is off
    while timing (as in :mod:`timeit`). Returns ``{"median_us", "min_us", "p99_us",
    "repeat", "number"}``; ``median_us`` (the median of the repeats) is the number to
    report on a noisy machine, ``min_us`` the best case.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    per_repeat_ns = max(min_time_s / repeat, 1e-4) * 1e9
    for _ in range(3):  # warmup: caches, lazily compiled paths
        fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if number is None:
            number = 1
            while True:
                elapsed = _loop_ns(fn, number)
                if elapsed >= per_repeat_ns / 4 or number >= 1 << 30:
                    break
                number *= 2 if elapsed else 10
            # scale to the target duration from the last calibration
            per_call = elapsed / number if elapsed else 1.0
            number = max(1, int(per_repeat_ns / per_call))
        _loop_ns(fn, number)  # warmup at full length
        samples = [_loop_ns(fn, number) / number / 1000.0 for _ in range(repeat)]
    finally:
        if gc_was_enabled:
            gc.enable()
    ordered = sorted(samples)
    # p99 of the repeat samples (nearest rank); with few repeats it is the slowest one
    rank = max(0, min(len(ordered) - 1, -(-99 * len(ordered) // 100) - 1))
    return {
        "median_us": statistics.median(samples),
        "min_us": ordered[0],
        "p99_us": ordered[rank],
        "repeat": repeat,
        "number": number,
    }


def make_row(
    case: str, ours: dict[str, Any], baseline: str, base: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """A result row from two :func:`timeit_us` results (medians; mins kept as extra fields)."""
    ours_us = float(ours["median_us"])
    baseline_us = float(base["median_us"])
    row: dict[str, Any] = {
        "case": case,
        "ours_us": round(ours_us, 4),
        "baseline": baseline,
        "baseline_us": round(baseline_us, 4),
        "ratio": round(baseline_us / ours_us, 3) if ours_us > 0 else float("inf"),
        "ours_min_us": round(float(ours["min_us"]), 4),
        "baseline_min_us": round(float(base["min_us"]), 4),
    }
    row.update(extra)
    return row


_CORE = ("case", "ours_us", "baseline", "baseline_us", "ratio")


def _shown(key: str) -> bool:
    """Extra row fields shown in the printed table (all of them go to the JSON file)."""
    return not (key.endswith("_min_us") or key.startswith(("steps_", "detail_")))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def report(
    name: str,
    rows: list[dict[str, Any]],
    *,
    out_dir: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/<name>.json`` and print the rows (and targets) as a table.

    The file is ``{"bench": name, "machine": machine_info(), "rows": rows, **extra}``.
    The table shows the core columns and the rows' extra fields, except per-repeat detail
    (``*_min_us``, ``steps_*``, ``detail_*``), which is only in the file. ``extra["targets"]``, if
    present, is printed one line per target (met / NOT met).
    Returns the path written.
    """
    for row in rows:
        missing = [k for k in _CORE if k not in row]
        if missing:
            raise ValueError(f"row {row!r} lacks {missing}")
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"bench": name, "machine": machine_info(), "rows": rows}
    payload.update(extra or {})
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)

    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
    extra_cols: list[str] = []
    for row in rows:
        for key in row:
            if key not in _CORE and key not in extra_cols and _shown(key):
                extra_cols.append(key)
    m = payload["machine"]
    table = Table(
        title=f"bench {name}",
        caption=f"{m['cpu_model']}, {m['cores']} cores, Python {m['python']}, wasmtime {m['wasmtime']}",
    )
    table.add_column("case")
    table.add_column("ours µs", justify="right")
    table.add_column("baseline")
    table.add_column("baseline µs", justify="right")
    table.add_column("ratio", justify="right")
    for col in extra_cols:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(
            str(row["case"]),
            _fmt(row["ours_us"]),
            str(row["baseline"]),
            _fmt(row["baseline_us"]),
            f"{row['ratio']:.1f}×",
            *(_fmt(row.get(col, "")) for col in extra_cols),
        )
    console.print(table)
    for t in (extra or {}).get("targets", []):
        status = "[green]met[/green]" if t.get("met") else "[red]NOT met[/red]"
        console.print(f"target {t['target']}: {status} (value: {_fmt(t.get('value'))})")
    console.print(f"wrote {path}")
    return path


def bench_main(
    name: str,
    doc: str | None,
    argv: list[str] | None,
    run: Callable[[bool], list[dict[str, Any]]],
    targets: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    quick_help: str = "a fast smoke run (fewer, shorter repeats)",
) -> int:
    """The command line every plain benchmark shares: ``--quick``, ``--out``, run, report."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"bench_{name}", description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    ns = parser.parse_args(argv)
    rows = run(ns.quick)
    report(name, rows, out_dir=ns.out, extra={"quick": ns.quick, "targets": targets(rows)})
    return 0
