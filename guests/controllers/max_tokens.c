/*
 * max_tokens.c - a controller that stops its sequence after N sampled tokens.
 *
 * Argument: N in decimal ASCII, e.g. "5" (digits only, 0 to 4294967295; one
 * trailing '\n' is accepted).
 *
 * step: adds in->n_tokens (the tokens sampled since the last step) to a count
 *       and answers action = WS_STOP once the count reaches N, so exactly N
 *       tokens are sampled (N = 0: stop at the first step).  The output is
 *       always WS_OUTPUT_NONE: it constrains no token.
 */
#include "wasmshare_controller.h"

static uint32_t g_limit;
static uint64_t g_count;

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    uint32_t len = in->arg_len;
    if (len > 0 && in->arg[len - 1] == '\n') {
        len--;
    }
    if (len == 0) {
        return WS_ERR_FAILED;
    }
    uint64_t value = 0;
    for (uint32_t i = 0; i < len; i++) {
        uint8_t c = in->arg[i];
        if (c < '0' || c > '9') {
            return WS_ERR_FAILED;
        }
        value = value * 10u + (uint64_t)(c - '0');
        if (value > 0xFFFFFFFFu) {
            return WS_ERR_FAILED;
        }
    }
    g_limit = (uint32_t)value;
    g_count = 0;
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    g_count += in->n_tokens;
    if (g_count >= g_limit) {
        out->action = WS_STOP;
    }
    out->output = WS_OUTPUT_NONE;
    return WS_OK;
}
