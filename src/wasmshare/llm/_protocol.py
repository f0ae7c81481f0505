"""Commands from the engine to a controller worker, sent over :mod:`wasmshare._framing`."""

from __future__ import annotations

CMD_STEP = 1
CMD_MESSAGE = 2
