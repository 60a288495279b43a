/* core/metrics.h - counters and gauges, rendered for Prometheus.
 *
 * Every metric has one slot per shard (one per value of its label, when it
 * has one). A shard's slots are plain uint64_t written ONLY by the thread
 * that owns the shard: an increment is a relaxed atomic load + add + store,
 * i.e. an ordinary load/add/store on the CPU, no lock prefix, no shared
 * cache line (each shard's slots start on their own 64-byte line). A
 * scrape, from any thread, sums the shards with relaxed atomic loads:
 * the total is not a snapshot across metrics, but every value read is one
 * that was written (no torn reads, nothing for TSan to report).
 *
 * Gauges are per shard too, and the rendered value is the sum over the
 * shards (tunnels_connected: each shard adds +1/-1 for its own tunnels). A
 * process-wide gauge (shards, engine_info) is set once through one shard,
 * normally 0. Gauge slots hold int64 values in two's complement.
 *
 * Labels: at most one per metric, with a fixed list of values declared in
 * the table in metrics.c; every value is rendered, zeros included (rate()
 * needs the zero), except for "info" gauges that hide zero rows. Hot paths
 * use the index enums below; reason labels are looked up by name
 * (metrics_inc_reason), and every reason list ends in "other", which
 * absorbs names not in the list. Reason names equal the parsers' own
 * tokens where there is one (sni_reason_name(), pp_reason_name(),
 * token_strerror() for the Fernet layer), so a caller can pass those.
 *
 * Roles: metrics_new() takes which process it serves; metrics of the other
 * role are not rendered (and cost nothing but a few slots).
 *
 * Adding a metric (checklist):
 *   1. a value in enum metric_id below (before METRIC_COUNT);
 *   2. a row at the same position in the table in core/metrics.c (name
 *      with the snitun_ prefix, help, type, roles, label + values);
 *   3. if hot paths index its label, an index enum here, in the same
 *      order as the values in the row.
 * metrics.c checks at compile time that the table has METRIC_COUNT rows.
 */
#ifndef CORE_METRICS_H
#define CORE_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "core/mux.h"

enum metric_id {
    /* gateway (snitun server) */
    METRIC_TUNNELS_CONNECTED = 0, /* gauge */
    METRIC_TUNNELS_TOTAL,         /* tunnels that completed the handshake */
    METRIC_HANDSHAKES,            /* {result="ok"|reason} */
    METRIC_SNI_REJECTS,           /* {reason} */
    METRIC_PROXY_REJECTS,         /* {reason} */
    METRIC_HANDOFFS,              /* connections moved to another shard */
    METRIC_BYTES,                 /* {direction}: enum metrics_dir */
    METRIC_TUNNELS_BY_VERSION,    /* gauge {version}: "0" "1" "2" "other" */
    METRIC_TUNNELS_BY_CIPHER,     /* gauge {cipher}: tc_kind_name() */
    METRIC_ACCEPTED,              /* {listener}: enum metrics_listener */
    METRIC_DROPS,                 /* {reason}: connections closed before the mux */
    METRIC_DRAINING,              /* gauge: 1 from SIGTERM/SIGINT until exit */
    METRIC_KEY_RELOADS,           /* {result}: ok, error */
    METRIC_FERNET_KEYS,           /* gauge: keys loaded */
    /* both */
    METRIC_CHANNELS_OPEN,         /* gauge */
    METRIC_CHANNELS_OPENED,
    METRIC_FRAMES_RECEIVED,       /* {type}: enum metrics_frame */
    METRIC_FRAMES_SENT,           /* {type}: enum metrics_frame */
    METRIC_CHANNEL_CLOSES,        /* {reason} */
    METRIC_TUNNEL_CLOSES,         /* {reason} */
    METRIC_FRAMES_DROPPED,        /* {reason}: unknown_id, bad_new, late */
    METRIC_TUNNEL_WRITES,         /* sealed batches written (frames per write
                                     = frames sent / this) */
    METRIC_SPLICED,               /* {direction}: enum metrics_spliced */
    METRIC_LIMIT_REJECTS,         /* {limit} */
    METRIC_ENGINE_INFO,           /* gauge {engine}: enum metrics_engine */
    METRIC_SHARDS,                /* gauge */
    METRIC_ADMIN_DROPS,           /* {reason}: admin connections refused or cut;
                                     written by the admin listener's thread
                                     (its own slot) */
    /* connector (snitun client) */
    METRIC_CLIENT_CONNECTED,      /* gauge: 1 while the tunnel is up */
    METRIC_CLIENT_RECONNECTS,
    METRIC_CLIENT_ENDPOINT_FAILURES,
    METRIC_CLIENT_ACL_REFUSED,
    METRIC_CLIENT_BYTES,          /* {direction}: enum metrics_cdir */
    METRIC_COUNT
};

enum metrics_role {
    METRICS_SERVER = 1,
    METRICS_CLIENT = 2,
};

/* Label indexes, in the order of the values in the table. */
enum metrics_dir {               /* METRIC_BYTES */
    METRICS_DEVICE_TO_TUNNEL = 0,
    METRICS_TUNNEL_TO_DEVICE = 1,
};

enum metrics_cdir {              /* METRIC_CLIENT_BYTES */
    METRICS_TUNNEL_TO_ENDPOINT = 0,
    METRICS_ENDPOINT_TO_TUNNEL = 1,
};

enum metrics_frame {             /* METRIC_FRAMES_RECEIVED / _SENT */
    METRICS_FRAME_NEW = 0,
    METRICS_FRAME_DATA,
    METRICS_FRAME_CLOSE,
    METRICS_FRAME_PING,
    METRICS_FRAME_PAUSE,
    METRICS_FRAME_RESUME,
    METRICS_FRAME_UNKNOWN,
};

enum metrics_listener {          /* METRIC_ACCEPTED */
    METRICS_LISTENER_SINGLE = 0,
    METRICS_LISTENER_SNI = 1,
    METRICS_LISTENER_PEER = 2,
};

enum metrics_drop {              /* METRIC_FRAMES_DROPPED */
    METRICS_DROP_UNKNOWN_ID = 0,
    METRICS_DROP_BAD_NEW = 1,
    METRICS_DROP_LATE = 2,
};

enum metrics_spliced {          /* METRIC_SPLICED */
    METRICS_SPLICED_FROM_TUNNEL = 0,
    METRICS_SPLICED_TO_TUNNEL = 1,
};

enum metrics_reload {            /* METRIC_KEY_RELOADS */
    METRICS_RELOAD_OK = 0,
    METRICS_RELOAD_ERROR = 1,
};

enum metrics_engine {            /* METRIC_ENGINE_INFO */
    METRICS_ENGINE_URING = 0,
    METRICS_ENGINE_EPOLL = 1,
};

#define METRICS_HANDSHAKE_OK 0   /* METRIC_HANDSHAKES result="ok" */

/* Label values (reason lists end in "other"):
 *   handshakes_total{result}: ok bad_base64 bad_length bad_version bad_mac
 *     bad_padding not_json bad_claims expired unsupported_cipher
 *     bad_answer timeout eof too_long gcm_key_reused (an aes-gcm key seen
 *     in an earlier, still valid session) other
 *   sni_rejects_total{reason}: not_tls old_version not_hello record
 *     too_large malformed no_name empty_name long_name bad_utf8 bad_char
 *     unknown_name timeout eof other
 *   proxy_rejects_total{reason}: the pp_reason_name() tokens (v1_no_crlf
 *     ... too_big eof), timeout, other
 *   channel_closes_total{reason}: remote_close (CLOSE frame from the other
 *     end), local_eof / local_error (this side's socket: the device on the
 *     gateway, the endpoint on the client), connect_failed, acl_refused,
 *     overflow (queue cap, protocol 0), timeout, tunnel_down, shutdown,
 *     other
 *   tunnel_closes_total{reason}: eof, error (socket), bad_frame (decoder
 *     fatal), ping_timeout, overflow (peer not reading), replaced (a newer
 *     tunnel for the same host), shutdown, idle (tunnel idle timer),
 *     expired (token validity ended), other
 *   connections_dropped_total{reason}: every connection the gateway closed
 *     before the multiplexer, by the gateway's reason token (the finer
 *     split is in handshakes/sni_rejects/proxy_rejects): handshake_limit
 *     ip_limit timeout eof read_error send_error not_tls_or_token
 *     proxy_header bad_hello unknown_name bad_token token_too_long
 *     bad_answer no_memory stopping gcm_key_reused other
 *   frames_dropped_total{reason}: unknown_id (DATA/CLOSE/PAUSE/RESUME for a
 *     channel not open), bad_new (v2 NEW with a short address block), late
 *     (frames for a channel this side closed just before: the peer sent
 *     them before it saw the CLOSE; their payload is dropped)
 *   limit_rejects_total{limit}: connections, tunnels, channels,
 *     handshakes, fds (EMFILE/ENFILE), tunnel_queue (a channel closed
 *     because its tunnel's queues together passed --max-tunnel-queue),
 *     other
 *   admin_connections_dropped_total{reason}: limit (refused at accept: the
 *     admin listener's connection limit or its per-IP share), deadline
 *     (still open at its deadline: idle, slow or stuck), other
 */

struct metrics;

/* Slots for nshards (>= 1) shards, all zero; roles is a mask of enum
 * metrics_role selecting what metrics_render() shows. NULL if out of
 * memory. Free with metrics_free() once no thread uses it. */
struct metrics *metrics_new(unsigned nshards, unsigned roles);
void metrics_free(struct metrics *m);

/* Hot-path updates, from the thread that owns `shard` only. Out-of-range
 * shard, id or label is a caller bug: asserted, and ignored in release
 * builds. metrics_inc: metrics without a label (label 0 otherwise). */
void metrics_inc(struct metrics *m, unsigned shard, enum metric_id id, uint64_t by);
void metrics_inc_label(struct metrics *m, unsigned shard, enum metric_id id, unsigned label,
                       uint64_t by);
void metrics_gauge_add(struct metrics *m, unsigned shard, enum metric_id id, int64_t delta);
void metrics_gauge_add_label(struct metrics *m, unsigned shard, enum metric_id id,
                             unsigned label, int64_t delta);
void metrics_gauge_set(struct metrics *m, unsigned shard, enum metric_id id, unsigned label,
                       int64_t value);

/* The label index of `value` for metric id: its position in the list, or
 * the index of "other" when the list has one and value is not in it, or -1
 * (no label, or not found in a list without "other"). A linear scan of a
 * few short strings: for failure paths, not per byte. */
int metrics_label_index(enum metric_id id, const char *value);

/* metrics_inc_label(m, shard, id, metrics_label_index(id, reason), by);
 * nothing when the index is -1. */
void metrics_inc_reason(struct metrics *m, unsigned shard, enum metric_id id,
                        const char *reason, uint64_t by);

/* The label of a channel's / a tunnel's close reason in
 * snitun_channel_closes_total / snitun_tunnel_closes_total (the lists in
 * metrics.c), for both roles. */
const char *metrics_channel_close_label(enum mux_reason why);
const char *metrics_tunnel_close_label(enum mux_reason why);

/* Add what a multiplexer counted between `then` and `now` (struct
 * mux_stats, core/mux.h) to the series both roles share: frames received
 * and sent by type, frames dropped by reason, tunnel writes. Bytes and
 * limits are the role's own. */
void metrics_add_mux(struct metrics *m, unsigned shard, const struct mux_stats *now,
                     const struct mux_stats *then);

/* The frame label index of a FLOW byte (core/frame.h enum frame_flow);
 * METRICS_FRAME_UNKNOWN for any other value. */
enum metrics_frame metrics_frame_index(uint8_t flow);

/* The sum over shards of one slot (a counter as uint64, a gauge cast to
 * int64 by the caller). For tests and the client's status line. */
uint64_t metrics_value(const struct metrics *m, enum metric_id id, unsigned label);

/* Prometheus text exposition format 0.0.4 of every metric of the roles:
 * "# HELP", "# TYPE", then one line per series. *out is a NUL-terminated
 * heap buffer owned by the caller (free()), *len its length without the
 * NUL. Any thread may call it while the shards keep updating. 0, or -1
 * when out of memory (then *out is NULL). */
int metrics_render(const struct metrics *m, char **out, size_t *len);

#endif
