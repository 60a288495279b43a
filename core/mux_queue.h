/* core/mux_queue.h - a channel's incoming byte queue (part of core/mux).
 *
 * DATA received from the tunnel is copied into a list of chunks until the
 * local socket takes it:
 *
 *   head -> [ ..written.. | unwritten | ] -> [ unwritten | free ] <- tail
 *            0           head       tail cap
 *
 * Chunks are 64 KiB allocations (a jemalloc size class) taken from a small
 * per-tunnel pool, so a busy channel does not malloc per frame; an append
 * of at most mux_queue_small_cap() bytes to an empty queue (a keep-alive
 * request, an ack) takes a 4 KiB chunk instead, from the allocator's
 * thread cache, never pooled. A chunk
 * leaves the queue when all its bytes are consumed. When a queue is empty,
 * an append may ask for a first chunk of at least `contig` bytes, so that
 * a whole first frame stays contiguous (mux_chan_peek); such big chunks
 * are freed rather than pooled.
 *
 * Ownership: the queue owns its chunks; mux_queue_iov() lends their bytes
 * to one send, and nothing may consume or clear the queue while that send
 * is in flight (appending is fine: it only writes past every tail). The
 * all-zero struct mux_queue and struct mux_queue_pool are valid and empty.
 * Single-threaded, like the mux that embeds them.
 */
#ifndef CORE_MUX_QUEUE_H
#define CORE_MUX_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct mux_chunk;

struct mux_queue {
    struct mux_chunk *head, *tail;
    size_t bytes;                 /* unwritten bytes in the queue */
};

/* Spare standard chunks, shared by the channels of one tunnel, and the
 * unwritten bytes of all the queues that use it (the tunnel's total). */
struct mux_queue_pool {
    struct mux_chunk *free;
    size_t nfree;
    size_t bytes;                 /* sum of bytes of every queue on the pool */
    bool used;                    /* a chunk was taken since the last tick */
};

/* Bytes of data one standard chunk holds; one small chunk. */
size_t mux_queue_chunk_cap(void);
size_t mux_queue_small_cap(void);

/* Copy data[0..len) to the end of q. contig: when q is empty, its first
 * chunk holds at least that many bytes (0: standard size). Returns 0, or
 * -1 when out of memory (q then holds a prefix of the data). */
int mux_queue_append(struct mux_queue *q, struct mux_queue_pool *p, const uint8_t *data,
                     size_t len, size_t contig);

/* Fill iov[0..max) with the unwritten runs from the head; returns the
 * count (0 when q is empty). The bytes are lent until consumed. */
int mux_queue_iov(const struct mux_queue *q, struct iovec *iov, int max);

/* n (<= bytes) bytes from the head were written: drop them, returning
 * emptied chunks to the pool. */
void mux_queue_consume(struct mux_queue *q, struct mux_queue_pool *p, size_t n);

/* Drop everything. */
void mux_queue_clear(struct mux_queue *q, struct mux_queue_pool *p);

/* The contiguous run at the head (NULL and *n = 0 when empty). */
const uint8_t *mux_queue_peek(const struct mux_queue *q, size_t *n);

/* Free the spare chunks now (teardown), or only when none was taken since
 * the previous call (periodic, so an idle tunnel gives its memory back). */
void mux_queue_pool_trim(struct mux_queue_pool *p);
void mux_queue_pool_tick(struct mux_queue_pool *p);

#endif
