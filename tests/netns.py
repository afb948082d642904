"""A network-namespace lab: real `meshagent run` processes on a private virtual LAN.

Used by tests/test_integration_mesh.py and bench/mesh_real.py. Needs root and
iproute2 (`ip netns`, `tc`); loss also needs tc netem or, where the kernel lacks
sch_netem, nftables (see `Lab.netem`).

Topology. Everything is created inside namespaces this module made; nothing is
added to the root namespace (no device, no address, no route, no rule):

    hub ns   ma-<run>-hub   bridge br0 (STP off, multicast snooping off)
                            address 10.231.255.254/16: the poller's address
                            ports v0, v1, ... (one per node)
    node ns  ma-<run>-<i>   eth0 = peer of v<i>, 10.231.<i // 200>.<i % 200 + 1>/16,
                            lo up, multicast on, route 224.0.0.0/4 dev eth0,
                            no default route (nothing can leave the lab)

`<run>` is `<pid of the test process>x<lab counter>`, so concurrent runs on one
machine never share a name, and `sweep()` (also registered with atexit) removes
exactly this process's leftovers.

Multicast (mDNS): the bridge floods 224.0.0.251 to every port (link-local
groups are never snooped; snooping is switched off anyway), every eth0 has the
MULTICAST flag and a 224.0.0.0/4 route so an unpinned multicast send has a way out.

Partitions (`partition([[0, 1], [2, 3, 4]])`): group 0 stays on br0, group k is
moved to its own bridge br<k> by re-attaching the hub side of its veths
(`ip link set v<i> master br<k>`). Each group keeps full connectivity (unicast
and multicast) inside itself and none across; the hub does not forward IP
between bridges (ip_forward is 0 in a new namespace). br<k> gets 10.231.255.<254-k>/32
and the hub /32 routes to the members of group k through br<k>, so the poller
still reads every node during a partition. `heal()` moves every port back to br0.

Loss (`netem(i, loss="20%")`): tc netem on node i's eth0 root qdisc, i.e. on
what node i *sends* (where="node", the default); where="hub" puts it on v<i> in
the hub (what node i *receives*), where="both" on both. With where="node" on
every node, each datagram between two agents crosses exactly one lossy hop, so
"20% on every link" is a 20% independent loss per datagram per direction (a
probe + ack round trip then succeeds with 0.8^2 = 64%). Kernels without sch_netem
(some CI and VM kernels) get the same semantics from nftables in the node's
namespace: `numgen random mod 10000 < p*100 drop` in an output (node) or input (hub)
chain on IPv4; that fallback drops no ARP and cannot delay. `lab.loss_method`
says which one was used.

Reading nodes. `cli(i, "peers")` runs the real `python -m agent peers --json`
inside a node's namespace (a Python start per call: use sparingly). `peers(i)`,
`status(i)` and `views()` go through one long-lived poller process in the hub
namespace (aiocoap client, GET /peers and /status, CBOR decoded to JSON), which
costs a few milliseconds of CPU per read, so all nodes can be polled every
couple of seconds for minutes without disturbing what is measured.

Cleanup always: `Lab` is a context manager; on exit (normal, exception,
KeyboardInterrupt, SystemExit from SIGTERM) it kills every process it started
(by process group, then every pid left in its namespaces) and deletes its
namespaces, which removes the veths and bridges inside them.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "ma-"
RUN_TAG = f"{PREFIX}{os.getpid()}x"  #: every namespace of this process starts with this
SUBNET = "10.231"
HUB_ADDR = f"{SUBNET}.255.254"
PORT = 5683
ROOT = Path(__file__).resolve().parent.parent

_counter = itertools.count(1)
_live_labs: list[Lab] = []
_ip_lock = threading.Lock()


class LabUnavailable(RuntimeError):
    """The machine cannot host a lab (not root, no netns support...)."""


class LabTimeout(AssertionError):
    """wait_until ran out of time; the message holds the last state and every log's tail."""


# ----------------------------------------------------------------------------- plumbing


def sh(*cmd: str, check: bool = True, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with the command and its stderr."""
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited {res.returncode}: {res.stderr.strip() or res.stdout.strip()}")
    return res


def node_addr(i: int) -> str:
    if not 0 <= i < 200 * 250:
        raise ValueError(f"node index {i} out of range")
    return f"{SUBNET}.{i // 200}.{i % 200 + 1}"


def list_netns() -> list[str]:
    res = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def _kill_ns_pids(ns: str) -> None:
    res = sh("ip", "netns", "pids", ns, check=False)
    for pid in res.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def sweep(prefix: str = RUN_TAG) -> list[str]:
    """Kill every process inside, then delete, every namespace whose name starts with prefix.

    The default prefix is this process's own, so a sweep never touches a
    concurrent run's lab."""
    removed = []
    for ns in list_netns():
        if ns.startswith(prefix):
            _kill_ns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    return removed


atexit.register(sweep)


def environment_problem() -> str | None:
    """Why this machine cannot host a lab, or None. Creates and removes one namespace."""
    if os.geteuid() != 0:
        return "integration tests need root (network namespaces, veth, bridges)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{RUN_TAG}probe"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "-n", probe, "link", "add", "pbr", "type", "bridge")
        sh("ip", "-n", probe, "link", "add", "pva", "type", "veth", "peer", "name", "pvb")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot create a network namespace with a bridge and a veth pair: {exc}"
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return None


def loss_methods() -> list[str]:
    """Which loss mechanisms this machine has, best first: 'netem', 'nft'."""
    found = []
    probe = f"{RUN_TAG}lossprobe"
    try:
        sh("ip", "netns", "add", probe)
        sh("ip", "-n", probe, "link", "add", "pva", "type", "veth", "peer", "name", "pvb")
        if sh("tc", "-n", probe, "qdisc", "add", "dev", "pva", "root", "netem", "loss", "1%", check=False).returncode == 0:
            found.append("netem")
        if shutil.which("nft") and sh(
            "ip", "netns", "exec", probe, "nft", "-f", "-", check=False,
            input="table ip t {\n chain c {\n  type filter hook output priority 0\n  numgen random mod 10000 < 100 drop\n }\n}\n",
        ).returncode == 0:
            found.append("nft")
    except (RuntimeError, OSError):
        pass
    finally:
        sh("ip", "netns", "del", probe, check=False)
    return found


def coap_client_binary() -> str | None:
    """libcoap's client: `coap-client` or Debian's coap-client-{notls,openssl,gnutls}."""
    for name in ("coap-client", "coap-client-notls", "coap-client-openssl", "coap-client-gnutls"):
        if path := shutil.which(name):
            return path
    return None


def wait_until(pred: Callable[[], tuple[bool, object]], timeout: float, interval: float = 0.5, *,
               what: str = "condition", diagnose: Callable[[], str] | None = None, max_polls: int | None = None):
    """Call pred() -> (done, state) until done; return (elapsed seconds, state).

    Bounded both in time and in the number of polls. On timeout raise LabTimeout
    with `what`, the last observed state and diagnose() (e.g. every agent log's tail)."""
    start = time.monotonic()
    max_polls = max_polls or int(timeout / max(interval, 0.01)) + 10
    state: object = None
    for _ in range(max_polls):
        done, state = pred()
        elapsed = time.monotonic() - start
        if done:
            return elapsed, state
        if elapsed >= timeout:
            break
        time.sleep(min(interval, max(0.0, timeout - elapsed)))
    else:
        elapsed = time.monotonic() - start
    msg = [f"timed out after {elapsed:.1f} s waiting for {what}", "last observed state:", _pretty(state)]
    if diagnose is not None:
        msg.append(diagnose())
    raise LabTimeout("\n".join(msg))


def _pretty(state: object) -> str:
    try:
        return json.dumps(state, indent=1, sort_keys=True, default=str)[:6000]
    except Exception:
        return repr(state)[:6000]


# ----------------------------------------------------------------------------- the lab


@dataclass
class Proc:
    """One agent process of the lab."""

    i: int
    node_id: str
    popen: subprocess.Popen
    log: Path
    cmd: list[str]
    data_dir: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 25) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text[-lines:])


class Lab:
    """N node namespaces on one bridge, agents in them, and ways to hurt the network.

    with Lab(5) as lab:
        for i in range(5):
            lab.start_agent(i, seeds=[0], mdns=False)
        lab.wait_converged(range(5), timeout=20)
    """

    def __init__(self, n: int, workdir: Path | None = None, *, fleet_key: bool = True, keep_logs: bool | None = None):
        if not 1 <= n <= 200 * 250:
            raise ValueError(f"n={n}")
        self.n = n
        self.run = f"{RUN_TAG}{next(_counter)}"
        self.hub = f"{self.run}-hub"
        self.own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"meshagent-lab-{self.run}-"))
        self.keep_logs = keep_logs
        self.want_key = fleet_key
        self.key: Path | None = None
        self.procs: dict[int, Proc] = {}  #: the current process of each node
        self.history: list[Proc] = []  #: every process ever started (for cleanup and logs)
        self.namespaces: list[str] = []
        self.loss_method: str | None = None
        self._groups: dict[int, int] = {}  #: node -> bridge number while partitioned
        self._poller: subprocess.Popen | None = None
        self._poller_buf = b""
        self._poller_seq = itertools.count(1)
        self._poller_lock = threading.Lock()
        self._closed = False

    # ---- lifecycle

    def __enter__(self) -> Lab:
        _live_labs.append(self)
        try:
            self._build()
        except BaseException:
            self.close(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    def ns(self, i: int) -> str:
        return f"{self.run}-{i}"

    def _ip(self, *args: str, ns: str | None = None) -> None:
        sh("ip", *(("-n", ns) if ns else ()), *args)

    def _build(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "empty.toml").write_text("# the lab passes everything as flags\n")
        self.namespaces.append(self.hub)
        sh("ip", "netns", "add", self.hub)
        self._ip("link", "set", "lo", "up", ns=self.hub)
        self._ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "mcast_snooping", "0", "forward_delay", "0", ns=self.hub)
        self._ip("addr", "add", f"{HUB_ADDR}/16", "dev", "br0", ns=self.hub)
        self._ip("link", "set", "br0", "up", ns=self.hub)
        for i in range(self.n):
            ns = self.ns(i)
            self.namespaces.append(ns)
            sh("ip", "netns", "add", ns)
            self._ip("link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", ns, ns=self.hub)
            self._ip("link", "set", f"v{i}", "master", "br0", "up", ns=self.hub)
            self._ip("link", "set", "lo", "up", ns=ns)
            self._ip("addr", "add", f"{node_addr(i)}/16", "dev", "eth0", ns=ns)
            self._ip("link", "set", "eth0", "multicast", "on", "up", ns=ns)
            self._ip("route", "add", "224.0.0.0/4", "dev", "eth0", ns=ns)
        if self.want_key:
            self.key = self.make_key("fleet.key")

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        procs = list(self.history)
        for p in procs:  # SIGKILL whole process groups: nothing of ours may outlive the lab
            if p.running():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
        if self._poller is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._poller.pid, signal.SIGKILL)
        for p in [*procs, *([_P(self._poller)] if self._poller else [])]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.popen.wait(timeout=10)
        for ns in self.namespaces:
            _kill_ns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
        leftovers = [ns for ns in list_netns() if ns.startswith(self.run + "-")]
        for ns in leftovers:
            sh("ip", "netns", "del", ns, check=False)
        if self in _live_labs:
            _live_labs.remove(self)
        keep = failed if self.keep_logs is None else self.keep_logs
        if self.own_workdir:
            if keep:
                print(f"lab {self.run}: logs kept in {self.workdir}", file=sys.stderr)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # ---- keys and agents

    def make_key(self, name: str) -> Path:
        path = self.workdir / name
        res = sh(sys.executable, "-m", "agent", "keygen", "--out", str(path), check=False)
        if res.returncode != 0:
            raise RuntimeError(f"meshagent keygen failed ({res.returncode}): {res.stderr.strip()}")
        return path

    def agent_args(self, i: int, *extra: str, seeds: Iterable[int | str] = (), mdns: bool = False,
                   mesh: str = "lab", key: Path | str | None = "lab", node_id: str | None = None,
                   data_dir: Path | None = None, log_level: str = "info") -> tuple[list[str], str, Path]:
        node_id = node_id or f"n{i}"
        data_dir = data_dir or self.workdir / node_id
        cmd = [
            sys.executable, "-m", "agent", "run", "--config", str(self.workdir / "empty.toml"), "--board", "generic",
            "--node-id", node_id, "--mesh", mesh, "--port", str(PORT), "--data-dir", str(data_dir),
            "--log-level", log_level,
        ]
        for s in seeds:
            cmd += ["--seed", f"{node_addr(s)}:{PORT}" if isinstance(s, int) else s]
        if not mdns:
            cmd.append("--no-mdns")
        if key is None:
            cmd.append("--insecure")
        else:
            path = self.key if key == "lab" else Path(key)
            if path is None:
                raise ValueError("this lab has no fleet key; pass key=PATH or key=None (insecure)")
            cmd += ["--fleet-key-file", str(path)]
        return cmd + list(extra), node_id, data_dir

    def start_agent(self, i: int, *extra: str, **kw) -> Proc:
        """Start `python -m agent run` in node i's namespace; stdout+stderr to a log file.

        Keywords: seeds (node indices or "HOST:PORT"), mdns (default False:
        --no-mdns), mesh ("lab"), key ("lab" = the lab key, a path, or None for
        --insecure), node_id ("n<i>"), data_dir, log_level; extra args are appended."""
        if self._closed:
            raise RuntimeError("lab closed")
        if i in self.procs and self.procs[i].running():
            raise RuntimeError(f"node {i} already runs pid {self.procs[i].pid}")
        cmd, node_id, data_dir = self.agent_args(i, *extra, **kw)
        full = ["ip", "netns", "exec", self.ns(i), *cmd]
        n_before = sum(1 for p in self.history if p.i == i)
        log = self.workdir / (f"{node_id}.log" if n_before == 0 else f"{node_id}.{n_before}.log")
        with open(log, "ab") as fh:
            fh.write(f"### {time.strftime('%H:%M:%S')} {' '.join(full)}\n".encode())
            fh.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            env.pop("JOURNAL_STREAM", None)
            popen = subprocess.Popen(full, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=str(self.workdir), env=env)
        proc = Proc(i, node_id, popen, log, full, data_dir)
        self.procs[i] = proc
        self.history.append(proc)
        return proc

    def kill(self, i: int) -> None:
        """SIGKILL node i's agent (a crash: no leave message)."""
        p = self.procs[i]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.popen.wait(timeout=10)

    def term(self, i: int, timeout: float = 15) -> int:
        """SIGTERM node i's agent (graceful leave); wait for it; return its exit code."""
        p = self.procs[i]
        p.popen.send_signal(signal.SIGTERM)
        try:
            return p.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {i} did not exit within {timeout} s of SIGTERM\n{p.tail()}") from None

    def check_running(self, indices: Iterable[int] | None = None) -> None:
        """Raise (with the log) if an agent that should run has exited."""
        for i in (self.procs if indices is None else indices):
            p = self.procs[i]
            if not p.running():
                raise AssertionError(f"agent {i} ({p.node_id}) exited with {p.popen.returncode}:\n{p.tail(40)}")

    # ---- talking to agents

    def run_in(self, i: int, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command inside node i's namespace."""
        return sh("ip", "netns", "exec", self.ns(i), *cmd, check=False, timeout=timeout)

    def cli(self, i: int, *args: str, target: int | None = None, timeout: float = 30):
        """`python -m agent ARGS --json --agent <node target's address>` inside node i's
        namespace (target defaults to i); returns the parsed JSON, raises on failure."""
        t = i if target is None else target
        res = self.run_in(i, sys.executable, "-m", "agent", *args, "--json", "--agent", f"{node_addr(t)}:{PORT}", timeout=timeout)
        if res.returncode != 0:
            raise AssertionError(f"`meshagent {' '.join(args)}` in ns {i} -> node {t} exited {res.returncode}: {res.stderr.strip()}")
        return json.loads(res.stdout)

    def _start_poller(self) -> None:
        cmd = ["ip", "netns", "exec", self.hub, sys.executable, str(Path(__file__).resolve()), "--poller"]
        self._poller = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=open(self.workdir / "poller.log", "ab"), start_new_session=True)

    def get(self, targets: Sequence[tuple[int, str]], timeout: float = 3.0) -> list[object | None]:
        """GET (node, path) for each target at once through the hub poller; the decoded
        CBOR or None where no answer came within timeout."""
        with self._poller_lock:
            if self._poller is None or self._poller.poll() is not None:
                self._start_poller()
                self._poller_buf = b""
            seq = next(self._poller_seq)
            req = {"id": seq, "timeout": timeout, "targets": [[node_addr(i), PORT, path] for i, path in targets]}
            assert self._poller.stdin is not None and self._poller.stdout is not None
            self._poller.stdin.write(json.dumps(req).encode() + b"\n")
            self._poller.stdin.flush()
            deadline = time.monotonic() + timeout + 15
            fd = self._poller.stdout.fileno()
            while True:
                while b"\n" in self._poller_buf:
                    line, self._poller_buf = self._poller_buf.split(b"\n", 1)
                    answer = json.loads(line)
                    if answer.get("id") == seq:
                        return [r.get("ok") for r in answer["results"]]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"the poller did not answer within {timeout + 15:.0f} s; see {self.workdir / 'poller.log'}")
                ready, _, _ = select.select([fd], [], [], left)
                if ready:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        raise RuntimeError(f"the poller exited; see {self.workdir / 'poller.log'}")
                    self._poller_buf += chunk

    def peers(self, i: int, timeout: float = 3.0) -> list[dict] | None:
        return self.get([(i, "peers")], timeout)[0]

    def status(self, i: int, timeout: float = 3.0) -> dict | None:
        return self.get([(i, "status")], timeout)[0]

    def views(self, indices: Iterable[int], timeout: float = 3.0) -> dict[int, dict[str, dict] | None]:
        """{node: {peer id: peer entry} or None} for each node, read at once."""
        idx = list(indices)
        got = self.get([(i, "peers") for i in idx], timeout)
        return {i: (None if v is None else {p["id"]: p for p in v}) for i, v in zip(idx, got)}

    @staticmethod
    def states(views: dict[int, dict[str, dict] | None]) -> dict[int, dict[str, str] | None]:
        return {i: (None if v is None else {pid: p["state"] for pid, p in v.items()}) for i, v in views.items()}

    def node_ids(self, indices: Iterable[int]) -> list[str]:
        return [self.procs[i].node_id if i in self.procs else f"n{i}" for i in indices]

    # ---- conditions

    def wait_until(self, pred: Callable[[], tuple[bool, object]], timeout: float, interval: float = 0.5, what: str = "condition"):
        """wait_until() whose timeout message carries every agent's log tail."""
        def guarded():
            done, state = pred()
            return done, state
        return wait_until(guarded, timeout, interval, what=what, diagnose=self.diagnose)

    def all_see(self, observers: Iterable[int], subjects: Iterable[int], state: str | Callable[[str | None], bool] = "alive",
                check=None):
        """A predicate: every observer sees every other subject in `state` (or for which
        `state(s)` is true; s is None when the subject is absent)."""
        obs, subj = list(observers), list(subjects)
        ok_state = state if callable(state) else (lambda s, want=state: s == want)

        def pred():
            self.check_running(obs)
            views = self.views(obs)
            table = self.states(views)
            done = True
            for i in obs:
                if table[i] is None:
                    done = False
                    continue
                for j in subj:
                    if j == i:
                        continue
                    if not ok_state(table[i].get(self.node_ids([j])[0])):
                        done = False
            if done and check is not None:
                done = check(views)
            return done, table
        return pred

    def wait_converged(self, indices: Iterable[int], timeout: float, interval: float = 0.25) -> float:
        """Wait until every node in indices sees every other one alive; return the seconds it took."""
        idx = list(indices)
        took, _ = self.wait_until(self.all_see(idx, idx, "alive"), timeout, interval, what=f"nodes {idx} to see each other alive")
        return took

    def diagnose(self, lines: int = 25) -> str:
        out = [f"--- lab {self.run} workdir {self.workdir}"]
        if self._groups:
            out.append(f"partition: {self._groups}")
        if self.loss_method:
            out.append(f"loss via {self.loss_method}")
        for p in self.history:
            rc = p.popen.poll()
            out.append(f"--- node {p.i} {p.node_id} pid {p.pid} {'running' if rc is None else f'exited {rc}'}; {p.log}")
            out.append(p.tail(lines))
        return "\n".join(out)

    # ---- network faults

    def netem(self, i: int, loss: str | None = None, delay: str | None = None, where: str = "node") -> str:
        """Impair node i's link: loss like "20%" (and/or delay like "50ms 10ms" with netem).

        where="node": what node i sends (eth0 egress); "hub": what it receives
        (v<i> egress in the hub); "both". Returns the method used ("netem"/"nft")."""
        if where not in ("node", "hub", "both"):
            raise ValueError(where)
        if self.loss_method is None:
            methods = loss_methods()
            if not methods:
                raise LabUnavailable("no way to drop packets: the kernel lacks sch_netem and `nft` is missing/unusable "
                                     "(install nftables, or linux-modules-extra-$(uname -r) for netem)")
            self.loss_method = methods[0]
        sides = {"node": ["node"], "hub": ["hub"], "both": ["node", "hub"]}[where]
        if self.loss_method == "netem":
            spec = [*(["delay", *delay.split()] if delay else []), *(["loss", loss] if loss else [])]
            for side in sides:
                ns, dev = (self.ns(i), "eth0") if side == "node" else (self.hub, f"v{i}")
                sh("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", *spec)
        else:
            if delay:
                raise LabUnavailable("delay needs tc netem, which this kernel lacks")
            pct = float(loss.rstrip("%")) if loss else 0.0
            hooks = [("output" if side == "node" else "input") for side in sides]
            rules = "".join(
                f" chain {h} {{\n  type filter hook {h} priority 0\n  numgen random mod 10000 < {round(pct * 100)} drop\n }}\n" for h in hooks
            )
            sh("ip", "netns", "exec", self.ns(i), "nft", "-f", "-", input=f"table ip lab\ndelete table ip lab\ntable ip lab {{\n{rules}}}\n")
        return self.loss_method

    def clear_netem(self, i: int) -> None:
        sh("tc", "-n", self.ns(i), "qdisc", "del", "dev", "eth0", "root", check=False)
        sh("tc", "-n", self.hub, "qdisc", "del", "dev", f"v{i}", "root", check=False)
        if shutil.which("nft"):
            sh("ip", "netns", "exec", self.ns(i), "nft", "delete", "table", "ip", "lab", check=False)

    def link_down(self, i: int) -> None:
        """Cut node i off entirely (hub side of its veth down)."""
        self._ip("link", "set", f"v{i}", "down", ns=self.hub)

    def link_up(self, i: int) -> None:
        self._ip("link", "set", f"v{i}", "up", ns=self.hub)

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Split the LAN: groups[0] (and nodes in no group) stay on br0, groups[k] on br<k>."""
        if self._groups:
            self.heal()
        for k, group in enumerate(groups):
            if k == 0:
                continue
            br = f"br{k}"
            self._ip("link", "add", br, "type", "bridge", "stp_state", "0", "mcast_snooping", "0", "forward_delay", "0", ns=self.hub)
            src = f"{SUBNET}.255.{254 - k}"
            self._ip("addr", "add", f"{src}/32", "dev", br, ns=self.hub)
            self._ip("link", "set", br, "up", ns=self.hub)
            for i in group:
                self._ip("link", "set", f"v{i}", "master", br, ns=self.hub)
                self._ip("route", "add", f"{node_addr(i)}/32", "dev", br, "src", src, ns=self.hub)
                self._groups[i] = k

    def heal(self) -> None:
        for i in list(self._groups):
            self._ip("link", "set", f"v{i}", "master", "br0", ns=self.hub)
            sh("ip", "-n", self.hub, "route", "del", f"{node_addr(i)}/32", check=False)
        for k in sorted(set(self._groups.values())):
            sh("ip", "-n", self.hub, "link", "del", f"br{k}", check=False)
        self._groups.clear()

    # ---- measurements

    def link_counters(self) -> dict[int, dict[str, int]]:
        """Per node: bytes and packets it sent/received on its veth (read on the hub side,
        so everything is counted: mesh, mDNS, ARP, API answers)."""
        res = sh("ip", "-n", self.hub, "-s", "-j", "link", "show")
        out = {}
        for link in json.loads(res.stdout):
            name = link.get("ifname", "")
            if name.startswith("v") and name[1:].isdigit():
                st = link["stats64"]
                # hub-side rx = what the node sent; hub-side tx = what the node received
                out[int(name[1:])] = {"tx_bytes": st["rx"]["bytes"], "tx_packets": st["rx"]["packets"],
                                      "rx_bytes": st["tx"]["bytes"], "rx_packets": st["tx"]["packets"]}
        return out


@dataclass
class _P:  # adapts the poller Popen to the cleanup loop
    popen: subprocess.Popen


def require_lab(pytest_module, *, need_loss: bool = False, need_coap_client: bool = False) -> None:
    """Fail (CI set) or skip (otherwise) with a clear reason when the lab cannot run here."""
    problem = environment_problem()
    if problem is None and need_loss and not loss_methods():
        problem = "no packet-loss mechanism: the kernel lacks sch_netem and nftables (`nft`) is not installed"
    if problem is None and need_coap_client and coap_client_binary() is None:
        problem = "libcoap's coap-client is not installed (apt-get install libcoap3-bin)"
    if problem is None:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest_module.fail(f"integration environment unusable in CI: {problem}", pytrace=False)
    pytest_module.skip(f"integration environment unusable: {problem} (set CI=true to make this a failure)")


def install_sigterm_cleanup() -> None:
    """Turn SIGTERM into SystemExit so `with Lab(...)` blocks and atexit still clean up."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def _raise(signum, frame):
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, _raise)


# ----------------------------------------------------------------------------- the poller


async def _poller_main() -> None:
    """Runs inside the hub namespace: JSON lines in ({"id", "timeout", "targets": [[host, port, path]]}),
    JSON lines out ({"id", "results": [{"ok": decoded} | {"error": text}]})."""
    import aiocoap
    import cbor2
    from aiocoap.numbers.codes import Code

    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def one(host: str, port: int, path: str, timeout: float) -> dict:
        # NON: a lost answer costs only this read; a CON would hold the next read to the
        # same agent behind its retransmissions (aiocoap's NSTART = 1)
        msg = aiocoap.Message(code=Code.GET, mtype=aiocoap.NON, uri=f"coap://{host}:{port}/{path}")
        try:
            resp = await asyncio.wait_for(ctx.request(msg).response, timeout)
        except Exception as exc:  # timeout, network error
            return {"error": f"{type(exc).__name__}: {exc}"}
        if not resp.code.is_successful():
            return {"error": str(resp.code)}
        try:
            return {"ok": cbor2.loads(resp.payload)}
        except Exception as exc:
            return {"error": f"bad CBOR: {exc}"}

    while line := await reader.readline():
        req = json.loads(line)
        results = await asyncio.gather(*(one(h, p, path, req["timeout"]) for h, p, path in req["targets"]))
        sys.stdout.write(json.dumps({"id": req["id"], "results": results}, default=str) + "\n")
        sys.stdout.flush()
    await ctx.shutdown()


if __name__ == "__main__":
    if sys.argv[1:] == ["--poller"]:
        asyncio.run(_poller_main())
    else:
        print("usage: netns.py --poller (started by Lab)", file=sys.stderr)
        sys.exit(2)
