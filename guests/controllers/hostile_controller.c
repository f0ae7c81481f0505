/*
 * hostile_controller.c - a controller that misbehaves on purpose, for the
 * host's fault-handling tests.
 *
 * Argument: the name of the behaviour, ASCII (no terminator):
 *   "ok"                  behaves: the first step allows every token, and every
 *                         step answers WS_OUTPUT_BITMASK
 *   "create_trap"         traps (unreachable) in ws_ctrl_create
 *   "create_error"        ws_ctrl_create returns WS_ERR_FAILED
 *   "trap_mid_mask"       step writes 0 into the first half of the mask words,
 *                         then traps: the host must not apply the torn mask
 *   "spin"                step loops forever (the host's deadline or fuel stops it)
 *   "bomb"                step grows memory until memory.grow fails, then
 *                         writes one byte past the end of memory (a trap)
 *   "bad_result"          step answers n_ff = 1000000 (> WS_MAX_FF_TOKENS)
 *   "bad_output"          step answers output = 99 (no such output kind)
 *   "bad_backtrack"       step answers backtrack = 0xFFFFFFFF (more than the sequence)
 *   "error"               step returns WS_ERR_FAILED
 *   "write_token_table"   step writes into the token table, which the host
 *                         lends read-only: with real loans that traps
 *   "empty_mask"          step answers a bitmask that allows no token at all
 *   "nan_bias"            step answers a bias that is 0 but NaN at one token
 *   "inf_bias"            step answers a bias that is 0 but +inf at one token
 *   "forbid_all_bias"     step answers a bias of -inf at every token
 *   "huge_bias"           step answers a bias that is 0 but 3e38 at one token: finite,
 *                         but it overflows float32 once divided by a temperature < 1
 *   "sparse_bad_id"       step answers a sparse bias whose one id is vocab_size (outside)
 *   "sparse_too_many"     step answers a sparse bias of vocab_size / 2 + 1 entries
 *   "sparse_nan"          step answers a sparse bias of NaN at one token
 * Any other argument makes ws_ctrl_create return WS_ERR_FAILED.
 */
#include "wasmshare_controller.h"

enum mode {
    MODE_OK,
    MODE_CREATE_TRAP,
    MODE_CREATE_ERROR,
    MODE_TRAP_MID_MASK,
    MODE_SPIN,
    MODE_BOMB,
    MODE_BAD_RESULT,
    MODE_BAD_OUTPUT,
    MODE_BAD_BACKTRACK,
    MODE_ERROR,
    MODE_WRITE_TOKEN_TABLE,
    MODE_EMPTY_MASK,
    MODE_NAN_BIAS,
    MODE_INF_BIAS,
    MODE_FORBID_ALL_BIAS,
    MODE_HUGE_BIAS,
    MODE_SPARSE_BAD_ID,
    MODE_SPARSE_TOO_MANY,
    MODE_SPARSE_NAN,
    MODE_COUNT
};

static const char *const g_names[MODE_COUNT] = {
    "ok", "create_trap", "create_error", "trap_mid_mask", "spin", "bomb",
    "bad_result", "bad_output", "bad_backtrack", "error", "write_token_table",
    "empty_mask", "nan_bias", "inf_bias", "forbid_all_bias", "huge_bias",
    "sparse_bad_id", "sparse_too_many", "sparse_nan",
};

static int32_t g_mode = -1;

static bool arg_is(const uint8_t *arg, uint32_t len, const char *name) {
    uint32_t n = 0;
    while (name[n] != '\0') {
        n++;
    }
    return n == len && ws_bytes_equal(arg, (const uint8_t *)name, n);
}

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    g_mode = -1;
    for (int32_t m = 0; m < MODE_COUNT; m++) {
        if (arg_is(in->arg, in->arg_len, g_names[m])) {
            g_mode = m;
        }
    }
    if (g_mode == MODE_CREATE_TRAP) {
        __builtin_trap();
    }
    if (g_mode < 0 || g_mode == MODE_CREATE_ERROR) {
        return WS_ERR_FAILED;
    }
    return WS_OK;
}

static void grow_until_full_then_overrun(void) {
    uint32_t chunk = 1024; /* pages; halved whenever a grow fails */
    while (chunk > 0) {
        if (__builtin_wasm_memory_grow(0, chunk) == (size_t)-1) {
            chunk /= 2;
        }
    }
    uint32_t pages = (uint32_t)__builtin_wasm_memory_size(0);
    if (pages >= 65536u) {
        __builtin_trap(); /* 4 GiB: every i32 address is in bounds */
    }
    *(volatile uint8_t *)(uintptr_t)(pages * (uint32_t)WS_PAGE_SIZE) = 1;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    switch (g_mode) {
    case MODE_OK:
        ws_mask_fill(in->mask, in->mask_words);
        out->output = WS_OUTPUT_BITMASK;
        return WS_OK;
    case MODE_TRAP_MID_MASK:
        for (uint32_t w = 0; w < in->mask_words / 2u; w++) {
            ((volatile uint32_t *)in->mask)[w] = 0;
        }
        __builtin_trap();
    case MODE_SPIN: {
        volatile uint32_t spins = 0;
        for (;;) {
            spins = spins + 1u;
        }
    }
    case MODE_BOMB:
        grow_until_full_then_overrun();
        return WS_ERR_FAILED; /* not reached */
    case MODE_BAD_RESULT:
        out->n_ff = 1000000u;
        return WS_OK;
    case MODE_BAD_OUTPUT:
        out->output = 99;
        return WS_OK;
    case MODE_BAD_BACKTRACK:
        out->backtrack = 0xFFFFFFFFu;
        return WS_OK;
    case MODE_ERROR:
        return WS_ERR_FAILED;
    case MODE_EMPTY_MASK:
        ws_mask_clear(in->mask, in->mask_words);
        out->output = WS_OUTPUT_BITMASK;
        return WS_OK;
    case MODE_NAN_BIAS:
    case MODE_INF_BIAS:
    case MODE_HUGE_BIAS:
        ws_bias_fill(in->bias, in->vocab_size, 0.0f);
        in->bias[in->vocab_size / 2u] = g_mode == MODE_NAN_BIAS   ? __builtin_nanf("")
                                        : g_mode == MODE_INF_BIAS ? __builtin_inff()
                                                                  : 3e38f;
        out->output = WS_OUTPUT_BIAS;
        return WS_OK;
    case MODE_FORBID_ALL_BIAS:
        ws_bias_fill(in->bias, in->vocab_size, -__builtin_inff());
        out->output = WS_OUTPUT_BIAS;
        return WS_OK;
    case MODE_SPARSE_BAD_ID:
    case MODE_SPARSE_NAN:
        ws_sparse_bias_ids(in)[0] = g_mode == MODE_SPARSE_BAD_ID ? in->vocab_size : in->vocab_size / 3u;
        ws_sparse_bias_values(in)[0] = g_mode == MODE_SPARSE_BAD_ID ? 1.0f : __builtin_nanf("");
        out->n_bias = 1;
        out->output = WS_OUTPUT_SPARSE_BIAS;
        return WS_OK;
    case MODE_SPARSE_TOO_MANY:
        out->n_bias = in->vocab_size / 2u + 1u;
        out->output = WS_OUTPUT_SPARSE_BIAS;
        return WS_OK;
    case MODE_WRITE_TOKEN_TABLE:
        ((volatile uint32_t *)in->token_table)[1] = 0; /* the magic */
        return WS_OK;
    default:
        return WS_ERR_FAILED;
    }
}
