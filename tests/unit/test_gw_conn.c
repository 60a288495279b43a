/* tests/unit/test_gw_conn.c - core/gw_conn.c through the test hooks of
 * core/gw_test.h (one shard on the epoll engine, connections handed over
 * as socketpairs): what a token that never completes is counted as when
 * its handshake deadline passes (PROTOCOL.md 2.7).
 *
 * A token whose Fernet layer fails is kept until the deadline, since more
 * bytes might complete it. At the deadline the bytes are judged: a whole
 * token under an unknown key or with a bad HMAC is a token error (bad_mac:
 * token counter, handshakes_total{result="bad_mac"}, drop reason
 * bad_token), never a timeout; a token cut short (bad_base64 / bad_length
 * on bytes that are all base64) and a connection that sent nothing are
 * timeouts. Tokens are the fernet.json vectors; the gateway's key list is
 * the vectors' server list [K1, K2]. Every case: nothing happens before
 * the deadline, then the connection is closed with nothing sent, exactly
 * one counter moves, and the gateway holds nothing afterwards.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/gw_impl.h"
#include "core/gw_test.h"
#include "testutil.h"

static const char *vector_token(json_t *doc, const char *name)
{
    json_t *c;
    size_t i;

    json_array_foreach(json_object_get(doc, "cases"), i, c)
        if (strcmp(tu_str(c, "name"), name) == 0)
            return tu_str(c, "token");
    cr_assert_fail("no vector %s", name);
    return NULL;
}

struct fixture {
    struct gw_cfg cfg;
    struct gw_listen listen[2];
    const char *keys[2];
    struct gw *g;
};

static void fixture_up(struct fixture *f, json_t *doc)
{
    json_t *keys = json_object_get(doc, "keys");
    char err[256];

    gw_cfg_defaults(&f->cfg);
    f->listen[0].kind = GW_L_SINGLE;
    f->listen[1].kind = GW_L_PEER;
    f->cfg.listen = f->listen;
    f->cfg.nlisten = 2;
    f->cfg.io = ENG_EPOLL;
    f->keys[0] = tu_str(json_object_get(keys, "K1"), "key_b64url");
    f->keys[1] = tu_str(json_object_get(keys, "K2"), "key_b64url");
    f->cfg.keys = f->keys;
    f->cfg.nkeys = 2;
    f->g = gw_test_new(&f->cfg, err, sizeof(err));
    cr_assert_not_null(f->g, "%s", err);
}

static void quiet(struct gw *g)
{
    int idle = 0;

    for (int i = 0; i < 100 && idle < 2; i++) {
        int n = gw_test_turn(g, 0);
        cr_assert_geq(n, 0);
        idle = n == 0 ? idle + 1 : 0;
    }
}

static uint64_t handshakes(struct gw *g, const char *result)
{
    return metrics_value(g->metrics, METRIC_HANDSHAKES,
                         (unsigned)metrics_label_index(METRIC_HANDSHAKES, result));
}

static uint64_t drops(struct gw *g, const char *reason)
{
    return metrics_value(g->metrics, METRIC_DROPS,
                         (unsigned)metrics_label_index(METRIC_DROPS, reason));
}

/* Send `bytes` on a connection of `kind`, hold it to the deadline. */
static void at_deadline(struct fixture *f, enum gw_listen_kind kind, const char *bytes)
{
    struct net_addr peer = { .family = AF_INET, .port = 40000, .ip = { 192, 0, 2, 9 } };
    struct gw_test_counts n;
    int sv[2];
    char b;

    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    gw_test_adopt(f->g, kind, sv[1], &peer);
    if (bytes[0] != '\0')
        cr_assert_eq(send(sv[0], bytes, strlen(bytes), 0), (ssize_t)strlen(bytes));
    quiet(f->g);
    gw_test_counts(f->g, &n);
    cr_assert_eq(n.conns, 1, "closed before the deadline");
    cr_assert_eq(recv(sv[0], &b, 1, 0), -1);
    cr_assert_eq(errno, EAGAIN);
    gw_test_expire(f->g, false);
    quiet(f->g);
    gw_test_counts(f->g, &n);
    cr_assert_eq(n.conns, 0, "still open after the deadline");
    cr_assert_eq(recv(sv[0], &b, 1, 0), 0, "closed with nothing sent");
    close(sv[0]);
}

static void fixture_down(struct fixture *f)
{
    cr_assert_eq(gw_test_reset(f->g), 0);
    gw_test_free(f->g);
}

static void assert_token_error(struct fixture *f, enum token_err e, const char *name)
{
    const struct gw_ctr *c = &f->g->shards[0].ctr;

    for (int i = 0; i < TOKEN_ERR_COUNT; i++)
        cr_assert_eq(c->token[i], i == (int)e ? 1u : 0u, "%s: token[%s]", name,
                     token_strerror(i));
    cr_assert_eq(c->rej[GW_REJ_TOKEN], 1, "%s", name);
    cr_assert_eq(c->rej[GW_REJ_TIMEOUT], 0, "%s", name);
    cr_assert_eq(c->timeout[GW_ST_TOKEN], 0, "%s", name);
    cr_assert_eq(handshakes(f->g, token_strerror(e)), 1, "%s", name);
    cr_assert_eq(handshakes(f->g, "timeout"), 0, "%s", name);
    cr_assert_eq(drops(f->g, "bad_token"), 1, "%s", name);
    cr_assert_eq(drops(f->g, "timeout"), 0, "%s", name);
}

static void assert_timeout(struct fixture *f, const char *name)
{
    const struct gw_ctr *c = &f->g->shards[0].ctr;

    for (int i = 0; i < TOKEN_ERR_COUNT; i++)
        cr_assert_eq(c->token[i], 0, "%s: token[%s]", name, token_strerror(i));
    cr_assert_eq(c->rej[GW_REJ_TOKEN], 0, "%s", name);
    cr_assert_eq(c->rej[GW_REJ_TIMEOUT], 1, "%s", name);
    cr_assert_eq(c->timeout[GW_ST_TOKEN], 1, "%s", name);
    cr_assert_eq(handshakes(f->g, "timeout"), 1, "%s", name);
    cr_assert_eq(drops(f->g, "timeout"), 1, "%s", name);
    cr_assert_eq(drops(f->g, "bad_token"), 0, "%s", name);
}

static void assert_bad_mac(struct fixture *f, const char *name)
{
    assert_token_error(f, TOKEN_BAD_MAC, name);
}

/* Each case on the peer port and on the single port ("gA" moves the
 * single port's connection to the token stage at once): the token of
 * `vector` sent, then the deadline, then check(). */
static void deadline_case(const char *vector, void (*check)(struct fixture *, const char *))
{
    json_t *doc = tu_load_json("fernet.json");
    enum gw_listen_kind kinds[2] = { GW_L_PEER, GW_L_SINGLE };

    for (int k = 0; k < 2; k++) {
        struct fixture f;
        fixture_up(&f, doc);
        at_deadline(&f, kinds[k], vector_token(doc, vector));
        check(&f, vector);
        fixture_down(&f);
    }
    json_decref(doc);
}

static void bad_mac_case(const char *vector)
{
    deadline_case(vector, assert_bad_mac);
}

static void timeout_case(const char *vector)
{
    deadline_case(vector, assert_timeout);
}

Test(gw_conn_deadline, unknown_key_is_bad_mac)
{
    bad_mac_case("made_with_unknown_key");
}

Test(gw_conn_deadline, tampered_hmac_is_bad_mac)
{
    bad_mac_case("tampered_hmac");
}

Test(gw_conn_deadline, tampered_ciphertext_is_bad_mac)
{
    bad_mac_case("tampered_ciphertext");
}

Test(gw_conn_deadline, truncated_token_is_timeout)
{
    timeout_case("bad_base64_truncated");          /* padding cut off: bad_base64 */
}

Test(gw_conn_deadline, token_cut_at_2048_is_timeout)
{
    timeout_case("oversized_token_first_2048_bytes"); /* bad_length */
}

Test(gw_conn_deadline, nothing_sent_is_timeout)
{
    json_t *doc = tu_load_json("fernet.json");
    struct fixture f;

    fixture_up(&f, doc);
    at_deadline(&f, GW_L_PEER, "");
    assert_timeout(&f, "nothing on the peer port");
    fixture_down(&f);
    json_decref(doc);
}

/* ---- the first read at accept ------------------------------------------------ */

/* Bytes that are already there when a connection is accepted are read and
 * judged in the accept itself (gw_conn_start), not one loop turn later:
 * garbage on the single port is rejected before any turn runs, with the
 * same single counter and the connection closed with nothing sent. A
 * connection with nothing there yet waits for its bytes as before. */
Test(gw_conn_first_read, bytes_there_at_accept_are_judged_at_once)
{
    json_t *doc = tu_load_json("fernet.json");
    struct net_addr peer = { .family = AF_INET, .port = 40000, .ip = { 192, 0, 2, 9 } };
    struct gw_test_counts n;
    struct fixture f;
    const struct gw_ctr *c;
    int sv[2];
    char b;

    fixture_up(&f, doc);
    c = &f.g->shards[0].ctr;
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    cr_assert_eq(send(sv[0], "GET / HTTP/1.1\r\n", 16, 0), 16);
    gw_test_adopt(f.g, GW_L_SINGLE, sv[1], &peer);
    cr_assert_eq(c->rej[GW_REJ_GARBAGE], 1, "not judged at accept");
    cr_assert_eq(recv(sv[0], &b, 1, 0), 0, "closed with nothing sent");
    close(sv[0]);
    quiet(f.g);
    gw_test_counts(f.g, &n);
    cr_assert_eq(n.conns, 0);

    /* Nothing there yet: no verdict until the bytes come. */
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    gw_test_adopt(f.g, GW_L_SINGLE, sv[1], &peer);
    quiet(f.g);
    gw_test_counts(f.g, &n);
    cr_assert_eq(n.conns, 1);
    cr_assert_eq(c->rej[GW_REJ_GARBAGE], 1);
    cr_assert_eq(send(sv[0], "GET", 3, 0), 3);
    quiet(f.g);
    cr_assert_eq(c->rej[GW_REJ_GARBAGE], 2);
    cr_assert_eq(recv(sv[0], &b, 1, 0), 0, "closed with nothing sent");
    close(sv[0]);
    quiet(f.g);
    gw_test_counts(f.g, &n);
    cr_assert_eq(n.conns, 0);

    /* EOF there at accept: the same verdict as EOF read later. */
    cr_assert_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    close(sv[0]);
    gw_test_adopt(f.g, GW_L_PEER, sv[1], &peer);
    cr_assert_eq(c->rej[GW_REJ_EOF], 1);
    quiet(f.g);
    gw_test_counts(f.g, &n);
    cr_assert_eq(n.conns, 0);
    fixture_down(&f);
    json_decref(doc);
}
