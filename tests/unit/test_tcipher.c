/* tests/unit/test_tcipher.c - tunnel cipher streams (crypto/tcipher.h).
 *
 * Known answers (NIST SP 800-38A CBC vectors, one unit per call so the
 * chain must continue), batch == single calls, GCM nonce layout, counter
 * exhaustion, and every way an AEAD unit can be refused. The transcript
 * replay in test_session.c covers the vector key with both ciphers; the
 * python cross-check covers random keys against other implementations.
 */
#include <criterion/criterion.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "crypto/tcipher.h"
#include "tests/unit/testutil.h"

static const size_t keylens[] = { 16, 24, 32 };
static const enum tc_kind aeads[] = { TC_AES_GCM, TC_AES_GCM_SIV };

static uint8_t key32[32], iv16[16];

static void fill(void)
{
    for (int i = 0; i < 32; i++)
        key32[i] = (uint8_t)(0xa0 + i);
    for (int i = 0; i < 16; i++)
        iv16[i] = (uint8_t)(0x10 * i + 1);
}

/* Deterministic sizes for the batch tests (not crypto). */
static uint32_t next_rand(uint32_t *s)
{
    *s = *s * 1103515245u + 12345u;
    return *s >> 8;
}

static struct tc_stream *mk(enum tc_kind k, enum tc_dir dir, enum tc_side side, size_t keylen)
{
    struct tc_stream *s = tc_new(k, dir, side, key32, keylen, iv16);

    cr_assert_not_null(s, "%s key %zu", tc_kind_name(k), keylen);
    return s;
}

Test(tcipher, names)
{
    enum tc_kind k = 0;

    cr_assert_eq(tc_kind_parse("aes-cbc", &k), 0);
    cr_assert_eq(k, TC_AES_CBC);
    cr_assert_eq(tc_kind_parse("aes-gcm", &k), 0);
    cr_assert_eq(k, TC_AES_GCM);
    cr_assert_eq(tc_kind_parse("aes-gcm-siv", &k), 0);
    cr_assert_eq(k, TC_AES_GCM_SIV);
    cr_assert_eq(tc_kind_parse("AES-CBC", &k), -1);
    cr_assert_eq(tc_kind_parse("aes-ctr", &k), -1);
    cr_assert_eq(tc_kind_parse("", &k), -1);
    cr_assert_eq(tc_kind_parse(NULL, &k), -1);
    cr_assert_str_eq(tc_kind_name(TC_AES_CBC), "aes-cbc");
    cr_assert_str_eq(tc_kind_name(TC_AES_GCM), "aes-gcm");
    cr_assert_str_eq(tc_kind_name(TC_AES_GCM_SIV), "aes-gcm-siv");
    cr_assert_str_eq(tc_kind_name((enum tc_kind)9), "unknown");
    cr_assert(tc_available(TC_AES_CBC));
    cr_assert(tc_available(TC_AES_GCM));
    cr_assert(!tc_available((enum tc_kind)0));
}

Test(tcipher, new_rejects_bad_arguments, .init = fill)
{
    cr_assert_null(tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_CLIENT, key32, 20, iv16));
    cr_assert_null(tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_CLIENT, key32, 0, iv16));
    cr_assert_null(tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_CLIENT, key32, 32, NULL));
    cr_assert_null(tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_CLIENT, NULL, 32, iv16));
    cr_assert_null(tc_new((enum tc_kind)7, TC_SEAL, TC_SIDE_CLIENT, key32, 32, iv16));
    cr_assert_null(tc_new(TC_AES_GCM, (enum tc_dir)0, TC_SIDE_CLIENT, key32, 32, NULL));
    cr_assert_null(tc_new(TC_AES_GCM, TC_SEAL, (enum tc_side)5, key32, 32, NULL));
    if (!tc_available(TC_AES_GCM_SIV))
        cr_assert_null(tc_new(TC_AES_GCM_SIV, TC_SEAL, TC_SIDE_CLIENT, key32, 32, NULL));

    struct tc_stream *g = tc_new(TC_AES_GCM, TC_SEAL, TC_SIDE_CLIENT, key32, 32, NULL);
    cr_assert_not_null(g);
    cr_assert_eq(tc_stream_kind(g), TC_AES_GCM);
    cr_assert_eq(tc_overhead(g), 28);
    tc_free(g);
    tc_free(NULL);
}

/* NIST SP 800-38A F.2.1/F.2.3/F.2.5 (CBC-AES128/192/256.Encrypt), blocks 1-2,
 * sealed as two separate units: the second must continue the chain. */
Test(tcipher, cbc_known_answers_continue_chain)
{
    static const struct {
        const char *key, *c1, *c2;
    } kat[] = {
        { "2b7e151628aed2a6abf7158809cf4f3c",
          "7649abac8119b246cee98e9b12e9197d", "5086cb9b507219ee95db113a917678b2" },
        { "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b",
          "4f021db243bc633d7178183a9fa071e8", "b4d9ada9ad7dedf4e5e738763f69145a" },
        { "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
          "f58c4c04d6e5f1ba779eabfb5f7bfbd6", "9cfc4e967edb808d679f777bc6702c7d" },
    };
    size_t n;
    uint8_t *iv = tu_unhex("000102030405060708090a0b0c0d0e0f", &n);
    uint8_t *p = tu_unhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51", &n);

    for (size_t i = 0; i < 3; i++) {
        size_t kl;
        uint8_t *key = tu_unhex(kat[i].key, &kl);
        uint8_t *c1 = tu_unhex(kat[i].c1, &n), *c2 = tu_unhex(kat[i].c2, &n);
        struct tc_stream *s = tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_GATEWAY, key, kl, iv);
        struct tc_stream *o = tc_new(TC_AES_CBC, TC_OPEN, TC_SIDE_GATEWAY, key, kl, iv);
        uint8_t out[32], back[32];

        cr_assert_not_null(s);
        cr_assert_not_null(o);
        cr_assert_eq(tc_overhead(s), 0);
        cr_assert_eq(tc_seal(s, p, 16, out), 0);
        cr_assert_eq(tc_seal(s, p + 16, 16, out + 16), 0);
        cr_assert_arr_eq(out, c1, 16, "key %zu block 1", kl);
        cr_assert_arr_eq(out + 16, c2, 16, "key %zu block 2", kl);
        /* Open in different unit boundaries than sealed: one 32-byte unit. */
        cr_assert_eq(tc_open(o, out, 32, back), 0);
        cr_assert_arr_eq(back, p, 32);
        tc_free(s);
        tc_free(o);
        free(key);
        free(c1);
        free(c2);
    }
    free(iv);
    free(p);
}

Test(tcipher, cbc_rejects_misaligned_and_wrong_direction, .init = fill)
{
    struct tc_stream *s = mk(TC_AES_CBC, TC_SEAL, TC_SIDE_CLIENT, 32);
    struct tc_stream *o = mk(TC_AES_CBC, TC_OPEN, TC_SIDE_CLIENT, 32);
    uint8_t buf[64] = { 0 }, out[64];
    uint32_t lens[2] = { 16, 17 };

    cr_assert_eq(tc_seal(s, buf, 15, out), -1);
    cr_assert_eq(tc_seal(s, buf, 33, out), -1);
    cr_assert_eq(tc_seal_batch(s, buf, lens, 2, out), -1);
    cr_assert_eq(tc_open(o, buf, 31, out), -1);
    cr_assert_eq(tc_open(s, buf, 32, out), -1);
    cr_assert_eq(tc_seal(o, buf, 32, out), -1);
    cr_assert_eq(tc_seal(s, buf, 0, out), 0);
    /* In place is allowed for CBC. */
    cr_assert_eq(tc_seal(s, buf, 32, buf), 0);
    cr_assert_eq(tc_open(o, buf, 32, buf), 0);
    for (int i = 0; i < 32; i++)
        cr_assert_eq(buf[i], 0);
    tc_free(s);
    tc_free(o);
}

/* Batch output == count single tc_seal() calls, and the peer opens it. */
static void batch_equals_singles(enum tc_kind k, size_t keylen, uint32_t seed)
{
    struct tc_stream *a = mk(k, TC_SEAL, TC_SIDE_GATEWAY, keylen);
    struct tc_stream *b = mk(k, TC_SEAL, TC_SIDE_GATEWAY, keylen);
    struct tc_stream *o = mk(k, TC_OPEN, TC_SIDE_GATEWAY, keylen);
    size_t ovh = tc_overhead(a);

    for (int round = 0; round < 20; round++) {
        uint32_t lens[40];
        size_t count = next_rand(&seed) % 40 + 1, total = 0, wire = 0;

        for (size_t i = 0; i < count; i++) {
            lens[i] = next_rand(&seed) % 80;
            if (k == TC_AES_CBC)
                lens[i] = lens[i] / 16 * 16;
            else if (lens[i] == 0)
                lens[i] = 1;
            total += lens[i];
            wire += lens[i] + ovh;
        }
        uint8_t *in = malloc(total + 1), *one = malloc(wire + 1), *many = malloc(wire + 1);
        uint8_t *back = malloc(total + 1);
        cr_assert_eq(RAND_bytes(in, (int)total + 1), 1);
        cr_assert_eq(tc_seal_batch(a, in, lens, count, many), 0);
        for (size_t i = 0, p = 0, w = 0; i < count; i++) {
            cr_assert_eq(tc_seal(b, in + p, lens[i], one + w), 0);
            p += lens[i];
            w += lens[i] + ovh;
        }
        cr_assert_arr_eq(one, many, wire, "%s key %zu round %d", tc_kind_name(k), keylen, round);
        for (size_t i = 0, p = 0, w = 0; i < count; i++) {
            cr_assert_eq(tc_open(o, many + w, lens[i] + ovh, back + p), 0);
            p += lens[i];
            w += lens[i] + ovh;
        }
        cr_assert_arr_eq(back, in, total);
        free(in);
        free(one);
        free(many);
        free(back);
    }
    tc_free(a);
    tc_free(b);
    tc_free(o);
}

Test(tcipher, batch_equals_single_calls, .init = fill)
{
    for (size_t i = 0; i < 3; i++) {
        batch_equals_singles(TC_AES_CBC, keylens[i], 7 + (uint32_t)i);
        batch_equals_singles(TC_AES_GCM, keylens[i], 99 + (uint32_t)i);
        if (tc_available(TC_AES_GCM_SIV))
            batch_equals_singles(TC_AES_GCM_SIV, keylens[i], 5 + (uint32_t)i);
    }
    struct tc_stream *o = mk(TC_AES_GCM, TC_OPEN, TC_SIDE_CLIENT, 32);
    cr_assert_eq(tc_seal_batch(o, NULL, NULL, 0, NULL), -1, "open stream cannot seal");
    tc_free(o);
}

Test(tcipher, gcm_nonce_layout, .init = fill)
{
    static const uint8_t gw0[12] = { 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0 };
    static const uint8_t gw1[12] = { 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1 };
    static const uint8_t cl0[12] = { 0 };
    struct tc_stream *g = mk(TC_AES_GCM, TC_SEAL, TC_SIDE_GATEWAY, 32);
    struct tc_stream *c = mk(TC_AES_GCM, TC_SEAL, TC_SIDE_CLIENT, 32);
    uint8_t in[32] = { 0 }, out[60];

    cr_assert_eq(tc_seal(g, in, 32, out), 0);
    cr_assert_arr_eq(out, gw0, 12);
    cr_assert_eq(tc_seal(g, in, 32, out), 0);
    cr_assert_arr_eq(out, gw1, 12);
    cr_assert_eq(tc_seal(c, in, 32, out), 0);
    cr_assert_arr_eq(out, cl0, 12);
    /* The nonce would overwrite the plaintext: refused. */
    cr_assert_eq(tc_seal(c, out, 32, out), -1);
    tc_free(g);
    tc_free(c);
}

Test(tcipher, gcm_counter_exhaustion, .init = fill)
{
    static const uint8_t last[12] = { 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };
    struct tc_stream *s = mk(TC_AES_GCM, TC_SEAL, TC_SIDE_CLIENT, 16);
    struct tc_stream *o = mk(TC_AES_GCM, TC_OPEN, TC_SIDE_CLIENT, 16);
    uint8_t in[32] = { 1 }, a[60], b[60], back[32];
    uint32_t lens[2] = { 16, 16 };

    tc_set_counter(s, UINT64_MAX - 1);
    tc_set_counter(o, UINT64_MAX - 1);
    cr_assert_eq(tc_seal(s, in, 32, a), 0);
    cr_assert_eq(tc_seal(s, in, 32, b), 0);
    cr_assert_arr_eq(b, last, 12, "2^64-1 is the last usable counter");
    cr_assert_eq(tc_seal(s, in, 32, a + 0), -1, "counter would wrap");
    cr_assert_eq(tc_seal(s, in, 32, a), -1, "and stays refused");
    cr_assert_eq(tc_open(o, a, 60, back), 0);
    cr_assert_eq(tc_open(o, b, 60, back), 0);
    cr_assert_arr_eq(back, in, 32);
    cr_assert_eq(tc_open(o, b, 60, back), -1, "nothing follows 2^64-1");

    /* A batch that would cross the end is refused too. */
    tc_set_counter(s, UINT64_MAX);
    cr_assert_eq(tc_seal_batch(s, in, lens, 2, a), -1);
    tc_free(s);
    tc_free(o);
}

/* Every refusal leaves the stream able to open the genuine next unit: a
 * refused unit is fatal for the tunnel, but the check itself is pure. */
static void aead_rejections(enum tc_kind k, size_t keylen)
{
    struct tc_stream *s = mk(k, TC_SEAL, TC_SIDE_GATEWAY, keylen);
    struct tc_stream *o = mk(k, TC_OPEN, TC_SIDE_GATEWAY, keylen);
    struct tc_stream *wrong = mk(k, TC_SEAL, TC_SIDE_CLIENT, keylen);
    uint8_t in[32], u0[60], u1[60], w0[60], bad[60], back[32];

    for (int i = 0; i < 32; i++)
        in[i] = (uint8_t)i;
    cr_assert_eq(tc_seal(s, in, 32, u0), 0);
    cr_assert_eq(tc_seal(s, in, 32, u1), 0);
    cr_assert_eq(tc_seal(wrong, in, 32, w0), 0);

    if (k == TC_AES_GCM) {
        cr_assert_eq(tc_open(o, w0, 60, back), -1, "client prefix on a gateway stream");
        cr_assert_eq(tc_open(o, u1, 60, back), -1, "skipped counter");
    }
    for (size_t bit = 0; bit < 60 * 8; bit += 7) {
        memcpy(bad, u0, 60);
        bad[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        cr_assert_eq(tc_open(o, bad, 60, back), -1, "%s flipped bit %zu accepted",
                     tc_kind_name(k), bit);
    }
    memcpy(bad, u0, 60);
    bad[59] ^= 0x80;
    cr_assert_eq(tc_open(o, bad, 60, back), -1, "flipped tag bit");
    cr_assert_eq(tc_open(o, u0, 27, back), -1, "shorter than the overhead");
    cr_assert_eq(tc_open(o, u0, 60, back), 0);
    cr_assert_arr_eq(back, in, 32);
    if (k == TC_AES_GCM)
        cr_assert_eq(tc_open(o, u0, 60, back), -1, "replayed counter");
    cr_assert_eq(tc_open(o, u1, 60, back), 0);
    cr_assert_arr_eq(back, in, 32);
    tc_free(s);
    tc_free(o);
    tc_free(wrong);
}

Test(tcipher, aead_rejects_forgeries, .init = fill)
{
    for (size_t i = 0; i < 3; i++)
        for (size_t j = 0; j < 2; j++)
            if (tc_available(aeads[j]))
                aead_rejections(aeads[j], keylens[i]);
}

Test(tcipher, key_sizes_differ, .init = fill)
{
    uint8_t in[32] = { 0 }, out[3][60];

    for (size_t i = 0; i < 3; i++) {
        struct tc_stream *s = mk(TC_AES_GCM, TC_SEAL, TC_SIDE_CLIENT, keylens[i]);
        cr_assert_eq(tc_seal(s, in, 32, out[i]), 0);
        tc_free(s);
    }
    cr_assert_arr_neq(out[0] + 12, out[1] + 12, 48);
    cr_assert_arr_neq(out[1] + 12, out[2] + 12, 48);
}

static int fixed_nonce(void *ctx, void *buf, size_t n)
{
    memset(buf, *(int *)ctx, n);
    return 0;
}

static int failing_rng(void *ctx, void *buf, size_t n)
{
    (void)ctx;
    (void)buf;
    (void)n;
    return -1;
}

Test(tcipher, gcm_siv_injected_nonce, .init = fill)
{
    int v = 0x5a;
    struct tc_rng rng = { fixed_nonce, &v }, bad = { failing_rng, NULL };
    uint8_t in[32] = { 3 }, a[60], b[60], back[32], want[12];

    if (!tc_available(TC_AES_GCM_SIV))
        cr_skip_test("the linked OpenSSL has no AES-GCM-SIV (needs 3.2+)");
    struct tc_stream *s = mk(TC_AES_GCM_SIV, TC_SEAL, TC_SIDE_CLIENT, 32);
    struct tc_stream *o = mk(TC_AES_GCM_SIV, TC_OPEN, TC_SIDE_CLIENT, 32);
    tc_set_rng(s, &rng);
    cr_assert_eq(tc_seal(s, in, 32, a), 0);
    cr_assert_eq(tc_seal(s, in, 32, b), 0);
    memset(want, 0x5a, 12);
    cr_assert_arr_eq(a, want, 12);
    cr_assert_arr_eq(a, b, 60, "same nonce, same plaintext: deterministic");
    cr_assert_eq(tc_open(o, a, 60, back), 0);
    cr_assert_eq(tc_open(o, a, 60, back), 0, "SIV has no counter to replay-check");
    tc_set_rng(s, &bad);
    cr_assert_eq(tc_seal(s, in, 32, a), -1);
    tc_set_rng(s, NULL);
    cr_assert_eq(tc_seal(s, in, 32, a), 0);
    tc_free(s);
    tc_free(o);
}

Test(tcipher, rng_draw_default_and_injected)
{
    int v = 7;
    struct tc_rng rng = { fixed_nonce, &v }, bad = { failing_rng, NULL };
    uint8_t buf[16] = { 0 }, zero[16] = { 0 };

    cr_assert_eq(tc_rng_draw(NULL, buf, sizeof(buf)), 0);
    cr_assert_arr_neq(buf, zero, 16);
    cr_assert_eq(tc_rng_draw(&rng, buf, sizeof(buf)), 0);
    cr_assert_eq(buf[15], 7);
    cr_assert_eq(tc_rng_draw(&bad, buf, sizeof(buf)), -1);
}


/* Two streams of the same key, one parked after every few units: the
 * bytes on the wire and the plaintext opened must be identical. */
static void park_equals_unparked(enum tc_kind k, size_t keylen, uint32_t seed)
{
    struct tc_stream *ref = mk(k, TC_SEAL, TC_SIDE_CLIENT, keylen);
    struct tc_stream *pk = mk(k, TC_SEAL, TC_SIDE_CLIENT, keylen);
    struct tc_stream *o_ref = mk(k, TC_OPEN, TC_SIDE_CLIENT, keylen);
    struct tc_stream *o_pk = mk(k, TC_OPEN, TC_SIDE_CLIENT, keylen);
    size_t ovh = tc_overhead(ref);
    uint8_t in[96], a[96 + TC_AEAD_OVERHEAD], b[96 + TC_AEAD_OVERHEAD];
    uint8_t back_ref[96], back_pk[96];
    int parks = 0;

    cr_assert(!tc_parked(pk));
    for (int unit = 0; unit < 60; unit++) {
        size_t n = (next_rand(&seed) % 6 + 1) * 16;

        cr_assert_eq(RAND_bytes(in, (int)n), 1);
        if (next_rand(&seed) % 3 == 0) {
            cr_assert_eq(tc_park(pk), 0);
            cr_assert_eq(tc_park(pk), 0, "parking twice is harmless");
            cr_assert(tc_parked(pk));
            cr_assert_eq(tc_park(o_pk), 0);
            parks++;
        }
        cr_assert_eq(tc_seal(ref, in, n, a), 0);
        cr_assert_eq(tc_seal(pk, in, n, b), 0);
        cr_assert(!tc_parked(pk), "a unit makes the context again");
        if (k != TC_AES_GCM_SIV) /* random nonces: the bytes differ */
            cr_assert_arr_eq(a, b, n + ovh, "%s key %zu unit %d", tc_kind_name(k), keylen, unit);
        cr_assert_eq(tc_open(o_ref, a, n + ovh, back_ref), 0);
        cr_assert_eq(tc_open(o_pk, b, n + ovh, back_pk), 0, "%s unit %d", tc_kind_name(k), unit);
        cr_assert_arr_eq(back_ref, in, n);
        cr_assert_arr_eq(back_pk, in, n);
    }
    cr_assert_gt(parks, 5);
    cr_assert_eq(tc_park(NULL), 0);
    cr_assert(!tc_parked(NULL));
    tc_free(ref);
    tc_free(pk);
    tc_free(o_ref);
    tc_free(o_pk);
}

Test(tcipher, park_continues_the_stream, .init = fill)
{
    for (size_t i = 0; i < 3; i++) {
        park_equals_unparked(TC_AES_CBC, keylens[i], 3 + (uint32_t)i);
        park_equals_unparked(TC_AES_GCM, keylens[i], 31 + (uint32_t)i);
        if (tc_available(TC_AES_GCM_SIV))
            park_equals_unparked(TC_AES_GCM_SIV, keylens[i], 77 + (uint32_t)i);
    }
}

/* A parked open stream still refuses a forgery, and a parked stream is
 * freed without its context. */
Test(tcipher, parked_stream_refuses_forgery, .init = fill)
{
    struct tc_stream *s = mk(TC_AES_GCM, TC_SEAL, TC_SIDE_GATEWAY, 32);
    struct tc_stream *o = mk(TC_AES_GCM, TC_OPEN, TC_SIDE_GATEWAY, 32);
    uint8_t in[32] = { 1 }, w[32 + TC_AEAD_OVERHEAD], out[32];

    cr_assert_eq(tc_seal(s, in, 32, w), 0);
    cr_assert_eq(tc_park(o), 0);
    w[TC_NONCE_LEN] ^= 1;
    cr_assert_eq(tc_open(o, w, sizeof(w), out), -1);
    w[TC_NONCE_LEN] ^= 1;
    cr_assert_eq(tc_park(o), 0);
    cr_assert_eq(tc_open(o, w, sizeof(w), out), 0);
    cr_assert_arr_eq(out, in, 32);
    cr_assert_eq(tc_park(s), 0);
    tc_free(s);
    tc_free(o);
}
