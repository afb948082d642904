"""The task driver: wires the task engine to CoAP, the handler runner, the
queue journal and the membership view.

Task messages are sealed with the fleet key under the purpose "tasks" and
sent as NON POSTs to /tasks, one message per datagram of at most
TASK_MAX_DATAGRAM bytes; the engine resends what matters (records, results,
checks), so a lost datagram costs time, not work. Messages the engine
addresses to this node are looped back without touching the network.

Order of effects after every input: journal changes are flushed (one write,
one fsync) before any message leaves, so a queue entry we acknowledged with an
Update survives a crash; then runs are started or killed; then messages go.

The client side of the protocol (submit, query, list, cancel from the API on
this node) lives here too: it is plain request/answer with a timeout and a
retry on the next home member.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from pathlib import Path

from agent.config import Config
from agent.core.placement import Weights
from agent.core.tasks import Kill, MemberInfo, Start, TaskEngine, TaskSettings
from agent.core.taskctx import BUILTIN_KINDS
from agent.core.taskspec import (
    TERMINAL, Cancel, CancelReply, ListReply, ListReq, Query, QueryReply, Record, Result, SpecError, Submit,
    SubmitReply, TaskSpec, check_spec, decode_message, encode_message, newer,
)
from agent.counters import Counters
from agent.envelope import Opener, Sealer
from agent.io.coap import CoapEndpoint
from agent.io.journal import Journal
from agent.io.runner import HandlerSpec, Runner, RunResult
from agent.messages import BadMessage, Status
from agent.wire import ENVELOPE_OVERHEAD, decode_meta

log = logging.getLogger("meshagent.tasks")

TASKS_PATH = ("tasks",)
TASK_MAX_DATAGRAM = 4000  #: like Raft's: within aiocoap's 4096-byte receive buffer
TASK_MAX_PACKET = TASK_MAX_DATAGRAM - ENVELOPE_OVERHEAD
TICK_S = 0.1  #: engine timers (bids, steals, checks) are 300 ms and up; messages are handled at once
IDLE_TICK_S = 0.5  #: with nothing queued, running or unsettled: only steal attempts are due (500 ms)
MAX_CLIENT_WAITS = 1024  #: API requests waiting for an answer from a peer at once


class TaskError(Exception):
    """A submission, query or cancel that cannot be done; `exit_code` for the CLI
    (2 bad input, 3 refused, 4 not found, 1 other)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def task_settings(config: Config) -> TaskSettings:
    t = config.tasks
    return TaskSettings(
        slots=t.slots or os.cpu_count() or 1, strategy=t.strategy, replicas=t.replicas, vnodes=t.vnodes,
        match_threshold=t.match_threshold, weights=Weights(*t.bid_weights), bid_timeout_ms=t.bid_timeout_ms,
        bid_rounds=t.bid_rounds, steal=t.steal, steal_interval_ms=t.steal_interval_ms, overload=t.overload,
        idle=t.idle, overload_samples=t.overload_samples, min_stay_ms=t.min_stay_ms, check_ms=t.check_ms,
        resend_ms=t.resend_ms, keep_results=t.keep_results, max_queue=t.max_queue,
    )


def member_info(node: str, meta: bytes, incarnation: int) -> MemberInfo:
    """What a member's gossiped meta says about running tasks there. The boot
    counter is the top half of the incarnation (agent.node starts each boot there)."""
    m = decode_meta(meta)
    cpu = m.get("cpu")
    return MemberInfo(
        node, tuple(m.get("capabilities", ())), frozenset(BUILTIN_KINDS) | frozenset(m.get("kinds", ())),
        None if cpu is None else min(1.0, max(0.0, cpu / 100)), int(m.get("queued", 0)), m.get("mem"),
        incarnation >> 32,
    )


class _Listing:
    """The answers to one ListReq sent to `expected` members."""

    def __init__(self, expected: int, complete: asyncio.Future):
        self.expected = expected
        self.complete = complete
        self.items: list = []
        self.finished = 0

    def add(self, msg: ListReply) -> None:
        self.items.extend(msg.items)
        self.finished += msg.last
        if self.finished >= self.expected and not self.complete.done():
            self.complete.set_result(None)


class Tasks:
    def __init__(self, config: Config, node_id: str, boot: int, keys, endpoint: CoapEndpoint, membership, drops: Counters):
        self.config = config
        self.node_id = node_id
        self.endpoint = endpoint
        self.membership = membership
        self.drops = drops
        data = Path(config.node.data_dir) / "tasks"
        handlers = {h.name: HandlerSpec(h.name, h.command, h.env, h.cwd, h.timeout_s, h.concurrency) for h in config.handlers}
        self.runner = Runner(handlers, self._on_run_done, workdir=data)
        self.engine = TaskEngine(node_id, task_settings(config), random.Random(), self.runner.kinds(),
                                 tuple(config.node.capabilities), drops)
        self.journal = Journal(data / "queue.journal")
        self.sealer = Sealer(config.node.mesh, keys, node_id, boot, max_packet=TASK_MAX_PACKET, purpose="tasks")
        self.opener = Opener(config.node.mesh, keys, drops, max_datagram=TASK_MAX_DATAGRAM, purpose="tasks")
        self.waits: dict[int, asyncio.Future] = {}
        self.listings: dict[int, _Listing] = {}
        self.rid = random.getrandbits(32)
        self._loop_task: asyncio.Task | None = None
        self._stopping = False
        self._view_signature: list = []
        self._view_cache: dict[str, MemberInfo] = {}
        self._started = time.monotonic()
        self.sent_bytes = 0
        self._restore()
        endpoint.add_channel(TASKS_PATH, self.on_datagram, rt="meshagent.tasks")

    # ------------------------------------------------------------ lifecycle

    def _restore(self) -> None:
        """Before the /tasks channel can deliver anything: an Assign that arrived
        first would otherwise be overwritten by the older journaled attempt."""
        restored = self.journal.open()
        self._clock()
        self.engine.restore(restored)
        if restored:
            log.info("task queue and results restored from %s: %d entries", self.journal.path, len(restored))

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        self.engine.pause()
        self._stopping = True
        await self.runner.stop()  # killed runs stay in the journal: they run again after the restart
        self._flush()
        self.journal.close()

    async def _loop(self) -> None:
        while True:
            try:
                self._clock()
                self.engine.set_view(self._view())
                self.engine.tick()
                self._flush()
            except Exception:  # our bug: keep the agent alive, loudly
                self.drops.inc("internal_error")
                log.exception("bug: a task engine tick failed")
            await asyncio.sleep(TICK_S if self.engine.busy() else IDLE_TICK_S)

    def _clock(self) -> None:
        self.engine.set_time(int((time.monotonic() - self._started) * 1000), int(time.time() * 1000))

    def _view(self) -> dict[str, MemberInfo]:
        """Alive members as the engine sees them; rebuilt only when a member's
        status or incarnation (which every meta change bumps) moved."""
        members = [m for m in self.membership.members.values()
                   if m.status in (Status.ALIVE, Status.SUSPECT) and m.node != self.node_id]
        signature = [(m.node, m.incarnation) for m in members]
        if signature != self._view_signature:
            self._view_signature = signature
            self._view_cache = {m.node: member_info(m.node, m.meta, m.incarnation) for m in members}
        return self._view_cache

    def set_load(self, cpu_pct: float | None, mem_pct: float | None) -> None:
        self.engine.set_load(None if cpu_pct is None else min(1.0, cpu_pct / 100), mem_pct)

    # ------------------------------------------------------------ engine effects

    def _flush(self) -> None:
        """Journal first, then runs, then messages; messages to ourselves loop back."""
        for _ in range(100):  # loopback rounds are bounded: each answers the previous
            journal = self.engine.take_journal()
            for key, value in journal:
                if value is None:
                    self.journal.delete(key)
                else:
                    self.journal.put(key, value)
            if journal:
                self.journal.flush()
            for act in self.engine.take_actions():
                self._act(act)
            outbox = self.engine.take_outbox()
            if not outbox:
                return
            for to, msg in outbox:
                if to == self.node_id:
                    self._local(msg)
                else:
                    self._send(to, msg)

    def _act(self, act) -> None:
        if isinstance(act, Start):
            self.runner.start(act.spec.id, act.attempt, act.spec.kind, act.spec.args, act.timeout_s)
        elif isinstance(act, Kill):
            self.runner.kill(act.task_id, act.attempt, act.reason)

    def _local(self, msg) -> None:
        if self._client_answer(msg):
            return
        self._clock()
        self.engine.step(self.node_id, msg)

    def _send(self, to: str, msg) -> None:
        m = self.membership.members.get(to)
        if m is None:
            self.drops.inc("task_no_address")
            return
        data = encode_message(msg)
        if len(data) > TASK_MAX_PACKET:
            self.drops.inc("task_oversized_out")
            log.error("bug: a %s of %d bytes does not fit a task datagram", type(msg).__name__, len(data))
            return
        sealed = self.sealer.seal(data)
        self.sent_bytes += len(sealed)
        self.endpoint.send(m.addr, m.port, sealed, TASKS_PATH)

    def _on_run_done(self, task_id: str, attempt: int, r: RunResult) -> None:
        if self._stopping:
            log.info("task %s attempt %d interrupted by the shutdown; it runs again after the restart", task_id, attempt)
            return
        result = Result(r.outcome, r.exit_code, self.node_id, attempt, r.started_ms, r.finished_ms, r.stdout, r.stderr,
                        r.stdout_bytes, r.stderr_bytes, r.reason)
        log.info("task %s attempt %d: %s (exit %d) in %d ms", task_id, attempt, r.outcome, r.exit_code, r.finished_ms - r.started_ms)
        self._clock()
        self.engine.finished(task_id, attempt, result)
        self._flush()

    # ------------------------------------------------------------ datagrams

    def on_datagram(self, data: bytes, src: tuple[str, int]) -> None:
        opened = self.opener.open(data)
        if opened is None:
            return
        sender, body = opened
        try:
            msg = decode_message(body)
        except BadMessage as exc:
            self.drops.inc("task_" + exc.reason)
            return
        if sender not in self.membership.members:
            self.drops.inc("task_unknown_sender")
            return
        if self._client_answer(msg):
            return
        try:
            self._clock()
            self.engine.set_view(self._view())  # as fresh as the membership: cheap when nothing moved
            self.engine.step(sender, msg)
        except Exception:
            self.drops.inc("internal_error")
            log.exception("bug: the task engine failed on a %s from %s", type(msg).__name__, sender)
        self._flush()

    def _client_answer(self, msg) -> bool:
        """Answers to our own API requests resolve the waiting request."""
        if isinstance(msg, ListReply):
            listing = self.listings.get(msg.rid)
            if listing is not None:
                listing.add(msg)
            return True
        if isinstance(msg, SubmitReply | QueryReply | CancelReply):
            fut = self.waits.get(msg.rid)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return True
        return False

    # ------------------------------------------------------------ client side (the API of this node)

    def _ask(self, to: str, make) -> asyncio.Future:
        if len(self.waits) >= MAX_CLIENT_WAITS:
            raise TaskError(f"{len(self.waits)} requests already waiting on this node; try again", 3)
        self.rid = (self.rid + 1) & 0xFFFFFFFF
        rid = self.rid
        fut = asyncio.get_running_loop().create_future()
        self.waits[rid] = fut
        fut.add_done_callback(lambda _f: self.waits.pop(rid, None))
        msg = make(rid)
        if to == self.node_id:
            self._clock()
            self.engine.step(self.node_id, msg)
            self._flush()
        else:
            self._send(to, msg)
        return fut

    async def _request(self, targets: list[str], make, accept=lambda answer: True):
        """Ask each target in turn (timeout each) until one gives an acceptable answer."""
        timeout = self.config.tasks.request_timeout_ms / 1000 / max(1, min(3, len(targets)))
        last = None
        for to in targets:
            fut = self._ask(to, make)
            try:
                last = await asyncio.wait_for(fut, timeout)
            except asyncio.TimeoutError:
                continue
            if accept(last):
                return last
        return last

    def build_spec(self, kind: str, args: dict, caps: list[str], strategy: str, priority: int, timeout_s: int,
                   max_attempts: int, key: str) -> TaskSpec:
        """A checked spec, or TaskError (exit 2) naming the bad field."""
        tid = self.engine.new_task_id(key)
        spec = TaskSpec(tid, kind, args, tuple(caps), priority, timeout_s, max_attempts, key,
                        strategy or self.config.tasks.strategy, self.node_id, int(time.time() * 1000))
        try:
            return check_spec(spec)
        except SpecError as e:
            raise TaskError(f"bad task: {e}", 2) from None

    async def submit(self, spec: TaskSpec) -> str:
        """Hand `spec` to its coordinator; returns the task id or raises TaskError."""
        self._clock()
        self.engine.set_view(self._view())
        known = set().union(*(m.kinds for m in self.engine.ctx.view.values()))
        if spec.kind not in known:
            raise TaskError(f"unknown kind {spec.kind!r}: no alive member has that handler (known: {', '.join(sorted(known))})", 2)
        home = self.engine.home(spec)
        if not home:
            raise TaskError(f"no alive member can run kind {spec.kind!r} with capabilities {list(spec.caps)}", 3)
        answer = await self._request(home, lambda rid: Submit(rid, spec))
        if answer is None:
            raise TaskError(f"no home member of the task answered within {self.config.tasks.request_timeout_ms} ms ({', '.join(home)})", 1)
        if not answer.ok:
            raise TaskError(answer.reason, 3)
        return spec.id

    async def get(self, task_id: str) -> Record:
        """The task's record from a home member (the freshest answer), else from anyone."""
        members = sorted(self.engine.ctx.view)
        for targets in (self._homes_of(task_id), members):
            answers = await self._gather(targets, lambda rid: Query(rid, task_id))
            recs = [a.record for a in answers if a.record is not None]
            if recs:
                return functools.reduce(newer, recs)  # the copy the home members converge on
        raise TaskError(f"no such task: {task_id} (asked {len(members)} members)", 4)

    def _homes_of(self, task_id: str) -> list[str]:
        """Home members for a task we know only by id: the ring over every alive member
        (right for capability and auction tasks; hash tasks are found by asking everyone)."""
        return self.engine.home(TaskSpec(task_id, "echo"))

    async def _gather(self, targets: list[str], make) -> list:
        futs = [self._ask(t, make) for t in targets]
        if not futs:
            return []
        done, pending = await asyncio.wait(futs, timeout=self.config.tasks.request_timeout_ms / 1000)
        for f in pending:
            f.cancel()
        return [f.result() for f in done]

    async def wait(self, task_id: str, timeout_s: float) -> Record:
        """Poll the record until it is finished or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            rec = await self.get(task_id)
            if rec.state in TERMINAL or time.monotonic() >= deadline:
                return rec
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 1.5)

    async def cancel(self, task_id: str) -> None:
        rec = await self.get(task_id)
        home = self.engine.home(rec.spec)
        answer = await self._request(home, lambda rid: Cancel(rid, task_id), accept=lambda a: a.ok or "already" in a.reason)
        if answer is None:
            raise TaskError(f"no home member of {task_id} answered", 1)
        if not answer.ok:
            raise TaskError(f"cannot cancel {task_id}: {answer.reason}", 3)

    async def list(self, state: str = "", node: str = "") -> list[dict]:
        """Tasks known to every alive member (each answers for the records it holds),
        newest first; returns as soon as every member has answered, or at the timeout."""
        self.rid = (self.rid + 1) & 0xFFFFFFFF
        rid = self.rid
        members = sorted(self.engine.ctx.view)
        listing = self.listings[rid] = _Listing(len(members), asyncio.get_running_loop().create_future())
        try:
            for to in members:
                msg = ListReq(rid, state, node)
                if to == self.node_id:
                    self._clock()
                    self.engine.step(self.node_id, msg)
                    self._flush()
                else:
                    self._send(to, msg)
            try:
                await asyncio.wait_for(asyncio.shield(listing.complete), self.config.tasks.request_timeout_ms / 1000)
            except asyncio.TimeoutError:
                pass
        finally:
            del self.listings[rid]
        best: dict[str, tuple] = {}
        for it in listing.items:
            old = best.get(it[0])
            if old is None or (it[2] in TERMINAL, it[4]) > (old[2] in TERMINAL, old[4]):
                best[it[0]] = it
        rows = sorted(best.values(), key=lambda it: it[5], reverse=True)
        return [{"id": i, "kind": k, "state": s, "node": n, "attempt": a, "submitted_ms": w} for i, k, s, n, a, w in rows]

    # ------------------------------------------------------------ views

    def status(self) -> dict:
        return {**self.engine.counts(), "slots": self.engine.ctx.s.slots,
                "kinds": sorted(self.engine.ctx.kinds), "journal": self.journal.stats}


def record_view(rec: Record) -> dict:
    """A record as the API and `meshagent task` show it (JSON-ready)."""
    s = rec.spec
    out = {
        "id": s.id, "kind": s.kind, "args": s.args, "caps": list(s.caps), "priority": s.priority,
        "timeout_s": s.timeout_s, "max_attempts": s.max_attempts, "key": s.key, "strategy": s.strategy,
        "origin": s.origin, "submitted_ms": s.submitted_ms, "state": rec.state, "attempt": rec.attempt,
        "node": rec.executor, "version": rec.version,
        "history": [{"at_ms": e.at_ms, "event": e.what, "node": e.node, "detail": e.detail} for e in rec.history],
        "result": None,
    }
    r = rec.result
    if r is not None:
        out["result"] = {
            "outcome": r.outcome, "exit_code": r.exit_code, "node": r.node, "attempt": r.attempt,
            "started_ms": r.started_ms, "finished_ms": r.finished_ms, "duration_ms": r.finished_ms - r.started_ms,
            "stdout": r.stdout.decode("utf-8", "replace"), "stderr": r.stderr.decode("utf-8", "replace"),
            "stdout_bytes": r.stdout_bytes, "stderr_bytes": r.stderr_bytes, "reason": r.reason,
        }
    return out
