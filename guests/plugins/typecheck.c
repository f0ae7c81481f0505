/*
 * typecheck.c - a schema plugin: type-checks an infrastructure program
 * (resources with their properties, as in a YAML program) against a
 * provider schema blob read in place (wasmshare_plugin.h, docs/plugins.md).
 *
 *   plugin_init(blob, len)             keep the blob after checking its header
 *                                      and table bounds; (0, 0): no schema
 *   plugin_check(prog, len, out, cap)  diagnostics for every unknown resource
 *                                      type, unknown property and value of the
 *                                      wrong type, each with its path
 *                                      (resources.NAME.properties.a.b[2].c)
 *
 * The blob and the program are untrusted: every offset and length is checked
 * before use, and a bad one gives WSP_ERR_BAD_BOUNDS, never a trap.  Lookups:
 * binary search of the sorted type table, then a scan of the type's property
 * list.  No allocation: the path is built in a fixed buffer.
 */
#include "wasmshare.h"
#include "wasmshare_plugin.h"

#define MAX_DEPTH 48
#define MAX_PATH 4096

/* ---- little-endian reads (the buffers may be unaligned) --------------------- */

static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}
static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    __builtin_memcpy(&v, p, 2);
    return v;
}
static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return v;
}

/* [off, off + len) inside [0, size)? (no overflow) */
static inline bool in_bounds(uint64_t off, uint64_t len, uint64_t size) {
    return off <= size && len <= size - off;
}

/* ---- the schema (set by plugin_init) ----------------------------------------- */

static bool g_ready;
static const uint8_t *g_types;   /* n_types * 32 bytes */
static const uint8_t *g_props;   /* n_props * 16 bytes */
static const uint8_t *g_strings; /* strings_size bytes */
static uint32_t g_n_types, g_n_resources, g_n_props, g_strings_size;

WS_EXPORT("plugin_abi_version") int32_t plugin_abi_version(void) { return WSP_ABI_VERSION; }

WS_EXPORT("plugin_init") int32_t plugin_init(const uint8_t *blob, uint32_t len) {
    g_ready = false;
    g_n_types = g_n_resources = g_n_props = g_strings_size = 0;
    if (blob == 0 && len == 0) { /* no schema at all */
        g_ready = true;
        return WSP_OK;
    }
    if (len < sizeof(wsp_blob_header)) {
        return WSP_ERR_BAD_BOUNDS;
    }
    const char *magic = WSP_BLOB_MAGIC;
    for (int i = 0; i < 8; i++) {
        if (blob[i] != (uint8_t)magic[i]) {
            return WSP_ERR_BAD_MAGIC;
        }
    }
    if (rd32(blob + 8) != WSP_BLOB_VERSION) {
        return WSP_ERR_BAD_VERSION;
    }
    uint64_t header_size = rd32(blob + 12), blob_size = rd64(blob + 16);
    uint64_t index_off = rd64(blob + 24), index_size = rd64(blob + 32);
    uint64_t json_off = rd64(blob + 40), json_size = rd64(blob + 48);
    if (header_size < sizeof(wsp_blob_header) || blob_size > len || header_size > blob_size ||
        !in_bounds(index_off, index_size, blob_size) || !in_bounds(json_off, json_size, blob_size) ||
        index_size < sizeof(wsp_index_header)) {
        return WSP_ERR_BAD_BOUNDS;
    }
    const uint8_t *index = blob + index_off;
    uint32_t n_types = rd32(index), types_off = rd32(index + 4);
    uint32_t n_props = rd32(index + 8), props_off = rd32(index + 12);
    uint32_t strings_off = rd32(index + 16), strings_size = rd32(index + 20);
    uint32_t n_resources = rd32(index + 24);
    if (!in_bounds(types_off, (uint64_t)n_types * sizeof(wsp_type), index_size) ||
        !in_bounds(props_off, (uint64_t)n_props * sizeof(wsp_prop), index_size) ||
        !in_bounds(strings_off, strings_size, index_size) || n_resources > n_types) {
        return WSP_ERR_BAD_BOUNDS;
    }
    g_types = index + types_off;
    g_props = index + props_off;
    g_strings = index + strings_off;
    g_n_types = n_types;
    g_n_resources = n_resources;
    g_n_props = n_props;
    g_strings_size = strings_size;
    g_ready = true;
    return WSP_OK;
}

/* Compare the string at (off, len) of the string table with s[0..n): <0, 0, >0.
 * Sets *bad when the table entry is out of bounds. */
static int cmp_name(uint32_t off, uint32_t len, const uint8_t *s, uint32_t n, bool *bad) {
    if (!in_bounds(off, len, g_strings_size)) {
        *bad = true;
        return 0;
    }
    const uint8_t *a = g_strings + off;
    uint32_t m = len < n ? len : n;
    for (uint32_t i = 0; i < m; i++) {
        if (a[i] != s[i]) {
            return (int)a[i] - (int)s[i];
        }
    }
    return len < n ? -1 : (len > n ? 1 : 0);
}

/* Index of the resource type named s[0..n) in [0, n_resources), or WSP_NO_REF. */
static uint32_t find_resource(const uint8_t *s, uint32_t n, bool *bad) {
    uint32_t lo = 0, hi = g_n_resources;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        const uint8_t *t = g_types + (uint64_t)mid * sizeof(wsp_type);
        int c = cmp_name(rd32(t), rd32(t + 4), s, n, bad);
        if (*bad) {
            return WSP_NO_REF;
        }
        if (c == 0) {
            return mid;
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return WSP_NO_REF;
}

/* The property record named s[0..n) of type `type`, or 0. */
static const uint8_t *find_prop(uint32_t type, const uint8_t *s, uint32_t n, bool *bad) {
    if (type >= g_n_types) {
        *bad = true;
        return 0;
    }
    const uint8_t *t = g_types + (uint64_t)type * sizeof(wsp_type);
    uint32_t first = rd32(t + 8), count = rd32(t + 12);
    if (!in_bounds(first, count, g_n_props)) {
        *bad = true;
        return 0;
    }
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *p = g_props + (uint64_t)(first + i) * sizeof(wsp_prop);
        if (cmp_name(rd32(p), rd16(p + 4), s, n, bad) == 0 && !*bad) {
            return p;
        }
        if (*bad) {
            return 0;
        }
    }
    return 0;
}

/* ---- the program and the output ------------------------------------------------ */

typedef struct {
    const uint8_t *nodes, *strings;
    uint32_t n_nodes, strings_size;
    uint8_t *out;
    uint32_t out_cap, out_used, n_written, n_total;
    uint32_t resource;
    char path[MAX_PATH];
    uint32_t path_len;
    int32_t error;
} ctx_t;

static ctx_t C; /* one check at a time: a guest instance is single-threaded */

static bool push_bytes(const uint8_t *s, uint32_t n) {
    if (n > MAX_PATH - C.path_len) {
        C.error = WSP_ERR_TOO_DEEP;
        return false;
    }
    for (uint32_t i = 0; i < n; i++) {
        C.path[C.path_len + i] = (char)s[i];
    }
    C.path_len += n;
    return true;
}

static bool push_str(const char *s) {
    uint32_t n = 0;
    while (s[n] != '\0') {
        n++;
    }
    return push_bytes((const uint8_t *)s, n);
}

static bool push_key(uint32_t off, uint32_t len) {
    if (!in_bounds(off, len, C.strings_size)) {
        C.error = WSP_ERR_BAD_BOUNDS;
        return false;
    }
    return push_str(".") && push_bytes(C.strings + off, len);
}

static bool push_index(uint32_t i) {
    char buf[12];
    int n = 0;
    do {
        buf[n++] = (char)('0' + i % 10);
        i /= 10;
    } while (i != 0);
    char rev[14];
    rev[0] = '[';
    for (int k = 0; k < n; k++) {
        rev[1 + k] = buf[n - 1 - k];
    }
    rev[1 + n] = ']';
    return push_bytes((const uint8_t *)rev, (uint32_t)n + 2);
}

static void diag(uint8_t kind, uint8_t expected, uint8_t actual) {
    C.n_total++;
    uint32_t need = (12u + C.path_len + 3u) & ~3u;
    if (C.out_used > C.out_cap || need > C.out_cap - C.out_used) {
        return; /* counted, not written: the host sees n_total > n_written */
    }
    uint8_t *r = C.out + C.out_used;
    r[0] = kind;
    r[1] = expected;
    r[2] = actual;
    r[3] = 0;
    __builtin_memcpy(r + 4, &C.resource, 4);
    __builtin_memcpy(r + 8, &C.path_len, 4);
    for (uint32_t i = 0; i < C.path_len; i++) {
        r[12 + i] = (uint8_t)C.path[i];
    }
    for (uint32_t i = 12 + C.path_len; i < need; i++) {
        r[i] = 0;
    }
    C.out_used += need;
    C.n_written++;
}

static bool node_ok(uint32_t node) { return node < C.n_nodes; }
static const uint8_t *node_at(uint32_t node) { return C.nodes + (uint64_t)node * sizeof(wsp_node); }

/* Children [first, first + n) of `node`: after it, and inside the node table. */
static bool children(uint32_t node, uint32_t *first, uint32_t *n) {
    const uint8_t *p = node_at(node);
    *first = rd32(p + 12);
    *n = rd32(p + 16);
    if (*n == 0) {
        return true;
    }
    if (*first <= node || !in_bounds(*first, *n, C.n_nodes)) {
        C.error = WSP_ERR_BAD_PROGRAM;
        return false;
    }
    return true;
}

static void check_value(uint32_t node, uint8_t kind, uint8_t item_kind, uint32_t ref, int depth);

/* The entries of map node `node` against the properties of object type `type`. */
static void check_object(uint32_t node, uint32_t type, int depth) {
    uint32_t first, n;
    if (!children(node, &first, &n)) {
        return;
    }
    for (uint32_t i = 0; i < n && C.error == 0; i++) {
        uint32_t child = first + i;
        const uint8_t *c = node_at(child);
        uint32_t key_off = rd32(c + 4), key_len = rd32(c + 8);
        uint32_t saved = C.path_len;
        if (!push_key(key_off, key_len)) {
            return;
        }
        bool bad = false;
        const uint8_t *prop = find_prop(type, C.strings + key_off, key_len, &bad);
        if (bad) {
            C.error = WSP_ERR_BAD_BOUNDS;
            return;
        }
        if (prop == 0) {
            diag(WSP_DIAG_UNKNOWN_PROPERTY, 0, 0);
        } else {
            check_value(child, prop[6], prop[7], rd32(prop + 8), depth + 1);
        }
        C.path_len = saved;
    }
}

static void check_value(uint32_t node, uint8_t kind, uint8_t item_kind, uint32_t ref, int depth) {
    if (depth > MAX_DEPTH) {
        C.error = WSP_ERR_TOO_DEEP;
        return;
    }
    if (!node_ok(node)) {
        C.error = WSP_ERR_BAD_PROGRAM;
        return;
    }
    uint8_t v = node_at(node)[0];
    if (v == WSP_V_NULL || v == WSP_V_EXPR || kind == WSP_T_ANY) {
        return; /* unset, or only known when the program runs */
    }
    bool ok;
    switch (kind) {
    case WSP_T_STRING: ok = v == WSP_V_STRING; break;
    case WSP_T_NUMBER: ok = v == WSP_V_NUMBER || v == WSP_V_INTEGER; break;
    case WSP_T_INTEGER: ok = v == WSP_V_INTEGER; break;
    case WSP_T_BOOLEAN: ok = v == WSP_V_BOOL; break;
    case WSP_T_ARRAY: ok = v == WSP_V_LIST; break;
    case WSP_T_MAP: ok = v == WSP_V_MAP; break;
    case WSP_T_OBJECT: ok = v == WSP_V_MAP; break;
    default: ok = true; break; /* a type this guest does not know: accept */
    }
    if (!ok) {
        diag(WSP_DIAG_WRONG_TYPE, kind, v);
        return;
    }
    if (kind == WSP_T_OBJECT) {
        if (ref != WSP_NO_REF) {
            check_object(node, ref, depth);
        }
        return;
    }
    if (kind != WSP_T_ARRAY && kind != WSP_T_MAP) {
        return;
    }
    uint8_t elem = item_kind;
    if (elem == WSP_T_ARRAY || elem == WSP_T_MAP || elem == 0) {
        elem = WSP_T_ANY; /* nested collections are not described further */
    }
    uint32_t first, n;
    if (!children(node, &first, &n)) {
        return;
    }
    for (uint32_t i = 0; i < n && C.error == 0; i++) {
        uint32_t saved = C.path_len;
        bool pushed;
        if (kind == WSP_T_ARRAY) {
            pushed = push_index(i);
        } else {
            const uint8_t *c = node_at(first + i);
            pushed = push_key(rd32(c + 4), rd32(c + 8));
        }
        if (!pushed) {
            return;
        }
        check_value(first + i, elem, 0, ref, depth + 1);
        C.path_len = saved;
    }
}

WS_EXPORT("plugin_check")
int32_t plugin_check(const uint8_t *prog, uint32_t len, uint8_t *out, uint32_t out_cap) {
    if (!g_ready) {
        return WSP_ERR_NOT_READY;
    }
    if (out_cap < sizeof(wsp_out_header) || len < sizeof(wsp_program_header)) {
        return WSP_ERR_BAD_BOUNDS;
    }
    if (rd32(prog) != WSP_PROGRAM_MAGIC) {
        return WSP_ERR_BAD_MAGIC;
    }
    if (rd32(prog + 4) != WSP_PROGRAM_VERSION) {
        return WSP_ERR_BAD_VERSION;
    }
    uint32_t n_res = rd32(prog + 8), n_nodes = rd32(prog + 12), strings_size = rd32(prog + 16);
    uint64_t res_off = sizeof(wsp_program_header);
    uint64_t nodes_off = res_off + (uint64_t)n_res * sizeof(wsp_resource);
    uint64_t strings_off = nodes_off + (uint64_t)n_nodes * sizeof(wsp_node);
    if (!in_bounds(strings_off, strings_size, len)) {
        return WSP_ERR_BAD_BOUNDS;
    }
    C.nodes = prog + nodes_off;
    C.n_nodes = n_nodes;
    C.strings = prog + strings_off;
    C.strings_size = strings_size;
    C.out = out;
    C.out_cap = out_cap;
    C.out_used = sizeof(wsp_out_header);
    C.n_written = C.n_total = 0;
    C.error = 0;
    for (uint32_t r = 0; r < n_res && C.error == 0; r++) {
        const uint8_t *res = prog + res_off + (uint64_t)r * sizeof(wsp_resource);
        uint32_t name_off = rd32(res), name_len = rd32(res + 4);
        uint32_t type_off = rd32(res + 8), type_len = rd32(res + 12), props = rd32(res + 16);
        if (!in_bounds(name_off, name_len, strings_size) || !in_bounds(type_off, type_len, strings_size)) {
            return WSP_ERR_BAD_BOUNDS;
        }
        C.resource = r;
        C.path_len = 0;
        if (!push_str("resources") || !push_key(name_off, name_len)) {
            break;
        }
        uint32_t base = C.path_len;
        bool bad = false;
        uint32_t type = find_resource(C.strings + type_off, type_len, &bad);
        if (bad) {
            return WSP_ERR_BAD_BOUNDS;
        }
        if (type == WSP_NO_REF) {
            if (push_str(".type")) {
                diag(WSP_DIAG_UNKNOWN_TYPE, 0, 0);
            }
            continue;
        }
        if (props == WSP_NO_REF) {
            continue;
        }
        C.path_len = base;
        if (!push_str(".properties")) {
            break;
        }
        if (!node_ok(props)) {
            return WSP_ERR_BAD_PROGRAM;
        }
        uint8_t v = node_at(props)[0];
        if (v == WSP_V_NULL || v == WSP_V_EXPR) {
            continue;
        }
        if (v != WSP_V_MAP) {
            diag(WSP_DIAG_WRONG_TYPE, WSP_T_OBJECT, v);
            continue;
        }
        check_object(props, type, 0);
    }
    if (C.error != 0) {
        return C.error;
    }
    wsp_out_header h = {C.n_written, C.n_total, C.out_used, 0};
    __builtin_memcpy(out, &h, sizeof h);
    return (int32_t)C.n_total;
}
