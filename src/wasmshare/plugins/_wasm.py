"""A minimal WebAssembly binary rewriter: append a data segment and exported globals.

Used to embed a schema blob in a plugin module. Only the sections touched are decoded
(memory, global, export, data, data count); every other section is copied as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._libc import WASM_PAGE_SIZE
from ..errors import PluginModuleError

WASM_MAGIC = b"\0asm\x01\0\0\0"
WASM32_MAX_PAGES = 65536
"""Most pages a 32-bit linear memory can have (4 GiB)."""

SEC_CUSTOM, SEC_TYPE, SEC_IMPORT, SEC_FUNCTION, SEC_TABLE, SEC_MEMORY = 0, 1, 2, 3, 4, 5
SEC_GLOBAL, SEC_EXPORT, SEC_START, SEC_ELEMENT, SEC_CODE, SEC_DATA, SEC_DATACOUNT = 6, 7, 8, 9, 10, 11, 12
# Sections must appear in this order (data count sits between element and code).
_ORDER = [
    SEC_TYPE,
    SEC_IMPORT,
    SEC_FUNCTION,
    SEC_TABLE,
    SEC_MEMORY,
    SEC_GLOBAL,
    SEC_EXPORT,
    SEC_START,
    SEC_ELEMENT,
    SEC_DATACOUNT,
    SEC_CODE,
    SEC_DATA,
]


def uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40):
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def read_uleb(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise PluginModuleError("malformed wasm module: truncated LEB128 number")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise PluginModuleError("malformed wasm module: LEB128 number too long")


@dataclass
class _Section:
    id: int
    payload: bytes


def _sections(wasm: bytes) -> list[_Section]:
    if wasm[:8] != WASM_MAGIC:
        raise PluginModuleError("not a wasm binary module (version 1)")
    pos = 8
    out = []
    while pos < len(wasm):
        sid = wasm[pos]
        size, pos = read_uleb(wasm, pos + 1)
        if pos + size > len(wasm):
            raise PluginModuleError("malformed wasm module: a section runs past the end")
        out.append(_Section(sid, wasm[pos : pos + size]))
        pos += size
    return out


def _vector_append(payload: bytes, items: list[bytes]) -> bytes:
    count, pos = read_uleb(payload, 0) if payload else (0, 0)
    return uleb(count + len(items)) + payload[pos:] + b"".join(items)


def _name(s: str) -> bytes:
    raw = s.encode()
    return uleb(len(raw)) + raw


def _i32_const(value: int) -> bytes:
    signed = value - (1 << 32) if value >= 1 << 31 else value
    return b"\x41" + sleb(signed) + b"\x0b"


@dataclass(frozen=True)
class Embedded:
    """Where the data landed in the rewritten module."""

    wasm: bytes
    data_offset: int
    data_nbytes: int
    memory_pages: int


def embed_data(wasm: bytes, data: bytes | memoryview, *, ptr_global: str, len_global: str) -> Embedded:
    """Append ``data`` as an active data segment at a 64 KiB-aligned offset past the module's memory.

    The module's memory must be defined in the module (not imported), its minimum is
    raised to cover the data, and two immutable exported i32 globals give the data's
    address and length. Raises :class:`PluginModuleError` for a module without its own
    memory, or one whose memory cannot grow to hold the data.
    """
    sections = _sections(wasm)
    by_id = {s.id: s for s in sections if s.id != SEC_CUSTOM}
    memory = by_id.get(SEC_MEMORY)
    if memory is None:
        raise PluginModuleError("the plugin module defines no memory of its own; it cannot embed data")
    count, pos = read_uleb(memory.payload, 0)
    if count != 1:
        raise PluginModuleError(f"the plugin module defines {count} memories; embedding needs exactly one")
    flags = memory.payload[pos]
    if flags not in (0, 1):
        raise PluginModuleError(
            "the plugin module's memory is shared or 64-bit; embedding needs a plain 32-bit memory"
        )
    min_pages, p2 = read_uleb(memory.payload, pos + 1)
    max_pages = None
    if flags == 1:
        max_pages, p2 = read_uleb(memory.payload, p2)
    offset = min_pages * WASM_PAGE_SIZE
    n = memoryview(data).nbytes
    pages = min_pages + -(-n // WASM_PAGE_SIZE)
    if pages > WASM32_MAX_PAGES or (max_pages is not None and pages > max_pages):
        raise PluginModuleError(
            f"embedding {n:,} bytes needs {pages} wasm pages; the module's memory allows at most "
            f"{max_pages if max_pages is not None else WASM32_MAX_PAGES}"
        )
    memory.payload = (
        uleb(1) + bytes([flags]) + uleb(pages) + (uleb(max_pages) if max_pages is not None else b"")
    )

    n_globals = 0
    globals_sec = by_id.get(SEC_GLOBAL)
    if globals_sec is not None:
        n_globals = read_uleb(globals_sec.payload, 0)[0]
    imports = by_id.get(SEC_IMPORT)
    n_imported_globals = _count_imported_globals(imports.payload) if imports is not None else 0
    new_globals = [b"\x7f\x00" + _i32_const(offset), b"\x7f\x00" + _i32_const(n)]  # i32, immutable
    if globals_sec is None:
        globals_sec = _Section(SEC_GLOBAL, uleb(0))
        sections.append(globals_sec)
    globals_sec.payload = _vector_append(globals_sec.payload, new_globals)
    first = n_imported_globals + n_globals
    exports = by_id.get(SEC_EXPORT)
    if exports is None:
        exports = _Section(SEC_EXPORT, uleb(0))
        sections.append(exports)
    exports.payload = _vector_append(
        exports.payload,
        [_name(ptr_global) + b"\x03" + uleb(first), _name(len_global) + b"\x03" + uleb(first + 1)],
    )
    segment = b"\x00" + _i32_const(offset) + uleb(n)
    data_sec = by_id.get(SEC_DATA)
    if data_sec is None:
        data_sec = _Section(SEC_DATA, uleb(0))
        sections.append(data_sec)
    data_count, dpos = read_uleb(data_sec.payload, 0)
    datacount = by_id.get(SEC_DATACOUNT)
    if datacount is not None:
        datacount.payload = uleb(data_count + 1)
    ordered = [s for s in sections if s.id != SEC_CUSTOM]
    ordered.sort(key=lambda s: _ORDER.index(s.id))
    customs = [s for s in sections if s.id == SEC_CUSTOM]
    out = [WASM_MAGIC]
    for s in ordered:
        if s is data_sec:
            head = uleb(data_count + 1) + data_sec.payload[dpos:] + segment
            out.append(bytes([SEC_DATA]) + uleb(len(head) + n) + head)
            out.append(bytes(memoryview(data).cast("B")))
        else:
            out.append(bytes([s.id]) + uleb(len(s.payload)) + s.payload)
    for s in customs:  # names and producers: after the data, which is allowed for custom sections
        out.append(bytes([SEC_CUSTOM]) + uleb(len(s.payload)) + s.payload)
    return Embedded(b"".join(out), offset, n, pages)


def _count_imported_globals(payload: bytes) -> int:
    count, pos = read_uleb(payload, 0)
    globals_ = 0
    for _ in range(count):
        for _field in range(2):
            n, pos = read_uleb(payload, pos)
            pos += n
        kind = payload[pos]
        pos += 1
        if kind == 0:  # func: type index
            _, pos = read_uleb(payload, pos)
        elif kind == 1:  # table: reftype + limits
            pos += 1
            flags = payload[pos]
            _, pos = read_uleb(payload, pos + 1)
            if flags & 1:
                _, pos = read_uleb(payload, pos)
        elif kind == 2:  # memory: limits
            flags = payload[pos]
            _, pos = read_uleb(payload, pos + 1)
            if flags & 1:
                _, pos = read_uleb(payload, pos)
        elif kind == 3:  # global: valtype + mutability
            pos += 2
            globals_ += 1
        else:
            raise PluginModuleError(f"malformed wasm module: unknown import kind {kind}")
    return globals_


def exports(wasm: bytes) -> dict[str, int]:
    """The module's exports: name → kind (0 function, 1 table, 2 memory, 3 global)."""
    for s in _sections(wasm):
        if s.id != SEC_EXPORT:
            continue
        count, pos = read_uleb(s.payload, 0)
        out = {}
        for _ in range(count):
            n, pos = read_uleb(s.payload, pos)
            name = bytes(s.payload[pos : pos + n]).decode("utf-8", "replace")
            pos += n
            kind = s.payload[pos]
            _, pos = read_uleb(s.payload, pos + 1)
            out[name] = kind
        return out
    return {}
