"""The network-namespace lab (tests/netns.py) with what the task integration tests need.

TaskLab(n, tasks={...}, load={...}) is a lab whose agents read one config file,
`tasks.toml` in the lab's workdir: consensus off (tasks do not need it, and five Raft
voters would only eat the CPU the scenario measures), `load.cpu_scope = "tree"` (several
agents share this host, so each node's load is the CPU of its own process tree: the
agent and the handlers it started, measured by psutil), a load sample every 500 ms (so a
busy node's gossiped load climbs past tasks.overload within seconds, not the default
tens of seconds), tasks.slots = 2, and one configured handler:

    [handlers.burn]   python -c <a busy loop> {seconds}: real CPU for `seconds`, started at
                      nice 10 so the agents sharing the host's cores still get theirs;
                      the loop's CPU is the handler's, so it is counted in its agent's tree

It reuses RaftLab's API plumbing (api / api_many: sealed POST /api from one long-lived
helper process in the hub namespace, tests/helpers/raft_workload.py rpc) and adds:

  api_batched(calls)                api_many, API_BATCH calls in flight at most (the replay window)
  submit_many([(i, fields), ...], tag)  task.submit on node i (fields as the API takes them) with an
                                    idempotency key each, made again when unanswered (`resubmits`)
  socket_drops(indices)             datagrams the kernel dropped at each agent's full socket buffer
  records(via, ids)                 task.get of every id through node `via` -> {id: record}
  task_status(indices)              every node's status "tasks" block (None: no answer)
  cpu(indices)                      every node's status load.cpu (percent of one core)
  peer_cpu(observers, subject)      the subject's load.cpu as each observer's gossip has it
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from netns import PORT, Lab
from raft_lab import RaftLab

#: The burner: a busy loop for argv[1] seconds (placeholders are filled only after argv[0],
#: and the code holds no brace, so `{seconds}` is the only substitution).
BURN_CODE = "import os, sys, time\nos.nice(10)\nend = time.monotonic() + float(sys.argv[1])\nwhile time.monotonic() < end:\n    pass\n"

#: API calls in flight at once from the one rpc helper: its sealed requests carry one sender's
#: counter, and the agent's replay window is 64 wide, so more at once could arrive too far out
#: of order and be refused as "not sealed with this mesh's fleet key".
API_BATCH = 16
DEFAULT_TASKS = {"slots": 2}
DEFAULT_LOAD = {"cpu_scope": "tree", "sample_interval_ms": 500, "meta_refresh_ms": 2000}


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(v)  # strings, numbers and lists of them are the same in TOML


def tasks_toml(tasks: dict, load: dict, python: str = sys.executable) -> str:
    """The lab's config file: see the module doc."""
    lines = ["[consensus]", "enabled = false", "", "[load]"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in load.items()]
    lines += ["", "[tasks]"] + [f"{k} = {_toml_value(v)}" for k, v in tasks.items()]
    lines += ["", "[handlers.burn]", f"command = {_toml_value([python, '-c', BURN_CODE, '{seconds}'])}",
              "timeout_s = 600", "concurrency = 2", ""]
    return "\n".join(lines)


class TaskLab(RaftLab):
    def __init__(self, n: int, workdir: Path | None = None, *, tasks: dict | None = None, load: dict | None = None, **kw):
        super().__init__(n, workdir, consensus={"enabled": False}, **kw)
        self.tasks_cfg = {**DEFAULT_TASKS, **(tasks or {})}
        self.load_cfg = {**DEFAULT_LOAD, **(load or {})}
        self.config = self.workdir / "tasks.toml"
        self.resubmits = 0

    def _build(self) -> None:
        Lab._build(self)  # the namespaces and key; not RaftLab's consensus config
        self.config.write_text(tasks_toml(self.tasks_cfg, self.load_cfg))

    def agent_args(self, i: int, *extra: str, **kw):
        cmd, node_id, data_dir = Lab.agent_args(self, i, *extra, **kw)
        cmd[cmd.index("--config") + 1] = str(self.config)
        return cmd, node_id, data_dir

    # ---- the task API

    def api_batched(self, calls: Sequence[tuple[int, dict]], timeout: float = 6.0, batch: int = API_BATCH) -> list[dict]:
        """api_many, at most `batch` calls in flight at once (see API_BATCH)."""
        out: list[dict] = []
        for k in range(0, len(calls), batch):
            out += self.api_many(calls[k : k + batch], timeout)
        return out

    def submit_many(self, calls: Sequence[tuple[int, dict]], tag: str, timeout: float = 4.0, tries: int = 3) -> list[dict]:
        """task.submit of each (node, fields), call k with the idempotency key "<tag>-<k>"; a call
        left unanswered (a lost datagram) is made again, which the key makes safe: the
        resubmission finds the task if the first one got through. Counts those in `resubmits`."""
        reqs = [(i, {"op": "task.submit", "key": f"{tag}-{k}", **fields}) for k, (i, fields) in enumerate(calls)]
        out: list[dict | None] = [None] * len(reqs)
        todo = list(range(len(reqs)))
        for attempt in range(tries):
            got = self.api_batched([reqs[k] for k in todo], timeout)
            for k, r in zip(todo, got):
                out[k] = r
            todo = [k for k in todo if out[k]["status"] == "timeout"]
            if not todo or attempt == tries - 1:
                break
            self.resubmits += len(todo)
        return out

    def records(self, via: int, ids: Iterable[str], timeout: float = 6.0) -> dict[str, dict | None]:
        """{id: record view (task.get's "task") or None where the call failed}, asked `batch` at a time."""
        ids = list(ids)
        got = self.api_batched([(via, {"op": "task.get", "id": t}) for t in ids], timeout)
        return {t: r["answer"]["task"] if r["status"] == "ok" else None for t, r in zip(ids, got)}

    # ---- status

    def task_status(self, indices: Iterable[int], timeout: float = 1.5) -> dict[int, dict | None]:
        idx = list(indices)
        got = self.get([(i, "status") for i in idx], timeout)
        return {i: None if s is None else s.get("tasks") for i, s in zip(idx, got)}

    def socket_drops(self, indices: Iterable[int]) -> dict[int, int]:
        """Datagrams the kernel dropped at each node's agent socket (port PORT) because its receive
        buffer was full: the drops column of /proc/net/udp{,6} read inside the node's namespace."""
        out = {}
        for i in indices:
            res = self.run_in(i, "cat", "/proc/net/udp", "/proc/net/udp6", timeout=5)
            rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip() and not ln.lstrip().startswith("sl")]
            out[i] = sum(int(r[-1]) for r in rows if r[1].rsplit(":", 1)[-1] == f"{PORT:04X}")
        return out

    def cpu(self, indices: Iterable[int], timeout: float = 1.5) -> dict[int, float | None]:
        idx = list(indices)
        got = self.get([(i, "status") for i in idx], timeout)
        return {i: None if s is None else s["load"]["cpu"] for i, s in zip(idx, got)}

    def peer_cpu(self, observers: Iterable[int], subject: int, timeout: float = 1.5) -> dict[int, float | None]:
        views = self.views(observers, timeout)
        sid = self.node_ids([subject])[0]
        return {i: None if v is None or sid not in v else v[sid]["load"]["cpu"] for i, v in views.items()}
