/*
 * wasmshare.h - guest side of the wasmshare ABI, version 1.
 *
 * Include this one header in a C guest compiled for wasm32 (freestanding or
 * WASI).  It needs only <stdint.h>, <stddef.h> and <stdbool.h>.
 *
 * What including it does:
 *   - every module that includes it exports `ws_abi_version()` (a weak
 *     definition below), which the host checks at instantiation;
 *   - declares the host imports of module "wasmshare": ws_borrow, ws_release,
 *     ws_region_size, ws_log.  A declaration costs nothing: an import only
 *     appears in the module if the guest calls it;
 *   - gives small inline helpers (ws_grow_block, ws_borrow_f32, ...).
 *
 * Memory model in one paragraph: the host lends shared-memory regions into
 * this guest's linear memory.  A loan is a 64 KiB-aligned window of the
 * guest's *current* memory that the host maps the region over; the guest sees
 * a plain pointer.  Loans passed as call arguments arrive as a (pointer,
 * length-in-elements) pair and are valid for that call.  Regions the host
 * *offers* under an integer handle are borrowed with ws_borrow() and stay
 * mapped until ws_release() or until the outermost host call into the guest
 * returns, whichever is first.  Writing a read-only loan, or touching a
 * released or revoked one, traps (out-of-bounds memory access).
 *
 * Full reference: docs/abi.md.
 */
#ifndef WASMSHARE_H
#define WASMSHARE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#if !defined(__wasm32__)
#error "wasmshare.h is for wasm32 guests: build with `wasmshare build` or `zig cc --target=wasm32-freestanding`"
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version: the host refuses (AbiMismatch) a guest reporting another one. */
#define WASMSHARE_ABI_VERSION 1

/* Size of a wasm page, and the alignment of every loan window. */
#define WS_PAGE_SIZE 65536

/* Access codes for ws_borrow(). */
#define WS_ACCESS_RO 1
#define WS_ACCESS_RW 2

/* Status codes: 0 or negative. */
#define WS_OK 0
#define WS_ERR_BAD_HANDLE (-1)   /* no region is offered under this handle */
#define WS_ERR_ACCESS (-2)       /* the access asked for is not allowed */
#define WS_ERR_NOT_BORROWED (-3) /* ws_release() of a handle not borrowed */
#define WS_ERR_FAILED (-4)       /* anything else (mapping failed, no room, ...) */

/* Export a function under `name`: WS_EXPORT("step") int32_t step(void) {...} */
#define WS_EXPORT(name) __attribute__((export_name(name)))

/* Import a host function of module "wasmshare" (used for the declarations below). */
#define WS_IMPORT(name) __attribute__((import_module("wasmshare"), import_name(name)))

/* ------------------------------------------------------------------------ */
/* Required export                                                          */
/* ------------------------------------------------------------------------ */

/*
 * Returns WASMSHARE_ABI_VERSION.  Weak, so the header can be included in any
 * number of translation units; the linker keeps one copy and exports it.
 */
__attribute__((export_name("ws_abi_version"), weak)) int32_t ws_abi_version(void) {
    return WASMSHARE_ABI_VERSION;
}

/* ------------------------------------------------------------------------ */
/* Host imports (module "wasmshare")                                        */
/* ------------------------------------------------------------------------ */

/*
 * Maps the region the host offered under `handle` into this guest with
 * `access` (WS_ACCESS_RO or WS_ACCESS_RW) and returns its guest address,
 * 64 KiB-aligned and never 0.  Returns 0 on failure: unknown handle, access
 * not allowed, no room in memory.
 *
 * The borrow lasts until ws_release(handle) or until the outermost host call
 * into this guest returns, whichever is first; afterwards accesses trap.
 * Never keep the pointer in a global across calls.
 */
WS_IMPORT("ws_borrow") int32_t ws_borrow(int32_t handle, int32_t access);

/* Ends a borrow early.  WS_OK, WS_ERR_BAD_HANDLE or WS_ERR_NOT_BORROWED. */
WS_IMPORT("ws_release") int32_t ws_release(int32_t handle);

/* Size in bytes of the region offered under `handle`, or WS_ERR_BAD_HANDLE. */
WS_IMPORT("ws_region_size") int64_t ws_region_size(int32_t handle);

/* Logs `len` bytes of UTF-8 at `msg` on the host, tagged with the guest's name. */
WS_IMPORT("ws_log") void ws_log(const char *msg, int32_t len);

/* ------------------------------------------------------------------------ */
/* Optional exports: guest-chosen placement of host loans                   */
/* ------------------------------------------------------------------------ */

/*
 * A guest that wants to decide where the host places loans defines these two
 * (the declarations carry the export names, so a plain definition exports
 * them):
 *
 *   ws_loan_alloc(nbytes): a WS_PAGE_SIZE-aligned guest address of a block of
 *       at least nbytes rounded up to 64 KiB, that the guest will not touch
 *       except through the loan; 0 on failure.
 *   ws_loan_free(addr): the host is done with a block ws_loan_alloc returned.
 *
 * Without them the host grows memory and places loans in the new pages.
 * ws_grow_block() implements ws_loan_alloc in one line.
 */
__attribute__((export_name("ws_loan_alloc"))) int32_t ws_loan_alloc(int32_t nbytes);
__attribute__((export_name("ws_loan_free"))) void ws_loan_free(int32_t addr);

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

/* Current size of linear memory in bytes (0 means exactly 4 GiB). */
static inline uint32_t ws_memory_size_bytes(void) {
    return (uint32_t)__builtin_wasm_memory_size(0) * (uint32_t)WS_PAGE_SIZE;
}

/*
 * Grows linear memory by ceil(nbytes / 64 KiB) pages and returns the start of
 * the new pages: a fresh, zeroed, 64 KiB-aligned block.  NULL when nbytes <= 0
 * or memory cannot grow.  Blocks are never given back to the allocator.
 */
static inline void *ws_grow_block(int32_t nbytes) {
    if (nbytes <= 0) {
        return NULL;
    }
    uint32_t pages = ((uint32_t)nbytes + (uint32_t)(WS_PAGE_SIZE - 1)) / (uint32_t)WS_PAGE_SIZE;
    int32_t old_pages = (int32_t)__builtin_wasm_memory_grow(0, pages);
    if (old_pages < 0) {
        return NULL;
    }
    return (void *)((uintptr_t)(uint32_t)old_pages * (uintptr_t)WS_PAGE_SIZE);
}

/* ws_log() of a NUL-terminated string. */
static inline void ws_log_str(const char *msg) {
    int32_t len = 0;
    while (msg[len] != '\0') {
        len++;
    }
    ws_log(msg, len);
}

/*
 * Borrows `handle` and returns a byte pointer, with the region size in bytes
 * in *size_out (if not NULL).  NULL on failure, and *size_out is then the
 * negative error code from ws_region_size, or WS_ERR_FAILED.
 */
static inline void *ws_borrow_bytes(int32_t handle, int32_t access, int64_t *size_out) {
    int64_t size = ws_region_size(handle);
    if (size < 0) {
        if (size_out) {
            *size_out = size;
        }
        return NULL;
    }
    int32_t addr = ws_borrow(handle, access);
    if (addr == 0) {
        if (size_out) {
            *size_out = WS_ERR_FAILED;
        }
        return NULL;
    }
    if (size_out) {
        *size_out = size;
    }
    return (void *)(uintptr_t)(uint32_t)addr;
}

/* Shared body of the typed helpers: element count capped at INT32_MAX. */
static inline void *ws__borrow_typed(int32_t handle, int32_t access, int32_t *count_out, int64_t elem_size) {
    int64_t size = 0;
    void *p = ws_borrow_bytes(handle, access, &size);
    if (count_out) {
        if (p == NULL) {
            *count_out = (int32_t)size; /* negative error code */
        } else {
            int64_t count = size / elem_size;
            *count_out = count > INT32_MAX ? INT32_MAX : (int32_t)count;
        }
    }
    return p;
}

/*
 * Typed borrows: the pointer, and the number of whole elements in
 * *count_out.  On failure NULL, with *count_out set to a negative WS_ERR_*.
 */
static inline float *ws_borrow_f32(int32_t handle, int32_t access, int32_t *count_out) {
    return (float *)ws__borrow_typed(handle, access, count_out, (int64_t)sizeof(float));
}
static inline int32_t *ws_borrow_i32(int32_t handle, int32_t access, int32_t *count_out) {
    return (int32_t *)ws__borrow_typed(handle, access, count_out, (int64_t)sizeof(int32_t));
}
static inline uint32_t *ws_borrow_u32(int32_t handle, int32_t access, int32_t *count_out) {
    return (uint32_t *)ws__borrow_typed(handle, access, count_out, (int64_t)sizeof(uint32_t));
}
static inline uint8_t *ws_borrow_u8(int32_t handle, int32_t access, int32_t *count_out) {
    return (uint8_t *)ws__borrow_typed(handle, access, count_out, (int64_t)sizeof(uint8_t));
}

#ifdef __cplusplus
}
#endif

#endif /* WASMSHARE_H */
