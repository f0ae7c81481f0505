/*
 * tool_call.c - free text until a marker, then a JSON tool call constrained by a schema, then stop.
 *
 * Argument: the marker on the first line, the JSON Schema of the call on the rest, e.g.
 *   "<tool>\n{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}"
 *
 * The prompt counts as text so far: a prompt that ends with the marker (an assistant reply
 * begun with it) starts the call at once. While the text does not end with the marker the
 * controller leaves sampling free
 * (WS_OUTPUT_NONE). Once it does, it opens a JSON Schema constraint in the host's grammar
 * engine and, every step, feeds it the sampled tokens and has the host write the mask for
 * the call straight into its mask slot (WS_OUTPUT_BITMASK). When the call is complete the
 * sequence stops. The controller decides *when* to constrain; the host engine computes
 * *what* is allowed, at native speed and with no copy.
 */
#include "wasmshare_controller.h"

#define MARKER_MAX 64u
#define SCHEMA_MAX 32768u

static uint8_t g_marker[MARKER_MAX];
static uint32_t g_marker_len;
static char g_schema[SCHEMA_MAX];
static uint32_t g_schema_len;
static uint8_t g_tail[MARKER_MAX]; /* the last bytes of free text, to spot the marker */
static uint32_t g_tail_len;
static int32_t g_handle; /* > 0 once the tool call has started */

/* Append a token's bytes to the tail; true when the tail now ends with the marker. */
static bool saw_marker(const ws_token_table *table, uint32_t token) {
    uint32_t len = 0;
    const uint8_t *bytes = ws_token_bytes(table, token, &len);
    if (bytes == NULL || ws_token_is_special(table, token)) return false;
    for (uint32_t k = 0; k < len; k++) {
        if (g_tail_len == MARKER_MAX) {
            for (uint32_t j = 1; j < MARKER_MAX; j++) g_tail[j - 1] = g_tail[j];
            g_tail_len--;
        }
        g_tail[g_tail_len++] = bytes[k];
    }
    return g_tail_len >= g_marker_len &&
           ws_bytes_equal(g_tail + g_tail_len - g_marker_len, g_marker, g_marker_len);
}

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    uint32_t i = 0;
    while (i < in->arg_len && in->arg[i] != '\n') i++;
    if (i == 0 || i > MARKER_MAX || i + 1 >= in->arg_len || in->arg_len - i - 1 > SCHEMA_MAX) {
        return WS_ERR_FAILED;
    }
    for (uint32_t k = 0; k < i; k++) g_marker[k] = in->arg[k];
    g_marker_len = i;
    g_schema_len = in->arg_len - i - 1;
    for (uint32_t k = 0; k < g_schema_len; k++) g_schema[k] = (char)in->arg[i + 1 + k];
    g_tail_len = 0;
    g_handle = 0;
    bool marker_at_end = false;
    for (uint32_t k = 0; k < in->n_tokens; k++) {
        marker_at_end = saw_marker(in->token_table, in->tokens[k]);
    }
    if (marker_at_end) {
        g_handle = ws_constraint_open(WS_CONSTRAINT_JSON_SCHEMA, g_schema, (int32_t)g_schema_len);
        if (g_handle < 0) return WS_ERR_FAILED;
    }
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    for (uint32_t i = 0; i < in->n_tokens; i++) {
        uint32_t token = in->tokens[i];
        if (g_handle > 0) {
            if (ws_constraint_consume(g_handle, token) < 0) return WS_ERR_FAILED;
        } else if (saw_marker(in->token_table, token)) {
            g_handle = ws_constraint_open(WS_CONSTRAINT_JSON_SCHEMA, g_schema, (int32_t)g_schema_len);
            if (g_handle < 0) return WS_ERR_FAILED;
        }
    }
    if (g_handle <= 0) {
        out->output = WS_OUTPUT_NONE; /* free text */
        return WS_OK;
    }
    if (ws_constraint_is_stopped(g_handle) > 0) {
        out->action = WS_STOP; /* the call is complete */
        return WS_OK;
    }
    if (ws_constraint_fill_mask(g_handle, in->mask, (int32_t)in->mask_words) < 0) return WS_ERR_FAILED;
    out->output = WS_OUTPUT_BITMASK;
    return WS_OK;
}
