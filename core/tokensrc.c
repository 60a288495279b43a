/* core/tokensrc.c - see tokensrc.h. */
#include "core/tokensrc.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

__attribute__((format(printf, 3, 4)))
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (errlen > 0) {
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

/* Hex text of 1..max bytes into out; *n receives the byte count. */
static int unhex(const char *hex, uint8_t *out, size_t max, size_t *n)
{
    size_t len = strlen(hex);
    int ok = len > 0 && len % 2 == 0 && len / 2 <= max &&
             OPENSSL_hexstr2buf_ex(out, max, n, hex, '\0') == 1;

    ERR_clear_error();
    return ok ? 0 : -1;
}

/* The token goes on the wire as-is: insist on printable ASCII so that a
 * stray newline or a pasted quote is caught here, not by the gateway. */
static int token_ok(const char *t)
{
    if (t[0] == '\0')
        return -1;
    for (const char *p = t; *p != '\0'; p++)
        if (*p < 0x21 || *p > 0x7e)
            return -1;
    return 0;
}

/* Key, IV and cipher checks common to both sources, after overrides. */
static int finish(struct tokensrc_mat *m, const char *key_hex, const char *iv_hex,
                  const struct tokensrc_over *ov, char *err, size_t errlen)
{
    size_t n = 0;
    uint8_t iv[64];

    if (ov != NULL && ov->has_version)
        m->version = ov->version;
    if (ov != NULL && ov->has_cipher) {
        m->cipher = ov->cipher;
        m->cipher_unknown = false;
    }
    if (m->version > 2)
        m->version = 2;     /* the gateway treats > 2 as 2 (PROTOCOL.md 5.1) */
    if (unhex(key_hex, m->key, sizeof(m->key), &m->key_len) != 0 ||
        (m->key_len != 16 && m->key_len != 24 && m->key_len != 32))
        return fail(err, errlen, "aes_key must be 16, 24 or 32 bytes in hex "
                    "(32, 48 or 64 hex digits), got %zu characters", strlen(key_hex));
    if (unhex(iv_hex, iv, sizeof(iv), &n) != 0)
        return fail(err, errlen, "aes_iv must be hex (at most 64 bytes), got %zu characters",
                    strlen(iv_hex));
    if (n == sizeof(m->iv)) {
        memcpy(m->iv, iv, n);
        m->iv_len = n;
    } else if (m->cipher == TC_AES_CBC) {
        return fail(err, errlen, "aes_iv must be 16 bytes (32 hex digits) with aes-cbc, "
                    "got %zu bytes", n);
    }
    if (!tc_available(m->cipher))
        return fail(err, errlen, "cipher %s is not available in this OpenSSL",
                    tc_kind_name(m->cipher));
    return 0;
}

static const char *json_str(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);

    return json_is_string(v) ? json_string_value(v) : NULL;
}

/* Members other than token/key/iv; -1 with err on a wrong type. */
static int json_extras(json_t *o, struct tokensrc_mat *m, char *err, size_t errlen)
{
    json_t *v = json_object_get(o, "protocol_version");

    if (v != NULL && !json_is_null(v)) {
        if (!json_is_integer(v) || json_integer_value(v) < 0)
            return fail(err, errlen, "protocol_version must be a non-negative integer");
        m->version = json_integer_value(v) > 2 ? 2 : (unsigned)json_integer_value(v);
    }
    v = json_object_get(o, "cipher");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_string(v))
            return fail(err, errlen, "cipher must be a string");
        if (tc_kind_parse(json_string_value(v), &m->cipher) != 0) {
            m->cipher = TC_AES_CBC;   /* as the gateway runs it */
            m->cipher_unknown = true;
        }
    }
    v = json_object_get(o, "valid");
    if (v != NULL && !json_is_null(v)) {
        if (!json_is_number(v))
            return fail(err, errlen, "valid must be a number");
        m->valid = json_number_value(v);
    }
    v = json_object_get(o, "hostname");
    if (json_is_string(v) && (m->hostname = strdup(json_string_value(v))) == NULL)
        return fail(err, errlen, "out of memory");
    return 0;
}

static void mat_clear(struct tokensrc_mat *m)
{
    *m = (struct tokensrc_mat){ .cipher = TC_AES_CBC };
}

int tokensrc_parse_json(const char *text, size_t len, const struct tokensrc_over *ov,
                        struct tokensrc_mat *m, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *o = json_loadb(text, len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, &jerr);
    const char *tok, *key, *iv;
    int rc = -1;

    mat_clear(m);
    if (o == NULL)
        return fail(err, errlen, "not JSON: %s (line %d)", jerr.text, jerr.line);
    if (!json_is_object(o)) {
        fail(err, errlen, "not a JSON object");
        goto out;
    }
    tok = json_str(o, "token");
    key = json_str(o, "aes_key");
    iv = json_str(o, "aes_iv");
    if (tok == NULL || key == NULL || iv == NULL) {
        fail(err, errlen, "member %s missing or not a string",
             tok == NULL ? "token" : key == NULL ? "aes_key" : "aes_iv");
        goto out;
    }
    if (token_ok(tok) != 0) {
        fail(err, errlen, "token must be non-empty printable ASCII");
        goto out;
    }
    if (json_extras(o, m, err, errlen) != 0 || finish(m, key, iv, ov, err, errlen) != 0)
        goto out;
    m->token_len = strlen(tok);
    if ((m->token = strdup(tok)) == NULL) {
        fail(err, errlen, "out of memory");
        goto out;
    }
    rc = 0;
out:
    json_decref(o);
    if (rc != 0)
        tokensrc_mat_fini(m);
    return rc;
}

int tokensrc_from_args(const char *token, const char *key_hex, const char *iv_hex,
                       const struct tokensrc_over *ov, struct tokensrc_mat *m,
                       char *err, size_t errlen)
{
    mat_clear(m);
    if (token == NULL || key_hex == NULL || iv_hex == NULL)
        return fail(err, errlen, "--token needs --aes-key and --aes-iv");
    if (token_ok(token) != 0)
        return fail(err, errlen, "--token must be non-empty printable ASCII");
    if (finish(m, key_hex, iv_hex, ov, err, errlen) != 0) {
        tokensrc_mat_fini(m);
        return -1;
    }
    m->token_len = strlen(token);
    if ((m->token = strdup(token)) == NULL) {
        tokensrc_mat_fini(m);
        return fail(err, errlen, "out of memory");
    }
    return 0;
}

void tokensrc_mat_fini(struct tokensrc_mat *m)
{
    free(m->token);
    free(m->hostname);
    OPENSSL_cleanse(m, sizeof(*m));
    memset(m, 0, sizeof(*m));
}

void tokensrc_init(struct tokensrc *s, enum tokensrc_kind kind)
{
    memset(s, 0, sizeof(*s));
    s->kind = kind;
    s->timeout_ms = 30000;
}

/* ---- file and command ------------------------------------------------- */

static int read_file(const char *path, char **out, size_t *outlen, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    size_t n;

    if (f == NULL)
        return fail(err, errlen, "cannot open %s: %s", path, strerror(errno));
    if ((buf = malloc(TOKENSRC_OUTPUT_MAX)) == NULL) {
        fclose(f);
        return fail(err, errlen, "out of memory");
    }
    n = fread(buf, 1, TOKENSRC_OUTPUT_MAX, f);
    if (ferror(f) || n == TOKENSRC_OUTPUT_MAX) {
        int e = errno;
        fclose(f);
        free(buf);
        return n == TOKENSRC_OUTPUT_MAX
                   ? fail(err, errlen, "%s is larger than %d bytes", path, TOKENSRC_OUTPUT_MAX - 1)
                   : fail(err, errlen, "cannot read %s: %s", path, strerror(e));
    }
    fclose(f);
    buf[n] = '\0';
    *out = buf;
    *outlen = n;
    return 0;
}

static int64_t mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Start /bin/sh -c cmd in its own process group, stdout into wfd, with
 * default signal dispositions and an empty mask (the client blocks
 * SIGINT/SIGTERM for its signalfd, and a child must not inherit that). */
static int spawn(const char *cmd, int wfd, int rfd, pid_t *pid)
{
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    sigset_t none, def;
    char *argv[] = { "sh", "-c", (char *)cmd, NULL };
    int rc;

    sigemptyset(&none);
    sigemptyset(&def);
    sigaddset(&def, SIGINT);
    sigaddset(&def, SIGTERM);
    sigaddset(&def, SIGPIPE);
    sigaddset(&def, SIGHUP);
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_adddup2(&fa, wfd, 1);
    posix_spawn_file_actions_addclose(&fa, rfd);
    posix_spawnattr_init(&at);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                      POSIX_SPAWN_SETPGROUP);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &def);
    posix_spawnattr_setpgroup(&at, 0);
    rc = posix_spawn(pid, "/bin/sh", &fa, &at, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    posix_spawnattr_destroy(&at);
    return rc;
}

/* Wait for pid until deadline; kill its group if it does not exit.
 * Returns the wait status, or -1 when it had to be killed. */
static int reap(pid_t pid, int64_t deadline)
{
    int st;

    for (;;) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid)
            return st;
        if (r < 0 && errno != EINTR)
            return -1;
        if (mono_ms() >= deadline) {
            kill(-pid, SIGKILL);
            while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
                ;
            return -1;
        }
        poll(NULL, 0, 5);
    }
}

/* Read rfd to EOF into buf; 0 at EOF, -1 error/overflow/timeout, -2 abort. */
static int slurp(int rfd, int abort_fd, int64_t deadline, char *buf, size_t *n)
{
    for (;;) {
        struct pollfd p[2] = { { .fd = rfd, .events = POLLIN },
                               { .fd = abort_fd, .events = POLLIN } };
        int64_t left = deadline - mono_ms();
        int r;

        if (left <= 0)
            return -1;
        r = poll(p, abort_fd >= 0 ? 2 : 1, (int)left);
        if (r < 0 && errno != EINTR)
            return -1;
        if (r > 0 && abort_fd >= 0 && (p[1].revents & POLLIN))
            return -2;
        if (r <= 0 || p[0].revents == 0)
            continue;
        ssize_t got = read(rfd, buf + *n, TOKENSRC_OUTPUT_MAX - 1 - *n);
        if (got == 0)
            return 0;
        if (got < 0 && errno != EINTR && errno != EAGAIN)
            return -1;
        if (got > 0 && (*n += (size_t)got) >= TOKENSRC_OUTPUT_MAX - 1)
            return -1;
    }
}

int tokensrc_run(const char *cmd, int timeout_ms, int abort_fd, char **out, size_t *outlen,
                 char *err, size_t errlen)
{
    int64_t deadline = mono_ms() + timeout_ms;
    int fds[2], rc, st;
    size_t n = 0;
    pid_t pid;
    char *buf = malloc(TOKENSRC_OUTPUT_MAX);

    if (buf == NULL)
        return fail(err, errlen, "out of memory");
    if (pipe2(fds, O_CLOEXEC) != 0) {
        free(buf);
        return fail(err, errlen, "pipe: %s", strerror(errno));
    }
    rc = spawn(cmd, fds[1], fds[0], &pid);
    close(fds[1]);
    if (rc != 0) {
        close(fds[0]);
        free(buf);
        return fail(err, errlen, "cannot run /bin/sh: %s", strerror(rc));
    }
    rc = slurp(fds[0], abort_fd, deadline, buf, &n);
    close(fds[0]);
    if (rc != 0)
        kill(-pid, SIGKILL);
    st = reap(pid, rc == 0 ? deadline : 0);
    if (rc == 0 && st != -1 && WIFEXITED(st) && WEXITSTATUS(st) == 0) {
        buf[n] = '\0';
        *out = buf;
        *outlen = n;
        return 0;
    }
    free(buf);
    if (rc == -2)
        return -2;
    if (rc != 0 || st == -1)
        return fail(err, errlen, n >= TOKENSRC_OUTPUT_MAX - 1
                    ? "token command printed more than %d bytes"
                    : "token command did not finish within %d ms",
                    n >= TOKENSRC_OUTPUT_MAX - 1 ? TOKENSRC_OUTPUT_MAX - 1 : timeout_ms);
    if (WIFSIGNALED(st))
        return fail(err, errlen, "token command killed by signal %d", WTERMSIG(st));
    return fail(err, errlen, "token command exited with status %d", WEXITSTATUS(st));
}

int tokensrc_fetch(struct tokensrc *s, int abort_fd, struct tokensrc_mat *m,
                   char *err, size_t errlen)
{
    char *text = NULL, why[256];
    size_t len = 0;
    int rc;

    switch (s->kind) {
    case TOKENSRC_ARGS:
        return tokensrc_from_args(s->token, s->key_hex, s->iv_hex, &s->over, m, err, errlen);
    case TOKENSRC_FILE:
        rc = read_file(s->path, &text, &len, err, errlen);
        break;
    case TOKENSRC_COMMAND:
        rc = tokensrc_run(s->command, s->timeout_ms, abort_fd, &text, &len, err, errlen);
        break;
    default:
        return fail(err, errlen, "no token source");
    }
    if (rc != 0)
        return rc;
    rc = tokensrc_parse_json(text, len, &s->over, m, why, sizeof(why));
    if (rc != 0)
        fail(err, errlen, "token JSON from %s: %s",
             s->kind == TOKENSRC_FILE ? s->path : "--token-command", why);
    OPENSSL_cleanse(text, len);
    free(text);
    return rc;
}

/* ---- aes-gcm key reuse ------------------------------------------------ */

static void key_digest(const struct tokensrc_mat *m, uint8_t out[32])
{
    unsigned n = 32;

    if (EVP_Digest(m->key, m->key_len, out, &n, EVP_sha256(), NULL) != 1)
        memset(out, 0, 32);   /* every key then looks used: fail closed */
}

bool tokensrc_key_used(const struct tokensrc *s, const struct tokensrc_mat *m)
{
    uint8_t d[32];
    size_t n = s->nused < TOKENSRC_USED_MAX ? s->nused : TOKENSRC_USED_MAX;

    if (m->cipher != TC_AES_GCM)
        return false;
    key_digest(m, d);
    for (size_t i = 0; i < n; i++)
        if (CRYPTO_memcmp(s->used[i], d, 32) == 0)
            return true;
    return false;
}

void tokensrc_mark_used(struct tokensrc *s, const struct tokensrc_mat *m)
{
    if (m->cipher != TC_AES_GCM)
        return;
    key_digest(m, s->used[s->nused % TOKENSRC_USED_MAX]);
    s->nused++;
}
