"""Scenarios of the task engine on a simulated mesh, and their runner:

    python -m agent.sim.task_main --scenario steady --seed 7
    python -m agent.sim.task_main --scenario crashes --seed 0 --seeds 500   (seeds 0..499)
    python -m agent.sim.task_main --scenario steady --seed 3 --nodes 200 --tasks 2000 --strategy hash
    python -m agent.sim.task_main --list

Each scenario is a function of its seed: the seed draws the mesh size, the
task count, loss and delay, each node's capabilities and handlers, the task
mix (kind, duration, required capabilities, strategy per task unless
--strategy fixes one) and the faults (which nodes crash or restart, when,
where the mesh splits). Parameters not given are drawn from the seed exactly
as the tests draw them, so the command a failing test prints replays the run
(tests/test_sim_tasks.py). Exit status 1 if a property was violated.

Properties (each scenario's docstring says which it checks): every accepted
task ends `done` within a bound (at least once); each run happened on a member
that offers the kind and matches the required capabilities; `hash` tasks ran
on their ring owner; no two runs of one task at once (except across a
partition: there a cut-off executor is declared dead while it still runs);
one result per task that every home member holds after things settle; queued
work spreads by stealing and migrates off an overloaded node without bouncing;
a membership change re-homes about 1/N of the tasks.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

from agent.core.tasks import TaskSettings
from agent.core.taskspec import STRATEGIES, TaskSpec
from agent.sim import args
from agent.sim.task_cluster import TaskSim

TICK_MS = 50
FINISH_MS = 60_000  #: every accepted task ends this long after the last submission or fault, at most
SETTLE_MS = 20_000  #: then every home member holds the one result within this long
MAX_LISTED = 3  #: offenders named per violation

# ----------------------------------------------------------------- parameters


@dataclass
class TaskParams:
    """Everything a run depends on. Fields left None are drawn from the seed
    (always all of them, in the same order, so fixing one does not shift the others)."""

    scenario: str = "steady"
    seed: int = 0
    nodes: int | None = None
    tasks: int | None = None
    strategy: str | None = None  #: capability, auction or hash for every task; None: drawn per task
    loss: float | None = None
    faults: int | None = None  #: nodes crashed (scenario crashes)

    def replay(self) -> str:
        cmd = (f"python -m agent.sim.task_main --scenario {self.scenario} --seed {self.seed} --nodes {self.nodes}"
               f" --tasks {self.tasks} --loss {self.loss} --faults {self.faults}")
        return cmd + (f" --strategy {self.strategy}" if self.strategy else "")


#: per scenario: ranges of (nodes, tasks, loss, faults) drawn from the seed
RANGES: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[float, float], tuple[int, int]]] = {
    "steady": ((100, 300), (1000, 3000), (0.0, 0.0), (0, 0)),
    "crashes": ((20, 60), (200, 600), (0.05, 0.20), (1, 5)),
    "partition": ((20, 40), (200, 400), (0.0, 0.02), (0, 0)),
    "steal": ((8, 16), (60, 150), (0.0, 0.0), (0, 0)),
    "ring": ((20, 100), (2000, 5000), (0.0, 0.0), (0, 0)),
}


def child_rngs(seed: int) -> dict[str, random.Random]:
    """The independent random streams of one seed, always drawn in the same order."""
    root = random.Random(seed)
    return {name: random.Random(root.getrandbits(64)) for name in ("params", "mesh", "work", "faults", "sim")}


def resolve(p: TaskParams, r: random.Random) -> TaskParams:
    (n_lo, n_hi), (t_lo, t_hi), (l_lo, l_hi), (f_lo, f_hi) = RANGES[p.scenario]
    drawn = {"nodes": r.randint(n_lo, n_hi), "tasks": r.randint(t_lo, t_hi),
             "loss": round(r.uniform(l_lo, l_hi), 3), "faults": r.randint(f_lo, f_hi)}
    out = TaskParams(**{f.name: getattr(p, f.name) for f in fields(p)})
    for k, v in drawn.items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    return out


# ----------------------------------------------------------------- report


@dataclass
class TaskReport:
    params: TaskParams
    violations: list[str] = field(default_factory=list)
    metrics: dict[str, object] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)  #: faults, as they happened
    digest: str = ""
    sim: TaskSim | None = field(default=None, repr=False)
    watch: tuple[str, ...] = ()  #: task ids whose messages the simulator traces
    excused: set[str] = field(default_factory=set)  #: tasks lost beyond the fault model (see crashes)

    def fail(self, what: str, cases: list[str]) -> None:
        """One violation naming how many cases broke `what`, and the first few."""
        if cases:
            self.violations.append(f"{what}: {len(cases)} case(s): " + "; ".join(cases[:MAX_LISTED]))

    def replay(self) -> str:
        return self.params.replay()

    def failure(self) -> str:
        p = self.params
        lines = [f"task scenario {p.scenario} seed={p.seed}: {len(self.violations)} violation(s)"]
        lines += [f"  - {v}" for v in self.violations[:10]]
        lines.append(f"replay: {self.replay()}")
        return "\n".join(lines)

    def summary(self) -> str:
        p = self.params
        lines = [f"task scenario {p.scenario}  seed={p.seed}  nodes {p.nodes}  tasks {p.tasks}  loss {p.loss}"
                 f"  faults {p.faults}  strategy {p.strategy or 'mixed'}",
                 f"trace digest {self.digest}"]
        lines += [f"  {e}" for e in self.events]
        for k, v in self.metrics.items():
            lines.append(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
        lines.append("OK" if not self.violations else "FAILED")
        lines += [f"  - {v}" for v in self.violations]
        if self.violations:
            lines += [f"seed={p.seed}", f"replay: {self.replay()}"]
        return "\n".join(lines)


def expect(rep: TaskReport) -> None:
    """Assert that a run kept every property; the message names the seed and the replay command."""
    if rep.violations:
        raise AssertionError(rep.failure())


class replay_on_failure:
    """Context manager: an AssertionError inside gets the seed and the replay command."""

    def __init__(self, rep: TaskReport):
        self.rep = rep

    def __enter__(self) -> TaskReport:
        return self.rep

    def __exit__(self, typ, exc, tb) -> bool:
        if typ is not None and issubclass(typ, AssertionError):
            raise AssertionError(f"{exc}\nseed={self.rep.params.seed}\nreplay: {self.rep.replay()}") from exc
        return False


def run_tasks(scenario: str = "steady", seed: int = 0, *, watch: Iterable[str] = (), **overrides) -> TaskReport:
    """Run one scenario; never raises for a property violation (see TaskReport.violations).
    `watch`: task ids whose messages and runs go to the report's sim.trace."""
    rngs = child_rngs(seed)
    p = resolve(TaskParams(scenario, seed, **overrides), rngs["params"])
    rep = TaskReport(p, watch=tuple(watch))
    try:
        SCENARIOS[scenario](p, rngs, rep)
    except Exception:  # a bug in the simulator or the engine: report it with the seed
        rep.violations.append(f"exception: {traceback.format_exc(limit=-6)}")
    if rep.sim is not None:
        sim = rep.sim
        rep.digest = digest(sim)
        rep.metrics.update(sim_metrics(sim))
    return rep


def digest(sim: TaskSim) -> str:
    """A fingerprint of what ran where and when: equal for equal runs."""
    h = hashlib.sha256()
    for tid, r in sim.runs:
        h.update(f"{tid} {r.node} {r.attempt} {r.start} {r.end} {r.via};".encode())
    h.update(f"{sim.now} {sorted(sim.done_at.items())}".encode())
    return h.hexdigest()[:16]


def sim_metrics(sim: TaskSim) -> dict[str, object]:
    lat = sorted(sim.done_at[t] - sim.submitted[t][1] for t in sim.done_at)
    moved = [len(m) for m in sim.moves.values()]
    return {
        "virtual_ms": sim.now, "accepted": len(sim.accepted), "refused": len(sim.refused), "runs": len(sim.runs),
        "extra_runs": len(sim.runs) - len({t for t, _ in sim.runs}), "moved_tasks": len(moved),
        "max_moves": max(moved, default=0), "overlaps": len(sim.overlaps),
        "finish_p50_ms": _pct(lat, 0.5), "finish_p99_ms": _pct(lat, 0.99), "finish_max_ms": lat[-1] if lat else 0,
        "max_datagram": sim.max_datagram, "messages": sim.net.stats.sent,
    }


def _pct(xs: list[int], q: float) -> int:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0


# ----------------------------------------------------------------- the mesh and the task mix


def node_caps(r: random.Random) -> tuple[str, ...]:
    """Camera on 10%, arm64 on half, one of four memory sizes."""
    caps = ["arch=arm64" if r.random() < 0.5 else "arch=amd64", f"ram_mb={r.choice((512, 1024, 2048, 4096))}"]
    if r.random() < 0.1:
        caps.append("camera")
    return tuple(caps)


def node_kinds(r: random.Random) -> dict[str, int]:
    """Everyone runs `work` (and the built-ins); 30% also `transcode`, one at a time."""
    kinds = {"echo": 64, "sleep": 64, "sysinfo": 64, "work": 64}
    if r.random() < 0.3:
        kinds["transcode"] = 1
    return kinds


#: required capabilities some member usually offers (partial: 3 of 4 is a match of 0.75 >= 0.7)
SATISFIABLE = [(), (), (), ("arch=arm64",), ("ram_mb>=2048",), ("camera",), ("arch=arm64", "ram_mb>=1024"),
               ("camera", "arch=amd64", "ram_mb>=512", "gpu")]
#: required capabilities no member offers (match 0, or below the threshold)
UNSATISFIABLE = [("ram_mb>=8192",), ("gpu", "arch=riscv64"), ("camera", "ram_mb>=8192", "arch=mips"),
                 ("camera", "ram_mb>=8192", "arch=mips", "gpu")]


def duration(r: random.Random, long_ms: int = 8000) -> int:
    """Mostly short, some medium, a few long runs."""
    x = r.random()
    if x < 0.7:
        return r.randint(20, 300)
    return r.randint(300, min(2000, long_ms)) if x < 0.95 else r.randint(min(2000, long_ms), long_ms)


def draw_task(r: random.Random, strategy: str | None, *, caps_from=SATISFIABLE, long_ms: int = 8000,
              max_attempts: int = 3, transcode: float = 0.1) -> dict:
    """The fields of one submission (TaskSim.submit keywords); `transcode` is
    the share of tasks of that kind (which only some nodes run)."""
    kind = "transcode" if r.random() < transcode else "work"
    return {"kind": kind, "args": {"ms": duration(r, long_ms)},
            "caps": r.choice(caps_from), "strategy": strategy or r.choice(STRATEGIES),
            "priority": r.randint(0, 9), "max_attempts": max_attempts}


def able(sim: TaskSim, kind: str, caps: tuple[str, ...]) -> bool:
    """Ground truth: some up member can run it."""
    spec = TaskSpec("0" * 16, kind, {}, caps)
    return any(sim.capable(spec, n) for n in sim.up())


def pace(sim: TaskSim, at_ms: int) -> None:
    """Run the simulation up to `at_ms`."""
    if at_ms > sim.now:
        sim.run_for(at_ms - sim.now)


def window_ms(tasks: int, nodes: int, slots: int = 2, utilisation: float = 0.5, mean_ms: int = 650) -> int:
    """How long to spread `tasks` submissions over to keep the mesh about half busy."""
    per_s = nodes * slots * 1000 / mean_ms * utilisation
    return max(1000, int(tasks / per_s * 1000))


def new_sim(rep: TaskReport, rngs: dict[str, random.Random], nodes: int, **kw) -> TaskSim:
    """The scenario's simulator (the report keeps the last one made), tracing the watched tasks."""
    sim = rep.sim = TaskSim(rngs["sim"].getrandbits(64), nodes, **kw)
    sim.watch = set(rep.watch)
    return sim


# ----------------------------------------------------------------- checks


def describe(sim: TaskSim, tid: str) -> str:
    rec = sim.record(tid)
    runs = [f"{r.node}#{r.attempt}@{r.start}-{r.end}" for t, r in sim.runs if t == tid]
    if rec is None:
        return f"{tid}: no record on any up node; runs {runs}"
    hist = ", ".join(f"{e.at_ms} {e.what} {e.node} {e.detail}".strip() for e in rec.history[-4:])
    return f"{tid} ({rec.spec.strategy}) {rec.state} attempt {rec.attempt} on {rec.executor or '-'}; runs {runs}; history ..{hist}"


def check_sim(sim: TaskSim, rep: TaskReport) -> None:
    """What the simulator saw as it ran: concurrent runs, oversized datagrams."""
    rep.fail("seen during the run", [f"t={v.at} {v.what}" for v in sim.violations])


def check_finished(sim: TaskSim, rep: TaskReport, limit_ms: int = FINISH_MS, excuse: Callable[[str], bool] | None = None) -> bool:
    """Every accepted task reaches a final state within `limit_ms` (at least once).
    Tasks `excuse` names (lost beyond the fault model) go to rep.excused instead."""
    if sim.run_until(sim.finished, limit_ms):
        return True
    left = [t for t in sim.accepted if t not in sim.done_at]
    rep.excused.update(t for t in left if excuse is not None and excuse(t))
    rep.metrics["lost_beyond_fault_model"] = len(rep.excused)
    rep.fail(f"liveness: not finished {limit_ms} ms after the last submission or fault",
             [describe(sim, t) for t in left if t not in rep.excused])
    return len(rep.excused) == len(left)


def owed(sim: TaskSim, rep: TaskReport) -> list[str]:
    """The accepted tasks the checks hold the engine to (all but the excused)."""
    return [t for t in sim.accepted if t not in rep.excused]


def check_done(sim: TaskSim, rep: TaskReport, tids: Iterable[str]) -> None:
    """Finished means `done`: with these retries and faults nothing should fail."""
    bad = [t for t in tids if (r := sim.record(t)) is None or r.state != "done"]
    rep.fail("accepted task not done", [describe(sim, t) for t in bad])


def check_capable(sim: TaskSim, rep: TaskReport) -> None:
    """Every run was on a member that offers the kind and matches the caps >= threshold."""
    rep.fail("ran on a member that cannot run it",
             [f"{t} ({sim.submitted[t][0].kind} {sim.submitted[t][0].caps}) on {r.node} {sim.nodes[r.node].caps}"
              for t, r in sim.runs if not r.capable])


def check_hash_owner(sim: TaskSim, rep: TaskReport, tids: set[str]) -> None:
    """A `hash` task placed (not stolen or migrated) runs on the first capable ring owner."""
    bad = [f"{t} ran on {r.node} via {r.via}, owner {r.owner}" for t, r in sim.runs
           if t in tids and sim.submitted[t][0].strategy == "hash" and not _moved(r.via) and r.node != r.owner]
    rep.fail("hash task not on its ring owner", bad)


def _moved(via: str) -> bool:
    return via.startswith(("stolen", "migrated"))


def check_settled(sim: TaskSim, rep: TaskReport, tids: list[str], limit_ms: int = SETTLE_MS) -> None:
    """One result per task, held by every up home member, within `limit_ms`."""
    observer = sim.up()[0]
    bad: list[str] = []
    split: list[str] = []
    for _ in range(max(1, limit_ms // 1000)):
        bad, split = sim.unsettled(tids, observer), sim.results_agree()
        if not bad and not split:
            break
        sim.run_for(1000)
    rep.fail(f"records not settled {limit_ms} ms after the end", bad)
    rep.fail(f"holders still disagree on the result {limit_ms} ms after the end", [describe(sim, t) for t in split])


def check_refusals(sim: TaskSim, rep: TaskReport, expect_ok: list[str], expect_refused: list[str]) -> None:
    """Tasks some member can run are accepted; the others are refused with a reason."""
    rep.fail("task refused though a member can run it",
             [f"{t} {sim.submitted[t][0].caps}: {sim.refused.get(t)}" for t in expect_ok if t not in sim.accepted])
    rep.fail("unsatisfiable task not refused with a reason",
             [f"{t} {sim.submitted[t][0].caps}: {sim.refused.get(t)!r}" for t in expect_refused
              if t in sim.accepted or not _explained(sim.submitted[t][0], sim.refused.get(t, ""))])


def _explained(spec: TaskSpec, reason: str) -> bool:
    """The coordinator says why; for a hash task the client finds no home to ask."""
    return "no alive member" in reason or (spec.strategy == "hash" and reason == "no home")


# ----------------------------------------------------------------- scenarios


def steady(p: TaskParams, rngs: dict[str, random.Random], rep: TaskReport) -> None:
    """A big mesh under a steady stream of mixed tasks, no faults: every
    satisfiable task accepted and done, unsatisfiable ones refused with the
    reason, every run on a capable member, hash tasks on their ring owner,
    no concurrent runs, one result on every home member."""
    mesh, work = rngs["mesh"], rngs["work"]
    caps = [node_caps(mesh) for _ in range(p.nodes)]
    kinds = [node_kinds(mesh) for _ in range(p.nodes)]
    sim = new_sim(rep, rngs, p.nodes, caps=caps.__getitem__, kinds=kinds.__getitem__)
    sim.run_for(1000)
    start, window = sim.now, window_ms(p.tasks, p.nodes)
    ok, refused = [], []
    for i in range(p.tasks):
        pace(sim, start + i * window // p.tasks)
        task = draw_task(work, p.strategy)
        if task["strategy"] != "hash" and work.random() < 0.03:
            task["caps"] = work.choice(UNSATISFIABLE)
        tid = sim.submit(work.choice(sim.up()), **task)
        (ok if able(sim, task["kind"], task["caps"]) else refused).append(tid)
    check_finished(sim, rep)
    check_refusals(sim, rep, ok, refused)
    check_done(sim, rep, sim.accepted)
    check_capable(sim, rep)
    check_hash_owner(sim, rep, set(sim.accepted))
    check_settled(sim, rep, list(sim.accepted))
    check_sim(sim, rep)
    rep.metrics["unsatisfiable"] = len(refused)
    rep.metrics["hash_runs_moved"] = sum(1 for t, r in sim.runs if sim.submitted[t][0].strategy == "hash" and _moved(r.via))


def crashes(p: TaskParams, rngs: dict[str, random.Random], rep: TaskReport) -> None:
    """A lossy mesh where 1-5 nodes crash while tasks stream in (runs die with
    them; some come back after a while with their journal): every accepted
    task ends done within a bound after the last fault, with one result every
    home member agrees on after the loss heals, and never two runs at once."""
    work, faults = rngs["work"], rngs["faults"]
    delay = (1, faults.choice((10, 30, 60)))
    sim = new_sim(rep, rngs, p.nodes, loss=p.loss, delay_ms=delay)
    sim.run_for(1000)
    start, window = sim.now, window_ms(p.tasks, p.nodes)
    plan = crash_plan(faults, sorted(sim.nodes), p.faults, start, window)
    rep.events.append(f"delay {delay[0]}-{delay[1]} ms")
    stream_with_faults(sim, rep, work, plan, start, window, p.tasks,
                       lambda: draw_task(work, p.strategy, caps_from=[()], long_ms=4000, max_attempts=10, transcode=0))
    sim.net.loss = 0.0
    rep.events.append(f"t={sim.now} loss healed")
    healed = sim.now
    # R home members crashing together take every copy of a record with them (they
    # keep unfinished records in memory only): beyond what R replicas promise
    together = sim.detect_ms + 2 * sim.s.resend_ms
    finished = check_finished(sim, rep, excuse=lambda t: sim.home_crashed_together(t, together))
    rep.excused.update(t for t in sim.accepted if sim.record(t) is None and sim.home_crashed_together(t, together))
    rep.metrics["lost_beyond_fault_model"] = len(rep.excused)
    if finished:
        rep.metrics["all_done_after_last_fault_ms"] = max(0, max(sim.done_at.values(), default=healed) - healed)
        check_done(sim, rep, owed(sim, rep))
        check_settled(sim, rep, owed(sim, rep))
    check_capable(sim, rep)
    check_sim(sim, rep)


def stream_with_faults(sim: TaskSim, rep: TaskReport, work: random.Random, plan: list[tuple[int, str, str]],
                       start: int, window: int, count: int, task: Callable[[], dict]) -> None:
    """Submit `count` tasks evenly over `window` ms from random up nodes, carrying
    out the planned faults at their times (the rest after the last submission)."""
    for i in range(count):
        at = start + i * window // count
        while plan and plan[0][0] <= at:
            fault_at, what, node = plan.pop(0)
            pace(sim, fault_at)
            do_fault(sim, rep, what, node)
        pace(sim, at)
        sim.submit(work.choice(sim.up()), **task())
    for fault_at, what, node in plan:
        pace(sim, fault_at)
        do_fault(sim, rep, what, node)


def crash_plan(r: random.Random, names: list[str], count: int, start: int, window: int) -> list[tuple[int, str, str]]:
    """(time, "crash" or "restart", node): `count` distinct nodes crash during the
    stream; about half come back 1-15 s later (some before the others notice)."""
    plan = []
    for node in r.sample(names, count):
        at = start + r.randint(window // 5, window + 3000)
        plan.append((at, "crash", node))
        if r.random() < 0.5:
            plan.append((at + r.randint(1000, 15_000), "restart", node))
    return sorted(plan)


def do_fault(sim: TaskSim, rep: TaskReport, what: str, node: str) -> None:
    if what == "crash":
        sim.crash(node)
    else:
        sim.restart(node)
    rep.events.append(f"t={sim.now} {what} {node}")


def partition(p: TaskParams, rngs: dict[str, random.Random], rep: TaskReport) -> None:
    """The mesh splits in two for a while, then heals: tasks submitted on each
    side during the split are accepted, run on that side (hash tasks on the
    side's ring owner) and finish there; after the heal every task has one
    result that all its home members hold. Two runs of one task at once are
    allowed here (the cut-off executor is declared dead while it runs) and
    only counted."""
    work, faults = rngs["work"], rngs["faults"]
    sim = new_sim(rep, rngs, p.nodes, loss=p.loss)
    sim.overlap_ok = True
    sim.run_for(1000)
    names = sorted(sim.nodes)
    faults.shuffle(names)
    cut = faults.randint(len(names) * 3 // 10, len(names) * 7 // 10)
    sides = [sorted(names[:cut]), sorted(names[cut:])]
    before = p.tasks // 4
    for _ in range(before):  # long runs, many still going when the cut comes
        sim.submit(work.choice(names), **draw_task(work, p.strategy, caps_from=[()], long_ms=6000, transcode=0))
        sim.run_for(TICK_MS)
    sim.partition(*sides)
    rep.events.append(f"t={sim.now} split {len(sides[0])} | {len(sides[1])}")
    pace(sim, sim.now + sim.detect_ms + 500)
    during = split_stream(sim, work, p, sides, p.tasks - before)
    split_done = sim.run_until(lambda: all(t in sim.done_at for t in during), FINISH_MS)
    check_split(sim, rep, sides, during, split_done)
    sim.heal()
    rep.events.append(f"t={sim.now} healed")
    if check_finished(sim, rep):
        check_done(sim, rep, sim.accepted)
        check_settled(sim, rep, list(sim.accepted))
    check_capable(sim, rep)
    check_sim(sim, rep)


def split_stream(sim: TaskSim, work: random.Random, p: TaskParams, sides: list[list[str]], count: int) -> dict[str, int]:
    """Submit `count` tasks, each from a random side's node; task id -> side."""
    out = {}
    start, window = sim.now, window_ms(count, p.nodes)
    for i in range(count):
        pace(sim, start + i * window // count)
        side = work.randrange(2)
        tid = sim.submit(work.choice(sides[side]), **draw_task(work, p.strategy, caps_from=[()], long_ms=3000, transcode=0))
        out[tid] = side
    return out


def check_split(sim: TaskSim, rep: TaskReport, sides: list[list[str]], during: dict[str, int], done: bool) -> None:
    """While split: each side's tasks accepted, run on that side (hash: on the side's owner), finished."""
    rep.fail("task submitted during the split refused", [f"{t}: {sim.refused.get(t)}" for t in during if t not in sim.accepted])
    if not done:
        rep.fail("task submitted during the split not finished on its side",
                 [describe(sim, t) for t in during if t in sim.accepted and t not in sim.done_at])
    members = [set(s) for s in sides]
    rep.fail("task submitted during the split ran on the other side",
             [f"{t} from side {during[t]} ran on {r.node}" for t, r in sim.runs if t in during and r.node not in members[during[t]]])
    check_hash_owner(sim, rep, set(during))


#: in scenario steal every node offers these; the hot node also offers zone=a
STEAL_CAPS = ("arch=arm64", "camera", "ram_mb=2048")
#: the burst's requirements: 4 of 4 on the hot node (so placement picks it), 3 of 4 (0.75) elsewhere (so others may take them)
BURST_CAPS = ("arch=arm64", "camera", "ram_mb>=1024", "zone=a")
MAX_MOVES = 3  #: hand-offs of one task at most (balancing must not make work wander)


def steal(p: TaskParams, rngs: dict[str, random.Random], rep: TaskReport) -> None:
    """A burst of tasks that all land on one node (it alone matches every
    required capability; the others match 3 of 4, enough to run them). With
    stealing on, idle nodes take queued work: the burst ends in at most half
    the time it takes without stealing, and no moved task runs twice at once.
    With the hot node's CPU pinned at 1.0 (stealing off, balancing on) its queue
    migrates to idle nodes: "migrated" in the histories, never back to it, a
    task moved at most MAX_MOVES times and never twice within min_stay_ms."""
    hot = rngs["mesh"].randrange(p.nodes)
    work = rngs["work"]
    burst = [(duration(work, 3000), work.randint(0, 9), work.randrange(p.nodes)) for _ in range(p.tasks)]
    seed = rngs["sim"].getrandbits(64)
    alone = run_burst(rep, seed, p, hot, burst, steal=False)
    spread = run_burst(rep, seed, p, hot, burst, steal=True)
    rep.fail("without stealing or balancing the burst did not stay on the hot node (the scenario is broken)",
             [f"{t} ran on {r.node}" for t, r in alone.runs if r.node != f"n{hot:03d}"])
    ratio = makespan(spread) / max(1, makespan(alone))
    rep.metrics.update({"makespan_alone_ms": makespan(alone), "makespan_stealing_ms": makespan(spread), "makespan_ratio": ratio})
    if ratio > 0.5:
        rep.violations.append(f"stealing: the burst took {makespan(spread)} ms, alone {makespan(alone)} ms (ratio {ratio:.2f} > 0.5)")
    if not any(m.reason == "stolen" for ms in spread.moves.values() for m in ms):
        rep.violations.append("stealing: no task was stolen")
    burning = run_burst(rep, seed, p, hot, burst, steal=False, burner=True)
    check_migration(burning, rep, f"n{hot:03d}")
    rep.events.append(f"hot node n{hot:03d}; the figures below are of the last run (its CPU at 1.0)")


def run_burst(rep: TaskReport, seed: int, p: TaskParams, hot: int, burst: list[tuple[int, int, int]], *,
              steal: bool, burner: bool = False) -> TaskSim:
    """Submit the whole burst at once; the run ends when every task is done (then checked)."""
    settings = TaskSettings(steal=steal, overload=0.8 if burner else 2.0)  # above 1.0: never overloaded
    sim = rep.sim = TaskSim(seed, p.nodes, settings=settings, caps=lambda i: STEAL_CAPS + (("zone=a",) if i == hot else ()))
    sim.watch = set(rep.watch)
    sim.nodes[f"n{hot:03d}"].burner = 1.0 if burner else 0.0
    sim.run_for(1000)
    sim.start_ms = sim.now
    for ms, prio, origin in burst:
        sim.submit(f"n{origin:03d}", args={"ms": ms}, caps=BURST_CAPS, strategy="capability", priority=prio)
    if check_finished(sim, rep):
        check_done(sim, rep, sim.accepted)
    check_capable(sim, rep)
    check_sim(sim, rep)
    return sim


def makespan(sim: TaskSim) -> int:
    return max((r.end for _, r in sim.runs), default=sim.start_ms) - sim.start_ms


def check_migration(sim: TaskSim, rep: TaskReport, hot: str) -> None:
    """Queued work leaves the burning node, and moved work does not wander or come back."""
    migrated = sum(e.what == "migrated" for t in sim.accepted if (r := sim.record(t)) for e in r.history)
    rep.metrics["migrated_events"] = migrated
    if not migrated:
        rep.violations.append(f"balancing: nothing migrated off {hot} at load 1.0")
    stay = sim.s.min_stay_ms
    bad = []
    for tid, moves in sim.moves.items():
        if len(moves) > MAX_MOVES:
            bad.append(f"{tid} moved {len(moves)} times")
        if any(m.to == hot for m in moves):
            bad.append(f"{tid} moved back to {hot}")
        if any(b.at - a.at < stay for a, b in zip(moves, moves[1:])):
            bad.append(f"{tid} moved twice within {stay} ms: {[(m.at, m.frm, m.to) for m in moves]}")
    rep.fail("balancing: moved work wanders", bad)


def ring(p: TaskParams, rngs: dict[str, random.Random], rep: TaskReport) -> None:
    """One member leaves, then one joins: in the engine's own home() of real
    task ids, about 1/N of the tasks change their first home member and only
    towards or away from the member that changed (the rest keep their home
    members); the records of tasks run before are handed to the new home
    members, one result everywhere."""
    work, faults = rngs["work"], rngs["faults"]
    sim = new_sim(rep, rngs, p.nodes)
    sim.run_for(1000)
    for _ in range(200):
        sim.submit(work.choice(sorted(sim.nodes)), args={"ms": duration(work, 1000)}, strategy=p.strategy or work.choice(STRATEGIES))
    check_finished(sim, rep)
    observer, victim = faults.sample(sorted(sim.nodes), 2)
    eng = sim.nodes[observer].engine
    specs = [TaskSpec(eng.new_task_id(), "work", strategy=STRATEGIES[i % 3]) for i in range(p.tasks)]
    before = [eng.home(s) for s in specs]
    sim.crash(victim)
    sim.run_for(sim.detect_ms + 100)
    rep.events.append(f"t={sim.now} {victim} left")
    after = [eng.home(s) for s in specs]
    check_moves(rep, "leave", before, after, victim, p.nodes)
    joined = sim.add_node()
    sim.run_for(200)
    rep.events.append(f"t={sim.now} {joined} joined")
    check_moves(rep, "join", after, [eng.home(s) for s in specs], joined, p.nodes)
    check_settled(sim, rep, list(sim.accepted))
    check_sim(sim, rep)


def check_moves(rep: TaskReport, what: str, before: list[list[str]], after: list[list[str]], changed: str, n: int) -> None:
    """About 1/n of the first home members move, all of them from or to `changed`;
    a home set changes only by `changed` leaving or entering it."""
    moved = [i for i, (b, a) in enumerate(zip(before, after)) if b[0] != a[0]]
    share = len(moved) / len(before)
    rep.metrics[f"{what}_moved_share_x_n"] = share * n
    if not 1 / (3 * n) <= share <= 3 / n:
        rep.violations.append(f"ring {what}: {share:.4f} of the tasks changed coordinator, expected about 1/{n} = {1 / n:.4f}")
    rep.fail(f"ring {what}: a home set changed other than by {changed} leaving or entering it",
             [f"{b} -> {a}" for b, a in zip(before, after)
              if b != a and (changed not in set(b) ^ set(a) or len(set(b) ^ set(a)) != 2)])
    rep.fail(f"ring {what}: a coordinator moved though {changed} was not involved",
             [f"{before[i]} -> {after[i]}" for i in moved if changed not in (before[i][0], after[i][0])])


SCENARIOS: dict[str, Callable[[TaskParams, dict[str, random.Random], TaskReport], None]] = {
    "steady": steady,
    "crashes": crashes,
    "partition": partition,
    "steal": steal,
    "ring": ring,
}


# ----------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m agent.sim.task_main", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="steady", choices=sorted(SCENARIOS))
    ap.add_argument("--seed", type=int, default=0, help="root seed (decides everything not given)")
    ap.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed on; print failures only")
    ap.add_argument("--nodes", type=int, help="mesh size")
    ap.add_argument("--tasks", type=int, help="tasks submitted")
    ap.add_argument("--strategy", choices=STRATEGIES,
                    help="one strategy for every task (default: drawn per task; scenario steal always uses capability)")
    ap.add_argument("--loss", type=args.probability, help="per-message loss probability")
    ap.add_argument("--faults", type=int, help="nodes crashed (scenario crashes)")
    ap.add_argument("--watch", action="append", default=[], metavar="TASK_ID",
                    help="print every message about this task and its runs (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    a = ap.parse_args(argv)
    if a.list:
        for name, fn in SCENARIOS.items():
            doc = " ".join((fn.__doc__ or "").split())
            print(f"{name:10} {doc.split('. ')[0].rstrip('.')}.")
        return 0
    over = dict(nodes=a.nodes, tasks=a.tasks, strategy=a.strategy, loss=a.loss, faults=a.faults)
    t = time.perf_counter()
    if a.seeds > 1:
        failed = 0
        for seed in range(a.seed, a.seed + a.seeds):
            rep = run_tasks(a.scenario, seed, **over)
            if rep.violations:
                failed += 1
                print(rep.failure(), flush=True)
        print(f"{a.scenario}: {a.seeds} seeds from {a.seed}: {failed} failed; wall time {time.perf_counter() - t:.1f} s")
        return 1 if failed else 0
    rep = run_tasks(a.scenario, a.seed, watch=a.watch, **over)
    wall = time.perf_counter() - t
    for line in rep.sim.trace if rep.sim is not None else ():
        print(line)
    return args.finish(rep, wall)


if __name__ == "__main__":
    args.run(main)
