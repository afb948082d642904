"""Journal: the local queue survives restarts, torn tails, and grows no bigger than it must."""

from __future__ import annotations

import os

import pytest

from agent.io import journal as journal_mod
from agent.io.journal import COMPACT_BYTES, Journal

VALUE = {"spec": {"i": "00ff00ff00ff00ff", "a": {"blob": b"\x00\x01", "n": [1, 2]}}, "attempt": 2, "ok": True}


def _open(path, **kw) -> tuple[Journal, dict]:
    j = Journal(path, fsync=kw.pop("fsync", False), **kw)
    return j, j.open()


def test_put_delete_reopen_round_trip(tmp_path):
    path = tmp_path / "q" / "queue.journal"
    j, live = _open(path)
    assert live == {}
    j.put("a", VALUE)
    j.put("b", 1)
    j.put("c", "three")
    j.delete("b")
    j.put("a", {"replaced": [b"x", False]})
    j.close()
    j2, live = _open(path)
    assert live == {"a": {"replaced": [b"x", False]}, "c": "three"}
    assert j2.stats["records"] == 5 and j2.stats["live"] == 2 and j2.stats["repaired_bytes"] == 0
    j2.delete("c")
    j2.close()
    assert _open(path)[1] == {"a": {"replaced": [b"x", False]}}


def test_creates_parent_dir_0750(tmp_path):
    path = tmp_path / "data" / "tasks" / "queue.journal"
    _open(path)[0].close()
    assert path.is_file() and (path.parent.stat().st_mode & 0o777) == 0o750


def test_unflushed_changes_are_not_on_disk(tmp_path):
    path = tmp_path / "queue.journal"
    j, _ = _open(path)
    j.put("a", 1)
    j.flush()
    j.put("b", 2)  # buffered only: a crash now loses it
    assert Journal(path, fsync=False).open() == {"a": 1}
    j.close()


def test_delete_of_an_absent_key_writes_nothing(tmp_path):
    j, _ = _open(tmp_path / "queue.journal")
    before = j.stats["bytes_written"]
    j.delete("never")
    j.flush()
    assert j.stats["bytes_written"] == before and j.stats["records"] == 0


def test_bad_keys_and_values_are_refused(tmp_path):
    j, _ = _open(tmp_path / "queue.journal")
    for key in ("", "k" * 65, 5):
        with pytest.raises(ValueError):
            j.put(key, 1)
    for value in (1.5, None, {"nested": [None]}):
        with pytest.raises(TypeError):
            j.put("k", value)
    j.close()
    assert _open(tmp_path / "queue.journal")[1] == {}


def _three_records(path) -> list[int]:
    """Write three records in separate flushes; the file sizes after each."""
    j, _ = _open(path)
    sizes = [path.stat().st_size]
    for i, key in enumerate("abc"):
        j.put(key, {"n": i, "pad": "x" * 40})
        j.flush()
        sizes.append(path.stat().st_size)
    j.close()
    return sizes


def test_truncated_tail_recovers_the_good_prefix(tmp_path):
    path = tmp_path / "queue.journal"
    sizes = _three_records(path)
    cut = sizes[2] + 7  # in the middle of record "c"
    os.truncate(path, cut)
    j, live = _open(path)
    assert set(live) == {"a", "b"}
    assert j.stats["repaired_bytes"] == cut - sizes[2]
    assert path.stat().st_size == sizes[2]
    j.put("d", 4)  # appends after the good prefix
    j.close()
    j2, live = _open(path)
    assert set(live) == {"a", "b", "d"} and j2.stats["repaired_bytes"] == 0


def test_garbage_after_the_last_record_is_cut(tmp_path):
    path = tmp_path / "queue.journal"
    sizes = _three_records(path)
    with open(path, "ab") as f:
        f.write(b"\x07\x00\x00\x00garbage!!")
    j, live = _open(path)
    assert set(live) == {"a", "b", "c"}
    assert j.stats["repaired_bytes"] == 13 and path.stat().st_size == sizes[3]


def test_a_flipped_bit_drops_that_record_and_the_rest(tmp_path):
    path = tmp_path / "queue.journal"
    sizes = _three_records(path)
    data = bytearray(path.read_bytes())
    data[sizes[1] + 20] ^= 0x10  # inside record "b"
    path.write_bytes(bytes(data))
    j, live = _open(path)
    assert set(live) == {"a"} and j.stats["repaired_bytes"] == sizes[3] - sizes[1]


@pytest.mark.parametrize("content", [b"", b"\x00" * 5, b"not a journal at all, just text"])
def test_a_file_without_a_journal_header_starts_empty(tmp_path, content):
    path = tmp_path / "queue.journal"
    path.write_bytes(content)
    j, live = _open(path)
    assert live == {} and j.stats["repaired_bytes"] == len(content)
    j.put("a", 1)
    j.close()
    assert _open(path)[1] == {"a": 1}


def test_compaction_keeps_live_entries_and_shrinks_the_file(tmp_path):
    path = tmp_path / "queue.journal"
    j, _ = _open(path)
    for key in ("keep1", "keep2"):
        j.put(key, {"v": key})
    j.flush()
    big = 0
    for i in range(200):  # each flush one record of ~600 bytes that the next makes dead
        j.put("churn", {"i": i, "pad": "y" * 600})
        if i % 7 == 0:
            j.put(f"gone{i}", i)
            j.delete(f"gone{i}")
        j.flush()
        big = max(big, path.stat().st_size)
    assert j.stats["compactions"] >= 1
    assert big <= COMPACT_BYTES + 2000  # never far past the threshold
    assert path.stat().st_size < big
    assert not list(tmp_path.glob("*.tmp"))
    j.close()
    j2, live = _open(path)
    assert live == {"keep1": {"v": "keep1"}, "keep2": {"v": "keep2"}, "churn": {"i": 199, "pad": "y" * 600}}


def test_a_large_live_journal_is_not_rewritten(tmp_path):
    path = tmp_path / "queue.journal"
    j, _ = _open(path)
    for i in range(150):
        j.put(f"k{i}", "z" * 600)
        j.flush()
    assert path.stat().st_size > COMPACT_BYTES and j.stats["compactions"] == 0
    j.close()


def test_flush_is_one_write_and_one_fsync(tmp_path, mocker):
    j = Journal(tmp_path / "queue.journal", fsync=True)
    j.open()
    fsync = mocker.spy(journal_mod.os, "fsync")
    write = mocker.spy(os, "write")
    for i in range(10):
        j.put(f"k{i}", {"i": i})
    j.delete("k3")
    j.flush()
    assert fsync.call_count == 1 and write.call_count == 1
    j.flush()  # nothing buffered: nothing written
    assert fsync.call_count == 1 and write.call_count == 1
    before = j.stats["fsyncs"]
    j.put("x", 1)
    j.flush()
    assert j.stats["fsyncs"] == before + 1
    j.close()


def test_a_failed_write_is_repaired_by_a_rewrite_at_the_next_flush(tmp_path, mocker):
    path = tmp_path / "queue.journal"
    j, _ = _open(path)
    j.put("a", 1)
    j.flush()
    mocker.patch.object(journal_mod, "_write_all", side_effect=OSError(5, "Input/output error"))
    j.put("b", 2)
    with pytest.raises(OSError):
        j.flush()
    mocker.stopall()
    j.flush()  # nothing new buffered, but the file's tail is unknown: rewritten from memory
    assert j.stats["compactions"] == 1
    j.close()
    assert _open(path)[1] == {"a": 1, "b": 2}
