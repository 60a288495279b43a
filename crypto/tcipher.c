/* crypto/tcipher.c - tunnel cipher streams over OpenSSL EVP (PROTOCOL.md 3).
 *
 * One EVP_CIPHER_CTX per stream, keyed in tc_new(). aes-cbc keeps the
 * context across calls with padding off, so the chain simply continues;
 * AEAD re-initialises only the nonce per unit. Nothing here allocates
 * after tc_new() for aes-cbc and aes-gcm while a stream is not parked
 * (`tc_tool alloc-check` counts it through OpenSSL's allocator hooks).
 *
 * Parking (tc_park): an OpenSSL context with its key schedule is ~640
 * bytes, two per tunnel, more than the rest of an idle tunnel together.
 * A parked stream keeps only the key and, for aes-cbc, the chain's last
 * block, and makes its context again on the next unit (~0.4 us). OpenSSL's aes-gcm-siv derives
 * per-nonce keys with a freshly fetched ECB cipher: its allocation, not
 * ours.
 */
#include "crypto/tcipher.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "crypto/rand.h"

struct tc_stream {
    uint8_t kind;              /* enum tc_kind */
    uint8_t dir;               /* enum tc_dir */
    uint8_t keylen;
    bool exhausted;            /* aes-gcm: 2^64-1 has been used */
    uint8_t prefix[4];         /* aes-gcm: the sender's nonce prefix */
    EVP_CIPHER *cipher;        /* fetched; freed in tc_free() */
    EVP_CIPHER_CTX *ctx;       /* NULL while parked */
    uint64_t counter;          /* aes-gcm: next nonce counter */
    struct tc_rng rng;         /* aes-gcm-siv nonces */
    uint8_t key[32];           /* to make ctx again after tc_park() */
    uint8_t iv[16];            /* aes-cbc: the chain's IV, as of parking */
};

static const char *const kind_names[] = {
    [TC_AES_CBC] = "aes-cbc",
    [TC_AES_GCM] = "aes-gcm",
    [TC_AES_GCM_SIV] = "aes-gcm-siv",
};

int tc_kind_parse(const char *name, enum tc_kind *kind)
{
    if (name == NULL)
        return -1;
    for (int k = TC_AES_CBC; k <= TC_AES_GCM_SIV; k++) {
        if (strcmp(name, kind_names[k]) == 0) {
            *kind = (enum tc_kind)k;
            return 0;
        }
    }
    return -1;
}

const char *tc_kind_name(enum tc_kind kind)
{
    if (kind < TC_AES_CBC || kind > TC_AES_GCM_SIV)
        return "unknown";
    return kind_names[kind];
}

/* OpenSSL algorithm name for a kind and key length, NULL if invalid. */
static const char *evp_name(enum tc_kind kind, size_t keylen)
{
    static const char *const names[3][3] = {
        { "AES-128-CBC", "AES-192-CBC", "AES-256-CBC" },
        { "AES-128-GCM", "AES-192-GCM", "AES-256-GCM" },
        { "AES-128-GCM-SIV", "AES-192-GCM-SIV", "AES-256-GCM-SIV" },
    };
    int ki = keylen == 16 ? 0 : keylen == 24 ? 1 : keylen == 32 ? 2 : -1;

    if (ki < 0 || kind < TC_AES_CBC || kind > TC_AES_GCM_SIV)
        return NULL;
    return names[kind - TC_AES_CBC][ki];
}

/* Probed on every call rather than cached: a cache would be a mutable
 * global, and callers ask once per configuration or token. */
bool tc_available(enum tc_kind kind)
{
    static const size_t keylens[] = { 16, 24, 32 };

    for (size_t i = 0; i < sizeof(keylens) / sizeof(keylens[0]); i++) {
        const char *name = evp_name(kind, keylens[i]);
        EVP_CIPHER *c;

        if (name == NULL)
            return false;
        c = EVP_CIPHER_fetch(NULL, name, NULL);
        if (c == NULL)
            return false;
        EVP_CIPHER_free(c);
    }
    return true;
}

int tc_rng_draw(const struct tc_rng *rng, void *buf, size_t n)
{
    if (rng == NULL || rng->draw == NULL)
        return rand_bytes(buf, n);
    return rng->draw(rng->ctx, buf, n);
}

static int init_key(struct tc_stream *s, const uint8_t *key, const uint8_t *iv)
{
    int enc = s->dir == TC_SEAL;

    if (EVP_CipherInit_ex2(s->ctx, s->cipher, key,
                           s->kind == TC_AES_CBC ? iv : NULL, enc, NULL) != 1)
        return -1;
    if (s->kind == TC_AES_CBC)
        return EVP_CIPHER_CTX_set_padding(s->ctx, 0) == 1 ? 0 : -1;
    /* Both AEADs default to 12-byte nonces; anything else is a surprise. */
    if (EVP_CIPHER_CTX_get_iv_length(s->ctx) != TC_NONCE_LEN)
        return -1;
    return 0;
}

struct tc_stream *tc_new(enum tc_kind kind, enum tc_dir dir, enum tc_side sender,
                         const uint8_t *key, size_t keylen, const uint8_t *iv)
{
    const char *name = evp_name(kind, keylen);
    struct tc_stream *s;

    if (name == NULL || key == NULL || (dir != TC_SEAL && dir != TC_OPEN))
        return NULL;
    if (kind == TC_AES_CBC && iv == NULL)
        return NULL;
    if (sender != TC_SIDE_CLIENT && sender != TC_SIDE_GATEWAY)
        return NULL;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        return NULL;
    s->kind = (uint8_t)kind;
    s->dir = (uint8_t)dir;
    s->keylen = (uint8_t)keylen;
    s->prefix[3] = sender == TC_SIDE_GATEWAY ? 1 : 0;
    memcpy(s->key, key, keylen);
    if (kind == TC_AES_CBC)
        memcpy(s->iv, iv, sizeof(s->iv));
    s->cipher = EVP_CIPHER_fetch(NULL, name, NULL);
    s->ctx = EVP_CIPHER_CTX_new();
    if (s->cipher == NULL || s->ctx == NULL || init_key(s, key, iv) != 0) {
        tc_free(s);
        return NULL;
    }
    return s;
}

void tc_free(struct tc_stream *s)
{
    if (s == NULL)
        return;
    EVP_CIPHER_CTX_free(s->ctx);
    EVP_CIPHER_free(s->cipher);
    OPENSSL_cleanse(s, sizeof(*s));
    free(s);
}

int tc_park(struct tc_stream *s)
{
    if (s == NULL || s->ctx == NULL)
        return 0;
    /* aes-cbc: where the chain stands (the last ciphertext block). */
    if (s->kind == TC_AES_CBC &&
        EVP_CIPHER_CTX_get_updated_iv(s->ctx, s->iv, sizeof(s->iv)) != 1)
        return -1;
    EVP_CIPHER_CTX_free(s->ctx);
    s->ctx = NULL;
    return 0;
}

bool tc_parked(const struct tc_stream *s)
{
    return s != NULL && s->ctx == NULL;
}

/* Before every unit: a parked stream makes its context again. */
static int unpark(struct tc_stream *s)
{
    if (s->ctx != NULL)
        return 0;
    s->ctx = EVP_CIPHER_CTX_new();
    if (s->ctx == NULL)
        return -1;
    if (init_key(s, s->key, s->iv) != 0) {
        EVP_CIPHER_CTX_free(s->ctx);
        s->ctx = NULL;
        return -1;
    }
    return 0;
}

enum tc_kind tc_stream_kind(const struct tc_stream *s)
{
    return (enum tc_kind)s->kind;
}

size_t tc_overhead(const struct tc_stream *s)
{
    return s->kind == TC_AES_CBC ? 0 : TC_AEAD_OVERHEAD;
}

void tc_set_rng(struct tc_stream *s, const struct tc_rng *rng)
{
    s->rng = rng != NULL ? *rng : (struct tc_rng){ 0 };
}

void tc_set_counter(struct tc_stream *s, uint64_t counter)
{
    s->counter = counter;
    s->exhausted = false;
}

/* Consume the next counter value; -1 once 2^64-1 has been used. */
static int take_counter(struct tc_stream *s, uint64_t *out)
{
    if (s->exhausted)
        return -1;
    *out = s->counter;
    if (s->counter == UINT64_MAX)
        s->exhausted = true;
    else
        s->counter++;
    return 0;
}

static void put_be64(uint8_t *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (uint8_t)v;
        v >>= 8;
    }
}

static uint64_t get_be64(const uint8_t *p)
{
    uint64_t v = 0;

    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}

/* CBC continuation over n bytes (n % 16 == 0, may be 0). */
static int cbc_update(struct tc_stream *s, const uint8_t *in, size_t n, uint8_t *out)
{
    int outl = 0;

    if (n % 16 != 0 || n > INT_MAX)
        return -1;
    if (n == 0)
        return 0;
    if (EVP_CipherUpdate(s->ctx, out, &outl, in, (int)n) != 1 || (size_t)outl != n)
        return -1;
    return 0;
}

/* One AEAD pass with the nonce already in place; tag is read (seal) or
 * checked (open). GCM-SIV needs the tag before decrypting and the whole
 * text in one update, which this order satisfies for both ciphers. */
static int aead_run(struct tc_stream *s, const uint8_t *nonce, const uint8_t *in,
                    size_t n, uint8_t *out, uint8_t *tag)
{
    int enc = s->dir == TC_SEAL;
    int outl = 0;
    uint8_t fin[16];

    if (n > INT_MAX)
        return -1;
    if (EVP_CipherInit_ex2(s->ctx, NULL, NULL, nonce, enc, NULL) != 1)
        return -1;
    if (!enc && EVP_CIPHER_CTX_ctrl(s->ctx, EVP_CTRL_AEAD_SET_TAG, TC_TAG_LEN, tag) != 1)
        return -1;
    if (EVP_CipherUpdate(s->ctx, out, &outl, in, (int)n) != 1 || (size_t)outl != n)
        return -1;
    if (EVP_CipherFinal_ex(s->ctx, fin, &outl) != 1 || outl != 0)
        return -1;
    if (enc && EVP_CIPHER_CTX_ctrl(s->ctx, EVP_CTRL_AEAD_GET_TAG, TC_TAG_LEN, tag) != 1)
        return -1;
    return 0;
}

static int aead_seal(struct tc_stream *s, const uint8_t *in, size_t n, uint8_t *out)
{
    uint8_t nonce[TC_NONCE_LEN];
    uint64_t ctr;

    if (in == out && n > 0)
        return -1;   /* the nonce would overwrite plaintext */
    if (s->kind == TC_AES_GCM) {
        if (take_counter(s, &ctr) != 0)
            return -1;
        memcpy(nonce, s->prefix, 4);
        put_be64(nonce + 4, ctr);
    } else if (tc_rng_draw(&s->rng, nonce, sizeof(nonce)) != 0) {
        return -1;
    }
    memcpy(out, nonce, TC_NONCE_LEN);
    return aead_run(s, nonce, in, n, out + TC_NONCE_LEN, out + TC_NONCE_LEN + n);
}

int tc_seal(struct tc_stream *s, const uint8_t *in, size_t n, uint8_t *out)
{
    if (s == NULL || s->dir != TC_SEAL || unpark(s) != 0)
        return -1;
    if (s->kind == TC_AES_CBC)
        return cbc_update(s, in, n, out);
    return aead_seal(s, in, n, out);
}

int tc_seal_batch(struct tc_stream *s, const uint8_t *in, const uint32_t *lens,
                  size_t count, uint8_t *out)
{
    size_t total = 0;

    if (s == NULL || s->dir != TC_SEAL || unpark(s) != 0)
        return -1;
    if (s->kind == TC_AES_CBC) {
        for (size_t i = 0; i < count; i++) {
            if (lens[i] % 16 != 0)
                return -1;
            total += lens[i];
        }
        return cbc_update(s, in, total, out);
    }
    for (size_t i = 0; i < count; i++) {
        if (aead_seal(s, in, lens[i], out) != 0)
            return -1;
        in += lens[i];
        out += lens[i] + TC_AEAD_OVERHEAD;
    }
    return 0;
}

static int aead_open(struct tc_stream *s, const uint8_t *in, size_t wire_n, uint8_t *out)
{
    uint8_t tag[TC_TAG_LEN];
    uint64_t ctr;
    size_t n;

    if (wire_n < TC_AEAD_OVERHEAD)
        return -1;
    n = wire_n - TC_AEAD_OVERHEAD;
    if (s->kind == TC_AES_GCM) {
        if (memcmp(in, s->prefix, 4) != 0 || s->exhausted)
            return -1;
        if (get_be64(in + 4) != s->counter)
            return -1;
    }
    memcpy(tag, in + TC_NONCE_LEN + n, TC_TAG_LEN);
    if (aead_run(s, in, in + TC_NONCE_LEN, n, out, tag) != 0)
        return -1;
    /* Advance only on success: a failed unit is fatal anyway, and this
     * keeps tests able to retry after a rejected forgery. */
    if (s->kind == TC_AES_GCM)
        (void)take_counter(s, &ctr);
    return 0;
}

int tc_open(struct tc_stream *s, const uint8_t *in, size_t wire_n, uint8_t *out)
{
    if (s == NULL || s->dir != TC_OPEN || unpark(s) != 0)
        return -1;
    if (s->kind == TC_AES_CBC)
        return cbc_update(s, in, wire_n, out);
    return aead_open(s, in, wire_n, out);
}
