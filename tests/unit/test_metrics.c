/* tests/unit/test_metrics.c - core/metrics: per-shard sums, labels, the
 * exact Prometheus text, the label names shared with the parsers, and a
 * scrape running while two shard threads count.
 */
#include <criterion/criterion.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/frame.h"
#include "core/metrics.h"
#include "core/proxy.h"
#include "core/sni.h"
#include "core/token.h"

static struct metrics *m;

static void setup_client(void)
{
    m = metrics_new(2, METRICS_CLIENT);
    cr_assert_not_null(m);
}

static void setup_server(void)
{
    m = metrics_new(2, METRICS_SERVER);
    cr_assert_not_null(m);
}

static void teardown(void)
{
    metrics_free(m);
}

static char *render(size_t *len)
{
    char *out = NULL;
    cr_assert_eq(metrics_render(m, &out, len), 0);
    cr_assert_not_null(out);
    cr_assert_eq(strlen(out), *len);
    return out;
}

/* ---- sums over shards --------------------------------------------------- */

Test(metrics, counters_sum_shards, .init = setup_server, .fini = teardown)
{
    metrics_inc(m, 0, METRIC_TUNNELS_TOTAL, 3);
    metrics_inc(m, 1, METRIC_TUNNELS_TOTAL, 4);
    metrics_inc(m, 1, METRIC_TUNNELS_TOTAL, 1);
    cr_assert_eq(metrics_value(m, METRIC_TUNNELS_TOTAL, 0), 8);
    cr_assert_eq(metrics_value(m, METRIC_HANDOFFS, 0), 0);
    /* counters wrap like the uint64_t they are */
    metrics_inc(m, 0, METRIC_HANDOFFS, UINT64_MAX);
    metrics_inc(m, 1, METRIC_HANDOFFS, 2);
    cr_assert_eq(metrics_value(m, METRIC_HANDOFFS, 0), 1);
}

Test(metrics, gauges_sum_shards, .init = setup_server, .fini = teardown)
{
    metrics_gauge_add(m, 0, METRIC_CHANNELS_OPEN, 5);
    metrics_gauge_add(m, 1, METRIC_CHANNELS_OPEN, -2);
    cr_assert_eq((int64_t)metrics_value(m, METRIC_CHANNELS_OPEN, 0), 3);
    metrics_gauge_add(m, 0, METRIC_CHANNELS_OPEN, -6);
    cr_assert_eq((int64_t)metrics_value(m, METRIC_CHANNELS_OPEN, 0), -3);
    metrics_gauge_set(m, 0, METRIC_SHARDS, 0, 2);
    metrics_gauge_set(m, 0, METRIC_SHARDS, 0, 4);
    cr_assert_eq(metrics_value(m, METRIC_SHARDS, 0), 4);
}

Test(metrics, labels, .init = setup_server, .fini = teardown)
{
    metrics_inc_label(m, 0, METRIC_BYTES, METRICS_DEVICE_TO_TUNNEL, 100);
    metrics_inc_label(m, 1, METRIC_BYTES, METRICS_DEVICE_TO_TUNNEL, 1);
    metrics_inc_label(m, 1, METRIC_BYTES, METRICS_TUNNEL_TO_DEVICE, 50);
    cr_assert_eq(metrics_value(m, METRIC_BYTES, METRICS_DEVICE_TO_TUNNEL), 101);
    cr_assert_eq(metrics_value(m, METRIC_BYTES, METRICS_TUNNEL_TO_DEVICE), 50);
    metrics_inc_reason(m, 0, METRIC_SNI_REJECTS, "no_name", 1);
    metrics_inc_reason(m, 1, METRIC_SNI_REJECTS, "no_name", 2);
    metrics_inc_reason(m, 1, METRIC_SNI_REJECTS, "made_up", 5);
    cr_assert_eq(metrics_value(m, METRIC_SNI_REJECTS, SNI_R_NO_NAME - 1), 3);
    cr_assert_eq(metrics_value(m, METRIC_SNI_REJECTS,
                               (unsigned)metrics_label_index(METRIC_SNI_REJECTS, "other")), 5);
    /* a metric without a label takes no reason */
    metrics_inc_reason(m, 0, METRIC_TUNNELS_TOTAL, "other", 1);
    cr_assert_eq(metrics_value(m, METRIC_TUNNELS_TOTAL, 0), 0);
    /* out of range reads give 0 */
    cr_assert_eq(metrics_value(m, METRIC_BYTES, 2), 0);
    cr_assert_eq(metrics_value(m, METRIC_COUNT, 0), 0);
}

Test(metrics, bad_arguments)
{
    cr_assert_null(metrics_new(0, METRICS_SERVER));
    metrics_free(NULL);
}

#ifdef NDEBUG
Test(metrics, out_of_range_ignored, .init = setup_server, .fini = teardown)
{
    metrics_inc(m, 2, METRIC_TUNNELS_TOTAL, 1);
    metrics_inc_label(m, 0, METRIC_BYTES, 2, 1);
    metrics_inc(m, 0, METRIC_COUNT, 1);
    cr_assert_eq(metrics_value(m, METRIC_TUNNELS_TOTAL, 0), 0);
    cr_assert_eq(metrics_value(m, METRIC_BYTES, 0), 0);
    cr_assert_eq(metrics_value(m, METRIC_BYTES, 1), 0);
    cr_assert_eq(metrics_value(m, METRIC_CHANNELS_OPEN, 0), 0);
}
#else
Test(metrics, out_of_range_shard_asserts, .init = setup_server, .fini = teardown,
     .signal = SIGABRT)
{
    metrics_inc(m, 2, METRIC_TUNNELS_TOTAL, 1);
}

Test(metrics, out_of_range_label_asserts, .init = setup_server, .fini = teardown,
     .signal = SIGABRT)
{
    metrics_inc_label(m, 0, METRIC_BYTES, 2, 1);
}
#endif

/* ---- label names -------------------------------------------------------- */

Test(metrics, label_index)
{
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, "ok"), METRICS_HANDSHAKE_OK);
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, "bad_mac"), 4);
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, "gcm_key_reused"), 14);
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, "other"), 15);
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, "nonsense"), 15);
    cr_assert_eq(metrics_label_index(METRIC_TUNNELS_BY_VERSION, "2"), 2);
    cr_assert_eq(metrics_label_index(METRIC_TUNNELS_BY_VERSION, "7"), 3);
    cr_assert_eq(metrics_label_index(METRIC_TUNNELS_BY_CIPHER, "aes-gcm"), 1);
    cr_assert_eq(metrics_label_index(METRIC_ACCEPTED, "peer"), METRICS_LISTENER_PEER);
    cr_assert_eq(metrics_label_index(METRIC_ACCEPTED, "sni"), METRICS_LISTENER_SNI);
    cr_assert_eq(metrics_label_index(METRIC_ACCEPTED, "single"), METRICS_LISTENER_SINGLE);
    cr_assert_eq(metrics_label_index(METRIC_FRAMES_DROPPED, "bad_new"), METRICS_DROP_BAD_NEW);
    cr_assert_eq(metrics_label_index(METRIC_FRAMES_DROPPED, "unknown_id"),
                 METRICS_DROP_UNKNOWN_ID);
    cr_assert_eq(metrics_label_index(METRIC_KEY_RELOADS, "error"), METRICS_RELOAD_ERROR);
    cr_assert_eq(metrics_label_index(METRIC_KEY_RELOADS, "ok"), METRICS_RELOAD_OK);
    cr_assert_eq(metrics_label_index(METRIC_TUNNEL_CLOSES, "idle"), 7);
    cr_assert_eq(metrics_label_index(METRIC_TUNNEL_CLOSES, "expired"), 8);
    cr_assert_eq(metrics_label_index(METRIC_DROPS, "gcm_key_reused"), 15);
    cr_assert_eq(metrics_label_index(METRIC_DROPS, "whatever"), 16);
    cr_assert_eq(metrics_label_index(METRIC_BYTES, "device_to_tunnel"),
                 METRICS_DEVICE_TO_TUNNEL);
    cr_assert_eq(metrics_label_index(METRIC_BYTES, "tunnel_to_device"),
                 METRICS_TUNNEL_TO_DEVICE);
    cr_assert_eq(metrics_label_index(METRIC_BYTES, "sideways"), -1);   /* no "other" */
    cr_assert_eq(metrics_label_index(METRIC_CLIENT_BYTES, "tunnel_to_endpoint"),
                 METRICS_TUNNEL_TO_ENDPOINT);
    cr_assert_eq(metrics_label_index(METRIC_CLIENT_BYTES, "endpoint_to_tunnel"),
                 METRICS_ENDPOINT_TO_TUNNEL);
    cr_assert_eq(metrics_label_index(METRIC_ENGINE_INFO, "io_uring"), METRICS_ENGINE_URING);
    cr_assert_eq(metrics_label_index(METRIC_ENGINE_INFO, "epoll"), METRICS_ENGINE_EPOLL);
    cr_assert_eq(metrics_label_index(METRIC_TUNNELS_TOTAL, "ok"), -1);   /* no label */
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, NULL), -1);
    cr_assert_eq(metrics_label_index(METRIC_COUNT, "ok"), -1);

    const char *frames[] = { "new", "data", "close", "ping", "pause", "resume", "unknown" };
    for (int i = 0; i < 7; i++) {
        cr_assert_eq(metrics_label_index(METRIC_FRAMES_RECEIVED, frames[i]), i);
        cr_assert_eq(metrics_label_index(METRIC_FRAMES_SENT, frames[i]), i);
    }
}

/* The reason names are the parsers' own tokens: a caller passes
 * sni_reason_name(), pp_reason_name() or token_strerror() as is. */
Test(metrics, names_shared_with_parsers)
{
    for (int r = SNI_R_NOT_TLS; r < SNI_R_COUNT; r++)
        cr_assert_eq(metrics_label_index(METRIC_SNI_REJECTS, sni_reason_name(r)), r - 1,
                     "sni %s", sni_reason_name(r));
    for (int r = PP_R_V1_NO_CRLF; r < PP_R_COUNT; r++)
        cr_assert_eq(metrics_label_index(METRIC_PROXY_REJECTS, pp_reason_name(r)), r - 1,
                     "proxy %s", pp_reason_name(r));
    const enum token_err tok[] = { TOKEN_BAD_BASE64, TOKEN_BAD_LENGTH, TOKEN_BAD_VERSION,
                                   TOKEN_BAD_MAC, TOKEN_BAD_PADDING };
    for (int i = 0; i < 5; i++)
        cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, token_strerror(tok[i])), i + 1);
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, token_strerror(TOKEN_NOT_JSON)), 6);
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, token_strerror(TOKEN_EXPIRED)), 8);
    cr_assert_eq(metrics_label_index(METRIC_HANDSHAKES, token_strerror(TOKEN_CIPHER)), 9);
}

Test(metrics, frame_index)
{
    cr_assert_eq(metrics_frame_index(FRAME_NEW), METRICS_FRAME_NEW);
    cr_assert_eq(metrics_frame_index(FRAME_DATA), METRICS_FRAME_DATA);
    cr_assert_eq(metrics_frame_index(FRAME_CLOSE), METRICS_FRAME_CLOSE);
    cr_assert_eq(metrics_frame_index(FRAME_PING), METRICS_FRAME_PING);
    cr_assert_eq(metrics_frame_index(FRAME_PAUSE), METRICS_FRAME_PAUSE);
    cr_assert_eq(metrics_frame_index(FRAME_RESUME), METRICS_FRAME_RESUME);
    const uint8_t other[] = { 0x00, 0x03, 0x10, 0x20, 0x33, 0xff };
    for (size_t i = 0; i < sizeof(other); i++)
        cr_assert_eq(metrics_frame_index(other[i]), METRICS_FRAME_UNKNOWN);
}

/* ---- rendering ---------------------------------------------------------- */

static const char client_text[] =
    "# HELP snitun_channels_open Channels currently open.\n"
    "# TYPE snitun_channels_open gauge\n"
    "snitun_channels_open 2\n"
    "# HELP snitun_channels_opened_total Channels opened.\n"
    "# TYPE snitun_channels_opened_total counter\n"
    "snitun_channels_opened_total 11\n"
    "# HELP snitun_frames_received_total Multiplexer frames received, by type.\n"
    "# TYPE snitun_frames_received_total counter\n"
    "snitun_frames_received_total{type=\"new\"} 0\n"
    "snitun_frames_received_total{type=\"data\"} 7\n"
    "snitun_frames_received_total{type=\"close\"} 0\n"
    "snitun_frames_received_total{type=\"ping\"} 0\n"
    "snitun_frames_received_total{type=\"pause\"} 0\n"
    "snitun_frames_received_total{type=\"resume\"} 0\n"
    "snitun_frames_received_total{type=\"unknown\"} 1\n"
    "# HELP snitun_frames_sent_total Multiplexer frames sent, by type.\n"
    "# TYPE snitun_frames_sent_total counter\n"
    "snitun_frames_sent_total{type=\"new\"} 0\n"
    "snitun_frames_sent_total{type=\"data\"} 0\n"
    "snitun_frames_sent_total{type=\"close\"} 0\n"
    "snitun_frames_sent_total{type=\"ping\"} 2\n"
    "snitun_frames_sent_total{type=\"pause\"} 0\n"
    "snitun_frames_sent_total{type=\"resume\"} 0\n"
    "snitun_frames_sent_total{type=\"unknown\"} 0\n"
    "# HELP snitun_channel_closes_total Channels closed, by reason.\n"
    "# TYPE snitun_channel_closes_total counter\n"
    "snitun_channel_closes_total{reason=\"remote_close\"} 1\n"
    "snitun_channel_closes_total{reason=\"local_eof\"} 0\n"
    "snitun_channel_closes_total{reason=\"local_error\"} 0\n"
    "snitun_channel_closes_total{reason=\"connect_failed\"} 0\n"
    "snitun_channel_closes_total{reason=\"acl_refused\"} 0\n"
    "snitun_channel_closes_total{reason=\"overflow\"} 0\n"
    "snitun_channel_closes_total{reason=\"timeout\"} 0\n"
    "snitun_channel_closes_total{reason=\"tunnel_down\"} 0\n"
    "snitun_channel_closes_total{reason=\"shutdown\"} 0\n"
    "snitun_channel_closes_total{reason=\"other\"} 1\n"
    "# HELP snitun_tunnel_closes_total Tunnels closed, by reason.\n"
    "# TYPE snitun_tunnel_closes_total counter\n"
    "snitun_tunnel_closes_total{reason=\"eof\"} 1\n"
    "snitun_tunnel_closes_total{reason=\"error\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"bad_frame\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"ping_timeout\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"overflow\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"replaced\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"shutdown\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"idle\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"expired\"} 0\n"
    "snitun_tunnel_closes_total{reason=\"other\"} 0\n"
    "# HELP snitun_frames_dropped_total Multiplexer frames received and dropped, by reason.\n"
    "# TYPE snitun_frames_dropped_total counter\n"
    "snitun_frames_dropped_total{reason=\"unknown_id\"} 0\n"
    "snitun_frames_dropped_total{reason=\"bad_new\"} 3\n"
    "snitun_frames_dropped_total{reason=\"late\"} 5\n"
    "# HELP snitun_tunnel_writes_total Batches of frames written to tunnels (one sealed batch, "
    "one writev each); snitun_frames_sent_total divided by this is the frames per write.\n"
    "# TYPE snitun_tunnel_writes_total counter\n"
    "snitun_tunnel_writes_total 0\n"
    "# HELP snitun_spliced_bytes_total Payload bytes moved socket -> pipe -> socket by "
    "splice(2) instead of through user memory (--splice), by direction; compare with the "
    "bytes relayed.\n"
    "# TYPE snitun_spliced_bytes_total counter\n"
    "snitun_spliced_bytes_total{direction=\"from_tunnel\"} 9\n"
    "snitun_spliced_bytes_total{direction=\"to_tunnel\"} 0\n"
    "# HELP snitun_limit_rejects_total Connections or channels refused by a configured limit.\n"
    "# TYPE snitun_limit_rejects_total counter\n"
    "snitun_limit_rejects_total{limit=\"connections\"} 0\n"
    "snitun_limit_rejects_total{limit=\"tunnels\"} 0\n"
    "snitun_limit_rejects_total{limit=\"channels\"} 0\n"
    "snitun_limit_rejects_total{limit=\"handshakes\"} 0\n"
    "snitun_limit_rejects_total{limit=\"fds\"} 0\n"
    "snitun_limit_rejects_total{limit=\"tunnel_queue\"} 0\n"
    "snitun_limit_rejects_total{limit=\"other\"} 0\n"
    "# HELP snitun_engine_info The I/O engine in use (value 1).\n"
    "# TYPE snitun_engine_info gauge\n"
    "snitun_engine_info{engine=\"epoll\"} 1\n"
    "# HELP snitun_shards Shards (event loop threads) running.\n"
    "# TYPE snitun_shards gauge\n"
    "snitun_shards 2\n"
    "# HELP snitun_admin_connections_dropped_total Admin listener connections refused "
    "(connection limits) or closed at their deadline, by reason.\n"
    "# TYPE snitun_admin_connections_dropped_total counter\n"
    "snitun_admin_connections_dropped_total{reason=\"limit\"} 0\n"
    "snitun_admin_connections_dropped_total{reason=\"deadline\"} 7\n"
    "snitun_admin_connections_dropped_total{reason=\"other\"} 0\n"
    "# HELP snitun_client_connected 1 while the tunnel to the gateway is up.\n"
    "# TYPE snitun_client_connected gauge\n"
    "snitun_client_connected 1\n"
    "# HELP snitun_client_reconnects_total Tunnel reconnection attempts.\n"
    "# TYPE snitun_client_reconnects_total counter\n"
    "snitun_client_reconnects_total 4\n"
    "# HELP snitun_client_endpoint_failures_total Channels whose connection to the local "
    "endpoint failed.\n"
    "# TYPE snitun_client_endpoint_failures_total counter\n"
    "snitun_client_endpoint_failures_total 0\n"
    "# HELP snitun_client_acl_refused_total Channels refused by the caller address access "
    "list.\n"
    "# TYPE snitun_client_acl_refused_total counter\n"
    "snitun_client_acl_refused_total 0\n"
    "# HELP snitun_client_bytes_total Payload bytes relayed between the tunnel and the local "
    "endpoint.\n"
    "# TYPE snitun_client_bytes_total counter\n"
    "snitun_client_bytes_total{direction=\"tunnel_to_endpoint\"} 1024\n"
    "snitun_client_bytes_total{direction=\"endpoint_to_tunnel\"} 0\n";

Test(metrics, render_client_exact, .init = setup_client, .fini = teardown)
{
    metrics_gauge_add(m, 0, METRIC_CHANNELS_OPEN, 3);
    metrics_gauge_add(m, 1, METRIC_CHANNELS_OPEN, -1);
    metrics_inc(m, 0, METRIC_CHANNELS_OPENED, 5);
    metrics_inc(m, 1, METRIC_CHANNELS_OPENED, 6);
    metrics_inc_label(m, 0, METRIC_FRAMES_RECEIVED, metrics_frame_index(FRAME_DATA), 7);
    metrics_inc_label(m, 1, METRIC_FRAMES_RECEIVED, metrics_frame_index(0x40), 1);
    metrics_inc_label(m, 1, METRIC_FRAMES_SENT, METRICS_FRAME_PING, 2);
    metrics_inc_reason(m, 0, METRIC_CHANNEL_CLOSES, "remote_close", 1);
    metrics_inc_reason(m, 1, METRIC_CHANNEL_CLOSES, "bogus", 1);
    metrics_inc_reason(m, 1, METRIC_TUNNEL_CLOSES, "eof", 1);
    metrics_inc_label(m, 1, METRIC_FRAMES_DROPPED, METRICS_DROP_BAD_NEW, 3);
    metrics_inc_label(m, 0, METRIC_FRAMES_DROPPED, METRICS_DROP_LATE, 5);
    metrics_inc_label(m, 0, METRIC_SPLICED, METRICS_SPLICED_FROM_TUNNEL, 4);
    metrics_inc_label(m, 1, METRIC_SPLICED, METRICS_SPLICED_FROM_TUNNEL, 5);
    metrics_gauge_set(m, 0, METRIC_ENGINE_INFO, METRICS_ENGINE_EPOLL, 1);
    metrics_gauge_set(m, 0, METRIC_SHARDS, 0, 2);
    metrics_inc_reason(m, 1, METRIC_ADMIN_DROPS, "deadline", 7);
    metrics_gauge_set(m, 0, METRIC_CLIENT_CONNECTED, 0, 1);
    metrics_inc(m, 0, METRIC_CLIENT_RECONNECTS, 4);
    metrics_inc_label(m, 0, METRIC_CLIENT_BYTES, METRICS_TUNNEL_TO_ENDPOINT, 1000);
    metrics_inc_label(m, 1, METRIC_CLIENT_BYTES, METRICS_TUNNEL_TO_ENDPOINT, 24);

    size_t len;
    char *out = render(&len);
    cr_assert_str_eq(out, client_text);
    cr_assert_eq(len, sizeof(client_text) - 1);
    free(out);
}

static const char server_blocks[][800] = {
    "# HELP snitun_tunnels_connected Tunnels currently connected.\n"
    "# TYPE snitun_tunnels_connected gauge\n"
    "snitun_tunnels_connected -1\n",
    "# HELP snitun_handshakes_total Tunnel handshakes, by result.\n"
    "# TYPE snitun_handshakes_total counter\n"
    "snitun_handshakes_total{result=\"ok\"} 9\n"
    "snitun_handshakes_total{result=\"bad_base64\"} 0\n"
    "snitun_handshakes_total{result=\"bad_length\"} 0\n"
    "snitun_handshakes_total{result=\"bad_version\"} 0\n"
    "snitun_handshakes_total{result=\"bad_mac\"} 2\n",
    "snitun_bytes_total{direction=\"device_to_tunnel\"} 18446744073709551615\n"
    "snitun_bytes_total{direction=\"tunnel_to_device\"} 0\n"
    "# HELP snitun_tunnels_connected_by_version ",
    "snitun_fernet_keys 0\n"
    "# HELP snitun_channels_open Channels currently open.\n",
    "# HELP snitun_engine_info The I/O engine in use (value 1).\n"
    "# TYPE snitun_engine_info gauge\n"
    "# HELP snitun_shards Shards (event loop threads) running.\n"
    "# TYPE snitun_shards gauge\n"
    "snitun_shards 0\n",
    "# HELP snitun_tunnels_connected_by_version Tunnels currently connected, by multiplexer "
    "protocol version.\n"
    "# TYPE snitun_tunnels_connected_by_version gauge\n"
    "snitun_tunnels_connected_by_version{version=\"0\"} 0\n"
    "snitun_tunnels_connected_by_version{version=\"1\"} 0\n"
    "snitun_tunnels_connected_by_version{version=\"2\"} 3\n"
    "snitun_tunnels_connected_by_version{version=\"other\"} 0\n"
    "# HELP snitun_tunnels_connected_by_cipher Tunnels currently connected, by tunnel cipher.\n"
    "# TYPE snitun_tunnels_connected_by_cipher gauge\n"
    "snitun_tunnels_connected_by_cipher{cipher=\"aes-cbc\"} 0\n"
    "snitun_tunnels_connected_by_cipher{cipher=\"aes-gcm\"} -2\n",
    "snitun_connections_dropped_total{reason=\"gcm_key_reused\"} 1\n"
    "snitun_connections_dropped_total{reason=\"other\"} 0\n"
    "# HELP snitun_draining 1 while the gateway drains after SIGTERM/SIGINT (listeners "
    "closed).\n",
};

Test(metrics, render_server, .init = setup_server, .fini = teardown)
{
    metrics_gauge_add(m, 1, METRIC_TUNNELS_CONNECTED, -1);
    metrics_inc_label(m, 0, METRIC_HANDSHAKES, METRICS_HANDSHAKE_OK, 4);
    metrics_inc_label(m, 1, METRIC_HANDSHAKES, METRICS_HANDSHAKE_OK, 5);
    metrics_inc_reason(m, 1, METRIC_HANDSHAKES, "bad_mac", 2);
    metrics_inc_label(m, 0, METRIC_BYTES, METRICS_DEVICE_TO_TUNNEL, UINT64_MAX);
    metrics_gauge_add_label(m, 0, METRIC_TUNNELS_BY_VERSION, 2, 5);
    metrics_gauge_add_label(m, 1, METRIC_TUNNELS_BY_VERSION, 2, -2);
    metrics_gauge_add_label(m, 1, METRIC_TUNNELS_BY_CIPHER, 1, -2);
    metrics_inc_reason(m, 1, METRIC_DROPS, "gcm_key_reused", 1);

    size_t len;
    char *out = render(&len);
    for (size_t i = 0; i < sizeof(server_blocks) / sizeof(server_blocks[0]); i++)
        cr_assert_not_null(strstr(out, server_blocks[i]), "block %zu in:\n%s", i, out);
    cr_assert_null(strstr(out, "snitun_client"));
    cr_assert_null(strstr(out, "engine_info{"));   /* info rows at 0 are hidden */
    cr_assert_eq(strncmp(out, "# HELP snitun_tunnels_connected ", 32), 0);
    /* 26 server + shared metrics, 2 comment lines each */
    size_t help = 0, type = 0;
    for (const char *p = out; (p = strstr(p, "\n# HELP ")) != NULL; p++)
        help++;
    for (const char *p = out; (p = strstr(p, "\n# TYPE ")) != NULL; p++)
        type++;
    cr_assert_eq(help + 1, 27);
    cr_assert_eq(type, 27);
    cr_assert_eq(out[len - 1], '\n');
    free(out);
}

Test(metrics, render_both_roles)
{
    m = metrics_new(1, METRICS_SERVER | METRICS_CLIENT);
    size_t len;
    char *out = render(&len);
    size_t help = 0;
    for (const char *p = out; (p = strstr(p, "# HELP ")) != NULL; p++)
        help++;
    cr_assert_eq(help, METRIC_COUNT);
    free(out);
    metrics_free(m);
}

/* ---- concurrency -------------------------------------------------------- */

#define ROUNDS 1000000

struct shard_arg {
    unsigned shard;
};

static void *count(void *arg)
{
    const struct shard_arg *a = arg;
    for (int i = 0; i < ROUNDS; i++) {
        metrics_inc(m, a->shard, METRIC_CHANNELS_OPENED, 1);
        metrics_inc_label(m, a->shard, METRIC_BYTES, METRICS_TUNNEL_TO_DEVICE, 3);
    }
    return NULL;
}

/* Two shard threads count while this thread scrapes: sums only grow, and
 * end exact. */
Test(metrics, scrape_while_counting, .init = setup_server, .fini = teardown, .timeout = 60)
{
    struct shard_arg args[2] = { { 0 }, { 1 } };
    pthread_t th[2];
    uint64_t last = 0;

    for (int i = 0; i < 2; i++)
        cr_assert_eq(pthread_create(&th[i], NULL, count, &args[i]), 0);
    for (int i = 0; i < 200; i++) {
        uint64_t v = metrics_value(m, METRIC_CHANNELS_OPENED, 0);
        cr_assert_geq(v, last);
        last = v;
        size_t len;
        free(render(&len));
    }
    for (int i = 0; i < 2; i++)
        pthread_join(th[i], NULL);
    cr_assert_eq(metrics_value(m, METRIC_CHANNELS_OPENED, 0), 2 * ROUNDS);
    cr_assert_eq(metrics_value(m, METRIC_BYTES, METRICS_TUNNEL_TO_DEVICE), 6ull * ROUNDS);
}
