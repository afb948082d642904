"""Benchmark of the Raft store's group commit with fsync on: saves/s and bytes per entry.

    python bench/store_fsync.py                       # in a temp dir under $TMPDIR
    python bench/store_fsync.py --dir /var/lib/meshagent --seconds 5 --entry-bytes 100

Run it on the card the data dir lives on (--dir): on tmpfs an fsync costs
nothing and the figures mean nothing (the header says which filesystem it ran
on). Each save is what a follower's driver persists for one Ready: the hard
state with an advanced commit (held by the store, it rides along) and a batch
of `batch` new entries of --entry-bytes each, one write and one fsync.
Segments rotate at the default 4 MiB, so rotation cost is included.
Prints a markdown table; writes no results file.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.raft import HardState  # noqa: E402
from agent.core.raft_messages import Entry, EntryKind  # noqa: E402
from agent.io.store import RaftStore  # noqa: E402

BATCHES = (1, 16, 256)


def filesystem_of(path: Path) -> str:
    """The mount's filesystem type and device, from /proc/mounts (longest matching mount point)."""
    best, found = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if str(path).startswith(mnt.rstrip("/") + "/") or str(path) == mnt:
                    if len(mnt) > len(best):
                        best, found = mnt, f"{fstype} ({dev} on {mnt})"
    except OSError:
        pass
    return found


def run(directory: Path, batch: int, seconds: float, entry_bytes: int, min_saves: int) -> dict:
    store = RaftStore(directory)
    store.load()
    payload = os.urandom(entry_bytes)
    index, latencies = 0, []
    before = dict(store.stats)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < seconds or len(latencies) < min_saves:
            entries = [Entry(index + k, 1, EntryKind.NORMAL, payload) for k in range(1, batch + 1)]
            t0 = time.perf_counter()
            store.save(HardState(1, "pi-1", index), entries)
            latencies.append(time.perf_counter() - t0)
            index += batch
        elapsed = time.perf_counter() - started
        after = dict(store.stats)
    finally:
        store.close()
    saves = len(latencies)
    latencies.sort()
    return {
        "batch": batch,
        "saves_s": saves / elapsed,
        "entries_s": saves * batch / elapsed,
        "ms_p50": statistics.median(latencies) * 1000,
        "ms_p99": latencies[min(saves - 1, int(saves * 0.99))] * 1000,
        "bytes_entry": (after["bytes_written"] - before["bytes_written"]) / (saves * batch),
        "fsyncs_save": (after["fsyncs"] - before["fsyncs"]) / saves,
        "saves": saves,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temp store dirs (default: $TMPDIR)")
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--entry-bytes", type=int, default=64, help="command bytes per entry")
    parser.add_argument("--min-saves", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="store-bench-", dir=args.dir) as tmp:
        root = Path(tmp).resolve()
        fs = filesystem_of(root)
        rows = [run(root / f"b{b}", b, args.seconds, args.entry_bytes, args.min_saves) for b in BATCHES]
    print(f"Raft store, fsync on: {platform.node()} {platform.machine()}, Python {platform.python_version()}, "
          f"{fs}, {args.entry_bytes}-byte entries, {args.seconds:g} s per row")
    if fs.startswith("tmpfs"):
        print("WARNING: tmpfs: fsync is free here; use --dir on the real card.")
    print()
    print("| batch | saves/s | entries/s | ms/save p50 | ms/save p99 | bytes/entry | fsyncs/save | saves |")
    print("|------:|--------:|----------:|------------:|------------:|------------:|------------:|------:|")
    for r in rows:
        print(f"| {r['batch']} | {r['saves_s']:,.0f} | {r['entries_s']:,.0f} | {r['ms_p50']:.2f} | "
              f"{r['ms_p99']:.2f} | {r['bytes_entry']:.1f} | {r['fsyncs_save']:.3f} | {r['saves']:,} |")
    print()
    print(f"bytes/entry includes the 8-byte framing, the entry's CBOR, and the per-save STATE record "
          f"and segment headers shared by the batch ({args.entry_bytes} bytes are the command itself).")


if __name__ == "__main__":
    main()
