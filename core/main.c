/* core/main.c - entry point: dispatch to a sub-command; `snitun version`
 * and `snitun --version` print the version. */
#include <stdio.h>
#include <string.h>

#include "core/cmd.h"

struct subcmd {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
};

static const struct subcmd subcmds[] = {
    { "server", cmd_server, "run the gateway (SNI listener + tunnel multiplexer)" },
    { "client", cmd_client, "run the connector next to the service behind NAT" },
    { "token",  cmd_token,  "issue or inspect Fernet tokens (session master)" },
    { "keygen", cmd_keygen, "print a new Fernet key" },
};

static void usage(FILE *out)
{
    fprintf(out, "usage: snitun <command> [flags]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(subcmds) / sizeof(subcmds[0]); i++)
        fprintf(out, "  %-8s %s\n", subcmds[i].name, subcmds[i].summary);
    fprintf(out, "  %-8s %s\n", "version", "print the version (also --version, and "
            "'snitun server --version')");
    fprintf(out, "\n'snitun <command> --help' describes each command's flags.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[1];
    if (!strcmp(name, "--help") || !strcmp(name, "-h") || !strcmp(name, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(name, "version") || !strcmp(name, "--version")) {
        printf("snitun %s\n", SNITUN_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof(subcmds) / sizeof(subcmds[0]); i++)
        if (!strcmp(name, subcmds[i].name))
            return subcmds[i].run(argc - 1, argv + 1);
    fprintf(stderr, "snitun: unknown command '%s'\n\n", name);
    usage(stderr);
    return 2;
}
