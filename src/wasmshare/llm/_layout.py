"""Binary layouts shared by the host and controllers (``wasmshare_controller.h``, ABI v1).

The host, the worker processes and the guests read the same bytes, so every offset, record
type and code lives here once. Each sequence owns one *step slot* in the batch's step region:

    offset 0      ws_step_input   (68 bytes; the host writes it)
    offset 256    ws_step_result  (32 + 4 * WS_MAX_FF_TOKENS bytes; the controller writes it)
    offset 8192   uint32 tokens[] (the prompt at create, the sampled tokens at a step)
    after tokens  the controller's argument bytes (create only)

and one *status record* in the batch's control region, which controllers never see: the
runner (a thread here, or a worker process) reports there how the call ended.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONTROLLER_ABI_VERSION = 1
MAX_FF_TOKENS = 1024

ACTION_CONTINUE = 0
ACTION_STOP = 1
OUTPUT_NONE = 0
OUTPUT_BITMASK = 1
OUTPUT_BIAS = 2
OUTPUT_SPARSE_BIAS = 3

STEP_INPUT_OFFSET = 0
STEP_RESULT_OFFSET = 256
TOKENS_OFFSET = 8192
DEFAULT_STEP_SLOT_BYTES = 1 << 20

STEP_INPUT = np.dtype(
    [
        ("struct_size", "<u4"),
        ("abi_version", "<u4"),
        ("vocab_size", "<u4"),
        ("mask_words", "<u4"),
        ("token_table", "<u4"),
        ("mask", "<u4"),
        ("bias", "<u4"),
        ("step", "<u4"),
        ("n_tokens", "<u4"),
        ("tokens", "<u4"),
        ("arg", "<u4"),
        ("arg_len", "<u4"),
        ("sequence_id", "<u4"),
        ("reserved", "<u4", (4,)),
    ]
)
STEP_RESULT = np.dtype(
    [
        ("struct_size", "<u4"),
        ("action", "<i4"),
        ("output", "<i4"),
        ("backtrack", "<u4"),
        ("n_ff", "<u4"),
        ("n_bias", "<u4"),
        ("reserved", "<u4", (2,)),
        ("ff_tokens", "<u4", (MAX_FF_TOKENS,)),
    ]
)
assert STEP_INPUT.itemsize == 68 and STEP_RESULT.itemsize == 32 + 4 * MAX_FF_TOKENS

# Status of the last call of a slot, written by the runner into the control region.
STATUS_OK = 0
STATUS_TRAP = 1  # trapped (including read-only/revoked loan writes)
STATUS_LIMIT = 2  # deadline, fuel or memory limit
STATUS_RETURNED_ERROR = 3  # the controller returned a negative status
STATUS_INVALID_RESULT = 4  # the result record broke the ABI
STATUS_HOST_ERROR = 5  # anything else (including a crashed worker)
STATUS_RECORD_BYTES = 512
STATUS = np.dtype(
    [
        ("status", "<i4"),
        ("detail", "<i4"),  # the controller's return code, or the limit kind (1 fuel, 2 memory, 3 deadline)
        ("elapsed_ns", "<u8"),
        ("message_len", "<u4"),
        ("message", "S492"),
    ]
)
assert STATUS.itemsize <= STATUS_RECORD_BYTES
MESSAGE_BYTES = STATUS["message"].itemsize
LIMIT_CODES = {"fuel": 1, "memory": 2, "deadline": 3}
LIMIT_NAMES = {v: k for k, v in LIMIT_CODES.items()}


# Word indices (uint32) into a step slot, for vectorised access across slots.
W_STEP = 7
W_N_TOKENS = 8
W_RESULT = STEP_RESULT_OFFSET // 4  # struct_size, action, output, backtrack, n_ff, n_bias
W_FF_TOKENS = W_RESULT + 8
W_TOKENS = TOKENS_OFFSET // 4
RESULT_RESET = np.array([STEP_RESULT.itemsize, ACTION_CONTINUE, OUTPUT_NONE, 0, 0, 0], dtype=np.uint32)


def mask_words(vocab_size: int) -> int:
    """Words of a token bitmask of ``vocab_size`` bits: ``ceil(V / 32)`` uint32 (or int32) words."""
    return (vocab_size + 31) // 32


def write_status(
    record: np.ndarray[Any, Any], status: int, detail: int = 0, message: str = "", elapsed_ns: int = 0
) -> None:
    """Fill a slot's status record (one :data:`STATUS` element); ``message`` is cut to fit."""
    encoded = message.encode("utf-8", "replace")[:MESSAGE_BYTES]
    record["status"] = status
    record["detail"] = detail
    record["elapsed_ns"] = elapsed_ns
    record["message_len"] = len(encoded)
    record["message"] = encoded
