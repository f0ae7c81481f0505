/*
 * calls.c - the smallest exports, for the call-overhead benchmark.
 *
 *   nop()              does nothing
 *   add(a, b)          a + b (wrapping)
 *   add4(a, b, c, d)   a + b + c + d (wrapping)
 */
#include "wasmshare.h"

WS_EXPORT("nop") void nop(void) {}

WS_EXPORT("add") int32_t add(int32_t a, int32_t b) {
    return (int32_t)((uint32_t)a + (uint32_t)b);
}

WS_EXPORT("add4") int32_t add4(int32_t a, int32_t b, int32_t c, int32_t d) {
    return (int32_t)((uint32_t)a + (uint32_t)b + (uint32_t)c + (uint32_t)d);
}
