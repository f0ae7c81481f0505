"""Controllers: per-sequence wasm guests that write token masks and logit biases in place.

:class:`Controller` names a controller module and its argument. A
:class:`ControllerInstance` is one such guest bound to one slot of a batch: it lends
the batch's regions into the guest (token table read-only; the slot's step record,
mask row and bias row read-write) and runs ``ws_ctrl_create`` / ``ws_ctrl_step``. The
same class runs in the engine's process (thread mode) and in worker processes: it
reports how each call ended in the slot's status record in shared memory and never
raises for a guest fault, so one misbehaving controller cannot stop a batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from .._module import ModuleSource, load_wasm_bytes
from ..errors import AbiMismatch, GuestError, GuestLimitExceeded, GuestTrap, WasmshareError
from ..guest import Guest
from . import _layout as L
from ._constraint_imports import TokenizerSource, constraint_imports, prepare_tokenizer
from ._layout import write_status
from ._regions import BatchRegions, fail_instance
from .limits import Limits

__all__ = [
    "BatchRegions",
    "Controller",
    "ControllerInstance",
    "fail_instance",
    "module_path_or_bytes",
    "write_status",
]


@dataclass(frozen=True)
class Controller:
    """A controller module and the argument bytes its ``ws_ctrl_create`` receives.

    ``module`` is a ``.wasm``/``.wat`` path, wasm bytes or WAT text; ``name`` appears in
    every error (default: the file stem). Compiled modules are cached, so many sequences
    running the same controller share one compiled module.
    """

    module: ModuleSource
    arg: bytes | str = b""
    name: str | None = None
    _wasm: bytes = field(default=b"", repr=False, compare=False)

    def __post_init__(self) -> None:
        wasm, default_name = load_wasm_bytes(self.module)
        object.__setattr__(self, "_wasm", wasm)
        if self.name is None:
            object.__setattr__(self, "name", default_name)
        if isinstance(self.arg, str):
            object.__setattr__(self, "arg", self.arg.encode("utf-8"))
        elif not isinstance(self.arg, (bytes, bytearray, memoryview)):
            raise WasmshareError(f"controller argument must be bytes or str, got {type(self.arg).__name__}")
        else:
            object.__setattr__(self, "arg", bytes(self.arg))

    @property
    def wasm(self) -> bytes:
        """The module's wasm bytes."""
        return self._wasm

    @property
    def arg_bytes(self) -> bytes:
        """The argument as bytes."""
        return self.arg if isinstance(self.arg, bytes) else bytes(self.arg, "utf-8")

    @property
    def label(self) -> str:
        """The name used in messages."""
        return self.name or "controller"


class ControllerInstance:
    """One controller guest bound to one slot of a batch (see the module docstring).

    Construction raises :class:`GuestError` (bad module, wrong ABI, exports missing);
    :meth:`create` and :meth:`step` never raise for guest faults: they write the slot's
    status record, which the batch reads.
    """

    def __init__(
        self,
        controller: Controller,
        regions: BatchRegions,
        slot: int,
        sequence_id: int,
        limits: Limits,
        tokenizer: TokenizerSource | None = None,
    ) -> None:
        self.controller = controller
        self.slot = slot
        self.sequence_id = sequence_id
        self.regions = regions
        self.status = regions.status_record(slot)
        name = controller.label
        self._deadline_ns = int(limits.deadline_ms * 1e6) if limits.deadline_ms is not None else None
        self._call_started_ns = 0
        holder: list[Guest] = []
        imports = (
            constraint_imports(lambda: holder[0], tokenizer, self._check_budget)
            if tokenizer is not None
            else None
        )
        # WASI is never linked: a controller gets the imports of the controller ABI and nothing
        # else (WASI would hand it the server's stdout and stderr, a clock and a sleep that no
        # epoch deadline interrupts).
        self.guest = Guest(
            controller.wasm,
            name=name,
            imports=imports,
            deadline_ms=limits.deadline_ms,
            fuel=limits.fuel,
            memory_limit_bytes=limits.memory_limit_bytes,
            sequence=sequence_id,
            wasi=False,
        )
        holder.append(self.guest)
        try:
            self._check_exports()
            if tokenizer is not None and any(
                imp.module == "wasmshare" and imp.name == "ws_constraint_open"
                for imp in self.guest.module.imports
            ):
                # One-off set-up (the grammar engine's view of the tokenizer, seconds on a busy
                # machine) happens here, never inside a step's deadline.
                prepare_tokenizer(tokenizer)
            self._lend()
            self._create_fn = self.guest.func("ws_ctrl_create")
            self._step_fn = self.guest.func("ws_ctrl_step")
        except BaseException:
            self.guest.close()
            raise

    def _check_exports(self) -> None:
        guest = self.guest
        exports = {e.name for e in guest.module.exports}
        for export in guest.module.exports:
            expected = _EXPORT_SIGNATURES.get(export.name)
            if expected is None:
                continue
            ty = export.type
            found = (
                (tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results))
                if isinstance(ty, wasmtime.FuncType)
                else None
            )
            if found != expected:
                raise AbiMismatch(
                    f"controller '{guest.name}' exports {export.name} as {_describe_signature(found)}; "
                    f"the controller ABI needs {_describe_signature(expected)}",
                    guest=guest.name,
                    sequence=self.sequence_id,
                )
        if "ws_ctrl_abi_version" not in exports:
            raise AbiMismatch(
                f"controller '{guest.name}' does not export ws_ctrl_abi_version; build it with wasmshare_controller.h",
                guest=guest.name,
                sequence=self.sequence_id,
            )
        version = guest.call("ws_ctrl_abi_version")
        if version != L.CONTROLLER_ABI_VERSION:
            raise AbiMismatch(
                f"controller '{guest.name}' was built for controller ABI v{version}; "
                f"this host speaks v{L.CONTROLLER_ABI_VERSION}",
                guest=guest.name,
                sequence=self.sequence_id,
            )
        missing = [n for n in ("ws_ctrl_create", "ws_ctrl_step") if n not in exports]
        if missing:
            raise GuestError(
                f"controller '{guest.name}' does not export {', '.join(missing)}",
                guest=guest.name,
                sequence=self.sequence_id,
            )

    def _lend(self) -> None:
        r, slot, guest = self.regions, self.slot, self.guest
        table = guest.lend(r.token_table, "ro")
        step = guest.lend(r.step, "rw", offset=slot * r.step_stride, nbytes=r.step_stride)
        mask = guest.lend(r.mask, "rw", offset=slot * r.mask_stride, nbytes=r.mask_words * 4)
        bias = guest.lend(r.bias, "rw", offset=slot * r.bias_stride, nbytes=r.vocab_size * 4)
        self._input_ptr = step.ptr + L.STEP_INPUT_OFFSET
        self._result_ptr = step.ptr + L.STEP_RESULT_OFFSET
        self._tokens_ptr = step.ptr + L.TOKENS_OFFSET
        record = r.input_record(slot)[0]
        record["struct_size"] = L.STEP_INPUT.itemsize
        record["abi_version"] = L.CONTROLLER_ABI_VERSION
        record["vocab_size"] = r.vocab_size
        record["mask_words"] = r.mask_words
        record["token_table"] = table.ptr
        record["mask"] = mask.ptr
        record["bias"] = bias.ptr
        record["tokens"] = self._tokens_ptr
        record["sequence_id"] = self.sequence_id & 0xFFFFFFFF
        self._input = record
        self._result = r.result_record(slot)[0]

    def _reset_result(self) -> None:
        result = self._result
        result["struct_size"] = L.STEP_RESULT.itemsize
        result["action"] = L.ACTION_CONTINUE
        result["output"] = L.OUTPUT_NONE
        result["backtrack"] = 0
        result["n_ff"] = 0
        result["n_bias"] = 0

    def create(self, n_prompt_tokens: int, arg_offset_bytes: int, arg_len: int) -> None:
        """Run ``ws_ctrl_create``; the batch already wrote the prompt and argument into the slot."""
        self._input["step"] = 0
        self._input["n_tokens"] = n_prompt_tokens
        self._input["arg"] = self._tokens_ptr + arg_offset_bytes
        self._input["arg_len"] = arg_len
        self._run(self._create_fn, "ws_ctrl_create")
        self._input["arg"] = 0
        self._input["arg_len"] = 0

    def step(self) -> None:
        """Run ``ws_ctrl_step``. The batch already wrote the step number and tokens, reset
        the result and set the status to OK; only a failure writes the status record.

        Never raises: whatever goes wrong in the call (a trap, a limit, a host error, even a
        bug of the host's) ends this sequence alone through its status record."""
        self._call_started_ns = time.perf_counter_ns()
        try:
            code = self._step_fn(self._input_ptr, self._result_ptr)
        except WasmshareError as e:
            self._record_failure(e, 0)
            return
        except Exception as e:  # noqa: BLE001 - contained to this sequence, see the docstring
            self._record_host_failure(e, "ws_ctrl_step")
            return
        if code < 0:
            write_status(
                self.status,
                L.STATUS_RETURNED_ERROR,
                int(code),
                f"controller '{self.guest.name}' seq {self.sequence_id}: ws_ctrl_step returned error {code}",
            )

    def _check_budget(self, what: str) -> None:
        """Raise :class:`GuestLimitExceeded` when the current call has used up its deadline.

        The epoch deadline stops wasm code, not the host: a host function the guest calls
        checks this before and after its work, so the deadline covers the whole call."""
        if self._deadline_ns is None:
            return
        elapsed = time.perf_counter_ns() - self._call_started_ns
        if elapsed > self._deadline_ns:
            raise GuestLimitExceeded(
                f"controller '{self.guest.name}' seq {self.sequence_id}: deadline {self._deadline_ns / 1e6:g} ms "
                f"exceeded in host function {what} ({elapsed / 1e6:.1f} ms into the call)",
                limit="deadline",
                guest=self.guest.name,
                sequence=self.sequence_id,
            )

    def _record_host_failure(self, error: Exception, what: str) -> None:
        write_status(
            self.status,
            L.STATUS_HOST_ERROR,
            0,
            f"controller '{self.guest.name}' seq {self.sequence_id}: {what} failed in the host: "
            f"{type(error).__name__}: {error}",
        )

    def _run(self, fn: Any, what: str) -> None:
        self._reset_result()
        status = self.status
        started = self._call_started_ns = time.perf_counter_ns()
        try:
            code = fn(self._input_ptr, self._result_ptr)
        except WasmshareError as e:
            self._record_failure(e, started)
            return
        except Exception as e:  # noqa: BLE001 - contained to this sequence, as in step()
            self._record_host_failure(e, what)
            return
        elapsed = time.perf_counter_ns() - started
        if code < 0:
            write_status(
                status,
                L.STATUS_RETURNED_ERROR,
                int(code),
                f"controller '{self.guest.name}' seq {self.sequence_id}: {what} returned error {code}",
                elapsed,
            )
            return
        write_status(status, L.STATUS_OK, 0, "", elapsed)

    def _record_failure(self, error: WasmshareError, started_ns: int) -> None:
        elapsed = time.perf_counter_ns() - started_ns if started_ns else 0
        if isinstance(error, GuestLimitExceeded):
            write_status(self.status, L.STATUS_LIMIT, L.LIMIT_CODES[error.limit], str(error), elapsed)
        elif isinstance(error, GuestTrap):
            write_status(self.status, L.STATUS_TRAP, 0, str(error), elapsed)
        else:
            write_status(self.status, L.STATUS_HOST_ERROR, 0, str(error), elapsed)

    @property
    def bytes_copied(self) -> int:
        """Bytes the guest's loans and host functions have copied so far (0 where loans map pages)."""
        return self.guest.bytes_copied

    def close(self) -> None:
        """Run the optional ``ws_ctrl_free`` teardown, then release the guest."""
        if self.guest.closed:
            return
        if "ws_ctrl_free" in {e.name for e in self.guest.module.exports}:
            try:
                self.guest.call("ws_ctrl_free")
            except WasmshareError:
                pass
        self.guest.close()


_I32 = "i32"
# The controller ABI's exports as (params, results); wasmtime prints value types as "i32".
_EXPORT_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ws_ctrl_abi_version": ((), (_I32,)),
    "ws_ctrl_create": ((_I32, _I32), (_I32,)),
    "ws_ctrl_step": ((_I32, _I32), (_I32,)),
    "ws_ctrl_free": ((), ()),
}


def _describe_signature(signature: tuple[tuple[str, ...], tuple[str, ...]] | None) -> str:
    if signature is None:
        return "something that is not a function"
    params, results = signature
    return f"({', '.join(params)}) -> ({', '.join(results)})"


def module_path_or_bytes(controller: Controller) -> str | bytes:
    """What to send a worker: a path when the module is a file, else its bytes."""
    module = controller.module
    if isinstance(module, (str, os.PathLike)) and not str(module).lstrip().startswith("(module"):
        return str(Path(module).resolve())
    return controller.wasm
