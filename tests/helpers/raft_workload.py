"""A client of the consensus API for the Raft integration tests, run inside the lab's hub
namespace (see tests/raft_lab.py, which starts it):

    ip netns exec <hub> python tests/helpers/raft_workload.py run --nodes 10.231.0.1:5683,... \
        --duration 20 --clients 4 --out history.json --fleet-key-file fleet.key --mesh lab

    ip netns exec <hub> python tests/helpers/raft_workload.py rpc --fleet-key-file ... --mesh lab

`run`: K concurrent logical clients for a bounded time (and a bounded number of
operations), each issuing random kv.put / kv.get (linearizable) / cas against a random
node, one operation at a time, over a few keys. Every operation is recorded with its
call and return times (time.monotonic(), the same clock as the test process: network
namespaces do not change CLOCK_MONOTONIC), the node asked, the answer and a status:

    ok          the agent answered {"ok": true, ...}
    not-found   exit 4 (a get of an absent key: the get observed "absent")
    conflict    exit 3 with error "conflict ...": a cas whose revision did not match
    refused     exit 3, any other reason: the write definitely did not take effect
    unknown     exit 1 (e.g. "not committed within ... ms; it may still commit")
    timeout     no answer within --timeout

Every write carries a value unique in the whole run ("<run>/<client>/<seq>"), so a value
names exactly one write and hence one revision of its key. That is what makes the
revision-based kv.cas of the agent expressible as the value-based cas of
agent/sim/lincheck.py: a cas is a linearizable get (value v at revision r, or absent,
r = 0) followed by kv.cas(key, r, new); it is recorded as cas(expected=v, new) (None =
absent), True when the agent swapped, False on "conflict". The get is recorded too.

The history file is JSON: {"meta": {...}, "ops": [{client, op, key, input, output, call,
ret (null when it timed out), node, status, error}, ...]}. tests/raft_lab.py turns it
into lincheck Operations.

`rpc`: a long-lived helper for the test process itself (which lives outside the lab's
network): JSON lines in, {"id", "timeout", "calls": [[host, port, request], ...]},
JSON lines out, {"id", "results": [{"status", "answer" | "error", "exit", "elapsed"}]},
the calls of one line made concurrently.

Every request is sealed with the fleet key (COSE, content-format 16), or plain CBOR
(content-format 60) with --insecure, and sent as a NON POST to /api from one aiocoap
client context: a CON would queue every request to an agent behind the retransmissions
of an unanswered one (aiocoap's NSTART = 1), which a dead agent would turn into a stall
of the whole workload. A lost datagram is then just a timed-out operation.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiocoap  # noqa: E402
import cbor2  # noqa: E402
from aiocoap.numbers.codes import Code  # noqa: E402

COSE, CBOR = 16, 60
MAX_CLIENTS = 64
MAX_OPS = 100_000


class ApiClient:
    """Sealed (or insecure) NON POSTs to agents' /api through one aiocoap context."""

    def __init__(self, ctx, mesh: str, key_file: str | None):
        from agent.counters import Counters
        from agent.envelope import Opener, Sealer, load_keys

        self.ctx = ctx
        self.mesh = mesh
        self.keys = load_keys(key_file) if key_file else None
        self._Opener, self._Counters = Opener, Counters
        # one sender id per process: the agent keeps a 64-wide replay window per sender,
        # and every request of this process counts up from this Sealer
        self.sealer = Sealer(mesh, self.keys, f"wl-{secrets.token_hex(4)}", secrets.randbelow(2**31) + 1, max_packet=8000)

    async def call(self, host: str, port: int, request: dict, timeout: float) -> dict:
        """{"status", "answer" or "error", "exit"}; never raises for a network problem."""
        from agent.api import MAX_ANSWER

        body = cbor2.dumps(request, canonical=True)  # shortest forms: the agent's decoder is strict
        if self.keys is not None:
            body, cf = self.sealer.seal(body), COSE
        else:
            cf = CBOR
        msg = aiocoap.Message(code=Code.POST, mtype=aiocoap.NON, uri=f"coap://{host}:{port}/api", payload=body)
        msg.opt.content_format = cf
        try:
            resp = await asyncio.wait_for(self.ctx.request(msg).response, timeout)
        except (asyncio.TimeoutError, TimeoutError):
            return {"status": "timeout", "error": f"no answer within {timeout:g} s", "exit": None}
        except Exception as exc:  # network error (e.g. ICMP unreachable): no answer, outcome unknown
            return {"status": "timeout", "error": f"{type(exc).__name__}: {exc}"[:300], "exit": None}
        payload = resp.payload
        if not resp.code.is_successful():
            return {"status": "unknown", "error": f"CoAP {resp.code}", "exit": 1}
        if self.keys is not None and payload[:1] == b"\xd0":
            # a fresh opener per answer: the agent's API sealer takes a random boot at each
            # start, so a long-lived opener would refuse a restarted agent's answers as replays
            opened = self._Opener(self.mesh, self.keys, self._Counters(), max_datagram=MAX_ANSWER + 1024).open(payload)
            if opened is None:
                return {"status": "unknown", "error": "answer not sealed with the fleet key", "exit": 1}
            payload = opened[1]
        try:
            answer = cbor2.loads(payload)
        except Exception as exc:
            return {"status": "unknown", "error": f"unreadable answer: {exc}", "exit": 1}
        if not isinstance(answer, dict):
            return {"status": "unknown", "error": "unreadable answer", "exit": 1}
        if "error" in answer:
            code = int(answer.get("exit", 1))
            err = str(answer["error"])
            status = {3: "conflict" if err.startswith("conflict") else "refused", 4: "not-found"}.get(code, "unknown")
            return {"status": status, "error": err, "exit": code}
        return {"status": "ok", "answer": jsonable(answer), "exit": 0}


def jsonable(v):
    if isinstance(v, bytes):
        try:
            return v.decode()
        except UnicodeDecodeError:
            return {"hex": v.hex()}
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def parse_nodes(text: str) -> list[tuple[str, str, int]]:
    """"name=host:port,..." or "host:port,..." -> [(name, host, port)]."""
    out = []
    for i, item in enumerate(x for x in text.split(",") if x):
        name, _, addr = item.rpartition("=")
        host, _, port = addr.rpartition(":")
        out.append((name or str(i), host, int(port)))
    if not out:
        raise SystemExit("--nodes: no node")
    return out


# ----------------------------------------------------------------------------- workload


class Workload:
    def __init__(self, args, client: ApiClient):
        self.a = args
        self.client = client
        self.nodes = parse_nodes(args.nodes)
        self.keys = [f"k{i}" for i in range(args.keys)]
        self.run_id = args.run_id or secrets.token_hex(3)
        self.ops: list[dict] = []
        self.stop = False
        self.n_started = 0
        weights = [float(x) for x in args.mix.split(",")]
        if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise SystemExit("--mix: three non-negative weights put,get,cas")
        total = sum(weights)
        self.p_put, self.p_get = weights[0] / total, weights[1] / total

    def _take(self) -> bool:
        if self.stop or self.n_started >= self.a.max_ops or time.monotonic() >= self.deadline:
            return False
        self.n_started += 1
        return True

    async def _one(self, c: int, node, op: str, key: str, request: dict, value=None, expected=None) -> dict:
        name, host, port = node
        t0 = time.monotonic()
        res = await self.client.call(host, port, request, self.a.timeout)
        t1 = time.monotonic()
        rec = {"client": c, "op": op, "key": key, "node": name, "call": t0,
               "ret": None if res["status"] == "timeout" else t1, "status": res["status"],
               "error": res.get("error"), "input": None, "output": None}
        ans = res.get("answer") or {}
        if op == "put":
            rec["input"] = value
        elif op == "get":
            rec["output"] = ans.get("value") if res["status"] == "ok" else None
            rec["revision"] = ans.get("revision", 0) if res["status"] == "ok" else 0
        else:  # cas
            rec["input"] = [expected, value]
            rec["rev"] = request["rev"]
            rec["output"] = {"ok": True, "conflict": False}.get(res["status"])
        self.ops.append(rec)
        return rec

    async def client_loop(self, c: int) -> None:
        rng = random.Random(f"{self.a.seed}/{c}")
        seq = 0
        while self._take():
            node = rng.choice(self.nodes)
            key = rng.choice(self.keys)
            r = rng.random()
            seq += 1
            value = f"{self.run_id}/{c}/{seq}"
            if r < self.p_put:
                await self._one(c, node, "put", key, {"op": "kv.put", "key": key, "value": value}, value=value)
            elif r < self.p_put + self.p_get:
                await self._one(c, node, "get", key, {"op": "kv.get", "key": key})
            else:
                got = await self._one(c, node, "get", key, {"op": "kv.get", "key": key})
                if got["status"] in ("ok", "not-found") and self._take():
                    expected = got["output"] if got["status"] == "ok" else None
                    rev = got["revision"] if got["status"] == "ok" else 0
                    await self._one(c, node, "cas", key, {"op": "kv.cas", "key": key, "rev": rev, "value": value},
                                    value=value, expected=expected)
            if self.a.pace_ms:
                await asyncio.sleep(rng.uniform(0, 2 * self.a.pace_ms) / 1000)

    async def main(self) -> dict:
        start = time.monotonic()
        self.deadline = start + self.a.duration
        await asyncio.gather(*(self.client_loop(c) for c in range(self.a.clients)))
        end = time.monotonic()
        counts: dict[str, int] = {}
        for op in self.ops:
            counts[op["status"]] = counts.get(op["status"], 0) + 1
        return {"meta": {"run_id": self.run_id, "start": start, "end": end, "clients": self.a.clients,
                         "keys": self.keys, "timeout": self.a.timeout, "nodes": [n[0] for n in self.nodes],
                         "seed": self.a.seed, "statuses": counts, "stopped": self.stop},
                "ops": self.ops}


async def run_main(args) -> int:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        wl = Workload(args, ApiClient(ctx, args.mesh, args.fleet_key_file))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # stop early but still write the history
            loop.add_signal_handler(sig, lambda: setattr(wl, "stop", True))
        if args.ready_file:
            Path(args.ready_file).write_text(str(time.monotonic()))
        # the hard bound: duration + one operation's timeout (+ slack), whatever happens
        result = await asyncio.wait_for(wl.main(), args.duration + 2 * args.timeout + 10)
    finally:
        await asyncio.wait_for(ctx.shutdown(), 5)
    tmp = Path(str(args.out) + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)
    st = result["meta"]["statuses"]
    secs = result["meta"]["end"] - result["meta"]["start"]
    print(f"{len(result['ops'])} operations in {secs:.1f} s: {st}", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- rpc


async def rpc_main(args) -> int:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    client = ApiClient(ctx, args.mesh, args.fleet_key_file)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending: set[asyncio.Task] = set()

    async def serve(req: dict) -> None:
        async def one(host, port, request):
            t0 = time.monotonic()
            res = await client.call(host, port, request, float(req.get("timeout", 3.0)))
            return res | {"elapsed": time.monotonic() - t0, "call": t0}
        results = await asyncio.gather(*(one(h, p, r) for h, p, r in req["calls"]))
        sys.stdout.write(json.dumps({"id": req["id"], "results": results}) + "\n")
        sys.stdout.flush()

    deadline = time.monotonic() + args.max_seconds
    while (left := deadline - time.monotonic()) > 0:
        try:  # idle or not, the helper ends after --max-seconds (the lab kills it long before)
            line = await asyncio.wait_for(reader.readline(), left)
        except (asyncio.TimeoutError, TimeoutError):
            break
        if not line:
            break
        task = asyncio.create_task(serve(json.loads(line)))
        pending.add(task)
        task.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(pending, timeout=30)
    await asyncio.wait_for(ctx.shutdown(), 5)
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("run", "rpc"):
        q = sub.add_parser(name)
        q.add_argument("--fleet-key-file", help="seal requests with this key (default: --insecure)")
        q.add_argument("--mesh", default="lab")
        if name == "rpc":
            q.add_argument("--max-seconds", type=float, default=3600, help="exit after this long")
        if name == "run":
            q.add_argument("--nodes", required=True, help="NAME=HOST:PORT,... (or HOST:PORT,...)")
            q.add_argument("--duration", type=float, required=True, help="seconds")
            q.add_argument("--clients", type=int, default=4)
            q.add_argument("--keys", type=int, default=5)
            q.add_argument("--timeout", type=float, default=4.0, help="seconds per operation")
            q.add_argument("--mix", default="0.4,0.4,0.2", help="weights put,get,cas")
            q.add_argument("--pace-ms", type=float, default=20.0, help="mean pause between a client's operations")
            q.add_argument("--max-ops", type=int, default=5000, help="operations in all (bounds the history)")
            q.add_argument("--seed", default="0")
            q.add_argument("--run-id", default="")
            q.add_argument("--ready-file", help="written when the workload starts")
            q.add_argument("--out", required=True)
    args = p.parse_args()
    if args.mode == "run":
        if not (1 <= args.clients <= MAX_CLIENTS and 1 <= args.keys <= 100 and 0 < args.duration <= 3600
                and 0 < args.timeout <= 60 and 1 <= args.max_ops <= MAX_OPS):
            p.error("out of range: 1-64 clients, 1-100 keys, duration up to 3600 s, timeout up to 60 s, max-ops up to 100000")
        return asyncio.run(run_main(args))
    return asyncio.run(rpc_main(args))


if __name__ == "__main__":
    sys.exit(main())
