"""A node's local task queue, journaled in the data directory so it survives an agent restart.

The journal is a log of key -> value changes (put, delete); replaying it gives
the live map. Values are plain CBOR (maps, arrays, ints, text, bytes, bools:
what `agent.wire.loads_strict` accepts), keys are text of at most 64 characters.

File format: records framed as in the raft WAL (`agent.io.store`: little-endian
u32 length, u32 zlib.crc32 of the payload, payload), payloads CBOR arrays::

    HEADER [0, "meshagent-journal", 1]    first record of the file
    PUT    [1, key, value]
    DELETE [2, key]

Why losing a tail is acceptable: every queue entry also lives in its task's
replicated record, and the coordinator's periodic check finds an entry this
node no longer has and places it again. So on open, the first short, corrupt or
malformed record ends the journal: the file is cut there (logged with the file
and offset, counted in `repaired_bytes`) and the agent carries on. That is
also what a power cut in the middle of a write looks like. A file that does not
start with our header (a newer format, or garbage) is cut to nothing the same
way.

Group commit: put() and delete() only buffer; flush() writes the buffer with
one write() and one fsync. When the file has grown past COMPACT_BYTES and more
than half its records are dead (overwritten or deleted), flush() instead
rewrites the whole file from memory: temp file, fsync, rename, fsync of the
directory (the buffered changes are already in memory, so nothing is appended
first). After a failed write the file's tail is unknown (fsyncgate), so the
next flush() rewrites the file the same way instead of appending.

Not locked: the data directory is already held by one agent (the raft store's
LOCK file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import cbor2

from agent.io.store import _FRAME, _frame, _write_all
from agent.messages import BadMessage
from agent.wire import loads_strict

log = logging.getLogger(__name__)

MAGIC, FORMAT_VERSION = "meshagent-journal", 1
HEADER, PUT, DELETE = 0, 1, 2
MAX_KEY = 64
MAX_RECORD = 1 << 20  #: a bigger length field is a torn or corrupt frame
MAX_DEPTH = 16
COMPACT_BYTES = 64 << 10  #: rewrite only files past this size (and more than half dead)
TMP_SUFFIX = ".tmp"


@dataclass(frozen=True, slots=True)
class _Bad:
    """The record at `offset` is short, corrupt or malformed: the journal ends there."""

    offset: int
    reason: str


def _header() -> bytes:
    return _frame(cbor2.dumps([HEADER, MAGIC, FORMAT_VERSION]))


def _decode(payload: bytes) -> list:
    try:
        rec = loads_strict(payload, maps=True, max_depth=MAX_DEPTH)
    except BadMessage as e:
        raise ValueError(f"malformed CBOR ({e})") from None
    if type(rec) is not list or not rec or type(rec[0]) is not int:
        raise ValueError("record is not [kind, ...]")
    return rec


def _replay(buf: bytes) -> tuple[dict[str, bytes], int, _Bad | None]:
    """The live map (key -> its framed PUT record) and the number of PUT/DELETE records
    up to the first record that cannot be used, and that record's problem (None: all good)."""
    live: dict[str, bytes] = {}
    records, off, end = 0, 0, len(buf)
    if not end:
        return live, 0, _Bad(0, "empty file (no header)")
    while off < end:
        if end - off < _FRAME.size:
            return live, records, _Bad(off, f"short frame ({end - off} bytes)")
        length, crc = _FRAME.unpack_from(buf, off)
        if not 0 < length <= MAX_RECORD:
            return live, records, _Bad(off, f"bad record length {length}")
        stop = off + _FRAME.size + length
        if stop > end:
            return live, records, _Bad(off, f"short record ({end - off - _FRAME.size} of {length} bytes)")
        payload = buf[off + _FRAME.size : stop]
        if zlib.crc32(payload) != crc:
            return live, records, _Bad(off, "crc mismatch")
        try:
            rec = _decode(payload)
        except ValueError as e:
            return live, records, _Bad(off, str(e))
        if off == 0:
            if rec != [HEADER, MAGIC, FORMAT_VERSION]:
                return live, records, _Bad(0, f"not a version {FORMAT_VERSION} journal header: {rec!r}"[:100])
        elif rec[0] == PUT and len(rec) == 3 and _key_ok(rec[1]):
            live[rec[1]] = buf[off:stop]
            records += 1
        elif rec[0] == DELETE and len(rec) == 2 and _key_ok(rec[1]):
            live.pop(rec[1], None)
            records += 1
        else:
            return live, records, _Bad(off, f"unknown or malformed record {rec[:2]!r}"[:100])
        off = stop
    return live, records, None


def _key_ok(key: object) -> bool:
    return type(key) is str and 0 < len(key) <= MAX_KEY


class Journal:
    """Append-only journal of key -> CBOR value records (put/delete), CRC32 per record. On open a torn or
    corrupt tail is cut at the last good record (counted in `repaired_bytes`, logged with file and offset),
    never stopping the agent: a lost queue entry is found and re-placed by its coordinator. When the file
    exceeds 64 KiB and more than half its records are dead, it is rewritten (temp file, fsync, rename,
    fsync dir). Group commit: put/delete buffer; flush() does one write and one fsync.

    `fsync=False` skips every fsync: for tests and benchmarks only."""

    def __init__(self, path: Path, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = bool(fsync)
        self._fd: int | None = None
        self._live: dict[str, bytes] = {}  # key -> its framed PUT record (what a rewrite writes)
        self._buffer: list[bytes] = []
        self._records = 0  # PUT/DELETE records in the file (header excluded)
        self._size = 0
        self._rewrite_due = False  # a write failed: the tail is unknown, rewrite the file
        self._stats = {"bytes_written": 0, "fsyncs": 0, "repaired_bytes": 0, "compactions": 0}

    @property
    def stats(self) -> dict[str, int]:
        return {**self._stats, "records": self._records, "live": len(self._live)}

    # ------------------------------------------------------------ public

    def open(self) -> dict[str, object]:
        """Live key -> value; creates the file (and parent dir 0750) if missing, cuts a bad tail."""
        if self._fd is not None:
            raise RuntimeError(f"journal {self.path} is already open")
        self._live, self._buffer, self._records, self._size, self._rewrite_due = {}, [], 0, 0, False
        self._make_parent()
        try:
            buf = self.path.read_bytes()
        except FileNotFoundError:
            self._rewrite({})
        else:
            self._load(buf)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        if self._compaction_due():
            self._rewrite(self._live)
        return {k: loads_strict(v[_FRAME.size :], maps=True, max_depth=MAX_DEPTH)[2] for k, v in self._live.items()}

    def put(self, key: str, value: object) -> None:
        """Buffer `key` -> `value` (durable at the next flush). TypeError/ValueError for a key or
        value the journal cannot hold (a caller's bug): nothing is buffered then."""
        self._check_open()
        if not _key_ok(key):
            raise ValueError(f"journal key must be 1-{MAX_KEY} characters of text, got {key!r}"[:120])
        payload = cbor2.dumps([PUT, key, value])
        try:
            loads_strict(payload, maps=True, max_depth=MAX_DEPTH)
        except BadMessage as e:
            raise TypeError(f"journal value for {key!r} is not plain CBOR ({e})") from None
        if len(payload) > MAX_RECORD:
            raise ValueError(f"journal value for {key!r} is {len(payload)} bytes (at most {MAX_RECORD})")
        rec = _frame(payload)
        self._live[key] = rec
        self._buffer.append(rec)

    def delete(self, key: str) -> None:
        """Buffer the removal of `key`; a key that is not live writes nothing."""
        self._check_open()
        if self._live.pop(key, None) is not None:
            self._buffer.append(_frame(cbor2.dumps([DELETE, key])))

    def flush(self) -> None:
        """Make the buffered changes durable: one write and one fsync (nothing when the
        buffer is empty), or one rewrite of the file when compaction is due. An OSError
        propagates (the changes stay in memory; the next flush rewrites the file)."""
        self._check_open()
        if not self._buffer and not self._rewrite_due:
            return
        records = self._records + len(self._buffer)
        if self._rewrite_due or self._compaction_due(records, self._size + sum(map(len, self._buffer))):
            self._rewrite(self._live)
            return
        data = b"".join(self._buffer)
        try:
            _write_all(self._fd, data)
            self._sync(self._fd)
        except OSError as e:
            self._rewrite_due = True
            log.error("journal %s: write failed (%s); the next flush rewrites the file", self.path, e.strerror or e)
            raise
        finally:
            self._buffer.clear()
        self._records = records
        self._size += len(data)
        self._stats["bytes_written"] += len(data)

    def close(self) -> None:
        """Flush and release the file. Idempotent; the fd is released even if the flush fails."""
        if self._fd is None:
            return
        try:
            self.flush()
        finally:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._fd is None:
            raise RuntimeError(f"journal {self.path} is not open: call open() first")

    def _compaction_due(self, records: int | None = None, size: int | None = None) -> bool:
        records = self._records if records is None else records
        size = self._size if size is None else size
        return size > COMPACT_BYTES and records - len(self._live) > records / 2

    def _load(self, buf: bytes) -> None:
        self._live, self._records, bad = _replay(buf)
        self._size = len(buf)
        if bad is not None:
            self._cut(bad, len(buf))
            self._size = bad.offset
            if bad.offset == 0:
                self._rewrite({})

    def _cut(self, bad: _Bad, size: int) -> None:
        dropped = size - bad.offset
        log.warning("journal %s: %s at offset %d: dropped %d bytes (queue entries there are re-placed "
                    "by their coordinators)", self.path, bad.reason, bad.offset, dropped)
        self._stats["repaired_bytes"] += dropped
        if bad.offset:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, bad.offset)
                self._sync(fd)
            finally:
                os.close(fd)

    def _rewrite(self, live: dict[str, bytes]) -> None:
        """Replace the file with the header and one PUT per live key (tmp, fsync, rename, fsync dir)."""
        data = _header() + b"".join(live.values())
        tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                _write_all(fd, data)
                self._sync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            self._sync_dir()
            if self._fd is not None:  # the old fd still points at the replaced file
                old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND)
                os.close(old)
        except OSError as e:
            self._rewrite_due = True
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            log.error("journal %s: rewrite failed (%s)", self.path, e.strerror or e)
            raise
        finally:
            self._buffer.clear()
        self._rewrite_due = False
        if self._size:  # a rewrite of an existing file, not its creation
            self._stats["compactions"] += 1
        self._records, self._size = len(live), len(data)
        self._stats["bytes_written"] += len(data)

    def _make_parent(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._sync_dir(parent.parent)

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)
            self._stats["fsyncs"] += 1

    def _sync_dir(self, directory: Path | None = None) -> None:
        if self.fsync:
            fd = os.open(directory or self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self._stats["fsyncs"] += 1
