"""The task engine: where each task runs, and making sure it finishes (sans-IO).

Theory of operation
-------------------
Every task has R *home* members: the first R members clockwise from the
task id on a consistent-hash ring of the alive members (for strategy `hash`,
of the alive members able to run it). The first home member that holds the
record is its *coordinator* (`agent.core.coordinator`): it places the task
(capability match and load, an auction, or the ring owner itself), replicates
the record to the other home members after every change, asks executors now
and then whether they still have their tasks, re-places a task whose executor
died or lost it, and records its single result. When members come and go the
home set moves with the ring (about 1/N of the tasks per change) and holders
hand records to the new home members; if the coordinator dies, the next home
member already has the record and takes over.

Each node is also an *executor* (`agent.core.executor`): a priority queue,
journaled so it survives a restart, that starts tasks as slots free up,
reports queued/running/done to the coordinator, resends results until they
are acknowledged, gives queued tasks to idle peers that ask (work stealing:
the victim removes them first, so a task never runs twice at once) and pushes
queued tasks to idle peers while it is overloaded (load balancing, with
hysteresis).

Guarantees: at least once (a task whose node dies is run again, up to
max_attempts), a single recorded result per task id (first result wins at
the coordinator; replicas that disagree after a split converge on the lower
attempt, see `taskspec.newer`), and no two concurrent runs of one task unless
a node was declared dead while it was still running (a false death or a
partition), which a failure detector cannot rule out.

The engine never reads a clock or the network: the caller feeds it time,
the membership view, its own load and messages, and carries out what it
returns, persisting journal changes before sending messages.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from agent.core.coordinator import Coordinator
from agent.core.executor import Executor
from agent.core.taskctx import BUILTIN_KINDS, Ctx, Kill, MemberInfo, Start, TaskSettings
from agent.core.taskspec import Result, TaskSpec, task_id_for_key
from agent.counters import Counters

__all__ = ["BUILTIN_KINDS", "Kill", "MemberInfo", "Start", "TaskEngine", "TaskSettings"]


class TaskEngine:
    """One node's task protocol: the coordinator and executor roles behind one
    step/tick interface (see the module doc and docs/tasks.md)."""

    def __init__(self, node_id: str, settings: TaskSettings, rng: random.Random, kinds: Mapping[str, int],
                 caps: tuple[str, ...] = (), counters: Counters | None = None):
        self.ctx = Ctx(node_id, settings, rng, kinds, caps, counters)
        self.coord = Coordinator(self.ctx)
        self.exec = Executor(self.ctx)
        self._last_view: Mapping[str, MemberInfo] | None = None

    # ------------------------------------------------------------ inputs

    def set_time(self, now_ms: int, wall_ms: int) -> None:
        self.ctx.now, self.ctx.wall = now_ms, wall_ms

    def set_view(self, members: Mapping[str, MemberInfo]) -> None:
        own = self.ctx.view[self.ctx.me]
        if members is self._last_view and (own.queued, own.load) == (self.exec.queued_count(), self.ctx.load):
            return  # nothing changed since the last call (the driver hands the same object back)
        self._last_view = members
        view = dict(members)
        me = self.ctx.me
        view[me] = MemberInfo(me, self.ctx.caps, frozenset(self.ctx.kinds), self.ctx.load, self.exec.queued_count(), self.ctx.mem_pct)
        old = self.ctx.view
        restarted = {n for n, i in view.items() if n in old and i.boot != old[n].boot}
        gone = set(old) - set(view)
        self.ctx.view = view
        if restarted:
            self.coord.members_restarted(restarted)
        if view.keys() != old.keys() or restarted:
            self.coord.members_changed(gone)

    def set_load(self, load: float | None, mem_pct: float | None) -> None:
        self.ctx.load, self.ctx.mem_pct = load, mem_pct
        self.exec.load_sample(load)

    def step(self, frm: str, msg) -> None:
        handler = self.coord.handlers.get(type(msg)) or self.exec.handlers.get(type(msg))
        if handler is None:
            self.ctx.counters.inc("task_unexpected_message")
            return
        handler(frm, msg)

    def tick(self) -> None:
        self.coord.tick()
        self.exec.tick()

    def finished(self, task_id: str, attempt: int, result: Result) -> None:
        self.exec.finished(task_id, attempt, result)

    def pause(self) -> None:
        """Shutting down: start nothing more (what is queued stays journaled)."""
        self.exec.paused = True

    def restore(self, journal: Mapping[str, object]) -> None:
        self.coord.restore(journal)
        self.exec.restore(journal)

    # ------------------------------------------------------------ outputs

    def take_outbox(self) -> list[tuple[str, object]]:
        out, self.ctx.outbox = self.ctx.outbox, []
        return out

    def take_actions(self) -> list[Start | Kill]:
        out, self.ctx.actions = self.ctx.actions, []
        return out

    def take_journal(self) -> list[tuple[str, object | None]]:
        out, self.ctx.journal = self.ctx.journal, []
        return out

    # ------------------------------------------------------------ views

    def home(self, spec: TaskSpec) -> list[str]:
        return self.ctx.home(spec)

    def capable_members(self, spec: TaskSpec) -> list[str]:
        return sorted(n for n in self.ctx.view if self.ctx.capable(spec, n))

    def new_task_id(self, key: str = "") -> str:
        """The id for a new task: derived from its idempotency key when it has one
        (so a resubmission names the same task), else random."""
        return task_id_for_key(key) if key else f"{self.ctx.rng.getrandbits(64):016x}"

    @property
    def records(self):
        return self.coord.records

    def busy(self) -> bool:
        """Something here has a timer running (a record, an auction, a queue, a run, a resend)."""
        c, e = self.coord, self.exec
        return bool(c.active or c.auctions or e.queue or e.running or e.unacked or e.announce)

    def counts(self) -> dict[str, int]:
        states = [r.state for r in self.coord.records.values()]
        return {
            "queued": self.exec.queued_count(),
            "running": len(self.exec.running),
            "done": states.count("done"),
            "failed": states.count("failed"),
            "pending": states.count("pending"),
            "records": len(states),
        }

    def local_tasks(self) -> list[dict]:
        return self.exec.describe()

    def queued_count(self) -> int:
        return self.exec.queued_count()
