"""Where a task should run: the pure choices behind the three strategies and
behind work stealing and load balancing.

- capability: of the members that best satisfy the task's required
  capabilities, take two at random and give the task to the less loaded
  ("power of two choices"; Mitzenmacher 2001). Two random samples avoid the
  herd that "always the least loaded" causes when many coordinators decide
  from the same slightly stale gossip, yet keep the worst queue short.
- auction: executors bid (match, load, past performance, free resources);
  the highest weighted score wins (`bid_score`, `best_bid`).
- stealing and balancing: an idle executor asks the most backlogged peers
  (`steal_victims`); an overloaded one hands queued work to idle ones
  (`migration_targets`), with hysteresis (`Overload`) so that a load hovering
  at the threshold does not make it shed and stop by turns.

Nothing here reads a clock or the global random: the caller passes a seeded
`random.Random` and the figures it has gathered.
"""

from __future__ import annotations

import functools

import random
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.core.taskspec import CAP_RE

_INT_RE = re.compile(r"-?[0-9]{1,18}")
_TIE = 1e-9  #: scores this close are equal (float noise), so ties go to the node id

# ----------------------------------------------------------------- capabilities


@functools.lru_cache(maxsize=4096)
def parse_cap(cap: str) -> tuple[str, str, str]:
    """(name, op, value) of `NAME`, `NAME=VALUE` or `NAME>=NUMBER`; op is "",
    "=" or ">=". ValueError for anything else."""
    if not isinstance(cap, str) or not CAP_RE.fullmatch(cap):
        raise ValueError(f"capability {cap!r}: expected NAME, NAME=VALUE or NAME>=NUMBER")
    if ">=" in cap:
        name, value = cap.split(">=", 1)
        return name, ">=", value
    if "=" in cap:
        name, value = cap.split("=", 1)
        return name, "=", value
    return cap, "", ""


def _offered(offered: Sequence[str]) -> dict[str, set[str]]:
    """name -> values offered (a bare NAME offers the value ""). Malformed
    entries, and `>=` which only a requirement may use, are left out."""
    out: dict[str, set[str]] = {}
    for cap in offered:
        try:
            name, op, value = parse_cap(cap)
        except ValueError:
            continue
        if op != ">=":
            out.setdefault(name, set()).add(value)
    return out


def _satisfied(req: str, have: dict[str, set[str]]) -> bool:
    try:
        name, op, value = parse_cap(req)
    except ValueError:
        return False
    values = have.get(name)
    if values is None:
        return False
    if op == "":
        return True
    if op == "=":
        return value in values
    need = int(value)
    return any(_INT_RE.fullmatch(v) and int(v) >= need for v in values)


def cap_match(required: Sequence[str], offered: Sequence[str]) -> float:
    """Fraction of `required` that `offered` satisfies; 1.0 if nothing is required.

    `NAME` is satisfied by `NAME` or `NAME=anything`; `NAME=V` by `NAME=V`;
    `NAME>=N` by `NAME=M` with M an integer >= N. Malformed entries (offered or
    required) never satisfy anything."""
    if not required:
        return 1.0
    have = _offered(offered)
    return sum(_satisfied(r, have) for r in required) / len(required)


# ----------------------------------------------------------------- capability strategy


@dataclass(frozen=True, slots=True)
class Candidate:
    """A member that could run a task, as the coordinator sees it from gossip."""

    node: str
    match: float  #: cap_match of the task's requirements, 0..1
    load: float  #: CPU, 0..1
    queued: int = 0  #: tasks waiting in its queue
    slots: int = 1  #: tasks it runs at once
    free: float = 1.0  #: free_score, 0..1


def effective_load(c: Candidate) -> float:
    """CPU plus queued work per slot: a member with an idle CPU but a long
    queue is not a good place for one more task."""
    return c.load + c.queued / max(1, c.slots)


def choose_capability(cands: Sequence[Candidate], threshold: float, rng: random.Random) -> str | None:
    """The member to run a task: among those with the best match (at least
    `threshold`), the less loaded of two drawn at random; None if nobody passes.

    The draw is over the candidates sorted by node id, so the same seed gives
    the same choice whatever order the caller listed them in."""
    passing = [c for c in cands if c.match >= threshold]
    if not passing:
        return None
    best = max(c.match for c in passing)
    top = sorted((c for c in passing if c.match >= best - _TIE), key=lambda c: c.node)
    if len(top) == 1:
        return top[0].node
    a, b = rng.sample(top, 2)
    return min((a, b), key=lambda c: (effective_load(c), c.node)).node


# ----------------------------------------------------------------- auction strategy


@dataclass(frozen=True, slots=True)
class Weights:
    """How much each part of a bid counts; they sum to 1 so a score is 0..1."""

    match: float = 0.4
    load: float = 0.3
    perf: float = 0.2
    free: float = 0.1


def bid_score(match: float, load: float, perf: float, free: float, w: Weights) -> float:
    """A bid's worth: good match, low load, good past runs, free resources."""
    return w.match * match + w.load * (1 - load) + w.perf * perf + w.free * free


def best_bid(bids: Mapping[str, tuple[float, float, float, float]], w: Weights, threshold: float) -> str | None:
    """The winning node of bids node -> (match, load, perf, free): the highest
    score among matches >= threshold, ties to the lower node id; None if none."""
    scored = [(bid_score(*fig, w), node) for node, fig in bids.items() if fig[0] >= threshold]
    if not scored:
        return None
    top = max(s for s, _ in scored)
    return min(node for s, node in scored if s >= top - _TIE)


def free_score(free_slots: int, slots: int, mem_pct: float | None) -> float:
    """Half the share of free slots, half the share of free memory, each
    clamped to 0..1 (unknown memory counts as half free)."""
    slot_part = min(1.0, max(0.0, free_slots / max(1, slots)))
    mem_part = 0.5 if mem_pct is None else min(1.0, max(0.0, 1 - mem_pct / 100))
    return 0.5 * slot_part + 0.5 * mem_part


class PerfBook:
    """This node's own past performance per task kind, for its auction bids:
    EWMA (alpha 0.2) of success (1/0) and of duration. Bounded to `max_kinds`
    kinds; the kind recorded least recently is dropped first."""

    def __init__(self, alpha: float = 0.2, max_kinds: int = 64, min_runs: int = 3):
        self.alpha, self.max_kinds, self.min_runs = alpha, max_kinds, min_runs
        self._kinds: OrderedDict[str, list] = OrderedDict()  # kind -> [runs, success, seconds]

    def __len__(self) -> int:
        return len(self._kinds)

    def record(self, kind: str, ok: bool, duration_ms: int) -> None:
        seconds = max(0, duration_ms) / 1000
        entry = self._kinds.get(kind)
        if entry is None:
            self._kinds[kind] = [1, float(ok), seconds]
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
            return
        self._kinds.move_to_end(kind)
        a = self.alpha
        entry[0] += 1
        entry[1] += a * (float(ok) - entry[1])
        entry[2] += a * (seconds - entry[2])

    def score(self, kind: str) -> float:
        """0..1; a neutral 0.5 until `min_runs` runs, so one lucky or unlucky
        run does not decide the next auctions. Else 0.7*success + 0.3/(1 + mean seconds)."""
        entry = self._kinds.get(kind)
        if entry is None or entry[0] < self.min_runs:
            return 0.5
        return 0.7 * entry[1] + 0.3 / (1 + entry[2])

    def runs(self, kind: str) -> int:
        entry = self._kinds.get(kind)
        return 0 if entry is None else entry[0]


# ----------------------------------------------------------------- stealing and balancing


@dataclass(frozen=True, slots=True)
class PeerLoad:
    node: str
    load: float  #: CPU, 0..1
    queued: int
    running: int = 0


def steal_victims(peers: Sequence[PeerLoad], k: int = 2, min_queued: int = 1) -> list[str]:
    """Up to k peers an idle node should ask for work: those with at least
    `min_queued` queued tasks, most queued first (then the busier CPU, then node id)."""
    fit = [p for p in peers if p.queued >= min_queued]
    fit.sort(key=lambda p: (-p.queued, -p.load, p.node))
    return [p.node for p in fit[:max(0, k)]]


def migration_targets(peers: Sequence[PeerLoad], idle: float) -> list[str]:
    """Peers an overloaded node may hand queued work to: load below `idle`,
    least loaded first (then fewest queued and running, then node id)."""
    fit = [p for p in peers if p.load < idle]
    fit.sort(key=lambda p: (p.load, p.queued + p.running, p.node))
    return [p.node for p in fit]


class Overload:
    """Hysteresis for load balancing: overloaded only after `sustain`
    consecutive samples above `high`, and it stays so until a sample falls
    below `high - margin`, so a node whose load hovers at the threshold does
    not flip between shedding and not.

    An unknown load (None) is not above `high`, and it also ends an overload:
    the node sheds work only on measured load."""

    def __init__(self, high: float = 0.8, sustain: int = 3, margin: float = 0.1):
        self.high, self.sustain, self.margin = high, max(1, sustain), margin
        self._streak = 0
        self._overloaded = False

    @property
    def overloaded(self) -> bool:
        return self._overloaded

    def update(self, load: float | None) -> bool:
        """Take one load sample; whether the node is overloaded now."""
        if load is None:
            self._streak, self._overloaded = 0, False
        elif self._overloaded:
            if load < self.high - self.margin:
                self._streak, self._overloaded = 0, False
        elif load > self.high:
            self._streak += 1
            self._overloaded = self._streak >= self.sustain
        else:
            self._streak = 0
        return self._overloaded
