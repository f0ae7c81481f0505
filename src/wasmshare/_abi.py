"""The constants of the guest ABI (``include/wasmshare.h``) that the core host speaks.

:mod:`wasmshare.abi` re-exports them for guest authors; a test parses the header and
checks that they agree.
"""

from __future__ import annotations

from typing import Final

ABI_VERSION: Final = 1
"""Value of ``WASMSHARE_ABI_VERSION``; guests report it from ``ws_abi_version()``."""

ACCESS_RO: Final = 1
"""``access`` argument of the ``ws_borrow`` import: read-only."""
ACCESS_RW: Final = 2
"""``access`` argument of the ``ws_borrow`` import: read-write."""

OK: Final = 0
"""Status returned by the host imports on success (``WS_OK``)."""
ERR_BAD_HANDLE: Final = -1
"""No region is offered under the handle (``WS_ERR_BAD_HANDLE``)."""
ERR_ACCESS: Final = -2
"""The access asked for is not allowed (``WS_ERR_ACCESS``)."""
ERR_NOT_BORROWED: Final = -3
"""The handle is offered but not borrowed (``WS_ERR_NOT_BORROWED``)."""
ERR_FAILED: Final = -4
"""The call failed for another reason (``WS_ERR_FAILED``)."""

IMPORT_MODULE: Final = "wasmshare"
"""Module name of the host functions guests import (``ws_borrow``, ...)."""
