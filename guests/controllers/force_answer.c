/*
 * force_answer.c - a controller that fast-forwards a fixed answer, then stops.
 *
 * Argument: little-endian uint32 token ids of the answer, arg_len / 4 of them
 * (0 to WS_MAX_FF_TOKENS, each < V).  Example: struct.pack("<2I", 9, 10).
 *
 * create: checks and stores the ids (an answer longer than WS_MAX_FF_TOKENS,
 *         a length that is not a multiple of 4 or an id >= V is an error).
 * step:   the first step appends the whole answer (n_ff = count,
 *         ff_tokens = the ids) and asks to stop: action = WS_STOP.  Nothing is
 *         sampled for this sequence.
 */
#include "wasmshare_controller.h"

static uint32_t g_answer[WS_MAX_FF_TOKENS];
static uint32_t g_n_answer;

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    if (in->arg_len % 4u != 0 || in->arg_len / 4u > WS_MAX_FF_TOKENS) {
        return WS_ERR_FAILED;
    }
    uint32_t n = in->arg_len / 4u;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p = in->arg + 4u * i;
        uint32_t id = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (id >= in->vocab_size) {
            return WS_ERR_FAILED;
        }
        g_answer[i] = id;
    }
    g_n_answer = n;
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    (void)in;
    for (uint32_t i = 0; i < g_n_answer; i++) {
        out->ff_tokens[i] = g_answer[i];
    }
    out->n_ff = g_n_answer;
    out->action = WS_STOP;
    return WS_OK;
}
