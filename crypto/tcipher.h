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

/* A source of random bytes: draw() fills buf with n bytes and returns 0, or
 * -1 on failure. A NULL draw means rand_bytes() (crypto/rand.h).
 * Production code never sets one; tests inject one to replay the vectors'
 * random draws. Shared by the frame encoder and the challenge. */
struct tc_rng {
    int (*draw)(void *ctx, void *buf, size_t n);
    void *ctx;
};

/* Fill buf with n bytes from rng (NULL or a NULL draw: rand_bytes()). */
int tc_rng_draw(const struct tc_rng *rng, void *buf, size_t n);

/* "aes-cbc", "aes-gcm", "aes-gcm-siv" → kind. Returns -1 for any other
 * name (the caller decides: the gateway falls back to CBC, PROTOCOL.md 2.5). */
int tc_kind_parse(const char *name, enum tc_kind *kind);
const char *tc_kind_name(enum tc_kind kind);

/* Whether the linked OpenSSL provides the cipher for 16-, 24- and 32-byte
 * keys, probed at run time on every call (cheap; no cached global). */
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

/* Park an idle stream: its OpenSSL context (~640 bytes with the key
 * schedule) is freed, keeping the key and where the stream stands; the
 * next tc_seal/tc_seal_batch/tc_open makes it again (one allocation and a
 * key setup, ~0.4 us), with output identical to a stream never parked.
 * Between units only. Returns 0 (also when already parked), or -1 when
 * OpenSSL cannot tell the CBC chain's state (the stream is left as it
 * was, still usable). */
int tc_park(struct tc_stream *s);
bool tc_parked(const struct tc_stream *s);

/* Test hooks. tc_set_rng(): where aes-gcm-siv nonces come from (NULL:
 * rand_bytes() again). tc_set_counter(): the next aes-gcm counter this stream
 * seals with or expects, e.g. near 2^64-1 to test exhaustion. */
void tc_set_rng(struct tc_stream *s, const struct tc_rng *rng);
void tc_set_counter(struct tc_stream *s, uint64_t counter);

#endif
