"""Reading a Hugging Face tokenizer JSON: the exact bytes of every token, and its EOS and BOS.

Backs :class:`~wasmshare.llm.tokens.TokenTable` (whose module docstring says how each
tokenizer family maps to bytes). Everything here is pure: it reads the parsed JSON and
returns numpy arrays, and raises :class:`TokenizerError` for a tokenizer whose tokens have
no fixed bytes or for malformed JSON.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ..errors import TokenizerError

__all__ = [
    "Family",
    "I64Array",
    "MAX_VOCAB",
    "TokenizerError",
    "U8Array",
    "Vocab",
    "byte_level_bytes",
    "check_options",
    "guess_ids",
    "pack",
    "piece_bytes",
    "read_config_hints",
    "read_family",
    "resolve_token",
]

# Token ids are uint32 and UINT32_MAX means "none".
MAX_VOCAB: Final = 0xFFFFFFFF - 1

_BYTE_FALLBACK_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Added tokens that are, by convention, the end / beginning of a sequence; first match wins.
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")

_PIECE_DECODERS = frozenset({"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"})

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]


def _gpt2_byte_lut() -> npt.NDArray[np.int16]:
    """Code point -> byte for GPT-2's ``bytes_to_unicode`` table; -1 for code points outside it.

    The table maps printable Latin-1 bytes to themselves and the 68 others to U+0100..U+0143;
    index 324 is a sentinel (-1) for every larger code point.
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    lut = np.full(0x145, -1, dtype=np.int16)
    for b in printable:
        lut[b] = b
    extra = 0
    for b in range(256):
        if b not in printable:
            lut[0x100 + extra] = b
            extra += 1
    return lut


_BYTE_LUT: Final = _gpt2_byte_lut()
_LUT_SENTINEL = len(_BYTE_LUT) - 1


def _chain(node: object, list_key: str) -> list[dict[str, Any]]:
    """The components of a decoder / pre-tokenizer / normalizer / processor, ``Sequence``s flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        out: list[dict[str, Any]] = []
        for child in node.get(list_key) or ():
            out.extend(_chain(child, list_key))
        return out
    return [node]


class Family:
    """How a tokenizer's vocabulary strings become bytes."""

    def __init__(self, *, byte_level: bool, byte_fallback: bool, replacements: list[tuple[str, str]]) -> None:
        self.byte_level = byte_level
        self.byte_fallback = byte_fallback
        self.replacements = replacements


def read_family(spec: dict[str, Any]) -> Family:
    model = spec.get("model")
    if not isinstance(model, dict):
        raise TokenizerError("tokenizer JSON has no 'model' object")
    mtype = model.get("type")
    if mtype == "WordPiece":
        raise TokenizerError(
            "WordPiece tokenizers are not supported: their decoding inserts or drops spaces "
            "depending on the neighbouring tokens, so a token has no exact byte sequence"
        )
    if mtype not in ("BPE", "Unigram", "WordLevel"):
        raise TokenizerError(
            f"unsupported tokenizer model type {mtype!r} (expected BPE, Unigram or WordLevel)"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(
            "BPE with a continuing_subword_prefix or end_of_word_suffix is not supported: "
            "its decoding depends on the neighbouring tokens"
        )
    decoders = _chain(spec.get("decoder"), "decoders")
    byte_level = any(d.get("type") == "ByteLevel" for d in decoders) or any(
        p.get("type") == "ByteLevel"
        for key, list_key in (("pre_tokenizer", "pretokenizers"), ("normalizer", "normalizers"))
        for p in _chain(spec.get(key), list_key)
    )
    if byte_level:
        return Family(byte_level=True, byte_fallback=False, replacements=[])
    if not decoders:
        raise TokenizerError(
            f"{mtype} tokenizer without a byte-level or SentencePiece-style decoder is not supported: "
            "without a decoder, tokens are joined with spaces, so a token has no exact byte sequence"
        )
    replacements: list[tuple[str, str]] = []
    fused = False
    byte_fallback = bool(model.get("byte_fallback"))
    for d in decoders:
        dtype = d.get("type")
        if dtype not in _PIECE_DECODERS:
            raise TokenizerError(
                f"unsupported decoder {dtype!r}: only ByteLevel, or SentencePiece-style decoders "
                f"({', '.join(sorted(_PIECE_DECODERS))}) give every token an exact byte sequence"
            )
        if dtype == "Replace":
            pattern = d.get("pattern")
            content = d.get("content")
            if not (
                isinstance(pattern, dict)
                and isinstance(pattern.get("String"), str)
                and isinstance(content, str)
            ):
                raise TokenizerError(
                    f"unsupported Replace decoder {d!r}: only plain-string patterns are supported"
                )
            if pattern["String"]:
                replacements.append((pattern["String"], content))
        elif dtype == "Metaspace":
            replacement = d.get("replacement", "▁")
            if isinstance(replacement, str) and replacement:
                replacements.append((replacement, " "))
        elif dtype == "ByteFallback":
            byte_fallback = True
        elif dtype == "Fuse":
            fused = True
        elif dtype == "Strip" and not fused:
            raise TokenizerError(
                "a Strip decoder before Fuse trims every token, so tokens have no exact byte sequence"
            )
    return Family(byte_level=False, byte_fallback=byte_fallback, replacements=replacements)


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_VOCAB:
        raise TokenizerError(f"{what}: token id must be an int in 0..{MAX_VOCAB}, got {value!r}")
    return value


class Vocab:
    """A tokenizer's tokens by id, before conversion to bytes."""

    def __init__(self, spec: dict[str, Any], vocab_size: int | None) -> None:
        model = spec["model"]
        raw = model.get("vocab")
        strings: list[str]
        ids: list[int]
        if model.get("type") == "Unigram":
            if not isinstance(raw, list):
                raise TokenizerError("Unigram model 'vocab' must be a list of [piece, score]")
            try:
                strings = [entry[0] for entry in raw]
            except (TypeError, IndexError, KeyError):
                strings = []
            if len(strings) != len(raw) or not all(type(x) is str for x in strings):
                raise TokenizerError("Unigram model 'vocab' must be a list of [piece, score]")
            ids = list(range(len(strings)))
            self._model_ids: dict[str, int] | None = None
        else:
            if not isinstance(raw, dict):
                raise TokenizerError(f"{model.get('type')} model 'vocab' must be an object of token -> id")
            strings = list(raw)
            ids = list(raw.values())
            if not set(map(type, ids)) <= {int} or (ids and not 0 <= min(ids) <= max(ids) <= MAX_VOCAB):
                bad = next(i for i in ids if not (type(i) is int and 0 <= i <= MAX_VOCAB))
                raise TokenizerError(f"vocab token id must be an int in 0..{MAX_VOCAB}, got {bad!r}")
            self._model_ids = raw
        added = spec.get("added_tokens") or []
        if not isinstance(added, list):
            raise TokenizerError("tokenizer JSON 'added_tokens' must be a list")
        added_pairs: list[tuple[str, int, bool]] = []
        for a in added:
            if not (isinstance(a, dict) and isinstance(a.get("content"), str)):
                raise TokenizerError(f"malformed added token {a!r}")
            tid = _check_id(a.get("id"), f"added token {a['content']!r}")
            added_pairs.append((a["content"], tid, bool(a.get("special"))))
        id_array = np.array(ids, dtype=np.int64)
        need = int(id_array.max()) + 1 if len(id_array) else 0
        need = max(need, max((i for _, i, _ in added_pairs), default=-1) + 1)
        if vocab_size is not None:
            if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
                raise TokenizerError(f"vocab_size must be a positive int, got {vocab_size!r}")
            if vocab_size < need:
                raise TokenizerError(
                    f"vocab_size {vocab_size} is smaller than the tokenizer's {need} token ids"
                )
            if vocab_size > MAX_VOCAB:
                raise TokenizerError(f"vocab_size {vocab_size} does not fit a uint32 token id")
            need = vocab_size
        if need == 0:
            raise TokenizerError("the tokenizer has no tokens")
        self.size = need
        if len(id_array) == need and np.array_equal(id_array, np.arange(need)):
            self.strings = strings  # the usual case: ids 0..V-1 in order
        else:
            self.strings = [""] * need
            for s, i in zip(strings, ids):
                self.strings[i] = s
        self.present = np.zeros(need, dtype=bool)
        self.present[id_array] = True
        self.special = np.zeros(need, dtype=bool)
        self.explicit: dict[int, bytes] = {}
        unk: object = None
        if model.get("type") == "Unigram":
            unk = model.get("unk_id")
        elif isinstance(model.get("unk_token"), str) and isinstance(raw, dict):
            unk = raw.get(model["unk_token"])
        if type(unk) is int and 0 <= unk < need:
            self.special[unk] = True
        self.added: dict[str, int] = {}
        for content, i, special in added_pairs:
            # An added token overrides a model token with the same id (as in `tokenizers`).
            if self.strings is strings:
                self.strings = list(strings)
            self.strings[i] = ""
            self.explicit[i] = content.encode("utf-8")
            self.present[i] = True
            self.special[i] = special
            self.added.setdefault(content, i)
        self.special |= ~self.present
        self._model_strings = strings

    def lookup(self, name: str) -> int | None:
        """The id of a token string: an added token first, then the model's vocabulary."""
        i = self.added.get(name)
        if i is not None:
            return i
        if self._model_ids is None:
            self._model_ids = {}
            for j, s in enumerate(self._model_strings):
                self._model_ids.setdefault(s, j)
        return self._model_ids.get(name)


def pack(pieces: Sequence[bytes]) -> tuple[U8Array, I64Array]:
    lens = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return np.frombuffer(b"".join(pieces), dtype=np.uint8), offsets


def byte_level_bytes(vocab: Vocab) -> tuple[U8Array, I64Array]:
    """Map every character through GPT-2's byte table, vectorized over the whole vocabulary."""
    strings = vocab.strings
    explicit = dict(vocab.explicit)
    n = vocab.size
    char_lens = np.fromiter(map(len, strings), dtype=np.int64, count=n)
    char_starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(char_lens, out=char_starts[1:])
    cps = np.frombuffer("".join(strings).encode("utf-32-le"), dtype="<u4")
    mapped = _BYTE_LUT[np.minimum(cps, _LUT_SENTINEL)]
    bad_chars = np.zeros(len(cps) + 1, dtype=np.int64)
    np.cumsum(mapped < 0, out=bad_chars[1:])
    bad_tokens = np.flatnonzero(bad_chars[char_starts[1:]] > bad_chars[char_starts[:-1]])
    for t in bad_tokens.tolist():  # as the ByteLevel decoder: the token's UTF-8
        explicit[t] = strings[t].encode("utf-8")
    lens = char_lens.copy()
    is_explicit = np.zeros(n, dtype=bool)
    for t, b in explicit.items():
        lens[t] = len(b)
        is_explicit[t] = True
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    blob = np.zeros(int(offsets[-1]), dtype=np.uint8)
    token_of_char = np.repeat(np.arange(n, dtype=np.int64), char_lens)
    keep = ~is_explicit[token_of_char]
    dest = offsets[:-1][token_of_char] + (
        np.arange(len(cps), dtype=np.int64) - char_starts[:-1][token_of_char]
    )
    blob[dest[keep]] = mapped[keep].astype(np.uint8)
    for t, b in explicit.items():
        blob[offsets[t] : offsets[t] + len(b)] = np.frombuffer(b, dtype=np.uint8)
    return blob, offsets


def piece_bytes(vocab: Vocab, family: Family) -> tuple[U8Array, I64Array, npt.NDArray[np.bool_]]:
    """SentencePiece-style tokens: ``<0xNN>`` byte fallback, ``▁`` replacements, else UTF-8."""
    fallback = np.zeros(vocab.size, dtype=bool)
    pieces: list[bytes] = []
    explicit = vocab.explicit
    match = _BYTE_FALLBACK_RE.fullmatch
    for t, s in enumerate(vocab.strings):
        b = explicit.get(t)
        if b is None:
            m = match(s) if family.byte_fallback and len(s) == 6 else None
            if m is not None:
                b = bytes((int(m.group(1), 16),))
                fallback[t] = True
            else:
                for old, new in family.replacements:
                    s = s.replace(old, new)
                b = s.encode("utf-8")
        pieces.append(b)
    blob, offsets = pack(pieces)
    return blob, offsets, fallback


def guess_ids(spec: dict[str, Any], vocab: Vocab) -> tuple[int | None, int | None]:
    """EOS and BOS from well-known special-token names, then the post-processor's template."""
    special_added = {c: i for c, i in vocab.added.items() if vocab.special[i]}
    eos = next((special_added[n] for n in _EOS_NAMES if n in special_added), None)
    bos: int | None = None
    for proc in _chain(spec.get("post_processor"), "processors"):
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        ids: dict[str, Any] = proc.get("special_tokens") or {}
        seen_sequence = False
        for piece in single:
            if not isinstance(piece, dict):
                continue
            if "Sequence" in piece:
                seen_sequence = True
                continue
            name = (piece.get("SpecialToken") or {}).get("id")
            entry = ids.get(name) if isinstance(name, str) else None
            tids = entry.get("ids") if isinstance(entry, dict) else None
            if not (isinstance(tids, list) and len(tids) == 1 and isinstance(tids[0], int)):
                continue
            tid = tids[0]
            if not 0 <= tid < vocab.size:
                continue
            if not seen_sequence and bos is None:
                bos = tid
            elif seen_sequence and eos is None:
                eos = tid
    if bos is None:
        bos = next((special_added[n] for n in _BOS_NAMES if n in special_added), None)
    return eos, bos


def resolve_token(hint: int | str | None, vocab: Vocab, what: str, *, strict: bool) -> int | None:
    if hint is None:
        return None
    if isinstance(hint, str):
        tid = vocab.lookup(hint)
        if tid is None and strict:
            raise TokenizerError(f"{what} {hint!r} is not a token of this tokenizer")
        return tid
    if isinstance(hint, bool) or not isinstance(hint, int) or not 0 <= hint < vocab.size:
        if strict:
            raise TokenizerError(
                f"{what} must be a token id in 0..{vocab.size - 1} or a token string, got {hint!r}"
            )
        return None
    return hint


def check_options(eos: object, bos: object, vocab_size: object) -> None:
    """Reject option types early: they are part of cache keys, so they must be hashable."""
    for what, hint in (("eos_token", eos), ("bos_token", bos)):
        if hint is not None and (isinstance(hint, bool) or not isinstance(hint, (int, str))):
            raise TokenizerError(f"{what} must be a token id, a token string or None, got {hint!r}")
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
        raise TokenizerError(f"vocab_size must be an int or None, got {vocab_size!r}")


def read_config_hints(path: str) -> tuple[object, str | None, str | None]:
    """EOS / BOS token strings from a ``tokenizer_config.json`` beside the tokenizer, if any.

    Returns (a cache key part for the config file, eos, bos). An unreadable or malformed
    config is ignored: it only refines a guess.
    """
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    try:
        st = os.stat(cfg)
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None, None, None

    def content(v: object) -> str | None:
        if isinstance(v, dict):
            v = v.get("content")
        return v if isinstance(v, str) else None

    if not isinstance(data, dict):
        return None, None, None
    return (st.st_mtime_ns, st.st_size), content(data.get("eos_token")), content(data.get("bos_token"))
