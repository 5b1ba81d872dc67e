"""``StateFile``: a small blob (Raft's current term and vote) replaced atomically.

File layout (little-endian): magic ``b"TPSTATE1"``, u32 payload length, u32 CRC32C of the
payload, payload. ``save`` writes ``PATH.tmp``, fdatasyncs it, renames it over ``PATH`` and
fsyncs the directory, so after a crash ``PATH`` holds either the old or the new contents,
whole. ``load`` checks the CRC: a damaged file raises ``LogCorruptError`` rather than
returning a term or vote that was never written (which could let a node vote twice).
"""

from __future__ import annotations

import os
import struct

import trio

from .._native import lib
from ..errors import InvalidArgumentError, LogCorruptError
from . import fileops
from .fileops import fsync_dir

_MAGIC = b"TPSTATE1"
_HDR = struct.Struct("<8sII")


class StateFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def load(self) -> bytes | None:
        """The saved bytes, or None if nothing was ever saved."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        if len(raw) < _HDR.size:
            raise LogCorruptError(
                f"state file {self.path} is {len(raw)} bytes, shorter than its header; "
                "restore it or delete it only if this node may lose its vote",
                path=self.path,
                offset=0,
            )
        magic, n, crc = _HDR.unpack_from(raw)
        body = raw[_HDR.size :]
        if magic != _MAGIC:
            raise LogCorruptError(f"state file {self.path}: bad magic", path=self.path, offset=0)
        if len(body) != n or lib.tp_crc32c(0, body, n) != crc:
            raise LogCorruptError(
                f"state file {self.path}: length or CRC32C mismatch (damaged); restore it",
                path=self.path,
                offset=_HDR.size,
            )
        return body

    async def save(self, data: bytes) -> None:
        """Replace the contents atomically and durably."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgumentError(f"StateFile.save takes bytes, got {type(data).__name__}")
        await trio.to_thread.run_sync(self._save_sync, bytes(data))

    def _save_sync(self, data: bytes) -> None:
        tmp = self.path + ".tmp"
        fd = fileops.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            blob = _HDR.pack(_MAGIC, len(data), lib.tp_crc32c(0, data, len(data))) + data
            fileops.write_all(fd, blob)
            fileops.fdatasync(fd)
        finally:
            os.close(fd)
        fileops.replace(tmp, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
