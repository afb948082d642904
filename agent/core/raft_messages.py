"""Raft's messages, log entries and configuration changes, with a strict decoder.

Every message is a small frozen dataclass whose first three fields are
`frm`, `to` and `term`. `to_wire()` turns it into plain CBOR-able values
(ints, str, bytes, lists, bool: the strict subset `agent.wire.loads_strict`
admits, so no null) and the module function `decode(obj)`
turns such a value back into a message, checking every field and bound:
anything malformed raises `agent.messages.BadMessage` (the peer's fault).

Constructors do not validate. The leader builds thousands of entries and
messages a second on the hot path, and everything it builds is well formed by
construction; `decode` is the one gate for a peer's input, and the core's
public methods check their own arguments (a caller's bug is a ValueError).

Wire layout (arrays only, small-int type codes, like `agent.wire`)::

    Entry          = [index, term, kind, data]
    SnapshotMeta   = [index, term, [voter, ...]]
    PreVote        = [0, frm, to, term, last_index, last_term, force]
    PreVoteResp    = [1, frm, to, term, reject]
    Vote           = [2, frm, to, term, last_index, last_term, force]
    VoteResp       = [3, frm, to, term, reject]
    Append         = [4, frm, to, term, prev_index, prev_term, [entry, ...], commit, ctx]
    AppendResp     = [5, frm, to, term, index, reject, reject_hint, ctx, hint_term]
    InstallSnapshot= [6, frm, to, term, meta] or [6, frm, to, term, meta, data]
    TimeoutNow     = [7, frm, to, term]
    Forward        = [8, frm, to, term, data]
    ForwardRefused = [9, frm, to, term, reason]
    ReadIndexReq   = [10, frm, to, term, ctx]
    ReadIndexResp  = [11, frm, to, term, ctx, index, reject]
    ConfChange     = CBOR of [op, node]   (the data of a CONF entry)

Bounds: at most MAX_APPEND_ENTRIES entries per Append, node ids at most
MAX_NODE_ID bytes, entry and Forward data at most MAX_DATA bytes, ctx at most
MAX_CTX bytes, a refusal reason at most MAX_REASON characters, a snapshot's
voters at most MAX_VOTERS. The entries of an Append must be contiguous,
follow prev_index, carry non-decreasing terms no newer than the message, and
a CONF entry's data must decode as a ConfChange.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import ClassVar

import cbor2

from agent.messages import MAX_NODE_ID, BadMessage, check_node_id
from agent.wire import loads_strict

MAX_INDEX = 2**63 - 1  #: largest index or term
MAX_APPEND_ENTRIES = 256  #: entries in one Append
#: bytes of one entry's (or Forward's) data: an Append carrying one such entry,
#: with 64-byte node ids and the largest indexes, still fits one Raft datagram
#: (agent.io.coap.RAFT_MAX_DATAGRAM less the envelope), or the log would stall on it.
MAX_DATA = 3072
MAX_CTX = 64  #: bytes of a ReadIndex / heartbeat context
MAX_REASON = 200  #: characters of a ForwardRefused reason
MAX_VOTERS = 64  #: voters in one configuration
MAX_SNAPSHOT = 1 << 26  #: bytes of snapshot data carried inline (64 MiB)

__all__ = [
    "MAX_NODE_ID", "MAX_INDEX", "MAX_APPEND_ENTRIES", "MAX_DATA", "MAX_CTX", "MAX_REASON", "MAX_VOTERS",
    "EntryKind", "Entry", "ConfChange", "SnapshotMeta", "PreVote", "PreVoteResp", "Vote", "VoteResp",
    "Append", "AppendResp", "InstallSnapshot", "TimeoutNow", "Forward", "ForwardRefused",
    "ReadIndexReq", "ReadIndexResp", "RaftMessage", "decode", "entry_size", "BadMessage",
]


class EntryKind(IntEnum):
    NORMAL = 0  #: opaque command bytes; b"" is a new leader's no-op
    CONF = 1  #: a ConfChange, `ConfChange.encode()`d


def _head(n: int) -> int:
    """Bytes of a CBOR head whose argument is n (shortest form)."""
    return 1 if n < 24 else 2 if n < 256 else 3 if n < 65536 else 5 if n < 4294967296 else 9


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    kind: EntryKind
    data: bytes
    #: encoded size, computed on first use (`entry_size`); not part of equality
    _size: int = field(default=-1, init=False, repr=False, compare=False)

    def to_wire(self) -> list:
        return [self.index, self.term, int(self.kind), self.data]

    @property
    def size(self) -> int:
        """Exact bytes of `cbor2.dumps(self.to_wire())`, computed once."""
        s = self._size
        if s < 0:
            n = len(self.data)
            s = 2 + _head(self.index) + _head(self.term) + _head(n) + n
            object.__setattr__(self, "_size", s)
        return s


def entry_size(e: Entry) -> int:
    return e.size


@dataclass(frozen=True, slots=True)
class ConfChange:
    """Add or remove one voter (single-server changes, Raft dissertation ch. 4)."""

    op: str  #: "add" or "remove"
    node: str

    def encode(self) -> bytes:
        return cbor2.dumps([self.op, self.node])

    @staticmethod
    def decode(data: object) -> "ConfChange":
        if not isinstance(data, bytes) or len(data) > 2 * MAX_NODE_ID:
            raise BadMessage("bad_conf_change", "not bytes or too long")
        obj = loads_strict(data, max_depth=1)
        if type(obj) is not list or len(obj) != 2 or obj[0] not in ("add", "remove"):
            raise BadMessage("bad_conf_change", repr(obj)[:80])
        return ConfChange(obj[0], check_node_id(obj[1]))


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """A snapshot of the state machine at `index` (whose entry had `term`),
    and the configuration in force there."""

    index: int
    term: int
    voters: tuple[str, ...]

    def to_wire(self) -> list:
        return [self.index, self.term, list(self.voters)]


# ------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class PreVote:
    """Would you vote for me at `term` (not yet adopted by the sender)?"""

    CODE: ClassVar[int] = 0
    frm: str
    to: str
    term: int
    last_index: int
    last_term: int
    force: bool = False

    def to_wire(self) -> list:
        return [0, self.frm, self.to, self.term, self.last_index, self.last_term, self.force]


@dataclass(frozen=True, slots=True)
class PreVoteResp:
    CODE: ClassVar[int] = 1
    frm: str
    to: str
    term: int
    reject: bool

    def to_wire(self) -> list:
        return [1, self.frm, self.to, self.term, self.reject]


@dataclass(frozen=True, slots=True)
class Vote:
    """Vote for me at `term`; `force` (leadership transfer) overrides the
    voter's belief that it still has a live leader."""

    CODE: ClassVar[int] = 2
    frm: str
    to: str
    term: int
    last_index: int
    last_term: int
    force: bool = False

    def to_wire(self) -> list:
        return [2, self.frm, self.to, self.term, self.last_index, self.last_term, self.force]


@dataclass(frozen=True, slots=True)
class VoteResp:
    CODE: ClassVar[int] = 3
    frm: str
    to: str
    term: int
    reject: bool

    def to_wire(self) -> list:
        return [3, self.frm, self.to, self.term, self.reject]


@dataclass(frozen=True, slots=True)
class Append:
    """Entries after (prev_index, prev_term), and the leader's commit index.
    With no entries it is a heartbeat; `ctx` then carries a ReadIndex round."""

    CODE: ClassVar[int] = 4
    frm: str
    to: str
    term: int
    prev_index: int
    prev_term: int
    entries: tuple[Entry, ...]
    commit: int
    ctx: bytes = b""

    def to_wire(self) -> list:
        return [4, self.frm, self.to, self.term, self.prev_index, self.prev_term,
                [[e.index, e.term, int(e.kind), e.data] for e in self.entries], self.commit, self.ctx]


@dataclass(frozen=True, slots=True)
class AppendResp:
    """Success: the follower's log matches the leader's up to `index`.
    Reject: (prev) `index` did not match; `reject_hint` is the largest index
    of the follower's log whose term is at most the Append's prev term, and
    `hint_term` that entry's term, so the leader can skip a whole term of
    conflicting entries per round trip (etcd's fast backtracking). `ctx`
    echoes the Append's, rejected or not: it acknowledges leadership for
    ReadIndex."""

    CODE: ClassVar[int] = 5
    frm: str
    to: str
    term: int
    index: int
    reject: bool = False
    reject_hint: int = 0
    ctx: bytes = b""
    hint_term: int = 0

    def to_wire(self) -> list:
        return [5, self.frm, self.to, self.term, self.index, self.reject, self.reject_hint, self.ctx, self.hint_term]


@dataclass(frozen=True, slots=True)
class InstallSnapshot:
    """The follower needs entries the leader has compacted away. The leader
    sends data=None; the receiving driver fetches the bytes out of band and
    steps the message again with data filled in."""

    CODE: ClassVar[int] = 6
    frm: str
    to: str
    term: int
    meta: SnapshotMeta
    data: bytes | None = None

    def to_wire(self) -> list:
        # No data: leave the field out (agent.wire's strict CBOR subset has no null).
        out = [6, self.frm, self.to, self.term, self.meta.to_wire()]
        if self.data is not None:
            out.append(self.data)
        return out


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: campaign at once, skipping pre-vote, with force."""

    CODE: ClassVar[int] = 7
    frm: str
    to: str
    term: int

    def to_wire(self) -> list:
        return [7, self.frm, self.to, self.term]


@dataclass(frozen=True, slots=True)
class Forward:
    """A follower or learner hands a proposal to the leader."""

    CODE: ClassVar[int] = 8
    frm: str
    to: str
    term: int
    data: bytes

    def to_wire(self) -> list:
        return [8, self.frm, self.to, self.term, self.data]


@dataclass(frozen=True, slots=True)
class ForwardRefused:
    """The receiver of a Forward is not (or no longer) able to take it."""

    CODE: ClassVar[int] = 9
    frm: str
    to: str
    term: int
    reason: str

    def to_wire(self) -> list:
        return [9, self.frm, self.to, self.term, self.reason]


@dataclass(frozen=True, slots=True)
class ReadIndexReq:
    CODE: ClassVar[int] = 10
    frm: str
    to: str
    term: int
    ctx: bytes

    def to_wire(self) -> list:
        return [10, self.frm, self.to, self.term, self.ctx]


@dataclass(frozen=True, slots=True)
class ReadIndexResp:
    CODE: ClassVar[int] = 11
    frm: str
    to: str
    term: int
    ctx: bytes
    index: int
    reject: bool = False

    def to_wire(self) -> list:
        return [11, self.frm, self.to, self.term, self.ctx, self.index, self.reject]


RaftMessage = (
    PreVote | PreVoteResp | Vote | VoteResp | Append | AppendResp | InstallSnapshot
    | TimeoutNow | Forward | ForwardRefused | ReadIndexReq | ReadIndexResp
)

# ------------------------------------------------------------------ decoding


def _uint(v: object, what: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_INDEX:
        raise BadMessage("bad_field", f"{what}={v!r}"[:80])
    return v


def _bool(v: object, what: str) -> bool:
    if type(v) is not bool:
        raise BadMessage("bad_field", f"{what}={v!r}"[:80])
    return v


def _bytes(v: object, limit: int, what: str) -> bytes:
    if type(v) is not bytes or len(v) > limit:
        size = len(v) if isinstance(v, bytes) else "?"
        raise BadMessage("bad_field", f"{what}: {type(v).__name__} of {size} bytes")
    return v


def _entry(f: object) -> Entry:
    if type(f) is not list or len(f) != 4:
        raise BadMessage("bad_field", "entry")
    index, term, kind, data = f
    _uint(index, "entry.index")
    _uint(term, "entry.term")
    if type(kind) is not int or kind not in (0, 1):
        raise BadMessage("bad_field", f"entry.kind={kind!r}"[:80])
    _bytes(data, MAX_DATA, "entry.data")
    if kind == 1:
        ConfChange.decode(data)
        return Entry(index, term, EntryKind.CONF, data)
    return Entry(index, term, EntryKind.NORMAL, data)


def _meta(f: object) -> SnapshotMeta:
    if type(f) is not list or len(f) != 3:
        raise BadMessage("bad_field", "snapshot meta")
    index, term, voters = f
    if type(voters) is not list or len(voters) > MAX_VOTERS:
        raise BadMessage("bad_field", "snapshot voters")
    vs = tuple(check_node_id(v) for v in voters)
    if len(set(vs)) != len(vs):
        raise BadMessage("bad_field", "duplicate snapshot voter")
    return SnapshotMeta(_uint(index, "meta.index"), _uint(term, "meta.term"), vs)


def _vote_req(cls):
    def build(f, frm, to, term):
        return cls(frm, to, term, _uint(f[4], "last_index"), _uint(f[5], "last_term"), _bool(f[6], "force"))
    return build


def _vote_resp(cls):
    def build(f, frm, to, term):
        return cls(frm, to, term, _bool(f[4], "reject"))
    return build


def _append(f, frm, to, term):
    prev_index, prev_term = _uint(f[4], "prev_index"), _uint(f[5], "prev_term")
    raw = f[6]
    if type(raw) is not list:
        raise BadMessage("bad_field", "entries")
    if len(raw) > MAX_APPEND_ENTRIES:
        raise BadMessage("too_many", f"{len(raw)} entries")
    entries = tuple(_entry(e) for e in raw)
    expect, last_term = prev_index + 1, prev_term
    for e in entries:
        if e.index != expect or e.term < last_term or e.term > term:
            raise BadMessage("bad_field", f"entry {e.index}/{e.term} after {expect - 1}/{last_term} in term {term}")
        expect, last_term = expect + 1, e.term
    return Append(frm, to, term, prev_index, prev_term, entries, _uint(f[7], "commit"), _bytes(f[8], MAX_CTX, "ctx"))


def _append_resp(f, frm, to, term):
    return AppendResp(frm, to, term, _uint(f[4], "index"), _bool(f[5], "reject"), _uint(f[6], "reject_hint"),
                      _bytes(f[7], MAX_CTX, "ctx"), _uint(f[8], "hint_term"))


def _install_snapshot(f, frm, to, term):
    data = _bytes(f[5], MAX_SNAPSHOT, "snapshot data") if len(f) == 6 else None
    return InstallSnapshot(frm, to, term, _meta(f[4]), data)


def _reason(v: object) -> str:
    if type(v) is not str or len(v) > MAX_REASON:
        raise BadMessage("bad_field", "reason")
    return v


# type code -> (number of fields including code, frm, to, term; builder)
_DECODERS = {
    0: (7, _vote_req(PreVote)),
    1: (5, _vote_resp(PreVoteResp)),
    2: (7, _vote_req(Vote)),
    3: (5, _vote_resp(VoteResp)),
    4: (9, _append),
    5: (9, _append_resp),
    6: (6, _install_snapshot),
    7: (4, lambda f, frm, to, term: TimeoutNow(frm, to, term)),
    8: (5, lambda f, frm, to, term: Forward(frm, to, term, _bytes(f[4], MAX_DATA, "data"))),
    9: (5, lambda f, frm, to, term: ForwardRefused(frm, to, term, _reason(f[4]))),
    10: (5, lambda f, frm, to, term: ReadIndexReq(frm, to, term, _bytes(f[4], MAX_CTX, "ctx"))),
    11: (7, lambda f, frm, to, term: ReadIndexResp(frm, to, term, _bytes(f[4], MAX_CTX, "ctx"),
                                                   _uint(f[5], "index"), _bool(f[6], "reject"))),
}


def decode(obj: object) -> RaftMessage:
    """A message from its wire form (as `loads_strict` returns it), checked
    field by field; BadMessage on anything malformed or out of bounds."""
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise BadMessage("bad_field", "raft message")
    try:
        arity, build = _DECODERS[obj[0]]
    except KeyError:
        raise BadMessage("unknown_type", str(obj[0])[:20]) from None
    if len(obj) != arity and not (obj[0] == 6 and len(obj) == 5):
        raise BadMessage("bad_field", f"type {obj[0]} with {len(obj)} fields")
    return build(obj, check_node_id(obj[1]), check_node_id(obj[2]), _uint(obj[3], "term"))
