/* core/gw_conn.c - one accepted connection, from accept to the
 * multiplexer: PROXY header, classification, ClientHello or token,
 * challenge (PROTOCOL.md 1.3, 1.4, 2.7, 3.5, 6.8).
 *
 * States (c->st) and transitions; every arrow that is not drawn closes
 * the connection with nothing sent (one log line, one counter):
 *
 *   accept --single/sni, --proxy-protocol--> PROXY --header or none--+
 *     |                                                              |
 *     +--single------------------------> CLASSIFY <--------(single)--+
 *     |                                    |  16 --------> SNI <-(sni)+
 *     +--sni---------------------------------------------> SNI
 *     |                                    |  "gA" -----> TOKEN
 *     +--peer-------------------------------------------> TOKEN
 *
 *   SNI   --sni_parse OK--> gw_route(): channel here, or handoff, or close
 *   TOKEN --token_verify OK--> send challenge + read answer --> ANSWER
 *   ANSWER --answer verifies--> READY --challenge send done--> gw_tunnel_start()
 *
 * Invariants:
 *  - At most one recv (c->rd) and one send (c->wr, the challenge only) in
 *    flight; the fd is handed over only when neither is.
 *  - The first bytes are read in gw_conn_start itself (eng_try_recv, no op
 *    in flight yet): the client speaks first, so they are usually there,
 *    and a ClientHello is routed in the accept's own turn.
 *  - One deadline timer: --handshake-timeout from accept until the
 *    ClientHello or token is complete, then --challenge-timeout.
 *  - The buffer holds everything read: c->buf[0..off) is the PROXY header,
 *    c->buf[off..len) the payload; it grows up to the current stage's cap
 *    (stage_cap), and every stage gives a final answer at its cap.
 *  - The unauthenticated count (gw->handshakes) and the per-IP slot are
 *    held from accept (per-IP: from the end of the PROXY header) until the
 *    connection leaves this file, whichever way.
 */
#include "core/gw_impl.h"
#include "crypto/b64.h"

#include <errno.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define CONN_BUF_INIT 4096u
#define ANSWER_CAP 4096u

enum step {
    STEP_MORE = 1, /* read more bytes */
    STEP_NEXT,     /* stage changed: run the next one on the same bytes */
    STEP_DONE,     /* handed over, closed, or waiting for the send */
};

static double now_real(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- per-IP counts (tsearch tree per shard) --------------------------- */

static int ip_cmp(const void *a, const void *b)
{
    const struct gw_ipcount *x = a, *y = b;

    if (x->ip.family != y->ip.family)
        return x->ip.family < y->ip.family ? -1 : 1;
    return memcmp(x->ip.ip, y->ip.ip, sizeof(x->ip.ip));
}

/* Take a slot for c->caller; -1 when the IP is at its limit (or memory
 * ran out, which is treated the same: refuse rather than not count). */
static int ip_acquire(struct gw_conn *c)
{
    struct gw_shard *sh = c->sh;
    uint32_t max = sh->gw->cfg->max_handshakes_per_ip;
    struct gw_ipcount key = { .ip = c->caller }, *kp = &key, *ipc;
    void **found;

    if (max == 0)
        return 0;
    key.ip.port = 0;
    found = tfind(kp, &sh->ip_tree, ip_cmp);
    if (found != NULL) {
        ipc = *found;
        if (ipc->n >= max)
            return -1;
        ipc->n++;
    } else {
        ipc = malloc(sizeof(*ipc));
        if (ipc == NULL)
            return -1;
        *ipc = key;
        ipc->n = 1;
        if (tsearch(ipc, &sh->ip_tree, ip_cmp) == NULL) {
            free(ipc);
            return -1;
        }
    }
    c->ipc = ipc;
    return 0;
}

static void ip_release(struct gw_conn *c)
{
    struct gw_ipcount *ipc = c->ipc;

    if (ipc == NULL)
        return;
    c->ipc = NULL;
    if (--ipc->n == 0) {
        tdelete(ipc, &c->sh->ip_tree, ip_cmp);
        free(ipc);
    }
}

/* ---- lifetime -------------------------------------------------------------- */

static void conn_free_cb(struct eng_defer *d)
{
    struct gw_conn *c = caa_container_of(d, struct gw_conn, free_d);
    struct gw_shard *sh = c->sh;

    free(c);
    sh->nconns--;
    gw_shard_check_drained(sh);
}

/* Release everything but the memory, which goes at the end of the turn. */
static void conn_release(struct gw_conn *c)
{
    struct gw_shard *sh = c->sh;

    eng_timer_del(sh->eng, &c->deadline);
    if (c->fd >= 0)
        eng_close(sh->eng, c->fd);
    c->fd = -1;
    ip_release(c);
    if (c->counted)
        atomic_fetch_sub(&sh->gw->handshakes, 1);
    c->counted = false;
    if (c->have_claims)
        claims_fini(&c->claims);
    c->have_claims = false;
    tc_free(c->seal);
    tc_free(c->open);
    c->seal = c->open = NULL;
    free(c->buf);
    c->buf = NULL;
    cds_list_del(&c->link);
    eng_defer(sh->eng, &c->free_d, conn_free_cb);
}

static void conn_maybe_free(struct gw_conn *c)
{
    if (c->closing && !c->rd_busy && !c->wr_busy)
        conn_release(c);
}

static void conn_close(struct gw_conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    eng_timer_del(c->sh->eng, &c->deadline);
    if (c->rd_busy)
        eng_cancel(&c->rd);
    if (c->wr_busy)
        eng_cancel(&c->wr);
    conn_maybe_free(c);
}

/* The connection left for a tunnel or a channel: c->fd is -1 already. */
static void conn_handed_over(struct gw_conn *c)
{
    c->closing = true;
    conn_maybe_free(c);
}

/* Close with nothing sent: one counter, one (rate-limited) line. detail
 * is the parser's reason token, or the SNI name for unknown_name. */
static void conn_reject(struct gw_conn *c, enum gw_rej why, const char *detail)
{
    struct gw_shard *sh = c->sh;
    char peer[ADDR_STRLEN], caller[ADDR_STRLEN];

    if (c->closing)
        return;
    sh->ctr.rej[why]++;
    gw_metric_reject(sh, c->st, why, why == GW_REJ_UNKNOWN_NAME ? NULL : detail);
    addr_format(&c->peer, peer, sizeof(peer));
    addr_ntop(&c->caller, caller, sizeof(caller));
    if (why == GW_REJ_STOPPING)
        log_msg(LOG_DEBUG, "connection closed", "shard", LOG_U64(sh->idx), "stage",
                gw_stage_name(c->st), "reason", gw_rej_name(why), "peer", peer, NULL);
    else
        /* a reused GCM key is an attack or a broken client: warn */
        log_ratelimited(&sh->rl, why == GW_REJ_GCM_REUSED ? LOG_WARN : LOG_INFO,
                        "connection rejected", "shard", LOG_U64(sh->idx),
                        "stage", gw_stage_name(c->st), "reason", gw_rej_name(why), "peer", peer,
                        "caller", caller, "bytes", LOG_U64(c->len),
                        detail != NULL ? (why == GW_REJ_UNKNOWN_NAME ? "sni"
                                          : why == GW_REJ_GCM_REUSED ? "host" : "detail")
                                       : NULL,
                        detail, NULL);
    conn_close(c);
}

void gw_conn_abort(struct gw_conn *c, enum gw_rej why)
{
    conn_reject(c, why, NULL);
}

/* ---- reading ------------------------------------------------------------------ */

/* Bytes the buffer may hold in the current stage; each stage's parser
 * gives a final answer once that much is buffered. */
static size_t stage_cap(const struct gw_conn *c)
{
    switch (c->st) {
    case GW_ST_PROXY:
        return PP_MAX_HEADER;
    case GW_ST_CLASSIFY: /* what the smaller next stage may hold */
    case GW_ST_TOKEN:
        return c->off + GW_TOKEN_MAX;
    case GW_ST_SNI:
        return c->off + SNI_MAX_INPUT;
    case GW_ST_ANSWER:
    case GW_ST_READY:
    default:
        return ANSWER_CAP;
    }
}

static void on_read(struct eng_op *op, int res);

/* Arm the recv for the rest of the stage's cap. Returns -1 (after
 * rejecting) when the buffer is full or cannot grow. */
static int conn_read(struct gw_conn *c)
{
    size_t cap = stage_cap(c);

    if (c->len >= cap) {
        /* The parsers are final at their caps: this is a bug guard. */
        conn_reject(c, GW_REJ_NOMEM, "buffer_full");
        return -1;
    }
    if (c->len == c->cap) {
        size_t ncap = c->cap * 2 < cap ? c->cap * 2 : cap;
        uint8_t *nb = realloc(c->buf, ncap);
        if (nb == NULL) {
            conn_reject(c, GW_REJ_NOMEM, "buffer");
            return -1;
        }
        c->buf = nb;
        c->cap = ncap;
    }
    c->rd_busy = true;
    eng_recv(c->sh->eng, &c->rd, c->fd, c->buf + c->len,
             (cap < c->cap ? cap : c->cap) - c->len);
    return 0;
}

/* ---- stages ------------------------------------------------------------------- */

static enum step step_proxy(struct gw_conn *c)
{
    struct pp_result pr;

    switch (pp_parse(c->buf, c->len, &pr)) {
    case PP_AGAIN:
        return STEP_MORE;
    case PP_BAD:
        c->sh->ctr.pp[pr.reason]++;
        conn_reject(c, GW_REJ_PROXY, pp_reason_name(pr.reason));
        return STEP_DONE;
    case PP_OK:
        c->off = pr.size;
        if (pr.source.family != AF_UNSPEC)
            c->caller = pr.source;
        break;
    case PP_NONE:
    default:
        break;
    }
    /* Per-IP limits count the real source, not the load balancer. */
    if (ip_acquire(c) != 0) {
        conn_reject(c, GW_REJ_IP_LIMIT, NULL);
        return STEP_DONE;
    }
    c->st = c->kind == GW_L_SNI ? GW_ST_SNI : GW_ST_CLASSIFY;
    return STEP_NEXT;
}

static enum step step_classify(struct gw_conn *c)
{
    const uint8_t *b = c->buf + c->off;
    size_t n = c->len - c->off;

    if (n == 0)
        return STEP_MORE;
    if (b[0] == 0x16) {
        c->st = GW_ST_SNI;
        return STEP_NEXT;
    }
    /* Every Fernet token starts with "gA"; wait for the second byte
     * rather than judge a lone 'g' (PROTOCOL.md 1.3, 9.23). */
    if (b[0] == 'g' && n < 2)
        return STEP_MORE;
    if (b[0] == 'g' && b[1] == 'A') {
        c->st = GW_ST_TOKEN;
        return STEP_NEXT;
    }
    conn_reject(c, GW_REJ_GARBAGE, NULL);
    return STEP_DONE;
}

static enum step step_sni(struct gw_conn *c)
{
    struct sni_result r;
    enum gw_rej why;

    switch (sni_parse(c->buf + c->off, c->len - c->off, &r)) {
    case SNI_AGAIN:
        return STEP_MORE; /* final at SNI_MAX_INPUT = the stage cap */
    case SNI_OK:
        break;
    case SNI_NOT_TLS:
    case SNI_BAD:
    default:
        c->sh->ctr.sni[r.reason]++;
        conn_reject(c, GW_REJ_SNI, sni_reason_name(r.reason));
        return STEP_DONE;
    }
    eng_timer_del(c->sh->eng, &c->deadline);
    why = gw_route(c, r.name, r.name_len);
    if (why != GW_REJ_NONE) {
        conn_reject(c, why, why == GW_REJ_UNKNOWN_NAME ? r.name : NULL);
        return STEP_DONE;
    }
    conn_handed_over(c);
    return STEP_DONE;
}

static void on_sent(struct eng_op *op, int res);

/* Token verified: build the streams, send the challenge, read the answer. */
static enum step start_challenge(struct gw_conn *c)
{
    struct gw_shard *sh = c->sh;
    const struct claims *cl = &c->claims;
    const uint8_t *iv = cl->aes_iv_len == CLAIMS_IV_LEN ? cl->aes_iv : NULL;

    if (cl->cipher_unknown) {
        /* PROTOCOL.md 2.5: run aes-cbc as the reference does, but say so. */
        sh->ctr.cipher_unknown++;
        log_ratelimited(&sh->rl, LOG_WARN, "token names an unknown cipher, running aes-cbc",
                        "shard", LOG_U64(sh->idx), "host", cl->hostname, NULL);
    }
    c->seal = tc_new(cl->cipher, TC_SEAL, TC_SIDE_GATEWAY, cl->aes_key, cl->aes_key_len, iv);
    c->open = tc_new(cl->cipher, TC_OPEN, TC_SIDE_CLIENT, cl->aes_key, cl->aes_key_len, iv);
    if (c->seal == NULL || c->open == NULL ||
        challenge_new(&c->ch, c->seal, NULL, c->chwire) != 0) {
        conn_reject(c, GW_REJ_NOMEM, "cipher");
        return STEP_DONE;
    }
    c->chlen = challenge_wire_len(c->seal);
    /* The token bytes are done with; the answer starts a fresh buffer. */
    c->len = c->off = 0;
    c->st = GW_ST_ANSWER;
    eng_timer_add(sh->eng, &c->deadline, sh->gw->cfg->challenge_ms);
    c->iov = (struct iovec){ c->chwire, c->chlen };
    c->wr_busy = true;
    eng_send(sh->eng, &c->wr, c->fd, &c->iov, 1);
    return STEP_MORE;
}

static enum step step_token(struct gw_conn *c)
{
    struct gw_shard *sh = c->sh;
    const struct gw_keys *k = rcu_dereference(sh->gw->keys);
    size_t n = c->len - c->off;
    const uint8_t *b = c->buf + c->off;
    enum token_err e;
    double now;

    /* Every token starts with "gA" (PROTOCOL.md 1.3): on the peer port,
     * anything else can never verify, so do not wait for the deadline. */
    if (n == 0)
        return STEP_MORE;
    if (b[0] != 'g' || (n >= 2 && b[1] != 'A')) {
        conn_reject(c, GW_REJ_GARBAGE, "not_a_token");
        return STEP_DONE;
    }
    /* A byte no token can hold: refuse now instead of holding a handshake
     * slot until the deadline (and count it as what it is). */
    if (!b64_url_prefix_ok((const char *)b, n)) {
        sh->ctr.token[TOKEN_BAD_BASE64]++;
        conn_reject(c, GW_REJ_TOKEN, token_strerror(TOKEN_BAD_BASE64));
        return STEP_DONE;
    }
    now = now_real();
    e = token_verify(k->ks.v, k->ks.n, (const char *)c->buf + c->off, n, now, &c->claims, NULL);
    if (e == TOKEN_OK) {
        c->have_claims = true;
        eng_timer_del(sh->eng, &c->deadline);
        /* The challenge is sealed with GCM counter 0: from here the key is
         * spent, whatever happens next (PROTOCOL.md 3.3). */
        if (c->claims.cipher == TC_AES_GCM &&
            !gw_seen_claim(&sh->gw->seen, c->claims.aes_key, c->claims.aes_key_len,
                           c->claims.valid, now)) {
            conn_reject(c, GW_REJ_GCM_REUSED, c->claims.hostname);
            return STEP_DONE;
        }
        return start_challenge(c);
    }
    /* A Fernet-layer failure may just be a token cut by TCP: every byte
     * that arrives before the challenge belongs to the token (2.7). If
     * none comes, on_deadline names the failure (token_deadline_verdict). */
    if (e >= TOKEN_BAD_BASE64 && e <= TOKEN_BAD_PADDING) {
        if (n < GW_TOKEN_MAX)
            return STEP_MORE;
        sh->ctr.token[e]++;
        conn_reject(c, GW_REJ_TOKEN_TOO_LONG, token_strerror(e));
        return STEP_DONE;
    }
    if ((unsigned)e < TOKEN_ERR_COUNT)
        sh->ctr.token[e]++;
    conn_reject(c, GW_REJ_TOKEN, token_strerror(e));
    return STEP_DONE;
}

static enum step step_answer(struct gw_conn *c)
{
    size_t need = challenge_wire_len(c->open);

    if (c->len < need)
        return STEP_MORE;
    if (challenge_verify(&c->ch, c->open, c->buf) != 0) {
        conn_reject(c, GW_REJ_CHALLENGE, NULL);
        return STEP_DONE;
    }
    /* Bytes after the answer are the first frames: the mux gets them. */
    c->off = need;
    c->st = GW_ST_READY;
    return STEP_NEXT;
}

static enum step step_ready(struct gw_conn *c)
{
    if (c->wr_busy)
        return STEP_DONE; /* on_sent comes back here */
    eng_timer_del(c->sh->eng, &c->deadline);
    if (gw_tunnel_start(c) != 0) {
        conn_reject(c, GW_REJ_NOMEM, "tunnel");
        return STEP_DONE;
    }
    conn_handed_over(c);
    return STEP_DONE;
}

/* Run stages on what is buffered until one needs more bytes or ends. */
static void conn_step(struct gw_conn *c)
{
    enum step s;

    do {
        switch (c->st) {
        case GW_ST_PROXY:
            s = step_proxy(c);
            break;
        case GW_ST_CLASSIFY:
            s = step_classify(c);
            break;
        case GW_ST_SNI:
            s = step_sni(c);
            break;
        case GW_ST_TOKEN:
            s = step_token(c);
            break;
        case GW_ST_ANSWER:
            s = step_answer(c);
            break;
        case GW_ST_READY:
        default:
            s = step_ready(c);
            break;
        }
    } while (s == STEP_NEXT);
    if (s == STEP_MORE && !c->closing && !c->rd_busy)
        conn_read(c);
}

/* ---- callbacks ----------------------------------------------------------------- */

/* res bytes were read into the buffer (or EOF, or -errno). */
static void conn_got(struct gw_conn *c, int res)
{
    char detail[64];

    if (res == 0) {
        conn_reject(c, GW_REJ_EOF, NULL);
        return;
    }
    if (res < 0) {
        snprintf(detail, sizeof(detail), "%s", strerrorname_np(-res) ? strerrorname_np(-res) : "?");
        conn_reject(c, GW_REJ_READ_ERROR, detail);
        return;
    }
    c->len += (size_t)res;
    conn_step(c);
}

static void on_read(struct eng_op *op, int res)
{
    struct gw_conn *c = caa_container_of(op, struct gw_conn, rd);

    c->rd_busy = false;
    if (c->closing) {
        conn_maybe_free(c);
        return;
    }
    conn_got(c, res);
}

/* The client speaks first on every listener, and by the time its
 * connection is accepted its first bytes (a ClientHello, a token) have
 * usually arrived: read them now and route in this turn, instead of
 * arming a recv that would complete at once one turn later (each turn on
 * the open path delays the NEW frame by a whole batch of work). */
static void conn_first_read(struct gw_conn *c)
{
    size_t cap = stage_cap(c);
    int res = eng_try_recv(c->sh->eng, c->fd, c->buf, cap < c->cap ? cap : c->cap);

    if (res == -EAGAIN)
        conn_read(c);
    else
        conn_got(c, res);
}

static void on_sent(struct eng_op *op, int res)
{
    struct gw_conn *c = caa_container_of(op, struct gw_conn, wr);
    char detail[64];

    c->wr_busy = false;
    if (c->closing) {
        conn_maybe_free(c);
        return;
    }
    if (res < 0) {
        snprintf(detail, sizeof(detail), "%s", strerrorname_np(-res) ? strerrorname_np(-res) : "?");
        conn_reject(c, GW_REJ_SEND_ERROR, detail);
        return;
    }
    if (c->st == GW_ST_READY)
        conn_step(c);
}

/* The token stage's deadline with token bytes buffered. step_token kept
 * them after a Fernet-layer failure because more bytes might complete the
 * token (2.7); no more will come now, so judge what is there. A failure
 * that more bytes could have cured (missing base64 padding, a decoded
 * length no token has: bad_base64 / bad_length, every byte having passed
 * b64_url_prefix_ok) is a token cut short: a timeout. Anything else
 * (bad_mac: a whole token under a key we do not have; bad_padding) is
 * what the token is: rejected and counted under its own name. Returns
 * true when it rejected c. */
static bool token_deadline_verdict(struct gw_conn *c)
{
    struct gw_shard *sh = c->sh;
    const struct gw_keys *k = rcu_dereference(sh->gw->keys);
    struct claims cl;
    enum token_err e;

    e = token_verify(k->ks.v, k->ks.n, (const char *)c->buf + c->off, c->len - c->off,
                     now_real(), &cl, NULL);
    if (e == TOKEN_OK) {
        /* Verifies only now (the keys were reloaded since the last read):
         * the deadline has passed all the same. */
        claims_fini(&cl);
        return false;
    }
    if (e == TOKEN_BAD_BASE64 || e == TOKEN_BAD_LENGTH || (unsigned)e >= TOKEN_ERR_COUNT)
        return false;
    sh->ctr.token[e]++;
    conn_reject(c, GW_REJ_TOKEN, token_strerror(e));
    return true;
}

static void on_deadline(struct timer *t)
{
    struct gw_conn *c = caa_container_of(t, struct gw_conn, deadline);
    const char *detail = NULL;

    if (c->st == GW_ST_TOKEN && c->len > c->off) {
        if (token_deadline_verdict(c))
            return;
        detail = "incomplete_token";
    }
    if (c->st < GW_ST_COUNT)
        c->sh->ctr.timeout[c->st]++;
    conn_reject(c, GW_REJ_TIMEOUT, detail);
}

/* ---- accept -------------------------------------------------------------------- */

void gw_conn_start(struct gw_shard *sh, enum gw_listen_kind kind, int fd,
                   const struct net_addr *peer)
{
    struct gw *g = sh->gw;
    const struct gw_cfg *cfg = g->cfg;
    struct gw_conn *c;
    bool pp = cfg->proxy_protocol && kind != GW_L_PEER;

    sh->ctr.accepted++;
    c = calloc(1, sizeof(*c));
    if (c == NULL || (c->buf = malloc(CONN_BUF_INIT)) == NULL) {
        free(c);
        sh->ctr.rej[GW_REJ_NOMEM]++;
        eng_close(sh->eng, fd);
        return;
    }
    c->sh = sh;
    c->kind = kind;
    c->fd = fd;
    c->cap = CONN_BUF_INIT;
    c->peer = *peer;
    c->caller = *peer;
    eng_op_init(&c->rd, on_read);
    eng_op_init(&c->wr, on_sent);
    timer_init(&c->deadline, on_deadline);
    cds_list_add_tail(&c->link, &sh->conns);
    sh->nconns++;
    if (pp)
        c->st = GW_ST_PROXY;
    else if (kind == GW_L_PEER)
        c->st = GW_ST_TOKEN;
    else
        c->st = kind == GW_L_SNI ? GW_ST_SNI : GW_ST_CLASSIFY;
    metrics_inc_label(g->metrics, sh->idx, METRIC_ACCEPTED,
                      kind == GW_L_SNI    ? METRICS_LISTENER_SNI
                      : kind == GW_L_PEER ? METRICS_LISTENER_PEER
                                          : METRICS_LISTENER_SINGLE, 1);
    if (sh->draining) {
        conn_reject(c, GW_REJ_STOPPING, NULL);
        return;
    }
    if (cfg->max_handshakes > 0) {
        c->counted = true;
        if (atomic_fetch_add(&g->handshakes, 1) >= cfg->max_handshakes) {
            conn_reject(c, GW_REJ_HS_LIMIT, NULL);
            return;
        }
    }
    if (!pp && ip_acquire(c) != 0) {
        conn_reject(c, GW_REJ_IP_LIMIT, NULL);
        return;
    }
    eng_timer_add(sh->eng, &c->deadline, cfg->handshake_ms);
    conn_first_read(c);
}
