"""The mesh's messages, as small frozen dataclasses that validate themselves.

These are what the sans-IO cores consume and produce. `agent.wire` turns them
into CBOR and back; `agent.envelope` seals a packet for the network. A message
that is built from a peer's bytes and fails validation raises `BadMessage`
(the peer's fault); anything else raising is our bug.

Theory of operation (SWIM with Lifeguard, after hashicorp/memberlist):
a member probes one peer per probe period with `Ping`; a missing `Ack` leads
to `IndirectPing` through k other members, who answer `Ack` or `Nack`; no ack
at all makes the prober gossip `Suspect`; the suspect refutes with an `Alive`
of higher incarnation, or after a timeout everyone gossips `Dead`. `Dead` sent
by the node about itself means it left. `PushPull` exchanges full state for
joining and anti-entropy. Gossip (`Alive`, `Suspect`, `Dead`) piggybacks on
every packet that has room.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from enum import IntEnum

MAX_NODE_ID = 64  #: bytes of a node id
MAX_META = 256  #: bytes of a member's opaque metadata (load, capabilities)
MAX_STATES = 64  #: member states in one PushPull part (the codec splits further by size)
MAX_SEQ = 2**32 - 1
MAX_INCARNATION = 2**63 - 1

_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class BadMessage(ValueError):
    """A message from the network is malformed; `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Status(IntEnum):
    """A member's state as others see it. Order matters: it is the precedence
    between two claims at the same incarnation (dead beats suspect beats alive)."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


def check_node_id(node: object) -> str:
    if not isinstance(node, str) or not node or len(node.encode()) > MAX_NODE_ID or not _NODE_ID.match(node):
        raise BadMessage("bad_node_id", repr(node)[:80])
    return node


def check_uint(value: object, limit: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise BadMessage("bad_field", f"{what}={value!r}"[:80])
    return value


def check_addr(addr: object) -> str:
    if not isinstance(addr, str):
        raise BadMessage("bad_addr", repr(addr)[:80])
    try:
        return str(ipaddress.ip_address(addr))
    except ValueError:
        raise BadMessage("bad_addr", repr(addr)[:80]) from None


def check_port(port: object) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise BadMessage("bad_port", repr(port)[:80])
    return port


def check_meta(meta: object) -> bytes:
    if not isinstance(meta, bytes) or len(meta) > MAX_META:
        raise BadMessage("bad_meta", f"{type(meta).__name__} of {len(meta) if isinstance(meta, bytes) else '?'} bytes")
    return meta


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe. `target` guards against a stale address now used by someone else."""

    seq: int
    target: str

    def __post_init__(self):
        check_uint(self.seq, MAX_SEQ, "seq")
        check_node_id(self.target)


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe `target` at addr:port and relay the ack (or a nack)."""

    seq: int
    target: str
    addr: str
    port: int

    def __post_init__(self):
        check_uint(self.seq, MAX_SEQ, "seq")
        check_node_id(self.target)
        object.__setattr__(self, "addr", check_addr(self.addr))  # canonical text, as it decodes
        check_port(self.port)


@dataclass(frozen=True, slots=True)
class Ack:
    """Answer to a Ping (or a relayed IndirectPing) with the same seq."""

    seq: int

    def __post_init__(self):
        check_uint(self.seq, MAX_SEQ, "seq")


@dataclass(frozen=True, slots=True)
class Nack:
    """From a relay: the target did not answer in time, but the relay itself is fine
    (Lifeguard uses missing nacks as a sign that the prober itself is unhealthy)."""

    seq: int

    def __post_init__(self):
        check_uint(self.seq, MAX_SEQ, "seq")


@dataclass(frozen=True, slots=True)
class Alive:
    node: str
    incarnation: int
    addr: str
    port: int
    meta: bytes = b""

    def __post_init__(self):
        check_node_id(self.node)
        check_uint(self.incarnation, MAX_INCARNATION, "incarnation")
        object.__setattr__(self, "addr", check_addr(self.addr))  # canonical text, as it decodes
        check_port(self.port)
        check_meta(self.meta)


@dataclass(frozen=True, slots=True)
class Suspect:
    node: str
    incarnation: int
    sender: str  #: who suspects; distinct senders are Lifeguard's confirmations

    def __post_init__(self):
        check_node_id(self.node)
        check_uint(self.incarnation, MAX_INCARNATION, "incarnation")
        check_node_id(self.sender)


@dataclass(frozen=True, slots=True)
class Dead:
    """`sender == node` means the node left on purpose (graceful leave)."""

    node: str
    incarnation: int
    sender: str

    def __post_init__(self):
        check_node_id(self.node)
        check_uint(self.incarnation, MAX_INCARNATION, "incarnation")
        check_node_id(self.sender)


@dataclass(frozen=True, slots=True)
class MemberState:
    """One member as the sender of a PushPull sees it."""

    node: str
    incarnation: int
    status: Status
    addr: str
    port: int
    meta: bytes = b""

    def __post_init__(self):
        check_node_id(self.node)
        check_uint(self.incarnation, MAX_INCARNATION, "incarnation")
        if not isinstance(self.status, Status):
            try:
                object.__setattr__(self, "status", Status(self.status))
            except (ValueError, TypeError):
                raise BadMessage("bad_field", f"status={self.status!r}"[:80]) from None
        object.__setattr__(self, "addr", check_addr(self.addr))  # canonical text, as it decodes
        check_port(self.port)
        check_meta(self.meta)


@dataclass(frozen=True, slots=True)
class PushPull:
    """Full (or partial, when split to fit a datagram) state exchange.

    `reply` asks the receiver to answer with its own full state; a split sync
    sets it on one part only so the receiver answers once. `join` marks a
    joining node's first exchange (the receiver logs it)."""

    states: tuple[MemberState, ...]
    reply: bool = False
    join: bool = False

    def __post_init__(self):
        if not isinstance(self.states, tuple) or len(self.states) > MAX_STATES:
            raise BadMessage("bad_field", "states")
        for s in self.states:
            if not isinstance(s, MemberState):
                raise BadMessage("bad_field", "states")
        if not isinstance(self.reply, bool) or not isinstance(self.join, bool):
            raise BadMessage("bad_field", "reply/join")


Message = Ping | IndirectPing | Ack | Nack | Alive | Suspect | Dead | PushPull
Gossip = Alive | Suspect | Dead


@dataclass(frozen=True, slots=True)
class Packet:
    """What one datagram carries: who sent it and one or more messages
    (a probe plus piggybacked gossip, say)."""

    sender: str
    messages: tuple[Message, ...]

    def __post_init__(self):
        check_node_id(self.sender)
        if not isinstance(self.messages, tuple) or not self.messages:
            raise BadMessage("bad_field", "messages")
