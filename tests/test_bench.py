"""The benchmarks run and write results in the project's format (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wasmshare.cli import app


@pytest.mark.parametrize("name", ["calls", "exchange", "controllers", "grammars", "generate", "serve"])
def test_benchmark_writes_rows_in_the_result_format(name: str, tmp_path: Path) -> None:
    if name == "generate" and importlib.util.find_spec("xgrammar") is None:
        pytest.skip(
            "the generate benchmark compares with xgrammar's LogitsProcessor (pip install --no-deps xgrammar)"
        )
    result = CliRunner().invoke(app, ["bench", name, "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["machine"]["cores"] >= 1 and "wasmtime" in data["machine"]
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert {"case", "ours_us", "baseline", "baseline_us", "ratio"} <= row.keys()
        assert row["ours_us"] > 0 and row["baseline_us"] > 0
        assert row["ratio"] == pytest.approx(row["baseline_us"] / row["ours_us"], rel=1e-2)
    assert all("met" in t for t in data["targets"])
    if name == "exchange":
        assert all(r["bytes_copied_per_step_ours"] == 0 for r in data["rows"])
    if name == "serve":  # behaviour, not timing: valid answers, hostile requests fail alone, server up
        assert all(t["met"] for t in data["targets"] if not t.get("timing")), data["targets"]
