/* tests/unit/test_sock.c - io/sock.h: SO_REUSEPORT steering. Real
 * listeners on 127.0.0.1 sharing a port, real connections: where the
 * kernel queues each one is read back with accept(2). */
#include <criterion/criterion.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/sock.h"

#define MAXL 3

/* n listeners on one free port of 127.0.0.1, in order (the group's
 * numbering). */
static void listeners(int *fd, unsigned n)
{
    struct sock_opts o = { .reuseport = true };
    struct net_addr a = { .family = AF_INET, .ip = { 127, 0, 0, 1 } };

    for (unsigned i = 0; i < n; i++) {
        fd[i] = sock_listen(&a, &o);
        cr_assert(fd[i] >= 0, "listen: %s", strerror(-fd[i]));
        if (i == 0)
            cr_assert(sock_local(fd[0], &a) == 0);
    }
}

/* k connections to the group (each closed at once: it stays queued on
 * the listener the kernel chose), then how many each listener holds. */
static void spread(const int *fd, unsigned n, unsigned k, unsigned *got)
{
    struct net_addr a;
    struct sockaddr_storage ss;
    socklen_t len;

    cr_assert(sock_local(fd[0], &a) == 0);
    len = addr_to_sockaddr(&a, &ss);
    for (unsigned i = 0; i < k; i++) {
        int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

        cr_assert(c >= 0);
        cr_assert(connect(c, (struct sockaddr *)&ss, len) == 0, "connect: %s", strerror(errno));
        close(c);
    }
    for (unsigned i = 0; i < n; i++) {
        int s;

        got[i] = 0;
        while ((s = accept(fd[i], NULL, NULL)) >= 0) {
            got[i]++;
            close(s);
        }
        cr_assert(errno == EAGAIN || errno == EWOULDBLOCK, "accept: %s", strerror(errno));
    }
}

static void close_all(int *fd, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        if (fd[i] >= 0)
            close(fd[i]);
}

Test(sock_steer, all_to_one_listener)
{
    int fd[2];
    unsigned got[2];
    uint32_t to1[2] = { 0, 1 }, to0[2] = { SOCK_STEER_SCALE, 0 };

    listeners(fd, 2);
    cr_assert(sock_steer(fd[0], to1, 2) == 0);
    spread(fd, 2, 40, got);
    cr_expect(got[0] == 0 && got[1] == 40, "got %u/%u", got[0], got[1]);
    /* Any listener of the group sets it for all. */
    cr_assert(sock_steer(fd[1], to0, 2) == 0);
    spread(fd, 2, 40, got);
    cr_expect(got[0] == 40 && got[1] == 0, "got %u/%u", got[0], got[1]);
    close_all(fd, 2);
}

Test(sock_steer, weights_split_and_off_restores_the_hash)
{
    int fd[2];
    unsigned got[2];
    uint32_t w[2] = { 1, 3 };

    listeners(fd, 2);
    cr_assert(sock_steer(fd[0], w, 2) == 0);
    spread(fd, 2, 400, got);
    cr_expect(got[0] + got[1] == 400);
    /* 300 expected on the second; 5 standard deviations is about 45. */
    cr_expect(got[1] > 250 && got[1] < 350, "got %u/%u", got[0], got[1]);
    cr_assert(sock_steer_off(fd[1]) == 0);
    cr_expect(sock_steer_off(fd[1]) < 0, "nothing left to detach");
    spread(fd, 2, 64, got);
    cr_expect(got[0] > 0 && got[1] > 0, "hash spreads: got %u/%u", got[0], got[1]);
    close_all(fd, 2);
}

/* The listener the program picks is gone: the number is past the group's
 * end, and the kernel hashes over what is left. Nothing is lost. */
Test(sock_steer, shrunken_group_loses_nothing)
{
    int fd[MAXL];
    unsigned got[MAXL];
    uint32_t w[MAXL] = { 0, 0, 1 };

    listeners(fd, MAXL);
    cr_assert(sock_steer(fd[0], w, MAXL) == 0);
    close(fd[2]);
    fd[2] = -1;
    spread(fd, 2, 64, got);
    cr_expect(got[0] + got[1] == 64, "got %u/%u", got[0], got[1]);
    close_all(fd, MAXL);
}

Test(sock_steer, bad_weights)
{
    int fd[1];
    uint32_t zero[2] = { 0, 0 }, big[1] = { SOCK_STEER_SCALE + 1 }, one[1] = { 1 };

    listeners(fd, 1);
    cr_expect(sock_steer(fd[0], one, 0) == -EINVAL);
    cr_expect(sock_steer(fd[0], one, SOCK_STEER_MAX + 1) == -EINVAL);
    cr_expect(sock_steer(fd[0], zero, 2) == -EINVAL);
    cr_expect(sock_steer(fd[0], big, 1) == -EINVAL);
    cr_expect(sock_steer(fd[0], one, 1) == 0);
    close_all(fd, 1);
}
