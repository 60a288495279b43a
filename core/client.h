/* core/client.h - the connector's runtime: one tunnel to the gateway,
 * kept up forever (PROTOCOL.md 2.7, 3.5, 6.1, 6.5, 8.3).
 *
 * States (one tunnel at a time: a client MUST NOT keep two tunnels for
 * the same name, 8.3):
 *
 *        start
 *          |
 *          v
 *   +--> BACKOFF --timer--> FETCH token material (args / file / command)
 *   |        ^                 |  fails, or aes-gcm key already used
 *   |        +-----------------+  (log why, wait: never reuse, 3.3)
 *   |        |                 v
 *   |        +--- fails --- RESOLVE gateway (and endpoints)
 *   |        |                 v
 *   |        +--- fails --- CONNECT (each address, --connect-timeout)
 *   |        |                 v
 *   |        +--- fails --- TOKEN: one write of the token     (timeout)
 *   |        |                 v
 *   |        +--- fails --- CHALLENGE: read exactly 32/60 bytes (timeout)
 *   |        |                 v
 *   |        +--- fails --- ANSWER: one write of the sealed SHA-256 (timeout)
 *   |        |                 v
 *   |        |              mux_new() + PING at once
 *   |        +--- dies ---- WAIT_PONG                           (timeout)
 *   |                          | pong: log "connected", backoff reset
 *   |                          v
 *   +--------- dies ------- UP (the mux pings every --ping-interval and
 *                              closes after --pong-timeout without reply)
 *
 * Every transition is logged once: "connecting", "connected",
 * "disconnected" reason=..., "backoff" seconds=.... Backoff is full
 * jitter: uniform in [0, min(max, min * 2^failures)] (client_backoff_ms),
 * failures reset to 0 when a pong proves the tunnel.
 *
 * SIGINT/SIGTERM (a signalfd read by the engine): the tunnel is closed
 * (the mux half-closes, then closes), pending endpoint connects are
 * cancelled, client_run returns 0. A second signal stops at once.
 *
 * Blocking work: fetching the token (a file read or a command with a
 * deadline, interruptible by the signals) and getaddrinfo run only while
 * no tunnel is up, so no channel waits for them.
 *
 * Admin listener (optional, io/admin.h): /metrics renders the client's
 * counters (the tunnel's own mux counters, bytes and frames, are added
 * every second while it is up, so /metrics is at most ~1 s behind),
 * /readyz is 200 only while a tunnel is proven (UP). One start-up line
 * ("snitun client starting") states the configuration, never the token,
 * its key or the token command.
 *
 * Ownership: client_new copies the configuration it needs; cfg->tokens
 * and cfg->acl are borrowed for the client's lifetime. One engine, one
 * thread (the client needs no shards: one tunnel's headers cost little).
 */
#ifndef CORE_CLIENT_H
#define CORE_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/acl.h"
#include "core/mux.h"
#include "core/tokensrc.h"
#include "io/eng.h"

struct client_cfg {
    const char *server;              /* HOST:PORT of the gateway */
    const char *endpoint;            /* default endpoint HOST:PORT */
    const char *const *routes;       /* "NAME=HOST:PORT", nroutes */
    size_t nroutes;
    const struct acl *acl;           /* NULL: no list */
    struct tokensrc *tokens;         /* required */
    enum eng_kind io;
    unsigned endpoint_pp;            /* 0 none, 1, 2: PROXY header to endpoint */
    uint32_t connect_timeout_ms;     /* TCP connect, token, challenge, first pong */
    uint32_t endpoint_timeout_ms;
    uint32_t backoff_min_ms, backoff_max_ms;
    uint32_t ping_ms, pong_ms;
    size_t in_high, in_low;          /* 0: mux defaults */
    uint32_t tunnel_idle_ms;         /* 0: mux default */
    enum mux_splice splice;          /* 0: mux default (auto) */
    bool no_batch;                   /* --batch off: one frame per send */
    const struct net_addr *admin;    /* /metrics, /healthz, /readyz; NULL: off */
};

/* What the client did, for tests and the exit line. */
struct client_stats {
    uint64_t attempts;               /* connection attempts started */
    uint64_t handshakes;             /* answers sent (mux started) */
    uint64_t connected;              /* pongs that proved a tunnel */
    uint64_t token_failures;         /* fetch failed or key already used */
};

struct client;

/* Check cfg and build the client (no I/O yet besides resolving the
 * endpoints once, best effort). Returns NULL with a one-line reason in
 * err. */
struct client *client_new(const struct client_cfg *cfg, char *err, size_t errlen);

/* Run until SIGINT/SIGTERM. Returns the exit status: 0 after a signal, 1
 * when the engine cannot start or fails. */
int client_run(struct client *cl);

void client_free(struct client *cl);

const struct client_stats *client_stats(const struct client *cl);

/* Backoff before attempt number failures+1 (full jitter): rnd mapped
 * uniformly onto [0, min(max_ms, min_ms << failures)]. Pure. */
uint64_t client_backoff_ms(unsigned failures, uint64_t min_ms, uint64_t max_ms, uint64_t rnd);

#endif
