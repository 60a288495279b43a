/* core/challenge.c - see challenge.h. */
#include "core/challenge.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

static int sha256(const uint8_t *in, size_t n, uint8_t out[CHALLENGE_LEN])
{
    unsigned int len = 0;

    if (EVP_Digest(in, n, out, &len, EVP_sha256(), NULL) != 1 || len != CHALLENGE_LEN)
        return -1;
    return 0;
}

size_t challenge_wire_len(const struct tc_stream *s)
{
    return CHALLENGE_LEN + tc_overhead(s);
}

int challenge_new(struct challenge *c, struct tc_stream *seal,
                  const struct tc_rng *rng, uint8_t *out)
{
    uint8_t seed[CHALLENGE_SEED_LEN], chal[CHALLENGE_LEN];
    int rc = -1;

    if (tc_rng_draw(rng, seed, sizeof(seed)) == 0 &&
        sha256(seed, sizeof(seed), chal) == 0 &&
        sha256(chal, sizeof(chal), c->expect) == 0 &&
        tc_seal(seal, chal, sizeof(chal), out) == 0)
        rc = 0;
    OPENSSL_cleanse(seed, sizeof(seed));
    OPENSSL_cleanse(chal, sizeof(chal));
    return rc;
}

int challenge_verify(const struct challenge *c, struct tc_stream *open,
                     const uint8_t *in)
{
    uint8_t answer[CHALLENGE_LEN];
    int rc = -1;

    if (tc_open(open, in, challenge_wire_len(open), answer) == 0 &&
        CRYPTO_memcmp(answer, c->expect, CHALLENGE_LEN) == 0)
        rc = 0;
    OPENSSL_cleanse(answer, sizeof(answer));
    return rc;
}

int challenge_answer(struct tc_stream *open, struct tc_stream *seal,
                     const uint8_t *in, uint8_t *out)
{
    uint8_t chal[CHALLENGE_LEN], answer[CHALLENGE_LEN];
    int rc = -1;

    if (tc_open(open, in, challenge_wire_len(open), chal) == 0 &&
        sha256(chal, sizeof(chal), answer) == 0 &&
        tc_seal(seal, answer, sizeof(answer), out) == 0)
        rc = 0;
    OPENSSL_cleanse(chal, sizeof(chal));
    OPENSSL_cleanse(answer, sizeof(answer));
    return rc;
}
