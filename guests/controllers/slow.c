/*
 * slow.c - a controller that burns a fixed amount of work every step (for tests and the
 * benchmark of the engine's stall policy), then writes a mask that allows odd token ids only.
 *
 * Argument: 16 or 20 bytes, little-endian uint32s: WORK, BACKTRACK_AT, FORWARD_AT, TOKEN
 * and optionally SLOW_FROM (default 0).
 *   Example: struct.pack("<4I", 20000, 0, 0, 0).
 *
 * step: spins WORK x 1000 iterations of a loop the compiler keeps (a fixed amount of
 *       work, whatever the machine; about 1 ms per 1000 units on a 2020s core), then
 *       answers a bitmask of the odd ids.  Once, at the first step where BACKTRACK_AT
 *       (>= 1) tokens have been sampled, it answers backtrack = 1 instead, so the last
 *       token is sampled again, and from then on its mask allows the even ids instead
 *       (the token sampled again differs, which shows the backtrack took effect); once,
 *       at the first step where FORWARD_AT (>= 1) tokens have been sampled, it
 *       fast-forwards two tokens, TOKEN and TOKEN + 2 (odd ids).  0 turns either off.
 *       The work is burnt only once SLOW_FROM tokens have been sampled.
 */
#include "wasmshare_controller.h"

static uint32_t g_work;
static uint32_t g_backtrack_at;
static uint32_t g_forward_at;
static uint32_t g_token;
static uint32_t g_slow_from;
static uint64_t g_count;
static bool g_backtracked;
static bool g_forwarded;
static volatile uint32_t g_sink;

static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void burn(uint32_t units) {
    for (uint32_t u = 0; u < units; u++) {
        for (uint32_t i = 0; i < 1000u; i++) {
            g_sink = g_sink * 1664525u + 1013904223u;
        }
    }
}

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    if (in->arg_len != 16 && in->arg_len != 20) {
        return WS_ERR_FAILED;
    }
    g_work = read_u32(in->arg);
    g_backtrack_at = read_u32(in->arg + 4);
    g_forward_at = read_u32(in->arg + 8);
    g_token = read_u32(in->arg + 12);
    g_slow_from = in->arg_len == 20 ? read_u32(in->arg + 16) : 0u;
    if (g_forward_at != 0 && (g_token % 2u != 1u || g_token + 2u >= in->vocab_size)) {
        return WS_ERR_FAILED; /* the fast-forward tokens must be odd ids in the vocabulary */
    }
    g_count = 0;
    g_backtracked = false;
    g_forwarded = false;
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    g_count += in->n_tokens;
    if (g_count >= g_slow_from) {
        burn(g_work);
    }
    if (g_backtrack_at != 0 && !g_backtracked && g_count >= g_backtrack_at) {
        g_backtracked = true;
        g_count -= 1;
        out->backtrack = 1;
        return WS_OK;
    }
    if (g_forward_at != 0 && !g_forwarded && g_count >= g_forward_at) {
        g_forwarded = true;
        g_count += 2;
        out->ff_tokens[0] = g_token;
        out->ff_tokens[1] = g_token + 2u;
        out->n_ff = 2;
        return WS_OK;
    }
    for (uint32_t w = 0; w < in->mask_words; w++) {
        in->mask[w] = g_backtracked ? 0x55555555u : 0xAAAAAAAAu; /* bit t set for even / odd t */
    }
    uint32_t tail = in->vocab_size % 32u;
    if (tail != 0u) {
        in->mask[in->mask_words - 1u] &= (1u << tail) - 1u;
    }
    out->output = WS_OUTPUT_BITMASK;
    return WS_OK;
}
