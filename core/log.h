/* core/log.h - one line per event, key=value, with levels.
 *
 * A line is a timestamp, a level, a message and caller key/value pairs:
 *
 *   logfmt: ts=2026-11-26T07:06:49.123Z level=info msg="tunnel up" peer=203.0.113.7:5555 host=example.com
 *   json:   {"ts":"2026-11-26T07:06:49.123Z","level":"info","msg":"tunnel up","peer":"203.0.113.7:5555","host":"example.com"}
 *
 * Call style: NULL-terminated pairs of C strings after the message,
 *
 *   log_msg(LOG_INFO, "tunnel up", "peer", peer, "host", name, NULL);
 *
 * with LOG_U64(n), LOG_I64(n) and LOG_PRINTF(fmt, ...) for values that are
 * not strings yet (each expands to a temporary buffer that lives until the
 * end of the enclosing block, so it is valid for the call).
 *
 * Configuration: log_setup() is called once, before any thread starts; the
 * settings are read-only afterwards (the one process-wide state of this
 * module, like a config). Until then lines go to stderr at level info in
 * logfmt.
 *
 * Threads: any thread may log at any time. Each line is formatted into a
 * private buffer and written with one write(2) to the fd of the FILE given
 * to log_setup() (stdio buffering is bypassed), so lines of concurrent
 * threads never interleave (a pipe guarantees it up to PIPE_BUF = 4096
 * bytes; Linux serialises writes to one regular file). Only EINTR and a
 * short write are retried; any other failure drops the line. Logging never
 * fails the caller and leaves errno as it was.
 *
 * Hostile values: every value (the message too) may carry peer-controlled
 * bytes (SNI names, PROXY headers, token claims). They can never break a
 * line or forge a key:
 *   - logfmt quotes a value that is empty or holds a space, '=', '"', '\',
 *     a control byte, an invalid UTF-8 byte, a C1 control, U+2028/U+2029
 *     or a bidi override; inside the quotes \" \\ \n \r \t, \u00XX for
 *     other controls, \uXXXX for the dangerous code points and \xNN for
 *     each byte that is not valid UTF-8. Valid UTF-8 otherwise stays raw.
 *   - json is built and serialised by jansson with every control and
 *     non-ASCII character escaped (\uXXXX; DEL stays raw, as JSON allows);
 *     bytes that are not valid UTF-8 are first
 *     replaced by the four characters \xNN (so the JSON value reads
 *     "\\xNN").
 *   - keys are meant to be string literals; any byte outside
 *     [A-Za-z0-9_.-] is replaced by '_' (an empty key becomes "_"), and a
 *     caller key equal to ts, level, msg or suppressed gets a leading '_'.
 * A NULL value is written as an empty string in logfmt ("") and as null
 * in json. At most LOG_MAX_FIELDS pairs are written; more are dropped.
 *
 * SECRETS: callers never pass Fernet keys, tokens, tunnel keys/IVs, or
 * challenge bytes as values, at any level. Log what identifies the event
 * (peer, host name, reason, counts), never what authenticates it.
 *
 * Names: this header defines LOG_ERROR..LOG_DEBUG and cannot be combined
 * with <syslog.h> (whose LOG_INFO/LOG_DEBUG macros would replace them).
 */
#ifndef CORE_LOG_H
#define CORE_LOG_H

#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#ifdef LOG_INFO
#error "core/log.h: LOG_INFO is already a macro (<syslog.h>?); do not include both"
#endif

enum log_level {
    LOG_ERROR = 1,
    LOG_WARN = 2,
    LOG_INFO = 3,
    LOG_DEBUG = 4,
};

enum log_format {
    LOG_LOGFMT = 1,
    LOG_JSON = 2,
};

/* Caller key/value pairs written per line at most. */
#define LOG_MAX_FIELDS 32

/* Lines at `level` or more severe are written (LOG_INFO writes error, warn
 * and info). out is where lines go (its fd is written directly; it stays
 * the caller's and must stay open); NULL means stderr. Call once, before
 * threads start. */
void log_setup(enum log_level level, enum log_format format, FILE *out);

/* Whether a line at `level` would be written: one compare, for guarding
 * the formatting of debug values. */
bool log_enabled(enum log_level level);

/* "error", "warn", "info", "debug" <-> enum; 0 on success, -1 for an
 * unknown name (then *out is untouched). For --log-level/--log-format. */
int log_level_parse(const char *name, enum log_level *out);
int log_format_parse(const char *name, enum log_format *out);
const char *log_level_name(enum log_level level);

/* Write one line: msg, then NULL-terminated key/value string pairs. The
 * strings are only read during the call. */
void log_msg(enum log_level level, const char *msg, ...)
    __attribute__((sentinel));
void log_msgv(enum log_level level, const char *msg, va_list ap);

/* ---- rate limiting ----------------------------------------------------- */

/* At most `burst` lines per wall-clock second (CLOCK_MONOTONIC) pass one
 * struct log_rl; the others are counted and the next line that passes
 * carries suppressed=N. Embed one per call site that a peer can trigger
 * repeatedly (in the shard struct, or `static` at the call site: it is
 * thread-safe). Initialise with LOG_RL_INIT(burst) or log_rl_init(). */
struct log_rl {
    unsigned burst;
    /* private */
    pthread_mutex_t lock;
    uint64_t sec;        /* the second `passed` counts lines of */
    unsigned passed;
    uint64_t suppressed; /* since the last line that passed */
};

#define LOG_RL_INIT(n) { .burst = (n), .lock = PTHREAD_MUTEX_INITIALIZER }

void log_rl_init(struct log_rl *rl, unsigned burst);

/* The decision alone, at time now_sec (seconds on any monotonic clock):
 * true if the line passes, with *suppressed set to the number of lines
 * dropped since the previous pass (and reset); false if it is dropped
 * (and counted). */
bool log_rl_allow(struct log_rl *rl, uint64_t now_sec, uint64_t *suppressed);

/* log_msg() through rl. Lines below the configured level are neither
 * written nor counted. */
void log_ratelimited(struct log_rl *rl, enum log_level level, const char *msg, ...)
    __attribute__((sentinel));

/* ---- value helpers ------------------------------------------------------- */

#define LOG_NUM_MAX 24   /* "-9223372036854775808" + NUL fits */
#define LOG_PRINTF_MAX 128

/* Format into buf and return it. log_u64/log_i64: buf holds LOG_NUM_MAX
 * bytes. log_printf: len bytes, a longer result is cut. */
const char *log_u64(char *buf, uint64_t v);
const char *log_i64(char *buf, int64_t v);
const char *log_printf(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define LOG_U64(v) log_u64((char[LOG_NUM_MAX]){0}, (uint64_t)(v))
#define LOG_I64(v) log_i64((char[LOG_NUM_MAX]){0}, (int64_t)(v))
#define LOG_PRINTF(...) log_printf((char[LOG_PRINTF_MAX]){0}, LOG_PRINTF_MAX, __VA_ARGS__)

#endif
