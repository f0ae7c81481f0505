"""The engine's handle on one controller worker process (``mode="workers"`` of a batch).

A :class:`WorkerHandle` starts ``python -m wasmshare.llm._worker``, hands it the batch's
regions by fd, and then drives it through its block of the control region: a step is a
bump of the *go* word and a futex wake, the rare messages (create, constrain, remove,
shutdown) go over a Unix socket. A worker that dies or hangs is killed and restarted; its
sequences end through their status records, and the batch hears of them through the
``on_lost`` callback so a later step can report them. Used from the engine's thread only.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Container, Sequence
from typing import Any

import numpy as np

from .. import errors
from .._engine import child_env
from .._framing import recv_message, send_message
from ..errors import GuestError, WasmshareError
from . import _futex
from ._protocol import CMD_MESSAGE, CMD_STEP
from ._regions import BatchRegions
from .constraints import ConstraintError, ConstraintSpec
from .controller import Controller, module_path_or_bytes
from .limits import Limits
from .tokens import TokenTable

__all__ = ["WORKER_GRACE_S", "WorkerHandle", "WorkerPool"]

SPIN_S = 300e-6
"""How long the engine polls a worker's done word before sleeping in the kernel."""
WORKER_GRACE_S = 10.0
"""How long past its controllers' deadlines a worker may take to answer a step."""


class WorkerHandle:
    """The engine's side of one worker process, which runs the controllers of some slots.

    ``on_lost(slot, message)`` is called for every slot whose sequence ends because the
    worker died or stopped answering (the worker is restarted without them).
    """

    def __init__(
        self,
        regions: BatchRegions,
        limits: Limits,
        token_table: TokenTable,
        index: int,
        on_lost: Callable[[int, str], None],
    ) -> None:
        self.regions = regions
        self.limits = limits
        self.token_table = token_table
        self.index = index
        self.slots: set[int] = set()
        self.restarts = 0
        self._on_lost = on_lost
        self._words = regions.worker_words(index)
        self._go = regions.worker_word_address(index, 0)
        self._done = regions.worker_word_address(index, 1)
        self._copied: np.ndarray[Any, Any] | None = regions.worker_bytes_copied(index)
        self._ended_copied = 0  # bytes copied by this worker's earlier processes
        self._pending = 0
        self._step_timeout_at = 0.0  # monotonic time past which the pending step is hung
        self._step_open = False  # a step was started and not finished
        self._start()

    @property
    def bytes_copied(self) -> int:
        """Bytes this worker's guests have copied, as of its last finished command (every process)."""
        copied = self._copied
        return self._ended_copied + (int(copied[0]) if copied is not None else 0)

    def _settle_copied(self) -> None:
        """Fold the current process's figure into the total before it stops writing it."""
        if self._copied is not None:
            self._ended_copied += int(self._copied[0])
            self._copied[0] = 0

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "wasmshare.llm._worker", str(child.fileno()), str(self.index)],
            pass_fds=(child.fileno(),),
            env=child_env(),
        )
        child.close()
        self.sock = parent
        regions, limits, table = self.regions, self.limits, self.token_table
        send_message(
            parent,
            {
                "geometry": regions.geometry(),
                "limits": {
                    "deadline_ms": limits.deadline_ms,
                    "fuel": limits.fuel,
                    "memory_limit_bytes": limits.memory_limit_bytes,
                },
                "tokenizer": {
                    "sha256": table.sha256,
                    "vocab_size": table.vocab_size,
                    "eos_token": table.eos_token,
                    "name": table.name,
                },
            },
            (table.tokenizer_json or "").encode(),
        )
        for region in (regions.token_table, regions.mask, regions.bias, regions.step, regions.control):
            region.send(parent)
        parent.settimeout(60)
        reply, _ = recv_message(parent)
        parent.settimeout(None)
        if not reply.get("ok"):
            raise WasmshareError(f"controller worker {self.index} failed to start: {reply}")
        self._words[1] = self._words[0]

    def _bump(self, command: int) -> int:
        self._words[2] = command
        go = (int(self._words[0]) + 1) & 0xFFFFFFFF
        self._words[0] = go
        _futex.wake(self._go)
        return go

    def _wait_done(self, go: int, timeout_s: float) -> bool:
        """Wait until the worker acknowledges ``go``; False if it died or timed out."""
        words = self._words
        spin_until = time.perf_counter() + SPIN_S
        while int(words[1]) != go and time.perf_counter() < spin_until:
            os.sched_yield()
        deadline = time.monotonic() + timeout_s
        while int(self._words[1]) != go:
            if self.process.poll() is not None:
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            _futex.wait(self._done, int(self._words[1]), min(remaining, 0.05))
        return True

    def _message(
        self, message: dict[str, Any], payload: bytes = b"", timeout_s: float = 60.0
    ) -> dict[str, Any]:
        if self._step_open:
            # A message moves the done word on: the step still running (one that was cut)
            # is finished first, or it would never be seen answered.
            self.finish_step()
        go = self._bump(CMD_MESSAGE)
        try:
            send_message(self.sock, message, payload)
            self.sock.settimeout(timeout_s)
            reply, _ = recv_message(self.sock)
        except (OSError, EOFError) as e:
            self._crashed(f"lost contact while sending {message['kind']}: {e}")
            raise WasmshareError(f"controller worker {self.index} crashed; restarted") from e
        finally:
            self.sock.settimeout(None)
        if not self._wait_done(go, timeout_s):
            self._crashed(f"did not finish {message['kind']}")
        return reply

    def create(
        self,
        slot: int,
        sequence_id: int,
        controller: Controller,
        n_prompt: int,
        arg_offset: int,
        arg_len: int,
    ) -> None:
        """Start ``controller`` in ``slot`` in this worker and run its ``ws_ctrl_create``.

        Raises the worker's :class:`GuestError` (or subclass) when the guest cannot be built;
        a create that traps is reported in the slot's status record instead."""
        module = module_path_or_bytes(controller)
        is_bytes = isinstance(module, bytes)
        reply = self._message(
            {
                "kind": "create",
                "slot": slot,
                "sequence_id": sequence_id,
                "name": controller.label,
                "module": None if is_bytes else module,
                "module_is_bytes": is_bytes,
                "n_prompt": n_prompt,
                "arg_offset": arg_offset,
                "arg_len": arg_len,
            },
            module if isinstance(module, bytes) else b"",
        )
        if not reply.get("ok"):
            cls = getattr(errors, reply.get("type", "GuestError"), GuestError)
            if not (isinstance(cls, type) and issubclass(cls, GuestError)):
                cls = GuestError
            raise cls(
                reply.get("error", "controller creation failed"),
                guest=controller.label,
                sequence=sequence_id,
            )
        self.slots.add(slot)

    def constrain(self, slot: int, sequence_id: int, spec: ConstraintSpec, *, repairs: bool = True) -> None:
        """Run a constrained sequence in this worker (compiled there, cached per process)."""
        reply = self._message(
            {
                "kind": "constrain",
                "slot": slot,
                "sequence_id": sequence_id,
                "spec_kind": spec.kind,
                "spec_source": spec.source,
                "repairs": repairs,
            }
        )
        if not reply.get("ok"):
            raise ConstraintError(reply.get("error", "the worker could not compile the constraint"))
        self.slots.add(slot)

    def remove(self, slot: int) -> None:
        """Tear down the controller or constraint of ``slot`` (nothing if this worker lost it)."""
        if slot in self.slots:
            self.slots.discard(slot)
            if self.process.poll() is None:
                self._message({"kind": "remove", "slot": slot})

    def start_step(self) -> None:
        """Wake the worker to step every slot whose run flag is set."""
        self._pending = self._bump(CMD_STEP)
        self._step_timeout_at = time.monotonic() + self._step_timeout_s()
        self._step_open = True

    def step_answered(self) -> bool:
        """Without waiting: True once the pending step is over, answered or not (the worker
        died or is past its timeout); :meth:`finish_step` then returns at once."""
        return (
            not self._step_open
            or int(self._words[1]) == self._pending
            or self.process.poll() is not None
            or time.monotonic() >= self._step_timeout_at
        )

    def _step_timeout_s(self) -> float:
        per_call = (self.limits.deadline_ms or 1000.0) / 1000
        return 2 * per_call * max(1, len(self.slots)) + WORKER_GRACE_S

    def finish_step(self) -> None:
        """Wait for the step :meth:`start_step` began; a worker that dies or hangs is restarted.

        Every call a worker makes is bounded by its deadline (the epoch stops wasm, the host
        functions check the rest), so a step takes at most the sum of its controllers'
        deadlines; the grace covers a loaded machine's scheduling delays, where a worker can
        wait seconds for a core, and still catches a worker that hangs. Returns at once
        when no step is open."""
        if not self._step_open:
            return
        self._step_open = False
        timeout = self._step_timeout_s()
        if not self._wait_done(self._pending, max(0.0, self._step_timeout_at - time.monotonic())):
            self._crashed(
                "died during a step"
                if self.process.poll() is not None
                else f"did not answer within {timeout:.1f} s"
            )

    def _crashed(self, what: str) -> None:
        """End this worker's sequences with a clear error, then restart it."""
        self._step_open = False
        code = self.process.poll()
        if code is None:
            self.process.kill()
            code = self.process.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        message = (
            f"controller worker {self.index} (pid {self.process.pid}) {what} ({how}); its sequences ended"
        )
        for slot in self.slots:
            self._on_lost(slot, message)
        self.slots.clear()
        try:
            self.sock.close()
        except OSError:
            pass
        self._settle_copied()
        self.restarts += 1
        self._start()

    def shutdown(self) -> None:
        """Stop the worker (its controllers' ``ws_ctrl_free`` run) and keep its final figures."""
        if self.process.poll() is None:
            try:
                self._message({"kind": "shutdown"}, timeout_s=5)
            except WasmshareError:
                pass
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        try:
            self.sock.close()
        except OSError:
            pass
        self._settle_copied()
        self._copied = None  # the batch closes its regions next


class WorkerPool:
    """The worker processes of one batch, one :class:`WorkerHandle` each, indexed from 0.

    Empty in thread mode. Used from the engine's thread only."""

    def __init__(
        self,
        regions: BatchRegions,
        limits: Limits,
        token_table: TokenTable,
        n_workers: int,
        on_lost: Callable[[int, str], None],
    ) -> None:
        self.handles = [WorkerHandle(regions, limits, token_table, i, on_lost) for i in range(n_workers)]

    def __getitem__(self, index: int) -> WorkerHandle:
        return self.handles[index]

    def __len__(self) -> int:
        return len(self.handles)

    def least_loaded(self, among: int | None = None, avoid: Container[int] = ()) -> int:
        """The index of the worker running the fewest slots, of the first ``among`` (default all).

        Workers in ``avoid`` (those still running a step that was cut) come last: a message
        to one waits until its step is over."""
        handles = self.handles
        return min(
            range(len(handles) if among is None else among),
            key=lambda w: (w in avoid, len(handles[w].slots)),
        )

    def step(self, busy: Sequence[int], local: Callable[[], None]) -> None:
        """Step the flagged slots of the ``busy`` workers, running ``local`` on this thread meanwhile."""
        handles = self.handles
        for w in busy:
            handles[w].start_step()
        local()
        for w in busy:
            handles[w].finish_step()

    @property
    def bytes_copied(self) -> int:
        """Bytes every worker's guests have copied (see :attr:`WorkerHandle.bytes_copied`)."""
        return sum(handle.bytes_copied for handle in self.handles)

    def shutdown(self) -> None:
        """Stop every worker."""
        for handle in self.handles:
            handle.shutdown()
