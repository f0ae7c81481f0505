/*
 * borrow_sum.c - borrows regions the host offered under a handle.
 *
 *   borrow_sum(handle)         borrows the region read-only, sums its floats
 *                              in order in float32, releases it and returns
 *                              the sum; NaN on failure (bad handle, refused).
 *   borrow_fill(handle, value) borrows it read-write, sets every float to
 *                              value, releases it and returns the number of
 *                              floats written, or a negative WS_ERR_* code.
 *
 * Trailing bytes of a region whose size is not a multiple of 4 are ignored.
 */
#include "wasmshare.h"

WS_EXPORT("borrow_sum") float borrow_sum(int32_t handle) {
    int32_t count = 0;
    const float *p = ws_borrow_f32(handle, WS_ACCESS_RO, &count);
    if (p == NULL) {
        return __builtin_nanf("");
    }
    float sum = 0.0f;
    for (int32_t i = 0; i < count; i++) {
        sum += p[i];
    }
    ws_release(handle);
    return sum;
}

WS_EXPORT("borrow_fill") int32_t borrow_fill(int32_t handle, float value) {
    int32_t count = 0;
    float *p = ws_borrow_f32(handle, WS_ACCESS_RW, &count);
    if (p == NULL) {
        return count < 0 ? count : WS_ERR_FAILED;
    }
    for (int32_t i = 0; i < count; i++) {
        p[i] = value;
    }
    int32_t status = ws_release(handle);
    return status < 0 ? status : count;
}
