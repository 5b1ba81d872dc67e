"""The snapshot directory of one simulated node, with a file system's durability.

A real driver keeps snapshots as files beside the log: it writes a temp file, fsyncs it,
renames it to its final name, fsyncs the directory, and later unlinks old ones; a follower
receiving a snapshot appends chunks to a partial file that it keeps across restarts. What
survives a power loss depends on which of those steps completed, and this module models
exactly that (as ``store.py`` does for the log):

* A file's *content* is durable once ``fsync`` of that file returned; a *name* (create,
  rename, unlink) is durable once ``dir_fsync`` returned. Names and contents are separate,
  as on a real file system: a rename made durable before the file's content was fsynced
  leaves a file under its final name whose bytes are whatever reached the disk.
* A crash keeps the durable names and contents. With ``torn``, some unsynced work survives
  too: a prefix of the name operations since the last directory fsync, and a prefix of each
  file's unsynced appended bytes, which may hold garbage (the file's size reached the disk,
  its data blocks did not): only the snapshot's CRC tells a good file from a bad one.

Every mutating call is one storage step of the node's store (a place an armed crash can
fire), named so that a trace says which snapshot step a crash interrupted.

A snapshot's identity and metadata (:class:`SnapshotMeta`) travel with its name (a real
driver encodes seq, term, size and CRC in the name and keeps configuration and extra state
in a small header); the state machine's bytes are the file's content.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ..raft.snapshot import crc32c
from ..snapshot.meta import SnapshotMeta

__all__ = ["SnapshotDir", "final_name", "PARTIAL", "SNAPSHOT_STEPS"]

PARTIAL = "partial"  # the snapshot a follower is receiving

# Storage steps of taking and of installing a snapshot (the names ``SimCrash`` reports).
SNAPSHOT_STEPS = (
    "snapshot temp write", "snapshot fsync", "snapshot rename", "snapshot dir fsync",
    "snapshot prune", "compact", "partial create", "snapshot chunk write", "partial fsync",
    "partial rename", "partial dir fsync", "partial discard", "log reset",
)


def final_name(meta: SnapshotMeta) -> str:
    return f"snap-{meta.seq:012d}-{meta.term}-{meta.crc:08x}"


def good(meta: SnapshotMeta, data: bytes | bytearray) -> bool:
    """The bytes are the snapshot ``meta`` names (size and CRC32C)."""
    return len(data) == meta.size and crc32c(bytes(data)) == meta.crc


class _File:
    __slots__ = ("data", "durable")

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)  # the page cache
        self.durable = b""  # the platters


Entry = tuple[SnapshotMeta, int]  # a directory entry: metadata, inode


class SnapshotDir:
    def __init__(self, step: Callable[[str], None], rng: random.Random, torn: bool) -> None:
        self._step = step
        self._rng = rng
        self._torn = torn
        self._files: dict[int, _File] = {}
        self._dir: dict[str, Entry] = {}
        self._ddir: dict[str, Entry] = {}
        self._pending: list[tuple[str, str, object]] = []  # name ops since the last dir fsync
        self._inodes = 0
        self._version = 0  # bumped by anything that changes what is durable
        self._cover: tuple[int, SnapshotMeta | None] = (-1, None)  # (version, newest good)

    # --- the write path (each call is one storage step) ---------------------------------
    def create(self, name: str, meta: SnapshotMeta, data: bytes, what: str) -> None:
        """A new file ``name`` (replacing one of that name) holding ``data``, unsynced."""
        self._step(what)
        self._inodes += 1
        self._files[self._inodes] = _File(data)
        self._dir[name] = (meta, self._inodes)
        self._pending.append(("link", name, (meta, self._inodes)))

    def append(self, name: str, data: bytes, what: str = "snapshot chunk write") -> None:
        self._step(what)
        self._files[self._dir[name][1]].data += data

    def fsync(self, name: str, what: str) -> None:
        self._step(what)
        f = self._files[self._dir[name][1]]
        f.durable = bytes(f.data)
        self._version += 1

    def rename(self, old: str, new: str, what: str) -> None:
        self._step(what)
        self._dir[new] = self._dir.pop(old)
        self._pending.append(("rename", old, new))

    def unlink(self, name: str, what: str) -> None:
        self._step(what)
        if name in self._dir:
            del self._dir[name]
            self._pending.append(("unlink", name, None))

    def dir_fsync(self, what: str) -> None:
        self._step(what)
        for op in self._pending:
            self._apply(self._ddir, op)
        self._pending.clear()
        self._version += 1

    @staticmethod
    def _apply(d: dict[str, Entry], op: tuple[str, str, object]) -> None:
        kind, name, arg = op
        if kind == "link":
            d[name] = arg  # type: ignore[assignment]
        elif kind == "rename":
            if name in d:
                d[arg] = d.pop(name)  # type: ignore[index]
        else:
            d.pop(name, None)

    # --- reads ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._dir)

    def meta(self, name: str) -> SnapshotMeta | None:
        e = self._dir.get(name)
        return None if e is None else e[0]

    def read(self, name: str) -> bytes | None:
        e = self._dir.get(name)
        return None if e is None else bytes(self._files[e[1]].data)

    def size(self, name: str) -> int:
        e = self._dir.get(name)
        return -1 if e is None else len(self._files[e[1]].data)

    def finals(self) -> list[tuple[SnapshotMeta, str]]:
        """Complete snapshots (by name), newest first."""
        out = [(m, n) for n, (m, _) in self._dir.items() if n.startswith("snap-")]
        out.sort(key=lambda x: (x[0].seq, x[1]), reverse=True)
        return out

    def current_cover(self) -> int:
        """The seq of the newest complete, undamaged snapshot in the current image."""
        for m, n in self.finals():
            if good(m, self._files[self._dir[n][1]].data):
                return m.seq
        return -1

    def durable_newest(self) -> SnapshotMeta | None:
        """The newest snapshot that a crash now would leave complete and undamaged (durable
        name, durable content, CRC good)."""
        if self._cover[0] == self._version:
            return self._cover[1]
        best: SnapshotMeta | None = None
        for n, (m, ino) in self._ddir.items():
            if (n.startswith("snap-") and (best is None or m.seq > best.seq)
                    and good(m, self._files[ino].durable)):
                best = m
        self._cover = (self._version, best)
        return best

    def durable_cover(self) -> int:
        """The seq of ``durable_newest`` (-1 if none)."""
        m = self.durable_newest()
        return -1 if m is None else m.seq

    # --- faults -------------------------------------------------------------------------------
    def crash(self) -> str:
        """Lose what is not durable (``torn``: keep some of it, maybe as garbage)."""
        rng = self._rng
        kept: list[str] = []
        if self._torn and self._pending:
            n = rng.randint(0, len(self._pending))
            for op in self._pending[:n]:
                self._apply(self._ddir, op)
            kept.append(f"{n}/{len(self._pending)} snapshot name ops")
        self._pending.clear()
        self._dir = dict(self._ddir)
        live = {ino for _, ino in self._dir.values()}
        for ino in list(self._files):
            if ino not in live:
                del self._files[ino]
                continue
            f = self._files[ino]
            cur, dur = bytes(f.data), f.durable
            extra = cur[len(dur):] if cur.startswith(dur) else b""
            if self._torn and extra:
                k = rng.randint(0, len(extra))
                part = bytearray(extra[:k])
                if part and rng.random() < 0.5:
                    i = rng.randrange(len(part))
                    part[i] ^= 1 << rng.randrange(8)  # reached the disk as garbage
                    kept.append(f"{k} unsynced snapshot bytes (damaged)")
                elif part:
                    kept.append(f"{k} unsynced snapshot bytes")
                f.durable = dur + bytes(part)
            f.data = bytearray(f.durable)
        self._version += 1
        return ", ".join(kept)

    def rot(self, name: str) -> None:
        """Flip one bit of file ``name`` at rest (a bad sector), in both images."""
        rng = self._rng
        f = self._files[self._dir[name][1]]
        if not f.data:
            return
        i = rng.randrange(len(f.data))
        f.data[i] ^= 1 << rng.randrange(8)
        if i < len(f.durable):
            d = bytearray(f.durable)
            d[i] = f.data[i]
            f.durable = bytes(d)
        self._version += 1

    def wipe(self) -> None:
        self._files.clear()
        self._dir.clear()
        self._ddir.clear()
        self._pending.clear()
        self._version += 1
