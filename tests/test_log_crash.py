"""Crash test for ``FsLog``: SIGKILL a writer at random moments, reopen, check everything.

A child process (``tests/crash_writer.py``) appends concurrently (single appends, batches,
transactions, aborted transactions) to a log with small segments and reports every
acknowledgement over a pipe. This test kills it with a real ``SIGKILL`` at random moments:
before or during ``open()``, during its very first appends, right after a segment file
appears (a roll in progress) and after a random number of acknowledgements. After each kill
it reopens the log in this process and checks:

* every acknowledged record is present, at its acknowledged seq, with its exact bytes;
* every record the log returns is one a child wrote (payloads regenerate from their own
  header, so even unacknowledged records are checked byte for byte), with the right term;
* no partial batch or transaction is visible, and no aborted transaction at all;
* seqs are contiguous, each task's operations appear in the order it issued them, and no
  operation appears twice;
* whatever a previous reopen saw is still there, unchanged (recovery is stable);
* ``seq``, ``head``, ``head_term``, ``read()`` agree with ``iter()``;
* the next child continues on the same log (its ``open()`` sees the same state).

The seed is printed on failure; rerun one with ``TRP_CRASH_SEED=<seed>``. ``TRP_CRASH_KILLS``
changes the number of kills (the slow variant does 400).
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

_HERE = Path(__file__).resolve().parent
_WRITER = _HERE / "crash_writer.py"
_spec = importlib.util.spec_from_file_location("_trp_crash_writer", _WRITER)
assert _spec is not None and _spec.loader is not None
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)

from tinyraftplus.errors import LogLockedError  # noqa: E402
from tinyraftplus.log import FsLog  # noqa: E402

NAME = "crashlog"
SEGMENT_SIZE = 16 << 10  # records are 30 B - 1 KiB: a roll every ~30 records (~5 per kill)


@dataclass
class Known:
    """What the parent knows about the log across generations."""

    # seq -> (gen, op, kind, count, idx): acknowledged by a child or seen after a reopen.
    by_seq: dict[int, tuple[int, int, str, int, int]] = field(default_factory=dict)
    acked: int = 0
    aborted: set[tuple[int, int]] = field(default_factory=set)
    last_seq: int = -1
    # Memo of parse_payload (a pure function of the bytes): every check rereads the whole log,
    # so without it most of a check is regenerating payloads that were verified before.
    parsed: dict[bytes, tuple[int, int, str, int, int]] = field(default_factory=dict)


def _child_env() -> dict[str, str]:
    import tinyraftplus

    env = dict(os.environ)
    root = str(Path(tinyraftplus.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _segment_count(directory: Path) -> int:
    try:
        return sum(1 for p in directory.rglob("*") if p.is_file())
    except FileNotFoundError:
        return 0


class _Reports:
    """Reads the child's line reports from the pipe; records acks in ``known``."""

    def __init__(self, stream: trio.lowlevel.FdStream, gen: int, known: Known) -> None:
        self.stream = stream
        self.gen = gen
        self.known = known
        self.buf = b""
        self.ready: tuple[int, int] | None = None
        self.acks = 0
        self.eof = False

    def _line(self, line: bytes) -> None:
        parts = line.decode().split()
        if parts[0] == "R":
            self.ready = (int(parts[1]), int(parts[2]))
        elif parts[0] == "A":
            op, first, count = int(parts[1]), int(parts[2]), int(parts[3])
            for i in range(count):
                seq = first + i
                # The same kind is used for every record of an op; recover it from the task.
                prev = self.known.by_seq.get(seq)
                entry = (self.gen, op, "?", count, i)
                if prev is not None and prev[:2] != (self.gen, op):
                    raise AssertionError(
                        f"gen {self.gen}: op {op} acknowledged at seq {seq}, which already "
                        f"holds gen {prev[0]} op {prev[1]}"
                    )
                self.known.by_seq[seq] = prev if prev is not None else entry
            self.known.acked += count
            self.acks += 1
        elif parts[0] == "X":
            self.known.aborted.add((self.gen, int(parts[1])))
        else:
            raise AssertionError(f"unexpected report from child: {line!r}")

    async def pump(self) -> bool:
        """Read what is available (waits for at least one chunk); False at EOF."""
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            self._line(line)
        return True

    async def drain(self) -> None:
        while await self.pump():
            pass
        if self.buf:
            # A partial line can only be a report cut by the kill; os.write of one short line
            # to a pipe is atomic, so this would be a bug in the test itself.
            raise AssertionError(f"partial report line from child: {self.buf!r}")


@dataclass
class _Child:
    gen: int
    proc: trio.Process
    reports: _Reports
    errpath: Path

    def stderr(self) -> str:
        return self.errpath.read_text(errors="replace")


async def _spawn(tmp: Path, gen: int, seed: int, known: Known) -> _Child:
    """Start a child; it imports everything, then waits for ``go`` on stdin before it opens
    the log, so its interpreter start overlaps the parent's check of the previous one."""
    read_fd, write_fd = os.pipe()
    errpath = tmp / f"child-{gen}.err"
    errlog = open(errpath, "wb")  # noqa: SIM115
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, str(_WRITER), str(tmp / "log"), NAME, str(gen), str(seed),
             str(SEGMENT_SIZE), str(write_fd)],
            pass_fds=(write_fd,),
            stdin=subprocess.PIPE,
            stdout=errlog,
            stderr=errlog,
            env=_child_env(),
        )
    finally:
        os.close(write_fd)
        errlog.close()
    return _Child(gen, proc, _Reports(trio.lowlevel.FdStream(read_fd), gen, known), errpath)


async def _reap(child: _Child) -> None:
    if child.proc.returncode is None:
        child.proc.kill()
        await child.proc.wait()
    await child.reports.stream.aclose()
    if child.proc.stdin is not None:
        await child.proc.stdin.aclose()


async def _drive(child: _Child, rng: random.Random, known: Known) -> tuple[str, str]:
    """Let the child open the log and append; SIGKILL it at a moment chosen by ``rng``."""
    gen, proc, reports = child.gen, child.proc, child.reports
    directory = child.errpath.parent / "log"
    mode = rng.choices(
        ["startup", "first", "roll", "acks", "acks"], weights=[1, 2, 3, 3, 3]
    )[0]
    how = mode
    assert proc.stdin is not None
    try:
        with trio.fail_after(30):
            await proc.stdin.send_all(b"go\n")
            if mode == "startup":
                # Anywhere from before open() through its recovery scan to the first appends.
                delay = rng.uniform(0.0, 0.15)
                with trio.move_on_after(delay):
                    while reports.ready is None and await reports.pump():
                        pass
                how = f"startup+{delay * 1000:.1f}ms"
            else:
                while reports.ready is None:
                    if not await reports.pump():
                        break
                if mode == "first":
                    # During the very first appends after open().
                    delay = rng.choice((0.0, rng.uniform(0.0, 0.005)))
                    await trio.sleep(delay)
                    how = f"first+{delay * 1000:.1f}ms"
                elif mode == "roll":
                    # Right after a new segment file appears: the roll is in progress or just
                    # done, with appends racing it.
                    target = _segment_count(directory) + rng.randint(1, 3)
                    extra = rng.choice((0.0, 0.0, rng.uniform(0.0, 0.002)))
                    deadline = trio.current_time() + 5
                    while _segment_count(directory) < target and trio.current_time() < deadline:
                        await trio.sleep(0.0002)
                    if extra:
                        await trio.sleep(extra)
                    how = f"roll(files>={target})+{extra * 1000:.1f}ms"
                else:
                    want = rng.randint(1, 250)
                    while reports.acks < want and await reports.pump():
                        pass
                    how = f"after {reports.acks} acks"
            if proc.returncode is not None:
                raise AssertionError(
                    f"gen {gen}: child exited by itself ({how}):\n{child.stderr()}"
                )
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await reports.drain()
    finally:
        await _reap(child)
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(
            f"gen {gen}: child ended with {proc.returncode} ({how}):\n{child.stderr()}"
        )
    if reports.ready is not None and reports.ready[0] != known.last_seq:
        raise AssertionError(
            f"gen {gen}: the child opened the log at seq {reports.ready[0]}, but the last "
            f"check saw seq {known.last_seq}"
        )
    return mode, how


async def _check(directory: Path, known: Known, context: str) -> int:
    """Reopen the log in-process and check it against ``known``; returns warnings seen."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = FsLog(str(directory), NAME, segment_size=SEGMENT_SIZE, fsync=True)
        await log.open()
    try:
        entries = [e async for e in log.iter(0)]
        assert log.first_seq == 0, f"{context}: first_seq is {log.first_seq}, nothing compacted"
        seqs = [e.seq for e in entries]
        assert seqs == list(range(len(entries))), f"{context}: seqs not contiguous from 0"
        assert log.seq == len(entries) - 1, f"{context}: log.seq {log.seq} != {len(entries) - 1}"
        if entries:
            assert log.head == entries[-1].data, f"{context}: head differs from the last entry"
            assert log.head_term == entries[-1].term, f"{context}: head_term differs"
        else:
            assert log.head is None, f"{context}: empty log has head {log.head!r}"

        parsed: list[tuple[int, int, str, int, int]] = []
        memo = known.parsed
        for e in entries:
            fields = memo.get(e.data)
            if fields is None:
                try:
                    fields = cw.parse_payload(e.data)
                except ValueError as exc:
                    raise AssertionError(
                        f"{context}: seq {e.seq} holds bad bytes: {exc}") from None
                memo[e.data] = fields
            assert e.term == fields[0], f"{context}: seq {e.seq} term {e.term} != gen {fields[0]}"
            parsed.append(fields)

        # Whole operations only, in order, once each, never aborted ones.
        seen_ops: set[tuple[int, int]] = set()
        last_op_of_task: dict[tuple[int, int], int] = {}
        i = 0
        while i < len(parsed):
            gen, op, kind, count, idx = parsed[i]
            key = (gen, op)
            assert kind not in cw.ABORTED_KINDS, f"{context}: aborted txn {key} visible at {i}"
            assert key not in seen_ops, f"{context}: op {key} appears twice (again at seq {i})"
            assert idx == 0, f"{context}: op {key} starts at seq {i} with record {idx}/{count}"
            for j in range(count):
                assert i + j < len(parsed), (
                    f"{context}: partial {kind} op {key}: {len(parsed) - i} of {count} records"
                )
                assert parsed[i + j] == (gen, op, kind, count, j), (
                    f"{context}: partial/interleaved {kind} op {key} at seq {i + j}: "
                    f"found {parsed[i + j]}"
                )
            task = (gen, op // cw.TASK_STRIDE)
            n = op % cw.TASK_STRIDE
            assert last_op_of_task.get(task, -1) < n, f"{context}: task {task} op order broken"
            last_op_of_task[task] = n
            seen_ops.add(key)
            i += count
        assert not (seen_ops & known.aborted), f"{context}: aborted txns visible"

        # Everything acknowledged or previously seen is still there with the same bytes.
        for seq, (gen, op, _kind, count, idx) in known.by_seq.items():
            assert seq < len(parsed), (
                f"{context}: acknowledged seq {seq} (gen {gen} op {op}) lost; log ends at "
                f"{len(parsed) - 1}"
            )
            got = parsed[seq]
            assert (got[0], got[1], got[3], got[4]) == (gen, op, count, idx), (
                f"{context}: seq {seq} should be gen {gen} op {op} record {idx}/{count}, "
                f"found {got}"
            )
        # read() agrees with iter() on a sample, including both ends.
        rng = random.Random(len(entries))
        sample = {0, len(entries) - 1, *rng.sample(range(len(entries)), min(40, len(entries)))}
        for seq in sorted(s for s in sample if 0 <= s < len(entries)):
            assert await log.read(seq) == entries[seq], f"{context}: read({seq}) != iter"

        for seq, fields in enumerate(parsed):
            known.by_seq[seq] = fields
        known.last_seq = len(entries) - 1
    finally:
        await log.close()
    # Recovery may warn about a torn tail (counted for the summary); leaked files are not ours.
    return sum(1 for w in caught if not issubclass(w.category, ResourceWarning))


async def _crash_loop(tmp: Path, kills: int, seed: int) -> None:
    rng = random.Random(seed)
    known = Known()
    directory = tmp / "log"
    directory.mkdir(parents=True)  # FsLog wants DIR to exist; it creates DIR/NAME itself
    modes: dict[str, int] = {}
    torn = 0
    driving = checking = 0.0
    fresh_tail = 0
    started = time.monotonic()
    child = await _spawn(tmp, 1, rng.randrange(1 << 30), known)
    try:
        for gen in range(1, kills + 1):
            t0 = time.monotonic()
            mode, how = await _drive(child, rng, known)
            t1 = time.monotonic()
            driving += t1 - t0
            modes[mode] = modes.get(mode, 0) + 1
            if gen < kills:
                child = await _spawn(tmp, gen + 1, rng.randrange(1 << 30), known)
            if not (directory / NAME).exists():
                continue  # killed before open() created the log's directory
            segs = sorted((directory / NAME).glob("*.seg"))
            if segs and segs[-1].stat().st_size < 2048:
                fresh_tail += 1  # killed within a few records of a roll
            torn += await _check(directory, known, f"after kill {gen} ({how})")
            checking += time.monotonic() - t1
    finally:
        await _reap(child)

    # Appends continue in-process after the last crash, and survive a clean reopen.
    log = FsLog(str(directory), NAME, segment_size=SEGMENT_SIZE, fsync=True)
    async with log:
        gen = kills + 1
        first = await log.append(cw.make_payload(gen, 0, cw.SINGLE, 1, 0), term=gen)
        assert first == known.last_seq + 1, f"append after the crashes got seq {first}"
        items = [cw.make_payload(gen, 1, cw.BATCH, 3, i) for i in range(3)]
        assert await log.append_batch(items, term=gen) == first + 1
        # A second opener of the same log is refused while this one holds it.
        with pytest.raises(LogLockedError):
            other = FsLog(str(directory), NAME, segment_size=SEGMENT_SIZE)
            await other.open()
    known.by_seq[first] = (gen, 0, cw.SINGLE, 1, 0)
    for i in range(3):
        known.by_seq[first + 1 + i] = (gen, 1, cw.BATCH, 3, i)
    await _check(directory, known, "after the final clean reopen")
    assert known.acked > kills, f"only {known.acked} acknowledged records in {kills} runs"
    files = sorted(p.name for p in directory.rglob("*") if p.is_file())
    print(
        f"crash test: seed {seed}, {kills} kills in {time.monotonic() - started:.1f}s "
        f"({driving:.1f}s in children, {checking:.1f}s checking), "
        f"{known.acked} acked records, {known.last_seq + 1} in the log, {len(files)} files, "
        f"{torn} recovery warnings, {fresh_tail} kills with a tail segment under 2 KiB, "
        f"kill modes {modes}"
    )


def _seed() -> int:
    env = os.environ.get("TRP_CRASH_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


async def _run_with_seed(tmp: Path, kills: int) -> None:
    seed = _seed()
    try:
        await _crash_loop(tmp, kills, seed)
    except BaseException:
        print(f"\n*** crash test failed with seed {seed}: rerun with TRP_CRASH_SEED={seed}")
        raise


async def test_sigkill_during_appends_batches_txns_and_rolls(tmp_path: Path) -> None:
    kills = int(os.environ.get("TRP_CRASH_KILLS", "50"))
    assert kills >= 1
    await _run_with_seed(tmp_path, kills)


@pytest.mark.slow
async def test_sigkill_soak(tmp_path: Path) -> None:
    """400 kills as 8 runs of 50 on fresh logs: one log through 400 kills grows until each
    check (which reads it all) takes seconds, and the soak is about many kills, not size."""
    for i in range(8):
        await _run_with_seed(tmp_path / f"run{i}", 50)
