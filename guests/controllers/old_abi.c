/*
 * old_abi.c - a controller built for another controller ABI: its
 * ws_ctrl_abi_version() returns 99, so the host must refuse it before calling
 * anything else.  Otherwise it behaves like an allow-all controller.
 *
 * Argument: ignored.
 *
 * wasmshare_controller.h defines ws_ctrl_abi_version() in the including
 * translation unit (weak, so several translation units can include it), and
 * C does not allow a second definition in the same translation unit.  So
 * this file plays a controller compiled against another version of the
 * header: it includes only wasmshare.h and declares the v1 structs itself
 * (same layout; tests/test_controller_guests.py checks those offsets).
 */
#include "wasmshare.h"

typedef struct ws_token_table ws_token_table;

typedef struct ws_step_input {
    uint32_t struct_size;
    uint32_t abi_version;
    uint32_t vocab_size;
    uint32_t mask_words;
    const ws_token_table *token_table;
    uint32_t *mask;
    float *bias;
    uint32_t step;
    uint32_t n_tokens;
    const uint32_t *tokens;
    const uint8_t *arg;
    uint32_t arg_len;
    uint32_t sequence_id;
    uint32_t reserved[4];
} ws_step_input;

typedef struct ws_step_result {
    uint32_t struct_size;
    int32_t action;
    int32_t output;
    uint32_t backtrack;
    uint32_t n_ff;
    uint32_t n_bias;
    uint32_t reserved[2];
    uint32_t ff_tokens[1024];
} ws_step_result;

WS_EXPORT("ws_ctrl_abi_version") int32_t ws_ctrl_abi_version(void) { return 99; }

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)in;
    (void)out;
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    for (uint32_t w = 0; w < in->mask_words; w++) {
        in->mask[w] = 0xFFFFFFFFu;
    }
    out->output = 1; /* WS_OUTPUT_BITMASK */
    return WS_OK;
}
