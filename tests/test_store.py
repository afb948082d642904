"""The Raft store on real files: round trips, torn tails, corruption, rotation, snapshots, fsyncs."""

from __future__ import annotations

import dataclasses
import errno
import os
import random
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.raft import HardState, NotLeader, Raft, RaftSettings, Refused
from agent.core.raft_messages import Entry, EntryKind, InstallSnapshot, SnapshotMeta
from agent.io import store as store_mod
from agent.io.store import RaftStore, StoreCorrupt, StoreError

FRAME = struct.Struct("<II")


def E(index: int, term: int = 1, data: bytes | None = None, kind: EntryKind = EntryKind.NORMAL) -> Entry:
    return Entry(index, term, kind, data if data is not None else f"cmd-{index}".encode())


def meta(index: int, term: int = 1, voters: tuple = ("pi-1", "pi-2", "pi-3")) -> SnapshotMeta:
    return SnapshotMeta(index, term, voters)


def hs_tuple(hs) -> tuple:
    return (hs.term, hs.vote, hs.commit)


@pytest.fixture
def stores():
    """Opens stores and closes every one at teardown (they hold a lock)."""
    opened: list[RaftStore] = []

    def open_store(path: Path, **kw):
        s = RaftStore(path, **kw)
        opened.append(s)
        return s, s.load()

    yield open_store
    for s in opened:
        s.close()


def segments(path: Path) -> list[Path]:
    return sorted((path / "wal").glob("*.wal"))


def frames(buf: bytes) -> list[tuple[int, int, list]]:
    """(offset, end, decoded payload) of every record of a clean segment."""
    out, off = [], 0
    while off < len(buf):
        length, _ = FRAME.unpack_from(buf, off)
        end = off + FRAME.size + length
        out.append((off, end, cbor2.loads(buf[off + FRAME.size : end])))
        off = end
    return out


# --------------------------------------------------------------- round trips


def test_empty_directory_loads_empty_and_creates_layout(tmp_path, stores):
    s, rec = stores(tmp_path / "raft")
    assert hs_tuple(rec.hard_state) == (0, None, 0)
    assert rec.snapshot is None and rec.entries == []
    assert [p.name for p in segments(tmp_path / "raft")] == ["0000000000000001.wal"]
    assert (tmp_path / "raft" / "snap").is_dir()


def test_round_trip_entries_and_hard_state(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "pi-1", 0), [E(1), E(2, data=b""), E(3, kind=EntryKind.CONF, data=b"\xa0conf")])
    s.save(HardState(2, "pi-2", 3), [E(4, 2), E(5, 2)])
    s.close()
    _, rec = stores(tmp_path)
    assert rec.entries == [E(1), E(2, data=b""), E(3, kind=EntryKind.CONF, data=b"\xa0conf"), E(4, 2), E(5, 2)]
    assert hs_tuple(rec.hard_state) == (2, "pi-2", 3)
    assert rec.entries[2].kind is EntryKind.CONF


def test_reopen_after_close_same_instance_and_lock(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, None, 0), [E(1)])
    with pytest.raises(StoreError, match="in use"):
        RaftStore(tmp_path).load()
    s.close()
    s.close()  # idempotent
    rec = s.load()  # the same object opens again
    assert rec.entries == [E(1)]
    s.save(None, [E(2)])
    s.close()
    _, rec = stores(tmp_path)
    assert rec.entries == [E(1), E(2)]


def test_misuse_is_a_clear_programming_error(tmp_path, stores):
    with pytest.raises(RuntimeError, match="load"):
        RaftStore(tmp_path).save(None, [E(1)])
    s, _ = stores(tmp_path)
    with pytest.raises(RuntimeError, match="twice"):
        s.load()
    with pytest.raises(ValueError, match="segment_bytes"):
        RaftStore(tmp_path, segment_bytes=10)


# --------------------------------------------------------- overwrite and gaps


def test_overwrite_replaces_the_stored_suffix(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 0), [E(i) for i in range(1, 6)])
    s.save(HardState(2, "b", 2), [E(3, 2, b"new3"), E(4, 2, b"new4")])  # drops old 3..5
    s.close()
    _, rec = stores(tmp_path)
    assert rec.entries == [E(1), E(2), E(3, 2, b"new3"), E(4, 2, b"new4")]
    assert rec.hard_state.commit == 2


def test_overwrite_then_extend_and_overwrite_across_rotation(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    s.save(HardState(1, "a", 0), [E(i) for i in range(1, 4)])
    for i in range(4, 30):
        s.save(None, [E(i)])
    assert len(segments(tmp_path)) > 3
    s.save(HardState(3, "c", 0), [E(5, 3, b"x")])  # overwrite far back, in a later segment
    s.save(None, [E(6, 3), E(7, 3)])
    s.close()
    _, rec = stores(tmp_path, segment_bytes=128)
    assert rec.entries == [E(1), E(2), E(3), E(4), E(5, 3, b"x"), E(6, 3), E(7, 3)]
    names = [int(p.stem, 16) for p in segments(tmp_path)]
    assert names == sorted(set(names))  # names keep growing even when the log moved back


def test_a_gap_is_our_bug_and_names_the_indexes(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(None, [E(1), E(2), E(3)])
    with pytest.raises(ValueError, match=r"start at 5 .* last stored index is 3: entries 4\.\.4"):
        s.save(None, [E(5)])
    with pytest.raises(ValueError, match="2 is followed by 4"):
        s.save(None, [E(2), E(4)])
    with pytest.raises(ValueError, match="start at 2 .* last stored index is 0"):
        _fresh_gap(tmp_path / "other")
    s.save(None, [E(4)])  # nothing was written by the refused calls
    s.close()
    _, rec = stores(tmp_path)
    assert [e.index for e in rec.entries] == [1, 2, 3, 4]


def _fresh_gap(path: Path) -> None:
    with RaftStore(path) as s:
        s.load()
        s.save(None, [E(2)])


def test_term_going_back_or_vote_changing_in_a_term_is_refused(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(5, "pi-2", 0), [])
    with pytest.raises(ValueError, match="goes back from 5 to 4"):
        s.save(HardState(4, None, 0), [])
    with pytest.raises(ValueError, match="changes from 'pi-2' to 'pi-3'"):
        s.save(HardState(5, "pi-3", 0), [])
    s.save(HardState(6, None, 0), [])  # a new term clears the vote
    s.close()
    _, rec = stores(tmp_path)
    assert hs_tuple(rec.hard_state) == (6, None, 0)


# ------------------------------------------------------------- torn tails


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_torn_write_at_every_byte_of_the_last_record(tmp_path, stores):
    base = tmp_path / "base"
    s, _ = stores(base)
    s.save(HardState(1, "a", 0), [E(1), E(2)])
    start = segments(base)[0].stat().st_size
    s.save(None, [E(3, data=b"0123456789")])
    end = segments(base)[0].stat().st_size
    s.close()
    full = segments(base)[0].read_bytes()
    assert end - start > FRAME.size
    for cut in range(start, end):
        d = tmp_path / f"cut{cut}"
        _copy(base, d)
        seg = segments(d)[0]
        seg.write_bytes(full[:cut])
        st2, rec = stores(d)
        assert rec.entries == [E(1), E(2)], cut  # never a partial record
        assert st2.stats["truncated_tail_bytes"] == cut - start
        assert seg.stat().st_size == start
        if cut > start:
            assert "offset" in st2.stats["last_truncate_reason"]
        st2.save(None, [E(3, data=b"again")])  # writes continue after the clean cut
        st2.close()
        _, rec = stores(d)
        assert rec.entries == [E(1), E(2), E(3, data=b"again")]


def test_torn_batch_recovers_exactly_the_complete_records(tmp_path, stores):
    base = tmp_path / "base"
    s, _ = stores(base)
    s.save(HardState(1, "a", 1), [E(1), E(2)])
    start = segments(base)[0].stat().st_size
    s.save(HardState(2, "b", 2), [E(3, 2), E(4, 2), E(5, 2)])  # one write: STATE then 3 entries
    s.close()
    full = segments(base)[0].read_bytes()
    batch = [(off, end, rec) for off, end, rec in frames(full) if off >= start]
    assert [r[0] for _, _, r in batch] == [2, 1, 1, 1]
    for cut in range(start, len(full) + 1):
        d = _copy(base, tmp_path / f"cut{cut}")
        segments(d)[0].write_bytes(full[:cut])
        _, rec = stores(d)
        done = [r for _, end, r in batch if end <= cut]
        want_state = (2, "b") if done else (1, "a")
        assert (rec.hard_state.term, rec.hard_state.vote) == want_state, cut
        assert [e.index for e in rec.entries] == [1, 2] + [r[1] for r in done[1:]], cut
        assert rec.hard_state.commit <= len(rec.entries)


@pytest.mark.parametrize("tail", [b"\0" * 4096, b"\0" * 5, os.urandom(100), b"\xff" * 8])
def test_zero_filled_or_garbage_tail_is_cut(tmp_path, stores, tail):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 0), [E(1), E(2)])
    s.close()
    seg = segments(tmp_path)[0]
    size = seg.stat().st_size
    with open(seg, "ab") as f:
        f.write(tail)
    s2, rec = stores(tmp_path)
    assert rec.entries == [E(1), E(2)]
    assert s2.stats["truncated_tail_bytes"] == len(tail)
    assert seg.stat().st_size == size


def test_flipped_bit_in_the_middle_of_the_last_segment(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 0), [])
    for i in range(1, 11):
        s.save(None, [E(i)])
    s.close()
    seg = segments(tmp_path)[0]
    buf = bytearray(seg.read_bytes())
    recs = frames(bytes(buf))
    off, end, rec = next(r for r in recs if r[2][0] == 1 and r[2][1] == 5)
    buf[off + FRAME.size + 3] ^= 0x10  # one bit inside entry 5's payload
    seg.write_bytes(bytes(buf))
    s2, got = stores(tmp_path)
    assert got.entries == [E(i) for i in range(1, 5)]
    assert s2.stats["truncated_tail_bytes"] == len(buf) - off
    assert "crc mismatch" in s2.stats["last_truncate_reason"]
    assert f"offset {off}" in s2.stats["last_truncate_reason"]
    s2.save(None, [E(5, data=b"retry")])


def test_flipped_length_field_in_the_last_segment(tmp_path, stores):
    s, _ = stores(tmp_path)
    for i in range(1, 6):
        s.save(None, [E(i)])
    s.close()
    seg = segments(tmp_path)[0]
    buf = bytearray(seg.read_bytes())
    off = next(o for o, _, r in frames(bytes(buf)) if r[0] == 1 and r[1] == 3)
    buf[off + 3] ^= 0x40  # the length's top byte: a huge length
    seg.write_bytes(bytes(buf))
    s2, got = stores(tmp_path)
    assert [e.index for e in got.entries] == [1, 2]
    assert "bad record length" in s2.stats["last_truncate_reason"]


def test_corruption_in_an_older_segment_raises_and_touches_nothing(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    for i in range(1, 40):
        s.save(HardState(1, "a", i - 1), [E(i)])
    s.close()
    segs = segments(tmp_path)
    assert len(segs) >= 3
    victim = segs[1]
    buf = bytearray(victim.read_bytes())
    off = frames(bytes(buf))[2][0]
    buf[off + FRAME.size + 2] ^= 0x01
    victim.write_bytes(bytes(buf))
    sizes = [p.stat().st_size for p in segs]
    with pytest.raises(StoreCorrupt) as err:
        RaftStore(tmp_path, segment_bytes=128).load()
    assert err.value.path == victim and err.value.offset == off
    assert victim.name in str(err.value) and f"offset {off}" in str(err.value)
    assert [p.stat().st_size for p in segs] == sizes
    with pytest.raises(StoreCorrupt):  # not "in use": the failed load released its lock
        RaftStore(tmp_path, segment_bytes=128).load()


def test_truncated_older_segment_is_corruption(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    for i in range(1, 30):
        s.save(None, [E(i)])
    s.close()
    first = segments(tmp_path)[0]
    first.write_bytes(first.read_bytes()[:-3])
    with pytest.raises(StoreCorrupt, match="short record"):
        RaftStore(tmp_path).load()


def test_missing_middle_segment_is_corruption(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    for i in range(1, 40):
        s.save(None, [E(i)])
    s.close()
    segs = segments(tmp_path)
    segs[1].unlink()
    with pytest.raises(StoreCorrupt, match="missing"):
        RaftStore(tmp_path).load()


def test_newer_format_is_refused_untouched(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(None, [E(1)])
    s.close()
    seg = segments(tmp_path)[0]
    payload = cbor2.dumps([0, "meshagent-wal", 2, 1])
    newer = FRAME.pack(len(payload), zlib.crc32(payload)) + payload
    seg.write_bytes(newer)
    with pytest.raises(StoreError, match="version 1"):
        RaftStore(tmp_path).load()
    assert seg.read_bytes() == newer


def test_bad_header_of_the_last_segment_removes_it(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    for i in range(1, 20):
        s.save(None, [E(i)])
    s.close()
    segs = segments(tmp_path)
    kept = frames(segs[-2].read_bytes())
    lost = [r[1] for _, _, r in frames(segs[-1].read_bytes()) if r[0] == 1]
    segs[-1].write_bytes(b"\0" * 10)
    s2, rec = stores(tmp_path, segment_bytes=128)
    assert not segs[-1].exists()
    assert [e.index for e in rec.entries] == list(range(1, min(lost)))
    assert [r[1] for _, _, r in kept if r[0] == 1][-1] == min(lost) - 1
    s2.save(None, [E(min(lost))])


# ---------------------------------------------------- rotation and compaction


def test_rotation_repeats_the_state_in_every_segment(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=200)
    s.save(HardState(3, "pi-2", 0), [])
    for i in range(1, 60):
        s.save(None, [E(i, 3)])
    segs = segments(tmp_path)
    assert len(segs) > 3 and s.stats["segments"] == len(segs)
    for p in segs[1:]:
        recs = [r for _, _, r in frames(p.read_bytes())]
        assert recs[0] == [0, "meshagent-wal", 1, int(p.stem, 16)]
        assert recs[1][:3] == [2, 3, "pi-2"]
        first_entry = next(r for r in recs if r[0] == 1)
        assert first_entry[1] == int(p.stem, 16)
    for p in segs[:-1]:
        assert p.stat().st_size < 200 + 64
    s.close()
    _, rec = stores(tmp_path, segment_bytes=200)
    assert [e.index for e in rec.entries] == list(range(1, 60))


def test_compaction_needs_a_snapshot_and_keeps_what_it_does_not_cover(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    s.save(HardState(1, "pi-1", 0), [])
    for i in range(1, 101):
        s.save(HardState(1, "pi-1", i), [E(i)])
    n = len(segments(tmp_path))
    s.compact(100)
    assert len(segments(tmp_path)) == n  # no snapshot yet: nothing may go
    s.save_snapshot(meta(60), b"state at 60")
    s.compact(60)
    remaining = segments(tmp_path)
    assert 0 < len(remaining) < n and s.stats["segments_deleted"] == n - len(remaining)
    assert s.stats["segments"] == len(remaining)
    s.close()
    s2, rec = stores(tmp_path, segment_bytes=128)
    assert rec.snapshot == meta(60)
    assert [e.index for e in rec.entries] == list(range(61, 101))
    assert hs_tuple(rec.hard_state) == (1, "pi-1", 100)
    # a second snapshot: compaction stops at the older one, so falling back to it stays whole
    s2.save_snapshot(meta(90), b"state at 90")
    s2.compact(90)
    kept_first = [frames(p.read_bytes()) for p in segments(tmp_path)]
    low = min(r[1] for recs in kept_first for _, _, r in recs if r[0] == 1)
    assert low <= 61
    s2.save_snapshot(meta(95), b"state at 95")
    s2.compact(95)
    low = min(r[1] for p in segments(tmp_path) for _, _, r in frames(p.read_bytes()) if r[0] == 1)
    assert 61 < low <= 91
    s2.close()
    _, rec = stores(tmp_path, segment_bytes=128)
    assert rec.snapshot == meta(95) and [e.index for e in rec.entries] == list(range(96, 101))


def test_compaction_never_deletes_the_open_segment(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    for i in range(1, 30):
        s.save(None, [E(i)])
    s.save_snapshot(meta(29), b"all")
    s.compact(29)
    assert len(segments(tmp_path)) == 1
    s.save(None, [E(30)])
    s.close()
    _, rec = stores(tmp_path, segment_bytes=128)
    assert rec.snapshot.index == 29 and rec.entries == [E(30)]


# ----------------------------------------------------------------- snapshots


def test_snapshot_round_trip_keeps_the_newest_two(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(2, None, 0), [E(i, 2) for i in range(1, 31)])
    for idx in (10, 20, 30):
        s.save_snapshot(meta(idx, 2), f"sm@{idx}".encode() * 100)
    names = sorted(p.name for p in (tmp_path / "snap").iterdir())
    assert names == [f"{2:016x}-{20:016x}.snap", f"{2:016x}-{30:016x}.snap"]
    assert s.load_snapshot() == (meta(30, 2), b"sm@30" * 100)
    s.close()
    s2, rec = stores(tmp_path)
    assert rec.snapshot == meta(30, 2) and rec.entries == []
    assert rec.hard_state.commit == 30  # the snapshot is committed by definition
    assert s2.load_snapshot() == (meta(30, 2), b"sm@30" * 100)
    assert s2.stats["snapshots_corrupt"] == 0


def test_empty_snapshot_data_and_no_voters(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save_snapshot(SnapshotMeta(0, 0, ()), b"")
    assert s.load_snapshot() == (SnapshotMeta(0, 0, ()), b"")


def test_leftover_tmp_files_are_ignored_and_cleaned(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(None, [E(1), E(2)])
    s.save_snapshot(meta(1), b"one")
    s.close()
    junk = [tmp_path / "snap" / f"{1:016x}-{2:016x}.snap.tmp", tmp_path / "wal" / f"{3:016x}.wal.tmp"]
    for p in junk:
        p.write_bytes(b"half written")
    s2, rec = stores(tmp_path)
    assert rec.snapshot == meta(1) and rec.entries == [E(2)]
    assert not any(p.exists() for p in junk)
    assert s2.stats["tmp_files_removed"] == 2
    assert s2.load_snapshot() == (meta(1), b"one")


def test_snapshot_write_failing_before_rename_leaves_the_old_one(tmp_path, stores, mocker):
    s, _ = stores(tmp_path)
    s.save(None, [E(1), E(2)])
    s.save_snapshot(meta(1), b"old")
    mocker.patch.object(store_mod.os, "replace", side_effect=OSError(errno.EIO, "I/O error"))
    with pytest.raises(StoreError, match=r"snap/0000000000000001-0000000000000002\.snap: I/O error"):
        s.save_snapshot(meta(2), b"new")
    mocker.stopall()
    assert not list((tmp_path / "snap").glob("*.tmp"))
    assert s.load_snapshot() == (meta(1), b"old")
    s.close()
    _, rec = stores(tmp_path)
    assert rec.snapshot == meta(1) and rec.entries == [E(2)]


def test_corrupt_newest_snapshot_falls_back_to_the_older(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=128)
    for i in range(1, 41):
        s.save(None, [E(i)])
    s.save_snapshot(meta(20), b"at 20")
    s.compact(20)
    s.save_snapshot(meta(35), b"at 35")
    s.compact(35)
    s.close()
    newest = tmp_path / "snap" / f"{1:016x}-{35:016x}.snap"
    buf = bytearray(newest.read_bytes())
    buf[-2] ^= 0x04
    newest.write_bytes(bytes(buf))
    s2, rec = stores(tmp_path, segment_bytes=128)
    assert rec.snapshot == meta(20)
    assert [e.index for e in rec.entries] == list(range(21, 41))  # nothing lost
    assert s2.stats["snapshots_corrupt"] == 1
    assert newest.with_name(newest.name + ".corrupt").exists()
    assert s2.load_snapshot() == (meta(20), b"at 20")


def test_snapshot_with_a_wrong_header_is_corrupt(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(None, [E(1), E(2), E(3)])
    s.save_snapshot(meta(2), b"two")
    s.close()
    good = tmp_path / "snap" / f"{1:016x}-{2:016x}.snap"
    good.rename(good.with_name(f"{1:016x}-{3:016x}.snap"))  # name and header disagree
    s2, rec = stores(tmp_path)
    assert rec.snapshot is None and s2.stats["snapshots_corrupt"] == 1


def test_leaders_snapshot_drops_a_conflicting_tail(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 5), [E(i, 1) for i in range(1, 11)])  # 6..10 uncommitted, term 1
    s.save(HardState(3, None, 5), [])
    s.save_snapshot(meta(8, 2), b"leader's state at 8")  # entry 8 here has term 1: another history
    s.close()
    s2, rec = stores(tmp_path)
    assert rec.snapshot == meta(8, 2) and rec.entries == []
    assert rec.hard_state.commit == 8
    s2.save(None, [E(9, 3), E(10, 3)])
    s2.close()
    _, rec = stores(tmp_path)
    assert rec.entries == [E(9, 3), E(10, 3)]


def test_leaders_snapshot_then_new_entries_in_the_same_run(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 2), [E(i, 1) for i in range(1, 11)])
    s.save_snapshot(meta(6, 2), b"leader's")
    s.save(HardState(2, None, 6), [E(7, 2)])  # the core's log restarts after the snapshot
    s.close()
    _, rec = stores(tmp_path)
    assert rec.snapshot == meta(6, 2) and rec.entries == [E(7, 2)]


def test_local_snapshot_keeps_the_entries_after_it(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 8), [E(i, 1) for i in range(1, 11)])
    s.save_snapshot(meta(8, 1), b"own state at 8")
    s.close()
    _, rec = stores(tmp_path)
    assert rec.snapshot == meta(8, 1) and rec.entries == [E(9), E(10)]


@pytest.mark.parametrize("term,expect", [(1, [9, 10]), (2, [])])
def test_power_cut_between_snapshot_rename_and_its_wal_record(tmp_path, stores, term, expect):
    s, _ = stores(tmp_path)
    s.save(HardState(2, "a", 4), [E(i, 1) for i in range(1, 11)])
    seg = segments(tmp_path)[0]
    before = seg.stat().st_size
    s.save_snapshot(meta(8, term), b"snap")
    s.close()
    os.truncate(seg, before)  # the SNAP record never reached the card
    _, rec = stores(tmp_path)
    assert rec.snapshot == meta(8, term)
    assert [e.index for e in rec.entries] == expect


def test_a_ready_with_a_received_snapshot_is_one_wal_write(tmp_path, stores, mocker):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 3), [E(i, 1) for i in range(1, 21)])  # 4..20 uncommitted, term 1
    fsync, write = mocker.spy(store_mod.os, "fsync"), mocker.spy(store_mod.os, "write")
    s.save(HardState(2, None, 10), [E(11, 2), E(12, 2)], (meta(10, 2), b"leader's state at 10"))
    assert fsync.call_count == 3  # snapshot file, snap directory, WAL
    assert write.call_count == 3  # snapshot header + data, then one WAL write
    mocker.stopall()
    s.close()
    _, rec = stores(tmp_path)
    assert rec.snapshot == meta(10, 2) and rec.entries == [E(11, 2), E(12, 2)]  # not old 13..20
    assert hs_tuple(rec.hard_state) == (2, None, 10)


def test_entries_at_or_below_the_snapshot_are_refused(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(None, [E(i) for i in range(1, 6)])
    s.save_snapshot(meta(4), b"x")
    with pytest.raises(ValueError, match="at or below the snapshot index 4"):
        s.save(None, [E(4)])
    s.save(None, [E(5, 2)])  # above it is an ordinary overwrite


def test_leaders_snapshot_beyond_the_log_then_entries(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, None, 0), [E(1), E(2)])
    s.save_snapshot(meta(50, 4), b"far ahead")
    s.save(HardState(4, None, 50), [E(51, 4)])
    s.close()
    _, rec = stores(tmp_path)
    assert rec.snapshot == meta(50, 4) and rec.entries == [E(51, 4)]


# --------------------------------------------------------------- hard state


def test_hard_state_survives_and_commit_is_capped_by_the_log(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(7, "pi-3", 0), [])
    s.close()
    s, rec = stores(tmp_path)
    assert hs_tuple(rec.hard_state) == (7, "pi-3", 0)
    s.save(HardState(7, "pi-3", 9), [E(1, 7), E(2, 7)])  # a commit beyond the log (from the leader)
    s.close()
    _, rec = stores(tmp_path)
    assert hs_tuple(rec.hard_state) == (7, "pi-3", 2)


def test_state_survives_compaction_of_the_segment_it_was_written_in(tmp_path, stores):
    s, _ = stores(tmp_path, segment_bytes=100)
    s.save(HardState(9, "pi-9", 0), [])
    for i in range(1, 40):
        s.save(None, [E(i, 9)])
    s.save_snapshot(meta(39, 9), b"x")
    s.compact(39)
    s.close()
    _, rec = stores(tmp_path, segment_bytes=100)
    assert (rec.hard_state.term, rec.hard_state.vote) == (9, "pi-9")


def test_commit_only_change_is_held_not_synced(tmp_path, stores, mocker):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 0), [E(1), E(2), E(3)])
    fsync, write = mocker.spy(store_mod.os, "fsync"), mocker.spy(store_mod.os, "write")
    s.save(HardState(1, "a", 2), [])
    assert fsync.call_count == 0 and write.call_count == 0
    s.save(HardState(1, "a", 3), [E(4)])  # held state rides along with the next batch
    assert fsync.call_count == 1 and write.call_count == 1
    s.save(HardState(1, "a", 4), [])
    s.close()  # close writes the held commit
    _, rec = stores(tmp_path)
    assert rec.hard_state.commit == 4


# ------------------------------------------------------------ cost per save


def test_one_write_and_one_fsync_per_save(tmp_path, stores, mocker):
    s, _ = stores(tmp_path)
    at_open = s.stats["fsyncs"]  # creating the layout synced files and directories
    fsync, write = mocker.spy(store_mod.os, "fsync"), mocker.spy(store_mod.os, "write")
    s.save(HardState(1, "pi-1", 0), [E(i) for i in range(1, 17)])
    assert (fsync.call_count, write.call_count) == (1, 1)
    s.save(None, [E(17)])
    assert (fsync.call_count, write.call_count) == (2, 2)
    s.save(HardState(2, None, 0), [])  # new term: a durability point of its own
    assert (fsync.call_count, write.call_count) == (3, 3)
    s.save(None, [])
    s.save(HardState(2, None, 0), [])  # unchanged
    assert (fsync.call_count, write.call_count) == (3, 3)
    assert s.stats["fsyncs"] - at_open == 3 and s.stats["saves"] == 3


def test_rotation_costs_two_fsyncs(tmp_path, stores, mocker):
    s, _ = stores(tmp_path, segment_bytes=64)
    s.save(None, [E(i) for i in range(1, 5)])
    fsync = mocker.spy(store_mod.os, "fsync")
    s.save(None, [E(5)])
    assert fsync.call_count == 2  # new segment file, then the directory


def test_a_ten_byte_command_costs_under_40_bytes(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(3, "pi-1", 0), [E(i, 3) for i in range(1, 70000)])  # big indexes too
    for index in (70000, 70001):
        before_stat, before_file = s.stats["bytes_written"], segments(tmp_path)[-1].stat().st_size
        s.save(None, [E(index, 3, b"0123456789")])
        cost = s.stats["bytes_written"] - before_stat
        assert cost == segments(tmp_path)[-1].stat().st_size - before_file
        assert cost < 40, cost
    assert s.bytes_per_commit(2) == s.stats["bytes_written"] / 2
    assert s.bytes_per_commit(0) == 0.0


def test_stats_report(tmp_path, stores):
    s, _ = stores(tmp_path)
    s.save(HardState(1, None, 0), [E(1), E(2)])
    s.save_snapshot(meta(2), b"x" * 1000)
    st = s.stats
    for key in ("bytes_written", "fsyncs", "records_written", "saves", "truncated_tail_bytes",
                "last_truncate_reason", "segments", "snapshot_bytes_written"):
        assert key in st
    assert st["snapshot_bytes_written"] > 1000 and st["bytes_written"] > st["snapshot_bytes_written"]
    assert st["records_written"] >= 4 and st["entries_written"] == 2 and st["segments"] == 1


def test_fsync_false_never_calls_fsync(tmp_path, stores, mocker):
    fsync = mocker.spy(store_mod.os, "fsync")
    s, _ = stores(tmp_path, fsync=False, segment_bytes=64)
    for i in range(1, 20):
        s.save(HardState(1, "a", i), [E(i)])
    s.save_snapshot(meta(10), b"x")
    s.compact(10)
    s.close()
    assert fsync.call_count == 0 and s.stats["fsyncs"] == 0
    _, rec = stores(tmp_path, fsync=False)
    assert rec.entries[-1] == E(19)


# --------------------------------------------------------------- failures


def test_unusable_directory_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=str(blocker / "raft")):
        RaftStore(blocker / "raft").load()


def test_read_only_directory_names_the_path(tmp_path, mocker):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    if os.geteuid() == 0:  # root may write anyway: make access() answer as for the agent's user
        real = os.access
        mocker.patch.object(store_mod.os, "access", lambda p, mode: False if Path(p) == d else real(p, mode))
    try:
        with pytest.raises(StoreError, match=str(d)):
            RaftStore(d).load()
    finally:
        d.chmod(0o700)


def test_a_failed_fsync_refuses_further_writes(tmp_path, stores, mocker):
    s, _ = stores(tmp_path)
    s.save(HardState(1, "a", 0), [E(1)])
    mocker.patch.object(store_mod.os, "fsync", side_effect=OSError(errno.EIO, "Input/output error"))
    with pytest.raises(StoreError, match=r"0000000000000001\.wal: Input/output error"):
        s.save(None, [E(2)])
    mocker.stopall()
    with pytest.raises(StoreError, match="failed earlier"):
        s.save(None, [E(3)])
    s.close()
    _, rec = stores(tmp_path)  # a restart recovers what is there
    assert rec.entries[0] == E(1)


# ------------------------------------------------- model-based random check


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4), st.booleans(), st.booleans()), max_size=25))
def test_random_saves_and_reopens_match_a_model(ops):
    """Overwrites, term bumps and reopens, against a plain list."""
    with tempfile.TemporaryDirectory() as d:
        s = RaftStore(d, segment_bytes=96)
        s.load()
        model: list[Entry] = []
        term = 1
        try:
            for back, count, bump, reopen in ops:
                if bump:
                    term += 1
                start = max(1, len(model) + 1 - back)
                batch = [E(i, term, bytes([i % 256]) * (i % 7)) for i in range(start, start + count)]
                s.save(HardState(term, None, 0), batch)
                if batch:
                    model = model[: start - 1] + batch
                if reopen:
                    s.close()
                    s = RaftStore(d, segment_bytes=96)
                    rec = s.load()
                    assert rec.entries == model
                    assert rec.hard_state.term == term
            s.close()
            s = RaftStore(d, segment_bytes=96)
            assert s.load().entries == model
        finally:
            s.close()


# ------------------------------------------- with the real core, crashes included


class _Node:
    """One driver: the real Raft core on a store; the state machine is the list of applied commands."""

    def __init__(self, node_id: str, path: Path, seed: int):
        self.id, self.path = node_id, path
        self.store = RaftStore(path, segment_bytes=512)
        rec = self.store.load()
        snap = self.store.load_snapshot()
        assert (snap[0] if snap else None) == rec.snapshot
        self.sm: list[str] = list(cbor2.loads(snap[1])) if snap else []
        self.snap_at = rec.snapshot.index if rec.snapshot else 0
        self.raft = Raft(node_id, RaftSettings(), random.Random(seed), rec)

    def pump(self, outbox: list) -> int:
        """Persist, send, apply, advance; snapshot every 15 applied entries. Returns installs."""
        installs = 0
        while self.raft.has_ready():
            rd = self.raft.ready()
            self.store.save(rd.hard_state, rd.entries, rd.snapshot)
            outbox.extend(rd.messages)
            if rd.snapshot is not None:
                self.sm, self.snap_at = list(cbor2.loads(rd.snapshot[1])), rd.snapshot[0].index
                installs += 1
            self.sm.extend(e.data.decode() for e in rd.committed if e.kind == EntryKind.NORMAL and e.data)
            if rd.committed:
                self.raft.applied_to(rd.committed[-1].index)
            self.raft.advance(rd)
        applied, log = self.raft.applied, self.raft.log
        if applied - self.snap_at >= 15:
            m = SnapshotMeta(applied, log.term(applied), log.voters_at(applied))
            self.store.save_snapshot(m, cbor2.dumps(self.sm))
            self.raft.compact(m)
            self.store.compact(applied)
            self.snap_at = applied
        return installs


def _cluster_run(seed: int, root: Path, steps: int = 400) -> tuple[int, int, int]:
    """Three nodes, lossy partitions, random power cuts (the disk image is copied and a new
    process starts on the copy). Checks that what a node recovers is exactly what its core had
    made durable, and that applied commands never diverge. Returns (applied, installs, crashes)."""
    ids = ["pi-1", "pi-2", "pi-3"]
    rng = random.Random(seed)
    for i in ids:
        with RaftStore(root / f"{i}.0") as s:
            s.load()
            s.save(None, Raft.bootstrap_entries(ids))
    nodes = {i: _Node(i, root / f"{i}.0", seed * 10 + k) for k, i in enumerate(ids)}
    down: set[str] = set()
    outbox: list = []
    proposed = installs = crashes = 0
    for step in range(steps):
        if rng.random() < 0.02:
            down = {rng.choice(ids)} if rng.random() < 0.7 else set()
        for n in nodes.values():
            n.raft.tick()
        msgs, outbox = outbox, []
        rng.shuffle(msgs)
        for m in msgs:
            if m.to in down or m.frm in down:
                continue
            if isinstance(m, InstallSnapshot) and m.data is None:  # the out-of-band fetch
                snap = nodes[m.frm].store.load_snapshot()
                if snap is None or snap[0] != m.meta:
                    continue
                m = dataclasses.replace(m, data=snap[1])
            nodes[m.to].raft.step(m)
        for n in nodes.values():
            if n.raft.role == "leader" and n.id not in down and rng.random() < 0.5:
                try:
                    n.raft.propose(f"c{proposed}".encode())
                    proposed += 1
                except (NotLeader, Refused):
                    pass
        for n in nodes.values():
            installs += n.pump(outbox)
        if rng.random() < 0.03:  # power cut: everything save() returned from is on the card
            v = nodes[rng.choice(ids)]
            crashes += 1
            image = root / f"{v.id}.{crashes}"
            shutil.copytree(v.path, image)
            v.store.close()
            nodes[v.id] = new = _Node(v.id, image, rng.randrange(1 << 30))
            log, old = new.raft.log, v.raft.log
            assert (log.snapshot, log.entries) == (old.snapshot, old.entries), (seed, step)
            assert (new.raft.term, new.raft.vote) == (v.raft.term, v.raft.vote), (seed, step)
            assert new.raft.commit <= v.raft.commit
        sms = [n.sm for n in nodes.values()]
        for a in sms:
            for b in sms:
                assert a[: len(b)] == b[: len(a)], (seed, step)
    for n in nodes.values():
        n.store.close()
    return max(len(n.sm) for n in nodes.values()), installs, crashes


def test_real_core_cluster_with_power_cuts_recovers_what_it_made_durable(tmp_path):
    totals = [0, 0, 0]
    for seed in range(12):
        root = tmp_path / f"s{seed}"
        root.mkdir()
        for k, v in enumerate(_cluster_run(seed, root)):
            totals[k] += v
    applied, installs, crashes = totals
    assert applied > 12 * 50 and installs > 5 and crashes > 12  # the paths were exercised
