"""The consensus commands of `meshagent`: leader, kv, propose, vote, proposals.

Each sends one request to an agent's POST /api (see agent.api), sealed with the
fleet key when one is available (writes need it), and prints the answer.
Exit codes: 0 done, 1 failure, 3 a refused write (the one-line reason on
stderr), 4 a key or proposal that does not exist.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

import cbor2

DEFAULT_KEY = Path("/etc/meshagent/fleet.key")
COSE, CBOR = 16, 60


class CallFailed(Exception):
    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _key_file(args) -> Path | None:
    """--fleet-key-file, else the agent's default key file when we can read it."""
    if args.fleet_key_file:
        return Path(args.fleet_key_file)
    return DEFAULT_KEY if os.access(DEFAULT_KEY, os.R_OK) else None


def _client_envelope(args, key_file: Path):
    from agent.api import MAX_ANSWER
    from agent.counters import Counters
    from agent.envelope import Opener, Sealer, load_keys

    keys = load_keys(key_file)
    sealer = Sealer(args.mesh, keys, f"cli-{secrets.token_hex(4)}", secrets.randbelow(2**31) + 1, max_packet=8000)
    return sealer, Opener(args.mesh, keys, Counters(), max_datagram=MAX_ANSWER + 1024)


def call(args, request: dict) -> dict:
    """Send one API request; the answer map, or CallFailed with the exit code."""
    from aiocoap.error import NetworkError

    from agent.cli import _agent_address, _reason
    from agent.io.coap import coap_get

    host, port = _agent_address(args.agent)
    key_file = _key_file(args)
    body = cbor2.dumps(request, canonical=True)  # shortest forms: the agent's decoder is strict
    if key_file is not None:
        sealer, opener = _client_envelope(args, key_file)
        body, cf = sealer.seal(body), COSE
    else:
        cf = CBOR
    try:
        code, payload = asyncio.run(coap_get(host, port, "api", timeout=args.timeout, payload=body, content_format=cf))
    except (TimeoutError, asyncio.TimeoutError):
        raise CallFailed(f"no answer from the agent at {host}:{port} within {args.timeout:g} s") from None
    except (OSError, NetworkError) as exc:
        raise CallFailed(f"cannot reach the agent at {host}:{port}: {_reason(exc)}") from None
    if not code.startswith("2."):
        raise CallFailed(f"the agent at {host}:{port} answered {code}: {payload[:200].decode(errors='replace')}")
    if key_file is not None and payload[:1] == b"\xd0":
        opened = opener.open(payload)
        if opened is None:
            raise CallFailed(f"the answer from {host}:{port} is not sealed with this fleet key and mesh ({args.mesh})")
        payload = opened[1]
    try:
        answer = cbor2.loads(payload)
    except Exception as exc:
        raise CallFailed(f"unreadable answer from {host}:{port}: {exc}") from None
    if not isinstance(answer, dict):
        raise CallFailed(f"unreadable answer from {host}:{port}")
    if "error" in answer:
        raise CallFailed(str(answer["error"]), int(answer.get("exit", 1)))
    return answer


def _print(args, answer: dict, text: str) -> int:
    print(json.dumps(_jsonable(answer), indent=2, sort_keys=True) if args.json else text)
    return 0


def _jsonable(v):
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return {"hex": v.hex()}
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


def _show_value(v) -> str:
    j = _jsonable(v)
    return j if isinstance(j, str) else json.dumps(j, sort_keys=True)


# ------------------------------------------------------------------ commands


def cmd_leader(args) -> int:
    if args.action == "transfer":
        request = {"op": "leader.transfer"} | ({"to": args.target} if args.target else {})  # no "to": the leader picks
        a = call(args, request)
        if "redirect" in a:  # only the leader can hand leadership on: ask it
            args.agent = a["redirect"]
            a = call(args, request)
        return _print(args, a, f"leadership transfer to {a['transferring_to']} started")
    a = call(args, {"op": "leader"})
    who = a["leader"] or "none"
    text = f"leader {who} (term {a['term']}); {a['node']} is {a['role']}, {a['mode']}"
    if a.get("why"):
        text += f"\n{a['why']}"
    return _print(args, a, text)


def cmd_kv(args) -> int:
    op = args.kv_command
    if op == "get":
        a = call(args, {"op": "kv.get", "key": args.key, "stale": args.stale})
        return _print(args, a, _show_value(a["value"]))
    if op == "ls":
        a = call(args, {"op": "kv.ls", "prefix": args.prefix, "stale": args.stale})
        rows = [f"{i['key']}\t{i['revision']}\t{_show_value(i['value'])[:60]}" for i in a["items"]]
        return _print(args, a, "\n".join(rows) if rows else "(no keys)")
    if op == "put":
        a = call(args, {"op": "kv.put", "key": args.key, "value": args.value})
    elif op == "del":
        a = call(args, {"op": "kv.del", "key": args.key})
    else:
        a = call(args, {"op": "kv.cas", "key": args.key, "rev": args.rev, "value": args.value})
    return _print(args, a, f"ok, revision {a.get('revision')}")


def cmd_propose(args) -> int:
    try:
        value = json.loads(args.value)
    except json.JSONDecodeError:
        value = args.value
    bad = _not_plain(value)
    if bad:
        raise CallFailed(f"proposal values are plain CBOR (strings, integers, booleans, lists, maps): {bad}")
    request = {"op": "prop.new", "value": value}
    if args.deadline is not None:
        request["deadline_s"] = max(1, math.ceil(args.deadline))
    a = call(args, request)
    return _print(args, a, a["id"])


def _not_plain(value) -> str:
    """What in a JSON value has no place in a proposal ("" when all is well)."""
    if value is None:
        return "null is not allowed"
    if isinstance(value, float):
        return f"{value} is a fraction; use a string or an integer"
    if isinstance(value, list):
        return next((b for b in map(_not_plain, value) if b), "")
    if isinstance(value, dict):
        return next((b for b in map(_not_plain, value.values()) if b), "")
    return ""


def cmd_vote(args) -> int:
    a = call(args, {"op": "prop.vote", "id": args.id, "choice": args.choice})
    return _print(args, a, f"voted {args.choice} on {args.id}")


def cmd_proposals(args) -> int:
    if args.watch:
        return _watch(args)
    a = call(args, {"op": "prop.list", "stale": args.stale})
    return _print(args, a, format_proposals(a["proposals"]))


def format_proposals(proposals: list) -> str:
    if not proposals:
        return "(no proposals)"
    rows = []
    for p in proposals:
        votes = p.get("votes", {})
        yes = sum(1 for v in votes.values() if _choice(v) == "approve")
        no = sum(1 for v in votes.values() if _choice(v) == "reject")
        rows.append(f"{p['id']}\t{p.get('outcome') or 'open'}\t+{yes} -{no}\t{_show_value(p.get('value'))[:60]}")
    return "\n".join(rows)


def _choice(v) -> str:
    return v.get("choice") if isinstance(v, dict) else v


def _watch(args) -> int:
    """Observe /proposals (RFC 7641) and print each state; --count stops after N."""
    return asyncio.run(_observe(args))


async def _observe(args) -> int:
    import aiocoap
    from aiocoap import Message
    from aiocoap.numbers.codes import Code

    from agent.cli import _agent_address
    from agent.io.coap import uri_host

    host, port = _agent_address(args.agent)
    key_file = _key_file(args)
    opener = _client_envelope(args, key_file)[1] if key_file else None
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        req = ctx.request(Message(code=Code.GET, uri=f"coap://{uri_host(host)}:{port}/proposals", observe=0))
        first = await asyncio.wait_for(req.response, args.timeout)
        shown = 0
        for resp in _chain(first, req):
            resp = await resp
            _print_observed(args, resp, opener)
            shown += 1
            if args.count and shown >= args.count:
                return 0
        return 0
    finally:
        await asyncio.wait_for(ctx.shutdown(), timeout=5)


def _chain(first, req):
    async def now():
        return first
    yield now()
    it = req.observation.__aiter__()
    while True:
        yield it.__anext__()


def _print_observed(args, resp, opener) -> None:
    payload = resp.payload
    if payload[:1] == b"\xd0":
        if opener is None:
            raise CallFailed("the agent seals /proposals; pass --fleet-key-file")
        opened = opener.open(payload)
        if opened is None:
            raise CallFailed("the notification is not sealed with this fleet key")
        payload = opened[1]
    data = cbor2.loads(payload)
    stamp = time.strftime("%H:%M:%S")
    if args.json:
        print(json.dumps(_jsonable(data), sort_keys=True), flush=True)
    else:
        print(f"-- {stamp} proposals at {data.get('node')}\n{format_proposals(data.get('proposals', []))}", flush=True)


# -------------------------------------------------------------------- parser


def add_commands(sub, add_client_args) -> None:
    p = sub.add_parser("leader", help="the Raft leader and term; `leader transfer [NODE]` moves leadership")
    add_client_args(p)
    p.add_argument("action", nargs="?", choices=["transfer"], help="transfer: hand leadership to NODE (default: the most caught-up voter)")
    p.add_argument("target", nargs="?", metavar="NODE")
    p.set_defaults(func=cmd_leader)

    p = sub.add_parser("kv", help="the replicated key-value store")
    ksub = p.add_subparsers(dest="kv_command", required=True)
    for name, helptext in (("get", "read a key (linearizable; --stale reads the local copy)"), ("put", "write a key"),
                           ("del", "delete a key"), ("cas", "write a key if its revision is REV (0 = must not exist)"),
                           ("ls", "list keys by prefix")):
        q = ksub.add_parser(name, help=helptext)
        add_client_args(q)
        if name == "ls":
            q.add_argument("prefix", nargs="?", default="")
        else:
            q.add_argument("key")
        if name == "cas":
            q.add_argument("rev", type=int)
        if name in ("put", "cas"):
            q.add_argument("value")
        if name in ("get", "ls"):
            q.add_argument("--stale", action="store_true", help="read this node's copy without asking the leader")
    p.set_defaults(func=cmd_kv)

    p = sub.add_parser("propose", help="put a decision to the voters; prints its id")
    add_client_args(p)
    p.add_argument("value", help="JSON (e.g. '{\"assigned_to\": \"pi-3\"}') or plain text")
    p.add_argument("--deadline", type=float, metavar="SECONDS", help="expire undecided after this long (default consensus.proposal_deadline_s)")
    p.set_defaults(func=cmd_propose)

    p = sub.add_parser("vote", help="vote on a proposal as this voter")
    add_client_args(p)
    p.add_argument("id")
    p.add_argument("choice", choices=["approve", "reject"])
    p.set_defaults(func=cmd_vote)

    p = sub.add_parser("proposals", help="list proposals with votes and outcome; --watch follows changes (CoAP Observe)")
    add_client_args(p)
    p.add_argument("--watch", action="store_true")
    p.add_argument("--count", type=int, default=0, metavar="N", help="with --watch: stop after N updates")
    p.add_argument("--stale", action="store_true")
    p.set_defaults(func=cmd_proposals)


def run(func, args) -> int:
    """Run a command, mapping CallFailed to its exit code and a one-line reason."""
    try:
        return func(args)
    except CallFailed as exc:
        print(f"meshagent: {exc}", file=sys.stderr)
        return exc.exit_code
