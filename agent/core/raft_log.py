"""The in-memory Raft log: entries after the last snapshot, what of it is
durable, and the configuration it implies.

The log is one Python list with an offset (`offset` = index of the last
entry folded into the snapshot, `offset_term` its term), so the entry with
index i is `entries[i - offset - 1]`: lookups are O(1) and nothing scans the
whole log per message. Compaction slices the list once per snapshot.

Durability bookkeeping (persist-before-send, as etcd's unstable/stable):
`emitted` is the last index handed to the driver in a Ready, `stable` the
last index the driver acknowledged as written (advance). Truncation pulls
both back, so an overwritten suffix is handed out (and persisted) again.

Configuration (single-server changes, Raft dissertation ch. 4): the voters
are those of the latest CONF entry in the log, in force from the moment it is
appended, committed or not. `_confs` keeps (index, voters) for every CONF
entry after the snapshot, so truncation recomputes the configuration in
O(number of conf entries), and `base_voters` is the snapshot's.
"""

from __future__ import annotations

from agent.core.raft_messages import ConfChange, Entry, SnapshotMeta


def apply_change(voters: tuple[str, ...], data: bytes) -> tuple[str, ...]:
    """Voters after the ConfChange encoded in `data` (sorted, no duplicates)."""
    cc = ConfChange.decode(data)
    if cc.op == "add":
        return voters if cc.node in voters else tuple(sorted(voters + (cc.node,)))
    return tuple(v for v in voters if v != cc.node)


class RaftLog:
    __slots__ = ("offset", "offset_term", "entries", "stable", "emitted", "base_voters", "_confs", "snapshot")

    def __init__(self, snapshot: SnapshotMeta | None, entries: list[Entry]):
        self.snapshot = snapshot  #: meta of the newest snapshot the log starts after (None: none yet)
        self.offset = snapshot.index if snapshot else 0
        self.offset_term = snapshot.term if snapshot else 0
        self.base_voters: tuple[str, ...] = tuple(sorted(snapshot.voters)) if snapshot else ()
        self.entries: list[Entry] = []
        self._confs: list[tuple[int, tuple[str, ...]]] = []
        expect, term = self.offset + 1, self.offset_term
        for e in entries:
            if e.index != expect or e.term < term:
                raise ValueError(f"recovered log is not contiguous: entry {e.index}/{e.term} after {expect - 1}/{term}")
            expect, term = expect + 1, e.term
        self._extend(list(entries))
        self.stable = self.last_index  #: recovered entries are durable
        self.emitted = self.last_index

    # ------------------------------------------------------------------ views

    @property
    def last_index(self) -> int:
        return self.offset + len(self.entries)

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.offset_term

    @property
    def first_index(self) -> int:
        return self.offset + 1

    @property
    def voters(self) -> tuple[str, ...]:
        return self._confs[-1][1] if self._confs else self.base_voters

    @property
    def last_conf_index(self) -> int:
        """Index of the latest CONF entry still in the log (0 if none after the snapshot)."""
        return self._confs[-1][0] if self._confs else 0

    def voters_at(self, index: int) -> tuple[str, ...]:
        """The configuration in force once entry `index` is in the log
        (ValueError for an index before the snapshot or past the end)."""
        if not self.offset <= index <= self.last_index:
            raise ValueError(f"index {index} outside the log ({self.offset}..{self.last_index})")
        out = self.base_voters
        for i, vs in self._confs:
            if i > index:
                break
            out = vs
        return out

    def term(self, index: int) -> int | None:
        """Term of the entry at `index`; None if compacted away or not there yet."""
        i = index - self.offset
        if i > 0:
            return self.entries[i - 1].term if i <= len(self.entries) else None
        if i == 0:
            return self.offset_term
        return None

    def entry(self, index: int) -> Entry:
        return self.entries[index - self.offset - 1]

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi-1 (both within the log)."""
        return self.entries[lo - self.offset - 1 : hi - self.offset - 1]

    def batch(self, lo: int, max_entries: int, max_bytes: int) -> tuple[Entry, ...]:
        """Entries from lo on, at most max_entries of them and at most max_bytes
        of encoded entries (but always at least one)."""
        start = lo - self.offset - 1
        out = self.entries[start : start + max_entries]
        total = 0
        for k, e in enumerate(out):
            total += e.size
            if total > max_bytes and k:
                return tuple(out[:k])
        return tuple(out)

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Is a candidate's log at least as up to date as ours (Raft §5.4.1)?"""
        lt = self.last_term
        return last_term > lt or (last_term == lt and last_index >= self.last_index)

    def find_conflict(self, entries: tuple[Entry, ...]) -> int:
        """Index of the first of `entries` we lack or hold with another term
        (0: we hold them all). Only looks at the new entries."""
        last = self.last_index
        for e in entries:
            if e.index > last or self.term(e.index) != e.term:
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= `index` whose term is <= `term` (or the snapshot
        index): a leader rejected at `index` can skip every entry of a newer
        term in one round trip (etcd's fast backtracking, done by the follower)."""
        while index > self.offset:
            t = self.term(index)
            if t is not None and t <= term:
                break
            index -= 1
        return max(index, self.offset)

    # -------------------------------------------------------------- mutation

    def append(self, e: Entry) -> None:
        """The leader's own new entry (index last_index + 1)."""
        self.entries.append(e)
        if e.kind:
            self._confs.append((e.index, apply_change(self.voters, e.data)))

    def _extend(self, entries: list[Entry]) -> None:
        self.entries.extend(entries)
        for e in entries:
            if e.kind:
                self._confs.append((e.index, apply_change(self.voters, e.data)))

    def truncate_and_append(self, entries: tuple[Entry, ...] | list[Entry]) -> None:
        """Entries starting at some index <= last_index + 1: whatever we hold
        from that index on is replaced (the caller checked it is uncommitted)."""
        first = entries[0].index
        if first <= self.last_index:
            del self.entries[first - self.offset - 1 :]
            while self._confs and self._confs[-1][0] >= first:
                self._confs.pop()
            if self.stable >= first:
                self.stable = first - 1
            if self.emitted >= first:
                self.emitted = first - 1
        self._extend(list(entries))

    def compact(self, meta: SnapshotMeta) -> None:
        """Forget entries up to meta.index (the state machine holds them now)."""
        if meta.index <= self.offset:
            return
        voters = self.voters_at(meta.index)
        del self.entries[: meta.index - self.offset]
        self._confs = [(i, vs) for i, vs in self._confs if i > meta.index]
        self.offset, self.offset_term, self.base_voters = meta.index, meta.term, voters
        self.snapshot = meta

    def restore(self, meta: SnapshotMeta) -> None:
        """Start over from a snapshot received from the leader."""
        self.entries = []
        self._confs = []
        self.offset, self.offset_term = meta.index, meta.term
        self.base_voters = tuple(sorted(meta.voters))
        self.stable = self.emitted = meta.index
        self.snapshot = meta
