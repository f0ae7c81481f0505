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

import numpy as np
import wasmtime

from .. import Guest, Region
from ..errors import AbiMismatch, GuestError, GuestLimitExceeded, GuestTrap, WasmshareError
from ..guest import ModuleSource, load_wasm_bytes
from . import _layout as L
from ._constraint_imports import TokenizerSource, constraint_imports, prepare_tokenizer
from .limits import Limits

__all__ = ["Controller", "ControllerInstance", "BatchRegions"]


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


def _page_round(n: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    return -(-n // page) * page


@dataclass
class BatchRegions:
    """The shared regions of one batch and their geometry.

    * ``mask``: ``capacity`` rows of ``mask_words`` uint32, each row starting on a page
      (``mask_stride`` bytes apart) so it can be lent on its own;
    * ``bias``: ``capacity`` rows of ``vocab_size`` float32, ``bias_stride`` apart;
    * ``step``: ``capacity`` step slots of ``step_stride`` bytes (see ``_layout``);
    * ``control``: status records plus the worker wake-up words (never lent to guests);
    * ``token_table``: the tokenizer's sealed token table.
    """

    token_table: Region
    mask: Region
    bias: Region
    step: Region
    control: Region
    capacity: int
    vocab_size: int
    mask_stride: int
    bias_stride: int
    step_stride: int

    CONTROL_HEADER_BYTES = 4096
    WORKER_BLOCK_BYTES = 64
    MAX_WORKERS = CONTROL_HEADER_BYTES // WORKER_BLOCK_BYTES

    @classmethod
    def create(
        cls, token_table: Region, vocab_size: int, capacity: int, step_slot_bytes: int
    ) -> BatchRegions:
        words = L.mask_words(vocab_size)
        mask_stride = _page_round(words * 4)
        bias_stride = _page_round(vocab_size * 4)
        step_stride = _page_round(step_slot_bytes)
        control_bytes = cls.CONTROL_HEADER_BYTES + capacity * L.STATUS_RECORD_BYTES + capacity
        return cls(
            token_table=token_table,
            mask=Region.create(capacity * mask_stride),
            bias=Region.create(capacity * bias_stride),
            step=Region.create(capacity * step_stride),
            control=Region.create(control_bytes),
            capacity=capacity,
            vocab_size=vocab_size,
            mask_stride=mask_stride,
            bias_stride=bias_stride,
            step_stride=step_stride,
        )

    @property
    def mask_words(self) -> int:
        return L.mask_words(self.vocab_size)

    def geometry(self) -> dict[str, int]:
        """Everything but the regions, for handing the layout to a worker."""
        return {
            "capacity": self.capacity,
            "vocab_size": self.vocab_size,
            "mask_stride": self.mask_stride,
            "bias_stride": self.bias_stride,
            "step_stride": self.step_stride,
        }

    def mask_rows(self) -> np.ndarray[Any, Any]:
        """``[capacity, mask_words]`` int32 view of the mask region (rows page-strided)."""
        flat = self.mask.array(np.int32)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity, self.mask_words), strides=(self.mask_stride, 4), writeable=True
        )

    def bias_rows(self) -> np.ndarray[Any, Any]:
        """``[capacity, vocab_size]`` float32 view of the bias region."""
        flat = self.bias.array(np.float32)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity, self.vocab_size), strides=(self.bias_stride, 4), writeable=True
        )

    def input_record(self, slot: int) -> np.ndarray[Any, Any]:
        return self.step.array(L.STEP_INPUT, 1, offset=slot * self.step_stride + L.STEP_INPUT_OFFSET)

    def result_record(self, slot: int) -> np.ndarray[Any, Any]:
        return self.step.array(L.STEP_RESULT, 1, offset=slot * self.step_stride + L.STEP_RESULT_OFFSET)

    def token_area(self, slot: int) -> np.ndarray[Any, Any]:
        """The uint32 area of the slot that holds tokens, then argument bytes."""
        count = (self.step_stride - L.TOKENS_OFFSET) // 4
        return self.step.array(np.uint32, count, offset=slot * self.step_stride + L.TOKENS_OFFSET)

    def step_words(self) -> np.ndarray[Any, Any]:
        """``[capacity, step_stride / 4]`` uint32 view of every step slot (for vectorised access)."""
        return self.step.array(np.uint32).reshape(self.capacity, self.step_stride // 4)

    def status_words(self) -> np.ndarray[Any, Any]:
        """``[capacity, 5]`` int32 view of every slot's status words.

        Columns: status, detail, elapsed_ns (low, high), message_len.
        """
        flat = self.control.array(np.int32, offset=self.CONTROL_HEADER_BYTES)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity, 5), strides=(L.STATUS_RECORD_BYTES, 4), writeable=True
        )

    def status_elapsed_ns(self) -> np.ndarray[Any, Any]:
        """``[capacity]`` uint64 view of every slot's last call duration."""
        flat = self.control.array(np.uint64, offset=self.CONTROL_HEADER_BYTES + 8)
        return np.lib.stride_tricks.as_strided(
            flat, shape=(self.capacity,), strides=(L.STATUS_RECORD_BYTES,), writeable=True
        )

    def status_record(self, slot: int) -> np.ndarray[Any, Any]:
        return self.control.array(
            L.STATUS, 1, offset=self.CONTROL_HEADER_BYTES + slot * L.STATUS_RECORD_BYTES
        )

    def run_flags(self) -> np.ndarray[Any, Any]:
        """One byte per slot: 1 when the slot's controller must run this step."""
        return self.control.array(
            np.uint8, self.capacity, offset=self.CONTROL_HEADER_BYTES + self.capacity * L.STATUS_RECORD_BYTES
        )

    def worker_words(self, index: int) -> np.ndarray[Any, Any]:
        """A worker's control words: ``[go, done, command]`` (u32); go and done are futex words."""
        return self.control.array(np.uint32, 3, offset=index * self.WORKER_BLOCK_BYTES)

    def worker_word_address(self, index: int, word: int) -> int:
        """Host address of word ``word`` (0 go, 1 done) of worker ``index``, for futex calls."""
        return self.control.address + index * self.WORKER_BLOCK_BYTES + 4 * word

    def close(self) -> None:
        for region in (self.mask, self.bias, self.step, self.control):
            region.close()


def write_status(
    record: np.ndarray[Any, Any], status: int, detail: int = 0, message: str = "", elapsed_ns: int = 0
) -> None:
    """Fill a slot's status record."""
    encoded = message.encode("utf-8", "replace")[:_MESSAGE_BYTES]
    record["status"] = status
    record["detail"] = detail
    record["elapsed_ns"] = elapsed_ns
    record["message_len"] = len(encoded)
    record["message"] = encoded


_MESSAGE_BYTES = 492  # the size of STATUS["message"]


def fail_instance(instance: Any, error: BaseException) -> None:
    """Record ``error`` as the host failure of ``instance`` (a controller or constraint
    instance: anything with ``regions``, ``slot`` and ``sequence_id``) in its status record."""
    write_status(
        instance.regions.status_record(instance.slot)[0],
        L.STATUS_HOST_ERROR,
        0,
        f"{getattr(instance, 'name', 'controller')} seq {instance.sequence_id}: the host failed while stepping it: "
        f"{type(error).__name__}: {error}",
    )


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
