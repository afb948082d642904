"""Rules of the membership core, one at a time, with packets handed over by hand."""

import random

from agent.core.membership import Membership
from agent.core.settings import MembershipSettings
from agent.messages import Ack, Alive, Dead, IndirectPing, MemberState, Nack, Packet, Ping, PushPull, Status, Suspect
from agent.wire import MAX_PACKET, encode_packet

S = MembershipSettings()


def core(name="a", inc=0, **kw):
    return Membership(MembershipSettings(**kw) if kw else S, name, f"10.0.0.{ord(name[0]) % 200}", 5683, random.Random(1), incarnation=inc)


def deliver(src: Membership, dst: Membership, msgs):
    dst.step(Packet(src.me, tuple(msgs)), (src.members[src.me].addr, 5683))


def sent(c: Membership):
    return [(o.addr, m) for o in c.ready() for m in o.packet.messages]


def test_ping_is_acked_and_carries_pending_gossip():
    a, b = core("a"), core("b")
    deliver(b, a, [Alive("b", 0, "10.0.0.98", 5683), Ping(7, "a")])
    out = sent(a)
    assert ("10.0.0.98", Ack(7)) in out
    assert any(isinstance(m, Alive) and m.node == "b" for _, m in out), "gossip rides on the ack"


def test_ping_for_someone_else_is_dropped_and_counted():
    a = core("a")
    a.step(Packet("b", (Ping(1, "zz"),)), ("10.0.0.9", 5683))
    assert not [m for _, m in sent(a) if isinstance(m, Ack)]
    assert a.counters.get("wrong_target") == 1


def test_a_suspicion_of_ourselves_is_refuted_with_a_higher_incarnation():
    a = core("a", inc=5)
    a.step(Packet("b", (Suspect("a", 5, "b"),)), ("10.0.0.9", 5683))
    assert a.incarnation == 6
    assert Alive("a", 6, a.members["a"].addr, 5683) in a.broadcasts.pending()
    assert a.awareness == 1, "being suspected is a hint that we are slow"


def test_dead_is_final_for_its_incarnation_and_a_restart_revives():
    a = core("a")
    a.step(Packet("b", (Alive("c", 3, "10.0.0.3", 5683), Dead("c", 3, "b"))), ("10.0.0.9", 5683))
    assert a.members["c"].status == Status.DEAD
    a.step(Packet("b", (Alive("c", 3, "10.0.0.3", 5683), Suspect("c", 3, "b"))), ("10.0.0.9", 5683))
    assert a.members["c"].status == Status.DEAD, "stale gossip cannot resurrect a dead member"
    a.step(Packet("c", (Alive("c", 2 << 32, "10.0.0.3", 5683),)), ("10.0.0.3", 5683))
    assert a.members["c"].status == Status.ALIVE, "a restart (higher boot) rejoins"


def test_a_node_announcing_its_own_death_has_left():
    a = core("a")
    a.step(Packet("c", (Alive("c", 1, "10.0.0.3", 5683), Dead("c", 1, "c"))), ("10.0.0.3", 5683))
    assert a.members["c"].status == Status.LEFT


def test_leave_tells_peers_and_stops_taking_part():
    a = core("a")
    a.step(Packet("b", (Alive("b", 1, "10.0.0.2", 5683),)), ("10.0.0.2", 5683))
    a.ready()
    a.leave()
    assert ("10.0.0.2", Dead("a", 0, "a")) in sent(a)
    a.step(Packet("b", (Ping(3, "a"),)), ("10.0.0.2", 5683))
    assert sent(a) == [], "a node that left answers nothing"


def test_unanswered_probe_goes_indirect_then_suspects():
    a = core("a")
    for n in "bcde":
        a.step(Packet(n, (Alive(n, 1, f"10.0.1.{ord(n)}", 5683),)), (f"10.0.1.{ord(n)}", 5683))
    a.ready()
    a.tick()
    ping = next(m for _, m in sent(a) if isinstance(m, Ping))
    for _ in range(S.ticks(S.probe_timeout_ms)):
        a.tick()
    indirect = [m for _, m in sent(a) if isinstance(m, IndirectPing)]
    assert len(indirect) == S.indirect_checks and all(m.target == ping.target for m in indirect)
    for _ in range(S.ticks(S.probe_interval_ms)):
        a.tick()
    assert a.members[ping.target].status == Status.SUSPECT
    assert a.awareness == S.indirect_checks, "relays that did not even nack count against our own health"


def test_relay_answers_nack_when_the_target_is_silent_and_forwards_an_ack():
    r = core("r")
    r.step(Packet("a", (IndirectPing(41, "t", "10.0.0.7", 5683),)), ("10.0.0.1", 5683))
    ping = next(m for _, m in sent(r) if isinstance(m, Ping))
    r.step(Packet("t", (Ack(ping.seq),)), ("10.0.0.7", 5683))
    assert ("10.0.0.1", Ack(41)) in sent(r)
    r.step(Packet("a", (IndirectPing(42, "t", "10.0.0.7", 5683),)), ("10.0.0.1", 5683))
    r.ready()
    for _ in range(S.ticks(S.probe_timeout_ms)):
        r.tick()
    assert ("10.0.0.1", Nack(42)) in sent(r)


def test_member_limit_refuses_and_counts():
    a = core("a", max_members=3)
    for n in "bcde":
        a.step(Packet(n, (Alive(n, 1, "10.0.0.5", 5683),)), ("10.0.0.5", 5683))
    assert len(a.members) == 3 and a.counters.get("member_limit") == 2


def test_every_packet_fits_a_datagram_even_with_a_flood_of_news():
    a = core("a")
    states = tuple(MemberState(f"node-{i:04d}", i, Status.ALIVE, "10.0.2.1", 5683, bytes(200)) for i in range(60))
    a.step(Packet("b", (PushPull(states),)), ("10.0.0.2", 5683))
    for _ in range(200):
        a.tick()
    out = a.ready()
    assert out
    assert max(len(encode_packet(o.packet)) for o in out) <= MAX_PACKET


def test_join_retries_seeds_with_backoff_until_someone_answers():
    a = core("a", join_retry_min_ms=100, join_retry_max_ms=400)
    a.join([("10.9.9.9", 5683)])
    times = []
    for t in range(1, 60):
        a.tick()
        if any(o.addr == "10.9.9.9" for o in a.ready()):
            times.append(t)
    gaps = [b - a_ for a_, b in zip(times, times[1:])]
    assert gaps[:3] == [2, 4, 8] and max(gaps) == 8, gaps


def test_a_suspect_is_probed_again_with_the_suspicion_and_its_ack_refutes():
    a, x = core("a"), core("x", inc=4)
    for n in "bcd":
        a.step(Packet(n, (Alive(n, 1, f"10.0.1.{ord(n)}", 5683),)), (f"10.0.1.{ord(n)}", 5683))
    a.step(Packet("x", (Alive("x", 4, x.members["x"].addr, 5683),)), (x.members["x"].addr, 5683))
    a.step(Packet("b", (Suspect("x", 4, "b"),)), ("10.0.1.98", 5683))
    a.ready()
    a.tick()  # hearing a suspicion makes the suspect our next probe, at once
    ping_pkt = next(o.packet for o in a.ready() if any(isinstance(m, Ping) for m in o.packet.messages))
    assert ping_pkt.messages[0] == Ping(ping_pkt.messages[0].seq, "x")
    assert Suspect("x", 4, "a") in ping_pkt.messages, "the buddy system: the suspicion rides on the probe"
    x.step(ping_pkt, (a.members["a"].addr, 5683))
    ack_pkt = next(o.packet for o in x.ready() if any(isinstance(m, Ack) for m in o.packet.messages))
    a.step(ack_pkt, (x.members["x"].addr, 5683))
    assert a.members["x"].status == Status.ALIVE and a.members["x"].incarnation == 5, "the refutation came back on the ack"


def test_live_count_follows_every_status_change():
    a = core("a")
    msgs = [Alive("b", 1, "10.0.0.2", 5683), Alive("c", 1, "10.0.0.3", 5683), Suspect("b", 1, "c"),
            Dead("c", 1, "b"), Alive("c", 2, "10.0.0.3", 5683), Dead("b", 1, "b"), Alive("b", 5, "10.0.0.2", 5683)]
    for msg in msgs:
        a.step(Packet("z", (msg,)), ("10.0.0.9", 5683))
        recount = sum(1 for m in a.members.values() if m.status in (Status.ALIVE, Status.SUSPECT))
        assert a.live_count() == recount, msg
    a.leave()
    assert a.live_count() == 2
