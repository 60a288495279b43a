/* core/sni.h - the host name from a TLS ClientHello (PROTOCOL.md section 7).
 *
 * The gateway reads a device connection into one buffer and, after every
 * read, calls sni_parse() on everything buffered so far. The parser keeps
 * no state between calls: it re-reads the buffer from byte 0 each time.
 * It only borrows the buffer for the duration of the call; the result is a
 * plain value (the name is copied into it), nothing to free.
 *
 * Input layout (every length big-endian):
 *
 *   record:     16 | maj min | len(2) | body[len]        (repeated)
 *   handshake:  01 | L(3) | ClientHello body[L]          (spread over the
 *                                                         record bodies)
 *   ClientHello: version(2) random(32) sid_len(1) sid cs_len(2) cs
 *                comp_len(1) comp ext_len(2) extensions[ext_len]
 *   extension:  type(2) len(2) body[len]; type 0 = server_name
 *   server_name body: list_len(2), entries: name_type(1) len(2) name[len];
 *                     name_type 0 = host_name
 *
 * The handshake message may be split over several records (large post-
 * quantum key shares, small -max_send_frag); the records are reassembled
 * in place (nothing copied) until 4 + L handshake bytes are present.
 * Every read is bounded by the input, the records, the reassembled bytes,
 * the extensions block and the server_name list. The message itself is
 * bounded by the bytes of its records, not by L, because real clients
 * (the reference's own test hellos) declare L two bytes short
 * (PROTOCOL.md 7.3).
 *
 * Results (STYLE.md 7):
 *   SNI_OK       a host name was found; out->name/name_len/hello_len set.
 *   SNI_AGAIN    the input is a valid prefix so far; read more and call
 *                again with the whole buffer. AGAIN is only returned while
 *                len < SNI_MAX_INPUT, so a caller whose buffer holds
 *                SNI_MAX_INPUT bytes always gets a final answer.
 *   SNI_NOT_TLS  the first byte is not 16 (TLS handshake record): not a
 *                TLS client at all.
 *   SNI_BAD      a TLS record stream that cannot be routed: malformed,
 *                no server_name, bad name, or too large. out->reason says
 *                why (for counters), out->why in words (for the log line).
 * NOT_TLS and BAD are final: feeding more bytes never changes them.
 *
 * Names are returned raw, byte for byte as the client sent them (the
 * reference does no normalisation); sni_name_normalize() is the separate
 * step the hostname table applies to both sides of a comparison.
 */
#ifndef CORE_SNI_H
#define CORE_SNI_H

#include <stddef.h>
#include <stdint.h>

/* Largest handshake message accepted: 4-byte header + body. A declared
 * length beyond this is rejected as soon as it is seen. */
#define SNI_MAX_HELLO 65536u

/* Largest input the ClientHello records may occupy (the hello plus room
 * for 819 record headers, or one record of 5 + 65,535 bytes). The gateway
 * caps its ClientHello buffer at this (PROTOCOL.md 6.8). A record that
 * would end beyond it is rejected as soon as its header is seen. */
#define SNI_MAX_INPUT (SNI_MAX_HELLO + 4096u)

/* Longest host name accepted (DNS limit); name[] has room for the NUL. */
#define SNI_NAME_MAX 255u

enum sni_res {
    SNI_OK = 0,
    SNI_AGAIN,
    SNI_NOT_TLS,
    SNI_BAD,
};

/* Why a hello was not routed; one counter per value. */
enum sni_reason {
    SNI_R_NONE = 0,    /* SNI_OK or SNI_AGAIN */
    SNI_R_NOT_TLS,     /* first byte is not 16 */
    SNI_R_OLD_VERSION, /* record major version < 3 */
    SNI_R_NOT_HELLO,   /* handshake type is not 1 (ClientHello) */
    SNI_R_RECORD,      /* empty or non-handshake record inside the hello */
    SNI_R_TOO_LARGE,   /* beyond SNI_MAX_HELLO / SNI_MAX_INPUT */
    SNI_R_MALFORMED,   /* a length field overruns what contains it */
    SNI_R_NO_NAME,     /* no server_name extension or no host_name entry */
    SNI_R_EMPTY_NAME,  /* host_name of length 0 */
    SNI_R_LONG_NAME,   /* host_name longer than SNI_NAME_MAX */
    SNI_R_BAD_UTF8,    /* host_name is not valid UTF-8 */
    SNI_R_BAD_CHAR,    /* host_name holds an ASCII control byte */
    SNI_R_COUNT
};

struct sni_result {
    enum sni_reason reason;
    const char *why;       /* static, never NULL: "ok", "need more bytes",
                              or the precise cause of NOT_TLS / BAD */
    size_t hello_len;      /* bytes of the complete ClientHello records;
                              0 unless they are all present and framed
                              as a ClientHello (OK, or BAD found in its
                              contents). The gateway forwards everything
                              read anyway, bytes past the hello too */
    size_t name_len;       /* 1..SNI_NAME_MAX on SNI_OK, else 0 */
    char name[SNI_NAME_MAX + 1]; /* NUL-terminated; may hold UTF-8 */
};

/* Parse the first len bytes read from a device connection. buf may be
 * NULL when len is 0. Fills *out completely on every call (name empty
 * unless SNI_OK) and returns its result; see the top of this file. */
enum sni_res sni_parse(const uint8_t *buf, size_t len, struct sni_result *out);

/* Short stable token for a reason ("no_name", "too_large", ...), for
 * counter names and log keys; "unknown" for out-of-range values. */
const char *sni_reason_name(enum sni_reason reason);

/* Normalise a host name in place for comparison (PROTOCOL.md 7.3 MAY):
 * ASCII letters are lower-cased (bytes >= 0x80 are left alone, so UTF-8
 * stays valid) and one trailing dot is removed unless the name is only
 * ".". Returns the new length; when the name got shorter, a NUL is
 * written at the new end, so a NUL-terminated name stays terminated.
 * Registered names must go through the same function. */
size_t sni_name_normalize(char *name, size_t len);

#endif
