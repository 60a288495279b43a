/* core/cmd_token.c - `snitun keygen` and `snitun token issue|inspect`:
 * the session master's job on the command line (DESIGN.md).
 *
 * Exit status: 0 success, 1 runtime failure (token rejected, keys file
 * unreadable, OpenSSL failure), 2 usage error. Fernet keys are printed by
 * keygen only; messages about a bad key name its position, never its
 * value. Output goes to stdout as one JSON object (issue, inspect) or one
 * line (keygen); every message goes to stderr as one line.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/err.h>

#include "core/claims.h"
#include "core/cmd.h"
#include "core/opt.h"
#include "core/token.h"
#include "crypto/fernet.h"
#include "crypto/rand.h"
#include "crypto/tcipher.h"

#define MAX_VALID_FOR 315360000LL   /* ten years */
#define STDIN_MAX 65536

/* The two key flags shared by issue and inspect (first two rows). */
#define KEY_SPECS                                                           \
    { "fernet-key", "SNITUN_FERNET_KEYS", OPT_LIST, "KEY",                  \
      "Fernet key (44 characters of URL-safe base64); order matters", NULL, \
      0, 0 },                                                               \
    { "fernet-keys-file", NULL, OPT_STR, "FILE",       \
      "file with one Fernet key per line (# comments), after --fernet-key", \
      NULL, 0, 0 }

static double now_real(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Keys from --fernet-key (in order), then from --fernet-keys-file.
 * Returns -1 to go on, else the exit status after printing why. */
static int load_keys(const struct opt_res *res, struct token_keys *ks)
{
    const char *prog = res->cmd->prog, *file = opt_str(res, "fernet-keys-file");
    size_t n;
    const char **keys = opt_list(res, "fernet-key", &n);
    char err[512];

    for (size_t i = 0; i < n; i++) {
        if (token_keys_add(ks, keys[i], strlen(keys[i])) != 0) {
            fprintf(stderr, "%s: --fernet-key #%zu is not a Fernet key (need 44 "
                    "characters of URL-safe base64 encoding 32 bytes)\n", prog, i + 1);
            return 2;
        }
    }
    if (file != NULL && token_keys_load(ks, file, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s: %s\n", prog, err);
        return 1;
    }
    if (ks->n == 0) {
        fprintf(stderr, "%s: no Fernet key: give --fernet-key or --fernet-keys-file\n", prog);
        return 2;
    }
    return -1;
}

/* Hex flag value into out (32 bytes max) whose byte length must be one of
 * sizes[0..nsizes-1]; what names the sizes in the message. */
static int hex_flag(const char *prog, const char *flag, const char *hex,
                    const size_t *sizes, size_t nsizes, const char *what,
                    uint8_t *out, size_t *len)
{
    size_t n = strlen(hex);

    if (n > 0 && n % 2 == 0 && n / 2 <= 32 &&
        OPENSSL_hexstr2buf_ex(out, 32, len, hex, '\0') == 1) {
        for (size_t i = 0; i < nsizes; i++)
            if (*len == sizes[i])
                return 0;
    }
    ERR_clear_error();
    fprintf(stderr, "%s: --%s must be %s bytes in hex (%s hex digits), got %zu characters\n",
            prog, flag, what, nsizes > 1 ? "32, 48 or 64" : "32", n);
    return -1;
}

static void print_json(json_t *o)
{
    char *text = json_dumps(o, JSON_ENSURE_ASCII);

    if (text != NULL) {
        printf("%s\n", text);
        free(text);
    }
}

static json_t *hex_json(const uint8_t *p, size_t n)
{
    char buf[2 * 64 + 1];

    n = n > 64 ? 64 : n;
    for (size_t i = 0; i < n; i++)
        snprintf(buf + 2 * i, 3, "%02x", p[i]);
    buf[2 * n] = '\0';
    return json_string(buf);
}

static json_t *names_json(const char *const *names, size_t n)
{
    json_t *a = json_array();

    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_string(names[i]));
    return a;
}

static int issue_print(const char *token, const struct token_req *req)
{
    json_t *o = json_object();

    json_object_set_new(o, "token", json_string(token));
    json_object_set_new(o, "aes_key", hex_json(req->aes_key, req->aes_key_len));
    json_object_set_new(o, "aes_iv", hex_json(req->aes_iv, req->aes_iv_len));
    json_object_set_new(o, "hostname", json_string(req->hostname));
    json_object_set_new(o, "alias", names_json(req->aliases, req->naliases));
    json_object_set_new(o, "valid", json_integer(req->valid));
    json_object_set_new(o, "protocol_version", json_integer(req->protocol_version));
    json_object_set_new(o, "cipher", json_string(tc_kind_name(req->cipher)));
    print_json(o);
    json_decref(o);
    return 0;
}

static const struct opt_spec issue_specs[] = {
    KEY_SPECS,
    { "hostname", NULL, OPT_STR, "NAME", "the name the client serves (required)",
      NULL, 0, 0 },
    { "alias", NULL, OPT_LIST, "NAME", "another name the client serves", NULL, 0, 0 },
    { "valid-for", NULL, OPT_INT, "SECONDS", "lifetime of the token", "3600",
      1, MAX_VALID_FOR },
    { "protocol-version", NULL, OPT_INT, "N", "multiplexer protocol version", "2", 0, 2 },
    { "cipher", NULL, OPT_STR, "NAME", "aes-cbc, aes-gcm or aes-gcm-siv", "aes-cbc", 0, 0 },
    { "aes-key", NULL, OPT_STR, "HEX",
      "tunnel key, 16/24/32 bytes (default: 32 fresh random bytes)", NULL, 0, 0 },
    { "aes-iv", NULL, OPT_STR, "HEX", "tunnel IV, 16 bytes (default: fresh random)",
      NULL, 0, 0 },
    { "now", NULL, OPT_INT, "UNIX", "clock to use instead of the system's (tests)",
      NULL, 0, 253402300799LL - MAX_VALID_FOR },
};

static const struct opt_cmd issue_cmd = {
    .prog = "snitun token issue",
    .about = "Issue a token for a client, encrypted with the first Fernet key, and\n"
             "print it with its claims as one JSON object: token, aes_key, aes_iv,\n"
             "hostname, alias, valid, protocol_version, cipher. The tunnel key and IV\n"
             "are fresh random bytes unless given; aes-gcm needs a new key for every\n"
             "tunnel connection, so issue a new token each time.",
    .specs = issue_specs,
    .nspecs = sizeof(issue_specs) / sizeof(issue_specs[0]),
};

/* Fill the tunnel key material of req from the flags or the CSPRNG.
 * Returns -1 to go on, else the exit status. */
static int issue_material(const struct opt_res *res, uint8_t key[32], uint8_t iv[16],
                          struct token_req *req)
{
    static const size_t key_sizes[] = { 16, 24, 32 }, iv_size[] = { 16 };
    const char *prog = res->cmd->prog;
    const char *k = opt_str(res, "aes-key"), *v = opt_str(res, "aes-iv");

    req->aes_key = key;
    req->aes_iv = iv;
    req->aes_key_len = 32;
    req->aes_iv_len = 16;
    if (k != NULL && hex_flag(prog, "aes-key", k, key_sizes, 3, "16, 24 or 32", key,
                              &req->aes_key_len) != 0)
        return 2;
    if (v != NULL && hex_flag(prog, "aes-iv", v, iv_size, 1, "16", iv, &req->aes_iv_len) != 0)
        return 2;
    if ((k == NULL && rand_bytes(key, 32) != 0) || (v == NULL && rand_bytes(iv, 16) != 0)) {
        fprintf(stderr, "%s: the random generator failed\n", prog);
        return 1;
    }
    return -1;
}

/* A name to put in the claims: non-empty UTF-8 (JSON strings must be). */
static int name_ok(const char *prog, const char *flag, const char *name)
{
    json_t *s = name[0] != '\0' ? json_string(name) : NULL;

    if (s == NULL) {
        fprintf(stderr, "%s: --%s must be a non-empty UTF-8 name\n", prog, flag);
        return -1;
    }
    json_decref(s);
    return 0;
}

static int issue_run(const struct opt_res *res, struct token_keys *ks)
{
    const char *prog = res->cmd->prog;
    struct token_req req = { .hostname = opt_str(res, "hostname") };
    uint8_t key[32], iv[16];
    int64_t now = opt_get(res, "now")->src != OPT_UNSET ? opt_int(res, "now")
                                                         : (int64_t)time(NULL);
    char *token = NULL;
    int rc;

    if (req.hostname == NULL) {
        fprintf(stderr, "%s: --hostname is required\n", prog);
        return 2;
    }
    req.aliases = opt_list(res, "alias", &req.naliases);
    if (name_ok(prog, "hostname", req.hostname) != 0)
        return 2;
    for (size_t i = 0; i < req.naliases; i++)
        if (name_ok(prog, "alias", req.aliases[i]) != 0)
            return 2;
    if (tc_kind_parse(opt_str(res, "cipher"), &req.cipher) != 0) {
        fprintf(stderr, "%s: --cipher must be aes-cbc, aes-gcm or aes-gcm-siv, got '%s'\n",
                prog, opt_str(res, "cipher"));
        return 2;
    }
    if ((rc = load_keys(res, ks)) >= 0 || (rc = issue_material(res, key, iv, &req)) >= 0)
        goto out;
    req.valid = now + opt_int(res, "valid-for");
    req.protocol_version = opt_int(res, "protocol-version");
    if (token_issue(&ks->v[0], &req, (uint64_t)now, NULL, &token) != 0) {
        fprintf(stderr, "%s: cannot build the token (OpenSSL or memory failure)\n", prog);
        rc = 1;
        goto out;
    }
    rc = issue_print(token, &req);
out:
    free(token);
    OPENSSL_cleanse(key, sizeof(key));
    OPENSSL_cleanse(iv, sizeof(iv));
    return rc;
}

static int token_issue_main(int argc, char **argv)
{
    struct opt_res res;
    struct token_keys ks = { 0 };
    int rc = opt_parse_main(&issue_cmd, argc, argv, &res);

    if (rc >= 0)
        return rc;
    rc = issue_run(&res, &ks);
    token_keys_fini(&ks);
    opt_fini(&res);
    return rc;
}

static const struct opt_spec inspect_specs[] = {
    KEY_SPECS,
    { "now", NULL, OPT_INT, "UNIX", "check expiry at this time instead of now",
      NULL, 0, 253402300799LL },
};

static const struct opt_cmd inspect_cmd = {
    .prog = "snitun token inspect",
    .args = "TOKEN",
    .about = "Verify TOKEN ('-' reads it from stdin) as the gateway does: Fernet with\n"
             "each key in order, then the claims and their expiry. Prints the claims\n"
             "the gateway would act on, the index of the key that verified and the\n"
             "Fernet timestamp as one JSON object; or exits 1 with the reason.",
    .specs = inspect_specs,
    .nspecs = sizeof(inspect_specs) / sizeof(inspect_specs[0]),
    .min_pos = 1,
    .max_pos = 1,
};

static json_t *valid_json(double valid)
{
    if (valid == (double)(int64_t)valid)
        return json_integer((json_int_t)valid);
    return json_real(valid);
}

static void inspect_print(const struct claims *c, const struct fernet_meta *meta)
{
    json_t *o = json_object();

    json_object_set_new(o, "key_index", json_integer((json_int_t)meta->key_index));
    json_object_set_new(o, "fernet_timestamp", json_integer((json_int_t)meta->timestamp));
    json_object_set_new(o, "valid", valid_json(c->valid));
    json_object_set_new(o, "hostname", json_string(c->hostname));
    json_object_set_new(o, "alias", names_json((const char *const *)c->aliases, c->naliases));
    json_object_set_new(o, "aes_key", hex_json(c->aes_key, c->aes_key_len));
    /* An AEAD token may carry an IV of another size; it is unused then. */
    json_object_set_new(o, "aes_iv", c->aes_iv_len == CLAIMS_IV_LEN
                                         ? hex_json(c->aes_iv, c->aes_iv_len) : json_null());
    json_object_set_new(o, "protocol_version", json_integer(c->protocol_version));
    json_object_set_new(o, "effective_protocol_version", json_integer(claims_version(c)));
    json_object_set_new(o, "cipher", json_string(tc_kind_name(c->cipher)));
    json_object_set_new(o, "cipher_unknown", json_boolean(c->cipher_unknown));
    print_json(o);
    json_decref(o);
}

/* The token argument, or stdin for "-". Returns its length, -1 on error;
 * *buf (caller frees) is set when stdin was read. */
static long token_arg(const char *arg, const char **tok, char **buf)
{
    size_t len = 0, got;

    *buf = NULL;
    *tok = arg;
    if (strcmp(arg, "-") != 0)
        return (long)strlen(arg);
    if ((*buf = malloc(STDIN_MAX)) == NULL)
        return -1;
    while (len < STDIN_MAX && (got = fread(*buf + len, 1, STDIN_MAX - len, stdin)) > 0)
        len += got;
    *tok = *buf;
    return ferror(stdin) || len == STDIN_MAX ? -1 : (long)len;
}

static int inspect_run(const struct opt_res *res, struct token_keys *ks)
{
    const char *prog = res->cmd->prog, *tok;
    double now = opt_get(res, "now")->src != OPT_UNSET ? (double)opt_int(res, "now")
                                                       : now_real();
    struct claims c;
    struct fernet_meta meta;
    enum token_err err;
    char *buf;
    long len;
    int rc = load_keys(res, ks);

    if (rc >= 0)
        return rc;
    if ((len = token_arg(res->pos[0], &tok, &buf)) < 0) {
        fprintf(stderr, "%s: cannot read the token from stdin (at most %d bytes)\n",
                prog, STDIN_MAX - 1);
        return 1;
    }
    err = token_verify(ks->v, ks->n, tok, (size_t)len, now, &c, &meta);
    free(buf);
    if (err != TOKEN_OK) {
        fprintf(stderr, "%s: rejected: %s: %s\n", prog, token_strerror(err),
                token_describe(err));
        return 1;
    }
    inspect_print(&c, &meta);
    claims_fini(&c);
    return 0;
}

static int token_inspect_main(int argc, char **argv)
{
    struct opt_res res;
    struct token_keys ks = { 0 };
    int rc = opt_parse_main(&inspect_cmd, argc, argv, &res);

    if (rc >= 0)
        return rc;
    rc = inspect_run(&res, &ks);
    token_keys_fini(&ks);
    opt_fini(&res);
    return rc;
}

static void token_usage(FILE *out)
{
    fprintf(out, "usage: snitun token <action> [flags]\n\n"
                 "actions:\n"
                 "  issue    issue a token for a client\n"
                 "  inspect  verify a token and print its claims\n\n"
                 "'snitun token <action> --help' describes each action's flags.\n");
}

int cmd_token(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : NULL;

    if (what == NULL) {
        token_usage(stderr);
        return 2;
    }
    if (!strcmp(what, "issue"))
        return token_issue_main(argc - 1, argv + 1);
    if (!strcmp(what, "inspect"))
        return token_inspect_main(argc - 1, argv + 1);
    if (!strcmp(what, "-h") || !strcmp(what, "--help") || !strcmp(what, "help")) {
        token_usage(stdout);
        return 0;
    }
    fprintf(stderr, "snitun token: unknown action '%s' (issue, inspect; see --help)\n", what);
    return 2;
}

static const struct opt_cmd keygen_cmd = {
    .prog = "snitun keygen",
    .about = "Print a new random Fernet key (44 characters of URL-safe base64) for\n"
             "the gateway's and the session master's key lists.",
};

int cmd_keygen(int argc, char **argv)
{
    struct opt_res res;
    struct fernet_key key;
    char text[FERNET_KEY_B64_LEN + 1];
    int rc = opt_parse_main(&keygen_cmd, argc, argv, &res);

    if (rc >= 0)
        return rc;
    opt_fini(&res);
    if (fernet_key_generate(&key) != 0) {
        fprintf(stderr, "snitun keygen: the random generator failed\n");
        return 1;
    }
    fernet_key_format(&key, text);
    printf("%s\n", text);
    OPENSSL_cleanse(&key, sizeof(key));
    OPENSSL_cleanse(text, sizeof(text));
    return 0;
}
