/* core/client_chan.h - the client's channels: access list, routing, and
 * the connection to the endpoint (PROTOCOL.md 6.2, 8.1, 8.2).
 *
 * The tunnel's mux (core/mux.h) reports each NEW through its on_new hook;
 * core/client.c forwards the channel hooks here. Per channel:
 *
 *   NEW --ACL refuses--> mux_chan_close(REFUSED)          (CLOSE at once)
 *    |
 *    +--no --route--> CONNECT                             (at once)
 *    +--routes------> WAIT_SNI --ClientHello parsed / not TLS / deadline-->
 *                        CONNECT (the route whose name matches the SNI,
 *                        else the default --endpoint)
 *
 *   CONNECT: eng_connect to the endpoint's addresses in order, all within
 *      one deadline (--endpoint-timeout) --ok--> mux_chan_attach(fd,
 *      PROXY v1/v2 header when configured) and this module forgets the
 *      channel; --every address failed or deadline--> mux_chan_close
 *      (CONNECT_FAIL): CLOSE, one log line, one counter.
 *   Closed by the peer (CLOSE) or by the tunnel while WAIT_SNI/CONNECT:
 *      the connect is cancelled and its socket closed (on_closed, or
 *      client_chan_tunnel_down from on_dead).
 *
 * Channel state lives in a struct client_chan_pend (heap, one per channel
 * not yet attached), reachable from the mux channel's udata slot until it
 * is attached or orphaned, and from the set's pending list until freed.
 * Invariant: a pend is freed only when it has no eng op in flight and its
 * timer is disarmed; an orphaned pend (c == NULL) with a connect in flight
 * waits for the connect's callback.
 *
 * Endpoints are HOST:PORT texts, HOST a name, an IPv4 address or [IPv6],
 * resolved with getaddrinfo (blocking: the client resolves while no
 * tunnel is up). Route names are compared after sni_name_normalize()
 * (ASCII case, one trailing dot), on both sides.
 *
 * Single-threaded: everything runs on the client's engine thread.
 */
#ifndef CORE_CLIENT_CHAN_H
#define CORE_CLIENT_CHAN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <urcu/list.h>

#include "core/acl.h"
#include "core/addr.h"
#include "core/log.h"
#include "core/metrics.h"
#include "core/mux.h"
#include "core/sni.h"
#include "io/eng.h"

#define CLIENT_CHAN_ADDRS 8    /* addresses kept per endpoint */
#define CLIENT_CHAN_HOST_MAX 255

/* An endpoint (or the gateway: the same HOST:PORT form). */
struct client_chan_ep {
    char host[CLIENT_CHAN_HOST_MAX + 1];   /* without brackets */
    char port[6];
    char text[CLIENT_CHAN_HOST_MAX + 9];   /* as given, for log lines */
    struct net_addr addrs[CLIENT_CHAN_ADDRS];
    size_t naddrs;                         /* 0 until resolved */
};

struct client_chan_route {
    char name[SNI_NAME_MAX + 1];           /* normalised */
    struct client_chan_ep ep;
};

struct client_chan_stats {
    uint64_t refused;          /* ACL said no */
    uint64_t connect_failed;   /* every address refused or unreachable */
    uint64_t connect_timeout;  /* deadline passed while connecting */
    uint64_t attached;         /* connected and handed to the mux */
    uint64_t routed;           /* connected through a --route by SNI */
    uint64_t cancelled;        /* closed by the peer/tunnel while pending */
};

struct client_chan_set {
    /* configuration, read-only once channels flow */
    struct eng *eng;
    struct metrics *metrics;               /* may be NULL */
    const struct acl *acl;                 /* NULL: everybody passes */
    struct client_chan_ep endpoint;
    struct client_chan_route *routes;      /* nroutes, owned (fini frees) */
    size_t nroutes;
    unsigned pp;                           /* 0 none, 1 or 2: PROXY header */
    uint32_t timeout_ms;                   /* --endpoint-timeout */
    /* called when the last pending channel is freed (shutdown waits) */
    void (*on_idle)(void *ctx);
    void *ctx;
    /* state */
    struct cds_list_head pending;          /* struct client_chan_pend */
    size_t npending;
    struct client_chan_stats st;
    struct log_rl rl_refused, rl_failed;   /* peer-triggered log lines */
};

/* Parse "HOST:PORT" / "[IPv6]:PORT" into ep (unresolved). Returns 0, or
 * -1 with *why set to a static message. */
int client_chan_ep_parse(struct client_chan_ep *ep, const char *text, const char **why);

/* Resolve ep->host (getaddrinfo, numeric or not; blocking) into its
 * address list. On failure the previous list is kept and -1 returned with
 * the resolver's message in err. */
int client_chan_ep_resolve(struct client_chan_ep *ep, char *err, size_t errlen);

/* Empty set (no routes, no pending channels). */
void client_chan_set_init(struct client_chan_set *s);

/* Add "NAME=HOST:PORT". Returns 0, or -1 with *why. */
int client_chan_route_add(struct client_chan_set *s, const char *spec, const char **why);

/* Resolve the default endpoint and every route; one warning line per
 * failure (a failed name keeps its previous addresses). Returns the
 * number of endpoints that have no address at all. */
size_t client_chan_resolve_all(struct client_chan_set *s);

/* Frees the routes and every pending channel without callbacks: only
 * after the engine is gone (eng_free) or when nothing is pending. */
void client_chan_set_fini(struct client_chan_set *s);

/* The mux hooks, forwarded by the client. */
void client_chan_on_new(struct client_chan_set *s, struct mux_chan *c,
                        const struct net_addr *caller);
void client_chan_on_pending_data(struct client_chan_set *s, struct mux_chan *c);
void client_chan_on_closed(struct client_chan_set *s, struct mux_chan *c, enum mux_reason why);

/* The tunnel is gone: forget every mux channel (their connects are
 * cancelled; the sockets close when the callbacks come). */
void client_chan_tunnel_down(struct client_chan_set *s);

/* The endpoint for an SNI name (normalised here): a route, or the
 * default endpoint. */
const struct client_chan_ep *client_chan_route_for(const struct client_chan_set *s,
                                                   const char *name, size_t len);

#endif
