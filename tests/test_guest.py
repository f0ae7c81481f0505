"""Guest: loading, limits, fast calls, hostile guests."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import wasmtime

from wasmshare import Guest
from wasmshare.errors import AbiMismatch, GuestBusy, GuestError, GuestLimitExceeded, GuestTrap

GUESTS = Path(__file__).resolve().parent.parent / "guests"

ADD_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "add") (param i32 i32) (result i32) local.get 0 local.get 1 i32.add)
  (func (export "mix") (param i64 f32 f64) (result f64 i64)
    local.get 2 local.get 1 f64.promote_f32 f64.add local.get 0 i64.const 1 i64.add)
  (func (export "div") (param i32 i32) (result i32) local.get 0 local.get 1 i32.div_s)
  (func (export "nothing"))
)
"""


def test_load_from_wat_text_bytes_and_path(tmp_path: Path) -> None:
    wat_file = tmp_path / "adder.wat"
    wat_file.write_text(ADD_WAT)
    wasm_file = tmp_path / "adder.wasm"
    wasm_file.write_bytes(wasmtime.wat2wasm(ADD_WAT))
    for source in (ADD_WAT, ADD_WAT.encode(), wat_file, str(wasm_file), wasm_file.read_bytes()):
        with Guest(source) as g:
            assert g.call("add", 2, 40) == 42
    assert Guest(wat_file).name == "adder"


def test_fast_and_plain_paths_agree() -> None:
    g = Guest(ADD_WAT, name="adder")
    fast, slow = g.func("add"), g.func("add", fast=False)
    for a, b in [(1, 2), (-5, 3), (2**31 - 1, 1), (0, 0), (-(2**31), -1), (0xFFFFFFFF, 1)]:
        assert fast(a, b) == slow(a, b)
    mix_fast, mix_slow = g.func("mix"), g.func("mix", fast=False)
    assert mix_fast(41, 0.5, 2.0) == mix_slow(41, 0.5, 2.0) == (2.5, 42)
    assert g.call("nothing") is None and g.func("nothing", fast=False)() is None
    for f in (g.func("div"), g.func("div", fast=False)):
        with pytest.raises(GuestTrap, match="guest 'adder' trapped in div: integer divide by zero") as info:
            f(1, 0)
        assert info.value.trap_code == wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO
        assert info.value.guest == "adder"
    assert g.call("add", 1, 1) == 2  # usable after a trap


def test_bad_arguments_are_clear_errors() -> None:
    g = Guest(ADD_WAT, name="adder")
    with pytest.raises(GuestError, match="takes 2 wasm parameters"):
        g.call("add", 1)
    with pytest.raises(GuestError, match="argument 1 must be an int"):
        g.call("add", 1, "x")
    with pytest.raises(GuestError, match="does not fit i32"):
        g.call("add", 1, 2**40)
    with pytest.raises(GuestError, match="exports no function 'sub'.*add"):
        g.func("sub")


def test_malformed_modules() -> None:
    with pytest.raises(GuestError, match="neither a wasm binary nor valid WAT"):
        Guest(b"\x00\x01garbage")
    with pytest.raises(GuestError, match="invalid wasm module"):
        Guest(b"\0asm\x01\0\0\0\x01\xff\xff")  # truncated section
    with pytest.raises(GuestError, match="invalid wasm module: .*type mismatch"):
        Guest('(module (func (export "f") (result i32) i64.const 1))')
    with pytest.raises(GuestError, match="invalid WAT"):
        Guest('(module (func (export "f") (result i32) i32.konst 1))')
    with pytest.raises(GuestError, match="no module at"):
        Guest("/nonexistent/guest.wasm")


def test_missing_imports_named() -> None:
    wat = '(module (import "env" "tick" (func (param i32))) (import "env" "tock" (func)))'
    with pytest.raises(GuestError, match="needs imports the host does not provide: env.tick, env.tock"):
        Guest(wat)


def test_user_host_functions_and_their_failures() -> None:
    wat = """(module (import "env" "twice" (func $twice (param i32) (result i32)))
      (func (export "run") (param i32) (result i32) local.get 0 call $twice i32.const 1 i32.add))"""
    seen: list[int] = []

    def twice(x: int) -> int:
        seen.append(x)
        if x < 0:
            raise ValueError("negative input")
        return 2 * x

    g = Guest(wat, name="host", imports={("env", "twice"): twice})
    assert g.call("run", 20) == 41
    assert g.func("run", fast=False)(20) == 41
    with pytest.raises(GuestError, match="host function failed in run: ValueError"):
        g.call("run", -1)
    assert g.call("run", 1) == 3


def test_abi_version_checked() -> None:
    good = '(module (func (export "ws_abi_version") (result i32) i32.const 1))'
    Guest(good)
    bad = '(module (func (export "ws_abi_version") (result i32) i32.const 7))'
    with pytest.raises(AbiMismatch, match="built for wasmshare ABI v7; this host speaks v1"):
        Guest(bad, name="old")
    unversioned = '(module (import "wasmshare" "ws_release" (func (param i32) (result i32))))'
    with pytest.raises(AbiMismatch, match="does not export ws_abi_version"):
        Guest(unversioned)
    unknown = """(module (import "wasmshare" "ws_teleport" (func))
      (func (export "ws_abi_version") (result i32) i32.const 1))"""
    with pytest.raises(AbiMismatch, match="unknown wasmshare function 'ws_teleport'"):
        Guest(unknown)


def test_out_of_bounds_access_traps_and_guest_recovers() -> None:
    g = Guest(GUESTS / "hostile.wasm")
    with pytest.raises(GuestTrap, match="out of bounds memory access") as info:
        g.call("read_at", 1 << 30)
    assert info.value.trap_code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS
    g.call("write_at", 1024, 77)
    assert g.call("read_at", 1024) == 77


def test_infinite_loop_hits_deadline_and_guest_stays_usable() -> None:
    g = Guest(GUESTS / "hostile.wasm", name="spinner", deadline_ms=20, sequence=17)
    started = time.perf_counter()
    with pytest.raises(
        GuestLimitExceeded, match="guest 'spinner' seq 17: deadline 20 ms exceeded in spin"
    ) as info:
        g.call("spin")
    assert time.perf_counter() - started < 5  # stopped, not hung (generous: machines are shared)
    assert info.value.limit == "deadline" and info.value.sequence == 17
    assert info.value.trap_code == wasmtime.TrapCode.INTERRUPT
    g.call("write_at", 1024, 5)  # the deadline is per call: the next call gets a fresh one
    assert g.call("read_at", 1024) == 5
    with pytest.raises(GuestLimitExceeded):
        g.func("spin", fast=False)()


def test_infinite_loop_runs_out_of_fuel() -> None:
    g = Guest(GUESTS / "hostile.wasm", fuel=50_000)
    with pytest.raises(GuestLimitExceeded, match="fuel limit 50000 exhausted in spin") as info:
        g.call("spin")
    assert info.value.limit == "fuel"
    assert g.call("read_at", 0) is not None


def test_memory_bomb_stops_at_limit() -> None:
    limit = 4 << 20
    g = Guest(GUESTS / "hostile.wasm", name="bomb", memory_limit_bytes=limit)
    with pytest.raises(GuestLimitExceeded, match=f"guest 'bomb': memory limit {limit} bytes reached") as info:
        g.call("grow_forever")
    assert info.value.limit == "memory"
    assert g.memory_nbytes <= limit
    with pytest.raises(GuestLimitExceeded, match="exceeds the memory limit"):
        Guest('(module (memory (export "memory") 100))', memory_limit_bytes=1 << 20)
    with pytest.raises(GuestLimitExceeded, match="exceeds its memory limit"):
        g.grow_memory(1000)


def test_limits_are_checked() -> None:
    with pytest.raises(GuestError, match="deadline_ms must be a positive number"):
        Guest(ADD_WAT, deadline_ms=0)
    with pytest.raises(GuestError, match="fuel must be a positive int"):
        Guest(ADD_WAT, fuel=-1)
    with pytest.raises(GuestError, match="memory_limit_bytes must be a positive int"):
        Guest(ADD_WAT, memory_limit_bytes="big")  # type: ignore[arg-type]


def test_concurrent_use_from_two_threads_is_refused() -> None:
    g = Guest(GUESTS / "hostile.wasm", name="shared", deadline_ms=300)
    errors: list[BaseException] = []

    def spin() -> None:
        try:
            g.call("spin")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=spin)
    t.start()
    deadline = time.monotonic() + 5
    while g.running is False and time.monotonic() < deadline:
        time.sleep(0.001)
    with pytest.raises(GuestBusy, match="guest 'shared' is already running on another thread"):
        g.call("read_at", 0)
    with pytest.raises(GuestBusy):
        g.func("read_at", fast=False)(0)
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], GuestLimitExceeded)
    assert g.call("read_at", 0) is not None  # usable again once the other call ended


def test_separate_guests_run_in_parallel_threads() -> None:
    guests = [Guest(GUESTS / "calls.wasm") for _ in range(4)]
    results: list[int] = []

    def work(g: Guest) -> None:
        add = g.func("add")
        total = 0
        for _ in range(2000):
            total = add(total, 1)
        results.append(total)

    threads = [threading.Thread(target=work, args=(g,)) for g in guests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [2000] * 4


def test_closed_guest_refuses_calls() -> None:
    g = Guest(ADD_WAT, name="adder")
    add = g.func("add")
    g.close()
    g.close()
    assert g.closed
    with pytest.raises(GuestError, match="guest 'adder' is closed"):
        add(1, 2)
    with pytest.raises(GuestError, match="closed"):
        g.func("add")


def test_compiled_module_cache_on_disk(tmp_path: Path) -> None:
    from wasmshare import _engine

    wat = '(module (func (export "seven") (result i32) i32.const 7))'
    assert Guest(wat, cache_dir=tmp_path).call("seven") == 7
    artifacts = list((tmp_path / "modules").glob("*.cwasm"))
    assert len(artifacts) == 1
    # A fresh process state: forget the in-memory cache; the artifact is deserialized.
    _engine._memory_modules.clear()
    assert Guest(wat, cache_dir=tmp_path).call("seven") == 7
    # A corrupt artifact is recompiled and replaced, never fatal. (Replace the file rather
    # than truncate it: live modules map the old artifact's pages.)
    corrupt = tmp_path / "corrupt.tmp"
    corrupt.write_bytes(b"corrupt")
    os.replace(corrupt, artifacts[0])
    _engine._memory_modules.clear()
    assert Guest(wat, cache_dir=tmp_path).call("seven") == 7
    assert artifacts[0].read_bytes() != b"corrupt"


def test_guest_traps_survive_a_library_that_takes_over_sigsegv() -> None:
    """A library installing its own SIGSEGV handler inside preserve_fault_handlers() leaves traps working."""
    import ctypes
    import signal

    from wasmshare._libc import preserve_fault_handlers

    libc = ctypes.CDLL(None)
    g = Guest(GUESTS / "hostile.wasm")
    with preserve_fault_handlers():
        # What tvm-ffi does on import: replace the handler (here with SIG_DFL, which would kill us).
        libc.signal(signal.SIGSEGV, ctypes.c_void_p(0))
    with pytest.raises(GuestTrap, match="out of bounds"):
        g.call("read_at", 1 << 30)


@pytest.mark.parametrize(
    ("deadline_ms", "tick_ms", "ticks"),
    [
        (5, 1, 6),
        (19.5, 1, 21),
        (20, 2, 11),
        (49, 2, 26),
        (50, 5, 11),
        (100, 10, 11),
        (60_000, 10, 6001),
    ],
)
def test_epoch_tick_follows_the_deadline(deadline_ms: float, tick_ms: int, ticks: int) -> None:
    """A tenth of the deadline in steps of 1/2/5/10 ms; enough ticks that the whole deadline passes first."""
    from wasmshare import _engine

    assert _engine.tick_ms_for(deadline_ms) == tick_ms
    assert _engine.deadline_ticks(deadline_ms, tick_ms) == ticks
    assert (ticks - 1) * tick_ms >= deadline_ms
    g = Guest(ADD_WAT, deadline_ms=deadline_ms)
    try:
        assert g._options.tick_ms == tick_ms and g._deadline_ticks == ticks
    finally:
        g.close()
