/* tests/unit/test_proxy.c - core/proxy against tests/data/proxy_protocol.json.
 *
 * Both columns of every vector are checked: the reference's pure buffer
 * parser (pp_parse_max with no cap) and its dual-port streaming reader
 * fed the input then EOF (pp_parse, AGAIN at EOF = closed). Then every
 * valid header split at every offset and byte by byte, payload kept
 * behind the header, boundary tables (v1 107/108/109 bytes, v2 L around
 * the family minimums, the 1500-byte cap) and v1 source addresses whose
 * expected outcome was computed with CPython 3.11's ipaddress, the module
 * the reference uses.
 *
 * Every input is copied into a buffer of exactly its size, so ASan flags
 * any read past it.
 */
#include <criterion/criterion.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/proxy.h"
#include "tests/unit/testutil.h"

/* ---- helpers ------------------------------------------------------------ */

/* Copy of n bytes in a heap block of exactly n bytes (1 for n = 0, never
 * read). */
static uint8_t *exact(const void *src, size_t n)
{
    uint8_t *p = malloc(n ? n : 1);
    cr_assert_not_null(p);
    if (n)
        memcpy(p, src, n);
    return p;
}

/* The reference's error message -> our reason. */
static enum pp_reason reason_of(const char *msg)
{
    static const struct { const char *prefix; enum pp_reason reason; } map[] = {
        { "PROXY v1 header without CRLF", PP_R_V1_NO_CRLF },
        { "PROXY v1 header exceeds maximum length", PP_R_V1_TOO_LONG },
        { "Unsupported PROXY v1 protocol: ", PP_R_V1_PROTO },
        { "Malformed PROXY v1 header", PP_R_V1_FIELDS },
        { "Invalid PROXY v1 source address", PP_R_V1_SOURCE },
        { "PROXY v1 address family mismatch", PP_R_V1_FAMILY },
        { "Unsupported PROXY protocol version", PP_R_V2_VERSION },
        { "Unsupported PROXY v2 command", PP_R_V2_COMMAND },
        { "Truncated PROXY v2 IPv4 address block", PP_R_V2_SHORT_INET },
        { "Truncated PROXY v2 IPv6 address block", PP_R_V2_SHORT_INET6 },
        { "PROXY protocol header exceeds maximum size", PP_R_TOO_BIG },
        { "Connection closed during PROXY protocol header", PP_R_EOF },
    };
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if (!strncmp(msg, map[i].prefix, strlen(map[i].prefix)))
            return map[i].reason;
    cr_assert_fail("unmapped reference message: %s", msg);
    return PP_R_COUNT;
}

/* Expected source: NULL hex = no address (AF_UNSPEC, all zero). */
static void check_source(const struct pp_result *r, const char *packed_hex,
                         const char *name)
{
    struct net_addr want = { 0 };

    if (packed_hex != NULL) {
        size_t n;
        uint8_t *b = tu_unhex(packed_hex, &n);
        cr_assert(n == 4 || n == 16, "%s: packed source of %zu bytes", name, n);
        addr_from_packed(&want, b, n);
        free(b);
    }
    cr_assert(addr_equal(&r->source, &want) && r->source.family == want.family,
              "%s: source family %d, want %d (%s)", name, r->source.family,
              want.family, packed_hex ? packed_hex : "none");
    cr_assert_eq(r->source.port, 0, "%s: port %u", name, r->source.port);
}

struct vec {
    json_t *doc;
    json_t *cases;
};

static struct vec load(void)
{
    struct vec v;
    json_error_t err;

    /* input_ascii holds \u0000 (v2 signatures): tu_load_json() would
     * refuse it, so load with JSON_ALLOW_NUL here. */
    v.doc = json_load_file(tu_data_path("proxy_protocol.json"), JSON_ALLOW_NUL, &err);
    cr_assert_not_null(v.doc, "proxy_protocol.json:%d: %s", err.line, err.text);
    v.cases = json_object_get(v.doc, "cases");
    cr_assert(json_is_array(v.cases) && json_array_size(v.cases) > 40);
    return v;
}

static const char *pure_key = "parse_proxy_protocol_header";
static const char *reader_key = "read_proxy_protocol_header(input then EOF)";

static json_t *column(json_t *c, const char *key)
{
    json_t *col = json_object_get(c, key);
    cr_assert(json_is_object(col), "%s: no %s", tu_str(c, "name"), key);
    return col;
}

/* Packed hex of the source or NULL when the header has none. */
static const char *packed_or_null(json_t *pure)
{
    json_t *p = json_object_get(pure, "source_packed_hex");
    return json_is_string(p) ? json_string_value(p) : NULL;
}

/* Every valid header as one buffer: header + whatever followed it. */
static uint8_t *case_input(json_t *c, size_t *n)
{
    size_t len;
    uint8_t *raw = tu_unhex(tu_str(c, "input_hex"), &len);
    uint8_t *in = exact(raw, len);
    free(raw);
    *n = len;
    return in;
}

static bool is_result(json_t *col, const char *what)
{
    return !strcmp(tu_str(col, "result"), what);
}

/* ---- the vectors: the pure parser -------------------------------------- */

Test(proxy, vectors_pure_parser)
{
    struct vec v = load();
    size_t i;
    json_t *c;

    json_array_foreach(v.cases, i, c) {
        const char *name = tu_str(c, "name");
        json_t *want = column(c, pure_key);
        size_t n;
        uint8_t *in = case_input(c, &n);
        struct pp_result r;
        enum pp_res got = pp_parse_max(in, n, SIZE_MAX, &r);

        if (is_result(want, "header")) {
            cr_assert_eq(got, PP_OK, "%s: got %d", name, got);
            cr_assert_eq(r.reason, PP_R_NONE, "%s", name);
            cr_assert_eq(r.size, (size_t)json_integer_value(json_object_get(want, "size")),
                         "%s: size %zu", name, r.size);
            cr_assert_eq(r.version, in[0] == 'P' ? 1 : 2, "%s", name);
            check_source(&r, packed_or_null(want), name);
            size_t plen;
            uint8_t *pay = tu_unhex(tu_str(want, "payload_after_header_hex"), &plen);
            cr_assert_eq(r.size + plen, n, "%s: payload lost", name);
            cr_assert(!memcmp(in + r.size, pay, plen), "%s: payload differs", name);
            free(pay);
        } else if (is_result(want, "not_proxy")) {
            cr_assert_eq(got, PP_NONE, "%s: got %d", name, got);
            cr_assert_eq(r.size, 0, "%s", name);
            cr_assert_eq(r.version, 0, "%s", name);
        } else if (is_result(want, "incomplete")) {
            cr_assert_eq(got, PP_AGAIN, "%s: got %d", name, got);
            cr_assert_eq(r.reason, PP_R_NONE, "%s", name);
        } else {
            cr_assert(is_result(want, "error"), "%s", name);
            cr_assert_eq(got, PP_BAD, "%s: got %d", name, got);
            cr_assert_eq(r.reason, reason_of(tu_str(want, "message")),
                         "%s: reason %s", name, pp_reason_name(r.reason));
            cr_assert_eq(r.size, 0, "%s", name);
            cr_assert_eq(r.source.family, AF_UNSPEC, "%s", name);
        }
        free(in);
    }
    json_decref(v.doc);
}

/* ---- the vectors: the streaming reader, input then EOF ----------------- */

/* What the gateway does with one buffered input then EOF: pp_parse, and
 * AGAIN at end of stream is PP_R_EOF. */
static enum pp_res reader(const uint8_t *in, size_t n, struct pp_result *r)
{
    enum pp_res got = pp_parse(in, n, r);
    if (got == PP_AGAIN) {
        r->reason = PP_R_EOF;
        got = PP_BAD;
    }
    return got;
}

static void check_reader(json_t *c, const uint8_t *in, size_t n, enum pp_res got,
                         const struct pp_result *r, bool exact_reason)
{
    const char *name = tu_str(c, "name");
    json_t *want = column(c, reader_key);
    json_t *pure = column(c, pure_key);

    if (is_result(want, "header")) {
        cr_assert_eq(got, PP_OK, "%s: got %d", name, got);
        cr_assert_eq(r->size, (size_t)json_integer_value(json_object_get(want, "size")),
                     "%s: size %zu", name, r->size);
        /* The reader column names the source as text only; it is the
         * pure column's address, whose packed form we compare. */
        json_t *src = json_object_get(want, "source");
        cr_assert(json_equal(src, json_object_get(pure, "source")), "%s", name);
        check_source(r, packed_or_null(pure), name);
        size_t llen;
        uint8_t *left = tu_unhex(tu_str(want, "leftover_hex"), &llen);
        cr_assert_eq(r->size + llen, n, "%s: leftover lost", name);
        cr_assert(!memcmp(in + r->size, left, llen), "%s: leftover differs", name);
        free(left);
    } else if (is_result(want, "not_proxy")) {
        cr_assert_eq(got, PP_NONE, "%s: got %d", name, got);
        cr_assert(json_is_null(json_object_get(want, "source")), "%s", name);
        size_t llen;
        uint8_t *left = tu_unhex(tu_str(want, "leftover_hex"), &llen);
        cr_assert(llen == n && !memcmp(in, left, n), "%s: leftover", name);
        free(left);
    } else {
        cr_assert(is_result(want, "error"), "%s", name);
        cr_assert_str_eq(tu_str(want, "exception"), "ParseProxyProtocolError");
        cr_assert_eq(got, PP_BAD, "%s: got %d", name, got);
        enum pp_reason wr = reason_of(tu_str(want, "message"));
        /* Byte by byte, a v1 line whose CR LF lies beyond byte 108 is
         * refused at byte 108 for having none: the same decision. */
        if (!exact_reason && wr == PP_R_V1_TOO_LONG && r->reason == PP_R_V1_NO_CRLF)
            return;
        cr_assert_eq(r->reason, wr, "%s: reason %s", name, pp_reason_name(r->reason));
    }
}

Test(proxy, vectors_reader_whole_input)
{
    struct vec v = load();
    size_t i;
    json_t *c;

    json_array_foreach(v.cases, i, c) {
        size_t n;
        uint8_t *in = case_input(c, &n);
        struct pp_result r;
        enum pp_res got = reader(in, n, &r);
        check_reader(c, in, n, got, &r, true);
        free(in);
    }
    json_decref(v.doc);
}

/* The gateway calls pp_parse after each read; with one byte per read the
 * first final answer must be the reader's. */
Test(proxy, vectors_reader_byte_by_byte)
{
    struct vec v = load();
    size_t i;
    json_t *c;

    json_array_foreach(v.cases, i, c) {
        size_t n;
        uint8_t *in = case_input(c, &n);
        struct pp_result r;
        enum pp_res got = PP_AGAIN;
        size_t k;
        for (k = 0; k <= n; k++) {
            uint8_t *pre = exact(in, k);
            got = pp_parse(pre, k, &r);
            free(pre);
            if (got != PP_AGAIN)
                break;
        }
        if (got == PP_AGAIN) {
            r.reason = PP_R_EOF;
            got = PP_BAD;
        }
        if (got == PP_OK || got == PP_NONE) {
            /* Decided before the end: judge against the whole input. */
            struct pp_result whole;
            cr_assert_eq(pp_parse(in, n, &whole), got, "%s", tu_str(c, "name"));
            cr_assert_eq(whole.size, r.size, "%s", tu_str(c, "name"));
            cr_assert(addr_equal(&whole.source, &r.source), "%s", tu_str(c, "name"));
            check_reader(c, in, n, got, &whole, false);
        } else {
            check_reader(c, in, n, got, &r, false);
        }
        free(in);
    }
    json_decref(v.doc);
}

/* ---- splits ------------------------------------------------------------ */

/* Every valid header: each proper prefix of the header is AGAIN, each
 * longer prefix OK with the same size and source; under the cap too. */
Test(proxy, every_split_offset)
{
    struct vec v = load();
    size_t i, checked = 0;
    json_t *c;

    json_array_foreach(v.cases, i, c) {
        json_t *want = column(c, pure_key);
        if (!is_result(want, "header"))
            continue;
        const char *name = tu_str(c, "name");
        size_t n;
        uint8_t *in = case_input(c, &n);
        size_t size = (size_t)json_integer_value(json_object_get(want, "size"));
        for (size_t k = 0; k <= n; k++) {
            uint8_t *pre = exact(in, k);
            struct pp_result r;
            enum pp_res got = pp_parse_max(pre, k, SIZE_MAX, &r);
            if (k < size) {
                cr_assert_eq(got, PP_AGAIN, "%s: prefix %zu got %d", name, k, got);
            } else {
                cr_assert_eq(got, PP_OK, "%s: prefix %zu got %d", name, k, got);
                cr_assert_eq(r.size, size, "%s: prefix %zu", name, k);
                check_source(&r, packed_or_null(want), name);
            }
            if (size <= PP_MAX_HEADER) {
                struct pp_result rc;
                cr_assert_eq(pp_parse(pre, k, &rc), got, "%s: capped, prefix %zu", name, k);
                cr_assert_eq(rc.size, r.size);
            }
            free(pre);
        }
        free(in);
        checked++;
    }
    cr_assert_eq(checked, 20, "header cases: %zu", checked);
    json_decref(v.doc);
}

/* Every case, every prefix: once a prefix gets a final answer, every
 * longer prefix gets the same result code (the v1 reason may move from
 * "no CRLF" to "too long" when a far CR LF shows up). */
Test(proxy, final_answers_are_final)
{
    struct vec v = load();
    size_t i;
    json_t *c;

    json_array_foreach(v.cases, i, c) {
        const char *name = tu_str(c, "name");
        size_t n;
        uint8_t *in = case_input(c, &n);
        for (int capped = 0; capped < 2; capped++) {
            enum pp_res first = PP_AGAIN;
            for (size_t k = 0; k <= n; k++) {
                uint8_t *pre = exact(in, k);
                struct pp_result r;
                enum pp_res got = pp_parse_max(pre, k, capped ? PP_MAX_HEADER : SIZE_MAX, &r);
                free(pre);
                if (first == PP_AGAIN)
                    first = got;
                else
                    cr_assert_eq(got, first, "%s: prefix %zu flips %d -> %d", name, k, first, got);
            }
        }
        free(in);
    }
    json_decref(v.doc);
}

/* ---- payload behind the header ----------------------------------------- */

/* Each valid header followed by 3000 bytes that look like headers
 * themselves (CR LF, "PROXY ", the v2 signature): size is unchanged and
 * nothing behind it is consumed, capped or not. */
Test(proxy, payload_never_lost)
{
    struct vec v = load();
    size_t i;
    json_t *c;
    uint8_t tail[3000];

    for (size_t k = 0; k < sizeof(tail); k++)
        tail[k] = (uint8_t)"\r\nPROXY TCP4 \x0d\x0a\x0d\x0a\x00\x0d\x0aQUIT\n\x16\x03"[k % 26];

    json_array_foreach(v.cases, i, c) {
        json_t *want = column(c, pure_key);
        if (!is_result(want, "header"))
            continue;
        const char *name = tu_str(c, "name");
        size_t n;
        uint8_t *in = case_input(c, &n);
        size_t size = (size_t)json_integer_value(json_object_get(want, "size"));
        uint8_t *buf = malloc(size + sizeof(tail));
        memcpy(buf, in, size);
        memcpy(buf + size, tail, sizeof(tail));
        struct pp_result r;
        cr_assert_eq(pp_parse_max(buf, size + sizeof(tail), SIZE_MAX, &r), PP_OK, "%s", name);
        cr_assert_eq(r.size, size, "%s", name);
        check_source(&r, packed_or_null(want), name);
        enum pp_res capped = pp_parse(buf, size + sizeof(tail), &r);
        if (size <= PP_MAX_HEADER) {
            cr_assert_eq(capped, PP_OK, "%s", name);
            cr_assert_eq(r.size, size, "%s", name);
        } else {
            cr_assert_eq(capped, PP_BAD, "%s", name);
            cr_assert_eq(r.reason, PP_R_TOO_BIG, "%s", name);
        }
        free(buf);
        free(in);
    }
    json_decref(v.doc);
}

/* ---- hand-made tables --------------------------------------------------- */

/* One expected outcome; packed NULL = OK without an address. */
struct want {
    enum pp_res res;
    enum pp_reason reason;
    size_t size;
    const char *packed;
};

static void expect(const uint8_t *buf, size_t n, size_t max, struct want w,
                   const char *what)
{
    uint8_t *in = exact(buf, n);
    struct pp_result r;
    enum pp_res got = pp_parse_max(in, n, max, &r);

    cr_assert_eq(got, w.res, "%s: got %d want %d (%s)", what, got, w.res,
                 pp_reason_name(r.reason));
    cr_assert_eq(r.reason, w.reason, "%s: reason %s want %s", what,
                 pp_reason_name(r.reason), pp_reason_name(w.reason));
    cr_assert_eq(r.size, w.size, "%s: size %zu want %zu", what, r.size, w.size);
    if (got == PP_OK)
        check_source(&r, w.packed, what);
    else
        cr_assert_eq(r.source.family, AF_UNSPEC, "%s", what);
    free(in);
}

#define OK(size, packed) ((struct want){ PP_OK, PP_R_NONE, (size), (packed) })
#define BAD(reason) ((struct want){ PP_BAD, (reason), 0, NULL })
#define AGAIN ((struct want){ PP_AGAIN, PP_R_NONE, 0, NULL })
#define NONE ((struct want){ PP_NONE, PP_R_NONE, 0, NULL })

/* v1 line of exactly total bytes (CR LF included) made of prefix, then
 * 'x' padding, then suffix, then CR LF; payload bytes appended. */
static size_t v1_line(uint8_t *buf, const char *prefix, const char *suffix,
                      size_t total, const char *payload)
{
    size_t p = strlen(prefix), s = strlen(suffix), pl = strlen(payload);
    cr_assert(total >= p + s + 2);
    memcpy(buf, prefix, p);
    memset(buf + p, 'x', total - p - s - 2);
    memcpy(buf + total - s - 2, suffix, s);
    memcpy(buf + total - 2, "\r\n", 2);
    memcpy(buf + total, payload, pl);
    return total + pl;
}

Test(proxy, v1_length_boundaries)
{
    uint8_t buf[256];
    size_t n;

    /* UNKNOWN lines of 107 / 108 / 109 bytes, CR LF included. */
    n = v1_line(buf, "PROXY UNKNOWN ", "", 107, "\x16\x03\x01");
    expect(buf, n, SIZE_MAX, OK(107, NULL), "unknown 107");
    n = v1_line(buf, "PROXY UNKNOWN ", "", 108, "\x16\x03\x01");
    expect(buf, n, SIZE_MAX, OK(108, NULL), "unknown 108");
    expect(buf, n, PP_MAX_HEADER, OK(108, NULL), "unknown 108 capped");
    n = v1_line(buf, "PROXY UNKNOWN ", "", 109, "\x16\x03\x01");
    expect(buf, n, SIZE_MAX, BAD(PP_R_V1_TOO_LONG), "unknown 109");
    expect(buf, n, PP_MAX_HEADER, BAD(PP_R_V1_TOO_LONG), "unknown 109 capped");
    /* The 109-byte line cut before its CR LF: 107 bytes wait, 108 do not. */
    expect(buf, 107, SIZE_MAX, AGAIN, "109 line, 107 buffered");
    expect(buf, 108, SIZE_MAX, BAD(PP_R_V1_NO_CRLF), "109 line, 108 buffered");

    /* TCP4 lines padded through the unvalidated destination. */
    n = v1_line(buf, "PROXY TCP4 192.0.2.1 ", " 1 2", 107, "");
    expect(buf, n, SIZE_MAX, OK(107, "c0000201"), "tcp4 107");
    n = v1_line(buf, "PROXY TCP4 192.0.2.1 ", " 1 2", 108, "");
    expect(buf, n, SIZE_MAX, OK(108, "c0000201"), "tcp4 108");
    n = v1_line(buf, "PROXY TCP4 192.0.2.1 ", " 1 2", 109, "");
    expect(buf, n, SIZE_MAX, BAD(PP_R_V1_TOO_LONG), "tcp4 109");

    /* No CR LF: AGAIN below 108 bytes, refused from 108 on, even when the
     * 108th byte is the CR whose LF has not arrived. */
    memset(buf, 'x', sizeof(buf));
    memcpy(buf, "PROXY UNKNOWN ", 14);
    expect(buf, 107, SIZE_MAX, AGAIN, "no crlf 107");
    expect(buf, 108, SIZE_MAX, BAD(PP_R_V1_NO_CRLF), "no crlf 108");
    expect(buf, 200, SIZE_MAX, BAD(PP_R_V1_NO_CRLF), "no crlf 200");
    buf[107] = '\r';
    expect(buf, 108, SIZE_MAX, BAD(PP_R_V1_NO_CRLF), "CR as byte 108");
    buf[106] = '\r';
    buf[107] = '\n';
    expect(buf, 107, SIZE_MAX, AGAIN, "CR as byte 107");
    expect(buf, 108, SIZE_MAX, OK(108, NULL), "CR LF as bytes 107-108");

    /* LF alone never ends the line. */
    n = v1_line(buf, "PROXY UNKNOWN ", "", 60, "");
    buf[58] = '\n';
    buf[59] = 'x';
    memset(buf + 60, 'y', 60);
    expect(buf, 107, SIZE_MAX, AGAIN, "LF only, 107");
    expect(buf, 108, SIZE_MAX, BAD(PP_R_V1_NO_CRLF), "LF only, 108");
    (void)n;
}

/* Field splitting and protocol tokens; expected values from the
 * reference's rules run on CPython. */
Test(proxy, v1_fields)
{
    static const struct { const char *line; size_t len; struct want w; } t[] = {
#define L(s) s, sizeof(s) - 1
        { L("PROXY \r\n"), { PP_BAD, PP_R_V1_PROTO, 0, NULL } },
        { L("PROXY UNKNOWN\r\n"), { PP_OK, PP_R_NONE, 15, NULL } },
        { L("PROXY UNKNOWN \r\n"), { PP_OK, PP_R_NONE, 16, NULL } },
        { L("PROXY UNKNOWN  garbage %%% \r\n"), { PP_OK, PP_R_NONE, 29, NULL } },
        { L("PROXY UNKNOWNX\r\n"), { PP_BAD, PP_R_V1_PROTO, 0, NULL } },
        { L("PROXY unknown\r\n"), { PP_BAD, PP_R_V1_PROTO, 0, NULL } },
        { L("PROXY TCP4\r\n"), { PP_BAD, PP_R_V1_FIELDS, 0, NULL } },
        { L("PROXY TCP6\r\n"), { PP_BAD, PP_R_V1_FIELDS, 0, NULL } },
        { L("PROXY TCP4 \r\n"), { PP_BAD, PP_R_V1_FIELDS, 0, NULL } },
        { L("PROXY TCP4 192.0.2.1\r\n"), { PP_BAD, PP_R_V1_FIELDS, 0, NULL } },
        { L("PROXY TCP4 192.0.2.1 x y\r\n"), { PP_BAD, PP_R_V1_FIELDS, 0, NULL } },
        { L("PROXY TCP4 192.0.2.1 x y z\r\n"), { PP_OK, PP_R_NONE, 28, "c0000201" } },
        { L("PROXY TCP4 192.0.2.1 x y z \r\n"), { PP_BAD, PP_R_V1_FIELDS, 0, NULL } },
        { L("PROXY TCP4 192.0.2.1   \r\n"), { PP_OK, PP_R_NONE, 25, "c0000201" } },
        { L("PROXY TCP4  192.0.2.1 x y\r\n"), { PP_BAD, PP_R_V1_SOURCE, 0, NULL } },
        { L("PROXY TCP4 192.0.2.1 x y z\r\r\n"), { PP_OK, PP_R_NONE, 29, "c0000201" } },
        { L("PROXY TCP4 192.0.2.1 x y z\n\r\n"), { PP_OK, PP_R_NONE, 29, "c0000201" } },
        { L("PROXY TCP6 ::1 x y z\r\n"), { PP_OK, PP_R_NONE, 22, "00000000000000000000000000000001" } },
        { L("PROXY TCP6 ::1 \xff y z\r\n"), { PP_OK, PP_R_NONE, 22, "00000000000000000000000000000001" } },
        { L("PROXY TCP4 192.0.2.1 2001:db8::1 0 0\r\n"), { PP_OK, PP_R_NONE, 38, "c0000201" } },
        { L("PROXY TCP4\t192.0.2.1 x y z\r\n"), { PP_BAD, PP_R_V1_PROTO, 0, NULL } },
        { L("PROXY  TCP4 192.0.2.1 x y z\r\n"), { PP_BAD, PP_R_V1_PROTO, 0, NULL } },
        { L("PROXY UNKNOWN\r\n\r\n"), { PP_OK, PP_R_NONE, 15, NULL } },
        { L("PROXY UNKNOWN\rX\n\r\n"), { PP_BAD, PP_R_V1_PROTO, 0, NULL } },
        { L("PROXY TCP4 \0 a b c\r\n"), { PP_BAD, PP_R_V1_SOURCE, 0, NULL } },
#undef L
    };
    uint8_t buf[128];

    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        memcpy(buf, t[i].line, t[i].len);
        memcpy(buf + t[i].len, "\x16\x03", 2);   /* payload behind it */
        expect(buf, t[i].len + 2, PP_MAX_HEADER, t[i].w, t[i].line);
    }
}

/* v1 source addresses: expected outcome from CPython 3.11's
 * ipaddress.ip_address() on the ASCII-decoded field, as the reference
 * does; covers where inet_pton alone would disagree (zones, leading
 * zeros, '/', NUL, non-ASCII). */
Test(proxy, v1_source_addresses)
{
    static const struct {
        const char *proto, *src;
        size_t len;
        enum pp_res res;
        enum pp_reason reason;
        size_t iplen;
        const char *packed;
    } t[] = {
    { "TCP4", "0.0.0.0", 7, PP_OK, PP_R_NONE, 4, "00000000" },
    { "TCP4", "255.255.255.255", 15, PP_OK, PP_R_NONE, 4, "ffffffff" },
    { "TCP4", "256.0.0.1", 9, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3", 5, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.4.5", 9, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "01.2.3.4", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.04", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.0", 7, PP_OK, PP_R_NONE, 4, "01020300" },
    { "TCP4", "1..2.3", 6, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", ".1.2.3", 6, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.", 6, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.4%eth0", 12, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.4/24", 10, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "::1", 3, PP_BAD, PP_R_V1_FAMILY, 0, "" },
    { "TCP4", "::ffff:1.2.3.4", 14, PP_BAD, PP_R_V1_FAMILY, 0, "" },
    { "TCP4", "", 0, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "a.b.c.d", 7, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.1234", 10, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "0x1.2.3.4", 9, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.-1", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "+1.2.3.4", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "\xef""\xbc""\x91"".2.3.4", 9, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.4\x09""", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.4\x0d""", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "1.2.3.4\x0a""", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "192.0.2.1\x00""", 10, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "000.0.0.0", 9, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP4", "10.0.0.255", 10, PP_OK, PP_R_NONE, 4, "0a0000ff" },
    { "TCP6", "::", 2, PP_OK, PP_R_NONE, 16, "00000000000000000000000000000000" },
    { "TCP6", "::1", 3, PP_OK, PP_R_NONE, 16, "00000000000000000000000000000001" },
    { "TCP6", "::ffff:1.2.3.4", 14, PP_OK, PP_R_NONE, 16, "00000000000000000000ffff01020304" },
    { "TCP6", "::ffff:1.2.3.04", 15, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1.2.3.4", 9, PP_OK, PP_R_NONE, 16, "00000000000000000000000001020304" },
    { "TCP6", "1:2:3:4:5:6:7:8", 15, PP_OK, PP_R_NONE, 16, "00010002000300040005000600070008" },
    { "TCP6", "1:2:3:4:5:6:7:8:9", 17, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1:2:3:4:5:6:7::", 15, PP_OK, PP_R_NONE, 16, "00010002000300040005000600070000" },
    { "TCP6", "::2:3:4:5:6:7:8", 15, PP_OK, PP_R_NONE, 16, "00000002000300040005000600070008" },
    { "TCP6", "1:2:3:4:5:6:7::8", 16, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1::2::3", 7, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", ":1::", 4, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1::2:", 5, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "12345::", 7, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "0000:0000:0000:0000:0000:0000:0000:0001", 39, PP_OK, PP_R_NONE, 16, "00000000000000000000000000000001" },
    { "TCP6", "00001::", 7, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "fe80::1%eth0", 12, PP_OK, PP_R_NONE, 16, "fe800000000000000000000000000001" },
    { "TCP6", "fe80::1%", 8, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "fe80::1%a%b", 11, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "fe80::1%eth/0", 13, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "fe80::1%\x01""", 9, PP_OK, PP_R_NONE, 16, "fe800000000000000000000000000001" },
    { "TCP6", "fe80::1%e\x00""", 10, PP_OK, PP_R_NONE, 16, "fe800000000000000000000000000001" },
    { "TCP6", "FE80::ABCD", 10, PP_OK, PP_R_NONE, 16, "fe80000000000000000000000000abcd" },
    { "TCP6", "g::1", 4, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1:2:3:4:5:6:1.2.3.4", 19, PP_OK, PP_R_NONE, 16, "00010002000300040005000601020304" },
    { "TCP6", "1:2:3:4:5:6:7:1.2.3.4", 21, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1.2.3", 7, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1.2.3.4.5", 11, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1.2.3.4", 7, PP_BAD, PP_R_V1_FAMILY, 0, "" },
    { "TCP6", "::ffff:1.2.3.4%z", 16, PP_OK, PP_R_NONE, 16, "00000000000000000000ffff01020304" },
    { "TCP6", "%eth0", 5, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::%eth0", 7, PP_OK, PP_R_NONE, 16, "00000000000000000000000000000000" },
    { "TCP6", "1:2:3:4:5:6:7:8%x", 17, PP_OK, PP_R_NONE, 16, "00010002000300040005000600070008" },
    { "TCP6", "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", 45, PP_OK, PP_R_NONE, 16, "ffffffffffffffffffffffffffffffff" },
    { "TCP6", "0ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", 46, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "[::1]", 5, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", ":::", 3, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1:", 4, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1:", 2, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1", 1, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::ffff:1.2.3.4:5", 16, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1\x00""", 4, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1\x0d""", 4, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1.2.3.256", 11, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::1.02.3.4", 10, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "1.2.3.4::", 9, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::ffff:0.0.0.0", 14, PP_OK, PP_R_NONE, 16, "00000000000000000000ffff00000000" },
    { "TCP6", "::0:1.2.3.4", 11, PP_OK, PP_R_NONE, 16, "00000000000000000000000001020304" },
    { "TCP6", "1:2:3:4:5:6:7:8:", 16, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "::%%", 4, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    { "TCP6", "fe80::1%\xc3""\xa9""", 10, PP_BAD, PP_R_V1_SOURCE, 0, "" },
    };
    uint8_t buf[256];
    char what[160];

    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        size_t n = 0;
        memcpy(buf, "PROXY ", 6), n += 6;
        memcpy(buf + n, t[i].proto, 4), n += 4;
        buf[n++] = ' ';
        memcpy(buf + n, t[i].src, t[i].len), n += t[i].len;
        memcpy(buf + n, " 198.51.100.2 1 2\r\n", 19), n += 19;
        size_t size = n;
        buf[n++] = 0x16;
        snprintf(what, sizeof(what), "%s source #%zu (%zu bytes)", t[i].proto, i, t[i].len);
        struct want w = { t[i].res, t[i].reason, t[i].res == PP_OK ? size : 0,
                          t[i].iplen ? t[i].packed : NULL };
        expect(buf, n, PP_MAX_HEADER, w, what);
    }
}

/* v2 header: signature, ver_cmd, fam, L, then L bytes of block
 * (0xc0 0x00 0x02 0x01 ... an incrementing pattern). */
static size_t v2_hdr(uint8_t *buf, uint8_t ver_cmd, uint8_t fam, size_t blen,
                     size_t extra)
{
    static const uint8_t sig[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                     0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };
    memcpy(buf, sig, 12);
    buf[12] = ver_cmd;
    buf[13] = fam;
    buf[14] = (uint8_t)(blen >> 8);
    buf[15] = (uint8_t)blen;
    for (size_t i = 0; i < blen + extra; i++)
        buf[16 + i] = (uint8_t)(0xc0 + i);
    return 16 + blen + extra;
}

#define SRC4 "c0c1c2c3"
#define SRC6 "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"

Test(proxy, v2_table)
{
    static const struct {
        uint8_t ver_cmd, fam;
        size_t blen;
        struct want w;
    } t[] = {
        /* Family minimums: IPv4 12, IPv6 36. */
        { 0x21, 0x11, 0, { PP_BAD, PP_R_V2_SHORT_INET, 0, NULL } },
        { 0x21, 0x11, 11, { PP_BAD, PP_R_V2_SHORT_INET, 0, NULL } },
        { 0x21, 0x11, 12, { PP_OK, PP_R_NONE, 28, SRC4 } },
        { 0x21, 0x11, 13, { PP_OK, PP_R_NONE, 29, SRC4 } },
        { 0x21, 0x21, 12, { PP_BAD, PP_R_V2_SHORT_INET6, 0, NULL } },
        { 0x21, 0x21, 35, { PP_BAD, PP_R_V2_SHORT_INET6, 0, NULL } },
        { 0x21, 0x21, 36, { PP_OK, PP_R_NONE, 52, SRC6 } },
        { 0x21, 0x21, 200, { PP_OK, PP_R_NONE, 216, SRC6 } },
        /* The transport nibble is ignored. */
        { 0x21, 0x10, 12, { PP_OK, PP_R_NONE, 28, SRC4 } },
        { 0x21, 0x1f, 12, { PP_OK, PP_R_NONE, 28, SRC4 } },
        { 0x21, 0x2f, 36, { PP_OK, PP_R_NONE, 52, SRC6 } },
        /* Other families carry no address, whatever L is. */
        { 0x21, 0x00, 0, { PP_OK, PP_R_NONE, 16, NULL } },
        { 0x21, 0x01, 12, { PP_OK, PP_R_NONE, 28, NULL } },
        { 0x21, 0x31, 0, { PP_OK, PP_R_NONE, 16, NULL } },
        { 0x21, 0x31, 216, { PP_OK, PP_R_NONE, 232, NULL } },
        { 0x21, 0x41, 12, { PP_OK, PP_R_NONE, 28, NULL } },
        { 0x21, 0xf2, 3, { PP_OK, PP_R_NONE, 19, NULL } },
        /* LOCAL skips the block unread, even a short one. */
        { 0x20, 0x11, 0, { PP_OK, PP_R_NONE, 16, NULL } },
        { 0x20, 0x21, 4, { PP_OK, PP_R_NONE, 20, NULL } },
        /* Commands 2..15; checked before the family. */
        { 0x22, 0x11, 12, { PP_BAD, PP_R_V2_COMMAND, 0, NULL } },
        { 0x22, 0x11, 0, { PP_BAD, PP_R_V2_COMMAND, 0, NULL } },
        { 0x2f, 0x00, 0, { PP_BAD, PP_R_V2_COMMAND, 0, NULL } },
        /* Versions other than 2. */
        { 0x01, 0x11, 12, { PP_BAD, PP_R_V2_VERSION, 0, NULL } },
        { 0x10, 0x11, 12, { PP_BAD, PP_R_V2_VERSION, 0, NULL } },
        { 0x31, 0x11, 12, { PP_BAD, PP_R_V2_VERSION, 0, NULL } },
        { 0xf1, 0x11, 12, { PP_BAD, PP_R_V2_VERSION, 0, NULL } },
    };
    uint8_t buf[300];
    char what[64];

    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        size_t n = v2_hdr(buf, t[i].ver_cmd, t[i].fam, t[i].blen, 5);
        snprintf(what, sizeof(what), "v2 %02x %02x L=%zu", t[i].ver_cmd, t[i].fam, t[i].blen);
        expect(buf, n, PP_MAX_HEADER, t[i].w, what);
        expect(buf, n, SIZE_MAX, t[i].w, what);
        /* One byte short of the block: only the version is judged. */
        if (t[i].blen > 0)
            expect(buf, 16 + t[i].blen - 1, PP_MAX_HEADER,
                   t[i].w.reason == PP_R_V2_VERSION ? t[i].w : AGAIN, what);
        /* Fixed part one byte short: AGAIN whatever the version. */
        expect(buf, 15, PP_MAX_HEADER, AGAIN, what);
    }
}

/* The 1500-byte cap: a v2 header of exactly 1500 bytes passes, 1501 is
 * refused as soon as its fixed part is in; uncapped parsing waits. */
Test(proxy, cap_1500)
{
    static uint8_t buf[70000];
    size_t n;

    n = v2_hdr(buf, 0x21, 0x11, PP_MAX_HEADER - 16, 3);
    expect(buf, n, PP_MAX_HEADER, OK(1500, SRC4), "v2 1500 + payload");
    expect(buf, 1500, PP_MAX_HEADER, OK(1500, SRC4), "v2 1500 exactly");
    expect(buf, 1499, PP_MAX_HEADER, AGAIN, "v2 1500, 1499 buffered");
    expect(buf, 16, PP_MAX_HEADER, AGAIN, "v2 1500, fixed part");

    n = v2_hdr(buf, 0x21, 0x11, PP_MAX_HEADER - 15, 3);
    expect(buf, 16, PP_MAX_HEADER, BAD(PP_R_TOO_BIG), "v2 1501, fixed part");
    expect(buf, n, PP_MAX_HEADER, BAD(PP_R_TOO_BIG), "v2 1501 whole");
    expect(buf, 16, SIZE_MAX, AGAIN, "v2 1501 uncapped, fixed part");
    expect(buf, n, SIZE_MAX, OK(1501, SRC4), "v2 1501 uncapped");

    n = v2_hdr(buf, 0x21, 0x11, 0xffff, 0);
    expect(buf, 16, PP_MAX_HEADER, BAD(PP_R_TOO_BIG), "v2 L=65535");
    expect(buf, n, SIZE_MAX, OK(n, SRC4), "v2 L=65535 uncapped");
    /* The version is judged before the size. */
    n = v2_hdr(buf, 0x11, 0x11, 0xffff, 0);
    expect(buf, 16, PP_MAX_HEADER, BAD(PP_R_V2_VERSION), "v1 version, L=65535");

    /* A smaller cap shows the generic rule: incomplete at max is TOO_BIG,
     * and nothing past max is looked at. */
    n = v1_line(buf, "PROXY UNKNOWN ", "", 60, "");
    expect(buf, 49, 50, AGAIN, "max 50, 49 buffered");
    expect(buf, 50, 50, BAD(PP_R_TOO_BIG), "max 50, 50 buffered");
    expect(buf, n, 50, BAD(PP_R_TOO_BIG), "max 50, CR LF at 58");
    expect(buf, n, 60, OK(60, NULL), "max 60");
    memcpy(buf, "PROX", 4);
    expect(buf, 4, 4, BAD(PP_R_TOO_BIG), "max 4, marker prefix");
    expect(buf, 0, 0, BAD(PP_R_TOO_BIG), "max 0");
}

/* Start-of-stream markers: proper prefixes of either marker wait, any
 * other byte string is payload. */
Test(proxy, markers)
{
    static const uint8_t sig[12] = { 0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d,
                                     0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a };
    uint8_t buf[16];
    struct pp_result r;

    cr_assert_eq(pp_parse(NULL, 0, &r), PP_AGAIN);
    for (size_t k = 1; k < 12; k++) {
        memcpy(buf, sig, k);
        expect(buf, k, PP_MAX_HEADER, AGAIN, "v2 sig prefix");
        buf[k - 1] ^= 0x20;
        expect(buf, k, PP_MAX_HEADER, NONE, "v2 sig prefix, last byte off");
    }
    memcpy(buf, sig, 12);
    for (size_t k = 12; k < 16; k++)
        expect(buf, k, PP_MAX_HEADER, AGAIN, "v2 sig, fixed part short");
    for (size_t k = 1; k < 6; k++) {
        memcpy(buf, "PROXY ", k);
        expect(buf, k, PP_MAX_HEADER, AGAIN, "v1 prefix");
        buf[k - 1] ^= 0x20;   /* case flip; ' ' becomes NUL */
        expect(buf, k, PP_MAX_HEADER, NONE, "v1 prefix, last byte off");
    }
    expect((const uint8_t *)"PROXY\t", 6, PP_MAX_HEADER, NONE, "PROXY tab");
    expect((const uint8_t *)"PROXY\r\n", 7, PP_MAX_HEADER, NONE, "PROXY CRLF");
    expect((const uint8_t *)"\x16", 1, PP_MAX_HEADER, NONE, "TLS");
    expect((const uint8_t *)"gA", 2, PP_MAX_HEADER, NONE, "token");
    expect((const uint8_t *)"\r\n\r\nX", 5, PP_MAX_HEADER, NONE, "CRLFCRLF X");
    expect((const uint8_t *)"\r\n\r\n", 4, PP_MAX_HEADER, AGAIN, "CRLFCRLF");

    /* NONE on a long buffer, capped or not. */
    static uint8_t big[5000];
    memset(big, 0x16, sizeof(big));
    expect(big, sizeof(big), PP_MAX_HEADER, NONE, "5000 bytes of TLS");
    expect(big, sizeof(big), SIZE_MAX, NONE, "5000 bytes of TLS, uncapped");
}

Test(proxy, reason_names)
{
    for (int i = 0; i < PP_R_COUNT; i++) {
        const char *a = pp_reason_name((enum pp_reason)i);
        cr_assert_str_neq(a, "unknown", "reason %d has no name", i);
        for (int j = 0; j < i; j++)
            cr_assert_str_neq(a, pp_reason_name((enum pp_reason)j), "duplicate %s", a);
    }
    cr_assert_str_eq(pp_reason_name(PP_R_COUNT), "unknown");
    cr_assert_str_eq(pp_reason_name((enum pp_reason)-1), "unknown");
}
