"""The task engine on a simulated mesh: the scenarios of agent/sim/task_main.py
run on agent/sim/task_cluster.py (the real engine and codec, virtual time).

Every run is a function of its seed (also across processes: see
test_a_seed_replays_in_another_process); a failure prints ``seed=N`` and the command that
replays it, e.g. ``python -m agent.sim.task_main --scenario crashes --seed 12
--nodes 41 --tasks 263 --loss 0.122 --faults 4`` (add ``--watch TASK_ID`` to
print every message about one task). MESHAGENT_SIM_SCALE=10 runs ten times as
many seeds in the slow tests.

What the scenarios check (see each scenario's docstring):
  steady     100-300 nodes, 1000-3000 mixed tasks over the three strategies, random
             capabilities: every satisfiable task accepted and done exactly once, the
             unsatisfiable refused with the reason, each run on a capable member, hash
             tasks on their ring owner, no concurrent runs, one result on every home member
  crashes    20-60 nodes, 5-20% loss, 1-5 crashes (some restart with their journal):
             every accepted task done within 60 s of the last fault, never two runs at
             once, one result that every home member holds after the loss heals (a task
             whose R home members all crashed within seconds of each other is counted as
             lost beyond the fault model: unfinished records live in memory only)
  partition  a split then a heal: each side accepts and runs its own tasks (hash tasks
             on the side's owner); after the heal one result everywhere (concurrent
             runs across the cut are allowed and only counted)
  steal      a burst on one node: stealing at least halves the makespan; a node at CPU
             1.0 migrates its queue away, tasks neither bounce back nor move twice
             within min_stay_ms
  ring       one member leaves, one joins: about 1/N of the coordinators change, only
             to or from that member, and records follow their home members
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from agent.core import coordinator as coordinator_mod
from agent.core import executor as executor_mod
from agent.core.tasks import TaskSettings
from agent.core.taskspec import Assign, Replicate, Revoke, StealRequest, TaskSpec, task_id_for_key
from agent.sim.task_cluster import TaskSim
from agent.sim.task_main import (
    BURST_CAPS, STEAL_CAPS, TaskParams, TaskReport, check_finished, describe, expect, main, replay_on_failure,
    run_tasks,
)

SCALE = float(os.environ.get("MESHAGENT_SIM_SCALE", "1"))


def seeds(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + max(1, int(n * SCALE))))


def scripted(test: str, seed: int) -> str:
    """The failure note of a scripted (not drawn) run: it replays by running the test again."""
    return f"scripted run, TaskSim seed={seed}; replay: pytest -q tests/test_sim_tasks.py::{test}"


# ----------------------------------------------------------------- the scenarios, fast tier


def test_steady_200_nodes_2000_tasks():
    """The one big run of the fast tier: 200 nodes, 2000 tasks, all strategies mixed.
    Without faults every accepted task runs exactly once. About 11 s."""
    rep = run_tasks("steady", 1, nodes=200, tasks=2000)
    expect(rep)
    with replay_on_failure(rep):
        m = rep.metrics
        assert m["accepted"] >= 1800 and m["extra_runs"] == 0 and m["overlaps"] == 0
        assert m["unsatisfiable"] > 0 and m["refused"] == m["unsatisfiable"]
        assert m["moved_tasks"] > 0  # idle nodes stole some queued work


@pytest.mark.parametrize("seed", seeds(2, base=100))
def test_steady_small(seed):
    expect(run_tasks("steady", seed, nodes=40, tasks=400))


@pytest.mark.parametrize("strategy", ["capability", "auction", "hash"])
def test_steady_one_strategy(strategy):
    """Every task with the same strategy (the client itself refuses a hash task
    no member can run: it finds no home to send it to)."""
    expect(run_tasks("steady", 7, nodes=30, tasks=200, strategy=strategy))


@pytest.mark.parametrize("seed", seeds(4))
def test_crashes(seed):
    rep = run_tasks("crashes", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert any("crash" in e for e in rep.events) and rep.metrics["overlaps"] == 0


@pytest.mark.parametrize("seed", [*seeds(2, base=3), 2])  # seed 2 once kept a stale result after the heal
def test_partition(seed):
    rep = run_tasks("partition", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert any("split" in e for e in rep.events) and rep.metrics["accepted"] > 100


@pytest.mark.parametrize("seed", seeds(3))
def test_steal_and_migrate(seed):
    rep = run_tasks("steal", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["makespan_ratio"] <= 0.5 and rep.metrics["migrated_events"] > 0


@pytest.mark.parametrize("seed", seeds(3))
def test_ring_movement(seed):
    rep = run_tasks("ring", seed)
    expect(rep)
    with replay_on_failure(rep):
        for what in ("leave", "join"):
            assert 0.33 <= rep.metrics[f"{what}_moved_share_x_n"] <= 3


# ----------------------------------------------------------------- slow tier


@pytest.mark.slow
@pytest.mark.parametrize("scenario, n", [
    ("crashes", 5),
    ("partition", 4),
    ("steal", 3),
    ("ring", 3),
])
def test_many_seeds(scenario, n):
    failures = [rep.failure() for seed in seeds(n, base=1000) if (rep := run_tasks(scenario, seed)).violations]
    assert not failures, f"{len(failures)} of {len(seeds(n))} seeds failed:\n\n" + "\n\n".join(failures[:3])


# ----------------------------------------------------------------- engine bugs the simulator found (fixed): scripted regressions


def test_refusal_reason_fits_the_reply():
    """A task nobody can run is refused with the reason, and the reason fits the
    reply (once it did not for four unmatched capabilities: the reply failed to decode)."""
    sim = TaskSim(1, 3)
    sim.run_for(200)
    tid = sim.submit("n000", caps=("camera", "ram_mb>=8192", "arch=mips", "gpu"))
    sim.run_for(5000)
    note = scripted("test_refusal_reason_fits_the_reply", 1)
    assert not sim.violations, f"{sim.violations[0].what}\n{note}"
    assert "no alive member" in sim.refused[tid], note


def test_restarted_member_gets_its_records_back():
    """n003 restarts after the others noticed it was gone: every record it keeps
    as a home member is back on it (from its journal or from the others)."""
    sim = TaskSim(1, 6)
    sim.run_for(500)
    ids = [sim.submit("n000", args={"ms": 50}) for _ in range(30)]
    assert sim.run_until(sim.finished, 10_000)
    sim.run_for(3000)
    assert not sim.unsettled(ids, "n000")
    sim.crash("n003")
    sim.run_for(sim.detect_ms + 2000)
    sim.restart("n003")
    sim.run_for(20_000)
    bad = sim.unsettled(ids, "n000")
    assert not bad, f"{bad[:3]}\n{scripted('test_restarted_member_gets_its_records_back', 1)}"


def test_accepted_task_survives_one_crash():
    """home[0] is dead but not yet detected: the origin's retry goes to home[1],
    which must not answer before a second home member keeps the record (once it
    did, and its own crash then lost an accepted task)."""
    sim = TaskSim(5, 8)
    sim.run_for(500)
    eng = sim.nodes["n000"].engine
    key = next(k for k in (f"k{i}" for i in range(100))
               if "n000" not in eng.home(TaskSpec(task_id_for_key(k), "work", strategy="capability"))[:2])
    h0, h1 = eng.home(TaskSpec(task_id_for_key(key), "work", strategy="capability"))[:2]
    sim.crash(h0)
    tid = sim.submit("n000", args={"ms": 100}, key=key)
    assert sim.run_until(lambda: tid in sim.accepted, 2500)
    assert sim.now < sim.detect_ms + 1000  # nobody has noticed h0 yet
    sim.crash(h1)
    assert sim.run_until(sim.finished, 30_000), f"{describe(sim, tid)}\n{scripted('test_accepted_task_survives_one_crash', 5)}"


def test_a_restored_task_is_not_stolen_before_its_coordinator_answers():
    """n002 (the only node with zone=a) holds three queued tasks and crashes; they
    are retried elsewhere. It restarts with its journal, and a steal request
    reaches it before the coordinator's revoke does: the restored tasks must not
    move (once a thief ran attempt 1 while attempt 2 ran)."""
    sim = TaskSim(1, 5, settings=TaskSettings(slots=1, steal=False, overload=2.0),
                  caps=lambda i: STEAL_CAPS + (("zone=a",) if i == 2 else ()))
    sim.run_for(1100)
    ids = [sim.submit("n000", args={"ms": 20_000}, caps=BURST_CAPS) for _ in range(3)]
    sim.run_for(500)
    assert {sim.record(t).executor for t in ids} == {"n002"}
    sim.crash("n002")
    sim.run_for(sim.detect_ms + 3000)
    assert all(sim.record(t).attempt == 2 for t in ids)
    sim.restart("n002")
    sim.step()
    sim._deliver_or_send("n004", "n002", StealRequest(4, ("work",)))
    sim.run_for(1000)
    assert not sim.violations, f"{sim.violations[0].what}\n{scripted('test_a_restored_task_is_not_stolen_before_its_coordinator_answers', 1)}"


def test_a_lost_assign_does_not_fail_a_task(monkeypatch):
    """The first Assign of a task allowed one attempt is lost in the network: the
    attempt never started, so it must not use up the task (once it failed it)."""
    sim = TaskSim(3, 5)
    sim.run_for(500)
    lost = []
    send = sim._deliver_or_send

    def lossy(src, dst, msg):
        if isinstance(msg, Assign) and not lost:
            lost.append(dst)
            return
        send(src, dst, msg)

    monkeypatch.setattr(sim, "_deliver_or_send", lossy)
    tid = sim.submit("n001", args={"ms": 100}, max_attempts=1)
    assert sim.run_until(sim.finished, 30_000)
    assert sim.record(tid).state == "done", f"{describe(sim, tid)}\n{scripted('test_a_lost_assign_does_not_fail_a_task', 3)}"


def _split_with_results_on_both_sides() -> tuple[TaskSim, str]:
    """The executor and home[1] on one side, home[0] and home[2] on the other;
    each side records a result (attempts 1 and 2), then the mesh heals."""
    sim, tid, _ = _split_until_the_heal()
    sim.heal()
    sim.run_for(20_000)
    return sim, tid


def _split_until_the_heal() -> tuple[TaskSim, str, list[str]]:
    """The split of _split_with_results_on_both_sides, up to the heal; also the task's home members."""
    zone = 5
    sim = TaskSim(2, 8, caps=lambda i: STEAL_CAPS + (("zone=a",) if i == zone else ()))
    sim.overlap_ok = True
    sim.run_for(500)
    x = f"n{zone:03d}"
    eng = sim.nodes["n000"].engine
    key = next(k for k in (f"k{i}" for i in range(200))
               if x not in (h := eng.home(TaskSpec(task_id_for_key(k), "work", strategy="capability"))) and "n000" not in h)
    home = eng.home(TaskSpec(task_id_for_key(key), "work", strategy="capability"))
    tid = sim.submit("n000", args={"ms": 6000}, caps=BURST_CAPS, key=key)  # only x matches all four
    assert sim.run_until(lambda: (r := sim.record(tid)) is not None and r.state == "running", 3000)
    assert sim.record(tid).executor == x
    sim.partition([x, home[1]], [n for n in sim.nodes if n not in (x, home[1])])
    sim.run_for(20_000)
    return sim, tid, home


def test_one_result_on_the_home_members_after_a_split():
    """After the heal every home member keeps attempt 1's result (newer() prefers
    the lower attempt; once that record kept its lower version, was never pushed to
    a member that had acknowledged the higher one, and the members disagreed)."""
    sim, tid = _split_with_results_on_both_sides()
    bad = sim.unsettled([tid], "n000")
    assert not bad, f"{bad}\n{scripted('test_one_result_on_the_home_members_after_a_split', 2)}"


def test_a_former_home_member_does_not_keep_the_other_result():
    """A member that was a home member only during the split must not keep the
    losing result (once it did for good, and answered a Query with it)."""
    sim, _ = _split_with_results_on_both_sides()
    bad = sim.results_agree()
    assert not bad, f"{[describe(sim, t) for t in bad]}\n{scripted('test_a_former_home_member_does_not_keep_the_other_result', 2)}"


def test_one_attempt_is_placed_once_around_a_coordinator_restart(monkeypatch):
    """home[0] (n004) places the task, its Assign is lost, and it crashes; it
    restarts just as the others declare it dead. n005 took over meanwhile: both
    must not place attempt 2."""
    sim = TaskSim(2, 6)
    sim.run_for(500)
    eng = sim.nodes["n000"].engine
    key = next(k for k in (f"k{i}" for i in range(100))
               if eng.home(TaskSpec(task_id_for_key(k), "work", strategy="capability"))[0] != "n000")
    h0 = eng.home(TaskSpec(task_id_for_key(key), "work", strategy="capability"))[0]
    send = sim._deliver_or_send
    monkeypatch.setattr(sim, "_deliver_or_send", lambda s, d, m: None if isinstance(m, Assign) else send(s, d, m))
    tid = sim.submit("n000", args={"ms": 100}, key=key)
    sim.run_for(300)
    monkeypatch.setattr(sim, "_deliver_or_send", send)
    sim.crash(h0)
    sim.run_for(sim.detect_ms)
    sim.restart(h0)
    assert sim.run_until(sim.finished, 30_000), describe(sim, tid)
    assert not sim.violations, f"{sim.violations[0].what}\n{scripted('test_one_attempt_is_placed_once_around_a_coordinator_restart', 2)}"


def test_a_restored_task_waits_for_its_coordinator(monkeypatch):
    """As in the test above it, but no steal: the coordinator's Revokes to the
    restarted n002 are lost. n002 must not run the old attempt when its hold runs out."""
    sim = TaskSim(1, 5, settings=TaskSettings(slots=1, steal=False, overload=2.0),
                  caps=lambda i: STEAL_CAPS + (("zone=a",) if i == 2 else ()))
    sim.run_for(1100)
    [sim.submit("n000", args={"ms": 20_000}, caps=BURST_CAPS) for _ in range(3)]
    sim.run_for(500)
    sim.crash("n002")
    sim.run_for(sim.detect_ms + 3000)
    send = sim._deliver_or_send
    monkeypatch.setattr(sim, "_deliver_or_send", lambda s, d, m: None if isinstance(m, Revoke) and d == "n002" else send(s, d, m))
    sim.restart("n002")
    sim.run_for(15_000)
    assert not sim.violations, f"{sim.violations[0].what}\n{scripted('test_a_restored_task_waits_for_its_coordinator', 1)}"


def test_a_former_home_member_converges_though_the_correction_is_lost(monkeypatch):
    """As above, but the Replicates that would correct the former home members
    are lost for the first 3 s after the heal: they must still end up with the
    winning result (or forget theirs)."""
    sim, tid, home = _split_until_the_heal()
    stale = [n for n in sim.up() if tid in sim.nodes[n].engine.records and n not in home]
    send, until = sim._deliver_or_send, sim.now + 3000

    def lossy(src, dst, msg):
        if not (sim.now < until and dst in stale and isinstance(msg, Replicate)):
            send(src, dst, msg)

    monkeypatch.setattr(sim, "_deliver_or_send", lossy)
    sim.heal()
    sim.run_for(20_000)
    bad = sim.results_agree()
    assert not bad, f"{[describe(sim, t) for t in bad]} (former home members {stale})\n" + scripted(
        "test_a_former_home_member_converges_though_the_correction_is_lost", 2)


def test_a_seed_replays_in_another_process():
    """The same run in two interpreters with different PYTHONHASHSEED."""
    rep = run_tasks("crashes", 3, nodes=20, tasks=150, loss=0.1, faults=2)
    digests = set()
    for hash_seed in ("0", "4242"):
        out = subprocess.run([sys.executable, "-m", "agent.sim.task_main", *rep.replay().split()[3:]], capture_output=True,
                             text=True, env={**os.environ, "PYTHONHASHSEED": hash_seed}, timeout=120)
        m = re.search(r"trace digest ([0-9a-f]+)", out.stdout)
        assert m, out.stdout + out.stderr
        digests.add(m.group(1))
    assert len(digests) == 1, f"digests {sorted(digests)} for PYTHONHASHSEED 0 and 4242\nreplay: {rep.replay()}"


# ----------------------------------------------------------------- the checks catch planted bugs


def _run_until_caught(scenario: str, n: int, property_: str, **over) -> TaskReport:
    for seed in range(n):
        rep = run_tasks(scenario, seed, **over)
        if any(property_ in v for v in rep.violations):
            return rep
    raise AssertionError(f"planted bug not caught in {n} seeds of {scenario}")


def test_catches_a_handoff_that_keeps_the_task_queued(monkeypatch):
    """The victim of a steal forgets to remove the task from its queue: both run it."""
    monkeypatch.setattr(executor_mod.Executor, "_dequeue", lambda self, tid: self.queue[tid])
    rep = _run_until_caught("steal", 3, "while running on", nodes=8, tasks=60)
    assert f"seed={rep.params.seed}" in rep.failure() and "replay: python -m agent.sim.task_main --scenario steal" in rep.failure()


def test_catches_placement_that_ignores_capabilities(monkeypatch):
    orig = coordinator_mod.Coordinator._choose

    def choose(self, rec, strategy):
        return sorted(self.ctx.view)[0] if strategy == "capability" and rec.spec.caps else orig(self, rec, strategy)

    monkeypatch.setattr(coordinator_mod.Coordinator, "_choose", choose)
    _run_until_caught("steady", 3, "cannot run it", nodes=30, tasks=150)


def test_catches_hash_placement_off_the_owner(monkeypatch):
    orig = coordinator_mod.Coordinator._choose

    def choose(self, rec, strategy):
        home = self.ctx.home(rec.spec)
        return home[-1] if strategy == "hash" and len(home) > 1 else orig(self, rec, strategy)

    monkeypatch.setattr(coordinator_mod.Coordinator, "_choose", choose)
    _run_until_caught("steady", 3, "not on its ring owner", nodes=30, tasks=150, strategy="hash")


def test_catches_modulo_placement_that_moves_most_tasks(monkeypatch):
    """Home by task hash modulo the member count instead of the ring: one leave moves nearly every task."""
    from agent.core import taskctx

    def home(self, spec):
        members = sorted(self.view)
        i = int(spec.id, 16) % len(members)
        return [members[(i + k) % len(members)] for k in range(min(self.s.replicas, len(members)))]

    monkeypatch.setattr(taskctx.Ctx, "home", home)
    rep = _run_until_caught("ring", 2, "changed coordinator", nodes=20, tasks=1000)
    assert "ring leave" in rep.failure() and "seed=" in rep.failure()


def test_liveness_failure_names_the_task_and_the_replay_command():
    sim = TaskSim(1, 4)
    sim.run_for(200)
    tid = sim.submit("n000", args={"ms": 60_000})
    rep = TaskReport(TaskParams("steady", 9, 4, 1, None, 0.0, 0), sim=sim)
    assert not check_finished(sim, rep, 5000)
    assert "liveness" in rep.violations[0] and f"{tid} (capability) running attempt 1" in rep.violations[0]
    with pytest.raises(AssertionError, match=r"seed=9[\s\S]*replay: python -m agent\.sim\.task_main --scenario steady --seed 9"):
        expect(rep)


# ----------------------------------------------------------------- the simulator and its runner


def test_same_seed_same_run_in_one_process():
    a = run_tasks("crashes", 5, nodes=20, tasks=120)
    b = run_tasks("crashes", 5, nodes=20, tasks=120)
    c = run_tasks("crashes", 6, nodes=20, tasks=120)
    assert a.digest == b.digest and a.metrics == b.metrics and a.events == b.events
    assert c.digest != a.digest


def test_replay_command_reproduces_the_run(capsys):
    rep = run_tasks("steal", 2, nodes=8, tasks=40)
    cmd = rep.replay()
    assert cmd.startswith("python -m agent.sim.task_main --scenario steal --seed 2 --nodes 8 --tasks 40 ")
    assert main(cmd.split()[3:]) == (1 if rep.violations else 0)
    assert f"trace digest {rep.digest}" in capsys.readouterr().out


def test_cli_many_seeds_list_and_watch(capsys):
    assert main(["--scenario", "ring", "--seed", "0", "--seeds", "2", "--nodes", "12", "--tasks", "500"]) == 0
    assert "ring: 2 seeds from 0: 0 failed" in capsys.readouterr().out
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("steady", "crashes", "partition", "steal", "ring"))
    rep = run_tasks("ring", 0, nodes=12, tasks=500)
    tid = next(iter(rep.sim.accepted))
    main(["--scenario", "ring", "--seed", "0", "--nodes", "12", "--tasks", "500", "--watch", tid])
    assert re.search(rf"Submit\(rid=\d+, spec=TaskSpec\(id='{tid}'", capsys.readouterr().out)


def test_failure_message_names_seed_and_replay_command():
    rep = TaskReport(TaskParams("crashes", 1234, nodes=30, tasks=300, strategy=None, loss=0.1, faults=2))
    rep.fail("accepted task not done", ["a", "b", "c", "d"])
    with pytest.raises(AssertionError) as e:
        expect(rep)
    msg = str(e.value)
    assert "4 case(s): a; b; c" in msg and "seed=1234" in msg
    assert "replay: python -m agent.sim.task_main --scenario crashes --seed 1234 --nodes 30 --tasks 300 --loss 0.1 --faults 2" in msg


def test_loopback_is_not_lost_and_a_restart_drops_it():
    """Messages a node sends itself never cross the (lossy) network: a lone node
    with every datagram lost still takes, places and runs a task; a restart
    forgets what the previous life sent itself."""
    sim = TaskSim(1, 1, loss=1.0)
    sim.run_for(100)
    tid = sim.submit("n000", args={"ms": 100})
    sim.run_for(1000)
    assert tid in sim.accepted and [r.node for t, r in sim.runs if t == tid] == ["n000"]
    assert sim.record(tid).state == "done" and sim.net.stats.sent == 0
    sim.loopback.append(("n000", sim.nodes["n000"].boot, b"\xa0"))  # junk: would not decode
    sim.crash("n000")
    sim.restart("n000")
    sim.step()
    assert not sim.violations
