/* tests/unit/testutil.c - see testutil.h. */
#include "tests/unit/testutil.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *tu_data_path(const char *rel)
{
    static char path[4096];
    const char *dir = getenv("SNITUN_TEST_DATA");

    if (dir == NULL)
        dir = SNITUN_TEST_DATA;
    snprintf(path, sizeof(path), "%s/%s", dir, rel);
    return path;
}

uint8_t *tu_read_data(const char *rel, size_t *len)
{
    const char *path = tu_data_path(rel);
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(n > 0 ? (size_t)n : 1);
    cr_assert_not_null(buf);
    cr_assert_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

json_t *tu_load_json(const char *rel)
{
    json_error_t err;
    json_t *doc = json_load_file(tu_data_path(rel), JSON_ALLOW_NUL, &err);
    cr_assert_not_null(doc, "%s:%d: %s", rel, err.line, err.text);
    return doc;
}

static int unhex_digit(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

uint8_t *tu_unhex(const char *hex, size_t *len)
{
    size_t n = strlen(hex);
    cr_assert(n % 2 == 0, "odd hex length %zu", n);
    uint8_t *out = malloc(n / 2 + 1);
    cr_assert_not_null(out);
    for (size_t i = 0; i < n / 2; i++) {
        int hi = unhex_digit(hex[2 * i]), lo = unhex_digit(hex[2 * i + 1]);
        cr_assert(hi >= 0 && lo >= 0, "bad hex at %zu", 2 * i);
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    *len = n / 2;
    return out;
}

const char *tu_str(json_t *obj, const char *key)
{
    json_t *v = json_object_get(obj, key);
    cr_assert(json_is_string(v), "member %s is not a string", key);
    return json_string_value(v);
}
