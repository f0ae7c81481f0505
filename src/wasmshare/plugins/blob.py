"""The schema blob: a versioned header, a compact lookup index and the schema JSON itself.

A blob is what the host publishes once and every plugin reads in place. Layout
(little-endian; ``guests/plugins/wasmshare_plugin.h`` has the same structs in C)::

    0       header (64 bytes): magic "WSSCHEMA", version, header size, blob size,
            index offset/size, JSON offset/size, CRC-32 of the index, CRC-32 of the JSON
    64      index: index header (32 bytes), type table (32 bytes a type, sorted by
            (kind, token bytes): resources first), property table (16 bytes a property,
            each type's input properties contiguous and sorted by name), string table
    ...     the schema document (compact JSON), 64-byte aligned

Each type record also gives the byte span of the type's own object inside the JSON, so
a reader can go from a token to its full definition (descriptions included) without
parsing the document. :class:`SchemaBlob` validates a blob (bounds of every table and
record, sort order, checksums) and reads it in place from any buffer: bytes, an mmap, a
:class:`~wasmshare.region.Region` view.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ..errors import BlobFormatError
from ..region import MAX_REGION_BYTES

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_SIZE",
    "BLOB_FILE_MAX_BYTES",
    "SchemaBlob",
    "TypeInfo",
    "PropertyInfo",
    "build_blob",
    "DocumentWriter",
    "TYPE_CODES",
    "TYPE_NAMES",
]

MAGIC = b"WSSCHEMA"
VERSION = 1
HEADER = struct.Struct("<8sIIQQQQQII")
HEADER_SIZE = HEADER.size  # 64
BLOB_FILE_MAX_BYTES = MAX_REGION_BYTES
"""Largest blob file read, published, embedded or streamed (4 GiB), checked before reading.

A plugin is a wasm32 guest: it addresses 4 GiB in all, so no larger blob can be lent,
embedded or copied into one.
"""
INDEX_HEADER = struct.Struct("<8I")  # 32 bytes
JSON_ALIGN = 64

KIND_RESOURCE = 1
KIND_OBJECT = 2
NO_REF = 0xFFFFFFFF

T_STRING, T_NUMBER, T_INTEGER, T_BOOLEAN, T_ARRAY, T_MAP, T_OBJECT, T_ANY = range(1, 9)
TYPE_NAMES: dict[int, str] = {
    T_STRING: "string",
    T_NUMBER: "number",
    T_INTEGER: "integer",
    T_BOOLEAN: "boolean",
    T_ARRAY: "array",
    T_MAP: "map",
    T_OBJECT: "object",
    T_ANY: "any",
}
"""Property type code (``WSP_T_*``) → name."""
TYPE_CODES: dict[str, int] = {name: code for code, name in TYPE_NAMES.items()}

TYPE_DTYPE = np.dtype(
    [
        ("name_off", "<u4"),
        ("name_len", "<u4"),
        ("first_prop", "<u4"),
        ("n_props", "<u4"),
        ("json_off", "<u4"),
        ("json_len", "<u4"),
        ("kind", "<u4"),
        ("reserved", "<u4"),
    ]
)
PROP_DTYPE = np.dtype(
    [
        ("name_off", "<u4"),
        ("name_len", "<u2"),
        ("kind", "u1"),
        ("item_kind", "u1"),
        ("ref", "<u4"),
        ("flags", "<u4"),
    ]
)
assert TYPE_DTYPE.itemsize == 32 and PROP_DTYPE.itemsize == 16

_SCALARS = {"string": T_STRING, "number": T_NUMBER, "integer": T_INTEGER, "boolean": T_BOOLEAN}

PropSpec = tuple[str, int, int, "str | None", bool]
"""(name, type code, item type code, referenced object type token or None, required)."""


@dataclass(frozen=True)
class PropertyInfo:
    """One input property of a type, as the index records it."""

    name: str
    type: str
    """``string``, ``number``, ``integer``, ``boolean``, ``array``, ``map``, ``object`` or ``any``."""
    item_type: str | None
    """Element type of an ``array`` or value type of a ``map``; else None."""
    ref: str | None
    """Token of the nested object type (for ``object``, or an array/map of objects)."""
    required: bool


@dataclass(frozen=True)
class TypeInfo:
    """A resource or object type of the schema, as the index records it."""

    token: str
    kind: Literal["resource", "object"]
    properties: tuple[PropertyInfo, ...]
    json_span: tuple[int, int]
    """``(offset, length)`` of the type's object inside the JSON document."""


# --------------------------------------------------------------------------- building


def property_spec(name: str, spec: Any, required: bool) -> PropSpec:
    """The index entry of a property from its JSON schema spec (Pulumi-style)."""
    kind, item, ref = _kind_of(spec)
    if kind in (T_ARRAY, T_MAP):
        item_spec = spec.get("items") if kind == T_ARRAY else spec.get("additionalProperties")
        item, _, ref = _kind_of(item_spec) if isinstance(item_spec, dict) else (T_ANY, 0, None)
        if item in (T_ARRAY, T_MAP):
            item, ref = T_ANY, None  # nested collections are not described further
    return name, kind, item, ref, required


def _kind_of(spec: Any) -> tuple[int, int, str | None]:
    if not isinstance(spec, dict):
        return T_ANY, 0, None
    ref = spec.get("$ref")
    if isinstance(ref, str):
        if ref.startswith("#/types/"):
            return T_OBJECT, 0, ref[len("#/types/") :]
        return T_ANY, 0, None  # pulumi.json#/Any, Archive, Asset, ...
    t = spec.get("type")
    if isinstance(t, str) and t in _SCALARS:
        return _SCALARS[t], 0, None
    if t == "array":
        return T_ARRAY, T_ANY, None
    if t == "object":
        return T_MAP, T_ANY, None
    return T_ANY, 0, None


class DocumentWriter:
    """Builds the schema JSON piece by piece, recording each type's byte span and index entry.

    :func:`build_blob` writes a given schema with it and :mod:`~wasmshare.plugins.schema`
    a generated one; both end with :meth:`finish`, which returns the whole blob. The
    document is kept as a list of pieces and joined once, so building it takes time
    linear in its size.
    """

    def __init__(self, head: str) -> None:
        self.pieces: list[str] = [head]
        self.pos = len(head)
        self.types: list[tuple[int, str, int, int, list[PropSpec]]] = []
        self._first = True

    def write(self, text: str) -> None:
        self.pieces.append(text)
        self.pos += len(text)

    def open_section(self, key: str, *, first: bool = False) -> None:
        self.write(("" if first else ",") + json.dumps(key) + ":{")
        self._first = True

    def close_section(self) -> None:
        self.write("}")

    def add(self, kind: int, token: str, text: str, props: list[PropSpec]) -> None:
        self.write(("" if self._first else ",") + json.dumps(token) + ":")
        self._first = False
        self.types.append((kind, token, self.pos, len(text), props))
        self.write(text)

    def finish(self, tail: str, progress: Callable[[str, float], None] | None = None) -> bytes:
        self.write(tail)
        try:
            document = "".join(self.pieces).encode("ascii")
        except UnicodeEncodeError as e:  # pragma: no cover - writers escape non-ASCII
            raise BlobFormatError(f"schema document is not ASCII JSON: {e}") from e
        self.pieces = []
        if progress is not None:
            progress("indexing", 0.0)
        return _assemble(document, self.types)


def _assemble(document: bytes, types: list[tuple[int, str, int, int, list[PropSpec]]]) -> bytes:
    """Header + index + document."""
    order = sorted(range(len(types)), key=lambda i: (types[i][0], types[i][1].encode()))
    position = {(types[i][0], types[i][1]): rank for rank, i in enumerate(order)}
    strings = bytearray()
    string_offsets: dict[str, int] = {}

    def intern(s: str) -> tuple[int, int]:
        off = string_offsets.get(s)
        raw = s.encode()
        if off is None:
            off = len(strings)
            string_offsets[s] = off
            strings.extend(raw)
        return off, len(raw)

    n_props = sum(len(t[4]) for t in types)
    type_rows = np.zeros(len(types), dtype=TYPE_DTYPE)
    prop_rows = np.zeros(n_props, dtype=PROP_DTYPE)
    prop_cols: list[list[int]] = [[], [], [], [], [], []]
    n_resources = 0
    first = 0
    for rank, i in enumerate(order):
        kind, token, json_off, json_len, props = types[i]
        if kind == KIND_RESOURCE:
            n_resources += 1
        name_off, name_len = intern(token)
        type_rows[rank] = (name_off, name_len, first, len(props), json_off, json_len, kind, 0)
        for name, pkind, item, ref, required in sorted(props, key=lambda p: p[0].encode()):
            p_off, p_len = intern(name)
            if p_len > 0xFFFF:
                raise BlobFormatError(
                    f"property name of {p_len} bytes in {token} is too long (at most 65535)"
                )
            ref_index = position.get((KIND_OBJECT, ref), NO_REF) if ref is not None else NO_REF
            prop_cols[0].append(p_off)
            prop_cols[1].append(p_len)
            prop_cols[2].append(pkind)
            prop_cols[3].append(item)
            prop_cols[4].append(ref_index)
            prop_cols[5].append(1 if required else 0)
        first += len(props)
    for name, col in zip(("name_off", "name_len", "kind", "item_kind", "ref", "flags"), prop_cols):
        prop_rows[name] = np.asarray(col, dtype=PROP_DTYPE[name])
    types_off = INDEX_HEADER.size
    props_off = types_off + type_rows.nbytes
    strings_off = props_off + prop_rows.nbytes
    index = b"".join(
        [
            INDEX_HEADER.pack(
                len(types), types_off, n_props, props_off, strings_off, len(strings), n_resources, 0
            ),
            type_rows.tobytes(),
            prop_rows.tobytes(),
            bytes(strings),
        ]
    )
    index_off = HEADER_SIZE
    json_off = -(-(index_off + len(index)) // JSON_ALIGN) * JSON_ALIGN
    total = json_off + len(document)
    header = HEADER.pack(
        MAGIC,
        VERSION,
        HEADER_SIZE,
        total,
        index_off,
        len(index),
        json_off,
        len(document),
        zlib.crc32(index),
        zlib.crc32(document),
    )
    return b"".join([header, index, b"\0" * (json_off - index_off - len(index)), document])


def build_blob(
    schema: bytes | str | Mapping[str, Any], *, progress: Callable[[str, float], None] | None = None
) -> bytes:
    """Build a blob from a Pulumi-style provider schema (JSON text or the parsed dict).

    The blob holds the schema re-serialized as compact JSON (so every type's span is
    known) and an index of ``resources`` (their ``inputProperties``) and ``types``
    (their ``properties``). ``$ref`` to ``#/types/TOKEN`` becomes a nested-type
    reference; other refs (``pulumi.json#/Any``, assets) accept anything.

    Raises :class:`BlobFormatError` for text that is not JSON or a document without a
    ``resources`` object.
    """
    if isinstance(schema, (bytes, str)):
        try:
            doc = json.loads(schema)
        except ValueError as e:
            raise BlobFormatError(f"schema is not valid JSON: {e}") from e
    else:
        doc = dict(schema)
    if not isinstance(doc, dict) or not isinstance(doc.get("resources"), dict):
        raise BlobFormatError(
            "schema must be a JSON object with a 'resources' object (a Pulumi-style provider schema)"
        )
    types = doc.get("types") or {}
    if not isinstance(types, dict):
        raise BlobFormatError("schema 'types' must be an object")
    rest = {k: v for k, v in doc.items() if k not in ("types", "resources")}
    head = json.dumps(rest, separators=(",", ":"))[:-1]
    writer = DocumentWriter(head)
    writer.open_section("types", first=head == "{")
    for token, spec in types.items():
        writer.add(KIND_OBJECT, token, _dump(spec), _props_of(spec, "properties", "required"))
    writer.close_section()
    writer.open_section("resources")
    for token, spec in doc["resources"].items():
        writer.add(KIND_RESOURCE, token, _dump(spec), _props_of(spec, "inputProperties", "requiredInputs"))
    writer.close_section()
    return writer.finish("}", progress)


def _dump(spec: Any) -> str:
    return json.dumps(spec, separators=(",", ":"))


def _props_of(spec: Any, key: str, required_key: str) -> list[PropSpec]:
    if not isinstance(spec, dict):
        return []
    props = spec.get(key) or {}
    required = spec.get(required_key) or []
    if not isinstance(props, dict):
        return []
    req = set(required) if isinstance(required, list) else set()
    return [property_spec(name, p, name in req) for name, p in props.items()]


# --------------------------------------------------------------------------- reading


class SchemaBlob:
    """A validated, zero-copy reader of a schema blob in any buffer.

    ``SchemaBlob(data)`` checks, before anything else reads the blob: magic, version,
    the header's sizes and offsets against the buffer, the index checksum, the bounds of
    every type and property record (names, property ranges, references, JSON spans),
    the sort order of the type table, and (``check_json=True``) the JSON checksum.

    The reader keeps a reference to ``data`` and reads it in place; for a region view,
    keep the region open while the reader is used.

    Raises :class:`BlobFormatError` with the first problem found.
    """

    def __init__(self, data: Any, *, check_json: bool = True) -> None:
        try:
            mv = memoryview(data).cast("B")
        except TypeError as e:
            raise BlobFormatError(
                f"a schema blob must be a bytes-like buffer, got {type(data).__name__}"
            ) from e
        self._mv = mv
        if mv.nbytes < HEADER_SIZE:
            raise BlobFormatError(
                f"schema blob is {mv.nbytes} bytes, shorter than its {HEADER_SIZE}-byte header"
            )
        (
            magic,
            version,
            header_size,
            blob_size,
            index_off,
            index_size,
            json_off,
            json_size,
            index_crc,
            json_crc,
        ) = HEADER.unpack_from(mv, 0)
        if magic != MAGIC:
            raise BlobFormatError(f"not a schema blob: magic is {bytes(magic)!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise BlobFormatError(
                f"schema blob version {version} is not supported (this wasmshare reads version {VERSION})"
            )
        if header_size < HEADER_SIZE or blob_size > mv.nbytes or header_size > blob_size:
            raise BlobFormatError(
                f"schema blob header is inconsistent: header size {header_size}, blob size {blob_size}, "
                f"buffer {mv.nbytes} bytes (truncated?)"
            )
        for what, off, size in (("index", index_off, index_size), ("JSON document", json_off, json_size)):
            if off < header_size or off + size > blob_size:
                raise BlobFormatError(
                    f"schema blob {what} [{off}, {off + size}) lies outside the blob [{header_size}, {blob_size})"
                )
        if index_off < json_off + json_size and json_off < index_off + index_size:
            raise BlobFormatError("schema blob index and JSON document overlap")
        self.nbytes: int = int(blob_size)
        """Bytes of the blob (the buffer may be longer: page padding)."""
        index = mv[index_off : index_off + index_size]
        actual = zlib.crc32(index)
        if actual != index_crc:
            raise BlobFormatError(
                f"schema blob index checksum mismatch (header {index_crc:#010x}, index {actual:#010x}): the blob is corrupt"
            )
        self._json = mv[json_off : json_off + json_size]
        if check_json:
            actual = zlib.crc32(self._json)
            if actual != json_crc:
                raise BlobFormatError(
                    f"schema blob JSON checksum mismatch (header {json_crc:#010x}, document {actual:#010x}): the blob is corrupt"
                )
        if json_size < 2 or self._json[0] != ord("{") or self._json[-1] != ord("}"):
            raise BlobFormatError("schema blob JSON document is not a JSON object")
        if index_size < INDEX_HEADER.size:
            raise BlobFormatError(f"schema blob index is {index_size} bytes, shorter than its header")
        n_types, types_off, n_props, props_off, strings_off, strings_size, n_resources, _ = (
            INDEX_HEADER.unpack_from(index)
        )
        for what, off, size in (
            ("type table", types_off, n_types * TYPE_DTYPE.itemsize),
            ("property table", props_off, n_props * PROP_DTYPE.itemsize),
            ("string table", strings_off, strings_size),
        ):
            if off + size > index_size:
                raise BlobFormatError(
                    f"schema blob {what} [{off}, {off + size}) lies outside the index ({index_size} bytes)"
                )
        if types_off % 4 or props_off % 4:
            raise BlobFormatError("schema blob tables are not 4-byte aligned")
        if n_resources > n_types:
            raise BlobFormatError(f"schema blob says {n_resources} resources but has only {n_types} types")
        self.n_types: int = n_types
        self.n_resources: int = n_resources
        self.n_props: int = n_props
        self.index_nbytes: int = int(index_size)
        self.json_nbytes: int = int(json_size)
        self._types = np.frombuffer(index, dtype=TYPE_DTYPE, count=n_types, offset=types_off)
        self._props = np.frombuffer(index, dtype=PROP_DTYPE, count=n_props, offset=props_off)
        self._strings = index[strings_off : strings_off + strings_size]
        self._check_tables(strings_size, json_size)
        self._by_token: dict[tuple[int, str], int] | None = None

    def _check_tables(self, strings_size: int, json_size: int) -> None:
        t, p = self._types, self._props
        u64 = np.uint64
        bad = np.flatnonzero(t["name_off"].astype(u64) + t["name_len"] > strings_size)
        if bad.size:
            raise BlobFormatError(f"schema blob type {int(bad[0])} has a name outside the string table")
        bad = np.flatnonzero(t["first_prop"].astype(u64) + t["n_props"] > self.n_props)
        if bad.size:
            raise BlobFormatError(f"schema blob type {int(bad[0])} has properties outside the property table")
        bad = np.flatnonzero(t["json_off"].astype(u64) + t["json_len"] > json_size)
        if bad.size:
            raise BlobFormatError(f"schema blob type {int(bad[0])} has a JSON span outside the document")
        expected = np.where(np.arange(self.n_types) < self.n_resources, KIND_RESOURCE, KIND_OBJECT)
        bad = np.flatnonzero(t["kind"] != expected)
        if bad.size:
            raise BlobFormatError(
                f"schema blob type {int(bad[0])} has kind {int(t['kind'][bad[0]])} out of order"
            )
        bad = np.flatnonzero(p["name_off"].astype(u64) + p["name_len"] > strings_size)
        if bad.size:
            raise BlobFormatError(f"schema blob property {int(bad[0])} has a name outside the string table")
        bad = np.flatnonzero((p["kind"] < T_STRING) | (p["kind"] > T_ANY) | (p["item_kind"] > T_ANY))
        if bad.size:
            raise BlobFormatError(
                f"schema blob property {int(bad[0])} has an unknown type code {int(p['kind'][bad[0]])}"
            )
        refs = p["ref"]
        bad = np.flatnonzero((refs != NO_REF) & ((refs >= self.n_types) | (refs < self.n_resources)))
        if bad.size:
            raise BlobFormatError(
                f"schema blob property {int(bad[0])} refers to type {int(refs[bad[0]])}, not an object type"
            )
        strings = self._strings
        previous: bytes | None = None
        for i, (off, n) in enumerate(zip(t["name_off"].tolist(), t["name_len"].tolist())):
            name = bytes(strings[off : off + n])
            if i == self.n_resources:
                previous = None
            if previous is not None and name <= previous:
                raise BlobFormatError(
                    f"schema blob type table is not sorted (or has a duplicate) at type {i}"
                )
            previous = name

    # -- reading -------------------------------------------------------------------

    def _name(self, off: int, n: int) -> str:
        return bytes(self._strings[off : off + n]).decode("utf-8", "replace")

    def _lookup_index(self) -> dict[tuple[int, str], int]:
        if self._by_token is None:
            t = self._types
            self._by_token = {
                (int(k), self._name(o, n)): i
                for i, (o, n, k) in enumerate(
                    zip(t["name_off"].tolist(), t["name_len"].tolist(), t["kind"].tolist())
                )
            }
        return self._by_token

    def tokens(self, kind: Literal["resource", "object"] = "resource") -> list[str]:
        """Every resource (or object type) token, sorted."""
        t = self._types
        rng = range(0, self.n_resources) if kind == "resource" else range(self.n_resources, self.n_types)
        return [self._name(int(t["name_off"][i]), int(t["name_len"][i])) for i in rng]

    def lookup(self, token: str, kind: Literal["resource", "object"] = "resource") -> TypeInfo | None:
        """The index entry of a resource (or object) type, or None when the schema has none."""
        code = KIND_RESOURCE if kind == "resource" else KIND_OBJECT
        i = self._lookup_index().get((code, token))
        return None if i is None else self._type_info(i)

    def _type_info(self, i: int) -> TypeInfo:
        row = self._types[i]
        first, count = int(row["first_prop"]), int(row["n_props"])
        props = []
        for p in self._props[first : first + count]:
            ref = int(p["ref"])
            ref_token = None
            if ref != NO_REF:
                r = self._types[ref]
                ref_token = self._name(int(r["name_off"]), int(r["name_len"]))
            kind, item = int(p["kind"]), int(p["item_kind"])
            props.append(
                PropertyInfo(
                    name=self._name(int(p["name_off"]), int(p["name_len"])),
                    type=TYPE_NAMES[kind],
                    item_type=TYPE_NAMES.get(item) if kind in (T_ARRAY, T_MAP) else None,
                    ref=ref_token,
                    required=bool(int(p["flags"]) & 1),
                )
            )
        return TypeInfo(
            token=self._name(int(row["name_off"]), int(row["name_len"])),
            kind="resource" if int(row["kind"]) == KIND_RESOURCE else "object",
            properties=tuple(props),
            json_span=(int(row["json_off"]), int(row["json_len"])),
        )

    def type_json(self, token: str, kind: Literal["resource", "object"] = "resource") -> Any:
        """The type's full definition, parsed from its span of the JSON document (None if unknown)."""
        info = self.lookup(token, kind)
        if info is None:
            return None
        off, n = info.json_span
        return json.loads(bytes(self._json[off : off + n]))

    @property
    def document(self) -> memoryview:
        """The schema JSON document, in place (no copy)."""
        return self._json

    def types(self) -> Iterable[TypeInfo]:
        """Every type of the index, resources first."""
        return (self._type_info(i) for i in range(self.n_types))

    def release(self) -> None:
        """Drop the references into the buffer (so an mmap or region view can close)."""
        for name in ("_types", "_props"):
            setattr(self, name, np.zeros(0, dtype=getattr(self, name).dtype))
        for name in ("_strings", "_json", "_mv"):
            getattr(self, name).release()
        self._by_token = None

    def __repr__(self) -> str:
        return (
            f"<SchemaBlob {self.nbytes:,} bytes: {self.n_resources:,} resources, "
            f"{self.n_types - self.n_resources:,} object types, {self.n_props:,} properties>"
        )
