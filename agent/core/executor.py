"""The executor role: this node's queue, its runs, and moving queued work.

Queued tasks wait in priority order (then arrival) until a slot and the
kind's concurrency allow a start. Every change to the queue is journaled
("q:<id>"), and every finished run's result ("r:<id>") until its coordinator
acknowledges it, so a restart loses neither. A task is removed from the queue
*before* it is handed to another node, so it can never run in two places at
once because of a move; the coordinator learns where it went from the new
holder's Update, or from our CheckReply ("moved").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import cbor2

from agent.core.placement import Overload, PeerLoad, PerfBook, cap_match, free_score, migration_targets, steal_victims
from agent.core.taskctx import Ctx, Kill, Start
from agent.core.taskspec import (
    MAX_BATCH, Assign, Bid, CallForBids, Check, CheckReply, Done, DoneAck, Handoff, Result, Revoke, StealRequest,
    TaskSpec, Update, result_from_wire, spec_from_wire,
)
from agent.messages import BadMessage

MAX_UNACKED = 1024  #: finished results kept for resending until acknowledged
MAX_MOVED = 1024  #: recent hand-offs remembered to answer a coordinator's Check
HANDOFF_BUDGET = 3300  #: bytes of task specs in one Handoff (the datagram holds 4000 sealed)
HOLD_CHECKS = 10  #: check periods a restored task waits for its coordinator's word at most
STEAL_BACKOFF_MAX = 8  #: an unanswered or empty steal stretches the interval up to this factor


@dataclass
class Unacked:
    """A finished run's result, resent to the task's home until its coordinator acknowledges it."""

    result: Result
    spec: TaskSpec
    coord: str
    due: int


@dataclass
class Local:
    spec: TaskSpec
    attempt: int
    coord: str  #: who to tell about it: the node that assigned or last checked it
    via: str
    moved_ms: int | None  #: when it last arrived from another executor (None: placed here)
    seq: int
    hold_until: int | None = None  #: restored after a restart: wait for the coordinator's word until then


class Executor:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.queue: dict[str, Local] = {}
        self.running: dict[str, Local] = {}
        self.unacked: dict[str, Unacked] = {}
        self.moved: OrderedDict[str, tuple[int, str]] = OrderedDict()
        self.perf = PerfBook()
        self.overload = Overload(ctx.s.overload, ctx.s.overload_samples)
        self.seq = 0
        self.next_steal = 0
        self.steal_backoff = 1
        self.next_balance = 0
        self.announce: list[str] = []  #: restored tasks to report until their coordinator answers
        self.next_announce = 0
        self.paused = False  #: shutting down: start nothing more
        self.handlers = {
            Assign: self.on_assign, Revoke: self.on_revoke, DoneAck: self.on_done_ack, Check: self.on_check,
            CallForBids: self.on_call_for_bids, StealRequest: self.on_steal_request, Handoff: self.on_handoff,
        }

    # ------------------------------------------------------------ queue

    def queued_count(self) -> int:
        return len(self.queue)

    def free_slots(self) -> int:
        return max(0, self.ctx.s.slots - len(self.running))

    def _enqueue(self, spec: TaskSpec, attempt: int, coord: str, via: str, moved_ms: int | None) -> None:
        self.seq += 1
        self.queue[spec.id] = Local(spec, attempt, coord, via, moved_ms, self.seq)
        self.ctx.journal.append((f"q:{spec.id}", {"spec": spec.to_wire(), "at": attempt, "coord": coord, "via": via}))

    def _dequeue(self, tid: str) -> Local:
        self.ctx.journal.append((f"q:{tid}", None))
        return self.queue.pop(tid)

    def _refuse(self, spec: TaskSpec, attempt: int, coord: str, why: str) -> None:
        """Tell the coordinator at once that we cannot take it, as a failed attempt it will retry."""
        now = self.ctx.wall
        res = Result("error", 0, self.ctx.me, attempt, now, now, reason=why[:120])
        self.ctx.send(coord, Done(spec.id, res))

    def _acceptable(self, spec: TaskSpec) -> str:
        if spec.kind not in self.ctx.kinds:
            return f"{self.ctx.me} has no handler for kind {spec.kind!r}"
        if len(self.queue) >= self.ctx.s.max_queue:
            return f"{self.ctx.me} queue full ({len(self.queue)} tasks)"
        return ""

    def _schedule(self) -> None:
        """Start what the free slots and each kind's concurrency allow, best first."""
        if not self.queue or not self.free_slots() or self.paused:
            return
        per_kind: dict[str, int] = {}
        for t in self.running.values():
            per_kind[t.spec.kind] = per_kind.get(t.spec.kind, 0) + 1
        for t in sorted(self.queue.values(), key=lambda t: (-t.spec.priority, t.seq)):
            if not self.free_slots():
                break
            kind = t.spec.kind
            if t.spec.id in self.running or per_kind.get(kind, 0) >= self.ctx.kinds.get(kind, 1):
                continue
            if t.hold_until is not None and self.ctx.now < t.hold_until:
                continue
            del self.queue[t.spec.id]  # its journal entry stays until the run ends: a restart re-runs it
            self.running[t.spec.id] = t
            per_kind[kind] = per_kind.get(kind, 0) + 1
            self.ctx.actions.append(Start(t.spec, t.attempt, t.spec.timeout_s))
            self.ctx.send(t.coord, Update(t.spec.id, t.attempt, "running"))

    # ------------------------------------------------------------ from coordinators

    def on_assign(self, frm: str, msg: Assign) -> None:
        if msg.attempt < 1:  # attempts count from 1: nothing real sends 0
            self.ctx.counters.inc("task_bad_assign")
            return
        tid = msg.spec.id
        have = self.running.get(tid) or self.queue.get(tid)
        if have is not None and have.attempt >= msg.attempt:
            have.coord = frm
            self.ctx.send(frm, Update(tid, have.attempt, "running" if tid in self.running else "queued"))
            return
        why = self._acceptable(msg.spec)
        if why:
            self._refuse(msg.spec, msg.attempt, frm, why)
            return
        if tid in self.running:
            old = self.running[tid]
            self.ctx.actions.append(Kill(tid, old.attempt, f"superseded by attempt {msg.attempt}"))
        self._enqueue(msg.spec, msg.attempt, frm, msg.via, None)
        self.ctx.send(frm, Update(tid, msg.attempt, "queued"))
        self._schedule()

    def on_revoke(self, frm: str, msg: Revoke) -> None:
        q = self.queue.get(msg.task_id)
        if q is not None and q.attempt <= msg.attempt:
            self._dequeue(msg.task_id)
        r = self.running.get(msg.task_id)
        if r is not None and r.attempt <= msg.attempt:
            self.ctx.actions.append(Kill(msg.task_id, r.attempt, msg.reason or "revoked"))

    def on_done_ack(self, frm: str, msg: DoneAck) -> None:
        held = self.unacked.get(msg.task_id)
        if held is not None and held.result.attempt == msg.attempt:
            del self.unacked[msg.task_id]
            self.ctx.journal.append((f"r:{msg.task_id}", None))

    def on_check(self, frm: str, msg: Check) -> None:
        items = []
        for tid, attempt in msg.items:
            local = self.running.get(tid) or self.queue.get(tid)
            if local is not None and local.attempt == attempt:
                local.coord = frm
                local.hold_until = None  # the coordinator still counts on us for this attempt
                items.append((tid, attempt, "running" if tid in self.running else "queued", ""))
            elif tid in self.unacked and self.unacked[tid].result.attempt == attempt:
                items.append((tid, attempt, "finished", ""))
            elif self.moved.get(tid, (None, ""))[0] == attempt:
                items.append((tid, attempt, "moved", self.moved[tid][1]))
            else:
                items.append((tid, attempt, "unknown", ""))
        self.ctx.send(frm, CheckReply(tuple(items)))

    def on_call_for_bids(self, frm: str, msg: CallForBids) -> None:
        s = self.ctx.s
        if msg.kind not in self.ctx.kinds or len(self.queue) >= s.max_queue:
            self.ctx.send(frm, Bid(msg.task_id, msg.round, 0, 1000, 0, 0))  # a decline: the auction need not wait for us
            return
        # queued work counts as load: within a burst the CPU figure has not moved yet
        backlog = len(self.queue) / max(1, s.slots)
        load = min(1.0, (self.ctx.load if self.ctx.load is not None else 0.5) + backlog)
        free = free_score(self.free_slots(), s.slots, self.ctx.mem_pct) / (1 + backlog)
        self.ctx.send(frm, Bid(msg.task_id, msg.round, _pm(cap_match(msg.caps, self.ctx.caps)), _pm(load),
                               _pm(self.perf.score(msg.kind)), _pm(free)))

    # ------------------------------------------------------------ runs

    def finished(self, tid: str, attempt: int, result: Result) -> None:
        local = self.running.get(tid)
        if local is None or local.attempt != attempt:
            self.ctx.counters.inc("task_unknown_finish")
            return
        del self.running[tid]
        self.steal_backoff, self.next_steal = 1, self.ctx.now  # idle afresh: ask at once, not after a long backoff
        self.perf.record(local.spec.kind, result.outcome == "ok", max(0, result.finished_ms - result.started_ms))
        self.ctx.journal.append((f"q:{tid}", None))
        if tid not in self.queue:  # a newer attempt may already wait here
            self.ctx.journal.append((f"r:{tid}", {"res": result.to_wire(), "coord": local.coord, "spec": local.spec.to_wire()}))
        self._remember_result(local.spec, local.coord, result)
        self._schedule()

    def _remember_result(self, spec: TaskSpec, coord: str, result: Result) -> None:
        if len(self.unacked) >= MAX_UNACKED:
            oldest = next(iter(self.unacked))
            del self.unacked[oldest]
            self.ctx.journal.append((f"r:{oldest}", None))
            self.ctx.counters.inc("task_result_unacked_dropped")
        held = self.unacked[spec.id] = Unacked(result, spec, coord, self.ctx.now + self.ctx.s.resend_ms)
        self._send_done(held)

    def _send_done(self, held: Unacked) -> None:
        """To the coordinator we know and every home member in our view: whoever coordinates acknowledges."""
        targets = set(self.ctx.home(held.spec))
        if held.coord:
            targets.add(held.coord)
        for node in sorted(targets):
            self.ctx.send(node, Done(held.spec.id, held.result, held.spec))

    # ------------------------------------------------------------ moving queued work

    def on_steal_request(self, frm: str, msg: StealRequest) -> None:
        thief = self.ctx.view.get(frm)
        give: list[Local] = []
        if thief is not None:
            spare = len(self.queue) - self.free_slots()
            fits = [t for t in self._movable() if t.spec.kind in msg.kinds and self._fits(t.spec, thief.caps)]
            give = fits[: max(0, min(msg.want, spare))]
        self._hand_off(frm, "stolen", give)

    def _movable(self) -> list[Local]:
        """Queued tasks allowed to move, the ones that would wait longest first."""
        now, stay = self.ctx.now, self.ctx.s.min_stay_ms
        ok = [t for t in self.queue.values() if (t.moved_ms is None or now - t.moved_ms >= stay)
              and (t.hold_until is None or now >= t.hold_until)]  # a held one may already run elsewhere
        return sorted(ok, key=lambda t: (t.spec.priority, -t.seq))

    def _fits(self, spec: TaskSpec, caps: tuple[str, ...]) -> bool:
        return cap_match(spec.caps, caps) >= self.ctx.s.match_threshold

    def _hand_off(self, to: str, reason: str, tasks: list[Local]) -> None:
        packed, size = [], 0
        for t in tasks[:MAX_BATCH]:
            n = len(cbor2.dumps(t.spec.to_wire())) + 4
            if size + n > HANDOFF_BUDGET:
                break
            packed.append(t)
            size += n
        for t in packed:
            self._dequeue(t.spec.id)
            self.moved[t.spec.id] = (t.attempt, to)
            while len(self.moved) > MAX_MOVED:
                self.moved.popitem(last=False)
        self.ctx.send(to, Handoff(reason, tuple((t.spec, t.attempt) for t in packed)))

    def on_handoff(self, frm: str, msg: Handoff) -> None:
        if msg.tasks:
            self.steal_backoff = 1
            self.next_steal = self.ctx.now
        for spec, attempt in msg.tasks:
            home = self.ctx.home(spec)
            coord = home[0] if home else frm
            why = self._acceptable(spec)
            if why:
                self._refuse(spec, attempt, coord, why)
                continue
            self._enqueue(spec, attempt, coord, f"{msg.reason}:{frm}", self.ctx.now)
            self.ctx.send(coord, Update(spec.id, attempt, "queued", f"{msg.reason}:{frm}"))
        self._schedule()

    def load_sample(self, load: float | None) -> None:
        self.overload.update(load)

    def _steal(self) -> None:
        s = self.ctx.s
        load = self.ctx.load
        if self.queue or not self.free_slots() or (load is not None and load >= s.idle) or self.ctx.now < self.next_steal:
            return
        peers = [PeerLoad(n, i.load or 0.0, i.queued) for n, i in self.ctx.view.items()
                 if n != self.ctx.me and i.kinds & self.ctx.kinds.keys()]
        victims = steal_victims(peers, k=2)
        self.next_steal = self.ctx.now + s.steal_interval_ms * self.steal_backoff
        self.steal_backoff = min(STEAL_BACKOFF_MAX, self.steal_backoff * 2)
        kinds = tuple(sorted(self.ctx.kinds))
        for v in victims:
            self.ctx.send(v, StealRequest(min(MAX_BATCH, self.free_slots()), kinds))

    def _balance(self) -> None:
        s = self.ctx.s
        if not self.overload.overloaded or not self.queue or self.ctx.now < self.next_balance:
            return
        self.next_balance = self.ctx.now + max(1000, s.steal_interval_ms)
        peers = [PeerLoad(n, i.load if i.load is not None else 1.0, i.queued) for n, i in self.ctx.view.items() if n != self.ctx.me]
        targets = migration_targets(peers, s.idle)
        spare = len(self.queue) - self.free_slots()
        if not targets or spare <= 0:
            return
        share = max(1, spare // len(targets))
        for node in targets:
            info = self.ctx.view[node]
            fits = [t for t in self._movable() if t.spec.kind in info.kinds and self._fits(t.spec, info.caps)][:share]
            if fits:
                self._hand_off(node, "migrated", fits)

    # ------------------------------------------------------------ time, restart, views

    def tick(self) -> None:
        now = self.ctx.now
        if self.announce and now >= self.next_announce:
            self._announce()
        for held in self.unacked.values():
            if now >= held.due:
                held.due = now + self.ctx.s.resend_ms
                self._send_done(held)
        if self.ctx.s.steal:
            self._steal()
        self._balance()
        self._schedule()

    def _announce(self) -> None:
        """Tell the coordinators about restored tasks, again every resend_ms while
        they are held: their answer (a Check, or a Revoke) may be lost."""
        self.next_announce = self.ctx.now + self.ctx.s.resend_ms
        held = []
        for tid in self.announce:
            local = self.queue.get(tid)
            if local is not None and local.hold_until is not None and self.ctx.now < local.hold_until:
                home = self.ctx.home(local.spec)
                for node in sorted({local.coord, *home[:1]} - {""}):
                    self.ctx.send(node, Update(tid, local.attempt, "queued", "restart"))
                held.append(tid)
        self.announce = held

    def restore(self, journal) -> None:
        """Reload the queue and unacknowledged results. A run that was going on
        when the agent stopped is queued again (at least once). Restored tasks
        wait for their coordinator's Check (or a Revoke, if it placed them
        elsewhere meanwhile) before they start, so a restart does not run a task
        that already runs somewhere else; after HOLD_CHECKS check periods with
        no word at all the coordinator must have lost the record, and they run."""
        for key, value in journal.items():
            try:
                kind, _, tid = key.partition(":")
                if kind == "q":
                    spec = spec_from_wire(value["spec"])
                    self.seq += 1
                    self.queue[tid] = Local(spec, int(value["at"]), str(value["coord"]), "restart", None, self.seq,
                                            self.ctx.now + HOLD_CHECKS * self.ctx.s.check_ms)
                    self.announce.append(tid)
                elif kind == "r":  # "d:" entries are the coordinator's
                    res = result_from_wire(value["res"])
                    self.unacked[tid] = Unacked(res, spec_from_wire(value["spec"]), str(value["coord"]), self.ctx.now)
            except (BadMessage, KeyError, TypeError, ValueError):
                self.ctx.counters.inc("task_journal_bad_entry")

    def describe(self) -> list[dict]:
        out = []
        for state, table in (("running", self.running), ("queued", self.queue)):
            for t in table.values():
                out.append({"id": t.spec.id, "kind": t.spec.kind, "state": state, "attempt": t.attempt,
                            "priority": t.spec.priority, "via": t.via})
        return out


def _pm(x: float) -> int:
    """A 0..1 figure as an integer per mille (the wire carries no floats)."""
    return max(0, min(1000, round(x * 1000)))

