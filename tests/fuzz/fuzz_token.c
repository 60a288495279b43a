/* tests/fuzz/fuzz_token.c - token_verify on arbitrary bytes, and the claims
 * parser on arbitrary JSON reached through a real token.
 *
 * Each input is used three ways:
 *   1. as a token, verified with the fixed key list [K1, K2];
 *   2. as a plaintext, parsed by claims_parse directly;
 *   3. as a plaintext, encrypted with K1 and verified, so that the claims
 *      layer sees arbitrary JSON behind a good MAC.
 * Oracles (abort on violation): a token we encrypted always passes the
 * Fernet layer and the verdict equals claims_parse's (plus expiry); base64
 * that decodes re-encodes to something that decodes to the same bytes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/claims.h"
#include "core/token.h"
#include "crypto/b64.h"
#include "crypto/fernet.h"

#define NOW 1750000000.0

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void keys_init(struct fernet_key keys[2])
{
    for (int i = 0; i < 16; i++) {
        keys[0].sign[i] = (uint8_t)i;
        keys[0].enc[i] = (uint8_t)(16 + i);
        keys[1].sign[i] = (uint8_t)(32 + i);
        keys[1].enc[i] = (uint8_t)(48 + i);
    }
}

static void as_token(const struct fernet_key *keys, const uint8_t *data, size_t size)
{
    struct claims c;
    struct fernet_meta meta;

    if (token_verify(keys, 2, (const char *)data, size, NOW, &c, &meta) == TOKEN_OK) {
        if (meta.key_index > 1 || c.hostname == NULL)
            abort();
        claims_fini(&c);
    }
}

static void as_plaintext(const struct fernet_key *keys, const uint8_t *data, size_t size)
{
    static const uint8_t iv[16] = { 0 };
    struct claims direct, via;
    enum claims_err perr = claims_parse(data, size, &direct);
    char *tok = malloc(fernet_token_len(size) + 1);
    enum token_err terr, want;

    if (tok == NULL || fernet_encrypt(&keys[0], 1750000000, iv, data, size, tok) != 0)
        abort();
    terr = token_verify(keys, 2, tok, strlen(tok), NOW, &via, NULL);
    want = token_from_claims(perr);
    if (perr == CLAIMS_OK && claims_expired(&direct, NOW))
        want = TOKEN_EXPIRED;
    if (terr != want)
        abort();
    if (terr == TOKEN_OK) {
        if (strcmp(via.hostname, direct.hostname) != 0 || via.naliases != direct.naliases ||
            via.aes_key_len != direct.aes_key_len || via.cipher != direct.cipher)
            abort();
        claims_fini(&via);
    }
    claims_fini(&direct);
    free(tok);
}

static void b64_round_trip(const uint8_t *data, size_t size)
{
    uint8_t *dec = malloc(b64_dec_max(size) + 1), *again;
    char *enc;
    size_t len, len2;

    if (dec == NULL)
        abort();
    if (b64_url_decode((const char *)data, size, dec, &len) == 0) {
        enc = malloc(b64_enc_len(len) + 1);
        again = malloc(len + 3);
        if (enc == NULL || again == NULL || b64_url_encode(dec, len, enc) != b64_enc_len(len) ||
            b64_url_decode(enc, strlen(enc), again, &len2) != 0 || len2 != len ||
            memcmp(again, dec, len) != 0)
            abort();
        free(enc);
        free(again);
    }
    free(dec);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fernet_key keys[2];

    keys_init(keys);
    as_token(keys, data, size);
    as_plaintext(keys, data, size);
    b64_round_trip(data, size);
    return 0;
}
