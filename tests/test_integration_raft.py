"""Raft consensus with real `meshagent run` processes, one per network namespace (see
tests/netns.py for the lab and tests/raft_lab.py for what the consensus tests add to it).

Every scenario runs in its own lab of 5 agents, all five explicit voters, joined through
seeds, and (1-4) a workload client in the hub namespace (tests/helpers/raft_workload.py):
4 concurrent clients doing put / linearizable get / cas (a get, then a cas on the revision
it read) with values unique in the run, on 5 keys, against random nodes. Afterwards the
history is checked with agent/sim/lincheck.py: linearizable, and the answer must be a
definite True (an exhausted search budget fails the test too); the final state is read
with linearizable gets, which join the history; no acknowledged write may be lost, and no
write answered "refused" (exit 3) may ever be seen.

    1 leader SIGKILL under write load: election time, restart, catch-up
    2 split 2|3 (the leader on the 3 side): the majority commits, the minority turns
      read-only and refuses writes (exit 3, "read-only"), stale reads still answer;
      heal; convergence; no write attempted only on the minority side ever appears
    3 split 1|4 isolating the leader: check-quorum step-down, the 4 elect a new leader
    4 power cut: SIGKILL all five mid-write, restart, every acknowledged write present;
      then one follower SIGKILLed and restarted three times under load
    5 a write answered "refused" never takes effect, probed where it could (a leader that
      stops hearing its peers, with the write already handed on: it must end "outcome
      unknown", never "refused")

Needs root and iproute2 (5 also nftables); with CI set the preconditions FAIL, elsewhere
they skip. Timing budget (2 cores): about 1.5 minutes for the module (17-27 s a scenario).
Figures (election time, time for the minority to refuse, workload throughput) are
printed (-s) and recorded as junit properties.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import netns
import raft_lab
from agent.sim import lincheck
from agent.sim.lincheck import Operation
from raft_lab import RaftLab, summarize, to_operations

pytestmark = pytest.mark.netns

N = 5
REQUEST_TIMEOUT_S = 3.0  #: the agents' consensus.request_timeout_ms, below the client's timeout
CLIENT_TIMEOUT_S = 4.0  #: the workload's per-operation timeout
CONSENSUS = {"request_timeout_ms": int(REQUEST_TIMEOUT_S * 1000)}  # tick 100 ms, election 8 ticks: the defaults
ELECTION_TIMEOUT_S = 1.6  #: the upper end of the default randomized election timeout [0.8, 1.6) s
ELECTION_BOUND_S = 5.0  #: a new leader after the leader's death, within (the bench measures properly)
REFUSE_BOUND_S = 4 * ELECTION_TIMEOUT_S  #: the minority refuses writes within a few election timeouts
START_BOUND_S = 30.0
CATCH_UP_BOUND_S = 20.0
CLIENTS = 4
MAX_OPS = 2500  #: bounds the history so the linearizability search stays cheap


@pytest.fixture(scope="module", autouse=True)
def lab_environment():
    netns.require_lab(pytest)
    netns.install_sigterm_cleanup()
    yield
    netns.sweep()  # this run's leftovers only (the Lab context managers should have left none)


@pytest.fixture
def make_lab(tmp_path):
    """Factory: make_lab() -> an entered 5-agent RaftLab, agents started, leader elected; always closed."""
    labs: list[RaftLab] = []

    def make() -> RaftLab:
        lab = RaftLab(N, workdir=tmp_path / f"lab{len(labs)}", voters="all", consensus=CONSENSUS)
        labs.append(lab)
        lab.__enter__()
        lab.start_all(range(N), seeds=[0, 1])
        lab.wait_leader(range(N), START_BOUND_S)
        return lab

    yield make
    for lab in labs:
        lab.close()


# ------------------------------------------------------------------------------ helpers


def final_reads(lab: RaftLab, keys, via: int) -> tuple[dict, list[Operation]]:
    """Linearizable gets of every key through node `via`: (key -> value or None, the gets as
    Operations, which belong at the end of the history)."""
    results = lab.api_many([(via, {"op": "kv.get", "key": k}) for k in keys], timeout=CLIENT_TIMEOUT_S)
    state, ops = {}, []
    for k, r in zip(keys, results):
        assert r["status"] in ("ok", "not-found"), f"final read of {k} via node {via}: {r}\n{lab.diagnose()}"
        value = r["answer"]["value"] if r["status"] == "ok" else None
        state[k] = value
        ops.append(Operation("final", "get", k, None, value, r["call"], r["call"] + r["elapsed"]))
    return state, ops


def assert_converged(lab: RaftLab, keys, indices=range(N)) -> dict:
    """Every node has applied the same commit index and holds the same value and revision of
    every key (stale local reads); the common state."""
    lab.wait_caught_up(indices, CATCH_UP_BOUND_S)
    idx = list(indices)
    calls = [(i, {"op": "kv.get", "key": k, "stale": True}) for i in idx for k in keys]
    res = lab.api_many(calls, timeout=CLIENT_TIMEOUT_S)
    views: dict[int, dict] = {i: {} for i in idx}
    for (i, req), r in zip(calls, res):
        assert r["status"] in ("ok", "not-found"), f"stale read of {req['key']} on node {i}: {r}"
        views[i][req["key"]] = (r["answer"]["value"], r["answer"]["revision"]) if r["status"] == "ok" else None
    first = views[idx[0]]
    diff = {i: v for i, v in views.items() if v != first}
    assert not diff, f"nodes disagree after catching up: node {idx[0]} {first}, others {diff}"
    return first


def assert_history_ok(history: dict, final_ops: list[Operation], final_state: dict) -> list[Operation]:
    # a refused write (exit 3) definitely did not take effect: its value is never seen
    refused = {r["input"] if r["op"] == "put" else r["input"][1]: r for r in history["ops"]
               if r["op"] != "get" and r["status"] == "refused"}
    seen = [r for r in history["ops"] if r["op"] == "get" and r["status"] == "ok" and r["output"] in refused]
    seen += [Operation("final", "get", k, None, v) for k, v in final_state.items() if v in refused]
    assert not seen, ("writes answered 'refused' (exit 3) took effect: "
                      + "; ".join(f"{refused[s['output'] if isinstance(s, dict) else s.output]} seen by {s}" for s in seen[:5]))
    ops = to_operations(history["ops"]) + final_ops
    t0 = time.monotonic()
    verdict = lincheck.check(ops)
    took = time.monotonic() - t0
    assert verdict.ok is not None, f"linearizability unknown ({verdict.explanation}); the history is too big: {len(ops)} ops"
    assert verdict.ok is True, verdict.explanation
    lost = lincheck.lost_acknowledged_writes(ops, final_state)
    assert not lost, "acknowledged writes lost:\n" + "\n".join(map(str, lost))
    print(f"history of {len(ops)} operations linearizable (checked in {1000 * took:.0f} ms); no acknowledged write lost")
    return ops


def assert_wrote_at_all(history: dict, lo: float, hi: float, nodes=None, min_acked: int = 1) -> int:
    """At least min_acked acknowledged writes called in [lo, hi) (through `nodes`)."""
    n = sum(1 for r in history["ops"] if r["op"] != "get" and r["status"] == "ok" and lo <= r["call"] < hi
            and (nodes is None or int(r["node"]) in nodes))
    assert n >= min_acked, f"only {n} acknowledged writes between {lo:.1f} and {hi:.1f} (nodes {nodes}); {summarize(history)}"
    return n


def watch_split(lab: RaftLab, minority, majority, t_part: float, limit: float, *, old_leader: int | None,
                old_term: int) -> dict:
    """Poll every node's status every 0.1 s until every minority node reports mode read-only
    and, when the old leader is in the minority, it no longer says it leads and the majority
    has agreed on a new leader of a later term. Seconds after t_part."""
    seen: dict[int, float] = {}
    stepped_down: list[float] = []
    elected: list[float] = []

    def pred():
        lab.check_running(range(N))
        st = lab.raft(range(N), timeout=0.5)
        now = round(time.monotonic() - t_part, 2)
        for i in minority:
            s = st[i]
            if s is not None and s["mode"] == "read-only" and i not in seen:
                seen[i] = now
            if i == old_leader and s is not None and s["role"] != "leader" and not stepped_down:
                stepped_down.append(now)
        maj = [st[i] for i in majority]
        if old_leader is not None and not elected and all(s is not None for s in maj):
            leaders = {(s["leader"], s["term"]) for s in maj}
            if len(leaders) == 1:
                (lid, term), = leaders
                li = lab.index_of(lid)
                if li in majority and term > old_term and st[li]["role"] == "leader" and st[li]["mode"] == "read-write":
                    elected.append(now)
        done = len(seen) == len(minority) and (old_leader is None or (bool(stepped_down) and bool(elected)))
        return done, {"read_only_s": dict(seen), "stepped_down_s": stepped_down, "new_leader_s": elected, "raft": st}

    _, state = lab.wait_until(pred, limit, 0.1, what=f"the minority {list(minority)} to turn read-only")
    return state


def probe_minority_write(lab: RaftLab, node: int, value: str) -> dict:
    r = lab.api(node, {"op": "kv.put", "key": "probe", "value": value}, timeout=CLIENT_TIMEOUT_S)
    assert r["status"] == "refused" and r["exit"] == 3 and "read-only" in r["error"], (
        f"a write on the minority node {node} should be refused at once (exit 3, read-only): {r}")
    assert r["elapsed"] < 1.0, f"the refusal took {r['elapsed']:.2f} s; it should be immediate: {r}"
    return r


def run_split(lab: RaftLab, minority: list[int], majority: list[int], name: str, record_property,
              old_leader_in_minority: int | None) -> None:
    """The common body of the split scenarios."""
    keys = [f"k{i}" for i in range(5)]
    _, leader, term = lab.wait_leader(range(N), 10)
    pre = lab.api(majority[0], {"op": "kv.put", "key": "pre", "value": f"{name}-before-split"})
    assert pre["status"] == "ok", pre
    wl = lab.start_workload(name, duration=16, clients=CLIENTS, timeout=CLIENT_TIMEOUT_S, seed=name, max_ops=MAX_OPS)
    time.sleep(3)

    t_cut = time.monotonic()
    lab.partition([majority, minority])
    t_part = time.monotonic()  # the split is complete: figures count from here
    figures: dict[str, object] = {"partition_command_s": round(t_part - t_cut, 3)}
    watched = watch_split(lab, minority, majority, t_part, REFUSE_BOUND_S + 2, old_leader=old_leader_in_minority,
                          old_term=term)
    figures["minority_read_only_s"] = watched["read_only_s"]
    if old_leader_in_minority is not None:
        figures["old_leader_stepped_down_s"] = watched["stepped_down_s"][0]
        figures["majority_new_leader_s"] = watched["new_leader_s"][0]
    for i in minority:
        s = watched["raft"][i]
        assert s["mode"] == "read-only" and "read-only" in s["why"], s
    # writes there are refused at once, with the reason
    minority_values = []
    for i in minority:
        v = f"{name}/minority-probe/{i}"
        r = probe_minority_write(lab, i, v)
        minority_values.append(v)
        figures.setdefault("refused_reason", r["error"])
    figures["minority_refuses_writes_s"] = round(time.monotonic() - t_part, 2)
    assert max(watched["read_only_s"].values()) < REFUSE_BOUND_S, figures
    # a linearizable read there is refused too, a stale one answers (the real CLI)
    r = lab.api(minority[0], {"op": "kv.get", "key": "pre"})
    assert r["status"] == "refused" and r["exit"] == 3, r
    stale = lab.cli(minority[0], "kv", "get", "pre", "--stale", "--fleet-key-file", str(lab.key), "--mesh", "lab")
    assert stale["value"] == f"{name}-before-split", stale

    # the majority: a leader (a new one when the old one was cut off), and it commits
    _, new_leader, new_term = lab.wait_leader(majority, 10, 0.1)
    if old_leader_in_minority is not None:
        assert new_leader != old_leader_in_minority and new_term > term
    else:
        assert new_leader == leader and new_term == term, "the majority kept its leader"
    r = lab.api(majority[-1], {"op": "kv.put", "key": "during", "value": f"{name}-majority-during-split"})
    assert r["status"] == "ok", f"the majority side should commit during the split: {r}"

    time.sleep(max(0.0, t_part + 8 - time.monotonic()))
    t_heal = time.monotonic()
    lab.heal()
    # the healed minority takes writes again
    n_probe = iter(range(1000))

    def minority_writes():
        res = lab.api_many([(i, {"op": "kv.put", "key": "after", "value": f"{name}/after/{i}/{next(n_probe)}"})
                            for i in minority], timeout=CLIENT_TIMEOUT_S)
        return all(r["status"] == "ok" for r in res), res
    lab.wait_until(minority_writes, 15, 0.1, what="the healed minority to take writes again")
    figures["minority_writable_after_heal_s"] = round(time.monotonic() - t_heal, 2)
    h = wl.wait()
    figures["workload"] = summarize(h)
    lab.wait_leader(range(N), 15)
    final_state = assert_converged(lab, keys + ["pre", "during", "probe", "after"])

    # the majority kept committing during the split (through majority nodes); the minority refused
    figures["acked_writes_during_split"] = assert_wrote_at_all(h, t_part + 2, t_heal, nodes=majority, min_acked=5)
    refused_minority = [r for r in h["ops"] if int(r["node"]) in minority and t_part + REFUSE_BOUND_S <= r["call"] < t_heal
                        and r["op"] != "get"]
    assert refused_minority and all(r["status"] == "refused" and "read-only" in (r["error"] or "")
                                    for r in refused_minority), [r for r in refused_minority if r["status"] != "refused"][:5]

    # no write attempted only on the minority side during the split ever appears: called
    # once the split was complete and given up by its agent (request_timeout after the
    # call) before the heal. A request sent before the split may have reached the leader,
    # and its answer may have been lost: the lab moves the minority's ports to another
    # bridge, and an answer to the hub's old address follows a stale ARP entry to br0.
    for r in h["ops"]:
        if r["op"] != "get" and int(r["node"]) in minority and t_part <= r["call"] < t_heal and (
                r["status"] == "refused" or r["call"] < t_heal - REQUEST_TIMEOUT_S - 1):
            minority_values.append(r["input"] if r["op"] == "put" else r["input"][1])
    observed = {r["output"] for r in h["ops"] if r["op"] == "get" and r["status"] == "ok"}
    observed |= {v[0] for v in final_state.values() if v is not None}
    leaked = sorted(set(minority_values) & observed)
    assert not leaked, f"writes attempted only on the minority side took effect: {leaked[:10]}"

    final, final_ops = final_reads(lab, keys, via=majority[0])
    assert final == {k: (final_state[k] or (None,))[0] for k in keys}
    assert_history_ok(h, final_ops, final)
    figures["minority_only_writes_checked"] = len(set(minority_values))
    record_property(name, figures)
    print(f"{name}: {figures}")


# ------------------------------------------------------------------------------ 1


def test_leader_sigkill_under_write_load(make_lab, record_property):
    lab = make_lab()
    keys = [f"k{i}" for i in range(5)]
    _, leader, term = lab.wait_leader(range(N), 10)
    wl = lab.start_workload("kill", duration=14, clients=CLIENTS, timeout=CLIENT_TIMEOUT_S, seed="kill", max_ops=MAX_OPS)
    time.sleep(4)

    t_kill = time.monotonic()
    lab.kill(leader)
    survivors = [i for i in range(N) if i != leader]
    lab.wait_leader(survivors, ELECTION_BOUND_S + 5, 0.05, min_term=term + 1, not_leader=f"n{leader}")
    election_s = time.monotonic() - t_kill
    assert election_s < ELECTION_BOUND_S, f"new leader only after {election_s:.2f} s"

    # Longer than one client timeout: a client whose call went to the dead node waits
    # that long, and with 2 s all four were sometimes still waiting (a CI flake).
    time.sleep(CLIENT_TIMEOUT_S + 1)
    t_restart = time.monotonic()
    lab.restart(leader)
    h = wl.wait()
    # the restarted node catches up: the same commit index everywhere once the load stops
    state = assert_converged(lab, keys)
    caught_up_s = time.monotonic() - t_restart

    # writes went on after the election; the unavailability window seen by the clients
    acked = sorted(r["ret"] for r in h["ops"] if r["op"] != "get" and r["status"] == "ok")
    before = [t for t in acked if t < t_kill]
    first_after = next((t for t in acked if t > t_kill), None)
    assert before and first_after is not None, summarize(h)
    assert_wrote_at_all(h, t_kill + election_s, t_restart, min_acked=5)
    gap = first_after - t_kill

    final, final_ops = final_reads(lab, keys, via=survivors[0])
    assert final == {k: (state[k] or (None,))[0] for k in keys}
    assert_history_ok(h, final_ops, final)
    figures = {"election_s": round(election_s, 2), "first_acked_write_after_kill_s": round(gap, 2),
               "caught_up_after_restart_s": round(caught_up_s, 1), "workload": summarize(h)}
    record_property("leader_kill", figures)
    print(f"leader n{leader} SIGKILLed: {figures}")


# ------------------------------------------------------------------------------ 2


def test_split_two_three(make_lab, record_property):
    lab = make_lab()
    minority, majority = [0, 1], [2, 3, 4]
    # the leader on the majority side: this is the "followers cut off" split (3 cuts off the leader)
    for _ in range(3):
        _, leader, term = lab.wait_leader(range(N), 10)
        if leader in majority:
            break
        r = lab.api(leader, {"op": "leader.transfer", "to": "n2"})
        assert r["status"] == "ok", r
        lab.wait_leader(range(N), 10, min_term=term + 1)
    assert leader in majority
    run_split(lab, minority, majority, "split23", record_property, old_leader_in_minority=None)


# ------------------------------------------------------------------------------ 3


def test_split_one_four_isolates_the_leader(make_lab, record_property):
    lab = make_lab()
    _, leader, _ = lab.wait_leader(range(N), 10)
    others = [i for i in range(N) if i != leader]
    run_split(lab, [leader], others, "split14", record_property, old_leader_in_minority=leader)


# ------------------------------------------------------------------------------ 4


def _kill_all(lab: RaftLab, indices) -> None:
    """SIGKILL every agent at once (a power cut), then reap them."""
    for i in indices:
        os.killpg(lab.procs[i].pid, signal.SIGKILL)
    for i in indices:
        lab.procs[i].popen.wait(timeout=10)


@pytest.mark.slow
def test_power_cut_and_a_flapping_follower(make_lab, record_property):
    lab = make_lab()
    keys = [f"k{i}" for i in range(5)]
    wl = lab.start_workload("power", duration=24, clients=CLIENTS, timeout=CLIENT_TIMEOUT_S, seed="power", max_ops=MAX_OPS)

    # besides the workload: a stream of writes to keys of their own ("d/<n>", never
    # overwritten), so every acknowledged one can be looked for after the power cut
    acked: dict[str, str] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def durable_writer():
        try:
            for n in range(150):  # 5 keys a batch, at most 20 batches a second: <= 750 keys
                if stop.wait(0.05):
                    return
                batch = [(j, {"op": "kv.put", "key": f"d/{n:05d}-{j}", "value": f"durable-{n}-{j}"}) for j in range(N)]
                for (_, req), r in zip(batch, lab.api_many(batch, timeout=1.5)):
                    if r["status"] == "ok":
                        acked[req["key"]] = req["value"]
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    writer = threading.Thread(target=durable_writer, daemon=True)
    writer.start()
    time.sleep(4)
    n_before = len(acked)
    t_cut = time.monotonic()
    _kill_all(lab, range(N))  # mid-write: the workload and the writer keep sending
    time.sleep(1)
    stop.set()
    writer.join(timeout=10)
    assert not writer.is_alive() and not errors, errors
    acked_at_cut = dict(acked)
    assert len(acked_at_cut) >= n_before > 20, (n_before, len(acked_at_cut))

    for i in range(N):
        lab.restart(i, seeds=[0, 1])
    _, leader, _ = lab.wait_leader(range(N), START_BOUND_S)
    recovered_s = time.monotonic() - t_cut  # from the cut: 1 s dark, then five agent starts and an election
    # every write acknowledged before the power cut is there (one linearizable listing)
    r = lab.api(leader, {"op": "kv.ls", "prefix": "d/", "limit": 1000})
    assert r["status"] == "ok", r
    present = {item["key"]: item["value"] for item in r["answer"]["items"]}
    missing = {k: v for k, v in acked_at_cut.items() if present.get(k) != v}
    assert not missing, f"{len(missing)} of {len(acked_at_cut)} acknowledged writes lost in the power cut: {sorted(missing)[:10]}"

    # then one follower SIGKILLed and restarted, three times, under the workload
    flaps = 0
    for _ in range(3):
        if time.monotonic() > wl.ready_time + wl.duration - 3:
            break
        _, leader, _ = lab.wait_leader(range(N), 15)
        f = (leader + 1 + flaps) % N
        lab.kill(f)
        time.sleep(1.5)
        lab.restart(f, seeds=[j for j in range(N) if j != f][:2])
        flaps += 1
        time.sleep(1.5)
    h = wl.wait()
    state = assert_converged(lab, keys)
    final, final_ops = final_reads(lab, keys, via=leader)
    assert final == {k: (state[k] or (None,))[0] for k in keys}
    ops = assert_history_ok(h, final_ops, final)
    assert_wrote_at_all(h, t_cut + recovered_s, h["meta"]["end"], min_acked=20)
    assert flaps >= 2, "the follower was killed fewer than twice: the workload ended too early"
    figures = {"acked_durable_writes_checked": len(acked_at_cut), "leader_again_after_cut_s": round(recovered_s, 2),
               "follower_flaps": flaps, "history_ops": len(ops), "workload": summarize(h)}
    record_property("power_cut", figures)
    print(f"power cut: {figures}")


# ------------------------------------------------------------------------------ 5


def test_a_refused_write_never_takes_effect(make_lab, record_property):
    """The API promises: exit 3 = the write did not take effect. The leader stops hearing its
    peers (it still sends to them and talks with the client); a put sent to it is appended and
    replicated, but never acknowledged to it, so it cannot commit and steps down
    (check-quorum). The followers elect a new leader whose log has the entry, and commit it.
    Meanwhile the old leader's driver retries the waiting write once a second and knows no
    leader any more; it must not answer 'refused' for a write it already handed on."""
    problem = raft_lab.nft_problem()
    if problem is not None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"integration environment unusable in CI: {problem}", pytrace=False)
        pytest.skip(problem)
    lab = make_lab()
    _, leader, term = lab.wait_leader(range(N), 10)
    others = [i for i in range(N) if i != leader]
    assert lab.api(leader, {"op": "kv.get", "key": "x", "stale": True})["status"] == "not-found"
    lab.deafen(leader)
    try:
        r = lab.api(leader, {"op": "kv.put", "key": "x", "value": "through-a-deaf-leader"}, timeout=CLIENT_TIMEOUT_S + 2)
        _, new_leader, _ = lab.wait_leader(others, 10, min_term=term + 1)
        got = lab.api(new_leader, {"op": "kv.get", "key": "x"})
    finally:
        lab.undeafen(leader)
    assert got["status"] in ("ok", "not-found"), got
    took_effect = got["status"] == "ok" and got["answer"]["value"] == "through-a-deaf-leader"
    record_property("deaf_leader_write", {"answer": r["status"], "error": r.get("error"), "took_effect": took_effect})
    print(f"write to the deaf leader n{leader}: answered {r['status']} ({r.get('error')}) after {r['elapsed']:.2f} s; "
          f"took effect: {took_effect}")
    assert r["status"] in ("unknown", "timeout", "refused"), r  # it cannot be acknowledged
    assert not (r["status"] == "refused" and took_effect), (
        f"the write was answered 'refused' (exit 3: {r['error']}) but took effect (read via n{new_leader})")
