/*
 * backtrack.c - a controller that replaces one sampled token, once (for tests
 * of the backtrack result).
 *
 * Argument: 8 bytes, two little-endian uint32: K (>= 1) then a token id R (< V).
 *   Example: struct.pack("<2I", 3, 42).
 *
 * step: counts sampled tokens (the sum of in->n_tokens).  At the first step
 *       where at least K tokens have been sampled, answers backtrack = 1 and
 *       n_ff = 1 with ff_tokens[0] = R: the last sampled token is replaced by R.
 *       R = 0xFFFFFFFF means no replacement: backtrack = 1 alone, so the token
 *       is sampled again.  This happens once; every other step answers
 *       CONTINUE with no output.
 */
#include "wasmshare_controller.h"

#define NO_REPLACEMENT 0xFFFFFFFFu

static uint32_t g_k;
static uint32_t g_replacement;
static uint64_t g_count;
static bool g_done;

static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    if (in->arg_len != 8) {
        return WS_ERR_FAILED;
    }
    g_k = read_u32(in->arg);
    g_replacement = read_u32(in->arg + 4);
    if (g_k == 0 || (g_replacement >= in->vocab_size && g_replacement != NO_REPLACEMENT)) {
        return WS_ERR_FAILED; /* K = 0 would remove a prompt token */
    }
    g_count = 0;
    g_done = false;
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    g_count += in->n_tokens;
    if (!g_done && g_count >= g_k) {
        out->backtrack = 1;
        if (g_replacement != NO_REPLACEMENT) {
            out->ff_tokens[0] = g_replacement;
            out->n_ff = 1;
        }
        g_done = true;
    }
    return WS_OK;
}
