"""The coordinator role: keep each task's record, place it, and see it finish.

A node coordinates a task while it is the first of the task's home members
in its own view and holds the record (see `agent.core.tasks`). Records that
need no attention (finished, and every home member has this version) are
"settled" and cost nothing per tick; everything else is swept every
`resend_ms` and acted on at once when a message or a view change concerns it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from agent.core.placement import Candidate, best_bid, cap_match, choose_capability
from agent.core.taskctx import Ctx
from agent.core.taskspec import (
    MAX_BATCH, MAX_REASON, TERMINAL, Assign, Bid, CallForBids, Cancel, CancelReply, Check, CheckReply, Done, DoneAck, Event,
    ListReply, ListReq, Query, QueryReply, Record, ReplicaAck, Replicate, Result, Revoke, Submit, SubmitReply,
    Update, newer, record_from_wire,
)
from agent.messages import BadMessage

MAX_BIDDERS = 16  #: members asked for a bid in one auction round
MAX_LOST = 20  #: lost assignments forgiven per task (each still takes an attempt number)
RECENT_MS = 3000  #: own assignments count as queued at their executor this long (gossip lags)
LIST_REPLIES = 8  #: ListReply messages one ListReq is answered with at most


@dataclass
class Auction:
    round: int
    deadline: int
    asked: frozenset[str]
    bids: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)


class Coordinator:
    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.records: dict[str, Record] = {}
        self.acks: dict[str, dict[str, int]] = {}  #: task -> member -> version it acknowledged
        self.active: dict[str, None] = {}  #: records that are not settled (a dict: ordered, so runs replay)
        self.auctions: dict[str, Auction] = {}
        self.assigned_at: dict[str, int] = {}  #: task -> when its current attempt was handed out or confirmed
        self.recent: dict[str, list[int]] = {}  #: executor -> times we assigned to it lately
        self.awaiting: dict[str, tuple[str, int]] = {}  #: task -> (origin, rid) answered at the first replica ack
        self.confirmed: dict[str, int] = {}  #: task -> latest attempt its executor confirmed having
        self.lost: dict[str, int] = {}  #: task -> attempts that never reached an executor (not counted)
        self.quiet_until = 0  #: no placing or retrying of records from elsewhere before this
        self.home_of: dict[str, tuple[str, ...]] = {}  #: task -> its home at the last view change
        self.next_sweep = 0
        self.next_check = 0
        self.handlers = {
            Submit: self.on_submit, Replicate: self.on_replicate, ReplicaAck: self.on_replica_ack,
            Update: self.on_update, Done: self.on_done, CheckReply: self.on_check_reply, Bid: self.on_bid,
            Query: self.on_query, Cancel: self.on_cancel, ListReq: self.on_list,
        }

    # ------------------------------------------------------------ helpers

    def is_coordinator(self, rec: Record) -> bool:
        home = self.ctx.home(rec.spec)
        return bool(home) and home[0] == self.ctx.me

    def _store(self, rec: Record, push: bool = True) -> None:
        if rec.spec.id not in self.home_of:
            self.home_of[rec.spec.id] = tuple(self.ctx.home(rec.spec))
        self.records[rec.spec.id] = rec
        self.active[rec.spec.id] = None
        if rec.state in TERMINAL:  # results outlive a restart of the whole mesh
            self.ctx.journal.append((f"d:{rec.spec.id}", rec.to_wire()))
        if push:
            self._push(rec)

    def _event(self, rec: Record, what: str, node: str = "", detail: str = "", **changes) -> Record:
        return self._store_event(rec, Event(self.ctx.wall, what, node or self.ctx.me, detail[:48]), **changes)

    def _store_event(self, rec: Record, ev: Event, **changes) -> Record:
        new = rec.with_event(ev, **changes)
        self._store(new)
        return new

    def _push(self, rec: Record) -> None:
        """Send the record to home members that lack this version: the
        coordinator to all of them, a replica to the coordinator, and a holder
        that is no home member any more to all of them (handoff, after which it
        forgets the record)."""
        home = self.ctx.home(rec.spec)
        if not home:
            return
        me = self.ctx.me
        targets = home[1:] if home[0] == me else home[:1] if me in home else home
        acked = self.acks.setdefault(rec.spec.id, {})
        for node in targets:
            if acked.get(node, -1) < rec.version:
                self.ctx.send(node, Replicate(rec))

    def _settled(self, rec: Record) -> bool:
        if rec.state not in TERMINAL:
            return False
        home = self.ctx.home(rec.spec)
        acked = self.acks.get(rec.spec.id, {})
        return all(acked.get(n, -1) >= rec.version for n in home if n != self.ctx.me)

    def _final(self, rec: Record, result: Result, what: str, detail: str = "") -> Record:
        state = "done" if result.outcome == "ok" else "cancelled" if result.outcome == "cancelled" else "failed"
        self.auctions.pop(rec.spec.id, None)
        return self._event(rec, what, result.node, detail or result.reason, state=state, result=result)

    def _give_up(self, rec: Record, reason: str) -> Record:
        res = Result("error", 0, self.ctx.me, rec.attempt, self.ctx.wall, self.ctx.wall, reason=reason[:120])
        return self._final(rec, res, "failed", reason)

    # ------------------------------------------------------------ placement

    def _drive(self, rec: Record, fresh: bool = False) -> None:
        """Do what a record in its state needs next, if we coordinate it. Right
        after a view change we wait (`quiet_until`) before placing or retrying
        records we did not create: the newer copies the other home members hold
        reach us first, so two coordinators do not place the same attempt."""
        if rec.state in TERMINAL or not self.is_coordinator(rec):
            return
        if not fresh and self.ctx.now < self.quiet_until:
            return
        if rec.state == "pending" and rec.spec.id not in self.auctions:
            self._place(rec, "retried" if rec.attempt else "placed")
        elif rec.state in ("queued", "running") and rec.executor not in self.ctx.view:
            self._retry(rec, f"{rec.executor} is gone")

    def _retry(self, rec: Record, why: str) -> None:
        tid = rec.spec.id
        if rec.executor and rec.executor in self.ctx.view:
            self.ctx.send(rec.executor, Revoke(tid, rec.attempt, why[:120]))
        if rec.attempt and self.confirmed.get(tid) != rec.attempt and self.lost.get(tid, 0) < MAX_LOST:
            self.lost[tid] = self.lost.get(tid, 0) + 1  # it never reached its executor: no run to count
        if self._used(rec) >= rec.spec.max_attempts:
            self._give_up(rec, f"{self._used(rec)} attempts used; last: {why}")
            return
        rec = self._event(rec, "retried", detail=why, state="pending", executor="")
        self._place(rec, "retried")

    def _used(self, rec: Record) -> int:
        """Attempts that count against max_attempts: those that reached an executor."""
        return rec.attempt - self.lost.get(rec.spec.id, 0)

    def _place(self, rec: Record, via: str) -> None:
        if self._used(rec) >= rec.spec.max_attempts:
            self._give_up(rec, f"{self._used(rec)} attempts used")
            return
        strategy = rec.spec.strategy or self.ctx.s.strategy
        if strategy == "auction":
            self._call_for_bids(rec, 1)
            return
        node = self._choose(rec, strategy)
        if node is None:
            self._waiting(rec)
            return
        self._assign(rec, node, via, "")

    def _choose(self, rec: Record, strategy: str) -> str | None:
        spec = rec.spec
        if strategy == "hash":
            home = self.ctx.home(spec)
            return home[0] if home else None
        now = self.ctx.now
        cands = []
        for node in sorted(self.ctx.view):
            if not self.ctx.capable(spec, node):
                continue
            info = self.ctx.view[node]
            recent = [t for t in self.recent.get(node, ()) if now - t < RECENT_MS]
            self.recent[node] = recent
            load = info.load if info.load is not None else 0.5
            cands.append(Candidate(node, cap_match(spec.caps, info.caps), load, info.queued + len(recent), 1))
        return choose_capability(cands, self.ctx.s.match_threshold, self.ctx.rng)

    def _waiting(self, rec: Record) -> None:
        """No member can take it now; keep it pending and try again each sweep."""
        if not rec.history or rec.history[-1].detail != "waiting for a capable member":
            self._event(rec, "placed", detail="waiting for a capable member")

    def _assign(self, rec: Record, node: str, via: str, detail: str) -> None:
        rec = self._event(rec, via, node, detail, state="queued", executor=node, attempt=rec.attempt + 1)
        self.assigned_at[rec.spec.id] = self.ctx.now
        self.recent.setdefault(node, []).append(self.ctx.now)
        self.ctx.send(node, Assign(rec.spec, rec.attempt, via))

    # ------------------------------------------------------------ auctions

    def _call_for_bids(self, rec: Record, round_: int) -> None:
        spec = rec.spec
        capable = sorted(n for n in self.ctx.view if self.ctx.capable(spec, n))
        if not capable:
            self._waiting(rec)
            return
        asked = capable if len(capable) <= MAX_BIDDERS else self.ctx.rng.sample(capable, MAX_BIDDERS)
        self.auctions[spec.id] = Auction(round_, self.ctx.now + self.ctx.s.bid_timeout_ms, frozenset(asked))
        for node in asked:
            self.ctx.send(node, CallForBids(spec.id, round_, spec.kind, spec.caps))

    def on_bid(self, frm: str, msg: Bid) -> None:
        auction = self.auctions.get(msg.task_id)
        if auction is None or msg.round != auction.round or frm not in auction.asked:
            self.ctx.counters.inc("task_stale_bid")
            return
        auction.bids[frm] = (msg.match / 1000, msg.load / 1000, msg.perf / 1000, msg.free / 1000)
        if len(auction.bids) == len(auction.asked):
            self._close_auction(msg.task_id)

    def _close_auction(self, task_id: str) -> None:
        auction = self.auctions.pop(task_id)
        rec = self.records.get(task_id)
        if rec is None or rec.state != "pending" or not self.is_coordinator(rec):
            return
        winner = best_bid(auction.bids, self.ctx.s.weights, self.ctx.s.match_threshold)
        if winner is not None:
            detail = f"{len(auction.bids)}/{len(auction.asked)} bids, round {auction.round}"
            self._assign(rec, winner, "bid" if rec.attempt == 0 else "retried", detail)
        elif auction.round < self.ctx.s.bid_rounds:
            self._call_for_bids(rec, auction.round + 1)
        else:
            self._give_up(rec, f"no bid in {auction.round} rounds ({len(auction.bids)} of {len(auction.asked)} answered, none capable)")

    # ------------------------------------------------------------ messages from origins and replicas

    def on_submit(self, frm: str, msg: Submit) -> None:
        spec = msg.spec
        if spec.id in self.records:
            self.ctx.send(frm, SubmitReply(msg.rid, spec.id, True, "exists"))
            return
        why = self._unplaceable(spec)
        if why:
            self.ctx.send(frm, SubmitReply(msg.rid, spec.id, False, why[:MAX_REASON]))
            return
        if len(self.active) >= self.ctx.s.max_queue:
            self.ctx.send(frm, SubmitReply(msg.rid, spec.id, False, f"{len(self.active)} unfinished tasks held here (tasks.max_queue)"))
            return
        rec = Record(spec, "pending", 0, "", 1, (Event(self.ctx.wall, "submitted", spec.origin or frm, ""),))
        self._store(rec, push=False)
        home = self.ctx.home(spec)
        if len([n for n in home if n != self.ctx.me]) == 0:
            self.ctx.send(frm, SubmitReply(msg.rid, spec.id, True, ""))
        else:  # accepted once a second home member keeps it: one crash then loses nothing
            self.awaiting[spec.id] = (frm, msg.rid)
            for node in home:
                if node != self.ctx.me:
                    self.ctx.send(node, Replicate(rec))
        self._drive(rec, fresh=True)

    def _unplaceable(self, spec) -> str:
        """Why no alive member can run `spec`, or "" when one can."""
        offer = [n for n, i in self.ctx.view.items() if spec.kind in i.kinds]
        if not offer:
            return f"no alive member has a handler for kind {spec.kind!r}"
        best = max(cap_match(spec.caps, self.ctx.view[n].caps) for n in offer)
        if best < self.ctx.s.match_threshold:
            return (f"no alive member with kind {spec.kind!r} offers capabilities {', '.join(spec.caps)} "
                    f"(best match {best:.2f} < threshold {self.ctx.s.match_threshold:g})")
        return ""

    def on_replicate(self, frm: str, msg: Replicate) -> None:
        incoming = msg.record
        tid = incoming.spec.id
        mine = self.records.get(tid)
        keep = incoming if mine is None else newer(mine, incoming)
        if mine is not None and keep.version < max(mine.version, incoming.version):
            # the merge kept the lower version (a lower attempt's result): number it above both,
            # so every member that acknowledged the higher one hears it
            keep = replace(keep, version=max(mine.version, incoming.version) + 1)
        acked = self.acks.setdefault(tid, {})
        acked[frm] = max(acked.get(frm, -1), incoming.version)
        if keep != mine:
            self._store(keep, push=False)
            self._drive(keep)
        self.ctx.send(frm, ReplicaAck(tid, incoming.version))
        if keep != incoming:  # we know better: let the sender converge
            self.ctx.send(frm, Replicate(keep))

    def on_replica_ack(self, frm: str, msg: ReplicaAck) -> None:
        acked = self.acks.setdefault(msg.task_id, {})
        acked[frm] = max(acked.get(frm, -1), msg.version)
        waiting = self.awaiting.pop(msg.task_id, None)
        if waiting is not None:
            self.ctx.send(waiting[0], SubmitReply(waiting[1], msg.task_id, True, ""))

    def on_query(self, frm: str, msg: Query) -> None:
        self.ctx.send(frm, QueryReply(msg.rid, self.records.get(msg.task_id)))

    def on_list(self, frm: str, msg: ListReq) -> None:
        recs = [r for r in self.records.values()
                if (not msg.state or r.state == msg.state) and (not msg.node or r.executor == msg.node)]
        recs.sort(key=lambda r: r.spec.submitted_ms, reverse=True)
        items = [(r.spec.id, r.spec.kind, r.state, r.executor, r.attempt, r.spec.submitted_ms) for r in recs[: MAX_BATCH * LIST_REPLIES]]
        starts = range(0, max(1, len(items)), MAX_BATCH)
        for i in starts:
            self.ctx.send(frm, ListReply(msg.rid, tuple(items[i : i + MAX_BATCH]), i == starts[-1]))

    def on_cancel(self, frm: str, msg: Cancel) -> None:
        rec = self.records.get(msg.task_id)
        if rec is None:
            self.ctx.send(frm, CancelReply(msg.rid, False, "no such task here"))
            return
        if rec.state in TERMINAL:
            self.ctx.send(frm, CancelReply(msg.rid, False, f"already {rec.state}"))
            return
        if rec.executor:
            self.ctx.send(rec.executor, Revoke(rec.spec.id, rec.attempt, "cancelled"))
        # attempt 0 sorts before every run's result, so the cancel wins every merge
        res = Result("cancelled", 0, self.ctx.me, 0, self.ctx.wall, self.ctx.wall, reason=f"cancelled via {frm}")
        self._final(rec, res, "cancelled", f"by {frm}")
        self.ctx.send(frm, CancelReply(msg.rid, True, ""))

    # ------------------------------------------------------------ messages from executors

    def on_update(self, frm: str, msg: Update) -> None:
        rec = self.records.get(msg.task_id)
        if rec is None:
            return
        if rec.state in TERMINAL or msg.attempt != rec.attempt:
            self.ctx.send(frm, Revoke(msg.task_id, msg.attempt, f"task is {rec.state}, attempt {rec.attempt}"))
            return
        self.assigned_at[msg.task_id] = self.ctx.now
        self.confirmed[msg.task_id] = msg.attempt
        if msg.via == "restart" and frm == rec.executor and self.is_coordinator(rec):
            self.ctx.send(frm, Check(((msg.task_id, msg.attempt),)))  # our word: it may run it
        if frm != rec.executor:
            what, _, giver = msg.via.partition(":")
            rec = self._event(rec, what if what in ("stolen", "migrated") else "queued", frm, f"from {giver or rec.executor}", executor=frm)
        if msg.state == "running" and rec.state != "running":
            self._event(rec, "started", frm, state="running")

    def on_done(self, frm: str, msg: Done) -> None:
        res = msg.result
        rec = self.records.get(msg.task_id)
        if rec is None and msg.spec is not None:
            rec = self._rebuild(msg.spec, res)
        if rec is None or not self.is_coordinator(rec):
            return  # the coordinator acknowledges; the executor resends until one does
        self.ctx.send(frm, DoneAck(msg.task_id, res.attempt))
        if rec.result is not None:
            if (rec.result.attempt, rec.result.node) != (res.attempt, res.node):
                self._event(rec, "duplicate", res.node, f"attempt {res.attempt} {res.outcome}, kept attempt {rec.result.attempt}")
            return
        if rec.state in TERMINAL:
            return
        current = res.attempt == rec.attempt
        if current and res.node != rec.executor:
            # it moved and the news was lost (the thief's Update went to a coordinator that died)
            rec = self._event(rec, "queued", res.node, f"moved from {rec.executor or 'nowhere'}", executor=res.node)
        if current and rec.state == "queued" and res.started_ms:  # its "running" Update is late or lost
            rec = self._store_event(rec, Event(res.started_ms, "started", res.node, ""), state="running")
        if res.outcome == "ok" or (current and res.outcome == "failed"):
            if not current and rec.executor:
                self.ctx.send(rec.executor, Revoke(rec.spec.id, rec.attempt, f"attempt {res.attempt} finished first"))
            self._final(rec, res, "done" if res.outcome == "ok" else "failed", f"exit {res.exit_code}")
        elif current:
            self._retry(rec, f"{res.outcome} on {res.node}: {res.reason}"[:120])

    def _rebuild(self, spec, res: Result) -> Record | None:
        """A result for a task no home member remembers (all of them restarted):
        start its record again from what the executor still has."""
        home = self.ctx.home(spec)
        if not home or home[0] != self.ctx.me:
            return None
        rec = Record(spec, "queued", res.attempt, res.node, 1, (Event(self.ctx.wall, "queued", res.node, "record rebuilt from its result"),))
        self._store(rec)
        self.ctx.counters.inc("task_record_rebuilt")
        return rec

    def on_check_reply(self, frm: str, msg: CheckReply) -> None:
        for tid, attempt, state, moved_to in msg.items:
            rec = self.records.get(tid)
            if rec is None or rec.state in TERMINAL or rec.attempt != attempt or rec.executor != frm:
                continue
            if not self.is_coordinator(rec):
                continue  # we asked before the view changed; the coordinator now decides
            if state in ("queued", "running", "finished"):
                self.assigned_at[tid] = self.ctx.now
                self.confirmed[tid] = attempt
            elif state == "moved" and moved_to:
                self._event(rec, "queued", moved_to, f"moved from {frm}", executor=moved_to)
                self.assigned_at[tid] = self.ctx.now
            elif self.ctx.now - self.assigned_at.get(tid, 0) > self.ctx.s.check_ms:
                self._retry(rec, f"{frm} does not have it")

    # ------------------------------------------------------------ time and views

    def members_restarted(self, nodes: set[str]) -> None:
        """A restarted member lost the records it kept: what it acknowledged no longer counts."""
        for acked in self.acks.values():
            for n in nodes:
                acked.pop(n, None)

    def members_changed(self, gone: set[str]) -> None:
        """Homes may have moved: every record needs a look (rare: joins and deaths).
        A member that left or died forgot what it acknowledged if it comes back."""
        self.members_restarted(gone)
        self.quiet_until = self.ctx.now + self.ctx.s.resend_ms
        self.active.update(dict.fromkeys(self.records))
        for tid, rec in self.records.items():
            home = tuple(self.ctx.home(rec.spec))
            before = self.home_of.get(tid, home)
            self.home_of[tid] = home
            acked = self.acks.get(tid)
            if acked:  # a member that (re)enters the home may have dropped its copy when it left
                for node in set(home) - set(before):
                    acked.pop(node, None)
        for tid in list(self.records):
            rec = self.records[tid]
            if rec.executor in gone or rec.state == "pending":
                self._drive(rec)
        self.next_sweep = 0
        self.next_check = 0  # records we now coordinate: ask their executors at once

    def tick(self) -> None:
        now = self.ctx.now
        for tid in [t for t, a in self.auctions.items() if now >= a.deadline]:
            self._close_auction(tid)
        if now >= self.next_check:
            self.next_check = now + self.ctx.s.check_ms
            self._check_executors()
        if now >= self.next_sweep:
            self.next_sweep = now + self.ctx.s.resend_ms
            self._sweep()

    def _sweep(self) -> None:
        for tid in list(self.active):
            rec = self.records.get(tid)
            if rec is None:
                self.active.pop(tid, None)
                continue
            self._drive(rec)
            rec = self.records[tid]
            if self.ctx.me not in self.ctx.home(rec.spec) and self._settled_elsewhere(rec):
                self._forget(tid)  # handed on: a stale copy must not linger as a second opinion
            elif self._settled(rec):
                self.active.pop(tid, None)
            else:
                self._push(rec)
        self._evict()

    def _settled_elsewhere(self, rec: Record) -> bool:
        """Not a home member any more and every home member has our version: drop it."""
        home = self.ctx.home(rec.spec)
        acked = self.acks.get(rec.spec.id, {})
        return bool(home) and all(acked.get(n, -1) >= rec.version for n in home)

    def _forget(self, tid: str) -> None:
        rec = self.records.get(tid)
        if rec is not None and rec.state in TERMINAL:
            self.ctx.journal.append((f"d:{tid}", None))
        for d in (self.records, self.acks, self.assigned_at, self.auctions, self.awaiting, self.confirmed, self.lost, self.home_of):
            d.pop(tid, None)
        self.active.pop(tid, None)

    def restore(self, journal) -> None:
        """Finished records kept on disk ("d:<id>"): they are handed on again like any other."""
        for key, value in journal.items():
            if not key.startswith("d:"):
                continue
            try:
                rec = record_from_wire(value)
            except BadMessage:
                self.ctx.counters.inc("task_journal_bad_entry")
                continue
            self.records[rec.spec.id] = rec
            self.active[rec.spec.id] = None

    def _evict(self) -> None:
        """Keep at most keep_results finished records, dropping the oldest."""
        done = [r for r in self.records.values() if r.state in TERMINAL]
        extra = len(done) - self.ctx.s.keep_results
        if extra > 0:
            done.sort(key=lambda r: r.spec.submitted_ms)
            for r in done[:extra]:
                self._forget(r.spec.id)
            self.ctx.counters.inc("task_records_evicted", extra)

    def _check_executors(self) -> None:
        by_node: dict[str, list[tuple[str, int]]] = {}
        for tid in list(self.active):
            rec = self.records.get(tid)
            if rec is None or rec.state not in ("queued", "running") or not self.is_coordinator(rec):
                continue
            if rec.executor not in self.ctx.view:
                self._retry(rec, f"{rec.executor} is gone")
                continue
            by_node.setdefault(rec.executor, []).append((tid, rec.attempt))
        for node, items in by_node.items():
            for i in range(0, len(items), MAX_BATCH):
                self.ctx.send(node, Check(tuple(items[i : i + MAX_BATCH])))
