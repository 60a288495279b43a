/* tests/unit/test_gw_seen.c - core/gw_seen.c: the gateway's set of aes-gcm
 * keys already accepted (a GCM key must not serve two sessions while its
 * token is valid, PROTOCOL.md 3.3): first use, reuse, expiry boundary
 * (valid == now is still valid, as claims_expired()), lazy purge, and
 * exactly one winner when threads race on one key.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "core/gw_impl.h"

static struct gw_seen seen;

static void setup(void)
{
    gw_seen_init(&seen);
}

static void teardown(void)
{
    gw_seen_fini(&seen);
}

static const uint8_t k1[32] = { 0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff };
static const uint8_t k2[32] = { 0x01 };

#define T0 1800000000.0   /* a wall-clock second in 2027 */

Test(gw_seen, first_use_then_reuse, .init = setup, .fini = teardown)
{
    cr_assert(gw_seen_claim(&seen, k1, 32, T0 + 3600, T0));
    cr_assert_eq(gw_seen_count(&seen), 1);
    cr_assert_not(gw_seen_claim(&seen, k1, 32, T0 + 3600, T0 + 1));
    /* another token with the same key and a later expiry is still a reuse */
    cr_assert_not(gw_seen_claim(&seen, k1, 32, T0 + 7200, T0 + 2));
    cr_assert_eq(gw_seen_count(&seen), 1);
}

Test(gw_seen, keys_are_distinct, .init = setup, .fini = teardown)
{
    cr_assert(gw_seen_claim(&seen, k1, 32, T0 + 60, T0));
    cr_assert(gw_seen_claim(&seen, k2, 32, T0 + 60, T0));
    /* the same bytes as a 16-byte key are another key */
    cr_assert(gw_seen_claim(&seen, k1, 16, T0 + 60, T0));
    cr_assert(gw_seen_claim(&seen, k1, 24, T0 + 60, T0));
    cr_assert_eq(gw_seen_count(&seen), 4);
    cr_assert_not(gw_seen_claim(&seen, k1, 16, T0 + 60, T0));
    cr_assert_not(gw_seen_claim(&seen, k2, 32, T0 + 60, T0));
}

Test(gw_seen, expiry_boundary, .init = setup, .fini = teardown)
{
    cr_assert(gw_seen_claim(&seen, k1, 32, T0 + 10, T0));
    /* valid == now: the old token is still valid, so still a reuse */
    cr_assert_not(gw_seen_claim(&seen, k1, 32, T0 + 20, T0 + 10));
    /* after its expiry the old session can no longer exist: a new life
     * (and the new expiry holds from now on) */
    cr_assert(gw_seen_claim(&seen, k1, 32, T0 + 20, T0 + 10.001));
    cr_assert_not(gw_seen_claim(&seen, k1, 32, T0 + 30, T0 + 15));
    cr_assert_eq(gw_seen_count(&seen), 1);
}

Test(gw_seen, purge_is_lazy, .init = setup, .fini = teardown)
{
    char key[32];

    /* the first claim purges (next_purge starts at 0) and schedules the
     * next pass 60 s later */
    for (int i = 0; i < 100; i++) {
        memset(key, 0x5a, sizeof(key)); /* never k1 or k2 */
        memcpy(key, &i, sizeof(i));
        cr_assert(gw_seen_claim(&seen, (const uint8_t *)key, 32,
                                i < 60 ? T0 + 5 : T0 + 1000, T0));
    }
    cr_assert_eq(gw_seen_count(&seen), 100);
    /* expired, but no pass is due yet */
    cr_assert(gw_seen_claim(&seen, k1, 32, T0 + 1000, T0 + 30));
    cr_assert_eq(gw_seen_count(&seen), 101);
    /* the pass at T0 + 60 drops the 60 expired entries, keeps the rest */
    cr_assert(gw_seen_claim(&seen, k2, 32, T0 + 1000, T0 + 60));
    cr_assert_eq(gw_seen_count(&seen), 42);
    for (int i = 0; i < 100; i++) {
        memset(key, 0x5a, sizeof(key)); /* never k1 or k2 */
        memcpy(key, &i, sizeof(i));
        cr_assert_eq(gw_seen_claim(&seen, (const uint8_t *)key, 32, T0 + 1000, T0 + 61),
                     i < 60, "key %d", i);
    }
}

/* ---- shards race on one key ----------------------------------------------- */

#define RACERS 4
#define KEYS 500

static int wins[RACERS];

static void *race(void *arg)
{
    int *w = arg;
    uint8_t key[32] = { 0 };

    for (int i = 0; i < KEYS; i++) {
        memcpy(key, &i, sizeof(i));
        if (gw_seen_claim(&seen, key, 32, T0 + 100, T0))
            (*w)++;
    }
    return NULL;
}

Test(gw_seen, one_winner_per_key, .init = setup, .fini = teardown, .timeout = 30)
{
    pthread_t th[RACERS];
    int total = 0;

    for (int i = 0; i < RACERS; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, race, &wins[i]), 0);
    for (int i = 0; i < RACERS; i++) {
        pthread_join(th[i], NULL);
        total += wins[i];
    }
    cr_assert_eq(total, KEYS);
    cr_assert_eq(gw_seen_count(&seen), KEYS);
}
