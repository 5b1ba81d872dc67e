/*
 * tplog: the hot path of tinyraftplus's durable log (framing, CRC32C, batched durable
 * writes, the recovery scan, verified range reads). No Python objects in here: every
 * function takes plain buffers and returns 0 or a negative errno-style code, and the
 * Python layer (tinyraftplus/log/) turns codes into exceptions naming file and offset.
 *
 * ON-DISK FORMAT (version 2; all integers little-endian; version 1 is still read)
 *
 * A log is a directory holding segment files named by the seq of their first record,
 * zero-padded to 20 digits so that `ls` sorts them: "00000000000000000000.seg".
 *
 * Segment header, TP_SEG_HDR (48) bytes at offset 0:
 *     0  8  magic "TPLOGSEG"
 *     8  u32 format version (2; 1 for segments written before write rounds were framed)
 *    12  u32 header length (48)
 *    16  u64 first seq of this segment (equals the file name)
 *    24  u64 term of the record just before first seq (0 if none), so the term of
 *            first_seq - 1 survives compaction
 *    32  12 bytes reserved, zero
 *    44  u32 CRC32C of bytes 0..44
 *
 * Then records, back to back. Record header, TP_REC_HDR (32) bytes:
 *     0  u32 payload length (<= TP_MAX_PAYLOAD)
 *     4  u32 CRC32C of everything after this field: bytes 8..32 of the header and the
 *            payload (so seq, term and flags are covered, not only the payload)
 *     8  u64 seq (the previous record's seq + 1; the first is the segment's first seq)
 *    16  u64 term (Raft term; 0 when Raft is not used)
 *    24  u32 flags: bit 0 TP_FLAG_MORE = more records of the same atomic batch follow;
 *            bit 1 TP_FLAG_ROUND = this record starts a write round (version 2);
 *            other bits must be zero
 *    28  u32 with TP_FLAG_ROUND: "durable back", this record's file offset minus the
 *            offset up to which the segment was durable when the round was written
 *            (saturating at 2^32-1 never overstates it: it may only understate the
 *            durable end); 0 with fsync, where every earlier round was fdatasynced
 *            before this one was written. Without TP_FLAG_ROUND: zero.
 * followed by the payload.
 *
 * Atomic batches (append_batch, transactions): every record of a batch but the last
 * carries TP_FLAG_MORE, and a batch never spans two segments. Recovery keeps records up
 * to the last one without TP_FLAG_MORE, so a batch cut short by a crash disappears whole.
 *
 * Write rounds and torn tails (version 2): the writer puts many records into one write
 * round (one pwrite, then fdatasync) and has at most one round in flight. A power loss
 * during a round may persist any subset of its pages (a later page but not an earlier
 * one: XFS, ext4 data=writeback, preallocated files). Recovery finds the first invalid
 * record at offset X; if a later valid record starts a round whose durable end (its
 * offset minus its durable back) lies beyond X, the damage is in data that was durable
 * before: mid-log corruption (TP_SCAN_CORRUPT). Otherwise everything from X on belongs to
 * the round that was in flight, and the tail is torn (TP_SCAN_TORN): cut back to X. In
 * version 1 segments any valid record after X makes the damage mid-log.
 *
 * Preallocated tail: the writer grows the tail segment's file ahead of its records (a
 * sparse ftruncate), so the tail may end in zero bytes after its last record. A reader
 * stops at the first record header of zeros; recovery takes zeros alone after the last
 * record for the end of the log (the scan reports TP_SCAN_TORN there; the Python layer
 * checks that only zeros follow and neither cuts nor warns). Sealed segments end at their
 * last record.
 *
 * CRC32C is the Castagnoli polynomial (reflected 0x82F63B78), initial value and final
 * xor 0xFFFFFFFF, i.e. the same as iSCSI, ext4 and the Python `crc32c` package.
 */
#ifndef TPLOG_H
#define TPLOG_H

#include <stddef.h>
#include <stdint.h>

#define TP_SEG_HDR 48
#define TP_REC_HDR 32
#define TP_FLAG_MORE 1u
#define TP_FLAG_ROUND 2u
#define TP_FORMAT_VERSION 2
#define TP_MAX_PAYLOAD (1u << 30)

/* Error codes beyond errno (negative, like -errno). */
#define TP_EBADLEN (-1001)  /* length field out of range or past the end */
#define TP_ECRC (-1002)     /* CRC mismatch */
#define TP_ESEQ (-1003)     /* seq is not the expected one */
#define TP_EFLAGS (-1004)   /* unknown flag or reserved bits set */
#define TP_ESHORT (-1005)   /* the range ends inside a record */
#define TP_EHDR (-1006)     /* segment header damaged */

/* Scan outcomes */
#define TP_SCAN_CLEAN 0   /* ended exactly at the end of the file */
#define TP_SCAN_TORN 1    /* invalid bytes at the tail; nothing after them was durable */
#define TP_SCAN_CORRUPT 2 /* invalid record in data that was durable: damage mid-log */

/* Failed operation reported by tp_write / the flusher. */
#define TP_OP_WRITE 1
#define TP_OP_SYNC 2
#define TP_OP_TRUNC 3 /* cutting a failed write back (ftruncate + fdatasync) failed */

/* CRC32C. `crc` is the value returned by a previous call (0 to start). */
uint32_t tp_crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t tp_crc32c_sw(uint32_t crc, const void *buf, size_t len);
uint32_t tp_crc32c_hw(uint32_t crc, const void *buf, size_t len); /* needs hw_available */
int tp_crc32c_hw_available(void);

/* Segment header. */
void tp_seg_header_encode(uint8_t *out, uint64_t first_seq, uint64_t prev_term);
int tp_seg_header_decode(const uint8_t *in, size_t len, uint64_t *first_seq,
                         uint64_t *prev_term);

/* Frame n records in place. `base` holds, back to back, for each record TP_REC_HDR bytes
 * of room followed by its payload of lens[i] bytes; this fills in the headers. Seqs run
 * from `seq`; terms are terms[i] if `terms` is not NULL, else `term`. If `atomic`, all
 * records but the last get TP_FLAG_MORE; record 0 also gets `first_flags` (and `back`).
 * offs_out[i] = file_off + offset of record i.
 * Returns the number of bytes framed. */
/* Frame one record whose TP_REC_HDR bytes of room start at base + pos. `back` is stored
 * only with TP_FLAG_ROUND in `flags` (see the format above). */
void tp_frame_one(uint8_t *base, size_t pos, uint32_t len, uint64_t seq, uint64_t term,
                  uint32_t flags, uint32_t back);
/* Write the TP_REC_HDR-byte header for `payload` into `hdr` (the payload stays where
 * it is: the caller appends both to its buffer, saving a pass over a growing buffer). */
void tp_frame_hdr(uint8_t *hdr, const char *payload, uint32_t len, uint64_t seq,
                  uint64_t term, uint32_t flags, uint32_t back);
size_t tp_frame_batch(uint8_t *base, const uint32_t *lens, size_t n, uint64_t seq,
                      uint64_t term, const uint64_t *terms, int atomic, uint64_t file_off,
                      uint64_t *offs_out, uint32_t first_flags, uint32_t back);

/* Where the term changes in terms[0..n): writes to out the indexes i with terms[i] !=
 * terms[i - 1] (for i == 0: != prev, or always if !has_prev) and returns how many. Lets a
 * batch of a million records with a handful of terms note its term runs without a Python
 * loop over the records. */
size_t tp_term_changes(const uint64_t *terms, size_t n, uint64_t prev, int has_prev,
                       uint64_t *out);

/* pwrite `len` bytes at `off` (looping over short writes), then fdatasync if `sync`.
 * On a write failure the file is truncated back to `off` and that cut is fdatasynced;
 * returns -errno of the write with *failed_op = TP_OP_WRITE. If the cut fails, returns
 * -errno of the cut with *failed_op = TP_OP_TRUNC (the file may hold part of the batch:
 * the caller must fail the log). A failed fdatasync: *failed_op = TP_OP_SYNC, and the
 * file is cut back to `off` (best effort) so that the page cache cannot keep bytes the
 * disk never got (the caller's earlier writes were all fdatasynced). */
int tp_write(int fd, const void *buf, size_t len, uint64_t off, int sync, int *failed_op);

/* A C flusher thread: runs tp_write jobs one at a time and signals completion through an
 * eventfd that the Trio thread waits on. */
typedef struct tp_flusher tp_flusher;
int tp_flusher_start(tp_flusher **out, int *efd_out, long spin_ns);
int tp_flusher_submit(tp_flusher *f, int fd, const void *buf, size_t len, uint64_t off,
                      int sync);
/* Before waiting on the eventfd: ask for it to be signalled. Returns 1 if the job is done
 * already (then do not wait), 0 if the eventfd will be signalled when it is. The thread
 * writes the eventfd only for a caller that asked: one that polled `done` and saw it set
 * saves a write and a read per job. */
int tp_flusher_park(tp_flusher *f);
/* After the eventfd became readable (or `done` was seen set): the job's result (0 /
 * -errno), or -EAGAIN. */
int tp_flusher_collect(tp_flusher *f, int *failed_op);
volatile int *tp_flusher_done_ptr(tp_flusher *f);
void tp_flusher_stop(tp_flusher *f);

/* Recovery scan of one segment from `start_off` (normally TP_SEG_HDR) whose first record
 * must have seq `first_seq`. Memory for the arrays is owned by the struct: release it
 * with tp_scan_release. */
typedef struct tp_scan {
    uint64_t *offs;     /* offsets of valid records (only if want_offs) */
    size_t n;           /* valid records */
    uint64_t *run_seq;  /* term runs among the valid records: start seq ... */
    uint64_t *run_term; /* ... and term */
    size_t nruns;
    size_t n_commit;     /* records up to the end of the last complete batch */
    uint64_t commit_end; /* file offset just after those */
    uint64_t end;        /* file offset after the last valid record */
    uint64_t file_size;
    uint64_t bad_off;    /* TORN / CORRUPT: where the first invalid record starts */
    uint64_t resync_off; /* offset of a valid record after the damage (CORRUPT: one that
                          * proves the damage mid-log; TORN: UINT64_MAX if none) */
    int status;          /* TP_SCAN_* */
    int reason;          /* TP_E* for the first invalid record */
    size_t cap, runcap;  /* private */
} tp_scan;
int tp_scan_segment(int fd, uint64_t start_off, uint64_t first_seq, int want_offs,
                    tp_scan *out);
void tp_scan_release(tp_scan *s);

/* Verify and parse the whole records in buf[0..len) (as read from file offset file_off),
 * the first of which must have seq `first_seq`. Writes per record the payload's start and
 * end (relative to buf) and term; stops after max_n records or at the end of the buffer. A
 * record that does not fit in the buffer is an error (TP_EBADLEN / TP_ESHORT): callers read
 * exactly the bytes their index gives for max_n records. Returns the number of records
 * parsed, or a negative TP_E* code with *bad_off set to the file offset of the bad record. */
long tp_parse(const uint8_t *buf, size_t len, uint64_t file_off, uint64_t first_seq,
              size_t max_n, uint64_t *starts, uint64_t *ends, uint64_t *terms,
              uint64_t *bad_off);

/* TEST ONLY: make the next write (op TP_OP_WRITE), fdatasync (TP_OP_SYNC) or cut-back
 * after a failed write (TP_OP_TRUNC) after `after_n` successful ones fail with `err`
 * (once). Each op has its own slot; err == 0 disarms that op, op == 0 disarms all. */
void tp_inject_fault(int op, int err, int after_n);

/* TEST ONLY: record every pwrite, ftruncate and fdatasync that tp_write does (and the
 * cut-back after a failed write) as events appended to `fd` (open it O_APPEND), for the
 * crash-state enumeration (tests/crashsim.py). Event: TP_REC_EVENT bytes, all
 * little-endian: u32 op (TP_EV_*), u32 name length (0 here; the Python side writes
 * events with a path), u64 inode, u64 offset, u64 length (of the write, or the new size
 * for TP_EV_TRUNC), u64 data length; then the name, then the data (a write's bytes).
 * Off (the default), recording costs one predictable branch per syscall. */
#define TP_REC_EVENT 40
#define TP_EV_WRITE 1
#define TP_EV_TRUNC 2
#define TP_EV_SYNC 3
void tp_record_start(int fd);
void tp_record_stop(void);

/* TEST ONLY: put fixed bugs back, to show that the crash-state enumeration finds them.
 * 0 (the default) in normal use; read only on failure and recovery paths. */
#define TP_BUG_CUT_NO_SYNC 1     /* the cut after a failed write is not fdatasynced */
#define TP_BUG_CUT_HIDDEN 2      /* a failed cut is reported as the write's ENOSPC */
#define TP_BUG_SCAN_ANY_RESYNC 4 /* any valid record after damage means mid-log */
void tp_test_bugs(int mask);

#endif
