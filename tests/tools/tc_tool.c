/* tests/tools/tc_tool.c - crypto/tcipher as a line-oriented CLI.
 *
 * Used by tests/crosscheck/test_tcipher_python.py to compare our streams
 * with `openssl enc` and python cryptography. One request per stdin line,
 * one answer line on stdout; every request uses a fresh stream:
 *
 *   seal KIND SIDE KEY IV MODE START UNIT...   -> "ok HEX" | "err"
 *       MODE single: one tc_seal() per unit; batch: one tc_seal_batch().
 *       The answer is the concatenated wire bytes of all units.
 *   open KIND SIDE KEY IV START WIRE...        -> "ok HEX..." | "err I"
 *       One tc_open() per wire unit; answers each unit's plaintext ("-"
 *       when empty), or the index of the first unit refused.
 *
 * KIND aes-cbc|aes-gcm|aes-gcm-siv, SIDE client|gateway (the sender), KEY
 * and IV hex (IV "-" for none), START the first GCM counter (decimal), a
 * unit "-" is empty. `tc_tool alloc-check` instead counts OpenSSL
 * allocations during 1000 seals/opens after tc_new() and prints
 * "allocations N" (exit 1 when N != 0).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "crypto/tcipher.h"

#define MAX_UNITS 256
#define MAX_BYTES (1 << 20)

struct req {
    enum tc_kind kind;
    enum tc_side side;
    uint8_t key[32], iv[16];
    size_t keylen;
    bool has_iv;
    uint64_t start;
};

static int unhex(const char *s, uint8_t *out, size_t cap, size_t *n)
{
    size_t len = strlen(s);

    if (strcmp(s, "-") == 0) {
        *n = 0;
        return 0;
    }
    if (len % 2 != 0 || len / 2 > cap)
        return -1;
    for (size_t i = 0; i < len / 2; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        out[i] = (uint8_t)v;
    }
    *n = len / 2;
    return 0;
}

static void put_hex(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        printf("%02x", p[i]);
}

/* KIND SIDE KEY IV [MODE] START: the common head of a request. */
static int parse_head(char **tok, int ntok, bool with_mode, struct req *r, bool *batch)
{
    size_t n;
    int need = with_mode ? 6 : 5;

    if (ntok < need || tc_kind_parse(tok[0], &r->kind) != 0)
        return -1;
    if (strcmp(tok[1], "client") == 0)
        r->side = TC_SIDE_CLIENT;
    else if (strcmp(tok[1], "gateway") == 0)
        r->side = TC_SIDE_GATEWAY;
    else
        return -1;
    if (unhex(tok[2], r->key, sizeof(r->key), &r->keylen) != 0)
        return -1;
    if (unhex(tok[3], r->iv, sizeof(r->iv), &n) != 0 || (n != 0 && n != 16))
        return -1;
    r->has_iv = n == 16;
    if (with_mode)
        *batch = strcmp(tok[4], "batch") == 0;
    r->start = strtoull(tok[need - 1], NULL, 10);
    return need;
}

static struct tc_stream *stream(const struct req *r, enum tc_dir dir)
{
    struct tc_stream *s = tc_new(r->kind, dir, r->side, r->key, r->keylen,
                                 r->has_iv ? r->iv : NULL);

    if (s != NULL && r->kind == TC_AES_GCM)
        tc_set_counter(s, r->start);
    return s;
}

static void do_seal(char **tok, int ntok, uint8_t *in, uint8_t *out)
{
    struct req r;
    bool batch = false;
    uint32_t lens[MAX_UNITS];
    size_t count = 0, total = 0, wire = 0, n;
    int first = parse_head(tok, ntok, true, &r, &batch);
    struct tc_stream *s = first < 0 ? NULL : stream(&r, TC_SEAL);
    int rc = s == NULL ? -1 : 0;

    for (int i = first; rc == 0 && i < ntok; i++) {
        if (count == MAX_UNITS || unhex(tok[i], in + total, MAX_BYTES - total, &n) != 0) {
            rc = -1;
            break;
        }
        lens[count++] = (uint32_t)n;
        total += n;
    }
    if (rc == 0 && batch)
        rc = tc_seal_batch(s, in, lens, count, out);
    for (size_t i = 0, p = 0; rc == 0 && !batch && i < count; i++) {
        rc = tc_seal(s, in + p, lens[i], out + wire);
        p += lens[i];
        wire += lens[i] + tc_overhead(s);
    }
    if (rc == 0) {
        wire = total + count * tc_overhead(s);
        printf("ok ");
        put_hex(out, wire);
        printf("\n");
    } else {
        printf("err\n");
    }
    tc_free(s);
}

static void do_open(char **tok, int ntok, uint8_t *in, uint8_t *out)
{
    struct req r;
    int first = parse_head(tok, ntok, false, &r, NULL);
    struct tc_stream *s = first < 0 ? NULL : stream(&r, TC_OPEN);
    size_t lens[MAX_UNITS], used = 0, count = 0, n;

    if (s == NULL) {
        printf("err -1\n");
        return;
    }
    for (int i = first; i < ntok; i++) {
        if (count == MAX_UNITS || unhex(tok[i], in, MAX_BYTES, &n) != 0 ||
            n < tc_overhead(s) || tc_open(s, in, n, out + used) != 0) {
            printf("err %d\n", i - first);
            tc_free(s);
            return;
        }
        lens[count++] = n - tc_overhead(s);
        used += n - tc_overhead(s);
    }
    printf("ok");
    for (size_t i = 0, p = 0; i < count; p += lens[i], i++) {
        putchar(' ');
        if (lens[i] == 0)
            putchar('-');
        put_hex(out + p, lens[i]);
    }
    printf("\n");
    tc_free(s);
}

static int serve(void)
{
    static char line[4 * MAX_BYTES + 4096];
    static char *tok[MAX_UNITS + 16];
    uint8_t *in = malloc(MAX_BYTES), *out = malloc(MAX_BYTES + MAX_UNITS * TC_AEAD_OVERHEAD);

    if (in == NULL || out == NULL)
        return 2;
    while (fgets(line, sizeof(line), stdin) != NULL) {
        int ntok = 0;

        for (char *save = NULL, *t = strtok_r(line, " \t\r\n", &save);
             t != NULL && ntok < (int)(sizeof(tok) / sizeof(tok[0]));
             t = strtok_r(NULL, " \t\r\n", &save))
            tok[ntok++] = t;
        if (ntok == 0)
            continue;
        if (strcmp(tok[0], "seal") == 0) {
            do_seal(tok + 1, ntok - 1, in, out);
        } else if (strcmp(tok[0], "open") == 0) {
            do_open(tok + 1, ntok - 1, in, out);
        } else {
            printf("err unknown request\n");
        }
        fflush(stdout);
    }
    free(in);
    free(out);
    return 0;
}

static long allocs;

static void *count_malloc(size_t n, const char *file, int line)
{
    (void)file;
    (void)line;
    allocs++;
    return malloc(n);
}

static void *count_realloc(void *p, size_t n, const char *file, int line)
{
    (void)file;
    (void)line;
    allocs++;
    return realloc(p, n);
}

static void count_free(void *p, const char *file, int line)
{
    (void)file;
    (void)line;
    free(p);
}

/* tc_seal/tc_seal_batch/tc_open must not allocate once the stream exists. */
static int alloc_check(void)
{
    static const uint8_t key[32] = { 1 }, iv[16] = { 2 };
    static const enum tc_kind kinds[] = { TC_AES_CBC, TC_AES_GCM };
    uint8_t in[64] = { 0 }, wire[4 * 60], back[64];
    uint32_t lens[3] = { 32, 16, 16 };
    long total = 0;

    if (CRYPTO_set_mem_functions(count_malloc, count_realloc, count_free) != 1) {
        printf("cannot hook OpenSSL's allocator\n");
        return 2;
    }
    for (size_t k = 0; k < 2; k++) {
        struct tc_stream *s = tc_new(kinds[k], TC_SEAL, TC_SIDE_CLIENT, key, 32, iv);
        struct tc_stream *o = tc_new(kinds[k], TC_OPEN, TC_SIDE_CLIENT, key, 32, iv);
        size_t ovh = tc_overhead(s);

        if (s == NULL || o == NULL)
            return 2;
        allocs = 0;
        for (int i = 0; i < 1000; i++) {
            size_t w = 0;
            if (tc_seal(s, in, 32, wire) != 0 || tc_open(o, wire, 32 + ovh, back) != 0 ||
                tc_seal_batch(s, in, lens, 3, wire) != 0)
                return 2;
            for (size_t u = 0; u < 3; w += lens[u] + ovh, u++)
                if (tc_open(o, wire + w, lens[u] + ovh, back) != 0)
                    return 2;
        }
        printf("%s allocations %ld\n", tc_kind_name(kinds[k]), allocs);
        total += allocs;
        tc_free(s);
        tc_free(o);
    }
    printf("allocations %ld\n", total);
    return total == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "alloc-check") == 0)
        return alloc_check();
    return serve();
}
