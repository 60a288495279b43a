/* tests/unit/test_mux.c - the tunnel multiplexer (core/mux.h).
 *
 * A gateway-side mux and a client-side mux run on one engine, joined by a
 * socketpair (or a loopback TCP pair for the bulk transfer); devices and
 * endpoints are socketpairs whose test ends are read and written either
 * directly (small exchanges) or by engine-driven pumps and sinks (bulk).
 * Protocol corner cases use a "raw" peer: frames built with frame_batch or
 * sealed by hand with a tc_stream and written into the socketpair.
 *
 * Every MUX_TEST runs under both engines (suite mux_uring / mux_epoll); the
 * uring variant is skipped where io_uring is refused. Every test checks
 * that the number of open fds is back to where it started.
 */
#include <criterion/criterion.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <urcu/compiler.h>

#include "core/frame.h"
#include "core/mux.h"
#include "core/mux_queue.h"
#include "crypto/tcipher.h"
#include "io/eng.h"
#include "io/sock.h"

#define MAXCH 256
#define MAXFD 1024

static enum eng_kind need(enum eng_kind k)
{
    char err[256];
    struct eng *e;

    if (k != ENG_URING)
        return k;
    e = eng_new(ENG_URING, err, sizeof(err));
    if (e == NULL)
        cr_skip_test("io_uring unavailable here: %s", err);
    eng_free(e);
    return k;
}

/* One timeout for every test: with --jobs > 1, Criterion 2.4's runner
 * leaks a timeout record (LeakSanitizer, runner process) when tests with
 * different timeouts overlap. */
#define MUX_TEST(name)                                                                 \
    static void name##_body(enum eng_kind kind);                                       \
    Test(mux_uring, name, .timeout = 120) { name##_body(need(ENG_URING)); }            \
    Test(mux_epoll, name, .timeout = 120) { name##_body(ENG_EPOLL); }                  \
    static void name##_body(enum eng_kind kind)

static const uint8_t key[32] = {
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
};
static const uint8_t iv[16] = {
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
};

static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    struct dirent *de;
    int n = 0;

    cr_assert_not_null(d);
    while ((de = readdir(d)) != NULL)
        n += de->d_name[0] != '.';
    closedir(d);
    return n - 1; /* the DIR's own fd */
}

static void pat_init(void);

/* ---- fixture ------------------------------------------------------------- */

enum attach_mode {
    ATTACH_NOW = 1, /* on_new: connect an endpoint socketpair at once */
    ATTACH_NEVER = 2, /* leave the channel PENDING */
    ATTACH_REFUSE = 3, /* on_new: mux_chan_close(REFUSED) */
};

struct fx;

/* What one side's hooks saw. */
struct hk {
    struct fx *fx;
    bool is_gw;
    struct mux *m;
    bool dead;
    int dead_calls;
    enum mux_reason dead_why;
    struct mux_stats final;       /* stats snapshot taken in on_dead */
    int pongs;
    int nclosed;
    bool closed[MAXCH];
    enum mux_reason why[MAXCH];
    bool closed_after_dead;       /* an on_chan_closed after on_dead: bug */
    /* client */
    int nnew;
    struct mux_chan *chans[MAXCH];
    struct net_addr callers[MAXCH];
    int endfd[MAXCH];             /* test end of each endpoint socketpair */
    enum attach_mode mode;
    const char *prefix;
    int pending_calls;
};

struct fx {
    enum eng_kind kind;
    struct eng *e;
    int fd_base;
    struct mux_cfg gcfg, ccfg;
    struct hk g, c;
    int ngw;
    struct mux_chan *gwc[MAXCH];
    int devfd[MAXCH];             /* test end of each device socketpair */
    int own[MAXFD];               /* test-side fds closed at the end */
    int nown;
    struct tc_stream *gs, *go, *cs, *co; /* the muxes' streams (theirs) */
};

static const struct mux_stats *st(const struct hk *h)
{
    return h->dead ? &h->final : mux_stats(h->m);
}

static void own(struct fx *f, int fd)
{
    cr_assert_lt(f->nown, MAXFD);
    f->own[f->nown++] = fd;
}

static void nb_pair(struct fx *f, int sv[2])
{
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

static int chan_index(struct hk *h, struct mux_chan *c)
{
    int i;

    if (h->is_gw) {
        for (i = 0; i < h->fx->ngw; i++)
            if (h->fx->gwc[i] == c)
                return i;
    } else {
        for (i = 0; i < h->nnew; i++)
            if (h->chans[i] == c)
                return i;
    }
    cr_assert_fail("on_chan_closed for a channel the test never saw");
    return -1;
}

static void hk_chan_closed(void *ctx, struct mux_chan *c, enum mux_reason why)
{
    struct hk *h = ctx;
    int i = chan_index(h, c);

    cr_assert(!h->closed[i], "on_chan_closed twice for channel %d", i);
    if (h->dead)
        h->closed_after_dead = true;
    h->closed[i] = true;
    h->why[i] = why;
    h->nclosed++;
}

static void hk_dead(void *ctx, struct mux *m, enum mux_reason why)
{
    struct hk *h = ctx;

    cr_assert_eq(m, h->m);
    h->dead_calls++;
    h->dead = true;
    h->dead_why = why;
    h->final = *mux_stats(m);
}

static void hk_pong(void *ctx, struct mux *m)
{
    struct hk *h = ctx;

    cr_assert_eq(m, h->m);
    h->pongs++;
}

static void hk_new(void *ctx, struct mux_chan *c, const struct net_addr *caller)
{
    struct hk *h = ctx;
    int sv[2];
    int i = h->nnew++;

    cr_assert_lt(i, MAXCH);
    h->chans[i] = c;
    h->callers[i] = *caller;
    h->endfd[i] = -1;
    if (h->mode == ATTACH_REFUSE) {
        mux_chan_close(c, MUX_R_REFUSED);
    } else if (h->mode == ATTACH_NOW) {
        nb_pair(h->fx, sv);
        own(h->fx, sv[1]);
        h->endfd[i] = sv[1];
        mux_chan_attach(c, sv[0], h->prefix, h->prefix ? strlen(h->prefix) : 0);
    }
}

static void hk_pending(void *ctx, struct mux_chan *c)
{
    struct hk *h = ctx;

    h->pending_calls++;
}

static void fx_init(struct fx *f, enum eng_kind kind, unsigned version)
{
    char err[256];

    memset(f, 0, sizeof(*f));
    pat_init();
    f->kind = kind;
    f->fd_base = count_fds();
    f->e = eng_new(kind, err, sizeof(err));
    cr_assert_not_null(f->e, "eng_new: %s", err);
    cr_assert_eq(eng_kind(f->e), kind);
    mux_cfg_defaults(&f->gcfg, TC_SIDE_GATEWAY, version);
    mux_cfg_defaults(&f->ccfg, TC_SIDE_CLIENT, version);
    f->g = (struct hk){ .fx = f, .is_gw = true };
    f->c = (struct hk){ .fx = f, .is_gw = false, .mode = ATTACH_NOW };
}

static struct mux_hooks hooks_for(struct hk *h)
{
    struct mux_hooks k = {
        .ctx = h,
        .on_chan_closed = hk_chan_closed,
        .on_pong = hk_pong,
        .on_dead = hk_dead,
    };

    if (!h->is_gw) {
        k.on_new = hk_new;
        k.on_pending_data = hk_pending;
    }
    return k;
}

/* The four streams of one tunnel, as a handshake would leave them. */
static void mk_streams(enum tc_kind ck, struct tc_stream **gseal, struct tc_stream **gopen,
                       struct tc_stream **cseal, struct tc_stream **copen)
{
    *gseal = tc_new(ck, TC_SEAL, TC_SIDE_GATEWAY, key, sizeof(key), iv);
    *copen = tc_new(ck, TC_OPEN, TC_SIDE_GATEWAY, key, sizeof(key), iv);
    *cseal = tc_new(ck, TC_SEAL, TC_SIDE_CLIENT, key, sizeof(key), iv);
    *gopen = tc_new(ck, TC_OPEN, TC_SIDE_CLIENT, key, sizeof(key), iv);
    cr_assert(*gseal && *copen && *cseal && *gopen);
}

/* A connected loopback TCP pair, both ends non-blocking. */
static void tcp_pair(int sv[2])
{
    struct net_addr a = { .family = AF_INET, .ip = { 127, 0, 0, 1 } }, at;
    struct sockaddr_storage ss;
    socklen_t sl;
    int lfd = sock_listen(&a, NULL);

    cr_assert_geq(lfd, 0);
    cr_assert_eq(sock_local(lfd, &at), 0);
    sl = addr_to_sockaddr(&at, &ss);
    sv[1] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    cr_assert_geq(sv[1], 0);
    cr_assert_eq(connect(sv[1], (struct sockaddr *)&ss, sl), 0);
    do {
        sv[0] = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (sv[0] < 0 && errno == EAGAIN);
    cr_assert_geq(sv[0], 0, "accept: %s", strerror(errno));
    close(lfd);
    cr_assert_eq(fcntl(sv[1], F_SETFL, fcntl(sv[1], F_GETFL) | O_NONBLOCK), 0);
    sock_nodelay(sv[0], true);
    sock_nodelay(sv[1], true);
}

/* Gateway mux on sv[0], client mux on sv[1]. */
static void fx_start(struct fx *f, enum tc_kind ck, bool tcp)
{
    struct tc_stream *gs, *go, *cs, *co;
    struct mux_hooks gh = hooks_for(&f->g), ch = hooks_for(&f->c);
    int sv[2];

    mk_streams(ck, &gs, &go, &cs, &co);
    if (tcp)
        tcp_pair(sv);
    else
        nb_pair(f, sv);
    f->g.m = mux_new(f->e, sv[0], &f->gcfg, &gh, gs, go, NULL, 0);
    f->c.m = mux_new(f->e, sv[1], &f->ccfg, &ch, cs, co, NULL, 0);
    cr_assert(f->g.m && f->c.m);
    f->gs = gs;
    f->go = go;
    f->cs = cs;
    f->co = co;
}

/* One loop turn. Hot loops assert only on failure: Criterion ships every
 * passing assertion to its runner. */
static void turn(struct fx *f, int ms)
{
    int rc = eng_run_once(f->e, ms);

    if (rc < 0)
        cr_assert_fail("eng_run_once: %s", strerror(-rc));
}

/* Turn until cond(f) or ms elapse; returns cond(f). */
static bool run_until(struct fx *f, bool (*cond)(struct fx *f, void *arg), void *arg, int ms)
{
    uint64_t end = timer_clock_ms() + (uint64_t)ms;

    while (!cond(f, arg) && timer_clock_ms() < end)
        turn(f, 5);
    return cond(f, arg);
}

static bool never(struct fx *f, void *arg)
{
    return false;
}

static void run_for(struct fx *f, int ms)
{
    run_until(f, never, NULL, ms);
}

static bool flag_set(struct fx *f, void *arg)
{
    return *(bool *)arg;
}

static bool wait_flag(struct fx *f, bool *flag, int ms)
{
    return run_until(f, flag_set, flag, ms);
}

/* Wait until *counter >= want. */
static bool wait_count(struct fx *f, int *counter, int want, int ms)
{
    uint64_t end = timer_clock_ms() + (uint64_t)ms;

    while (*counter < want && timer_clock_ms() < end)
        turn(f, 5);
    return *counter >= want;
}

/* Close whatever is still up, wait for on_dead and the frees, then check
 * that every fd the muxes owned is closed. */
static void fx_end(struct fx *f)
{
    int i;

    if (f->g.m != NULL && !f->g.dead)
        mux_close(f->g.m, MUX_R_SHUTDOWN);
    if (f->c.m != NULL && !f->c.dead)
        mux_close(f->c.m, MUX_R_SHUTDOWN);
    if (f->g.m != NULL)
        cr_assert(wait_flag(f, &f->g.dead, 3000));
    if (f->c.m != NULL)
        cr_assert(wait_flag(f, &f->c.dead, 3000));
    /* Cancelled ops call back in the next turns; the muxes free themselves
     * at the end of the turn after that. */
    for (i = 0; i < 20; i++)
        eng_run_once(f->e, 2);
    cr_assert_leq(f->g.dead_calls, 1);
    cr_assert_leq(f->c.dead_calls, 1);
    cr_assert(!f->g.closed_after_dead && !f->c.closed_after_dead);
    eng_free(f->e);
    for (i = 0; i < f->nown; i++)
        close(f->own[i]);
    cr_assert_eq(count_fds(), f->fd_base, "fd leak: %d open, %d at start", count_fds(),
                 f->fd_base);
}

/* ---- direct I/O on test-side fds ---------------------------------------- */

static void write_all(struct fx *f, int fd, const void *p, size_t n)
{
    const uint8_t *b = p;
    uint64_t end = timer_clock_ms() + 10000;

    while (n > 0) {
        ssize_t w = write(fd, b, n);

        if (w < 0) {
            if (errno != EAGAIN)
                cr_assert_fail("write: %s", strerror(errno));
            if (timer_clock_ms() >= end)
                cr_assert_fail("write stuck");
            turn(f, 2);
            continue;
        }
        b += w;
        n -= (size_t)w;
    }
}

/* Read exactly n bytes (fails on EOF or timeout). */
static void read_exact(struct fx *f, int fd, void *p, size_t n, int ms)
{
    uint8_t *b = p;
    uint64_t end = timer_clock_ms() + (uint64_t)ms;

    while (n > 0) {
        ssize_t r = read(fd, b, n);

        if (r < 0) {
            if (errno != EAGAIN)
                cr_assert_fail("read: %s", strerror(errno));
            if (timer_clock_ms() >= end)
                cr_assert_fail("read timed out, %zu bytes missing", n);
            turn(f, 2);
            continue;
        }
        if (r == 0)
            cr_assert_fail("EOF with %zu bytes missing", n);
        b += r;
        n -= (size_t)r;
    }
}

/* Read until EOF; returns the bytes read before it (kept up to cap). */
static size_t read_eof(struct fx *f, int fd, void *p, size_t cap, int ms)
{
    uint8_t scratch[65536], *b = p;
    uint64_t end = timer_clock_ms() + (uint64_t)ms;
    size_t got = 0;

    for (;;) {
        size_t room = cap > got ? cap - got : 0;
        ssize_t r = room > 0 ? read(fd, b + got, room) : read(fd, scratch, sizeof(scratch));

        if (r == 0)
            return got;
        if (r < 0) {
            if (errno == ECONNRESET)
                return got;
            if (errno != EAGAIN)
                cr_assert_fail("read: %s", strerror(errno));
            if (timer_clock_ms() >= end)
                cr_assert_fail("no EOF");
            turn(f, 2);
            continue;
        }
        got += (size_t)r;
    }
}

/* Nothing readable now (not EOF, no data). */
static void assert_quiet(int fd)
{
    uint8_t b;
    ssize_t r = read(fd, &b, 1);

    cr_assert(r < 0 && errno == EAGAIN, "fd %d unexpectedly readable (r=%zd)", fd, r);
}

/* ---- patterns, pumps and sinks ------------------------------------------ */

/* Byte i of stream `seed`: a pseudo-random 1 MiB table xored with a byte
 * derived from the block number, so that reordering both inside a block
 * and across blocks shows. Pumps and sinks work a block at a time so that
 * the test's own cost stays small next to the mux's. */
#define PAT_BLOCK (1u << 20)
static uint8_t pat_table[PAT_BLOCK];

static void pat_init(void)
{
    uint32_t x = 2463534242u;
    size_t i;

    for (i = 0; i < PAT_BLOCK; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        pat_table[i] = (uint8_t)x;
    }
}

/* Bytes [off, off + n) of stream seed; off + n must stay inside off's
 * block when called from the pumps, any range otherwise. */
static void pat_fill(uint8_t *p, uint8_t seed, uint64_t off, size_t n)
{
    while (n > 0) {
        size_t in = (size_t)(off % PAT_BLOCK), take = PAT_BLOCK - in, i;
        uint8_t k = (uint8_t)((off / PAT_BLOCK) * 151u + seed);

        uint64_t k8 = k * 0x0101010101010101ull, w;

        if (take > n)
            take = n;
        for (i = 0; i + 8 <= take; i += 8) {
            memcpy(&w, pat_table + in + i, 8);
            w ^= k8;
            memcpy(p + i, &w, 8);
        }
        for (; i < take; i++)
            p[i] = pat_table[in + i] ^ k;
        p += take;
        off += take;
        n -= take;
    }
}

/* Fletcher-style checksum over whole blocks (8-byte words, then the tail
 * of a last partial block): order-sensitive and computed over the same
 * block boundaries on both ends whatever the read/write split. */
struct csum {
    uint64_t a, b;
};

static void csum_block(struct csum *c, const uint8_t *p, size_t n)
{
    uint64_t a = c->a, b = c->b, w;

    for (; n >= 8; n -= 8, p += 8) {
        memcpy(&w, p, 8);
        a += w;
        b += a;
    }
    for (; n > 0; n--) {
        a += *p++;
        b += a;
    }
    c->a = a;
    c->b = b;
}

static bool csum_eq(const struct csum *x, const struct csum *y)
{
    return x->a == y->a && x->b == y->b;
}

#define IOBUF (256u << 10)

struct pump {
    struct eng_op op;
    struct eng *e;
    int fd;
    uint8_t seed;
    uint64_t off, total;
    struct csum sum;
    bool done;
    int err;
    struct iovec iov;
    uint8_t block[PAT_BLOCK];
};

static void pump_next(struct pump *p)
{
    size_t in = (size_t)(p->off % PAT_BLOCK), n = IOBUF;

    if (in == 0) {
        size_t blen = p->total - p->off < PAT_BLOCK ? (size_t)(p->total - p->off) : PAT_BLOCK;

        pat_fill(p->block, p->seed, p->off, blen);
        csum_block(&p->sum, p->block, blen);
    }
    if (n > PAT_BLOCK - in)
        n = PAT_BLOCK - in;
    if (n > p->total - p->off)
        n = (size_t)(p->total - p->off);
    p->iov = (struct iovec){ p->block + in, n };
    eng_send(p->e, &p->op, p->fd, &p->iov, 1);
}

static void pump_cb(struct eng_op *op, int res)
{
    struct pump *p = caa_container_of(op, struct pump, op);

    if (res < 0) {
        p->err = res;
        p->done = true;
        return;
    }
    p->off += (uint64_t)res;
    if (p->off < p->total)
        pump_next(p);
    else
        p->done = true;
}

static struct pump *pump_start(struct fx *f, int fd, uint8_t seed, uint64_t total)
{
    struct pump *p = calloc(1, sizeof(*p));

    cr_assert_not_null(p);
    eng_op_init(&p->op, pump_cb);
    p->e = f->e;
    p->fd = fd;
    p->seed = seed;
    p->total = total;
    pump_next(p);
    return p;
}

/* Receives straight into a block buffer; each completed block (and the
 * last partial one) is compared with the pattern and checksummed. */
struct sink {
    struct eng_op op;
    struct eng *e;
    int fd;
    uint8_t seed;
    uint64_t got, want, done_ms;
    uint64_t stop_at;             /* > 0: stall once this much is read */
    size_t chunk;                 /* > 0: recv at most this (a slow reader) */
    struct csum sum;
    bool stalled, armed, eof, bad, full;
    int err;
    uint8_t block[PAT_BLOCK], expect[PAT_BLOCK];
};

static void sink_arm(struct sink *s)
{
    size_t in = (size_t)(s->got % PAT_BLOCK), n = PAT_BLOCK - in;

    if (s->armed || s->stalled || s->eof || s->err != 0 || (s->stop_at > 0 && s->got >= s->stop_at))
        return;
    if (n > IOBUF)
        n = IOBUF;
    if (s->chunk > 0 && n > s->chunk)
        n = s->chunk;
    s->armed = true;
    eng_recv(s->e, &s->op, s->fd, s->block + in, n);
}

static void sink_block(struct sink *s, size_t len)
{
    uint64_t start = s->got - len;

    pat_fill(s->expect, s->seed, start, len);
    if (memcmp(s->expect, s->block, len) != 0)
        s->bad = true;
    csum_block(&s->sum, s->block, len);
}

static void sink_cb(struct eng_op *op, int res)
{
    struct sink *s = caa_container_of(op, struct sink, op);
    size_t in;

    s->armed = false;
    if (res == 0) {
        s->eof = true;
        return;
    }
    if (res < 0) {
        s->err = res;
        return;
    }
    s->got += (uint64_t)res;
    in = (size_t)(s->got % PAT_BLOCK);
    if (in == 0)
        sink_block(s, PAT_BLOCK);
    else if (s->got >= s->want)
        sink_block(s, in);
    if (s->got > s->want)
        s->bad = true;
    if (s->got >= s->want && !s->full) {
        s->full = true;
        s->done_ms = timer_clock_ms();
    }
    sink_arm(s);
}

static struct sink *sink_start(struct fx *f, int fd, uint8_t seed, uint64_t want, bool stalled)
{
    struct sink *s = calloc(1, sizeof(*s));

    cr_assert_not_null(s);
    eng_op_init(&s->op, sink_cb);
    s->e = f->e;
    s->fd = fd;
    s->seed = seed;
    s->want = want;
    s->stalled = stalled;
    sink_arm(s);
    return s;
}

static void sink_resume(struct sink *s)
{
    s->stalled = false;
    s->stop_at = 0;
    sink_arm(s);
}

/* Read again, and stall once `at` bytes are in (a reader that stops). */
static void sink_read_until(struct sink *s, uint64_t at)
{
    sink_resume(s);
    s->stop_at = at;
}

/* ---- gateway channels ---------------------------------------------------- */

static struct net_addr ip4(uint8_t a, uint8_t b, uint8_t c, uint8_t d, uint16_t port)
{
    struct net_addr x = { .family = AF_INET, .port = port, .ip = { a, b, c, d } };
    return x;
}

/* Open gateway channel i with a device socketpair; first bytes copied. */
static struct mux_chan *gw_open(struct fx *f, const struct net_addr *caller, const void *first,
                                size_t n)
{
    int sv[2];
    int i = f->ngw++;

    nb_pair(f, sv);
    own(f, sv[1]);
    f->devfd[i] = sv[1];
    f->gwc[i] = mux_chan_open(f->g.m, sv[0], caller, first, n);
    cr_assert_not_null(f->gwc[i]);
    return f->gwc[i];
}

/* Client channel index of gateway channel i (matched by id). */
static int cl_of(struct fx *f, int i)
{
    uint8_t id[FRAME_ID_LEN];
    int j;

    cr_assert(!f->g.closed[i]);
    memcpy(id, mux_chan_id(f->gwc[i]), FRAME_ID_LEN);
    for (j = 0; j < f->c.nnew; j++) {
        if (!f->c.closed[j] && memcmp(mux_chan_id(f->c.chans[j]), id, FRAME_ID_LEN) == 0)
            return j;
    }
    cr_assert_fail("client never saw gateway channel %d", i);
    return -1;
}

static bool new_seen(struct fx *f, void *arg)
{
    return f->c.nnew >= *(int *)arg;
}

static void wait_new(struct fx *f, int n)
{
    cr_assert(run_until(f, new_seen, &n, 5000), "client saw %d NEW of %d", f->c.nnew, n);
}

static const enum tc_kind ciphers[] = { TC_AES_CBC, TC_AES_GCM };

/* ---- tests: opening and relaying ---------------------------------------- */

static void open_relay(enum eng_kind kind, enum tc_kind ck, unsigned version)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 7, 5555);
    uint8_t buf[65536], exp[65536];
    int j;

    fx_init(&f, kind, version);
    fx_start(&f, ck, false);
    gw_open(&f, &caller, "hello", 5);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    cr_assert_eq(f.c.callers[j].family, AF_INET);
    cr_assert_eq(memcmp(f.c.callers[j].ip, (uint8_t[]){ 192, 0, 2, 7 }, 4), 0);
    cr_assert_eq(f.c.callers[j].port, 0);
    cr_assert(addr_equal(mux_chan_caller(f.c.chans[j]), &f.c.callers[j]));
    read_exact(&f, f.c.endfd[j], buf, 5, 3000);
    cr_assert_eq(memcmp(buf, "hello", 5), 0);

    /* 1 byte each way */
    write_all(&f, f.c.endfd[j], "x", 1);
    read_exact(&f, f.devfd[0], buf, 1, 3000);
    cr_assert_eq(buf[0], 'x');
    write_all(&f, f.devfd[0], "y", 1);
    read_exact(&f, f.c.endfd[j], buf, 1, 3000);
    cr_assert_eq(buf[0], 'y');

    /* 64 KiB each way */
    pat_fill(exp, 3, 0, sizeof(exp));
    write_all(&f, f.devfd[0], exp, sizeof(exp));
    read_exact(&f, f.c.endfd[j], buf, sizeof(buf), 5000);
    cr_assert_eq(memcmp(buf, exp, sizeof(exp)), 0);
    pat_fill(exp, 4, 0, sizeof(exp));
    write_all(&f, f.c.endfd[j], exp, sizeof(exp));
    read_exact(&f, f.devfd[0], buf, sizeof(buf), 5000);
    cr_assert_eq(memcmp(buf, exp, sizeof(exp)), 0);

    cr_assert_eq(st(&f.g)->frames_out[0], 1);
    cr_assert_eq(st(&f.c)->frames_in[0], 1);
    cr_assert_eq(st(&f.g)->chan_opened, 1);
    cr_assert_eq(st(&f.c)->chan_opened, 1);
    cr_assert_eq(st(&f.g)->bytes_from_local, 5 + 1 + 65536);
    cr_assert_eq(st(&f.c)->bytes_to_local, 5 + 1 + 65536);
    cr_assert_eq(st(&f.c)->bytes_from_local, 1 + 65536);
    cr_assert_eq(st(&f.g)->bytes_to_local, 1 + 65536);
    cr_assert_eq(st(&f.g)->frames_out[1], st(&f.c)->frames_in[1]);
    cr_assert_eq(st(&f.c)->frames_out[1], st(&f.g)->frames_in[1]);
    cr_assert_geq(st(&f.g)->batches, 1);
    cr_assert_eq(st(&f.g)->dropped_unknown_id + st(&f.c)->dropped_unknown_id, 0);
    cr_assert_eq(mux_channels(f.g.m), 1);
    cr_assert_eq(mux_channels(f.c.m), 1);
    cr_assert_eq(mux_chan_mux(f.c.chans[j]), f.c.m);
    cr_assert_eq(mux_eng(f.g.m), f.e);
    fx_end(&f);
    /* The tunnel went down under the channel. */
    cr_assert_eq(f.g.why[0], MUX_R_TUNNEL_DOWN);
    cr_assert_eq(f.c.why[j], MUX_R_TUNNEL_DOWN);
    cr_assert_eq(f.g.dead_why, MUX_R_SHUTDOWN);
}

MUX_TEST(open_v0_ipv4)
{
    size_t i;

    for (i = 0; i < 2; i++)
        open_relay(kind, ciphers[i], 0);
}

MUX_TEST(open_v1_v2_relay)
{
    size_t i;

    for (i = 0; i < 2; i++) {
        open_relay(kind, ciphers[i], 1);
        open_relay(kind, ciphers[i], 2);
    }
}

/* The caller address as each version carries it (4.5). */
static void caller_case(enum eng_kind kind, enum tc_kind ck, unsigned version,
                        const struct net_addr *in, const struct net_addr *want)
{
    struct fx f;
    int j;

    fx_init(&f, kind, version);
    fx_start(&f, ck, false);
    gw_open(&f, in, "z", 1);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    cr_assert_eq(f.c.callers[j].family, want->family);
    cr_assert_eq(memcmp(f.c.callers[j].ip, want->ip, 16), 0, "v%u caller mismatch", version);
    fx_end(&f);
}

MUX_TEST(caller_v2_ipv6)
{
    struct net_addr v6 = { .family = AF_INET6 }, mapped = { .family = AF_INET6 };
    struct net_addr zero = ip4(0, 0, 0, 0, 0), v4 = ip4(198, 51, 100, 9, 0);
    static const uint8_t ip6[16] = { 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x42 };
    size_t i;

    memcpy(v6.ip, ip6, 16);
    memcpy(mapped.ip, (uint8_t[]){ 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 198, 51, 100, 9 }, 16);
    v6.port = 4444;
    for (i = 0; i < 2; i++) {
        caller_case(kind, ciphers[i], 2, &v6, &v6);       /* family "6" */
        caller_case(kind, ciphers[i], 2, &mapped, &v4);   /* v4-mapped -> "4" */
        caller_case(kind, ciphers[i], 1, &v6, &zero);     /* v<2: 0.0.0.0 */
        caller_case(kind, ciphers[i], 0, &mapped, &v4);
    }
}

MUX_TEST(prefix_written_first)
{
    struct fx f;
    struct net_addr caller = ip4(203, 0, 113, 5, 1000);
    const char *pfx = "PROXY TCP4 203.0.113.5 127.0.0.1 1000 443\r\n";
    char buf[128];
    int j;

    fx_init(&f, kind, 2);
    f.c.prefix = pfx;
    fx_start(&f, TC_AES_GCM, false);
    gw_open(&f, &caller, "CLIENTHELLO", 11);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    read_exact(&f, f.c.endfd[j], buf, strlen(pfx) + 11, 3000);
    cr_assert_eq(memcmp(buf, pfx, strlen(pfx)), 0);
    cr_assert_eq(memcmp(buf + strlen(pfx), "CLIENTHELLO", 11), 0);
    /* the prefix is not payload */
    cr_assert_eq(st(&f.c)->bytes_to_local, 11);
    write_all(&f, f.devfd[0], "more", 4);
    read_exact(&f, f.c.endfd[j], buf, 4, 3000);
    cr_assert_eq(memcmp(buf, "more", 4), 0);
    fx_end(&f);
}

/* A PENDING channel queues DATA; peek shows the first frame whole even
 * above one queue chunk; attach delivers everything in order. */
MUX_TEST(pending_peek_then_attach)
{
    struct fx f;
    struct net_addr caller = ip4(10, 0, 0, 1, 0);
    static uint8_t first[100000], got[100000 + 6];
    const uint8_t *p;
    size_t n;
    int sv[2];

    fx_init(&f, kind, 2);
    f.c.mode = ATTACH_NEVER;
    fx_start(&f, TC_AES_CBC, false);
    pat_fill(first, 9, 0, sizeof(first));
    gw_open(&f, &caller, first, sizeof(first));
    wait_new(&f, 1);
    cr_assert(wait_count(&f, &f.c.pending_calls, 1, 3000));
    p = mux_chan_peek(f.c.chans[0], &n);
    cr_assert_geq(n, sizeof(first));
    cr_assert_eq(memcmp(p, first, sizeof(first)), 0);
    cr_assert_eq(mux_chan_queued(f.c.chans[0]), sizeof(first));
    write_all(&f, f.devfd[0], "second", 6);
    cr_assert(wait_count(&f, &f.c.pending_calls, 2, 3000));
    cr_assert_eq(mux_chan_queued(f.c.chans[0]), sizeof(first) + 6);
    mux_chan_set_udata(f.c.chans[0], &f);
    cr_assert_eq(mux_chan_udata(f.c.chans[0]), &f);

    nb_pair(&f, sv);
    own(&f, sv[1]);
    mux_chan_attach(f.c.chans[0], sv[0], NULL, 0);
    read_exact(&f, sv[1], got, sizeof(got), 5000);
    cr_assert_eq(memcmp(got, first, sizeof(first)), 0);
    cr_assert_eq(memcmp(got + sizeof(first), "second", 6), 0);
    fx_end(&f);
}

static void bulk(enum eng_kind kind, enum tc_kind ck, unsigned version, enum mux_splice spl)
{
    const uint64_t total = 64ull << 20;
    struct net_addr caller = ip4(192, 0, 2, 1, 0);
    struct pump *up, *down;
    struct sink *sup, *sdown;
    uint64_t t0;
    struct fx f;
    int j;

    fx_init(&f, kind, version);
    f.gcfg.splice = f.ccfg.splice = spl;
    fx_start(&f, ck, true);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    t0 = timer_clock_ms();
    down = pump_start(&f, f.devfd[0], 21, total);            /* device -> endpoint */
    up = pump_start(&f, f.c.endfd[j], 22, total);            /* endpoint -> device */
    sdown = sink_start(&f, f.c.endfd[j], 21, total, false);
    sup = sink_start(&f, f.devfd[0], 22, total, false);
    cr_assert(run_until(&f, flag_set, &sdown->full, 60000));
    cr_assert(run_until(&f, flag_set, &sup->full, 60000));
    cr_assert(down->done && up->done);
    cr_assert_eq(down->err, 0);
    cr_assert_eq(up->err, 0);
    cr_assert(!sdown->bad && !sup->bad, "bytes corrupted or reordered");
    cr_assert_eq(sdown->got, total);
    cr_assert_eq(sup->got, total);
    cr_assert(csum_eq(&sdown->sum, &down->sum), "checksum mismatch");
    cr_assert(csum_eq(&sup->sum, &up->sum), "checksum mismatch");
    cr_assert_eq(st(&f.g)->bytes_from_local, total);
    cr_assert_eq(st(&f.c)->bytes_to_local, total);
    /* Every payload byte received went one way: spliced or queued. */
    cr_assert_eq(st(&f.c)->bytes_spliced_in + st(&f.c)->bytes_queued_in, total);
    cr_assert_eq(st(&f.g)->bytes_spliced_in + st(&f.g)->bytes_queued_in, total);
    cr_assert_leq(st(&f.g)->bytes_spliced_out, st(&f.g)->bytes_from_local);
    cr_assert_leq(st(&f.c)->bytes_spliced_out, st(&f.c)->bytes_from_local);
    if (spl == MUX_SPLICE_ON) {
        cr_assert_gt(eng_stats(f.e)->splices, 0);
        cr_assert_gt(st(&f.c)->bytes_spliced_in + st(&f.g)->bytes_spliced_out, 0);
    }
    if (spl == MUX_SPLICE_OFF) {
        cr_assert_eq(eng_stats(f.e)->splices, 0);
        cr_assert_eq(st(&f.c)->bytes_spliced_in + st(&f.g)->bytes_spliced_in, 0);
        cr_assert_eq(st(&f.c)->bytes_spliced_out + st(&f.g)->bytes_spliced_out, 0);
    }
    cr_assert_eq(eng_stats(f.e)->pbuf_lent, 0);
    fprintf(stderr,
            "mux bulk engine=%s cipher=%s v%u splice=%s: device->endpoint %.0f MiB/s, "
            "endpoint->device %.0f MiB/s (64 MiB each way at once; %.1f frames/batch, "
            "%llu splices)\n",
            eng_name(f.e), tc_kind_name(ck), version, mux_splice_name(spl),
            64.0 * 1000.0 / (double)(sdown->done_ms - t0 + 1),
            64.0 * 1000.0 / (double)(sup->done_ms - t0 + 1),
            (double)st(&f.g)->batch_frames / (double)(st(&f.g)->batches + 1),
            (unsigned long long)eng_stats(f.e)->splices);
    fx_end(&f);
    free(up);
    free(down);
    free(sup);
    free(sdown);
}

MUX_TEST(bulk_64mib)
{
    pat_init();
    bulk(kind, TC_AES_CBC, 2, MUX_SPLICE_AUTO);
    bulk(kind, TC_AES_GCM, 2, MUX_SPLICE_AUTO);
}

/* The splice path both ways (and its absence), with the same checks. */
MUX_TEST(bulk_splice_on_off)
{
    pat_init();
    bulk(kind, TC_AES_GCM, 2, MUX_SPLICE_ON);
    bulk(kind, TC_AES_CBC, 1, MUX_SPLICE_ON);
    bulk(kind, TC_AES_CBC, 2, MUX_SPLICE_OFF);
}

MUX_TEST(many_channels)
{
    struct fx f;
    char msg[32], buf[32];
    int i, n = 200;

    fx_init(&f, kind, 2);
    fx_start(&f, TC_AES_GCM, false);
    for (i = 0; i < n; i++) {
        struct net_addr caller = ip4(10, 1, (uint8_t)(i >> 8), (uint8_t)i, 0);

        snprintf(msg, sizeof(msg), "hello-%03d", i);
        gw_open(&f, &caller, msg, strlen(msg));
    }
    cr_assert_eq(mux_channels(f.g.m), (size_t)n);
    wait_new(&f, n);
    cr_assert_eq(mux_channels(f.c.m), (size_t)n);
    for (i = 0; i < n; i++) {
        int j = cl_of(&f, i);

        cr_assert_eq(f.c.callers[j].ip[3], (uint8_t)i);
        snprintf(msg, sizeof(msg), "hello-%03d", i);
        read_exact(&f, f.c.endfd[j], buf, strlen(msg), 3000);
        cr_assert_eq(memcmp(buf, msg, strlen(msg)), 0);
        snprintf(msg, sizeof(msg), "back-%03d", i);
        write_all(&f, f.c.endfd[j], msg, strlen(msg));
    }
    for (i = 0; i < n; i++) {
        snprintf(msg, sizeof(msg), "back-%03d", i);
        read_exact(&f, f.devfd[i], buf, strlen(msg), 3000);
        cr_assert_eq(memcmp(buf, msg, strlen(msg)), 0);
    }
    /* every device half-closes: local EOF -> CLOSE -> endpoint EOF */
    for (i = 0; i < n; i++)
        shutdown(f.devfd[i], SHUT_WR);
    cr_assert(wait_count(&f, &f.c.nclosed, n, 5000));
    cr_assert(wait_count(&f, &f.g.nclosed, n, 5000));
    for (i = 0; i < n; i++) {
        cr_assert_eq(f.g.why[i], MUX_R_LOCAL_EOF);
        cr_assert_eq(f.c.why[i], MUX_R_PEER_CLOSE);
        cr_assert_eq(read_eof(&f, f.c.endfd[i], NULL, 0, 3000), 0);
        cr_assert_eq(read_eof(&f, f.devfd[i], NULL, 0, 3000), 0);
    }
    cr_assert_eq(st(&f.g)->chan_closed[MUX_R_LOCAL_EOF], (uint64_t)n);
    cr_assert_eq(st(&f.c)->chan_closed[MUX_R_PEER_CLOSE], (uint64_t)n);
    cr_assert_eq(st(&f.g)->frames_out[2], (uint64_t)n);
    cr_assert_eq(st(&f.c)->frames_in[2], (uint64_t)n);
    cr_assert_eq(st(&f.c)->frames_out[2], 0); /* CLOSE is never answered */
    /* NEW and first DATA of many channels shared batches */
    cr_assert_gt(st(&f.g)->batch_frames, 2 * st(&f.g)->batches);
    cr_assert_eq(mux_channels(f.g.m), 0);
    cr_assert_eq(mux_channels(f.c.m), 0);
    fx_end(&f);
}

/* Channel traffic both ways on n channels, then every device half-closes
 * and both sides see every channel close. */
static void exchange(struct fx *f, int n)
{
    char msg[32], buf[32];
    int i;

    for (i = 0; i < n; i++) {
        struct net_addr caller = ip4(10, 2, 0, (uint8_t)i, 0);

        snprintf(msg, sizeof(msg), "hi-%03d", i);
        gw_open(f, &caller, msg, strlen(msg));
    }
    wait_new(f, n);
    for (i = 0; i < n; i++) {
        int j = cl_of(f, i);

        snprintf(msg, sizeof(msg), "hi-%03d", i);
        read_exact(f, f->c.endfd[j], buf, strlen(msg), 3000);
        cr_assert_eq(memcmp(buf, msg, strlen(msg)), 0);
        snprintf(msg, sizeof(msg), "back-%03d", i);
        write_all(f, f->c.endfd[j], msg, strlen(msg));
    }
    for (i = 0; i < n; i++) {
        snprintf(msg, sizeof(msg), "back-%03d", i);
        read_exact(f, f->devfd[i], buf, strlen(msg), 3000);
        cr_assert_eq(memcmp(buf, msg, strlen(msg)), 0);
    }
}

/* mux_cfg.batch = false (the ablation knob): one frame per send, and the
 * relay still works; the same exchange batched shares sends. */
MUX_TEST(unbatched_one_frame_per_send)
{
    struct fx f;

    fx_init(&f, kind, 2);
    f.gcfg.batch = f.ccfg.batch = false;
    fx_start(&f, TC_AES_GCM, false);
    mux_ping(f.c.m);
    exchange(&f, 50);
    cr_assert(wait_count(&f, &f.c.pongs, 1, 3000));
    cr_assert_geq(st(&f.g)->batches, 50 * 2 + 1);
    cr_assert_eq(st(&f.g)->batch_frames, st(&f.g)->batches);
    cr_assert_eq(st(&f.c)->batch_frames, st(&f.c)->batches);
    fx_end(&f);

    fx_init(&f, kind, 2);
    fx_start(&f, TC_AES_GCM, false);
    exchange(&f, 50);
    cr_assert_gt(st(&f.g)->batch_frames, 2 * st(&f.g)->batches);
    fx_end(&f);
}

/* Engine-picked buffers go back once the data is forwarded: an idle pair
 * of muxes with open channels holds none (io_uring: not even a ring
 * buffer for the recvs waiting on every socket). */
MUX_TEST(idle_holds_no_buffers)
{
    struct fx f;
    const struct eng_stats *es;

    fx_init(&f, kind, 2);
    fx_start(&f, TC_AES_CBC, false);
    es = eng_stats(f.e);
    exchange(&f, 20);
    run_for(&f, 50);
    cr_assert_gt(es->pbuf_ring + es->pbuf_heap, 0);
    cr_assert_eq(es->pbuf_lent, 0, "%llu buffers still held",
                 (unsigned long long)es->pbuf_lent);
    cr_assert_eq(mux_channels(f.g.m), 20);
    fx_end(&f);
}

/* First bytes above the largest engine buffer travel in a buffer of their
 * own, as one DATA frame. */
MUX_TEST(first_bytes_above_engine_buffer)
{
    struct fx f;
    struct net_addr caller = ip4(10, 0, 0, 3, 0);
    size_t n = ENG_PBUF_BIG + 4321;
    uint8_t *first = malloc(n), *got = malloc(n);
    int j;

    cr_assert(first && got);
    fx_init(&f, kind, 2);
    fx_start(&f, TC_AES_GCM, false);
    pat_fill(first, 11, 0, n);
    gw_open(&f, &caller, first, n);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    read_exact(&f, f.c.endfd[j], got, n, 5000);
    cr_assert_eq(memcmp(got, first, n), 0);
    cr_assert_eq(st(&f.g)->frames_out[1], 1);
    cr_assert_eq(eng_stats(f.e)->pbuf_lent, 0);
    fx_end(&f);
    free(first);
    free(got);
}

/* ---- tests: closing ------------------------------------------------------ */

MUX_TEST(close_from_gateway)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 2, 0);
    char buf[16];
    int j;

    fx_init(&f, kind, 1);
    fx_start(&f, TC_AES_CBC, false);
    gw_open(&f, &caller, "data-before", 11);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    mux_chan_close(f.gwc[0], MUX_R_REFUSED);
    mux_chan_close(f.gwc[0], MUX_R_REFUSED); /* idempotent */
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert_eq(f.g.why[0], MUX_R_REFUSED);
    cr_assert_eq(f.c.why[j], MUX_R_PEER_CLOSE);
    /* data sent before the CLOSE is delivered, then EOF */
    cr_assert_eq(read_eof(&f, f.c.endfd[j], buf, sizeof(buf), 3000), 11);
    cr_assert_eq(memcmp(buf, "data-before", 11), 0);
    cr_assert_eq(read_eof(&f, f.devfd[0], NULL, 0, 3000), 0);
    cr_assert_eq(st(&f.g)->chan_closed[MUX_R_REFUSED], 1);
    cr_assert_eq(st(&f.g)->frames_out[2], 1);
    cr_assert_eq(st(&f.c)->frames_out[2], 0);
    fx_end(&f);
}

MUX_TEST(close_from_client)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 3, 0);
    static uint8_t big[100000], got[100000];
    int j;

    fx_init(&f, kind, 2);
    fx_start(&f, TC_AES_GCM, false);
    gw_open(&f, &caller, "x", 1);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    /* the endpoint sends 100 000 bytes and closes: the gateway writes them
     * all to the device before closing it (4.7) */
    pat_fill(big, 5, 0, sizeof(big));
    write_all(&f, f.c.endfd[j], big, sizeof(big));
    shutdown(f.c.endfd[j], SHUT_WR);
    cr_assert_eq(read_eof(&f, f.devfd[0], got, sizeof(got), 5000), sizeof(big));
    cr_assert_eq(memcmp(got, big, sizeof(big)), 0);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert_eq(f.c.why[j], MUX_R_LOCAL_EOF);
    cr_assert_eq(f.g.why[0], MUX_R_PEER_CLOSE);
    cr_assert_eq(st(&f.c)->frames_out[2], 1);

    /* the role closes a client channel: the device sees EOF */
    gw_open(&f, &caller, "y", 1);
    wait_new(&f, 2);
    j = cl_of(&f, 1);
    mux_chan_close(f.c.chans[j], MUX_R_CONNECT_FAIL);
    cr_assert(wait_count(&f, &f.g.nclosed, 2, 3000));
    cr_assert_eq(f.g.why[1], MUX_R_PEER_CLOSE);
    cr_assert_eq(read_eof(&f, f.devfd[1], NULL, 0, 3000), 0);
    cr_assert(wait_count(&f, &f.c.nclosed, 2, 3000));
    cr_assert_eq(f.c.why[j], MUX_R_CONNECT_FAIL);
    cr_assert_eq(st(&f.c)->chan_closed[MUX_R_CONNECT_FAIL], 1);
    fx_end(&f);
}

MUX_TEST(refused_on_new)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 4, 0);

    fx_init(&f, kind, 0);
    f.c.mode = ATTACH_REFUSE;
    fx_start(&f, TC_AES_CBC, false);
    gw_open(&f, &caller, "hi", 2);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert_eq(f.g.why[0], MUX_R_PEER_CLOSE);
    cr_assert_eq(read_eof(&f, f.devfd[0], NULL, 0, 3000), 0);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert_eq(f.c.why[0], MUX_R_REFUSED);
    fx_end(&f);
}

MUX_TEST(local_eof_sends_close)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 5, 0);
    char buf[8];
    int j;

    fx_init(&f, kind, 2);
    fx_start(&f, TC_AES_CBC, false);
    gw_open(&f, &caller, "abc", 3);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    read_exact(&f, f.c.endfd[j], buf, 3, 3000);
    shutdown(f.devfd[0], SHUT_WR);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert_eq(read_eof(&f, f.c.endfd[j], NULL, 0, 3000), 0);
    cr_assert_eq(f.c.why[j], MUX_R_PEER_CLOSE);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert_eq(f.g.why[0], MUX_R_LOCAL_EOF);
    cr_assert_eq(st(&f.g)->frames_out[2], 1);
    cr_assert_eq(read_eof(&f, f.devfd[0], NULL, 0, 3000), 0);
    fx_end(&f);
}

MUX_TEST(tunnel_eof_closes_everything)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 6, 0);
    char buf[4];
    int i;

    fx_init(&f, kind, 1);
    fx_start(&f, TC_AES_GCM, false);
    for (i = 0; i < 3; i++)
        gw_open(&f, &caller, "abc", 3);
    wait_new(&f, 3);
    for (i = 0; i < 3; i++)
        read_exact(&f, f.c.endfd[cl_of(&f, i)], buf, 3, 3000);
    mux_close(f.g.m, MUX_R_REPLACED);
    mux_close(f.g.m, MUX_R_SHUTDOWN); /* idempotent: the first reason stays */
    cr_assert(wait_flag(&f, &f.g.dead, 3000));
    cr_assert(wait_flag(&f, &f.c.dead, 3000));
    cr_assert_eq(f.g.dead_why, MUX_R_REPLACED);
    cr_assert_eq(f.c.dead_why, MUX_R_PEER_EOF);
    cr_assert_eq(f.g.nclosed, 3);
    cr_assert_eq(f.c.nclosed, 3);
    for (i = 0; i < 3; i++) {
        cr_assert_eq(f.g.why[i], MUX_R_TUNNEL_DOWN);
        cr_assert_eq(f.c.why[i], MUX_R_TUNNEL_DOWN);
        cr_assert_eq(read_eof(&f, f.devfd[i], NULL, 0, 3000), 0);
        cr_assert_eq(read_eof(&f, f.c.endfd[i], NULL, 0, 3000), 0);
    }
    cr_assert_eq(f.g.final.frames_out[2] + f.c.final.frames_out[2], 0);
    cr_assert_eq(f.g.final.chan_closed[MUX_R_TUNNEL_DOWN], 3);
    fx_end(&f);
    cr_assert_eq(f.g.dead_calls, 1);
    cr_assert_eq(f.c.dead_calls, 1);
}

MUX_TEST(max_channels)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 8, 0);
    int sv[2];

    fx_init(&f, kind, 2);
    f.gcfg.max_channels = 2;
    fx_start(&f, TC_AES_GCM, false);
    gw_open(&f, &caller, "a", 1);
    gw_open(&f, &caller, "b", 1);
    nb_pair(&f, sv);
    own(&f, sv[1]);
    cr_assert_null(mux_chan_open(f.g.m, sv[0], &caller, (const uint8_t *)"c", 1));
    cr_assert_eq(read_eof(&f, sv[1], NULL, 0, 3000), 0);
    cr_assert_eq(st(&f.g)->chan_closed[MUX_R_LIMIT], 1);
    cr_assert_eq(mux_channels(f.g.m), 2);
    fx_end(&f);
}

/* ---- tests: flow control ------------------------------------------------- */

static bool chan_paused(struct fx *f, void *arg)
{
    return mux_chan_paused(f->gwc[0]);
}

static bool chan_running(struct fx *f, void *arg)
{
    return !mux_chan_paused(f->gwc[0]);
}

static void pause_case(enum eng_kind kind, unsigned version)
{
    const uint64_t total = 8u << 20;
    struct net_addr caller = ip4(192, 0, 2, 9, 0);
    struct pump *p;
    struct sink *s;
    uint64_t read_at, queued_at;
    struct fx f;
    int j;

    fx_init(&f, kind, version);
    f.ccfg.in_high = 256u << 10;
    f.ccfg.in_low = 64u << 10;
    fx_start(&f, TC_AES_GCM, false);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    s = sink_start(&f, f.c.endfd[j], 31, total, true);
    p = pump_start(&f, f.devfd[0], 31, total);
    cr_assert(run_until(&f, chan_paused, NULL, 5000), "gateway channel never paused");
    /* the endpoint socket's own buffer absorbs some data first, so the
     * channel may go under and back above water before it settles paused */
    run_for(&f, 200);
    cr_assert(mux_chan_paused(f.gwc[0]));
    cr_assert_geq(st(&f.c)->pauses_sent, 1);
    cr_assert_eq(st(&f.c)->pauses_sent, st(&f.c)->resumes_sent + 1);
    cr_assert_eq(st(&f.g)->frames_in[4], st(&f.c)->pauses_sent);
    /* once paused, the device socket is no longer read: at most the recv
     * that was in flight completes */
    run_for(&f, 100);
    read_at = st(&f.g)->bytes_from_local;
    queued_at = mux_chan_queued(f.c.chans[j]);
    run_for(&f, 300);
    cr_assert_eq(st(&f.g)->bytes_from_local, read_at);
    cr_assert_eq(mux_chan_queued(f.c.chans[j]), queued_at);
    cr_assert_gt(queued_at, f.ccfg.in_low);
    cr_assert_lt(read_at, total);
    /* the endpoint reads again: RESUME, and everything arrives intact */
    sink_resume(s);
    cr_assert(run_until(&f, flag_set, &s->full, 20000));
    cr_assert(!s->bad);
    cr_assert(csum_eq(&s->sum, &p->sum), "checksum mismatch");
    cr_assert_geq(st(&f.c)->resumes_sent, 1);
    cr_assert(run_until(&f, chan_running, NULL, 3000));
    cr_assert_eq(st(&f.c)->resumes_sent, st(&f.g)->frames_in[5]);
    cr_assert_eq(st(&f.c)->pauses_sent, st(&f.g)->frames_in[4]);
    cr_assert_eq(f.c.nclosed, 0);
    fx_end(&f);
    free(p);
    free(s);
}

MUX_TEST(pause_resume_v1_v2)
{
    pat_init();
    pause_case(kind, 1);
    pause_case(kind, 2);
}

MUX_TEST(v0_queue_limit_closes)
{
    struct net_addr caller = ip4(192, 0, 2, 10, 0);
    struct pump *p;
    struct sink *s;
    struct fx f;
    int j;

    pat_init();
    fx_init(&f, kind, 0);
    f.ccfg.in_high = 64u << 10; /* v0: watermarks are not acted on */
    f.ccfg.in_low = 16u << 10;
    f.ccfg.in_limit = 1u << 20;
    fx_start(&f, TC_AES_CBC, false);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    s = sink_start(&f, f.c.endfd[j], 41, 8u << 20, true);
    p = pump_start(&f, f.devfd[0], 41, 8u << 20);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 5000));
    cr_assert_eq(f.c.why[j], MUX_R_QUEUE_LIMIT);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 5000));
    cr_assert_eq(f.g.why[0], MUX_R_PEER_CLOSE);
    cr_assert_eq(st(&f.c)->pauses_sent, 0);
    cr_assert_eq(st(&f.c)->chan_closed[MUX_R_QUEUE_LIMIT], 1);
    cr_assert_eq(st(&f.c)->frames_out[2], 1);
    cr_assert(run_until(&f, flag_set, &p->done, 5000));
    cr_assert_lt(p->err, 0); /* the device socket was closed under the pump */
    fx_end(&f);
    free(p);
    free(s);
}

/* The tunnel's queues together pass tunnel_in_limit: the channel holding
 * the most (a stalled reader) is closed, a reading channel beside it keeps
 * going and its bytes arrive intact. */
MUX_TEST(tunnel_queue_cap_closes_biggest)
{
    const uint64_t total = 4u << 20;
    struct net_addr caller = ip4(192, 0, 2, 12, 0);
    struct pump *pa, *pb;
    struct sink *sa, *sb;
    struct fx f;
    int ja, jb;

    pat_init();
    fx_init(&f, kind, 0);
    f.ccfg.tunnel_in_limit = 4u << 20;
    fx_start(&f, TC_AES_CBC, false);
    gw_open(&f, &caller, NULL, 0);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 2);
    ja = cl_of(&f, 0);
    jb = cl_of(&f, 1);
    sa = sink_start(&f, f.c.endfd[ja], 60, 32u << 20, true);
    pa = pump_start(&f, f.devfd[0], 60, 32u << 20);
    sb = sink_start(&f, f.c.endfd[jb], 61, total, false);
    pb = pump_start(&f, f.devfd[1], 61, total);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 10000));
    cr_assert_eq(f.c.why[ja], MUX_R_QUEUE_LIMIT);
    cr_assert(!f.c.closed[jb], "the reading channel was closed");
    cr_assert(run_until(&f, flag_set, &sb->full, 20000));
    cr_assert(!sb->bad);
    cr_assert(csum_eq(&sb->sum, &pb->sum), "checksum mismatch");
    cr_assert_eq(st(&f.c)->tunnel_overflows, 1);
    cr_assert_eq(st(&f.c)->chan_closed[MUX_R_QUEUE_LIMIT], 1);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 5000));
    cr_assert_eq(f.g.why[0], MUX_R_PEER_CLOSE);
    fx_end(&f);
    free(pa);
    free(sa);
    free(pb);
    free(sb);
}

/* One channel's endpoint never reads; another channel's 8 MiB transfer in
 * both directions still completes (5.2: never stall other channels). */
static void isolation_case(enum eng_kind kind, unsigned version, enum mux_splice spl)
{
    const uint64_t total = 8u << 20;
    struct net_addr caller = ip4(192, 0, 2, 11, 0);
    struct pump *pa, *pdown, *pup;
    struct sink *sa, *sdown, *sup;
    struct fx f;
    int ja, jb;

    fx_init(&f, kind, version);
    f.gcfg.splice = f.ccfg.splice = spl;
    fx_start(&f, TC_AES_GCM, false);
    gw_open(&f, &caller, NULL, 0);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 2);
    ja = cl_of(&f, 0);
    jb = cl_of(&f, 1);
    sa = sink_start(&f, f.c.endfd[ja], 50, 32u << 20, true);
    pa = pump_start(&f, f.devfd[0], 50, 32u << 20);
    run_for(&f, 50);
    pdown = pump_start(&f, f.devfd[1], 51, total);
    pup = pump_start(&f, f.c.endfd[jb], 52, total);
    sdown = sink_start(&f, f.c.endfd[jb], 51, total, false);
    sup = sink_start(&f, f.devfd[1], 52, total, false);
    cr_assert(run_until(&f, flag_set, &sdown->full, 20000));
    cr_assert(run_until(&f, flag_set, &sup->full, 20000));
    cr_assert(!sdown->bad && !sup->bad);
    cr_assert(csum_eq(&sdown->sum, &pdown->sum), "checksum mismatch");
    cr_assert(csum_eq(&sup->sum, &pup->sum), "checksum mismatch");
    cr_assert_eq(sa->got, 0);
    cr_assert(!f.g.closed[0] && !f.c.closed[ja], "stalled channel was closed");
    if (version >= 1)
        cr_assert_geq(st(&f.c)->pauses_sent, 1);
    else
        cr_assert_eq(st(&f.c)->pauses_sent, 0);
    fx_end(&f);
    free(pa);
    free(sa);
    free(pdown);
    free(pup);
    free(sdown);
    free(sup);
}

MUX_TEST(stalled_channel_isolated)
{
    pat_init();
    isolation_case(kind, 2, MUX_SPLICE_AUTO);
    isolation_case(kind, 0, MUX_SPLICE_AUTO);
}

/* A channel opened after another one's reader stalled (the tunnel may be
 * waiting to splice into that reader) still opens and relays within the
 * tick bound. */
static void late_open_case(enum eng_kind kind, enum mux_splice spl, bool tcp)
{
    struct net_addr caller = ip4(192, 0, 2, 12, 0);
    struct pump *pa;
    struct sink *sa;
    struct fx f;
    char buf[8];
    int ja, jb;

    fx_init(&f, kind, 2);
    f.gcfg.splice = f.ccfg.splice = spl;
    fx_start(&f, TC_AES_CBC, tcp);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 1);
    ja = cl_of(&f, 0);
    sa = sink_start(&f, f.c.endfd[ja], 60, 64u << 20, true);
    pa = pump_start(&f, f.devfd[0], 60, 64u << 20);
    run_for(&f, 500);
    gw_open(&f, &caller, "hello", 5);
    wait_new(&f, 2);
    jb = cl_of(&f, 1);
    read_exact(&f, f.c.endfd[jb], buf, 5, 6000);
    cr_assert_eq(memcmp(buf, "hello", 5), 0);
    write_all(&f, f.c.endfd[jb], "back", 4);
    read_exact(&f, f.devfd[1], buf, 4, 6000);
    cr_assert_eq(memcmp(buf, "back", 4), 0);
    cr_assert_eq(sa->got, 0);
    fx_end(&f);
    free(pa);
    free(sa);
}

MUX_TEST(late_open_beside_stalled_reader)
{
    pat_init();
    late_open_case(kind, MUX_SPLICE_OFF, true);
    late_open_case(kind, MUX_SPLICE_AUTO, true);
    late_open_case(kind, MUX_SPLICE_ON, true);
}

/* With every payload spliced, a stalled reader still holds up nobody: its
 * pipe fills, the rest goes to its queue, and the water marks PAUSE it. */
MUX_TEST(stalled_channel_isolated_splice)
{
    pat_init();
    isolation_case(kind, 2, MUX_SPLICE_ON);
    isolation_case(kind, 1, MUX_SPLICE_ON);
}

/* ---- tests: the incoming splice (per-channel pipes) ----------------------- */

/* Open n gateway channels over a TCP tunnel whose only splicing side is
 * the client's incoming one (gateway splice off, no client -> gateway
 * bulk), so that eng_stats()->splices counts incoming splices alone.
 * The client reads the tunnel 64 KiB at a time: 256 KiB payloads then
 * run past the end of its buffer whatever the engine's timing (with
 * reads as large as payloads, their ends can stay aligned). */
static void spl_fx(struct fx *f, enum eng_kind kind, unsigned version, enum mux_splice spl,
                   int n)
{
    int i;

    fx_init(f, kind, version);
    f->gcfg.splice = MUX_SPLICE_OFF;
    f->ccfg.splice = spl;
    f->ccfg.rx_size = 64u << 10;
    fx_start(f, TC_AES_GCM, true);
    for (i = 0; i < n; i++) {
        struct net_addr caller = ip4(192, 0, 2, 70, (uint16_t)i);

        gw_open(f, &caller, NULL, 0);
    }
    wait_new(f, n);
}

/* Several channels, every local reader slower than the tunnel (small
 * recvs): large payloads still go through each channel's pipe (the old
 * tunnel-wide pipe copied as soon as a second channel was open and the
 * writer busy), and every stream arrives exact and in order. */
static void slow_readers_case(enum eng_kind kind, unsigned version, enum mux_splice spl)
{
    enum { N = 3 };
    const uint64_t total = 16u << 20;
    struct pump *p[N];
    struct sink *s[N];
    uint64_t splices0;
    struct fx f;
    int i;

    spl_fx(&f, kind, version, spl, N);
    splices0 = eng_stats(f.e)->splices;
    for (i = 0; i < N; i++) {
        int j = cl_of(&f, i);

        s[i] = sink_start(&f, f.c.endfd[j], (uint8_t)(80 + i), total, true);
        s[i]->chunk = 16u << 10;
        sink_resume(s[i]);
        p[i] = pump_start(&f, f.devfd[i], (uint8_t)(80 + i), total);
    }
    for (i = 0; i < N; i++) {
        cr_assert(run_until(&f, flag_set, &s[i]->full, 60000), "stream %d: %llu of %llu", i,
                  (unsigned long long)s[i]->got, (unsigned long long)total);
        cr_assert(!s[i]->bad, "stream %d corrupted or reordered", i);
        cr_assert(csum_eq(&s[i]->sum, &p[i]->sum), "stream %d checksum mismatch", i);
    }
    cr_assert_eq(st(&f.c)->bytes_to_local, N * total);
    cr_assert_eq(st(&f.g)->bytes_from_local, N * total);
    /* ~N * total bytes through 1 MiB pipes: about one splice in and one
     * out per MiB when every large payload splices; copying them all
     * would make none. How many is timing (payloads copied while a pipe
     * was full): logged, and asserted only that the pipes were used. */
    cr_log_info("%llu splices for %d x %llu MiB",
                (unsigned long long)(eng_stats(f.e)->splices - splices0), N,
                (unsigned long long)(total >> 20));
    cr_assert_gt(eng_stats(f.e)->splices - splices0, 0, "nothing spliced");
    cr_assert_eq(f.c.nclosed + f.g.nclosed, 0);
    fx_end(&f);
    for (i = 0; i < N; i++) {
        free(p[i]);
        free(s[i]);
    }
}

MUX_TEST(slow_readers_splice)
{
    pat_init();
    slow_readers_case(kind, 2, MUX_SPLICE_AUTO);
    slow_readers_case(kind, 0, MUX_SPLICE_ON);
}

static bool gw0_paused(struct fx *f, void *arg)
{
    return mux_chan_paused(f->gwc[0]);
}

/* One reader stalls: its payloads fill its pipe (the water marks count
 * pipe bytes: in_high is below the pipe's size, so it PAUSEs on them),
 * while the other channel on the same tunnel keeps streaming through its
 * own pipe. Once the reader reads again, everything arrives in order. */
static void stalled_pipe_case(enum eng_kind kind, unsigned version)
{
    const uint64_t total = 8u << 20;
    struct net_addr caller = ip4(192, 0, 2, 71, 0);
    struct pump *pa, *pb;
    struct sink *sa, *sb;
    uint64_t spl_before;
    struct fx f;
    int ja, jb;

    fx_init(&f, kind, version);
    f.gcfg.splice = MUX_SPLICE_OFF;
    f.ccfg.splice = MUX_SPLICE_AUTO;
    f.ccfg.in_high = 512u << 10;
    f.ccfg.in_low = 128u << 10;
    f.ccfg.rx_size = 64u << 10; /* see spl_fx */
    fx_start(&f, TC_AES_GCM, true);
    gw_open(&f, &caller, NULL, 0);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 2);
    ja = cl_of(&f, 0);
    jb = cl_of(&f, 1);
    /* channel a streams (through its pipe), then its reader stops */
    sa = sink_start(&f, f.c.endfd[ja], 90, total, true);
    sink_read_until(sa, 2u << 20);
    pa = pump_start(&f, f.devfd[0], 90, total);
    cr_assert(run_until(&f, gw0_paused, NULL, 5000), "the stalled channel never paused");
    spl_before = eng_stats(f.e)->splices;
    cr_assert_gt(spl_before, 0, "the stalled channel's payloads were not spliced");
    cr_assert_geq(mux_chan_queued(f.c.chans[ja]), f.ccfg.in_high);
    /* the other channel streams meanwhile, through its pipe */
    sb = sink_start(&f, f.c.endfd[jb], 91, total, false);
    pb = pump_start(&f, f.devfd[1], 91, total);
    cr_assert(run_until(&f, flag_set, &sb->full, 20000));
    cr_assert(!sb->bad);
    cr_assert(csum_eq(&sb->sum, &pb->sum), "checksum mismatch");
    cr_assert_gt(eng_stats(f.e)->splices, spl_before + 2);
    cr_assert_lt(sa->got, total);
    cr_assert(mux_chan_paused(f.gwc[0]), "still paused: its reader takes nothing");
    /* the stalled reader reads again: RESUME, and its bytes come in order */
    sink_resume(sa);
    cr_assert(run_until(&f, flag_set, &sa->full, 20000));
    cr_assert(!sa->bad, "pipe and queue bytes out of order");
    cr_assert(csum_eq(&sa->sum, &pa->sum), "checksum mismatch");
    cr_assert_geq(st(&f.c)->resumes_sent, 1);
    cr_assert_eq(st(&f.c)->bytes_to_local, 2 * total);
    cr_assert_eq(f.c.nclosed + f.g.nclosed, 0);
    fx_end(&f);
    free(pa);
    free(pb);
    free(sa);
    free(sb);
}

MUX_TEST(stalled_reader_pipe_pauses)
{
    pat_init();
    stalled_pipe_case(kind, 2);
    stalled_pipe_case(kind, 1);
}

/* The tunnel's only channel, its reader slower than the tunnel (small
 * recvs) but reading: the pipe (1 MiB) is smaller than in_high (2 MiB),
 * so without the bounded wait for its writer a large part of the stream
 * would overflow into the queue; with it most of it splices
 * (bytes_queued_in, logged). Copied: the first payloads (before the pipe), small
 * payloads (below the threshold), and whatever a wait that timed out
 * lets through. */
static void single_slow_case(enum eng_kind kind, unsigned version)
{
    const uint64_t total = 32u << 20;
    struct pump *p;
    struct sink *s;
    uint64_t splices0, queued;
    struct fx f;
    int j;

    spl_fx(&f, kind, version, MUX_SPLICE_AUTO, 1);
    splices0 = eng_stats(f.e)->splices;
    j = cl_of(&f, 0);
    s = sink_start(&f, f.c.endfd[j], 95, total, true);
    s->chunk = 16u << 10;
    sink_resume(s);
    p = pump_start(&f, f.devfd[0], 95, total);
    cr_assert(run_until(&f, flag_set, &s->full, 60000), "%llu of %llu",
              (unsigned long long)s->got, (unsigned long long)total);
    cr_assert(!s->bad, "corrupted or reordered");
    cr_assert(csum_eq(&s->sum, &p->sum), "checksum mismatch");
    cr_assert_eq(st(&f.c)->bytes_to_local, total);
    /* How much splices depends on timing (a wait that times out makes the
     * channel copy until it holds nothing; ASan runs measured 29 % copied,
     * plain builds under 1/16): asserted is that the splice path carried
     * the stream, not how much of it; speed is for bench/. */
    queued = st(&f.c)->bytes_queued_in;
    cr_log_info("v%u: %llu of %llu bytes went through the queue", version,
                (unsigned long long)queued, (unsigned long long)total);
    cr_assert_lt(queued, total, "v%u: everything was copied", version);
    cr_assert_gt(eng_stats(f.e)->splices - splices0, 0);
    cr_assert_eq(f.c.nclosed + f.g.nclosed, 0);
    fx_end(&f);
    free(p);
    free(s);
}

MUX_TEST(single_slow_reader_splices)
{
    pat_init();
    single_slow_case(kind, 2);
    single_slow_case(kind, 0);
}

static bool pongs_at_least(struct fx *f, void *arg)
{
    return f->g.pongs >= *(int *)arg;
}

/* The tunnel's only channel stops reading with its pipe full: the tunnel
 * waits for its writer at most MUX_SPLICE_WAIT_MS, then copies (so its
 * bytes reach in_high and PAUSE the peer), and PINGs are answered all
 * along; once the reader reads again everything arrives in order. */
static void single_stalled_case(enum eng_kind kind, unsigned version)
{
    const uint64_t total = 8u << 20;
    struct pump *p;
    struct sink *s;
    struct fx f;
    int i, j;

    spl_fx(&f, kind, version, MUX_SPLICE_AUTO, 1);
    j = cl_of(&f, 0);
    s = sink_start(&f, f.c.endfd[j], 96, total, true);
    sink_read_until(s, 2u << 20);
    p = pump_start(&f, f.devfd[0], 96, total);
    for (i = 1; i <= 5; i++) {
        mux_ping(f.g.m);
        cr_assert(run_until(&f, pongs_at_least, &i, 1000), "v%u ping %d not answered", version,
                  i);
    }
    cr_assert(run_until(&f, gw0_paused, NULL, 5000), "the stalled channel never paused");
    cr_assert_gt(st(&f.c)->bytes_queued_in, 0, "the wait never timed out");
    cr_assert_lt(s->got, total);
    mux_ping(f.g.m);
    cr_assert(run_until(&f, pongs_at_least, &i, 1000), "v%u ping while paused", version);
    sink_resume(s);
    cr_assert(run_until(&f, flag_set, &s->full, 20000));
    cr_assert(!s->bad, "pipe and queue bytes out of order");
    cr_assert(csum_eq(&s->sum, &p->sum), "checksum mismatch");
    cr_assert_eq(st(&f.c)->bytes_to_local, total);
    cr_assert_eq(f.c.nclosed + f.g.nclosed, 0);
    fx_end(&f);
    free(p);
    free(s);
}

MUX_TEST(single_stalled_reader_pings)
{
    pat_init();
    single_stalled_case(kind, 2);
    single_stalled_case(kind, 1);
}

static bool close_seen(struct fx *f, void *arg)
{
    return st(&f->c)->frames_in[2] >= 1;
}

/* A peer CLOSE while the channel's pipe and queue both hold bytes (v0: no
 * PAUSE, so the reader's stall leaves all of it with the client): the
 * channel drains its pipe, then its queue, then closes; nothing lost,
 * nothing reordered, every fd (pipe included) closed. */
static void drain_case(enum eng_kind kind, enum mux_splice spl)
{
    const uint64_t total = 6u << 20;
    struct pump *p;
    struct sink *s;
    struct fx f;
    int j;

    spl_fx(&f, kind, 0, spl, 1);
    j = cl_of(&f, 0);
    /* the reader takes the first MiB (the channel streams through its
     * pipe), then stops: the pipe fills, the rest is queued */
    s = sink_start(&f, f.c.endfd[j], 95, total, true);
    sink_read_until(s, 1u << 20);
    p = pump_start(&f, f.devfd[0], 95, total);
    cr_assert(run_until(&f, flag_set, &p->done, 10000));
    cr_assert_eq(p->err, 0);
    shutdown(f.devfd[0], SHUT_WR);
    cr_assert(run_until(&f, close_seen, NULL, 5000), "no CLOSE reached the client");
    cr_assert_gt(eng_stats(f.e)->splices, 0, "nothing was spliced");
    cr_assert_eq(f.c.nclosed, 0, "closed before its bytes were written");
    s->want = total;
    sink_resume(s);
    cr_assert(run_until(&f, flag_set, &s->eof, 10000));
    cr_assert_eq(s->got, total);
    cr_assert(!s->bad, "pipe then queue: bytes out of order");
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert_eq(f.c.why[j], MUX_R_PEER_CLOSE);
    cr_assert_eq(st(&f.c)->bytes_to_local, total);
    cr_assert_eq(mux_channels(f.c.m), 0);
    fx_end(&f);
    free(p);
    free(s);
}

MUX_TEST(drain_writes_pipe_then_queue)
{
    pat_init();
    drain_case(kind, MUX_SPLICE_AUTO);
    drain_case(kind, MUX_SPLICE_ON);
}

/* A channel's pipe is closed when it goes back to small payloads with
 * its pipe empty (auto), when it is closed with bytes still in its pipe,
 * and when it drains and closes (on), while the tunnel stays up. Counted
 * in the process's fds, test-side ends aside. */
static int mux_fds(struct fx *f)
{
    return count_fds() - f->nown;
}

static bool gw1_paused(struct fx *f, void *arg)
{
    return mux_chan_paused(f->gwc[1]);
}

static void pipe_small_case(enum eng_kind kind)
{
    const uint64_t total = 4u << 20;
    struct pump *p;
    struct sink *s;
    struct fx f;
    int j, base;

    spl_fx(&f, kind, 2, MUX_SPLICE_AUTO, 1);
    j = cl_of(&f, 0);
    base = mux_fds(&f);
    s = sink_start(&f, f.c.endfd[j], 97, total, false);
    p = pump_start(&f, f.devfd[0], 97, total);
    cr_assert(run_until(&f, flag_set, &s->full, 20000));
    cr_assert(!s->bad);
    cr_assert_gt(eng_stats(f.e)->pipes_made, 0, "never spliced");
    s->want = total + 1; /* the sink is still reading */
    s->full = false;
    write_all(&f, f.devfd[0], "x", 1);
    cr_assert(run_until(&f, flag_set, &s->full, 3000));
    cr_assert_eq(mux_fds(&f), base, "a small payload closes the empty pipe");
    shutdown(f.devfd[0], SHUT_WR);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    run_for(&f, 50);
    cr_assert_eq(mux_fds(&f), base - 2, "both channel sockets closed");
    fx_end(&f);
    free(p);
    free(s);
}

static void pipe_close_case(enum eng_kind kind)
{
    struct pump *p;
    struct fx f;
    char buf[4];
    int j0, j1, base;

    spl_fx(&f, kind, 2, MUX_SPLICE_ON, 2);
    j0 = cl_of(&f, 0);
    j1 = cl_of(&f, 1);
    base = mux_fds(&f);
    /* channel 1's reader never reads: its pipe fills, then it pauses */
    p = pump_start(&f, f.devfd[1], 98, 16u << 20);
    cr_assert(run_until(&f, gw1_paused, NULL, 5000));
    /* on: every client channel also holds an outgoing pipe (c->pipe, its
     * reads splice from the first), counted in base */
    cr_assert_eq(mux_fds(&f), base + 2, "channel 1 holds an incoming pipe");
    /* closed with bytes in its pipe: dropped, the pipe closed */
    mux_chan_close(f.c.chans[j1], MUX_R_NONE);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    run_for(&f, 50);
    cr_assert_eq(mux_fds(&f), base - 4, "channel 1's pipes and sockets closed: %d, base %d",
                 mux_fds(&f), base);
    /* channel 0 relays a little, then the device ends it: drained and
     * closed, its pipes too */
    write_all(&f, f.devfd[0], "end", 3);
    read_exact(&f, f.c.endfd[j0], buf, 3, 3000);
    shutdown(f.devfd[0], SHUT_WR);
    cr_assert(wait_count(&f, &f.c.nclosed, 2, 3000));
    cr_assert(wait_count(&f, &f.g.nclosed, 2, 3000));
    run_for(&f, 50);
    cr_assert_eq(mux_fds(&f), base - 8, "every channel socket and pipe closed");
    cr_assert(!f.g.dead && !f.c.dead);
    fx_end(&f);
    free(p);
}

MUX_TEST(pipes_closed_with_channels)
{
    pat_init();
    pipe_small_case(kind);
    pipe_close_case(kind);
}

/* ---- tests: ping, idle --------------------------------------------------- */

MUX_TEST(ping_pong)
{
    struct fx f;

    fx_init(&f, kind, 0);
    f.ccfg.ping_ms = 0;
    fx_start(&f, TC_AES_CBC, false);
    mux_ping(f.c.m);
    cr_assert(wait_count(&f, &f.c.pongs, 1, 3000));
    cr_assert_eq(st(&f.g)->frames_in[3], 1);
    cr_assert_eq(st(&f.g)->frames_out[3], 1);
    cr_assert_eq(st(&f.c)->frames_out[3], 1);
    cr_assert_eq(st(&f.c)->frames_in[3], 1);
    cr_assert_eq(f.g.pongs, 0);
    /* a gateway may ping too */
    mux_ping(f.g.m);
    cr_assert(wait_count(&f, &f.g.pongs, 1, 3000));
    cr_assert_eq(f.c.pongs, 1);
    fx_end(&f);

    /* the client's own interval */
    fx_init(&f, kind, 2);
    f.ccfg.ping_ms = 20;
    f.ccfg.pong_ms = 1000;
    fx_start(&f, TC_AES_GCM, false);
    cr_assert(wait_count(&f, &f.c.pongs, 3, 3000));
    cr_assert(!f.c.dead);
    fx_end(&f);
}

MUX_TEST(tunnel_idle)
{
    struct fx f;

    fx_init(&f, kind, 2);
    f.gcfg.tunnel_idle_ms = 100;
    f.ccfg.ping_ms = 0;
    f.ccfg.tunnel_idle_ms = 0;
    fx_start(&f, TC_AES_GCM, false);
    cr_assert(wait_flag(&f, &f.g.dead, 3000));
    cr_assert_eq(f.g.dead_why, MUX_R_TUNNEL_IDLE);
    cr_assert(wait_flag(&f, &f.c.dead, 3000));
    cr_assert_eq(f.c.dead_why, MUX_R_PEER_EOF);
    fx_end(&f);

    /* pings keep it alive */
    fx_init(&f, kind, 2);
    f.gcfg.tunnel_idle_ms = 150;
    f.ccfg.ping_ms = 30;
    f.ccfg.tunnel_idle_ms = 0;
    fx_start(&f, TC_AES_GCM, false);
    run_for(&f, 600);
    cr_assert(!f.g.dead && !f.c.dead);
    fx_end(&f);
}

MUX_TEST(chan_idle)
{
    struct fx f;
    struct net_addr caller = ip4(192, 0, 2, 12, 0);
    char buf[4];
    int j;

    fx_init(&f, kind, 1);
    f.gcfg.chan_idle_ms = 100;
    fx_start(&f, TC_AES_CBC, false);
    gw_open(&f, &caller, "q", 1);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert_eq(f.g.why[0], MUX_R_CHAN_IDLE);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert_eq(f.c.why[j], MUX_R_PEER_CLOSE);
    cr_assert_eq(read_eof(&f, f.devfd[0], NULL, 0, 3000), 0);
    cr_assert_eq(read_eof(&f, f.c.endfd[j], buf, sizeof(buf), 3000), 1);
    cr_assert_eq(buf[0], 'q');
    cr_assert(!f.g.dead);
    fx_end(&f);
}

/* ---- tests: a raw peer --------------------------------------------------- */

/* The test side of a tunnel: writes frames it builds itself and decodes
 * what the mux sends. */
struct raw {
    int fd, mux_fd;
    enum tc_side mux_side;
    struct tc_stream *seal, *open, *mux_seal, *mux_open;
    struct frame_enc enc;
    struct frame_dec dec;
    struct frame_batch *b;
    uint8_t in[65536];
    size_t off, len;
};

/* The raw peer's socketpair and streams; the mux's end is left in
 * r->mux_fd, r->mux_seal, r->mux_open for raw_mux(). */
static void raw_setup(struct fx *f, struct raw *r, enum tc_kind ck, enum tc_side mux_side,
                      unsigned version)
{
    struct tc_stream *gs, *go, *cs, *co;
    int sv[2];

    mk_streams(ck, &gs, &go, &cs, &co);
    nb_pair(f, sv);
    memset(r, 0, sizeof(*r));
    r->fd = sv[1];
    r->mux_fd = sv[0];
    own(f, sv[1]);
    r->mux_side = mux_side;
    if (mux_side == TC_SIDE_GATEWAY) {
        r->mux_seal = gs;
        r->mux_open = go;
        r->seal = cs;
        r->open = co;
    } else {
        r->mux_seal = cs;
        r->mux_open = co;
        r->seal = gs;
        r->open = go;
    }
    frame_enc_init(&r->enc, r->seal, version, NULL);
    frame_dec_init(&r->dec, r->open, version, 0);
    r->b = malloc(sizeof(*r->b));
    cr_assert_not_null(r->b);
    frame_batch_reset(r->b, &r->enc);
}

static void raw_mux(struct fx *f, struct raw *r, const uint8_t *pending, size_t np)
{
    bool gw = r->mux_side == TC_SIDE_GATEWAY;
    struct hk *h = gw ? &f->g : &f->c;
    struct mux_hooks k = hooks_for(h);

    h->m = mux_new(f->e, r->mux_fd, gw ? &f->gcfg : &f->ccfg, &k, r->mux_seal, r->mux_open,
                   pending, np);
    cr_assert_not_null(h->m);
}

/* One mux of side `mux_side` on a socketpair; the raw peer plays the other
 * side. */
static void fx_start_raw(struct fx *f, struct raw *r, enum tc_kind ck, enum tc_side mux_side,
                         unsigned version)
{
    raw_setup(f, r, ck, mux_side, version);
    raw_mux(f, r, NULL, 0);
}

static void raw_free(struct raw *r)
{
    tc_free(r->seal);
    tc_free(r->open);
    free(r->b);
}

static void raw_flush(struct fx *f, struct raw *r)
{
    const struct iovec *v;
    int n, i;

    cr_assert_eq(frame_batch_seal(r->b), 0);
    v = frame_batch_iov(r->b, &n);
    for (i = 0; i < n; i++)
        write_all(f, r->fd, v[i].iov_base, v[i].iov_len);
    frame_batch_reset(r->b, &r->enc);
}

/* A header sealed by hand (any FLOW, any EXTRA), then data verbatim. */
static void raw_hdr(struct fx *f, struct raw *r, const uint8_t id[16], uint8_t flow,
                    uint32_t size, const char *extra, const void *data, size_t dlen)
{
    uint8_t plain[FRAME_HDR_LEN] = { 0 }, wire[FRAME_HDR_LEN + TC_AEAD_OVERHEAD];

    memcpy(plain, id, 16);
    plain[16] = flow;
    plain[17] = (uint8_t)(size >> 24);
    plain[18] = (uint8_t)(size >> 16);
    plain[19] = (uint8_t)(size >> 8);
    plain[20] = (uint8_t)size;
    if (extra != NULL)
        memcpy(plain + 21, extra, strlen(extra));
    cr_assert_eq(tc_seal(r->seal, plain, sizeof(plain), wire), 0);
    write_all(f, r->fd, wire, FRAME_HDR_LEN + tc_overhead(r->seal));
    if (dlen > 0)
        write_all(f, r->fd, data, dlen);
}

/* Next event from the mux; false on EOF. */
static bool raw_next(struct fx *f, struct raw *r, struct frame_ev *ev, int ms)
{
    uint64_t end = timer_clock_ms() + (uint64_t)ms;

    for (;;) {
        if (r->off < r->len) {
            size_t used = 0;
            enum frame_res res = frame_dec_feed(&r->dec, r->in + r->off, r->len - r->off,
                                                &used, ev);

            r->off += used;
            if (res == FRAME_BAD)
                cr_assert_fail("mux sent an undecodable frame");
            if (res == FRAME_OK)
                return true;
            continue;
        }
        ssize_t n = read(r->fd, r->in, sizeof(r->in));

        if (n == 0)
            return false;
        if (n < 0) {
            if (errno != EAGAIN)
                cr_assert_fail("read: %s", strerror(errno));
            if (timer_clock_ms() >= end)
                cr_assert_fail("raw peer: nothing arrived");
            turn(f, 2);
            continue;
        }
        r->off = 0;
        r->len = (size_t)n;
    }
}

static void raw_expect_eof(struct fx *f, struct raw *r, int ms)
{
    struct frame_ev ev;

    while (raw_next(f, r, &ev, ms))
        ;
}

static const uint8_t id_a[16] = { 0xaa, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };
static const uint8_t id_b[16] = { 0xbb, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15 };
static const uint8_t id_p[16] = { 0x99, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9 };

/* A PING with an arbitrary EXTRA answered with "pong" and the same id. */
static void expect_pong(struct fx *f, struct raw *r, const uint8_t id[16])
{
    struct frame_ev ev;

    cr_assert(raw_next(f, r, &ev, 3000));
    cr_assert_eq(ev.kind, FRAME_EV_FRAME);
    cr_assert_eq(ev.flow, FRAME_PING);
    cr_assert_eq(memcmp(ev.extra, "pong", 4), 0);
    cr_assert_eq(memcmp(ev.id, id, 16), 0);
}

static void unknown_flow_case(enum eng_kind kind, enum tc_kind ck)
{
    struct net_addr caller = ip4(192, 0, 2, 20, 0);
    uint8_t junk[10] = "0123456789", buf[3];
    struct raw r;
    struct fx f;

    fx_init(&f, kind, 0);
    f.ccfg.ping_ms = 0;
    fx_start_raw(&f, &r, ck, TC_SIDE_CLIENT, 0);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    raw_flush(&f, &r);
    raw_hdr(&f, &r, id_a, 0x05, sizeof(junk), NULL, junk, sizeof(junk)); /* seed's PING */
    raw_hdr(&f, &r, id_a, 0x40, 0, NULL, NULL, 0);
    raw_hdr(&f, &r, id_a, 0x03, 3, NULL, "zzz", 3);
    cr_assert_eq(frame_batch_data(r.b, id_a, "abc", 3), 0);
    raw_flush(&f, &r);
    wait_new(&f, 1);
    read_exact(&f, f.c.endfd[0], buf, 3, 3000);
    cr_assert_eq(memcmp(buf, "abc", 3), 0);
    cr_assert_eq(st(&f.c)->frames_in[6], 3);
    cr_assert_eq(st(&f.c)->frames_in[0], 1);
    cr_assert_eq(st(&f.c)->frames_in[1], 1);
    /* still in step: a "hello" PING counts as a request */
    raw_hdr(&f, &r, id_p, FRAME_PING, 0, "hello", NULL, 0);
    expect_pong(&f, &r, id_p);
    cr_assert(!f.c.dead);
    fx_end(&f);
    raw_free(&r);
}

MUX_TEST(unknown_flow_consumed)
{
    unknown_flow_case(kind, TC_AES_CBC);
    unknown_flow_case(kind, TC_AES_GCM);
}

MUX_TEST(unknown_id_dropped)
{
    struct net_addr caller = ip4(192, 0, 2, 21, 0);
    struct raw r;
    struct fx f;
    char buf[2];

    fx_init(&f, kind, 1);
    f.ccfg.ping_ms = 0;
    fx_start_raw(&f, &r, TC_AES_GCM, TC_SIDE_CLIENT, 1);
    cr_assert_eq(frame_batch_data(r.b, id_b, "lost", 4), 0);
    cr_assert_eq(frame_batch_close(r.b, id_b), 0);
    cr_assert_eq(frame_batch_pause(r.b, id_b), 0);
    cr_assert_eq(frame_batch_resume(r.b, id_b), 0);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    cr_assert_eq(frame_batch_data(r.b, id_a, "ok", 2), 0);
    cr_assert_eq(frame_batch_ping(r.b, id_p, false), 0);
    raw_flush(&f, &r);
    expect_pong(&f, &r, id_p); /* no CLOSE for the unknown id came first */
    wait_new(&f, 1);
    read_exact(&f, f.c.endfd[0], buf, 2, 3000);
    cr_assert_eq(memcmp(buf, "ok", 2), 0);
    cr_assert_eq(st(&f.c)->dropped_unknown_id, 4); /* DATA, CLOSE, PAUSE, RESUME */
    cr_assert_eq(st(&f.c)->frames_out[2], 0);
    cr_assert(!f.c.dead);
    fx_end(&f);
    raw_free(&r);
}

/* The endpoint closes a channel; frames the peer had sent for it before
 * it saw our CLOSE count as late, not as unknown ids. */
MUX_TEST(late_frames_counted_apart)
{
    struct net_addr caller = ip4(192, 0, 2, 24, 0);
    struct frame_ev ev;
    struct raw r;
    struct fx f;
    char buf[2];

    fx_init(&f, kind, 1);
    f.ccfg.ping_ms = 0;
    fx_start_raw(&f, &r, TC_AES_GCM, TC_SIDE_CLIENT, 1);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    cr_assert_eq(frame_batch_data(r.b, id_a, "ok", 2), 0);
    raw_flush(&f, &r);
    wait_new(&f, 1);
    read_exact(&f, f.c.endfd[0], buf, 2, 3000);
    shutdown(f.c.endfd[0], SHUT_WR); /* local EOF: the mux sends CLOSE */
    cr_assert(raw_next(&f, &r, &ev, 3000));
    cr_assert_eq(ev.flow, FRAME_CLOSE);
    cr_assert_eq(memcmp(ev.id, id_a, 16), 0);
    cr_assert_eq(frame_batch_data(r.b, id_a, "late", 4), 0);
    cr_assert_eq(frame_batch_pause(r.b, id_a), 0);
    cr_assert_eq(frame_batch_data(r.b, id_b, "never", 5), 0);
    cr_assert_eq(frame_batch_ping(r.b, id_p, false), 0);
    raw_flush(&f, &r);
    expect_pong(&f, &r, id_p);
    cr_assert_eq(st(&f.c)->dropped_late, 2);
    cr_assert_eq(st(&f.c)->dropped_unknown_id, 1);
    cr_assert(!f.c.dead);
    fx_end(&f);
    raw_free(&r);
}

MUX_TEST(duplicate_new_closes_tunnel)
{
    struct net_addr caller = ip4(192, 0, 2, 22, 0);
    struct raw r;
    struct fx f;

    fx_init(&f, kind, 2);
    f.ccfg.ping_ms = 0;
    fx_start_raw(&f, &r, TC_AES_CBC, TC_SIDE_CLIENT, 2);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    raw_flush(&f, &r);
    cr_assert(wait_flag(&f, &f.c.dead, 3000));
    cr_assert_eq(f.c.dead_why, MUX_R_PROTOCOL);
    cr_assert_eq(f.c.nnew, 1);
    cr_assert_eq(f.c.nclosed, 1);
    cr_assert_eq(f.c.why[0], MUX_R_TUNNEL_DOWN);
    raw_expect_eof(&f, &r, 3000);
    cr_assert_eq(read_eof(&f, f.c.endfd[0], NULL, 0, 3000), 0);
    fx_end(&f);
    raw_free(&r);
}

MUX_TEST(gateway_ignores_new)
{
    struct net_addr caller = ip4(192, 0, 2, 23, 0);
    struct raw r;
    struct fx f;

    fx_init(&f, kind, 2);
    fx_start_raw(&f, &r, TC_AES_GCM, TC_SIDE_GATEWAY, 2);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    cr_assert_eq(frame_batch_data(r.b, id_a, "x", 1), 0);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0); /* not a duplicate: ignored */
    cr_assert_eq(frame_batch_ping(r.b, id_p, false), 0);
    raw_flush(&f, &r);
    expect_pong(&f, &r, id_p);
    cr_assert_eq(st(&f.g)->frames_in[0], 2);
    cr_assert_eq(st(&f.g)->dropped_unknown_id, 1);
    cr_assert_eq(mux_channels(f.g.m), 0);
    cr_assert(!f.g.dead);
    fx_end(&f);
    raw_free(&r);
}

MUX_TEST(bad_block_answered_with_close)
{
    struct raw r;
    struct fx f;
    struct frame_ev ev;
    size_t i;

    for (i = 0; i < 2; i++) {
        fx_init(&f, kind, 2);
        f.ccfg.ping_ms = 0;
        fx_start_raw(&f, &r, ciphers[i], TC_SIDE_CLIENT, 2);
        /* v2 NEW with SIZE 0: no address block at all */
        raw_hdr(&f, &r, id_a, FRAME_NEW, 0, NULL, NULL, 0);
        cr_assert(raw_next(&f, &r, &ev, 3000));
        cr_assert_eq(ev.flow, FRAME_CLOSE);
        cr_assert_eq(memcmp(ev.id, id_a, 16), 0);
        cr_assert_eq(f.c.nnew, 0);
        cr_assert_eq(st(&f.c)->bad_new, 1);
        cr_assert(!f.c.dead);
        fx_end(&f);
        raw_free(&r);
    }
}

MUX_TEST(bad_tag_closes_tunnel)
{
    uint8_t junk[60];
    struct raw r;
    struct fx f;

    fx_init(&f, kind, 2);
    f.ccfg.ping_ms = 0;
    fx_start_raw(&f, &r, TC_AES_GCM, TC_SIDE_CLIENT, 2);
    memset(junk, 0x5a, sizeof(junk));
    write_all(&f, r.fd, junk, sizeof(junk));
    cr_assert(wait_flag(&f, &f.c.dead, 3000));
    cr_assert_eq(f.c.dead_why, MUX_R_PROTOCOL);
    raw_expect_eof(&f, &r, 3000);
    fx_end(&f);
    raw_free(&r);
}

MUX_TEST(pong_timeout)
{
    struct raw r;
    struct fx f;
    struct frame_ev ev;

    fx_init(&f, kind, 0);
    f.ccfg.ping_ms = 20;
    f.ccfg.pong_ms = 100;
    f.ccfg.tunnel_idle_ms = 0;
    fx_start_raw(&f, &r, TC_AES_CBC, TC_SIDE_CLIENT, 0);
    /* the raw gateway reads the pings and never answers */
    cr_assert(raw_next(&f, &r, &ev, 3000));
    cr_assert_eq(ev.flow, FRAME_PING);
    cr_assert_eq(memcmp(ev.extra, "ping", 4), 0);
    raw_expect_eof(&f, &r, 3000);
    cr_assert(f.c.dead);
    cr_assert_eq(f.c.dead_why, MUX_R_PONG_TIMEOUT);
    fx_end(&f);
    raw_free(&r);
}

/* Many pings in one burst: every one answered, in order. */
MUX_TEST(ping_flood_answered)
{
    uint8_t id[16] = { 0 };
    struct frame_ev ev;
    struct raw r;
    struct fx f;
    int i, n = 300;

    fx_init(&f, kind, 1);
    fx_start_raw(&f, &r, TC_AES_GCM, TC_SIDE_GATEWAY, 1);
    for (i = 0; i < n; i++) {
        id[0] = (uint8_t)i;
        id[1] = (uint8_t)(i >> 8);
        cr_assert_eq(frame_batch_ping(r.b, id, false), 0);
        if (frame_batch_full(r.b))
            raw_flush(&f, &r);
    }
    raw_flush(&f, &r);
    for (i = 0; i < n; i++) {
        id[0] = (uint8_t)i;
        id[1] = (uint8_t)(i >> 8);
        cr_assert(raw_next(&f, &r, &ev, 3000));
        cr_assert_eq(ev.flow, FRAME_PING);
        cr_assert_eq(memcmp(ev.id, id, 16), 0, "pong %d out of order", i);
    }
    cr_assert_eq(st(&f.g)->frames_out[3], (uint64_t)n);
    fx_end(&f);
    raw_free(&r);
}

/* PAUSE from the peer stops reading the local socket; RESUME restarts it
 * (any version, 4.10). */
MUX_TEST(peer_pause_honoured)
{
    struct net_addr caller = ip4(192, 0, 2, 24, 0);
    struct frame_ev ev;
    struct raw r;
    struct fx f;

    fx_init(&f, kind, 0);
    f.ccfg.ping_ms = 0;
    fx_start_raw(&f, &r, TC_AES_CBC, TC_SIDE_CLIENT, 0);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    raw_flush(&f, &r);
    wait_new(&f, 1);
    cr_assert(!mux_chan_paused(f.c.chans[0]));
    cr_assert_eq(frame_batch_pause(r.b, id_a), 0);
    cr_assert_eq(frame_batch_pause(r.b, id_a), 0); /* idempotent */
    cr_assert_eq(frame_batch_ping(r.b, id_p, false), 0);
    raw_flush(&f, &r);
    expect_pong(&f, &r, id_p);
    cr_assert(mux_chan_paused(f.c.chans[0]));
    /* the recv armed before PAUSE still delivers one DATA (5.2) */
    write_all(&f, f.c.endfd[0], "held", 4);
    cr_assert(raw_next(&f, &r, &ev, 3000));
    cr_assert_eq(ev.kind, FRAME_EV_DATA);
    cr_assert_eq(ev.len, 4);
    cr_assert_eq(memcmp(ev.data, "held", 4), 0);
    /* then nothing is read until RESUME */
    write_all(&f, f.c.endfd[0], "more", 4);
    run_for(&f, 150);
    cr_assert_eq(st(&f.c)->bytes_from_local, 4);
    assert_quiet(r.fd);
    cr_assert_eq(frame_batch_resume(r.b, id_a), 0);
    raw_flush(&f, &r);
    cr_assert(raw_next(&f, &r, &ev, 3000));
    cr_assert_eq(ev.kind, FRAME_EV_DATA);
    cr_assert_eq(ev.len, 4);
    cr_assert_eq(memcmp(ev.data, "more", 4), 0);
    cr_assert(!mux_chan_paused(f.c.chans[0]));
    fx_end(&f);
    raw_free(&r);
}

/* Bytes the handshake already read past its end are decoded first. */
MUX_TEST(pending_bytes_decoded)
{
    struct net_addr caller = ip4(192, 0, 2, 25, 0);
    const struct iovec *v;
    uint8_t pend[512];
    size_t np = 0;
    struct raw r;
    struct fx f;
    char buf[5];
    int n, i;

    fx_init(&f, kind, 2);
    f.ccfg.ping_ms = 0;
    raw_setup(&f, &r, TC_AES_GCM, TC_SIDE_CLIENT, 2);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    cr_assert_eq(frame_batch_data(r.b, id_a, "early", 5), 0);
    cr_assert_eq(frame_batch_ping(r.b, id_p, false), 0);
    cr_assert_eq(frame_batch_seal(r.b), 0);
    v = frame_batch_iov(r.b, &n);
    for (i = 0; i < n; i++) {
        cr_assert_leq(np + v[i].iov_len, sizeof(pend));
        memcpy(pend + np, v[i].iov_base, v[i].iov_len);
        np += v[i].iov_len;
    }
    frame_batch_reset(r.b, &r.enc);
    raw_mux(&f, &r, pend, np);
    memset(pend, 0, sizeof(pend)); /* copied by mux_new */
    cr_assert_eq(f.c.nnew, 0);     /* no hook inside mux_new */
    expect_pong(&f, &r, id_p);
    wait_new(&f, 1);
    read_exact(&f, f.c.endfd[0], buf, 5, 3000);
    cr_assert_eq(memcmp(buf, "early", 5), 0);
    fx_end(&f);
    raw_free(&r);
}

/* Client max_channels: a NEW above it gets CLOSE, the tunnel stays. */
MUX_TEST(client_max_channels)
{
    struct net_addr caller = ip4(192, 0, 2, 26, 0);
    struct frame_ev ev;
    struct raw r;
    struct fx f;

    fx_init(&f, kind, 1);
    f.ccfg.ping_ms = 0;
    f.ccfg.max_channels = 1;
    fx_start_raw(&f, &r, TC_AES_CBC, TC_SIDE_CLIENT, 1);
    cr_assert_eq(frame_batch_new(r.b, id_a, &caller), 0);
    cr_assert_eq(frame_batch_new(r.b, id_b, &caller), 0);
    cr_assert_eq(frame_batch_ping(r.b, id_p, false), 0);
    raw_flush(&f, &r);
    cr_assert(raw_next(&f, &r, &ev, 3000));
    cr_assert_eq(ev.flow, FRAME_CLOSE);
    cr_assert_eq(memcmp(ev.id, id_b, 16), 0);
    expect_pong(&f, &r, id_p);
    cr_assert_eq(f.c.nnew, 1);
    cr_assert_eq(st(&f.c)->chan_closed[MUX_R_LIMIT], 1);
    cr_assert_eq(mux_channels(f.c.m), 1);
    fx_end(&f);
    raw_free(&r);
}

/* A channel closed before its NEW went out costs nothing on the wire. */
MUX_TEST(close_before_new_sent)
{
    struct net_addr caller = ip4(192, 0, 2, 27, 0);
    struct fx f;

    fx_init(&f, kind, 2);
    f.ccfg.ping_ms = 0;
    fx_start(&f, TC_AES_GCM, false);
    gw_open(&f, &caller, "never", 5);
    mux_chan_close(f.gwc[0], MUX_R_SHUTDOWN);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert_eq(f.g.why[0], MUX_R_SHUTDOWN);
    cr_assert_eq(read_eof(&f, f.devfd[0], NULL, 0, 3000), 0);
    mux_ping(f.c.m);
    cr_assert(wait_count(&f, &f.c.pongs, 1, 3000));
    cr_assert_eq(st(&f.g)->frames_out[0] + st(&f.g)->frames_out[1] + st(&f.g)->frames_out[2], 0);
    cr_assert_eq(f.c.nnew, 0);
    fx_end(&f);
}

/* After a peer CLOSE, a local reader that stopped reading holds the
 * channel for linger_ms at most. */
MUX_TEST(linger_bounds_drain)
{
    const uint64_t total = 4u << 20;
    struct net_addr caller = ip4(192, 0, 2, 28, 0);
    struct pump *p;
    struct fx f;
    int j;

    fx_init(&f, kind, 0); /* v0: no PAUSE, the client queues it all */
    f.ccfg.linger_ms = 100;
    fx_start(&f, TC_AES_GCM, false);
    gw_open(&f, &caller, NULL, 0);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    p = pump_start(&f, f.devfd[0], 60, total);
    cr_assert(run_until(&f, flag_set, &p->done, 5000));
    cr_assert_eq(p->err, 0);
    shutdown(f.devfd[0], SHUT_WR);
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert_eq(f.g.why[0], MUX_R_LOCAL_EOF);
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    cr_assert_eq(f.c.why[j], MUX_R_PEER_CLOSE);
    cr_assert_lt(read_eof(&f, f.c.endfd[j], NULL, 0, 3000), total);
    cr_assert_eq(mux_channels(f.c.m), 0);
    fx_end(&f);
    free(p);
}

/* ---- the incoming queue (core/mux_queue.h), no engine -------------------- */

Test(mux_queue, chunks_iov_consume, .timeout = 120)
{
    struct mux_queue q = { 0 };
    struct mux_queue_pool p = { 0 };
    size_t cap = mux_queue_chunk_cap(), small = mux_queue_small_cap(), n, total = 2 * cap + 100;
    size_t i, got = 0;
    uint8_t *src = malloc(total), *dst = malloc(total);
    struct iovec iov[8];
    const uint8_t *h;
    int cnt;

    cr_assert(src && dst);
    cr_assert_null(mux_queue_peek(&q, &n));
    cr_assert_eq(n, 0);
    cr_assert_eq(mux_queue_iov(&q, iov, 8), 0);
    for (i = 0; i < total; i++)
        src[i] = (uint8_t)(i * 7 + (i >> 10));
    /* split appends across chunk boundaries: 10 bytes to an empty queue
     * take a small chunk, the rest standard ones */
    cr_assert_eq(mux_queue_append(&q, &p, src, 10, 0), 0);
    cr_assert_eq(mux_queue_append(&q, &p, src + 10, total - 10, 0), 0);
    cr_assert_eq(q.bytes, total);
    cnt = mux_queue_iov(&q, iov, 8);
    cr_assert_eq(cnt, 3);
    cr_assert_eq(iov[0].iov_len, small);
    cr_assert_eq(iov[1].iov_len, cap);
    cr_assert_eq(iov[2].iov_len, total - small - cap);
    cr_assert_eq(mux_queue_iov(&q, iov, 2), 2);
    /* consume in odd steps, checking the bytes at the head each time */
    while (q.bytes > 0) {
        size_t step = q.bytes < 12345 ? q.bytes : 12345;

        h = mux_queue_peek(&q, &n);
        cr_assert_not_null(h);
        if (step > n)
            step = n;
        memcpy(dst + got, h, step);
        got += step;
        mux_queue_consume(&q, &p, step);
    }
    cr_assert_eq(got, total);
    cr_assert_eq(memcmp(src, dst, total), 0);
    cr_assert_null(q.head);
    cr_assert_null(q.tail);
    cr_assert_eq(p.nfree, 2);               /* standard chunks pooled, not the small */
    /* a small append takes a small chunk, a bigger one a pooled chunk */
    cr_assert_eq(mux_queue_append(&q, &p, src, 1, 0), 0);
    cr_assert_eq(p.nfree, 2);
    mux_queue_clear(&q, &p);
    cr_assert_eq(mux_queue_append(&q, &p, src, small + 1, 0), 0);
    cr_assert_eq(p.nfree, 1);
    cr_assert_eq(mux_queue_iov(&q, iov, 8), 1, "one standard chunk");
    mux_queue_clear(&q, &p);
    cr_assert_eq(q.bytes, 0);
    cr_assert_eq(p.nfree, 2);
    mux_queue_pool_tick(&p);                /* used since the last tick */
    cr_assert_eq(p.nfree, 2);
    mux_queue_pool_tick(&p);
    cr_assert_eq(p.nfree, 0);
    cr_assert_null(p.free);
    free(src);
    free(dst);
}

Test(mux_queue, contiguous_first_chunk, .timeout = 120)
{
    struct mux_queue q = { 0 };
    struct mux_queue_pool p = { 0 };
    size_t cap = mux_queue_chunk_cap(), big = 3 * cap + 5, n;
    uint8_t *src = malloc(big);
    const uint8_t *h;

    cr_assert_not_null(src);
    memset(src, 0x5c, big);
    src[big - 1] = 0x11;
    /* the first frame arrives in pieces; its first chunk holds it whole */
    cr_assert_eq(mux_queue_append(&q, &p, src, 1000, big), 0);
    cr_assert_eq(mux_queue_append(&q, &p, src + 1000, big - 1000, big), 0);
    cr_assert_eq(mux_queue_append(&q, &p, (const uint8_t *)"next", 4, big), 0);
    h = mux_queue_peek(&q, &n);
    cr_assert_eq(n, big);
    cr_assert_eq(memcmp(h, src, big), 0);
    cr_assert_eq(q.bytes, big + 4);
    mux_queue_consume(&q, &p, big + 4);
    cr_assert_eq(p.nfree, 1);               /* the big chunk was freed */
    mux_queue_pool_trim(&p);
    free(src);
}

/* ---- tests: what an idle tunnel holds -------------------------------------- */

static bool all_parked(struct fx *f, void *arg)
{
    (void)arg;
    return tc_parked(f->gs) && tc_parked(f->go) && tc_parked(f->cs) && tc_parked(f->co);
}

/* A tunnel without channels gives back its cipher contexts once nothing
 * is in flight; a PING makes them again and the streams go on where they
 * were (a wrong CBC chain or GCM counter would kill the tunnel); a
 * tunnel with an open channel keeps them. */
static void park_case(enum eng_kind kind, enum tc_kind ck, unsigned version)
{
    struct net_addr caller = ip4(192, 0, 2, 40, 0);
    struct fx f;
    char buf[4];
    int j;

    fx_init(&f, kind, version);
    f.ccfg.ping_ms = 0;
    fx_start(&f, ck, false);
    cr_assert(run_until(&f, all_parked, NULL, 3000), "idle tunnel parked its streams");
    for (int i = 1; i <= 3; i++) {
        mux_ping(f.c.m);
        cr_assert(wait_count(&f, &f.c.pongs, i, 3000), "%s v%u ping %d", tc_kind_name(ck),
                  version, i);
        cr_assert(run_until(&f, all_parked, NULL, 3000), "parked again after ping %d", i);
    }
    gw_open(&f, &caller, "ab", 2);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    read_exact(&f, f.c.endfd[j], buf, 2, 3000);
    write_all(&f, f.c.endfd[j], "cd", 2);
    read_exact(&f, f.devfd[0], buf, 2, 3000);
    cr_assert_eq(memcmp(buf, "cd", 2), 0);
    for (int i = 0; i < 20; i++)
        turn(&f, 5);
    cr_assert(!tc_parked(f.gs) && !tc_parked(f.cs), "a tunnel with a channel keeps them");
    shutdown(f.devfd[0], SHUT_WR);  /* the channel ends from the device */
    cr_assert(wait_count(&f, &f.g.nclosed, 1, 3000));
    cr_assert(wait_count(&f, &f.c.nclosed, 1, 3000));
    mux_ping(f.c.m);
    cr_assert(wait_count(&f, &f.c.pongs, 4, 3000));
    cr_assert(run_until(&f, all_parked, NULL, 3000), "parked once the channel is gone");
    cr_assert(!f.g.dead && !f.c.dead);
    fx_end(&f);
}

MUX_TEST(idle_tunnel_parks_ciphers)
{
    park_case(kind, TC_AES_CBC, 0);
    park_case(kind, TC_AES_CBC, 1);
    park_case(kind, TC_AES_GCM, 2);
}

/* Tunnels given one group count into it together; a mux's own tally
 * stays its own. */
MUX_TEST(group_counters_shared)
{
    struct net_addr caller = ip4(192, 0, 2, 41, 0);
    struct mux_group *grp = malloc(sizeof(*grp));
    struct fx f;
    char buf[3];
    int j;

    cr_assert_not_null(grp);
    mux_group_init(grp);
    fx_init(&f, kind, 1);
    f.ccfg.ping_ms = 0;
    f.gcfg.group = grp;
    f.ccfg.group = grp;
    fx_start(&f, TC_AES_GCM, false);
    cr_assert_eq(mux_stats(f.g.m), mux_stats(f.c.m));
    gw_open(&f, &caller, "abc", 3);
    wait_new(&f, 1);
    j = cl_of(&f, 0);
    read_exact(&f, f.c.endfd[j], buf, 3, 3000);
    cr_assert_eq(grp->st.chan_opened, 2, "one channel on each side");
    cr_assert_eq(grp->st.frames_out[0], 1);
    cr_assert_eq(grp->st.frames_in[0], 1);
    cr_assert_eq(grp->st.bytes_from_local, 3);
    cr_assert_eq(grp->st.bytes_to_local, 3);
    cr_assert_eq(mux_tally(f.g.m)->chan_opened, 1);
    cr_assert_eq(mux_tally(f.g.m)->bytes_from_local, 3);
    cr_assert_eq(mux_tally(f.g.m)->bytes_to_local, 0);
    cr_assert_eq(mux_tally(f.c.m)->bytes_to_local, 3);
    cr_assert_lt(grp->rnd_pos, MUX_GROUP_RND, "padding drawn from the group's pool");
    fx_end(&f);
    cr_assert_not_null(grp->spare_tx, "the send context went back to the group");
    mux_group_fini(grp);
    free(grp);
}
