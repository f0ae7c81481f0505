"""Structured output: constraints compiled by llguidance, masks written in place into the batch."""

from __future__ import annotations

import gzip
import json
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wasmshare.errors import WasmshareError
from wasmshare.llm import Action, Controller, ControllerBatch, Output, TokenTable
from wasmshare.llm import constraints as C

tokenizers = pytest.importorskip("tokenizers", reason="constraints need a Hugging Face tokenizer")
pytest.importorskip("llguidance", reason="constraints need llguidance")
torch = pytest.importorskip("torch", reason="apply() works on torch tensors")

ROOT = Path(__file__).resolve().parent.parent
MASKBENCH = ROOT.parent / "shared" / "maskbench" / "maskbench-dev.jsonl.gz"
CONTROLLERS = ROOT / "guests" / "controllers"

# Valid MaskBench instances in the sample that llguidance rejects by design (asserted: if the
# engine changes, this test says so).
KNOWN_ENGINE_LIMITS = {
    "Github_medium---o61348": "the instance lists properties in another order than the schema; "
    "llguidance generates properties in schema order",
    "Github_ultra---o46322": "an integer written as 6000.0; llguidance's integers have no fraction",
    "JsonSchemaStore---machine.schema": "property order: under oneOf branches with sibling properties "
    "llguidance orders the intersection its own way, neither the instance's nor the schema's",
}


@pytest.fixture(scope="module")
def table() -> TokenTable:
    return TokenTable.deepseek()


@pytest.fixture(scope="module")
def hf(table: TokenTable) -> Any:
    assert table.tokenizer_json is not None
    return tokenizers.Tokenizer.from_str(table.tokenizer_json)


def allowed(batch: ControllerBatch, slot: int, token: int) -> bool:
    return bool((int(batch.mask[slot, token >> 5]) >> (token & 31)) & 1)


def follow(batch: ControllerBatch, table: TokenTable, sid: int, ids: list[int]) -> bool:
    """Feed ``ids`` token by token; True when every token was allowed and the end accepted."""
    slot = batch.slot(sid)
    result = batch.step().results[sid]
    pending = list(result.fast_forward)
    i = 0
    while i < len(ids):
        if pending:
            if ids[i : i + len(pending)] != pending:
                return False
            i += len(pending)
            pending = []
            continue
        if result.action is not Action.CONTINUE or not allowed(batch, slot, ids[i]):
            return False
        result = batch.step({sid: [ids[i]]}).results[sid]
        i += 1
        if result.action is Action.ERROR or result.backtrack:  # a backtrack: the schema checks cut it
            return False
        pending = list(result.fast_forward)
    if pending:
        return False
    eos = table.eos_token
    if result.action is Action.STOP:
        return True
    if result.action is not Action.CONTINUE or eos is None or not allowed(batch, slot, eos):
        return False
    result = batch.step({sid: [eos]}).results[sid]  # EOS: the last checks, the whole schema's included
    return result.action is Action.STOP and not result.backtrack


def maskbench_sample() -> list[dict[str, Any]]:
    if not MASKBENCH.is_file():
        pytest.skip(f"MaskBench data not found at {MASKBENCH}")
    with gzip.open(MASKBENCH, "rt") as f:
        rows = [json.loads(line) for line in f]
    return rows[::26]  # a fixed sample of 305 schemas


def test_maskbench_sample_every_valid_instance_passes_every_invalid_one_is_cut(
    table: TokenTable, hf: Any
) -> None:
    """A fixed sample of the split through grammar + checks: every schema accepted, every valid
    instance (keys in the schema's order, as the grammar writes them) reachable token by token
    and accepted by the checks, every invalid one cut by one of them. The whole split runs in
    ``wasmshare bench grammars``."""
    sample = maskbench_sample()
    assert len(sample) >= 300
    refused: dict[str, str] = {}
    mismatches: dict[str, list[bool]] = {}
    counts = {"valid": 0, "invalid": 0, "checks": 0}
    with ControllerBatch(table, capacity=2) as batch:
        for row in sample:
            spec = C.json_schema(row["schema"], whitespace="flexible")  # instances use any whitespace
            try:
                compiled = C.compile_constraint(spec, table)
            except C.ConstraintError as e:
                refused[row["name"]] = str(e)
                continue
            assert compiled.checker is not None
            counts["checks"] += compiled.plan is not None and compiled.plan.needs_checks
            for test in row["tests"]:
                written = [test["data"]]
                if test["valid"]:  # as written, else with its keys in the schema's order
                    written.append(compiled.checker.in_schema_order(test["data"]))
                ok = False
                for data in written:
                    ids = hf.encode(json.dumps(data, ensure_ascii=False), add_special_tokens=False).ids
                    sid = batch.add(spec)
                    ok = follow(batch, table, sid, ids)
                    if sid in batch.sequences:
                        batch.remove(sid)
                    if ok:
                        break
                counts["valid" if test["valid"] else "invalid"] += 1
                if ok != test["valid"]:
                    mismatches.setdefault(row["name"], []).append(test["valid"])
    print(f"MaskBench sample: {len(sample) - len(refused)} of {len(sample)} schemas accepted; {counts}")
    assert not refused, refused
    assert counts["checks"] >= 30  # the sample holds schemas llguidance alone refuses
    assert set(mismatches) == set(KNOWN_ENGINE_LIMITS), mismatches
    assert all(set(v) == {True} for v in mismatches.values())  # never an invalid instance let through
    assert counts["invalid"] > 600 and counts["valid"] > 350


def _generate(
    batch: ControllerBatch, table: TokenTable, sids: list[int], max_steps: int = 64
) -> dict[int, bytes]:
    """Greedy decoding on random logits under the constraints; returns each output."""
    rng = np.random.default_rng(7)
    out: dict[int, list[int]] = {sid: [] for sid in sids}
    step = batch.step()
    for _ in range(max_steps):
        sampled: dict[int, list[int]] = {}
        logits = torch.from_numpy(
            rng.standard_normal((len(step.sequence_ids), table.vocab_size)).astype(np.float32)
        )
        batch.apply(logits, step)
        for row, sid in enumerate(step.sequence_ids.tolist()):
            result = step.results[sid]
            out[sid] += result.fast_forward
            if result.action is Action.CONTINUE:
                token = int(torch.argmax(logits[row]))
                if token == table.eos_token:
                    batch.remove(sid)
                    continue
                sampled[sid] = [token]
                out[sid].append(token)
            elif sid in batch.sequences:
                batch.remove(sid)
        if not sampled:
            break
        step = batch.step(sampled)
    return {sid: table.decode(ids) for sid, ids in out.items()}


def test_every_constraint_kind_generates_matching_output(table: TokenTable) -> None:
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    with ControllerBatch(table, capacity=8) as batch:
        sids = {
            "schema": batch.add(C.json_schema(schema)),
            "regex": batch.add(C.regex(r"[a-z]{3}-[0-9]{2}")),
            "choice": batch.add(C.choice(["red", "green", "blue"])),
            "grammar": batch.add(C.grammar('start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/')),
        }
        out = _generate(batch, table, list(sids.values()), max_steps=200)
    value = json.loads(out[sids["schema"]])
    assert set(value) == {"name", "age"} and isinstance(value["age"], int) and len(value["name"]) <= 8
    assert re.fullmatch(r"[a-z]{3}-[0-9]{2}", out[sids["regex"]].decode())
    assert out[sids["choice"]].decode() in {"red", "green", "blue"}
    assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", out[sids["grammar"]].decode())


def _deferred_cases(hf: Any) -> list[tuple[C.ConstraintSpec, list[int]]]:
    """Specs with token ids to walk: MaskBench schemas with their instances (the first 150
    tokens), and one of each other kind."""
    cases: list[tuple[C.ConstraintSpec, list[int]]] = []
    for row in maskbench_sample()[::30]:
        for test in row["tests"][:2]:
            text = json.dumps(test["data"], ensure_ascii=False)
            cases.append(
                (
                    C.json_schema(row["schema"], whitespace="flexible"),
                    hf.encode(text, add_special_tokens=False).ids[:150],
                )
            )
    others = [
        (C.regex(r"[a-z]{3}-[0-9]{2}"), "abc-12"),
        (C.regex(r"[0-9]+( [0-9]+)*"), "12 345 6"),  # accepting, yet it may go on: the end-of-text token
        (C.choice(["red", "green", "blue"]), "green"),
        (C.grammar('start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'), "(1+22+3)"),
        (C.stop(["\n\n"]), "Some text.\n\nmore"),
    ]
    cases += [(spec, hf.encode(text, add_special_tokens=False).ids) for spec, text in others]
    return cases


def test_a_deferred_mask_answers_like_the_computed_one(table: TokenTable, hf: Any) -> None:
    """``step(defer_masks=...)`` leaves a constraint's mask uncomputed: its RowOutput asks the
    matcher about single tokens, and computes the mask only on demand. Both must agree with
    the mask an eager twin of the sequence computes at every step, on real schemas, valid and
    invalid instances, and every other constraint kind."""
    rng = np.random.default_rng(3)
    vocab = table.vocab_size
    specials = np.flatnonzero(table.flags & 1)  # special and end-of-text tokens: a sample at each state
    states = 0
    with ControllerBatch(table, capacity=2) as batch:
        for spec, ids in _deferred_cases(hf):
            try:
                C.compile_constraint(spec, table)
            except C.ConstraintError:
                continue
            lazy, eager = batch.add(spec), batch.add(spec)
            step = batch.step(defer_masks={lazy})
            i = 0
            while step.results[lazy].action is Action.CONTINUE:
                result = step.results[lazy]
                twin = step.results[eager]
                assert (result.action, result.fast_forward) == (twin.action, twin.fast_forward)
                forced = list(result.fast_forward)
                if forced:  # forced tokens were consumed by both; follow the instance past them
                    if ids[i : i + len(forced)] != forced:
                        break
                    i += len(forced)
                out = batch.row_outputs(step)[lazy]
                assert out.deferred
                reference = batch.mask[batch.slot(eager)].view(np.uint32).copy()
                if vocab % 32:
                    reference[-1] &= np.uint32((1 << (vocab % 32)) - 1)
                bits = np.unpackbits(reference.view(np.uint8), bitorder="little")[:vocab].astype(bool)
                candidates = set(rng.integers(0, vocab, 400).tolist()) | {table.eos_token or 0}
                candidates |= set(specials[rng.integers(0, specials.size, 100)].tolist())
                allowed_ids = np.flatnonzero(bits)
                if allowed_ids.size:
                    candidates |= set(allowed_ids[rng.integers(0, allowed_ids.size, 200)].tolist())
                if i < len(ids):
                    candidates.add(ids[i])
                wrong = [t for t in candidates if out.allows(t) != bits[t]]
                assert not wrong, (spec.describe(), i, wrong[:5])
                assert np.array_equal(out.words, reference)  # computed on demand
                assert not out.deferred
                assert np.array_equal(batch.mask[batch.slot(lazy)], batch.mask[batch.slot(eager)])
                states += 1
                if i >= len(ids) or not bits[ids[i]]:
                    break
                step = batch.step({lazy: [ids[i]], eager: [ids[i]]}, defer_masks={lazy})
                i += 1
            for sid in (lazy, eager):
                if sid in batch.sequences:
                    batch.remove(sid)
    assert states > 200


def test_apply_and_fill_compute_deferred_masks_first(table: TokenTable) -> None:
    spec = C.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    with ControllerBatch(table, capacity=3) as batch:
        lazy, eager, other = batch.add(spec), batch.add(spec), batch.add(spec)
        step = batch.step(defer_masks={lazy, other})
        logits = batch.apply(torch.zeros((3, table.vocab_size)), step)
        assert torch.equal(torch.isinf(logits[0]), torch.isinf(logits[1]))
        assert torch.isinf(logits[0]).any() and not torch.isinf(logits[0]).all()
        batch.fill_deferred_masks()  # the direct view of the bitmask is whole again
        assert np.array_equal(batch.mask[batch.slot(other)], batch.mask[batch.slot(eager)])


def test_deferred_masks_across_partial_and_plain_steps(table: TokenTable) -> None:
    """A step with ``only=`` keeps the others' deferred masks; a later plain step computes every
    mask again (no flag left over); a deferred RowOutput refuses to answer after the next step."""
    spec = C.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    with ControllerBatch(table, capacity=3) as batch:
        a, b, twin = batch.add(spec), batch.add(spec), batch.add(spec)
        first = batch.step(defer_masks={a})
        stale = batch.row_outputs(first)[a]
        assert stale.deferred
        batch.step({b: []}, only={b})  # a keeps its state, and its waiting mask
        batch.fill_deferred_masks()
        assert np.array_equal(batch.mask[batch.slot(a)], batch.mask[batch.slot(twin)])
        with pytest.raises(WasmshareError, match="only valid until the batch steps again"):
            stale.allows(0)
        batch.mask[batch.slot(a)] = 0
        step = batch.step()  # no deferral asked: every mask computed
        assert not batch.row_outputs(step)[a].deferred
        assert np.array_equal(batch.mask[batch.slot(a)], batch.mask[batch.slot(twin)])


def test_forced_tokens_are_reported_as_fast_forward(table: TokenTable) -> None:
    spec = C.json_schema(
        {"type": "object", "properties": {"tool": {"const": "wasmshare_search"}}, "required": ["tool"]}
    )
    with ControllerBatch(table, capacity=2) as batch:
        sid = batch.add(spec)
        forced = text = b""
        sampled = 0
        result = batch.step().results[sid]
        for _ in range(8):
            forced += table.decode(result.fast_forward)
            text += table.decode(result.fast_forward)
            if b"wasmshare_search" in text or result.action is not Action.CONTINUE:
                break
            token = next(t for t in range(table.vocab_size) if allowed(batch, batch.slot(sid), t))
            text += table.decode([token])
            sampled += 1
            result = batch.step({sid: [token]}).results[sid]
        assert b"wasmshare_search" in forced  # the constant came as fast-forward, not sampled
        assert sampled < len(b"wasmshare_search")


def test_constraints_run_in_worker_processes_with_the_same_outputs(table: TokenTable) -> None:
    """mode="workers" spreads constrained sequences over this thread and worker processes (a GIL
    each): the same outputs as threads; a killed worker ends only its own sequences."""
    import os
    import signal

    specs = [
        C.json_schema({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
        C.regex(r"[a-z]{2}-[0-9]{3}"),
        C.choice(["alpha", "beta"]),
        C.stop(["."]),
    ]
    outputs = {}
    for mode in ("threads", "workers"):
        with ControllerBatch(table, capacity=4, mode=mode, workers=2) as batch:
            sids = [batch.add(spec) for spec in specs]
            if mode == "workers":  # lanes: this thread (-1) and all workers but one
                assert sorted(batch._sequences[sid].worker for sid in sids) == [-1, -1, 0, 0]
            generated = _generate(batch, table, sids, max_steps=40)
            outputs[mode] = [generated[sid] for sid in sids]
    assert outputs["workers"] == outputs["threads"]
    with ControllerBatch(table, capacity=4, mode="workers", workers=2) as batch:
        local, remote = batch.add(specs[1]), batch.add(specs[0])
        assert batch._sequences[local].worker == -1 and batch._sequences[remote].worker == 0
        batch.step()
        victim = batch._workers[0]
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        ok_local = next(t for t in range(table.vocab_size) if allowed(batch, batch.slot(local), t))
        step = batch.step({local: [ok_local], remote: [0]})
        assert step.results[remote].action is Action.ERROR and "worker" in str(step.results[remote].error)
        assert step.results[local].action is Action.CONTINUE
        again = batch.add(specs[2])  # the restarted worker takes new sequences
        assert batch.step({local: [ok_local]}).results[again].action is Action.CONTINUE


def test_stop_constraint_ends_the_sequence_right_after_a_stop_string(table: TokenTable, hf: Any) -> None:
    """Free text is allowed until a stop string (with characters regexes treat specially) is generated."""
    stops = ["END/", "\n\n.*"]
    with ControllerBatch(table, capacity=2) as batch:
        for stop, text in ((stops[0], "hello (world) END/ ignored"), (stops[1], "a + b\n\n.* tail")):
            sid = batch.add(C.stop(stops))
            ids = hf.encode(text, add_special_tokens=False).ids
            result = batch.step().results[sid]
            fed = b""
            for token in ids:
                assert result.action is Action.CONTINUE and allowed(batch, batch.slot(sid), token)
                fed += table.decode([token])
                result = batch.step({sid: [token]}).results[sid]
                if stop.encode() in fed:
                    break
            assert result.action is Action.STOP and fed.endswith(stop.encode())
            batch.remove(sid)
    assert C.stop(["x"]).stop_strings == ["x"] and C.regex("x").stop_strings == []
    with pytest.raises(C.ConstraintError, match="list of non-empty strings"):
        C.stop([""])


def test_a_lexer_that_reached_its_size_cap_is_rebuilt_and_the_sequence_goes_on(
    table: TokenTable, hf: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copies of a compiled template share its lexer, which llguidance caps: a sequence that hits
    the cap gets a rebuilt lexer with its history replayed, and no error."""
    spec = C.json_schema(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        whitespace="flexible",
    )
    compiled = C.compile_constraint(spec, table)

    class CappedOnce:
        """A matcher whose lexer reports the size cap at its next mask."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.capped = inner, False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def unsafe_compute_mask_ptr(self, address: int, nbytes: int) -> None:
            self.capped = True

        def is_error(self) -> bool:
            return self.capped or bool(self.inner.is_error())

        def get_error(self) -> str:
            return (
                "lexer error: too many expressions constructed"
                if self.capped
                else str(self.inner.get_error())
            )

    renewals: list[int] = []
    real_renew = C.CompiledConstraint.renewed_matcher

    def counted(self: Any, history: Any) -> Any:
        renewals.append(len(history))
        return real_renew(self, history)

    monkeypatch.setattr(C.CompiledConstraint, "renewed_matcher", counted)
    text = '{"city": "Paris"}'  # flexible whitespace (above): the deferred step below lands where few ids are allowed
    ids = hf.encode(text, add_special_tokens=False).ids
    with ControllerBatch(table, capacity=2) as batch:
        sid = batch.add(spec)
        instance = batch._sequences[sid].instance
        result = batch.step().results[sid]
        fed = list(result.fast_forward)
        token = ids[len(fed)]
        instance.matcher = CappedOnce(instance.matcher)  # the cap strikes in the middle of a sequence
        result = batch.step({sid: [token]}).results[sid]
        assert result.action is Action.CONTINUE and result.error is None and result.output is Output.BITMASK
        assert renewals == [len(fed)]  # rebuilt once, replaying what came before this step
        fresh = compiled.renewed_matcher(fed + [token] + list(result.fast_forward))
        expected = np.zeros_like(batch.mask[batch.slot(sid)])
        fresh.unsafe_compute_mask_ptr(expected.ctypes.data, expected.nbytes)
        assert np.array_equal(batch.mask[batch.slot(sid)], expected)
        # A deferred mask hits the cap when computed on demand: the same recovery.
        history = fed + [token] + list(result.fast_forward)
        token = ids[len(history)]
        step = batch.step({sid: [token]}, defer_masks={sid})
        history += [token] + list(step.results[sid].fast_forward)
        instance.matcher = CappedOnce(instance.matcher)
        out = batch.row_outputs(step)[sid]
        assert out.deferred and out.allowed is not None and out.allowed.size > 0
        assert renewals[-1] == len(history) and instance.mask_error is None
        fresh = compiled.renewed_matcher(history)
        fresh.unsafe_compute_mask_ptr(expected.ctypes.data, expected.nbytes)
        assert np.array_equal(batch.mask[batch.slot(sid)], expected)


def test_compile_errors_are_clear(table: TokenTable) -> None:
    with pytest.raises(C.ConstraintError, match="example.com/remote.json"):
        C.compile_constraint(C.json_schema({"$ref": "https://example.com/remote.json"}), table)
    one_of = C.compile_constraint(
        C.json_schema({"oneOf": [{"type": "string"}, {"type": "integer"}]}, coerce_one_of=True), table
    )
    assert one_of.plan is not None and one_of.plan.keywords == ("oneOf",)  # still checked exactly
    with pytest.raises(C.ConstraintError, match="regex"):
        C.compile_constraint(C.regex("([a-z"), table)
    with pytest.raises(C.ConstraintError, match="grammar"):
        C.compile_constraint(C.grammar("start: undefined_rule"), table)
    with pytest.raises(C.ConstraintError, match="not valid JSON"):
        C.json_schema("{nope")
    with pytest.raises(C.ConstraintError, match="list of non-empty strings"):
        C.choice("abc")
    with pytest.raises(C.ConstraintError, match="not built from a Hugging Face tokenizer"):
        with TokenTable.from_tokens([b"a", b"b"]) as custom:
            C.compile_constraint(C.regex("a"), custom)


def test_compiled_constraints_are_cached_and_shared(table: TokenTable) -> None:
    first = C.compile_constraint(C.json_schema({"type": "string"}), table)
    again = C.compile_constraint(C.json_schema('{"type": "string"}'), table)
    assert first is again
    with ControllerBatch(table, capacity=4) as batch:
        a, b = batch.add(C.json_schema({"type": "string"})), batch.add(C.json_schema({"type": "string"}))
        step = batch.step()
        assert np.array_equal(batch.mask[batch.slot(a)], batch.mask[batch.slot(b)])
        assert step.results[a].output is Output.BITMASK


@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_constraints_and_wasm_controllers_share_a_batch(table: TokenTable, mode: str) -> None:
    with ControllerBatch(table, capacity=4, mode=mode, workers=1) as batch:
        ctrl = batch.add(Controller(CONTROLLERS / "allow_list.wasm", struct.pack("<2I", 5, 6)))
        cons = batch.add(C.choice(["yes", "no"]))
        step = batch.step()
        assert step.results[ctrl].output is Output.BITMASK and step.results[cons].output is Output.BITMASK
        yes = table.find("yes")
        assert yes is not None and allowed(batch, batch.slot(cons), yes)
        assert not allowed(batch, batch.slot(ctrl), yes)
        step = batch.step({cons: [yes], ctrl: [5]})
        assert step.results[cons].action is Action.STOP
        # A token the constraint forbids ends that sequence alone, with the reason.
        other = batch.add(C.choice(["yes", "no"]))
        batch.step()
        step = batch.step({other: [5]})
        assert step.results[other].action is Action.ERROR and "rejected" in str(step.results[other].error)
        assert step.results[ctrl].action is Action.CONTINUE


TOOL_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_wasm_controller_uses_the_host_grammar_engine(table: TokenTable, hf: Any, mode: str) -> None:
    """tool_call.wasm: free text until a marker, then a schema-constrained JSON call, then stop."""
    arg = "<tool>\n" + json.dumps(TOOL_SCHEMA)
    free = hf.encode("Let me look that up. <tool>", add_special_tokens=False).ids
    call = hf.encode('{"city":"Oslo","days":3}', add_special_tokens=False).ids  # compact separators
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        sid = batch.add(Controller(CONTROLLERS / "tool_call.wasm", arg))
        slot = batch.slot(sid)
        result = batch.step().results[sid]
        for token in free:
            assert result.output is Output.NONE  # free text: no constraint yet
            result = batch.step({sid: [token]}).results[sid]
        assert result.output is Output.BITMASK  # the marker opened the schema constraint
        bad = table.find("Hello")
        assert bad is not None and not allowed(batch, slot, bad)
        for token in call:
            assert result.action is Action.CONTINUE and allowed(batch, slot, token), table.decode([token])
            result = batch.step({sid: [token]}).results[sid]
        assert result.action is Action.STOP
        # A token outside the schema ends the sequence with the controller's error.
        other = batch.add(Controller(CONTROLLERS / "tool_call.wasm", arg))
        batch.step({other: []})
        batch.step({other: hf.encode("<tool>", add_special_tokens=False).ids})
        failed = batch.step({other: [bad]}).results[other]
        assert failed.action is Action.ERROR and "tool_call" in str(failed.error)


def test_tool_call_controller_with_a_bad_schema_fails_alone(table: TokenTable, hf: Any) -> None:
    with ControllerBatch(table, capacity=2) as batch:
        sid = batch.add(Controller(CONTROLLERS / "tool_call.wasm", "<tool>\n{nope"))
        keep = batch.add(C.choice(["a", "b"]))
        batch.step()
        step = batch.step({sid: hf.encode("x <tool>", add_special_tokens=False).ids})
        assert step.results[sid].action is Action.ERROR
        assert step.results[keep].action is Action.CONTINUE


def test_xgrammar_backend_gives_the_same_constraint(table: TokenTable, hf: Any) -> None:
    import importlib.util

    # Not importorskip: importing xgrammar directly would let its tvm-ffi take over SIGSEGV,
    # which wasmtime needs for guest traps; wasmshare imports it with the handlers preserved.
    if importlib.util.find_spec("xgrammar") is None:
        pytest.skip("the xgrammar backend is optional (pip install --no-deps xgrammar)")
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    with ControllerBatch(table, capacity=4, grammar_backend="xgrammar") as batch:
        sids = [
            batch.add(C.json_schema(schema)),
            batch.add(C.choice(["yes", "no"])),
            batch.add(C.regex(r"[0-9]{2}")),
        ]
        for sid, text in zip(sids, ['{"n": 42}', "no", "17"]):
            ids = hf.encode(text, add_special_tokens=False).ids
            assert follow(batch, table, sid, ids), text
        bad = batch.add(C.choice(["yes", "no"]))
        batch.step()
        assert not allowed(batch, batch.slot(bad), table.find("maybe") or 0)
    with pytest.raises(Exception, match="grammar_backend must be one of"):
        ControllerBatch(table, capacity=1, grammar_backend="outlines")  # type: ignore[arg-type]
