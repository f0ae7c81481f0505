"""Rust guests (sdk/rust): the same outputs as their C twins, in both batch modes and through
``wasmshare run``; a panicking or out-of-bounds Rust guest fails alone; the prebuilt modules are
up to date."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from wasmshare.abi.rust import build_rust_guest, find_rustc
from wasmshare.errors import BuildError
from wasmshare.llm.batch import Action, ControllerBatch, Output, SequenceFailed
from wasmshare.llm.controller import Controller
from wasmshare.llm.tokens import TokenTable

ROOT = Path(__file__).resolve().parent.parent
C_CONTROLLERS = ROOT / "guests" / "controllers"
RUST = ROOT / "sdk" / "rust" / "examples"
SOURCES = sorted(RUST.glob("*.rs"))
WORDS = [b" hello", b"world", b" world", b" bad", b"badge", b"good", b"<eos>", b" secret", b"sec", b"ret"]


def _rustc_or_skip() -> None:
    """Skip without the toolchain, except in CI, which installs it (WASMSHARE_REQUIRE_RUST=1)."""
    if find_rustc() is None:
        if os.environ.get("WASMSHARE_REQUIRE_RUST") == "1":
            pytest.fail("WASMSHARE_REQUIRE_RUST=1 but no rustc with the wasm32-unknown-unknown target")
        pytest.skip(
            "no rustc with the wasm32-unknown-unknown target (apt-get install rustc libstd-rust-dev-wasm32)"
        )


@pytest.fixture(scope="module")
def table() -> Iterator[TokenTable]:
    tokens = [bytes([i]) for i in range(256)] + WORDS + [b"x%d" % i for i in range(700)]
    eos = 256 + WORDS.index(b"<eos>")
    with TokenTable.from_tokens(tokens, special=[eos], eos_token=eos, name="test") as t:
        yield t


@pytest.fixture(params=["threads", "workers"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def twins(name: str, arg: bytes) -> tuple[Controller, Controller]:
    return Controller(C_CONTROLLERS / f"{name}.wasm", arg), Controller(RUST / f"{name}.wasm", arg)


def test_every_source_has_a_prebuilt_module() -> None:
    assert {p.stem for p in SOURCES} >= {
        "allow_list",
        "ban_strings",
        "boost_words_sparse",
        "typecheck",
        "hostile",
    }
    assert [p.stem for p in SOURCES] == [p.stem for p in sorted(RUST.glob("*.wasm"))]


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_prebuilt_is_up_to_date(source: Path, tmp_path: Path) -> None:
    _rustc_or_skip()
    copy = tmp_path / "elsewhere" / source.name  # built from another folder: paths do not leak in
    copy.parent.mkdir()
    shutil.copy(source, copy)
    fresh = build_rust_guest(copy, tmp_path / f"{source.stem}.wasm")
    assert fresh.read_bytes() == source.with_suffix(".wasm").read_bytes(), (
        f"{source.name} changed: rebuild with guests/build.sh"
    )


def test_a_compile_error_is_a_build_error_with_rustc_words(tmp_path: Path) -> None:
    _rustc_or_skip()
    bad = tmp_path / "bad.rs"
    bad.write_text("#![no_std]\nfn oops( {}\n")
    with pytest.raises(BuildError, match=r"rustc failed on .*bad\.rs"):
        build_rust_guest(bad, tmp_path / "bad.wasm")


def _rows(batch: ControllerBatch, seq: int) -> tuple[bytes, bytes]:
    slot = batch.slot(seq)
    return np.asarray(batch.mask[slot]).tobytes(), np.asarray(batch.bias[slot]).tobytes()


def test_allow_list_matches_c(table: TokenTable, mode: str) -> None:
    c, rust = twins("allow_list", struct.pack("<4I", 5, 300, 700, 961))
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c, prompt=[1, 2]), batch.add(rust, prompt=[1, 2])
        for i in range(4):
            step = batch.step({a: [i + 3], b: [i + 3]} if i else None)
            assert step.results[a] == step.results[b] or _same(step.results[a], step.results[b])
            assert _rows(batch, a)[0] == _rows(batch, b)[0]


def _same(x: object, y: object) -> bool:
    """Results equal but for the sequence they belong to."""
    fields = ("action", "output", "backtrack", "fast_forward")
    return all(getattr(x, f) == getattr(y, f) for f in fields)


def test_boost_words_sparse_matches_c(table: TokenTable, mode: str) -> None:
    arg = b"world\t2.5\nbad\t-1\ngood\t0.5\ngood\t4\nsecret\t1e-2\n"
    c, rust = twins("boost_words_sparse", arg)
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c), batch.add(rust)
        for i in range(3):
            step = batch.step({a: [7], b: [7]} if i else None)
            assert _same(step.results[a], step.results[b])
            pairs = batch.row_outputs(step)
            ids_a, values_a = pairs[a].sparse_bias  # type: ignore[misc]
            ids_b, values_b = pairs[b].sparse_bias  # type: ignore[misc]
            assert ids_a.tolist() == ids_b.tolist() and values_a.tolist() == values_b.tolist()
            expected = [b"world", b" world", b" bad", b"good", b" secret"]
            assert ids_a.tolist() == [256 + WORDS.index(w) for w in expected]
            assert values_a.tolist() == pytest.approx([2.5, 2.5, -1.0, 4.0, 0.01])  # the last "good" wins


def test_ban_strings_matches_c_over_a_random_generation(table: TokenTable, mode: str) -> None:
    c, rust = twins("ban_strings", b"secret\nbad\r\nworld")
    rng = random.Random(7)
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        a, b = batch.add(c), batch.add(rust)
        sampled: list[int] = []
        for _ in range(40):
            step = batch.step({a: sampled, b: sampled} if sampled else None)
            assert _same(step.results[a], step.results[b])
            mask_a, mask_b = _rows(batch, a)[0], _rows(batch, b)[0]
            assert mask_a == mask_b
            bits = np.unpackbits(np.frombuffer(mask_a, np.uint8), bitorder="little")[: table.vocab_size]
            pool = [256 + WORDS.index(w) for w in (b"sec", b"ret", b" secret", b"world", b"good")]
            pool += [ord(ch) for ch in "secrtbadwol "]
            allowed = [t for t in pool if bits[t]]
            sampled = [rng.choice(allowed)]


@pytest.mark.parametrize(
    ("name", "arg"),
    [
        ("allow_list", b""),
        ("allow_list", b"\x01\x00\x00"),
        ("allow_list", struct.pack("<I", 10**6)),
        ("ban_strings", b"\n\n"),
        ("ban_strings", b"a" * 65),
        ("boost_words_sparse", b"word"),
        ("boost_words_sparse", b"word\t1e99"),
        ("boost_words_sparse", b"word\t1.5x"),
    ],
)
def test_bad_arguments_fail_create_like_c(table: TokenTable, name: str, arg: bytes) -> None:
    c, rust = twins(name, arg)
    with ControllerBatch(table, capacity=2) as batch:
        causes = []
        for controller in (c, rust):
            with pytest.raises(SequenceFailed) as info:
                batch.add(controller)
            causes.append(info.value.cause)
        assert causes == ["error code", "error code"]


@pytest.mark.parametrize(
    ("hostile", "cause"), [("panic", "trap"), ("out_of_bounds", "trap"), ("write_token_table", "trap")]
)
def test_a_misbehaving_rust_guest_fails_alone(table: TokenTable, mode: str, hostile: str, cause: str) -> None:
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        bad = batch.add(Controller(RUST / "hostile.wasm", hostile.encode()), sequence_id=66)
        ok = batch.add(Controller(RUST / "allow_list.wasm", struct.pack("<2I", 5, 9)))
        errors = []
        for i in range(3):
            step = batch.step({s: [5] for s in batch.sequences} if i else None)
            assert step.results[ok].action is Action.CONTINUE and step.results[ok].output is Output.BITMASK
            if bad in step.results and step.results[bad].action is Action.ERROR:
                errors.append(step.results[bad].error)
        assert len(errors) == 1 and bad not in batch.sequences and ok in batch.sequences
        [error] = errors
        assert isinstance(error, SequenceFailed) and error.cause == cause and error.sequence == 66
        assert "hostile" in str(error)


def test_a_panic_logs_where_it_happened(table: TokenTable, caplog: pytest.LogCaptureFixture) -> None:
    """The SDK's panic handler logs the panic's source location through ws_log before trapping."""
    with caplog.at_level("INFO", logger="wasmshare.guest"), ControllerBatch(table, capacity=1) as batch:
        bad = batch.add(Controller(RUST / "hostile.wasm", b"panic"))
        batch.step()
        assert batch.step({bad: [5]}).results[bad].action is Action.ERROR
    [line] = [r.getMessage() for r in caplog.records if "panicked" in r.getMessage()]
    assert "panicked at ./hostile.rs:" in line, line


def test_a_panic_at_create_fails_that_sequence_only(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=1) as batch:
        with pytest.raises(SequenceFailed) as info:
            batch.add(Controller(RUST / "hostile.wasm", b"panic_at_create"))
        assert info.value.cause == "trap"
        ok = batch.add(Controller(RUST / "hostile.wasm", b"ok"))
        assert ok in batch.step().results


def test_wasmshare_run_gives_the_rust_controller_the_c_twins_answer() -> None:
    pytest.importorskip("transformers", reason="generation needs transformers")
    from typer.testing import CliRunner

    from wasmshare.cli import app

    runner = CliRunner()
    answers = []
    for module in (C_CONTROLLERS / "ban_strings.wasm", RUST / "ban_strings.wasm"):
        args = ["run", "Name three colours.", "--controller", str(module), "--arg", "Red", "--arg", "red"]
        result = runner.invoke(app, [*args, "--max-tokens", "16", "--json"])
        assert result.exit_code in (0, 2), result.output  # 2: cut at --max-tokens, as asked
        [record] = [json.loads(line) for line in result.stdout.splitlines()]
        answers.append(record["text"])
    assert answers[0] == answers[1] and "red" not in answers[0].lower(), answers
