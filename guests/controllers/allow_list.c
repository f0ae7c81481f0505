/*
 * allow_list.c - a controller that only ever allows a fixed set of tokens.
 *
 * Argument: little-endian uint32 token ids, arg_len / 4 of them (at least one,
 * each < V, at most ALLOW_MAX).  Example (Python): struct.pack("<3I", 5, 17, 42).
 *
 * create: checks and stores the ids.
 * step:   the first step clears the mask slot and sets the bit of every id,
 *         then answers WS_OUTPUT_BITMASK.  Later steps answer WS_OUTPUT_BITMASK
 *         without touching the slot: the output slot is this controller's own
 *         row and keeps its contents between steps (see wasmshare_controller.h),
 *         so a step costs a few instructions.  This is the benchmark's "trivial
 *         allow-list controller".
 */
#include "wasmshare_controller.h"

#define ALLOW_MAX 65536u

static uint32_t g_ids[ALLOW_MAX];
static uint32_t g_n_ids;
static bool g_mask_written;

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    if (in->arg_len == 0 || in->arg_len % 4u != 0 || in->arg_len / 4u > ALLOW_MAX) {
        return WS_ERR_FAILED;
    }
    uint32_t n = in->arg_len / 4u;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p = in->arg + 4u * i;
        uint32_t id = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        if (id >= in->vocab_size) {
            return WS_ERR_FAILED;
        }
        g_ids[i] = id;
    }
    g_n_ids = n;
    g_mask_written = false;
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    if (!g_mask_written) {
        ws_mask_clear(in->mask, in->mask_words);
        for (uint32_t i = 0; i < g_n_ids; i++) {
            ws_mask_allow(in->mask, g_ids[i]);
        }
        g_mask_written = true;
    }
    out->output = WS_OUTPUT_BITMASK;
    return WS_OK;
}
