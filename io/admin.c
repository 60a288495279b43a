/* io/admin.c - the admin HTTP listener on libmicrohttpd; see io/admin.h. */
#include "io/admin.h"

#include <microhttpd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/log.h"

#define ADMIN_MAX_CONNS 16
#define ADMIN_TIMEOUT_S 10

struct admin {
    struct MHD_Daemon *d;
    struct admin_cb cb;
    unsigned port;
    /* The first libmicrohttpd message while MHD_start_daemon() runs,
     * for admin_start()'s error. `capture` is read from MHD's thread. */
    bool capture;
    bool captured;
    char start_err[256];
};

/* MHD_OPTION_EXTERNAL_LOGGER: the first message during start-up becomes
 * admin_start()'s error text; every other one goes to the log. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    struct admin *a = cls;
    char msg[256];
    size_t n;

    vsnprintf(msg, sizeof(msg), fmt, ap);
    n = strlen(msg);
    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        msg[--n] = '\0';
    if (__atomic_load_n(&a->capture, __ATOMIC_ACQUIRE) &&
        !__atomic_exchange_n(&a->captured, true, __ATOMIC_ACQ_REL)) {
        snprintf(a->start_err, sizeof(a->start_err), "%s", msg);
        return;   /* admin_start() reports it; the caller logs that once */
    }
    log_msg(LOG_WARN, "admin listener", "error", msg, NULL);
}

/* Queue a response; body is copied unless it is a static string. */
static enum MHD_Result reply(struct MHD_Connection *c, unsigned status, const char *type,
                             const char *body, size_t len, bool copy)
{
    struct MHD_Response *r;
    enum MHD_Result ret;

    r = MHD_create_response_from_buffer(len, (void *)body,
                                        copy ? MHD_RESPMEM_MUST_COPY : MHD_RESPMEM_PERSISTENT);
    if (r == NULL)
        return MHD_NO;
    if (MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, type) != MHD_YES ||
        (status == MHD_HTTP_METHOD_NOT_ALLOWED &&
         MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD") != MHD_YES)) {
        MHD_destroy_response(r);
        return MHD_NO;
    }
    ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result reply_text(struct MHD_Connection *c, unsigned status, const char *s)
{
    return reply(c, status, "text/plain; charset=utf-8", s, strlen(s), false);
}

static enum MHD_Result serve_metrics(struct admin *a, struct MHD_Connection *c)
{
    char *body = NULL;
    size_t len = 0;
    enum MHD_Result ret;

    if (a->cb.render == NULL)
        return reply_text(c, MHD_HTTP_NOT_FOUND, "not found\n");
    if (a->cb.render(a->cb.ctx, &body, &len) != 0) {
        free(body);
        return reply_text(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "metrics unavailable\n");
    }
    ret = reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8",
                body != NULL ? body : "", body != NULL ? len : 0, true);
    free(body);
    return ret;
}

/* MHD's access handler: called once per request before any body is read
 * (we answer then: no route takes a body), so *req_cls is never used. */
static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url,
                              const char *method, const char *version, const char *upload,
                              size_t *upload_len, void **req_cls)
{
    struct admin *a = cls;

    if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 && strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
        return reply_text(c, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n");
    if (strcmp(url, "/metrics") == 0)
        return serve_metrics(a, c);
    if (strcmp(url, "/healthz") == 0)
        return reply_text(c, MHD_HTTP_OK, "ok\n");
    if (strcmp(url, "/readyz") == 0) {
        if (a->cb.ready == NULL || a->cb.ready(a->cb.ctx))
            return reply_text(c, MHD_HTTP_OK, "ready\n");
        return reply_text(c, MHD_HTTP_SERVICE_UNAVAILABLE, "not ready\n");
    }
    return reply_text(c, MHD_HTTP_NOT_FOUND, "not found\n");
}

static void set_err(char *err, size_t errlen, const struct net_addr *listen, const char *why)
{
    char where[ADDR_STRLEN];

    if (errlen > 0)
        snprintf(err, errlen, "admin listener on %s: %s",
                 addr_format(listen, where, sizeof(where)), why);
}

struct admin *admin_start(const struct net_addr *listen, const struct admin_cb *cb,
                          char *err, size_t errlen)
{
    struct sockaddr_storage ss;
    const union MHD_DaemonInfo *info;
    struct admin *a;
    unsigned flags = MHD_USE_AUTO_INTERNAL_THREAD | MHD_USE_ERROR_LOG;

    if (addr_to_sockaddr(listen, &ss) == 0) {
        set_err(err, errlen, listen, "no IPv4 or IPv6 address given");
        return NULL;
    }
    if ((a = calloc(1, sizeof(*a))) == NULL) {
        set_err(err, errlen, listen, "out of memory");
        return NULL;
    }
    a->cb = *cb;
    if (listen->family == AF_INET6)
        flags |= MHD_USE_IPv6;   /* without MHD_USE_DUAL_STACK: v6 only */
    a->capture = true;
    a->d = MHD_start_daemon(flags, listen->port, NULL, NULL, handle, a,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, a,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)ADMIN_MAX_CONNS,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)ADMIN_TIMEOUT_S,
                            MHD_OPTION_END);
    __atomic_store_n(&a->capture, false, __ATOMIC_RELEASE);
    if (a->d == NULL) {
        set_err(err, errlen, listen,
                __atomic_load_n(&a->captured, __ATOMIC_ACQUIRE)
                    ? a->start_err
                    : "libmicrohttpd could not start (address in use or not local?)");
        free(a);
        return NULL;
    }
    info = MHD_get_daemon_info(a->d, MHD_DAEMON_INFO_BIND_PORT);
    a->port = info != NULL ? info->port : listen->port;
    return a;
}

void admin_stop(struct admin *a)
{
    if (a == NULL)
        return;
    MHD_stop_daemon(a->d);
    free(a);
}

unsigned admin_port(const struct admin *a)
{
    return a->port;
}

bool admin_addr_is_loopback(const struct net_addr *a)
{
    static const uint8_t v6_loop[16] = { [15] = 1 };
    static const uint8_t v4_mapped[12] = { [10] = 0xff, [11] = 0xff };

    if (a->family == AF_INET)
        return a->ip[0] == 127;
    if (a->family == AF_INET6)
        return memcmp(a->ip, v6_loop, 16) == 0 ||
               (memcmp(a->ip, v4_mapped, 12) == 0 && a->ip[12] == 127);
    return false;
}
