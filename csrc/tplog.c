/* tplog.c: see tplog.h for the file format and the contract of each function. */
#define _GNU_SOURCE
#include "tplog.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <nmmintrin.h>
#define TP_X86 1
#endif

/* ---------------------------------------------------------------- little endian ---- */

static inline uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}
static inline uint64_t rd64(const uint8_t *p) {
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}
static inline void wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}
static inline void wr64(uint8_t *p, uint64_t v) {
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

/* ---------------------------------------------------------------------- CRC32C ---- */

/* Slicing-by-8 tables for the software path: 8 bytes per step instead of 1 makes the
 * fallback fast enough (~2 GB/s) that a CPU without SSE4.2 still keeps up with a disk. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;
static int crc_hw = -1;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#ifdef TP_X86
    __builtin_cpu_init();
    crc_hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
#else
    crc_hw = 0;
#endif
}

uint32_t tp_crc32c_sw(uint32_t crc, const void *buf, size_t len) {
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = buf;
    uint32_t c = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
        len--;
    }
    while (len >= 8) {
        uint32_t lo = c ^ rd32(p), hi = rd32(p + 4);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^
            crc_table[5][(lo >> 16) & 0xff] ^ crc_table[4][lo >> 24] ^
            crc_table[3][hi & 0xff] ^ crc_table[2][(hi >> 8) & 0xff] ^
            crc_table[1][(hi >> 16) & 0xff] ^ crc_table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len--) c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    return ~c;
}

#ifdef TP_X86
__attribute__((target("sse4.2"))) static uint32_t crc_hw_impl(uint32_t crc, const void *buf,
                                                                size_t len) {
    const uint8_t *p = buf;
    uint64_t c = ~crc;
    while (len && ((uintptr_t)p & 7)) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
#if defined(__x86_64__)
    while (len >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        len -= 8;
    }
#endif
    while (len--) c = _mm_crc32_u8((uint32_t)c, *p++);
    return ~(uint32_t)c;
}
#endif

int tp_crc32c_hw_available(void) {
    pthread_once(&crc_once, crc_init);
    return crc_hw;
}

uint32_t tp_crc32c_hw(uint32_t crc, const void *buf, size_t len) {
#ifdef TP_X86
    if (tp_crc32c_hw_available()) return crc_hw_impl(crc, buf, len);
#endif
    return tp_crc32c_sw(crc, buf, len);
}

uint32_t tp_crc32c(uint32_t crc, const void *buf, size_t len) {
#ifdef TP_X86
    if (tp_crc32c_hw_available()) return crc_hw_impl(crc, buf, len);
#endif
    return tp_crc32c_sw(crc, buf, len);
}

/* -------------------------------------------------------------- segment header ---- */

static const uint8_t SEG_MAGIC[8] = {'T', 'P', 'L', 'O', 'G', 'S', 'E', 'G'};

void tp_seg_header_encode(uint8_t *out, uint64_t first_seq, uint64_t prev_term) {
    memset(out, 0, TP_SEG_HDR);
    memcpy(out, SEG_MAGIC, 8);
    wr32(out + 8, TP_FORMAT_VERSION);
    wr32(out + 12, TP_SEG_HDR);
    wr64(out + 16, first_seq);
    wr64(out + 24, prev_term);
    wr32(out + 44, tp_crc32c(0, out, 44));
}

int tp_seg_header_decode(const uint8_t *in, size_t len, uint64_t *first_seq,
                         uint64_t *prev_term) {
    if (len < TP_SEG_HDR) return TP_ESHORT;
    if (memcmp(in, SEG_MAGIC, 8) != 0) return TP_EHDR;
    if (rd32(in + 44) != tp_crc32c(0, in, 44)) return TP_ECRC;
    uint32_t ver = rd32(in + 8);
    if ((ver != 1 && ver != TP_FORMAT_VERSION) || rd32(in + 12) != TP_SEG_HDR) return TP_EHDR;
    *first_seq = rd64(in + 16);
    *prev_term = rd64(in + 24);
    return 0;
}

/* --------------------------------------------------------------------- framing ---- */

static inline void frame_one(uint8_t *h, uint32_t len, uint64_t seq, uint64_t term,
                             uint32_t flags, uint32_t back) {
    wr32(h, len);
    wr64(h + 8, seq);
    wr64(h + 16, term);
    wr32(h + 24, flags);
    wr32(h + 28, (flags & TP_FLAG_ROUND) ? back : 0);
    wr32(h + 4, tp_crc32c(0, h + 8, (size_t)TP_REC_HDR - 8 + len));
}

void tp_frame_one(uint8_t *base, size_t pos, uint32_t len, uint64_t seq, uint64_t term,
                  uint32_t flags, uint32_t back) {
    frame_one(base + pos, len, seq, term, flags, back);
}

void tp_frame_hdr(uint8_t *hdr, const char *payload, uint32_t len, uint64_t seq,
                  uint64_t term, uint32_t flags, uint32_t back) {
    wr32(hdr, len);
    wr64(hdr + 8, seq);
    wr64(hdr + 16, term);
    wr32(hdr + 24, flags);
    wr32(hdr + 28, (flags & TP_FLAG_ROUND) ? back : 0);
    wr32(hdr + 4, tp_crc32c(tp_crc32c(0, hdr + 8, TP_REC_HDR - 8), payload, len));
}

size_t tp_frame_batch(uint8_t *base, const uint32_t *lens, size_t n, uint64_t seq,
                      uint64_t term, const uint64_t *terms, int atomic, uint64_t file_off,
                      uint64_t *offs_out, uint32_t first_flags, uint32_t back) {
    size_t pos = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t flags = (atomic && i + 1 < n) ? TP_FLAG_MORE : 0;
        if (i == 0) flags |= first_flags;
        frame_one(base + pos, lens[i], seq + i, terms ? terms[i] : term, flags, back);
        if (offs_out) offs_out[i] = file_off + pos;
        pos += TP_REC_HDR + (size_t)lens[i];
    }
    return pos;
}

size_t tp_term_changes(const uint64_t *terms, size_t n, uint64_t prev, int has_prev,
                       uint64_t *out) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 ? (!has_prev || terms[0] != prev) : terms[i] != terms[i - 1]) out[k++] = i;
    }
    return k;
}

/* ---------------------------------------------------------- fault injection ---- */

/* Test hook: armed with tp_inject_fault, one slot per operation so that a write fault
 * and a truncate fault can be armed together; costs one relaxed atomic load per call. */
#define TP_NOPS 4
static _Atomic int fault_armed = 0; /* bit op: slot op is armed */
static _Atomic int fault_err[TP_NOPS], fault_after[TP_NOPS];

void tp_inject_fault(int op, int err, int after_n) {
    if (op <= 0 || op >= TP_NOPS) { /* disarm everything */
        atomic_store(&fault_armed, 0);
        return;
    }
    atomic_fetch_and(&fault_armed, ~(1 << op));
    if (!err) return;
    atomic_store(&fault_err[op], err);
    atomic_store(&fault_after[op], after_n);
    atomic_fetch_or(&fault_armed, 1 << op);
}

static int fault_hit(int op) {
    if (!(atomic_load_explicit(&fault_armed, memory_order_relaxed) & (1 << op))) return 0;
    if (atomic_fetch_sub(&fault_after[op], 1) > 0) return 0;
    int err = atomic_load(&fault_err[op]);
    atomic_fetch_and(&fault_armed, ~(1 << op));
    return err;
}

/* ------------------------------------------------------- recording (test only) ---- */

/* When rec_fd >= 0 every pwrite, ftruncate and fdatasync done here is appended to it as
 * one event (see tp_record_start in tplog.h). Off, it costs one predictable branch per
 * syscall. */
static int rec_fd = -1;
static _Atomic int test_bugs = 0;

void tp_record_start(int fd) { rec_fd = fd; }
void tp_record_stop(void) { rec_fd = -1; }
void tp_test_bugs(int mask) { atomic_store(&test_bugs, mask); }

static void rec_event(int op, int fd, uint64_t off, uint64_t len, const void *data) {
    struct stat st;
    uint8_t h[TP_REC_EVENT];
    if (fstat(fd, &st) != 0) return;
    memset(h, 0, sizeof h);
    wr32(h, (uint32_t)op);
    wr64(h + 8, (uint64_t)st.st_ino);
    wr64(h + 16, off);
    wr64(h + 24, len);
    wr64(h + 32, data ? len : 0);
    struct iovec iov[2] = {{h, sizeof h}, {(void *)data, data ? (size_t)len : 0}};
    ssize_t r = writev(rec_fd, iov, data ? 2 : 1);
    (void)r;
}
#define REC(op, fd, off, len, data) \
    do { \
        if (__builtin_expect(rec_fd >= 0, 0)) rec_event(op, fd, off, len, data); \
    } while (0)

/* ----------------------------------------------------------------- durable write ---- */

/* After a failed write: cut the file back to `off` and make the cut durable, so that
 * neither the process nor a crash can see the partial batch. 0 on success, else the errno
 * of the step that failed (then the caller must fail the log for good: the partial batch
 * may hold whole, valid records that a reopen would take for appends that succeeded). */
static int cut_back(int fd, uint64_t off) {
    int inj = fault_hit(TP_OP_TRUNC);
    if (inj) return inj;
    while (ftruncate(fd, (off_t)off) != 0) {
        if (errno != EINTR) return errno;
    }
    REC(TP_EV_TRUNC, fd, off, 0, NULL);
    if (atomic_load(&test_bugs) & TP_BUG_CUT_NO_SYNC) return 0;
    while (fdatasync(fd) != 0) {
        if (errno != EINTR) return errno;
    }
    REC(TP_EV_SYNC, fd, 0, 0, NULL);
    return 0;
}

int tp_write(int fd, const void *buf, size_t len, uint64_t off, int sync, int *failed_op) {
    const uint8_t *p = buf;
    size_t done = 0;
    *failed_op = 0;
    while (done < len) {
        int inj = fault_hit(TP_OP_WRITE);
        ssize_t w;
        if (inj) {
            /* Simulate a disk that fills up halfway through the batch: write part of it,
             * then fail, so the truncate-back path is exercised for real. */
            size_t part = (len - done) / 2;
            if (part) {
                ssize_t r = pwrite(fd, p + done, part, (off_t)(off + done));
                if (r > 0) REC(TP_EV_WRITE, fd, off + done, (uint64_t)r, p + done);
            }
            errno = inj;
            w = -1;
        } else {
            w = pwrite(fd, p + done, len - done, (off_t)(off + done));
        }
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            int err = w < 0 ? errno : ENOSPC;
            /* Leave the file as it was before this batch, durably. If that fails, report
             * the cut's failure (TP_OP_TRUNC), never the write's errno: ENOSPC would tell
             * the caller "nothing was written" while a partial batch is in the file. */
            int cerr = cut_back(fd, off);
            if (cerr && (atomic_load(&test_bugs) & TP_BUG_CUT_HIDDEN)) cerr = 0;
            if (cerr) {
                *failed_op = TP_OP_TRUNC;
                return -cerr;
            }
            *failed_op = TP_OP_WRITE;
            return -err;
        }
        REC(TP_EV_WRITE, fd, off + done, (uint64_t)w, p + done);
        done += (size_t)w;
    }
    if (sync) {
        int err = fault_hit(TP_OP_SYNC);
        while (!err && fdatasync(fd) != 0) {
            if (errno != EINTR) err = errno;
        }
        if (!err) REC(TP_EV_SYNC, fd, 0, 0, NULL);
        if (err) {
            /* fsyncgate: after a failed fdatasync the kernel may have dropped dirty pages
             * and marked them clean, so the page cache can show bytes the disk never got,
             * and a reopen would read them as records. Every earlier round was durable, so
             * cut the file back to this round's start (and sync the cut): a reopen then
             * sees exactly the durable records. The log fails either way. */
            *failed_op = TP_OP_SYNC;
            cut_back(fd, off);
            return -err;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------- flusher thread ---- */

/* One job at a time: the Python side never submits before collecting the previous
 * result. Hand-off in: the job fields under a mutex plus an atomic `ready` flag; after a
 * job the thread spins on that flag for up to `spin_ns` before sleeping on the condition
 * variable, because waking a sleeping thread costs tens of microseconds on a VM, a large
 * share of a ~100 us fdatasync. It spins only while jobs have recently been arriving within
 * that window (`gap_avg`): when they do not (a slow disk makes the Trio side gather big
 * rounds, or the log is idle) spinning only burns a core that a loaded machine needs, and
 * on 2 busy cores it delays the very thread that would submit the next job. Hand-off out:
 * an eventfd the Trio thread waits on, and an atomic `done` word it can poll
 * (tp_flusher_done_ptr) to skip the epoll wake-up. The eventfd is written only when the
 * Trio side asked for it (tp_flusher_park sets `waiting`): a poller that saw `done` saves
 * the write here and the read in collect. `waiting` and `done` are stored and then the
 * other is loaded, both sequentially consistent, so at least one side sees the other's
 * store: either the Trio side finds the job done and does not wait, or the thread finds it
 * waiting and writes the eventfd. No wake-up can be lost. */
struct tp_flusher {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int efd;
    int stop;
    int sleeping;
    _Atomic int ready;
    _Atomic int waiting; /* the Trio side waits on the eventfd (tp_flusher_park) */
    int done; /* read by Python through tp_flusher_done_ptr */
    long spin_ns;
    long gap_avg;  /* moving average of the time from a job's end to the next job */
    long done_at;  /* when the last job ended (0: none yet) */
    int fd, sync;
    const void *buf;
    size_t len;
    uint64_t off;
    int rc, failed_op;
};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *flusher_main(void *arg) {
    tp_flusher *f = arg;
    for (;;) {
        if (!atomic_load_explicit(&f->ready, memory_order_acquire) && f->spin_ns > 0 &&
            f->gap_avg < f->spin_ns) {
            long until = now_ns() + f->spin_ns;
            while (!atomic_load_explicit(&f->ready, memory_order_acquire) && now_ns() < until) {
                /* Yield rather than pause: on an idle machine this returns at once and
                 * costs the same, but when the cores are shared it lets the thread
                 * that will submit the next job run instead of waiting behind us. */
                sched_yield();
            }
        }
        pthread_mutex_lock(&f->mu);
        while (!atomic_load(&f->ready) && !f->stop) {
            f->sleeping = 1;
            pthread_cond_wait(&f->cv, &f->mu);
            f->sleeping = 0;
        }
        if (!atomic_load(&f->ready)) { /* stop requested, nothing pending */
            pthread_mutex_unlock(&f->mu);
            break;
        }
        int fd = f->fd, sync = f->sync;
        const void *buf = f->buf;
        size_t len = f->len;
        uint64_t off = f->off;
        pthread_mutex_unlock(&f->mu);
        if (f->done_at) {
            /* Capped so that one idle pause is forgotten after a few quick jobs. */
            long gap = now_ns() - f->done_at, cap = 4 * f->spin_ns;
            f->gap_avg = (3 * f->gap_avg + (gap < cap ? gap : cap)) / 4;
        }
        int op = 0;
        int rc = tp_write(fd, buf, len, off, sync, &op);
        f->done_at = now_ns();
        pthread_mutex_lock(&f->mu);
        f->rc = rc;
        f->failed_op = op;
        atomic_store(&f->ready, 0);
        __atomic_store_n(&f->done, 1, __ATOMIC_SEQ_CST);
        int wake = atomic_load_explicit(&f->waiting, memory_order_seq_cst);
        pthread_mutex_unlock(&f->mu);
        if (wake) {
            uint64_t one = 1;
            while (write(f->efd, &one, sizeof one) < 0 && errno == EINTR) {
            }
        }
    }
    return NULL;
}

int tp_flusher_start(tp_flusher **out, int *efd_out, long spin_ns) {
    tp_flusher *f = calloc(1, sizeof *f);
    if (!f) return -ENOMEM;
    /* No spinning for a process confined to one CPU (taskset, a 1-CPU container): the
     * thread that submits the next job can only run when this one stops, so a spin only
     * delays it (one measurement: a one-core appender at 0.81 of the raw loop with the
     * spin, 0.99 without; later runs were too noisy to repeat it). Checked once, when
     * the log opens. */
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof cpus, &cpus) == 0 && CPU_COUNT(&cpus) < 2) spin_ns = 0;
    f->spin_ns = spin_ns;
    f->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (f->efd < 0) {
        int err = errno;
        free(f);
        return -err;
    }
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    int rc = pthread_create(&f->thread, NULL, flusher_main, f);
    if (rc != 0) {
        close(f->efd);
        pthread_mutex_destroy(&f->mu);
        pthread_cond_destroy(&f->cv);
        free(f);
        return -rc;
    }
    *out = f;
    *efd_out = f->efd;
    return 0;
}

int tp_flusher_submit(tp_flusher *f, int fd, const void *buf, size_t len, uint64_t off,
                      int sync) {
    pthread_mutex_lock(&f->mu);
    if (atomic_load(&f->ready) || f->stop) {
        pthread_mutex_unlock(&f->mu);
        return -EBUSY;
    }
    f->fd = fd;
    f->buf = buf;
    f->len = len;
    f->off = off;
    f->sync = sync;
    __atomic_store_n(&f->done, 0, __ATOMIC_RELEASE);
    atomic_store_explicit(&f->ready, 1, memory_order_release);
    int sleeping = f->sleeping;
    pthread_mutex_unlock(&f->mu);
    /* Signalled after the unlock: signalled under it, the woken thread would block at
     * once on the mutex we still hold, and our unlock would have to wake it a second
     * time (two futex wakes, each a cross-CPU interrupt on a VM, per hand-off). Safe:
     * `ready` was set under the mutex, so the thread either sees it before it waits or
     * is already waiting for this signal; the condition variable lives until stop. */
    if (sleeping) pthread_cond_signal(&f->cv);
    return 0;
}

int tp_flusher_park(tp_flusher *f) {
    atomic_store_explicit(&f->waiting, 1, memory_order_seq_cst);
    return __atomic_load_n(&f->done, __ATOMIC_SEQ_CST) ? 1 : 0;
}

int tp_flusher_collect(tp_flusher *f, int *failed_op) {
    if (atomic_exchange(&f->waiting, 0)) {
        /* Drain what the thread wrote (nonblocking: it may have seen `done` first). */
        uint64_t v;
        while (read(f->efd, &v, sizeof v) < 0 && errno == EINTR) {
        }
    }
    pthread_mutex_lock(&f->mu);
    int rc = -EAGAIN;
    if (__atomic_load_n(&f->done, __ATOMIC_ACQUIRE)) {
        rc = f->rc;
        *failed_op = f->failed_op;
        __atomic_store_n(&f->done, 0, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&f->mu);
    return rc;
}

volatile int *tp_flusher_done_ptr(tp_flusher *f) { return (volatile int *)&f->done; }

void tp_flusher_stop(tp_flusher *f) {
    if (!f) return;
    pthread_mutex_lock(&f->mu);
    f->stop = 1;
    pthread_cond_signal(&f->cv);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->thread, NULL); /* finishes a job in progress first */
    close(f->efd);
    pthread_mutex_destroy(&f->mu);
    pthread_cond_destroy(&f->cv);
    free(f);
}

/* ------------------------------------------------------------------ record check ---- */

/* Check the record at p (avail bytes from p to the end of the data) against the
 * expected seq. Returns 0 and its total size, or a TP_E* code. */
static int check_record(const uint8_t *p, uint64_t avail, uint64_t expect_seq,
                        uint64_t *size) {
    if (avail < TP_REC_HDR) return TP_ESHORT;
    uint32_t len = rd32(p);
    if (len > TP_MAX_PAYLOAD) return TP_EBADLEN;
    if ((uint64_t)TP_REC_HDR + len > avail) return TP_ESHORT;
    if (rd32(p + 4) != tp_crc32c(0, p + 8, (size_t)TP_REC_HDR - 8 + len)) return TP_ECRC;
    uint32_t flags = rd32(p + 24);
    if ((flags & ~(TP_FLAG_MORE | TP_FLAG_ROUND)) != 0) return TP_EFLAGS;
    if (!(flags & TP_FLAG_ROUND) && rd32(p + 28) != 0) return TP_EFLAGS;
    if (rd64(p + 8) != expect_seq) return TP_ESEQ;
    *size = TP_REC_HDR + (uint64_t)len;
    return 0;
}

/* -------------------------------------------------------------------------- scan ---- */

static int push_u64(uint64_t **arr, size_t *n, size_t *cap, uint64_t v) {
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 1024;
        uint64_t *na = realloc(*arr, nc * sizeof **arr);
        if (!na) return -ENOMEM;
        *arr = na;
        *cap = nc;
    }
    (*arr)[(*n)++] = v;
    return 0;
}

static int push_run(tp_scan *s, uint64_t seq, uint64_t term) {
    if (s->nruns == s->runcap) {
        size_t nc = s->runcap ? s->runcap * 2 : 64;
        uint64_t *a = realloc(s->run_seq, nc * sizeof *a);
        if (!a) return -ENOMEM;
        s->run_seq = a;
        uint64_t *b = realloc(s->run_term, nc * sizeof *b);
        if (!b) return -ENOMEM;
        s->run_term = b;
        s->runcap = nc;
    }
    s->run_seq[s->nruns] = seq;
    s->run_term[s->nruns] = term;
    s->nruns++;
    return 0;
}

void tp_scan_release(tp_scan *s) {
    free(s->offs);
    free(s->run_seq);
    free(s->run_term);
    s->offs = s->run_seq = s->run_term = NULL;
    s->n = s->nruns = s->cap = s->runcap = 0;
}

static int zero_header(const uint8_t *p) {
    return (rd64(p) | rd64(p + 8) | rd64(p + 16) | rd64(p + 24)) == 0;
}

/* Is there a whole valid record anywhere in data[from..size) with a seq at or after
 * expect_seq? Only a record that a writer produced can pass the CRC at a plausible seq.
 * With `after_durable` set, only a record that starts a write round (TP_FLAG_ROUND) and
 * says the segment was durable beyond `bad_off` when it was written counts: proof that
 * the damage at bad_off is in data that had been made durable, i.e. not a torn write. */
static uint64_t find_resync(const uint8_t *data, uint64_t from, uint64_t size,
                            uint64_t expect_seq, int after_durable, uint64_t bad_off) {
    uint64_t max_seq = expect_seq + (size - from) / TP_REC_HDR + 1;
    for (uint64_t p = from; p + TP_REC_HDR <= size; p++) {
        if (zero_header(data + p)) {
            /* A header of zeros never passes (its CRC field, 0, is not the CRC32C of 24
             * zero bytes), and neither does any header that lies wholly inside a run of
             * zeros: jump to the first one that holds the run's first nonzero byte. On a
             * preallocated tail of a log at seq 0 (no seq to rule offsets out) this is
             * one pass over the zeros instead of a CRC at every offset (48-83 ms for 4 MiB). */
            uint64_t nz = p + TP_REC_HDR;
            while (nz + 8 <= size && rd64(data + nz) == 0) nz += 8;
            while (nz < size && data[nz] == 0) nz++;
            if (nz >= size) break;
            p = nz - TP_REC_HDR; /* the loop's p++ makes it the first header holding nz */
            continue;
        }
        uint64_t seq = rd64(data + p + 8);
        if (seq < expect_seq || seq > max_seq) continue;
        if (after_durable) {
            if (!(rd32(data + p + 24) & TP_FLAG_ROUND)) continue;
            if (p - rd32(data + p + 28) <= bad_off) continue;
        }
        uint64_t sz;
        if (check_record(data + p, size - p, seq, &sz) == 0) return p;
    }
    return UINT64_MAX;
}

int tp_scan_segment(int fd, uint64_t start_off, uint64_t first_seq, int want_offs,
                    tp_scan *s) {
    memset(s, 0, sizeof *s);
    s->status = TP_SCAN_CLEAN;
    s->resync_off = UINT64_MAX;
    struct stat st;
    if (fstat(fd, &st) != 0) return -errno;
    uint64_t size = (uint64_t)st.st_size;
    s->file_size = size;
    s->end = s->commit_end = start_off;
    if (size <= start_off) return 0;
    /* mmap rather than read: the scan touches every byte once, and mapping the page
     * cache avoids holding a private copy of a 64 MiB segment. */
    uint8_t *data = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (data == MAP_FAILED) return -errno;
    madvise(data, size, MADV_SEQUENTIAL);
    uint32_t version = size >= TP_SEG_HDR ? rd32(data + 8) : TP_FORMAT_VERSION;
    uint64_t off = start_off, seq = first_seq;
    int rc = 0;
    uint64_t last_term = 0;
    while (off < size) {
        uint64_t sz;
        int r = check_record(data + off, size - off, seq, &sz);
        if (r != 0) {
            s->reason = r;
            s->bad_off = off;
            /* Torn tail or damage mid-log? Format 2 frames every write round's first
             * record with TP_FLAG_ROUND and how far back the segment was durable when
             * the round was written; only one round is ever in flight. Valid records
             * after the damage prove it mid-log only if one of them starts a round that
             * was written after the damaged bytes had been made durable. Otherwise they
             * belong to the round a crash interrupted (a later page of it reached the
             * disk, an earlier one did not) and the tail is torn. Format 1 segments
             * carry no rounds: any valid record after the damage makes it mid-log. */
            uint64_t rs = find_resync(data, off + 1, size, seq, 0, off);
            s->resync_off = rs;
            if (rs != UINT64_MAX && version >= 2 &&
                !(atomic_load(&test_bugs) & TP_BUG_SCAN_ANY_RESYNC))
                rs = find_resync(data, off + 1, size, seq, 1, off);
            if (rs != UINT64_MAX) {
                s->status = TP_SCAN_CORRUPT;
                s->resync_off = rs;
            } else {
                s->status = TP_SCAN_TORN;
            }
            break;
        }
        uint64_t term = rd64(data + off + 16);
        if (s->n == 0 || term != last_term) {
            if ((rc = push_run(s, seq, term)) != 0) break;
            last_term = term;
        }
        if (want_offs && (rc = push_u64(&s->offs, &s->n, &s->cap, off)) != 0) break;
        if (!want_offs) s->n++;
        off += sz;
        seq++;
        if ((rd32(data + off - sz + 24) & TP_FLAG_MORE) == 0) {
            s->n_commit = s->n;
            s->commit_end = off;
        }
    }
    s->end = off;
    munmap(data, size);
    if (rc != 0) {
        tp_scan_release(s);
        return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------------- parse ---- */

long tp_parse(const uint8_t *buf, size_t len, uint64_t file_off, uint64_t first_seq,
              size_t max_n, uint64_t *starts, uint64_t *ends, uint64_t *terms,
              uint64_t *bad_off) {
    size_t pos = 0, n = 0;
    while (n < max_n && pos < len) {
        uint64_t sz;
        int r = check_record(buf + pos, len - pos, first_seq + n, &sz);
        if (r == TP_ESHORT) {
            /* The caller reads exactly the bytes its index says max_n records occupy, so
             * a record running past the end is damage at this record (most often a
             * flipped length field), not a short read to retry. */
            *bad_off = file_off + pos;
            return len - pos >= TP_REC_HDR ? TP_EBADLEN : TP_ESHORT;
        }
        if (r != 0) {
            *bad_off = file_off + pos;
            return r;
        }
        starts[n] = pos + TP_REC_HDR;
        ends[n] = pos + sz;
        terms[n] = rd64(buf + pos + 16);
        pos += sz;
        n++;
    }
    return (long)n;
}
