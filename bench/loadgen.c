/* bench/loadgen.c - synthetic load for the benchmark harness (bench/run).
 *
 * One binary, four modes; every client mode prints one JSON object per
 * result line on stdout, messages go to stderr.
 *
 *   loadgen server  --listen ADDR:PORT [--threads N]
 *       the endpoint: sink, source and echo (below), epoll, one loop per
 *       thread on its own SO_REUSEPORT socket. Runs until killed.
 *   loadgen stream  --connect ADDR:PORT --sni NAME --bytes N
 *                   [--conns K] [--dir up|down]
 *       K connections move N bytes in total: up = device side writes and
 *       the endpoint sinks; down = the endpoint writes and the device side
 *       reads. Result: bytes, seconds, GiB/s.
 *   loadgen rate    --connect ADDR:PORT --sni NAME --workers C --seconds S
 *                   [--size B]
 *       C workers open a connection, send B bytes, read the B echoed bytes,
 *       close, again, for S seconds. Result: channels/s and the open latency
 *       (connect() start to the first echoed byte) percentiles.
 *   loadgen tunnels --connect ADDR:PORT (--fernet-key KEY --count N
 *                   | --tokens FILE) [--channels M --sni-connect ADDR:PORT]
 *                   [--window W]
 *       N tunnels of their own (token, challenge, then a PING answered by
 *       a PONG = registered), held idle; then, after a line on stdin, M
 *       device connections per tunnel whose NEW frames are counted and
 *       left open. Holds everything until stdin reaches EOF. Tokens are
 *       issued in-process with token_issue(), the function behind
 *       `snitun token issue`, or read from FILE (one JSON object of that
 *       command per line). Hostnames are distinct (t00000.idle.bench...):
 *       a second tunnel for a name would replace the first.
 *
 * A test connection looks the same on every path (direct, HAProxy, snitun),
 * so the endpoint never knows which one carried it:
 *
 *   ClientHello record | command (16 bytes) | payload
 *   command = "SNTB" | op (1) | 00 00 00 | N (8 bytes, big-endian)
 *   op 1 sink:   endpoint reads N payload bytes, then writes one byte (ack)
 *   op 2 source: endpoint writes N bytes
 *   op 3 echo:   endpoint writes back the N payload bytes it reads
 *
 * The ClientHello is a real one (OpenSSL 3, TLS 1.3, the bytes of
 * tests/data/clienthello/openssl_tls13_sni.bin) with the server_name
 * extension rebuilt for the wanted name and the lengths fixed.
 *
 * A benchmark tool, not product code: worker threads with blocking sockets
 * where that is the simplest honest load (a few bulk streams, C
 * request/response workers); the endpoint and the tunnel holder are epoll
 * loops because they carry many sockets.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "core/addr.h"
#include "core/challenge.h"
#include "core/frame.h"
#include "core/token.h"
#include "crypto/fernet.h"
#include "crypto/rand.h"
#include "crypto/tcipher.h"

#define LG_BUF (256u * 1024u)
#define LG_CMD_LEN 16
#define LG_HELLO_MAX 1024
#define LG_MAX_EVENTS 256

enum lg_op {
    LG_OP_SINK = 1,
    LG_OP_SOURCE = 2,
    LG_OP_ECHO = 3,
};

/* ---- common ------------------------------------------------------------- */

static double lg_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

__attribute__((format(printf, 1, 2), noreturn))
static void lg_die(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "loadgen: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    exit(1);
}

static void *lg_xmalloc(size_t n)
{
    void *p = malloc(n);

    if (p == NULL)
        lg_die("out of memory (%zu bytes)", n);
    return p;
}

static void lg_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
    struct net_addr a;
    const char *why = NULL;

    if (addr_parse(s, &a, &why) != 0)
        lg_die("bad address '%s': %s", s, why);
    *len = addr_to_sockaddr(&a, ss);
}

static void lg_nofile_max(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static void lg_nodelay(int fd)
{
    int one = 1;

    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

/* Write all of buf on a blocking socket. 0, or -1 on error. */
static int lg_write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;

    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* ---- ClientHello -------------------------------------------------------- */

/* tests/data/clienthello/openssl_tls13_sni.bin (SNI myname.ui.nabu.casa). */
static const uint8_t lg_hello_tmpl[] = {
    0x16, 0x03, 0x01, 0x00, 0xf8, 0x01, 0x00, 0x00, 0xf4, 0x03, 0x03, 0x9f,
    0x5b, 0x10, 0xe6, 0x72, 0x6e, 0xf0, 0x02, 0x5c, 0x2b, 0xe9, 0x39, 0x49,
    0x87, 0xa8, 0x56, 0x5b, 0x0d, 0xf1, 0xcc, 0x2e, 0xf2, 0xc6, 0xf7, 0x8f,
    0x3a, 0x89, 0xcf, 0xae, 0x49, 0xe7, 0xff, 0x20, 0xcd, 0xbf, 0xe7, 0x29,
    0x0a, 0x62, 0x69, 0x5f, 0xb3, 0x4b, 0xbb, 0x84, 0x33, 0xe8, 0x70, 0x50,
    0x07, 0xee, 0x66, 0xad, 0x53, 0xf3, 0xd1, 0xd5, 0x10, 0x5d, 0x1c, 0x81,
    0x42, 0x4a, 0x01, 0xe8, 0x00, 0x08, 0x13, 0x02, 0x13, 0x03, 0x13, 0x01,
    0x00, 0xff, 0x01, 0x00, 0x00, 0xa3, 0x00, 0x00, 0x00, 0x18, 0x00, 0x16,
    0x00, 0x00, 0x13, 0x6d, 0x79, 0x6e, 0x61, 0x6d, 0x65, 0x2e, 0x75, 0x69,
    0x2e, 0x6e, 0x61, 0x62, 0x75, 0x2e, 0x63, 0x61, 0x73, 0x61, 0x00, 0x0b,
    0x00, 0x04, 0x03, 0x00, 0x01, 0x02, 0x00, 0x0a, 0x00, 0x16, 0x00, 0x14,
    0x00, 0x1d, 0x00, 0x17, 0x00, 0x1e, 0x00, 0x19, 0x00, 0x18, 0x01, 0x00,
    0x01, 0x01, 0x01, 0x02, 0x01, 0x03, 0x01, 0x04, 0x00, 0x23, 0x00, 0x00,
    0x00, 0x16, 0x00, 0x00, 0x00, 0x17, 0x00, 0x00, 0x00, 0x0d, 0x00, 0x1e,
    0x00, 0x1c, 0x04, 0x03, 0x05, 0x03, 0x06, 0x03, 0x08, 0x07, 0x08, 0x08,
    0x08, 0x09, 0x08, 0x0a, 0x08, 0x0b, 0x08, 0x04, 0x08, 0x05, 0x08, 0x06,
    0x04, 0x01, 0x05, 0x01, 0x06, 0x01, 0x00, 0x2b, 0x00, 0x03, 0x02, 0x03,
    0x04, 0x00, 0x2d, 0x00, 0x02, 0x01, 0x01, 0x00, 0x33, 0x00, 0x26, 0x00,
    0x24, 0x00, 0x1d, 0x00, 0x20, 0x0e, 0x27, 0x1a, 0x2e, 0x37, 0xe0, 0xb2,
    0x03, 0xbc, 0x0f, 0xda, 0x57, 0x95, 0x32, 0x3a, 0xf8, 0x7c, 0xaa, 0xb2,
    0xbc, 0x9e, 0x61, 0xe0, 0x92, 0x05, 0x9a, 0x93, 0xf0, 0x0f, 0xad, 0xc0,
    0x21,
};

static void lg_put16(uint8_t *p, size_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static size_t lg_get16(const uint8_t *p)
{
    return (size_t)p[0] << 8 | p[1];
}

/* The template with its server_name extension replaced by one for name
 * (put first, as OpenSSL does). Returns the record's length in out
 * (LG_HELLO_MAX bytes). The template is trusted data: walked, not
 * validated. */
static size_t lg_hello(const char *name, uint8_t *out)
{
    const uint8_t *t = lg_hello_tmpl;
    size_t nlen = strlen(name), p = 9 + 2 + 32, ext_at, ext_end, o, ext_start;

    if (nlen == 0 || nlen > 255)
        lg_die("SNI name must be 1..255 bytes");
    p += 1 + t[p];                      /* session id */
    p += 2 + lg_get16(t + p);           /* cipher suites */
    p += 1 + t[p];                      /* compression */
    ext_at = p;                         /* extensions length */
    ext_end = ext_at + 2 + lg_get16(t + ext_at);
    memcpy(out, t, ext_at);
    o = ext_at + 2;
    ext_start = o;
    /* server_name: type 0, len, list len, name type 0, name len, name */
    lg_put16(out + o, 0);
    lg_put16(out + o + 2, nlen + 5);
    lg_put16(out + o + 4, nlen + 3);
    out[o + 6] = 0;
    lg_put16(out + o + 7, nlen);
    memcpy(out + o + 9, name, nlen);
    o += 9 + nlen;
    for (p = ext_at + 2; p + 4 <= ext_end;) {
        size_t type = lg_get16(t + p), len = lg_get16(t + p + 2);

        if (type != 0) {
            memcpy(out + o, t + p, 4 + len);
            o += 4 + len;
        }
        p += 4 + len;
    }
    lg_put16(out + ext_at, o - ext_start);
    lg_put16(out + 3, o - 5);                                /* record */
    out[6] = 0;
    lg_put16(out + 7, o - 9);                                /* handshake */
    return o;
}

static void lg_cmd(uint8_t *out, enum lg_op op, uint64_t n)
{
    memcpy(out, "SNTB", 4);
    out[4] = (uint8_t)op;
    out[5] = out[6] = out[7] = 0;
    for (int i = 0; i < 8; i++)
        out[8 + i] = (uint8_t)(n >> (56 - 8 * i));
}

/* ---- server: sink / source / echo --------------------------------------- */

enum srv_phase {
    SRV_REC = 1,      /* collecting the 5-byte record header */
    SRV_SKIP = 2,     /* skipping the ClientHello body */
    SRV_CMD = 3,      /* collecting the 16-byte command */
    SRV_SINK = 4,
    SRV_SOURCE = 5,
    SRV_ECHO = 6,
    SRV_DONE = 7,     /* discard until EOF */
};

struct srv_conn {
    int fd;           /* -1: the listener entry */
    enum srv_phase phase;
    uint8_t hdr[LG_CMD_LEN];
    size_t have;
    uint64_t skip;
    uint64_t left;
    uint8_t *pend;    /* echo bytes the socket did not take yet */
    size_t pend_len;
    size_t pend_off;
    bool want_out;
};

struct srv_thread {
    struct sockaddr_storage ss;
    socklen_t sl;
    int ep;
    uint8_t *buf;
};

static void srv_arm(struct srv_thread *t, struct srv_conn *c, bool out)
{
    struct epoll_event ev = { .events = out ? EPOLLOUT : EPOLLIN, .data.ptr = c };

    if (c->want_out == out)
        return;
    c->want_out = out;
    epoll_ctl(t->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void srv_close(struct srv_thread *t, struct srv_conn *c)
{
    epoll_ctl(t->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pend);
    free(c);
}

/* Collect up to want bytes of header into c->hdr. True when complete. */
static bool srv_collect(struct srv_conn *c, size_t want, const uint8_t **p, size_t *n)
{
    size_t k = want - c->have < *n ? want - c->have : *n;

    memcpy(c->hdr + c->have, *p, k);
    c->have += k;
    *p += k;
    *n -= k;
    return c->have == want;
}

static int srv_start(struct srv_thread *t, struct srv_conn *c)
{
    uint64_t n = 0;

    if (memcmp(c->hdr, "SNTB", 4) != 0)
        return -1;
    for (int i = 0; i < 8; i++)
        n = n << 8 | c->hdr[8 + i];
    c->left = n;
    switch (c->hdr[4]) {
    case LG_OP_SINK:
        c->phase = SRV_SINK;
        break;
    case LG_OP_SOURCE:
        c->phase = SRV_SOURCE;
        srv_arm(t, c, true);
        break;
    case LG_OP_ECHO:
        c->phase = SRV_ECHO;
        break;
    default:
        return -1;
    }
    return 0;
}

/* Echo n bytes; what the socket refuses waits in c->pend (and reading
 * stops until it is written). */
static int srv_echo(struct srv_thread *t, struct srv_conn *c, const uint8_t *p, size_t n)
{
    ssize_t w = 0;
    uint8_t *np;

    if (c->pend == NULL) {
        w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            return -1;
        if (w < 0)
            w = 0;
    }
    if ((size_t)w == n)
        return 0;
    np = realloc(c->pend, c->pend_len + n - (size_t)w);
    if (np == NULL)
        return -1;
    memcpy(np + c->pend_len, p + w, n - (size_t)w);
    c->pend = np;
    c->pend_len += n - (size_t)w;
    srv_arm(t, c, true);
    return 0;
}

/* Run the bytes of one read through the connection's phases. */
static int srv_feed(struct srv_thread *t, struct srv_conn *c, const uint8_t *p, size_t n)
{
    while (n > 0) {
        size_t k;

        switch (c->phase) {
        case SRV_REC:
            if (srv_collect(c, 5, &p, &n)) {
                c->skip = lg_get16(c->hdr + 3);
                c->have = 0;
                c->phase = c->skip > 0 ? SRV_SKIP : SRV_CMD;
            }
            break;
        case SRV_SKIP:
            k = c->skip < n ? (size_t)c->skip : n;
            c->skip -= k;
            p += k;
            n -= k;
            if (c->skip == 0)
                c->phase = SRV_CMD;
            break;
        case SRV_CMD:
            if (srv_collect(c, LG_CMD_LEN, &p, &n) && srv_start(t, c) != 0)
                return -1;
            if (c->phase == SRV_SINK && c->left == 0)
                goto ack;
            break;
        case SRV_SINK:
            k = c->left < n ? (size_t)c->left : n;
            c->left -= k;
            p += k;
            n -= k;
            if (c->left == 0)
                goto ack;
            break;
        case SRV_ECHO:
            k = c->left < n ? (size_t)c->left : n;
            if (srv_echo(t, c, p, k) != 0)
                return -1;
            c->left -= k;
            p += k;
            n -= k;
            if (c->left == 0)
                c->phase = SRV_DONE;
            break;
        case SRV_SOURCE:
        case SRV_DONE:
            return 0;
        }
        continue;
ack:
        c->phase = SRV_DONE;
        if (send(c->fd, "k", 1, MSG_NOSIGNAL) != 1)
            return -1;
    }
    return 0;
}

static int srv_writable(struct srv_thread *t, struct srv_conn *c)
{
    ssize_t w;

    if (c->pend != NULL) {
        w = send(c->fd, c->pend + c->pend_off, c->pend_len - c->pend_off, MSG_NOSIGNAL);
        if (w < 0)
            return errno == EAGAIN ? 0 : -1;
        c->pend_off += (size_t)w;
        if (c->pend_off == c->pend_len) {
            free(c->pend);
            c->pend = NULL;
            c->pend_len = c->pend_off = 0;
            srv_arm(t, c, false);
        }
        return 0;
    }
    if (c->phase != SRV_SOURCE) {
        srv_arm(t, c, false);
        return 0;
    }
    w = send(c->fd, t->buf, c->left < LG_BUF ? (size_t)c->left : LG_BUF, MSG_NOSIGNAL);
    if (w < 0)
        return errno == EAGAIN ? 0 : -1;
    c->left -= (uint64_t)w;
    if (c->left == 0) {
        c->phase = SRV_DONE;
        srv_arm(t, c, false);
    }
    return 0;
}

static void srv_accept(struct srv_thread *t, int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        struct srv_conn *c;
        struct epoll_event ev;

        if (fd < 0)
            return;
        lg_nodelay(fd);
        c = calloc(1, sizeof(*c));
        if (c == NULL) {
            close(fd);
            return;
        }
        c->fd = fd;
        c->phase = SRV_REC;
        ev.events = EPOLLIN;
        ev.data.ptr = c;
        if (epoll_ctl(t->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
            close(fd);
            free(c);
        }
    }
}

static void *srv_loop(void *arg)
{
    struct srv_thread *t = arg;
    struct srv_conn lst = { .fd = -1 };
    struct epoll_event evs[LG_MAX_EVENTS], ev = { .events = EPOLLIN, .data.ptr = &lst };
    int one = 1, lfd = socket(t->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    setsockopt(lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
    if (bind(lfd, (struct sockaddr *)&t->ss, t->sl) != 0 || listen(lfd, 4096) != 0)
        lg_die("server: bind/listen: %s", strerror(errno));
    t->ep = epoll_create1(EPOLL_CLOEXEC);
    t->buf = lg_xmalloc(LG_BUF);
    memset(t->buf, 'x', LG_BUF);
    epoll_ctl(t->ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        int n = epoll_wait(t->ep, evs, LG_MAX_EVENTS, -1);

        for (int i = 0; i < n; i++) {
            struct srv_conn *c = evs[i].data.ptr;
            int rc = 0;

            if (c == &lst) {
                srv_accept(t, lfd);
                continue;
            }
            if (evs[i].events & EPOLLOUT)
                rc = srv_writable(t, c);
            if (rc == 0 && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !c->want_out) {
                ssize_t r = recv(c->fd, t->buf, LG_BUF, 0);

                if (r == 0 || (r < 0 && errno != EAGAIN))
                    rc = -1;
                else if (r > 0)
                    rc = srv_feed(t, c, t->buf, (size_t)r);
            } else if (rc == 0 && (evs[i].events & (EPOLLHUP | EPOLLERR))) {
                rc = -1;
            }
            if (rc != 0)
                srv_close(t, c);
        }
    }
    return NULL;
}

static int lg_server(int argc, char **argv)
{
    static const struct option lo[] = {
        { "listen", required_argument, NULL, 'l' },
        { "threads", required_argument, NULL, 't' },
        { 0, 0, 0, 0 },
    };
    const char *listen_at = NULL;
    int nthreads = 1, o;
    struct srv_thread *ts;
    pthread_t *tid;

    while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (o == 'l')
            listen_at = optarg;
        else if (o == 't')
            nthreads = atoi(optarg);
        else
            return 2;
    }
    if (listen_at == NULL || nthreads < 1)
        lg_die("server: --listen ADDR:PORT required, --threads >= 1");
    lg_nofile_max();
    ts = calloc((size_t)nthreads, sizeof(*ts));
    tid = calloc((size_t)nthreads, sizeof(*tid));
    if (ts == NULL || tid == NULL)
        lg_die("out of memory");
    for (int i = 0; i < nthreads; i++) {
        lg_addr(listen_at, &ts[i].ss, &ts[i].sl);
        if (pthread_create(&tid[i], NULL, srv_loop, &ts[i]) != 0)
            lg_die("pthread_create failed");
    }
    for (int i = 0; i < nthreads; i++)
        pthread_join(tid[i], NULL);
    return 0;
}

/* ---- stream: bulk bytes up or down -------------------------------------- */

struct st_job {
    struct sockaddr_storage ss;
    socklen_t sl;
    const uint8_t *pre;       /* hello + command */
    size_t pre_len;
    uint64_t bytes;
    bool up;
    pthread_barrier_t *bar;
    double t0, t1;
    uint64_t moved;
    int err;
};

static void *st_run(void *arg)
{
    struct st_job *j = arg;
    uint8_t *buf = lg_xmalloc(LG_BUF), ack;
    int fd = socket(j->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    bool ok = fd >= 0 && connect(fd, (struct sockaddr *)&j->ss, j->sl) == 0;

    memset(buf, 'y', LG_BUF);
    if (ok)
        lg_nodelay(fd);
    pthread_barrier_wait(j->bar);
    j->t0 = lg_now();
    ok = ok && lg_write_all(fd, j->pre, j->pre_len) == 0;
    while (ok && j->moved < j->bytes) {
        size_t want = j->bytes - j->moved < LG_BUF ? (size_t)(j->bytes - j->moved) : LG_BUF;
        ssize_t r = j->up ? send(fd, buf, want, MSG_NOSIGNAL) : recv(fd, buf, want, 0);

        if (r < 0 && errno == EINTR)
            continue;
        ok = r > 0;
        if (ok)
            j->moved += (uint64_t)r;
    }
    if (ok && j->up)
        ok = recv(fd, &ack, 1, MSG_WAITALL) == 1;
    j->t1 = lg_now();
    j->err = ok ? 0 : 1;
    if (fd >= 0)
        close(fd);
    free(buf);
    return NULL;
}

static int lg_stream(int argc, char **argv)
{
    static const struct option lo[] = {
        { "connect", required_argument, NULL, 'c' },
        { "sni", required_argument, NULL, 's' },
        { "bytes", required_argument, NULL, 'b' },
        { "conns", required_argument, NULL, 'k' },
        { "dir", required_argument, NULL, 'd' },
        { 0, 0, 0, 0 },
    };
    const char *to = NULL, *sni = "raw.bench.test", *dir = "up";
    uint64_t bytes = 1ull << 30, moved = 0;
    int conns = 1, o, errs = 0;
    uint8_t pre[LG_HELLO_MAX + LG_CMD_LEN];
    size_t hl;
    double t0 = 0, t1 = 0;
    pthread_barrier_t bar;
    struct st_job *jobs;
    pthread_t *tid;

    while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (o) {
        case 'c': to = optarg; break;
        case 's': sni = optarg; break;
        case 'b': bytes = strtoull(optarg, NULL, 10); break;
        case 'k': conns = atoi(optarg); break;
        case 'd': dir = optarg; break;
        default: return 2;
        }
    }
    if (to == NULL || conns < 1 || (strcmp(dir, "up") && strcmp(dir, "down")))
        lg_die("stream: --connect ADDR:PORT required, --conns >= 1, --dir up|down");
    hl = lg_hello(sni, pre);
    jobs = calloc((size_t)conns, sizeof(*jobs));
    tid = calloc((size_t)conns, sizeof(*tid));
    if (jobs == NULL || tid == NULL)
        lg_die("out of memory");
    pthread_barrier_init(&bar, NULL, (unsigned)conns);
    for (int i = 0; i < conns; i++) {
        struct st_job *j = &jobs[i];

        lg_addr(to, &j->ss, &j->sl);
        j->up = !strcmp(dir, "up");
        j->bytes = bytes / (uint64_t)conns;
        j->pre = lg_xmalloc(hl + LG_CMD_LEN);
        memcpy((uint8_t *)j->pre, pre, hl);
        lg_cmd((uint8_t *)j->pre + hl, j->up ? LG_OP_SINK : LG_OP_SOURCE, j->bytes);
        j->pre_len = hl + LG_CMD_LEN;
        j->bar = &bar;
        if (pthread_create(&tid[i], NULL, st_run, j) != 0)
            lg_die("pthread_create failed");
    }
    for (int i = 0; i < conns; i++) {
        pthread_join(tid[i], NULL);
        if (i == 0 || jobs[i].t0 < t0)
            t0 = jobs[i].t0;
        if (jobs[i].t1 > t1)
            t1 = jobs[i].t1;
        moved += jobs[i].moved;
        errs += jobs[i].err;
        free((void *)jobs[i].pre);
    }
    printf("{\"mode\": \"stream\", \"dir\": \"%s\", \"conns\": %d, \"bytes\": %" PRIu64
           ", \"seconds\": %.6f, \"gib_per_s\": %.4f, \"errors\": %d}\n",
           dir, conns, moved, t1 - t0,
           t1 > t0 ? (double)moved / (t1 - t0) / (1024.0 * 1024 * 1024) : 0.0, errs);
    return errs == 0 ? 0 : 1;
}

/* ---- rate: open, echo, close -------------------------------------------- */

struct rt_job {
    struct sockaddr_storage ss;
    socklen_t sl;
    const uint8_t *req;       /* hello + command + payload */
    size_t req_len;
    size_t size;
    double deadline;
    uint32_t *lat;            /* open latency, microseconds */
    size_t nlat, cap;
    uint64_t errors;
    uint64_t ok;
};

static void rt_record(struct rt_job *j, double us)
{
    if (j->nlat == j->cap) {
        size_t cap = j->cap ? 2 * j->cap : 4096;
        uint32_t *p = realloc(j->lat, cap * sizeof(*p));

        if (p == NULL)
            lg_die("out of memory");
        j->lat = p;
        j->cap = cap;
    }
    j->lat[j->nlat++] = us > 4e9 ? UINT32_MAX : (uint32_t)us;
}

/* One channel: connect, request, read the echo, close. 0 or -1. */
static int rt_once(struct rt_job *j, uint8_t *buf)
{
    double t0 = lg_now(), tf = 0;
    int fd = socket(j->ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    size_t got = 0;
    int rc = -1;

    if (fd < 0)
        return -1;
    lg_nodelay(fd);
    if (connect(fd, (struct sockaddr *)&j->ss, j->sl) != 0 ||
        lg_write_all(fd, j->req, j->req_len) != 0)
        goto out;
    while (got < j->size) {
        ssize_t r = recv(fd, buf, j->size - got, 0);

        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            goto out;
        if (got == 0)
            tf = lg_now();
        got += (size_t)r;
    }
    rt_record(j, (tf - t0) * 1e6);
    rc = 0;
out:
    close(fd);
    return rc;
}

static void *rt_run(void *arg)
{
    struct rt_job *j = arg;
    uint8_t *buf = lg_xmalloc(j->size > 0 ? j->size : 1);

    while (lg_now() < j->deadline) {
        if (rt_once(j, buf) == 0) {
            j->ok++;
        } else {
            j->errors++;
            usleep(1000);   /* a refusing path must not turn into a spin */
        }
    }
    free(buf);
    return NULL;
}

static int lg_cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? -1 : x > y;
}

static double lg_pct(const uint32_t *v, size_t n, double q)
{
    size_t i;

    if (n == 0)
        return 0;
    i = (size_t)(q * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

static int lg_rate(int argc, char **argv)
{
    static const struct option lo[] = {
        { "connect", required_argument, NULL, 'c' },
        { "sni", required_argument, NULL, 's' },
        { "workers", required_argument, NULL, 'w' },
        { "seconds", required_argument, NULL, 'S' },
        { "size", required_argument, NULL, 'z' },
        { 0, 0, 0, 0 },
    };
    const char *to = NULL, *sni = "raw.bench.test";
    int workers = 8, o;
    double secs = 5, t0, t1;
    size_t size = 1024, hl, n = 0;
    uint8_t *req;
    uint64_t ok = 0, errors = 0;
    uint32_t *all;
    struct rt_job *jobs;
    pthread_t *tid;

    while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (o) {
        case 'c': to = optarg; break;
        case 's': sni = optarg; break;
        case 'w': workers = atoi(optarg); break;
        case 'S': secs = atof(optarg); break;
        case 'z': size = (size_t)strtoul(optarg, NULL, 10); break;
        default: return 2;
        }
    }
    if (to == NULL || workers < 1 || size < 1 || size > (1u << 20))
        lg_die("rate: --connect ADDR:PORT required, --workers >= 1, --size 1..1048576");
    lg_nofile_max();
    req = lg_xmalloc(LG_HELLO_MAX + LG_CMD_LEN + size);
    hl = lg_hello(sni, req);
    lg_cmd(req + hl, LG_OP_ECHO, size);
    memset(req + hl + LG_CMD_LEN, 'e', size);
    jobs = calloc((size_t)workers, sizeof(*jobs));
    tid = calloc((size_t)workers, sizeof(*tid));
    if (jobs == NULL || tid == NULL)
        lg_die("out of memory");
    t0 = lg_now();
    for (int i = 0; i < workers; i++) {
        lg_addr(to, &jobs[i].ss, &jobs[i].sl);
        jobs[i].req = req;
        jobs[i].req_len = hl + LG_CMD_LEN + size;
        jobs[i].size = size;
        jobs[i].deadline = t0 + secs;
        if (pthread_create(&tid[i], NULL, rt_run, &jobs[i]) != 0)
            lg_die("pthread_create failed");
    }
    for (int i = 0; i < workers; i++) {
        pthread_join(tid[i], NULL);
        ok += jobs[i].ok;
        errors += jobs[i].errors;
        n += jobs[i].nlat;
    }
    t1 = lg_now();
    all = lg_xmalloc((n ? n : 1) * sizeof(*all));
    n = 0;
    for (int i = 0; i < workers; i++) {
        memcpy(all + n, jobs[i].lat, jobs[i].nlat * sizeof(*all));
        n += jobs[i].nlat;
        free(jobs[i].lat);
    }
    qsort(all, n, sizeof(*all), lg_cmp_u32);
    printf("{\"mode\": \"rate\", \"workers\": %d, \"size\": %zu, \"channels\": %" PRIu64
           ", \"errors\": %" PRIu64 ", \"seconds\": %.6f, \"channels_per_s\": %.1f"
           ", \"open_us_p50\": %.0f, \"open_us_p90\": %.0f, \"open_us_p99\": %.0f"
           ", \"open_us_max\": %.0f}\n",
           workers, size, ok, errors, t1 - t0, (double)ok / (t1 - t0),
           lg_pct(all, n, 0.50), lg_pct(all, n, 0.90), lg_pct(all, n, 0.99),
           n ? (double)all[n - 1] : 0.0);
    free(all);
    free(req);
    return 0;
}

/* ---- tunnels: many idle tunnels, channels on them ----------------------- */

enum tn_state {
    TN_IDLE = 1,       /* not started */
    TN_CONNECT = 2,    /* connect() in progress */
    TN_CHAL = 3,       /* token sent, reading the challenge */
    TN_PONG = 4,       /* answer + PING sent, waiting for the PONG */
    TN_READY = 5,
    TN_DEAD = 6,
};

struct tn_tunnel {
    int fd;
    enum tn_state state;
    char *token;
    char name[96];
    uint8_t key[32];
    size_t key_len;
    uint8_t iv[16];
    struct tc_stream *seal;
    struct tc_stream *open;
    struct frame_enc enc;
    struct frame_dec dec;
    uint8_t chal[CHALLENGE_WIRE_MAX];
    size_t chave;
    uint32_t news;
    uint32_t devs;
};

enum tn_tag {
    TN_TAG_TUNNEL = 1,
    TN_TAG_DEVICE = 2,
    TN_TAG_STDIN = 3,
};

struct tn_ctx {
    struct sockaddr_storage gw, sni;
    socklen_t gw_len, sni_len;
    struct tn_tunnel *tun;
    size_t ntun;
    int ep;
    uint8_t *buf;
    struct frame_batch *batch;
    size_t ready, failed, inflight;
    uint64_t news, devs_open, dev_failed;
    int *dev_fd;               /* index = device number */
    uint8_t (*hello)[LG_HELLO_MAX];
    size_t *hello_len;
    bool stdin_eof;
    bool stdin_line;
};

static uint64_t tn_tag(enum tn_tag tag, size_t idx)
{
    return (uint64_t)tag << 32 | idx;
}

static void tn_fail(struct tn_ctx *x, struct tn_tunnel *t)
{
    if (t->state != TN_READY && t->state != TN_DEAD && x->inflight > 0)
        x->inflight--;
    if (t->state == TN_READY && x->ready > 0)
        x->ready--;
    if (t->fd >= 0) {
        epoll_ctl(x->ep, EPOLL_CTL_DEL, t->fd, NULL);
        close(t->fd);
    }
    t->fd = -1;
    t->state = TN_DEAD;
    x->failed++;
}

/* Seal the batch and write it whole (blocking briefly if the socket is
 * full: these are a few small frames on an idle tunnel). */
static int tn_flush(struct tn_ctx *x, struct tn_tunnel *t)
{
    struct frame_batch *b = x->batch;

    if (frame_batch_seal(b) != 0)
        return -1;
    while (frame_batch_left(b) > 0) {
        int cnt;
        const struct iovec *iov = frame_batch_iov(b, &cnt);
        ssize_t w = writev(t->fd, iov, cnt);

        if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            usleep(100);
            continue;
        }
        if (w <= 0)
            return -1;
        frame_batch_advance(b, (size_t)w);
    }
    return 0;
}

static int tn_ping(struct tn_ctx *x, struct tn_tunnel *t, const uint8_t *reply_id)
{
    uint8_t id[FRAME_ID_LEN];

    frame_batch_reset(x->batch, &t->enc);
    if (reply_id != NULL)
        memcpy(id, reply_id, FRAME_ID_LEN);
    else if (frame_new_id(&t->enc, id) != 0)
        return -1;
    if (frame_batch_ping(x->batch, id, reply_id != NULL) != 0)
        return -1;
    return tn_flush(x, t);
}

static void tn_start(struct tn_ctx *x, size_t i)
{
    struct tn_tunnel *t = &x->tun[i];
    struct epoll_event ev = { .events = EPOLLOUT, .data.u64 = tn_tag(TN_TAG_TUNNEL, i) };

    t->fd = socket(x->gw.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    x->inflight++;
    t->state = TN_CONNECT;
    if (t->fd < 0) {
        tn_fail(x, t);
        return;
    }
    lg_nodelay(t->fd);
    if ((connect(t->fd, (struct sockaddr *)&x->gw, x->gw_len) != 0 && errno != EINPROGRESS) ||
        epoll_ctl(x->ep, EPOLL_CTL_ADD, t->fd, &ev) != 0)
        tn_fail(x, t);
}

/* connect() finished: send the token in one write (PROTOCOL.md 2.7). */
static void tn_connected(struct tn_ctx *x, size_t i)
{
    struct tn_tunnel *t = &x->tun[i];
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = tn_tag(TN_TAG_TUNNEL, i) };
    int err = 0;
    socklen_t el = sizeof(err);
    size_t n = strlen(t->token);

    getsockopt(t->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err != 0 || send(t->fd, t->token, n, MSG_NOSIGNAL) != (ssize_t)n ||
        epoll_ctl(x->ep, EPOLL_CTL_MOD, t->fd, &ev) != 0) {
        tn_fail(x, t);
        return;
    }
    t->state = TN_CHAL;
    t->seal = tc_new(TC_AES_CBC, TC_SEAL, TC_SIDE_CLIENT, t->key, t->key_len, t->iv);
    t->open = tc_new(TC_AES_CBC, TC_OPEN, TC_SIDE_GATEWAY, t->key, t->key_len, t->iv);
    if (t->seal == NULL || t->open == NULL)
        tn_fail(x, t);
}

/* Frames from the gateway: PONG makes the tunnel ready, NEW counts a
 * channel, a PING request is answered, everything else is dropped. */
static int tn_frames(struct tn_ctx *x, struct tn_tunnel *t, const uint8_t *p, size_t n)
{
    while (n > 0) {
        struct frame_ev ev;
        size_t used = 0;
        enum frame_res r = frame_dec_feed(&t->dec, p, n, &used, &ev);

        if (r == FRAME_BAD)
            return -1;
        p += used;
        n -= used;
        if (r == FRAME_AGAIN)
            break;
        if (ev.kind != FRAME_EV_FRAME)
            continue;
        if (ev.flow == FRAME_PING && memcmp(ev.extra, "pong", 4) == 0) {
            if (t->state == TN_PONG) {
                t->state = TN_READY;
                x->ready++;
                x->inflight--;
            }
        } else if (ev.flow == FRAME_PING) {
            if (tn_ping(x, t, ev.id) != 0)
                return -1;
        } else if (ev.flow == FRAME_NEW) {
            t->news++;
            x->news++;
        }
    }
    return 0;
}

static void tn_readable(struct tn_ctx *x, size_t i)
{
    struct tn_tunnel *t = &x->tun[i];
    ssize_t r = recv(t->fd, x->buf, LG_BUF, 0);
    const uint8_t *p = x->buf;
    size_t n;

    if (r < 0 && errno == EAGAIN)
        return;
    if (r <= 0) {
        tn_fail(x, t);
        return;
    }
    n = (size_t)r;
    if (t->state == TN_CHAL) {
        size_t need = challenge_wire_len(t->open), k = need - t->chave < n ? need - t->chave : n;
        uint8_t ans[CHALLENGE_WIRE_MAX];

        memcpy(t->chal + t->chave, p, k);
        t->chave += k;
        p += k;
        n -= k;
        if (t->chave < need)
            return;
        if (challenge_answer(t->open, t->seal, t->chal, ans) != 0 ||
            lg_write_all(t->fd, ans, challenge_wire_len(t->seal)) != 0) {
            tn_fail(x, t);
            return;
        }
        frame_enc_init(&t->enc, t->seal, 2, NULL);
        frame_dec_init(&t->dec, t->open, 2, 0);
        t->state = TN_PONG;
        if (tn_ping(x, t, NULL) != 0) {
            tn_fail(x, t);
            return;
        }
    }
    if (n > 0 && tn_frames(x, t, p, n) != 0)
        tn_fail(x, t);
}

static void tn_stdin(struct tn_ctx *x)
{
    char b[256];
    ssize_t r = read(0, b, sizeof(b));

    if (r <= 0) {
        x->stdin_eof = true;
        epoll_ctl(x->ep, EPOLL_CTL_DEL, 0, NULL);
        return;
    }
    if (memchr(b, '\n', (size_t)r) != NULL)
        x->stdin_line = true;
}

static void tn_device_connected(struct tn_ctx *x, size_t d)
{
    int fd = x->dev_fd[d], err = 0;
    socklen_t el = sizeof(err);
    size_t ti = d % x->ntun;

    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
    epoll_ctl(x->ep, EPOLL_CTL_DEL, fd, NULL);
    if (err != 0 ||
        send(fd, x->hello[ti], x->hello_len[ti], MSG_NOSIGNAL) != (ssize_t)x->hello_len[ti]) {
        close(fd);
        x->dev_fd[d] = -1;
        x->dev_failed++;
    }
}

static void tn_device_start(struct tn_ctx *x, size_t d)
{
    struct epoll_event ev = { .events = EPOLLOUT, .data.u64 = tn_tag(TN_TAG_DEVICE, d) };
    int fd = socket(x->sni.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    x->dev_fd[d] = fd;
    x->devs_open++;
    if (fd < 0 || (connect(fd, (struct sockaddr *)&x->sni, x->sni_len) != 0 &&
                   errno != EINPROGRESS) ||
        epoll_ctl(x->ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        if (fd >= 0)
            close(fd);
        x->dev_fd[d] = -1;
        x->dev_failed++;
    }
}

/* One turn of the loop: wait up to ms, dispatch. */
static void tn_turn(struct tn_ctx *x, int ms)
{
    struct epoll_event evs[LG_MAX_EVENTS];
    int n = epoll_wait(x->ep, evs, LG_MAX_EVENTS, ms);

    for (int k = 0; k < n; k++) {
        enum tn_tag tag = (enum tn_tag)(evs[k].data.u64 >> 32);
        size_t i = (size_t)(evs[k].data.u64 & 0xffffffffu);

        if (tag == TN_TAG_STDIN) {
            tn_stdin(x);
        } else if (tag == TN_TAG_DEVICE) {
            tn_device_connected(x, i);
        } else if (x->tun[i].state == TN_CONNECT) {
            tn_connected(x, i);
        } else if (x->tun[i].state != TN_DEAD) {
            tn_readable(x, i);
        }
    }
}

/* Tokens from `snitun token issue` output, one JSON object per line. */
static size_t tn_load_tokens(const char *path, struct tn_tunnel **out)
{
    FILE *f = fopen(path, "r");
    char *line = NULL;
    size_t cap = 0, n = 0, room = 0;
    struct tn_tunnel *v = NULL;

    if (f == NULL)
        lg_die("cannot open %s: %s", path, strerror(errno));
    while (getline(&line, &cap, f) > 0) {
        json_error_t je;
        json_t *o = json_loads(line, 0, &je);
        const char *tok, *key, *iv, *host;
        struct tn_tunnel *t;

        if (o == NULL)
            continue;
        tok = json_string_value(json_object_get(o, "token"));
        key = json_string_value(json_object_get(o, "aes_key"));
        iv = json_string_value(json_object_get(o, "aes_iv"));
        host = json_string_value(json_object_get(o, "hostname"));
        if (tok == NULL || key == NULL || iv == NULL || host == NULL || strlen(iv) != 32 ||
            (strlen(key) != 32 && strlen(key) != 48 && strlen(key) != 64))
            lg_die("%s: line %zu is not the JSON of `snitun token issue`", path, n + 1);
        if (n == room) {
            room = room ? 2 * room : 256;
            v = realloc(v, room * sizeof(*v));
            if (v == NULL)
                lg_die("out of memory");
        }
        t = &v[n++];
        memset(t, 0, sizeof(*t));
        t->token = strdup(tok);
        t->key_len = strlen(key) / 2;
        for (size_t b = 0; b < t->key_len; b++)
            sscanf(key + 2 * b, "%2hhx", &t->key[b]);
        for (size_t b = 0; b < 16; b++)
            sscanf(iv + 2 * b, "%2hhx", &t->iv[b]);
        snprintf(t->name, sizeof(t->name), "%s", host);
        json_decref(o);
    }
    free(line);
    fclose(f);
    *out = v;
    return n;
}

/* count tokens issued here with the Fernet key, hostnames
 * t00000.<domain> ... (what `snitun token issue` would print). */
static size_t tn_issue_tokens(const char *fkey, size_t count, const char *domain,
                              struct tn_tunnel **out)
{
    struct fernet_key k;
    struct tn_tunnel *v = calloc(count ? count : 1, sizeof(*v));
    int64_t now = (int64_t)time(NULL);

    if (v == NULL)
        lg_die("out of memory");
    if (fernet_key_parse(fkey, strlen(fkey), &k) != 0)
        lg_die("--fernet-key is not a Fernet key");
    for (size_t i = 0; i < count; i++) {
        struct tn_tunnel *t = &v[i];
        struct token_req req = { 0 };

        snprintf(t->name, sizeof(t->name), "t%05zu.%s", i, domain);
        t->key_len = 32;
        if (rand_bytes(t->key, 32) != 0 || rand_bytes(t->iv, 16) != 0)
            lg_die("random source failed");
        req.valid = now + 3600;
        req.hostname = t->name;
        req.aes_key = t->key;
        req.aes_key_len = 32;
        req.aes_iv = t->iv;
        req.aes_iv_len = 16;
        req.protocol_version = 2;
        req.cipher = TC_AES_CBC;
        if (token_issue(&k, &req, (uint64_t)now, NULL, &t->token) != 0)
            lg_die("token_issue failed");
    }
    *out = v;
    return count;
}

static int lg_tunnels(int argc, char **argv)
{
    static const struct option lo[] = {
        { "connect", required_argument, NULL, 'c' },
        { "fernet-key", required_argument, NULL, 'f' },
        { "count", required_argument, NULL, 'n' },
        { "tokens", required_argument, NULL, 'T' },
        { "domain", required_argument, NULL, 'D' },
        { "channels", required_argument, NULL, 'm' },
        { "sni-connect", required_argument, NULL, 's' },
        { "window", required_argument, NULL, 'w' },
        { "timeout", required_argument, NULL, 'o' },
        { 0, 0, 0, 0 },
    };
    const char *gw = NULL, *fkey = NULL, *tokens = NULL, *domain = "idle.bench.test",
               *sni = NULL;
    size_t count = 100, channels = 0, window = 48, next = 0, ndev;
    double timeout = 300, t0, t1, ti;
    struct tn_ctx x = { .ep = -1 };
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = tn_tag(TN_TAG_STDIN, 0) };
    bool have_stdin;
    int o;

    while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (o) {
        case 'c': gw = optarg; break;
        case 'f': fkey = optarg; break;
        case 'n': count = (size_t)strtoul(optarg, NULL, 10); break;
        case 'T': tokens = optarg; break;
        case 'D': domain = optarg; break;
        case 'm': channels = (size_t)strtoul(optarg, NULL, 10); break;
        case 's': sni = optarg; break;
        case 'w': window = (size_t)strtoul(optarg, NULL, 10); break;
        case 'o': timeout = atof(optarg); break;
        default: return 2;
        }
    }
    if (gw == NULL || (fkey == NULL) == (tokens == NULL) || window < 1 ||
        (channels > 0 && sni == NULL))
        lg_die("tunnels: --connect and one of --fernet-key/--tokens required; "
               "--channels needs --sni-connect");
    lg_nofile_max();
    lg_addr(gw, &x.gw, &x.gw_len);
    if (sni != NULL)
        lg_addr(sni, &x.sni, &x.sni_len);
    ti = lg_now();
    x.ntun = tokens ? tn_load_tokens(tokens, &x.tun) : tn_issue_tokens(fkey, count, domain, &x.tun);
    ti = lg_now() - ti;
    x.ep = epoll_create1(EPOLL_CLOEXEC);
    x.buf = lg_xmalloc(LG_BUF);
    x.batch = lg_xmalloc(sizeof(*x.batch));
    have_stdin = epoll_ctl(x.ep, EPOLL_CTL_ADD, 0, &ev) == 0;
    for (size_t i = 0; i < x.ntun; i++) {
        x.tun[i].fd = -1;
        x.tun[i].state = TN_IDLE;
    }

    /* Phase 1: every tunnel registered (its PONG seen), W at a time. */
    t0 = lg_now();
    while (x.ready + x.failed < x.ntun && lg_now() - t0 < timeout) {
        while (next < x.ntun && x.inflight < window)
            tn_start(&x, next++);
        tn_turn(&x, 100);
    }
    t1 = lg_now();
    printf("{\"phase\": \"tunnels\", \"tunnels\": %zu, \"ready\": %zu, \"failed\": %zu, "
           "\"seconds\": %.4f, \"per_s\": %.1f, \"issue_seconds\": %.4f}\n",
           x.ntun, x.ready, x.failed, t1 - t0,
           t1 > t0 ? (double)x.ready / (t1 - t0) : 0.0, ti);
    fflush(stdout);

    /* Phase 2: M device connections per tunnel, counted by NEW frames. */
    if (channels > 0) {
        uint64_t target;

        while (have_stdin && !x.stdin_line && !x.stdin_eof)
            tn_turn(&x, 1000);
        x.stdin_line = false;
        ndev = channels * x.ntun;
        x.dev_fd = lg_xmalloc(ndev * sizeof(*x.dev_fd));
        x.hello = lg_xmalloc(x.ntun * sizeof(*x.hello));
        x.hello_len = lg_xmalloc(x.ntun * sizeof(*x.hello_len));
        for (size_t i = 0; i < x.ntun; i++)
            x.hello_len[i] = lg_hello(x.tun[i].name, x.hello[i]);
        target = (uint64_t)x.ready * channels;
        next = 0;
        t0 = lg_now();
        while (x.news < target && lg_now() - t0 < timeout) {
            while (next < ndev && x.devs_open - x.dev_failed - x.news < window)
                tn_device_start(&x, next++);
            tn_turn(&x, 100);
        }
        t1 = lg_now();
        printf("{\"phase\": \"channels\", \"channels\": %" PRIu64 ", \"target\": %" PRIu64
               ", \"device_failed\": %" PRIu64 ", \"seconds\": %.4f, \"per_s\": %.1f}\n",
               x.news, target, x.dev_failed, t1 - t0,
               t1 > t0 ? (double)x.news / (t1 - t0) : 0.0);
        fflush(stdout);
    }

    /* Hold until stdin closes; keep the tunnels alive with a PING now and
     * then (the gateway closes tunnels idle for its idle timeout). */
    t0 = lg_now();
    while (have_stdin && !x.stdin_eof) {
        tn_turn(&x, 1000);
        if (lg_now() - t0 > 30) {
            for (size_t i = 0; i < x.ntun; i++)
                if (x.tun[i].state == TN_READY && tn_ping(&x, &x.tun[i], NULL) != 0)
                    tn_fail(&x, &x.tun[i]);
            t0 = lg_now();
        }
    }
    return x.failed == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";

    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(mode, "server"))
        return lg_server(argc - 1, argv + 1);
    if (!strcmp(mode, "stream"))
        return lg_stream(argc - 1, argv + 1);
    if (!strcmp(mode, "rate"))
        return lg_rate(argc - 1, argv + 1);
    if (!strcmp(mode, "tunnels"))
        return lg_tunnels(argc - 1, argv + 1);
    fprintf(stderr, "usage: loadgen server|stream|rate|tunnels [flags] (see bench/loadgen.c)\n");
    return 2;
}
