"""The consensus driver: wires the Raft core, the durable store and the replicated
state machine to the network, the clock and the membership view.

One pass of the loop (`_process`, run soon after anything happens, so that
everything that arrived in one event-loop iteration shares one fsync):

    ready = raft.ready()
    send the leader's Appends                 they may go before its own fsync
    store.save(hard state, entries, snapshot) one write + one fsync (group commit)
    restore a snapshot the leader sent us
    send the other messages                   only now: persist before send
    apply ready.committed                     results wake the waiting clients
    answer ready.read_states                  ReadIndex reads wait for `applied`
    raft.advance(ready)

Raft messages are sealed with the fleet key under the purpose "raft" and sent
as NON POSTs to /raft (several messages to one peer share a datagram of at
most RAFT_MAX_DATAGRAM bytes). A snapshot is too big for a datagram: the
leader's core announces it (InstallSnapshot without data) and the follower
fetches the bytes with a sealed, block-wise CoAP request to /raft-snapshot.

Nothing here decides anything Raft decides; what lives here is time, I/O,
which members are voters (`agent.core.voters` decides, the leader proposes)
and the bookkeeping of clients waiting for their writes and reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import cbor2

from agent.config import Config
from agent.core import raft_messages as rm
from agent.core.raft import HardState, NotLeader, Raft, RaftSettings, Recovered, Refused
from agent.core.statemachine import StateMachine, decode_command, encode_command
from agent.core.voters import Autopilot, MemberView, VoterSettings, bootstrap_choice
from agent.counters import Counters
from agent.envelope import FleetKey, Opener, Sealer
from agent.io.coap import RAFT_MAX_DATAGRAM, RAFT_PATH, CoapEndpoint, coap_get
from agent.io.store import RaftStore
from agent.messages import BadMessage, Status
from agent.wire import ENVELOPE_OVERHEAD, decode_meta, loads_strict

log = logging.getLogger("meshagent.consensus")

RAFT_MAX_PACKET = RAFT_MAX_DATAGRAM - ENVELOPE_OVERHEAD  #: plaintext bytes of one Raft datagram
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024  #: largest snapshot we serve or accept
MAX_WAITING = 10_000  #: client requests waiting at once; beyond, new ones are refused
RETRY_FORWARD_S = 1.0  #: a forwarded write not yet applied is forwarded again this often
SNAPSHOT_PATH = "raft-snapshot"


class WriteRefused(Exception):
    """A write or linearizable read that cannot be served here and now; the
    message is one line naming why (read-only, no leader, transfer...)."""


class OutcomeUnknown(Exception):
    """The write was handed on but not seen committed in time: it may still commit."""


@dataclass
class _Waiter:
    future: asyncio.Future
    data: bytes
    deadline: float  #: monotonic: the tick loop answers OutcomeUnknown after it
    next_retry: float
    retry_every: float = RETRY_FORWARD_S  #: doubles after each hand-off: a busy leader is not a lost datagram
    appended_in: int | None = None  #: the term in which we, as leader, appended it ourselves


class Consensus:
    """Owns the Raft core, store and state machine of one agent."""

    def __init__(self, config: Config, node_id: str, boot: int, keys: list[FleetKey] | None,
                 endpoint: CoapEndpoint, membership, counters: Counters, fsync: bool = True):
        self.cfg = config.consensus
        self.node_id = node_id
        self.membership = membership
        self.endpoint = endpoint
        self.drops = counters
        self.dir = Path(config.node.data_dir) / "raft"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.store = RaftStore(self.dir, fsync=fsync)
        self.sm = StateMachine()
        self.settings = RaftSettings(
            tick_ms=self.cfg.tick_ms, heartbeat_ticks=self.cfg.heartbeat_ticks, election_ticks=self.cfg.election_ticks,
            learner_heartbeat_ticks=self.cfg.learner_heartbeat_ticks,
        )
        self.rng = random.Random()
        self.sealer = Sealer(config.node.mesh, keys, node_id, boot, max_packet=RAFT_MAX_PACKET, purpose="raft")
        self.opener = Opener(config.node.mesh, keys, counters, max_datagram=RAFT_MAX_DATAGRAM, purpose="raft")
        self._snap_sealer = Sealer(config.node.mesh, keys, node_id, boot, max_packet=MAX_SNAPSHOT_BYTES + 1024, purpose="snapshot")
        self._snap_opener = Opener(config.node.mesh, keys, counters, max_datagram=MAX_SNAPSHOT_BYTES + 2048, purpose="snapshot")
        self.autopilot = Autopilot(VoterSettings(stabilization_ms=self.cfg.stabilization_ms, dead_voter_ms=self.cfg.dead_voter_ms))
        self.applied = 0
        self.applied_term = 0
        self.applied_voters: tuple[str, ...] = ()
        self.snapshot_index = 0
        self.commits = 0
        self._writes: dict[bytes, _Waiter] = {}
        self._reads: dict[bytes, asyncio.Future] = {}
        self._applied_waits: list[tuple[int, asyncio.Future]] = []
        self._scheduled = False
        self._fetching: set[int] = set()
        self._tasks: list[asyncio.Task] = []
        self._last_leader: tuple[str | None, int] = (None, 0)
        self._heard_raft = False  #: a Raft message from a peer arrived (see _bootstrap_auto)
        self._voter_addresses: dict | None = None  #: what raft/voters.cbor holds (see recover)
        self.raft = self._open()
        self.listeners: list = []  #: callables told of state-machine events (CoAP Observe)
        endpoint.add_channel(RAFT_PATH, self.on_datagram, rt="meshagent.raft")
        endpoint.add_read(SNAPSHOT_PATH, "meshagent.raft-snapshot", lambda: b"", lambda: False, self._serve_snapshot)

    # ------------------------------------------------------------ start-up

    def _open(self) -> Raft:
        """Recover from disk; with an empty store, bootstrap explicit voters now
        (auto voters bootstrap later, when the mesh has been stable)."""
        recovered = self.store.load()
        snap = self.store.load_snapshot()
        if snap is not None:
            meta, data = snap
            self.sm.restore(data)
            self.applied, self.applied_term, self.snapshot_index = meta.index, meta.term, meta.index
            self.applied_voters = tuple(meta.voters)
            self.sm.set_voters(self.applied_voters)
        if not recovered.entries and snap is None and self.cfg.voters != "auto":
            entries = Raft.bootstrap_entries(list(self.cfg.voters))
            self.store.save(None, entries)
            recovered = Recovered(recovered.hard_state, None, entries)
            log.info("bootstrapped the Raft log with voters %s", ", ".join(self.cfg.voters))
        self._durable = recovered.hard_state  #: term and vote on disk (see early_appends_ok)
        raft = Raft(self.node_id, self.settings, self.rng, recovered, counters=self.drops)
        raft.applied_to(self.applied)
        return raft

    def _bootstrap_auto(self) -> None:
        """Auto voters and nothing on disk: if the mesh picks us, start a one-voter
        cluster; the leader then adds voters one at a time."""
        if self.cfg.voters != "auto" or self.raft.last_index > 0 or self.raft.leader is not None or self._heard_raft:
            return
        # Two nodes that both bootstrap write different entries at index 1 of
        # term 1, and Raft can never reconcile them. So: only when the whole view
        # has been quiet (every alive member known and healthy for the
        # stabilization period, no suspect) and we rank first in all of it. A node
        # that has just joined sees itself "stable" before it has heard of the
        # others; the quiet-view rule keeps it from picking itself.
        now = self._now_ms()
        view = {n: MemberView(v.alive, v.suspect, v.since_ms, 0.0, v.eligible) for n, v in self._view().items()}
        alive = [v for v in view.values() if v.alive]
        if any(v.suspect or now - v.since_ms < self.autopilot.settings.stabilization_ms for v in alive):
            return
        # Headroom from gossiped load moves from moment to moment; every node must
        # pick the same first voter, so the choice here ranks by node id alone.
        if bootstrap_choice(view, now, self.autopilot.settings) != self.node_id:
            return
        entries = Raft.bootstrap_entries([self.node_id])
        self.store.save(None, entries)
        self.raft = Raft(self.node_id, self.settings, self.rng, Recovered(HardState(term=self.raft.term), None, entries), counters=self.drops)
        self.update_learners()
        log.warning("bootstrapped a new Raft cluster with this node as its first voter (auto voters)")
        self.schedule()

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._tick_loop()), asyncio.create_task(self._slow_loop())]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writes.values():
            if not w.future.done():
                w.future.set_exception(OutcomeUnknown("the agent is shutting down"))
        self.store.close()

    # ------------------------------------------------------------- the loop

    async def _tick_loop(self) -> None:
        tick_s = self.cfg.tick_ms / 1000
        next_at = time.monotonic()
        while True:
            next_at += tick_s
            try:
                self.raft.tick()
                self._retry_writes()
                self._process()
            except Exception:
                self.drops.inc("internal_error")
                log.exception("bug: a Raft tick failed")
            delay = next_at - time.monotonic()
            if delay < -tick_s * 4:
                next_at = time.monotonic()  # starved: do not try to catch up
            await asyncio.sleep(max(0.0, delay))

    async def _slow_loop(self) -> None:
        """Once a second: bootstrap (auto), voter changes, proposal expiry, auto votes."""
        while True:
            await asyncio.sleep(1.0)
            try:
                self._bootstrap_auto()
                self.update_learners()
                self._autopilot()
                self._expire_proposals()
                self._remember_voter_addresses()
            except Exception:
                self.drops.inc("internal_error")
                log.exception("bug: consensus housekeeping failed")

    def schedule(self) -> None:
        """Run `_process` soon, once, after whatever else has arrived by then."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._process_scheduled)

    def _process_scheduled(self) -> None:
        self._scheduled = False
        try:
            self._process()
        except Exception:
            self.drops.inc("internal_error")
            log.exception("bug: processing a Raft ready failed")

    def _process(self) -> None:
        while self.raft.has_ready():
            rd = self.raft.ready()
            # A leader's Appends may leave before its own fsync (Raft thesis 10.2.1):
            # it counts itself towards a commit only once durable (the core sees to
            # that), and followers persist before they answer. Every other message
            # (votes, answers) waits for the disk.
            appends = [m for m in rd.messages if type(m) is rm.Append] if early_appends_ok(rd, self._durable) else []
            self._send(appends)
            if rd.hard_state is not None or rd.entries or rd.snapshot is not None:
                # A leader's snapshot goes to disk with the entries after it, in order.
                self.store.save(rd.hard_state, rd.entries, rd.snapshot)
                if rd.hard_state is not None:
                    self._durable = rd.hard_state
            if rd.snapshot is not None:
                self._install_snapshot(*rd.snapshot)
            self._send([m for m in rd.messages if type(m) is not rm.Append] if appends else rd.messages)
            for entry in rd.committed:
                self._apply(entry)
            if rd.committed:
                self.raft.applied_to(self.applied)
                self._wake_applied()
            for rs in rd.read_states:
                self._read_state(rs)
            for refused in rd.forward_refused:
                self.drops.inc("raft_forward_refused")
                log.debug("%s refused a forwarded write: %s", refused.frm, refused.reason)
            if rd.soft_state is not None:
                self._log_role(rd.soft_state)
            self.raft.advance(rd)
        self._maybe_snapshot()

    def _log_role(self, soft) -> None:
        role, leader, term = soft
        if leader is not None:
            self._last_leader = (leader, term)
        log.info("raft: %s in term %d, leader %s", role, term, leader or "unknown")

    # -------------------------------------------------------------- applying

    def _apply(self, entry) -> None:
        self.applied, self.applied_term = entry.index, entry.term
        if entry.kind == rm.EntryKind.CONF:
            change = rm.ConfChange.decode(entry.data)
            voters = set(self.applied_voters)
            (voters.add if change.op == "add" else voters.discard)(change.node)
            self.applied_voters = tuple(sorted(voters))
            self.sm.set_voters(self.applied_voters, entry.index)
            return
        if not entry.data:
            return  # a new leader's no-op
        result = self.sm.apply(entry.index, entry.data)
        self.commits += 1
        self._answer_write(entry.data, result)
        self._emit(self.sm.take_events())

    def _answer_write(self, data: bytes, result) -> None:
        if not self._writes:
            return
        try:
            rid = decode_command(data).rid
        except BadMessage:
            return
        waiter = self._writes.pop(rid, None)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(result)

    def _emit(self, events) -> None:
        if not events:
            return
        for listener in self.listeners:
            listener(events)
        self._auto_vote(events)

    def _wake_applied(self) -> None:
        keep = []
        for index, fut in self._applied_waits:
            if index <= self.applied:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((index, fut))
        self._applied_waits = keep

    # ------------------------------------------------------------- snapshots

    def _maybe_snapshot(self) -> None:
        if self.applied - self.snapshot_index < self.cfg.snapshot_entries:
            return
        meta = rm.SnapshotMeta(self.applied, self.applied_term, self.applied_voters)
        data = self.sm.snapshot()
        self.store.save_snapshot(meta, data)
        self.snapshot_index = meta.index
        keep_from = meta.index - self.cfg.keep_entries
        if keep_from > self.raft.log.offset:
            self.raft.compact(rm.SnapshotMeta(keep_from, self.raft.term_at(keep_from), self.raft.voters_at(keep_from)))
            self.store.compact(keep_from)
        log.info("snapshot at index %d (%d bytes); log compacted up to %d", meta.index, len(data), max(keep_from, 0))

    def _install_snapshot(self, meta, data: bytes) -> None:
        """The leader's snapshot, already durable: replace the state machine."""
        self.sm.restore(data)
        self.applied, self.applied_term, self.snapshot_index = meta.index, meta.term, meta.index
        self.applied_voters = tuple(meta.voters)
        self.sm.set_voters(self.applied_voters)
        self.store.compact(meta.index)
        self._wake_applied()
        log.info("installed the leader's snapshot at index %d (%d bytes)", meta.index, len(data))

    def _serve_snapshot(self, request: bytes, render) -> bytes | None:
        """A peer's sealed request for our latest snapshot: answered sealed."""
        if self._snap_opener.open(request) is None:
            return None
        snap = self.store.load_snapshot()
        if snap is None:
            return self._snap_sealer.seal(cbor2.dumps(None))
        meta, data = snap
        return self._snap_sealer.seal(cbor2.dumps([meta.to_wire(), data]))

    async def _fetch_snapshot(self, msg) -> None:
        """Get the bytes of the snapshot the leader announced, then step it."""
        addr = self._address(msg.frm)
        try:
            if addr is None:
                raise OSError(f"no address for {msg.frm}")
            code, payload = await coap_get(addr[0], addr[1], SNAPSHOT_PATH, timeout=30, payload=self._snap_sealer.seal(b"\xf6"))
            opened = self._snap_opener.open(payload) if code.startswith("2.") else None
            if opened is None or opened[0] != msg.frm:
                raise OSError(f"answer {code} not sealed by {msg.frm}")
            body = cbor2.loads(opened[1])
            if body is None:
                raise OSError("the leader has no snapshot")
            meta = rm._meta(body[0])
            if not isinstance(body[1], bytes):
                raise OSError("malformed snapshot")
            self.raft.step(rm.InstallSnapshot(msg.frm, msg.to, msg.term, meta, body[1]))
            self.schedule()
        except Exception as exc:  # the leader retries after a timeout
            self.drops.inc("snapshot_fetch_failed")
            log.warning("could not fetch the snapshot from %s: %s", msg.frm, exc)
        finally:
            self._fetching.discard(msg.meta.index)

    # ------------------------------------------------------------- transport

    def on_datagram(self, data: bytes, src: tuple[str, int]) -> None:
        opened = self.opener.open(data)
        if opened is None:
            return
        sender, body = opened
        try:
            items = loads_strict(body, max_depth=8)
            if type(items) is not list or not items or len(items) > 64:
                raise BadMessage("malformed", "raft datagram")
            msgs = [rm.decode(item) for item in items]
        except BadMessage as exc:
            self.drops.inc("raft_" + exc.reason)
            return
        for msg in msgs:
            if msg.frm != sender or msg.to != self.node_id:
                self.drops.inc("raft_misaddressed")
                continue
            self._heard_raft = True  # a cluster exists: never bootstrap another
            self._step(msg)
        self.schedule()

    def _step(self, msg) -> None:
        if isinstance(msg, rm.InstallSnapshot) and msg.data is None:
            if msg.meta.index not in self._fetching and msg.meta.index > self.applied:
                self._fetching.add(msg.meta.index)
                task = asyncio.get_running_loop().create_task(self._fetch_snapshot(msg))
                self._tasks.append(task)
                task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)
            return
        if isinstance(msg, rm.Forward) and not self._forward_allowed(msg):
            self.drops.inc("raft_forged_vote")
            return
        try:
            self.raft.step(msg)
        except Exception:
            self.drops.inc("internal_error")
            log.exception("bug: the Raft core failed on a %s from %s", type(msg).__name__, msg.frm)

    def _forward_allowed(self, msg) -> bool:
        """A node may cast a proposal vote only in its own name."""
        try:
            cmd = decode_command(msg.data)
        except BadMessage:
            return True  # the state machine answers it with an error result
        return cmd.op != "prop.vote" or cmd.fields.get("voter") == msg.frm

    def _send(self, messages) -> None:
        by_peer: dict[str, list[bytes]] = {}
        for msg in messages:
            by_peer.setdefault(msg.to, []).append(cbor2.dumps(msg.to_wire()))
        for peer, encoded in by_peer.items():
            addr = self._address(peer)
            if addr is None:
                self.drops.inc("raft_no_address")
                continue
            for packet in _pack(encoded, RAFT_MAX_PACKET):
                if packet is None:
                    self.drops.inc("raft_oversized_out")
                    continue
                self.endpoint.send(addr[0], addr[1], self.sealer.seal(packet), RAFT_PATH)

    def _address(self, node: str) -> tuple[str, int] | None:
        m = self.membership.members.get(node)
        if m is None or m.status is Status.LEFT and node != self.node_id:
            return None
        return m.addr, m.port

    # -------------------------------------------------------------- clients

    def writable(self) -> tuple[bool, str]:
        if not self.cfg.enabled:
            return False, "consensus is disabled on this node (consensus.enabled = false)"
        if self.raft.last_index == 0 and self.raft.leader is None:
            return False, "no Raft cluster yet: waiting for the mesh to choose its first voter"
        return self.raft.writable()

    async def write(self, op: str, **fields) -> object:
        """Replicate one command; its state-machine Result once applied here.
        WriteRefused at once when this node cannot write; OutcomeUnknown on timeout."""
        ok, reason = self.writable()
        if not ok:
            raise WriteRefused(reason)
        if len(self._writes) >= MAX_WAITING:
            raise WriteRefused(f"overloaded: {MAX_WAITING} writes already waiting on this node")
        rid = secrets.token_bytes(16)
        data = encode_command(op, rid, **fields)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        waiter = _Waiter(loop.create_future(), data, now + self.cfg.request_timeout_ms / 1000, now + RETRY_FORWARD_S)
        self._writes[rid] = waiter
        try:
            self._submit(waiter)
            self.schedule()
            # No timer per write: the tick loop ends overdue waiters (_retry_writes).
            return await waiter.future
        finally:
            self._writes.pop(rid, None)

    def _submit(self, waiter: _Waiter) -> None:
        try:
            if self.raft.role == "leader":
                self.raft.propose(waiter.data)
                waiter.appended_in = self.raft.term
            else:
                self.raft.forward(waiter.data)
        except (NotLeader, Refused) as exc:
            raise WriteRefused(_reason(exc)) from None

    def _retry_writes(self) -> None:
        """Forwarded writes travel in datagrams that can be lost: hand them on
        again until applied (the state machine drops the duplicates by request id).
        A write we appended as the leader of the current term is in our log:
        it commits or we lose leadership, so it is never appended twice."""
        now = time.monotonic()
        leading_in = self.raft.term if self.raft.role == "leader" else None
        for waiter in list(self._writes.values()):
            if waiter.future.done():
                continue
            if now >= waiter.deadline:
                waiter.future.set_exception(OutcomeUnknown(
                    f"not committed within {self.cfg.request_timeout_ms} ms; it may still commit"))
                continue
            if now < waiter.next_retry:
                continue
            if waiter.appended_in is not None and waiter.appended_in == leading_in:
                continue
            waiter.retry_every *= 2
            waiter.next_retry = now + waiter.retry_every
            try:
                self._submit(waiter)
            except WriteRefused:
                # The first hand-off may already sit in a majority's logs and
                # commit under the next leader: never answer "refused" for it.
                # It ends applied, or as OutcomeUnknown at its deadline.
                pass

    async def linearizable(self) -> None:
        """Return once the local state reflects every write committed before the
        call (ReadIndex); WriteRefused when no leader can confirm it."""
        ok, reason = self.writable()
        if not ok:
            raise WriteRefused(reason)
        ctx = secrets.token_bytes(8)
        fut = asyncio.get_running_loop().create_future()
        self._reads[ctx] = fut
        try:
            self.raft.read_index(ctx)
            self.schedule()
            index = await asyncio.wait_for(fut, self.cfg.request_timeout_ms / 1000)
        except asyncio.TimeoutError:
            raise WriteRefused("no leader confirmed the read in time (read-only or partitioned?); use --stale for the local copy") from None
        except (NotLeader, Refused) as exc:
            raise WriteRefused(_reason(exc)) from None
        finally:
            self._reads.pop(ctx, None)
        await self.wait_applied(index)

    def _read_state(self, rs) -> None:
        fut = self._reads.get(rs.ctx)
        if fut is None or fut.done():
            return
        if rs.index < 0:
            fut.set_exception(WriteRefused(rs.reason or "the leader refused the read"))
        else:
            fut.set_result(rs.index)

    async def wait_applied(self, index: int) -> None:
        if index <= self.applied:
            return
        fut = asyncio.get_running_loop().create_future()
        self._applied_waits.append((index, fut))
        await asyncio.wait_for(fut, self.cfg.request_timeout_ms / 1000)

    def leader_address(self) -> str | None:
        """HOST:PORT of the leader's API as the membership knows it."""
        addr = self._address(self.raft.leader) if self.raft.leader else None
        return None if addr is None else f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"

    def transfer(self, target: str | None) -> None:
        if self.raft.role != "leader":
            leader, term = self.raft.leader, self.raft.term
            raise WriteRefused(f"not the leader; ask {leader or 'the leader'} (term {term})")
        if target is not None and target not in self.raft.voters:
            raise WriteRefused(f"{target} is not a voter (voters: {', '.join(self.raft.voters)})")
        try:
            self.raft.transfer_leadership(target)
        except Refused as exc:  # e.g. a lone voter: nobody to hand it to
            raise WriteRefused(str(exc)) from None
        self.schedule()

    # --------------------------------------------------------- housekeeping

    def _now_ms(self) -> int:
        return int(time.time() * 1000)

    def _view(self) -> dict:
        """The membership as the voter autopilot needs it."""
        tick_ms = self.membership.s.tick_ms
        now_ms = self._now_ms()
        view = {}
        for m in self.membership.members.values():
            meta = decode_meta(m.meta) if m.meta else {}
            cpu, mem = meta.get("cpu") or 0.0, meta.get("mem") or 0.0
            view[m.node] = MemberView(
                alive=m.status in (Status.ALIVE, Status.SUSPECT), suspect=m.status is Status.SUSPECT,
                since_ms=now_ms - (self.membership.now - m.since) * tick_ms,
                headroom=float((100 - cpu) + (100 - mem)), eligible=True,
            )
        return view

    def _autopilot(self) -> None:
        if self.cfg.voters != "auto" or self.raft.role != "leader":
            return
        st = self.raft.status()
        match = {n: p["match"] for n, p in st.get("progress", {}).items()}
        decision = self.autopilot.decide(self._now_ms(), tuple(self.raft.voters), self.node_id, match, self.raft.commit,
                                         self._view(), term=self.raft.term)
        if decision.change is None:
            return
        change, why = decision.change, decision.reason
        try:
            self.raft.propose_conf(rm.ConfChange(change.op, change.node))
            log.warning("voters: %s %s (%s)", change.op, change.node, why)
            self.schedule()
        except (Refused, NotLeader) as exc:
            log.debug("voter change %s %s postponed: %s", change.op, change.node, exc)

    def update_learners(self) -> None:
        alive = {m.node for m in self.membership.members.values() if m.status in (Status.ALIVE, Status.SUSPECT)}
        self.raft.set_learners(alive - set(self.raft.voters) - {self.node_id})

    def _expire_proposals(self) -> None:
        if self.raft.role != "leader":
            return
        now = self._now_ms()
        if any(p.deadline_ms is not None and p.deadline_ms <= now for p in self.sm.proposals(open_only=True)):
            try:
                self.raft.propose(encode_command("prop.expire", secrets.token_bytes(16), now_ms=now))
                self.schedule()
            except (NotLeader, Refused):
                pass

    def _auto_vote(self, events) -> None:
        policy = self.cfg.vote_policy
        if policy == "manual" or self.node_id not in self.applied_voters:
            return
        for ev in events:
            p = self.sm.proposal(ev.name) if ev.kind == "prop.new" else None
            if p is None or not p.open:
                continue
            choice = self._policy_choice(policy, p.value)
            task = asyncio.get_running_loop().create_task(self._cast(p.id, choice))
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    def _policy_choice(self, policy: str, value) -> str:
        if policy in ("approve", "reject"):
            return policy
        target = value.get("assigned_to") if isinstance(value, dict) else None
        m = self.membership.members.get(target) if isinstance(target, str) else None
        return "approve" if m is not None and m.status is Status.ALIVE else "reject"

    async def _cast(self, pid: str, choice: str) -> None:
        try:
            await self.write("prop.vote", id=pid, voter=self.node_id, choice=choice, now_ms=self._now_ms())
            log.info("voted %s on proposal %s (policy %s)", choice, pid, self.cfg.vote_policy)
        except (WriteRefused, OutcomeUnknown) as exc:
            log.warning("could not vote on proposal %s: %s", pid, exc)

    def _remember_voter_addresses(self) -> None:
        """Keep the voters' last addresses in the data dir: `meshagent recover`
        (run while the agent is stopped) asks them whether a quorum is alive."""
        known = {v: list(a) for v in self.raft.voters if (a := self._address(v)) is not None}
        if known == self._voter_addresses:
            return  # written already: an SD card is written only on a change
        path = self.dir / "voters.cbor"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(cbor2.dumps(known))
        os.replace(tmp, path)
        self._voter_addresses = known

    # ------------------------------------------------------------------ views

    def mode(self) -> str:
        return "read-write" if self.writable()[0] else "read-only"

    def status(self) -> dict:
        st = self.raft.status()
        stats = self.store.stats
        writable, why = self.writable()
        return {
            "role": st["role"],
            "term": st["term"],
            "leader": st["leader"],
            "commit_index": st["commit"],
            "applied_index": self.applied,
            "last_index": st.get("last_index"),
            "snapshot_index": self.snapshot_index,
            "voters": list(st["voters"]),
            "mode": "read-write" if writable else "read-only",
            "why": why,
            "disk": {
                "bytes_written": stats.get("bytes_written", 0),
                "fsyncs": stats.get("fsyncs", 0),
                "bytes_per_commit": round(stats.get("bytes_written", 0) / self.commits, 1) if self.commits else None,
            },
        }


def early_appends_ok(rd, durable) -> bool:
    """May this Ready's Appends leave before its fsync? Only when they carry no
    term or vote that is not on disk yet: a lone voter elects itself and sends
    its first Appends in one Ready, and if it crashed before the fsync it could
    lead the same term again with another log (the simulator found this)."""
    hs = rd.hard_state
    return hs is None or (hs.term == durable.term and hs.vote == durable.vote)


def _pack(encoded: list[bytes], limit: int):
    """CBOR arrays of already-encoded messages, each at most `limit` bytes;
    None for a single message too big to send (counted by the caller)."""
    batch: list[bytes] = []
    size = 3
    for item in encoded:
        if len(item) + 3 > limit:
            yield None
            continue
        if batch and (size + len(item) > limit or len(batch) == 64):
            yield _array(batch)
            batch, size = [], 3
        batch.append(item)
        size += len(item)
    if batch:
        yield _array(batch)


def _array(items: list[bytes]) -> bytes:
    n = len(items)
    head = bytes([0x80 + n]) if n < 24 else bytes([0x98, n])
    return head + b"".join(items)


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "reason", "") or exc)
