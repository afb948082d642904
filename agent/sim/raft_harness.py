"""A tiny in-memory network of Raft cores, for transcript tests and the simulator.

After etcd-io/raft's interaction tests (rafttest/interaction_env*.go): nodes
named "1", "2", ... each with a toy durable store and a toy state machine
(the list of applied commands); messages wait in one queue, in send order,
until a command delivers or drops them. `run(line)` executes one transcript
command and returns its output (never an empty line, "ok" if nothing to say).

Entries print as term/index as in etcd (`2/4 NORMAL "v1"`, `1/1 CONF add 1`).
Every message goes through `to_wire`, CBOR and `decode` on its way, so the
transcripts also check the codec. InstallSnapshot travels without data, as
from a real leader; on delivery the harness plays the receiving driver and
fetches the snapshot from the sender's store out of band.

Commands (ids are node names; `(a,b)` is a list):
    add-nodes N [voters=(..)] [learners=(..)] [prevote=B] [checkquorum=B]
              [election=E] [heartbeat=H] [learner-heartbeat=L] [inflight=I]
              [max-entries=M] [max-bytes=B] [seed=S]
    campaign ID | tick ID [COUNT] | tick-heartbeat ID | tick-election ID
    propose ID DATA | forward ID DATA | propose-conf ID add|remove NODE
    read-index ID CTX | transfer-leadership from=ID [to=ID] | set-learners ID|all (..)
    process-ready ID.. | deliver-msgs [ID..] [drop=(..)] | stabilize [ID..]
    isolate ID | cut A B | recover | restart ID | compact ID INDEX
    status ID | raft-log ID | raft-state | writable ID | applied ID
"""

from __future__ import annotations

import random
import shlex
from dataclasses import dataclass, field, replace

import cbor2

from agent.core.raft import HardState, NotLeader, Raft, RaftSettings, Ready, Recovered, Refused
from agent.core.raft_messages import (
    Append,
    AppendResp,
    ConfChange,
    Entry,
    EntryKind,
    Forward,
    ForwardRefused,
    InstallSnapshot,
    PreVote,
    PreVoteResp,
    ReadIndexReq,
    ReadIndexResp,
    SnapshotMeta,
    TimeoutNow,
    Vote,
    VoteResp,
    decode,
)


@dataclass
class Store:
    """What a node made durable: the harness's stand-in for agent.io.store."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: tuple[SnapshotMeta, bytes] | None = None
    entries: list[Entry] = field(default_factory=list)

    def save(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.snapshot = rd.snapshot
            self.entries = []
        if rd.hard_state is not None:
            self.hard_state = replace(rd.hard_state)
        if rd.entries:
            first = rd.entries[0].index
            base = self.snapshot[0].index if self.snapshot else 0
            del self.entries[max(0, first - base - 1):]
            self.entries.extend(rd.entries)

    def recovered(self) -> Recovered:
        return Recovered(replace(self.hard_state), self.snapshot[0] if self.snapshot else None, list(self.entries))


@dataclass
class Node:
    id: str
    raft: Raft
    store: Store
    applied: list[tuple[int, bytes]] = field(default_factory=list)  #: the toy state machine
    applied_index: int = 0

    def snapshot_data(self, index: int) -> bytes:
        return cbor2.dumps([[i, d] for i, d in self.applied if i <= index])

    def restore(self, meta: SnapshotMeta, data: bytes) -> None:
        self.applied = [(i, d) for i, d in cbor2.loads(data)]
        self.applied_index = meta.index


def describe_entry(e: Entry) -> str:
    if e.kind == EntryKind.CONF:
        cc = ConfChange.decode(e.data)
        return f"{e.term}/{e.index} CONF {cc.op} {cc.node}"
    return f"{e.term}/{e.index} NORMAL {_q(e.data)}"


def _q(b: bytes) -> str:
    try:
        return '"' + b.decode() + '"'
    except UnicodeDecodeError:
        return b.hex()


def describe(m) -> str:
    """One line per message, stable across runs (for golden files)."""
    head = f"{m.frm}->{m.to} {type(m).__name__} term={m.term}"
    t = type(m)
    if t is Append:
        out = f"{head} prev={m.prev_term}/{m.prev_index} commit={m.commit}"
        if m.entries:
            out += " entries=[" + ", ".join(describe_entry(e) for e in m.entries) + "]"
        if m.ctx:
            out += f" ctx={m.ctx.hex()}"
        return out
    if t is AppendResp:
        out = f"{head} index={m.index}"
        if m.reject:
            out += f" reject hint={m.hint_term}/{m.reject_hint}"
        if m.ctx:
            out += f" ctx={m.ctx.hex()}"
        return out
    if t is PreVote or t is Vote:
        return f"{head} last={m.last_term}/{m.last_index}" + (" force" if m.force else "")
    if t is PreVoteResp or t is VoteResp:
        return head + (" reject" if m.reject else "")
    if t is InstallSnapshot:
        return f"{head} snap={m.meta.term}/{m.meta.index} voters=({','.join(m.meta.voters)})"
    if t is Forward:
        return f"{head} data={_q(m.data)}"
    if t is ForwardRefused:
        return f"{head} reason={m.reason!r}"
    if t is ReadIndexReq:
        return f"{head} ctx={_q(m.ctx)}"
    if t is ReadIndexResp:
        return f"{head} ctx={_q(m.ctx)} index={m.index}" + (" reject" if m.reject else "")
    if t is TimeoutNow:
        return head
    return f"{head} {m!r}"


def _ids(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return [x.strip() for x in text.split(",") if x.strip()]


def _bool(text: str) -> bool:
    if text not in ("true", "false"):
        raise ValueError(f"expected true or false, not {text!r}")
    return text == "true"


class Harness:
    def __init__(self, *, codec: bool = True):
        self.nodes: dict[str, Node] = {}
        self.settings: dict[str, RaftSettings] = {}
        self.msgs: list = []  #: in flight, in send order
        self.cuts: set[frozenset[str]] = set()
        self.codec = codec
        self.dropped = 0
        self.leaders: dict[int, str] = {}  #: term -> the leader seen in it (election safety)

    # ------------------------------------------------------------- building

    def add_nodes(self, n: int, voters: list[str] | None = None, learners: list[str] | None = None,
                  settings: RaftSettings | None = None, seed: int = 0) -> list[str]:
        s = settings or RaftSettings()
        boot = Raft.bootstrap_entries(voters) if voters else []
        start = len(self.nodes) + 1
        added = []
        for k in range(start, start + n):
            nid = str(k)
            store = Store(entries=list(boot) if voters and nid in voters else [])
            self.settings[nid] = s
            raft = Raft(nid, s, random.Random(seed * 1000 + k), store.recovered())
            self.nodes[nid] = Node(nid, raft, store)
            added.append(nid)
        if learners:
            for node in self.nodes.values():
                node.raft.set_learners(set(learners))
        return added

    def restart(self, nid: str, seed: int = 0) -> None:
        """Crash and come back from what the store holds (nothing unpersisted survives)."""
        old = self.nodes[nid]
        raft = Raft(nid, self.settings[nid], random.Random(seed * 1000 + int(nid) + 7 * old.raft.now + 1),
                    old.store.recovered())
        node = Node(nid, raft, old.store)
        if old.store.snapshot is not None:
            node.restore(*old.store.snapshot)
        if old.raft.learners:
            raft.set_learners(set(old.raft.learners))
        self.nodes[nid] = node

    # -------------------------------------------------------------- running

    def process_ready(self, nid: str) -> Ready | None:
        """Persist, send, apply and advance one Ready of node `nid` (as the
        driver does); the Ready, or None if there was none."""
        node = self.nodes[nid]
        r = node.raft
        if not r.has_ready():
            return None
        rd = r.ready()
        node.store.save(rd)
        for m in rd.messages:
            self._send(m)
        if rd.snapshot is not None:
            node.restore(*rd.snapshot)
        for e in rd.committed:
            if e.index > node.applied_index:
                if e.kind == EntryKind.NORMAL and e.data:
                    node.applied.append((e.index, e.data))
                node.applied_index = e.index
        r.advance(rd)
        if rd.committed:
            r.applied_to(node.applied_index)
        if r.state == "leader":
            seen = self.leaders.setdefault(r.term, nid)
            if seen != nid:
                raise AssertionError(f"two leaders in term {r.term}: {seen} and {nid}")
        return rd

    @staticmethod
    def describe_ready(rd: Ready | None) -> list[str]:
        if rd is None:
            return []
        out = ["Ready:"]
        if rd.soft_state is not None:
            role, lead, term = rd.soft_state
            out.append(f"State:{role} Lead:{lead or '-'} Term:{term}")
        if rd.hard_state is not None:
            hs = rd.hard_state
            out.append(f"HardState Term:{hs.term} Vote:{hs.vote or '-'} Commit:{hs.commit}")
        if rd.snapshot is not None:
            meta = rd.snapshot[0]
            out.append(f"Snapshot {meta.term}/{meta.index} voters=({','.join(meta.voters)})")
        if rd.entries:
            out.append("Entries:")
            out.extend(describe_entry(e) for e in rd.entries)
        if rd.messages:
            out.append("Messages:")
            out.extend(describe(m) for m in rd.messages)
        if rd.committed:
            out.append("CommittedEntries:")
            out.extend(describe_entry(e) for e in rd.committed)
        if rd.read_states:
            out.append("ReadStates:")
            out.extend(f"ctx={_q(rs.ctx)} index={rs.index}" + (f" reason={rs.reason!r}" if rs.reason else "")
                       for rs in rd.read_states)
        if rd.forward_refused:
            out.append("ForwardRefused:")
            out.extend(f"from {m.frm}: {m.reason}" for m in rd.forward_refused)
        return out

    def is_cut(self, a: str, b: str) -> bool:
        return frozenset((a, b)) in self.cuts

    def _send(self, m) -> None:
        if self.is_cut(m.frm, m.to):  # a cut link is a black hole (as etcd's isolate)
            self.dropped += 1
            return
        if self.codec:
            m = decode(cbor2.loads(cbor2.dumps(m.to_wire())))
        self.msgs.append(m)

    def deliver(self, m) -> None:
        """Step one message into its receiver (the receiving driver's work included)."""
        node = self.nodes.get(m.to)
        if node is None:
            return
        if type(m) is InstallSnapshot and m.data is None:
            src = self.nodes.get(m.frm)
            snap = src.store.snapshot if src is not None else None
            if snap is not None and snap[0] == m.meta:
                m = replace(m, data=snap[1])
        node.raft.step(m)

    def deliver_to(self, targets: list[str] | None, drop: list[str] = (), quiet: bool = False) -> list[str]:
        """Deliver (or drop) every queued message to the given nodes (all if
        None), in send order; the transcript lines unless `quiet`."""
        out: list[str] = []
        dropped = [m for m in self.msgs if m.to in drop]
        if dropped:
            self.msgs = [m for m in self.msgs if m.to not in drop]
            self.dropped += len(dropped)
            if not quiet:
                out.append("dropped:")
                out.extend(describe(m) for m in dropped)
        if targets is None:
            targets = sorted({m.to for m in self.msgs}, key=_order)
        for nid in targets:
            mine = [m for m in self.msgs if m.to == nid]
            if not mine:
                continue
            self.msgs = [m for m in self.msgs if m.to != nid]
            if not quiet:
                out.append(f"> {nid} receiving messages")
            for m in mine:
                cut = self.is_cut(m.frm, m.to)
                if not quiet:
                    out.append(f"  {describe(m)}" + (" (cut)" if cut else ""))
                if cut:
                    self.dropped += 1
                else:
                    self.deliver(m)
        return out

    def stabilize(self, ids: list[str] | None = None, limit: int = 1000, quiet: bool = False) -> list[str]:
        """Process Readies and deliver messages until nothing moves (messages
        to nodes outside `ids` stay queued)."""
        ids = ids or sorted(self.nodes, key=_order)
        out: list[str] = []
        for _ in range(limit):
            moved = False
            for nid in ids:
                rd = self.process_ready(nid)
                if rd is not None:
                    moved = True
                    if not quiet:
                        out.append(f"> {nid} handling Ready")
                        out.extend("  " + x for x in self.describe_ready(rd))
            targets = [nid for nid in ids if any(m.to == nid for m in self.msgs)]
            if targets:
                moved = True
                out.extend(self.deliver_to(targets, quiet=quiet))
            if not moved:
                return out
        raise AssertionError("stabilize did not settle")

    # ------------------------------------------------------------- checking

    def check_log_matching(self) -> None:
        """If two logs hold an entry with the same index and term, they hold
        the same entries up to it (as far as both still have them)."""
        logs = {nid: n.raft.log for nid, n in self.nodes.items()}
        ids = sorted(logs)
        for x in range(len(ids)):
            for y in range(x + 1, len(ids)):
                a, b = logs[ids[x]], logs[ids[y]]
                hi = min(a.last_index, b.last_index)
                lo = max(a.offset, b.offset) + 1
                i = hi
                while i >= lo and a.term(i) != b.term(i):
                    i -= 1
                for j in range(lo, i + 1):
                    if a.entry(j) != b.entry(j):
                        raise AssertionError(f"logs of {ids[x]} and {ids[y]} differ at {j} below matching {i}")

    def check_applied(self) -> None:
        """State machine safety: what one node applied is a prefix of another's or vice versa."""
        seqs = [n.applied for n in self.nodes.values()]
        for s in seqs:
            for t in seqs:
                k = min(len(s), len(t))
                if s[:k] != t[:k]:
                    raise AssertionError(f"applied sequences diverge: {s[:k]} vs {t[:k]}")

    # ----------------------------------------------------------- transcripts

    def run(self, line: str) -> str:
        """Execute one transcript command; its output as text."""
        words = shlex.split(line)
        cmd, args = words[0], words[1:]
        kw = dict(a.split("=", 1) for a in args if "=" in a)
        pos = [a for a in args if "=" not in a]
        out = getattr(self, "_cmd_" + cmd.replace("-", "_"))(pos, kw)
        text = "\n".join(x for x in (out or []) if x.strip())
        return text or "ok"

    def _raft(self, nid: str) -> Raft:
        return self.nodes[nid].raft

    def _cmd_add_nodes(self, pos, kw):
        base = RaftSettings()
        s = RaftSettings(
            election_ticks=int(kw.get("election", base.election_ticks)),
            heartbeat_ticks=int(kw.get("heartbeat", base.heartbeat_ticks)),
            learner_heartbeat_ticks=int(kw.get("learner-heartbeat", base.learner_heartbeat_ticks)),
            max_inflight=int(kw.get("inflight", base.max_inflight)),
            max_append_entries=int(kw.get("max-entries", base.max_append_entries)),
            max_append_bytes=int(kw.get("max-bytes", base.max_append_bytes)),
            check_quorum=_bool(kw.get("checkquorum", "true")),
            pre_vote=_bool(kw.get("prevote", "true")),
        )
        voters = _ids(kw["voters"]) if "voters" in kw else None
        learners = _ids(kw["learners"]) if "learners" in kw else None
        self.add_nodes(int(pos[0]), voters, learners, s, int(kw.get("seed", 0)))

    def _cmd_campaign(self, pos, kw):
        self._raft(pos[0]).campaign()

    def _cmd_tick(self, pos, kw):
        r = self._raft(pos[0])
        for _ in range(int(pos[1]) if len(pos) > 1 else 1):
            r.tick()

    def _cmd_tick_heartbeat(self, pos, kw):
        self._cmd_tick([pos[0], self.settings[pos[0]].heartbeat_ticks], kw)

    def _cmd_tick_election(self, pos, kw):
        self._cmd_tick([pos[0], self.settings[pos[0]].election_ticks], kw)

    def _request(self, fn, *args):
        try:
            res = fn(*args)
        except NotLeader as e:
            return [f"NotLeader: {e.reason}"]
        except Refused as e:
            return [f"Refused: {e.reason}"]
        return [f"index {res}"] if res is not None else []

    def _cmd_propose(self, pos, kw):
        return self._request(self._raft(pos[0]).propose, pos[1].encode())

    def _cmd_forward(self, pos, kw):
        return self._request(self._raft(pos[0]).forward, pos[1].encode())

    def _cmd_propose_conf(self, pos, kw):
        return self._request(self._raft(pos[0]).propose_conf, ConfChange(pos[1], pos[2]))

    def _cmd_read_index(self, pos, kw):
        self._raft(pos[0]).read_index(pos[1].encode())

    def _cmd_transfer_leadership(self, pos, kw):
        return self._request(self._raft(kw["from"]).transfer_leadership, kw.get("to"))

    def _cmd_set_learners(self, pos, kw):
        ids = set(_ids(pos[1]))
        targets = list(self.nodes) if pos[0] == "all" else [pos[0]]
        for nid in targets:
            self._raft(nid).set_learners(ids)

    def _cmd_process_ready(self, pos, kw):
        out = []
        for nid in pos:
            lines = self.describe_ready(self.process_ready(nid))
            if len(pos) > 1:
                out.append(f"> {nid} handling Ready")
                out.extend("  " + x for x in lines)
            else:
                out.extend(lines)
        return out

    def _cmd_deliver_msgs(self, pos, kw):
        drop = _ids(kw["drop"]) if "drop" in kw else []
        targets = pos if pos else (None if not drop else [])
        return self.deliver_to(targets, drop)

    def _cmd_stabilize(self, pos, kw):
        return self.stabilize(pos or None)

    def _cmd_isolate(self, pos, kw):
        for other in self.nodes:
            if other != pos[0]:
                self.cuts.add(frozenset((pos[0], other)))

    def _cmd_cut(self, pos, kw):
        self.cuts.add(frozenset((pos[0], pos[1])))

    def _cmd_recover(self, pos, kw):
        self.cuts.clear()

    def _cmd_restart(self, pos, kw):
        self.restart(pos[0])

    def _cmd_compact(self, pos, kw):
        node = self.nodes[pos[0]]
        r = node.raft
        index = int(pos[1])
        meta = SnapshotMeta(index, r.term_at(index), r.voters_at(index))
        node.store.snapshot = (meta, node.snapshot_data(index))
        node.store.entries = [e for e in node.store.entries if e.index > index]
        r.compact(meta)

    def _cmd_status(self, pos, kw):
        st = self._raft(pos[0]).status()
        out = [f"{k}: {v}" for k, v in st.items() if k != "progress"]
        for nid, p in st.get("progress", {}).items():
            out.append(f"  {nid}: match={p['match']} next={p['next']} {p['state']}" + (" learner" if p["learner"] else ""))
        return out

    def _cmd_raft_log(self, pos, kw):
        log = self._raft(pos[0]).log
        out = [f"snapshot {log.offset_term}/{log.offset}"] if log.offset else []
        out.extend(describe_entry(e) for e in log.entries)
        return out or ["log is empty"]

    def _cmd_raft_state(self, pos, kw):
        out = []
        for nid in sorted(self.nodes, key=_order):
            r = self._raft(nid)
            out.append(f"{nid}: {r.role} term={r.term} lead={r.leader or '-'} commit={r.commit} "
                       f"last={r.last_index} voters=({','.join(r.voters)})")
        return out

    def _cmd_writable(self, pos, kw):
        ok, why = self._raft(pos[0]).writable()
        return ["writable" if ok else why]

    def _cmd_applied(self, pos, kw):
        node = self.nodes[pos[0]]
        return [f"applied={node.applied_index} " + " ".join(f"{i}:{_q(d)}" for i, d in node.applied)]


def _order(nid: str):
    return (len(nid), nid)


# ------------------------------------------------------------ datadriven files


def run_transcript(text: str, harness: Harness | None = None) -> str:
    """Re-run a transcript and return it with every command's output replaced by
    what the harness produced now (the golden-file format of etcd's datadriven:
    `command`, a `----` line, the output, a blank line; `#` comments kept)."""
    h = harness or Harness()
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            out.append(line)
            i += 1
            continue
        out.append(line)
        i += 1
        if i < len(lines) and lines[i] == "----":
            i += 1
            while i < len(lines) and lines[i].strip():
                i += 1
        try:
            result = h.run(line)
        except Exception as e:  # a transcript shows a crash as output, so the golden diff points at it
            result = f"error: {type(e).__name__}: {e}"
        out.append("----")
        out.extend(result.split("\n"))
        if i >= len(lines) or lines[i].strip():
            out.append("")
    return "\n".join(out)
