"""cffi build script for ``tinyraftplus._tplog`` (API / out-of-line mode).

``setup.py`` points ``cffi_modules`` here, so ``pip install .`` compiles the extension. The
``cdef`` below is a copy of the public part of ``tplog.h`` (see that header for the file
format and each function's contract); cffi checks it against the header at compile time.

Environment:
* ``TINYRAFTPLUS_SANITIZE=address`` (or ``undefined``, or ``address,undefined``) builds with
  the sanitizers. Python must then run with the sanitizer runtime preloaded, e.g.
  ``LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=1 python ...``.
* ``TINYRAFTPLUS_DEBUG=1`` builds with ``-O0 -g``.
"""

from __future__ import annotations

import os

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

CDEF = """
#define TP_SEG_HDR 48
#define TP_REC_HDR 32
#define TP_FLAG_MORE 1
#define TP_FLAG_ROUND 2
#define TP_FORMAT_VERSION 2
#define TP_MAX_PAYLOAD ...
#define TP_EBADLEN -1001
#define TP_ECRC -1002
#define TP_ESEQ -1003
#define TP_EFLAGS -1004
#define TP_ESHORT -1005
#define TP_EHDR -1006
#define TP_SCAN_CLEAN 0
#define TP_SCAN_TORN 1
#define TP_SCAN_CORRUPT 2
#define TP_OP_WRITE 1
#define TP_OP_SYNC 2
#define TP_OP_TRUNC 3

uint32_t tp_crc32c(uint32_t crc, const void *buf, size_t len);
uint32_t tp_crc32c_sw(uint32_t crc, const void *buf, size_t len);
uint32_t tp_crc32c_hw(uint32_t crc, const void *buf, size_t len);
int tp_crc32c_hw_available(void);

void tp_seg_header_encode(uint8_t *out, uint64_t first_seq, uint64_t prev_term);
int tp_seg_header_decode(const uint8_t *in, size_t len, uint64_t *first_seq,
                         uint64_t *prev_term);

void tp_frame_one(uint8_t *base, size_t pos, uint32_t len, uint64_t seq, uint64_t term,
                  uint32_t flags, uint32_t back);
void tp_frame_hdr(uint8_t *hdr, const char *payload, uint32_t len, uint64_t seq,
                  uint64_t term, uint32_t flags, uint32_t back);
size_t tp_frame_batch(uint8_t *base, const uint32_t *lens, size_t n, uint64_t seq,
                      uint64_t term, const uint64_t *terms, int atomic, uint64_t file_off,
                      uint64_t *offs_out, uint32_t first_flags, uint32_t back);

size_t tp_term_changes(const uint64_t *terms, size_t n, uint64_t prev, int has_prev,
                       uint64_t *out);

int tp_write(int fd, const void *buf, size_t len, uint64_t off, int sync, int *failed_op);

typedef struct tp_flusher tp_flusher;
int tp_flusher_start(tp_flusher **out, int *efd_out, long spin_ns);
int tp_flusher_submit(tp_flusher *f, int fd, const void *buf, size_t len, uint64_t off,
                      int sync);
int tp_flusher_park(tp_flusher *f);
int tp_flusher_collect(tp_flusher *f, int *failed_op);
volatile int *tp_flusher_done_ptr(tp_flusher *f);
void tp_flusher_stop(tp_flusher *f);

typedef struct tp_scan {
    uint64_t *offs;
    size_t n;
    uint64_t *run_seq;
    uint64_t *run_term;
    size_t nruns;
    size_t n_commit;
    uint64_t commit_end;
    uint64_t end;
    uint64_t file_size;
    uint64_t bad_off;
    uint64_t resync_off;
    int status;
    int reason;
    ...;
} tp_scan;
int tp_scan_segment(int fd, uint64_t start_off, uint64_t first_seq, int want_offs,
                    tp_scan *out);
void tp_scan_release(tp_scan *s);

long tp_parse(const uint8_t *buf, size_t len, uint64_t file_off, uint64_t first_seq,
              size_t max_n, uint64_t *starts, uint64_t *ends, uint64_t *terms,
              uint64_t *bad_off);

void tp_inject_fault(int op, int err, int after_n);

#define TP_REC_EVENT 40
#define TP_EV_WRITE 1
#define TP_EV_TRUNC 2
#define TP_EV_SYNC 3
void tp_record_start(int fd);
void tp_record_stop(void);
#define TP_BUG_CUT_NO_SYNC 1
#define TP_BUG_CUT_HIDDEN 2
#define TP_BUG_SCAN_ANY_RESYNC 4
void tp_test_bugs(int mask);
"""


def _flags() -> tuple[list[str], list[str]]:
    compile_args = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-std=gnu11"]
    link_args: list[str] = ["-pthread"]
    if os.environ.get("TINYRAFTPLUS_DEBUG"):
        compile_args = ["-O0", "-g"] + compile_args[1:]
    sanitize = os.environ.get("TINYRAFTPLUS_SANITIZE", "").strip()
    if sanitize:
        compile_args += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
        link_args += [f"-fsanitize={sanitize}"]
    return compile_args, link_args


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
_compile_args, _link_args = _flags()
ffibuilder.set_source(
    "tinyraftplus._tplog",
    '#include "tplog.h"',
    # setuptools wants sources relative to setup.py's directory (the project root).
    sources=[os.path.relpath(os.path.join(_HERE, "tplog.c"))],
    include_dirs=[_HERE],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
