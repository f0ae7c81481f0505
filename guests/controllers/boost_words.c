/*
 * boost_words.c - a controller that adds a logit bias to whole-word tokens.
 *
 * Argument: lines "word<TAB>bias" separated by '\n' (a trailing "\r" is dropped,
 * empty lines are skipped), at most BOOST_MAX lines; the word is 1 to
 * BOOST_MAX_LEN bytes, the bias a decimal float: optional sign, digits with an
 * optional '.', optional exponent ("2.5", "-1", ".5", "1e-2").
 * Example: b"hello\t2.5\nworld\t-1\n".
 *
 * create: fills the bias slot with 0, then sets bias[t] = bias for every token
 *         t whose bytes equal a word exactly or equal " " + word (the
 *         leading-space variant that BPE vocabularies use).  When a token
 *         matches several lines, the last one wins.  Special tokens are skipped.
 * step:   answers WS_OUTPUT_BIAS without touching the slot, which keeps its
 *         contents between steps.
 *
 * Built with BOOST_SPARSE defined (boost_words_sparse.c), create writes the same
 * biases as (token, value) pairs instead (ws_sparse_bias_ids / _values, one pair
 * per matching token, the last matching line's value) and every step answers
 * WS_OUTPUT_SPARSE_BIAS with their count: the host then adds a few values per
 * step instead of a whole V-entry row.
 */
#include "wasmshare_controller.h"

#define BOOST_MAX 256u
#define BOOST_MAX_LEN 255u

static uint8_t g_word[BOOST_MAX][BOOST_MAX_LEN + 1u]; /* " " + word */
static uint32_t g_word_len[BOOST_MAX];                 /* without the space */
static float g_bias[BOOST_MAX];
static uint32_t g_n_words;
#ifdef BOOST_SPARSE
static uint32_t g_n_bias; /* pairs written at create */
#endif

static bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }

/* Parses a decimal float filling all of s[0 .. n); false when malformed. */
static bool parse_float(const uint8_t *s, uint32_t n, float *value_out) {
    uint32_t i = 0;
    bool negative = false;
    if (i < n && (s[i] == '+' || s[i] == '-')) {
        negative = s[i] == '-';
        i++;
    }
    double value = 0.0;
    uint32_t digits = 0;
    while (i < n && is_digit(s[i])) {
        value = value * 10.0 + (double)(s[i] - '0');
        i++;
        digits++;
    }
    if (i < n && s[i] == '.') {
        i++;
        double scale = 0.1;
        while (i < n && is_digit(s[i])) {
            value += (double)(s[i] - '0') * scale;
            scale *= 0.1;
            i++;
            digits++;
        }
    }
    if (digits == 0) {
        return false;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        bool exp_negative = false;
        if (i < n && (s[i] == '+' || s[i] == '-')) {
            exp_negative = s[i] == '-';
            i++;
        }
        int32_t exponent = 0;
        uint32_t exp_digits = 0;
        while (i < n && is_digit(s[i])) {
            if (exponent < 1000) {
                exponent = exponent * 10 + (int32_t)(s[i] - '0');
            }
            i++;
            exp_digits++;
        }
        if (exp_digits == 0) {
            return false;
        }
        for (int32_t e = 0; e < exponent && value != 0.0; e++) {
            value = exp_negative ? value / 10.0 : value * 10.0;
        }
    }
    if (i != n) {
        return false;
    }
    float f = (float)(negative ? -value : value);
    if (f - f != 0.0f) {
        return false; /* overflowed to infinity */
    }
    *value_out = f;
    return true;
}

static int32_t parse_arg(const uint8_t *arg, uint32_t len) {
    g_n_words = 0;
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
        if (line_end > start) {
            uint32_t tab = start;
            while (tab < line_end && arg[tab] != '\t') {
                tab++;
            }
            uint32_t n = tab - start;
            if (tab == line_end || n == 0 || n > BOOST_MAX_LEN || g_n_words == BOOST_MAX) {
                return WS_ERR_FAILED;
            }
            if (!parse_float(arg + tab + 1, line_end - tab - 1, &g_bias[g_n_words])) {
                return WS_ERR_FAILED;
            }
            g_word[g_n_words][0] = ' ';
            for (uint32_t i = 0; i < n; i++) {
                g_word[g_n_words][1 + i] = arg[start + i];
            }
            g_word_len[g_n_words++] = n;
        }
        start = end + 1;
    }
    return g_n_words > 0 ? WS_OK : WS_ERR_FAILED;
}

WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out) {
    (void)out;
    if (parse_arg(in->arg, in->arg_len) != WS_OK) {
        return WS_ERR_FAILED;
    }
    const ws_token_table *table = in->token_table;
    uint32_t v = in->vocab_size;
    if (table->n_tokens < v) {
        return WS_ERR_FAILED;
    }
#ifdef BOOST_SPARSE
    uint32_t *ids = ws_sparse_bias_ids(in);
    float *values = ws_sparse_bias_values(in);
    g_n_bias = 0;
#else
    ws_bias_fill(in->bias, v, 0.0f);
#endif
    for (uint32_t t = 0; t < v; t++) {
        if (ws_token_is_special(table, t)) {
            continue;
        }
        uint32_t len = 0;
        const uint8_t *bytes = ws_token_bytes(table, t, &len);
        int32_t last = -1;
        for (uint32_t w = 0; w < g_n_words; w++) {
            uint32_t n = g_word_len[w];
            if ((len == n && ws_bytes_equal(bytes, g_word[w] + 1, n)) ||
                (len == n + 1u && ws_bytes_equal(bytes, g_word[w], n + 1u))) {
                last = (int32_t)w;
            }
        }
        if (last < 0) {
            continue;
        }
#ifdef BOOST_SPARSE
        if (g_n_bias == v / 2u) {
            return WS_ERR_FAILED; /* more matching tokens than the slot holds pairs */
        }
        ids[g_n_bias] = t;
        values[g_n_bias++] = g_bias[last];
#else
        in->bias[t] = g_bias[last];
#endif
    }
    return WS_OK;
}

WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out) {
    (void)in;
#ifdef BOOST_SPARSE
    out->output = WS_OUTPUT_SPARSE_BIAS;
    out->n_bias = g_n_bias;
#else
    out->output = WS_OUTPUT_BIAS;
#endif
    return WS_OK;
}
