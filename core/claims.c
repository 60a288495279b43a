/* core/claims.c - see claims.h. */
#include "core/claims.h"

#include <stdlib.h>
#include <string.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/err.h>

/* datetime.fromtimestamp() range in the reference: 0001-01-01T00:00:00Z to
 * 10000-01-01T00:00:00Z exclusive. Outside it the reference escapes with
 * an exception, i.e. rejects. */
#define VALID_MIN (-62135596800.0)
#define VALID_END 253402300800.0

/* Indexed by enum claims_err. Checklist: one row per enum value. */
static const char *const err_names[] = {
    [CLAIMS_OK] = "ok",
    [CLAIMS_ERR_UTF8] = "not_utf8",
    [CLAIMS_ERR_JSON] = "not_json",
    [CLAIMS_ERR_NOT_OBJECT] = "not_object",
    [CLAIMS_ERR_VALID_MISSING] = "valid_missing",
    [CLAIMS_ERR_VALID_TYPE] = "valid_not_number",
    [CLAIMS_ERR_VALID_RANGE] = "valid_out_of_range",
    [CLAIMS_ERR_HOSTNAME_MISSING] = "hostname_missing",
    [CLAIMS_ERR_HOSTNAME_TYPE] = "hostname_not_string",
    [CLAIMS_ERR_KEY_MISSING] = "aes_key_missing",
    [CLAIMS_ERR_KEY_HEX] = "aes_key_not_hex",
    [CLAIMS_ERR_IV_MISSING] = "aes_iv_missing",
    [CLAIMS_ERR_IV_HEX] = "aes_iv_not_hex",
    [CLAIMS_ERR_VERSION] = "bad_protocol_version",
    [CLAIMS_ERR_ALIAS] = "bad_alias",
    [CLAIMS_ERR_CIPHER] = "unsupported_cipher",
    [CLAIMS_ERR_KEY_SIZE] = "aes_key_bad_size",
    [CLAIMS_ERR_IV_SIZE] = "aes_iv_bad_size",
    [CLAIMS_ERR_NOMEM] = "internal",
};

const char *claims_strerror(enum claims_err err)
{
    if ((size_t)err >= sizeof(err_names) / sizeof(err_names[0]) || err_names[err] == NULL)
        return "unknown";
    return err_names[err];
}

/* A JSON string without NUL, so C can treat it as a C string. */
static const char *cstr(const json_t *v)
{
    if (!json_is_string(v))
        return NULL;
    const char *s = json_string_value(v);
    return strlen(s) == json_string_length(v) ? s : NULL;
}

/* Decode the hex string v (pairs of hex digits, nothing else) into a new
 * buffer: returns it (owner: caller) and its length, or NULL if v is not
 * such a string. An empty string gives a 1-byte buffer and length 0. */
static uint8_t *unhex(const json_t *v, size_t *len)
{
    const char *s = cstr(v);
    size_t n = s != NULL ? strlen(s) : 0;
    uint8_t *buf;

    if (s == NULL || n % 2 != 0 || (buf = malloc(n / 2 + 1)) == NULL)
        return NULL;
    if (n > 0 && OPENSSL_hexstr2buf_ex(buf, n / 2, len, s, '\0') != 1) {
        ERR_clear_error();  /* leave no stale entry on this thread's queue */
        free(buf);
        return NULL;
    }
    if (n == 0)
        *len = 0;
    return buf;
}

static enum claims_err parse_valid(const json_t *o, struct claims *c)
{
    const json_t *v = json_object_get(o, "valid");

    if (v == NULL)
        return CLAIMS_ERR_VALID_MISSING;
    if (!json_is_number(v))
        return CLAIMS_ERR_VALID_TYPE;
    c->valid = json_number_value(v);
    if (!(c->valid >= VALID_MIN && c->valid < VALID_END))
        return CLAIMS_ERR_VALID_RANGE;
    return CLAIMS_OK;
}

static enum claims_err parse_hostname(const json_t *o, struct claims *c)
{
    const json_t *v = json_object_get(o, "hostname");
    const char *s = cstr(v);

    if (v == NULL)
        return CLAIMS_ERR_HOSTNAME_MISSING;
    if (s == NULL)
        return CLAIMS_ERR_HOSTNAME_TYPE;
    c->hostname = strdup(s);
    return c->hostname != NULL ? CLAIMS_OK : CLAIMS_ERR_NOMEM;
}

static enum claims_err parse_key(const json_t *o, struct claims *c)
{
    const json_t *v = json_object_get(o, "aes_key");
    size_t len = 0;
    uint8_t *raw;

    if (v == NULL)
        return CLAIMS_ERR_KEY_MISSING;
    if ((raw = unhex(v, &len)) == NULL)
        return CLAIMS_ERR_KEY_HEX;
    /* Size is checked later, in the reference's order; keep what fits. */
    c->aes_key_len = len;
    memcpy(c->aes_key, raw, len < CLAIMS_KEY_MAX ? len : CLAIMS_KEY_MAX);
    OPENSSL_cleanse(raw, len);
    free(raw);
    return CLAIMS_OK;
}

static enum claims_err parse_iv(const json_t *o, struct claims *c)
{
    const json_t *v = json_object_get(o, "aes_iv");
    size_t len = 0;
    uint8_t *raw;

    if (v == NULL)
        return CLAIMS_ERR_IV_MISSING;
    if ((raw = unhex(v, &len)) == NULL)
        return CLAIMS_ERR_IV_HEX;
    c->aes_iv_len = len;
    memcpy(c->aes_iv, raw, len < CLAIMS_IV_LEN ? len : CLAIMS_IV_LEN);
    free(raw);
    return CLAIMS_OK;
}

static enum claims_err parse_version(const json_t *o, struct claims *c)
{
    const json_t *v = json_object_get(o, "protocol_version");

    c->protocol_version = 0;
    if (v == NULL)
        return CLAIMS_OK;
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return CLAIMS_ERR_VERSION;
    c->protocol_version = json_integer_value(v);
    return CLAIMS_OK;
}

static enum claims_err parse_alias(const json_t *o, struct claims *c)
{
    const json_t *v = json_object_get(o, "alias");
    size_t n;

    if (v == NULL || json_is_null(v))
        return CLAIMS_OK;
    if (!json_is_array(v))
        return CLAIMS_ERR_ALIAS;
    n = json_array_size(v);
    for (size_t i = 0; i < n; i++)
        if (cstr(json_array_get(v, i)) == NULL)
            return CLAIMS_ERR_ALIAS;
    if (n == 0)
        return CLAIMS_OK;
    if ((c->aliases = calloc(n, sizeof(*c->aliases))) == NULL)
        return CLAIMS_ERR_NOMEM;
    for (size_t i = 0; i < n; i++) {
        if ((c->aliases[i] = strdup(cstr(json_array_get(v, i)))) == NULL)
            return CLAIMS_ERR_NOMEM;
        c->naliases = i + 1;
    }
    return CLAIMS_OK;
}

/* Unknown names and non-strings run aes-cbc, as the reference does (and a
 * reference client given the same claim falls back to CBC too). */
static enum claims_err parse_cipher(const json_t *o, struct claims *c)
{
    const json_t *v = json_object_get(o, "cipher");
    enum tc_kind kind;

    c->cipher = TC_AES_CBC;
    c->cipher_unknown = false;
    if (v == NULL)
        return CLAIMS_OK;
    if (tc_kind_parse(cstr(v), &kind) != 0) {
        c->cipher_unknown = true;
        return CLAIMS_OK;
    }
    if (!tc_available(kind))
        return CLAIMS_ERR_CIPHER;
    c->cipher = kind;
    return CLAIMS_OK;
}

static enum claims_err check_sizes(const struct claims *c)
{
    if (c->aes_key_len != 16 && c->aes_key_len != 24 && c->aes_key_len != 32)
        return CLAIMS_ERR_KEY_SIZE;
    if (c->cipher == TC_AES_CBC && c->aes_iv_len != CLAIMS_IV_LEN)
        return CLAIMS_ERR_IV_SIZE;
    return CLAIMS_OK;
}

static enum claims_err parse_object(const json_t *o, struct claims *c)
{
    enum claims_err (*const steps[])(const json_t *, struct claims *) = {
        parse_valid, parse_hostname, parse_key, parse_iv,
        parse_version, parse_alias, parse_cipher,
    };

    if (!json_is_object(o))
        return CLAIMS_ERR_NOT_OBJECT;
    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        enum claims_err err = steps[i](o, c);
        if (err != CLAIMS_OK)
            return err;
    }
    return check_sizes(c);
}

enum claims_err claims_parse(const uint8_t *json, size_t n, struct claims *c)
{
    json_error_t jerr;
    json_t *doc, *probe;
    enum claims_err err;

    memset(c, 0, sizeof(*c));
    c->cipher = TC_AES_CBC;
    /* The reference decodes UTF-8 before parsing JSON: check it first, so
     * the reason matches whatever comes later in the bytes. */
    if ((probe = json_stringn((const char *)json, n)) == NULL)
        return CLAIMS_ERR_UTF8;
    json_decref(probe);
    /* DECODE_ANY: a top-level scalar is JSON, just not an object.
     * ALLOW_NUL: "\u0000" is valid JSON; cstr() refuses it where it matters. */
    doc = json_loadb((const char *)json, n, JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (doc == NULL)
        return CLAIMS_ERR_JSON;
    err = parse_object(doc, c);
    json_decref(doc);
    if (err != CLAIMS_OK)
        claims_fini(c);
    return err;
}

void claims_fini(struct claims *c)
{
    free(c->hostname);
    for (size_t i = 0; i < c->naliases; i++)
        free(c->aliases[i]);
    free(c->aliases);
    OPENSSL_cleanse(c, sizeof(*c));
    memset(c, 0, sizeof(*c));
    c->cipher = TC_AES_CBC;
}

bool claims_expired(const struct claims *c, double now)
{
    return c->valid < now;
}

int claims_version(const struct claims *c)
{
    return c->protocol_version > CLAIMS_VERSION_MAX ? CLAIMS_VERSION_MAX
                                                    : (int)c->protocol_version;
}

size_t claims_nnames(const struct claims *c)
{
    return 1 + c->naliases;
}

const char *claims_name(const struct claims *c, size_t i)
{
    return i == 0 ? c->hostname : c->aliases[i - 1];
}
