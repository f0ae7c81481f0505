/*
 * ban_strings.c - a controller that keeps banned strings out of the generated text.
 *
 * Argument: UTF-8 strings separated by '\n' (a trailing "\r" on a line is
 * dropped, empty lines are skipped): at least one and at most BAN_MAX strings,
 * each 1 to BAN_MAX_LEN bytes.  Example: b"password\nsecret".
 *
 * create: for every token whose bytes contain a banned string
 *         (ws_bytes_contains), clears its bit in a base mask kept in a block of
 *         memory grown here (ceil(V / 32) words, plus V words for an index of
 *         the tokens by first byte).  Special tokens (WS_TOKEN_SPECIAL, e.g. EOS)
 *         are never banned and their bytes are not text.
 * step:   the first step copies the base mask into the mask slot; later steps
 *         only change the bits they must, since the slot keeps its contents.
 *         Strings that span token boundaries: the controller keeps the last
 *         BAN_MAX_LEN - 1 bytes of generated text, and when that tail ends with
 *         a proper prefix s[0..k) of a banned string s it also bans, for this
 *         step only, every token whose bytes start with the rest s[k..).  So no
 *         banned string can be completed by the next token, whatever tokens it
 *         is split over.  (The prompt is not part of the generated text.)
 *         Cost: a step whose text tail is not a prefix of any banned string
 *         does O(strings x length) byte compares and touches no mask word; one
 *         whose tail is scans the tokens that start with the right byte.
 */
#include "wasmshare_controller.h"

#define BAN_MAX 64u
#define BAN_MAX_LEN 64u
#define HIST_LEN (BAN_MAX_LEN - 1u)
#define TMP_MAX 4096u

static uint8_t g_ban[BAN_MAX][BAN_MAX_LEN];
static uint32_t g_ban_len[BAN_MAX];
static uint32_t g_n_ban;

static uint32_t *g_base;          /* mask_words: allowed unless a token contains a banned string */
static uint32_t *g_order;         /* candidate tokens (allowed, not special, not empty) by first byte */
static uint32_t g_bucket[257];    /* g_order[g_bucket[b] .. g_bucket[b + 1]) start with byte b */
static bool g_mask_written;

static uint8_t g_hist[HIST_LEN];  /* last bytes of generated text */
static uint32_t g_hist_len;

static uint32_t g_tmp[TMP_MAX];   /* tokens banned for the current step only */
static uint32_t g_n_tmp;
static bool g_tmp_overflow;

static int32_t parse_arg(const uint8_t *arg, uint32_t len) {
    g_n_ban = 0;
    uint32_t start = 0;
    while (start <= len) {
        uint32_t end = start;
        while (end < len && arg[end] != '\n') {
            end++;
        }
        uint32_t line_end = end;
        if (line_end > start && arg[line_end - 1] == '\r') {
            line_end--;
        }
        uint32_t n = line_end - start;
        if (n > 0) {
            if (n > BAN_MAX_LEN || g_n_ban == BAN_MAX) {
                return WS_ERR_FAILED;
            }
            for (uint32_t i = 0; i < n; i++) {
                g_ban[g_n_ban][i] = arg[start + i];
            }
            g_ban_len[g_n_ban++] = n;
        }
        start = end + 1;
    }
    return g_n_ban > 0 ? WS_OK : WS_ERR_FAILED;
}

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    if (parse_arg(in->arg, in->arg_len) != WS_OK) {
        return WS_ERR_FAILED;
    }
    const ws_token_table *table = in->token_table;
    uint32_t v = in->vocab_size;
    uint32_t words = in->mask_words;
    if (table->n_tokens < v || words < (v + 31u) / 32u || v > (1u << 24)) {
        return WS_ERR_FAILED;
    }
    uint32_t *block = (uint32_t *)ws_grow_block((int32_t)((words + v) * 4u));
    if (block == NULL) {
        return WS_ERR_FAILED;
    }
    g_base = block;
    g_order = block + words;

    ws_mask_fill(g_base, words);
    for (uint32_t t = v; t < words * 32u; t++) {
        ws_mask_ban(g_base, t); /* bits past V stay clear */
    }
    for (uint32_t b = 0; b < 257u; b++) {
        g_bucket[b] = 0;
    }
    for (uint32_t t = 0; t < v; t++) {
        if (ws_token_is_special(table, t)) {
            continue;
        }
        uint32_t len = 0;
        const uint8_t *bytes = ws_token_bytes(table, t, &len);
        bool banned = false;
        for (uint32_t i = 0; i < g_n_ban && !banned; i++) {
            banned = ws_bytes_contains(bytes, len, g_ban[i], g_ban_len[i]);
        }
        if (banned) {
            ws_mask_ban(g_base, t);
        } else if (len > 0) {
            g_bucket[bytes[0] + 1u]++;
        }
    }
    for (uint32_t b = 0; b < 256u; b++) {
        g_bucket[b + 1] += g_bucket[b];
    }
    /* Counting sort: g_bucket[b] is the next free slot of bucket b while filling. */
    for (uint32_t t = 0; t < v; t++) {
        if (ws_token_is_special(table, t) || !ws_mask_allowed(g_base, t)) {
            continue;
        }
        uint32_t len = 0;
        const uint8_t *bytes = ws_token_bytes(table, t, &len);
        if (len > 0) {
            g_order[g_bucket[bytes[0]]++] = t;
        }
    }
    for (uint32_t b = 256u; b > 0; b--) {
        g_bucket[b] = g_bucket[b - 1];
    }
    g_bucket[0] = 0;

    g_mask_written = false;
    g_hist_len = 0;
    g_n_tmp = 0;
    g_tmp_overflow = false;
    return WS_OK;
}

static void append_history(const uint8_t *bytes, uint32_t len) {
    if (len >= HIST_LEN) {
        for (uint32_t i = 0; i < HIST_LEN; i++) {
            g_hist[i] = bytes[len - HIST_LEN + i];
        }
        g_hist_len = HIST_LEN;
        return;
    }
    uint32_t keep = g_hist_len + len > HIST_LEN ? HIST_LEN - len : g_hist_len;
    uint32_t drop = g_hist_len - keep;
    for (uint32_t i = 0; i < keep; i++) {
        g_hist[i] = g_hist[drop + i];
    }
    for (uint32_t i = 0; i < len; i++) {
        g_hist[keep + i] = bytes[i];
    }
    g_hist_len = keep + len;
}

/* Bans, for this step, every allowed token whose bytes start with rest[0 .. n). */
static void ban_starting_with(const ws_token_table *table, uint32_t *mask, const uint8_t *rest, uint32_t n) {
    for (uint32_t i = g_bucket[rest[0]]; i < g_bucket[rest[0] + 1u]; i++) {
        uint32_t t = g_order[i];
        if (!ws_mask_allowed(mask, t)) {
            continue;
        }
        uint32_t len = 0;
        const uint8_t *bytes = ws_token_bytes(table, t, &len);
        if (len >= n && ws_bytes_equal(bytes, rest, n)) {
            ws_mask_ban(mask, t);
            if (g_n_tmp < TMP_MAX) {
                g_tmp[g_n_tmp++] = t;
            } else {
                g_tmp_overflow = true;
            }
        }
    }
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    const ws_token_table *table = in->token_table;
    uint32_t *mask = in->mask;

    /* Undo the previous step's boundary bans (or write the whole base mask). */
    if (!g_mask_written || g_tmp_overflow) {
        for (uint32_t w = 0; w < in->mask_words; w++) {
            mask[w] = g_base[w];
        }
        g_mask_written = true;
    } else {
        for (uint32_t i = 0; i < g_n_tmp; i++) {
            ws_mask_allow(mask, g_tmp[i]);
        }
    }
    g_n_tmp = 0;
    g_tmp_overflow = false;

    for (uint32_t i = 0; i < in->n_tokens; i++) {
        uint32_t t = in->tokens[i];
        if (ws_token_is_special(table, t)) {
            continue;
        }
        uint32_t len = 0;
        const uint8_t *bytes = ws_token_bytes(table, t, &len);
        if (bytes != NULL) {
            append_history(bytes, len);
        }
    }

    for (uint32_t s = 0; s < g_n_ban; s++) {
        const uint8_t *ban = g_ban[s];
        uint32_t n = g_ban_len[s];
        for (uint32_t k = 1; k < n && k <= g_hist_len; k++) {
            if (ws_bytes_equal(g_hist + g_hist_len - k, ban, k)) {
                ban_starting_with(table, mask, ban + k, n - k);
            }
        }
    }
    out->output = WS_OUTPUT_BITMASK;
    return WS_OK;
}
