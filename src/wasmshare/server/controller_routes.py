"""The controller upload API (``/v1/controllers``), for ``wasmshare serve`` and ``wasmshare vllm serve``.

``POST /v1/controllers?name=N`` takes the module as the body and stores it once it has been
checked (:class:`~wasmshare.llm.controller_store.ControllerStore`); ``GET`` lists one or all,
``DELETE`` forgets one. Errors are :class:`~wasmshare.errors.APIError` s in OpenAI's shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from ..errors import APIError, WasmshareError
from ..llm.controller_store import ControllerStore

__all__ = ["add_controller_routes", "read_body"]


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (never read whole first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(
            413, f"the body is {int(declared):,} bytes; the limit is {limit:,}", code="body_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the body passes the limit of {limit:,} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def add_controller_routes(app: FastAPI, store: ControllerStore, *, max_bytes: int) -> None:
    """Register the four ``/v1/controllers`` routes of ``app`` over ``store``."""

    @app.post("/v1/controllers")
    async def upload_controller(request: Request, name: str | None = None) -> dict[str, Any]:
        wasm = await read_body(request, max_bytes)
        try:
            record = await run_in_threadpool(store.add, wasm, name)
        except WasmshareError as e:
            raise APIError(
                400, f"controller rejected: {_first_line(str(e))}", code="invalid_controller", param="body"
            ) from None
        return record.as_json()

    @app.get("/v1/controllers")
    async def list_controllers() -> dict[str, Any]:
        records = await run_in_threadpool(store.list)
        return {"object": "list", "data": [r.as_json() for r in records]}

    @app.get("/v1/controllers/{controller_id}")
    async def get_controller(controller_id: str) -> dict[str, Any]:
        record = await run_in_threadpool(store.get, controller_id)
        if record is None:
            raise APIError(404, f"no controller {controller_id!r}", code="controller_not_found")
        return record.as_json()

    @app.delete("/v1/controllers/{controller_id}")
    async def delete_controller(controller_id: str) -> dict[str, Any]:
        if not await run_in_threadpool(store.delete, controller_id):
            raise APIError(404, f"no controller {controller_id!r}", code="controller_not_found")
        return {"id": controller_id, "object": "controller", "deleted": True}


def _first_line(text: str) -> str:
    """The first line of an error message, for a client (wasmtime's carry backtraces)."""
    first = text.strip().splitlines()[0] if text.strip() else text
    return first[:500]
