/* core/opt.h - command-line options for every sub-command.
 *
 * A sub-command describes its flags in a table of struct opt_spec and
 * calls opt_parse (or opt_parse_main, which also prints help and errors).
 * Results land in a struct opt_res, one struct opt_val per spec, in table
 * order; opt_get & co. find them by name. No globals, no getopt: parsing
 * twice in one process gives the same result twice.
 *
 * Syntax accepted (argv[0] is the sub-command's own name, skipped):
 *   --name VALUE, --name=VALUE     string, integer and list options
 *   --name, --name=true|false      flags (also 1/0, yes/no, on/off)
 *   -h, --help                     OPT_HELP
 *   --                             everything after it is positional
 *   anything else not starting with '-', and "-" alone: positional
 * A list option may be repeated; any other option given twice is an error.
 * A flag never takes the next argument as its value.
 *
 * Where a value comes from, first match wins:
 *   1. the command line;
 *   2. the spec's environment variable, if set and not empty: every flag
 *      has one, SNITUN_ + its name (opt_env_name()).
 *      For a list, the variable holds several items separated by commas or
 *      newlines; whitespace around items and empty items are dropped. A
 *      list given on the command line ignores the variable entirely;
 *   3. the spec's default text (lists have none);
 *   4. unset: str NULL, num 0, flag false, list empty.
 * Integers are checked against [min, max] whatever their source.
 *
 * Errors produce one line naming the culprit and what is expected, e.g.
 *   "snitun token issue: --valid-for must be a positive integer, got 'abc'"
 *   "snitun token issue: unknown flag '--vaild-for' (see --help)"
 *
 * Strings in the results are borrowed from argv, the environment or the
 * spec table, except list items taken from the environment, which belong
 * to the opt_res until opt_fini. Do not change the environment while
 * using an opt_res.
 */
#ifndef CORE_OPT_H
#define CORE_OPT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

enum opt_kind {
    OPT_STR = 1,    /* one string */
    OPT_INT = 2,    /* one integer in [min, max] (long long) */
    OPT_FLAG = 3,   /* boolean, no value */
    OPT_LIST = 4,   /* repeatable string */
};

struct opt_spec {
    const char *name;      /* long name without dashes: "valid-for" */
    const char *env;       /* NULL: derived, SNITUN_ + NAME (opt_env_name) */
    enum opt_kind kind;
    const char *metavar;   /* value placeholder in --help ("SECONDS") */
    const char *help;      /* one line */
    const char *def;       /* default as text, or NULL */
    long long min, max;    /* OPT_INT only, inclusive */
};

/* Where a value came from. */
enum opt_src {
    OPT_UNSET = 0,
    OPT_DEFAULT = 1,
    OPT_ENV = 2,
    OPT_ARG = 3,
};

struct opt_val {
    enum opt_src src;
    const char *str;       /* OPT_STR and OPT_INT: the text */
    long long num;         /* OPT_INT */
    bool on;               /* OPT_FLAG */
    const char **items;    /* OPT_LIST: nitems strings */
    size_t nitems;
    char *own;             /* private: env copy the items point into */
};

/* A sub-command: its name for messages, its flags, its positionals. */
struct opt_cmd {
    const char *prog;      /* "snitun token issue" */
    const char *args;      /* positional synopsis for --help ("TOKEN"), or NULL */
    const char *about;     /* paragraph printed by --help, or NULL */
    const struct opt_spec *specs;
    size_t nspecs;
    size_t min_pos, max_pos;
};

struct opt_res {
    const struct opt_cmd *cmd;
    struct opt_val *vals;  /* cmd->nspecs values, in table order */
    const char **pos;      /* positional arguments, borrowed from argv */
    size_t npos;
    char err[512];         /* the message when opt_parse returns OPT_ERR */
};

enum opt_status {
    OPT_OK = 0,
    OPT_HELP = 1,          /* -h/--help was given; nothing else is checked */
    OPT_ERR = 2,           /* usage error, res->err says which */
};

/* Parse argv[1..argc-1] per cmd into *res. Always call opt_fini after,
 * whatever the status. */
enum opt_status opt_parse(const struct opt_cmd *cmd, int argc, char **argv,
                          struct opt_res *res);

/* opt_parse, then: on OPT_HELP print the help to stdout and return 0; on
 * OPT_ERR print the message to stderr and return 2 (both after opt_fini);
 * on OPT_OK return -1 and the caller goes on (and calls opt_fini). */
int opt_parse_main(const struct opt_cmd *cmd, int argc, char **argv, struct opt_res *res);

void opt_fini(struct opt_res *res);

/* The environment variable that feeds spec s: s->env when set, else
 * "SNITUN_" + the long name upper-cased, '-' as '_' (written into buf). */
const char *opt_env_name(const struct opt_spec *s, char *buf, size_t len);

/* The --help text. */
void opt_help(const struct opt_cmd *cmd, FILE *out);

/* "on"/"off", "true"/"false", "yes"/"no", "1"/"0" (any case) -> *out;
 * -1 for anything else. For options that take on|off as a value. */
int opt_parse_bool(const char *text, bool *out);

/* Lookups by long name; the name must be in the table (asserted). */
const struct opt_val *opt_get(const struct opt_res *res, const char *name);
const char *opt_str(const struct opt_res *res, const char *name);
long long opt_int(const struct opt_res *res, const char *name);
bool opt_on(const struct opt_res *res, const char *name);
const char **opt_list(const struct opt_res *res, const char *name, size_t *n);

#endif
