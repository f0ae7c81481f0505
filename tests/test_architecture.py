"""The package's layout rules: layers, no import cycles, no private names across modules, small modules.

The import graph is grimp's, which counts every import statement: module level, inside
functions and under ``TYPE_CHECKING``. Run ``python -m pytest tests/test_architecture.py -v``
to see each rule; a failure lists every offender. The layers, top first: ``cli``, ``vllm``
(which serves through ``server``), ``server``, then ``llm`` and ``plugins`` (which never import each other), then the core
(``region``, ``guest``, ``loan``, ``errors`` and their private helpers).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "wasmshare"
MAX_MODULE_LINES = 700

# The only modules allowed to reach into private modules outside the package: one owner each.
PRIVATE_BOUNDARIES = {
    "wasmtime": "wasmshare._fastcall",
    "_posixshmem": "wasmshare._libc",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> list[tuple[str, Path]]:
    return [(_module_name(p), p) for p in sorted(PACKAGE.rglob("*.py"))]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    target = SRC.joinpath(*dotted.split("."))
    return target.with_suffix(".py").exists() or (target / "__init__.py").exists()


def test_the_import_graph_has_no_cycle() -> None:
    graph = grimp.build_graph("wasmshare", cache_dir=None)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    try:
        graphlib.TopologicalSorter(edges).prepare()
    except graphlib.CycleError as cycle:
        raise AssertionError(f"import cycle: {' -> '.join(cycle.args[1])}") from None


# Layers, top first: a module may import from its own layer (its own package) or below.
LAYERS = {"cli": 4, "vllm": 3, "server": 2, "llm": 1, "plugins": 1}


def _layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    if len(parts) == 1:
        return 4, "wasmshare"  # the package itself re-exports the core
    return LAYERS.get(parts[1], 0), parts[1] if parts[1] in LAYERS else "core"


def test_dependencies_point_down_the_layers() -> None:
    graph = grimp.build_graph("wasmshare", cache_dir=None)
    upward = []
    for module in sorted(graph.modules):
        rank, group = _layer(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            their_rank, their_group = _layer(imported)
            if their_rank > rank or (their_rank == rank and rank > 0 and their_group != group):
                upward.append(f"{module} imports {imported}")
    assert not upward, "\n".join(upward)


def test_no_module_imports_a_private_name_of_another() -> None:
    offenders: list[str] = []
    for module, path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                top = target.split(".")[0]
                for alias in node.names:
                    if _is_private(alias.name) and not _is_module(f"{target}.{alias.name}"):
                        offenders.append(f"{module}:{node.lineno} imports {target}.{alias.name}")
                    elif top in PRIVATE_BOUNDARIES and PRIVATE_BOUNDARIES[top] != module:
                        if _is_private(alias.name) or any(_is_private(p) for p in target.split(".")):
                            offenders.append(f"{module}:{node.lineno} imports {target}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    top = alias.name.split(".")[0]
                    private = any(_is_private(p) for p in alias.name.split("."))
                    if private and top != "wasmshare" and PRIVATE_BOUNDARIES.get(top) != module:
                        offenders.append(f"{module}:{node.lineno} imports {alias.name}")
    assert not offenders, "\n".join(offenders)


def test_no_wasmtime_private_is_touched_outside_its_one_owner() -> None:
    offenders: list[str] = []
    for module, path in _sources():
        if module == PRIVATE_BOUNDARIES["wasmtime"]:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and _is_private(node.attr)
                and isinstance(node.value, ast.Name)
                and node.value.id == "wasmtime"
            ):
                offenders.append(f"{module}:{node.lineno} uses wasmtime.{node.attr}")
    assert not offenders, "\n".join(offenders)


def test_every_module_is_at_most_700_lines() -> None:
    long = [
        f"{module}: {n} lines"
        for module, path in _sources()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, "\n".join(long)
