/* tests/unit/test_admin.c - io/admin on loopback: every route, status,
 * content type and body, the start-up errors, the loopback check, and the
 * connection limits: idle or trickling clients (32 idle from one address,
 * 64 from eight, one sending a byte every 200 ms) never keep /healthz and
 * /metrics from answering for longer than the 2.5 s deadline (+ 1 s of
 * slack), and every refused or cut connection is reported exactly once.
 *
 * The client is a plain blocking socket sending one HTTP/1.1 request with
 * "Connection: close" and reading to EOF, so the test sees the exact bytes
 * libmicrohttpd sent.
 */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "io/admin.h"
#include "io/timer.h"

/* ---- a minimal HTTP client ---------------------------------------------- */

struct resp {
    int status;
    char head[2048];   /* status line and headers, CRLFs kept */
    char *body;        /* into raw */
    size_t body_len;
    char raw[16384];
};

static void http(const struct net_addr *to, const char *request, struct resp *r)
{
    struct sockaddr_storage ss;
    socklen_t sl = addr_to_sockaddr(to, &ss);
    struct timeval tv = { .tv_sec = 5 };
    int fd = socket(ss.ss_family, SOCK_STREAM, 0);
    size_t n = 0;
    ssize_t k;

    cr_assert(fd >= 0);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    cr_assert_eq(connect(fd, (struct sockaddr *)&ss, sl), 0);
    cr_assert_eq(send(fd, request, strlen(request), MSG_NOSIGNAL), (ssize_t)strlen(request));
    while ((k = recv(fd, r->raw + n, sizeof(r->raw) - 1 - n, 0)) > 0)
        n += (size_t)k;
    cr_assert_eq(k, 0, "read until EOF");
    close(fd);
    r->raw[n] = '\0';

    char *end = strstr(r->raw, "\r\n\r\n");
    cr_assert_not_null(end, "no header end in: %s", r->raw);
    cr_assert_lt((size_t)(end - r->raw), sizeof(r->head));
    memcpy(r->head, r->raw, (size_t)(end - r->raw) + 2);
    r->head[end - r->raw + 2] = '\0';
    r->body = end + 4;
    r->body_len = n - (size_t)(r->body - r->raw);
    cr_assert_eq(sscanf(r->raw, "HTTP/1.%*d %d ", &r->status), 1, "%s", r->raw);
}

static void get(const struct net_addr *to, const char *method, const char *path,
                struct resp *r)
{
    char req[256];
    snprintf(req, sizeof(req), "%s %s HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
             method, path);
    http(to, req, r);
}

/* Value of header `name` (case-insensitive), or NULL. Static buffer. */
static const char *header(const struct resp *r, const char *name)
{
    static char val[256];
    size_t nl = strlen(name);

    for (const char *p = strstr(r->head, "\r\n"); p != NULL && p[2] != '\0';
         p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (strncasecmp(line, name, nl) == 0 && line[nl] == ':') {
            const char *v = line + nl + 1, *e = strstr(v, "\r\n");
            while (*v == ' ')
                v++;
            snprintf(val, sizeof(val), "%.*s", (int)(e - v), v);
            return val;
        }
    }
    return NULL;
}

static void assert_reply(const struct resp *r, int status, const char *type, const char *body)
{
    cr_assert_eq(r->status, status, "%s", r->raw);
    if (type != NULL) {
        cr_assert_not_null(header(r, "Content-Type"), "%s", r->head);
        cr_assert_str_eq(header(r, "Content-Type"), type);
    }
    cr_assert_eq(r->body_len, strlen(body), "%s", r->raw);
    cr_assert_eq(memcmp(r->body, body, r->body_len), 0, "%s", r->raw);
}

/* ---- fixture -------------------------------------------------------------- */

struct state {
    bool ready;
    int render_calls;
    bool render_fails;
};

static const char metrics_body[] =
    "# HELP snitun_x A test metric.\n# TYPE snitun_x counter\nsnitun_x 1\n";

static int render_cb(void *ctx, char **out, size_t *len)
{
    struct state *s = ctx;
    __atomic_add_fetch(&s->render_calls, 1, __ATOMIC_RELAXED);
    if (__atomic_load_n(&s->render_fails, __ATOMIC_RELAXED)) {
        *out = strdup("partial");   /* admin must free it anyway */
        return -1;
    }
    *out = strdup(metrics_body);
    *len = strlen(metrics_body);
    return 0;
}

static bool ready_cb(void *ctx)
{
    struct state *s = ctx;
    return __atomic_load_n(&s->ready, __ATOMIC_RELAXED);
}

static struct net_addr loop4(unsigned port)
{
    struct net_addr a = { .family = AF_INET, .port = (uint16_t)port };
    a.ip[0] = 127;
    a.ip[3] = 1;
    return a;
}

static struct admin *start(struct state *s, struct net_addr *bound)
{
    struct admin_cb cb = { .render = render_cb, .ready = ready_cb, .ctx = s };
    struct net_addr a = loop4(0);
    char err[256] = "";
    struct admin *ad = admin_start(&a, &cb, err, sizeof(err));

    cr_assert_not_null(ad, "admin_start: %s", err);
    cr_assert_neq(admin_port(ad), 0);
    *bound = loop4(admin_port(ad));
    return ad;
}

#define TEXT "text/plain; charset=utf-8"
#define PROM "text/plain; version=0.0.4; charset=utf-8"

/* ---- routes --------------------------------------------------------------- */

Test(admin, routes)
{
    struct state s = { .ready = true };
    struct net_addr to;
    struct admin *ad = start(&s, &to);
    struct resp r;

    get(&to, "GET", "/metrics", &r);
    assert_reply(&r, 200, PROM, metrics_body);
    cr_assert_eq(atoi(header(&r, "Content-Length")), (int)strlen(metrics_body));
    cr_assert_eq(__atomic_load_n(&s.render_calls, __ATOMIC_RELAXED), 1);

    get(&to, "GET", "/healthz", &r);
    assert_reply(&r, 200, TEXT, "ok\n");
    get(&to, "GET", "/healthz?probe=1", &r);
    assert_reply(&r, 200, TEXT, "ok\n");

    get(&to, "GET", "/readyz", &r);
    assert_reply(&r, 200, TEXT, "ready\n");
    __atomic_store_n(&s.ready, false, __ATOMIC_RELAXED);
    get(&to, "GET", "/readyz", &r);
    assert_reply(&r, 503, TEXT, "not ready\n");

    get(&to, "GET", "/", &r);
    assert_reply(&r, 404, TEXT, "not found\n");
    get(&to, "GET", "/metrics/", &r);
    assert_reply(&r, 404, TEXT, "not found\n");
    get(&to, "GET", "/healthzz", &r);
    assert_reply(&r, 404, TEXT, "not found\n");

    admin_stop(ad);
}

Test(admin, methods)
{
    struct state s = { .ready = true };
    struct net_addr to;
    struct admin *ad = start(&s, &to);
    struct resp r;

    const char *refused[] = { "POST", "PUT", "DELETE", "OPTIONS" };
    for (size_t i = 0; i < 4; i++) {
        get(&to, refused[i], "/metrics", &r);
        assert_reply(&r, 405, TEXT, "method not allowed\n");
        cr_assert_str_eq(header(&r, "Allow"), "GET, HEAD");
    }
    /* a POST with a body is refused the same way */
    http(&to, "POST /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              "Content-Length: 5\r\n\r\nhello", &r);
    cr_assert_eq(r.status, 405);
    cr_assert_eq(__atomic_load_n(&s.render_calls, __ATOMIC_RELAXED), 0);

    /* HEAD: the GET headers, no body */
    get(&to, "HEAD", "/healthz", &r);
    assert_reply(&r, 200, TEXT, "");
    cr_assert_str_eq(header(&r, "Content-Length"), "3");

    admin_stop(ad);
}

Test(admin, render_failure_is_500)
{
    struct state s = { .ready = true, .render_fails = true };
    struct net_addr to;
    struct admin *ad = start(&s, &to);
    struct resp r;

    get(&to, "GET", "/metrics", &r);
    assert_reply(&r, 500, TEXT, "metrics unavailable\n");
    admin_stop(ad);
}

Test(admin, no_callbacks)
{
    struct admin_cb cb = { 0 };
    struct net_addr a = loop4(0), to;
    char err[256];
    struct admin *ad = admin_start(&a, &cb, err, sizeof(err));
    struct resp r;

    cr_assert_not_null(ad, "%s", err);
    to = loop4(admin_port(ad));
    get(&to, "GET", "/metrics", &r);
    assert_reply(&r, 404, TEXT, "not found\n");
    get(&to, "GET", "/readyz", &r);
    assert_reply(&r, 200, TEXT, "ready\n");
    admin_stop(ad);
    admin_stop(NULL);
}

Test(admin, ipv6_loopback)
{
    struct admin_cb cb = { 0 };
    struct net_addr a = { .family = AF_INET6 }, to;
    char err[256];
    int probe = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 sin6 = { .sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT };
    bool have_v6 = probe >= 0 && bind(probe, (struct sockaddr *)&sin6, sizeof(sin6)) == 0;

    if (probe >= 0)
        close(probe);
    if (!have_v6)
        cr_skip_test("no IPv6 loopback here");
    a.ip[15] = 1;
    struct admin *ad = admin_start(&a, &cb, err, sizeof(err));
    cr_assert_not_null(ad, "%s", err);
    to = a;
    to.port = (uint16_t)admin_port(ad);
    struct resp r;
    get(&to, "GET", "/healthz", &r);
    assert_reply(&r, 200, TEXT, "ok\n");
    admin_stop(ad);
}

/* ---- start-up errors ------------------------------------------------------ */

Test(admin, port_in_use)
{
    struct state s = { .ready = true };
    struct net_addr to;
    struct admin *ad = start(&s, &to);
    struct admin_cb cb = { 0 };
    char err[256] = "", want[64];

    cr_assert_null(admin_start(&to, &cb, err, sizeof(err)));
    snprintf(want, sizeof(want), "admin listener on 127.0.0.1:%u: ", admin_port(ad));
    cr_assert_eq(strncmp(err, want, strlen(want)), 0, "%s", err);
    cr_assert_gt(strlen(err), strlen(want));
    admin_stop(ad);
}

Test(admin, no_address)
{
    struct net_addr none = { 0 };
    struct admin_cb cb = { 0 };
    char err[256] = "";

    cr_assert_null(admin_start(&none, &cb, err, sizeof(err)));
    cr_assert_str_eq(err, "admin listener on -: no IPv4 or IPv6 address given");
    cr_assert_null(admin_start(&none, &cb, NULL, 0));
}

/* ---- loopback check ------------------------------------------------------- */

static struct net_addr ip(const char *text)
{
    struct net_addr a = { 0 };
    if (inet_pton(AF_INET, text, a.ip) == 1)
        a.family = AF_INET;
    else if (inet_pton(AF_INET6, text, a.ip) == 1)
        a.family = AF_INET6;
    else
        cr_assert_fail("bad test address %s", text);
    return a;
}

Test(admin, loopback)
{
    static const struct { const char *ip; bool loop; } t[] = {
        { "127.0.0.1", true },         { "127.255.255.254", true },
        { "127.0.0.0", true },         { "126.255.255.255", false },
        { "128.0.0.1", false },        { "0.0.0.0", false },
        { "10.0.0.1", false },         { "::1", true },
        { "::", false },               { "::2", false },
        { "::ffff:127.0.0.1", true },  { "::ffff:127.9.9.9", true },
        { "::ffff:10.0.0.1", false },  { "::127.0.0.1", false },
        { "2001:db8::1", false },      { "fe80::1", false },
    };
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        struct net_addr a = ip(t[i].ip);
        cr_assert_eq(admin_addr_is_loopback(&a), t[i].loop, "%s", t[i].ip);
    }
    struct net_addr none = { 0 };
    cr_assert_not(admin_addr_is_loopback(&none));
}

/* ---- connection limits ------------------------------------------------------ */

#define DEADLINE_MS 2500   /* io/admin.c ADMIN_DEADLINE_MS */
#define SLACK_MS 1000

struct drops {
    unsigned limit, deadline;
};

static void dropped_cb(void *ctx, enum admin_drop why)
{
    struct drops *d = ctx;

    if (why == ADMIN_DROP_LIMIT)
        __atomic_add_fetch(&d->limit, 1, __ATOMIC_RELAXED);
    else if (why == ADMIN_DROP_DEADLINE)
        __atomic_add_fetch(&d->deadline, 1, __ATOMIC_RELAXED);
    else
        cr_assert_fail("unknown drop reason %d", (int)why);
}

static unsigned drops_of(unsigned *v)
{
    return __atomic_load_n(v, __ATOMIC_RELAXED);
}

/* The reaper shuts a connection down at once (the peer sees EOF) but it is
 * counted when MHD closes it on its own thread, a little later: wait for
 * the count (at most ms) before comparing it. */
static unsigned drops_reach(unsigned *v, unsigned want, int ms)
{
    for (int i = 0; i < ms / 10 && drops_of(v) < want; i++)
        usleep(10 * 1000);
    return drops_of(v);
}

static int render_plain(void *ctx, char **out, size_t *len)
{
    (void)ctx;
    *out = strdup(metrics_body);
    *len = strlen(metrics_body);
    return 0;
}

static struct admin *start_counting(struct drops *d, struct net_addr *bound)
{
    struct admin_cb cb = { .render = render_plain, .dropped = dropped_cb, .ctx = d };
    struct net_addr a = loop4(0);
    char err[256] = "";
    struct admin *ad;

    ad = admin_start(&a, &cb, err, sizeof(err));
    cr_assert_not_null(ad, "admin_start: %s", err);
    *bound = loop4(admin_port(ad));
    return ad;
}

/* A TCP connection to `to` from 127.0.0.<src> (a different source address
 * for the per-IP limit: all of 127/8 is local). */
static int connect_from(unsigned src3, unsigned src4, const struct net_addr *to)
{
    struct sockaddr_in me = { .sin_family = AF_INET };
    struct sockaddr_storage ss;
    socklen_t sl = addr_to_sockaddr(to, &ss);
    int fd = socket(AF_INET, SOCK_STREAM, 0);

    cr_assert(fd >= 0);
    me.sin_addr.s_addr = htonl(0x7f000000u | (src3 << 8) | src4);
    cr_assert_eq(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0, "bind: %s", strerror(errno));
    cr_assert_eq(connect(fd, (struct sockaddr *)&ss, sl), 0, "connect: %s", strerror(errno));
    return fd;
}

/* Whether the server closed fd: EOF or reset, within wait_ms. */
static bool closed_within(int fd, int wait_ms)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    char b;

    if (poll(&p, 1, wait_ms) != 1)
        return false;
    return recv(fd, &b, 1, MSG_DONTWAIT) <= 0;
}

/* One GET with Connection: close from 127.0.<src3>.<src4>; the status, or
 * -1 when the connection was closed without an answer (refused). */
static int try_get(unsigned src3, unsigned src4, const struct net_addr *to, const char *path)
{
    char req[128], buf[4096];
    size_t n = 0;
    ssize_t k;
    int fd = connect_from(src3, src4, to), status = -1;
    struct timeval tv = { .tv_sec = 6 };

    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", path);
    if (send(fd, req, strlen(req), MSG_NOSIGNAL) == (ssize_t)strlen(req)) {
        while (n < sizeof(buf) - 1 && (k = recv(fd, buf + n, sizeof(buf) - 1 - n, 0)) > 0)
            n += (size_t)k;
        buf[n] = '\0';
        if (sscanf(buf, "HTTP/1.%*d %d ", &status) != 1)
            status = -1;
    }
    close(fd);
    return status;
}

/* GET until answered (a refused attempt is retried after 50 ms); the ms
 * it took, or -1 if no answer came within limit_ms. */
static int64_t get_retrying(unsigned src3, unsigned src4, const struct net_addr *to,
                            const char *path, int64_t limit_ms)
{
    uint64_t t0 = timer_clock_ms();

    while ((int64_t)(timer_clock_ms() - t0) < limit_ms) {
        int st = try_get(src3, src4, to, path);
        if (st == 200)
            return (int64_t)(timer_clock_ms() - t0);
        cr_assert_eq(st, -1, "%s answered %d", path, st);
        usleep(50 * 1000);
    }
    return -1;
}

Test(admin, idle_clients_from_one_address)
{
    struct drops d = { 0 };
    struct net_addr to;
    struct admin *ad = start_counting(&d, &to);
    int fds[32], open_n = 0, closed_n = 0;
    int64_t ms;
    uint64_t t0;

    /* 32 idle connections from 127.0.0.1: 8 held, 24 closed at once */
    for (int i = 0; i < 32; i++)
        fds[i] = connect_from(0, 1, &to);
    t0 = timer_clock_ms();
    usleep(300 * 1000);
    for (int i = 0; i < 32; i++) {
        if (closed_within(fds[i], 20))
            closed_n++;
        else
            open_n++;
    }
    cr_assert_eq(open_n, 8, "held: %d, closed: %d", open_n, closed_n);
    cr_assert_eq(closed_n, 24);
    cr_assert_eq(drops_of(&d.limit), 24);

    /* another address: answered at once, both routes */
    ms = get_retrying(0, 2, &to, "/healthz", 1000);
    cr_assert(ms >= 0 && ms < 500, "/healthz from 127.0.0.2 took %lld ms", (long long)ms);
    ms = get_retrying(0, 2, &to, "/metrics", 1000);
    cr_assert(ms >= 0 && ms < 500, "/metrics from 127.0.0.2 took %lld ms", (long long)ms);

    /* the same address: answered once the idle ones hit their deadline */
    ms = get_retrying(0, 1, &to, "/healthz", DEADLINE_MS + SLACK_MS);
    cr_assert(ms >= 0, "/healthz from 127.0.0.1 not answered in %d ms",
              DEADLINE_MS + SLACK_MS);
    cr_assert_leq(timer_clock_ms() - t0, DEADLINE_MS + SLACK_MS);
    for (int i = 0; i < 32; i++) {
        cr_assert(closed_within(fds[i], 500), "connection %d still open", i);
        close(fds[i]);
    }
    cr_assert_eq(drops_reach(&d.deadline, 8, 2000), 8);
    cr_assert_geq(drops_of(&d.limit), 24);   /* + the refused retries */
    admin_stop(ad);
}

Test(admin, every_slot_taken)
{
    struct drops d = { 0 };
    struct net_addr to;
    struct admin *ad = start_counting(&d, &to);
    uint64_t t0 = timer_clock_ms();
    int fds[64];
    int64_t ms;

    /* 64 idle connections, 8 from each of eight addresses: all slots */
    for (int i = 0; i < 64; i++)
        fds[i] = connect_from(1, 1 + (unsigned)i / 8, &to);
    for (int i = 0; i < 64; i++)
        cr_assert_not(closed_within(fds[i], i == 0 ? 300 : 0), "connection %d refused", i);
    cr_assert_eq(drops_of(&d.limit), 0);
    /* a ninth address: waits (or is refused) until slots free up, at the
     * deadline of the first idle ones (counted from before they connected) */
    ms = get_retrying(2, 1, &to, "/metrics", DEADLINE_MS + SLACK_MS);
    cr_assert(ms >= 0, "/metrics not answered in %d ms", DEADLINE_MS + SLACK_MS);
    ms = (int64_t)(timer_clock_ms() - t0);
    cr_assert_geq(ms, DEADLINE_MS - 300, "answered after %lld ms: slots were free?",
                  (long long)ms);
    cr_log_info("ninth address answered after %lld ms (%u attempts refused)", (long long)ms,
                drops_of(&d.limit));
    for (int i = 0; i < 64; i++) {
        cr_assert(closed_within(fds[i], 500), "connection %d still open", i);
        close(fds[i]);
    }
    cr_assert_eq(drops_reach(&d.deadline, 64, 2000), 64);
    admin_stop(ad);
}

Test(admin, trickling_client_cut_at_deadline)
{
    struct drops d = { 0 };
    struct net_addr to;
    struct admin *ad = start_counting(&d, &to);
    int fd = connect_from(0, 3, &to);
    uint64_t t0 = timer_clock_ms(), took;
    const char *req = "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    bool cut = false;

    cr_assert_eq(send(fd, req, strlen(req), MSG_NOSIGNAL), (ssize_t)strlen(req));
    /* a header byte every 200 ms: never idle for the 3 s idle timeout */
    while (!cut && timer_clock_ms() - t0 < DEADLINE_MS + SLACK_MS + 2000) {
        cut = closed_within(fd, 200);
        if (!cut && send(fd, "a", 1, MSG_NOSIGNAL) != 1)
            cut = true;
    }
    took = timer_clock_ms() - t0;
    cr_assert(cut, "still open after %llu ms", (unsigned long long)took);
    cr_assert(took >= DEADLINE_MS - 100 && took <= DEADLINE_MS + SLACK_MS, "cut after %llu ms",
              (unsigned long long)took);
    close(fd);
    usleep(100 * 1000);
    cr_assert_eq(drops_reach(&d.deadline, 1, 2000), 1);
    cr_assert_eq(drops_of(&d.limit), 0);
    admin_stop(ad);
}
