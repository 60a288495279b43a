/* tests/unit/test_acl.c - core/acl against tests/data/access_list.json.
 *
 * Every list of the vectors (entries, normalised networks, every caller),
 * the packed-address decoding the client applies to NEW before asking the
 * list, then prefix and masking tables (expected networks computed with
 * CPython's ipaddress.ip_network(strict=False), the reference's parser),
 * refused entries, duplicates, no list, callers without an address.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/acl.h"
#include "core/addr.h"
#include "tests/unit/testutil.h"

/* A caller as the client sees it: text -> packed bytes -> NEW decoding. */
static struct net_addr caller(const char *text)
{
    uint8_t ip[16];
    struct net_addr a;

    if (strchr(text, ':') != NULL) {
        cr_assert_eq(inet_pton(AF_INET6, text, ip), 1, "%s", text);
        addr_from_packed(&a, ip, 16);
    } else {
        cr_assert_eq(inet_pton(AF_INET, text, ip), 1, "%s", text);
        addr_from_packed(&a, ip, 4);
    }
    return a;
}

/* Network text -> acl_net, for comparing by value, not by spelling. */
static struct acl_net net_of(const char *text)
{
    struct acl_net n = { 0 };
    char ip[INET6_ADDRSTRLEN];
    const char *slash = strchr(text, '/');

    cr_assert_not_null(slash, "%s", text);
    cr_assert_lt((size_t)(slash - text), sizeof(ip));
    memcpy(ip, text, (size_t)(slash - text));
    ip[slash - text] = '\0';
    n.family = strchr(ip, ':') ? AF_INET6 : AF_INET;
    cr_assert_eq(inet_pton(n.family, ip, n.ip), 1, "%s", text);
    n.prefix = (uint8_t)atoi(slash + 1);
    return n;
}

static void assert_net(const struct acl_net *got, const char *want, const char *entry)
{
    struct acl_net w = net_of(want);
    char buf[ACL_NET_STRLEN];

    cr_assert(got->family == w.family && got->prefix == w.prefix &&
              !memcmp(got->ip, w.ip, sizeof(w.ip)),
              "%s: got %s, want %s", entry, acl_net_format(got, buf, sizeof(buf)), want);
}

/* ---- the vectors ------------------------------------------------------- */

Test(acl, vectors)
{
    json_t *doc = tu_load_json("access_list.json");
    json_t *cases = json_object_get(doc, "cases");
    size_t i, callers = 0;
    json_t *c;

    cr_assert(json_array_size(cases) == 5);
    json_array_foreach(cases, i, c) {
        const char *list = tu_str(c, "list");
        struct acl a;
        enum acl_action act;
        const char *why = NULL;
        size_t j;
        json_t *e;

        acl_init(&a);
        cr_assert_eq(acl_parse_action(tu_str(c, "action"), &act, &why), 0, "%s", list);
        acl_set_action(&a, act);
        json_array_foreach(json_object_get(c, "entries"), j, e)
            cr_assert_eq(acl_add(&a, json_string_value(e), &why), 0, "%s: %s: %s", list,
                         json_string_value(e), why);

        /* Normalised networks, in entry order, spelled as the reference
         * spells them. */
        json_t *norm = json_object_get(c, "normalized_networks");
        cr_assert_eq(a.n, json_array_size(norm), "%s: %zu networks", list, a.n);
        json_array_foreach(norm, j, e) {
            char buf[ACL_NET_STRLEN];
            cr_assert_str_eq(acl_net_format(&a.nets[j], buf, sizeof(buf)),
                             json_string_value(e), "%s #%zu", list, j);
            assert_net(&a.nets[j], json_string_value(e), list);
        }

        const char *ip;
        json_t *want;
        json_object_foreach(json_object_get(c, "results"), ip, want) {
            struct net_addr who = caller(ip);
            cr_assert_eq(acl_allows(&a, &who), json_is_true(want), "%s: caller %s", list, ip);
            cr_assert(acl_allows(NULL, &who), "no list: caller %s", ip);
            callers++;
        }
        acl_fini(&a);
    }
    cr_assert_eq(callers, 50);
    json_decref(doc);
}

Test(acl, packed_address_decoding)
{
    json_t *doc = tu_load_json("access_list.json");
    json_t *dec = json_object_get(doc, "packed_address_decoding");
    size_t i;
    json_t *c;

    cr_assert_eq(json_array_size(dec), 5);
    json_array_foreach(dec, i, c) {
        size_t n;
        uint8_t *b = tu_unhex(tu_str(c, "packed_hex"), &n);
        struct net_addr a;
        char buf[INET6_ADDRSTRLEN];

        addr_from_packed(&a, b, n);
        cr_assert_eq(a.family, n == 16 ? AF_INET6 : AF_INET, "packed %zu bytes", n);
        cr_assert_str_eq(addr_ntop(&a, buf, sizeof(buf)), tu_str(c, "decoded"));
        free(b);
    }
    json_decref(doc);
}

/* ---- entries ------------------------------------------------------------ */

Test(acl, host_bits_and_prefixes)
{
    static const struct { const char *entry, *net; } t[] = {
        { "255.255.255.255/23", "255.255.254.0/23" },
        { "255.255.255.255/9", "255.128.0.0/9" },
        { "255.255.255.255/0", "0.0.0.0/0" },
        { "192.0.2.1/31", "192.0.2.0/31" },
        { "192.0.2.1/32", "192.0.2.1/32" },
        { "192.0.2.1", "192.0.2.1/32" },
        { "0.0.0.0/0", "0.0.0.0/0" },
        { "10.1.2.3/8", "10.0.0.0/8" },
        { "10.1.2.3/08", "10.0.0.0/8" },
        { "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/65", "ffff:ffff:ffff:ffff:8000::/65" },
        { "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/1", "8000::/1" },
        { "2001:db8::1/127", "2001:db8::/127" },
        { "2001:db8::1", "2001:db8::1/128" },
        { "::/0", "::/0" },
        { "::ffff:10.1.2.3/104", "::ffff:a00:0/104" },
        { "fe80::1:2:3/10", "fe80::/10" },
        { "2001:db8:abcd:1234::1/48", "2001:db8:abcd::/48" },
    };
    const char *why;

    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        struct acl a;
        acl_init(&a);
        cr_assert_eq(acl_add(&a, t[i].entry, &why), 0, "%s", t[i].entry);
        cr_assert_eq(a.n, 1);
        assert_net(&a.nets[0], t[i].net, t[i].entry);
        acl_fini(&a);
    }
}

/* Refused entries and their messages; the list stays as it was. */
Test(acl, bad_entries)
{
    static const struct { const char *entry, *why; } t[] = {
        { "", "expected ADDRESS or ADDRESS/PREFIX" },
        { "/8", "expected ADDRESS or ADDRESS/PREFIX" },
        { "10.0.0.0/8/8", "expected ADDRESS or ADDRESS/PREFIX" },
        { "10.0.0.0/33", "IPv4 prefix must be 0..32" },
        { "10.0.0.0/", "IPv4 prefix must be 0..32" },
        { "10.0.0.0/-1", "IPv4 prefix must be 0..32" },
        { "10.0.0.0/+8", "IPv4 prefix must be 0..32" },
        { "10.0.0.0/255.0.0.0", "IPv4 prefix must be 0..32" },
        { "10.0.0.0/99999999999999999999", "IPv4 prefix must be 0..32" },
        { "2001:db8::/129", "IPv6 prefix must be 0..128" },
        { "2001:db8::/ 32", "IPv6 prefix must be 0..128" },
        { "010.0.0.0/8", "not a numeric IPv4 address" },
        { "10.0.0.256", "not a numeric IPv4 address" },
        { "10.0.0", "not a numeric IPv4 address" },
        { "10.0.0.0 /8", "not a numeric IPv4 address" },
        { " 10.0.0.0/8", "not a numeric IPv4 address" },
        { "example.com", "not a numeric IPv4 address" },
        { "::g", "not a numeric IPv6 address" },
        { "[::1]", "not a numeric IPv6 address" },
        { "1:2:3:4:5:6:7:8:9:10:11:12:13:14:15:16", "not a numeric IPv6 address" },
        { "1111:2222:3333:4444:5555:6666:7777:8888:9999:0000/64", "not a numeric IPv6 address" },
        { "1111111111111111111111111111111111111111111111111111", "not a numeric IPv4 address" },
        { "fe80::1%eth0/64", "IPv6 zone not allowed in an access list" },
    };
    struct acl a;
    const char *why;

    acl_init(&a);
    cr_assert_eq(acl_add(&a, "192.0.2.0/24", &why), 0);
    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        why = NULL;
        cr_assert_eq(acl_add(&a, t[i].entry, &why), -1, "'%s' accepted", t[i].entry);
        cr_assert_str_eq(why, t[i].why, "'%s'", t[i].entry);
        cr_assert_eq(a.n, 1, "'%s' changed the list", t[i].entry);
    }
    assert_net(&a.nets[0], "192.0.2.0/24", "kept");
    acl_fini(&a);

    enum acl_action act = ACL_BLOCK;
    cr_assert_eq(acl_parse_action("Allow", &act, &why), -1);
    cr_assert_str_eq(why, "access list action must be allow or block");
    cr_assert_eq(acl_parse_action("", &act, &why), -1);
    cr_assert_eq(act, ACL_BLOCK);
    cr_assert_eq(acl_parse_action("allow", &act, &why), 0);
    cr_assert_eq(act, ACL_ALLOW);
    cr_assert_eq(acl_parse_action("block", &act, &why), 0);
    cr_assert_eq(act, ACL_BLOCK);
}

Test(acl, duplicates_collapse)
{
    struct acl a;
    const char *why;

    acl_init(&a);
    cr_assert_eq(acl_add(&a, "10.0.0.0/8", &why), 0);
    cr_assert_eq(acl_add(&a, "10.1.2.3/8", &why), 0);
    cr_assert_eq(acl_add(&a, "10.0.0.0/16", &why), 0);
    cr_assert_eq(acl_add(&a, "2001:db8::/32", &why), 0);
    cr_assert_eq(acl_add(&a, "2001:db8:ffff::/32", &why), 0);
    cr_assert_eq(a.n, 3);
    acl_fini(&a);
    cr_assert_eq(a.n, 0);
    cr_assert_null(a.nets);
    cr_assert_eq(a.action, ACL_ALLOW);
}

/* ---- matching ------------------------------------------------------------ */

/* Each row: one network, then callers just inside and just outside. */
Test(acl, prefix_edges)
{
    static const struct { const char *net, *in, *out; } t[] = {
        { "192.0.2.0/24", "192.0.2.255", "192.0.3.0" },
        { "192.0.2.0/24", "192.0.2.0", "192.0.1.255" },
        { "192.0.2.128/25", "192.0.2.128", "192.0.2.127" },
        { "192.0.2.1/32", "192.0.2.1", "192.0.2.0" },
        { "192.0.2.0/31", "192.0.2.1", "192.0.2.2" },
        { "128.0.0.0/1", "255.255.255.255", "127.255.255.255" },
        { "0.0.0.0/0", "0.0.0.0", "::" },
        { "0.0.0.0/0", "255.255.255.255", "::ffff:1.2.3.4" },
        { "0.0.0.0/32", "0.0.0.0", "0.0.0.1" },
        { "10.0.0.0/8", "10.255.255.255", "::ffff:10.1.2.3" },
        { "2001:db8::/32", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "2001:db9::" },
        { "2001:db8::/127", "2001:db8::1", "2001:db8::2" },
        { "2001:db8::1/128", "2001:db8::1", "2001:db8::" },
        { "2001:db8:0:0:8000::/65", "2001:db8::ffff:ffff:ffff:ffff", "2001:db8::7fff:ffff:ffff:ffff" },
        { "::/0", "::", "0.0.0.0" },
        { "::/0", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "255.255.255.255" },
        { "::ffff:0:0/96", "::ffff:10.1.2.3", "10.1.2.3" },
    };
    const char *why;

    for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
        struct acl a;
        struct net_addr in = caller(t[i].in), out = caller(t[i].out);

        acl_init(&a);
        cr_assert_eq(acl_add(&a, t[i].net, &why), 0, "%s", t[i].net);
        cr_assert(acl_allows(&a, &in), "allow %s: %s refused", t[i].net, t[i].in);
        cr_assert(!acl_allows(&a, &out), "allow %s: %s let in", t[i].net, t[i].out);
        acl_set_action(&a, ACL_BLOCK);
        cr_assert(!acl_allows(&a, &in), "block %s: %s let in", t[i].net, t[i].in);
        cr_assert(acl_allows(&a, &out), "block %s: %s refused", t[i].net, t[i].out);
        acl_fini(&a);
    }
}

/* A caller without an address matches no network; zeroed = initialised. */
Test(acl, unspec_caller_and_zero_struct)
{
    struct acl a;
    struct net_addr none = { 0 }, any4 = caller("0.0.0.0");
    const char *why;

    memset(&a, 0, sizeof(a));
    cr_assert(!acl_allows(&a, &any4), "zeroed list must refuse (empty allow)");
    cr_assert_eq(acl_add(&a, "0.0.0.0/0", &why), 0);
    cr_assert_eq(acl_add(&a, "::/0", &why), 0);
    cr_assert(acl_allows(&a, &any4));
    cr_assert(!acl_allows(&a, &none));
    acl_set_action(&a, ACL_BLOCK);
    cr_assert(!acl_allows(&a, &any4));
    cr_assert(acl_allows(&a, &none));
    cr_assert(acl_allows(NULL, &none));
    acl_fini(&a);
}

/* Growth past the first allocation keeps every entry. */
Test(acl, many_networks)
{
    struct acl a;
    const char *why;
    char text[64];

    acl_init(&a);
    for (int i = 0; i < 300; i++) {
        snprintf(text, sizeof(text), "10.%d.%d.0/24", i / 256, i % 256);
        cr_assert_eq(acl_add(&a, text, &why), 0, "%s", text);
    }
    cr_assert_eq(a.n, 300);
    for (int i = 0; i < 300; i++) {
        snprintf(text, sizeof(text), "10.%d.%d.77", i / 256, i % 256);
        struct net_addr who = caller(text);
        cr_assert(acl_allows(&a, &who), "%s", text);
    }
    struct net_addr outside = caller("10.1.44.1");
    cr_assert(!acl_allows(&a, &outside));
    acl_fini(&a);
}
