/*
 * hostile_host_calls.c - a controller that attacks the host through its imports and
 * through the work it makes the engine do, for the host's hardening tests.
 *
 * Argument: the name of the behaviour, ASCII (no terminator):
 *   "fill_token_table"   opens a choice constraint, then asks the host to fill its mask
 *                        into the read-only token table loan (the host must refuse)
 *   "open_from_table"    opens a constraint whose spec pointer is the token table: a
 *                        read the host may do (it fails as a spec, not as a fault)
 *   "slow_opens"         every step opens (and closes) constraints for new regexes of
 *                        thousands of alternatives, one after another, up to 1000: host
 *                        work that no epoch deadline interrupts (a sleeper in the host),
 *                        which the deadline must still cover
 *   "endless_backtrack"  every step after a token was sampled answers backtrack = 1: that
 *                        token is dropped and sampled again, so the length never grows
 *   "ok"                 free text (no output)
 * Any other argument makes ws_ctrl_create return WS_ERR_FAILED.
 */
#include "wasmshare_controller.h"

enum mode { MODE_FILL_TOKEN_TABLE, MODE_OPEN_FROM_TABLE, MODE_SLOW_OPENS, MODE_ENDLESS_BACKTRACK, MODE_OK, MODE_COUNT };

static const char *const g_names[MODE_COUNT] = {
    "fill_token_table", "open_from_table", "slow_opens", "endless_backtrack", "ok",
};

static int32_t g_mode = -1;
static int32_t g_handle = 0;
static uint32_t g_round = 0;
static char g_spec[65536];

static bool arg_is(const uint8_t *arg, uint32_t len, const char *name) {
    uint32_t n = 0;
    while (name[n] != '\0') n++;
    if (n != len) return false;
    for (uint32_t i = 0; i < n; i++) {
        if (arg[i] != (uint8_t)name[i]) return false;
    }
    return true;
}

/* A regex of many distinct alternatives ("r<round>x<i>|..."), new every round. */
static int32_t slow_spec(uint32_t round) {
    uint32_t n = 0;
    for (uint32_t i = 0; i < 3000 && n + 32 < sizeof g_spec; i++) {
        if (i) g_spec[n++] = '|';
        g_spec[n++] = 'r';
        for (uint32_t v = round + 1; v; v /= 10) g_spec[n++] = (char)('0' + v % 10);
        g_spec[n++] = 'x';
        for (uint32_t v = i + 1; v; v /= 10) g_spec[n++] = (char)('0' + v % 10);
    }
    return (int32_t)n;
}

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    for (int32_t m = 0; m < MODE_COUNT; m++) {
        if (arg_is(in->arg, in->arg_len, g_names[m])) g_mode = m;
    }
    if (g_mode < 0) return WS_ERR_FAILED;
    if (g_mode == MODE_FILL_TOKEN_TABLE) {
        static const char spec[] = "[\"yes\", \"no\"]";
        g_handle = ws_constraint_open(WS_CONSTRAINT_CHOICE, spec, (int32_t)(sizeof spec - 1));
        if (g_handle < 0) return WS_ERR_FAILED;
    }
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    switch (g_mode) {
    case MODE_FILL_TOKEN_TABLE:
        if (ws_constraint_fill_mask(g_handle, (uint32_t *)(uintptr_t)in->token_table, (int32_t)in->mask_words) < 0) {
            return WS_ERR_FAILED;
        }
        out->output = WS_OUTPUT_BITMASK;
        return WS_OK;
    case MODE_OPEN_FROM_TABLE: {
        int32_t h = ws_constraint_open(WS_CONSTRAINT_JSON_SCHEMA, (const char *)in->token_table, 4096);
        return h < 0 ? WS_ERR_FAILED : WS_OK;
    }
    case MODE_SLOW_OPENS:
        for (uint32_t i = 0; i < 1000; i++) {
            int32_t h = ws_constraint_open(WS_CONSTRAINT_REGEX, g_spec, slow_spec(g_round++));
            if (h > 0) ws_constraint_close(h);
        }
        return WS_OK;
    case MODE_ENDLESS_BACKTRACK:
        if (in->n_tokens > 0 && in->step > 0) out->backtrack = 1;
        return WS_OK;
    default:
        return WS_OK;
    }
}
