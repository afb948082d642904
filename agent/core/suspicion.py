"""Lifeguard's suspicion timeout: long while one member suspects, short once
several independent members confirm.

After memberlist's suspicion.go: with k expected confirmations, the timeout
falls from `max_ticks` toward `min_ticks` as log(c+1)/log(k+1) for c distinct
confirmations. A dead member is confirmed quickly by everyone who probes it,
so it is declared dead after about `min_ticks`; a live member suspected once
because of a lost packet keeps the long timeout and has time to refute.
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
    confirmers: set[str] = field(default_factory=set)

    def confirm(self, sender: str) -> bool:
        """Count an independent confirmation; False for a repeat or the original suspector."""
        if sender == self.suspector or sender in self.confirmers or len(self.confirmers) >= self.k:
            return False
        self.confirmers.add(sender)
        return True

    def timeout(self) -> int:
        if self.k < 1:
            return self.min_ticks
        frac = math.log(len(self.confirmers) + 1) / math.log(self.k + 1)
        return max(self.min_ticks, math.floor(self.max_ticks - frac * (self.max_ticks - self.min_ticks)))

    def expired(self, now: int) -> bool:
        return now - self.start >= self.timeout()
