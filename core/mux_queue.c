/* core/mux_queue.c - a channel's incoming byte queue, see mux_queue.h. */
#include "core/mux_queue.h"

#include <stdlib.h>
#include <string.h>

/* 64 KiB allocations, header included: a jemalloc size class. */
#define CHUNK_ALLOC (64u << 10)
/* Spare chunks kept per pool. */
#define POOL_MAX 8

struct mux_chunk {
    struct mux_chunk *next;
    size_t head, tail, cap;       /* unwritten bytes are data[head..tail) */
    uint8_t data[];
};

#define CHUNK_CAP (CHUNK_ALLOC - sizeof(struct mux_chunk))
/* 4 KiB allocations for a small append to an empty queue: a jemalloc
 * small class served from the thread cache, where a 64 KiB one is a large
 * allocation (arena lock, extent) whenever the pool has none to spare. */
#define SMALL_ALLOC 4096u
#define SMALL_CAP (SMALL_ALLOC - sizeof(struct mux_chunk))

size_t mux_queue_chunk_cap(void)
{
    return CHUNK_CAP;
}

size_t mux_queue_small_cap(void)
{
    return SMALL_CAP;
}

/* A chunk of at least min bytes; a small one when fits (the bytes to
 * append to an empty queue) is small too. */
static struct mux_chunk *chunk_get(struct mux_queue_pool *p, size_t min, size_t fits)
{
    size_t cap = min > CHUNK_CAP ? min : CHUNK_CAP;
    struct mux_chunk *k;

    if (min <= SMALL_CAP && fits <= SMALL_CAP)
        cap = SMALL_CAP;

    p->used = true;
    if (cap == CHUNK_CAP && p->free != NULL) {
        k = p->free;
        p->free = k->next;
        p->nfree--;
    } else {
        k = malloc(sizeof(*k) + cap);
        if (k == NULL)
            return NULL;
        k->cap = cap;
    }
    k->next = NULL;
    k->head = k->tail = 0;
    return k;
}

static void chunk_put(struct mux_queue_pool *p, struct mux_chunk *k)
{
    if (k->cap == CHUNK_CAP && p->nfree < POOL_MAX) {
        k->next = p->free;
        p->free = k;
        p->nfree++;
        return;
    }
    free(k);
}

int mux_queue_append(struct mux_queue *q, struct mux_queue_pool *p, const uint8_t *data,
                     size_t len, size_t contig)
{
    while (len > 0) {
        struct mux_chunk *k = q->tail;
        size_t take;

        if (k == NULL || k->tail == k->cap) {
            k = chunk_get(p, q->head == NULL ? contig : 0, q->head == NULL ? len : SIZE_MAX);
            if (k == NULL)
                return -1;
            if (q->tail != NULL)
                q->tail->next = k;
            else
                q->head = k;
            q->tail = k;
        }
        take = k->cap - k->tail;
        if (take > len)
            take = len;
        memcpy(k->data + k->tail, data, take);
        k->tail += take;
        q->bytes += take;
        p->bytes += take;
        data += take;
        len -= take;
    }
    return 0;
}

int mux_queue_iov(const struct mux_queue *q, struct iovec *iov, int max)
{
    const struct mux_chunk *k;
    int n = 0;

    for (k = q->head; k != NULL && n < max; k = k->next) {
        if (k->tail > k->head)
            iov[n++] = (struct iovec){ (void *)(k->data + k->head), k->tail - k->head };
    }
    return n;
}

void mux_queue_consume(struct mux_queue *q, struct mux_queue_pool *p, size_t n)
{
    while (n > 0 && q->head != NULL) {
        struct mux_chunk *k = q->head;
        size_t take = k->tail - k->head;

        if (take > n)
            take = n;
        k->head += take;
        q->bytes -= take;
        p->bytes -= take;
        n -= take;
        if (k->head == k->tail) {
            q->head = k->next;
            if (q->head == NULL)
                q->tail = NULL;
            chunk_put(p, k);
        }
    }
}

void mux_queue_clear(struct mux_queue *q, struct mux_queue_pool *p)
{
    while (q->head != NULL) {
        struct mux_chunk *k = q->head;

        q->head = k->next;
        chunk_put(p, k);
    }
    q->tail = NULL;
    p->bytes -= q->bytes;
    q->bytes = 0;
}

const uint8_t *mux_queue_peek(const struct mux_queue *q, size_t *n)
{
    if (q->head == NULL) {
        *n = 0;
        return NULL;
    }
    *n = q->head->tail - q->head->head;
    return q->head->data + q->head->head;
}

void mux_queue_pool_trim(struct mux_queue_pool *p)
{
    while (p->free != NULL) {
        struct mux_chunk *k = p->free;

        p->free = k->next;
        free(k);
    }
    p->nfree = 0;
}

void mux_queue_pool_tick(struct mux_queue_pool *p)
{
    if (!p->used)
        mux_queue_pool_trim(p);
    p->used = false;
}
