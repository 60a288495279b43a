/* core/token.c - see token.h. */
#include "core/token.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include <openssl/crypto.h>

/* The numbering promised in token.h. */
_Static_assert((int)TOKEN_BAD_BASE64 == (int)FERNET_ERR_BASE64, "fernet map");
_Static_assert((int)TOKEN_BAD_PADDING == (int)FERNET_ERR_PADDING, "fernet map");
_Static_assert((int)TOKEN_NOT_UTF8 == (int)CLAIMS_ERR_UTF8 + 5, "claims map");
_Static_assert((int)TOKEN_IV_SIZE == (int)CLAIMS_ERR_IV_SIZE + 5, "claims map");

/* Tokens up to the gateway's 4096-byte read decrypt on the stack. */
#define STACK_PLAIN 3072

/* A keys file holds a handful of 45-byte lines; anything this big is a
 * wrong path. */
#define KEYS_FILE_MAX 65536

/* Indexed by enum token_err. */
static const char *const descriptions[TOKEN_ERR_COUNT] = {
    [TOKEN_OK] = "token accepted",
    [TOKEN_BAD_BASE64] = "token is not URL-safe base64",
    [TOKEN_BAD_LENGTH] = "decoded token is too short or not 57 + 16n bytes",
    [TOKEN_BAD_VERSION] = "token does not start with Fernet version 0x80",
    [TOKEN_BAD_MAC] = "no key's HMAC matches the token",
    [TOKEN_BAD_PADDING] = "HMAC matches but the PKCS#7 padding is bad",
    [TOKEN_NOT_UTF8] = "claims are not UTF-8",
    [TOKEN_NOT_JSON] = "claims are not JSON",
    [TOKEN_NOT_OBJECT] = "claims are not a JSON object",
    [TOKEN_VALID_MISSING] = "claim 'valid' is missing",
    [TOKEN_VALID_TYPE] = "claim 'valid' is not a number",
    [TOKEN_VALID_RANGE] = "claim 'valid' is outside the years 1..9999",
    [TOKEN_HOSTNAME_MISSING] = "claim 'hostname' is missing",
    [TOKEN_HOSTNAME_TYPE] = "claim 'hostname' is not a string",
    [TOKEN_KEY_MISSING] = "claim 'aes_key' is missing",
    [TOKEN_KEY_HEX] = "claim 'aes_key' is not a hex string",
    [TOKEN_IV_MISSING] = "claim 'aes_iv' is missing",
    [TOKEN_IV_HEX] = "claim 'aes_iv' is not a hex string",
    [TOKEN_VERSION] = "claim 'protocol_version' is not a non-negative integer",
    [TOKEN_ALIAS] = "claim 'alias' is not null or an array of strings",
    [TOKEN_CIPHER] = "claim 'cipher' names a cipher this OpenSSL lacks",
    [TOKEN_KEY_SIZE] = "claim 'aes_key' is not 16, 24 or 32 bytes",
    [TOKEN_IV_SIZE] = "claim 'aes_iv' is not 16 bytes (needed by aes-cbc)",
    [TOKEN_EXPIRED] = "claim 'valid' is in the past",
    [TOKEN_INTERNAL] = "internal error (OpenSSL or memory)",
};

enum token_err token_from_fernet(enum fernet_err err)
{
    if (err == FERNET_OK)
        return TOKEN_OK;
    if (err >= FERNET_ERR_BASE64 && err <= FERNET_ERR_PADDING)
        return (enum token_err)err;
    return TOKEN_INTERNAL;
}

enum token_err token_from_claims(enum claims_err err)
{
    if (err == CLAIMS_OK)
        return TOKEN_OK;
    if (err >= CLAIMS_ERR_UTF8 && err <= CLAIMS_ERR_IV_SIZE)
        return (enum token_err)(err + 5);
    return TOKEN_INTERNAL;
}

const char *token_strerror(enum token_err err)
{
    if (err == TOKEN_OK)
        return "ok";
    if (err >= TOKEN_BAD_BASE64 && err <= TOKEN_BAD_PADDING)
        return fernet_strerror((enum fernet_err)err);
    if (err >= TOKEN_NOT_UTF8 && err <= TOKEN_IV_SIZE)
        return claims_strerror((enum claims_err)(err - 5));
    if (err == TOKEN_EXPIRED)
        return "expired";
    if (err == TOKEN_INTERNAL)
        return "internal";
    return "unknown";
}

const char *token_describe(enum token_err err)
{
    if ((unsigned)err >= TOKEN_ERR_COUNT)
        return "unknown error";
    return descriptions[err];
}

enum token_err token_verify(const struct fernet_key *keys, size_t nkeys,
                            const char *token, size_t n, double now,
                            struct claims *out, struct fernet_meta *meta)
{
    uint8_t stack[STACK_PLAIN];
    size_t cap = fernet_plain_max(n), len = 0;
    uint8_t *buf = cap <= sizeof(stack) ? stack : malloc(cap);
    enum token_err err;

    memset(out, 0, sizeof(*out));
    out->cipher = TC_AES_CBC;
    if (buf == NULL)
        return TOKEN_INTERNAL;
    err = token_from_fernet(fernet_decrypt(keys, nkeys, token, n, buf, &len, meta));
    if (err == TOKEN_OK)
        err = token_from_claims(claims_parse(buf, len, out));
    if (err == TOKEN_OK && claims_expired(out, now)) {
        claims_fini(out);
        err = TOKEN_EXPIRED;
    }
    /* The plaintext holds the tunnel key. */
    OPENSSL_cleanse(buf, cap);
    if (buf != stack)
        free(buf);
    return err;
}

/* Lower-case hex, as Python's bytes.hex(). */
static json_t *hex_string(const uint8_t *p, size_t n)
{
    char *s = malloc(2 * n + 1);
    json_t *v;

    if (s == NULL)
        return NULL;
    for (size_t i = 0; i < n; i++)
        snprintf(s + 2 * i, 3, "%02x", p[i]);
    s[2 * n] = '\0';
    v = json_string(s);
    OPENSSL_cleanse(s, 2 * n);
    free(s);
    return v;
}

static json_t *alias_array(const struct token_req *req)
{
    json_t *a = json_array();

    for (size_t i = 0; a != NULL && i < req->naliases; i++) {
        if (json_array_append_new(a, json_string(req->aliases[i])) != 0) {
            json_decref(a);
            a = NULL;
        }
    }
    return a;
}

char *token_claims_json(const struct token_req *req)
{
    json_t *o = json_object();
    int bad = o == NULL;
    char *text = NULL;

    /* jansson keeps insertion order; set_new returns -1 (and takes no
     * reference) when the value is NULL, so one flag catches every
     * failure, including a hostname that is not UTF-8. */
    bad = bad || json_object_set_new(o, "valid", json_integer(req->valid));
    bad = bad || json_object_set_new(o, "hostname", json_string(req->hostname));
    bad = bad || json_object_set_new(o, "aes_key", hex_string(req->aes_key, req->aes_key_len));
    bad = bad || json_object_set_new(o, "aes_iv", hex_string(req->aes_iv, req->aes_iv_len));
    bad = bad || json_object_set_new(o, "protocol_version",
                                     json_integer(req->protocol_version));
    if (req->cipher != TC_AES_CBC)
        bad = bad || json_object_set_new(o, "cipher", json_string(tc_kind_name(req->cipher)));
    if (req->naliases > 0)
        bad = bad || json_object_set_new(o, "alias", alias_array(req));
    /* No JSON_COMPACT: jansson then separates with ", " and ": ", as
     * Python's json.dumps does. */
    if (!bad)
        text = json_dumps(o, JSON_ENSURE_ASCII);
    json_decref(o);
    return text;
}

int token_issue(const struct fernet_key *key, const struct token_req *req,
                uint64_t ts, const uint8_t *iv, char **out)
{
    char *json = token_claims_json(req);
    size_t n;
    int rc = -1;

    *out = NULL;
    if (json == NULL)
        return -1;
    n = strlen(json);
    if ((*out = malloc(fernet_token_len(n) + 1)) != NULL &&
        fernet_encrypt(key, ts, iv, (const uint8_t *)json, n, *out) == 0)
        rc = 0;
    if (rc != 0) {
        free(*out);
        *out = NULL;
    }
    OPENSSL_cleanse(json, n);
    free(json);
    return rc;
}

int token_keys_add(struct token_keys *ks, const char *b64, size_t n)
{
    struct fernet_key key;

    if (fernet_key_parse(b64, n, &key) != 0)
        return -1;
    if (ks->n == ks->cap) {
        size_t cap = ks->cap ? 2 * ks->cap : 4;
        struct fernet_key *v = calloc(cap, sizeof(*v));

        if (v == NULL) {
            OPENSSL_cleanse(&key, sizeof(key));
            return -1;
        }
        /* Copy and wipe rather than realloc, which may leave key bytes
         * behind in the freed block. */
        if (ks->n > 0)
            memcpy(v, ks->v, ks->n * sizeof(*v));
        if (ks->v != NULL) {
            OPENSSL_cleanse(ks->v, ks->cap * sizeof(*v));
            free(ks->v);
        }
        ks->v = v;
        ks->cap = cap;
    }
    ks->v[ks->n++] = key;
    OPENSSL_cleanse(&key, sizeof(key));
    return 0;
}

static int is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\v' || c == '\f';
}

int token_keys_parse(struct token_keys *ks, const char *text, size_t len,
                     const char *name, char *err, size_t errlen)
{
    size_t line = 0, pos = 0;

    while (pos < len) {
        const char *eol = memchr(text + pos, '\n', len - pos);
        size_t end = eol != NULL ? (size_t)(eol - text) : len;
        size_t a = pos, b = end;

        line++;
        pos = end + 1;
        while (a < b && is_blank(text[a]))
            a++;
        while (b > a && is_blank(text[b - 1]))
            b--;
        if (a == b || text[a] == '#')
            continue;
        if (token_keys_add(ks, text + a, b - a) != 0) {
            snprintf(err, errlen, "%s:%zu: not a Fernet key (need 44 characters of "
                     "URL-safe base64 encoding 32 bytes)", name, line);
            return -1;
        }
    }
    return 0;
}

int token_keys_load(struct token_keys *ks, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *text = malloc(KEYS_FILE_MAX + 1);
    size_t len = 0, got, before = ks->n;
    int rc = -1;

    if (f == NULL || text == NULL) {
        snprintf(err, errlen, "%s: %s", path, f == NULL ? strerror(errno) : "out of memory");
        goto out;
    }
    /* One byte more than allowed tells a full file from a too-long one. */
    while (len <= KEYS_FILE_MAX && (got = fread(text + len, 1, KEYS_FILE_MAX + 1 - len, f)) > 0)
        len += got;
    if (ferror(f))
        snprintf(err, errlen, "%s: read error", path);
    else if (len > KEYS_FILE_MAX)
        snprintf(err, errlen, "%s: larger than %d bytes, not a keys file", path, KEYS_FILE_MAX);
    else if (token_keys_parse(ks, text, len, path, err, errlen) == 0) {
        if (ks->n == before)
            snprintf(err, errlen, "%s: no Fernet key in the file", path);
        else
            rc = 0;
    }
out:
    if (f != NULL)
        fclose(f);
    if (text != NULL) {
        OPENSSL_cleanse(text, len);
        free(text);
    }
    return rc;
}

void token_keys_fini(struct token_keys *ks)
{
    if (ks->v != NULL) {
        OPENSSL_cleanse(ks->v, ks->cap * sizeof(*ks->v));
        free(ks->v);
    }
    memset(ks, 0, sizeof(*ks));
}
