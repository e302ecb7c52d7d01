/* The C floor: the least a UDP SIP responder can cost on this machine.
 *
 * It answers every INVITE 403 and every OPTIONS 200 without looking at the caller (the bench's
 * reject mix calls from banned numbers only), and absorbs everything else (the ACKs).  The answer
 * copies the Via lines, From, To (with a tag), Call-ID and CSeq, as a stateless proxy's would.
 * No screening, no transactions, no records, no event loop: what is left is receiving, finding
 * six headers and sending, in batches of up to 64 datagrams each way.  Nothing that screens calls
 * can cost less than this; the load bench measures it beside `callguard serve` and the anchor.
 *
 *   cresponder PORT block   blocking recvmmsg(MSG_WAITFORONE), as a dedicated listener thread would
 *   cresponder PORT epoll   epoll_wait, then non-blocking recvmmsg until EAGAIN, as an event loop does
 *
 * Listens on 127.0.0.1:PORT only; prints "ready" once bound; exits 0 on SIGTERM or SIGINT.
 * Built by the bench at run time (cc -O2), never installed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define IN_SIZE 4096
#define OUT_SIZE 2048

static char in_buf[BATCH][IN_SIZE], out_buf[BATCH][OUT_SIZE];
static struct mmsghdr in_msgs[BATCH], out_msgs[BATCH];
static struct iovec in_iov[BATCH], out_iov[BATCH];
static struct sockaddr_in peers[BATCH];
static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

/* Append `text` of `len` octets to the answer if it fits; returns the new length, or -1 if not. */
static int put(char *out, int at, const char *text, int len) {
    if (at < 0 || len < 0 || at + len > OUT_SIZE) return -1;
    memcpy(out + at, text, (size_t)len);
    return at + len;
}

/* The whole line (CRLF included) of the first header named `name` (with its colon), or NULL. */
static const char *header(const char *head, const char *end, const char *name, int *len) {
    size_t n = strlen(name);
    const char *p = head;
    while (p < end) {
        const char *nl = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (nl == NULL || nl == p) return NULL;
        if ((size_t)(nl - p) > n && strncasecmp(p, name, n) == 0) {
            *len = (int)(nl - p) + 2;
            return p;
        }
        p = nl + 2;
    }
    return NULL;
}

/* The answer to one datagram in `out`; returns its length, or 0 for none (ACK, other, malformed). */
static int answer(const char *msg, int size, char *out) {
    const char *status;
    if (size > 7 && memcmp(msg, "INVITE ", 7) == 0) status = "SIP/2.0 403 Forbidden\r\n";
    else if (size > 8 && memcmp(msg, "OPTIONS ", 8) == 0) status = "SIP/2.0 200 OK\r\n";
    else return 0;
    const char *eoh = memmem(msg, (size_t)size, "\r\n\r\n", 4);
    if (eoh == NULL) return 0;
    const char *end = eoh + 2, *line = memmem(msg, (size_t)size, "\r\n", 2) + 2;
    int at = put(out, 0, status, (int)strlen(status)), len;
    for (const char *p = line; p < end;) {      /* every Via line, in order */
        const char *nl = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (nl == NULL) break;
        if (nl - p > 4 && strncasecmp(p, "Via:", 4) == 0) at = put(out, at, p, (int)(nl - p) + 2);
        p = nl + 2;
    }
    const char *h;
    if ((h = header(line, end, "From:", &len)) == NULL) return 0;
    at = put(out, at, h, len);
    if ((h = header(line, end, "To:", &len)) == NULL) return 0;
    at = put(out, at, h, len - 2);
    at = put(out, at, ";tag=cf1\r\n", 10);
    if ((h = header(line, end, "Call-ID:", &len)) == NULL) return 0;
    at = put(out, at, h, len);
    if ((h = header(line, end, "CSeq:", &len)) == NULL) return 0;
    at = put(out, at, h, len);
    at = put(out, at, "Content-Length: 0\r\n\r\n", 21);
    return at < 0 ? 0 : at;
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[2], "block") != 0 && strcmp(argv[2], "epoll") != 0)) {
        fprintf(stderr, "usage: %s PORT block|epoll\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]), blocking = strcmp(argv[2], "block") == 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;          /* no SA_RESTART: a blocked receive returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int fd = socket(AF_INET, SOCK_DGRAM | (blocking ? 0 : SOCK_NONBLOCK), 0);
    int size = 4 << 20;                 /* as Kamailio's maxbuffer and serve's socket buffers */
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("cresponder: bind");
        return 1;
    }
    for (int i = 0; i < BATCH; i++) {
        in_iov[i].iov_base = in_buf[i];
        in_iov[i].iov_len = IN_SIZE;
        in_msgs[i].msg_hdr.msg_iov = &in_iov[i];
        in_msgs[i].msg_hdr.msg_iovlen = 1;
        in_msgs[i].msg_hdr.msg_name = &peers[i];
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        perror("cresponder: epoll");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    while (!stopping) {
        if (!blocking) {
            struct epoll_event ready;
            if (epoll_wait(ep, &ready, 1, 1000) <= 0) continue;
        }
        for (;;) {
            for (int i = 0; i < BATCH; i++) in_msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
            int got = recvmmsg(fd, in_msgs, BATCH, blocking ? MSG_WAITFORONE : 0, NULL);
            if (got <= 0) break;        /* EAGAIN (epoll), EINTR (a signal) */
            int n = 0;
            for (int i = 0; i < got; i++) {
                int len = answer(in_buf[i], (int)in_msgs[i].msg_len, out_buf[n]);
                if (len == 0) continue;
                out_iov[n].iov_base = out_buf[n];
                out_iov[n].iov_len = (size_t)len;
                out_msgs[n].msg_hdr.msg_iov = &out_iov[n];
                out_msgs[n].msg_hdr.msg_iovlen = 1;
                out_msgs[n].msg_hdr.msg_name = &peers[i];
                out_msgs[n].msg_hdr.msg_namelen = in_msgs[i].msg_hdr.msg_namelen;
                n++;
            }
            if (n > 0 && sendmmsg(fd, out_msgs, (unsigned)n, 0) < 0 && errno != EAGAIN)
                perror("cresponder: sendmmsg");
            if (blocking) break;        /* back to the blocking receive */
        }
    }
    return 0;
}
