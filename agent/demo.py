"""`meshagent demo`: N real agents on 127.0.0.x of this machine, joined by seeds,
watched live until Ctrl-C, then stopped cleanly.

Each agent is a real `meshagent run` process with its own data dir and log in
a temporary directory; the demo only starts them, asks each one's /peers over
CoAP once a second, and prints how far the mesh has converged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cbor2

from agent.io.coap import coap_get

MAX_NODES = 200


def _addresses(base: str, n: int) -> list[str]:
    first = ipaddress.IPv4Address(base)
    addrs = [str(first + i) for i in range(n)]
    if not all(ipaddress.IPv4Address(a).is_loopback for a in addrs):
        raise ValueError(f"--base {base} with {n} nodes leaves 127.0.0.0/8; the demo only uses loopback addresses")
    return addrs


def _start(addrs: list[str], port: int, workdir: Path, insecure: bool) -> list[subprocess.Popen]:
    key = workdir / "fleet.key"
    if not insecure:
        from agent.envelope import generate_key_file

        generate_key_file(key)
    procs = []
    for i, addr in enumerate(addrs):
        cmd = [
            sys.executable, "-m", "agent", "run", "--node-id", f"demo-{i + 1}", "--mesh", "demo",
            "--bind", addr, "--port", str(port), "--data-dir", str(workdir / f"node-{i + 1}"),
            "--seed", f"{addrs[0]}:{port}", "--no-mdns", "--board", "generic", "--config", str(workdir / "empty.toml"),
        ]
        cmd += ["--insecure"] if insecure else ["--fleet-key-file", str(key)]
        log = open(workdir / f"node-{i + 1}.log", "wb")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        log.close()
    return procs


async def _views(addrs: list[str], port: int) -> tuple[list[list[dict] | None], dict | None]:
    """Every agent's /peers, and the first agent's raft status."""
    async def one(addr, path="peers"):
        try:
            code, payload = await coap_get(addr, port, path, timeout=1.0)
            return cbor2.loads(payload) if code.startswith("2.05") else None
        except Exception:
            return None

    *views, status = await asyncio.gather(*(one(a) for a in addrs), one(addrs[0], "status"))
    return views, (status or {}).get("raft")


def _raft_line(raft: dict | None) -> str:
    if not raft:
        return ""
    if not raft["leader"]:
        return " | raft: no leader yet"
    return f" | raft: leader {raft['leader']} (term {raft['term']}), {len(raft['voters'])} voters"


def _report(views, n: int, t: float, converged_at: float | None) -> str:
    alive = [sum(1 for p in v if p["state"] == "alive") if v is not None else None for v in views]
    done = sum(1 for a in alive if a == n - 1)
    cells = " ".join("." if a is None else str(a) for a in alive)
    tail = f"  converged in {converged_at:.1f} s" if converged_at is not None else ""
    return f"[{t:6.1f} s] {done}/{n} agents see all {n - 1} peers alive | alive peers per agent: {cells}{tail}"


def run_demo(n: int, base: str = "127.0.0.1", port: int = 5690, insecure: bool = False, duration: float = 0) -> int:
    if not 2 <= n <= MAX_NODES:
        raise ValueError(f"--nodes {n}: expected 2 to {MAX_NODES}")
    addrs = _addresses(base, n)
    workdir = Path(tempfile.mkdtemp(prefix="meshagent-demo-"))
    # Auto voters, promoted after 2 s of health instead of 10 s, so the demo shows them grow;
    # all agents share this host, so each counts only its own process tree as its load.
    (workdir / "empty.toml").write_text("[consensus]\nvoters = \"auto\"\nstabilization_ms = 2000\n\n[load]\ncpu_scope = \"tree\"\n")
    print(f"starting {n} agents on {addrs[0]}..{addrs[-1]} port {port}; logs in {workdir} (Ctrl-C stops them)")
    procs = _start(addrs, port, workdir, insecure)
    keyarg = "" if insecure else f" --fleet-key-file {workdir / 'fleet.key'} --mesh demo"
    print(f"try, in another shell: meshagent kv put greeting hello --agent {addrs[-1]}:{port}{keyarg}")
    print(f"                        meshagent submit sysinfo --wait --agent {addrs[0]}:{port}{keyarg}")
    start = time.monotonic()
    converged_at = None
    try:
        while not duration or time.monotonic() - start < duration:
            time.sleep(1.0)
            views, raft = asyncio.run(_views(addrs, port))
            t = time.monotonic() - start
            if converged_at is None and all(v is not None and sum(p["state"] == "alive" for p in v) == n - 1 for v in views):
                converged_at = t
            print(_report(views, n, t, converged_at) + _raft_line(raft), flush=True)
            dead = [i + 1 for i, p in enumerate(procs) if p.poll() is not None]
            if dead:
                print(f"agents {dead} exited; see their logs in {workdir}", file=sys.stderr)
                return 1
    except KeyboardInterrupt:
        print()
    finally:
        _stop(procs)
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"stopped {n} agents")
    return 0


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
