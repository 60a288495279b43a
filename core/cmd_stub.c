/* core/cmd_stub.c - sub-commands not built yet. Each is replaced by its
 * real module (cmd_token.c, cmd_server.c, cmd_client.c) as it lands. */
#include <stdio.h>

#include "core/cmd.h"

#define STUB(fn, what)                                                   \
    int fn(int argc, char **argv)                                        \
    {                                                                    \
        (void)argc; (void)argv;                                          \
        fprintf(stderr, "snitun: '%s' is not implemented yet\n", what);  \
        return 1;                                                        \
    }

STUB(cmd_client, "client")
