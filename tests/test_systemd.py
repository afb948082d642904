"""The systemd unit (verify, security exposure) and the notify protocol spoken by a
real agent process: READY, WATCHDOG at half WatchdogSec, RELOADING around a
SIGHUP reload, STOPPING on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.config import load_config
from agent.io.sdnotify import Notifier
from agent.node import Agent, Identity

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "systemd").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")


def _analyze_available():
    if ANALYZE is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (Debian package systemd); the README's test command installs it")
        pytest.skip("systemd-analyze not installed")


def _throwaway_root(tmp_path: Path, unit: Path) -> Path:
    """A root where the unit's programs exist, for `verify --root` (the host has
    no /opt/meshagent): the system's unit directory, kill, and an executable
    at the venv path the unit names."""
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    shutil.copy(shutil.which("kill") or "/usr/bin/kill", root / "usr/bin/kill")
    (root / "bin").symlink_to("usr/bin")
    for exe in re.findall(r"^Exec\w+=[-@!+]*(/\S+)", unit.read_text(), re.M):
        target = root / exe.lstrip("/")
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("#!/bin/sh\n")
            target.chmod(0o755)
    shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    return root


def test_units_exist():
    assert [u.name for u in UNITS] == ["meshagent.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_verify_passes(tmp_path, unit):
    _analyze_available()
    root = _throwaway_root(tmp_path, unit)
    out = subprocess.run([ANALYZE, "verify", f"--root={root}", "--man=no", "--generators=no", unit.name],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr


def test_verify_catches_a_broken_unit(tmp_path):
    """The check above can fail: a typo in a key is reported."""
    _analyze_available()
    broken = tmp_path / "meshagent.service"
    broken.write_text(UNITS[0].read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    root = _throwaway_root(tmp_path, broken)
    out = subprocess.run([ANALYZE, "verify", f"--root={root}", "--man=no", "--generators=no", broken.name],
                         capture_output=True, text=True, timeout=60)
    assert "Unknown key" in out.stderr and "ProtectSystm" in out.stderr


def _exposure(unit: Path) -> float:
    out = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(unit)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert m, out.stdout + out.stderr
    return float(m.group(1))


def test_security_exposure_at_most_2(capsys):
    _analyze_available()
    exposure = _exposure(REPO / "systemd/meshagent.service")
    with capsys.disabled():
        print(f"\nsystemd-analyze security --offline=true systemd/meshagent.service: exposure {exposure}")
    assert exposure <= 2.0


def test_exposure_figure_tracks_hardening(tmp_path):
    """Dropping the sandbox raises the figure: the assertion above can fail."""
    _analyze_available()
    loose = tmp_path / "meshagent.service"
    text = UNITS[0].read_text()
    for key in ("DynamicUser=yes", "ProtectSystem=strict", "CapabilityBoundingSet=", "SystemCallFilter=@system-service"):
        text = text.replace(key + "\n", "")
    loose.write_text(text)
    assert _exposure(loose) > 2.0


def test_unit_is_hardened_as_the_conventions_say():
    text = UNITS[0].read_text()
    for line in ("Type=notify", "WatchdogSec=", "DynamicUser=yes", "StateDirectory=meshagent", "ProtectSystem=strict",
                 "CapabilityBoundingSet=\n", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
                 "SystemCallFilter=@system-service", "DevicePolicy=closed", "DeviceAllow=char-ttyAMA rw",
                 "SupplementaryGroups=dialout", "LoadCredential=fleet.key:/etc/meshagent/fleet.key"):
        assert line in text, line
    assert "ProcSubset=pid" not in text and "PrivateDevices=yes" not in text


# ------------------------------------------------------------- notify protocol


class NotifySocket:
    """The service manager's end: a unix datagram socket collecting messages."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []

    def collect(self, until, seconds: float) -> bool:
        """Read messages until `until(messages)` holds (bounded)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if until(self.messages):
                return True
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))
        return until(self.messages)

    def in_background(self, until, seconds: float) -> threading.Thread:
        """Collect in a thread (timestamps at arrival) while this thread runs an event loop."""
        thread = threading.Thread(target=self.collect, args=(until, seconds), daemon=True)
        thread.start()
        return thread


def _write_config(path: Path, tmp: Path, level: str = "info", port: int = 56241) -> None:
    path.write_text(f"""
[node]
bind = "127.0.0.241"
port = {port}
data_dir = "{tmp / 'data'}"
insecure = true
[discovery]
mdns = false
seeds = ["127.0.0.242:56241"]
[log]
level = "{level}"
""")


def test_real_agent_speaks_the_notify_protocol(tmp_path):
    manager = NotifySocket(tmp_path / "notify")
    config = tmp_path / "agent.toml"
    _write_config(config, tmp_path)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="1000000", PYTHONUNBUFFERED="1")
    env.pop("WATCHDOG_PID", None)
    log = open(tmp_path / "agent.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert manager.collect(lambda m: any("READY" in f for _, f in m), 30), (tmp_path / "agent.log").read_text()
        ready_at, ready = next((t, f) for t, f in manager.messages if "READY" in f)
        assert ready["READY"] == "1" and "alive in mesh default" in ready["STATUS"]

        # WatchdogSec=1s: a ping every 0.5 s.
        def pings(m):
            return [t for t, f in m if "WATCHDOG" in f and t >= ready_at]
        assert manager.collect(lambda m: len(pings(m)) >= 6, 10)
        gaps = [b - a for a, b in zip(pings(manager.messages), pings(manager.messages)[1:])]
        assert all(f["WATCHDOG"] == "1" for _, f in manager.messages if "WATCHDOG" in f)
        assert 0.3 <= sorted(gaps)[len(gaps) // 2] <= 0.8, gaps

        # SIGHUP: RELOADING=1, then READY=1; the log tells live changes from restart-only ones.
        _write_config(config, tmp_path, level="debug", port=56249)
        mark = len(manager.messages)
        proc.send_signal(signal.SIGHUP)
        assert manager.collect(lambda m: any("READY" in f for _, f in m[mark:]), 10)
        kinds = [next(k for k in ("RELOADING", "READY") if k in f) for _, f in manager.messages[mark:] if "RELOADING" in f or "READY" in f]
        assert kinds[:2] == ["RELOADING", "READY"]
        assert "MONOTONIC_USEC" in next(f for _, f in manager.messages[mark:] if "RELOADING" in f)

        mark = len(manager.messages)
        proc.send_signal(signal.SIGTERM)
        assert manager.collect(lambda m: any("STOPPING" in f for _, f in m[mark:]), 10)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    text = (tmp_path / "agent.log").read_text()
    assert "reload: log.level = 'debug' (was 'info') applied" in text
    assert "reload: node.port = 56249 (running with 56241) needs a restart" in text
    assert "DEBUG" in text.split("reload: log.level")[1]  # the new level took effect


def test_reload_with_a_broken_file_keeps_running(tmp_path, caplog):
    config = tmp_path / "agent.toml"
    _write_config(config, tmp_path)
    agent = _agent(tmp_path, config, Notifier(None))
    config.write_text("[node]\nport = 99999\n")
    caplog.set_level("INFO", logger="meshagent")
    agent.reload()
    assert agent.config.node.port == 56241
    assert any("reload refused" in r.getMessage() and "node.port = 99999" in r.getMessage() for r in caplog.records)


def _agent(tmp_path, config: Path, notifier: Notifier) -> Agent:
    def reload_config():
        return load_config(config, board="generic", explicit_path=True)
    return Agent(reload_config().config, Identity("n1", 1), None, notifier=notifier, reload_config=reload_config)


def test_watchdog_stops_when_the_membership_loop_dies(tmp_path, caplog):
    """A dead tick loop must let systemd's watchdog fire, not be papered over
    by the watchdog task that still runs."""
    manager = NotifySocket(tmp_path / "notify")
    config = tmp_path / "agent.toml"
    _write_config(config, tmp_path)
    agent = _agent(tmp_path, config, Notifier(str(tmp_path / "notify"), watchdog_usec=200_000))

    async def body():
        run = asyncio.create_task(agent.run())
        await asyncio.wait_for(agent.ready.wait(), 10)
        await asyncio.sleep(0.5)
        agent._tasks[0].cancel()  # the membership tick loop
        await asyncio.sleep(1.2)
        agent.stop()
        await asyncio.wait_for(run, 10)

    caplog.set_level("ERROR", logger="meshagent")
    collector = manager.in_background(lambda m: any("STOPPING" in f for _, f in m), 15.0)
    asyncio.run(body())
    collector.join(15)
    times = [t for t, f in manager.messages if "WATCHDOG" in f]
    stop = next(t for t, f in manager.messages if "STOPPING" in f)
    assert len(times) >= 3
    assert stop - times[-1] >= 0.8  # nothing fed for the last ~1 s before stopping
    assert any("no longer feeding the systemd watchdog" in r.getMessage() for r in caplog.records)


def test_notifier_environment_and_abstract_socket(tmp_path):
    env = {"NOTIFY_SOCKET": "@meshagent-test-%d" % os.getpid(), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    n = Notifier.from_environ(env)
    assert env == {}  # removed: task handlers must not inherit them
    assert n.watchdog_interval() == 15.0
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind("\0" + n.address[1:])
    server.settimeout(2)
    assert n.ready("up")
    assert server.recv(100) == b"READY=1\nSTATUS=up"
    server.close()
    n.close()
    assert Notifier.from_environ({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_interval() is None  # another pid's
    assert not Notifier.from_environ({}).ready("x")  # outside systemd: nothing


def test_notify_to_a_vanished_socket_is_counted_not_raised(tmp_path):
    n = Notifier(str(tmp_path / "gone"))
    assert not n.watchdog() and not n.watchdog()
    assert n.failed == 2


# ------------------------------------------------------- the sandbox, for real

STRACE = shutil.which("strace")


def _filter_set(name: str) -> set[str]:
    """A systemd syscall group (e.g. @system-service), expanded to syscall names."""
    out = subprocess.run([ANALYZE, "syscall-filter", name], capture_output=True, text=True, timeout=30, check=True).stdout
    names: set[str] = set()
    for line in out.splitlines():
        word = line.strip()
        if word and not word.startswith("#") and word != name:
            names |= _filter_set(word) if word.startswith("@") else {word}
    return names


def _unit_allowed_syscalls(unit: Path) -> set[str]:
    """What the unit's SystemCallFilter= lines let through (an allow list, then ~ deny lists)."""
    allowed: set[str] = set()
    for value in re.findall(r"^SystemCallFilter=(.*)$", unit.read_text(), re.M):
        deny = value.startswith("~")
        names = set().union(*(_filter_set(w) if w.startswith("@") else {w} for w in value.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def test_the_agent_stays_inside_the_units_syscall_filter(tmp_path):
    """PID 1 here is not systemd, so the unit cannot run as a service: trace a real
    agent (Raft, a task handler, the serial console, a SIGHUP reload) and check
    every syscall it and its children make against the unit's SystemCallFilter,
    and that nothing maps memory writable and executable (MemoryDenyWriteExecute)."""
    _analyze_available()
    if STRACE is None:
        pytest.fail("strace is missing (Debian package strace); the README's test command installs it")
    config = tmp_path / "agent.toml"
    _write_config(config, tmp_path, port=56247)
    config.write_text(config.read_text() + '[handlers.shell]\ncommand = ["/bin/sh", "-c", "echo done"]\n')
    master, slave = os.openpty()
    trace = tmp_path / "trace"
    proc = subprocess.Popen([STRACE, "-f", "-qq", "-o", str(trace), sys.executable, "-m", "agent", "run", "--config", str(config),
                             "--console", os.ttyname(slave)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cli = [sys.executable, "-m", "agent"]
        answer = None
        for _ in range(60):  # the agent under strace starts slowly
            answer = subprocess.run([*cli, "submit", "shell", "--wait", "--agent", "127.0.0.241:56247", "--timeout", "2"],
                                    capture_output=True, text=True, timeout=30)
            if answer.returncode == 0:
                break
            time.sleep(0.5)
        assert answer.returncode == 0 and "done" in answer.stdout, answer.stderr
        for command in (b"status", b"net", b"log 5", b"leader"):
            os.write(master, b"\x15" + command + b"\r")
        time.sleep(1.5)  # net pings a silent seed for 1 s
        agent = next(iter(_children(proc.pid)))
        os.kill(agent, signal.SIGHUP)
        time.sleep(0.5)
        os.kill(agent, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
        os.close(slave)
    calls = trace.read_text()
    used = set(re.findall(r"^\d+\s+([a-z_0-9]+)\(", calls, re.M))
    assert {"execve", "sendto", "recvfrom", "clone"} & used, "the trace recorded nothing useful"
    assert used - _unit_allowed_syscalls(REPO / "systemd/meshagent.service") == set()
    assert not [line for line in calls.splitlines() if "PROT_WRITE" in line and "PROT_EXEC" in line]


def _children(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]
