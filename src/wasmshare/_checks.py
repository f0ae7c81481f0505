"""Argument checks of :class:`~wasmshare.region.Region`: sizes, access, and view shapes."""

from __future__ import annotations

import operator
from typing import Literal, SupportsIndex

from .errors import RegionError

MAX_REGION_BYTES = 4 * 1024 * 1024 * 1024
"""A wasm32 guest addresses at most 4 GiB of linear memory."""


def check_nbytes(nbytes: object, what: str = "nbytes") -> int:
    """``nbytes`` as an int of 1 byte to 4 GiB, or RegionError naming ``what``."""
    if isinstance(nbytes, bool):
        raise RegionError(f"{what} must be an int, got bool {nbytes!r}")
    if not isinstance(nbytes, SupportsIndex):
        raise RegionError(f"{what} must be an int, got {type(nbytes).__name__}")
    n = operator.index(nbytes)
    if n <= 0:
        raise RegionError(f"{what} must be > 0, got {n}")
    if n > MAX_REGION_BYTES:
        raise RegionError(
            f"{what} {n} is larger than 4 GiB ({MAX_REGION_BYTES} bytes): "
            "a wasm32 guest cannot address more than 4 GiB"
        )
    return int(n)


def check_access(access: object) -> Literal["rw", "ro"]:
    """``access`` if it is ``"rw"`` or ``"ro"``, else RegionError."""
    if access == "rw":
        return "rw"
    if access == "ro":
        return "ro"
    raise RegionError(f"access must be 'rw' or 'ro', got {access!r}")


def loan_is_writable(loan: object) -> bool:
    """A loan counts as writable unless it says otherwise (``writable`` False or ``access`` 'ro')."""
    w = getattr(loan, "writable", None)
    if isinstance(w, bool):
        return w
    return getattr(loan, "access", None) != "ro"


def resolve_shape(
    shape: int | tuple[int, ...] | None, itemsize: int, offset: object, nbytes: int, dtype: object
) -> tuple[int, tuple[int, ...], int]:
    """Check offset and shape against the region; return (count, shape, offset).

    ``dtype`` is only formatted into error messages (formatting a dtype costs
    microseconds, and views are made on hot paths).
    """
    if isinstance(offset, bool):
        raise RegionError(f"offset must be an int, got bool {offset!r}")
    try:
        off = operator.index(offset)  # type: ignore[arg-type]
    except TypeError:
        raise RegionError(f"offset must be an int, got {type(offset).__name__}") from None
    if off < 0 or off > nbytes:
        raise RegionError(f"offset {off} is outside the region (0..{nbytes} bytes)")
    # Alignment: itemsize for power-of-two sizes (all numeric dtypes), else 1 byte.
    align = itemsize if itemsize > 0 and itemsize & (itemsize - 1) == 0 else 1
    if off % align:
        raise RegionError(f"offset {off} is not aligned to dtype {dtype} itemsize {itemsize}")
    if itemsize <= 0:
        raise RegionError(f"dtype {dtype} has itemsize {itemsize}; cannot view bytes as it")
    avail = nbytes - off
    if shape is None:
        count = avail // itemsize
        if count == 0:
            raise RegionError(
                f"no whole dtype {dtype} element (itemsize {itemsize}) fits in {avail} bytes after offset {off}"
            )
        return count, (count,), off
    dims_in = (shape,) if not isinstance(shape, tuple) else shape
    dims: list[int] = []
    for d in dims_in:
        if isinstance(d, bool):
            raise RegionError(f"shape entries must be ints, got {shape!r}")
        try:
            di = operator.index(d)
        except TypeError:
            raise RegionError(f"shape entries must be ints, got {shape!r}") from None
        if di < 0:
            raise RegionError(f"shape entries must be >= 0, got {shape!r}")
        dims.append(di)
    count = 1
    for di in dims:
        count *= di
    if count * itemsize > avail:
        raise RegionError(
            f"shape {tuple(dims)} of dtype {dtype} needs {count * itemsize} bytes, but only {avail} "
            f"bytes are left after offset {off} in a {nbytes}-byte region"
        )
    return count, tuple(dims), off
