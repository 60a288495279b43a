/* tests/unit/test_challenge.c - challenge and answer (core/challenge.h).
 *
 * Both roles against each other for every cipher and key size, the
 * reference's first units from the session files (R -> C -> answer, byte
 * exact), and the refusals: wrong answer, tampered AEAD units, a unit
 * sealed by the wrong side, a failing random source.
 */
#include <criterion/criterion.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "core/challenge.h"
#include "crypto/tcipher.h"
#include "tests/unit/testutil.h"

static const enum tc_kind kinds[] = { TC_AES_CBC, TC_AES_GCM, TC_AES_GCM_SIV };
static const size_t keylens[] = { 16, 24, 32 };
static const uint8_t key[32] = { 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2, 3, 4, 5, 6,
                                 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22 };
static const uint8_t iv[16] = { 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 121, 98, 219 };

/* The four streams of one tunnel. */
struct tunnel {
    struct tc_stream *gw_seal, *gw_open, *cl_seal, *cl_open;
};

static void tunnel_init(struct tunnel *t, enum tc_kind k, size_t keylen)
{
    t->gw_seal = tc_new(k, TC_SEAL, TC_SIDE_GATEWAY, key, keylen, iv);
    t->gw_open = tc_new(k, TC_OPEN, TC_SIDE_CLIENT, key, keylen, iv);
    t->cl_seal = tc_new(k, TC_SEAL, TC_SIDE_CLIENT, key, keylen, iv);
    t->cl_open = tc_new(k, TC_OPEN, TC_SIDE_GATEWAY, key, keylen, iv);
    cr_assert(t->gw_seal && t->gw_open && t->cl_seal && t->cl_open);
}

static void tunnel_fini(struct tunnel *t)
{
    tc_free(t->gw_seal);
    tc_free(t->gw_open);
    tc_free(t->cl_seal);
    tc_free(t->cl_open);
}

Test(challenge, both_roles_all_ciphers)
{
    for (size_t ki = 0; ki < 3; ki++) {
        if (!tc_available(kinds[ki]))
            continue;
        for (size_t li = 0; li < 3; li++) {
            struct tunnel t;
            struct challenge ch;
            uint8_t c[CHALLENGE_WIRE_MAX], a[CHALLENGE_WIRE_MAX];

            tunnel_init(&t, kinds[ki], keylens[li]);
            cr_assert_eq(challenge_wire_len(t.gw_seal), ki == 0 ? 32 : 60);
            cr_assert_eq(challenge_new(&ch, t.gw_seal, NULL, c), 0);
            cr_assert_eq(challenge_answer(t.cl_open, t.cl_seal, c, a), 0);
            cr_assert_eq(challenge_verify(&ch, t.gw_open, a), 0, "%s/%zu",
                         tc_kind_name(kinds[ki]), keylens[li]);
            tunnel_fini(&t);
        }
    }
}

Test(challenge, two_challenges_differ)
{
    struct tunnel t1, t2;
    struct challenge a, b;
    uint8_t c1[CHALLENGE_WIRE_MAX], c2[CHALLENGE_WIRE_MAX];

    tunnel_init(&t1, TC_AES_CBC, 32);
    tunnel_init(&t2, TC_AES_CBC, 32);
    cr_assert_eq(challenge_new(&a, t1.gw_seal, NULL, c1), 0);
    cr_assert_eq(challenge_new(&b, t2.gw_seal, NULL, c2), 0);
    cr_assert_arr_neq(c1, c2, 32, "R comes from the CSPRNG");
    cr_assert_arr_neq(a.expect, b.expect, 32);
    tunnel_fini(&t1);
    tunnel_fini(&t2);
}

Test(challenge, wrong_answer_rejected)
{
    for (size_t ki = 0; ki < 3; ki++) {
        if (!tc_available(kinds[ki]))
            continue;
        struct tunnel t;
        struct challenge ch;
        uint8_t c[CHALLENGE_WIRE_MAX], a[CHALLENGE_WIRE_MAX], bogus[32];

        tunnel_init(&t, kinds[ki], 32);
        cr_assert_eq(challenge_new(&ch, t.gw_seal, NULL, c), 0);
        /* The client seals the challenge itself instead of its hash. */
        cr_assert_eq(tc_open(t.cl_open, c, challenge_wire_len(t.cl_open), bogus), 0);
        cr_assert_eq(tc_seal(t.cl_seal, bogus, 32, a), 0);
        cr_assert_eq(challenge_verify(&ch, t.gw_open, a), -1, "%s", tc_kind_name(kinds[ki]));
        tunnel_fini(&t);
    }
}

Test(challenge, answer_off_by_one_bit_rejected_cbc)
{
    /* CBC cannot detect tampering; the comparison must. */
    struct tunnel t;
    struct challenge ch;
    uint8_t c[32], a[32];

    tunnel_init(&t, TC_AES_CBC, 32);
    cr_assert_eq(challenge_new(&ch, t.gw_seal, NULL, c), 0);
    cr_assert_eq(challenge_answer(t.cl_open, t.cl_seal, c, a), 0);
    a[31] ^= 0x01;     /* last plaintext byte flips */
    cr_assert_eq(challenge_verify(&ch, t.gw_open, a), -1);
    tunnel_fini(&t);
}

Test(challenge, tampered_aead_rejected)
{
    for (size_t ki = 1; ki < 3; ki++) {
        if (!tc_available(kinds[ki]))
            continue;
        for (size_t byte = 0; byte < 60; byte += 5) {
            struct tunnel t;
            struct challenge ch;
            uint8_t c[60], a[60];

            tunnel_init(&t, kinds[ki], 32);
            cr_assert_eq(challenge_new(&ch, t.gw_seal, NULL, c), 0);
            c[byte] ^= 0x20;
            cr_assert_eq(challenge_answer(t.cl_open, t.cl_seal, c, a), -1,
                         "%s: challenge byte %zu", tc_kind_name(kinds[ki]), byte);
            c[byte] ^= 0x20;
            cr_assert_eq(challenge_answer(t.cl_open, t.cl_seal, c, a), 0);
            a[byte] ^= 0x04;
            cr_assert_eq(challenge_verify(&ch, t.gw_open, a), -1,
                         "%s: answer byte %zu", tc_kind_name(kinds[ki]), byte);
            tunnel_fini(&t);
        }
    }
}

Test(challenge, gcm_answer_must_come_from_the_client)
{
    /* A reflected challenge (gateway prefix, counter 0) is not an answer. */
    struct tunnel t;
    struct challenge ch;
    uint8_t c[60];

    tunnel_init(&t, TC_AES_GCM, 32);
    cr_assert_eq(challenge_new(&ch, t.gw_seal, NULL, c), 0);
    cr_assert_eq(challenge_verify(&ch, t.gw_open, c), -1);
    tunnel_fini(&t);
}

static int failing_rng(void *ctx, void *buf, size_t n)
{
    (void)ctx;
    (void)buf;
    (void)n;
    return -1;
}

Test(challenge, random_source_failure)
{
    struct tunnel t;
    struct challenge ch;
    struct tc_rng bad = { failing_rng, NULL };
    uint8_t c[60];

    tunnel_init(&t, TC_AES_GCM, 32);
    cr_assert_eq(challenge_new(&ch, t.gw_seal, &bad, c), -1);
    tunnel_fini(&t);
}

/* Replays R from the vectors. */
static int seed_rng(void *ctx, void *buf, size_t n)
{
    const uint8_t *seed = ctx;

    cr_assert_eq(n, CHALLENGE_SEED_LEN);
    memcpy(buf, seed, n);
    return 0;
}

static void vector_first_units(const char *file)
{
    json_t *doc = tu_load_json(file), *sess;
    enum tc_kind k;
    size_t i, n, kl, ivl;

    cr_assert_eq(tc_kind_parse(tu_str(doc, "cipher"), &k), 0);
    if (!tc_available(k)) {
        json_decref(doc);
        cr_skip_test("the linked OpenSSL has no %s (needs 3.2+)", tc_kind_name(k));
        return;
    }
    uint8_t *vkey = tu_unhex(tu_str(doc, "aes_key_hex"), &kl);
    uint8_t *viv = tu_unhex(tu_str(doc, "aes_iv_hex"), &ivl);
    json_array_foreach(json_object_get(doc, "sessions"), i, sess) {
        json_t *dec = json_object_get(sess, "decoded");
        json_t *chal = json_array_get(json_object_get(dec, "server_to_client"), 0);
        json_t *ans = json_array_get(json_object_get(dec, "client_to_server"), 1);
        uint8_t *seed = tu_unhex(tu_str(chal, "random_40_bytes_hex"), &n);
        uint8_t *cw = tu_unhex(tu_str(chal, "wire_hex"), &n);
        uint8_t *aw = tu_unhex(tu_str(ans, "wire_hex"), &n);
        uint8_t *cp = tu_unhex(tu_str(chal, "plain_hex"), &n);
        uint8_t *ap = tu_unhex(tu_str(ans, "plain_hex"), &n);
        struct tc_rng rng = { seed_rng, seed };
        struct tc_stream *gs = tc_new(k, TC_SEAL, TC_SIDE_GATEWAY, vkey, kl, viv);
        struct tc_stream *go = tc_new(k, TC_OPEN, TC_SIDE_CLIENT, vkey, kl, viv);
        struct tc_stream *cs = tc_new(k, TC_SEAL, TC_SIDE_CLIENT, vkey, kl, viv);
        struct tc_stream *co = tc_new(k, TC_OPEN, TC_SIDE_GATEWAY, vkey, kl, viv);
        struct challenge ch;
        uint8_t c[60], a[60], h[32];
        unsigned hl;

        cr_assert_str_eq(tu_str(chal, "kind"), "challenge");
        cr_assert_str_eq(tu_str(ans, "kind"), "challenge_answer");
        cr_assert_eq(challenge_new(&ch, gs, &rng, c), 0);
        if (k != TC_AES_GCM_SIV) {   /* SIV nonces are random: see test_session */
            cr_assert_arr_eq(c, cw, challenge_wire_len(gs), "%s challenge", file);
        }
        /* C = SHA-256(R); the expected answer is SHA-256(C). */
        EVP_Digest(cp, 32, h, &hl, EVP_sha256(), NULL);
        cr_assert_arr_eq(h, ap, 32);
        cr_assert_arr_eq(ch.expect, ap, 32);
        /* The reference's own units: the client answers the recorded
         * challenge, the gateway accepts the recorded answer. */
        cr_assert_eq(challenge_answer(co, cs, cw, a), 0);
        if (k != TC_AES_GCM_SIV)
            cr_assert_arr_eq(a, aw, challenge_wire_len(cs), "%s answer", file);
        cr_assert_eq(challenge_verify(&ch, go, aw), 0);
        free(seed);
        free(cw);
        free(aw);
        free(cp);
        free(ap);
        tc_free(gs);
        tc_free(go);
        tc_free(cs);
        tc_free(co);
    }
    free(vkey);
    free(viv);
    json_decref(doc);
}

Test(challenge, vectors_cbc) { vector_first_units("cbc_session.json"); }
Test(challenge, vectors_gcm) { vector_first_units("gcm_session.json"); }
Test(challenge, vectors_gcm_siv) { vector_first_units("gcm_siv_session.json"); }
