"""Raft consensus as a sans-IO state machine, after etcd-io/raft and the Raft dissertation.

Theory of operation
-------------------
The driver calls `tick()` every `settings.tick_ms`, `step(msg)` for every
message that arrives, and `propose()` / `forward()` / `read_index()` for its
clients. Whenever `has_ready()` it takes a `Ready` and, in this order:
persists `hard_state`, `entries` and `snapshot` (one fsync); sends
`messages`; applies `committed` and restores `snapshot`; then calls
`advance(rd)`. The core never assumes anything is durable before `advance`:
the leader counts its own log towards a quorum only up to what was
acknowledged there, and `committed` never runs past it either. Nothing here
reads a clock, touches a socket or uses global randomness.

Roles. Only voters (the configuration of the latest CONF entry in the log)
campaign. A follower that hears nothing from a leader for a randomised
election timeout in [E, 2E-1] ticks first asks for pre-votes at term+1
without changing its term; only with a quorum of pre-votes does it become a
candidate and bump its term, so a node that rejoins after a partition cannot
depose a healthy leader. A voter that heard from a leader within E ticks
ignores (pre-)votes, unless the request is forced by a leadership transfer.
A leader appends an empty NORMAL entry at once and commits only entries of
its own term, by majority of the current configuration (figure 8 of the
paper); with check-quorum it steps down when a quorum of voters has not been
heard from within E ticks. Learners (`set_learners`: other live members of
the mesh) receive entries and heartbeats but never count and never campaign.
(A node outside its own configuration still answers a vote request, as in
etcd: the candidate's newer configuration may already include it.)

Replication (`raft_progress.py`): per follower PROBE / REPLICATE / SNAPSHOT
with at most `max_inflight` unanswered Appends, each of at most
`max_append_entries` entries and `max_append_bytes` encoded bytes. New
entries and commit advances are sent once per Ready (`_flush`), so the
proposals of one driver cycle travel together. A rejection carries the
follower's hint (its last index whose term is not newer than the Append's
prev term, and that term); the leader skips its own entries of newer terms,
so a divergent suffix costs about one round trip per term. Heartbeats are
empty Appends numbered by a round counter in `ctx`; followers echo it, and
a heartbeat answered while earlier Appends are not means they were lost.

Configuration changes add or remove one voter, take effect when appended
(recomputed when truncated), and are refused while another is uncommitted or
before the leader committed an entry of its own term (dissertation 4.1 and
its bug fix). A leader that removed itself keeps leading until the change
commits, without counting itself, then hands over with TimeoutNow to the
most caught-up voter and steps down.

Reads (ReadIndex, dissertation 6.4): the leader needs an entry of its term
committed, records the commit index, and answers once a quorum of voters
acknowledged a heartbeat round sent after the request; a lone voter answers
at once. Followers and learners ask the leader with ReadIndexReq.

Leadership transfer: the leader stops taking proposals, brings the target up
to date, sends TimeoutNow, and the target campaigns at once with `force`;
if nothing happens within transfer_timeout_ticks the transfer is abandoned.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from agent.core.raft_log import RaftLog
from agent.core.raft_messages import (
    MAX_CTX,
    MAX_DATA,
    MAX_REASON,
    MAX_VOTERS,
    Append,
    AppendResp,
    ConfChange,
    Entry,
    EntryKind,
    Forward,
    ForwardRefused,
    InstallSnapshot,
    PreVote,
    PreVoteResp,
    ReadIndexReq,
    ReadIndexResp,
    SnapshotMeta,
    TimeoutNow,
    Vote,
    VoteResp,
)
from agent.core.raft_progress import PROBE, REPLICATE, SNAPSHOT, Progress
from agent.core.settings import range_problems
from agent.counters import Counters
from agent.messages import BadMessage, check_node_id

# name: (unit, minimum, maximum, meaning). Defaults live on the dataclass.
FIELD_DOCS: dict[str, tuple[str, int, int, str]] = {
    "tick_ms": ("ms", 10, 10_000, "length of one tick of the driver's clock; every other duration here is in ticks"),
    "heartbeat_ticks": ("ticks", 1, 1000, "a leader sends voters a heartbeat this often (etcd HeartbeatTick)"),
    "election_ticks": ("ticks", 2, 10_000, "E: a follower campaigns after a silence drawn from [E, 2E-1]; check-quorum and the leader lease use E (etcd ElectionTick)"),
    "learner_heartbeat_ticks": ("ticks", 1, 10_000, "a leader sends learners a heartbeat this often (a learner counts its leader as live for max(E, this + 1) ticks)"),
    "max_append_entries": ("entries", 1, 256, "entries in one Append at most"),
    "max_append_bytes": ("bytes", 64, 1_048_576, "encoded entries in one Append at most (one larger entry still goes alone), so an Append fits a datagram"),
    "max_inflight": ("messages", 1, 4096, "unanswered Appends to one follower in REPLICATE state"),
    "check_quorum": ("bool", 0, 1, "a leader steps down when it has not heard from a quorum of voters within E ticks; voters ignore (pre-)votes while their leader is live"),
    "pre_vote": ("bool", 0, 1, "ask for pre-votes before bumping the term, so a rejoining node cannot depose a live leader"),
    "transfer_timeout_ticks": ("ticks", 0, 10_000, "a leadership transfer not done within this is abandoned (0 = election_ticks)"),
}


@dataclass(frozen=True)
class RaftSettings:
    tick_ms: int = 100
    heartbeat_ticks: int = 1
    election_ticks: int = 8
    learner_heartbeat_ticks: int = 5
    max_append_entries: int = 256
    max_append_bytes: int = 3000
    max_inflight: int = 64
    check_quorum: bool = True
    pre_vote: bool = True
    transfer_timeout_ticks: int = 0

    def problems(self) -> list[tuple[str, object, str]]:
        """(field, value, what is allowed) for every out-of-range or inconsistent field."""
        out = range_problems(self, FIELD_DOCS)
        if not out:
            if self.heartbeat_ticks >= self.election_ticks:
                out.append(("heartbeat_ticks", self.heartbeat_ticks, f"less than election_ticks ({self.election_ticks})"))
        return out

    @property
    def transfer_timeout(self) -> int:
        return self.transfer_timeout_ticks or self.election_ticks


@dataclass
class HardState:
    term: int = 0
    vote: str | None = None
    commit: int = 0


@dataclass
class Recovered:
    """What storage hands back at start."""

    hard_state: HardState
    snapshot: SnapshotMeta | None  #: last snapshot (the log starts after it)
    entries: list[Entry]  #: contiguous, after the snapshot


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex answer: reads for `ctx` are linearizable once the state
    machine has applied `index`. index -1: refused or impossible (`reason`)."""

    ctx: bytes
    index: int
    reason: str = ""


@dataclass
class Ready:
    hard_state: HardState | None = None  #: changed since the last Ready: persist BEFORE sending
    entries: list[Entry] = field(default_factory=list)  #: to persist; an index <= the last stored replaces it and all after
    snapshot: tuple[SnapshotMeta, bytes] | None = None  #: received snapshot: persist, restore the state machine
    messages: list = field(default_factory=list)  #: send only once the above is durable
    committed: list[Entry] = field(default_factory=list)  #: apply in order (after persisting)
    read_states: list[ReadState] = field(default_factory=list)
    soft_state: tuple[str, str | None, int] | None = None  #: (role, leader, term) when it changed
    forward_refused: list[ForwardRefused] = field(default_factory=list)  #: our Forwards the leader turned down


class NotLeader(Exception):
    """This node cannot take the request; `leader` is the one it last knew of (or None)."""

    def __init__(self, leader: str | None, term: int, reason: str):
        super().__init__(reason)
        self.leader, self.term, self.reason = leader, term, reason


class Refused(Exception):
    """The leader will not take this request now (transfer, conf change rules)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


FOLLOWER, PRECANDIDATE, CANDIDATE, LEADER = "follower", "precandidate", "candidate", "leader"
LEARNER = "learner"  #: reported role of a follower outside the configuration


@dataclass(slots=True)
class _Read:
    ctx: bytes
    frm: str | None  #: None: our own read_index(); else the follower that asked
    index: int
    round: int  #: heartbeat round whose quorum of acks releases it


def _round_ctx(r: int) -> bytes:
    return r.to_bytes((r.bit_length() + 7) // 8 or 1, "big")


class Raft:
    def __init__(self, node_id: str, settings: RaftSettings, rng: random.Random, recovered: Recovered,
                 *, counters: Counters | None = None):
        bad = settings.problems()
        if bad:
            raise ValueError(f"bad raft settings: {bad}")
        self.node_id = check_node_id(node_id)
        self.s = settings
        self.rng = rng
        self.counters = counters if counters is not None else Counters()
        self.log = RaftLog(recovered.snapshot, recovered.entries)
        hs = recovered.hard_state
        # Bootstrap entries carry term 1 before any term was persisted: start there.
        self.term = max(hs.term, self.log.last_term)
        self.vote: str | None = hs.vote if hs.term == self.term else None
        self.commit = min(max(hs.commit, self.log.offset), self.log.last_index)
        self.applied = self.log.offset
        self._applying = self.log.offset  #: last index handed out in Ready.committed
        self._hs_emitted = HardState(self.term, self.vote, self.commit)
        self.state = FOLLOWER
        self.leader: str | None = None
        self.now = 0
        self.election_elapsed = 0
        self._randomized_timeout = settings.election_ticks
        self._heartbeat_elapsed = 0
        self._learner_elapsed = 0
        self._leader_heard_at: int | None = None  #: tick we last heard from a leader
        self._last_leader: str | None = None
        self._last_leader_term = 0
        self._votes: dict[str, bool] = {}
        self.prs: dict[str, Progress] = {}
        self._learner_ids: set[str] = set()
        self._transferee: str | None = None
        self._transfer_elapsed = 0
        self._bcast = False  #: new entries or commit: every follower may need an Append
        self._dirty: set[str] = set()  #: followers whose progress changed
        self._hb_round = 0
        self._read_hb = False  #: a read waits for a heartbeat round not yet sent
        self._reads: deque[_Read] = deque()
        self._reads_waiting_commit: list[tuple[bytes, str | None]] = []
        self._msgs: list = []
        self._read_states: list[ReadState] = []
        self._refused: list[ForwardRefused] = []
        self._snapshot_out: tuple[SnapshotMeta, bytes] | None = None
        self._soft_emitted = (self.role, self.leader, self.term)
        self._reset_timeout()

    # ------------------------------------------------------------------ views

    @property
    def role(self) -> str:
        if self.state == FOLLOWER and self.node_id not in self.log.voters:
            return LEARNER
        return self.state

    @property
    def voters(self) -> tuple[str, ...]:
        return self.log.voters

    @property
    def last_index(self) -> int:
        return self.log.last_index

    @property
    def learners(self) -> tuple[str, ...]:
        """What set_learners() was last given (minus ourselves), sorted."""
        return tuple(sorted(self._learner_ids))

    @property
    def lead_transferee(self) -> str | None:
        return self._transferee

    def voters_at(self, index: int) -> tuple[str, ...]:
        """The configuration in force at `index` (for the driver's SnapshotMeta)."""
        return self.log.voters_at(index)

    def term_at(self, index: int) -> int | None:
        return self.log.term(index)

    @staticmethod
    def bootstrap_entries(voters: list[str]) -> list[Entry]:
        """Index 1..n, term 1, a CONF add for each voter in sorted order: every
        node of an explicit list calls this with the same list, so they all
        start with the same log."""
        vs = sorted(set(check_node_id(v) for v in voters))
        if not vs or len(vs) > MAX_VOTERS:
            raise ValueError(f"need 1 to {MAX_VOTERS} voters, got {len(vs)}")
        return [Entry(i, 1, EntryKind.CONF, ConfChange("add", v).encode()) for i, v in enumerate(vs, 1)]

    def status(self) -> dict:
        out = {
            "id": self.node_id,
            "role": self.role,
            "term": self.term,
            "vote": self.vote,
            "leader": self.leader,
            "commit": self.commit,
            "applied": self.applied,
            "voters": list(self.log.voters),
            "learners": sorted(self._learner_ids - set(self.log.voters)),
            "last_index": self.log.last_index,
            "snapshot_index": self.log.offset,
            "lead_transferee": self._transferee,
        }
        if self.state == LEADER:
            out["progress"] = {i: pr.view() for i, pr in sorted(self.prs.items())}
        return out

    def writable(self) -> tuple[bool, str]:
        """(True, "") if proposals can commit through this node now, else
        (False, one line naming the last known leader and term)."""
        E = self.s.election_ticks
        if self.state == LEADER:
            if self._transferee is not None:
                return False, (f"read-only: leader {self.node_id} (term {self.term}) is handing over "
                               f"to {self._transferee}")
            heard, n = self._active_voters()
            if self.s.check_quorum and heard < len(self.log.voters) // 2 + 1:
                return False, (f"read-only: leader {self.node_id} (term {self.term}) heard from only {heard} of {n} "
                               f"voters within {self._secs(E)}; cannot reach a majority of the voters")
            return True, ""
        # A learner hears from the leader only every learner_heartbeat_ticks when idle.
        window = E if self._promotable() else max(E, self.s.learner_heartbeat_ticks + 1)
        if self.leader is not None and self._leader_heard_at is not None and self.now - self._leader_heard_at <= window:
            return True, ""
        since = self.now - (self._leader_heard_at or 0)
        last = self._last_leader or "none"
        if self.role == LEARNER:
            why = "this node is not a voter and waits to hear from a leader"
        elif self.state in (CANDIDATE, PRECANDIDATE):
            why = "election in progress; cannot reach a majority of the voters yet"
        else:
            why = "cannot reach a majority of the voters"
        return False, f"read-only: no leader for {self._secs(since)} (last leader {last}, term {self._last_leader_term}); {why}"

    def _secs(self, ticks: int) -> str:
        return f"{ticks * self.s.tick_ms / 1000:.1f} s"

    # ----------------------------------------------------------------- inputs

    def tick(self) -> None:
        self.now += 1
        if self.state == LEADER:
            self._tick_leader()
            return
        self.election_elapsed += 1
        if not self._promotable():
            return
        if self.log.voters == (self.node_id,) or self.election_elapsed >= self._randomized_timeout:
            self.election_elapsed = 0
            self._campaign(self.s.pre_vote)

    def campaign(self) -> None:
        """Start an election now (etcd's MsgHup); ignored by a leader or a non-voter."""
        if self.state != LEADER and self._promotable():
            self._campaign(self.s.pre_vote)

    def propose(self, data: bytes) -> int:
        """Append a command (leader only) and return its index."""
        if type(data) is not bytes or len(data) > MAX_DATA:
            raise ValueError(f"proposal must be bytes of at most {MAX_DATA}")
        if self.state != LEADER:
            raise NotLeader(self.leader, self.term, self._not_leader_reason())
        if self._transferee is not None:
            raise Refused(f"leadership transfer to {self._transferee} in progress")
        return self._append(EntryKind.NORMAL, data)

    def forward(self, data: bytes) -> None:
        """Hand a proposal to the leader (a leader proposes it itself)."""
        if type(data) is not bytes or len(data) > MAX_DATA:
            raise ValueError(f"proposal must be bytes of at most {MAX_DATA}")
        if self.state == LEADER:
            self.propose(data)
        elif self.leader is None:
            raise NotLeader(None, self.term, self._not_leader_reason())
        else:
            self._send(Forward(self.node_id, self.leader, self.term, data))

    def propose_conf(self, change: ConfChange) -> int:
        """Add or remove one voter (leader only); Refused while another change
        is uncommitted, before an entry of this term committed, or for a no-op."""
        check_node_id(change.node)
        if change.op not in ("add", "remove"):
            raise ValueError(f"conf change op must be add or remove, not {change.op!r}")
        if self.state != LEADER:
            raise NotLeader(self.leader, self.term, self._not_leader_reason())
        if self._transferee is not None:
            raise Refused(f"leadership transfer to {self._transferee} in progress")
        log = self.log
        if log.term(self.commit) != self.term:
            raise Refused(f"no entry of term {self.term} is committed yet")
        if log.last_conf_index > self.commit:
            raise Refused(f"configuration change at index {log.last_conf_index} is not committed yet")
        voters = log.voters
        if change.op == "add":
            if change.node in voters:
                raise Refused(f"{change.node} is already a voter")
            if len(voters) >= MAX_VOTERS:
                raise Refused(f"already {MAX_VOTERS} voters")
        else:
            if change.node not in voters:
                raise Refused(f"{change.node} is not a voter")
            if voters == (change.node,):
                raise Refused("cannot remove the last voter")
        return self._append(EntryKind.CONF, change.encode())

    def read_index(self, ctx: bytes) -> None:
        """Ask for a linearizable read point; the answer is a ReadState later."""
        if type(ctx) is not bytes or len(ctx) > MAX_CTX:
            raise ValueError(f"read ctx must be bytes of at most {MAX_CTX}")
        if self.state == LEADER:
            self._leader_read(ctx, None)
        elif self.leader is not None:
            self._send(ReadIndexReq(self.node_id, self.leader, self.term, ctx))
        else:
            self._read_states.append(ReadState(ctx, -1, self._not_leader_reason()))

    def transfer_leadership(self, target: str | None = None) -> None:
        """Hand leadership to `target` (None: the most caught-up other voter)."""
        if self.state != LEADER:
            raise NotLeader(self.leader, self.term, self._not_leader_reason())
        voters = self.log.voters
        if target is None:
            others = [v for v in voters if v != self.node_id and v in self.prs]
            if not others:
                raise Refused("no other voter to hand leadership to")
            target = max(others, key=lambda v: (self.prs[v].match, v))
        if target == self.node_id:
            return
        if target not in voters:
            raise Refused(f"{target} is not a voter")
        if self._transferee == target:
            return
        self._transferee = target
        self._transfer_elapsed = 0
        pr = self.prs[target]
        if pr.match == self.log.last_index:
            self._send(TimeoutNow(self.node_id, target, self.term))
        else:
            self._dirty.add(target)

    def set_learners(self, ids: set[str]) -> None:
        """Non-voting replication targets (the other live members of the mesh)."""
        self._learner_ids = {check_node_id(i) for i in ids} - {self.node_id}
        if self.state == LEADER:
            self._sync_progress()

    def compact(self, meta: SnapshotMeta) -> None:
        """The driver snapshotted the state machine at meta.index (<= applied):
        drop the log up to there. `meta.voters` must be `voters_at(meta.index)`."""
        log = self.log
        if meta.index <= log.offset:
            return
        if meta.index > self.applied:
            raise ValueError(f"cannot compact to {meta.index}: only {self.applied} applied")
        if log.term(meta.index) != meta.term:
            raise ValueError(f"snapshot term {meta.term} at {meta.index} but the log has {log.term(meta.index)}")
        if tuple(sorted(meta.voters)) != log.voters_at(meta.index):
            raise ValueError(f"snapshot voters {meta.voters} but the log has {log.voters_at(meta.index)} at {meta.index}")
        log.compact(meta)

    def applied_to(self, index: int) -> None:
        if index > self._applying:
            raise ValueError(f"applied {index} but only {self._applying} were handed out")
        if index > self.applied:
            self.applied = index

    # ------------------------------------------------------------- ready loop

    def has_ready(self) -> bool:
        self._flush()
        log = self.log
        return bool(
            self._msgs or self._read_states or self._refused or self._snapshot_out is not None
            or log.last_index > log.emitted
            or min(self.commit, log.stable) > self._applying
            or self.term != self._hs_emitted.term or self.vote != self._hs_emitted.vote
            or self.commit != self._hs_emitted.commit
            or (self.role, self.leader, self.term) != self._soft_emitted
        )

    def ready(self) -> Ready:
        self._flush()
        log = self.log
        rd = Ready()
        hs = self._hs_emitted
        if self.term != hs.term or self.vote != hs.vote or self.commit != hs.commit:
            rd.hard_state = self._hs_emitted = HardState(self.term, self.vote, self.commit)
        if log.last_index > log.emitted:
            rd.entries = log.slice(log.emitted + 1, log.last_index + 1)
            log.emitted = log.last_index
        if self._snapshot_out is not None:
            rd.snapshot, self._snapshot_out = self._snapshot_out, None
        rd.messages, self._msgs = self._msgs, []
        hi = min(self.commit, log.stable)
        if hi > self._applying:
            rd.committed = log.slice(self._applying + 1, hi + 1)
            self._applying = hi
        if self._read_states:
            rd.read_states, self._read_states = self._read_states, []
        if self._refused:
            rd.forward_refused, self._refused = self._refused, []
        soft = (self.role, self.leader, self.term)
        if soft != self._soft_emitted:
            rd.soft_state = self._soft_emitted = soft
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver made `rd` durable (and sent and applied it)."""
        log = self.log
        if rd.snapshot is not None and rd.snapshot[0].index > self.applied:
            self.applied = rd.snapshot[0].index
        if rd.entries:
            # Normally the last entry is still ours; after a truncation since
            # ready(), only the prefix still in the log counts as durable.
            old = log.stable
            for e in reversed(rd.entries):
                if e.index <= old:
                    break
                if log.term(e.index) == e.term:
                    log.stable = min(e.index, log.emitted)
                    break
            if log.stable > old and self.state == LEADER:
                me = self.prs[self.node_id]
                me.match, me.next, me.state = log.stable, log.stable + 1, REPLICATE
                if self._maybe_commit():
                    self._bcast = True

    # ------------------------------------------------------------------- step

    def step(self, m) -> None:
        """Handle one message from a peer (already decoded and checked)."""
        if m.to != self.node_id or m.frm == self.node_id:
            self.counters.inc("raft_misaddressed")
            return
        t = type(m)
        if m.term > self.term:
            if t is PreVote or t is Vote:
                if not m.force and self._in_lease():
                    self.counters.inc("raft_vote_in_lease")
                    return
            if t is PreVote or (t is PreVoteResp and not m.reject):
                pass  # a pre-vote never changes terms; a granted one is counted below
            elif t is Append or t is InstallSnapshot:
                self._become_follower(m.term, m.frm)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if t is Forward or t is ReadIndexReq:
                pass  # a request from a node that lags behind: the term does not matter
            elif t is Append and (self.s.check_quorum or self.s.pre_vote):
                # A leader cut off (and outvoted) meanwhile: tell it our term so it steps down.
                # With pre-vote it could otherwise never learn it, as nobody bumps its term.
                self._send(AppendResp(self.node_id, m.frm, self.term, 0))
                return
            elif t is PreVote:
                self._send(PreVoteResp(self.node_id, m.frm, self.term, True))
                return
            else:
                self.counters.inc("raft_stale_term")
                return
        if t is PreVote or t is Vote:
            self._handle_vote_request(m)
            return
        handler = _HANDLERS[self.state].get(t)
        if handler is not None:
            handler(self, m)

    # ---------------------------------------------------------------- votes

    def _in_lease(self) -> bool:
        """Did we hear from a live leader within E ticks (so refuse to help depose it)?"""
        if not self.s.check_quorum or self.leader is None:
            return False
        if self.state == LEADER:
            return True
        return self.election_elapsed < self.s.election_ticks

    def _handle_vote_request(self, m) -> None:
        pre = type(m) is PreVote
        can_vote = (
            self.vote == m.frm
            or (self.vote is None and self.leader is None)
            or (pre and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.last_index, m.last_term):
            self._send((PreVoteResp if pre else VoteResp)(self.node_id, m.frm, m.term, False))
            if not pre:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send((PreVoteResp if pre else VoteResp)(self.node_id, m.frm, self.term, True))

    def _promotable(self) -> bool:
        return self.node_id in self.log.voters

    def _campaign(self, pre: bool, force: bool = False) -> None:
        if pre:
            self._become_precandidate()
            term = self.term + 1
            kind = PreVote
        else:
            self._become_candidate()
            term = self.term
            kind = Vote
        self._votes = {self.node_id: True}
        if self._tally() > 0:
            if pre:
                self._campaign(False, force)
            else:
                self._become_leader()
            return
        last_index, last_term = self.log.last_index, self.log.last_term
        for v in self.log.voters:
            if v != self.node_id:
                self._send(kind(self.node_id, v, term, last_index, last_term, force))

    def _tally(self) -> int:
        """1 won, -1 lost, 0 undecided (counting only current voters)."""
        voters = self.log.voters
        q = len(voters) // 2 + 1
        yes = sum(1 for v in voters if self._votes.get(v) is True)
        no = sum(1 for v in voters if self._votes.get(v) is False)
        return 1 if yes >= q else -1 if no > len(voters) - q else 0

    def _on_vote_resp(self, m) -> None:
        want = PreVoteResp if self.state == PRECANDIDATE else VoteResp
        if type(m) is not want:
            return
        self._votes.setdefault(m.frm, not m.reject)
        res = self._tally()
        if res > 0:
            if self.state == PRECANDIDATE:
                self._campaign(False)
            else:
                self._become_leader()
        elif res < 0:
            self._become_follower(self.term, None)

    # ---------------------------------------------------------- transitions

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.leader = None
        self.election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._learner_elapsed = 0
        self._reset_timeout()
        self._transferee = None
        self._votes = {}
        self._bcast = False
        self._dirty.clear()
        self._read_hb = False

    def _reset_timeout(self) -> None:
        E = self.s.election_ticks
        self._randomized_timeout = self.rng.randrange(E, 2 * E)

    def _become_follower(self, term: int, leader: str | None) -> None:
        if self.state == LEADER:
            self._fail_reads(f"{self.node_id} lost the leadership in term {self.term}")
            self.prs = {}
            self._leader_heard_at = self.now  # we were the leader until now
        self._reset(term)
        self.state = FOLLOWER
        if leader is not None:
            self._heard_leader(leader)

    def _heard_leader(self, leader: str) -> None:
        self.leader = leader
        self._leader_heard_at = self.now
        self._last_leader, self._last_leader_term = leader, self.term

    def _become_precandidate(self) -> None:
        # Like etcd: no term change, no vote, and we forget the leader.
        self.state = PRECANDIDATE
        self.leader = None
        self._votes = {}
        self.election_elapsed = 0
        self._reset_timeout()

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.node_id
        self.state = CANDIDATE

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.state = LEADER
        self._heard_leader(self.node_id)
        self.prs = {}
        self._sync_progress(self.log.last_index + 1)
        me = self.prs[self.node_id]
        me.match, me.next, me.state = self.log.stable, self.log.stable + 1, REPLICATE
        self._reads.clear()
        self._reads_waiting_commit.clear()
        self._append(EntryKind.NORMAL, b"")

    def _sync_progress(self, nxt: int | None = None) -> None:
        """Progress for every voter and learner (and us), none for anyone else.
        A newcomer is first probed with our last entry (etcd does the same)."""
        voters = self.log.voters
        want = set(voters) | self._learner_ids | {self.node_id}
        if nxt is None:
            nxt = max(self.log.last_index, 1)
        old = self.prs
        self.prs = {}  # rebuilt in sorted order, so sends are in a stable order
        for i in sorted(want):
            pr = old.get(i)
            if pr is None:
                pr = Progress(nxt, self.now)
                self._dirty.add(i)
            pr.learner = i not in voters
            self.prs[i] = pr
        self._dirty.discard(self.node_id)

    def _on_config_change(self) -> None:
        if self.state == LEADER:
            self._sync_progress()
            if self._transferee is not None and self._transferee not in self.log.voters:
                self._transferee = None
            if self._maybe_commit():
                self._bcast = True
            self._release_reads()
        elif self.state in (CANDIDATE, PRECANDIDATE):
            if not self._promotable():
                self._become_follower(self.term, None)
            else:
                res = self._tally()
                if res < 0:
                    self._become_follower(self.term, None)

    # ----------------------------------------------------------- the leader

    def _append(self, kind: EntryKind, data: bytes) -> int:
        log = self.log
        index = log.last_index + 1
        log.append(Entry(index, self.term, kind, data))
        self._bcast = True
        if kind == EntryKind.CONF:
            self._on_config_change()
        return index

    def _tick_leader(self) -> None:
        s = self.s
        self.election_elapsed += 1
        if self.election_elapsed >= s.election_ticks:
            self.election_elapsed = 0
            if s.check_quorum:
                heard, _ = self._active_voters()
                if heard < len(self.log.voters) // 2 + 1:
                    self.counters.inc("raft_check_quorum_stepdown")
                    self._become_follower(self.term, None)
                    return
        if self._transferee is not None:
            self._transfer_elapsed += 1
            if self._transfer_elapsed >= s.transfer_timeout:
                self.counters.inc("raft_transfer_timeout")
                self._transferee = None
        for i, pr in self.prs.items():
            if pr.state == SNAPSHOT:
                pr.snapshot_elapsed += 1
                if pr.snapshot_elapsed >= s.election_ticks:
                    pr.become_probe()
                    self._dirty.add(i)
        self._heartbeat_elapsed += 1
        self._learner_elapsed += 1
        voters = self._heartbeat_elapsed >= s.heartbeat_ticks
        learners = self._learner_elapsed >= s.learner_heartbeat_ticks
        if voters:
            self._heartbeat_elapsed = 0
        if learners:
            self._learner_elapsed = 0
        if voters or learners:
            self._heartbeat(voters, learners)

    def _active_voters(self) -> tuple[int, int]:
        """(voters heard from within E ticks, us included, and all voters)."""
        E = self.s.election_ticks
        heard = 0
        for v in self.log.voters:
            if v == self.node_id:
                heard += 1
            else:
                pr = self.prs.get(v)
                if pr is not None and self.now - pr.last_heard <= E:
                    heard += 1
        return heard, len(self.log.voters)

    def _heartbeat(self, voters: bool, learners: bool) -> int:
        """One heartbeat round (an empty Append to each chosen follower)."""
        self._hb_round += 1
        r = self._hb_round
        ctx = _round_ctx(r)
        log = self.log
        me, term = self.node_id, self.term
        for i, pr in self.prs.items():
            if i == me or not (learners if pr.learner else voters):
                continue
            if pr.state == PROBE:
                prev = pr.next - 1
            else:
                prev = pr.match
            prev_term = log.term(prev)
            if prev_term is None:
                prev, prev_term = 0, 0  # compacted: a pure liveness ping
            if not pr.mark_round:  # one mark at a time: its answer may come rounds later
                pr.mark_round, pr.mark_next = r, pr.next
            self._msgs.append(Append(me, i, term, prev, prev_term, (), min(self.commit, prev), ctx))
        if voters:
            self._read_hb = False
        return r

    def _flush(self) -> None:
        """Send what the followers need: new entries, and commit advances."""
        if self.state != LEADER:
            self._bcast = False
            self._dirty.clear()
            return
        if self._read_hb:
            self._heartbeat(True, False)
        if self._bcast:
            self._bcast = False
            self._dirty.clear()
            for i, pr in self.prs.items():
                if i != self.node_id:
                    self._pump(i, pr)
        elif self._dirty:
            dirty, self._dirty = self._dirty, set()
            for i in sorted(dirty):
                pr = self.prs.get(i)
                if pr is not None and i != self.node_id:
                    self._pump(i, pr)

    def _pump(self, to: str, pr: Progress) -> None:
        log = self.log
        s = self.s
        while True:
            if pr.is_paused(s.max_inflight):
                return
            nxt = pr.next
            if nxt > log.last_index:
                break
            prev_term = log.term(nxt - 1)
            if prev_term is None:
                self._send_snapshot(to, pr)
                return
            ents = log.batch(nxt, s.max_append_entries, s.max_append_bytes)
            last = ents[-1].index
            self._msgs.append(Append(self.node_id, to, self.term, nxt - 1, prev_term, ents, self.commit))
            pr.sent_commit = min(self.commit, last)
            pr.sent(last)
            if pr.state != REPLICATE:
                return
        # Nothing new to send: tell a caught-up follower about a commit advance.
        if pr.state == REPLICATE:
            c = min(self.commit, pr.match)
            if pr.sent_commit < c:
                prev_term = log.term(pr.match)
                if prev_term is not None:
                    self._msgs.append(Append(self.node_id, to, self.term, pr.match, prev_term, (), self.commit))
                    pr.sent_commit = c

    def _send_snapshot(self, to: str, pr: Progress) -> None:
        meta = self.log.snapshot
        if meta is None:  # cannot happen: a compacted log has a snapshot
            return
        self._msgs.append(InstallSnapshot(self.node_id, to, self.term, meta, None))
        pr.become_snapshot(meta.index)

    def _maybe_commit(self) -> bool:
        """Commit the highest index a majority of voters hold, if of our term."""
        voters = self.log.voters
        if not voters:
            return False
        prs = self.prs
        matches = sorted((prs[v].match if v in prs else 0 for v in voters), reverse=True)
        q = matches[len(voters) // 2]
        if q <= self.commit or self.log.term(q) != self.term:
            return False
        self.commit = q
        self._after_commit()
        return True

    def _after_commit(self) -> None:
        if self._reads_waiting_commit and self.log.term(self.commit) == self.term:
            waiting, self._reads_waiting_commit = self._reads_waiting_commit, []
            for ctx, frm in waiting:
                self._leader_read(ctx, frm)
        if self.node_id not in self.log.voters and self.commit >= self.log.last_conf_index:
            self._step_down_removed()

    def _step_down_removed(self) -> None:
        """Our removal committed: hand over to the most caught-up voter at once
        (instead of letting the others wait out an election timeout), step down."""
        last = self.log.last_index
        ready = [v for v in self.log.voters if v in self.prs and self.prs[v].match == last]
        if ready:
            self._send(TimeoutNow(self.node_id, min(ready), self.term))
        self.counters.inc("raft_removed_stepdown")
        self._become_follower(self.term, None)

    def _on_append_resp(self, m: AppendResp) -> None:
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        pr.last_heard = self.now
        heartbeat_round = 0
        if m.ctx:
            heartbeat_round = int.from_bytes(m.ctx, "big")
            if heartbeat_round > pr.acked_round:
                pr.acked_round = heartbeat_round
                if self._reads and not pr.learner:
                    self._release_reads()
        if m.reject:
            probe = m.reject_hint
            if m.hint_term:
                # Skip our entries of terms newer than the follower's entry at its hint.
                probe = self.log.find_conflict_by_term(min(probe, self.log.last_index), m.hint_term)
            if pr.maybe_decrease(m.index, probe):
                if pr.state == REPLICATE:
                    pr.become_probe()
                self._dirty.add(m.frm)
            elif heartbeat_round and pr.state == PROBE:
                pr.paused = False
                self._dirty.add(m.frm)
            return
        if pr.maybe_update(m.index) or (pr.state == PROBE and m.index == pr.match):
            if pr.state == PROBE:
                pr.become_replicate()
            elif pr.state == SNAPSHOT and pr.match + 1 >= self.log.first_index:
                pr.become_probe()
                pr.become_replicate()
            if not pr.learner and self._maybe_commit():
                self._bcast = True
            if m.frm == self._transferee and pr.match == self.log.last_index:
                self._send(TimeoutNow(self.node_id, m.frm, self.term))
            if self.state != LEADER:
                return
            self._dirty.add(m.frm)
        elif heartbeat_round:
            if pr.state == PROBE:
                pr.paused = False  # the probe may be lost: send it again
                self._dirty.add(m.frm)
            elif pr.mark_round and heartbeat_round >= pr.mark_round:
                # Everything sent before the marked heartbeat should have been acked by
                # now (a later round's answer counts too: the marked one may be lost).
                lost = pr.state == REPLICATE and pr.match < pr.mark_next - 1
                pr.mark_round = 0
                if lost:
                    self.counters.inc("raft_append_lost")
                    pr.become_probe()
                    self._dirty.add(m.frm)
        if pr.state == REPLICATE and pr.sent_commit < min(self.commit, pr.match):
            self._dirty.add(m.frm)

    def _on_forward(self, m: Forward) -> None:
        if self.state != LEADER or self._transferee is not None:
            reason = (f"leadership transfer from {self.node_id} to {self._transferee} in progress"
                      if self.state == LEADER else self._not_leader_reason())
            self._send(ForwardRefused(self.node_id, m.frm, self.term, reason[:MAX_REASON]))
            return
        self._append(EntryKind.NORMAL, m.data)

    def _on_read_req(self, m: ReadIndexReq) -> None:
        if self.state != LEADER:
            self._send(ReadIndexResp(self.node_id, m.frm, self.term, m.ctx, 0, True))
            return
        self._leader_read(m.ctx, m.frm)

    def _leader_read(self, ctx: bytes, frm: str | None) -> None:
        if self.log.term(self.commit) != self.term:
            self._reads_waiting_commit.append((ctx, frm))
            return
        if self.log.voters == (self.node_id,):
            self._answer_read(_Read(ctx, frm, self.commit, 0))
            return
        self._reads.append(_Read(ctx, frm, self.commit, self._hb_round + 1))
        self._read_hb = True

    def _release_reads(self) -> None:
        reads = self._reads
        voters = self.log.voters
        q = len(voters) // 2 + 1
        while reads:
            r = reads[0].round
            acks = 0
            for v in voters:
                if v == self.node_id:
                    acks += 1
                else:
                    pr = self.prs.get(v)
                    if pr is not None and pr.acked_round >= r:
                        acks += 1
            if acks < q:
                return
            self._answer_read(reads.popleft())

    def _answer_read(self, rd: _Read) -> None:
        if rd.frm is None:
            self._read_states.append(ReadState(rd.ctx, rd.index))
        else:
            self._send(ReadIndexResp(self.node_id, rd.frm, self.term, rd.ctx, rd.index, False))

    def _fail_reads(self, reason: str) -> None:
        pending = [(r.ctx, r.frm) for r in self._reads] + self._reads_waiting_commit
        self._reads.clear()
        self._reads_waiting_commit = []
        for ctx, frm in pending:
            if frm is None:
                self._read_states.append(ReadState(ctx, -1, reason))
            else:
                self._send(ReadIndexResp(self.node_id, frm, self.term, ctx, 0, True))

    # --------------------------------------------------------- the follower

    def _on_append(self, m: Append) -> None:
        if self.state != FOLLOWER:
            self._become_follower(m.term, m.frm)
        self.election_elapsed = 0
        self._heard_leader(m.frm)
        log = self.log
        if m.prev_index < self.commit:
            self._send(AppendResp(self.node_id, m.frm, self.term, self.commit, ctx=m.ctx))
            return
        if log.term(m.prev_index) == m.prev_term:
            ents = m.entries
            last_new = m.prev_index + len(ents)
            if ents:
                conflict = log.find_conflict(ents)
                if conflict:
                    if conflict <= self.commit:  # a leader rewriting committed entries: never apply it
                        self.counters.inc("raft_conflict_below_commit")
                        return
                    old = log.voters
                    log.truncate_and_append(ents[conflict - ents[0].index:])
                    if log.voters != old:
                        self._on_config_change()
            c = min(m.commit, last_new)
            if c > self.commit:
                self.commit = c
            self._send(AppendResp(self.node_id, m.frm, self.term, last_new, ctx=m.ctx))
        else:
            hint = log.find_conflict_by_term(min(m.prev_index, log.last_index), m.prev_term)
            self._send(AppendResp(self.node_id, m.frm, self.term, m.prev_index, True, hint, m.ctx,
                                  log.term(hint) or 0))

    def _on_snapshot(self, m: InstallSnapshot) -> None:
        if self.state != FOLLOWER:
            self._become_follower(m.term, m.frm)
        self.election_elapsed = 0
        self._heard_leader(m.frm)
        meta = m.meta
        if meta.index <= self.commit:
            self._send(AppendResp(self.node_id, m.frm, self.term, self.commit))
            return
        if m.data is None:
            return  # the driver fetches the data out of band and steps this again
        log = self.log
        if log.term(meta.index) == meta.term:
            # We hold the snapshot's last entry: no need to throw the log away.
            self.commit = meta.index
            self._send(AppendResp(self.node_id, m.frm, self.term, meta.index))
            return
        old = log.voters
        log.restore(meta)
        self.commit = meta.index
        self._applying = meta.index
        self._snapshot_out = (meta, m.data)
        if log.voters != old:
            self._on_config_change()
        self._send(AppendResp(self.node_id, m.frm, self.term, meta.index))

    def _on_timeout_now(self, m: TimeoutNow) -> None:
        if self._promotable():
            self.counters.inc("raft_timeout_now")
            self._campaign(False, force=True)

    def _on_read_resp(self, m: ReadIndexResp) -> None:
        if m.reject:
            self._read_states.append(ReadState(m.ctx, -1, f"{m.frm} refused the read: not the leader (term {m.term})"))
        else:
            self._read_states.append(ReadState(m.ctx, m.index))

    def _on_forward_refused(self, m: ForwardRefused) -> None:
        self._refused.append(m)

    def _on_candidate_append(self, m) -> None:
        self._become_follower(m.term, m.frm)
        if type(m) is Append:
            self._on_append(m)
        else:
            self._on_snapshot(m)

    # ---------------------------------------------------------------- misc

    def _send(self, m) -> None:
        self._msgs.append(m)

    def _not_leader_reason(self) -> str:
        if self.leader is not None:
            return f"{self.node_id} is not the leader: {self.leader} is (term {self.term})"
        last = self._last_leader or "none"
        return f"{self.node_id} knows no leader (last leader {last}, term {self._last_leader_term})"


_COMMON = {
    ReadIndexResp: Raft._on_read_resp,
    ForwardRefused: Raft._on_forward_refused,
    ReadIndexReq: Raft._on_read_req,
    Forward: Raft._on_forward,
}
_HANDLERS = {
    FOLLOWER: {**_COMMON, Append: Raft._on_append, InstallSnapshot: Raft._on_snapshot, TimeoutNow: Raft._on_timeout_now},
    PRECANDIDATE: {**_COMMON, Append: Raft._on_candidate_append, InstallSnapshot: Raft._on_candidate_append,
                   PreVoteResp: Raft._on_vote_resp, VoteResp: Raft._on_vote_resp},
    CANDIDATE: {**_COMMON, Append: Raft._on_candidate_append, InstallSnapshot: Raft._on_candidate_append,
                PreVoteResp: Raft._on_vote_resp, VoteResp: Raft._on_vote_resp},
    LEADER: {**_COMMON, AppendResp: Raft._on_append_resp},
}

__all__ = [
    "FIELD_DOCS", "RaftSettings", "HardState", "Recovered", "Ready", "ReadState", "NotLeader", "Refused",
    "Raft", "BadMessage",
]
