"""Suspicion timeout and broadcast queue: the two small mechanisms the membership core leans on."""

from agent.core.broadcasts import BroadcastQueue
from agent.core.suspicion import Suspicion
from agent.messages import Alive, Dead, Suspect


def test_suspicion_shrinks_with_independent_confirmations_only():
    s = Suspicion(start=0, suspector="a", k=3, min_ticks=20, max_ticks=120)
    assert s.timeout() == 120
    assert not s.confirm("a"), "the original suspector is not a confirmation"
    assert s.confirm("b") and not s.confirm("b"), "a repeat is not a confirmation"
    one = s.timeout()
    assert 20 < one < 120
    s.confirm("c")
    s.confirm("d")
    assert s.timeout() == 20
    assert not s.confirm("e"), "confirmations past k change nothing"
    assert not s.expired(19) and s.expired(20)


def test_suspicion_without_expected_confirmations_uses_minimum():
    assert Suspicion(0, "a", k=0, min_ticks=20, max_ticks=120).timeout() == 20


def _size(_msg):
    return 10


def test_newer_news_about_a_node_replaces_older():
    q = BroadcastQueue()
    q.push(Suspect("n1", 5, "a"))
    q.push(Alive("n1", 6, "10.0.0.1", 5683))
    assert q.pending() == [Alive("n1", 6, "10.0.0.1", 5683)]


def test_each_broadcast_is_sent_limit_times_then_dropped():
    q = BroadcastQueue()
    q.push(Dead("n1", 1, "a"))
    sent = 0
    for _ in range(10):
        sent += len(q.take(100, _size, limit=4))
    assert sent == 4 and len(q) == 0


def test_least_sent_first_and_budget_respected():
    q = BroadcastQueue()
    q.push(Dead("old", 1, "a"))
    q.take(100, _size, limit=9)
    q.push(Dead("new", 1, "a"))
    assert q.take(10, _size, limit=9) == [Dead("new", 1, "a")]
    assert q.take(0, _size, limit=9) == []


def test_buddy_message_goes_first_without_counting():
    q = BroadcastQueue()
    q.push(Dead("x", 1, "a"))
    buddy = Suspect("t", 3, "me")
    out = q.take(20, _size, limit=9, first=buddy)
    assert out[0] == buddy and len(out) == 2


def test_queue_is_bounded():
    q = BroadcastQueue(max_items=10)
    for i in range(100):
        q.push(Dead(f"n{i}", 1, "a"))
    assert len(q) == 10
    assert Dead("n99", 1, "a") in q.pending(), "the newest news survives"


def test_a_quorum_of_confirmations_cuts_the_timeout_to_the_quorum_floor():
    s = Suspicion(start=0, suspector="a", k=3, min_ticks=100, max_ticks=600, quorum=5, quorum_ticks=20)
    for who in "bcd":
        s.confirm(who)
    assert s.timeout() == 100, "k confirmations: Lifeguard's minimum"
    s.confirm("e")
    assert s.timeout() == 100
    s.confirm("f")
    assert s.timeout() == 20, "a quorum of independent confirmations"
    assert not s.confirm("g"), "nothing past the quorum changes anything"
