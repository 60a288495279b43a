/* tests/unit/testutil.h - helpers shared by the Criterion unit tests.
 *
 * Everything here aborts the test (cr_assert) on failure, so callers never
 * check results. Returned buffers are heap-allocated and owned by the
 * caller (free()); JSON documents are released with json_decref().
 */
#ifndef TESTS_UNIT_TESTUTIL_H
#define TESTS_UNIT_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>
#include <jansson.h>

/* Path of a file under tests/data/ (static buffer, valid until next call). */
const char *tu_data_path(const char *rel);

/* Whole file under tests/data/; *len receives its size. */
uint8_t *tu_read_data(const char *rel, size_t *len);

/* JSON document under tests/data/. */
json_t *tu_load_json(const char *rel);

/* Lower/upper-case hex string to bytes; *len receives the byte count. */
uint8_t *tu_unhex(const char *hex, size_t *len);

/* json object member that must be a string. */
const char *tu_str(json_t *obj, const char *key);

#endif
