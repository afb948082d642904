"""Command-line argument types shared by the simulators' runners
(`python -m agent.sim`, `python -m agent.sim.raft_main`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


def delay(text: str) -> tuple[int, int]:
    """LO:HI ticks of one-way delay (a single number means LO = HI)."""
    lo, _, hi = text.partition(":")
    try:
        d = (int(lo), int(hi or lo))
    except ValueError:
        raise argparse.ArgumentTypeError("delay is LO:HI ticks, e.g. 0:2") from None
    if not 0 <= d[0] <= d[1]:
        raise argparse.ArgumentTypeError("delay needs 0 <= LO <= HI")
    return d


def probability(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("a probability in [0, 1]")
    return v


def override(names: Iterable[str]) -> Callable[[str], tuple[str, int]]:
    """A FIELD=VALUE type for --set, FIELD one of `names`, VALUE an integer."""
    known = sorted(names)

    def convert(text: str) -> tuple[str, int]:
        name, eq, value = text.partition("=")
        if not eq or name not in known:
            raise argparse.ArgumentTypeError(f"expected FIELD=VALUE with FIELD one of {', '.join(known)}")
        try:
            return name, int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} takes an integer") from None

    return convert


def finish(rep, wall: float) -> int:
    """Print a run's summary and wall time; the exit status (1 on a violation)."""
    print(rep.summary())
    print(f"wall time {wall:.2f} s")
    return 1 if rep.violations else 0


def run(main: Callable[[], int]) -> None:
    """Exit with main()'s status; a closed pipe (`... --trace | head`) is no error worth a traceback."""
    import sys

    try:
        sys.exit(main())
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(1)
