"""Durable Raft storage in the data directory: a write-ahead log and snapshot files, for SD cards.

The Raft core (agent.core.raft) holds the log in memory; this store only makes
what the driver hands it durable and gives it back at start. It keeps no copy
of the log: in memory it holds the last index, the hard state, the open
segment and, per segment, its first and highest entry index.

Layout under `directory` (the driver uses `<data_dir>/raft/`)::

    LOCK                                   flock'ed while a store has it open
    wal/<first_index:016x>.wal             log segments, replayed in name order
    snap/<term:016x>-<index:016x>.snap     the newest two snapshots

Record framing (WAL, and the snapshot header)::

    [u32 length][u32 crc32][payload]       little-endian; crc32 = zlib.crc32 of the payload
                                           (plain CRC-32, not CRC-32C: zlib is in every Python)

Payloads are CBOR arrays of the plain subset `agent.wire.loads_strict` accepts
(ints, byte and text strings, arrays), first element the kind::

    HEADER [0, "meshagent-wal", 1, first_index]   first record of every segment
    ENTRY  [1, index, term, entry_kind, data]     a log entry (entry_kind 0 normal, 1 conf)
    STATE  [2, term, vote, commit]                hard state; vote "" = none
    SNAP   [3, index, term]                       a snapshot was saved (see "Snapshots")

A 10-byte command costs 26 bytes on disk at index 1000 (8 framing + 18 CBOR), 32 at index 2**33.

Theory of operation
-------------------
save(hard_state, entries) encodes the batch into one buffer and issues one
write() and one fsync (group commit: the driver batches a whole Ready). Replay
follows etcd's wal: an ENTRY with index i drops every earlier-read entry >= i,
so overwriting a conflicting suffix is just appending. Within a batch, STATE
goes first, so a torn batch never leaves entries of a term the hard state has
not reached.

Durability points follow etcd's `MustSync`: entries and a change of term or
vote are fsynced before save() returns (the driver sends votes and acks only
after that). A change of commit alone is not a durability point (Raft keeps
commit volatile; the leader tells it again): it is held in memory and written
with the next batch, at rotation, or at close(). That spares the leader an
fsync per commit round and a follower one per heartbeat that advances commit.

A segment is rotated when it has reached `segment_bytes`: the new one is
written whole (header, the latest STATE, the batch) to a temp file, fsynced and
renamed, and the directory fsynced (two fsyncs for that save instead of one).
Because each segment repeats the STATE, whole old segments can be deleted.
Segment names only grow: the name is the next new index at rotation, or the
previous name + 1 if an overwrite moved the log back.

load() replays the segments in order and validates every record (length bound,
crc, CBOR shape, entry contiguity). In the LAST segment the first bad or short
record is a torn write from a power cut: the file is truncated there, fsynced,
and the dropped bytes and the reason are kept in `stats`. (A bit flipped in
the middle of the last segment also drops the rest of that segment: no format
can tell that from a torn batch whose later blocks reached the card first.
Raft repairs the log from the leader.) A bad record in any earlier segment is
corruption: StoreCorrupt names the file and offset; committed data is never
dropped silently. A CRC-valid header with another magic or version (a newer
meshagent) is refused with StoreError and nothing is touched.

Snapshots
---------
save_snapshot writes the snapshot file atomically (temp file, fsync, rename,
fsync of the directory), keeps the newest two, then appends a SNAP record to
the WAL. On replay a SNAP record whose index holds an entry of the same term
changes nothing (a local snapshot of the applied state: the entries after it
are its continuation). Otherwise the snapshot came from the leader and the log
was reset to after it (the core's `RaftLog.restore`, which it does exactly
when the terms differ), so the entries read so far after it belong to another
history and are dropped, as the core dropped them. Without this, a follower
that took a leader's snapshot over a conflicting tail would replay that tail
after the snapshot on restart. If the power fails between the rename and the
SNAP record, load() applies the same term check to the loaded snapshot.

Order matters for a Ready that carries a received snapshot: the SNAP record
must precede the Ready's entries (which continue after the snapshot). The
driver passes it along: `save(rd.hard_state, rd.entries, rd.snapshot)` writes
the snapshot file first, then STATE, SNAP and the entries in one WAL write.

compact(index) deletes whole segments, oldest first and never the open one,
whose entries are all <= index and covered by a snapshot. It stops at the
older of the two kept snapshots, so when the newest snapshot turns out
corrupt, falling back to the older one loses nothing.

Errors: StoreError for an unusable directory or a failed write (the message
names the path). After a failed write or fsync the store refuses further
writes (what reached the card is unknown, see "fsyncgate"); restart, and
load() truncates whatever tail was torn. ValueError/TypeError for a caller's
bug (an entry gap, a term going back).

fsync=False skips every fsync (files and directories). UNSAFE: a power cut can
then lose or tear anything, including votes already sent, and can corrupt
segments other than the last. For tests and benchmarks only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cbor2

from agent.core.raft import HardState, Recovered
from agent.core.raft_messages import Entry, EntryKind, SnapshotMeta
from agent.messages import BadMessage
from agent.wire import loads_strict

log = logging.getLogger(__name__)

WAL_DIR, SNAP_DIR, LOCK_FILE = "wal", "snap", "LOCK"
WAL_MAGIC, SNAP_MAGIC, FORMAT_VERSION = "meshagent-wal", "meshagent-snap", 1
HEADER, ENTRY, STATE, SNAP = 0, 1, 2, 3

SEGMENT_BYTES = 4 << 20  #: default rotation size of a WAL segment
MIN_SEGMENT_BYTES = 64  #: tiny segments are for tests of rotation
MAX_RECORD = 4 << 20  #: largest record payload; a bigger length field is a torn or corrupt frame
MAX_SNAP_HEADER = 64 << 10  #: the snapshot header (meta with voters), not its data
MAX_INDEX = 2**63 - 1
KEEP_SNAPSHOTS = 2
TMP_SUFFIX = ".tmp"

_FRAME = struct.Struct("<II")
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})\.wal$")
_SNAP_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.snap$")
_CHUNK = 1 << 20


class StoreError(Exception):
    """The store cannot be used: the directory is unusable, in use, or a write failed.
    The message names the path and why."""


class StoreCorrupt(StoreError):
    """Data that was once durable does not read back: `path`, `offset` (bytes into the file)
    and `reason` say where and what. Not repaired automatically: it may hold committed entries."""

    def __init__(self, path: Path, offset: int, reason: str):
        super().__init__(f"{path} is corrupt at offset {offset}: {reason}")
        self.path, self.offset, self.reason = path, offset, reason


@dataclass(slots=True)
class _Segment:
    first: int  # from the name: the next new index when the segment was started
    path: Path
    max_index: int | None  # highest entry index written into it (None: no entries)


class _BadRecord(Exception):
    """A record failed validation at `offset`; the caller decides: torn tail or corruption."""

    def __init__(self, offset: int, reason: str):
        super().__init__(reason)
        self.offset, self.reason = offset, reason


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def _uint(value: object) -> bool:
    return type(value) is int and 0 <= value <= MAX_INDEX


# ----------------------------------------------------------------- replay


class _Replay:
    """The log as the records read so far describe it (etcd wal semantics)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []  # contiguous
        self.next: int | None = None  # index a new entry would take; None before any entry/reset
        self.state: tuple[int, str | None, int] | None = None
        self.reset_at = 0  # highest snapshot index the log was reset to

    def entry(self, e: Entry) -> str | None:
        """Apply one ENTRY; a reason if it cannot follow what was read."""
        i = e.index
        if self.next is not None and i > self.next:
            return f"entry {i} does not follow {self.next - 1} (entries {self.next}..{i - 1} missing)"
        if self.entries and i < self.next:
            del self.entries[max(0, i - self.entries[0].index) :]
        self.entries.append(e)
        self.next = i + 1
        return None

    def snapshot_mark(self, index: int, term: int) -> None:
        """A snapshot (index, term) was saved here: keep the log if it continues the
        snapshot, else it was reset to after the snapshot (see module doc)."""
        if self.next is None:
            return  # nothing read yet: nothing to reset
        first = self.entries[0].index if self.entries else self.next
        if index < first:
            return  # below everything read: a local snapshot of an already compacted prefix
        if index < self.next and self.entries[index - first].term == term:
            return
        self.entries.clear()
        self.next = index + 1
        self.reset_at = max(self.reset_at, index)


def _decode(payload: bytes) -> list:
    try:
        obj = loads_strict(payload, max_depth=2)
    except BadMessage as e:
        raise ValueError(f"malformed CBOR ({e})") from None
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise ValueError("record is not [kind, ...]")
    return obj


def _entry_from(rec: list) -> Entry:
    if len(rec) != 5:
        raise ValueError("ENTRY record needs 5 fields")
    _, index, term, kind, data = rec
    if not (_uint(index) and index >= 1 and _uint(term) and type(data) is bytes):
        raise ValueError(f"ENTRY fields out of range: index={index!r} term={term!r}")
    try:
        return Entry(index, term, EntryKind(kind), data)
    except ValueError as e:  # includes BadMessage from the core's own validation
        raise ValueError(f"ENTRY {index} rejected: {e}") from None


def _state_from(rec: list) -> tuple[int, str | None, int]:
    if len(rec) != 4:
        raise ValueError("STATE record needs 4 fields")
    _, term, vote, commit = rec
    if not (_uint(term) and type(vote) is str and _uint(commit)):
        raise ValueError("STATE fields out of range")
    return term, vote or None, commit


# ------------------------------------------------------------------ store


class RaftStore:
    """The durable half of a Raft node; see the module doc. Call load() once before anything else."""

    def __init__(self, directory: Path | str, *, segment_bytes: int = SEGMENT_BYTES, fsync: bool = True):
        if not isinstance(segment_bytes, int) or segment_bytes < MIN_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be an int >= {MIN_SEGMENT_BYTES}, got {segment_bytes!r}")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.fsync = bool(fsync)  # False is UNSAFE: see the module doc
        self.stats: dict[str, int | str] = {
            "bytes_written": 0,  # every byte written: WAL records and snapshot files
            "snapshot_bytes_written": 0,  # of which snapshot files
            "fsyncs": 0,  # os.fsync calls, files and directories
            "records_written": 0,
            "entries_written": 0,
            "saves": 0,  # save() calls that wrote (a commit-only change writes nothing)
            "truncated_tail_bytes": 0,
            "last_truncate_reason": "",
            "segments": 0,
            "segments_deleted": 0,
            "snapshots_written": 0,
            "snapshots_corrupt": 0,
            "tmp_files_removed": 0,
        }
        self._wal = self.directory / WAL_DIR
        self._snap = self.directory / SNAP_DIR
        self._open = False
        self._failed: str | None = None
        self._lock_fd: int | None = None
        self._fd: int | None = None  # the last segment, O_APPEND
        self._size = 0  # of the last segment
        self._segments: list[_Segment] = []
        self._snapshots: list[tuple[int, int, Path]] = []  # (index, term, path), newest first
        self._last = 0  # last stored index (or snapshot index when the log is empty after it)
        self._snap_index = 0
        self._hs: tuple[int, str | None, int] = (0, None, 0)
        self._state_unwritten = False  # _hs holds a commit-only change not on disk yet

    # ------------------------------------------------------------ public

    def load(self) -> Recovered:
        """Open the directory (created if missing), repair a torn tail, and return what is stored."""
        if self._open:
            raise RuntimeError("load() called twice on an open store")
        self._failed = None
        try:
            self._prepare_dirs()
            self._lock()
            self._remove_tmp_files()
            self._scan_snapshots()
            meta = self._choose_snapshot()
            replay = self._replay_segments()
            recovered = self._finish(replay, meta)
            self._open_last_segment()
        except OSError as e:
            self._release()
            raise _io_error("open the raft store in", Path(e.filename or self.directory), e) from e
        except BaseException:
            self._release()
            raise
        self._open = True
        self.stats["segments"] = len(self._segments)
        return recovered

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: tuple[SnapshotMeta, bytes] | None = None,
    ) -> None:
        """Make a Ready durable: one WAL write and one fsync, or none at all when nothing must
        be synced. Entries from an index <= the last stored one replace the stored suffix from
        there. `snapshot` (a Ready's received snapshot) is written first, as save_snapshot
        does, and its SNAP record goes into the same WAL write ahead of the entries; pass it
        here (or call save_snapshot before save), never after the entries that follow it."""
        self._check_usable()
        entries = list(entries)
        snap_index, last = self._snap_index, self._last
        if snapshot is not None:
            meta, data = snapshot
            header, data = _snapshot_header(meta, data)
            snap_index, last = max(snap_index, meta.index), max(last, meta.index)
        self._check_entries(entries, last, snap_index)
        hs = self._check_state(hard_state) if hard_state is not None else None
        records = [_frame(cbor2.dumps([ENTRY, e.index, e.term, int(e.kind), e.data])) for e in entries]
        for e, rec in zip(entries, records):
            if len(rec) - _FRAME.size > MAX_RECORD:
                raise ValueError(f"entry {e.index} of {len(rec)} bytes exceeds the record limit of {MAX_RECORD}")
        must_sync = bool(entries)
        if snapshot is not None:
            self._write_snapshot_file(meta, header, data)
            # The SNAP record: on replay it drops a tail this snapshot replaced (see module doc).
            records.insert(0, _frame(cbor2.dumps([SNAP, meta.index, meta.term])))
            self._snap_index, self._last = snap_index, last
            must_sync = True
        if hs is not None and hs != self._hs:
            must_sync = must_sync or hs[:2] != self._hs[:2]  # term or vote: before any message goes out
            self._hs = hs
            self._state_unwritten = True
        if not must_sync:
            return
        self._write(records)
        self.stats["saves"] += 1
        if entries:
            self._last = entries[-1].index
            seg = self._segments[-1]
            seg.max_index = max(seg.max_index or 0, self._last)
            self.stats["entries_written"] += len(entries)

    def save_snapshot(self, meta: SnapshotMeta, data: bytes) -> None:
        """Store a snapshot atomically (tmp, fsync, rename, fsync dir), keep the newest two, and
        mark it in the WAL (one more fsync). For a Ready's snapshot, see save()."""
        self.save(None, [], (meta, data))

    def load_snapshot(self) -> tuple[SnapshotMeta, bytes] | None:
        """The newest valid snapshot with its data; a corrupt one is renamed *.corrupt, counted,
        and the older one is used."""
        self._check_open()
        while self._snapshots:
            index, term, path = self._snapshots[0]
            try:
                return self._read_snapshot(path, index, term, want_data=True)
            except StoreCorrupt as e:
                self._set_aside_snapshot(path, e)
            except OSError as e:
                raise _io_error("read snapshot", path, e) from e
        return None

    def compact(self, index: int) -> None:
        """Delete whole WAL segments whose entries are all <= index, as far as a kept snapshot
        covers them (up to the older of the two kept snapshots, so falling back to it stays
        possible). The open segment is never deleted."""
        self._check_usable()
        if not self._snapshots:
            return
        cover = self._snapshots[min(1, len(self._snapshots) - 1)][0]
        bound = min(index, cover)
        doomed: list[_Segment] = []
        for seg in self._segments[:-1]:
            if seg.max_index is not None and seg.max_index > bound:
                break
            doomed.append(seg)
        for seg in doomed:
            # Oldest first, each unlink made durable before the next: whatever a power cut
            # leaves is a suffix of the segments, never one with a hole in the middle.
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(seg.path)
                self._sync_dir(self._wal)
            except OSError as e:  # the WAL stays valid; the next compact tries again
                log.warning("raft store: cannot delete %s: %s", seg.path, e.strerror or e)
                break
            self._segments.pop(0)
            self.stats["segments_deleted"] += 1
        self.stats["segments"] = len(self._segments)

    def bytes_per_commit(self, commits: int) -> float:
        """Bytes written to the card (WAL and snapshots) per committed entry, for the
        driver's wear report; 0.0 before the first commit."""
        return self.stats["bytes_written"] / commits if commits > 0 else 0.0

    @property
    def last_index(self) -> int:
        return self._last

    def close(self) -> None:
        """Write a held commit-only change (fsynced), then release the files. Idempotent."""
        try:
            if self._open and self._failed is None and self._state_unwritten:
                with contextlib.suppress(StoreError):
                    self._write([])
        finally:
            self._open = False
            self._release()

    def __enter__(self) -> RaftStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ checks

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("the raft store is not open: call load() first")

    def _check_usable(self) -> None:
        self._check_open()
        if self._failed is not None:
            raise StoreError(f"{self.directory}: a write failed earlier ({self._failed}); restart to recover")

    def _check_entries(self, entries: list[Entry], last: int, snap_index: int) -> None:
        """Our bug, not bad input: a gap or a rewrite below the snapshot would lose entries."""
        if not entries:
            return
        for e in entries:
            if not (_uint(e.index) and e.index >= 1 and _uint(e.term)):
                raise ValueError(f"entry index/term out of range: {e.index!r}/{e.term!r}")
            if not isinstance(e.data, bytes):
                raise TypeError(f"entry {e.index} data must be bytes, got {type(e.data).__name__}")
        for prev, e in zip(entries, entries[1:]):
            if e.index != prev.index + 1:
                raise ValueError(f"entries not contiguous: {prev.index} is followed by {e.index}")
        first = entries[0].index
        if first > last + 1:
            raise ValueError(
                f"entries start at {first} but the last stored index is {last}: "
                f"entries {last + 1}..{first - 1} would be missing"
            )
        if first <= snap_index:
            raise ValueError(f"entry {first} rewrites the log at or below the snapshot index {snap_index}")

    def _check_state(self, hs: HardState) -> tuple[int, str | None, int]:
        term, vote, commit = hs.term, hs.vote, hs.commit
        if not (_uint(term) and _uint(commit)) or not (vote is None or (isinstance(vote, str) and vote)):
            raise ValueError(f"bad hard state {hs!r}")
        old_term, old_vote, _ = self._hs
        if term < old_term:
            raise ValueError(f"hard state term goes back from {old_term} to {term}")
        if term == old_term and old_vote is not None and vote != old_vote:
            raise ValueError(f"vote in term {term} changes from {old_vote!r} to {vote!r}")
        return term, vote, commit

    # ------------------------------------------------------------ writing

    def _state_record(self) -> bytes:
        term, vote, commit = self._hs
        return _frame(cbor2.dumps([STATE, term, vote or "", commit]))

    def _write(self, records: list[bytes]) -> None:
        """Append the records (after a held STATE) in one write, rotating first if the
        segment is full; a failure leaves the store refusing writes."""
        if self._state_unwritten:
            records = [self._state_record(), *records]
        try:
            if self._size >= self.segment_bytes:
                n = self._rotate(records)
            else:
                data = b"".join(records)
                _write_all(self._fd, data)
                self._size += len(data)
                self._sync(self._fd)
                n = len(data)
        except OSError as e:
            self._fail(_io_error("write", self._segments[-1].path, e))
        self._state_unwritten = False
        self.stats["bytes_written"] += n
        self.stats["records_written"] += len(records)

    def _rotate(self, records: list[bytes]) -> int:
        """Start a new segment holding header, latest STATE and the batch (tmp, fsync, rename,
        fsync dir); returns the bytes written."""
        first = max(self._last + 1, self._segments[-1].first + 1)
        head = [_frame(cbor2.dumps([HEADER, WAL_MAGIC, FORMAT_VERSION, first]))]
        if self._hs != (0, None, 0) and not self._state_unwritten:
            head.append(self._state_record())  # the held STATE, if any, is already in records
        data = b"".join(head + records)
        path = self._create_segment(first, data)
        os.close(self._fd)
        self._fd = None
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._size = len(data)
        self._segments.append(_Segment(first, path, None))
        self.stats["segments"] = len(self._segments)
        self.stats["records_written"] += len(head)
        return len(data)

    def _create_segment(self, first: int, data: bytes) -> Path:
        path = self._wal / f"{first:016x}.wal"
        tmp = path.with_name(path.name + TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            _write_all(fd, data)
            self._sync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._sync_dir(self._wal)
        return path

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)
            self.stats["fsyncs"] += 1

    def _sync_dir(self, directory: Path) -> None:
        if self.fsync:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.stats["fsyncs"] += 1

    def _fail(self, error: StoreError) -> None:
        self._failed = str(error)
        log.error("raft store: %s; refusing further writes", error)
        raise error

    # ------------------------------------------------------------ opening

    def _prepare_dirs(self) -> None:
        for d in (self.directory, self._wal, self._snap):
            if not d.is_dir():
                try:
                    d.mkdir(mode=0o750, parents=True, exist_ok=True)
                except OSError as e:
                    raise _io_error("create", d, e) from e
                self._sync_dir(d.parent)
            if not os.access(d, os.W_OK | os.X_OK):
                raise StoreError(f"cannot write {d}: permission denied (owner uid {d.stat().st_uid}, "
                                 f"mode {d.stat().st_mode & 0o777:o}; we run as uid {os.geteuid()})")

    def _lock(self) -> None:
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(f"{self.directory} is in use by another raft store (lock {path})") from None
        self._lock_fd = fd

    def _release(self) -> None:
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _remove_tmp_files(self) -> None:
        """Temp files are writes that never got renamed: never durable, never acknowledged."""
        for d in (self._wal, self._snap):
            for p in d.iterdir():
                if p.name.endswith(TMP_SUFFIX):
                    log.info("raft store: removing unfinished %s", p)
                    p.unlink()
                    self.stats["tmp_files_removed"] += 1

    def _scan_snapshots(self) -> None:
        found = []
        for p in self._snap.iterdir():
            m = _SNAP_NAME.match(p.name)
            if m:
                found.append((int(m.group(2), 16), int(m.group(1), 16), p))
            elif p.suffix == ".snap":
                log.warning("raft store: ignoring %s (not a snapshot name)", p)
        self._snapshots = sorted(found, key=lambda s: (s[0], s[1]), reverse=True)

    def _choose_snapshot(self) -> SnapshotMeta | None:
        """The newest snapshot whose whole file checks out (data crc streamed, not kept)."""
        while self._snapshots:
            index, term, path = self._snapshots[0]
            try:
                meta, _ = self._read_snapshot(path, index, term, want_data=False)
                return meta
            except StoreCorrupt as e:
                self._set_aside_snapshot(path, e)
        return None

    def _set_aside_snapshot(self, path: Path, e: StoreCorrupt) -> None:
        bad = path.with_name(path.name + ".corrupt")
        log.error("raft store: %s; renamed to %s, falling back to an older snapshot", e, bad.name)
        try:
            os.replace(path, bad)  # kept for inspection, out of the way of pruning
        except OSError as err:
            log.error("raft store: cannot rename %s: %s", path, err.strerror or err)
        self.stats["snapshots_corrupt"] += 1
        self._snapshots.pop(0)

    def _read_snapshot(self, path: Path, index: int, term: int, *, want_data: bool) -> tuple[SnapshotMeta, bytes | None]:
        with open(path, "rb") as f:
            head = f.read(_FRAME.size)
            if len(head) < _FRAME.size:
                raise StoreCorrupt(path, 0, "short header")
            length, crc = _FRAME.unpack(head)
            if not 0 < length <= MAX_SNAP_HEADER:
                raise StoreCorrupt(path, 0, f"bad header length {length}")
            payload = f.read(length)
            if len(payload) < length or zlib.crc32(payload) != crc:
                raise StoreCorrupt(path, _FRAME.size, "header crc mismatch or short header")
            try:
                rec = loads_strict(payload, max_depth=2)
                magic, version, m_index, m_term, voters, size, data_crc = rec
            except (BadMessage, TypeError, ValueError):
                raise StoreCorrupt(path, _FRAME.size, "header is not a snapshot header") from None
            if magic != SNAP_MAGIC or version != FORMAT_VERSION:
                raise StoreError(f"{path}: not a version {FORMAT_VERSION} meshagent snapshot ({magic!r}, {version!r})")
            if (m_index, m_term) != (index, term):
                raise StoreCorrupt(path, _FRAME.size, f"header ({m_index!r}, {m_term!r}) does not match its name")
            if type(voters) is not list or not all(type(v) is str for v in voters) or not _uint(size):
                raise StoreCorrupt(path, _FRAME.size, "header fields out of range")
            chunks, running, got = [], 0, 0
            while chunk := f.read(_CHUNK):
                running = zlib.crc32(chunk, running)
                got += len(chunk)
                if want_data:
                    chunks.append(chunk)
                if got > size:
                    break
            if got != size or running != data_crc:
                raise StoreCorrupt(path, _FRAME.size + length, f"data crc mismatch or {got} bytes instead of {size}")
        try:
            meta = SnapshotMeta(index, term, tuple(voters))
        except ValueError as e:
            raise StoreCorrupt(path, _FRAME.size, f"meta rejected: {e}") from None
        return meta, (b"".join(chunks) if want_data else None)

    def _write_snapshot_file(self, meta: SnapshotMeta, header: bytes, data: bytes) -> None:
        path = self._snap / f"{meta.term:016x}-{meta.index:016x}.snap"
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                _write_all(fd, header)
                _write_all(fd, data)
                self._sync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_dir(self._snap)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _io_error("write snapshot", path, e) from e
        written = len(header) + len(data)
        self.stats["bytes_written"] += written
        self.stats["snapshot_bytes_written"] += written
        self.stats["snapshots_written"] += 1
        self._snapshots = [s for s in self._snapshots if s[2] != path]
        self._snapshots.append((meta.index, meta.term, path))
        self._snapshots.sort(key=lambda s: (s[0], s[1]), reverse=True)
        self._prune_snapshots()

    def _prune_snapshots(self) -> None:
        """Keep the newest two; a file that cannot be deleted now is found again at the next load."""
        for _, _, path in self._snapshots[KEEP_SNAPSHOTS:]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("raft store: cannot delete old snapshot %s: %s", path, e.strerror or e)
                continue
        del self._snapshots[KEEP_SNAPSHOTS:]

    def _replay_segments(self) -> _Replay:
        segments = []
        for p in self._wal.iterdir():
            m = _SEGMENT_NAME.match(p.name)
            if m:
                segments.append(_Segment(int(m.group(1), 16), p, None))
            elif p.suffix == ".wal":
                log.warning("raft store: ignoring %s (not a segment name)", p)
        segments.sort(key=lambda s: s.first)
        replay = _Replay()
        self._segments = []
        for n, seg in enumerate(segments):
            last = n == len(segments) - 1
            buf = seg.path.read_bytes()
            try:
                self._replay_one(seg, buf, replay)
            except _BadRecord as bad:
                if not last:
                    raise StoreCorrupt(seg.path, bad.offset, bad.reason) from None
                self._truncate_tail(seg, bad, len(buf))
                if bad.offset == 0:
                    continue  # the segment held nothing valid: gone
            self._segments.append(seg)
        return replay

    def _replay_one(self, seg: _Segment, buf: bytes, replay: _Replay) -> None:
        off, end = 0, len(buf)
        while off < end:
            if end - off < _FRAME.size:
                raise _BadRecord(off, f"short frame ({end - off} bytes)")
            length, crc = _FRAME.unpack_from(buf, off)
            if not 0 < length <= MAX_RECORD:
                raise _BadRecord(off, f"bad record length {length}")
            if off + _FRAME.size + length > end:
                raise _BadRecord(off, f"short record ({end - off - _FRAME.size} of {length} bytes)")
            payload = buf[off + _FRAME.size : off + _FRAME.size + length]
            if zlib.crc32(payload) != crc:
                raise _BadRecord(off, "crc mismatch")
            try:
                rec = _decode(payload)
                kind = rec[0]
                if off == 0:
                    if kind != HEADER or len(rec) != 4:
                        raise ValueError("segment does not start with a header")
                    if rec[1] != WAL_MAGIC or rec[2] != FORMAT_VERSION:
                        raise StoreError(f"{seg.path}: not a version {FORMAT_VERSION} meshagent WAL "
                                         f"({rec[1]!r}, {rec[2]!r}); refusing to touch it")
                    if rec[3] != seg.first:
                        raise StoreCorrupt(seg.path, 0, f"header says first index {rec[3]!r}, name says {seg.first}")
                elif kind == ENTRY:
                    e = _entry_from(rec)
                    problem = replay.entry(e)
                    if problem:
                        raise ValueError(problem)
                    seg.max_index = max(seg.max_index or 0, e.index)
                elif kind == STATE:
                    replay.state = _state_from(rec)
                elif kind == SNAP:
                    if len(rec) != 3 or not (_uint(rec[1]) and _uint(rec[2])):
                        raise ValueError("bad SNAP record")
                    replay.snapshot_mark(rec[1], rec[2])
                else:
                    raise ValueError(f"unknown record kind {kind!r}")
            except ValueError as e:
                raise _BadRecord(off, str(e)) from None
            off += _FRAME.size + length

    def _truncate_tail(self, seg: _Segment, bad: _BadRecord, size: int) -> None:
        dropped = size - bad.offset
        reason = f"{bad.reason} at {seg.path.name} offset {bad.offset}: dropped {dropped} bytes"
        log.warning("raft store: torn or bad tail: %s", reason)
        if bad.offset == 0:
            seg.path.unlink()
            self._sync_dir(self._wal)
        else:
            fd = os.open(seg.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, bad.offset)
                self._sync(fd)
            finally:
                os.close(fd)
        self.stats["truncated_tail_bytes"] += dropped
        self.stats["last_truncate_reason"] = reason

    def _finish(self, replay: _Replay, meta: SnapshotMeta | None) -> Recovered:
        snap_index = meta.index if meta else 0
        entries = replay.entries
        if meta and entries and entries[0].index <= snap_index < replay.next:
            if entries[snap_index - entries[0].index].term != meta.term:
                # The snapshot replaced a conflicting tail but its SNAP record never made it.
                log.info("raft store: log after snapshot %d is another history; dropped", snap_index)
                entries = []
        after = [e for e in entries if e.index > snap_index]
        where = self._segments[0].path if self._segments else self._wal
        if after and after[0].index != snap_index + 1:
            raise StoreCorrupt(where, 0, f"the log resumes at {after[0].index} but the snapshot ends at "
                               f"{snap_index}: entries {snap_index + 1}..{after[0].index - 1} are missing")
        if replay.reset_at > snap_index:
            raise StoreCorrupt(where, 0, f"the log was reset to a snapshot at {replay.reset_at} "
                               f"but the newest valid snapshot is at {snap_index}")
        self._snap_index = snap_index
        self._last = after[-1].index if after else snap_index
        term, vote, commit = replay.state or (0, None, 0)
        self._hs = (term, vote, commit)
        self._state_unwritten = False
        commit = max(snap_index, min(commit, self._last))
        return Recovered(HardState(term, vote, commit), meta, after)

    def _open_last_segment(self) -> None:
        if not self._segments:
            first = self._last + 1
            data = _frame(cbor2.dumps([HEADER, WAL_MAGIC, FORMAT_VERSION, first]))
            path = self._create_segment(first, data)
            self.stats["bytes_written"] += len(data)
            self.stats["records_written"] += 1
            self._segments.append(_Segment(first, path, None))
        path = self._segments[-1].path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._size = os.fstat(self._fd).st_size


def _snapshot_header(meta: SnapshotMeta, data: bytes) -> tuple[bytes, bytes]:
    """The framed snapshot header for (meta, data), checked; and data as bytes."""
    if not (_uint(meta.index) and _uint(meta.term)):
        raise ValueError(f"snapshot index/term out of range: {meta.index!r}/{meta.term!r}")
    data = bytes(data)
    voters = list(meta.voters)
    if not all(isinstance(v, str) for v in voters):
        raise TypeError("snapshot voters must be strings")
    header = _frame(cbor2.dumps([SNAP_MAGIC, FORMAT_VERSION, meta.index, meta.term, voters, len(data), zlib.crc32(data)]))
    if len(header) - _FRAME.size > MAX_SNAP_HEADER:
        raise ValueError(f"snapshot header of {len(header)} bytes is too large (too many voters?)")
    return header, data


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """One write() in practice; loops only if the kernel writes short."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _io_error(action: str, path: Path, e: OSError) -> StoreError:
    return StoreError(f"cannot {action} {path}: {e.strerror or e}")
