"""The 20%-loss soak, run in the background so its two minutes overlap other tests.

Issue 2 asks every test run for at least two minutes at 20% loss on every link with
no false death. Those two minutes are nearly all waiting, so the lab starts
before the simulator tests (CPU-bound on one core, no network, no timing; see
conftest.py) and a thread polls it there; the verdict is its own test, run last.
Run alone (`pytest -k twenty_percent`) the verdict test starts the soak itself
and waits it out.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path

from netns import Lab

SOAK_S = float(os.environ.get("MESHAGENT_SOAK_S", "120"))
N = 5
CONVERGE_BOUND_S = 20.0
#: one suspicion episode = (member, incarnation); every agent that hears of it logs a line
SUSPECT_RX = re.compile(r"member (\S+): \w+ -> suspect \(incarnation (\d+)\)")


def log_events(lab: Lab, pattern: str) -> list[tuple[int, str]]:
    """(node, line) for every log line of every agent process matching pattern."""
    rx = re.compile(pattern)
    return [(p.i, line) for p in lab.history for line in p.log.read_text(errors="replace").splitlines() if rx.search(line)]


class LossSoak:
    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="meshagent-soak-"))
        self.lab = Lab(N, workdir=self.workdir / "lab")
        self.started_at: float | None = None
        self.method: set[str] = set()
        self.polls = self.answered = 0
        self.suspect_seen: dict[tuple[int, str], int] = {}
        self.dead_seen: list[tuple[float, int, str]] = []
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Build the lab, converge, turn on 20% loss, then poll in a thread."""
        self.lab.__enter__()
        for i in range(N):
            self.lab.start_agent(i, seeds=[0])
        self.lab.wait_converged(range(N), timeout=CONVERGE_BOUND_S)
        self.method = {self.lab.netem(i, loss="20%", where="node") for i in range(N)}
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._poll, name="loss-soak", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        try:
            while (t := time.monotonic() - self.started_at) < SOAK_S:
                self.lab.check_running(range(N))
                views = self.lab.states(self.lab.views(range(N), timeout=2.0))
                self.polls += N
                for i, v in views.items():
                    if v is None:
                        continue
                    self.answered += 1
                    for peer, state in v.items():
                        if state == "suspect":
                            self.suspect_seen[(i, peer)] = self.suspect_seen.get((i, peer), 0) + 1
                        elif state != "alive":
                            self.dead_seen.append((round(t, 1), i, f"{peer}={state}"))
                time.sleep(max(0.0, 2.0 - (time.monotonic() - self.started_at - t)))
        except BaseException as exc:  # re-raised by verdict()
            self.error = exc

    def verdict(self) -> dict:
        """Wait for the soak to end (bounded), lift the loss, and summarise it."""
        self._thread.join(SOAK_S + 60)
        if self._thread.is_alive():
            raise AssertionError("the loss soak's poller did not finish")
        if self.error is not None:
            raise self.error
        for i in range(N):
            self.lab.clear_netem(i)
        suspicions = log_events(self.lab, r"-> suspect")
        return {
            "loss_method": sorted(self.method), "seconds": round(SOAK_S), "polls_answered": f"{self.answered}/{self.polls}",
            "suspicions": len({m.groups() for _, line in suspicions if (m := SUSPECT_RX.search(line))}),
            "suspect_transitions_in_all_views": len(suspicions), "suspect_to_alive": len(log_events(self.lab, r"suspect -> alive")),
            "suspect_poll_observations": sum(self.suspect_seen.values()), "deaths_in_logs": len(log_events(self.lab, r"-> (dead|left)")),
        }

    def close(self, failed: bool = False) -> None:
        self.lab.close(failed=failed)
