"""Linearizability checker for key-value register histories, after Porcupine.

A history is what clients saw: each `Operation` was called at `call_time` and
returned at `return_time` with `output`. It is linearizable if every
operation can be given a point between its call and its return such that
running the operations one at a time in that order, on a single-copy
register per key, gives exactly the outputs observed.

How: keys are independent registers, and linearizability is compositional
(Herlihy & Wing's locality, which Porcupine calls P-compositionality), so each
key's sub-history is checked on its own. Per key, the search is Wing & Gong's
as improved by Lowe ("Testing for linearizability", 2017), as Porcupine's
`checkSingle` does it: walk a linked list of call and return events in time
order; at a call, try to linearize that operation now (the model accepts its
output), lift it out of the list and start again from the front; at a return
of an operation not yet linearized, undo the last choice (backtrack). A cache
of (set of linearized operations as a bitmask, register state) prunes
configurations already explored, which turns the exponential search into
something that finishes on real histories. A step budget bounds the work:
past it the answer is "unknown" (ok=None), never a hang.

Time: events at equal times count as concurrent (calls sort before returns),
so a checker never fails a history for a tie in a coarse clock.

Timed-out operations: return_time = math.inf and the output is unknown. Such
an operation may be linearized at any point after its call, including after
everything else, which is the same as never having taken effect. A timed-out
get constrains nothing and is dropped. An operation that failed definitely
(an error answer, so it did not take effect) should be left out of the
history by the caller.

The register model (None is "absent"; values must be hashable and not None):
    put    input=value                 output ignored
    get    input ignored               output=value or None
    cas    input=(expected, new)       output True (swapped) / False / None (unchecked);
           expected None means "must not exist"
    del    input ignored               output True (existed) / False (was absent) / None (unchecked)
The state machine's cas compares revisions; a client history records the
value it expected instead (a revision names exactly one value of the key).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

OPS = ("put", "get", "cas", "del")
DEFAULT_BUDGET = 500_000  #: search steps per key before the answer is "unknown"
MINIMIZE_LIMIT = 400  #: operations of a failing key beyond which no witness is minimized


@dataclass(frozen=True)
class Operation:
    client: Hashable
    op: str
    key: Hashable
    input: Hashable = None
    output: Hashable = None
    call_time: float = 0.0
    return_time: float = math.inf

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, not {self.op!r}")
        if not self.call_time <= self.return_time:
            raise ValueError(f"returns ({self.return_time}) before its call ({self.call_time})")
        if self.op == "cas":
            if not isinstance(self.input, (tuple, list)) or len(self.input) != 2:
                raise ValueError("cas input is (expected, new)")
            object.__setattr__(self, "input", tuple(self.input))
            if self.input[1] is None:
                raise ValueError("cas cannot write None (None means absent)")
        if self.op == "put" and self.input is None:
            raise ValueError("put cannot write None (None means absent)")
        hash((self.key, self.input, self.output))  # the search keys its cache on values

    @property
    def timed_out(self) -> bool:
        return self.return_time == math.inf

    def __str__(self) -> str:
        args = {
            "put": f"{self.key!r}, {self.input!r}",
            "get": f"{self.key!r}",
            "cas": f"{self.key!r}, {self.input[0]!r} -> {self.input[1]!r}" if self.op == "cas" else "",
            "del": f"{self.key!r}",
        }[self.op]
        if self.timed_out:
            out = "timed out"
        elif self.op == "put":
            out = "ok"
        else:
            out = repr(self.output)
        end = "inf" if self.timed_out else f"{self.return_time:g}"
        return f"[{self.call_time:g}, {end}] {self.client}: {self.op}({args}) -> {out}"


@dataclass(frozen=True)
class Verdict:
    """ok: True linearizable, False not, None unknown (a key ran out of budget
    and no key failed). key_failing: the first key (in history order) found
    not linearizable. witness: a sub-history of that key that is already not
    linearizable (observations that do not matter removed; all writes kept,
    so it fails for the same reason the whole does)."""

    ok: bool | None
    key_failing: Hashable = None
    explanation: str = ""
    witness: tuple[Operation, ...] = ()
    unknown_keys: tuple = ()

    def __bool__(self) -> bool:
        raise TypeError("use verdict.ok (True / False / None), not the verdict itself")


def check(
    history: Iterable[Operation],
    *,
    initial: Mapping | None = None,
    budget: int = DEFAULT_BUDGET,
    minimize: bool = True,
) -> Verdict:
    """Check a history; `initial` gives keys' values before it (default: all absent)."""
    initial = initial or {}
    by_key: dict = defaultdict(list)
    for op in history:
        if not isinstance(op, Operation):
            raise TypeError(f"not an Operation: {op!r}")
        by_key[op.key].append(op)
    unknown = []
    for key, ops in by_key.items():
        init = initial.get(key)
        found, trace = _search(ops, init, budget)
        if found is None:
            unknown.append(key)
        elif not found:
            witness = _minimize(ops, init, budget) if minimize and len(ops) <= MINIMIZE_LIMIT else ops
            return Verdict(False, key, _explain(key, init, ops, witness, trace), tuple(witness), tuple(unknown))
    if unknown:
        return Verdict(None, None, f"search budget of {budget} steps exhausted for {len(unknown)} key(s)", (), tuple(unknown))
    return Verdict(True, None, f"{len(by_key)} key(s) linearizable")


# ------------------------------------------------------------------ search


def _step(state, kind: str, inp, out, known: bool):
    """(output accepted, next state) for one operation on the register."""
    if kind == "put":
        return True, inp
    if kind == "get":
        return out == state, state
    if kind == "cas":
        hit = state == inp[0]
        if known and out is not None and out != hit:
            return False, state
        return True, inp[1] if hit else state
    existed = state is not None  # del
    if known and out is not None and out != existed:
        return False, state
    return True, None


def _search(ops: list[Operation], init, budget: int):
    """(True | False | None, deepest partial linearization as op positions)."""
    ops = [op for op in ops if not (op.op == "get" and op.timed_out)]
    n = len(ops)
    if n == 0:
        return True, []
    # Events: 1..2n; 0 is the head sentinel, 2n+1 the tail. Calls sort before
    # returns at equal times (concurrent).
    events = sorted(
        [(op.call_time, 0, i) for i, op in enumerate(ops)] + [(op.return_time, 1, i) for i, op in enumerate(ops)]
    )
    head, tail = 0, 2 * n + 1
    nxt = list(range(1, 2 * n + 2)) + [tail]
    prv = [head] + list(range(0, 2 * n + 1))
    is_call = [False] * (2 * n + 2)
    opid = [0] * (2 * n + 2)
    ret_node = [0] * n
    for pos, (_, kind, i) in enumerate(events, start=1):
        opid[pos] = i
        if kind == 0:
            is_call[pos] = True
        else:
            ret_node[i] = pos
    match = [0] * (2 * n + 2)
    for pos in range(1, 2 * n + 1):
        if is_call[pos]:
            match[pos] = ret_node[opid[pos]]
    model = [(op.op, op.input, op.output, not op.timed_out) for op in ops]

    state = init
    linearized = 0
    stack: list[tuple[int, object]] = []
    cache: set = set()
    deepest: list[int] = []
    steps = 0
    e = nxt[head]
    while nxt[head] != tail:
        steps += 1
        if steps > budget:
            return None, deepest
        if is_call[e]:
            i = opid[e]
            kind, inp, out, known = model[i]
            ok, new = _step(state, kind, inp, out, known)
            if ok:
                marked = linearized | (1 << i)
                if (marked, new) not in cache:
                    cache.add((marked, new))
                    stack.append((e, state))
                    state, linearized = new, marked
                    m = match[e]  # lift the call and its return out of the list
                    nxt[prv[e]], prv[nxt[e]] = nxt[e], prv[e]
                    nxt[prv[m]], prv[nxt[m]] = nxt[m], prv[m]
                    e = nxt[head]
                    continue
            e = nxt[e]
        else:
            if len(stack) > len(deepest):  # stuck at a new depth: remember how we got here
                deepest = [opid[x] for x, _ in stack]
            if not stack:
                return False, deepest
            e, state = stack.pop()
            linearized &= ~(1 << opid[e])
            m = match[e]  # put them back, the return first
            nxt[prv[m]] = prv[nxt[m]] = m
            nxt[prv[e]] = prv[nxt[e]] = e
            e = nxt[e]
    return True, [opid[x] for x, _ in stack]


def _has_no_effect(op: Operation) -> bool:
    """An observation: in any linearization that accepts its output it leaves
    the register as it was. Removing it only removes a constraint, so a
    history that still fails without it failed with it too."""
    if op.timed_out:
        return op.op == "get"
    return op.op == "get" or (op.op in ("cas", "del") and op.output is False)


def _quiescent_prefixes(ops: list[Operation]) -> list[list[Operation]]:
    """Prefixes (by call time) after which the history is quiet: every kept
    operation returned before any dropped one was called. Every order of the
    whole history puts such a prefix first, so if a prefix fails, the whole
    fails for a reason inside the prefix. Shortest first; the last is all."""
    ordered = sorted(ops, key=lambda o: (o.call_time, o.return_time))
    cuts = []
    latest = -math.inf
    for j, o in enumerate(ordered):
        latest = max(latest, o.return_time)
        if j + 1 < len(ordered) and latest < ordered[j + 1].call_time:
            cuts.append(j + 1)
    return [ordered[:c] for c in cuts] + [ordered]


def _minimize(ops: list[Operation], init, budget: int) -> list[Operation]:
    """Cut the history at the earliest quiet point where it already fails
    (binary search: a failing prefix stays failing when extended to a later
    quiet point), then greedily drop observations while it still fails."""
    prefixes = _quiescent_prefixes(ops)
    lo, hi = 0, len(prefixes) - 1  # prefixes[hi] is known to fail
    while lo < hi:
        mid = (lo + hi) // 2
        if _search(prefixes[mid], init, budget)[0] is False:
            hi = mid
        else:
            lo = mid + 1
    keep = prefixes[hi]
    i = len(keep) - 1
    while i >= 0:  # latest first: the violation is usually near the end
        if _has_no_effect(keep[i]):
            trial = keep[:i] + keep[i + 1 :]
            if _search(trial, init, budget)[0] is False:
                keep = trial
        i -= 1
    return keep


def _explain(key, init, ops: list[Operation], witness: list[Operation], trace: list[int]) -> str:
    live = [op for op in ops if not (op.op == "get" and op.timed_out)]
    lines = [f"key {key!r} (initially {init!r}) is not linearizable: {len(ops)} operation(s)."]
    lines.append(f"Witness, {len(witness)} operation(s) that cannot be ordered (by call time):")
    lines += ["  " + str(op) for op in sorted(witness, key=lambda o: (o.call_time, o.return_time))]
    state = init
    lines.append("Longest order the search found before getting stuck:")
    for i in trace:
        op = live[i]
        _, state = _step(state, op.op, op.input, op.output, not op.timed_out)
        lines.append(f"  {op}   => {state!r}")
    placed = set(trace)
    rest = [live[i] for i in range(len(live)) if i not in placed]
    if rest:
        first = min(rest, key=lambda o: o.return_time)
        lines.append(f"then no remaining operation fits before {first} must return (register = {state!r}).")
    return "\n".join(lines)


# --------------------------------------------------------- lost writes


def _effect(op: Operation):
    """(writes?, value after) for an acknowledged operation."""
    if op.timed_out:
        return False, None
    if op.op == "put":
        return True, op.input
    if op.op == "cas" and op.output is True:
        return True, op.input[1]
    if op.op == "del" and op.output is not False:
        return True, None
    return False, None


def _may_write(op: Operation) -> bool:
    """Could this operation have changed the register at all?"""
    if op.op == "get":
        return False
    if op.timed_out:
        return True
    return not (op.op in ("cas", "del") and op.output is False)


def lost_acknowledged_writes(history: Iterable[Operation], final_state: Mapping) -> list[Operation]:
    """Acknowledged writes (put; cas that answered True; del that did not
    answer False) whose effect is not in `final_state` (key -> value; a
    missing key is absent) although no other operation that may have written
    the key could come after them: every other possible writer returned
    before the write was called. Sorted by call time."""
    by_key: dict = defaultdict(list)
    for op in history:
        by_key[op.key].append(op)
    lost = []
    for key, ops in by_key.items():
        final = final_state.get(key)
        writers = [op for op in ops if _may_write(op)]
        for op in ops:
            writes, value = _effect(op)
            if not writes or value == final:
                continue
            if all(w is op or w.return_time < op.call_time for w in writers):
                lost.append(op)
    return sorted(lost, key=lambda o: (o.call_time, o.return_time))
