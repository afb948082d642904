"""Task specs, records and messages: round trips, the strict decoder on hostile
input, the merge rule replicas use, and errors that name the bad field."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import taskspec as ts
from agent.messages import BadMessage

SPEC = ts.TaskSpec("0123456789abcdef", "echo", {"a": 1, "b": "x", "c": [1, {"d": b"\x00"}]}, ("camera", "ram_mb>=1024"),
                   origin="n1", submitted_ms=5)
RESULT = ts.Result("ok", 0, "n1", 1, 10, 20, b"o" * ts.MAX_STDOUT, b"e" * ts.MAX_STDERR, 5000, 900)
RECORD = ts.Record(SPEC, "done", 1, "n1", 7, tuple(ts.Event(10**12, "placed", "n1", "x" * ts.MAX_DETAIL) for _ in range(ts.MAX_HISTORY)), RESULT)

MESSAGES = [
    ts.Submit(1, SPEC), ts.SubmitReply(1, SPEC.id, False, "no"), ts.Replicate(RECORD), ts.ReplicaAck(SPEC.id, 3),
    ts.Assign(SPEC, 2, "retried"), ts.Update(SPEC.id, 1, "running", "stolen:n2"), ts.Revoke(SPEC.id, 1, "stale"),
    ts.Done(SPEC.id, RESULT), ts.Done(SPEC.id, RESULT, SPEC), ts.DoneAck(SPEC.id, 1), ts.Check(((SPEC.id, 1),)),
    ts.CheckReply(((SPEC.id, 1, "moved", "n3"),)), ts.CallForBids(SPEC.id, 2, "echo", ("camera",)),
    ts.Bid(SPEC.id, 2, 1000, 10, 500, 0), ts.StealRequest(4, ("echo", "sleep")), ts.Handoff("migrated", ((SPEC, 1),)),
    ts.Query(9, SPEC.id), ts.QueryReply(9, None), ts.QueryReply(9, RECORD), ts.Cancel(3, SPEC.id),
    ts.CancelReply(3, True), ts.ListReq(4, "queued", "n2"), ts.ListReply(4, ((SPEC.id, "echo", "done", "n1", 1, 5),)),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    assert ts.decode_message(ts.encode_message(msg)) == msg


def test_the_largest_record_fits_a_task_datagram():
    big = ts.TaskSpec("0123456789abcdef", "k" * 32, {"a": "x" * 490}, tuple(f"c{i}" * 15 for i in range(ts.MAX_CAPS)),
                      key="y" * 64, origin="n" * 64)
    rec = ts.fit_record(ts.Record(big, "done", 1, "n" * 64, 1, RECORD.history, RESULT))
    assert len(cbor2.dumps(rec.to_wire())) <= ts.MAX_RECORD
    assert rec.history[0] == RECORD.history[0]  # trimmed in the middle


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_hostile_bytes_only_ever_raise_bad_message(data):
    try:
        ts.decode_message(data)
    except BadMessage:
        pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(MESSAGES), st.data())
def test_a_mangled_field_is_bad_message_not_a_crash(msg, data):
    wire = ts.to_wire(msg)
    key = data.draw(st.sampled_from(sorted(wire)))
    wire[key] = data.draw(st.one_of(st.integers(-5, 2**64), st.text(max_size=5), st.binary(max_size=5), st.lists(st.integers(), max_size=3), st.booleans()))
    try:
        ts.decode_message(cbor2.dumps(wire))
    except BadMessage:
        pass


def test_oversized_and_malformed_fields_are_refused():
    wire = ts.to_wire(ts.Submit(1, SPEC))
    wire["spec"]["a"] = {"x": "y" * (ts.MAX_ARGS + 1)}
    with pytest.raises(BadMessage):
        ts.decode_message(cbor2.dumps(wire))
    wire = ts.to_wire(ts.Check(((SPEC.id, 1),) * 2))
    wire["items"] = [[SPEC.id, 1]] * (ts.MAX_BATCH + 1)
    with pytest.raises(BadMessage):
        ts.decode_message(cbor2.dumps(wire))
    with pytest.raises(BadMessage):
        ts.decode_message(cbor2.dumps({"T": 99}))


def test_merge_keeps_one_result_whatever_the_order():
    a = ts.Record(SPEC, "running", 2, "n2", 9)
    first = ts.Record(SPEC, "done", 1, "n1", 5, (), RESULT)
    second = ts.Record(SPEC, "done", 2, "n2", 12, (), ts.Result("ok", 0, "n2", 2, 30, 40))
    for x, y in ((a, first), (first, a), (first, second), (second, first)):
        assert ts.newer(x, y).result == RESULT  # a result beats none; the lower attempt wins
    cancelled = ts.Record(SPEC, "cancelled", 1, "n1", 3, (), ts.Result("cancelled", 0, "c", 0, 1, 1))
    assert ts.newer(first, cancelled) is cancelled and ts.newer(cancelled, first) is cancelled


@pytest.mark.parametrize("change, key", [
    ({"id": "XYZ"}, "id"), ({"kind": "Bad Kind"}, "kind"), ({"args": {"x": 1.5}}, "args"),
    ({"args": {"x": "y" * 600}}, "args"), ({"caps": ("a b",)}, "caps"), ({"caps": tuple("abcdefghi")}, "caps"),
    ({"priority": 10}, "priority"), ({"timeout_s": -1}, "timeout_s"), ({"max_attempts": 0}, "max_attempts"),
    ({"key": "has space"}, "key"), ({"strategy": "random"}, "strategy"),
])
def test_a_bad_spec_names_the_field(change, key):
    from dataclasses import replace

    with pytest.raises(ts.SpecError) as e:
        ts.check_spec(replace(SPEC, **change))
    assert e.value.key == key and key in str(e.value)


def test_an_idempotency_key_always_names_the_same_task():
    assert ts.task_id_for_key("photo-42") == ts.task_id_for_key("photo-42") != ts.task_id_for_key("photo-43")
    assert ts.parse_arg_value("12") == 12 and ts.parse_arg_value("true") is True and ts.parse_arg_value("1.5") == "1.5"
