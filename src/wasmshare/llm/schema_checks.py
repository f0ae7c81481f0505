"""Enforce a whole JSON Schema on an answer while it is generated: each value checked as it completes.

A :class:`~.schema_plan.SchemaPlan` leaves some keywords out of the grammar. The grammar then
accepts a superset of the schema's instances; these checks take the rest. :class:`JsonScanner`
follows the answer's bytes and reports each JSON value the moment it completes, with its path;
:class:`SchemaChecker` validates a completed value with ``jsonschema`` (format checker on)
against every subschema that governs it, when those are known from the path alone, and the
whole answer against the whole schema at the end. A value that fails can never be part of a
valid answer, so the constraint backtracks out of it right away instead of finishing an
answer that is already lost.

Which subschemas govern a path is decided by the keywords that route a value to them
(``properties``, ``patternProperties``, ``additionalProperties``, ``items``, ``prefixItems``,
``additionalItems``, ``allOf``, local ``$ref``). Below an applicator that chooses among
branches (``anyOf``, ``oneOf``, ``if``, ``dependentSchemas``, ...) the path alone does not
decide, so the value holding the applicator is checked when it completes, and the final check
of the whole answer covers everything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConstraintError
from .schema_plan import SchemaPlan, validator_class

__all__ = ["Completed", "JsonScanner", "Path", "SchemaChecker", "Violation", "json_path"]

Path = tuple[str | int, ...]

# Applicators under which a child's governing subschemas depend on more than its path.
_BRANCHING = frozenset(
    {
        "anyOf",
        "oneOf",
        "if",
        "then",
        "else",
        "dependentSchemas",
        "dependencies",
        "$dynamicRef",
        "$recursiveRef",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_OLD_DRAFTS = ("draft-03", "draft-04", "draft-06", "draft-07")
MAX_MESSAGE = 200
"""Longest validator message carried in a :class:`Violation`."""
_MAX_CACHED_PATHS = 4096


def json_path(path: Path) -> str:
    """``("a", 0, "b c")`` as ``$.a[0]["b c"]``."""
    out = ["$"]
    for part in path:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part):
            out.append(f".{part}")
        else:
            out.append(f"[{json.dumps(part, ensure_ascii=False)}]")
    return "".join(out)


@dataclass(frozen=True)
class Violation:
    """A completed value that the schema rejects."""

    keyword: str
    """The keyword that failed (``uniqueItems``, ``not``, ...)."""
    path: Path
    """Where in the answer: the path of the value the keyword rejected."""
    message: str

    def describe(self) -> str:
        """``'uniqueItems' at $.tags: [1, 1] has non-unique elements`` (one line)."""
        return f"{self.keyword!r} at {json_path(self.path)}: {self.message}"


@dataclass(frozen=True)
class Completed:
    """A JSON value that has just completed in the scanned bytes: its path and byte span."""

    path: Path
    start: int
    end: int


class JsonScanner:
    """Follows JSON text byte by byte and reports each value as it completes.

    Lenient by design: the grammar already guarantees the syntax; the scanner only tracks
    where values start and end and the path to each. A number completes at the byte after it
    (or at :meth:`finish`); strings and containers at their closing byte.
    """

    def __init__(self) -> None:
        self.data = bytearray()
        self.starts: dict[Path, int] = {}  # path -> start offset of the value there (latest)
        self.spans: dict[Path, tuple[int, int]] = {}  # path -> byte span of the completed value there
        self._stack: list[list[Any]] = []  # [kind, path, state, key or index]
        self._root_done = False
        self._in_string = False
        self._escape = False
        self._string_is_key = False
        self._string_start = 0
        self._scalar_start = -1
        self._scalar_path: Path = ()

    @property
    def complete(self) -> bool:
        """Whether the root value has completed."""
        return self._root_done

    @property
    def open_root_scalar(self) -> bool:
        """Whether the answer so far is a number or literal at the root that the end would complete."""
        return not self._stack and self._scalar_start >= 0

    def feed(self, chunk: bytes) -> list[Completed]:
        """Scan ``chunk``; the values it completed, innermost first."""
        out: list[Completed] = []
        base = len(self.data)
        self.data += chunk
        for i, byte in enumerate(chunk):
            self._byte(base + i, byte, out)
        return out

    def finish(self) -> list[Completed]:
        """The answer ended: a number still open at the root completes here."""
        out: list[Completed] = []
        if self._scalar_start >= 0:
            self._end_scalar(len(self.data), out)
        return out

    def _value_path(self) -> Path | None:
        """The path of a value starting now, or None when no value can start here."""
        if not self._stack:
            return None if self._root_done else ()
        frame = self._stack[-1]
        return (*frame[1], frame[3]) if frame[2] == "value" else None

    def _completed(self, path: Path, start: int, end: int, out: list[Completed]) -> None:
        out.append(Completed(path, start, end))
        self.spans[path] = (start, end)
        if not self._stack:
            self._root_done = True
            return
        frame = self._stack[-1]
        frame[2] = "after"

    def _end_scalar(self, offset: int, out: list[Completed]) -> None:
        start, self._scalar_start = self._scalar_start, -1
        self._completed(self._scalar_path, start, offset, out)

    def _byte(self, offset: int, byte: int, out: list[Completed]) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif byte == 0x5C:  # backslash
                self._escape = True
            elif byte == 0x22:  # closing quote
                self._in_string = False
                if self._string_is_key:
                    key_frame = self._stack[-1]
                    try:
                        key_frame[3] = json.loads(bytes(self.data[self._string_start : offset + 1]))
                    except ValueError:
                        key_frame[3] = bytes(self.data[self._string_start + 1 : offset]).decode(
                            "utf-8", "replace"
                        )
                    key_frame[2] = "colon"
                else:
                    path = self._scalar_path
                    self._completed(path, self._string_start, offset + 1, out)
            return
        if self._scalar_start >= 0:
            if byte in b" \t\r\n,]}":
                self._end_scalar(offset, out)
            else:
                return
        if byte in b" \t\r\n":
            return
        frame = self._stack[-1] if self._stack else None
        if frame is not None and byte == (0x5D if frame[0] == "[" else 0x7D):  # ] or }
            self._stack.pop()
            self._completed(frame[1], self.starts.get(frame[1], 0), offset + 1, out)
        elif frame is not None and byte == 0x2C:  # ,
            if frame[0] == "[":
                frame[2], frame[3] = "value", frame[3] + 1
            else:
                frame[2] = "key"
        elif frame is not None and frame[0] == "{" and frame[2] != "value":
            if byte == 0x22:
                self._in_string, self._string_is_key, self._string_start = True, True, offset
            elif byte == 0x3A:
                frame[2] = "value"
        else:
            where = self._value_path()
            if where is None:
                return
            path = where
            self.starts[path] = offset
            if byte == 0x7B:  # {
                self._stack.append(["{", path, "key", None])
            elif byte == 0x5B:  # [
                self._stack.append(["[", path, "value", 0])
            elif byte == 0x22:
                self._in_string, self._string_is_key, self._string_start = True, False, offset
                self._scalar_path = path
            else:
                self._scalar_start, self._scalar_path = offset, path


REGEX_TIMEOUT_S = 0.05
"""Longest one ``pattern`` match may run in a check. Patterns come from clients and Python's
regex engines backtrack: a pattern built to take exponential time would stall the batch."""


class PatternTimeout(Exception):
    """A ``pattern`` match ran past :data:`REGEX_TIMEOUT_S`."""


def _search(pattern: str, text: str) -> bool:
    """Whether ``pattern`` matches somewhere in ``text``, in bounded time (``regex`` module)."""
    import regex

    try:
        return regex.search(pattern, text, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError as e:
        raise PatternTimeout(f"matching /{pattern[:60]}/ took over {REGEX_TIMEOUT_S * 1e3:.0f} ms") from e


def _bounded_validator(cls: Any) -> Any:
    """``cls`` with ``pattern`` and ``patternProperties`` matched by :func:`_search`."""
    import jsonschema

    def pattern(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if validator.is_type(instance, "string") and isinstance(value, str) and not _search(value, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {value!r}")

    def pattern_properties(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        if not validator.is_type(instance, "object") or not isinstance(value, dict):
            return
        for regex_text, subschema in value.items():
            for key, item in instance.items():
                if _search(regex_text, key):
                    yield from validator.descend(item, subschema, path=key, schema_path=regex_text)

    return jsonschema.validators.extend(cls, {"pattern": pattern, "patternProperties": pattern_properties})


class SchemaChecker:
    """The whole schema, checked on completed values (see the module docstring).

    Built once per compiled constraint and shared by its sequences: it holds no sequence state.
    """

    def __init__(self, plan: SchemaPlan) -> None:
        import jsonschema

        self.plan = plan
        self.schema = plan.schema
        draft = validator_class(self.schema)
        cls = _bounded_validator(draft)
        self._old_draft = any(
            d in str(getattr(cls, "META_SCHEMA", {}).get("$schema", "")) for d in _OLD_DRAFTS
        )
        self._prefix_items = not self._old_draft
        try:
            self._validator = cls(self.schema, format_checker=draft.FORMAT_CHECKER)
        except Exception as e:  # noqa: BLE001 - jsonschema raises many kinds for a bad schema
            raise ConstraintError(f"jsonschema cannot use this schema: {e}") from e
        self._flagged = plan.pointers
        self._governing: dict[Path, list[tuple[str, Any]] | None] = {(): [("", self.schema)]}
        self._validators: dict[str, Any] = {"": self._validator}
        self._best_match = jsonschema.exceptions.best_match

    # -- which subschemas govern a path -----------------------------------------------------

    def _resolve(self, ref: str) -> tuple[str, Any] | None:
        """A local ``#/...`` reference as (pointer, node); None for anything else."""
        if ref == "#":
            return "", self.schema
        if not ref.startswith("#/"):
            return None
        node: Any = self.schema
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return ref[1:], node

    def _expand(self, nodes: list[tuple[str, Any]]) -> list[tuple[str, Any]] | None:
        """``nodes`` with local ``$ref`` targets and ``allOf`` branches added; None when a
        reference is not local (the path alone cannot say what governs)."""
        out: list[tuple[str, Any]] = []
        seen: set[str] = set()
        todo = list(nodes)
        while todo:
            pointer, node = todo.pop()
            if pointer in seen or not isinstance(node, dict):
                continue
            seen.add(pointer)
            if len(seen) > 256:
                return None
            ref = node.get("$ref")
            if isinstance(ref, str):
                target = self._resolve(ref)
                if target is None:
                    return None
                todo.append(target)
                if self._old_draft:
                    continue  # up to draft 7, $ref's siblings are ignored
            out.append((pointer, node))
            branches = node.get("allOf")
            if isinstance(branches, list):
                todo.extend((f"{pointer}/allOf/{i}", b) for i, b in enumerate(branches))
        return out

    def _children(self, nodes: list[tuple[str, Any]], key: str | int) -> list[tuple[str, Any]] | None:
        expanded = self._expand(nodes)
        if expanded is None:
            return None
        out: list[tuple[str, Any]] = []
        for pointer, node in expanded:
            if _BRANCHING & node.keys():
                return None
            if pointer and ("$id" in node or isinstance(node.get("id"), str)):
                return None
            if isinstance(key, str):
                matched = False
                props = node.get("properties")
                if isinstance(props, dict) and key in props:
                    out.append((f"{pointer}/properties/{_escape(key)}", props[key]))
                    matched = True
                patterns = node.get("patternProperties")
                if isinstance(patterns, dict):
                    for pattern, sub in patterns.items():
                        try:
                            hit = _search(pattern, key)
                        except Exception:  # noqa: BLE001 - a bad or slow pattern: the path does not decide
                            return None
                        if hit:
                            out.append((f"{pointer}/patternProperties/{_escape(pattern)}", sub))
                            matched = True
                if not matched and "additionalProperties" in node:
                    out.append((f"{pointer}/additionalProperties", node["additionalProperties"]))
            else:
                prefix = node.get("prefixItems") if self._prefix_items else None
                items = node.get("items")
                if isinstance(prefix, list):
                    if key < len(prefix):
                        out.append((f"{pointer}/prefixItems/{key}", prefix[key]))
                    elif "items" in node:
                        out.append((f"{pointer}/items", items))
                elif isinstance(items, list):
                    if key < len(items):
                        out.append((f"{pointer}/items/{key}", items[key]))
                    elif "additionalItems" in node:
                        out.append((f"{pointer}/additionalItems", node["additionalItems"]))
                elif items is not None:
                    out.append((f"{pointer}/items", items))
        return out

    def governing(self, path: Path) -> list[tuple[str, Any]] | None:
        """The subschemas (pointer, node) that govern the value at ``path``; None when the
        path alone does not decide."""
        cache = self._governing
        if path in cache:
            return cache[path]
        parent = self.governing(path[:-1])
        found = None if parent is None else self._children(parent, path[-1])
        if len(cache) > _MAX_CACHED_PATHS:
            cache.clear()
            cache[()] = [("", self.schema)]
        cache[path] = found
        return found

    def wants(self, path: Path) -> bool:
        """Whether the value at ``path`` is checked when it completes: the root always; others
        when their subschemas are known and hold a dropped keyword or a branching applicator."""
        if not path:
            return True
        if not self.plan.needs_checks:
            return False
        nodes = self.governing(path)
        if not nodes:
            return False
        expanded = self._expand(nodes)
        if expanded is None:
            return False
        return any(p in self._flagged or bool(_BRANCHING & n.keys()) for p, n in expanded)

    def _possible(self, nodes: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """``nodes`` with every subschema that *may* apply to the same value: references,
        ``allOf`` and the branches of ``anyOf`` / ``oneOf`` / ``if``-``then``-``else``."""
        out: list[tuple[str, Any]] = []
        seen: set[str] = set()
        todo = list(nodes)
        while todo and len(seen) < 512:
            pointer, node = todo.pop(0)
            if pointer in seen or not isinstance(node, dict):
                continue
            seen.add(pointer)
            out.append((pointer, node))
            ref = node.get("$ref")
            if isinstance(ref, str) and (target := self._resolve(ref)) is not None:
                todo.append(target)
            for key in ("allOf", "anyOf", "oneOf"):
                branches = node.get(key)
                if isinstance(branches, list):
                    todo.extend((f"{pointer}/{key}/{i}", b) for i, b in enumerate(branches))
            for key in ("then", "else"):
                if isinstance(node.get(key), dict):
                    todo.append((f"{pointer}/{key}", node[key]))
        return out

    def property_order(self, path: Path) -> list[str]:
        """The property names every subschema that may apply at ``path`` lists, in their order
        (the order llguidance generates them in), branches included. For reordering an
        instance the way the grammar writes it; not a check."""
        nodes: list[tuple[str, Any]] = [("", self.schema)]
        for part in path:
            children: list[tuple[str, Any]] = []
            for pointer, node in self._possible(nodes):
                if isinstance(part, str):
                    props = node.get("properties")
                    if isinstance(props, dict) and part in props:
                        children.append((f"{pointer}/properties/{_escape(part)}", props[part]))
                    patterns = node.get("patternProperties")
                    if isinstance(patterns, dict):
                        for pattern, sub in patterns.items():
                            try:
                                if _search(pattern, part):
                                    children.append((f"{pointer}/patternProperties/{_escape(pattern)}", sub))
                            except Exception:  # noqa: BLE001 - a bad or slow pattern: not this way
                                continue
                    if isinstance(node.get("additionalProperties"), dict):
                        children.append((f"{pointer}/additionalProperties", node["additionalProperties"]))
                else:
                    for key in ("prefixItems", "items"):
                        items = node.get(key)
                        if isinstance(items, list) and part < len(items):
                            children.append((f"{pointer}/{key}/{part}", items[part]))
                        elif isinstance(items, dict):
                            children.append((f"{pointer}/{key}", items))
                    if isinstance(node.get("additionalItems"), dict):
                        children.append((f"{pointer}/additionalItems", node["additionalItems"]))
            nodes = children
        names: dict[str, None] = {}
        for _, node in self._possible(nodes):
            props = node.get("properties")
            if isinstance(props, dict):
                names.update(dict.fromkeys(props))
        return list(names)

    def in_schema_order(self, value: Any, path: Path = ()) -> Any:
        """``value`` with each object's keys in the order its schema lists them (others after):
        the order the grammar writes them in. JSON objects are unordered; this is how a valid
        instance written in another order is walked token by token."""
        if isinstance(value, dict):
            order = self.property_order(path)
            keys = [k for k in order if k in value] + [k for k in value if k not in order]
            return {k: self.in_schema_order(value[k], (*path, k)) for k in keys}
        if isinstance(value, list):
            return [self.in_schema_order(v, (*path, i)) for i, v in enumerate(value)]
        return value

    def unique_items(self, path: Path) -> bool:
        """Whether the array at ``path`` must hold unique items (and its governing subschemas
        are known): a duplicate among its first elements already dooms it."""
        if not self.plan.needs_checks:
            return False
        nodes = self.governing(path)
        expanded = self._expand(nodes) if nodes else None
        return bool(expanded) and any(n.get("uniqueItems") is True for _, n in expanded or ())

    # -- checking ---------------------------------------------------------------------------

    def check(self, path: Path, value: Any) -> Violation | None:
        """The first violation of ``value`` (the value at ``path``) under the subschemas that
        govern it, or None. The root is checked against the whole schema."""
        nodes = self.governing(path)
        if not nodes:
            return None
        for pointer, node in nodes:
            validator = self._validators.get(pointer)
            if validator is None:
                validator = self._validators[pointer] = self._validator.evolve(schema=node)
            try:
                error = self._best_match(validator.iter_errors(value))
            except Exception as e:  # noqa: BLE001 - a schema jsonschema cannot apply (bad $ref, regex)
                return Violation("$schema", path, f"cannot be checked: {str(e)[:MAX_MESSAGE]}")
            if error is not None:
                where = (*path, *error.absolute_path)
                message = (
                    error.message
                    if len(error.message) <= MAX_MESSAGE
                    else error.message[: MAX_MESSAGE - 3] + "..."
                )
                return Violation(str(error.validator), where, message)
        return None


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")
