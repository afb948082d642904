"""The task engine on many simulated nodes: virtual time, a lossy network,
crashes, restarts and partitions, and handlers that "run" for a set time.

Time is virtual milliseconds. The membership view each node gets is an
oracle with a detection delay: a crashed or cut-off member drops out of the
others' views `detect_ms` after it went, as SWIM would tell them. A task's
duration is its argument `ms`. Load is what a node's runs use of its slots
plus an optional burner (0..1), gossiped to the others every `gossip_ms`
(stale, like the real meta).

Every message goes through the real codec (`taskspec.encode_message` /
`decode_message`) so the simulator also checks that everything the engine
produces encodes, decodes and fits a task datagram.

What the checks need is recorded as the run goes: every run (where, which
attempt, when, how the task got there, whether the runner could run it, the
hash owner in the runner's view), every hand-off of queued work between
executors, and when each accepted task was first seen finished. Two runs of
one task at once are a violation unless `overlap_ok` is set (a partition:
the failure detector's false deaths allow them), then they are only counted.
The scenarios built on this are in `agent.sim.task_main`.

Nothing here iterates a set or reads a clock: a run is a function of its seed.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from agent.core.placement import cap_match
from agent.core.tasks import BUILTIN_KINDS, Kill, MemberInfo, Start, TaskEngine, TaskSettings
from agent.core.taskspec import (
    TERMINAL, Done, Handoff, Replicate, Result, Submit, SubmitReply, TaskSpec, check_spec, decode_message,
    encode_message, newer, task_id_for_key,
)
from agent.messages import BadMessage
from agent.sim.network import Network

MAX_TASK_DATAGRAM = 3800  #: encoded task message bytes; the sealed datagram must stay within 4000
POLL_MS = 5000  #: how often finished() looks at every open task (the messages that finish one tell it at once)


@dataclass
class Run:
    node: str
    attempt: int
    start: int
    end: int
    via: str = ""  #: how the task reached the runner: placed, bid, retried, stolen:N, migrated:N, restart
    capable: bool = True  #: the runner offers the kind and matches the caps >= match_threshold
    owner: str = ""  #: strategy hash: the first home member in the runner's view at the start


@dataclass
class SimNode:
    name: str
    caps: tuple[str, ...]
    kinds: dict[str, int]
    engine: TaskEngine | None = None
    journal: dict = field(default_factory=dict)  #: what survives a crash
    runs: dict[str, Run] = field(default_factory=dict)
    burner: float = 0.0
    boot: int = 0  #: restarts so far (gossiped: peers learn it forgot its records)
    gone_at: int | None = None  #: crash time, while down


@dataclass
class Violation:
    at: int
    what: str


@dataclass
class Move:
    """Queued work handed from one executor to another (a Handoff sent)."""

    at: int
    frm: str
    to: str
    reason: str  #: stolen or migrated


class TaskSim:
    def __init__(self, seed: int, nodes: int = 20, *, settings: TaskSettings | None = None, loss: float = 0.0,
                 delay_ms: tuple[int, int] = (1, 10), tick_ms: int = 50, detect_ms: int = 3000, gossip_ms: int = 1000,
                 caps: Callable[[int], tuple[str, ...]] | None = None, extra_kinds: dict[str, int] | None = None,
                 kinds: Callable[[int], dict[str, int]] | None = None):
        self.seed = seed
        self.rng = random.Random(seed)
        self.s = settings or TaskSettings()
        self.tick_ms, self.detect_ms, self.gossip_ms = tick_ms, detect_ms, gossip_ms
        self.now = 0
        self.net = Network(random.Random(self.rng.getrandbits(64)), loss=loss, delay=delay_ms, codec=False, measure=False)
        self.nodes: dict[str, SimNode] = {}
        self.base_kinds = dict.fromkeys(BUILTIN_KINDS, 64) | {"work": 64} | (extra_kinds or {})
        self.cut_at: int | None = None
        self.group_of: dict[str, int] = {}  #: node -> partition side while cut (unnamed nodes: -1)
        self.gossip: dict[str, MemberInfo] = {}
        self.next_gossip = 0
        self._views: dict[int, dict[str, MemberInfo]] = {}  #: side -> view, for this step
        self.accepted: dict[str, TaskSpec] = {}
        self.refused: dict[str, str] = {}
        self.submitted: dict[str, tuple[TaskSpec, int]] = {}  #: task id -> (spec, when), whatever the answer
        self.home_at_submit: dict[str, list[str]] = {}  #: task id -> its home members in the origin's view then
        self.crashes: dict[str, list[int]] = {}  #: node -> when it crashed
        self.runs: list[tuple[str, Run]] = []  #: every run started: (task id, run)
        self.active: dict[str, list[Run]] = {}  #: task id -> runs going on now
        self.violations: list[Violation] = []
        self.overlap_ok = False
        self.overlaps: list[Violation] = []  #: concurrent runs while overlap_ok
        self.moves: dict[str, list[Move]] = {}  #: task id -> hand-offs of it, in order
        self.done_at: dict[str, int] = {}  #: accepted task id -> when a terminal record was first seen
        self.next_poll = 0
        self.pending_submits: dict[int, tuple[str, TaskSpec, int, int]] = {}  #: rid -> (origin, spec, tries, due)
        self.rid = 0
        self.max_datagram = 0
        self.loopback: list[tuple[str, int, bytes]] = []  #: (node, its boot, message) sent to itself
        self.watch: set[str] = set()  #: task ids whose messages go to `trace` (a replay's --watch)
        self.trace: list[str] = []
        self._capable: dict[tuple[str, tuple[str, ...], str], bool] = {}  #: a node's kinds and caps never change
        for i in range(nodes):
            self.add_node(caps(i) if caps else (), kinds(i) if kinds else None)

    # ------------------------------------------------------------ nodes

    def add_node(self, caps: tuple[str, ...] = (), kinds: dict[str, int] | None = None) -> str:
        """A new member (the next name), started at once: the others see it from the next step."""
        i = len(self.nodes)
        name = f"n{i:03d}"
        self.nodes[name] = SimNode(name, tuple(caps), dict(kinds if kinds is not None else self.base_kinds))
        self.net.attach(name, (f"10.0.{i // 250}.{i % 250 + 1}", 5683))
        self._boot(name)
        self._views = {}
        return name

    def _boot(self, name: str) -> None:
        n = self.nodes[name]
        n.boot += 1
        n.engine = TaskEngine(name, self._settings(), random.Random(self.rng.getrandbits(64)), n.kinds, n.caps)
        n.engine.set_time(self.now, self.now)
        n.engine.restore(dict(n.journal))
        n.gone_at = None
        self.net.up(name)

    def _settings(self) -> TaskSettings:
        return self.s

    def up(self) -> list[str]:
        return [n for n, x in self.nodes.items() if x.engine is not None]

    def crash(self, name: str) -> None:
        """SIGKILL: runs die with the node; the journal stays on its disk."""
        n = self.nodes[name]
        for tid, run in n.runs.items():
            run.end = self.now
            self._run_over(tid, run)
        n.runs.clear()
        n.engine = None
        n.gone_at = self.now
        self.crashes.setdefault(name, []).append(self.now)
        self.net.down(name)
        self._views = {}

    def restart(self, name: str) -> None:
        self._boot(name)
        self._views = {}

    def partition(self, *groups: Iterable[str]) -> None:
        groups = [list(g) for g in groups]
        self.net.partition(groups)
        self.group_of = {node: i for i, g in enumerate(groups) for node in g}
        self.cut_at = self.now
        self._views = {}

    def heal(self) -> None:
        self.net.heal()
        self.group_of = {}
        self.cut_at = None
        self._views = {}

    def side(self, name: str) -> int:
        """The partition side `name` is on as the others see it (0 when not cut or not yet noticed)."""
        if self.cut_at is None or self.now - self.cut_at < self.detect_ms:
            return 0
        return self.group_of.get(name, -1)

    def view_of(self, name: str) -> dict[str, MemberInfo]:
        """Who `name` believes alive: up and reachable, or gone less than detect_ms ago.
        One dict per partition side and step, shared by the side's nodes (each engine copies it)."""
        side = self.side(name)
        view = self._views.get(side)
        if view is None:
            view = self._views[side] = {other: self.gossip.get(other) or MemberInfo(other, n.caps, frozenset(n.kinds), boot=n.boot)
                                        for other, n in self.nodes.items() if self._seen_alive(n) and self.side(other) == side}
        return view

    def _seen_alive(self, n: SimNode) -> bool:
        return n.engine is not None or (n.gone_at is not None and self.now - n.gone_at < self.detect_ms)

    def load_of(self, n: SimNode) -> float:
        return min(1.0, len(n.runs) / max(1, self.s.slots) * 0.9 + n.burner)

    def capable(self, spec: TaskSpec, name: str) -> bool:
        """Ground truth: `name` offers the kind and matches the caps at least at the threshold."""
        key = (spec.kind, spec.caps, name)
        ok = self._capable.get(key)
        if ok is None:
            n = self.nodes[name]
            ok = self._capable[key] = spec.kind in n.kinds and cap_match(spec.caps, n.caps) >= self.s.match_threshold
        return ok

    # ------------------------------------------------------------ clients

    def submit(self, origin: str, kind: str = "work", args: dict | None = None, **fields) -> str:
        """Submit from `origin` as the driver does: the id from the idempotency key if
        there is one, resolve the strategy, send to home[0], retry the next."""
        eng = self.nodes[origin].engine
        tid = task_id_for_key(fields["key"]) if fields.get("key") else eng.new_task_id()
        spec = TaskSpec(tid, kind, args or {}, **fields)
        spec = check_spec(replace(spec, strategy=spec.strategy or self.s.strategy, origin=origin, submitted_ms=self.now))
        self.submitted.setdefault(spec.id, (spec, self.now))
        self.home_at_submit.setdefault(spec.id, eng.home(spec))
        self._send_submit(origin, spec, 0)
        return spec.id

    def _send_submit(self, origin: str, spec: TaskSpec, tries: int) -> None:
        eng = self.nodes[origin].engine
        if eng is None:
            return
        home = eng.home(spec)
        if not home:
            self.refused[spec.id] = "no home"
            return
        self.rid += 1
        self.pending_submits[self.rid] = (origin, spec, tries, self.now + 1000)
        self._deliver_or_send(origin, home[tries % len(home)], Submit(self.rid, spec))

    def _client_reply(self, msg: SubmitReply) -> None:
        pending = self.pending_submits.pop(msg.rid, None)
        if pending is None:
            return
        spec = pending[1]
        if msg.ok:
            self.accepted[spec.id] = spec
            self.refused.pop(spec.id, None)  # an earlier try's answer was lost, not a refusal
            for name in self.up():  # it may have finished before this (late) answer came
                self._note_finished(spec.id, self.nodes[name].engine)
        elif spec.id not in self.accepted:
            self.refused[spec.id] = msg.reason

    def _retry_submits(self) -> None:
        for rid, (origin, spec, tries, due) in list(self.pending_submits.items()):
            if self.now >= due:
                del self.pending_submits[rid]
                if tries < 3:
                    self._send_submit(origin, spec, tries + 1)
                elif spec.id not in self.accepted:
                    self.refused[spec.id] = "no answer"

    # ------------------------------------------------------------ the loop

    def run_for(self, ms: int) -> None:
        end = self.now + ms
        while self.now < end:
            self.step()

    def run_until(self, cond: Callable[[], bool], limit_ms: int) -> bool:
        end = self.now + limit_ms
        while self.now < end:
            if cond():
                return True
            self.step()
        return cond()

    def step(self) -> None:
        self.now += self.tick_ms
        self.net.now = self.now
        self._views = {}
        if self.now >= self.next_gossip:
            self.next_gossip = self.now + self.gossip_ms
            self._gossip()
        self._deliver_loopback()
        while (item := self.net.pop(self.now)) is not None:
            dst, payload, src_addr = item
            self._receive(dst, self.net.node_at(src_addr), payload)
        for name in self.up():
            self._finish_runs(name)
        for name in self.up():
            eng = self.nodes[name].engine
            eng.set_time(self.now, self.now)
            eng.set_view(self.view_of(name))
            eng.set_load(self.load_of(self.nodes[name]), 50.0)
            eng.tick()
            self._flush(name)
        self._retry_submits()

    def _deliver_loopback(self) -> None:
        """What nodes sent themselves last step (dropped if the node restarted since)."""
        batch, self.loopback = self.loopback, []
        for dst, boot, data in batch:
            if self.nodes[dst].engine is not None and self.nodes[dst].boot == boot:
                self._receive(dst, dst, data)

    def _gossip(self) -> None:
        self.gossip = {}
        for name, n in self.nodes.items():
            if n.engine is not None:
                self.gossip[name] = MemberInfo(name, n.caps, frozenset(n.kinds), self.load_of(n), n.engine.queued_count(), 50.0, n.boot)

    def _receive(self, dst: str, src: str, payload: bytes) -> None:
        try:
            msg = decode_message(payload)
        except BadMessage as e:  # the real receiver drops it: the engine sent what its peers refuse
            self.violations.append(Violation(self.now, f"message from {src} to {dst} does not decode: {e}"))
            return
        if isinstance(msg, SubmitReply):
            self._client_reply(msg)
            return
        eng = self.nodes[dst].engine
        if eng is None:
            return
        if self.watch and self.watch.intersection(task_ids(msg)):
            self.trace.append(f"{self.now:>7} {dst} <- {src} {type(msg).__name__}")
        eng.set_time(self.now, self.now)
        eng.step(src, msg)
        self._flush(dst)
        if isinstance(msg, (Done, Replicate)):
            self._note_finished(msg.task_id if isinstance(msg, Done) else msg.record.spec.id, eng)

    def _deliver_or_send(self, src: str, dst: str, msg) -> None:
        data = encode_message(msg)
        self.max_datagram = max(self.max_datagram, len(data))
        if len(data) > MAX_TASK_DATAGRAM:
            self.violations.append(Violation(self.now, f"{type(msg).__name__} of {len(data)} bytes from {src}"))
        if self.watch and self.watch.intersection(task_ids(msg)):
            self.trace.append(f"{self.now:>7} {src} -> {dst} {msg}"[:400])
        if isinstance(msg, Handoff):
            for spec, _ in msg.tasks:
                self.moves.setdefault(spec.id, []).append(Move(self.now, src, dst, msg.reason))
        if src == dst:  # the driver loops a node's messages to itself back without the network
            self.loopback.append((dst, self.nodes[dst].boot, data))
        else:
            self.net.send(src, self.net.addr_of(dst), data)

    def _flush(self, name: str) -> None:
        n = self.nodes[name]
        eng = n.engine
        for key, value in eng.take_journal():
            if value is None:
                n.journal.pop(key, None)
            else:
                n.journal[key] = value
        for act in eng.take_actions():
            if isinstance(act, Start):
                self._start(n, act)
            elif isinstance(act, Kill):
                self._kill(n, act)
        for to, msg in eng.take_outbox():
            self._deliver_or_send(name, to, msg)

    # ------------------------------------------------------------ runs

    def _start(self, n: SimNode, act: Start) -> None:
        if act.spec.id in self.watch:
            self.trace.append(f"{self.now:>7} {n.name} starts attempt {act.attempt}")
        spec = act.spec
        tid = spec.id
        duration = int(spec.args.get("ms", 10)) if spec.kind == "work" else 1
        local = n.engine.exec.running.get(tid)  # the executor's own entry: how the task got here
        owner = ""
        if spec.strategy == "hash":
            home = n.engine.home(spec)
            owner = home[0] if home else ""
        run = Run(n.name, act.attempt, self.now, self.now + duration, local.via if local else "",
                  self.capable(spec, n.name), owner)
        others = [r for r in self.active.get(tid, []) if r.node != n.name or r.attempt != act.attempt]
        if others:
            what = (f"task {tid} started on {n.name} (attempt {act.attempt}, via {run.via}) while running on "
                    + ", ".join(f"{r.node} (attempt {r.attempt}, via {r.via}, since {r.start})" for r in others))
            (self.overlaps if self.overlap_ok else self.violations).append(Violation(self.now, what))
        n.runs[tid] = run
        self.active.setdefault(tid, []).append(run)
        self.runs.append((tid, run))

    def _run_over(self, tid: str, run: Run) -> None:
        runs = self.active.get(tid, [])
        if run in runs:
            runs.remove(run)

    def _kill(self, n: SimNode, act: Kill) -> None:
        run = n.runs.get(act.task_id)
        if run is None or run.attempt != act.attempt:
            return
        del n.runs[act.task_id]
        run.end = self.now
        self._run_over(act.task_id, run)
        res = Result("cancelled", -9, n.name, run.attempt, run.start, self.now, reason=act.reason[:120])
        n.engine.finished(act.task_id, run.attempt, res)

    def _finish_runs(self, name: str) -> None:
        n = self.nodes[name]
        for tid, run in list(n.runs.items()):
            if self.now >= run.end:
                del n.runs[tid]
                self._run_over(tid, run)
                res = Result("ok", 0, name, run.attempt, run.start, self.now)
                n.engine.set_time(self.now, self.now)
                n.engine.finished(tid, run.attempt, res)

    # ------------------------------------------------------------ what tests look at

    def record(self, tid: str):
        """The record of `tid` that the holders converge on (`taskspec.newer` over every up node's copy)."""
        best = None
        for name in self.up():
            rec = self.nodes[name].engine.records.get(tid)
            if rec is not None:
                best = rec if best is None else newer(best, rec)
        return best

    def _note_finished(self, tid: str, eng: TaskEngine) -> None:
        rec = eng.records.get(tid)
        if rec is not None and rec.state in TERMINAL and tid in self.accepted:
            self.done_at.setdefault(tid, self.now)

    def finished(self) -> bool:
        """Every submission is answered and every accepted task has a terminal record
        somewhere (checked on every Done and Replicate received, and for all open
        tasks every POLL_MS)."""
        if self.pending_submits:
            return False
        if len(self.done_at) == len(self.accepted):
            return True
        if self.now < self.next_poll:
            return False
        self.next_poll = self.now + POLL_MS
        for tid in self.accepted:
            if tid not in self.done_at:
                for name in self.up():
                    self._note_finished(tid, self.nodes[name].engine)
        return len(self.done_at) == len(self.accepted)

    def results_agree(self) -> list[str]:
        """Task ids whose holders disagree on the recorded result."""
        bad = []
        for tid in self.accepted:
            seen = {(r.result.attempt, r.result.node) for name in self.up()
                    if (r := self.nodes[name].engine.records.get(tid)) is not None and r.result is not None}
            if len(seen) > 1:
                bad.append(tid)
        return bad

    def unsettled(self, tids: Iterable[str], observer: str) -> list[str]:
        """Why some of `tids` are not settled: each must have a terminal record with
        a result on every up home member (in `observer`'s view), all the same result."""
        out = []
        eng = self.nodes[observer].engine
        for tid in tids:
            spec = self.submitted[tid][0]
            home = [h for h in eng.home(spec) if self.nodes[h].engine is not None]
            recs = {h: self.nodes[h].engine.records.get(tid) for h in home}
            missing = [h for h, r in recs.items() if r is None or r.result is None or r.state not in TERMINAL]
            results = {(r.result.attempt, r.result.node, r.result.outcome) for r in recs.values() if r is not None and r.result}
            if not home or missing or len(results) != 1:
                out.append(f"{tid}: home {home}, without a final record {missing}, results {sorted(results)}")
        return out

    def home_crashed_together(self, tid: str, window_ms: int) -> bool:
        """Every home member the task had when submitted crashed within one window of `window_ms`."""
        home = self.home_at_submit.get(tid, [])
        starts = [t for n in home for t in self.crashes.get(n, [])]
        return bool(home) and any(all(any(s <= t <= s + window_ms for t in self.crashes.get(n, [])) for n in home)
                                  for s in starts)

    def runs_of(self) -> dict[str, list[Run]]:
        """Task id -> its runs, in start order."""
        out: dict[str, list[Run]] = {}
        for tid, run in self.runs:
            out.setdefault(tid, []).append(run)
        return out


def task_ids(msg) -> list[str]:
    """The task ids a message is about (for tracing)."""
    for name in ("task_id", "spec", "record"):
        v = getattr(msg, name, None)
        if isinstance(v, str):
            return [v]
        if v is not None:
            return [v.id] if name == "spec" else [v.spec.id]
    items = getattr(msg, "items", None) or getattr(msg, "tasks", None) or ()
    return [x[0] if isinstance(x[0], str) else x[0].id for x in items]
