/* crypto/tcipher.h - the tunnel ciphers that protect headers (PROTOCOL.md 3).
 *
 * A struct tc_stream is ONE direction of ONE tunnel: a gateway has a seal
 * stream (what it writes) and an open stream (what it reads); so does a
 * client. Payloads of DATA frames never pass through here.
 *
 *   aes-cbc      one continuing CBC chain per direction, starting at the
 *                token's IV; no padding, no tag; units are multiples of 16.
 *   aes-gcm      nonce = 4-byte sender prefix || 64-bit counter from 0;
 *                unit on the wire = nonce(12) || ciphertext || tag(16).
 *   aes-gcm-siv  as aes-gcm on the wire, 12 random nonce bytes per unit;
 *                only when the linked OpenSSL provides it (3.2+).
 *
 * Every function returning int gives 0 on success and -1 on failure; a
 * failure on a stream is fatal for its tunnel (bad tag, unexpected nonce,
 * counter exhausted, misaligned CBC unit, OpenSSL error). Streams are not
 * thread-safe: each belongs to the shard that owns its tunnel.
 */
#ifndef CRYPTO_TCIPHER_H
#define CRYPTO_TCIPHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum tc_kind {
    TC_AES_CBC = 1,
    TC_AES_GCM = 2,
    TC_AES_GCM_SIV = 3,
};

enum tc_dir {
    TC_SEAL = 1,  /* encrypt what this side writes */
    TC_OPEN = 2,  /* decrypt what the peer wrote */
};

/* The side that SENDS on the stream; selects the GCM nonce prefix
 * (client 00000000, gateway 00000001). */
enum tc_side {
    TC_SIDE_CLIENT = 0,
    TC_SIDE_GATEWAY = 1,
};

#define TC_NONCE_LEN 12
#define TC_TAG_LEN 16
#define TC_AEAD_OVERHEAD (TC_NONCE_LEN + TC_TAG_LEN)

struct tc_stream;

/* "aes-cbc", "aes-gcm", "aes-gcm-siv" → kind. Returns -1 for any other
 * name (the caller decides: the gateway falls back to CBC, PROTOCOL.md 2.5). */
int tc_kind_parse(const char *name, enum tc_kind *kind);
const char *tc_kind_name(enum tc_kind kind);

/* Whether the linked OpenSSL provides the cipher (probed once, at run time). */
bool tc_available(enum tc_kind kind);

/* New stream. key: 16, 24 or 32 bytes. iv: 16 bytes, used by aes-cbc only
 * (may be NULL otherwise). sender: who writes this direction. Returns NULL
 * on bad arguments or when the cipher is unavailable. */
struct tc_stream *tc_new(enum tc_kind kind, enum tc_dir dir, enum tc_side sender,
                         const uint8_t *key, size_t keylen, const uint8_t *iv);
void tc_free(struct tc_stream *s);

enum tc_kind tc_stream_kind(const struct tc_stream *s);

/* Bytes a unit grows by on the wire: 0 (aes-cbc) or 28 (AEAD). */
size_t tc_overhead(const struct tc_stream *s);

/* Seal one unit of n plaintext bytes into out (n + overhead bytes).
 * aes-cbc needs n % 16 == 0. in and out may be the same buffer for CBC
 * only. */
int tc_seal(struct tc_stream *s, const uint8_t *in, size_t n, uint8_t *out);

/* Seal count units laid back to back in `in` (unit i has lens[i] bytes)
 * into out, giving exactly the bytes of count tc_seal() calls in order.
 * aes-cbc does it in one cipher call; this is the batched header path. */
int tc_seal_batch(struct tc_stream *s, const uint8_t *in, const uint32_t *lens,
                  size_t count, uint8_t *out);

/* Open one unit of wire_n bytes (plaintext + overhead) into out
 * (wire_n - overhead bytes). AEAD: verifies the tag and that the nonce is
 * the sender's prefix with the next counter (aes-gcm). */
int tc_open(struct tc_stream *s, const uint8_t *in, size_t wire_n, uint8_t *out);

#endif
