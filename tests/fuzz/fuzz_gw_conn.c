/* tests/fuzz/fuzz_gw_conn.c - the gateway's whole connection state machine
 * (core/gw_conn.c, core/gw_tunnel.c, core/mux.c behind them), not only
 * its parsers: one shard of the real gateway on the epoll engine
 * (core/gw_test.h), connections handed over as one end of a socketpair,
 * the fuzzer's bytes written into the other end.
 *
 * The gateway (built once, reset between inputs, freed at exit) knows one
 * Fernet key, K1 of tests/data (raw bytes 00..1f), and runs with small
 * limits (--max-handshakes 5, --max-handshakes-per-ip 3, --max-channels
 * 2) so that inputs reach them. Each input drives one
 * "fuzzed" connection through classification (TLS or token), PROXY
 * header, SNI and routing, or token, challenge and the multiplexer, with a
 * few helper connections around it. Input layout:
 *
 *   0     mode  bits 0-1  listener: 0 single, 1 sni, 2 peer, 3 single
 *               bit 2     --proxy-protocol
 *               bit 3     first bring up a legit tunnel (the "pre-tunnel")
 *                         for myname.ui.nabu.casa, www.myname.ui.nabu.casa
 *                         and localhost, so that ClientHellos route
 *               bit 4     answer the challenge as the client would, with
 *                         the claims of the token the gateway accepted
 *               bit 5     fire the handshake deadlines after the
 *                         handshake bytes (gw_test_expire)
 *               bit 6     end with a half-close of every socket
 *               bit 7     the peer is an IPv6 address (else IPv4)
 *   1     split: handshake bytes go split bytes per write (0: one write)
 *   2     answer: bits 0-1 0/3 right, 1 one bit flipped, 2 first half only;
 *               bit 2: write the first op at once after the answer (the
 *               gateway reads answer and frames together); bit 3: shut
 *               our read side first (the challenge send fails)
 *   3-4   H, big endian: handshake bytes (capped by what is left)
 *   5..   H handshake bytes (PROXY header, ClientHello or token), then
 *         ops to the end of the input, each an op byte (low nibble the
 *         kind, high nibble flags) and its arguments:
 *     0,d-f FRAME  flow id len(2) [extra(11) if 0x10] [size(4) if 0x20]
 *                  payload(len): a frame sealed with the client's stream;
 *                  id: < 0x80 a channel id learned from the gateway's NEW
 *                  frames, else 16 bytes of it; 0x40 seals the payload as
 *                  a unit (a v2 NEW block); 0x80: to the pre-tunnel
 *     1 RAW        len(1) bytes, written to the tunnel as they are
 *     2 DEVICE     name: a device connection with a ClientHello for one
 *                  of four names (bits 0-1), from one of four addresses
 *                  (bits 2-3; 0 is the fuzzed connection's), IPv6 with bit
 *                  7 (0x10: the hello in two writes; 0x20: only its first
 *                  half, so that it holds a handshake slot)
 *     3 DEV_WRITE  dev len(1) bytes into a device
 *     4 DEV_CLOSE  dev: close it (0x10: shutdown SHUT_WR only; 0x20:
 *                  SHUT_RD only, so that the gateway's sends fail)
 *     5 DEV_READS  dev: stop / restart reading what the gateway sends it
 *     6 TUN_READS  stop / restart reading the tunnel (0x80: pre-tunnel)
 *     7 TUN_SHUT   shutdown SHUT_WR on the tunnel (0x20: SHUT_RD; 0x80:
 *                  pre-tunnel)
 *     8 EXPIRE     fire the handshake deadlines (0x10: and the tunnels'
 *                  token expiry)
 *     9 FLOOD      id n: n % 64 x 64 KiB of DATA for a learned channel
 *                  (6 MiB per input at most)
 *     a TURNS      run the loop until it is quiet
 *     b REPLAY     the handshake bytes again, on a new connection of the
 *                  same kind from the same address (a token used twice)
 *     c BURST      n: n PINGs in one write (0x80: to the pre-tunnel)
 *   The fuzzed connection, once past its handshake, is the tunnel of the
 *   ops if it became one, else device 0.
 *
 * After every write the loop runs until quiet, reading every harness
 * socket (the tunnels' bytes through the frame decoder). Oracles, each an
 * abort(): the gateway's frames always decode with the client's streams;
 * the pre-tunnel comes up; once every harness socket is closed the
 * gateway holds no connection, tunnel or channel, without any timer; a
 * reset then completes; every fd handed to the gateway is closed.
 *
 * Seeds: tests/fuzz/gw_conn_seeds.py writes tests/fuzz/seeds/gw_conn/.
 * FUZZ_GW_CONN_LOG=debug prints the gateway's log lines.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <urcu-qsbr.h>

#include "core/challenge.h"
#include "core/claims.h"
#include "core/frame.h"
#include "core/gw.h"
#include "core/gw_test.h"
#include "core/log.h"
#include "core/proxy.h"
#include "core/token.h"
#include "crypto/fernet.h"
#include "crypto/tcipher.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define K1 "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
#define NDEV 6
#define NIDS 8
#define MAX_ADOPT 64        /* connections handed to the gateway per input */
#define PUMP_TURNS 256      /* per pump: enough for any burst we write */
#define PUT_STALLS 64       /* pumps while a write makes no progress */
#define FLOOD_CHUNK 65536    /* up to 63 of them: past the 2 MiB PAUSE mark */
#define FLOOD_MAX 96          /* chunks per input (6 MiB): keeps inputs fast */

static const char *const names[] = { "myname.ui.nabu.casa", "www.myname.ui.nabu.casa",
                                     "localhost", "unknown.example" };

/* The client side of a tunnel: our socket, streams and decoder. */
struct ftun {
    int fd;                       /* -1: none */
    bool reading;                 /* drain what the gateway sends */
    struct tc_stream *seal, *open;
    unsigned version;
    struct frame_dec dec;
    uint8_t ids[NIDS][FRAME_ID_LEN]; /* from NEW frames, newest last */
    size_t nids;
};

struct fdev {
    int fd;
    bool reading;
};

/* Everything one input uses, reset at its start. */
struct run {
    const uint8_t *p, *end;       /* ops not yet consumed */
    struct ftun tun;              /* the fuzzed connection as a tunnel */
    struct ftun pre;              /* the pre-tunnel */
    struct fdev dev[NDEV];        /* dev[0]: the fuzzed connection as a device */
    const uint8_t *hs;            /* the handshake bytes and mode, for REPLAY */
    size_t nhs;
    uint8_t mode;
    int gwfds[MAX_ADOPT];         /* fds handed to the gateway */
    unsigned flooded;             /* FLOOD chunks sent */
    size_t ngwfds;
};

/* The harness's one cached gateway and what it was built from. */
struct harness {
    struct gw_cfg cfg;
    struct gw_listen listen[3];
    const char *keys[1];
    struct gw *g;
    struct token_keys ks;         /* K1, for the client side */
    char *pre_token;              /* valid for 100 years, names[0..2] */
};

static struct harness *H;

/* ---- call_rcu, for this binary ----------------------------------------------
 * The hostname table frees the names of a closed tunnel with call_rcu()
 * (core/hosttab.c). liburcu runs such callbacks on its worker thread,
 * which sleeps 10 ms after every wake-up: waiting for it (rcu_barrier())
 * at the end of every input would cap the harness near 100 inputs a
 * second, and not waiting would leave each input's frees to a later one,
 * which libFuzzer's per-input leak check takes for leaks. So this binary
 * defines liburcu's call_rcu symbol itself (an executable's definition
 * wins over the shared library's for every object linked into it; the
 * daemon is untouched): callbacks queue here, and rcu_flush() runs them
 * after a grace period at the end of each input. Any thread may queue. */

static pthread_mutex_t rcu_q_mu = PTHREAD_MUTEX_INITIALIZER;
static struct rcu_head *rcu_q;   /* linked through next.next */

void urcu_qsbr_call_rcu(struct rcu_head *head, void (*func)(struct rcu_head *head));

void urcu_qsbr_call_rcu(struct rcu_head *head, void (*func)(struct rcu_head *head))
{
    head->func = func;
    pthread_mutex_lock(&rcu_q_mu);
    head->next.next = (struct cds_wfcq_node *)rcu_q;
    rcu_q = head;
    pthread_mutex_unlock(&rcu_q_mu);
}

/* Run every queued callback once a grace period has passed. */
static void rcu_flush(void)
{
    struct rcu_head *q;

    for (;;) {
        pthread_mutex_lock(&rcu_q_mu);
        q = rcu_q;
        rcu_q = NULL;
        pthread_mutex_unlock(&rcu_q_mu);
        if (q == NULL)
            return;
        synchronize_rcu();   /* QSBR: goes offline for it if online */
        while (q != NULL) {
            struct rcu_head *next = (struct rcu_head *)q->next.next;
            q->func(q);
            q = next;
        }
    }
}

/* ---- setup --------------------------------------------------------------- */

static void harness_free(void)
{
    if (H == NULL)
        return;
    gw_test_free(H->g);
    rcu_flush();
    token_keys_fini(&H->ks);
    free(H->pre_token);
    free(H);
    H = NULL;
}

static struct harness *harness_get(void)
{
    static const uint8_t key[32] = { 0x5a, 1, 2, 3 }, iv[16] = { 0xa5, 9 };
    static const char *const aliases[] = { "www.myname.ui.nabu.casa", "localhost" };
    struct token_req req = { .hostname = names[0], .aliases = aliases, .naliases = 2,
                             .aes_key = key, .aes_key_len = 32, .aes_iv = iv,
                             .aes_iv_len = 16, .protocol_version = 2, .cipher = TC_AES_CBC };
    enum log_level lvl;
    char err[256];

    if (H != NULL)
        return H;
    /* FUZZ_GW_CONN_LOG=debug shows the gateway's lines (replaying a crash) */
    if (getenv("FUZZ_GW_CONN_LOG") == NULL ||
        log_level_parse(getenv("FUZZ_GW_CONN_LOG"), &lvl) != 0)
        lvl = LOG_ERROR;
    log_setup(lvl, LOG_LOGFMT, stderr);
    H = calloc(1, sizeof(*H));
    if (H == NULL)
        abort();
    gw_cfg_defaults(&H->cfg);
    H->listen[0].kind = GW_L_SINGLE;
    H->listen[1].kind = GW_L_SNI;
    H->listen[2].kind = GW_L_PEER;
    H->cfg.listen = H->listen;
    H->cfg.nlisten = 3;
    H->cfg.io = ENG_EPOLL;
    H->keys[0] = K1;
    H->cfg.keys = H->keys;
    H->cfg.nkeys = 1;
    H->cfg.log_rate = 0;
    /* small limits, so that inputs can reach them */
    H->cfg.max_handshakes = 5;
    H->cfg.max_handshakes_per_ip = 3;
    H->cfg.max_channels = 2;
    if (token_keys_add(&H->ks, K1, strlen(K1)) != 0)
        abort();
    req.valid = (int64_t)time(NULL) + 100LL * 365 * 86400;
    if (token_issue(&H->ks.v[0], &req, (uint64_t)time(NULL), NULL, &H->pre_token) != 0)
        abort();
    H->g = gw_test_new(&H->cfg, err, sizeof(err));
    if (H->g == NULL) {
        fprintf(stderr, "fuzz_gw_conn: %s\n", err);
        abort();
    }
    atexit(harness_free);
    return H;
}

/* ---- sockets ------------------------------------------------------------- */

static void die(const char *what)
{
    fprintf(stderr, "fuzz_gw_conn: %s\n", what);
    abort();
}

static void hclose(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

/* A socketpair: our end in *mine, the other handed to the gateway. */
static void adopt(struct run *r, enum gw_listen_kind kind, bool v6, uint8_t tag, int *mine)
{
    struct net_addr peer = { .family = v6 ? AF_INET6 : AF_INET, .port = 40000 + tag };
    int sv[2];

    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0)
        die("socketpair");
    if (v6) {
        peer.ip[0] = 0x20;
        peer.ip[1] = 0x01;
        peer.ip[2] = 0x0d;
        peer.ip[3] = 0xb8;
        peer.ip[15] = tag;
    } else {
        peer.ip[0] = 192;
        peer.ip[2] = 2;
        peer.ip[3] = tag;
    }
    *mine = sv[0];
    r->gwfds[r->ngwfds++] = sv[1];
    gw_test_adopt(H->g, kind, sv[1], &peer);
}

static void tun_free(struct ftun *t)
{
    hclose(&t->fd);
    tc_free(t->seal);
    tc_free(t->open);
    t->seal = t->open = NULL;
}

/* Read what the gateway sent on a tunnel and decode it: its frames must
 * always decode (the gateway only sends what its encoder made). */
static bool tun_drain(struct ftun *t)
{
    uint8_t buf[65536];
    bool moved = false;
    ssize_t n;

    if (t->fd < 0 || !t->reading)
        return false;
    while ((n = recv(t->fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0) {
        size_t off = 0, used;
        struct frame_ev ev;

        moved = true;
        while (off < (size_t)n) {
            enum frame_res fr = frame_dec_feed(&t->dec, buf + off, (size_t)n - off, &used, &ev);
            if (fr == FRAME_BAD) {
                fprintf(stderr, "fuzz_gw_conn: gateway frame does not decode: %s\n",
                        frame_err_name(ev.err));
                abort();
            }
            off += used;
            if (fr == FRAME_AGAIN)
                break;
            if (ev.kind == FRAME_EV_FRAME && ev.flow == FRAME_NEW) {
                if (t->nids == NIDS) {
                    memmove(t->ids[0], t->ids[1], (NIDS - 1) * FRAME_ID_LEN);
                    t->nids--;
                }
                memcpy(t->ids[t->nids++], ev.id, FRAME_ID_LEN);
            }
        }
    }
    if (n == 0 || (n < 0 && errno != EAGAIN))
        t->reading = false; /* closed by the gateway: keep the fd until the end */
    return moved;
}

static bool dev_drain(struct fdev *d)
{
    uint8_t buf[65536];
    bool moved = false;
    ssize_t n;

    if (d->fd < 0 || !d->reading)
        return false;
    while ((n = recv(d->fd, buf, sizeof(buf), MSG_DONTWAIT)) > 0)
        moved = true;
    if (n == 0 || (n < 0 && errno != EAGAIN))
        d->reading = false;
    return moved;
}

/* Run the gateway until a turn does nothing and no harness socket had
 * anything to read, twice in a row. */
static void pump(struct run *r)
{
    int quiet = 0;

    for (int i = 0; i < PUMP_TURNS && quiet < 2; i++) {
        int n = gw_test_turn(H->g, 0);
        bool moved = false;

        if (n < 0)
            die("engine failed");
        moved |= tun_drain(&r->tun);
        moved |= tun_drain(&r->pre);
        for (int d = 0; d < NDEV; d++)
            moved |= dev_drain(&r->dev[d]);
        quiet = n == 0 && !moved ? quiet + 1 : 0;
    }
}

/* Write all of b (pumping while the socket is full); false if the peer
 * is gone or the gateway stopped reading for good. */
static bool put(struct run *r, int fd, const void *b, size_t n)
{
    const uint8_t *p = b;
    int stalls = 0;

    while (n > 0 && fd >= 0) {
        ssize_t k = send(fd, p, n, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k > 0) {
            p += k;
            n -= (size_t)k;
            stalls = 0;
        } else if (k < 0 && errno == EAGAIN && stalls++ < PUT_STALLS) {
            pump(r);
        } else {
            return false;
        }
    }
    return n == 0;
}

/* ---- input ------------------------------------------------------------------ */

static bool take(struct run *r, void *out, size_t n)
{
    if ((size_t)(r->end - r->p) < n)
        return false;
    memcpy(out, r->p, n);
    r->p += n;
    return true;
}

static size_t take_upto(struct run *r, const uint8_t **out, size_t want)
{
    size_t left = (size_t)(r->end - r->p), n = want < left ? want : left;

    *out = r->p;
    r->p += n;
    return n;
}

/* ---- the client side ------------------------------------------------------ */

/* Streams and decoder of a client whose token carried cl. */
static bool tun_init(struct ftun *t, const struct claims *cl)
{
    const uint8_t *iv = cl->aes_iv_len == CLAIMS_IV_LEN ? cl->aes_iv : NULL;

    t->seal = tc_new(cl->cipher, TC_SEAL, TC_SIDE_CLIENT, cl->aes_key, cl->aes_key_len, iv);
    t->open = tc_new(cl->cipher, TC_OPEN, TC_SIDE_GATEWAY, cl->aes_key, cl->aes_key_len, iv);
    if (t->seal == NULL || t->open == NULL)
        return false;
    t->version = (unsigned)claims_version(cl);
    frame_dec_init(&t->dec, t->open, t->version, 0);
    return true;
}

/* Wait for the challenge on t->fd and answer it (answer mode am). */
static bool answer(struct run *r, struct ftun *t, uint8_t am)
{
    uint8_t ch[CHALLENGE_WIRE_MAX], ans[CHALLENGE_WIRE_MAX];
    size_t need = challenge_wire_len(t->open), have = 0;

    for (int i = 0; i < 8 && have < need; i++) {
        ssize_t k = recv(t->fd, ch + have, need - have, MSG_DONTWAIT);
        if (k == 0 || (k < 0 && errno != EAGAIN))
            return false;
        if (k > 0)
            have += (size_t)k;
        else
            pump(r);
    }
    if (have < need || challenge_answer(t->open, t->seal, ch, ans) != 0)
        return false;
    switch (am & 3) {
    case 1:
        ans[need / 2] ^= 0x10;
        break;
    case 2:
        need /= 2;
        break;
    default:
        break;
    }
    t->reading = true;
    if (!put(r, t->fd, ans, need))
        return false;
    if (!(am & 4))
        pump(r);
    return true;
}

static void pre_tunnel(struct run *r)
{
    struct gw_test_counts n;
    struct claims cl;

    adopt(r, GW_L_PEER, false, 200, &r->pre.fd);
    if (token_verify(H->ks.v, H->ks.n, H->pre_token, strlen(H->pre_token), (double)time(NULL),
                     &cl, NULL) != TOKEN_OK || !tun_init(&r->pre, &cl))
        die("pre-tunnel token");
    claims_fini(&cl);
    if (!put(r, r->pre.fd, H->pre_token, strlen(H->pre_token)))
        die("pre-tunnel token write");
    pump(r);
    if (!answer(r, &r->pre, 0))
        die("pre-tunnel: no challenge");
    gw_test_counts(H->g, &n);
    if (n.tunnels != 1)
        die("pre-tunnel did not come up");
}

/* ---- ops ---------------------------------------------------------------------- */

static struct ftun *target(struct run *r, uint8_t flags)
{
    struct ftun *t = (flags & 0x80) || r->tun.seal == NULL ? &r->pre : &r->tun;

    return t->seal != NULL && t->fd >= 0 ? t : NULL;
}

static void frame_id(const struct ftun *t, uint8_t sel, uint8_t id[FRAME_ID_LEN])
{
    if (sel < 0x80 && t->nids > 0)
        memcpy(id, t->ids[t->nids - 1 - sel % t->nids], FRAME_ID_LEN);
    else
        memset(id, sel, FRAME_ID_LEN);
}

/* One frame: header sealed as a unit, payload verbatim or sealed. */
static void op_frame(struct run *r, uint8_t flags)
{
    uint8_t flow, sel, lenb[2], hdr[FRAME_HDR_LEN], wire[FRAME_HDR_LEN + TC_AEAD_OVERHEAD];
    uint8_t *sealed = NULL;
    const uint8_t *payload;
    struct ftun *t = target(r, flags);
    size_t len, plen;
    uint32_t size;

    memset(hdr, 0, sizeof(hdr));
    if (!take(r, &flow, 1) || !take(r, &sel, 1) || !take(r, lenb, 2))
        return;
    if ((flags & 0x10) && !take(r, hdr + 21, FRAME_EXTRA_LEN))
        return;
    len = (size_t)lenb[0] << 8 | lenb[1];
    size = (uint32_t)len;
    if (flags & 0x20) {
        uint8_t s[4];
        if (!take(r, s, 4))
            return;
        size = (uint32_t)s[0] << 24 | (uint32_t)s[1] << 16 | (uint32_t)s[2] << 8 | s[3];
    }
    plen = take_upto(r, &payload, len);
    if (t == NULL)
        return;
    if ((flags & 0x40) && plen > 0) {
        /* a unit of its own: CBC takes whole blocks */
        size_t unit = tc_overhead(t->seal) == 0 ? plen & ~(size_t)15 : plen;
        if (unit == 0)
            return;
        sealed = malloc(unit + TC_AEAD_OVERHEAD);
        if (sealed == NULL || tc_seal(t->seal, payload, unit, sealed) != 0) {
            free(sealed);
            return;
        }
        plen = unit + tc_overhead(t->seal);
        payload = sealed;
        if (!(flags & 0x20))
            size = (uint32_t)plen;
    }
    frame_id(t, sel, hdr);
    hdr[16] = flow;
    hdr[17] = (uint8_t)(size >> 24);
    hdr[18] = (uint8_t)(size >> 16);
    hdr[19] = (uint8_t)(size >> 8);
    hdr[20] = (uint8_t)size;
    if (tc_seal(t->seal, hdr, FRAME_HDR_LEN, wire) == 0 &&
        put(r, t->fd, wire, FRAME_HDR_LEN + tc_overhead(t->seal)))
        put(r, t->fd, payload, plen);
    free(sealed);
}

/* A minimal TLS 1.2 ClientHello whose server_name is name. */
static size_t hello(const char *name, uint8_t *b)
{
    size_t n = strlen(name), ext = 9 + n, body = 2 + 32 + 1 + 4 + 2 + 2 + ext, i = 0;

    b[i++] = 0x16, b[i++] = 3, b[i++] = 1;
    b[i++] = (uint8_t)((body + 4) >> 8), b[i++] = (uint8_t)(body + 4);
    b[i++] = 1, b[i++] = 0, b[i++] = (uint8_t)(body >> 8), b[i++] = (uint8_t)body;
    b[i++] = 3, b[i++] = 3;
    memset(b + i, 0x42, 32), i += 32;
    b[i++] = 0;                                   /* session id */
    b[i++] = 0, b[i++] = 2, b[i++] = 0xc0, b[i++] = 0x2f;
    b[i++] = 1, b[i++] = 0;                       /* compression: null */
    b[i++] = (uint8_t)(ext >> 8), b[i++] = (uint8_t)ext;
    b[i++] = 0, b[i++] = 0;                       /* server_name */
    b[i++] = (uint8_t)((n + 5) >> 8), b[i++] = (uint8_t)(n + 5);
    b[i++] = (uint8_t)((n + 3) >> 8), b[i++] = (uint8_t)(n + 3);
    b[i++] = 0, b[i++] = (uint8_t)(n >> 8), b[i++] = (uint8_t)n;
    memcpy(b + i, name, n);
    return i + n;
}

/* A free device slot (1..NDEV-1), or NULL. */
static struct fdev *dev_slot(struct run *r)
{
    for (int d = 1; d < NDEV; d++)
        if (r->dev[d].fd < 0)
            return r->ngwfds < MAX_ADOPT ? &r->dev[d] : NULL;
    return NULL;
}

static void op_device(struct run *r, uint8_t flags)
{
    uint8_t which, b[128], src;
    struct fdev *d;
    size_t n;

    if (!take(r, &which, 1) || (d = dev_slot(r)) == NULL)
        return;
    src = (which >> 2) & 3;
    adopt(r, GW_L_SNI, which & 0x80, src == 0 ? 1 : (uint8_t)(100 + src), &d->fd);
    d->reading = true;
    n = hello(names[which & 3], b);
    if (flags & 0x20) {
        put(r, d->fd, b, n / 2);
    } else if (flags & 0x10) {
        put(r, d->fd, b, n / 2);
        pump(r);
        put(r, d->fd, b + n / 2, n - n / 2);
    } else {
        put(r, d->fd, b, n);
    }
}

static const enum gw_listen_kind kinds[4] = { GW_L_SINGLE, GW_L_SNI, GW_L_PEER, GW_L_SINGLE };

/* The fuzzed connection's handshake bytes again, on a new connection. */
static void op_replay(struct run *r)
{
    struct fdev *d = dev_slot(r);

    if (d == NULL)
        return;
    H->cfg.proxy_protocol = r->mode & 4;
    adopt(r, kinds[r->mode & 3], r->mode & 0x80, 1, &d->fd);
    d->reading = true;
    put(r, d->fd, r->hs, r->nhs);
}

static struct fdev *dev_arg(struct run *r)
{
    uint8_t d;

    if (!take(r, &d, 1) || r->dev[d % NDEV].fd < 0)
        return NULL;
    return &r->dev[d % NDEV];
}

static void op_flood(struct run *r, uint8_t flags)
{
    static const uint8_t zeros[FLOOD_CHUNK];
    uint8_t sel, n, hdr[FRAME_HDR_LEN] = { 0 }, wire[FRAME_HDR_LEN + TC_AEAD_OVERHEAD];
    struct ftun *t = target(r, flags);

    if (!take(r, &sel, 1) || !take(r, &n, 1) || t == NULL)
        return;
    frame_id(t, sel, hdr);
    hdr[16] = FRAME_DATA;
    hdr[17] = (uint8_t)(FLOOD_CHUNK >> 24);
    hdr[18] = (uint8_t)(FLOOD_CHUNK >> 16);
    hdr[19] = (uint8_t)(FLOOD_CHUNK >> 8);
    hdr[20] = (uint8_t)FLOOD_CHUNK;
    for (unsigned i = 0; i < (n & 0x3f) && r->flooded < FLOOD_MAX; i++, r->flooded++)
        if (tc_seal(t->seal, hdr, FRAME_HDR_LEN, wire) != 0 ||
            !put(r, t->fd, wire, FRAME_HDR_LEN + tc_overhead(t->seal)) ||
            !put(r, t->fd, zeros, sizeof(zeros)))
            return;
}

/* n PINGs in one write: the gateway's replies queue faster than it can
 * send them when the tunnel is not read. */
static void op_burst(struct run *r, uint8_t flags)
{
    uint8_t n, hdr[FRAME_HDR_LEN] = { 0 }, *wire;
    struct ftun *t = target(r, flags);
    size_t unit;

    if (!take(r, &n, 1) || t == NULL)
        return;
    unit = FRAME_HDR_LEN + tc_overhead(t->seal);
    wire = malloc(unit * n + 1);
    if (wire == NULL)
        return;
    hdr[16] = FRAME_PING;
    memcpy(hdr + 21, "ping", 4);
    for (unsigned i = 0; i < n; i++) {
        memset(hdr, (int)i, FRAME_ID_LEN);
        if (tc_seal(t->seal, hdr, FRAME_HDR_LEN, wire + i * unit) != 0) {
            free(wire);
            return;
        }
    }
    put(r, t->fd, wire, unit * n);
    free(wire);
}

static void op_one(struct run *r, uint8_t op)
{
    uint8_t flags = op & 0xf0, len;
    const uint8_t *b;
    struct fdev *d;
    struct ftun *t;

    switch (op & 0x0f) {
    case 1:
        t = target(r, flags);
        if (take(r, &len, 1) && (len = (uint8_t)take_upto(r, &b, len)) > 0 && t != NULL)
            put(r, t->fd, b, len);
        break;
    case 2:
        op_device(r, flags);
        break;
    case 3:
        if ((d = dev_arg(r)) != NULL && take(r, &len, 1) &&
            (len = (uint8_t)take_upto(r, &b, len)) > 0)
            put(r, d->fd, b, len);
        break;
    case 4:
        if ((d = dev_arg(r)) != NULL) {
            if (flags & 0x30)
                shutdown(d->fd, flags & 0x10 ? SHUT_WR : SHUT_RD);
            else
                hclose(&d->fd);
        }
        break;
    case 5:
        if ((d = dev_arg(r)) != NULL)
            d->reading = !d->reading;
        break;
    case 6:
        if ((t = target(r, flags)) != NULL)
            t->reading = !t->reading;
        break;
    case 7:
        if ((t = target(r, flags)) != NULL)
            shutdown(t->fd, flags & 0x20 ? SHUT_RD : SHUT_WR);
        break;
    case 8:
        gw_test_expire(H->g, flags & 0x10);
        break;
    case 9:
        op_flood(r, flags);
        break;
    case 10:
        break;
    case 11:
        op_replay(r);
        break;
    case 12:
        op_burst(r, flags);
        break;
    default:
        op_frame(r, flags);
        break;
    }
    pump(r);
}

/* ---- the fuzzed connection ------------------------------------------------ */

/* The claims of what the gateway verified: the handshake bytes after the
 * PROXY header, if the gateway parsed one. */
static bool verified_claims(const uint8_t *b, size_t n, bool pp, struct claims *cl)
{
    struct pp_result pr;
    size_t off = 0;

    if (pp && pp_parse(b, n, &pr) == PP_OK)
        off = pr.size;
    return token_verify(H->ks.v, H->ks.n, (const char *)b + off, n - off, (double)time(NULL),
                        cl, NULL) == TOKEN_OK;
}

static void handshake(struct run *r, uint8_t mode, uint8_t split, uint8_t am,
                      const uint8_t *hs, size_t n)
{
    enum gw_listen_kind kind = kinds[mode & 3];
    bool pp = (mode & 4) && kind != GW_L_PEER, challenged = false;
    size_t done = 0;
    uint8_t peek;
    int fd;

    H->cfg.proxy_protocol = mode & 4;
    adopt(r, kind, mode & 0x80, 1, &fd);
    if (am & 8)
        shutdown(fd, SHUT_RD);
    while (done < n) {
        size_t k = split == 0 || split > n - done ? n - done : split;
        if (!put(r, fd, hs + done, k))
            break;
        done += k;
        pump(r);
        /* the gateway sends nothing but a challenge before the mux */
        if (recv(fd, &peek, 1, MSG_PEEK | MSG_DONTWAIT) == 1) {
            challenged = true;
            break;
        }
    }
    if (challenged && (mode & 0x10)) {
        struct claims cl;
        r->tun.fd = fd;
        if (verified_claims(hs, done, pp, &cl)) {
            bool ok = tun_init(&r->tun, &cl);
            claims_fini(&cl);
            if (ok && answer(r, &r->tun, am))
                return;
        }
        r->tun.fd = -1;     /* no answer: the socket stays, as device 0 */
        tun_free(&r->tun);
    }
    r->dev[0].fd = fd;
    r->dev[0].reading = true;
}

/* ---- end of an input ----------------------------------------------------------- */

static void finish(struct run *r, bool half)
{
    struct gw_test_counts n;
    int fds[2 + NDEV];
    size_t nfds = 0;

    fds[nfds++] = r->tun.fd;
    fds[nfds++] = r->pre.fd;
    for (int d = 0; d < NDEV; d++)
        fds[nfds++] = r->dev[d].fd;
    if (half) {
        for (size_t i = 0; i < nfds; i++)
            if (fds[i] >= 0)
                shutdown(fds[i], SHUT_WR);
        pump(r);
    }
    tun_free(&r->tun);
    tun_free(&r->pre);
    for (int d = 0; d < NDEV; d++)
        hclose(&r->dev[d].fd);
    pump(r);
    gw_test_counts(H->g, &n);
    if (n.conns != 0 || n.tunnels != 0 || n.chans != 0) {
        fprintf(stderr, "fuzz_gw_conn: every peer closed, yet %zu connections, %zu tunnels, "
                "%zu channels remain\n", n.conns, n.tunnels, n.chans);
        abort();
    }
    if (gw_test_reset(H->g) != 0)
        die("reset did not complete");
    rcu_flush();
    for (size_t i = 0; i < r->ngwfds; i++)
        if (fcntl(r->gwfds[i], F_GETFD) != -1 || errno != EBADF) {
            fprintf(stderr, "fuzz_gw_conn: fd %d handed to the gateway is still open\n",
                    r->gwfds[i]);
            abort();
        }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct run r = { .p = data, .end = data + size };
    uint8_t hdr[5], op;
    const uint8_t *hs;
    size_t n;

    harness_get();
    r.tun.fd = r.pre.fd = -1;
    for (int d = 0; d < NDEV; d++)
        r.dev[d].fd = -1;
    if (!take(&r, hdr, sizeof(hdr)))
        return 0;
    if (hdr[0] & 0x08)
        pre_tunnel(&r);
    n = take_upto(&r, &hs, (size_t)hdr[3] << 8 | hdr[4]);
    r.hs = hs;
    r.nhs = n;
    r.mode = hdr[0];
    handshake(&r, hdr[0], hdr[1], hdr[2], hs, n);
    if (hdr[0] & 0x20) {
        gw_test_expire(H->g, false);
        pump(&r);
    }
    while (take(&r, &op, 1))
        op_one(&r, op);
    finish(&r, hdr[0] & 0x40);
    return 0;
}
