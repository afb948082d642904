"""Benchmark of the membership core in the seeded simulator (virtual time, so the
figures do not depend on this machine; only the wall time does).

    python bench/sim_membership.py            # the full set, about 5-8 minutes on 2 cores
    python bench/sim_membership.py --quick    # fewer seeds, no 1000-node run (about 1 minute)

Measures, each as median (min-max) over seeds:
  * dissemination: periods from a new node's start until 99.9% of N list it alive,
    and from a crash until 99.9% of N mark it dead (N = 100 and 1000), next to
    push-pull gossip's log3(N) + ln ln(N) rounds (Karp et al. 2000) and to a model
    of memberlist with its LAN defaults (which our "lan" profile copies);
  * crash detection for N = 20 in seconds against the product target (median
    <= 3 s, max <= 6 s), for the defaults and two what-if settings;
  * false deaths per node-hour at 10/20/30% loss (N = 50, 10 virtual minutes);
  * traffic per node at idle (N = 20 and 100).
Writes bench/RESULTS-sim.md (machine, date, tables) and prints the same tables.
Every row names the seeds it used; `python -m agent.sim --scenario ... --seed ...`
replays any single run.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.settings import PROFILES, profile  # noqa: E402
from agent.sim.cluster import run_scenario  # noqa: E402

LAN = PROFILES["lan"]
SEC = LAN.probe_interval_ms / 1000  # seconds per protocol period
WHAT_IF = {
    "defaults (lan)": (),
    "suspicion_mult=2": (("suspicion_mult", 2),),
    "probe 500 ms, timeout 250 ms, suspicion_mult=2": (
        ("probe_interval_ms", 500), ("probe_timeout_ms", 250), ("suspicion_mult", 2)),
}


def _run(job):
    label, scenario, seed, kw = job
    t = time.perf_counter()
    rep = run_scenario(scenario, seed, **kw)
    m = {k: v for k, v in rep.metrics.items()}
    return label, seed, m, rep.violations[:3], rep.replay(), time.perf_counter() - t, rep.params.nodes


def _mmm(xs, fmt="{:.1f}"):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "n/a"
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})"


def _envelope_overhead() -> int:
    """Bytes a sealed datagram adds to a packet for this sim's node ids (5 characters),
    mesh "default", boot 1, counter 10^6 (agent.wire.ENVELOPE_OVERHEAD is the worst case)."""
    from agent.envelope import FleetKey, Sealer
    from agent.messages import Packet, Ping
    from agent.wire import encode_packet

    s = Sealer("default", [FleetKey(b"k" * 8, b"x" * 32)], "n0001", 1, rng_bytes=lambda n: b"\0" * n)
    s.counter = 10**6
    p = encode_packet(Packet("n0001", (Ping(123456, "n0002"),)))
    return len(s.seal(p)) - len(p)


def _revision() -> str:
    """The commit measured, and whether agent/ had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--", "agent"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in status if not line.startswith("??")]
    new = [line[3:] for line in status if line.startswith("??")]
    out = head or "unknown"
    if changed:
        out += " + uncommitted changes to " + ", ".join(changed)
    if new:
        out += " + new files " + ", ".join(new)
    return out


def _machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    u = platform.uname()
    return (f"{u.system} {u.release} {u.machine}; CPU {cpu} x {os.cpu_count()}; "
            f"Python {platform.python_version()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer seeds, no 1000-node run")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-sim.md")))
    a = ap.parse_args()
    q = a.quick

    jobs = []
    diss = {100: range(5 if not q else 2), 1000: range(0 if q else 3)}
    for n, seeds in diss.items():
        jobs += [(f"diss{n}", "join", s, dict(nodes=n, loss=0.0, seeds=3)) for s in seeds]
    det_seeds = range(30 if not q else 10)
    for name, ov in WHAT_IF.items():
        jobs += [(f"det:{name}", "crash", s, dict(nodes=20, loss=0.0, faults=1, overrides=ov)) for s in det_seeds]
    fd_loss = (0.1, 0.2, 0.3)
    fd_seeds = range(6 if not q else 1)
    for loss in fd_loss:
        jobs += [(f"fd{loss}", "lossy", s, dict(nodes=50, loss=loss, periods=600, codec=False)) for s in fd_seeds]
    for name, ov in list(WHAT_IF.items())[1:]:
        for loss in (0.1, 0.2):
            jobs += [(f"wfd:{name}:{loss}", "lossy", s, dict(nodes=20, loss=loss, periods=600, codec=False, overrides=ov))
                     for s in range(3 if not q else 1)]
    for n in (20, 100):
        jobs += [(f"idle{n}", "idle", s, dict(nodes=n, loss=0.0, periods=60, codec=True)) for s in range(2)]
    # the longest first, so the pool ends together
    jobs.sort(key=lambda j: -(j[3]["nodes"] * (j[3].get("periods") or 40)))

    t0 = time.perf_counter()
    results: dict[str, list] = {}
    problems = []
    with ProcessPoolExecutor(a.jobs) as pool:
        for label, seed, m, viol, replay, wall, n in pool.map(_run, jobs):
            results.setdefault(label, []).append((seed, m, n))
            if viol and not label.startswith(("fd", "wfd")):
                problems.append(f"{label} seed {seed}: {viol[0]}  (replay: {replay})")
            print(f"  {label:50} seed {seed:3d} {wall:6.1f} s", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0

    out: list[str] = []
    w = out.append
    w("# Membership core in the simulator: results")
    w("")
    w(f"- date: {datetime.date.today().isoformat()}")
    w(f"- machine: {_machine()}")
    w(f"- code: {_revision()}")
    w(f"- command: `python bench/sim_membership.py{' --quick' if q else ''}` ({wall:.0f} s wall, {a.jobs} processes)")
    w("- settings: profile \"lan\" (built on memberlist's DefaultLANConfig; see agent/core/settings.py) "
      "unless a row says otherwise: " + ", ".join(f"{f.name}={getattr(LAN, f.name)}" for f in fields(LAN)))
    w("- time is virtual: 1 protocol period = probe_interval = 1 s = 20 ticks of 50 ms. "
      "Network: one-way delay 0-2 ticks, uniform; loss as stated, independent per packet.")
    w("")

    # ---------------------------------------------------------- dissemination
    w("## Dissemination: periods until 99.9% of N")
    w("")
    w("Join: from a new node's start until 99.9% of the N members list it alive. Death: from a crash "
      "until 99.9% mark it dead (first: until the first one does). 0% loss; N=100 starts cold "
      "(everyone joins), N=1000 starts converged (warm start: a cold 1000-node join storm costs minutes "
      "of CPU). Median (min-max) over seeds.")
    w("")
    w("| N | seeds | join to 99.9% | death: first | death to 99.9% | push-pull ref. log3 N + ln ln N "
      "| memberlist LAN model: join / death |")
    w("|---|---|---|---|---|---|---|")
    for n in diss:
        rows = results.get(f"diss{n}", [])
        if not rows:
            continue
        ref_rounds = math.log(n, 3) + math.log(math.log(n))
        ref_periods = ref_rounds * LAN.gossip_interval_ms / LAN.probe_interval_ms
        smin = LAN.suspicion_bounds_ms(n)[0] / LAN.probe_interval_ms
        ml_join = math.log(n, 3) * LAN.gossip_interval_ms / LAN.probe_interval_ms
        ml_death = 1.58 + 1 + smin + ml_join
        w(f"| {n} | {len(rows)} | {_mmm([m['join_999_periods'] for _, m, _ in rows], '{:.2f}')} "
          f"| {_mmm([m['death_first_periods'] for _, m, _ in rows])} "
          f"| {_mmm([m['death_999_periods'] for _, m, _ in rows])} "
          f"| {ref_rounds:.1f} rounds = {ref_periods:.2f} periods "
          f"| {ml_join:.2f} / {ml_death:.1f} |")
    w("")
    w("The memberlist column is a model, not a measurement: join = log3(N) gossip rounds of 200 ms; "
      "death = 1.58 periods to the first failed probe (SWIM) + 1 period until that probe gives up + "
      "the minimum suspicion timeout 4*log10(N) s (reached once 3 members confirm) + the join spread. "
      "Where the core departs from memberlist (agent/core/membership.py says how), death can come sooner.")
    w("")

    # ---------------------------------------------------------- detection
    w("## Crash detection, N = 20, in seconds (product target: median <= 3 s, max <= 6 s)")
    w("")
    w("One node crashes after convergence, 0% loss; 'all' = every survivor marks it dead, "
      "'first' = the first one does. Median and max over seeds.")
    w("")
    w("| settings | seeds | first: median | first: max | all: median | all: max | meets target (all) |")
    w("|---|---|---|---|---|---|---|")
    for name, ov in WHAT_IF.items():
        rows = results.get(f"det:{name}", [])
        if not rows:
            continue
        per = profile("lan", **dict(ov)).probe_interval_ms / 1000
        first = [m["detect_first_periods"] * per for _, m, _ in rows if m.get("detect_first_periods") is not None]
        alls = [m["detect_all_periods"] * per for _, m, _ in rows if m.get("detect_all_periods") is not None]
        ok = alls and statistics.median(alls) <= 3 and max(alls) <= 6 and len(alls) == len(rows)
        w(f"| {name} | {len(rows)} | {statistics.median(first):.2f} | {max(first):.2f} "
          f"| {statistics.median(alls):.2f} | {max(alls):.2f} | {'yes' if ok else 'no'} |")
    w("")
    w("The what-if rows change only the fields named; the false-death rows below show what each costs.")
    w("")

    # ---------------------------------------------------------- false deaths
    w("## False deaths under loss")
    w("")
    w("A false death: a live node marked dead by anyone. N nodes run 600 periods (10 virtual minutes) "
      "after convergence at the given independent per-packet loss. Suspicions = suspect events "
      "(one per observer) per node-hour.")
    w("")
    w("| settings | N | loss | seeds | node-hours | false deaths | per node-hour | suspicions per node-hour |")
    w("|---|---|---|---|---|---|---|---|")

    def fd_row(name, label, n, loss):
        rows = results.get(label, [])
        if not rows:
            return
        hours = sum(n * 600 * SEC / 3600 for _ in rows)
        deaths = sum(m["false_deaths"] for _, m, _ in rows)
        susp = sum(m.get("suspicions_per_node_hour", 0) or 0 for _, m, _ in rows) / len(rows)
        w(f"| {name} | {n} | {loss} | {len(rows)} | {hours:.1f} | {deaths} | {deaths / hours:.3f} "
          f"| {susp:.0f} |")

    for loss in fd_loss:
        fd_row("defaults (lan)", f"fd{loss}", 50, loss)
    for name in list(WHAT_IF)[1:]:
        for loss in (0.1, 0.2):
            fd_row(name, f"wfd:{name}:{loss}", 20, loss)
    w("")

    # ---------------------------------------------------------- traffic
    env = _envelope_overhead()
    from agent.wire import ENVELOPE_OVERHEAD

    w("## Traffic per node at idle")
    w("")
    w(f"60 periods of a converged, quiet mesh, 0% loss, codec on (exact CBOR sizes). Datagram = packet + "
      f"sealed envelope: {env} B for these 5-character node ids and mesh \"default\", "
      f"{ENVELOPE_OVERHEAD} B worst case (64-byte ids, agent.wire.ENVELOPE_OVERHEAD).")
    w("")
    w("| N | seeds | packets/s | packet bytes/s | datagram bytes/s | worst-case datagram bytes/s |")
    w("|---|---|---|---|---|---|")
    for n in (20, 100):
        rows = results.get(f"idle{n}", [])
        if not rows:
            continue
        pk = statistics.median(m["packets_per_node_s"] for _, m, _ in rows)
        by = statistics.median(m["payload_bytes_per_node_s"] for _, m, _ in rows)
        w(f"| {n} | {len(rows)} | {pk:.2f} | {by:.0f} | {by + pk * env:.0f} | {by + pk * ENVELOPE_OVERHEAD:.0f} |")
    w("")
    w("For comparison (ENGINEERING.md section 4): swim-protocol 0.6.3 with 10 members sends 812 B/s and "
      "3.7 packets/s per member.")
    w("")
    if problems:
        w("## Property violations seen during the benchmark")
        w("")
        for p in problems:
            w(f"- {p}")
        w("")

    text = "\n".join(out)
    print(text)
    Path(a.out).write_text(text)
    print(f"\nwrote {a.out} ({wall:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
