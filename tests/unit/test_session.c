/* tests/unit/test_session.c - replay the reference's session transcripts.
 *
 * For every session in tests/data/{cbc,gcm,gcm_siv}_session.json:
 *
 *  - ENCODE: each side gets the vector key/IV and its own random source fed
 *    with that side's recorded draws (filtered by side, in order; the size
 *    of every draw must match). The gateway sends the challenge and every
 *    server->client frame, the client the answer and every client->server
 *    frame, through challenge.c and frame_batch (once frame by frame, once
 *    as one batch per direction). The bytes must equal the recorded stream
 *    (client->server after the token, which the token module owns).
 *  - DECODE: fresh receiving streams open the challenge unit, then
 *    frame_dec is fed the rest of the stream in chunks of 1..160, 4096 and
 *    whole, plus a pseudo-random chunking; every event must match
 *    `decoded` (flow, id, size, extra, data, NEW address).
 *
 * aes-gcm-siv nonces: a stream's nonces come from its own source (the
 * reference draws them at seal time, interleaved with the padding draws);
 * the test feeds each direction the nonces found in `decoded`, after
 * checking each was one of the recorded `_next_nonce` draws.
 */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include "core/addr.h"
#include "core/challenge.h"
#include "core/frame.h"
#include "crypto/tcipher.h"
#include "tests/unit/testutil.h"

/* ---- recorded random draws ---------------------------------------------- */

#define MAX_DRAWS 128

struct draws {
    size_t count, next;
    size_t n[MAX_DRAWS];
    uint8_t *buf[MAX_DRAWS];
    const char *what;
};

static int draws_take(void *ctx, void *buf, size_t n)
{
    struct draws *d = ctx;

    cr_assert_lt(d->next, d->count, "%s: draw #%zu of %zu bytes not recorded",
                 d->what, d->next, n);
    cr_assert_eq(d->n[d->next], n, "%s: draw #%zu is %zu bytes, recorded %zu",
                 d->what, d->next, n, d->n[d->next]);
    memcpy(buf, d->buf[d->next], n);
    d->next++;
    return 0;
}

static void draws_add(struct draws *d, const char *hex)
{
    size_t n;

    cr_assert_lt(d->count, MAX_DRAWS);
    d->buf[d->count] = tu_unhex(hex, &n);
    d->n[d->count++] = n;
}

static void draws_free(struct draws *d)
{
    for (size_t i = 0; i < d->count; i++)
        free(d->buf[i]);
    d->count = d->next = 0;
}

static bool is_nonce_draw(json_t *r)
{
    return strstr(tu_str(r, "caller"), "_next_nonce") != NULL;
}

/* The padding/id/challenge draws of one side ("server" or "client"). */
static void side_draws(json_t *sess, const char *side, struct draws *d)
{
    json_t *all = json_object_get(sess, "random_draws"), *r;
    size_t i;

    memset(d, 0, sizeof(*d));
    d->what = side;
    json_array_foreach(all, i, r) {
        if (strcmp(tu_str(r, "side"), side) == 0 && !is_nonce_draw(r))
            draws_add(d, tu_str(r, "hex"));
    }
}

static bool nonce_recorded(json_t *sess, const char *hex)
{
    json_t *all = json_object_get(sess, "random_draws"), *r;
    size_t i;

    json_array_foreach(all, i, r) {
        if (is_nonce_draw(r) && strcmp(tu_str(r, "hex"), hex) == 0)
            return true;
    }
    return false;
}

static void nonce_add(json_t *sess, json_t *item, const char *key, struct draws *d)
{
    json_t *v = json_object_get(item, key);

    if (v == NULL)
        return;
    cr_assert(nonce_recorded(sess, json_string_value(v)),
              "nonce %s not among the recorded draws", json_string_value(v));
    draws_add(d, json_string_value(v));
}

/* aes-gcm-siv: the nonces of one direction, in wire order. */
static void direction_nonces(json_t *sess, const char *dir, struct draws *d)
{
    json_t *items = json_object_get(json_object_get(sess, "decoded"), dir), *it;
    size_t i;

    memset(d, 0, sizeof(*d));
    d->what = dir;
    json_array_foreach(items, i, it) {
        nonce_add(sess, it, "nonce_hex", d);
        nonce_add(sess, it, "header_nonce_hex", d);
        nonce_add(sess, it, "data_nonce_hex", d);
    }
}

/* ---- a session ---------------------------------------------------------- */

struct session {
    json_t *doc, *sess;
    enum tc_kind kind;
    unsigned version;
    uint8_t *key, *iv;
    size_t keylen, ivlen;
    uint8_t *s2c, *c2s;
    size_t s2c_len, c2s_len;
    size_t token_len;
    json_t *s2c_items, *c2s_items;
};

static bool load_session(struct session *s, const char *file, unsigned version)
{
    json_t *sessions, *it;
    size_t i;

    memset(s, 0, sizeof(*s));
    s->doc = tu_load_json(file);
    cr_assert_eq(tc_kind_parse(tu_str(s->doc, "cipher"), &s->kind), 0);
    if (!tc_available(s->kind)) {
        json_decref(s->doc);
        cr_skip_test("%s: the linked OpenSSL has no %s (needs 3.2+)", file,
                     tc_kind_name(s->kind));
        return false;
    }
    sessions = json_object_get(s->doc, "sessions");
    json_array_foreach(sessions, i, it) {
        if (json_integer_value(json_object_get(it, "protocol_version")) == version)
            s->sess = it;
    }
    cr_assert_not_null(s->sess, "%s has no protocol %u session", file, version);
    s->version = version;
    s->key = tu_unhex(tu_str(s->doc, "aes_key_hex"), &s->keylen);
    s->iv = tu_unhex(tu_str(s->doc, "aes_iv_hex"), &s->ivlen);
    s->s2c = tu_unhex(tu_str(s->sess, "server_to_client_stream_hex"), &s->s2c_len);
    s->c2s = tu_unhex(tu_str(s->sess, "client_to_server_stream_hex"), &s->c2s_len);
    s->s2c_items = json_object_get(json_object_get(s->sess, "decoded"), "server_to_client");
    s->c2s_items = json_object_get(json_object_get(s->sess, "decoded"), "client_to_server");
    it = json_array_get(s->c2s_items, 0);
    cr_assert_str_eq(tu_str(it, "kind"), "fernet_token");
    s->token_len = (size_t)json_integer_value(json_object_get(it, "wire_len"));
    return true;
}

static void free_session(struct session *s)
{
    free(s->key);
    free(s->iv);
    free(s->s2c);
    free(s->c2s);
    json_decref(s->doc);
}

static struct tc_stream *stream(const struct session *s, enum tc_dir dir, enum tc_side sender)
{
    struct tc_stream *t = tc_new(s->kind, dir, sender, s->key, s->keylen, s->iv);

    cr_assert_not_null(t);
    return t;
}

/* ---- encoding ----------------------------------------------------------- */

struct out {
    uint8_t *buf;
    size_t len, cap;
};

static void out_put(struct out *o, const void *p, size_t n)
{
    cr_assert_leq(o->len + n, o->cap);
    memcpy(o->buf + o->len, p, n);
    o->len += n;
}

/* Collect a sealed batch the way writev would, checking advance(). */
static void batch_flush(struct frame_batch *b, struct out *o)
{
    size_t before = o->len, left = frame_batch_left(b);
    const struct iovec *iov;
    int cnt;

    cr_assert_eq(frame_batch_seal(b), 0);
    left = frame_batch_left(b);
    iov = frame_batch_iov(b, &cnt);
    cr_assert_leq(cnt, 2 * FRAME_BATCH_MAX + 1);
    for (int i = 0; i < cnt; i++)
        out_put(o, iov[i].iov_base, iov[i].iov_len);
    cr_assert_eq(o->len - before, left);
    frame_batch_advance(b, left);
    cr_assert_eq(frame_batch_left(b), 0);
    iov = frame_batch_iov(b, &cnt);
    cr_assert_eq(cnt, 0);
    frame_batch_reset(b, b->enc);
}

static void caller_of(int nth_new, struct net_addr *a)
{
    /* The script: device A is 203.0.113.7, device B 2001:db8::1234. */
    memset(a, 0, sizeof(*a));
    if (nth_new == 0) {
        a->family = AF_INET;
        cr_assert_eq(inet_pton(AF_INET, "203.0.113.7", a->ip), 1);
    } else {
        a->family = AF_INET6;
        cr_assert_eq(inet_pton(AF_INET6, "2001:db8::1234", a->ip), 1);
    }
}

/* Add one decoded frame item to the batch, drawing an id first where the
 * reference did (NEW, PING request). */
static void add_item(struct frame_enc *e, struct frame_batch *b, json_t *it,
                     int *nnew, uint8_t **keep)
{
    size_t idlen, dlen;
    uint8_t *id = tu_unhex(tu_str(it, "id_hex"), &idlen);
    uint8_t drawn[FRAME_ID_LEN];
    int flow = (int)json_integer_value(json_object_get(it, "flow"));
    json_t *prefix = json_object_get(it, "extra_ascii_prefix");
    bool reply = prefix != NULL && strcmp(json_string_value(prefix), "pong") == 0;
    struct net_addr caller;

    if (flow == FRAME_NEW || (flow == FRAME_PING && !reply)) {
        cr_assert_eq(frame_new_id(e, drawn), 0);
        cr_assert_arr_eq(drawn, id, FRAME_ID_LEN);
    }
    switch (flow) {
    case FRAME_NEW:
        caller_of((*nnew)++, &caller);
        cr_assert_eq(frame_batch_new(b, id, &caller), 0);
        break;
    case FRAME_DATA:
        *keep = tu_unhex(tu_str(it, "data_hex"), &dlen);
        cr_assert_eq(frame_batch_data(b, id, *keep, (uint32_t)dlen), 0);
        break;
    case FRAME_CLOSE:
        cr_assert_eq(frame_batch_close(b, id), 0);
        break;
    case FRAME_PING:
        cr_assert_eq(frame_batch_ping(b, id, reply), 0);
        break;
    case FRAME_PAUSE:
        cr_assert_eq(frame_batch_pause(b, id), 0);
        break;
    case FRAME_RESUME:
        cr_assert_eq(frame_batch_resume(b, id), 0);
        break;
    default:
        cr_assert_fail("unexpected flow %d in the vectors", flow);
    }
    free(id);
}

/* Encode every frame item of one direction; batched = one batch for all. */
static void encode_frames(struct frame_enc *e, json_t *items, size_t first, bool batched,
                          struct out *o)
{
    struct frame_batch *b = malloc(sizeof(*b));
    uint8_t *keep[64] = { 0 };
    size_t nkeep = 0, i;
    int nnew = 0;
    json_t *it;

    cr_assert_not_null(b);
    frame_batch_reset(b, e);
    json_array_foreach(items, i, it) {
        if (i < first)
            continue;
        cr_assert_str_eq(tu_str(it, "kind"), "frame");
        cr_assert_lt(nkeep, 64);
        add_item(e, b, it, &nnew, &keep[nkeep++]);
        if (!batched)
            batch_flush(b, o);
    }
    if (batched)
        batch_flush(b, o);
    for (i = 0; i < nkeep; i++)
        free(keep[i]);
    free(b);
}

static void check_encode(const struct session *s, bool batched)
{
    struct draws srv, cli, srv_n, cli_n;
    struct tc_rng srv_rng = { draws_take, &srv }, cli_rng = { draws_take, &cli };
    struct tc_rng srv_nr = { draws_take, &srv_n }, cli_nr = { draws_take, &cli_n };
    struct tc_stream *gw_seal = stream(s, TC_SEAL, TC_SIDE_GATEWAY);
    struct tc_stream *gw_open = stream(s, TC_OPEN, TC_SIDE_CLIENT);
    struct tc_stream *cl_seal = stream(s, TC_SEAL, TC_SIDE_CLIENT);
    struct tc_stream *cl_open = stream(s, TC_OPEN, TC_SIDE_GATEWAY);
    struct out s2c = { malloc(s->s2c_len), 0, s->s2c_len };
    struct out c2s = { malloc(s->c2s_len), 0, s->c2s_len };
    struct challenge ch;
    struct frame_enc gw_enc, cl_enc;
    uint8_t unit[CHALLENGE_WIRE_MAX];
    size_t clen = challenge_wire_len(gw_seal);

    side_draws(s->sess, "server", &srv);
    side_draws(s->sess, "client", &cli);
    memset(&srv_n, 0, sizeof(srv_n));
    memset(&cli_n, 0, sizeof(cli_n));
    if (s->kind == TC_AES_GCM_SIV) {
        direction_nonces(s->sess, "server_to_client", &srv_n);
        direction_nonces(s->sess, "client_to_server", &cli_n);
        tc_set_rng(gw_seal, &srv_nr);
        tc_set_rng(cl_seal, &cli_nr);
    }

    /* Challenge: gateway seals C, client answers, gateway verifies. */
    cr_assert_eq(challenge_new(&ch, gw_seal, &srv_rng, unit), 0);
    out_put(&s2c, unit, clen);
    cr_assert_eq(challenge_answer(cl_open, cl_seal, s->s2c, unit), 0);
    out_put(&c2s, unit, clen);
    cr_assert_eq(challenge_verify(&ch, gw_open, unit), 0);

    frame_enc_init(&gw_enc, gw_seal, s->version, &srv_rng);
    frame_enc_init(&cl_enc, cl_seal, s->version, &cli_rng);
    encode_frames(&gw_enc, s->s2c_items, 1, batched, &s2c);
    encode_frames(&cl_enc, s->c2s_items, 2, batched, &c2s);

    cr_assert_eq(s2c.len, s->s2c_len);
    cr_assert_arr_eq(s2c.buf, s->s2c, s->s2c_len, "server->client stream differs");
    cr_assert_eq(c2s.len + s->token_len, s->c2s_len);
    cr_assert_arr_eq(c2s.buf, s->c2s + s->token_len, c2s.len, "client->server stream differs");
    cr_assert_eq(srv.next, srv.count, "server draws left over");
    cr_assert_eq(cli.next, cli.count, "client draws left over");
    if (s->kind == TC_AES_GCM_SIV) {
        cr_assert_eq(srv_n.next, srv_n.count);
        cr_assert_eq(cli_n.next, cli_n.count);
    }

    draws_free(&srv);
    draws_free(&cli);
    draws_free(&srv_n);
    draws_free(&cli_n);
    free(s2c.buf);
    free(c2s.buf);
    tc_free(gw_seal);
    tc_free(gw_open);
    tc_free(cl_seal);
    tc_free(cl_open);
}

/* ---- decoding ----------------------------------------------------------- */

/* What the decoder produced for one frame (DATA pieces joined). */
struct got {
    struct frame_ev ev;
    uint8_t *data;
    size_t len;
};

struct decode_run {
    struct got got[64];
    size_t ngot;
    bool in_data;
};

static void collect(struct decode_run *r, const struct frame_ev *ev,
                    const uint8_t *chunk, size_t clen)
{
    struct got *g;

    if (ev->kind == FRAME_EV_DATA && r->in_data) {
        g = &r->got[r->ngot - 1];
        cr_assert_arr_eq(ev->id, g->ev.id, FRAME_ID_LEN);
        cr_assert_eq(ev->offset, g->len);
    } else {
        cr_assert_lt(r->ngot, 64);
        g = &r->got[r->ngot++];
        memset(g, 0, sizeof(*g));
        g->ev = *ev;
        g->data = malloc(ev->size + 1);
        cr_assert_eq(ev->offset, 0);
    }
    if (ev->kind == FRAME_EV_DATA) {
        /* Pieces point into the caller's input, never into a copy. */
        if (ev->len > 0) {
            cr_assert(ev->data >= chunk && ev->data + ev->len <= chunk + clen);
            memcpy(g->data + g->len, ev->data, ev->len);
        }
        g->len += ev->len;
        r->in_data = !ev->last;
    }
}

/* Decode bytes [0, len) of a direction after its challenge, chunked by
 * next_chunk(i), each chunk in its own exact-size heap buffer. */
static void decode_chunked(const struct session *s, enum tc_side sender,
                           const uint8_t *wire, size_t len, size_t (*next_chunk)(size_t, size_t),
                           size_t param, struct decode_run *r)
{
    struct tc_stream *open = stream(s, TC_OPEN, sender);
    struct frame_dec *d = malloc(sizeof(*d));
    uint8_t plain[CHALLENGE_LEN];
    size_t clen = challenge_wire_len(open), pos, k = 0;

    cr_assert_not_null(d);
    cr_assert_eq(tc_open(open, wire, clen, plain), 0);
    frame_dec_init(d, open, s->version, 0);
    memset(r, 0, sizeof(*r));
    for (pos = clen; pos < len; k++) {
        size_t n = next_chunk(k, param), off = 0;
        uint8_t *chunk;

        if (n > len - pos)
            n = len - pos;
        chunk = malloc(n);
        memcpy(chunk, wire + pos, n);
        for (;;) {
            struct frame_ev ev;
            size_t used;
            enum frame_res res = frame_dec_feed(d, chunk + off, n - off, &used, &ev);

            cr_assert_neq(res, FRAME_BAD, "decode error %s at %zu", frame_err_name(ev.err),
                          pos + off);
            off += used;
            if (res == FRAME_AGAIN)
                break;
            collect(r, &ev, chunk, n);
        }
        cr_assert_eq(off, n);
        free(chunk);
        pos += n;
    }
    cr_assert(!r->in_data, "stream ended inside a DATA payload");
    free(d);
    tc_free(open);
}

static void check_item(const struct got *g, json_t *it, unsigned version)
{
    size_t n;
    uint8_t *id = tu_unhex(tu_str(it, "id_hex"), &n);
    uint8_t *extra = tu_unhex(tu_str(it, "extra_hex"), &n);
    int flow = (int)json_integer_value(json_object_get(it, "flow"));
    json_t *data = json_object_get(it, "data_hex"), *addr = json_object_get(it, "new_address");
    char buf[ADDR_STRLEN];

    cr_assert_eq(g->ev.flow, flow);
    cr_assert_eq(g->ev.kind, flow == FRAME_DATA ? FRAME_EV_DATA : FRAME_EV_FRAME);
    cr_assert_arr_eq(g->ev.id, id, FRAME_ID_LEN);
    cr_assert_eq(g->ev.size, (uint32_t)json_integer_value(json_object_get(it, "size")));
    cr_assert_arr_eq(g->ev.extra, extra, FRAME_EXTRA_LEN);
    cr_assert(!g->ev.bad_block);
    if (flow == FRAME_DATA) {
        uint8_t *want = tu_unhex(json_string_value(data), &n);
        cr_assert_eq(g->len, n);
        cr_assert_arr_eq(g->data, want, n);
        free(want);
    }
    if (flow == FRAME_NEW) {
        cr_assert_not_null(addr);
        cr_assert_str_eq(addr_ntop(&g->ev.caller, buf, sizeof(buf)), json_string_value(addr),
                         "NEW caller (protocol %u)", version);
    }
    free(id);
    free(extra);
}

static void check_run(struct decode_run *r, json_t *items, size_t first, unsigned version)
{
    cr_assert_eq(r->ngot, json_array_size(items) - first);
    for (size_t i = 0; i < r->ngot; i++) {
        check_item(&r->got[i], json_array_get(items, first + i), version);
        free(r->got[i].data);
    }
}

static size_t fixed_chunk(size_t k, size_t size)
{
    (void)k;
    return size;
}

/* Deterministic irregular split: 1..97 bytes, seeded by the parameter. */
static size_t odd_chunk(size_t k, size_t seed)
{
    return (k * 2654435761u + seed * 40503u) % 97 + 1;
}

static void check_decode_dir(const struct session *s, enum tc_side sender,
                             const uint8_t *wire, size_t len, json_t *items, size_t first)
{
    static const size_t extra_sizes[] = { 4096, 1 << 20 };
    struct decode_run r;

    for (size_t size = 1; size <= 160; size++) {
        decode_chunked(s, sender, wire, len, fixed_chunk, size, &r);
        check_run(&r, items, first, s->version);
    }
    for (size_t i = 0; i < sizeof(extra_sizes) / sizeof(extra_sizes[0]); i++) {
        decode_chunked(s, sender, wire, len, fixed_chunk, extra_sizes[i], &r);
        check_run(&r, items, first, s->version);
    }
    for (size_t seed = 0; seed < 8; seed++) {
        decode_chunked(s, sender, wire, len, odd_chunk, seed, &r);
        check_run(&r, items, first, s->version);
    }
}

static void run_session(const char *file, unsigned version)
{
    struct session s;

    if (!load_session(&s, file, version))
        return;
    check_encode(&s, false);
    check_encode(&s, true);
    check_decode_dir(&s, TC_SIDE_GATEWAY, s.s2c, s.s2c_len, s.s2c_items, 1);
    check_decode_dir(&s, TC_SIDE_CLIENT, s.c2s + s.token_len, s.c2s_len - s.token_len,
                     s.c2s_items, 2);
    free_session(&s);
}

Test(session, cbc_v2) { run_session("cbc_session.json", 2); }
Test(session, cbc_v1) { run_session("cbc_session.json", 1); }
Test(session, cbc_v0) { run_session("cbc_session.json", 0); }
Test(session, gcm_v2) { run_session("gcm_session.json", 2); }
Test(session, gcm_v0) { run_session("gcm_session.json", 0); }
Test(session, gcm_siv_v2) { run_session("gcm_siv_session.json", 2); }
