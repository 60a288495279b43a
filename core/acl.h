/* core/acl.h - the client's access list for channel callers (PROTOCOL.md 8.1).
 *
 * Before connecting a channel the client asks acl_allows() about the
 * caller address carried by NEW (decoded with addr_from_packed()). A list
 * is a set of networks plus one action:
 *
 *   ACL_ALLOW  only callers inside some listed network pass; an empty
 *              allow list refuses everybody (the reference's default
 *              action, so a zeroed or freshly initialised list is
 *              fail-closed);
 *   ACL_BLOCK  callers inside any listed network are refused; an empty
 *              block list lets everybody pass;
 *   no list    (a NULL pointer) lets everybody pass.
 *
 * Matching is by family: an IPv4 caller only matches IPv4 networks, an
 * IPv6 caller only IPv6 ones, so a v4-mapped caller (::ffff:a.b.c.d, kept
 * as IPv6 by addr_from_packed) does not match 10.0.0.0/8. A caller without
 * an address (AF_UNSPEC) matches nothing. 0.0.0.0 is an ordinary address.
 *
 * Ownership: struct acl is embedded by its owner, who calls acl_init()
 * (or zeroes it) and acl_fini(); the network array is the list's own
 * heap memory. Entries are added while configuring; afterwards the list
 * is read-only and acl_allows() may be called from any thread.
 */
#ifndef CORE_ACL_H
#define CORE_ACL_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/addr.h"

enum acl_action {
    ACL_ALLOW = 0,
    ACL_BLOCK,
};

/* One network, normalised: host bits beyond prefix are zero. */
struct acl_net {
    sa_family_t family;   /* AF_INET or AF_INET6 */
    uint8_t prefix;       /* 0..32 or 0..128 */
    uint8_t ip[16];       /* AF_INET: first 4 bytes */
};

struct acl {
    struct acl_net *nets; /* n used, cap allocated; NULL when cap is 0 */
    size_t n, cap;
    enum acl_action action;
};

/* Longest acl_net_format() output: IPv6 text, "/128", NUL. */
#define ACL_NET_STRLEN (INET6_ADDRSTRLEN + 4)

/* Empty list, action ACL_ALLOW (refuses everybody until entries are
 * added or the action is changed). Same as a zeroed struct. */
void acl_init(struct acl *a);

/* Frees the networks; the struct is then empty again (as after init). */
void acl_fini(struct acl *a);

/* Add one network: "192.0.2.0/24", "2001:db8::/32", or a bare address
 * (a /32 or /128). Host bits beyond the prefix are ignored, as the
 * reference's non-strict parsing does ("192.168.1.77/24" is
 * 192.168.1.0/24). An entry equal to one already listed is not added
 * twice. Numeric addresses only; no IPv6 zone, no netmask form.
 * Returns 0, or -1 with *why set to a static message naming the problem
 * (the caller prints the entry next to it); the list is then unchanged. */
int acl_add(struct acl *a, const char *cidr, const char **why);

void acl_set_action(struct acl *a, enum acl_action action);

/* "allow" or "block" (exact, lower case) to *action. Returns 0, or -1
 * with *why set. */
int acl_parse_action(const char *s, enum acl_action *action, const char **why);

/* May a channel from caller be connected? a may be NULL (no list). */
bool acl_allows(const struct acl *a, const struct net_addr *caller);

/* "10.0.0.0/8", "2001:db8::/32" into buf (ACL_NET_STRLEN bytes suffice);
 * returns buf. */
const char *acl_net_format(const struct acl_net *net, char *buf, size_t len);

#endif
