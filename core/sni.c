/* core/sni.c - see sni.h for the contract.
 *
 * Two passes over the buffer, both bounded:
 *
 *   1. frame_hello(): walk the record headers until the handshake bytes in
 *      complete records reach 4 + L (L from the handshake header, which may
 *      itself straddle records). Decides AGAIN / NOT_TLS / early BAD, and
 *      yields hello_len and H, the handshake bytes available (>= 4 + L).
 *   2. parse_hello(): read the ClientHello through a cursor that skips the
 *      record headers, every read bounded by a limit <= H. Pass 1 proved
 *      that the records holding those H bytes lie inside the input, so the
 *      cursor cannot leave it.
 */
#include "core/sni.h"

#include <stdbool.h>
#include <string.h>

#define REC_HDR 5        /* type(1) version(2) length(2) */
#define REC_HANDSHAKE 0x16
#define HS_HDR 4         /* type(1) length(3) */
#define HS_CLIENT_HELLO 0x01
#define EXT_SERVER_NAME 0x0000
#define NAME_HOST 0x00

/* What pass 1 learned about the hello's records. */
struct hello_frame {
    size_t first_len; /* body length of the first record */
    size_t hs_bytes;  /* H: handshake bytes in the hello's records */
    size_t end;       /* input offset just past the last hello record */
};

/* Forward-only reader over the handshake stream (record bodies joined). */
struct hs_cur {
    const uint8_t *buf;
    size_t off;     /* logical offset in the handshake stream */
    size_t pos;     /* input offset of the byte at off */
    size_t rec_end; /* input offset where the current record body ends */
};

static enum sni_res finish(struct sni_result *out, enum sni_res res,
                           enum sni_reason reason, const char *why)
{
    out->reason = reason;
    out->why = why;
    return res;
}

static enum sni_res bad(struct sni_result *out, enum sni_reason reason,
                        const char *why)
{
    return finish(out, SNI_BAD, reason, why);
}

static enum sni_res again(struct sni_result *out)
{
    return finish(out, SNI_AGAIN, SNI_R_NONE, "need more bytes");
}

static size_t be16(const uint8_t *p)
{
    return (size_t)p[0] << 8 | p[1];
}

static size_t be24(const uint8_t *p)
{
    return (size_t)p[0] << 16 | be16(p + 1);
}

/* Checks on a record header, as far as its bytes have arrived; the
 * version is checked on every record of the hello, not just the first. */
static enum sni_res check_record(const uint8_t *buf, size_t len, size_t pos,
                                 struct sni_result *out)
{
    if (buf[pos] != REC_HANDSHAKE) {
        if (pos == 0)
            return finish(out, SNI_NOT_TLS, SNI_R_NOT_TLS,
                          "not a TLS handshake record");
        return bad(out, SNI_R_RECORD, "non-handshake record inside ClientHello");
    }
    if (pos + 1 < len && buf[pos + 1] < 3)
        return bad(out, SNI_R_OLD_VERSION, "record version below 3");
    return SNI_OK;
}

/* Feed the handshake header bytes of one record body (only the part that
 * has arrived) into hdr[]; reject a wrong type or a declared length beyond
 * SNI_MAX_HELLO as soon as the bytes are visible. */
static enum sni_res take_hs_header(const uint8_t *p, size_t n, uint8_t hdr[HS_HDR],
                                   size_t *have, struct sni_result *out)
{
    for (size_t i = 0; i < n && *have < HS_HDR; i++)
        hdr[(*have)++] = p[i];
    if (*have >= 1 && hdr[0] != HS_CLIENT_HELLO)
        return bad(out, SNI_R_NOT_HELLO, "handshake is not a ClientHello");
    if (*have == HS_HDR && HS_HDR + be24(hdr + 1) > SNI_MAX_HELLO)
        return bad(out, SNI_R_TOO_LARGE, "ClientHello too large");
    return SNI_OK;
}

/* Pass 1: find the records that hold the whole handshake message. */
static enum sni_res frame_hello(const uint8_t *buf, size_t len,
                                struct hello_frame *f, struct sni_result *out)
{
    uint8_t hdr[HS_HDR];
    size_t have = 0, pos = 0, got = 0;
    enum sni_res r;

    for (;;) {
        /* A further record needs a header and at least one body byte. */
        if (pos + REC_HDR + 1 > SNI_MAX_INPUT)
            return bad(out, SNI_R_TOO_LARGE, "ClientHello too large");
        if (pos >= len)
            return again(out);
        if ((r = check_record(buf, len, pos, out)) != SNI_OK)
            return r;
        if (len - pos < REC_HDR)
            return again(out);
        size_t rlen = be16(buf + pos + 3), body = pos + REC_HDR;
        if (rlen == 0) /* forbidden for handshake records (RFC 8446 5.1) */
            return bad(out, SNI_R_RECORD, "empty handshake record");
        if (body + rlen > SNI_MAX_INPUT)
            return bad(out, SNI_R_TOO_LARGE, "ClientHello too large");
        size_t seen = len - body < rlen ? len - body : rlen;
        if ((r = take_hs_header(buf + body, seen, hdr, &have, out)) != SNI_OK)
            return r;
        if (seen < rlen)
            return again(out);
        if (pos == 0)
            f->first_len = rlen;
        got += rlen;
        pos = body + rlen;
        if (have == HS_HDR && got >= HS_HDR + be24(hdr + 1))
            break;
    }
    f->hs_bytes = got;
    f->end = pos;
    return SNI_OK;
}

/* Step over the next record header; frame_hello() validated it. */
static void cur_next_record(struct hs_cur *c)
{
    size_t rlen = be16(c->buf + c->pos + 3);

    c->pos += REC_HDR;
    c->rec_end = c->pos + rlen;
}

/* Advance n handshake bytes. The caller has checked off + n against a
 * limit <= H, so every record entered lies inside the input. */
static void cur_skip(struct hs_cur *c, size_t n)
{
    while (n > 0) {
        if (c->pos == c->rec_end)
            cur_next_record(c);
        size_t step = c->rec_end - c->pos < n ? c->rec_end - c->pos : n;
        c->pos += step;
        c->off += step;
        n -= step;
    }
}

/* Next handshake byte; the caller has checked off < a limit <= H. */
static uint8_t cur_byte(struct hs_cur *c)
{
    if (c->pos == c->rec_end)
        cur_next_record(c);
    c->off++;
    return c->buf[c->pos++];
}

/* Read an n-byte big-endian number (n <= 3) that must end by lim. */
static bool cur_num(struct hs_cur *c, size_t n, size_t lim, size_t *v)
{
    if (lim - c->off < n)
        return false;
    *v = 0;
    while (n-- > 0)
        *v = *v << 8 | cur_byte(c);
    return true;
}

/* Skip a vector with a pfx-byte length prefix that must end by lim. */
static bool cur_skip_vec(struct hs_cur *c, size_t pfx, size_t lim)
{
    size_t n;

    if (!cur_num(c, pfx, lim, &n) || lim - c->off < n)
        return false;
    cur_skip(c, n);
    return true;
}

/* Strict UTF-8 as Python's decoder: no overlongs, surrogates or > U+10FFFF. */
static bool utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        uint8_t c = s[i], lo = 0x80, hi = 0xbf;

        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xc2 || c > 0xf4)
            return false;
        size_t more = c < 0xe0 ? 1 : c < 0xf0 ? 2 : 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f; /* no UTF-16 surrogates */
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f; /* nothing past U+10FFFF */
        if (n - i - 1 < more || s[i + 1] < lo || s[i + 1] > hi)
            return false;
        for (size_t k = 2; k <= more; k++)
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
        i += more + 1;
    }
    return true;
}

/* C0 controls and DEL would let a peer forge log lines; no DNS name has
 * them (PROTOCOL.md 7.3 allows rejecting bytes outside [A-Za-z0-9.-]). */
static bool has_control(const uint8_t *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] < 0x20 || s[i] == 0x7f)
            return true;
    return false;
}

/* Copy a host_name of n bytes (the caller checked it fits the list) and
 * validate it. */
static enum sni_res take_name(struct hs_cur *c, size_t n, struct sni_result *out)
{
    uint8_t name[SNI_NAME_MAX];

    if (n == 0)
        return bad(out, SNI_R_EMPTY_NAME, "empty host name");
    if (n > SNI_NAME_MAX)
        return bad(out, SNI_R_LONG_NAME, "host name longer than 255 bytes");
    for (size_t i = 0; i < n; i++)
        name[i] = cur_byte(c);
    if (has_control(name, n))
        return bad(out, SNI_R_BAD_CHAR, "control character in host name");
    if (!utf8_valid(name, n))
        return bad(out, SNI_R_BAD_UTF8, "host name not valid UTF-8");
    memcpy(out->name, name, n);
    out->name[n] = '\0';
    out->name_len = n;
    return finish(out, SNI_OK, SNI_R_NONE, "ok");
}

/* server_name extension body ending at lim: the first host_name entry. */
static enum sni_res parse_server_name(struct hs_cur *c, size_t lim,
                                      struct sni_result *out)
{
    size_t list_len, type, n;

    if (!cur_num(c, 2, lim, &list_len) || lim - c->off < list_len)
        return bad(out, SNI_R_MALFORMED, "server_name list overruns extension");
    size_t list_end = c->off + list_len;
    while (c->off < list_end) {
        if (!cur_num(c, 1, list_end, &type) || !cur_num(c, 2, list_end, &n))
            return bad(out, SNI_R_MALFORMED, "truncated server_name entry");
        if (list_end - c->off < n)
            return bad(out, SNI_R_MALFORMED, "host name overruns server_name list");
        if (type == NAME_HOST)
            return take_name(c, n, out);
        cur_skip(c, n);
    }
    return bad(out, SNI_R_NO_NAME, "no host_name in server_name");
}

/* Extensions block: find the first server_name extension. */
static enum sni_res parse_extensions(struct hs_cur *c, size_t lim,
                                     struct sni_result *out)
{
    size_t ext_len, type, n;

    if (c->off == lim)
        return bad(out, SNI_R_NO_NAME, "no extensions");
    if (!cur_num(c, 2, lim, &ext_len) || lim - c->off < ext_len)
        return bad(out, SNI_R_MALFORMED, "extensions overrun ClientHello");
    size_t ext_end = c->off + ext_len;
    while (c->off < ext_end) {
        if (!cur_num(c, 2, ext_end, &type) || !cur_num(c, 2, ext_end, &n))
            return bad(out, SNI_R_MALFORMED, "truncated extension header");
        if (ext_end - c->off < n)
            return bad(out, SNI_R_MALFORMED, "extension overruns extensions block");
        if (type == EXT_SERVER_NAME)
            return parse_server_name(c, c->off + n, out);
        cur_skip(c, n);
    }
    return bad(out, SNI_R_NO_NAME, "no server_name extension");
}

/* Pass 2: the ClientHello within the H handshake bytes of its records. */
static enum sni_res parse_hello(const uint8_t *buf, const struct hello_frame *f,
                                struct sni_result *out)
{
    struct hs_cur c = {
        .buf = buf, .off = 0, .pos = REC_HDR, .rec_end = REC_HDR + f->first_len,
    };
    size_t lim = f->hs_bytes;

    /* handshake header, client_version, random */
    if (lim < HS_HDR + 2 + 32)
        return bad(out, SNI_R_MALFORMED, "ClientHello truncated");
    cur_skip(&c, HS_HDR + 2 + 32);
    if (!cur_skip_vec(&c, 1, lim) ||  /* session_id */
        !cur_skip_vec(&c, 2, lim) ||  /* cipher_suites */
        !cur_skip_vec(&c, 1, lim))    /* compression_methods */
        return bad(out, SNI_R_MALFORMED, "ClientHello truncated");
    return parse_extensions(&c, lim, out);
}

enum sni_res sni_parse(const uint8_t *buf, size_t len, struct sni_result *out)
{
    struct hello_frame f = {0};
    enum sni_res r;

    out->hello_len = 0;
    out->name_len = 0;
    out->name[0] = '\0';
    if ((r = frame_hello(buf, len, &f, out)) != SNI_OK)
        return r;
    out->hello_len = f.end;
    return parse_hello(buf, &f, out);
}

const char *sni_reason_name(enum sni_reason reason)
{
    /* Checklist: one entry per enum sni_reason value, same order. */
    static const char *const names[SNI_R_COUNT] = {
        [SNI_R_NONE] = "none",
        [SNI_R_NOT_TLS] = "not_tls",
        [SNI_R_OLD_VERSION] = "old_version",
        [SNI_R_NOT_HELLO] = "not_hello",
        [SNI_R_RECORD] = "record",
        [SNI_R_TOO_LARGE] = "too_large",
        [SNI_R_MALFORMED] = "malformed",
        [SNI_R_NO_NAME] = "no_name",
        [SNI_R_EMPTY_NAME] = "empty_name",
        [SNI_R_LONG_NAME] = "long_name",
        [SNI_R_BAD_UTF8] = "bad_utf8",
        [SNI_R_BAD_CHAR] = "bad_char",
    };

    if ((unsigned)reason >= SNI_R_COUNT || names[reason] == NULL)
        return "unknown";
    return names[reason];
}

size_t sni_name_normalize(char *name, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (name[i] >= 'A' && name[i] <= 'Z')
            name[i] = (char)(name[i] - 'A' + 'a');
    if (len > 1 && name[len - 1] == '.')
        name[--len] = '\0';
    return len;
}
