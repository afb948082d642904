"""What a leader knows about each follower's log, and the flow control on it.

As etcd's tracker.Progress: a follower is in one of three states.

- PROBE: we do not know where its log ends. Send one Append at `next` and
  wait for its answer (`paused`); a rejection moves `next` back (using the
  follower's hint), a success moves to REPLICATE. Heartbeats carry the same
  probe position, so a lost probe is retried every heartbeat.
- REPLICATE: its log matches ours up to `match`; stream Appends optimistically
  (`next` jumps past what was sent) with at most `max_inflight` unanswered.
  A rejection (a lost or reordered Append) falls back to PROBE.
- SNAPSHOT: it needs entries we compacted; an InstallSnapshot is on its way.
  Nothing else is sent until it answers with an index at or past the snapshot,
  or `election_ticks` pass (then PROBE again, which resends it).
"""

from __future__ import annotations

from collections import deque

PROBE, REPLICATE, SNAPSHOT = "probe", "replicate", "snapshot"


class Progress:
    __slots__ = (
        "match", "next", "state", "paused", "inflight", "pending_snapshot", "snapshot_elapsed",
        "last_heard", "learner", "sent_commit", "acked_round", "mark_round", "mark_next",
    )

    def __init__(self, next_index: int, now: int, learner: bool = False):
        self.match = 0
        self.next = next_index
        self.state = PROBE
        self.paused = False  #: PROBE: a probe is unanswered
        self.inflight: deque[int] = deque()  #: REPLICATE: last index of each unanswered Append
        self.pending_snapshot = 0
        self.snapshot_elapsed = 0
        self.last_heard = now  #: tick of the last message from it in this term
        self.learner = learner
        self.sent_commit = 0  #: highest commit index it can have learned from us
        self.acked_round = 0  #: newest heartbeat round it answered (ReadIndex)
        self.mark_round = 0  #: heartbeat round sent with mark_next = next at that time
        self.mark_next = 0

    def become_probe(self) -> None:
        if self.state == SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = PROBE
        self.paused = False
        self.inflight.clear()

    def become_replicate(self) -> None:
        self.state = REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_elapsed = 0
        self.paused = False
        self.inflight.clear()

    def is_paused(self, max_inflight: int) -> bool:
        if self.state == REPLICATE:
            return len(self.inflight) >= max_inflight
        return self.paused if self.state == PROBE else True

    def sent(self, last: int) -> None:
        """An Append ending at `last` (with entries) went out."""
        if self.state == REPLICATE:
            self.next = last + 1
            self.inflight.append(last)
        else:
            self.paused = True

    def maybe_update(self, index: int) -> bool:
        """The follower matches us up to `index`; False if that is old news."""
        if index > self.match:
            self.match = index
            if self.next <= index:
                self.next = index + 1
            self.paused = False
            inflight = self.inflight
            while inflight and inflight[0] <= index:
                inflight.popleft()
            return True
        return False

    def maybe_decrease(self, rejected: int, hint: int) -> bool:
        """An Append at prev index `rejected` was refused; False if the refusal is stale."""
        if self.state == REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, hint + 1), self.match + 1)
        self.paused = False
        return True

    def view(self) -> dict:
        return {"match": self.match, "next": self.next, "state": self.state, "learner": self.learner}
