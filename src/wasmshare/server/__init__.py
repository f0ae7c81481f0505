"""OpenAI-compatible HTTP server with controller upload, streaming and continuous batching.

``wasmshare serve`` runs it; in Python, :func:`create_app` builds the app around one
:class:`~wasmshare.server.service.EngineService` (one engine loop for every request).
"""

from __future__ import annotations

from ..llm.controller_store import ControllerRejected, ControllerStore, StoredController
from .app import ServerConfig, create_app
from .service import EngineService

__all__ = [
    "ServerConfig",
    "create_app",
    "ControllerStore",
    "ControllerRejected",
    "StoredController",
    "EngineService",
]
