"""Voter autopilot: which mesh members vote in Raft when `consensus.voters = "auto"`.

Theory of operation
-------------------
The Raft leader's driver calls `Autopilot.decide()` now and then (every tick
of its choosing, and whenever membership or the configuration changed) with
what it knows: the time, its term, the voter configuration (the latest one in
the log), its replication view (match index per node, commit index) and the
membership view (`MemberView` per member: alive, suspect, since_ms, headroom,
eligible). The answer is a `Decision`: at most one `ConfChange` and a reason
for logs and status. The driver proposes the change through Raft (one
uncommitted configuration change at a time; `propose_conf` refuses a second
one, so calling again before the last change committed is harmless) and asks
again later. Nothing here reads a clock or draws a random number: the same
inputs give the same answer on every board.

Learned from Consul's Autopilot (hashicorp/raft-autopilot), written for a
mesh with no dedicated servers:

* Target size. Count the eligible members that have not left (alive or
  suspect; see "Hysteresis" below): 5 or more gives 5 voters, 3 or 4 gives 3,
  fewer gives 1. Never an even target, never more than `MAX_VOTERS`.
* Promotion (Consul's server stabilisation). A non-voter is ready once it
  has been healthy (alive, not suspect) for `stabilization_ms` without a
  break, is eligible, and its match index is within `max_lag_entries` of
  the commit index (so adding it cannot stall commits while it catches up).
  The best ready member wins: highest headroom, then smallest node id.
* Dead voters (Consul's dead server cleanup). A voter dead for
  `dead_voter_ms` is replaced: its replacement is added first when one is
  ready and there is room (fewer than 5 voters and not above target), so
  the number of live voters never drops; then the dead voter is removed.
  With no replacement, or no room, it is simply removed: removing a dead
  voter never makes a quorum harder to reach. A suspect voter is never
  removed: it may answer yet.
* Retiring voters. A live voter the configuration no longer allows to vote
  (eligible=False) is replaced the same way, but its removal also passes
  the live-voter safety check below.
* Shrinking. A live voter is removed only when the configuration is above
  target, every voter is healthy (dead ones go first, and a suspicion
  pauses shrinking), it is not the leader, the configuration has at least
  3 voters (never 2 -> 1 by removing a live node), and the healthy voters
  left can still form a quorum of the smaller configuration. The lowest-
  ranked voter goes (lowest headroom, then largest node id).
* An even configuration only exists in passing (an add before a remove,
  or a remove before an add); the rules above always move it back to odd:
  if it is below target it grows, above target it shrinks.
* Safety net (Consul's "failed servers must be fewer than half" rule): when
  fewer than a quorum of voters are alive, the leader could not commit a
  change anyway and its view is suspect; the core proposes nothing.
* The leader is never removed: leadership transfer is the driver's business.

Adding a healthy voter never lowers (live voters - quorum); removing a dead
one never lowers it; removing a live one is checked explicitly. So no change
proposed here can turn a working cluster into one without a quorum.

Hysteresis. The target counts eligible members that are alive or suspect (not
only healthy ones) so that a SWIM suspicion that gets refuted a second later
does not shrink the configuration and grow it back. Promotion still requires
`stabilization_ms` of unbroken health, so a flapping member never votes.

Memory. The one thing kept between calls is when this leader first saw each
voter dead (`Autopilot.dead_since`); `MemberView.since_ms` is only used for
live members (when they last became alive). Chosen over a membership "dead
since" field because (a) a voter may be absent from the view altogether (its
tombstone expired, or this leader never knew it) and must still be replaced,
and (b) the clock then belongs to the one node that acts on it. The memory
is forgotten when the term changes (pass the leader's term): a new leader
waits a full `dead_voter_ms` before removing anyone, which errs on the side
of not removing a voter that may be back soon.

Bootstrap. `bootstrap_choice()` picks, in auto mode with no cluster yet, the
single member that should bootstrap a one-voter cluster; the others wait to
hear from its leader and are then promoted by the rules above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.core.raft_messages import ConfChange
from agent.core.settings import range_problems

MAX_VOTERS = 5  #: never more voters than this (Raft's sweet spot for a LAN fleet: tolerates 2 failures)

# name: (unit, minimum, maximum, meaning). Defaults live on the dataclass.
FIELD_DOCS: dict[str, tuple[str, int, int, str]] = {
    "stabilization_ms": ("ms", 0, 3_600_000, "a non-voter must be healthy (alive, not suspect) this long without a break before it is promoted (Consul: 10 s)"),
    "max_lag_entries": ("entries", 0, 1_000_000, "a non-voter is promoted only while its match index is within this many entries of the commit index"),
    "dead_voter_ms": ("ms", 1000, 7 * 86_400_000, "a voter the leader has seen dead this long is replaced (replacement added first when one is ready), then removed"),
}


@dataclass(frozen=True)
class VoterSettings:
    stabilization_ms: int = 10_000
    max_lag_entries: int = 1000
    dead_voter_ms: int = 60_000

    def problems(self) -> list[tuple[str, object, str]]:
        """(field, value, what is allowed) for every out-of-range or inconsistent field."""
        out = range_problems(self, FIELD_DOCS)
        if not out and self.dead_voter_ms < self.stabilization_ms:
            # Otherwise a voter that merely rebooted is replaced before it could
            # even have been promoted again: churn for nothing.
            out.append(("dead_voter_ms", self.dead_voter_ms, f"at least stabilization_ms ({self.stabilization_ms})"))
        return out


@dataclass(frozen=True, slots=True)
class MemberView:
    """What the membership layer says about one member, as the driver sees it now.

    alive: SWIM status alive or suspect (False: dead, left, or never heard of).
    suspect: SWIM suspect; a suspect member is alive but not healthy.
    since_ms: when it last became alive (healthy without a break since then,
        unless suspect); ignored while it is dead.
    headroom: higher = more spare RAM/CPU (the driver computes it from the
        board's RAM and the gossiped load).
    eligible: False when the configuration excludes it from voting.
    """

    alive: bool
    suspect: bool = False
    since_ms: int = 0
    headroom: float = 0.0
    eligible: bool = True

    def __post_init__(self):
        for name in ("alive", "suspect", "eligible"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, not {getattr(self, name)!r}")
        if self.suspect and not self.alive:
            raise ValueError("a suspect member is alive (suspect=True needs alive=True)")
        if not isinstance(self.since_ms, int) or isinstance(self.since_ms, bool):
            raise ValueError(f"since_ms must be an int, not {self.since_ms!r}")
        h = self.headroom
        if not isinstance(h, (int, float)) or isinstance(h, bool) or not math.isfinite(h):
            raise ValueError(f"headroom must be a finite number, not {h!r}")

    @property
    def healthy(self) -> bool:
        return self.alive and not self.suspect


@dataclass(frozen=True, slots=True)
class Decision:
    change: ConfChange | None  #: propose it with Raft.propose_conf; None: leave the configuration as it is
    reason: str  #: one line for logs and `status`, always set
    target: int  #: the voter count the autopilot is steering towards (0 when it cannot tell)


def target_size(members: int) -> int:
    """Voters wanted for this many eligible members: 5, 3 or 1, never even."""
    if members >= 5:
        return 5
    return 3 if members >= 3 else 1


def quorum(n: int) -> int:
    return n // 2 + 1


def _rank(node: str, m: MemberView) -> tuple[float, str]:
    """Sort key, best first: most headroom, then smallest node id."""
    return (-m.headroom, node)


def _s(ms: int) -> str:
    """Seconds with one decimal, truncated (9999 ms is "9.9 s", not a misleading "10.0 s")."""
    return f"{ms // 100 / 10:.1f} s"


def bootstrap_choice(view: Mapping[str, MemberView], now_ms: int, settings: VoterSettings = VoterSettings()) -> str | None:
    """The one member that should bootstrap a one-voter cluster, or None (wait).

    Auto mode with no cluster yet: every node calls this with its own view
    (itself included) and bootstraps only if the answer is itself; the others
    wait to hear from the new leader, which then promotes them. Candidates
    are eligible members healthy for `stabilization_ms`; the best ranked wins
    (most headroom, then smallest node id), as for promotion.

    Residual risk: two nodes whose views differ (a partition at start-up, a
    member one of them has not heard of yet, or headroom gossip that has not
    converged) may each choose themselves and bootstrap two clusters. The
    stabilisation wait makes this unlikely on one LAN, not impossible. Each
    bootstrap mints its own cluster id, so the split is detectable when the
    two meet (messages carrying another cluster id), and the driver can then
    report it or have the smaller cluster rejoin the other. Drivers reduce the
    risk by feeding a slowly varying headroom (board RAM more than load).
    """
    ready = [
        node
        for node, m in view.items()
        if m.eligible and m.healthy and now_ms - m.since_ms >= settings.stabilization_ms
    ]
    return min(ready, key=lambda node: _rank(node, view[node]), default=None)


class Autopilot:
    """Decides, on the leader, the next voter to add or remove (see module doc)."""

    def __init__(self, settings: VoterSettings = VoterSettings()):
        self.settings = settings
        self.term: int | None = None
        self.dead_since: dict[str, int] = {}  #: voter -> when this leader first saw it dead (this term)

    def decide(
        self,
        now_ms: int,
        voters: Sequence[str],
        leader: str,
        match: Mapping[str, int],
        commit: int,
        members: Mapping[str, MemberView],
        *,
        term: int,
    ) -> Decision:
        """The next single change to the voter configuration, or none, and why.

        leader is this node (the caller must be the leader); voters the latest
        configuration in the log; match the leader's match index per node
        (nodes it does not replicate to are absent); members the membership
        view (the leader may be absent from it: it is healthy by definition);
        term the leader's current term (a new term forgets the dead clock).
        """
        if isinstance(voters, str) or not isinstance(leader, str):
            raise ValueError(f"voters must be a sequence of node ids and leader one id, not {voters!r}, {leader!r}")
        voters = tuple(voters)
        if not all(isinstance(v, str) for v in voters) or len(set(voters)) != len(voters):
            raise ValueError(f"voters must be distinct node ids, not {voters!r}")
        if term != self.term:
            self.term = term
            self.dead_since = {}
        if leader not in voters:
            self.dead_since = {}
            return Decision(None, f"{leader} leads but is not a voter (it steps down once its removal commits)", 0)
        return _Round(self, now_ms, leader, voters, match, commit, members).decide()


class _Round:
    """One call of `Autopilot.decide`: the facts, then the rules in order."""

    def __init__(self, ap: Autopilot, now: int, leader: str, voters: tuple[str, ...], match, commit: int, members):
        s = ap.settings
        self.s, self.match, self.commit = s, match, commit
        self.now, self.leader, self.voters, self.view = now, leader, voters, members
        self.n = len(voters)
        vset = set(voters)
        self.dead = [v for v in voters if not self._alive(v)]
        ap.dead_since = {v: ap.dead_since.get(v, now) for v in self.dead}
        self.dead_since = ap.dead_since
        self.long_dead = sorted(
            (v for v in self.dead if now - self.dead_since[v] >= s.dead_voter_ms),
            key=lambda v: (self.dead_since[v], v),
        )
        self.suspect = [v for v in voters if self._alive(v) and not self._healthy(v)]
        self.retiring = self._worst_first(
            v for v in voters if v != leader and v in members and members[v].alive and not members[v].eligible
        )
        me = members.get(leader)
        counted = sum(1 for node, m in members.items() if node != leader and m.alive and m.eligible)
        self.target = target_size(counted + (1 if me is None or me.eligible else 0))
        others = [node for node in members if node not in vset]
        self.ready = sorted((c for c in others if self._ready(c)), key=lambda c: _rank(c, members[c]))
        self.waiting = sorted(
            (c for c in others if members[c].eligible and members[c].alive),
            key=lambda c: _rank(c, members[c]),
        )

    # ------------------------------------------------------------------ facts

    def _alive(self, node: str) -> bool:
        return node == self.leader or (node in self.view and self.view[node].alive)

    def _healthy(self, node: str) -> bool:
        return node == self.leader or (node in self.view and self.view[node].healthy)

    def _worst_first(self, nodes) -> list[str]:
        """Lowest ranked first: least headroom, then largest node id (the reverse of promotion)."""
        none = MemberView(alive=False)
        return sorted(nodes, key=lambda v: _rank(v, self.view.get(v, none)), reverse=True)

    def _ready(self, node: str) -> bool:
        return self._not_ready(node) is None

    def _not_ready(self, node: str) -> str | None:
        """Why this non-voter cannot be promoted yet (None: it can)."""
        m = self.view[node]
        if not m.eligible:
            return f"{node} is not eligible"
        if not m.healthy:
            return f"{node} is {'suspect' if m.alive else 'dead'}"
        up = self.now - m.since_ms
        if up < self.s.stabilization_ms:
            return f"{node} healthy for {_s(max(up, 0))} of {_s(self.s.stabilization_ms)}"
        if node not in self.match:
            return f"{node} is not replicated to yet"
        lag = self.commit - self.match[node]
        if lag > self.s.max_lag_entries:
            return f"{node} lags {lag} entries (max {self.s.max_lag_entries})"
        return None

    def _live_removal_problem(self, node: str) -> str | None:
        """Why removing this live voter could hurt (None: it is safe)."""
        if node == self.leader:
            return f"{node} is the leader"
        if not self._healthy(node):
            return f"{node} is suspect"
        if self.n <= 2:
            return "a 2-voter configuration is never shrunk by removing a live voter"
        rest = [v for v in self.voters if v != node]
        healthy = sum(1 for v in rest if self._healthy(v))
        if healthy < quorum(len(rest)):
            return f"without {node} only {healthy} healthy voters would be left for a quorum of {quorum(len(rest))}"
        return None

    def _add(self, node: str, why: str) -> Decision:
        m = self.view[node]
        lag = self.commit - self.match[node]
        detail = f"healthy {_s(self.now - m.since_ms)}, lag {lag}, headroom {m.headroom:g}"
        return Decision(ConfChange("add", node), f"add {node} ({detail}): {why}", self.target)

    def _remove(self, node: str, why: str) -> Decision:
        return Decision(ConfChange("remove", node), f"remove {node}: {why}", self.target)

    def _none(self, why: str) -> Decision:
        return Decision(None, why, self.target)

    def _size(self) -> str:
        return f"{self.n} voters, target {self.target}"

    # ------------------------------------------------------------------ rules

    def decide(self) -> Decision:
        n, target = self.n, self.target
        live = n - len(self.dead)
        if live < quorum(n):
            return self._none(
                f"no change: only {live} of {n} voters alive, fewer than a quorum of {quorum(n)} "
                f"(dead: {', '.join(self.dead)})"
            )
        room = n < MAX_VOTERS and n <= target  # an add keeps us within target + 1 and within MAX_VOTERS

        # Replace long-dead voters, then voters that may no longer vote.
        going = self.long_dead + self.retiring
        if going and self.ready and room:
            x = going[0]
            state = f"dead for {_s(self.now - self.dead_since[x])}" if x in self.dead_since else "no longer eligible"
            return self._add(self.ready[0], f"replacement for {x} ({state}), added before it is removed; {self._size()}")
        if self.long_dead:
            x = self.long_dead[0]
            return self._remove(x, f"dead for {_s(self.now - self.dead_since[x])} (limit {_s(self.s.dead_voter_ms)}); {self._size()}")
        for x in self.retiring:
            if room:
                break  # a replacement is on its way (target counts it): wait for it
            if self._live_removal_problem(x) is None:
                return self._remove(x, f"no longer eligible to vote; {self._size()}")

        # Grow towards the target.
        if n < target and self.ready:
            return self._add(self.ready[0], f"grow to target; {self._size()}")

        # Shrink towards the target, live voters last and only when all are healthy.
        if n > target:
            if self.dead or self.suspect:
                waits = [f"{v} dead for {_s(self.now - self.dead_since[v])} of {_s(self.s.dead_voter_ms)}" for v in self.dead]
                waits += [f"{v} suspect" for v in self.suspect]
                return self._none(f"above target but not shrinking while {'; '.join(waits)}; {self._size()}")
            problems = []
            for x in self._worst_first(v for v in self.voters if v != self.leader):
                problem = self._live_removal_problem(x)
                if problem is None:
                    return self._remove(x, f"shrink to target (lowest ranked voter); {self._size()}")
                problems.append(problem)
            return self._none(f"above target but no voter can be removed safely ({problems[0] if problems else 'only the leader is left'}); {self._size()}")

        # Nothing to do: say what we are waiting for.
        if self.long_dead or self.retiring or self.dead:
            waits = [f"{v} dead for {_s(self.now - self.dead_since[v])} of {_s(self.s.dead_voter_ms)}" for v in self.dead]
            if room:
                waits += [f"{v} not eligible, waiting for a replacement" for v in self.retiring]
            else:
                waits += [f"{v} not eligible ({self._live_removal_problem(v)})" for v in self.retiring]
            return self._none(f"waiting: {'; '.join(waits)}; {self._size()}")
        if n < target:
            why = self._not_ready(self.waiting[0]) if self.waiting else "no candidate"
            return self._none(f"waiting to grow: {why}; {self._size()}")
        return self._none(f"steady: {self._size()}")
