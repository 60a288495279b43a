/* crypto/rand.c - see rand.h. */
#include "crypto/rand.h"

#include <limits.h>
#include <openssl/rand.h>

int rand_bytes(void *buf, size_t n)
{
    unsigned char *p = buf;

    /* RAND_bytes takes an int: feed huge requests in slices. */
    while (n > 0) {
        int chunk = n > INT_MAX ? INT_MAX : (int)n;

        if (RAND_bytes(p, chunk) != 1)
            return -1;
        p += chunk;
        n -= (size_t)chunk;
    }
    return 0;
}
