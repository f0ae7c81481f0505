"""A controller worker process: runs the controllers of some batch slots.

Started by :class:`~wasmshare.llm.batch.ControllerBatch` in ``mode="workers"`` as
``python -m wasmshare.llm._worker FD INDEX``. FD is a Unix socket to the engine: it brings
the batch's regions (by fd) and the rare messages (create or remove a controller). Steps
need no message: the engine sets the slots' run flags, increments this worker's *go*
word in the control region and wakes it with a futex; the worker runs its controllers,
which read and write the same shared pages, copies *go* to *done* and wakes the engine.
Before each *done* it writes the bytes its guests have copied (ended guests included) into
its block of the control region, so the engine reads a current figure without asking.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import time

from .._framing import recv_message, send_message
from . import _futex
from ._protocol import CMD_MESSAGE, CMD_STEP

SPIN_S = 200e-6
"""How long an idle worker polls its go word before sleeping in the kernel."""


def main(argv: list[str]) -> int:
    from ..guest import Guest
    from ..region import Region
    from ._constraint_imports import TokenizerInfo
    from ._regions import BatchRegions, fail_instance
    from .constraints import ConstraintInstance
    from .controller import Controller, ControllerInstance
    from .limits import Limits

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints this worker's stacks
    sock = socket.socket(fileno=int(argv[0]))
    index = int(argv[1])
    parent = os.getppid()
    init, tokenizer_json = recv_message(sock)
    token_table, mask, bias, step, control = (Region.receive(sock) for _ in range(5))
    regions = BatchRegions(token_table, mask, bias, step, control, **init["geometry"])
    limits = Limits(**init["limits"])
    tokenizer = TokenizerInfo(tokenizer_json=tokenizer_json.decode() or None, **init["tokenizer"])
    words = regions.worker_words(index)
    go_address = regions.worker_word_address(index, 0)
    done_address = regions.worker_word_address(index, 1)
    run_flags = regions.run_flags()
    copied = regions.worker_bytes_copied(index)
    instances: dict[int, ControllerInstance | ConstraintInstance] = {}
    guests: dict[int, Guest] = {}  # slot -> the guest of its controller, whose copies count
    ended_copied = 0  # bytes copied by the guests already removed
    last_go = int(words[0])  # read before saying ready: the engine may bump go right after
    send_message(sock, {"ok": True, "pid": os.getpid()})
    while True:
        if int(words[0]) == last_go:
            # Poll briefly before sleeping: back-to-back steps then skip a futex wake-up,
            # which is slow on virtual machines whose idle vCPUs halt.
            spin_until = time.perf_counter() + SPIN_S
            while int(words[0]) == last_go and time.perf_counter() < spin_until:
                os.sched_yield()
        if int(words[0]) == last_go:
            _futex.wait(go_address, last_go, 1.0)
            if int(words[0]) == last_go:
                if os.getppid() != parent:
                    return 0  # the engine is gone
                continue
        last_go = int(words[0])
        command = int(words[2])
        if command == CMD_STEP:
            for slot, instance in instances.items():
                if run_flags[slot]:
                    try:
                        instance.step()
                    except Exception as e:  # noqa: BLE001 - one sequence's failure must not end the worker
                        fail_instance(instance, e)
        elif command == CMD_MESSAGE:
            message, payload = recv_message(sock)
            kind = message["kind"]
            if kind == "create":
                slot = message["slot"]
                try:
                    module = payload if message["module_is_bytes"] else message["module"]
                    controller = Controller(module, b"", name=message["name"])
                    instance = ControllerInstance(
                        controller, regions, slot, message["sequence_id"], limits, tokenizer=tokenizer
                    )
                except Exception as e:  # noqa: BLE001 - reported to the engine, which raises it
                    send_message(sock, {"ok": False, "error": str(e), "type": type(e).__name__})
                else:
                    instances[slot] = instance
                    guests[slot] = instance.guest
                    instance.create(message["n_prompt"], message["arg_offset"], message["arg_len"])
                    send_message(sock, {"ok": True})
            elif kind == "constrain":
                from .constraints import ConstraintSpec, compile_constraint

                slot = message["slot"]
                try:
                    spec = ConstraintSpec(message["spec_kind"], message["spec_source"])
                    compiled = compile_constraint(spec, tokenizer)  # type: ignore[arg-type]  # llguidance needs no more
                    constrained = ConstraintInstance(
                        compiled, regions, slot, message["sequence_id"], can_backtrack=message["repairs"]
                    )
                except Exception as e:  # noqa: BLE001 - reported to the engine, which raises it
                    send_message(sock, {"ok": False, "error": str(e), "type": type(e).__name__})
                else:
                    instances[slot] = constrained
                    constrained.create(0, 0, 0)
                    send_message(sock, {"ok": True})
            elif kind == "remove":
                removed = instances.pop(message["slot"], None)
                guests.pop(message["slot"], None)
                if removed is not None:
                    removed.close()
                    ended_copied += removed.bytes_copied
                send_message(sock, {"ok": True})
            elif kind == "shutdown":
                for instance in instances.values():
                    instance.close()
                copied[0] = ended_copied + sum([g.bytes_copied for g in guests.values()])
                send_message(sock, {"ok": True})
                words[1] = last_go
                _futex.wake(done_address)
                return 0
        if guests or ended_copied:
            copied[0] = ended_copied + sum([g.bytes_copied for g in guests.values()])
        words[1] = last_go
        _futex.wake(done_address)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
