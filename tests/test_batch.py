"""ControllerBatch: every result kind, continuous batching, both execution modes, hostile controllers."""

from __future__ import annotations

import os
import signal
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from wasmshare.errors import AbiMismatch, GuestError, WasmshareError
from wasmshare.llm.batch import Action, BatchFull, ControllerBatch, Output, SequenceFailed
from wasmshare.llm.controller import Controller
from wasmshare.llm.limits import Limits
from wasmshare.llm.tokens import TokenTable

torch = pytest.importorskip("torch", reason="apply() works on torch tensors")

CONTROLLERS = Path(__file__).resolve().parent.parent / "guests" / "controllers"
WORDS = [b" hello", b"world", b" world", b" bad", b"badge", b"good", b"<eos>"]


@pytest.fixture(scope="module")
def table() -> Iterator[TokenTable]:
    tokens = [bytes([i]) for i in range(256)] + WORDS + [b"x%d" % i for i in range(700)]
    eos = 256 + WORDS.index(b"<eos>")
    with TokenTable.from_tokens(tokens, special=[eos], eos_token=eos, name="test") as t:
        yield t


def tid(word: bytes) -> int:
    return 256 + WORDS.index(word)


def ctrl(name: str, arg: bytes | str = b"") -> Controller:
    return Controller(CONTROLLERS / f"{name}.wasm", arg)


def u32s(*ids: int) -> bytes:
    return struct.pack(f"<{len(ids)}I", *ids)


def allowed_ids(batch: ControllerBatch, slot: int) -> list[int]:
    words = batch.mask[slot].view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: batch.vocab_size]
    return np.flatnonzero(bits).tolist()


@pytest.fixture(params=["threads", "workers"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_bitmask_result_is_written_in_place_and_applied(table: TokenTable, mode: str) -> None:
    with ControllerBatch(table, capacity=4, mode=mode, workers=2) as batch:
        seq = batch.add(ctrl("allow_list", u32s(5, 300, 700)), prompt=[1, 2, 3])
        step = batch.step()
        result = step.results[seq]
        assert result.action is Action.CONTINUE and result.output is Output.BITMASK
        assert allowed_ids(batch, batch.slot(seq)) == [5, 300, 700]
        logits = torch.zeros(1, table.vocab_size)
        batch.apply(logits, step)
        assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [5, 300, 700]
        # A wider logits tensor (padded vocabulary): the extra columns are masked too.
        wide = torch.zeros(1, table.vocab_size + 64)
        batch.apply(wide, step)
        assert torch.isfinite(wide[0]).nonzero().flatten().tolist() == [5, 300, 700]


def test_sparse_bias_result_applies_like_the_dense_one(table: TokenTable, mode: str) -> None:
    """WS_OUTPUT_SPARSE_BIAS: the (id, value) pairs reach row_outputs as copies and the dense
    application adds them; the same words as a dense bias give the same logits."""
    arg = "world\t2.5\nbad\t-1\ngood\t0.5\ngood\t4"  # the last line for a word wins
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        sparse = batch.add(ctrl("boost_words_sparse", arg))
        dense = batch.add(ctrl("boost_words", arg))
        step = batch.step()
        assert step.results[sparse].output is Output.SPARSE_BIAS and step.results[dense].output is Output.BIAS
        ids, values = batch.row_outputs(step)[sparse].sparse_bias  # type: ignore[misc]
        pairs = dict(zip(ids.tolist(), values.tolist()))
        assert pairs == {tid(b"world"): 2.5, tid(b" world"): 2.5, tid(b" bad"): -1.0, tid(b"good"): 4.0}
        base = torch.randn(table.vocab_size)
        logits = base.repeat(2, 1)
        batch.apply(logits, step)
        torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
        assert float(logits[0, tid(b"good")] - base[tid(b"good")]) == pytest.approx(4.0)
        later = batch.step({sparse: [3], dense: [3]})  # the pairs persist in the slot between steps
        assert later.results[sparse].output is Output.SPARSE_BIAS
        assert dict(zip(*(a.tolist() for a in batch.row_outputs(later)[sparse].sparse_bias))) == pairs  # type: ignore[misc]


def test_bias_result(table: TokenTable, mode: str) -> None:
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        seq = batch.add(ctrl("boost_words", "world\t2.5\nbad\t-1"))
        step = batch.step()
        assert step.results[seq].output is Output.BIAS
        bias = batch.bias[batch.slot(seq)]
        boosted = {i: float(bias[i]) for i in np.flatnonzero(bias)}
        assert boosted == {tid(b"world"): 2.5, tid(b" world"): 2.5, tid(b" bad"): -1.0}
        logits = torch.ones(1, table.vocab_size)
        batch.apply(logits, step)
        assert logits[0, tid(b"world")] == 3.5 and logits[0, tid(b" bad")] == 0.0 and logits[0, 0] == 1.0


def test_fast_forward_and_stop(table: TokenTable, mode: str) -> None:
    answer = [tid(b" hello"), tid(b" world"), table.eos_token or 0]
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        seq = batch.add(ctrl("force_answer", u32s(*answer)))
        result = batch.step().results[seq]
        assert result.action is Action.STOP
        assert result.fast_forward == tuple(answer)
        assert table.decode(result.fast_forward) == b" hello world<eos>"


def test_max_tokens_stop(table: TokenTable, mode: str) -> None:
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        seq = batch.add(ctrl("max_tokens", "3"))
        actions = [batch.step().results[seq].action]
        for token in (10, 11, 12):
            actions.append(batch.step({seq: [token]}).results[seq].action)
        assert actions == [Action.CONTINUE, Action.CONTINUE, Action.CONTINUE, Action.STOP]


def test_backtrack(table: TokenTable, mode: str) -> None:
    with ControllerBatch(table, capacity=2, mode=mode, workers=1) as batch:
        seq = batch.add(ctrl("backtrack", u32s(2, 77)), prompt=[1])
        assert batch.step().results[seq].backtrack == 0
        assert batch.step({seq: [40]}).results[seq].backtrack == 0
        result = batch.step({seq: [41]}).results[seq]
        assert (result.backtrack, result.fast_forward) == (1, (77,))
        assert batch.step({seq: [42]}).results[seq].backtrack == 0  # only once


def test_ban_strings(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=2) as batch:
        seq = batch.add(ctrl("ban_strings", "bad"))
        batch.step()
        allowed = set(allowed_ids(batch, batch.slot(seq)))
        assert tid(b" bad") not in allowed and tid(b"badge") not in allowed
        assert tid(b"good") in allowed and ord("b") in allowed


def test_row_outputs_list_few_allowed_ids_and_share_the_bias(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=5) as batch:
        few = batch.add(ctrl("allow_list", u32s(5, 300, 700)))
        banned = batch.add(ctrl("ban_strings", "bad"))
        boosted = batch.add(ctrl("boost_words", "world\t2.5"))
        everything = batch.add(ctrl("hostile_controller", "ok"))
        nothing = batch.add(ctrl("hostile_controller", "empty_mask"))
        step = batch.step()
        outputs = batch.row_outputs(step)
        # Worked out on first use, from the private copy: the next step's writes do not reach it.
        assert not outputs[few].analysed and outputs[boosted].analysed
        batch.mask[batch.slot(few)] = 0
        assert outputs[few].allows(300) and not outputs[few].allows(301) and outputs[few].bias is None
        assert outputs[few].allowed is not None and outputs[few].allowed.tolist() == [5, 300, 700]
        assert outputs[few].analysed
        eager = batch.row_outputs(step, analyse={banned})
        assert eager[banned].analysed and not eager[everything].analysed
        # Most ids allowed: no list up front; a token test and the forbidden ids on demand.
        forbidden = sorted(set(range(table.vocab_size)) - set(allowed_ids(batch, batch.slot(banned))))
        assert outputs[banned].allowed is None and outputs[banned].forbidden().tolist() == forbidden
        assert not outputs[banned].allows(tid(b" bad")) and outputs[banned].allows(tid(b"good"))
        assert not outputs[banned].allows(table.vocab_size)
        bias = outputs[boosted].bias
        assert bias is not None and np.shares_memory(bias, batch.bias) and bias[tid(b"world")] == 2.5
        assert outputs[everything].allowed is None and outputs[everything].forbidden().size == 0
        assert not outputs[everything].allows(table.vocab_size)  # past the vocabulary: never
        assert outputs[nothing].allowed is not None and outputs[nothing].allowed.size == 0


def test_row_outputs_and_the_dense_tensor_allow_the_same_tokens(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=5) as batch:
        batch.add(ctrl("allow_list", u32s(5, 300, 700)))
        batch.add(ctrl("ban_strings", "bad\nworld"))
        batch.add(ctrl("boost_words", "world\t2.5\ngood\t-1"))
        batch.add(ctrl("hostile_controller", "ok"))  # allows every token of the vocabulary
        batch.add(ctrl("max_tokens", "9"))  # no output
        step = batch.step()
        outputs = batch.row_outputs(step)
        for width in (table.vocab_size, table.vocab_size + 40):  # a padded logits row too
            logits = torch.zeros(5, width)
            batch.apply(logits, step)
            for i, sid in enumerate(step.sequences):
                finite = torch.isfinite(logits[i]).nonzero().flatten().tolist()
                out = outputs.get(sid)
                if out is None:  # untouched
                    assert finite == list(range(width))
                elif out.bias is not None:
                    assert finite == list(range(width)) and torch.equal(
                        logits[i, : table.vocab_size], torch.from_numpy(out.bias)
                    )
                elif out.allowed is not None:
                    assert finite == out.allowed.tolist()
                else:
                    assert finite == sorted(set(range(table.vocab_size)) - set(out.forbidden().tolist()))
                    assert all(out.allows(t) for t in finite) and not out.allows(table.vocab_size)


@pytest.mark.parametrize("limit", [1, 31, 32, 33, 200, 224])
def test_set_bit_ids_match_the_unpacked_bits(limit: int) -> None:
    from wasmshare.llm.results import _set_bit_ids

    rng = np.random.default_rng(limit)
    for density in (0.0, 0.01, 0.5, 0.99, 1.0):
        bits = rng.random(224) < density
        words = np.packbits(bits, bitorder="little").view(np.uint32)
        assert _set_bit_ids(words, limit).tolist() == np.flatnonzero(bits[:limit]).tolist()


def _scenario(table: TokenTable, mode: str) -> list[tuple[object, ...]]:
    """Sequences join and leave mid-batch; returns everything observable."""
    seen: list[tuple[object, ...]] = []
    with ControllerBatch(table, capacity=3, mode=mode, workers=2) as batch:
        a = batch.add(ctrl("allow_list", u32s(1, 2)))
        b = batch.add(ctrl("boost_words", "good\t1.5"))
        for i in range(6):
            sampled = {s: [20 + i] for s in batch.sequences}
            step = batch.step(sampled)
            for sid in step.sequences:
                r = step.results[sid]
                seen.append(
                    (
                        i,
                        sid,
                        r.action,
                        r.output,
                        r.fast_forward,
                        r.backtrack,
                        tuple(allowed_ids(batch, batch.slot(sid))) if r.output is Output.BITMASK else (),
                        float(batch.bias[batch.slot(sid)].sum()) if r.output is Output.BIAS else 0.0,
                    )
                )
            if i == 1:
                batch.add(ctrl("max_tokens", "2"))
                with pytest.raises(BatchFull):
                    batch.add(ctrl("allow_list", u32s(3)))
            if i == 2:
                batch.remove(a)  # leaves; its slot is reused
                batch.add(ctrl("allow_list", u32s(9)), sequence_id=100)
            for sid, r in step.results.items():
                if r.action is Action.STOP and sid in batch.sequences:
                    batch.remove(sid)
        seen.append(("final", batch.sequences, b))
    return seen


def test_join_and_leave_mid_batch_and_modes_agree(table: TokenTable) -> None:
    threads = _scenario(table, "threads")
    workers = _scenario(table, "workers")
    assert threads == workers
    stopped = [row for row in threads if row[0] != "final" and row[2] is Action.STOP]
    assert len(stopped) == 1  # max_tokens stopped after 2 sampled tokens
    assert threads[-1] == ("final", (100, 1), 1)  # in slot order: 100 reused the slot `a` left


HOSTILE = [
    ("trap_mid_mask", "trap"),
    ("spin", "deadline"),
    ("bomb", "memory"),
    ("bad_result", "invalid result"),
    ("sparse_bad_id", "invalid result"),
    ("sparse_too_many", "invalid result"),
    ("error", "error code"),
]


@pytest.mark.parametrize("behaviour, cause", HOSTILE)
def test_hostile_controller_fails_alone(table: TokenTable, mode: str, behaviour: str, cause: str) -> None:
    with ControllerBatch(
        table, capacity=4, mode=mode, workers=2, limits=Limits(deadline_ms=30, memory_limit_bytes=32 << 20)
    ) as batch:
        good = batch.add(ctrl("allow_list", u32s(7)))
        bad = batch.add(ctrl("hostile_controller", behaviour), sequence_id=66)
        other = batch.add(ctrl("boost_words", "good\t1"))
        bad_slot = batch.slot(bad)
        step = batch.step()
        failed = step.results[bad]
        assert failed.action is Action.ERROR and isinstance(failed.error, SequenceFailed)
        assert failed.error.cause == cause and failed.error.sequence == 66
        assert "hostile_controller" in str(failed.error)
        assert bad not in batch.sequences
        # Nothing half-written is applied: the slot is back to all-allowed / zero bias.
        assert np.all(batch.mask[bad_slot] == -1) and not batch.bias[bad_slot].any()
        logits = torch.zeros(3, table.vocab_size)
        batch.apply(logits, step)
        assert torch.isfinite(logits[step.sequences.index(bad)]).all()
        # The rest of the batch carries on, this step and the next.
        assert step.results[good].output is Output.BITMASK and allowed_ids(batch, batch.slot(good)) == [7]
        assert step.results[other].output is Output.BIAS
        later = batch.step({good: [7], other: [3]})
        assert set(later.results) == {good, other}
        assert all(r.action is Action.CONTINUE for r in later.results.values())


def test_small_and_large_batches_find_the_same_unusual_results(
    table: TokenTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-step checks run on Python lists for small batches, vectorised for large ones: same outcome."""
    from wasmshare.llm import _layout as L
    from wasmshare.llm import batch as batch_module

    answer = u32s(tid(b" hello"), table.eos_token or 0)
    kinds = [
        ctrl("allow_list", u32s(7)),
        ctrl("force_answer", answer),
        ctrl("hostile_controller", "error"),
        ctrl("hostile_controller", "bad_result"),
        ctrl("boost_words", "good\t1"),
    ]
    outcomes = []
    for small in (0, 1000):
        monkeypatch.setattr(batch_module, "_SMALL_BATCH", small)
        with ControllerBatch(table, capacity=40) as batch:
            for i in range(40):
                batch.add(kinds[i % len(kinds)], sequence_id=i)
            step = batch.step()
            outcomes.append(
                (
                    [
                        (sid, r.action, r.output, r.fast_forward, r.error.cause if r.error else None)
                        for sid, r in sorted(step.results.items())
                    ],
                    batch.sequences,
                )
            )
            # one token per sequence, some with none (-1: fast-forwarded rows sample nothing)
            live = [sid for sid in batch.sequences if step.results[sid].action is Action.CONTINUE]
            for sid in set(batch.sequences) - set(live):
                batch.remove(sid)
            tokens = np.array([-1 if k % 3 == 0 else 100 + k for k in range(len(batch.sequences))], np.int64)
            batch.step(tokens)
            rows = [batch.slot(sid) for sid in batch.sequences]
            words = batch._step_words
            outcomes.append(
                [
                    (int(words[r, L.W_N_TOKENS]), int(words[r, L.W_TOKENS]), int(batch._lengths[r]))
                    for r in rows
                ]
            )
    assert outcomes[0] == outcomes[2] and outcomes[1] == outcomes[3]
    results, left = outcomes[0]
    assert {r[1] for r in results} == {Action.CONTINUE, Action.STOP, Action.ERROR} and len(left) == 24
    assert {n for n, _, _ in outcomes[1]} == {0, 1}


def test_failures_at_creation_free_the_slot(table: TokenTable, mode: str) -> None:
    with ControllerBatch(table, capacity=1, mode=mode, workers=1) as batch:
        with pytest.raises(SequenceFailed, match="hostile_controller") as info:
            batch.add(ctrl("hostile_controller", "create_trap"))
        assert info.value.cause == "trap"
        with pytest.raises(AbiMismatch, match="controller ABI v99"):
            batch.add(ctrl("old_abi"))
        with pytest.raises(GuestError, match="does not export ws_ctrl_abi_version"):
            batch.add(Controller('(module (memory (export "memory") 1))', name="empty"))
        seq = batch.add(ctrl("allow_list", u32s(1)))  # the one slot is free again
        assert batch.step().results[seq].output is Output.BITMASK


def test_killed_worker_fails_only_its_sequences_and_restarts(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=4, mode="workers", workers=2) as batch:
        seqs = [batch.add(ctrl("allow_list", u32s(i + 1))) for i in range(4)]
        batch.step()
        victim = batch._workers[0]
        victim_slots = set(victim.slots)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        step = batch.step({s: [1] for s in seqs})
        for sid, result in step.results.items():
            if step.slots[step.sequences.index(sid)] in victim_slots:
                assert result.action is Action.ERROR
                assert "killed by signal 9" in str(result.error)
            else:
                assert result.action is Action.CONTINUE
        assert victim.restarts == 1 and victim.process.poll() is None
        new = batch.add(ctrl("allow_list", u32s(9)))
        assert batch.step().results[new].output is Output.BITMASK


def test_a_worker_that_dies_between_steps_fails_its_sequences_at_the_next_step(table: TokenTable) -> None:
    """A worker found dead while starting a new sequence is restarted without its sequences;
    they end with the worker's error at the next step instead of going on unconstrained."""
    with ControllerBatch(table, capacity=4, mode="workers", workers=1) as batch:
        seqs = [batch.add(ctrl("allow_list", u32s(i + 1))) for i in range(2)]
        batch.step()
        victim = batch._workers[0]
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait()
        with pytest.raises(WasmshareError, match="crashed; restarted"):
            batch.add(ctrl("allow_list", u32s(9)))
        step = batch.step({s: [1] for s in seqs})
        for sid in seqs:
            result = step.results[sid]
            assert result.action is Action.ERROR and "killed by signal 9" in str(result.error), result
        assert not batch.sequences
        new = batch.add(ctrl("allow_list", u32s(9)))  # a reused slot starts clean
        assert batch.step().results[new].output is Output.BITMASK


def test_a_sparse_bias_is_applied_as_validated(table: TokenTable) -> None:
    """The pairs are copied when the step is checked: what the guest writes into its slot
    afterwards is never applied, and a repeated id is summed into one entry."""
    with ControllerBatch(table, capacity=2) as batch:
        seq = batch.add(ctrl("boost_words_sparse", "world\t2.5"))
        step = batch.step()
        slot = batch.slot(seq)
        half = table.vocab_size // 2
        batch.bias[slot].view(np.uint32)[0] = 10**9  # as a guest could, after the check
        logits = torch.zeros(1, table.vocab_size)
        batch.apply(logits, step)
        assert sorted(torch.nonzero(logits[0]).flatten().tolist()) == sorted([tid(b"world"), tid(b" world")])
        assert (
            batch._take_sparse_bias(slot, 0) is None and batch._sparse_bias(slot)[0].size == 0
        )  # an empty bias
        ids = batch.bias[slot].view(np.uint32)
        ids[0], ids[1] = 5, 5
        batch.bias[slot][half : half + 2] = [1.5, 2.0]
        assert batch._take_sparse_bias(slot, 2) is None
        pairs = batch._sparse_bias(slot)
        assert pairs[0].tolist() == [5] and pairs[1].tolist() == [3.5]


def test_batch_input_errors(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=2) as batch:
        with pytest.raises(Exception, match="token ids must be in"):
            batch.add(ctrl("allow_list", u32s(1)), prompt=[table.vocab_size])
        seq = batch.add(ctrl("allow_list", u32s(1)))
        with pytest.raises(Exception, match="not in the batch"):
            batch.step({seq + 1: [1]})
        step = batch.step()
        with pytest.raises(Exception, match="logits must be"):
            batch.apply(torch.zeros(2, table.vocab_size), step)
    with pytest.raises(Exception, match="closed"):
        batch.step()


def test_fuel_limit_ends_only_the_runaway_sequence(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=2, limits=Limits(deadline_ms=None, fuel=200_000)) as batch:
        good = batch.add(ctrl("allow_list", u32s(3)))
        bad = batch.add(ctrl("hostile_controller", "spin"))
        step = batch.step()
        assert step.results[bad].action is Action.ERROR
        assert step.results[bad].error is not None and step.results[bad].error.cause == "fuel"
        assert step.results[good].output is Output.BITMASK


def test_tensor_views_are_zero_copy(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=2) as batch:
        seq = batch.add(ctrl("allow_list", u32s(4)))
        batch.step()
        mask = batch.mask_tensor()
        assert mask.shape == (2, (table.vocab_size + 31) // 32) and mask.dtype == torch.int32
        assert mask.data_ptr() == batch.mask.ctypes.data
        assert int(mask[batch.slot(seq), 0]) == 1 << 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_apply_on_cuda_uses_page_locked_rows(table: TokenTable) -> None:
    with ControllerBatch(table, capacity=2) as batch:
        seq = batch.add(ctrl("allow_list", u32s(5, 9)))
        step = batch.step()
        logits = torch.zeros(1, table.vocab_size, device="cuda")
        batch.apply(logits, step)
        assert batch._torch["pinned"]
        assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [5, 9]
        batch.step()  # waits for the asynchronous copy before controllers write again
        assert step.results[seq].output is Output.BITMASK


@pytest.mark.parametrize("width", [100, 32 * 7, 32 * 7 + 5])
def test_mask_to_additive_matches_the_bits(width: int) -> None:
    """The byte-table expansion of a bitmask: 0 where bit t % 32 of word t // 32 is set, else -inf."""
    from wasmshare.llm.logits import _byte_table, _mask_to_additive

    rng = np.random.default_rng(3)
    words = rng.integers(-(2**31), 2**31 - 1, size=(3, 7), dtype=np.int64).astype(np.int32)
    got = _mask_to_additive(torch.from_numpy(words), _byte_table("cpu"), width).numpy()
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(bool)
    expected = np.full((3, width), -np.inf, dtype=np.float32)
    keep = min(width, bits.shape[1])
    expected[:, :keep] = np.where(bits[:, :keep], 0.0, -np.inf)
    assert got.shape == (3, width) and np.array_equal(got, expected)


def test_a_step_with_a_joining_sequence_is_not_a_sample_of_the_step_cost(table: TokenTable) -> None:
    """The inline-or-pool choice learns from steps of the same sequences only: a step in which
    one takes its first step (one-off work, such as an engine computing a joining constraint's
    first mask) records no cost."""
    with ControllerBatch(table, capacity=4, mode="threads", workers=2) as batch:
        first = batch.add(ctrl("allow_list", u32s(5, 300)), prompt=[1])
        batch.add(ctrl("allow_list", u32s(7)), prompt=[1])
        batch.step()
        assert batch._run_cost == [0.0, 0.0]
        batch.step({first: [5]})
        assert batch._run_cost[0] > 0.0  # measured inline first
        batch.add(ctrl("allow_list", u32s(9)), prompt=[1])
        batch.step()
        assert batch._run_cost == [0.0, 0.0]  # a new line-up starts afresh, and its join step is not a sample


WRONG_STEP_SIGNATURE = """(module
  (memory (export "memory") 1)
  (func (export "ws_ctrl_abi_version") (result i32) i32.const 1)
  (func (export "ws_ctrl_create") (param i32 i32) (result i32) i32.const 0)
  (func (export "ws_ctrl_step") (param i32 i32)))"""

WASI_IMPORT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "ws_ctrl_abi_version") (result i32) i32.const 1)
  (func (export "ws_ctrl_create") (param i32 i32) (result i32) i32.const 0)
  (func (export "ws_ctrl_step") (param i32 i32) (result i32) i32.const 0))"""


@pytest.mark.parametrize("mode", ["threads", "workers"])
def test_a_module_with_a_wrong_signature_or_wasi_never_joins_and_the_batch_goes_on(
    table: TokenTable, mode: str
) -> None:
    with ControllerBatch(table, capacity=3, mode=mode, workers=1) as batch:  # type: ignore[arg-type]
        good = batch.add(ctrl("allow_list", struct.pack("<2I", 5, 6)))
        with pytest.raises(AbiMismatch, match="exports ws_ctrl_step as \\(i32, i32\\) -> \\(\\)"):
            batch.add(Controller(WRONG_STEP_SIGNATURE, name="wrong"))
        with pytest.raises(GuestError, match="wasi_snapshot_preview1.fd_write"):
            batch.add(Controller(WASI_IMPORT, name="wasi"))
        step = batch.step()
        assert step.results[good].action is Action.CONTINUE and step.results[good].output is Output.BITMASK
        assert batch.sequences == (good,)


def test_a_host_failure_inside_a_step_ends_only_that_sequence(
    table: TokenTable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception out of a step that is not a guest fault (a host bug) is contained too."""
    with ControllerBatch(table, capacity=2, mode="threads") as batch:
        bad = batch.add(ctrl("allow_list", struct.pack("<2I", 5, 6)))
        good = batch.add(ctrl("allow_list", struct.pack("<2I", 7, 8)))
        batch.step()
        instance = batch._sequences[bad].instance
        assert instance is not None

        def broken() -> None:
            raise TypeError("'<' not supported between instances of 'NoneType' and 'int'")

        monkeypatch.setattr(instance, "step", broken)
        step = batch.step({bad: [5], good: [7]})
        assert step.results[bad].action is Action.ERROR and "TypeError" in str(step.results[bad].error)
        assert step.results[good].action is Action.CONTINUE


# -- cuttable steps: controllers that answer late ------------------------------------------------


def slow_ctrl(units: int) -> Controller:
    """slow.wasm: ``units`` × 1000 loop iterations per step, then a mask of the odd ids."""
    return ctrl("slow", struct.pack("<4I", units, 0, 0, 0))


def odd_ids(vocab_size: int) -> list[int]:
    return list(range(1, vocab_size, 2))


def test_a_cut_step_returns_what_answered_and_the_late_answer_follows(table: TokenTable, mode: str) -> None:
    """After the cut the step holds the controllers that answered; the slow one is late, no
    step may include it, and collect_late hands over its answer when it comes."""
    with ControllerBatch(table, capacity=4, mode=mode, limits=Limits(deadline_ms=60_000)) as batch:
        slow = batch.add(slow_ctrl(200_000))  # far longer than the cut below
        fast = batch.add(ctrl("allow_list", u32s(tid(b"good"))))
        if mode == "workers":
            # a worker runs its slots one after another: keep the fast one off the slow one's worker
            assert batch._sequences[slow].worker != batch._sequences[fast].worker
        cut = batch.new_cut()

        threading.Timer(0.05, cut.set).start()
        step = batch.step({slow: [], fast: []}, only=[slow, fast], cut=cut)
        assert step.sequences == (fast,) and step.late == (slow,)
        assert batch.late == {slow}
        assert allowed_ids(batch, batch.slot(fast)) == [tid(b"good")]
        with pytest.raises(WasmshareError, match=f"sequence {slow} is still in a step that was cut"):
            batch.step({slow: [1]}, only=[slow])
        with pytest.raises(WasmshareError, match="still in a step that was cut"):
            batch.step()
        again = batch.step({fast: [tid(b"good")]}, only=[fast], cut=batch.new_cut())  # the others go on
        assert again.sequences == (fast,) and again.late == ()
        late = batch.collect_late(wait=[slow])
        assert late is not None and late.sequences == (slow,) and late.outputs == (Output.BITMASK,)
        assert allowed_ids(batch, batch.slot(slow)) == odd_ids(table.vocab_size)
        assert batch.late == frozenset() and batch.collect_late() is None
        outputs = batch.row_outputs(late)
        assert outputs[slow].allowed.tolist() == odd_ids(table.vocab_size)


def test_a_cut_step_does_not_wait_for_expendable_sequences(table: TokenTable) -> None:
    """A sequence named expendable is not waited for: the step returns once the others answer."""
    with ControllerBatch(table, capacity=2, limits=Limits(deadline_ms=60_000)) as batch:
        slow = batch.add(slow_ctrl(100_000))
        fast = batch.add(ctrl("allow_list", u32s(tid(b"good"))))
        step = batch.step({slow: [], fast: []}, only=[slow, fast], cut=batch.new_cut(expendable=[slow]))
        assert step.sequences == (fast,) and step.late == (slow,)
        batch.remove(slow)  # waits for its running call, then tears it down
        assert batch.late == frozenset() and batch.sequences == (fast,)


def test_a_late_controller_past_its_deadline_fails_in_its_late_answer(table: TokenTable, mode: str) -> None:
    """The hard deadline holds for a late controller: its late answer is the error."""
    with ControllerBatch(table, capacity=2, mode=mode, limits=Limits(deadline_ms=40)) as batch:
        slow = batch.add(slow_ctrl(2_000_000))
        step = batch.step({slow: []}, only=[slow], cut=batch.new_cut(expendable=[slow]))
        assert step.late == (slow,)
        late = batch.collect_late(wait=[slow])
        assert late is not None
        (failure,) = late.failed
        assert failure.sequence_id == slow and "deadline" in str(failure.error)
        assert slow not in batch.sequences


def test_a_worker_with_a_late_step_takes_a_new_sequence_without_a_restart(table: TokenTable) -> None:
    """A message to a worker whose cut step still runs waits for that step first: the late
    answer is kept, the worker is not taken for hung, and the new sequence steps."""
    with ControllerBatch(
        table, capacity=4, mode="workers", workers=1, limits=Limits(deadline_ms=60_000)
    ) as batch:
        slow = batch.add(slow_ctrl(200_000))
        step = batch.step({slow: []}, only=[slow], cut=batch.new_cut(expendable=[slow]))
        assert step.late == (slow,)
        fast = batch.add(ctrl("allow_list", u32s(tid(b"good"))))  # same worker, which is busy
        late = batch.collect_late(wait=[slow])
        assert late is not None and late.sequences == (slow,) and not late.failed
        assert batch.step({fast: []}, only=[fast]).outputs == (Output.BITMASK,)
        assert batch._workers[0].restarts == 0
