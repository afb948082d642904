"""Timing and size settings of the membership core, and the named presets.

All durations are milliseconds of virtual time; the core counts them in ticks
of `tick_ms`. `agent.config` exposes each field as `[membership] NAME` with the
unit, default and allowed range listed here (the one place they are written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

# name: (unit, minimum, maximum, meaning). Defaults live on the dataclass.
FIELD_DOCS: dict[str, tuple[str, int, int, str]] = {
    "tick_ms": ("ms", 10, 1000, "resolution of the core's clock; every other duration is rounded to it"),
    "probe_interval_ms": ("ms", 50, 60_000, "one failure-detector probe per period (memberlist LAN: 1000)"),
    "probe_timeout_ms": ("ms", 10, 30_000, "wait for a direct ack before indirect probes (memberlist LAN: 500)"),
    "indirect_checks": ("members", 0, 16, "members asked to probe for us when a direct probe fails (k)"),
    "gossip_interval_ms": ("ms", 20, 60_000, "period of the gossip round that spreads broadcasts"),
    "gossip_nodes": ("members", 1, 16, "random members each gossip round sends to"),
    "retransmit_mult": ("factor", 1, 16, "a broadcast is sent retransmit_mult*ceil(log10(N+1)) times"),
    "suspicion_mult": ("factor", 1, 16, "minimum suspicion timeout = suspicion_mult*max(1,log10(N))*probe_interval_ms"),
    "suspicion_max_mult": ("factor", 1, 32, "maximum suspicion timeout = suspicion_max_mult * minimum"),
    "suspicion_confirmations": ("members", 0, 16, "independent confirmations that bring the suspicion timeout down to its minimum (Lifeguard k)"),
    "suspicion_quorum_pct": ("%", 0, 100, "once this share of live members confirms a suspicion, it times out after one probe interval (0 = off)"),
    "awareness_max": ("factor", 1, 16, "probe interval and timeout stretch up to this much while we are unhealthy"),
    "push_pull_interval_ms": ("ms", 0, 3_600_000, "full state exchange with one random member (0 = off)"),
    "reconnect_interval_ms": ("ms", 0, 3_600_000, "try a full exchange with one dead member, to heal partitions (0 = off)"),
    "tombstone_ms": ("ms", 1000, 7 * 86_400_000, "how long dead/left members are remembered so old gossip cannot revive them"),
    "join_retry_min_ms": ("ms", 50, 600_000, "first retry delay when no seed answered; doubles each time"),
    "join_retry_max_ms": ("ms", 100, 3_600_000, "largest join retry delay"),
    "max_members": ("members", 2, 100_000, "members kept at most; new ones beyond this are refused and counted"),
}


def range_problems(obj, docs: dict[str, tuple[str, int, int, str]]) -> list[tuple[str, object, str]]:
    """(field, value, what is allowed) for each dataclass field of `obj` outside
    the range its docs entry (unit, min, max, meaning) gives; unit "bool" means
    true or false. Shared by every core's settings."""
    out = []
    for f in fields(obj):
        v = getattr(obj, f.name)
        unit, lo, hi, _ = docs[f.name]
        if unit == "bool":
            if not isinstance(v, bool):
                out.append((f.name, v, "true or false"))
        elif not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            out.append((f.name, v, f"an integer from {lo} to {hi} ({unit})"))
    return out


@dataclass(frozen=True)
class MembershipSettings:
    tick_ms: int = 50
    probe_interval_ms: int = 1000
    probe_timeout_ms: int = 500
    indirect_checks: int = 3
    gossip_interval_ms: int = 200
    gossip_nodes: int = 3
    retransmit_mult: int = 4
    suspicion_mult: int = 4
    suspicion_max_mult: int = 6
    suspicion_confirmations: int = 3
    suspicion_quorum_pct: int = 50
    awareness_max: int = 8
    push_pull_interval_ms: int = 30_000
    reconnect_interval_ms: int = 10_000
    tombstone_ms: int = 3_600_000
    join_retry_min_ms: int = 500
    join_retry_max_ms: int = 30_000
    max_members: int = 1024

    def problems(self) -> list[tuple[str, object, str]]:
        """(field, value, what is allowed) for every out-of-range or inconsistent field."""
        out = range_problems(self, FIELD_DOCS)
        if not out:
            if self.probe_timeout_ms >= self.probe_interval_ms:
                out.append(("probe_timeout_ms", self.probe_timeout_ms, f"less than probe_interval_ms ({self.probe_interval_ms})"))
            if self.tick_ms > min(self.probe_timeout_ms, self.gossip_interval_ms):
                out.append(("tick_ms", self.tick_ms, "at most probe_timeout_ms and gossip_interval_ms"))
            if self.join_retry_max_ms < self.join_retry_min_ms:
                out.append(("join_retry_max_ms", self.join_retry_max_ms, f"at least join_retry_min_ms ({self.join_retry_min_ms})"))
        return out

    def ticks(self, ms: int) -> int:
        """Milliseconds to whole ticks (at least one tick for a non-zero duration)."""
        return 0 if ms <= 0 else max(1, round(ms / self.tick_ms))

    def retransmit_limit(self, n: int) -> int:
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def suspicion_bounds_ms(self, n: int) -> tuple[int, int]:
        lo = int(self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval_ms)
        return lo, lo * self.suspicion_max_mult


#: Named presets. "lan" follows hashicorp/memberlist's DefaultLANConfig;
#: "coordinator" reproduces the original mesh-coordinator numbers (gossip every
#: 2-5 s to 3-5 peers, heartbeat every 3 s, 10 s timeout); "slow" halves the
#: traffic of "lan" for the smallest boards on busy Wi-Fi.
PROFILES: dict[str, MembershipSettings] = {
    "lan": MembershipSettings(),
    "coordinator": MembershipSettings(
        tick_ms=100,
        probe_interval_ms=3000,
        probe_timeout_ms=1500,
        gossip_interval_ms=2000,
        gossip_nodes=4,
        suspicion_mult=3,
        suspicion_max_mult=3,
    ),
    "slow": MembershipSettings(
        tick_ms=100,
        probe_interval_ms=2000,
        probe_timeout_ms=1000,
        gossip_interval_ms=400,
        push_pull_interval_ms=60_000,
    ),
}


def profile(name: str, **overrides) -> MembershipSettings:
    """A preset with some fields replaced; KeyError for an unknown preset."""
    return replace(PROFILES[name], **overrides)
