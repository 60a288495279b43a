/* crypto/rand.h - random bytes from the OpenSSL CSPRNG.
 *
 * Every key, IV, nonce, challenge and padding byte snitun draws comes from
 * here, so tests can see one place where randomness enters. OpenSSL's
 * default DRBG is thread-safe and fork-safe (it reseeds in the child).
 */
#ifndef CRYPTO_RAND_H
#define CRYPTO_RAND_H

#include <stddef.h>

/* Fill buf with n random bytes. Returns 0, or -1 when the DRBG fails (no
 * entropy: the caller must not use buf). n == 0 always succeeds. */
int rand_bytes(void *buf, size_t n);

#endif
