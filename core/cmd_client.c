/* core/cmd_client.c - `snitun client`: flags -> struct client_cfg ->
 * client_run (core/client.h).
 *
 * Exit status: 0 after SIGINT/SIGTERM, 1 when the engine cannot start,
 * 2 for a usage error (the message names the flag). `snitun client
 * --version` prints the version. Runtime failures
 * (gateway unreachable, token refused, endpoint down) are logged and
 * retried, never fatal.
 */
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/acl.h"
#include "core/client.h"
#include "core/cmd.h"
#include "core/log.h"
#include "core/opt.h"
#include "core/tokensrc.h"
#include "io/admin.h"

#define DAY_S 86400

static const struct opt_spec client_specs[] = {
    { "server", "SNITUN_CLIENT_SERVER", OPT_STR, "HOST:PORT",
      "the gateway's tunnel port: a name, an IPv4 address or [IPv6] (required)",
      NULL, 0, 0 },
    { "endpoint", "SNITUN_CLIENT_ENDPOINT", OPT_STR, "HOST:PORT",
      "where every channel is connected, unless a --route matches (required)", NULL, 0, 0 },
    { "route", "SNITUN_CLIENT_ROUTES", OPT_LIST, "NAME=HOST:PORT",
      "connect channels whose TLS SNI is NAME (case-insensitive) to HOST:PORT", NULL, 0, 0 },
    { "token", "SNITUN_CLIENT_TOKEN", OPT_STR, "TOKEN",
      "the Fernet token, with --aes-key and --aes-iv (protocol 0 and aes-cbc unless "
      "--protocol-version/--cipher say otherwise)", NULL, 0, 0 },
    { "aes-key", "SNITUN_CLIENT_AES_KEY", OPT_STR, "HEX", "tunnel key of --token (16/24/32 bytes)",
      NULL, 0, 0 },
    { "aes-iv", "SNITUN_CLIENT_AES_IV", OPT_STR, "HEX", "tunnel IV of --token (16 bytes)",
      NULL, 0, 0 },
    { "token-file", "SNITUN_CLIENT_TOKEN_FILE", OPT_STR, "FILE",
      "the JSON of `snitun token issue`, re-read before every connection", NULL, 0, 0 },
    { "token-command", "SNITUN_CLIENT_TOKEN_COMMAND", OPT_STR, "CMD",
      "/bin/sh -c CMD prints that JSON; run before every connection", NULL, 0, 0 },
    { "token-command-timeout", "SNITUN_CLIENT_TOKEN_COMMAND_TIMEOUT", OPT_INT, "SECONDS",
      "deadline for --token-command", "30", 1, 3600 },
    { "protocol-version", "SNITUN_CLIENT_PROTOCOL_VERSION", OPT_INT, "N",
      "multiplexer protocol version; overrides the token JSON's", NULL, 0, 2 },
    { "cipher", "SNITUN_CLIENT_CIPHER", OPT_STR, "NAME",
      "aes-cbc, aes-gcm or aes-gcm-siv; overrides the token JSON's", NULL, 0, 0 },
    { "allow", "SNITUN_CLIENT_ALLOW", OPT_LIST, "CIDR",
      "accept channels only from callers in CIDR (not with --block)", NULL, 0, 0 },
    { "block", "SNITUN_CLIENT_BLOCK", OPT_LIST, "CIDR",
      "refuse channels from callers in CIDR (not with --allow)", NULL, 0, 0 },
    { "endpoint-proxy-protocol", "SNITUN_CLIENT_ENDPOINT_PROXY_PROTOCOL", OPT_STR, "none|v1|v2",
      "send a PROXY header with the caller's address to the endpoint", "none", 0, 0 },
    { "connect-timeout", "SNITUN_CLIENT_CONNECT_TIMEOUT", OPT_INT, "SECONDS",
      "deadline for the gateway's TCP connect, the token write, the challenge and the "
      "first pong", "10", 1, 3600 },
    { "endpoint-timeout", "SNITUN_CLIENT_ENDPOINT_TIMEOUT", OPT_INT, "SECONDS",
      "deadline for connecting a channel to its endpoint", "10", 1, 3600 },
    { "backoff-min", "SNITUN_CLIENT_BACKOFF_MIN", OPT_INT, "SECONDS",
      "first reconnect delay bound; doubles per failure (full jitter)", "1", 1, DAY_S },
    { "backoff-max", "SNITUN_CLIENT_BACKOFF_MAX", OPT_INT, "SECONDS",
      "largest reconnect delay bound", "300", 1, DAY_S },
    { "ping-interval", "SNITUN_CLIENT_PING_INTERVAL", OPT_INT, "SECONDS",
      "ping the gateway this often (below its 90 s idle timer)", "50", 1, 89 },
    { "pong-timeout", "SNITUN_CLIENT_PONG_TIMEOUT", OPT_INT, "SECONDS",
      "close the tunnel when a ping gets no reply in time", "90", 1, 3600 },
    { "splice", "SNITUN_CLIENT_SPLICE", OPT_STR, "auto|on|off",
      MUX_SPLICE_HELP, "auto", 0, 0 },
    { "batch", "SNITUN_CLIENT_BATCH", OPT_STR, "on|off",
      MUX_BATCH_HELP, "on", 0, 0 },
    { "io", "SNITUN_IO", OPT_STR, "auto|uring|epoll",
      "I/O engine; the client runs one engine on one thread", "auto", 0, 0 },
    { "admin-listen", "SNITUN_CLIENT_ADMIN_LISTEN", OPT_STR, "ADDR:PORT",
      "serve /metrics, /healthz and /readyz (ready while the tunnel is up) here; loopback "
      "only unless --admin-public (default: off)", NULL, 0, 0 },
    { "admin-public", "SNITUN_CLIENT_ADMIN_PUBLIC", OPT_FLAG, NULL,
      "allow a non-loopback --admin-listen address", "false", 0, 0 },
    { "admin-allow-remote", "SNITUN_CLIENT_ADMIN_ALLOW_REMOTE", OPT_FLAG, NULL,
      "same as --admin-public (older name)", "false", 0, 0 },
    { "log-level", "SNITUN_LOG_LEVEL", OPT_STR, "LEVEL", "error, warn, info or debug",
      "info", 0, 0 },
    { "log-format", "SNITUN_LOG_FORMAT", OPT_STR, "FORMAT", "logfmt or json", "logfmt", 0, 0 },
    { "in-high", "SNITUN_CLIENT_IN_HIGH", OPT_INT, "BYTES",
      "(testing) incoming queue high watermark per channel; PAUSE above it "
      "[default: 2097152]", NULL, 1, 1LL << 30 },
    { "in-low", "SNITUN_CLIENT_IN_LOW", OPT_INT, "BYTES",
      "(testing) incoming queue low watermark; RESUME at it [default: in-high/4]",
      NULL, 0, 1LL << 30 },
};

static const struct opt_cmd client_cmd = {
    .prog = "snitun client",
    .about = "Keep one tunnel open to a SniTun gateway and connect every channel it\n"
             "opens to a local endpoint (TCP relay). Token material comes from exactly\n"
             "one of: --token with --aes-key/--aes-iv, --token-file, --token-command.\n"
             "Reconnects forever with exponential backoff; an aes-gcm key is never\n"
             "used for two connections, so aes-gcm needs a file or command that\n"
             "yields a fresh token. Prefer the environment variables for secrets:\n"
             "command-line arguments are visible to other local users.\n"
             "One I/O engine on one thread: a single tunnel needs no more.\n"
             "SIGINT/SIGTERM close the tunnel and exit 0. --version prints the version.",
    .specs = client_specs,
    .nspecs = sizeof(client_specs) / sizeof(client_specs[0]),
};

__attribute__((format(printf, 1, 2)))
static int usage_err(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "snitun client: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    return 2;
}

static bool given(const struct opt_res *res, const char *name)
{
    return opt_get(res, name)->src != OPT_UNSET;
}

/* Token source and overrides. Returns -1 to go on, else the exit status. */
static int tokens_from(const struct opt_res *res, struct tokensrc *ts)
{
    int n = given(res, "token") + given(res, "token-file") + given(res, "token-command");
    struct tokensrc_mat m;
    char err[256];

    if (n != 1)
        return usage_err("give exactly one of --token (with --aes-key and --aes-iv), "
                         "--token-file, --token-command%s", n > 1 ? " (several given)" : "");
    if (!given(res, "token") && (given(res, "aes-key") || given(res, "aes-iv")))
        return usage_err("--aes-key and --aes-iv go with --token; the token JSON carries "
                         "its own");
    tokensrc_init(ts, given(res, "token") ? TOKENSRC_ARGS
                      : given(res, "token-file") ? TOKENSRC_FILE : TOKENSRC_COMMAND);
    ts->token = opt_str(res, "token");
    ts->key_hex = opt_str(res, "aes-key");
    ts->iv_hex = opt_str(res, "aes-iv");
    ts->path = opt_str(res, "token-file");
    ts->command = opt_str(res, "token-command");
    ts->timeout_ms = (int)opt_int(res, "token-command-timeout") * 1000;
    if (given(res, "protocol-version")) {
        ts->over.has_version = true;
        ts->over.version = (unsigned)opt_int(res, "protocol-version");
    }
    if (given(res, "cipher")) {
        ts->over.has_cipher = true;
        if (tc_kind_parse(opt_str(res, "cipher"), &ts->over.cipher) != 0)
            return usage_err("--cipher must be aes-cbc, aes-gcm or aes-gcm-siv, got '%s'",
                             opt_str(res, "cipher"));
        if (!tc_available(ts->over.cipher))
            return usage_err("--cipher %s is not available in this OpenSSL",
                             opt_str(res, "cipher"));
    }
    if (ts->kind != TOKENSRC_ARGS)
        return -1;
    if (tokensrc_from_args(ts->token, ts->key_hex, ts->iv_hex, &ts->over, &m, err,
                           sizeof(err)) != 0)
        return usage_err("%s", err);
    if (m.cipher == TC_AES_GCM)
        log_msg(LOG_WARN, "aes-gcm with --token: its key serves one connection only; "
                "reconnecting needs --token-file or --token-command", NULL);
    tokensrc_mat_fini(&m);
    return -1;
}

static int acl_from(const struct opt_res *res, struct acl *acl, bool *have)
{
    size_t na, nb;
    const char **allow = opt_list(res, "allow", &na), **block = opt_list(res, "block", &nb);
    const char **items = na > 0 ? allow : block, *why;
    size_t n = na > 0 ? na : nb;

    *have = n > 0;
    if (na > 0 && nb > 0)
        return usage_err("--allow and --block cannot be combined: an access list has one "
                         "action (allow lists only what may pass, block what may not)");
    acl_set_action(acl, na > 0 ? ACL_ALLOW : ACL_BLOCK);
    for (size_t i = 0; i < n; i++)
        if (acl_add(acl, items[i], &why) != 0)
            return usage_err("--%s %s: %s", na > 0 ? "allow" : "block", items[i], why);
    return -1;
}

static int misc_from(const struct opt_res *res, struct client_cfg *cfg)
{
    const char *io = opt_str(res, "io"), *pp = opt_str(res, "endpoint-proxy-protocol");
    bool on;

    if (!strcmp(io, "auto"))
        cfg->io = ENG_AUTO;
    else if (!strcmp(io, "uring") || !strcmp(io, "io_uring"))
        cfg->io = ENG_URING;
    else if (!strcmp(io, "epoll"))
        cfg->io = ENG_EPOLL;
    else
        return usage_err("--io must be auto, uring or epoll, got '%s'", io);
    if (!strcmp(pp, "none"))
        cfg->endpoint_pp = 0;
    else if (!strcmp(pp, "v1"))
        cfg->endpoint_pp = 1;
    else if (!strcmp(pp, "v2"))
        cfg->endpoint_pp = 2;
    else
        return usage_err("--endpoint-proxy-protocol must be none, v1 or v2, got '%s'", pp);
    cfg->connect_timeout_ms = (uint32_t)opt_int(res, "connect-timeout") * 1000;
    cfg->endpoint_timeout_ms = (uint32_t)opt_int(res, "endpoint-timeout") * 1000;
    cfg->backoff_min_ms = (uint32_t)opt_int(res, "backoff-min") * 1000;
    cfg->backoff_max_ms = (uint32_t)opt_int(res, "backoff-max") * 1000;
    if (cfg->backoff_min_ms > cfg->backoff_max_ms)
        return usage_err("--backoff-min (%lld) must not exceed --backoff-max (%lld)",
                         opt_int(res, "backoff-min"), opt_int(res, "backoff-max"));
    if (mux_splice_parse(opt_str(res, "splice"), &cfg->splice) != 0)
        return usage_err("--splice must be auto, on or off, got '%s'", opt_str(res, "splice"));
    if (opt_parse_bool(opt_str(res, "batch"), &on) != 0)
        return usage_err("--batch must be on or off, got '%s'", opt_str(res, "batch"));
    cfg->no_batch = !on;
    cfg->ping_ms = (uint32_t)opt_int(res, "ping-interval") * 1000;
    cfg->pong_ms = (uint32_t)opt_int(res, "pong-timeout") * 1000;
    if (given(res, "in-low") && !given(res, "in-high"))
        return usage_err("--in-low needs --in-high");
    if (given(res, "in-high")) {
        cfg->in_high = (size_t)opt_int(res, "in-high");
        cfg->in_low = given(res, "in-low") ? (size_t)opt_int(res, "in-low") : cfg->in_high / 4;
        if (cfg->in_low >= cfg->in_high)
            return usage_err("--in-low (%zu) must be below --in-high (%zu)", cfg->in_low,
                             cfg->in_high);
    }
    return -1;
}

/* --admin-listen: numeric, loopback unless explicitly allowed. */
static int admin_from(const struct opt_res *res, struct net_addr *a, struct client_cfg *cfg)
{
    const char *s = opt_str(res, "admin-listen"), *why = NULL;

    if (s == NULL)
        return -1;
    if (addr_parse(s, a, &why) != 0)
        return usage_err("--admin-listen must be IPv4:PORT or [IPv6]:PORT, got '%s' (%s)", s,
                         why);
    if (!admin_addr_is_loopback(a) && !opt_on(res, "admin-public") &&
        !opt_on(res, "admin-allow-remote"))
        return usage_err("--admin-listen %s is not a loopback address; add "
                         "--admin-public to expose the metrics", s);
    cfg->admin = a;
    return -1;
}

static int logging_from(const struct opt_res *res)
{
    enum log_level level;
    enum log_format format;

    if (log_level_parse(opt_str(res, "log-level"), &level) != 0)
        return usage_err("--log-level must be error, warn, info or debug, got '%s'",
                         opt_str(res, "log-level"));
    if (log_format_parse(opt_str(res, "log-format"), &format) != 0)
        return usage_err("--log-format must be logfmt or json, got '%s'",
                         opt_str(res, "log-format"));
    log_setup(level, format, NULL);
    return -1;
}

static int client_main(const struct opt_res *res, struct tokensrc *ts, struct acl *acl)
{
    struct client_cfg cfg = { 0 };
    struct net_addr admin;
    struct client *cl;
    char err[512];
    bool have_acl;
    int rc;

    if ((rc = logging_from(res)) >= 0)
        return rc;
    if (opt_str(res, "server") == NULL || opt_str(res, "endpoint") == NULL)
        return usage_err("--server and --endpoint are required (see --help)");
    if ((rc = tokens_from(res, ts)) >= 0 || (rc = acl_from(res, acl, &have_acl)) >= 0 ||
        (rc = misc_from(res, &cfg)) >= 0 || (rc = admin_from(res, &admin, &cfg)) >= 0)
        return rc;
    cfg.server = opt_str(res, "server");
    cfg.endpoint = opt_str(res, "endpoint");
    cfg.routes = opt_list(res, "route", &cfg.nroutes);
    cfg.acl = have_acl ? acl : NULL;
    cfg.tokens = ts;
    if ((cl = client_new(&cfg, err, sizeof(err))) == NULL)
        return usage_err("%s", err);
    rc = client_run(cl);
    client_free(cl);
    return rc;
}

/* `snitun client --version`, before any flag is checked (no option, so
 * no SNITUN_* variable can trigger it). Not after "--". */
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

int cmd_client(int argc, char **argv)
{
    struct opt_res res;
    struct tokensrc *ts;
    struct acl acl;
    int rc;

    if (want_version(argc, argv))
        return 0;
    rc = opt_parse_main(&client_cmd, argc, argv, &res);

    if (rc >= 0)
        return rc;
    /* ~8 KiB of used-key digests: heap, not stack. */
    if ((ts = calloc(1, sizeof(*ts))) == NULL) {
        opt_fini(&res);
        return 1;
    }
    acl_init(&acl);
    rc = client_main(&res, ts, &acl);
    acl_fini(&acl);
    free(ts);
    opt_fini(&res);
    return rc;
}
