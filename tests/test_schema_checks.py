"""JSON Schemas llguidance refuses: relaxed grammar + exact checks + bounded repair by backtracking."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from wasmshare.errors import ConstraintError
from wasmshare.llm import constraints as C
from wasmshare.llm._answer_checks import MAX_REPAIRS
from wasmshare.llm.batch import ControllerBatch
from wasmshare.llm.results import Action
from wasmshare.llm.schema_checks import JsonScanner, SchemaChecker, json_path
from wasmshare.llm.schema_plan import plan_schema, validator_class
from wasmshare.llm.tokens import TokenTable

tokenizers = pytest.importorskip("tokenizers")


def _obj(props: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
        **extra,
    }


# keyword -> (schema, a valid instance, an invalid instance the relaxed grammar alone accepts)
CASES: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "not": (
        _obj({"name": {"type": "string", "not": {"enum": ["Bob", "Ann"]}}}),
        {"name": "Eve"},
        {"name": "Bob"},
    ),
    "oneOf": (
        _obj({"n": {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "multipleOf": 2}]}}),
        {"n": 3},
        {"n": 4},
    ),
    "format": (
        _obj({"link": {"type": "string", "format": "uri-reference"}}),
        {"link": "a/b"},
        {"link": "a b\\"},
    ),
    "dependencies": (
        {
            "type": "object",
            "properties": {"card": {"type": "integer"}, "billing": {"type": "string"}},
            "dependencies": {"card": ["billing"]},
            "additionalProperties": False,
        },
        {"card": 1, "billing": "x"},
        {"card": 1},
    ),
    "uniqueItems": (
        _obj({"tags": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}),
        {"tags": [1, 2]},
        {"tags": [1, 1]},
    ),
    "if": (
        _obj(
            {"kind": {"enum": ["a", "b"]}, "size": {"type": "integer"}},
            **{
                "if": {"properties": {"kind": {"const": "a"}}},
                "then": {"properties": {"size": {"maximum": 5}}},
            },
        ),
        {"kind": "a", "size": 3},
        {"kind": "a", "size": 9},
    ),
    "contains": (
        _obj(
            {"xs": {"type": "array", "items": {"type": "integer"}, "maxItems": 4, "contains": {"const": 7}}}
        ),
        {"xs": [1, 7]},
        {"xs": [1, 2]},
    ),
    "minProperties": (
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "additionalProperties": {"type": "integer"},
            "minProperties": 2,
        },
        {"a": 1, "b": 2},
        {"a": 1},
    ),
    "propertyNames": (
        {"type": "object", "additionalProperties": {"type": "integer"}, "propertyNames": {"maxLength": 3}},
        {"ab": 1},
        {"abcd": 1},
    ),
    "pattern": (
        _obj({"code": {"type": "string", "maxLength": 6, "pattern": "^(?!x)[a-z]+$"}}),
        {"code": "abc"},
        {"code": "xyz"},
    ),
}


def _valid(value: Any, schema: dict[str, Any]) -> bool:
    """``value`` under ``schema`` by jsonschema alone, the draft chosen as the checks choose it."""
    cls = validator_class(schema)
    return bool(cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(value))


@pytest.fixture(scope="module")
def table() -> TokenTable:
    return TokenTable.deepseek()


@pytest.fixture(scope="module")
def hf(table: TokenTable) -> Any:
    assert table.tokenizer_json is not None
    return tokenizers.Tokenizer.from_str(table.tokenizer_json)


def walk(batch: ControllerBatch, table: TokenTable, hf: Any, spec: C.ConstraintSpec, value: Any) -> str:
    """Feed ``value`` token by token: ``passed``, or who cut it (``grammar`` or ``checks``)."""
    ids = hf.encode(json.dumps(value, separators=(",", ":")), add_special_tokens=False).ids
    sid = batch.add(spec)
    slot = batch.slot(sid)
    try:
        result = batch.step().results[sid]
        pending, i = list(result.fast_forward), 0
        while True:
            if result.backtrack:
                return "checks"
            if result.action is Action.ERROR:
                return "checks" if "violates the schema" in str(result.error) else "grammar"
            if pending:
                if ids[i : i + len(pending)] != pending:
                    return "grammar"
                i, pending = i + len(pending), []
                continue
            if result.action is Action.STOP:
                return "passed" if i == len(ids) else "grammar"
            token = ids[i] if i < len(ids) else table.eos_token
            assert token is not None
            if not (int(batch.mask[slot, token >> 5]) >> (token & 31)) & 1:
                return "grammar"
            result = batch.step({sid: [token]}).results[sid]
            i += 1
            pending = list(result.fast_forward)
    finally:
        if sid in batch.sequences:
            batch.remove(sid)


@pytest.mark.parametrize("keyword", sorted(CASES))
def test_a_dropped_keyword_passes_valid_and_cuts_invalid(keyword: str, table: TokenTable, hf: Any) -> None:
    schema, good, bad = CASES[keyword]
    assert _valid(good, schema) and not _valid(bad, schema)
    with pytest.raises(ConstraintError):
        plan_schema(schema, checks=False)  # llguidance alone refuses it
    plan = plan_schema(schema)
    assert keyword in plan.keywords, plan.dropped
    assert plan.describe().startswith("grammar + checks (")
    spec = C.json_schema(schema)
    assert C.enforcement(spec) == plan.describe()
    with ControllerBatch(table, capacity=2) as batch:
        assert walk(batch, table, hf, spec, good) == "passed"
        assert walk(batch, table, hf, spec, bad) == "checks"  # the grammar let it through; the checks did not


def test_a_schema_llguidance_accepts_is_enforced_by_the_grammar_alone() -> None:
    plan = plan_schema(_obj({"a": {"type": "integer"}}))
    assert not plan.needs_checks and plan.describe() == "grammar"
    assert C.enforcement(C.regex("a+")) is None


def test_what_cannot_be_planned_is_refused_in_one_line() -> None:
    with pytest.raises(ConstraintError, match="not present in a registry") as e:
        plan_schema({"$ref": "https://example.com/remote.json"})  # never fetched
    assert "\n" not in str(e.value)
    for depth in (900, 5000):  # past Python's recursion limit, in the walk or in json itself
        deep: Any = {"type": "integer", "not": {"const": 1}}
        for _ in range(depth):
            deep = {"items": deep}
        with pytest.raises(ConstraintError, match="deep|recursion"):
            C.check_spec(C.json_schema(deep))


def test_every_unknown_format_goes_in_one_round() -> None:
    names = ["", *(f"made-up-{i}" for i in range(30))]  # "" is a real schema's
    schema = _obj({f"p{i}": {"type": "string", "format": name} for i, name in enumerate(names)})
    plan = plan_schema(schema)  # one round per name would pass MAX_RELAXATIONS
    expected = sorted(f"/properties/p{i}" for i in range(len(names)))
    assert sorted(d.pointer for d in plan.dropped) == expected
    assert plan.keywords == ("format",)


def test_a_large_schema_that_needs_many_relaxations_is_refused_with_the_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from wasmshare.llm import schema_plan

    schema = _obj(
        {
            "a": {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "multipleOf": 2}]},
            "b": {"type": "string", "format": "made-up"},
            "c": {"type": "integer", "not": {"const": 1}},
        }
    )
    assert len(plan_schema(schema).keywords) == 3  # three rounds, within the real budget
    monkeypatch.setattr(schema_plan, "PLAN_BUDGET_BYTES", 2 * len(json.dumps(schema)))
    with pytest.raises(ConstraintError, match=r"needs more relaxing than planning allows \(2 rounds"):
        plan_schema(schema)


def test_dropping_pattern_properties_takes_additional_properties_along() -> None:
    """The grammar must only widen: without its patternProperties, additionalProperties: false
    would refuse the very keys they allowed."""
    schema = {"patternProperties": {"^(?=a)": {"type": "integer"}}, "additionalProperties": False}
    plan = plan_schema(schema)
    assert {"patternProperties", "additionalProperties"} <= set(plan.keywords)
    assert plan.grammar_schema == {}


def test_the_scanner_reports_each_value_with_its_path() -> None:
    scanner = JsonScanner()
    doc = b'{"a": [1, {"b c": "x\\"y"}], "n": null, "e": []}'
    done = []
    for i in range(0, len(doc), 3):
        done += scanner.feed(doc[i : i + 3])
    done += scanner.finish()
    assert [(json_path(c.path), doc[c.start : c.end].decode()) for c in done] == [
        ("$.a[0]", "1"),
        ('$.a[1]["b c"]', '"x\\"y"'),
        ("$.a[1]", '{"b c": "x\\"y"}'),
        ("$.a", '[1, {"b c": "x\\"y"}]'),
        ("$.n", "null"),
        ("$.e", "[]"),
        ("$", doc.decode()),
    ]
    number = JsonScanner()
    assert number.feed(b"-12") == [] and [c.path for c in number.finish()] == [()]


def test_a_value_is_checked_against_what_governs_its_path() -> None:
    schema = {
        "definitions": {"tag": {"type": "string", "not": {"const": "x"}}},
        "properties": {"tags": {"type": "array", "items": {"$ref": "#/definitions/tag"}}},
        "patternProperties": {"^n": {"type": "integer", "not": {"const": 0}}},
    }
    checker = SchemaChecker(plan_schema(schema))
    assert checker.wants(("tags", 0)) and checker.wants(("n1",))
    found = checker.check(("tags", 2), "x")
    assert found is not None and found.keyword == "not" and json_path(found.path) == "$.tags[2]"
    assert checker.check(("tags", 0), "y") is None
    assert checker.check(("n1",), 0) is not None and checker.check(("n1",), 3) is None
    branching = SchemaChecker(
        plan_schema({"anyOf": [{"properties": {"a": {"not": {"const": 1}}}}, {"type": "array"}]})
    )
    assert branching.governing(("a",)) is None  # under anyOf the path alone does not decide
    assert branching.wants(())  # the whole answer is checked at the end


def test_a_hostile_pattern_is_checked_in_bounded_time() -> None:
    schema = {"type": "string", "pattern": "^(?=a)(a|aa)+$"}  # look-ahead: left to the checks
    checker = SchemaChecker(plan_schema(schema))
    started = time.perf_counter()
    found = checker.check((), "a" * 60 + "b")
    assert time.perf_counter() - started < 2.0
    assert found is not None and "took over" in found.message  # refused, not hung


def test_a_repair_forbids_the_rejected_token_and_the_bound_ends_with_the_named_error(
    table: TokenTable, hf: Any
) -> None:
    """Feeding a duplicate again and again: each one is backtracked out with a token forbidden,
    until the bound, where the row ends naming the keyword and the JSON path."""
    schema = _obj({"tags": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}})
    spec = C.json_schema(schema)
    prefix = hf.encode('{"tags":[1', add_special_tokens=False).ids
    with ControllerBatch(table, capacity=1) as batch:
        sid = batch.add(spec)
        step = batch.step()
        history = list(step.results[sid].fast_forward)
        for token in prefix[len(history) :]:
            step = batch.step({sid: [token]})
            history += [token, *step.results[sid].fast_forward]
        comma = hf.encode(",", add_special_tokens=False).ids
        one = hf.encode("1", add_special_tokens=False).ids
        batch.step({sid: comma})  # the first 1 completes
        repairs = 0
        for n in range(MAX_REPAIRS + 1):
            batch.step({sid: one})  # a repeat: complete once the next comma comes
            result = batch.step({sid: comma}).results[sid]
            if result.action is Action.ERROR:
                break
            assert result.backtrack == 2  # the repeated 1 and its comma are taken back ...
            slot = batch.slot(sid)
            assert not (int(batch.mask[slot, one[0] >> 5]) >> (one[0] & 31)) & 1  # ... and 1 forbidden
            repairs += 1
            batch.step({sid: hf.encode(str(n + 2), add_special_tokens=False).ids})
            batch.step({sid: comma})
        assert result.action is Action.ERROR
        assert "'uniqueItems' at $.tags[" in str(result.error) and f"after {MAX_REPAIRS} repairs" in str(
            result.error
        )
        assert repairs == MAX_REPAIRS


def test_without_backtracking_a_violation_ends_the_row_with_its_name(table: TokenTable, hf: Any) -> None:
    schema, _, bad = CASES["not"]
    with ControllerBatch(table, capacity=1) as batch:
        batch.constraint_repairs = False  # as the transformers adapter and vLLM set it
        spec = C.json_schema(schema)
        ids = hf.encode(json.dumps(bad, separators=(",", ":")), add_special_tokens=False).ids
        sid = batch.add(spec)
        step = batch.step()
        fed = list(step.results[sid].fast_forward)
        for token in ids[len(fed) :]:
            step = batch.step({sid: [token]})
            if step.results[sid].action is Action.ERROR:
                break
            fed += [token, *step.results[sid].fast_forward]
        result = step.results[sid]
        assert result.action is Action.ERROR and not result.backtrack
        assert "answer violates the schema: 'not' at $.name" in str(result.error)


@pytest.fixture(scope="module")
def loaded() -> Any:
    torch = pytest.importorskip("torch")
    from wasmshare.errors import ModelError
    from wasmshare.llm.models import load_model

    torch.set_num_threads(2)
    try:
        return load_model("smollm2-135m")
    except ModelError as e:
        pytest.skip(f"embedded model not installed: {e}")


def _prompt(keyword: str) -> str:
    """Show the invalid instance as the shape to follow, so a model that copies it needs a repair
    (the valid one where the tiny model, shown the invalid one, rambles instead)."""
    schema, good, bad = CASES[keyword]
    return f"Reply with one JSON object like this one: {json.dumps(good if keyword in ('contains', 'pattern') else bad)}"


@pytest.mark.parametrize(
    "settings",
    [
        {},  # threads, deferred masks, sparse application where it pays
        {"defer_masks": False, "mask_apply": "dense"},
        {"mode": "workers"},
    ],
    ids=["deferred-sparse", "eager-dense", "workers"],
)
def test_generated_answers_validate_under_the_full_schema(loaded: Any, settings: dict[str, Any]) -> None:
    from wasmshare.llm.engine import Engine, GenerationRequest

    names = sorted(CASES)
    requests = [GenerationRequest(_prompt(k), max_tokens=40, steer=C.json_schema(CASES[k][0])) for k in names]
    with Engine(loaded, max_batch=8, **settings) as engine:
        results = engine.generate(requests)
    for keyword, result in zip(names, results):
        schema = CASES[keyword][0]
        assert result.finish_reason == "stop", (keyword, result.text, result.error)
        assert _valid(json.loads(result.text), schema), (keyword, result.text)
        assert result.enforced_by == C.schema_plan(C.json_schema(schema)).describe()
    repaired = [k for k, r in zip(names, results) if r.backtracks]
    assert len(repaired) >= 5, repaired  # shown an invalid shape, the model needed repairs


def test_a_request_beside_a_failing_one_is_untouched(loaded: Any) -> None:
    """A schema no answer of this model meets within the bound ends alone, with its named error."""
    from wasmshare.llm.engine import Engine, GenerationRequest

    impossible = {"type": "string", "maxLength": 2, "not": {"pattern": "^"}}  # every string matches "^"
    plain = GenerationRequest("Say hi.", max_tokens=8)
    with Engine(loaded, max_batch=2) as engine:
        [alone] = engine.generate([plain])
        bad, beside = engine.generate(
            [GenerationRequest("x", max_tokens=40, steer=C.json_schema(impossible)), plain]
        )
    assert bad.finish_reason == "error" and "answer violates the schema" in (bad.error or "")
    assert "'not' at $" in (bad.error or "")
    assert beside.text == alone.text and beside.finish_reason == alone.finish_reason


def test_a_root_number_that_would_fail_cannot_end_there(table: TokenTable, hf: Any) -> None:
    """The engine ends a row on EOS without another step, so the end of a root number is
    checked before EOS is allowed: EOS is masked out where the number would fail."""
    schema = {"type": "integer", "minimum": 0, "maximum": 99, "not": {"const": 3}}
    eos = table.eos_token
    assert eos is not None
    with ControllerBatch(table, capacity=1) as batch:
        sid = batch.add(C.json_schema(schema))
        batch.step()
        slot = batch.slot(sid)
        three = hf.encode("3", add_special_tokens=False).ids
        batch.step({sid: three})
        assert not (int(batch.mask[slot, eos >> 5]) >> (eos & 31)) & 1  # "3" may not end here
        assert (int(batch.mask[slot, three[0] >> 5]) >> (three[0] & 31)) & 1  # "33" may follow
        batch.remove(sid)
        sid = batch.add(C.json_schema(schema))
        batch.step()
        batch.step({sid: hf.encode("4", add_special_tokens=False).ids})
        slot = batch.slot(sid)
        assert (int(batch.mask[slot, eos >> 5]) >> (eos & 31)) & 1  # "4" may
