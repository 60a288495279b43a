/* tests/unit/test_log.c - core/log: both formats, hostile values, levels,
 * rate limiting, concurrent writers.
 *
 * Every test sends the log to a tmpfile() and reads back what the fd got.
 * A logfmt line is checked byte for byte after its 24-byte timestamp; a
 * json line is parsed with jansson and compared value by value, and its
 * text checked to be one printable ASCII line.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/log.h"

#define TS_LEN 24 /* 2026-11-26T07:06:49.123Z */

/* ---- helpers ------------------------------------------------------------ */

static FILE *capture(enum log_level level, enum log_format format)
{
    FILE *f = tmpfile();
    cr_assert_not_null(f);
    log_setup(level, format, f);
    return f;
}

/* Everything written to f's fd so far, NUL-terminated (caller frees). */
static char *captured(FILE *f)
{
    int fd = fileno(f);
    off_t n = lseek(fd, 0, SEEK_END);
    char *buf = malloc((size_t)n + 1);

    cr_assert(n >= 0 && buf != NULL);
    cr_assert_eq(pread(fd, buf, (size_t)n, 0), n);
    buf[n] = '\0';
    return buf;
}

static size_t count_lines(const char *s)
{
    size_t n = 0;
    for (; *s != '\0'; s++)
        n += *s == '\n';
    return n;
}

static bool is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* "YYYY-MM-DDTHH:MM:SS.mmmZ" */
static void assert_ts(const char *ts)
{
    static const char shape[] = "dddd-dd-ddTdd:dd:dd.dddZ";
    for (size_t i = 0; i < TS_LEN; i++) {
        if (shape[i] == 'd')
            cr_assert(is_digit(ts[i]), "timestamp %.24s at %zu", ts, i);
        else
            cr_assert_eq(ts[i], shape[i], "timestamp %.24s at %zu", ts, i);
    }
}

/* The one logfmt line in f, past "ts=<timestamp> " (checked). */
static char *logfmt_body(FILE *f)
{
    char *all = captured(f);
    cr_assert_eq(count_lines(all), 1, "want one line, got: %s", all);
    cr_assert_eq(strncmp(all, "ts=", 3), 0);
    assert_ts(all + 3);
    cr_assert_eq(all[3 + TS_LEN], ' ');
    memmove(all, all + 4 + TS_LEN, strlen(all + 4 + TS_LEN) + 1);
    return all;
}

/* The one json line in f, parsed; its text must be printable ASCII (DEL
 * allowed: JSON does not escape it, and it breaks no line). */
static json_t *json_line(FILE *f, char **text)
{
    char *all = captured(f);
    json_error_t e;
    json_t *j;
    size_t n = strlen(all);

    cr_assert_eq(count_lines(all), 1, "want one line, got: %s", all);
    cr_assert_eq(all[n - 1], '\n');
    for (size_t i = 0; i + 1 < n; i++)
        cr_assert(all[i] >= 0x20 && all[i] <= 0x7f, "byte %zu of %s", i, all);
    j = json_loads(all, 0, &e);
    cr_assert_not_null(j, "json: %s in %s", e.text, all);
    cr_assert(json_is_object(j));
    if (text != NULL)
        *text = all;
    else
        free(all);
    return j;
}

static const char *jstr(json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    cr_assert(json_is_string(v), "key %s", key);
    return json_string_value(v);
}

/* ---- logfmt ------------------------------------------------------------- */

Test(log_logfmt, brief_example)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    log_msg(LOG_INFO, "tunnel up", "peer", "203.0.113.7:5555", "host", "example.com", NULL);
    char *body = logfmt_body(f);
    cr_assert_str_eq(body, "level=info msg=\"tunnel up\" peer=203.0.113.7:5555 host=example.com\n");
    free(body);
}

Test(log_logfmt, levels_and_no_fields)
{
    FILE *f = capture(LOG_DEBUG, LOG_LOGFMT);
    log_msg(LOG_ERROR, "e", NULL);
    log_msg(LOG_WARN, "w", NULL);
    log_msg(LOG_INFO, "i", NULL);
    log_msg(LOG_DEBUG, "d", NULL);
    char *all = captured(f);
    const char *want[] = { "level=error msg=e\n", "level=warn msg=w\n", "level=info msg=i\n",
                           "level=debug msg=d\n" };
    char *p = all;
    for (size_t i = 0; i < 4; i++) {
        assert_ts(p + 3);
        p += 4 + TS_LEN;
        cr_assert_eq(strncmp(p, want[i], strlen(want[i])), 0, "line %zu: %s", i, p);
        p += strlen(want[i]);
    }
    cr_assert_eq(*p, '\0');
    free(all);
}

/* value -> its logfmt encoding */
static const struct { const char *in, *out; } values[] = {
    { "plain", "plain" },
    { "", "\"\"" },
    { "a b", "\"a b\"" },
    { "a=b", "\"a=b\"" },
    { "x\" forged=1", "\"x\\\" forged=1\"" },
    { "line\nts=0 level=error msg=forged", "\"line\\nts=0 level=error msg=forged\"" },
    { "\r\t", "\"\\r\\t\"" },
    { "back\\slash", "\"back\\\\slash\"" },
    { "\x01\x1f\x7f", "\"\\u0001\\u001F\\u007F\"" },
    { "\xff\xfe", "\"\\xFF\\xFE\"" },
    { "caf\xc3\xa9", "caf\xc3\xa9" },                      /* valid UTF-8 stays raw */
    { "\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80" },            /* U+1F600 */
    { "\xc3", "\"\\xC3\"" },                               /* truncated */
    { "\xc3(", "\"\\xC3(\"" },                             /* bad continuation */
    { "\xc0\xaf", "\"\\xC0\\xAF\"" },                      /* overlong '/' */
    { "\xe0\x80\xaf", "\"\\xE0\\x80\\xAF\"" },             /* overlong, 3 bytes */
    { "\xed\xa0\x80", "\"\\xED\\xA0\\x80\"" },             /* surrogate D800 */
    { "\xf4\x90\x80\x80", "\"\\xF4\\x90\\x80\\x80\"" },    /* above U+10FFFF */
    { "\xc2\x85", "\"\\u0085\"" },                         /* NEL (C1) */
    { "a\xe2\x80\xa8z", "\"a\\u2028z\"" },                 /* LINE SEPARATOR */
    { "\xe2\x80\xa9", "\"\\u2029\"" },                     /* PARAGRAPH SEPARATOR */
    { "\xe2\x80\xae" "gro", "\"\\u202Egro\"" },            /* RIGHT-TO-LEFT OVERRIDE */
    { "\xe2\x81\xa6", "\"\\u2066\"" },                     /* LEFT-TO-RIGHT ISOLATE */
    { "\xef\xbb\xbf", "\"\\uFEFF\"" },                     /* BOM */
    { "x.example.com", "x.example.com" },
    { "[2001:db8::1]:443", "[2001:db8::1]:443" },
};

Test(log_logfmt, hostile_values)
{
    for (size_t i = 0; i < sizeof(values) / sizeof(values[0]); i++) {
        FILE *f = capture(LOG_INFO, LOG_LOGFMT);
        log_msg(LOG_INFO, "m", "v", values[i].in, NULL);
        char *body = logfmt_body(f);
        char want[256];
        snprintf(want, sizeof(want), "level=info msg=m v=%s\n", values[i].out);
        cr_assert_str_eq(body, want, "value %zu", i);
        free(body);
        fclose(f);
    }
}

Test(log_logfmt, hostile_message)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    log_msg(LOG_INFO, "bad\nlevel=error", NULL);
    char *body = logfmt_body(f);
    cr_assert_str_eq(body, "level=info msg=\"bad\\nlevel=error\"\n");
    free(body);
}

Test(log_logfmt, keys_sanitised)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    log_msg(LOG_INFO, "m", "bad key", "1", "a=b", "2", "", "3", "msg", "4", "level", "5",
            "ts", "6", "suppressed", "7", "ok.key-1_x", "8", "k\"\n", "9", NULL);
    char *body = logfmt_body(f);
    cr_assert_str_eq(body, "level=info msg=m bad_key=1 a_b=2 _=3 _msg=4 _level=5 _ts=6 "
                           "_suppressed=7 ok.key-1_x=8 k__=9\n");
    free(body);
}

Test(log_logfmt, long_key_cut)
{
    char key[100];
    memset(key, 'k', 99);
    key[99] = '\0';
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    log_msg(LOG_INFO, "m", key, "v", NULL);
    char *body = logfmt_body(f);
    char want[200];
    snprintf(want, sizeof(want), "level=info msg=m %.64s=v\n", key);
    cr_assert_str_eq(body, want);
    free(body);
}

Test(log_logfmt, null_value)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    log_msg(LOG_INFO, "m", "a", NULL, "b", "x", NULL);
    char *body = logfmt_body(f);
    cr_assert_str_eq(body, "level=info msg=m a=\"\" b=x\n");
    free(body);
}

Test(log_logfmt, max_fields)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    /* 34 pairs: the last two are dropped */
    log_msg(LOG_INFO, "m", "a", "1", "a", "2", "a", "3", "a", "4", "a", "5", "a", "6", "a", "7",
            "a", "8", "a", "9", "a", "10", "a", "11", "a", "12", "a", "13", "a", "14", "a", "15",
            "a", "16", "a", "17", "a", "18", "a", "19", "a", "20", "a", "21", "a", "22", "a",
            "23", "a", "24", "a", "25", "a", "26", "a", "27", "a", "28", "a", "29", "a", "30",
            "a", "31", "a", "32", "a", "33", "a", "34", NULL);
    char *body = logfmt_body(f);
    char want[512];
    size_t n = (size_t)snprintf(want, sizeof(want), "level=info msg=m");
    for (int i = 1; i <= LOG_MAX_FIELDS; i++)
        n += (size_t)snprintf(want + n, sizeof(want) - n, " a=%d", i);
    snprintf(want + n, sizeof(want) - n, "\n");
    cr_assert_str_eq(body, want);
    free(body);
}

/* Longer than the 2 KiB stack buffer: goes through the heap, still one
 * intact line. */
Test(log_logfmt, long_line)
{
    size_t n = 10000;
    char *v = malloc(n + 1);
    memset(v, 'a', n);
    v[n] = '\0';
    v[5000] = ' ';
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    log_msg(LOG_INFO, "m", "v", v, NULL);
    char *body = logfmt_body(f);
    cr_assert_eq(strlen(body), strlen("level=info msg=m v=\"\"\n") + n);
    cr_assert_eq(strncmp(body + 20, v, n), 0);
    cr_assert_str_eq(body + 20 + n, "\"\n");
    free(body);
    free(v);
}

Test(log_logfmt, value_helpers)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    char longer[300];
    memset(longer, 'x', sizeof(longer) - 1);
    longer[sizeof(longer) - 1] = '\0';
    log_msg(LOG_INFO, "m", "u", LOG_U64(UINT64_MAX), "i", LOG_I64(INT64_MIN), "z", LOG_U64(0),
            "p", LOG_PRINTF("%s-%d", "id", 42), NULL);
    char *body = logfmt_body(f);
    cr_assert_str_eq(body, "level=info msg=m u=18446744073709551615 i=-9223372036854775808 "
                           "z=0 p=id-42\n");
    free(body);
    /* cut at LOG_PRINTF_MAX - 1 characters */
    cr_assert_eq(strlen(LOG_PRINTF("%s", longer)), LOG_PRINTF_MAX - 1);
    char small[4];
    cr_assert_str_eq(log_printf(small, sizeof(small), "%d", 12345), "123");
    cr_assert_str_eq(log_printf(small, 0, "%d", 1), "");
}

Test(log_logfmt, errno_preserved)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    errno = ECONNRESET;
    log_msg(LOG_INFO, "m", "v", "x", NULL);
    cr_assert_eq(errno, ECONNRESET);
    fclose(f);
}

/* ---- json --------------------------------------------------------------- */

Test(log_json, brief_example)
{
    FILE *f = capture(LOG_INFO, LOG_JSON);
    char *text;
    log_msg(LOG_INFO, "tunnel up", "peer", "203.0.113.7:5555", "host", "example.com", NULL);
    json_t *j = json_line(f, &text);
    char want[256];
    snprintf(want, sizeof(want),
             "{\"ts\":\"%s\",\"level\":\"info\",\"msg\":\"tunnel up\","
             "\"peer\":\"203.0.113.7:5555\",\"host\":\"example.com\"}\n", jstr(j, "ts"));
    assert_ts(jstr(j, "ts"));
    cr_assert_eq(strlen(jstr(j, "ts")), TS_LEN);
    cr_assert_str_eq(text, want);
    cr_assert_eq(json_object_size(j), 5);
    free(text);
    json_decref(j);
}

/* value in -> the string a JSON parser reads back */
static const struct { const char *in, *decoded; } jvalues[] = {
    { "plain", "plain" },
    { "", "" },
    { "x\",\"level\":\"error", "x\",\"level\":\"error" },
    { "line\n{\"forged\":1}", "line\n{\"forged\":1}" },
    { "\r\t\\\x01\x7f", "\r\t\\\x01\x7f" },
    { "\xff\xfe", "\\xFF\\xFE" },
    { "caf\xc3\xa9", "caf\xc3\xa9" },
    { "\xc3", "\\xC3" },
    { "\xc0\xaf", "\\xC0\\xAF" },
    { "\xed\xa0\x80", "\\xED\\xA0\\x80" },
    { "a\xe2\x80\xa8z", "a\xe2\x80\xa8z" },
    { "\xf0\x9f\x98\x80", "\xf0\x9f\x98\x80" },
};

Test(log_json, hostile_values)
{
    for (size_t i = 0; i < sizeof(jvalues) / sizeof(jvalues[0]); i++) {
        FILE *f = capture(LOG_INFO, LOG_JSON);
        log_msg(LOG_INFO, jvalues[i].in, "v", jvalues[i].in, NULL);
        json_t *j = json_line(f, NULL);
        cr_assert_str_eq(jstr(j, "v"), jvalues[i].decoded, "value %zu", i);
        cr_assert_str_eq(jstr(j, "msg"), jvalues[i].decoded, "msg %zu", i);
        cr_assert_str_eq(jstr(j, "level"), "info");
        cr_assert_eq(json_object_size(j), 4, "value %zu", i);
        json_decref(j);
        fclose(f);
    }
}

Test(log_json, non_ascii_escaped)
{
    FILE *f = capture(LOG_INFO, LOG_JSON);
    char *text;
    log_msg(LOG_INFO, "m", "v", "caf\xc3\xa9\xe2\x80\xa8", NULL);
    json_t *j = json_line(f, &text);
    cr_assert_not_null(strstr(text, "\"v\":\"caf\\u00E9\\u2028\"}"), "%s", text);
    free(text);
    json_decref(j);
}

Test(log_json, keys_null_and_reserved)
{
    FILE *f = capture(LOG_INFO, LOG_JSON);
    log_msg(LOG_INFO, "m", "msg", "forged", "level", "x", "bad key", "1", "n", NULL, NULL);
    json_t *j = json_line(f, NULL);
    cr_assert_str_eq(jstr(j, "msg"), "m");
    cr_assert_str_eq(jstr(j, "level"), "info");
    cr_assert_str_eq(jstr(j, "_msg"), "forged");
    cr_assert_str_eq(jstr(j, "_level"), "x");
    cr_assert_str_eq(jstr(j, "bad_key"), "1");
    cr_assert(json_is_null(json_object_get(j, "n")));
    cr_assert_eq(json_object_size(j), 7);
    json_decref(j);
}

Test(log_json, long_line)
{
    size_t n = 10000;
    char *v = malloc(n + 1);
    memset(v, 'b', n);
    v[n] = '\0';
    FILE *f = capture(LOG_INFO, LOG_JSON);
    log_msg(LOG_INFO, "m", "v", v, NULL);
    json_t *j = json_line(f, NULL);
    cr_assert_str_eq(jstr(j, "v"), v);
    json_decref(j);
    free(v);
}

/* ---- levels and names --------------------------------------------------- */

Test(log_level, filter)
{
    FILE *f = capture(LOG_WARN, LOG_LOGFMT);
    cr_assert(log_enabled(LOG_ERROR));
    cr_assert(log_enabled(LOG_WARN));
    cr_assert_not(log_enabled(LOG_INFO));
    cr_assert_not(log_enabled(LOG_DEBUG));
    log_msg(LOG_DEBUG, "d", NULL);
    log_msg(LOG_INFO, "i", NULL);
    log_msg(LOG_WARN, "w", NULL);
    log_msg(LOG_ERROR, "e", NULL);
    char *all = captured(f);
    cr_assert_eq(count_lines(all), 2);
    cr_assert_not_null(strstr(all, " level=warn msg=w\n"));
    cr_assert_not_null(strstr(all, " level=error msg=e\n"));
    free(all);

    f = capture(LOG_ERROR, LOG_JSON);
    cr_assert_not(log_enabled(LOG_WARN));
    log_msg(LOG_WARN, "w", NULL);
    all = captured(f);
    cr_assert_str_eq(all, "");
    free(all);
}

Test(log_level, names)
{
    enum log_level l = LOG_INFO;
    enum log_format fm = LOG_JSON;
    const char *names[] = { "error", "warn", "info", "debug" };
    for (int i = 0; i < 4; i++) {
        cr_assert_eq(log_level_parse(names[i], &l), 0);
        cr_assert_eq(l, (enum log_level)(LOG_ERROR + i));
        cr_assert_str_eq(log_level_name(l), names[i]);
    }
    l = LOG_WARN;
    cr_assert_eq(log_level_parse("INFO", &l), -1);
    cr_assert_eq(log_level_parse("warning", &l), -1);
    cr_assert_eq(log_level_parse("", &l), -1);
    cr_assert_eq(l, LOG_WARN);
    cr_assert_str_eq(log_level_name((enum log_level)0), "unknown");
    cr_assert_eq(log_format_parse("logfmt", &fm), 0);
    cr_assert_eq(fm, LOG_LOGFMT);
    cr_assert_eq(log_format_parse("json", &fm), 0);
    cr_assert_eq(fm, LOG_JSON);
    cr_assert_eq(log_format_parse("text", &fm), -1);
    cr_assert_eq(fm, LOG_JSON);
}

/* ---- rate limiting ------------------------------------------------------ */

Test(log_rl, decisions)
{
    struct log_rl rl = LOG_RL_INIT(3);
    uint64_t s = 99;
    /* second 100: three pass, four dropped */
    for (int i = 0; i < 3; i++) {
        cr_assert(log_rl_allow(&rl, 100, &s));
        cr_assert_eq(s, 0);
    }
    for (int i = 0; i < 4; i++)
        cr_assert_not(log_rl_allow(&rl, 100, &s));
    /* second 101: the first line carries the 4 */
    cr_assert(log_rl_allow(&rl, 101, &s));
    cr_assert_eq(s, 4);
    cr_assert(log_rl_allow(&rl, 101, &s));
    cr_assert_eq(s, 0);
    cr_assert(log_rl_allow(&rl, 101, &s));
    cr_assert_eq(s, 0);
    cr_assert_not(log_rl_allow(&rl, 101, &s));
    /* a later second, not the next one: still 1 suppressed */
    cr_assert(log_rl_allow(&rl, 205, &s));
    cr_assert_eq(s, 1);

    struct log_rl none;
    log_rl_init(&none, 0);
    cr_assert_not(log_rl_allow(&none, 1, &s));
    cr_assert_not(log_rl_allow(&none, 2, &s));
    cr_assert_eq(none.suppressed, 2);
    pthread_mutex_destroy(&none.lock);
}

static uint64_t mono_sec(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec;
}

/* Wait until CLOCK_MONOTONIC enters a new second. */
static void next_second(void)
{
    uint64_t s = mono_sec();
    while (mono_sec() == s)
        usleep(1000);
}

static void ratelimited_suppressed(enum log_format fmt)
{
    FILE *f = capture(LOG_INFO, fmt);
    struct log_rl rl = LOG_RL_INIT(2);

    next_second();   /* the five calls below then fall in one second */
    for (int i = 0; i < 5; i++)
        log_ratelimited(&rl, LOG_WARN, "flood", "i", LOG_U64(i), NULL);
    next_second();
    log_ratelimited(&rl, LOG_WARN, "flood", "i", "5", NULL);
    char *all = captured(f);
    cr_assert_eq(count_lines(all), 3, "%s", all);
    if (fmt == LOG_LOGFMT) {
        cr_assert_not_null(strstr(all, " level=warn msg=flood i=0\n"));
        cr_assert_not_null(strstr(all, " level=warn msg=flood i=1\n"));
        cr_assert_not_null(strstr(all, " level=warn msg=flood i=5 suppressed=3\n"));
    } else {
        cr_assert_not_null(strstr(all, ",\"i\":\"5\",\"suppressed\":3}\n"), "%s", all);
    }
    free(all);
}

Test(log_rl, logfmt_suppressed_count, .timeout = 10)
{
    ratelimited_suppressed(LOG_LOGFMT);
}

Test(log_rl, json_suppressed_count, .timeout = 10)
{
    ratelimited_suppressed(LOG_JSON);
}

Test(log_rl, filtered_level_not_counted)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    struct log_rl rl = LOG_RL_INIT(1);
    for (int i = 0; i < 3; i++)
        log_ratelimited(&rl, LOG_DEBUG, "d", NULL);
    cr_assert_eq(rl.suppressed, 0);
    cr_assert_eq(rl.passed, 0);
    char *all = captured(f);
    cr_assert_str_eq(all, "");
    free(all);
}

/* ---- concurrency -------------------------------------------------------- */

#define THREADS 4
#define LINES 300
#define PAD 3000

struct writer {
    int id;
    const char *pad;
};

static void *write_lines(void *arg)
{
    const struct writer *w = arg;
    for (int i = 0; i < LINES; i++)
        log_msg(LOG_INFO, "line", "t", LOG_I64(w->id), "i", LOG_I64(i), "pad", w->pad, NULL);
    return NULL;
}

/* Lines of 3 KB from four threads: every line comes out whole. */
Test(log_threads, lines_never_interleave, .timeout = 30)
{
    FILE *f = capture(LOG_INFO, LOG_LOGFMT);
    char pads[THREADS][PAD + 1];
    struct writer w[THREADS];
    pthread_t th[THREADS];
    int seen[THREADS] = { 0 };

    for (int t = 0; t < THREADS; t++) {
        memset(pads[t], 'a' + t, PAD);
        pads[t][PAD] = '\0';
        w[t] = (struct writer){ t, pads[t] };
        cr_assert_eq(pthread_create(&th[t], NULL, write_lines, &w[t]), 0);
    }
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);

    char *all = captured(f);
    cr_assert_eq(count_lines(all), THREADS * LINES);
    for (char *line = all, *end; *line != '\0'; line = end + 1) {
        int t, i, off = 0;
        end = strchr(line, '\n');
        cr_assert_not_null(end);
        cr_assert_eq(sscanf(line + 4 + TS_LEN, "level=info msg=line t=%d i=%d pad=%n", &t, &i,
                            &off), 2);
        cr_assert(t >= 0 && t < THREADS && off > 0);
        cr_assert_eq(i, seen[t], "thread %d: line %d after %d", t, i, seen[t]);
        seen[t]++;
        cr_assert_eq(end - (line + 4 + TS_LEN + off), PAD);
        cr_assert_eq(strncmp(line + 4 + TS_LEN + off, pads[t], PAD), 0);
    }
    free(all);
}
