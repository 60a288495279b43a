/* tests/fuzz/fuzz_proxy.c - libFuzzer target for core/proxy.
 *
 * Feeds the input as the buffered start of a device connection, capped
 * (the gateway's pp_parse) and uncapped (the reference's pure parser), and
 * checks what must hold whatever the bytes: a known result code, a reason
 * exactly when BAD, an OK size within the input and the cap, the header
 * alone (in a buffer of exactly its size) parsing to the same answer and
 * one byte less to AGAIN, and the two caps agreeing below 1500 bytes.
 * A broken invariant traps; the parser itself never asserts.
 * Seeds: tests/fuzz/seeds/proxy/ (the inputs of proxy_protocol.json).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/proxy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check(int ok)
{
    if (!ok)
        __builtin_trap();
}

static void check_result(enum pp_res got, const struct pp_result *r, size_t len,
                         size_t max)
{
    check(got == PP_OK || got == PP_AGAIN || got == PP_NONE || got == PP_BAD);
    check((got == PP_BAD) == (r->reason != PP_R_NONE));
    check(strcmp(pp_reason_name(r->reason), "unknown") != 0);
    check(r->reason != PP_R_EOF);
    if (got == PP_OK) {
        check(r->size > 0 && r->size <= len && r->size <= max);
        check(r->version == 1 || r->version == 2);
        check(r->source.family == AF_UNSPEC || r->source.family == AF_INET ||
              r->source.family == AF_INET6);
        check(r->source.port == 0);
    } else {
        check(r->size == 0 && r->source.family == AF_UNSPEC);
    }
    if (got == PP_AGAIN)
        check(len < max);
}

/* The header alone, in a buffer of exactly its size: same answer; one
 * byte less: AGAIN. */
static void check_header_alone(const uint8_t *data, const struct pp_result *r,
                               size_t max)
{
    uint8_t *h = malloc(r->size);
    struct pp_result a;

    if (h == NULL)
        return;
    memcpy(h, data, r->size);
    check(pp_parse_max(h, r->size, max, &a) == PP_OK);
    check(a.size == r->size && addr_equal(&a.source, &r->source) &&
          a.source.family == r->source.family);
    check(pp_parse_max(h, r->size - 1, max, &a) == PP_AGAIN);
    free(h);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pp_result r, u;
    enum pp_res got = pp_parse(data, size, &r);
    enum pp_res unc = pp_parse_max(data, size, SIZE_MAX, &u);

    check_result(got, &r, size, PP_MAX_HEADER);
    check_result(unc, &u, size, SIZE_MAX);
    if (got == PP_OK)
        check_header_alone(data, &r, PP_MAX_HEADER);
    if (unc == PP_OK)
        check_header_alone(data, &u, SIZE_MAX);

    /* The cap only ever turns an answer into TOO_BIG. */
    if (r.reason != PP_R_TOO_BIG) {
        check(got == unc);
        if (got == PP_OK)
            check(u.size == r.size && addr_equal(&u.source, &r.source));
    }
    return 0;
}
