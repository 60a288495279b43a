/* core/gw_steer.c - send device connections to the shards whose tunnels
 * serve them (see gw_impl.h "gw_steer").
 *
 * Why: a device connection lands on the shard the kernel picks by hash;
 * when its tunnel lives on another shard, the accepting shard wakes up,
 * reads the ClientHello and hands the socket over (gw_route): two shards
 * woken instead of one. With one tunnel on a 2-shard gateway that is half
 * of all connections. Measured on 2 cores (bench/ rate and close loads,
 * steered vs hashed, interleaved rounds): gateway + client CPU per channel
 * -5.4 % (16 workers), -6.2 % (64), -12 % per HTTPS connection; channels/s
 * +4.4 % with 16 workers.
 *
 * How: every GW_FOLD_MS shard 0 reads how many device channels each shard
 * opened since the last look (gw_shard.routed) and, when they are uneven,
 * attaches a program to every --sni-listen group (io/sock.h sock_steer)
 * that gives each shard the share of new connections that ended up there.
 * A shard that serves no busy name gets none; one whose share grows (a
 * tunnel moved to it) keeps receiving handoffs meanwhile, so the next look
 * sees it. Connections the program sends to the wrong shard are handed
 * over as before: steering only saves work, it never decides routing.
 *
 * Only --sni-listen listeners: a --listen (single-port) listener also
 * accepts tunnels, and a tunnel lives where it was accepted, so steering
 * those would pile new tunnels onto the busy shards. Off with --steer off,
 * with one shard, or with more shards than a program can name.
 *
 * The group numbers its listeners in the order they started listening,
 * which is shard order (open_listeners). When a listener closes (drain),
 * the last one takes its number and a number past the end falls back to
 * the hash: connections still land on a live listener.
 */
#include "core/gw_impl.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <urcu/system.h>

#include "io/sock.h"

/* Fewer device channels than this in one look say nothing: keep what is. */
#define STEER_MIN_CHANNELS 64
/* Shares are rounded to 1/STEER_STEPS... */
#define STEER_STEPS 32u
/* ... attached when the largest and smallest differ by more than this many
 * steps, detached when by this many or fewer (uneven enough to matter,
 * with a margin so that noise does not flip it every second) ... */
#define STEER_ON_SPREAD 4u
#define STEER_OFF_SPREAD 2u
/* ... and replaced when one share moved by at least this many steps. */
#define STEER_MOVE 2u

void gw_steer_count(struct gw_shard *sh)
{
    CMM_STORE_SHARED(sh->routed, sh->routed + 1);
}

static bool steer_usable(const struct gw *g)
{
    bool sni = false;

    for (size_t i = 0; i < g->cfg->nlisten; i++)
        sni |= g->cfg->listen[i].kind == GW_L_SNI;
    return sni && g->cfg->steer && g->nshards > 1 && g->nshards <= GW_STEER_MAX &&
           !g->steer.failed;
}

/* Apply w (or detach when NULL) to every --sni-listen group. */
static int steer_apply(struct gw *g, const uint32_t *w)
{
    const struct gw_shard *sh0 = &g->shards[0];

    for (size_t i = 0; i < g->cfg->nlisten; i++) {
        int fd = sh0->lsn[i].fd, rc;

        if (g->cfg->listen[i].kind != GW_L_SNI || fd < 0)
            continue;
        rc = w != NULL ? sock_steer(fd, w, g->nshards) : sock_steer_off(fd);
        if (rc < 0 && !(w == NULL && rc == -ENOENT))
            return rc;
    }
    return 0;
}

static void steer_log(const struct gw *g, const char *state)
{
    char shares[GW_STEER_MAX * 5 + 1];
    size_t off = 0;

    shares[0] = '\0';
    for (unsigned s = 0; g->steer.on && s < g->nshards; s++)
        off += (size_t)snprintf(shares + off, sizeof(shares) - off, "%s%u", s ? "," : "",
                                (unsigned)((g->steer.w[s] * 100u + SOCK_STEER_SCALE / 2) /
                                           SOCK_STEER_SCALE));
    log_msg(LOG_INFO, "device listeners steered", "state", state, "shares_pct",
            g->steer.on ? shares : "-", NULL);
}

void gw_steer_tick(struct gw *g)
{
    struct gw_steer *st = &g->steer;
    uint64_t d[GW_STEER_MAX], total = 0;
    uint32_t steps[GW_STEER_MAX], lo = STEER_STEPS, hi = 0, moved = 0;
    int rc;

    if (!steer_usable(g) || g->shards[0].draining)
        return;
    for (unsigned s = 0; s < g->nshards; s++) {
        uint64_t now = CMM_LOAD_SHARED(g->shards[s].routed);

        d[s] = now - st->seen[s];
        st->seen[s] = now;
        total += d[s];
    }
    if (total < STEER_MIN_CHANNELS)
        return;
    for (unsigned s = 0; s < g->nshards; s++) {
        uint32_t cur = st->on ? st->w[s] / (SOCK_STEER_SCALE / STEER_STEPS) : 0, diff;

        steps[s] = (uint32_t)((d[s] * STEER_STEPS + total / 2) / total);
        lo = steps[s] < lo ? steps[s] : lo;
        hi = steps[s] > hi ? steps[s] : hi;
        diff = steps[s] > cur ? steps[s] - cur : cur - steps[s];
        moved = diff > moved ? diff : moved;
    }
    if (st->on && hi - lo <= STEER_OFF_SPREAD) {
        rc = steer_apply(g, NULL);
        st->on = false;
        if (rc == 0)
            steer_log(g, "off");
    } else if ((!st->on && hi - lo > STEER_ON_SPREAD) || (st->on && moved >= STEER_MOVE)) {
        for (unsigned s = 0; s < g->nshards; s++)
            st->w[s] = steps[s] * (SOCK_STEER_SCALE / STEER_STEPS);
        rc = steer_apply(g, st->w);
        st->on = rc == 0;
        if (rc == 0)
            steer_log(g, "on");
    } else {
        return;
    }
    if (rc < 0) {
        /* The kernel refused (no cBPF: a seccomp filter, an old kernel):
         * the hash it is, for good. */
        st->failed = true;
        steer_apply(g, NULL);
        log_msg(LOG_WARN, "device listener steering unavailable", "error", strerror(-rc), NULL);
    }
}
