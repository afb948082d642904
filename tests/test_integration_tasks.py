"""Tasks across a mesh with real `meshagent run` processes, one per network namespace
(tests/netns.py for the lab, tests/task_lab.py for its task config and API calls).

One scenario, in a lab of 5 agents joined through seeds, consensus off, each with
`load.cpu_scope = "tree"` (the agents share this host: a node's load is the CPU of its
own process tree, measured by psutil; nothing is faked), tasks.slots = 2 and a `burn`
handler (a real busy loop); only node X offers the capability `burner`:

  1 X is made busy for real: two `burn` tasks requiring `burner` can only run there, fill
    both its slots and push its tree CPU past tasks.overload (0.8), as X's /status and
    the others' gossip about X both show.
  2 200 `sleep` tasks of mixed durations (seeded: 0.05-0.6 s, and six of 1.5 s) are
    submitted through all five nodes: 70% with the default capability strategy, 20%
    auction, 10% hash. The work must shift away from X: X runs less than half as many of
    them as the mean of the other nodes, and the histories show tasks stolen or migrated
    off their first executor.
  3 A non-X node is SIGKILLed mid-run while it holds queued or running tasks. Every one of
    the 200 tasks still ends "done" with exactly one recorded result whose attempt and node
    match its history, read back through a survivor; the tasks the dead node held show
    "retried" and finished in a later attempt elsewhere; and each record names as its
    executor the node whose result it holds (checked last: see the comment there).

Submissions carry idempotency keys, and one left unanswered (a datagram lost at a full
socket buffer: the count is printed) is made again, as a client should.

Needs root and iproute2; with CI set the preconditions FAIL, elsewhere they skip. Timing
budget (2 cores): about 20 s. Figures (X's share, moves, retries, the time to finish
after the kill) are printed (-s) and recorded as junit properties.
"""

from __future__ import annotations

import collections
import random
import time

import pytest

import netns
from task_lab import TaskLab

pytestmark = pytest.mark.netns

N = 5
X = 0  #: the busy node: the only one offering `burner`
KILLED = 3  #: a non-X node SIGKILLed mid-run (not a seed: seeds are 0 and 1)
BURN_S = 60  #: the burners outlast the scenario; they are cancelled at its end
TASKS = 200
START_BOUND_S = 30.0
OVERLOAD_BOUND_S = 20.0  #: X's load past 80% (500 ms samples, EWMA 0.3: about 3 s unhindered)
FINISH_BOUND_S = 60.0  #: all 200 done after the kill (work ~70 s over 6 slots, plus detection)
SEED = 4


@pytest.fixture(scope="module", autouse=True)
def lab_environment():
    netns.require_lab(pytest)
    netns.install_sigterm_cleanup()
    yield
    netns.sweep()  # this run's leftovers only (the Lab context manager should have left none)


@pytest.fixture
def lab(tmp_path):
    """A 5-agent TaskLab, agents started (X with --capability burner) and converged; always closed."""
    with TaskLab(N, workdir=tmp_path / "lab") as lab:
        for i in range(N):
            lab.start_agent(i, *(("--capability", "burner") if i == X else ()), seeds=[s for s in (0, 1) if s != i])
        lab.wait_converged(range(N), START_BOUND_S)
        yield lab


# ------------------------------------------------------------------------------ helpers


def workload(rng: random.Random) -> list[tuple[int, dict]]:
    """(submitting node, task.submit fields) for the 200 tasks: see the module doc."""
    calls = []
    for k in range(TASKS):
        seconds = 1.5 if k % 37 == 5 else round(rng.uniform(0.05, 0.6), 2)  # 6 long ones, every strategy
        fields = {"kind": "sleep", "args": {"seconds": f"{seconds:.2f}"}}
        r = k % 10
        if r in (7, 8):
            fields["strategy"] = "auction"
        elif r == 9:
            fields["strategy"] = "hash"
        calls.append((k % N, fields))
    return calls


def submit_all(lab: TaskLab, calls: list[tuple[int, dict]], tag: str) -> list[str]:
    """Every call answered with a task id (lost requests made again under their idempotency key)."""
    got = lab.submit_many(calls, tag)
    bad = [(c, r) for c, r in zip(calls, got) if r["status"] != "ok"]
    assert not bad, (f"{len(bad)} submissions failed, e.g. {bad[:3]}; datagrams dropped at the agents' sockets: "
                     f"{lab.socket_drops(range(N))}\n{lab.diagnose()}")
    return [r["answer"]["id"] for r in got]


def wait_overloaded(lab: TaskLab) -> dict:
    """Until X's own /status and every other node's gossip put X's CPU above 80%."""
    others = [i for i in range(N) if i != X]

    def pred():
        lab.check_running()
        own = lab.cpu([X])[X]
        seen = lab.peer_cpu(others, X)
        running = (lab.task_status([X])[X] or {}).get("running")
        ok = own is not None and own > 80 and all(c is not None and c > 80 for c in seen.values())
        return ok, {"own_cpu": own, "gossiped_cpu": seen, "running_on_x": running}

    took, state = lab.wait_until(pred, OVERLOAD_BOUND_S, 0.5, what=f"node {X}'s CPU above 80% in its status and gossip")
    return {"after_s": round(took, 1), **state}


def wait_all_done(lab: TaskLab, ids: list[str], via: int) -> dict[str, dict]:
    """Until every task is finished (polling only the unfinished ones); their records."""
    recs: dict[str, dict] = {}

    def pred():
        lab.check_running([i for i in range(N) if i != KILLED])
        todo = [t for t in ids if t not in recs]
        for t, rec in lab.records(via, todo).items():
            if rec is not None and rec["state"] in ("done", "failed", "cancelled"):
                recs[t] = rec
        states = collections.Counter(r["state"] for r in recs.values())
        return len(recs) == len(ids), {"finished": dict(states), "unfinished": len(ids) - len(recs)}

    lab.wait_until(pred, FINISH_BOUND_S, 1.0, what="all 200 tasks to finish")
    return recs


def events(rec: dict, what: str) -> list[dict]:
    return [e for e in rec["history"] if e["event"] == what]


def result_problem(rec: dict) -> str:
    """Why a record is not "done with exactly one recorded result, consistent with its
    history", or "". (The executor check is separate: see executor_problem.)"""
    res = rec["result"]
    if rec["state"] != "done" or res is None or res["outcome"] != "ok":
        return f"state {rec['state']}, result {res}"
    if not 1 <= res["attempt"] <= rec["attempt"] <= rec["max_attempts"]:
        return f"result of attempt {res['attempt']}, record at attempt {rec['attempt']} of {rec['max_attempts']}"
    if res["started_ms"] > res["finished_ms"]:
        return f"finished before it started: {res}"
    done = events(rec, "done")
    if len(done) != 1 or done[0]["node"] != res["node"]:
        return f"not exactly one done event, by {res['node']}"
    if events(rec, "duplicate"):
        return "a second result arrived"
    if res["attempt"] < rec["attempt"] and not events(rec, "retried"):
        return f"the result of attempt {res['attempt']} of {rec['attempt']} without a retry"
    return ""


def executor_problem(rec: dict) -> str:
    """The record names the executor of its current attempt: the node whose result it holds."""
    res = rec["result"]
    if res["attempt"] == rec["attempt"] and res["node"] != rec["node"]:
        return f"result from {res['node']} but the record's executor is {rec['node']}"
    return ""


# ------------------------------------------------------------------------------ the scenario


def test_work_moves_off_a_busy_node_and_every_task_survives_a_crash(lab: TaskLab, record_property):
    name = {i: f"n{i}" for i in range(N)}
    burners = submit_all(lab, [(X, {"kind": "burn", "args": {"seconds": BURN_S}, "caps": ["burner"]})] * 2, "burn")
    busy = wait_overloaded(lab)
    print(f"X = n{X} busy: {busy}")

    t_submit = time.monotonic()
    ids = submit_all(lab, workload(random.Random(SEED)), "work")
    submit_s = time.monotonic() - t_submit

    # the victim holds work when it dies (it gets its share within a second or two)
    def holds_work():
        st = lab.task_status([KILLED])[KILLED] or {}
        return st.get("queued", 0) + st.get("running", 0) > 0, st
    lab.wait_until(holds_work, 10, 0.2, what=f"node {KILLED} to hold queued or running tasks")
    time.sleep(1.0)
    local = lab.api(KILLED, {"op": "task.local"})
    assert local["status"] == "ok", local
    held = {t["id"]: t["attempt"] for t in local["answer"]["tasks"] if t["id"] in set(ids)}
    t_kill = time.monotonic()
    lab.kill(KILLED)
    recs = wait_all_done(lab, ids, via=1)
    finish_s = time.monotonic() - t_kill
    cancels = lab.api_many([(X, {"op": "task.cancel", "id": b}) for b in burners])

    ran = collections.Counter(recs[t]["result"]["node"] for t in ids)
    others = [name[i] for i in range(N) if i != X]
    mean_others = sum(ran[n] for n in others) / len(others)
    x_share = ran[name[X]] / mean_others
    moves = collections.Counter(e["event"] for t in ids for e in recs[t]["history"] if e["event"] in ("stolen", "migrated"))
    first_on_x = sum(1 for t in ids if any(e["event"] in ("placed", "bid") and e["node"] == name[X] for e in recs[t]["history"]))
    retried = [t for t in ids if events(recs[t], "retried")]
    bad_results = {t: p for t in ids if (p := result_problem(recs[t]))}
    bad_executor = {t: p for t in ids if t not in bad_results and (p := executor_problem(recs[t]))}
    unresolved = {t: recs[t] for t, attempt in held.items() if not rerun_elsewhere(recs[t], attempt, name[KILLED])}

    figures = {
        "x_busy": busy, "submit_s": round(submit_s, 2), "resubmits": lab.resubmits,
        "socket_drops": lab.socket_drops([i for i in range(N) if i != KILLED]),
        "finished_after_kill_s": round(finish_s, 1), "ran_per_node": dict(sorted(ran.items())),
        "x_share_of_others_mean": round(x_share, 3), "placed_first_on_x": first_on_x, "moves": dict(moves),
        "held_by_killed": len(held), "retried": len(retried),
        "attempts": dict(collections.Counter(recs[t]["result"]["attempt"] for t in ids)),
        "executor_mismatches": len(bad_executor),
    }
    record_property("tasks_mesh", figures)
    print(f"tasks across the mesh: {figures}")

    assert not bad_results, f"{len(bad_results)} tasks without exactly one consistent result, e.g. " + "; ".join(
        f"{t}: {p}: {recs[t]}" for t, p in list(bad_results.items())[:2])
    assert x_share < 0.5, f"X = n{X} ran {ran[name[X]]} tasks, {x_share:.2f} of the others' mean {mean_others:.1f}: {figures}"
    assert moves["stolen"] + moves["migrated"] > 0, f"no task was stolen or migrated: {figures}"
    assert held, f"node {KILLED} held none of the tasks when killed: {local}"
    assert not unresolved, (f"{len(unresolved)} of the {len(held)} tasks held by the killed node were not retried in a later "
                            f"attempt elsewhere, e.g. {list(unresolved.values())[:2]}")
    assert len(retried) >= len(held) // 2, f"only {len(retried)} tasks retried though node {KILLED} held {len(held)}: {figures}"
    assert all(c["status"] == "ok" for c in cancels), f"cancelling the burners: {cancels}"
    # Last, as it is an engine bug still open: a task stolen or migrated while its coordinator
    # was the node being killed (the thief's Update went to the dead node, and Updates are not
    # resent), whose result then reached the next coordinator before its Check asked the old
    # executor, is recorded done with the old executor (and no move in its history).
    assert not bad_executor, f"{len(bad_executor)} done records name another executor than their result's node, e.g. " + "; ".join(
        f"{t}: {p}: history {[(e['event'], e['node'], e['detail']) for e in recs[t]['history']]}"
        for t, p in list(bad_executor.items())[:2])


def rerun_elsewhere(rec: dict, attempt: int, killed: str) -> bool:
    """A task the killed node held at `attempt`: run again in a later attempt on another node
    after a retry, or (in the second before the kill) finished there or taken by a thief."""
    res = rec["result"]
    if res["node"] == killed and res["attempt"] == attempt:
        return True
    if any(e["event"] in ("stolen", "migrated") and e["detail"] == f"from {killed}" for e in rec["history"]):
        return True
    return bool(events(rec, "retried")) and res["attempt"] > attempt and res["node"] != killed
