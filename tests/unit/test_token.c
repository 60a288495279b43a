/* tests/unit/test_token.c - core/token: every case of tests/data/fernet.json
 * through token_verify with the server key list [K1, K2] at now_unix, the
 * issuing side reproducing the reference's tokens byte for byte, and key
 * lists. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/token.h"
#include "tests/unit/testutil.h"

static struct fernet_key vec_key(json_t *doc, const char *name)
{
    json_t *keys = json_object_get(doc, "keys"), *k;
    const char *label;
    struct fernet_key key = { { 0 }, { 0 } };

    json_object_foreach(keys, label, k) {
        if (strncmp(label, name, strlen(name)) == 0) {
            const char *b64 = tu_str(k, "key_b64url");
            cr_assert_eq(fernet_key_parse(b64, strlen(b64), &key), 0);
            return key;
        }
    }
    cr_assert_fail("no key %s", name);
    return key;
}

/* The rejection each rejected case must get. Cross-checked below against
 * the reference's exception, so a row cannot silently contradict it. */
static enum token_err expected_reject(const char *name)
{
    static const struct { const char *name; enum token_err err; } rows[] = {
        { "cipher_aes_gcm_siv", TOKEN_CIPHER },
        { "expired", TOKEN_EXPIRED },
        { "made_with_unknown_key", TOKEN_BAD_MAC },
        { "aes_key_31_bytes", TOKEN_KEY_SIZE },
        { "aes_key_not_hex", TOKEN_KEY_HEX },
        { "aes_iv_8_bytes_cbc", TOKEN_IV_SIZE },
        { "aes_iv_missing_gcm", TOKEN_IV_MISSING },
        { "hostname_missing", TOKEN_HOSTNAME_MISSING },
        { "valid_missing", TOKEN_VALID_MISSING },
        { "valid_is_string", TOKEN_VALID_TYPE },
        { "tampered_hmac", TOKEN_BAD_MAC },
        { "tampered_ciphertext", TOKEN_BAD_MAC },
        { "bad_base64_truncated", TOKEN_BAD_BASE64 },
        { "wrong_version_byte", TOKEN_BAD_VERSION },
        { "payload_not_json", TOKEN_NOT_JSON },
        { "payload_not_utf8", TOKEN_NOT_UTF8 },
        { "payload_json_array", TOKEN_NOT_OBJECT },
        { "oversized_token_first_2048_bytes", TOKEN_BAD_LENGTH },
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++)
        if (!strcmp(name, rows[i].name))
            return rows[i].err;
    cr_assert_fail("rejected case %s has no expected error", name);
    return TOKEN_OK;
}

/* The reference's exception agrees with the error class we give. */
static void check_reference_reason(json_t *sr, enum token_err err, const char *name)
{
    const char *exc = tu_str(sr, "exception");
    json_t *cause = json_object_get(sr, "cause");
    const char *why = json_is_string(cause) ? json_string_value(cause) : "";

    if (!strcmp(why, "InvalidToken"))
        cr_assert(err >= TOKEN_BAD_BASE64 && err <= TOKEN_BAD_PADDING, "%s", name);
    else if (!strcmp(why, "JSONDecodeError"))
        cr_assert_eq(err, TOKEN_NOT_JSON, "%s", name);
    else if (!strcmp(why, "UnicodeDecodeError"))
        cr_assert_eq(err, TOKEN_NOT_UTF8, "%s", name);
    else if (!strcmp(tu_str(sr, "message"), "Token was expired"))
        cr_assert_eq(err, TOKEN_EXPIRED, "%s", name);
    else if (!strcmp(tu_str(sr, "message"), "Unsupported cipher"))
        cr_assert_eq(err, TOKEN_CIPHER, "%s", name);
    else if (!strcmp(exc, "KeyError"))
        cr_assert(err == TOKEN_VALID_MISSING || err == TOKEN_HOSTNAME_MISSING ||
                  err == TOKEN_KEY_MISSING || err == TOKEN_IV_MISSING, "%s", name);
    else if (!strcmp(exc, "TypeError"))
        cr_assert(err == TOKEN_VALID_TYPE || err == TOKEN_NOT_OBJECT, "%s", name);
    else if (!strcmp(exc, "ValueError"))
        cr_assert(err == TOKEN_KEY_HEX || err == TOKEN_KEY_SIZE || err == TOKEN_IV_SIZE,
                  "%s", name);
    else
        cr_assert_fail("%s: unexpected reference exception %s", name, exc);
}

static enum tc_kind transport_kind(const char *transport)
{
    if (!strcmp(transport, "CBCCryptoTransport"))
        return TC_AES_CBC;
    if (!strcmp(transport, "GCMCryptoTransport"))
        return TC_AES_GCM;
    cr_assert_str_eq(transport, "GCMSIVCryptoTransport");
    return TC_AES_GCM_SIV;
}

static void check_accepted(json_t *c, json_t *sr, const struct claims *cl,
                           const struct fernet_meta *meta)
{
    const char *name = tu_str(c, "name");
    json_t *alias = json_object_get(sr, "alias"), *all = json_object_get(sr, "all_hostnames");
    json_t *claims = json_object_get(c, "claims");
    json_t *ff = json_object_get(c, "fernet_fields");

    cr_assert_str_eq(cl->hostname, tu_str(sr, "hostname"), "%s", name);
    cr_assert_eq(cl->naliases, json_array_size(alias), "%s", name);
    for (size_t k = 0; k < cl->naliases; k++)
        cr_assert_str_eq(cl->aliases[k], json_string_value(json_array_get(alias, k)), "%s", name);
    cr_assert_eq(claims_nnames(cl), json_array_size(all), "%s", name);
    for (size_t k = 0; k < claims_nnames(cl); k++)
        cr_assert_str_eq(claims_name(cl, k), json_string_value(json_array_get(all, k)),
                         "%s", name);
    cr_assert_eq(cl->protocol_version,
                 json_integer_value(json_object_get(sr, "protocol_version")), "%s", name);
    cr_assert_eq(claims_version(cl),
                 cl->protocol_version > 2 ? 2 : (int)cl->protocol_version, "%s", name);
    cr_assert_eq(cl->cipher, transport_kind(tu_str(sr, "crypto_transport")), "%s", name);
    cr_assert_eq(cl->cipher_unknown, !strcmp(name, "unknown_cipher_falls_back_to_cbc"),
                 "%s", name);
    cr_assert_eq(cl->valid, json_number_value(json_object_get(claims, "valid")), "%s", name);
    cr_assert_eq(meta->key_index, !strcmp(tu_str(c, "made_with_key"), "K2") ? 1u : 0u,
                 "%s", name);
    cr_assert_eq(meta->timestamp,
                 (uint64_t)json_integer_value(json_object_get(ff, "timestamp")), "%s", name);
    size_t klen;
    uint8_t *key = tu_unhex(tu_str(claims, "aes_key"), &klen);
    cr_assert_eq(cl->aes_key_len, klen, "%s", name);
    cr_assert_arr_eq(cl->aes_key, key, klen, "%s", name);
    free(key);
}

Test(token, every_vector_gets_the_reference_outcome)
{
    json_t *doc = tu_load_json("fernet.json"), *c;
    struct fernet_key keys[2] = { vec_key(doc, "K1"), vec_key(doc, "K2") };
    double now = (double)json_integer_value(json_object_get(doc, "now_unix"));
    size_t i, accepted = 0, rejected = 0;

    cr_assert_eq(now, 1750000000.0);
    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = tu_str(c, "name"), *tok = tu_str(c, "token");
        json_t *sr = json_object_get(c, "server_result");
        bool ok = !strcmp(tu_str(sr, "outcome"), "accepted");
        struct claims cl;
        struct fernet_meta meta;
        enum token_err want = ok ? TOKEN_OK : expected_reject(name);
        enum token_err got;

        /* The reference rejects AES-GCM-SIV only because its runtime lacked
         * it; with an OpenSSL that has it, the token is good. */
        if (!strcmp(name, "cipher_aes_gcm_siv") && tc_available(TC_AES_GCM_SIV))
            want = TOKEN_OK;
        got = token_verify(keys, 2, tok, strlen(tok), now, &cl, &meta);
        cr_assert_eq(got, want, "%s: got %s, want %s", name, token_strerror(got),
                     token_strerror(want));
        if (ok) {
            check_accepted(c, sr, &cl, &meta);
            accepted++;
        } else {
            check_reference_reason(sr, got == TOKEN_OK ? TOKEN_CIPHER : got, name);
            cr_assert_null(cl.hostname);
            rejected++;
        }
        claims_fini(&cl);
    }
    cr_assert_eq(accepted, 19);
    cr_assert_eq(rejected, 18);
    json_decref(doc);
}

Test(token, expiry_boundary_and_fernet_timestamp_ignored)
{
    json_t *doc = tu_load_json("fernet.json"), *c;
    struct fernet_key keys[2] = { vec_key(doc, "K1"), vec_key(doc, "K2") };
    size_t i;

    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = tu_str(c, "name"), *tok = tu_str(c, "token");
        struct claims cl;

        if (!strcmp(name, "valid_equals_now")) {
            cr_assert_eq(token_verify(keys, 2, tok, strlen(tok), 1750000000.0, &cl, NULL),
                         TOKEN_OK);
            claims_fini(&cl);
            cr_assert_eq(token_verify(keys, 2, tok, strlen(tok), 1750000000.5, &cl, NULL),
                         TOKEN_EXPIRED);
        }
        if (!strcmp(name, "fernet_timestamp_far_future") || !strcmp(name, "expired")) {
            /* Long before the Fernet timestamp, the token still verifies. */
            cr_assert_eq(token_verify(keys, 2, tok, strlen(tok), 0.0, &cl, NULL), TOKEN_OK);
            claims_fini(&cl);
        }
    }
    json_decref(doc);
}

/* Build a token_req from a vector's claims, when they have the shape our
 * generator writes (integer valid, the reference's member order, cipher
 * only when not aes-cbc, alias last). Returns false otherwise. */
static bool req_from_claims(json_t *claims, struct token_req *req, uint8_t *key,
                            uint8_t *iv, const char **aliases)
{
    static const char *const order[] = { "valid", "hostname", "aes_key", "aes_iv",
                                         "protocol_version", "cipher", "alias" };
    const char *member;
    json_t *v;
    size_t at = 0, n;
    uint8_t *raw;

    if (!json_is_object(claims))
        return false;
    json_object_foreach(claims, member, v) {
        while (at < 7 && strcmp(order[at], member) != 0)
            at++;
        if (at == 7)
            return false;
    }
    memset(req, 0, sizeof(*req));
    v = json_object_get(claims, "valid");
    if (!json_is_integer(v) || !json_is_string(json_object_get(claims, "hostname")) ||
        !json_is_integer(json_object_get(claims, "protocol_version")))
        return false;
    req->valid = json_integer_value(v);
    req->hostname = json_string_value(json_object_get(claims, "hostname"));
    req->protocol_version = json_integer_value(json_object_get(claims, "protocol_version"));
    req->cipher = TC_AES_CBC;
    if ((v = json_object_get(claims, "cipher")) != NULL &&
        (tc_kind_parse(json_string_value(v), &req->cipher) != 0 || req->cipher == TC_AES_CBC))
        return false;
    const char *hk = json_string_value(json_object_get(claims, "aes_key"));
    const char *hi = json_string_value(json_object_get(claims, "aes_iv"));
    if (hk == NULL || hi == NULL || strspn(hk, "0123456789abcdef") != strlen(hk))
        return false;
    raw = tu_unhex(hk, &n);
    memcpy(key, raw, n);
    req->aes_key = key;
    req->aes_key_len = n;
    free(raw);
    raw = tu_unhex(hi, &n);
    memcpy(iv, raw, n);
    req->aes_iv = iv;
    req->aes_iv_len = n;
    free(raw);
    if ((v = json_object_get(claims, "alias")) != NULL) {
        if (!json_is_array(v) || json_array_size(v) == 0)
            return false;
        for (size_t k = 0; k < json_array_size(v); k++)
            aliases[k] = json_string_value(json_array_get(v, k));
        req->aliases = aliases;
        req->naliases = json_array_size(v);
    }
    return true;
}

Test(token, issue_reproduces_reference_tokens_byte_for_byte)
{
    json_t *doc = tu_load_json("fernet.json"), *c;
    size_t i, same = 0, shaped = 0;

    json_array_foreach(json_object_get(doc, "cases"), i, c) {
        const char *name = tu_str(c, "name");
        json_t *ff = json_object_get(c, "fernet_fields");
        struct token_req req;
        uint8_t key[64], iv[64];
        const char *aliases[100];
        char *json, *tok;
        size_t ivlen;

        if (!req_from_claims(json_object_get(c, "claims"), &req, key, iv, aliases))
            continue;
        json = token_claims_json(&req);
        cr_assert_not_null(json);
        cr_assert_str_eq(json, tu_str(c, "plaintext"), "%s", name);
        free(json);
        shaped++;
        if (json_object_get(ff, "iv_hex") == NULL || strstr(name, "tampered") ||
            strstr(name, "tolerated") || strstr(name, "wrong_version") ||
            strstr(name, "truncated") || strstr(name, "first_2048"))
            continue;
        uint8_t *fiv = tu_unhex(tu_str(ff, "iv_hex"), &ivlen);
        struct fernet_key fk = vec_key(doc, tu_str(c, "made_with_key"));
        cr_assert_eq(token_issue(&fk, &req,
                                 (uint64_t)json_integer_value(json_object_get(ff, "timestamp")),
                                 fiv, &tok), 0);
        cr_assert_str_eq(tok, tu_str(c, "token"), "%s", name);
        free(tok);
        free(fiv);
        same++;
    }
    /* 22 vectors have the generator's claims shape; 16 of them are intact
     * tokens (the others were damaged after encryption). */
    cr_assert_eq(shaped, 22);
    cr_assert_eq(same, 16);
    json_decref(doc);
}

Test(token, issue_then_verify)
{
    struct fernet_key k1, k2;
    uint8_t key[24], iv[16];
    const char *aliases[] = { "www.example.org", "alt.example.org" };
    struct token_req req = {
        .valid = 1750003600, .hostname = "example.org", .aliases = aliases, .naliases = 2,
        .aes_key = key, .aes_key_len = sizeof(key), .aes_iv = iv, .aes_iv_len = sizeof(iv),
        .protocol_version = 1, .cipher = TC_AES_GCM,
    };
    struct claims c;
    struct fernet_meta meta;
    char *tok;

    for (size_t i = 0; i < sizeof(key); i++)
        key[i] = (uint8_t)(0xc0 + i);
    memset(iv, 7, sizeof(iv));
    cr_assert_eq(fernet_key_generate(&k1), 0);
    cr_assert_eq(fernet_key_generate(&k2), 0);
    cr_assert_eq(token_issue(&k2, &req, 1750000000, NULL, &tok), 0);
    struct fernet_key server[2] = { k1, k2 };
    cr_assert_eq(token_verify(server, 2, tok, strlen(tok), 1750000000, &c, &meta), TOKEN_OK);
    cr_assert_eq(meta.key_index, 1);
    cr_assert_eq(meta.timestamp, 1750000000);
    cr_assert_str_eq(c.hostname, "example.org");
    cr_assert_eq(c.naliases, 2);
    cr_assert_str_eq(c.aliases[1], "alt.example.org");
    cr_assert_eq(c.aes_key_len, 24);
    cr_assert_arr_eq(c.aes_key, key, 24);
    cr_assert_arr_eq(c.aes_iv, iv, 16);
    cr_assert_eq(c.protocol_version, 1);
    cr_assert_eq(c.cipher, TC_AES_GCM);
    cr_assert_eq(c.valid, 1750003600.0);
    claims_fini(&c);
    cr_assert_eq(token_verify(server, 1, tok, strlen(tok), 1750000000, &c, &meta),
                 TOKEN_BAD_MAC);
    free(tok);
}

Test(token, claims_json_escapes_like_python)
{
    uint8_t key[16] = { 0 }, iv[16] = { 0 };
    struct token_req req = {
        .valid = 5, .hostname = "a\"b\\c/\n", .aes_key = key, .aes_key_len = 16,
        .aes_iv = iv, .aes_iv_len = 16, .protocol_version = 0, .cipher = TC_AES_CBC,
    };
    char *json = token_claims_json(&req);

    cr_assert_str_eq(json, "{\"valid\": 5, \"hostname\": \"a\\\"b\\\\c/\\n\", "
                           "\"aes_key\": \"00000000000000000000000000000000\", "
                           "\"aes_iv\": \"00000000000000000000000000000000\", "
                           "\"protocol_version\": 0}");
    free(json);
    req.hostname = "\xff";  /* not UTF-8: refused */
    cr_assert_null(token_claims_json(&req));
    char *tok = (char *)1;
    struct fernet_key fk = { { 0 }, { 0 } };
    cr_assert_eq(token_issue(&fk, &req, 0, NULL, &tok), -1);
    cr_assert_null(tok);
}

Test(token, long_tokens_use_the_heap_path)
{
    struct fernet_key k;
    uint8_t key[32] = { 0 }, iv[16] = { 0 };
    const char *aliases[200];
    char names[200][32];
    struct token_req req = {
        .valid = 1750003600, .hostname = "h", .aes_key = key, .aes_key_len = 32,
        .aes_iv = iv, .aes_iv_len = 16, .protocol_version = 2, .cipher = TC_AES_CBC,
        .aliases = aliases, .naliases = 200,
    };
    struct claims c;
    char *tok;

    for (int i = 0; i < 200; i++) {
        snprintf(names[i], sizeof(names[i]), "alias%03d.example.org", i);
        aliases[i] = names[i];
    }
    cr_assert_eq(fernet_key_generate(&k), 0);
    cr_assert_eq(token_issue(&k, &req, 1, NULL, &tok), 0);
    cr_assert_gt(strlen(tok), 6000);
    cr_assert_eq(token_verify(&k, 1, tok, strlen(tok), 1750000000, &c, NULL), TOKEN_OK);
    cr_assert_eq(c.naliases, 200);
    cr_assert_str_eq(c.aliases[199], "alias199.example.org");
    claims_fini(&c);
    free(tok);
}

Test(token, error_names_and_mapping)
{
    for (int a = 0; a < TOKEN_ERR_COUNT; a++) {
        const char *na = token_strerror((enum token_err)a);
        cr_assert_str_neq(na, "unknown", "%d", a);
        cr_assert_str_neq(token_describe((enum token_err)a), "unknown error", "%d", a);
        cr_assert_not_null(token_describe((enum token_err)a));
        for (int b = a + 1; b < TOKEN_ERR_COUNT; b++)
            cr_assert_str_neq(na, token_strerror((enum token_err)b), "%d vs %d", a, b);
    }
    for (int f = FERNET_OK; f <= FERNET_ERR_PADDING; f++)
        cr_assert_str_eq(token_strerror(token_from_fernet((enum fernet_err)f)),
                         fernet_strerror((enum fernet_err)f));
    for (int c = CLAIMS_OK; c < CLAIMS_ERR_NOMEM; c++)
        cr_assert_str_eq(token_strerror(token_from_claims((enum claims_err)c)),
                         claims_strerror((enum claims_err)c));
    cr_assert_eq(token_from_fernet(FERNET_ERR_INTERNAL), TOKEN_INTERNAL);
    cr_assert_eq(token_from_claims(CLAIMS_ERR_NOMEM), TOKEN_INTERNAL);
    cr_assert_str_eq(token_strerror(TOKEN_BAD_MAC), "bad_mac");
    cr_assert_str_eq(token_strerror(TOKEN_EXPIRED), "expired");
    cr_assert_str_eq(token_strerror((enum token_err)TOKEN_ERR_COUNT), "unknown");
}

/* ---- key lists ---------------------------------------------------------- */

#define K1 "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
#define K2 "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="

Test(token_keys, parse_text)
{
    const char *text = "# gateway keys\n\n  " K2 "  \r\n\t# old key below\n" K1 "\n   \n";
    struct token_keys ks = { 0 };
    char err[256] = "";

    cr_assert_eq(token_keys_parse(&ks, text, strlen(text), "keys", err, sizeof(err)), 0);
    cr_assert_eq(ks.n, 2);
    cr_assert_eq(ks.v[0].sign[0], 0x20);
    cr_assert_eq(ks.v[1].sign[0], 0x00);
    cr_assert_eq(ks.v[1].enc[15], 0x1f);
    /* No final newline, many keys (grows past the first allocation). */
    for (int i = 0; i < 9; i++)
        cr_assert_eq(token_keys_parse(&ks, K1, strlen(K1), "k", err, sizeof(err)), 0);
    cr_assert_eq(ks.n, 11);
    token_keys_fini(&ks);
    cr_assert_eq(ks.n, 0);
    cr_assert_null(ks.v);
}

Test(token_keys, bad_line_named_not_echoed)
{
    const char *text = K1 "\n# fine\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8\n";
    struct token_keys ks = { 0 };
    char err[256] = "";

    cr_assert_eq(token_keys_parse(&ks, text, strlen(text), "keys.txt", err, sizeof(err)), -1);
    cr_assert_str_eq(err, "keys.txt:3: not a Fernet key (need 44 characters of URL-safe "
                          "base64 encoding 32 bytes)");
    cr_assert_null(strstr(err, "AAEC"));
    cr_assert_eq(ks.n, 1);
    cr_assert_eq(token_keys_add(&ks, "short", 5), -1);
    cr_assert_eq(ks.n, 1);
    token_keys_fini(&ks);
}

static char *temp_file(const char *content, size_t n)
{
    char *path = strdup("/tmp/snitun_keys_XXXXXX");
    int fd = mkstemp(path);

    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, content, n), (ssize_t)n);
    close(fd);
    return path;
}

Test(token_keys, load_file)
{
    struct token_keys ks = { 0 };
    char err[512] = "";
    char *path = temp_file(K1 "\n" K2 "\n", 90);

    cr_assert_eq(token_keys_load(&ks, path, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(ks.n, 2);
    unlink(path);
    free(path);

    path = temp_file("# nothing\n\n", 11);
    cr_assert_eq(token_keys_load(&ks, path, err, sizeof(err)), -1);
    cr_assert(strstr(err, "no Fernet key in the file") != NULL, "%s", err);
    cr_assert_eq(ks.n, 2);
    unlink(path);
    free(path);

    char *big = malloc(70000);
    memset(big, '#', 70000);
    path = temp_file(big, 70000);
    cr_assert_eq(token_keys_load(&ks, path, err, sizeof(err)), -1);
    cr_assert(strstr(err, "larger than 65536 bytes") != NULL, "%s", err);
    unlink(path);
    free(path);
    free(big);

    cr_assert_eq(token_keys_load(&ks, "/nonexistent/keys", err, sizeof(err)), -1);
    cr_assert_str_eq(err, "/nonexistent/keys: No such file or directory");
    token_keys_fini(&ks);
}
