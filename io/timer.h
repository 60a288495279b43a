/* io/timer.h - intrusive min-heap of timers, one per engine.
 *
 * The caller embeds struct timer in its own object (connection, channel,
 * listener); the heap links the structs together through their own
 * pointers, so adding a timer never allocates and never fails. Every
 * operation is O(log n): a pointer-based binary heap in which the path to
 * the last slot is computed from the element count (as libuv's heap).
 *
 * Ordering is by deadline, then by arming order: two timers with the same
 * deadline fire in the order they were (re-)armed.
 *
 * Times are milliseconds on CLOCK_MONOTONIC (timer_clock_ms()). The heap
 * itself is clock-agnostic; the engine (io/eng.h: eng_timer_add) turns a
 * delay into a deadline and runs the callbacks.
 *
 * Ownership: the heap only borrows the struct timer. A caller frees the
 * object that embeds an armed timer only after timer_heap_del() (or
 * eng_timer_del()). All of this is single-threaded: the owning shard only.
 */
#ifndef IO_TIMER_H
#define IO_TIMER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct timer;

/* Runs from the engine's loop turn; the timer is already disarmed and may be
 * re-armed, deleted or freed inside the callback. */
typedef void timer_fn(struct timer *t);

struct timer {
    /* private: heap links and key */
    struct timer *left, *right, *parent;
    uint64_t when; /* deadline in ms; meaningful while armed */
    uint64_t seq;  /* arming order, breaks deadline ties (FIFO) */
    /* public: set by timer_init() */
    timer_fn *cb;
    bool armed;
};

struct timer_heap {
    struct timer *root; /* earliest deadline */
    size_t n;
    uint64_t seq; /* next arming number */
};

/* Milliseconds since an arbitrary point, CLOCK_MONOTONIC. */
uint64_t timer_clock_ms(void);

/* A disarmed timer with callback cb. */
void timer_init(struct timer *t, timer_fn *cb);

static inline bool timer_armed(const struct timer *t)
{
    return t->armed;
}

void timer_heap_init(struct timer_heap *h);

/* Arm t to expire at deadline `when`; an armed t is moved (re-armed). */
void timer_heap_add(struct timer_heap *h, struct timer *t, uint64_t when);

/* Disarm t; a disarmed t is left alone. */
void timer_heap_del(struct timer_heap *h, struct timer *t);

/* Earliest timer, or NULL when the heap is empty. Not removed. */
static inline struct timer *timer_heap_min(const struct timer_heap *h)
{
    return h->root;
}

/* The current arming number: timers armed from now on have seq >= it. */
static inline uint64_t timer_heap_seq(const struct timer_heap *h)
{
    return h->seq;
}

/* Remove and return the earliest timer if its deadline is <= now and it
 * was armed before `before_seq` (so a callback that re-arms its timer for
 * "now" cannot keep one expiry pass running forever); else NULL. The
 * returned timer is disarmed; the caller runs its callback. */
struct timer *timer_heap_pop(struct timer_heap *h, uint64_t now, uint64_t before_seq);

#endif
