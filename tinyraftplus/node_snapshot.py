"""Snapshots in the Trio driver (a mixin of ``RaftNode``): taking them, compacting the log
behind them, restoring at start, and receiving them from a leader.

The state machine protocol (both optional, each sync or ``async``):

* ``snapshot() -> Iterable[bytes] | AsyncIterable[bytes]``: called right after the node
  applied through some seq S, with no ``apply`` in between. Capture the state *quickly*
  (hashicorp's ``FSM.Snapshot`` rule: a copy of references, not a serialization) and return
  an iterable of byte chunks that serializes what was captured; the node writes those
  chunks to a file while applying goes on.
* ``restore(meta, stream)``: replace all state with the snapshot's. ``stream`` is a binary
  file object over the snapshot's data (``read(n)`` gives ``b""`` at the end); read it in
  pieces so memory stays bounded. ``meta`` is the ``SnapshotMeta``.

Policy. With ``snapshot_entries=N`` the node snapshots when its apply seq reaches a
multiple of N (minus one: seqs N-1, 2N-1, ...): every replica of a deterministic state
machine then writes byte-identical snapshots, so a transfer interrupted by a leader change
resumes with the new leader. If the previous snapshot is still being written when the next
boundary is reached, applying waits there for it (which happens only when snapshots take
longer to write than N entries take to apply). ``await node.snapshot()`` takes one now.
Once a snapshot is durable the log is compacted through ``min(snapshot seq, apply seq -
trailing_entries, the seq of a snapshot being sent to a follower)``; ``FsLog.compact``
drops whole segments, so up to one segment more stays. ``trailing_entries`` lets a slightly
lagging follower catch up from the log instead of a snapshot.

Start. The newest snapshot whose CRC checks is restored (a damaged one is reported and the
one before is tried), then the log after it is replayed; a log that does not hold the
snapshot's last entry is reset to start after it.

Receiving (``Ready.snapshot_in``): pieces go to a partial file in the snapshot store; each
is answered with the bytes held. When whole, its CRC is checked, then applying pauses, the
state machine is restored (a sync ``restore`` in a worker thread, so the node keeps
answering heartbeats), and between two ``Ready``s the log is made to start after the
snapshot and the core told (``snapshot_installed``).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from .entry import ConfigEntry
from .errors import (
    InvalidArgumentError,
    MemberStateLostError,
    NodeStoppedError,
    SnapshotCorruptError,
    SnapshotError,
)
from .raft.membership import Config
from .raft.messages import SNAP_BEGIN, SNAP_CORRUPT, SNAP_OK, SNAP_REJECTED, InstallSnapshot
from .raft.snapshot import SnapshotBase, crc32c
from .raft.state import decode_hard_state, encode_hard_state
from .snapshot import SnapshotMeta, SnapshotStore

if TYPE_CHECKING:
    from .raft.core import RaftCore

log = logging.getLogger("tinyraftplus")

SNAP_EARLY_MAX = 8
"""Most snapshot chunks a follower keeps that arrived ahead of a missing one (and at
most ``SNAP_EARLY_MAX_BYTES`` of them)."""
SNAP_EARLY_MAX_BYTES = 16 << 20


class _StoreSource:
    """The store as the core reads it (``raft.snapshot.SnapshotSource``).

    The file of a snapshot being sent stays open here (up to ``KEEP_OPEN`` of them), so
    that newer snapshots pruning it do not cut the transfer: an unlinked file stays
    readable through its descriptor, and the follower's offset stays good."""

    KEEP_OPEN = 4

    def __init__(self, store: SnapshotStore, on_damaged: Any = None) -> None:
        self.store = store
        self.on_damaged = on_damaged
        self.bad: set[tuple[int, int, int, int]] = set()
        self._open: dict[tuple[int, int, int, int], tuple[int, int]] = {}  # ident -> fd, off

    def latest_snapshot(self) -> SnapshotMeta | None:
        latest = self.store.latest()
        if latest is not None and latest.ident in self.bad:
            return None  # set aside until a new one is taken
        return latest

    def read_chunk(self, meta: SnapshotMeta, offset: int, n: int) -> bytes | None:
        ident = meta.ident
        got = self._open.pop(ident, None)
        if got is None:
            try:
                fd, _, h = self.store._file(meta)
            except SnapshotError:
                return None
            got = (fd, h.data_off)
            while len(self._open) >= self.KEEP_OPEN:
                old = next(iter(self._open))
                os.close(self._open.pop(old)[0])
        self._open[ident] = got  # most recently used last
        want = max(0, min(n, meta.size - offset))
        data = os.pread(got[0], want, got[1] + offset)
        return data if len(data) == want else None

    def damaged(self, meta: SnapshotMeta) -> None:
        self.bad.add(meta.ident)
        got = self._open.pop(meta.ident, None)
        if got is not None:
            os.close(got[0])
        if self.on_damaged is not None:
            self.on_damaged(meta)

    def close(self) -> None:
        for fd, _ in self._open.values():
            os.close(fd)
        self._open.clear()


def _encode_extra(config_seq: int, config_term: int, keys: bytes | None) -> bytes:
    """The node's own replicated state in a snapshot: the configuration entry's seq and
    term, and the idempotency key table (``idempotency.py``) as of the snapshot's seq."""
    extra: dict[str, Any] = {"config_seq": config_seq, "config_term": config_term}
    if keys is not None:
        extra["keys"] = keys
    return msgpack.packb(extra)


def _decode_extra(meta: SnapshotMeta) -> dict[str, Any]:
    """``_encode_extra``'s map; ``SnapshotCorruptError`` if it is not one."""
    try:
        extra = msgpack.unpackb(meta.extra) if meta.extra else {}
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise SnapshotCorruptError(f"snapshot {meta.seq}: bad extra state ({e})") from None
    if not isinstance(extra, dict):
        raise SnapshotCorruptError(f"snapshot {meta.seq}: bad extra state (not a map)")
    return extra


def _keys_of(meta: SnapshotMeta) -> bytes | None:
    keys = _decode_extra(meta).get("keys")
    return keys if isinstance(keys, bytes) else None


def base_of(meta: SnapshotMeta) -> SnapshotBase:
    """The core's view of a snapshot: its last entry and its configuration."""
    if meta.config is None:
        raise SnapshotCorruptError(f"snapshot {meta.seq} carries no configuration")
    extra = _decode_extra(meta)
    try:
        cs, ct = int(extra.get("config_seq", -1)), int(extra.get("config_term", 0))
    except (ValueError, TypeError) as e:
        raise SnapshotCorruptError(f"snapshot {meta.seq}: bad extra state ({e})") from None
    return SnapshotBase(meta.seq, meta.term, Config.decode(meta.config), cs, ct)


async def _maybe_await(v: Any) -> Any:
    return await v if inspect.isawaitable(v) else v


class NodeSnapshots:
    """Mixed into ``RaftNode``; the fields it uses are declared here."""

    node_id: Any
    log: Any
    events: Any
    _core: RaftCore | None
    _apply_seq: int
    _commit_seq: int
    _initial_apply_seq: int
    _apply_fn: Any
    _apply_async: bool
    _nursery: trio.Nursery | None
    _wake: Any
    _cache: Any
    _cache_bytes: int
    _apply_changed: trio.Event
    _running: bool
    _state: Any

    # set up by _snapshot_init
    _snap_fn: Any
    _restore_fn: Any
    _snap_every: int
    _snap_trailing: int
    _snap_keep: int
    _snap_store: SnapshotStore | None
    _snap_source: _StoreSource | None

    def _snapshot_init(self, snapshot: Any, restore: Any, snapshot_entries: int | None,
                       trailing_entries: int, snapshot_keep: int) -> None:
        for name, fn in (("snapshot", snapshot), ("restore", restore)):
            if fn is not None and not callable(fn):
                raise InvalidArgumentError(f"RaftNode({name}=...): must be callable")
        if (snapshot is None) != (restore is None):
            raise InvalidArgumentError(
                "RaftNode: pass both snapshot= and restore= (a node that can take snapshots "
                "must be able to load them, and the other way round), or neither"
            )
        if snapshot_entries is None:
            snapshot_entries = 10_000 if snapshot is not None else 0
        for name, v, lo in (("snapshot_entries", snapshot_entries, 0),
                            ("trailing_entries", trailing_entries, 0),
                            ("snapshot_keep", snapshot_keep, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise InvalidArgumentError(f"RaftNode({name}={v!r}): an int >= {lo}")
        if snapshot_entries and snapshot is None:
            raise InvalidArgumentError(
                f"RaftNode(snapshot_entries={snapshot_entries}): the state machine needs "
                "snapshot= and restore= to take snapshots"
            )
        self._snap_fn = snapshot
        self._restore_fn = restore
        self._snap_every = snapshot_entries
        self._snap_trailing = trailing_entries
        self._snap_keep = snapshot_keep
        self._snap_store = None

    def _snapshot_reset(self) -> None:
        """Volatile snapshot state (``_reset_volatile``)."""
        self._snap_last = -1  # seq of the newest snapshot this node holds
        self._snap_busy = False  # a snapshot is being written
        self._snap_tried = -1  # apply seq of the last attempt (a failed one is not retried)
        self._snap_requested = False
        self._snap_done = trio.Event()
        self._snap_result: SnapshotMeta | BaseException | None = None
        self._restoring = False
        self._capturing = False
        self._installing = False
        self._install_ready: tuple[Any, SnapshotMeta] | None = None
        self._partial: Any = None
        self._snap_early: dict[int, bytes] = {}
        """Chunks of the partial snapshot that arrived ahead of a missing one, by offset."""
        self._snap_early_for: Any = None
        self._applied_config: tuple[int, int, Config] | None = None
        self._applied_term = 0
        self.snapshots_installed = 0

    # ------------------------------------------------------------------ start
    def _snapshot_store_for(self) -> SnapshotStore | None:
        path = getattr(self.log, "path", None)
        if path is None:
            return None
        parent, name = os.path.split(os.fspath(path).rstrip(os.sep))
        return SnapshotStore(parent, name, keep=self._snap_keep)

    def _snapshot_source(self) -> _StoreSource | None:
        if self._snap_store is None:
            return None
        self._snap_source = _StoreSource(self._snap_store, self._snap_damaged)
        return self._snap_source

    def _snapshot_close(self) -> None:
        src = getattr(self, "_snap_source", None)
        if src is not None:
            src.close()
            self._snap_source = None

    def _snap_damaged(self, meta: SnapshotMeta) -> None:
        """A follower found our snapshot's bytes wrong: take a new one (the damaged one is
        no longer offered, and the next start skips it: its CRC is checked there)."""
        self._warn(f"snapshot {meta.seq} is damaged on this node's disk; taking a new one")
        self._snap_requested = True
        self._wake.set()

    async def _snapshot_open(self) -> SnapshotBase | None:
        """Open the store; restore the newest good snapshot; make the log start at or before
        the entry after it. Returns what the core must know, or None without snapshots."""
        store = self._snap_store = self._snapshot_store_for()
        if store is None:
            return None
        await trio.to_thread.run_sync(store.open)
        good: SnapshotMeta | None = None
        for meta in reversed(store.list()):
            try:
                await store.averify(meta)
            except SnapshotCorruptError as e:
                self._warn(f"snapshot {meta.seq} is damaged and will not be used: {e}")
                continue
            good = meta
            break
        if good is None:
            return None
        base = base_of(good)
        lg = self.log
        s = good.seq
        raw = self._state.load()
        hs = decode_hard_state(raw, self._state.path) if raw is not None else None
        if hs is not None and hs.has_log and lg.seq < 0:
            # Not a reset a crash interrupted (that is recorded first, below): the log was
            # deleted with the node's state kept, and entries after the snapshot that this
            # member acknowledged are gone with it.
            raise MemberStateLostError(
                f"node {self.node_id!r}: its log ({getattr(lg, 'path', lg)}) is empty, but its "
                f"state ({self._state.path}) says it held entries: it lost its log and is not "
                "the member it was. Delete the state file and the snapshots too and restart "
                "the node without bootstrap; it then recovers from the other members"
            )
        if lg.first_seq - 1 > s:
            raise SnapshotCorruptError(
                f"node {self.node_id!r}: its log starts after seq {lg.first_seq - 1} but its "
                f"newest good snapshot ends at seq {s}: the entries between are lost. Delete "
                "the node's data (log, snapshots and .raftstate) and restart it without "
                "bootstrap; it then recovers from the other members"
            )
        if self._initial_apply_seq < s:
            if self._restore_fn is None:
                raise SnapshotError(
                    f"node {self.node_id!r} holds snapshot {s} but has no restore= to load it"
                )
            await self._restore_state(good)
            self._keys_load(good)
            self._apply_seq = self._initial_apply_seq = s
        if not (s <= lg.seq and lg.term_at(s) == good.term):
            if hs is not None and hs.has_log:
                await self._state.save(encode_hard_state(replace(hs, has_log=False)))
            await lg.reset(s, good.term)
        self._snap_last = s
        self._applied_term = good.term
        self._applied_config = (base.config_seq, base.config_term, base.config)
        return base

    async def _restore_state(self, meta: SnapshotMeta) -> None:
        store = self._snap_store
        assert store is not None
        fn = self._restore_fn
        with store.open_data(meta) as stream:
            if inspect.iscoroutinefunction(fn):
                await fn(meta, stream)
            else:
                # A sync restore may take seconds: in a worker thread, applying and reads
                # are paused (``_restoring``) and the node keeps answering heartbeats.
                def run() -> Any:
                    return fn(meta, stream)

                r = await trio.to_thread.run_sync(run)
                if inspect.isawaitable(r):
                    await r

    # ------------------------------------------------------------------ taking snapshots
    def _snap_boundary(self, lo: int) -> int | None:
        """The seq at or after ``lo`` at which the next policy snapshot is due (the apply
        loop stops there), or None."""
        n = self._snap_every
        if not n or self._snap_store is None:
            return None
        return (lo // n + 1) * n - 1

    def _snap_due(self) -> bool:
        if self._restoring:
            return False
        if self._snap_requested:
            return True
        n = self._snap_every
        a = self._apply_seq
        # (also while the previous snapshot is still being written: applying then waits
        # at the boundary, so that every replica snapshots at every multiple)
        return (bool(n) and a > self._snap_tried and (a + 1) % n == 0
                and self._snap_store is not None)

    def _note_applied(self, ents: list[Any]) -> None:
        """Track the configuration and term at the apply seq (for the snapshot's meta)."""
        if ConfigEntry in set(map(type, ents)):  # (rare: the check runs in C)
            for e in ents:
                if e.kind:
                    self._applied_config = (e.seq, e.term, Config.decode(e.data))
        self._applied_term = ents[-1].term

    async def _snap_capture(self) -> None:
        """Capture the state machine at the apply seq and write it in the background."""
        self._snap_requested = False
        seq = self._apply_seq
        self._snap_tried = seq
        if self._snap_store is None or self._snap_fn is None or seq < 0:
            self._snap_finish(SnapshotError(
                f"node {self.node_id!r} cannot snapshot: "
                + ("no snapshot= function" if self._snap_fn is None else
                   "its log has no directory to keep snapshots in" if self._snap_store is None
                   else "nothing applied yet")
            ))
            return
        src = getattr(self, "_snap_source", None)
        if seq <= self._snap_last:
            latest = self._snap_store.latest()
            if latest is not None and (src is None or latest.ident not in src.bad):
                self._snap_finish(latest)
                return
        cfg = self._applied_config
        if cfg is None:
            core = self._core
            assert core is not None
            cfg = core._configs.items[0]  # the configuration the node started with
        keys = self._keys_dump()
        self._snap_busy = True
        self._capturing = True  # (an async apply waits: the capture sees one state)
        try:
            src = await _maybe_await(self._snap_fn())
        except BaseException as e:
            self._snap_busy = False
            self._capturing = False
            self._snap_finish(e if isinstance(e, Exception) else SnapshotError(repr(e)))
            if not isinstance(e, Exception):
                raise
            return
        self._capturing = False
        assert self._nursery is not None
        self._nursery.start_soon(self._snap_write, seq, self._applied_term, cfg, src, keys)

    def _keys_dump(self) -> bytes | None:
        table = getattr(self, "keys", None)
        if table is None or not table.clients:
            return None
        try:
            return bytes(table.dump())
        except (TypeError, ValueError, OverflowError) as e:
            self._warn(
                f"the idempotency key table holds results msgpack cannot encode ({e}); the "
                "snapshot keeps the keys with their results as None"
            )
            import copy

            bare = copy.copy(table)
            bare.clients = type(table.clients)(
                (c, (f, dict.fromkeys(r))) for c, (f, r) in table.clients.items())
            return bytes(bare.dump())

    def _keys_load(self, meta: SnapshotMeta) -> None:
        table = getattr(self, "keys", None)
        if table is None:
            return
        raw = _keys_of(meta)
        if raw is None:
            table.clients.clear()
        else:
            table.load(raw)

    async def _snap_write(self, seq: int, term: int, cfg: tuple[int, int, Config],
                          src: Any, keys: bytes | None = None) -> None:
        store = self._snap_store
        assert store is not None
        result: SnapshotMeta | BaseException
        try:
            w = store.begin(seq, term, cfg[2].encode(), _encode_extra(cfg[0], cfg[1], keys))
            try:
                if hasattr(src, "__aiter__"):
                    async for chunk in src:
                        w.write(chunk)
                        await trio.lowlevel.checkpoint()
                else:
                    for chunk in src:
                        w.write(chunk)
                        await trio.lowlevel.checkpoint()
                meta = await w.finish()
            except BaseException:
                w.abort()
                raise
        except Exception as e:
            self._warn(f"snapshot at seq {seq} failed: {e!r}")
            result = e
        else:
            result = meta
            src = getattr(self, "_snap_source", None)
            if src is not None:
                src.bad.discard(meta.ident)  # (a damaged one, taken again)
            self._snap_last = max(self._snap_last, seq)
            self.events.emit("snapshot", seq=seq, term=term, size=meta.size, installed=False)
            await self._compact()
        finally:
            self._snap_busy = False
        self._snap_finish(result)

    def _snap_finish(self, result: SnapshotMeta | BaseException) -> None:
        self._snap_result = result
        self._snap_done.set()
        self._snap_done = trio.Event()
        self._wake.set()  # applying may wait at the next boundary for this one

    async def _compact(self) -> None:
        core = self._core
        if core is None or not hasattr(self.log, "compact"):
            return
        upto = min(self._snap_last, self._apply_seq - self._snap_trailing)
        floor = core.snapshot_floor()
        if floor is not None:
            upto = min(upto, floor)
        if upto >= self.log.first_seq:
            try:
                await self.log.compact(upto)
            except Exception as e:
                self._warn(f"compacting the log through seq {upto} failed: {e!r}")

    async def snapshot(self) -> SnapshotMeta:
        """Take a snapshot of everything applied so far (or return the newest one if
        nothing was applied since), wait until it is durable and the log compacted."""
        if not self._running:
            raise NodeStoppedError(f"node {self.node_id!r} is not running")
        while self._snap_busy:
            await self._snap_done.wait()
        done = self._snap_done
        self._snap_requested = True
        self._wake.set()
        await done.wait()
        r = self._snap_result
        if isinstance(r, BaseException):
            raise r
        assert r is not None
        return r

    def _warn(self, message: str, exc: BaseException | None = None) -> None:
        raise NotImplementedError  # RaftNode's

    # ------------------------------------------------------------------ receiving
    def _snap_piece(self, core: RaftCore, frm: Any, m: InstallSnapshot) -> None:
        store = self._snap_store
        if store is None or (self._restore_fn is None and self._apply_fn is not None):
            self._warn(
                f"leader {frm!r} sends a snapshot (seq {m.seq}) but this node cannot load one "
                "(pass snapshot= and restore=, or use a log with a directory)"
            )
            return
        ident = (m.seq, m.snap_term, m.size, m.crc)
        p = self._partial
        if self._installing:
            if p is not None and p.meta.ident == ident:
                core.snapshot_reply(frm, m, SNAP_OK, m.size)
            return  # another one is being installed: the leader asks again later
        if m.begin:
            if p is None or p.meta.ident != ident:
                meta = SnapshotMeta(m.seq, m.snap_term, m.size, m.crc, m.config, m.extra)
                try:
                    base_of(meta)  # refuse one we could not install, before any byte
                    p = self._partial = store.partial(meta)
                except (SnapshotError, InvalidArgumentError) as e:
                    self._warn(f"refused snapshot {m.seq} from {frm!r}: {e}")
                    return
            core.snapshot_reply(frm, m, SNAP_OK, p.offset)
        elif p is None or p.meta.ident != ident:
            core.snapshot_reply(frm, m, SNAP_BEGIN, 0)
            return
        elif not (good := crc32c(m.data) == m.chunk_crc) or m.offset != p.offset:
            if good and m.offset < p.offset:
                # Held already (sent again after a rewind or a reopening): not a refusal,
                # which would send the leader back to here with chunks it sent after this
                # one still on their way, and have it send those again.
                core.snapshot_reply(frm, m, SNAP_OK, p.offset)
                return
            if good:
                self._snap_stash(p, m)  # ahead of a missing one
            core.snapshot_reply(frm, m, SNAP_REJECTED, p.offset)
            return
        else:
            try:
                held = p.write_at(m.offset, m.data)
                early = self._snap_early if self._snap_early_for == p.meta.ident else {}
                while held in early:  # chunks that came ahead of this one, in order now
                    held = p.write_at(held, early.pop(held))
            except (OSError, SnapshotError) as e:
                self._warn(f"could not store a piece of snapshot {m.seq}: {e!r}")
                self._partial = None
                return
            core.snapshot_reply(frm, m, SNAP_OK, held)
        if p.offset == m.size:
            self._snap_early = {}
            self._installing = True
            assert self._nursery is not None
            self._nursery.start_soon(self._snap_receive_done, frm, p)

    def _snap_stash(self, p: Any, m: InstallSnapshot) -> None:
        """Keep a good chunk that arrived ahead of a missing one (in memory, at most
        ``SNAP_EARLY_MAX`` chunks, never on disk: a partial file holds no holes). The leader
        sends it after a chunk that was lost (a dropped connection takes the chunks in flight
        on it, and those queued meanwhile arrive after the gap); refused, it goes back to the
        gap and sends that one chunk alone (``raft.snapshot``), and the answer to it counts
        these too, so they are not sent again."""
        if self._snap_early_for != p.meta.ident:
            self._snap_early = {}
            self._snap_early_for = p.meta.ident
        early = self._snap_early
        if len(early) < SNAP_EARLY_MAX and \
                sum(map(len, early.values())) + len(m.data) <= SNAP_EARLY_MAX_BYTES:
            early[m.offset] = m.data

    async def _snap_receive_done(self, frm: Any, p: Any) -> None:
        """Check and keep the received snapshot, restore the state machine from it, then
        let the driver switch the log over (``_snap_install``)."""
        try:
            try:
                meta = await p.complete()
            except SnapshotCorruptError as e:
                self._warn(f"snapshot {p.meta.seq} from {frm!r} failed its check ({e}); "
                                "fetching it again")
                self._partial = None
                self._installing = False
                core = self._core
                if core is not None:  # every chunk passed: the leader's copy is damaged
                    m = p.meta
                    core.snapshot_reply(frm, InstallSnapshot(
                        0, m.seq, m.term, m.size, m.crc, 0, b""), SNAP_CORRUPT, 0)
                    self._wake.set()
                return
            self._partial = None
            if meta.seq > self._apply_seq:
                self._restoring = True
                await self._wait_apply_idle()
                try:
                    await self._restore_state(meta)
                except Exception as e:
                    # The state machine cannot take the cluster's state: the node cannot
                    # go on applying (as when ``apply`` raises), so it stops, and says why.
                    self.events.emit("error", message=f"restore(snapshot {meta.seq}) raised "
                                     f"{e!r}; the node stops", exc=e)
                    raise
                self._keys_load(meta)
            self._install_ready = (frm, meta)
            self._wake.set()
        except BaseException:
            self._installing = False
            self._restoring = False
            raise

    async def _wait_apply_idle(self) -> None:
        # Applies run inline in the driver (nothing to wait for) or in the apply task,
        # which checks ``_restoring`` before each batch: wait for the batch in progress.
        while getattr(self, "_apply_busy", False):
            await trio.sleep(0.001)

    async def _snap_install(self, core: RaftCore) -> None:
        """Between two Readys: make the log start after the installed snapshot and tell
        the core."""
        ready = self._install_ready
        assert ready is not None
        self._install_ready = None
        frm, meta = ready
        try:
            base = base_of(meta)
            lg = self.log
            s = meta.seq
            if not (lg.first_seq - 1 <= s <= lg.seq and lg.term_at(s) == meta.term):
                # Say first that the log is about to hold nothing of ours: a crash inside
                # the reset must not look like a log deleted by hand (``_snapshot_open``).
                hs = core.hard_state
                if hs.has_log:
                    await self._state.save(encode_hard_state(replace(hs, has_log=False)))
                await lg.reset(s, meta.term)
                self._cache.clear()
                self._cache_bytes = 0
            core.snapshot_installed(base, frm, (meta.crc, meta.size))
            if s > self._apply_seq:
                self._apply_seq = s
                self._applied_term = meta.term
                self._applied_config = (base.config_seq, base.config_term, base.config)
            if s > self._commit_seq:
                self._commit_seq = s
            self._snap_last = max(self._snap_last, s)
            self.snapshots_installed += 1
        finally:
            self._installing = False
            self._restoring = False
            self._apply_changed.set()
            self._apply_changed = trio.Event()
        self.events.emit("snapshot", seq=meta.seq, term=meta.term, size=meta.size,
                         installed=True, leader=frm)
        log.info("tinyraftplus node %r: installed snapshot %d (%d bytes) from %r",
                 self.node_id, meta.seq, meta.size, frm)


__all__ = ["NodeSnapshots", "base_of"]
