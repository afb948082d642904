"""The Raft core (agent/core/raft.py) in the seeded simulator (agent/sim/raft_cluster.py).

Every run is a function of its seed; a failure prints ``seed=N`` and the command
that replays it, e.g. ``python -m agent.sim.raft_main --scenario random --seed 12
--nodes 5 --learners 1 --steps 300 --loss 0.05 --dup 0.0 --delay 0:2 --chaos 1.2
--profile 0 --trace``. Run parameters not fixed here are drawn from the seed.
MESHAGENT_SIM_SCALE=10 runs ten times as many seeds.

What every run checks after every driver step (agent/sim/raft_checks.py):
election safety, log matching, committed agreement, leader completeness,
leader append-only, state-machine safety (also across restarts and snapshot
installs), commit monotonic, one durable vote per term, persist before send
(terms and votes durable before a message carries them), applied entries
durable across restarts, only voters campaign, no commit of a minority
leader's entries while its partition lasts, ReadIndex never stale; and the
driver contracts (contiguous entries, committed entries handed out in order
and within commit, the core's last index equal to the durable log's, every
message decodes and fits one Raft datagram).
After the faulty phase everything heals and within 20 election timeouts
(160 ticks = 16 s with the defaults) there must be one leader, every live node
at its commit index, and a fresh write applied everywhere.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest

import agent.core.raft as raft_mod
import agent.core.raft_log as raft_log_mod
from agent.core import raft_messages as rm
from agent.core.raft import RaftSettings
from agent.sim.raft_checks import Checker, LogView, chain_next
from agent.sim.raft_cluster import (
    KV,
    RaftCluster,
    RaftNet,
    RaftParams,
    RaftReport,
    SimDisk,
    check_liveness,
    election_after_leader_crash,
    election_benchmark,
    expect,
    liveness_bound,
    replay_on_failure,
    run_raft,
    stable,
    voter_name,
)
from agent.sim.raft_main import main as raft_main

SCALE = float(os.environ.get("MESHAGENT_SIM_SCALE", "1"))


def seeds(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + max(1, int(n * SCALE))))


# --------------------------------------------------------------- many seeds


@pytest.mark.parametrize("seed", seeds(300))
def test_random_faults(seed):
    """300 seeds of 300 ticks (30 s virtual) each: 3, 5 or 7 voters (now and then
    1 or 2 and learners to grow into), 0-2 learners, 0-15% loss, duplication,
    reordering, partitions of every shape, one-way cuts, crashes at every point
    of the driver step, stalls, slow clocks, snapshots, transfers, voter
    changes, ReadIndex; a settings profile half the time. About 55 ms a seed."""
    rep = run_raft("random", seed)
    expect(rep)


@pytest.mark.parametrize("seed", seeds(100, base=10_000))
def test_random_faults_five_voters_default_settings(seed):
    """Five voters, the default settings, more chaos."""
    expect(run_raft("random", seed, nodes=5, profile=0, chaos=2.0))


@pytest.mark.slow
@pytest.mark.parametrize("block", range(8))
def test_random_faults_many_seeds(block):
    """800 more seeds (100 per test, without the per-message codec round trip,
    which the normal runs do): about 35 s. MESHAGENT_SIM_SCALE=10 runs 8,000. The
    suite's 10-minute budget sets the count; larger sweeps run with agent.sim.raft_main."""
    failures = []
    for seed in seeds(100, base=100_000 + 100 * block):
        rep = run_raft("random", seed, codec=False)
        if rep.violations:
            failures.append(rep.failure())
    assert not failures, "\n\n".join(failures[:3])


@pytest.mark.slow
@pytest.mark.parametrize("seed", seeds(4, base=200_000))
def test_long_runs_seven_voters(seed):
    """Seven voters and two learners for 3000 ticks (5 virtual minutes)."""
    expect(run_raft("random", seed, nodes=7, learners=2, steps=3000))


# ----------------------------------------------------------------- scenarios


@pytest.mark.parametrize("seed", seeds(10))
def test_partition_two_three_then_heal(seed):
    """The leader and one follower cut off from the other three (2|3): the old
    leader's writes never commit and it steps down (check-quorum); the three
    elect a leader and commit; after the heal everyone converges."""
    rep = run_raft("partition23", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["minority_writes"] > 0 and rep.metrics["minority_entries"] > 0
        assert rep.metrics["new_leader_side"] == "majority"


@pytest.mark.parametrize("seed", seeds(10))
def test_partition_one_four_then_heal(seed):
    """The leader alone (1|4): as above."""
    rep = run_raft("partition14", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["new_leader_side"] == "majority"


@pytest.mark.parametrize("seed", seeds(10))
def test_leader_crash_under_writes(seed):
    """The leader crashes every 2-5 election timeouts under steady writes, at any
    point of its driver step, and comes back 1-4 timeouts later."""
    rep = run_raft("leader_crash", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["leader_crashes"] >= 5
        assert rep.metrics["committed_writes"] > 20


@pytest.mark.parametrize("seed", seeds(10))
def test_restart_loses_unsynced_writes(seed):
    """Crashes between the write and the fsync (the step's writes are lost, none
    of its messages went out), again and again: nothing acknowledged is lost."""
    rep = run_raft("unsynced_restart", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["lost_unsynced_writes"] > 0


@pytest.mark.parametrize("seed", seeds(6))
def test_snapshot_catch_up_after_long_downtime(seed):
    """A voter and a learner down while the others write, snapshot and compact:
    they come back behind the leader's log and catch up by InstallSnapshot
    (data fetched from the sender by the receiving driver)."""
    rep = run_raft("snapshot_catchup", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["caught_up_by_snapshot"] >= 1


@pytest.mark.parametrize("seed", seeds(10))
def test_membership_change_under_partition(seed):
    """Voter changes asked of whoever leads on either side of three partitions
    in turn; at the end one configuration everywhere."""
    rep = run_raft("conf_partition", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["conf_changes"] > 0


@pytest.mark.parametrize("seed", seeds(5))
def test_figure8_scripted(seed):
    """Raft paper figure 8, scripted: the core must not commit the old-term entry
    by counting replicas, so the would-be usurper cannot win."""
    rep = run_raft("figure8", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["figure8_roles"]


@pytest.mark.parametrize("seed", seeds(6))
def test_grow_from_one_voter(seed):
    """The auto-voter bootstrap: one voter, learners added as voters one at a time
    under partitions and loss, then crashes and voter changes too."""
    rep = run_raft("grow_from_one", seed)
    expect(rep)


@pytest.mark.parametrize("seed", seeds(10))
def test_full_cluster_restart(seed):
    """Every node crashes at once (each at its own point of the driver step),
    over and over, and they come back one by one: nothing committed is lost."""
    rep = run_raft("full_restart", seed)
    expect(rep)
    with replay_on_failure(rep):
        assert rep.metrics["full_restarts"] >= 5


@pytest.mark.parametrize("seed", [1, 2])
def test_biggest_entry_propose_accepts_is_replicated(seed):
    """An entry of MAX_DATA bytes (the most propose() accepts) fits one Raft
    datagram even with 64-byte node ids. (MAX_DATA was 4096 once: such an entry
    was accepted and then dropped by the driver on every send, stalling the log.)"""
    expect(run_raft("big_entry", seed))


def test_message_budget_matches_the_driver():
    from agent.sim.raft_cluster import RAFT_MAX_MESSAGE

    consensus = pytest.importorskip("agent.consensus")
    assert RAFT_MAX_MESSAGE == consensus.RAFT_MAX_PACKET - 3  # _pack() counts a 3-byte array header


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["partition23", "partition14", "leader_crash", "unsynced_restart",
                                      "snapshot_catchup", "conf_partition", "figure8", "grow_from_one",
                                      "full_restart"])
def test_scenarios_many_seeds(scenario):
    failures = [rep.failure() for seed in seeds(40, base=1000) if (rep := run_raft(scenario, seed)).violations]
    assert not failures, "\n\n".join(failures[:3])


# ---------------------------------------- the checkers can fail: broken histories


def _e(index, term, data=b"", kind=rm.EntryKind.NORMAL):
    return rm.Entry(index, term, kind, data)


def _log(*terms, data=b""):
    log = LogView()
    assert log.append([_e(i, t, data) for i, t in enumerate(terms, 1)]) is None
    return log


def test_checker_election_safety():
    ck = Checker()
    ck.role("n1", "leader", 3, ("n1", "n2", "n3"), _log(1))
    ck.role("n1", "follower", 4, ("n1", "n2", "n3"), _log(1))
    assert ck.ok
    ck.role("n2", "leader", 3, ("n1", "n2", "n3"), _log(1))
    assert any("election safety" in v and "term 3" in v for v in ck.violations)


def test_checker_log_matching():
    ck = Checker()
    ck.log_changed("n1", _log(1, 1, 2), 1)
    ck.log_changed("n2", _log(1, 1), 1)
    assert ck.ok
    ck.log_changed("n3", _log(1, 1, 2, data=b"other"), 1)  # same (index, term), other data
    assert any("log matching" in v for v in ck.violations)
    ck2 = Checker()
    ck2.log_changed("n1", _log(1, 2, 2), 1)
    bad = LogView()
    bad.append([_e(1, 1, b"x"), _e(2, 2), _e(3, 2)])  # equal at index 3 but not before it
    ck2.log_changed("n2", bad, 3)
    assert any("log matching" in v for v in ck2.violations)


def test_checker_committed_agreement_and_leader_completeness():
    ck = Checker()
    a, b = _log(1, 2, 2), _log(1, 3)
    ck.role("n1", "leader", 2, ("n1", "n2", "n3"), a)
    ck.commit("n1", 0, a, "leader", 2)
    ck.commit("n1", 3, a, "leader", 2)
    assert ck.ok and ck.commit_max == 3
    ck.role("n2", "leader", 3, ("n1", "n2", "n3"), b)  # term 3 leader lacks index 3 of term 2
    assert any("leader completeness" in v and "lacks committed entry 3" in v for v in ck.violations)
    ck3 = Checker()
    ck3.commit("n1", 2, a, "leader", 2)
    ck3.commit("n2", 0, b, "follower", 3)
    ck3.commit("n2", 2, b, "follower", 3)  # n2's entry 2 has term 3
    assert any("committed agreement" in v for v in ck3.violations)


def test_checker_state_machine_safety_and_restore():
    ck = Checker()
    ch1 = chain_next(b"\0" * 8, 1, 1, 0, b"a")
    ch2 = chain_next(b"\0" * 8, 1, 1, 0, b"b")
    ck.applied_entry("n1", 1, 1, ch1, None)
    ck.applied_entry("n2", 1, 1, ch1, None)
    assert ck.ok
    ck.applied_entry("n3", 1, 1, ch2, None)
    assert any("state-machine safety" in v for v in ck.violations)
    ck2 = Checker()
    ck2.applied_entry("n1", 1, 1, ch1, None)
    ck2.restored("n2", 1, ch2)
    assert any("state-machine safety" in v and "snapshot" in v for v in ck2.violations)


def test_checker_commit_monotonic_and_durable_state():
    ck = Checker()
    log = _log(1, 1, 1)
    ck.commit("n1", 0, log, "follower", 1)
    ck.commit("n1", 3, log, "follower", 1)
    ck.commit("n1", 2, log, "follower", 1)
    assert any("commit monotonic" in v and "from 3 down to 2" in v for v in ck.violations)
    ck2 = Checker()
    ck2.hard_state("n1", 5, "n2", 7)
    ck2.hard_state("n1", 5, "n3", 7)
    ck2.hard_state("n1", 4, "n3", 6)
    text = "\n".join(ck2.violations)
    assert "durable vote in term 5 changed" in text and "durable term went from 5 down to 4" in text
    assert "durable commit went from 7 down to 6" in text


def test_checker_one_vote_per_term():
    ck = Checker()
    ck.hard_state("n1", 4, None, 0)
    ck.vote_granted("n1", 4, "n2")  # not durable yet: persist-before-send broken
    assert any("before it was durable" in v for v in ck.violations)
    ck2 = Checker()
    ck2.hard_state("n1", 4, "n2", 0)
    ck2.vote_granted("n1", 4, "n2")
    ck2.hard_state("n1", 4, "n3", 0)
    ck2.vote_granted("n1", 4, "n3")
    assert any("voted for n2 and for n3 in term 4" in v for v in ck2.violations)


def test_checker_persist_before_send_and_leader_append_only():
    ck = Checker()
    ck.message_sent("n1", "PreVote", 5, "n2", 4, None)  # a pre-vote speaks of a term not adopted: fine
    ck.message_sent("n1", "AppendResp", 4, "n2", 4, None)
    assert ck.ok
    ck.message_sent("n1", "AppendResp", 5, "n2", 4, None)
    ck.message_sent("n3", "Vote", 5, "n2", 5, None)
    text = "\n".join(ck.violations)
    assert "n1 sent a AppendResp of term 5" in text and "before its own vote for itself was durable" in text
    ck2 = Checker()
    ck2.leader_wrote("n1", 3, 8, 7, [3, 3])
    assert ck2.ok
    ck2.leader_wrote("n1", 3, 6, 7, [3])
    ck2.leader_wrote("n1", 3, 9, 8, [2])
    assert len([v for v in ck2.violations if "leader append-only" in v]) == 2


def test_checker_applied_durable_across_restart():
    ck = Checker()
    log = _log(1, 1, 1)
    ck.applied_entry("n1", 3, 1, log.chain_at(3), log)
    ck.restarted("n1", _log(1, 1))  # the restart lost entry 3, which was applied
    assert any("applied durable" in v and "applied up to 3" in v for v in ck.violations)
    ck2 = Checker()
    ck2.applied_entry("n1", 3, 1, log.chain_at(3), log)
    ck2.restarted("n1", _log(1, 1, 2))  # restarted with something else at 3
    assert any("applied durable" in v for v in ck2.violations)


def test_checker_only_voters_campaign():
    ck = Checker()
    ck.role("l1", "precandidate", 3, ("n1", "n2", "n3"), None)
    ck.role("n4", "leader", 3, ("n1", "n2", "n3"), _log(1))
    text = "\n".join(ck.violations)
    assert "l1 is precandidate" in text and "n4 became leader of term 3 but is not a voter" in text


def test_checker_minority_commit():
    ck = Checker()
    voters = ("n1", "n2", "n3", "n4", "n5")
    side = frozenset({"n1", "n2"})
    ck.new_epoch([(side, [voters]), (frozenset({"n3", "n4", "n5"}), [voters])])
    log = _log(1, 2, 2)
    ck.commit("n1", 1, log, "leader", 2)
    ck.leader_appended("n1", [(2, 2), (3, 2)], side, voters)
    ck.commit("n1", 3, log, "leader", 2)
    assert any("minority commits" in v and "n1 committed entry (index 2, term 2)" in v for v in ck.violations)
    ck2 = Checker()  # same, but the partition changed in between: allowed
    ck2.new_epoch([(side, [voters])])
    ck2.commit("n1", 1, log, "leader", 2)
    ck2.leader_appended("n1", [(2, 2), (3, 2)], side, voters)
    ck2.new_epoch([])
    ck2.commit("n1", 3, log, "leader", 2)
    assert ck2.ok
    ck3 = Checker()  # 2 of 4 voters, then a change that makes the side a majority: allowed
    four = ("n1", "n2", "n3", "n4")
    ck3.new_epoch([(side, [four])])
    ck3.commit("n1", 1, log, "leader", 2)
    ck3.leader_appended("n1", [(2, 2)], side, four)
    ck3.config_seen(side, ("n1", "n2", "n4"))
    ck3.commit("n1", 2, log, "leader", 2)
    assert ck3.ok


def test_checker_stale_read():
    ck = Checker()
    log = _log(1, 1, 1, 1)
    ck.commit("n1", 4, log, "leader", 1)
    ck.read_requested("n2", b"r1")
    ck.read_answered("n2", b"r1", 3)
    assert any("ReadIndex" in v and "stale" in v for v in ck.violations)
    ck.read_requested("n3", b"r2")
    ck.read_answered("n3", b"r2", -1)  # refused: fine
    assert len(ck.violations) == 1


def test_liveness_failure_is_reported():
    """A cluster that never heals fails the liveness check, with the state listed."""
    c = RaftCluster(3, [voter_name(i) for i in range(3)])
    c.run_until(lambda: c.leader() is not None, 200)
    c.partition([[n] for n in c.names])
    rep = RaftReport(RaftParams("random", 3))
    check_liveness(c, rep)
    assert rep.violations and "liveness" in rep.violations[0] and "n1:" in rep.violations[0]


# ------------------------------ the simulator catches bugs planted in the core


def _plant(monkeypatch, bug: str) -> None:
    R = raft_mod
    if bug == "vote not persisted":
        orig = R.Raft.ready

        def ready(self):
            rd = orig(self)
            if rd.hard_state is not None:
                rd.hard_state = R.HardState(rd.hard_state.term, None, rd.hard_state.commit)
            return rd

        monkeypatch.setattr(R.Raft, "ready", ready)
    elif bug == "figure 8":
        def maybe_commit(self):
            prs = self.prs
            matches = sorted((prs[v].match if v in prs else 0 for v in self.log.voters), reverse=True)
            q = matches[len(matches) // 2]
            if q <= self.commit:
                return False  # no check that the entry is of the current term
            self.commit = q
            self._after_commit()
            return True

        monkeypatch.setattr(R.Raft, "_maybe_commit", maybe_commit)
    elif bug == "lease read":
        monkeypatch.setattr(R.Raft, "_leader_read",
                            lambda self, ctx, frm: self._answer_read(R._Read(ctx, frm, self.commit, 0)))
    elif bug == "no up-to-date check":
        monkeypatch.setattr(raft_log_mod.RaftLog, "is_up_to_date", lambda self, i, t: True)
    elif bug == "votes forgotten":
        orig_vote = R.Raft._handle_vote_request

        def handle(self, m):
            if type(m) is rm.Vote:
                self.vote = None
            self.leader = None
            orig_vote(self, m)

        monkeypatch.setattr(R.Raft, "_handle_vote_request", handle)
    elif bug == "term not persisted":
        orig = R.Raft.ready

        def ready(self):
            rd = orig(self)
            if rd.hard_state is not None and rd.messages and self.state != R.LEADER:
                rd.hard_state = None  # sent with the messages, never written
            return rd

        monkeypatch.setattr(R.Raft, "ready", ready)
    elif bug == "quorum too small":
        def maybe_commit(self):
            prs = self.prs
            matches = sorted((prs[v].match if v in prs else 0 for v in self.log.voters), reverse=True)
            q = matches[max(0, len(matches) // 2 - 1)]
            if q <= self.commit or self.log.term(q) != self.term:
                return False
            self.commit = q
            self._after_commit()
            return True

        monkeypatch.setattr(R.Raft, "_maybe_commit", maybe_commit)
    else:
        raise ValueError(bug)


@pytest.mark.parametrize("bug, scenario, n, property_", [
    ("vote not persisted", "random", 3, "one vote per term"),
    ("figure 8", "figure8", 3, "leader completeness"),
    ("lease read", "random", 40, "ReadIndex"),
    ("no up-to-date check", "random", 40, ""),
    ("votes forgotten", "random", 20, "one vote per term"),
    ("quorum too small", "random", 20, ""),
    ("term not persisted", "random", 3, "persist before send"),
])
def test_planted_core_bugs_are_caught(monkeypatch, bug, scenario, n, property_):
    """A bug planted in the core (monkeypatched for this test only) makes some
    seed fail, naming the property; the real core passes the same seeds."""
    _plant(monkeypatch, bug)
    caught = None
    for seed in range(n):
        rep = run_raft(scenario, seed)
        if rep.violations:
            caught = rep
            break
    assert caught is not None, f"planted bug {bug!r} not caught in {n} seeds of {scenario}"
    text = caught.failure()
    assert property_ in text and f"seed={caught.params.seed}" in text and "replay: python -m agent.sim.raft_main" in text
    monkeypatch.undo()
    expect(run_raft(scenario, caught.params.seed))


# ------------------------------------------------------------ the sim itself


def test_determinism_same_seed_same_trace():
    a = run_raft("random", 7, trace=True)
    b = run_raft("random", 7, trace=True)
    with replay_on_failure(a):
        assert a.cluster.trace == b.cluster.trace and a.digest == b.digest and a.events > 50
    assert run_raft("random", 8).digest != a.digest


def test_determinism_across_processes_and_hash_seeds():
    """The CLI in fresh interpreters with different PYTHONHASHSEED prints the
    same trace digest as this process."""
    rep = run_raft("random", 3)
    digests = set()
    for hash_seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-m", "agent.sim.raft_main", *rep.replay().split()[3:]],
                             capture_output=True, text=True, env=env, timeout=120)
        m = re.search(r"trace digest ([0-9a-f]+)", out.stdout)
        assert m, out.stdout + out.stderr
        digests.add(m.group(1))
    with replay_on_failure(rep):
        assert digests == {rep.digest}


def test_replay_command_reproduces_the_run(capsys):
    rep = run_raft("random", 11)
    assert rep.replay().startswith("python -m agent.sim.raft_main --scenario random --seed 11 --nodes ")
    code = raft_main(rep.replay().split()[3:] + ["--trace"])
    out = capsys.readouterr().out
    assert code == (1 if rep.violations else 0)
    assert f"trace digest {rep.digest}" in out
    assert re.search(r"^\s+\d+ n\d\s+leader term \d+", out, re.M)  # the event log


def test_failure_message_names_seed_and_replay_command():
    rep = RaftReport(RaftParams("random", 1234, nodes=5, learners=0, steps=300, loss=0.1, dup=0.0, delay=(0, 2),
                                chaos=1.0, profile=0))
    rep.violations.append("tick 17 election safety: n1 and n2 were both leader in term 3")
    with pytest.raises(AssertionError) as e:
        expect(rep)
    msg = str(e.value)
    assert "seed=1234" in msg
    assert ("replay: python -m agent.sim.raft_main --scenario random --seed 1234 --nodes 5 --learners 0 "
            "--steps 300 --loss 0.1 --dup 0.0 --delay 0:2 --chaos 1.0 --profile 0 --trace") in msg
    with pytest.raises(AssertionError, match=r"seed=1234\nreplay: python -m agent\.sim\.raft_main"):
        with replay_on_failure(rep):
            assert False, "extra check"


def test_cli_many_seeds_and_list(capsys):
    assert raft_main(["--seed", "0", "--seeds", "3", "--steps", "100"]) == 0
    assert "3 seeds from 0: 0 failed" in capsys.readouterr().out
    assert raft_main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "partition23" in out and "figure8" in out


def test_network_orders_by_time_then_send_order_and_duplicates():
    net = RaftNet(random.Random(1), delay=(0, 3), dup=0.3)
    for n in ("a", "b"):
        net.up(n)
    for k in range(200):
        net.send("a", "b", k)
    got = []
    for now in range(5):
        while (item := net.pop(now)) is not None:
            got.append((now, item[2]))
    assert len(got) == 200 + net.stats.duplicated and net.stats.duplicated > 30
    assert [t for t, _ in got] == sorted(t for t, _ in got)
    assert [k for _, k in got] != sorted(k for _, k in got)  # reordered


def test_network_loss_partition_and_restart():
    net = RaftNet(random.Random(2), delay=(1, 1))
    for n in ("a", "b", "c"):
        net.up(n)
    net.send("a", "b", "old")
    net.down("b")
    net.up("b")  # restarted: what was sent to the old process is gone
    assert net.pop(5) is None and net.stats.to_down == 1
    net.partition([["a"], ["b", "c"]])
    net.send("a", "b", "cut")
    net.send("c", "b", "ok")
    assert net.pop(5)[2] == "ok" and net.pop(5) is None and net.stats.cut == 1
    lossy = RaftNet(random.Random(3), loss=0.3)
    lossy.up("b")
    for _ in range(2000):
        lossy.send("a", "b", 0)
    assert 0.25 < lossy.stats.lost / 2000 < 0.35


def test_disk_loses_unsynced_writes_and_recovers_after_snapshot():
    d = SimDisk()
    boot = raft_mod.Raft.bootstrap_entries(["n1", "n2", "n3"])
    d.write(raft_mod.HardState(1, "n1", 0), boot, None)
    d.sync()
    d.write(raft_mod.HardState(2, "n2", 3), [_e(4, 2, b"x")], None)
    assert d.drop_unsynced() == 1  # a crash before the fsync
    rec, data = d.recover()
    assert rec.hard_state.term == 1 and rec.hard_state.vote == "n1" and len(rec.entries) == 3 and data is None
    sm = KV()
    for e in boot:
        sm.apply(e)
    meta = rm.SnapshotMeta(3, 1, sm.voters)
    d.save_snapshot(meta, sm.snapshot())
    d.compact(3)
    rec, data = d.recover()
    assert rec.snapshot == meta and rec.entries == [] and KV.restore(data).voters == ("n1", "n2", "n3")
    assert d.log.base_index == 3 and d.log.base_chain == sm.chain


def test_crash_before_sync_sends_nothing_from_that_step():
    """Persist before send, as the simulator models it: a follower crashing
    between the write and the fsync of the step that took a new entry loses the
    entry, and its acknowledgement never went out."""
    c = RaftCluster(5, [voter_name(i) for i in range(3)], delay=(0, 0))
    assert c.run_until(lambda: stable(c), 200) is not None
    ld = c.leader()
    f = next(sn for sn in c.order if sn is not ld)
    c.crash(f.name, "before_sync")
    assert f.up  # armed: strikes at its next step that has something to write
    assert c.propose(ld.name) is not None
    index = ld.core.last_index
    c.tick()
    assert not f.up and c.stats["lost_unsynced"] == 1
    assert f.disk.log.last_index < index and f.disk.pending == []
    assert ld.core.prs[f.name].match < index
    c.restart(f.name)
    assert c.run_until(lambda: stable(c) and f.applied >= index, 200) is not None
    assert not c.violations


def test_election_benchmark():
    """Ticks to a new leader after the leader crashes (5 voters, defaults): at
    least one election timeout E=8 (followers must first miss the leader), the
    median within the first timeout window [E, 2E-1] plus a pre-vote and a vote
    round; split votes make a tail (500 seeds: mean 12.8, p99 28, max 37)."""
    s = RaftSettings()
    times = [election_after_leader_crash(seed) for seed in range(30)]
    assert all(t is not None for t in times)
    assert min(times) >= s.election_ticks and max(times) <= 6 * s.election_ticks
    res = election_benchmark(40)
    assert res["failed"] == 0 and s.election_ticks <= res["p50_ticks"] <= 2 * s.election_ticks
    assert res["mean_ms"] == res["mean_ticks"] * s.tick_ms


def test_liveness_bound_and_stable_helpers():
    s = RaftSettings()
    assert liveness_bound(s) == 20 * s.election_ticks
    c = RaftCluster(1, [voter_name(i) for i in range(3)], learners=["l1"])
    assert c.run_until(lambda: stable(c), liveness_bound(s)) is not None
    assert c.nodes["l1"].core.role == "learner" and c.nodes["l1"].applied == c.leader().core.commit
