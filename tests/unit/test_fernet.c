/* tests/unit/test_fernet.c - crypto/b64, crypto/rand and crypto/fernet,
 * driven by tests/data/fernet.json (key list [K1, K2], clock 1750000000). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "crypto/b64.h"
#include "crypto/fernet.h"
#include "crypto/rand.h"
#include "tests/unit/testutil.h"

/* ---- helpers ------------------------------------------------------------ */

static json_t *vectors(void)
{
    return tu_load_json("fernet.json");
}

/* Key "K1", "K2" or "K3" (its entry is "K3 (not known to server)"). */
static struct fernet_key vec_key(json_t *doc, const char *name)
{
    json_t *keys = json_object_get(doc, "keys"), *k;
    const char *label;
    struct fernet_key key = { { 0 }, { 0 } };

    json_object_foreach(keys, label, k) {
        if (strncmp(label, name, strlen(name)) == 0) {
            const char *b64 = tu_str(k, "key_b64url");
            size_t n;
            uint8_t *raw = tu_unhex(tu_str(k, "raw_hex"), &n);

            cr_assert_eq(fernet_key_parse(b64, strlen(b64), &key), 0);
            cr_assert_eq(n, 32);
            cr_assert_arr_eq(key.sign, raw, 16, "%s signing half", name);
            cr_assert_arr_eq(key.enc, raw + 16, 16, "%s encryption half", name);
            free(raw);
            return key;
        }
    }
    cr_assert_fail("no key %s", name);
    return key;
}

static void server_keys(json_t *doc, struct fernet_key keys[2])
{
    keys[0] = vec_key(doc, "K1");
    keys[1] = vec_key(doc, "K2");
}

/* The case's plaintext bytes, or NULL when the file only describes them
 * ("(first 2048 bytes of ...)"). "(bytes ff fe 7b 7d)" gives those bytes. */
static uint8_t *vec_plain(json_t *c, size_t *n)
{
    const char *p = tu_str(c, "plaintext");

    if (strncmp(p, "(bytes ", 7) == 0) {
        char hex[64] = { 0 };
        size_t k = 0;
        for (const char *s = p + 7; *s && *s != ')'; s++)
            if (*s != ' ')
                hex[k++] = *s;
        return tu_unhex(hex, n);
    }
    if (p[0] == '(')
        return NULL;
    *n = strlen(p);
    return (uint8_t *)strdup(p);
}

/* Cases whose token was altered after encryption. */
static bool damaged(const char *name)
{
    static const char *const names[] = {
        "tampered_hmac", "tampered_ciphertext", "bad_base64_truncated",
        "bad_base64_trailing_newline_tolerated", "standard_alphabet_tolerated",
        "wrong_version_byte", "oversized_token_first_2048_bytes",
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
        if (!strcmp(name, names[i]))
            return true;
    return false;
}

/* What the Fernet layer must say about each case with keys [K1, K2]. */
static enum fernet_err expected_fernet(const char *name)
{
    static const struct { const char *name; enum fernet_err err; } rows[] = {
        { "made_with_unknown_key", FERNET_ERR_MAC },
        { "tampered_hmac", FERNET_ERR_MAC },
        { "tampered_ciphertext", FERNET_ERR_MAC },
        { "bad_base64_truncated", FERNET_ERR_BASE64 },
        { "wrong_version_byte", FERNET_ERR_VERSION },
        { "oversized_token_first_2048_bytes", FERNET_ERR_LENGTH },
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        if (!strcmp(name, rows[i].name))
            return rows[i].err;
    return FERNET_OK;
}

static char *encode(const uint8_t *bin, size_t n)
{
    char *s = malloc(b64_enc_len(n) + 1);
    cr_assert_not_null(s);
    b64_url_encode(bin, n, s);
    return s;
}

static enum fernet_err decrypt(const struct fernet_key *keys, size_t nkeys, const char *tok,
                               uint8_t **plain, size_t *len, struct fernet_meta *meta)
{
    size_t n = strlen(tok);
    *plain = malloc(fernet_plain_max(n) + 1);
    cr_assert_not_null(*plain);
    return fernet_decrypt(keys, nkeys, tok, n, *plain, len, meta);
}

/* ---- b64 ---------------------------------------------------------------- */

Test(b64, rfc4648_vectors)
{
    static const char *const in[] = { "", "f", "fo", "foo", "foob", "fooba", "foobar" };
    static const char *const out[] = { "", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=",
                                       "Zm9vYmFy" };
    for (size_t i = 0; i < 7; i++) {
        char enc[16];
        uint8_t dec[16];
        size_t n = strlen(in[i]), len = 99;

        cr_assert_eq(b64_enc_len(n), strlen(out[i]));
        cr_assert_eq(b64_url_encode((const uint8_t *)in[i], n, enc), strlen(out[i]));
        cr_assert_str_eq(enc, out[i]);
        cr_assert_eq(b64_url_decode(out[i], strlen(out[i]), dec, &len), 0);
        cr_assert_eq(len, n);
        cr_assert_arr_eq(dec, in[i], n);
    }
}

Test(b64, url_alphabet_both_ways)
{
    const uint8_t bin[] = { 0xfb, 0xff, 0xbf };
    char enc[8];
    uint8_t dec[8];
    size_t len;

    b64_url_encode(bin, 3, enc);
    cr_assert_str_eq(enc, "-_-_");
    cr_assert_eq(b64_url_decode("-_-_", 4, dec, &len), 0);
    cr_assert_eq(len, 3);
    cr_assert_arr_eq(dec, bin, 3);
    /* The standard alphabet, and a mix of both, decode the same. */
    cr_assert_eq(b64_url_decode("+/+/", 4, dec, &len), 0);
    cr_assert_arr_eq(dec, bin, 3);
    cr_assert_eq(b64_url_decode("-/+_", 4, dec, &len), 0);
    cr_assert_arr_eq(dec, bin, 3);
}

Test(b64, tolerated_and_rejected)
{
    static const struct { const char *in; int rc; size_t len; } rows[] = {
        { "Zm9v\n", 0, 3 }, { "Zm9v\r\n", 0, 3 }, { "Zm8= \t\n", 0, 2 },
        { "Zg==\n\n", 0, 1 }, { "\n", 0, 0 },
        { "Zg", -1, 0 },          /* missing padding: rejected, as the reference */
        { "Zm8", -1, 0 },
        { "Zm9vY", -1, 0 },
        { " Zm9v", -1, 0 },       /* leading blank */
        { "Zm 9v", -1, 0 },       /* blank inside */
        { "Zm9v!A==", -1, 0 },    /* byte outside both alphabets */
        { "Zg==Zm9v", -1, 0 },    /* padding inside */
        { "Z===", -1, 0 },        /* three padding characters */
        { "====", -1, 0 },
        { "Zm=v", -1, 0 },
        { "Zm9v\0\0\0\0", -1, 0 },
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        uint8_t dec[16];
        size_t len = 99, n = strlen(rows[i].in);

        if (i == sizeof(rows) / sizeof(rows[0]) - 1)
            n = 8;  /* the NUL row: length given explicitly */
        cr_assert_eq(b64_url_decode(rows[i].in, n, dec, &len), rows[i].rc, "row %zu", i);
        if (rows[i].rc == 0)
            cr_assert_eq(len, rows[i].len, "row %zu", i);
    }
}

Test(b64, prefix_ok_agrees_with_decode)
{
    static const struct { const char *in; bool ok; } rows[] = {
        { "", true }, { "g", true }, { "gA", true }, { "gAAA-_+/", true },
        { "gAA=", true }, { "gA==", true }, { "gA==\r\n", true }, { "gA== ", true },
        { "gA===", false }, { "gA=A", false }, { "gA\n=", false }, { "gA*", false },
        { "*", false }, { "gA =", false }, { "gA.", false }, { "gA==\nA", false },
    };

    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        cr_expect_eq(b64_url_prefix_ok(rows[i].in, strlen(rows[i].in)), rows[i].ok,
                     "row %zu '%s'", i, rows[i].in);
    /* Everything the decoder accepts is a good prefix, at every length. */
    const char *tok = "gAAAAABoTuGAR1tJzDwz6IE1ZlF9vu8Z+/==\r\n";
    for (size_t n = 0; n <= strlen(tok); n++)
        cr_assert(b64_url_prefix_ok(tok, n), "prefix %zu", n);
}

Test(b64, never_reads_past_the_length)
{
    /* "Zm9v" followed by garbage that must not be looked at. */
    const char buf[] = "Zm9vZ";
    uint8_t dec[8];
    size_t len;

    cr_assert_eq(b64_url_decode(buf, 4, dec, &len), 0);
    cr_assert_eq(len, 3);
    cr_assert_eq(b64_url_decode(buf, 0, dec, &len), 0);
    cr_assert_eq(len, 0);
}

Test(b64, round_trip_all_lengths_across_chunks)
{
    uint8_t bin[2600], dec[2600];

    cr_assert_eq(rand_bytes(bin, sizeof(bin)), 0);
    for (size_t n = 0; n <= sizeof(bin); n += (n < 100 ? 1 : 37)) {
        char *enc = encode(bin, n);
        size_t len, elen = strlen(enc);

        cr_assert_eq(elen, b64_enc_len(n));
        cr_assert_eq(elen % 4, 0);
        for (size_t i = 0; i < elen; i++)
            cr_assert(enc[i] != '+' && enc[i] != '/', "n=%zu", n);
        cr_assert_eq(b64_url_decode(enc, elen, dec, &len), 0, "n=%zu", n);
        cr_assert_eq(len, n);
        cr_assert_arr_eq(dec, bin, n, "n=%zu", n);
        free(enc);
    }
}

/* ---- rand --------------------------------------------------------------- */

Test(rand, fills_and_differs)
{
    uint8_t a[32] = { 0 }, b[32] = { 0 }, zero[32] = { 0 };

    cr_assert_eq(rand_bytes(a, sizeof(a)), 0);
    cr_assert_eq(rand_bytes(b, sizeof(b)), 0);
    cr_assert_eq(rand_bytes(NULL, 0), 0);
    cr_assert(memcmp(a, b, 32) != 0);
    cr_assert(memcmp(a, zero, 32) != 0);
}

/* ---- keys --------------------------------------------------------------- */

Test(fernet, key_parse_format_generate)
{
    json_t *doc = vectors();
    struct fernet_key k1 = vec_key(doc, "K1"), k, g1, g2;
    char text[FERNET_KEY_B64_LEN + 1];

    fernet_key_format(&k1, text);
    cr_assert_str_eq(text, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
    /* 43 or 45 characters, 31 or 33 bytes, non-base64: not keys. */
    cr_assert_eq(fernet_key_parse(text, 43, &k), -1);
    cr_assert_eq(fernet_key_parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHg==", 44, &k), -1);
    cr_assert_eq(fernet_key_parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gIQ==", 48, &k), -1);
    cr_assert_eq(fernet_key_parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8!", 44, &k), -1);
    cr_assert_eq(fernet_key_parse("", 0, &k), -1);
    cr_assert_eq(fernet_key_parse("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n", 45, &k), 0);
    cr_assert_arr_eq(&k, &k1, sizeof(k));

    cr_assert_eq(fernet_key_generate(&g1), 0);
    cr_assert_eq(fernet_key_generate(&g2), 0);
    cr_assert(memcmp(&g1, &g2, sizeof(g1)) != 0);
    fernet_key_format(&g1, text);
    cr_assert_eq(strlen(text), 44);
    cr_assert_eq(fernet_key_parse(text, 44, &k), 0);
    cr_assert_arr_eq(&k, &g1, sizeof(k));
    json_decref(doc);
}

/* ---- the vectors -------------------------------------------------------- */

/* Base64 of every case decodes to the vector's bytes (the tolerated
 * deviations included), or fails where the reference's decoder failed. */
Test(fernet, vectors_base64_layer)
{
    json_t *doc = vectors(), *c;
    size_t i, checked = 0;

    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        json_t *ff = json_object_get(c, "fernet_fields");
        const char *tok = tu_str(c, "token");
        size_t n = strlen(tok), len, want_len;
        uint8_t *dec = malloc(b64_dec_max(n) + 1);

        cr_assert_eq(n, (size_t)json_integer_value(json_object_get(c, "token_len")));
        if (json_object_get(ff, "decode_error") != NULL) {
            cr_assert_eq(b64_url_decode(tok, n, dec, &len), -1, "%s", tu_str(c, "name"));
        } else {
            uint8_t *want = tu_unhex(tu_str(ff, "decoded_hex"), &want_len);
            cr_assert_eq(b64_url_decode(tok, n, dec, &len), 0, "%s", tu_str(c, "name"));
            cr_assert_eq(len, want_len, "%s", tu_str(c, "name"));
            cr_assert_arr_eq(dec, want, len, "%s", tu_str(c, "name"));
            free(want);
        }
        free(dec);
        checked++;
    }
    cr_assert_eq(checked, 37);
    json_decref(doc);
}

/* Every case through fernet_decrypt with [K1, K2]: the exact error, or the
 * exact plaintext, key index and timestamp. */
Test(fernet, vectors_decrypt_with_server_keys)
{
    json_t *doc = vectors(), *c;
    struct fernet_key keys[2];
    size_t i, ok = 0, bad = 0;

    server_keys(doc, keys);
    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = tu_str(c, "name"), *with = tu_str(c, "made_with_key");
        enum fernet_err want = expected_fernet(name);
        struct fernet_meta meta = { 99, 0 };
        uint8_t *plain, *vp;
        size_t len, vlen;
        enum fernet_err got = decrypt(keys, 2, tu_str(c, "token"), &plain, &len, &meta);

        cr_assert_eq(got, want, "%s: got %s, want %s", name, fernet_strerror(got),
                     fernet_strerror(want));
        /* A Fernet rejection is always the reference's "Invalid fernet token". */
        if (want != FERNET_OK) {
            json_t *sr = json_object_get(c, "server_result");
            cr_assert_str_eq(tu_str(sr, "message"), "Invalid fernet token", "%s", name);
            cr_assert_str_eq(tu_str(sr, "cause"), "InvalidToken", "%s", name);
            bad++;
        } else {
            json_t *ff = json_object_get(c, "fernet_fields");
            cr_assert_eq(meta.key_index, strcmp(with, "K2") == 0 ? 1u : 0u, "%s", name);
            cr_assert_eq(meta.timestamp,
                         (uint64_t)json_integer_value(json_object_get(ff, "timestamp")),
                         "%s", name);
            if ((vp = vec_plain(c, &vlen)) != NULL) {
                cr_assert_eq(len, vlen, "%s", name);
                cr_assert_arr_eq(plain, vp, len, "%s", name);
                free(vp);
            }
            ok++;
        }
        free(plain);
    }
    cr_assert_eq(ok, 31);
    cr_assert_eq(bad, 6);
    json_decref(doc);
}

/* Re-encrypting each intact case's plaintext with its key, timestamp and
 * IV gives the vector's token byte for byte. */
Test(fernet, vectors_reencrypt_byte_for_byte)
{
    json_t *doc = vectors(), *c;
    size_t i, same = 0;

    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = tu_str(c, "name"), *tok = tu_str(c, "token");
        json_t *ff = json_object_get(c, "fernet_fields");
        struct fernet_key key = vec_key(doc, tu_str(c, "made_with_key"));
        size_t n, ivlen;
        uint8_t *plain = vec_plain(c, &n), *iv;
        char *out;

        if (damaged(name)) {
            free(plain);
            continue;
        }
        cr_assert_not_null(plain, "%s", name);
        iv = tu_unhex(tu_str(ff, "iv_hex"), &ivlen);
        out = malloc(fernet_token_len(n) + 1);
        cr_assert_eq(fernet_encrypt(&key, (uint64_t)json_integer_value(
                                        json_object_get(ff, "timestamp")),
                                    iv, plain, n, out), 0);
        cr_assert_eq(strlen(out), fernet_token_len(n), "%s", name);
        cr_assert_str_eq(out, tok, "%s", name);
        /* ... and the key that made it decrypts it back. */
        uint8_t *back;
        size_t blen;
        cr_assert_eq(decrypt(&key, 1, out, &back, &blen, NULL), FERNET_OK, "%s", name);
        cr_assert_eq(blen, n);
        cr_assert_arr_eq(back, plain, n);
        free(back);
        free(out);
        free(iv);
        free(plain);
        same++;
    }
    cr_assert_eq(same, 30);
    json_decref(doc);
}

/* ---- tampering tables --------------------------------------------------- */

static uint8_t *valid_binary(json_t *doc, size_t *n)
{
    json_t *c = json_array_get(json_object_get(doc, "cases"), 0);
    cr_assert_str_eq(tu_str(c, "name"), "valid_v2_cbc_reference_generator");
    return tu_unhex(tu_str(json_object_get(c, "fernet_fields"), "decoded_hex"), n);
}

Test(fernet, every_bit_flip_is_rejected_exactly)
{
    json_t *doc = vectors();
    struct fernet_key keys[2];
    size_t n;
    uint8_t *bin = valid_binary(doc, &n);

    server_keys(doc, keys);
    for (size_t off = 0; off < n; off++) {
        for (int bit = 0; bit < 8; bit += 7) {
            uint8_t *plain;
            size_t len;
            char *tok;

            bin[off] ^= (uint8_t)(1u << bit);
            tok = encode(bin, n);
            enum fernet_err got = decrypt(keys, 2, tok, &plain, &len, NULL);
            /* Byte 0 is the version; every other byte is covered by the MAC. */
            cr_assert_eq(got, off == 0 ? FERNET_ERR_VERSION : FERNET_ERR_MAC,
                         "offset %zu bit %d: %s", off, bit, fernet_strerror(got));
            bin[off] ^= (uint8_t)(1u << bit);
            free(tok);
            free(plain);
        }
    }
    free(bin);
    json_decref(doc);
}

Test(fernet, every_binary_truncation_is_rejected_exactly)
{
    json_t *doc = vectors();
    struct fernet_key keys[2];
    size_t n;
    uint8_t *bin = valid_binary(doc, &n);

    server_keys(doc, keys);
    for (size_t cut = 0; cut < n; cut++) {
        uint8_t *plain;
        size_t len;
        char *tok = encode(bin, cut);
        enum fernet_err want = cut < FERNET_MIN_LEN || (cut - 57) % 16 != 0
                                   ? FERNET_ERR_LENGTH : FERNET_ERR_MAC;

        cr_assert_eq(decrypt(keys, 2, tok, &plain, &len, NULL), want, "length %zu", cut);
        free(tok);
        free(plain);
    }
    free(bin);
    json_decref(doc);
}

Test(fernet, every_text_truncation_and_suffix)
{
    json_t *doc = vectors();
    json_t *c = json_array_get(json_object_get(doc, "cases"), 0);
    struct fernet_key keys[2];
    const char *tok = tu_str(c, "token");
    size_t n = strlen(tok);
    uint8_t *plain = malloc(fernet_plain_max(n + 8));
    size_t len;

    server_keys(doc, keys);
    for (size_t cut = 0; cut < n; cut++) {
        enum fernet_err got = fernet_decrypt(keys, 2, tok, cut, plain, &len, NULL);
        if (cut % 4 != 0)
            cr_assert_eq(got, FERNET_ERR_BASE64, "cut %zu", cut);
        else
            cr_assert(got == FERNET_ERR_LENGTH || got == FERNET_ERR_MAC ||
                      got == FERNET_ERR_BASE64, "cut %zu: %s", cut, fernet_strerror(got));
    }
    cr_assert_eq(fernet_decrypt(keys, 2, tok, n, plain, &len, NULL), FERNET_OK);

    char *longer = malloc(n + 8);
    memcpy(longer, tok, n);
    memcpy(longer + n, "AAAA", 4);  /* one more base64 quantum after the padding */
    cr_assert_eq(fernet_decrypt(keys, 2, longer, n + 4, plain, &len, NULL), FERNET_ERR_BASE64);
    memcpy(longer + n, "\r\n  ", 4);
    cr_assert_eq(fernet_decrypt(keys, 2, longer, n + 4, plain, &len, NULL), FERNET_OK);
    free(longer);
    free(plain);
    json_decref(doc);
}

/* A token whose HMAC is right but whose last block is not PKCS#7. */
static char *bad_padding_token(const struct fernet_key *key)
{
    uint8_t bin[57 + 16], block[16];
    int a = 0, b = 0;
    unsigned int mlen;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();

    memset(block, 0x11, sizeof(block));  /* last byte 0x11 > 16: bad padding */
    memset(bin, 0, sizeof(bin));
    bin[0] = 0x80;
    for (int i = 0; i < 16; i++)
        bin[9 + i] = (uint8_t)i;
    cr_assert_eq(EVP_EncryptInit_ex(ctx, EVP_aes_128_cbc(), NULL, key->enc, bin + 9), 1);
    EVP_CIPHER_CTX_set_padding(ctx, 0);
    cr_assert_eq(EVP_EncryptUpdate(ctx, bin + 25, &a, block, 16), 1);
    cr_assert_eq(EVP_EncryptFinal_ex(ctx, bin + 25 + a, &b), 1);
    EVP_CIPHER_CTX_free(ctx);
    cr_assert_not_null(HMAC(EVP_sha256(), key->sign, 16, bin, 41, bin + 41, &mlen));
    return encode(bin, sizeof(bin));
}

Test(fernet, bad_padding)
{
    json_t *doc = vectors();
    struct fernet_key keys[2];
    uint8_t *plain;
    size_t len;

    server_keys(doc, keys);
    char *tok = bad_padding_token(&keys[1]);
    cr_assert_eq(decrypt(keys, 2, tok, &plain, &len, NULL), FERNET_ERR_PADDING);
    free(plain);
    /* Only the key whose MAC matched can give a padding error. */
    cr_assert_eq(decrypt(keys, 1, tok, &plain, &len, NULL), FERNET_ERR_MAC);
    free(plain);
    free(tok);
    json_decref(doc);
}

/* Two keys sharing a signing half: the first verifies the MAC but cannot
 * decrypt; like MultiFernet, the second must still get its turn (and see
 * the ciphertext intact although the first decrypted in place). */
Test(fernet, padding_failure_falls_through_to_next_key)
{
    struct fernet_key good, twin;
    const char *msg = "{\"hello\": \"world\"}";
    size_t n = strlen(msg), len;
    uint8_t iv[16] = { 0 }, *plain;
    struct fernet_meta meta;
    char *tok = malloc(fernet_token_len(n) + 1);

    for (int i = 0; i < 16; i++) {
        good.sign[i] = twin.sign[i] = (uint8_t)i;
        good.enc[i] = (uint8_t)(0xa0 + i);
        twin.enc[i] = (uint8_t)(0xb0 + i);
    }
    cr_assert_eq(fernet_encrypt(&good, 1750000000, iv, (const uint8_t *)msg, n, tok), 0);
    cr_assert_eq(decrypt(&twin, 1, tok, &plain, &len, NULL), FERNET_ERR_PADDING);
    free(plain);
    struct fernet_key both[2] = { twin, good };
    cr_assert_eq(decrypt(both, 2, tok, &plain, &len, &meta), FERNET_OK);
    cr_assert_eq(meta.key_index, 1);
    cr_assert_eq(len, n);
    cr_assert_arr_eq(plain, msg, n);
    free(plain);
    free(tok);
}

/* ---- rotation and round trips ------------------------------------------ */

Test(fernet, rotation_encrypt_with_first_accept_any)
{
    json_t *doc = vectors();
    struct fernet_key k1 = vec_key(doc, "K1"), k2 = vec_key(doc, "K2"),
                      k3 = vec_key(doc, "K3");
    const char *msg = "rotate me";
    size_t n = strlen(msg), len;
    char *tok = malloc(fernet_token_len(n) + 1);
    uint8_t *plain;
    struct fernet_meta meta;

    /* The session master's list is [K2, K1]: it encrypts with K2. */
    cr_assert_eq(fernet_encrypt(&k2, 1750000000, NULL, (const uint8_t *)msg, n, tok), 0);
    struct fernet_key server[3] = { k1, k3, k2 };
    cr_assert_eq(decrypt(server, 3, tok, &plain, &len, &meta), FERNET_OK);
    cr_assert_eq(meta.key_index, 2);
    cr_assert_eq(meta.timestamp, 1750000000);
    cr_assert_arr_eq(plain, msg, n);
    free(plain);
    cr_assert_eq(decrypt(server, 2, tok, &plain, &len, &meta), FERNET_ERR_MAC);
    free(plain);
    cr_assert_eq(decrypt(server, 0, tok, &plain, &len, &meta), FERNET_ERR_MAC);
    free(plain);
    free(tok);
    json_decref(doc);
}

Test(fernet, round_trip_lengths_and_random_iv)
{
    struct fernet_key key = { { 0 }, { 0 } };
    uint8_t msg[100];
    char *a, *b;

    cr_assert_eq(fernet_key_generate(&key), 0);
    cr_assert_eq(rand_bytes(msg, sizeof(msg)), 0);
    for (size_t n = 0; n <= sizeof(msg); n++) {
        uint8_t *plain;
        size_t len;
        struct fernet_meta meta;

        a = malloc(fernet_token_len(n) + 1);
        b = malloc(fernet_token_len(n) + 1);
        cr_assert_eq(fernet_encrypt(&key, UINT64_MAX, NULL, msg, n, a), 0);
        cr_assert_eq(fernet_encrypt(&key, UINT64_MAX, NULL, msg, n, b), 0);
        cr_assert_str_neq(a, b, "fresh IV each time");
        cr_assert_eq(strlen(a), b64_enc_len(57 + (n / 16 + 1) * 16));
        cr_assert_eq(strncmp(a, "gP____", 6), 0, "version 80 then timestamp ff..: %s", a);
        cr_assert_eq(decrypt(&key, 1, a, &plain, &len, &meta), FERNET_OK, "n=%zu", n);
        cr_assert_eq(len, n);
        cr_assert_arr_eq(plain, msg, n);
        cr_assert_eq(meta.timestamp, UINT64_MAX);
        free(plain);
        free(a);
        free(b);
    }
}

Test(fernet, strerror_names)
{
    cr_assert_str_eq(fernet_strerror(FERNET_OK), "ok");
    cr_assert_str_eq(fernet_strerror(FERNET_ERR_BASE64), "bad_base64");
    cr_assert_str_eq(fernet_strerror(FERNET_ERR_LENGTH), "bad_length");
    cr_assert_str_eq(fernet_strerror(FERNET_ERR_VERSION), "bad_version");
    cr_assert_str_eq(fernet_strerror(FERNET_ERR_MAC), "bad_mac");
    cr_assert_str_eq(fernet_strerror(FERNET_ERR_PADDING), "bad_padding");
    cr_assert_str_eq(fernet_strerror(FERNET_ERR_INTERNAL), "internal");
}
