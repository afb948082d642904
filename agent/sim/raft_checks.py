"""Safety checkers for the Raft simulator: they watch what the nodes persist,
commit, apply and send, and name the first property a run breaks.

The checkers know nothing about the simulator's network or the core's
internals; they are fed observations (a node's log changed, a node's commit
moved, a vote was granted, a node restarted...) and keep just enough global
history to decide each property incrementally, so that every property is
checked after every driver step at a cost proportional to what changed.

Logs are compared through a hash chain (`chain_next`): the chain value at
index i covers the (index, term, kind, data) of every entry up to i, so "two
logs hold the same entry at i" means "the same chain value at i", and that
already says "and are identical up to i" (log matching). The tiny state
machine of the simulator keeps the same chain over the entries it applies, so
a snapshot carries the chain value of the log prefix it stands for.

Properties (Raft paper, fig. 3, and the dissertation):

  election safety       at most one leader per term, over the whole run
  log matching          two logs with an entry of the same (index, term) hold
                        the same entries up to it
  committed agreement   no two nodes consider different entries committed at
                        the same index
  leader completeness   a leader of term T holds every entry committed by the
                        leader of a lower term
  state-machine safety  no two nodes apply different entries at one index,
                        also across restarts and snapshot installs
  commit monotonic      a live node's commit index never decreases; the durable
                        commit never decreases; the durable term never
                        decreases; the durable vote of a term never changes
  one vote per term     a node grants its vote once per term, and only after
                        the vote is durable
  persist before send   a message never carries a term that is not durable at
                        its sender (pre-votes aside); a candidate's own vote is
                        durable before it asks for votes
  leader append-only    a leader never overwrites or deletes its own entries
  applied durable       everything a node applied is still in its durable
                        state (log or snapshot) when it restarts
  only voters campaign  no node outside its own configuration becomes
                        (pre)candidate or leader
  minority commits      an entry a leader appended while its side of a
                        partition held no majority of the voters does not
                        commit while that partition lasts (unless the side's
                        configuration changed so that it became a majority)
  ReadIndex             a read index is at least the highest index known
                        committed anywhere when the read was asked
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

ROOT = b"\x00" * 8  #: the chain value of the empty log
_PACK = struct.Struct(">QQB").pack


def chain_next(prev: bytes, index: int, term: int, kind: int, data: bytes) -> bytes:
    """The chain value after appending one entry to a log whose chain is `prev`."""
    h = hashlib.blake2b(prev, digest_size=8)
    h.update(_PACK(index, term, int(kind)))
    h.update(data)
    return h.digest()


def majority(n: int) -> int:
    return n // 2 + 1


def is_majority(group: Iterable[str], voters: Iterable[str]) -> bool:
    vs = set(voters)
    return bool(vs) and len(vs.intersection(group)) >= majority(len(vs))


class LogView:
    """One node's log as the checkers see it: everything after a base (the
    snapshot it starts from, index 0 for none), with the chain value at every
    index. `entries` holds the Entry objects themselves (to hand back on a
    restart)."""

    __slots__ = ("base_index", "base_term", "base_chain", "entries", "terms", "chains")

    def __init__(self, base_index: int = 0, base_term: int = 0, base_chain: bytes = ROOT):
        self.base_index = base_index
        self.base_term = base_term
        self.base_chain = base_chain
        self.entries: list = []
        self.terms: list[int] = []
        self.chains: list[bytes] = []

    @property
    def last_index(self) -> int:
        return self.base_index + len(self.entries)

    @property
    def last_term(self) -> int:
        return self.terms[-1] if self.terms else self.base_term

    def term_at(self, i: int) -> int | None:
        k = i - self.base_index
        if k == 0:
            return self.base_term
        if 0 < k <= len(self.terms):
            return self.terms[k - 1]
        return None

    def chain_at(self, i: int) -> bytes | None:
        k = i - self.base_index
        if k == 0:
            return self.base_chain
        if 0 < k <= len(self.chains):
            return self.chains[k - 1]
        return None

    def entry_at(self, i: int):
        k = i - self.base_index
        return self.entries[k - 1] if 0 < k <= len(self.entries) else None

    def append(self, entries) -> str | None:
        """Write entries as the storage contract says: the first one's index may
        be at most last+1; an entry at or below the last index replaces it and
        everything after it. Returns what was wrong with the batch, or None."""
        if not entries:
            return None
        first = entries[0].index
        if first <= self.base_index:
            return f"entries from {first} overwrite the snapshot/compacted prefix (base {self.base_index})"
        if first > self.last_index + 1:
            return f"entries from {first} leave a gap after last index {self.last_index}"
        for a, b in zip(entries, entries[1:]):
            if b.index != a.index + 1:
                return f"entries not contiguous: {a.index} then {b.index}"
        k = first - self.base_index - 1
        del self.entries[k:], self.terms[k:], self.chains[k:]
        prev = self.chains[-1] if self.chains else self.base_chain
        prev_term = self.last_term
        for e in entries:
            if e.term < prev_term:
                return f"entry ({e.index}, term {e.term}) after an entry of term {prev_term}"
            prev = chain_next(prev, e.index, e.term, e.kind, e.data)
            prev_term = e.term
            self.entries.append(e)
            self.terms.append(e.term)
            self.chains.append(prev)
        return None

    def reset(self, index: int, term: int, chain: bytes) -> None:
        """The log now starts after a snapshot at `index` (everything else dropped)."""
        self.base_index, self.base_term, self.base_chain = index, term, chain
        self.entries, self.terms, self.chains = [], [], []

    def compact(self, index: int) -> None:
        """Drop the entries up to `index` (kept only as the base)."""
        k = min(index, self.last_index) - self.base_index
        if k <= 0:
            return
        self.base_index += k
        self.base_term = self.terms[k - 1]
        self.base_chain = self.chains[k - 1]
        del self.entries[:k], self.terms[:k], self.chains[:k]

    def copy(self) -> LogView:
        c = LogView(self.base_index, self.base_term, self.base_chain)
        c.entries, c.terms, c.chains = list(self.entries), list(self.terms), list(self.chains)
        return c


class Checker:
    """Global history of a run and the properties over it. The simulator sets
    `now` (the virtual tick) and feeds observations; `violations` lists what
    broke, one line each, starting with the tick and the property's name."""

    def __init__(self, max_violations: int = 20):
        self.now = 0
        self.max_violations = max_violations
        self.violations: list[str] = []
        self.leader_of_term: dict[int, str] = {}
        self._at: dict[tuple[int, int], tuple[bytes, str]] = {}  #: (index, term) -> (chain, first node seen with it)
        self.committed: dict[int, bytes] = {}  #: index -> chain of the committed prefix up to it
        self.commit_max = 0
        self._commit_by: dict[int, str] = {}  #: index -> node that first showed it committed
        self.leader_commit: dict[int, int] = {}  #: term -> highest index its leader saw committed
        self._below: dict[int, int] = {}  #: cache: term -> max(leader_commit[t] for t < term)
        self.current_leaders: dict[str, tuple[int, LogView]] = {}
        self.applied: dict[int, tuple[bytes, str]] = {}  #: index -> (chain after applying, first node)
        self.votes: dict[tuple[int, str], str] = {}  #: (term, voter) -> candidate
        self.node_commit: dict[str, int] = {}  #: live commit of the current incarnation
        self.durable: dict[str, tuple[int, str | None, int]] = {}  #: node -> (term, vote, commit) on disk
        self.max_applied: dict[str, tuple[int, bytes]] = {}  #: node -> (highest index ever applied, chain)
        self.epoch = 0  #: partition epoch: changes whenever who-can-reach-whom changes
        self.minority: dict[tuple[int, int], tuple[int, frozenset, str]] = {}  #: (index, term) -> (epoch, side, leader)
        self._configs: dict[tuple[int, frozenset], set[tuple[str, ...]]] = {}
        self._reads: dict[tuple[str, bytes], tuple[int, int]] = {}  #: (node, ctx) -> (tick asked, commit_max then)
        self.counts = {"reads_checked": 0, "minority_entries": 0, "leader_checks": 0}

    # ------------------------------------------------------------ reporting

    def fail(self, prop: str, detail: str) -> None:
        line = f"tick {self.now} {prop}: {detail}"
        if len(self.violations) < self.max_violations and line not in self.violations:
            self.violations.append(line)

    @property
    def ok(self) -> bool:
        return not self.violations

    # ---------------------------------------------------------------- logs

    def log_changed(self, node: str, log: LogView, from_index: int) -> None:
        """Log matching: every (index, term) from `from_index` on must carry the
        chain value every other log had for it."""
        at = self._at
        lo = max(from_index, log.base_index)
        for i in range(lo, log.last_index + 1):
            term = log.term_at(i)
            if i == 0 or term is None:
                continue
            ch = log.chain_at(i)
            key = (i, term)
            seen = at.get(key)
            if seen is None:
                at[key] = (ch, node)  # type: ignore[assignment]
            elif seen[0] != ch:
                self.fail("log matching", f"{node} holds entry (index {i}, term {term}) with different contents "
                          f"or a different log before it than {seen[1]} had")
                return
        if node in self.current_leaders:
            self.leader_complete(node)

    # ---------------------------------------------------------------- roles

    def role(self, node: str, role: str, term: int, voters: tuple[str, ...], log: LogView | None) -> None:
        """After every step of a live node: election safety, only voters campaign."""
        if role == "leader":
            prev = self.leader_of_term.setdefault(term, node)
            if prev != node:
                self.fail("election safety", f"{node} and {prev} were both leader in term {term}")
            cur = self.current_leaders.get(node)
            if (cur is None or cur[0] != term) and node not in voters:
                # a leader may stay on, not counting itself, until its own removal
                # commits; but it must have been a voter when it won
                self.fail("only voters campaign", f"{node} became leader of term {term} but is not a voter "
                          f"({', '.join(voters)})")
            if log is not None and (cur is None or cur[0] != term or cur[1] is not log):
                self.current_leaders[node] = (term, log)
                self.leader_complete(node)
        else:
            self.current_leaders.pop(node, None)
        if role in ("candidate", "precandidate") and node not in voters:
            self.fail("only voters campaign", f"{node} is {role} in term {term} but not a voter ({', '.join(voters)})")

    def node_down(self, node: str) -> None:
        self.current_leaders.pop(node, None)
        self.node_commit.pop(node, None)

    def _committed_below(self, term: int) -> int:
        m = self._below.get(term)
        if m is None:
            m = max((c for t, c in self.leader_commit.items() if t < term), default=0)
            self._below[term] = m
        return m

    def leader_complete(self, node: str) -> None:
        """Leader completeness for one current leader."""
        term, log = self.current_leaders[node]
        m = self._committed_below(term)
        if m == 0:
            return
        self.counts["leader_checks"] += 1
        want = self.committed.get(m)
        if want is None:
            return
        if m > log.last_index:
            self.fail("leader completeness", f"{node}, leader of term {term}, lacks committed entry {m} "
                      f"(its log ends at {log.last_index})")
            return
        if m < log.base_index:
            m, want = log.base_index, self.committed.get(log.base_index)
            if want is None:
                return
        if log.chain_at(m) != want:
            self.fail("leader completeness", f"{node}, leader of term {term}, holds a different entry at "
                      f"committed index {m} (term {log.term_at(m)}) than was committed")

    # --------------------------------------------------------------- commit

    def commit(self, node: str, commit: int, log: LogView, role: str, term: int) -> None:
        """After every step of a live node, with its commit index and its log."""
        prev = self.node_commit.get(node)
        if prev is not None and commit < prev:
            self.fail("commit monotonic", f"{node}'s commit index went from {prev} down to {commit}")
        if prev is not None and commit == prev and not (role == "leader" and self.leader_commit.get(term, -1) < commit):
            return
        self.node_commit[node] = commit
        if commit == 0:
            return
        if commit > log.last_index:
            self.fail("committed agreement", f"{node} has commit index {commit} beyond its log (last {log.last_index})")
            return
        cm = self.commit_max
        check = min(commit, cm)
        if 0 < check < log.base_index:
            check = log.base_index if log.base_index <= cm else 0  # compacted: check the prefix through the base
        if check >= log.base_index and check > 0:
            want = self.committed.get(check)
            have = log.chain_at(check)
            if want is not None and have != want:
                self.fail("committed agreement", f"{node} considers index {check} (term {log.term_at(check)}) committed "
                          f"but {self._commit_by.get(check)} committed a different entry there")
                return
        if commit > cm:
            for i in range(max(cm + 1, log.base_index), commit + 1):
                self.committed[i] = log.chain_at(i)  # type: ignore[assignment]
                self._commit_by[i] = node
            self.commit_max = commit
        if self.minority and prev is not None:
            self._minority_commits(node, log, prev, commit)
        if role == "leader" and self.leader_commit.get(term, 0) < commit:
            self.leader_commit[term] = commit
            self._below.clear()
            for other, (t, _) in list(self.current_leaders.items()):
                if t > term:
                    self.leader_complete(other)

    # ------------------------------------------------------------- minority

    def new_epoch(self, sides: Iterable[tuple[frozenset, Iterable[tuple[str, ...]]]]) -> None:
        """Who can reach whom changed: a new partition epoch. `sides` lists each
        side with the configurations its live nodes hold right now."""
        self.epoch += 1
        for side, configs in sides:
            self._configs[(self.epoch, side)] = set(configs)

    def config_seen(self, side: frozenset, voters: tuple[str, ...]) -> None:
        self._configs.setdefault((self.epoch, side), set()).add(voters)

    def leader_appended(self, node: str, entries: list[tuple[int, int]], side: frozenset, voters: tuple[str, ...]) -> None:
        """A leader appended entries of its term; remember those appended while
        its side of the partition held no majority of its voters."""
        if is_majority(side, voters):
            return
        for key in entries:
            self.minority[key] = (self.epoch, side, node)
            self.counts["minority_entries"] += 1

    def _minority_commits(self, node: str, log: LogView, prev: int, commit: int) -> None:
        for i in range(max(prev + 1, log.base_index + 1), commit + 1):
            key = (i, log.term_at(i))
            rec = self.minority.get(key)  # type: ignore[arg-type]
            if rec is None:
                continue
            epoch, side, leader = rec
            if epoch != self.epoch:
                continue  # the partition changed since: it may commit legitimately now
            if any(is_majority(side, v) for v in self._configs.get((epoch, side), ())):
                continue
            self.fail("minority commits", f"{node} committed entry (index {i}, term {key[1]}) that {leader} appended "
                      f"while its side {sorted(side)} held no majority, with the partition unchanged since")

    # -------------------------------------------------------------- applying

    def applied_entry(self, node: str, index: int, term: int, chain: bytes, log: LogView | None) -> None:
        """State-machine safety: `chain` is the node's state-machine chain after applying index."""
        seen = self.applied.get(index)
        if seen is None:
            self.applied[index] = (chain, node)
        elif seen[0] != chain:
            self.fail("state-machine safety", f"{node} applied a different entry (term {term}) at index {index} "
                      f"than {seen[1]} did, or a different history before it")
        want = self.committed.get(index)
        if want is not None and want != chain and seen is None:
            self.fail("state-machine safety", f"{node} applied at index {index} an entry other than the committed one")
        if log is not None:
            have = log.chain_at(index)
            if have is not None and have != chain:
                self.fail("state-machine safety", f"{node} applied at index {index} something other than its own log holds")
        ma = self.max_applied.get(node)
        if ma is None or index > ma[0]:
            self.max_applied[node] = (index, chain)

    def restored(self, node: str, index: int, chain: bytes) -> None:
        """A node restored its state machine from a snapshot at index."""
        seen = self.applied.get(index)
        if seen is None:
            self.applied[index] = (chain, node)
        elif seen[0] != chain:
            self.fail("state-machine safety", f"{node} restored a snapshot at index {index} whose history differs "
                      f"from what {seen[1]} applied")
        ma = self.max_applied.get(node)
        if ma is None or index > ma[0]:
            self.max_applied[node] = (index, chain)

    # ------------------------------------------------------- durable state

    def hard_state(self, node: str, term: int, vote: str | None, commit: int) -> None:
        """The node's durable hard state after a sync."""
        old = self.durable.get(node)
        if old is not None:
            ot, ov, oc = old
            if term < ot:
                self.fail("commit monotonic", f"{node}'s durable term went from {ot} down to {term}")
            elif term == ot and ov is not None and vote != ov:
                self.fail("one vote per term", f"{node}'s durable vote in term {term} changed from {ov} to {vote}")
            if commit < oc:
                self.fail("commit monotonic", f"{node}'s durable commit went from {oc} down to {commit}")
        self.durable[node] = (term, vote, commit)

    def vote_granted(self, voter: str, term: int, candidate: str) -> None:
        """A VoteResp(reject=False) is about to be sent: the vote must be durable
        already, and the only one this voter gave in this term."""
        d = self.durable.get(voter)
        if d is None or d[0] != term or d[1] != candidate:
            self.fail("one vote per term", f"{voter} granted its term-{term} vote to {candidate} before it was "
                      f"durable (durable term/vote {d[:2] if d else None})")
        prev = self.votes.setdefault((term, voter), candidate)
        if prev != candidate:
            self.fail("one vote per term", f"{voter} voted for {prev} and for {candidate} in term {term}")

    def message_sent(self, node: str, kind: str, term: int, to: str, durable_term: int, durable_vote: str | None) -> None:
        """Persist before send: a message carries a term the sender has made
        durable (`durable_term`: what a restart would recover, the hard state's
        or the durable log's last term); pre-votes and their answers excepted,
        they speak of a term not adopted. A Vote request goes out only once the
        candidate's vote for itself is durable."""
        if kind in ("PreVote", "PreVoteResp"):
            return
        if term > durable_term:
            self.fail("persist before send", f"{node} sent a {kind} of term {term} to {to} while its durable term "
                      f"was {durable_term}")
        elif kind == "Vote" and (durable_term != term or durable_vote != node):
            self.fail("persist before send", f"{node} asked {to} for a vote in term {term} before its own vote for "
                      f"itself was durable (durable term {durable_term}, vote {durable_vote})")

    def leader_wrote(self, node: str, term: int, first_index: int, last_before: int, terms: list[int]) -> None:
        """Leader append-only: a leader only appends entries of its own term after
        its last one; it never overwrites or deletes its own log."""
        if first_index <= last_before:
            self.fail("leader append-only", f"{node}, leader of term {term}, rewrote its log from index {first_index} "
                      f"(its last index was {last_before})")
        if any(t != term for t in terms):
            self.fail("leader append-only", f"{node}, leader of term {term}, appended entries of terms {sorted(set(terms))}")

    def restarted(self, node: str, log: LogView) -> None:
        """A node restarted from `log` (its durable log/snapshot): nothing it ever
        applied may be missing or different."""
        self.node_down(node)
        ma = self.max_applied.get(node)
        if ma is None or ma[0] == 0:
            return
        index, chain = ma
        if index > log.last_index:
            self.fail("applied durable", f"{node} applied up to {index} but restarted with a log ending at {log.last_index}")
        elif index >= log.base_index:
            if log.chain_at(index) != chain:
                self.fail("applied durable", f"{node} restarted with a different entry at index {index} than it had applied")
        else:
            want = self.applied.get(log.base_index)
            if want is not None and want[0] != log.base_chain:
                self.fail("applied durable", f"{node} restarted from a snapshot at {log.base_index} that differs "
                          f"from what was applied")

    # ---------------------------------------------------------------- reads

    def read_requested(self, node: str, ctx: bytes) -> None:
        self._reads[(node, ctx)] = (self.now, self.commit_max)

    def read_answered(self, node: str, ctx: bytes, index: int) -> None:
        asked = self._reads.get((node, ctx))
        if asked is None or index < 0:
            return
        self.counts["reads_checked"] += 1
        if index < asked[1]:
            self.fail("ReadIndex", f"{node}'s read asked at tick {asked[0]} got index {index}, but index {asked[1]} "
                      f"was already committed then (a stale read)")
