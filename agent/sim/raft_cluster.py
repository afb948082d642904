"""A seeded cluster of unchanged Raft cores (`agent.core.raft`) on a simulated
network and simulated disks, driven the way `agent.consensus` drives one core,
with the safety checkers of `agent.sim.raft_checks` watching every step.

Determinism (after TigerBeetle's VOPR and FoundationDB's simulator): one root
seed makes five child `random.Random`s, always drawn in this order: run
parameters, the network (loss, duplication, delay), faults (partitions,
crashes), the workload (proposals, reads, transfers, snapshots, membership
changes) and node cores (each core's rng is drawn from it when the node
(re)starts). Virtual time is counted in ticks of `RaftSettings.tick_ms`. Each
tick: faults and workload act, every live node ticks (in name order), then
messages due are delivered in (tick, send sequence) order, including those
sent during the delivery loop with no delay. Nothing iterates a set or a dict
in an order that could differ between runs, so the trace is a function of the
seed and the parameters, which `RaftReport.replay()` prints as a command.

The driver step (`_process`), after every tick and every delivered message,
as in `agent.consensus.Consensus._process`:

    rd = core.ready()
    send the leader's Appends                              before its own fsync (thesis 10.2.1)
    disk.write(rd.hard_state, rd.entries, rd.snapshot)     unsynced
    disk.sync()                                            durable from here
    send the other messages                                persist before send
    restore the state machine from rd.snapshot; apply rd.committed; applied_to
    answer rd.read_states
    core.advance(rd)

A crash can strike between any two of those lines: before the sync (what the
step wrote is lost and nothing was sent), after the sync but before sending,
after sending but before applying, or between steps. A restart builds a fresh
core from the durable disk only (hard state, latest snapshot, entries after
it) and a state machine restored from that snapshot. An InstallSnapshot
arrives without data (the leader's core never sends any): the receiving
driver fetches the sender's latest snapshot out of band (only if the sender is
up and reachable both ways) and steps the message with it, as
`agent.consensus` does.

Faults (the `Chaos` tick listener of scenario "random", or scripted):
message loss, duplication and delay (reordering); partitions into any groups
(isolating a node, 2|3 and 1|4 of five, three sides); one-way link cuts;
crashes at any of the points above and restarts, some after a long time (the
leader has compacted what they miss); stalls (the process freezes: no ticks,
messages wait for it); slow clocks (nodes that miss ticks). Clients write at
random nodes (the leader proposes, others forward; unapplied writes are
retried with the same uid), ask ReadIndex reads, transfer leadership, take
snapshots and compact, and add or remove one voter at a time. Settings
profiles (PROFILES) stress flow control, batching and the election variants.

The state machine (`KV`) is tiny: a dict of key -> value fed by proposals of
the form b"<uid>|<key>|<value>", deduplicated by uid (clients retry), plus
the voters of the applied CONF entries (for snapshot metadata) and a hash chain
over every applied entry, which is what the checkers compare.
"""

from __future__ import annotations

import hashlib
import random
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import cbor2

from agent.core import raft_messages as rm
from agent.consensus import early_appends_ok
from agent.core.raft_messages import Append
from agent.core.raft import HardState, NotLeader, Raft, RaftSettings, Recovered, Refused
from agent.sim.raft_checks import ROOT, Checker, LogView, chain_next

#: bytes of one encoded Raft message that the driver can still send: one datagram
#: carries agent.consensus.RAFT_MAX_PACKET = RAFT_MAX_DATAGRAM 4000 - ENVELOPE_OVERHEAD
#: 179 bytes of plaintext, a CBOR array of messages whose header it counts as 3
#: bytes (agent.consensus._pack); a bigger message is dropped ("raft_oversized_out")
RAFT_MAX_MESSAGE = 4000 - 179 - 3
CRASH_POINTS = ("between", "before_sync", "before_send", "before_apply")


def _id_slack(node: str) -> int:
    """Bytes a CBOR text string of `node` would grow by at the longest node id (64 bytes)."""
    n = len(node.encode())
    return (2 + 64) - (n + (1 if n < 24 else 2))


def split_seed(seed: int) -> dict[str, random.Random]:
    """The child rngs of one root seed, always drawn in the same order."""
    root = random.Random(seed)
    return {name: random.Random(root.getrandbits(64)) for name in ("params", "net", "faults", "work", "nodes")}


def voter_name(i: int) -> str:
    return f"n{i + 1}"


def learner_name(i: int) -> str:
    return f"l{i + 1}"


# ---------------------------------------------------------------- state machine


class KV:
    """The simulator's replicated state machine: deterministic, tiny, and with
    a hash chain over every applied entry (the same chain as `raft_checks`)."""

    __slots__ = ("index", "term", "chain", "voters", "kv", "seen")

    def __init__(self):
        self.index = 0
        self.term = 0
        self.chain = ROOT
        self.voters: tuple[str, ...] = ()
        self.kv: dict[str, bytes] = {}
        self.seen: set[int] = set()

    def apply(self, e: rm.Entry) -> None:
        self.chain = chain_next(self.chain, e.index, e.term, e.kind, e.data)
        self.index, self.term = e.index, e.term
        if e.kind == rm.EntryKind.CONF:
            change = rm.ConfChange.decode(e.data)
            vs = set(self.voters)
            (vs.add if change.op == "add" else vs.discard)(change.node)
            self.voters = tuple(sorted(vs))
        elif e.data:
            uid, key, value = parse_command(e.data)
            if uid not in self.seen:
                self.seen.add(uid)
                self.kv[key] = value

    def snapshot(self) -> bytes:
        return cbor2.dumps([self.index, self.term, self.chain, list(self.voters),
                            sorted(self.kv.items()), sorted(self.seen)])

    @staticmethod
    def restore(data: bytes) -> KV:
        index, term, chain, voters, items, seen = cbor2.loads(data)
        sm = KV()
        sm.index, sm.term, sm.chain, sm.voters = index, term, chain, tuple(voters)
        sm.kv = {k: v for k, v in items}
        sm.seen = set(seen)
        return sm

    @staticmethod
    def chain_of(data: bytes) -> bytes:
        return cbor2.loads(data)[2]


def make_command(uid: int, key: str, value: bytes) -> bytes:
    return b"%d|%s|" % (uid, key.encode()) + value


def parse_command(data: bytes) -> tuple[int, str, bytes]:
    uid, key, value = data.split(b"|", 2)
    return int(uid), key.decode(), value


# ---------------------------------------------------------------------- disk


class SimDisk:
    """A node's storage: what is durable (survives a crash) and what was
    written but not yet synced (lost by a crash). Entries follow the
    `RaftStore.save` contract: an entry at or below the last index replaces it
    and everything after it. Snapshots are durable at once (written to a temp
    file, synced, renamed, as RaftStore.save_snapshot); the newest 2 are kept."""

    def __init__(self):
        self.hs = HardState()
        self.log = LogView()  #: durable log, as the checkers see it
        self.snaps: list[tuple[rm.SnapshotMeta, bytes]] = []  #: newest last
        self.pending: list[tuple] = []
        self.syncs = 0

    def write(self, hs, entries, snap) -> None:
        if hs is not None or entries or snap is not None:
            self.pending.append((hs, entries, snap))

    def sync(self) -> tuple[int | None, list[str]]:
        """Make the pending writes durable: (first log index that changed, problems)."""
        changed: int | None = None
        problems: list[str] = []
        for hs, entries, snap in self.pending:
            if snap is not None:
                meta, data = snap
                self.save_snapshot(meta, data)
                self.log.reset(meta.index, meta.term, KV.chain_of(data))
                changed = meta.index if changed is None else min(changed, meta.index)
            if entries:
                err = self.log.append(entries)
                if err:
                    problems.append(err)
                first = entries[0].index
                changed = first if changed is None else min(changed, first)
            if hs is not None:
                self.hs = HardState(hs.term, hs.vote, hs.commit)
        if self.pending:
            self.syncs += 1
        self.pending = []
        return changed, problems

    def drop_unsynced(self) -> int:
        n = len(self.pending)
        self.pending = []
        return n

    def save_snapshot(self, meta: rm.SnapshotMeta, data: bytes) -> None:
        self.snaps = [s for s in self.snaps if s[0].index != meta.index][-1:] + [(meta, data)]

    def latest_snapshot(self) -> tuple[rm.SnapshotMeta, bytes] | None:
        return self.snaps[-1] if self.snaps else None

    def compact(self, index: int) -> None:
        snap = self.latest_snapshot()
        if snap is not None:
            self.log.compact(min(index, snap[0].index))

    def recover(self) -> tuple[Recovered, bytes | None]:
        """What a restart finds: (Recovered for the core, snapshot data)."""
        snap = self.latest_snapshot()
        data = None
        meta = None
        if snap is not None:
            meta, data = snap
            if self.log.base_index < meta.index <= self.log.last_index:
                self.log.compact(meta.index)
            elif self.log.base_index != meta.index:
                self.log.reset(meta.index, meta.term, KV.chain_of(data))
        hs = HardState(self.hs.term, self.hs.vote, self.hs.commit)
        return Recovered(hs, meta, list(self.log.entries)), data


# ------------------------------------------------------------------- network


@dataclass(slots=True)
class NetStats:
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    cut: int = 0
    to_down: int = 0
    oversize: int = 0
    max_bytes: int = 0


class RaftNet:
    """Datagrams between named nodes: seeded loss, duplication and delay
    (reordering), partitions into groups, nodes going down and up. Every send
    draws the same four random numbers whatever happens to the message, so the
    draws stay aligned between runs that differ in one message's fate."""

    def __init__(self, rng: random.Random, *, loss=0.0, dup=0.0, delay=(0, 1)):
        self.rng = rng
        self.loss = loss
        self.dup = dup
        self.delay = delay
        self.now = 0
        self.stats = NetStats()
        self._queue: list[tuple[int, int, str, str, object]] = []
        self._seq = 0
        self._up_since: dict[str, int] = {}
        self._group: dict[str, int] | None = None
        self._held: dict[str, int] = {}  #: stalled node -> tick until which its messages wait
        self._oneway: set[tuple[str, str]] = set()

    def hold(self, node: str, until: int) -> None:
        """The node's process is stalled: what arrives for it waits until `until`."""
        self._held[node] = until

    def release(self, node: str) -> None:
        self._held.pop(node, None)

    def up(self, node: str) -> None:
        self._up_since[node] = self._seq

    def down(self, node: str) -> None:
        self._up_since.pop(node, None)

    def partition(self, groups) -> None:
        """Only members of one group talk; unnamed nodes form one more group."""
        self._group = {n: i for i, g in enumerate(groups) for n in g}

    def cut(self, src: str, dst: str) -> None:
        """One-way cut: what src sends to dst is lost (the other way still works)."""
        self._oneway.add((src, dst))

    def heal(self) -> None:
        self._group = None
        self._oneway.clear()

    @property
    def partitioned(self) -> bool:
        return self._group is not None or bool(self._oneway)

    @property
    def asymmetric(self) -> bool:
        return bool(self._oneway)

    def reachable(self, a: str, b: str) -> bool:
        """Does what a sends reach b?"""
        g = self._group
        return (g is None or g.get(a, -1) == g.get(b, -1)) and (a, b) not in self._oneway

    def side(self, node: str, everyone: list[str]) -> frozenset:
        """The nodes `node` can exchange messages with, both ways."""
        return frozenset(n for n in everyone if self.reachable(node, n) and self.reachable(n, node))

    def send(self, src: str, dst: str, msg) -> None:
        import heapq

        st = self.stats
        st.sent += 1
        rng = self.rng
        r, d, r2, d2 = rng.random(), rng.randint(*self.delay), rng.random(), rng.randint(*self.delay)
        if r < self.loss:
            st.lost += 1
            return
        heapq.heappush(self._queue, (self.now + d, self._seq, src, dst, msg))
        self._seq += 1
        if r2 < self.dup:
            st.duplicated += 1
            heapq.heappush(self._queue, (self.now + d2, self._seq, src, dst, msg))
            self._seq += 1

    def pop(self, now: int):
        """The next message due by `now` as (src, dst, msg), or None."""
        import heapq

        q = self._queue
        st = self.stats
        while q and q[0][0] <= now:
            _, seq, src, dst, msg = heapq.heappop(q)
            held = self._held.get(dst)
            if held is not None and held > now:
                heapq.heappush(q, (held, seq, src, dst, msg))
                continue
            since = self._up_since.get(dst)
            if since is None or seq < since:
                st.to_down += 1
                continue
            if not self.reachable(src, dst):
                st.cut += 1
                continue
            st.delivered += 1
            return src, dst, msg
        return None

    def pending(self) -> int:
        return len(self._queue)


# --------------------------------------------------------------------- nodes


@dataclass
class SimNode:
    name: str
    disk: SimDisk = field(default_factory=SimDisk)
    core: Raft | None = None
    sm: KV | None = None
    up: bool = False
    boot: int = 0
    applied: int = 0
    crash_point: str | None = None  #: a crash armed for the node's next driver step that can lose something there
    crash_by: int = 0  #: tick by which an armed crash happens anyway (between steps)
    stalled_until: int = 0  #: the process is frozen (no ticks, no messages) before this tick
    skip: float = 0.0  #: probability that the node misses a tick (a slow or starved clock)
    restart_at: int | None = None
    voters: tuple[str, ...] = ()
    role: str = ""
    term: int = 0
    commit: int = 0  #: at the last observation
    reads: dict[bytes, int] = field(default_factory=dict)  #: ctx -> read index, served once applied reaches it


class SimError(Exception):
    """The run cannot go on (the core raised, or a contract was broken)."""


class RaftCluster:
    """Nodes, network, disks and checkers. Drive it with `tick()` / `run()` /
    `run_until()`; inject faults with `partition`, `heal`, `crash`, `restart`;
    act as clients with `propose`, `read`, `transfer`, `conf_change`,
    `snapshot`."""

    def __init__(self, seed: int, voters: list[str], learners: list[str] = (), *,
                 settings: RaftSettings | None = None, loss: float = 0.0, dup: float = 0.0,
                 delay: tuple[int, int] = (0, 1), codec: bool = True, trace: bool = False):
        self.seed = seed
        self.settings = settings or RaftSettings()
        rngs = split_seed(seed)
        self.rng_params = rngs["params"]
        self.rng_faults = rngs["faults"]
        self.rng_work = rngs["work"]
        self._rng_nodes = rngs["nodes"]
        self.net = RaftNet(rngs["net"], loss=loss, dup=dup, delay=delay)
        self.codec = codec
        self.checker = Checker()
        self.now = 0
        self.names = list(voters) + list(learners)
        self.nodes: dict[str, SimNode] = {n: SimNode(n) for n in self.names}
        self.order = [self.nodes[n] for n in self.names]
        self.trace: list[str] | None = [] if trace else None
        self._digest = hashlib.blake2b(digest_size=16)
        self.events = 0
        self.uid = 0
        self.proposals: dict[int, tuple[int, str]] = {}  #: uid -> (tick submitted, node)
        self.committed_uids: set[int] = set()  #: uids applied by some node
        self._commands: dict[int, bytes] = {}
        self.errors: list[str] = []
        self._error_kinds: set[str] = set()
        self.stats = {"proposed": 0, "forwarded": 0, "refused": 0, "reads": 0, "reads_ok": 0, "reads_refused": 0,
                      "reads_served": 0, "snapshots": 0, "installs": 0, "snapshot_fetch_failed": 0, "conf_changes": 0,
                      "conf_refused": 0, "transfers": 0, "crashes": 0, "lost_unsynced": 0, "partitions": 0,
                      "steps": 0, "elections": 0}
        self.stop_on_violation = True
        self.listeners: list[Callable[[str, SimNode, object], None]] = []  #: called at the start of every tick
        self.step_hooks: list[Callable[[SimNode], None]] = []  #: called after every driver step (scripted scenarios)
        boot = Raft.bootstrap_entries(sorted(voters))
        for n in voters:
            sn = self.nodes[n]
            err = sn.disk.log.append(boot)
            assert err is None, err
            self.checker.log_changed(n, sn.disk.log, 1)
        for n in self.names:
            self.restart(n, quiet=True)

    # ------------------------------------------------------------ recording

    def record(self, node: str, what: str) -> None:
        line = f"{self.now:6d} {node:4} {what}"
        self.events += 1
        self._digest.update(line.encode())
        if self.trace is not None:
            self.trace.append(line)

    def digest(self) -> str:
        return self._digest.hexdigest()

    @property
    def violations(self) -> list[str]:
        return self.errors + self.checker.violations

    @property
    def failed(self) -> bool:
        return bool(self.errors or self.checker.violations)

    def _error(self, what: str) -> None:
        if what in self._error_kinds or len(self.errors) >= 20:
            return  # the first of each, with its tick
        self._error_kinds.add(what)
        self.errors.append(f"tick {self.now} {what}")
        self.record("-", f"ERROR {what.splitlines()[0]}")

    # ---------------------------------------------------------------- nodes

    def live(self) -> list[SimNode]:
        return [sn for sn in self.order if sn.up]

    def leaders(self) -> list[SimNode]:
        return [sn for sn in self.order if sn.up and sn.core.role == "leader"]

    def available(self) -> list[SimNode]:
        """Live nodes whose process is not stalled (clients can talk to them)."""
        now = self.now
        return [sn for sn in self.order if sn.up and sn.stalled_until <= now]

    def stall(self, name: str, ticks: int) -> None:
        """Freeze a node's process (CPU starvation, a long GC, a stuck SD card):
        no ticks, no message handling; messages wait for it."""
        sn = self.nodes[name]
        if not sn.up:
            return
        sn.stalled_until = self.now + ticks
        self.net.hold(name, sn.stalled_until)
        self.record(name, f"stall for {ticks} ticks")

    def unstall(self, name: str) -> None:
        self.nodes[name].stalled_until = 0
        self.net.release(name)

    def leader(self) -> SimNode | None:
        """The available leader of the highest term, if any."""
        best = None
        now = self.now
        for sn in self.order:
            if not sn.up or sn.stalled_until > now or sn.core.role != "leader":
                continue
            if best is None or sn.core.term > best.core.term:
                best = sn
        return best

    def side(self, name: str) -> frozenset:
        return self.net.side(name, self.names)

    def _set_learners(self, sn: SimNode) -> None:
        vs = set(sn.core.voters)
        sn.core.set_learners({n for n in self.names if n != sn.name and n not in vs})

    def crash(self, name: str, point: str = "between") -> None:
        """Crash a node now ("between" driver steps) or at a point inside its next
        driver step that has anything to do (see CRASH_POINTS)."""
        sn = self.nodes[name]
        if not sn.up:
            return
        if point == "between":
            self._crash_now(sn, "between steps")
        else:
            sn.crash_point = point
            sn.crash_by = self.now + 2 * self.settings.election_ticks

    def _crash_now(self, sn: SimNode, where: str) -> None:
        lost = sn.disk.drop_unsynced()
        self.stats["crashes"] += 1
        self.stats["lost_unsynced"] += lost
        sn.up = False
        sn.crash_point = None
        self.unstall(sn.name)
        sn.core = None
        sn.sm = None
        sn.reads.clear()
        self.net.down(sn.name)
        self.checker.node_down(sn.name)
        self.record(sn.name, f"crash {where}" + (f" (lost {lost} unsynced writes)" if lost else ""))

    def restart(self, name: str, quiet: bool = False) -> None:
        """Start (or restart) a node from its durable disk alone."""
        sn = self.nodes[name]
        if sn.up:
            return
        rec, data = sn.disk.recover()
        self.checker.restarted(name, sn.disk.log)
        sn.sm = KV.restore(data) if data is not None else KV()
        sn.applied = rec.snapshot.index if rec.snapshot is not None else 0
        if data is not None:
            self.checker.restored(name, sn.applied, sn.sm.chain)
        sn.boot += 1
        sn.restart_at = None
        try:
            sn.core = Raft(name, self.settings, random.Random(self._rng_nodes.getrandbits(64)), rec)
            sn.core.applied_to(sn.applied)
        except Exception:
            self._error(f"core raised on restart of {name}:\n{traceback.format_exc(limit=-4)}")
            raise SimError(self.errors[-1]) from None
        sn.up = True
        sn.voters = ()
        sn.commit = 0
        sn.role, sn.term, sn.leader = "", -1, None
        self.net.up(name)
        if not quiet:
            self.record(name, f"restart boot {sn.boot} term {rec.hard_state.term} commit {rec.hard_state.commit} "
                        f"snapshot {sn.applied} last {sn.disk.log.last_index}")
        self._process(sn)

    # --------------------------------------------------------------- faults

    def partition(self, groups: list[list[str]]) -> None:
        self.net.partition(groups)
        self.stats["partitions"] += 1
        self._new_epoch()
        self.record("-", "partition " + " | ".join(",".join(sorted(g)) for g in groups))

    def cut_links(self, pairs: list[tuple[str, str]]) -> None:
        """Asymmetric faults: each (src, dst) loses what src sends to dst."""
        for a, b in pairs:
            self.net.cut(a, b)
        self.stats["partitions"] += 1
        self._new_epoch()
        self.record("-", "one-way cuts " + " ".join(f"{a}->{b}" for a, b in pairs))

    def isolate(self, name: str) -> None:
        self.partition([[name], [n for n in self.names if n != name]])

    def heal(self) -> None:
        if self.net.partitioned:
            self.net.heal()
            self._new_epoch()
            self.record("-", "heal")

    def _new_epoch(self) -> None:
        sides: dict[frozenset, list[tuple[str, ...]]] = {}
        for sn in self.order:
            s = self.side(sn.name)
            sides.setdefault(s, [])
            if sn.up:
                sides[s].append(tuple(sn.core.voters))
        self.checker.new_epoch(sorted(sides.items(), key=lambda kv: sorted(kv[0])))

    # ------------------------------------------------------------- clients

    def propose(self, name: str, key: str | None = None, value: bytes | None = None) -> int | None:
        """A client write at node `name` (leader: propose; others: forward).
        Returns the uid of the command (to wait for), or None if refused at once."""
        sn = self.nodes[name]
        if not sn.up or sn.stalled_until > self.now:
            return None
        self.uid += 1
        uid = self.uid
        if key is None:
            key = f"k{self.rng_work.randrange(8)}"
        if value is None:
            value = b"v%d" % uid
        data = make_command(uid, key, value)
        if not self._submit(sn, data):
            return None
        self.proposals[uid] = (self.now, name)
        return uid

    def retry(self, uid: int, name: str) -> bool:
        """The client retries a write (same uid, so the state machine dedups)."""
        sn = self.nodes[name]
        if not sn.up or sn.stalled_until > self.now or uid not in self.proposals:
            return False
        data = self._command_of(uid)
        return data is not None and self._submit(sn, data)

    def _command_of(self, uid: int) -> bytes | None:
        return self._commands.get(uid)

    def _submit(self, sn: SimNode, data: bytes) -> bool:
        core = sn.core
        try:
            if core.role == "leader":
                index = core.propose(data)
                self.stats["proposed"] += 1
                self.record(sn.name, f"propose {data[:24]!r} -> index {index}")
            else:
                core.forward(data)
                self.stats["forwarded"] += 1
                self.record(sn.name, f"forward {data[:24]!r}")
        except (NotLeader, Refused) as exc:
            self.stats["refused"] += 1
            self.record(sn.name, f"refused {data[:24]!r}: {type(exc).__name__}")
            return False
        except Exception:
            self._error(f"core raised on propose at {sn.name}:\n{traceback.format_exc(limit=-4)}")
            return False
        uid = parse_command(data)[0]
        self._commands[uid] = data
        self._process(sn)
        return True

    def read(self, name: str) -> bytes | None:
        """A linearizable read at node `name` (ReadIndex)."""
        sn = self.nodes[name]
        if not sn.up or sn.stalled_until > self.now:
            return None
        self.stats["reads"] += 1
        ctx = b"r%d" % self.stats["reads"]
        self.checker.read_requested(name, ctx)
        try:
            sn.core.read_index(ctx)
        except (NotLeader, Refused):
            self.stats["reads_refused"] += 1
            return None
        except Exception:
            self._error(f"core raised on read_index at {name}:\n{traceback.format_exc(limit=-4)}")
            return None
        self._process(sn)
        return ctx

    def transfer(self, target: str | None) -> bool:
        ld = self.leader()
        if ld is None:
            return False
        self.stats["transfers"] += 1
        self.record(ld.name, f"transfer leadership to {target or 'best'}")
        try:
            ld.core.transfer_leadership(target)
        except (NotLeader, Refused, ValueError) as exc:
            self.record(ld.name, f"transfer refused: {exc}")
            return False
        except Exception:
            self._error(f"core raised on transfer_leadership at {ld.name}:\n{traceback.format_exc(limit=-4)}")
            return False
        self._process(ld)
        return True

    def conf_change(self, op: str, node: str) -> bool:
        """Ask the current leader to add or remove one voter."""
        ld = self.leader()
        return ld is not None and self.conf_change_at(ld.name, op, node)

    def conf_change_at(self, name: str, op: str, node: str) -> bool:
        """Ask node `name` (if up; a leader or not) to add or remove one voter."""
        ld = self.nodes[name]
        if not ld.up:
            return False
        try:
            index = ld.core.propose_conf(rm.ConfChange(op, node))
        except (NotLeader, Refused) as exc:
            self.stats["conf_refused"] += 1
            self.record(ld.name, f"conf {op} {node} refused: {exc}")
            return False
        except Exception:
            self._error(f"core raised on propose_conf at {ld.name}:\n{traceback.format_exc(limit=-4)}")
            return False
        self.stats["conf_changes"] += 1
        self.record(ld.name, f"conf {op} {node} -> index {index}")
        self._process(ld)
        return True

    def snapshot(self, name: str, keep: int = 0) -> bool:
        """The driver of `name` snapshots its state machine at `applied` and
        compacts the log, keeping `keep` entries before the snapshot."""
        sn = self.nodes[name]
        if not sn.up or sn.applied == 0 or sn.stalled_until > self.now:
            return False
        latest = sn.disk.latest_snapshot()
        if latest is not None and latest[0].index >= sn.applied:
            return False
        sm = sn.sm
        meta = rm.SnapshotMeta(sn.applied, sm.term, sm.voters)
        have = sn.disk.log.chain_at(sn.applied)
        if have is not None and have != sm.chain:
            self._error(f"{name}'s state machine at {sn.applied} differs from its own log")
        core = sn.core
        if core.last_index >= sn.applied >= core.log.first_index - 1:
            if (core.term_at(sn.applied), core.voters_at(sn.applied)) != (sm.term, tuple(sorted(sm.voters))):
                self._error(f"{name}: the log says term {core.term_at(sn.applied)}, voters {core.voters_at(sn.applied)} "
                            f"at applied index {sn.applied}; the applied entries say term {sm.term}, voters {sm.voters}")
        sn.disk.save_snapshot(meta, sm.snapshot())
        upto = max(sn.applied - keep, 0)
        compacted = upto > sn.disk.log.base_index
        if compacted:
            try:
                sn.core.compact(rm.SnapshotMeta(upto, sn.core.term_at(upto), sn.core.voters_at(upto)))
            except Exception:
                self._error(f"core raised on compact({upto}) at {name}:\n{traceback.format_exc(limit=-4)}")
                return False
            sn.disk.compact(upto)
        self.stats["snapshots"] += 1
        self.record(name, f"snapshot at {sn.applied} (term {sm.term})"
                    + (f", log compacted to {upto}" if compacted else ", log kept"))
        self._process(sn)
        return True

    def applied_everywhere(self, uid: int) -> bool:
        return all(uid in sn.sm.seen for sn in self.order if sn.up)

    # ----------------------------------------------------------------- time

    def tick(self) -> None:
        self.now += 1
        self.net.now = self.now
        self.checker.now = self.now
        for sn in self.order:
            if not sn.up and sn.restart_at is not None and sn.restart_at <= self.now:
                self.restart(sn.name)
        for f in self.listeners:
            f("tick", None, None)
        now = self.now
        for sn in self.order:
            if sn.up:
                if sn.stalled_until > now or (sn.skip and self.rng_faults.random() < sn.skip):
                    continue
                try:
                    sn.core.tick()
                except Exception:
                    self._error(f"core raised on tick at {sn.name}:\n{traceback.format_exc(limit=-4)}")
                    raise SimError(self.errors[-1]) from None
                self._process(sn)
        pop = self.net.pop
        nodes = self.nodes
        guard = 0
        while (item := pop(self.now)) is not None:
            src, dst, msg = item
            self._deliver(nodes[dst], msg)
            guard += 1
            if guard > 200_000:
                self._error("more than 200000 messages delivered in one tick (a zero-delay loop?)")
                raise SimError(self.errors[-1])
        for sn in self.order:
            if sn.crash_point is not None and self.now >= sn.crash_by:
                self._crash_now(sn, "between steps (the armed crash found no step to strike)")
            if sn.reads and sn.up:  # a ReadIndex read is served once the state machine got there
                for ctx in [x for x, i in sn.reads.items() if i <= sn.applied]:
                    del sn.reads[ctx]
                    self.stats["reads_served"] += 1
        if self.stop_on_violation and self.failed:
            raise SimError(self.violations[0])

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.tick()

    def run_until(self, pred: Callable[[], bool], limit: int) -> int | None:
        """Tick until pred() holds; the ticks it took, or None after `limit`."""
        start = self.now
        if pred():
            return 0
        while self.now - start < limit:
            self.tick()
            if pred():
                return self.now - start
        return None

    # --------------------------------------------------------------- driver

    def _deliver(self, sn: SimNode, msg) -> None:
        if type(msg) is rm.InstallSnapshot and msg.data is None:
            # the driver fetches the sender's latest snapshot out of band, then steps it
            if msg.meta.index <= sn.applied:
                return
            src = self.nodes[msg.frm]
            fetch = src.up and self.net.reachable(msg.frm, sn.name) and self.net.reachable(sn.name, msg.frm)
            snap = src.disk.latest_snapshot() if fetch else None
            if snap is None:
                self.stats["snapshot_fetch_failed"] += 1
                return
            msg = rm.InstallSnapshot(msg.frm, msg.to, msg.term, snap[0], snap[1])
        try:
            sn.core.step(msg)
        except Exception:
            self._error(f"core raised stepping {type(msg).__name__} from {msg.frm} at {sn.name}: {msg!r:.300}\n"
                        f"{traceback.format_exc(limit=-4)}")
            raise SimError(self.errors[-1]) from None
        self._process(sn)

    def _send(self, sn: SimNode, msg) -> None:
        if msg.frm != sn.name:
            self._error(f"{sn.name} sent a message from {msg.frm}: {msg!r:.200}")
            return
        t = type(msg)
        if t is rm.VoteResp and not msg.reject:
            self.checker.vote_granted(sn.name, msg.term, msg.to)
        hs = sn.disk.hs
        self.checker.message_sent(sn.name, t.__name__, msg.term, msg.to, max(hs.term, sn.disk.log.last_term), hs.vote)
        if self.codec:
            raw = cbor2.dumps(msg.to_wire())
            # sized as if both node ids were 64 bytes long (the most a node id may be):
            # the simulator's ids are short, real ones ("pi-3-a1b2c3...") need not be
            size = len(raw) + _id_slack(msg.frm) + _id_slack(msg.to)
            st = self.net.stats
            if size > st.max_bytes:
                st.max_bytes = size
            if size > RAFT_MAX_MESSAGE:
                st.oversize += 1
                self._error(f"datagram size: {sn.name} sent a {type(msg).__name__} of {size} bytes with 64-byte "
                            f"node ids ({len(raw)} with its own), more than the {RAFT_MAX_MESSAGE} a Raft datagram "
                            f"carries: the driver drops it")
                return
            try:
                msg = rm.decode(cbor2.loads(raw))
            except Exception as exc:
                self._error(f"wire: {sn.name}'s {type(msg).__name__} does not decode: {exc!r}")
                return
        self.net.send(sn.name, msg.to, msg)

    def _process(self, sn: SimNode) -> None:
        core = sn.core
        guard = 0
        while sn.up and core.has_ready():
            guard += 1
            if guard > 1000:
                self._error(f"{sn.name} still has a Ready after 1000 rounds")
                raise SimError(self.errors[-1])
            try:
                rd = core.ready()
            except Exception:
                self._error(f"core raised in ready() at {sn.name}:\n{traceback.format_exc(limit=-4)}")
                raise SimError(self.errors[-1]) from None
            self._handle(sn, core, rd)
        if sn.up:
            self._observe(sn)
            for f in self.step_hooks:
                f(sn)

    def _handle(self, sn: SimNode, core: Raft, rd) -> None:
        ck = self.checker
        name = sn.name
        self.stats["steps"] += 1
        point = sn.crash_point
        if point is not None:  # strike where the step has something to lose there
            if point == "before_sync" and not (rd.hard_state is not None or rd.entries or rd.snapshot is not None):
                point = None
            elif point == "before_send" and not rd.messages:
                point = None
            elif point == "before_apply" and not (rd.committed or rd.snapshot is not None):
                point = None
        disk = sn.disk
        # As the driver does: a leader's Appends leave before its own fsync
        # (Raft thesis 10.2.1); a crash before the sync then loses entries that
        # followers may already hold.
        early = [m for m in rd.messages if type(m) is Append] if early_appends_ok(rd, disk.hs) else []
        for m in early:
            self._send(sn, m)
        disk.write(rd.hard_state, rd.entries, rd.snapshot)
        if point == "before_sync":
            self._crash_now(sn, "before the sync")
            return
        if disk.pending:
            last_before = disk.log.last_index
            changed, problems = disk.sync()
            for p in problems:
                self._error(f"{name} asked to persist bad entries: {p}")
            if changed is not None:
                ck.log_changed(name, disk.log, changed)
            if rd.hard_state is not None:
                hs = rd.hard_state
                ck.hard_state(name, hs.term, hs.vote, hs.commit)
                if hs.commit > max(disk.log.last_index, 0) and hs.commit > disk.log.base_index:
                    self._error(f"{name} persisted commit {hs.commit} beyond its log (last {disk.log.last_index})")
            if rd.entries and core.role == "leader":
                ck.leader_wrote(name, core.term, rd.entries[0].index, last_before, [e.term for e in rd.entries])
            if rd.entries and core.role == "leader" and not self.net.asymmetric:
                # (with one-way cuts a follower that got the entry may reach a majority
                # and commit it as a later leader: the property holds for clean splits only)
                t = core.term
                mine = [(e.index, e.term) for e in rd.entries if e.term == t]
                if mine:
                    ck.leader_appended(name, mine, self.side(name), tuple(core.voters))
        if point == "before_send":
            self._crash_now(sn, "after the sync, before sending")
            return
        for m in rd.messages:
            if not early or type(m) is not Append:
                self._send(sn, m)
        if point == "before_apply":
            self._crash_now(sn, "after sending, before applying")
            return
        if rd.snapshot is not None:
            meta, data = rd.snapshot
            sn.sm = KV.restore(data)
            sn.applied = meta.index
            disk.compact(meta.index)
            ck.restored(name, meta.index, sn.sm.chain)
            self.stats["installs"] += 1
            self.record(name, f"installed snapshot at {meta.index} (term {meta.term})")
        if rd.committed:
            sm = sn.sm
            log = disk.log
            for e in rd.committed:
                if e.index != sn.applied + 1 or e.index > core.commit:
                    self._error(f"{name} was handed entry {e.index} to apply after {sn.applied}, "
                                f"commit {core.commit}")
                    raise SimError(self.errors[-1])
                sm.apply(e)
                sn.applied = e.index
                if e.kind == 0 and e.data:
                    self.committed_uids.add(parse_command(e.data)[0])
                ck.applied_entry(name, e.index, e.term, sm.chain, log)
            try:
                core.applied_to(sn.applied)
            except Exception:
                self._error(f"core raised in applied_to at {name}:\n{traceback.format_exc(limit=-4)}")
                raise SimError(self.errors[-1]) from None
        for rs in rd.read_states:
            ck.read_answered(name, rs.ctx, rs.index)
            if rs.index >= 0:
                self.stats["reads_ok"] += 1
                sn.reads[rs.ctx] = rs.index
            else:
                self.stats["reads_refused"] += 1
        if rd.soft_state is not None:
            role, leader, term = rd.soft_state
            self.record(name, f"{role} term {term} leader {leader}")
            if role == "leader":
                self.stats["elections"] += 1
        try:
            core.advance(rd)
        except Exception:
            self._error(f"core raised in advance() at {name}:\n{traceback.format_exc(limit=-4)}")
            raise SimError(self.errors[-1]) from None

    def _observe(self, sn: SimNode) -> None:
        """The checks after every driver step of a live node."""
        core = sn.core
        ck = self.checker
        voters = core.voters
        if voters != sn.voters:
            sn.voters = tuple(voters)
            self._set_learners(sn)
            ck.config_seen(self.side(sn.name), sn.voters)
        role, term = core.role, core.term
        ck.role(sn.name, role, term, sn.voters, sn.disk.log)
        commit = core.commit
        if role == "leader" and commit > sn.commit:
            self.record(sn.name, f"commit {commit}")
        sn.commit = commit
        ck.commit(sn.name, commit, sn.disk.log, role, term)
        last = core.last_index
        if last != sn.disk.log.last_index:
            self._error(f"{sn.name}'s core has last index {last} but its durable log ends at "
                        f"{sn.disk.log.last_index} (something was not handed to persist)")
        sn.role, sn.term = role, term


# ----------------------------------------------------------------- scenarios


@dataclass
class RaftParams:
    """Everything a run depends on. Fields left None are drawn from the seed
    (always all of them, in the same order, so fixing one does not shift the
    others)."""

    scenario: str = "random"
    seed: int = 0
    nodes: int | None = None  #: voters at the start (3, 5 or 7)
    learners: int | None = None  #: non-voting members at the start
    steps: int | None = None  #: ticks of the faulty phase
    loss: float | None = None
    dup: float | None = None
    delay: tuple[int, int] | None = None  #: one-way delay LO:HI ticks (HI > LO reorders)
    chaos: float | None = None  #: multiplies the rate of every fault and client action
    codec: bool = True  #: every message through to_wire / CBOR / decode, size-checked
    profile: int | None = None  #: index into PROFILES: settings that stress another code path
    overrides: tuple[tuple[str, int], ...] = ()  #: RaftSettings fields replaced (after the profile)

    def settings(self) -> RaftSettings:
        return make_settings(self.profile or 0, self.overrides)

    def replay(self) -> str:
        cmd = (f"python -m agent.sim.raft_main --scenario {self.scenario} --seed {self.seed} --nodes {self.nodes}"
               f" --learners {self.learners} --steps {self.steps} --loss {self.loss} --dup {self.dup}"
               f" --delay {self.delay[0]}:{self.delay[1]}"  # type: ignore[index]
               f" --chaos {self.chaos} --profile {self.profile}")
        if not self.codec:
            cmd += " --no-codec"
        for k, v in self.overrides:
            cmd += f" --set {k}={v}"
        return cmd


#: RaftSettings variations a run draws from its seed (index 0, the defaults, half
#: the time): tiny batches and windows (flow control, probing, batching by
#: bytes), slow heartbeats, and check-quorum / pre-vote off (other election paths)
PROFILES: list[dict[str, int]] = [
    {},
    {"max_append_entries": 1, "max_inflight": 8},
    {"max_append_entries": 4, "max_append_bytes": 300, "max_inflight": 2},
    {"heartbeat_ticks": 3, "election_ticks": 10, "learner_heartbeat_ticks": 7},
    {"check_quorum": 0},
    {"check_quorum": 0, "pre_vote": 0},
    {"max_append_entries": 1, "max_inflight": 1},  # not drawn: scenario figure8 (one entry per round trip)
]
DRAWN_PROFILES = 6  #: random runs draw from PROFILES[:DRAWN_PROFILES]
_BOOL_SETTINGS = {f.name for f in fields(RaftSettings) if f.type in (bool, "bool")}


def make_settings(profile: int, overrides=()) -> RaftSettings:
    kw = {**PROFILES[profile], **dict(overrides)}
    return RaftSettings(**{k: bool(v) if k in _BOOL_SETTINGS else v for k, v in kw.items()})


#: per scenario: default (nodes, learners, steps) or None to draw; a drawn field is
#: drawn anyway and replaced, so the other draws stay put
SCENARIO_DEFAULTS: dict[str, dict] = {
    "random": {},
    # (delay at most 1 tick: the majority side must elect within the run, and with all
    # three of three votes needed and a round trip near the election timeout, elections
    # can thrash for a long time: 0-3 ticks of delay and 13% loss give p99 128 ticks)
    "partition23": {"nodes": 5, "learners": 0, "steps": 200, "profile": 0, "delay": (0, 1)},
    "partition14": {"nodes": 5, "learners": 0, "steps": 200, "profile": 0, "delay": (0, 1)},
    "leader_crash": {"nodes": 5, "steps": 300},
    "unsynced_restart": {"nodes": 3, "learners": 0, "steps": 300},
    "snapshot_catchup": {"nodes": 5, "learners": 1, "steps": 300},
    "conf_partition": {"nodes": 5, "learners": 2, "steps": 300},
    "figure8": {"nodes": 5, "learners": 0, "steps": 100, "loss": 0.0, "dup": 0.0, "delay": (0, 0), "profile": 6},
    "grow_from_one": {"nodes": 1, "learners": 4, "steps": 300},
    "full_restart": {"learners": 1, "steps": 300},
    "big_entry": {"nodes": 3, "learners": 0, "steps": 50, "loss": 0.0, "dup": 0.0, "profile": 0},
}


def resolve(p: RaftParams) -> RaftParams:
    r = split_seed(p.seed)["params"]
    drawn = {
        # 1-2 voters and some learners: the auto-voter bootstrap (one voter, grown one at a time)
        "nodes": r.choices((1, 2, 3, 5, 7), (4, 4, 30, 47, 15))[0],
        "learners": r.choice((0, 0, 1, 2)),
        "steps": 300,
        "loss": round(r.uniform(0.0, 0.15), 3),
        "dup": round(r.choice((0.0, r.uniform(0.0, 0.05))), 3),
        "delay": (0, r.choice((0, 1, 1, 2, 3))),
        "chaos": round(r.uniform(0.5, 2.0), 2),
        "profile": 0 if r.random() < 0.5 else r.randrange(1, DRAWN_PROFILES),
    }
    if drawn["nodes"] <= 2:
        drawn["learners"] += 2
    drawn.update(SCENARIO_DEFAULTS[p.scenario])
    out = RaftParams(**{f.name: getattr(p, f.name) for f in fields(p)})
    for k, v in drawn.items():
        if getattr(out, k) is None:
            setattr(out, k, v)
    out.overrides = tuple(out.overrides)
    return out


@dataclass
class RaftReport:
    params: RaftParams
    violations: list[str] = field(default_factory=list)
    metrics: dict[str, object] = field(default_factory=dict)
    digest: str = ""
    events: int = 0
    ticks: int = 0
    cluster: RaftCluster | None = field(default=None, repr=False)

    def replay(self) -> str:
        return self.params.replay()

    def failure(self) -> str:
        p = self.params
        lines = [f"raft scenario {p.scenario} seed={p.seed}: {len(self.violations)} violation(s)"]
        lines += [f"  - {v}" for v in self.violations[:10]]
        lines.append(f"replay: {self.replay()} --trace")
        return "\n".join(lines)

    def summary(self) -> str:
        p = self.params
        lines = [f"raft scenario {p.scenario}  seed={p.seed}  voters {p.nodes}  learners {p.learners}  steps {p.steps}"
                 f"  loss {p.loss}  dup {p.dup}  delay {p.delay[0]}-{p.delay[1]}  chaos {p.chaos}"  # type: ignore[index]
                 f"  profile {p.profile}  codec {'on' if p.codec else 'off'}" + "".join(f" {k}={v}" for k, v in p.overrides),
                 f"virtual time {self.ticks} ticks  events {self.events}  trace digest {self.digest}"]
        for k, v in self.metrics.items():
            lines.append(f"  {k}: {v:.2f}" if isinstance(v, float) else f"  {k}: {v}")
        lines.append("OK" if not self.violations else "FAILED")
        lines += [f"  - {v}" for v in self.violations]
        if self.violations:
            lines.append(f"seed={p.seed}")
            lines.append(f"replay: {self.replay()} --trace")
        return "\n".join(lines)


def expect(report: RaftReport) -> None:
    """Assert that a run kept every property; the message names the seed and
    the command that replays it."""
    if report.violations:
        raise AssertionError(report.failure())


class replay_on_failure:
    """Context manager: an AssertionError inside gets the seed and replay command."""

    def __init__(self, report: RaftReport):
        self.report = report

    def __enter__(self) -> RaftReport:
        return self.report

    def __exit__(self, typ, exc, tb) -> bool:
        if typ is not None and issubclass(typ, AssertionError):
            raise AssertionError(f"{exc}\nseed={self.report.params.seed}\nreplay: {self.report.replay()} --trace") from exc
        return False


def liveness_bound(s: RaftSettings) -> int:
    """Ticks allowed, after everything healed, for one stable leader, equal commit
    indexes everywhere, and then for a fresh proposal to be applied everywhere:
    20 election timeouts (the timeout is drawn from [E, 2E-1] ticks)."""
    return 20 * s.election_ticks


def run_raft(scenario: str = "random", seed: int = 0, *, trace: bool = False, **overrides) -> RaftReport:
    """Run one scenario; never raises for a property violation (see
    RaftReport.violations). `overrides` fix RaftParams fields."""
    p = resolve(RaftParams(scenario, seed, **overrides))
    settings = p.settings()
    voters = [voter_name(i) for i in range(p.nodes)]  # type: ignore[arg-type]
    learners = [learner_name(i) for i in range(p.learners)]  # type: ignore[arg-type]
    rep = RaftReport(p)
    c = None
    try:
        c = RaftCluster(p.seed, voters, learners, settings=settings, loss=p.loss, dup=p.dup,  # type: ignore[arg-type]
                        delay=p.delay,  # type: ignore[arg-type]
                        codec=p.codec, trace=trace)
        rep.cluster = c
        SCENARIOS[scenario](c, p, rep)
    except SimError:
        pass
    except Exception:  # a bug in the simulator or the core outside the guarded calls
        rep.violations.append(f"exception: {traceback.format_exc(limit=-6)}")
    if c is not None:
        rep.violations[:0] = c.violations
        rep.digest, rep.events, rep.ticks = c.digest(), c.events, c.now
        st = c.stats
        rep.metrics.update({
            "elections": st["elections"], "proposed": st["proposed"], "forwarded": st["forwarded"],
            "refused": st["refused"], "committed_writes": len(c.committed_uids),
            "reads_ok": st["reads_ok"], "reads_served": st["reads_served"],
            "reads_checked": c.checker.counts["reads_checked"],
            "snapshots": st["snapshots"], "installs": st["installs"], "conf_changes": st["conf_changes"],
            "crashes": st["crashes"], "lost_unsynced": st["lost_unsynced"], "partitions": st["partitions"],
            "minority_entries": c.checker.counts["minority_entries"], "commit_max": c.checker.commit_max,
            "messages": c.net.stats.sent, "max_message_bytes": c.net.stats.max_bytes,
        })
    return rep


# --- building blocks -------------------------------------------------------


def wait_leader(c: RaftCluster, limit: int) -> SimNode | None:
    t = c.run_until(lambda: c.leader() is not None, limit)
    return None if t is None else c.leader()


def stable(c: RaftCluster) -> bool:
    """Exactly one leader among the live nodes, and every live node has the
    leader's commit index and has applied it."""
    leaders = c.leaders()
    if len(leaders) != 1:
        return False
    if not leaders[0].core.writable()[0]:
        return False
    commit = leaders[0].core.commit
    return all(sn.core.commit == commit and sn.applied == commit for sn in c.order if sn.up)


def describe(c: RaftCluster) -> str:
    parts = []
    for sn in c.order:
        if not sn.up:
            parts.append(f"{sn.name}:down")
        else:
            k = sn.core
            parts.append(f"{sn.name}:{k.role}/t{k.term}/c{k.commit}/a{sn.applied}/l{k.last_index}")
    return " ".join(parts)


def heal_all(c: RaftCluster) -> None:
    """End of the faulty phase: no partition, loss or duplication; every node up."""
    c.heal()
    c.net.loss = 0.0
    c.net.dup = 0.0
    c.listeners.clear()
    for sn in c.order:
        if sn.crash_point is not None:
            sn.crash_point = None
        sn.skip = 0.0
        c.unstall(sn.name)
        if not sn.up:
            c.restart(sn.name)
    c.record("-", "heal all")


def check_liveness(c: RaftCluster, rep: RaftReport) -> None:
    """After heal_all: one stable leader within the bound, then a fresh write
    applied everywhere within what is left of it."""
    bound = liveness_bound(c.settings)
    t0 = c.now
    t = c.run_until(lambda: stable(c), bound)
    rep.metrics["heal_to_stable_ticks"] = t
    if t is None:
        rep.violations.append(f"tick {c.now} liveness: no single leader with every commit index equal to its own "
                              f"within {bound} ticks of the heal: {describe(c)}")
        return
    # a client writes once at the leader and, like agent.consensus, hands the write
    # on again every election timeout until it sees it applied (the state machine
    # drops duplicates): a leader may still lose it by stepping down at once
    uid = None
    t = None
    while c.now - t0 < bound:
        ld = c.leader()
        if ld is not None:
            if uid is None:
                uid = c.propose(ld.name)
            else:
                c.retry(uid, ld.name)
        if uid is not None:
            t = c.run_until(lambda: c.applied_everywhere(uid), min(c.settings.election_ticks, bound - (c.now - t0)))
            if t is not None:
                break
        else:
            c.tick()
    rep.metrics["heal_to_fresh_write_ticks"] = None if t is None else c.now - t0
    if t is None:
        rep.violations.append(f"tick {c.now} liveness: a fresh write after the heal was not applied everywhere "
                              f"within {bound} ticks: {describe(c)}")


def value_for(r: random.Random) -> bytes:
    """Mostly small values, now and then up to a few KB (Append batching by bytes)."""
    x = r.random()
    n = r.randint(1, 40) if x < 0.9 else r.randint(100, 800) if x < 0.98 else r.randint(1000, 3000)
    return b"x" * n


class Chaos:
    """Random faults and client actions, one call per tick (a tick listener)."""

    def __init__(self, c: RaftCluster, p: RaftParams, *, partitions=True, crashes=True, conf=True,
                 transfers=True, snapshots=True, max_down: int | None = None):
        self.c, self.p = c, p
        self.partitions, self.crashes, self.conf, self.transfers, self.snapshots = (
            partitions, crashes, conf, transfers, snapshots)
        self.k = p.chaos or 1.0
        self.part_until: int | None = None
        self.max_down = max_down if max_down is not None else (len(c.names) + 1) // 2
        self.outstanding: list[int] = []
        r = c.rng_faults
        if crashes and r.random() < 0.3:  # slow clocks: some nodes miss up to a quarter of their ticks
            for sn in c.order:
                sn.skip = round(r.uniform(0.0, 0.25), 3)
            c.record("-", "clock skew " + " ".join(f"{sn.name}:{sn.skip}" for sn in c.order))

    def __call__(self, what, sn, obj) -> None:
        c, k = self.c, self.k
        r, w = c.rng_faults, c.rng_work
        E = c.settings.election_ticks
        names = c.names
        if self.partitions:
            if self.part_until is not None:
                if c.now >= self.part_until:
                    c.heal()
                    self.part_until = None
            elif r.random() < 0.015 * k:
                if r.random() < 0.2:
                    pairs = [tuple(r.sample(names, 2)) for _ in range(r.randint(1, 3))]
                    c.cut_links(pairs)  # type: ignore[arg-type]
                else:
                    c.partition(self.random_split(r))
                self.part_until = c.now + r.randint(E, 6 * E)
        if self.crashes and r.random() < 0.008 * k:
            up = [sn for sn in c.order if sn.up]
            if len(c.order) - len(up) < self.max_down:
                ld = c.leader()
                v = ld if ld is not None and r.random() < 0.3 else r.choice(up)
                point = r.choice(CRASH_POINTS)
                down = r.randint(1, 6 * E) if r.random() < 0.8 else r.randint(10 * E, 25 * E)
                c.crash(v.name, point)
                v.restart_at = c.now + down
        if self.crashes and r.random() < 0.004 * k:
            avail = c.available()
            if avail:
                ld = c.leader()
                v = ld if ld is not None and r.random() < 0.5 else r.choice(avail)
                c.stall(v.name, r.randint(E // 2, 4 * E))
        up = c.available()
        if not up:
            return
        if w.random() < 0.4 * k:
            uid = c.propose(w.choice(up).name, value=value_for(w))
            if uid is not None:
                self.outstanding.append(uid)
        if self.outstanding and w.random() < 0.1:
            uid = self.outstanding.pop(0)
            if uid not in c.committed_uids:
                if c.now - c.proposals[uid][0] > 3 * E:
                    c.retry(uid, w.choice(up).name)
                self.outstanding.append(uid)
        if w.random() < 0.08 * k:
            c.read(w.choice(up).name)
        if self.transfers and w.random() < 0.006 * k:
            ld = c.leader()
            if ld is not None:
                vs = [v for v in ld.core.voters if v != ld.name]
                c.transfer(w.choice(vs) if vs and w.random() < 0.7 else None)
        if self.conf and w.random() < 0.01 * k:
            ld = c.leader()
            if ld is not None:
                vs = list(ld.core.voters)
                others = [n for n in names if n not in vs]
                if others and (len(vs) < 4 or (len(vs) < 7 and w.random() < 0.5)):
                    c.conf_change("add", w.choice(others))
                elif len(vs) > 3:
                    c.conf_change("remove", w.choice(vs))
        if self.snapshots and w.random() < 0.04 * k:
            c.snapshot(w.choice(up).name, keep=w.choice((0, 0, 2, 5, 20)))

    def random_split(self, r: random.Random) -> list[list[str]]:
        c = self.c
        names = list(c.names)
        x = r.random()
        ld = c.leader()
        if x < 0.25:  # isolate one node, the leader half the time
            one = ld.name if ld is not None and r.random() < 0.5 else r.choice(names)
            return [[one], [n for n in names if n != one]]
        r.shuffle(names)
        if x < 0.85:  # two sides, any sizes (2|3 and 1|4 of five among them)
            a = r.randint(1, len(names) - 1)
            return [sorted(names[:a]), sorted(names[a:])]
        a = r.randint(1, len(names) - 2)  # three sides
        b = r.randint(a + 1, len(names) - 1)
        return [sorted(names[:a]), sorted(names[a:b]), sorted(names[b:])]


def _start(c: RaftCluster, rep: RaftReport) -> SimNode | None:
    ld = wait_leader(c, 10 * c.settings.election_ticks)
    rep.metrics["first_leader_ticks"] = c.now
    if ld is None:
        rep.violations.append(f"tick {c.now} liveness: no leader elected at start: {describe(c)}")
    return ld


def scenario_random(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Everything at random for `steps` ticks: loss, duplication, reordering,
    partitions of any shape, crashes at any point of the driver step, restarts,
    client writes and ReadIndex reads at any node, leadership transfers,
    snapshots with compaction, voter changes; then heal and check liveness."""
    c.listeners.append(Chaos(c, p))
    c.run(p.steps)  # type: ignore[arg-type]
    heal_all(c)
    check_liveness(c, rep)


def _writes(c: RaftCluster, ticks: int, nodes: list[str], rate: float = 0.5) -> list[int]:
    uids = []
    for _ in range(ticks):
        if c.rng_work.random() < rate:
            n = c.rng_work.choice(nodes)
            if c.nodes[n].up:
                uid = c.propose(n)
                if uid is not None:
                    uids.append(uid)
        c.tick()
    return uids


def _partition_and_heal(c: RaftCluster, p: RaftParams, rep: RaftReport, minority_size: int) -> None:
    ld = _start(c, rep)
    if ld is None:
        return
    _writes(c, 30, c.names)
    ld = c.leader()
    others = [n for n in c.names if n != ld.name]
    c.rng_faults.shuffle(others)
    small = sorted([ld.name] + others[:minority_size - 1])
    big = sorted(others[minority_size - 1:])
    c.partition([small, big])
    old = ld.name
    t0 = c.now
    minority = _writes(c, p.steps // 2, [old])  # type: ignore[operator]
    majority = _writes(c, p.steps // 2, big)  # type: ignore[operator]
    lb = c.leader()
    rep.metrics["minority_writes"] = len(minority)
    rep.metrics["new_leader_side"] = "majority" if lb is not None and lb.name in big else "none"
    in_big = [sn for sn in c.order if sn.name in big and sn.up and sn.core.role == "leader"]
    if not in_big:
        rep.violations.append(f"tick {c.now} liveness: the majority side {big} elected no leader in "
                              f"{c.now - t0} ticks: {describe(c)}")
    if c.nodes[old].core.role == "leader":
        rep.violations.append(f"tick {c.now} check-quorum: old leader {old} still leads its minority side "
                              f"after {c.now - t0} ticks")
    for uid in minority:
        if uid in c.committed_uids:
            rep.violations.append(f"minority commits: write {uid} proposed at the minority leader {old} committed "
                                  f"during the partition")
    heal_all(c)
    check_liveness(c, rep)
    done = sum(1 for u in majority if u in c.committed_uids)
    rep.metrics["majority_writes_committed"] = f"{done}/{len(majority)}"


def scenario_partition23(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Five voters; the leader and one follower are cut off from the other three
    (2|3). Writes go to the old leader (they must not commit), then to the
    majority side (a new leader must be elected there and commit them); heal:
    one leader, everyone caught up, the minority's writes gone."""
    _partition_and_heal(c, p, rep, 2)


def scenario_partition14(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Five voters; the leader alone on one side (1|4); as partition23."""
    _partition_and_heal(c, p, rep, 1)


def scenario_leader_crash(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Steady writes at random nodes; the current leader crashes every few
    election timeouts (at a random point of its driver step) and comes back
    later; with loss and reordering from the seed. Heal; liveness."""
    if _start(c, rep) is None:
        return
    E = c.settings.election_ticks
    r = c.rng_faults
    crashed = 0
    end = c.now + p.steps  # type: ignore[operator]
    while c.now < end:
        _writes(c, r.randint(2 * E, 5 * E), c.names, 0.6)
        ld = c.leader()
        if ld is not None:
            c.crash(ld.name, r.choice(CRASH_POINTS))
            ld.restart_at = c.now + r.randint(E, 4 * E)
            crashed += 1
    rep.metrics["leader_crashes"] = crashed
    heal_all(c)
    check_liveness(c, rep)


def scenario_unsynced_restart(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Crashes that hit between the write and the fsync of a driver step (the
    write is lost, nothing of that step was sent), over and over, on any node,
    under writes, elections and partitions. Nothing acknowledged may be lost:
    votes stay single, applied entries never change, committed entries stay."""
    if _start(c, rep) is None:
        return
    E = c.settings.election_ticks
    r = c.rng_faults
    end = c.now + p.steps  # type: ignore[operator]
    while c.now < end:
        _writes(c, r.randint(2, E), c.names, 0.7)
        up = [sn for sn in c.order if sn.up]
        if len(up) >= 2:
            v = r.choice(up)
            c.crash(v.name, r.choice(("before_sync", "before_sync", "before_send")))
            v.restart_at = c.now + r.randint(1, 3 * E)
        if r.random() < 0.1 and not c.net.partitioned:
            c.isolate(r.choice(c.names))
        elif c.net.partitioned and r.random() < 0.3:
            c.heal()
    rep.metrics["lost_unsynced_writes"] = c.stats["lost_unsynced"]
    if c.stats["lost_unsynced"] == 0:
        rep.violations.append("scenario did not exercise a crash before the sync")
    heal_all(c)
    check_liveness(c, rep)


def scenario_snapshot_catchup(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """A follower (and the learner) go down for a long time while the others
    take many writes, snapshot and compact their logs; when they come back the
    leader no longer has the entries they need and must send InstallSnapshot
    (the receiver's driver fetches the data from the sender); they catch up."""
    ld = _start(c, rep)
    if ld is None:
        return
    _writes(c, 20, c.names)
    ld = c.leader()
    gone = [n for n in c.names if n != ld.name and n.startswith("n")][:1] + [n for n in c.names if n.startswith("l")][:1]
    for n in gone:
        c.crash(n)
    stay = [n for n in c.names if n not in gone]
    for _ in range(p.steps // 20):  # type: ignore[operator]
        _writes(c, 20, stay, 0.8)
        for n in stay:
            c.snapshot(n, keep=c.rng_work.choice((0, 3)))
    for n in gone:
        c.restart(n)
    heal_all(c)
    check_liveness(c, rep)
    rep.metrics["caught_up_by_snapshot"] = c.stats["installs"]
    if c.stats["installs"] == 0:
        rep.violations.append(f"no snapshot was installed; the restarted {gone} caught up from the log")


def scenario_conf_partition(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Five voters and two learners. Partition 2|5 with the leader on the small
    side, then voter changes (add a learner as voter, remove a voter) asked of
    whoever leads on either side, one at a time, under writes; then a new
    partition, more changes; heal. A minority leader's change must not commit;
    at the end every node holds the same configuration."""
    ld = _start(c, rep)
    if ld is None:
        return
    E = c.settings.election_ticks
    r = c.rng_faults
    _writes(c, 20, c.names)
    for round_ in range(3):
        ld = c.leader()
        names = list(c.names)
        r.shuffle(names)
        if ld is not None and round_ == 0:
            names.remove(ld.name)
            names.insert(0, ld.name)
        a = r.randint(1, 3)
        c.partition([sorted(names[:a]), sorted(names[a:])])
        end = c.now + p.steps // 3  # type: ignore[operator]
        while c.now < end:
            _writes(c, r.randint(E // 2, 2 * E), c.names, 0.5)
            for sn in c.leaders():
                vs = list(sn.core.voters)
                others = [n for n in c.names if n not in vs]
                if others and (len(vs) <= 4 or r.random() < 0.5):
                    c.conf_change_at(sn.name, "add", r.choice(others))
                elif len(vs) > 3:
                    c.conf_change_at(sn.name, "remove", r.choice(vs))
        c.heal()
        c.run(E)
    heal_all(c)
    check_liveness(c, rep)
    configs = {tuple(sn.core.voters) for sn in c.order if sn.up}
    rep.metrics["final_voters"] = " ".join(sorted(configs)[0]) if configs else ""
    if len(configs) != 1:
        rep.violations.append(f"configuration differs between nodes after the heal: {sorted(configs)}")


def scenario_figure8(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Figure 8 of the Raft paper, scripted with partitions that strike right
    after chosen steps (one entry per Append, one Append in flight): leader A
    (term T) gets entry X onto B only; W wins term T+1 without X among C, D, W
    and is cut off at once with its own X; A or B wins term T+2 and sends X to
    C or D. A leader that counted replicas of X (an entry of an older term) to
    commit it is cut off right then, and W wins term T+3 with C and D and
    overwrites X: a committed entry lost. A correct core commits X only once
    its own term's entry X+1 is on a majority, which W then cannot win."""
    ld = _start(c, rep)
    if ld is None:
        return
    E = c.settings.election_ticks
    _writes(c, 10, [ld.name], 1.0)
    c.run_until(lambda: stable(c), 10 * E)
    a = c.leader()
    if a is None:
        rep.violations.append(f"tick {c.now} figure8: no stable leader to start from: {describe(c)}")
        return
    others = [n for n in c.names if n != a.name]
    b = others[0]
    c.partition([[a.name, b], *[[n] for n in others[1:]]])
    term_t = a.core.term
    uid = c.propose(a.name)
    x = a.core.last_index
    ok = c.run_until(lambda: c.nodes[b].disk.log.term_at(x) == term_t, 4 * E)
    rep.metrics["figure8_x"] = x
    if uid is None or ok is None:
        rep.violations.append(f"tick {c.now} figure8: entry {x} of term {term_t} did not reach {b}")
        return
    rest = others[1:]
    state: dict[str, object] = {}

    def isolate_winner(sn: SimNode) -> None:
        if "w" not in state and sn.name in rest and sn.core.role == "leader":
            state["w"] = sn.name
            c.partition([[a.name, b], [sn.name], [n for n in rest if n != sn.name]])

    c.step_hooks.append(isolate_winner)
    c.partition([[a.name, b], rest])
    c.run_until(lambda: "w" in state, 10 * E)
    c.step_hooks.clear()
    if "w" not in state:
        rep.violations.append(f"tick {c.now} figure8: no leader among {rest}: {describe(c)}")
        return
    w = state["w"]
    cd = [n for n in rest if n != w]
    rep.metrics["figure8_roles"] = f"A={a.name} B={b} W={w} C,D={','.join(cd)}"

    def cut_on_commit(sn: SimNode) -> None:
        if "l2" not in state and sn.name in (a.name, b) and sn.core.role == "leader" and sn.core.commit >= x:
            state["l2"] = sn.name
            other = b if sn.name == a.name else a.name
            c.partition([[sn.name], [other], [w, *cd]])

    c.step_hooks.append(cut_on_commit)
    c.partition([[a.name, b, *cd], [w]])
    c.run_until(lambda: "l2" in state, 15 * E)
    c.step_hooks.clear()
    rep.metrics["figure8_cut"] = "after commit" if "l2" in state else "never committed"
    c.run(p.steps)  # type: ignore[arg-type]
    heal_all(c)
    check_liveness(c, rep)


def scenario_grow_from_one(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """The auto-voter bootstrap: one voter and four learners; the leader adds the
    learners as voters one at a time (as agent.core.voters' autopilot does)
    while random faults strike; then random faults and voter changes go on;
    heal. Covers the lone voter (elects itself, answers reads at once) and every
    configuration size from 1 to 5 on the way."""
    if _start(c, rep) is None:
        return
    chaos = Chaos(c, p, conf=False, crashes=False)  # with 2 voters any crash stalls the growth
    c.listeners.append(chaos)
    E = c.settings.election_ticks
    end = c.now + p.steps // 2  # type: ignore[operator]
    sizes = set()
    while c.now < end:
        c.run(c.rng_work.randint(1, E))
        ld = c.leader()
        if ld is not None:
            sizes.add(len(ld.core.voters))
            others = [n for n in c.names if n not in ld.core.voters]
            if others:
                c.conf_change("add", c.rng_work.choice(others))
    chaos.conf = chaos.crashes = True
    c.run(p.steps - p.steps // 2)  # type: ignore[operator]
    rep.metrics["voter_counts_seen"] = " ".join(map(str, sorted(sizes)))
    heal_all(c)
    check_liveness(c, rep)
    if max(sizes, default=0) < 3:
        rep.violations.append(f"the configuration never grew past {max(sizes, default=0)} voters")


def scenario_full_restart(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """Every node crashes at once, each at a random point of its driver step,
    again and again under writes; they come back one by one in random order
    over up to three election timeouts. (PySyncObj could overwrite committed
    data on a full-cluster restart.) Nothing committed may be lost."""
    if _start(c, rep) is None:
        return
    E = c.settings.election_ticks
    r = c.rng_faults
    end = c.now + p.steps  # type: ignore[operator]
    rounds = 0
    while c.now < end:
        _writes(c, r.randint(E, 4 * E), c.names, 0.7)
        for n in c.names:
            if r.random() < 0.4:
                c.snapshot(n, keep=r.choice((0, 3)))
        for sn in c.order:
            c.crash(sn.name, r.choice(CRASH_POINTS))
        c.tick()
        for sn in c.order:
            if sn.up:
                c.crash(sn.name)
        for n in c.names:
            c.nodes[n].restart_at = c.now + r.randint(1, 3 * E)
        rounds += 1
    rep.metrics["full_restarts"] = rounds
    heal_all(c)
    check_liveness(c, rep)


def scenario_big_entry(c: RaftCluster, p: RaftParams, rep: RaftReport) -> None:
    """A write as big as propose() accepts (raft_messages.MAX_DATA bytes) must
    reach every node: each Append or Forward has to fit one Raft datagram
    (RAFT_MAX_MESSAGE encoded bytes; the driver drops a bigger one)."""
    if _start(c, rep) is None:
        return
    c.stop_on_violation = False
    ld = c.leader()
    size = rm.MAX_DATA - len(make_command(c.uid + 1, "k0", b""))
    uid = c.propose(ld.name, value=b"x" * size)
    rep.metrics["entry_bytes"] = rm.MAX_DATA
    t = None if uid is None else c.run_until(lambda: c.applied_everywhere(uid), p.steps)  # type: ignore[arg-type]
    if t is None:
        rep.violations.append(f"tick {c.now} liveness: a {rm.MAX_DATA}-byte write (accepted by propose) was not "
                              f"applied everywhere within {p.steps} ticks: {describe(c)}")


SCENARIOS: dict[str, Callable[[RaftCluster, RaftParams, RaftReport], None]] = {
    "random": scenario_random,
    "partition23": scenario_partition23,
    "partition14": scenario_partition14,
    "leader_crash": scenario_leader_crash,
    "unsynced_restart": scenario_unsynced_restart,
    "snapshot_catchup": scenario_snapshot_catchup,
    "conf_partition": scenario_conf_partition,
    "figure8": scenario_figure8,
    "grow_from_one": scenario_grow_from_one,
    "full_restart": scenario_full_restart,
    "big_entry": scenario_big_entry,
}


# ----------------------------------------------------------------- benchmark


def election_after_leader_crash(seed: int, nodes: int = 5, settings: RaftSettings | None = None,
                                loss: float = 0.0, delay: tuple[int, int] = (0, 1)) -> int | None:
    """Ticks from the crash of a settled leader until another node is leader, under
    default settings: elect, write for a while, crash the leader between steps.
    None if no new leader within 20 election timeouts."""
    c = RaftCluster(seed, [voter_name(i) for i in range(nodes)], settings=settings, loss=loss, delay=delay, codec=False)
    E = c.settings.election_ticks
    if wait_leader(c, 20 * E) is None:
        return None
    _writes(c, c.rng_work.randint(3 * E, 6 * E), c.names, 0.3)
    ld = c.leader()
    if ld is None:
        return None
    old_term = ld.core.term
    c.crash(ld.name)
    return c.run_until(lambda: any(sn.core.term > old_term and sn.core.role == "leader" for sn in c.order if sn.up),
                       20 * E)


def election_benchmark(seeds: int = 200, base: int = 0, nodes: int = 5, settings: RaftSettings | None = None,
                       loss: float = 0.0) -> dict[str, object]:
    """Time to elect a new leader after the leader crashes, over `seeds` seeds:
    ticks and milliseconds (mean, median, p90, p99, max), and failures."""
    s = settings or RaftSettings()
    times = [election_after_leader_crash(seed, nodes, s, loss) for seed in range(base, base + seeds)]
    ok = sorted(t for t in times if t is not None)

    def pct(q: float) -> int | None:
        return ok[min(len(ok) - 1, int(q * len(ok)))] if ok else None

    out: dict[str, object] = {"seeds": seeds, "nodes": nodes, "loss": loss, "tick_ms": s.tick_ms,
                              "election_ticks": s.election_ticks, "failed": len(times) - len(ok)}
    if ok:
        out.update({"mean_ticks": sum(ok) / len(ok), "p50_ticks": pct(0.5), "p90_ticks": pct(0.9),
                    "p99_ticks": pct(0.99), "max_ticks": ok[-1],
                    "mean_ms": sum(ok) / len(ok) * s.tick_ms, "p99_ms": pct(0.99) * s.tick_ms})  # type: ignore[operator]
    return out
