"""Plan a JSON Schema for llguidance: the closest grammar it accepts, and what is left to checks.

llguidance refuses a schema that uses a keyword it does not implement (``not``, ``oneOf``,
``dependencies``, ``uniqueItems``, ``if``/``then``/``else``, ``contains``, property counts with
optional keys, an unknown ``format``, a pattern with a look-around, ...). A refused schema is
not a useful answer to a client, and a grammar that silently ignores the keyword returns
invalid answers as valid. :func:`plan_schema` does neither: it *relaxes* exactly what
llguidance refuses (drops the keyword, or turns ``oneOf`` into ``anyOf``), so the grammar
accepts a superset of the schema's instances, and lists every relaxation as a
:class:`Dropped`. :mod:`.schema_checks` then enforces the full schema with ``jsonschema`` on
each value as it completes, and the constraint backtracks out of a value that fails.

Every relaxation only removes assertions: a keyword whose removal would *narrow* the grammar
goes with its partner (``patternProperties`` takes ``additionalProperties`` along, ``if``
takes ``then`` and ``else``). The plan is a function of the schema alone (no tokenizer).
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConstraintError

__all__ = [
    "Dropped",
    "SchemaPlan",
    "check_schema",
    "plan_schema",
    "schema_nodes",
    "validator_class",
    "MAX_RELAXATIONS",
    "PLAN_BUDGET_BYTES",
]

MAX_RELAXATIONS = 24
"""Rounds of compile-and-relax before a schema is refused (each round relaxes one cause)."""

PLAN_BUDGET_BYTES = 8 << 20
"""Schema bytes llguidance may compile for one plan, all rounds together.

A round costs about one compile of the whole schema, so a large schema that needs many
relaxations would hold a server thread for many compiles; past this budget it is refused
with the count instead. It admits every MaskBench schema with room to spare and a schema at
the server's 1 MiB body limit for eight rounds."""

# Keywords whose value is a schema, a list of schemas, or a map of name -> schema: the ones a
# walk over a schema's subschemas descends into. Others hold data (enum, const, default).
_SCHEMA_VALUED = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "contentSchema",
    }
)
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "definitions", "$defs", "dependentSchemas", "dependencies"}
)
_DATA = frozenset({"enum", "const", "default", "examples", "example", "required", "x-guidance"})

_KEPT_BESIDE_REF = frozenset(
    {"$ref", "definitions", "$defs", "$id", "id", "$schema", "title", "description", "$comment", "x-guidance"}
)

# What goes with a dropped keyword so that the grammar only widens.
_TOGETHER = {
    "if": ("if", "then", "else"),
    "then": ("if", "then", "else"),
    "else": ("if", "then", "else"),
    "contains": ("contains", "minContains", "maxContains"),
    "patternProperties": ("patternProperties", "additionalProperties", "unevaluatedProperties"),
    "minProperties": ("minProperties", "maxProperties"),
    "maxProperties": ("minProperties", "maxProperties"),
}


@dataclass(frozen=True)
class Dropped:
    """A keyword the grammar does not enforce, at a schema location, and why."""

    keyword: str
    """The keyword (``not``, ``oneOf``, ``format``, ...) or ``subschema`` for a whole node relaxed."""
    pointer: str
    """JSON pointer of the schema node that holds it (``""`` is the root)."""
    reason: str
    """llguidance's words, one line."""


@dataclass(frozen=True)
class SchemaPlan:
    """A schema as llguidance compiles it, with every relaxation listed."""

    schema: dict[str, Any] | bool
    """The schema as the client gave it: what answers are checked against."""
    grammar_schema: dict[str, Any] | bool
    """The relaxed schema the grammar is built from (equal to ``schema`` when nothing is dropped)."""
    dropped: tuple[Dropped, ...]
    grammar: str
    """llguidance's grammar for ``grammar_schema``, as planning built and validated it."""

    @property
    def needs_checks(self) -> bool:
        """Whether some keyword is enforced by checks instead of the grammar."""
        return bool(self.dropped)

    @property
    def keywords(self) -> tuple[str, ...]:
        """The dropped keywords, each once, in order of first appearance."""
        return tuple(dict.fromkeys(d.keyword for d in self.dropped))

    @property
    def pointers(self) -> frozenset[str]:
        """Schema nodes with a dropped keyword."""
        return frozenset(d.pointer for d in self.dropped)

    def describe(self) -> str:
        """``grammar`` or ``grammar + checks (not, uniqueItems)``: how answers are enforced."""
        return f"grammar + checks ({', '.join(self.keywords)})" if self.dropped else "grammar"


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def schema_nodes(schema: Any, pointer: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every object subschema of ``schema`` with its JSON pointer, the root first.

    Keywords this walk does not know are descended into as well when they hold objects:
    ``$ref`` may point anywhere in the document (``#/components/schemas/x``). Data keywords
    (``enum``, ``const``, ``default``, ...) are not."""
    if not isinstance(schema, dict):
        return
    yield pointer, schema
    for key, value in schema.items():
        if key in _DATA:
            continue
        here = f"{pointer}/{_escape(key)}"
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from schema_nodes(sub, f"{here}/{_escape(name)}")
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            for i, sub in enumerate(value):
                yield from schema_nodes(sub, f"{here}/{i}")
        elif key in _SCHEMA_VALUED or (key not in _SCHEMA_MAPS and not key.startswith("$")):
            if isinstance(value, dict):
                yield from schema_nodes(value, here)
            elif isinstance(value, list) and key not in _SCHEMA_VALUED:
                for i, sub in enumerate(value):
                    yield from schema_nodes(sub, f"{here}/{i}")


def _node_at(schema: Any, pointer: str) -> Any:
    node = schema
    for part in pointer.split("/")[1:] if pointer else []:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


_NEW_DRAFT_KEYWORDS = frozenset(
    {
        "prefixItems",
        "$defs",
        "dependentRequired",
        "dependentSchemas",
        "unevaluatedProperties",
        "unevaluatedItems",
        "$anchor",
        "$dynamicRef",
        "minContains",
        "maxContains",
    }
)


def validator_class(schema: Any) -> Any:
    """The ``jsonschema`` validator class for ``schema``: its ``$schema``, else draft 7 or,
    when it uses keywords only later drafts have, 2020-12."""
    import jsonschema

    if isinstance(schema, dict) and isinstance(schema.get("$schema"), str):
        cls = jsonschema.validators.validator_for(schema, default=None)
        if cls is not None:
            return cls
    text = json.dumps(schema)
    if any(f'"{k}"' in text for k in _NEW_DRAFT_KEYWORDS):
        return jsonschema.Draft202012Validator
    return jsonschema.Draft7Validator


def check_schema(schema: Any) -> None:
    """Raise :class:`ConstraintError` when ``schema`` is not valid under its own draft's metaschema.

    Before any relaxing: a relaxation would otherwise turn a mistake (``"type": "nonsense"``)
    into a schema that accepts anything."""
    import jsonschema

    cls = validator_class(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/" + "/".join(str(p) for p in e.absolute_path) if e.absolute_path else "the root"
        raise ConstraintError(f"not a valid JSON Schema at {where}: {e.message[:160]}") from None


class _Relaxer:
    """One schema being relaxed: a private copy and the relaxations made so far."""

    def __init__(self, schema: Any) -> None:
        self.schema = copy.deepcopy(schema)
        self.dropped: list[Dropped] = []

    def drop(
        self, keywords: set[str], reason: str, *, where: Callable[[dict[str, Any]], bool] | None = None
    ) -> bool:
        """Drop ``keywords`` (and their partners) from every node (``where`` it holds); any dropped?"""
        wanted = set(keywords)
        for keyword in keywords:
            wanted.update(_TOGETHER.get(keyword, ()))
        changed = False
        for pointer, node in list(schema_nodes(self.schema)):
            if where is not None and not where(node):
                continue
            for keyword in sorted(wanted & node.keys(), key=list(node).index):
                del node[keyword]
                self.dropped.append(Dropped(keyword, pointer, reason))
                changed = True
        return changed

    def drop_ref_siblings(self, reason: str) -> bool:
        """Drop the assertions beside every ``$ref`` (kept: definitions and annotations)."""
        changed = False
        for pointer, node in list(schema_nodes(self.schema)):
            if not isinstance(node.get("$ref"), str):
                continue
            siblings = [k for k in node if k not in _KEPT_BESIDE_REF]
            for key in siblings:
                del node[key]
            if siblings:
                self.dropped.append(Dropped("$ref siblings", pointer, reason))
                changed = True
        return changed

    def coerce_one_of(self, reason: str) -> bool:
        """``oneOf`` → ``anyOf`` everywhere (llguidance's ``coerce_one_of``); each noted."""
        if not isinstance(self.schema, dict):
            return False
        nodes = [p for p, node in schema_nodes(self.schema) if "oneOf" in node]
        guidance = self.schema.get("x-guidance")
        guidance = dict(guidance) if isinstance(guidance, dict) else {}
        if not nodes or guidance.get("coerce_one_of"):
            return False
        self.schema["x-guidance"] = {**guidance, "coerce_one_of": True}
        self.dropped.extend(Dropped("oneOf", p, reason) for p in nodes)
        return True

    def relax_node(self, pointer: str, reason: str) -> bool:
        """Replace the node at ``pointer`` by ``{}`` (any value); whether there was one to relax."""
        if pointer == "":
            return False  # the whole schema would be any JSON: refuse instead
        parent_pointer, _, last = pointer.rpartition("/")
        parent = _node_at(self.schema, parent_pointer)
        key: Any = last.replace("~1", "/").replace("~0", "~")
        if isinstance(parent, list) and key.isdigit():
            key = int(key)
        elif not isinstance(parent, dict) or key not in parent:
            return False
        if parent[key] in ({}, True):
            return False
        parent[key] = {}
        self.dropped.append(Dropped("subschema", pointer, reason))
        return True


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[([^\]]*)\]")
_UNKNOWN_FORMAT = re.compile(r"Unknown format:[ ]?(.*)")
_NOT_DISJOINT = re.compile(r"patternProperty regexes /(.*)/ and /(.*)/ are not disjoint")
_CIRCULAR = re.compile(r"sibling keys are not supported: (\S*?)#(/\S*)")
_WHERE = re.compile(r"while processing (\S*?)#(/\S*)")


def _accepted(schema: dict[str, Any]) -> bool:
    """Whether llguidance accepts the small ``schema`` (one keyword tried on its own)."""
    return _llguidance_grammar(json.dumps(schema))[0] is not None


def _regex_ok(pattern: str) -> bool:
    """Whether llguidance accepts ``pattern`` as a JSON Schema ``pattern``."""
    return _accepted({"type": "string", "pattern": pattern})


@functools.lru_cache(maxsize=256)
def _format_ok(name: Any) -> bool:
    """Whether llguidance knows ``format: name`` (no format at all counts as known)."""
    return not isinstance(name, str) or _accepted({"type": "string", "format": name})


def _relax_once(relaxer: _Relaxer, message: str) -> bool:
    """Relax what ``message`` (llguidance's refusal) names; whether anything changed."""
    first = message.strip().splitlines()[0] if message.strip() else message
    reason = first[:200]
    if (m := _UNIMPLEMENTED.search(message)) is not None:
        keys = {k.strip().strip('"') for k in m.group(1).split(",") if k.strip()}
        return relaxer.drop(keys, reason)
    if "oneOf constraints are not supported" in message:
        return relaxer.coerce_one_of(reason)
    if (m := _UNKNOWN_FORMAT.search(first)) is not None:
        name = m.group(1).strip()
        return relaxer.drop(
            {"format"},
            reason,
            where=lambda node: node.get("format") == name or not _format_ok(node.get("format")),
        )
    if "min/maxProperties" in message:
        return relaxer.drop({"minProperties"}, reason)
    if (m := _NOT_DISJOINT.search(message)) is not None:
        names = {m.group(1), m.group(2)}
        return relaxer.drop(
            {"patternProperties"},
            reason,
            where=lambda node: (
                isinstance(node.get("patternProperties"), dict)
                and bool(names & node["patternProperties"].keys())
            ),
        )
    if "regex" in message or "look-around" in message or "lookaround" in message:
        changed = relaxer.drop(
            {"pattern"},
            reason,
            where=lambda node: isinstance(node.get("pattern"), str) and not _regex_ok(node["pattern"]),
        )
        changed |= relaxer.drop(
            {"patternProperties"},
            reason,
            where=lambda node: (
                isinstance(node.get("patternProperties"), dict)
                and not all(_regex_ok(k) for k in node["patternProperties"])
            ),
        )
        if changed:
            return True
    if "Unable to determine if regex is empty" in message:
        named = set(re.findall(r"Regex /(.*?)/\)", message))
        if relaxer.drop({"pattern"}, reason, where=lambda node: node.get("pattern") in named):
            return True
    if "circular references with sibling keys" in message:
        # Siblings of $ref are ignored up to draft 7 and an intersection after it: dropping
        # them only widens the grammar.
        if relaxer.drop_ref_siblings(reason):
            return True
        if (m := _CIRCULAR.search(message)) is not None:
            return relaxer.relax_node(m.group(2), reason)
    if (m := _WHERE.search(message)) is not None:
        return relaxer.relax_node(m.group(2), reason)
    if "Schema intersection stack level exceeded" in message:
        return relaxer.drop({"allOf"}, reason)
    return False


def _llguidance_grammar(schema_text: str) -> tuple[str | None, str | None]:
    """(llguidance's grammar for a schema's JSON, None) when it accepts it, else (None, its refusal)."""
    import llguidance

    try:
        text = str(llguidance.LLMatcher.grammar_from_json_schema(schema_text))
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, None)
    except Exception as e:  # noqa: BLE001 - llguidance raises ValueError and others for bad input
        return None, str(e) or type(e).__name__
    return (None, "\n".join(str(m) for m in messages)) if is_error else (text, None)


def plan_schema(schema: dict[str, Any] | bool, *, checks: bool = True) -> SchemaPlan:
    """The grammar llguidance compiles for ``schema`` and the keywords left to checks.

    With ``checks=False`` nothing is relaxed: a schema llguidance refuses raises
    :class:`ConstraintError` with its words (the strict behaviour). Otherwise each refusal is
    relaxed in turn until llguidance accepts the schema; one it cannot relax (a remote
    ``$ref``, a schema too large) raises with the reason. ``oneOf`` already coerced by the
    client's ``x-guidance`` is listed as dropped, so its checks run too.
    """
    try:
        return _plan(schema, checks)
    except RecursionError:
        raise ConstraintError("the schema is nested too deep") from None


def _plan(schema: dict[str, Any] | bool, checks: bool) -> SchemaPlan:
    if checks:
        check_schema(schema)
    relaxer = _Relaxer(schema)
    if isinstance(relaxer.schema, dict):
        guidance = relaxer.schema.get("x-guidance")
        if isinstance(guidance, dict) and guidance.get("coerce_one_of"):
            relaxer.dropped.extend(
                Dropped("oneOf", p, "coerce_one_of")
                for p, node in schema_nodes(relaxer.schema)
                if "oneOf" in node
            )
    refusal: str | None = None
    compiled = 0
    for rounds in range(MAX_RELAXATIONS):
        text = json.dumps(relaxer.schema)
        compiled += len(text)
        if rounds and compiled > PLAN_BUDGET_BYTES:
            raise ConstraintError(
                f"the schema needs more relaxing than planning allows ({rounds} rounds over "
                f"{compiled >> 10} KiB compiled); simplify it or drop the keywords llguidance refuses"
            )
        grammar, refusal = _llguidance_grammar(text)
        if grammar is not None:
            return SchemaPlan(schema, relaxer.schema, tuple(relaxer.dropped), grammar)
        assert refusal is not None
        if not checks or not _relax_once(relaxer, refusal):
            raise ConstraintError(one_line([refusal]))
    raise ConstraintError(f"still refused after {MAX_RELAXATIONS} relaxations: {one_line([refusal or ''])}")


def one_line(messages: Sequence[str]) -> str:
    """llguidance's multi-line diagnostics as one line: the ``error:`` line of a regex parse
    error when there is one, else the first line of each message."""
    parts = []
    for message in messages:
        lines = [line.strip() for line in str(message).splitlines() if line.strip()]
        detail = next((line.removeprefix("error: ") for line in lines if line.startswith("error:")), None)
        head = lines[0] if lines else ""
        if detail is not None:
            head = head.split(" (in ", 1)[0].split(": regex parse error", 1)[0]
            parts.append(f"{head}: {detail}")
        elif head:
            parts.append(head)
    return "; ".join(parts) or "refused"
