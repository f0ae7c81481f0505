"""``wasmshare plugins demo``: one large schema, N sandboxed plugin processes, and what it costs.

Generates a provider-like schema blob, runs N type-check plugins over it in each chosen
design (read-only loan, embedded copy-on-write data) and in the copying design, checks
one sample program in every plugin, makes every plugin read every page of the blob, and
prints PSS and RSS per process with every plugin alive. A run of the same plugins with
no schema at all gives the per-process overhead, so the table can say how many copies
of the schema each design really costs.
"""

from __future__ import annotations

import mmap
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .._engine import child_env
from ..errors import PluginError
from .blob import SchemaBlob
from .embedded import EmbeddedPlugin
from .host import CheckResult, PluginHost
from .memory import MIB, MemoryUsage, memory_usage
from .program import Program, sample_program
from .publish import Publication
from .schema import generate_blob

__all__ = ["run_demo", "DemoMode"]

DemoMode = Literal["loan", "embedded", "copy", "all"]
_LABELS = {"none": "no schema", "copy": "copying", "loan": "loan", "embedded": "embedded"}
T = TypeVar("T")


@dataclass
class _Run:
    mode: str
    host: MemoryUsage
    plugins: list[MemoryUsage]
    result: CheckResult

    @property
    def total(self) -> MemoryUsage:
        return MemoryUsage.total([self.host, *self.plugins])


def _in_thread(progress: Progress, task: TaskID, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a thread while the progress display animates; re-raise its error."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    while t.is_alive():
        t.join(0.1)
        progress.refresh()
    progress.update(task, completed=1, total=1)
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def _run_mode(progress: Progress, mode: str, source: Any, n: int, program: Program) -> _Run:
    task = progress.add_task(f"{_LABELS[mode]}: starting {n} plugins", total=None)
    host = PluginHost(source, mode=mode)  # type: ignore[arg-type]
    try:
        plugins = _in_thread(progress, task, lambda: host.spawn(n))
        results = host.check_all(program)
        for r in results:
            if not isinstance(r, CheckResult):
                raise r
        first = results[0]
        assert isinstance(first, CheckResult)
        if any(isinstance(r, CheckResult) and r.diagnostics != first.diagnostics for r in results):
            raise RuntimeError(f"{mode}: plugins disagree on the sample program")
        if mode != "none":
            touch = progress.add_task(
                f"{_LABELS[mode]}: every plugin reads every page of the blob", total=len(plugins)
            )
            for p in plugins:
                p.touch_blob()
                progress.advance(touch)
        return _Run(mode, memory_usage(), [p.memory() for p in plugins], first)
    finally:
        host.close()


def _trim_heap() -> None:
    """Give the generator's freed heap back to the system (glibc keeps large freed blocks)."""
    try:
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _embed_in_child(blob_path: Path, out: Path) -> EmbeddedPlugin:
    """Build the embedded artifact in a child process: compiling a module with a large data
    segment takes several times its size in transient memory, which should not stay in this
    host's heap (and in its PSS) afterwards."""
    code = (
        "import sys; from wasmshare.plugins import embed_plugin; embed_plugin(sys.argv[1], out=sys.argv[2])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(blob_path), str(out)],
        env=child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise PluginError(f"building the embedded plugin failed: {lines[-1] if lines else proc.returncode}")
    return EmbeddedPlugin.load(out)


def run_demo(
    console: Console, *, size_bytes: int, plugins: int, mode: DemoMode = "loan", seed: int = 0
) -> int:
    """Run the demo; returns the exit code. Raises WasmshareError for bad input."""
    if plugins < 1 or plugins > 64:
        raise PluginError(f"--plugins must be between 1 and 64, got {plugins}")
    if mode not in ("loan", "embedded", "copy", "all"):
        raise PluginError(f"--mode must be loan, embedded, copy or all, got {mode!r}")
    ours = {"loan": ["loan"], "embedded": ["embedded"], "copy": [], "all": ["loan", "embedded"]}[mode]
    console.rule(f"[bold]one {size_bytes / MIB:,.0f} MiB schema, {plugins} sandboxed plugin processes")
    runs: dict[str, _Run] = {}
    with tempfile.TemporaryDirectory(prefix="wasmshare-plugins-demo-") as tmp:
        columns = (
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            gen = progress.add_task("generating the schema and its index", total=1.0)

            def on_progress(stage: str, fraction: float) -> None:
                progress.update(gen, completed=fraction, description=f"{stage} the schema")

            blob = generate_blob(size_bytes, seed=seed, progress=on_progress)
            progress.update(gen, completed=1.0, description=f"generated a {len(blob) / MIB:,.1f} MiB blob")
            blob_path = Path(tmp) / "schema.blob"
            blob_path.write_bytes(blob)
            blob_nbytes = len(blob)
            del blob  # from here on the host holds only what each design needs
            _trim_heap()
            with open(blob_path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                schema = SchemaBlob(mm)
                progress.update(
                    gen,
                    description=f"generated: {schema.n_resources:,} resource types, "
                    f"{schema.n_types - schema.n_resources:,} nested types, {schema.n_props:,} properties",
                )
                program = sample_program(schema, resources=20, seed=seed + 1, mistakes=0.25)
                schema.release()
            runs["none"] = _run_mode(progress, "none", None, plugins, program)
            runs["copy"] = _run_mode(progress, "copy", blob_path, plugins, program)
            if "loan" in ours:
                pub_task = progress.add_task(
                    "loan: publishing the blob (sealed memfd, validated)", total=None
                )
                publication = _in_thread(progress, pub_task, lambda: Publication.publish(blob_path))
                try:
                    runs["loan"] = _run_mode(progress, "loan", publication, plugins, program)
                finally:
                    publication.release()
            if "embedded" in ours:
                emb_task = progress.add_task(
                    "embedded: embedding the blob in the plugin, compiling once", total=None
                )
                artifact_path = Path(tmp) / "typecheck-embedded.cwasm"
                artifact: EmbeddedPlugin = _in_thread(
                    progress, emb_task, lambda: _embed_in_child(blob_path, artifact_path)
                )
                progress.update(
                    emb_task,
                    description=f"embedded: compiled the plugin with its blob in {artifact.compile_s:.1f} s",
                )
                runs["embedded"] = _run_mode(progress, "embedded", artifact, plugins, program)
    _print_results(console, runs, ours, blob_nbytes, plugins)
    return 0


def _print_results(
    console: Console, runs: dict[str, _Run], ours: list[str], blob_nbytes: int, n: int
) -> None:
    first = runs["copy"].result
    console.print(
        f"\nsample program: {len(runs['copy'].result.diagnostics)} diagnostics, the same in every plugin of every design"
    )
    for d in first.diagnostics[:5]:
        console.print(f"  [yellow]{d.kind}[/] {d.path}: {d.message}", highlight=False)
    shown = [*ours, "copy"]
    table = Table(
        title=f"memory with all {n} plugins alive (MiB; each plugin has read every page of the blob)"
    )
    table.add_column("process")
    for m in shown:
        table.add_column(f"{_LABELS[m]} PSS", justify="right")
        table.add_column(f"{_LABELS[m]} RSS", justify="right")

    def cells(get: Callable[[_Run], MemoryUsage | None]) -> list[str]:
        out = []
        for m in shown:
            u = get(runs[m])
            out += ["", ""] if u is None else [f"{u.pss_mib:,.1f}", f"{u.rss_mib:,.1f}"]
        return out

    table.add_row("host", *cells(lambda r: r.host))
    for i in range(n):

        def plugin_i(r: _Run, i: int = i) -> MemoryUsage | None:
            return r.plugins[i] if i < len(r.plugins) else None

        table.add_row(f"plugin {i}", *cells(plugin_i))
    table.add_row("[bold]total", *[f"[bold]{c}" for c in cells(lambda r: r.total)], end_section=True)
    none_total = runs["none"].total.pss_bytes
    extra = []
    copies = []
    for m in shown:
        cost = runs[m].total.pss_bytes - none_total
        extra += [f"{cost / MIB:,.1f}", ""]
        copies += [f"{cost / blob_nbytes:.2f}", ""]
    table.add_row("schema cost", *extra)
    table.add_row("schema copies", *copies)
    table.caption = (
        f"schema cost: total PSS minus that of the host with {n} plugins that have no schema; "
        f"schema copies: schema cost / blob size ({blob_nbytes / MIB:,.1f} MiB)"
    )
    console.print(table)
    base = runs["copy"]
    for m in ours:
        run = runs[m]
        console.print(
            f"[green]{_LABELS[m]}[/]: {n} plugins and the host use {run.total.pss_mib:,.0f} MiB in all, "
            f"{(run.total.pss_bytes - none_total) / blob_nbytes:.2f} schema copies; with a copy per plugin: "
            f"{base.total.pss_mib:,.0f} MiB, {(base.total.pss_bytes - none_total) / blob_nbytes:.2f} copies",
            highlight=False,
        )
    console.print(
        "PSS counts a page shared by k processes 1/k to each (/proc/PID/smaps_rollup); RSS counts it k times"
    )
