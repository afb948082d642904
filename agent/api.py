"""The node's API served over CoAP: POST /api and the observable /proposals.

A request is a CBOR map `{"op": NAME, ...}`. Sealed with the fleet key (COSE,
content-format 16) it may read and write, and is answered sealed; plain CBOR
(content-format 60) may only read, and only where `api.public_read` is on
(an insecure demo mesh, having no key, takes plain writes). The answer is
`{"ok": true, ...}` or `{"error": ONE_LINE, "exit": N}` where N is the exit
status the CLI should use: 2 a bad field in a task request, 3 a refused write
(read-only side of a split, CAS conflict, not a voter, no member can run the
task...), 4 a key, proposal or task that does not exist, 1 other.

Two families of ops: consensus (`leader`, `kv.*`, `prop.*`) and tasks
(`task.*`). A node may run either without the other; an op of a disabled
family is answered with an error that names the setting.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable

import aiocoap.resource as resource
import cbor2
from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.consensus import Consensus, OutcomeUnknown, WriteRefused
from agent.core.taskspec import (
    CAP_RE, ID_RE, KEY_RE, KIND_RE, MAX_ARGS, MAX_ATTEMPTS, MAX_CAPS, MAX_PRIORITY, MAX_TIMEOUT_S, STATES, STRATEGIES,
)
from agent.counters import Counters
from agent.envelope import Opener, Sealer
from agent.messages import BadMessage, check_node_id
from agent.tasks import TaskError, Tasks, record_view
from agent.wire import loads_strict

log = logging.getLogger("meshagent.api")

CBOR, COSE = 60, 16
MAX_REQUEST = 8192  #: bytes of one API request
MAX_ANSWER = 256 * 1024  #: bytes of one answer (CoAP carries it block-wise)
CONSENSUS_READS = {"leader", "kv.get", "kv.ls", "prop.get", "prop.list"}
CONSENSUS_WRITES = {"kv.put", "kv.del", "kv.cas", "prop.new", "prop.vote", "leader.transfer"}
#: Task ops and the fields each takes (any other field is refused: a typo must not pass silently).
TASK_FIELDS = {
    "task.submit": {"kind", "args", "caps", "strategy", "priority", "timeout_s", "max_attempts", "key"},
    "task.get": {"id"},
    "task.list": {"state", "node", "limit"},
    "task.cancel": {"id"},
    "task.local": set(),
}
TASK_WRITES = {"task.submit", "task.cancel"}
READS = CONSENSUS_READS | (TASK_FIELDS.keys() - TASK_WRITES)
WRITES = CONSENSUS_WRITES | TASK_WRITES
EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_NOT_FOUND = 2, 3, 4
MAX_LIST = 1000  #: rows of one task.list answer (newest first); about 100 bytes each
CONSENSUS_DISABLED = "consensus is disabled on this node (consensus.enabled = false)"
TASKS_DISABLED = "tasks are disabled on this node (tasks.enabled = false)"
_RESULT_EXIT = {"not-found": EXIT_NOT_FOUND}  #: state-machine errors; any other error is a refusal


def _unopened(reason: str) -> str:
    """Why a sealed request was refused, in the operator's words."""
    if reason == "replay":
        return ("the request was refused as a replay: its counter is not newer than this client's recent ones "
                "(too many requests in flight from one client identity?)")
    return f"the request is not sealed with this mesh's fleet key ({reason})"


class ApiError(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class Api:
    """Answers API requests against one node's consensus and task driver (either may be None)."""

    def __init__(self, consensus: Consensus | None, tasks: Tasks | None, node_id: str, mesh: str, keys,
                 public_read: Callable[[], bool], boot: int):
        self.c = consensus
        self.tasks = tasks
        self.node_id = node_id
        self.insecure = keys is None
        self.public_read = public_read
        self.drops = Counters()
        self.opener = Opener(mesh, keys, self.drops, max_senders=256, max_datagram=MAX_REQUEST)
        self.sealer = Sealer(mesh, keys, node_id, boot, max_packet=MAX_ANSWER)  # boot: clients' replay windows

    async def handle(self, payload: bytes, content_format: int | None) -> tuple[bytes, int]:
        """(answer bytes, content-format) for one request; never raises."""
        sealed = content_format == COSE or (payload[:1] == b"\xd0")
        if sealed:
            opened = self.opener.open(payload)
            if opened is None:
                return self._plain({"error": _unopened(self.opener.last_drop), "exit": 1})
            payload = opened[1]
        try:
            request = _decode(payload)
            if not (sealed or self.insecure) and (request["op"] in WRITES or not self.public_read()):
                raise ApiError("this needs the fleet key (--fleet-key-file)", 1)
            answer = {"ok": True} | await self.dispatch(request)
        except ApiError as exc:
            answer = {"error": str(exc), "exit": exc.exit_code}
        except BadMessage as exc:  # a field the state machine's schema refuses
            answer = {"error": f"bad request: {exc}", "exit": 1}
        except (WriteRefused, OutcomeUnknown) as exc:
            answer = {"error": str(exc), "exit": EXIT_REFUSED if isinstance(exc, WriteRefused) else 1}
        except TaskError as exc:
            answer = {"error": str(exc), "exit": exc.exit_code}
        except Exception as exc:  # our bug: answer it rather than leave the client waiting
            log.exception("bug: API request failed")
            answer = {"error": f"internal error: {exc}", "exit": 1}
        body = cbor2.dumps(answer)
        if len(body) > MAX_ANSWER - 1024:
            body = cbor2.dumps({"error": f"answer of {len(body)} bytes is too large; narrow the request", "exit": 1})
        if sealed:
            return self.sealer.seal(body), COSE
        return body, CBOR

    @staticmethod
    def _plain(answer: dict) -> tuple[bytes, int]:
        return cbor2.dumps(answer), CBOR

    async def dispatch(self, r: dict) -> dict:
        op = r["op"]
        if op in TASK_FIELDS:
            if self.tasks is None:
                raise ApiError(TASKS_DISABLED)
            return await self.task_op(op, r)
        if self.c is None:
            raise ApiError(CONSENSUS_DISABLED)
        if op == "leader":
            return self.leader()
        if op == "leader.transfer":
            if self.c.raft.role != "leader" and self.c.leader_address():
                return {"redirect": self.c.leader_address(), "leader": self.c.raft.leader}
            self.c.transfer(_opt_str(r, "to"))
            return {"transferring_to": _opt_str(r, "to") or "the most caught-up voter"}
        if op in ("kv.get", "kv.ls", "prop.get", "prop.list") and not r.get("stale", False):
            await self.c.linearizable()
        if op == "kv.get":
            return self.kv_get(_str(r, "key"))
        if op == "kv.ls":
            limit = r.get("limit", 1000)
            if type(limit) is not int or not 1 <= limit <= 1000:
                raise ApiError(f"limit {limit!r}: expected 1 to 1000")
            prefix = r.get("prefix") or ""
            if type(prefix) is not str:
                raise ApiError(f"prefix: expected a string, got {prefix!r}"[:200])
            return {"items": [_kv_view(kv) for kv in self.c.sm.list(prefix, limit)]}
        if op == "prop.get":
            p = self.c.sm.proposal(_str(r, "id"))
            if p is None:
                raise ApiError(f"no proposal {_str(r, 'id')}", EXIT_NOT_FOUND)
            return {"proposal": proposal_view(p)}
        if op == "prop.list":
            return {"proposals": [proposal_view(p) for p in self.c.sm.proposals()]}
        return await self.write(op, r)

    async def write(self, op: str, r: dict) -> dict:
        now = int(time.time() * 1000)
        if op == "kv.put":
            res = await self.c.write("kv.put", key=_str(r, "key"), value=_bytes(r, "value"))
        elif op == "kv.del":
            res = await self.c.write("kv.del", key=_str(r, "key"))
        elif op == "kv.cas":
            res = await self.c.write("kv.cas", key=_str(r, "key"), rev=_int(r, "rev"), value=_bytes(r, "value"))
        elif op == "prop.new":
            deadline_s = r.get("deadline_s")
            if deadline_s is None:
                deadline_s = self.c.cfg.proposal_deadline_s or None
            elif type(deadline_s) is not int or not 0 < deadline_s <= 30 * 86400:
                raise ApiError(f"deadline {deadline_s!r} must be whole seconds between 1 and 30 days")
            if "value" not in r:
                raise ApiError("a proposal needs a value")
            pid = secrets.token_hex(6)
            deadline_ms = now + deadline_s * 1000 if deadline_s else None
            extra = {"deadline_ms": deadline_ms} if deadline_ms is not None else {}
            res = await self.c.write("prop.new", id=pid, value=r["value"], proposer=self.node_id, created_ms=now, **extra)
            return _result(res) | {"id": pid, "deadline_ms": deadline_ms}
        elif op == "prop.vote":
            choice = _str(r, "choice")
            if choice not in ("approve", "reject"):
                raise ApiError(f"vote {choice!r}: expected approve or reject")
            if self.node_id not in self.c.applied_voters:
                raise ApiError(f"this node ({self.node_id}) is not a voter; voters: {', '.join(self.c.applied_voters)}", EXIT_REFUSED)
            res = await self.c.write("prop.vote", id=_str(r, "id"), voter=self.node_id, choice=choice, now_ms=now)
        else:
            raise ApiError(f"unknown op {op!r}")
        return _result(res)

    async def task_op(self, op: str, r: dict) -> dict:
        """One task op; bad fields are exit 2, the driver's TaskError carries its own exit."""
        unknown = [k for k in r if k != "op" and k not in TASK_FIELDS[op]]
        if unknown:
            known = ", ".join(sorted(TASK_FIELDS[op])) or "none"
            raise ApiError(f"{op}: unknown field {unknown[0]!r} (fields: {known})"[:200], EXIT_BAD_INPUT)
        t = self.tasks
        if op == "task.submit":
            spec = t.build_spec(
                _task_kind(r), _task_args(r), _task_caps(r), _task_str(r, "strategy", STRATEGIES),
                _task_int(r, "priority", 0, MAX_PRIORITY, 5), _task_int(r, "timeout_s", 0, MAX_TIMEOUT_S, 0),
                _task_int(r, "max_attempts", 1, MAX_ATTEMPTS, 3), _task_key(r),
            )
            return {"id": await t.submit(spec)}
        if op == "task.get":
            return {"task": record_view(await t.get(_task_id(r)))}
        if op == "task.cancel":
            await t.cancel(_task_id(r))
            return {"id": r["id"]}
        if op == "task.list":
            state, node, limit = _task_str(r, "state", STATES), _task_node(r), _task_int(r, "limit", 1, MAX_LIST, MAX_LIST)
            rows = await t.list(state, node)
            return {"tasks": rows[:limit], "total": len(rows)}
        return {"node": self.node_id, "tasks": t.engine.local_tasks()}

    def leader(self) -> dict:
        st = self.c.status()
        return {"node": self.node_id, "leader": st["leader"], "term": st["term"], "role": st["role"],
                "mode": st["mode"], "why": st["why"], "voters": st["voters"], "commit_index": st["commit_index"]}

    def kv_get(self, key: str) -> dict:
        item = self.c.sm.get(key)
        if item is None:
            raise ApiError(f"key not found: {key}", EXIT_NOT_FOUND)
        return _kv_view(item)


def _result(res) -> dict:
    if res is None:
        return {}
    if not res.ok:
        raise ApiError(_describe(res), _RESULT_EXIT.get(res.error, EXIT_REFUSED))
    return {"revision": res.revision, "value": res.value} if res.value is not None else {"revision": res.revision}


def _describe(res) -> str:
    extra = f" (current revision {res.revision})" if res.error == "conflict" else ""
    return f"{res.error}{extra}" + (f": {res.value}" if isinstance(res.value, str) else "")


def _kv_view(item) -> dict:
    return {"key": item.key, "value": item.value, "revision": item.mod_revision,
            "create_revision": item.create_revision, "version": item.version}


def proposal_view(p) -> dict:
    """A proposal for clients: votes keyed by voter."""
    view = p.to_wire()
    view["votes"] = {v.voter: {"choice": v.choice, "ms": v.now_ms, "index": v.index} for v in p.votes}
    return view


# ------------------------------------------------------------ task request fields (bad: exit 2)


def _bad(name: str, expected: str, value: object) -> ApiError:
    """One line naming the field first, so a long value cannot push the name out."""
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ApiError(f"{name}: expected {expected}, got {shown}", EXIT_BAD_INPUT)


def _task_kind(r: dict) -> str:
    v = r.get("kind")
    if type(v) is not str or not KIND_RE.fullmatch(v):
        raise _bad("kind", "a handler name (1-32 of a-z 0-9 _ . -)", v)
    return v


def _task_args(r: dict) -> dict:
    v = r.get("args", {})
    if type(v) is not dict or not all(type(k) is str for k in v):
        raise _bad("args", "a map with text keys", v)
    size = len(cbor2.dumps(v))
    if size > MAX_ARGS:
        raise ApiError(f"args: {size} bytes of CBOR, at most {MAX_ARGS} allowed", EXIT_BAD_INPUT)
    return v


def _task_caps(r: dict) -> list[str]:
    v = r.get("caps", [])
    if type(v) is not list or len(v) > MAX_CAPS:
        raise _bad("caps", f"a list of at most {MAX_CAPS} capabilities", v)
    for cap in v:
        if type(cap) is not str or not CAP_RE.fullmatch(cap):
            raise _bad("caps", "NAME, NAME=VALUE or NAME>=NUMBER (NAME, VALUE: 1-32 of a-z 0-9 _ . -)", cap)
    return v


def _task_str(r: dict, name: str, choices: tuple[str, ...]) -> str:
    """The empty string (the default) or one of `choices`."""
    v = r.get(name, "")
    if type(v) is not str or (v and v not in choices):
        raise _bad(name, '"" or one of ' + ", ".join(choices), v)
    return v


def _task_int(r: dict, name: str, lo: int, hi: int, default: int) -> int:
    v = r.get(name, default)
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(name, f"an integer from {lo} to {hi}", v)
    return v


def _task_key(r: dict) -> str:
    v = r.get("key", "")
    if type(v) is not str or (v and not KEY_RE.fullmatch(v)):
        raise _bad("key", "1-64 printable ASCII characters without spaces", v)
    return v


def _task_id(r: dict) -> str:
    v = r.get("id")
    if type(v) is not str or not ID_RE.fullmatch(v):
        raise _bad("id", "a task id (16 lowercase hex digits)", v)
    return v


def _task_node(r: dict) -> str:
    v = r.get("node", "")
    if v == "":
        return v
    try:
        return check_node_id(v)
    except BadMessage:
        raise _bad("node", "a node id", v) from None


def _decode(payload: bytes) -> dict:
    if len(payload) > MAX_REQUEST:
        raise ApiError(f"request of {len(payload)} bytes exceeds {MAX_REQUEST}")
    try:
        r = loads_strict(payload, maps=True, max_depth=8)
    except BadMessage as exc:
        raise ApiError(f"malformed request: {exc.reason}") from None
    if type(r) is not dict or type(r.get("op")) is not str:
        raise ApiError("malformed request: expected a map with an op")
    if r["op"] not in READS | WRITES:
        raise ApiError(f"unknown op {r['op']!r}; known: {', '.join(sorted(READS | WRITES))}")
    return r


def _str(r: dict, name: str) -> str:
    v = r.get(name)
    if type(v) is not str or not v:
        raise ApiError(f"{name}: expected a non-empty string, got {v!r}"[:200])
    return v


def _opt_str(r: dict, name: str) -> str | None:
    return None if r.get(name) is None else _str(r, name)


def _bytes(r: dict, name: str) -> bytes:
    v = r.get(name)
    if type(v) is str:
        v = v.encode()
    if type(v) is not bytes:
        raise ApiError(f"{name}: expected bytes or a string")
    return v


def _int(r: dict, name: str) -> int:
    v = r.get(name)
    if type(v) is not int or v < 0:
        raise ApiError(f"{name}: expected a non-negative integer, got {v!r}")
    return v


class ApiResource(resource.Resource):
    """POST /api."""

    rt = "meshagent.api"

    def __init__(self, api: Api):
        super().__init__()
        self.api = api

    async def render_post(self, request):
        body, cf = await self.api.handle(request.payload, request.opt.content_format)
        return Message(code=Code.CHANGED, payload=body, content_format=cf)


class ProposalsResource(resource.ObservableResource):
    """GET /proposals, observable (RFC 7641): every proposal with its votes and
    outcome; a notification follows each change. Where public reads are off
    the body is sealed with the fleet key, so only key holders can read it."""

    rt = "meshagent.proposals"
    ct = CBOR

    def __init__(self, api: Api):
        super().__init__()
        self.api = api

    def changed(self, events) -> None:
        if any(ev.kind.startswith("prop.") or ev.kind == "restore" for ev in events):
            self.updated_state()

    async def render_get(self, request):
        body = cbor2.dumps({"node": self.api.node_id, "proposals": [proposal_view(p) for p in self.api.c.sm.proposals()]})
        if self.api.public_read() or self.api.insecure:
            return Message(code=Code.CONTENT, payload=body, content_format=CBOR)
        return Message(code=Code.CONTENT, payload=self.api.sealer.seal(body), content_format=COSE)
