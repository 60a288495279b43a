/* core/gw_test.c - the test hooks of core/gw_test.h: one shard of the real
 * gateway code (gw_conn.c, gw_tunnel.c, the muxes) driven turn by turn by
 * a test or a fuzzer, on connections it hands over itself. Only tests and
 * tests/fuzz/fuzz_gw_conn.c link it in; see gw_test.h for the contract.
 *
 * Differences from a shard under gw_run(), and why they do not matter to
 * what is tested: no listener (gw_conn_start is entered directly, as
 * on_accept would), no mailbox (one shard never hands off or posts a
 * replace), no fold timer (on_dead folds every tunnel's counters anyway),
 * no drain/stop machinery (gw_test_reset closes everything instead).
 */
#include "core/gw_test.h"

#include <stdio.h>

#include "core/gw_impl.h"

#define RESET_TURNS 1000   /* a reset that needs more than this is a leak */

static struct gw_shard *shard0(const struct gw *g)
{
    return &g->shards[0];
}

struct gw *gw_test_new(const struct gw_cfg *cfg, char *err, size_t errlen)
{
    struct gw *g;
    struct gw_shard *sh;
    char why[200];
    bool usage;

    if (cfg->threads != 1) {
        snprintf(err, errlen, "gw_test_new: threads must be 1, got %u", cfg->threads);
        return NULL;
    }
    g = gw_build(cfg, false, err, errlen, &usage);
    if (g == NULL)
        return NULL;
    sh = shard0(g);
    sh->eng = eng_new(cfg->io, why, sizeof(why));
    if (sh->eng == NULL) {
        snprintf(err, errlen, "gw_test_new: engine: %s", why);
        gw_free(g);
        return NULL;
    }
    g->nthreads = 1;
    rcu_register_thread();
    atomic_store(&g->ready, true);
    return g;
}

void gw_test_adopt(struct gw *g, enum gw_listen_kind kind, int fd, const struct net_addr *peer)
{
    gw_conn_start(shard0(g), kind, fd, peer);
}

int gw_test_turn(struct gw *g, int timeout_ms)
{
    rcu_quiescent_state();
    return eng_run_once(shard0(g)->eng, timeout_ms);
}

void gw_test_expire(struct gw *g, bool tunnels)
{
    struct gw_shard *sh = shard0(g);
    struct gw_conn *c;
    struct gw_tunnel *t;

    cds_list_for_each_entry(c, &sh->conns, link)
        if (timer_armed(&c->deadline))
            eng_timer_add(sh->eng, &c->deadline, 0);
    if (!tunnels)
        return;
    cds_list_for_each_entry(t, &sh->tunnels, link)
        if (timer_armed(&t->expiry))
            eng_timer_add(sh->eng, &t->expiry, 0);
}

void gw_test_counts(const struct gw *g, struct gw_test_counts *out)
{
    const struct gw_shard *sh = shard0(g);

    *out = (struct gw_test_counts){ .conns = sh->nconns, .tunnels = sh->ntunnels,
                                    .chans = sh->nchans };
}

int gw_test_reset(struct gw *g)
{
    struct gw_shard *sh = shard0(g);
    struct gw_conn *c, *cn;
    struct gw_tunnel *t, *tn;
    int idle = 0, rc = -1;

    cds_list_for_each_entry_safe(c, cn, &sh->conns, link)
        gw_conn_abort(c, GW_REJ_STOPPING);
    cds_list_for_each_entry_safe(t, tn, &sh->tunnels, link)
        mux_close(t->mux, MUX_R_SHUTDOWN);
    /* Two quiet turns in a row: the cancelled ops have called back and
     * the muxes' deferred frees have run. */
    for (int i = 0; i < RESET_TURNS; i++) {
        int n = gw_test_turn(g, 0);
        if (n < 0)
            break;
        idle = n == 0 ? idle + 1 : 0;
        if (idle >= 2 && sh->nconns == 0 && sh->ntunnels == 0 && sh->nchans == 0) {
            rc = 0;
            break;
        }
    }
    gw_seen_fini(&g->seen);
    gw_seen_init(&g->seen);
    return rc;
}

void gw_test_free(struct gw *g)
{
    struct gw_shard *sh;

    if (g == NULL)
        return;
    sh = shard0(g);
    gw_test_reset(g);
    sh->finalizing = true;
    eng_free(sh->eng);
    sh->eng = NULL;
    rcu_unregister_thread();
    gw_free(g);
}
