/*
 * bias.c - a sparse logit-bias controller, and float kernels for benchmarks.
 *
 *   bias_update(bias, n, step)  writes 64 entries of bias[0..n), returns 64
 *                               (0 if n <= 0).  Entry i (0 <= i < 64):
 *                                 index = ((uint32)step * 7919 + i * 104729) % n
 *                                 value = (float)(step + i) * 0.5f
 *                               computed in 64-bit unsigned arithmetic, so for
 *                               step >= 0 it is (step*7919 + i*104729) % n.
 *                               Later entries win when indices collide (only
 *                               possible for n <= 64 or n sharing a factor
 *                               with 104729, which is prime).
 *   sum_f32(p, n)               p[0] + ... + p[n-1], added in order in float32
 *   scale_f32(p, n, k)          p[i] *= k for i < n, in place
 *   own_buffer(nbytes)          address of a guest-owned buffer of at least
 *                               nbytes (memory grown once, reused while big
 *                               enough; grown again for a bigger request);
 *                               0 on failure or nbytes < 0.  For the copy
 *                               baseline: the host copies into it.
 *
 * The pointer arguments are loans (or own_buffer memory) passed as
 * (pointer, length-in-elements).
 */
#include "wasmshare.h"

#define BIAS_ENTRIES 64

WS_EXPORT("bias_update") int32_t bias_update(float *bias, int32_t n, int32_t step) {
    if (n <= 0) {
        return 0;
    }
    uint64_t base = (uint64_t)(uint32_t)step * 7919u;
    for (int32_t i = 0; i < BIAS_ENTRIES; i++) {
        uint64_t index = (base + (uint64_t)i * 104729u) % (uint64_t)(uint32_t)n;
        bias[index] = (float)(int32_t)((uint32_t)step + (uint32_t)i) * 0.5f;
    }
    return BIAS_ENTRIES;
}

WS_EXPORT("sum_f32") float sum_f32(const float *p, int32_t n) {
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        sum += p[i];
    }
    return sum;
}

WS_EXPORT("scale_f32") void scale_f32(float *p, int32_t n, float k) {
    for (int32_t i = 0; i < n; i++) {
        p[i] *= k;
    }
}

static uint8_t *own_ptr = NULL;
static uint32_t own_capacity = 0;

WS_EXPORT("own_buffer") int32_t own_buffer(int32_t nbytes) {
    if (nbytes < 0) {
        return 0;
    }
    uint32_t want = nbytes == 0 ? 1u : (uint32_t)nbytes;
    if (own_ptr == NULL || want > own_capacity) {
        /* The old block is not reused: blocks from memory.grow cannot be freed. */
        uint8_t *block = (uint8_t *)ws_grow_block((int32_t)want);
        if (block == NULL) {
            return 0;
        }
        own_ptr = block;
        own_capacity = (want + (WS_PAGE_SIZE - 1u)) / WS_PAGE_SIZE * WS_PAGE_SIZE;
    }
    return (int32_t)(uintptr_t)own_ptr;
}
