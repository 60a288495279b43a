/* tests/unit/test_mbox.c - the cross-shard mailbox (io/mbox.h), run on
 * both engines: exactly-once delivery, per-producer order, delivery on
 * the owner thread, wakeup coalescing, batching, and teardown. */
#include <criterion/criterion.h>
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"
#include "io/eng.h"
#include "io/mbox.h"

#define TEST_TIMEOUT 20

/* eng_new() logs the engine it picks at info level: keep test output to
 * warnings and errors. */
static void quiet(void)
{
    log_setup(LOG_WARN, LOG_LOGFMT, NULL);
}

TestSuite(mbox_uring, .init = quiet);
TestSuite(mbox_epoll, .init = quiet);

static enum eng_kind need(enum eng_kind k)
{
    char err[256];
    struct eng *e;

    if (k != ENG_URING)
        return k;
    e = eng_new(ENG_URING, err, sizeof(err));
    if (e == NULL)
        cr_skip_test("io_uring unavailable here: %s", err);
    eng_free(e);
    return k;
}

#define ENG_TEST(name)                                                              \
    static void name##_body(enum eng_kind kind);                                    \
    Test(mbox_uring, name, .timeout = TEST_TIMEOUT) { name##_body(need(ENG_URING)); } \
    Test(mbox_epoll, name, .timeout = TEST_TIMEOUT) { name##_body(ENG_EPOLL); }      \
    static void name##_body(enum eng_kind kind)

static struct eng *mk(enum eng_kind kind)
{
    char err[256];
    struct eng *e = eng_new(kind, err, sizeof(err));

    cr_assert_not_null(e, "eng_new: %s", err);
    return e;
}

#define MAXP 4

struct ctx;

struct tmsg {
    struct mbox_msg m;
    struct ctx *c;
    int producer;
    int seq;
};

struct ctx {
    struct mbox mb;
    struct eng *e;
    pthread_t owner;
    int nprod, per;
    struct tmsg *msgs[MAXP];
    uint8_t *seen[MAXP];
    int next[MAXP];
    long delivered, total;
    long wrong_thread, out_of_order, dup;
    int dropped[8], ndropped;
    bool done;
};

static void on_msg(struct mbox_msg *m)
{
    struct tmsg *t = caa_container_of(m, struct tmsg, m);
    struct ctx *c = t->c;

    if (!pthread_equal(pthread_self(), c->owner))
        c->wrong_thread++;
    if (t->seq != c->next[t->producer])
        c->out_of_order++;
    c->next[t->producer] = t->seq + 1;
    if (c->seen[t->producer][t->seq]++)
        c->dup++;
    if (++c->delivered == c->total)
        c->done = true;
}

struct prod {
    struct ctx *c;
    int id;
};

static void *producer(void *arg)
{
    struct prod *p = arg;
    struct ctx *c = p->c;

    for (int i = 0; i < c->per; i++)
        mbox_post(&c->mb, &c->msgs[p->id][i].m, on_msg);
    return NULL;
}

static struct ctx *ctx_new(enum eng_kind kind, int nprod, int per)
{
    struct ctx *c = calloc(1, sizeof(*c));

    cr_assert_not_null(c);
    c->e = mk(kind);
    c->owner = pthread_self();
    c->nprod = nprod;
    c->per = per;
    c->total = (long)nprod * per;
    for (int p = 0; p < nprod; p++) {
        c->msgs[p] = calloc((size_t)per, sizeof(struct tmsg));
        c->seen[p] = calloc((size_t)per, 1);
        cr_assert(c->msgs[p] != NULL && c->seen[p] != NULL);
        for (int i = 0; i < per; i++)
            c->msgs[p][i] = (struct tmsg){ .c = c, .producer = p, .seq = i };
    }
    cr_assert_eq(mbox_init(&c->mb, c->e), 0);
    return c;
}

static void ctx_free(struct ctx *c)
{
    eng_free(c->e);
    cr_assert_eq(mbox_fini(&c->mb, NULL), 0);
    for (int p = 0; p < c->nprod; p++) {
        free(c->msgs[p]);
        free(c->seen[p]);
    }
    free(c);
}

static void run_producers(struct ctx *c)
{
    pthread_t th[MAXP];
    struct prod ps[MAXP];

    for (int p = 0; p < c->nprod; p++) {
        ps[p] = (struct prod){ c, p };
        cr_assert_eq(pthread_create(&th[p], NULL, producer, &ps[p]), 0);
    }
    for (uint64_t end = timer_clock_ms() + 15000; !c->done && timer_clock_ms() < end;)
        cr_assert_geq(eng_run_once(c->e, 50), 0);
    for (int p = 0; p < c->nprod; p++)
        pthread_join(th[p], NULL);
}

static void check_all(struct ctx *c)
{
    cr_assert_eq(c->delivered, c->total);
    cr_assert_eq(c->wrong_thread, 0);
    cr_assert_eq(c->out_of_order, 0);
    cr_assert_eq(c->dup, 0);
    for (int p = 0; p < c->nprod; p++) {
        cr_assert_eq(c->next[p], c->per);
        for (int i = 0; i < c->per; i++)
            cr_assert_eq(c->seen[p][i], 1, "producer %d message %d", p, i);
    }
    cr_assert_eq(c->mb.delivered, (uint64_t)c->total);
}

ENG_TEST(one_producer_100k)
{
    struct ctx *c = ctx_new(kind, 1, 100000);

    run_producers(c);
    check_all(c);
    /* Coalesced: far fewer wakeups than messages. */
    cr_assert_lt(c->mb.wakeups, 100000);
    ctx_free(c);
}

ENG_TEST(four_producers_order_per_producer)
{
    struct ctx *c = ctx_new(kind, 4, 25000);

    run_producers(c);
    check_all(c);
    ctx_free(c);
}

/* Posted before the loop runs: one eventfd write, one wakeup. */
ENG_TEST(burst_costs_one_wakeup)
{
    struct ctx *c = ctx_new(kind, 1, 1000);

    for (int i = 0; i < 1000; i++)
        mbox_post(&c->mb, &c->msgs[0][i].m, on_msg);
    for (uint64_t end = timer_clock_ms() + 3000; !c->done && timer_clock_ms() < end;)
        eng_run_once(c->e, 50);
    check_all(c);
    cr_assert_eq(c->mb.wakeups, 1);
    ctx_free(c);
}

/* More than MBOX_BATCH queued: spread over turns, still all in order. */
ENG_TEST(batches_over_several_turns)
{
    struct ctx *c = ctx_new(kind, 1, 5 * MBOX_BATCH + 3);
    int turns_with_msgs = 0;

    for (int i = 0; i < c->per; i++)
        mbox_post(&c->mb, &c->msgs[0][i].m, on_msg);
    for (uint64_t end = timer_clock_ms() + 3000; !c->done && timer_clock_ms() < end;) {
        long before = c->delivered;
        eng_run_once(c->e, 50);
        cr_assert_leq(c->delivered - before, MBOX_BATCH);
        turns_with_msgs += c->delivered > before;
    }
    check_all(c);
    cr_assert_eq(turns_with_msgs, 6);
    ctx_free(c);
}

/* The owner may post to itself (e.g. from a callback). */
struct selfpost {
    struct mbox_msg m;
    struct mbox *mb;
    int left;
    int *runs;
};

static void self_fn(struct mbox_msg *m)
{
    struct selfpost *s = caa_container_of(m, struct selfpost, m);

    (*s->runs)++;
    if (s->left-- > 0)
        mbox_post(s->mb, &s->m, self_fn); /* reuse: we own it again */
}

ENG_TEST(owner_posts_to_itself)
{
    struct eng *e = mk(kind);
    struct mbox mb;
    int runs = 0;
    struct selfpost s = { .mb = &mb, .left = 9, .runs = &runs };

    cr_assert_eq(mbox_init(&mb, e), 0);
    mbox_post(&mb, &s.m, self_fn);
    for (uint64_t end = timer_clock_ms() + 3000; runs < 10 && timer_clock_ms() < end;)
        eng_run_once(e, 50);
    cr_assert_eq(runs, 10);
    eng_free(e);
    cr_assert_eq(mbox_fini(&mb, NULL), 0);
}

/* Teardown hands leftovers to drop, in order, and nothing runs twice. */
static void drop_fn(struct mbox_msg *m)
{
    struct tmsg *t = caa_container_of(m, struct tmsg, m);
    t->c->dropped[t->c->ndropped++] = t->seq;
}

ENG_TEST(fini_drops_leftovers_in_order)
{
    struct ctx *c = ctx_new(kind, 1, 5);

    for (int i = 0; i < 5; i++)
        mbox_post(&c->mb, &c->msgs[0][i].m, on_msg);
    eng_free(c->e);
    c->e = NULL;
    cr_assert_eq(mbox_fini(&c->mb, drop_fn), 5);
    cr_assert_eq(c->ndropped, 5);
    for (int i = 0; i < 5; i++)
        cr_assert_eq(c->dropped[i], i);
    cr_assert_eq(c->delivered, 0);
    free(c->msgs[0]);
    free(c->seen[0]);
    free(c);
}
