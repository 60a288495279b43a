/* core/cmd.h - the sub-commands of the snitun binary.
 *
 * Each takes the arguments after its own name (argv[0] is the sub-command
 * name) and returns the process exit status: 0 success, 1 runtime failure,
 * 2 usage error (unknown flag, bad value; the message names it).
 */
#ifndef CORE_CMD_H
#define CORE_CMD_H

int cmd_keygen(int argc, char **argv);
int cmd_token(int argc, char **argv);
int cmd_server(int argc, char **argv);
int cmd_client(int argc, char **argv);

#endif
