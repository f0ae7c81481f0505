/*
 * wasmshare_plugin.h - the schema-plugin ABI, version 1 (wasmshare.plugins).
 *
 * A plugin is a wasm guest that reads one large read-only schema blob in
 * place and answers queries about programs.  The host (wasmshare.plugins)
 * puts the blob into the guest's linear memory, without copying it, in one of
 * two ways: a read-only loan of a sealed shared-memory region, or a data
 * segment of the plugin module itself mapped copy-on-write from a compiled
 * artifact.  Either way the guest gets a (pointer, length) pair once, in
 * plugin_init, and may keep it for the life of the instance.  Writing to the
 * blob traps.
 *
 * Required exports (besides `memory` and ws_abi_version from wasmshare.h):
 *
 *   int32_t plugin_abi_version(void)
 *       returns WSP_ABI_VERSION.
 *   int32_t plugin_init(const uint8_t *blob, uint32_t blob_len)
 *       validates the blob's header and bounds and keeps the pointer.
 *       (0, 0) means "no schema": every resource type is unknown.
 *       Returns WSP_OK or a WSP_ERR_* code; never traps on a malformed blob.
 *   int32_t plugin_check(const uint8_t *program, uint32_t program_len,
 *                        uint8_t *out, uint32_t out_cap)
 *       type-checks an encoded program (format below) and writes the
 *       diagnostics into out[0..out_cap).  Returns the total number of
 *       diagnostics found (>= 0; may exceed what fitted, see the out header),
 *       or a WSP_ERR_* code.  Must not allocate.
 *
 * All integers are little-endian; every offset and length read from the blob
 * or the program must be bounds-checked by the guest (treat both as
 * untrusted).  docs/plugins.md describes the formats in full.
 */
#ifndef WASMSHARE_PLUGIN_H
#define WASMSHARE_PLUGIN_H

#include <stdint.h>

#define WSP_ABI_VERSION 1

/* Status codes (negative). */
#define WSP_OK 0
#define WSP_ERR_BAD_MAGIC (-101)   /* the blob or program does not start with its magic */
#define WSP_ERR_BAD_VERSION (-102) /* a format version this guest does not read */
#define WSP_ERR_BAD_BOUNDS (-103)  /* an offset or length points outside its buffer */
#define WSP_ERR_NOT_READY (-104)   /* plugin_check before a successful plugin_init */
#define WSP_ERR_BAD_PROGRAM (-105) /* the encoded program is malformed */
#define WSP_ERR_TOO_DEEP (-106)    /* nesting or path length past the guest's limits */

/* ---- the schema blob ---------------------------------------------------- */

#define WSP_BLOB_MAGIC "WSSCHEMA"
#define WSP_BLOB_VERSION 1

typedef struct {          /* at offset 0 of the blob; 64 bytes */
    char magic[8];        /* "WSSCHEMA" */
    uint32_t version;     /* WSP_BLOB_VERSION */
    uint32_t header_size; /* 64 */
    uint64_t blob_size;   /* bytes of the whole blob */
    uint64_t index_offset, index_size;
    uint64_t json_offset, json_size;
    uint32_t index_crc32; /* CRC-32 (zlib) of the index bytes */
    uint32_t json_crc32;  /* CRC-32 (zlib) of the JSON document */
} wsp_blob_header;

typedef struct {          /* at index_offset; offsets below are from index_offset */
    uint32_t n_types, types_offset;
    uint32_t n_props, props_offset;
    uint32_t strings_offset, strings_size;
    uint32_t n_resources; /* types [0, n_resources) are resources, the rest object types */
    uint32_t reserved;
} wsp_index_header;

#define WSP_TYPE_RESOURCE 1
#define WSP_TYPE_OBJECT 2

typedef struct {                /* 32 bytes; sorted by (kind, name bytes) */
    uint32_t name_off, name_len; /* the type token, in the string table */
    uint32_t first_prop, n_props; /* its input properties, sorted by name */
    uint32_t json_off, json_len; /* its object in the JSON document */
    uint32_t kind;               /* WSP_TYPE_RESOURCE or WSP_TYPE_OBJECT */
    uint32_t reserved;
} wsp_type;

/* Property and element types. */
#define WSP_T_STRING 1
#define WSP_T_NUMBER 2
#define WSP_T_INTEGER 3
#define WSP_T_BOOLEAN 4
#define WSP_T_ARRAY 5  /* elements: item_kind (+ ref) */
#define WSP_T_MAP 6    /* values: item_kind (+ ref) */
#define WSP_T_OBJECT 7 /* a nested type: ref */
#define WSP_T_ANY 8

#define WSP_NO_REF 0xFFFFFFFFu

typedef struct {       /* 16 bytes */
    uint32_t name_off;
    uint16_t name_len;
    uint8_t kind;      /* WSP_T_* */
    uint8_t item_kind; /* WSP_T_* of array elements / map values, else 0 */
    uint32_t ref;      /* index of the nested type, or WSP_NO_REF */
    uint32_t flags;    /* bit 0: required */
} wsp_prop;

/* ---- the encoded program ------------------------------------------------ */

#define WSP_PROGRAM_MAGIC 0x47505357u /* "WSPG" */
#define WSP_PROGRAM_VERSION 1

/* Value kinds of program nodes. */
#define WSP_V_NULL 0
#define WSP_V_BOOL 1
#define WSP_V_INTEGER 2
#define WSP_V_NUMBER 3
#define WSP_V_STRING 4
#define WSP_V_EXPR 5 /* a string holding a ${...} interpolation: any type */
#define WSP_V_LIST 6
#define WSP_V_MAP 7

typedef struct { /* 24 bytes */
    uint32_t magic, version, n_resources, n_nodes, strings_size, reserved;
} wsp_program_header;

typedef struct { /* 20 bytes */
    uint32_t name_off, name_len; /* logical name, in the program's strings */
    uint32_t type_off, type_len; /* type token */
    uint32_t props_node;         /* a node, or WSP_NO_REF when it has no properties */
} wsp_resource;

typedef struct { /* 20 bytes; children are contiguous, and after their parent */
    uint8_t kind;     /* WSP_V_* */
    uint8_t pad[3];
    uint32_t key_off, key_len; /* the key of a map entry (0, 0 for list items) */
    uint32_t first_child, n_children;
} wsp_node;

/* ---- diagnostics written to out ------------------------------------------ */

#define WSP_DIAG_UNKNOWN_TYPE 1
#define WSP_DIAG_UNKNOWN_PROPERTY 2
#define WSP_DIAG_WRONG_TYPE 3

typedef struct { /* at out[0]; 16 bytes */
    uint32_t n_written, n_total, bytes_used, reserved;
} wsp_out_header;

typedef struct {   /* 12 bytes, then path_len bytes of path, padded to 4 */
    uint8_t kind;  /* WSP_DIAG_* */
    uint8_t expected; /* WSP_T_* for wrong-type, else 0 */
    uint8_t actual;   /* WSP_V_* for wrong-type, else 0 */
    uint8_t pad;
    uint32_t resource; /* index of the resource in the program */
    uint32_t path_len;
} wsp_diag;

#endif /* WASMSHARE_PLUGIN_H */
