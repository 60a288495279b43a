/* core/claims.h - the JSON claims inside a Fernet token (PROTOCOL.md 2.4,
 * 2.5): parse, check, and say what the gateway runs.
 *
 * Input is the decrypted plaintext, untrusted bytes. Accepted, as the
 * reference accepts them (members in any order, unknown ones ignored,
 * duplicate members: the last one wins):
 *
 *   valid             number (integer or fraction), seconds since the epoch
 *   hostname          string
 *   aes_key           hex string of 16, 24 or 32 bytes (either case)
 *   aes_iv            hex string; 16 bytes when the cipher run is aes-cbc,
 *                     any length for AEAD (decoded, then unused)
 *   protocol_version  non-negative integer, missing = 0, kept as given
 *   cipher            "aes-cbc" (also when missing), "aes-gcm",
 *                     "aes-gcm-siv" (rejected when OpenSSL lacks it); any
 *                     other value runs aes-cbc and sets cipher_unknown, so
 *                     the gateway can log a warning
 *   alias             array of strings, or null / missing for none
 *
 * Each way of failing has its own enum value and a short stable name
 * (claims_strerror), checked in this order: UTF-8, JSON, object, valid,
 * hostname, aes_key, aes_iv (presence and hex), protocol_version, alias,
 * cipher, key size, IV size. Expiry is separate (claims_expired) because
 * the gateway checks it again while the tunnel lives (PROTOCOL.md 2.6).
 *
 * Stricter than the reference, where it accepts things no client sends:
 * non-string hostname (PROTOCOL.md 2.5 requires this), protocol_version
 * that is not a non-negative JSON integer (2.0, true, null, -1), alias
 * that is not an array of strings, strings holding NUL (\u0000), hex with
 * whitespace, valid outside the years 1..9999 (the reference escapes with
 * an exception there too), and numbers jansson cannot hold (integers
 * beyond 64 bits, reals beyond double) anywhere in the document.
 */
#ifndef CORE_CLAIMS_H
#define CORE_CLAIMS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "crypto/tcipher.h"

#define CLAIMS_KEY_MAX 32
#define CLAIMS_IV_LEN 16
#define CLAIMS_VERSION_MAX 2   /* highest protocol version defined */

/* Checklist: a new value here needs a name in claims.c and a token_err in
 * core/token.h (plus its row in token.c's map). */
enum claims_err {
    CLAIMS_OK = 0,
    CLAIMS_ERR_UTF8 = 1,           /* plaintext is not UTF-8 */
    CLAIMS_ERR_JSON = 2,           /* not JSON */
    CLAIMS_ERR_NOT_OBJECT = 3,     /* JSON, but not an object */
    CLAIMS_ERR_VALID_MISSING = 4,
    CLAIMS_ERR_VALID_TYPE = 5,     /* not a number */
    CLAIMS_ERR_VALID_RANGE = 6,    /* outside years 1..9999 */
    CLAIMS_ERR_HOSTNAME_MISSING = 7,
    CLAIMS_ERR_HOSTNAME_TYPE = 8,  /* not a string, or holds NUL */
    CLAIMS_ERR_KEY_MISSING = 9,
    CLAIMS_ERR_KEY_HEX = 10,       /* not a string of hex digit pairs */
    CLAIMS_ERR_IV_MISSING = 11,
    CLAIMS_ERR_IV_HEX = 12,
    CLAIMS_ERR_VERSION = 13,       /* protocol_version not a non-negative integer */
    CLAIMS_ERR_ALIAS = 14,         /* alias not null or an array of strings */
    CLAIMS_ERR_CIPHER = 15,        /* known cipher this OpenSSL lacks */
    CLAIMS_ERR_KEY_SIZE = 16,      /* aes_key not 16, 24 or 32 bytes */
    CLAIMS_ERR_IV_SIZE = 17,       /* aes_iv not 16 bytes with aes-cbc */
    CLAIMS_ERR_NOMEM = 18,
};

/* What a token grants. Strings are owned by the struct (claims_fini). */
struct claims {
    double valid;                 /* expiry, seconds since the epoch */
    char *hostname;
    char **aliases;               /* naliases strings, in token order */
    size_t naliases;
    uint8_t aes_key[CLAIMS_KEY_MAX];
    size_t aes_key_len;           /* 16, 24 or 32 */
    uint8_t aes_iv[CLAIMS_IV_LEN];
    size_t aes_iv_len;            /* as decoded; aes_iv holds the first
                                   * min(aes_iv_len, 16) bytes */
    int64_t protocol_version;     /* as given, missing = 0 */
    enum tc_kind cipher;          /* the cipher to run */
    bool cipher_unknown;          /* the claim named no known cipher: aes-cbc runs */
};

/* Short stable name ("expired", "aes_key_bad_size") for logs and metrics. */
const char *claims_strerror(enum claims_err err);

/* Parse n bytes of plaintext into *c. On CLAIMS_OK, *c owns its strings
 * until claims_fini. On failure *c is left empty (claims_fini is a no-op
 * on it). Never reads past json[n - 1]. */
enum claims_err claims_parse(const uint8_t *json, size_t n, struct claims *c);

/* Release the strings and wipe the key; *c becomes empty. */
void claims_fini(struct claims *c);

/* valid < now; valid == now is still good (PROTOCOL.md 2.5). */
bool claims_expired(const struct claims *c, double now);

/* The version both sides run: protocol_version, capped at 2 (PROTOCOL.md
 * 5.1 says to treat higher versions as 2). */
int claims_version(const struct claims *c);

/* Every name the tunnel serves: index 0 is the hostname, then the aliases. */
size_t claims_nnames(const struct claims *c);
const char *claims_name(const struct claims *c, size_t i);

#endif
