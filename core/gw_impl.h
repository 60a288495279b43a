/* core/gw_impl.h - what the gateway's files share: gw.c (runtime:
 * configuration, shards, listeners, signals, drain and stop, counters),
 * gw_conn.c (the handshake of one connection), gw_tunnel.c (tunnels,
 * routing, cross-shard handoff, metrics mapping) and gw_seen.c (aes-gcm
 * keys already used). Not for other modules: they use
 * core/gw.h.
 *
 * Ownership on a shard:
 *   shard -- owns --> listeners, handshake connections (list), tunnels
 *                     (list + tree by id), the per-IP count tree
 *   gw_conn  owns its fd until it hands it to mux_new() (tunnel), to
 *            mux_chan_open() (same-shard channel) or to a handoff message
 *            (other shard); then c->fd is -1 and the conn just goes away.
 *   gw_tunnel owns its names; its mux owns the tunnel fd and the streams.
 */
#ifndef CORE_GW_IMPL_H
#define CORE_GW_IMPL_H

#include <pthread.h>
#include <stdarg.h>
#include <sys/types.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include <urcu/list.h>
#include <urcu-qsbr.h>

#include "core/challenge.h"
#include "core/claims.h"
#include "core/gw.h"
#include "core/hosttab.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/mux.h"
#include "core/proxy.h"
#include "core/sni.h"
#include "core/token.h"
#include "io/admin.h"
#include "io/eng.h"
#include "io/mbox.h"

/* Why a connection was closed before the multiplexer. Checklist: a new
 * value needs its name in gw.c rej_names[] and, with the same name, in the
 * connections_dropped_total list of core/metrics.c. */
enum gw_rej {
    GW_REJ_NONE = 0,
    GW_REJ_HS_LIMIT,      /* --max-handshakes reached */
    GW_REJ_IP_LIMIT,      /* --max-handshakes-per-ip reached */
    GW_REJ_TIMEOUT,       /* deadline of the current stage */
    GW_REJ_EOF,           /* peer closed before the stage completed */
    GW_REJ_READ_ERROR,    /* recv failed */
    GW_REJ_SEND_ERROR,    /* challenge send failed */
    GW_REJ_GARBAGE,       /* single port: neither 16 nor "gA" */
    GW_REJ_PROXY,         /* bad PROXY header (pp_reason in detail) */
    GW_REJ_SNI,           /* unroutable ClientHello (sni_reason) */
    GW_REJ_UNKNOWN_NAME,  /* no tunnel serves the SNI name */
    GW_REJ_TOKEN,         /* token rejected (token_err) */
    GW_REJ_TOKEN_TOO_LONG,/* GW_TOKEN_MAX bytes without a valid token */
    GW_REJ_CHALLENGE,     /* wrong answer (or AEAD tag) */
    GW_REJ_NOMEM,         /* allocation or cipher setup failed */
    GW_REJ_STOPPING,      /* the gateway is draining or stopping */
    GW_REJ_GCM_REUSED,    /* aes-gcm key of an earlier, still valid session */
    GW_REJ_COUNT
};

/* Handshake stages, for deadlines and the log line. */
enum gw_stage {
    GW_ST_PROXY = 1,  /* reading a PROXY header */
    GW_ST_CLASSIFY,   /* single port: first bytes */
    GW_ST_SNI,        /* reading the ClientHello */
    GW_ST_TOKEN,      /* reading the token */
    GW_ST_ANSWER,     /* challenge sent, reading the answer */
    GW_ST_READY,      /* answer good, challenge send still in flight */
    GW_ST_COUNT
};

/* Per-shard counters, bumped by the owner thread only; summed at exit. */
struct gw_ctr {
    uint64_t accepted;
    uint64_t rej[GW_REJ_COUNT];
    uint64_t timeout[GW_ST_COUNT];
    uint64_t pp[PP_R_COUNT];
    uint64_t sni[SNI_R_COUNT];
    uint64_t token[TOKEN_ERR_COUNT];
    uint64_t cipher_unknown;
    uint64_t tunnels_opened;
    uint64_t tunnels_closed[MUX_R_COUNT];
    uint64_t tunnels_replaced;     /* stale tunnels this shard was told to close */
    uint64_t alias_takeovers;      /* alias taken from another tunnel */
    uint64_t channels_local;       /* routed on the accepting shard */
    uint64_t handoffs_out;         /* sent to another shard */
    uint64_t handoffs_in;          /* received and opened */
    uint64_t handoffs_stale;       /* received, tunnel gone: closed */
    uint64_t chan_refused;         /* mux_chan_open said no */
    uint64_t chan_closed[MUX_R_COUNT];
    uint64_t bytes_to_device, bytes_from_device;
    uint64_t accept_errors;
};

struct gw_shard;

struct gw_lsn {
    struct gw_shard *sh;
    struct eng_op op;
    int fd;
    bool armed;
    const struct gw_listen *cfg;
};

/* The Fernet key list, replaced as a whole on SIGHUP (RCU). */
struct gw_keys {
    struct token_keys ks;
    struct rcu_head rcu;
};

struct gw_ipcount {
    struct net_addr ip;   /* port 0 */
    uint32_t n;
};

/* One connection before the multiplexer (gw_conn.c); freed by eng_defer
 * at the end of the turn in which it closed or was handed over. */
struct gw_conn {
    struct gw_shard *sh;
    struct cds_list_head link;
    enum gw_listen_kind kind;
    enum gw_stage st;
    int fd;
    bool rd_busy, wr_busy, closing, counted;
    struct eng_op rd, wr;
    struct timer deadline;
    struct eng_defer free_d;
    struct net_addr peer;        /* TCP peer */
    struct net_addr caller;      /* peer, or the PROXY source */
    struct gw_ipcount *ipc;      /* per-IP slot held, or NULL */
    uint8_t *buf;
    size_t len, cap, off;        /* payload starts at off (after PROXY) */
    /* token / challenge stage */
    struct claims claims;
    bool have_claims;
    struct tc_stream *seal, *open;
    struct challenge ch;
    uint8_t chwire[CHALLENGE_WIRE_MAX];
    size_t chlen;
    struct iovec iov;
};

struct gw_tunnel {
    struct gw_shard *sh;
    struct cds_list_head link;
    struct mux *mux;
    uint64_t id, gen;
    char **names;                /* hostname first, then aliases (raw) */
    size_t nnames;
    unsigned version;
    enum tc_kind cipher;
    struct net_addr peer;
    struct timer expiry;
};

struct gw_shard {
    struct gw *gw;
    unsigned idx;
    pthread_t thread;
    struct eng *eng;
    struct mbox mbox;
    bool mbox_ok;
    struct gw_lsn *lsn;          /* gw->cfg->nlisten of them */
    size_t nlsn_open;
    struct cds_list_head conns;
    struct cds_list_head tunnels;
    size_t nconns, ntunnels;
    size_t nchans;               /* channels opened here and not yet closed */
    void *tunnel_tree;           /* tsearch: struct gw_tunnel * by id */
    void *ip_tree;               /* tsearch: struct gw_ipcount * by ip */
    /* draining: listeners closed, no new connection or channel, open
     * channels go on; stopping: tunnels closed, the loop ends when nothing
     * is left (gw.c "Drain and stop"). */
    bool draining, stopping, finalizing;
    struct mbox_msg drain_msg, stop_msg;   /* each posted at most once */
    struct timer stop_timer;
    struct timer linger_timer;   /* drained: let the last frames leave */
    struct timer fold_timer;     /* mux counters into the metrics, 1 s */
    struct eng_defer drain_d;
    struct gw_ctr ctr;
    uint64_t routed;             /* device channels opened here, for ever;
                                    written by this shard (gw_steer_count),
                                    read by shard 0 (gw_steer_tick) */
    struct mux_group mux_group;  /* counters and random bytes of the tunnels */
    struct mux_stats mux_folded; /* mux_group.st as last added to the metrics */
    struct log_rl rl;            /* per-connection lines of this shard */
    char err[256];               /* startup failure */
};

/* aes-gcm keys of accepted tokens (SHA-256 of the key) until their
 * token's expiry: a GCM key must never serve two sessions (PROTOCOL.md
 * 3.3, 9.3). Shared by the shards, on the handshake path only: a mutex
 * and a tsearch tree, expired entries purged lazily. */
struct gw_seen {
    pthread_mutex_t mu;
    void *root;                  /* struct gw_seen_ent * by digest */
    size_t n;
    double next_purge;           /* wall clock of the next purge pass */
};

/* gw_steer.c: where --sni-listen connections are sent (SO_REUSEPORT
 * program). Shard 0's thread only. */
#define GW_STEER_MAX 64          /* shards a program can name (SOCK_STEER_MAX) */
struct gw_steer {
    uint64_t seen[GW_STEER_MAX]; /* gw_shard.routed at the last look */
    uint32_t w[GW_STEER_MAX];    /* weights attached (when on) */
    bool on;                     /* a program is attached */
    bool failed;                 /* the kernel refused one: never again */
};

struct gw {
    const struct gw_cfg *cfg;
    struct gw_shard *shards;
    unsigned nshards;
    struct hosttab *tab;
    struct metrics *metrics;     /* nshards + 2 slots: main's, then admin's */
    unsigned main_slot;          /* = nshards: metrics written by main */
    unsigned admin_slot;         /* = nshards + 1: by the admin listener's thread */
    struct admin *admin;
    struct gw_seen seen;
    struct gw_steer steer;
    bool drop_priv;              /* --user given and found */
    uid_t uid;
    gid_t gid;
    bool drain_posted, stop_posted; /* main thread only */
    atomic_uint shards_done;     /* shard loops ended */
    atomic_bool ready;           /* /readyz: shards serving, not stopping */
    struct gw_keys *keys;        /* RCU: rcu_dereference on shards */
    unsigned nthreads;           /* shard threads started */
    /* start/stop rendezvous: counters under gate_mu */
    pthread_mutex_t gate_mu;
    pthread_cond_t gate_cv;
    unsigned gate_ready, gate_go, gate_out;
    atomic_bool start_failed;
    atomic_bool fatal;
    pthread_t main_thread;
    _Alignas(64) atomic_uint_fast64_t next_tunnel;
    _Alignas(64) atomic_uint_fast64_t next_gen;
    _Alignas(64) atomic_size_t handshakes;
};

/* ---- gw_steer.c ----------------------------------------------------------- */

/* A device channel was opened on sh (by sh's thread). */
void gw_steer_count(struct gw_shard *sh);

/* Shard 0, every GW_FOLD_MS: re-weigh the --sni-listen groups by where
 * device channels were opened since the last call (see gw_steer.c). */
void gw_steer_tick(struct gw *g);

/* ---- gw_seen.c ------------------------------------------------------------ */

void gw_seen_init(struct gw_seen *s);
void gw_seen_fini(struct gw_seen *s);

/* Record the aes-gcm key[0..len) of a token valid until `expiry` (seconds
 * since the epoch) at time `now`. true: not seen in a session still valid,
 * now recorded (until expiry); false: reused, refuse the connection.
 * false too when memory runs out (refusing is the safe side). Any thread. */
bool gw_seen_claim(struct gw_seen *s, const uint8_t *key, size_t len, double expiry,
                   double now);

/* Entries held (expired ones not yet purged included). */
size_t gw_seen_count(struct gw_seen *s);

/* ---- gw.c ----------------------------------------------------------------- */

/* gw_new(), with the listening sockets opened only when `listen` (the
 * test hooks of core/gw_test.c build a gateway without them). */
struct gw *gw_build(const struct gw_cfg *cfg, bool listen, char *err, size_t errlen,
                    bool *usage);

/* ---- gw.c: names ---------------------------------------------------------- */

const char *gw_rej_name(enum gw_rej r);
const char *gw_stage_name(enum gw_stage st);

/* ---- gw_tunnel.c ------------------------------------------------------------ */

/* Count a connection closed before the multiplexer in the Prometheus
 * metrics (the label depends on the stage); detail is the parser's reason
 * token when there is one. */
void gw_metric_reject(struct gw_shard *sh, enum gw_stage st, enum gw_rej why,
                      const char *detail);

/* A verified tunnel: claims in c, streams c->seal/c->open, fd c->fd,
 * bytes after the answer at c->buf[c->off..c->len). On success takes fd
 * and streams (c->fd = -1, streams NULL). Returns 0 or -1 (c untouched
 * apart from that; the caller closes it). */
int gw_tunnel_start(struct gw_conn *c);

/* A device connection whose ClientHello named name: route it. On
 * GW_REJ_NONE the fd was taken (c->fd = -1): a channel on this shard (or
 * refused by the mux, which closed it), or a handoff to the owner shard.
 * Otherwise (unknown_name, no_memory) nothing was taken; the caller
 * closes the connection. */
enum gw_rej gw_route(struct gw_conn *c, const char *name, size_t n);

/* gw.c: called whenever a conn, tunnel, channel or listener goes away, so
 * that a draining shard stops once its channels are done, and a stopping
 * shard ends its loop once nothing is left. */
void gw_shard_check_drained(struct gw_shard *sh);

/* Add what the shard's tunnels counted since the last fold to the metrics
 * (and to the shard's counters). gw.c runs it every second, gw_tunnel.c
 * when a tunnel goes. */
void gw_tunnel_fold_all(struct gw_shard *sh);

/* ---- gw_conn.c --------------------------------------------------------- */

/* A connection accepted on a listener of kind: takes fd. */
void gw_conn_start(struct gw_shard *sh, enum gw_listen_kind kind, int fd,
                   const struct net_addr *peer);

/* Close a handshake connection (nothing sent), counting why. */
void gw_conn_abort(struct gw_conn *c, enum gw_rej why);

#endif
