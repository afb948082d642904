"""Run one simulated scenario and print what happened:

    python -m agent.sim --scenario crash --seed 1234 --nodes 50

Parameters not given are drawn from the seed, exactly as the tests draw them,
so the command a failing test prints replays that run tick for tick. Exit
status 1 if a property was violated. `--trace` prints every status change
(tick observer node old->new incarnation); `--list` names the scenarios.
"""

from __future__ import annotations

import argparse
import time

from agent.core.settings import FIELD_DOCS, PROFILES, profile
from agent.sim import args
from agent.sim.cluster import SCENARIOS, run_scenario


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.sim", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="crash", choices=sorted(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0, help="root seed (decides everything not given)")
    ap.add_argument("--nodes", type=int, help="mesh size")
    ap.add_argument("--loss", type=args.probability, help="per-packet loss probability, e.g. 0.1")
    ap.add_argument("--seeds", type=int, choices=(1, 2, 3), help="seed nodes the others join through")
    ap.add_argument("--faults", type=int, help="nodes crashed / leaving / restarted")
    ap.add_argument("--periods", type=int, help="length of the timed phase (lossy, idle), in probe periods")
    ap.add_argument("--delay", type=args.delay, default=(0, 2), help="one-way delay LO:HI in ticks (default 0:2)")
    codec = ap.add_mutually_exclusive_group()
    codec.add_argument("--codec", dest="codec", action="store_true", default=None,
                       help="send every packet through agent.wire (default up to 100 nodes)")
    codec.add_argument("--no-codec", dest="codec", action="store_false")
    ap.add_argument("--profile", default="lan", choices=sorted(PROFILES))
    ap.add_argument("--set", dest="overrides", action="append", type=args.override(FIELD_DOCS), default=[], metavar="FIELD=VALUE",
                    help="replace one settings field of the profile, e.g. suspicion_mult=2 (repeatable)")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--warm", dest="warm", action="store_true", default=None,
                       help="start the mesh converged (default above 300 nodes)")
    start.add_argument("--cold", dest="warm", action="store_false", help="start every node by joining")
    ap.add_argument("--trace", action="store_true", help="print every status change")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    a = ap.parse_args(argv)
    if a.list:
        for name, fn in SCENARIOS.items():
            doc = " ".join((fn.__doc__ or "").split())
            print(f"{name:10} {doc.split('. ')[0].rstrip('.')}.")
        return 0
    if a.nodes is not None and a.nodes < 2:
        ap.error("--nodes must be at least 2")
    problems = profile(a.profile, **dict(a.overrides)).problems()
    if problems:
        ap.error("; ".join(f"{k}={v}: must be {why}" for k, v, why in problems))
    t = time.perf_counter()
    rep = run_scenario(a.scenario, a.seed, nodes=a.nodes, loss=a.loss, seeds=a.seeds, faults=a.faults,
                       periods=a.periods, delay=a.delay, codec=a.codec, profile=a.profile,
                       overrides=tuple(a.overrides), warm=a.warm)
    wall = time.perf_counter() - t
    if a.trace and rep.cluster is not None and rep.cluster.trace is not None:
        names = {0: "alive", 1: "suspect", 2: "dead", 3: "left", None: "-"}
        for tick, obs, node, old, new, inc in rep.cluster.trace:
            print(f"{tick:7d} {obs} {node} {names[old]}->{names[new]} {inc}")
    return args.finish(rep, wall)


if __name__ == "__main__":
    args.run(main)
