/* tests/unit/test_admin.c - io/admin on loopback: every route, status,
 * content type and body, the start-up errors, and the loopback check.
 *
 * The client is a plain blocking socket sending one HTTP/1.1 request with
 * "Connection: close" and reading to EOF, so the test sees the exact bytes
 * libmicrohttpd sent.
 */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "io/admin.h"

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
