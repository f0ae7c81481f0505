"""Tests of the example LLM controllers in guests/controllers/ (controller ABI v1).

These run each controller with plain wasmtime, not the wasmshare runtime: a small
harness (:class:`Controller`) lays out, inside the guest's own linear memory, a
token table for a tiny vocabulary, a ``ws_step_input``, a ``ws_step_result``, the
tokens and argument bytes, and the mask and bias rows, exactly as the host's loans
would, then calls ``ws_ctrl_create`` and ``ws_ctrl_step`` the way the host does
(resetting the result before every call, keeping the output slots between steps).
The struct layouts below are checked against ``wasmshare_controller.h`` by
compiling ``offsetof`` assertions.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import pathlib
import random
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import wasmtime

from wasmshare.abi import build_guest
from wasmshare.llm._layout import STEP_INPUT, STEP_RESULT
from wasmshare.llm.tokens import TOKEN_TABLE_HEADER

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONTROLLERS = ROOT / "guests" / "controllers"
SOURCES = sorted(CONTROLLERS.glob("*.c"))
PREBUILT = sorted(CONTROLLERS.glob("*.wasm"))
# Controllers that import the host's grammar engine (ws_constraint_*): no plain-wasmtime harness.
HOST_ENGINE_USERS = {"tool_call", "hostile_host_calls"}
# guests/build.sh builds with these flags (warnings do not change the code).
BUILD_FLAGS = ["-Wall", "-Wextra", "-Werror"]
# The checked-in modules were built with this ziglang; with another version only the
# exports and imports are compared, not the bytes.
PINNED_ZIGLANG = "0.17.1"
PAGE = 65536

HAVE_ZIG = importlib.util.find_spec("ziglang") is not None
needs_zig = pytest.mark.skipif(not HAVE_ZIG, reason="ziglang not installed (pip install 'wasmshare[sdk]')")

# --------------------------------------------------------------------------- ABI constants and layouts

CONTROLLER_ABI_VERSION = 1
WS_OK = 0
WS_ERR_FAILED = -4
WS_CONTINUE, WS_STOP = 0, 1
WS_OUTPUT_NONE, WS_OUTPUT_BITMASK, WS_OUTPUT_BIAS, WS_OUTPUT_SPARSE_BIAS = 0, 1, 2, 3
WS_MAX_FF_TOKENS = 1024
WS_TOKEN_SPECIAL = 1
WS_TOKEN_TABLE_MAGIC = 0x54545357
NO_TOKEN = 0xFFFFFFFF

# The host's own layouts (pointers are wasm32 guest addresses: little-endian u32); the
# offset test below checks them against wasmshare_controller.h compiled by clang.
TOKEN_TABLE = TOKEN_TABLE_HEADER
LAYOUTS = {"ws_token_table": TOKEN_TABLE, "ws_step_input": STEP_INPUT, "ws_step_result": STEP_RESULT}


def field_offsets(dtype: np.dtype[Any]) -> dict[str, int]:
    """Byte offset of each field of a structured dtype."""
    assert dtype.names is not None and dtype.fields is not None
    return {name: int(dtype.fields[name][1]) for name in dtype.names}


def test_layout_sizes() -> None:
    assert TOKEN_TABLE.itemsize == 64
    assert STEP_INPUT.itemsize == 68
    assert STEP_RESULT.itemsize == 32 + 4 * WS_MAX_FF_TOKENS


@needs_zig
def test_layouts_match_header(tmp_path: pathlib.Path) -> None:
    """The dtypes above (and docs/controller-abi.md) agree with the header's structs."""
    lines = ['#include "wasmshare_controller.h"', "#include <stddef.h>"]
    for struct_name, dtype in LAYOUTS.items():
        lines.append(f'_Static_assert(sizeof({struct_name}) == {dtype.itemsize}, "sizeof {struct_name}");')
        for field, offset in field_offsets(dtype).items():
            lines.append(
                f'_Static_assert(offsetof({struct_name}, {field}) == {offset}, "{struct_name}.{field}");'
            )
    # old_abi.c declares the structs itself: check them too, through the same names.
    lines += [
        'WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out)'
        " { (void)in; (void)out; return 0; }",
        'WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out)'
        " { (void)in; (void)out; return 0; }",
    ]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    build_guest([src], tmp_path / "layout.wasm")

    old = (CONTROLLERS / "old_abi.c").read_text()
    head = old[: old.index("WS_EXPORT(")]  # its includes and struct declarations
    checks = [head]
    for struct_name in ("ws_step_input", "ws_step_result"):
        dtype = LAYOUTS[struct_name]
        checks.append(f'_Static_assert(sizeof({struct_name}) == {dtype.itemsize}, "sizeof");')
        for field, offset in field_offsets(dtype).items():
            checks.append(f'_Static_assert(offsetof({struct_name}, {field}) == {offset}, "{field}");')
    src_old = tmp_path / "old_layout.c"
    src_old.write_text("\n".join(checks) + "\n")
    build_guest([src_old], tmp_path / "old_layout.wasm")


# --------------------------------------------------------------------------- a tiny vocabulary

EOS = b"<|end|>"
WORDS = [
    b" hello",
    b"hello",
    b"Hello",
    b" hell",
    b"world",
    b" world",
    b"o w",
    b" bad",
    b"bad",
    b"badge",
    b"ba",
    b"ad",
    b"d!",
    b"endless",
    b"\xc3\xa9t\xc3\xa9",  # "ete" with accents: UTF-8
]
V = 300


def make_vocab() -> tuple[list[bytes], list[int], int]:
    """300 tokens: the 256 single bytes, WORDS, an EOS special token, then fillers."""
    tokens = [bytes([b]) for b in range(256)] + list(WORDS)
    eos = len(tokens)
    tokens.append(EOS)
    while len(tokens) < V:
        tokens.append(b"#%d" % len(tokens))
    flags = [WS_TOKEN_SPECIAL if t == eos else 0 for t in range(V)]
    return tokens, flags, eos


VOCAB, FLAGS, EOS_ID = make_vocab()
TOKEN_ID = {tok: i for i, tok in reversed(list(enumerate(VOCAB)))}  # single bytes win over words


def token_table_bytes(tokens: Sequence[bytes], flags: Sequence[int], eos: int) -> bytes:
    """A ws_token_table followed by offsets[V + 1], flags[V] and the token bytes."""
    n = len(tokens)
    offsets = np.zeros(n + 1, dtype="<u4")
    offsets[1:] = np.cumsum([len(t) for t in tokens])
    offsets_offset = TOKEN_TABLE.itemsize
    flags_offset = offsets_offset + offsets.nbytes
    bytes_offset = flags_offset + n
    blob = b"".join(tokens)
    header = np.zeros((), dtype=TOKEN_TABLE)
    header["struct_size"] = TOKEN_TABLE.itemsize
    header["magic"] = WS_TOKEN_TABLE_MAGIC
    header["version"] = 1
    header["n_tokens"] = n
    header["offsets_offset"] = offsets_offset
    header["flags_offset"] = flags_offset
    header["bytes_offset"] = bytes_offset
    header["bytes_len"] = len(blob)
    header["eos_token"] = eos
    header["bos_token"] = NO_TOKEN
    return header.tobytes() + offsets.tobytes() + bytes(flags) + blob


def pack_ids(*ids: int) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


# --------------------------------------------------------------------------- the harness


@dataclasses.dataclass
class Result:
    """A call's status code and the ws_step_result it left."""

    rc: int
    action: int
    output: int
    backtrack: int
    n_ff: int
    ff_tokens: list[int]
    n_bias: int = 0


def _page_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


class Controller:
    """One controller instance for one sequence, driven the way the host drives it."""

    MAX_TOKENS = 4096

    def __init__(
        self,
        name: str | pathlib.Path,
        arg: bytes = b"",
        *,
        prompt: Sequence[int] = (),
        fuel: int | None = None,
        memory_limit: int | None = None,
        vocab: Sequence[bytes] = VOCAB,
        flags: Sequence[int] = FLAGS,
        eos: int = EOS_ID,
    ) -> None:
        config = wasmtime.Config()
        config.consume_fuel = fuel is not None
        self.engine = wasmtime.Engine(config)
        self.store = wasmtime.Store(self.engine)
        if fuel is not None:
            self.store.set_fuel(fuel)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        path = name if isinstance(name, pathlib.Path) else CONTROLLERS / f"{name}.wasm"
        module = wasmtime.Module(self.engine, path.read_bytes())
        assert not list(module.imports), f"{name} imports {[(i.module, i.name) for i in module.imports]}"
        self.instance = wasmtime.Linker(self.engine).instantiate(self.store, module)
        self.exports = self.instance.exports(self.store)
        memory = self.exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory

        self.vocab_size = len(vocab)
        self.mask_words = -(-self.vocab_size // 32)
        table = token_table_bytes(vocab, flags, eos)
        # The step record: input, result, tokens, arg; then the mask row and the bias row.
        record_size = 128 + STEP_RESULT.itemsize + 4 * self.MAX_TOKENS + max(len(arg), 1)
        sizes = [_page_up(len(table)), _page_up(record_size), _page_up(4 * self.mask_words), _page_up(4 * V)]
        base = self.memory.grow(self.store, sum(sizes) // PAGE) * PAGE
        self.table_addr = base
        self.input_addr = base + sizes[0]
        self.result_addr = self.input_addr + 128
        self.tokens_addr = self.result_addr + STEP_RESULT.itemsize
        self.arg_addr = self.tokens_addr + 4 * self.MAX_TOKENS
        self.mask_addr = self.input_addr + sizes[1]
        self.bias_addr = self.mask_addr + sizes[2]
        self.write(self.table_addr, table)
        self.write(self.arg_addr, arg)
        # As the host does: a sequence starts with an all-allowed mask and a zero bias.
        self.write(self.mask_addr, b"\xff" * (4 * self.mask_words))
        self.arg_len = len(arg)
        self.prompt = list(prompt)
        self.next_step = 0

    # -- memory

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write(self.store, data, addr)

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, addr, addr + n))

    @property
    def memory_nbytes(self) -> int:
        return self.memory.data_len(self.store)

    def mask_words_now(self) -> np.ndarray[Any, np.dtype[np.uint32]]:
        return np.frombuffer(self.read(self.mask_addr, 4 * self.mask_words), dtype="<u4").copy()

    def allowed(self) -> np.ndarray[Any, np.dtype[np.bool_]]:
        """The mask slot as one bool per token."""
        bits = np.unpackbits(self.mask_words_now().view(np.uint8), bitorder="little")
        return bits[: self.vocab_size].astype(bool)

    def set_mask(self, words: np.ndarray[Any, Any]) -> None:
        self.write(self.mask_addr, np.asarray(words, dtype="<u4").tobytes())

    def bias(self) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.frombuffer(self.read(self.bias_addr, 4 * self.vocab_size), dtype="<f4").copy()

    def set_bias(self, values: np.ndarray[Any, Any]) -> None:
        self.write(self.bias_addr, np.asarray(values, dtype="<f4").tobytes())

    # -- calls

    def _call(self, export: str, step: int, tokens: Sequence[int]) -> Result:
        if len(tokens) > self.MAX_TOKENS:
            raise ValueError("too many tokens for the harness")
        self.write(self.tokens_addr, pack_ids(*tokens))
        inp = np.zeros((), dtype=STEP_INPUT)
        inp["struct_size"] = STEP_INPUT.itemsize
        inp["abi_version"] = CONTROLLER_ABI_VERSION
        inp["vocab_size"] = self.vocab_size
        inp["mask_words"] = self.mask_words
        inp["token_table"] = self.table_addr
        inp["mask"] = self.mask_addr
        inp["bias"] = self.bias_addr
        inp["step"] = step
        inp["n_tokens"] = len(tokens)
        inp["tokens"] = self.tokens_addr
        inp["arg"] = self.arg_addr
        inp["arg_len"] = self.arg_len
        inp["sequence_id"] = 7
        self.write(self.input_addr, inp.tobytes())
        # The host resets the result before every call.
        out = np.zeros((), dtype=STEP_RESULT)
        out["struct_size"] = STEP_RESULT.itemsize
        out["ff_tokens"] = 0xDEADBEEF  # stale entries: only [0, n_ff) mean anything
        self.write(self.result_addr, out.tobytes())

        func = self.exports[export]
        assert isinstance(func, wasmtime.Func)
        rc = func(self.store, self.input_addr, self.result_addr)

        res = np.frombuffer(self.read(self.result_addr, STEP_RESULT.itemsize), dtype=STEP_RESULT)[0]
        n_ff = int(res["n_ff"])
        return Result(
            rc=int(rc),
            action=int(res["action"]),
            output=int(res["output"]),
            backtrack=int(res["backtrack"]),
            n_ff=n_ff,
            ff_tokens=[int(t) for t in res["ff_tokens"][: min(n_ff, WS_MAX_FF_TOKENS)]],
            n_bias=int(res["n_bias"]),
        )

    def create(self) -> Result:
        return self._call("ws_ctrl_create", 0, self.prompt)

    def step(self, tokens: Sequence[int] = ()) -> Result:
        result = self._call("ws_ctrl_step", self.next_step, tokens)
        self.next_step += 1
        return result

    def call(self, name: str, *args: Any) -> Any:
        func = self.exports[name]
        assert isinstance(func, wasmtime.Func)
        return func(self.store, *args)


def created(name: str | pathlib.Path, arg: bytes = b"", **kwargs: Any) -> Controller:
    ctrl = Controller(name, arg, **kwargs)
    result = ctrl.create()
    assert result.rc == WS_OK, f"{name} create failed: {result}"
    assert (result.action, result.output, result.backtrack, result.n_ff) == (
        WS_CONTINUE,
        WS_OUTPUT_NONE,
        0,
        0,
    )
    return ctrl


def expect_plain(result: Result, output: int) -> None:
    """A step that only answers an output: OK, CONTINUE, no backtrack or fast-forward."""
    assert result.rc == WS_OK
    assert (result.action, result.output, result.backtrack, result.n_ff) == (WS_CONTINUE, output, 0, 0)


def tok(text: bytes) -> int:
    return TOKEN_ID[text]


# --------------------------------------------------------------------------- every controller


def test_every_source_has_a_prebuilt_module() -> None:
    assert [p.stem for p in SOURCES] == [p.stem for p in PREBUILT]
    expected = {
        "allow_list",
        "ban_strings",
        "force_answer",
        "max_tokens",
        "boost_words",
        "backtrack",
        "hostile_controller",
        "old_abi",
    }
    assert expected <= {p.stem for p in SOURCES}


def _signature(module: wasmtime.Module) -> dict[str, Any]:
    def describe(t: Any) -> Any:
        if isinstance(t, wasmtime.FuncType):
            return ("func", tuple(str(p) for p in t.params), tuple(str(r) for r in t.results))
        if isinstance(t, wasmtime.MemoryType):
            return ("memory", t.limits.min, t.limits.max)
        if isinstance(t, wasmtime.GlobalType):
            return ("global", str(t.content), t.mutable)
        return (type(t).__name__,)

    return {
        "exports": {e.name: describe(e.type) for e in module.exports},
        "imports": {(i.module, i.name): describe(i.type) for i in module.imports},
    }


@needs_zig
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_prebuilt_is_up_to_date(source: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # Same file name as the checked-in module: the name section records it.
    fresh = build_guest([source], tmp_path / f"{source.stem}.wasm", extra_flags=BUILD_FLAGS)
    checked_in = source.with_suffix(".wasm")
    engine = wasmtime.Engine()
    assert _signature(wasmtime.Module(engine, fresh.read_bytes())) == _signature(
        wasmtime.Module(engine, checked_in.read_bytes())
    ), f"{checked_in.name} is stale: run guests/build.sh"
    if importlib.metadata.version("ziglang") == PINNED_ZIGLANG:
        assert fresh.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in.name} is stale: run guests/build.sh"
        )


@pytest.mark.parametrize("path", PREBUILT, ids=lambda p: p.stem)
def test_exports_and_versions(path: pathlib.Path) -> None:
    module = wasmtime.Module(wasmtime.Engine(), path.read_bytes())
    imports = {(i.module, i.name) for i in module.imports}
    sig = _signature(module)["exports"]
    if path.stem in HOST_ENGINE_USERS:
        # It imports the host's grammar engine; tests/test_constraints.py runs it with one.
        assert imports and all(m == "wasmshare" and n.startswith("ws_constraint_") for m, n in imports)
        assert sig["ws_ctrl_step"] == (
            "func",
            (str(wasmtime.ValType.i32()),) * 2,
            (str(wasmtime.ValType.i32()),),
        )
        return
    assert imports == set()
    i32 = str(wasmtime.ValType.i32())
    assert sig["ws_abi_version"] == ("func", (), (i32,))
    assert sig["ws_ctrl_abi_version"] == ("func", (), (i32,))
    assert sig["ws_ctrl_create"] == ("func", (i32, i32), (i32,))
    assert sig["ws_ctrl_step"] == ("func", (i32, i32), (i32,))
    assert sig["memory"][0] == "memory"
    if "ws_ctrl_free" in sig:
        assert sig["ws_ctrl_free"] == ("func", (), ())

    ctrl = Controller(path.stem)
    assert ctrl.call("ws_abi_version") == 1
    assert ctrl.call("ws_ctrl_abi_version") == (99 if path.stem == "old_abi" else CONTROLLER_ABI_VERSION)


# Well-behaved controllers with a valid argument, and a few steps' tokens.
GOOD_ARGS: dict[str, bytes] = {
    "allow_list": pack_ids(1, 2, 3),
    "ban_strings": b"bad\nhello",
    "force_answer": pack_ids(4, 5),
    "max_tokens": b"100",
    "boost_words": b"hello\t1.5",
    "boost_words_sparse": b"hello\t1.5",
    "backtrack": pack_ids(2, 9),
    "hostile_controller": b"ok",
    "old_abi": b"",
}


@pytest.mark.parametrize("name", sorted(GOOD_ARGS))
def test_step_never_grows_memory(name: str) -> None:
    """ "Never allocate in step": memory stays the same size over many steps."""
    ctrl = created(name, GOOD_ARGS[name])
    before = ctrl.memory_nbytes
    for i in range(50):
        assert ctrl.step([tok(b"b"), tok(b"a")] if i else []).rc == WS_OK
    assert ctrl.memory_nbytes == before


# --------------------------------------------------------------------------- the documented example


@needs_zig
def test_docs_example_controller(tmp_path: pathlib.Path) -> None:
    """The complete controller in docs/controller-abi.md builds and does what it says."""
    doc = (ROOT / "docs" / "controller-abi.md").read_text()
    source = doc.split("## A complete controller", 1)[1].split("```c\n", 1)[1].split("```", 1)[0]
    src = tmp_path / "no_eos.c"
    src.write_text(source)
    wasm = build_guest([src], tmp_path / "no_eos.wasm", extra_flags=BUILD_FLAGS)
    ctrl = created(wasm)
    for i in range(10):
        expect_plain(ctrl.step([1] if i else []), WS_OUTPUT_BITMASK)
        allowed = ctrl.allowed()
        assert not allowed[EOS_ID] and allowed.sum() == V - 1
    expect_plain(ctrl.step([1]), WS_OUTPUT_BITMASK)  # the 10th sampled token
    assert ctrl.allowed().all()


# --------------------------------------------------------------------------- allow_list


def test_allow_list_sets_exactly_its_ids() -> None:
    ids = [5, 31, 32, 100, 299]
    ctrl = created("allow_list", pack_ids(*ids))
    ctrl.set_mask(np.full(ctrl.mask_words, 0xFFFFFFFF))  # stale contents
    expect_plain(ctrl.step(), WS_OUTPUT_BITMASK)
    assert sorted(np.flatnonzero(ctrl.allowed())) == ids
    words = ctrl.mask_words_now()
    assert words[-1] >> (V % 32) == 0  # no bit past V
    for i in range(3):
        expect_plain(ctrl.step([ids[i]]), WS_OUTPUT_BITMASK)
        assert sorted(np.flatnonzero(ctrl.allowed())) == ids


def test_allow_list_later_steps_leave_the_slot_alone() -> None:
    ctrl = created("allow_list", pack_ids(7))
    ctrl.step()
    ctrl.set_mask(np.zeros(ctrl.mask_words))
    expect_plain(ctrl.step([7]), WS_OUTPUT_BITMASK)
    assert not ctrl.allowed().any()  # the slot persists: the controller did not rewrite it


@pytest.mark.parametrize("arg", [b"", b"\x01\x00\x00", pack_ids(V), pack_ids(1, 0xFFFFFFFF)])
def test_allow_list_rejects_bad_arguments(arg: bytes) -> None:
    assert Controller("allow_list", arg).create().rc == WS_ERR_FAILED


# --------------------------------------------------------------------------- ban_strings


def contains_banned(data: bytes, banned: Sequence[bytes]) -> bool:
    return any(s in data for s in banned)


def reference_allowed(text: bytes, banned: Sequence[bytes]) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """A token is banned when it is not special and text + token would contain a banned
    string that text does not already end inside of."""
    allowed = np.ones(V, dtype=bool)
    for t, data in enumerate(VOCAB):
        if FLAGS[t] & WS_TOKEN_SPECIAL:
            continue
        for s in banned:
            tail = text[max(0, len(text) - (len(s) - 1)) :] if len(s) > 1 else b""
            if s in tail + data:
                allowed[t] = False
    return allowed


def test_ban_strings_bans_tokens_containing_a_string() -> None:
    ctrl = created("ban_strings", b"bad\nhello\n")
    expect_plain(ctrl.step(), WS_OUTPUT_BITMASK)
    allowed = ctrl.allowed()
    banned = {VOCAB[t] for t in np.flatnonzero(~allowed)}
    assert banned == {b" hello", b"hello", b" bad", b"bad", b"badge"}
    assert ctrl.mask_words_now()[-1] >> (V % 32) == 0
    np.testing.assert_array_equal(allowed, reference_allowed(b"", [b"bad", b"hello"]))


def test_ban_strings_across_token_boundaries() -> None:
    banned = [b"bad", b"hello"]
    ctrl = created("ban_strings", b"\n".join(banned))
    ctrl.step()
    expect_plain(ctrl.step([tok(b"b"), tok(b"a")]), WS_OUTPUT_BITMASK)  # text "ba"
    allowed = ctrl.allowed()
    assert not allowed[tok(b"d")] and not allowed[tok(b"d!")]
    assert allowed[tok(b"ad")] and allowed[tok(b"a")]
    np.testing.assert_array_equal(allowed, reference_allowed(b"ba", banned))

    expect_plain(ctrl.step([tok(b"x")]), WS_OUTPUT_BITMASK)  # "bax": the boundary bans are lifted
    allowed = ctrl.allowed()
    assert allowed[tok(b"d")] and allowed[tok(b"d!")]
    np.testing.assert_array_equal(allowed, reference_allowed(b"bax", banned))

    # Split over three tokens: "h" "el" ... the tail "hel" bans "l", "lo", ...
    ctrl.step([tok(b"h")])
    ctrl.step([tok(b"e"), tok(b"l")])
    allowed = ctrl.allowed()
    assert allowed[tok(b"l")]
    ctrl.step([tok(b"l")])  # "hell": now "o" completes "hello"
    allowed = ctrl.allowed()
    assert not allowed[tok(b"o")] and not allowed[tok(b"o w")]
    np.testing.assert_array_equal(allowed, reference_allowed(b"baxhell", banned))


def test_ban_strings_leaves_special_tokens_alone() -> None:
    ctrl = created("ban_strings", b"end|")  # EOS's bytes "<|end|>" contain it
    ctrl.step()
    allowed = ctrl.allowed()
    assert allowed[EOS_ID]
    ctrl.step([EOS_ID, tok(b"e"), tok(b"n")])  # EOS adds no text: the text is "en"
    allowed = ctrl.allowed()
    assert allowed[EOS_ID] and allowed[tok(b"d")] and allowed[tok(b"endless")]
    ctrl.step([tok(b"d")])
    assert not ctrl.allowed()[tok(b"|")]


@pytest.mark.parametrize("seed", range(6))
def test_ban_strings_generation_never_contains_a_banned_string(seed: int) -> None:
    """Sample only allowed tokens: the text never contains a banned string, and every
    mask equals the plain-Python reference."""
    rng = random.Random(seed)
    banned = [b"bad", b"hello", b"o w", b"\xc3\xa9t", b"x"]
    ctrl = created("ban_strings", b"\n".join(banned) + b"\r\n")
    text = b""
    tokens: list[int] = []
    for _ in range(150):
        result = ctrl.step(tokens)
        expect_plain(result, WS_OUTPUT_BITMASK)
        allowed = ctrl.allowed()
        np.testing.assert_array_equal(allowed, reference_allowed(text, banned), err_msg=repr(text[-20:]))
        # Favour the words and the bytes that build banned strings, so boundaries get hit.
        choices = [t for t in np.flatnonzero(allowed) if t > 255 or bytes([t]) in b"badhelo w\xc3\xa9t"]
        tokens = [int(rng.choice(choices)) for _ in range(rng.choice([1, 1, 1, 2]))]
        # Several tokens in one step are only checked at the step boundary, as the host does
        # when it fast-forwards; keep the invariant by re-checking each one.
        kept: list[int] = []
        for t in tokens:
            if t != EOS_ID and contains_banned(text + VOCAB[t], banned):
                break
            kept.append(t)
            if t != EOS_ID:
                text += VOCAB[t]
        tokens = kept
        assert not contains_banned(text, banned)


@pytest.mark.parametrize("arg", [b"", b"\n\n", b"a" * 65, b"\n".join(b"s%d" % i for i in range(65))])
def test_ban_strings_rejects_bad_arguments(arg: bytes) -> None:
    assert Controller("ban_strings", arg).create().rc == WS_ERR_FAILED


# --------------------------------------------------------------------------- force_answer


def test_force_answer_fast_forwards_then_stops() -> None:
    answer = [tok(b" hello"), tok(b" world"), tok(b"!"), EOS_ID]
    ctrl = created("force_answer", pack_ids(*answer), prompt=[1, 2, 3])
    result = ctrl.step()
    assert result.rc == WS_OK
    assert result.action == WS_STOP
    assert result.output == WS_OUTPUT_NONE
    assert result.backtrack == 0
    assert result.ff_tokens == answer


def test_force_answer_longest_answer() -> None:
    answer = [i % V for i in range(WS_MAX_FF_TOKENS)]
    result = created("force_answer", pack_ids(*answer)).step()
    assert (result.rc, result.action, result.ff_tokens) == (WS_OK, WS_STOP, answer)


@pytest.mark.parametrize("arg", [pack_ids(*([1] * (WS_MAX_FF_TOKENS + 1))), b"\x01\x02", pack_ids(V)])
def test_force_answer_rejects_bad_arguments(arg: bytes) -> None:
    assert Controller("force_answer", arg).create().rc == WS_ERR_FAILED


# --------------------------------------------------------------------------- max_tokens


@pytest.mark.parametrize("arg", [b"3", b"3\n"])
def test_max_tokens_stops_after_n_sampled(arg: bytes) -> None:
    ctrl = created("max_tokens", arg)
    expect_plain(ctrl.step(), WS_OUTPUT_NONE)  # 0 sampled
    expect_plain(ctrl.step([10, 11]), WS_OUTPUT_NONE)  # 2
    result = ctrl.step([12])  # 3
    assert (result.rc, result.action, result.output, result.n_ff) == (WS_OK, WS_STOP, WS_OUTPUT_NONE, 0)


def test_max_tokens_zero_stops_at_once() -> None:
    result = created("max_tokens", b"0").step()
    assert (result.rc, result.action) == (WS_OK, WS_STOP)


def test_max_tokens_bans_nothing() -> None:
    ctrl = created("max_tokens", b"5")
    ctrl.set_mask(np.arange(ctrl.mask_words))
    ctrl.set_bias(np.full(V, 0.5))
    ctrl.step()
    ctrl.step([1])
    np.testing.assert_array_equal(ctrl.mask_words_now(), np.arange(ctrl.mask_words))
    np.testing.assert_array_equal(ctrl.bias(), np.full(V, 0.5, dtype=np.float32))


@pytest.mark.parametrize("arg", [b"", b"abc", b"-1", b"1.5", b" 3", b"4294967296", b"99999999999999999999"])
def test_max_tokens_rejects_bad_arguments(arg: bytes) -> None:
    assert Controller("max_tokens", arg).create().rc == WS_ERR_FAILED


# --------------------------------------------------------------------------- boost_words


def test_boost_words_sets_bias_of_whole_words() -> None:
    ctrl = Controller("boost_words", b"hello\t2.5\nworld\t-1\n\nbad\t.25e1\r\n")
    ctrl.set_bias(np.full(V, 9.0))  # stale contents: create zero-fills
    assert ctrl.create().rc == WS_OK
    expected = np.zeros(V, dtype=np.float32)
    for word, value in [(b"hello", 2.5), (b" hello", 2.5), (b"world", -1.0), (b" world", -1.0)]:
        expected[tok(word)] = value
    expected[tok(b"bad")] = expected[tok(b" bad")] = 2.5
    np.testing.assert_array_equal(ctrl.bias(), expected)
    for tokens in ([], [1], [2, 3]):
        expect_plain(ctrl.step(tokens), WS_OUTPUT_BIAS)
        np.testing.assert_array_equal(ctrl.bias(), expected)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"1", 1.0),
        (b"-1", -1.0),
        (b"+3.75", 3.75),
        (b"0.5", 0.5),
        (b".5", 0.5),
        (b"5.", 5.0),
        (b"1e2", 100.0),
        (b"-2.5E-1", -0.25),
        (b"0", 0.0),
        (b"1e-50", 0.0),
    ],
)
def test_boost_words_parses_floats(text: bytes, value: float) -> None:
    ctrl = created("boost_words", b"hello\t" + text)
    assert ctrl.bias()[tok(b"hello")] == np.float32(value)


@pytest.mark.parametrize(
    "arg",
    [
        b"",
        b"hello",
        b"hello 2",
        b"\t1",
        b"hello\t",
        b"hello\tx",
        b"hello\t1.2.3",
        b"hello\t1e",
        b"hello\t1e99",
        b"hello\t-",
        b"hello\t.",
        b"a" * 256 + b"\t1",
    ],
)
def test_boost_words_rejects_bad_arguments(arg: bytes) -> None:
    assert Controller("boost_words", arg).create().rc == WS_ERR_FAILED


def test_boost_words_sparse_writes_pairs_once_and_answers_their_count() -> None:
    ctrl = Controller("boost_words_sparse", b"hello\t2.5\nworld\t-1\n\nbad\t.25e1\nworld\t3\r\n")
    assert ctrl.create().rc == WS_OK
    expected = {
        tok(b"hello"): 2.5,
        tok(b" hello"): 2.5,
        tok(b"world"): 3.0,
        tok(b" world"): 3.0,
        tok(b"bad"): 2.5,
        tok(b" bad"): 2.5,
    }
    for tokens in ([], [1], [2, 3]):
        result = ctrl.step(tokens)
        assert (result.rc, result.action, result.output, result.n_bias) == (
            WS_OK,
            WS_CONTINUE,
            WS_OUTPUT_SPARSE_BIAS,
            6,
        )
        slot = ctrl.bias()
        ids = slot.view(np.uint32)[: result.n_bias].tolist()
        values = slot[V // 2 : V // 2 + result.n_bias].tolist()
        assert dict(zip(ids, values)) == expected and len(set(ids)) == len(ids)


def test_boost_words_skips_special_tokens() -> None:
    ctrl = created("boost_words", EOS + b"\t3")
    assert ctrl.bias()[EOS_ID] == 0.0


# --------------------------------------------------------------------------- backtrack


def test_backtrack_replaces_the_kth_token_once() -> None:
    ctrl = created("backtrack", pack_ids(3, 42))
    expect_plain(ctrl.step(), WS_OUTPUT_NONE)
    expect_plain(ctrl.step([1]), WS_OUTPUT_NONE)
    result = ctrl.step([2, 3])  # 3 sampled
    assert result.rc == WS_OK
    assert (result.action, result.output, result.backtrack, result.ff_tokens) == (
        WS_CONTINUE,
        WS_OUTPUT_NONE,
        1,
        [42],
    )
    for i in range(5):
        expect_plain(ctrl.step([42] if i == 0 else [i]), WS_OUTPUT_NONE)


@pytest.mark.parametrize("arg", [b"", pack_ids(3), pack_ids(0, 1), pack_ids(1, V), pack_ids(1, 2, 3)])
def test_backtrack_rejects_bad_arguments(arg: bytes) -> None:
    assert Controller("backtrack", arg).create().rc == WS_ERR_FAILED


# --------------------------------------------------------------------------- hostile_controller


def test_hostile_ok_allows_everything() -> None:
    ctrl = created("hostile_controller", b"ok")
    expect_plain(ctrl.step(), WS_OUTPUT_BITMASK)
    assert ctrl.allowed().all()


def test_hostile_create_trap() -> None:
    with pytest.raises(wasmtime.Trap):
        Controller("hostile_controller", b"create_trap").create()


@pytest.mark.parametrize("arg", [b"create_error", b"", b"nonsense", b"ok\n"])
def test_hostile_create_errors(arg: bytes) -> None:
    assert Controller("hostile_controller", arg).create().rc == WS_ERR_FAILED


def test_hostile_trap_mid_mask_leaves_a_torn_mask() -> None:
    ctrl = created("hostile_controller", b"trap_mid_mask")
    ctrl.set_mask(np.full(ctrl.mask_words, 0xFFFFFFFF))
    with pytest.raises(wasmtime.Trap):
        ctrl.step()
    words = ctrl.mask_words_now()
    half = ctrl.mask_words // 2
    assert (words[:half] == 0).all() and (words[half:] == 0xFFFFFFFF).all()


def test_hostile_spin_runs_out_of_fuel() -> None:
    ctrl = created("hostile_controller", b"spin", fuel=10_000_000)
    with pytest.raises(wasmtime.Trap) as info:
        ctrl.step()
    assert info.value.trap_code == wasmtime.TrapCode.OUT_OF_FUEL


def test_hostile_bomb_fills_memory_then_traps() -> None:
    limit = 64 * 1024 * 1024
    ctrl = created("hostile_controller", b"bomb", memory_limit=limit)
    with pytest.raises(wasmtime.Trap) as info:
        ctrl.step()
    assert info.value.trap_code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS
    assert ctrl.memory_nbytes == limit


@pytest.mark.parametrize(
    ("arg", "field", "value"),
    [
        (b"bad_result", "n_ff", 1_000_000),
        (b"bad_output", "output", 99),
        (b"bad_backtrack", "backtrack", 0xFFFFFFFF),
    ],
)
def test_hostile_bad_results(arg: bytes, field: str, value: int) -> None:
    result = created("hostile_controller", arg).step()
    assert result.rc == WS_OK
    assert getattr(result, field) == value


def test_hostile_error() -> None:
    assert created("hostile_controller", b"error").step().rc == WS_ERR_FAILED


def test_hostile_write_token_table() -> None:
    # With the host's read-only loan this traps; the harness's table is plain memory.
    ctrl = created("hostile_controller", b"write_token_table")
    assert ctrl.step().rc == WS_OK
    assert struct.unpack("<I", ctrl.read(ctrl.table_addr + 4, 4))[0] == 0


# --------------------------------------------------------------------------- old_abi


def test_old_abi_reports_99_and_otherwise_allows_everything() -> None:
    ctrl = created("old_abi", b"anything")
    assert ctrl.call("ws_ctrl_abi_version") == 99
    assert ctrl.call("ws_abi_version") == 1
    expect_plain(ctrl.step(), WS_OUTPUT_BITMASK)
    assert ctrl.allowed().all()
