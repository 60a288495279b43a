/* crypto/fernet.h - Fernet tokens (PROTOCOL.md 2.1-2.3) over OpenSSL.
 *
 * Binary token: 80 || timestamp (8, big-endian) || IV (16)
 *               || AES-128-CBC(enc key, IV, PKCS#7(plaintext)) (16 n)
 *               || HMAC-SHA256(sign key, everything before) (32),
 * then URL-safe base64 with padding (crypto/b64.h).
 *
 * A key is 32 bytes, written as 44 characters of base64: the first 16 bytes
 * sign, the last 16 encrypt.
 *
 * Decryption tries a list of keys in order (key rotation) and takes the
 * first whose HMAC matches, compared in constant time. The Fernet timestamp
 * is reported, never checked: the reference has no TTL (PROTOCOL.md 2.3).
 *
 * Buffers are always the caller's; nothing here allocates except the
 * scratch copy in fernet_encrypt, which it frees. Key material copied onto
 * the stack is wiped before returning.
 */
#ifndef CRYPTO_FERNET_H
#define CRYPTO_FERNET_H

#include <stddef.h>
#include <stdint.h>

#define FERNET_KEY_LEN 32
#define FERNET_KEY_B64_LEN 44
#define FERNET_IV_LEN 16
#define FERNET_MAC_LEN 32
#define FERNET_HDR_LEN 25      /* version + timestamp + IV */
#define FERNET_OVERHEAD 57     /* header + MAC */
#define FERNET_MIN_LEN 73      /* header + one AES block + MAC */
#define FERNET_VERSION 0x80

struct fernet_key {
    uint8_t sign[16];  /* HMAC-SHA256 key: bytes 0-15 */
    uint8_t enc[16];   /* AES-128 key: bytes 16-31 */
};

/* Why a token did not decrypt. The order of checks is the order here. */
enum fernet_err {
    FERNET_OK = 0,
    FERNET_ERR_BASE64 = 1,   /* not base64 (see b64.h for what passes) */
    FERNET_ERR_LENGTH = 2,   /* decoded length < 73 or not 57 + 16 n */
    FERNET_ERR_VERSION = 3,  /* first byte is not 0x80 */
    FERNET_ERR_MAC = 4,      /* no key's HMAC matches (or no keys) */
    FERNET_ERR_PADDING = 5,  /* a key's HMAC matched, the PKCS#7 padding is bad */
    FERNET_ERR_INTERNAL = 6, /* OpenSSL failure */
};

/* What a successful decrypt learned besides the plaintext. */
struct fernet_meta {
    size_t key_index;    /* position in the key list of the key that verified */
    uint64_t timestamp;  /* the token's creation time, unchecked */
};

/* Short stable name of an error ("bad_mac"), for logs and tests. */
const char *fernet_strerror(enum fernet_err err);

/* Parse a key from n characters of base64 (44 for a canonical key; the
 * decoder's tolerances of b64.h apply). Returns 0, or -1 when it does not
 * decode to exactly 32 bytes. */
int fernet_key_parse(const char *b64, size_t n, struct fernet_key *key);

/* Write the canonical 44-character form plus NUL into out. */
void fernet_key_format(const struct fernet_key *key, char out[FERNET_KEY_B64_LEN + 1]);

/* A fresh key from the CSPRNG. Returns 0 or -1. */
int fernet_key_generate(struct fernet_key *key);

/* Characters of the token for a plaintext of n bytes (without NUL). */
size_t fernet_token_len(size_t n);

/* Bytes fernet_decrypt may write into plain for a token of n characters. */
size_t fernet_plain_max(size_t n);

/* Encrypt n bytes of plain with key, timestamp ts and the given IV (NULL:
 * 16 bytes from the CSPRNG; a fixed IV is for reproducing vectors only).
 * out must hold fernet_token_len(n) + 1 bytes and receives the
 * NUL-terminated token. Returns 0, or -1 on an OpenSSL failure. */
int fernet_encrypt(const struct fernet_key *key, uint64_t ts, const uint8_t *iv,
                   const uint8_t *plain, size_t n, char *out);

/* Verify and decrypt n characters of token with the first of nkeys keys
 * whose HMAC matches. plain must hold fernet_plain_max(n) bytes; it is also
 * the working buffer, so it holds garbage after a failure. On FERNET_OK,
 * *plain_len is the plaintext length and *meta (if not NULL) says which key
 * verified and the token's timestamp. Never reads past token[n - 1]. */
enum fernet_err fernet_decrypt(const struct fernet_key *keys, size_t nkeys,
                               const char *token, size_t n,
                               uint8_t *plain, size_t *plain_len,
                               struct fernet_meta *meta);

#endif
