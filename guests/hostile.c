/*
 * hostile.c - a misbehaving guest, for tests of the host's defences.
 *
 *   spin()                       loops forever (needs fuel or a deadline)
 *   grow_forever()               grows memory one page at a time until
 *                                memory.grow fails, then writes just past the
 *                                end of memory, which traps.  Never returns.
 *   write_at(addr, value)        stores an int32 at a raw guest address: into a
 *                                read-only or revoked loan, or out of bounds
 *   read_at(addr)                loads an int32 from a raw guest address
 *   fill_then_trap(p, n, k)      writes 1.0f to p[0], p[1], ... and traps
 *                                (unreachable) on reaching index k, so p[0..k)
 *                                is written and p[k..n) untouched; with k < 0
 *                                or k >= n it fills all n and returns.
 */
#include "wasmshare.h"

WS_EXPORT("spin") void spin(void) {
    volatile uint32_t counter = 0;
    for (;;) {
        counter = counter + 1;
    }
}

WS_EXPORT("grow_forever") int32_t grow_forever(void) {
    int32_t grown = 0;
    while (__builtin_wasm_memory_grow(0, 1) != (size_t)-1) {
        grown++;
    }
    uint32_t pages = (uint32_t)__builtin_wasm_memory_size(0);
    if (pages >= 65536u) {
        /* All 4 GiB are in bounds: no address is past the end. */
        __builtin_trap();
    }
    volatile int32_t *past_end = (volatile int32_t *)(uintptr_t)(pages * (uint32_t)WS_PAGE_SIZE);
    *past_end = grown;
    return grown;
}

WS_EXPORT("write_at") void write_at(int32_t addr, int32_t value) {
    *(volatile int32_t *)(uintptr_t)(uint32_t)addr = value;
}

WS_EXPORT("read_at") int32_t read_at(int32_t addr) {
    return *(volatile int32_t *)(uintptr_t)(uint32_t)addr;
}

WS_EXPORT("fill_then_trap") void fill_then_trap(float *p, int32_t n, int32_t trap_after) {
    volatile float *out = p;
    for (int32_t i = 0; i < n; i++) {
        if (i == trap_after) {
            __builtin_trap();
        }
        out[i] = 1.0f;
    }
}
