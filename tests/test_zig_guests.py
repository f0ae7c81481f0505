"""Zig guests (sdk/zig/wasmshare.zig, built with :func:`wasmshare.abi.zig.build_zig_guest`).

* The examples in sdk/zig/examples have their prebuilt modules, equal byte for byte to a
  fresh build from another folder (no path leaks in), importing nothing.
* In a ControllerBatch, in both modes, the Zig ``allow_list`` and ``boost_words_sparse``
  give exactly the results of their C twins in guests/controllers (results, mask rows,
  sparse pairs, bias rows, over several steps) and refuse the same bad arguments.
* A Zig guest whose safety check fails (an out-of-bounds index, overflow, ``unreachable``,
  ``@panic``) traps and ends only its own sequence; the SDK's logging panic handler says why.
* Compile errors are BuildErrors with the compiler's words.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, cast

import numpy as np
import pytest
import wasmtime

from wasmshare.abi.zig import ZIG_OPTIMIZE_MODES, build_zig_guest, zig_command, zig_sdk_dir, zig_sdk_path
from wasmshare.errors import BuildError
from wasmshare.llm.batch import Action, ControllerBatch, Output, SequenceFailed, StepResult
from wasmshare.llm.controller import Controller
from wasmshare.llm.tokens import TokenTable

ROOT = Path(__file__).resolve().parent.parent
C_CONTROLLERS = ROOT / "guests" / "controllers"
ZIG = ROOT / "sdk" / "zig" / "examples"
SOURCES = sorted(ZIG.glob("*.zig"))
Mode = Literal["threads", "workers"]
WORDS = [b" hello", b"world", b" world", b" bad", b"badge", b"good", b"<eos>", b" secret", b"sec", b"ret"]

HAVE_ZIG = importlib.util.find_spec("ziglang") is not None
needs_zig = pytest.mark.skipif(not HAVE_ZIG, reason="ziglang not installed (pip install 'wasmshare[sdk]')")


def tid(word: bytes) -> int:
    return 256 + WORDS.index(word)


def u32s(*ids: int) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


@pytest.fixture(scope="module")
def table() -> Iterator[TokenTable]:
    tokens = [bytes([i]) for i in range(256)] + WORDS + [b"x%d" % i for i in range(700)]
    eos = tid(b"<eos>")
    with TokenTable.from_tokens(tokens, special=[eos], eos_token=eos, name="test") as t:
        yield t


@pytest.fixture(scope="module")
def paired_table() -> Iterator[TokenTable]:
    """Every word w%d twice (``w7`` and `` w7``): boost_words_sparse fills V / 2 pairs fast."""
    tokens = [bytes([i]) for i in range(256)]
    for i in range(200):
        tokens += [b"w%d" % i, b" w%d" % i]
    with TokenTable.from_tokens(tokens, name="paired") as t:  # V = 656, V / 2 = 328 pairs
        yield t


@pytest.fixture(params=["threads", "workers"])
def mode(request: pytest.FixtureRequest) -> Mode:
    return cast(Mode, request.param)


def twins(name: str, arg: bytes) -> tuple[Controller, Controller]:
    """The C controller and its Zig twin, with the same argument."""
    return Controller(C_CONTROLLERS / f"{name}.wasm", arg), Controller(ZIG / f"{name}.wasm", arg)


def same(x: StepResult, y: StepResult) -> bool:
    """Results equal but for the sequence they belong to."""
    fields = ("action", "output", "backtrack", "fast_forward")
    return all(getattr(x, f) == getattr(y, f) for f in fields)


def rows(batch: ControllerBatch, seq: int) -> tuple[bytes, bytes]:
    """A sequence's mask row and bias row, as bytes."""
    slot = batch.slot(seq)
    return np.asarray(batch.mask[slot]).tobytes(), np.asarray(batch.bias[slot]).tobytes()


def allowed_ids(mask_row: bytes, vocab_size: int) -> list[int]:
    bits = np.unpackbits(np.frombuffer(mask_row, np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits).tolist()


def signature(path: Path) -> tuple[list[tuple[str, str]], set[str]]:
    module = wasmtime.Module(wasmtime.Engine(), path.read_bytes())
    return [(i.module, i.name or "") for i in module.imports], {e.name for e in module.exports}


# --------------------------------------------------------------------------- the prebuilt examples


def test_every_example_has_a_prebuilt_module() -> None:
    assert [p.stem for p in SOURCES] == ["allow_list", "boost_words_sparse"]
    assert [p.stem for p in SOURCES] == [p.stem for p in sorted(ZIG.glob("*.wasm"))]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_prebuilt_imports_nothing_and_reports_abi_1(source: Path) -> None:
    wasm = source.with_suffix(".wasm")
    imports, exports = signature(wasm)
    assert imports == []  # like their C twins: a panic traps without calling the host
    assert {"memory", "ws_abi_version", "ws_ctrl_abi_version", "ws_ctrl_create", "ws_ctrl_step"} <= exports
    store = wasmtime.Store()
    instance = wasmtime.Instance(store, wasmtime.Module(store.engine, wasm.read_bytes()), [])
    for name in ("ws_abi_version", "ws_ctrl_abi_version"):
        func = instance.exports(store)[name]
        assert isinstance(func, wasmtime.Func) and func(store) == 1


@needs_zig
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_prebuilt_is_up_to_date(source: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / source.name  # built from another folder: paths do not leak in
    copy.parent.mkdir()
    shutil.copy(source, copy)
    fresh = build_zig_guest(copy, tmp_path / "out" / f"{source.stem}.wasm")
    data = fresh.read_bytes()
    assert data == source.with_suffix(".wasm").read_bytes(), (
        f"{source.name} changed: rebuild with guests/build.sh"
    )
    for folder in (copy.parent, ROOT, zig_sdk_dir(), tmp_path):
        assert os.fsencode(folder) not in data


def test_zig_command_builds_release_safe_freestanding_with_the_sdk(tmp_path: Path) -> None:
    assert zig_sdk_path().is_file() and zig_sdk_path().parent == zig_sdk_dir()
    assert zig_sdk_dir().resolve() == (ROOT / "sdk" / "zig").resolve()  # through abi/sdk
    cmd = zig_command("g.zig", "g.wasm")
    assert cmd[1:4] == ["-m", "ziglang", "build-exe"]
    assert cmd[cmd.index("-O") + 1] == "ReleaseSafe" == ZIG_OPTIMIZE_MODES["fast"]
    assert cmd[cmd.index("-target") + 1] == "wasm32-freestanding"
    assert {"-fno-entry", "-rdynamic", "-fstrip", f"-Mwasmshare={zig_sdk_path()}", "-Mroot=g.zig"} <= set(cmd)
    assert cmd[cmd.index("--dep") + 1] == "wasmshare" and cmd[-1] == "-femit-bin=g.wasm"
    assert "-fstrip" not in zig_command("g.zig", "g.wasm", optimize="debug")
    cached = zig_command("g.zig", "g.wasm", cache_dir=tmp_path)
    assert cached[cached.index("--global-cache-dir") + 1] == str(tmp_path / "global")
    with pytest.raises(ValueError, match="optimize"):
        zig_command("g.zig", "g.wasm", optimize="fastest")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- twins of the C controllers


@pytest.mark.parametrize(
    "ids",
    [
        (5, 300, 700, 965),
        (0, 31, 32, 33, 5, 5, 965),
        tuple(random.Random(3).randrange(966) for _ in range(65536)),
    ],
    ids=["four", "word_edges_and_repeats", "the_most_ids"],
)
def test_allow_list_matches_c(table: TokenTable, mode: Mode, ids: tuple[int, ...]) -> None:
    c, zig = twins("allow_list", u32s(*ids))
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c, prompt=[1, 2]), batch.add(zig, prompt=[1, 2])
        for i in range(4):
            step = batch.step({a: [ids[i % len(ids)]], b: [ids[i % len(ids)]]} if i else None)
            assert same(step.results[a], step.results[b])
            assert step.results[b].action is Action.CONTINUE and step.results[b].output is Output.BITMASK
            assert rows(batch, a) == rows(batch, b)
            assert allowed_ids(rows(batch, b)[0], table.vocab_size) == sorted(set(ids))


def test_boost_words_sparse_matches_c(table: TokenTable, mode: Mode) -> None:
    arg = b"world\t2.5\nbad\t-1\r\ngood\t0.5\n\ngood\t4\nsecret\t1e-2\n<eos>\t3\nnothere\t1\n"
    c, zig = twins("boost_words_sparse", arg)
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c), batch.add(zig)
        for i in range(3):
            step = batch.step({a: [7], b: [7]} if i else None)
            assert same(step.results[a], step.results[b])
            assert step.results[b].action is Action.CONTINUE and step.results[b].output is Output.SPARSE_BIAS
            outputs = batch.row_outputs(step)
            ids_a, values_a = outputs[a].sparse_bias  # type: ignore[misc]
            ids_b, values_b = outputs[b].sparse_bias  # type: ignore[misc]
            assert ids_a.tolist() == ids_b.tolist() and values_a.tobytes() == values_b.tobytes()
            # the special <eos> is skipped; the last "good" line wins; token order
            assert ids_b.tolist() == [tid(w) for w in (b"world", b" world", b" bad", b"good", b" secret")]
            assert values_b.tolist() == pytest.approx([2.5, 2.5, -1.0, 4.0, 0.01])
            assert rows(batch, a) == rows(batch, b)


FLOATS = [
    b"1", b"-1", b"+3.75", b"0.5", b".5", b"5.", b"1e2", b"-2.5E-1", b"0", b"-0", b"1e-50", b"3.4e38",
    b"1.17549435e-38", b"9e-39", b"1.4e-45", b"0.1", b"123456789.123456789", b"1e+3", b"00012.50",
    b"2.7182818284590452353602874713527", b"1e0009", b"7e-46",
]  # fmt: skip


def test_boost_words_sparse_parses_floats_like_c(table: TokenTable, mode: Mode) -> None:
    """Each value on its own one-byte word: both give the same f32 bits, subnormals included."""
    letters = b"abcdefghijklmnopqrstuvwxyz"
    arg = b"".join(bytes([letters[i]]) + b"\t" + text + b"\n" for i, text in enumerate(FLOATS))
    c, zig = twins("boost_words_sparse", arg)
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c), batch.add(zig)
        outputs = batch.row_outputs(batch.step())
        ids_a, values_a = outputs[a].sparse_bias  # type: ignore[misc]
        ids_b, values_b = outputs[b].sparse_bias  # type: ignore[misc]
    assert ids_b.tolist() == ids_a.tolist() == list(letters[: len(FLOATS)])
    assert values_b.view(np.uint32).tolist() == values_a.view(np.uint32).tolist()
    assert values_b[FLOATS.index(b"123456789.123456789")] == np.float32(123456789.123456789)


def test_boost_words_sparse_fills_the_slot_like_c(paired_table: TokenTable, mode: Mode) -> None:
    """164 words match 328 = V / 2 tokens: the slot is full, and both accept; 165 is too many."""
    full = b"".join(b"w%d\t%d\n" % (i, i) for i in range(164))
    c, zig = twins("boost_words_sparse", full)
    with ControllerBatch(paired_table, capacity=4, mode=mode, workers=1) as batch:
        a, b = batch.add(c), batch.add(zig)
        step = batch.step()
        assert same(step.results[a], step.results[b])
        outputs = batch.row_outputs(step)
        ids_a, values_a = outputs[a].sparse_bias  # type: ignore[misc]
        ids_b, values_b = outputs[b].sparse_bias  # type: ignore[misc]
        assert len(ids_b) == paired_table.vocab_size // 2
        assert ids_a.tolist() == ids_b.tolist() and values_a.tobytes() == values_b.tobytes()
        for controller in twins("boost_words_sparse", full + b"w164\t1\n"):
            with pytest.raises(SequenceFailed) as info:
                batch.add(controller)
            assert info.value.cause == "error code"


BAD_ARGUMENTS = [
    ("allow_list", b""),
    ("allow_list", b"\x01\x00\x00"),
    ("allow_list", u32s(966)),  # = V
    ("allow_list", u32s(1, 0xFFFFFFFF)),
    ("allow_list", u32s(*([1] * 65537))),
    ("boost_words_sparse", b""),
    ("boost_words_sparse", b"\n\r\n\n"),
    ("boost_words_sparse", b"word"),
    ("boost_words_sparse", b"hello 2"),
    ("boost_words_sparse", b"\tword"),
    ("boost_words_sparse", b"\t1"),
    ("boost_words_sparse", b"hello\t"),
    ("boost_words_sparse", b"hello\tx"),
    ("boost_words_sparse", b"hello\t1.2.3"),
    ("boost_words_sparse", b"hello\t1e"),
    ("boost_words_sparse", b"hello\t-"),
    ("boost_words_sparse", b"word\t."),
    ("boost_words_sparse", b"word\t1e99"),
    ("boost_words_sparse", b"word\t1.5x"),
    ("boost_words_sparse", b"good\t1\nword\t2 "),
    ("boost_words_sparse", b"a" * 256 + b"\t1"),
    ("boost_words_sparse", b"".join(b"w%d\t1\n" % i for i in range(257))),
]


@pytest.mark.parametrize(
    ("name", "arg"), BAD_ARGUMENTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_ARGUMENTS)]
)
def test_bad_arguments_fail_create_like_c(table: TokenTable, mode: Mode, name: str, arg: bytes) -> None:
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        failures: list[SequenceFailed] = []
        for controller in twins(name, arg):
            with pytest.raises(SequenceFailed) as info:
                batch.add(controller, sequence_id=40 + len(failures))
            failures.append(info.value)
        assert [f.cause for f in failures] == ["error code", "error code"]
        assert [f.sequence for f in failures] == [40, 41] and batch.sequences == ()
        # the slots were freed: both twins still start with a good argument
        good = u32s(5) if name == "allow_list" else b"good\t1"
        assert len({batch.add(controller) for controller in twins(name, good)}) == 2


def test_the_longest_boost_words_argument_is_accepted_like_c(table: TokenTable) -> None:
    """256 lines, the last with a 255-byte word: at the limits, both accept."""
    arg = b"".join(b"x%d\t%d.5\n" % (i, i) for i in range(255)) + b"a" * 255 + b"\t1"
    with ControllerBatch(table, capacity=2) as batch:
        a, b = (batch.add(controller) for controller in twins("boost_words_sparse", arg))
        step = batch.step()
        assert same(step.results[a], step.results[b]) and step.results[a].action is Action.CONTINUE
        outputs = batch.row_outputs(step)
        ids_a, values_a = outputs[a].sparse_bias  # type: ignore[misc]
        ids_b, values_b = outputs[b].sparse_bias  # type: ignore[misc]
        assert len(ids_b) == 255 and ids_a.tolist() == ids_b.tolist()
        assert values_a.tobytes() == values_b.tobytes()


# --------------------------------------------------------------------------- hostile guests

# Create and step take the raw records here (the other form of exportController). The
# default panic handler: a failed check traps without importing anything.
HOSTILE_ZIG = """
const std = @import("std");
const ws = @import("wasmshare");

const Hostile = struct {
    mode: u8,

    pub fn create(in: *const ws.StepInput) !Hostile {
        const a = ws.arg(in);
        if (a.len != 1) return error.BadArgument;
        if (a[0] == 'C') @panic("asked to panic at create");
        return .{ .mode = a[0] };
    }

    pub fn step(self: *Hostile, in: *const ws.StepInput, out: *ws.StepResult) !void {
        const row = ws.mask(in);
        switch (self.mode) {
            'o' => {},
            'b' => row[row.len + in.step] = 0, // past the row: a checked index
            'p' => @panic("asked to"),
            'u' => unreachable,
            'v' => row[0] = (std.math.maxInt(u32) - in.step) + 1 + in.step, // overflow
            'e' => return error.Refused,
            else => return error.UnknownMode,
        }
        ws.maskFill(row);
        out.output = ws.output_bitmask;
    }
};

comptime {
    ws.exportController(Hostile);
}
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_ZIG:
        pytest.skip("ziglang not installed (pip install 'wasmshare[sdk]')")
    folder = tmp_path_factory.mktemp("zig")
    (folder / "hostile.zig").write_text(HOSTILE_ZIG)
    return build_zig_guest(folder / "hostile.zig", folder / "hostile.wasm")


def test_the_hostile_guest_imports_nothing(hostile: Path) -> None:
    assert signature(hostile)[0] == []


@pytest.mark.parametrize(
    ("behaviour", "cause"),
    [(b"b", "trap"), (b"p", "trap"), (b"u", "trap"), (b"v", "trap"), (b"e", "error code")],
    ids=["out_of_bounds", "panic", "unreachable", "overflow", "error"],
)
def test_a_failing_zig_guest_ends_its_sequence_alone(
    table: TokenTable, mode: Mode, hostile: Path, behaviour: bytes, cause: str
) -> None:
    with ControllerBatch(table, capacity=3, mode=mode, workers=1) as batch:
        bad = batch.add(Controller(hostile, behaviour), sequence_id=66)
        fine = batch.add(Controller(hostile, b"o"))
        ok = batch.add(Controller(ZIG / "allow_list.wasm", u32s(5, 9)))
        step = batch.step()
        error = step.results[bad].error
        assert step.results[bad].action is Action.ERROR and isinstance(error, SequenceFailed)
        assert error.cause == cause and error.sequence == 66 and "hostile" in str(error)
        if cause == "trap":
            assert "unreachable" in str(error)  # a panic is a wasm `unreachable`
        assert bad not in batch.sequences
        for i in range(3):
            if i:
                step = batch.step({ok: [5], fine: [9]})
            assert step.results[ok].action is Action.CONTINUE and step.results[ok].output is Output.BITMASK
            assert step.results[fine].output is Output.BITMASK
            assert allowed_ids(rows(batch, ok)[0], table.vocab_size) == [5, 9]
            assert len(allowed_ids(rows(batch, fine)[0], table.vocab_size)) == table.vocab_size


def test_a_panic_in_create_fails_that_sequence_only(table: TokenTable, mode: Mode, hostile: Path) -> None:
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        ok = batch.add(Controller(ZIG / "allow_list.wasm", u32s(5)))
        with pytest.raises(SequenceFailed) as info:
            batch.add(Controller(hostile, b"C"))
        assert info.value.cause == "trap"
        assert batch.sequences == (ok,) and batch.step().results[ok].output is Output.BITMASK


# Hand-written exports (exportControllerAbi) and the SDK's logging panic handler.
LOGGING_ZIG = """
const ws = @import("wasmshare");

pub const panic = ws.log_panic;

comptime {
    ws.exportControllerAbi();
}

var extra: u32 = 0;

export fn ws_ctrl_create(in: *const ws.StepInput, out: *ws.StepResult) i32 {
    _ = out;
    extra = @intCast(ws.arg(in).len);
    return ws.ok;
}

export fn ws_ctrl_step(in: *const ws.StepInput, out: *ws.StepResult) i32 {
    const row = ws.mask(in);
    row[row.len + extra] = 0;
    out.output = ws.output_bitmask;
    return ws.ok;
}
"""


@needs_zig
def test_the_logging_panic_handler_says_why_then_traps(
    table: TokenTable, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "logging.zig").write_text(LOGGING_ZIG)
    wasm = build_zig_guest(tmp_path / "logging.zig", tmp_path / "logging.wasm")
    assert signature(wasm)[0] == [("wasmshare", "ws_log")]  # what it calls, nothing else
    words = -(-table.vocab_size // 32)
    with caplog.at_level("INFO", logger="wasmshare.guest"), ControllerBatch(table, capacity=1) as batch:
        bad = batch.add(Controller(wasm, b"xyz"))
        result = batch.step().results[bad]
    assert result.action is Action.ERROR and isinstance(result.error, SequenceFailed)
    assert result.error.cause == "trap"
    logged = [r.getMessage() for r in caplog.records if "panic:" in r.getMessage()]
    assert len(logged) == 1 and f"panic: index out of bounds: index {words + 3}, len {words}" in logged[0]


# --------------------------------------------------------------------------- the rest of the SDK

# Touches every public function of the SDK (Zig only compiles what is used, so this is also
# what checks that they compile), with checks that fail create or a step when one is wrong.
API_ZIG = """
const std = @import("std");
const ws = @import("wasmshare");

const Api = struct {
    constraint: ?ws.Constraint,
    scratch: []u32,

    pub fn create(ctx: *ws.Create) !Api {
        const table = try ctx.tokenTable();
        if (table.len() != ctx.vocabSize() or ctx.prompt().len != 2 or ctx.sequenceId() != 77) return error.Input;
        const eos = table.eos() orelse return error.NoEos;
        if (!table.isSpecial(eos) or table.bytes(eos) == null) return error.Table;
        if (table.bytes(table.len()) != null or table.isSpecial(table.len())) return error.Table;
        if ((table.bos() orelse ws.no_token) != ctx.in.token_table.?.bos_token) return error.Table;
        const plain = std.mem.eql(u8, ctx.arg(), "plain");
        // The tests' own vocabulary: 256 bytes, then " hello", "world", ..., "<eos>" (id 262), ...
        if (plain and (!std.mem.eql(u8, table.bytes(eos).?, "<eos>") or table.bos() != null)) return error.Table;
        if (plain and !std.mem.eql(u8, table.bytes(256).?, " hello")) return error.Table;
        var it = table.iterator();
        var n: u32 = 0;
        var total: usize = 0;
        var specials: u32 = 0;
        while (it.next()) |tok| : (n += 1) {
            if (tok.id != n or tok.special != table.isSpecial(n)) return error.Iterator;
            if (!std.mem.eql(u8, tok.bytes, table.bytes(n).?)) return error.Iterator;
            total += tok.bytes.len;
            specials += @intFromBool(tok.special);
        }
        if (n != table.len() or total != table.data.len or specials == 0) return error.Iterator;
        // 966 tokens of 2994 bytes: 256 single bytes, WORDS (48), x0 .. x699 (2690)
        if (plain and (specials != 1 or n != 966 or total != 2994)) return error.Iterator;
        // Before create the mask row is all-allowed and the bias row zero.
        if (!ws.maskAllowed(ctx.mask(), ctx.vocabSize() - 1) or ctx.bias()[0] != 0) return error.Slots;
        if (ctx.sparseBias().ids.len != ctx.vocabSize() / 2) return error.Slots;
        const scratch = ws.grow(u32, 100_000) orelse return error.NoMemory;
        if (@intFromPtr(scratch.ptr) % ws.page_size != 0 or scratch[99_999] != 0) return error.Grow;
        if (ws.grow(u8, 0).?.len != 0) return error.Grow;
        _ = ws.regionSize(12345) catch |e| if (e != error.BadHandle) return e;
        if (ws.borrow(12345, .read_only)) |_| return error.Borrow else |_| {}
        if (ws.release(12345)) |_| return error.Release else |_| {}
        const c: ?ws.Constraint = if (std.mem.eql(u8, ctx.arg(), "regex")) try ws.Constraint.open(.regex, "(ab)+") else null;
        ws.log("api: created");
        return .{ .constraint = c, .scratch = scratch };
    }

    pub fn step(self: *Api, s: *ws.Step) !void {
        if (self.constraint) |c| {
            for (s.sampled()) |t| try c.consume(t);
            try c.fillMask(s.mask());
            s.answer(.bitmask);
            if (c.isAccepting() and !c.isStopped()) s.stop();
            return;
        }
        switch (s.index()) {
            0 => {
                const pairs = s.sparseBias();
                pairs.ids[0] = 3;
                pairs.values[0] = 1.5;
                pairs.ids[1] = 4;
                pairs.values[1] = -2;
                s.answer(.{ .sparse_bias = 2 });
            },
            1 => {
                ws.biasFill(s.bias(), 0.25);
                s.bias()[7] = 1;
                s.answer(.bias);
            },
            2 => {
                const m = s.mask();
                ws.maskClear(m);
                ws.maskAllow(m, 10);
                ws.maskAllow(m, 20);
                ws.maskBan(m, 20);
                ws.maskAllow(m, 1 << 30); // past the row: ignored
                if (!ws.maskAllowed(m, 10) or ws.maskAllowed(m, 20) or ws.maskAllowed(m, 1 << 30)) return error.Mask;
                s.answer(.bitmask);
            },
            3 => {
                if (!std.mem.eql(u32, s.sampled(), &.{ 10, 10 })) return error.Sampled;
                s.backtrack(1);
                try s.fastForward(&.{ 11, 12 });
                const too_many: [ws.max_ff_tokens + 1]u32 = @splat(0);
                if (s.fastForward(&too_many)) |_| return error.FastForward else |_| {}
                ws.maskFill(s.mask());
                s.answer(.none);
            },
            else => s.stop(),
        }
        self.scratch[s.index()] = s.vocabSize();
    }

    pub fn deinit(self: *Api) void {
        if (self.constraint) |c| c.close(); // ws_ctrl_free, when the sequence is removed
    }
};

comptime {
    ws.exportController(Api);
}
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAVE_ZIG:
        pytest.skip("ziglang not installed (pip install 'wasmshare[sdk]')")
    folder = tmp_path_factory.mktemp("zig")
    (folder / "api.zig").write_text(API_ZIG)
    return build_zig_guest(folder / "api.zig", folder / "api.wasm")


def test_the_api_guest_imports_what_it_calls(api: Path) -> None:
    host = {"ws_borrow", "ws_release", "ws_region_size", "ws_log"}
    constraint = {"open", "fill_mask", "consume", "is_accepting", "is_stopped", "close"}
    assert {m for m, _ in signature(api)[0]} == {"wasmshare"}
    assert {n for _, n in signature(api)[0]} == host | {f"ws_constraint_{n}" for n in constraint}
    assert "ws_ctrl_free" in signature(api)[1]


def test_every_sdk_helper_does_what_it_says(table: TokenTable, mode: Mode, api: Path) -> None:
    with ControllerBatch(table, capacity=1, mode=mode, workers=1) as batch:
        seq = batch.add(Controller(api, b"plain"), prompt=[1, 2], sequence_id=77)
        step = batch.step()
        assert step.results[seq].output is Output.SPARSE_BIAS and step.results[seq].error is None
        ids, values = batch.row_outputs(step)[seq].sparse_bias  # type: ignore[misc]
        assert ids.tolist() == [3, 4] and values.tolist() == [1.5, -2.0]
        step = batch.step({seq: [1]})
        assert step.results[seq].output is Output.BIAS
        bias = np.asarray(batch.bias[batch.slot(seq)])
        assert bias[7] == 1.0 and (np.delete(bias, 7) == 0.25).all()
        assert batch.step({seq: [10]}).results[seq].output is Output.BITMASK
        assert allowed_ids(rows(batch, seq)[0], table.vocab_size) == [10]
        result = batch.step({seq: [10, 10]}).results[seq]
        assert (result.action, result.output, result.backtrack, result.fast_forward) == (
            Action.CONTINUE,
            Output.NONE,
            1,
            (11, 12),
        )
        assert batch.step({seq: [5]}).results[seq].action is Action.STOP


def test_the_constraint_wrappers_drive_the_hosts_engine(api: Path) -> None:
    pytest.importorskip("llguidance", reason="the host's constraint engine is llguidance")
    tokenizers = pytest.importorskip(
        "tokenizers", reason="the constraint engine needs a Hugging Face tokenizer"
    )
    table = TokenTable.deepseek()
    assert table.tokenizer_json is not None
    hf = tokenizers.Tokenizer.from_str(table.tokenizer_json)
    [a], [b], [ab] = (hf.encode(text, add_special_tokens=False).ids for text in ("a", "b", "ab"))
    with ControllerBatch(table, capacity=2) as batch:
        seq = batch.add(Controller(api, b"regex"), prompt=[1, 2], sequence_id=77)
        assert batch.step().results[seq].output is Output.BITMASK  # the host wrote the mask
        allowed = set(allowed_ids(rows(batch, seq)[0], table.vocab_size))
        assert {a, ab} <= allowed and b not in allowed
        assert batch.step({seq: [a]}).results[seq].action is Action.CONTINUE
        allowed = set(allowed_ids(rows(batch, seq)[0], table.vocab_size))
        assert b in allowed and a not in allowed and ab not in allowed
        assert batch.step({seq: [b]}).results[seq].action is Action.STOP  # "ab" matches (ab)+
        batch.remove(seq)
        seq = batch.add(Controller(api, b"regex"), prompt=[1, 2], sequence_id=77)
        batch.step()
        result = batch.step({seq: [b]}).results[seq]  # not allowed: consume fails, the step errs
        assert result.action is Action.ERROR and isinstance(result.error, SequenceFailed)
        assert result.error.cause == "error code"


# --------------------------------------------------------------------------- build errors


@needs_zig
def test_a_syntax_error_is_a_short_build_error(tmp_path: Path) -> None:
    (tmp_path / "bad.zig").write_text("const x = ;\n")
    with pytest.raises(BuildError) as info:
        build_zig_guest(tmp_path / "bad.zig", tmp_path / "bad.wasm")
    message = str(info.value)
    assert message.startswith("compiling Zig guest bad.wasm from ") and "failed" in message.splitlines()[0]
    assert "bad.zig:1:11: error: expected expression, found ';'" in message
    assert len(message.splitlines()) <= 5
    assert not (tmp_path / "bad.wasm").exists()


@needs_zig
def test_a_controller_without_step_is_a_readable_compile_error(tmp_path: Path) -> None:
    source = tmp_path / "nostep.zig"
    source.write_text(
        'const ws = @import("wasmshare");\n'
        "const T = struct {\n    pub fn create(ctx: *ws.Create) !T {\n        _ = ctx;\n        return .{};\n    }\n};\n"
        "comptime {\n    ws.exportController(T);\n}\n"
    )
    with pytest.raises(BuildError, match=r"exportController\(nostep\.T\): nostep\.T needs `pub fn create"):
        build_zig_guest(source, tmp_path / "nostep.wasm")


def test_a_missing_source_or_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="not found"):
        build_zig_guest(tmp_path / "nothere.zig", tmp_path / "x.wasm")
    with pytest.raises(ValueError, match="optimize"):
        build_zig_guest(ZIG / "allow_list.zig", tmp_path / "x.wasm", optimize="O3")  # type: ignore[arg-type]


@needs_zig
def test_wasmshare_build_builds_a_zig_guest(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from wasmshare.cli import app

    out = tmp_path / "allow_list.wasm"
    result = CliRunner().invoke(app, ["build", str(ZIG / "allow_list.zig"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == (ZIG / "allow_list.wasm").read_bytes()


def test_wasmshare_run_gives_the_zig_controller_the_c_twins_answer() -> None:
    pytest.importorskip("transformers", reason="generation needs transformers")
    import json

    from typer.testing import CliRunner

    from wasmshare.cli import app

    answers = []
    for module in (C_CONTROLLERS / "allow_list.wasm", ZIG / "allow_list.wasm"):
        args = ["run", "Say a word.", "--controller", str(module), "--arg", "ids:504,1543,2221,3000"]
        result = CliRunner().invoke(app, [*args, "--max-tokens", "6", "--json"])
        assert result.exit_code in (0, 2), result.output
        [record] = [json.loads(line) for line in result.stdout.splitlines()]
        answers.append((record["text"], record["tokens"]))
    assert answers[0] == answers[1] and answers[0][1] == 6
