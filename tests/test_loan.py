"""Loans: regions mapped into guest memory, shared with numpy and other processes."""

from __future__ import annotations

import math
import socket
import subprocess
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import wasmtime

from conftest import PYTHON, child_env
from wasmshare import Guest, Region
from wasmshare.errors import GuestError, GuestTrap, LoanError, LoanRevoked
from wasmshare.loan import LoanState

GUESTS = Path(__file__).resolve().parent.parent / "guests"
V = 32 * 1024


@pytest.fixture
def bias() -> Guest:
    return Guest(GUESTS / "bias.wasm")


@pytest.fixture
def hostile() -> Guest:
    return Guest(GUESTS / "hostile.wasm")


def test_guest_writes_f32_list_in_place_numpy_sees_it_without_copy(bias: Guest) -> None:
    region = Region.create(V * 4)
    loan = bias.lend(region, "rw", dtype=np.float32)
    view = region.array(np.float32)
    assert loan.zero_copy
    written = bias.call("bias_update", loan, 3)
    assert written == 64
    idx = [(3 * 7919 + i * 104729) % V for i in range(64)]
    expected = np.zeros(V, np.float32)
    expected[idx] = [(3 + i) * 0.5 for i in range(64)]
    np.testing.assert_array_equal(view, expected)
    # The guest's pointer, the loan's view and the region's view are one set of pages.
    assert np.shares_memory(loan.array(np.float32), view)
    host_address = bias.memory_address + loan.ptr
    assert bias.read_memory(loan.ptr, 16) == view[:4].tobytes()
    bias.bytes_copied = 0
    view[:] = 2.0  # host writes reach the guest with no copy
    bias.call("scale_f32", loan, 1.5)
    assert bias.call("sum_f32", loan) == pytest.approx(3.0 * V)
    assert bias.bytes_copied == 0
    assert host_address == bias.memory_address + loan.ptr  # memory never moved


def test_loan_survives_guest_memory_growth(bias: Guest) -> None:
    region = Region.create(V * 4)
    loan = bias.lend(region, "rw", dtype=np.float32)
    region.array(np.float32)[:] = 1.0
    base = bias.memory_address
    bias.grow_memory(10)
    assert bias.call("own_buffer", 8 << 20) != 0  # the guest grows its own memory too
    assert bias.memory_address == base
    assert bias.call("sum_f32", loan) == pytest.approx(V)


def test_loan_slices_pass_typed_subranges(bias: Guest) -> None:
    region = Region.create(V * 4)
    loan = bias.lend(region, "rw")
    region.array(np.float32)[:] = 1.0
    part = loan.slice(np.float32, start=100, count=50)
    bias.call("scale_f32", part, 4.0)
    view = region.array(np.float32)
    assert view[100:150].tolist() == [4.0] * 50 and view[99] == 1.0 and view[150] == 1.0
    with pytest.raises(LoanError, match="outside"):
        loan.slice(np.float32, start=V - 1, count=2)


def _spawn(script: str, *, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PYTHON, "-c", textwrap.dedent(script)],
        env=child_env(),
        pass_fds=pass_fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_process_by_name_sees_guest_writes_and_its_writes_reach_the_guest(bias: Guest) -> None:
    name = f"wasmshare-test-{uuid.uuid4().hex[:12]}"
    with Region.create(V * 4, name=name) as region:
        loan = bias.lend(region, "rw", dtype=np.float32)
        bias.call("bias_update", loan, 5)
        expected_sum = bias.call("sum_f32", loan)
        child = _spawn(
            f"""
            import numpy as np
            from wasmshare import Region, Guest
            r = Region.open({name!r})
            a = r.array(np.float32)
            print(float(a.sum()))
            a[:] = 0.25          # written by this process straight into the pages
            g = Guest({str(GUESTS / "bias.wasm")!r})
            loan = g.lend(r, 'ro', dtype=np.float32)   # and lent to a guest here as well
            print(g.call('sum_f32', loan))
            """
        )
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        child_sum, child_guest_sum = (float(x) for x in out.split())
        assert child_sum == pytest.approx(expected_sum)
        assert child_guest_sum == pytest.approx(0.25 * V)
        assert bias.call("sum_f32", loan) == pytest.approx(0.25 * V)


def test_second_process_by_fd_over_unix_socket(bias: Guest) -> None:
    region = Region.create(V * 4)
    loan = bias.lend(region, "rw", dtype=np.float32)
    bias.call("bias_update", loan, 9)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = _spawn(
        f"""
        import socket, numpy as np
        from wasmshare import Region
        s = socket.socket(fileno={child_sock.fileno()})
        r = Region.receive(s)
        a = r.array(np.float32)
        print(int(np.count_nonzero(a)), float(a.sum()))
        a[7] = 1234.5
        s.sendall(b"done")
        """,
        pass_fds=(child_sock.fileno(),),
    )
    region.send(parent_sock)
    child_sock.close()
    assert parent_sock.recv(4) == b"done"
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    count, total = out.split()
    assert int(count) == 64
    assert float(total) == pytest.approx(float(region.array(np.float32).sum()) - 1234.5)
    assert bias.read_memory(loan.ptr + 7 * 4, 4) == np.float32(1234.5).tobytes()
    parent_sock.close()


def test_read_only_loan_traps_guest_write_others_carry_on(hostile: Guest, bias: Guest) -> None:
    region = Region.create(V * 4)
    region.array(np.float32)[:] = 1.0
    ro = hostile.lend(region, "ro")
    rw = bias.lend(region, "rw", dtype=np.float32)
    assert hostile.call("read_at", ro.ptr) == np.float32(1.0).view(np.int32)
    with pytest.raises(GuestTrap, match=r"write to read-only loan \[0x[0-9a-f]+, 0x[0-9a-f]+\)") as info:
        hostile.call("write_at", ro.ptr + 8, 99)
    assert info.value.trap_code == wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS
    # Contents intact; the host, the same guest and another guest carry on.
    assert np.all(region.array(np.float32) == 1.0)
    assert hostile.call("read_at", ro.ptr + 8) == np.float32(1.0).view(np.int32)
    assert bias.call("sum_f32", rw) == pytest.approx(V)
    hostile.call("write_at", 1024, 1)  # its own memory is still writable


def test_trap_halfway_through_writing_leaves_other_data_intact(hostile: Guest) -> None:
    region = Region.create(V * 4)
    loan = hostile.lend(region, "rw", dtype=np.float32)
    with pytest.raises(GuestTrap, match="fill_then_trap"):
        hostile.call("fill_then_trap", loan, 100)
    view = region.array(np.float32)
    assert view[:100].tolist() == [1.0] * 100 and not view[100:].any()


def test_revoked_loan_traps_then_can_be_restored(hostile: Guest) -> None:
    region = Region.create(V * 4)
    region.array(np.int32)[:] = 7
    loan = hostile.lend(region, "rw")
    loan.revoke()
    assert loan.state is LoanState.REVOKED and loan.access == "none"
    for call in (("read_at", loan.ptr), ("write_at", loan.ptr, 1)):
        with pytest.raises(GuestTrap, match="access to revoked loan"):
            hostile.call(*call)
    assert np.all(region.array(np.int32) == 7)  # the host still reads and writes
    loan.protect("rw")
    hostile.call("write_at", loan.ptr, 8)
    assert region.array(np.int32)[0] == 8
    loan.protect("ro")
    with pytest.raises(GuestTrap, match="write to read-only loan"):
        hostile.call("write_at", loan.ptr, 9)


def test_loan_outside_reachable_memory_is_refused(hostile: Guest) -> None:
    region = Region.create(V * 4)
    end = hostile.memory_nbytes
    with pytest.raises(LoanError, match="outside guest 'hostile''s reachable memory"):
        hostile.lend(region, "rw", at=end)
    with pytest.raises(LoanError, match="outside"):
        hostile.lend(region, "rw", at=end - 65536)  # starts inside but runs past the end
    with pytest.raises(LoanError, match="not a positive multiple of the page size"):
        hostile.lend(region, "rw", at=12345)
    assert hostile.memory_nbytes == end  # nothing was mapped or grown


def test_explicit_placement_overlap_and_release(hostile: Guest) -> None:
    region = Region.create(65536)
    hostile.grow_memory(4)
    at = hostile.memory_nbytes - 4 * 65536
    first = hostile.lend(region, "rw", at=at)
    with pytest.raises(LoanError, match="overlaps read-write loan"):
        hostile.lend(region, "ro", at=at + 65536 // 2)
    second = hostile.lend(region, "ro", at=at + 2 * 65536)
    hostile.call("write_at", first.ptr, 42)
    assert hostile.call("read_at", second.ptr) == 42  # two windows, one set of pages
    first.close()
    hostile.call("write_at", at, 5)  # an explicit window gets its own (zeroed) pages back
    assert hostile.call("read_at", at) == 5 and region.array(np.int32)[0] == 42


def test_guest_allocated_block_placement() -> None:
    g = Guest(GUESTS / "offer.wasm")
    region = Region.from_bytes(bytes(range(256)) * 1024)
    loan = g.lend(region, "ro", at="alloc")
    assert loan.ptr % 65536 == 0
    assert g.call("checksum_u8", loan) == sum(range(256)) * 1024 & 0xFFFFFFFF
    loan.close()
    again = g.lend(region, "ro", at="alloc")
    assert g.call("checksum_u8", again) == sum(range(256)) * 1024 & 0xFFFFFFFF
    with pytest.raises(LoanError, match="does not export ws_loan_alloc"):
        Guest(GUESTS / "calls.wasm").lend(region, "ro", at="alloc")


def test_sealed_region_cannot_be_lent_read_write(hostile: Guest) -> None:
    region = Region.from_bytes(b"x" * 10000)
    with pytest.raises(LoanError, match="lend it with access='ro'"):
        hostile.lend(region, "rw")
    loan = hostile.lend(region, "ro")
    with pytest.raises(LoanError, match="read-only"):
        loan.protect("rw")
    with pytest.raises(GuestTrap):
        hostile.call("write_at", loan.ptr, 1)


def test_closing_region_revokes_its_loans(hostile: Guest, bias: Guest) -> None:
    region = Region.create(V * 4)
    region.array(np.int32)[:] = 3
    a = hostile.lend(region, "rw")
    b = bias.lend(region, "ro", dtype=np.float32)
    region.close()
    assert a.closed and b.closed
    with pytest.raises(GuestTrap, match="out of bounds"):
        hostile.call("read_at", a.ptr)
    with pytest.raises(LoanRevoked):
        a.array()
    with pytest.raises(LoanError, match="closed region"):
        hostile.lend(region, "rw")
    assert hostile.loans == () and bias.loans == ()


def test_released_grown_window_is_reused(hostile: Guest) -> None:
    region = Region.create(V * 4)
    first = hostile.lend(region, "rw")
    size = hostile.memory_nbytes
    first.close()
    second = hostile.lend(region, "rw")
    assert second.ptr == first.ptr and hostile.memory_nbytes == size


def test_loan_context_manager_bounds_a_borrow(hostile: Guest) -> None:
    region = Region.create(4096)
    with hostile.lend(region, "rw") as loan:
        hostile.call("write_at", loan.ptr, 11)
    assert loan.closed and region.array(np.int32)[0] == 11
    with pytest.raises(GuestTrap):
        hostile.call("read_at", loan.ptr)


def test_loan_size_and_access_errors(hostile: Guest) -> None:
    region = Region.create(8192)
    with pytest.raises(LoanError, match="does not fit"):
        hostile.lend(region, "rw", nbytes=10_000)
    with pytest.raises(LoanError, match="multiple of the page size"):
        hostile.lend(region, "rw", offset=100)
    with pytest.raises(LoanError, match="access must be"):
        hostile.lend(region, "wr")  # type: ignore[arg-type]
    no_memory = Guest('(module (func (export "f")))', name="nomem")
    with pytest.raises(LoanError, match="exports no memory"):
        no_memory.lend(region)


def test_loans_past_the_memory_limit_are_refused() -> None:
    g = Guest(GUESTS / "hostile.wasm", memory_limit_bytes=2 << 20)
    with pytest.raises(LoanError, match="no room for a"):
        g.lend(Region.create(4 << 20), "rw")


def test_host_function_loan_borrow_and_release() -> None:
    g = Guest(GUESTS / "borrow_sum.wasm")
    region = Region.create(V * 4)
    region.array(np.float32)[:] = 0.5
    handle = g.offer(region, "rw")
    assert g.call("borrow_sum", handle) == pytest.approx(0.5 * V)
    assert g.call("borrow_fill", handle, 2.0) == V
    assert np.all(region.array(np.float32) == 2.0)
    # Between calls the borrowed window is inaccessible.
    (loan,) = g.loans
    assert loan.access == "none"
    assert math.isnan(g.call("borrow_sum", 999))  # a bad handle: ws_borrow returned 0
    ro_handle = g.offer(Region.from_bytes(np.full(16, 1.0, np.float32).tobytes()), "ro")
    assert g.call("borrow_sum", ro_handle) == pytest.approx(16.0)
    assert g.call("borrow_fill", ro_handle, 1.0) < 0  # read-write borrow of a read-only offer refused
    g.withdraw(handle)
    with pytest.raises(LoanError, match="no region offered under handle"):
        g.withdraw(handle)
    with pytest.raises(LoanError, match="cannot offer read-only region"):
        g.offer(Region.from_bytes(b"abc"), "rw")


def test_closing_guest_releases_loans_and_region_stays_usable() -> None:
    region = Region.create(V * 4)
    g = Guest(GUESTS / "bias.wasm")
    loan = g.lend(region, "rw", dtype=np.float32)
    g.call("bias_update", loan, 1)
    before = region.array(np.float32).copy()
    g.close()
    assert loan.closed
    np.testing.assert_array_equal(region.array(np.float32), before)
    region.close()


def test_copy_fallback_gives_the_same_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import wasmshare.loan as loan_module

    monkeypatch.setenv("WASMSHARE_FORCE_COPY", "1")
    monkeypatch.setattr(loan_module, "_warned_copy", False)
    g = Guest(GUESTS / "bias.wasm")
    region = Region.create(V * 4)
    with pytest.warns(RuntimeWarning, match="zero-copy loans need Linux"):
        loan = g.lend(region, "rw", dtype=np.float32)
    assert not loan.zero_copy
    g.call("bias_update", loan, 3)
    zero_copy_result = Region.create(V * 4)
    monkeypatch.setenv("WASMSHARE_FORCE_COPY", "0")
    g2 = Guest(GUESTS / "bias.wasm")
    g2.call("bias_update", g2.lend(zero_copy_result, "rw", dtype=np.float32), 3)
    np.testing.assert_array_equal(region.array(np.float32), zero_copy_result.array(np.float32))
    assert g.bytes_copied > 0 and g2.bytes_copied == 0


def test_closed_guest_loans_refuse_use() -> None:
    g = Guest(GUESTS / "hostile.wasm", name="gone")
    loan = g.lend(Region.create(4096))
    g.close()
    with pytest.raises(LoanRevoked):
        loan.as_param()
    with pytest.raises(GuestError, match="closed"):
        g.lend(Region.create(4096))


def test_hostile_guests_leave_the_shared_region_intact() -> None:
    """Every misbehaviour ends in that guest's own exception; the data and other guests carry on."""
    region = Region.create(V * 4)
    pattern = np.arange(V, dtype=np.float32)
    region.array(np.float32)[:] = pattern
    witness = Guest(GUESTS / "bias.wasm", name="witness")
    witness_loan = witness.lend(region, "ro", dtype=np.float32)
    expected_sum = witness.call("sum_f32", witness_loan)

    attacker = Guest(GUESTS / "hostile.wasm", name="attacker", deadline_ms=20, memory_limit_bytes=8 << 20)
    loan = attacker.lend(region, "ro", dtype=np.float32)
    attacks = [
        (("write_at", loan.ptr + 40, -1), GuestTrap),  # write to a read-only loan
        (("read_at", 0x7FFF0000), GuestTrap),  # out of bounds
        (("fill_then_trap", loan, 10), GuestTrap),  # writes into read-only pages
        (("spin",), GuestTrap),  # deadline
        (("grow_forever",), GuestTrap),  # memory bomb
    ]
    for call, error in attacks:
        with pytest.raises(error):
            attacker.call(*call)
        np.testing.assert_array_equal(region.array(np.float32), pattern)
        assert witness.call("sum_f32", witness_loan) == expected_sum


def test_plain_binding_accepts_loans_too(bias: Guest) -> None:
    region = Region.create(V * 4)
    loan = bias.lend(region, "rw", dtype=np.float32)
    slow = bias.func("bias_update", fast=False)
    assert slow(loan, 4) == bias.call("bias_update", loan, 4) == 64
    assert bias.func("sum_f32", fast=False)(loan) == bias.call("sum_f32", loan)
