/* tests/unit/test_proxy_build.c - pp_build_v1/pp_build_v2 (core/proxy.h).
 *
 * Every header is checked byte for byte against a hand-annotated
 * expectation, then fed back through pp_parse(): it must parse as a
 * complete header of exactly its length, with the caller as source, and
 * the bytes after it must stay payload. Family mixes (IPv4 caller to an
 * IPv6 endpoint and back), the 0.0.0.0 caller of protocol 0/1, AF_UNSPEC,
 * and too-small buffers are covered.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/proxy.h"

static struct net_addr ip(const char *text, uint16_t port)
{
    struct net_addr a = { .port = port };

    if (inet_pton(AF_INET, text, a.ip) == 1)
        a.family = AF_INET;
    else if (inet_pton(AF_INET6, text, a.ip) == 1)
        a.family = AF_INET6;
    else
        cr_assert_fail("bad test address %s", text);
    return a;
}

/* Parse hdr[0..n) followed by 3 payload bytes, in a heap block of exactly
 * that size (ASan catches over-reads); the source must equal src (no port). */
static void round_trip(const uint8_t *hdr, size_t n, unsigned version,
                       const struct net_addr *src)
{
    uint8_t *buf = malloc(n + 3);
    struct pp_result res;
    struct net_addr want = *src;

    cr_assert_not_null(buf);
    memcpy(buf, hdr, n);
    memcpy(buf + n, "\x16\x03\x01", 3);
    cr_assert_eq(pp_parse(buf, n + 3, &res), PP_OK);
    cr_assert_eq(res.size, n);
    cr_assert_eq(res.version, version);
    want.port = 0;
    if (src->family != AF_INET && src->family != AF_INET6)
        want.family = AF_UNSPEC;
    cr_assert_eq(res.source.family, want.family);
    cr_assert(addr_equal(&res.source, &want) || want.family == AF_UNSPEC);
    /* every strict prefix asks for more bytes */
    for (size_t k = 0; k < n; k++)
        cr_assert_eq(pp_parse(buf, k, &res), PP_AGAIN, "prefix %zu of %zu", k, n);
    free(buf);
}

static void check_v1(const struct net_addr *src, const struct net_addr *dst, const char *want)
{
    uint8_t out[PP_BUILD_MAX];
    size_t n = pp_build_v1(src, dst, out, sizeof(out));

    cr_assert_eq(n, strlen(want), "v1 length %zu, want %zu (%s)", n, strlen(want), want);
    cr_assert_eq(memcmp(out, want, n), 0, "v1 got '%.*s' want '%s'", (int)n, out, want);
    round_trip(out, n, 1, src);
}

static const uint8_t sig[12] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
};

static void check_v2(const struct net_addr *src, const struct net_addr *dst,
                     const uint8_t *want_tail, size_t tail_len)
{
    uint8_t out[PP_BUILD_MAX], want[PP_BUILD_MAX];
    size_t n = pp_build_v2(src, dst, out, sizeof(out));

    memcpy(want, sig, 12);
    memcpy(want + 12, want_tail, tail_len);
    cr_assert_eq(n, 12 + tail_len);
    cr_assert_eq(memcmp(out, want, n), 0);
    round_trip(out, n, 2, src);
}

Test(pp_build_v1, tcp4)
{
    struct net_addr s = ip("203.0.113.7", 0), d = ip("127.0.0.1", 8443);

    check_v1(&s, &d, "PROXY TCP4 203.0.113.7 127.0.0.1 0 8443\r\n");
}

Test(pp_build_v1, tcp6)
{
    struct net_addr s = ip("2001:db8::1234", 0), d = ip("::1", 443);

    check_v1(&s, &d, "PROXY TCP6 2001:db8::1234 ::1 0 443\r\n");
}

Test(pp_build_v1, zero_caller_of_protocol_0)
{
    struct net_addr s = ip("0.0.0.0", 0), d = ip("10.1.2.3", 80);

    check_v1(&s, &d, "PROXY TCP4 0.0.0.0 10.1.2.3 0 80\r\n");
}

Test(pp_build_v1, v4_caller_v6_endpoint)
{
    struct net_addr s = ip("192.0.2.1", 0), d6 = ip("::1", 443), dm = ip("::ffff:10.0.0.9", 443);

    check_v1(&s, &d6, "PROXY TCP4 192.0.2.1 0.0.0.0 0 443\r\n");
    check_v1(&s, &dm, "PROXY TCP4 192.0.2.1 10.0.0.9 0 443\r\n");
}

Test(pp_build_v1, v6_caller_v4_endpoint)
{
    struct net_addr s = ip("2001:db8::1", 0), d = ip("127.0.0.1", 443);

    check_v1(&s, &d, "PROXY TCP6 2001:db8::1 ::ffff:127.0.0.1 0 443\r\n");
}

Test(pp_build_v1, v4_mapped_caller_stays_tcp6)
{
    struct net_addr s = ip("::ffff:192.0.2.5", 0), d = ip("::1", 443);

    check_v1(&s, &d, "PROXY TCP6 ::ffff:192.0.2.5 ::1 0 443\r\n");
}

Test(pp_build_v1, unknown_source)
{
    struct net_addr s = { .family = AF_UNSPEC }, d = ip("127.0.0.1", 443);

    check_v1(&s, &d, "PROXY UNKNOWN\r\n");
}

Test(pp_build_v1, longest_fits_and_cap)
{
    struct net_addr s = ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", 65535);
    struct net_addr d = ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd", 65535);
    const char *want = "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe "
                       "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd 65535 65535\r\n";
    uint8_t out[PP_BUILD_MAX];
    size_t len = strlen(want);

    cr_assert_leq(len, PP_V1_MAX);
    check_v1(&s, &d, want);
    cr_assert_eq(pp_build_v1(&s, &d, out, len + 1), len);  /* room for the NUL */
    cr_assert_eq(pp_build_v1(&s, &d, out, len), 0);
    cr_assert_eq(pp_build_v1(&s, &d, out, 0), 0);
}

Test(pp_build_v2, tcp4)
{
    struct net_addr s = ip("203.0.113.7", 0), d = ip("127.0.0.1", 8443);
    static const uint8_t tail[] = {
        0x21,                   /* version 2, command PROXY */
        0x11,                   /* AF_INET, STREAM */
        0x00, 0x0c,             /* 12 address bytes */
        203, 0, 113, 7,         /* source */
        127, 0, 0, 1,           /* destination */
        0x00, 0x00,             /* source port 0 */
        0x20, 0xfb,             /* destination port 8443 */
    };

    check_v2(&s, &d, tail, sizeof(tail));
}

Test(pp_build_v2, tcp6)
{
    struct net_addr s = ip("2001:db8::1234", 0), d = ip("::1", 443);
    static const uint8_t tail[] = {
        0x21, 0x21, 0x00, 0x24, /* v2 PROXY, AF_INET6 STREAM, 36 bytes */
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        0x00, 0x00, 0x01, 0xbb,
    };

    check_v2(&s, &d, tail, sizeof(tail));
}

Test(pp_build_v2, mixed_families)
{
    struct net_addr s4 = ip("192.0.2.1", 0), d6 = ip("::1", 80);
    struct net_addr s6 = ip("2001:db8::1", 0), d4 = ip("10.0.0.1", 80);
    static const uint8_t tail4[] = {
        0x21, 0x11, 0x00, 0x0c, 192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0x00, 0x50,
    };
    static const uint8_t tail6[] = {
        0x21, 0x21, 0x00, 0x24,
        0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1,
        0x00, 0x00, 0x00, 0x50,
    };

    check_v2(&s4, &d6, tail4, sizeof(tail4));
    check_v2(&s6, &d4, tail6, sizeof(tail6));
}

Test(pp_build_v2, unknown_source_is_local)
{
    struct net_addr s = { .family = AF_UNSPEC }, d = ip("127.0.0.1", 443);
    static const uint8_t tail[] = { 0x20, 0x00, 0x00, 0x00 };

    check_v2(&s, &d, tail, sizeof(tail));
}

Test(pp_build_v2, cap)
{
    struct net_addr s = ip("2001:db8::1", 0), d = ip("::1", 443);
    uint8_t out[52];

    cr_assert_eq(pp_build_v2(&s, &d, out, 52), 52);
    cr_assert_eq(pp_build_v2(&s, &d, out, 51), 0);
    s = ip("192.0.2.1", 0);
    d = ip("127.0.0.1", 1);
    cr_assert_eq(pp_build_v2(&s, &d, out, 28), 28);
    cr_assert_eq(pp_build_v2(&s, &d, out, 27), 0);
}
