/* core/gw.c - the gateway runtime: configuration, shards, listeners,
 * signals, stop, counters (see gw.h). The handshake of one connection is
 * gw_conn.c; tunnels, routing and cross-shard handoff are gw_tunnel.c.
 *
 * Threads:
 *   main     opens the listening sockets and the admin listener, drops
 *            privileges (--user), starts the shards, then waits for
 *            signals (sigwaitinfo): INT/TERM start the drain (below), HUP
 *            swaps the Fernet key list (RCU), USR1 asks every shard to log
 *            its counters.
 *   shard i  registered QSBR reader; loop: quiescent state, one engine
 *            turn of at most GW_TURN_MS (so grace periods end even when
 *            the shard is idle).
 *
 * Messages between threads (io/mbox.h), all owned by the receiver:
 *   handoff, replace (gw_tunnel.c); stats (malloc'd by main); drain, stop
 *   (embedded in the shard, each posted at most once, by main).
 *
 * Drain and stop, per shard:
 *
 *   serving --drain msg--> DRAINING --no listener, handshake or channel
 *      |                      |       left (gw_shard_check_drained)--+
 *      |                      +--stop msg (deadline, 2nd signal)-----+
 *      +--stop msg (engine failure)----------------------------------+
 *                                                                    v
 *   STOPPING: tunnels closed (MUX_R_SHUTDOWN) --nothing left, or GW_STOP_MS--> loop ends
 *
 *   DRAINING: listeners cancelled and closed (the kernel refuses new
 *   connections), handshakes aborted, handoffs refused; tunnels and their
 *   open channels go on. main holds the deadline (--drain-timeout): it
 *   polls every DRAIN_POLL_MS until every shard loop has ended, posting
 *   "stop" at the deadline or on a second SIGINT/SIGTERM.
 * The shards then meet (after that nobody posts any more), free their
 * engine and drain their mailbox (fds in late handoffs are closed).
 */
#include "core/gw_impl.h"

#include <errno.h>
#include <grp.h>
#include <pwd.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "io/sock.h"

#define GW_TURN_MS 1000
#define GW_STOP_MS 10000      /* stopping: longest wait for the muxes to go */
#define GW_FOLD_MS 1000       /* mux counters -> metrics */
#define GW_LINGER_MS 200      /* drained: the last CLOSE frames leave first */
#define GW_SETTLE_MS 1000     /* stopped: longest wait for the muxes' frees */
#define GW_SETTLE_POLL_MS 20
#define DRAIN_POLL_MS 50      /* main: how often it looks at the shards */

/* ---- names ------------------------------------------------------------------ */

static const char *const rej_names[GW_REJ_COUNT] = {
    [GW_REJ_NONE] = "none",
    [GW_REJ_HS_LIMIT] = "handshake_limit",
    [GW_REJ_IP_LIMIT] = "ip_limit",
    [GW_REJ_TIMEOUT] = "timeout",
    [GW_REJ_EOF] = "eof",
    [GW_REJ_READ_ERROR] = "read_error",
    [GW_REJ_SEND_ERROR] = "send_error",
    [GW_REJ_GARBAGE] = "not_tls_or_token",
    [GW_REJ_PROXY] = "proxy_header",
    [GW_REJ_SNI] = "bad_hello",
    [GW_REJ_UNKNOWN_NAME] = "unknown_name",
    [GW_REJ_TOKEN] = "bad_token",
    [GW_REJ_TOKEN_TOO_LONG] = "token_too_long",
    [GW_REJ_CHALLENGE] = "bad_answer",
    [GW_REJ_NOMEM] = "no_memory",
    [GW_REJ_STOPPING] = "stopping",
    [GW_REJ_GCM_REUSED] = "gcm_key_reused",
};

static const char *const stage_names[GW_ST_COUNT] = {
    [GW_ST_PROXY] = "proxy",
    [GW_ST_CLASSIFY] = "classify",
    [GW_ST_SNI] = "sni",
    [GW_ST_TOKEN] = "token",
    [GW_ST_ANSWER] = "challenge",
    [GW_ST_READY] = "ready",
};

const char *gw_rej_name(enum gw_rej r)
{
    return (unsigned)r < GW_REJ_COUNT && rej_names[r] ? rej_names[r] : "unknown";
}

const char *gw_stage_name(enum gw_stage st)
{
    return (unsigned)st < GW_ST_COUNT && stage_names[st] ? stage_names[st] : "unknown";
}

static const char *kind_name(enum gw_listen_kind kind)
{
    return kind == GW_L_SNI ? "sni" : kind == GW_L_PEER ? "peer" : "single";
}

static const char *listen_flag(enum gw_listen_kind kind)
{
    return kind == GW_L_SNI ? "--sni-listen" : kind == GW_L_PEER ? "--peer-listen" : "--listen";
}

/* ---- configuration and keys ------------------------------------------------ */

void gw_cfg_defaults(struct gw_cfg *cfg)
{
    *cfg = (struct gw_cfg){
        .threads = 1,
        .io = ENG_AUTO,
        .max_handshakes = 10000,
        .max_handshakes_per_ip = 64,
        .max_channels = 10000,
        .max_frame = FRAME_MAX_DATA,
        .tunnel_queue = MUX_TUNNEL_IN_LIMIT,
        .handshake_ms = 10000,
        .challenge_ms = 10000,
        .tunnel_idle_ms = 120000,
        .chan_idle_ms = 120000,
        .log_rate = 100,
        .drain_ms = 30000,
        .steer = true,
    };
}

/* The key list from the flags (in order), then the file: the parsing code
 * `snitun token` uses too (token_keys_add / token_keys_load). *usage tells
 * a configuration mistake from an unreadable file. */
static struct gw_keys *keys_build(const struct gw_cfg *cfg, char *err, size_t errlen,
                                  bool *usage)
{
    struct gw_keys *k = calloc(1, sizeof(*k));

    *usage = false;
    if (k == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    for (size_t i = 0; i < cfg->nkeys; i++) {
        if (token_keys_add(&k->ks, cfg->keys[i], strlen(cfg->keys[i])) != 0) {
            snprintf(err, errlen, "--fernet-key #%zu is not a Fernet key (need 44 characters "
                     "of URL-safe base64 encoding 32 bytes)", i + 1);
            *usage = true;
            goto fail;
        }
    }
    if (cfg->keys_file != NULL && token_keys_load(&k->ks, cfg->keys_file, err, errlen) != 0)
        goto fail;
    if (k->ks.n == 0) {
        snprintf(err, errlen, "no Fernet key: give --fernet-key or --fernet-keys-file");
        *usage = true;
        goto fail;
    }
    return k;
fail:
    token_keys_fini(&k->ks);
    free(k);
    return NULL;
}

static void keys_free(struct gw_keys *k)
{
    if (k == NULL)
        return;
    token_keys_fini(&k->ks);
    free(k);
}

static int check_cfg(const struct gw_cfg *cfg, char *err, size_t errlen)
{
    bool tls = false, tok = false;

    if (cfg->threads < 1 || cfg->threads > GW_THREADS_MAX) {
        snprintf(err, errlen, "--threads must be 1..%d, got %u", GW_THREADS_MAX, cfg->threads);
        return -1;
    }
    if (cfg->challenge_ms == 0 || cfg->challenge_ms > GW_CHALLENGE_MAX_S * 1000u) {
        snprintf(err, errlen, "--challenge-timeout must be 1..%d seconds", GW_CHALLENGE_MAX_S);
        return -1;
    }
    if (cfg->handshake_ms == 0) {
        snprintf(err, errlen, "--handshake-timeout must be at least 1 second");
        return -1;
    }
    if (cfg->max_frame < FRAME_MAX_DATA) {
        snprintf(err, errlen, "--max-frame must be at least %u (PROTOCOL.md 4.6)",
                 FRAME_MAX_DATA);
        return -1;
    }
    for (size_t i = 0; i < cfg->nlisten; i++) {
        tls |= cfg->listen[i].kind != GW_L_PEER;
        tok |= cfg->listen[i].kind != GW_L_SNI;
    }
    if (!tls || !tok) {
        snprintf(err, errlen, "%s",
                 cfg->nlisten == 0 ? "no listening address"
                 : !tls ? "--peer-listen needs --sni-listen (or --listen) for devices"
                        : "--sni-listen needs --peer-listen (or --listen) for tunnels");
        return -1;
    }
    return 0;
}

/* A wildcard IPv6 listener is dual-stack unless an IPv4 listener shares
 * its port (then both would claim the IPv4 side). */
static bool want_v6only(const struct gw_cfg *cfg, size_t i)
{
    for (size_t j = 0; j < cfg->nlisten; j++)
        if (cfg->listen[j].addr.family == AF_INET &&
            cfg->listen[j].addr.port == cfg->listen[i].addr.port)
            return true;
    return false;
}

/* One SO_REUSEPORT socket per shard and address, opened here so that an
 * address in use is reported before any thread starts. */
static int open_listeners(struct gw *g, char *err, size_t errlen)
{
    const struct gw_cfg *cfg = g->cfg;

    for (unsigned s = 0; s < g->nshards; s++) {
        for (size_t i = 0; i < cfg->nlisten; i++) {
            /* Both kinds of connection carry small interactive writes (a
             * frame header, a TLS handshake flight); Nagle would hold them
             * back for the peer's delayed ACK, 40 ms per channel open on
             * loopback. Accepted sockets inherit TCP_NODELAY from the
             * listener: one setsockopt here instead of one per accept. */
            struct sock_opts o = { .backlog = cfg->backlog, .reuseport = true,
                                   .v6only = want_v6only(cfg, i), .nodelay = true };
            char a[ADDR_STRLEN];
            int fd = sock_listen(&cfg->listen[i].addr, &o);

            if (fd < 0) {
                snprintf(err, errlen, "%s %s: cannot listen: %s",
                         listen_flag(cfg->listen[i].kind),
                         addr_format(&cfg->listen[i].addr, a, sizeof(a)), strerror(-fd));
                return -1;
            }
            g->shards[s].lsn[i].fd = fd;
        }
    }
    return 0;
}

static int shards_new(struct gw *g)
{
    const struct gw_cfg *cfg = g->cfg;

    g->shards = calloc(g->nshards, sizeof(*g->shards));
    if (g->shards == NULL)
        return -1;
    for (unsigned s = 0; s < g->nshards; s++) {
        struct gw_shard *sh = &g->shards[s];
        sh->gw = g;
        sh->idx = s;
        CDS_INIT_LIST_HEAD(&sh->conns);
        CDS_INIT_LIST_HEAD(&sh->tunnels);
        log_rl_init(&sh->rl, cfg->log_rate > 0 ? cfg->log_rate : ~0u);
        mux_group_init(&sh->mux_group);
        sh->lsn = calloc(cfg->nlisten, sizeof(*sh->lsn));
        if (sh->lsn == NULL)
            return -1;
        for (size_t i = 0; i < cfg->nlisten; i++)
            sh->lsn[i] = (struct gw_lsn){ .sh = sh, .fd = -1, .cfg = &cfg->listen[i] };
    }
    return 0;
}

/* --user: the ids to switch to, looked up now (before any thread, while
 * /etc/passwd is certainly readable). */
static int user_lookup(struct gw *g, char *err, size_t errlen)
{
    const struct passwd *pw;

    if (g->cfg->user == NULL)
        return 0;
    errno = 0;
    pw = getpwnam(g->cfg->user);
    if (pw == NULL) {
        snprintf(err, errlen, "--user %s: %s", g->cfg->user,
                 errno != 0 ? strerror(errno) : "no such user");
        return -1;
    }
    g->uid = pw->pw_uid;
    g->gid = pw->pw_gid;
    g->drop_priv = true;
    return 0;
}

struct gw *gw_new(const struct gw_cfg *cfg, char *err, size_t errlen, bool *usage)
{
    return gw_build(cfg, true, err, errlen, usage);
}

struct gw *gw_build(const struct gw_cfg *cfg, bool listen, char *err, size_t errlen,
                    bool *usage)
{
    struct gw *g;

    *usage = true;
    if (check_cfg(cfg, err, errlen) != 0)
        return NULL;
    *usage = false;
    g = calloc(1, sizeof(*g));
    if (g == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    g->cfg = cfg;
    g->nshards = cfg->threads;
    atomic_init(&g->next_tunnel, 1);
    atomic_init(&g->next_gen, 1);
    atomic_init(&g->handshakes, 0);
    atomic_init(&g->fatal, false);
    atomic_init(&g->start_failed, false);
    atomic_init(&g->ready, false);
    atomic_init(&g->shards_done, 0);
    gw_seen_init(&g->seen);
    g->main_slot = g->nshards;
    g->admin_slot = g->nshards + 1;
    if (user_lookup(g, err, errlen) != 0)
        goto fail;
    g->keys = keys_build(cfg, err, errlen, usage);
    if (g->keys == NULL)
        goto fail;
    g->tab = hosttab_new();
    g->metrics = metrics_new(g->nshards + 2, METRICS_SERVER);
    if (g->tab == NULL || g->metrics == NULL || shards_new(g) != 0) {
        snprintf(err, errlen, "out of memory (hostname table, metrics or shards)");
        goto fail;
    }
    if (listen && open_listeners(g, err, errlen) != 0)
        goto fail;
    return g;
fail:
    gw_free(g);
    return NULL;
}

void gw_free(struct gw *g)
{
    if (g == NULL)
        return;
    for (unsigned s = 0; g->shards != NULL && s < g->nshards; s++) {
        struct gw_shard *sh = &g->shards[s];
        for (size_t i = 0; sh->lsn != NULL && i < g->cfg->nlisten; i++)
            if (sh->lsn[i].fd >= 0)
                close(sh->lsn[i].fd);
        free(sh->lsn);
        mux_group_fini(&sh->mux_group);
        pthread_mutex_destroy(&sh->rl.lock);
    }
    free(g->shards);
    hosttab_free(g->tab);
    metrics_free(g->metrics);
    keys_free(g->keys);
    gw_seen_fini(&g->seen);
    free(g);
}

/* ---- counters --------------------------------------------------------------- */

static void ctr_add(struct gw_ctr *to, const struct gw_ctr *from)
{
    const uint64_t *f = (const uint64_t *)from;
    uint64_t *t = (uint64_t *)to;

    for (size_t i = 0; i < sizeof(*to) / sizeof(uint64_t); i++)
        t[i] += f[i];
}

_Static_assert(sizeof(struct gw_ctr) % sizeof(uint64_t) == 0, "gw_ctr holds uint64_t only");

struct kv {
    const char *k[160];
    char v[160][LOG_NUM_MAX];
    char names[160][48];
    size_t n;
};

static void kv_put(struct kv *kv, const char *prefix, const char *name, uint64_t v, bool always)
{
    if ((!always && v == 0) || kv->n >= sizeof(kv->k) / sizeof(kv->k[0]))
        return;
    snprintf(kv->names[kv->n], sizeof(kv->names[0]), "%s%s", prefix, name);
    kv->k[kv->n] = kv->names[kv->n];
    log_u64(kv->v[kv->n], v);
    kv->n++;
}

/* The fixed counters always, the per-cause ones when not zero. */
static void ctr_kv(const struct gw_ctr *c, struct kv *kv)
{
#define ALWAYS(f) kv_put(kv, "", #f, c->f, true)
    ALWAYS(accepted);
    ALWAYS(tunnels_opened);
    ALWAYS(tunnels_replaced);
    ALWAYS(channels_local);
    ALWAYS(handoffs_out);
    ALWAYS(handoffs_in);
    ALWAYS(handoffs_stale);
    ALWAYS(chan_refused);
    ALWAYS(alias_takeovers);
    ALWAYS(cipher_unknown);
    ALWAYS(accept_errors);
    ALWAYS(bytes_to_device);
    ALWAYS(bytes_from_device);
#undef ALWAYS
    for (int i = 1; i < GW_REJ_COUNT; i++)
        kv_put(kv, "rej_", gw_rej_name(i), c->rej[i], false);
    for (int i = 1; i < GW_ST_COUNT; i++)
        kv_put(kv, "timeout_", gw_stage_name(i), c->timeout[i], false);
    for (int i = 1; i < PP_R_COUNT; i++)
        kv_put(kv, "proxy_", pp_reason_name(i), c->pp[i], false);
    for (int i = 1; i < SNI_R_COUNT; i++)
        kv_put(kv, "sni_", sni_reason_name(i), c->sni[i], false);
    for (int i = 1; i < TOKEN_ERR_COUNT; i++)
        kv_put(kv, "token_", token_strerror(i), c->token[i], false);
    for (int i = 1; i < MUX_R_COUNT; i++)
        kv_put(kv, "tunnel_closed_", mux_reason_name(i), c->tunnels_closed[i], false);
    for (int i = 1; i < MUX_R_COUNT; i++)
        kv_put(kv, "chan_closed_", mux_reason_name(i), c->chan_closed[i], false);
}

/* One "stats" line: shard (or "all"), then key=value per counter. */
static void log_stats(const char *shard, const struct gw_ctr *c, size_t tunnels, size_t conns)
{
    struct kv *kv = calloc(1, sizeof(*kv));
    const char *a[2 * 160 + 1];
    size_t n = 0;

    if (kv == NULL)
        return;
    kv_put(kv, "", "tunnels", tunnels, true);
    kv_put(kv, "", "handshakes", conns, true);
    ctr_kv(c, kv);
    for (size_t i = 0; i < kv->n; i++) {
        a[n++] = kv->k[i];
        a[n++] = kv->v[i];
    }
    a[n] = NULL;
    /* log.h writes at most LOG_MAX_FIELDS pairs per line: split. */
    for (size_t i = 0; i < n; i += 2 * (LOG_MAX_FIELDS - 1)) {
        const char *p[2 * LOG_MAX_FIELDS + 1] = { NULL };
        size_t m = 0;
        p[m++] = "shard";
        p[m++] = shard;
        for (size_t j = i; j < n && m < 2 * LOG_MAX_FIELDS; j++)
            p[m++] = a[j];
        p[m] = NULL;
        log_msg(LOG_INFO, "stats", p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9],
                p[10], p[11], p[12], p[13], p[14], p[15], p[16], p[17], p[18], p[19], p[20],
                p[21], p[22], p[23], p[24], p[25], p[26], p[27], p[28], p[29], p[30], p[31],
                p[32], p[33], p[34], p[35], p[36], p[37], p[38], p[39], p[40], p[41], p[42],
                p[43], p[44], p[45], p[46], p[47], p[48], p[49], p[50], p[51], p[52], p[53],
                p[54], p[55], p[56], p[57], p[58], p[59], p[60], p[61], p[62], p[63], NULL);
    }
    free(kv);
}

_Static_assert(LOG_MAX_FIELDS == 32, "log_stats passes 64 values");

struct gw_stats_msg {
    struct mbox_msg msg;
    struct gw_shard *to;
};

static void on_stats_msg(struct mbox_msg *msg)
{
    struct gw_stats_msg *m = caa_container_of(msg, struct gw_stats_msg, msg);
    struct gw_shard *sh = m->to;

    if (!sh->finalizing)
        log_stats(LOG_U64(sh->idx), &sh->ctr, sh->ntunnels, sh->nconns);
    free(m);
}

/* ---- listeners ------------------------------------------------------------------ */

static void on_accept(struct eng_op *op, int res)
{
    struct gw_lsn *l = caa_container_of(op, struct gw_lsn, op);
    struct gw_shard *sh = l->sh;
    char a[ADDR_STRLEN];

    if (res >= 0) {
        /* TCP_NODELAY is inherited from the listener (open_listeners). */
        gw_conn_start(sh, l->cfg->kind, res, eng_accept_peer(op));
        return;
    }
    addr_format(&l->cfg->addr, a, sizeof(a));
    if (op->more) { /* EMFILE & co: the engine pauses the listener */
        sh->ctr.accept_errors++;
        metrics_inc_reason(sh->gw->metrics, sh->idx, METRIC_LIMIT_REJECTS,
                           res == -EMFILE || res == -ENFILE ? "fds" : "other", 1);
        log_ratelimited(&sh->rl, LOG_WARN, "accept failed, listener paused", "shard",
                        LOG_U64(sh->idx), "listen", a, "error", strerror(-res), NULL);
        return;
    }
    l->armed = false;
    if (!sh->draining)
        log_msg(LOG_ERROR, "listener failed", "shard", LOG_U64(sh->idx), "listen", a, "error",
                strerror(-res), NULL);
    eng_close(sh->eng, l->fd);
    l->fd = -1;
    sh->nlsn_open--;
    gw_shard_check_drained(sh);
}

static void listeners_start(struct gw_shard *sh)
{
    for (size_t i = 0; i < sh->gw->cfg->nlisten; i++) {
        struct gw_lsn *l = &sh->lsn[i];
        eng_op_init(&l->op, on_accept);
        l->armed = true;
        sh->nlsn_open++;
        eng_accept(sh->eng, &l->op, l->fd);
    }
}

/* ---- drain and stop -------------------------------------------------------------- */

static void on_stop_timeout(struct timer *t)
{
    struct gw_shard *sh = caa_container_of(t, struct gw_shard, stop_timer);

    log_msg(LOG_WARN, "stop forced with objects left", "shard", LOG_U64(sh->idx), "listeners",
            LOG_U64(sh->nlsn_open), "handshakes", LOG_U64(sh->nconns), "tunnels",
            LOG_U64(sh->ntunnels), "channels", LOG_U64(sh->nchans), NULL);
    eng_stop(sh->eng);
}

/* Listeners and handshakes go; what is routed already stays. */
static void shard_quiesce(struct gw_shard *sh)
{
    struct gw_conn *c, *cn;

    for (size_t i = 0; i < sh->gw->cfg->nlisten; i++)
        if (sh->lsn[i].armed)
            eng_cancel(&sh->lsn[i].op);
    cds_list_for_each_entry_safe(c, cn, &sh->conns, link)
        gw_conn_abort(c, GW_REJ_STOPPING);
}

static void shard_stop(struct gw_shard *sh)
{
    struct gw_tunnel *t, *tn;

    if (sh->stopping)
        return;
    sh->draining = sh->stopping = true;
    eng_timer_del(sh->eng, &sh->linger_timer);
    eng_timer_add(sh->eng, &sh->stop_timer, GW_STOP_MS);
    shard_quiesce(sh);
    cds_list_for_each_entry_safe(t, tn, &sh->tunnels, link)
        mux_close(t->mux, MUX_R_SHUTDOWN);
    gw_shard_check_drained(sh);
}

static void drained_cb(struct eng_defer *d)
{
    struct gw_shard *sh = caa_container_of(d, struct gw_shard, drain_d);

    if (sh->nlsn_open != 0 || sh->nconns != 0)
        return;
    if (!sh->stopping) {
        /* Every channel finished: the tunnels may go, once the frames of
         * this turn (the last CLOSE) are written: mux_close() cuts a send
         * still in flight. */
        if (sh->nchans == 0 && !timer_armed(&sh->linger_timer))
            eng_timer_add(sh->eng, &sh->linger_timer, GW_LINGER_MS);
        return;
    }
    if (sh->ntunnels == 0) {
        eng_timer_del(sh->eng, &sh->stop_timer);
        eng_stop(sh->eng);
    }
}

void gw_shard_check_drained(struct gw_shard *sh)
{
    /* At the end of the turn, after the frees this turn queued. */
    if (sh->draining)
        eng_defer(sh->eng, &sh->drain_d, drained_cb);
}

static void on_linger(struct timer *t)
{
    shard_stop(caa_container_of(t, struct gw_shard, linger_timer));
}

static void on_drain_msg(struct mbox_msg *msg)
{
    struct gw_shard *sh = caa_container_of(msg, struct gw_shard, drain_msg);

    if (sh->finalizing || sh->draining)
        return;
    sh->draining = true;
    log_msg(LOG_DEBUG, "shard draining", "shard", LOG_U64(sh->idx), "tunnels",
            LOG_U64(sh->ntunnels), "channels", LOG_U64(sh->nchans), NULL);
    shard_quiesce(sh);
    gw_shard_check_drained(sh);
}

static void on_stop_msg(struct mbox_msg *msg)
{
    struct gw_shard *sh = caa_container_of(msg, struct gw_shard, stop_msg);

    if (!sh->finalizing)
        shard_stop(sh);
}

static void on_fold(struct timer *t)
{
    struct gw_shard *sh = caa_container_of(t, struct gw_shard, fold_timer);

    gw_tunnel_fold_all(sh);
    if (sh->idx == 0)
        gw_steer_tick(sh->gw);
    eng_timer_add(sh->eng, &sh->fold_timer, GW_FOLD_MS);
}

/* ---- shard threads ------------------------------------------------------------- */

static void gate_arrive(struct gw *g, unsigned *counter)
{
    pthread_mutex_lock(&g->gate_mu);
    (*counter)++;
    pthread_cond_broadcast(&g->gate_cv);
    pthread_mutex_unlock(&g->gate_mu);
}

static void gate_wait(struct gw *g, const unsigned *counter, unsigned target)
{
    pthread_mutex_lock(&g->gate_mu);
    while (*counter < target)
        pthread_cond_wait(&g->gate_cv, &g->gate_mu);
    pthread_mutex_unlock(&g->gate_mu);
}

static void pin_cpu(struct gw_shard *sh)
{
    cpu_set_t allowed, one;
    int n = 0, want;

    if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0 || CPU_COUNT(&allowed) == 0)
        return;
    want = (int)(sh->idx % (unsigned)CPU_COUNT(&allowed));
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++) {
        if (!CPU_ISSET(cpu, &allowed) || n++ != want)
            continue;
        CPU_ZERO(&one);
        CPU_SET(cpu, &one);
        if (pthread_setaffinity_np(pthread_self(), sizeof(one), &one) != 0)
            log_msg(LOG_WARN, "cannot pin shard to its CPU", "shard", LOG_U64(sh->idx), "cpu",
                    LOG_U64(cpu), NULL);
        return;
    }
}

static void shard_init(struct gw_shard *sh)
{
    struct gw *g = sh->gw;
    char err[sizeof(sh->err) - 32];
    int rc;

    if (g->cfg->cpu_affinity)
        pin_cpu(sh);
    sh->eng = eng_new(g->cfg->io, err, sizeof(err));
    if (sh->eng == NULL) {
        snprintf(sh->err, sizeof(sh->err), "--io %s: %s",
                 g->cfg->io == ENG_URING ? "uring" : g->cfg->io == ENG_EPOLL ? "epoll" : "auto",
                 err);
        atomic_store(&g->start_failed, true);
        return;
    }
    rc = mbox_init(&sh->mbox, sh->eng);
    if (rc < 0) {
        snprintf(sh->err, sizeof(sh->err), "mailbox: %s", strerror(-rc));
        atomic_store(&g->start_failed, true);
        return;
    }
    sh->mbox_ok = true;
}

/* The muxes closed last free themselves once their cancelled ops have
 * called back, a turn or a few after on_dead (core/mux.h): run turns until
 * one passes with nothing to do, so that nothing is abandoned with the
 * engine (bounded: a stop forced by GW_STOP_MS may leave ops behind). */
static void shard_settle(struct gw_shard *sh)
{
    uint64_t end = timer_clock_ms() + GW_SETTLE_MS;

    eng_timer_del(sh->eng, &sh->fold_timer);
    eng_timer_del(sh->eng, &sh->stop_timer);
    eng_timer_del(sh->eng, &sh->linger_timer);
    while (timer_clock_ms() < end && eng_run_once(sh->eng, GW_SETTLE_POLL_MS) > 0)
        rcu_quiescent_state();
    gw_tunnel_fold_all(sh); /* what the last channels counted */
}

static void shard_loop(struct gw_shard *sh)
{
    listeners_start(sh);
    timer_init(&sh->stop_timer, on_stop_timeout);
    timer_init(&sh->linger_timer, on_linger);
    timer_init(&sh->fold_timer, on_fold);
    eng_timer_add(sh->eng, &sh->fold_timer, GW_FOLD_MS);
    while (!eng_stopped(sh->eng)) {
        int rc;

        rcu_quiescent_state();
        rc = eng_run_once(sh->eng, GW_TURN_MS);
        if (rc < 0) {
            log_msg(LOG_ERROR, "engine failed", "shard", LOG_U64(sh->idx), "error",
                    strerror(-rc), NULL);
            atomic_store(&sh->gw->fatal, true);
            pthread_kill(sh->gw->main_thread, SIGTERM);
            return;
        }
    }
    shard_settle(sh);
}

static void *shard_main(void *arg)
{
    struct gw_shard *sh = arg;
    struct gw *g = sh->gw;

    rcu_register_thread();
    shard_init(sh);
    /* Offline while blocked, so grace periods never wait for us. */
    rcu_thread_offline();
    gate_arrive(g, &g->gate_ready);
    gate_wait(g, &g->gate_go, 1);
    rcu_thread_online();
    if (!atomic_load(&g->start_failed))
        shard_loop(sh);
    atomic_fetch_add(&g->shards_done, 1);
    rcu_thread_offline();
    /* Everyone is out of the loop before anyone frees: no more posts. */
    gate_arrive(g, &g->gate_out);
    gate_wait(g, &g->gate_out, g->nthreads);
    sh->finalizing = true;
    eng_free(sh->eng);
    sh->eng = NULL;
    for (size_t i = 0; i < g->cfg->nlisten; i++) {
        if (sh->lsn[i].fd >= 0) /* never armed (start failed) or stop forced */
            close(sh->lsn[i].fd);
        sh->lsn[i].fd = -1;
    }
    if (sh->mbox_ok)
        mbox_fini(&sh->mbox, NULL);
    rcu_unregister_thread();
    return NULL;
}

/* ---- main thread ------------------------------------------------------------- */

static void reload_keys(struct gw *g)
{
    char err[512];
    bool usage;
    struct gw_keys *k = keys_build(g->cfg, err, sizeof(err), &usage), *old;

    if (k == NULL) {
        metrics_inc_label(g->metrics, g->main_slot, METRIC_KEY_RELOADS, METRICS_RELOAD_ERROR, 1);
        log_msg(LOG_ERROR, "Fernet keys not reloaded, keeping the old ones", "error", err,
                "keys", LOG_U64(g->keys->ks.n), NULL);
        return;
    }
    old = rcu_xchg_pointer(&g->keys, k);
    /* The main thread is no reader: it may wait for a grace period. */
    synchronize_rcu();
    metrics_inc_label(g->metrics, g->main_slot, METRIC_KEY_RELOADS, METRICS_RELOAD_OK, 1);
    metrics_gauge_set(g->metrics, g->main_slot, METRIC_FERNET_KEYS, 0, (int64_t)k->ks.n);
    log_msg(LOG_INFO, "Fernet keys reloaded", "keys", LOG_U64(k->ks.n), NULL);
    keys_free(old);
}

static void post_stats(struct gw *g)
{
    for (unsigned s = 0; s < g->nthreads; s++) {
        struct gw_stats_msg *m = malloc(sizeof(*m));

        if (m == NULL)
            continue;
        m->to = &g->shards[s];
        mbox_post(&g->shards[s].mbox, &m->msg, on_stats_msg);
    }
}

/* The embedded drain/stop messages: each goes out once at most. */
static void post_drain(struct gw *g)
{
    if (g->drain_posted)
        return;
    g->drain_posted = true;
    for (unsigned s = 0; s < g->nthreads; s++)
        mbox_post(&g->shards[s].mbox, &g->shards[s].drain_msg, on_drain_msg);
}

static void post_stop(struct gw *g)
{
    if (g->stop_posted)
        return;
    g->stop_posted = true;
    for (unsigned s = 0; s < g->nthreads; s++)
        mbox_post(&g->shards[s].mbox, &g->shards[s].stop_msg, on_stop_msg);
}

/* Admin callbacks, on libmicrohttpd's thread: render and ready read only
 * what is safe to read from any thread (the metrics, an atomic flag);
 * dropped writes the admin's own metrics slot. */
static int admin_render(void *ctx, char **out, size_t *len)
{
    const struct gw *g = ctx;

    return metrics_render(g->metrics, out, len);
}

static bool admin_ready(void *ctx)
{
    const struct gw *g = ctx;

    return atomic_load(&g->ready);
}

/* The admin listener's own slot: it is the only writer there. */
static void admin_dropped(void *ctx, enum admin_drop why)
{
    struct gw *g = ctx;

    metrics_inc_reason(g->metrics, g->admin_slot, METRIC_ADMIN_DROPS,
                       why == ADMIN_DROP_LIMIT ? "limit" : "deadline", 1);
}

static int admin_up(struct gw *g)
{
    struct admin_cb cb = { .render = admin_render, .ready = admin_ready,
                           .dropped = admin_dropped, .ctx = g };
    char err[256];

    if (g->cfg->admin == NULL)
        return 0;
    g->admin = admin_start(g->cfg->admin, &cb, err, sizeof(err));
    if (g->admin == NULL) {
        log_msg(LOG_ERROR, "admin listener failed", "error", err, NULL);
        return -1;
    }
    return 0;
}

/* --user: after every socket is bound (the listeners in gw_new, the admin
 * listener), before any shard runs. setgroups first, setuid last: each
 * step needs the privilege the next one drops. glibc applies them to every
 * thread of the process (the admin thread exists already). */
static int drop_privileges(struct gw *g)
{
    const char *user = g->cfg->user;

    if (!g->drop_priv)
        return 0;
    if (geteuid() != 0) {
        log_msg(LOG_WARN, "--user ignored: not running as root, no privileges to drop", "user",
                user, "uid", LOG_U64(geteuid()), NULL);
        return 0;
    }
    if (setgroups(1, &g->gid) != 0 || setgid(g->gid) != 0 || setuid(g->uid) != 0) {
        log_msg(LOG_ERROR, "cannot drop privileges", "user", user, "error", strerror(errno),
                NULL);
        return -1;
    }
    if (g->uid != 0 && setuid(0) == 0) {
        log_msg(LOG_ERROR, "privileges not dropped: setuid(0) still works", "user", user, NULL);
        return -1;
    }
    log_msg(LOG_INFO, "privileges dropped", "user", user, "uid", LOG_U64(g->uid), "gid",
            LOG_U64(g->gid), NULL);
    return 0;
}

/* "single:127.0.0.1:443,peer:[::1]:8443" for the start-up line (heap). */
static char *listen_text(const struct gw_cfg *cfg)
{
    size_t cap = cfg->nlisten * (ADDR_STRLEN + 8) + 1, n = 0;
    char *s = malloc(cap), a[ADDR_STRLEN];

    if (s == NULL)
        return NULL;
    s[0] = '\0';
    for (size_t i = 0; i < cfg->nlisten && n < cap; i++)
        n += (size_t)snprintf(s + n, cap - n, "%s%s:%s", i > 0 ? "," : "",
                              kind_name(cfg->listen[i].kind),
                              addr_format(&cfg->listen[i].addr, a, sizeof(a)));
    return s;
}

/* The one start-up line: the whole configuration that matters to an
 * operator, never a key (only their count). Also sets the process-wide
 * gauges. */
static void log_start(struct gw *g)
{
    const struct gw_cfg *cfg = g->cfg;
    const struct eng *e = g->shards[0].eng;
    char admin[ADDR_STRLEN + 8] = "off", a[ADDR_STRLEN];
    char *listen = listen_text(cfg);

    if (g->admin != NULL)
        snprintf(admin, sizeof(admin), "%s:%u", addr_ntop(cfg->admin, a, sizeof(a)),
                 admin_port(g->admin));
    /* every shard asked for the same kind; eng_new() logged each one's reason */
    metrics_gauge_set(g->metrics, g->main_slot, METRIC_ENGINE_INFO,
                      eng_kind(e) == ENG_URING ? METRICS_ENGINE_URING : METRICS_ENGINE_EPOLL, 1);
    metrics_gauge_set(g->metrics, g->main_slot, METRIC_SHARDS, 0, g->nshards);
    metrics_gauge_set(g->metrics, g->main_slot, METRIC_FERNET_KEYS, 0, (int64_t)g->keys->ks.n);
    log_msg(LOG_INFO, "gateway started", "version", SNITUN_VERSION, "engine", eng_name(e),
            "threads", LOG_U64(g->nshards), "listen", listen != NULL ? listen : "?",
            "proxy_protocol", cfg->proxy_protocol ? "on" : "off", "admin", admin,
            "keys", LOG_U64(g->keys->ks.n),
            "keys_file", cfg->keys_file != NULL ? cfg->keys_file : "-",
            "user", cfg->user != NULL ? cfg->user : "-",
            "handshake_timeout", LOG_U64(cfg->handshake_ms / 1000),
            "challenge_timeout", LOG_U64(cfg->challenge_ms / 1000),
            "tunnel_idle_timeout", LOG_U64(cfg->tunnel_idle_ms / 1000),
            "channel_idle_timeout", LOG_U64(cfg->chan_idle_ms / 1000),
            "drain_timeout", LOG_U64(cfg->drain_ms / 1000),
            "max_handshakes", LOG_U64(cfg->max_handshakes),
            "max_handshakes_per_ip", LOG_U64(cfg->max_handshakes_per_ip),
            "max_channels", LOG_U64(cfg->max_channels), "max_frame", LOG_U64(cfg->max_frame),
            "max_channel_queue", LOG_U64(cfg->chan_queue),
            "max_tunnel_queue", LOG_U64(cfg->tunnel_queue),
            "backlog", LOG_U64(cfg->backlog), "cpu_affinity", cfg->cpu_affinity ? "on" : "off",
            "log_rate", LOG_U64(cfg->log_rate),
            "splice", mux_splice_name(cfg->splice != 0 ? cfg->splice : MUX_SPLICE_AUTO),
            "batch", cfg->no_batch ? "off" : "on", "steer", cfg->steer ? "on" : "off", NULL);
    free(listen);
}

static bool all_done(struct gw *g)
{
    return atomic_load(&g->shards_done) >= g->nthreads;
}

/* The first SIGINT/SIGTERM: stop accepting, let channels finish. */
static void drain_start(struct gw *g, int sig)
{
    atomic_store(&g->ready, false);
    metrics_gauge_set(g->metrics, g->main_slot, METRIC_DRAINING, 0, 1);
    log_msg(LOG_INFO, "draining", "signal", sigabbrev_np(sig), "timeout",
            LOG_U64(g->cfg->drain_ms / 1000), "tunnels",
            LOG_I64((int64_t)metrics_value(g->metrics, METRIC_TUNNELS_CONNECTED, 0)),
            "channels", LOG_I64((int64_t)metrics_value(g->metrics, METRIC_CHANNELS_OPEN, 0)),
            NULL);
    post_drain(g);
}

/* Wait for a signal; during the drain at most until `end` (ms, monotonic)
 * in steps of DRAIN_POLL_MS. Returns the signal, or 0 when the step ended
 * without one. */
static int wait_signal(const sigset_t *set, bool draining, uint64_t end)
{
    siginfo_t si;
    uint64_t now, ms;
    struct timespec ts;
    int sig;

    if (!draining) {
        sig = sigwaitinfo(set, &si);
        return sig < 0 ? 0 : sig; /* EINTR */
    }
    now = timer_clock_ms();
    ms = end > now ? end - now : 0;
    ms = ms < DRAIN_POLL_MS ? ms : DRAIN_POLL_MS;
    ts = (struct timespec){ .tv_sec = (time_t)(ms / 1000), .tv_nsec = (long)(ms % 1000) * 1000000 };
    sig = sigtimedwait(set, &si, &ts);
    return sig < 0 ? 0 : sig; /* EAGAIN: the step ended; EINTR */
}

/* Serve signals until the shards are gone (or told to go); returns the
 * exit status. */
static int signal_loop(struct gw *g, const sigset_t *set)
{
    bool draining = false;
    uint64_t end = 0;

    for (;;) {
        int sig;

        if (draining && all_done(g)) {
            log_msg(LOG_INFO, "drained: no channel left", NULL);
            return 0;
        }
        if (draining && !g->stop_posted && timer_clock_ms() >= end) {
            log_msg(g->cfg->drain_ms > 0 ? LOG_WARN : LOG_INFO,
                    "drain timeout: closing the remaining channels", "channels",
                    LOG_I64((int64_t)metrics_value(g->metrics, METRIC_CHANNELS_OPEN, 0)), NULL);
            post_stop(g);
            return 0;
        }
        sig = wait_signal(set, draining, end);
        if (sig == 0)
            continue;
        if (sig == SIGHUP) {
            reload_keys(g);
        } else if (sig == SIGUSR1) {
            post_stats(g);
        } else if (atomic_load(&g->fatal)) {
            log_msg(LOG_ERROR, "stopping", "signal", "engine failure", NULL);
            atomic_store(&g->ready, false);
            post_stop(g);
            return 1;
        } else if (draining) {
            log_msg(LOG_WARN, "second signal: stopping now", "signal", sigabbrev_np(sig),
                    "channels",
                    LOG_I64((int64_t)metrics_value(g->metrics, METRIC_CHANNELS_OPEN, 0)), NULL);
            post_stop(g);
            return 0;
        } else {
            drain_start(g, sig);
            draining = true;
            end = timer_clock_ms() + g->cfg->drain_ms;
        }
    }
}

/* Start the threads; 0 once every shard runs, else -1 (threads then skip
 * their loop and finish). */
static int threads_start(struct gw *g)
{
    int rc = 0;

    for (unsigned s = 0; s < g->nshards; s++) {
        if (pthread_create(&g->shards[s].thread, NULL, shard_main, &g->shards[s]) != 0) {
            snprintf(g->shards[s].err, sizeof(g->shards[s].err), "cannot start its thread");
            atomic_store(&g->start_failed, true);
            break;
        }
        g->nthreads++;
    }
    gate_wait(g, &g->gate_ready, g->nthreads);
    if (atomic_load(&g->start_failed)) {
        for (unsigned s = 0; s < g->nshards; s++)
            if (g->shards[s].err[0])
                log_msg(LOG_ERROR, "shard failed to start", "shard", LOG_U64(s), "error",
                        g->shards[s].err, NULL);
        rc = -1;
    }
    gate_arrive(g, &g->gate_go);
    return rc;
}

int gw_run(struct gw *g)
{
    sigset_t set, old;
    struct gw_ctr total = { 0 };
    bool started = false;
    int rc = 1;

    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, &old);
    signal(SIGPIPE, SIG_IGN);
    g->main_thread = pthread_self();
    pthread_mutex_init(&g->gate_mu, NULL);
    pthread_cond_init(&g->gate_cv, NULL);
    if (admin_up(g) == 0 && drop_privileges(g) == 0 && threads_start(g) == 0) {
        started = true;
        log_start(g);
        atomic_store(&g->ready, true);
        rc = signal_loop(g, &set);
    }
    for (unsigned s = 0; s < g->nthreads; s++)
        pthread_join(g->shards[s].thread, NULL);
    admin_stop(g->admin);
    g->admin = NULL;
    for (unsigned s = 0; s < g->nthreads; s++)
        ctr_add(&total, &g->shards[s].ctr);
    if (started)
        log_stats("all", &total, 0, 0);
    log_msg(LOG_INFO, "gateway stopped", "status", LOG_U64(rc), NULL);
    pthread_mutex_destroy(&g->gate_mu);
    pthread_cond_destroy(&g->gate_cv);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}
