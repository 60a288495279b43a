/* crypto/b64.c - see b64.h. */
#include "crypto/b64.h"

#include <stdbool.h>
#include <openssl/evp.h>

/* Chunk sizes for the EVP calls: they take int lengths, and decoding goes
 * through a stack buffer to translate the alphabet. 768 bytes encode to
 * exactly 1024 characters, so chunks join without padding in between. */
#define ENC_CHUNK 768
#define DEC_CHUNK 1024

size_t b64_enc_len(size_t n)
{
    return (n + 2) / 3 * 4;
}

size_t b64_dec_max(size_t n)
{
    return n / 4 * 3;
}

size_t b64_url_encode(const uint8_t *in, size_t n, char *out)
{
    size_t len = 0;

    out[0] = '\0';
    for (size_t off = 0; off < n; off += ENC_CHUNK) {
        size_t chunk = n - off < ENC_CHUNK ? n - off : ENC_CHUNK;

        len += (size_t)EVP_EncodeBlock((unsigned char *)out + len, in + off, (int)chunk);
    }
    for (size_t i = 0; i < len; i++) {
        if (out[i] == '+')
            out[i] = '-';
        else if (out[i] == '/')
            out[i] = '_';
    }
    return len;
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Map a character of either alphabet to the standard one EVP expects;
 * 0 for anything that is not a base64 digit ('=' included). */
static char to_std(char c)
{
    if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))
        return c;
    if (c == '-' || c == '+')
        return '+';
    if (c == '_' || c == '/')
        return '/';
    return 0;
}

bool b64_url_prefix_ok(const char *in, size_t n)
{
    size_t i = 0, pad = 0;

    while (i < n && to_std(in[i]) != 0)
        i++;
    while (i < n && in[i] == '=' && pad < 2) {
        i++;
        pad++;
    }
    while (i < n && is_space(in[i]))
        i++;
    return i == n;
}

int b64_url_decode(const char *in, size_t n, uint8_t *out, size_t *outlen)
{
    char buf[DEC_CHUNK];
    size_t pad = 0, written = 0;

    while (n > 0 && is_space(in[n - 1]))
        n--;
    if (n % 4 != 0)
        return -1;
    while (pad < n && pad < 3 && in[n - 1 - pad] == '=')
        pad++;
    if (pad > 2)
        return -1;
    /* EVP_DecodeBlock is lax ("AA=A" decodes): validate every character
     * here, and hand it only digits plus the final padding. */
    for (size_t off = 0; off < n; off += DEC_CHUNK) {
        size_t chunk = n - off < DEC_CHUNK ? n - off : DEC_CHUNK;

        for (size_t i = 0; i < chunk; i++) {
            size_t pos = off + i;

            buf[i] = pos >= n - pad ? 'A' : to_std(in[pos]);
            if (buf[i] == 0)
                return -1;
        }
        int r = EVP_DecodeBlock(out + written, (const unsigned char *)buf, (int)chunk);
        if (r < 0)
            return -1;
        written += (size_t)r;
    }
    /* EVP_DecodeBlock counts the bytes the padding stands for: drop them. */
    *outlen = written - pad;
    return 0;
}
