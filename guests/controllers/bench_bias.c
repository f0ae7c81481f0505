/*
 * bench_bias.c - the benchmark's bias controller: writes its whole f32 bias row every step.
 *
 * Argument: none. step: zeroes all V floats of the bias (memory.fill, which wasmtime
 * runs as a native memset), then boosts 64 tokens spread over the vocabulary, and
 * answers BIAS: the dense write a controller producing a full logit-bias vector makes.
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
    __builtin_memset(bias, 0, (size_t)n * sizeof(float));
    for (uint32_t i = 0; i < 64u; i++) {
        bias[(i * 104729u + 7u) % n] = 2.5f;
    }
    out->output = WS_OUTPUT_BIAS;
    return WS_OK;
}
