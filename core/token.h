/* core/token.h - the tunnel token as a whole: Fernet layer + claims.
 *
 * token_verify is what the gateway runs on the bytes a client sent first
 * (PROTOCOL.md 2.3-2.5): Fernet-decrypt with the key list, parse and check
 * the claims, check expiry. One enum covers every reason to reject, each
 * with a short stable name (token_strerror) that becomes a log value and
 * a metric label, and a sentence for humans (token_describe).
 *
 * token_issue is the session master's side (`snitun token issue`): claims
 * JSON in the reference generator's member order and separators, then
 * Fernet with the first key.
 *
 * token_keys_* hold an ordered Fernet key list, built from command-line
 * strings and/or a keys file: one key per line, leading and trailing
 * whitespace ignored, blank lines and lines starting with '#' skipped.
 * Messages about bad keys name the source and line, never the key.
 */
#ifndef CORE_TOKEN_H
#define CORE_TOKEN_H

#include <stddef.h>
#include <stdint.h>

#include "core/claims.h"
#include "crypto/fernet.h"
#include "crypto/tcipher.h"

/* Values 1-5 are the Fernet layer (same numbers as enum fernet_err), 6-22
 * the claims layer (enum claims_err + 5), then expiry and internal errors.
 * Checklist: token.c asserts this numbering; a new value needs a row in
 * its description table. */
enum token_err {
    TOKEN_OK = 0,
    TOKEN_BAD_BASE64 = 1,
    TOKEN_BAD_LENGTH = 2,
    TOKEN_BAD_VERSION = 3,
    TOKEN_BAD_MAC = 4,
    TOKEN_BAD_PADDING = 5,
    TOKEN_NOT_UTF8 = 6,
    TOKEN_NOT_JSON = 7,
    TOKEN_NOT_OBJECT = 8,
    TOKEN_VALID_MISSING = 9,
    TOKEN_VALID_TYPE = 10,
    TOKEN_VALID_RANGE = 11,
    TOKEN_HOSTNAME_MISSING = 12,
    TOKEN_HOSTNAME_TYPE = 13,
    TOKEN_KEY_MISSING = 14,
    TOKEN_KEY_HEX = 15,
    TOKEN_IV_MISSING = 16,
    TOKEN_IV_HEX = 17,
    TOKEN_VERSION = 18,
    TOKEN_ALIAS = 19,
    TOKEN_CIPHER = 20,
    TOKEN_KEY_SIZE = 21,
    TOKEN_IV_SIZE = 22,
    TOKEN_EXPIRED = 23,
    TOKEN_INTERNAL = 24,
};

#define TOKEN_ERR_COUNT 25

/* "bad_mac", "expired", ...: the fernet_strerror / claims_strerror name
 * of the underlying error. */
const char *token_strerror(enum token_err err);

/* One sentence for a human ("no key's HMAC matches the token"). */
const char *token_describe(enum token_err err);

enum token_err token_from_fernet(enum fernet_err err);
enum token_err token_from_claims(enum claims_err err);

/* Verify n bytes of token (ASCII, as received) against the ordered key
 * list at time now (seconds since the epoch, fractions allowed). On
 * TOKEN_OK, *out owns the claims (claims_fini) and *meta, if not NULL,
 * says which key verified and the Fernet timestamp (never checked). On
 * failure *out is empty. Never reads past token[n - 1]. */
enum token_err token_verify(const struct fernet_key *keys, size_t nkeys,
                            const char *token, size_t n, double now,
                            struct claims *out, struct fernet_meta *meta);

/* What a new token grants. Borrowed by token_claims_json/token_issue. */
struct token_req {
    int64_t valid;                  /* expiry, seconds since the epoch */
    const char *hostname;
    const char *const *aliases;     /* naliases names, may be NULL if 0 */
    size_t naliases;
    const uint8_t *aes_key;         /* 16, 24 or 32 bytes */
    size_t aes_key_len;
    const uint8_t *aes_iv;          /* 16 bytes */
    size_t aes_iv_len;
    int64_t protocol_version;
    enum tc_kind cipher;
};

/* The claims as JSON text, NUL-terminated, owned by the caller (free()).
 * Members in the reference's order: valid, hostname, aes_key, aes_iv,
 * protocol_version, then cipher only when it is not aes-cbc (as the
 * reference), then alias only when there are aliases; separators ", " and
 * ": ", hex in lower case, non-ASCII escaped. NULL on allocation failure. */
char *token_claims_json(const struct token_req *req);

/* Issue a token: claims JSON encrypted with key at Fernet timestamp ts
 * with IV iv (NULL: random, which is what real tokens must use). On
 * success returns 0 and *out is the NUL-terminated token (caller frees);
 * -1 on failure. */
int token_issue(const struct fernet_key *key, const struct token_req *req,
                uint64_t ts, const uint8_t *iv, char **out);

/* An ordered list of Fernet keys; the all-zero struct is an empty list. */
struct token_keys {
    struct fernet_key *v;
    size_t n;
    size_t cap;
};

/* Append the key written in n characters of b64. Returns 0, or -1 when it
 * is not a Fernet key or memory runs out. */
int token_keys_add(struct token_keys *ks, const char *b64, size_t n);

/* Append every key of a keys-file text (len bytes; see the top of this
 * file). name labels messages ("keys.txt:3: not a Fernet key ..."). On -1
 * err holds the message and keys added before the bad line stay. */
int token_keys_parse(struct token_keys *ks, const char *text, size_t len,
                     const char *name, char *err, size_t errlen);

/* token_keys_parse on the file at path; a file without any key is an
 * error too. Returns 0 or -1 with err filled. */
int token_keys_load(struct token_keys *ks, const char *path, char *err, size_t errlen);

/* Wipe and release the keys; *ks becomes empty. */
void token_keys_fini(struct token_keys *ks);

#endif
