/* core/addr.c - see addr.h. */
#include "core/addr.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const uint8_t v4mapped_prefix[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };

void addr_from_sockaddr(struct net_addr *a, const struct sockaddr *sa)
{
    memset(a, 0, sizeof(*a));
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
        a->family = AF_INET;
        a->port = ntohs(in->sin_port);
        memcpy(a->ip, &in->sin_addr, 4);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
        a->port = ntohs(in6->sin6_port);
        if (!memcmp(in6->sin6_addr.s6_addr, v4mapped_prefix, 12)) {
            a->family = AF_INET;
            memcpy(a->ip, in6->sin6_addr.s6_addr + 12, 4);
        } else {
            a->family = AF_INET6;
            memcpy(a->ip, in6->sin6_addr.s6_addr, 16);
        }
    }
}

socklen_t addr_to_sockaddr(const struct net_addr *a, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    if (a->family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        in->sin_family = AF_INET;
        in->sin_port = htons(a->port);
        memcpy(&in->sin_addr, a->ip, 4);
        return sizeof(*in);
    }
    if (a->family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons(a->port);
        memcpy(in6->sin6_addr.s6_addr, a->ip, 16);
        return sizeof(*in6);
    }
    return 0;
}

void addr_from_packed(struct net_addr *a, const uint8_t *ip, size_t len)
{
    memset(a, 0, sizeof(*a));
    if (len == 16) {
        a->family = AF_INET6;
        memcpy(a->ip, ip, 16);
    } else {
        a->family = AF_INET;
        if (len == 4)
            memcpy(a->ip, ip, 4);
    }
}

const char *addr_ntop(const struct net_addr *a, char *buf, size_t len)
{
    if ((a->family != AF_INET && a->family != AF_INET6) ||
        inet_ntop(a->family, a->ip, buf, (socklen_t)len) == NULL)
        snprintf(buf, len, "-");
    return buf;
}

const char *addr_format(const struct net_addr *a, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN];

    addr_ntop(a, ip, sizeof(ip));
    if (a->port == 0)
        snprintf(buf, len, "%s", ip);
    else if (a->family == AF_INET6)
        snprintf(buf, len, "[%s]:%u", ip, a->port);
    else
        snprintf(buf, len, "%s:%u", ip, a->port);
    return buf;
}

int addr_parse(const char *s, struct net_addr *a, const char **why)
{
    char host[INET6_ADDRSTRLEN + 1];
    const char *colon, *h = s;
    size_t hlen;

    memset(a, 0, sizeof(*a));
    if (s[0] == '[') {
        const char *end = strchr(s, ']');
        if (end == NULL || end[1] != ':') {
            *why = "expected [IPv6]:PORT";
            return -1;
        }
        h = s + 1;
        hlen = (size_t)(end - h);
        colon = end + 1;
        a->family = AF_INET6;
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL) {
            *why = "expected ADDR:PORT";
            return -1;
        }
        hlen = (size_t)(colon - s);
        a->family = AF_INET;
    }
    if (hlen >= sizeof(host)) {
        *why = "address too long";
        return -1;
    }
    memcpy(host, h, hlen);
    host[hlen] = '\0';

    char *end;
    unsigned long port = strtoul(colon + 1, &end, 10);
    if (colon[1] == '\0' || *end != '\0' || port == 0 || port > 65535) {
        *why = "port must be 1..65535";
        return -1;
    }
    a->port = (uint16_t)port;

    if (a->family == AF_INET && (!strcmp(host, "*") || hlen == 0))
        return 0; /* wildcard 0.0.0.0 */
    if (inet_pton(a->family, host, a->ip) != 1) {
        *why = a->family == AF_INET ? "not a numeric IPv4 address (IPv6 needs [brackets])"
                                    : "not a numeric IPv6 address";
        return -1;
    }
    return 0;
}

bool addr_equal(const struct net_addr *x, const struct net_addr *y)
{
    size_t n = x->family == AF_INET ? 4 : 16;
    return x->family == y->family && x->port == y->port && !memcmp(x->ip, y->ip, n);
}
