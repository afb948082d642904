"""CBOR codec for mesh packets, size helpers for packing, and the member metadata codec.

Pure functions, no I/O, so the sans-IO cores and the simulator can use them.

Wire layout (arrays only, small-int type codes, so packets are small and the
decoder strict)::

    packet       = [PROTOCOL_VERSION, sender, [msg, ...]]        at most MAX_MESSAGES msgs
    Ping         = [0, seq, target]
    IndirectPing = [1, seq, target, addr, port]
    Ack          = [2, seq]
    Nack         = [3, seq]
    Alive        = [4, node, incarnation, addr, port, meta]
    Suspect      = [5, node, incarnation, sender]
    Dead         = [6, node, incarnation, sender]
    PushPull     = [7, [state, ...], reply, join]
    state        = [node, incarnation, status, addr, port, meta]   (MemberState)

`addr` travels packed (4 or 16 bytes, not text: it saves 9-30 bytes per
address) and decodes to the canonical text `str(ipaddress.ip_address(...))`;
an IPv6 zone index (``%eth0``) means nothing to another host and is not sent.
So `decode_packet(encode_packet(p)) == p` whenever p's addresses are canonical.

Decoding admits only a plain subset of CBOR and checks it byte by byte before
cbor2 sees the data (`loads_strict`): unsigned and negative integers, byte and
text strings, definite-length arrays, false/true, each in its shortest form,
nested at most MAX_DEPTH deep. Tags, floats, maps, null/undefined/simple
values, indefinite lengths and padded heads are "malformed". This keeps
cbor2's rich tag zoo (shared references that can form cycles or DAGs that
explode when walked, dates, regexes, bignums) out of reach of a hostile peer
whatever cbor2 version is installed, and makes decode/encode a bijection on
accepted input. Peer-caused failures raise `BadMessage` with these reasons:
oversized, truncated, malformed, bad_version, unknown_type, too_many,
bad_field, sender_mismatch, plus the message validators' own (bad_node_id,
bad_addr, bad_port, bad_meta).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Sequence

import cbor2

from agent import PROTOCOL_VERSION
from agent.messages import (
    MAX_META,
    MAX_STATES,
    Ack,
    Alive,
    BadMessage,
    Dead,
    IndirectPing,
    MemberState,
    Message,
    Nack,
    Packet,
    Ping,
    PushPull,
    Status,
    Suspect,
)

MAX_DATAGRAM = 1024
"""Largest sealed datagram: the CoAP payload limit of RFC 7252 (no block-wise transfer)."""

ENVELOPE_OVERHEAD = 179
"""Worst-case bytes `agent.envelope` adds around a packet of 256..MAX_PACKET bytes
(test_envelope checks it is exact): COSE tag 1 + array head 1 + protected header
bstr 45 (mesh name up to 32 bytes) + unprotected {kid, iv} 25 + ciphertext bstr
head 3 + Poly1305 tag 16 + plaintext [sender (<=64 bytes): 66, boot: 9,
counter: 9, packet bstr head: 3] with its array head 1. The insecure framing
needs less (141)."""

MAX_PACKET = MAX_DATAGRAM - ENVELOPE_OVERHEAD  # 845
"""Largest encoded packet that still seals into MAX_DATAGRAM bytes."""

MAX_MESSAGES = 23
"""Messages in one packet. At most 23 keeps the messages array head one byte,
so `packet_size(sender, ())` is an exact, constant overhead for packing."""

MAX_DEPTH = 5  #: arrays nest packet > messages > PushPull > states > state

PING, INDIRECT_PING, ACK, NACK, ALIVE, SUSPECT, DEAD, PUSH_PULL = range(8)

# ---------------------------------------------------------------- strict CBOR

_MIN_ARG = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}  # below these the head is padded
_FALSE, _TRUE = 20, 21  # major type 7 simple values we admit


def loads_strict(data: bytes, *, maps: bool = False, max_depth: int = MAX_DEPTH) -> object:
    """Decode one CBOR item of the plain subset (see module doc), or raise BadMessage.

    `maps=True` also admits definite-length maps (the envelope's COSE headers
    and the meta codec use them)."""
    _scan(data, maps, max_depth)
    try:
        return cbor2.loads(data)
    except Exception as e:  # a third-party parser on hostile input; after the scan only bad UTF-8 should get here
        raise BadMessage("malformed", f"{type(e).__name__}: {e}"[:80]) from None


def _scan(data: bytes, maps: bool, max_depth: int) -> None:
    """Walk the item heads iteratively; cost is linear in the number of items."""
    end = len(data)
    pos = 0
    pending = [1]  # items still expected in each open container; bottom = the top-level item
    while pending:
        if not pending[-1]:
            pending.pop()
            continue
        pending[-1] -= 1
        if pos >= end:
            raise BadMessage("truncated")
        major, info = data[pos] >> 5, data[pos] & 0x1F
        pos += 1
        if major == 7:
            if info not in (_FALSE, _TRUE):
                raise BadMessage("malformed", "float or simple value")
            continue
        if info < 24:
            arg = info
        elif info < 28:
            size = 1 << (info - 24)
            if pos + size > end:
                raise BadMessage("truncated")
            arg = int.from_bytes(data[pos : pos + size], "big")
            pos += size
            if arg < _MIN_ARG[info]:
                raise BadMessage("malformed", "head not in shortest form")
        else:
            raise BadMessage("malformed", "indefinite length or reserved head")
        if major in (2, 3):  # byte or text string
            if arg > end - pos:
                raise BadMessage("truncated")
            pos += arg
        elif major == 4 or (major == 5 and maps):
            items = arg if major == 4 else 2 * arg
            if items > end - pos:  # every item takes at least one byte
                raise BadMessage("truncated")
            if len(pending) > max_depth:
                raise BadMessage("malformed", "nested too deep")
            pending.append(items)
        elif major > 1:  # tag (6), or a map where none is admitted (5)
            raise BadMessage("malformed", "tag" if major == 6 else "map")
    if pos != end:
        raise BadMessage("malformed", "trailing bytes")


def _head_size(n: int) -> int:
    """Bytes of a CBOR head whose argument is n (shortest form)."""
    return 1 if n < 24 else 2 if n < 1 << 8 else 3 if n < 1 << 16 else 5 if n < 1 << 32 else 9


# ------------------------------------------------------------------- packets


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def _addr(raw: object) -> str:
    if type(raw) is not bytes or len(raw) not in (4, 16):
        raise BadMessage("bad_addr", repr(raw)[:80])
    return str(ipaddress.ip_address(raw))


def _state_to_wire(s: MemberState) -> list:
    return [s.node, s.incarnation, int(s.status), _packed(s.addr), s.port, s.meta]


def _state_from_wire(f: object) -> MemberState:
    if type(f) is not list or len(f) != 6:
        raise BadMessage("bad_field", "member state")
    node, incarnation, status, addr, port, meta = f
    return MemberState(node, incarnation, _status(status), _addr(addr), port, meta)


def _status(raw: object) -> Status:
    """Strict: MemberState itself would also take True as SUSPECT."""
    try:
        if type(raw) is int:
            return Status(raw)
    except ValueError:
        pass
    raise BadMessage("bad_field", f"status={raw!r}"[:80])


def _pushpull_from_wire(states: object, reply: object, join: object) -> PushPull:
    if type(states) is not list or len(states) > MAX_STATES:
        raise BadMessage("bad_field", "states")
    return PushPull(tuple(_state_from_wire(s) for s in states), reply, join)


_TO_WIRE = {
    Ping: lambda m: [PING, m.seq, m.target],
    IndirectPing: lambda m: [INDIRECT_PING, m.seq, m.target, _packed(m.addr), m.port],
    Ack: lambda m: [ACK, m.seq],
    Nack: lambda m: [NACK, m.seq],
    Alive: lambda m: [ALIVE, m.node, m.incarnation, _packed(m.addr), m.port, m.meta],
    Suspect: lambda m: [SUSPECT, m.node, m.incarnation, m.sender],
    Dead: lambda m: [DEAD, m.node, m.incarnation, m.sender],
    PushPull: lambda m: [PUSH_PULL, [_state_to_wire(s) for s in m.states], m.reply, m.join],
    MemberState: _state_to_wire,
}

# type code -> (number of fields after the code, builder)
_FROM_WIRE = {
    PING: (2, Ping),
    INDIRECT_PING: (4, lambda seq, target, addr, port: IndirectPing(seq, target, _addr(addr), port)),
    ACK: (1, Ack),
    NACK: (1, Nack),
    ALIVE: (5, lambda node, inc, addr, port, meta: Alive(node, inc, _addr(addr), port, meta)),
    SUSPECT: (3, Suspect),
    DEAD: (3, Dead),
    PUSH_PULL: (3, _pushpull_from_wire),
}


def _to_wire(msg: Message | MemberState) -> list:
    try:
        return _TO_WIRE[type(msg)](msg)
    except KeyError:
        raise TypeError(f"not a mesh message: {type(msg).__name__}") from None


def _from_wire(f: object) -> Message:
    if type(f) is not list or not f or type(f[0]) is not int:
        raise BadMessage("bad_field", "message")
    try:
        arity, build = _FROM_WIRE[f[0]]
    except KeyError:
        raise BadMessage("unknown_type", str(f[0])[:20]) from None
    if len(f) != arity + 1:
        raise BadMessage("bad_field", f"type {f[0]} with {len(f) - 1} fields")
    return build(*f[1:])


def encode_packet(p: Packet) -> bytes:
    """Raises ValueError on more than MAX_MESSAGES messages: the packer's bug, not the peer's."""
    if len(p.messages) > MAX_MESSAGES:
        raise ValueError(f"{len(p.messages)} messages in one packet, at most {MAX_MESSAGES}")
    return cbor2.dumps([PROTOCOL_VERSION, p.sender, [_to_wire(m) for m in p.messages]])


def decode_packet(data: bytes, expect_sender: str | None = None) -> Packet:
    """Decode a peer's packet or raise BadMessage (never anything else on bad input).

    `expect_sender`: the sender the envelope authenticated; a packet naming
    someone else is refused as "sender_mismatch" (a keyholder impersonating)."""
    if len(data) > MAX_DATAGRAM:
        raise BadMessage("oversized", f"{len(data)} bytes")
    top = loads_strict(data)
    if type(top) is not list or len(top) != 3:
        raise BadMessage("bad_field", "packet")
    version, sender, msgs = top
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise BadMessage("bad_version", repr(version)[:20])
    if type(msgs) is not list:
        raise BadMessage("bad_field", "messages")
    if len(msgs) > MAX_MESSAGES:
        raise BadMessage("too_many", f"{len(msgs)} messages")
    if expect_sender is not None and sender != expect_sender:
        raise BadMessage("sender_mismatch", repr(sender)[:80])
    return Packet(sender, tuple(_from_wire(m) for m in msgs))


# -------------------------------------------------------------- size helpers


def encoded_size(msg: Message | MemberState) -> int:
    """Exact bytes of one message in a packet's messages array (or of one
    MemberState in a PushPull's states array)."""
    return len(cbor2.dumps(_to_wire(msg)))


def packet_size(sender: str, msgs: Sequence[Message]) -> int:
    """Exact `len(encode_packet(Packet(sender, msgs)))`; `packet_size(sender, ())`
    is the constant overhead to which each message adds its `encoded_size`
    (constant because MAX_MESSAGES keeps the array head one byte)."""
    return len(cbor2.dumps([PROTOCOL_VERSION, sender, []])) + sum(encoded_size(m) for m in msgs)


def split_states(sender: str, states: Iterable[MemberState], budget: int) -> list[tuple[MemberState, ...]]:
    """Split states, in order, into PushPull parts whose packet (from `sender`,
    carrying that PushPull alone) is at most `budget` bytes and which hold at
    most MAX_STATES each. Always returns at least one part (maybe empty), so a
    sync always sends something. ValueError if a single state cannot fit."""
    fixed = packet_size(sender, (PushPull(()),)) - _head_size(0)  # all but the states array head
    parts: list[tuple[MemberState, ...]] = []
    part: list[MemberState] = []
    total = 0
    for st in states:
        size = encoded_size(st)
        if part and (len(part) == MAX_STATES or fixed + _head_size(len(part) + 1) + total + size > budget):
            parts.append(tuple(part))
            part, total = [], 0
        if fixed + _head_size(len(part) + 1) + total + size > budget:
            raise ValueError(f"member state of {st.node!r} ({size} bytes) cannot fit a {budget}-byte packet")
        part.append(st)
        total += size
    parts.append(tuple(part))
    return parts


# ----------------------------------------------------------------- metadata

MAX_VERSION = 32  #: bytes of the version string in meta
META_FIXED_MAX = 92
"""Most bytes meta spends on everything but the capability and kind names: map
head 1, five numbers as key 2 + value <=5, version key 2 + head 2 + 32,
truncation mark 3, capabilities key 2 + array head <=3, kinds key 2 + array
head <=3, queued key 2 + value <=5 = 92. So capability and kind names together
always get at least MAX_META - META_FIXED_MAX = 164 bytes (each costs its UTF-8
length + 1, or + 2 from 24 bytes on)."""

_INT32 = 2**31 - 1
# load key -> compact key; these values travel as integer tenths (one decimal)
_TENTHS = {"cpu": "c", "mem": "m", "load1": "l", "temp_c": "t"}
#: A task kind (handler name); the same pattern as agent.core.taskspec.KIND_RE,
#: which cannot be imported here (taskspec builds on this module).
_KIND = re.compile(r"[a-z0-9_.-]{1,32}")


def _tenths(x: object) -> int | None:
    """x rounded to one decimal, as an int of tenths clamped to int32; None if
    x is not a finite number (a load reader glitch must not break gossip)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return round(max(-_INT32, min(_INT32, x * 10)))


def _meta_map(load: dict, names: Sequence[str], ncaps: int, version: str, queued: int | None, with_kinds: bool, truncated: bool) -> dict:
    """`names` is capabilities then kinds (maybe cut short); the first `ncaps` are capabilities."""
    m: dict = {}
    for name, key in _TENTHS.items():
        v = _tenths(load.get(name))
        if v is not None:
            m[key] = v
    throttled = load.get("throttled")
    if type(throttled) is int and 0 <= throttled <= 2**32 - 1:
        m["h"] = throttled
    m["v"] = version
    m["k"] = list(names[:ncaps])
    if with_kinds:
        m["j"] = list(names[ncaps:])
    if queued is not None:
        m["q"] = max(0, min(_INT32, int(queued)))
    if truncated:
        m["x"] = True
    return m


def encode_meta(
    load: dict,
    capabilities: Sequence[str],
    version: str,
    kinds: Sequence[str] = (),
    queued: int | None = None,
) -> bytes:
    """Compact CBOR map of load, capabilities, handler kinds, queue length and
    version, at most MAX_META bytes.

    Load keys: cpu, mem (percent), load1, temp_c (float or None), throttled
    (firmware flags int or None); missing or non-finite values are left out.
    `kinds`: the task kinds of the configured handlers (built-ins are implied,
    not sent); left out when empty. `queued`: tasks waiting in this node's
    queue, clamped to 0..2**31-1; left out when None. If capabilities and
    kinds do not all fit, the longest prefix of capabilities + kinds that does
    is kept and the meta is marked caps_truncated. ValueError if `version` is
    longer than MAX_VERSION bytes (our constant, so our bug)."""
    if len(version.encode()) > MAX_VERSION:
        raise ValueError(f"version {version!r} longer than {MAX_VERSION} bytes")
    names, ncaps, with_kinds = [*capabilities, *kinds], len(capabilities), bool(kinds)

    def meta(count: int, truncated: bool) -> bytes:
        return cbor2.dumps(_meta_map(load, names[:count], min(count, ncaps), version, queued, with_kinds, truncated))

    out = meta(len(names), False)
    if len(out) <= MAX_META:
        return out
    lo, hi = 0, len(names) - 1  # longest fitting prefix; size grows with the prefix
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(meta(mid, True)) <= MAX_META:
            lo = mid
        else:
            hi = mid - 1
    return meta(lo, True)


def decode_meta(b: bytes) -> dict:
    """Tolerant reverse of encode_meta; never raises.

    Returns the fields present and well-typed (cpu, mem, load1, temp_c as
    floats; throttled int; version str; capabilities list[str]; kinds
    list[str], only names a task kind may have; queued int in 0..2**31-1;
    caps_truncated True), skipping unknown keys so newer peers can add some.
    Empty meta gives {}; meta that is not a CBOR map of the plain subset gives
    {"invalid": True}."""
    if not isinstance(b, bytes) or len(b) > MAX_META:
        return {"invalid": True}
    if not b:
        return {}
    try:
        m = loads_strict(b, maps=True, max_depth=2)
    except BadMessage:
        return {"invalid": True}
    if type(m) is not dict:
        return {"invalid": True}
    out: dict = {}
    for name, key in _TENTHS.items():
        if type(m.get(key)) is int:
            out[name] = m[key] / 10
    if type(m.get("h")) is int:
        out["throttled"] = m["h"]
    if type(m.get("v")) is str:
        out["version"] = m["v"]
    if type(m.get("k")) is list:
        out["capabilities"] = [c for c in m["k"] if type(c) is str]
    if type(m.get("j")) is list:
        out["kinds"] = [k for k in m["j"] if type(k) is str and _KIND.fullmatch(k)]
    if type(m.get("q")) is int and 0 <= m["q"] <= _INT32:
        out["queued"] = m["q"]
    if m.get("x") is True:
        out["caps_truncated"] = True
    return out
