"""Plugin processes sharing one schema: memory of 8 plugins and time to the first answer.

Issue targets: with 8 plugin processes alive at once, the PSS of all of them plus the
host's is at most 1.1 copies of the schema blob for our designs (the copying baseline
is about 8 copies); and a plugin's first answer comes within 2x of a plugin that has no
schema at all.

Designs (``mode``), each run by its own host process so that the host holds only what
that design needs:

* ``copy`` (the baseline): the host streams the blob from a file through each plugin's
  socket (``sendfile``) into the plugin guest's own linear memory: one private copy each.
* ``loan`` (ours): the host publishes the blob once as a sealed memfd, sends the fd, and
  each plugin lends it read-only into its guest.
* ``embedded`` (ours): the blob sits in the plugin module's data segment; the module is
  compiled once to a ``.cwasm`` file (outside the measured run, fsynced), and each plugin
  maps it copy-on-write with ``Module.deserialize_file``.
* ``none``: the same plugin with no schema at all: the reference for start time and
  for the per-process overhead.

Memory: all plugins alive, each has answered one query and then read one byte of every
page of the blob through its guest memory (so every page is mapped in every process:
the worst case for sharing). PSS and RSS come from ``/proc/PID/smaps_rollup``. ``copies``
is (total PSS of host + plugins) minus the same for ``none``, divided by the blob size:
the memory the schema costs, in schema copies. ``pss_mib`` is the raw total.

First answer: time from starting one plugin process (``Popen``) to the answer of its
first query, alone on the machine, median of several starts; the blob is already
published (or compiled) before the clock starts.

Run from the repo root: ``.venv/bin/python bench/bench_plugins.py [--quick] [--size 100MiB] [--plugins 8] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

NAME = "plugins"
ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MIB = 1024 * 1024
MAX_COPIES = 1.1
MAX_FIRST_ANSWER_RATIO = 2.0
QUERIES = 50


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------- one design, in its own host process


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """Child mode: run one design with N plugins, print memory and timings as JSON."""
    from wasmshare.plugins import EmbeddedPlugin, PluginHost, Publication, memory_usage, sample_program
    from wasmshare.plugins.blob import SchemaBlob

    mode = args.measure
    blob_path = Path(args.blob)
    publication = None
    if mode == "loan":
        publication = Publication.publish(blob_path)
        source: Any = publication
    elif mode == "copy":
        source = blob_path
    elif mode == "embedded":
        source = EmbeddedPlugin.load(args.artifact)
    else:
        source = None
    # The program: sampled from the schema through a short-lived read-only mapping.
    import mmap

    with open(blob_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
        schema = SchemaBlob(mm, check_json=False)
        program = sample_program(schema, resources=40, seed=7, mistakes=0.25)
        schema.release()
    out: dict[str, Any] = {"mode": mode}
    host = PluginHost(source, mode=mode)
    try:
        t0 = time.perf_counter()
        plugins = host.spawn(args.plugins)
        results = host.check_all(program)
        out["start_all_us"] = (time.perf_counter() - t0) * 1e6
        answers = []
        for r in results:
            if not hasattr(r, "diagnostics"):
                raise RuntimeError(f"{mode}: a plugin failed: {r}")
            answers.append([(d.path, d.kind, d.expected, d.actual) for d in r.diagnostics])
        if any(a != answers[0] for a in answers):
            raise RuntimeError(f"{mode}: plugins disagree")
        out["diagnostics"] = answers[0]
        for p in plugins:
            p.touch_blob()
        usages = [memory_usage()] + [p.memory() for p in plugins]
        out["memory"] = [
            {
                "pid": u.pid,
                "pss": u.pss_bytes,
                "rss": u.rss_bytes,
                "anon": u.pss_anon_bytes,
                "file": u.pss_file_bytes,
                "shmem": u.pss_shmem_bytes,
            }
            for u in usages
        ]
        q = []
        for _ in range(QUERIES):
            t = time.perf_counter()
            plugins[0].check(program)
            q.append((time.perf_counter() - t) * 1e6)
        out["query_us"] = statistics.median(q)
    finally:
        host.close()
    if publication is not None:
        publication.release()
    return out


def _run_child(mode: str, blob: Path, artifact: Path | None, plugins: int) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        mode,
        "--blob",
        str(blob),
        "--plugins",
        str(plugins),
    ]
    if artifact is not None:
        cmd += ["--artifact", str(artifact)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {mode} failed:\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _first_answers(blob_path: Path, embedded: Any, repeat: int) -> dict[str, list[float]]:
    """Process start to first answer, one plugin alone, the designs interleaved round by round."""
    from wasmshare.plugins import PluginHost, Publication, sample_program

    publication = Publication.publish(blob_path)
    program = sample_program(publication.schema, resources=40, seed=7, mistakes=0.25)
    sources: dict[str, Any] = {"none": None, "copy": blob_path, "loan": publication, "embedded": embedded}
    out: dict[str, list[float]] = {m: [] for m in sources}
    try:
        for _ in range(repeat + 1):  # the first round warms caches and is dropped
            for mode, source in sources.items():
                with PluginHost(source, mode=mode) as host:  # type: ignore[arg-type]
                    t0 = time.perf_counter()
                    (p,) = host.spawn(1)
                    p.check(program)
                    out[mode].append((time.perf_counter() - t0) * 1e6)
    finally:
        publication.release()
    return {m: v[1:] for m, v in out.items()}


# --------------------------------------------------------------------------- the benchmark


def run(quick: bool, size_bytes: int, n_plugins: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from wasmshare.plugins import embed_plugin, generate_blob

    repeat = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="wasmshare-bench-plugins-") as tmp:
        t0 = time.perf_counter()
        blob = generate_blob(size_bytes, seed=0)
        generate_s = time.perf_counter() - t0
        blob_nbytes = len(blob)
        blob_path = Path(tmp) / "schema.blob"
        blob_path.write_bytes(blob)
        t0 = time.perf_counter()
        embedded = embed_plugin(blob, out=Path(tmp) / "typecheck-embedded.cwasm")
        embed_s = time.perf_counter() - t0
        del blob
        os.sync()
        measured = {
            mode: _run_child(mode, blob_path, embedded.path if mode == "embedded" else None, n_plugins)
            for mode in ("none", "copy", "loan", "embedded")
        }
        firsts = _first_answers(blob_path, embedded, repeat)
    for mode in ("copy", "loan", "embedded"):
        if measured[mode]["diagnostics"] != measured["loan"]["diagnostics"]:
            raise RuntimeError(f"{mode} and loan disagree on the same program")

    def totals(mode: str) -> dict[str, float]:
        mem = measured[mode]["memory"]
        return {"pss": sum(m["pss"] for m in mem), "rss": sum(m["rss"] for m in mem)}

    none = totals("none")
    base = totals("copy")
    first = {m: statistics.median(firsts[m]) for m in firsts}

    def mem_fields(mode: str) -> dict[str, Any]:
        t = totals(mode)
        mem = measured[mode]["memory"]
        return {
            "pss_mib": round(t["pss"] / MIB, 1),
            "rss_mib": round(t["rss"] / MIB, 1),
            "copies": round((t["pss"] - none["pss"]) / blob_nbytes, 3),
            "schema_pss_mib": round((t["pss"] - none["pss"]) / MIB, 1),
            "host_pss_mib": round(mem[0]["pss"] / MIB, 1),
            "query_us": round(measured[mode]["query_us"], 1),
        }

    rows: list[dict[str, Any]] = []
    labels = {
        "copy": "copy through a pipe (baseline)",
        "loan": "read-only loan",
        "embedded": "embedded CoW data",
    }
    for mode in ("copy", "loan", "embedded"):
        ours = measured[mode]["start_all_us"]
        baseline = measured["copy"]["start_all_us"]
        rows.append(
            {
                "case": f"{n_plugins} plugins alive: {labels[mode]}",
                "ours_us": round(ours, 1),
                "baseline": "copy through a pipe",
                "baseline_us": round(baseline, 1),
                "ratio": round(baseline / ours, 3),
                **mem_fields(mode),
            }
        )
    rows.append(
        {
            "case": f"{n_plugins} plugins alive: no schema (reference)",
            "ours_us": round(measured["none"]["start_all_us"], 1),
            "baseline": "copy through a pipe",
            "baseline_us": round(measured["copy"]["start_all_us"], 1),
            "ratio": round(measured["copy"]["start_all_us"] / measured["none"]["start_all_us"], 3),
            "pss_mib": round(none["pss"] / MIB, 1),
            "rss_mib": round(none["rss"] / MIB, 1),
            "copies": 0.0,
        }
    )
    for mode in ("loan", "embedded", "copy"):
        rows.append(
            {
                "case": f"first answer: {labels[mode]}",
                "ours_us": round(first[mode], 1),
                "baseline": "plugin with no schema",
                "baseline_us": round(first["none"], 1),
                "ratio": round(first["none"] / first[mode], 3),
                "slowdown": round(first[mode] / first["none"], 3),
            }
        )
    extra = {
        "blob_bytes": blob_nbytes,
        "blob_mib": round(blob_nbytes / MIB, 2),
        "plugins": n_plugins,
        "generate_s": round(generate_s, 2),
        "embed_compile_s": round(embedded.compile_s, 2),
        "embed_total_s": round(embed_s, 2),
        "none_total_pss_mib": round(none["pss"] / MIB, 1),
        "baseline_copies": round((base["pss"] - none["pss"]) / blob_nbytes, 3),
        "measures": {
            "plugins alive rows": "ours_us/baseline_us: start every plugin and answer one query (us); "
            "pss_mib/rss_mib: host + plugins after each plugin read every blob page; "
            "copies: (pss - pss of the no-schema run) / blob size; query_us: one check round trip",
            "first answer rows": "process start (Popen) to the first answered query of one plugin alone (us), median",
        },
        "first_answer_samples_us": {m: [round(x, 1) for x in v] for m, v in firsts.items()},
        "memory_detail": {m: measured[m]["memory"] for m in measured},
    }
    return rows, extra


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {r["case"].split(": ", 1)[1]: r for r in rows if r["case"].split(": ", 1)[0].endswith("alive")}
    first = {r["case"].split(": ", 1)[1]: r for r in rows if r["case"].startswith("first answer")}
    out = []
    for label in ("read-only loan", "embedded CoW data"):
        c = by[label]["copies"]
        out.append(
            {
                "target": f"{label}: total PSS <= {MAX_COPIES} schema copies",
                "met": c <= MAX_COPIES,
                "value": c,
            }
        )
        s = first[label]["slowdown"]
        out.append(
            {
                "target": f"{label}: first answer within {MAX_FIRST_ANSWER_RATIO}x of no schema",
                "met": s <= MAX_FIRST_ANSWER_RATIO,
                "value": s,
            }
        )
    out.append(
        {
            "target": "baseline (copy): about one copy per plugin (informative)",
            "met": True,
            "value": by["copy through a pipe (baseline)"]["copies"],
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_plugins", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 MiB schema, 4 plugins, 2 starts")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default bench/results)")
    parser.add_argument("--size", default=None, help="schema size (default 100MiB; 8MiB with --quick)")
    parser.add_argument(
        "--plugins", type=int, default=None, help="plugin processes (default 8; 4 with --quick)"
    )
    parser.add_argument("--measure", choices=("none", "copy", "loan", "embedded"), help=argparse.SUPPRESS)
    parser.add_argument("--blob", help=argparse.SUPPRESS)
    parser.add_argument("--artifact", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.measure:
        print(json.dumps(_measure(ns)))
        return 0
    from wasmshare.plugins import parse_size

    size = parse_size(ns.size or ("8MiB" if ns.quick else "100MiB"))
    n = ns.plugins or (4 if ns.quick else 8)
    rows, extra = run(ns.quick, size, n)
    _common.report(NAME, rows, out_dir=ns.out, extra={"quick": ns.quick, "targets": targets(rows), **extra})
    return 0


if __name__ == "__main__":
    sys.exit(main())
