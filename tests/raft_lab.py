"""The network-namespace lab (tests/netns.py) with what the Raft integration tests need.

RaftLab(n, voters=..., consensus={...}) is a netns.Lab whose agents read a config
file with a [consensus] table (explicit voters: "all" = n0..n<n-1>), plus:

  api(i, request) / api_many([(i, request), ...])
        consensus API calls (POST /api, sealed with the lab's fleet key) made from
        the hub namespace by one long-lived helper process (tests/helpers/raft_workload.py
        rpc), so the test process, which lives outside the lab's network, can write and
        read without starting a Python per call
  raft(indices)           every node's status "raft" block (None where no answer)
  wait_leader(indices)    until the nodes agree on one leader; (seconds, leader index, term)
  start_workload(...)     the workload client (raft_workload.py run) in the hub namespace
  deafen(i) / undeafen(i) node i stops hearing the other nodes (nftables), still sending to
                          them and talking with the hub both ways
  Workload.history()      its JSON history; to_operations() turns it into lincheck Operations

Cleanup: the helper processes run in their own process groups in the hub namespace;
close() kills them (and Lab.close kills whatever is left in every namespace).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from netns import HUB_ADDR, PORT, RUN_TAG, Lab, node_addr, sh

from agent.sim.lincheck import Operation

WORKLOAD = Path(__file__).resolve().parent / "helpers" / "raft_workload.py"


def nft_problem() -> str | None:
    """Why RaftLab.deafen cannot work here, or None."""
    if shutil.which("nft") is None:
        return "`nft` (nftables) is not installed"
    probe = f"{RUN_TAG}nftprobe"
    try:
        sh("ip", "netns", "add", probe)
        res = sh("ip", "netns", "exec", probe, "nft", "-f", "-", check=False,
                 input="table ip t {\n chain c {\n  type filter hook input priority 0\n  ip saddr 10.0.0.1 drop\n }\n}\n")
        return None if res.returncode == 0 else f"nft cannot add an input rule: {res.stderr.strip()}"
    except (RuntimeError, OSError) as exc:
        return f"cannot probe nftables: {exc}"
    finally:
        sh("ip", "netns", "del", probe, check=False)


class RaftLab(Lab):
    def __init__(self, n: int, workdir: Path | None = None, *, voters: Sequence[str] | str = "all",
                 consensus: dict | None = None, **kw):
        super().__init__(n, workdir, **kw)
        self.voters = [f"n{i}" for i in range(n)] if voters == "all" else voters
        self.consensus = dict(consensus or {})
        self.helpers: list[subprocess.Popen] = []
        self._rpc: subprocess.Popen | None = None
        self._rpc_buf = b""
        self._rpc_seq = itertools.count(1)
        self._rpc_lock = threading.Lock()

    # ---- config and lifecycle

    def _build(self) -> None:
        super()._build()
        lines = ["[consensus]"]
        if self.voters == "auto":
            lines.append('voters = "auto"')
        else:
            lines.append("voters = [" + ", ".join(json.dumps(v) for v in self.voters) + "]")
        for k, v in self.consensus.items():
            lines.append(f"{k} = {json.dumps(v)}")
        (self.workdir / "raft.toml").write_text("\n".join(lines) + "\n")

    def agent_args(self, i: int, *extra: str, **kw):
        cmd, node_id, data_dir = super().agent_args(i, *extra, **kw)
        cmd[cmd.index("--config") + 1] = str(self.workdir / "raft.toml")
        return cmd, node_id, data_dir

    def close(self, failed: bool = False) -> None:
        for p in self.helpers:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in self.helpers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        super().close(failed)

    def start_all(self, indices: Iterable[int], seeds: Sequence[int] = (0,)) -> None:
        for i in indices:
            self.start_agent(i, seeds=seeds)

    def restart(self, i: int, seeds: Sequence[int] = (0,)) -> None:
        """Start node i again (same node id and data dir: a reboot)."""
        self.start_agent(i, seeds=[s for s in seeds if s != i] or [j for j in range(self.n) if j != i][:1])

    def _key_args(self) -> list[str]:
        return ["--fleet-key-file", str(self.key)] if self.key is not None else []

    def _hub_python(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.hub, sys.executable, str(WORKLOAD), *args]

    # ---- a one-way cut

    def deafen(self, i: int) -> None:
        """Node i stops receiving from the other nodes (nftables input rule in its namespace),
        while it still sends to them and both ways to the hub (the clients' side): a leader
        so cut off replicates but never hears an acknowledgement."""
        sh("ip", "netns", "exec", self.ns(i), "nft", "-f", "-", input=(
            "table ip raftlab {\n chain input {\n  type filter hook input priority 0\n"
            f"  ip saddr 10.231.0.0/16 ip saddr != {HUB_ADDR} drop\n }}\n}}\n"))

    def undeafen(self, i: int) -> None:
        sh("ip", "netns", "exec", self.ns(i), "nft", "delete", "table", "ip", "raftlab", check=False)

    # ---- API calls through the rpc helper

    def api_many(self, calls: Sequence[tuple[int, dict]], timeout: float = 4.0) -> list[dict]:
        """Make the calls at once; per call {"status": ok|not-found|conflict|refused|unknown|timeout,
        "answer" | "error", "exit", "elapsed"} (see raft_workload.py)."""
        with self._rpc_lock:
            if self._rpc is None or self._rpc.poll() is not None:
                self._rpc = subprocess.Popen(
                    self._hub_python("rpc", "--mesh", "lab", *self._key_args()), stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, stderr=open(self.workdir / "rpc.log", "ab"), start_new_session=True)
                self.helpers.append(self._rpc)
                self._rpc_buf = b""
            seq = next(self._rpc_seq)
            req = {"id": seq, "timeout": timeout, "calls": [[node_addr(i), PORT, r] for i, r in calls]}
            assert self._rpc.stdin is not None and self._rpc.stdout is not None
            self._rpc.stdin.write(json.dumps(req).encode() + b"\n")
            self._rpc.stdin.flush()
            deadline = time.monotonic() + timeout + 20  # + a cold start of the helper
            fd = self._rpc.stdout.fileno()
            while True:
                while b"\n" in self._rpc_buf:
                    line, self._rpc_buf = self._rpc_buf.split(b"\n", 1)
                    answer = json.loads(line)
                    if answer.get("id") == seq:
                        return answer["results"]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the rpc helper did not answer; see {self.workdir / 'rpc.log'}")
                ready, _, _ = select.select([fd], [], [], left)
                if ready:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        raise RuntimeError(f"the rpc helper exited; see {self.workdir / 'rpc.log'}")
                    self._rpc_buf += chunk

    def api(self, i: int, request: dict, timeout: float = 4.0) -> dict:
        return self.api_many([(i, request)], timeout)[0]

    # ---- Raft state

    def raft(self, indices: Iterable[int], timeout: float = 1.5) -> dict[int, dict | None]:
        idx = list(indices)
        got = self.get([(i, "status") for i in idx], timeout)
        return {i: (s or {}).get("raft") if s is not None else None for i, s in zip(idx, got)}

    def index_of(self, node_id: str | None) -> int | None:
        if node_id is None or not node_id.startswith("n"):
            return None
        with contextlib.suppress(ValueError):
            return int(node_id[1:])
        return None

    def agreed_leader(self, indices: Iterable[int], min_term: int = 0, not_leader: str | None = None):
        """A predicate for wait_until: every node answers, all name the same leader of one
        term >= min_term (other than not_leader), and that leader says it is the leader."""
        idx = list(indices)

        def pred():
            self.check_running(idx)
            st = self.raft(idx, timeout=1.0)
            view = {i: None if s is None else (s["role"], s["term"], s["leader"], s["mode"]) for i, s in st.items()}
            if any(s is None for s in st.values()):
                return False, view
            leaders = {(s["leader"], s["term"]) for s in st.values()}
            if len(leaders) != 1:
                return False, view
            (leader, term), = leaders
            li = self.index_of(leader)
            if leader is None or leader == not_leader or term < min_term or li not in st:
                return False, view
            ok = st[li]["role"] == "leader" and st[li]["mode"] == "read-write"
            return ok, {"leader": li, "term": term, "view": view}
        return pred

    def wait_leader(self, indices: Iterable[int], timeout: float = 15, interval: float = 0.1, *,
                    min_term: int = 0, not_leader: str | None = None) -> tuple[float, int, int]:
        idx = list(indices)
        took, state = self.wait_until(self.agreed_leader(idx, min_term, not_leader), timeout, interval,
                                      what=f"nodes {idx} to agree on a leader")
        return took, state["leader"], state["term"]

    def wait_caught_up(self, indices: Iterable[int], timeout: float = 20) -> dict[int, dict]:
        """Until every node has the same commit index and has applied it; the raft blocks."""
        idx = list(indices)

        def pred():
            self.check_running(idx)
            st = self.raft(idx, timeout=1.0)
            if any(s is None for s in st.values()):
                return False, st
            commits = {s["commit_index"] for s in st.values()}
            applied = {s["applied_index"] for s in st.values()}
            return len(commits) == 1 and applied == commits, {i: (s["commit_index"], s["applied_index"]) for i, s in st.items()}
        self.wait_until(pred, timeout, 0.25, what=f"nodes {idx} to reach the same commit index")
        return self.raft(idx)

    # ---- the workload

    def start_workload(self, name: str, duration: float, *, clients: int = 4, keys: int = 5, timeout: float = 4.0,
                       targets: Iterable[int] | None = None, seed: str = "0", pace_ms: float = 20.0,
                       max_ops: int = 3000, mix: str = "0.4,0.4,0.2") -> Workload:
        targets = list(range(self.n)) if targets is None else list(targets)
        out = self.workdir / f"{name}.json"
        ready = self.workdir / f"{name}.ready"
        nodes = ",".join(f"{i}={node_addr(i)}:{PORT}" for i in targets)
        cmd = self._hub_python("run", "--mesh", "lab", *self._key_args(), "--nodes", nodes, "--duration", str(duration),
                               "--clients", str(clients), "--keys", str(keys), "--timeout", str(timeout), "--seed", seed,
                               "--pace-ms", str(pace_ms), "--max-ops", str(max_ops), "--mix", mix, "--run-id", name,
                               "--out", str(out), "--ready-file", str(ready))
        log = open(self.workdir / f"{name}.log", "ab")
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.helpers.append(popen)
        wl = Workload(self, popen, out, ready, duration, timeout)
        wl.ready_time = wl.wait_started()
        return wl


@dataclass
class Workload:
    lab: RaftLab
    popen: subprocess.Popen
    out: Path
    ready: Path
    duration: float
    timeout: float
    ready_time: float = 0.0  #: when it started (monotonic)

    def wait_started(self, limit: float = 20) -> float:
        """Until the helper has imported everything and started; its start time (monotonic)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.ready.exists() and self.ready.read_text():
                return float(self.ready.read_text())
            if self.popen.poll() is not None:
                raise AssertionError(f"the workload exited {self.popen.returncode}:\n{self._log()}")
            time.sleep(0.05)
        raise AssertionError(f"the workload did not start within {limit} s:\n{self._log()}")

    def _log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.out.parent / (self.out.stem + ".log")).read_text()[-3000:]
        return ""

    def wait(self) -> dict:
        """Until it has finished (bounded); its history."""
        try:
            rc = self.popen.wait(timeout=self.duration + 2 * self.timeout + 30)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            raise AssertionError(f"the workload overran its bound:\n{self._log()}") from None
        assert rc == 0, f"the workload exited {rc}:\n{self._log()}"
        return json.loads(self.out.read_text())


# ----------------------------------------------------------------------------- histories


def to_operations(ops: Iterable[dict]) -> list[Operation]:
    """The workload's records as lincheck Operations, keeping the semantics right:

    put   ok -> acknowledged; timeout / unknown (exit 1) -> may or may not have taken
          effect (return_time = inf); refused (exit 3) -> did not take effect: left out
    get   ok -> the value; not-found -> None (absent); anything else constrains nothing
    cas   ok -> True; conflict -> False (unique values: a revision names one value);
          timeout / unknown -> inf; refused -> left out
    """
    out = []
    for r in ops:
        st = r["status"]
        ret = math.inf if st in ("timeout", "unknown") else r["ret"]
        if r["op"] == "get":
            if st == "ok":
                out.append(Operation(r["client"], "get", r["key"], None, r["output"], r["call"], r["ret"]))
            elif st == "not-found":
                out.append(Operation(r["client"], "get", r["key"], None, None, r["call"], r["ret"]))
            continue
        if st in ("refused",):
            continue
        if st not in ("ok", "conflict", "timeout", "unknown"):
            raise ValueError(f"unexpected status {st!r} for a {r['op']}: {r}")
        if r["op"] == "put":
            if st == "conflict":
                raise ValueError(f"a put answered conflict: {r}")
            out.append(Operation(r["client"], "put", r["key"], r["input"], None, r["call"], ret))
        else:
            output = {"ok": True, "conflict": False}.get(st)
            out.append(Operation(r["client"], "cas", r["key"], tuple(r["input"]), output, r["call"], ret))
    return out


def summarize(history: dict) -> dict:
    meta, ops = history["meta"], history["ops"]
    secs = max(1e-9, meta["end"] - meta["start"])
    done = [o for o in ops if o["status"] in ("ok", "not-found", "conflict")]
    writes_ok = [o for o in ops if o["op"] != "get" and o["status"] == "ok"]
    lat = sorted(o["ret"] - o["call"] for o in done)
    return {
        "ops": len(ops), "seconds": round(secs, 1), "answered_ops_per_s": round(len(done) / secs, 1),
        "acked_writes_per_s": round(len(writes_ok) / secs, 1), "statuses": meta["statuses"],
        "latency_ms_p50": round(1000 * lat[len(lat) // 2], 1) if lat else None,
        "latency_ms_p99": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1) if lat else None,
    }
