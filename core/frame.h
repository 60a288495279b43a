/* core/frame.h - the multiplexer frame codec (PROTOCOL.md 4 and 5.1).
 *
 * A frame is a 32-byte header (ID 16 | FLOW 1 | SIZE 4 BE | EXTRA 11),
 * sealed as one tunnel-cipher unit, followed by SIZE data bytes: verbatim,
 * except the protocol >= 2 NEW address block, which is its own sealed unit.
 * Versions above 2 are treated as 2 (PROTOCOL.md 5.1).
 *
 * ENCODER: a struct frame_batch collects the frames one tunnel writes in one
 * loop turn. Adding a frame builds its plaintext header (and NEW block),
 * draws the random padding, and records an iovec for its payload. The
 * payload is BORROWED, not copied: it must stay untouched until the batch's
 * bytes have been written. frame_batch_seal() encrypts every unit with ONE
 * tc_seal_batch() call; the batch then yields the iovec array for one
 * writev/sendmsg:
 *
 *     [hdr0][payload0][hdr1 block1 hdr2][payload2] ...
 *
 * (consecutive sealed units share one iovec). Batch states:
 *
 *     reset --add*--> open --seal--> sealed --advance(all)--> done
 *       ^                                                       |
 *       +------------------------ reset ------------------------+
 *
 * Units are sealed in the order the frames were added, which is the order
 * they appear in the iovec array: that is what keeps the CBC chain and the
 * GCM counters in step with the wire (PROTOCOL.md 4.1).
 *
 * DECODER: struct frame_dec turns the peer's byte stream, split anywhere,
 * into events, one per frame_dec_feed() call that returns FRAME_OK:
 *
 *   FRAME_EV_FRAME    a complete non-DATA frame of a known FLOW (any data
 *                     it carried already consumed; NEW has its caller
 *                     address decoded, or bad_block set);
 *   FRAME_EV_DATA     a piece of a DATA payload, pointing INTO the caller's
 *                     input buffer (valid as long as that buffer is); a
 *                     payload is never buffered whole;
 *   FRAME_EV_UNKNOWN  a frame with an unknown FLOW, its data consumed and
 *                     dropped (PROTOCOL.md 4.10: stay in step, log, count).
 *
 * States and transitions:
 *
 *     HDR --SIZE=0 or no data--> (event) --> HDR
 *      |--DATA--------> PAYLOAD --chunks (events)--> HDR
 *      |--v>=2 NEW----> BLOCK --opened--> (event) --> HDR
 *      |--other-------> SKIP --all consumed--> (event) --> HDR
 *      +--any fatal---> DEAD (every later feed returns FRAME_BAD with the
 *                            same error)
 *
 * Fatal (FRAME_BAD, the tunnel must close): a unit fails to open (AEAD tag,
 * nonce, or CBC misuse), SIZE above the decoder's cap, a v>=2 CBC NEW whose
 * SIZE is not a multiple of 16 (the chain cannot be resynchronised), a v>=2
 * NEW block above FRAME_NEW_BLOCK_MAX. The decoder's state is fixed-size:
 * only header and NEW-block bytes are staged. It allocates nothing.
 *
 * Neither side owns the tc_stream it is given: the caller frees it after the
 * encoder/decoder is done with it.
 */
#ifndef CORE_FRAME_H
#define CORE_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "core/addr.h"
#include "crypto/tcipher.h"

#define FRAME_HDR_LEN 32
#define FRAME_ID_LEN 16
#define FRAME_EXTRA_LEN 11
#define FRAME_VERSION_MAX 2
/* Default cap on SIZE: a receiver MUST accept at least 16 MiB (4.6). */
#define FRAME_MAX_DATA (16u << 20)
/* Largest NEW address block accepted (the reference sends 16 or 32). */
#define FRAME_NEW_BLOCK_MAX 1024
/* Frames one batch holds; the gateway flushes and starts another. */
#define FRAME_BATCH_MAX 64

/* Whole-byte FLOW codes (PROTOCOL.md 4.2): compare the whole byte. */
enum frame_flow {
    FRAME_NEW = 0x01,
    FRAME_DATA = 0x02,
    FRAME_CLOSE = 0x04,
    FRAME_PING = 0x08,
    FRAME_PAUSE = 0x16,
    FRAME_RESUME = 0x32,
};

/* "NEW", "DATA", ... or NULL for an unknown code. */
const char *frame_flow_name(uint8_t flow);

/* ---- encoder ------------------------------------------------------------ */

/* The sending half of a tunnel: its seal stream (borrowed), its protocol
 * version and where padding/ids come from (rng.draw NULL = CSPRNG). */
struct frame_enc {
    struct tc_stream *tc;
    unsigned version;
    struct tc_rng rng;
};

void frame_enc_init(struct frame_enc *e, struct tc_stream *seal, unsigned version,
                    const struct tc_rng *rng);

/* 16 fresh random bytes: the id of a new channel, or of a PING request. */
int frame_new_id(struct frame_enc *e, uint8_t id[FRAME_ID_LEN]);

/* Bytes a frame with `size` payload bytes takes on the wire (for queue
 * accounting); NEW is the whole frame with its address block. */
size_t frame_wire_len(const struct frame_enc *e, uint8_t flow, uint32_t size,
                      const struct net_addr *caller);

#define FRAME_UNIT_MAX (FRAME_HDR_LEN + 32)   /* header + largest NEW block */

struct frame_batch {
    struct frame_enc *enc;          /* borrowed */
    size_t nframes;
    size_t nunits;
    size_t plain_len;               /* bytes used in plain[] */
    size_t wire_len;                /* bytes used in wire[] */
    size_t total;                   /* bytes described by iov[] */
    int iovcnt;
    int iovpos;                     /* first iovec not fully written */
    bool sealed;
    bool tail_wire;                 /* last iovec is a sealed-unit run */
    uint32_t lens[2 * FRAME_BATCH_MAX];
    struct iovec iov[2 * FRAME_BATCH_MAX + 1];
    uint8_t plain[FRAME_BATCH_MAX * FRAME_UNIT_MAX];
    uint8_t wire[FRAME_BATCH_MAX * (FRAME_UNIT_MAX + 2 * TC_AEAD_OVERHEAD)];
};

/* Empty the batch (any state) and bind it to an encoder. */
void frame_batch_reset(struct frame_batch *b, struct frame_enc *e);

/* True when no more frames fit (seal, write, reset, continue). */
bool frame_batch_full(const struct frame_batch *b);
bool frame_batch_empty(const struct frame_batch *b);

/* Add one frame. Each returns 0, or -1 when the batch is full or sealed,
 * an argument is invalid (DATA with len 0, a NULL caller) or the random
 * source failed. On -1 the batch is unchanged.
 *
 * NEW: caller's address as the device was seen. v0/v1: EXTRA "4"+IPv4, an
 *      IPv6 caller becomes 0.0.0.0; v>=2: address block "4"+4 or "6"+16
 *      bytes padded to 16/32, sealed as its own unit. v4-mapped IPv6 is
 *      sent as IPv4 in both cases (4.5).
 * DATA: payload borrowed until the batch has been written.
 * PING: reply=false sends "ping", reply=true "pong" (id: the request's). */
int frame_batch_new(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN],
                    const struct net_addr *caller);
int frame_batch_data(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN],
                     const void *payload, uint32_t len);
int frame_batch_close(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN]);
int frame_batch_ping(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN], bool reply);
int frame_batch_pause(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN]);
int frame_batch_resume(struct frame_batch *b, const uint8_t id[FRAME_ID_LEN]);

/* Encrypt all units with one tc_seal_batch() call. -1 is fatal for the
 * tunnel (cipher failure, GCM counter exhausted). */
int frame_batch_seal(struct frame_batch *b);

/* After seal: the iovecs still to write (starting after what advance()
 * consumed) and their count. They point into the batch and into the
 * borrowed payloads. */
const struct iovec *frame_batch_iov(const struct frame_batch *b, int *iovcnt);

/* Bytes still to write. */
size_t frame_batch_left(const struct frame_batch *b);

/* Record that n bytes were written (a partial writev). n must not exceed
 * frame_batch_left(). */
void frame_batch_advance(struct frame_batch *b, size_t n);

/* ---- decoder ------------------------------------------------------------ */

enum frame_res {
    FRAME_OK = 1,     /* *ev holds an event */
    FRAME_AGAIN = 2,  /* all input consumed; feed more */
    FRAME_BAD = 3,    /* fatal, ev->err says why; the tunnel must close */
};

enum frame_err {
    FRAME_ERR_NONE = 0,
    FRAME_ERR_OPEN = 1,      /* unit failed to open: AEAD tag or nonce */
    FRAME_ERR_SIZE = 2,      /* SIZE above the decoder's cap */
    FRAME_ERR_ALIGN = 3,     /* v>=2 aes-cbc NEW SIZE not a multiple of 16 */
    FRAME_ERR_BLOCK = 4,     /* v>=2 NEW block above FRAME_NEW_BLOCK_MAX */
};

const char *frame_err_name(enum frame_err err);

enum frame_ev_kind {
    FRAME_EV_FRAME = 1,
    FRAME_EV_DATA = 2,
    FRAME_EV_UNKNOWN = 3,
};

struct frame_ev {
    enum frame_ev_kind kind;
    enum frame_err err;             /* with FRAME_BAD */
    uint8_t id[FRAME_ID_LEN];
    uint8_t flow;
    uint32_t size;                  /* SIZE field of the header */
    uint8_t extra[FRAME_EXTRA_LEN];
    /* NEW: the caller address (v0/v1 from EXTRA bytes 1-4; v>=2 from the
     * block, "6" -> IPv6, anything else -> IPv4). bad_block: v>=2 block
     * shorter than its family needs (SIZE 0 included): do not open the
     * channel, answer CLOSE for the id (4.5). */
    struct net_addr caller;
    bool bad_block;
    /* DATA: this piece of the payload, inside the caller's input. A frame
     * with SIZE 0 gives one event with len 0. */
    const uint8_t *data;
    size_t len;
    uint32_t offset;                /* of data within the payload */
    bool last;                      /* final piece of this frame */
};

struct frame_dec {
    struct tc_stream *tc;           /* borrowed open stream */
    unsigned version;
    uint32_t max_data;
    int state;
    enum frame_err err;
    size_t have;                    /* bytes staged */
    size_t need;                    /* bytes to stage */
    uint32_t left;                  /* payload bytes still to come */
    uint8_t id[FRAME_ID_LEN];
    uint8_t flow;
    uint32_t size;
    uint8_t extra[FRAME_EXTRA_LEN];
    uint8_t stage[FRAME_NEW_BLOCK_MAX + TC_AEAD_OVERHEAD];
    uint8_t plain[FRAME_NEW_BLOCK_MAX];
};

/* max_data: cap on SIZE, 0 for FRAME_MAX_DATA. */
void frame_dec_init(struct frame_dec *d, struct tc_stream *open, unsigned version,
                    uint32_t max_data);

/* Consume input up to and including the next event. *used receives the
 * bytes consumed (all of len with FRAME_AGAIN; 0 with FRAME_BAD). Call
 * again with the rest of the input until FRAME_AGAIN. */
enum frame_res frame_dec_feed(struct frame_dec *d, const uint8_t *in, size_t len,
                              size_t *used, struct frame_ev *ev);

/* For a splice path: when the decoder is inside a DATA payload, its id and
 * the bytes still to come; false otherwise. frame_dec_skip() then accounts
 * n (<= left) payload bytes that the caller moved itself. */
bool frame_dec_in_data(const struct frame_dec *d, uint8_t id[FRAME_ID_LEN], uint32_t *left);
void frame_dec_skip(struct frame_dec *d, uint32_t n);

#endif
