/*
 * wasmshare_controller.h - the LLM controller ABI, version 1.
 *
 * A controller is a wasm guest that steers one sequence of an LLM decode batch
 * (the AICI model). Each decode step the host calls ws_ctrl_step(); the
 * controller reads the tokens sampled since its last step and writes, in place,
 * either a token bitmask or an f32 logit-bias vector into its output slot, which
 * is a row of the batch tensor the engine applies. Nothing is copied: the token
 * table, the step record and both output slots are regions the host lends into
 * this guest's linear memory.
 *
 * Exports a controller provides:
 *   int32_t ws_ctrl_abi_version(void)               defined below (weak): the host checks it
 *   int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out)
 *       once, before the first step: in->tokens holds the prompt, in->arg the
 *       controller's argument bytes. Return WS_OK or a negative code (the
 *       sequence then fails). `out` is reserved at create: the host ignores it
 *       (answer fast-forward or stop from the first step).
 *   int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out)
 *       once per decode step: in->tokens holds the tokens sampled since the last
 *       step (none at step 0). Write the output slot you choose and say which in
 *       out->output. Return WS_OK or a negative code. Never allocate here.
 *   void ws_ctrl_free(void)                          optional teardown.
 *
 * Semantics of a result (applied by the engine in this order):
 *   1. remove out->backtrack tokens from the end of the sequence;
 *   2. append out->ff_tokens[0 .. n_ff) without sampling (fast-forward);
 *   3. if out->action == WS_STOP, the sequence ends here;
 *   4. otherwise the next token is sampled with the output applied:
 *      WS_OUTPUT_BITMASK: bit (t % 32) of mask[t / 32] set = token t allowed;
 *      WS_OUTPUT_BIAS:    bias[t] is added to token t's logit;
 *      WS_OUTPUT_SPARSE_BIAS: values[i] is added to token ids[i]'s logit for i < n_bias,
 *                         where ids = ws_sparse_bias_ids(in) and values =
 *                         ws_sparse_bias_values(in) (both halves of the bias slot;
 *                         n_bias <= vocab_size / 2; a repeated id adds up);
 *      WS_OUTPUT_NONE:    no constraint.
 * The output slots keep their contents between steps (they are the controller's
 * own rows); the host resets them only after a fault: the mask to all-allowed,
 * the bias to zeros. A controller that traps, runs past its deadline, or returns
 * a negative code ends its own sequence with an error; its slot is never applied.
 *
 * Full reference: docs/controller-abi.md.
 */
#ifndef WASMSHARE_CONTROLLER_H
#define WASMSHARE_CONTROLLER_H

#include "wasmshare.h"

#ifdef __cplusplus
extern "C" {
#endif

#define WS_CONTROLLER_ABI_VERSION 1

/* out->action */
#define WS_CONTINUE 0
#define WS_STOP 1

/* out->output */
#define WS_OUTPUT_NONE 0
#define WS_OUTPUT_BITMASK 1
#define WS_OUTPUT_BIAS 2
#define WS_OUTPUT_SPARSE_BIAS 3

/* Capacity of out->ff_tokens. */
#define WS_MAX_FF_TOKENS 1024

/* Token flags in the token table. */
#define WS_TOKEN_SPECIAL 1u

/* The tokenizer's vocabulary, shared read-only by every controller. */
typedef struct ws_token_table {
    uint32_t struct_size;     /* sizeof(ws_token_table) as the host wrote it */
    uint32_t magic;           /* WS_TOKEN_TABLE_MAGIC */
    uint32_t version;         /* 1 */
    uint32_t n_tokens;        /* vocabulary size V */
    uint32_t offsets_offset;  /* byte offset from the table start of uint32_t offsets[V + 1] */
    uint32_t flags_offset;    /* byte offset of uint8_t flags[V] (WS_TOKEN_SPECIAL, ...) */
    uint32_t bytes_offset;    /* byte offset of the token bytes: token t is bytes[offsets[t] .. offsets[t+1]) */
    uint32_t bytes_len;       /* total token bytes */
    uint32_t eos_token;       /* end-of-sequence token id, or UINT32_MAX */
    uint32_t bos_token;       /* beginning-of-sequence token id, or UINT32_MAX */
    uint32_t reserved[6];
} ws_token_table;

#define WS_TOKEN_TABLE_MAGIC 0x54545357u /* "WSTT" little-endian */

/* What the host tells the controller, in its step record (read-only for the guest by convention). */
typedef struct ws_step_input {
    uint32_t struct_size;     /* sizeof(ws_step_input) as the host wrote it */
    uint32_t abi_version;     /* the host's WS_CONTROLLER_ABI_VERSION */
    uint32_t vocab_size;      /* V */
    uint32_t mask_words;      /* ceil(V / 32) */
    const ws_token_table *token_table;
    uint32_t *mask;           /* output slot: uint32_t[mask_words] */
    float *bias;              /* output slot: float[V] */
    uint32_t step;            /* 0 for create and the first step, then 1, 2, ... */
    uint32_t n_tokens;        /* count of tokens[] */
    const uint32_t *tokens;   /* create: the prompt; step: tokens sampled since the last step */
    const uint8_t *arg;       /* create: the controller's argument bytes (not NUL-terminated) */
    uint32_t arg_len;
    uint32_t sequence_id;     /* the host's id for this sequence */
    uint32_t reserved[4];
} ws_step_input;

/* What the controller answers; the host resets it before every call. */
typedef struct ws_step_result {
    uint32_t struct_size;     /* sizeof(ws_step_result) as the host wrote it */
    int32_t action;           /* WS_CONTINUE or WS_STOP */
    int32_t output;           /* WS_OUTPUT_NONE, _BITMASK, _BIAS or _SPARSE_BIAS */
    uint32_t backtrack;       /* tokens to remove from the end before fast-forwarding */
    uint32_t n_ff;            /* count of ff_tokens (at most WS_MAX_FF_TOKENS) */
    uint32_t n_bias;          /* WS_OUTPUT_SPARSE_BIAS: entries (at most vocab_size / 2) */
    uint32_t reserved[2];
    uint32_t ff_tokens[WS_MAX_FF_TOKENS];
} ws_step_result;

/* Every controller reports the controller ABI it was built for (define
   WS_CTRL_NO_DEFAULT_ABI_VERSION to provide your own, as a test of the check does). */
#ifndef WS_CTRL_NO_DEFAULT_ABI_VERSION
__attribute__((export_name("ws_ctrl_abi_version"), weak)) int32_t ws_ctrl_abi_version(void) {
    return WS_CONTROLLER_ABI_VERSION;
}
#endif

/* The exports a controller defines. */
WS_EXPORT("ws_ctrl_create") int32_t ws_ctrl_create(const ws_step_input *in, ws_step_result *out);
WS_EXPORT("ws_ctrl_step") int32_t ws_ctrl_step(const ws_step_input *in, ws_step_result *out);

/* ---- the host's grammar engine ------------------------------------------------------------
 * A controller can hand part of its work to the host's constraint engine (llguidance):
 * open a constraint by spec, let the host write the mask for its current state straight
 * into the controller's mask slot, advance it by sampled tokens, ask whether it accepts.
 * An import only appears in a module that calls it. Handles are positive; errors negative. */
#define WS_CONSTRAINT_JSON_SCHEMA 1 /* spec: JSON Schema text */
#define WS_CONSTRAINT_REGEX 2       /* spec: a regular expression */
#define WS_CONSTRAINT_GRAMMAR 3     /* spec: a Lark grammar */
#define WS_CONSTRAINT_CHOICE 4      /* spec: a JSON list of strings */
#define WS_CONSTRAINT_STOP 5        /* spec: a JSON list of strings: free text until one appears */
#define WS_CONSTRAINT_ERR_BAD_HANDLE (-1)
#define WS_CONSTRAINT_ERR_SPEC (-2)     /* the spec did not compile (the host logs why) */
#define WS_CONSTRAINT_ERR_REJECTED (-3) /* the token is not allowed in the current state */
#define WS_CONSTRAINT_ERR_BOUNDS (-4)   /* the mask pointer or size is wrong */

WS_IMPORT("ws_constraint_open") int32_t ws_constraint_open(int32_t kind, const char *spec, int32_t len);
WS_IMPORT("ws_constraint_fill_mask") int32_t ws_constraint_fill_mask(int32_t handle, uint32_t *mask, int32_t words);
WS_IMPORT("ws_constraint_consume") int32_t ws_constraint_consume(int32_t handle, uint32_t token);
WS_IMPORT("ws_constraint_is_accepting") int32_t ws_constraint_is_accepting(int32_t handle);
WS_IMPORT("ws_constraint_is_stopped") int32_t ws_constraint_is_stopped(int32_t handle);
WS_IMPORT("ws_constraint_close") int32_t ws_constraint_close(int32_t handle);

/* ---- helpers ---------------------------------------------------------------------------- */

/* Bytes of token `t` (not NUL-terminated); *len_out gets the length. NULL for an invalid id. */
static inline const uint8_t *ws_token_bytes(const ws_token_table *table, uint32_t t, uint32_t *len_out) {
    if (t >= table->n_tokens) {
        *len_out = 0;
        return NULL;
    }
    const uint32_t *offsets = (const uint32_t *)((const uint8_t *)table + table->offsets_offset);
    const uint8_t *bytes = (const uint8_t *)table + table->bytes_offset;
    *len_out = offsets[t + 1] - offsets[t];
    return bytes + offsets[t];
}

static inline bool ws_token_is_special(const ws_token_table *table, uint32_t t) {
    const uint8_t *flags = (const uint8_t *)table + table->flags_offset;
    return t < table->n_tokens && (flags[t] & WS_TOKEN_SPECIAL) != 0;
}

/* Mask helpers: words = ceil(V / 32). Clearing and filling compile to memory.fill
   (bulk memory), which the engine runs as a native memset. */
static inline void ws_mask_clear(uint32_t *mask, uint32_t words) {
    __builtin_memset(mask, 0, (size_t)words * 4u);
}
static inline void ws_mask_fill(uint32_t *mask, uint32_t words) {
    __builtin_memset(mask, 0xFF, (size_t)words * 4u);
}
static inline void ws_mask_allow(uint32_t *mask, uint32_t t) { mask[t >> 5] |= 1u << (t & 31); }
static inline void ws_mask_ban(uint32_t *mask, uint32_t t) { mask[t >> 5] &= ~(1u << (t & 31)); }
static inline bool ws_mask_allowed(const uint32_t *mask, uint32_t t) { return (mask[t >> 5] >> (t & 31)) & 1u; }

/* Bias helper: set every entry to `value` (zero compiles to memory.fill). */
static inline void ws_bias_fill(float *bias, uint32_t n, float value) {
    if (value == 0.0f) {
        __builtin_memset(bias, 0, (size_t)n * sizeof(float));
        return;
    }
    for (uint32_t i = 0; i < n; i++) bias[i] = value;
}

/* Sparse bias (WS_OUTPUT_SPARSE_BIAS): token ids in the first half of the bias slot,
   their values in the second. The host reads only the first n_bias of each, so a step
   costs the host O(n_bias) instead of a pass over V logits. */
static inline uint32_t *ws_sparse_bias_ids(const ws_step_input *in) {
    return (uint32_t *)(void *)in->bias;
}
static inline float *ws_sparse_bias_values(const ws_step_input *in) {
    return in->bias + in->vocab_size / 2u;
}

/* Byte helpers (freestanding: no libc). */
static inline bool ws_bytes_equal(const uint8_t *a, const uint8_t *b, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) if (a[i] != b[i]) return false;
    return true;
}
/* True when `needle` occurs in `hay`. */
static inline bool ws_bytes_contains(const uint8_t *hay, uint32_t hay_len, const uint8_t *needle, uint32_t needle_len) {
    if (needle_len == 0) return true;
    for (uint32_t i = 0; i + needle_len <= hay_len; i++) {
        if (ws_bytes_equal(hay + i, needle, needle_len)) return true;
    }
    return false;
}

#ifdef __cplusplus
}
#endif

#endif /* WASMSHARE_CONTROLLER_H */
