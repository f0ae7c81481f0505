"""Shared read-only data for plugin processes: one copy of a large schema for every plugin.

A host publishes a schema blob once (:class:`Publication`: a sealed memfd, or a named
shm object with leases) and starts sandboxed plugin processes (:class:`PluginHost`),
each running a wasm guest that reads the blob in place, read-only: lent into its memory
(``mode="loan"``), or embedded in the plugin module's data segment and mapped
copy-on-write from a compiled artifact (:func:`embed_plugin`, ``mode="embedded"``).
The blob format (:class:`SchemaBlob`) holds the schema JSON and a compact lookup index;
:func:`generate_blob` makes a provider-like schema of any size; the type-check plugin
(``guests/plugins/typecheck.c``) checks infrastructure programs against it.

Programs, modules and blob files come from users and are untrusted: every file is
opened without blocking and refused unless it is a regular file within its size limit
(``*_FILE_MAX_BYTES``), and YAML is checked for size, nesting and alias expansion
(``PROGRAM_*``) before it is built.

See ``docs/plugins.md``. YAML programs need PyYAML (``pip install 'wasmshare[plugins]'``).
"""

from ..errors import BlobFormatError, PluginCrashed, PluginError, PluginModuleError, ProgramError
from .blob import BLOB_FILE_MAX_BYTES, PropertyInfo, SchemaBlob, TypeInfo, build_blob
from .embedded import EmbeddedPlugin, embed_plugin
from .host import CheckResult, Mode, Plugin, PluginHost
from .memory import MemoryUsage, memory_usage
from .module import MODULE_FILE_MAX_BYTES, REQUIRED_EXPORTS, check_plugin_module, default_plugin_module
from .program import (
    PROGRAM_EXPANDED_MAX_CHARS,
    PROGRAM_MAX_NESTING_LEVELS,
    PROGRAM_MAX_NODES,
    PROGRAM_TEXT_MAX_BYTES,
    Diagnostic,
    DiagnosticKind,
    Program,
    Resource,
    decode_diagnostics,
    encode_program,
    parse_program,
    program_yaml,
    reference_check,
    sample_program,
)
from .publish import BlobLease, Publication, blob_holders, sweep_stale_blobs
from .schema import generate_blob, generate_schema, parse_size

__all__ = [
    "BLOB_FILE_MAX_BYTES",
    "BlobFormatError",
    "BlobLease",
    "CheckResult",
    "Diagnostic",
    "DiagnosticKind",
    "EmbeddedPlugin",
    "MODULE_FILE_MAX_BYTES",
    "MemoryUsage",
    "Mode",
    "Plugin",
    "PluginCrashed",
    "PluginError",
    "PluginHost",
    "PROGRAM_EXPANDED_MAX_CHARS",
    "PROGRAM_MAX_NESTING_LEVELS",
    "PROGRAM_MAX_NODES",
    "PROGRAM_TEXT_MAX_BYTES",
    "PluginModuleError",
    "Program",
    "ProgramError",
    "PropertyInfo",
    "Publication",
    "REQUIRED_EXPORTS",
    "Resource",
    "SchemaBlob",
    "TypeInfo",
    "blob_holders",
    "build_blob",
    "check_plugin_module",
    "decode_diagnostics",
    "default_plugin_module",
    "embed_plugin",
    "encode_program",
    "generate_blob",
    "generate_schema",
    "memory_usage",
    "parse_program",
    "parse_size",
    "program_yaml",
    "reference_check",
    "sample_program",
    "sweep_stale_blobs",
]
