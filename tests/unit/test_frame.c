/* tests/unit/test_frame.c - frame encoder and decoder (core/frame.h).
 *
 * The byte-exact reproduction of the reference's frames is in
 * test_session.c; this file covers what the transcripts do not: decoder
 * edge cases (caps, unknown flows, short and misaligned NEW blocks, split
 * input, zero sizes, tag failures, the splice hooks) and encoder rules
 * (caller address mapping, batching limits, iovec layout, partial writes),
 * plus random encode->decode round trips for every cipher and version.
 * Crafted frames are sealed header by header with tc_seal().
 */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include "core/frame.h"
#include "crypto/tcipher.h"

static const uint8_t key[32] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32 };
static const uint8_t iv[16] = { 0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87,
                                0x78, 0x69, 0x5a, 0x4b, 0x3c, 0x2d, 0x1e, 0x0f };
static const uint8_t id_a[16] = { 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa,
                                  0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa, 0xaa };
static const uint8_t extra0[11] = { 'p', 'i', 'n', 'g', 1, 2, 3, 4, 5, 6, 7 };

/* One direction: a gateway seal stream and the client's open stream. */
struct dir {
    struct tc_stream *seal, *open;
    struct frame_dec dec;
    uint8_t wire[1 << 20];
    size_t len;
};

static struct dir *dir_new(enum tc_kind k, unsigned version, uint32_t cap)
{
    struct dir *d = calloc(1, sizeof(*d));

    cr_assert_not_null(d);
    d->seal = tc_new(k, TC_SEAL, TC_SIDE_GATEWAY, key, 32, iv);
    d->open = tc_new(k, TC_OPEN, TC_SIDE_GATEWAY, key, 32, iv);
    cr_assert_not_null(d->seal);
    cr_assert_not_null(d->open);
    frame_dec_init(&d->dec, d->open, version, cap);
    return d;
}

static void dir_free(struct dir *d)
{
    tc_free(d->seal);
    tc_free(d->open);
    free(d);
}

static void put_unit(struct dir *d, const uint8_t *plain, size_t n)
{
    cr_assert_leq(d->len + n + TC_AEAD_OVERHEAD, sizeof(d->wire));
    cr_assert_eq(tc_seal(d->seal, plain, n, d->wire + d->len), 0);
    d->len += n + tc_overhead(d->seal);
}

static void put_hdr(struct dir *d, const uint8_t *id, uint8_t flow, uint32_t size,
                    const uint8_t *extra)
{
    uint8_t h[32];

    memcpy(h, id, 16);
    h[16] = flow;
    h[17] = (uint8_t)(size >> 24);
    h[18] = (uint8_t)(size >> 16);
    h[19] = (uint8_t)(size >> 8);
    h[20] = (uint8_t)size;
    memcpy(h + 21, extra, 11);
    put_unit(d, h, 32);
}

static void put_raw(struct dir *d, const void *p, size_t n)
{
    cr_assert_leq(d->len + n, sizeof(d->wire));
    memcpy(d->wire + d->len, p, n);
    d->len += n;
}

/* Events of one decode, DATA pieces joined per frame. */
struct item {
    struct frame_ev ev;
    uint8_t data[4096];
    size_t len;
    int pieces;
};

struct result {
    struct item items[32];
    size_t n;
    enum frame_res last;
    enum frame_err err;
    size_t bad_at;    /* stream offset where FRAME_BAD came */
};

static void take(struct result *r, const struct frame_ev *ev)
{
    struct item *it = r->n > 0 ? &r->items[r->n - 1] : NULL;

    if (ev->kind != FRAME_EV_DATA || it == NULL || it->ev.kind != FRAME_EV_DATA ||
        it->ev.last) {
        cr_assert_lt(r->n, 32);
        it = &r->items[r->n++];
        memset(it, 0, sizeof(*it));
        it->ev = *ev;
    }
    if (ev->kind == FRAME_EV_DATA) {
        cr_assert_eq(ev->offset, it->len);
        cr_assert_leq(it->len + ev->len, sizeof(it->data));
        if (ev->len > 0)
            memcpy(it->data + it->len, ev->data, ev->len);
        it->len += ev->len;
        it->pieces++;
        it->ev.last = ev->last;
    }
}

/* Feed [from, to) of the wire in chunks of `chunk`; stop at FRAME_BAD. */
static void feed(struct dir *d, size_t from, size_t to, size_t chunk, struct result *r)
{
    for (size_t pos = from; pos < to && r->last != FRAME_BAD;) {
        size_t n = to - pos < chunk ? to - pos : chunk, off = 0;
        uint8_t *buf = malloc(n);

        memcpy(buf, d->wire + pos, n);
        for (;;) {
            struct frame_ev ev;
            size_t used = 99;

            r->last = frame_dec_feed(&d->dec, buf + off, n - off, &used, &ev);
            if (r->last == FRAME_BAD) {
                cr_assert_eq(used, 0);
                r->err = ev.err;
                r->bad_at = pos + off;
                break;
            }
            off += used;
            if (r->last == FRAME_AGAIN) {
                cr_assert_eq(off, n);
                break;
            }
            if (ev.kind == FRAME_EV_DATA && ev.len > 0)
                cr_assert(ev.data >= buf && ev.data + ev.len <= buf + n);
            take(r, &ev);
        }
        free(buf);
        pos += n;
    }
}

static struct result *decode_all(struct dir *d, size_t chunk)
{
    struct result *r = calloc(1, sizeof(*r));

    feed(d, 0, d->len, chunk, r);
    return r;
}

static const enum tc_kind kinds[] = { TC_AES_CBC, TC_AES_GCM, TC_AES_GCM_SIV };

#define FOR_KINDS(k)                                                    \
    for (size_t ki_ = 0; ki_ < 3; ki_++)                                \
        for (enum tc_kind k = kinds[ki_]; tc_available(k); k = (enum tc_kind)0)

/* ---- decoder ------------------------------------------------------------ */

Test(frame_dec, flow_names)
{
    cr_assert_str_eq(frame_flow_name(0x01), "NEW");
    cr_assert_str_eq(frame_flow_name(0x02), "DATA");
    cr_assert_str_eq(frame_flow_name(0x04), "CLOSE");
    cr_assert_str_eq(frame_flow_name(0x08), "PING");
    cr_assert_str_eq(frame_flow_name(0x16), "PAUSE");
    cr_assert_str_eq(frame_flow_name(0x32), "RESUME");
    cr_assert_null(frame_flow_name(0x05), "0x05 is not PING (4.2)");
    cr_assert_null(frame_flow_name(0x10));
    cr_assert_null(frame_flow_name(0x20));
    cr_assert_null(frame_flow_name(0x40));
    cr_assert_null(frame_flow_name(0x00));
    cr_assert_str_eq(frame_err_name(FRAME_ERR_SIZE), "size_above_cap");
}

Test(frame_dec, size_over_cap_is_fatal)
{
    FOR_KINDS(k) {
        struct dir *d = dir_new(k, 2, 1000);
        uint8_t payload[1000] = { 0 };

        put_hdr(d, id_a, FRAME_DATA, 1000, extra0);   /* exactly the cap: fine */
        put_raw(d, payload, 1000);
        size_t good = d->len;
        put_hdr(d, id_a, FRAME_DATA, 1001, extra0);
        put_hdr(d, id_a, FRAME_CLOSE, 0, extra0);
        struct result *r = decode_all(d, 7);
        cr_assert_eq(r->last, FRAME_BAD);
        cr_assert_eq(r->err, FRAME_ERR_SIZE);
        cr_assert_eq(r->n, 1);
        cr_assert_eq(r->items[0].len, 1000);
        cr_assert(r->bad_at > good, "fatal only once the 2nd header is complete");

        /* Dead: any later input is refused with the same error. */
        struct frame_ev ev;
        size_t used = 5;
        cr_assert_eq(frame_dec_feed(&d->dec, payload, 10, &used, &ev), FRAME_BAD);
        cr_assert_eq(used, 0);
        cr_assert_eq(ev.err, FRAME_ERR_SIZE);
        cr_assert_eq(frame_dec_feed(&d->dec, payload, 0, &used, &ev), FRAME_BAD);
        free(r);
        dir_free(d);
    }
}

Test(frame_dec, cap_applies_to_every_flow)
{
    struct dir *d = dir_new(TC_AES_GCM, 1, 64);

    put_hdr(d, id_a, 0x40, 65, extra0);
    struct result *r = decode_all(d, 1);
    cr_assert_eq(r->last, FRAME_BAD);
    cr_assert_eq(r->err, FRAME_ERR_SIZE);
    free(r);
    dir_free(d);
}

Test(frame_dec, default_cap_accepts_16_mib_without_copying)
{
    struct dir *d = dir_new(TC_AES_CBC, 2, 0);
    const size_t mib = 1 << 20;
    uint8_t *chunk = calloc(1, mib);
    uint8_t id[16];
    uint32_t left = 0;
    struct frame_ev ev;
    size_t used, pieces = 0, got = 0;

    put_hdr(d, id_a, FRAME_DATA, FRAME_MAX_DATA, extra0);
    cr_assert_eq(frame_dec_feed(&d->dec, d->wire, d->len, &used, &ev), FRAME_AGAIN);
    cr_assert_eq(used, 32);
    cr_assert(frame_dec_in_data(&d->dec, id, &left));
    cr_assert_eq(left, 16u << 20);
    cr_assert_arr_eq(id, id_a, 16);
    for (int i = 0; i < 16; i++) {
        cr_assert_eq(frame_dec_feed(&d->dec, chunk, mib, &used, &ev), FRAME_OK);
        cr_assert_eq(used, mib);
        cr_assert_eq(ev.data, chunk, "a piece points into the input");
        cr_assert_eq(ev.len, mib);
        cr_assert_eq(ev.offset, got);
        got += ev.len;
        pieces++;
        cr_assert_eq(ev.last, i == 15);
    }
    cr_assert_eq(pieces, 16);
    cr_assert(!frame_dec_in_data(&d->dec, id, &left));

    /* One byte more than the default cap is fatal. */
    d->len = 0;
    put_hdr(d, id_a, FRAME_DATA, FRAME_MAX_DATA + 1, extra0);
    cr_assert_eq(frame_dec_feed(&d->dec, d->wire, d->len, &used, &ev), FRAME_BAD);
    cr_assert_eq(ev.err, FRAME_ERR_SIZE);
    free(chunk);
    dir_free(d);
}

Test(frame_dec, unknown_flows_consumed_and_reported)
{
    static const uint8_t flows[] = { 0x05, 0x40, 0x00, 0x10, 0xff };

    FOR_KINDS(k) {
        for (size_t chunk = 1; chunk <= 70; chunk += 23) {
            struct dir *d = dir_new(k, 1, 0);
            uint8_t junk[100];

            memset(junk, 0x5c, sizeof(junk));
            for (size_t i = 0; i < sizeof(flows); i++) {
                put_hdr(d, id_a, flows[i], (uint32_t)(i * 20), extra0);
                put_raw(d, junk, i * 20);
            }
            put_hdr(d, id_a, FRAME_CLOSE, 0, extra0);
            struct result *r = decode_all(d, chunk);
            cr_assert_neq(r->last, FRAME_BAD);
            cr_assert_eq(r->n, sizeof(flows) + 1);
            for (size_t i = 0; i < sizeof(flows); i++) {
                cr_assert_eq(r->items[i].ev.kind, FRAME_EV_UNKNOWN);
                cr_assert_eq(r->items[i].ev.flow, flows[i]);
                cr_assert_eq(r->items[i].ev.size, i * 20);
                cr_assert_arr_eq(r->items[i].ev.extra, extra0, 11);
            }
            cr_assert_eq(r->items[5].ev.kind, FRAME_EV_FRAME, "still in step");
            cr_assert_eq(r->items[5].ev.flow, FRAME_CLOSE);
            free(r);
            dir_free(d);
        }
    }
}

Test(frame_dec, control_frames_with_data_skip_it)
{
    /* A CLOSE/PING/PAUSE with SIZE > 0: data read and dropped first (4.10). */
    struct dir *d = dir_new(TC_AES_GCM, 2, 0);
    uint8_t junk[33] = { 9 };

    put_hdr(d, id_a, FRAME_PING, 33, extra0);
    put_raw(d, junk, 33);
    put_hdr(d, id_a, FRAME_PAUSE, 1, extra0);
    put_raw(d, junk, 1);
    put_hdr(d, id_a, FRAME_RESUME, 0, extra0);
    struct result *r = decode_all(d, 5);
    cr_assert_eq(r->n, 3);
    cr_assert_eq(r->items[0].ev.kind, FRAME_EV_FRAME);
    cr_assert_eq(r->items[0].ev.flow, FRAME_PING);
    cr_assert_eq(r->items[0].ev.size, 33);
    cr_assert_arr_eq(r->items[0].ev.extra, "ping", 4);
    cr_assert_eq(r->items[1].ev.flow, FRAME_PAUSE);
    cr_assert_eq(r->items[2].ev.flow, FRAME_RESUME);
    free(r);
    dir_free(d);
}

Test(frame_dec, zero_size_frames)
{
    static const uint8_t flows[] = { FRAME_DATA, FRAME_CLOSE, FRAME_PING, FRAME_PAUSE,
                                     FRAME_RESUME, FRAME_NEW };

    FOR_KINDS(k) {
        struct dir *d = dir_new(k, 1, 0);

        for (size_t i = 0; i < sizeof(flows); i++)
            put_hdr(d, id_a, flows[i], 0, extra0);
        struct result *r = decode_all(d, 1000);
        cr_assert_eq(r->last, FRAME_AGAIN);
        cr_assert_eq(r->n, sizeof(flows));
        cr_assert_eq(r->items[0].ev.kind, FRAME_EV_DATA);
        cr_assert_eq(r->items[0].len, 0);
        cr_assert_eq(r->items[0].pieces, 1, "one empty piece for an empty DATA");
        cr_assert(r->items[0].ev.last);
        for (size_t i = 1; i < sizeof(flows); i++) {
            cr_assert_eq(r->items[i].ev.kind, FRAME_EV_FRAME);
            cr_assert_eq(r->items[i].ev.flow, flows[i]);
            cr_assert_eq(r->items[i].ev.size, 0);
        }
        /* v1 NEW: the address is EXTRA bytes 1-4 ("ping" -> 105.110.103.1). */
        cr_assert_eq(r->items[5].ev.caller.family, AF_INET);
        cr_assert_arr_eq(r->items[5].ev.caller.ip, "ing\x01", 4);
        cr_assert(!r->items[5].ev.bad_block);
        free(r);
        dir_free(d);
    }
}

Test(frame_dec, data_split_across_feeds)
{
    FOR_KINDS(k) {
        uint8_t payload[300];

        for (size_t i = 0; i < sizeof(payload); i++)
            payload[i] = (uint8_t)(i * 7);
        for (size_t chunk = 1; chunk <= 400; chunk = chunk * 2 + 1) {
            struct dir *d = dir_new(k, 2, 0);

            put_hdr(d, id_a, FRAME_DATA, 300, extra0);
            put_raw(d, payload, 300);
            put_hdr(d, id_a, FRAME_DATA, 1, extra0);
            put_raw(d, payload, 1);
            struct result *r = decode_all(d, chunk);
            cr_assert_eq(r->n, 2);
            cr_assert_eq(r->items[0].len, 300);
            cr_assert_arr_eq(r->items[0].data, payload, 300);
            cr_assert(r->items[0].ev.last);
            cr_assert_eq(r->items[1].len, 1);
            if (chunk == 1)
                cr_assert_eq(r->items[0].pieces, 300, "payload never buffered");
            free(r);
            dir_free(d);
        }
    }
}

/* A NEW block of n bytes starting with the literal's bytes, zero-padded. */
static void put_block_n(struct dir *d, const char *blk, size_t blen, size_t n)
{
    uint8_t b[64] = { 0 };

    memcpy(b, blk, blen < n ? blen : n);
    put_unit(d, b, n);
}

#define PUT_BLOCK(d, lit, n) put_block_n(d, lit, sizeof(lit) - 1, n)

Test(frame_dec, new_v2_blocks)
{
    char buf[ADDR_STRLEN];

    FOR_KINDS(k) {
        struct dir *d = dir_new(k, 2, 0);

        put_hdr(d, id_a, FRAME_NEW, 16, extra0);
        PUT_BLOCK(d, "4\xcb\x00\x71\x07 padding..", 16);
        put_hdr(d, id_a, FRAME_NEW, 32, extra0);
        PUT_BLOCK(d, "6\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\x12\x34 padding", 32);
        put_hdr(d, id_a, FRAME_NEW, 16, extra0);   /* "6" needs 17 bytes */
        PUT_BLOCK(d, "6\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\x12", 16);
        put_hdr(d, id_a, FRAME_NEW, 0, extra0);    /* no block at all */
        put_hdr(d, id_a, FRAME_NEW, 16, extra0);   /* unknown marker: IPv4 */
        PUT_BLOCK(d, "x\x0a\x00\x00\x01", 16);
        put_hdr(d, id_a, FRAME_NEW, 32, extra0);   /* v4-mapped stays IPv6 (8.1) */
        PUT_BLOCK(d, "6\0\0\0\0\0\0\0\0\0\0\xff\xff\x0a\0\0\x01", 32);
        put_hdr(d, id_a, FRAME_CLOSE, 0, extra0);
        struct result *r = decode_all(d, 3);
        cr_assert_eq(r->n, 7);
        cr_assert_str_eq(addr_ntop(&r->items[0].ev.caller, buf, sizeof(buf)), "203.0.113.7");
        cr_assert_str_eq(addr_ntop(&r->items[1].ev.caller, buf, sizeof(buf)), "2001:db8::1234");
        cr_assert(r->items[2].ev.bad_block);
        cr_assert_eq(r->items[2].ev.caller.family, AF_UNSPEC);
        cr_assert(r->items[3].ev.bad_block);
        cr_assert_str_eq(addr_ntop(&r->items[4].ev.caller, buf, sizeof(buf)), "10.0.0.1");
        cr_assert_eq(r->items[5].ev.caller.family, AF_INET6);
        cr_assert_str_eq(addr_ntop(&r->items[5].ev.caller, buf, sizeof(buf)), "::ffff:10.0.0.1");
        for (int i = 0; i < 6; i++)
            cr_assert_eq(r->items[i].ev.flow, FRAME_NEW);
        cr_assert_eq(r->items[6].ev.flow, FRAME_CLOSE);
        free(r);
        dir_free(d);
    }
}

Test(frame_dec, new_v2_short_aead_block)
{
    /* AEAD has no alignment: a 3-byte block is short, a 20-byte one fine. */
    struct dir *d = dir_new(TC_AES_GCM, 2, 0);

    put_hdr(d, id_a, FRAME_NEW, 3, extra0);
    PUT_BLOCK(d, "4\x01\x02", 3);
    put_hdr(d, id_a, FRAME_NEW, 20, extra0);
    PUT_BLOCK(d, "4\x01\x02\x03\x04", 20);
    struct result *r = decode_all(d, 11);
    cr_assert_eq(r->n, 2);
    cr_assert(r->items[0].ev.bad_block);
    cr_assert(!r->items[1].ev.bad_block);
    cr_assert_arr_eq(r->items[1].ev.caller.ip, "\x01\x02\x03\x04", 4);
    free(r);
    dir_free(d);
}

Test(frame_dec, cbc_v2_new_misaligned_is_fatal)
{
    for (uint32_t size = 1; size < 48; size++) {
        if (size % 16 == 0)
            continue;
        struct dir *d = dir_new(TC_AES_CBC, 2, 0);
        put_hdr(d, id_a, FRAME_NEW, size, extra0);
        struct result *r = decode_all(d, 32);
        cr_assert_eq(r->last, FRAME_BAD);
        cr_assert_eq(r->err, FRAME_ERR_ALIGN, "size %u", size);
        free(r);
        dir_free(d);
    }
    /* Protocol 3 is treated as 2. */
    struct dir *d = dir_new(TC_AES_CBC, 3, 0);
    put_hdr(d, id_a, FRAME_NEW, 20, extra0);
    struct result *r = decode_all(d, 32);
    cr_assert_eq(r->err, FRAME_ERR_ALIGN);
    free(r);
    dir_free(d);
}

Test(frame_dec, new_v2_block_too_large)
{
    struct dir *d = dir_new(TC_AES_GCM, 2, 0);

    put_hdr(d, id_a, FRAME_NEW, FRAME_NEW_BLOCK_MAX + 1, extra0);
    struct result *r = decode_all(d, 60);
    cr_assert_eq(r->last, FRAME_BAD);
    cr_assert_eq(r->err, FRAME_ERR_BLOCK);
    free(r);
    dir_free(d);

    d = dir_new(TC_AES_CBC, 2, 0);
    put_hdr(d, id_a, FRAME_NEW, FRAME_NEW_BLOCK_MAX, extra0);
    uint8_t big[FRAME_NEW_BLOCK_MAX] = { '4', 1, 2, 3, 4 };
    put_unit(d, big, sizeof(big));
    r = decode_all(d, 100);
    cr_assert_eq(r->n, 1, "the cap itself is accepted");
    cr_assert_arr_eq(r->items[0].ev.caller.ip, "\x01\x02\x03\x04", 4);
    free(r);
    dir_free(d);
}

Test(frame_dec, v0_new_with_data_is_plain)
{
    /* Protocol < 2: NEW data is verbatim bytes, consumed and ignored. */
    struct dir *d = dir_new(TC_AES_CBC, 0, 0);
    uint8_t extra[11] = { '4', 192, 0, 2, 1, 0, 0, 0, 0, 0, 0 };

    put_hdr(d, id_a, FRAME_NEW, 5, extra);
    put_raw(d, "hello", 5);
    put_hdr(d, id_a, FRAME_CLOSE, 0, extra0);
    struct result *r = decode_all(d, 4);
    cr_assert_eq(r->n, 2);
    cr_assert_eq(r->items[0].ev.flow, FRAME_NEW);
    cr_assert_arr_eq(r->items[0].ev.caller.ip, "\xc0\x00\x02\x01", 4);
    cr_assert_eq(r->items[1].ev.flow, FRAME_CLOSE);
    free(r);
    dir_free(d);
}

Test(frame_dec, aead_tag_failure_is_fatal)
{
    for (size_t ki = 1; ki < 3; ki++) {
        if (!tc_available(kinds[ki]))
            continue;
        for (int where = 0; where < 2; where++) {
            struct dir *d = dir_new(kinds[ki], 2, 0);

            put_hdr(d, id_a, FRAME_CLOSE, 0, extra0);
            put_hdr(d, id_a, FRAME_NEW, 16, extra0);
            PUT_BLOCK(d, "4abcd", 16);
            /* where 0: the NEW header's tag; 1: the block's tag. */
            d->wire[where == 0 ? 60 + 59 : 120 + 43] ^= 1;
            struct result *r = decode_all(d, 13);
            cr_assert_eq(r->last, FRAME_BAD);
            cr_assert_eq(r->err, FRAME_ERR_OPEN);
            cr_assert_eq(r->n, 1, "the CLOSE before it was delivered");
            free(r);
            dir_free(d);
        }
    }
}

Test(frame_dec, splice_hooks)
{
    struct dir *d = dir_new(TC_AES_GCM, 2, 0);
    uint8_t id[16], payload[100] = { 0 };
    uint32_t left;
    struct frame_ev ev;
    size_t used;

    put_hdr(d, id_a, FRAME_DATA, 100, extra0);
    size_t hdr = d->len;
    put_raw(d, payload, 100);
    put_hdr(d, id_a, FRAME_CLOSE, 0, extra0);
    cr_assert(!frame_dec_in_data(&d->dec, id, &left));
    cr_assert_eq(frame_dec_feed(&d->dec, d->wire, hdr + 10, &used, &ev), FRAME_OK);
    cr_assert_eq(ev.len, 10);
    cr_assert(frame_dec_in_data(&d->dec, id, &left));
    cr_assert_eq(left, 90);
    frame_dec_skip(&d->dec, 89);                 /* moved by splice */
    cr_assert(frame_dec_in_data(&d->dec, id, &left));
    cr_assert_eq(left, 1);
    frame_dec_skip(&d->dec, 1);
    cr_assert(!frame_dec_in_data(&d->dec, id, &left));
    cr_assert_eq(frame_dec_feed(&d->dec, d->wire + hdr + 100, d->len - hdr - 100, &used, &ev),
                 FRAME_OK);
    cr_assert_eq(ev.flow, FRAME_CLOSE);
    dir_free(d);
}

/* ---- encoder ------------------------------------------------------------ */

static int counting_rng(void *ctx, void *buf, size_t n)
{
    uint8_t *c = ctx;

    for (size_t i = 0; i < n; i++)
        ((uint8_t *)buf)[i] = (*c)++;
    return 0;
}

static int failing_rng(void *ctx, void *buf, size_t n)
{
    (void)ctx;
    (void)buf;
    (void)n;
    return -1;
}

static void set_addr(struct net_addr *a, int af, const char *s)
{
    memset(a, 0, sizeof(*a));
    a->family = (sa_family_t)af;
    cr_assert_eq(inet_pton(af, s, a->ip), 1);
}

/* Seal a batch and copy its iovecs out; returns the byte count. */
static size_t flush(struct frame_batch *b, uint8_t *out)
{
    const struct iovec *iov;
    int cnt;
    size_t n = 0;

    cr_assert_eq(frame_batch_seal(b), 0);
    iov = frame_batch_iov(b, &cnt);
    for (int i = 0; i < cnt; i++) {
        memcpy(out + n, iov[i].iov_base, iov[i].iov_len);
        n += iov[i].iov_len;
    }
    return n;
}

/* Open the headers of a CBC stream to check plaintexts. */
static void open_all(const uint8_t *wire, size_t n, uint8_t *plain)
{
    struct tc_stream *o = tc_new(TC_AES_CBC, TC_OPEN, TC_SIDE_GATEWAY, key, 32, iv);

    cr_assert_eq(tc_open(o, wire, n, plain), 0);
    tc_free(o);
}

Test(frame_enc, new_caller_mapping)
{
    static const struct {
        unsigned version;
        int af;
        const char *ip;
        const char *want;   /* v0/1: EXTRA[0..4]; v2: block start */
        size_t wlen;
    } cases[] = {
        { 0, AF_INET, "192.0.2.1", "4\xc0\x00\x02\x01", 5 },
        { 1, AF_INET6, "2001:db8::1", "4\0\0\0\0", 5 },
        { 0, AF_INET6, "::ffff:192.0.2.9", "4\xc0\x00\x02\x09", 5 },
        { 2, AF_INET, "192.0.2.1", "4\xc0\x00\x02\x01", 5 },
        { 2, AF_INET6, "::ffff:192.0.2.9", "4\xc0\x00\x02\x09", 5 },
        { 2, AF_INET6, "2001:db8::1",
          "6\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01", 17 },
        { 3, AF_INET6, "2001:db8::1",
          "6\x20\x01\x0d\xb8\0\0\0\0\0\0\0\0\0\0\0\x01", 17 },
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct tc_stream *s = tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_GATEWAY, key, 32, iv);
        uint8_t ctr = 0x80;
        struct tc_rng rng = { counting_rng, &ctr };
        struct frame_enc e;
        struct frame_batch *b = malloc(sizeof(*b));
        struct net_addr a;
        uint8_t wire[128], plain[128];

        set_addr(&a, cases[i].af, cases[i].ip);
        frame_enc_init(&e, s, cases[i].version, &rng);
        frame_batch_reset(b, &e);
        cr_assert_eq(frame_batch_new(b, id_a, &a), 0);
        size_t n = flush(b, wire);
        cr_assert_eq(n, frame_wire_len(&e, FRAME_NEW, 0, &a));
        open_all(wire, n, plain);
        cr_assert_arr_eq(plain, id_a, 16);
        cr_assert_eq(plain[16], FRAME_NEW);
        if (cases[i].version < 2) {
            cr_assert_eq(n, 32);
            cr_assert_arr_eq(plain + 17, "\0\0\0\0", 4, "SIZE 0");
            cr_assert_arr_eq(plain + 21, cases[i].want, 5, "case %zu", i);
            cr_assert_eq(plain[26], 0x80, "6 random bytes follow");
            cr_assert_eq(plain[31], 0x85);
        } else {
            size_t blen = cases[i].wlen == 17 ? 32 : 16;
            cr_assert_eq(n, 32 + blen);
            cr_assert_eq(plain[20], blen, "SIZE = block length");
            cr_assert_arr_eq(plain + 32, cases[i].want, cases[i].wlen, "case %zu", i);
            /* Block padding drawn first, then the 11 EXTRA bytes. */
            cr_assert_eq(plain[32 + cases[i].wlen], 0x80);
            cr_assert_eq(plain[21], 0x80 + blen - cases[i].wlen);
        }
        free(b);
        tc_free(s);
    }
}

Test(frame_enc, ping_pong_extra)
{
    struct tc_stream *s = tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_GATEWAY, key, 32, iv);
    uint8_t ctr = 1;
    struct tc_rng rng = { counting_rng, &ctr };
    struct frame_enc e;
    struct frame_batch *b = malloc(sizeof(*b));
    uint8_t wire[256], plain[256], id[16];

    frame_enc_init(&e, s, 2, &rng);
    cr_assert_eq(frame_new_id(&e, id), 0);
    cr_assert_eq(id[0], 1);
    cr_assert_eq(id[15], 16);
    frame_batch_reset(b, &e);
    cr_assert_eq(frame_batch_ping(b, id, false), 0);
    cr_assert_eq(frame_batch_ping(b, id, true), 0);
    cr_assert_eq(frame_batch_close(b, id), 0);
    cr_assert_eq(frame_batch_pause(b, id), 0);
    cr_assert_eq(frame_batch_resume(b, id), 0);
    size_t n = flush(b, wire);
    cr_assert_eq(n, 5 * 32);
    open_all(wire, n, plain);
    cr_assert_arr_eq(plain + 21, "ping\x11\x12\x13\x14\x15\x16\x17", 11);
    cr_assert_arr_eq(plain + 32 + 21, "pong\x18", 5);
    cr_assert_eq(plain[64 + 16], FRAME_CLOSE);
    cr_assert_eq(plain[64 + 21], 0x1f);
    cr_assert_eq(plain[96 + 16], FRAME_PAUSE);
    cr_assert_eq(plain[128 + 16], FRAME_RESUME);
    for (int i = 0; i < 5; i++)
        cr_assert_arr_eq(plain + 32 * i + 17, "\0\0\0\0", 4);
    free(b);
    tc_free(s);
}

Test(frame_enc, batch_limits_and_errors)
{
    struct tc_stream *s = tc_new(TC_AES_GCM, TC_SEAL, TC_SIDE_GATEWAY, key, 32, NULL);
    struct tc_rng bad = { failing_rng, NULL };
    struct frame_enc e, ebad;
    struct frame_batch *b = malloc(sizeof(*b));
    struct net_addr a;
    uint8_t one = 1;

    set_addr(&a, AF_INET, "192.0.2.1");
    frame_enc_init(&e, s, 2, NULL);
    frame_batch_reset(b, &e);
    cr_assert(frame_batch_empty(b));
    cr_assert_eq(frame_batch_data(b, id_a, &one, 0), -1, "no empty DATA");
    cr_assert_eq(frame_batch_data(b, id_a, NULL, 1), -1);
    cr_assert_eq(frame_batch_new(b, id_a, NULL), -1);
    cr_assert_eq(frame_batch_close(b, NULL), -1);
    cr_assert(frame_batch_empty(b));
    for (int i = 0; i < FRAME_BATCH_MAX; i++) {
        cr_assert(!frame_batch_full(b));
        cr_assert_eq(frame_batch_new(b, id_a, &a), 0);
    }
    cr_assert(frame_batch_full(b));
    cr_assert_eq(frame_batch_close(b, id_a), -1);
    cr_assert_eq(frame_batch_seal(b), 0);
    cr_assert_eq(frame_batch_left(b), FRAME_BATCH_MAX * (60 + 44));
    int cnt;
    frame_batch_iov(b, &cnt);
    cr_assert_eq(cnt, 1, "sealed units without payloads share one iovec");
    cr_assert_eq(frame_batch_seal(b), -1, "sealed twice");

    /* A failing random source leaves the batch as it was. */
    frame_enc_init(&ebad, s, 2, &bad);
    frame_batch_reset(b, &ebad);
    cr_assert_eq(frame_batch_close(b, id_a), -1);
    cr_assert_eq(frame_batch_new(b, id_a, &a), -1);
    cr_assert(frame_batch_empty(b));
    uint8_t id[16];
    cr_assert_eq(frame_new_id(&ebad, id), -1);

    /* Empty batch: seals to nothing. */
    frame_batch_reset(b, &e);
    cr_assert_eq(frame_batch_seal(b), 0);
    cr_assert_eq(frame_batch_left(b), 0);
    frame_batch_iov(b, &cnt);
    cr_assert_eq(cnt, 0);
    free(b);
    tc_free(s);
}

Test(frame_enc, iovec_layout_and_partial_writes)
{
    struct tc_stream *s = tc_new(TC_AES_GCM, TC_SEAL, TC_SIDE_GATEWAY, key, 32, NULL);
    struct frame_enc e;
    struct frame_batch *b = malloc(sizeof(*b));
    uint8_t p1[100], p2[7], all[1024], again[1024];
    struct net_addr a;
    const struct iovec *iov;
    int cnt;

    memset(p1, 1, sizeof(p1));
    memset(p2, 2, sizeof(p2));
    set_addr(&a, AF_INET6, "2001:db8::5");
    frame_enc_init(&e, s, 2, NULL);
    frame_batch_reset(b, &e);
    cr_assert_eq(frame_batch_new(b, id_a, &a), 0);       /* hdr + block */
    cr_assert_eq(frame_batch_data(b, id_a, p1, 100), 0);  /* hdr, payload */
    cr_assert_eq(frame_batch_data(b, id_a, p2, 7), 0);    /* hdr, payload */
    cr_assert_eq(frame_batch_close(b, id_a), 0);
    cr_assert_eq(frame_batch_ping(b, id_a, true), 0);
    cr_assert_eq(frame_batch_seal(b), 0);
    iov = frame_batch_iov(b, &cnt);
    cr_assert_eq(cnt, 5);
    cr_assert_eq(iov[0].iov_len, 60 + 60 + 60, "NEW hdr + block + DATA hdr");
    cr_assert_eq(iov[1].iov_base, p1, "payloads are borrowed, not copied");
    cr_assert_eq(iov[1].iov_len, 100);
    cr_assert_eq(iov[2].iov_len, 60);
    cr_assert_eq(iov[3].iov_base, p2);
    cr_assert_eq(iov[4].iov_len, 120, "CLOSE + PING");
    size_t total = frame_batch_left(b), n = 0;
    cr_assert_eq(total, 180 + 100 + 60 + 7 + 120);
    cr_assert_eq(total, frame_wire_len(&e, FRAME_NEW, 0, &a) +
                        frame_wire_len(&e, FRAME_DATA, 100, NULL) +
                        frame_wire_len(&e, FRAME_DATA, 7, NULL) +
                        frame_wire_len(&e, FRAME_CLOSE, 0, NULL) +
                        frame_wire_len(&e, FRAME_PING, 0, NULL));
    for (int i = 0; i < cnt; i++) {
        memcpy(all + n, iov[i].iov_base, iov[i].iov_len);
        n += iov[i].iov_len;
    }

    /* Partial writes of 1, 13, 179, ... bytes walk the same bytes. */
    size_t steps[] = { 1, 13, 179, 107, 2, 60, 1000 }, got = 0;
    for (size_t i = 0; frame_batch_left(b) > 0; i++) {
        size_t w = steps[i] < frame_batch_left(b) ? steps[i] : frame_batch_left(b);
        iov = frame_batch_iov(b, &cnt);
        for (int j = 0, k = 0; k < (int)w; j++) {
            size_t c = iov[j].iov_len < w - (size_t)k ? iov[j].iov_len : w - (size_t)k;
            memcpy(again + got + (size_t)k, iov[j].iov_base, c);
            k += (int)c;
        }
        frame_batch_advance(b, w);
        got += w;
    }
    cr_assert_eq(got, total);
    cr_assert_arr_eq(again, all, total);
    frame_batch_advance(b, 10);
    cr_assert_eq(frame_batch_left(b), 0);
    free(b);
    tc_free(s);
}

/* ---- round trip --------------------------------------------------------- */

static uint32_t lcg(uint32_t *s)
{
    *s = *s * 1664525u + 1013904223u;
    return *s >> 8;
}

static void round_trip(enum tc_kind k, unsigned version, uint32_t seed)
{
    struct dir *d = dir_new(k, version, 0);
    struct frame_enc e;
    struct frame_batch *b = malloc(sizeof(*b));
    static uint8_t payload[2000];
    uint8_t flows[200];
    uint32_t sizes[200];
    size_t nf = 0;

    for (size_t i = 0; i < sizeof(payload); i++)
        payload[i] = (uint8_t)(i * 31 + 5);
    frame_enc_init(&e, d->seal, version, NULL);
    for (int batch = 0; batch < 6; batch++) {
        frame_batch_reset(b, &e);
        size_t count = lcg(&seed) % 30 + 1;
        for (size_t i = 0; i < count; i++) {
            uint32_t r = lcg(&seed) % 6, sz = 0;
            struct net_addr a;
            int rc;

            set_addr(&a, AF_INET6, "2001:db8::77");
            switch (r) {
            case 0: rc = frame_batch_new(b, id_a, &a); flows[nf] = FRAME_NEW; break;
            case 1:
                sz = lcg(&seed) % 1999 + 1;
                rc = frame_batch_data(b, id_a, payload, sz);
                flows[nf] = FRAME_DATA;
                break;
            case 2: rc = frame_batch_close(b, id_a); flows[nf] = FRAME_CLOSE; break;
            case 3: rc = frame_batch_ping(b, id_a, sz & 1); flows[nf] = FRAME_PING; break;
            case 4: rc = frame_batch_pause(b, id_a); flows[nf] = FRAME_PAUSE; break;
            default: rc = frame_batch_resume(b, id_a); flows[nf] = FRAME_RESUME; break;
            }
            cr_assert_eq(rc, 0);
            sizes[nf++] = sz;
        }
        cr_assert_eq(frame_batch_seal(b), 0);
        int cnt;
        const struct iovec *iov = frame_batch_iov(b, &cnt);
        for (int i = 0; i < cnt; i++)
            put_raw(d, iov[i].iov_base, iov[i].iov_len);
    }
    struct result *r = calloc(1, sizeof(*r));
    size_t next = 0, chunk = seed % 200 + 1;
    for (size_t pos = 0; pos < d->len; pos += chunk) {
        size_t end = pos + chunk < d->len ? pos + chunk : d->len;
        feed(d, pos, end, chunk, r);
        cr_assert_neq(r->last, FRAME_BAD);
        /* Check and drop every complete frame collected so far. */
        while (r->n > 0 && (r->items[0].ev.kind != FRAME_EV_DATA || r->items[0].ev.last)) {
            struct item *it = &r->items[0];
            cr_assert_lt(next, nf);
            cr_assert_eq(it->ev.flow, flows[next], "frame %zu", next);
            cr_assert_arr_eq(it->ev.id, id_a, 16);
            if (flows[next] == FRAME_DATA) {
                cr_assert_eq(it->len, sizes[next]);
                cr_assert_arr_eq(it->data, payload, it->len);
            }
            if (flows[next] == FRAME_NEW) {
                char buf[ADDR_STRLEN];
                cr_assert(!it->ev.bad_block);
                cr_assert_str_eq(addr_ntop(&it->ev.caller, buf, sizeof(buf)),
                                 version >= 2 ? "2001:db8::77" : "0.0.0.0");
            }
            next++;
            memmove(&r->items[0], &r->items[1], (r->n - 1) * sizeof(r->items[0]));
            r->n--;
        }
    }
    cr_assert_eq(next, nf);
    free(r);
    free(b);
    dir_free(d);
}

Test(frame, encode_decode_round_trip)
{
    FOR_KINDS(k) {
        for (unsigned v = 0; v <= 3; v++)
            for (uint32_t seed = 1; seed < 6; seed++)
                round_trip(k, v, seed * 7919 + v);
    }
}
