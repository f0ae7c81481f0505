"""The wasmshare command: user mistakes end in one clear line and a non-zero exit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wasmshare.cli import app

GUESTS = Path(__file__).resolve().parent.parent / "guests"
runner = CliRunner()


def test_demo_runs_end_to_end() -> None:
    result = runner.invoke(app, ["demo"])
    assert result.exit_code == 0, result.output
    assert "all checks passed" in result.output
    assert "✗" not in result.output


def test_inspect_shows_exports_and_abi() -> None:
    result = runner.invoke(app, ["inspect", str(GUESTS / "borrow_sum.wasm")])
    assert result.exit_code == 0, result.output
    assert "func (i32) -> f32" in result.output and "wasmshare ABI: 1" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/nonexistent.wasm"], "no module at /nonexistent.wasm"),
        (["bench", "nonsense"], "unknown benchmark 'nonsense'"),
        (["build", "/nonexistent.c", "-o", "/tmp/x.wasm"], "guest source file not found"),
        (["build", "x.c", "-o", "y.wasm", "-O", "turbo"], "--optimize must be fast, small or debug"),
    ],
)
def test_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_build_reports_compiler_errors(tmp_path: Path) -> None:
    pytest.importorskip("ziglang", reason="the Zig toolchain (wasmshare[sdk]) is not installed")
    bad = tmp_path / "bad.c"
    bad.write_text("int f( {\n")
    result = runner.invoke(app, ["build", str(bad), "-o", str(tmp_path / "bad.wasm")])
    assert result.exit_code == 1 and "expected" in result.output and "Traceback" not in result.output
    good = tmp_path / "good.c"
    good.write_text('#include "wasmshare.h"\nWS_EXPORT("twice") int32_t twice(int32_t x) { return 2 * x; }\n')
    result = runner.invoke(app, ["build", str(good), "-o", str(tmp_path / "good.wasm")])
    assert result.exit_code == 0, result.output
    from wasmshare import Guest

    assert Guest(tmp_path / "good.wasm").call("twice", 21) == 42


def test_info_reports_zero_copy_on_linux() -> None:
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0
    assert "wasmtime" in result.output and "50.0.1" in result.output


def test_check_reports_supported_unsupported_and_invalid_schemas(tmp_path: Path) -> None:
    pytest.importorskip("llguidance", reason="schema checks need llguidance")
    ok = tmp_path / "ok.json"
    ok.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    unsupported = tmp_path / "one_of.json"
    unsupported.write_text('{"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}]}')
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    result = runner.invoke(app, ["check", str(ok), str(unsupported), str(broken)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "supported" in out and "unsupported: oneOf" in out and "invalid:" in out
    assert "1 supported, 1 unsupported, 1 invalid" in out and "Traceback" not in out
    assert runner.invoke(app, ["check", str(ok)]).exit_code == 0


def test_run_generates_a_schema_constrained_answer(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="generation needs transformers")
    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps({
        "type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 10}},
        "required": ["answer"], "additionalProperties": False,
    }))
    result = runner.invoke(app, ["run", "What is 2+2? Reply in JSON.", "--json-schema", str(schema),
                                 "--max-tokens", "30", "--json"])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.strip().startswith('"text"'))
    text = json.loads("{" + line.strip().rstrip(",") + "}")["text"]
    assert 0 <= json.loads(text)["answer"] <= 10
    assert "bytes copied between host and guests: 0" in " ".join(result.output.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "hi", "--json-schema", "/nonexistent.json"], "no JSON schema file at /nonexistent.json"),
        (["run", "hi", "--model", "no-such-model"], "no-such-model"),
        (["run", "hi", "--controller", "/nonexistent.wasm"], "no controller module at"),
        (["run", "hi", "--regex", "a", "--choice", "b"], "choose at most one of"),
        (["run", "--max-tokens", "5"], "give a PROMPT or --batch"),
        (["run", "hi", "--max-tokens", "0"], "--max-tokens must be positive"),
        (["run", "hi", "--device", "tpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["run", "hi", "--device", "cuda:64"], "cuda:64' was asked for"),
    ],
)
def test_run_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_run_reports_a_bad_wasm_controller(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="generation needs transformers")
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\0asm\x01\0\0\0garbage")
    result = runner.invoke(app, ["run", "hi", "--controller", str(bad), "--max-tokens", "3"])
    assert result.exit_code == 1 and "invalid wasm module" in " ".join(result.output.split())
    assert "Traceback" not in result.output
