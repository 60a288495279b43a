/* tests/unit/test_client_chan.c - the pure parts of core/client_chan and
 * core/client: HOST:PORT parsing, numeric resolution, --route parsing and
 * lookup by SNI name (normalised), and the backoff bound (full jitter,
 * doubling from --backoff-min to --backoff-max, PROTOCOL.md 8.3). The
 * channel state machine itself runs in tests/e2e/test_client_channels.py.
 */
#include <arpa/inet.h>
#include <criterion/criterion.h>
#include <stdint.h>
#include <string.h>

#include "core/client.h"
#include "core/client_chan.h"

static void ep_ok(const char *text, const char *host, const char *port)
{
    struct client_chan_ep ep;
    const char *why = NULL;

    cr_assert_eq(client_chan_ep_parse(&ep, text, &why), 0, "%s: %s", text, why);
    cr_assert_str_eq(ep.host, host);
    cr_assert_str_eq(ep.port, port);
    cr_assert_str_eq(ep.text, text);
    cr_assert_eq(ep.naddrs, 0);
}

static void ep_bad(const char *text, const char *want)
{
    struct client_chan_ep ep;
    const char *why = NULL;

    cr_assert_eq(client_chan_ep_parse(&ep, text, &why), -1, "accepted %s", text);
    cr_assert_str_eq(why, want, "%s: %s", text, why);
}

Test(client_chan_ep, parse)
{
    ep_ok("127.0.0.1:8080", "127.0.0.1", "8080");
    ep_ok("gateway.example.com:443", "gateway.example.com", "443");
    ep_ok("[::1]:1", "::1", "1");
    ep_ok("[2001:db8::1]:65535", "2001:db8::1", "65535");
    ep_ok("localhost:0080", "localhost", "80");
    ep_bad("127.0.0.1", "expected HOST:PORT");
    ep_bad("::1:80", "an IPv6 address needs brackets: [ADDR]:PORT");
    ep_bad("[::1]80", "expected [IPv6]:PORT");
    ep_bad("[::1", "expected [IPv6]:PORT");
    ep_bad(":80", "HOST must be 1..255 characters");
    ep_bad("[]:80", "HOST must be 1..255 characters");
    ep_bad("host:", "PORT must be 1..65535");
    ep_bad("host:0", "PORT must be 1..65535");
    ep_bad("host:65536", "PORT must be 1..65535");
    ep_bad("host:-1", "PORT must be 1..65535");
    ep_bad("host:+1", "PORT must be 1..65535");
    ep_bad("host:80x", "PORT must be 1..65535");
}

Test(client_chan_ep, long_host)
{
    char text[400];
    struct client_chan_ep ep;
    const char *why;

    memset(text, 'a', 255);
    strcpy(text + 255, ":1");
    cr_assert_eq(client_chan_ep_parse(&ep, text, &why), 0);
    cr_assert_eq(strlen(ep.host), 255);
    memset(text, 'a', 256);
    strcpy(text + 256, ":1");
    cr_assert_eq(client_chan_ep_parse(&ep, text, &why), -1);
}

Test(client_chan_ep, resolve_numeric)
{
    struct client_chan_ep ep;
    const char *why;
    char err[128];

    cr_assert_eq(client_chan_ep_parse(&ep, "127.0.0.1:8443", &why), 0);
    cr_assert_eq(client_chan_ep_resolve(&ep, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(ep.naddrs, 1);
    cr_assert_eq(ep.addrs[0].family, AF_INET);
    cr_assert_eq(ep.addrs[0].port, 8443);
    cr_assert_eq(ep.addrs[0].ip[0], 127);
    cr_assert_eq(ep.addrs[0].ip[3], 1);
    cr_assert_eq(client_chan_ep_parse(&ep, "[::1]:80", &why), 0);
    cr_assert_eq(client_chan_ep_resolve(&ep, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(ep.naddrs, 1);
    cr_assert_eq(ep.addrs[0].family, AF_INET6);
    cr_assert_eq(ep.addrs[0].ip[15], 1);
    cr_assert_eq(ep.addrs[0].port, 80);
}

Test(client_chan_ep, resolve_failure_keeps_addresses)
{
    struct client_chan_ep ep;
    const char *why;
    char err[128] = "";

    cr_assert_eq(client_chan_ep_parse(&ep, "127.0.0.1:1", &why), 0);
    cr_assert_eq(client_chan_ep_resolve(&ep, err, sizeof(err)), 0);
    /* the same ep under a name that cannot resolve (.invalid, RFC 6761) */
    strcpy(ep.host, "no-such-host.invalid");
    cr_assert_eq(client_chan_ep_resolve(&ep, err, sizeof(err)), -1);
    cr_assert_neq(err[0], '\0');
    cr_assert_eq(ep.naddrs, 1);
    cr_assert_eq(ep.addrs[0].ip[0], 127);
}

Test(client_chan_route, add_and_lookup)
{
    struct client_chan_set s;
    const char *why;

    client_chan_set_init(&s);
    cr_assert_eq(client_chan_ep_parse(&s.endpoint, "127.0.0.1:443", &why), 0);
    cr_assert_eq(client_chan_route_add(&s, "MyName.UI.nabu.casa.=127.0.0.1:8001", &why), 0);
    cr_assert_eq(client_chan_route_add(&s, "www.myname.ui.nabu.casa=[::1]:8002", &why), 0);
    cr_assert_eq(s.nroutes, 2);
    cr_assert_str_eq(s.routes[0].name, "myname.ui.nabu.casa");
    cr_assert_str_eq(s.routes[0].ep.port, "8001");
    cr_assert_str_eq(s.routes[1].ep.host, "::1");

    cr_assert_eq(client_chan_route_for(&s, "myname.ui.nabu.casa", 19), &s.routes[0].ep);
    cr_assert_eq(client_chan_route_for(&s, "MYNAME.ui.nabu.casa.", 20), &s.routes[0].ep);
    cr_assert_eq(client_chan_route_for(&s, "www.myname.ui.nabu.casa", 23), &s.routes[1].ep);
    cr_assert_eq(client_chan_route_for(&s, "other.ui.nabu.casa", 18), &s.endpoint);
    cr_assert_eq(client_chan_route_for(&s, "myname.ui.nabu.cas", 18), &s.endpoint);
    cr_assert_eq(client_chan_route_for(&s, "", 0), &s.endpoint);

    cr_assert_eq(client_chan_route_add(&s, "myname.ui.nabu.casa=127.0.0.1:1", &why), -1);
    cr_assert_str_eq(why, "NAME is routed twice");
    cr_assert_eq(client_chan_route_add(&s, "noequals", &why), -1);
    cr_assert_str_eq(why, "expected NAME=HOST:PORT");
    cr_assert_eq(client_chan_route_add(&s, "=127.0.0.1:1", &why), -1);
    cr_assert_str_eq(why, "expected NAME=HOST:PORT");
    cr_assert_eq(client_chan_route_add(&s, "a=127.0.0.1", &why), -1);
    cr_assert_str_eq(why, "expected HOST:PORT");
    cr_assert_eq(s.nroutes, 2);
    client_chan_set_fini(&s);
    cr_assert_eq(s.nroutes, 0);
    cr_assert_null(s.routes);
}

Test(client_chan_route, long_name)
{
    struct client_chan_set s;
    char spec[300];
    const char *why;

    client_chan_set_init(&s);
    memset(spec, 'a', 256);
    strcpy(spec + 256, "=127.0.0.1:1");
    cr_assert_eq(client_chan_route_add(&s, spec, &why), -1);
    cr_assert_str_eq(why, "NAME is longer than 255 bytes");
    strcpy(spec + 255, "=127.0.0.1:1");
    cr_assert_eq(client_chan_route_add(&s, spec, &why), 0);
    client_chan_set_fini(&s);
}

Test(client_backoff, bounds)
{
    const uint64_t min = 1000, max = 300000;

    /* rnd = UINT64_MAX / 0 give the two ends of [0, cap]; cap doubles from
     * min per failure and stops at max */
    cr_assert_eq(client_backoff_ms(0, min, max, 0), 0);
    cr_assert_eq(client_backoff_ms(0, min, max, 1000), 1000);
    cr_assert_eq(client_backoff_ms(0, min, max, 1001), 0);
    cr_assert_eq(client_backoff_ms(1, min, max, 2000), 2000);
    cr_assert_eq(client_backoff_ms(2, min, max, 4000), 4000);
    cr_assert_eq(client_backoff_ms(8, min, max, 256000), 256000);
    cr_assert_eq(client_backoff_ms(9, min, max, 300000), 300000);   /* 512 s capped */
    cr_assert_eq(client_backoff_ms(9, min, max, 300001), 0);
    cr_assert_eq(client_backoff_ms(63, min, max, 300000), 300000);
    cr_assert_eq(client_backoff_ms(1000, min, max, 299999), 299999);
    for (unsigned f = 0; f < 70; f++) {
        uint64_t cap = f < 20 && (min << f) < max ? min << f : max;
        for (uint64_t r = 0; r < 5; r++) {
            uint64_t v = client_backoff_ms(f, min, max, UINT64_MAX - r * 7919);
            cr_assert_leq(v, cap, "failures %u: %llu > %llu", f, (unsigned long long)v,
                          (unsigned long long)cap);
        }
    }
    /* min above max: max rules */
    cr_assert_eq(client_backoff_ms(0, 5000, 2000, 2000), 2000);
    cr_assert_eq(client_backoff_ms(0, 5000, 2000, 2001), 0);
}

Test(client_backoff, uniform_spread)
{
    unsigned hist[4] = { 0 };

    /* rnd stepping through a range maps evenly onto [0, cap] */
    for (uint64_t r = 0; r < 4004; r++)
        hist[client_backoff_ms(2, 1000, 300000, r * 2654435761u) * 4 / 4001]++;
    for (int i = 0; i < 4; i++)
        cr_assert(hist[i] > 800 && hist[i] < 1200, "bucket %d: %u", i, hist[i]);
}
