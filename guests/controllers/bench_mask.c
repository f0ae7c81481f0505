/*
 * bench_mask.c - the benchmark's allow-list controller: rewrites its whole mask every step.
 *
 * Argument: little-endian uint32 token ids (at least one, each < V, at most 1024).
 * step: clears all ceil(V/32) mask words, sets the bit of every id, answers BITMASK.
 * Unlike allow_list.c it does the full write each step, which is the work a real
 * mask-computing controller does, so the benchmark measures moving a mask, not skipping it.
 */
#include "wasmshare_controller.h"

#define IDS_MAX 1024u

static uint32_t g_ids[IDS_MAX];
static uint32_t g_n_ids;

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    if (in->arg_len == 0 || in->arg_len % 4u != 0 || in->arg_len / 4u > IDS_MAX) {
        return WS_ERR_FAILED;
    }
    g_n_ids = in->arg_len / 4u;
    for (uint32_t i = 0; i < g_n_ids; i++) {
        const uint8_t *p = in->arg + 4u * i;
        g_ids[i] = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (g_ids[i] >= in->vocab_size) {
            return WS_ERR_FAILED;
        }
    }
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    ws_mask_clear(in->mask, in->mask_words);
    for (uint32_t i = 0; i < g_n_ids; i++) {
        ws_mask_allow(in->mask, g_ids[i]);
    }
    out->output = WS_OUTPUT_BITMASK;
    return WS_OK;
}
