"""Request bodies and response shapes of the OpenAI-compatible API.

Only what the engine can honour is accepted; a field that would be silently ignored by
wasmshare (``logprobs``, ``tools``, ``echo``...) is refused with a clear message instead.
Unknown extra fields are tolerated, as OpenAI's own server does for forward compatibility.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import APIError

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ResponseFormat",
    "error_body",
]

#: Fields OpenAI defines that this server does not implement; sending one is an error.
UNSUPPORTED_FIELDS = (
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "suffix",
    "tools",
    "functions",
    "logit_bias",
)


def error_body(
    message: str, *, type: str = "invalid_request_error", code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


_INT64 = 1 << 63
_MAX_JSON_DEPTH = 64


def _check_text(value: Any, where: str = "", depth: int = 0) -> None:
    """Raise ValueError for a string anywhere in ``value`` that is not valid Unicode text.

    JSON may spell a lone surrogate (``"\\ud800"``), which Python's json accepts and no
    UTF-8 encoder (the tokenizer's, llguidance's) does: checked once here, at the edge,
    so nothing further in has to."""
    if depth > _MAX_JSON_DEPTH:
        raise ValueError(f"{where or 'body'}: nested deeper than {_MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"{where or 'body'}: the string holds a lone surrogate, which is not text"
            ) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where, depth + 1)
            _check_text(item, f"{where}.{key}" if where else str(key), depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_text(item, f"{where}[{i}]", depth + 1)


class _Steering(BaseModel):
    """Sampling and steering fields shared by both endpoints, including wasmshare's extras."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        _check_text(data)
        return data

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)  # OpenAI's: a 64-bit signed int
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # wasmshare extensions (send them with the OpenAI client's ``extra_body``)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    controller: str | None = None
    controller_arg: str | list[int] | None = None
    stall_policy: Literal["wait", "sit_out"] | None = None

    def stop_strings(self) -> list[str]:
        """``stop`` as a list (OpenAI allows a string or up to 4 strings)."""
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(stops) > 4:
            raise APIError(400, "stop: at most 4 stop sequences", param="stop")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop sequences must not be empty", param="stop")
        return stops

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def refuse_unsupported(self) -> None:
        """APIError for an OpenAI field this server would otherwise ignore."""
        extra = self.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            value = extra.get(name)
            if value not in (None, False, 0, [], {}):
                raise APIError(400, f"{name} is not supported by this server", param=name)


class CompletionRequest(_Steering):
    """``POST /v1/completions``: one or more prompts (text or token ids)."""

    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request (a list of strings or of token-id lists is a batch)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty", param="prompt")
        items: list[Any] = list(p)
        if all(isinstance(x, int) for x in items):
            return [[int(x) for x in items]]
        if all(isinstance(x, str) for x in items):
            return [str(x) for x in items]
        if all(isinstance(x, list) for x in items):
            return [[int(t) for t in x] for x in items]
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


class ChatMessage(BaseModel):
    """One chat message; ``content`` is text or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text; APIError for parts that are not text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400, f"only text content parts are supported, got {part.get('type')!r}", param="messages"
                )
            pieces.append(part["text"])
        return "".join(pieces)


class ChatCompletionRequest(_Steering):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def chat(self) -> list[dict[str, str]]:
        """Messages as plain role/content dicts for the chat template (``developer`` reads as ``system``)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


def new_id(prefix: str) -> str:
    """An OpenAI-looking object id."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    """Seconds since the epoch, as OpenAI's ``created``."""
    return int(time.time())
