/* core/client.c - see client.h for the state machine.
 *
 * Invariants:
 * - At most one handshake op in flight (cl->busy): the connect, the token
 *   send, the challenge recv or the answer send; the deadline timer is
 *   armed while it is. A deadline cancels it and its callback fails the
 *   attempt (callbacks do all cleanup, never the timer).
 * - cl->fd, cl->seal, cl->open belong to the client until mux_new()
 *   succeeds, then to the mux (and cl->mux is set until on_dead).
 * - One timer serves the backoff and the handshake deadlines: the state
 *   says which.
 */
#include "core/client.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include <urcu/compiler.h>

#include "core/challenge.h"
#include "core/client_chan.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/mux.h"
#include "crypto/rand.h"
#include "io/admin.h"
#include "io/sock.h"

enum cl_state {
    ST_IDLE = 0,
    ST_BACKOFF,     /* timer: next attempt */
    ST_CONNECT,     /* wr: connect */
    ST_TOKEN,       /* wr: token */
    ST_CHALLENGE,   /* rd: challenge */
    ST_ANSWER,      /* wr: answer */
    ST_WAIT_PONG,   /* mux up, first pong awaited (timer) */
    ST_UP,          /* mux up, proven */
    ST_STOPPED,
};

struct client {
    struct client_cfg cfg;
    struct eng *eng;
    struct metrics *metrics;
    struct client_chan_set chans;
    struct client_chan_ep gw;
    struct tokensrc_mat mat;          /* material of the current attempt */
    enum cl_state state;
    int fd;
    size_t ai;                        /* gateway address being tried */
    int last_err;
    struct eng_op rd, wr, *busy;
    bool timed_out;
    struct timer timer;
    struct tc_stream *seal, *open;
    uint8_t chal[CHALLENGE_WIRE_MAX], answer[CHALLENGE_WIRE_MAX];
    size_t chal_have, chal_len;
    struct iovec iov;
    struct mux *mux;
    uint64_t t_start;                 /* eng_now() when the attempt began */
    unsigned failures;                /* since the last proven tunnel */
    bool stopping;
    int sigfd;
    struct eng_op sigop;
    struct signalfd_siginfo si;
    struct client_stats st;
    struct admin *admin;
    struct timer fold_timer;          /* mux counters -> metrics, every second */
    struct mux_stats folded;          /* of cl->mux, as last added */
};

#define FOLD_MS 1000

/* ---- small helpers ------------------------------------------------------- */

uint64_t client_backoff_ms(unsigned failures, uint64_t min_ms, uint64_t max_ms, uint64_t rnd)
{
    uint64_t cap = max_ms;

    if (min_ms > max_ms)
        min_ms = max_ms;
    if (failures < 32 && (min_ms << failures) < max_ms)
        cap = min_ms << failures;
    return cap == UINT64_MAX ? rnd : rnd % (cap + 1);
}

static const char *state_name(enum cl_state s)
{
    switch (s) {
    case ST_CONNECT: return "connect";
    case ST_TOKEN: return "token";
    case ST_CHALLENGE: return "challenge";
    case ST_ANSWER: return "answer";
    case ST_WAIT_PONG: return "pong";
    default: return "idle";
    }
}

/* mux_reason -> tunnel_closes_total label (core/metrics.h). */
static void free_streams(struct client *cl)
{
    tc_free(cl->seal);
    tc_free(cl->open);
    cl->seal = cl->open = NULL;
}

/* Stop the loop once nothing is left that would call back into us. */
static void finish(struct client *cl)
{
    if (cl->mux != NULL || cl->busy != NULL || cl->chans.npending > 0)
        return;
    eng_timer_del(cl->eng, &cl->timer);
    eng_timer_del(cl->eng, &cl->fold_timer);
    cl->state = ST_STOPPED;
    eng_stop(cl->eng);
}

static void chans_idle(void *ctx)
{
    struct client *cl = ctx;

    if (cl->stopping)
        finish(cl);
}

static void schedule_backoff(struct client *cl)
{
    uint64_t rnd = 0, ms;

    if (rand_bytes(&rnd, sizeof(rnd)) != 0)
        rnd = (uint64_t)timer_clock_ms() * 2654435761u;   /* jitter only */
    ms = client_backoff_ms(cl->failures, cl->cfg.backoff_min_ms, cl->cfg.backoff_max_ms, rnd);
    if (cl->failures < 64)
        cl->failures++;
    cl->state = ST_BACKOFF;
    log_msg(LOG_INFO, "backoff", "seconds", LOG_PRINTF("%.3f", (double)ms / 1000.0),
            "failures", LOG_U64(cl->failures), NULL);
    eng_timer_add(cl->eng, &cl->timer, ms);
}

/* The attempt failed before the mux took over: no op is in flight. */
static void hs_fail(struct client *cl, const char *reason, int err)
{
    eng_timer_del(cl->eng, &cl->timer);
    if (cl->fd >= 0)
        eng_close(cl->eng, cl->fd);
    cl->fd = -1;
    free_streams(cl);
    log_msg(LOG_WARN, "disconnected", "reason", cl->stopping ? "shutdown" : reason,
            "error", err != 0 ? strerror(err) : NULL, "state", state_name(cl->state),
            "server", cl->gw.text, NULL);
    if (cl->stopping) {
        finish(cl);
        return;
    }
    schedule_backoff(cl);
}

static void arm_deadline(struct client *cl)
{
    cl->timed_out = false;
    eng_timer_add(cl->eng, &cl->timer, cl->cfg.connect_timeout_ms);
}

/* ---- the mux ------------------------------------------------------------- */

static void hk_new(void *ctx, struct mux_chan *c, const struct net_addr *caller)
{
    struct client *cl = ctx;

    client_chan_on_new(&cl->chans, c, caller);
}

static void hk_pending(void *ctx, struct mux_chan *c)
{
    struct client *cl = ctx;

    client_chan_on_pending_data(&cl->chans, c);
}

static void hk_closed(void *ctx, struct mux_chan *c, enum mux_reason why)
{
    struct client *cl = ctx;

    client_chan_on_closed(&cl->chans, c, why);
}

static void hk_pong(void *ctx, struct mux *m)
{
    struct client *cl = ctx;
    char ab[ADDR_STRLEN];

    (void)m;
    if (cl->state != ST_WAIT_PONG)
        return;
    eng_timer_del(cl->eng, &cl->timer);
    cl->state = ST_UP;
    cl->failures = 0;
    cl->st.connected++;
    metrics_gauge_set(cl->metrics, 0, METRIC_CLIENT_CONNECTED, 0, 1);
    log_msg(LOG_INFO, "connected", "server", cl->gw.text,
            "addr", addr_format(&cl->gw.addrs[cl->ai], ab, sizeof(ab)),
            "hostname", cl->mat.hostname != NULL ? cl->mat.hostname : "-",
            "protocol", LOG_U64(cl->mat.version), "cipher", tc_kind_name(cl->mat.cipher),
            "ms", LOG_U64(eng_now(cl->eng) - cl->t_start), NULL);
}

/* Add what the mux counted since the last fold (it keeps plain totals per
 * tunnel; the metrics must move while the tunnel lives). */
static void fold(struct client *cl, const struct mux_stats *s)
{
    struct metrics *mt = cl->metrics;
    struct mux_stats *f = &cl->folded;

    metrics_inc_label(mt, 0, METRIC_CLIENT_BYTES, METRICS_TUNNEL_TO_ENDPOINT,
                      s->bytes_to_local - f->bytes_to_local);
    metrics_inc_label(mt, 0, METRIC_CLIENT_BYTES, METRICS_ENDPOINT_TO_TUNNEL,
                      s->bytes_from_local - f->bytes_from_local);
    metrics_add_mux(mt, 0, s, f);
    *f = *s;
}

static void fold_cb(struct timer *t)
{
    struct client *cl = caa_container_of(t, struct client, fold_timer);

    if (cl->mux != NULL)
        fold(cl, mux_stats(cl->mux));
    eng_timer_add(cl->eng, &cl->fold_timer, FOLD_MS);
}

static void account(struct client *cl, const struct mux *m, enum mux_reason why)
{
    metrics_inc_reason(cl->metrics, 0, METRIC_TUNNEL_CLOSES, metrics_tunnel_close_label(why), 1);
    fold(cl, mux_stats(m));
    metrics_gauge_set(cl->metrics, 0, METRIC_CLIENT_CONNECTED, 0, 0);
}

static void hk_dead(void *ctx, struct mux *m, enum mux_reason why)
{
    struct client *cl = ctx;
    bool was_up = cl->state == ST_UP;

    eng_timer_del(cl->eng, &cl->timer);
    client_chan_tunnel_down(&cl->chans);
    account(cl, m, why);
    cl->mux = NULL;
    log_msg(was_up ? LOG_INFO : LOG_WARN, "disconnected", "reason", mux_reason_name(why),
            "state", was_up ? "up" : "pong", "server", cl->gw.text,
            "uptime_s", LOG_U64((eng_now(cl->eng) - cl->t_start) / 1000),
            "channels", LOG_U64(mux_stats(m)->chan_opened), NULL);
    if (cl->stopping) {
        finish(cl);
        return;
    }
    schedule_backoff(cl);
}

static void start_mux(struct client *cl)
{
    struct mux_cfg mc;
    struct mux_hooks hooks = {
        .ctx = cl, .on_new = hk_new, .on_pending_data = hk_pending,
        .on_chan_closed = hk_closed, .on_pong = hk_pong, .on_dead = hk_dead,
    };

    mux_cfg_defaults(&mc, TC_SIDE_CLIENT, cl->mat.version);
    mc.ping_ms = cl->cfg.ping_ms;
    mc.pong_ms = cl->cfg.pong_ms;
    if (cl->cfg.splice != 0)
        mc.splice = cl->cfg.splice;
    mc.batch = !cl->cfg.no_batch;
    if (cl->cfg.in_high > 0)
        mc.in_high = cl->cfg.in_high;
    if (cl->cfg.in_low > 0)
        mc.in_low = cl->cfg.in_low;
    if (cl->cfg.tunnel_idle_ms > 0)
        mc.tunnel_idle_ms = cl->cfg.tunnel_idle_ms;
    cl->mux = mux_new(cl->eng, cl->fd, &mc, &hooks, cl->seal, cl->open, NULL, 0);
    if (cl->mux == NULL) {
        hs_fail(cl, "out_of_memory", ENOMEM);
        return;
    }
    cl->fd = -1;               /* the mux owns them now */
    cl->seal = cl->open = NULL;
    memset(&cl->folded, 0, sizeof(cl->folded));
    cl->st.handshakes++;
    /* PROTOCOL.md 6.1: a PING right after the answer; "connected" only
     * when its PONG proves that the gateway took the token and answer. */
    mux_ping(cl->mux);
    cl->state = ST_WAIT_PONG;
    arm_deadline(cl);
}

/* ---- the handshake ------------------------------------------------------- */

static void connect_next(struct client *cl);

static void send_buf(struct client *cl, const void *p, size_t n)
{
    cl->iov = (struct iovec){ .iov_base = (void *)p, .iov_len = n };
    cl->busy = &cl->wr;
    eng_send(cl->eng, &cl->wr, cl->fd, &cl->iov, 1);
}

static void recv_challenge(struct client *cl)
{
    cl->busy = &cl->rd;
    eng_recv(cl->eng, &cl->rd, cl->fd, cl->chal + cl->chal_have, cl->chal_len - cl->chal_have);
}

static void on_connected(struct client *cl)
{
    /* From here the gateway may seal with this key (its challenge uses
     * GCM counter 0): the key is spent even if we fail later (3.3). */
    tokensrc_mark_used(cl->cfg.tokens, &cl->mat);
    cl->state = ST_TOKEN;
    arm_deadline(cl);
    /* 2.7: the token in one write, then nothing until the challenge. */
    send_buf(cl, cl->mat.token, cl->mat.token_len);
}

static void wr_cb(struct eng_op *op, int res)
{
    struct client *cl = caa_container_of(op, struct client, wr);
    int err = cl->timed_out ? ETIMEDOUT : res < 0 ? -res : 0;

    cl->busy = NULL;
    if (cl->stopping) {
        hs_fail(cl, "shutdown", 0);
        return;
    }
    switch (cl->state) {
    case ST_CONNECT:
        if (err == 0) {
            on_connected(cl);
            return;
        }
        eng_close(cl->eng, cl->fd);
        cl->fd = -1;
        cl->last_err = err;
        cl->ai++;
        connect_next(cl);
        return;
    case ST_TOKEN:
        if (err != 0) {
            hs_fail(cl, cl->timed_out ? "token_timeout" : "token_write", err);
            return;
        }
        cl->state = ST_CHALLENGE;
        cl->chal_have = 0;
        cl->chal_len = challenge_wire_len(cl->open);
        arm_deadline(cl);
        recv_challenge(cl);
        return;
    case ST_ANSWER:
        if (err != 0) {
            hs_fail(cl, cl->timed_out ? "answer_timeout" : "answer_write", err);
            return;
        }
        eng_timer_del(cl->eng, &cl->timer);
        start_mux(cl);
        return;
    default:
        abort();   /* no write op in other states */
    }
}

static void rd_cb(struct eng_op *op, int res)
{
    struct client *cl = caa_container_of(op, struct client, rd);

    cl->busy = NULL;
    if (cl->stopping || cl->timed_out || res <= 0) {
        /* EOF before the challenge: the gateway refused the token (or
         * its claims), the only answer a refusal gets (2.5). */
        hs_fail(cl, cl->timed_out ? "challenge_timeout"
                    : res == 0 ? "closed_before_challenge" : "challenge_read",
                cl->timed_out ? ETIMEDOUT : res < 0 ? -res : 0);
        return;
    }
    cl->chal_have += (size_t)res;
    if (cl->chal_have < cl->chal_len) {
        recv_challenge(cl);
        return;
    }
    if (challenge_answer(cl->open, cl->seal, cl->chal, cl->answer) != 0) {
        hs_fail(cl, "challenge_bad", 0);   /* AEAD tag: not our gateway/key */
        return;
    }
    cl->state = ST_ANSWER;
    arm_deadline(cl);
    send_buf(cl, cl->answer, challenge_wire_len(cl->seal));
}

static void connect_next(struct client *cl)
{
    struct sock_opts o = { .nodelay = true };

    for (; cl->ai < cl->gw.naddrs; cl->ai++) {
        int fd = sock_stream(cl->gw.addrs[cl->ai].family, &o);
        if (fd < 0) {
            cl->last_err = -fd;
            continue;
        }
        cl->fd = fd;
        cl->state = ST_CONNECT;
        arm_deadline(cl);
        cl->busy = &cl->wr;
        eng_connect(cl->eng, &cl->wr, fd, &cl->gw.addrs[cl->ai]);
        return;
    }
    cl->state = ST_CONNECT;
    cl->ai = 0;
    hs_fail(cl, cl->last_err == ETIMEDOUT ? "connect_timeout" : "connect_failed", cl->last_err);
}

/* ---- one attempt --------------------------------------------------------- */

static void token_warnings(struct client *cl)
{
    struct tokensrc_mat *m = &cl->mat;

    if (m->cipher_unknown)
        log_msg(LOG_WARN, "unknown cipher in the token JSON; running aes-cbc as the gateway does",
                NULL);
    if (m->token_len > TOKENSRC_TOKEN_WARN)
        log_msg(LOG_WARN, "token longer than the gateway's single read",
                "bytes", LOG_U64(m->token_len), "limit", LOG_U64(TOKENSRC_TOKEN_WARN), NULL);
    if (m->valid > 0 && m->valid < (double)time(NULL))
        log_msg(LOG_WARN, "token expired; the gateway will refuse it",
                "valid", LOG_I64((int64_t)m->valid), NULL);
}

/* Token material for this attempt. 0 to go on, -1 to back off, -2 to stop. */
static int fetch_token(struct client *cl)
{
    char err[512];
    int rc;

    tokensrc_mat_fini(&cl->mat);
    rc = tokensrc_fetch(cl->cfg.tokens, cl->sigfd, &cl->mat, err, sizeof(err));
    if (rc == -2)
        return -2;
    if (rc != 0) {
        cl->st.token_failures++;
        log_msg(LOG_WARN, "disconnected", "reason", "token", "error", err, NULL);
        return -1;
    }
    if (tokensrc_key_used(cl->cfg.tokens, &cl->mat)) {
        cl->st.token_failures++;
        log_msg(LOG_WARN, "disconnected", "reason", "gcm_key_used",
                "error", cl->cfg.tokens->kind == TOKENSRC_ARGS
                             ? "the aes-gcm key of --token was used already and cannot be "
                               "renewed; use --token-file or --token-command"
                             : "waiting for a fresh aes-gcm token: a key is never used twice",
                NULL);
        return -1;
    }
    token_warnings(cl);
    return 0;
}

static void attempt(struct client *cl)
{
    char err[256];
    const uint8_t *iv;
    int rc;

    cl->st.attempts++;
    cl->t_start = eng_now(cl->eng);
    if (cl->st.attempts > 1)
        metrics_inc(cl->metrics, 0, METRIC_CLIENT_RECONNECTS, 1);
    log_msg(LOG_INFO, "connecting", "server", cl->gw.text,
            "attempt", LOG_U64(cl->st.attempts), NULL);
    if ((rc = fetch_token(cl)) == -2) {
        cl->stopping = true;     /* the signal is pending on sigfd */
        finish(cl);
        return;
    }
    if (rc != 0) {
        schedule_backoff(cl);
        return;
    }
    if (client_chan_ep_resolve(&cl->gw, err, sizeof(err)) != 0) {
        if (cl->gw.naddrs == 0) {
            log_msg(LOG_WARN, "disconnected", "reason", "resolve", "error", err,
                    "server", cl->gw.text, NULL);
            schedule_backoff(cl);
            return;
        }
        log_msg(LOG_WARN, "cannot resolve the gateway; using its previous addresses",
                "server", cl->gw.text, "error", err, NULL);
    }
    client_chan_resolve_all(&cl->chans);
    iv = cl->mat.iv_len == 16 ? cl->mat.iv : NULL;
    cl->seal = tc_new(cl->mat.cipher, TC_SEAL, TC_SIDE_CLIENT, cl->mat.key, cl->mat.key_len, iv);
    cl->open = tc_new(cl->mat.cipher, TC_OPEN, TC_SIDE_GATEWAY, cl->mat.key, cl->mat.key_len, iv);
    if (cl->seal == NULL || cl->open == NULL) {
        hs_fail(cl, "cipher", 0);
        return;
    }
    cl->ai = 0;
    cl->last_err = 0;
    connect_next(cl);
}

static void timer_cb(struct timer *t)
{
    struct client *cl = caa_container_of(t, struct client, timer);

    switch (cl->state) {
    case ST_BACKOFF:
        attempt(cl);
        return;
    case ST_CONNECT:
    case ST_TOKEN:
    case ST_CHALLENGE:
    case ST_ANSWER:
        cl->timed_out = true;
        if (cl->busy != NULL)
            eng_cancel(cl->busy);
        return;
    case ST_WAIT_PONG:
        mux_close(cl->mux, MUX_R_PONG_TIMEOUT);
        return;
    default:
        return;
    }
}

/* ---- signals ------------------------------------------------------------- */

static void sig_cb(struct eng_op *op, int res)
{
    struct client *cl = caa_container_of(op, struct client, sigop);

    if (res < 0 && res != -ECANCELED) {
        log_msg(LOG_ERROR, "signalfd read failed", "error", strerror(-res), NULL);
        return;
    }
    if (res <= 0)
        return;
    if (cl->stopping) {
        log_msg(LOG_WARN, "second signal: stopping now", NULL);
        eng_stop(cl->eng);
        return;
    }
    cl->stopping = true;
    log_msg(LOG_INFO, "stopping", "signal", strsignal((int)cl->si.ssi_signo), NULL);
    eng_read(cl->eng, &cl->sigop, cl->sigfd, &cl->si, sizeof(cl->si));
    switch (cl->state) {
    case ST_BACKOFF:
    case ST_IDLE:
        finish(cl);
        return;
    case ST_WAIT_PONG:
    case ST_UP:
        mux_close(cl->mux, MUX_R_SHUTDOWN);
        return;
    default:
        if (cl->busy != NULL)
            eng_cancel(cl->busy);
        return;
    }
}

/* ---- lifetime ------------------------------------------------------------ */

struct client *client_new(const struct client_cfg *cfg, char *err, size_t errlen)
{
    struct client *cl = calloc(1, sizeof(*cl));
    const char *why;

    if (cl == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    cl->cfg = *cfg;
    cl->fd = -1;
    cl->sigfd = -1;
    client_chan_set_init(&cl->chans);
    if (client_chan_ep_parse(&cl->gw, cfg->server, &why) != 0) {
        snprintf(err, errlen, "--server %s: %s", cfg->server, why);
        goto fail;
    }
    if (client_chan_ep_parse(&cl->chans.endpoint, cfg->endpoint, &why) != 0) {
        snprintf(err, errlen, "--endpoint %s: %s", cfg->endpoint, why);
        goto fail;
    }
    for (size_t i = 0; i < cfg->nroutes; i++) {
        if (client_chan_route_add(&cl->chans, cfg->routes[i], &why) != 0) {
            snprintf(err, errlen, "--route %s: %s", cfg->routes[i], why);
            goto fail;
        }
    }
    cl->cfg.routes = NULL;    /* copied into chans */
    cl->chans.acl = cfg->acl;
    cl->chans.pp = cfg->endpoint_pp;
    cl->chans.timeout_ms = cfg->endpoint_timeout_ms;
    cl->chans.on_idle = chans_idle;
    cl->chans.ctx = cl;
    /* slot 0: the loop thread; slot 1: the admin listener's thread */
    if ((cl->metrics = metrics_new(2, METRICS_CLIENT)) == NULL) {
        snprintf(err, errlen, "out of memory");
        goto fail;
    }
    cl->chans.metrics = cl->metrics;
    eng_op_init(&cl->rd, rd_cb);
    eng_op_init(&cl->wr, wr_cb);
    eng_op_init(&cl->sigop, sig_cb);
    timer_init(&cl->timer, timer_cb);
    timer_init(&cl->fold_timer, fold_cb);
    return cl;
fail:
    client_free(cl);
    return NULL;
}

static int setup_signals(struct client *cl, sigset_t *old)
{
    sigset_t set;

    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &set, old) != 0)
        return -1;
    cl->sigfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    return cl->sigfd < 0 ? -1 : 0;
}

/* Admin callbacks: on libmicrohttpd's thread; metrics are safe to read
 * from any thread. */
static int admin_render(void *ctx, char **out, size_t *len)
{
    return metrics_render(ctx, out, len);
}

static bool admin_ready(void *ctx)
{
    return metrics_value(ctx, METRIC_CLIENT_CONNECTED, 0) == 1;
}

/* On libmicrohttpd's thread: the admin's own metrics slot (1). */
static void admin_dropped(void *ctx, enum admin_drop why)
{
    metrics_inc_reason(ctx, 1, METRIC_ADMIN_DROPS, why == ADMIN_DROP_LIMIT ? "limit" : "deadline",
                       1);
}

static int admin_up(struct client *cl)
{
    struct admin_cb cb = { .render = admin_render, .ready = admin_ready,
                           .dropped = admin_dropped, .ctx = cl->metrics };
    char err[256];

    if (cl->cfg.admin == NULL)
        return 0;
    cl->admin = admin_start(cl->cfg.admin, &cb, err, sizeof(err));
    if (cl->admin == NULL) {
        log_msg(LOG_ERROR, "admin listener failed", "error", err, NULL);
        return -1;
    }
    return 0;
}

static const char *source_name(const struct tokensrc *ts)
{
    switch (ts->kind) {
    case TOKENSRC_ARGS: return "args";
    case TOKENSRC_FILE: return "file";
    case TOKENSRC_COMMAND: return "command";
    default: return "?";
    }
}

/* The one start-up line: the configuration, never the token, its key or
 * the token command (it may carry credentials). */
static void log_start(struct client *cl)
{
    const struct client_cfg *c = &cl->cfg;
    const struct tokensrc_over *ov = &c->tokens->over;
    char admin[ADDR_STRLEN + 8] = "off", a[ADDR_STRLEN];

    if (cl->admin != NULL)
        snprintf(admin, sizeof(admin), "%s:%u", addr_ntop(c->admin, a, sizeof(a)),
                 admin_port(cl->admin));
    log_msg(LOG_INFO, "snitun client starting", "version", SNITUN_VERSION,
            "engine", eng_name(cl->eng), "server", cl->gw.text,
            "endpoint", cl->chans.endpoint.text, "routes", LOG_U64(cl->chans.nroutes),
            "token_source", source_name(c->tokens),
            "token_file", c->tokens->kind == TOKENSRC_FILE ? c->tokens->path : "-",
            "protocol", ov->has_version ? LOG_U64(ov->version) : "token",
            "cipher", ov->has_cipher ? tc_kind_name(ov->cipher) : "token",
            "acl", c->acl != NULL ? "on" : "off",
            "endpoint_proxy_protocol", c->endpoint_pp == 0 ? "none"
                                       : c->endpoint_pp == 1 ? "v1" : "v2",
            "connect_timeout", LOG_U64(c->connect_timeout_ms / 1000),
            "endpoint_timeout", LOG_U64(c->endpoint_timeout_ms / 1000),
            "backoff_min", LOG_U64(c->backoff_min_ms / 1000),
            "backoff_max", LOG_U64(c->backoff_max_ms / 1000),
            "ping_interval", LOG_U64(c->ping_ms / 1000),
            "pong_timeout", LOG_U64(c->pong_ms / 1000), "admin", admin, NULL);
}

/* After the last hook: let every op still in flight call back (io_uring
 * reports cancelled ops a turn later, and the mux frees itself only then),
 * at most 2 s, so that nothing is abandoned with the engine. */
static void drain(struct client *cl)
{
    const struct eng_stats *st = eng_stats(cl->eng);
    uint64_t end = timer_clock_ms() + 2000;

    eng_cancel(&cl->sigop);
    while (st->submitted > st->completed && timer_clock_ms() < end)
        if (eng_run_once(cl->eng, 50) < 0)
            return;
}

int client_run(struct client *cl)
{
    char err[256];
    sigset_t old;
    int rc;

    signal(SIGPIPE, SIG_IGN);
    cl->eng = eng_new(cl->cfg.io, err, sizeof(err));
    if (cl->eng == NULL) {
        log_msg(LOG_ERROR, "cannot start the I/O engine", "error", err, NULL);
        return 1;
    }
    if (setup_signals(cl, &old) != 0) {
        log_msg(LOG_ERROR, "cannot set up signal handling", "error", strerror(errno), NULL);
        return 1;
    }
    if (admin_up(cl) != 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        return 1;
    }
    cl->chans.eng = cl->eng;
    metrics_gauge_set(cl->metrics, 0, METRIC_ENGINE_INFO,
                      eng_kind(cl->eng) == ENG_URING ? METRICS_ENGINE_URING
                                                     : METRICS_ENGINE_EPOLL, 1);
    metrics_gauge_set(cl->metrics, 0, METRIC_SHARDS, 0, 1);
    log_start(cl);
    client_chan_resolve_all(&cl->chans);
    eng_timer_add(cl->eng, &cl->fold_timer, FOLD_MS);
    eng_read(cl->eng, &cl->sigop, cl->sigfd, &cl->si, sizeof(cl->si));
    cl->state = ST_BACKOFF;
    eng_timer_add(cl->eng, &cl->timer, 0);
    rc = eng_run(cl->eng);
    if (rc == 0)
        drain(cl);
    if (rc < 0)
        log_msg(LOG_ERROR, "I/O engine failed", "error", strerror(-rc), NULL);
    else
        log_msg(LOG_INFO, "stopped", "attempts", LOG_U64(cl->st.attempts),
                "connected", LOG_U64(cl->st.connected), NULL);
    admin_stop(cl->admin);
    cl->admin = NULL;
    eng_free(cl->eng);
    cl->eng = NULL;
    close(cl->sigfd);
    cl->sigfd = -1;
    sigprocmask(SIG_SETMASK, &old, NULL);
    return rc < 0 ? 1 : 0;
}

void client_free(struct client *cl)
{
    if (cl == NULL)
        return;
    /* Only after client_run (the engine is gone) or before it. A mux
     * left by a forced stop was abandoned with the engine. */
    if (cl->fd >= 0)
        close(cl->fd);
    free_streams(cl);
    client_chan_set_fini(&cl->chans);
    tokensrc_mat_fini(&cl->mat);
    metrics_free(cl->metrics);
    free(cl);
}

const struct client_stats *client_stats(const struct client *cl)
{
    return &cl->st;
}
