"""The controller service: wasmshare's controllers and constraints for a vLLM logits processor.

Run as ``python -m wasmshare.vllm.service SOCKET MODEL_FOLDER [--controllers-dir DIR]
[--capacity N] [--vocab-size V]`` by the Python of wasmshare's own environment: vLLM's
environment pins versions (llguidance, numpy) that wasmshare's constraints and wasmtime
cannot run on, so the controllers live in this process and the processor talks to it.

It builds the :class:`~wasmshare.llm.tokens.TokenTable` of the folder's ``tokenizer.json``
and one :class:`~wasmshare.llm.batch.ControllerBatch`, then serves framed messages
(:mod:`wasmshare._framing`) on a Unix socket. Every request names its ``op``; every reply
has ``ok`` and, when false, a one-line ``error``:

``hello``
    Reply: ``vocab_size``, ``mask_words``, ``capacity``, ``mask_stride``, ``bias_stride``
    (bytes between rows), ``eos`` (id or null); then the mask region's fd and the bias
    region's fd (:meth:`Region.send <wasmshare.region.Region.send>`), so the client maps
    the very pages the controllers write.
``add {key, steer, prompt}``
    Start a sequence. ``steer`` is ``{"kind": "json_schema" | "regex" | "grammar",
    "source": text}``, ``{"kind": "choice", "options": [str]}`` or ``{"kind":
    "controller", "sha256": hex, "arg": str | [uint32]}`` (the module is
    ``<controllers-dir>/<sha256>.wasm``; a list argument is packed little-endian).
``prepare {steer}``
    Check and compile a steering ahead of its request (a constraint goes into the compile
    cache, so the ``add`` at the request's join is a cache hit; a controller's module is
    read and checked). Reply ``ok``, or ``ok: false`` with the one-line ``error`` a client
    should see. ``wasmshare vllm serve`` sends it before it queues a request with vLLM.
``remove {key}``
    End a sequence (unknown keys are ignored: a failed sequence is already gone).
``step {tokens: {key: [ids]}, group?, step_id?}``
    Step the named sequences with the tokens each sampled since its last step. Reply
    ``results: {key: {slot, action, output, ids?, values?, error?}}``: ``action`` is
    ``continue`` / ``stop`` / ``error``; ``output`` is ``none`` / ``bitmask`` / ``bias`` /
    ``sparse`` (the pairs inline as ``ids`` and ``values``). A bitmask or bias is in the
    slot's row of the shared regions. ``forced``: fast-forward tokens the sequence now
    holds (constraints force the text a grammar leaves no choice about); the client must
    emit them before the output applies, and must not send them back as sampled.
    With ``group`` and ``step_id`` (a tensor-parallel leader's), the reply is kept for
    the group's followers.
``follow {group, step_id}``
    The reply of the group leader's step ``step_id``, waiting for it (up to
    :data:`FOLLOW_TIMEOUT_S`): the other tensor-parallel ranks read the answers and rows
    of the step rank 0 ran, so a controller runs once per step for all of them.

A controller's fault ends only its own sequence (``action: error``); the service carries
on. Backtrack has no counterpart in vLLM's sampler yet, so a controller that asks for it
ends with an error saying so. The service exits when its last client
disconnects, so it never outlives the vLLM worker that started it; with ``--persist`` it
serves until it is terminated (its owner, ``wasmshare vllm serve``, starts it before vLLM and
points every worker at it with ``$WASMSHARE_SERVICE_SOCKET``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any

from .. import _framing
from ..errors import WasmshareError
from ..llm import constraints
from ..llm.batch import ControllerBatch
from ..llm.controller import Controller
from ..llm.results import Action, Output
from ..llm.tokens import TokenTable

__all__ = ["ControllerService", "main"]

log = logging.getLogger("wasmshare.vllm.service")

_SHA256 = re.compile(r"[0-9a-f]{64}")
FOLLOW_TIMEOUT_S = 60.0
"""How long a follower waits for its leader's step before it gives up on the service."""
KEPT_STEPS = 8
"""Replies kept per group for followers that run behind their leader."""
_OUTPUT_NAMES = {
    Output.NONE: "none",
    Output.BITMASK: "bitmask",
    Output.BIAS: "bias",
    Output.SPARSE_BIAS: "sparse",
}


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:497] + "..."


class ControllerService:
    """One :class:`ControllerBatch` and the requests of the clients that share it.

    Keys are the clients' names for their sequences; a key maps to a sequence id of the
    batch. Every method takes the service lock, so clients on several connections see one
    consistent batch.
    """

    def __init__(
        self,
        table: TokenTable,
        *,
        capacity: int,
        controllers_dir: Path | None,
    ) -> None:
        self.table = table
        self.controllers_dir = controllers_dir
        self.batch = ControllerBatch(table, capacity=capacity, mode="threads")
        self.batch.constraint_repairs = False  # vLLM samples every row every step: no splicing
        self._keys: dict[str, int] = {}
        self._lock = threading.Lock()
        self._led: dict[str, dict[int, dict[str, Any]]] = {}  # group -> step_id -> reply
        self._led_changed = threading.Condition()

    def close(self) -> None:
        """Tear the batch down (safe twice)."""
        with self._lock:
            self._keys.clear()
            self.batch.close()

    # -- messages --------------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        regions = self.batch.regions
        return {
            "ok": True,
            "vocab_size": self.batch.vocab_size,
            "mask_words": regions.mask_words,
            "capacity": self.batch.capacity,
            "mask_stride": regions.mask_stride,
            "bias_stride": regions.bias_stride,
            "eos": self.table.eos_token,
        }

    def add(self, key: object, steer: object, prompt: object) -> dict[str, Any]:
        if not isinstance(key, str) or not key:
            return {"ok": False, "error": "add needs a non-empty string key"}
        if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
            return {"ok": False, "error": "add: prompt must be a list of token ids"}
        try:
            what = self._steering(steer)
        except (WasmshareError, ValueError, OSError) as e:
            return {"ok": False, "error": _one_line(e)}
        with self._lock:
            if key in self._keys:
                return {"ok": False, "error": f"key {key!r} is already in use"}
            try:
                self._keys[key] = self.batch.add(what, prompt)
            except Exception as e:  # a controller's create fault ends only this request
                return {"ok": False, "error": _one_line(e)}
        return {"ok": True}

    def prepare(self, steer: object) -> dict[str, Any]:
        try:
            what = self._steering(steer)
            if isinstance(what, constraints.ConstraintSpec):
                constraints.compile_constraint(what, self.table, backend=self.batch.grammar_backend)
        except (WasmshareError, ValueError, OSError) as e:
            return {"ok": False, "error": _one_line(e)}
        return {"ok": True}

    def remove(self, key: object) -> dict[str, Any]:
        with self._lock:
            sid = self._keys.pop(key, None) if isinstance(key, str) else None
            if sid is not None and sid in self.batch.sequences:
                self.batch.remove(sid)
        return {"ok": True}

    def step(self, tokens: object, group: object = None, step_id: object = None) -> dict[str, Any]:
        reply = self._step(tokens)
        if isinstance(group, str) and isinstance(step_id, int):
            with self._led_changed:
                kept = self._led.setdefault(group, {})
                kept[step_id] = reply
                for old in [k for k in kept if k <= step_id - KEPT_STEPS]:
                    del kept[old]
                self._led_changed.notify_all()
        return reply

    def follow(self, group: object, step_id: object) -> dict[str, Any]:
        if not isinstance(group, str) or not isinstance(step_id, int):
            return {"ok": False, "error": "follow needs a group and a step_id"}
        with self._led_changed:
            found = self._led_changed.wait_for(
                lambda: step_id in self._led.get(group, {}), timeout=FOLLOW_TIMEOUT_S
            )
            if not found:
                return {
                    "ok": False,
                    "error": f"group {group!r} ran no step {step_id} within {FOLLOW_TIMEOUT_S:.0f} s",
                }
            return self._led[group][step_id]

    def _step(self, tokens: object) -> dict[str, Any]:
        if not isinstance(tokens, dict):
            return {"ok": False, "error": "step needs tokens: {key: [ids]}"}
        results: dict[str, dict[str, Any]] = {}
        with self._lock:
            live = set(self.batch.sequences)
            sampled: dict[int, list[int]] = {}
            keys: dict[int, str] = {}
            for key, ids in tokens.items():
                sid = self._keys.get(key)
                if sid is None or sid not in live:
                    self._keys.pop(key, None)
                    results[key] = {"action": "error", "output": "none", "error": f"no live sequence {key!r}"}
                    continue
                if not isinstance(ids, list) or not all(
                    isinstance(t, int) and 0 <= t < self.batch.vocab_size for t in ids
                ):
                    results[key] = self._fail(key, sid, "sampled tokens must be ids inside the vocabulary")
                    continue
                sampled[sid] = ids
                keys[sid] = key
            if sampled:
                step = self.batch.step(sampled, only=list(sampled))
                sparse = None
                for sid, result in step.results.items():
                    key = keys[sid]
                    if result.action is Action.ERROR:
                        self._keys.pop(key, None)
                        error = _one_line(result.error) if result.error else "controller failed"
                        results[key] = {"action": "error", "output": "none", "error": error}
                        continue
                    if result.backtrack:
                        results[key] = self._fail(
                            key, sid, f"{self.batch.label(sid)}: backtrack is not supported under vLLM"
                        )
                        continue
                    entry: dict[str, Any] = {
                        "slot": self.batch.slot(sid),
                        "action": result.action.value,
                        "output": _OUTPUT_NAMES[result.output],
                    }
                    if result.fast_forward:
                        entry["forced"] = list(result.fast_forward)
                    if result.output is Output.SPARSE_BIAS:
                        if sparse is None:
                            sparse = self.batch.row_outputs(step)
                        pairs = sparse[sid].sparse_bias
                        assert pairs is not None
                        entry["ids"] = pairs[0].tolist()
                        entry["values"] = pairs[1].tolist()
                    results[key] = entry
        return {"ok": True, "results": results}

    def _fail(self, key: str, sid: int, error: str) -> dict[str, Any]:
        self._keys.pop(key, None)
        self.batch.remove(sid)
        return {"action": "error", "output": "none", "error": error}

    def _steering(self, steer: object) -> Controller | constraints.ConstraintSpec:
        """The batch's view of a steer message; ValueError / ConstraintError for a bad one."""
        if not isinstance(steer, dict):
            raise ValueError("steer must be an object with a kind")
        kind = steer.get("kind")
        if kind == "json_schema":
            return constraints.json_schema(str(steer.get("source", "")))
        if kind == "regex":
            return constraints.regex(steer.get("source"))  # type: ignore[arg-type]
        if kind == "grammar":
            return constraints.grammar(steer.get("source"))  # type: ignore[arg-type]
        if kind == "choice":
            return constraints.choice(steer.get("options"))  # type: ignore[arg-type]
        if kind == "controller":
            return self._controller(steer.get("sha256"), steer.get("arg", ""))
        raise ValueError(f"unknown steering kind {kind!r}")

    def _controller(self, sha256: object, arg: object) -> Controller:
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError("controller must be a lower-case sha256 hex digest")
        if self.controllers_dir is None:
            raise ValueError("this service has no controllers directory (--controllers-dir)")
        path = self.controllers_dir / f"{sha256}.wasm"
        try:
            wasm = path.read_bytes()
        except FileNotFoundError:
            raise ValueError(f"no stored controller {sha256}") from None
        if hashlib.sha256(wasm).hexdigest() != sha256:
            raise ValueError(f"stored controller {sha256} does not match its hash")
        if isinstance(arg, list):
            if not all(isinstance(t, int) and 0 <= t < 1 << 32 for t in arg):
                raise ValueError("a list controller argument holds uint32 token ids")
            arg_bytes: bytes | str = struct.pack(f"<{len(arg)}I", *arg)
        elif isinstance(arg, str):
            arg_bytes = arg
        else:
            raise ValueError("controller argument must be a string or a list of token ids")
        return Controller(wasm, arg=arg_bytes, name=f"controller {sha256[:12]}")


class _Server:
    """Accepts clients, one thread each; exits when the last one has gone."""

    def __init__(self, service: ControllerService, listener: socket.socket, *, persist: bool = False) -> None:
        self.service = service
        self.listener = listener
        self.persist = persist
        self._clients = 0
        self._lock = threading.Lock()
        self.done = threading.Event()

    def serve(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()
        self.done.wait()

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients += 1
            threading.Thread(target=self._client, args=(conn,), daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        try:
            with conn:
                while True:
                    try:
                        message, _ = _framing.recv_message(conn)
                    except (EOFError, ConnectionError):
                        return
                    self._answer(conn, message)
        except Exception as e:  # a broken client ends its connection, never the service
            log.warning("client connection ended: %s", _one_line(e))
        finally:
            with self._lock:
                self._clients -= 1
                if self._clients == 0 and not self.persist:
                    self.done.set()

    def _answer(self, conn: socket.socket, message: dict[str, Any]) -> None:
        op = message.get("op")
        service = self.service
        if op == "hello":
            _framing.send_message(conn, service.hello())
            service.batch.regions.mask.send(conn)
            service.batch.regions.bias.send(conn)
            return
        try:
            if op == "add":
                reply = service.add(message.get("key"), message.get("steer"), message.get("prompt", []))
            elif op == "prepare":
                reply = service.prepare(message.get("steer"))
            elif op == "remove":
                reply = service.remove(message.get("key"))
            elif op == "step":
                reply = service.step(message.get("tokens"), message.get("group"), message.get("step_id"))
            elif op == "follow":
                reply = service.follow(message.get("group"), message.get("step_id"))
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except Exception as e:  # the service's own bug: this message fails, the service lives
            log.exception("op %r failed", op)
            reply = {"ok": False, "error": f"{op}: {_one_line(e)}"}
        _framing.send_message(conn, reply)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build the batch, serve until the last client leaves."""
    parser = argparse.ArgumentParser(
        prog="python -m wasmshare.vllm.service", description=__doc__.split("\n")[0]
    )
    parser.add_argument("socket", help="path of the Unix socket to listen on")
    parser.add_argument("model", help="model folder holding tokenizer.json")
    parser.add_argument(
        "--controllers-dir", type=Path, default=None, help="folder of <sha256>.wasm controllers"
    )
    parser.add_argument("--capacity", type=int, default=256, help="concurrent steered sequences")
    parser.add_argument("--vocab-size", type=int, default=None, help="logits width (pads the token table)")
    parser.add_argument(
        "--persist", action="store_true", help="serve until terminated, not until the last client leaves"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="wasmshare service: %(message)s")
    try:
        table = TokenTable.from_file(Path(args.model) / "tokenizer.json", vocab_size=args.vocab_size)
        service = ControllerService(table, capacity=args.capacity, controllers_dir=args.controllers_dir)
    except WasmshareError as e:
        print(f"wasmshare service: {_one_line(e)}", file=sys.stderr)
        return 2
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        listener.bind(args.socket)
        listener.listen(16)
        _Server(service, listener, persist=args.persist).serve()
    finally:
        listener.close()
        service.close()
        try:
            os.unlink(args.socket)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
