"""SWIM membership with Lifeguard, as a sans-IO state machine.

Theory of operation
-------------------
The driver calls `tick()` every `settings.tick_ms` of its clock (real or
virtual), `step(packet, src)` for every packet that arrived, and sends what
`ready()` returns. Nothing here reads a clock, touches a socket or uses global
randomness: the injected `random.Random` makes every run replayable.

Failure detection (SWIM): every probe period we ping the next member of a
shuffled round-robin list. No ack within the probe timeout: we ask
`indirect_checks` others to ping it for us. No ack by the end of the period:
we suspect it and gossip `Suspect`. A suspected member that hears of it
refutes with `Alive` at a higher incarnation; if nobody hears a refutation
before the suspicion timeout, the member is declared `Dead`.

Lifeguard: (1) the suspicion timeout starts long and shrinks as independent
members confirm the suspicion (`suspicion.py`); (2) our own probe interval and
timeout stretch while we look unhealthy ourselves: failed probes whose relays
did not even nack, refuting suspicions of ourselves, or the driver reporting
event-loop lag (`awareness`); (3) a probe of a suspect carries the suspicion
(buddy system) so the member learns of it at once.

One addition to memberlist: every member we hold suspect is probed again,
with the suspicion attached, on every other probe period until it refutes or
times out. A member that really died collects its confirmations within a
period or two, instead of waiting for the round-robin to come round; a live
member answers, and since it handles the attached suspicion before it acks,
its refutation rides back on the ack. (Without this, a suspicion whose
refutation was lost on the way to us could only be cleared by push-pull,
which may come after the suspicion timeout: a false death.)

Dissemination: `Alive`/`Suspect`/`Dead` go into a broadcast queue and ride on
every packet we send that has room, each sent retransmit_mult*log10(N+1)
times; a gossip round every `gossip_interval_ms` sends pending news to
`gossip_nodes` random members. Push-pull full-state exchanges join new
members, repair what gossip missed, and (with members we think are dead)
heal partitions.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from agent.core.broadcasts import BroadcastQueue
from agent.core.settings import MembershipSettings
from agent.core.suspicion import Suspicion
from agent.counters import Counters
from agent.messages import (
    MAX_INCARNATION,
    MAX_SEQ,
    Ack,
    Alive,
    Dead,
    Gossip,
    IndirectPing,
    MemberState,
    Message,
    Nack,
    Packet,
    Ping,
    PushPull,
    Status,
    Suspect,
)
from agent.wire import MAX_MESSAGES, MAX_PACKET, encoded_size, packet_size, split_states

Addr = tuple[str, int]
MAX_RELAYS = 256  #: indirect probes we relay at once; more are refused and counted
MAX_PRIORITY = 16  #: suspects queued for an early probe
_LIVE = (Status.ALIVE, Status.SUSPECT)


@dataclass(slots=True)
class Member:
    node: str
    addr: str
    port: int
    incarnation: int
    status: Status
    meta: bytes
    since: int  #: tick of the last status change
    last_seen: int | None = None  #: tick a packet from this member last arrived

    def state(self) -> MemberState:
        return MemberState(self.node, self.incarnation, self.status, self.addr, self.port, self.meta)


@dataclass(frozen=True, slots=True)
class Outgoing:
    addr: str
    port: int
    packet: Packet


@dataclass(frozen=True, slots=True)
class Event:
    """A member changed status (old is None for a member we had not known)."""

    node: str
    old: Status | None
    new: Status
    incarnation: int


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    started: int
    timeout_at: int
    ends_at: int
    acked: bool = False
    indirect: int = 0  #: relays asked
    nacks: int = 0
    suspect: bool = False  #: a re-probe of a member we already suspect


@dataclass(slots=True)
class _Relay:
    origin: Addr
    origin_seq: int
    deadline: int


class Membership:
    def __init__(
        self,
        settings: MembershipSettings,
        me: str,
        addr: str,
        port: int,
        rng: random.Random,
        *,
        incarnation: int = 0,
        meta: bytes = b"",
        counters: Counters | None = None,
    ):
        self.s = settings
        self.me = me
        self.rng = rng
        self.counters = counters if counters is not None else Counters()
        self.now = 0
        self.members: dict[str, Member] = {me: Member(me, addr, port, incarnation, Status.ALIVE, meta, 0, 0)}
        self._live = 1
        self.broadcasts = BroadcastQueue()
        self.awareness = 0
        self._seq = rng.randrange(MAX_SEQ)
        self._outbox: list[Outgoing] = []
        self._events: list[Event] = []
        self._suspicions: dict[str, Suspicion] = {}
        self._probe: _Probe | None = None
        self._probe_order: list[str] = []
        self._priority: deque[str] = deque()  #: suspects to probe again, every other period
        self._last_was_priority = False
        self._relays: dict[int, _Relay] = {}
        self._next_probe = 0
        self._next_gossip = rng.randrange(max(1, settings.ticks(settings.gossip_interval_ms)))
        self._next_push_pull = self._jittered(settings.push_pull_interval_ms)
        self._next_reconnect = self._jittered(settings.reconnect_interval_ms)
        self._next_reap = 0
        self._seeds: list[Addr] = []
        self._join_backoff = settings.ticks(settings.join_retry_min_ms)
        self._next_join: int | None = None
        self._budget = MAX_PACKET - packet_size(me, ())
        self.leaving = False

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        """Advance one tick and run whatever timers are due."""
        self.now += 1
        if self.leaving:
            return
        self._tick_probe()
        self._tick_relays()
        self._tick_suspicions()
        if self.now >= self._next_gossip:
            self._next_gossip = self.now + self.s.ticks(self.s.gossip_interval_ms)
            self._gossip_round()
        if self.s.push_pull_interval_ms and self.now >= self._next_push_pull:
            self._next_push_pull = self.now + self._jittered(self.s.push_pull_interval_ms)
            self._push_pull_random(alive=True)
        if self.s.reconnect_interval_ms and self.now >= self._next_reconnect:
            self._next_reconnect = self.now + self._jittered(self.s.reconnect_interval_ms)
            self._push_pull_random(alive=False)
        if self._next_join is not None and self.now >= self._next_join:
            self._try_join()
        if self.now >= self._next_reap:
            self._next_reap = self.now + self.s.ticks(self.s.probe_interval_ms)
            self._reap()

    def step(self, packet: Packet, src: Addr) -> None:
        """Handle one packet from the network (already authenticated and decoded)."""
        if packet.sender == self.me:
            self.counters.inc("from_self")
            return
        if self.leaving:
            return
        sender = self.members.get(packet.sender)
        if sender is not None:
            sender.last_seen = self.now
        # Gossip first, so that an Ack we send back already carries our refutation.
        replies: list[Message] = []
        for msg in sorted(packet.messages, key=lambda m: not isinstance(m, (Alive, Suspect, Dead))):
            reply = self._handle(msg, packet.sender, src)
            if reply is not None:
                replies.append(reply)
        for reply in replies:
            self._send(src, reply)
        # Only a full state ends the join: gossip alone may come from a seed that
        # learned of us while its reply (UDP, unlike memberlist's TCP) was lost.
        if self._next_join is not None and self._has_peers() and any(isinstance(m, PushPull) for m in packet.messages):
            self._joined()

    def join(self, seeds: list[Addr]) -> None:
        """Remember the seeds and start contacting them until one answers.
        The seeds are asked again whenever we find ourselves alone."""
        me = self.members[self.me]
        self._seeds = [s for s in dict.fromkeys(seeds) if s != (me.addr, me.port)]
        if self._seeds and not self._has_peers():
            self._next_join = self.now

    def discovered(self, node: str, addr: str, port: int) -> None:
        """A peer found by mDNS: exchange state with it unless we already know it alive."""
        m = self.members.get(node)
        if node == self.me or (m is not None and m.status in (Status.ALIVE, Status.SUSPECT) and (m.addr, m.port) == (addr, port)):
            return
        self._push_pull_to((addr, port), join=True)

    def leave(self) -> None:
        """Tell the mesh we are going (seen as `left`, not `dead`) and stop taking part."""
        me = self.members[self.me]
        msg = Dead(self.me, me.incarnation, self.me)
        self._apply_dead(msg)
        peers = [m for m in self.members.values() if m.node != self.me and m.status in (Status.ALIVE, Status.SUSPECT)]
        for m in self.rng.sample(peers, min(len(peers), 16)):
            self._send((m.addr, m.port), msg)
        self.leaving = True

    def set_meta(self, meta: bytes) -> None:
        """New metadata (load, capabilities) for ourselves, gossiped under a new incarnation."""
        me = self.members[self.me]
        if meta != me.meta:
            me.meta = meta
            self._bump_incarnation(me.incarnation)

    def set_address(self, addr: str, port: int) -> None:
        """Our address changed (Wi-Fi reconnect): tell everyone."""
        me = self.members[self.me]
        if (addr, port) != (me.addr, me.port):
            me.addr, me.port = addr, port
            self._bump_incarnation(me.incarnation)

    def degrade_health(self) -> None:
        """The driver saw us fall behind (event-loop lag): probe less eagerly."""
        self._adjust_awareness(+1)

    # ----------------------------------------------------------------- outputs

    def ready(self) -> list[Outgoing]:
        """Packets to send now; the caller must send them (order does not matter)."""
        out, self._outbox = self._outbox, []
        return out

    def take_events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    @property
    def incarnation(self) -> int:
        return self.members[self.me].incarnation

    def live_count(self) -> int:
        """Members alive or suspect, us included; kept up to date by `_event`
        because every packet we send asks for it (retransmit limit)."""
        return self._live

    # ------------------------------------------------------------------ probes

    def _tick_probe(self) -> None:
        p = self._probe
        if p is not None and not p.acked and p.indirect == 0 and self.now >= p.timeout_at:
            self._indirect_probe(p)
        if p is not None and (self.now >= p.ends_at or (p.indirect and p.nacks >= p.indirect and not p.acked)):
            self._finish_probe(p)  # at the period's end, or once every relay said the target is silent
        if self._probe is None and self.now >= self._next_probe:
            self._start_probe()

    def _start_probe(self) -> None:
        target = self._next_target()
        scale = self.awareness + 1
        self._next_probe = self.now + self.s.ticks(self.s.probe_interval_ms) * scale
        if target is None:
            return
        m = self.members[target]
        seq = self._next_seq()
        self._probe = _Probe(
            seq, target, self.now,
            timeout_at=self.now + self.s.ticks(self.s.probe_timeout_ms) * scale,
            ends_at=self._next_probe,
        )
        self._probe.suspect = m.status == Status.SUSPECT
        buddy = Suspect(m.node, m.incarnation, self.me) if self._probe.suspect else None
        self._send((m.addr, m.port), Ping(seq, target), first=buddy)

    def _next_target(self) -> str | None:
        if not self._last_was_priority:
            node = self._pop_priority()
            if node is not None:
                self._last_was_priority = True
                return node
        self._last_was_priority = False
        for _ in range(2):
            while self._probe_order:
                node = self._probe_order.pop()
                m = self.members.get(node)
                if m is not None and m.status in (Status.ALIVE, Status.SUSPECT):
                    return node
            self._probe_order = [n for n, m in self.members.items() if n != self.me and m.status in (Status.ALIVE, Status.SUSPECT)]
            self.rng.shuffle(self._probe_order)
        return None

    def _probe_soon(self) -> None:
        """Start the next probe now if our probe slot is free (no probe, or the
        current one already acked): hearing a suspicion should lead to a
        confirmation or a refutation within one probe, not one period later."""
        p = self._probe
        if p is not None and p.acked:
            self._finish_probe(p)
        if self._probe is None:
            self._next_probe = min(self._next_probe, self.now)

    def _pop_priority(self) -> str | None:
        while self._priority:
            node = self._priority.popleft()
            m = self.members.get(node)
            if m is not None and m.status == Status.SUSPECT:
                return node
        return None

    def _probe_suspect_again(self, node: str) -> None:
        if node not in self._priority and len(self._priority) < MAX_PRIORITY:
            self._priority.append(node)

    def _indirect_probe(self, p: _Probe) -> None:
        target = self.members.get(p.target)
        if target is None:
            return
        relays = [m for m in self.members.values() if m.node not in (self.me, p.target) and m.status == Status.ALIVE]
        for m in self.rng.sample(relays, min(len(relays), self.s.indirect_checks)):
            self._send((m.addr, m.port), IndirectPing(p.seq, p.target, target.addr, target.port))
            p.indirect += 1

    def _finish_probe(self, p: _Probe) -> None:
        self._probe = None
        m = self.members.get(p.target)
        if p.acked:
            self._adjust_awareness(-1)
        else:
            # Lifeguard: relays that did not even nack suggest the problem is ours.
            # Not on a re-probe of a suspect: it is expected to fail, and its relays
            # include other members that just died with it.
            if not p.suspect:
                self._adjust_awareness(p.indirect - p.nacks if p.indirect else 1)
            if m is not None and m.status in (Status.ALIVE, Status.SUSPECT):
                self._apply_suspect(Suspect(m.node, m.incarnation, self.me))
        if m is not None and m.status == Status.SUSPECT:
            self._probe_suspect_again(m.node)

    def _handle_ack(self, ack: Ack) -> None:
        p = self._probe
        if p is not None and ack.seq == p.seq:
            p.acked = True
            m = self.members.get(p.target)
            if m is not None:
                m.last_seen = self.now
            return
        relay = self._relays.pop(ack.seq, None)
        if relay is not None:
            self._send(relay.origin, Ack(relay.origin_seq))
            return
        self.counters.inc("stale_ack")

    def _handle_indirect(self, msg: IndirectPing, src: Addr) -> None:
        if len(self._relays) >= MAX_RELAYS:
            self.counters.inc("relay_limit")
            return
        seq = self._next_seq()
        # Lifeguard: nack after 80% of the probe timeout, so the nack reaches the
        # prober before its probe period ends (it asked us one timeout into it).
        self._relays[seq] = _Relay(src, msg.seq, self.now + max(1, self.s.ticks(self.s.probe_timeout_ms) * 4 // 5))
        self._send((msg.addr, msg.port), Ping(seq, msg.target))

    def _tick_relays(self) -> None:
        for seq, r in list(self._relays.items()):
            if self.now >= r.deadline:
                del self._relays[seq]
                self._send(r.origin, Nack(r.origin_seq))

    def _adjust_awareness(self, delta: int) -> None:
        self.awareness = max(0, min(self.s.awareness_max - 1, self.awareness + delta))

    # ----------------------------------------------------------------- gossip

    def _handle(self, msg: Message, sender: str, src: Addr) -> Message | None:
        match msg:
            case Ping():
                if msg.target != self.me:
                    self.counters.inc("wrong_target")
                    return None
                return Ack(msg.seq)
            case Ack():
                self._handle_ack(msg)
            case Nack():
                if self._probe is not None and msg.seq == self._probe.seq:
                    self._probe.nacks += 1
            case IndirectPing():
                self._handle_indirect(msg, src)
            case Alive():
                self._apply_alive(msg)
            case Suspect():
                self._apply_suspect(msg)
            case Dead():
                self._apply_dead(msg)
            case PushPull():
                self._merge(msg, sender, src)
        return None

    def _apply_alive(self, msg: Alive) -> None:
        if msg.node == self.me:
            me = self.members[self.me]
            if msg.incarnation > me.incarnation or (
                msg.incarnation == me.incarnation and (msg.addr, msg.port, msg.meta) != (me.addr, me.port, me.meta)
            ):
                self._refute(msg.incarnation)
            return
        m = self.members.get(msg.node)
        if m is None:
            if len(self.members) >= self.s.max_members:
                self.counters.inc("member_limit")
                return
            m = self.members[msg.node] = Member(msg.node, msg.addr, msg.port, msg.incarnation, Status.ALIVE, msg.meta, self.now)
            self._event(m, None)
        elif msg.incarnation <= m.incarnation:
            return
        else:
            old = m.status
            m.incarnation, m.addr, m.port, m.meta = msg.incarnation, msg.addr, msg.port, msg.meta
            self._suspicions.pop(m.node, None)
            if old != Status.ALIVE:
                m.status, m.since = Status.ALIVE, self.now
                self._event(m, old)
        self.broadcasts.push(msg)

    def _apply_suspect(self, msg: Suspect) -> None:
        if msg.node == self.me and msg.incarnation < self.incarnation:
            self._reannounce()
            return
        m = self.members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation or m.status in (Status.DEAD, Status.LEFT):
            return
        if msg.node == self.me:
            self._refute(msg.incarnation)
            self._adjust_awareness(+1)
            return
        if m.status == Status.SUSPECT and msg.incarnation == m.incarnation:
            s = self._suspicions.get(m.node)
            if s is not None and s.confirm(msg.sender):
                self.broadcasts.push(msg)
            return
        old = m.status
        m.incarnation, m.status, m.since = msg.incarnation, Status.SUSPECT, self.now
        n = self.live_count()
        lo, hi = self.s.suspicion_bounds_ms(n)
        k = max(0, min(self.s.suspicion_confirmations, n - 2))
        quorum = max(k + 1, math.ceil(self.s.suspicion_quorum_pct * n / 100)) if self.s.suspicion_quorum_pct else 0
        self._suspicions[m.node] = Suspicion(
            self.now, msg.sender, k, self.s.ticks(lo), self.s.ticks(hi), quorum, self.s.ticks(self.s.probe_interval_ms)
        )
        self._probe_suspect_again(m.node)
        if msg.sender != self.me:
            self._probe_soon()
        self.broadcasts.push(msg)
        self._event(m, old)

    def _apply_dead(self, msg: Dead) -> None:
        if msg.node == self.me and msg.incarnation < self.incarnation:
            self._reannounce()
            return
        m = self.members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation:
            return
        new = Status.LEFT if msg.sender == msg.node else Status.DEAD
        if m.status in (Status.DEAD, Status.LEFT) and not (new == Status.LEFT and m.status == Status.DEAD):
            return
        if msg.node == self.me and new == Status.DEAD:
            self._refute(msg.incarnation)
            return
        old = m.status
        m.incarnation, m.status, m.since = msg.incarnation, new, self.now
        self._suspicions.pop(m.node, None)
        self.broadcasts.push(msg)
        self._event(m, old)

    def _tick_suspicions(self) -> None:
        for node, s in list(self._suspicions.items()):
            if s.expired(self.now):
                m = self.members[node]
                self._apply_dead(Dead(node, m.incarnation, self.me))

    def _reannounce(self) -> None:
        """Someone still holds an old suspicion (or death) of us: our refutation ran
        out of retransmits before it reached them. Queue our current Alive again (no
        new incarnation), so the ack to their next probe or our next gossip carries it."""
        me = self.members[self.me]
        self.broadcasts.push(Alive(self.me, me.incarnation, me.addr, me.port, me.meta))

    def _refute(self, claimed: int) -> None:
        self._bump_incarnation(claimed)

    def _bump_incarnation(self, at_least: int) -> None:
        me = self.members[self.me]
        me.incarnation = min(MAX_INCARNATION, max(me.incarnation, at_least) + 1)
        self.broadcasts.push(Alive(self.me, me.incarnation, me.addr, me.port, me.meta))

    def _gossip_round(self) -> None:
        if not len(self.broadcasts):
            return
        recent = self.now - self.s.ticks(self.s.probe_interval_ms) * 30
        targets = [
            m for m in self.members.values()
            if m.node != self.me and (m.status in (Status.ALIVE, Status.SUSPECT) or (m.status == Status.DEAD and m.since >= recent))
        ]
        for m in self.rng.sample(targets, min(len(targets), self.s.gossip_nodes)):
            msgs = self.broadcasts.take(self._budget, encoded_size, self._limit(), max_count=MAX_MESSAGES)
            if not msgs:
                break
            self._outbox.append(Outgoing(m.addr, m.port, Packet(self.me, tuple(msgs))))

    # -------------------------------------------------------------- push-pull

    def _merge(self, msg: PushPull, sender: str, src: Addr) -> None:
        for st in msg.states:
            if st.status == Status.ALIVE:
                self._apply_alive(Alive(st.node, st.incarnation, st.addr, st.port, st.meta))
            elif st.status == Status.LEFT:
                self._apply_dead(Dead(st.node, st.incarnation, st.node))
            else:
                # memberlist: a remote "dead" only makes us suspect, so that the
                # member gets its chance to refute (and a healed partition re-merges).
                if st.node == self.me or st.node in self.members:
                    self._apply_suspect(Suspect(st.node, st.incarnation, sender))
        if msg.reply:
            self._push_pull_to(src, reply=False)

    def _push_pull_to(self, dst: Addr, *, reply: bool = True, join: bool = False) -> None:
        states = [m.state() for m in self.members.values()]
        parts = split_states(self.me, states, MAX_PACKET)
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            pkt = Packet(self.me, (PushPull(part, reply=reply and last, join=join),))
            self._outbox.append(Outgoing(dst[0], dst[1], pkt))

    def _push_pull_random(self, *, alive: bool) -> None:
        wanted = (Status.ALIVE,) if alive else (Status.DEAD,)
        pool = [m for m in self.members.values() if m.node != self.me and m.status in wanted]
        if pool:
            m = self.rng.choice(pool)
            self._push_pull_to((m.addr, m.port))

    def _try_join(self) -> None:
        for seed in self._seeds:
            self._push_pull_to(seed, join=True)
        self._next_join = self.now + self._join_backoff
        self._join_backoff = min(self._join_backoff * 2, self.s.ticks(self.s.join_retry_max_ms))

    def _joined(self) -> None:
        self._next_join = None
        self._join_backoff = self.s.ticks(self.s.join_retry_min_ms)

    def _has_peers(self) -> bool:
        return any(m.status in (Status.ALIVE, Status.SUSPECT) for n, m in self.members.items() if n != self.me)

    # ------------------------------------------------------------ bookkeeping

    def _reap(self) -> None:
        """Forget tombstones after tombstone_ms; fall back to the seeds when alone."""
        horizon = self.now - self.s.ticks(self.s.tombstone_ms)
        for node in [n for n, m in self.members.items() if m.status in (Status.DEAD, Status.LEFT) and m.since < horizon]:
            del self.members[node]
        if self._seeds and self._next_join is None and not self._has_peers():
            self._next_join = self.now

    def _send(self, dst: Addr, msg: Message, first: Gossip | None = None) -> None:
        budget = self._budget - encoded_size(msg)
        gossip = self.broadcasts.take(budget, encoded_size, self._limit(), first=first, max_count=MAX_MESSAGES - 1)
        self._outbox.append(Outgoing(dst[0], dst[1], Packet(self.me, (msg, *gossip))))

    def _limit(self) -> int:
        return self.s.retransmit_limit(self.live_count())

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & MAX_SEQ
        return self._seq

    def _jittered(self, ms: int) -> int:
        """A period with up to 50% random extra, so members do not act in lockstep."""
        t = self.s.ticks(ms)
        return t + self.rng.randrange(t // 2 + 1) if t else 0

    def _event(self, m: Member, old: Status | None) -> None:
        """Every status change passes here."""
        self._live += (m.status in _LIVE) - (old in _LIVE)
        self._events.append(Event(m.node, old, m.status, m.incarnation))
