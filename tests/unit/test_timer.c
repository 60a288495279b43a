/* tests/unit/test_timer.c - the intrusive timer heap (io/timer.h), checked
 * against a brute-force reference: the armed timer with the smallest
 * (deadline, arming order) must always be the one popped. */
#include <criterion/criterion.h>
#include <stdlib.h>

#include "io/timer.h"

#define N 2000

static void noop(struct timer *t)
{
    (void)t;
}

/* Reference minimum by linear scan. */
static struct timer *ref_min(struct timer *ts, size_t n)
{
    struct timer *m = NULL;

    for (size_t i = 0; i < n; i++) {
        struct timer *t = &ts[i];
        if (t->armed && (m == NULL || t->when < m->when || (t->when == m->when && t->seq < m->seq)))
            m = t;
    }
    return m;
}

/* Walk the tree: parent links consistent, heap order holds, count right. */
static size_t check_tree(const struct timer *t, const struct timer *parent)
{
    if (t == NULL)
        return 0;
    cr_assert_eq(t->parent, parent);
    cr_assert(t->armed);
    if (parent != NULL)
        cr_assert(parent->when < t->when || (parent->when == t->when && parent->seq < t->seq));
    return 1 + check_tree(t->left, t) + check_tree(t->right, t);
}

static size_t armed_count(const struct timer *ts, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ts[i].armed;
    return c;
}

Test(timer, empty_heap)
{
    struct timer_heap h;

    timer_heap_init(&h);
    cr_assert_null(timer_heap_min(&h));
    cr_assert_null(timer_heap_pop(&h, UINT64_MAX, UINT64_MAX));
    cr_assert_eq(h.n, 0);
}

Test(timer, single_add_del_readd)
{
    struct timer_heap h;
    struct timer t;

    timer_heap_init(&h);
    timer_init(&t, noop);
    cr_assert_not(timer_armed(&t));
    timer_heap_del(&h, &t); /* disarmed: no-op */
    cr_assert_eq(h.n, 0);
    timer_heap_add(&h, &t, 100);
    cr_assert(timer_armed(&t));
    cr_assert_eq(timer_heap_min(&h), &t);
    cr_assert_null(timer_heap_pop(&h, 99, UINT64_MAX));
    cr_assert_eq(timer_heap_pop(&h, 100, UINT64_MAX), &t);
    cr_assert_not(timer_armed(&t));
    cr_assert_eq(h.n, 0);
    timer_heap_add(&h, &t, 5);
    timer_heap_add(&h, &t, 7); /* re-arm moves it */
    cr_assert_eq(h.n, 1);
    cr_assert_eq(t.when, 7);
    timer_heap_del(&h, &t);
    cr_assert_eq(h.n, 0);
    cr_assert_null(h.root);
}

Test(timer, equal_deadlines_fire_fifo)
{
    struct timer_heap h;
    struct timer ts[64];

    timer_heap_init(&h);
    for (int i = 0; i < 64; i++) {
        timer_init(&ts[i], noop);
        timer_heap_add(&h, &ts[i], 42);
    }
    for (int i = 0; i < 64; i++)
        cr_assert_eq(timer_heap_pop(&h, 42, UINT64_MAX), &ts[i], "pop %d", i);
    cr_assert_eq(h.n, 0);
}

Test(timer, rearm_goes_behind_equal_deadline)
{
    struct timer_heap h;
    struct timer a, b;

    timer_heap_init(&h);
    timer_init(&a, noop);
    timer_init(&b, noop);
    timer_heap_add(&h, &a, 10);
    timer_heap_add(&h, &b, 10);
    timer_heap_add(&h, &a, 10); /* re-armed: now after b */
    cr_assert_eq(timer_heap_pop(&h, 10, UINT64_MAX), &b);
    cr_assert_eq(timer_heap_pop(&h, 10, UINT64_MAX), &a);
}

Test(timer, pop_respects_seq_limit)
{
    struct timer_heap h;
    struct timer a, b;
    uint64_t limit;

    timer_heap_init(&h);
    timer_init(&a, noop);
    timer_init(&b, noop);
    timer_heap_add(&h, &a, 5);
    limit = timer_heap_seq(&h);
    timer_heap_add(&h, &b, 5); /* armed "during the pass" */
    cr_assert_eq(timer_heap_pop(&h, 5, limit), &a);
    cr_assert_null(timer_heap_pop(&h, 5, limit));
    cr_assert_eq(timer_heap_pop(&h, 5, timer_heap_seq(&h)), &b);
}

/* Random adds, re-arms, deletes and pops against the reference. */
Test(timer, random_against_reference)
{
    struct timer_heap h;
    struct timer *ts = calloc(N, sizeof(*ts));
    size_t pops = 0, dels = 0;

    cr_assert_not_null(ts);
    srand(12345);
    timer_heap_init(&h);
    for (int i = 0; i < N; i++)
        timer_init(&ts[i], noop);
    for (int step = 0; step < 50000; step++) {
        int r = rand() % 10;
        struct timer *t = &ts[rand() % N];
        if (r < 5) {
            timer_heap_add(&h, t, (uint64_t)(rand() % 500));
        } else if (r < 7) {
            dels += t->armed;
            timer_heap_del(&h, t);
            cr_assert_not(t->armed);
        } else {
            struct timer *want = ref_min(ts, N);
            struct timer *got = timer_heap_pop(&h, UINT64_MAX, UINT64_MAX);
            cr_assert_eq(got, want, "step %d", step);
            pops += got != NULL;
        }
        cr_assert_eq(h.n, armed_count(ts, N), "step %d", step);
        if (step % 997 == 0)
            cr_assert_eq(check_tree(h.root, NULL), h.n);
    }
    cr_assert_gt(pops, 1000);
    cr_assert_gt(dels, 1000);
    /* Drain: strictly ordered. */
    uint64_t last_when = 0, last_seq = 0;
    struct timer *t;
    bool first = true;
    while ((t = timer_heap_pop(&h, UINT64_MAX, UINT64_MAX)) != NULL) {
        if (!first)
            cr_assert(t->when > last_when || (t->when == last_when && t->seq > last_seq));
        first = false;
        last_when = t->when;
        last_seq = t->seq;
    }
    cr_assert_eq(h.n, 0);
    cr_assert_eq(armed_count(ts, N), 0);
    free(ts);
}

/* Deleting every node position (root, inner, leaf, last) keeps the shape. */
Test(timer, delete_each_position)
{
    for (int victim = 0; victim < 31; victim++) {
        struct timer_heap h;
        struct timer ts[31];

        timer_heap_init(&h);
        for (int i = 0; i < 31; i++) {
            timer_init(&ts[i], noop);
            timer_heap_add(&h, &ts[i], (uint64_t)(31 - i) * 3 % 17);
        }
        timer_heap_del(&h, &ts[victim]);
        cr_assert_eq(check_tree(h.root, NULL), 30);
        for (int i = 0; i < 30; i++) {
            struct timer *want = ref_min(ts, 31);
            cr_assert_eq(timer_heap_pop(&h, UINT64_MAX, UINT64_MAX), want);
        }
        cr_assert_null(h.root);
    }
}

Test(timer, clock_is_monotonic)
{
    uint64_t a = timer_clock_ms(), b = timer_clock_ms();
    cr_assert_geq(b, a);
}
