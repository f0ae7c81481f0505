"""Tests for wasmshare.region.Region: real mappings, real processes, real fd passing."""

from __future__ import annotations

import gc
import mmap
import os
import secrets
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import child_env
from wasmshare.errors import RegionError
from wasmshare.region import Region

IS_LINUX = sys.platform.startswith("linux")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
linux_only = pytest.mark.skipif(not IS_LINUX, reason="memfd and sealing are Linux only")


def run_child(code: str, *, pass_fds: tuple[int, ...] = ()) -> str:
    """Run ``code`` in a fresh Python process that can import wasmshare; return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=child_env(),  # keeps the caller's PYTHONPATH (dependencies installed outside the venv)
        pass_fds=pass_fds,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def shm_name() -> Iterator[str]:
    name = f"wasmshare-test-{os.getpid()}-{secrets.token_hex(4)}"
    yield name
    try:
        import _posixshmem

        _posixshmem.shm_unlink("/" + name)
    except OSError:
        pass


class DummyLoan:
    def __init__(self, access: str = "rw") -> None:
        self.access = access
        self.closed_calls = 0

    def _on_region_closed(self) -> None:
        self.closed_calls += 1


# --- memfd basics -----------------------------------------------------------------


def test_create_memfd_views_share_memory() -> None:
    with Region.create(10_000) as r:
        assert r.kind == ("memfd" if IS_LINUX else "shm")
        assert r.nbytes == 10_000
        assert r.mapped_nbytes % mmap.PAGESIZE == 0 and r.mapped_nbytes >= 10_000
        assert os.fstat(r.fd).st_size == r.mapped_nbytes
        assert r.access == "rw" and r.writable and not r.sealed and not r.closed
        f = r.array(np.float32)
        b = r.array(np.uint8)
        assert f.shape == (2500,) and b.shape == (10_000,)
        assert not b.any(), "new regions are zero-filled"
        f[:4] = [1.0, 2.0, -3.5, 1e9]
        np.testing.assert_array_equal(b[:16].view(np.float32), f[:4])
        assert b[:16].tobytes() == np.array([1.0, 2.0, -3.5, 1e9], np.float32).tobytes()
        assert np.shares_memory(f, b)
        assert f.__array_interface__["data"][0] == r.address == b.ctypes.data


def test_array_shape_offset_and_readonly_flag() -> None:
    with Region.create(4096) as r:
        m = r.array(np.int32, (4, 8), offset=64)
        assert m.shape == (4, 8) and m.flags.writeable
        m[1, 2] = 7
        assert r.array(np.int32)[16 + 8 + 2] == 7
        assert r.array("u1", 3, offset=4095 - 2).shape == (3,)


def test_array_errors() -> None:
    with Region.create(100) as r:
        with pytest.raises(RegionError, match="not aligned to dtype float32 itemsize 4"):
            r.array(np.float32, offset=2)
        with pytest.raises(RegionError, match="outside the region"):
            r.array(np.uint8, offset=101)
        with pytest.raises(RegionError, match="outside the region"):
            r.array(np.uint8, offset=-1)
        with pytest.raises(RegionError, match=r"needs 104 bytes, but only 100"):
            r.array(np.float64, 13)
        with pytest.raises(RegionError, match="no whole"):
            r.array(np.float64, offset=96)
        with pytest.raises(RegionError, match=">= 0"):
            r.array(np.uint8, (-1,))
        with pytest.raises(RegionError, match="invalid numpy dtype"):
            r.array("not-a-dtype")


@pytest.mark.parametrize(
    ("nbytes", "match"),
    [
        (0, "must be > 0"),
        (-5, "must be > 0"),
        (1.5, "must be an int"),
        ("10", "must be an int"),
        (True, "must be an int"),
        (4 * 2**30 + 1, "wasm32 guest cannot address more than 4 GiB"),
    ],
)
def test_create_bad_size(nbytes: Any, match: str) -> None:
    with pytest.raises(RegionError, match=match):
        Region.create(nbytes)


# --- named POSIX shm ----------------------------------------------------------------


def test_named_shm_shared_with_other_process(shm_name: str) -> None:
    r = Region.create(5000, name=shm_name)
    assert r.kind == "shm" and r.name == shm_name
    r.array(np.uint8)[:5] = list(b"hello")
    out = run_child(
        f"""
        import numpy as np
        from wasmshare.region import Region
        with Region.open({shm_name!r}) as r:
            a = r.array(np.uint8)
            print(bytes(a[:5]).decode(), r.nbytes)
            a[5:10] = list(b"world")
        """
    )
    got, size = out.split()
    assert got == "hello"
    assert int(size) == r.mapped_nbytes  # an opener sees the whole-page size
    assert bytes(r.array(np.uint8)[:10]) == b"helloworld"
    # A non-owning opener does not unlink; the owner does.
    with Region.open("/" + shm_name, access="ro") as o:
        assert o.access == "ro" and not o.writable
        assert not o.array().flags.writeable
    r.close()
    with pytest.raises(RegionError, match="no shared memory object named"):
        Region.open(shm_name)


def test_named_shm_exclusive_and_unlink(shm_name: str) -> None:
    with Region.create(100, name=shm_name) as r:
        with pytest.raises(RegionError, match="already exists"):
            Region.create(100, name=shm_name)
        other = Region.open(shm_name)
        r.unlink()
        with pytest.raises(RegionError, match="no shared memory object named"):
            Region.open(shm_name)
        with pytest.raises(RegionError, match="already unlinked"):
            other.unlink()
        # Mappings survive the unlink.
        r.array()[0] = 42
        assert other.array()[0] == 42
        other.close()
    # The owner does not unlink again (nothing else may own the name now).
    Region.create(100, name=shm_name).close()


@pytest.mark.parametrize("bad", ["", "a/b", "//x", "sp ace", "é", "a" * 201, ".", "/..", "x\x00"])
def test_bad_shm_names(bad: str) -> None:
    with pytest.raises(RegionError, match=r"invalid shared memory name.*A-Za-z0-9\._-"):
        Region.create(10, name=bad)
    with pytest.raises(RegionError, match="invalid shared memory name"):
        Region.open(bad)


def test_open_missing_name() -> None:
    with pytest.raises(RegionError, match="no shared memory object named '/wasmshare-missing-"):
        Region.open(f"wasmshare-missing-{secrets.token_hex(6)}")


def test_unlink_needs_named_shm() -> None:
    with Region.create(10) as r:
        with pytest.raises(RegionError, match="needs a named shm region"):
            r.unlink()


# --- fd passing over Unix sockets -----------------------------------------------------


def test_fd_handoff_to_child_process() -> None:
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent_sock, child_sock, Region.create(8192) as r:
        r.array(np.float32)[:3] = [1.5, 2.5, 3.5]
        r.send(parent_sock)
        out = run_child(
            f"""
            import socket
            import numpy as np
            from wasmshare.region import Region
            s = socket.socket(fileno={child_sock.fileno()})
            with Region.receive(s) as r:
                a = r.array(np.float32)
                print(r.nbytes, r.kind, r.access, float(a[:3].sum()))
                a[3] = 99.0
            """,
            pass_fds=(child_sock.fileno(),),
        )
        nbytes, kind, access, total = out.split()
        assert (int(nbytes), kind, access, float(total)) == (8192, r.kind, "rw", 7.5)
        assert r.array(np.float32)[3] == 99.0


def test_receive_in_same_process_and_two_in_a_row() -> None:
    a, b = socket.socketpair()
    with a, b, Region.create(100) as r1, Region.from_bytes(b"xyz") as r2:
        r1.send(a)
        r2.send(a)
        with Region.receive(b) as g1, Region.receive(b) as g2:
            assert g1.nbytes == 100 and g1.writable
            g1.array()[0] = 5
            assert r1.array()[0] == 5
            assert g2.nbytes == 3 and bytes(g2.array()) == b"xyz"
            assert g2.sealed == r2.sealed


def test_receive_errors() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"hello, no fd here")
        with pytest.raises(RegionError, match="expected exactly 1 fd"):
            Region.receive(b)
        with Region.create(10) as r:
            socket.send_fds(a, [b"GARBAGE-GARBAGE"], [r.fd])
            before = len(os.listdir("/proc/self/fd")) if IS_LINUX else 0
            with pytest.raises(RegionError, match="garbage"):
                Region.receive(b)
            if IS_LINUX:
                assert len(os.listdir("/proc/self/fd")) == before, "received fd must be closed"
            socket.send_fds(a, [b"WSRG\x00\x00\x00\x05{bad}"], [r.fd])
            with pytest.raises(RegionError, match="malformed"):
                Region.receive(b)
        a.close()
        with pytest.raises(RegionError, match="peer closed the socket"):
            Region.receive(b)


# --- sealing ------------------------------------------------------------------------


@linux_only
def test_from_bytes_sealed() -> None:
    payload = bytes(range(256)) * 20  # 5120 bytes: not a page multiple
    with Region.from_bytes(payload) as r:
        assert r.sealed and r.access == "ro" and not r.writable and r.kind == "memfd"
        assert r.nbytes == len(payload) and r.mapped_nbytes % mmap.PAGESIZE == 0
        a = r.array()
        assert bytes(a) == payload
        assert not a.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            a[0] = 1
        with pytest.raises(PermissionError):
            mmap.mmap(r.fd, r.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(PermissionError):
            os.pwrite(r.fd, b"x", 0)
        with pytest.raises(RegionError, match="sealed read-only"):
            Region.from_fd(os.dup(r.fd), access="rw")

        parent_sock, child_sock = socket.socketpair()
        with parent_sock, child_sock:
            r.send(parent_sock)
            out = run_child(
                f"""
                import mmap, socket
                from wasmshare.region import Region
                s = socket.socket(fileno={child_sock.fileno()})
                r = Region.receive(s)
                try:
                    mmap.mmap(r.fd, r.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
                    w = "writable"
                except PermissionError:
                    w = "denied"
                print(r.sealed, r.access, w, bytes(r.array()[:4]).hex())
                r.close()
                """,
                pass_fds=(child_sock.fileno(),),
            )
        assert out.split() == ["True", "ro", "denied", payload[:4].hex()]


def test_from_bytes_unsealed_and_bad_input() -> None:
    with Region.from_bytes(bytearray(b"abc"), seal=False) as r:
        assert not r.sealed and r.writable
        r.array()[0] = ord("z")
        assert bytes(r.array()) == b"zbc"
    strided = memoryview(bytes(range(10)))[::2]
    with Region.from_bytes(strided) as r:
        assert bytes(r.array()) == bytes([0, 2, 4, 6, 8])
    with pytest.raises(RegionError, match="len\\(data\\) must be > 0"):
        Region.from_bytes(b"")
    with pytest.raises(RegionError, match="bytes-like"):
        Region.from_bytes("text")  # type: ignore[arg-type]


@linux_only
def test_seal_refused_while_writable_view_alive() -> None:
    r = Region.create(4096)
    v = r.array(np.float32)
    v[0] = 3.0
    with pytest.raises(RegionError, match="still view its writable mapping"):
        r.seal()
    assert r.writable and not r.sealed
    v[1] = 4.0  # mapping untouched by the refused seal
    del v
    r.seal()
    assert r.sealed and r.access == "ro" and not r.writable
    a = r.array(np.float32)
    assert list(a[:2]) == [3.0, 4.0] and not a.flags.writeable
    assert a.ctypes.data == r.address  # the new read-only mapping
    r.seal()  # idempotent
    r.close()


@linux_only
def test_seal_refused_with_writable_loan() -> None:
    with Region.create(100) as r:
        loan = DummyLoan("rw")
        r._attach_loan(loan)
        with pytest.raises(RegionError, match="1 writable loan"):
            r.seal()
        r._detach_loan(loan)
        r._attach_loan(DummyLoan("ro"))
        r.seal()
        assert r.sealed


@linux_only
def test_seal_refused_while_other_writable_mapping() -> None:
    with Region.create(4096) as r:
        other = mmap.mmap(r.fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        with pytest.raises(RegionError, match="another shared mapping of its read-write fd"):
            r.seal()
        assert r.writable
        r.array()[0] = 1  # remapped read-write after the failed seal
        other.close()
        r.seal()
        assert r.sealed


@linux_only
def test_seal_refused_while_read_only_shared_mapping() -> None:
    # Linux counts a PROT_READ MAP_SHARED mapping of a read-write fd as possibly writable.
    with Region.create(4096) as r:
        other = mmap.mmap(r.fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        with pytest.raises(RegionError, match="even for mappings made with PROT_READ"):
            r.seal()
        other.close()
        r.seal()
        assert r.sealed


def test_seal_needs_memfd(shm_name: str, tmp_path: Path) -> None:
    p = tmp_path / "f.bin"
    p.write_bytes(b"data")
    with Region.create(10, name=shm_name) as r, Region.from_file(p) as f:
        with pytest.raises(RegionError, match="needs a Linux memfd region"):
            r.seal()
        with pytest.raises(RegionError, match="needs a Linux memfd region"):
            f.seal()


# --- files --------------------------------------------------------------------------


def test_from_file_ro_odd_size(tmp_path: Path) -> None:
    data = os.urandom(mmap.PAGESIZE + 123)
    p = tmp_path / "weights.bin"
    p.write_bytes(data)
    with Region.from_file(p) as r:
        assert r.kind == "file" and r.name == str(p) and r.access == "ro"
        assert r.nbytes == len(data) and r.mapped_nbytes == 2 * mmap.PAGESIZE
        a = r.array()
        assert bytes(a) == data and not a.flags.writeable
        assert bytes(r.array(np.uint8, 10, offset=mmap.PAGESIZE + 113)) == data[-10:]
    assert p.read_bytes() == data  # the file is not resized


def test_from_file_rw_writes_reach_file(tmp_path: Path) -> None:
    p = tmp_path / "rw.bin"
    p.write_bytes(b"\x00" * 10)
    with Region.from_file(p, access="rw") as r:
        r.array()[:3] = list(b"abc")
    assert p.read_bytes() == b"abc" + b"\x00" * 7


def test_from_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.bin"
    with pytest.raises(RegionError, match=r"cannot open file .*missing\.bin.*No such file"):
        Region.from_file(missing)
    with pytest.raises(RegionError, match="it is a directory"):
        Region.from_file(tmp_path)
    with pytest.raises(RegionError, match="Is a directory|it is a directory"):
        Region.from_file(tmp_path, access="rw")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(RegionError, match=r"empty\.bin.*it is empty"):
        Region.from_file(empty)
    with pytest.raises(RegionError, match="access must be 'rw' or 'ro'"):
        Region.from_file(empty, access="wr")  # type: ignore[arg-type]


@pytest.mark.skipif(IS_ROOT, reason="root bypasses file permission bits")
def test_from_file_permissions(tmp_path: Path) -> None:
    p = tmp_path / "locked.bin"
    p.write_bytes(b"secret")
    p.chmod(0o444)
    with pytest.raises(RegionError, match=r"locked\.bin.*Permission denied"):
        Region.from_file(p, access="rw")
    p.chmod(0o000)
    with pytest.raises(RegionError, match=r"locked\.bin.*Permission denied"):
        Region.from_file(p)
    p.chmod(0o644)


# --- from_fd --------------------------------------------------------------------------


def test_from_fd(tmp_path: Path) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(b"0123456789")
    fd = os.open(p, os.O_RDONLY)
    with pytest.raises(RegionError, match="open read-only.*access='ro'"):
        Region.from_fd(fd, access="rw", kind="file")
    with pytest.raises(RegionError, match="past the end"):
        Region.from_fd(fd, access="ro", nbytes=11, kind="file")
    os.fstat(fd)  # a failed from_fd leaves the fd to the caller
    r = Region.from_fd(fd, access="ro", nbytes=4, kind="file")
    assert r.fd == fd and bytes(r.array()) == b"0123"
    r.close()
    with pytest.raises(OSError):
        os.fstat(fd)  # the Region owned it and closed it
    with pytest.raises(RegionError, match="not usable"):
        Region.from_fd(fd)
    with pytest.raises(RegionError, match="non-negative int"):
        Region.from_fd(-1)
    rp, wp = os.pipe()
    try:
        with pytest.raises(RegionError, match="not a regular file"):
            Region.from_fd(rp, access="ro")
    finally:
        os.close(rp)
        os.close(wp)


# --- lifetime -----------------------------------------------------------------------


def test_use_after_close_and_close_twice() -> None:
    r = Region.create(64)
    sock_a, sock_b = socket.socketpair()
    r.close()
    r.close()
    assert r.closed
    for call in (
        lambda: r.fd,
        lambda: r.address,
        lambda: r.array(),
        lambda: r.seal(),
        lambda: r.unlink(),
        lambda: r.send(sock_a),
        lambda: r._attach_loan(DummyLoan()),
    ):
        with pytest.raises(RegionError, match="region memfd is closed|region shm is closed"):
            call()
    assert r.nbytes == 64 and "closed" in repr(r)
    sock_a.close()
    sock_b.close()


def test_closed_message_names_shm(shm_name: str) -> None:
    r = Region.create(64, name=shm_name)
    r.close()
    with pytest.raises(RegionError, match=f"region {shm_name} is closed"):
        r.array()


def test_views_survive_close() -> None:
    r = Region.create(3 * mmap.PAGESIZE)
    a = r.array(np.int64)
    a[:] = np.arange(a.size)
    r.close()
    gc.collect()
    assert int(a.sum()) == int(np.arange(a.size).sum())
    a[0] = 17  # still our own pages; never dangling
    assert a[0] == 17


def test_context_manager_closes(shm_name: str) -> None:
    with Region.create(10, name=shm_name) as r:
        fd = r.fd
        assert "open" in repr(r) and shm_name in repr(r)
    assert r.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(RegionError, match="no shared memory object"):
        Region.open(shm_name)


def test_garbage_collection_releases_owned_name(shm_name: str) -> None:
    r = Region.create(10, name=shm_name)
    fd = r.fd
    del r
    gc.collect()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(RegionError, match="no shared memory object"):
        Region.open(shm_name)


def test_private_constructor() -> None:
    with pytest.raises(RegionError, match="Region.create"):
        Region()


# --- loans ----------------------------------------------------------------------------


def test_close_revokes_attached_loans() -> None:
    r = Region.create(100)
    loans = [DummyLoan(), DummyLoan("ro")]
    for ln in loans:
        r._attach_loan(ln)
    gone = DummyLoan()
    r._attach_loan(gone)
    del gone
    gc.collect()
    assert len(r._loans) == 2  # held weakly
    r._detach_loan(loans[1])
    r.close()
    r.close()
    assert [ln.closed_calls for ln in loans] == [1, 0]
    r._detach_loan(loans[0])  # harmless after close


def test_close_completes_if_a_loan_callback_raises() -> None:
    class BadLoan:
        def _on_region_closed(self) -> None:
            raise RuntimeError("boom")

    r = Region.create(100)
    bad, good = BadLoan(), DummyLoan()
    r._attach_loan(bad)
    r._attach_loan(good)
    with pytest.raises(RuntimeError, match="boom"):
        r.close()
    assert r.closed and good.closed_calls == 1


# --- torch --------------------------------------------------------------------------


def test_torch_view_shares_memory() -> None:
    torch = pytest.importorskip("torch", reason="torch is an optional dependency (wasmshare[torch])")
    with Region.create(4096) as r:
        t = r.tensor("float32", (4, 4), offset=16)
        t[1, 1] = 2.5
        assert r.array(np.float32)[4 + 5] == 2.5
        t2 = r.tensor(torch.int16)
        assert t2.shape == (2048,)
        assert t.data_ptr() == r.address + 16
        with pytest.raises(RegionError, match="unknown torch dtype"):
            r.tensor("float33")
        with pytest.raises(RegionError, match="not aligned"):
            r.tensor("float32", offset=2)
        del t, t2


@linux_only
def test_torch_view_of_sealed_region_no_warning(recwarn: pytest.WarningsRecorder) -> None:
    pytest.importorskip("torch", reason="torch is an optional dependency (wasmshare[torch])")
    with Region.from_bytes(np.arange(8, dtype=np.float32).tobytes()) as r:
        t = r.tensor("float32")
        assert t.tolist() == list(range(8))
    assert not [w for w in recwarn if "writable" in str(w.message)]
