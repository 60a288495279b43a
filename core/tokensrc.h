/* core/tokensrc.h - where the client's token material comes from.
 *
 * The client cannot read its own token (it is encrypted with the
 * gateway's Fernet key), so it is handed the token together with the
 * tunnel key, IV, protocol version and cipher (PROTOCOL.md 2.4, 5.1):
 *
 *   TOKENSRC_ARGS     --token T --aes-key HEX --aes-iv HEX: fixed;
 *                     protocol 0 and aes-cbc unless overridden, as the
 *                     reference client defaults;
 *   TOKENSRC_FILE     --token-file FILE: the JSON object `snitun token
 *                     issue` prints, re-read before every connection;
 *   TOKENSRC_COMMAND  --token-command CMD: /bin/sh -c CMD, its stdout is
 *                     that JSON; run again before every connection, so
 *                     an expired token is renewed.
 *
 * The JSON object (members in any order, unknown ones ignored):
 *
 *   token             string, required: sent as-is (printable ASCII)
 *   aes_key           hex string of 16, 24 or 32 bytes, required
 *   aes_iv            hex string, required; 16 bytes when the cipher run
 *                     is aes-cbc, any even length otherwise (unused)
 *   protocol_version  non-negative integer, default 0 (a value above 2
 *                     runs 2, as the gateway does)
 *   cipher            "aes-cbc" (default), "aes-gcm", "aes-gcm-siv"; any
 *                     other string runs aes-cbc and sets cipher_unknown,
 *                     as the reference and our gateway both do (2.5)
 *   hostname          string, optional (log lines only)
 *   valid             number, optional: expiry (seconds since the epoch)
 *   alias             ignored
 *
 * Overrides (--protocol-version, --cipher) replace the JSON's values.
 *
 * aes-gcm keys must never serve two connections (PROTOCOL.md 3.3): the
 * source remembers a digest (SHA-256, never the key itself) of every
 * aes-gcm key it has marked used, for its last TOKENSRC_USED_MAX keys;
 * tokensrc_key_used() tells the client to wait for a fresh token.
 *
 * Ownership: struct tokensrc borrows its strings (argv/env) for its
 * lifetime. struct tokensrc_mat owns its token and hostname (heap;
 * tokensrc_mat_fini() wipes the key and frees them). Single-threaded.
 */
#ifndef CORE_TOKENSRC_H
#define CORE_TOKENSRC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "crypto/tcipher.h"

#define TOKENSRC_USED_MAX 256
#define TOKENSRC_OUTPUT_MAX 65536   /* bytes of JSON read from a file/command */
#define TOKENSRC_TOKEN_WARN 2048    /* a gateway reads the token in one 2048-byte read */

enum tokensrc_kind {
    TOKENSRC_ARGS = 1,
    TOKENSRC_FILE = 2,
    TOKENSRC_COMMAND = 3,
};

/* What the flags force, whatever the token JSON says. */
struct tokensrc_over {
    bool has_version;
    unsigned version;
    bool has_cipher;
    enum tc_kind cipher;
};

/* One set of material, ready for a connection. */
struct tokensrc_mat {
    char *token;              /* NUL-terminated */
    size_t token_len;
    uint8_t key[32];
    size_t key_len;           /* 16, 24 or 32 */
    uint8_t iv[16];
    size_t iv_len;            /* 16, or 0 for an AEAD token with another size */
    unsigned version;         /* 0..2 */
    enum tc_kind cipher;
    bool cipher_unknown;      /* the JSON named a cipher we do not know */
    char *hostname;           /* NULL when absent */
    double valid;             /* 0 when absent */
};

struct tokensrc {
    enum tokensrc_kind kind;
    const char *token, *key_hex, *iv_hex;   /* TOKENSRC_ARGS */
    const char *path;                       /* TOKENSRC_FILE */
    const char *command;                    /* TOKENSRC_COMMAND */
    struct tokensrc_over over;
    int timeout_ms;                         /* command deadline */
    uint8_t used[TOKENSRC_USED_MAX][32];    /* digests of used aes-gcm keys */
    size_t nused;                           /* total ever marked */
};

/* Parse the token JSON text[0..len) into *m, applying ov (may be NULL).
 * Returns 0, or -1 with a one-line reason in err (never the key). */
int tokensrc_parse_json(const char *text, size_t len, const struct tokensrc_over *ov,
                        struct tokensrc_mat *m, char *err, size_t errlen);

/* Material from --token/--aes-key/--aes-iv: protocol 0 and aes-cbc unless
 * ov says otherwise. Returns 0 or -1 with err. */
int tokensrc_from_args(const char *token, const char *key_hex, const char *iv_hex,
                       const struct tokensrc_over *ov, struct tokensrc_mat *m,
                       char *err, size_t errlen);

/* Wipe the key and free the strings; *m is then all zero. */
void tokensrc_mat_fini(struct tokensrc_mat *m);

/* Fill s for one of the kinds; the strings are borrowed. */
void tokensrc_init(struct tokensrc *s, enum tokensrc_kind kind);

/* Get the material for the next connection: the fixed arguments, the file
 * read again, or the command run again (at most s->timeout_ms; killed
 * after). abort_fd (or -1): a readable fd that cuts a running command
 * short (the client's signalfd); then the result is -2. Returns 0, -1
 * with err, or -2. */
int tokensrc_fetch(struct tokensrc *s, int abort_fd, struct tokensrc_mat *m,
                   char *err, size_t errlen);

/* Run /bin/sh -c cmd with stdin from /dev/null and stderr inherited;
 * its stdout (at most TOKENSRC_OUTPUT_MAX - 1 bytes) lands in *out
 * (heap, NUL-terminated, caller frees). Fails (-1, err) when the command
 * cannot start, exits with a status other than 0, is killed, prints too
 * much, or outlives timeout_ms; -2 when abort_fd became readable. */
int tokensrc_run(const char *cmd, int timeout_ms, int abort_fd, char **out, size_t *outlen,
                 char *err, size_t errlen);

/* Whether m's aes-gcm key was already marked used (false for other
 * ciphers: CBC and GCM-SIV keys may serve any number of connections). */
bool tokensrc_key_used(const struct tokensrc *s, const struct tokensrc_mat *m);

/* Remember that m's key served a connection (only aes-gcm keys are kept). */
void tokensrc_mark_used(struct tokensrc *s, const struct tokensrc_mat *m);

#endif
