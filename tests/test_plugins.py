"""Plugin processes sharing one schema blob (wasmshare.plugins): real separate processes.

Correct diagnostics are compared with a plain-Python checker over the schema JSON;
hostile plugins (writes to the blob, memory bombs, endless loops) and killed plugins
fail alone; the blob's memory and name go away after the last plugin. No timing is
asserted anywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import random
import re
import secrets
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import wasmtime
from typer.testing import CliRunner

from conftest import PYTHON, ROOT, child_env
from wasmshare import Guest, GuestError, GuestLimitExceeded, GuestTrap, Region
from wasmshare.cli import app
from wasmshare.plugins import (
    BLOB_FILE_MAX_BYTES,
    MODULE_FILE_MAX_BYTES,
    PROGRAM_EXPANDED_MAX_CHARS,
    PROGRAM_MAX_NESTING_LEVELS,
    PROGRAM_MAX_NODES,
    PROGRAM_TEXT_MAX_BYTES,
    BlobFormatError,
    BlobLease,
    CheckResult,
    Diagnostic,
    EmbeddedPlugin,
    PluginCrashed,
    PluginError,
    PluginHost,
    PluginModuleError,
    Program,
    ProgramError,
    Publication,
    SchemaBlob,
    blob_holders,
    build_blob,
    check_plugin_module,
    embed_plugin,
    encode_program,
    generate_blob,
    generate_schema,
    parse_program,
    parse_size,
    reference_check,
    sample_program,
    sweep_stale_blobs,
)
from wasmshare.plugins._wasm import embed_data

PLUGINS = ROOT / "guests" / "plugins"
TYPECHECK = PLUGINS / "typecheck.wasm"
HOSTILE = PLUGINS / "hostile_plugin.wasm"
SIZE = 3 * 1024 * 1024
BUILD_FLAGS = ["-Wall", "-Wextra", "-Werror"]
PINNED_ZIGLANG = "0.17.1"
runner = CliRunner()


@pytest.fixture(scope="module")
def blob() -> bytes:
    return generate_blob(SIZE, seed=1)


@pytest.fixture(scope="module")
def doc(blob: bytes) -> dict[str, Any]:
    return json.loads(bytes(SchemaBlob(blob).document))


@pytest.fixture(scope="module")
def publication(blob: bytes) -> Iterator[Publication]:
    with Publication.publish(blob) as pub:
        yield pub


def _unique_name() -> str:
    return f"wasmshare-test-{os.getpid()}-{secrets.token_hex(4)}"


def _wait_for(predicate: Any, timeout_s: float = 15.0) -> bool:
    """Poll for an event that must happen (a bounded wait, not a timing assertion)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def _key(diags: list[Diagnostic]) -> list[tuple[Any, ...]]:
    return [(d.path, d.kind, d.expected, d.actual) for d in diags]


# --------------------------------------------------------------------------- the generator and the blob format


def test_generator_is_deterministic_and_the_blob_indexes_the_document(
    blob: bytes, doc: dict[str, Any]
) -> None:
    assert generate_blob(SIZE, seed=1) == blob
    assert generate_blob(SIZE, seed=2) != blob
    # The fast path (never parses) and the general path (parses the JSON) give the same bytes.
    assert build_blob(generate_schema(SIZE, seed=1)) == blob
    schema = SchemaBlob(blob)
    assert schema.nbytes == len(blob) and schema.json_nbytes >= SIZE * 0.9
    assert schema.n_resources == len(doc["resources"]) and schema.n_types - schema.n_resources == len(
        doc["types"]
    )
    token_re = re.compile(r"aws:[a-z0-9]+/[a-z][A-Za-z]*:[A-Z][A-Za-z]*")
    assert all(token_re.fullmatch(t) for t in schema.tokens())
    kinds = set()
    for token in random.Random(0).sample(schema.tokens(), 25):
        info = schema.lookup(token)
        assert info is not None
        assert schema.type_json(token) == doc["resources"][token]  # the span points at the type's own JSON
        assert {p.name for p in info.properties} == set(doc["resources"][token]["inputProperties"])
        kinds |= {(p.type, p.item_type) for p in info.properties}
    assert {("string", None), ("boolean", None), ("object", None), ("array", "string")} <= kinds
    assert schema.lookup("aws:s3/nothing:Nothing") is None


def test_provider_like_schema_has_nested_types_and_descriptions(doc: dict[str, Any]) -> None:
    resource = next(iter(doc["resources"].values()))
    assert {"description", "properties", "inputProperties", "requiredInputs"} <= resource.keys()
    assert len(resource["description"]) > 100
    refs = [p for r in doc["resources"].values() for p in r["inputProperties"].values() if "$ref" in p]
    assert refs and all(
        p["$ref"].removeprefix("#/types/") in doc["types"] for p in refs if p["$ref"].startswith("#/")
    )
    assert any(
        "additionalProperties" in p for t in doc["types"].values() for p in t["properties"].values()
    ) or any(
        "additionalProperties" in p for r in doc["resources"].values() for p in r["inputProperties"].values()
    )


def test_parse_size() -> None:
    assert parse_size("100MiB") == 100 * 1024 * 1024
    assert parse_size("5MB") == 5_000_000
    assert parse_size("2 gib") == 2 * 1024**3
    for bad in ("12XB", "", "MiB", "-3MiB", "0"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def _with_header(blob: bytes, **fields: int) -> bytes:
    names = [
        "magic",
        "version",
        "header_size",
        "blob_size",
        "index_off",
        "index_size",
        "json_off",
        "json_size",
        "index_crc",
        "json_crc",
    ]
    values = dict(zip(names, struct.unpack_from("<8sIIQQQQQII", blob)))
    values.update(fields)
    return struct.pack("<8sIIQQQQQII", *[values[n] for n in names]) + blob[64:]


def _corrupt_index(blob: bytes, offset_in_index: int, value: int) -> bytes:
    """Overwrite a u32 inside the index and fix the index checksum (a well-formed lie)."""
    index_off, index_size = struct.unpack_from("<QQ", blob, 24)
    data = bytearray(blob)
    struct.pack_into("<I", data, index_off + offset_in_index, value)
    struct.pack_into("<I", data, 56, zlib.crc32(data[index_off : index_off + index_size]))
    return bytes(data)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"NOTABLOB" + b[8:], "not a schema blob: magic"),
        (lambda b: _with_header(b, version=7), "version 7 is not supported"),
        (lambda b: b[: len(b) // 2], "header is inconsistent"),
        (lambda b: b[:40], "shorter than its 64-byte header"),
        (lambda b: _with_header(b, index_crc=1), "index checksum mismatch"),
        (lambda b: b[:-3] + b"xx}", "JSON checksum mismatch"),
        (lambda b: _with_header(b, index_size=1 << 40), "lies outside the blob"),
        (lambda b: _corrupt_index(b, 32 + 0, 0xFFFFFF00), "name outside the string table"),
        (lambda b: _corrupt_index(b, 32 + 12, 0xFFFFFF), "properties outside the property table"),
        (lambda b: _corrupt_index(b, 0, 0xFFFFFF), "lies outside the index"),
    ],
    ids=[
        "magic",
        "version",
        "truncated",
        "tiny",
        "index-crc",
        "json-crc",
        "bounds",
        "type-name",
        "type-props",
        "type-count",
    ],
)
def test_invalid_blob_is_refused_and_nothing_is_published(blob: bytes, mutate: Any, message: str) -> None:
    bad = mutate(blob)
    with pytest.raises(BlobFormatError, match=message):
        SchemaBlob(bad)
    fds_before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(BlobFormatError, match=message):
        Publication.publish(bad)
    name = _unique_name()
    with pytest.raises(BlobFormatError, match=message):
        Publication.publish(bad, name=name)
    assert not (Path("/dev/shm") / name).exists(), "a half-published blob was left under its name"
    assert set(os.listdir("/proc/self/fd")) <= fds_before, "a half-published memfd was left open"


def test_publishing_a_file_copies_once_into_a_sealed_memfd(blob: bytes, tmp_path: Path) -> None:
    path = tmp_path / "schema.blob"
    path.write_bytes(blob)
    with Publication.publish(path) as pub:
        assert pub.sealed and pub.region.kind == "memfd" and not pub.region.writable
        assert bytes(pub.region.array()) == blob
        assert pub.schema.n_types == SchemaBlob(blob).n_types
    assert pub.released
    with pytest.raises(PluginError, match="cannot read blob file"):
        Publication.publish(tmp_path / "missing.blob")


# --------------------------------------------------------------------------- the guest, in this process


def _guest_with_blob(data: bytes) -> tuple[Guest, Any, Any, Region, Region]:
    guest = Guest(TYPECHECK, memory_limit_bytes=64 << 20)
    region = Region.from_bytes(data)
    loan = guest.lend(region, "ro")
    io = Region.create(1 << 20)
    io_loan = guest.lend(io, "rw")
    return guest, loan, io_loan, region, io


def _guest_check(guest: Guest, io_loan: Any, io: Region, program: Program) -> int:
    enc = encode_program(program)
    io.array()[: len(enc)] = np.frombuffer(enc, np.uint8)
    return int(guest.call("plugin_check", io_loan.ptr, len(enc), io_loan.ptr + 65536, io.nbytes - 65536))


def test_guest_checks_against_the_reference_in_place(blob: bytes, doc: dict[str, Any]) -> None:
    from wasmshare.plugins import decode_diagnostics

    guest, loan, io_loan, region, io = _guest_with_blob(blob)
    with guest, region, io:
        assert guest.call("plugin_init", loan.ptr, len(blob)) == 0
        schema = SchemaBlob(blob)
        for seed in range(40):
            program = sample_program(schema, resources=12, seed=seed, mistakes=0.4)
            total = _guest_check(guest, io_loan, io, program)
            diags, n = decode_diagnostics(io.array()[65536:], program)
            assert n == total == len(diags)
            assert _key(diags) == _key(reference_check(doc, program)), seed
        assert guest.bytes_copied == 0


def test_guest_treats_a_malformed_blob_as_untrusted() -> None:
    """Corrupt headers give an error code from plugin_init, corrupt records one from plugin_check; nothing traps."""
    small = generate_blob(256 * 1024, seed=4)
    schema = SchemaBlob(small)
    programs = [sample_program(schema, resources=12, seed=s, mistakes=0.3) for s in range(3)]
    index_off, index_size = struct.unpack_from("<QQ", small, 24)
    guest = Guest(TYPECHECK, memory_limit_bytes=64 << 20)
    scratch = Region.create(len(small))  # read-write for the host, lent read-only
    io = Region.create(1 << 20)
    with guest, scratch, io:
        loan = guest.lend(scratch, "ro")
        io_loan = guest.lend(io, "rw")
        init = guest.func("plugin_init")
        view = scratch.array()
        view[:] = np.frombuffer(small, np.uint8)
        assert init(loan.ptr, 10) == -103
        assert init(loan.ptr, len(small)) == 0
        rnd = random.Random(0)
        seen: dict[str, set[Any]] = {"init": set(), "check": set()}
        for trial in range(300):
            view[:] = np.frombuffer(small, np.uint8)
            lo, hi = (0, 64) if trial % 4 == 0 else (index_off, index_off + index_size)
            for _ in range(rnd.randint(1, 6)):
                view[rnd.randrange(lo, hi)] = rnd.randrange(256)
            rc = init(loan.ptr, len(small))
            seen["init"].add(rc)
            if rc == 0:
                for program in programs:
                    seen["check"].add(_guest_check(guest, io_loan, io, program) >= 0 or "error")
        assert {-101, -102, -103} <= seen["init"]
        assert {True, "error"} <= seen["check"]  # corrupt records were reached, and reported


def test_guest_rejects_a_malformed_program() -> None:
    guest = Guest(TYPECHECK)
    with guest:
        assert guest.call("plugin_init", 0, 0) == 0
        io = Region.create(1 << 20)
        io_loan = guest.lend(io, "rw")
        enc = bytearray(
            encode_program(Program.of({"a": {"type": "x:y/z:Z", "properties": {"k": [1, {"j": 2}]}}}))
        )
        check = guest.func("plugin_check")
        rnd = random.Random(1)
        for _ in range(200):
            bad = bytearray(enc)
            for _ in range(rnd.randint(1, 4)):
                bad[rnd.randrange(len(bad))] = rnd.randrange(256)
            io.array()[: len(bad)] = np.frombuffer(bytes(bad), np.uint8)
            rc = check(io_loan.ptr, len(bad), io_loan.ptr + 65536, 4096)
            assert rc >= 0 or rc in (-101, -102, -103, -105, -106)


def test_no_schema_plugin_reports_every_type_unknown() -> None:
    from wasmshare.plugins import decode_diagnostics

    program = Program.of(
        {"a": {"type": "aws:s3/bucket:Bucket", "properties": {"x": 1}}, "b": {"type": "t:m/n:N"}}
    )
    with Guest(TYPECHECK) as guest, Region.create(1 << 20) as io:
        io_loan = guest.lend(io, "rw")
        assert _guest_check(guest, io_loan, io, program) == -104  # before plugin_init
        assert guest.call("plugin_init", 0, 0) == 0
        assert _guest_check(guest, io_loan, io, program) == 2
        diags, _ = decode_diagnostics(io.array()[65536:], program)
        assert [(d.path, d.kind) for d in diags] == [
            ("resources.a.type", "unknown-type"),
            ("resources.b.type", "unknown-type"),
        ]


# --------------------------------------------------------------------------- plugin processes


def test_plugins_in_separate_processes_answer_from_the_shared_blob(
    publication: Publication, doc: dict[str, Any]
) -> None:
    with PluginHost(publication) as host:
        plugins = host.spawn(3)
        assert len({p.pid for p in plugins}) == 3 and os.getpid() not in {p.pid for p in plugins}
        for seed in range(6):
            program = sample_program(publication.schema, resources=15, seed=seed, mistakes=0.3)
            expected = _key(reference_check(doc, program))
            assert expected, "the sample program should have mistakes"
            results = host.check_all(program)
            for r in results:
                assert isinstance(r, CheckResult), r
                assert _key(r.diagnostics) == expected and r.total == len(expected)
        # Every plugin maps the same pages: the publisher's memfd, no private copy.
        assert set(publication.holders()) >= {os.getpid(), *(p.pid for p in plugins)}


def test_yaml_program_diagnostics_have_paths(publication: Publication) -> None:
    schema = publication.schema
    # A resource with a nested object property whose type has a boolean property.
    for token in schema.tokens():
        info = schema.lookup(token)
        assert info is not None
        nested = [p for p in info.properties if p.type == "object" and p.ref]
        for prop in nested:
            inner = schema.lookup(prop.ref, "object") if prop.ref else None
            flags = [q for q in inner.properties if q.type == "boolean"] if inner else []
            if flags:
                break
        else:
            continue
        break
    else:  # pragma: no cover - the generator always makes some
        pytest.fail("no resource with a nested boolean property")
    text = f"""
name: infra
runtime: yaml
resources:
  myBucket:
    type: {token}
    properties:
      {prop.name}:
        {flags[0].name}: "yes"
        {flags[0].name}Typo: true
      tags: {{team: infra}}
      notAProperty: 1
      fromElsewhere: ${{other.arn}}
  other:
    type: aws:s3/bukket:Bucket
"""
    with PluginHost(publication) as host:
        host.spawn(1)
        result = host.check(text)
    base = f"resources.myBucket.properties.{prop.name}"
    found = {(d.path, d.kind) for d in result.diagnostics}
    assert (f"{base}.{flags[0].name}", "wrong-type") in found
    assert (f"{base}.{flags[0].name}Typo", "unknown-property") in found
    assert ("resources.myBucket.properties.notAProperty", "unknown-property") in found
    assert ("resources.other.type", "unknown-type") in found
    wrong = next(d for d in result.diagnostics if d.kind == "wrong-type")
    assert (wrong.expected, wrong.actual) == ("boolean", "string") and "expected boolean" in wrong.message
    unknown = next(d for d in result.diagnostics if d.kind == "unknown-type")
    assert "aws:s3/bukket:Bucket" in unknown.message
    assert _key(result.diagnostics) == _key(
        reference_check(json.loads(bytes(publication.schema.document)), parse_program(text))
    )


def test_documented_bucket_example(publication: Publication) -> None:
    text = """
resources:
  logs:
    type: aws:s3/bucket:Bucket
    properties:
      bucket: my-logs
      versioning: {enabled: "yes"}
      lifecycleRules:
        - id: expire
          enabled: true
          expiration: {days: 30, dayz: 2}
      tags: {team: infra, cost: 12}
      policy: ${policyDoc.json}
"""
    with PluginHost(publication) as host:
        host.spawn(1)
        result = host.check(text)
    assert [(d.path, d.kind, d.expected, d.actual) for d in result.diagnostics] == [
        ("resources.logs.properties.versioning.enabled", "wrong-type", "boolean", "string"),
        ("resources.logs.properties.lifecycleRules[0].expiration.dayz", "unknown-property", None, None),
        ("resources.logs.properties.tags.cost", "wrong-type", "string", "integer"),
    ]  # depth-first, in the program's order


def test_plugin_write_to_the_blob_traps_and_the_others_carry_on(
    publication: Publication, doc: dict[str, Any]
) -> None:
    program = sample_program(publication.schema, resources=10, seed=11, mistakes=0.3)
    write = Program.of({"x": {"type": "hostile:write"}})
    with PluginHost(publication) as good, PluginHost(publication, module=HOSTILE, name="hostile") as bad:
        good.spawn(2)
        (hostile,) = bad.spawn(1)
        with pytest.raises(GuestTrap) as info:
            hostile.check(write)
        assert info.value.guest == "hostile-0"
        assert info.value.trap_code == "MEMORY_OUT_OF_BOUNDS"
        assert "read-only loan" in str(info.value)
        assert hostile.alive and hostile.check(Program.of({"x": {"type": "hostile:ok"}})).total == 0
        for r in good.check_all(program):
            assert isinstance(r, CheckResult) and _key(r.diagnostics) == _key(reference_check(doc, program))
    SchemaBlob(publication.region.array(), check_json=True).release()  # not one byte changed


def test_memfd_blob_is_freed_after_the_last_plugin_even_when_one_is_killed(
    blob: bytes, doc: dict[str, Any]
) -> None:
    program = sample_program(SchemaBlob(blob), resources=10, seed=5, mistakes=0.3)
    pub = Publication.publish(blob)
    inode, device = pub.inode, pub.device
    with PluginHost(pub) as host:
        plugins = host.spawn(3)
        pub.release()  # the host is done with it; the plugins keep it
        assert set(blob_holders(inode, device)) == {p.pid for p in plugins}
        plugins[0].kill()
        assert plugins[0].returncode == -signal.SIGKILL
        results = host.check_all(program)
        assert isinstance(results[0], PluginCrashed) and "killed by SIGKILL" in str(results[0])
        for r in results[1:]:
            assert isinstance(r, CheckResult) and _key(r.diagnostics) == _key(reference_check(doc, program))
        with pytest.raises(PluginCrashed, match="plugin-0"):
            plugins[0].check(program)
        assert set(blob_holders(inode, device)) == {plugins[1].pid, plugins[2].pid}
        plugins[1].close()
        assert blob_holders(inode, device) == [plugins[2].pid]
        os.kill(plugins[2].pid, signal.SIGKILL)
        plugins[2].process.wait()
    assert blob_holders(inode, device) == []  # no fd, no mapping left anywhere: the kernel freed it


def test_named_blob_is_unlinked_after_the_last_plugin_even_when_killed(
    blob: bytes, doc: dict[str, Any]
) -> None:
    name = _unique_name()
    program = sample_program(SchemaBlob(blob), resources=10, seed=6, mistakes=0.3)
    pub = Publication.publish(blob, name=name)
    assert pub.name_exists() and not pub.sealed
    with pub, PluginHost(pub, by="name") as host:
        plugins = host.spawn(3)
        pub.release()
        assert pub.name_exists(), "plugins still hold it"
        plugins[0].kill()
        for r in host.check_all(program)[1:]:
            assert isinstance(r, CheckResult) and _key(r.diagnostics) == _key(reference_check(doc, program))
        assert pub.name_exists()
        plugins[1].close()
        assert pub.name_exists()
        plugins[2].kill()  # the last holder dies without cleaning up: the publisher's reaper unlinks
        assert _wait_for(lambda: not pub.name_exists()), "the name outlived every plugin"


def test_last_graceful_holder_unlinks_a_named_blob_the_publisher_did_not_watch(blob: bytes) -> None:
    name = _unique_name()
    pub = Publication.publish(blob, name=name)
    script = (
        "import sys; from wasmshare.plugins import BlobLease\n"
        f"lease = BlobLease.attach({name!r}); print(lease.region.nbytes, flush=True); sys.stdin.readline(); lease.close()"
    )
    proc = subprocess.Popen(
        [PYTHON, "-c", script], env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert int(proc.stdout.readline()) == len(blob)
        pub.release()
        assert pub.name_exists()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0
        assert not pub.name_exists()
        with pytest.raises(PluginError, match="no blob is published"):
            BlobLease.attach(name)
    finally:
        proc.kill()
        proc.wait()
        pub.release()
        sweep_stale_blobs(prefix=name, min_age_s=0)


def test_named_blob_whose_holders_all_died_is_swept(blob: bytes, tmp_path: Path) -> None:
    name = _unique_name()
    blob_file = tmp_path / "schema.blob"
    blob_file.write_bytes(blob)
    publisher_killed = (
        "import os, signal, sys; from wasmshare.plugins import Publication\n"
        f"pub = Publication.publish(sys.argv[1], name={name!r})\n"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )

    def publish_and_die() -> None:
        proc = subprocess.run([PYTHON, "-c", publisher_killed, str(blob_file)], env=child_env(), check=False)
        assert proc.returncode == -signal.SIGKILL
        assert (Path("/dev/shm") / name).exists()

    publish_and_die()
    assert sweep_stale_blobs(prefix=name, min_age_s=0) == [name]
    assert not (Path("/dev/shm") / name).exists()
    publish_and_die()
    with Publication.publish(blob, name=name) as pub:  # a stale name is reclaimed by publishing it again
        assert pub.name_exists()
        assert sweep_stale_blobs(prefix=name, min_age_s=0) == []  # held: never swept
    assert not (Path("/dev/shm") / name).exists()


def test_module_without_the_plugin_exports_is_refused_before_any_process_starts(
    publication: Publication,
) -> None:
    with pytest.raises(
        PluginModuleError, match="does not export plugin_abi_version, plugin_init, plugin_check"
    ):
        PluginHost(publication, module=ROOT / "guests" / "bias.wasm")
    with pytest.raises(PluginModuleError, match="not a valid wasm module"):
        check_plugin_module(b"\0asm\x01\0\0\0garbage")
    with pytest.raises(PluginModuleError, match="cannot read"):
        check_plugin_module(ROOT / "guests" / "missing.wasm")


def test_plugin_past_its_memory_limit_fails_that_query_alone(publication: Publication) -> None:
    with PluginHost(publication, module=HOSTILE, name="bomb", memory_limit_bytes=4 << 20) as host:
        (bomb,) = host.spawn(1)
        with pytest.raises(GuestLimitExceeded) as info:
            bomb.check(Program.of({"x": {"type": "hostile:grow"}}))
        assert info.value.limit == "memory" and "memory limit" in str(info.value)
        assert bomb.check(Program.of({"x": {"type": "hostile:ok"}})).total == 0
    # A module whose initial memory is already past the limit does not start.
    with (
        PluginHost(None, memory_limit_bytes=65536) as host,
        pytest.raises(GuestLimitExceeded, match="memory limit"),
    ):
        host.spawn(1)


def test_plugin_past_its_deadline_fails_that_query_alone(publication: Publication) -> None:
    with PluginHost(publication, module=HOSTILE, deadline_ms=100) as host:
        (p,) = host.spawn(1)
        with pytest.raises(GuestLimitExceeded) as info:
            p.check(Program.of({"x": {"type": "hostile:spin"}}))
        assert info.value.limit == "deadline"
        assert p.alive


def test_bad_programs_give_clear_errors(publication: Publication) -> None:
    for text, message in [
        (
            "resources: [unclosed",
            r"not valid YAML: while parsing a flow sequence: .*expected ',' or '\]' at line \d+, column \d+$",
        ),
        ("name: x\n", "'resources' section"),
        ("resources:\n  a:\n    properties: {}\n", "resources.a: the resource has no 'type'"),
        ("resources: [*nowhere]", "the alias \\*nowhere has no anchor before it"),
        ("resources: [&a 1, &a 2]", "the anchor &a is defined twice"),
        (
            "resources:\n  a: {type: t, properties: {day: 2001-13-45}}\n",
            "a value that cannot be read: month must be",
        ),
        (
            f"resources:\n  a: {{type: t, properties: {{n: {'9' * 5000}}}}}\n",
            "a value that cannot be read: Exceeds",
        ),
        (
            b"resources: {a: {type: \xff}}",
            "not valid YAML: unacceptable character #x00ff: invalid leading UTF-8 octet",
        ),
    ]:
        with pytest.raises(ProgramError, match=message) as info:
            parse_program(text)
        assert "\n" not in str(info.value), str(info.value)
    huge = Program.of({f"r{i}": {"type": "aws:x/y:Y", "properties": {"k": "v" * 100}} for i in range(200)})
    with PluginHost(publication, io_nbytes=8192) as host:
        host.spawn(1)
        with pytest.raises(ProgramError, match="does not fit"):
            host.check(huge)


# --------------------------------------------------------------------------- untrusted programs and paths

CHILD_HEAP_BYTES = 1 << 30


def _guarded(
    code: str, *args: str, stdin: bytes = b"", timeout_s: float = 120.0
) -> subprocess.CompletedProcess[bytes]:
    """Run Python ``code`` in a child with its heap capped (RLIMIT_DATA) and its time bounded.

    For attacks whose regression would fill this machine's memory (a YAML bomb, a read
    of ``/dev/zero``), crash the interpreter (a C stack overflow) or block forever (a
    FIFO): the child then dies or is killed at the deadline and the test fails, while
    pytest carries on. The deadline is a guard against hanging, not a timing assertion.
    """
    limit = f"import resource; resource.setrlimit(resource.RLIMIT_DATA, ({CHILD_HEAP_BYTES}, {CHILD_HEAP_BYTES}))\n"
    try:
        return subprocess.run(
            [PYTHON, "-c", limit + code, *args],
            input=stdin,
            env=child_env(),
            capture_output=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child was still running after {timeout_s} s (blocked on its input?)")


def _laughs() -> str:
    """The "billion laughs": nine levels of nine aliases, 9**9 lols in about 600 bytes."""
    lines = ['      a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"      a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return "resources:\n  bomb:\n    type: aws:s3/bucket:Bucket\n    properties:\n" + "\n".join(lines) + "\n"


DEEP_LEVELS = 100_000
YAML_BOMBS = {
    "billion-laughs": (
        _laughs(),
        rf"more than {PROGRAM_MAX_NODES:,} YAML nodes with its aliases expanded at line \d+",
    ),
    "self-alias": (
        "resources:\n  loop:\n    type: aws:s3/bucket:Bucket\n    properties: {tags: &a [*a, *a]}\n",
        "refers to the anchor &a from inside itself at line 4",
    ),
    "recursive-merge": (
        "resources:\n  loop:\n    type: aws:s3/bucket:Bucket\n    properties: &m {<<: *m, a: 1}\n",
        "refers to the anchor &m from inside itself",
    ),
    "deep-nesting": (
        "resources:\n  deep:\n    type: aws:s3/bucket:Bucket\n    properties: {k: "
        + "[" * DEEP_LEVELS
        + "]" * DEEP_LEVELS
        + "}\n",
        rf"nested more than {PROGRAM_MAX_NESTING_LEVELS} levels deep at line 4",
    ),
    "string-alias": (
        "resources:\n  s:\n    type: t\n    properties:\n      s: &s "
        + "x" * (1 << 20)
        + "\n      l: ["
        + ", ".join(["*s"] * 80)
        + "]\n",
        f"more than {PROGRAM_EXPANDED_MAX_CHARS:,} characters",
    ),
    "two-documents": ("resources: {}\n---\nresources: {}\n", "second YAML document at line 2"),
    "oversized-text": (
        "resources: {}\n#" + "x" * PROGRAM_TEXT_MAX_BYTES,
        rf"over the {PROGRAM_TEXT_MAX_BYTES:,}-byte limit \(PROGRAM_TEXT_MAX_BYTES\)",
    ),
}
PARSE_FROM_STDIN = """
import sys
from wasmshare.plugins import ProgramError, encode_program, parse_program
raw = sys.stdin.buffer.read()
for text in (raw, raw.decode()):
    try:
        encode_program(parse_program(text))
        print("accepted")
    except ProgramError as e:
        print(f"{type(e).__name__}: {e}")
"""


@pytest.mark.parametrize("case", YAML_BOMBS)
def test_yaml_bomb_is_refused_before_it_is_built(case: str) -> None:
    """Expanded, these exhaust the host's memory (or, nested, overflow PyYAML's C stack): refused unbuilt."""
    text, message = YAML_BOMBS[case]
    if case == "billion-laughs":
        assert len(text) < 700
    if case == "self-alias":
        assert len(text) < 100
    proc = _guarded(PARSE_FROM_STDIN, stdin=text.encode())
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr.decode()[-2000:]}"
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 2, lines  # bytes and str: one line each
    for line in lines:
        assert line.startswith("ProgramError: program ") and re.search(message, line), line


def test_cyclic_program_built_in_python_is_refused_by_the_encoder() -> None:
    code = """
from wasmshare.plugins import Program, ProgramError, encode_program
loop = []
loop.append(loop)
try:
    encode_program(Program.of({"loop": {"type": "t", "properties": {"k": loop}}}))
    print("accepted")
except ProgramError as e:
    print(e)
"""
    proc = _guarded(code)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert (
        f"more than {PROGRAM_MAX_NODES:,} nodes as a tree (limit PROGRAM_MAX_NODES)" in proc.stdout.decode()
    )


CLI = "import sys\nfrom wasmshare.cli import main\nsys.argv = ['wasmshare', *sys.argv[1:]]\nmain()\n"


@pytest.mark.parametrize("case", ["billion-laughs", "self-alias", "deep-nesting"])
def test_cli_check_refuses_a_yaml_bomb_in_one_line(case: str, blob: bytes, tmp_path: Path) -> None:
    text, message = YAML_BOMBS[case]
    (tmp_path / "schema.blob").write_bytes(blob)
    program = tmp_path / f"{case}.yaml"
    program.write_text(text)
    proc = _guarded(CLI, "plugins", "check", str(program), "--blob", str(tmp_path / "schema.blob"))
    err = proc.stderr.decode()
    assert proc.returncode == 1, f"exit {proc.returncode}: {err[-2000:]}"
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err[-2000:]
    assert err.startswith(f"error: {program}: program ") and re.search(message, err), err


PATH_ATTACKS = """
import json, sys
from typer.testing import CliRunner
from wasmshare.cli import app
from wasmshare.plugins import PluginHost, Publication, check_plugin_module, embed_plugin, generate_blob

path, work = sys.argv[1], sys.argv[2]
small = generate_blob(256 * 1024, seed=4)
blob_file = work + "/schema.blob"
open(blob_file, "wb").write(small)
api = {
    "module": [lambda: check_plugin_module(path), lambda: PluginHost(None, module=path),
               lambda: embed_plugin(small, module=path, out=work + "/a.cwasm")],
    "blob": [lambda: Publication.publish(path), lambda: PluginHost(path), lambda: embed_plugin(path, out=work + "/b.cwasm")],
}
cli = {
    "module": ["plugins", "check", blob_file, "--blob", blob_file, "--module", path],
    "blob": ["plugins", "check", blob_file, "--blob", path],
    "program": ["plugins", "check", path, "--blob", blob_file],
}
for role, attacks in api.items():
    for i, attack in enumerate(attacks):
        try:
            attack()
            print(json.dumps([f"{role} api {i}", "accepted", ""]))
        except Exception as e:
            print(json.dumps([f"{role} api {i}", type(e).__name__, str(e)]))
for role, args in cli.items():
    result = CliRunner().invoke(app, args)
    crash = "" if isinstance(result.exception, (SystemExit, type(None))) else f" ({result.exception!r})"
    print(json.dumps([f"{role} cli", f"exit {result.exit_code}{crash}", result.output]))
"""


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "oversized"])
def test_user_paths_that_are_not_plain_files_are_refused_promptly(kind: str, tmp_path: Path) -> None:
    """A plugin module, blob file or program that is a FIFO (an open waits for a writer,
    forever), ``/dev/zero`` (a read never ends), a directory, or a (sparse) file over its
    limit fails at once, from the API and the CLI alike, with a one-line error naming it."""
    if kind == "fifo":
        path = tmp_path / "trap"
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "directory":
        path = tmp_path / "folder"
        path.mkdir()
    else:
        path = tmp_path / "huge"
        with open(path, "wb") as f:
            f.truncate(BLOB_FILE_MAX_BYTES + 1)  # over every limit, without a byte on disk
    what = {
        "fifo": "it is a FIFO, not a regular file",
        "dev-zero": "it is a character device, not a regular file",
        "directory": "it is a directory, not a regular file",
    }
    expected = {
        "module": what.get(kind, f"over the {MODULE_FILE_MAX_BYTES:,}-byte limit (MODULE_FILE_MAX_BYTES)"),
        "blob": what.get(kind, f"over the {BLOB_FILE_MAX_BYTES:,}-byte limit (BLOB_FILE_MAX_BYTES)"),
        "program": what.get(kind, f"over the {PROGRAM_TEXT_MAX_BYTES:,}-byte limit (PROGRAM_TEXT_MAX_BYTES)"),
    }
    errors = {"module": "PluginModuleError", "blob": "PluginError"}
    work = tmp_path / "work"
    work.mkdir()
    proc = _guarded(PATH_ATTACKS, str(path), str(work))
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr.decode()[-2000:]}"
    rows = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert len(rows) == 9, rows
    for name, outcome, message in rows:
        role, how = name.split()[:2]
        assert expected[role] in message and str(path) in message, (name, outcome, message)
        assert "\n" not in message.strip(), (name, message)
        if how == "api":
            assert outcome == errors[role], (name, outcome, message)
        else:
            assert outcome == "exit 1", (name, outcome, message)
            assert message.startswith("error: cannot read ") and "Traceback" not in message, (name, message)
    assert not list(work.glob("*.cwasm")), "an artifact was written from a refused input"


def test_a_user_file_is_read_to_its_end_and_never_past_its_limit() -> None:
    """``/proc`` files stat as empty and still have contents; a read stops once past the limit."""
    from wasmshare.plugins._safe_input import read_user_file

    assert read_user_file("/proc/self/status", label="status", max_bytes=1 << 20).startswith(b"Name:")
    with pytest.raises(
        PluginError, match=r"^cannot read status: it grew past the 16-byte limit \(X\) as it was read$"
    ):
        read_user_file("/proc/self/status", label="status", max_bytes=16, limit_name="X")


def test_named_blob_that_is_a_fifo_is_refused_promptly() -> None:
    """Anyone can make a FIFO in /dev/shm: attaching, sweeping or publishing that name must not block."""
    name = _unique_name()
    fifo = Path("/dev/shm") / name
    os.mkfifo(fifo)
    code = f"""
from wasmshare.plugins import BlobLease, PluginError, Publication, generate_blob, sweep_stale_blobs
try:
    BlobLease.attach({name!r})
except PluginError as e:
    print(e)
print(sweep_stale_blobs(prefix={name!r}, min_age_s=0))
try:
    Publication.publish(generate_blob(256 * 1024, seed=4), name={name!r})
except PluginError as e:
    print(e)
"""
    try:
        proc = _guarded(code)
    finally:
        fifo.unlink()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().splitlines() == [
        f"cannot open blob {name!r}: not a regular file (a FIFO or device in /dev/shm?)",
        "[]",
        f"a blob named {name!r} is already published and in use; pick another name",
    ]


# --------------------------------------------------------------------------- embedded copy-on-write data


def test_embed_data_places_the_blob_at_an_exported_page_aligned_address() -> None:
    wasm = TYPECHECK.read_bytes()
    data = bytes(range(256)) * 1000
    embedded = embed_data(wasm, data, ptr_global="plugin_blob_ptr", len_global="plugin_blob_len")
    assert embedded.data_offset % 65536 == 0
    store = wasmtime.Store()
    instance = wasmtime.Instance(store, wasmtime.Module(store.engine, embedded.wasm), [])
    exports = instance.exports(store)
    ptr_global, len_global, memory = exports["plugin_blob_ptr"], exports["plugin_blob_len"], exports["memory"]
    assert isinstance(ptr_global, wasmtime.Global) and isinstance(len_global, wasmtime.Global)
    assert isinstance(memory, wasmtime.Memory)
    assert (ptr_global.value(store), len_global.value(store)) == (embedded.data_offset, len(data))
    assert memory.read(store, embedded.data_offset, embedded.data_offset + len(data)) == data


def test_embedded_plugins_share_the_compiled_artifact(
    blob: bytes, doc: dict[str, Any], tmp_path: Path
) -> None:
    artifact = embed_plugin(blob, out=tmp_path / "typecheck-schema.cwasm")
    assert (
        artifact.path.is_file() and artifact.blob_nbytes == len(blob) and artifact.epoch and not artifact.fuel
    )
    assert EmbeddedPlugin.load(artifact.path) == EmbeddedPlugin.load(artifact.path)
    program = sample_program(SchemaBlob(blob), resources=12, seed=9, mistakes=0.3)
    with PluginHost(artifact) as host:
        assert host.mode == "embedded"
        plugins = host.spawn(2)
        for r in host.check_all(program):
            assert isinstance(r, CheckResult) and _key(r.diagnostics) == _key(reference_check(doc, program))
        for p in plugins:
            assert p.touch_blob() == -(-len(blob) // 4096)
            maps = Path(f"/proc/{p.pid}/maps").read_text()
            assert str(artifact.path) in maps, "the data should be mapped from the artifact file"
    with pytest.raises(PluginError, match="compiled for deadline=True"):
        PluginHost(artifact, deadline_ms=None)
    with pytest.raises(BlobFormatError):
        embed_plugin(b"WSSCHEMA" + bytes(100), out=tmp_path / "bad.cwasm")
    assert not (tmp_path / "bad.cwasm").exists()
    with pytest.raises(PluginModuleError, match="does not export"):
        embed_plugin(blob, module=ROOT / "guests" / "bias.wasm", out=tmp_path / "bad.cwasm")


def test_embedded_blob_is_write_protected_in_every_plugin(
    blob: bytes, doc: dict[str, Any], tmp_path: Path
) -> None:
    """A write to the embedded data traps (it would otherwise make a private copy of the page)."""
    program = sample_program(SchemaBlob(blob), resources=8, seed=4, mistakes=0.3)
    hostile = embed_plugin(blob, module=HOSTILE, out=tmp_path / "hostile-schema.cwasm")
    with (
        PluginHost(embed_plugin(blob, out=tmp_path / "typecheck-schema.cwasm")) as good,
        PluginHost(hostile, name="hostile") as bad,
    ):
        good.spawn(1)
        (plugin,) = bad.spawn(1)
        with pytest.raises(GuestTrap) as info:
            plugin.check(Program.of({"x": {"type": "hostile:write"}}))
        assert info.value.trap_code == "MEMORY_OUT_OF_BOUNDS"
        assert plugin.alive and plugin.check(Program.of({"x": {"type": "hostile:ok"}})).total == 0
        (result,) = good.check_all(program)
        assert isinstance(result, CheckResult) and _key(result.diagnostics) == _key(
            reference_check(doc, program)
        )


def test_guest_loads_a_cwasm_artifact_for_its_engine_only(blob: bytes, tmp_path: Path) -> None:
    artifact = embed_plugin(blob, out=tmp_path / "p.cwasm", deadline=False)
    with Guest(artifact.path) as guest:
        assert guest.name == "p"
        assert guest.call("plugin_init", artifact.blob_offset, artifact.blob_nbytes) == 0
        assert len(guest.module_sha256) == 64
    with pytest.raises(GuestError, match="cannot load compiled module"):
        Guest(artifact.path, fuel=1000)
    with pytest.raises(GuestError, match="no compiled module"):
        Guest(tmp_path / "missing.cwasm")


# --------------------------------------------------------------------------- command line and benchmark


def test_cli_demo_runs_end_to_end_at_a_small_size() -> None:
    result = runner.invoke(app, ["plugins", "demo", "--size", "2MiB", "--plugins", "2", "--mode", "all"])
    assert result.exit_code == 0, result.output
    for text in (
        "memory with all 2 plugins alive",
        "schema copies",
        "loan",
        "embedded",
        "copying",
        "PSS",
        "RSS",
        "total",
    ):
        assert text in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "12XB"], "invalid size '12XB'"),
        (["--mode", "teleport"], "--mode must be loan, embedded, copy or all"),
        (["--plugins", "0"], "--plugins must be between 1 and 64"),
    ],
)
def test_cli_demo_bad_input_is_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["plugins", "demo", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_generate_and_check(tmp_path: Path) -> None:
    blob_path = tmp_path / "schema.blob"
    result = runner.invoke(app, ["plugins", "generate", str(blob_path), "--size", "1MiB"])
    assert result.exit_code == 0, result.output
    schema = SchemaBlob(blob_path.read_bytes())
    token = schema.tokens()[0]
    good = tmp_path / "good.yaml"
    good.write_text(f"resources:\n  a:\n    type: {token}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"resources:\n  a:\n    type: {token}\n    properties:\n      nope: 1\n")
    result = runner.invoke(app, ["plugins", "check", str(good), str(bad), "--blob", str(blob_path)])
    assert result.exit_code == 1, result.output
    assert "no problems" in result.output and "resources.a.properties.nope" in result.output
    result = runner.invoke(app, ["plugins", "check", str(good), "--blob", str(tmp_path / "nothing.blob")])
    assert result.exit_code == 1 and "cannot read blob file" in result.output


def test_benchmark_writes_rows_in_the_result_format(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_plugins", ROOT / "bench" / "bench_plugins.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--size", "2MiB", "--plugins", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "plugins.json").read_text())
    assert data["machine"]["cores"] >= 1 and data["plugins"] == 2
    for row in data["rows"]:
        assert {"case", "ours_us", "baseline", "baseline_us", "ratio"} <= row.keys()
        assert row["ratio"] == pytest.approx(row["baseline_us"] / row["ours_us"], rel=1e-2)
    memory_rows = [r for r in data["rows"] if "alive" in r["case"]]
    assert all({"pss_mib", "rss_mib", "copies"} <= r.keys() for r in memory_rows)
    assert all("met" in t for t in data["targets"])


# --------------------------------------------------------------------------- prebuilt guests


SOURCES = sorted(PLUGINS.glob("*.c"))


def test_every_plugin_source_has_a_prebuilt_module() -> None:
    assert (
        [p.stem for p in SOURCES]
        == [p.stem for p in sorted(PLUGINS.glob("*.wasm"))]
        == ["hostile_plugin", "typecheck"]
    )


@pytest.mark.skipif(
    importlib.util.find_spec("ziglang") is None, reason="ziglang not installed (pip install 'wasmshare[sdk]')"
)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_prebuilt_plugin_is_up_to_date(source: Path, tmp_path: Path) -> None:
    from wasmshare.abi import build_guest

    fresh = build_guest([source], tmp_path / f"{source.stem}.wasm", extra_flags=BUILD_FLAGS)
    checked_in = source.with_suffix(".wasm")
    check_plugin_module(checked_in)
    if importlib.metadata.version("ziglang") == PINNED_ZIGLANG:
        assert fresh.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in.name} is stale: run guests/build.sh"
        )
