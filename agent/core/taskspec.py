"""Tasks, their replicated records and results, and the task protocol's messages.

Everything here is plain data with a strict decoder: `to_wire()` gives a
CBOR-able value of the plain subset (`agent.wire.loads_strict`: no floats, no
null) and `decode_message(bytes)` checks every field and bound, raising
`agent.messages.BadMessage` for a peer's malformed input. Constructors built
from our own input use `check_spec` (a caller's bad input is a `SpecError`
naming the field, the value and what is allowed).

Sizes are bounded so that a whole record (spec, result and history) fits one
sealed task datagram (`MAX_RECORD`); history is trimmed in the middle to fit.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field, replace

import cbor2

from agent.messages import BadMessage, check_node_id
from agent.wire import loads_strict

# ----------------------------------------------------------------- bounds

MAX_ARGS = 512  #: bytes of a task's CBOR-encoded arguments
MAX_CAPS = 8  #: required capabilities of one task
MAX_STDOUT = 1024  #: bytes of a result's stdout kept (the head; the rest is counted, not kept)
MAX_STDERR = 512  #: bytes of a result's stderr kept (the tail, where errors are)
MAX_HISTORY = 16  #: history entries kept (the first 4 and the newest)
MAX_DETAIL = 48  #: characters of a history entry's detail
MAX_REASON = 120  #: characters of a refusal or failure reason
MAX_KEY = 64  #: characters of an idempotency key
MAX_ATTEMPTS = 10
MAX_TIMEOUT_S = 86_400
MAX_PRIORITY = 9
MAX_BATCH = 32  #: items in one Check, CheckReply, Handoff or ListReply
MAX_RECORD = 3700  #: bytes of an encoded record; the task channel carries 4000-byte datagrams
MAX_UINT = 2**63 - 1

STRATEGIES = ("capability", "auction", "hash")
STATES = ("pending", "queued", "running", "done", "failed", "cancelled")
TERMINAL = frozenset({"done", "failed", "cancelled"})
OUTCOMES = ("ok", "failed", "timeout", "error", "cancelled")
EVENTS = ("submitted", "placed", "bid", "queued", "started", "stolen", "migrated", "retried",
          "done", "failed", "cancelled", "duplicate", "lost")

KIND_RE = re.compile(r"[a-z0-9_.-]{1,32}")
CAP_RE = re.compile(r"[a-z0-9_.-]{1,32}(=[a-z0-9_.-]{1,32}|>=[0-9]{1,9})?")
ID_RE = re.compile(r"[0-9a-f]{16}")
KEY_RE = re.compile(r"[\x21-\x7e]{1,64}")


class SpecError(ValueError):
    """A task spec from our own user is not allowed; says which field, value and what is allowed."""

    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {value!r}: expected {allowed}")


def task_id_for_key(key: str) -> str:
    """The task id an idempotency key stands for: the same key always names the
    same task, so a resubmission finds the existing record instead of a new one."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


# ----------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What to run. `timeout_s` 0 means the handler's own timeout; `strategy`
    "" means the placing node's default."""

    id: str
    kind: str
    args: dict = field(default_factory=dict)
    caps: tuple[str, ...] = ()
    priority: int = 5
    timeout_s: int = 0
    max_attempts: int = 3
    key: str = ""
    strategy: str = ""
    origin: str = ""  #: node that took the submission
    submitted_ms: int = 0  #: wall clock at submission (ms since the epoch)

    def to_wire(self) -> dict:
        return {"i": self.id, "k": self.kind, "a": self.args, "c": list(self.caps), "p": self.priority,
                "t": self.timeout_s, "m": self.max_attempts, "y": self.key, "s": self.strategy,
                "o": self.origin, "w": self.submitted_ms}


@dataclass(frozen=True, slots=True)
class Result:
    """How one attempt ended. stdout keeps its head, stderr its tail; `*_bytes`
    count what the handler wrote in all. Times are wall-clock ms."""

    outcome: str
    exit_code: int  #: the process's exit status; -N when killed by signal N
    node: str
    attempt: int
    started_ms: int
    finished_ms: int
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    reason: str = ""

    def to_wire(self) -> dict:
        return {"o": self.outcome, "x": self.exit_code, "n": self.node, "a": self.attempt,
                "s": self.started_ms, "f": self.finished_ms, "out": self.stdout, "err": self.stderr,
                "ob": self.stdout_bytes, "eb": self.stderr_bytes, "r": self.reason}


@dataclass(frozen=True, slots=True)
class Event:
    """One line of a task's history: when (wall ms), what, on or by which node, detail."""

    at_ms: int
    what: str
    node: str
    detail: str = ""

    def to_wire(self) -> list:
        return [self.at_ms, self.what, self.node, self.detail]


@dataclass(frozen=True, slots=True)
class Record:
    """A task's replicated record. `version` grows with every change its
    coordinator makes; replicas keep the record that `newer()` prefers."""

    spec: TaskSpec
    state: str = "pending"
    attempt: int = 0
    executor: str = ""
    version: int = 0
    history: tuple[Event, ...] = ()
    result: Result | None = None

    def to_wire(self) -> dict:
        out = {"spec": self.spec.to_wire(), "st": self.state, "at": self.attempt, "ex": self.executor,
               "v": self.version, "h": [e.to_wire() for e in self.history]}
        if self.result is not None:
            out["r"] = self.result.to_wire()
        return out

    def with_event(self, ev: Event, **changes) -> Record:
        """A copy one version newer with `ev` appended (history trimmed to fit)."""
        hist = self.history + (ev,)
        if len(hist) > MAX_HISTORY:
            hist = hist[:4] + hist[-(MAX_HISTORY - 4):]
        rec = replace(self, history=hist, version=self.version + 1, **changes)
        return fit_record(rec)


def fit_record(rec: Record) -> Record:
    """Drop middle history entries until the encoded record fits MAX_RECORD."""
    while len(cbor2.dumps(rec.to_wire())) > MAX_RECORD and len(rec.history) > 2:
        rec = replace(rec, history=rec.history[:1] + rec.history[2:])
    return rec


def newer(a: Record, b: Record) -> Record:
    """The record of one task two replicas should both keep (commutative).

    A result is never replaced by no result. Between two results (two runs of
    one task after a split or a false death), the lower attempt wins, then the
    lower node id, so every replica settles on the same single result. Without
    a result, the higher version wins; ties go to the larger encoding, so two
    coordinators of a split still converge."""
    if (a.result is None) != (b.result is None):
        return a if a.result is not None else b
    if a.result is not None and b.result is not None and (a.result.attempt, a.result.node) != (b.result.attempt, b.result.node):
        return a if (a.result.attempt, a.result.node) < (b.result.attempt, b.result.node) else b
    if a.version != b.version:
        return a if a.version > b.version else b
    return a if cbor2.dumps(a.to_wire()) >= cbor2.dumps(b.to_wire()) else b


# ----------------------------------------------------------------- checks of our own input


def parse_arg_value(text: str) -> object:
    """A CLI `--arg KEY=VALUE` value: an integer, true/false, else the text."""
    if re.fullmatch(r"-?[0-9]{1,18}", text):
        return int(text)
    if text in ("true", "false"):
        return text == "true"
    return text


def check_spec(spec: TaskSpec, known_kinds: frozenset[str] | None = None) -> TaskSpec:
    """`spec` if every field is allowed, else SpecError naming the first bad one.
    `known_kinds` None skips the kind-exists check (the mesh may know it)."""
    if not ID_RE.fullmatch(spec.id):
        raise SpecError("id", spec.id, "16 lowercase hex digits")
    if not KIND_RE.fullmatch(spec.kind):
        raise SpecError("kind", spec.kind, "1-32 of a-z 0-9 _ . -")
    if known_kinds is not None and spec.kind not in known_kinds:
        raise SpecError("kind", spec.kind, "a handler some member offers: " + ", ".join(sorted(known_kinds)))
    try:
        encoded = cbor2.dumps(spec.args)
        loads_strict(encoded, maps=True, max_depth=8)
    except (BadMessage, TypeError, ValueError, cbor2.CBOREncodeError) as e:
        raise SpecError("args", spec.args, f"a map of integers, text, bytes, booleans, lists and maps ({e})") from None
    if not isinstance(spec.args, dict) or not all(isinstance(k, str) for k in spec.args):
        raise SpecError("args", spec.args, "a map with text keys")
    if len(encoded) > MAX_ARGS:
        raise SpecError("args", f"<{len(encoded)} bytes>", f"at most {MAX_ARGS} bytes of CBOR")
    if len(spec.caps) > MAX_CAPS:
        raise SpecError("caps", list(spec.caps), f"at most {MAX_CAPS} capabilities")
    for cap in spec.caps:
        if not isinstance(cap, str) or not CAP_RE.fullmatch(cap):
            raise SpecError("caps", cap, "NAME, NAME=VALUE or NAME>=NUMBER (NAME and VALUE: 1-32 of a-z 0-9 _ . -)")
    _check_int("priority", spec.priority, 0, MAX_PRIORITY)
    _check_int("timeout_s", spec.timeout_s, 0, MAX_TIMEOUT_S)
    _check_int("max_attempts", spec.max_attempts, 1, MAX_ATTEMPTS)
    if spec.key and not KEY_RE.fullmatch(spec.key):
        raise SpecError("key", spec.key, f"1-{MAX_KEY} printable ASCII characters without spaces")
    if spec.strategy and spec.strategy not in STRATEGIES:
        raise SpecError("strategy", spec.strategy, "one of " + ", ".join(STRATEGIES))
    return spec


def _check_int(key: str, v: object, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SpecError(key, v, f"an integer from {lo} to {hi}")


# ----------------------------------------------------------------- strict decoding of peers' input


def _get(m: dict, key: str, typ: type | tuple, what: str):
    v = m.get(key)
    if isinstance(v, bool) and typ is not bool:
        raise BadMessage("bad_field", f"{what}.{key}")
    if not isinstance(v, typ):
        raise BadMessage("bad_field", f"{what}.{key}={v!r}"[:80])
    return v


def _uint(m: dict, key: str, what: str, hi: int = MAX_UINT) -> int:
    v = _get(m, key, int, what)
    if not 0 <= v <= hi:
        raise BadMessage("bad_field", f"{what}.{key}={v}"[:80])
    return v


def _text(m: dict, key: str, what: str, limit: int, pattern: re.Pattern | None = None, empty: bool = True) -> str:
    v = _get(m, key, str, what)
    if len(v) > limit or (not v and not empty) or (v and pattern is not None and not pattern.fullmatch(v)):
        raise BadMessage("bad_field", f"{what}.{key}={v!r}"[:80])
    return v


def _node(m: dict, key: str, what: str, empty: bool = False) -> str:
    v = _get(m, key, str, what)
    if not v and empty:
        return v
    return check_node_id(v)


def _choice(m: dict, key: str, what: str, allowed) -> str:
    v = _get(m, key, str, what)
    if v not in allowed:
        raise BadMessage("bad_field", f"{what}.{key}={v!r}"[:80])
    return v


def spec_from_wire(m: object) -> TaskSpec:
    if not isinstance(m, dict):
        raise BadMessage("bad_field", "spec")
    args = _get(m, "a", dict, "spec")
    if len(cbor2.dumps(args)) > MAX_ARGS or not all(isinstance(k, str) for k in args):
        raise BadMessage("bad_field", "spec.a")
    caps = _get(m, "c", list, "spec")
    if len(caps) > MAX_CAPS or not all(isinstance(c, str) and CAP_RE.fullmatch(c) for c in caps):
        raise BadMessage("bad_field", "spec.c")
    origin = _node(m, "o", "spec", empty=True)
    strategy = _get(m, "s", str, "spec")
    if strategy and strategy not in STRATEGIES:
        raise BadMessage("bad_field", "spec.s")
    key = _text(m, "y", "spec", MAX_KEY, KEY_RE)
    return TaskSpec(
        _text(m, "i", "spec", 16, ID_RE, empty=False), _text(m, "k", "spec", 32, KIND_RE, empty=False), args, tuple(caps),
        _uint(m, "p", "spec", MAX_PRIORITY), _uint(m, "t", "spec", MAX_TIMEOUT_S),
        max(1, _uint(m, "m", "spec", MAX_ATTEMPTS)), key, strategy, origin, _uint(m, "w", "spec"),
    )


def result_from_wire(m: object) -> Result:
    if not isinstance(m, dict):
        raise BadMessage("bad_field", "result")
    x = _get(m, "x", int, "result")
    if not -(2**31) <= x < 2**31:
        raise BadMessage("bad_field", "result.x")
    out, err = _get(m, "out", bytes, "result"), _get(m, "err", bytes, "result")
    if len(out) > MAX_STDOUT or len(err) > MAX_STDERR:
        raise BadMessage("bad_field", "result output too long")
    return Result(_choice(m, "o", "result", OUTCOMES), x, _node(m, "n", "result"), _uint(m, "a", "result", MAX_ATTEMPTS * 100),
                  _uint(m, "s", "result"), _uint(m, "f", "result"), out, err, _uint(m, "ob", "result"), _uint(m, "eb", "result"),
                  _text(m, "r", "result", MAX_REASON))


def _event(f: object) -> Event:
    if not isinstance(f, list) or len(f) != 4:
        raise BadMessage("bad_field", "event")
    at, what, node, detail = f
    if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at <= MAX_UINT or what not in EVENTS:
        raise BadMessage("bad_field", "event")
    if not isinstance(detail, str) or len(detail) > MAX_DETAIL:
        raise BadMessage("bad_field", "event.detail")
    return Event(at, what, check_node_id(node) if node else "", detail)


def record_from_wire(m: object) -> Record:
    if not isinstance(m, dict):
        raise BadMessage("bad_field", "record")
    hist = _get(m, "h", list, "record")
    if len(hist) > MAX_HISTORY:
        raise BadMessage("bad_field", "record.h")
    result = result_from_wire(m["r"]) if "r" in m else None
    return Record(spec_from_wire(m.get("spec")), _choice(m, "st", "record", STATES), _uint(m, "at", "record", MAX_ATTEMPTS * 100),
                  _node(m, "ex", "record", empty=True), _uint(m, "v", "record"), tuple(_event(e) for e in hist), result)


# ----------------------------------------------------------------- messages

# Each message: a frozen dataclass with a type code T; to_wire() -> {"T": code, ...fields}.


@dataclass(frozen=True, slots=True)
class Submit:
    """Origin -> coordinator: take this task. Answered by SubmitReply."""

    T = 1
    rid: int
    spec: TaskSpec


@dataclass(frozen=True, slots=True)
class SubmitReply:
    T = 2
    rid: int
    task_id: str
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Replicate:
    """Coordinator -> home replicas (and handoff to new home members): keep this record."""

    T = 3
    record: Record


@dataclass(frozen=True, slots=True)
class ReplicaAck:
    T = 4
    task_id: str
    version: int


@dataclass(frozen=True, slots=True)
class Assign:
    """Coordinator -> executor: queue and run attempt `attempt` of this task."""

    T = 5
    spec: TaskSpec
    attempt: int
    via: str = "placed"  #: placed, bid, stolen, migrated, retried (for the history)


@dataclass(frozen=True, slots=True)
class Update:
    """Executor -> coordinator: attempt `attempt` is queued or running here.
    `via` is "stolen:NODE" or "migrated:NODE" when it came from another executor."""

    T = 6
    task_id: str
    attempt: int
    state: str
    via: str = ""


@dataclass(frozen=True, slots=True)
class Revoke:
    """Coordinator -> executor: drop (or kill) this attempt; it is stale or cancelled."""

    T = 7
    task_id: str
    attempt: int
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Done:
    """Executor -> home replicas: how the attempt ended. Resent until DoneAck.
    It carries the spec so a coordinator that lost the record (the whole mesh
    restarted) can rebuild it from the result."""

    T = 8
    task_id: str
    result: Result
    spec: TaskSpec | None = None


@dataclass(frozen=True, slots=True)
class DoneAck:
    T = 9
    task_id: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Check:
    """Coordinator -> executor: do you still have these (task id, attempt)?"""

    T = 10
    items: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class CheckReply:
    """(task id, attempt, "queued"|"running"|"finished"|"unknown"|"moved", node it moved to or "")."""

    T = 11
    items: tuple[tuple[str, int, str, str], ...]


@dataclass(frozen=True, slots=True)
class CallForBids:
    T = 12
    task_id: str
    round: int
    kind: str
    caps: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Bid:
    """Per-mille figures: capability match, load (CPU), past performance for the kind, free resources."""

    T = 13
    task_id: str
    round: int
    match: int
    load: int
    perf: int
    free: int


@dataclass(frozen=True, slots=True)
class StealRequest:
    """An idle node asks for up to `want` queued tasks of `kinds` it can run."""

    T = 14
    want: int
    kinds: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Handoff:
    """Queued tasks given away (already removed from the giver's queue), for
    `reason` "stolen" or "migrated". Empty: nothing to give."""

    T = 15
    reason: str
    tasks: tuple[tuple[TaskSpec, int], ...]


@dataclass(frozen=True, slots=True)
class Query:
    """Anyone -> a home replica: the record of `task_id`, answered by QueryReply."""

    T = 16
    rid: int
    task_id: str


@dataclass(frozen=True, slots=True)
class QueryReply:
    T = 17
    rid: int
    record: Record | None


@dataclass(frozen=True, slots=True)
class Cancel:
    T = 18
    rid: int
    task_id: str


@dataclass(frozen=True, slots=True)
class CancelReply:
    T = 19
    rid: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ListReq:
    """Records this node holds as a home replica, newest first, filtered."""

    T = 20
    rid: int
    state: str = ""
    node: str = ""


@dataclass(frozen=True, slots=True)
class ListReply:
    """(task id, kind, state, executor, attempt, submitted_ms) per task. `last`
    marks a node's final reply, so the asker stops waiting once all answered."""

    T = 21
    rid: int
    items: tuple[tuple[str, str, str, str, int, int], ...]
    last: bool = True


def to_wire(msg) -> dict:
    """The plain CBOR-able map of one message."""
    t = msg.T
    if t == Submit.T:
        return {"T": t, "rid": msg.rid, "spec": msg.spec.to_wire()}
    if t == Replicate.T:
        return {"T": t, "rec": msg.record.to_wire()}
    if t == Assign.T:
        return {"T": t, "spec": msg.spec.to_wire(), "at": msg.attempt, "via": msg.via}
    if t == Done.T:
        out = {"T": t, "id": msg.task_id, "res": msg.result.to_wire()}
        if msg.spec is not None:
            out["spec"] = msg.spec.to_wire()
        return out
    if t == Handoff.T:
        return {"T": t, "why": msg.reason, "tasks": [[s.to_wire(), a] for s, a in msg.tasks]}
    if t == QueryReply.T:
        out = {"T": t, "rid": msg.rid}
        if msg.record is not None:
            out["rec"] = msg.record.to_wire()
        return out
    out = {"T": t}
    for name in msg.__dataclass_fields__:
        v = getattr(msg, name)
        out[name] = [list(x) for x in v] if name == "items" else list(v) if isinstance(v, tuple) else v
    return out


def encode_message(msg) -> bytes:
    return cbor2.dumps(to_wire(msg))


def _items(m: dict, width: int, what: str) -> list:
    items = _get(m, "items", list, what)
    if len(items) > MAX_BATCH or not all(isinstance(x, list) and len(x) == width for x in items):
        raise BadMessage("bad_field", f"{what}.items")
    return items


def _tid(v: object, what: str) -> str:
    if not isinstance(v, str) or not ID_RE.fullmatch(v):
        raise BadMessage("bad_field", f"{what} task id")
    return v


def _count(v: object, what: str, hi: int = MAX_UINT) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise BadMessage("bad_field", what)
    return v


def decode_message(data: bytes):
    """The message in `data`, or BadMessage. Bounded: depth, sizes and counts are checked."""
    m = loads_strict(data, maps=True, max_depth=10)
    if not isinstance(m, dict):
        raise BadMessage("malformed", "not a map")
    t = m.get("T")
    w = "msg"
    if t == Submit.T:
        return Submit(_uint(m, "rid", w), spec_from_wire(m.get("spec")))
    if t == SubmitReply.T:
        return SubmitReply(_uint(m, "rid", w), _text(m, "task_id", w, 16), _get(m, "ok", bool, w), _text(m, "reason", w, MAX_REASON))
    if t == Replicate.T:
        return Replicate(record_from_wire(m.get("rec")))
    if t == ReplicaAck.T:
        return ReplicaAck(_tid(m.get("task_id"), w), _uint(m, "version", w))
    if t == Assign.T:
        return Assign(spec_from_wire(m.get("spec")), _uint(m, "at", w, MAX_ATTEMPTS * 100), _choice(m, "via", w, EVENTS))
    if t == Update.T:
        return Update(_tid(m.get("task_id"), w), _uint(m, "attempt", w), _choice(m, "state", w, ("queued", "running")), _text(m, "via", w, 80))
    if t == Revoke.T:
        return Revoke(_tid(m.get("task_id"), w), _uint(m, "attempt", w), _text(m, "reason", w, MAX_REASON))
    if t == Done.T:
        spec = spec_from_wire(m["spec"]) if "spec" in m else None
        if spec is not None and spec.id != m.get("id"):
            raise BadMessage("bad_field", "done spec id")
        return Done(_tid(m.get("id"), w), result_from_wire(m.get("res")), spec)
    if t == DoneAck.T:
        return DoneAck(_tid(m.get("task_id"), w), _uint(m, "attempt", w))
    if t == Check.T:
        return Check(tuple((_tid(a, w), _count(b, w)) for a, b in _items(m, 2, w)))
    if t == CheckReply.T:
        items = []
        for a, b, c, d in _items(m, 4, w):
            if c not in ("queued", "running", "finished", "unknown", "moved") or not isinstance(d, str):
                raise BadMessage("bad_field", "check reply item")
            items.append((_tid(a, w), _count(b, w), c, check_node_id(d) if d else ""))
        return CheckReply(tuple(items))
    if t == CallForBids.T:
        caps = _get(m, "caps", list, w)
        if len(caps) > MAX_CAPS or not all(isinstance(c, str) and CAP_RE.fullmatch(c) for c in caps):
            raise BadMessage("bad_field", "caps")
        return CallForBids(_tid(m.get("task_id"), w), _uint(m, "round", w), _text(m, "kind", w, 32, KIND_RE, empty=False), tuple(caps))
    if t == Bid.T:
        return Bid(_tid(m.get("task_id"), w), _uint(m, "round", w), *(_uint(m, k, w, 1000) for k in ("match", "load", "perf", "free")))
    if t == StealRequest.T:
        kinds = _get(m, "kinds", list, w)
        if len(kinds) > 64 or not all(isinstance(k, str) and KIND_RE.fullmatch(k) for k in kinds):
            raise BadMessage("bad_field", "kinds")
        return StealRequest(_uint(m, "want", w, MAX_BATCH), tuple(kinds))
    if t == Handoff.T:
        tasks = _get(m, "tasks", list, w)
        if len(tasks) > MAX_BATCH or not all(isinstance(x, list) and len(x) == 2 for x in tasks):
            raise BadMessage("bad_field", "handoff tasks")
        return Handoff(_choice(m, "why", w, ("stolen", "migrated")), tuple((spec_from_wire(s), _count(a, w, MAX_ATTEMPTS * 100)) for s, a in tasks))
    if t == Query.T:
        return Query(_uint(m, "rid", w), _tid(m.get("task_id"), w))
    if t == QueryReply.T:
        return QueryReply(_uint(m, "rid", w), record_from_wire(m["rec"]) if "rec" in m else None)
    if t == Cancel.T:
        return Cancel(_uint(m, "rid", w), _tid(m.get("task_id"), w))
    if t == CancelReply.T:
        return CancelReply(_uint(m, "rid", w), _get(m, "ok", bool, w), _text(m, "reason", w, MAX_REASON))
    if t == ListReq.T:
        st = _get(m, "state", str, w)
        if st and st not in STATES:
            raise BadMessage("bad_field", "state")
        return ListReq(_uint(m, "rid", w), st, _node(m, "node", w, empty=True))
    if t == ListReply.T:
        items = []
        for a, b, c, d, e, f in _items(m, 6, w):
            if not isinstance(b, str) or not KIND_RE.fullmatch(b) or c not in STATES or not isinstance(d, str):
                raise BadMessage("bad_field", "list item")
            items.append((_tid(a, w), b, c, check_node_id(d) if d else "", _count(e, w), _count(f, w)))
        return ListReply(_uint(m, "rid", w), tuple(items), _get(m, "last", bool, w))
    raise BadMessage("unknown_type", repr(t)[:20])
