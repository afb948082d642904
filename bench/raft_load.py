"""Load generator for the consensus benchmark: commits driven from INSIDE the
leader's process, for meshagent and for PySyncObj alike (PySyncObj's client
calls are in-process method calls on one replica, so ours are too).

    python bench/raft_load.py --system ours --voters 3          # one run, JSON on stdout
    python bench/raft_load.py --system pysyncobj --voters 5
    python bench/raft_load.py --system ours --profile /tmp/raft.prof   # cProfile of each load phase

ours: this process runs a real `Agent` (config from agent.config.load_config,
identity from agent.identity, as `meshagent run` does) as voter n1 with a fleet
key; the other voters are ordinary `python -m agent run` subprocesses. Once the
cluster has a leader, a sealed `leader.transfer` to n1 is sent to the leader's
API if n1 is not already leading. Then, per value size: --seq sequential
`consensus.write("kv.put", ...)` calls (one latency each), then for each C in
--conc, --total writes (--total-large for 1 KB values) with C outstanding (a
fixed pool of C coroutines), or fewer if --max-phase-s runs out first. Every
write returns once committed and applied on n1, the durable store having
fsynced.

pysyncobj: this process runs a SyncObj replica with a replicated dict
(`@replicated set`); the others are subprocesses of this script
(--pso-replica). They get longer election timeouts so this replica wins the
first election (steady-state behaviour does not depend on them). Two clusters
per run: appendEntriesUseBatch=False for the sequential latency (sync=True
calls), then default batching for the throughput (callbacks, --conc in flight).
PySyncObj keeps its log in memory (journalFile=None, the default): no disk
writes, no fsync.

Keys cycle over --keys distinct names on both systems; values are random bytes
of the given size. The result (one JSON object) is printed as the last line of
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def lat_summary(lat_s: list[float]) -> dict:
    ms = [x * 1000 for x in lat_s]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), 3) if ms else None,
        "p99_ms": round(pct(ms, 99), 3) if ms else None,
        "max_ms": round(max(ms), 3) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
    }


def cpu_snapshot(pids: list[int]) -> list[float]:
    """User+system CPU seconds of each process (this one first)."""
    import psutil

    out = []
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out.append(t.user + t.system)
        except Exception:
            out.append(float("nan"))
    return out


def cpu_delta(a: list[float], b: list[float], commits: int) -> dict:
    """CPU ms per 1000 commits: the leader (load generator included) and each follower."""
    per = [round((y - x) * 1e6 / commits, 1) if commits else None for x, y in zip(a, b)]
    return {"leader_ms_per_1k": per[0], "followers_ms_per_1k": per[1:]}


def udp_rcvbuf_errors() -> int:
    """Datagrams the kernel dropped for a full receive buffer (whole network namespace)."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines() if ln.startswith("Udp:")]
    return int(dict(zip(lines[0][1:], lines[1][1:]))["RcvbufErrors"])


def say(msg: str) -> None:
    print(f"[raft_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def terminate(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def plan(args) -> list[tuple[str, int, int]]:
    """(phase name, value size, writes outstanding; 0 = sequential), in run order."""
    out = []
    for size in args.sizes:
        out.append((f"seq_{size}", size, 0))
        out += [(f"conc{c}_{size}", size, c) for c in args.conc]
    return out


def total_for(args, size: int) -> int:
    return args.total_large if size >= 1024 and args.total_large else args.total


# =====================================================================  ours


def write_config(work: Path, voters: list[str]) -> Path:
    cfg = work / "agent.toml"
    cfg.write_text("[consensus]\nvoters = [" + ", ".join(f'"{v}"' for v in voters) + "]\n")
    return cfg


def make_key(work: Path) -> Path:
    key = work / "fleet.key"
    if not key.exists():
        subprocess.run([sys.executable, "-m", "agent", "keygen", "--out", str(key)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return key


def agent_argv(i: int, base: str, port: int, work: Path, key: Path, cfg: Path) -> list[str]:
    return [
        sys.executable, "-m", "agent", "run", "--node-id", f"n{i}", "--bind", f"{base}.{i}", "--port", str(port),
        "--data-dir", str(work / f"n{i}"), "--seed", f"{base}.1:{port}", "--no-mdns",
        "--fleet-key-file", str(key), "--config", str(cfg),
    ]


class ApiClient:
    """Sealed requests to agents' POST /api, as `meshagent leader/kv` sends them."""

    def __init__(self, key: Path, mesh: str = "default"):
        import secrets

        from agent.api import MAX_ANSWER
        from agent.counters import Counters
        from agent.envelope import Opener, Sealer, load_keys

        keys = load_keys(key)
        self.sealer = Sealer(mesh, keys, f"bench-{secrets.token_hex(4)}", secrets.randbelow(2**31) + 1, max_packet=8000)
        self.opener = Opener(mesh, keys, Counters(), max_datagram=MAX_ANSWER + 1024)

    async def call(self, host: str, port: int, request: dict, timeout: float = 2.0) -> dict:
        import cbor2

        from agent.io.coap import coap_get

        body = self.sealer.seal(cbor2.dumps(request, canonical=True))
        code, payload = await coap_get(host, port, "api", timeout=timeout, payload=body, content_format=16)
        if payload[:1] == b"\xd0":
            opened = self.opener.open(payload)
            payload = opened[1] if opened else b"\xa1eerrorfunseal"
        return cbor2.loads(payload)


async def status_of(host: str, port: int) -> dict | None:
    import cbor2

    from agent.io.coap import coap_get

    try:
        code, payload = await coap_get(host, port, "status", timeout=2.0)
        return cbor2.loads(payload) if code.startswith("2.05") else None
    except Exception:
        return None


async def run_ours(args) -> dict:
    from agent.config import load_config
    from agent.consensus import OutcomeUnknown, WriteRefused
    from agent.identity import boot_count, node_id
    from agent.node import Agent, Identity

    work = Path(args.workdir or tempfile.mkdtemp(prefix="raftbench-ours-"))
    work.mkdir(parents=True, exist_ok=True)
    voters = [f"n{i}" for i in range(1, args.voters + 1)]
    cfg = write_config(work, voters)
    key = make_key(work)
    base, port = args.base, args.port
    logging.basicConfig(filename=str(work / "n1.log"), level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    flags = {"node.id": "n1", "node.bind": f"{base}.1", "node.port": port, "node.data_dir": str(work / "n1"),
             "node.fleet_key_file": str(key), "discovery.seeds": [f"{base}.1:{port}"], "discovery.mdns": False}
    config = load_config(cfg, flags=flags, explicit_path=True).config
    from agent.envelope import load_keys
    data_dir = Path(config.node.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    agent = Agent(config, Identity(node_id(data_dir, "n1"), boot_count(data_dir)), load_keys(key))
    runner = asyncio.create_task(agent.run())
    await agent.ready.wait()

    procs: list[subprocess.Popen] = []
    for i in range(2, args.voters + 1):
        (work / f"n{i}").mkdir(exist_ok=True)
        log = open(work / f"n{i}.log", "w")
        argv = agent_argv(i, base, port, work, key, cfg)
        if args.profile and i == 2:  # one follower profiled too, over its whole life
            argv = [argv[0], "-m", "cProfile", "-o", f"{args.profile}.n2", *argv[1:]]
        procs.append(subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    client = ApiClient(key)
    c = agent.consensus
    result: dict = {"system": "ours", "voters": args.voters, "workdir": str(work)}
    try:
        t0 = time.monotonic()
        transfer_sent = 0.0
        while True:  # leadership on n1, every follower caught up
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"no settled leadership on n1 after 60 s: {c.raft.status()}")
            st = c.raft.status()
            if st["role"] == "leader" and c.writable()[0]:
                prog = st.get("progress", {})
                if len(prog) >= args.voters and all(p["match"] >= st["last_index"] for n, p in prog.items()):
                    break
            elif st["leader"] and st["leader"] != "n1" and time.monotonic() - transfer_sent > 2.0:
                i = int(st["leader"][1:])
                try:
                    a = await client.call(f"{base}.{i}", port, {"op": "leader.transfer", "to": "n1"})
                    say(f"asked leader {st['leader']} to transfer to n1: {a}")
                except Exception as exc:
                    say(f"transfer request failed: {exc}")
                transfer_sent = time.monotonic()
            await asyncio.sleep(0.05)
        result["settle_s"] = round(time.monotonic() - t0, 2)
        say(f"n1 leads term {c.raft.term} with {args.voters} voters, settled in {result['settle_s']} s")

        rng = random.Random(1)
        values = {size: rng.randbytes(size) for size in args.sizes}
        counter = [0]

        async def one(value: bytes) -> float:
            k = counter[0]
            counter[0] += 1
            t = time.perf_counter()
            await c.write("kv.put", key=f"k{k % args.keys}", value=value)
            return time.perf_counter() - t

        for _ in range(args.warmup):  # warm up paths, caches, connections
            await one(values[args.sizes[0]])

        profiles = {}

        async def followers_disk() -> list[dict]:
            out = []
            for i in range(2, args.voters + 1):
                s = await status_of(f"{base}.{i}", port)
                out.append((s or {}).get("raft", {}).get("disk", {}))
            return out

        phases = {}
        for name, size, conc in plan(args):
            v = values[size]
            s0 = dict(c.store.stats)
            f0 = await followers_disk()
            pids = [os.getpid()] + [p.pid for p in procs]
            cpu0 = cpu_snapshot(pids)
            udp0 = udp_rcvbuf_errors()
            prof = None
            if args.profile:  # one profile per phase: FILE.<phase>
                import cProfile
                prof = cProfile.Profile()
                prof.enable()
            errors = {"refused": 0, "unknown": 0}
            lat: list[float] = []
            t = time.perf_counter()
            if conc == 0:
                for _ in range(args.seq):
                    lat.append(await one(v))
                count = args.seq
            else:
                count = total_for(args, size)
                remaining = [count]
                stop_at = time.perf_counter() + args.max_phase_s

                async def worker():
                    while remaining[0] > 0 and time.perf_counter() < stop_at:
                        remaining[0] -= 1
                        try:
                            lat.append(await one(v))
                        except WriteRefused:
                            errors["refused"] += 1
                        except OutcomeUnknown:
                            errors["unknown"] += 1

                await asyncio.gather(*(worker() for _ in range(conc)))
                count -= remaining[0]  # writes issued (the phase may have hit --max-phase-s)
            elapsed = time.perf_counter() - t
            cpu1 = cpu_snapshot(pids)
            udp1 = udp_rcvbuf_errors()
            if prof:
                prof.disable()
                prof.dump_stats(f"{args.profile}.{name}")
                profiles[name] = f"{args.profile}.{name}"
            s1 = dict(c.store.stats)
            await asyncio.sleep(0.3)  # let the followers apply and fsync the tail
            f1 = await followers_disk()
            ok = len(lat)  # writes answered with their result (timed-out ones are not counted)
            d = {k: s1[k] - s0[k] for k in ("bytes_written", "snapshot_bytes_written", "snapshots_written", "fsyncs", "saves", "entries_written")}
            fb = [(y.get("bytes_written", 0) - x.get("bytes_written", 0)) for x, y in zip(f0, f1)]
            fs = [(y.get("fsyncs", 0) - x.get("fsyncs", 0)) for x, y in zip(f0, f1)]
            per = (lambda n: round(n / ok, 3)) if ok else (lambda n: None)
            ph = phases[name] = {
                "size": size, "conc": conc, "count": count, "ok": ok, "elapsed_s": round(elapsed, 3),
                "per_s": round(ok / elapsed, 1), "latency": lat_summary(lat), "errors": errors,
                "cpu": cpu_delta(cpu0, cpu1, ok),
                "disk": {  # per successful write, on the leader (n1) unless named
                    "bytes_per_commit": per(d["bytes_written"]),
                    "log_bytes_per_commit": per(d["bytes_written"] - d["snapshot_bytes_written"]),
                    "snapshot_bytes": d["snapshot_bytes_written"], "snapshots": d["snapshots_written"],
                    "fsyncs_per_commit": per(d["fsyncs"]),
                    "log_entries_per_commit": per(d["entries_written"]),
                    "follower_bytes_per_commit": [per(x) for x in fb],
                    "follower_fsyncs_per_commit": [per(x) for x in fs],
                },
                "udp_rcvbuf_drops": udp1 - udp0,
            }
            say(f"{name}: {ph['per_s']}/s, p50 {ph['latency']['p50_ms']} ms, p99 {ph['latency']['p99_ms']} ms, "
                f"cpu {ph['cpu']}, errors {errors}, udp drops {ph['udp_rcvbuf_drops']}, disk {ph['disk']}")
        result["phases"] = phases
        result["store_stats"] = dict(c.store.stats)
        result["drops"] = agent.drops.snapshot()
        result["term_end"] = c.raft.term
        result["leader_end"] = c.raft.leader
        if profiles:
            result["profiles"] = profiles
    finally:
        agent.stop()
        try:
            await asyncio.wait_for(runner, 10)
        except Exception as exc:
            say(f"agent stop: {exc!r}")
        terminate(procs)
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return result


# ================================================================ pysyncobj


def pso_class():
    from pysyncobj import SyncObj, replicated

    class KV(SyncObj):
        def __init__(self, self_addr, partners, conf):
            super().__init__(self_addr, partners, conf)
            self.d = {}

        @replicated
        def set(self, k, v):
            self.d[k] = v

    return KV


def pso_conf(self_addr: str, batch: bool, driver: bool, timeouts_default: bool = False, journal: str | None = None):
    from pysyncobj import SyncObjConf

    # bindAddress: by default it listens on 0.0.0.0:port, and our replicas share a port
    kw = {"appendEntriesUseBatch": batch, "bindAddress": self_addr}
    if journal:
        kw["journalFile"] = journal
    if not driver and not timeouts_default:
        # let the driver (the load generator's replica) win the first election
        kw.update(raftMinTimeout=3.0, raftMaxTimeout=4.0, connectionTimeout=5.0)
    return SyncObjConf(**kw)


def pso_replica_main(args) -> int:
    """A plain PySyncObj replica (subprocess); with --monitor, prints
    `<wall time> leader <addr>` on every change of the leader it knows."""
    KV = pso_class()
    obj = KV(args.self_addr, args.partners, pso_conf(args.self_addr, args.batch, driver=False, timeouts_default=args.default_timeouts))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    last = object()
    while not stop.is_set():
        if args.monitor:
            ldr = obj._getLeader()
            ldr = None if ldr is None else str(getattr(ldr, "address", ldr))
            if ldr != last:
                print(f"{time.time():.4f} leader {ldr}", flush=True)
                last = ldr
        time.sleep(0.005 if args.monitor else 0.1)
    obj.destroy()
    return 0


def run_pysyncobj(args) -> dict:
    KV = pso_class()
    base = args.base
    result: dict = {"system": "pysyncobj", "voters": args.voters}
    phases = {}
    rng = random.Random(1)
    values = {size: rng.randbytes(size) for size in args.sizes}
    for cluster, batch in enumerate([False, True]):
        port = args.port + 10 * cluster
        addrs = [f"{base}.{i}:{port}" for i in range(1, args.voters + 1)]
        procs = []
        for i in range(2, args.voters + 1):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--pso-replica", "--self-addr", addrs[i - 1], "--partners", *[a for a in addrs if a != addrs[i - 1]]]
                + (["--batch"] if batch else []),
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        obj = KV(addrs[0], addrs[1:], pso_conf(addrs[0], batch, driver=True))
        try:
            t0 = time.monotonic()
            while not (obj._isLeader() and obj._isReady()):
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"PySyncObj: driver not leader after 60 s: {obj.getStatus()}")
                time.sleep(0.02)
            # every partner connected
            while obj.getStatus().get("partner_nodes_count", 0) < args.voters - 1 or any(
                    v != 2 for k, v in obj.getStatus().items() if k.startswith("partner_node_status_server_")):
                if time.monotonic() - t0 > 60:
                    raise RuntimeError(f"PySyncObj: partners not connected: {obj.getStatus()}")
                time.sleep(0.02)
            result[f"settle_s_batch_{batch}"] = round(time.monotonic() - t0, 2)
            counter = [0]

            def key() -> str:
                k = counter[0]
                counter[0] += 1
                return f"k{k % args.keys}"

            warm = threading.Semaphore(0)
            for _ in range(args.warmup):  # in flight together: with batching a sync call waits a whole period
                obj.set(key(), values[args.sizes[0]], callback=lambda r, e: warm.release())
            for _ in range(args.warmup):
                if not warm.acquire(timeout=10):
                    raise RuntimeError("PySyncObj: warm-up writes not committed within 10 s")
            if batch:
                todo = [(f"seqbatched_{args.sizes[0]}", args.sizes[0], 0)] if args.pso_seq_batched else []
                todo += [(n, sz, cc) for n, sz, cc in plan(args) if cc]
            else:
                todo = [(n, sz, cc) for n, sz, cc in plan(args) if not cc]
            for name, size, conc in todo:
                v = values[size]
                lat: list[float] = []
                errors = {"failed": 0}
                pids = [os.getpid()] + [p.pid for p in procs]
                cpu0 = cpu_snapshot(pids)
                udp0 = udp_rcvbuf_errors()
                if conc == 0:
                    count = args.pso_seq_batched if batch else args.seq
                    t = time.perf_counter()
                    for _ in range(count):
                        t1 = time.perf_counter()
                        obj.set(key(), v, sync=True, timeout=5)
                        lat.append(time.perf_counter() - t1)
                else:
                    count = total_for(args, size)
                    sem = threading.Semaphore(conc)
                    done = threading.Event()
                    left = [count]
                    lock = threading.Lock()

                    def cb(res, err, t1):
                        lat.append(time.perf_counter() - t1)
                        if err != 0:  # FAIL_REASON.SUCCESS == 0
                            errors["failed"] += 1
                        sem.release()
                        with lock:
                            left[0] -= 1
                            if left[0] == 0:
                                done.set()

                    t = time.perf_counter()
                    stop_at = t + args.max_phase_s
                    issued = 0
                    for _ in range(count):
                        sem.acquire()
                        if time.perf_counter() >= stop_at:
                            sem.release()
                            break
                        t1 = time.perf_counter()
                        obj.set(key(), v, callback=lambda r, e, t1=t1: cb(r, e, t1))
                        issued += 1
                    with lock:
                        left[0] -= count - issued
                        if left[0] == 0:
                            done.set()
                    count = issued
                    if not done.wait(120):
                        errors["failed"] += left[0]
                elapsed = time.perf_counter() - t
                cpu1 = cpu_snapshot(pids)
                udp1 = udp_rcvbuf_errors()
                ok = count - errors["failed"]
                ph = phases[name] = {
                    "size": size, "conc": conc, "count": count, "ok": ok, "elapsed_s": round(elapsed, 3),
                    "per_s": round(ok / elapsed, 1), "latency": lat_summary(lat), "errors": errors,
                    "batching": batch, "cpu": cpu_delta(cpu0, cpu1, ok), "udp_rcvbuf_drops": udp1 - udp0,
                }
                say(f"pysyncobj {name} (appendEntriesUseBatch={batch}): {ph['per_s']}/s, p50 {ph['latency']['p50_ms']} ms, "
                    f"p99 {ph['latency']['p99_ms']} ms, cpu {ph['cpu']}")
        finally:
            obj.destroy()
            terminate(procs)
        time.sleep(0.2)
    result["phases"] = phases
    result["disk"] = "none (in memory: journalFile=None, the default)"
    return result


# ===================================================================== main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--system", choices=["ours", "pysyncobj"], default="ours")
    ap.add_argument("--voters", type=int, default=3)
    ap.add_argument("--base", default="127.0.10", help="first three octets of the loopback addresses (.1 .. .N)")
    ap.add_argument("--port", type=int, default=5790)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 1024])
    ap.add_argument("--seq", type=int, default=500, help="sequential writes per size")
    ap.add_argument("--total", type=int, default=20000, help="writes per size in the throughput phase")
    ap.add_argument("--conc", type=lambda s: [int(x) for x in s.split(",")], default=[100, 1000, 5000],
                    help="writes outstanding in the throughput phases (comma-separated: one phase each)")
    ap.add_argument("--total-large", type=int, default=10000, help="writes per throughput phase for values of 1 KB and more (default --total)")
    ap.add_argument("--max-phase-s", type=float, default=5.0,
                    help="a throughput phase stops issuing writes after this long (then waits for those in flight)")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--pso-seq-batched", type=int, default=20,
                    help="pysyncobj: sequential writes also with its default batching (the smallest size; 0 = skip)")
    ap.add_argument("--keys", type=int, default=1000, help="distinct keys the writes cycle over")
    ap.add_argument("--profile", metavar="FILE", help="ours: cProfile each load phase into FILE.<phase> (n1, the leader) "
                    "and follower n2's whole life into FILE.n2")
    ap.add_argument("--workdir", help="ours: data dirs here (kept); default a temp dir, removed")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    # PySyncObj replica mode (internal)
    ap.add_argument("--pso-replica", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--self-addr", help=argparse.SUPPRESS)
    ap.add_argument("--partners", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--batch", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--monitor", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--default-timeouts", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pso_replica:
        return pso_replica_main(args)
    if args.system == "ours":
        result = asyncio.run(run_ours(args))
    else:
        result = run_pysyncobj(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
