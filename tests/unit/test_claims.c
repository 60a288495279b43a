/* tests/unit/test_claims.c - core/claims: every row of PROTOCOL.md 2.5 and
 * the C gateway's extra rules, one exact error per input. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/claims.h"
#include "crypto/tcipher.h"

#define KEY "\"aes_key\": \"00112233445566778899aabbccddeeff102132435465768798a9babbdcddfeef\""
#define IV "\"aes_iv\": \"0f0e0d0c0b0a09080706050403020100\""
#define HOST "\"hostname\": \"myname.ui.nabu.casa\""
#define VALID "\"valid\": 1750003600"
/* A complete claim set, with room for one more member in front. */
#define BASE VALID ", " HOST ", " KEY ", " IV

static enum claims_err parse(const char *json, struct claims *c)
{
    return claims_parse((const uint8_t *)json, strlen(json), c);
}

struct row {
    const char *json;
    enum claims_err err;
};

static void run_rows(const struct row *rows, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct claims c;
        enum claims_err got = parse(rows[i].json, &c);

        cr_assert_eq(got, rows[i].err, "row %zu %s: got %s, want %s", i, rows[i].json,
                     claims_strerror(got), claims_strerror(rows[i].err));
        if (got != CLAIMS_OK)
            cr_assert_null(c.hostname, "failure leaves the struct empty");
        claims_fini(&c);
    }
}

Test(claims, accepted_reference_generator_shape)
{
    struct claims c;

    cr_assert_eq(parse("{\"valid\": 1750003600.0, " HOST ", " KEY ", " IV
                       ", \"protocol_version\": 2}", &c), CLAIMS_OK);
    cr_assert_eq(c.valid, 1750003600.0);
    cr_assert_str_eq(c.hostname, "myname.ui.nabu.casa");
    cr_assert_eq(c.naliases, 0);
    cr_assert_eq(c.aes_key_len, 32);
    cr_assert_eq(c.aes_key[0], 0x00);
    cr_assert_eq(c.aes_key[1], 0x11);
    cr_assert_eq(c.aes_key[31], 0xef);
    cr_assert_eq(c.aes_iv_len, 16);
    cr_assert_eq(c.aes_iv[0], 0x0f);
    cr_assert_eq(c.aes_iv[15], 0x00);
    cr_assert_eq(c.protocol_version, 2);
    cr_assert_eq(claims_version(&c), 2);
    cr_assert_eq(c.cipher, TC_AES_CBC);
    cr_assert_eq(c.cipher_unknown, false);
    cr_assert_eq(claims_nnames(&c), 1);
    cr_assert_str_eq(claims_name(&c, 0), "myname.ui.nabu.casa");
    claims_fini(&c);
    cr_assert_null(c.hostname);
    claims_fini(&c);  /* twice is harmless */
}

/* PROTOCOL.md 2.5, row by row. */
Test(claims, reference_table)
{
    static const struct row rows[] = {
        /* JSON is not an object: escapes in the reference */
        { "[1, 2, 3]", CLAIMS_ERR_NOT_OBJECT },
        { "123", CLAIMS_ERR_NOT_OBJECT },
        { "\"s\"", CLAIMS_ERR_NOT_OBJECT },
        { "null", CLAIMS_ERR_NOT_OBJECT },
        /* plaintext not JSON */
        { "this is not json", CLAIMS_ERR_JSON },
        { "", CLAIMS_ERR_JSON },
        { "{", CLAIMS_ERR_JSON },
        { "{} x", CLAIMS_ERR_JSON },
        { "{\"valid\": NaN}", CLAIMS_ERR_JSON },
        /* valid, hostname, aes_key or aes_iv missing */
        { "{" HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_MISSING },
        { "{" VALID ", " KEY ", " IV "}", CLAIMS_ERR_HOSTNAME_MISSING },
        { "{" VALID ", " HOST ", " IV "}", CLAIMS_ERR_KEY_MISSING },
        { "{" VALID ", " HOST ", " KEY "}", CLAIMS_ERR_IV_MISSING },
        { "{" VALID ", " HOST ", " KEY ", \"cipher\": \"aes-gcm\"}", CLAIMS_ERR_IV_MISSING },
        { "{}", CLAIMS_ERR_VALID_MISSING },
        /* valid not a number */
        { "{\"valid\": \"1750003600\", " HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_TYPE },
        { "{\"valid\": null, " HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_TYPE },
        { "{\"valid\": true, " HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_TYPE },
        { "{\"valid\": [1], " HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_TYPE },
        /* aes_key / aes_iv not hex */
        { "{" VALID ", " HOST ", \"aes_key\": \"zz\", " IV "}", CLAIMS_ERR_KEY_HEX },
        { "{" VALID ", " HOST ", \"aes_key\": \"001\", " IV "}", CLAIMS_ERR_KEY_HEX },
        { "{" VALID ", " HOST ", \"aes_key\": \"00 11\", " IV "}", CLAIMS_ERR_KEY_HEX },
        { "{" VALID ", " HOST ", \"aes_key\": 7, " IV "}", CLAIMS_ERR_KEY_HEX },
        { "{" VALID ", " HOST ", \"aes_key\": null, " IV "}", CLAIMS_ERR_KEY_HEX },
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"0x\"}", CLAIMS_ERR_IV_HEX },
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": [1]}", CLAIMS_ERR_IV_HEX },
        /* aes_key not 16, 24 or 32 bytes */
        { "{" VALID ", " HOST ", \"aes_key\": \"\", " IV "}", CLAIMS_ERR_KEY_SIZE },
        { "{" VALID ", " HOST ", \"aes_key\": \"00112233445566778899aabbccddee\", " IV "}",
          CLAIMS_ERR_KEY_SIZE },
        { "{" VALID ", " HOST ", \"aes_key\": "
          "\"00112233445566778899aabbccddeeff102132435465768798a9babbdcddfe\", " IV "}",
          CLAIMS_ERR_KEY_SIZE },
        { "{" VALID ", " HOST ", \"aes_key\": "
          "\"00112233445566778899aabbccddeeff102132435465768798a9babbdcddfeef00\", " IV "}",
          CLAIMS_ERR_KEY_SIZE },
        { "{" VALID ", " HOST ", \"aes_key\": \"00112233445566778899aabbccddeeff\", " IV "}",
          CLAIMS_OK },
        { "{" VALID ", " HOST ", \"aes_key\": "
          "\"00112233445566778899aabbccddeeff0011223344556677\", " IV "}", CLAIMS_OK },
        { "{" VALID ", " HOST ", \"aes_key\": "
          "\"00112233445566778899AABBCCDDEEFF102132435465768798A9BABBDCDDFEEF\", " IV "}",
          CLAIMS_OK },
        /* aes_iv not 16 bytes: rejected with aes-cbc, accepted with AEAD */
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"0f0e0d0c0b0a0908\"}", CLAIMS_ERR_IV_SIZE },
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"\"}", CLAIMS_ERR_IV_SIZE },
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"0f0e0d0c0b0a0908\", "
          "\"cipher\": \"aes-cbc\"}", CLAIMS_ERR_IV_SIZE },
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"0f0e0d0c0b0a0908\", "
          "\"cipher\": \"something-else\"}", CLAIMS_ERR_IV_SIZE },
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"0f0e0d0c0b0a0908\", "
          "\"cipher\": \"aes-gcm\"}", CLAIMS_OK },
        { "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"\", \"cipher\": \"aes-gcm\"}", CLAIMS_OK },
        /* protocol_version missing, > 2: accepted */
        { "{" BASE "}", CLAIMS_OK },
        { "{" BASE ", \"protocol_version\": 3}", CLAIMS_OK },
        /* alias missing or null */
        { "{" BASE ", \"alias\": null}", CLAIMS_OK },
        { "{" BASE ", \"alias\": []}", CLAIMS_OK },
    };
    run_rows(rows, sizeof(rows) / sizeof(rows[0]));
}

/* PROTOCOL.md 2.5 "requirements beyond the reference", and the other
 * places where this parser is stricter. */
Test(claims, stricter_than_reference)
{
    static const struct row rows[] = {
        { "{" VALID ", \"hostname\": 5, " KEY ", " IV "}", CLAIMS_ERR_HOSTNAME_TYPE },
        { "{" VALID ", \"hostname\": null, " KEY ", " IV "}", CLAIMS_ERR_HOSTNAME_TYPE },
        { "{" VALID ", \"hostname\": [\"a\"], " KEY ", " IV "}", CLAIMS_ERR_HOSTNAME_TYPE },
        { "{" VALID ", \"hostname\": \"a\\u0000b\", " KEY ", " IV "}", CLAIMS_ERR_HOSTNAME_TYPE },
        { "{" BASE ", \"protocol_version\": -1}", CLAIMS_ERR_VERSION },
        { "{" BASE ", \"protocol_version\": 2.0}", CLAIMS_ERR_VERSION },
        { "{" BASE ", \"protocol_version\": \"2\"}", CLAIMS_ERR_VERSION },
        { "{" BASE ", \"protocol_version\": null}", CLAIMS_ERR_VERSION },
        { "{" BASE ", \"protocol_version\": true}", CLAIMS_ERR_VERSION },
        { "{" BASE ", \"alias\": \"www.example\"}", CLAIMS_ERR_ALIAS },
        { "{" BASE ", \"alias\": [\"a\", 1]}", CLAIMS_ERR_ALIAS },
        { "{" BASE ", \"alias\": [null]}", CLAIMS_ERR_ALIAS },
        { "{" BASE ", \"alias\": {}}", CLAIMS_ERR_ALIAS },
        { "{" BASE ", \"alias\": [\"a\\u0000\"]}", CLAIMS_ERR_ALIAS },
        { "{" BASE ", \"aes_key\": \"0011\\u00002233\"}", CLAIMS_ERR_KEY_HEX },
        /* valid outside datetime's years 1..9999 (the reference raises) */
        { "{\"valid\": 253402300800, " HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_RANGE },
        { "{\"valid\": 1e300, " HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_RANGE },
        { "{\"valid\": -62135596801, " HOST ", " KEY ", " IV "}", CLAIMS_ERR_VALID_RANGE },
        { "{\"valid\": 253402300799.5, " HOST ", " KEY ", " IV "}", CLAIMS_OK },
        { "{\"valid\": -62135596800, " HOST ", " KEY ", " IV "}", CLAIMS_OK },
        /* numbers jansson cannot hold, anywhere */
        { "{" BASE ", \"x\": 123456789012345678901234567890}", CLAIMS_ERR_JSON },
    };
    run_rows(rows, sizeof(rows) / sizeof(rows[0]));
}

Test(claims, utf8_is_checked_before_json)
{
    static const struct { const char *bytes; size_t n; } rows[] = {
        { "\xff\xfe{}", 4 },                   /* the vector's payload */
        { "{\"hostname\": \"\xc0\xaf\"}", 17 }, /* overlong */
        { "{\"x\": \"\xed\xa0\x80\"}", 12 },    /* surrogate */
        { "\x80", 1 },
        { "not json \xff", 10 },                /* not JSON either: UTF-8 wins */
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        struct claims c;
        cr_assert_eq(claims_parse((const uint8_t *)rows[i].bytes, rows[i].n, &c),
                     CLAIMS_ERR_UTF8, "row %zu", i);
    }
    /* Valid UTF-8 (a BOM, too, is UTF-8) that is not JSON. */
    struct claims c;
    cr_assert_eq(parse("\xef\xbb\xbf{}", &c), CLAIMS_ERR_JSON);
    cr_assert_eq(parse("{\"valid\": 1750003600, \"hostname\": \"h\xc3\xa9\", " KEY ", " IV "}",
                       &c), CLAIMS_OK);
    cr_assert_str_eq(c.hostname, "h\xc3\xa9");
    claims_fini(&c);
}

Test(claims, never_reads_past_the_length)
{
    const char *full = "{" BASE "}garbage";
    struct claims c;

    cr_assert_eq(claims_parse((const uint8_t *)full, strlen(full) - 7, &c), CLAIMS_OK);
    claims_fini(&c);
    cr_assert_eq(claims_parse((const uint8_t *)full, strlen(full) - 8, &c), CLAIMS_ERR_JSON);
    cr_assert_eq(claims_parse((const uint8_t *)"", 0, &c), CLAIMS_ERR_JSON);
}

Test(claims, check_order_follows_the_reference)
{
    static const struct row rows[] = {
        /* valid before hostname before aes_key before aes_iv */
        { "{\"aes_iv\": 1}", CLAIMS_ERR_VALID_MISSING },
        { "{" VALID ", \"aes_key\": \"zz\", \"aes_iv\": 1}", CLAIMS_ERR_HOSTNAME_MISSING },
        { "{" VALID ", " HOST ", \"aes_key\": \"zz\", \"aes_iv\": 1}", CLAIMS_ERR_KEY_HEX },
        /* hex before size; unsupported cipher before sizes */
        { "{" VALID ", " HOST ", \"aes_key\": \"00\", \"aes_iv\": \"zz\"}", CLAIMS_ERR_IV_HEX },
        { "{" VALID ", " HOST ", \"aes_key\": \"00\", \"aes_iv\": \"00\"}", CLAIMS_ERR_KEY_SIZE },
        { "{" BASE ", \"protocol_version\": -1, \"alias\": 5}", CLAIMS_ERR_VERSION },
    };
    run_rows(rows, sizeof(rows) / sizeof(rows[0]));
}

Test(claims, cipher_choice)
{
    static const struct { const char *member; enum tc_kind kind; bool unknown; } rows[] = {
        { "", TC_AES_CBC, false },
        { ", \"cipher\": \"aes-cbc\"", TC_AES_CBC, false },
        { ", \"cipher\": \"aes-gcm\"", TC_AES_GCM, false },
        { ", \"cipher\": \"chacha20-poly1305\"", TC_AES_CBC, true },
        { ", \"cipher\": \"AES-GCM\"", TC_AES_CBC, true },
        { ", \"cipher\": \"\"", TC_AES_CBC, true },
        { ", \"cipher\": null", TC_AES_CBC, true },
        { ", \"cipher\": 3", TC_AES_CBC, true },
        { ", \"cipher\": \"aes-gcm\\u0000\"", TC_AES_CBC, true },
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        char json[512];
        struct claims c;

        snprintf(json, sizeof(json), "{" BASE "%s}", rows[i].member);
        cr_assert_eq(parse(json, &c), CLAIMS_OK, "row %zu", i);
        cr_assert_eq(c.cipher, rows[i].kind, "row %zu", i);
        cr_assert_eq(c.cipher_unknown, rows[i].unknown, "row %zu", i);
        claims_fini(&c);
    }
}

Test(claims, aes_gcm_siv_depends_on_openssl)
{
    struct claims c;
    enum claims_err err = parse("{" BASE ", \"cipher\": \"aes-gcm-siv\"}", &c);

    if (tc_available(TC_AES_GCM_SIV)) {
        cr_assert_eq(err, CLAIMS_OK);
        cr_assert_eq(c.cipher, TC_AES_GCM_SIV);
    } else {
        cr_assert_eq(err, CLAIMS_ERR_CIPHER);
    }
    claims_fini(&c);
}

Test(claims, protocol_versions)
{
    static const struct { const char *member; int64_t given; int runs; } rows[] = {
        { "", 0, 0 },
        { ", \"protocol_version\": 0", 0, 0 },
        { ", \"protocol_version\": 1", 1, 1 },
        { ", \"protocol_version\": 2", 2, 2 },
        { ", \"protocol_version\": 3", 3, 2 },
        { ", \"protocol_version\": 9223372036854775807", INT64_MAX, 2 },
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        char json[512];
        struct claims c;

        snprintf(json, sizeof(json), "{" BASE "%s}", rows[i].member);
        cr_assert_eq(parse(json, &c), CLAIMS_OK, "row %zu", i);
        cr_assert_eq(c.protocol_version, rows[i].given, "row %zu", i);
        cr_assert_eq(claims_version(&c), rows[i].runs, "row %zu", i);
        claims_fini(&c);
    }
}

Test(claims, aliases_and_names)
{
    struct claims c;

    cr_assert_eq(parse("{\"alias\": [\"www.myname.ui.nabu.casa\", \"alt.example.org\"], "
                       BASE "}", &c), CLAIMS_OK);
    cr_assert_eq(c.naliases, 2);
    cr_assert_eq(claims_nnames(&c), 3);
    cr_assert_str_eq(claims_name(&c, 0), "myname.ui.nabu.casa");
    cr_assert_str_eq(claims_name(&c, 1), "www.myname.ui.nabu.casa");
    cr_assert_str_eq(claims_name(&c, 2), "alt.example.org");
    claims_fini(&c);
    cr_assert_eq(c.naliases, 0);
    cr_assert_null(c.aliases);
}

Test(claims, unknown_members_ignored_last_duplicate_wins)
{
    struct claims c;

    cr_assert_eq(parse("{\"whitelist\": [], \"hostname\": \"first\", " BASE
                       ", \"hostname\": \"last\", \"extra\": {\"deep\": [1, 2.5, null]}}", &c),
                 CLAIMS_OK);
    cr_assert_str_eq(c.hostname, "last");
    claims_fini(&c);
    cr_assert_eq(parse(" \n\t{" BASE "} \n", &c), CLAIMS_OK, "surrounding whitespace");
    claims_fini(&c);
}

Test(claims, aead_iv_lengths)
{
    static const struct { const char *iv; size_t len; } rows[] = {
        { "", 0 }, { "0f0e0d0c0b0a0908", 8 }, { "0f0e0d0c0b0a0908070605040302010011", 17 },
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        char json[512];
        struct claims c;

        snprintf(json, sizeof(json), "{" VALID ", " HOST ", " KEY ", \"aes_iv\": \"%s\", "
                 "\"cipher\": \"aes-gcm\"}", rows[i].iv);
        cr_assert_eq(parse(json, &c), CLAIMS_OK, "row %zu", i);
        cr_assert_eq(c.aes_iv_len, rows[i].len);
        if (rows[i].len > 0)
            cr_assert_eq(c.aes_iv[0], 0x0f);
        claims_fini(&c);
    }
}

Test(claims, expiry)
{
    struct claims c;

    cr_assert_eq(parse("{\"valid\": 1750000000, " HOST ", " KEY ", " IV "}", &c), CLAIMS_OK);
    cr_assert_eq(claims_expired(&c, 1750000000.0), false, "valid == now is accepted");
    cr_assert_eq(claims_expired(&c, 1749999999.0), false);
    cr_assert_eq(claims_expired(&c, 1750000000.000001), true);
    cr_assert_eq(claims_expired(&c, 1750000001.0), true);
    claims_fini(&c);
    cr_assert_eq(parse("{\"valid\": 1750003600.25, " HOST ", " KEY ", " IV "}", &c), CLAIMS_OK);
    cr_assert_eq(c.valid, 1750003600.25);
    cr_assert_eq(claims_expired(&c, 1750003600.25), false);
    cr_assert_eq(claims_expired(&c, 1750003600.5), true);
    claims_fini(&c);
}

Test(claims, error_names_distinct)
{
    for (int a = CLAIMS_OK; a <= CLAIMS_ERR_NOMEM; a++) {
        const char *na = claims_strerror((enum claims_err)a);
        cr_assert_str_neq(na, "unknown", "%d has a name", a);
        for (int b = a + 1; b <= CLAIMS_ERR_NOMEM; b++)
            cr_assert_str_neq(na, claims_strerror((enum claims_err)b), "%d vs %d", a, b);
    }
    cr_assert_str_eq(claims_strerror((enum claims_err)99), "unknown");
    cr_assert_str_eq(claims_strerror(CLAIMS_ERR_KEY_SIZE), "aes_key_bad_size");
}
