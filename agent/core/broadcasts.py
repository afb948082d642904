"""The queue of gossip waiting to be piggybacked, each item sent a limited number of times.

After memberlist's TransmitLimitedQueue: an item about a node replaces any
older item about the same node (only the newest claim matters), items sent
the fewest times go first, and an item is dropped once it has been sent
`limit` times, where the caller derives `limit` from the mesh size
(retransmit_mult * log10(N+1)). The queue is bounded: past `max_items` the
most-sent items are dropped, so a flood of joins cannot grow memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from agent.messages import Gossip


@dataclass(slots=True)
class _Item:
    msg: Gossip
    transmits: int
    order: int  #: newer items win ties, so fresh news spreads first
    size: int = -1  #: size_of(msg), computed once on first use


class BroadcastQueue:
    def __init__(self, max_items: int = 4096):
        self._items: dict[str, _Item] = {}
        self._order = itertools.count()
        self.max_items = max_items

    def __len__(self) -> int:
        return len(self._items)

    def push(self, msg: Gossip) -> None:
        """Queue news about msg.node, replacing older news about it."""
        self._items[msg.node] = _Item(msg, 0, next(self._order))
        if len(self._items) > self.max_items:
            worst = max(self._items.values(), key=lambda i: (i.transmits, -i.order))
            del self._items[worst.msg.node]

    def take(
        self, budget: int, size_of: Callable[[Gossip], int], limit: int, first: Gossip | None = None,
        max_count: int | None = None,
    ) -> list[Gossip]:
        """Messages that fit in `budget` bytes (and, if given, `max_count` messages),
        least-sent first; counts each as sent once.

        `first`, if given, goes in front whatever its count (Lifeguard's buddy
        system: a suspect hears about its suspicion in the probe itself)."""
        out: list[Gossip] = []
        if max_count is not None and max_count <= 0:
            return out
        if first is not None:
            size = size_of(first)
            if size <= budget:
                out.append(first)
                budget -= size
        for item in sorted(self._items.values(), key=lambda i: (i.transmits, -i.order)):
            if budget <= 0 or (max_count is not None and len(out) >= max_count):
                break
            if first is not None and item.msg == first:
                continue
            size = item.size
            if size < 0:
                size = item.size = size_of(item.msg)
            if size > budget:
                continue
            out.append(item.msg)
            budget -= size
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.msg.node]
        return out

    def pending(self) -> list[Gossip]:
        return [i.msg for i in self._items.values()]
