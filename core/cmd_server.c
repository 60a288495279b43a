/* core/cmd_server.c - `snitun server`: flags -> struct gw_cfg -> gw_run().
 *
 * Every flag has an SNITUN_* environment variable (core/opt.h). Exit
 * status: 0 after a stop by SIGINT/SIGTERM (drained or not), 1 when the
 * gateway could not start (address in use, unreadable keys file, engine
 * refused, unknown --user), 2 on a usage error naming the flag.
 * `snitun server --version` prints the version.
 *
 * Layouts (PROTOCOL.md 1.3): --listen addresses take both kinds of
 * connection and classify them by their first bytes (single port);
 * --sni-listen takes only devices and --peer-listen only tunnels (dual
 * port). They can be mixed. With none of them, the gateway listens on
 * [::]:443, single port, dual-stack (IPv4 callers appear as IPv4).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/cmd.h"
#include "core/frame.h"
#include "core/gw.h"
#include "core/log.h"
#include "core/opt.h"
#include "io/admin.h"

#define DEFAULT_LISTEN "[::]:443"

static const struct opt_spec server_specs[] = {
    { "listen", "SNITUN_LISTEN", OPT_LIST, "ADDR:PORT",
      "single-port listener for devices and tunnels, IPv4:PORT or [IPv6]:PORT "
      "(default " DEFAULT_LISTEN " when no listener flag is given)", NULL, 0, 0 },
    { "sni-listen", "SNITUN_SNI_LISTEN", OPT_LIST, "ADDR:PORT",
      "dual-port: listener for device TLS connections only", NULL, 0, 0 },
    { "peer-listen", "SNITUN_PEER_LISTEN", OPT_LIST, "ADDR:PORT",
      "dual-port: listener for client tunnels only (never reads a PROXY header)", NULL, 0, 0 },
    { "proxy-protocol", "SNITUN_PROXY_PROTOCOL", OPT_FLAG, NULL,
      "expect an optional PROXY v1/v2 header on the TLS side (--listen, --sni-listen); "
      "only behind a trusted load balancer", "false", 0, 0 },
    { "fernet-key", "SNITUN_FERNET_KEYS", OPT_LIST, "KEY",
      "Fernet key (44 characters of URL-safe base64), tried in order", NULL, 0, 0 },
    { "fernet-keys-file", "SNITUN_FERNET_KEYS_FILE", OPT_STR, "FILE",
      "file with one Fernet key per line (# comments), after --fernet-key; re-read on SIGHUP",
      NULL, 0, 0 },
    { "threads", "SNITUN_THREADS", OPT_INT, "N",
      "shards (threads, one engine each) (default: online CPUs)", NULL, 1, 1024 },
    { "io", "SNITUN_IO", OPT_STR, "ENGINE", "auto, uring or epoll", "auto", 0, 0 },
    { "cpu-affinity", "SNITUN_CPU_AFFINITY", OPT_FLAG, NULL,
      "pin shard i to the i-th CPU the process may use", "false", 0, 0 },
    { "backlog", "SNITUN_BACKLOG", OPT_INT, "N", "listen(2) backlog, 0 = SOMAXCONN", "0", 0,
      65535 },
    { "max-handshakes", "SNITUN_MAX_HANDSHAKES", OPT_INT, "N",
      "unauthenticated connections at once, all shards; 0 = unlimited", "10000", 0, 10000000 },
    { "max-handshakes-per-ip", "SNITUN_MAX_HANDSHAKES_PER_IP", OPT_INT, "N",
      "unauthenticated connections at once per source IP and shard; 0 = unlimited", "64", 0,
      10000000 },
    { "max-channels", "SNITUN_MAX_CHANNELS", OPT_INT, "N",
      "device connections at once per tunnel; 0 = unlimited", "10000", 0, 10000000 },
    { "max-frame", "SNITUN_MAX_FRAME", OPT_INT, "BYTES",
      "largest frame SIZE accepted from a client (at least 16 MiB)", "16777216", FRAME_MAX_DATA,
      4294967295LL },
    { "max-channel-queue", "SNITUN_MAX_CHANNEL_QUEUE", OPT_INT, "BYTES",
      "bytes from a client queued for one slow device before that channel is closed; "
      "0 = PROTOCOL.md 5.2 values (64 MiB on protocol >= 1, 256 MiB on 0)", "0", 0,
      1LL << 40 },
    { "max-tunnel-queue", "SNITUN_MAX_TUNNEL_QUEUE", OPT_INT, "BYTES",
      "bytes queued for all devices of one tunnel; above it the channel holding the most is "
      "closed; 0 = no cap", "268435456", 0, 1LL << 40 },
    { "splice", "SNITUN_SPLICE", OPT_STR, "auto|on|off",
      MUX_SPLICE_HELP, "auto", 0, 0 },
    { "batch", "SNITUN_BATCH", OPT_STR, "on|off",
      MUX_BATCH_HELP, "on", 0, 0 },
    { "steer", "SNITUN_STEER", OPT_STR, "on|off",
      "send --sni-listen connections to the shards whose tunnels serve them, weighted by "
      "last second's channels (off: the kernel's hash, then a handoff)", "on", 0, 0 },
    { "handshake-timeout", "SNITUN_HANDSHAKE_TIMEOUT", OPT_INT, "SECONDS",
      "accept until the ClientHello or token is complete (PROXY header included)", "10", 1, 60 },
    { "challenge-timeout", "SNITUN_CHALLENGE_TIMEOUT", OPT_INT, "SECONDS",
      "challenge sent until the answer is read", "10", 1, 60 },
    { "tunnel-idle-timeout", "SNITUN_TUNNEL_IDLE_TIMEOUT", OPT_INT, "SECONDS",
      "close a tunnel without any frame for this long; 0 = never", "120", 0, 86400 },
    { "channel-idle-timeout", "SNITUN_CHANNEL_IDLE_TIMEOUT", OPT_INT, "SECONDS",
      "close a device connection without traffic for this long; 0 = never", "120", 0, 86400 },
    { "admin-listen", "SNITUN_ADMIN_LISTEN", OPT_STR, "ADDR:PORT",
      "serve /metrics, /healthz and /readyz here (loopback only unless "
      "--admin-public; default: off)", NULL, 0, 0 },
    { "admin-public", "SNITUN_ADMIN_PUBLIC", OPT_FLAG, NULL,
      "allow a non-loopback --admin-listen address", "false", 0, 0 },
    { "admin-allow-remote", "SNITUN_ADMIN_ALLOW_REMOTE", OPT_FLAG, NULL,
      "same as --admin-public (older name)", "false", 0, 0 },
    { "drain-timeout", "SNITUN_DRAIN_TIMEOUT", OPT_INT, "SECONDS",
      "on SIGTERM/SIGINT: stop accepting, let open channels finish for this long, then "
      "close the rest", "30", 0, 3600 },
    { "user", "SNITUN_USER", OPT_STR, "NAME",
      "drop root to this user (and its group) once the listeners are bound", NULL, 0, 0 },
    { "log-level", "SNITUN_LOG_LEVEL", OPT_STR, "LEVEL", "error, warn, info or debug", "info",
      0, 0 },
    { "log-format", "SNITUN_LOG_FORMAT", OPT_STR, "FORMAT", "logfmt or json", "logfmt", 0, 0 },
    { "log-rate", "SNITUN_LOG_RATE", OPT_INT, "N",
      "per-connection log lines per second and shard (rejections); 0 = unlimited", "100", 0,
      1000000 },
};

static const struct opt_cmd server_cmd = {
    .prog = "snitun server",
    .about = "Run the gateway: accept device TLS connections, route them by SNI name over\n"
             "the encrypted tunnel of the client that registered the name, and accept\n"
             "client tunnels (Fernet token + challenge). Signals: SIGINT/SIGTERM drain\n"
             "(listeners closed, open channels finish within --drain-timeout; a second\n"
             "signal stops at once), SIGHUP re-reads the Fernet keys, SIGUSR1 logs the\n"
             "counters. --version prints the version.",
    .specs = server_specs,
    .nspecs = sizeof(server_specs) / sizeof(server_specs[0]),
};

/* Append the addresses of one list flag. Returns 0 or 2 after a message. */
static int add_listen(const struct opt_res *res, const char *flag, enum gw_listen_kind kind,
                      struct gw_listen *out, size_t *n)
{
    size_t cnt;
    const char **items = opt_list(res, flag, &cnt);

    for (size_t i = 0; i < cnt; i++) {
        const char *why = NULL;
        if (addr_parse(items[i], &out[*n].addr, &why) != 0) {
            fprintf(stderr, "%s: --%s must be IPv4:PORT or [IPv6]:PORT, got '%s' (%s)\n",
                    res->cmd->prog, flag, items[i], why ? why : "invalid");
            return 2;
        }
        out[*n].kind = kind;
        (*n)++;
    }
    return 0;
}

static int parse_io(const char *s, enum eng_kind *k)
{
    if (!strcmp(s, "auto"))
        *k = ENG_AUTO;
    else if (!strcmp(s, "uring") || !strcmp(s, "io_uring"))
        *k = ENG_URING;
    else if (!strcmp(s, "epoll"))
        *k = ENG_EPOLL;
    else
        return -1;
    return 0;
}

/* --log-level / --log-format, applied at once (before any thread). */
static int logging_from(const struct opt_res *res)
{
    enum log_level level;
    enum log_format format;

    if (log_level_parse(opt_str(res, "log-level"), &level) != 0) {
        fprintf(stderr, "%s: --log-level must be error, warn, info or debug, got '%s'\n",
                res->cmd->prog, opt_str(res, "log-level"));
        return 2;
    }
    if (log_format_parse(opt_str(res, "log-format"), &format) != 0) {
        fprintf(stderr, "%s: --log-format must be logfmt or json, got '%s'\n", res->cmd->prog,
                opt_str(res, "log-format"));
        return 2;
    }
    log_setup(level, format, NULL);
    return 0;
}

/* --admin-listen: a loopback address unless explicitly allowed. */
static int admin_from(const struct opt_res *res, struct net_addr *a, struct gw_cfg *cfg)
{
    const char *s = opt_str(res, "admin-listen"), *why = NULL;

    if (s == NULL)
        return 0;
    if (addr_parse(s, a, &why) != 0) {
        fprintf(stderr, "%s: --admin-listen must be IPv4:PORT or [IPv6]:PORT, got '%s' (%s)\n",
                res->cmd->prog, s, why ? why : "invalid");
        return 2;
    }
    if (!admin_addr_is_loopback(a) && !opt_on(res, "admin-public") &&
        !opt_on(res, "admin-allow-remote")) {
        fprintf(stderr, "%s: --admin-listen %s is not a loopback address; add "
                "--admin-public to expose the metrics\n", res->cmd->prog, s);
        return 2;
    }
    cfg->admin = a;
    return 0;
}

static unsigned online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);

    return n < 1 ? 1 : n > 1024 ? 1024 : (unsigned)n;
}

/* Flags into cfg (listen array allocated into *listen; admin address
 * into *admin). 0 or 2. */
static int build_cfg(const struct opt_res *res, struct gw_cfg *cfg, struct gw_listen **listen,
                     struct net_addr *admin)
{
    const char *prog = res->cmd->prog;
    size_t n1, n2, n3, n = 0;
    bool on;
    static const struct gw_listen fallback = { .kind = GW_L_SINGLE };

    gw_cfg_defaults(cfg);
    opt_list(res, "listen", &n1);
    opt_list(res, "sni-listen", &n2);
    opt_list(res, "peer-listen", &n3);
    *listen = calloc(n1 + n2 + n3 + 1, sizeof(**listen));
    if (*listen == NULL)
        return 2;
    if (add_listen(res, "listen", GW_L_SINGLE, *listen, &n) != 0 ||
        add_listen(res, "sni-listen", GW_L_SNI, *listen, &n) != 0 ||
        add_listen(res, "peer-listen", GW_L_PEER, *listen, &n) != 0)
        return 2;
    if (n == 0) {
        const char *why = NULL;
        (*listen)[0] = fallback;
        addr_parse(DEFAULT_LISTEN, &(*listen)[0].addr, &why);
        n = 1;
    }
    cfg->listen = *listen;
    cfg->nlisten = n;
    if (parse_io(opt_str(res, "io"), &cfg->io) != 0) {
        fprintf(stderr, "%s: --io must be auto, uring or epoll, got '%s'\n", prog,
                opt_str(res, "io"));
        return 2;
    }
    cfg->proxy_protocol = opt_on(res, "proxy-protocol");
    cfg->cpu_affinity = opt_on(res, "cpu-affinity");
    cfg->threads = opt_get(res, "threads")->src != OPT_UNSET ? (unsigned)opt_int(res, "threads")
                                                             : online_cpus();
    cfg->backlog = (int)opt_int(res, "backlog");
    cfg->max_handshakes = (uint32_t)opt_int(res, "max-handshakes");
    cfg->max_handshakes_per_ip = (uint32_t)opt_int(res, "max-handshakes-per-ip");
    cfg->max_channels = (uint32_t)opt_int(res, "max-channels");
    cfg->max_frame = (uint32_t)opt_int(res, "max-frame");
    cfg->chan_queue = (size_t)opt_int(res, "max-channel-queue");
    cfg->tunnel_queue = (size_t)opt_int(res, "max-tunnel-queue");
    if ((cfg->chan_queue != 0 && cfg->chan_queue < GW_QUEUE_MIN) ||
        (cfg->tunnel_queue != 0 && cfg->tunnel_queue < GW_QUEUE_MIN)) {
        fprintf(stderr, "%s: --max-channel-queue and --max-tunnel-queue must be 0 or at "
                "least %u bytes (twice the PAUSE watermark)\n", prog, GW_QUEUE_MIN);
        return 2;
    }
    if (mux_splice_parse(opt_str(res, "splice"), &cfg->splice) != 0) {
        fprintf(stderr, "%s: --splice must be auto, on or off, got '%s'\n", prog,
                opt_str(res, "splice"));
        return 2;
    }
    if (opt_parse_bool(opt_str(res, "batch"), &on) != 0) {
        fprintf(stderr, "%s: --batch must be on or off, got '%s'\n", prog,
                opt_str(res, "batch"));
        return 2;
    }
    cfg->no_batch = !on;
    if (opt_parse_bool(opt_str(res, "steer"), &on) != 0) {
        fprintf(stderr, "%s: --steer must be on or off, got '%s'\n", prog,
                opt_str(res, "steer"));
        return 2;
    }
    cfg->steer = on;
    cfg->handshake_ms = (uint32_t)opt_int(res, "handshake-timeout") * 1000u;
    cfg->challenge_ms = (uint32_t)opt_int(res, "challenge-timeout") * 1000u;
    cfg->tunnel_idle_ms = (uint32_t)opt_int(res, "tunnel-idle-timeout") * 1000u;
    cfg->chan_idle_ms = (uint32_t)opt_int(res, "channel-idle-timeout") * 1000u;
    cfg->log_rate = (unsigned)opt_int(res, "log-rate");
    cfg->keys = opt_list(res, "fernet-key", &cfg->nkeys);
    cfg->keys_file = opt_str(res, "fernet-keys-file");
    cfg->drain_ms = (uint32_t)opt_int(res, "drain-timeout") * 1000u;
    cfg->user = opt_str(res, "user");
    if (cfg->user != NULL && cfg->user[0] == '\0') {
        fprintf(stderr, "%s: --user must name a user\n", prog);
        return 2;
    }
    return admin_from(res, admin, cfg);
}

/* `snitun server --version`: print it before any flag is checked (the
 * option table has no --version, so its SNITUN_* variable cannot turn a
 * deployment into a version print). Not after "--". */
static bool want_version(int argc, char **argv)
{
    for (int i = 1; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (!strcmp(argv[i], "--version")) {
            printf("snitun %s\n", SNITUN_VERSION);
            return true;
        }
    }
    return false;
}

int cmd_server(int argc, char **argv)
{
    struct opt_res res;
    struct gw_cfg cfg;
    struct gw_listen *listen = NULL;
    struct net_addr admin;
    struct gw *g;
    char err[512];
    bool usage = false;
    int rc;

    if (want_version(argc, argv))
        return 0;
    rc = opt_parse_main(&server_cmd, argc, argv, &res);

    if (rc >= 0)
        return rc;
    rc = logging_from(&res);
    if (rc == 0)
        rc = build_cfg(&res, &cfg, &listen, &admin);
    if (rc != 0)
        goto out;
    g = gw_new(&cfg, err, sizeof(err), &usage);
    if (g == NULL) {
        fprintf(stderr, "%s: %s\n", server_cmd.prog, err);
        rc = usage ? 2 : 1;
        goto out;
    }
    rc = gw_run(g);
    gw_free(g);
out:
    free(listen);
    opt_fini(&res);
    return rc;
}
