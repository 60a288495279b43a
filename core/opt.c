/* core/opt.c - see opt.h. */
#include "core/opt.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

__attribute__((format(printf, 2, 3)))
static int fail(struct opt_res *res, const char *fmt, ...)
{
    size_t n = (size_t)snprintf(res->err, sizeof(res->err), "%s: ", res->cmd->prog);
    va_list ap;

    if (n >= sizeof(res->err))
        n = sizeof(res->err) - 1;
    va_start(ap, fmt);
    vsnprintf(res->err + n, sizeof(res->err) - n, fmt, ap);
    va_end(ap);
    return -1;
}

static long find(const struct opt_cmd *cmd, const char *name, size_t len)
{
    for (size_t i = 0; i < cmd->nspecs; i++)
        if (strlen(cmd->specs[i].name) == len && !strncmp(cmd->specs[i].name, name, len))
            return (long)i;
    return -1;
}

/* "a positive integer", "an integer in 0..2": what an OPT_INT accepts. */
static void int_rule(const struct opt_spec *s, char *buf, size_t n)
{
    if (s->max == LLONG_MAX && s->min == 1)
        snprintf(buf, n, "a positive integer");
    else if (s->max == LLONG_MAX && s->min == 0)
        snprintf(buf, n, "a non-negative integer");
    else if (s->max == LLONG_MAX)
        snprintf(buf, n, "an integer >= %lld", s->min);
    else
        snprintf(buf, n, "an integer in %lld..%lld", s->min, s->max);
}

static int parse_int(const char *text, long long *out)
{
    char *end;

    /* strtoll would skip leading blanks and accept "" as 0. */
    if (!(text[0] == '-' || text[0] == '+' || (text[0] >= '0' && text[0] <= '9')))
        return -1;
    errno = 0;
    *out = strtoll(text, &end, 10);
    return errno != 0 || end == text || *end != '\0' ? -1 : 0;
}

int opt_parse_bool(const char *text, bool *out)
{
    static const char *const yes[] = { "1", "true", "yes", "on" };
    static const char *const no[] = { "0", "false", "no", "off" };

    for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
        if (!strcasecmp(text, yes[i]))
            return *out = true, 0;
        if (!strcasecmp(text, no[i]))
            return *out = false, 0;
    }
    return -1;
}

static int append(struct opt_res *res, struct opt_val *v, const char *item)
{
    const char **items = realloc(v->items, (v->nitems + 1) * sizeof(*items));

    if (items == NULL)
        return fail(res, "out of memory");
    v->items = items;
    v->items[v->nitems++] = item;
    return 0;
}

/* Store text as spec i's value; label names the source in messages
 * ("--valid-for", "SNITUN_VALID_FOR"). */
static int set_value(struct opt_res *res, size_t i, const char *text, const char *label,
                     enum opt_src src)
{
    const struct opt_spec *s = &res->cmd->specs[i];
    struct opt_val *v = &res->vals[i];
    char rule[96];

    v->src = src;
    switch (s->kind) {
    case OPT_STR:
        v->str = text;
        return 0;
    case OPT_INT:
        v->str = text;
        if (parse_int(text, &v->num) == 0 && v->num >= s->min && v->num <= s->max)
            return 0;
        int_rule(s, rule, sizeof(rule));
        return fail(res, "%s must be %s, got '%s'", label, rule, text);
    case OPT_FLAG:
        if (opt_parse_bool(text, &v->on) == 0)
            return 0;
        return fail(res, "%s must be true or false (1/0, yes/no, on/off), got '%s'",
                    label, text);
    case OPT_LIST:
        return append(res, v, text);
    }
    abort();  /* a spec with no valid kind: bug in the table */
}

/* argv[*k] starts with "--": consume it (and its value). */
static int take_long(struct opt_res *res, int argc, char **argv, int *k)
{
    const char *arg = argv[*k] + 2, *eq = strchr(arg, '=');
    size_t len = eq != NULL ? (size_t)(eq - arg) : strlen(arg);
    long i = find(res->cmd, arg, len);
    char label[128];

    if (i < 0)
        return fail(res, "unknown flag '--%.*s' (see --help)", (int)len, arg);
    const struct opt_spec *s = &res->cmd->specs[i];
    snprintf(label, sizeof(label), "--%s", s->name);
    if (s->kind != OPT_LIST && res->vals[i].src == OPT_ARG)
        return fail(res, "%s given more than once", label);
    if (eq != NULL)
        return set_value(res, (size_t)i, eq + 1, label, OPT_ARG);
    if (s->kind == OPT_FLAG)
        return set_value(res, (size_t)i, "true", label, OPT_ARG);
    if (*k + 1 >= argc)
        return fail(res, "%s needs a value (%s)", label, s->metavar ? s->metavar : "VALUE");
    return set_value(res, (size_t)i, argv[++*k], label, OPT_ARG);
}

static bool is_sep(char c)
{
    return c == ',' || c == '\n';
}

static bool is_blank(char c)
{
    return c == ' ' || c == '\t' || c == '\r';
}

/* A list from the environment: copy it, cut it at separators, trim. */
static int env_list(struct opt_res *res, size_t i, const char *text)
{
    struct opt_val *v = &res->vals[i];
    char *p;

    if ((v->own = strdup(text)) == NULL)
        return fail(res, "out of memory");
    v->src = OPT_ENV;
    p = v->own;
    while (*p != '\0') {
        char *start = p, *end;

        while (*p != '\0' && !is_sep(*p))
            p++;
        end = p;
        if (*p != '\0')
            *p++ = '\0';
        while (start < end && is_blank(*start))
            start++;
        while (end > start && is_blank(end[-1]))
            *--end = '\0';
        if (start < end && append(res, v, start) != 0)
            return -1;
    }
    return 0;
}

/* The environment variable of a spec: its own, or SNITUN_ + the long name
 * upper-cased with '-' as '_' ("valid-for" -> SNITUN_VALID_FOR), so that
 * every flag has one without each table spelling it out. */
const char *opt_env_name(const struct opt_spec *s, char *buf, size_t len)
{
    size_t n;

    if (s->env != NULL)
        return s->env;
    n = (size_t)snprintf(buf, len, "SNITUN_");
    for (const char *p = s->name; *p != '\0' && n + 1 < len; p++)
        buf[n++] = *p == '-' ? '_' : (char)toupper((unsigned char)*p);
    buf[n < len ? n : len - 1] = '\0';
    return buf;
}

static int fill_unset(struct opt_res *res)
{
    for (size_t i = 0; i < res->cmd->nspecs; i++) {
        const struct opt_spec *s = &res->cmd->specs[i];
        char envbuf[96];
        const char *envname = opt_env_name(s, envbuf, sizeof(envbuf));
        const char *env = getenv(envname);
        char label[128];

        if (res->vals[i].src != OPT_UNSET)
            continue;
        if (env != NULL && env[0] != '\0') {
            if (s->kind == OPT_LIST) {
                if (env_list(res, i, env) != 0)
                    return -1;
            } else if (set_value(res, i, env, envname, OPT_ENV) != 0) {
                return -1;
            }
        } else if (s->def != NULL) {
            snprintf(label, sizeof(label), "default of --%s", s->name);
            if (set_value(res, i, s->def, label, OPT_DEFAULT) != 0)
                return -1;
        }
    }
    return 0;
}

static int scan(struct opt_res *res, int argc, char **argv)
{
    bool dashdash = false;

    for (int k = 1; k < argc; k++) {
        const char *a = argv[k];

        if (dashdash || a[0] != '-' || a[1] == '\0') {
            res->pos[res->npos++] = a;
        } else if (!strcmp(a, "--")) {
            dashdash = true;
        } else if (a[1] != '-') {
            return fail(res, "unknown flag '%s' (flags are --long; see --help)", a);
        } else if (take_long(res, argc, argv, &k) != 0) {
            return -1;
        }
    }
    return 0;
}

static bool wants_help(int argc, char **argv)
{
    for (int k = 1; k < argc; k++) {
        if (!strcmp(argv[k], "--"))
            return false;
        if (!strcmp(argv[k], "-h") || !strcmp(argv[k], "--help"))
            return true;
    }
    return false;
}

enum opt_status opt_parse(const struct opt_cmd *cmd, int argc, char **argv,
                          struct opt_res *res)
{
    memset(res, 0, sizeof(*res));
    res->cmd = cmd;
    res->vals = calloc(cmd->nspecs ? cmd->nspecs : 1, sizeof(*res->vals));
    res->pos = calloc(argc > 0 ? (size_t)argc : 1, sizeof(*res->pos));
    if (res->vals == NULL || res->pos == NULL)
        return fail(res, "out of memory"), OPT_ERR;
    /* Help first, so "--help" works next to a mistake. */
    if (wants_help(argc, argv))
        return OPT_HELP;
    if (scan(res, argc, argv) != 0 || fill_unset(res) != 0)
        return OPT_ERR;
    if (res->npos < cmd->min_pos)
        return fail(res, "missing argument %s (see --help)",
                    cmd->args ? cmd->args : ""), OPT_ERR;
    if (res->npos > cmd->max_pos)
        return fail(res, "unexpected argument '%s' (see --help)",
                    res->pos[cmd->max_pos]), OPT_ERR;
    return OPT_OK;
}

int opt_parse_main(const struct opt_cmd *cmd, int argc, char **argv, struct opt_res *res)
{
    switch (opt_parse(cmd, argc, argv, res)) {
    case OPT_OK:
        return -1;
    case OPT_HELP:
        opt_help(cmd, stdout);
        opt_fini(res);
        return 0;
    case OPT_ERR:
        break;
    }
    fprintf(stderr, "%s\n", res->err);
    opt_fini(res);
    return 2;
}

void opt_fini(struct opt_res *res)
{
    if (res->vals != NULL) {
        for (size_t i = 0; i < res->cmd->nspecs; i++) {
            free(res->vals[i].items);
            free(res->vals[i].own);
        }
    }
    free(res->vals);
    free(res->pos);
    res->vals = NULL;
    res->pos = NULL;
    res->npos = 0;
}

static const char *metavar(const struct opt_spec *s)
{
    if (s->kind == OPT_FLAG)
        return "";
    if (s->metavar != NULL)
        return s->metavar;
    return s->kind == OPT_INT ? "N" : "VALUE";
}

/* "--name METAVAR", or "--name" for a flag; returns its length. */
static int flag_text(const struct opt_spec *s, char *buf, size_t n)
{
    const char *m = metavar(s);

    return snprintf(buf, n, "--%s%s%s", s->name, m[0] ? " " : "", m);
}

void opt_help(const struct opt_cmd *cmd, FILE *out)
{
    int width = (int)strlen("-h, --help");
    char left[128];

    fprintf(out, "usage: %s [flags]%s%s\n", cmd->prog, cmd->args ? " " : "",
            cmd->args ? cmd->args : "");
    if (cmd->about != NULL)
        fprintf(out, "\n%s\n", cmd->about);
    for (size_t i = 0; i < cmd->nspecs; i++) {
        const struct opt_spec *s = &cmd->specs[i];
        int w = flag_text(s, left, sizeof(left));
        width = w > width ? w : width;
    }
    fprintf(out, "\nflags:\n");
    for (size_t i = 0; i < cmd->nspecs; i++) {
        const struct opt_spec *s = &cmd->specs[i];

        flag_text(s, left, sizeof(left));
        fprintf(out, "  %-*s  %s", width, left, s->help ? s->help : "");
        if (s->kind == OPT_LIST)
            fprintf(out, " (repeatable)");
        if (s->def != NULL)
            fprintf(out, " [default: %s]", s->def);
        char envbuf[96];
        fprintf(out, " [env: %s%s]", opt_env_name(s, envbuf, sizeof(envbuf)),
                s->kind == OPT_LIST ? ", comma-separated" : "");
        fprintf(out, "\n");
    }
    fprintf(out, "  %-*s  show this help and exit\n", width, "-h, --help");
}

const struct opt_val *opt_get(const struct opt_res *res, const char *name)
{
    long i = find(res->cmd, name, strlen(name));

    /* A name missing from the table is a bug in the caller: stop, even
     * in builds without asserts. */
    if (i < 0)
        abort();
    return &res->vals[i];
}

const char *opt_str(const struct opt_res *res, const char *name)
{
    return opt_get(res, name)->str;
}

long long opt_int(const struct opt_res *res, const char *name)
{
    return opt_get(res, name)->num;
}

bool opt_on(const struct opt_res *res, const char *name)
{
    return opt_get(res, name)->on;
}

const char **opt_list(const struct opt_res *res, const char *name, size_t *n)
{
    const struct opt_val *v = opt_get(res, name);

    *n = v->nitems;
    return v->items;
}
