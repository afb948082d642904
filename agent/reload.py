"""What a SIGHUP reload may change in a running agent, and what needs a restart.

The agent re-reads its configuration (same file, board and flags as at start)
and compares it key by key with what it runs with. Keys in LIVE take effect
at once: the loops read them from `Agent.config` on every pass. Every other
change (identity, ports, keys, the membership timing the core was built
with, consensus, tasks and handlers, the board, the console port) is named in
the log as waiting for a restart, and the running value stays: a half-applied
identity or port change would be worse than none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from agent.config import Config, flat_values

#: Keys whose new value is used at once after a reload.
LIVE = frozenset({
    "log.level",
    "discovery.seeds",
    "discovery.address_check_ms",
    "api.public_read",
    "load.sample_interval_ms",
    "load.meta_refresh_ms",
    "load.change_threshold_pct",
})


@dataclass(frozen=True)
class Plan:
    live: dict[str, tuple[object, object]]  #: key -> (old, new), applied now
    restart: dict[str, tuple[object, object]]  #: key -> (old, new), after a restart

    def describe(self) -> list[str]:
        """Log lines: one per change, saying which kind it is."""
        lines = [f"reload: {k} = {new!r} (was {old!r}) applied" for k, (old, new) in self.live.items()]
        lines += [f"reload: {k} = {new!r} (running with {old!r}) needs a restart" for k, (old, new) in self.restart.items()]
        return lines or ["reload: configuration unchanged"]


def plan(old: Config, new: Config) -> Plan:
    before, after = flat_values(old), flat_values(new)
    changed = {k: (before.get(k), after.get(k)) for k in dict.fromkeys([*before, *after]) if before.get(k) != after.get(k)}
    return Plan({k: v for k, v in changed.items() if k in LIVE}, {k: v for k, v in changed.items() if k not in LIVE})


def apply(old: Config, new: Config, keys) -> Config:
    """`old` with the values of `keys` (section.field) taken from `new`."""
    out = old
    for key in keys:
        section, name = key.split(".")
        updated = dataclasses.replace(getattr(out, section), **{name: getattr(getattr(new, section), name)})
        out = dataclasses.replace(out, **{section: updated})
    return out
