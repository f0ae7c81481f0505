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


def test_check_reports_grammar_checks_refused_and_invalid_schemas(tmp_path: Path) -> None:
    pytest.importorskip("llguidance", reason="schema checks need llguidance")
    ok = tmp_path / "ok.json"
    ok.write_text('{"type": "object", "properties": {"a": {"type": "integer"}}}')
    checked = tmp_path / "one_of.json"
    checked.write_text(
        '{"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 2}], "not": {"const": "x"}}'
    )
    remote = tmp_path / "remote.json"
    remote.write_text('{"$ref": "https://example.com/remote.json"}')
    broken = tmp_path / "broken.json"
    broken.write_text("{nope")
    result = runner.invoke(app, ["check", str(ok), str(checked), str(remote), str(broken)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "grammar + checks:" in out and "refused: Resource" in out and "invalid:" in out
    assert "1 by the grammar, 1 with checks, 1 refused, 1 invalid" in out and "Traceback" not in out
    assert runner.invoke(app, ["check", str(ok), str(checked)]).exit_code == 0


def test_run_generates_a_schema_constrained_answer(tmp_path: Path) -> None:
    pytest.importorskip("transformers", reason="generation needs transformers")
    schema = tmp_path / "answer.json"
    schema.write_text(
        json.dumps(
            {
                "type": "object",
                "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 10}},
                "required": ["answer"],
                "additionalProperties": False,
            }
        )
    )
    result = runner.invoke(
        app,
        ["run", "What is 2+2? Reply in JSON.", "--json-schema", str(schema), "--max-tokens", "30", "--json"],
    )
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()  # one compact JSON object per answer, nothing else on stdout
    text = json.loads(line)["text"]
    assert 0 <= json.loads(text)["answer"] <= 10
    assert "bytes copied between host and guests: 0" in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "hi", "--json-schema", "/nonexistent.json"], "--json-schema: no file at /nonexistent.json"),
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


# -- a new user's first hour: output a program can parse, answers valid or flagged ---------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _needs_model() -> None:
    pytest.importorskip("transformers", reason="generation needs transformers")


def test_run_json_is_one_object_per_line_on_stdout_and_stats_on_stderr(tmp_path: Path) -> None:
    _needs_model()
    one = runner.invoke(app, ["run", "Pick a colour", "--choice", "red", "--choice", "green", "--json"])
    assert one.exit_code == 0, one.output
    [record] = [json.loads(line) for line in one.stdout.splitlines()]
    assert record["text"] in ("red", "green") and record["finish_reason"] == "stop" and record["complete"]
    assert "tok/s" in one.stderr and "tok/s" not in one.stdout
    batch = runner.invoke(
        app,
        [
            "run",
            "--batch",
            str(EXAMPLES / "prompts.jsonl"),
            "--json-schema",
            str(EXAMPLES / "answer.json"),
            "--json",
            "--max-tokens",
            "40",
        ],
    )
    assert batch.exit_code in (0, 2), batch.output
    records = [json.loads(line) for line in batch.stdout.splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert batch.stderr.count(" done (") == 4 and "done (4/4)" in batch.stderr  # progress, per answer
    assert all(r["complete"] == (r["finish_reason"] == "stop") for r in records)


def test_run_repairs_an_answer_the_grammar_alone_would_let_through(tmp_path: Path) -> None:
    """uniqueItems is not in llguidance's grammar: the check cuts the repeat the prompt asks for."""
    _needs_model()
    jsonschema = pytest.importorskip("jsonschema")
    tag = {"type": "string", "enum": ["red", "blue"]}
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": tag, "minItems": 2, "maxItems": 2, "uniqueItems": True}
        },
        "required": ["tags"],
        "additionalProperties": False,
    }
    path = tmp_path / "unique.json"
    path.write_text(json.dumps(schema))
    prompt = 'Reply with {"tags": ["red", "red"]} exactly.'
    result = runner.invoke(app, ["run", prompt, "--json-schema", str(path), "--json", "--max-tokens", "40"])
    assert result.exit_code == 0, result.output
    [record] = [json.loads(line) for line in result.stdout.splitlines()]
    jsonschema.validate(json.loads(record["text"]), schema)
    assert record["complete"] and record["enforced_by"] == "grammar + checks (uniqueItems)"
    assert record["backtracks"] >= 1, record  # the model did write the repeat first
    plural = "" if record["backtracks"] == 1 else "s"
    assert (
        f"enforced by grammar + checks (uniqueItems); {record['backtracks']} backtrack{plural}"
        in result.stderr
    )


def test_run_flags_a_constrained_answer_cut_by_max_tokens() -> None:
    _needs_model()
    cut = runner.invoke(
        app,
        [
            "run",
            "Write an invoice for 3 apples as JSON.",
            "--json-schema",
            str(EXAMPLES / "invoice.json"),
            "--max-tokens",
            "12",
            "--json",
        ],
    )
    assert cut.exit_code == 2, cut.output
    [record] = [json.loads(line) for line in cut.stdout.splitlines()]
    assert record["finish_reason"] == "length" and record["complete"] is False
    assert "warning: the constrained answer was cut at --max-tokens 12 before it was complete" in cut.stderr
    plain = runner.invoke(app, ["run", "Tell me a long story.", "--max-tokens", "3"])
    assert plain.exit_code == 0, plain.output
    assert "warning: the answer was cut at --max-tokens 3" in plain.stderr
    assert "3 tokens in" in plain.stderr


def test_run_defaults_to_compact_json_and_says_1_token() -> None:
    _needs_model()
    from wasmshare.cli.run import CONSTRAINED_MAX_TOKENS, PLAIN_MAX_TOKENS, RunOptions, build_requests

    [compact] = build_requests(RunOptions(prompt="x", json_schema=EXAMPLES / "person.json"))
    assert (
        '"whitespace_flexible":false' in compact.steer.source and compact.max_tokens == CONSTRAINED_MAX_TOKENS
    )
    [flexible] = build_requests(
        RunOptions(prompt="x", json_schema=EXAMPLES / "person.json", flexible_whitespace=True)
    )
    assert '"whitespace_flexible":true' in flexible.steer.source
    [plain] = build_requests(RunOptions(prompt="x"))
    assert plain.max_tokens == PLAIN_MAX_TOKENS
    result = runner.invoke(
        app, ["run", "Describe Paris as JSON", "--json-schema", str(EXAMPLES / "person.json")]
    )
    assert result.exit_code == 0, result.output
    answer = result.stdout.strip()
    assert "\n" not in answer and ": " not in answer and json.loads(answer)["city"]
    one = runner.invoke(app, ["run", "Pick a colour", "--choice", "red", "--choice", "green"])
    assert "1 token in" in one.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--regex", "(ab"], '--regex: invalid regex "(ab": unclosed group'),
        (["--json-schema", str(EXAMPLES / "arithmetic.lark")], "--json-schema: cannot read JSON schema"),
        (["--grammar", str(EXAMPLES / "person.json")], "--grammar:"),
        (["--flexible-whitespace"], "--flexible-whitespace applies to --json-schema only"),
    ],
)
def test_bad_steering_is_one_line_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], message: str
) -> None:
    from wasmshare.llm import models

    def no_model(*a: object, **k: object) -> None:
        raise AssertionError("the model must not load for a bad spec")

    monkeypatch.setattr(models, "load_model", no_model)
    unsupported = tmp_path / "remote.json"
    unsupported.write_text(json.dumps({"$ref": "https://example.com/remote.json"}))  # never fetched
    result = runner.invoke(app, ["run", "hi", *args])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "tok/s" not in result.output
    result = runner.invoke(app, ["run", "hi", "--json-schema", str(unsupported)])
    assert result.exit_code == 1 and "example.com/remote.json" in result.stderr


def test_check_takes_the_model_names_run_takes() -> None:
    _needs_model()
    named = runner.invoke(app, ["check", str(EXAMPLES / "invoice.json"), "--tokenizer", "smollm2-135m"])
    assert named.exit_code == 0, named.output
    default = runner.invoke(app, ["check", str(EXAMPLES / "person.json")])
    assert default.exit_code == 0 and "smollm2-135m" in default.stdout, default.output
    bad = runner.invoke(app, ["check", str(EXAMPLES / "person.json"), "--tokenizer", "no-such-model"])
    assert bad.exit_code == 1 and "--tokenizer:" in bad.stderr


def test_long_lines_are_not_wrapped_when_piped() -> None:
    from wasmshare.cli._output import console, errors

    assert console.soft_wrap and errors.soft_wrap


@pytest.mark.parametrize("command", ["run", "serve"])
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stall-policy", "never"], "--stall-policy must be 'wait' or 'sit_out', got 'never'"),
        (["--step-budget-ms", "-1"], "--step-budget-ms must be a finite number >= 0"),
        (["--step-budget-ms", "nan"], "--step-budget-ms must be a finite number >= 0"),
    ],
)
def test_bad_stall_flags_fail_in_one_line_before_anything_loads(
    command: str, flags: list[str], message: str
) -> None:
    args = [command, *(["Hello"] if command == "run" else []), *flags]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
