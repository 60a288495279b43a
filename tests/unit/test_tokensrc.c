/* tests/unit/test_tokensrc.c - core/tokensrc: the client's token material.
 *
 * The JSON that `snitun token issue` prints (all members, defaults when
 * members are missing, wrong types, bad hex, key and IV sizes), the
 * --protocol-version/--cipher overrides, the bare --token defaults
 * (protocol 0, aes-cbc, as the reference client), the file and command
 * sources (re-read and re-run on every fetch, exit status, timeout,
 * abort), and the aes-gcm used-key memory. Key material is the vectors'
 * (tests/data/cbc_session.json).
 */
#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/tokensrc.h"
#include "tests/unit/testutil.h"

#define KEY "00112233445566778899aabbccddeeff102132435465768798a9babbdcddfeef"
#define IV "0f0e0d0c0b0a09080706050403020100"
#define TOK "gAAAAABoTuGAvEZ0Afr81sD-wDlbgoUidQzidxgOUy7U-7hxfXLPnOQYzp2Lw_lc=="

static const uint8_t key_bytes[32] = {
    0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff,
    0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76, 0x87, 0x98, 0xa9, 0xba, 0xbb, 0xdc, 0xdd, 0xfe, 0xef,
};
static const uint8_t iv_bytes[16] = {
    0x0f, 0x0e, 0x0d, 0x0c, 0x0b, 0x0a, 0x09, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, 0x00,
};

static int parse(const char *json, const struct tokensrc_over *ov, struct tokensrc_mat *m,
                 char *err)
{
    return tokensrc_parse_json(json, strlen(json), ov, m, err, 256);
}

/* Expect parse failure whose message contains `want`. */
static void bad(const char *json, const char *want)
{
    struct tokensrc_mat m;
    char err[256] = "";

    cr_assert_eq(parse(json, NULL, &m, err), -1, "accepted: %s", json);
    cr_assert_not_null(strstr(err, want), "error '%s' lacks '%s' for %s", err, want, json);
    cr_assert_null(m.token);
    cr_assert_eq(m.key_len, 0);
}

Test(tokensrc_json, issue_output_all_members)
{
    /* exactly what `snitun token issue` prints */
    const char *json = "{\"token\": \"" TOK "\", \"aes_key\": \"" KEY "\", \"aes_iv\": \"" IV
                       "\", \"hostname\": \"myname.ui.nabu.casa\", \"alias\": [\"a.example\"], "
                       "\"valid\": 1750003600, \"protocol_version\": 2, \"cipher\": \"aes-gcm\"}";
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(parse(json, NULL, &m, err), 0, "%s", err);
    cr_assert_str_eq(m.token, TOK);
    cr_assert_eq(m.token_len, strlen(TOK));
    cr_assert_eq(m.key_len, 32);
    cr_assert_arr_eq(m.key, key_bytes, 32);
    cr_assert_eq(m.iv_len, 16);
    cr_assert_arr_eq(m.iv, iv_bytes, 16);
    cr_assert_eq(m.version, 2);
    cr_assert_eq(m.cipher, TC_AES_GCM);
    cr_assert_not(m.cipher_unknown);
    cr_assert_str_eq(m.hostname, "myname.ui.nabu.casa");
    cr_assert_eq(m.valid, 1750003600.0);
    tokensrc_mat_fini(&m);
    cr_assert_null(m.token);
    cr_assert_eq(m.key[0], 0);
}

Test(tokensrc_json, defaults)
{
    const char *json = "{\"aes_iv\":\"" IV "\",\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\"}";
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(parse(json, NULL, &m, err), 0, "%s", err);
    cr_assert_eq(m.version, 0);
    cr_assert_eq(m.cipher, TC_AES_CBC);
    cr_assert_not(m.cipher_unknown);
    cr_assert_null(m.hostname);
    cr_assert_eq(m.valid, 0.0);
    tokensrc_mat_fini(&m);
}

Test(tokensrc_json, nulls_are_defaults_and_fraction_valid)
{
    const char *json = "{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\","
                       "\"protocol_version\":null,\"cipher\":null,\"alias\":null,"
                       "\"valid\":1750003600.25,\"unknown\":{\"x\":1}}";
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(parse(json, NULL, &m, err), 0, "%s", err);
    cr_assert_eq(m.version, 0);
    cr_assert_eq(m.cipher, TC_AES_CBC);
    cr_assert_eq(m.valid, 1750003600.25);
    tokensrc_mat_fini(&m);
}

Test(tokensrc_json, key_sizes_and_upper_case)
{
    static const char *keys[] = { "00112233445566778899AABBCCDDEEFF",
                                  "00112233445566778899aabbccddeeff0011223344556677", KEY };
    static const size_t lens[] = { 16, 24, 32 };
    char json[512], err[256];
    struct tokensrc_mat m;

    for (size_t i = 0; i < 3; i++) {
        snprintf(json, sizeof(json), "{\"token\":\"%s\",\"aes_key\":\"%s\",\"aes_iv\":\"%s\"}",
                 TOK, keys[i], IV);
        cr_assert_eq(parse(json, NULL, &m, err), 0, "%s", err);
        cr_assert_eq(m.key_len, lens[i]);
        cr_assert_eq(m.key[10], 0xaa);
        tokensrc_mat_fini(&m);
    }
}

Test(tokensrc_json, versions)
{
    char json[512], err[256];
    struct tokensrc_mat m;

    for (int v = 0; v <= 5; v++) {
        snprintf(json, sizeof(json), "{\"token\":\"%s\",\"aes_key\":\"%s\",\"aes_iv\":\"%s\","
                 "\"protocol_version\":%d}", TOK, KEY, IV, v);
        cr_assert_eq(parse(json, NULL, &m, err), 0, "%s", err);
        cr_assert_eq(m.version, v > 2 ? 2u : (unsigned)v, "version %d", v);
        tokensrc_mat_fini(&m);
    }
}

Test(tokensrc_json, unknown_cipher_runs_cbc)
{
    const char *json = "{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\","
                       "\"cipher\":\"chacha\"}";
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(parse(json, NULL, &m, err), 0, "%s", err);
    cr_assert_eq(m.cipher, TC_AES_CBC);
    cr_assert(m.cipher_unknown);
    tokensrc_mat_fini(&m);
}

Test(tokensrc_json, gcm_accepts_other_iv_sizes)
{
    const char *json = "{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"0001020304050607\","
                       "\"cipher\":\"aes-gcm\"}";
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(parse(json, NULL, &m, err), 0, "%s", err);
    cr_assert_eq(m.iv_len, 0);
    cr_assert_eq(m.cipher, TC_AES_GCM);
    tokensrc_mat_fini(&m);
}

Test(tokensrc_json, rejected)
{
    bad("", "not JSON");
    bad("{\"token\":", "not JSON");
    bad("[1,2]", "not a JSON object");
    bad("\"gAAA\"", "not a JSON object");
    bad("{\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\"}", "token missing");
    bad("{\"token\":5,\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\"}", "token missing");
    bad("{\"token\":\"" TOK "\",\"aes_iv\":\"" IV "\"}", "aes_key missing");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\"}", "aes_iv missing");
    bad("{\"token\":\"\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\"}", "printable ASCII");
    bad("{\"token\":\"gA A\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\"}", "printable ASCII");
    bad("{\"token\":\"gA\\n\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\"}", "printable ASCII");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"zz\",\"aes_iv\":\"" IV "\"}", "aes_key must be");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"001\",\"aes_iv\":\"" IV "\"}", "aes_key must be");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"\",\"aes_iv\":\"" IV "\"}", "aes_key must be");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "00\",\"aes_iv\":\"" IV "\"}", "aes_key must be");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"0011223344556677\",\"aes_iv\":\"" IV "\"}",
        "aes_key must be");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"0g\"}", "aes_iv must be hex");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"0001\"}", "16 bytes");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\","
        "\"protocol_version\":-1}", "protocol_version");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\","
        "\"protocol_version\":\"2\"}", "protocol_version");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\","
        "\"protocol_version\":2.5}", "protocol_version");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\",\"cipher\":1}",
        "cipher must be a string");
    bad("{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\",\"valid\":\"x\"}",
        "valid must be a number");
    bad("{\"token\":\"" TOK "\",\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\"}",
        "not JSON");
}

Test(tokensrc_json, overrides)
{
    const char *json = "{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\","
                       "\"protocol_version\":2,\"cipher\":\"aes-gcm\"}";
    struct tokensrc_over ov = { .has_version = true, .version = 1,
                                .has_cipher = true, .cipher = TC_AES_CBC };
    struct tokensrc_over only_v = { .has_version = true, .version = 0 };
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(parse(json, &ov, &m, err), 0, "%s", err);
    cr_assert_eq(m.version, 1);
    cr_assert_eq(m.cipher, TC_AES_CBC);
    tokensrc_mat_fini(&m);
    cr_assert_eq(parse(json, &only_v, &m, err), 0, "%s", err);
    cr_assert_eq(m.version, 0);
    cr_assert_eq(m.cipher, TC_AES_GCM);
    tokensrc_mat_fini(&m);
}

Test(tokensrc_json, override_to_cbc_needs_16_byte_iv)
{
    const char *json = "{\"token\":\"" TOK "\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"0001\","
                       "\"cipher\":\"aes-gcm\"}";
    struct tokensrc_over ov = { .has_cipher = true, .cipher = TC_AES_CBC };
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(parse(json, &ov, &m, err), -1);
    cr_assert_not_null(strstr(err, "16 bytes"), "%s", err);
}

Test(tokensrc_args, bare_token_defaults)
{
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(tokensrc_from_args(TOK, KEY, IV, NULL, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(m.token, TOK);
    cr_assert_eq(m.version, 0);
    cr_assert_eq(m.cipher, TC_AES_CBC);
    cr_assert_arr_eq(m.key, key_bytes, 32);
    cr_assert_arr_eq(m.iv, iv_bytes, 16);
    tokensrc_mat_fini(&m);
}

Test(tokensrc_args, overrides_and_errors)
{
    struct tokensrc_over ov = { .has_version = true, .version = 2,
                                .has_cipher = true, .cipher = TC_AES_GCM };
    struct tokensrc_mat m;
    char err[256];

    cr_assert_eq(tokensrc_from_args(TOK, KEY, IV, &ov, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert_eq(m.version, 2);
    cr_assert_eq(m.cipher, TC_AES_GCM);
    tokensrc_mat_fini(&m);
    cr_assert_eq(tokensrc_from_args(TOK, NULL, IV, NULL, &m, err, sizeof(err)), -1);
    cr_assert_not_null(strstr(err, "--aes-key"));
    cr_assert_eq(tokensrc_from_args(TOK, KEY, "00", NULL, &m, err, sizeof(err)), -1);
    cr_assert_not_null(strstr(err, "16 bytes"));
    cr_assert_eq(tokensrc_from_args(TOK, "xy", IV, NULL, &m, err, sizeof(err)), -1);
    cr_assert_not_null(strstr(err, "aes_key"));
    cr_assert_eq(tokensrc_from_args("a b", KEY, IV, NULL, &m, err, sizeof(err)), -1);
    cr_assert_null(m.token);
}

/* ---- sources ------------------------------------------------------------- */

static char *tmpfile_with(const char *text)
{
    char *path = strdup("/tmp/test_tokensrc_XXXXXX");
    int fd = mkstemp(path);

    cr_assert_geq(fd, 0);
    cr_assert_eq(write(fd, text, strlen(text)), (ssize_t)strlen(text));
    close(fd);
    return path;
}

Test(tokensrc_fetch, file_is_reread)
{
    char *path = tmpfile_with("{\"token\":\"gAfirst\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV
                              "\",\"protocol_version\":2}");
    struct tokensrc s;
    struct tokensrc_mat m;
    char err[256];
    FILE *f;

    tokensrc_init(&s, TOKENSRC_FILE);
    s.path = path;
    cr_assert_eq(tokensrc_fetch(&s, -1, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(m.token, "gAfirst");
    cr_assert_eq(m.version, 2);
    tokensrc_mat_fini(&m);
    f = fopen(path, "w");
    fputs("{\"token\":\"gAsecond\",\"aes_key\":\"" KEY "\",\"aes_iv\":\"" IV "\"}\n", f);
    fclose(f);
    cr_assert_eq(tokensrc_fetch(&s, -1, &m, err, sizeof(err)), 0, "%s", err);
    cr_assert_str_eq(m.token, "gAsecond");
    cr_assert_eq(m.version, 0);
    tokensrc_mat_fini(&m);
    f = fopen(path, "w");
    fputs("{\"token\":\"gA\"}", f);
    fclose(f);
    cr_assert_eq(tokensrc_fetch(&s, -1, &m, err, sizeof(err)), -1);
    cr_assert_not_null(strstr(err, path), "%s", err);
    cr_assert_not_null(strstr(err, "aes_key missing"), "%s", err);
    unlink(path);
    cr_assert_eq(tokensrc_fetch(&s, -1, &m, err, sizeof(err)), -1);
    cr_assert_not_null(strstr(err, "cannot open"), "%s", err);
    free(path);
}

Test(tokensrc_fetch, command_is_rerun)
{
    char *counter = tmpfile_with("");
    char cmd[512];
    struct tokensrc s;
    struct tokensrc_mat m;
    char err[256];

    /* Each run appends a line to the counter file and names the token
     * after the line count. */
    snprintf(cmd, sizeof(cmd),
             "echo x >> %s; n=$(wc -l < %s); "
             "printf '{\"token\":\"gA%%s\",\"aes_key\":\"%s\",\"aes_iv\":\"%s\"}' $n",
             counter, counter, KEY, IV);
    tokensrc_init(&s, TOKENSRC_COMMAND);
    s.command = cmd;
    for (int i = 1; i <= 3; i++) {
        char want[16];
        snprintf(want, sizeof(want), "gA%d", i);
        cr_assert_eq(tokensrc_fetch(&s, -1, &m, err, sizeof(err)), 0, "%s", err);
        cr_assert_str_eq(m.token, want);
        tokensrc_mat_fini(&m);
    }
    unlink(counter);
    free(counter);
}

Test(tokensrc_run, status_timeout_abort)
{
    char *out = NULL, err[256];
    size_t n;
    int p[2];

    cr_assert_eq(tokensrc_run("printf abc", 5000, -1, &out, &n, err, sizeof(err)), 0);
    cr_assert_eq(n, 3);
    cr_assert_str_eq(out, "abc");
    free(out);
    cr_assert_eq(tokensrc_run("echo hi; exit 3", 5000, -1, &out, &n, err, sizeof(err)), -1);
    cr_assert_str_eq(err, "token command exited with status 3");
    cr_assert_eq(tokensrc_run("kill -9 $$", 5000, -1, &out, &n, err, sizeof(err)), -1);
    cr_assert_str_eq(err, "token command killed by signal 9");
    cr_assert_eq(tokensrc_run("sleep 5", 200, -1, &out, &n, err, sizeof(err)), -1);
    cr_assert_str_eq(err, "token command did not finish within 200 ms");
    /* stdout closed but the process lingers: still a timeout */
    cr_assert_eq(tokensrc_run("exec >&-; sleep 5", 200, -1, &out, &n, err, sizeof(err)), -1);
    cr_assert_str_eq(err, "token command did not finish within 200 ms");
    cr_assert_eq(tokensrc_run("head -c 70000 /dev/zero", 5000, -1, &out, &n, err, sizeof(err)), -1);
    cr_assert_str_eq(err, "token command printed more than 65535 bytes");
    cr_assert_eq(pipe(p), 0);
    cr_assert_eq(write(p[1], "x", 1), 1);
    cr_assert_eq(tokensrc_run("sleep 5", 5000, p[0], &out, &n, err, sizeof(err)), -2);
    close(p[0]);
    close(p[1]);
}

Test(tokensrc_used, only_gcm_keys_are_remembered)
{
    struct tokensrc s;
    struct tokensrc_mat cbc, gcm, gcm2;
    struct tokensrc_over g = { .has_cipher = true, .cipher = TC_AES_GCM };
    char err[256];

    tokensrc_init(&s, TOKENSRC_ARGS);
    cr_assert_eq(tokensrc_from_args(TOK, KEY, IV, NULL, &cbc, err, sizeof(err)), 0);
    cr_assert_eq(tokensrc_from_args(TOK, KEY, IV, &g, &gcm, err, sizeof(err)), 0);
    cr_assert_eq(tokensrc_from_args(TOK, "00112233445566778899aabbccddeeff", IV, &g, &gcm2,
                                    err, sizeof(err)), 0);
    cr_assert_not(tokensrc_key_used(&s, &gcm));
    tokensrc_mark_used(&s, &cbc);
    tokensrc_mark_used(&s, &cbc);
    cr_assert_not(tokensrc_key_used(&s, &cbc));
    cr_assert_eq(s.nused, 0);
    tokensrc_mark_used(&s, &gcm);
    cr_assert(tokensrc_key_used(&s, &gcm));
    cr_assert_not(tokensrc_key_used(&s, &gcm2));
    cr_assert_not(tokensrc_key_used(&s, &cbc));   /* same bytes, CBC: reusable */
    /* the memory is a ring of TOKENSRC_USED_MAX digests */
    for (int i = 0; i < TOKENSRC_USED_MAX - 1; i++) {
        gcm2.key[0] = (uint8_t)i;
        gcm2.key[1] = (uint8_t)(i >> 8);
        tokensrc_mark_used(&s, &gcm2);
    }
    cr_assert(tokensrc_key_used(&s, &gcm));
    gcm2.key[2] ^= 0xff;
    tokensrc_mark_used(&s, &gcm2);
    cr_assert_not(tokensrc_key_used(&s, &gcm));
    tokensrc_mat_fini(&cbc);
    tokensrc_mat_fini(&gcm);
    tokensrc_mat_fini(&gcm2);
}
