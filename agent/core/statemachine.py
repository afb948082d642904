"""The replicated state machine behind Raft: a key-value store, proposals with
votes, and namespaced extensions.

Theory of operation
-------------------
Raft hands the driver committed entries in log order; the driver calls
`apply(index, data)` for every NORMAL entry and `set_voters(voters, index)` for
every CONF entry. Everything here is a pure function of that sequence: no
clock (time arrives inside commands, chosen by whoever proposed them), no
randomness, no I/O, and no iteration over sets or hash-ordered containers
where order could leak into the state. So every node that applies the same
log holds the same state, and `snapshot()` is byte-for-byte the same on all of
them.

Commands are canonical CBOR maps ``{"op": "<ns>.<op>", "rid": <16 bytes>, ...}``
made by `encode_command`. A committed command is untrusted input (any member
could have proposed it): `decode_command` validates it strictly, and a command
that fails is applied as an error `Result` ("bad-command") and counted, never
raised. The request id `rid` is chosen by the client: the last DEDUP_SIZE rids
and their first Result are remembered (part of the snapshot), so a client that
retries after a lost answer or a leader change gets the first answer again
and the command does not take effect twice. (A retry arriving after its rid
fell out of the table is applied again: the table bounds memory, not time.)

Revisions: `revision` is the index of the last applied command that changed
something (a key, a proposal, an extension). A key records the index that
created it, the index of its last change and how many changes it has seen
since creation (as etcd's create_revision, mod_revision, version).

Proposals: a proposal is decided "approved" or "rejected" as soon as a strict
majority of the *current* voters (the latest CONF entry applied) voted that
way; votes of members that are no longer voters are kept but do not count,
and a change of voters re-counts every open proposal. With an even number of
voters a tie never decides: the proposal waits for its deadline, which the
leader enforces by proposing `prop.expire(now_ms)` with its own clock (the
time is in the command, so every node expires the same proposals).
The state machine does not authenticate the `voter` and `proposer` fields:
the driver accepts a vote only from the member it names.

Bounds (memory on a Pi stays bounded whatever clients send): MAX_KEYS keys,
MAX_OPEN open proposals, the KEEP_DECIDED most recently decided ones, the
DEDUP_SIZE most recent rids, MAX_EVENTS undrained change events.

Reads (`get`, `list`, `proposal`, `proposals`) do not go through the log; the
driver makes them linearizable with Raft's ReadIndex before it serves them.
"""

from __future__ import annotations

import bisect
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Protocol

import cbor2

from agent.messages import BadMessage
from agent.wire import loads_strict

# ------------------------------------------------------------------ limits

MAX_UINT = 2**63 - 1  #: revisions, indexes, milliseconds
RID_BYTES = 16  #: request id chosen by the client
MAX_KEY = 256  #: bytes of a key (UTF-8)
MAX_VALUE = 2048  #: bytes of a key's value
MAX_KEYS = 100_000  #: keys held at most; a put of a new key beyond this is "full"
MAX_LIST = 1000  #: keys one `list` returns at most
MAX_NODE = 64  #: bytes of a node id (UTF-8), as in the Raft spec
MAX_PROP_ID = 64  #: bytes of a proposal id (UTF-8)
MAX_PROP_VALUE = 1024  #: bytes of a proposal's value, canonical CBOR
MAX_OPEN = 1024  #: open proposals; a new one beyond this is "too-many-open"
KEEP_DECIDED = 1000  #: decided proposals kept (the most recently decided)
MAX_VOTERS = 64  #: voters in one configuration (Raft clusters have 3-7)
MAX_VOTES = 64  #: distinct voters on one proposal (votes of ex-voters stay)
DEDUP_SIZE = 4096  #: request ids remembered with their first result
MAX_EVENTS = 4096  #: undrained change events; older ones are dropped and counted
MAX_VALUE_DEPTH = 8  #: nesting of arrays/maps inside a proposal or extension value
MAX_RESULT_VALUE = 512  #: bytes of a Result's value (results live in the dedup table)
MAX_ERROR = 64  #: characters of a Result's error label
MAX_COMMAND = 2560
"""Bytes of one encoded command: a kv.put of the largest key and value is about
2330 bytes; Raft batches entries into Appends of max_append_bytes (3000)."""
SNAPSHOT_VERSION = 1
_SNAPSHOT_DEPTH = 24  #: snapshot > section > record > field > value (8) ... extensions get the rest

_OP = re.compile(r"^[a-z][a-z0-9_]{0,15}\.[a-z][a-z0-9_]{0,31}$")
_NS = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
_CORE_NS = ("kv", "prop")
CHOICES = ("approve", "reject")
OUTCOMES = ("approved", "rejected", "expired")


# ------------------------------------------------------------- validators
# Each raises BadMessage(reason): the data came from a client through the log,
# or from a peer's snapshot.


def _check_uint(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_UINT:
        raise BadMessage("bad_field", f"{what}={value!r}"[:80])
    return value


def _check_text(value: object, limit: int, reason: str) -> str:
    """Non-empty str of at most `limit` bytes UTF-8 without NUL (NUL would cut
    a key short in C-minded tools and in CoAP URI paths)."""
    if type(value) is not str or not value or "\x00" in value:
        raise BadMessage(reason, repr(value)[:80])
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # lone surrogates: not UTF-8 at all
        raise BadMessage(reason, repr(value)[:80]) from None
    if size > limit:
        raise BadMessage(reason, f"{size} bytes")
    return value


def check_key(key: object) -> str:
    return _check_text(key, MAX_KEY, "bad_key")


def _check_node(node: object) -> str:
    return _check_text(node, MAX_NODE, "bad_node_id")


def _check_prop_id(pid: object) -> str:
    return _check_text(pid, MAX_PROP_ID, "bad_field")


def _check_kv_value(value: object) -> bytes:
    if type(value) is not bytes or len(value) > MAX_VALUE:
        raise BadMessage("bad_value", f"{type(value).__name__} of {len(value) if type(value) is bytes else '?'} bytes")
    return value


def _check_rid(rid: object) -> bytes:
    if type(rid) is not bytes or len(rid) != RID_BYTES:
        raise BadMessage("bad_rid", repr(rid)[:80])
    return rid


def _check_plain(value: object, depth: int, what: str) -> None:
    """The CBOR subset `loads_strict(maps=True)` gives back: ints, str, bytes,
    bools, lists and str/int-keyed maps, nested at most `depth` containers.
    No null, floats or tags: they would not survive a snapshot round trip
    (and NaN != NaN would make equal states compare unequal)."""
    stack = [(value, 0)]
    while stack:
        v, level = stack.pop()
        t = type(v)
        if t is int:
            if not -(2**64) <= v < 2**64:
                raise BadMessage("bad_value", f"{what}: integer out of CBOR range")
        elif t in (str, bytes, bool):
            continue
        elif t is list or t is dict:
            if level >= depth:
                raise BadMessage("bad_value", f"{what}: nested deeper than {depth}")
            if t is dict:
                for k in v:
                    if type(k) not in (str, int):
                        raise BadMessage("bad_value", f"{what}: map key of type {type(k).__name__}")
                    stack.append((k, level + 1))
                stack.extend((x, level + 1) for x in v.values())
            else:
                stack.extend((x, level + 1) for x in v)
        else:
            raise BadMessage("bad_value", f"{what}: {t.__name__} is not plain CBOR")


def _canonical(obj: object) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _check_prop_value(value: object) -> object:
    _check_plain(value, MAX_VALUE_DEPTH, "value")
    size = len(_canonical(value))
    if size > MAX_PROP_VALUE:
        raise BadMessage("bad_value", f"proposal value of {size} bytes")
    return value


def _check_choice(choice: object) -> str:
    if choice not in CHOICES or type(choice) is not str:
        raise BadMessage("bad_field", f"choice={choice!r}"[:80])
    return choice


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Result:
    """The answer to one applied command.

    `error` is None exactly when `ok`; it is a short label ("not-found",
    "conflict", "bad-command", ...). `revision`: for a change, the index that
    made it; for "conflict", the key's current mod_revision (0: absent); for
    other errors, the state machine's revision at the time. `value`: small
    plain CBOR or None (a bad command's reason, a vote's outcome, ...)."""

    ok: bool
    error: str | None = None
    revision: int = 0
    value: object | None = None

    def __post_init__(self):
        if type(self.ok) is not bool:
            raise BadMessage("bad_field", f"ok={self.ok!r}"[:80])
        if self.ok != (self.error is None):
            raise BadMessage("bad_field", "error must be set exactly when not ok")
        if self.error is not None and (type(self.error) is not str or not 0 < len(self.error) <= MAX_ERROR):
            raise BadMessage("bad_field", f"error={self.error!r}"[:80])
        _check_uint(self.revision, "revision")
        if self.value is not None:
            _check_plain(self.value, 4, "result value")
            if len(_canonical(self.value)) > MAX_RESULT_VALUE:
                raise BadMessage("bad_value", "result value too big")

    def to_wire(self) -> list:
        """[ok, error or "", revision] plus [value] when there is one (null is
        not in the strict CBOR subset, so absence is spelt by length)."""
        wire = [self.ok, self.error or "", self.revision]
        if self.value is not None:
            wire.append(self.value)
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> Result:
        if type(obj) is not list or len(obj) not in (3, 4):
            raise BadMessage("bad_field", "result")
        ok, error, revision = obj[:3]
        if len(obj) == 4 and obj[3] is None:
            raise BadMessage("bad_field", "null value")
        if type(error) is not str:
            raise BadMessage("bad_field", f"error={error!r}"[:80])
        return cls(ok, error or None, revision, obj[3] if len(obj) == 4 else None)


def _fail(error: str, revision: int, value: object | None = None) -> Result:
    return Result(False, error, revision, value)


# --------------------------------------------------------------- commands

# op -> {field: (required, checker)}; fields not listed are refused.
_SCHEMAS: dict[str, dict[str, tuple[bool, object]]] = {
    "kv.put": {"key": (True, check_key), "value": (True, _check_kv_value)},
    "kv.del": {"key": (True, check_key)},
    "kv.cas": {
        "key": (True, check_key),
        "rev": (True, lambda v: _check_uint(v, "rev")),
        "value": (True, _check_kv_value),
    },
    "prop.new": {
        "id": (True, _check_prop_id),
        "value": (True, _check_prop_value),
        "deadline_ms": (False, lambda v: _check_uint(v, "deadline_ms")),
        "proposer": (True, _check_node),
        "created_ms": (True, lambda v: _check_uint(v, "created_ms")),
    },
    "prop.vote": {
        "id": (True, _check_prop_id),
        "voter": (True, _check_node),
        "choice": (True, _check_choice),
        "now_ms": (True, lambda v: _check_uint(v, "now_ms")),
    },
    "prop.expire": {"now_ms": (True, lambda v: _check_uint(v, "now_ms"))},
}


@dataclass(frozen=True, slots=True)
class Command:
    """One decoded, validated command. `fields` is read-only; for extension
    ops ("<ns>.<op>" outside kv and prop) it is passed through as plain CBOR
    for the extension to validate."""

    op: str
    rid: bytes
    fields: Mapping[str, object]

    def __post_init__(self):
        if type(self.op) is not str or not _OP.match(self.op):
            raise BadMessage("bad_op", repr(self.op)[:80])
        _check_rid(self.rid)
        if not isinstance(self.fields, Mapping):
            raise BadMessage("bad_field", "fields")
        fields = dict(self.fields)
        object.__setattr__(self, "fields", MappingProxyType(fields))
        for name in fields:
            if type(name) is not str or name in ("op", "rid"):
                raise BadMessage("bad_field", f"field name {name!r}"[:80])
        schema = _SCHEMAS.get(self.op)
        if schema is None:
            if self.op.split(".", 1)[0] in _CORE_NS:
                raise BadMessage("bad_op", self.op)
            _check_plain(fields, MAX_VALUE_DEPTH, "fields")
            return
        for name, value in fields.items():
            if name not in schema:
                raise BadMessage("bad_field", f"{self.op} has no field {name!r}"[:80])
            schema[name][1](value)
        for name, (required, _) in schema.items():
            if required and name not in fields:
                raise BadMessage("bad_field", f"{self.op} needs {name}")

    def encode(self) -> bytes:
        return _canonical({"op": self.op, "rid": self.rid, **self.fields})


def encode_command(op: str, rid: bytes, **fields: object) -> bytes:
    """Canonical CBOR of a command; a field given as None is left out (that is
    how an optional field such as deadline_ms is absent). Raises BadMessage (a
    ValueError) for a command the state machine would refuse, so a client
    learns of its mistake before it costs a log entry."""
    data = Command(op, rid, {k: v for k, v in fields.items() if v is not None}).encode()
    if len(data) > MAX_COMMAND:
        raise BadMessage("oversized", f"{len(data)} bytes")
    return data


def decode_command(data: object) -> Command:
    """Validate a committed entry's bytes strictly; BadMessage on anything off.

    Only the canonical encoding is accepted (checked by re-encoding), so one
    command has exactly one byte string and duplicate map keys are refused."""
    if type(data) is not bytes:
        raise BadMessage("malformed", "not bytes")
    if len(data) > MAX_COMMAND:
        raise BadMessage("oversized", f"{len(data)} bytes")
    obj = loads_strict(data, maps=True, max_depth=MAX_VALUE_DEPTH + 1)
    if type(obj) is not dict:
        raise BadMessage("bad_field", "command is not a map")
    try:
        canonical = _canonical(obj) == data
    except Exception:  # odd map keys (cbor2 turns array keys into tuples); refused below anyway
        canonical = False
    if not canonical:
        raise BadMessage("malformed", "not canonical CBOR")
    fields = dict(obj)
    return Command(fields.pop("op", None), fields.pop("rid", None), fields)


# ------------------------------------------------------------------ state


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int

    def __post_init__(self):
        check_key(self.key)
        _check_kv_value(self.value)
        _check_uint(self.create_revision, "create_revision")
        _check_uint(self.mod_revision, "mod_revision")
        _check_uint(self.version, "version")
        if not 0 < self.create_revision <= self.mod_revision or self.version < 1:
            raise BadMessage("bad_field", f"revisions of {self.key!r}"[:80])

    def to_wire(self) -> list:
        return [self.key, self.value, self.create_revision, self.mod_revision, self.version]

    @classmethod
    def from_wire(cls, obj: object) -> KeyValue:
        if type(obj) is not list or len(obj) != 5:
            raise BadMessage("bad_field", "key-value")
        return cls(*obj)


@dataclass(frozen=True, slots=True)
class Vote:
    voter: str
    choice: str
    now_ms: int  #: the time in the vote command (the voter's clock)
    index: int  #: log index of the vote command

    def __post_init__(self):
        _check_node(self.voter)
        _check_choice(self.choice)
        _check_uint(self.now_ms, "now_ms")
        _check_uint(self.index, "index")

    def to_wire(self) -> list:
        return [self.voter, self.choice, self.now_ms, self.index]

    @classmethod
    def from_wire(cls, obj: object) -> Vote:
        if type(obj) is not list or len(obj) != 4:
            raise BadMessage("bad_field", "vote")
        return cls(*obj)


@dataclass(frozen=True, slots=True)
class Proposal:
    """A proposal with every vote cast on it (one per voter, the latest;
    sorted by voter) and, once decided, the outcome, the index of the command
    that decided it and the time that command carried."""

    id: str
    value: object
    deadline_ms: int | None
    proposer: str
    created_ms: int
    created_index: int
    votes: tuple[Vote, ...] = ()
    outcome: str | None = None
    decided_index: int | None = None
    decided_ms: int | None = None

    def __post_init__(self):
        _check_prop_id(self.id)
        _check_prop_value(self.value)
        if self.deadline_ms is not None:
            _check_uint(self.deadline_ms, "deadline_ms")
        _check_node(self.proposer)
        _check_uint(self.created_ms, "created_ms")
        _check_uint(self.created_index, "created_index")
        if type(self.votes) is not tuple or len(self.votes) > MAX_VOTES:
            raise BadMessage("bad_field", "votes")
        voters = [v.voter for v in self.votes if type(v) is Vote]
        if len(voters) != len(self.votes) or voters != sorted(set(voters)):
            raise BadMessage("bad_field", "votes must be one per voter, sorted")
        decided = (self.outcome, self.decided_index, self.decided_ms)
        if self.outcome is None:
            if decided != (None, None, None):
                raise BadMessage("bad_field", "decision fields of an open proposal")
        else:
            if self.outcome not in OUTCOMES:
                raise BadMessage("bad_field", f"outcome={self.outcome!r}"[:80])
            _check_uint(self.decided_index, "decided_index")
            _check_uint(self.decided_ms, "decided_ms")

    @property
    def open(self) -> bool:
        return self.outcome is None

    def tally(self, voters: frozenset[str]) -> tuple[int, int]:
        """(approvals, rejections) among the given voters."""
        approve = sum(1 for v in self.votes if v.voter in voters and v.choice == "approve")
        reject = sum(1 for v in self.votes if v.voter in voters and v.choice == "reject")
        return approve, reject

    def to_wire(self) -> dict:
        """A map: optional fields are absent rather than null (strict CBOR)."""
        wire = {
            "id": self.id,
            "value": self.value,
            "proposer": self.proposer,
            "created_ms": self.created_ms,
            "created_index": self.created_index,
            "votes": [v.to_wire() for v in self.votes],
        }
        optional = {
            "deadline_ms": self.deadline_ms,
            "outcome": self.outcome,
            "decided_index": self.decided_index,
            "decided_ms": self.decided_ms,
        }
        wire.update((k, v) for k, v in optional.items() if v is not None)
        return wire

    @classmethod
    def from_wire(cls, obj: object) -> Proposal:
        if type(obj) is not dict:
            raise BadMessage("bad_field", "proposal")
        required = ("id", "value", "proposer", "created_ms", "created_index", "votes")
        optional = ("deadline_ms", "outcome", "decided_index", "decided_ms")
        if any(k not in obj for k in required) or any(k not in required + optional for k in obj):
            raise BadMessage("bad_field", "proposal fields")
        votes = obj["votes"]
        if type(votes) is not list or len(votes) > MAX_VOTES:
            raise BadMessage("bad_field", "votes")
        return cls(
            obj["id"],
            obj["value"],
            obj.get("deadline_ms"),
            obj["proposer"],
            obj["created_ms"],
            obj["created_index"],
            tuple(Vote.from_wire(v) for v in votes),
            obj.get("outcome"),
            obj.get("decided_index"),
            obj.get("decided_ms"),
        )


@dataclass(frozen=True, slots=True)
class Event:
    """A change for CoAP Observe. kind: "kv.put" / "kv.del" (name = key),
    "prop.new" / "prop.vote" / "prop.decided" (name = proposal id), or
    "restore" (the whole state was replaced: observers must re-read), or
    "<ns>.<op>" (name = ns) for an extension command that succeeded.
    detail: (voter, choice) for a vote, the outcome for a decision, else None.
    Values are not copied here: an observer reads the current one."""

    kind: str
    name: str
    index: int
    detail: object = None


class Extension(Protocol):
    """A namespace of commands ("<ns>.<op>") kept by someone else (tasks).
    It must be as deterministic as the state machine itself. `apply` raises
    BadMessage for fields it refuses (applied as a "bad-command" Result);
    anything else it raises is a bug and propagates. `snapshot()` returns
    plain CBOR (ints, str, bytes, bools, lists, maps; no null or floats)."""

    def apply(self, op: str, fields: Mapping[str, object], index: int) -> Result: ...

    def snapshot(self) -> object: ...

    def restore(self, obj: object) -> None: ...


class _State:
    """Everything replicated (what snapshot() writes), apart from extensions."""

    __slots__ = ("applied", "revision", "voters", "voter_set", "kv", "keys", "dedup", "open", "decided")

    def __init__(self):
        self.applied = 0  # last index applied (commands, no-ops and CONF entries given an index)
        self.revision = 0  # last index that changed something
        self.voters: tuple[str, ...] = ()  # sorted
        self.voter_set: frozenset[str] = frozenset()  # membership tests only, never iterated
        self.kv: dict[str, KeyValue] = {}
        self.keys: list[str] = []  # sorted, for prefix listing
        self.dedup: OrderedDict[bytes, Result] = OrderedDict()  # oldest first
        self.open: dict[str, Proposal] = {}  # creation order
        self.decided: OrderedDict[str, Proposal] = OrderedDict()  # decision order, oldest first


def _check_voters(voters: Iterable[object]) -> tuple[str, ...]:
    out = tuple(sorted({_check_node(v) for v in voters}))
    if len(out) > MAX_VOTERS:
        raise BadMessage("too_many", f"{len(out)} voters")
    return out


# ---------------------------------------------------------- state machine


class StateMachine:
    def __init__(self):
        self._s = _State()
        self._ext: dict[str, Extension] = {}
        self._events: deque[Event] = deque()
        self.stats: dict[str, int] = dict.fromkeys(
            ("applied", "errors", "bad_commands", "dedup_hits", "events_dropped"), 0
        )
        """Local counters, not replicated state (a node restored from a
        snapshot starts them from zero)."""

    # ------------------------------------------------------------ views

    @property
    def applied(self) -> int:
        return self._s.applied

    @property
    def revision(self) -> int:
        return self._s.revision

    @property
    def voters(self) -> tuple[str, ...]:
        return self._s.voters

    def __len__(self) -> int:
        return len(self._s.kv)

    def get(self, key: str) -> KeyValue | None:
        return self._s.kv.get(key)

    def list(self, prefix: str = "", limit: int = MAX_LIST, after: str | None = None) -> list[KeyValue]:
        """Keys starting with `prefix`, in key order (code points, which is
        UTF-8 byte order), at most `limit`; `after` resumes strictly after a
        key (pagination). ValueError on a limit outside 1..MAX_LIST."""
        if type(limit) is not int or not 1 <= limit <= MAX_LIST:
            raise ValueError(f"limit must be 1..{MAX_LIST}, not {limit!r}")
        keys = self._s.keys
        start = bisect.bisect_left(keys, prefix)
        if after is not None:
            start = max(start, bisect.bisect_right(keys, after))
        out = []
        for key in keys[start:start + limit]:
            if not key.startswith(prefix):
                break
            out.append(self._s.kv[key])
        return out

    def proposal(self, pid: str) -> Proposal | None:
        p = self._s.open.get(pid)
        return p if p is not None else self._s.decided.get(pid)

    def proposals(self, *, open_only: bool = False) -> list[Proposal]:
        """Open proposals in creation order, then (unless open_only) the kept
        decided ones in decision order."""
        out = list(self._s.open.values())
        if not open_only:
            out.extend(self._s.decided.values())
        return out

    def take_events(self) -> list[Event]:
        """Drain the change events since the last call (oldest first). If more
        than MAX_EVENTS piled up, the oldest were dropped (stats
        "events_dropped"): the driver should then refresh every observer."""
        out = list(self._events)
        self._events.clear()
        return out

    # ------------------------------------------------------------ input

    def register(self, ns: str, extension: Extension) -> None:
        """Route commands "<ns>.<op>" to `extension`. Register every extension
        before applying or restoring anything: the set of namespaces is part
        of the replicated state."""
        if type(ns) is not str or not _NS.match(ns) or ns in _CORE_NS:
            raise ValueError(f"bad extension namespace {ns!r}")
        if ns in self._ext:
            raise ValueError(f"namespace {ns!r} already registered")
        self._ext[ns] = extension

    def apply(self, index: int, data: bytes) -> Result | None:
        """Apply one committed NORMAL entry. None for the leader's empty no-op.

        Index must grow (ValueError otherwise: the driver's bug). A command
        that does not decode gives Result(False, "bad-command", value=reason)."""
        self._advance(index)
        if data == b"":
            return None
        self.stats["applied"] += 1
        try:
            cmd = decode_command(data)
        except BadMessage as e:
            self.stats["bad_commands"] += 1
            self.stats["errors"] += 1
            return _fail("bad-command", self._s.revision, e.reason)
        first = self._s.dedup.get(cmd.rid)
        if first is not None:
            self.stats["dedup_hits"] += 1
            return first
        result = self._execute(cmd, index)
        if not result.ok:
            self.stats["errors"] += 1
        dedup = self._s.dedup
        dedup[cmd.rid] = result
        if len(dedup) > DEDUP_SIZE:
            dedup.popitem(last=False)
        return result

    def set_voters(self, voters: Iterable[str], index: int | None = None) -> None:
        """The configuration changed (an applied CONF entry at `index`). Open
        proposals are re-counted against the new voters: removing a voter who
        held out can complete a majority. BadMessage for invalid node ids."""
        new = _check_voters(voters)
        if index is not None:
            self._advance(index)
        s = self._s
        if new == s.voters:
            return
        s.voters, s.voter_set = new, frozenset(new)
        at = s.applied if index is None else index
        for p in list(s.open.values()):
            self._decide_by_votes(p, at, max((v.now_ms for v in p.votes), default=0))

    def _advance(self, index: int) -> None:
        if type(index) is not int or index <= self._s.applied:
            raise ValueError(f"index {index!r} not after the last applied {self._s.applied}")
        self._s.applied = index

    # --------------------------------------------------------- commands

    def _execute(self, cmd: Command, index: int) -> Result:
        handler = _HANDLERS.get(cmd.op)
        if handler is not None:
            return handler(self, cmd.fields, index)
        ns, op = cmd.op.split(".", 1)
        ext = self._ext.get(ns)
        if ext is None:
            return _fail("unknown-ns", self._s.revision, ns)
        try:
            result = ext.apply(op, cmd.fields, index)
        except BadMessage as e:
            self.stats["bad_commands"] += 1
            return _fail("bad-command", self._s.revision, e.reason)
        if type(result) is not Result:
            raise TypeError(f"extension {ns!r} returned {type(result).__name__}, not Result")
        if result.ok:
            self._s.revision = index
            self._event(cmd.op, ns, index)
        return result

    def _event(self, kind: str, name: str, index: int, detail: object = None) -> None:
        if len(self._events) >= MAX_EVENTS:
            self._events.popleft()
            self.stats["events_dropped"] += 1
        self._events.append(Event(kind, name, index, detail))

    def _kv_put(self, f: Mapping, index: int) -> Result:
        return self._write(f["key"], f["value"], index)

    def _kv_cas(self, f: Mapping, index: int) -> Result:
        current = self._s.kv.get(f["key"])
        current_rev = current.mod_revision if current else 0
        if current_rev != f["rev"]:
            return _fail("conflict", current_rev)
        return self._write(f["key"], f["value"], index)

    def _write(self, key: str, value: bytes, index: int) -> Result:
        s = self._s
        old = s.kv.get(key)
        if old is None:
            if len(s.kv) >= MAX_KEYS:
                return _fail("full", s.revision)
            kv = KeyValue(key, value, index, index, 1)
            bisect.insort(s.keys, key)
        else:
            kv = KeyValue(key, value, old.create_revision, index, old.version + 1)
        s.kv[key] = kv
        s.revision = index
        self._event("kv.put", key, index)
        return Result(True, None, index)

    def _kv_del(self, f: Mapping, index: int) -> Result:
        s = self._s
        key = f["key"]
        if key not in s.kv:
            return _fail("not-found", s.revision)
        del s.kv[key]
        del s.keys[bisect.bisect_left(s.keys, key)]
        s.revision = index
        self._event("kv.del", key, index)
        return Result(True, None, index)

    def _prop_new(self, f: Mapping, index: int) -> Result:
        s = self._s
        pid = f["id"]
        if pid in s.open or pid in s.decided:
            return _fail("exists", s.revision)
        if len(s.open) >= MAX_OPEN:
            return _fail("too-many-open", s.revision)
        s.open[pid] = Proposal(pid, f["value"], f.get("deadline_ms"), f["proposer"], f["created_ms"], index)
        s.revision = index
        self._event("prop.new", pid, index)
        return Result(True, None, index)

    def _prop_vote(self, f: Mapping, index: int) -> Result:
        s = self._s
        pid, voter = f["id"], f["voter"]
        p = s.open.get(pid)
        if p is None:
            return _fail("decided" if pid in s.decided else "not-found", s.revision)
        if voter not in s.voter_set:
            return _fail("not-a-voter", s.revision)
        others = tuple(v for v in p.votes if v.voter != voter)
        if len(others) >= MAX_VOTES:  # only possible after much voter churn
            return _fail("too-many-votes", s.revision)
        vote = Vote(voter, f["choice"], f["now_ms"], index)
        votes = tuple(sorted(others + (vote,), key=lambda v: v.voter))
        p = s.open[pid] = replace(p, votes=votes)
        s.revision = index
        self._event("prop.vote", pid, index, (voter, vote.choice))
        outcome = self._decide_by_votes(p, index, vote.now_ms)
        return Result(True, None, index, outcome)

    def _prop_expire(self, f: Mapping, index: int) -> Result:
        now = f["now_ms"]
        due = [p for p in self._s.open.values() if p.deadline_ms is not None and p.deadline_ms <= now]
        for p in due:
            self._decide(p, "expired", index, now)
        return Result(True, None, index if due else self._s.revision, len(due))

    def _decide_by_votes(self, p: Proposal, index: int, now_ms: int) -> str | None:
        """Decide p if a strict majority of the current voters agrees."""
        approve, reject = p.tally(self._s.voter_set)
        majority = len(self._s.voters) // 2 + 1
        outcome = "approved" if approve >= majority else "rejected" if reject >= majority else None
        if outcome:
            self._decide(p, outcome, index, now_ms)
        return outcome

    def _decide(self, p: Proposal, outcome: str, index: int, now_ms: int) -> None:
        s = self._s
        del s.open[p.id]
        s.decided[p.id] = replace(p, outcome=outcome, decided_index=index, decided_ms=now_ms)
        if len(s.decided) > KEEP_DECIDED:
            s.decided.popitem(last=False)
        s.revision = max(s.revision, index)
        self._event("prop.decided", p.id, index, outcome)

    # ------------------------------------------------------- snapshots

    def snapshot(self) -> bytes:
        """Canonical CBOR of the whole replicated state: equal states give
        equal bytes. ValueError if an extension's snapshot is not plain CBOR."""
        s = self._s
        ext = {}
        for ns, extension in self._ext.items():
            obj = extension.snapshot()
            try:
                _check_plain(obj, _SNAPSHOT_DEPTH - 3, f"extension {ns}")
            except BadMessage as e:
                raise ValueError(str(e)) from None
            ext[ns] = obj
        return _canonical(
            {
                "v": SNAPSHOT_VERSION,
                "applied": s.applied,
                "revision": s.revision,
                "voters": list(s.voters),
                "kv": [s.kv[k].to_wire() for k in s.keys],
                "dedup": [[rid, r.to_wire()] for rid, r in s.dedup.items()],
                "open": [p.to_wire() for p in s.open.values()],
                "decided": [p.to_wire() for p in s.decided.values()],
                "ext": ext,
            }
        )

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot's (ours, or a leader's sent
        with InstallSnapshot: validated as strictly as a command). On
        BadMessage nothing has changed. Pending events are replaced by one
        "restore" event."""
        top = loads_strict(data, maps=True, max_depth=_SNAPSHOT_DEPTH)
        sections = ("v", "applied", "revision", "voters", "kv", "dedup", "open", "decided", "ext")
        if type(top) is not dict or set(top) != set(sections):
            raise BadMessage("bad_field", "snapshot sections")
        if top["v"] != SNAPSHOT_VERSION:
            raise BadMessage("bad_version", repr(top["v"])[:20])
        new = _State()
        new.applied = _check_uint(top["applied"], "applied")
        new.revision = _check_uint(top["revision"], "revision")
        if new.revision > new.applied:
            raise BadMessage("bad_field", "revision after applied")
        for name in ("voters", "kv", "dedup", "open", "decided"):
            if type(top[name]) is not list:
                raise BadMessage("bad_field", name)
        new.voters = _check_voters(top["voters"])
        if list(new.voters) != top["voters"]:
            raise BadMessage("bad_field", "voters not sorted and unique")
        new.voter_set = frozenset(new.voters)
        self._restore_kv(new, top["kv"])
        self._restore_dedup(new, top["dedup"])
        self._restore_proposals(new, top["open"], top["decided"])
        ext = top["ext"]
        if type(ext) is not dict or set(ext) != set(self._ext):
            raise BadMessage("bad_field", "extensions differ from the registered ones")
        self._restore_extensions(ext)
        self._s = new
        self._events.clear()
        self._event("restore", "", new.applied)

    @staticmethod
    def _restore_kv(new: _State, rows: list) -> None:
        if len(rows) > MAX_KEYS:
            raise BadMessage("too_many", f"{len(rows)} keys")
        for row in rows:
            kv = KeyValue.from_wire(row)
            if new.keys and kv.key <= new.keys[-1]:
                raise BadMessage("bad_field", "keys not sorted and unique")
            if kv.mod_revision > new.revision:
                raise BadMessage("bad_field", f"revision of {kv.key!r}"[:80])
            new.kv[kv.key] = kv
            new.keys.append(kv.key)

    @staticmethod
    def _restore_dedup(new: _State, rows: list) -> None:
        if len(rows) > DEDUP_SIZE:
            raise BadMessage("too_many", f"{len(rows)} request ids")
        for row in rows:
            if type(row) is not list or len(row) != 2:
                raise BadMessage("bad_field", "dedup entry")
            rid = _check_rid(row[0])
            if rid in new.dedup:
                raise BadMessage("bad_field", "duplicate request id")
            new.dedup[rid] = Result.from_wire(row[1])

    @staticmethod
    def _restore_proposals(new: _State, open_rows: list, decided_rows: list) -> None:
        if len(open_rows) > MAX_OPEN or len(decided_rows) > KEEP_DECIDED:
            raise BadMessage("too_many", "proposals")
        for rows, table, is_open in ((open_rows, new.open, True), (decided_rows, new.decided, False)):
            for row in rows:
                p = Proposal.from_wire(row)
                if p.open != is_open or p.id in new.open or p.id in new.decided:
                    raise BadMessage("bad_field", f"proposal {p.id!r}"[:80])
                table[p.id] = p

    def _restore_extensions(self, objs: dict) -> None:
        """All or nothing: if one extension refuses its part, those already
        restored get their previous state back."""
        done: list[tuple[Extension, object]] = []
        try:
            for ns in sorted(self._ext):
                extension = self._ext[ns]
                before = extension.snapshot()
                extension.restore(objs[ns])
                done.append((extension, before))
        except BadMessage:
            for extension, before in reversed(done):
                extension.restore(before)
            raise


_HANDLERS = {
    "kv.put": StateMachine._kv_put,
    "kv.del": StateMachine._kv_del,
    "kv.cas": StateMachine._kv_cas,
    "prop.new": StateMachine._prop_new,
    "prop.vote": StateMachine._prop_vote,
    "prop.expire": StateMachine._prop_expire,
}
