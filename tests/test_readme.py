"""Every Python snippet of the README (and of docs/engine.md) runs as written (from the repository root)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
DOC_SNIPPETS = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "engine.md").read_text(), re.S | re.M)


def test_the_readme_has_snippets_and_stays_short_enough_to_read() -> None:
    assert len(SNIPPETS) >= 6 and DOC_SNIPPETS
    assert len(README.encode()) < 20_000


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("fastapi", reason="the server snippet needs FastAPI")
    from test_server import LiveServer

    server = LiveServer(tmp_path_factory.mktemp("readme"))
    yield server
    server.close()


@pytest.mark.parametrize("index", range(len(SNIPPETS) + len(DOC_SNIPPETS)))
def test_readme_snippet_runs(
    index: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
) -> None:
    code = [*SNIPPETS, *DOC_SNIPPETS][index]
    if "torch" in code or "wasmshare.llm" in code:
        pytest.importorskip("torch", reason="the LLM snippets need torch")
    if "from openai import OpenAI" in code:
        from test_server import KEY

        live = request.getfixturevalue("live")
        monkeypatch.setenv("WASMSHARE_API_KEY", KEY)
        code = code.replace("http://127.0.0.1:8000", live.base)
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"README.md snippet {index + 1}", "exec"), {"__name__": "__readme__"})  # noqa: S102
    assert capsys.readouterr().out.strip(), "every snippet prints what it shows"
