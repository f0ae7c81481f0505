"""The plugin errors, defined in :mod:`wasmshare.errors` with every other exception."""

from __future__ import annotations

from ..errors import BlobFormatError, PluginCrashed, PluginError, PluginModuleError, ProgramError

__all__ = ["BlobFormatError", "PluginCrashed", "PluginError", "PluginModuleError", "ProgramError"]
