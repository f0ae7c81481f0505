/*
 * bench_bias.c - the benchmark's bias controller: writes its whole f32 bias row every step.
 *
 * Argument: none. step: bias[t] = -(t & 7) * 0.5 for every token t (a dense write of V
 * floats, as a controller computing a full logit-bias vector does), answers BIAS.
 */
#include "wasmshare_controller.h"

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)in;
    (void)out;
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    float *bias = in->bias;
    uint32_t n = in->vocab_size;
    for (uint32_t t = 0; t < n; t++) {
        bias[t] = -(float)(t & 7u) * 0.5f;
    }
    out->output = WS_OUTPUT_BIAS;
    return WS_OK;
}
