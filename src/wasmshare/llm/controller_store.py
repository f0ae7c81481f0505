"""Uploaded controller modules, stored by content hash and compiled once.

An upload is refused unless it is a valid wasm module that speaks this host's controller
ABI: it is compiled and instantiated once against a scratch slot (which also puts the
compiled code in the module cache, so every later sequence instantiates without compiling),
and its ``ws_ctrl_abi_version`` is checked. Modules live in a folder as ``<sha256>.wasm``
with a small JSON record beside each, so they survive a restart of the server.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._engine import EngineOptions, compile_in_child, evict_module, is_compiled
from ..errors import ControllerRejected, WasmshareError
from ._regions import BatchRegions
from .controller import Controller, ControllerInstance
from .limits import Limits
from .tokens import TokenTable

__all__ = ["ControllerStore", "StoredController", "ControllerRejected"]

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class StoredController:
    """What the API reports about a stored module."""

    id: str
    name: str
    bytes: int
    created: int

    def as_json(self) -> dict[str, Any]:
        """The API object (``"object": "controller"``)."""
        return {
            "id": self.id,
            "object": "controller",
            "name": self.name,
            "bytes": self.bytes,
            "created": self.created,
        }


UPLOAD_CHECK_LIMITS = Limits(deadline_ms=1000.0)
"""Limits of the trial ``create`` an upload must pass: looser than a step's, as a controller's
set-up (building tables from the token table) may take far longer than one of its steps."""


class ControllerStore:
    """Controller modules by sha256, kept in ``folder``.

    ``token_table`` is the served model's: validation instantiates the module the way a
    sequence will (same imports, same loans). ``max_bytes`` bounds one module.
    """

    def __init__(
        self,
        folder: Path,
        token_table: TokenTable,
        *,
        max_bytes: int = 8 << 20,
        limits: Limits | None = None,
        compile_budget_s: float = 10.0,
        max_controllers: int = 256,
    ) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.compile_budget_s = compile_budget_s
        self.max_controllers = max_controllers
        self.token_table = token_table
        self.limits = limits or UPLOAD_CHECK_LIMITS
        self._lock = threading.Lock()  # the records and _loaded; never held while compiling
        self._validating = threading.Lock()  # the scratch slot
        self._loaded: dict[str, Controller] = {}
        self._adding: set[str] = set()  # digests being validated: they count against the cap
        self._scratch: BatchRegions | None = None

    # -- API --------------------------------------------------------------------------------------

    def add(self, wasm: bytes, name: str | None = None) -> StoredController:
        """Validate and store a module; storing the same bytes twice returns the same record."""
        if not wasm:
            raise ControllerRejected("the upload is empty; send the .wasm file as the request body")
        if len(wasm) > self.max_bytes:
            raise ControllerRejected(f"the module is {len(wasm):,} bytes; the limit is {self.max_bytes:,}")
        if name is not None and not _NAME_RE.fullmatch(name):
            raise ControllerRejected("name: 1-64 characters from [A-Za-z0-9._-]")
        digest = hashlib.sha256(wasm).hexdigest()
        with self._lock:
            existing = self._record(digest)
            if existing is not None:
                return existing
            if digest in self._adding:
                raise ControllerRejected("the same module is being uploaded right now; retry when that ends")
            if sum(1 for _ in self.folder.glob("*.wasm")) + len(self._adding) >= self.max_controllers:
                raise ControllerRejected(
                    f"this server already stores {self.max_controllers} controllers; delete some first"
                )
            self._adding.add(digest)
        try:
            return self._add(wasm, name, digest)
        finally:
            with self._lock:
                self._adding.discard(digest)

    def _add(self, wasm: bytes, name: str | None, digest: str) -> StoredController:
        try:
            controller = Controller(wasm, name=name or f"controller-{digest[:12]}")
        except (WasmshareError, UnicodeDecodeError, ValueError) as e:
            raise ControllerRejected(
                _first_line(str(e))
                if isinstance(e, WasmshareError)
                else "the body is neither a wasm binary nor WAT text"
            ) from None
        self._compile(controller.wasm)
        with self._validating:
            self._validate(controller)
        record = StoredController(digest, controller.label, len(wasm), int(time.time()))
        with self._lock:
            _write_atomically(self.folder / f"{digest}.wasm", wasm)
            _write_atomically(self.folder / f"{digest}.json", json.dumps(dataclasses.asdict(record)).encode())
            self._loaded[digest] = controller
        return record

    def get(self, controller_id: str) -> StoredController | None:
        """The record of a stored module, or None."""
        if not _HASH_RE.fullmatch(controller_id):
            return None
        with self._lock:
            return self._record(controller_id)

    def list(self) -> list[StoredController]:
        """Every stored module, oldest first."""
        with self._lock:
            records = [self._record(p.stem) for p in self.folder.glob("*.wasm")]
        return sorted((r for r in records if r is not None), key=lambda r: (r.created, r.id))

    def delete(self, controller_id: str) -> bool:
        """Forget a module; sequences already running it carry on. False when unknown."""
        if not _HASH_RE.fullmatch(controller_id):
            return False
        with self._lock:
            base = self._loaded.pop(controller_id, None)
            evict_module(
                hashlib.sha256(base.wasm if base is not None else self._binary(controller_id)).hexdigest()
            )
            found = False
            for suffix in (".wasm", ".json"):
                try:
                    (self.folder / f"{controller_id}{suffix}").unlink()
                    found = True
                except FileNotFoundError:
                    pass
            return found

    def controller(self, controller_id: str, arg: bytes = b"") -> Controller:
        """A :class:`Controller` running the stored module with ``arg``; KeyError when unknown.

        The module's compiled artifact is made ready here, in a budgeted child process when
        the bounded cache has dropped it, so the engine thread never compiles a module.
        Call it off the event loop. Raises :class:`ControllerRejected` when the module no
        longer compiles within the budget."""
        with self._lock:
            base = self._loaded.get(controller_id)
            if base is None:
                record = self._record(controller_id) if _HASH_RE.fullmatch(controller_id) else None
                if record is None:
                    raise KeyError(controller_id)
                base = Controller((self.folder / f"{controller_id}.wasm").read_bytes(), name=record.name)
                self._loaded[controller_id] = base
        self._compile(base.wasm)
        return Controller(base.wasm, arg=arg, name=base.name)

    def close(self) -> None:
        """Release the scratch slot used for validation."""
        with self._validating:
            if self._scratch is not None:
                self._scratch.close()
                self._scratch = None

    # -- internals ----------------------------------------------------------------------------------

    def _binary(self, controller_id: str) -> bytes:
        """The wasm binary of a stored upload (which may be WAT text); b"" when unreadable."""
        try:
            return Controller((self.folder / f"{controller_id}.wasm").read_bytes()).wasm
        except (OSError, WasmshareError, UnicodeDecodeError, ValueError):
            return b""

    def _compile(self, wasm: bytes) -> None:
        """Compile ``wasm`` into the module cache in a child, unless it is there already."""
        options = EngineOptions.for_limits(self.limits.fuel, self.limits.deadline_ms)
        if is_compiled(wasm, options):
            return
        try:
            compile_in_child(wasm, options, timeout_s=self.compile_budget_s)
        except TimeoutError as e:
            raise ControllerRejected(f"{e}; the budget is {self.compile_budget_s:g} s") from None
        except ValueError as e:
            raise ControllerRejected(str(e)) from None
        except OSError:
            pass  # no child process here: the module compiles in process when first used

    def _record(self, digest: str) -> StoredController | None:
        meta = self.folder / f"{digest}.json"
        if not (self.folder / f"{digest}.wasm").is_file():
            return None
        try:
            return StoredController(**json.loads(meta.read_text()))
        except (OSError, ValueError, TypeError):
            size = (self.folder / f"{digest}.wasm").stat().st_size
            return StoredController(digest, f"controller-{digest[:12]}", size, int(time.time()))

    def _validate(self, controller: Controller) -> None:
        """Instantiate once against a scratch slot: compiles (and caches) the module, checks the ABI."""
        if self._scratch is None:
            self._scratch = BatchRegions.create(
                self.token_table.region, self.token_table.vocab_size, capacity=1, step_slot_bytes=64 << 10
            )
        try:
            instance = ControllerInstance(
                controller, self._scratch, 0, 0, self.limits, tokenizer=self.token_table
            )
        except WasmshareError as e:
            raise ControllerRejected(_first_line(str(e))) from None
        instance.close()


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else text


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
