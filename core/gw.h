/* core/gw.h - the gateway runtime behind `snitun server` (DESIGN.md
 * "Threads, ownership, routing"; PROTOCOL.md 1, 2.5-2.7, 3.5, 6, 7).
 *
 * A gateway is N shards. Each shard is one thread with one engine
 * (io/eng.h), one mailbox (io/mbox.h) and its own SO_REUSEPORT listening
 * socket for every configured address, so the kernel spreads connections
 * over the shards. Every fd belongs to exactly one shard.
 *
 *   accept -> [PROXY header] -> classify (single port) -+-> ClientHello -> route
 *                                                       +-> token -> challenge -> tunnel
 *
 * - A tunnel (an authenticated client, core/mux.h) lives on the shard that
 *   accepted it and registers its hostname and aliases in the shared
 *   hostname table (core/hosttab.h), replacing any previous owner; the
 *   tunnel that owned the new tunnel's hostname before is closed (stale
 *   peer, PROTOCOL.md 6.7) on its own shard.
 * - A device connection is routed by its SNI name. If the tunnel lives on
 *   another shard, the fd, the bytes already read and the caller address
 *   move there through the owner's mailbox; the owner re-checks that the
 *   name still maps to that tunnel before opening the channel.
 * - Every failure before the multiplexer closes the connection without
 *   sending anything, with one log line (rate-limited) and one counter.
 *
 * - An aes-gcm token whose key was already accepted in a session that is
 *   still valid is refused (nothing sent; handshakes_total{result=
 *   "gcm_key_reused"}): a second session would repeat GCM nonces.
 *
 * Configuration is read-only once gw_run() starts. gw_run() owns the
 * calling thread until a stop. Signals:
 *   SIGINT/SIGTERM  drain: listeners closed (new devices and tunnels are
 *                   refused, /readyz says 503), handshakes in progress
 *                   dropped, open channels go on for up to drain_ms; once
 *                   no channel is open (or at the deadline, or on a
 *                   second SIGINT/SIGTERM) the tunnels are closed and
 *                   gw_run returns 0.
 *   SIGHUP          re-read the Fernet keys (flags + keys file; on error
 *                   the old keys stay and one line says why).
 *   SIGUSR1         log every shard's counters ("stats" lines).
 * Logging goes through core/log.h (log_setup() is the caller's); one
 * "gateway started" line states the configuration (never a key). Counters
 * feed the Prometheus metrics (core/metrics.h) served by the optional
 * admin listener (io/admin.h); the multiplexers' own counters are folded
 * in every second, so /metrics is at most about a second behind.
 */
#ifndef CORE_GW_H
#define CORE_GW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/addr.h"
#include "core/mux.h"
#include "io/eng.h"

#define GW_THREADS_MAX 1024
#define GW_TOKEN_MAX 4096          /* token bytes read at most (PROTOCOL.md 2.7) */
#define GW_CHALLENGE_MAX_S 60      /* PROTOCOL.md 3.5: never more than 60 s */

/* What a listening address accepts. */
enum gw_listen_kind {
    GW_L_SINGLE = 1, /* both: classify by the first bytes (PROTOCOL.md 1.3) */
    GW_L_SNI = 2,    /* device TLS connections only */
    GW_L_PEER = 3,   /* client tunnels only (never a PROXY header) */
};

struct gw_listen {
    struct net_addr addr;
    enum gw_listen_kind kind;
};

/* Everything the gateway needs. Pointers are borrowed for the whole life
 * of the struct gw made from it. */
/* Smallest non-zero queue cap: twice the mux's PAUSE watermark, so that a
 * channel that honours PAUSE is never closed for its queue. */
#define GW_QUEUE_MIN (4u << 20)

struct gw_cfg {
    const struct gw_listen *listen;
    size_t nlisten;
    bool proxy_protocol;        /* parse PROXY v1/v2 on the TLS side */
    unsigned threads;           /* shards, 1..GW_THREADS_MAX */
    enum eng_kind io;
    bool cpu_affinity;          /* pin shard i to the i-th allowed CPU */
    int backlog;                /* 0 = SOMAXCONN */
    uint32_t max_handshakes;    /* unauthenticated connections, all shards; 0 = off */
    uint32_t max_handshakes_per_ip; /* per shard and source IP; 0 = off */
    uint32_t max_channels;      /* per tunnel; 0 = unlimited */
    uint32_t max_frame;         /* cap on a received frame's SIZE */
    size_t chan_queue;          /* incoming cap per channel; 0: PROTOCOL.md 5.2 */
    size_t tunnel_queue;        /* incoming cap per tunnel; 0: none */
    enum mux_splice splice;     /* DATA splice path; 0: mux default (auto) */
    bool no_batch;              /* --batch off: one frame per send */
    bool steer;                 /* --steer: --sni-listen connections to the
                                   shards that serve them (gw_steer.c) */
    uint32_t handshake_ms;      /* accept -> ClientHello or token complete */
    uint32_t challenge_ms;      /* challenge sent -> answer read */
    uint32_t tunnel_idle_ms;    /* 0 = off */
    uint32_t chan_idle_ms;      /* 0 = off */
    /* Fernet keys: the flag values in order, then the keys file. */
    const char *const *keys;
    size_t nkeys;
    const char *keys_file;      /* NULL: none; re-read on SIGHUP */
    unsigned log_rate;          /* per-connection lines per second per shard; 0 = all */
    const struct net_addr *admin; /* /metrics, /healthz, /readyz; NULL = off */
    uint32_t drain_ms;          /* SIGTERM: longest wait for open channels */
    const char *user;           /* drop root to this user after binding; NULL = no */
};

/* Defaults of every field (listen list empty, threads 1, no keys). */
void gw_cfg_defaults(struct gw_cfg *cfg);

struct gw;

/* Check the configuration, load the keys, look up cfg->user, open every
 * shard's listening sockets. NULL on failure with a one-line message in
 * err (naming the flag or address at fault) and *usage true when the
 * configuration itself is wrong (false: a runtime failure such as an
 * address in use, an unreadable keys file or an unknown user). */
struct gw *gw_new(const struct gw_cfg *cfg, char *err, size_t errlen, bool *usage);

/* Start the admin listener, drop privileges (cfg->user: setgroups,
 * setgid, setuid; a warning when not root), start the shards and serve
 * until SIGINT/SIGTERM (see above). Blocks SIGINT, SIGTERM, SIGHUP and
 * SIGUSR1 in the calling thread (and so in the shards) and ignores
 * SIGPIPE. Returns the exit status: 0 after a stop by signal (drained or
 * not), 1 when the admin listener, the privilege drop or a shard could
 * not start, or a shard failed. */
int gw_run(struct gw *g);

/* Free everything gw_new made. NULL is ignored. */
void gw_free(struct gw *g);

#endif
