/*
 * hostile_plugin.c - a misbehaving schema plugin, for tests of the host's
 * defences.  It speaks the plugin ABI (wasmshare_plugin.h); what plugin_check
 * does depends on the type token of the program's first resource:
 *
 *   "hostile:write"  writes into the schema blob (read-only: traps)
 *   "hostile:grow"   grows memory until memory.grow fails, then traps
 *   "hostile:spin"   loops forever (stopped by the host's deadline)
 *   anything else    reports no diagnostics
 */
#include "wasmshare.h"
#include "wasmshare_plugin.h"

static uint8_t *g_blob;
static uint32_t g_len;

WS_EXPORT("plugin_abi_version") int32_t plugin_abi_version(void) { return WSP_ABI_VERSION; }

WS_EXPORT("plugin_init") int32_t plugin_init(uint8_t *blob, uint32_t len) {
    g_blob = blob;
    g_len = len;
    return WSP_OK;
}

static bool token_is(const uint8_t *s, uint32_t n, const char *want) {
    uint32_t i = 0;
    for (; want[i] != '\0'; i++) {
        if (i >= n || s[i] != (uint8_t)want[i]) {
            return false;
        }
    }
    return i == n;
}

WS_EXPORT("plugin_check")
int32_t plugin_check(const uint8_t *prog, uint32_t len, uint8_t *out, uint32_t out_cap) {
    if (len < 24 + 20 || out_cap < 16) {
        return WSP_ERR_BAD_BOUNDS;
    }
    uint32_t n_res, n_nodes, strings_size, type_off, type_len;
    __builtin_memcpy(&n_res, prog + 8, 4);
    __builtin_memcpy(&n_nodes, prog + 12, 4);
    __builtin_memcpy(&strings_size, prog + 16, 4);
    __builtin_memcpy(&type_off, prog + 24 + 8, 4);
    __builtin_memcpy(&type_len, prog + 24 + 12, 4);
    uint64_t strings = 24 + (uint64_t)n_res * 20 + (uint64_t)n_nodes * 20;
    if (n_res == 0 || strings > len || strings_size > len - strings || type_off > strings_size ||
        type_len > strings_size - type_off) {
        return WSP_ERR_BAD_PROGRAM;
    }
    const uint8_t *token = prog + strings + type_off;
    if (token_is(token, type_len, "hostile:write")) {
        volatile uint8_t *p = g_blob + g_len / 2;
        *p = (uint8_t)(*p + 1);
    } else if (token_is(token, type_len, "hostile:grow")) {
        while (__builtin_wasm_memory_grow(0, 16) != (size_t)-1) {
        }
        __builtin_trap();
    } else if (token_is(token, type_len, "hostile:spin")) {
        volatile uint32_t counter = 0;
        for (;;) {
            counter = counter + 1;
        }
    }
    uint32_t header[4] = {0, 0, 16, 0};
    __builtin_memcpy(out, header, 16);
    return 0;
}
