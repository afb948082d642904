"""Unit tests of the Raft core (agent.core.raft) and its messages.

Scenario-level behaviour is in the transcripts (test_raft_transcripts.py);
here: the codec's strictness, settings, the Ready/advance contract, flow
control, and a randomized safety smoke test over the in-memory harness.
"""

import random

import cbor2
import pytest

from agent.core.raft import (
    FIELD_DOCS,
    HardState,
    NotLeader,
    Raft,
    RaftSettings,
    Ready,
    ReadState,
    Recovered,
    Refused,
)
from agent.core.raft_messages import (
    MAX_APPEND_ENTRIES,
    MAX_DATA,
    Append,
    AppendResp,
    ConfChange,
    Entry,
    EntryKind,
    Forward,
    ForwardRefused,
    InstallSnapshot,
    PreVote,
    PreVoteResp,
    ReadIndexReq,
    ReadIndexResp,
    SnapshotMeta,
    TimeoutNow,
    Vote,
    VoteResp,
    decode,
)
from agent.messages import BadMessage
from agent.sim.raft_harness import Harness
from agent.wire import loads_strict


def _boot(ids):
    return Recovered(HardState(), None, Raft.bootstrap_entries(ids))


def _node(nid="a", ids=("a", "b", "c"), seed=1, **kw):
    return Raft(nid, RaftSettings(**kw), random.Random(seed), _boot(list(ids)))


def _cluster(n=3, **kw) -> Harness:
    """n voters "1".."n", node 1 elected and everything committed."""
    h = Harness()
    h.add_nodes(n, voters=[str(i) for i in range(1, n + 1)], settings=RaftSettings(**kw))
    h.nodes["1"].raft.campaign()
    h.stabilize(quiet=True)
    assert h.nodes["1"].raft.role == "leader"
    return h


def _roundtrip(m):
    return decode(loads_strict(cbor2.dumps(m.to_wire()), max_depth=4))


# ------------------------------------------------------------------ messages

E1 = Entry(5, 2, EntryKind.NORMAL, b"cmd")
E2 = Entry(6, 2, EntryKind.CONF, ConfChange("add", "pi-4").encode())
ALL = [
    PreVote("a", "b", 3, 10, 2, False),
    PreVoteResp("b", "a", 3, True),
    Vote("a", "b", 3, 10, 2, True),
    VoteResp("b", "a", 3, False),
    Append("a", "b", 3, 4, 2, (E1, E2), 5, b"\x01"),
    Append("a", "b", 3, 4, 2, (), 4),
    AppendResp("b", "a", 3, 6, True, 4, b"\x07", 2),
    InstallSnapshot("a", "b", 3, SnapshotMeta(9, 2, ("a", "b", "c")), None),
    InstallSnapshot("a", "b", 3, SnapshotMeta(9, 2, ("a",)), b"state"),
    TimeoutNow("a", "b", 3),
    Forward("b", "a", 3, b"x" * MAX_DATA),
    ForwardRefused("a", "b", 3, "no"),
    ReadIndexReq("b", "a", 3, b"ctx"),
    ReadIndexResp("a", "b", 3, b"ctx", 12, False),
]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_every_message_survives_the_strict_codec(msg):
    assert _roundtrip(msg) == msg


def test_entry_size_is_the_exact_encoded_size():
    for e in [E1, E2, Entry(1, 1, EntryKind.NORMAL, b""), Entry(2**40, 70000, EntryKind.NORMAL, b"x" * 4096),
              Entry(23, 24, EntryKind.NORMAL, b"y" * 23), Entry(255, 256, EntryKind.NORMAL, b"z" * 24)]:
        assert e.size == len(cbor2.dumps(e.to_wire()))


def _bad(wire, reason=None):
    with pytest.raises(BadMessage) as ei:
        decode(wire)
    if reason:
        assert ei.value.reason == reason


def test_decode_refuses_malformed_messages():
    good = Append("a", "b", 3, 4, 2, (E1,), 5).to_wire()
    _bad("not a list")
    _bad([])
    _bad([99, "a", "b", 1], "unknown_type")
    _bad(good[:-1])  # wrong arity
    _bad([4, "a", "b", -1, 4, 2, [], 5, b""])  # negative term
    _bad([4, "a", "b", True, 4, 2, [], 5, b""])  # bool is not an int
    _bad([4, "a" * 65, "b", 1, 4, 2, [], 5, b""], "bad_node_id")
    _bad([4, "a", "b", 3, 4, 2, [[5, 2, 0, b"x" * (MAX_DATA + 1)]], 5, b""])  # oversized data
    _bad([4, "a", "b", 3, 4, 2, [[6, 2, 0, b"x"]], 5, b""])  # not contiguous with prev
    _bad([4, "a", "b", 3, 4, 2, [[5, 4, 0, b"x"]], 5, b""])  # entry newer than the message
    _bad([4, "a", "b", 3, 4, 2, [[5, 1, 0, b"x"]], 5, b""])  # entry older than prev
    _bad([4, "a", "b", 3, 4, 2, [[5, 2, 2, b"x"]], 5, b""])  # unknown kind
    _bad([4, "a", "b", 3, 4, 2, [[5, 2, 1, b"junk"]], 5, b""])  # CONF data that is no ConfChange
    _bad([4, "a", "b", 3, 4, 2, [], 5, b"c" * 65])  # ctx too long
    many = [[5 + i, 2, 0, b""] for i in range(MAX_APPEND_ENTRIES + 1)]
    _bad([4, "a", "b", 3, 4, 2, many, 5, b""], "too_many")
    _bad([9, "a", "b", 3, "r" * 201])  # reason too long
    _bad([6, "a", "b", 3, [9, 2, ["a", "a"]]])  # duplicate voter
    _bad([6, "a", "b", 3, [9, 2, ["a"]], None])  # data present but not bytes
    _bad([0, "a", "b", 3, 10, 2, 1])  # force must be a bool
    with pytest.raises(BadMessage):
        ConfChange.decode(cbor2.dumps(["promote", "a"]))


def test_an_append_of_one_largest_entry_fits_a_raft_datagram():
    from agent.consensus import RAFT_MAX_PACKET
    from agent.core.raft_messages import MAX_DATA, MAX_INDEX, Append, Entry, EntryKind, Forward
    from agent.core.statemachine import MAX_COMMAND

    nid = "n" * 64
    entry = Entry(MAX_INDEX, MAX_INDEX, EntryKind.NORMAL, b"x" * MAX_DATA)
    append = Append(nid, nid.upper(), MAX_INDEX, MAX_INDEX, MAX_INDEX, (entry,), MAX_INDEX, b"c" * 64)
    forward = Forward(nid, nid.upper(), MAX_INDEX, b"x" * MAX_DATA)
    for msg in (append, forward):
        assert len(cbor2.dumps([msg.to_wire()])) <= RAFT_MAX_PACKET, type(msg).__name__
    assert MAX_COMMAND <= MAX_DATA, "every state-machine command is a proposal the core accepts"


def test_full_append_fits_max_bytes():
    """An Append of entries up to max_append_bytes fits a 4 KB datagram."""
    h = _cluster(3)
    r = h.nodes["1"].raft
    for i in range(200):
        r.propose(b"%05d" % i + b"x" * 40)
    rd = r.ready()
    appends = [m for m in rd.messages if type(m) is Append and m.entries]
    assert appends
    for m in appends:
        assert len(m.entries) == 1 or sum(e.size for e in m.entries) <= 3000
        assert len(cbor2.dumps(m.to_wire())) < 4096


# ------------------------------------------------------------------ settings


def test_settings_defaults_are_valid_and_documented():
    s = RaftSettings()
    assert s.problems() == []
    assert set(FIELD_DOCS) == {f for f in s.__dataclass_fields__}
    assert s.transfer_timeout == s.election_ticks
    for name, (unit, lo, hi, meaning) in FIELD_DOCS.items():
        assert lo <= hi and meaning and unit


def test_settings_problems_name_field_value_and_range():
    bad = RaftSettings(election_ticks=1, max_inflight=0, pre_vote="yes")
    names = {p[0] for p in bad.problems()}
    assert names == {"election_ticks", "max_inflight", "pre_vote"}
    assert RaftSettings(heartbeat_ticks=8, election_ticks=8).problems()[0][0] == "heartbeat_ticks"
    with pytest.raises(ValueError):
        _node(election_ticks=1)


# ------------------------------------------------------------------ elections


def test_bootstrap_entries_are_identical_everywhere():
    a = Raft.bootstrap_entries(["c", "a", "b", "a"])
    assert [ConfChange.decode(e.data).node for e in a] == ["a", "b", "c"]
    assert [(e.index, e.term, e.kind) for e in a] == [(1, 1, EntryKind.CONF), (2, 1, EntryKind.CONF), (3, 1, EntryKind.CONF)]
    assert a == Raft.bootstrap_entries(["b", "c", "a"])
    with pytest.raises(ValueError):
        Raft.bootstrap_entries([])


def test_randomized_election_timeout_in_e_to_2e_minus_1():
    seen = set()
    for seed in range(200):
        r = _node(seed=seed, election_ticks=5)
        ticks = 0
        while r.role == "follower":
            r.tick()
            ticks += 1
        assert r.role == "precandidate"
        seen.add(ticks)
    assert seen == {5, 6, 7, 8, 9}


def test_single_voter_elects_itself_at_once_and_commits_without_messages():
    r = Raft("solo", RaftSettings(), random.Random(1), _boot(["solo"]))
    r.campaign()
    assert r.role == "leader" and r.term == 2
    rd = r.ready()
    assert rd.messages == [] and [e.data for e in rd.entries] == [b""]
    assert rd.committed == [], "nothing commits before our own log is durable"
    r.advance(rd)
    rd = r.ready()
    assert [e.index for e in rd.committed] == [1, 2] and rd.hard_state.commit == 2
    r.advance(rd)
    i = r.propose(b"x")
    rd = r.ready()
    r.advance(rd)
    rd = r.ready()
    assert [e.index for e in rd.committed] == [i] and rd.messages == []


def test_single_voter_campaigns_on_first_tick():
    r = Raft("solo", RaftSettings(), random.Random(1), _boot(["solo"]))
    r.tick()
    assert r.role == "leader"


def test_nodes_outside_the_config_never_campaign():
    r = Raft("new", RaftSettings(), random.Random(1), Recovered(HardState(), None, []))
    assert r.role == "learner"
    for _ in range(100):
        r.tick()
    r.campaign()
    assert r.role == "learner" and not r.has_ready()


def test_vote_is_persisted_before_the_answer_is_sent():
    a = _node("a")
    b = _node("b")
    a.campaign()
    for m in a.ready().messages:
        if m.to == "b":
            b.step(m)
    rd = b.ready()
    assert rd.messages and rd.hard_state is None, "a pre-vote persists nothing"
    c = _node("c")
    c.step(Vote("a", "c", 2, 3, 1))
    rd = c.ready()
    assert rd.hard_state == HardState(2, "a", 0) and isinstance(rd.messages[0], VoteResp)


def test_stale_leader_learns_the_new_term_from_a_follower():
    b = _node("b")
    b.step(Append("c", "b", 5, 3, 1, (), 0))
    b.ready()
    b.step(Append("a", "b", 2, 3, 1, (), 0))
    (resp,) = b.ready().messages
    assert type(resp) is AppendResp and resp.term == 5 and resp.to == "a"


# ------------------------------------------------------------------ proposals


def test_propose_and_forward_errors():
    h = _cluster(3)
    f = h.nodes["2"].raft
    with pytest.raises(NotLeader) as ei:
        f.propose(b"x")
    assert ei.value.leader == "1" and ei.value.term == 2 and "1" in ei.value.reason
    with pytest.raises(ValueError):
        h.nodes["1"].raft.propose(b"x" * (MAX_DATA + 1))
    with pytest.raises(ValueError):
        h.nodes["1"].raft.propose("text")
    lone = _node("a")
    with pytest.raises(NotLeader) as ei:
        lone.forward(b"x")
    assert ei.value.leader is None


def test_forward_from_follower_is_appended_by_the_leader():
    h = _cluster(3)
    h.nodes["3"].raft.forward(b"hello")
    h.stabilize(quiet=True)
    assert h.nodes["1"].applied[-1][1] == b"hello"
    assert h.nodes["2"].applied[-1][1] == b"hello"


def test_propose_conf_refusals():
    h = _cluster(3)
    r = h.nodes["1"].raft
    with pytest.raises(Refused):
        r.propose_conf(ConfChange("add", "2"))
    with pytest.raises(Refused):
        r.propose_conf(ConfChange("remove", "9"))
    r.propose_conf(ConfChange("add", "9"))
    with pytest.raises(Refused, match="not committed"):
        r.propose_conf(ConfChange("remove", "2"))
    with pytest.raises(NotLeader):
        h.nodes["2"].raft.propose_conf(ConfChange("add", "8"))
    with pytest.raises(ValueError):
        r.propose_conf(ConfChange("swap", "8"))


def test_config_takes_effect_on_append_and_is_recomputed_on_truncation():
    b = _node("b")
    conf = Entry(4, 2, EntryKind.CONF, ConfChange("add", "d").encode())
    b.step(Append("a", "b", 2, 3, 1, (conf,), 3))
    assert b.voters == ("a", "b", "c", "d")
    # A new leader of term 3 never had that entry: it is overwritten, the config reverts.
    b.step(Append("c", "b", 3, 3, 1, (Entry(4, 3, EntryKind.NORMAL, b""),), 3))
    assert b.voters == ("a", "b", "c")
    assert b.voters_at(3) == ("a", "b", "c") and b.voters_at(2) == ("a", "b")


def test_removed_voter_stops_counting_and_removed_leader_steps_down():
    h = _cluster(3)
    r = h.nodes["1"].raft
    r.propose_conf(ConfChange("remove", "1"))
    assert r.role == "leader" and r.voters == ("2", "3")
    h.stabilize(quiet=True)
    assert r.role == "learner"
    leaders = [n for n in ("2", "3") if h.nodes[n].raft.role == "leader"]
    assert len(leaders) == 1, "the handover with TimeoutNow elected a successor at once"


def test_new_voter_with_empty_log_catches_up_and_can_lead():
    h = _cluster(3)
    h.add_nodes(1)  # "4", empty log: not a voter anywhere yet
    assert h.nodes["4"].raft.role == "learner"
    h.nodes["1"].raft.propose_conf(ConfChange("add", "4"))
    h.stabilize(quiet=True)
    r4 = h.nodes["4"].raft
    assert r4.voters == ("1", "2", "3", "4") and r4.role == "follower"
    assert r4.commit == h.nodes["1"].raft.commit
    h.nodes["1"].raft.transfer_leadership("4")
    h.stabilize(quiet=True)
    assert r4.role == "leader"
    r4.propose(b"from 4")
    h.stabilize(quiet=True)
    assert all(n.applied[-1][1] == b"from 4" for n in h.nodes.values())


# ---------------------------------------------------------- ready and advance


def test_committed_never_runs_ahead_of_the_local_log():
    b = _node("b")
    ents = tuple(Entry(i, 2, EntryKind.NORMAL, b"%d" % i) for i in range(4, 8))
    b.step(Append("a", "b", 2, 3, 1, ents, 7))
    rd = b.ready()
    assert [e.index for e in rd.entries] == [4, 5, 6, 7]
    assert rd.hard_state.commit == 7
    assert [e.index for e in rd.committed] == [1, 2, 3], "4..7 are not durable before advance"
    b.advance(rd)
    assert [e.index for e in b.ready().committed] == [4, 5, 6, 7]


def test_truncated_entries_are_emitted_again():
    b = _node("b")
    b.step(Append("a", "b", 2, 3, 1, (Entry(4, 2, EntryKind.NORMAL, b"x"), Entry(5, 2, EntryKind.NORMAL, b"y")), 3))
    rd = b.ready()
    b.step(Append("c", "b", 3, 4, 2, (Entry(5, 3, EntryKind.NORMAL, b"z"),), 3))
    b.advance(rd)  # the driver persisted 4 and 5(term 2); 5 was overwritten meanwhile
    assert b.log.stable == 4
    rd = b.ready()
    assert [(e.index, e.term) for e in rd.entries] == [(5, 3)]


def test_has_ready_and_empty_ready():
    h = _cluster(3)
    r = h.nodes["2"].raft
    assert not r.has_ready()
    assert r.ready() == Ready()


def test_restart_recovers_term_vote_commit_and_log():
    h = _cluster(3)
    h.nodes["1"].raft.propose(b"a")
    h.stabilize(quiet=True)
    before = h.nodes["2"].raft
    h.restart("2")
    r = h.nodes["2"].raft
    assert (r.term, r.vote, r.commit, r.last_index) == (before.term, before.vote, before.commit, before.last_index)
    assert r.role == "follower" and r.leader is None
    h.stabilize(quiet=True)
    assert [d for _, d in h.nodes["2"].applied] == [b"a"]


def test_applied_to_checks_its_argument():
    h = _cluster(3)
    r = h.nodes["2"].raft
    with pytest.raises(ValueError):
        r.applied_to(r.commit + 5)


# ------------------------------------------------------------- flow control


def test_probe_sends_one_append_until_answered():
    h = _cluster(3, max_append_entries=2)
    r = h.nodes["1"].raft
    pr = r.prs["3"]
    pr.become_probe()
    for i in range(10):
        r.propose(b"%d" % i)
    msgs = [m for m in r.ready().messages if m.to == "3"]
    assert len(msgs) == 1 and len(msgs[0].entries) == 2


def test_replicate_pipelines_up_to_max_inflight():
    h = _cluster(3, max_append_entries=2, max_inflight=3)
    r = h.nodes["1"].raft
    for i in range(20):
        r.propose(b"%d" % i)
    msgs = [m for m in r.ready().messages if m.to == "3" and type(m) is Append]
    assert len(msgs) == 3 and all(len(m.entries) == 2 for m in msgs)
    assert r.prs["3"].state == "replicate"


def test_fast_backtracking_needs_one_round_per_term():
    """A follower holding 50 uncommitted entries of an old term is repaired
    with one rejection, not fifty."""
    h = _cluster(3)
    old = h.nodes["1"]
    h.cuts = {frozenset(("1", "2")), frozenset(("1", "3"))}
    for i in range(50):
        old.raft.propose(b"old%d" % i)
    h.process_ready("1")
    for n in ("2", "3"):
        for _ in range(20):
            h.nodes[n].raft.tick()
    h.stabilize(["2", "3"], quiet=True)
    h.nodes["2"].raft.campaign()
    h.stabilize(["2", "3"], quiet=True)
    a, b = ("2", "3") if h.nodes["2"].raft.role == "leader" else ("3", "2")
    new = h.nodes[a].raft
    for i in range(5):
        new.propose(b"new%d" % i)
    h.stabilize(["2", "3"], quiet=True)
    new.transfer_leadership(b)  # the next leader's probe starts past the old suffix
    h.stabilize(["2", "3"], quiet=True)
    assert h.nodes[b].raft.role == "leader"
    h.cuts.clear()
    h.nodes[b].raft.tick()
    rejections = 0
    for _ in range(50):
        for n in ("1", "2", "3"):
            h.process_ready(n)
        msgs, h.msgs = h.msgs, []
        rejections += sum(1 for m in msgs if type(m) is AppendResp and m.reject)
        for m in msgs:
            h.deliver(m)
        if not msgs:
            break
    assert rejections == 1
    h.check_log_matching()
    assert h.nodes["1"].raft.last_index == h.nodes[b].raft.last_index


def test_lost_append_in_replicate_is_resent_after_a_heartbeat():
    h = _cluster(3)
    r = h.nodes["1"].raft
    r.propose(b"lost")
    h.process_ready("1")
    h.msgs = [m for m in h.msgs if m.to != "3"]
    h.stabilize(quiet=True)
    assert h.nodes["3"].raft.last_index < r.last_index
    r.tick()
    h.stabilize(quiet=True)
    assert h.nodes["3"].raft.last_index == r.last_index
    assert [d for _, d in h.nodes["3"].applied] == [b"lost"]


def test_lost_appends_are_resent_when_heartbeat_answers_lag_several_rounds():
    """The answer to a heartbeat may come back after the leader has sent later
    rounds (a slow link, a busy follower): the lost-append check must still fire."""
    h = _cluster(3)
    r = h.nodes["1"].raft
    r.propose(b"lost")
    h.process_ready("1")
    h.msgs = [m for m in h.msgs if m.to != "3"]
    h.stabilize(quiet=True)
    held = []
    for _ in range(4):  # each heartbeat answer from 3 arrives only after the next round left
        r.tick()
        h.process_ready("1")
        for m in [m for m in h.msgs if m.to == "3"]:
            h.deliver(m)
        h.msgs = [m for m in h.msgs if m.to != "3"]
        h.process_ready("3")
        answers = [m for m in h.msgs if m.frm == "3"]
        h.msgs = [m for m in h.msgs if m.frm != "3"]
        for m in held:
            h.deliver(m)
        held = answers
        h.stabilize(quiet=True)
    assert h.nodes["3"].raft.last_index == r.last_index
    assert [d for _, d in h.nodes["3"].applied] == [b"lost"]


def test_snapshot_progress_times_out_and_retries():
    h = _cluster(3)
    r = h.nodes["1"].raft
    h.cuts = {frozenset(("1", "3"))}
    for i in range(5):
        r.propose(b"%d" % i)
    h.stabilize(quiet=True)
    node = h.nodes["1"]
    meta = SnapshotMeta(r.commit, r.term_at(r.commit), r.voters_at(r.commit))
    node.store.snapshot = (meta, node.snapshot_data(r.commit))
    r.compact(meta)
    h.cuts.clear()
    sent = 0
    for _ in range(3 * r.s.election_ticks):
        r.tick()
        for _ in range(10):
            for n in ("1", "2", "3"):
                h.process_ready(n)
            msgs, h.msgs = h.msgs, []
            for m in msgs:
                if type(m) is InstallSnapshot:
                    sent += 1
                    assert r.prs["3"].state == "snapshot"
                    if sent == 1:
                        continue  # the first one is lost
                h.deliver(m)
    assert sent == 2, "resent once after election_ticks, then never again"
    assert h.nodes["3"].raft.commit == r.commit
    assert [d for _, d in h.nodes["3"].applied] == [b"%d" % i for i in range(5)]


def test_compact_checks_its_arguments():
    h = _cluster(3)
    r = h.nodes["1"].raft
    with pytest.raises(ValueError):
        r.compact(SnapshotMeta(r.commit + 1, 2, r.voters))
    with pytest.raises(ValueError):
        r.compact(SnapshotMeta(r.commit, 1, r.voters))
    with pytest.raises(ValueError):
        r.compact(SnapshotMeta(r.commit, 2, ("1",)))
    r.compact(SnapshotMeta(r.commit, 2, r.voters))
    assert r.status()["snapshot_index"] == r.commit


# ------------------------------------------------------------------ reads


def test_read_index_fails_when_leadership_is_lost():
    h = _cluster(3)
    r = h.nodes["1"].raft
    r.read_index(b"q")
    h.cuts = {frozenset(("1", "2")), frozenset(("1", "3"))}
    h.process_ready("1")
    for _ in range(2 * r.s.election_ticks):
        r.tick()
    assert r.role == "follower"
    rd = r.ready()
    assert rd.read_states == [ReadState(b"q", -1, "1 lost the leadership in term 2")]


def test_read_index_ctx_bound():
    with pytest.raises(ValueError):
        _node().read_index(b"x" * 65)


# ------------------------------------------------------------------ views


def test_writable_reasons_are_one_line_naming_leader_and_term():
    h = _cluster(3)
    assert h.nodes["1"].raft.writable() == (True, "")
    assert h.nodes["2"].raft.writable() == (True, "")
    h.cuts = {frozenset(("1", "2")), frozenset(("1", "3"))}
    f = h.nodes["2"].raft
    for _ in range(f.s.election_ticks + 1):
        f.tick()
    ok, why = f.writable()
    assert not ok and "\n" not in why and "last leader 1" in why and "term 2" in why
    lead = h.nodes["1"].raft
    for _ in range(2 * lead.s.election_ticks):
        lead.tick()
        h.stabilize(quiet=True)
    ok, why = lead.writable()
    assert not ok and "last leader 1" in why and "term 2" in why and "\n" not in why


def test_status_of_leader_lists_progress():
    h = _cluster(3)
    st = h.nodes["1"].raft.status()
    for key in ("role", "term", "leader", "commit", "applied", "voters", "last_index", "snapshot_index",
                "lead_transferee", "progress"):
        assert key in st
    assert st["progress"]["2"] == {"match": 4, "next": 5, "state": "replicate", "learner": False}
    assert "progress" not in h.nodes["2"].raft.status()


def test_misaddressed_messages_are_counted_and_ignored():
    r = _node("a")
    r.step(TimeoutNow("b", "zz", 1))
    assert r.counters.get("raft_misaddressed") == 1 and not r.has_ready()


# ----------------------------------------------------- randomized safety smoke


def _random_run(seed: int, steps: int = 1500) -> Harness:
    """Random ticks, deliveries (reordered, dropped, duplicated), partitions,
    restarts, compactions, transfers, conf changes and reads among 3-5
    voters (and sometimes a learner), with election safety checked at every step and log matching and
    state-machine safety every few steps; then heal and require a leader."""
    rng = random.Random(seed)
    n = rng.choice([3, 4, 5])
    E = rng.choice([3, 4, 6])
    s = RaftSettings(election_ticks=E, learner_heartbeat_ticks=E - 1, max_inflight=rng.choice([1, 2, 8]),
                     max_append_entries=rng.choice([1, 3, 64]), pre_vote=rng.random() < 0.7,
                     check_quorum=rng.random() < 0.7)
    h = Harness(codec=rng.random() < 0.3)
    ids = [str(i) for i in range(1, n + 1)]
    h.add_nodes(n, voters=ids, settings=s, seed=seed)
    if rng.random() < 0.3:  # a learner with an empty log, which conf changes may promote
        ids += h.add_nodes(1, settings=s, seed=seed)
        for node in h.nodes.values():
            node.raft.set_learners(set(ids))
    leaders: dict[int, str] = {}
    k = 0
    for step in range(steps):
        a = rng.random()
        nid = rng.choice(ids)
        r = h.nodes[nid].raft
        if a < 0.06:
            for x in ids:  # time passes for everyone
                h.nodes[x].raft.tick()
        elif a < 0.4:
            h.process_ready(nid)
        elif a < 0.75:
            if h.msgs:
                m = h.msgs.pop(rng.randrange(len(h.msgs)) if rng.random() < 0.3 else 0)
                if rng.random() >= 0.1 and not h.is_cut(m.frm, m.to):
                    h.deliver(m)
                if rng.random() < 0.03:
                    h.msgs.append(m)
        elif a < 0.85:
            if r.role == "leader":
                k += 1
                try:
                    r.propose(b"%d-%d" % (seed, k))
                except Refused:
                    pass
        elif a < 0.87:
            h.cuts.clear()
            if rng.random() < 0.5:
                h.cuts = {frozenset((nid, o)) for o in ids if o != nid}
        elif a < 0.88:
            h.restart(nid, seed)
        elif a < 0.89:
            idx = r.applied
            if idx > r.log.offset:
                node = h.nodes[nid]
                meta = SnapshotMeta(idx, r.term_at(idx), r.voters_at(idx))
                node.store.snapshot = (meta, node.snapshot_data(idx))
                node.store.entries = [e for e in node.store.entries if e.index > idx]
                r.compact(meta)
        elif a < 0.9:
            if r.role == "leader":
                try:
                    r.transfer_leadership(None)
                except Refused:
                    pass
        elif a < 0.91:
            if r.role == "leader":
                target = rng.choice(ids)
                op = "remove" if target in r.voters and len(r.voters) > 2 else "add"
                if not (op == "add" and target in r.voters):
                    try:
                        r.propose_conf(ConfChange(op, target))
                    except Refused:
                        pass
        elif a < 0.92:
            r.read_index(b"r%d" % step)
        for x in ids:
            rx = h.nodes[x].raft
            if rx.role == "leader":
                assert leaders.setdefault(rx.term, x) == x, f"seed {seed}: two leaders in term {rx.term}"
        if step % 25 == 0:
            h.check_log_matching()
            h.check_applied()
    h.check_log_matching()
    h.check_applied()
    h.cuts.clear()
    for _ in range(300):
        for x in ids:
            h.nodes[x].raft.tick()
        h.stabilize(quiet=True)
        if any(h.nodes[x].raft.role == "leader" for x in ids):
            break
    else:
        raise AssertionError(f"seed {seed}: no leader after healing")
    h.check_log_matching()
    h.check_applied()
    return h


@pytest.mark.parametrize("chunk", range(4))
def test_randomized_safety_smoke(chunk):
    for seed in range(chunk * 100, chunk * 100 + 100):
        _random_run(seed)


def test_randomized_runs_make_progress():
    """The smoke test is not vacuous: most runs commit proposals despite the chaos."""
    applied = [max(len(n.applied) for n in _random_run(seed).nodes.values()) for seed in range(20)]
    assert sum(a >= 3 for a in applied) >= 12, applied
