/* tests/unit/test_opt.c - core/opt: syntax, sources (argv, env, default),
 * repeatables, every usage error's exact message, --help. Criterion runs
 * each test in its own process, so setenv() does not leak between tests. */
#include <criterion/criterion.h>
#include <criterion/redirect.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "core/opt.h"

static const struct opt_spec specs[] = {
    { "name", "SNITUN_T_NAME", OPT_STR, "NAME", "a string", NULL, 0, 0 },
    { "count", "SNITUN_T_COUNT", OPT_INT, "N", "a bounded integer", "3", 1, 10 },
    { "size", NULL, OPT_INT, "BYTES", "a positive integer", NULL, 1, LLONG_MAX },
    { "verbose", "SNITUN_T_VERBOSE", OPT_FLAG, NULL, "a flag", NULL, 0, 0 },
    { "key", "SNITUN_T_KEYS", OPT_LIST, "KEY", "a list", NULL, 0, 0 },
    { "mode", NULL, OPT_STR, NULL, "a string with a default", "fast", 0, 0 },
};

static const struct opt_cmd cmd = {
    .prog = "snitun test",
    .args = "[FILE]",
    .about = "A command for the tests.",
    .specs = specs,
    .nspecs = sizeof(specs) / sizeof(specs[0]),
    .min_pos = 0,
    .max_pos = 1,
};

/* Parse a NULL-terminated argument list; argv[0] is the command name. */
#define PARSE(res, ...)                                                     \
    ({                                                                      \
        char *argv_[] = { "test", __VA_ARGS__, NULL };                      \
        opt_parse(&cmd, (int)(sizeof(argv_) / sizeof(argv_[0])) - 1, argv_, \
                  (res));                                                   \
    })

static void expect_err(const char *want, int argc, char **argv)
{
    struct opt_res res;

    cr_assert_eq(opt_parse(&cmd, argc, argv, &res), OPT_ERR, "want: %s", want);
    cr_assert_str_eq(res.err, want);
    opt_fini(&res);
}

#define EXPECT_ERR(want, ...)                                               \
    do {                                                                    \
        char *argv_[] = { "test", __VA_ARGS__, NULL };                      \
        expect_err(want, (int)(sizeof(argv_) / sizeof(argv_[0])) - 1, argv_); \
    } while (0)

Test(opt, defaults_when_nothing_given)
{
    struct opt_res res;
    char *argv[] = { "test", NULL };
    size_t n;

    cr_assert_eq(opt_parse(&cmd, 1, argv, &res), OPT_OK);
    cr_assert_null(opt_str(&res, "name"));
    cr_assert_eq(opt_get(&res, "name")->src, OPT_UNSET);
    cr_assert_eq(opt_int(&res, "count"), 3);
    cr_assert_eq(opt_get(&res, "count")->src, OPT_DEFAULT);
    cr_assert_eq(opt_int(&res, "size"), 0);
    cr_assert_eq(opt_on(&res, "verbose"), false);
    cr_assert_null(opt_list(&res, "key", &n));
    cr_assert_eq(n, 0);
    cr_assert_str_eq(opt_str(&res, "mode"), "fast");
    cr_assert_eq(res.npos, 0);
    opt_fini(&res);
}

Test(opt, both_value_forms_and_flags)
{
    struct opt_res res;
    size_t n;

    cr_assert_eq(PARSE(&res, "--name", "alpha", "--count=7", "--size", "9000000000",
                       "--verbose", "--key", "k1", "--key=k2", "--mode=", "file.txt"),
                 OPT_OK, "%s", res.err);
    cr_assert_str_eq(opt_str(&res, "name"), "alpha");
    cr_assert_eq(opt_get(&res, "name")->src, OPT_ARG);
    cr_assert_eq(opt_int(&res, "count"), 7);
    cr_assert_str_eq(opt_str(&res, "count"), "7");
    cr_assert_eq(opt_int(&res, "size"), 9000000000LL);
    cr_assert_eq(opt_on(&res, "verbose"), true);
    const char **keys = opt_list(&res, "key", &n);
    cr_assert_eq(n, 2);
    cr_assert_str_eq(keys[0], "k1");
    cr_assert_str_eq(keys[1], "k2");
    cr_assert_str_eq(opt_str(&res, "mode"), "", "--mode= gives an empty string");
    cr_assert_eq(res.npos, 1);
    cr_assert_str_eq(res.pos[0], "file.txt");
    opt_fini(&res);
}

Test(opt, flag_values)
{
    static const struct { const char *arg; bool on; } rows[] = {
        { "--verbose=true", true }, { "--verbose=1", true }, { "--verbose=YES", true },
        { "--verbose=on", true }, { "--verbose=false", false }, { "--verbose=0", false },
        { "--verbose=no", false }, { "--verbose=Off", false },
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        struct opt_res res;
        char *argv[] = { "test", (char *)rows[i].arg, NULL };

        cr_assert_eq(opt_parse(&cmd, 2, argv, &res), OPT_OK, "%s", rows[i].arg);
        cr_assert_eq(opt_on(&res, "verbose"), rows[i].on, "%s", rows[i].arg);
        opt_fini(&res);
    }
    /* A flag never eats the next argument. */
    struct opt_res res;
    cr_assert_eq(PARSE(&res, "--verbose", "false"), OPT_OK);
    cr_assert_eq(opt_on(&res, "verbose"), true);
    cr_assert_eq(res.npos, 1);
    cr_assert_str_eq(res.pos[0], "false");
    opt_fini(&res);
}

Test(opt, usage_errors_name_the_culprit)
{
    EXPECT_ERR("snitun test: unknown flag '--nmae' (see --help)", "--nmae", "x");
    EXPECT_ERR("snitun test: unknown flag '--nmae' (see --help)", "--nmae=x");
    EXPECT_ERR("snitun test: unknown flag '-n' (flags are --long; see --help)", "-n", "x");
    EXPECT_ERR("snitun test: --count must be an integer in 1..10, got 'abc'", "--count", "abc");
    EXPECT_ERR("snitun test: --count must be an integer in 1..10, got '11'", "--count=11");
    EXPECT_ERR("snitun test: --count must be an integer in 1..10, got '0'", "--count=0");
    EXPECT_ERR("snitun test: --count must be an integer in 1..10, got ''", "--count=");
    EXPECT_ERR("snitun test: --count must be an integer in 1..10, got ' 5'", "--count= 5");
    EXPECT_ERR("snitun test: --count must be an integer in 1..10, got '5x'", "--count=5x");
    EXPECT_ERR("snitun test: --size must be a positive integer, got 'abc'", "--size", "abc");
    EXPECT_ERR("snitun test: --size must be a positive integer, got '-1'", "--size", "-1");
    EXPECT_ERR("snitun test: --size must be a positive integer, got '99999999999999999999'",
               "--size=99999999999999999999");
    EXPECT_ERR("snitun test: --verbose must be true or false (1/0, yes/no, on/off), got 'maybe'",
               "--verbose=maybe");
    EXPECT_ERR("snitun test: --name needs a value (NAME)", "--name");
    EXPECT_ERR("snitun test: --mode needs a value (VALUE)", "--mode");
    EXPECT_ERR("snitun test: --name given more than once", "--name", "a", "--name=b");
    EXPECT_ERR("snitun test: --verbose given more than once", "--verbose", "--verbose");
    EXPECT_ERR("snitun test: unexpected argument 'b' (see --help)", "a", "b");
}

Test(opt, missing_positional)
{
    static const struct opt_cmd need = {
        .prog = "snitun need", .args = "TOKEN", .specs = specs, .nspecs = 1,
        .min_pos = 1, .max_pos = 1,
    };
    struct opt_res res;
    char *argv[] = { "need", "--name", "x", NULL };

    cr_assert_eq(opt_parse(&need, 3, argv, &res), OPT_ERR);
    cr_assert_str_eq(res.err, "snitun need: missing argument TOKEN (see --help)");
    opt_fini(&res);
}

Test(opt, double_dash_and_lone_dash)
{
    struct opt_res res;
    static const struct opt_cmd many = {
        .prog = "snitun many", .specs = specs, .nspecs = 6, .max_pos = 5,
    };
    char *argv[] = { "many", "-", "--name", "n", "--", "--count", "-h", NULL };

    cr_assert_eq(opt_parse(&many, 7, argv, &res), OPT_OK, "%s", res.err);
    cr_assert_eq(res.npos, 3);
    cr_assert_str_eq(res.pos[0], "-");
    cr_assert_str_eq(res.pos[1], "--count");
    cr_assert_str_eq(res.pos[2], "-h");
    cr_assert_str_eq(opt_str(&res, "name"), "n");
    cr_assert_eq(opt_int(&res, "count"), 3);
    opt_fini(&res);
}

Test(opt, environment)
{
    struct opt_res res;
    size_t n;

    setenv("SNITUN_T_NAME", "from-env", 1);
    setenv("SNITUN_T_COUNT", "9", 1);
    setenv("SNITUN_T_VERBOSE", "yes", 1);
    setenv("SNITUN_T_KEYS", " k1 ,k2\nk3\r\n,, \n", 1);
    cr_assert_eq(PARSE(&res, "x"), OPT_OK, "%s", res.err);
    cr_assert_str_eq(opt_str(&res, "name"), "from-env");
    cr_assert_eq(opt_get(&res, "name")->src, OPT_ENV);
    cr_assert_eq(opt_int(&res, "count"), 9);
    cr_assert_eq(opt_on(&res, "verbose"), true);
    const char **keys = opt_list(&res, "key", &n);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(keys[0], "k1");
    cr_assert_str_eq(keys[1], "k2");
    cr_assert_str_eq(keys[2], "k3");
    cr_assert_eq(opt_get(&res, "key")->src, OPT_ENV);
    opt_fini(&res);

    /* The command line wins, for lists too (no merging). */
    cr_assert_eq(PARSE(&res, "--name=arg", "--count", "2", "--key", "only", "--verbose=0"),
                 OPT_OK);
    cr_assert_str_eq(opt_str(&res, "name"), "arg");
    cr_assert_eq(opt_int(&res, "count"), 2);
    cr_assert_eq(opt_on(&res, "verbose"), false);
    keys = opt_list(&res, "key", &n);
    cr_assert_eq(n, 1);
    cr_assert_str_eq(keys[0], "only");
    opt_fini(&res);

    /* An empty variable counts as unset: the default applies. */
    setenv("SNITUN_T_COUNT", "", 1);
    cr_assert_eq(PARSE(&res, "x"), OPT_OK);
    cr_assert_eq(opt_int(&res, "count"), 3);
    opt_fini(&res);
}

Test(opt, environment_errors_name_the_variable)
{
    setenv("SNITUN_T_COUNT", "lots", 1);
    EXPECT_ERR("snitun test: SNITUN_T_COUNT must be an integer in 1..10, got 'lots'", "x");
    setenv("SNITUN_T_COUNT", "5", 1);
    setenv("SNITUN_T_VERBOSE", "2", 1);
    EXPECT_ERR("snitun test: SNITUN_T_VERBOSE must be true or false (1/0, yes/no, on/off), "
               "got '2'", "x");
    /* A bad variable does not matter when the flag is given. */
    struct opt_res res;
    cr_assert_eq(PARSE(&res, "--verbose"), OPT_OK);
    opt_fini(&res);
}

Test(opt, derived_env_names)
{
    struct opt_res res;
    const char *argv[] = { "test" };
    char buf[96];

    cr_assert_str_eq(opt_env_name(&specs[2], buf, sizeof(buf)), "SNITUN_SIZE");
    cr_assert_str_eq(opt_env_name(&specs[0], buf, sizeof(buf)), "SNITUN_T_NAME");
    setenv("SNITUN_SIZE", "4096", 1);
    setenv("SNITUN_MODE", "slow", 1);
    cr_assert_eq(opt_parse(&cmd, 1, (char **)argv, &res), OPT_OK, "%s", res.err);
    cr_assert_eq(opt_int(&res, "size"), 4096);
    cr_assert_str_eq(opt_str(&res, "mode"), "slow");
    cr_assert_eq(opt_get(&res, "size")->src, OPT_ENV);
    opt_fini(&res);
}

Test(opt, list_env_only_separators_is_empty)
{
    struct opt_res res;
    size_t n;

    setenv("SNITUN_T_KEYS", ", ,\n", 1);
    cr_assert_eq(PARSE(&res, "x"), OPT_OK);
    opt_list(&res, "key", &n);
    cr_assert_eq(n, 0);
    opt_fini(&res);
}

Test(opt, help_wins_and_lists_everything)
{
    struct opt_res res;

    cr_assert_eq(PARSE(&res, "--bogus", "-h"), OPT_HELP);
    opt_fini(&res);
    cr_assert_eq(PARSE(&res, "--count=abc", "--help"), OPT_HELP);
    opt_fini(&res);
    cr_assert_eq(PARSE(&res, "--", "--help"), OPT_OK, "after -- it is an argument");
    cr_assert_str_eq(res.pos[0], "--help");
    opt_fini(&res);

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    opt_help(&cmd, f);
    fclose(f);
    cr_assert(strstr(text, "usage: snitun test [flags] [FILE]\n") == text, "%s", text);
    cr_assert_not_null(strstr(text, "\nA command for the tests.\n"));
    cr_assert_not_null(strstr(text, "  --name NAME   a string [env: SNITUN_T_NAME]\n"), "%s",
                       text);
    cr_assert_not_null(strstr(text, "  --count N     a bounded integer [default: 3] "
                                    "[env: SNITUN_T_COUNT]\n"), "%s", text);
    cr_assert_not_null(strstr(text, "  --size BYTES  a positive integer [env: SNITUN_SIZE]\n"), "%s", text);
    cr_assert_not_null(strstr(text, "  --verbose     a flag [env: SNITUN_T_VERBOSE]\n"),
                       "%s", text);
    cr_assert_not_null(strstr(text, "  --key KEY     a list (repeatable) "
                                    "[env: SNITUN_T_KEYS, comma-separated]\n"), "%s", text);
    cr_assert_not_null(strstr(text, "  --mode VALUE  a string with a default "
                                    "[default: fast] [env: SNITUN_MODE]\n"), "%s", text);
    cr_assert_not_null(strstr(text, "  -h, --help    show this help and exit\n"), "%s", text);
    free(text);
}

static void redirect_all(void)
{
    cr_redirect_stdout();
    cr_redirect_stderr();
}

Test(opt, parse_main_exit_codes, .init = redirect_all)
{
    struct opt_res res;
    char *help[] = { "test", "--help", NULL };
    char *bad[] = { "test", "--count=x", NULL };
    char *good[] = { "test", "--count=4", NULL };

    cr_assert_eq(opt_parse_main(&cmd, 2, help, &res), 0);
    cr_assert_eq(opt_parse_main(&cmd, 2, bad, &res), 2);
    cr_assert_eq(opt_parse_main(&cmd, 2, good, &res), -1);
    cr_assert_eq(opt_int(&res, "count"), 4);
    opt_fini(&res);
    fflush(stderr);
    cr_assert_stderr_eq_str("snitun test: --count must be an integer in 1..10, got 'x'\n");
}

Test(opt, repeated_parsing_has_no_state)
{
    for (int i = 0; i < 50; i++) {
        struct opt_res res;
        size_t n;

        cr_assert_eq(PARSE(&res, "--key", "a", "--key", "b", "--count", "5", "pos"), OPT_OK);
        opt_list(&res, "key", &n);
        cr_assert_eq(n, 2);
        cr_assert_eq(opt_int(&res, "count"), 5);
        cr_assert_eq(res.npos, 1);
        opt_fini(&res);
        EXPECT_ERR("snitun test: unknown flag '--x' (see --help)", "--x");
    }
}
