/* core/frame.c - multiplexer frame codec, see frame.h. */
#include "core/frame.h"

#include <string.h>

enum dec_state {
    DEC_HDR = 1,      /* staging a sealed header */
    DEC_BLOCK = 2,    /* staging a sealed v>=2 NEW block */
    DEC_PAYLOAD = 3,  /* handing out DATA payload pieces */
    DEC_SKIP = 4,     /* dropping the data of a non-DATA frame */
    DEC_DEAD = 5,     /* after a fatal error */
};

const char *frame_flow_name(uint8_t flow)
{
    switch (flow) {
    case FRAME_NEW: return "NEW";
    case FRAME_DATA: return "DATA";
    case FRAME_CLOSE: return "CLOSE";
    case FRAME_PING: return "PING";
    case FRAME_PAUSE: return "PAUSE";
    case FRAME_RESUME: return "RESUME";
    default: return NULL;
    }
}

const char *frame_err_name(enum frame_err err)
{
    switch (err) {
    case FRAME_ERR_NONE: return "none";
    case FRAME_ERR_OPEN: return "unit_open_failed";
    case FRAME_ERR_SIZE: return "size_above_cap";
    case FRAME_ERR_ALIGN: return "new_block_misaligned";
    case FRAME_ERR_BLOCK: return "new_block_too_large";
    }
    return "unknown";
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* ---- encoder ------------------------------------------------------------ */

void frame_enc_init(struct frame_enc *e, struct tc_stream *seal, unsigned version,
                    const struct tc_rng *rng)
{
    e->tc = seal;
    e->version = version > FRAME_VERSION_MAX ? FRAME_VERSION_MAX : version;
    e->rng = rng != NULL ? *rng : (struct tc_rng){ 0 };
}

int frame_new_id(struct frame_enc *e, uint8_t id[FRAME_ID_LEN])
{
    return tc_rng_draw(&e->rng, id, FRAME_ID_LEN);
}

/* The address a NEW carries: IPv4 (4 bytes, v4-mapped IPv6 unwrapped, "no
 * address" as 0.0.0.0) or true IPv6 (16 bytes). Returns the length. */
static size_t caller_packed(const struct net_addr *a, uint8_t ip[16])
{
    static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

    memset(ip, 0, 16);
    if (a->family == AF_INET6 && memcmp(a->ip, mapped, sizeof(mapped)) == 0) {
        memcpy(ip, a->ip + 12, 4);
        return 4;
    }
    if (a->family == AF_INET6) {
        memcpy(ip, a->ip, 16);
        return 16;
    }
    if (a->family == AF_INET)
        memcpy(ip, a->ip, 4);
    return 4;
}

size_t frame_wire_len(const struct frame_enc *e, uint8_t flow, uint32_t size,
                      const struct net_addr *caller)
{
    size_t ovh = tc_overhead(e->tc);
    uint8_t ip[16];

    if (flow == FRAME_NEW && e->version >= 2 && caller != NULL)
        return FRAME_HDR_LEN + ovh + (caller_packed(caller, ip) == 16 ? 32 : 16) + ovh;
    if (flow == FRAME_NEW)
        return FRAME_HDR_LEN + ovh;
    return FRAME_HDR_LEN + ovh + size;
}

void frame_batch_reset(struct frame_batch *b, struct frame_enc *e)
{
    b->enc = e;
    b->nframes = 0;
    b->nunits = 0;
    b->plain_len = 0;
    b->wire_len = 0;
    b->total = 0;
    b->iovcnt = 0;
    b->iovpos = 0;
    b->sealed = false;
    b->tail_wire = false;
}

bool frame_batch_full(const struct frame_batch *b)
{
    return b->sealed || b->nframes >= FRAME_BATCH_MAX;
}

bool frame_batch_empty(const struct frame_batch *b)
{
    return b->nframes == 0;
}

/* Append len bytes at base to the iovec list. Sealed units are laid out
 * back to back in wire[], so a unit right after another shares its iovec. */
static void push_iov(struct frame_batch *b, const void *base, size_t len, bool wire)
{
    if (wire && b->tail_wire) {
        b->iov[b->iovcnt - 1].iov_len += len;
    } else {
        b->iov[b->iovcnt].iov_base = (void *)base;
        b->iov[b->iovcnt].iov_len = len;
        b->iovcnt++;
    }
    b->tail_wire = wire;
    b->total += len;
}

/* One frame: optional NEW block (head bytes then random padding up to
 * blen), header (id, flow, SIZE, EXTRA prefix then random padding), and an
 * optional borrowed payload. The block's padding is drawn before the
 * header's, the reference's order (tests/data/README.md, Randomness). */
struct frame_parts {
    const uint8_t *id;
    uint8_t flow;
    uint32_t size;
    const uint8_t *xprefix;
    size_t xlen;
    const uint8_t *bhead;
    size_t bhlen;
    size_t blen;
    const void *payload;
    uint32_t plen;
};

static int add_frame(struct frame_batch *b, const struct frame_parts *f)
{
    struct frame_enc *e = b->enc;
    size_t ovh = tc_overhead(e->tc);
    uint8_t *h = b->plain + b->plain_len;
    uint8_t *blk = h + FRAME_HDR_LEN;
    size_t wire_n;

    if (frame_batch_full(b) || f->id == NULL)
        return -1;
    if (f->blen > 0) {
        memcpy(blk, f->bhead, f->bhlen);
        if (tc_rng_draw(&e->rng, blk + f->bhlen, f->blen - f->bhlen) != 0)
            return -1;
    }
    memcpy(h, f->id, FRAME_ID_LEN);
    h[16] = f->flow;
    put_be32(h + 17, f->size);
    if (f->xlen > 0)
        memcpy(h + 21, f->xprefix, f->xlen);
    if (tc_rng_draw(&e->rng, h + 21 + f->xlen, FRAME_EXTRA_LEN - f->xlen) != 0)
        return -1;

    b->lens[b->nunits++] = FRAME_HDR_LEN;
    wire_n = FRAME_HDR_LEN + ovh;
    if (f->blen > 0) {
        b->lens[b->nunits++] = (uint32_t)f->blen;
        wire_n += f->blen + ovh;
    }
    push_iov(b, b->wire + b->wire_len, wire_n, true);
    if (f->plen > 0)
        push_iov(b, f->payload, f->plen, false);
    b->plain_len += FRAME_HDR_LEN + f->blen;
    b->wire_len += wire_n;
    b->nframes++;
    return 0;
}

int frame_batch_new(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN],
                    const struct net_addr *caller)
{
    uint8_t ip[16], head[17];
    struct frame_parts f = { .id = id, .flow = FRAME_NEW };
    size_t iplen;

    if (caller == NULL)
        return -1;
    iplen = caller_packed(caller, ip);
    if (b->enc->version < 2) {
        /* No way to say IPv6 here: the reference sends 0.0.0.0 (4.5). */
        head[0] = '4';
        memcpy(head + 1, ip, 4);
        if (iplen == 16)
            memset(head + 1, 0, 4);
        f.xprefix = head;
        f.xlen = 5;
        return add_frame(b, &f);
    }
    head[0] = iplen == 16 ? '6' : '4';
    memcpy(head + 1, ip, iplen);
    f.bhead = head;
    f.bhlen = 1 + iplen;
    f.blen = iplen == 16 ? 32 : 16;
    f.size = (uint32_t)f.blen;
    return add_frame(b, &f);
}

int frame_batch_data(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN],
                     const void *payload, uint32_t len)
{
    struct frame_parts f = {
        .id = id, .flow = FRAME_DATA, .size = len, .payload = payload, .plen = len,
    };

    /* The reference never sends empty DATA (4.6). */
    if (len == 0 || payload == NULL)
        return -1;
    return add_frame(b, &f);
}

static int add_plain(struct frame_batch *b, const uint8_t *id, uint8_t flow)
{
    struct frame_parts f = { .id = id, .flow = flow };

    return add_frame(b, &f);
}

int frame_batch_close(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN])
{
    return add_plain(b, id, FRAME_CLOSE);
}

int frame_batch_pause(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN])
{
    return add_plain(b, id, FRAME_PAUSE);
}

int frame_batch_resume(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN])
{
    return add_plain(b, id, FRAME_RESUME);
}

int frame_batch_ping(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN], bool reply)
{
    struct frame_parts f = {
        .id = id, .flow = FRAME_PING,
        .xprefix = (const uint8_t *)(reply ? "pong" : "ping"), .xlen = 4,
    };

    return add_frame(b, &f);
}

int frame_batch_seal(struct frame_batch *b)
{
    if (b->sealed)
        return -1;
    if (b->nunits > 0 &&
        tc_seal_batch(b->enc->tc, b->plain, b->lens, b->nunits, b->wire) != 0)
        return -1;
    b->sealed = true;
    return 0;
}

const struct iovec *frame_batch_iov(const struct frame_batch *b, int *iovcnt)
{
    *iovcnt = b->sealed ? b->iovcnt - b->iovpos : 0;
    return &b->iov[b->iovpos];
}

size_t frame_batch_left(const struct frame_batch *b)
{
    return b->sealed ? b->total : 0;
}

void frame_batch_advance(struct frame_batch *b, size_t n)
{
    if (!b->sealed)
        return;
    if (n > b->total)
        n = b->total;
    b->total -= n;
    while (n > 0 && b->iovpos < b->iovcnt) {
        struct iovec *v = &b->iov[b->iovpos];
        size_t take = n < v->iov_len ? n : v->iov_len;

        v->iov_base = (uint8_t *)v->iov_base + take;
        v->iov_len -= take;
        n -= take;
        if (v->iov_len == 0)
            b->iovpos++;
    }
}

/* ---- decoder ------------------------------------------------------------ */

void frame_dec_init(struct frame_dec *d, struct tc_stream *open, unsigned version,
                    uint32_t max_data)
{
    memset(d, 0, sizeof(*d));
    d->tc = open;
    d->version = version > FRAME_VERSION_MAX ? FRAME_VERSION_MAX : version;
    d->max_data = max_data != 0 ? max_data : FRAME_MAX_DATA;
    d->state = DEC_HDR;
    d->need = FRAME_HDR_LEN + tc_overhead(open);
}

static bool flow_known(uint8_t flow)
{
    return frame_flow_name(flow) != NULL;
}

static void to_header(struct frame_dec *d)
{
    d->state = DEC_HDR;
    d->have = 0;
    d->need = FRAME_HDR_LEN + tc_overhead(d->tc);
}

static enum frame_res fail(struct frame_dec *d, enum frame_err err, struct frame_ev *ev)
{
    d->state = DEC_DEAD;
    d->err = err;
    memset(ev, 0, sizeof(*ev));
    ev->err = err;
    return FRAME_BAD;
}

/* The event for the current header, kind and fields filled. */
static void ev_header(const struct frame_dec *d, struct frame_ev *ev)
{
    memset(ev, 0, sizeof(*ev));
    ev->kind = d->flow == FRAME_DATA ? FRAME_EV_DATA
               : flow_known(d->flow) ? FRAME_EV_FRAME : FRAME_EV_UNKNOWN;
    memcpy(ev->id, d->id, FRAME_ID_LEN);
    ev->flow = d->flow;
    ev->size = d->size;
    memcpy(ev->extra, d->extra, FRAME_EXTRA_LEN);
    if (d->flow == FRAME_NEW && d->version < 2)
        addr_from_packed(&ev->caller, d->extra + 1, 4);
}

/* A v>=2 NEW block: "6" + 16 bytes is IPv6, any other marker + 4 bytes is
 * IPv4; fewer bytes than the family needs is a bad block (4.5). */
static void decode_block(const uint8_t *blk, size_t n, struct frame_ev *ev)
{
    size_t iplen = n > 0 && blk[0] == '6' ? 16 : 4;

    if (n < 1 + iplen) {
        ev->bad_block = true;
        return;
    }
    addr_from_packed(&ev->caller, blk + 1, iplen);
}

/* Stage bytes into d->stage; true when the unit is complete. */
static bool stage(struct frame_dec *d, const uint8_t *in, size_t len, size_t *pos)
{
    size_t take = d->need - d->have;

    if (take > len - *pos)
        take = len - *pos;
    memcpy(d->stage + d->have, in + *pos, take);
    d->have += take;
    *pos += take;
    return d->have == d->need;
}

/* A whole header has been staged: open and route it. Returns FRAME_OK with
 * an event, FRAME_BAD, or FRAME_AGAIN meaning "go on consuming". */
static enum frame_res on_header(struct frame_dec *d, struct frame_ev *ev)
{
    size_t ovh = tc_overhead(d->tc);

    if (tc_open(d->tc, d->stage, d->need, d->plain) != 0)
        return fail(d, FRAME_ERR_OPEN, ev);
    memcpy(d->id, d->plain, FRAME_ID_LEN);
    d->flow = d->plain[16];
    d->size = get_be32(d->plain + 17);
    memcpy(d->extra, d->plain + 21, FRAME_EXTRA_LEN);
    if (d->size > d->max_data)
        return fail(d, FRAME_ERR_SIZE, ev);

    if (d->flow == FRAME_NEW && d->version >= 2 && d->size > 0) {
        if (ovh == 0 && d->size % 16 != 0)
            return fail(d, FRAME_ERR_ALIGN, ev);
        if (d->size > FRAME_NEW_BLOCK_MAX)
            return fail(d, FRAME_ERR_BLOCK, ev);
        d->state = DEC_BLOCK;
        d->have = 0;
        d->need = d->size + ovh;
        return FRAME_AGAIN;
    }
    if (d->size > 0) {
        d->state = d->flow == FRAME_DATA ? DEC_PAYLOAD : DEC_SKIP;
        d->left = d->size;
        return FRAME_AGAIN;
    }
    ev_header(d, ev);
    if (d->flow == FRAME_NEW && d->version >= 2)
        ev->bad_block = true;
    if (d->flow == FRAME_DATA)
        ev->last = true;
    to_header(d);
    return FRAME_OK;
}

static enum frame_res on_block(struct frame_dec *d, struct frame_ev *ev)
{
    if (tc_open(d->tc, d->stage, d->need, d->plain) != 0)
        return fail(d, FRAME_ERR_OPEN, ev);
    ev_header(d, ev);
    decode_block(d->plain, d->size, ev);
    to_header(d);
    return FRAME_OK;
}

static enum frame_res on_payload(struct frame_dec *d, const uint8_t *in, size_t len,
                                 size_t *pos, struct frame_ev *ev)
{
    size_t take = d->left;

    if (take > len - *pos)
        take = len - *pos;
    ev_header(d, ev);
    ev->data = in + *pos;
    ev->len = take;
    ev->offset = d->size - d->left;
    d->left -= (uint32_t)take;
    *pos += take;
    ev->last = d->left == 0;
    if (ev->last)
        to_header(d);
    return FRAME_OK;
}

static enum frame_res on_skip(struct frame_dec *d, size_t len, size_t *pos,
                              struct frame_ev *ev)
{
    size_t take = d->left;

    if (take > len - *pos)
        take = len - *pos;
    d->left -= (uint32_t)take;
    *pos += take;
    if (d->left > 0)
        return FRAME_AGAIN;
    ev_header(d, ev);
    to_header(d);
    return FRAME_OK;
}

enum frame_res frame_dec_feed(struct frame_dec *d, const uint8_t *in, size_t len,
                              size_t *used, struct frame_ev *ev)
{
    enum frame_res r = FRAME_AGAIN;
    size_t pos = 0;

    *used = 0;
    if (d->state == DEC_DEAD)
        return fail(d, d->err, ev);
    while (pos < len) {
        switch (d->state) {
        case DEC_HDR:
            r = stage(d, in, len, &pos) ? on_header(d, ev) : FRAME_AGAIN;
            break;
        case DEC_BLOCK:
            r = stage(d, in, len, &pos) ? on_block(d, ev) : FRAME_AGAIN;
            break;
        case DEC_PAYLOAD:
            r = on_payload(d, in, len, &pos, ev);
            break;
        default:
            r = on_skip(d, len, &pos, ev);
            break;
        }
        if (r == FRAME_BAD)
            return r;
        if (r == FRAME_OK) {
            *used = pos;
            return r;
        }
    }
    *used = pos;
    return FRAME_AGAIN;
}

bool frame_dec_in_data(const struct frame_dec *d, uint8_t id[FRAME_ID_LEN], uint32_t *left)
{
    if (d->state != DEC_PAYLOAD)
        return false;
    memcpy(id, d->id, FRAME_ID_LEN);
    *left = d->left;
    return true;
}

void frame_dec_skip(struct frame_dec *d, uint32_t n)
{
    if (d->state != DEC_PAYLOAD)
        return;
    if (n > d->left)
        n = d->left;
    d->left -= n;
    if (d->left == 0)
        to_header(d);
}
