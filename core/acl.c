/* core/acl.c - see acl.h. */
#include "core/acl.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void acl_init(struct acl *a)
{
    memset(a, 0, sizeof(*a));
    a->action = ACL_ALLOW;
}

void acl_fini(struct acl *a)
{
    free(a->nets);
    acl_init(a);
}

void acl_set_action(struct acl *a, enum acl_action action)
{
    a->action = action;
}

int acl_parse_action(const char *s, enum acl_action *action, const char **why)
{
    if (strcmp(s, "allow") == 0) {
        *action = ACL_ALLOW;
        return 0;
    }
    if (strcmp(s, "block") == 0) {
        *action = ACL_BLOCK;
        return 0;
    }
    *why = "access list action must be allow or block";
    return -1;
}

/* Decimal prefix length, digits only, at most max. */
static int parse_prefix(const char *s, unsigned max, uint8_t *out)
{
    unsigned v = 0;

    if (*s == '\0')
        return -1;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned)(*s - '0');
        if (v > max)
            return -1;
    }
    *out = (uint8_t)v;
    return 0;
}

/* Zero every bit of ip beyond the first prefix bits. */
static void mask_host(uint8_t *ip, size_t len, unsigned prefix)
{
    for (size_t i = 0; i < len; i++) {
        unsigned keep = prefix > 8 * i ? prefix - 8 * (unsigned)i : 0;
        if (keep < 8)
            ip[i] &= (uint8_t)(0xff00u >> keep);
    }
}

static int parse_net(const char *cidr, struct acl_net *net, const char **why)
{
    char text[INET6_ADDRSTRLEN];
    const char *slash = strchr(cidr, '/');
    size_t alen = slash != NULL ? (size_t)(slash - cidr) : strlen(cidr);

    memset(net, 0, sizeof(*net));
    if (alen == 0 || (slash != NULL && strchr(slash + 1, '/') != NULL)) {
        *why = "expected ADDRESS or ADDRESS/PREFIX";
        return -1;
    }
    net->family = memchr(cidr, ':', alen) != NULL ? AF_INET6 : AF_INET;
    unsigned max = net->family == AF_INET ? 32 : 128;
    if (net->family == AF_INET6 && memchr(cidr, '%', alen) != NULL) {
        *why = "IPv6 zone not allowed in an access list";
        return -1;
    }
    bool fits = alen < sizeof(text);
    if (fits) {
        memcpy(text, cidr, alen);
        text[alen] = '\0';
    }
    if (!fits || inet_pton(net->family, text, net->ip) != 1) {
        *why = net->family == AF_INET ? "not a numeric IPv4 address"
                                      : "not a numeric IPv6 address";
        return -1;
    }
    net->prefix = (uint8_t)max;
    if (slash != NULL && parse_prefix(slash + 1, max, &net->prefix) != 0) {
        *why = net->family == AF_INET ? "IPv4 prefix must be 0..32"
                                      : "IPv6 prefix must be 0..128";
        return -1;
    }
    mask_host(net->ip, max / 8, net->prefix);
    return 0;
}

static bool net_equal(const struct acl_net *x, const struct acl_net *y)
{
    return x->family == y->family && x->prefix == y->prefix &&
           memcmp(x->ip, y->ip, sizeof(x->ip)) == 0;
}

int acl_add(struct acl *a, const char *cidr, const char **why)
{
    struct acl_net net;

    if (parse_net(cidr, &net, why) != 0)
        return -1;
    for (size_t i = 0; i < a->n; i++)
        if (net_equal(&a->nets[i], &net))
            return 0;
    if (a->n == a->cap) {
        size_t cap = a->cap ? 2 * a->cap : 8;
        struct acl_net *nets = realloc(a->nets, cap * sizeof(*nets));
        if (nets == NULL) {
            *why = "out of memory";
            return -1;
        }
        a->nets = nets;
        a->cap = cap;
    }
    a->nets[a->n++] = net;
    return 0;
}

static bool net_contains(const struct acl_net *net, const struct net_addr *ip)
{
    size_t whole = net->prefix / 8;
    unsigned rest = net->prefix % 8;

    if (net->family != ip->family || memcmp(net->ip, ip->ip, whole) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xff00u >> rest);
    return (ip->ip[whole] & mask) == net->ip[whole];
}

bool acl_allows(const struct acl *a, const struct net_addr *caller)
{
    bool listed = false;

    if (a == NULL)
        return true;
    for (size_t i = 0; i < a->n && !listed; i++)
        listed = net_contains(&a->nets[i], caller);
    return a->action == ACL_ALLOW ? listed : !listed;
}

const char *acl_net_format(const struct acl_net *net, char *buf, size_t len)
{
    char ip[INET6_ADDRSTRLEN];

    if (inet_ntop(net->family, net->ip, ip, sizeof(ip)) == NULL)
        snprintf(ip, sizeof(ip), "-");
    snprintf(buf, len, "%s/%u", ip, net->prefix);
    return buf;
}
