"""State the task engine's two roles share: settings, the view, time and the outputs.

Kept apart from `agent.core.tasks` so the coordinator and executor modules
can import it without importing each other.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.core.placement import Weights, cap_match
from agent.core.ring import ring_for
from agent.core.taskspec import TaskSpec
from agent.counters import Counters

BUILTIN_KINDS = ("echo", "sleep", "sysinfo")


@dataclass(frozen=True)
class TaskSettings:
    """See `[tasks]` in docs/configuration.md for each field's meaning and unit."""

    slots: int = 2
    strategy: str = "capability"
    replicas: int = 3
    vnodes: int = 64
    match_threshold: float = 0.7
    weights: Weights = field(default_factory=Weights)
    bid_timeout_ms: int = 300
    bid_rounds: int = 3
    steal: bool = True
    steal_interval_ms: int = 500
    overload: float = 0.8
    idle: float = 0.3
    overload_samples: int = 3
    min_stay_ms: int = 10_000
    check_ms: int = 2000
    resend_ms: int = 1000
    keep_results: int = 5000
    max_queue: int = 10_000


@dataclass(frozen=True)
class MemberInfo:
    """What gossip tells us about an alive member. load is CPU 0..1 (None: unknown)."""

    node: str
    caps: tuple[str, ...] = ()
    kinds: frozenset[str] = frozenset(BUILTIN_KINDS)
    load: float | None = None
    queued: int = 0
    mem_pct: float | None = None
    boot: int = 0  #: grows when the member restarts (and forgets the records it held)


@dataclass(frozen=True)
class Start:
    spec: TaskSpec
    attempt: int
    timeout_s: int


@dataclass(frozen=True)
class Kill:
    task_id: str
    attempt: int
    reason: str


class Ctx:
    """What both roles share: identity, settings, time, the view, and the outputs."""

    def __init__(self, node_id: str, settings: TaskSettings, rng: random.Random, kinds: Mapping[str, int],
                 caps: tuple[str, ...], counters: Counters | None):
        self.me = node_id
        self.s = settings
        self.rng = rng
        self.kinds = dict(kinds)
        self.caps = tuple(caps)
        self.counters = counters if counters is not None else Counters()
        self.now = 0
        self.wall = 0
        self.view: dict[str, MemberInfo] = {node_id: MemberInfo(node_id, self.caps, frozenset(self.kinds))}
        self.load: float | None = None
        self.mem_pct: float | None = None
        self.outbox: list[tuple[str, object]] = []
        self.actions: list[Start | Kill] = []
        self.journal: list[tuple[str, object | None]] = []

    def send(self, to: str, msg) -> None:
        self.outbox.append((to, msg))

    def capable(self, spec: TaskSpec, node: str) -> bool:
        info = self.view.get(node)
        return info is not None and spec.kind in info.kinds and cap_match(spec.caps, info.caps) >= self.s.match_threshold

    def home(self, spec: TaskSpec) -> list[str]:
        """Home members of a task in our view: the record's keepers; home[0] coordinates."""
        ring = ring_for(frozenset(self.view), self.s.vnodes)
        if spec.strategy == "hash":
            return ring.owners(spec.id, self.s.replicas, lambda n: self.capable(spec, n))
        return ring.owners(spec.id, self.s.replicas)
