/* core/addr.h - IP addresses as the protocol carries them.
 *
 * A caller address travels in NEW frames as 4 (IPv4) or 16 (IPv6) packed
 * bytes, comes from accept() as a sockaddr, from a PROXY header as text or
 * packed bytes, and is matched by the client's access list. struct net_addr
 * is the one form all of them convert to. It is a plain value: copy it
 * freely, nothing to free. The all-zero struct is "no address" (AF_UNSPEC).
 *
 * IPv4-mapped IPv6 addresses (::ffff:a.b.c.d, what a dual-stack socket
 * reports for an IPv4 peer) become AF_INET in addr_from_sockaddr(), as
 * PROTOCOL.md 4.5 requires for NEW; addr_from_packed() keeps them as IPv6,
 * as the reference's decoder does (PROTOCOL.md 8.1).
 */
#ifndef CORE_ADDR_H
#define CORE_ADDR_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct net_addr {
    sa_family_t family;   /* AF_UNSPEC, AF_INET or AF_INET6 */
    uint16_t port;        /* host order; 0 when unknown */
    uint8_t ip[16];       /* AF_INET: first 4 bytes */
};

/* Longest output of addr_format(): "[" IPv6 "]:" port NUL. */
#define ADDR_STRLEN (INET6_ADDRSTRLEN + 8)

/* From a sockaddr (AF_INET or AF_INET6; anything else gives AF_UNSPEC).
 * v4-mapped IPv6 becomes AF_INET. */
void addr_from_sockaddr(struct net_addr *a, const struct sockaddr *sa);

/* To a sockaddr for bind/connect; returns its length, 0 for AF_UNSPEC. */
socklen_t addr_to_sockaddr(const struct net_addr *a, struct sockaddr_storage *ss);

/* From packed bytes: 4 → IPv4, 16 → IPv6, any other length → 0.0.0.0
 * (the reference's decoding of NEW addresses). Port is 0. */
void addr_from_packed(struct net_addr *a, const uint8_t *ip, size_t len);

/* Address only ("192.0.2.1", "2001:db8::1"), or "-" for AF_UNSPEC. */
const char *addr_ntop(const struct net_addr *a, char *buf, size_t len);

/* "192.0.2.1:443", "[2001:db8::1]:443"; no port part when port is 0. */
const char *addr_format(const struct net_addr *a, char *buf, size_t len);

/* Parse numeric "IPv4:PORT", "[IPv6]:PORT" or "*:PORT" (0.0.0.0). The port
 * must be 1..65535. Returns 0, or -1 with *why set to a static message. */
int addr_parse(const char *s, struct net_addr *a, const char **why);

bool addr_equal(const struct net_addr *x, const struct net_addr *y);

#endif
