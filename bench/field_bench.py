"""Field benchmark (issue 5): what an operator and systemd see of one agent, with real
`python -m agent run` processes on loopback (insecure, no mDNS, board generic).

    python bench/field_bench.py                                   # the figures; writes bench/RESULTS-field.md
    python bench/field_bench.py --quick --out /tmp/field-quick.md  # checks the script works (numbers mean little)
    python bench/field_bench.py --rerender                        # rebuild the Markdown from its raw JSON

Addresses (ports 56201-56209): the console agent "fa" on 127.0.0.201, the plain agent "fb"
on .202, the start-up agent on .203, a silent seed (a bound UDP socket that never answers)
on .204, `meshagent doctor` on .209. Data dirs live in a temporary directory, removed at
the end (--keep keeps it, with the agents' logs).

Phases:
  startup   --reps times: one agent with NOTIFY_SOCKET (a unix datagram socket of this
            process, systemd's side of sd_notify) and WATCHDOG_USEC=2000000, a fresh data
            dir each time: Popen -> READY=1; in the first run the WATCHDOG=1 pings for
            --watch-s seconds after READY (expected every 1.0 s: half of WATCHDOG_USEC);
            then SIGTERM -> STOPPING=1 and SIGTERM -> process exit.
  idle      fa (console on a pty: os.openpty, the master kept open and drained by a thread)
            and fb (console off) side by side, seeding each other and the silent seed,
            consensus off in both (a two-node Raft would make one of them leader, and the
            leader's heartbeats would blur the difference); after --settle-s, --idle-s
            seconds of nothing: CPU % of one core (psutil cpu_times delta) and RSS of each.
  console   on fa's pty, --round-trips rounds of `status`, `peers`, `load`, `log 20`,
            `version` (interleaved, after one untimed warm-up round): Ctrl-U + command + CR
            written to the master, timed until the prompt ends the answer (the drain thread
            stamps the read that completes it); and --net-n times `net`, which CoAP-pings
            both seeds (fb answers, the silent one does not).
  tools     --tool-runs times each, while fa and fb run: `meshagent doctor --insecure
            --no-mdns --seed <fb> --data-dir <tmp> --bind 127.0.0.209 --port 56209 --json`
            and `meshagent board`, wall time from spawn to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from tasks_bench import machine, pct, trio  # noqa: E402  (bench/ is this script's directory)

from agent.console import PING_ATTEMPTS, PING_TIMEOUT_S  # noqa: E402
from agent.io.serial_console import PROMPT  # noqa: E402

PY = sys.executable
_SCRIPT = Path(PY).parent / "meshagent"
MESHAGENT = [str(_SCRIPT)] if _SCRIPT.exists() else [PY, "-m", "agent"]  #: what an operator types
CONSOLE_AGENT, PLAIN_AGENT, STARTUP_AGENT = ("127.0.0.201", 56201), ("127.0.0.202", 56202), ("127.0.0.203", 56203)
SILENT_SEED, DOCTOR_AT = ("127.0.0.204", 56204), ("127.0.0.209", 56209)
WATCHDOG_USEC = 2_000_000
COMMANDS = ("status", "peers", "load", "log 20", "version")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
ANSWER_TIMEOUT_S = 10.0
NET_TIMEOUT_S = 20.0  #: above the console's own COMMAND_TIMEOUT_S (15 s)
TOOL_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 20.0
IDLE_SLICE_S = 5.0  #: the idle window is also measured in slices this long
DRAIN_MOST_S = 3600.0  #: the pty drain thread gives up after this, whatever happens
MAX_BUFFER = 256 * 1024  #: bytes of console output kept (like cli_console.MAX_ANSWER_BYTES)
_PROMPT = PROMPT.encode()
QUICK = {"reps": 1, "watch_s": 5.0, "settle_s": 3.0, "idle_s": 5.0, "round_trips": 5, "net_n": 1, "tool_runs": 1}
FULL = {"reps": 5, "watch_s": 10.0, "settle_s": 10.0, "idle_s": 30.0, "round_trips": 30, "net_n": 5, "tool_runs": 3}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


# ----------------------------------------------------------------------------- the parts


class NotifySocket:
    """systemd's end of sd_notify: a unix datagram socket; messages kept with arrival times."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def _read(self) -> None:
        try:
            data = self.sock.recv(4096)
        except TimeoutError:
            return
        fields = dict(line.split("=", 1) for line in data.decode(errors="replace").splitlines() if "=" in line)
        self.messages.append((time.monotonic(), fields))

    def wait(self, key: str, since: int, seconds: float, agent: AgentProc | None = None) -> float:
        """Arrival time of the first message from index `since` on that holds `key`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            hit = next((t for t, f in self.messages[since:] if key in f), None)
            if hit is not None:
                return hit
            if agent is not None and key != "STOPPING":
                agent.check_running()
            self._read()
        raise RuntimeError(f"no {key}= from {agent.name if agent else 'the agent'} within {seconds:g} s")

    def listen(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read()

    def close(self) -> None:
        self.sock.close()


class AgentProc:
    """One `python -m agent run` in its own process group, its output in a log file."""

    def __init__(self, name: str, at: tuple[str, int], work: Path, *, seeds=(), console: str = "off",
                 config: Path | None = None, env: dict[str, str] | None = None):
        self.name, self.log = name, work / f"{name}.log"
        self.argv = [PY, "-m", "agent", "run", "--board", "generic", "--node-id", name, "--bind", at[0], "--port", str(at[1]),
                     "--data-dir", str(work / f"data-{name}"), "--insecure", "--no-mdns", "--console", console,
                     *(x for s in seeds for x in ("--seed", f"{s[0]}:{s[1]}")), *(["--config", str(config)] if config else [])]
        self.env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Spawn; the monotonic time just before Popen."""
        with open(self.log, "ab") as out:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return t0

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"agent {self.name} exited {self.proc.returncode}:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"

    def stop(self) -> None:
        """SIGTERM to its group, SIGKILL after STOP_TIMEOUT_S."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # it exited meanwhile; wait() below reaps it
        try:
            p.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


class PtyHost:
    """The host end of a serial cable, as a pty: a thread drains the master all the time (an
    agent must never find its console stuck) and stamps when the buffer ends in the prompt."""

    def __init__(self):
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        self.buf = bytearray()
        self.prompt_at: float | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_MOST_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not select.select([self.master], [], [], 0.1)[0]:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO: no process holds the slave any more
                time.sleep(0.1)
                continue
            now = time.monotonic()
            with self._cond:
                self.buf += data
                del self.buf[: max(0, len(self.buf) - MAX_BUFFER)]
                if self.buf == _PROMPT or self.buf.endswith(b"\n" + _PROMPT):
                    self.prompt_at = now
                    self._cond.notify_all()

    def ask(self, line: str, timeout: float) -> tuple[float, int, str]:
        """(seconds from the write to the read that brought the prompt, bytes of the answer
        with its prompt, the answer's text)."""
        with self._cond:
            self.buf.clear()
            self.prompt_at = None
            t0 = time.monotonic()
            os.write(self.master, b"\x15" + line.encode() + b"\r")
            if not self._cond.wait_for(lambda: self.prompt_at is not None, timeout):
                raise RuntimeError(f"console: no prompt within {timeout:g} s after {line!r}; got {bytes(self.buf)[-300:]!r}")
            text = self.buf[: -len(_PROMPT)].decode("utf-8", "replace").replace("\r\n", "\n").removesuffix("\n")
            return self.prompt_at - t0, len(self.buf), text

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        os.close(self.master)
        os.close(self.slave)


# ----------------------------------------------------------------------------- phases


def startup_run(work: Path, k: int, watch_s: float) -> dict:
    """One agent under a fake service manager: Popen -> READY=1, the watchdog pings (when
    watch_s > 0), SIGTERM -> STOPPING=1 and -> exit."""
    manager = NotifySocket(work / f"notify-start{k}")
    agent = AgentProc(f"start{k}", STARTUP_AGENT, work, env={"NOTIFY_SOCKET": str(manager.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    exited: list[float] = []
    try:
        t0 = agent.start()
        ready = manager.wait("READY", 0, READY_TIMEOUT_S, agent)
        run = {"ready_ms": ms(ready - t0), "status": next(f.get("STATUS") for t, f in manager.messages if "READY" in f)}
        if watch_s > 0:
            manager.listen(watch_s)
            agent.check_running()
            pings = [t for t, f in manager.messages if "WATCHDOG" in f and t >= ready]
            run["watchdog_gaps_s"] = [round(b - a, 4) for a, b in zip(pings, pings[1:])]
            run["watch_s"] = watch_s
        mark = len(manager.messages)
        waiter = threading.Thread(target=lambda: (agent.proc.wait(), exited.append(time.monotonic())), daemon=True)
        t_term = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        waiter.start()
        stopping = manager.wait("STOPPING", mark, STOP_TIMEOUT_S, agent)
        waiter.join(STOP_TIMEOUT_S)
        if not exited:
            raise RuntimeError(f"agent {agent.name} did not exit within {STOP_TIMEOUT_S:g} s of SIGTERM:\n{agent.tail()}")
        run.update(stopping_ms=ms(stopping - t_term), exit_ms=ms(exited[0] - t_term), exit_code=agent.proc.returncode)
        return run
    finally:
        agent.stop()
        manager.close()


def startup_phase(work: Path, reps: int, watch_s: float) -> dict:
    runs = []
    for k in range(reps):
        runs.append(startup_run(work, k, watch_s if k == 0 else 0))
        log(f"startup run {k + 1}: {runs[-1]}")
    gaps = runs[0].get("watchdog_gaps_s") or []
    expected = WATCHDOG_USEC / 2e6
    return {"runs": runs, "ready_ms": trio([r["ready_ms"] for r in runs]), "stopping_ms": trio([r["stopping_ms"] for r in runs]),
            "exit_ms": trio([r["exit_ms"] for r in runs]), "exit_codes": sorted({r["exit_code"] for r in runs}),
            "watchdog": {"expected_s": expected, "pings": len(gaps) + 1 if gaps else 0, "watch_s": watch_s,
                         "median_s": round(statistics.median(gaps), 4) if gaps else None,
                         "max_deviation_s": round(max(abs(g - expected) for g in gaps), 4) if gaps else None}}


def wait_converged(host: PtyHost, agent: AgentProc, other: AgentProc) -> float:
    """Until the console agent's `status` counts both agents alive; the seconds it took."""
    t0 = time.monotonic()
    text = ""
    while time.monotonic() - t0 < CONVERGE_TIMEOUT_S:
        agent.check_running()
        other.check_running()
        text = host.ask("status", ANSWER_TIMEOUT_S)[2]
        if re.search(r"\balive 2\b", text):
            return time.monotonic() - t0
        time.sleep(0.5)
    raise RuntimeError(f"the two agents did not see each other within {CONVERGE_TIMEOUT_S:g} s; status:\n{text}")


def idle_cost(agents: dict[str, AgentProc], seconds: float) -> dict:
    """CPU % of one core and RSS of each agent over `seconds` of nothing, measured together;
    also in slices of about IDLE_SLICE_S, so the spread of the on-off difference across the
    slices shows how much of it is noise."""
    import psutil

    procs = {k: psutil.Process(a.proc.pid) for k, a in agents.items()}
    slices = max(1, round(seconds / IDLE_SLICE_S))
    marks = [(time.monotonic(), {k: sum(p.cpu_times()[:2]) for k, p in procs.items()})]
    for _ in range(slices):
        time.sleep(seconds / slices)
        marks.append((time.monotonic(), {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}))

    def pct_between(a: int, b: int, k: str) -> float:
        return (marks[b][1][k] - marks[a][1][k]) / (marks[b][0] - marks[a][0]) * 100

    out: dict = {k: {"cpu_pct": round(pct_between(0, slices, k), 3), "rss_mb": round(p.memory_info().rss / 2**20, 1),
                     "slices_cpu_pct": [round(pct_between(i, i + 1, k), 3) for i in range(slices)]} for k, p in procs.items()}
    on, off = list(procs)
    out["span_s"] = round(marks[-1][0] - marks[0][0], 2)
    out["clock_ticks_per_s"] = os.sysconf("SC_CLK_TCK")
    out["slice_diffs_pct"] = [round(a - b, 3) for a, b in zip(out[on]["slices_cpu_pct"], out[off]["slices_cpu_pct"])]
    return out


def console_round_trips(host: PtyHost, rounds: int) -> dict:
    for cmd in COMMANDS:  # warm-up: first calls import and fill caches; not timed
        host.ask(cmd, ANSWER_TIMEOUT_S)
    samples: dict[str, list[tuple[float, int]]] = {c: [] for c in COMMANDS}
    for _ in range(rounds):
        for cmd in COMMANDS:
            took, size, text = host.ask(cmd, ANSWER_TIMEOUT_S)
            if text.startswith("error:"):
                raise RuntimeError(f"console: {cmd!r} answered {text!r}")
            samples[cmd].append((took * 1000, size))
    return {c: summary(s) for c, s in samples.items()}


def summary(samples: list[tuple[float, int]]) -> dict:
    t, b = [x[0] for x in samples], [x[1] for x in samples]
    return {"n": len(t), "p50_ms": round(pct(t, 50), 2), "p90_ms": round(pct(t, 90), 2), "max_ms": round(max(t), 2),
            "min_ms": round(min(t), 2), "bytes": trio(b)}


def net_round_trips(host: PtyHost, n: int) -> dict:
    samples, text = [], ""
    for _ in range(n):
        took, size, text = host.ask("net", NET_TIMEOUT_S)
        samples.append((took * 1000, size))
    seeds = {f"{h}:{p}": next((ln.split(None, 1)[1] for ln in text.splitlines() if ln.strip().startswith(f"{h}:{p} ")), None)
             for h, p in (PLAIN_AGENT, SILENT_SEED)}
    return {**summary(samples), "seeds": seeds}


def run_tool(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, stdin=subprocess.DEVNULL)
    return time.monotonic() - t0, done


def tools_phase(work: Path, runs: int) -> dict:
    data_dir = work / "doctor-data"
    data_dir.mkdir()
    doctor_argv = [*MESHAGENT, "doctor", "--insecure", "--no-mdns", "--seed", f"{PLAIN_AGENT[0]}:{PLAIN_AGENT[1]}",
                   "--data-dir", str(data_dir), "--bind", DOCTOR_AT[0], "--port", str(DOCTOR_AT[1]), "--json"]
    shown = [a.replace(str(work), "<tmp>") for a in doctor_argv[len(MESHAGENT):]]
    out: dict = {"doctor": {"argv": shown, "wall_s": [], "exit_codes": []},
                 "board": {"argv": ["board"], "wall_s": [], "exit_codes": []}}
    for _ in range(runs):
        took, done = run_tool(doctor_argv)
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise RuntimeError(f"doctor printed no JSON (exit {done.returncode}):\n{done.stdout[-1000:]}\n{done.stderr[-1000:]}") from None
        d = out["doctor"]
        d["wall_s"].append(round(took, 3))
        d["exit_codes"].append(done.returncode)
        d["checks"] = [[c["name"], c["status"]] for c in report["checks"]]  # a list: the raw JSON is key-sorted
        took, done = run_tool([*MESHAGENT, "board"])
        if done.returncode != 0:
            raise RuntimeError(f"meshagent board exited {done.returncode}:\n{done.stderr[-1000:]}")
        out["board"]["wall_s"].append(round(took, 3))
        out["board"]["exit_codes"].append(done.returncode)
    for t in out.values():
        t["wall"] = trio(t["wall_s"])
    return out


def console_pair(work: Path, p: dict) -> dict:
    """fa (console on a pty) and fb (console off): idle cost, console round trips, tools."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(SILENT_SEED)
    config = work / "pair.toml"
    config.write_text("[consensus]\nenabled = false\n")
    host = PtyHost()
    managers = {k: NotifySocket(work / f"notify-{k}") for k in ("fa", "fb")}
    agents = {"fa": AgentProc("fa", CONSOLE_AGENT, work, seeds=[PLAIN_AGENT, SILENT_SEED], console=host.path, config=config,
                              env={"NOTIFY_SOCKET": str(managers["fa"].path)}),
              "fb": AgentProc("fb", PLAIN_AGENT, work, seeds=[CONSOLE_AGENT, SILENT_SEED], config=config,
                              env={"NOTIFY_SOCKET": str(managers["fb"].path)})}
    res: dict = {}
    try:
        for a in agents.values():
            a.start()
        for k, a in agents.items():
            managers[k].wait("READY", 0, READY_TIMEOUT_S, a)
        took = wait_converged(host, agents["fa"], agents["fb"])
        log(f"fa and fb up and alive to each other after {took:.1f} s; settling {p['settle_s']:g} s")
        time.sleep(p["settle_s"])
        res["idle"] = idle_cost({"console on": agents["fa"], "console off": agents["fb"]}, p["idle_s"])
        log(f"idle: {res['idle']}")
        res["console"] = console_round_trips(host, p["round_trips"])
        log(f"console: { {c: (s['p50_ms'], s['p90_ms'], s['max_ms']) for c, s in res['console'].items()} }")
        res["net"] = net_round_trips(host, p["net_n"])
        log(f"net: p50 {res['net']['p50_ms']} ms, seeds {res['net']['seeds']}")
        res["tools"] = tools_phase(work, p["tool_runs"])
        log(f"tools: doctor {res['tools']['doctor']['wall']} s, board {res['tools']['board']['wall']} s")
        for a in agents.values():
            a.check_running()
    finally:
        for a in agents.values():
            a.stop()
        for m in managers.values():
            m.close()
        host.close()
        silent.close()
    return res


# ----------------------------------------------------------------------------- report


def fmt3(t: dict, nd: int = 1) -> str:
    return f"{t['median']:.{nd}f} ({t['min']:.{nd}f}-{t['max']:.{nd}f})"


def fmt_bytes(t: dict) -> str:
    return f"{t['median']:.0f}" if t["min"] == t["max"] else f"{t['median']:.0f} ({t['min']:.0f}-{t['max']:.0f})"


def render(data: dict, summary_only: bool = False) -> str:
    m, p = data["machine"], data["params"]
    quick = " **(--quick: a check that the script works, not figures)**" if data["quick"] else ""
    out = [
        "# meshagent: field benchmark",
        "",
        f"Generated by `python bench/field_bench.py{''.join(' ' + x for x in data['argv'])}` ({data['wall_s']:.0f} s wall){quick}. "
        "Real `python -m agent run` processes on loopback addresses (one host): `--insecure --no-mdns --board generic`, "
        "data dirs in a temporary directory. Times are median (min-max) over the runs unless marked p50/p90.",
        "",
        f"- machine: `{m['uname']}`",
        f"- CPU: {m['cpu']}, nproc {m['nproc']}; Python {m['python']}",
        f"- date {m['date']}, code {m['commit']}; load average at start {m['loadavg_start']}, at end {m.get('loadavg_end', '?')}",
        "",
    ]
    out += render_startup(data["startup"]) + render_pair(data, p)
    out += ["## Reading the numbers", ""] + notes(data) + [""]
    if not summary_only:
        out += ["<details><summary>Raw results (JSON; <code>--rerender</code> rebuilds this file from it)</summary>", "",
                "```json", json.dumps(data, indent=1, sort_keys=True), "```", "", "</details>", ""]
    return "\n".join(out)


def render_startup(s: dict) -> list[str]:
    w = s["watchdog"]
    n = len(s["runs"])
    out = ["## Start-up and shutdown under systemd's notify protocol", "",
           f"One agent (no seeds, console off, a fresh data dir each run) with `NOTIFY_SOCKET` (a unix datagram socket of the "
           f"bench) and `WATCHDOG_USEC={WATCHDOG_USEC}`; {n} run{'s' if n != 1 else ''}.", "",
           "| measure | ms |", "|---|---|",
           f"| Popen -> READY=1 | {fmt3(s['ready_ms'])} |",
           f"| SIGTERM -> STOPPING=1 | {fmt3(s['stopping_ms'])} |",
           f"| SIGTERM -> process exit | {fmt3(s['exit_ms'])} |", "",
           f"- exit code after SIGTERM: {', '.join(map(str, s['exit_codes']))}"]
    if w["median_s"] is not None:
        out.append(f"- watchdog: {w['pings']} WATCHDOG=1 pings in {w['watch_s']:g} s after READY (first run); expected every "
                   f"{w['expected_s']:g} s (half of WATCHDOG_USEC), observed median {w['median_s']:.3f} s, largest deviation "
                   f"{w['max_deviation_s'] * 1000:.1f} ms.")
    return out + [""]


def render_pair(data: dict, p: dict) -> list[str]:
    idle, con, net, tools = data["idle"], data["console"], data["net"], data["tools"]
    on, off = idle["console on"], idle["console off"]
    out = ["## Idle cost of the serial console", "",
           f"Two agents side by side, each seeding the other and a silent seed, consensus off in both; one serves its console "
           f"on a pty (the bench keeps the master open and drains it), the other has `--console off`. After {p['settle_s']:g} s "
           f"settling, {idle['span_s']:g} s of nothing, measured together (psutil cpu_times delta; RSS at the end).", "",
           "| agent | CPU % of one core | RSS MB |", "|---|---|---|",
           f"| console on (pty) | {on['cpu_pct']:.2f} | {on['rss_mb']:.1f} |",
           f"| console off | {off['cpu_pct']:.2f} | {off['rss_mb']:.1f} |",
           f"| **difference** | **{on['cpu_pct'] - off['cpu_pct']:+.2f}** | **{on['rss_mb'] - off['rss_mb']:+.1f}** |", "",
           f"The difference in each {idle['span_s'] / len(idle['slice_diffs_pct']):.0f} s slice of the window (points of one "
           f"core): {', '.join(f'{d:+.2f}' for d in idle['slice_diffs_pct'])} (CPU time is counted in ticks of "
           f"{1000 / idle['clock_ticks_per_s']:g} ms, so one slice resolves "
           f"{100 / idle['clock_ticks_per_s'] / (idle['span_s'] / len(idle['slice_diffs_pct'])):.2f} points).", "",
           "## Console round trip over the pty", "",
           f"Ctrl-U + command + CR written to the pty master, timed until the prompt ends the answer; {p['round_trips']} "
           "interleaved rounds after one untimed warm-up round. Bytes: the answer as sent, with its CRLFs and the prompt.", "",
           "| command | n | p50 ms | p90 ms | max ms | bytes per answer |", "|---|---|---|---|---|---|"]
    for cmd in COMMANDS:
        s = con[cmd]
        out.append(f"| `{cmd}` | {s['n']} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['max_ms']:.1f} | {fmt_bytes(s['bytes'])} |")
    out.append(f"| `net` (1 answering + 1 silent seed) | {net['n']} | **{net['p50_ms']:.0f}** | {net['p90_ms']:.0f} | "
               f"{net['max_ms']:.0f} | {fmt_bytes(net['bytes'])} |")
    out += ["", "`net`'s verdict on each seed (last run): "
            + "; ".join(f"`{k}`: {v or '(not listed)'}" for k, v in net["seeds"].items()) + ".", "",
            "## Operator tools", "",
            "Wall time from spawn to exit (Python start-up included), while the two agents run.", "",
            "| command | runs | wall s | exit codes |", "|---|---|---|---|"]
    for name in ("doctor", "board"):
        t = tools[name]
        out.append(f"| `meshagent {' '.join(t['argv'])}` | {len(t['wall_s'])} | {fmt3(t['wall'], 2)} | "
                   f"{', '.join(map(str, t['exit_codes']))} |")
    checks = tools["doctor"].get("checks") or []
    out += ["", "Doctor's checks (last run): " + ", ".join(f"{k} {v}" for k, v in checks) + ".", ""]
    return out


def notes(data: dict) -> list[str]:
    """What the figures follow from, computed from them and from the agent's own constants."""
    out = []
    net, budget = data["net"], PING_ATTEMPTS * PING_TIMEOUT_S
    slowest = max(s["max_ms"] for s in data["console"].values())
    text = (f"- **`net`** CoAP-pings every seed ({PING_ATTEMPTS} attempts x {PING_TIMEOUT_S:g} s each, in parallel) before it "
            f"answers, so a silent seed holds the answer for up to {budget:g} s: p50 {net['p50_ms']:.0f} ms here")
    text += (", i.e. the silent seed's ping budget; the commands that read the agent's own state answered within "
             f"{slowest:.1f} ms at most." if net["p50_ms"] >= 0.9 * budget * 1000 else ".")
    out.append(text)
    idle = data["idle"]
    on, off = idle["console on"], idle["console off"]
    diffs = idle["slice_diffs_pct"]
    diff = on["cpu_pct"] - off["cpu_pct"]
    text = (f"- **Idle console**: {diff:+.2f} points of one core ({on['cpu_pct']:.2f} % vs {off['cpu_pct']:.2f} %) and "
            f"{on['rss_mb'] - off['rss_mb']:+.1f} MB RSS. The port is read through the event loop (`add_reader`), with no "
            "timer of its own")
    if len(diffs) > 1 and min(diffs) < 0 < max(diffs):
        text += (f"; the difference changes sign between the {len(diffs)} slices ({min(diffs):+.2f} to {max(diffs):+.2f}), "
                 "so over this window it cannot be told from the noise between two identical agents on a shared machine.")
    else:
        text += "."
    out.append(text)
    return out


def rerender(path: Path) -> dict:
    found = re.search(r"```json\n(.*?)\n```", path.read_text(), re.S)
    if not found:
        raise SystemExit(f"no raw JSON block in {path}")
    return json.loads(found.group(1))


def params(args) -> dict:
    base = QUICK if args.quick else FULL
    return {k: base[k] if getattr(args, k) is None else getattr(args, k) for k in base}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 run each, 5 s idle, 5 round trips: checks that the script works")
    ap.add_argument("--reps", type=int, help="start-up runs (5; quick 1)")
    ap.add_argument("--watch-s", type=float, help="seconds of watchdog pings observed (10; quick 5)")
    ap.add_argument("--settle-s", type=float, help="seconds before the idle window (10; quick 3)")
    ap.add_argument("--idle-s", type=float, help="seconds of the idle window (30; quick 5)")
    ap.add_argument("--round-trips", type=int, help="rounds of the console commands (30; quick 5)")
    ap.add_argument("--net-n", type=int, help="`net` round trips (5; quick 1)")
    ap.add_argument("--tool-runs", type=int, help="runs of doctor and board (3; quick 1)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS-field.md")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (agents' logs, data dirs)")
    ap.add_argument("--rerender", action="store_true", help="rebuild --out from the raw JSON inside it")
    args = ap.parse_args()
    if args.rerender:
        args.out.write_text(render(rerender(args.out)))
        print(f"rewrote {args.out}")
        return 0
    p = params(args)
    if min(p.values()) <= 0:
        ap.error(f"every count and duration must be positive: {p}")
    t0 = time.monotonic()
    data = {"machine": machine(), "argv": sys.argv[1:], "quick": args.quick, "params": p, "meshagent": MESHAGENT}
    work = Path(tempfile.mkdtemp(prefix="field-bench-"))
    try:
        data["startup"] = startup_phase(work, p["reps"], p["watch_s"])
        data.update(console_pair(work, p))
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    data["wall_s"] = round(time.monotonic() - t0, 1)
    data["machine"]["loadavg_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    args.out.write_text(render(data))
    print(render(data, summary_only=True))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
