"""Exceptions of the plugin layer; all derive from :class:`~wasmshare.errors.WasmshareError`::

    WasmshareError
    └── PluginError            a plugin, its blob or its program failed
        ├── BlobFormatError    a schema blob is malformed (nothing was published)
        ├── PluginModuleError  a plugin module lacks the plugin ABI's exports
        ├── PluginCrashed      a plugin process died (killed, crashed, exited)
        └── ProgramError       a program is not a valid infrastructure program

A plugin that traps or runs past a limit raises the core's
:class:`~wasmshare.errors.GuestTrap` / :class:`~wasmshare.errors.GuestLimitExceeded`
for that query, with the plugin's name as ``guest``.
"""

from __future__ import annotations

from ..errors import WasmshareError

__all__ = ["PluginError", "BlobFormatError", "PluginModuleError", "PluginCrashed", "ProgramError"]


class PluginError(WasmshareError):
    """A plugin, its schema blob or the program it was given failed."""


class BlobFormatError(PluginError):
    """A schema blob is malformed: bad magic or version, an offset out of bounds, a bad checksum."""


class PluginModuleError(PluginError):
    """A plugin module does not export the plugin ABI (``plugin_init``, ``plugin_check``, ...)."""


class PluginCrashed(PluginError):
    """A plugin process died; ``plugin`` is its name, ``returncode`` its exit status (-N: signal N)."""

    def __init__(self, message: str, *, plugin: str, returncode: int | None) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.returncode = returncode


class ProgramError(PluginError):
    """A program is not a valid infrastructure program (not YAML, no ``resources``, a resource without a type)."""
