/*
 * The floor for any vfio-user proxy: the least a relay can do. It listens on argv[1]; for each
 * client it connects to argv[2] and relays both ways, one thread per direction, each a loop of
 * recvmsg (with room for 253 fds) and sendmsg of the same bytes with the same fds, then close.
 * No framing, no decoding, no checks. Built by bench/tap.mjs with the system's C compiler.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define BUF (256 * 1024)
#define MAXFDS 253

struct dir { int from, to; };

static void *pump(void *arg) {
    struct dir d = *(struct dir *)arg;
    free(arg);
    char *buf = malloc(BUF);
    char cbuf[CMSG_SPACE(sizeof(int) * MAXFDS)];
    for (;;) {
        struct iovec iov = { buf, BUF };
        struct msghdr m = { 0 };
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = cbuf;
        m.msg_controllen = sizeof(cbuf);
        ssize_t n = recvmsg(d.from, &m, MSG_CMSG_CLOEXEC);
        if (n <= 0) break;
        int fds[MAXFDS];
        int nfds = 0;
        for (struct cmsghdr *c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c)) {
            if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
                nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
                memcpy(fds, CMSG_DATA(c), sizeof(int) * nfds);
            }
        }
        ssize_t at = 0;
        while (at < n) {
            struct iovec out = { buf + at, n - at };
            struct msghdr s = { 0 };
            char sbuf[CMSG_SPACE(sizeof(int) * MAXFDS)];
            s.msg_iov = &out;
            s.msg_iovlen = 1;
            if (at == 0 && nfds > 0) {
                s.msg_control = sbuf;
                s.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
                struct cmsghdr *c = CMSG_FIRSTHDR(&s);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
                memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
            }
            ssize_t w = sendmsg(d.to, &s, MSG_NOSIGNAL);
            if (w <= 0) goto done;
            at += w;
        }
        for (int i = 0; i < nfds; i++) close(fds[i]);
    }
done:
    shutdown(d.to, SHUT_WR);
    free(buf);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int l = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    strncpy(a.sun_path, argv[1], sizeof(a.sun_path) - 1);
    if (bind(l, (struct sockaddr *)&a, sizeof(a)) || listen(l, 16)) return 1;
    write(1, "listening\n", 10);
    for (;;) {
        int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        struct sockaddr_un u = { .sun_family = AF_UNIX };
        strncpy(u.sun_path, argv[2], sizeof(u.sun_path) - 1);
        if (connect(s, (struct sockaddr *)&u, sizeof(u))) { close(c); close(s); continue; }
        pthread_t t;
        struct dir *up = malloc(sizeof *up), *down = malloc(sizeof *down);
        *up = (struct dir){ c, s };
        *down = (struct dir){ s, c };
        pthread_create(&t, NULL, pump, up);
        pthread_detach(t);
        pthread_create(&t, NULL, pump, down);
        pthread_detach(t);
    }
}
