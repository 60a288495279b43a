/* io/mbox.c - see mbox.h.
 *
 * Single consumer, so the lock-free __cds_wfcq_* dequeue variants are used
 * without the queue mutex. The non-blocking dequeue is used because the
 * blocking one spins (then sleeps) while a producer sits between its tail
 * exchange and its link store; on an event loop we would rather wake
 * ourselves and come back next turn.
 */
#include "io/mbox.h"

#include <errno.h>
#include <sys/eventfd.h>
#include <unistd.h>

static void wake(struct mbox *mb)
{
    uint64_t one = 1;

    /* Cannot fail short of a counter near 2^64; a lost wake would only
     * delay delivery to the next post. */
    if (write(mb->efd, &one, sizeof(one)) < 0) {
        /* nothing useful to do */
    }
}

/* Run up to MBOX_BATCH messages; wake ourselves if more are (or may be)
 * waiting. */
static void drain(struct mbox *mb)
{
    for (int i = 0; i < MBOX_BATCH; i++) {
        struct cds_wfcq_node *node = __cds_wfcq_dequeue_nonblocking(&mb->head, &mb->tail);
        struct mbox_msg *msg;

        if (node == NULL)
            return;
        if (node == CDS_WFCQ_WOULDBLOCK) {
            wake(mb); /* a producer is mid-enqueue: retry next turn */
            return;
        }
        msg = caa_container_of(node, struct mbox_msg, node);
        mb->delivered++;
        msg->fn(msg);
    }
    if (!cds_wfcq_empty(&mb->head, &mb->tail))
        wake(mb);
}

static void on_wake(struct eng_op *op, int res)
{
    struct mbox *mb = caa_container_of(op, struct mbox, op);

    /* An eventfd read fails only when cancelled or when the fd is gone
     * (teardown): re-arming would then fail again every turn. */
    if (res < 0)
        return;
    mb->wakeups++;
    drain(mb);
    eng_read(mb->eng, &mb->op, mb->efd, &mb->count, sizeof(mb->count));
}

int mbox_init(struct mbox *mb, struct eng *e)
{
    __cds_wfcq_init(&mb->head, &mb->tail);
    mb->eng = e;
    mb->delivered = mb->wakeups = 0;
    mb->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (mb->efd < 0)
        return -errno;
    eng_op_init(&mb->op, on_wake);
    eng_read(e, &mb->op, mb->efd, &mb->count, sizeof(mb->count));
    return 0;
}

void mbox_post(struct mbox *mb, struct mbox_msg *msg, mbox_fn *fn)
{
    msg->fn = fn;
    cds_wfcq_node_init(&msg->node);
    /* false: the queue was empty, so the owner may be asleep. */
    if (!cds_wfcq_enqueue(&mb->head, &mb->tail, &msg->node))
        wake(mb);
}

size_t mbox_fini(struct mbox *mb, mbox_fn *drop)
{
    struct cds_wfcq_node *node;
    size_t n = 0;

    if (mb->efd >= 0)
        close(mb->efd);
    mb->efd = -1;
    /* Producers are done, so the blocking variant never waits here. */
    while ((node = __cds_wfcq_dequeue_blocking(&mb->head, &mb->tail)) != NULL) {
        struct mbox_msg *msg = caa_container_of(node, struct mbox_msg, node);
        n++;
        (drop != NULL ? drop : msg->fn)(msg);
    }
    return n;
}
