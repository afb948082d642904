"""Real-process benchmark: N `meshagent run` processes, each in its own network
namespace on one bridge (tests/netns.py), measured against the product targets.

    sudo python bench/mesh_real.py                       # 20 agents, all phases but the soak
    sudo python bench/mesh_real.py --soak-minutes 10 --loss 20
    sudo python bench/mesh_real.py --only soak --soak-minutes 10

Phases:
  seeds   all agents started with one seed (--no-mdns); time from the last start
          (the last Popen) until every agent's /status counts N alive members.
  idle    (same lab, converged) CPU % of one core and RSS per agent over
          --idle-seconds (psutil on the pids), bytes/s per agent from the veth
          counters on the hub side (everything the agent sends: mesh, mDNS, ARP).
          Nothing polls the agents during this window.
  crash   (same lab) --kills times: SIGKILL one agent; detection time per survivor
          = its log line "member X: ... -> dead" minus the kill time (exact to the
          millisecond, independent of polling); median and max over survivors and kills.
  mdns    a fresh lab, no seeds, mDNS only; same convergence measurement.
  soak    a fresh lab, --loss % on every agent's egress (netem, or nftables where the
          kernel lacks netem: see tests/netns.py), --soak-minutes; false deaths =
          any "-> dead"/"-> left" log line; suspicions counted from the logs; /status
          of every agent read every 5 s as a liveness check.

Writes a Markdown report (default bench/RESULTS-real.md); numbers side by side with
the targets. Cleans up namespaces and processes on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import psutil  # noqa: E402

import netns  # noqa: E402

TARGETS = {
    "seeds_converge_s": 3.0,
    "mdns_converge_s": 5.0,
    "crash_median_s": 3.0,
    "crash_max_s": 6.0,
    "false_deaths": 0,
    "cpu_pct": 1.0,
    "rss_mb": 45.0,
    "bytes_per_s": 2048.0,
}

LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def log_time(line: str) -> float | None:
    m = LOG_TS.match(line)
    if not m:
        return None
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def log_lines(lab: netns.Lab, pattern: str) -> list[tuple[int, float | None, str]]:
    rx = re.compile(pattern)
    out = []
    for p in lab.history:
        for line in p.log.read_text(errors="replace").splitlines():
            if rx.search(line):
                out.append((p.i, log_time(line), line))
    return out


def wait_members(lab: netns.Lab, indices: list[int], alive: int, timeout: float, interval: float = 0.1, dead: int = 0) -> float:
    """Poll /status until every agent counts `alive` alive (and `dead` dead) members; return when (monotonic)."""
    def pred():
        lab.check_running(indices)
        got = lab.get([(i, "status") for i in indices], timeout=1.0)
        counts = {i: (None if s is None else (s["members"]["alive"], s["members"]["dead"])) for i, s in zip(indices, got)}
        return all(c == (alive, dead) for c in counts.values()), counts

    lab.wait_until(pred, timeout, interval, what=f"{len(indices)} agents to count {alive} alive")
    return time.monotonic()


def start_and_converge(lab: netns.Lab, n: int, timeout: float, **kw) -> dict:
    t_first = time.monotonic()
    wall_first = time.time()
    for i in range(n):
        lab.start_agent(i, **kw)
    t_last = time.monotonic()
    done = wait_members(lab, list(range(n)), n, timeout)
    ready = [t for _, t, _ in log_lines(lab, r" listening on ") if t is not None]
    last_ready = max(ready) - wall_first + t_first if len(ready) == n else None
    return {
        "from_last_start_s": round(done - t_last, 2),
        "from_first_start_s": round(done - t_first, 2),
        "spawn_spread_s": round(t_last - t_first, 2),
        "from_last_ready_s": round(done - last_ready, 2) if last_ready else None,
    }


def measure_idle(lab: netns.Lab, n: int, seconds: float) -> dict:
    procs = {i: psutil.Process(lab.procs[i].pid) for i in range(n)}
    # sent_bytes counts only mesh datagrams (not API answers), so reading /status just
    # outside the window leaves both it and the veth counters unperturbed
    before_status = lab.get([(i, "status") for i in range(n)], timeout=2.0)
    cpu0 = {i: p.cpu_times() for i, p in procs.items()}
    net0 = lab.link_counters()
    t0 = time.monotonic()
    rss_max = dict.fromkeys(procs, 0)
    while time.monotonic() - t0 < seconds:
        for i, p in procs.items():
            rss_max[i] = max(rss_max[i], p.memory_info().rss)
        time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
    elapsed = time.monotonic() - t0
    cpu1 = {i: p.cpu_times() for i, p in procs.items()}
    net1 = lab.link_counters()
    after_status = lab.get([(i, "status") for i in range(n)], timeout=2.0)
    cpu = [((cpu1[i].user + cpu1[i].system) - (cpu0[i].user + cpu0[i].system)) / elapsed * 100 for i in procs]
    rss = [rss_max[i] / 2**20 for i in procs]
    tx = [(net1[i]["tx_bytes"] - net0[i]["tx_bytes"]) / elapsed for i in procs]
    rx = [(net1[i]["rx_bytes"] - net0[i]["rx_bytes"]) / elapsed for i in procs]
    pkts = [(net1[i]["tx_packets"] - net0[i]["tx_packets"]) / elapsed for i in procs]
    payload = []
    for b, a in zip(before_status, after_status):
        if a and b:
            payload.append((a["traffic"]["sent_bytes"] - b["traffic"]["sent_bytes"]) / elapsed)
    return {
        "seconds": round(elapsed, 1),
        "cpu_pct": summary(cpu), "rss_mb": summary(rss), "tx_bytes_per_s": summary(tx), "rx_bytes_per_s": summary(rx),
        "tx_packets_per_s": summary(pkts), "mesh_payload_bytes_per_s": summary(payload) if payload else None,
    }


def summary(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"median": round(statistics.median(xs), 2), "max": round(xs[-1], 2), "min": round(xs[0], 2)}


def measure_crashes(lab: netns.Lab, n: int, kills: int) -> dict:
    victims = list(range(n - 1, n - 1 - kills, -1))
    per_kill = []
    alive = list(range(n))
    for k, v in enumerate(victims):
        time.sleep(3)
        wall = time.time()
        lab.kill(v)
        alive.remove(v)
        wait_members(lab, alive, len(alive), 60, interval=0.25, dead=k + 1)
        time.sleep(0.5)
        lines = [(i, t) for i, t, line in log_lines(lab, rf"member n{v}: \w+ -> dead") if t is not None and i in alive]
        first = {}
        for i, t in lines:
            first[i] = min(first.get(i, t), t)
        missing = set(alive) - set(first)
        times = sorted(max(0.0, t - wall) for t in first.values())
        per_kill.append({"victim": f"n{v}", "survivors": len(alive), "missing_log": sorted(missing),
                         "median_s": round(statistics.median(times), 2), "max_s": round(times[-1], 2),
                         "min_s": round(times[0], 2)})
        log(f"kill {k + 1}/{kills}: n{v} dead in every survivor's log: median {per_kill[-1]['median_s']} s, max {per_kill[-1]['max_s']} s")
    return {
        "kills": per_kill,
        "median_s": round(statistics.median(k["median_s"] for k in per_kill), 2),
        "max_s": round(max(k["max_s"] for k in per_kill), 2),
    }


def distinct_suspicions(lines) -> set[tuple[str, str]]:
    """(member, incarnation) pairs: one suspicion episode, however many agents logged it
    (a refutation raises the incarnation, so the next suspicion is a new pair)."""
    rx = re.compile(r"member (\S+): \w+ -> suspect \(incarnation (\d+)\)")
    return {m.groups() for _, _, line in lines if (m := rx.search(line))}


def soak(lab: netns.Lab, n: int, minutes: float, loss: float, where: str) -> dict:
    for i in range(n):
        lab.start_agent(i, seeds=[0])
    wait_members(lab, list(range(n)), n, 90, interval=0.5)
    methods = {lab.netem(i, loss=f"{loss:g}%", where=where) for i in range(n)}
    log(f"soak: {loss:g}% loss on every agent ({where} side, via {sorted(methods)}) for {minutes:g} min")
    t0 = time.monotonic()
    reads = answered = 0
    worst_alive = n
    next_report = 60
    reported = 0
    while (t := time.monotonic() - t0) < minutes * 60:
        lab.check_running(range(n))
        got = lab.get([(i, "status") for i in range(n)], timeout=3.0)
        reads += n
        for s in got:
            if s is not None:
                answered += 1
                worst_alive = min(worst_alive, s["members"]["alive"] + s["members"]["suspect"])
        deaths = log_lines(lab, r"-> (dead|left)")
        for i, _, line in deaths[reported:]:
            log(f"FALSE DEATH in n{i}'s view at {t:.0f} s: {line}")
        reported = len(deaths)
        if t >= next_report:
            log(f"soak {t / 60:.0f}/{minutes:g} min: {len(log_lines(lab, r'-> suspect'))} suspicions, {len(deaths)} deaths so far")
            next_report += 60
        time.sleep(max(0.0, 5.0 - (time.monotonic() - t0 - t)))
    elapsed = time.monotonic() - t0
    suspicions = log_lines(lab, r"-> suspect")
    deaths = log_lines(lab, r"-> (dead|left)")
    refuted = log_lines(lab, r"suspect -> alive")
    awareness = [s.get("awareness") for s in lab.get([(i, "status") for i in range(n)], timeout=3.0) if s]
    for i in range(n):
        lab.clear_netem(i)
    return {
        "nodes": n, "minutes": round(elapsed / 60, 1), "loss_pct": loss, "where": where, "method": sorted(methods),
        "false_deaths": len(deaths), "death_lines": [f"n{i}: {line}" for i, _, line in deaths[:10]], "logs": str(lab.workdir),
        "suspicions": len(suspicions), "suspicions_per_node_per_min": round(len(suspicions) / n / (elapsed / 60), 2),
        "distinct_suspicions": len(distinct_suspicions(suspicions)),
        "refuted": len(refuted), "status_reads_answered": f"{answered}/{reads}",
        "min_alive_plus_suspect": worst_alive, "awareness_at_end": awareness,
    }


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "agent"], capture_output=True, text=True).stdout.strip()
    return {
        "uname": " ".join(platform.uname()), "cpu": cpu, "nproc": os.cpu_count(), "python": sys.version.split()[0],
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "commit": (commit or "none") + (" + uncommitted changes in agent/" if dirty else ""),
    }


def verdict(value, target, lower_is_better=True) -> str:
    if value is None:
        return "n/a"
    return "meets" if (value <= target if lower_is_better else value >= target) else "**misses**"


def report(res: dict, nodes: int, argv: list[str]) -> str:
    m = res["machine"]
    out = [
        "# meshagent: real-process benchmark",
        "",
        f"Generated by `bench/mesh_real.py {' '.join(argv)}`; agents are real "
        "`python -m agent run` processes, one per network namespace, on one Linux bridge "
        "(tests/netns.py). Fleet key on (ChaCha20-Poly1305 envelope), membership profile `lan` (defaults).",
        "",
        f"- machine: `{m['uname']}`",
        f"- CPU: {m['cpu']}, nproc {m['nproc']}",
        f"- Python {m['python']}, date {m['date']}, code {m['commit']}",
        "",
        "## Against the targets",
        "",
        "| measure | target | measured | |",
        "|---|---|---|---|",
    ]
    n = nodes
    if "seeds" in res:
        v = res["seeds"]["from_last_start_s"]
        out.append(f"| full membership of {n}, seeds (from last start) | ≤ {TARGETS['seeds_converge_s']:g} s | {v} s | {verdict(v, TARGETS['seeds_converge_s'])} |")
    if "mdns" in res:
        v = res["mdns"]["from_last_start_s"]
        out.append(f"| full membership of {n}, mDNS alone (from last start) | ≤ {TARGETS['mdns_converge_s']:g} s | {v} s | {verdict(v, TARGETS['mdns_converge_s'])} |")
    if "crash" in res:
        c = res["crash"]
        out.append(f"| crash detection, median over survivors and kills | ≤ {TARGETS['crash_median_s']:g} s | {c['median_s']} s | {verdict(c['median_s'], TARGETS['crash_median_s'])} |")
        out.append(f"| crash detection, max | ≤ {TARGETS['crash_max_s']:g} s | {c['max_s']} s | {verdict(c['max_s'], TARGETS['crash_max_s'])} |")
    if "idle" in res:
        i = res["idle"]
        out.append(f"| idle CPU per agent (median / max) | < {TARGETS['cpu_pct']:g} % of a core | {i['cpu_pct']['median']} / {i['cpu_pct']['max']} % | {verdict(i['cpu_pct']['max'], TARGETS['cpu_pct'])} |")
        out.append(f"| idle RSS per agent (median / max) | < {TARGETS['rss_mb']:g} MB | {i['rss_mb']['median']} / {i['rss_mb']['max']} MB | {verdict(i['rss_mb']['max'], TARGETS['rss_mb'])} |")
        out.append(f"| bytes/s sent per agent, all traffic on its veth (median / max) | < {TARGETS['bytes_per_s']:g} B/s | {i['tx_bytes_per_s']['median']:.0f} / {i['tx_bytes_per_s']['max']:.0f} B/s | {verdict(i['tx_bytes_per_s']['max'], TARGETS['bytes_per_s'])} |")
    if "soak" in res:
        s = res["soak"]
        out.append(f"| false deaths, {s['minutes']} min at {s['loss_pct']:g}% loss, {s['nodes']} agents | 0 | {s['false_deaths']} | {verdict(s['false_deaths'], 0)} |")
    out += ["", "## Details", ""]
    if "seeds" in res:
        s = res["seeds"]
        out.append(f"**Join by seeds** ({n} agents, one seed, `--no-mdns`): all count {n} alive {s['from_last_start_s']} s after the last "
                   f"process was started ({s['from_first_start_s']} s after the first; starting {n} processes took {s['spawn_spread_s']} s); "
                   f"{s['from_last_ready_s']} s after the last agent logged that it was listening.")
        out.append("")
    if "mdns" in res:
        s = res["mdns"]
        out.append(f"**Discovery by mDNS alone** ({n} agents, no seeds): {s['from_last_start_s']} s after the last start "
                   f"({s['from_first_start_s']} s after the first; spawn spread {s['spawn_spread_s']} s); "
                   f"{s['from_last_ready_s']} s after the last agent was listening (mDNS registration probing alone takes about 1.7 s).")
        out.append("")
    if "idle" in res:
        i = res["idle"]
        out.append(f"**Idle** (converged, {i['seconds']} s, nothing polling): per agent median / max / min")
        out.append("")
        out.append("| | median | max | min |")
        out.append("|---|---|---|---|")
        for key, label in [("cpu_pct", "CPU % of one core"), ("rss_mb", "RSS MB (max over the window)"),
                           ("tx_bytes_per_s", "bytes/s sent (veth)"), ("rx_bytes_per_s", "bytes/s received (veth)"),
                           ("tx_packets_per_s", "packets/s sent (veth)"), ("mesh_payload_bytes_per_s", "sealed mesh payload bytes/s (status traffic.sent_bytes)")]:
            if i.get(key):
                out.append(f"| {label} | {i[key]['median']} | {i[key]['max']} | {i[key]['min']} |")
        out.append("")
    if "crash" in res:
        out.append("**Crash detection** (SIGKILL; per survivor: its log's `-> dead` time minus the kill time):")
        out.append("")
        out.append("| victim | survivors | median s | min s | max s |")
        out.append("|---|---|---|---|---|")
        for k in res["crash"]["kills"]:
            out.append(f"| {k['victim']} | {k['survivors']} | {k['median_s']} | {k['min_s']} | {k['max_s']} |")
        out.append("")
    if "soak" in res:
        s = res["soak"]
        out.append(f"**Loss soak**: {s['nodes']} agents, {s['loss_pct']:g}% loss on every agent's egress "
                   f"(side `{s['where']}`, via {', '.join(s['method'])}; one lossy hop per datagram, so each datagram between two agents is "
                   f"lost with {s['loss_pct']:g}% independently), {s['minutes']} min: **{s['false_deaths']} false deaths**, "
                   f"{s.get('distinct_suspicions', '?')} distinct suspicions (member, incarnation), logged as {s['suspicions']} "
                   f"alive->suspect transitions across all agents' views ({s['suspicions_per_node_per_min']} per agent per minute), "
                   f"{s['refuted']} suspect->alive; "
                   f"status reads answered {s['status_reads_answered']}; fewest alive+suspect members seen by any agent: "
                   f"{s['min_alive_plus_suspect']}/{s['nodes']}; Lifeguard awareness at the end: {s['awareness_at_end']}.")
        for line in s["death_lines"]:
            out.append(f"    {line}")
        if s.get("logs"):
            out.append(f"(agent logs of the soak kept in `{s['logs']}` on the machine that ran it)")
        out.append("")
    out.append("Reference (ENGINEERING.md §4, same class of machine): swim-protocol 0.6.3 with 10 members on loopback: "
               "all alive after 4.15 s, SIGKILL detected after 8.60 s median (9.23 s max), 812 bytes/s and 0.5 % of a core per member.")
    out.append("")
    if res.get("history"):
        out += ["## Other runs on the same machine", ""] + [f"- {h}" for h in res["history"]] + [""]
    out += notes(res, n)
    out += ["<details><summary>Raw results (JSON; <code>--rerender</code> rebuilds this file from it)</summary>", "",
            "```json", json.dumps({"argv": argv, "nodes": nodes, **res}, indent=1, sort_keys=True), "```",
            "", "</details>", ""]
    return "\n".join(out)


def notes(res: dict, n: int) -> list[str]:
    """What the numbers follow from, computed from the agent's own settings."""
    out = ["## Reading the numbers", ""]
    try:
        from agent.core.settings import PROFILES

        lan = PROFILES["lan"]
        lo, hi = lan.suspicion_bounds_ms(n)
        out.append(
            f"- Crash detection = time to a failed probe (probe every {lan.probe_interval_ms} ms, "
            f"{lan.probe_timeout_ms} ms timeout, then {lan.indirect_checks} indirect probes) plus the suspicion timeout, which with "
            f"the `lan` profile at {n} members lies between {lo / 1000:g} s (suspicion_mult {lan.suspicion_mult} x log10({n}) x probe "
            f"interval) and {hi / 1000:g} s, shrinking toward the minimum as independent confirmations arrive (Lifeguard). "
            f"A median of 3 s is therefore out of reach with these defaults, whatever the implementation: it needs a "
            f"smaller suspicion_mult or probe interval, at the price of more false suspicions under loss.")
    except Exception as exc:  # the settings module moved: say so rather than fail the report
        out.append(f"- (cannot read the membership settings: {exc})")
    soak = res.get("soak")
    if soak and "nft" in soak["method"]:
        out.append("- This kernel has no sch_netem, so loss was made with nftables in each agent's namespace "
                   f"(`numgen random mod 10000 < {round(soak['loss_pct'] * 100)} drop` on the output hook: IPv4 only, ARP untouched); with netem "
                   f"available the harness uses `tc qdisc replace dev eth0 root netem loss {soak['loss_pct']:g}%` instead, same semantics.")
    out.append("- Bytes/s are everything an agent's veth carried in the window (Ethernet frames: mesh datagrams with their "
               "CoAP/UDP/IP/Ethernet headers, mDNS, ARP); the sealed-payload line is the agent's own count of mesh "
               "datagram payload bytes.")
    out.append("- 20 agents share 2 cores here; a Pi runs pure Python roughly 5-7x slower (ENGINEERING.md §3), so idle CPU "
               "there would be several times the figure above.")
    out.append("")
    return out


def rerender(path: Path) -> dict:
    text = path.read_text()
    m = re.search(r"```json\n(.*?)\n```", text, re.S)
    if not m:
        raise SystemExit(f"no raw JSON block in {path}")
    return json.loads(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=30)
    ap.add_argument("--soak-minutes", type=float, default=0, help="0 = no soak")
    ap.add_argument("--soak-nodes", type=int, default=None, help="default: --nodes")
    ap.add_argument("--loss", type=float, default=20.0, help="percent, for the soak")
    ap.add_argument("--loss-where", choices=["node", "hub", "both"], default="node")
    ap.add_argument("--only", action="append", choices=["seeds", "idle", "crash", "mdns", "soak"])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-real.md")
    ap.add_argument("--rerender", action="store_true", help="rebuild --out from the raw JSON inside it (no measuring)")
    args = ap.parse_args()
    if args.rerender:
        res = rerender(args.out)  # hand-added "history": [text, ...] entries are kept and shown
        argv, nodes = res.pop("argv"), res.pop("nodes")
        args.out.write_text(report(res, nodes, argv))
        print(f"rewrote {args.out}")
        return 0
    problem = netns.environment_problem()
    if problem:
        print(f"cannot run: {problem}", file=sys.stderr)
        return 1
    netns.install_sigterm_cleanup()
    phases = set(args.only or ["seeds", "idle", "crash", "mdns"] + (["soak"] if args.soak_minutes else []))
    n = args.nodes
    res: dict = {"machine": machine()}
    try:
        if phases & {"seeds", "idle", "crash"}:
            with netns.Lab(n) as lab:
                log(f"seeds: starting {n} agents with one seed")
                res["seeds"] = start_and_converge(lab, n, 120, seeds=[0])
                log(f"seeds: {res['seeds']}")
                if "idle" in phases:
                    time.sleep(5)
                    res["idle"] = measure_idle(lab, n, args.idle_seconds)
                    log(f"idle: {res['idle']}")
                if "crash" in phases:
                    res["crash"] = measure_crashes(lab, n, args.kills)
                if "seeds" not in phases:
                    del res["seeds"]
        if "mdns" in phases:
            with netns.Lab(n) as lab:
                log(f"mdns: starting {n} agents, mDNS only")
                res["mdns"] = start_and_converge(lab, n, 120, mdns=True)
                log(f"mdns: {res['mdns']}")
        if "soak" in phases:
            if not args.soak_minutes:
                ap.error("--only soak needs --soak-minutes")
            sn = args.soak_nodes or n
            with netns.Lab(sn, keep_logs=True) as lab:
                res["soak"] = soak(lab, sn, args.soak_minutes, args.loss, args.loss_where)
                log(f"soak: {res['soak']}")
    finally:
        leftovers = netns.sweep()
        if leftovers:
            log(f"swept leftovers: {leftovers}")
    text = report(res, n, sys.argv[1:])
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
