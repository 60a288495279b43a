/* crypto/b64.h - URL-safe base64 with '=' padding (RFC 4648 section 5), the
 * encoding of Fernet keys and tokens (PROTOCOL.md 2.1, 2.2).
 *
 * OpenSSL's EVP_EncodeBlock/EVP_DecodeBlock do the arithmetic; this module
 * only swaps the alphabet and decides what input is acceptable.
 *
 * Encoding always produces the canonical form: alphabet A-Z a-z 0-9 - _,
 * padded with '=' to a multiple of 4 characters.
 *
 * Decoding accepts (PROTOCOL.md 2.3 lets a gateway choose; these are the
 * deviations the reference tolerates and the vectors exercise):
 *   - the canonical form;
 *   - '+' and '/' in place of '-' and '_' (standard alphabet), even mixed;
 *   - trailing ASCII whitespace (space, tab, CR, LF), which is ignored.
 * It rejects, as the reference does, missing padding (length not a
 * multiple of 4 after the trailing whitespace), and, stricter than the
 * reference, any other byte outside the alphabet and any '=' that is not
 * one of the last two characters. Bits left over in the last character
 * are not checked (neither does the reference).
 */
#ifndef CRYPTO_B64_H
#define CRYPTO_B64_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Characters needed for n bytes, without the terminating NUL. */
size_t b64_enc_len(size_t n);

/* Bytes a decode of n characters may write (padding included). */
size_t b64_dec_max(size_t n);

/* Encode n bytes of in into out, which must hold b64_enc_len(n) + 1 bytes.
 * Writes a NUL-terminated string; returns its length. */
size_t b64_url_encode(const uint8_t *in, size_t n, char *out);

/* Decode n characters of in (not NUL-terminated) into out, which must hold
 * b64_dec_max(n) bytes. On success returns 0 and stores the decoded length
 * in *outlen; on malformed input returns -1 and out holds garbage. Never
 * reads past in[n - 1]. */
int b64_url_decode(const char *in, size_t n, uint8_t *out, size_t *outlen);

/* Whether in[0..n) can still be the beginning of something
 * b64_url_decode() accepts: digits of either alphabet, then at most two
 * '=', then only trailing whitespace. A reader that receives a token in
 * pieces uses it to give up at the first impossible byte instead of
 * waiting for more. */
bool b64_url_prefix_ok(const char *in, size_t n);

#endif
