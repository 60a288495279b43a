/* core/log.c - line formatting and writing; see core/log.h. */
#include "core/log.h"

#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Written by log_setup() before threads start, read-only afterwards. */
static struct {
    enum log_level level;
    enum log_format format;
    int fd;
} conf = { LOG_INFO, LOG_LOGFMT, STDERR_FILENO };

#define KEY_MAX 64      /* longer keys are cut: they are literals */
#define LINE_STACK 2048 /* most lines fit; longer ones go to the heap */

struct field {
    const char *key;
    const char *val; /* may be NULL */
};

/* ---- output buffer ---------------------------------------------------- */

/* Starts on a caller stack array and moves to the heap when it outgrows
 * it. After an allocation failure every put is ignored and `oom` is set:
 * the line is then dropped, never written half. */
struct lbuf {
    char *p;
    size_t len, cap;
    bool heap, oom;
};

static void lb_init(struct lbuf *b, char *stack, size_t cap)
{
    *b = (struct lbuf){ .p = stack, .cap = cap };
}

static bool lb_room(struct lbuf *b, size_t n)
{
    if (b->oom)
        return false;
    if (b->cap - b->len >= n)
        return true;
    size_t cap = b->cap * 2 > b->len + n ? b->cap * 2 : b->len + n;
    char *p = b->heap ? realloc(b->p, cap) : malloc(cap);
    if (p == NULL) {
        b->oom = true;
        return false;
    }
    if (!b->heap)
        memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
    b->heap = true;
    return true;
}

static void lb_put(struct lbuf *b, const void *s, size_t n)
{
    if (lb_room(b, n)) {
        memcpy(b->p + b->len, s, n);
        b->len += n;
    }
}

static void lb_puts(struct lbuf *b, const char *s)
{
    lb_put(b, s, strlen(s));
}

static void lb_putc(struct lbuf *b, char c)
{
    lb_put(b, &c, 1);
}

static void lb_free(struct lbuf *b)
{
    if (b->heap)
        free(b->p);
}

/* ---- character classes ------------------------------------------------ */

/* Length (1..4) of the valid UTF-8 sequence starting s[0..n), with its code
 * point in *cp; 0 if s[0] does not start one (stray continuation byte,
 * overlong form, surrogate, above U+10FFFF, truncated). */
static size_t utf8_seq(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char c = s[0];
    unsigned char lo = 0x80, hi = 0xBF;
    size_t len;

    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF)
        len = 3;
    else if (c >= 0xF0 && c <= 0xF4)
        len = 4;
    else
        return 0;
    if (c == 0xE0)
        lo = 0xA0;   /* overlong */
    else if (c == 0xED)
        hi = 0x9F;   /* surrogates */
    else if (c == 0xF0)
        lo = 0x90;   /* overlong */
    else if (c == 0xF4)
        hi = 0x8F;   /* above U+10FFFF */
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    uint32_t v = c & (0x7F >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

/* Valid code points that some terminals and log viewers treat as a line
 * break or use to reorder what is displayed (a forged-looking line). */
static bool cp_hidden(uint32_t cp)
{
    return (cp >= 0x80 && cp <= 0x9F) || cp == 0x200E || cp == 0x200F ||
           (cp >= 0x2028 && cp <= 0x202E) || (cp >= 0x2066 && cp <= 0x2069) ||
           cp == 0xFEFF;
}

static bool ascii_plain(unsigned char c)
{
    return c > 0x20 && c != 0x7F && c != '=' && c != '"' && c != '\\';
}

static bool key_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '_' || c == '.' || c == '-';
}

/* ---- logfmt ------------------------------------------------------------- */

static bool needs_quotes(const unsigned char *s, size_t n)
{
    size_t i = 0, k;
    uint32_t cp;

    if (n == 0)
        return true;
    while (i < n) {
        if (s[i] < 0x80) {
            if (!ascii_plain(s[i]))
                return true;
            i++;
            continue;
        }
        k = utf8_seq(s + i, n - i, &cp);
        if (k == 0 || cp_hidden(cp))
            return true;
        i += k;
    }
    return false;
}

static void put_hex_escape(struct lbuf *b, const char *prefix, uint32_t v, int digits)
{
    char tmp[12];
    snprintf(tmp, sizeof(tmp), "%s%0*X", prefix, digits, (unsigned)v);
    lb_puts(b, tmp);
}

/* One ASCII byte inside quotes. */
static void put_ascii_escaped(struct lbuf *b, unsigned char c)
{
    switch (c) {
    case '"': lb_puts(b, "\\\""); break;
    case '\\': lb_puts(b, "\\\\"); break;
    case '\n': lb_puts(b, "\\n"); break;
    case '\r': lb_puts(b, "\\r"); break;
    case '\t': lb_puts(b, "\\t"); break;
    default:
        if (c < 0x20 || c == 0x7F)
            put_hex_escape(b, "\\u", c, 4);
        else
            lb_putc(b, (char)c);
    }
}

static void put_quoted(struct lbuf *b, const unsigned char *s, size_t n)
{
    size_t i = 0, k;
    uint32_t cp;

    lb_putc(b, '"');
    while (i < n) {
        if (s[i] < 0x80) {
            put_ascii_escaped(b, s[i++]);
            continue;
        }
        k = utf8_seq(s + i, n - i, &cp);
        if (k == 0) {
            put_hex_escape(b, "\\x", s[i++], 2);
        } else {
            if (cp_hidden(cp))
                put_hex_escape(b, "\\u", cp, 4);
            else
                lb_put(b, s + i, k);
            i += k;
        }
    }
    lb_putc(b, '"');
}

static void put_value(struct lbuf *b, const char *v)
{
    const unsigned char *s = (const unsigned char *)(v != NULL ? v : "");
    size_t n = strlen((const char *)s);

    if (needs_quotes(s, n))
        put_quoted(b, s, n);
    else
        lb_put(b, s, n);
}

/* ---- keys --------------------------------------------------------------- */

static bool key_reserved(const char *k)
{
    return strcmp(k, "ts") == 0 || strcmp(k, "level") == 0 || strcmp(k, "msg") == 0 ||
           strcmp(k, "suppressed") == 0;
}

/* The caller key as written: bytes outside [A-Za-z0-9_.-] become '_', a
 * reserved name gets a leading '_', "" becomes "_", and it is cut at
 * KEY_MAX bytes. out holds KEY_MAX + 1. */
static const char *clean_key(const char *k, char *out)
{
    size_t n = 0;

    if (key_reserved(k))
        out[n++] = '_';
    for (; *k != '\0' && n < KEY_MAX; k++)
        out[n++] = key_char((unsigned char)*k) ? *k : '_';
    if (n == 0)
        out[n++] = '_';
    out[n] = '\0';
    return out;
}

/* ---- line builders ------------------------------------------------------ */

static void timestamp(char *out, size_t len)
{
    struct timespec ts;
    struct tm tm;
    size_t n;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(out, len, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, len - n, ".%03uZ", (unsigned)(ts.tv_nsec / 1000000) % 1000u);
}

static void build_logfmt(struct lbuf *b, const char *ts, enum log_level level,
                         const char *msg, const struct field *f, size_t nf,
                         const uint64_t *suppressed)
{
    char key[KEY_MAX + 1], num[LOG_NUM_MAX];

    lb_puts(b, "ts=");
    lb_puts(b, ts);
    lb_puts(b, " level=");
    lb_puts(b, log_level_name(level));
    lb_puts(b, " msg=");
    put_value(b, msg);
    for (size_t i = 0; i < nf; i++) {
        lb_putc(b, ' ');
        lb_puts(b, clean_key(f[i].key, key));
        lb_putc(b, '=');
        put_value(b, f[i].val);
    }
    if (suppressed != NULL) {
        lb_puts(b, " suppressed=");
        lb_puts(b, log_u64(num, *suppressed));
    }
    lb_putc(b, '\n');
}

/* A jansson string for v: bytes that are not valid UTF-8 become the text
 * \xNN first, because jansson only takes valid UTF-8. NULL v -> null. */
static json_t *json_value(const char *v)
{
    const unsigned char *s = (const unsigned char *)v;
    char stack[512];
    struct lbuf b;
    size_t i = 0, n, k;
    uint32_t cp;
    json_t *j;

    if (v == NULL)
        return json_null();
    n = strlen(v);
    lb_init(&b, stack, sizeof(stack));
    while (i < n) {
        k = utf8_seq(s + i, n - i, &cp);
        if (k == 0) {
            put_hex_escape(&b, "\\x", s[i++], 2);
        } else {
            lb_put(&b, s + i, k);
            i += k;
        }
    }
    j = b.oom ? NULL : json_stringn(b.p, b.len);
    lb_free(&b);
    return j;
}

/* Serialise o into b (its whole capacity, growing it once if needed) plus
 * a newline. false if jansson fails or memory runs out. */
static bool dump_json(struct lbuf *b, const json_t *o)
{
    const size_t flags = JSON_COMPACT | JSON_ENSURE_ASCII | JSON_PRESERVE_ORDER;
    size_t need = json_dumpb(o, b->p, b->cap, flags);

    if (need == 0)
        return false;
    if (need > b->cap) {
        if (!lb_room(b, need) || json_dumpb(o, b->p, b->cap, flags) != need)
            return false;
    }
    b->len = need;
    lb_putc(b, '\n');
    return !b->oom;
}

/* Returns false when jansson could not allocate: the line is dropped. */
static bool build_json(struct lbuf *b, const char *ts, enum log_level level, const char *msg,
                       const struct field *f, size_t nf, const uint64_t *suppressed)
{
    char key[KEY_MAX + 1];
    json_t *o = json_object();
    bool ok = o != NULL;

    ok = ok && json_object_set_new(o, "ts", json_string(ts)) == 0;
    ok = ok && json_object_set_new(o, "level", json_string(log_level_name(level))) == 0;
    ok = ok && json_object_set_new(o, "msg", json_value(msg)) == 0;
    for (size_t i = 0; ok && i < nf; i++)
        ok = json_object_set_new(o, clean_key(f[i].key, key), json_value(f[i].val)) == 0;
    if (ok && suppressed != NULL)
        ok = json_object_set_new(o, "suppressed", json_integer((json_int_t)*suppressed)) == 0;
    ok = ok && dump_json(b, o);
    json_decref(o);
    return ok;
}

static void write_line(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(conf.fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

/* suppressed: the value of a trailing suppressed=N field, or NULL. */
static void emit(enum log_level level, const char *msg, const struct field *f, size_t nf,
                 const uint64_t *suppressed)
{
    char stack[LINE_STACK], ts[40];
    struct lbuf b;
    bool ok = true;
    int saved = errno;

    timestamp(ts, sizeof(ts));
    lb_init(&b, stack, sizeof(stack));
    if (conf.format == LOG_JSON)
        ok = build_json(&b, ts, level, msg, f, nf, suppressed);
    else
        build_logfmt(&b, ts, level, msg, f, nf, suppressed);
    if (ok && !b.oom)
        write_line(b.p, b.len);
    lb_free(&b);
    errno = saved;
}

/* Reads pairs up to the NULL key, keeping the first `max`. */
static size_t collect(va_list ap, struct field *f, size_t max)
{
    size_t n = 0;
    const char *k, *v;

    while ((k = va_arg(ap, const char *)) != NULL) {
        v = va_arg(ap, const char *);
        if (n < max)
            f[n++] = (struct field){ k, v };
    }
    return n;
}

/* ---- public ------------------------------------------------------------- */

void log_setup(enum log_level level, enum log_format format, FILE *out)
{
    if (out == NULL)
        out = stderr;
    fflush(out);   /* whatever stdio still holds goes before our lines */
    conf.level = level;
    conf.format = format;
    conf.fd = fileno(out);
}

bool log_enabled(enum log_level level)
{
    return level <= conf.level;
}

const char *log_level_name(enum log_level level)
{
    switch (level) {
    case LOG_ERROR: return "error";
    case LOG_WARN: return "warn";
    case LOG_INFO: return "info";
    case LOG_DEBUG: return "debug";
    }
    return "unknown";
}

int log_level_parse(const char *name, enum log_level *out)
{
    for (enum log_level l = LOG_ERROR; l <= LOG_DEBUG; l++) {
        if (strcmp(name, log_level_name(l)) == 0) {
            *out = l;
            return 0;
        }
    }
    return -1;
}

int log_format_parse(const char *name, enum log_format *out)
{
    if (strcmp(name, "logfmt") == 0)
        *out = LOG_LOGFMT;
    else if (strcmp(name, "json") == 0)
        *out = LOG_JSON;
    else
        return -1;
    return 0;
}

void log_msgv(enum log_level level, const char *msg, va_list ap)
{
    struct field f[LOG_MAX_FIELDS];
    size_t nf;

    if (!log_enabled(level))
        return;
    nf = collect(ap, f, LOG_MAX_FIELDS);
    emit(level, msg, f, nf, NULL);
}

void log_msg(enum log_level level, const char *msg, ...)
{
    va_list ap;

    va_start(ap, msg);
    log_msgv(level, msg, ap);
    va_end(ap);
}

void log_rl_init(struct log_rl *rl, unsigned burst)
{
    *rl = (struct log_rl){ .burst = burst };
    pthread_mutex_init(&rl->lock, NULL);
}

bool log_rl_allow(struct log_rl *rl, uint64_t now_sec, uint64_t *suppressed)
{
    bool pass;

    pthread_mutex_lock(&rl->lock);
    if (now_sec != rl->sec) {
        rl->sec = now_sec;
        rl->passed = 0;
    }
    pass = rl->passed < rl->burst;
    if (pass) {
        rl->passed++;
        *suppressed = rl->suppressed;
        rl->suppressed = 0;
    } else {
        rl->suppressed++;
    }
    pthread_mutex_unlock(&rl->lock);
    return pass;
}

void log_ratelimited(struct log_rl *rl, enum log_level level, const char *msg, ...)
{
    struct field f[LOG_MAX_FIELDS];
    struct timespec now;
    uint64_t dropped;
    va_list ap;
    size_t nf;

    if (!log_enabled(level))
        return;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (!log_rl_allow(rl, (uint64_t)now.tv_sec, &dropped))
        return;
    va_start(ap, msg);
    nf = collect(ap, f, LOG_MAX_FIELDS);
    va_end(ap);
    emit(level, msg, f, nf, dropped > 0 ? &dropped : NULL);
}

const char *log_u64(char *buf, uint64_t v)
{
    snprintf(buf, LOG_NUM_MAX, "%" PRIu64, v);
    return buf;
}

const char *log_i64(char *buf, int64_t v)
{
    snprintf(buf, LOG_NUM_MAX, "%" PRId64, v);
    return buf;
}

const char *log_printf(char *buf, size_t len, const char *fmt, ...)
{
    va_list ap;

    if (len == 0)
        return "";
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
    return buf;
}
