/* io/timer.c - see timer.h.
 *
 * Shape of the heap: a complete binary tree linked through left/right/
 * parent. Slot k (1-based, root = 1) has children 2k and 2k+1, so the bits
 * of k below its leading one, read from the top, are the left(0)/right(1)
 * turns from the root to slot k. Insertion appends at slot n+1 and sifts
 * up; deletion moves the node at slot n into the hole and sifts it down,
 * then up.
 */
#include "io/timer.h"

#include <time.h>

uint64_t timer_clock_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

void timer_init(struct timer *t, timer_fn *cb)
{
    *t = (struct timer){ .cb = cb };
}

void timer_heap_init(struct timer_heap *h)
{
    *h = (struct timer_heap){ 0 };
}

static bool before(const struct timer *a, const struct timer *b)
{
    return a->when < b->when || (a->when == b->when && a->seq < b->seq);
}

/* The link that points at slot k (the root pointer for k == 1). */
static struct timer **slot_link(struct timer_heap *h, size_t k)
{
    struct timer **link = &h->root;
    int depth = 0;

    for (size_t x = k; x > 1; x >>= 1)
        depth++;
    while (depth-- > 0)
        link = (k >> depth) & 1 ? &(*link)->right : &(*link)->left;
    return link;
}

/* The link in p's parent (or the root pointer) that points at p. */
static struct timer **parent_link(struct timer_heap *h, struct timer *p)
{
    if (p->parent == NULL)
        return &h->root;
    return p->parent->left == p ? &p->parent->left : &p->parent->right;
}

/* Exchange a parent p with its child c: c takes p's place and vice versa. */
static void swap_up(struct timer_heap *h, struct timer *p, struct timer *c)
{
    struct timer **up = parent_link(h, p);
    struct timer *pl = p->left, *pr = p->right;
    struct timer *cl = c->left, *cr = c->right;

    *up = c;
    c->parent = p->parent;
    if (pl == c) {
        c->left = p;
        c->right = pr;
        if (pr != NULL)
            pr->parent = c;
    } else {
        c->right = p;
        c->left = pl;
        if (pl != NULL)
            pl->parent = c;
    }
    p->parent = c;
    p->left = cl;
    p->right = cr;
    if (cl != NULL)
        cl->parent = p;
    if (cr != NULL)
        cr->parent = p;
}

static void sift_up(struct timer_heap *h, struct timer *t)
{
    while (t->parent != NULL && before(t, t->parent))
        swap_up(h, t->parent, t);
}

static void sift_down(struct timer_heap *h, struct timer *t)
{
    for (;;) {
        struct timer *m = t;
        if (t->left != NULL && before(t->left, m))
            m = t->left;
        if (t->right != NULL && before(t->right, m))
            m = t->right;
        if (m == t)
            return;
        swap_up(h, t, m);
    }
}

static void insert(struct timer_heap *h, struct timer *t)
{
    size_t k = h->n + 1;

    t->left = t->right = NULL;
    if (k == 1) {
        t->parent = NULL;
        h->root = t;
    } else {
        struct timer *p = *slot_link(h, k >> 1);
        t->parent = p;
        if (k & 1)
            p->right = t;
        else
            p->left = t;
    }
    h->n = k;
    sift_up(h, t);
}

static void unlink_node(struct timer_heap *h, struct timer *t)
{
    struct timer **lastp = slot_link(h, h->n);
    struct timer *last = *lastp;

    *lastp = NULL;
    h->n--;
    if (last == t)
        return;
    /* Put `last` where t was, then restore the order around it. */
    *parent_link(h, t) = last;
    last->parent = t->parent;
    last->left = t->left;
    last->right = t->right;
    if (last->left != NULL)
        last->left->parent = last;
    if (last->right != NULL)
        last->right->parent = last;
    sift_down(h, last);
    sift_up(h, last);
}

void timer_heap_add(struct timer_heap *h, struct timer *t, uint64_t when)
{
    if (t->armed)
        unlink_node(h, t);
    t->when = when;
    t->seq = h->seq++;
    t->armed = true;
    insert(h, t);
}

void timer_heap_del(struct timer_heap *h, struct timer *t)
{
    if (!t->armed)
        return;
    unlink_node(h, t);
    t->armed = false;
    t->left = t->right = t->parent = NULL;
}

struct timer *timer_heap_pop(struct timer_heap *h, uint64_t now, uint64_t before_seq)
{
    struct timer *t = h->root;

    if (t == NULL || t->when > now || t->seq >= before_seq)
        return NULL;
    timer_heap_del(h, t);
    return t;
}
