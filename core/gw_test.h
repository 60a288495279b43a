/* core/gw_test.h - test hooks into the gateway runtime (core/gw*.c): ONE
 * shard, driven turn by turn on the caller's thread, with no listening
 * socket, no signal handling and no admin listener. Connections are handed
 * over by the caller (one end of a socketpair, say) as if a listener had
 * accepted them.
 *
 * For tests/fuzz/fuzz_gw_conn.c and tests only: `snitun server` never
 * calls these (gw_run() is the real loop), and nothing in the daemon
 * depends on them.
 *
 * Threads: everything here runs on the thread that called gw_test_new(),
 * which becomes a registered, online QSBR reader (liburcu) until
 * gw_test_free(); at most one such gateway per thread.
 *
 * Ownership: gw_test_adopt() takes the fd as the real accept path does;
 * the caller keeps its own end. cfg is borrowed for the gateway's life
 * and, unlike with gw_new(), the caller may change cfg->proxy_protocol
 * between connections (it is read at each adopt; nothing else is).
 */
#ifndef CORE_GW_TEST_H
#define CORE_GW_TEST_H

#include <stdbool.h>
#include <stddef.h>

#include "core/addr.h"
#include "core/gw.h"

/* What is alive on the shard. */
struct gw_test_counts {
    size_t conns;     /* connections before the multiplexer */
    size_t tunnels;   /* tunnels (registered or closing) */
    size_t chans;     /* channels opened and not yet closed */
};

/* A gateway of one shard (cfg->threads must be 1) on an engine of kind
 * cfg->io; cfg->listen is checked as gw_new() does but nothing is bound.
 * NULL with a message in err on failure. */
struct gw *gw_test_new(const struct gw_cfg *cfg, char *err, size_t errlen);

/* A connection accepted on a listener of `kind` from `peer`: takes fd
 * (a connected, non-blocking stream socket, as accept4 gives them). */
void gw_test_adopt(struct gw *g, enum gw_listen_kind kind, int fd, const struct net_addr *peer);

/* One engine turn of at most timeout_ms (0: poll). Returns the callbacks
 * run (0: nothing happened), or -errno if the engine failed. */
int gw_test_turn(struct gw *g, int timeout_ms);

/* Make every pending handshake deadline (--handshake-timeout and
 * --challenge-timeout) due now, and with `tunnels` every tunnel's token
 * expiry too: they fire in the next turn. */
void gw_test_expire(struct gw *g, bool tunnels);

void gw_test_counts(const struct gw *g, struct gw_test_counts *out);

/* Back to empty: every handshake aborted, every tunnel closed, turns run
 * until all of it is freed, the aes-gcm keys seen so far forgotten. 0, or
 * -1 when something was still alive after a bounded number of turns (a
 * leak). The names the tunnels had registered are freed by liburcu's
 * call_rcu() after a grace period: a leak check right after a reset waits
 * for them (rcu_barrier(), with the thread offline, or as
 * tests/fuzz/fuzz_gw_conn.c does). */
int gw_test_reset(struct gw *g);

/* gw_test_reset(), then free everything. NULL is ignored. */
void gw_test_free(struct gw *g);

#endif
