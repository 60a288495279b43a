/* tests/fuzz/fuzz_frame.c - libFuzzer target for the frame decoder.
 *
 * Input: [combo][mode][split hi][split lo][body...]
 *   combo: cipher (combo % 3: cbc, gcm, gcm-siv -> gcm when unavailable),
 *          protocol version ((combo / 3) % 4: 0..3) and the sending side
 *          ((combo / 12) % 2: gateway, client), which sets the GCM prefix.
 *   mode 0 (raw): body is a wire stream as the peer would send it, starting
 *          with the challenge unit (opened first, as the client does), so
 *          the session transcripts are valid seeds. With aes-cbc anything
 *          decrypts, so most inputs reach header parsing.
 *   mode 1 (sealed): body is records [kind][len hi][len lo][bytes]; kind
 *          even: seal the bytes as one unit (zero-padded to 16 for CBC),
 *          odd: append them verbatim. This lets AEAD inputs get past the
 *          tag with fuzz-chosen header and NEW-block plaintexts.
 * Keys are the vectors' key and IV. The stream is decoded twice, split at
 * the fuzzer's offset and in small chunks, and both runs must produce the
 * same events, the same outcome and consume the same bytes; every DATA
 * piece must lie inside the buffer it was fed from.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/frame.h"
#include "crypto/tcipher.h"

static const uint8_t fkey[32] = {
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76, 0x87, 0x98, 0xa9, 0xba, 0xbb, 0xdc, 0xdd, 0xfe, 0xef,
};
static const uint8_t fiv[16] = { 0x0f, 0x0e, 0x0d, 0x0c, 0x0b, 0x0a, 0x09, 0x08,
                                 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 0x00 };

#define CAP (1u << 16)     /* decoder SIZE cap: small, so it is reachable */

struct outcome {
    uint64_t digest;       /* FNV-1a over events and DATA bytes */
    size_t consumed;       /* bytes accepted before AGAIN or BAD */
    enum frame_res last;
    enum frame_err err;
    size_t events;
};

/* Not a hash table, just a fingerprint to compare two runs. */
static void mix(struct outcome *o, const void *p, size_t n)
{
    const uint8_t *b = p;

    for (size_t i = 0; i < n; i++)
        o->digest = (o->digest ^ b[i]) * 0x100000001b3ull;
}

static void record(struct outcome *o, const struct frame_ev *ev)
{
    if (ev->kind != FRAME_EV_DATA || ev->offset == 0) {
        mix(o, &ev->kind, sizeof(ev->kind));
        mix(o, ev->id, sizeof(ev->id));
        mix(o, &ev->flow, 1);
        mix(o, &ev->size, sizeof(ev->size));
        mix(o, ev->extra, sizeof(ev->extra));
        mix(o, &ev->caller, sizeof(ev->caller));
        mix(o, &ev->bad_block, sizeof(ev->bad_block));
        o->events++;
    }
    if (ev->kind == FRAME_EV_DATA) {
        if (ev->len > 0)
            mix(o, ev->data, ev->len);
        if (ev->offset + ev->len > ev->size)
            abort();
        if (ev->last != (ev->offset + ev->len == ev->size))
            abort();
    }
}

static enum tc_kind pick_kind(uint8_t combo)
{
    static const enum tc_kind kinds[] = { TC_AES_CBC, TC_AES_GCM, TC_AES_GCM_SIV };
    enum tc_kind k = kinds[combo % 3];

    return tc_available(k) ? k : TC_AES_GCM;
}

/* Feed one chunk (copied into its own allocation, so reads past it trip
 * ASan); returns false once the decoder is done (BAD). */
static bool feed_chunk(struct frame_dec *d, const uint8_t *src, size_t n, struct outcome *o)
{
    uint8_t *buf = malloc(n ? n : 1);
    size_t off = 0;
    bool more = true;

    memcpy(buf, src, n);
    for (;;) {
        struct frame_ev ev;
        size_t used = 0;

        o->last = frame_dec_feed(d, buf + off, n - off, &used, &ev);
        if (used > n - off)
            abort();
        off += used;
        o->consumed += used;
        if (o->last == FRAME_BAD) {
            o->err = ev.err;
            more = false;
            /* Dead for good: more input gives the same error, uses nothing. */
            if (frame_dec_feed(d, buf, n, &used, &ev) != FRAME_BAD || used != 0 ||
                ev.err != o->err)
                abort();
            break;
        }
        if (o->last == FRAME_AGAIN) {
            uint8_t id[FRAME_ID_LEN];
            uint32_t left = 0;

            if (off != n)
                abort();
            if (frame_dec_in_data(d, id, &left) && left == 0)
                abort();
            break;
        }
        if (ev.kind == FRAME_EV_DATA && ev.len > 0 &&
            (ev.data < buf || ev.data + ev.len > buf + n))
            abort();
        record(o, &ev);
    }
    free(buf);
    return more;
}

/* Decode `wire` with a fresh open stream; `chunk` 0 = split once at split. */
static void decode(enum tc_kind k, enum tc_side side, unsigned version, const uint8_t *wire, size_t len,
                   bool challenge, size_t split, size_t chunk, struct outcome *o)
{
    struct tc_stream *open = tc_new(k, TC_OPEN, side, fkey, 32, fiv);
    struct frame_dec *d = malloc(sizeof(*d));
    uint8_t plain[32];
    size_t pos = 0;

    memset(o, 0, sizeof(*o));
    o->digest = 0xcbf29ce484222325ull;
    o->last = FRAME_AGAIN;     /* what an empty input leaves */
    if (open == NULL || d == NULL)
        abort();
    if (challenge) {
        size_t cl = 32 + tc_overhead(open);
        if (len < cl || tc_open(open, wire, cl, plain) != 0)
            goto out;
        pos = cl;
    }
    frame_dec_init(d, open, version, CAP);
    if (chunk == 0) {
        size_t cut = pos + (len > pos ? split % (len - pos + 1) : 0);
        if (feed_chunk(d, wire + pos, cut - pos, o))
            feed_chunk(d, wire + cut, len - cut, o);
    } else {
        while (pos < len) {
            size_t n = len - pos < chunk ? len - pos : chunk;
            if (!feed_chunk(d, wire + pos, n, o))
                break;
            pos += n;
        }
    }
out:
    free(d);
    tc_free(open);
}

/* Mode 1: build a wire stream from [kind][len][bytes] records. */
static uint8_t *build_sealed(enum tc_kind k, enum tc_side side, const uint8_t *body, size_t len, size_t *out_len)
{
    struct tc_stream *seal = tc_new(k, TC_SEAL, side, fkey, 32, fiv);
    size_t cap = len * 16 + 64, n = 0, pos = 0;
    uint8_t *wire = malloc(cap + 4096), unit[4096];

    if (seal == NULL || wire == NULL)
        abort();
    while (pos + 3 <= len) {
        uint8_t kind = body[pos];
        size_t rl = (size_t)body[pos + 1] << 8 | body[pos + 2];

        pos += 3;
        if (rl > len - pos)
            rl = len - pos;
        if (rl > 2048)
            rl = 2048;
        if (kind % 2 == 1) {
            if (n + rl > cap)
                break;
            memcpy(wire + n, body + pos, rl);
            n += rl;
        } else {
            size_t ul = k == TC_AES_CBC ? (rl + 15) / 16 * 16 : rl;
            memset(unit, 0, ul);
            memcpy(unit, body + pos, rl);
            if (n + ul + TC_AEAD_OVERHEAD > cap + 4096)
                break;
            if (tc_seal(seal, unit, ul, wire + n) != 0)
                abort();
            n += ul + tc_overhead(seal);
        }
        pos += rl;
    }
    tc_free(seal);
    *out_len = n;
    return wire;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct outcome a, b;
    enum tc_kind k;
    enum tc_side side;
    unsigned version;
    bool sealed;
    size_t split, wlen, chunk;
    const uint8_t *wire;
    uint8_t *built = NULL;

    if (size < 4)
        return 0;
    k = pick_kind(data[0]);
    version = (data[0] / 3) % 4;
    side = (data[0] / 12) % 2 ? TC_SIDE_CLIENT : TC_SIDE_GATEWAY;
    sealed = data[1] & 1;
    split = (size_t)data[2] << 8 | data[3];
    chunk = (size_t)(data[3] % 13) + 1;
    if (sealed) {
        built = build_sealed(k, side, data + 4, size - 4, &wlen);
        wire = built;
    } else {
        wire = data + 4;
        wlen = size - 4;
    }
    decode(k, side, version, wire, wlen, !sealed, split, 0, &a);
    decode(k, side, version, wire, wlen, !sealed, 0, chunk, &b);
    /* Bytes "consumed" before a fatal error depend on where the input was
     * cut (the failing unit's bytes are not reported), so only compare
     * them when both runs ended waiting for more. */
    if (a.digest != b.digest || a.last != b.last || a.err != b.err || a.events != b.events)
        abort();
    if (a.last != FRAME_BAD && a.consumed != b.consumed)
        abort();
    free(built);
    return 0;
}
