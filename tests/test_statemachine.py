"""The replicated state machine: commands, key-value store, proposals, extensions, snapshots."""

import os
import random
import subprocess
import sys
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import statemachine as smod
from agent.core.statemachine import (
    Command,
    Event,
    Result,
    StateMachine,
    decode_command,
    encode_command,
)
from agent.messages import BadMessage


class Log:
    """A state machine fed like the driver feeds it: consecutive indexes."""

    def __init__(self, voters=("a", "b", "c")):
        self.sm = StateMachine()
        self.index = 0
        self.rids = 0
        if voters is not None:
            self.index += 1
            self.sm.set_voters(voters, self.index)

    def rid(self) -> bytes:
        self.rids += 1
        return self.rids.to_bytes(16, "big")

    def raw(self, data: bytes):
        self.index += 1
        return self.sm.apply(self.index, data)

    def do(self, op, rid=None, **fields):
        return self.raw(encode_command(op, rid or self.rid(), **fields))

    def conf(self, voters):
        self.index += 1
        self.sm.set_voters(voters, self.index)


def put(log, key, value, **kw):
    return log.do("kv.put", key=key, value=value, **kw)


def new_prop(log, pid="p1", deadline_ms=None, value="v"):
    return log.do("prop.new", id=pid, value=value, deadline_ms=deadline_ms, proposer="a", created_ms=1000)


def vote(log, voter, choice, pid="p1", now_ms=2000):
    return log.do("prop.vote", id=pid, voter=voter, choice=choice, now_ms=now_ms)


# ------------------------------------------------------------------ commands


def test_command_round_trip_and_canonical_bytes():
    rid = bytes(range(16))
    data = encode_command("kv.put", rid, value=b"v", key="k")
    assert data == encode_command("kv.put", rid, key="k", value=b"v"), "field order must not matter"
    assert data == cbor2.dumps({"op": "kv.put", "rid": rid, "key": "k", "value": b"v"}, canonical=True)
    cmd = decode_command(data)
    assert cmd == Command("kv.put", rid, {"key": "k", "value": b"v"})
    assert cmd.encode() == data
    with pytest.raises(TypeError):
        cmd.fields["key"] = "other"  # read-only


def test_optional_deadline_is_absent_rather_than_null():
    data = encode_command("prop.new", b"r" * 16, id="x", value=[1], deadline_ms=None, proposer="a", created_ms=0)
    assert "deadline_ms" not in decode_command(data).fields


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"\xff", "malformed"),
        (cbor2.dumps([1, 2]), "bad_field"),
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "k", "value": 1.5}), "malformed"),  # float
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "k", "value": None}), "malformed"),  # null
        (cbor2.dumps({"op": "kv.put", "rid": b"short", "key": "k", "value": b""}, canonical=True), "bad_rid"),
        (cbor2.dumps({"op": "kv.nope", "rid": b"r" * 16}, canonical=True), "bad_op"),
        (cbor2.dumps({"op": "KV put", "rid": b"r" * 16}, canonical=True), "bad_op"),
        (cbor2.dumps({"rid": b"r" * 16, "key": "k"}, canonical=True), "bad_op"),
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "k"}, canonical=True), "bad_field"),
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "k", "value": b"", "x": 1}, canonical=True), "bad_field"),
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "", "value": b""}, canonical=True), "bad_key"),
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "a\x00b", "value": b""}, canonical=True), "bad_key"),
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "é" * 129, "value": b""}, canonical=True), "bad_key"),
        (cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "k", "value": "text"}, canonical=True), "bad_value"),
        (cbor2.dumps({"op": "kv.cas", "rid": b"r" * 16, "key": "k", "rev": -1, "value": b""}, canonical=True), "bad_field"),
        (cbor2.dumps({"op": "kv.cas", "rid": b"r" * 16, "key": "k", "rev": True, "value": b""}, canonical=True), "bad_field"),
        (cbor2.dumps({"op": "prop.vote", "rid": b"r" * 16, "id": "p", "voter": "a", "choice": "maybe", "now_ms": 1}, canonical=True), "bad_field"),
        (cbor2.dumps({"op": "prop.new", "rid": b"r" * 16, "id": "p", "value": "x" * 1100, "proposer": "a", "created_ms": 1}, canonical=True), "bad_value"),
        (cbor2.dumps({"op": "x.y", "rid": b"r" * 16, "deep": [[[[[[[[[1]]]]]]]]]}, canonical=True), "malformed"),
        (b"\xa2" + cbor2.dumps("op") + cbor2.dumps("kv.del") + cbor2.dumps("op") + cbor2.dumps("kv.del"), "malformed"),
        (cbor2.dumps({"op": "kv.del", "rid": b"r" * 16, "key": "k"}, canonical=False)[:-1], "truncated"),
        (b"\x40" * 3000, "oversized"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(data, reason):
    with pytest.raises(BadMessage) as e:
        decode_command(data)
    assert e.value.reason == reason


def test_non_canonical_encoding_is_refused():
    # the same map with keys in insertion (not canonical) order
    data = cbor2.dumps({"rid": b"r" * 16, "op": "kv.del", "key": "k"})
    assert data != cbor2.dumps(cbor2.loads(data), canonical=True)
    with pytest.raises(BadMessage, match="canonical"):
        decode_command(data)


def test_encode_refuses_what_apply_would_refuse():
    with pytest.raises(BadMessage):
        encode_command("kv.put", b"r" * 16, key="k", value=b"x" * 2049)
    with pytest.raises(BadMessage):
        encode_command("prop.new", b"r" * 16, id="p", value=1.5, proposer="a", created_ms=0)
    with pytest.raises(BadMessage):
        encode_command("kv.put", b"r" * 15, key="k", value=b"")


def test_bad_committed_commands_give_error_results_and_are_counted():
    log = Log()
    before = log.sm.snapshot()
    for data in (b"\xff", b"\x00", cbor2.dumps({"op": "kv.put"}), cbor2.dumps({"op": "kv.put", "rid": b"r" * 16, "key": "k", "value": 1.5})):
        r = log.raw(data)
        assert r.ok is False and r.error == "bad-command" and isinstance(r.value, str)
    assert log.sm.stats["bad_commands"] == 4
    assert log.sm.get("k") is None
    noops = Log()  # only the applied index moved, as with four no-ops
    for _ in range(4):
        noops.raw(b"")
    assert log.sm.snapshot() != before and log.sm.snapshot() == noops.sm.snapshot()


def test_empty_entry_is_the_leaders_noop():
    log = Log()
    assert log.raw(b"") is None
    assert log.sm.applied == log.index and log.sm.revision == 0, "nothing changed"


def test_index_must_grow():
    log = Log()
    put(log, "k", b"1")
    with pytest.raises(ValueError):
        log.sm.apply(log.index, encode_command("kv.put", b"z" * 16, key="k", value=b"2"))
    with pytest.raises(ValueError):
        log.sm.set_voters(("a",), log.index)


# ------------------------------------------------------------------------ kv


def test_put_get_revisions_and_versions():
    log = Log()
    r1 = put(log, "a", b"1")
    assert r1 == Result(True, None, log.index)
    put(log, "b", b"x")
    r3 = put(log, "a", b"2")
    kv = log.sm.get("a")
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"2", r1.revision, r3.revision, 2)
    assert log.sm.revision == r3.revision == log.index
    assert log.sm.get("missing") is None


def test_delete_and_recreate_starts_a_new_life():
    log = Log()
    put(log, "k", b"1")
    put(log, "k", b"2")
    assert log.do("kv.del", key="k").ok
    assert log.sm.get("k") is None
    rev = log.sm.revision
    r = log.do("kv.del", key="k")
    assert (r.ok, r.error, r.revision) == (False, "not-found", rev)
    put(log, "k", b"3")
    kv = log.sm.get("k")
    assert kv.version == 1 and kv.create_revision == kv.mod_revision == log.index


def test_cas_create_update_and_conflicts():
    log = Log()
    created = log.do("kv.cas", key="k", rev=0, value=b"1")
    assert created.ok
    again = log.do("kv.cas", key="k", rev=0, value=b"x")
    assert (again.ok, again.error, again.revision) == (False, "conflict", created.revision)
    stale = log.do("kv.cas", key="k", rev=created.revision - 1, value=b"x")
    assert stale.error == "conflict" and stale.revision == created.revision
    updated = log.do("kv.cas", key="k", rev=created.revision, value=b"2")
    assert updated.ok and log.sm.get("k").value == b"2" and log.sm.get("k").version == 2
    lost_race = log.do("kv.cas", key="k", rev=created.revision, value=b"3")
    assert lost_race.error == "conflict" and lost_race.revision == updated.revision
    missing = log.do("kv.cas", key="nope", rev=5, value=b"x")
    assert (missing.error, missing.revision) == ("conflict", 0)
    assert log.sm.get("k").value == b"2"


def test_list_by_prefix_in_key_order_with_limit_and_pagination():
    log = Log()
    for key in ("b/2", "a/1", "b/1", "b/10", "c", "b", "bz"):
        put(log, key, key.encode())
    assert [kv.key for kv in log.sm.list("b/")] == ["b/1", "b/10", "b/2"]
    assert [kv.key for kv in log.sm.list()] == ["a/1", "b", "b/1", "b/10", "b/2", "bz", "c"]
    assert [kv.key for kv in log.sm.list("b", limit=2)] == ["b", "b/1"]
    assert [kv.key for kv in log.sm.list("b", limit=2, after="b/1")] == ["b/10", "b/2"]
    assert log.sm.list("zz") == []
    log.do("kv.del", key="b/10")
    assert [kv.key for kv in log.sm.list("b/")] == ["b/1", "b/2"]
    for bad in (0, 1001, True):
        with pytest.raises(ValueError):
            log.sm.list("", limit=bad)


def test_dedup_returns_the_first_result_without_applying_again():
    log = Log()
    rid = log.rid()
    first = log.do("kv.put", rid=rid, key="k", value=b"1")
    put(log, "k", b"2")
    retry = log.do("kv.put", rid=rid, key="k", value=b"1")
    assert retry == first
    assert log.sm.get("k").value == b"2" and log.sm.get("k").version == 2
    assert log.sm.stats["dedup_hits"] == 1
    # an error result is remembered too
    rid2 = log.rid()
    assert log.do("kv.del", rid=rid2, key="nope").error == "not-found"
    put(log, "nope", b"now it exists")
    assert log.do("kv.del", rid=rid2, key="nope").error == "not-found"
    assert log.sm.get("nope") is not None


def test_dedup_table_is_bounded_fifo():
    log = Log()
    first_rid = log.rid()
    log.do("kv.put", rid=first_rid, key="k", value=b"first")
    for i in range(smod.DEDUP_SIZE):
        log.do("kv.put", key="k", value=b"%d" % i)
    assert len(log.sm._s.dedup) == smod.DEDUP_SIZE
    version = log.sm.get("k").version
    # the oldest rid fell out: a very late retry applies again (the documented limit)
    assert log.do("kv.put", rid=first_rid, key="k", value=b"first").ok
    assert log.sm.get("k").version == version + 1


def test_key_limit(monkeypatch):
    monkeypatch.setattr(smod, "MAX_KEYS", 3)
    log = Log()
    for k in "abc":
        assert put(log, k, b"").ok
    r = put(log, "d", b"")
    assert (r.ok, r.error) == (False, "full")
    assert put(log, "a", b"update is fine").ok
    assert log.do("kv.cas", key="d", rev=0, value=b"").error == "full"
    log.do("kv.del", key="a")
    assert put(log, "d", b"").ok


def test_largest_put_fits_a_command():
    log = Log()
    key = "k" * 256
    assert put(log, key, b"v" * 2048).ok
    assert len(encode_command("kv.put", b"r" * 16, key=key, value=b"v" * 2048)) <= smod.MAX_COMMAND


# ----------------------------------------------------------------- proposals


def test_majority_of_three_voters_approves():
    log = Log(("a", "b", "c"))
    assert new_prop(log).ok
    r = vote(log, "a", "approve")
    assert r.ok and r.value is None and log.sm.proposal("p1").open
    r = vote(log, "b", "approve", now_ms=2500)
    assert r.value == "approved"
    p = log.sm.proposal("p1")
    assert (p.outcome, p.decided_index, p.decided_ms) == ("approved", log.index, 2500)
    assert [(v.voter, v.choice, v.now_ms) for v in p.votes] == [("a", "approve", 2000), ("b", "approve", 2500)]
    late = vote(log, "c", "reject")
    assert (late.ok, late.error) == (False, "decided")


def test_five_voters_need_three_and_rejection_decides_too():
    log = Log(("a", "b", "c", "d", "e"))
    new_prop(log)
    vote(log, "a", "reject")
    vote(log, "b", "reject")
    vote(log, "c", "approve")
    vote(log, "d", "approve")
    assert log.sm.proposal("p1").open
    assert vote(log, "e", "reject").value == "rejected"
    assert log.sm.proposal("p1").outcome == "rejected"


def test_a_voter_may_change_its_vote_until_decided():
    log = Log(("a", "b", "c"))
    new_prop(log)
    vote(log, "a", "approve")
    vote(log, "a", "reject", now_ms=3000)
    p = log.sm.proposal("p1")
    assert [(v.voter, v.choice, v.now_ms) for v in p.votes] == [("a", "reject", 3000)]
    assert vote(log, "b", "approve").value is None, "a's approval was withdrawn"
    assert vote(log, "c", "reject").value == "rejected"


def test_four_voters_tie_never_decides_and_then_expires():
    log = Log(("a", "b", "c", "d"))
    new_prop(log, deadline_ms=10_000)
    for voter, choice in (("a", "approve"), ("b", "approve"), ("c", "reject"), ("d", "reject")):
        assert vote(log, voter, choice).value is None
    assert log.sm.proposal("p1").open
    r = log.do("prop.expire", now_ms=9_999)
    assert r.value == 0 and log.sm.proposal("p1").open
    r = log.do("prop.expire", now_ms=10_000)
    assert r.ok and r.value == 1
    p = log.sm.proposal("p1")
    assert (p.outcome, p.decided_index, p.decided_ms) == ("expired", log.index, 10_000)
    assert len(p.votes) == 4, "votes are kept with the outcome"
    assert vote(log, "a", "reject").error == "decided"


def test_expire_only_touches_due_proposals_with_a_deadline():
    log = Log()
    new_prop(log, "early", deadline_ms=100)
    new_prop(log, "late", deadline_ms=500)
    new_prop(log, "never")
    rev = log.sm.revision
    r = log.do("prop.expire", now_ms=50)
    assert r.value == 0 and r.revision == rev == log.sm.revision, "nothing changed"
    assert log.do("prop.expire", now_ms=100).value == 1
    assert [p.id for p in log.sm.proposals(open_only=True)] == ["late", "never"]
    assert log.do("prop.expire", now_ms=10**12).value == 1
    assert log.sm.proposal("never").open


def test_votes_from_non_voters_are_refused():
    log = Log(("a", "b", "c"))
    new_prop(log)
    r = vote(log, "mallory", "approve")
    assert (r.ok, r.error) == (False, "not-a-voter")
    assert log.sm.proposal("p1").votes == ()
    assert vote(log, "a", "approve", pid="nope").error == "not-found"


def test_only_current_voters_count_and_a_conf_change_recounts():
    log = Log(("a", "b", "c", "d"))
    new_prop(log)
    vote(log, "a", "approve")
    vote(log, "b", "approve")
    vote(log, "d", "reject")
    assert log.sm.proposal("p1").open  # 2 of 4
    log.conf(("a", "b", "d"))  # c, who had not voted, leaves: 2 of 3 is a majority
    p = log.sm.proposal("p1")
    assert (p.outcome, p.decided_index) == ("approved", log.index)
    # a removed voter's vote is kept but no longer counts
    new_prop(log, "p2")
    vote(log, "a", "approve", pid="p2")
    log.conf(("b", "d", "e"))  # a leaves
    assert vote(log, "b", "approve", pid="p2").value is None, "a's approval no longer counts: 1 of 3"
    p2 = log.sm.proposal("p2")
    assert p2.open and [v.voter for v in p2.votes] == ["a", "b"]
    assert vote(log, "a", "approve", pid="p2").error == "not-a-voter"
    assert vote(log, "d", "approve", pid="p2").value == "approved"


def test_no_voters_means_nothing_is_decided_by_votes():
    log = Log(voters=None)
    new_prop(log)
    assert vote(log, "a", "approve").error == "not-a-voter"
    assert log.sm.proposal("p1").open


def test_duplicate_proposal_ids_are_refused():
    log = Log()
    assert new_prop(log).ok
    assert new_prop(log).error == "exists"


def test_open_proposals_are_bounded(monkeypatch):
    monkeypatch.setattr(smod, "MAX_OPEN", 3)
    log = Log()
    for i in range(3):
        assert new_prop(log, f"p{i}").ok
    assert new_prop(log, "p3").error == "too-many-open"
    vote(log, "a", "approve", pid="p0")
    vote(log, "b", "approve", pid="p0")
    assert new_prop(log, "p3").ok, "a decided proposal frees its slot"


def test_only_the_most_recent_decided_proposals_are_kept(monkeypatch):
    monkeypatch.setattr(smod, "KEEP_DECIDED", 2)
    log = Log()
    for i in range(4):
        new_prop(log, f"p{i}", deadline_ms=i)
        log.do("prop.expire", now_ms=i)
    assert [p.id for p in log.sm.proposals()] == ["p2", "p3"]
    assert log.sm.proposal("p0") is None
    assert vote(log, "a", "approve", pid="p0").error == "not-found"


def test_proposal_value_may_be_any_plain_cbor_up_to_1024_bytes():
    log = Log()
    value = {"cmd": "reboot", "targets": ["pi-1", "pi-2"], "n": -3, "raw": b"\x00", "ok": True, 7: [[]]}
    assert new_prop(log, value=value).ok
    assert log.sm.proposal("p1").value == value
    with pytest.raises(BadMessage):
        new_prop(log, "p2", value="x" * 1025)


# ---------------------------------------------------------------- extensions


class Counter:
    """A tiny extension: counters by name."""

    def __init__(self):
        self.counts = {}

    def apply(self, op, fields, index):
        if op != "inc":
            return Result(False, "unknown-op", 0)
        name = fields.get("name")
        if type(name) is not str:
            raise BadMessage("bad_field", "name")
        self.counts[name] = self.counts.get(name, 0) + 1
        return Result(True, None, index, self.counts[name])

    def snapshot(self):
        return {k: self.counts[k] for k in sorted(self.counts)}

    def restore(self, obj):
        if type(obj) is not dict:
            raise BadMessage("bad_field", "counter snapshot")
        self.counts = dict(obj)


def test_extension_ops_are_routed_and_unknown_namespaces_are_errors():
    log = Log()
    ext = Counter()
    log.sm.register("tasks", ext)
    r = log.do("tasks.inc", name="x")
    assert r == Result(True, None, log.index, 1) and log.sm.revision == log.index
    assert log.do("tasks.inc", name="x").value == 2
    assert [(e.kind, e.name) for e in log.sm.take_events()] == [("tasks.inc", "tasks")] * 2
    assert log.do("tasks.bogus").error == "unknown-op"
    bad = log.do("tasks.inc", name=5)
    assert (bad.error, bad.value) == ("bad-command", "bad_field")
    missing = log.do("other.op", a=1)
    assert (missing.ok, missing.error) == (False, "unknown-ns")
    with pytest.raises(ValueError):
        log.sm.register("kv", Counter())
    with pytest.raises(ValueError):
        log.sm.register("tasks", Counter())


def test_extension_state_is_in_the_snapshot():
    log = Log()
    log.sm.register("tasks", Counter())
    log.do("tasks.inc", name="x")
    copy = StateMachine()
    ext = Counter()
    copy.register("tasks", ext)
    copy.restore(log.sm.snapshot())
    assert ext.counts == {"x": 1}
    assert copy.snapshot() == log.sm.snapshot()
    with pytest.raises(BadMessage):
        StateMachine().restore(log.sm.snapshot())  # the namespace is not registered there


# ------------------------------------------------------------------- events


def test_change_events_are_drained_in_order():
    log = Log(("a", "b", "c"))
    put(log, "k", b"1")
    log.do("kv.del", key="k")
    log.do("kv.del", key="k")  # not-found: no event
    new_prop(log)
    vote(log, "a", "approve")
    vote(log, "b", "approve")
    events = log.sm.take_events()
    assert [(e.kind, e.name, e.detail) for e in events] == [
        ("kv.put", "k", None),
        ("kv.del", "k", None),
        ("prop.new", "p1", None),
        ("prop.vote", "p1", ("a", "approve")),
        ("prop.vote", "p1", ("b", "approve")),
        ("prop.decided", "p1", "approved"),
    ]
    assert events[0].index == 2 and all(isinstance(e, Event) for e in events)
    assert log.sm.take_events() == []


def test_events_are_bounded(monkeypatch):
    monkeypatch.setattr(smod, "MAX_EVENTS", 5)
    log = Log()
    for i in range(8):
        put(log, f"k{i}", b"")
    events = log.sm.take_events()
    assert [e.name for e in events] == ["k3", "k4", "k5", "k6", "k7"]
    assert log.sm.stats["events_dropped"] == 3


# ---------------------------------------------------------- result codec


def test_result_wire_round_trip_and_validation():
    for r in (Result(True, None, 5), Result(False, "conflict", 3), Result(True, None, 9, "approved"), Result(True, None, 1, 0)):
        assert Result.from_wire(r.to_wire()) == r
    for bad in ([True, "", 1, None], [1, "", 1], [False, "", 1], [True, "x", 1], [True, "", -1], "x", [True, ""]):
        with pytest.raises(BadMessage):
            Result.from_wire(bad)


# --------------------------------------------------------- determinism, snapshots


def random_commands(rng: random.Random, n: int) -> list:
    """A mixed workload, including retries, bad commands and conf changes."""
    out = []
    rids = []
    keys = [f"k{i}" for i in range(8)] + ["dir/a", "dir/b"]
    voters = ["a", "b", "c", "d", "e"]
    for i in range(n):
        x = rng.random()
        rid = rng.randbytes(16)
        if x < 0.05 and rids:
            out.append(("retry", rng.choice(rids)))
            continue
        if x < 0.08:
            out.append(("raw", rng.randbytes(rng.randrange(0, 20))))
            continue
        if x < 0.10:
            out.append(("conf", rng.sample(voters, rng.randrange(1, 6))))
            continue
        key = rng.choice(keys)
        if x < 0.40:
            data = encode_command("kv.put", rid, key=key, value=rng.randbytes(rng.randrange(0, 8)))
        elif x < 0.50:
            data = encode_command("kv.del", rid, key=key)
        elif x < 0.60:
            data = encode_command("kv.cas", rid, key=key, rev=rng.randrange(0, i + 3), value=b"c")
        elif x < 0.70:
            data = encode_command(
                "prop.new", rid, id=f"p{rng.randrange(20)}", value=[i, "v"],
                deadline_ms=rng.choice([None, rng.randrange(10_000)]), proposer="a", created_ms=i,
            )
        elif x < 0.95:
            data = encode_command(
                "prop.vote", rid, id=f"p{rng.randrange(20)}", voter=rng.choice(voters + ["zed"]),
                choice=rng.choice(["approve", "reject"]), now_ms=i,
            )
        else:
            data = encode_command("prop.expire", rid, now_ms=rng.randrange(10_000))
        rids.append(data)
        out.append(("raw", data))
    return out


def feed(sm: StateMachine, commands, start=1) -> list:
    results = []
    for index, (kind, data) in enumerate(commands, start=start):
        if kind == "conf":
            sm.set_voters(data, index)
            results.append(None)
        else:
            results.append(sm.apply(index, data))
    return results


@pytest.mark.parametrize("seed", range(5))
def test_two_machines_fed_the_same_log_agree_byte_for_byte(seed):
    commands = random_commands(random.Random(seed), 600)
    one, two = StateMachine(), StateMachine()
    assert feed(one, commands) == feed(two, commands)
    assert one.snapshot() == two.snapshot()
    assert one.take_events() == two.take_events()
    assert len(one) > 0 and one.proposals(), "the workload should leave some state"


@pytest.mark.parametrize("seed", range(5))
def test_snapshot_restore_round_trips_and_continues_identically(seed):
    rng = random.Random(100 + seed)
    commands = random_commands(rng, 800)
    cut = rng.randrange(1, 800)
    whole = StateMachine()
    feed(whole, commands[:cut])
    restored = StateMachine()
    restored.restore(whole.snapshot())
    assert restored.snapshot() == whole.snapshot()
    assert restored.applied == whole.applied and restored.revision == whole.revision
    assert restored.voters == whole.voters
    assert restored.list() == whole.list()
    assert restored.proposals() == whole.proposals()
    assert feed(restored, commands[cut:], cut + 1) == feed(whole, commands[cut:], cut + 1)
    assert restored.snapshot() == whole.snapshot()


def test_state_does_not_depend_on_string_hashing():
    """Set and dict order must not leak into the state: the same log under two
    hash seeds gives the same snapshot (each run is a fresh interpreter)."""
    script = (
        "import hashlib, random, sys; sys.path.insert(0, 'tests');"
        "from test_statemachine import random_commands, feed;"
        "from agent.core.statemachine import StateMachine;"
        "sm = StateMachine(); feed(sm, random_commands(random.Random(7), 400));"
        "print(hashlib.sha256(sm.snapshot()).hexdigest())"
    )
    root = Path(__file__).resolve().parent.parent
    digests = {
        subprocess.run(
            [sys.executable, "-c", script], cwd=root, env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True, text=True, check=True,
        ).stdout
        for seed in ("1", "2", "3")
    }
    assert len(digests) == 1 and len(digests.pop().strip()) == 64


def test_restore_replaces_everything_and_announces_itself():
    log = Log()
    put(log, "old", b"1")
    other = Log(("x",))
    put(other, "new", b"2")
    log.sm.take_events()
    put(log, "pending", b"")
    log.sm.restore(other.sm.snapshot())
    assert log.sm.get("old") is None and log.sm.get("new").value == b"2"
    assert log.sm.voters == ("x",)
    assert [e.kind for e in log.sm.take_events()] == ["restore"]


def _snap(sm, **changes):
    top = cbor2.loads(sm.snapshot())
    top.update(changes)
    return cbor2.dumps(top, canonical=True)


def test_a_bad_snapshot_is_refused_and_changes_nothing():
    log = Log()
    put(log, "a", b"1")
    put(log, "b", b"2")
    new_prop(log)
    good = log.sm.snapshot()
    target = Log(("q",))
    put(target, "mine", b"")
    before = target.sm.snapshot()
    kv = cbor2.loads(good)["kv"]
    bads = [
        b"\xff",
        cbor2.dumps([1]),
        _snap(log.sm, v=2),
        _snap(log.sm, kv=list(reversed(kv))),  # not sorted
        _snap(log.sm, kv=kv + kv),  # duplicates
        _snap(log.sm, revision=log.sm.applied + 1),
        _snap(log.sm, voters=["b", "a"]),
        _snap(log.sm, dedup=[[b"short", [True, "", 1]]]),
        _snap(log.sm, open=[{"id": "p"}]),
        _snap(log.sm, decided=cbor2.loads(good)["open"]),  # an open proposal among the decided
        _snap(log.sm, extra=1),
    ]
    for bad in bads:
        with pytest.raises(BadMessage):
            target.sm.restore(bad)
        assert target.sm.snapshot() == before


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 200))
def test_snapshot_round_trip_property(seed, n):
    sm = StateMachine()
    feed(sm, random_commands(random.Random(seed), n))
    copy = StateMachine()
    copy.restore(sm.snapshot())
    assert copy.snapshot() == sm.snapshot()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_decode(data):
    try:
        decode_command(data)
    except BadMessage:
        pass


_SAMPLE = None


def _sample_snapshot() -> bytes:
    global _SAMPLE
    if _SAMPLE is None:
        sm = StateMachine()
        feed(sm, random_commands(random.Random(3), 150))
        _SAMPLE = sm.snapshot()
    return _SAMPLE


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_corrupted_snapshots_are_refused_cleanly(data):
    """A snapshot comes from a peer: flipped or cut bytes give BadMessage or a
    valid state, never another exception."""
    good = bytearray(_sample_snapshot())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(good) - 1))
        good[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        good = good[: data.draw(st.integers(0, len(good)))]
    sm = StateMachine()
    try:
        sm.restore(bytes(good))
    except BadMessage:
        assert sm.snapshot() == StateMachine().snapshot()
    else:
        copy = StateMachine()
        copy.restore(sm.snapshot())
        assert copy.snapshot() == sm.snapshot()
