"""Consistent hashing: which members are a key's home.

Every member owns `vnodes` points on a 64-bit circle; a key belongs to the
members whose points follow the key's point clockwise. Adding or removing one
member of N moves only the keys next to its own points, about 1/N of them, so
a membership change re-homes few task records. Many points per member even out
the arcs: with 64 points each, the busiest of 50 members owns about 1.3x the
mean (see tests/test_ring.py).

Points come from blake2b of `"{member}#{i}"` (a node id never contains "#", so
no two members share a label); equal points are ordered by member name. Every
node that agrees on the member set therefore builds the same circle, and every
node that also agrees on which members are eligible picks the same owners.
"""

from __future__ import annotations

import functools
import hashlib
from bisect import bisect_left
from collections.abc import Callable, Iterable


def _point(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "big")


class Ring:
    """Consistent hashing with `vnodes` virtual nodes per member. Points are the
    first 8 bytes (big-endian) of blake2b(f"{member}#{i}", digest_size=8); a
    key's point likewise of blake2b(key)."""

    def __init__(self, members: Iterable[str], vnodes: int = 64):
        if vnodes < 1:
            raise ValueError(f"vnodes = {vnodes}: expected at least 1")
        self.members: frozenset[str] = frozenset(members)
        self.vnodes = vnodes
        circle = sorted((_point(f"{m}#{i}"), m) for m in self.members for i in range(vnodes))
        self._points = [p for p, _ in circle]
        self._owners = [m for _, m in circle]

    def __repr__(self) -> str:
        return f"Ring({len(self.members)} members, {self.vnodes} vnodes)"

    def owners(self, key: str, n: int, eligible: Callable[[str], bool] | None = None) -> list[str]:
        """First n distinct members clockwise from the key's point, skipping
        members for which eligible() is False (fewer if there are not enough).

        Skipping gives exactly what a ring of only the eligible members would
        give (their points are the same), so every node that agrees on the
        alive/capable set agrees on owners. The walk stops after one turn."""
        want = min(n, len(self.members))
        if want <= 0:
            return []
        found: list[str] = []
        seen: set[str] = set()
        size = len(self._points)
        start = bisect_left(self._points, _point(key))
        for step in range(size):
            m = self._owners[(start + step) % size]
            if m in seen:
                continue
            seen.add(m)
            if eligible is None or eligible(m):
                found.append(m)
                if len(found) == want:
                    break
            if len(seen) == len(self.members):
                break
        return found

    def owner(self, key: str, eligible: Callable[[str], bool] | None = None) -> str | None:
        """The first owner of `key`, or None when no member is eligible."""
        found = self.owners(key, 1, eligible)
        return found[0] if found else None


@functools.lru_cache(maxsize=8)
def ring_for(members: frozenset[str], vnodes: int = 64) -> Ring:
    """A shared Ring for this member set: the view changes rarely and lookups
    are frequent, so the (tens of ms) build is not repeated per lookup."""
    return Ring(members, vnodes)
