"""Placement choices: capability match, power of two choices, auction scores,
the performance book, stealing and migration order, overload hysteresis."""

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.placement import (
    Candidate,
    Overload,
    PeerLoad,
    PerfBook,
    Weights,
    best_bid,
    bid_score,
    cap_match,
    choose_capability,
    effective_load,
    free_score,
    migration_targets,
    parse_cap,
    steal_victims,
)

# ----------------------------------------------------------------- capabilities


def test_parse_cap():
    assert parse_cap("camera") == ("camera", "", "")
    assert parse_cap("arch=arm64") == ("arch", "=", "arm64")
    assert parse_cap("ram_mb>=2048") == ("ram_mb", ">=", "2048")
    for bad in ("", "=x", "a==b", "Camera", "a>=x", "a>=", "a=b=c", "a b", None):
        with pytest.raises(ValueError):
            parse_cap(bad)


@pytest.mark.parametrize("required, offered, expected", [
    ([], [], 1.0),
    ([], ["camera"], 1.0),
    (["camera"], ["camera"], 1.0),
    (["camera"], ["camera=usb"], 1.0),  # a bare NAME is satisfied by any value of it
    (["camera"], ["cam"], 0.0),
    (["arch=arm64"], ["arch=arm64"], 1.0),
    (["arch=arm64"], ["arch=amd64"], 0.0),
    (["arch=arm64"], ["arch"], 0.0),  # a value is required, a bare name does not say which
    (["ram_mb>=2048"], ["ram_mb=2048"], 1.0),
    (["ram_mb>=2048"], ["ram_mb=4096"], 1.0),
    (["ram_mb>=2048"], ["ram_mb=512"], 0.0),
    (["ram_mb>=100"], ["ram_mb=99"], 0.0),
    (["ram_mb>=100"], ["ram_mb=1000"], 1.0),  # numeric, not text, comparison ("1000" < "100" as text)
    (["ram_mb>=9"], ["ram_mb=10"], 1.0),
    (["ram_mb>=1"], ["ram_mb=-5"], 0.0),
    (["ram_mb>=2048"], ["ram_mb=lots"], 0.0),
    (["ram_mb>=2048"], ["ram_mb"], 0.0),
    (["ram_mb>=2048"], ["ram_mb>=4096"], 0.0),  # offers cannot use >=
    (["camera"], ["Camera", "camera==x", "", "=camera"], 0.0),  # malformed offers never match
    (["camera", "gpu"], ["camera", "CAMERA!", "gpu=", "gpu x"], 0.5),
    (["camera", "arch=arm64", "ram_mb>=1024", "gpu"], ["camera", "arch=arm64", "ram_mb=512"], 0.5),
    (["bad cap", "camera"], ["bad cap", "camera"], 0.5),  # a malformed requirement is never met
])
def test_cap_match(required, offered, expected):
    assert cap_match(required, offered) == pytest.approx(expected)


# ----------------------------------------------------------------- capability strategy


def test_effective_load_counts_queue_per_slot():
    assert effective_load(Candidate("a", 1.0, 0.2, queued=4, slots=2)) == pytest.approx(2.2)
    assert effective_load(Candidate("a", 1.0, 0.2, queued=3, slots=0)) == pytest.approx(3.2)


def test_choose_capability_threshold_and_empty():
    rng = random.Random(1)
    assert choose_capability([], 0.0, rng) is None
    assert choose_capability([Candidate("a", 0.5, 0.0), Candidate("b", 0.7, 0.0)], 0.8, rng) is None
    assert choose_capability([Candidate("a", 0.5, 0.0), Candidate("b", 0.8, 0.9)], 0.8, rng) == "b"


def test_best_match_beats_lower_load():
    cands = [Candidate("idle", 0.5, 0.0), Candidate("busy", 1.0, 0.95, queued=5),
             Candidate("idle2", 0.5, 0.0)]
    for seed in range(20):
        assert choose_capability(cands, 0.5, random.Random(seed)) == "busy"


def test_two_choices_picks_the_lower_of_the_pair():
    cands = [Candidate("a", 1.0, 0.9), Candidate("b", 1.0, 0.1)]
    for seed in range(20):
        assert choose_capability(cands, 1.0, random.Random(seed)) == "b"
    # queued work counts: b's CPU is idle but its queue is long
    cands = [Candidate("a", 1.0, 0.5), Candidate("b", 1.0, 0.1, queued=4, slots=2)]
    assert choose_capability(cands, 1.0, random.Random(0)) == "a"
    # equal load: the lower node id
    cands = [Candidate("b", 1.0, 0.3), Candidate("a", 1.0, 0.3)]
    assert choose_capability(cands, 1.0, random.Random(0)) == "a"


def test_two_choices_over_many_draws():
    cands = [Candidate(f"n{i}", 1.0, i / 10) for i in range(10)]
    rng = random.Random(42)
    picks = collections.Counter(choose_capability(cands, 1.0, rng) for _ in range(2000))
    assert picks["n9"] == 0  # the most loaded loses every pair it is drawn in
    assert set(picks) == {f"n{i}" for i in range(9)}  # yet every other one gets work
    assert picks["n0"] > picks["n4"] > picks["n8"]  # the less loaded, the more often


@settings(max_examples=50, deadline=None)
@given(loads=st.lists(st.floats(0, 1), min_size=2, max_size=8), seed=st.integers(0, 2**32), shuffle=st.integers(0, 2**32))
def test_choice_is_deterministic_per_seed_whatever_the_order(loads, seed, shuffle):
    cands = [Candidate(f"n{i}", 1.0, x) for i, x in enumerate(loads)]
    got = choose_capability(cands, 1.0, random.Random(seed))
    random.Random(shuffle).shuffle(cands)
    assert choose_capability(cands, 1.0, random.Random(seed)) == got
    # the pick won a pair, so it is never the single most loaded one
    assert sum(effective_load(c) < effective_load(next(d for d in cands if d.node == got)) for c in cands) < len(cands) - 1


# ----------------------------------------------------------------- auction strategy


def test_bid_score_and_best_bid_by_hand():
    w = Weights()
    # a: 0.4*1 + 0.3*(1-0.5) + 0.2*0.5 + 0.1*0.5 = 0.7
    # b: 0.4*0.6 + 0.3*(1-0.2) + 0.2*0.9 + 0.1*0.8 = 0.74 (beats a's better match)
    # c: 0.4*0.4 + 0.3*(1-0) + 0.2*1 + 0.1*1 = 0.76 (the best, unless the threshold excludes it)
    assert bid_score(1.0, 0.5, 0.5, 0.5, w) == pytest.approx(0.7)
    assert bid_score(0.4, 0.0, 1.0, 1.0, w) == pytest.approx(0.76)
    bids = {"a": (1.0, 0.5, 0.5, 0.5), "b": (0.6, 0.2, 0.9, 0.8), "c": (0.4, 0.0, 1.0, 1.0)}
    assert best_bid(bids, w, threshold=0.5) == "b"
    assert best_bid(bids, w, threshold=0.0) == "c"
    assert best_bid(bids, w, threshold=0.8) == "a"
    assert best_bid(bids, w, threshold=1.01) is None
    assert best_bid({}, w, threshold=0.0) is None


def test_best_bid_ties_to_lower_node_and_weights_matter():
    w = Weights()
    assert best_bid({"n2": (1, 0.5, 0.5, 0.5), "n1": (1, 0.5, 0.5, 0.5)}, w, 0.0) == "n1"
    # float noise must not break a tie: 0.1 + 0.2 is 0.30000000000000004, 0.3 is not
    noisy = Weights(match=0.1, load=0.0, perf=0.2, free=0.3)
    assert bid_score(1, 1, 1, 0, noisy) > bid_score(0, 1, 0, 1, noisy)
    assert best_bid({"n2": (1, 1, 1, 0), "n1": (0, 1, 0, 1)}, noisy, 0.0) == "n1"
    load_only = Weights(match=0, load=1, perf=0, free=0)
    assert best_bid({"a": (1, 0.9, 1, 1), "b": (0, 0.1, 0, 0)}, load_only, 0.0) == "b"


def test_free_score_clamps():
    assert free_score(2, 4, 50) == pytest.approx(0.5)
    assert free_score(4, 4, 0) == pytest.approx(1.0)
    assert free_score(0, 4, 100) == pytest.approx(0.0)
    assert free_score(1, 2, None) == pytest.approx(0.5)
    assert free_score(9, 4, -20) == pytest.approx(1.0)
    assert free_score(-3, 4, 150) == pytest.approx(0.0)
    assert free_score(1, 0, 0) == pytest.approx(1.0)


def test_perf_book_neutral_then_ewma():
    book = PerfBook()
    assert book.score("x") == 0.5 and book.runs("x") == 0
    book.record("x", True, 1000)
    book.record("x", False, 1000)
    assert book.runs("x") == 2 and book.score("x") == 0.5
    book.record("x", True, 2000)
    # success: 1 -> 0.8 -> 0.84; seconds: 1 -> 1 -> 1.2
    assert book.runs("x") == 3
    assert book.score("x") == pytest.approx(0.7 * 0.84 + 0.3 / 2.2)


def test_perf_book_prefers_fast_reliable_kinds():
    book = PerfBook()
    for _ in range(10):
        book.record("fast", True, 100)
        book.record("slow", True, 20_000)
        book.record("flaky", False, 100)
    assert book.score("fast") > book.score("slow") > book.score("flaky")
    assert 0.0 <= book.score("flaky") < 0.5 < book.score("fast") <= 1.0


def test_perf_book_bounded_least_recently_recorded_dropped():
    book = PerfBook()
    for i in range(64):
        book.record(f"k{i}", True, 10)
    book.record("k0", True, 10)  # k0 is now the most recent; k1 the oldest
    book.record("new", True, 10)
    assert len(book) == 64
    assert book.runs("k0") == 2 and book.runs("k1") == 0 and book.runs("new") == 1


# ----------------------------------------------------------------- stealing and balancing


def test_steal_victims_order():
    peers = [PeerLoad("a", 0.2, 3), PeerLoad("b", 0.9, 3), PeerLoad("c", 0.1, 7), PeerLoad("d", 0.9, 0),
             PeerLoad("e", 0.2, 3)]
    assert steal_victims(peers, k=10) == ["c", "b", "a", "e"]
    assert steal_victims(peers) == ["c", "b"]
    assert steal_victims(peers, k=10, min_queued=4) == ["c"]
    assert steal_victims(peers, k=0) == []
    assert steal_victims([], k=3) == []


def test_migration_targets_order():
    peers = [PeerLoad("a", 0.2, 1, 1), PeerLoad("b", 0.2, 0, 1), PeerLoad("c", 0.05, 9), PeerLoad("d", 0.3, 0),
             PeerLoad("e", 0.2, 1, 0)]
    assert migration_targets(peers, idle=0.3) == ["c", "b", "e", "a"]  # d is at the limit, not below
    assert migration_targets(peers, idle=0.0) == []


def test_overload_hysteresis():
    ov = Overload(high=0.8, sustain=3, margin=0.1)
    seq = [(0.9, False), (0.95, False), (0.5, False),  # a dip restarts the count
           (0.9, False), (0.81, False), (0.85, True),  # three in a row
           (0.75, True), (0.8, True), (0.71, True),  # hovering near the threshold: still shedding
           (0.69, False),  # below high - margin
           (0.85, False), (0.85, False), (None, False), (0.85, False), (0.85, False), (0.85, True),
           (None, False)]  # unknown load ends it
    got = [ov.update(x) for x, _ in seq]
    assert got == [want for _, want in seq]
    assert ov.overloaded is False


def test_overload_hovering_load_does_not_flip():
    ov = Overload()
    for _ in range(3):
        ov.update(0.9)
    flips = 0
    rng = random.Random(5)
    state = ov.overloaded
    for _ in range(500):
        now = ov.update(0.8 + rng.uniform(-0.05, 0.05))
        flips += now != state
        state = now
    assert state is True and flips == 0
