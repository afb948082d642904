"""Run the Raft simulator and print what happened:

    python -m agent.sim.raft_main --seed 1234 --nodes 5 --steps 300
    python -m agent.sim.raft_main --seed 0 --seeds 500          (500 seeds, 0..499)
    python -m agent.sim.raft_main --bench-election 300          (leader-crash election times)

Parameters not given are drawn from the seed exactly as the tests draw them,
so the command a failing test prints replays that run tick for tick. Exit
status 1 if a property was violated. `--trace` prints the event log (faults,
role changes, writes, snapshots, voter changes, crashes); `--list` names the
scenarios.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import fields

from agent.core.raft import RaftSettings
from agent.sim import args
from agent.sim.raft_cluster import PROFILES, SCENARIOS, election_benchmark, make_settings, run_raft

_SETTINGS = {f.name for f in fields(RaftSettings)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.sim.raft_main", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="random", choices=sorted(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0, help="root seed (decides everything not given)")
    ap.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed on; print failures only")
    ap.add_argument("--nodes", type=int, choices=range(1, 8), help="voters at the start (1-7)")
    ap.add_argument("--learners", type=int, choices=range(0, 5), help="non-voting members at the start")
    ap.add_argument("--steps", type=int, help="ticks of the faulty phase")
    ap.add_argument("--loss", type=args.probability, help="per-message loss probability")
    ap.add_argument("--dup", type=args.probability, help="per-message duplication probability")
    ap.add_argument("--delay", type=args.delay, help="one-way delay LO:HI ticks")
    ap.add_argument("--chaos", type=float, help="rate multiplier of faults and client actions (0.5-2 drawn)")
    ap.add_argument("--profile", type=int, choices=range(len(PROFILES)),
                    help="settings profile: " + "; ".join(f"{i}: {p or 'defaults'}" for i, p in enumerate(PROFILES)))
    ap.add_argument("--no-codec", dest="codec", action="store_false",
                    help="skip the to_wire/CBOR/decode round trip of every message (faster)")
    ap.add_argument("--set", dest="overrides", action="append", type=args.override(_SETTINGS), default=[], metavar="FIELD=VALUE",
                    help="replace one RaftSettings field, e.g. election_ticks=10 (repeatable)")
    ap.add_argument("--trace", action="store_true", help="print the event log")
    ap.add_argument("--bench-election", type=int, metavar="SEEDS",
                    help="measure ticks to a new leader after the leader crashes, over SEEDS seeds")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    a = ap.parse_args(argv)
    if a.list:
        for name, fn in SCENARIOS.items():
            doc = " ".join((fn.__doc__ or "").split())
            print(f"{name:17} {doc.split('. ')[0].rstrip('.')}.")
        return 0
    if a.bench_election:
        t = time.perf_counter()
        res = election_benchmark(a.bench_election, base=a.seed, nodes=a.nodes or 5,
                                 settings=make_settings(a.profile or 0, a.overrides), loss=a.loss or 0.0)
        for k, v in res.items():
            print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
        print(f"wall time {time.perf_counter() - t:.2f} s")
        return 1 if res["failed"] else 0
    over = dict(nodes=a.nodes, learners=a.learners, steps=a.steps, loss=a.loss, dup=a.dup, delay=a.delay,
                chaos=a.chaos, profile=a.profile, codec=a.codec, overrides=tuple(a.overrides))
    t = time.perf_counter()
    if a.seeds > 1:
        failed = 0
        for seed in range(a.seed, a.seed + a.seeds):
            rep = run_raft(a.scenario, seed, **over)
            if rep.violations:
                failed += 1
                print(rep.failure())
        print(f"{a.seeds} seeds from {a.seed}: {failed} failed; wall time {time.perf_counter() - t:.1f} s")
        return 1 if failed else 0
    rep = run_raft(a.scenario, a.seed, trace=a.trace, **over)
    wall = time.perf_counter() - t
    if a.trace and rep.cluster is not None and rep.cluster.trace is not None:
        for line in rep.cluster.trace:
            print(line)
    return args.finish(rep, wall)


if __name__ == "__main__":
    args.run(main)
