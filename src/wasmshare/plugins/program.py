"""Infrastructure programs: YAML in, a compact binary encoding for the guest, diagnostics out.

A program is a list of resources with their properties, as in a Pulumi YAML program::

    resources:
      logs:
        type: aws:s3/bucket:Bucket
        properties:
          versioning:
            enabled: true
          tags: {team: infra}

:func:`parse_program` reads it (PyYAML, the ``plugins`` extra), :func:`encode_program`
lays it out for the guest (format in ``docs/plugins.md`` and ``wasmshare_plugin.h``),
:func:`decode_diagnostics` reads what the guest wrote back, and :func:`reference_check`
is a plain-Python checker over the parsed schema JSON that gives the same answers (tests
compare the two).
"""

from __future__ import annotations

import datetime
import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import PluginError, ProgramError
from .blob import TYPE_NAMES

__all__ = [
    "Program",
    "Resource",
    "Diagnostic",
    "DiagnosticKind",
    "parse_program",
    "encode_program",
    "decode_diagnostics",
    "reference_check",
    "PROGRAM_TEXT_MAX_BYTES",
    "PROGRAM_MAX_NESTING_LEVELS",
    "PROGRAM_MAX_NODES",
    "PROGRAM_EXPANDED_MAX_CHARS",
]

PROGRAM_TEXT_MAX_BYTES = 8 * 1024 * 1024
"""Largest program text :func:`parse_program` reads (UTF-8 bytes), checked before parsing.

Eight times the default 1 MiB query buffer its encoding must fit; values are encoded by
kind alone, so text with long strings and comments is much larger than its encoding.
"""
PROGRAM_MAX_NESTING_LEVELS = 64
"""Deepest nesting of YAML collections in a program (the top-level mapping is level 1).

The type-check plugin checks values 48 levels deep below ``resources.NAME.properties``
(three levels): 64 refuses nothing a plugin would check, and keeps PyYAML's C composer,
which recurses once per level, far from the end of the C stack.
"""
PROGRAM_MAX_NODES = 250_000
"""Most YAML nodes in a program with every alias expanded (as the encoder walks it).

5 MB of 20-byte encoded nodes, five times what the default 1 MiB query buffer holds;
the host's encoder holds some 300 bytes a node while it works, so under 100 MiB.
Without it a few hundred bytes of nested aliases ("billion laughs") stand for 10**9
nodes, or, recursive, for endless ones.
"""
PROGRAM_EXPANDED_MAX_CHARS = 64 * 1024 * 1024
"""Most characters of scalars (keys and values) in a program with every alias expanded.

Eight times :data:`PROGRAM_TEXT_MAX_BYTES`: an alias to a long string, repeated, is
otherwise a string bomb for whatever walks the program as a tree (paths, ``json.dumps``).
"""

PROGRAM_MAGIC = 0x47505357  # "WSPG"
PROGRAM_VERSION = 1
_HEADER = struct.Struct("<6I")
_RESOURCE = struct.Struct("<5I")
_NODE = struct.Struct("<B3xIIII")
_OUT_HEADER = struct.Struct("<4I")
_DIAG = struct.Struct("<BBBxII")
NO_NODE = 0xFFFFFFFF

V_NULL, V_BOOL, V_INTEGER, V_NUMBER, V_STRING, V_EXPR, V_LIST, V_MAP = range(8)
VALUE_NAMES = {
    V_NULL: "null",
    V_BOOL: "boolean",
    V_INTEGER: "integer",
    V_NUMBER: "number",
    V_STRING: "string",
    V_EXPR: "expression",
    V_LIST: "list",
    V_MAP: "map",
}
DiagnosticKind = Literal["unknown-type", "unknown-property", "wrong-type"]
_DIAG_KINDS: dict[int, DiagnosticKind] = {1: "unknown-type", 2: "unknown-property", 3: "wrong-type"}


@dataclass(frozen=True)
class Resource:
    """One resource of a program: its logical name, type token and properties (a mapping, or None)."""

    name: str
    type: str
    properties: Any = None


@dataclass(frozen=True)
class Program:
    """An infrastructure program: resources in source order."""

    resources: tuple[Resource, ...]

    @classmethod
    def of(cls, resources: Mapping[str, Mapping[str, Any]]) -> Program:
        """A program from ``{name: {"type": token, "properties": {...}}}`` (the YAML's ``resources``)."""
        if not isinstance(resources, Mapping):
            raise ProgramError(
                f"'resources' must be a mapping of name to resource, got {type(resources).__name__}"
            )
        out = []
        for name, body in resources.items():
            where = f"resources.{name}"
            if not isinstance(body, Mapping):
                raise ProgramError(f"{where}: a resource must be a mapping with 'type' and 'properties'")
            token = body.get("type")
            if not isinstance(token, str) or not token:
                raise ProgramError(f"{where}: the resource has no 'type' (a token like aws:s3/bucket:Bucket)")
            out.append(Resource(str(name), token, body.get("properties")))
        return cls(tuple(out))


@dataclass(frozen=True)
class Diagnostic:
    """One problem found in a program.

    ``path`` is dotted from the program root (``resources.logs.properties.versioning.enabld``,
    list items as ``[i]``); for ``wrong-type``, ``expected`` is the schema's type
    (``string``, ``object``, ...) and ``actual`` the value's (``integer``, ``map``, ...).
    """

    path: str
    kind: DiagnosticKind
    expected: str | None = None
    actual: str | None = None
    message: str = field(default="", compare=False)

    def __str__(self) -> str:
        return f"{self.path}: {self.message or self.kind}"


def parse_program(text: str | bytes) -> Program:
    """Parse a YAML (or JSON) program with a top-level ``resources`` mapping.

    The text is untrusted, so it is bounded before anything is built: its size
    (:data:`PROGRAM_TEXT_MAX_BYTES`) before any parsing, then a walk of the parser's
    events (an iterative state machine that builds nothing) for the nesting depth
    (:data:`PROGRAM_MAX_NESTING_LEVELS`), the size with every alias expanded
    (:data:`PROGRAM_MAX_NODES`, :data:`PROGRAM_EXPANDED_MAX_CHARS`), aliases inside their
    own anchor (recursive structures) and a second document; only a program that passed
    is constructed, with PyYAML's safe loader (the C one where there is libyaml).

    Raises :class:`ProgramError`, with a one-line message, for text past those bounds,
    text that is not YAML, a document without ``resources``, or a resource without a
    ``type``; needs PyYAML (``wasmshare[plugins]``).
    """
    _check_text_size(text)
    try:
        import yaml
    except ImportError as e:  # pragma: no cover - the plugins extra installs it
        raise ProgramError("reading YAML programs needs PyYAML: pip install 'wasmshare[plugins]'") from e
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_program_events(yaml.parse(text, Loader=loader))
        doc = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        raise ProgramError(f"program is not valid YAML: {_yaml_problem(e)}") from e
    except ValueError as e:  # a scalar the constructor cannot convert: 2001-13-45, an int of 5000 digits
        raise ProgramError(f"program has a value that cannot be read: {str(e).splitlines()[0]}") from e
    if not isinstance(doc, dict) or "resources" not in doc:
        raise ProgramError("program must be a YAML mapping with a 'resources' section")
    return Program.of(doc["resources"] or {})


def _check_text_size(text: str | bytes) -> None:
    if not isinstance(text, (str, bytes, bytearray)):
        raise ProgramError(f"a program is YAML text (str or bytes), not {type(text).__name__}")
    nbytes, exact = len(text), not isinstance(text, str) or text.isascii()
    if isinstance(text, str) and not exact and PROGRAM_TEXT_MAX_BYTES // 4 < nbytes <= PROGRAM_TEXT_MAX_BYTES:
        nbytes, exact = (
            len(text.encode("utf-8", "surrogatepass")),
            True,
        )  # only where the characters do not settle it
    if nbytes > PROGRAM_TEXT_MAX_BYTES:
        raise ProgramError(
            f"program is {'' if exact else 'at least '}{nbytes:,} bytes, over the {PROGRAM_TEXT_MAX_BYTES:,}-byte "
            "limit (PROGRAM_TEXT_MAX_BYTES)"
        )


def _yaml_problem(e: Exception) -> str:
    """PyYAML's error in one line: its problem and where (its own message spans several lines)."""
    problem = getattr(e, "problem", None)
    if problem:
        mark = getattr(e, "problem_mark", None)
        context = getattr(e, "context", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{context + ': ' if context else ''}{problem}{where}"
    return " ".join(str(e).split())


def _at(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _check_program_events(events: Iterable[Any]) -> None:
    """Raise :class:`ProgramError` at the first YAML event past a program limit.

    Keeps, per anchor, the nodes and scalar characters of its subtree; an alias adds
    its anchor's totals where it stands, so the running totals are those of the
    document as a plain tree (what the encoder or ``json.dumps`` walks), counted
    without building it. A merge key ``<<: *a`` counts as all of ``a``, an upper bound
    of what it adds. An alias inside its own anchor's collection (a recursive
    structure) is refused, and so are an undefined alias and an anchor defined twice,
    which PyYAML refuses anyway: the counts must describe what is then built.
    Stopping early matters too: the parser reads no further than the event refused.
    """
    import yaml

    nodes = chars = depth = documents = 0
    anchors: dict[str, tuple[int, int]] = {}  # closed anchors: (nodes, chars) of the subtree
    frames: list[tuple[str | None, int, int]] = []  # open collections: (anchor, nodes and chars before)
    open_anchors: set[str] = set()

    def define(anchor: str | None, event: Any) -> None:
        if anchor is not None and (anchor in anchors or anchor in open_anchors):
            raise ProgramError(
                f"program is not valid YAML: the anchor &{anchor} is defined twice{_at(event)}"
            )

    def grow(n: int, c: int, event: Any) -> None:
        nonlocal nodes, chars
        nodes += n
        chars += c
        if nodes > PROGRAM_MAX_NODES:
            raise ProgramError(
                f"program has more than {PROGRAM_MAX_NODES:,} YAML nodes with its aliases expanded{_at(event)} "
                "(limit PROGRAM_MAX_NODES)"
            )
        if chars > PROGRAM_EXPANDED_MAX_CHARS:
            raise ProgramError(
                f"program has more than {PROGRAM_EXPANDED_MAX_CHARS:,} characters of scalars with its aliases "
                f"expanded{_at(event)} (limit PROGRAM_EXPANDED_MAX_CHARS)"
            )

    for event in events:
        if isinstance(event, yaml.ScalarEvent):
            define(event.anchor, event)
            grow(1, len(event.value), event)
            if event.anchor is not None:
                anchors[event.anchor] = (1, len(event.value))
        elif isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > PROGRAM_MAX_NESTING_LEVELS:
                raise ProgramError(
                    f"program is nested more than {PROGRAM_MAX_NESTING_LEVELS} levels deep{_at(event)} "
                    "(limit PROGRAM_MAX_NESTING_LEVELS)"
                )
            define(event.anchor, event)
            frames.append((event.anchor, nodes, chars))
            if event.anchor is not None:
                open_anchors.add(event.anchor)
            grow(1, 0, event)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, nodes_before, chars_before = frames.pop()
            if anchor is not None:
                open_anchors.discard(anchor)
                anchors[anchor] = (nodes - nodes_before, chars - chars_before)
        elif isinstance(event, yaml.AliasEvent):
            name = event.anchor
            if name in open_anchors:
                raise ProgramError(
                    f"program refers to the anchor &{name} from inside itself{_at(event)}: "
                    "a recursive structure, which a program cannot be"
                )
            if name not in anchors:
                raise ProgramError(
                    f"program is not valid YAML: the alias *{name} has no anchor before it{_at(event)}"
                )
            grow(*anchors[name], event)
        elif isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > 1:
                raise ProgramError(
                    f"program has a second YAML document{_at(event)}; a program is one document"
                )
            anchors.clear()  # anchors are per document


def _value_kind(value: Any) -> int:
    if value is None:
        return V_NULL
    if isinstance(value, bool):
        return V_BOOL
    if isinstance(value, int):
        return V_INTEGER
    if isinstance(value, float):
        return V_INTEGER if math.isfinite(value) and value.is_integer() else V_NUMBER
    if isinstance(value, str):
        return V_EXPR if "${" in value else V_STRING
    if isinstance(value, (datetime.date, bytes)):
        return V_STRING
    if isinstance(value, Mapping):
        return V_MAP
    if isinstance(value, Sequence):
        return V_LIST
    return V_STRING


class _Encoder:
    def __init__(self) -> None:
        self.strings = bytearray()
        self.offsets: dict[str, tuple[int, int]] = {}
        self.nodes: list[tuple[int, int, int, int, int]] = []

    def string(self, s: str) -> tuple[int, int]:
        got = self.offsets.get(s)
        if got is None:
            raw = s.encode("utf-8", "surrogatepass")
            got = (len(self.strings), len(raw))
            self.strings.extend(raw)
            self.offsets[s] = got
        return got

    def tree(self, value: Any) -> int:
        """Encode ``value`` breadth-first so each node's children are contiguous and after it.

        Every node of every tree counts toward :data:`PROGRAM_MAX_NODES`: a shared value is
        encoded once per place it appears, and a cyclic one would never end.
        """
        root = len(self.nodes)
        self.nodes.append((_value_kind(value), 0, 0, 0, 0))
        queue = [(root, value)]
        while queue:
            next_queue = []
            for index, v in queue:
                kind = self.nodes[index][0]
                if kind not in (V_MAP, V_LIST):
                    continue
                if (
                    len(self.nodes) + len(v) > PROGRAM_MAX_NODES
                ):  # a Program built in Python may share or cycle
                    raise ProgramError(
                        f"the program has more than {PROGRAM_MAX_NODES:,} nodes as a tree (limit PROGRAM_MAX_NODES); "
                        "does a value contain itself?"
                    )
                items = [(str(k), c) for k, c in v.items()] if kind == V_MAP else [("", c) for c in v]
                first = len(self.nodes)
                for key, child in items:
                    k_off, k_len = self.string(key) if key else (0, 0)
                    self.nodes.append((_value_kind(child), k_off, k_len, 0, 0))
                    next_queue.append((len(self.nodes) - 1, child))
                k, ko, kl, _, _ = self.nodes[index]
                self.nodes[index] = (k, ko, kl, first if items else 0, len(items))
            queue = next_queue
        return root


def encode_program(program: Program) -> bytes:
    """The program in the guest's binary layout (``wsp_program_header``, resources, nodes, strings)."""
    enc = _Encoder()
    records = []
    for res in program.resources:
        name = enc.string(res.name)
        token = enc.string(res.type)
        props = NO_NODE if res.properties is None else enc.tree(res.properties)
        records.append(_RESOURCE.pack(name[0], name[1], token[0], token[1], props))
    nodes = b"".join(_NODE.pack(*n) for n in enc.nodes)
    header = _HEADER.pack(PROGRAM_MAGIC, PROGRAM_VERSION, len(records), len(enc.nodes), len(enc.strings), 0)
    return header + b"".join(records) + nodes + bytes(enc.strings)


def decode_diagnostics(out: Any, program: Program) -> tuple[list[Diagnostic], int]:
    """Read the guest's diagnostics from ``out``; returns ``(diagnostics, total found)``.

    ``total`` exceeds ``len(diagnostics)`` when the output buffer was too small. Raises
    :class:`PluginError` when the records are malformed (a broken or hostile guest).
    """
    mv = memoryview(out).cast("B")
    if mv.nbytes < _OUT_HEADER.size:
        raise PluginError("plugin output is shorter than its header")
    n_written, n_total, used, _ = _OUT_HEADER.unpack_from(mv, 0)
    if used > mv.nbytes or n_written > n_total:
        raise PluginError(
            f"plugin output header is inconsistent ({n_written} written, {n_total} total, {used} bytes)"
        )
    pos = _OUT_HEADER.size
    diags = []
    for _ in range(n_written):
        if pos + _DIAG.size > used:
            raise PluginError("plugin output is truncated")
        kind, expected, actual, resource, path_len = _DIAG.unpack_from(mv, pos)
        start = pos + _DIAG.size
        if start + path_len > used or kind not in _DIAG_KINDS:
            raise PluginError("plugin output has a malformed diagnostic record")
        path = bytes(mv[start : start + path_len]).decode("utf-8", "replace")
        pos = start + (path_len + 3) // 4 * 4
        diags.append(_diagnostic(_DIAG_KINDS[kind], path, expected, actual, resource, program))
    return diags, int(n_total)


def _diagnostic(
    kind: DiagnosticKind, path: str, expected: int, actual: int, resource: int, program: Program
) -> Diagnostic:
    if kind == "unknown-type":
        token = program.resources[resource].type if resource < len(program.resources) else "?"
        return Diagnostic(path, kind, message=f"unknown resource type {token!r}")
    if kind == "unknown-property":
        name = path.rsplit(".", 1)[-1]
        return Diagnostic(path, kind, message=f"unknown property {name!r}")
    exp = TYPE_NAMES.get(expected, f"type {expected}")
    act = VALUE_NAMES.get(actual, f"kind {actual}")
    return Diagnostic(path, kind, exp, act, message=f"expected {exp}, got {act}")


# --------------------------------------------------------------------------- the reference


def reference_check(schema: Mapping[str, Any], program: Program) -> list[Diagnostic]:
    """Type-check ``program`` against a parsed schema document, in plain Python.

    The same rules as the guest: resource types are looked up in ``resources``, their
    properties in ``inputProperties``, nested types through ``$ref: #/types/TOKEN``;
    ``null`` and ``${...}`` expressions match any type; an integer-valued number is an
    integer. Diagnostics come in program order.
    """
    resources = schema.get("resources") or {}
    types = schema.get("types") or {}
    out: list[Diagnostic] = []

    def spec_kind(spec: Any) -> tuple[str, Any]:
        """(type name, element spec or nested type token)."""
        if not isinstance(spec, Mapping):
            return "any", None
        ref = spec.get("$ref")
        if isinstance(ref, str):
            if ref.startswith("#/types/"):
                return "object", ref[len("#/types/") :]
            return "any", None
        t = spec.get("type")
        if t in ("string", "number", "integer", "boolean"):
            return str(t), None
        if t == "array":
            return "array", spec.get("items")
        if t == "object":
            return "map", spec.get("additionalProperties")
        return "any", None

    def check_props(value: Mapping[Any, Any], props: Mapping[str, Any] | None, path: str) -> None:
        for key, child in value.items():
            p = f"{path}.{key}"
            if props is None:
                continue
            spec = props.get(str(key))
            if spec is None:
                out.append(Diagnostic(p, "unknown-property", message=f"unknown property {str(key)!r}"))
                continue
            check(child, spec, p, top=True)

    def check(value: Any, spec: Any, path: str, *, top: bool) -> None:
        kind, detail = spec_kind(spec)
        if not top and kind in ("array", "map"):
            kind, detail = "any", None  # nested collections are not described further
        v = _value_kind(value)
        if v in (V_NULL, V_EXPR) or kind == "any":
            return
        ok = {
            "string": v == V_STRING,
            "number": v in (V_NUMBER, V_INTEGER),
            "integer": v == V_INTEGER,
            "boolean": v == V_BOOL,
            "array": v == V_LIST,
            "map": v == V_MAP,
            "object": v == V_MAP,
        }[kind]
        if not ok:
            out.append(
                Diagnostic(
                    path, "wrong-type", kind, VALUE_NAMES[v], message=f"expected {kind}, got {VALUE_NAMES[v]}"
                )
            )
            return
        if kind == "object":
            nested = types.get(detail)
            if isinstance(nested, Mapping):
                check_props(value, nested.get("properties") or {}, path)
        elif kind == "array":
            for i, item in enumerate(value):
                check(item, detail, f"{path}[{i}]", top=False)
        elif kind == "map":
            for key, item in value.items():
                check(item, detail, f"{path}.{key}", top=False)

    for res in program.resources:
        base = f"resources.{res.name}"
        spec = resources.get(res.type)
        if not isinstance(spec, Mapping):
            out.append(
                Diagnostic(f"{base}.type", "unknown-type", message=f"unknown resource type {res.type!r}")
            )
            continue
        if res.properties is None:
            continue
        v = _value_kind(res.properties)
        if v == V_EXPR:
            continue
        if v != V_MAP:
            out.append(
                Diagnostic(
                    f"{base}.properties",
                    "wrong-type",
                    "object",
                    VALUE_NAMES[v],
                    message=f"expected object, got {VALUE_NAMES[v]}",
                )
            )
            continue
        check_props(res.properties, spec.get("inputProperties") or {}, f"{base}.properties")
    return out


# --------------------------------------------------------------------------- sample programs


def sample_program(blob: Any, *, resources: int = 20, seed: int = 0, mistakes: float = 0.2) -> Program:
    """A random program over the resource types of ``blob`` (a :class:`~wasmshare.plugins.SchemaBlob`).

    Values follow the schema; with probability ``mistakes`` each resource, property or
    value gets one of the errors a checker must find: an unknown resource type, a
    misspelt property, a value of the wrong type. ``${...}`` expressions and nested
    objects, arrays and maps appear too. Deterministic for a seed.
    """
    import random

    rnd = random.Random(seed)
    tokens = blob.tokens("resource")
    if not tokens:
        raise ProgramError("the schema has no resource types to sample from")

    def value(prop: Any, depth: int) -> Any:
        t = prop.type
        if rnd.random() < mistakes / 3 and t not in ("any",):
            return 42 if t == "string" else "oops"
        if rnd.random() < 0.03:
            return "${other.arn}"
        if t == "array":
            return [scalar(prop.item_type, prop.ref, depth) for _ in range(rnd.randint(0, 3))]
        if t == "map":
            return {f"k{i}": scalar(prop.item_type, prop.ref, depth) for i in range(rnd.randint(0, 3))}
        return scalar(t, prop.ref, depth)

    def scalar(t: str | None, ref: str | None, depth: int) -> Any:
        if t == "string":
            return rnd.choice(["logs", "us-east-1", "alpha", "10.0.0.0/16", "arn:aws:iam::123:role/x"])
        if t == "integer":
            return rnd.randint(0, 500)
        if t == "number":
            return rnd.choice([0.5, 2, 3.25])
        if t == "boolean":
            return rnd.random() < 0.5
        if t == "object":
            nested = blob.lookup(ref, "object") if ref else None
            return properties(nested.properties if nested else (), depth + 1)
        return rnd.choice(["anything", 1, True])

    def properties(props: Sequence[Any], depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if depth > 3 or not props:
            return out
        for prop in rnd.sample(list(props), k=min(len(props), rnd.randint(1, 6))):
            name = prop.name
            if rnd.random() < mistakes / 3:
                name = name + rnd.choice(["x", "s", "Id"])
            out[name] = value(prop, depth)
        return out

    res = []
    for i in range(resources):
        token = rnd.choice(tokens)
        info = blob.lookup(token)
        props = properties(info.properties if info else (), 0)
        if rnd.random() < mistakes / 2:
            token = token.replace(":", ":x", 1) if rnd.random() < 0.5 else token + "s"
        res.append(Resource(f"r{i}{token.rsplit(':', 1)[-1]}", token, props or None))
    return Program(tuple(res))


def program_yaml(program: Program) -> str:
    """The program as Pulumi-style YAML text (needs PyYAML)."""
    import yaml

    doc = {
        "resources": {
            r.name: {"type": r.type, **({"properties": r.properties} if r.properties is not None else {})}
            for r in program.resources
        }
    }
    return str(yaml.safe_dump(doc, sort_keys=False))
