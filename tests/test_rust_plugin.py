"""The Rust schema plugin (sdk/rust/examples/typecheck.rs) is a twin of guests/plugins/typecheck.c.

Both plugins run side by side in this process over the same inputs, and must return the
same codes and write the same bytes into the output buffer (pre-filled with a pattern, so
a stray write shows): a real schema blob served as plugins get it (a read-only loan of a
sealed memfd, and the embedded data segment of a compiled artifact), programs with every
diagnostic, output buffers too small, the depth and path limits, and hostile blobs and
programs (truncated, wrong magic or version, lying offsets, hundreds of seeded random
mutations), where neither may trap. Then the Rust plugin runs through the normal host path
(``PluginHost(module=...)`` in separate processes, and ``wasmshare plugins check --module``)
with the C plugin's answers. The prebuilt module is checked in; test_rust_guests.py checks
that it is up to date. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import json
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ROOT
from test_plugins import _corrupt_index, _key, _with_header
from wasmshare import Guest, Region
from wasmshare.cli import app
from wasmshare.plugins import (
    BlobFormatError,
    CheckResult,
    PluginError,
    PluginHost,
    Program,
    Publication,
    SchemaBlob,
    build_blob,
    check_plugin_module,
    decode_diagnostics,
    embed_plugin,
    encode_program,
    generate_blob,
    parse_program,
    program_yaml,
    reference_check,
    sample_program,
)

C_PLUGIN = ROOT / "guests" / "plugins" / "typecheck.wasm"
RUST_PLUGIN = ROOT / "sdk" / "rust" / "examples" / "typecheck.wasm"
SIZE = 1024 * 1024
IO_BYTES = 512 * 1024
OUT_AT = 256 * 1024  # programs at [0, OUT_AT) of the query region, diagnostics after
OUT_CAP = 64 * 1024
FILL = 0xA5  # what the output buffer holds before each call
ERRORS = {-101, -102, -103, -104, -105, -106}
NODE = "t:m/Node:Node"
THING = "t:m/thing:Thing"

# A small schema with every property kind, a recursive object type and nested collections.
SCHEMA: dict[str, Any] = {
    "name": "t",
    "resources": {
        THING: {
            "inputProperties": {
                "s": {"type": "string"},
                "n": {"type": "number"},
                "i": {"type": "integer"},
                "b": {"type": "boolean"},
                "tags": {"type": "object", "additionalProperties": {"type": "string"}},
                "list": {"type": "array", "items": {"type": "integer"}},
                "objs": {"type": "array", "items": {"$ref": f"#/types/{NODE}"}},
                "objmap": {"type": "object", "additionalProperties": {"$ref": f"#/types/{NODE}"}},
                "node": {"$ref": f"#/types/{NODE}"},
                "any": {"$ref": "pulumi.json#/Any"},
                "grid": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                "maps": {
                    "type": "array",
                    "items": {"type": "object", "additionalProperties": {"type": "string"}},
                },
            }
        },
        "t:m/other:Other": {"inputProperties": {"x": {"type": "string"}}},
    },
    "types": {
        NODE: {
            "type": "object",
            "properties": {"child": {"$ref": f"#/types/{NODE}"}, "v": {"type": "string"}},
        }
    },
}


def _nest(levels: int) -> dict[str, Any]:
    """``{"child": {"child": ... {"v": 1}}}``: `levels` objects deep, a wrong type at the bottom."""
    value: dict[str, Any] = {"v": 1}
    for _ in range(levels):
        value = {"child": value}
    return value


EVERY_DIAGNOSTIC = Program.of(
    {
        "good": {
            "type": THING,
            "properties": {
                "s": "x",
                "n": 1.5,
                "i": 3,
                "b": True,
                "tags": {"a": "b"},
                "list": [1, 2],
                "any": [1, {"x": None}],
                "node": None,
                "objs": "${elsewhere.list}",
            },
        },
        "bad": {
            "type": THING,
            "properties": {
                "s": 1,
                "n": "1",
                "i": 1.5,
                "b": "yes",
                "tags": {"a": 1, "b": "ok", "c": None, "d": "${x}", "e": [1]},
                "list": [1, "two", 3.5, None, *range(4, 12), "twelve"],
                "objs": [{"v": "ok"}, {"v": 2, "w": 3}, "not an object", {"child": {"v": [], "q": 1}}],
                "objmap": {"k": {"v": 1}, "m": 7},
                "node": [1],
                "grid": [["a", 1], "b", [[]]],
                "maps": [{"a": 1}, "b", [2]],
                "nope": 1,
                "": "empty key",
            },
        },
        "bad2": {"type": THING, "properties": {"list": "not a list", "tags": ["not", "a", "map"]}},
        "untyped": {"type": "t:m/nothing:Nothing", "properties": {"s": 1}},
        "": {"type": "t:m/x:X"},
        "listprops": {"type": THING, "properties": [1, 2]},
        "scalarprops": {"type": "t:m/other:Other", "properties": "text"},
        "exprprops": {"type": THING, "properties": "${all.of.them}"},
        "noprops": {"type": "t:m/other:Other"},
        "deep": {"type": THING, "properties": {"node": _nest(40)}},
        "ünïcode": {"type": THING, "properties": {"tags": {"ключ": 1}}},
    }
)


@dataclass
class Loaded:
    """One plugin guest in this process, with its blob at ``blob_ptr`` and a query region lent read-write."""

    guest: Guest
    blob_ptr: int
    io_ptr: int
    io: Region

    def init(self, length: int | None = None, ptr: int | None = None) -> int:
        return int(self.guest.call("plugin_init", self.blob_ptr if ptr is None else ptr, length or 0))

    def check(self, encoded: bytes, cap: int = OUT_CAP) -> tuple[int, bytes]:
        assert len(encoded) <= OUT_AT and cap <= IO_BYTES - OUT_AT
        view = self.io.array()
        view[: len(encoded)] = np.frombuffer(encoded, np.uint8)
        view[OUT_AT:] = FILL
        rc = int(self.guest.call("plugin_check", self.io_ptr, len(encoded), self.io_ptr + OUT_AT, cap))
        return rc, bytes(view[OUT_AT:])  # the whole tail: a write past cap would show


@contextlib.contextmanager
def loaded(module: Path, blob: Region | None = None, blob_ptr: int = 0) -> Iterator[Loaded]:
    guest = Guest(module, memory_limit_bytes=64 << 20)
    io = Region.create(IO_BYTES)
    try:
        if blob is not None:
            blob_ptr = guest.lend(blob, "ro").ptr
        yield Loaded(guest, blob_ptr, guest.lend(io, "rw").ptr, io)
    finally:
        guest.close()
        io.close()


@dataclass
class Twins:
    """The C and the Rust plugin over the same blob: every call must give both the same answer."""

    c: Loaded
    rust: Loaded

    def init(self, length: int | None = None) -> int:
        rc = self.c.init(length)
        assert self.rust.init(length) == rc, f"plugin_init({length}): C gave {rc}"
        return rc

    def check(self, encoded: bytes, cap: int = OUT_CAP, what: str = "") -> tuple[int, bytes]:
        c = self.c.check(encoded, cap)
        rust = self.rust.check(encoded, cap)
        assert rust[0] == c[0], f"{what} cap={cap}: C returned {c[0]}, Rust {rust[0]}"
        assert rust[1] == c[1], f"{what} cap={cap}: the output bytes differ (rc {c[0]})"
        assert c[0] >= 0 or c[0] in ERRORS, c[0]
        return c


@contextlib.contextmanager
def twins_over(blob: Region | None) -> Iterator[Twins]:
    with loaded(C_PLUGIN, blob) as c, loaded(RUST_PLUGIN, blob) as rust:
        yield Twins(c, rust)


def _diagnostics(out: bytes, program: Program) -> list[tuple[Any, ...]]:
    diags, _ = decode_diagnostics(np.frombuffer(out, np.uint8), program)
    return _key(diags)


@pytest.fixture(scope="module")
def blob() -> bytes:
    return generate_blob(SIZE, seed=1)


@pytest.fixture(scope="module")
def publication(blob: bytes) -> Iterator[Publication]:
    with Publication.publish(blob) as pub:
        yield pub


@pytest.fixture(scope="module")
def small_blob() -> bytes:
    return build_blob(SCHEMA)


@pytest.fixture(scope="module")
def programs(blob: bytes) -> list[Program]:
    schema = SchemaBlob(blob)
    return [sample_program(schema, resources=12, seed=s, mistakes=0.4) for s in range(12)]


def test_the_prebuilt_rust_plugin_has_the_plugin_abi() -> None:
    assert RUST_PLUGIN.is_file(), "sdk/rust/examples/typecheck.wasm is checked in"
    check_plugin_module(RUST_PLUGIN)
    with Guest(RUST_PLUGIN) as guest:
        assert guest.call("plugin_abi_version") == 1 and guest.call("ws_abi_version") == 1


# --------------------------------------------------------------------------- a real blob, served as in production


def test_same_answers_from_a_read_only_loan_of_the_sealed_blob(
    publication: Publication, programs: list[Program]
) -> None:
    assert publication.sealed and not publication.region.writable
    doc = json.loads(bytes(publication.schema.document))
    with twins_over(publication.region) as twins:
        assert twins.init(publication.nbytes) == 0
        kinds = set()
        for seed, program in enumerate(programs):
            rc, out = twins.check(encode_program(program), what=f"seed {seed}")
            expected = _key(reference_check(doc, program))
            assert rc == len(expected) and _diagnostics(out, program) == expected, seed
            kinds |= {k[1] for k in expected}
        assert kinds == {"unknown-type", "unknown-property", "wrong-type"}
        assert twins.c.guest.bytes_copied == twins.rust.guest.bytes_copied == 0


def test_same_answers_from_the_embedded_data_segment(
    blob: bytes, programs: list[Program], tmp_path: Path
) -> None:
    artifacts = [
        embed_plugin(blob, module=m, out=tmp_path / f"{n}.cwasm", deadline=False)
        for n, m in (("c", C_PLUGIN), ("rust", RUST_PLUGIN))
    ]
    with (
        loaded(artifacts[0].path, blob_ptr=artifacts[0].blob_offset) as c,
        loaded(artifacts[1].path, blob_ptr=artifacts[1].blob_offset) as rust,
    ):
        twins = Twins(c, rust)
        assert twins.init(len(blob)) == 0
        for seed, program in enumerate(programs):
            twins.check(encode_program(program), what=f"seed {seed}")


def test_every_diagnostic_kind_with_the_same_paths_and_order(small_blob: bytes) -> None:
    enc = encode_program(EVERY_DIAGNOSTIC)
    with Region.from_bytes(small_blob) as region, twins_over(region) as twins:
        assert twins.init(len(small_blob)) == 0
        rc, out = twins.check(enc)
        diags = _diagnostics(out, EVERY_DIAGNOSTIC)
        assert rc == len(diags) == len(reference_check(SCHEMA, EVERY_DIAGNOSTIC))
        assert diags == _key(reference_check(SCHEMA, EVERY_DIAGNOSTIC))
        paths = [d[0] for d in diags]
        for path in (
            "resources.bad.properties.list[12]",
            "resources.bad.properties.objs[1].w",
            "resources.bad.properties.objs[3].child.v",
            "resources.bad.properties.objmap.m",
            "resources.bad.properties.",  # the empty key
            "resources.untyped.type",
            "resources..type",
            "resources.listprops.properties",
            "resources.deep.properties.node" + ".child" * 40 + ".v",
            "resources.ünïcode.properties.tags.ключ",
        ):
            assert path in paths, path
        expected_kinds = {(d[2], d[3]) for d in diags if d[1] == "wrong-type"}
        assert {"string", "number", "integer", "boolean", "array", "map", "object"} <= {
            e for e, _ in expected_kinds
        }


def _with_item_kind(blob: bytes, prop: str, item_kind: int) -> bytes:
    """Set the element kind of every property named ``prop`` (a record build_blob never writes)."""
    index_off = struct.unpack_from("<Q", blob, 24)[0]
    _, _, n_props, props_off, strings_off, _ = struct.unpack_from("<6I", blob, index_off)
    data = bytearray(blob)
    strings = index_off + strings_off
    hits = 0
    for i in range(n_props):
        at = index_off + props_off + 16 * i
        name_off, name_len = struct.unpack_from("<IH", blob, at)
        if blob[strings + name_off : strings + name_off + name_len] == prop.encode():
            data[at + 7] = item_kind
            hits += 1
    assert hits
    return bytes(data)


def test_nested_collection_elements_are_not_described_further(small_blob: bytes) -> None:
    """Elements of an array or map whose element kind is array, map or 0 are accepted as they are."""
    program = Program.of(
        {"r": {"type": THING, "properties": {"maps": [{"a": 1}, "b", [2]], "grid": [["a", 1], "b"]}}}
    )
    enc = encode_program(program)
    for kinds in ((6, 5), (5, 6), (0, 0), (1, 1), (7, 7), (9, 200)):
        data = _with_item_kind(_with_item_kind(small_blob, "maps", kinds[0]), "grid", kinds[1])
        with Region.from_bytes(data) as region, twins_over(region) as twins:
            assert twins.init(len(data)) == 0
            rc, _ = twins.check(enc, what=f"item kinds {kinds}")
            assert (rc == 0) == (kinds[0] in (0, 5, 6, 9) and kinds[1] in (0, 5, 6, 200)), (kinds, rc)


def test_a_full_output_buffer_is_cut_the_same_way(small_blob: bytes) -> None:
    """Every capacity from none to more than enough: the same count, the same records written."""
    enc = encode_program(EVERY_DIAGNOSTIC)
    with Region.from_bytes(small_blob) as region, twins_over(region) as twins:
        assert twins.init(len(small_blob)) == 0
        full, out = twins.check(enc)
        used = struct.unpack_from("<I", out, 8)[0]
        written = set()
        for cap in range(0, used + 8):
            rc, out = twins.check(enc, cap)
            if cap < 16:
                assert rc == -103
                continue
            assert rc == full
            written.add(struct.unpack_from("<I", out, 0)[0])
        assert len(written) > 10  # the cut fell in many places


def test_the_depth_and_path_limits_are_the_same(small_blob: bytes) -> None:
    prefix = len("resources.")
    cases = {
        # objects nested through the recursive type: a value at depth 48 is checked, 49 is too deep
        "depth-ok": Program.of({"r": {"type": THING, "properties": {"node": _nest(45)}}}),
        "depth-edge": Program.of({"r": {"type": THING, "properties": {"node": _nest(46)}}}),
        "too-deep": Program.of({"r": {"type": THING, "properties": {"node": _nest(47)}}}),
        "very-deep": Program.of({"r": {"type": THING, "properties": {"node": _nest(200)}}}),
        # a path of exactly MAX_PATH (4096) bytes fits; one byte more does not
        "path-fits": Program.of({"n" * (4096 - prefix - len(".type")): {"type": "x"}}),
        "path-over": Program.of({"n" * (4096 - prefix - len(".type") + 1): {"type": "x"}}),
        "name-over": Program.of({"n" * 5000: {"type": THING}}),
        "key-over": Program.of({"r": {"type": THING, "properties": {"tags": {"k" * 4080: 1}}}}),
        "index-over": Program.of(
            {
                "n" * (4096 - prefix - len(".properties.list[1]")): {
                    "type": THING,
                    "properties": {"list": [1, "x"]},
                }
            }
        ),
    }
    seen = {}
    with Region.from_bytes(small_blob) as region, twins_over(region) as twins:
        assert twins.init(len(small_blob)) == 0
        for name, program in cases.items():
            seen[name] = twins.check(encode_program(program), what=name)[0]
    assert seen["depth-ok"] == seen["depth-edge"] == 1
    assert seen["too-deep"] == seen["very-deep"] == -106
    assert seen["path-fits"] == 1 and seen["path-over"] == -106 and seen["name-over"] == -106
    assert seen["key-over"] == -106 and seen["index-over"] == 1


def test_no_schema_and_not_ready_are_the_same(blob: bytes) -> None:
    program = encode_program(EVERY_DIAGNOSTIC)
    with Region.from_bytes(blob) as region, twins_over(region) as twins:
        assert twins.check(program)[0] == -104  # before plugin_init
        assert twins.init(10) == -103
        assert twins.check(program)[0] == -104  # a failed init leaves the plugin not ready
        assert twins.c.init(0, ptr=0) == twins.rust.init(0, ptr=0) == 0  # (0, 0): no schema
        rc, out = twins.check(program)
        assert rc == len(EVERY_DIAGNOSTIC.resources)
        assert {d[1] for d in _diagnostics(out, EVERY_DIAGNOSTIC)} == {"unknown-type"}
        assert twins.init(len(blob)) == 0
        assert twins.check(program)[0] > 0


# --------------------------------------------------------------------------- hostile blobs


def _index_lies(blob: bytes) -> dict[str, bytes]:
    index_off = struct.unpack_from("<Q", blob, 24)[0]
    n_types, types_off, _, props_off, _, strings_size = struct.unpack_from("<6I", blob, index_off)
    n = len(blob)
    return {
        "magic": b"NOTABLOB" + blob[8:],
        "version": _with_header(blob, version=7),
        "header-small": _with_header(blob, header_size=63),
        "header-past-blob": _with_header(blob, header_size=n + 1),
        "blob-size": _with_header(blob, blob_size=n + 1),
        "index-off": _with_header(blob, index_off=1 << 63),
        "index-size": _with_header(blob, index_size=1 << 40),
        "index-tiny": _with_header(blob, index_size=31),
        "json-off": _with_header(blob, json_off=n),
        "json-size": _with_header(blob, json_size=(1 << 64) - 1),
        "type-count": _corrupt_index(blob, 0, 0xFFFFFF),
        "types-off": _corrupt_index(blob, 4, 0xFFFFFFF0),
        "prop-count": _corrupt_index(blob, 8, 0x0FFFFFFF),
        "strings-size": _corrupt_index(blob, 20, 0xFFFFFFFF),
        "resources": _corrupt_index(blob, 24, n_types + 1),
        "type-name": _corrupt_index(blob, types_off + 0, 0xFFFFFF00),
        "type-name-len": _corrupt_index(blob, types_off + 4, strings_size + 1),
        "type-props": _corrupt_index(blob, types_off + 12, 0xFFFFFF),
        "type-first-prop": _corrupt_index(blob, types_off + 8, 0xFFFFFFFF),
        "prop-name": _corrupt_index(blob, props_off, 0xFFFFFFF0),
        "no-resources": _corrupt_index(blob, 24, 0),
    }


def test_lying_blobs_give_the_same_codes(small_blob: bytes) -> None:
    programs = [
        encode_program(EVERY_DIAGNOSTIC),
        encode_program(Program.of({"a": {"type": THING}})),
        encode_program(Program.of({"o": {"type": "t:m/other:Other", "properties": {"x": "s", "y": 1}}})),
    ]
    codes = {}
    for name, bad in _index_lies(small_blob).items():
        with Region.from_bytes(bad) as region, twins_over(region) as twins:
            rc = twins.init(len(bad))
            codes[name] = [rc]
            if rc == 0:
                codes[name] += [twins.check(p, what=name)[0] for p in programs]
    assert codes["magic"] == [-101] and codes["version"] == [-102]
    for name in ("header-small", "blob-size", "index-off", "index-size", "index-tiny", "json-size"):
        assert codes[name] == [-103], (name, codes[name])
    for name in ("type-count", "types-off", "prop-count", "strings-size", "resources"):
        assert codes[name] == [-103], (name, codes[name])
    for name in ("type-name", "type-name-len", "type-props", "type-first-prop", "prop-name"):
        assert codes[name][0] == 0 and -103 in codes[name], (name, codes[name])  # caught by the lookup


def test_truncated_blobs_give_the_same_codes(small_blob: bytes) -> None:
    program = encode_program(EVERY_DIAGNOSTIC)
    with Region.from_bytes(small_blob) as region, twins_over(region) as twins:
        lengths = [1, 8, 12, 63, 64, 65, 100, len(small_blob) // 2, len(small_blob) - 1, len(small_blob)]
        codes = [twins.init(n) for n in lengths]
        assert codes[:4] == [-103] * 4 and codes[-2] == -103 and codes[-1] == 0
        assert twins.init(0) == -103  # a pointer with no bytes is not "no schema"
        assert twins.check(program)[0] == -104


def test_random_blob_mutations_give_the_same_codes(small_blob: bytes, blob: bytes) -> None:
    """A few hundred seeded mutations of the header and index, read in place through a read-only loan."""
    programs = [encode_program(EVERY_DIAGNOSTIC)] + [
        encode_program(sample_program(SchemaBlob(blob), resources=6, seed=s, mistakes=0.4)) for s in range(2)
    ]
    seen: dict[str, set[int]] = {"init": set(), "check": set()}
    for source in (small_blob, generate_blob(256 * 1024, seed=4)):
        index_off, index_size = struct.unpack_from("<QQ", source, 24)
        scratch = Region.create(len(source))  # written by this process, lent read-only to both
        with scratch, twins_over(scratch) as twins:
            view = scratch.array()
            rnd = random.Random(len(source))
            for trial in range(200):
                view[:] = np.frombuffer(source, np.uint8)
                lo, hi = (0, 64) if trial % 4 == 0 else (index_off, index_off + min(index_size, 4096))
                for _ in range(rnd.randint(1, 6)):
                    view[rnd.randrange(lo, hi)] = rnd.randrange(256)
                if trial % 7 == 0:  # and a random word somewhere in the tables
                    at = rnd.randrange(index_off, index_off + index_size - 4)
                    view[at : at + 4] = np.frombuffer(struct.pack("<I", rnd.getrandbits(32)), np.uint8)
                rc = twins.init(len(source))
                seen["init"].add(rc)
                if rc == 0:
                    for p in programs:
                        seen["check"].add(twins.check(p, cap=8192, what=f"trial {trial}")[0])
    assert {0, -101, -102, -103} <= seen["init"]
    assert -103 in seen["check"] and any(rc >= 0 for rc in seen["check"])


# --------------------------------------------------------------------------- hostile programs


def _program_lies(enc: bytes) -> dict[str, bytes]:
    magic, version, n_res, n_nodes, strings_size, _ = struct.unpack_from("<6I", enc)
    nodes_at = 24 + 20 * n_res

    def word(at: int, value: int) -> bytes:
        return enc[:at] + struct.pack("<I", value) + enc[at + 4 :]

    def node_word(node: int, field: int, value: int) -> bytes:
        return word(nodes_at + 20 * node + field, value)

    lies = {
        "magic": word(0, 0x47505358),
        "version": word(4, 2),
        "resources": word(8, n_res + 1000),
        "resources-max": word(8, 0xFFFFFFFF),
        "nodes": word(12, n_nodes + 1),
        "nodes-max": word(12, 0xFFFFFFFF),
        "strings": word(16, strings_size + 1),
        "strings-max": word(16, 0xFFFFFFFF),
        "fewer-strings": word(16, 0),
        "fewer-nodes": word(12, 1),
        "name-off": word(24, 0xFFFFFFF0),
        "name-len": word(28, strings_size + 1),
        "type-off": word(32, strings_size),
        "type-len": word(36, 0xFFFFFFFF),
        "props-node": word(40, n_nodes),
        "props-node-max": word(40, 0xFFFFFFFE),
        "no-props": word(40, 0xFFFFFFFF),
        "child-backwards": node_word(0, 12, 0),
        "child-past-end": node_word(0, 12, n_nodes),
        "children-many": node_word(0, 16, 0xFFFFFFFF),
        "key-off": node_word(1, 4, 0xFFFFFFFF),
        "key-len": node_word(1, 8, strings_size + 1),
        "self-loop": node_word(1, 12, 1),
    }
    for kind in range(0, 10):
        lies[f"root-kind-{kind}"] = enc[:nodes_at] + bytes([kind]) + enc[nodes_at + 1 :]
    return lies


def test_lying_and_truncated_programs_give_the_same_codes(small_blob: bytes) -> None:
    enc = encode_program(
        Program.of({"r": {"type": THING, "properties": {"objs": [{"v": 1}, {"child": {}}]}}})
    )
    big = encode_program(EVERY_DIAGNOSTIC)
    codes: dict[str, int] = {}
    with Region.from_bytes(small_blob) as region, twins_over(region) as twins:
        assert twins.init(len(small_blob)) == 0
        for name, bad in _program_lies(enc).items():
            codes[name] = twins.check(bad, what=name)[0]
        for name, bad in _program_lies(big).items():
            twins.check(bad, what=f"big {name}")
        for n in range(len(enc) + 1):
            codes[f"cut-{n}"] = twins.check(enc[:n], what=f"cut at {n}")[0]
        for n in range(0, len(big), 7):
            twins.check(big[:n], what=f"big cut at {n}")
    assert codes["magic"] == -101 and codes["version"] == -102
    assert codes["resources-max"] == codes["nodes-max"] == codes["strings-max"] == -103
    assert codes["props-node"] == codes["child-backwards"] == codes["children-many"] == -105
    assert codes["key-off"] == -103 and codes["no-props"] == 0
    assert {codes[f"cut-{n}"] for n in range(24)} == {-103}


def test_random_program_mutations_give_the_same_codes(small_blob: bytes, blob: bytes) -> None:
    sources = [
        encode_program(EVERY_DIAGNOSTIC),
        encode_program(sample_program(SchemaBlob(blob), resources=8, seed=3, mistakes=0.4)),
    ]
    rnd = random.Random(7)
    seen: set[int] = set()
    for blob_bytes, enc in ((small_blob, sources[0]), (blob, sources[1])):
        with Region.from_bytes(blob_bytes) as region, twins_over(region) as twins:
            assert twins.init(len(blob_bytes)) == 0
            for trial in range(250):
                bad = bytearray(enc)
                for _ in range(rnd.randint(1, 5)):
                    if rnd.random() < 0.5:  # a byte
                        bad[rnd.randrange(len(bad))] = rnd.randrange(256)
                    else:  # a small, plausible-looking word
                        at = rnd.randrange(0, len(bad) - 4)
                        bad[at : at + 4] = struct.pack(
                            "<I", rnd.choice([0, 1, 2, 0xFFFFFFFF, rnd.randrange(64)])
                        )
                cap = rnd.choice([16, 100, 1000, OUT_CAP])
                seen.add(twins.check(bytes(bad), cap=cap, what=f"trial {trial}")[0])
            for _ in range(100):  # random bytes behind a valid header with random counts
                counts = [rnd.randrange(0, 40) for _ in range(3)]
                body = rnd.randbytes(rnd.randrange(0, 2000))
                seen.add(twins.check(struct.pack("<6I", 0x47505357, 1, *counts, 0) + body, what="random")[0])
    assert {-103, -105} <= seen and any(rc >= 0 for rc in seen)


# --------------------------------------------------------------------------- the normal host path


def _summary(result: CheckResult | Exception) -> Any:
    if isinstance(result, Exception):
        return type(result).__name__, str(result)
    return _key(result.diagnostics), result.total, result.truncated


def test_plugin_host_runs_the_rust_plugin_with_the_c_answers(
    publication: Publication, blob: bytes, programs: list[Program], tmp_path: Path
) -> None:
    texts = [program_yaml(p) for p in programs[:4]] + [
        "resources:\n  logs:\n    type: aws:s3/bucket:Bucket\n    properties:\n"
        "      versioning: {enabled: 'yes'}\n      lifecycleRules:\n"
        "        - {id: expire, enabled: true, expiration: {days: 30, dayz: 2}}\n"
    ]
    hostile = _program_lies(encode_program(programs[0]))
    artifact_c = embed_plugin(blob, out=tmp_path / "c.cwasm")
    artifact_rust = embed_plugin(blob, module=RUST_PLUGIN, out=tmp_path / "rust.cwasm")
    with (
        PluginHost(publication) as c_loan,
        PluginHost(publication, module=RUST_PLUGIN) as rust_loan,
        PluginHost(artifact_c) as c_embedded,
        PluginHost(artifact_rust) as rust_embedded,
        PluginHost(None, module=RUST_PLUGIN) as rust_none,
        PluginHost(None) as c_none,
    ):
        hosts = [c_loan, rust_loan, c_embedded, rust_embedded, c_none, rust_none]
        for host in hosts:
            host.spawn(1)
        for text in texts:
            answers = [_summary(host.check(text)) for host in hosts]
            assert answers[0] == answers[1] == answers[2] == answers[3], text
            assert answers[4] == answers[5] and answers[4][1] == len(parse_program(text).resources)
            assert answers[0][1] > 0
        for name in ("strings-max", "props-node", "key-off", "child-past-end"):  # through the query region
            answers = []
            for host in hosts[:4]:
                try:
                    answers.append(_summary(host.plugins[0]._check_encoded(programs[0], hostile[name])))
                except PluginError as e:
                    answers.append(_summary(e))
            assert len(set(map(repr, answers))) == 1, (name, answers)
            assert "rejected the query" in answers[0][1], answers[0]


def test_plugin_host_truncation_and_bad_blob_are_reported_the_same(
    publication: Publication, small_blob: bytes
) -> None:
    long_name = "n" * 1000  # 30 diagnostics with 1 KiB paths do not fit what is left of 8 KiB
    many = Program.of(
        {long_name: {"type": "aws:s3/bucket:Bucket", "properties": {f"k{i}": 1 for i in range(30)}}}
    )
    with (
        PluginHost(publication, io_nbytes=8192) as c_host,
        PluginHost(publication, io_nbytes=8192, module=RUST_PLUGIN) as rust_host,
    ):
        c_host.spawn(1)
        rust_host.spawn(1)
        c, rust = c_host.check(many), rust_host.check(many)
        assert c.truncated and _summary(c) == _summary(rust)
    bad = _with_header(small_blob, version=3)
    errors = []
    for module in (None, RUST_PLUGIN):  # the copy design hands the blob to plugin_init unchecked
        with PluginHost(bad, mode="copy", module=module) as host, pytest.raises(BlobFormatError) as info:
            host.spawn(1)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "(code -102)" in errors[0]


def test_cli_check_with_the_rust_module_prints_the_c_output(blob: bytes, tmp_path: Path) -> None:
    blob_file = tmp_path / "schema.blob"
    blob_file.write_bytes(blob)
    schema = SchemaBlob(blob)
    good = tmp_path / "good.yaml"
    good.write_text(f"resources:\n  a:\n    type: {schema.tokens()[0]}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(program_yaml(sample_program(schema, resources=6, seed=2, mistakes=0.5)))
    runner = CliRunner()
    args = ["plugins", "check", str(good), str(bad), "--blob", str(blob_file)]
    c = runner.invoke(app, args)
    rust = runner.invoke(app, [*args, "--module", str(RUST_PLUGIN)])
    assert c.exit_code == rust.exit_code == 1, rust.output
    assert rust.output == c.output
    assert "no problems" in c.output and "problem(s)" in c.output
