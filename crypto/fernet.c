/* crypto/fernet.c - see fernet.h. */
#include "crypto/fernet.h"

#include <stdlib.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "crypto/b64.h"
#include "crypto/rand.h"

const char *fernet_strerror(enum fernet_err err)
{
    switch (err) {
    case FERNET_OK:           return "ok";
    case FERNET_ERR_BASE64:   return "bad_base64";
    case FERNET_ERR_LENGTH:   return "bad_length";
    case FERNET_ERR_VERSION:  return "bad_version";
    case FERNET_ERR_MAC:      return "bad_mac";
    case FERNET_ERR_PADDING:  return "bad_padding";
    case FERNET_ERR_INTERNAL: return "internal";
    }
    return "unknown";
}

int fernet_key_parse(const char *b64, size_t n, struct fernet_key *key)
{
    uint8_t raw[FERNET_KEY_B64_LEN];  /* b64_dec_max(44) == 33 fits */
    size_t len;
    int rc = -1;

    if (b64_dec_max(n) > sizeof(raw))
        return -1;
    if (b64_url_decode(b64, n, raw, &len) == 0 && len == FERNET_KEY_LEN) {
        memcpy(key->sign, raw, 16);
        memcpy(key->enc, raw + 16, 16);
        rc = 0;
    }
    OPENSSL_cleanse(raw, sizeof(raw));
    return rc;
}

void fernet_key_format(const struct fernet_key *key, char out[FERNET_KEY_B64_LEN + 1])
{
    uint8_t raw[FERNET_KEY_LEN];

    memcpy(raw, key->sign, 16);
    memcpy(raw + 16, key->enc, 16);
    b64_url_encode(raw, sizeof(raw), out);
    OPENSSL_cleanse(raw, sizeof(raw));
}

int fernet_key_generate(struct fernet_key *key)
{
    return rand_bytes(key, sizeof(*key)) == 0 ? 0 : -1;
}

/* Binary length for n plaintext bytes: PKCS#7 always adds 1..16 bytes. */
static size_t bin_len(size_t n)
{
    return FERNET_OVERHEAD + (n / 16 + 1) * 16;
}

size_t fernet_token_len(size_t n)
{
    return b64_enc_len(bin_len(n));
}

size_t fernet_plain_max(size_t n)
{
    return b64_dec_max(n);
}

static int mac(const struct fernet_key *key, const uint8_t *data, size_t n,
               uint8_t out[FERNET_MAC_LEN])
{
    unsigned int len = 0;

    if (HMAC(EVP_sha256(), key->sign, sizeof(key->sign), data, n, out, &len) == NULL ||
        len != FERNET_MAC_LEN)
        return -1;
    return 0;
}

/* AES-128-CBC with PKCS#7 padding, one shot. Returns the output length, -1
 * on failure (bad padding, when decrypting). in == out is allowed. */
static long cbc(int enc, const uint8_t key[16], const uint8_t iv[16],
                const uint8_t *in, size_t n, uint8_t *out)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int a = 0, b = 0;
    long rc = -1;

    if (ctx == NULL || n > (size_t)INT32_MAX)
        goto out;
    if (EVP_CipherInit_ex(ctx, EVP_aes_128_cbc(), NULL, key, iv, enc) == 1 &&
        EVP_CipherUpdate(ctx, out, &a, in, (int)n) == 1 &&
        EVP_CipherFinal_ex(ctx, out + a, &b) == 1)
        rc = (long)a + b;
out:
    EVP_CIPHER_CTX_free(ctx);
    return rc;
}

int fernet_encrypt(const struct fernet_key *key, uint64_t ts, const uint8_t *iv,
                   const uint8_t *plain, size_t n, char *out)
{
    size_t len = bin_len(n);
    uint8_t *bin = malloc(len);
    int rc = -1;

    if (bin == NULL)
        return -1;
    bin[0] = FERNET_VERSION;
    for (int i = 0; i < 8; i++)
        bin[1 + i] = (uint8_t)(ts >> (56 - 8 * i));
    if (iv != NULL)
        memcpy(bin + 9, iv, FERNET_IV_LEN);
    else if (rand_bytes(bin + 9, FERNET_IV_LEN) != 0)
        goto out;
    if (cbc(1, key->enc, bin + 9, plain, n, bin + FERNET_HDR_LEN) !=
        (long)(len - FERNET_OVERHEAD))
        goto out;
    if (mac(key, bin, len - FERNET_MAC_LEN, bin + len - FERNET_MAC_LEN) != 0)
        goto out;
    b64_url_encode(bin, len, out);
    rc = 0;
out:
    free(bin);
    return rc;
}

/* Base64 and layout checks, which do not depend on the key. */
static enum fernet_err decode(const char *token, size_t n, uint8_t *buf, size_t *len)
{
    if (b64_url_decode(token, n, buf, len) != 0)
        return FERNET_ERR_BASE64;
    if (*len < FERNET_MIN_LEN || (*len - FERNET_OVERHEAD) % 16 != 0)
        return FERNET_ERR_LENGTH;
    if (buf[0] != FERNET_VERSION)
        return FERNET_ERR_VERSION;
    return FERNET_OK;
}

enum fernet_err fernet_decrypt(const struct fernet_key *keys, size_t nkeys,
                               const char *token, size_t n,
                               uint8_t *plain, size_t *plain_len,
                               struct fernet_meta *meta)
{
    enum fernet_err err = decode(token, n, plain, plain_len);
    size_t len = *plain_len;
    uint8_t want[FERNET_MAC_LEN];

    if (err != FERNET_OK)
        return err;
    err = FERNET_ERR_MAC;
    for (size_t k = 0; k < nkeys; k++) {
        if (mac(&keys[k], plain, len - FERNET_MAC_LEN, want) != 0)
            return FERNET_ERR_INTERNAL;
        if (CRYPTO_memcmp(want, plain + len - FERNET_MAC_LEN, FERNET_MAC_LEN) != 0)
            continue;
        /* Decrypt in place, so no second buffer is needed. */
        long p = cbc(0, keys[k].enc, plain + 9, plain + FERNET_HDR_LEN,
                     len - FERNET_OVERHEAD, plain + FERNET_HDR_LEN);
        if (p < 0) {
            /* Like the reference's MultiFernet, go on with the next key; it
             * can only verify if it shares this signing half, but then it
             * needs the ciphertext we just overwrote: decode again. */
            err = FERNET_ERR_PADDING;
            if (decode(token, n, plain, &len) != FERNET_OK)
                return FERNET_ERR_INTERNAL;
            continue;
        }
        if (meta != NULL) {
            meta->key_index = k;
            meta->timestamp = 0;
            for (int i = 0; i < 8; i++)
                meta->timestamp = meta->timestamp << 8 | plain[1 + i];
        }
        memmove(plain, plain + FERNET_HDR_LEN, (size_t)p);
        *plain_len = (size_t)p;
        return FERNET_OK;
    }
    return err;
}
