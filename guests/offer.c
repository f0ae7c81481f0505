/*
 * offer.c - a guest that chooses where the host places loans.
 *
 *   ws_loan_alloc(nbytes)  64 KiB-aligned block of nbytes rounded up to
 *                          64 KiB: a freed block that is big enough (first
 *                          fit), else fresh pages from memory.grow; 0 on
 *                          failure or nbytes <= 0.
 *   ws_loan_free(addr)     marks a block from ws_loan_alloc free for reuse;
 *                          unknown addresses are ignored.
 *   checksum_u8(p, n)      sum of the n bytes at p, modulo 2^32, as int32.
 *
 * Blocks are tracked in a fixed table (no allocation in the hot path); once
 * it is full, further blocks are still handed out but never reused.
 */
#include "wasmshare.h"

#define MAX_BLOCKS 64

typedef struct {
    uint32_t addr;  /* 0: empty slot */
    uint32_t pages;
    bool in_use;
} block_t;

static block_t blocks[MAX_BLOCKS];

int32_t ws_loan_alloc(int32_t nbytes) {
    if (nbytes <= 0) {
        return 0;
    }
    uint32_t pages = ((uint32_t)nbytes + (WS_PAGE_SIZE - 1u)) / WS_PAGE_SIZE;
    for (int32_t i = 0; i < MAX_BLOCKS; i++) {
        if (blocks[i].addr != 0 && !blocks[i].in_use && blocks[i].pages >= pages) {
            blocks[i].in_use = true;
            return (int32_t)blocks[i].addr;
        }
    }
    void *fresh = ws_grow_block(nbytes);
    if (fresh == NULL) {
        return 0;
    }
    uint32_t addr = (uint32_t)(uintptr_t)fresh;
    for (int32_t i = 0; i < MAX_BLOCKS; i++) {
        if (blocks[i].addr == 0) {
            blocks[i] = (block_t){.addr = addr, .pages = pages, .in_use = true};
            break;
        }
    }
    return (int32_t)addr;
}

void ws_loan_free(int32_t addr) {
    for (int32_t i = 0; i < MAX_BLOCKS; i++) {
        if (blocks[i].addr == (uint32_t)addr && blocks[i].in_use) {
            blocks[i].in_use = false;
            return;
        }
    }
}

WS_EXPORT("checksum_u8") int32_t checksum_u8(const uint8_t *p, int32_t n) {
    uint32_t sum = 0;
    for (int32_t i = 0; i < n; i++) {
        sum += p[i];
    }
    return (int32_t)sum;
}
