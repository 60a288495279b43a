/* tests/fuzz/fuzz_sni.c - libFuzzer target for core/sni.
 *
 * Parses the input, then a prefix of it cut at an offset taken from the
 * input's last two bytes (so the fuzzer chooses it while the seeds stay
 * plain captures), and checks that the two answers agree:
 *   - NOT_TLS and BAD are final: a prefix with that verdict means the
 *     whole input has the same verdict and reason;
 *   - a prefix that is OK means the whole input is OK with the same name
 *     and hello_len (bytes after the hello never matter);
 *   - a prefix of an OK input is AGAIN or that same OK, never BAD;
 *   - OK with hello_len = h means the first h bytes alone give that OK;
 *   - AGAIN only while the input is shorter than SNI_MAX_INPUT.
 * The prefix is copied to an exact-size heap buffer so ASan sees any read
 * past its end. Any violated check aborts.
 */
#include "core/sni.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool same_ok(const struct sni_result *a, const struct sni_result *b)
{
    return a->hello_len == b->hello_len && a->name_len == b->name_len &&
           memcmp(a->name, b->name, a->name_len + 1) == 0;
}

static void check_one(const struct sni_result *r, enum sni_res res, size_t len)
{
    if (r->why == NULL || r->name[r->name_len] != '\0')
        abort();
    if (res == SNI_OK) {
        if (r->name_len == 0 || r->name_len > SNI_NAME_MAX ||
            r->hello_len > len || r->reason != SNI_R_NONE ||
            memchr(r->name, '\0', r->name_len) != NULL)
            abort();
        return;
    }
    if (r->name_len != 0)
        abort();
    if (res == SNI_AGAIN && (len >= SNI_MAX_INPUT || r->reason != SNI_R_NONE))
        abort();
    if ((res == SNI_BAD || res == SNI_NOT_TLS) && r->reason == SNI_R_NONE)
        abort();
}

static enum sni_res parse_prefix(const uint8_t *data, size_t len, struct sni_result *r)
{
    uint8_t *copy = len > 0 ? malloc(len) : NULL;
    enum sni_res res;

    if (len > 0)
        memcpy(copy, data, len);
    res = sni_parse(copy, len, r);
    free(copy);
    check_one(r, res, len);
    return res;
}

static void check_prefix(const uint8_t *data, size_t cut,
                         enum sni_res full, const struct sni_result *fr)
{
    struct sni_result pr;
    enum sni_res res = parse_prefix(data, cut, &pr);

    switch (res) {
    case SNI_AGAIN:
        break;
    case SNI_OK:
        if (full != SNI_OK || !same_ok(&pr, fr))
            abort();
        break;
    case SNI_NOT_TLS:
    case SNI_BAD:
        if (full != res || fr->reason != pr.reason)
            abort();
        break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct sni_result fr, r;
    enum sni_res full = parse_prefix(data, size, &fr);

    if (full == SNI_OK) {
        char name[SNI_NAME_MAX + 1];
        memcpy(name, fr.name, fr.name_len + 1);
        size_t n = sni_name_normalize(name, fr.name_len);
        if (n == 0 || n > fr.name_len || name[n] != '\0')
            abort();
        if (parse_prefix(data, fr.hello_len, &r) != SNI_OK || !same_ok(&r, &fr))
            abort();
        if (fr.hello_len > 0 &&
            parse_prefix(data, fr.hello_len - 1, &r) != SNI_AGAIN)
            abort();
    }
    if (size >= 2) {
        size_t pick = (size_t)data[size - 1] << 8 | data[size - 2];
        check_prefix(data, pick % size, full, &fr);
    }
    if (size > 0)
        check_prefix(data, size - 1, full, &fr);
    (void)sni_reason_name(fr.reason);
    return 0;
}
