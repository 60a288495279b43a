/* core/hosttab.c - see hosttab.h.
 *
 * Each name is one node: the lfht links, the rcu_head for deferred free,
 * the value and the normalised name. A node is never modified after it
 * is published; registration publishes a new node with
 * cds_lfht_add_replace() (atomic swap with the old one, if any) and the
 * thread whose call unlinked a node -- replace or del, never both, lfht
 * guarantees that -- hands it to call_rcu().
 */
#include "core/hosttab.h"

#include <stdlib.h>
#include <string.h>

#include <urcu-qsbr.h>
#include <urcu/rculfhash.h>

#include "core/sni.h"
#include "crypto/rand.h"

#define FNV_BASIS 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

struct hosttab {
    struct cds_lfht *ht;
    uint64_t seed;
};

struct ht_node {
    struct cds_lfht_node node;
    struct rcu_head rcu;
    struct hosttab_ent ent;
    size_t len;
    char name[];
};

struct ht_key {
    const char *name;
    size_t len;
};

static unsigned long name_hash(const struct hosttab *t, const char *s, size_t n)
{
    uint64_t h = FNV_BASIS ^ t->seed;

    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= FNV_PRIME;
    }
    return (unsigned long)h;
}

static int match(struct cds_lfht_node *node, const void *key)
{
    const struct ht_node *hn = caa_container_of(node, struct ht_node, node);
    const struct ht_key *k = key;

    return hn->len == k->len && memcmp(hn->name, k->name, k->len) == 0;
}

static void free_node(struct rcu_head *head)
{
    free(caa_container_of(head, struct ht_node, rcu));
}

/* Normalised copy of name into buf (HOSTTAB_NAME_MAX + 1 bytes); returns
 * its length, or 0 when the name is empty or too long. */
static size_t normalize(const char *name, size_t len, char *buf)
{
    if (len == 0 || len > HOSTTAB_NAME_MAX)
        return 0;
    memcpy(buf, name, len);
    buf[len] = '\0';
    return sni_name_normalize(buf, len);
}

struct hosttab *hosttab_new(void)
{
    struct hosttab *t = calloc(1, sizeof(*t));

    if (t == NULL)
        return NULL;
    if (rand_bytes(&t->seed, sizeof(t->seed)) != 0)
        goto fail;
    t->ht = cds_lfht_new(64, 64, 0, CDS_LFHT_AUTO_RESIZE | CDS_LFHT_ACCOUNTING, NULL);
    if (t->ht == NULL)
        goto fail;
    return t;
fail:
    free(t);
    return NULL;
}

void hosttab_free(struct hosttab *t)
{
    struct cds_lfht_iter it;
    struct cds_lfht_node *node;

    if (t == NULL)
        return;
    /* No reader is left, so nodes can go at once, without a grace period. */
    cds_lfht_for_each(t->ht, &it, node) {
        if (cds_lfht_del(t->ht, node) == 0)
            free(caa_container_of(node, struct ht_node, node));
    }
    cds_lfht_destroy(t->ht, NULL);
    /* Let earlier call_rcu() frees finish, so nothing looks leaked. */
    rcu_barrier();
    free(t);
}

bool hosttab_lookup(struct hosttab *t, const char *name, size_t len,
                    struct hosttab_ent *out)
{
    char buf[HOSTTAB_NAME_MAX + 1];
    struct ht_key key = { buf, normalize(name, len, buf) };
    struct cds_lfht_iter it;
    struct cds_lfht_node *node;
    bool found = false;

    if (key.len == 0)
        return false;
    rcu_read_lock();
    cds_lfht_lookup(t->ht, name_hash(t, buf, key.len), match, &key, &it);
    node = cds_lfht_iter_get_node(&it);
    if (node != NULL) {
        *out = caa_container_of(node, struct ht_node, node)->ent;
        found = true;
    }
    rcu_read_unlock();
    return found;
}

int hosttab_register(struct hosttab *t, const char *const *names, size_t n,
                     const struct hosttab_ent *ent, struct hosttab_ent *prev,
                     size_t *refused)
{
    int done = 0;

    if (refused != NULL)
        *refused = 0;
    for (size_t i = 0; i < n; i++) {
        char buf[HOSTTAB_NAME_MAX + 1];
        size_t len = normalize(names[i], strlen(names[i]), buf);
        struct ht_key key = { buf, len };
        struct ht_node *hn;
        struct cds_lfht_node *old;

        if (prev != NULL)
            prev[i] = (struct hosttab_ent){ 0 };
        if (len == 0) {
            if (refused != NULL)
                (*refused)++;
            continue;
        }
        hn = malloc(sizeof(*hn) + len + 1);
        if (hn == NULL)
            return -1;
        cds_lfht_node_init(&hn->node);
        hn->ent = *ent;
        hn->len = len;
        memcpy(hn->name, buf, len + 1);
        rcu_read_lock();
        old = cds_lfht_add_replace(t->ht, name_hash(t, buf, len), match, &key, &hn->node);
        rcu_read_unlock();
        if (old != NULL) {
            struct ht_node *on = caa_container_of(old, struct ht_node, node);
            if (prev != NULL)
                prev[i] = on->ent;
            call_rcu(&on->rcu, free_node);
        }
        done++;
    }
    return done;
}

size_t hosttab_remove(struct hosttab *t, const char *const *names, size_t n,
                      uint64_t tunnel)
{
    size_t removed = 0;

    for (size_t i = 0; i < n; i++) {
        char buf[HOSTTAB_NAME_MAX + 1];
        struct ht_key key = { buf, normalize(names[i], strlen(names[i]), buf) };
        struct cds_lfht_iter it;
        struct cds_lfht_node *node;

        if (key.len == 0)
            continue;
        rcu_read_lock();
        cds_lfht_lookup(t->ht, name_hash(t, buf, key.len), match, &key, &it);
        node = cds_lfht_iter_get_node(&it);
        /* Another tunnel may replace the node between the check and the
         * del: del then fails with -ENOENT and the replacer frees it. */
        if (node != NULL &&
            caa_container_of(node, struct ht_node, node)->ent.tunnel == tunnel &&
            cds_lfht_del(t->ht, node) == 0) {
            call_rcu(&caa_container_of(node, struct ht_node, node)->rcu, free_node);
            removed++;
        }
        rcu_read_unlock();
    }
    return removed;
}

size_t hosttab_count(struct hosttab *t)
{
    long before, after;
    unsigned long count;

    rcu_read_lock();
    cds_lfht_count_nodes(t->ht, &before, &count, &after);
    rcu_read_unlock();
    return (size_t)count;
}
