"""The ``wasmshare_`` keys a vLLM request steers with, checked: shared by the processor and the gateway.

A request asks for steering with flat keys in ``SamplingParams.extra_args`` (over HTTP,
``vllm_xargs`` allows only flat str / int / float / list values, hence no nesting): exactly
one of ``wasmshare_json_schema`` (JSON text), ``wasmshare_regex``, ``wasmshare_choice``
(list of str), ``wasmshare_grammar`` (Lark text) or ``wasmshare_controller`` (the sha256 of
a stored ``.wasm``, with an optional ``wasmshare_arg``: a str, or a list of uint32 ids).
``wasmshare_tag`` (32 hex digits) names the request to ``wasmshare vllm serve``, which
sets it: when the request's steering ends with an error, the processor writes the message
to ``$WASMSHARE_STATUS_DIR/<tag>.error`` for the gateway to answer with.

Standard library only: the processor imports it in vLLM's environment, the gateway in
wasmshare's.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_STEERING_BYTES", "PREFIX", "STEERING_KEYS", "TAG", "request_tag", "steering_of"]

PREFIX = "wasmshare_"
STEERING_KEYS = ("json_schema", "regex", "choice", "grammar", "controller")
TAG = PREFIX + "tag"
_KNOWN = {PREFIX + k for k in (*STEERING_KEYS, "arg", "tag")}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TAG = re.compile(r"[0-9a-f]{32}")
MAX_STEERING_BYTES = 256 << 10
"""Largest schema, regex, grammar, choice list or controller argument a request may send."""


def request_tag(extra_args: dict[str, Any] | None) -> str | None:
    """The request's ``wasmshare_tag``, or None; ValueError for one that is not 32 hex digits."""
    tag = (extra_args or {}).get(TAG)
    if tag is None:
        return None
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ValueError(f"{TAG} must be 32 lower-case hex digits")
    return tag


def steering_of(extra_args: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``steer`` message of a request's ``extra_args``, or None when it asks for nothing.

    Raises ValueError (one line) for an unknown ``wasmshare_`` key, two steerings at once,
    a value of the wrong type, a schema that is not JSON, or an argument without a controller.
    """
    if not extra_args:
        return None
    ours = {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(PREFIX)}
    if not ours:
        return None
    unknown = sorted(set(ours) - _KNOWN)
    if unknown:
        raise ValueError(f"unknown wasmshare key {unknown[0]!r}; known: {', '.join(sorted(_KNOWN))}")
    chosen = [k for k in STEERING_KEYS if PREFIX + k in ours]
    if TAG in ours:
        request_tag(extra_args)  # a malformed tag is refused like any other bad value
        if not chosen and set(ours) == {TAG}:
            return None
    if len(chosen) > 1:
        raise ValueError(f"give one wasmshare steering, not {' and '.join(PREFIX + k for k in chosen)}")
    if not chosen:
        raise ValueError(f"{PREFIX}arg needs {PREFIX}controller")
    kind = chosen[0]
    value = ours[PREFIX + kind]
    for key, given in ours.items():
        size = sum(len(str(v)) for v in given) if isinstance(given, list) else len(str(given))
        if size > MAX_STEERING_BYTES:
            raise ValueError(f"{key} is {size:,} characters; the limit is {MAX_STEERING_BYTES:,}")
    if PREFIX + "arg" in ours and kind != "controller":
        raise ValueError(f"{PREFIX}arg needs {PREFIX}controller")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(o, str) and o for o in value):
            raise ValueError(f"{PREFIX}choice must be a non-empty list of non-empty strings")
        return {"kind": "choice", "options": value}
    if kind == "controller":
        if not isinstance(value, str) or not _SHA256.fullmatch(value):
            raise ValueError(f"{PREFIX}controller must be a lower-case sha256 hex digest")
        arg = ours.get(PREFIX + "arg", "")
        if isinstance(arg, list):
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 32 for t in arg):
                raise ValueError(f"{PREFIX}arg as a list holds uint32 token ids")
        elif not isinstance(arg, str):
            raise ValueError(f"{PREFIX}arg must be a string or a list of token ids")
        return {"kind": "controller", "sha256": value, "arg": arg}
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{PREFIX}{kind} must be a non-empty string")
    if kind == "json_schema":
        try:
            schema = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{PREFIX}json_schema is not valid JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{PREFIX}json_schema must be a JSON object or boolean")
    return {"kind": kind, "source": value}
