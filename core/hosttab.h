/* core/hosttab.h - the hostname table shared by every shard (DESIGN.md
 * "Threads, ownership, routing"; PROTOCOL.md 6.7).
 *
 * Maps a host name (the token's hostname and each alias) to the tunnel that
 * serves it: {shard, tunnel id, generation, mux}. One table per process,
 * read by every shard on every device connection, written when a tunnel
 * registers or goes away.
 *
 * Concurrency: liburcu's lock-free hash table (cds_lfht) with the QSBR
 * flavour. Every thread that calls any function below except
 * hosttab_new/hosttab_free must be a registered QSBR reader
 * (rcu_register_thread() from urcu-qsbr.h), online, and must report a
 * quiescent state (rcu_quiescent_state()) regularly and never while it
 * holds a value it got from the table by reference -- the functions here
 * copy values out, so callers hold nothing across calls. Removed entries
 * are freed with call_rcu() once every reader has passed a quiescent state.
 *
 * Names: stored and looked up after sni_name_normalize() (ASCII lower
 * case, one trailing dot dropped), so "MyName.UI.nabu.casa." finds
 * "myname.ui.nabu.casa" (PROTOCOL.md 7.3 MAY). Names longer than
 * HOSTTAB_NAME_MAX (the SNI limit, no ClientHello can ask for them) or
 * empty are refused.
 *
 * Rules (PROTOCOL.md 6.7, stricter than the reference):
 *  - register replaces the previous owner of every name it claims, and
 *    reports who that was, so the gateway can close a stale tunnel;
 *  - remove deletes only the names that still point to the given tunnel:
 *    names taken over by another tunnel meanwhile are left alone.
 *
 * The hash is FNV-1a 64 over the normalised name with a per-table random
 * offset basis (liburcu exports no hash function). Only authenticated
 * clients insert names, so collision flooding would need a valid token.
 */
#ifndef CORE_HOSTTAB_H
#define CORE_HOSTTAB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HOSTTAB_NAME_MAX 255u

struct mux;
struct hosttab;

/* Who serves a name. tunnel ids are unique per process and never 0; gen
 * tells registrations of one tunnel id apart (the gateway bumps it per
 * registration). mux may be dereferenced only on thread `shard`, which
 * owns it and removes the entry before freeing it. */
struct hosttab_ent {
    uint32_t shard;
    uint64_t tunnel;
    uint64_t gen;
    struct mux *mux;
};

/* A new empty table with a fresh random hash seed, or NULL (memory or
 * random source failure). Any thread. */
struct hosttab *hosttab_new(void);

/* Free the table and every entry still in it. No other thread may use it
 * any more; the caller need not be an RCU reader, but call_rcu() callbacks
 * queued by earlier removals must be allowed to run (they do by
 * themselves). NULL is ignored. */
void hosttab_free(struct hosttab *t);

/* Copy the entry for name (len bytes, raw as sent by the device; it is
 * normalised on a copy) into *out. Returns true when found. */
bool hosttab_lookup(struct hosttab *t, const char *name, size_t len,
                    struct hosttab_ent *out);

/* Map each of names[0..n) (NUL-terminated, raw) to *ent, replacing any
 * previous owner. prev (n slots, may be NULL) receives for name i the
 * entry it replaced, or tunnel = 0 when the name was free, empty or too
 * long (refused names are skipped; *refused counts them when not NULL).
 * A name given twice replaces its own first registration: prev then names
 * ent->tunnel itself. Returns the number of names now mapped to ent, or
 * -1 when memory ran out (names registered before the failure stay;
 * remove them with hosttab_remove). */
int hosttab_register(struct hosttab *t, const char *const *names, size_t n,
                     const struct hosttab_ent *ent, struct hosttab_ent *prev,
                     size_t *refused);

/* Remove each of names[0..n) that still maps to tunnel (any generation).
 * Returns how many were removed. */
size_t hosttab_remove(struct hosttab *t, const char *const *names, size_t n,
                      uint64_t tunnel);

/* Entries in the table now (a snapshot; O(entries)). */
size_t hosttab_count(struct hosttab *t);

#endif
