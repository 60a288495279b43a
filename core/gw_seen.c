/* core/gw_seen.c - the aes-gcm keys the gateway has already accepted
 * (see struct gw_seen in gw_impl.h).
 *
 * Why: GCM counters restart at 0 on every connection (PROTOCOL.md 3.3), so
 * a token (and its key) presented twice repeats nonces under one key,
 * which gives away the GHASH key and allows forgeries (9.3). The reference
 * gateway accepts such a replay; we refuse it while the token is valid
 * (after that the token itself is refused as expired).
 *
 * Entries: SHA-256 of the key (the key itself is never kept) and the
 * token's expiry (valid through that instant, as claims_expired() says).
 * Purge: at most once per PURGE_S, on the next claim, a walk deletes the
 * expired entries; an expired entry met by a lookup is refreshed in place.
 * Entries come only from tokens that verified (signed by the session
 * master), so the tree grows with legitimate sessions only.
 */
#include "core/gw_impl.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <search.h>
#include <stdlib.h>
#include <string.h>

#define PURGE_S 60.0
#define DIGEST_LEN 32

struct gw_seen_ent {
    uint8_t digest[DIGEST_LEN];
    double expiry;
};

static int ent_cmp(const void *a, const void *b)
{
    const struct gw_seen_ent *x = a, *y = b;

    return memcmp(x->digest, y->digest, DIGEST_LEN);
}

void gw_seen_init(struct gw_seen *s)
{
    *s = (struct gw_seen){ .root = NULL };
    pthread_mutex_init(&s->mu, NULL);
}

static void ent_free(void *p)
{
    free(p);
}

void gw_seen_fini(struct gw_seen *s)
{
    tdestroy(s->root, ent_free);
    s->root = NULL;
    s->n = 0;
    pthread_mutex_destroy(&s->mu);
}

/* twalk_r closure: collect the expired entries (deleting inside a walk is
 * not allowed), then delete them. */
struct purge {
    double now;
    struct gw_seen_ent **v;
    size_t n, cap;
};

static void purge_visit(const void *nodep, VISIT which, void *closure)
{
    struct purge *p = closure;
    struct gw_seen_ent *e = *(struct gw_seen_ent *const *)nodep;

    if ((which != postorder && which != leaf) || e->expiry >= p->now || p->n == p->cap)
        return;
    p->v[p->n++] = e;
}

static void purge(struct gw_seen *s, double now)
{
    struct purge p = { .now = now, .cap = s->n };

    s->next_purge = now + PURGE_S;
    if (s->n == 0 || (p.v = malloc(s->n * sizeof(*p.v))) == NULL)
        return; /* out of memory: try again next time */
    twalk_r(s->root, purge_visit, &p);
    for (size_t i = 0; i < p.n; i++) {
        tdelete(p.v[i], &s->root, ent_cmp);
        free(p.v[i]);
        s->n--;
    }
    free(p.v);
}

bool gw_seen_claim(struct gw_seen *s, const uint8_t *key, size_t len, double expiry,
                   double now)
{
    struct gw_seen_ent key_ent, *e;
    unsigned dlen = 0;
    void **found;
    bool fresh = false;

    if (EVP_Digest(key, len, key_ent.digest, &dlen, EVP_sha256(), NULL) != 1 ||
        dlen != DIGEST_LEN)
        return false;
    pthread_mutex_lock(&s->mu);
    if (now >= s->next_purge)
        purge(s, now);
    found = tfind(&key_ent, &s->root, ent_cmp);
    if (found != NULL) {
        e = *found;
        if (e->expiry < now) { /* the old session's token is dead: a new life */
            e->expiry = expiry;
            fresh = true;
        }
    } else if ((e = malloc(sizeof(*e))) != NULL) {
        memcpy(e->digest, key_ent.digest, DIGEST_LEN);
        e->expiry = expiry;
        if (tsearch(e, &s->root, ent_cmp) != NULL) {
            s->n++;
            fresh = true;
        } else {
            free(e);
        }
    }
    pthread_mutex_unlock(&s->mu);
    OPENSSL_cleanse(key_ent.digest, sizeof(key_ent.digest));
    return fresh;
}

size_t gw_seen_count(struct gw_seen *s)
{
    size_t n;

    pthread_mutex_lock(&s->mu);
    n = s->n;
    pthread_mutex_unlock(&s->mu);
    return n;
}
