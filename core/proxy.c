/* core/proxy.c - see proxy.h.
 *
 * Every rule below mirrors one line of the reference's parser; where C's
 * tools differ from Python's (inet_pton vs ipaddress), the comment says
 * how the difference is closed.
 */
#include "core/proxy.h"

#include <arpa/inet.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

static const uint8_t v2_sig[12] = {
    0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a,
};
static const uint8_t v1_sig[6] = { 'P', 'R', 'O', 'X', 'Y', ' ' };

#define V2_FIXED 16u      /* signature + ver_cmd + fam + L */
#define V2_INET_MIN 12u   /* 4 + 4 + 2 + 2 */
#define V2_INET6_MIN 36u  /* 16 + 16 + 2 + 2 */
#define V1_FIELDS 6u      /* PROXY proto src dst sport dport */

static enum pp_res fail(struct pp_result *res, enum pp_reason reason)
{
    res->reason = reason;
    return PP_BAD;
}

static enum pp_res done(struct pp_result *res, size_t size)
{
    res->size = size;
    return PP_OK;
}

/* True when the len buffered bytes may still grow into sig (the empty
 * buffer included). */
static bool sig_prefix(const uint8_t *buf, size_t len, const uint8_t *sig, size_t n)
{
    return len < n && (len == 0 || memcmp(buf, sig, len) == 0);
}

static bool field_is(const uint8_t *f, size_t n, const char *word)
{
    return n == strlen(word) && memcmp(f, word, n) == 0;
}

/* ---- v1 source address ------------------------------------------------ */

/* A dotted quad as Python's ipaddress reads one: exactly four parts of
 * one to three ASCII digits, no leading zero ("0" itself is fine), each
 * at most 255. Decided here rather than by inet_pton, whose treatment of
 * leading zeros differs between libcs. Writes the 4 bytes on success. */
static bool dotted_quad(const uint8_t *s, size_t n, uint8_t out[4])
{
    size_t i = 0;

    for (int part = 0; part < 4; part++) {
        if (part > 0) {
            if (i >= n || s[i] != '.')
                return false;
            i++;
        }
        size_t start = i;
        unsigned v = 0;
        while (i < n && i - start < 3 && s[i] >= '0' && s[i] <= '9')
            v = v * 10 + (unsigned)(s[i++] - '0');
        size_t digits = i - start;
        if (digits == 0 || v > 255 || (digits > 1 && s[start] == '0'))
            return false;
        out[part] = (uint8_t)v;
    }
    return i == n;
}

/* IPv6 text as Python's IPv6Address reads it: an optional "%scope" that
 * must be non-empty and hold no second '%' (dropped: packed addresses
 * have no zone), an IPv4 tail parsed as strictly as dotted_quad(), and
 * the rest as inet_pton reads it (same hextet and "::" rules). */
static bool v6_text(const uint8_t *s, size_t n, uint8_t out[16])
{
    char text[INET6_ADDRSTRLEN];
    uint8_t quad[4];
    const uint8_t *pct = memchr(s, '%', n);
    size_t alen = pct != NULL ? (size_t)(pct - s) : n;

    if (pct != NULL) {
        size_t slen = n - alen - 1;
        if (slen == 0 || memchr(pct + 1, '%', slen) != NULL)
            return false;
    }
    /* Longest valid form is 45 chars; a NUL would cut inet_pton short. */
    if (alen >= sizeof(text) || memchr(s, '\0', alen) != NULL)
        return false;

    size_t tail = alen;
    while (tail > 0 && s[tail - 1] != ':')
        tail--;
    if (memchr(s + tail, '.', alen - tail) != NULL &&
        !dotted_quad(s + tail, alen - tail, quad))
        return false;

    memcpy(text, s, alen);
    text[alen] = '\0';
    return inet_pton(AF_INET6, text, out) == 1;
}

/* Field 3 of a TCP4/TCP6 line. The reference decodes it as ASCII and
 * calls ipaddress.ip_address(): IPv4 first, then IPv6, and any '/' is
 * refused by both. A valid address of the other family is a mismatch,
 * not an invalid address. */
static enum pp_res v1_source(const uint8_t *f, size_t n, bool tcp4,
                             struct pp_result *res)
{
    uint8_t ip[16];
    size_t iplen;

    for (size_t i = 0; i < n; i++)
        if (f[i] >= 0x80 || f[i] == '/')
            return fail(res, PP_R_V1_SOURCE);
    if (dotted_quad(f, n, ip))
        iplen = 4;
    else if (v6_text(f, n, ip))
        iplen = 16;
    else
        return fail(res, PP_R_V1_SOURCE);
    if ((iplen == 4) != tcp4)
        return fail(res, PP_R_V1_FAMILY);
    addr_from_packed(&res->source, ip, iplen);
    return PP_OK;
}

/* ---- v1 line ---------------------------------------------------------- */

/* Offset of the first CR LF in buf, or len when there is none. */
static size_t find_crlf(const uint8_t *buf, size_t len)
{
    for (size_t i = 0; i + 1 < len; i++)
        if (buf[i] == '\r' && buf[i + 1] == '\n')
            return i;
    return len;
}

/* The reference searches the whole buffer for CR LF before it looks at
 * the length, so a far CR LF is "too long" and none at all "no CRLF". */
static enum pp_res parse_v1(const uint8_t *buf, size_t len, struct pp_result *res)
{
    size_t end = find_crlf(buf, len);

    if (end == len)
        return len >= PP_V1_MAX ? fail(res, PP_R_V1_NO_CRLF) : PP_AGAIN;
    if (end + 2 > PP_V1_MAX)
        return fail(res, PP_R_V1_TOO_LONG);

    /* Split at every single space; adjacent spaces make empty fields.
     * Only the first three fields are kept, all are counted. */
    const uint8_t *field[3];
    size_t flen[3], nfields = 0, start = 0;
    for (size_t i = 0; i <= end; i++) {
        if (i < end && buf[i] != ' ')
            continue;
        if (nfields < 3) {
            field[nfields] = buf + start;
            flen[nfields] = i - start;
        }
        nfields++;
        start = i + 1;
    }

    /* "PROXY " guarantees field 1 exists. UNKNOWN ignores the rest. */
    if (field_is(field[1], flen[1], "UNKNOWN"))
        return done(res, end + 2);
    bool tcp4 = field_is(field[1], flen[1], "TCP4");
    if (!tcp4 && !field_is(field[1], flen[1], "TCP6"))
        return fail(res, PP_R_V1_PROTO);
    if (nfields != V1_FIELDS)
        return fail(res, PP_R_V1_FIELDS);
    if (v1_source(field[2], flen[2], tcp4, res) != PP_OK)
        return PP_BAD;
    return done(res, end + 2);
}

/* ---- v2 --------------------------------------------------------------- */

/* The version is checked as soon as the fixed part is in, the command and
 * family only once the whole address block is; a header that could never
 * fit under the cap is refused without waiting for it. */
static enum pp_res parse_v2(const uint8_t *buf, size_t len, size_t max,
                            struct pp_result *res)
{
    if (len < V2_FIXED)
        return PP_AGAIN;
    if ((buf[12] >> 4) != 2)
        return fail(res, PP_R_V2_VERSION);

    size_t blen = (size_t)buf[14] << 8 | buf[15];
    size_t size = V2_FIXED + blen;
    if (size > max)
        return fail(res, PP_R_TOO_BIG);
    if (len < size)
        return PP_AGAIN;

    unsigned cmd = buf[12] & 0x0f;
    if (cmd == 0)                 /* LOCAL: health check, no client */
        return done(res, size);
    if (cmd != 1)
        return fail(res, PP_R_V2_COMMAND);

    const uint8_t *block = buf + V2_FIXED;
    switch (buf[13] >> 4) {
    case 1:
        if (blen < V2_INET_MIN)
            return fail(res, PP_R_V2_SHORT_INET);
        addr_from_packed(&res->source, block, 4);
        break;
    case 2:
        if (blen < V2_INET6_MIN)
            return fail(res, PP_R_V2_SHORT_INET6);
        addr_from_packed(&res->source, block, 16);
        break;
    default:                      /* AF_UNSPEC, AF_UNIX, unknown */
        break;
    }
    return done(res, size);
}

/* ---- entry points ----------------------------------------------------- */

enum pp_res pp_parse_max(const uint8_t *buf, size_t len, size_t max,
                         struct pp_result *res)
{
    enum pp_res r;

    memset(res, 0, sizeof(*res));
    if (len > max)
        len = max;   /* the reference's reader never holds more */

    if (len >= sizeof(v2_sig) && memcmp(buf, v2_sig, sizeof(v2_sig)) == 0) {
        res->version = 2;
        r = parse_v2(buf, len, max, res);
    } else if (len >= sizeof(v1_sig) && memcmp(buf, v1_sig, sizeof(v1_sig)) == 0) {
        res->version = 1;
        r = parse_v1(buf, len, res);
    } else if (sig_prefix(buf, len, v2_sig, sizeof(v2_sig)) ||
               sig_prefix(buf, len, v1_sig, sizeof(v1_sig))) {
        r = PP_AGAIN;
    } else {
        return PP_NONE;
    }

    if (r == PP_AGAIN && len >= max)
        r = fail(res, PP_R_TOO_BIG);
    return r;
}

enum pp_res pp_parse(const uint8_t *buf, size_t len, struct pp_result *res)
{
    return pp_parse_max(buf, len, PP_MAX_HEADER, res);
}

const char *pp_reason_name(enum pp_reason reason)
{
    static const char *const names[PP_R_COUNT] = {
        [PP_R_NONE] = "none",
        [PP_R_V1_NO_CRLF] = "v1_no_crlf",
        [PP_R_V1_TOO_LONG] = "v1_too_long",
        [PP_R_V1_PROTO] = "v1_protocol",
        [PP_R_V1_FIELDS] = "v1_fields",
        [PP_R_V1_SOURCE] = "v1_source",
        [PP_R_V1_FAMILY] = "v1_family",
        [PP_R_V2_VERSION] = "v2_version",
        [PP_R_V2_COMMAND] = "v2_command",
        [PP_R_V2_SHORT_INET] = "v2_short_inet",
        [PP_R_V2_SHORT_INET6] = "v2_short_inet6",
        [PP_R_TOO_BIG] = "too_big",
        [PP_R_EOF] = "eof",
    };

    if ((unsigned)reason >= PP_R_COUNT || names[reason] == NULL)
        return "unknown";
    return names[reason];
}

/* ---- building --------------------------------------------------------- */

static const uint8_t v4mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

/* dst expressed in src's family (see proxy.h). src is AF_INET or AF_INET6. */
static struct net_addr dst_as(const struct net_addr *src, const struct net_addr *dst)
{
    struct net_addr d = { .family = src->family, .port = dst->port };

    if (dst->family == src->family) {
        memcpy(d.ip, dst->ip, sizeof(d.ip));
    } else if (src->family == AF_INET6 && dst->family == AF_INET) {
        memcpy(d.ip, v4mapped, sizeof(v4mapped));
        memcpy(d.ip + 12, dst->ip, 4);
    } else if (src->family == AF_INET && dst->family == AF_INET6 &&
               memcmp(dst->ip, v4mapped, sizeof(v4mapped)) == 0) {
        memcpy(d.ip, dst->ip + 12, 4);
    }
    return d;   /* otherwise the zero address, dst's port */
}

static bool has_ip(const struct net_addr *a)
{
    return a->family == AF_INET || a->family == AF_INET6;
}

size_t pp_build_v1(const struct net_addr *src, const struct net_addr *dst,
                   uint8_t *out, size_t cap)
{
    char s[INET6_ADDRSTRLEN], d[INET6_ADDRSTRLEN];
    struct net_addr da;
    int n;

    if (!has_ip(src)) {
        n = snprintf((char *)out, cap, "PROXY UNKNOWN\r\n");
    } else {
        da = dst_as(src, dst);
        if (inet_ntop(src->family, src->ip, s, sizeof(s)) == NULL ||
            inet_ntop(da.family, da.ip, d, sizeof(d)) == NULL)
            return 0;
        n = snprintf((char *)out, cap, "PROXY %s %s %s %u %u\r\n",
                     src->family == AF_INET ? "TCP4" : "TCP6", s, d,
                     (unsigned)src->port, (unsigned)da.port);
    }
    /* snprintf wrote a NUL too; the header is the n bytes before it. */
    return n > 0 && (size_t)n < cap ? (size_t)n : 0;
}

size_t pp_build_v2(const struct net_addr *src, const struct net_addr *dst,
                   uint8_t *out, size_t cap)
{
    size_t alen = src->family == AF_INET ? 4 : 16;
    size_t blen = has_ip(src) ? 2 * alen + 4 : 0;
    struct net_addr da;
    uint8_t *p = out + V2_FIXED;

    if (cap < V2_FIXED + blen)
        return 0;
    memcpy(out, v2_sig, sizeof(v2_sig));
    out[12] = has_ip(src) ? 0x21 : 0x20;      /* version 2, PROXY / LOCAL */
    out[13] = !has_ip(src) ? 0x00 : src->family == AF_INET ? 0x11 : 0x21;
    out[14] = (uint8_t)(blen >> 8);
    out[15] = (uint8_t)blen;
    if (blen == 0)
        return V2_FIXED;
    da = dst_as(src, dst);
    memcpy(p, src->ip, alen);
    memcpy(p + alen, da.ip, alen);
    p += 2 * alen;
    p[0] = (uint8_t)(src->port >> 8);
    p[1] = (uint8_t)src->port;
    p[2] = (uint8_t)(da.port >> 8);
    p[3] = (uint8_t)da.port;
    return V2_FIXED + blen;
}
