/* core/metrics.c - the metric table, per-shard slots, rendering; see
 * core/metrics.h. */
#include "core/metrics.h"

#include <assert.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/frame.h"
#include "core/mux.h"

#define CACHE_LINE 64
#define SLOTS_PER_LINE (CACHE_LINE / sizeof(uint64_t))

enum metric_type {
    TYPE_COUNTER = 1,
    TYPE_GAUGE = 2,
};

struct metric_def {
    const char *name;
    const char *help;
    enum metric_type type;
    unsigned roles;               /* enum metrics_role mask */
    const char *label;            /* NULL: no label */
    const char *const *values;    /* NULL-terminated, with label */
    bool hide_zero;               /* info gauge: only the set row */
};

#define S METRICS_SERVER
#define C METRICS_CLIENT
#define VALUES(...) (const char *const[]){ __VA_ARGS__, NULL }

/* Checklist: one row per enum metric_id, same order (see metrics.h); the
 * index enums of metrics.h follow the order of the values here. */
static const struct metric_def defs[] = {
    [METRIC_TUNNELS_CONNECTED] = { "snitun_tunnels_connected",
        "Tunnels currently connected.", TYPE_GAUGE, S, NULL, NULL, false },
    [METRIC_TUNNELS_TOTAL] = { "snitun_tunnels_total",
        "Tunnels that completed the handshake.", TYPE_COUNTER, S, NULL, NULL, false },
    [METRIC_HANDSHAKES] = { "snitun_handshakes_total",
        "Tunnel handshakes, by result.", TYPE_COUNTER, S, "result",
        VALUES("ok", "bad_base64", "bad_length", "bad_version", "bad_mac", "bad_padding",
               "not_json", "bad_claims", "expired", "unsupported_cipher", "bad_answer",
               "timeout", "eof", "too_long", "gcm_key_reused", "other"), false },
    [METRIC_SNI_REJECTS] = { "snitun_sni_rejects_total",
        "Device connections not routed, by reason.", TYPE_COUNTER, S, "reason",
        VALUES("not_tls", "old_version", "not_hello", "record", "too_large", "malformed",
               "no_name", "empty_name", "long_name", "bad_utf8", "bad_char", "unknown_name",
               "timeout", "eof", "other"), false },
    [METRIC_PROXY_REJECTS] = { "snitun_proxy_rejects_total",
        "Connections closed for a bad PROXY protocol header, by reason.", TYPE_COUNTER, S,
        "reason",
        VALUES("v1_no_crlf", "v1_too_long", "v1_protocol", "v1_fields", "v1_source",
               "v1_family", "v2_version", "v2_command", "v2_short_inet", "v2_short_inet6",
               "too_big", "eof", "timeout", "other"), false },
    [METRIC_HANDOFFS] = { "snitun_handoffs_total",
        "Connections handed to the shard that owns their tunnel.", TYPE_COUNTER, S, NULL,
        NULL, false },
    [METRIC_BYTES] = { "snitun_bytes_total",
        "Payload bytes relayed between devices and tunnels.", TYPE_COUNTER, S, "direction",
        VALUES("device_to_tunnel", "tunnel_to_device"), false },
    [METRIC_TUNNELS_BY_VERSION] = { "snitun_tunnels_connected_by_version",
        "Tunnels currently connected, by multiplexer protocol version.", TYPE_GAUGE, S,
        "version", VALUES("0", "1", "2", "other"), false },
    [METRIC_TUNNELS_BY_CIPHER] = { "snitun_tunnels_connected_by_cipher",
        "Tunnels currently connected, by tunnel cipher.", TYPE_GAUGE, S, "cipher",
        VALUES("aes-cbc", "aes-gcm", "aes-gcm-siv", "other"), false },
    [METRIC_ACCEPTED] = { "snitun_connections_accepted_total",
        "Connections accepted, by kind of listener.", TYPE_COUNTER, S, "listener",
        VALUES("single", "sni", "peer"), false },
    [METRIC_DROPS] = { "snitun_connections_dropped_total",
        "Connections closed before the multiplexer (nothing sent), by reason.", TYPE_COUNTER,
        S, "reason",
        VALUES("handshake_limit", "ip_limit", "timeout", "eof", "read_error", "send_error",
               "not_tls_or_token", "proxy_header", "bad_hello", "unknown_name", "bad_token",
               "token_too_long", "bad_answer", "no_memory", "stopping", "gcm_key_reused",
               "other"), false },
    [METRIC_DRAINING] = { "snitun_draining",
        "1 while the gateway drains after SIGTERM/SIGINT (listeners closed).", TYPE_GAUGE, S,
        NULL, NULL, false },
    [METRIC_KEY_RELOADS] = { "snitun_key_reloads_total",
        "Fernet key reloads (SIGHUP), by result.", TYPE_COUNTER, S, "result",
        VALUES("ok", "error"), false },
    [METRIC_FERNET_KEYS] = { "snitun_fernet_keys",
        "Fernet keys in use.", TYPE_GAUGE, S, NULL, NULL, false },
    [METRIC_CHANNELS_OPEN] = { "snitun_channels_open",
        "Channels currently open.", TYPE_GAUGE, S | C, NULL, NULL, false },
    [METRIC_CHANNELS_OPENED] = { "snitun_channels_opened_total",
        "Channels opened.", TYPE_COUNTER, S | C, NULL, NULL, false },
    [METRIC_FRAMES_RECEIVED] = { "snitun_frames_received_total",
        "Multiplexer frames received, by type.", TYPE_COUNTER, S | C, "type",
        VALUES("new", "data", "close", "ping", "pause", "resume", "unknown"), false },
    [METRIC_FRAMES_SENT] = { "snitun_frames_sent_total",
        "Multiplexer frames sent, by type.", TYPE_COUNTER, S | C, "type",
        VALUES("new", "data", "close", "ping", "pause", "resume", "unknown"), false },
    [METRIC_CHANNEL_CLOSES] = { "snitun_channel_closes_total",
        "Channels closed, by reason.", TYPE_COUNTER, S | C, "reason",
        VALUES("remote_close", "local_eof", "local_error", "connect_failed", "acl_refused",
               "overflow", "timeout", "tunnel_down", "shutdown", "other"), false },
    [METRIC_TUNNEL_CLOSES] = { "snitun_tunnel_closes_total",
        "Tunnels closed, by reason.", TYPE_COUNTER, S | C, "reason",
        VALUES("eof", "error", "bad_frame", "ping_timeout", "overflow", "replaced",
               "shutdown", "idle", "expired", "other"), false },
    [METRIC_FRAMES_DROPPED] = { "snitun_frames_dropped_total",
        "Multiplexer frames received and dropped, by reason.", TYPE_COUNTER, S | C, "reason",
        VALUES("unknown_id", "bad_new", "late"), false },
    [METRIC_TUNNEL_WRITES] = { "snitun_tunnel_writes_total",
        "Batches of frames written to tunnels (one sealed batch, one writev each); "
        "snitun_frames_sent_total divided by this is the frames per write.", TYPE_COUNTER,
        S | C, NULL, NULL, false },
    [METRIC_SPLICED] = { "snitun_spliced_bytes_total",
        "Payload bytes moved socket -> pipe -> socket by splice(2) instead of through user "
        "memory (--splice), by direction; compare with the bytes relayed.", TYPE_COUNTER,
        S | C, "direction", VALUES("from_tunnel", "to_tunnel"), false },
    [METRIC_LIMIT_REJECTS] = { "snitun_limit_rejects_total",
        "Connections or channels refused by a configured limit.", TYPE_COUNTER, S | C,
        "limit", VALUES("connections", "tunnels", "channels", "handshakes", "fds", "tunnel_queue",
                        "other"),
        false },
    [METRIC_ENGINE_INFO] = { "snitun_engine_info",
        "The I/O engine in use (value 1).", TYPE_GAUGE, S | C, "engine",
        VALUES("io_uring", "epoll"), true },
    [METRIC_SHARDS] = { "snitun_shards",
        "Shards (event loop threads) running.", TYPE_GAUGE, S | C, NULL, NULL, false },
    [METRIC_ADMIN_DROPS] = { "snitun_admin_connections_dropped_total",
        "Admin listener connections refused (connection limits) or closed at their "
        "deadline, by reason.", TYPE_COUNTER, S | C, "reason",
        VALUES("limit", "deadline", "other"), false },
    [METRIC_CLIENT_CONNECTED] = { "snitun_client_connected",
        "1 while the tunnel to the gateway is up.", TYPE_GAUGE, C, NULL, NULL, false },
    [METRIC_CLIENT_RECONNECTS] = { "snitun_client_reconnects_total",
        "Tunnel reconnection attempts.", TYPE_COUNTER, C, NULL, NULL, false },
    [METRIC_CLIENT_ENDPOINT_FAILURES] = { "snitun_client_endpoint_failures_total",
        "Channels whose connection to the local endpoint failed.", TYPE_COUNTER, C, NULL,
        NULL, false },
    [METRIC_CLIENT_ACL_REFUSED] = { "snitun_client_acl_refused_total",
        "Channels refused by the caller address access list.", TYPE_COUNTER, C, NULL, NULL,
        false },
    [METRIC_CLIENT_BYTES] = { "snitun_client_bytes_total",
        "Payload bytes relayed between the tunnel and the local endpoint.", TYPE_COUNTER, C,
        "direction", VALUES("tunnel_to_endpoint", "endpoint_to_tunnel"), false },
};

#undef S
#undef C
#undef VALUES

_Static_assert(sizeof(defs) / sizeof(defs[0]) == METRIC_COUNT,
               "core/metrics.c: one table row per enum metric_id");

struct metrics {
    unsigned nshards;
    unsigned roles;
    size_t stride;                 /* slots per shard, whole cache lines */
    unsigned ofs[METRIC_COUNT];    /* first slot of each metric */
    unsigned nvals[METRIC_COUNT];  /* slots of each metric: 1 or #values */
    uint64_t *slots;               /* nshards * stride, line-aligned */
};

static unsigned count_values(const struct metric_def *d)
{
    unsigned n = 0;

    if (d->values == NULL)
        return 1;
    while (d->values[n] != NULL)
        n++;
    return n;
}

struct metrics *metrics_new(unsigned nshards, unsigned roles)
{
    struct metrics *m;
    size_t total = 0;

    if (nshards == 0 || (m = calloc(1, sizeof(*m))) == NULL)
        return NULL;
    for (unsigned id = 0; id < METRIC_COUNT; id++) {
        m->ofs[id] = (unsigned)total;
        m->nvals[id] = count_values(&defs[id]);
        total += m->nvals[id];
    }
    m->nshards = nshards;
    m->roles = roles;
    m->stride = (total + SLOTS_PER_LINE - 1) / SLOTS_PER_LINE * SLOTS_PER_LINE;
    m->slots = aligned_alloc(CACHE_LINE, m->stride * nshards * sizeof(uint64_t));
    if (m->slots == NULL) {
        free(m);
        return NULL;
    }
    memset(m->slots, 0, m->stride * nshards * sizeof(uint64_t));
    return m;
}

void metrics_free(struct metrics *m)
{
    if (m == NULL)
        return;
    free(m->slots);
    free(m);
}

/* The slot, or NULL for an out-of-range argument (a caller bug). */
static uint64_t *slot(struct metrics *m, unsigned shard, enum metric_id id, unsigned label)
{
    bool ok = shard < m->nshards && (unsigned)id < METRIC_COUNT && label < m->nvals[id];

    assert(ok);
    if (!ok)
        return NULL;
    return &m->slots[shard * m->stride + m->ofs[id] + label];
}

/* Only the owning thread writes the slot, so load + store need no
 * read-modify-write atomic; being atomic at all keeps the concurrent
 * scrape's loads race-free. */
static void slot_add(uint64_t *p, uint64_t by)
{
    if (p != NULL)
        __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + by, __ATOMIC_RELAXED);
}

void metrics_inc(struct metrics *m, unsigned shard, enum metric_id id, uint64_t by)
{
    slot_add(slot(m, shard, id, 0), by);
}

void metrics_inc_label(struct metrics *m, unsigned shard, enum metric_id id, unsigned label,
                       uint64_t by)
{
    slot_add(slot(m, shard, id, label), by);
}

void metrics_gauge_add(struct metrics *m, unsigned shard, enum metric_id id, int64_t delta)
{
    slot_add(slot(m, shard, id, 0), (uint64_t)delta);  /* wraps: two's complement */
}

void metrics_gauge_add_label(struct metrics *m, unsigned shard, enum metric_id id,
                             unsigned label, int64_t delta)
{
    slot_add(slot(m, shard, id, label), (uint64_t)delta);
}

void metrics_gauge_set(struct metrics *m, unsigned shard, enum metric_id id, unsigned label,
                       int64_t value)
{
    uint64_t *p = slot(m, shard, id, label);

    if (p != NULL)
        __atomic_store_n(p, (uint64_t)value, __ATOMIC_RELAXED);
}

int metrics_label_index(enum metric_id id, const char *value)
{
    int other = -1;

    if ((unsigned)id >= METRIC_COUNT || defs[id].values == NULL || value == NULL)
        return -1;
    for (int i = 0; defs[id].values[i] != NULL; i++) {
        if (strcmp(defs[id].values[i], value) == 0)
            return i;
        if (strcmp(defs[id].values[i], "other") == 0)
            other = i;
    }
    return other;
}

void metrics_inc_reason(struct metrics *m, unsigned shard, enum metric_id id,
                        const char *reason, uint64_t by)
{
    int i = metrics_label_index(id, reason);

    if (i >= 0)
        metrics_inc_label(m, shard, id, (unsigned)i, by);
}

enum metrics_frame metrics_frame_index(uint8_t flow)
{
    switch (flow) {
    case FRAME_NEW: return METRICS_FRAME_NEW;
    case FRAME_DATA: return METRICS_FRAME_DATA;
    case FRAME_CLOSE: return METRICS_FRAME_CLOSE;
    case FRAME_PING: return METRICS_FRAME_PING;
    case FRAME_PAUSE: return METRICS_FRAME_PAUSE;
    case FRAME_RESUME: return METRICS_FRAME_RESUME;
    }
    return METRICS_FRAME_UNKNOWN;
}

uint64_t metrics_value(const struct metrics *m, enum metric_id id, unsigned label)
{
    uint64_t sum = 0;

    if ((unsigned)id >= METRIC_COUNT || label >= m->nvals[id])
        return 0;
    for (unsigned s = 0; s < m->nshards; s++)
        sum += __atomic_load_n(&m->slots[s * m->stride + m->ofs[id] + label],
                               __ATOMIC_RELAXED);
    return sum;
}

/* ---- rendering ---------------------------------------------------------- */

/* HELP text: backslash and newline escaped (format 0.0.4). */
static void put_help(FILE *f, const char *s)
{
    for (; *s != '\0'; s++) {
        if (*s == '\\')
            fputs("\\\\", f);
        else if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

/* Label value: backslash, double quote and newline escaped. */
static void put_label_value(FILE *f, const char *s)
{
    for (; *s != '\0'; s++) {
        if (*s == '\\' || *s == '"')
            fputc('\\', f);
        if (*s == '\n')
            fputs("\\n", f);
        else
            fputc(*s, f);
    }
}

static void put_sample(FILE *f, const struct metric_def *d, unsigned label, uint64_t v)
{
    fputs(d->name, f);
    if (d->label != NULL) {
        fprintf(f, "{%s=\"", d->label);
        put_label_value(f, d->values[label]);
        fputs("\"}", f);
    }
    if (d->type == TYPE_GAUGE)
        fprintf(f, " %" PRId64 "\n", (int64_t)v);
    else
        fprintf(f, " %" PRIu64 "\n", v);
}

static void put_metric(FILE *f, const struct metrics *m, enum metric_id id)
{
    const struct metric_def *d = &defs[id];

    fprintf(f, "# HELP %s ", d->name);
    put_help(f, d->help);
    fprintf(f, "\n# TYPE %s %s\n", d->name, d->type == TYPE_GAUGE ? "gauge" : "counter");
    for (unsigned l = 0; l < m->nvals[id]; l++) {
        uint64_t v = metrics_value(m, id, l);
        if (v != 0 || !d->hide_zero)
            put_sample(f, d, l, v);
    }
}

int metrics_render(const struct metrics *m, char **out, size_t *len)
{
    FILE *f = open_memstream(out, len);

    if (f == NULL) {
        *out = NULL;
        return -1;
    }
    for (unsigned id = 0; id < METRIC_COUNT; id++) {
        if (defs[id].roles & m->roles)
            put_metric(f, m, (enum metric_id)id);
    }
    if (ferror(f) != 0) {
        fclose(f);
        free(*out);
        *out = NULL;
        return -1;
    }
    if (fclose(f) != 0) {
        free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

void metrics_add_mux(struct metrics *m, unsigned shard, const struct mux_stats *now,
                     const struct mux_stats *then)
{
    /* mux_flow_index() and enum metrics_frame share their order */
    for (unsigned i = 0; i <= METRICS_FRAME_UNKNOWN; i++) {
        metrics_inc_label(m, shard, METRIC_FRAMES_RECEIVED, i,
                          now->frames_in[i] - then->frames_in[i]);
        metrics_inc_label(m, shard, METRIC_FRAMES_SENT, i, now->frames_out[i] - then->frames_out[i]);
    }
    metrics_inc_label(m, shard, METRIC_FRAMES_DROPPED, METRICS_DROP_UNKNOWN_ID,
                      now->dropped_unknown_id - then->dropped_unknown_id);
    metrics_inc_label(m, shard, METRIC_FRAMES_DROPPED, METRICS_DROP_BAD_NEW,
                      now->bad_new - then->bad_new);
    metrics_inc_label(m, shard, METRIC_FRAMES_DROPPED, METRICS_DROP_LATE,
                      now->dropped_late - then->dropped_late);
    metrics_inc(m, shard, METRIC_TUNNEL_WRITES, now->batches - then->batches);
    metrics_inc_label(m, shard, METRIC_SPLICED, METRICS_SPLICED_FROM_TUNNEL,
                      now->bytes_spliced_in - then->bytes_spliced_in);
    metrics_inc_label(m, shard, METRIC_SPLICED, METRICS_SPLICED_TO_TUNNEL,
                      now->bytes_spliced_out - then->bytes_spliced_out);
}

const char *metrics_channel_close_label(enum mux_reason why)
{
    switch (why) {
    case MUX_R_PEER_CLOSE: return "remote_close";
    case MUX_R_LOCAL_EOF: return "local_eof";
    case MUX_R_LOCAL_ERROR: return "local_error";
    case MUX_R_CONNECT_FAIL: return "connect_failed";
    case MUX_R_REFUSED: return "acl_refused";
    case MUX_R_QUEUE_LIMIT: return "overflow";
    case MUX_R_CHAN_IDLE: return "timeout";
    case MUX_R_TUNNEL_DOWN: return "tunnel_down";
    case MUX_R_SHUTDOWN: return "shutdown";
    default: return "other";
    }
}

const char *metrics_tunnel_close_label(enum mux_reason why)
{
    switch (why) {
    case MUX_R_PEER_EOF: return "eof";
    case MUX_R_TUNNEL_ERROR: return "error";
    case MUX_R_PROTOCOL: return "bad_frame";
    case MUX_R_PONG_TIMEOUT: return "ping_timeout";
    case MUX_R_QUEUE_LIMIT: return "overflow";
    case MUX_R_REPLACED: return "replaced";
    case MUX_R_SHUTDOWN: return "shutdown";
    case MUX_R_TUNNEL_IDLE: return "idle";
    case MUX_R_EXPIRED: return "expired";
    default: return "other";
    }
}
