/* io/mbox.h - cross-shard mailbox: many producers, one owner shard.
 *
 * Any thread posts a message; the shard that owns the mailbox runs the
 * message's callback on its own thread, from its engine loop. The queue is
 * liburcu's wait-free concurrent queue (cds_wfcq): posting is wait-free
 * and never blocks nor allocates. The owner is woken through an eventfd
 * that its engine keeps a read armed on (eng_read); a post writes the
 * eventfd only when it finds the queue empty, so a burst costs one wakeup.
 *
 * Messages are caller-allocated structs with an embedded struct mbox_msg.
 * Ownership moves with the message: mbox_post() hands it to the owner
 * shard, and the callback owns it from then on (frees it, reuses it,
 * closes the fd it carries...). The poster must not touch it after
 * posting. Order: messages from one producer thread run in the order they
 * were posted; there is no order between producers.
 *
 * At most MBOX_BATCH messages run per wakeup, so a flood cannot starve the
 * shard's sockets; the rest runs in the next turns.
 *
 * Lifetime: mbox_init() and mbox_fini() on the owner thread. mbox_fini()
 * comes after eng_free() of the owner engine (which abandons the eventfd
 * read; see eng_free) and after every producer has stopped posting.
 *
 * A later improvement: on io_uring, IORING_OP_MSG_RING from a producer's
 * own ring would replace the eventfd write; the queue stays the same.
 */
#ifndef IO_MBOX_H
#define IO_MBOX_H

#include <stdint.h>

#include <urcu/wfcqueue.h>

#include "io/eng.h"

#define MBOX_BATCH 1024

struct mbox_msg;

/* Runs on the owner shard's thread; owns msg. */
typedef void mbox_fn(struct mbox_msg *msg);

struct mbox_msg {
    struct cds_wfcq_node node; /* private */
    mbox_fn *fn;               /* set by mbox_post */
};

struct mbox {
    /* consumer side */
    struct __cds_wfcq_head head;
    struct eng *eng;
    struct eng_op op;
    uint64_t count;     /* eventfd read buffer */
    uint64_t delivered; /* messages run (owner's counter) */
    uint64_t wakeups;   /* eventfd reads completed */
    int efd;
    /* producer side, on its own cache line */
    struct cds_wfcq_tail tail __attribute__((aligned(64)));
};

/* Create the eventfd and arm its read on engine e (whose thread owns the
 * mailbox). Returns 0 or -errno. */
int mbox_init(struct mbox *mb, struct eng *e);

/* Any thread: queue msg; fn(msg) will run on the owner thread. Takes
 * ownership of msg. Never blocks, never fails. */
void mbox_post(struct mbox *mb, struct mbox_msg *msg, mbox_fn *fn);

/* After eng_free() and once producers have stopped: close the eventfd and
 * hand every message still queued to drop (its own fn when drop is NULL),
 * in queue order, on the calling thread. Returns how many there were. */
size_t mbox_fini(struct mbox *mb, mbox_fn *drop);

#endif
