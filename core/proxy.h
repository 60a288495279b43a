/* core/proxy.h - the HAProxy PROXY protocol header, v1 and v2 (PROTOCOL.md 1.4).
 *
 * With PROXY support enabled, the gateway buffers the first bytes of a
 * device connection and, after every read, calls pp_parse() on everything
 * buffered so far. The parser keeps no state between calls and only
 * borrows the buffer for the call; the result is a plain value.
 *
 * Input layouts:
 *
 *   v1: "PROXY " proto " " src " " dst " " sport " " dport CR LF   (<= 108 B)
 *       proto "UNKNOWN": anything may follow up to CR LF, no address.
 *   v2: sig(12) = 0d 0a 0d 0a 00 0d 0a 51 55 49 54 0a
 *       ver_cmd(1) fam_proto(1) L(2, big-endian) block[L]
 *       ver = high nibble (must be 2), cmd = low nibble (0 LOCAL, 1 PROXY)
 *       fam = high nibble: 1 IPv4 (L >= 12, src = block[0..4)),
 *             2 IPv6 (L >= 36, src = block[0..16)), others carry no address.
 *       TLVs after the addresses are part of L and never read.
 *
 * Results (STYLE.md 7):
 *   PP_OK     a complete header: strip res->size bytes; everything after
 *             them is payload (ClientHello or token) and must be kept.
 *             res->source is the caller address, or AF_UNSPEC when the
 *             header carries none (v1 UNKNOWN, v2 LOCAL, v2 family other
 *             than IPv4/IPv6): then the TCP peer address stays the caller.
 *   PP_AGAIN  a valid prefix so far; read more and call again with the
 *             whole buffer. At end of stream AGAIN means the header never
 *             completed: the caller closes with reason PP_R_EOF.
 *   PP_NONE   the buffer does not start with a PROXY header: all of it is
 *             payload (res->size is 0).
 *   PP_BAD    a malformed header, or one that would exceed the cap;
 *             res->reason says why. Close without sending anything.
 * OK, NONE and BAD are final for a given start of stream.
 *
 * The accept/reject decisions are the reference's, byte for byte,
 * including its leniencies (PROTOCOL.md 9.18): v1 destination and ports
 * are not looked at, a "%zone" after an IPv6 source is accepted and
 * dropped; v4-mapped IPv6 sources (v1 TCP6 text or a v2 IPv6 block) stay
 * AF_INET6 as in the reference. The source port is not taken (port 0):
 * only the IP travels in NEW.
 *
 * Cap: pp_parse() never looks past the first PP_MAX_HEADER bytes, which
 * is what the reference's dual-port reader does, and PROTOCOL.md makes
 * it a MUST for every layout. A header still incomplete with
 * PP_MAX_HEADER bytes buffered, or a v2 header that declares more than
 * PP_MAX_HEADER bytes in total (rejected as soon as its 16-byte fixed
 * part is in), is PP_BAD / PP_R_TOO_BIG. So a caller whose buffer holds
 * PP_MAX_HEADER bytes always gets a final answer.
 */
#ifndef CORE_PROXY_H
#define CORE_PROXY_H

#include <stddef.h>
#include <stdint.h>

#include "core/addr.h"

/* Bytes buffered at most while the header is incomplete (the reference's
 * _MAX_HEADER_SIZE). */
#define PP_MAX_HEADER 1500u

/* Longest v1 line, CR LF included. */
#define PP_V1_MAX 108u

enum pp_res {
    PP_OK = 0,
    PP_AGAIN,
    PP_NONE,
    PP_BAD,
};

/* Why a header was refused; one counter per value. The comment gives the
 * reference's message for the same decision. */
enum pp_reason {
    PP_R_NONE = 0,        /* PP_OK, PP_AGAIN or PP_NONE */
    PP_R_V1_NO_CRLF,      /* "PROXY v1 header without CRLF" */
    PP_R_V1_TOO_LONG,     /* "PROXY v1 header exceeds maximum length" */
    PP_R_V1_PROTO,        /* "Unsupported PROXY v1 protocol: b'...'" */
    PP_R_V1_FIELDS,       /* "Malformed PROXY v1 header" */
    PP_R_V1_SOURCE,       /* "Invalid PROXY v1 source address" */
    PP_R_V1_FAMILY,       /* "PROXY v1 address family mismatch" */
    PP_R_V2_VERSION,      /* "Unsupported PROXY protocol version" */
    PP_R_V2_COMMAND,      /* "Unsupported PROXY v2 command" */
    PP_R_V2_SHORT_INET,   /* "Truncated PROXY v2 IPv4 address block" */
    PP_R_V2_SHORT_INET6,  /* "Truncated PROXY v2 IPv6 address block" */
    PP_R_TOO_BIG,         /* "PROXY protocol header exceeds maximum size" */
    PP_R_EOF,             /* "Connection closed during PROXY protocol
                             header": never returned by the parser, set
                             by the caller on end of stream after AGAIN */
    PP_R_COUNT
};

struct pp_result {
    enum pp_reason reason; /* PP_R_NONE unless PP_BAD */
    uint8_t version;       /* 1 or 2 once the signature is recognised, else 0 */
    size_t size;           /* PP_OK: header bytes to strip; else 0 */
    struct net_addr source; /* PP_OK with an address: AF_INET/AF_INET6,
                               port 0; otherwise all zero (AF_UNSPEC) */
};

/* Parse the start of a device connection, len bytes buffered so far.
 * buf may be NULL when len is 0. Reads at most min(len, PP_MAX_HEADER)
 * bytes; fills *res completely on every call and returns its result. */
enum pp_res pp_parse(const uint8_t *buf, size_t len, struct pp_result *res);

/* Same with another cap: max = PP_MAX_HEADER is pp_parse(), max = SIZE_MAX
 * is the reference's pure buffer parser (no cap at all, used by tests to
 * reproduce it; servers use pp_parse()). */
enum pp_res pp_parse_max(const uint8_t *buf, size_t len, size_t max,
                         struct pp_result *res);

/* Short stable token for a reason ("v1_no_crlf", "too_big", ...), for
 * counter names and log keys; "unknown" for out-of-range values. */
const char *pp_reason_name(enum pp_reason reason);

/* ---- building headers (the client, toward its endpoint) ---------------
 *
 * pp_build_v1() / pp_build_v2() write the header that tells an endpoint
 * who the caller is: src = the caller address from NEW, dst = the
 * endpoint address connected to (ports as in the structs; NEW carries
 * no caller port, so the source port is 0). The header's family follows
 * src; a dst of the other family is converted: an IPv4 dst under an IPv6
 * src becomes ::ffff:a.b.c.d, an IPv6 dst under an IPv4 src becomes its
 * embedded IPv4 when v4-mapped, else 0.0.0.0 (with dst's port); an
 * AF_UNSPEC dst is the zero address of src's family. An AF_UNSPEC src
 * gives "PROXY UNKNOWN\r\n" (v1) or a LOCAL header with no address
 * block (v2), which tell the endpoint to use the connection's own peer.
 *
 *   v1: "PROXY TCP4 1.2.3.4 5.6.7.8 0 443\r\n"   (<= PP_V1_MAX bytes)
 *   v2: sig(12) 21 11 000c src(4) dst(4) sport(2) dport(2)   (28 bytes)
 *       sig(12) 21 21 0024 src(16) dst(16) sport(2) dport(2) (52 bytes)
 *
 * Every header built is accepted by pp_parse() with source = src (minus
 * the port). Return the header length, or 0 when cap is too small (out
 * is then left unspecified). PP_BUILD_MAX bytes always suffice. */
#define PP_BUILD_MAX PP_V1_MAX

size_t pp_build_v1(const struct net_addr *src, const struct net_addr *dst,
                   uint8_t *out, size_t cap);
size_t pp_build_v2(const struct net_addr *src, const struct net_addr *dst,
                   uint8_t *out, size_t cap);

#endif
