"""Lifeguard's suspicion timeout: long while one member suspects, short once
several independent members confirm.

After memberlist's suspicion.go: with k expected confirmations, the timeout
falls from `max_ticks` toward `min_ticks` as log(c+1)/log(k+1) for c distinct
confirmations. A dead member is confirmed quickly by everyone who probes it,
so it is declared dead after about `min_ticks`; a live member suspected once
because of a lost packet keeps the long timeout and has time to refute.

Our addition: once `quorum` members have confirmed independently (a share of
the mesh, set by the caller; 0 = off), the timeout drops further to
`quorum_ticks`. Members re-probe whom they suspect, so a dead member gathers
such a quorum within a period or two; for a live member, it would take that
many probes failing by chance (at 20% loss each fails with about 7%, and
P(half of 19 fail) is below 1e-6), and its refutation normally arrives first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class Suspicion:
    start: int  #: tick the suspicion began here
    suspector: str  #: the member whose Suspect started it; not a confirmation
    k: int  #: confirmations that bring the timeout down to the minimum
    min_ticks: int
    max_ticks: int
    quorum: int = 0  #: confirmations that cut the timeout to quorum_ticks (0 = never)
    quorum_ticks: int = 0
    confirmers: set[str] = field(default_factory=set)

    def confirm(self, sender: str) -> bool:
        """Count an independent confirmation; False for a repeat, the original
        suspector, or one past what can still shorten the timeout."""
        if sender == self.suspector or sender in self.confirmers or len(self.confirmers) >= max(self.k, self.quorum):
            return False
        self.confirmers.add(sender)
        return True

    def timeout(self) -> int:
        if self.quorum and len(self.confirmers) >= self.quorum:
            return min(self.min_ticks, self.quorum_ticks)
        if self.k < 1:
            return self.min_ticks
        frac = math.log(min(len(self.confirmers), self.k) + 1) / math.log(self.k + 1)
        return max(self.min_ticks, math.floor(self.max_ticks - frac * (self.max_ticks - self.min_ticks)))

    def expired(self, now: int) -> bool:
        return now - self.start >= self.timeout()
