"""The packet codec: round trips, strict rejection with the right reason, fuzz,
exact size helpers, state splitting, and the metadata codec."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import PROTOCOL_VERSION
from agent.messages import (
    MAX_INCARNATION,
    MAX_META,
    MAX_SEQ,
    MAX_STATES,
    Ack,
    Alive,
    BadMessage,
    Dead,
    IndirectPing,
    MemberState,
    Nack,
    Packet,
    Ping,
    PushPull,
    Status,
    Suspect,
)
from agent.wire import (
    MAX_DATAGRAM,
    MAX_MESSAGES,
    MAX_PACKET,
    MAX_VERSION,
    META_FIXED_MAX,
    decode_meta,
    decode_packet,
    encode_meta,
    encode_packet,
    encoded_size,
    packet_size,
    split_states,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------- strategies

node_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")
addrs = st.ip_addresses().map(str)
ports = st.integers(1, 65535)
incs = st.integers(0, MAX_INCARNATION)
seqs = st.integers(0, MAX_SEQ)
metas = st.binary(max_size=48)
states = st.builds(MemberState, node_ids, incs, st.sampled_from(Status), addrs, ports, metas)
messages = st.one_of(
    st.builds(Ping, seqs, node_ids),
    st.builds(IndirectPing, seqs, node_ids, addrs, ports),
    st.builds(Ack, seqs),
    st.builds(Nack, seqs),
    st.builds(Alive, node_ids, incs, addrs, ports, metas),
    st.builds(Suspect, node_ids, incs, node_ids),
    st.builds(Dead, node_ids, incs, node_ids),
    st.builds(PushPull, st.lists(states, max_size=4).map(tuple), st.booleans(), st.booleans()),
)
packets = st.builds(Packet, node_ids, st.lists(messages, min_size=1, max_size=6).map(tuple))

ONE_OF_EACH = Packet(
    "pi-01",
    (
        Ping(1, "pi-02"),
        IndirectPing(MAX_SEQ, "pi-03", "fe80::1", 5683),
        Ack(0),
        Nack(7),
        Alive("pi-04", MAX_INCARNATION, "192.168.1.23", 5683, b"\x00meta"),
        Suspect("pi-05", 3, "pi-01"),
        Dead("pi-06", 4, "pi-06"),
        PushPull((MemberState("pi-07", 1, Status.LEFT, "10.0.0.7", 1, b""),), reply=True, join=False),
    ),
)


def raw(*msgs, version=PROTOCOL_VERSION, sender="a") -> bytes:
    return cbor2.dumps([version, sender, list(msgs)])


def reason(data: bytes, **kw) -> str:
    with pytest.raises(BadMessage) as e:
        decode_packet(data, **kw)
    return e.value.reason


# --------------------------------------------------------------- round trips


def test_every_type_round_trips():
    data = encode_packet(ONE_OF_EACH)
    assert decode_packet(data) == ONE_OF_EACH
    assert decode_packet(data, expect_sender="pi-01") == ONE_OF_EACH


@FAST
@given(packets)
def test_round_trip_and_exact_sizes(p):
    data = encode_packet(p)
    assert len(data) == packet_size(p.sender, p.messages)
    assert len(data) == packet_size(p.sender, ()) + sum(encoded_size(m) for m in p.messages)
    if len(data) <= MAX_DATAGRAM:
        assert decode_packet(data) == p
    else:
        assert reason(data) == "oversized"


def test_encode_refuses_too_many_messages():
    with pytest.raises(ValueError):
        encode_packet(Packet("a", (Ack(1),) * (MAX_MESSAGES + 1)))


# ------------------------------------------------------------ strict decoding

VALID = raw([2, 1])
ALIVE4 = [4, "n", 1, b"\x0a\x00\x00\x01", 80, b""]
STATE = ["n", 1, 0, b"\x0a\x00\x00\x01", 80, b""]


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"\x80" * (MAX_DATAGRAM + 1), "oversized"),
        (b"", "truncated"),
        (VALID[:-1], "truncated"),
        (b"\x5a\xff\xff\xff\xff", "truncated"),  # byte string longer than the input
        (b"\x9b" + b"\xff" * 8, "truncated"),  # array claiming 2**64-1 items
        (VALID + b"\x00", "malformed"),  # trailing bytes
        (b"\x1c", "malformed"),  # reserved additional info
        (raw([2, 1.0]), "malformed"),  # float where an int belongs
        (raw([2, 1.5]), "malformed"),
        (raw({0: 2, 1: 1}), "malformed"),  # map where an array belongs
        (cbor2.dumps({"v": 1}), "malformed"),
        (raw([2, cbor2.CBORTag(2, b"\x01")]), "malformed"),  # bignum tag
        (b"\xd8\x1c\x81\xd8\x1d\x00", "malformed"),  # shared-reference cycle
        (raw([2, None]), "malformed"),
        (raw([2, cbor2.undefined]), "malformed"),
        (b"\x83\x01\x61a\x9f\x82\x02\x01\xff", "malformed"),  # indefinite-length array
        (b"\x83\x01\x7f\x61a\xff\x81\x82\x02\x01", "malformed"),  # indefinite-length text
        (b"\x83\x01\x61a\x81\x82\x02\x18\x05", "malformed"),  # 5 in a padded head
        (b"\x83\x01\x61a\x81\x82\x02\x19\x00\x05", "malformed"),
        (b"\x83\x01\x61\xff\x81\x82\x02\x01", "malformed"),  # invalid UTF-8 sender
        (b"\x81" * 6 + b"\x01", "malformed"),  # nested too deep
        (b"\x81" * 1000 + b"\x01", "malformed"),
        (cbor2.dumps(5), "bad_field"),
        (cbor2.dumps([PROTOCOL_VERSION, "a"]), "bad_field"),
        (cbor2.dumps([PROTOCOL_VERSION, "a", b"x"]), "bad_field"),
        (raw(version=PROTOCOL_VERSION + 1), "bad_version"),
        (raw([2, 1], version=True), "bad_version"),
        (raw([2, 1], version="1"), "bad_version"),
        (raw([99, 1]), "unknown_type"),
        (raw([2**64 - 1, 1]), "unknown_type"),
        (raw(), "bad_field"),  # no messages
        (raw(5), "bad_field"),  # message is not an array
        (raw([]), "bad_field"),
        (raw([True, 1]), "bad_field"),  # bool is not a type code
        (raw(["2", 1]), "bad_field"),
        (raw([2]), "bad_field"),  # wrong field counts
        (raw([2, 1, 2]), "bad_field"),
        (raw(ALIVE4[:-1]), "bad_field"),
        (raw([2, -1]), "bad_field"),
        (raw([2, MAX_SEQ + 1]), "bad_field"),
        (raw([2, True]), "bad_field"),
        (raw([2, "1"]), "bad_field"),
        (raw(*[[2, 1]] * (MAX_MESSAGES + 1)), "too_many"),
        (raw([2, 1], sender=""), "bad_node_id"),
        (raw([2, 1], sender="a b"), "bad_node_id"),
        (raw([2, 1], sender=7), "bad_node_id"),
        (raw([0, 1, "-x"]), "bad_node_id"),
        (raw(ALIVE4[:3] + [b"\x0a\x00\x00"] + ALIVE4[4:]), "bad_addr"),
        (raw(ALIVE4[:3] + ["10.0.0.1"] + ALIVE4[4:]), "bad_addr"),
        (raw(ALIVE4[:4] + [0, b""]), "bad_port"),
        (raw(ALIVE4[:4] + [65536, b""]), "bad_port"),
        (raw(ALIVE4[:5] + [b"m" * (MAX_META + 1)]), "bad_meta"),
        (raw(ALIVE4[:5] + ["meta"]), "bad_meta"),
        (raw([7, [STATE[:2] + [9] + STATE[3:]], False, False]), "bad_field"),  # unknown status
        (raw([7, [STATE[:2] + [True] + STATE[3:]], False, False]), "bad_field"),
        (raw([7, [STATE[:-1]], False, False]), "bad_field"),
        (raw([7, [STATE] * (MAX_STATES + 1), False, False]), "bad_field"),
        (raw([7, STATE, False, False]), "bad_field"),  # a state where the list belongs
        (raw([7, [], 1, False]), "bad_field"),
    ],
)
def test_rejects_with_reason(data, expected):
    assert reason(data) == expected


def test_sender_mismatch():
    assert reason(VALID, expect_sender="b") == "sender_mismatch"


# ---------------------------------------------------------------------- fuzz


def _decode_or_bad(data: bytes) -> None:
    """Only BadMessage may escape; anything accepted re-encodes to the same bytes."""
    try:
        p = decode_packet(data)
    except BadMessage:
        return
    assert encode_packet(p) == data


@FUZZ
@given(st.binary(max_size=MAX_DATAGRAM + 8))
def test_fuzz_random_bytes(data):
    _decode_or_bad(data)


@FUZZ
@given(packets, st.data())
def test_fuzz_mutated_packets(p, data):
    buf = bytearray(encode_packet(p))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "cut"]))
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and buf:
            buf[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=9))
        elif op == "delete":
            del buf[i : i + data.draw(st.integers(1, 4))]
        elif op == "cut":
            del buf[i:]
    _decode_or_bad(bytes(buf))


# -------------------------------------------------------------- split_states

big_states = st.builds(MemberState, node_ids, incs, st.sampled_from(Status), addrs, ports, st.binary(max_size=MAX_META))


@FAST
@given(node_ids, st.lists(big_states, max_size=150), st.sampled_from([420, 600, MAX_PACKET]))
def test_split_states_fit_and_cover(sender, sts, budget):
    parts = split_states(sender, sts, budget)
    assert [s for part in parts for s in part] == sts
    assert all(parts) if sts else parts == [()]
    for part in parts:
        assert len(part) <= MAX_STATES
        data = encode_packet(Packet(sender, (PushPull(part, reply=True, join=True),)))
        assert len(data) <= budget
        assert len(data) == packet_size(sender, (PushPull(part),))


def test_split_states_fills_parts_and_respects_max_states():
    tiny = [MemberState(f"n{i}", 0, Status.ALIVE, "10.0.0.1", 1) for i in range(MAX_STATES + 5)]
    assert [len(p) for p in split_states("a", tiny, 4 * MAX_DATAGRAM)] == [MAX_STATES, 5]
    assert split_states("a", [], MAX_PACKET) == [()]


def test_split_states_refuses_a_state_that_cannot_fit():
    fat = MemberState("n", 0, Status.ALIVE, "10.0.0.1", 1, b"m" * MAX_META)
    with pytest.raises(ValueError):
        split_states("a", [fat], 200)


# ---------------------------------------------------------------------- meta

LOAD = {"cpu": 12.345, "mem": 55.0, "load1": 0.47, "temp_c": 48.25, "throttled": 0x50005}


def test_meta_round_trip_rounds_to_one_decimal():
    m = encode_meta(LOAD, ["gpio", "camera"], "0.1.0")
    assert decode_meta(m) == {
        "cpu": 12.3,
        "mem": 55.0,
        "load1": 0.5,
        "temp_c": 48.2,
        "throttled": 0x50005,
        "version": "0.1.0",
        "capabilities": ["gpio", "camera"],
    }


def test_meta_leaves_out_unknown_values():
    m = encode_meta({"cpu": float("nan"), "mem": float("inf"), "temp_c": None, "throttled": None}, [], "1")
    assert decode_meta(m) == {"version": "1", "capabilities": []}


def test_meta_fixed_part_bound():
    extreme = {"cpu": -1e308, "mem": 1e308, "load1": 2**1100, "temp_c": -273.15, "throttled": 2**32 - 1}
    # the one capability cannot fit, so neither can the kind after it
    m = encode_meta(extreme, ["x" * MAX_META], "v" * MAX_VERSION, kinds=["transcode"], queued=2**40)
    assert len(m) <= META_FIXED_MAX
    got = decode_meta(m)
    assert got["caps_truncated"] is True and got["capabilities"] == [] and got["kinds"] == []
    assert got["queued"] == 2**31 - 1


def test_meta_names_always_get_what_the_fixed_part_leaves():
    extreme = {"cpu": -1e308, "mem": 1e308, "load1": 2**1100, "temp_c": -273.15, "throttled": 2**32 - 1}
    caps, kinds = [f"c{i}" + "c" * 20 for i in range(6)], ["k" * 24]  # 6 * 23 + 26 = 164 bytes of names
    assert MAX_META - META_FIXED_MAX == 164
    got = decode_meta(encode_meta(extreme, caps, "v" * MAX_VERSION, kinds=kinds, queued=2**31 - 1))
    assert (got["capabilities"], got["kinds"]) == (caps, kinds) and "caps_truncated" not in got


def test_meta_carries_kinds_and_queue_length():
    m = encode_meta(LOAD, ["camera"], "0.1.0", kinds=["transcode", "resize.v2"], queued=17)
    got = decode_meta(m)
    assert got["capabilities"] == ["camera"] and got["kinds"] == ["transcode", "resize.v2"] and got["queued"] == 17
    assert "caps_truncated" not in got


@pytest.mark.parametrize("queued, expected", [(0, 0), (-5, 0), (2**31 - 1, 2**31 - 1), (2**63, 2**31 - 1)])
def test_meta_queue_length_is_clamped(queued, expected):
    assert decode_meta(encode_meta({}, [], "1", queued=queued))["queued"] == expected


def test_meta_without_kinds_or_queue_is_unchanged():
    """An agent without handlers sends what it sent before tasks existed."""
    m = encode_meta(LOAD, ["gpio"], "0.1.0")
    assert m == encode_meta(LOAD, ["gpio"], "0.1.0", kinds=(), queued=None)
    assert set(cbor2.loads(m)) == {"c", "m", "l", "t", "h", "v", "k"}
    assert "kinds" not in decode_meta(m) and "queued" not in decode_meta(m)


@FAST
@given(
    st.lists(st.text(max_size=40), max_size=40),
    st.lists(st.from_regex(r"\A[a-z0-9_.-]{1,32}\Z"), min_size=1, max_size=32),
)
def test_meta_truncates_capabilities_then_kinds_from_the_end(caps, kinds):
    m = encode_meta(LOAD, caps, "0.1.0", kinds=kinds, queued=3)
    assert len(m) <= MAX_META
    got = decode_meta(m)
    kept = got["capabilities"] + got["kinds"]
    names = caps + kinds
    assert kept == names[: len(kept)] and got["queued"] == 3
    assert got["kinds"] == [] or got["capabilities"] == caps  # kinds only after every capability
    assert got.get("caps_truncated", False) == (len(kept) < len(names))
    if len(kept) < len(names):  # the next name would not have fit (its array head may grow by 1 byte)
        assert len(m) + len(cbor2.dumps(names[len(kept)])) + 1 > MAX_META


@FAST
@given(st.lists(st.text(max_size=40), max_size=60))
def test_meta_truncates_capabilities_from_the_end(caps):
    m = encode_meta(LOAD, caps, "0.1.0")
    assert len(m) <= MAX_META
    got = decode_meta(m)
    kept = got["capabilities"]
    assert kept == caps[: len(kept)]
    assert got.get("caps_truncated", False) == (len(kept) < len(caps))
    if len(kept) < len(caps):  # the next one would not have fit beside the 3-byte truncation mark
        longer = encode_meta(LOAD, caps[: len(kept) + 1], "0.1.0")
        assert len(longer) > MAX_META - 3 or decode_meta(longer).get("caps_truncated")


def test_meta_refuses_long_version():
    with pytest.raises(ValueError):
        encode_meta({}, [], "v" * (MAX_VERSION + 1))


@pytest.mark.parametrize(
    "meta, expected",
    [
        (b"", {}),
        (b"\xff", {"invalid": True}),
        (cbor2.dumps([1, 2]), {"invalid": True}),
        (cbor2.dumps({"c": 1.5}), {"invalid": True}),  # floats are outside the subset
        (b"m" * (MAX_META + 1), {"invalid": True}),
        (cbor2.dumps({"c": "high", "m": 5, "k": ["a", 3], "x": 1, "zz": 9}), {"mem": 0.5, "capabilities": ["a"]}),
        (cbor2.dumps({"j": ["ok", 3, "Bad", "", "x" * 33, b"raw", "a.b-c_1"], "q": 4}), {"kinds": ["ok", "a.b-c_1"], "queued": 4}),
        (cbor2.dumps({"j": "transcode", "q": -1}), {}),
        (cbor2.dumps({"j": {"a": 1}, "q": 2**31}), {}),
        (cbor2.dumps({"j": [["transcode"]]}), {"invalid": True}),  # nested deeper than meta ever is
        (cbor2.dumps({"j": [], "q": True}), {"kinds": []}),
        (cbor2.dumps({"q": 2**31}), {}),
        (cbor2.dumps({"q": "7"}), {}),
    ],
)
def test_decode_meta_is_tolerant(meta, expected):
    assert decode_meta(meta) == expected


@FUZZ
@given(st.binary(max_size=MAX_META + 4))
def test_decode_meta_never_raises(meta):
    assert isinstance(decode_meta(meta), dict)
