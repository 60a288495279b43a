/* core/mux.h - one tunnel's multiplexer, for either side (PROTOCOL.md 4-6).
 *
 * A struct mux runs the multiplexer on one tunnel socket AFTER the
 * handshake (token + challenge are done by the role: core/gw_* on the
 * gateway, core/client_* on the client). It owns the tunnel fd, the frame
 * decoder and encoder, and every channel of the tunnel with its local
 * socket (the device connection on the gateway, the endpoint connection on
 * the client). It lives on one engine (one shard) and is single-threaded.
 *
 * Data path (both directions keep PROTOCOL.md order rules):
 *
 *   local fd --recv(engine-picked buf)--> DATA frame queued --batch seal +
 *       one writev--> tunnel
 *   tunnel --recv(engine-picked buf)--> frame_dec --DATA pieces copied into
 *       the channel's incoming queue--> send to local fd
 *
 * - Outgoing: channels with something to send sit on a ready list served
 *   round-robin, one frame per channel per pass, so one busy channel cannot
 *   starve the others (5.2). Every frame gathered in one loop turn goes into
 *   one struct frame_batch: headers sealed with ONE cipher call, headers and
 *   payloads written with ONE vectored send; one send in flight on the
 *   tunnel. A channel holds at most two payloads read from its local
 *   socket: while one is being written in a batch, the next is read
 *   (overlap); a third read waits for that write. So a channel never holds
 *   more than 2 * mux_cfg.read_size bytes and the local socket's own buffer
 *   provides the backpressure.
 * - Memory: receive buffers are picked by the engine when data arrives
 *   (eng_recv_pick: an io_uring provided buffer ring, or the epoll engine's
 *   pool at readiness) and go back once the data is forwarded; the frame
 *   decoder and the send context (batch, control frames) exist only while
 *   in use. An idle tunnel or channel holds none of them (struct mux is
 *   1.25 KiB, struct mux_chan 0.6 KiB; plus the ciphers, the role's own
 *   records and the kernel's socket buffers).
 * - Incoming: DATA is copied out of the tunnel buffer into the channel's
 *   queue at once (or spliced into its pipe, below), so the tunnel is read
 *   at full speed whatever any one local socket does (one exception: a
 *   tunnel's ONLY channel, whose pipe is full, is waited for up to 20 ms,
 *   below). Protocol >= 1: a
 *   channel's pipe and queue together crossing in_high queues PAUSE,
 *   coming back to in_low queues RESUME; any version: more than in_limit
 *   held closes that one channel with CLOSE (5.2), and when all the
 *   tunnel's queues (not pipes: see tunnel_overflow) together pass
 *   tunnel_in_limit, the channel queueing the most is closed the same
 *   way. PAUSE/RESUME from the peer stop/restart reading the channel's
 *   local socket.
 * - Closing (no half-close, 6.4): local EOF → CLOSE sent after the DATA
 *   already read; what the peer had sent before is still written to the
 *   local socket (a TLS peer that half-closed may still be reading), then
 *   the socket is closed. Local error, queue limit, idle, role close →
 *   CLOSE sent, queued incoming data dropped, socket closed. CLOSE from
 *   the peer → queued data written to the local socket, then it is closed;
 *   no CLOSE answered (4.7). A local reader that takes nothing for
 *   cfg.linger_ms while such a drain is pending loses the rest. The id
 *   leaves the channel table when the close starts: later frames for it
 *   count as unknown ids. A channel closed before its NEW was written sends
 *   nothing at all. Tunnel closed → every local socket closed, no CLOSE
 *   frames.
 * - Protocol rules on receipt (4.10): unknown FLOW consumed and counted;
 *   DATA/CLOSE/PAUSE/RESUME for unknown ids dropped (counted; apart, as
 *   "late", when this side closed that id among its last MUX_LATE_IDS
 *   closes: the peer sent them before it saw our CLOSE); NEW at the
 *   gateway ignored; NEW with an id already open closes the tunnel; PING
 *   answered with "pong" and the same id; any fatal decoder error closes
 *   the tunnel.
 * - Timers: tunnel idle (no frame read or written, default 120 s), channel
 *   idle (gateway, default 120 s), client pings (interval + pong deadline).
 *
 * Ownership:
 * - mux_new() takes the tunnel fd, both tc_streams and the pending bytes
 *   (copied). The mux frees all of them.
 * - mux_chan_open()/mux_chan_attach() take the local fd.
 * - The mux calls hooks.on_dead exactly once when the tunnel ends (peer
 *   closed, fatal error, idle, or mux_close()), at the end of that loop
 *   turn, right after on_chan_closed for every channel not yet reported.
 *   The role must drop every pointer to the mux and its channels inside
 *   on_dead. The mux then frees itself (eng_defer) once every op it started
 *   has called back: that turn or the next few. Run the loop a few turns
 *   after on_dead before eng_free(), or its memory is not reclaimed.
 * - hooks.on_chan_closed runs exactly once for every channel the role saw
 *   (mux_chan_open() result or on_new), whatever closed it, never inside a
 *   mux_* call; with the channel's own reason (MUX_R_TUNNEL_DOWN when the
 *   tunnel took it down). Channels refused before on_new (no hook, limit,
 *   bad NEW block) are answered with CLOSE and never reported.
 * - struct mux_chan pointers handed to hooks stay valid until the channel
 *   closes; roles keep none across turns except through mux_chan_*() calls
 *   made in the same hook or before on_chan_closed.
 */
#ifndef CORE_MUX_H
#define CORE_MUX_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/addr.h"
#include "core/frame.h"
#include "crypto/tcipher.h"
#include "io/eng.h"

struct mux;
struct mux_chan;

/* Why a channel or tunnel closed: log lines and counter labels. */
enum mux_reason {
    MUX_R_NONE = 0,
    MUX_R_LOCAL_EOF,      /* local socket closed its side */
    MUX_R_LOCAL_ERROR,    /* local socket failed */
    MUX_R_PEER_CLOSE,     /* CLOSE received */
    MUX_R_QUEUE_LIMIT,    /* incoming queue above in_limit */
    MUX_R_CHAN_IDLE,      /* channel idle timer */
    MUX_R_REFUSED,        /* role refused the channel (ACL, no endpoint) */
    MUX_R_CONNECT_FAIL,   /* client: endpoint unreachable */
    MUX_R_LIMIT,          /* max_channels reached */
    MUX_R_TUNNEL_DOWN,    /* the tunnel closed under the channel */
    MUX_R_PEER_EOF,       /* tunnel: peer closed the connection */
    MUX_R_TUNNEL_ERROR,   /* tunnel: socket error */
    MUX_R_PROTOCOL,       /* tunnel: fatal decoder error / duplicate NEW */
    MUX_R_TUNNEL_IDLE,    /* tunnel: idle timer */
    MUX_R_PONG_TIMEOUT,   /* tunnel: no pong in time (client) */
    MUX_R_REPLACED,       /* tunnel: same hostname registered again */
    MUX_R_EXPIRED,        /* tunnel: token expired while connected */
    MUX_R_SHUTDOWN,       /* tunnel: process stopping */
    MUX_R_COUNT
};

/* "local_eof", "peer_close", ... stable names for logs and metrics. */
const char *mux_reason_name(enum mux_reason r);

/* The splice path (DATA payloads moved socket -> pipe -> socket with
 * splice(2), never copied through user memory; both engines):
 *   incoming  tunnel -> the channel's own pipe -> local socket, for a
 *             payload whose rest is at least the incoming threshold when
 *             the tunnel buffer runs out, while the channel's queue is
 *             empty and its pipe (ENG_PIPE_SIZE) has room; the rest of a
 *             payload that does not fit is copied into the queue, which
 *             the channel writes after its pipe (then the next tunnel
 *             read takes one header only, so that the next large payload
 *             splices too). The channel's own write op empties its pipe,
 *             then its queue. The tunnel waits on a local reader only when
 *             the channel is its only open one and its pipe has no room
 *             (or its queue holds bytes): it is not read until that writer
 *             frees room, at most MUX_SPLICE_WAIT_MS (20 ms, also the
 *             latency added for PINGs then); a channel whose wait timed
 *             out is not waited for again until it holds nothing. With
 *             several channels it never waits.
 *   outgoing  local socket -> pipe -> tunnel (the frame header goes out
 *             with MSG_MORE, the payload with splice), for a channel whose
 *             last read returned at least the outgoing threshold; a read
 *             then takes up to the pipe size (ENG_PIPE_SIZE, 1 MiB).
 * Thresholds (measured: the table just before MUX_SPLICE_IN_AUTO):
 *   auto  incoming from MUX_SPLICE_IN_AUTO bytes, outgoing from
 *         MUX_SPLICE_OUT_AUTO bytes;
 *   on    every payload both paths can take; off  always copy. */
enum mux_splice {
    MUX_SPLICE_AUTO = 1,
    MUX_SPLICE_ON = 2,
    MUX_SPLICE_OFF = 3,
};

/* Where splice pays, measured on loopback (kernel 6.18, 2 vCPU): CPU-s
 * per GiB of one forwarding process, copy vs splice, by payload size:
 *
 *              4 KiB   16 KiB  64 KiB  256 KiB  1 MiB
 *   incoming   0.75    0.35    0.47    0.45     0.51   copy (recv 256 KiB,
 *              1.71    0.56    0.33    0.23     0.25   splice   queue, send)
 *   outgoing   2.04    0.61    0.57    0.35     0.26   copy (recv + writev)
 *              2.21    0.61    0.48    0.39     0.20   splice (+ MSG_MORE hdr)
 *
 * Incoming splice wins from 64 KiB; outgoing only with reads larger than
 * the 256 KiB copy buffer, which the 1 MiB pipe gives once a stream fills
 * big reads. End to end (bench raw, 4 GiB, auto vs off): gateway 0.305 vs
 * 0.395 CPU-s/GiB, client 0.22 vs 0.37; 100-byte keep-alive unchanged,
 * while "on" (splicing every payload) costs 3.5x CPU per request there. */
/* Incoming payloads (rest) of at least this many bytes splice in auto. */
#define MUX_SPLICE_IN_AUTO (64u << 10)
/* A channel whose last read returned at least this many bytes splices its
 * next read in auto. */
#define MUX_SPLICE_OUT_AUTO (256u << 10)

/* --help lines of the --splice and --batch options (server and client). */
#define MUX_SPLICE_HELP                                                                    \
    "move large DATA payloads socket -> pipe -> socket with splice(2): auto = from 64 KiB " \
    "incoming, 256 KiB outgoing (measured, see core/mux.h); on = always; off = copy"
#define MUX_BATCH_HELP                                                                     \
    "seal every frame header of a loop turn in one cipher call and write them with one "   \
    "writev (off: one frame per send; a benchmark knob)"

/* "auto", "on", "off" -> *out; -1 for anything else. */
int mux_splice_parse(const char *s, enum mux_splice *out);
const char *mux_splice_name(enum mux_splice s);

/* Default cap on a tunnel's incoming queues together: one protocol-0
 * channel's own limit, so a single channel behaves as the reference. */
#define MUX_TUNNEL_IN_LIMIT ((size_t)256 << 20)

/* Tunables; mux_cfg_defaults() fills PROTOCOL.md 5.2 / 6.9 values.
 * Copied into every mux: ordered to leave no holes. */
struct mux_cfg {
    enum tc_side side;        /* who we are: sets NEW handling and nonces */
    unsigned version;         /* protocol version of this tunnel (0..2) */
    uint32_t max_frame;       /* cap on received SIZE (default 16 MiB,
                                 at most 256 MiB) */
    enum mux_splice splice;   /* default MUX_SPLICE_AUTO, see above */
    size_t read_size;         /* bytes per local recv = max DATA we send
                                 (default and most: ENG_PBUF_BIG, 256 KiB;
                                 reads start at ENG_PBUF_SMALL and grow to
                                 this while they come back full) */
    size_t in_high, in_low;   /* incoming watermarks (2 MiB / 512 KiB) */
    size_t in_limit;          /* incoming cap: 65 MiB (v>=1), 256 MiB (v0) */
    size_t tunnel_in_limit;   /* all channels' incoming queues together;
                                 above it the channel holding the most is
                                 closed (MUX_TUNNEL_IN_LIMIT; 0 = none) */
    size_t max_channels;      /* 0 = unlimited */
    size_t rx_size;           /* bytes per tunnel recv (default and most:
                                 ENG_PBUF_BIG, 256 KiB; adaptive as
                                 read_size) */
    uint32_t tunnel_idle_ms;  /* 0 = off; default 120000 */
    uint32_t chan_idle_ms;    /* 0 = off; default 120000 (gateway) */
    uint32_t ping_ms;         /* client: ping interval, 0 = never (gateway) */
    uint32_t pong_ms;         /* client: deadline for the reply (90000) */
    uint32_t linger_ms;       /* closing channel: longest wait for its local
                                 reader to take the queued data (10000);
                                 0 = wait for the channel idle timer */
    bool batch;               /* gather every frame of a loop turn into one
                                 sealed batch and one writev (default true);
                                 false: one frame per send, an ablation knob
                                 that shows what batching buys */
    struct mux_group *group;  /* shared counters and random bytes (below);
                                 NULL (the default): the mux allocates a
                                 group of its own */
};

void mux_cfg_defaults(struct mux_cfg *cfg, enum tc_side side, unsigned version);

/* Counters of a group of tunnels (struct mux_group), plain integers
 * bumped by the owner thread; the role adds them into its metrics. */
struct mux_stats {
    uint64_t frames_in[8], frames_out[8]; /* index: mux_flow_index() */
    uint64_t bytes_to_local;              /* DATA payload written locally */
    uint64_t bytes_queued_in;             /* DATA payload received that
                                             was copied into a channel's
                                             incoming queue (the rest was
                                             spliced into its pipe) */
    uint64_t bytes_from_local;            /* DATA payload read locally */
    uint64_t bytes_spliced_in;            /* of bytes received: spliced
                                             tunnel -> channel pipe */
    uint64_t bytes_spliced_out;           /* of bytes_from_local: spliced
                                             local socket -> pipe */
    uint64_t chan_opened;
    uint64_t chan_closed[MUX_R_COUNT];
    uint64_t dropped_unknown_id;          /* frames for ids not open */
    uint64_t tunnel_overflows;            /* channels closed by
                                             tunnel_in_limit (also counted
                                             in chan_closed[QUEUE_LIMIT]) */
    uint64_t dropped_late;                /* frames for a channel this side
                                             closed lately (the peer sent
                                             them before it saw our CLOSE) */
    uint64_t pauses_sent, resumes_sent;
    uint64_t batches, batch_frames;       /* writev count, frames in them */
    uint64_t bad_new;                     /* v>=2 NEW with a short block:
                                             answered with CLOSE (4.5) */
};

/* What the tunnels of one owner thread share, so that an idle tunnel
 * holds no counters or random bytes of its own: the counters above, a
 * pool of CSPRNG bytes for frame padding and channel ids (refilled
 * MUX_GROUP_RND at a time, fewer RAND_bytes calls than per tunnel), and
 * one spare send context (18 KiB) and frame decoder (2 KiB): a tunnel
 * holds those only while it sends or has a frame split across reads, and
 * a busy tunnel takes and returns them every turn. Owned by the role
 * (e.g. one per gateway shard); must outlive its tunnels. */
#define MUX_GROUP_RND 1024
struct mux_group {
    struct mux_stats st;
    void *spare_tx;               /* a struct mux_tx, or NULL */
    void *spare_dec;              /* a struct frame_dec, or NULL */
    uint32_t rnd_pos;
    uint8_t rnd[MUX_GROUP_RND];
};

void mux_group_init(struct mux_group *g);
/* Frees the spares; the group may be initialised again. */
void mux_group_fini(struct mux_group *g);

/* What one tunnel moved (for its log line), apart from its group. */
struct mux_tally {
    uint64_t chan_opened;
    uint64_t bytes_to_local, bytes_from_local;
};

/* 0 NEW, 1 DATA, 2 CLOSE, 3 PING, 4 PAUSE, 5 RESUME, 6 unknown. */
unsigned mux_flow_index(uint8_t flow);

/* Role callbacks. ctx is passed back unchanged. All run on the owner
 * thread from the engine loop, never from inside a mux_* call. */
struct mux_hooks {
    void *ctx;
    /* Client: a NEW arrived and a channel object exists in state PENDING
     * (its incoming DATA is queued). The role calls mux_chan_attach() once
     * its endpoint is connected, or mux_chan_close() to refuse. May be
     * NULL on the gateway (NEW from a client is ignored there). */
    void (*on_new)(void *ctx, struct mux_chan *c, const struct net_addr *caller);
    /* Client: more bytes were queued on a PENDING channel (for routing by
     * the SNI inside its first bytes; see mux_chan_peek()). May be NULL. */
    void (*on_pending_data)(void *ctx, struct mux_chan *c);
    /* A channel closed (any side, any reason). May be NULL. */
    void (*on_chan_closed)(void *ctx, struct mux_chan *c, enum mux_reason why);
    /* A "pong" arrived (client liveness; the mux already resets its own
     * pong deadline). May be NULL. */
    void (*on_pong)(void *ctx, struct mux *m);
    /* The tunnel ended; exactly once. Required. */
    void (*on_dead)(void *ctx, struct mux *m, enum mux_reason why);
};

/* Start the multiplexer on a connected tunnel socket. seal/open: the
 * cipher streams as the handshake left them (CBC chains and GCM counters
 * continue). pending: bytes already read from the tunnel after the
 * handshake (copied). Returns NULL on allocation failure, in which case
 * nothing was taken: the caller still owns fd and streams. */
struct mux *mux_new(struct eng *e, int fd, const struct mux_cfg *cfg,
                    const struct mux_hooks *hooks, struct tc_stream *seal,
                    struct tc_stream *open, const uint8_t *pending, size_t npending);

/* End the tunnel: every channel's local socket is closed, the tunnel fd is
 * half-closed then closed, on_dead runs (with why) in a later turn. Idempotent. */
void mux_close(struct mux *m, enum mux_reason why);

/* Gateway: open a channel for a device connection: NEW with caller, then
 * DATA carrying first[0..n) (the ClientHello and whatever came with it,
 * unchanged; copied), then relay. Takes fd. Returns NULL (fd closed, no
 * frame sent) when the tunnel is closing, max_channels is reached (counted
 * in chan_closed[MUX_R_LIMIT]) or n > FRAME_MAX_DATA. */
struct mux_chan *mux_chan_open(struct mux *m, int fd, const struct net_addr *caller,
                               const uint8_t *first, size_t n);

/* Client: a PENDING channel is connected to its endpoint: takes fd; writes
 * prefix[0..n) (e.g. a PROXY header; copied; may be NULL) and then the
 * queued DATA to it, and relays both ways. On a channel already closing
 * (peer CLOSE while connecting) the fd is just closed. */
void mux_chan_attach(struct mux_chan *c, int fd, const void *prefix, size_t n);

/* Close one channel: CLOSE is sent (unless the tunnel is gone), the local
 * socket (if any) closed, queued incoming data dropped. why is counted.
 * No-op on a channel already closing. */
void mux_chan_close(struct mux_chan *c, enum mux_reason why);

/* Client: the first bytes queued on a PENDING channel, for SNI routing:
 * one contiguous run holding at least the whole first DATA frame's payload
 * (whatever its size), possibly followed by bytes of later DATA frames that
 * fitted in the same queue chunk. NULL with *n = 0 when nothing is queued.
 * Valid until the next loop turn. */
const uint8_t *mux_chan_peek(const struct mux_chan *c, size_t *n);

/* Bytes received from the tunnel for c and not yet written to its local
 * socket, in its pipe and its queue (counted against in_high/in_low/
 * in_limit). */
size_t mux_chan_queued(const struct mux_chan *c);

/* Whether the peer has PAUSEd c (its local socket is not being read). */
bool mux_chan_paused(const struct mux_chan *c);

/* The caller address of a channel, its id, and its tunnel. */
const struct net_addr *mux_chan_caller(const struct mux_chan *c);
const uint8_t *mux_chan_id(const struct mux_chan *c);
struct mux *mux_chan_mux(const struct mux_chan *c);

/* Role context slot per channel (e.g. a client's connect op). */
void mux_chan_set_udata(struct mux_chan *c, void *udata);
void *mux_chan_udata(const struct mux_chan *c);

/* Client: send a PING request now (the mux also pings on cfg.ping_ms). */
void mux_ping(struct mux *m);

size_t mux_channels(const struct mux *m);
/* The counters of m's group: of m alone when cfg.group was NULL. */
const struct mux_stats *mux_stats(const struct mux *m);
const struct mux_tally *mux_tally(const struct mux *m);
struct eng *mux_eng(const struct mux *m);

/* Role context slot per tunnel. */
void mux_set_udata(struct mux *m, void *udata);
void *mux_udata(const struct mux *m);

#endif
