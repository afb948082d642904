"""The task engine's behaviours, one at a time, on a small simulated mesh
(agent/sim/task_cluster.py: the real engine and codec, virtual time)."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from agent.core.tasks import TaskSettings
from agent.core.taskspec import TaskSpec, task_id_for_key
from agent.sim.task_cluster import TaskSim


def _sim(n=5, seed=1, **settings) -> TaskSim:
    sim = TaskSim(seed, n, settings=TaskSettings(**settings))
    sim.run_for(200)
    return sim


def _settled(sim):
    """Every submission answered, and every accepted task finished."""
    return lambda: not sim.pending_submits and sim.finished()


def _keys_owned_by(sim, node, count):
    """Idempotency keys whose hash-strategy tasks land on `node`: a burst aimed at one node."""
    eng = sim.nodes[node].engine
    keys = (f"k{i}" for i in range(100_000))
    owned = (k for k in keys if eng.home(TaskSpec(task_id_for_key(k), "work", strategy="hash"))[0] == node)
    return [next(owned) for _ in range(count)]


def _burst(sim, node, count, ms):
    return [sim.submit("n000", args={"ms": ms}, key=k, strategy="hash") for k in _keys_owned_by(sim, node, count)]


def _events(sim, tid):
    return [e.what for e in sim.record(tid).history]


def test_a_task_runs_once_and_its_result_is_on_every_home_member():
    sim = _sim()
    tid = sim.submit("n001", args={"ms": 100})
    assert sim.run_until(_settled(sim), 5000)
    rec = sim.record(tid)
    assert rec.state == "done" and rec.result.outcome == "ok" and rec.attempt == 1
    assert len([r for t, r in sim.runs if t == tid]) == 1
    sim.run_for(2000)  # replication settles
    home = sim.nodes["n001"].engine.home(rec.spec)
    assert len(home) == 3
    assert all(sim.nodes[h].engine.records[tid].result == rec.result for h in home)


def test_the_same_idempotency_key_names_one_task_and_one_run():
    sim = _sim()
    a = sim.submit("n001", args={"ms": 50}, key="photo-42")
    sim.run_for(100)
    b = sim.submit("n003", args={"ms": 50}, key="photo-42")
    assert a == b == task_id_for_key("photo-42")
    assert sim.run_until(_settled(sim), 5000)
    assert len([r for t, r in sim.runs if t == a]) == 1


def test_a_dead_executor_s_task_runs_again_elsewhere_with_one_result():
    sim = _sim(n=6)
    tid = sim.submit("n000", args={"ms": 5000})
    sim.run_for(500)
    victim = sim.record(tid).executor
    sim.crash(victim)
    assert sim.run_until(_settled(sim), 30_000)
    rec = sim.record(tid)
    assert rec.state == "done" and rec.attempt == 2 and rec.result.node != victim
    assert "retried" in _events(sim, tid)
    assert not sim.violations and not sim.results_agree()


def test_cancel_kills_the_run_and_the_cancel_is_the_result():
    from agent.core.taskspec import Cancel

    sim = _sim()
    tid = sim.submit("n000", args={"ms": 60_000})
    sim.run_for(500)
    executor = sim.record(tid).executor
    assert tid in sim.nodes[executor].runs
    coord = sim.nodes["n000"].engine.home(sim.record(tid).spec)[0]
    sim._deliver_or_send("n000", coord, Cancel(7, tid))
    sim.run_for(500)
    rec = sim.record(tid)
    assert rec.state == "cancelled" and rec.result.outcome == "cancelled"
    assert tid not in sim.nodes[executor].runs  # killed, not left running


def test_a_restarted_node_runs_its_journaled_queue():
    sim = _sim(n=4, slots=1, steal=False, overload=1.0)
    ids = _burst(sim, "n002", 5, 300)
    sim.run_for(200)
    assert sim.nodes["n002"].engine.queued_count() >= 3
    sim.crash("n002")
    sim.run_for(500)  # back before the others notice it was gone
    sim.restart("n002")
    assert sim.run_until(_settled(sim), 20_000)
    ran_on = Counter(r.node for t, r in sim.runs if t in ids)
    assert ran_on["n002"] >= 4, ran_on
    assert not sim.violations


def test_idle_nodes_steal_queued_work_and_nothing_runs_twice():
    def makespan(steal: bool) -> tuple[int, Counter]:
        sim = _sim(n=5, slots=1, steal=steal, overload=1.0)  # stealing alone, no migration
        start = sim.now
        ids = _burst(sim, "n002", 20, 400)
        assert sim.run_until(_settled(sim), 60_000)
        assert not sim.violations
        return sim.now - start, Counter(r.node for t, r in sim.runs if t in ids)

    with_steal, spread = makespan(True)
    without, alone = makespan(False)
    assert set(alone) == {"n002"}
    assert len(spread) == 5 and with_steal < without / 2, (with_steal, without, spread)


def test_an_overloaded_node_migrates_its_queue_and_tasks_do_not_bounce():
    sim = _sim(n=4, slots=1, steal=False, min_stay_ms=10_000)
    sim.nodes["n002"].burner = 1.0  # a CPU hog on n002, which gets the whole burst
    ids = _burst(sim, "n002", 12, 500)
    assert sim.run_until(_settled(sim), 60_000)
    moves = Counter(e.what for t in ids for e in sim.record(t).history)
    assert moves["migrated"] >= 3, moves
    per_task = [sum(e.what == "migrated" for e in sim.record(t).history) for t in ids]
    assert max(per_task) == 1  # min_stay_ms: a moved task stays put
    assert not sim.violations


def test_auction_gives_the_task_to_the_idle_bidder():
    sim = _sim(n=5, strategy="auction")
    for name in ("n000", "n001", "n002", "n004"):
        sim.nodes[name].burner = 0.9
    sim.run_for(100)
    tid = sim.submit("n000", args={"ms": 10})
    assert sim.run_until(_settled(sim), 5000)
    rec = sim.record(tid)
    assert rec.executor == "n003" and "bid" in _events(sim, tid)


def test_hash_placement_runs_on_the_ring_owner_of_capable_members():
    sim = _sim(n=8, strategy="hash")
    ids = [sim.submit("n000", args={"ms": 10}) for _ in range(30)]
    assert sim.run_until(_settled(sim), 10_000)
    eng = sim.nodes["n000"].engine
    for tid in ids:
        rec = sim.record(tid)
        assert rec.executor == eng.home(rec.spec)[0]


def test_a_task_nobody_can_run_is_refused_with_the_reason():
    sim = _sim()
    tid = sim.submit("n000", args={}, caps=("camera",))
    sim.run_for(500)
    assert tid not in sim.accepted and "camera" in sim.refused[tid]


def test_a_partial_capability_match_above_the_threshold_places_the_task():
    sim = TaskSim(3, 4, caps=lambda i: ("camera", "arch=arm64", "ram_mb=2048") if i == 2 else ("arch=arm64",))
    sim.run_for(200)
    ok = sim.submit("n000", args={"ms": 10}, caps=("camera", "arch=arm64", "ram_mb>=1024"))
    low = sim.submit("n000", args={"ms": 10}, caps=("camera", "gpu", "ram_mb>=4096"))
    assert sim.run_until(_settled(sim), 5000)
    assert sim.record(ok).executor == "n002"
    assert low in sim.refused and "best match 0.33" in sim.refused[low]


def test_a_duplicated_or_stale_assignment_starts_no_second_run():
    from agent.core.taskspec import Assign

    sim = _sim(n=5)
    tid = sim.submit("n000", args={"ms": 3000})
    sim.run_for(300)
    rec = sim.record(tid)
    coord = sim.nodes["n000"].engine.home(rec.spec)[0]
    sim._deliver_or_send(coord, rec.executor, Assign(replace(rec.spec), 1, "placed"))  # a UDP duplicate
    other = next(n for n in sim.nodes if n != rec.executor)
    sim._deliver_or_send(coord, other, Assign(replace(rec.spec), 0, "placed"))  # no attempt 0 exists
    assert sim.run_until(_settled(sim), 10_000)
    assert [r.node for t, r in sim.runs if t == tid] == [rec.executor]
    assert not sim.violations and sim.record(tid).attempt == 1


def test_a_steal_whose_news_went_to_a_dead_coordinator_is_still_recorded():
    """Engines driven by hand: coordinator a dies unnoticed, c steals a queued task from b
    (its Update goes to the dead a), then d takes over: the record must name c, not b."""
    import random

    from agent.core.tasks import MemberInfo, Start, TaskEngine
    from agent.core.taskspec import Result, Submit, check_spec

    names, kinds = ["a", "b", "c", "d"], {"echo": 64, "sleep": 64, "sysinfo": 64}
    caps = {"a": (), "b": ("x",), "c": ("x",), "d": ()}
    eng = {n: TaskEngine(n, TaskSettings(slots=1, steal_interval_ms=100), random.Random(i), kinds, caps[n]) for i, n in enumerate(names)}
    crashed, detected, load, now = set(), set(), dict.fromkeys(names, 0.0), [0]

    def pump():
        for _ in range(50):
            moved = False
            for n in (n for n in names if n not in crashed):
                eng[n].take_journal()
                [a for a in eng[n].take_actions() if isinstance(a, Start)]
                for to, msg in eng[n].take_outbox():
                    moved = True
                    if to not in crashed:
                        eng[to].set_time(now[0], now[0])
                        eng[to].step(n, msg)
            if not moved:
                return

    def tick():
        now[0] += 50
        for n in (n for n in names if n not in crashed):
            eng[n].set_time(now[0], now[0])
            eng[n].set_view({m: MemberInfo(m, caps[m], frozenset(kinds), load[m], eng[m].queued_count()) for m in names if m not in detected})
            eng[n].set_load(load[n], 10.0)
            eng[n].tick()
        pump()

    def spec(i):
        return check_spec(TaskSpec(f"{i:016x}", "sleep", {"seconds": 10}, caps=("x",), strategy="capability", origin="a"))

    tick()
    blocker, victim = [s for s in map(spec, range(1, 10_000)) if eng["a"].home(s)[:2] == ["a", "d"]][:2]
    load["c"] = 1.0  # c looks busy: a places both tasks on b
    for s in (blocker, victim):
        eng["a"].step("a", Submit(1, s))
        pump()
        tick()
    crashed.add("a")
    load["c"] = 0.0  # c turns idle and steals the queued one from b
    for _ in range(20):
        tick()
    detected.add("a")
    tick()
    eng["c"].finished(victim.id, 1, Result("ok", 0, "c", 1, now[0], now[0] + 5))
    pump()
    rec = eng["d"].records[victim.id]
    assert rec.state == "done" and rec.result.node == "c" and rec.executor == "c"
