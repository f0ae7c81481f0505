"""wasmshare steering inside vLLM: a logits processor and the controller service it drives.

The two halves live in two Python environments. :mod:`.processor` runs in vLLM's worker
process and imports only what vLLM's environment has (torch, numpy, vLLM) plus the
wasmtime-free :mod:`wasmshare.region` and :mod:`wasmshare._framing`; :mod:`.service` runs in
wasmshare's own environment (wasmtime, llguidance) and owns the controllers and the
constraints. They share the batch's mask and bias regions (fds passed over a Unix socket),
so the masks the controllers write are the rows the processor applies. Nothing is imported
here, so importing this package costs nothing in either environment.
"""

from __future__ import annotations

__all__: list[str] = []
