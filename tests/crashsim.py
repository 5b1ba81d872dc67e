"""Crash-state enumeration for ``FsLog``, in the style of ALICE (OSDI'14) and CrashMonkey
(OSDI'18).

A SIGKILL keeps the page cache, so it never shows what a power loss leaves. Here a
workload runs with the log's TEST-ONLY recording mode on (``tinyraftplus.log.fileops``
and ``tp_record_start`` in the C core): every write, ``ftruncate``, ``rename``,
``unlink``, ``fsync``/``fdatasync`` and directory ``fsync`` lands in one trace, in order,
with its file and range and the bytes written, beside marks from the workload driver
(what it tried, what was acknowledged, what failed). ``Model`` replays the trace and, at
every point of it, builds the states a crash there may leave on disk:

* what a file had when it was last ``fdatasync``ed / ``fsync``ed is kept;
* of each file's operations since, any subset of the writes, cut at 4 KiB pages (a later
  page may persist without an earlier one: XFS, ext4 ``data=writeback``, preallocated
  files), each ``ftruncate`` applied or not, in order; a page may also be torn at 512-byte
  sectors (a prefix or a suffix of it persisted);
* directory operations (create, unlink, rename) since the last directory ``fsync``
  persist as a prefix, in order (journaled metadata: ext4, XFS), independently of the
  files' data.

All subsets are taken where a file has few pending pieces, a sample (prefixes, all but
one, only one, random) where it has more. ``check_state`` opens each distinct state with a
fresh ``FsLog`` and checks what the log promises after a crash: open succeeds; every
acknowledged record is present and intact at its seq (unless a truncate or compact since
removed it); nothing appears that was never appended, that failed with ``LogFullError``
("the log is unchanged") or that a finished truncate removed; no part of a batch or
transaction without the rest; seqs contiguous; and a new append continues the log.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import shutil
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tinyraftplus import FsLog
from tinyraftplus.log import LogRecoveryWarning, fileops

PAGE = 4096
SECTOR = 512


@dataclass
class Event:
    op: int
    name: str
    ino: int
    off: int
    length: int
    data: bytes


def read_trace(path: str) -> list[Event]:
    raw = open(path, "rb").read()
    out, pos = [], 0
    while pos < len(raw):
        op, nlen, ino, off, length, dlen = fileops.EVENT.unpack_from(raw, pos)
        pos += fileops.EVENT.size
        name = raw[pos : pos + nlen].decode()
        pos += nlen
        out.append(Event(op, name, ino, off, length, raw[pos : pos + dlen]))
        pos += dlen
    return out


@dataclass
class Inode:
    durable: bytes = b""
    cur: bytearray = field(default_factory=bytearray)
    pending: list[tuple[Any, ...]] = field(default_factory=list)  # ("w", off, data) / ("t", size)


def _apply(base: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    b = bytearray(base)
    for op in ops:
        if op[0] == "w":
            _, off, data = op
            if off > len(b):
                b.extend(bytes(off - len(b)))
            b[off : off + len(data)] = data
        else:
            size = op[1]
            if size < len(b):
                del b[size:]
            else:
                b.extend(bytes(size - len(b)))
    return bytes(b)


def _pieces(pending: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Writes cut at 4 KiB page boundaries (of the file), truncates whole."""
    out: list[tuple[Any, ...]] = []
    for op in pending:
        if op[0] != "w":
            out.append(op)
            continue
        _, off, data = op
        pos = 0
        while pos < len(data):
            end = min(len(data), (off + pos) // PAGE * PAGE + PAGE - off)
            out.append(("w", off + pos, data[pos:end]))
            pos = end
    return out


@dataclass
class Budget:
    """How far to go: all subsets up to ``full`` pending pieces per file, else
    ``sample`` random subsets beside the structured ones; ``tears`` torn variants per
    subset; at most ``combos`` combinations of files per crash point."""

    full: int = 5
    sample: int = 6
    tears: int = 2
    combos: int = 48


class Model:
    """The files of one log directory as the trace changes them, and the crash states."""

    def __init__(self, logdir: str) -> None:
        self.logdir = os.path.abspath(logdir)
        self.inodes: dict[int, Inode] = {}
        self.ino2uid: dict[int, int] = {}
        self.dir_cur: dict[str, int] = {}
        self.dir_durable: dict[str, int] = {}
        self.dir_pending: list[tuple[Any, ...]] = []
        self._uids = itertools.count()

    def _name(self, path: str) -> str | None:
        d, n = os.path.split(path)
        return n if d == self.logdir else None

    def apply(self, ev: Event) -> bool:
        """Apply one event; True if it changed what a crash could leave."""
        if ev.op == fileops.EV_OPEN:
            name = self._name(ev.name)
            if name is None:
                return False
            if name in self.dir_cur:
                self.ino2uid[ev.ino] = self.dir_cur[name]
                return False
            uid = next(self._uids)
            self.inodes[uid] = Inode()
            self.ino2uid[ev.ino] = uid
            self.dir_cur[name] = uid
            self.dir_pending.append(("link", name, uid))
            return True
        if ev.op in (fileops.EV_WRITE, fileops.EV_TRUNC, fileops.EV_SYNC):
            uid = self.ino2uid.get(ev.ino)
            if uid is None:
                return False
            node = self.inodes[uid]
            if ev.op == fileops.EV_WRITE:
                op: tuple[Any, ...] = ("w", ev.off, ev.data)
            elif ev.op == fileops.EV_TRUNC:
                op = ("t", ev.off)
            else:
                node.durable = bytes(node.cur)
                node.pending = []
                return True
            node.cur = bytearray(_apply(bytes(node.cur), [op]))
            node.pending.append(op)
            return True
        if ev.op == fileops.EV_UNLINK:
            name = self._name(ev.name)
            if name is None or name not in self.dir_cur:
                return False
            del self.dir_cur[name]
            self.dir_pending.append(("unlink", name))
            return True
        if ev.op == fileops.EV_RENAME:
            src, dst = (self._name(p) for p in ev.name.split("\0"))
            if src is None or dst is None or src not in self.dir_cur:
                return False
            self.dir_cur[dst] = self.dir_cur.pop(src)
            self.dir_pending.append(("rename", src, dst))
            return True
        if ev.op == fileops.EV_FSYNC_DIR:
            if os.path.abspath(ev.name) != self.logdir:
                return False
            self.dir_durable = dict(self.dir_cur)
            self.dir_pending = []
            return True
        return False

    def _dir_states(self) -> list[dict[str, int]]:
        out = []
        for k in range(len(self.dir_pending) + 1):
            d = dict(self.dir_durable)
            for op in self.dir_pending[:k]:
                if op[0] == "link":
                    d[op[1]] = op[2]
                elif op[0] == "unlink":
                    d.pop(op[1], None)
                elif op[1] in d:
                    d[op[2]] = d.pop(op[1])
            out.append(d)
        return out

    def _variants(self, node: Inode, rng: random.Random, b: Budget) -> list[bytes]:
        pieces = _pieces(node.pending)
        n = len(pieces)
        if n == 0:
            return [node.durable]
        subsets: set[tuple[int, ...]] = set()
        if n <= b.full:
            for mask in range(1 << n):
                subsets.add(tuple(i for i in range(n) if mask >> i & 1))
        else:
            every = tuple(range(n))
            for k in range(n + 1):
                subsets.add(every[:k])  # in order, cut anywhere
            for i in range(n):
                subsets.add(every[:i] + every[i + 1 :])  # all but one
                subsets.add((i,))  # only one
            for _ in range(b.sample):
                subsets.add(tuple(i for i in range(n) if rng.random() < 0.5))
        out = []
        for sub in sorted(subsets):
            ops = [pieces[i] for i in sub]
            out.append(_apply(node.durable, ops))
            writes = [j for j, op in enumerate(ops) if op[0] == "w" and len(op[2]) > SECTOR]
            for _ in range(b.tears if writes else 0):
                j = rng.choice(writes)
                _, off, data = ops[j]
                cut = rng.randrange(1, (len(data) + SECTOR - 1) // SECTOR) * SECTOR
                torn = data[:cut] if rng.random() < 0.5 else None
                if torn is not None:
                    out.append(_apply(node.durable, ops[:j] + [("w", off, torn)] + ops[j + 1 :]))
                else:  # the later sectors persisted, the earlier ones did not
                    late = [("w", off + cut, data[cut:])]
                    out.append(_apply(node.durable, ops[:j] + late + ops[j + 1 :]))
        return out

    def crash_states(self, rng: random.Random, b: Budget) -> Iterator[dict[str, bytes]]:
        """The states a crash right now may leave: {file name: contents}."""
        for d in self._dir_states():
            names = sorted(d)
            per_file = [self._variants(self.inodes[d[n]], rng, b) for n in names]
            total = 1
            for v in per_file:
                total *= len(v)
            if total <= b.combos:
                combos: Any = itertools.product(*per_file)
            else:
                first = [tuple(v[0] for v in per_file), tuple(v[-1] for v in per_file)]
                combos = first + [
                    tuple(rng.choice(v) for v in per_file) for _ in range(b.combos - 2)
                ]
            for combo in combos:
                yield dict(zip(names, combo, strict=True))


# --- what the workload tried and what the log acknowledged ----------------------------


_RAMP = bytes(range(256))


def payload(uid: int, size: int) -> bytes:
    """``id:UID:`` then the bytes ``(uid * 7 + i) & 0xFF`` for i = 0, 1, ... up to ``size``
    (cut from a repeated 0..255 ramp: a generator per byte was half the test's time)."""
    head = b"id:%d:" % uid
    n = max(0, size - len(head))
    start = (uid * 7) & 0xFF
    return head + (_RAMP * (n // 256 + 2))[start:start + n]


def payload_id(data: bytes) -> int | None:
    if not data.startswith(b"id:"):
        return None
    try:
        uid = int(data.split(b":")[1])
    except ValueError:
        return None
    return uid if payload(uid, len(data)) == data else None


@dataclass
class Knowledge:
    """What the marks up to a crash point say the log must and may hold."""

    tried: set[int] = field(default_factory=set)
    group: dict[int, tuple[int, ...]] = field(default_factory=dict)  # id -> its batch
    acked: dict[int, int] = field(default_factory=dict)  # id -> seq
    full: set[int] = field(default_factory=set)  # LogFullError: never on disk
    removed: set[int] = field(default_factory=set)  # a finished truncate removed them
    cutting: list[int] = field(default_factory=list)  # truncates begun (kept seq)
    finished_cuts: list[int] = field(default_factory=list)  # truncates done (kept seq)
    floor: int = 0  # seqs below may be compacted away
    durable: bool = True  # fsync=True: acknowledged means durable

    def mark(self, m: dict[str, Any]) -> None:
        k = m["k"]
        ids = tuple(m.get("ids", ()))
        if k == "try":
            self.tried.update(ids)
            for i in ids:
                self.group[i] = ids
        elif k == "ack":
            for j, i in enumerate(ids):
                self.acked[i] = m["seq"] + j
        elif k == "full":
            self.full.update(ids)
        elif k == "trunc_begin":
            self.cutting.append(m["seq"])
        elif k == "trunc_end":
            for i, s in self.acked.items():
                if s > m["seq"]:
                    self.removed.add(i)
            for i in self.removed:
                self.acked.pop(i, None)
            self.cutting.remove(m["seq"])
            self.finished_cuts.append(m["seq"])
        elif k == "compact_begin":
            self.floor = max(self.floor, m["seq"] + 1)


def check_log(entries: list[tuple[int, bytes]], first_seq: int, kn: Knowledge,
              eventual: dict[int, int]) -> list[str]:
    """Problems with what a recovered log holds (``entries``: (seq, payload))."""
    bad = []
    seqs = [s for s, _ in entries]
    if seqs != list(range(first_seq, first_seq + len(seqs))):
        bad.append(f"seqs not contiguous from {first_seq}: {seqs[:5]}...")
    at: dict[int, int] = {}
    for s, data in entries:
        uid = payload_id(data)
        if uid is None or uid not in kn.tried:
            bad.append(f"seq {s}: a record that was never appended: {data[:24]!r}")
            continue
        if uid in kn.full:
            bad.append(f"seq {s}: id {uid} failed with LogFullError ('unchanged') but is there")
        if uid in kn.removed:
            bad.append(f"seq {s}: id {uid} was removed by a finished truncate but is there")
        if uid in at:
            bad.append(f"id {uid} at seqs {at[uid]} and {s}")
        at[uid] = s
        if uid in eventual and eventual[uid] != s and uid not in kn.removed:
            bad.append(f"id {uid} at seq {s}, acknowledged at seq {eventual[uid]}")
    cut_lo = min(kn.cutting) if kn.cutting else None
    if kn.durable:
        for uid, s in kn.acked.items():
            if s < kn.floor or (cut_lo is not None and s > cut_lo):
                continue
            if at.get(uid) != s:
                bad.append(f"acknowledged id {uid} (seq {s}) is missing")
    for uid in at:
        grp = kn.group.get(uid, (uid,))
        present = [g for g in grp if g in at]
        if len(present) != len(grp):
            # Only a truncate that cut inside the batch may keep part of it, up to its seq.
            last = max(at[g] for g in present)
            prefix = list(grp[: len(present)]) == present
            if not prefix or last not in kn.cutting + kn.finished_cuts:
                bad.append(f"part of batch {grp} is there: {present}")
    return bad


# --- replaying a trace and checking every state ---------------------------------------


@dataclass
class Result:
    crash_points: int = 0
    states: int = 0  # distinct states opened and checked
    violations: list[str] = field(default_factory=list)


def _state_key(files: dict[str, bytes]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for n in sorted(files):
        h.update(n.encode() + b"\0" + struct.pack("<Q", len(files[n])) + files[n])
    return h.digest()


async def check_state(files: dict[str, bytes], scratch: str, name: str, kn: Knowledge,
                      eventual: dict[int, int], opts: dict[str, Any]) -> list[str]:
    root = os.path.join(scratch, name)
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    for n, data in files.items():
        with open(os.path.join(root, n), "wb") as f:
            f.write(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogRecoveryWarning)
        log = FsLog(scratch, name, **opts)
        try:
            await log.open()
        except Exception as e:  # noqa: BLE001 - any failure to open is the finding
            return [f"open failed: {type(e).__name__}: {e}"]
        try:
            got = [(e.seq, e.data) async for e in log.iter()]
            bad = check_log(got, log.first_seq, kn, eventual)
            seq = await log.append(b"after the crash")
            if seq != (got[-1][0] + 1 if got else log.first_seq):
                bad.append(f"the next append got seq {seq} after {len(got)} records")
            if (await log.read(seq)).data != b"after the crash":
                bad.append("the next append does not read back")
            return bad
        except Exception as e:  # noqa: BLE001
            return [f"{type(e).__name__}: {e}"]
        finally:
            await log.close()


async def explore(trace_path: str, logdir: str, scratch: str, opts: dict[str, Any],
                  budget: Budget, seed: int, durable: bool = True,
                  max_violations: int = 20) -> Result:
    """Replay the trace; check every distinct crash state at every point of it."""
    events = read_trace(trace_path)
    model = Model(logdir)
    kn = Knowledge(durable=durable)
    rng = random.Random(seed)
    seen: set[bytes] = set()
    res = Result()
    name = os.path.basename(logdir)
    epoch_acks = _acks_by_epoch(events)
    epoch = 0
    version = 0  # what is known changed: a state seen before may now be wrong
    for ev in events:
        if ev.op == fileops.EV_MARK:
            m = json.loads(ev.name)
            kn.mark(m)
            if m["k"] != "try":
                version += 1
            if m["k"] == "trunc_end":  # seqs are reused from here on
                epoch += 1
            continue
        if not model.apply(ev):
            continue
        res.crash_points += 1
        for files in model.crash_states(rng, budget):
            key = _state_key(files) + struct.pack("<Q", version)
            if key in seen:
                continue
            seen.add(key)
            res.states += 1
            bad = await check_state(files, scratch, name, kn, epoch_acks[epoch], opts)
            if bad:
                res.violations.append(f"after event {ev.op} ({len(res.violations)}): {bad[:3]}")
                if len(res.violations) >= max_violations:
                    return res
    return res


def _acks_by_epoch(events: list[Event]) -> list[dict[int, int]]:
    """For each stretch between finished truncates: id -> seq of every ack in it or later
    in the same stretch (an id's seq is fixed when it is framed, acked or not yet)."""
    epochs: list[dict[int, int]] = [{}]
    for ev in events:
        if ev.op != fileops.EV_MARK:
            continue
        m = json.loads(ev.name)
        if m["k"] == "ack":
            for j, i in enumerate(m["ids"]):
                epochs[-1][i] = m["seq"] + j
        elif m["k"] == "trunc_end":
            keep = {i: s for i, s in epochs[-1].items() if s <= m["seq"]}
            epochs.append(keep)
    # Earlier acks stay known in later epochs unless truncated; later acks are also known
    # in earlier epochs (an append framed before a crash point may be acked after it).
    for k in range(len(epochs) - 2, -1, -1):
        for i, s in epochs[k + 1].items():
            epochs[k].setdefault(i, s)
    return epochs
