/* tests/unit/test_hosttab.c - the shared hostname table (core/hosttab.h):
 * register / replace / remove-only-if-mine, aliases, normalisation, limits,
 * and readers on two threads while a writer keeps replacing (QSBR). */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include <urcu-qsbr.h>

#include "core/hosttab.h"

static struct hosttab *t;

static void setup(void)
{
    rcu_register_thread();
    t = hosttab_new();
    cr_assert_not_null(t);
}

static void teardown(void)
{
    /* hosttab_free waits for call_rcu frees: not as an online reader. */
    rcu_unregister_thread();
    hosttab_free(t);
}

static struct hosttab_ent ent(uint32_t shard, uint64_t tunnel, uint64_t gen)
{
    return (struct hosttab_ent){ .shard = shard, .tunnel = tunnel, .gen = gen,
                                 .mux = (struct mux *)(uintptr_t)(0x1000 + tunnel) };
}

static void assert_maps(const char *name, uint32_t shard, uint64_t tunnel, uint64_t gen)
{
    struct hosttab_ent e;

    cr_assert(hosttab_lookup(t, name, strlen(name), &e), "%s not found", name);
    cr_assert_eq(e.shard, shard, "%s shard", name);
    cr_assert_eq(e.tunnel, tunnel, "%s tunnel", name);
    cr_assert_eq(e.gen, gen, "%s gen", name);
    cr_assert_eq((uintptr_t)e.mux, 0x1000 + tunnel, "%s mux", name);
}

static void assert_absent(const char *name)
{
    struct hosttab_ent e;

    cr_assert_not(hosttab_lookup(t, name, strlen(name), &e), "%s found", name);
}

TestSuite(hosttab, .init = setup, .fini = teardown);

Test(hosttab, register_lookup)
{
    const char *names[] = { "myname.ui.nabu.casa" };
    struct hosttab_ent e = ent(3, 7, 1), prev[1];
    size_t refused = 99;

    assert_absent("myname.ui.nabu.casa");
    cr_assert_eq(hosttab_register(t, names, 1, &e, prev, &refused), 1);
    cr_assert_eq(refused, 0);
    cr_assert_eq(prev[0].tunnel, 0, "a new name has no previous owner");
    assert_maps("myname.ui.nabu.casa", 3, 7, 1);
    assert_absent("other.ui.nabu.casa");
    assert_absent("myname.ui.nabu.cas");
    cr_assert_eq(hosttab_count(t), 1);
}

Test(hosttab, replace_reports_previous_owner)
{
    const char *names[] = { "a.example" };
    struct hosttab_ent e1 = ent(0, 1, 1), e2 = ent(1, 2, 2), prev[1];

    cr_assert_eq(hosttab_register(t, names, 1, &e1, NULL, NULL), 1);
    cr_assert_eq(hosttab_register(t, names, 1, &e2, prev, NULL), 1);
    cr_assert_eq(prev[0].shard, 0);
    cr_assert_eq(prev[0].tunnel, 1);
    cr_assert_eq(prev[0].gen, 1);
    cr_assert_eq((uintptr_t)prev[0].mux, 0x1001);
    assert_maps("a.example", 1, 2, 2);
    cr_assert_eq(hosttab_count(t), 1, "replace keeps one entry per name");
}

Test(hosttab, aliases)
{
    const char *names[] = { "host.example", "alias1.example", "alias2.example" };
    struct hosttab_ent e = ent(2, 9, 4), prev[3];

    cr_assert_eq(hosttab_register(t, names, 3, &e, prev, NULL), 3);
    for (size_t i = 0; i < 3; i++) {
        cr_assert_eq(prev[i].tunnel, 0);
        assert_maps(names[i], 2, 9, 4);
    }
    cr_assert_eq(hosttab_count(t), 3);
    cr_assert_eq(hosttab_remove(t, names, 3, 9), 3);
    for (size_t i = 0; i < 3; i++)
        assert_absent(names[i]);
    cr_assert_eq(hosttab_count(t), 0);
}

Test(hosttab, remove_only_if_mine)
{
    /* X has hostname a, alias b; Y registers hostname b; X leaves. The
     * reference would drop b too (PROTOCOL.md 6.7); we must not. */
    const char *x[] = { "a.example", "b.example" };
    const char *y[] = { "b.example" };
    struct hosttab_ent ex = ent(0, 10, 1), ey = ent(1, 11, 2), prev[1];

    cr_assert_eq(hosttab_register(t, x, 2, &ex, NULL, NULL), 2);
    cr_assert_eq(hosttab_register(t, y, 1, &ey, prev, NULL), 1);
    cr_assert_eq(prev[0].tunnel, 10);
    cr_assert_eq(hosttab_remove(t, x, 2, 10), 1, "only a.example is still X's");
    assert_absent("a.example");
    assert_maps("b.example", 1, 11, 2);
    cr_assert_eq(hosttab_remove(t, x, 2, 10), 0, "removing twice removes nothing");
    cr_assert_eq(hosttab_remove(t, y, 1, 12), 0, "another id removes nothing");
    assert_maps("b.example", 1, 11, 2);
    cr_assert_eq(hosttab_remove(t, y, 1, 11), 1);
    cr_assert_eq(hosttab_count(t), 0);
}

Test(hosttab, normalisation)
{
    const char *names[] = { "MyName.UI.Nabu.Casa." };
    const char *lower[] = { "myname.ui.nabu.casa" };
    struct hosttab_ent e = ent(0, 5, 1);

    cr_assert_eq(hosttab_register(t, names, 1, &e, NULL, NULL), 1);
    assert_maps("myname.ui.nabu.casa", 0, 5, 1);
    assert_maps("MYNAME.UI.NABU.CASA", 0, 5, 1);
    assert_maps("myname.ui.nabu.casa.", 0, 5, 1);
    assert_absent("myname.ui.nabu.casa..");
    assert_absent(".");
    /* removal normalises the same way */
    cr_assert_eq(hosttab_remove(t, lower, 1, 5), 1);
    assert_absent("myname.ui.nabu.casa");
}

Test(hosttab, utf8_bytes_are_left_alone)
{
    /* Only ASCII letters fold; "É" (c3 89) and "é" (c3 a9) stay apart. */
    const char *names[] = { "caf\xc3\x89.example" };
    struct hosttab_ent e = ent(0, 6, 1);

    cr_assert_eq(hosttab_register(t, names, 1, &e, NULL, NULL), 1);
    assert_maps("CAF\xc3\x89.EXAMPLE", 0, 6, 1);
    assert_absent("caf\xc3\xa9.example");
}

Test(hosttab, refused_names)
{
    char long_ok[HOSTTAB_NAME_MAX + 1], too_long[HOSTTAB_NAME_MAX + 2];
    const char *names[3];
    struct hosttab_ent e = ent(0, 8, 1), prev[3];
    size_t refused = 0;

    memset(long_ok, 'a', HOSTTAB_NAME_MAX);
    long_ok[HOSTTAB_NAME_MAX] = '\0';
    memset(too_long, 'b', HOSTTAB_NAME_MAX + 1);
    too_long[HOSTTAB_NAME_MAX + 1] = '\0';
    names[0] = "";
    names[1] = long_ok;
    names[2] = too_long;
    prev[0].tunnel = prev[2].tunnel = 77;
    cr_assert_eq(hosttab_register(t, names, 3, &e, prev, &refused), 1);
    cr_assert_eq(refused, 2);
    cr_assert_eq(prev[0].tunnel, 0);
    cr_assert_eq(prev[2].tunnel, 0);
    assert_maps(long_ok, 0, 8, 1);
    assert_absent(too_long);
    assert_absent("");
    cr_assert_eq(hosttab_count(t), 1);
}

Test(hosttab, duplicate_name_in_one_registration)
{
    const char *names[] = { "dup.example", "DUP.example" };
    struct hosttab_ent e = ent(1, 20, 3), prev[2];

    cr_assert_eq(hosttab_register(t, names, 2, &e, prev, NULL), 2);
    cr_assert_eq(prev[0].tunnel, 0);
    cr_assert_eq(prev[1].tunnel, 20, "the second copy replaces the first");
    cr_assert_eq(hosttab_count(t), 1);
    cr_assert_eq(hosttab_remove(t, names, 2, 20), 1);
    cr_assert_eq(hosttab_count(t), 0);
}

Test(hosttab, free_with_entries)
{
    const char *names[] = { "x.example", "y.example" };
    struct hosttab_ent e = ent(0, 30, 1);

    cr_assert_eq(hosttab_register(t, names, 2, &e, NULL, NULL), 2);
    /* teardown frees a non-empty table; ASan builds check for leaks */
}

/* ---- Concurrency: 2 readers, 1 writer replacing one name -------------- */

#define ROUNDS 20000

struct race {
    atomic_bool stop;
    atomic_int ready;
    atomic_uint_fast64_t seen[2]; /* lookups that found the name, per reader */
    bool bad[2];          /* torn or out-of-order value seen */
};

static struct race race;

/* Values are internally consistent (gen = 3 * tunnel + 1, shard = tunnel
 * % 4, mux derived from tunnel) and tunnel ids only grow: a reader that
 * sees anything else read a torn or recycled node. */
static void *reader(void *arg)
{
    int idx = (int)(intptr_t)arg;
    uint64_t last = 0;

    rcu_register_thread();
    atomic_fetch_add(&race.ready, 1);
    while (!atomic_load(&race.stop)) {
        struct hosttab_ent e;
        if (hosttab_lookup(t, "race.example", 12, &e)) {
            if (e.gen != 3 * e.tunnel + 1 || e.shard != e.tunnel % 4 ||
                (uintptr_t)e.mux != 0x1000 + e.tunnel || e.tunnel < last)
                race.bad[idx] = true;
            last = e.tunnel;
            atomic_fetch_add(&race.seen[idx], 1);
        }
        rcu_quiescent_state();
    }
    rcu_unregister_thread();
    return NULL;
}

Test(hosttab, concurrent_readers_while_replacing, .timeout = 60)
{
    const char *names[] = { "race.example", "RACE.example." };
    pthread_t th[2];
    struct hosttab_ent prev[2];

    atomic_init(&race.stop, false);
    atomic_init(&race.ready, 0);
    atomic_init(&race.seen[0], 0);
    atomic_init(&race.seen[1], 0);
    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, reader, (void *)(intptr_t)i), 0);
    while (atomic_load(&race.ready) < 2)
        rcu_quiescent_state();
    /* ROUNDS replacements at least, and on until both readers have found
     * the name often enough: on a loaded machine a reader may not run at
     * all during the first ROUNDS (bounded by the test timeout). */
    uint64_t id;
    for (id = 1; id <= ROUNDS || atomic_load(&race.seen[0]) < 100 ||
                 atomic_load(&race.seen[1]) < 100 || id % 7 == 1; id++) {
        struct hosttab_ent e = ent((uint32_t)(id % 4), id, 3 * id + 1);
        cr_assert_eq(hosttab_register(t, names, 1 + (id % 2), &e, prev, NULL),
                     (int)(1 + id % 2));
        cr_assert_eq(prev[0].tunnel, (id - 1) % 7 == 0 ? 0 : id - 1);
        if (id % 7 == 0) /* sometimes the owner leaves before the next one */
            cr_assert_eq(hosttab_remove(t, names, 1, id), 1);
        rcu_quiescent_state();
    }
    atomic_store(&race.stop, true);
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++)
        cr_assert_not(race.bad[i], "reader %d saw an inconsistent entry", i);
    id--; /* the last id registered; id % 7 != 0, so it is still there */
    assert_maps("race.example", (uint32_t)(id % 4), id, 3 * id + 1);
    cr_assert_eq(hosttab_count(t), 1);
}
