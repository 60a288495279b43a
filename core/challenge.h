/* core/challenge.h - the challenge and answer after the token (PROTOCOL.md 3.5).
 *
 * Gateway: draws 40 random bytes R, sends C = SHA-256(R) as one sealed
 * unit, and later accepts the client's unit only if it opens to
 * SHA-256(C) (compared in constant time). Client: opens the challenge unit
 * to C', answers SHA-256(C') as one sealed unit. Each unit is 32 bytes of
 * plaintext, so CHALLENGE_LEN + tc_overhead() on the wire (32 or 60).
 *
 * These are the first units of each direction: they start the CBC chains
 * and use GCM counter 0; the frame codec continues the same streams. The
 * streams are borrowed. Nothing here allocates or keeps pointers.
 */
#ifndef CORE_CHALLENGE_H
#define CORE_CHALLENGE_H

#include <stddef.h>
#include <stdint.h>

#include "crypto/tcipher.h"

#define CHALLENGE_LEN 32        /* SHA-256 output: C and the answer */
#define CHALLENGE_SEED_LEN 40   /* R: 40 bytes, as the reference draws */
#define CHALLENGE_WIRE_MAX (CHALLENGE_LEN + TC_AEAD_OVERHEAD)

/* Gateway state between sending C and reading the answer. */
struct challenge {
    uint8_t expect[CHALLENGE_LEN];   /* SHA-256(C) */
};

/* Bytes of the challenge or answer unit on the wire for this stream. */
size_t challenge_wire_len(const struct tc_stream *s);

/* Gateway: draw R from rng (NULL: CSPRNG), seal C into out (room for
 * challenge_wire_len(seal) bytes), remember the expected answer.
 * Returns 0 or -1 (random source or cipher failure). */
int challenge_new(struct challenge *c, struct tc_stream *seal,
                  const struct tc_rng *rng, uint8_t *out);

/* Gateway: open the client's unit (exactly challenge_wire_len(open) bytes
 * at in) and compare with the expected answer in constant time. Returns 0
 * when it matches, -1 otherwise (wrong answer, bad tag or nonce). */
int challenge_verify(const struct challenge *c, struct tc_stream *open,
                     const uint8_t *in);

/* Client: open the challenge unit at in (challenge_wire_len(open) bytes)
 * and seal the answer into out (challenge_wire_len(seal) bytes). Returns 0,
 * or -1 when the unit does not open (AEAD) or sealing fails. */
int challenge_answer(struct tc_stream *open, struct tc_stream *seal,
                     const uint8_t *in, uint8_t *out);

#endif
