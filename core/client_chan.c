/* core/client_chan.c - see client_chan.h. */
#include "core/client_chan.h"

#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <urcu/compiler.h>

#include "core/log.h"
#include "core/proxy.h"
#include "io/sock.h"

struct client_chan_pend {
    struct cds_list_head link;
    struct client_chan_set *s;
    struct mux_chan *c;                 /* NULL once orphaned */
    struct net_addr caller;
    const struct client_chan_ep *ep;    /* NULL while waiting for the SNI */
    bool routed;
    size_t ai;                          /* address being tried */
    int fd;
    int last_err;
    bool connecting;                    /* op in flight */
    bool timed_out;
    struct eng_op op;
    struct timer timer;
};

/* ---- endpoints ----------------------------------------------------------- */

int client_chan_ep_parse(struct client_chan_ep *ep, const char *text, const char **why)
{
    const char *host = text, *colon;
    size_t hlen;
    char *end;
    unsigned long port;

    memset(ep, 0, sizeof(*ep));
    if (text[0] == '[') {
        const char *close = strchr(text, ']');
        if (close == NULL || close[1] != ':')
            return *why = "expected [IPv6]:PORT", -1;
        host = text + 1;
        hlen = (size_t)(close - host);
        colon = close + 1;
    } else {
        colon = strrchr(text, ':');
        if (colon == NULL)
            return *why = "expected HOST:PORT", -1;
        hlen = (size_t)(colon - text);
        if (memchr(text, ':', hlen) != NULL)
            return *why = "an IPv6 address needs brackets: [ADDR]:PORT", -1;
    }
    if (hlen == 0 || hlen > CLIENT_CHAN_HOST_MAX)
        return *why = "HOST must be 1..255 characters", -1;
    port = strtoul(colon + 1, &end, 10);
    if (colon[1] < '0' || colon[1] > '9' || *end != '\0' || port == 0 || port > 65535)
        return *why = "PORT must be 1..65535", -1;
    memcpy(ep->host, host, hlen);
    snprintf(ep->port, sizeof(ep->port), "%lu", port);
    snprintf(ep->text, sizeof(ep->text), "%s", text);
    return 0;
}

int client_chan_ep_resolve(struct client_chan_ep *ep, char *err, size_t errlen)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_NUMERICSERV }, *res, *ai;
    struct net_addr list[CLIENT_CHAN_ADDRS];
    size_t n = 0;
    int rc = getaddrinfo(ep->host, ep->port, &hints, &res);

    if (rc != 0) {
        snprintf(err, errlen, "%s", rc == EAI_SYSTEM ? strerror(errno) : gai_strerror(rc));
        return -1;
    }
    for (ai = res; ai != NULL && n < CLIENT_CHAN_ADDRS; ai = ai->ai_next) {
        struct net_addr a;
        bool dup = false;

        addr_from_sockaddr(&a, ai->ai_addr);
        if (a.family == AF_UNSPEC)
            continue;
        for (size_t i = 0; i < n; i++)
            dup = dup || addr_equal(&list[i], &a);
        if (!dup)
            list[n++] = a;
    }
    freeaddrinfo(res);
    if (n == 0) {
        snprintf(err, errlen, "no IPv4 or IPv6 address");
        return -1;
    }
    memcpy(ep->addrs, list, n * sizeof(list[0]));
    ep->naddrs = n;
    return 0;
}

/* ---- the set ------------------------------------------------------------- */

void client_chan_set_init(struct client_chan_set *s)
{
    memset(s, 0, sizeof(*s));
    CDS_INIT_LIST_HEAD(&s->pending);
    s->timeout_ms = 10000;
    log_rl_init(&s->rl_refused, 10);
    log_rl_init(&s->rl_failed, 10);
}

int client_chan_route_add(struct client_chan_set *s, const char *spec, const char **why)
{
    const char *eq = strchr(spec, '=');
    struct client_chan_route r, *v;
    size_t len;

    if (eq == NULL || eq == spec)
        return *why = "expected NAME=HOST:PORT", -1;
    len = (size_t)(eq - spec);
    if (len > SNI_NAME_MAX)
        return *why = "NAME is longer than 255 bytes", -1;
    memset(&r, 0, sizeof(r));
    memcpy(r.name, spec, len);
    sni_name_normalize(r.name, len);
    if (client_chan_ep_parse(&r.ep, eq + 1, why) != 0)
        return -1;
    for (size_t i = 0; i < s->nroutes; i++)
        if (strcmp(s->routes[i].name, r.name) == 0)
            return *why = "NAME is routed twice", -1;
    v = realloc(s->routes, (s->nroutes + 1) * sizeof(*v));
    if (v == NULL)
        return *why = "out of memory", -1;
    s->routes = v;
    s->routes[s->nroutes++] = r;
    return 0;
}

static bool resolve_one(struct client_chan_ep *ep, const char *what)
{
    char err[256];

    if (client_chan_ep_resolve(ep, err, sizeof(err)) != 0) {
        log_msg(LOG_WARN, "cannot resolve endpoint", "endpoint", ep->text, "for", what,
                "error", err, "kept", LOG_U64(ep->naddrs), NULL);
        return ep->naddrs > 0;
    }
    return true;
}

size_t client_chan_resolve_all(struct client_chan_set *s)
{
    size_t missing = !resolve_one(&s->endpoint, "default");

    for (size_t i = 0; i < s->nroutes; i++)
        missing += !resolve_one(&s->routes[i].ep, s->routes[i].name);
    return missing;
}

static void pend_free(struct client_chan_pend *p)
{
    struct client_chan_set *s = p->s;

    eng_timer_del(s->eng, &p->timer);
    cds_list_del(&p->link);
    free(p);
    if (--s->npending == 0 && s->on_idle != NULL)
        s->on_idle(s->ctx);
}

void client_chan_set_fini(struct client_chan_set *s)
{
    struct client_chan_pend *p, *tmp;

    /* The engine is gone: no callback will come, close what is left. */
    cds_list_for_each_entry_safe(p, tmp, &s->pending, link) {
        if (p->fd >= 0)
            close(p->fd);
        cds_list_del(&p->link);
        free(p);
    }
    s->npending = 0;
    free(s->routes);
    s->routes = NULL;
    s->nroutes = 0;
}

const struct client_chan_ep *client_chan_route_for(const struct client_chan_set *s,
                                                   const char *name, size_t len)
{
    char norm[SNI_NAME_MAX + 1];

    if (len > SNI_NAME_MAX)
        return &s->endpoint;
    memcpy(norm, name, len);
    norm[len] = '\0';
    sni_name_normalize(norm, len);
    for (size_t i = 0; i < s->nroutes; i++)
        if (strcmp(s->routes[i].name, norm) == 0)
            return &s->routes[i].ep;
    return &s->endpoint;
}

/* ---- one channel --------------------------------------------------------- */

static const char *chan_hex(const struct mux_chan *c, char buf[17])
{
    const uint8_t *id = mux_chan_id(c);

    for (int i = 0; i < 8; i++)
        snprintf(buf + 2 * i, 3, "%02x", id[i]);
    return buf;
}

static void pend_fail(struct client_chan_pend *p)
{
    struct client_chan_set *s = p->s;
    const struct net_addr *a = &p->ep->addrs[p->ai < p->ep->naddrs ? p->ai : 0];
    char ab[ADDR_STRLEN], cb[ADDR_STRLEN], id[17];

    if (p->timed_out)
        s->st.connect_timeout++;
    else
        s->st.connect_failed++;
    if (s->metrics != NULL)
        metrics_inc(s->metrics, 0, METRIC_CLIENT_ENDPOINT_FAILURES, 1);
    log_ratelimited(&s->rl_failed, LOG_WARN, "endpoint connect failed", "chan", chan_hex(p->c, id),
                    "endpoint", p->ep->text,
                    "addr", p->ep->naddrs > 0 ? addr_format(a, ab, sizeof(ab)) : "-",
                    "caller", addr_ntop(&p->caller, cb, sizeof(cb)),
                    "error", p->timed_out ? "timeout" : p->ep->naddrs == 0 ? "unresolved"
                                                                          : strerror(p->last_err),
                    NULL);
    mux_chan_set_udata(p->c, NULL);
    mux_chan_close(p->c, MUX_R_CONNECT_FAIL);
    pend_free(p);
}

static void pend_attach(struct client_chan_pend *p)
{
    struct client_chan_set *s = p->s;
    uint8_t hdr[PP_BUILD_MAX];
    size_t n = 0;
    int fd = p->fd;

    if (s->pp == 1)
        n = pp_build_v1(&p->caller, &p->ep->addrs[p->ai], hdr, sizeof(hdr));
    else if (s->pp == 2)
        n = pp_build_v2(&p->caller, &p->ep->addrs[p->ai], hdr, sizeof(hdr));
    s->st.attached++;
    s->st.routed += p->routed;
    if (log_enabled(LOG_DEBUG)) {
        char ab[ADDR_STRLEN], cb[ADDR_STRLEN], id[17];
        log_msg(LOG_DEBUG, "channel connected", "chan", chan_hex(p->c, id),
                "endpoint", p->ep->text, "addr", addr_format(&p->ep->addrs[p->ai], ab, sizeof(ab)),
                "caller", addr_ntop(&p->caller, cb, sizeof(cb)), NULL);
    }
    p->fd = -1;
    mux_chan_set_udata(p->c, NULL);
    mux_chan_attach(p->c, fd, n > 0 ? hdr : NULL, n);
    pend_free(p);
}

static void try_next(struct client_chan_pend *p);

static void connect_cb(struct eng_op *op, int res)
{
    struct client_chan_pend *p = caa_container_of(op, struct client_chan_pend, op);

    p->connecting = false;
    if (p->c == NULL || res != 0) {
        eng_close(p->s->eng, p->fd);
        p->fd = -1;
    }
    if (p->c == NULL) {             /* orphaned while connecting */
        pend_free(p);
        return;
    }
    if (res == 0) {
        pend_attach(p);
        return;
    }
    p->last_err = -res;
    if (p->timed_out || res == -ECANCELED) {
        p->timed_out = true;
        pend_fail(p);
        return;
    }
    p->ai++;
    try_next(p);
}

/* Connect to the next address of p->ep, or give up. */
static void try_next(struct client_chan_pend *p)
{
    struct client_chan_set *s = p->s;
    struct sock_opts o = { .nodelay = true };

    for (; p->ai < p->ep->naddrs; p->ai++) {
        int fd = sock_stream(p->ep->addrs[p->ai].family, &o);
        if (fd < 0) {
            p->last_err = -fd;
            continue;
        }
        p->fd = fd;
        p->connecting = true;
        eng_connect(s->eng, &p->op, fd, &p->ep->addrs[p->ai]);
        return;
    }
    if (p->ep->naddrs == 0)
        p->last_err = EHOSTUNREACH;
    p->ai = p->ep->naddrs > 0 ? p->ep->naddrs - 1 : 0;
    pend_fail(p);
}

static void start_connect(struct client_chan_pend *p, const struct client_chan_ep *ep)
{
    p->ep = ep;
    p->ai = 0;
    eng_timer_add(p->s->eng, &p->timer, p->s->timeout_ms);
    try_next(p);
}

/* Route by the SNI in the first bytes, if they are complete enough. */
static void try_route(struct client_chan_pend *p, bool deadline)
{
    size_t n = 0;
    const uint8_t *b = mux_chan_peek(p->c, &n);
    struct sni_result r;
    enum sni_res res = sni_parse(b, b != NULL ? n : 0, &r);

    if (res == SNI_AGAIN && !deadline)
        return;                     /* on_pending_data or the deadline */
    if (res == SNI_OK) {
        p->ep = client_chan_route_for(p->s, r.name, r.name_len);
        p->routed = p->ep != &p->s->endpoint;
    }
    start_connect(p, p->ep != NULL ? p->ep : &p->s->endpoint);
}

static void timer_cb(struct timer *t)
{
    struct client_chan_pend *p = caa_container_of(t, struct client_chan_pend, timer);

    if (p->ep == NULL) {            /* no complete ClientHello in time */
        try_route(p, true);
        return;
    }
    if (p->connecting) {
        p->timed_out = true;
        eng_cancel(&p->op);
    }
}

void client_chan_on_new(struct client_chan_set *s, struct mux_chan *c,
                        const struct net_addr *caller)
{
    struct client_chan_pend *p;

    if (s->metrics != NULL) {
        metrics_inc(s->metrics, 0, METRIC_CHANNELS_OPENED, 1);
        metrics_gauge_add(s->metrics, 0, METRIC_CHANNELS_OPEN, 1);
    }
    if (!acl_allows(s->acl, caller)) {
        char cb[ADDR_STRLEN], id[17];

        s->st.refused++;
        if (s->metrics != NULL)
            metrics_inc(s->metrics, 0, METRIC_CLIENT_ACL_REFUSED, 1);
        log_ratelimited(&s->rl_refused, LOG_INFO, "channel refused", "chan", chan_hex(c, id),
                        "caller", addr_ntop(caller, cb, sizeof(cb)), "reason", "acl", NULL);
        mux_chan_close(c, MUX_R_REFUSED);
        return;
    }
    if ((p = calloc(1, sizeof(*p))) == NULL) {
        mux_chan_close(c, MUX_R_LOCAL_ERROR);
        return;
    }
    p->s = s;
    p->c = c;
    p->caller = *caller;
    p->fd = -1;
    eng_op_init(&p->op, connect_cb);
    timer_init(&p->timer, timer_cb);
    cds_list_add_tail(&p->link, &s->pending);
    s->npending++;
    mux_chan_set_udata(c, p);
    if (s->nroutes == 0) {
        start_connect(p, &s->endpoint);
        return;
    }
    eng_timer_add(s->eng, &p->timer, s->timeout_ms);
    try_route(p, false);
}

void client_chan_on_pending_data(struct client_chan_set *s, struct mux_chan *c)
{
    struct client_chan_pend *p = mux_chan_udata(c);

    (void)s;
    if (p != NULL && p->ep == NULL)
        try_route(p, false);
}

/* Forget the mux channel; free now, or when the connect calls back. */
static void orphan(struct client_chan_pend *p)
{
    if (p->c == NULL)
        return;
    mux_chan_set_udata(p->c, NULL);
    p->c = NULL;
    p->s->st.cancelled++;
    if (p->connecting) {
        eng_timer_del(p->s->eng, &p->timer);
        eng_cancel(&p->op);
        return;
    }
    pend_free(p);
}

/* mux_reason -> the channel_closes_total label (core/metrics.h). */
void client_chan_on_closed(struct client_chan_set *s, struct mux_chan *c, enum mux_reason why)
{
    struct client_chan_pend *p = mux_chan_udata(c);

    if (s->metrics != NULL) {
        metrics_gauge_add(s->metrics, 0, METRIC_CHANNELS_OPEN, -1);
        metrics_inc_reason(s->metrics, 0, METRIC_CHANNEL_CLOSES, metrics_channel_close_label(why), 1);
    }
    if (p != NULL)
        orphan(p);
}

void client_chan_tunnel_down(struct client_chan_set *s)
{
    struct client_chan_pend *p, *tmp;

    cds_list_for_each_entry_safe(p, tmp, &s->pending, link)
        orphan(p);
}
