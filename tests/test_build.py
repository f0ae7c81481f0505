"""Tests of the C guest SDK: wasmshare.h, build_guest and the prebuilt guests/*.wasm.

These use plain wasmtime (Store, Linker) rather than wasmshare.Guest, so they
check the guest side of the ABI on its own.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import pathlib
import re
import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import wasmtime

import wasmshare.abi as abi
from wasmshare.abi import build_guest, include_dir
from wasmshare.abi.build import compiler_command
from wasmshare.errors import BuildError

ROOT = pathlib.Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests"
SOURCES = sorted(GUESTS.glob("*.c"))
PREBUILT = sorted(GUESTS.glob("*.wasm"))
HEADER = include_dir() / "wasmshare.h"
# The checked-in .wasm files were built with this ziglang (pyproject's [sdk] pin);
# with another version only the exports and imports are compared, not the bytes.
PINNED_ZIGLANG = "0.17.1"
PAGE = 65536

HAVE_ZIG = importlib.util.find_spec("ziglang") is not None
needs_zig = pytest.mark.skipif(not HAVE_ZIG, reason="ziglang not installed (pip install 'wasmshare[sdk]')")


# --------------------------------------------------------------------------- helpers


def _signature(module: wasmtime.Module) -> dict[str, Any]:
    """Exports and imports of a module as comparable plain data."""

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


class HostStub:
    """Python stand-ins for the "wasmshare" imports: one offered region per handle.

    A borrow copies the region into guest memory grown for it and a release
    copies it back, which is enough to exercise the guest side of the ABI.
    """

    def __init__(self, regions: dict[int, bytearray] | None = None) -> None:
        self.regions = regions or {}
        self.borrowed: dict[int, tuple[int, int]] = {}  # handle -> (addr, access)
        self.logs: list[str] = []
        self.memory: wasmtime.Memory | None = None

    def define(self, linker: wasmtime.Linker, store: wasmtime.Store) -> None:
        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()

        def borrow(handle: int, access: int) -> int:
            if handle not in self.regions or access not in (abi.ACCESS_RO, abi.ACCESS_RW):
                return 0
            if self.memory is None:
                return 0
            data = self.regions[handle]
            pages = max(1, -(-len(data) // PAGE))
            addr = self.memory.grow(store, pages) * PAGE
            self.memory.write(store, bytes(data), addr)
            self.borrowed[handle] = (addr, access)
            return addr

        def release(handle: int) -> int:
            if handle not in self.regions:
                return abi.ERR_BAD_HANDLE
            if handle not in self.borrowed:
                return abi.ERR_NOT_BORROWED
            addr, access = self.borrowed.pop(handle)
            if access == abi.ACCESS_RW and self.memory is not None:
                data = self.regions[handle]
                data[:] = self.memory.read(store, addr, addr + len(data))
            return abi.OK

        def region_size(handle: int) -> int:
            return len(self.regions[handle]) if handle in self.regions else abi.ERR_BAD_HANDLE

        def log(ptr: int, length: int) -> None:
            assert self.memory is not None
            self.logs.append(self.memory.read(store, ptr, ptr + length).decode())

        m = abi.IMPORT_MODULE
        linker.define_func(m, "ws_borrow", wasmtime.FuncType([i32, i32], [i32]), borrow)
        linker.define_func(m, "ws_release", wasmtime.FuncType([i32], [i32]), release)
        linker.define_func(m, "ws_region_size", wasmtime.FuncType([i32], [i64]), region_size)
        linker.define_func(m, "ws_log", wasmtime.FuncType([i32, i32], []), log)


class Instance:
    """A guest instantiated with plain wasmtime and the stub host."""

    def __init__(
        self, path: pathlib.Path, host: HostStub | None = None, *, memory_limit: int | None = None
    ) -> None:
        self.engine = wasmtime.Engine()
        self.store = wasmtime.Store(self.engine)
        if memory_limit is not None:
            self.store.set_limits(memory_size=memory_limit)
        self.host = host or HostStub()
        linker = wasmtime.Linker(self.engine)
        self.host.define(linker, self.store)
        module = wasmtime.Module(self.engine, path.read_bytes())
        self.instance = linker.instantiate(self.store, module)
        self.exports = self.instance.exports(self.store)
        memory = self.exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory
        self.host.memory = memory

    def call(self, name: str, *args: Any) -> Any:
        func = self.exports[name]
        assert isinstance(func, wasmtime.Func)
        return func(self.store, *args)

    def write_f32(self, addr: int, values: np.ndarray[Any, Any]) -> None:
        self.memory.write(self.store, values.astype("<f4").tobytes(), addr)

    def read_f32(self, addr: int, n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.frombuffer(self.memory.read(self.store, addr, addr + 4 * n), dtype="<f4").copy()


def _guest(name: str) -> pathlib.Path:
    return GUESTS / f"{name}.wasm"


@pytest.fixture
def tmp_c(tmp_path: pathlib.Path) -> Iterator[Callable[[str, str], pathlib.Path]]:
    def write(name: str, text: str) -> pathlib.Path:
        p = tmp_path / name
        p.write_text(text)
        return p

    yield write


# --------------------------------------------------------------------------- header and constants


def _header_defines() -> dict[str, int]:
    text = HEADER.read_text()
    found = re.findall(r"^#define\s+(\w+)\s+\(?(-?\d+)\)?", text, flags=re.MULTILINE)
    return {name: int(value) for name, value in found}


def test_include_dir_holds_header() -> None:
    assert HEADER.is_file()


def test_constants_match_header() -> None:
    defines = _header_defines()
    assert defines["WASMSHARE_ABI_VERSION"] == abi.ABI_VERSION == 1
    assert defines["WS_PAGE_SIZE"] == abi.PAGE_SIZE
    assert defines["WS_ACCESS_RO"] == abi.ACCESS_RO
    assert defines["WS_ACCESS_RW"] == abi.ACCESS_RW
    assert defines["WS_OK"] == abi.OK
    assert defines["WS_ERR_BAD_HANDLE"] == abi.ERR_BAD_HANDLE
    assert defines["WS_ERR_ACCESS"] == abi.ERR_ACCESS
    assert defines["WS_ERR_NOT_BORROWED"] == abi.ERR_NOT_BORROWED
    assert defines["WS_ERR_FAILED"] == abi.ERR_FAILED


def test_abi_all_is_honest() -> None:
    for name in abi.__all__:
        assert hasattr(abi, name), name


# --------------------------------------------------------------------------- prebuilt guests


def test_every_source_has_a_prebuilt_module() -> None:
    assert [p.stem for p in SOURCES] == [p.stem for p in PREBUILT]
    assert {"calls", "bias", "borrow_sum", "offer", "hostile"} <= {p.stem for p in SOURCES}


@needs_zig
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_prebuilt_is_up_to_date(source: pathlib.Path, tmp_path: pathlib.Path) -> None:
    # Same file name as the checked-in module: the name section records it.
    fresh = build_guest([source], tmp_path / f"{source.stem}.wasm")
    checked_in = source.with_suffix(".wasm")
    engine = wasmtime.Engine()
    assert _signature(wasmtime.Module(engine, fresh.read_bytes())) == _signature(
        wasmtime.Module(engine, checked_in.read_bytes())
    ), f"{checked_in.name} is stale: run guests/build.sh"
    if importlib.metadata.version("ziglang") == PINNED_ZIGLANG:
        assert fresh.read_bytes() == checked_in.read_bytes(), (
            f"{checked_in.name} is stale: run guests/build.sh"
        )


@pytest.mark.parametrize("path", PREBUILT, ids=lambda p: p.name)
def test_prebuilt_reports_abi_version(path: pathlib.Path) -> None:
    guest = Instance(path)
    assert guest.call("ws_abi_version") == abi.ABI_VERSION
    module = wasmtime.Module(wasmtime.Engine(), path.read_bytes())
    for imp in module.imports:
        assert imp.module == abi.IMPORT_MODULE, f"{path.name} imports {imp.module}.{imp.name}"


def test_calls_guest() -> None:
    guest = Instance(_guest("calls"))
    assert guest.call("nop") is None
    assert guest.call("add", 2, 40) == 42
    assert guest.call("add", 2**31 - 1, 1) == -(2**31)
    assert guest.call("add4", 1, 2, 3, -10) == -4


def _bias_reference(n: int, step: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    out = np.zeros(n, dtype=np.float32)
    for i in range(64):
        out[((step & 0xFFFFFFFF) * 7919 + i * 104729) % n] = np.float32(step + i) * np.float32(0.5)
    return out


@pytest.mark.parametrize("step", [1, 17, 123456])
def test_bias_update_writes_64_entries(step: int) -> None:
    n = 32000
    guest = Instance(_guest("bias"))
    addr = guest.call("own_buffer", 4 * n)
    assert addr != 0 and addr % PAGE == 0
    guest.write_f32(addr, np.zeros(n, dtype=np.float32))
    assert guest.call("bias_update", addr, n, step) == 64
    got = guest.read_f32(addr, n)
    assert np.count_nonzero(got) == 64
    np.testing.assert_array_equal(got, _bias_reference(n, step))


def test_bias_own_buffer_is_reused_then_grown() -> None:
    guest = Instance(_guest("bias"))
    first = guest.call("own_buffer", 1000)
    assert guest.call("own_buffer", PAGE) == first  # fits the page already grown
    bigger = guest.call("own_buffer", 3 * PAGE)
    assert bigger > first and bigger % PAGE == 0
    assert guest.call("own_buffer", -1) == 0


def test_bias_kernels() -> None:
    guest = Instance(_guest("bias"))
    values = np.linspace(-3, 5, 1001, dtype=np.float32)
    addr = guest.call("own_buffer", values.nbytes)
    guest.write_f32(addr, values)
    expected = np.float32(0)
    for v in values:  # sum_f32 adds in order in float32
        expected = np.float32(expected + v)
    assert guest.call("sum_f32", addr, len(values)) == pytest.approx(float(expected), rel=1e-6)
    guest.call("scale_f32", addr, len(values), 2.5)
    np.testing.assert_array_equal(guest.read_f32(addr, len(values)), values * np.float32(2.5))


def test_borrow_sum_guest_uses_host_imports() -> None:
    values = np.arange(1000, dtype=np.float32)
    host = HostStub({7: bytearray(values.tobytes())})
    guest = Instance(_guest("borrow_sum"), host)
    assert guest.call("borrow_sum", 7) == pytest.approx(float(values.sum()))
    assert math.isnan(guest.call("borrow_sum", 8))
    assert guest.call("borrow_fill", 7, 1.5) == 1000
    np.testing.assert_array_equal(
        np.frombuffer(host.regions[7], dtype=np.float32), np.full(1000, 1.5, np.float32)
    )
    assert guest.call("borrow_fill", 8, 1.0) == abi.ERR_BAD_HANDLE
    assert host.borrowed == {}


def test_offer_guest_allocates_aligned_blocks() -> None:
    guest = Instance(_guest("offer"))
    a = guest.call("ws_loan_alloc", 100_000)
    b = guest.call("ws_loan_alloc", 1)
    assert a % PAGE == 0 and b % PAGE == 0 and a != 0 and b >= a + 2 * PAGE
    assert guest.memory.data_len(guest.store) >= b + PAGE
    guest.call("ws_loan_free", a)
    assert guest.call("ws_loan_alloc", 2 * PAGE) == a  # reused
    assert guest.call("ws_loan_alloc", 0) == 0
    data = bytes(range(256)) * 3
    guest.memory.write(guest.store, data, b)
    assert guest.call("checksum_u8", b, len(data)) == sum(data)


def test_hostile_guest_misbehaves_as_documented() -> None:
    guest = Instance(_guest("hostile"), memory_limit=4 * 2**20)
    size = guest.memory.data_len(guest.store)
    guest.call("write_at", 1024, 0x12345678)
    assert guest.call("read_at", 1024) == 0x12345678
    with pytest.raises(wasmtime.Trap, match="out of bounds"):
        guest.call("write_at", size, 1)
    with pytest.raises(wasmtime.Trap, match="out of bounds"):
        guest.call("read_at", -4)
    n, k = 100, 37
    guest.call("fill_then_trap", 2048, n, -1)
    np.testing.assert_array_equal(guest.read_f32(2048, n), np.ones(n, np.float32))
    guest.write_f32(2048, np.zeros(n, np.float32))
    with pytest.raises(wasmtime.Trap, match="unreachable"):
        guest.call("fill_then_trap", 2048, n, k)
    got = guest.read_f32(2048, n)
    assert (got[:k] == 1).all() and (got[k:] == 0).all()
    with pytest.raises(wasmtime.Trap, match="out of bounds"):
        guest.call("grow_forever")
    assert guest.memory.data_len(guest.store) == 4 * 2**20


# --------------------------------------------------------------------------- build_guest


def test_missing_source_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BuildError, match="not found: .*nope.c"):
        build_guest([tmp_path / "nope.c"], tmp_path / "out.wasm")


def test_no_sources_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BuildError, match="no source"):
        build_guest([], tmp_path / "out.wasm")


def test_missing_ziglang_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, tmp_c: Callable[[str, str], pathlib.Path]
) -> None:
    import wasmshare.abi.build as build_mod

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        build_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ziglang" else real_find_spec(name, *a),
    )
    src = tmp_c("ok.c", "int x;\n")
    with pytest.raises(BuildError, match=r"pip install 'wasmshare\[sdk\]'"):
        build_guest([src], tmp_path / "out.wasm")


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"optimize": "max"}, ValueError),
        ({"initial_memory": 1000}, ValueError),
        ({"max_memory": 0}, ValueError),
        ({"initial_memory": 4 * PAGE, "max_memory": 2 * PAGE}, ValueError),
        ({"extra_flags": "-Wall"}, TypeError),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], tmp_path: pathlib.Path) -> None:
    with pytest.raises(error):
        compiler_command(["x.c"], tmp_path / "x.wasm", **kwargs)


def test_compiler_command_flags() -> None:
    cmd = compiler_command(["a.c"], "a.wasm")
    assert "--target=wasm32-freestanding" in cmd and "-nostdlib" in cmd and "-O2" in cmd
    assert "-msimd128" in cmd and f"-I{include_dir()}" in cmd and cmd[-3:] == ["-o", "a.wasm", "a.c"]
    wasi = compiler_command(["a.c"], "a.wasm", wasi=True, simd=False, optimize="small")
    assert "--target=wasm32-wasi" in wasi and "-mexec-model=reactor" in wasi and "-nostdlib" not in wasi
    assert "-mno-simd128" in wasi and "-Oz" in wasi


@needs_zig
def test_syntax_error_raises_with_compiler_message(
    tmp_path: pathlib.Path, tmp_c: Callable[[str, str], pathlib.Path]
) -> None:
    src = tmp_c("broken.c", '#include "wasmshare.h"\nWS_EXPORT("f") int32_t f(void) { return 1 +; }\n')
    with pytest.raises(BuildError, match="broken.c") as info:
        build_guest([src], tmp_path / "broken.wasm")
    assert "expected expression" in str(info.value)
    assert not (tmp_path / "broken.wasm").exists()


@needs_zig
def test_header_in_two_translation_units(
    tmp_path: pathlib.Path, tmp_c: Callable[[str, str], pathlib.Path]
) -> None:
    a = tmp_c("a.c", '#include "wasmshare.h"\nWS_EXPORT("one") int32_t one(void) { return 1; }\n')
    b = tmp_c(
        "b.c",
        '#include "wasmshare.h"\n'
        "int32_t ws_loan_alloc(int32_t n) { return (int32_t)(uintptr_t)ws_grow_block(n); }\n"
        "void ws_loan_free(int32_t addr) { (void)addr; }\n",
    )
    out = build_guest([a, b], tmp_path / "two.wasm", initial_memory=32 * PAGE, max_memory=64 * PAGE)
    sig = _signature(wasmtime.Module(wasmtime.Engine(), out.read_bytes()))
    assert {"ws_abi_version", "one", "ws_loan_alloc", "ws_loan_free"} <= set(sig["exports"])
    assert sig["exports"]["memory"] == ("memory", 32, 64)
    assert sig["imports"] == {}
    guest = Instance(out)
    assert guest.call("ws_loan_alloc", PAGE + 1) == 32 * PAGE
    assert guest.call("ws_abi_version") == 1


@needs_zig
def test_wasi_build_links_libc(tmp_path: pathlib.Path, tmp_c: Callable[[str, str], pathlib.Path]) -> None:
    src = tmp_c(
        "w.c",
        "#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
        '#include "wasmshare.h"\n'
        'WS_EXPORT("fmt_len") int32_t fmt_len(int32_t v) {\n'
        '    char *buf = malloc(64); snprintf(buf, 64, "v=%d", (int)v);\n'
        "    int32_t n = (int32_t)strlen(buf); free(buf); return n; }\n",
    )
    out = build_guest([src], tmp_path / "w.wasm", wasi=True)
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    exports = linker.instantiate(store, wasmtime.Module(engine, out.read_bytes())).exports(store)
    exports["_initialize"](store)
    assert exports["ws_abi_version"](store) == 1
    assert exports["fmt_len"](store, -1234) == len("v=-1234")


@needs_zig
def test_build_accepts_one_path_and_creates_folder(
    tmp_path: pathlib.Path, tmp_c: Callable[[str, str], pathlib.Path]
) -> None:
    src = tmp_c("one.c", '#include "wasmshare.h"\n')
    out = build_guest(src, tmp_path / "sub" / "dir" / "one.wasm", optimize="small", simd=False)  # type: ignore[arg-type]
    assert out.is_file()
    assert struct.unpack("<I", out.read_bytes()[4:8]) == (1,)  # wasm binary version


@needs_zig
def test_optimised_build_is_reproducible_across_folders(tmp_path: pathlib.Path) -> None:
    # No DWARF in -O2 builds, so the checkout's location does not leak into the module.
    outputs = []
    for folder in ("a", "b/deeper"):
        src = tmp_path / folder / "bias.c"
        src.parent.mkdir(parents=True)
        src.write_text((GUESTS / "bias.c").read_text())
        outputs.append(build_guest([src], tmp_path / folder / "out" / "bias.wasm").read_bytes())
    assert outputs[0] == outputs[1]
    assert str(tmp_path).encode() not in outputs[0]


@needs_zig
def test_debug_build_traps_on_undefined_behaviour(
    tmp_path: pathlib.Path, tmp_c: Callable[[str, str], pathlib.Path]
) -> None:
    src = tmp_c(
        "ub.c",
        '#include "wasmshare.h"\nWS_EXPORT("inc") int32_t inc(int32_t x) { return x + 1; }\n',
    )
    guest = Instance(build_guest([src], tmp_path / "ub.wasm", optimize="debug"))
    assert guest.call("inc", 41) == 42
    with pytest.raises(wasmtime.Trap, match="unreachable"):
        guest.call("inc", 2**31 - 1)  # signed overflow
