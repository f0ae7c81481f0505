"""bytes_copied: the batch's and the engine's figure is the sum of what the guests' counters record."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wasmshare.llm.batch import ControllerBatch
from wasmshare.llm.controller import Controller, ControllerInstance
from wasmshare.llm.tokens import TokenTable

CONTROLLERS = Path(__file__).resolve().parent.parent / "guests" / "controllers"
WORDS = [b" hello", b"good", b"<eos>"]

# Copy mode warns once that loans copy instead of mapping pages: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:wasmshare. zero-copy loans need Linux:RuntimeWarning")


@pytest.fixture(scope="module")
def table() -> Iterator[TokenTable]:
    tokens = [bytes([i]) for i in range(256)] + WORDS + [b"x%d" % i for i in range(200)]
    eos = 256 + WORDS.index(b"<eos>")
    with TokenTable.from_tokens(tokens, special=[eos], eos_token=eos, name="copied") as t:
        yield t


@pytest.fixture
def closed_guests(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``bytes_copied`` of every controller guest of this process, taken as it closes."""
    counters: list[int] = []
    close = ControllerInstance.close

    def counting_close(self: ControllerInstance) -> None:
        close(self)
        counters.append(self.guest.bytes_copied)

    monkeypatch.setattr(ControllerInstance, "close", counting_close)
    return counters


def _run(table: TokenTable, mode: str) -> tuple[int, int]:
    """A short batch (one sequence leaves mid-way); its figure while running and once closed."""
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:  # type: ignore[arg-type]
        left = batch.add(Controller(CONTROLLERS / "allow_list.wasm", struct.pack("<2I", 5, 6)), prompt=[1])
        stays = batch.add(Controller(CONTROLLERS / "boost_words.wasm", "good\t1"))
        batch.step()
        batch.step({left: [5], stays: [3]})
        batch.remove(left)  # an ended guest still counts
        batch.step({stays: [4]})
        running = batch.bytes_copied
    return running, batch.bytes_copied


def test_copy_mode_guests_make_the_batch_figure_their_sum(
    table: TokenTable, closed_guests: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WASMSHARE_FORCE_COPY", "1")  # loans copy in and out around each call
    running, total = _run(table, "threads")
    assert len(closed_guests) == 2
    assert 0 < running <= total == sum(closed_guests)
    assert _run(table, "workers") == (running, total)  # the workers report the same counters


def test_zero_copy_guests_copy_nothing(table: TokenTable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMSHARE_FORCE_COPY", "0")
    for mode in ("threads", "workers"):
        assert _run(table, mode) == (0, 0)


def test_the_engine_reports_the_guests_counters(
    closed_guests: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch: Any = pytest.importorskip("torch", reason="generation needs torch")
    pytest.importorskip("transformers", reason="generation needs transformers")
    from wasmshare.llm.engine import Engine, GenerationRequest
    from wasmshare.llm.models import ModelError, load_model

    torch.set_num_threads(2)
    try:
        loaded = load_model("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"embedded model not installed: {e}")
    steer = Controller(CONTROLLERS / "boost_words.wasm", "seven\t30")
    request = GenerationRequest("List numbers.", max_tokens=2, steer=steer)
    copied = {}
    for force_copy in ("1", "0"):
        monkeypatch.setenv("WASMSHARE_FORCE_COPY", force_copy)
        closed_guests.clear()
        with Engine(loaded, max_batch=1) as engine:
            (result,) = engine.generate([request])
            assert result.error is None, result.error
            copied[force_copy] = engine.stats.bytes_copied
        assert copied[force_copy] == sum(closed_guests)
    assert copied["1"] > 0 and copied["0"] == 0
