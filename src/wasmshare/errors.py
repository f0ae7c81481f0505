"""Every exception wasmshare raises on purpose, in one tree under :class:`WasmshareError`::

    WasmshareError
    ├── RegionError                a shared-memory region could not be created, opened or used
    ├── BuildError                 a guest source file could not be compiled
    ├── LoanError                  a region could not be lent into a guest (placement, access, overlap)
    │   └── LoanRevoked            the loan was revoked or its region closed
    ├── GuestError                 a guest module failed (carries .guest and .sequence)
    │   ├── GuestBusy              the guest is already running on another thread
    │   ├── AbiMismatch            the guest was built for another wasmshare ABI version
    │   ├── GuestTrap              the guest trapped (carries .trap_code)
    │   │   └── GuestLimitExceeded the guest hit a limit: fuel, memory or deadline (carries .limit)
    │   └── SequenceFailed         llm: a sequence's controller failed and the sequence ended (.cause)
    ├── PluginError                plugins: a plugin, its schema blob or its program failed
    │   ├── BlobFormatError        a schema blob is malformed (nothing was published)
    │   ├── PluginModuleError      a plugin module is not wasm or lacks the plugin ABI's exports
    │   ├── PluginCrashed          a plugin process died (carries .plugin and .returncode)
    │   └── ProgramError           a program is not a valid infrastructure program
    ├── TokenizerError             llm: a tokenizer could not be read, or a token has no exact bytes
    ├── ModelError                 llm: a model could not be found, converted or loaded
    ├── ConstraintError            llm: a constraint could not be compiled (schema feature, regex, grammar)
    ├── BatchFull                  llm: every slot of a batch is taken
    ├── QueueFull                  llm: the engine's request queue holds its max_waiting requests
    ├── ControllerRejected         server: an uploaded controller module is not usable
    ├── Overloaded                 server: every slot is taken and the waiting queue is full
    └── APIError                   server: a request failed with an OpenAI-style error body (.status)

One module holds them all, below every layer, so that a caller catches a whole family
(``except GuestError``, ``except PluginError``) without importing the layer that raises
it, and no layer imports another's errors sideways. A plugin that traps or runs past a
limit raises :class:`GuestTrap` / :class:`GuestLimitExceeded` for that query, with the
plugin's name as ``guest``. wasmtime's own errors are chained as ``__cause__``.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = [
    "WasmshareError",
    "RegionError",
    "BuildError",
    "LoanError",
    "LoanRevoked",
    "GuestError",
    "GuestBusy",
    "AbiMismatch",
    "GuestTrap",
    "GuestLimitExceeded",
    "LimitKind",
    "PluginError",
    "BlobFormatError",
    "PluginModuleError",
    "PluginCrashed",
    "ProgramError",
    "SequenceFailed",
    "TokenizerError",
    "ModelError",
    "ConstraintError",
    "BatchFull",
    "QueueFull",
    "ControllerRejected",
    "Overloaded",
    "APIError",
]

LimitKind = Literal["fuel", "memory", "deadline"]


class WasmshareError(Exception):
    """Base class of every error wasmshare raises on purpose."""


class RegionError(WasmshareError):
    """A shared-memory region could not be created, opened, mapped or used."""


class BuildError(WasmshareError):
    """A guest could not be compiled: missing toolchain or a compiler error (in the message)."""


class LoanError(WasmshareError):
    """A region could not be lent into a guest, or a loan was used wrongly."""


class LoanRevoked(LoanError):
    """The loan was revoked, released, or its region was closed."""


class GuestError(WasmshareError):
    """A guest module could not be loaded, instantiated or called.

    ``guest`` is the guest's name; ``sequence`` is the caller-assigned sequence id
    (for LLM controllers), or ``None``.
    """

    def __init__(self, message: str, *, guest: str | None = None, sequence: int | None = None) -> None:
        super().__init__(message)
        self.guest = guest
        self.sequence = sequence


class GuestBusy(GuestError):
    """The guest is already executing on another thread; a guest is single-threaded."""


class AbiMismatch(GuestError):
    """The guest reports a wasmshare ABI version this host does not speak."""


class GuestTrap(GuestError):
    """The guest trapped: out-of-bounds access, unreachable, a revoked loan, ...

    ``trap_code`` is the :class:`wasmtime.TrapCode` member, or ``None`` when wasmtime
    gave none (for example a trap raised by a host function).
    """

    def __init__(
        self,
        message: str,
        *,
        guest: str | None = None,
        sequence: int | None = None,
        trap_code: object | None = None,
    ) -> None:
        super().__init__(message, guest=guest, sequence=sequence)
        self.trap_code = trap_code


class GuestLimitExceeded(GuestTrap):
    """The guest ran past a limit set by the host: ``limit`` is fuel, memory or deadline."""

    def __init__(
        self,
        message: str,
        *,
        limit: LimitKind,
        guest: str | None = None,
        sequence: int | None = None,
        trap_code: object | None = None,
    ) -> None:
        super().__init__(message, guest=guest, sequence=sequence, trap_code=trap_code)
        self.limit: LimitKind = limit


class SequenceFailed(GuestError):
    """A sequence's controller failed; the sequence ended. ``cause`` says how (trap, limit, ...)."""

    def __init__(self, message: str, *, guest: str | None, sequence: int | None, cause: str) -> None:
        super().__init__(message, guest=guest, sequence=sequence)
        self.cause = cause


class PluginError(WasmshareError):
    """A plugin, its schema blob or the program it was given failed."""


class BlobFormatError(PluginError):
    """A schema blob is malformed: bad magic or version, an offset out of bounds, a bad checksum."""


class PluginModuleError(PluginError):
    """A plugin module is not valid wasm or does not export the plugin ABI (``plugin_init``, ...)."""


class PluginCrashed(PluginError):
    """A plugin process died; ``plugin`` is its name, ``returncode`` its exit status (-N: signal N)."""

    def __init__(self, message: str, *, plugin: str, returncode: int | None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.returncode = returncode


class ProgramError(PluginError):
    """A program is not a valid infrastructure program (not YAML, no ``resources``, a resource without a type)."""


class TokenizerError(WasmshareError):
    """A tokenizer could not be read, or its tokens have no exact byte sequences."""


class ModelError(WasmshareError):
    """A model could not be found, converted or loaded (unknown name, missing package, bad file)."""


class ConstraintError(WasmshareError):
    """A constraint could not be compiled: unsupported schema feature, bad regex or grammar."""


class BatchFull(WasmshareError):
    """Every slot of the batch is taken."""


class QueueFull(WasmshareError):
    """The request queue already holds its ``max_waiting`` requests."""


class ControllerRejected(WasmshareError):
    """An upload that is not a usable controller module (the message says why)."""


class Overloaded(WasmshareError):
    """Every slot is taken and the waiting queue is full."""


class APIError(WasmshareError):
    """An error answered as an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
