"""Voter autopilot rules, one at a time, and a property test over random mesh histories."""

import collections
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.raft_messages import ConfChange
from agent.core.voters import (
    FIELD_DOCS,
    MAX_VOTERS,
    Autopilot,
    Decision,
    MemberView,
    VoterSettings,
    bootstrap_choice,
    quorum,
    target_size,
)

S = VoterSettings()
T0 = 1_000_000  # a "now" well after everybody's since_ms=0
COMMIT = 500


def up(headroom=1.0, since=0, eligible=True):
    return MemberView(alive=True, since_ms=since, headroom=headroom, eligible=eligible)


def suspect(headroom=1.0, since=0):
    return MemberView(alive=True, suspect=True, since_ms=since, headroom=headroom)


def down(headroom=1.0):
    return MemberView(alive=False, headroom=headroom)


class Leader:
    """A leader's autopilot plus the configuration it steers (changes applied at once)."""

    def __init__(self, voters=("n0",), leader="n0", term=1, s=S):
        self.ap = Autopilot(s)
        self.voters = list(voters)
        self.leader = leader
        self.term = term

    def decide(self, now, members, match=None, commit=COMMIT) -> Decision:
        if match is None:
            match = {node: commit for node in members}
        return self.ap.decide(now, tuple(self.voters), self.leader, match, commit, members, term=self.term)

    def step(self, now, members, **kw) -> Decision:
        d = self.decide(now, members, **kw)
        c = d.change
        if c is not None:
            if c.op == "add":
                assert c.node not in self.voters
                self.voters.append(c.node)
            else:
                self.voters.remove(c.node)
        return d

    def run(self, now, members, steps=20, **kw) -> list[ConfChange]:
        """Step until nothing changes; the list of changes made."""
        out = []
        for _ in range(steps):
            d = self.step(now, members, **kw)
            if d.change is None:
                return out
            out.append(d.change)
        raise AssertionError(f"no fixed point after {steps} steps: {out}")


def add(node):
    return ConfChange("add", node)


def remove(node):
    return ConfChange("remove", node)


# ---------------------------------------------------------------- settings and small parts


def test_settings_defaults_are_valid_and_documented():
    assert S.problems() == []
    assert (S.stabilization_ms, S.max_lag_entries, S.dead_voter_ms) == (10_000, 1000, 60_000)
    for name, (unit, lo, hi, meaning) in FIELD_DOCS.items():
        assert lo <= getattr(S, name) <= hi and unit and meaning


def test_settings_problems_name_each_bad_field():
    bad = VoterSettings(stabilization_ms=-1, max_lag_entries=True, dead_voter_ms=10**12)
    assert [p[0] for p in bad.problems()] == ["stabilization_ms", "max_lag_entries", "dead_voter_ms"]
    assert "integer from 0 to" in bad.problems()[0][2]
    inconsistent = VoterSettings(stabilization_ms=120_000, dead_voter_ms=60_000)
    assert inconsistent.problems() == [("dead_voter_ms", 60_000, "at least stabilization_ms (120000)")]


def test_target_is_odd_and_at_most_five():
    assert [target_size(k) for k in range(9)] == [1, 1, 1, 3, 3, 5, 5, 5, 5]
    assert [quorum(n) for n in range(1, 7)] == [1, 2, 2, 3, 3, 4]


def test_member_view_validates():
    with pytest.raises(ValueError):
        MemberView(alive=False, suspect=True)
    with pytest.raises(ValueError):
        MemberView(alive=1)
    with pytest.raises(ValueError):
        MemberView(alive=True, headroom=float("nan"))
    with pytest.raises(ValueError):
        MemberView(alive=True, since_ms=1.5)
    assert up().healthy and not suspect().healthy and not down().healthy


def test_bad_arguments_are_a_caller_bug():
    with pytest.raises(ValueError):
        Leader(voters=("n0", "n1", "n1")).decide(T0, {"n0": up()})
    ap = Autopilot()
    with pytest.raises(ValueError):
        ap.decide(T0, "n0", ("n0",), {}, 0, {}, term=1)  # voters and leader swapped
    with pytest.raises(TypeError):
        ap.decide(T0, ("n0",), "n0", {}, 0, {})  # the term is required


# ---------------------------------------------------------------- growing


def test_stable_mesh_of_seven_gets_five_voters_one_at_a_time_best_first():
    members = {f"n{i}": up(headroom=i / 10) for i in range(7)}
    ld = Leader()
    changes = []
    for _ in range(10):
        before = set(ld.voters)
        d = ld.step(T0, members)
        assert len(set(ld.voters) ^ before) <= 1, "one change per call"
        if d.change is None:
            break
        changes.append(d.change)
        assert d.change.node in d.reason and "grow" in d.reason
    assert changes == [add("n6"), add("n5"), add("n4"), add("n3")], "highest headroom first"
    assert len(ld.voters) == 5
    d = ld.decide(T0, members)
    assert d.change is None and d.target == 5 and d.reason.startswith("steady")


def test_three_members_give_three_voters_and_two_give_one():
    ld = Leader()
    assert ld.run(T0, {"n0": up(), "n1": up(), "n2": up()}) == [add("n1"), add("n2")]
    ld = Leader()
    d = ld.decide(T0, {"n0": up(), "n1": up()})
    assert d.change is None and d.target == 1


def test_no_member_is_promoted_before_stabilization():
    since = T0 - S.stabilization_ms + 1
    members = {"n0": up(), "n1": up(), "n2": up(since=since)}
    ld = Leader(voters=("n0", "n1"))
    d = ld.decide(T0, members)
    assert d.change is None and "n2 healthy for 9.9 s of 10.0 s" in d.reason
    assert ld.decide(T0 + 1, members).change == add("n2")


def test_flapping_member_is_never_promoted():
    ld = Leader(voters=("n0", "n1"))
    now = T0
    since = now
    for i in range(200):
        now += 1000
        if i % 4 == 3:
            view = suspect(since=since)  # suspected every fourth second, then refutes
        else:
            if i % 4 == 0:
                since = now  # healthy again from now on
            view = up(since=since)
        assert ld.step(now, {"n0": up(), "n1": up(), "n2": view}).change is None
    # Then it settles down: promoted once it has been healthy for stabilization_ms.
    since = now
    for t in range(now, now + S.stabilization_ms, 1000):
        assert ld.step(t, {"n0": up(), "n1": up(), "n2": up(since=since)}).change is None
    assert ld.step(since + S.stabilization_ms, {"n0": up(), "n1": up(), "n2": up(since=since)}).change == add("n2")


def test_lagging_or_unreplicated_member_is_not_promoted():
    members = {"n0": up(), "n1": up(), "n2": up(headroom=9)}
    ld = Leader(voters=("n0", "n1"))
    lagging = {"n0": COMMIT, "n1": COMMIT, "n2": COMMIT - S.max_lag_entries - 1}
    d = ld.decide(T0, members, match=lagging)
    assert d.change is None and "n2 lags 1001 entries" in d.reason
    d = ld.decide(T0, members, match={"n0": COMMIT, "n1": COMMIT})
    assert d.change is None and "not replicated" in d.reason
    caught_up = dict(lagging, n2=COMMIT - S.max_lag_entries)
    assert ld.decide(T0, members, match=caught_up).change == add("n2")


def test_a_lagging_best_member_gives_way_to_the_next():
    members = {"n0": up(), "n1": up(), "n2": up(headroom=9), "n3": up(headroom=2)}
    match = {"n0": 5000, "n1": 5000, "n2": 0, "n3": 5000}
    assert Leader(voters=("n0", "n1")).decide(T0, members, match=match, commit=5000).change == add("n3")


def test_ineligible_member_is_never_promoted():
    members = {"n0": up(), "n1": up(), "n2": up(headroom=9, eligible=False)}
    d = Leader(voters=("n0",)).decide(T0, members)
    assert d.change is None and d.target == 1


def test_choice_is_deterministic_ties_go_to_the_smallest_id():
    ids = [f"pi-{c}" for c in "edcbaf"]
    for seed in range(5):
        random.Random(seed).shuffle(ids)
        members = {node: up(headroom=0.5) for node in ids}
        members["pi-z"] = up(headroom=0.5)
        ld = Leader(voters=("pi-z",), leader="pi-z")
        assert ld.run(T0, members) == [add("pi-a"), add("pi-b"), add("pi-c"), add("pi-d")]
    # Same inputs, two instances: same decision and same words.
    members = {f"n{i}": up(headroom=i % 3) for i in range(6)}
    a, b = Leader(), Leader()
    assert a.decide(T0, members) == b.decide(T0, members)


# ---------------------------------------------------------------- dead voters


def test_dead_voter_is_replaced_only_after_dead_voter_ms_add_then_remove():
    members = {"n0": up(), "n1": up(), "n2": down(), "n3": up(headroom=0.1)}
    ld = Leader(voters=("n0", "n1", "n2"))
    t = T0
    while t < T0 + S.dead_voter_ms:
        d = ld.step(t, members)
        assert d.change is None, t
        assert "n2 dead for" in d.reason
        t += 5000
    d = ld.step(T0 + S.dead_voter_ms, members)
    assert d.change == add("n3") and "replacement for n2" in d.reason
    d = ld.step(T0 + S.dead_voter_ms, members)
    assert d.change == remove("n2") and "dead for 60.0 s" in d.reason
    assert sorted(ld.voters) == ["n0", "n1", "n3"]
    assert ld.step(T0 + S.dead_voter_ms, members).change is None


def test_dead_voter_in_a_full_configuration_is_removed_before_its_replacement_is_added():
    members = {f"n{i}": up() for i in range(6)}
    members["n4"] = down()
    ld = Leader(voters=("n0", "n1", "n2", "n3", "n4"))
    assert ld.step(T0, members).change is None
    changes = ld.run(T0 + S.dead_voter_ms, members)
    assert changes == [remove("n4"), add("n5")], "never more than five voters"


def test_dead_voter_without_replacement_is_removed_and_two_never_become_one():
    members = {"n0": up(), "n1": up(), "n2": down()}
    ld = Leader(voters=("n0", "n1", "n2"))
    ld.step(T0, members)
    assert ld.run(T0 + S.dead_voter_ms, members) == [remove("n2")]
    d = ld.decide(T0 + 10 * S.dead_voter_ms, members)
    assert d.change is None and "2-voter" in d.reason and ld.voters == ["n0", "n1"]


def test_voter_missing_from_the_view_counts_as_dead():
    members = {"n0": up(), "n1": up(), "n3": up()}
    ld = Leader(voters=("n0", "n1", "n2"))
    assert ld.step(T0, members).change is None
    assert ld.run(T0 + S.dead_voter_ms, members) == [add("n3"), remove("n2")]


def test_voter_back_alive_restarts_its_dead_clock():
    ld = Leader(voters=("n0", "n1", "n2"))
    extra = {"n3": up()}
    dead = {"n0": up(), "n1": up(), "n2": down(), **extra}
    back = {"n0": up(), "n1": up(), "n2": up(), **extra}
    ld.step(T0, dead)
    ld.step(T0 + 50_000, back)
    assert ld.step(T0 + 55_000, dead).change is None
    assert ld.step(T0 + S.dead_voter_ms + 1000, dead).change is None, "dead only 6 s since it came back"
    assert ld.step(T0 + 55_000 + S.dead_voter_ms, dead).change == add("n3")


def test_new_term_forgets_the_dead_clock():
    members = {"n0": up(), "n1": up(), "n2": down(), "n3": up()}
    ld = Leader(voters=("n0", "n1", "n2"))
    ld.step(T0, members)
    ld.term = 2
    assert ld.step(T0 + S.dead_voter_ms, members).change is None
    assert ld.step(T0 + 2 * S.dead_voter_ms, members).change == add("n3")


def test_suspect_voter_is_never_removed():
    members = {"n0": up(), "n1": up(), "n2": suspect(), "n3": up()}
    ld = Leader(voters=("n0", "n1", "n2"))
    for t in range(T0, T0 + 10 * S.dead_voter_ms, 30_000):
        assert ld.step(t, members).change is None


def test_no_change_without_a_quorum_of_live_voters():
    members = {"n0": up(), "n1": up(), "n2": down(), "n3": down(), "n4": down(), "n5": up(), "n6": up()}
    ld = Leader(voters=("n0", "n1", "n2", "n3", "n4"))
    ld.step(T0, members)
    d = ld.step(T0 + 10 * S.dead_voter_ms, members)
    assert d.change is None and "fewer than a quorum of 3" in d.reason


# ---------------------------------------------------------------- shrinking and safety


def test_shrink_from_five_to_three_when_two_members_left_dead_ones_first():
    members = {f"n{i}": up(headroom=1 + i) for i in range(5)}
    ld = Leader(voters=tuple(members))
    members["n3"] = down()
    members["n4"] = down()
    for t in range(T0, T0 + S.dead_voter_ms, 10_000):
        d = ld.step(t, members)
        assert d.change is None, "nothing is removed while the dead may come back"
    changes = ld.run(T0 + S.dead_voter_ms, members)
    assert changes == [remove("n3"), remove("n4")]
    assert sorted(ld.voters) == ["n0", "n1", "n2"]


def test_one_member_left_five_become_three_by_removing_the_dead_then_the_lowest_ranked():
    members = {f"n{i}": up(headroom=5 - i) for i in range(5)}
    ld = Leader(voters=tuple(members), leader="n4")  # the leader has the least headroom
    members["n1"] = down()
    ld.step(T0, members)
    changes = ld.run(T0 + S.dead_voter_ms, members)
    assert changes == [remove("n1"), remove("n3")], "dead first, then the lowest ranked non-leader"
    assert "n4" in ld.voters


def test_never_removes_the_leader_even_when_it_ranks_lowest_or_is_ineligible():
    members = {"n0": up(headroom=0, eligible=False), "n1": up(), "n2": up(), "n3": up()}
    ld = Leader(voters=("n0", "n1", "n2", "n3"), leader="n0")
    changes = ld.run(T0, members)
    assert "n0" in ld.voters and all(c.node != "n0" for c in changes)
    assert len(ld.voters) == 3


def test_live_voter_not_removed_when_the_rest_could_not_form_a_quorum():
    # Four voters (an add before a remove), target 3, one voter suspect: shrinking waits.
    members = {"n0": up(), "n1": up(), "n2": suspect(), "n3": up()}
    ld = Leader(voters=("n0", "n1", "n2", "n3"))
    d = ld.decide(T0, members)
    assert d.change is None and d.target == 3 and "n2 suspect" in d.reason
    # A voter that may not vote any more is removed only if the healthy rest keep a quorum.
    members = {"n0": up(), "n1": down(), "n2": up(eligible=False)}
    ld = Leader(voters=("n0", "n1", "n2"))
    d = ld.decide(T0, members)
    assert d.change is None and ld.voters == ["n0", "n1", "n2"]


def test_two_voters_never_shrink_to_one_by_removing_a_live_node():
    members = {"n0": up(), "n1": up(headroom=0)}
    ld = Leader(voters=("n0", "n1"))
    d = ld.decide(T0, members)
    assert d.change is None and d.target == 1 and "2-voter" in d.reason
    members["n1"] = up(eligible=False)
    assert ld.decide(T0, members).change is None


def test_even_configuration_moves_back_to_odd():
    members = {f"n{i}": up() for i in range(5)}
    ld = Leader(voters=("n0", "n1", "n2", "n3"))
    assert ld.decide(T0, members).change == add("n4"), "below target 5: complete the add"
    del members["n4"]
    d = ld.decide(T0, members)
    assert d.change == remove("n3") and d.target == 3, "above target 3: complete the remove"


def test_ineligible_voter_is_replaced_add_first_then_removed():
    members = {"n0": up(), "n1": up(), "n2": up(eligible=False), "n3": up()}
    ld = Leader(voters=("n0", "n1", "n2"))
    assert ld.run(T0, members) == [add("n3"), remove("n2")]


def test_ineligible_voter_waits_for_a_replacement_that_is_still_stabilising():
    members = {"n0": up(), "n1": up(), "n2": up(eligible=False), "n3": up(since=T0 - 1000)}
    ld = Leader(voters=("n0", "n1", "n2"))
    d = ld.decide(T0, members)
    assert d.change is None and "n2 not eligible, waiting for a replacement" in d.reason


def test_more_than_five_voters_shrink_to_five():
    members = {f"n{i}": up(headroom=i) for i in range(7)}
    ld = Leader(voters=tuple(members), leader="n0")
    assert ld.run(T0, members) == [remove("n1"), remove("n2")]


def test_leader_outside_the_configuration_proposes_nothing():
    ld = Leader(voters=("n1", "n2", "n3"), leader="n0")
    d = ld.decide(T0, {f"n{i}": up() for i in range(4)})
    assert d.change is None and "not a voter" in d.reason


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_choice_is_the_best_stable_member():
    view = {
        "a": up(headroom=1),
        "b": up(headroom=3),
        "c": up(headroom=9, since=T0 - 1),  # best but not stable yet
        "d": suspect(headroom=8),
        "e": up(headroom=7, eligible=False),
        "f": down(headroom=6),
    }
    assert bootstrap_choice(view, T0) == "b"
    assert bootstrap_choice(view, T0 + S.stabilization_ms) == "c"
    assert bootstrap_choice({"x": up(since=T0)}, T0 + 9999) is None
    assert bootstrap_choice({}, T0) is None


def test_bootstrap_choice_is_the_same_on_every_node_with_the_same_view():
    view = {f"pi-{i}": up(headroom=0.5) for i in range(9, 0, -1)}
    choices = {bootstrap_choice(dict(random.Random(i).sample(sorted(view.items()), len(view))), T0) for i in range(10)}
    assert choices == {"pi-1"}


# ---------------------------------------------------------------- property


NODES = [f"n{i}" for i in range(8)]
FAST = VoterSettings(stabilization_ms=5000, dead_voter_ms=10_000)  # so that short histories reach every rule
EVENTS = ["up", "up", "suspect", "down", "down", "gone", "lag", "catch-up", "ineligible", "eligible"]


def run_history(start, steps, seen_kinds=None):
    """A mesh evolves (members come, go, flap, lag, change eligibility, the
    leader changes); every returned change is applied at once. The safety
    invariants are checked after every step. `steps`: (ms that pass, events
    [(node, what, headroom)], leader pick with 0 = a leadership change)."""
    first = min(start)
    view = {node: MemberView(True, False, 0, 1.0, True) for node in start}
    match = {node: 2000 for node in start}
    voters = [first]
    ap = Autopilot(FAST)
    now, term, leader = 100_000, 1, first
    for dt, events, pick in steps:
        now += dt
        for node, what, headroom in events:
            m = view.get(node)
            if what == "up" and not (m and m.healthy):
                view[node] = MemberView(True, False, now, headroom, m.eligible if m else True)
            elif what == "suspect" and m and m.alive:
                view[node] = MemberView(True, True, m.since_ms, m.headroom, m.eligible)
            elif what == "down" and m:
                view[node] = MemberView(False, False, m.since_ms, m.headroom, m.eligible)
            elif what == "gone":
                view.pop(node, None)
            elif what in ("lag", "catch-up"):
                match[node] = 0 if what == "lag" else 2000
            elif what in ("ineligible", "eligible") and m:
                view[node] = MemberView(m.alive, m.suspect, m.since_ms, m.headroom, what == "eligible")
        if leader not in voters or pick == 0:
            new = sorted(voters)[pick % len(voters)]
            if new != leader:
                leader, term = new, term + 1
        seen = dict(view)
        if leader in seen and not seen[leader].alive:
            seen[leader] = MemberView(True, False, now, 1.0)  # the leader is alive: it is running this
        before = list(voters)
        d = ap.decide(now, tuple(voters), leader, match, 2000, seen, term=term)
        assert d.reason and d.target in (1, 3, 5)
        if d.change is None:
            continue
        node = d.change.node
        healthy = lambda v: v == leader or (v in seen and seen[v].healthy)  # noqa: E731
        if d.change.op == "add":
            assert node not in voters and seen[node].healthy and seen[node].eligible
            assert now - seen[node].since_ms >= FAST.stabilization_ms
            assert 2000 - match[node] <= FAST.max_lag_entries
            voters.append(node)
            kind = "add"
        else:
            assert node in voters and node != leader, "the leader is never removed"
            assert not (node in seen and seen[node].suspect), "a suspect voter is never removed"
            was_live = node in seen and seen[node].alive
            voters.remove(node)
            if was_live:
                assert len(voters) >= 2, "never 2 -> 1 by removing a live voter"
                assert sum(map(healthy, voters)) >= quorum(len(voters)), "healthy rest keeps a quorum"
            kind = "remove live" if was_live else "remove dead"
        assert len(set(voters) ^ set(before)) == 1, "one voter changes per step"
        assert 1 <= len(voters) <= MAX_VOTERS and leader in voters
        if seen_kinds is not None:
            seen_kinds.update([kind, f"size {len(voters)}"])


event = st.tuples(st.sampled_from(NODES), st.sampled_from(EVENTS), st.floats(0, 4))
step = st.tuples(st.integers(0, 15_000), st.lists(event, max_size=2), st.integers(0, 15))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.sampled_from(NODES), min_size=1), st.lists(step, min_size=1, max_size=80))
def test_random_histories_keep_the_configuration_safe(start, steps):
    run_history(start, steps)


def test_long_seeded_histories_keep_the_configuration_safe_and_reach_every_rule():
    kinds = collections.Counter()
    for seed in range(60):
        rng = random.Random(seed)
        start = set(rng.sample(NODES, rng.randint(1, len(NODES))))
        steps = [
            (
                rng.randrange(0, 6000),
                [(rng.choice(NODES), rng.choice(EVENTS), rng.uniform(0, 4)) for _ in range(rng.random() < 0.3)],
                rng.randrange(40),
            )
            for _ in range(400)
        ]
        run_history(start, steps, kinds)
    assert {"add", "remove live", "remove dead", "size 5"} <= set(kinds), kinds
