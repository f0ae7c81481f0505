"""Zig guests (sdk/zig): the same outputs as their C twins in both batch modes and through
``wasmshare run``; a Zig guest whose safety check fails traps alone; ``wasmshare build x.zig``;
the prebuilt modules are up to date."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from test_rust_guests import C_CONTROLLERS, WORDS, _rows, _same, mode, table  # noqa: F401 - fixtures
from wasmshare.abi.zig import build_zig_guest
from wasmshare.cli import app
from wasmshare.errors import BuildError
from wasmshare.llm.batch import Action, ControllerBatch, Output, SequenceFailed
from wasmshare.llm.controller import Controller
from wasmshare.llm.tokens import TokenTable

ZIG = Path(__file__).resolve().parent.parent / "sdk" / "zig" / "examples"
SOURCES = sorted(ZIG.glob("*.zig"))

pytest.importorskip("ziglang", reason="Zig guests build with the ziglang package")


def twins(name: str, arg: bytes) -> tuple[Controller, Controller]:
    return Controller(C_CONTROLLERS / f"{name}.wasm", arg), Controller(ZIG / f"{name}.wasm", arg)


def test_every_source_has_a_prebuilt_module() -> None:
    assert [p.stem for p in SOURCES] == ["allow_list", "boost_words_sparse"]
    assert [p.stem for p in SOURCES] == [p.stem for p in sorted(ZIG.glob("*.wasm"))]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_prebuilt_is_up_to_date(source: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / source.name
    copy.parent.mkdir()
    shutil.copy(source, copy)
    fresh = build_zig_guest(copy, tmp_path / f"{source.stem}.wasm")
    assert fresh.read_bytes() == source.with_suffix(".wasm").read_bytes(), (
        f"{source.name} changed: rebuild with guests/build.sh"
    )


def test_allow_list_matches_c(table: TokenTable, mode: str) -> None:  # noqa: F811
    c, zig = twins("allow_list", struct.pack("<4I", 5, 300, 700, 961))
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c, prompt=[1, 2]), batch.add(zig, prompt=[1, 2])
        for i in range(4):
            step = batch.step({a: [i + 3], b: [i + 3]} if i else None)
            assert _same(step.results[a], step.results[b]) and step.results[b].output is Output.BITMASK
            assert _rows(batch, a)[0] == _rows(batch, b)[0]


def test_boost_words_sparse_matches_c(table: TokenTable, mode: str) -> None:  # noqa: F811
    c, zig = twins("boost_words_sparse", b"world\t2.5\nbad\t-1\r\ngood\t0.5\ngood\t4\nsecret\t1e-2\n")
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c), batch.add(zig)
        for i in range(3):
            step = batch.step({a: [7], b: [7]} if i else None)
            assert _same(step.results[a], step.results[b])
            pairs = batch.row_outputs(step)
            ids_a, values_a = pairs[a].sparse_bias  # type: ignore[misc]
            ids_b, values_b = pairs[b].sparse_bias  # type: ignore[misc]
            assert ids_a.tolist() == ids_b.tolist() and values_a.tolist() == values_b.tolist()
            assert ids_b.tolist() == [
                256 + WORDS.index(w) for w in (b"world", b" world", b" bad", b"good", b" secret")
            ]


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("allow_list", b""),
        ("allow_list", b"\x01\x00\x00"),
        ("allow_list", struct.pack("<I", 10**6)),
        ("boost_words_sparse", b"word"),
        ("boost_words_sparse", b"\tword"),
        ("boost_words_sparse", b"word\t1e99"),
        ("boost_words_sparse", b"word\t."),
    ],
)
def test_bad_arguments_fail_create_like_c(table: TokenTable, name: str, arg: bytes) -> None:  # noqa: F811
    causes = []
    with ControllerBatch(table, capacity=2) as batch:
        for controller in twins(name, arg):
            with pytest.raises(SequenceFailed) as info:
                batch.add(controller)
            causes.append(info.value.cause)
    assert causes == ["error code", "error code"]


HOSTILE_ZIG = """
const ws = @import("wasmshare");

const Hostile = struct {
    mode: u8,

    pub fn create(ctx: *ws.Create) !Hostile {
        const a = ws.arg(ctx.in);
        if (a.len != 1) return error.BadArgument;
        return .{ .mode = a[0] };
    }

    pub fn step(self: *Hostile, s: *ws.Step) !void {
        const row = ws.mask(s.in);
        switch (self.mode) {
            'o' => {},
            'b' => row[row.len + s.in.vocab_size] = 0, // past the row: a safety-checked index
            'p' => @panic("asked to"),
            else => unreachable,
        }
        ws.maskFill(row);
        s.answer(.bitmask);
    }
};

comptime {
    ws.exportController(Hostile);
}
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zig")
    (folder / "hostile.zig").write_text(HOSTILE_ZIG)
    return build_zig_guest(folder / "hostile.zig", folder / "hostile.wasm")


@pytest.mark.parametrize("behaviour", [b"b", b"p", b"u"], ids=["out_of_bounds", "panic", "unreachable"])
def test_a_failed_safety_check_traps_that_guest_alone(
    table: TokenTable,  # noqa: F811
    mode: str,  # noqa: F811
    hostile: Path,
    behaviour: bytes,
) -> None:
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        bad = batch.add(Controller(hostile, behaviour), sequence_id=66)
        ok = batch.add(Controller(ZIG / "allow_list.wasm", struct.pack("<2I", 5, 9)))
        step = batch.step()
        assert step.results[ok].action is Action.CONTINUE and step.results[ok].output is Output.BITMASK
        error = step.results[bad].error
        assert step.results[bad].action is Action.ERROR and isinstance(error, SequenceFailed)
        assert error.cause == "trap" and error.sequence == 66
        assert bad not in batch.sequences and ok in batch.step({ok: [5]}).results


def test_a_compile_error_is_a_build_error(tmp_path: Path) -> None:
    (tmp_path / "bad.zig").write_text("const x = ;\n")
    with pytest.raises(BuildError, match=r"zig failed on .*bad\.zig"):
        build_zig_guest(tmp_path / "bad.zig", tmp_path / "bad.wasm")


def test_wasmshare_build_builds_a_zig_guest(tmp_path: Path) -> None:
    out = tmp_path / "allow_list.wasm"
    result = CliRunner().invoke(app, ["build", str(ZIG / "allow_list.zig"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (ZIG / "allow_list.wasm").read_bytes()
    mixed = CliRunner().invoke(app, ["build", str(ZIG / "allow_list.zig"), "guests/calls.c", "-o", str(out)])
    assert mixed.exit_code == 1 and "one guest module per build" in mixed.output


def test_wasmshare_run_gives_the_zig_controller_the_c_twins_answer() -> None:
    pytest.importorskip("transformers", reason="generation needs transformers")
    answers = []
    for module in (C_CONTROLLERS / "allow_list.wasm", ZIG / "allow_list.wasm"):
        args = ["run", "Say a word.", "--controller", str(module), "--arg", "ids:504,1543,2221,3000"]
        result = CliRunner().invoke(app, [*args, "--max-tokens", "6", "--json"])
        assert result.exit_code in (0, 2), result.output
        [record] = [json.loads(line) for line in result.stdout.splitlines()]
        answers.append((record["text"], record["tokens"]))
    assert answers[0] == answers[1] and answers[0][1] == 6
