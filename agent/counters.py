"""Bounded event counters (drops, rejections) keyed by short fixed labels.

Labels come from our own code (`BadMessage.reason` and the like), but they are
chosen in response to what peers send, so the table is capped anyway: once
`max_labels` distinct labels exist, any new label is counted as "other" and a
hostile peer cannot grow it.
"""

from __future__ import annotations

OTHER = "other"


class Counters:
    def __init__(self, max_labels: int = 64):
        if max_labels < 1:
            raise ValueError("max_labels must be at least 1")
        self._max = max_labels
        self._counts: dict[str, int] = {}

    def inc(self, label: str, n: int = 1) -> None:
        # One slot stays free for "other", so the fold-in target always exists.
        if label not in self._counts and len(self._counts) >= self._max - 1:
            label = OTHER
        self._counts[label] = self._counts.get(label, 0) + n

    def get(self, label: str) -> int:
        return self._counts.get(label, 0)

    def snapshot(self) -> dict[str, int]:
        """A copy, safe to hand to exporters while counting goes on."""
        return dict(self._counts)
