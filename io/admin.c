/* io/admin.c - the admin HTTP listener on libmicrohttpd; see io/admin.h.
 *
 * Keeping the probes answered (io/admin.h "Connection limits"): three
 * layers, each closing a hole the one before leaves open.
 *
 *   MHD_OPTION_PER_IP_CONNECTION_LIMIT  one source holds at most
 *       ADMIN_PER_IP of the ADMIN_MAX_CONNS slots; MHD accepts and closes
 *       the excess at once (and says so through the logger: counted);
 *   MHD_OPTION_CONNECTION_TIMEOUT  an idle connection goes after
 *       ADMIN_TIMEOUT_S; but any byte restarts that clock, so a client
 *       trickling a header keeps its slot forever;
 *   the reaper thread  every connection goes ADMIN_DEADLINE_MS after its
 *       accept, whatever it sends (nginx's client_header_timeout, Go's
 *       ReadHeaderTimeout): shutdown(2) on its socket, MHD sees the EOF
 *       and closes it. The deadline is a little shorter than the idle
 *       timeout, so that every connection still open then is cut (and
 *       counted) here; the idle timeout stays as the backstop for one the
 *       reaper could not list. A probe therefore waits at most about
 *       ADMIN_DEADLINE_MS for a slot, even when every slot is taken (MHD
 *       then stops accepting and the probe waits in the kernel backlog).
 *
 * Why shutdown() from another thread is safe: the reaper only touches
 * sockets of its list, under `mu`; MHD's CLOSED notification removes the
 * entry under `mu` before MHD closes the fd, so a listed fd is always the
 * connection's own, never a reused number.
 */
#include "io/admin.h"

#include <errno.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <urcu/list.h>

#include "core/log.h"
#include "io/timer.h"

#define ADMIN_MAX_CONNS 64
#define ADMIN_PER_IP 8
#define ADMIN_TIMEOUT_S 3      /* MHD's idle timeout: the backstop */
#define ADMIN_DEADLINE_MS 2500 /* reaper: accept to close, before the idle timeout */
#define ADMIN_REAP_MS 100      /* reaper period: the deadline's precision */
#define ADMIN_LOG_BURST 5      /* libmicrohttpd lines per second */

/* libmicrohttpd's message when it refuses a connection at either limit
 * (global or per IP; the same text for both in 0.9.x and 1.0.x). */
#define MHD_LIMIT_MSG "Server reached connection limit"

/* One accepted connection, from MHD's STARTED to its CLOSED notification. */
struct admin_conn {
    struct cds_list_head link;   /* in admin.conns, under admin.mu */
    int fd;
    uint64_t born_ms;            /* timer_clock_ms() at accept */
    bool cut;                    /* shut down by the reaper */
};

struct admin {
    struct MHD_Daemon *d;
    struct admin_cb cb;
    unsigned port;
    /* The first libmicrohttpd message while MHD_start_daemon() runs,
     * for admin_start()'s error. `capture` is read from MHD's thread. */
    bool capture;
    bool captured;
    char start_err[256];
    /* the reaper: conns, stop and the thread under mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct cds_list_head conns;
    bool stop;
    bool reaper_up;
    pthread_t reaper;
    struct log_rl rl;            /* libmicrohttpd's lines once running */
};

/* Count a drop through the caller's hook (MHD's thread only). */
static void dropped(struct admin *a, enum admin_drop why)
{
    if (a->cb.dropped != NULL)
        a->cb.dropped(a->cb.ctx, why);
}

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
    /* Once running, MHD speaks about what peers do (and a peer can make it
     * speak at will): rate-limited lines. The only hook MHD gives for a
     * refused connection is its message: counted here. */
    if (strncmp(msg, MHD_LIMIT_MSG, strlen(MHD_LIMIT_MSG)) == 0) {
        dropped(a, ADMIN_DROP_LIMIT);
        log_ratelimited(&a->rl, LOG_WARN, "admin connection refused: connection limit",
                        "max", LOG_U64(ADMIN_MAX_CONNS), "per_ip", LOG_U64(ADMIN_PER_IP), NULL);
        return;
    }
    log_ratelimited(&a->rl, LOG_WARN, "admin listener", "error", msg, NULL);
}

/* ---- the reaper ------------------------------------------------------------ */

/* MHD_OPTION_NOTIFY_CONNECTION, on MHD's thread: list the connection at
 * STARTED, unlist it at CLOSED (before MHD closes its fd). A connection
 * that could not be listed (no memory) still has the idle timeout. */
static void on_conn(void *cls, struct MHD_Connection *c, void **sock_ctx,
                    enum MHD_ConnectionNotificationCode code)
{
    struct admin *a = cls;
    struct admin_conn *ac;
    const union MHD_ConnectionInfo *ci;
    bool cut;

    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (ci == NULL || (ac = calloc(1, sizeof(*ac))) == NULL)
            return;
        ac->fd = ci->connect_fd;
        ac->born_ms = timer_clock_ms();
        pthread_mutex_lock(&a->mu);
        cds_list_add_tail(&ac->link, &a->conns);
        pthread_mutex_unlock(&a->mu);
        *sock_ctx = ac;
        return;
    }
    ac = *sock_ctx;
    if (code != MHD_CONNECTION_NOTIFY_CLOSED || ac == NULL)
        return;
    *sock_ctx = NULL;
    pthread_mutex_lock(&a->mu);
    cds_list_del(&ac->link);
    cut = ac->cut;
    pthread_mutex_unlock(&a->mu);
    free(ac);
    if (cut)
        dropped(a, ADMIN_DROP_DEADLINE);
}

/* Shut down every listed connection older than the deadline. Under mu. */
static void reap(struct admin *a, uint64_t now)
{
    struct admin_conn *ac;

    cds_list_for_each_entry(ac, &a->conns, link) {
        if (ac->cut || now - ac->born_ms < ADMIN_DEADLINE_MS)
            continue;
        ac->cut = true;
        /* MHD sees EOF (or an error) and closes it on its own thread */
        shutdown(ac->fd, SHUT_RDWR);
    }
}

static void *reaper_main(void *arg)
{
    struct admin *a = arg;
    struct timespec ts;

    pthread_mutex_lock(&a->mu);
    while (!a->stop) {
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += ADMIN_REAP_MS * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&a->cv, &a->mu, &ts);
        if (!a->stop)
            reap(a, timer_clock_ms());
    }
    pthread_mutex_unlock(&a->mu);
    return NULL;
}

/* The reaper's mutex, condition (on CLOCK_MONOTONIC) and thread. */
static int reaper_start(struct admin *a)
{
    pthread_condattr_t ca;
    int rc;

    CDS_INIT_LIST_HEAD(&a->conns);
    pthread_mutex_init(&a->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->cv, &ca);
    pthread_condattr_destroy(&ca);
    rc = pthread_create(&a->reaper, NULL, reaper_main, a);
    a->reaper_up = rc == 0;
    return rc == 0 ? 0 : -rc;
}

static void reaper_stop(struct admin *a)
{
    if (a->reaper_up) {
        pthread_mutex_lock(&a->mu);
        a->stop = true;
        pthread_cond_signal(&a->cv);
        pthread_mutex_unlock(&a->mu);
        pthread_join(a->reaper, NULL);
        a->reaper_up = false;
    }
}

/* After MHD_stop_daemon (every CLOSED delivered, so the list is empty) or
 * when the daemon never started. */
static void admin_free(struct admin *a)
{
    reaper_stop(a);
    pthread_cond_destroy(&a->cv);
    pthread_mutex_destroy(&a->mu);
    pthread_mutex_destroy(&a->rl.lock);
    free(a);
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
    int rc;

    if (addr_to_sockaddr(listen, &ss) == 0) {
        set_err(err, errlen, listen, "no IPv4 or IPv6 address given");
        return NULL;
    }
    if ((a = calloc(1, sizeof(*a))) == NULL) {
        set_err(err, errlen, listen, "out of memory");
        return NULL;
    }
    a->cb = *cb;
    log_rl_init(&a->rl, ADMIN_LOG_BURST);
    if ((rc = reaper_start(a)) != 0) {
        set_err(err, errlen, listen, strerror(-rc));
        admin_free(a);
        return NULL;
    }
    if (listen->family == AF_INET6)
        flags |= MHD_USE_IPv6;   /* without MHD_USE_DUAL_STACK: v6 only */
    a->capture = true;
    a->d = MHD_start_daemon(flags, listen->port, NULL, NULL, handle, a,
                            MHD_OPTION_EXTERNAL_LOGGER, mhd_log, a,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)ADMIN_MAX_CONNS,
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)ADMIN_PER_IP,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)ADMIN_TIMEOUT_S,
                            MHD_OPTION_NOTIFY_CONNECTION, on_conn, a,
                            MHD_OPTION_END);
    __atomic_store_n(&a->capture, false, __ATOMIC_RELEASE);
    if (a->d == NULL) {
        set_err(err, errlen, listen,
                __atomic_load_n(&a->captured, __ATOMIC_ACQUIRE)
                    ? a->start_err
                    : "libmicrohttpd could not start (address in use or not local?)");
        admin_free(a);
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
    /* reaper first: it must not shut down sockets MHD is closing */
    reaper_stop(a);
    MHD_stop_daemon(a->d);
    admin_free(a);
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
