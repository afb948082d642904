"""`meshagent doctor`: each check names what is wrong. A real agent on 127.0.0.71:56071
is the reachable seed and the holder of the port; fake /sys and /run trees stand in
for a Raspberry Pi's firmware files; the whole command runs once as a real process
on a broken device (exit 1, --json) and once in-process on a healthy one (exit 0)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent import cli_doctor, doctor
from agent.io import ports
from agent.config import load_config
from agent.envelope import generate_key_file
from agent.io.coap_ping import coap_ping

AGENT_HOST, AGENT_PORT = "127.0.0.71", 56071
SEED = f"{AGENT_HOST}:{AGENT_PORT}"
IN_CI = os.environ.get("CI") == "true"


def free_udp_port(host: str = AGENT_HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def running_agent(tmp_path_factory):
    """A real insecure agent holding 127.0.0.71:56071; yields its Popen."""
    d = tmp_path_factory.mktemp("agent")
    (d / "agent.toml").write_text("")
    log = (d / "agent.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(d / "agent.toml"), "--insecure", "--board", "generic",
         "--bind", AGENT_HOST, "--port", str(AGENT_PORT), "--no-mdns", "--data-dir", str(d / "data")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for _ in range(150):  # up to ~15 s on a busy machine
            if proc.poll() is not None:
                pytest.fail(f"the agent exited {proc.returncode}:\n{(d / 'agent.log').read_text()}")
            try:
                if asyncio.run(coap_ping(AGENT_HOST, AGENT_PORT, timeout=0.1, attempts=1)) is not None:
                    break
            except ConnectionRefusedError:  # not listening yet
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"the agent never answered a ping:\n{(d / 'agent.log').read_text()}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def sysroot(tmp: Path, *, temp_c: float | None = None, throttled: str | None = None, synced: bool = True) -> Path:
    """A fake root with the Pi's thermal zone, firmware get_throttled and timesyncd flag."""
    root = tmp / "root"
    root.mkdir(parents=True, exist_ok=True)
    if temp_c is not None:
        zone = root / "sys/class/thermal/thermal_zone0"
        zone.mkdir(parents=True, exist_ok=True)
        (zone / "temp").write_text(f"{int(temp_c * 1000)}\n")
    if throttled is not None:
        fw = root / "sys/devices/platform/soc/soc:firmware"
        fw.mkdir(parents=True, exist_ok=True)
        (fw / "get_throttled").write_text(throttled + "\n")
    if synced:
        (root / "run/systemd/timesync").mkdir(parents=True, exist_ok=True)
        (root / "run/systemd/timesync/synchronized").touch()
    return root


def config(tmp: Path, board: str = "rpi-4b", **flags):
    (tmp / "agent.toml").write_text("")
    return load_config(tmp / "agent.toml", board=board, flags=flags, explicit_path=True).config


def by_name(checks) -> dict:
    return {c["name"] if isinstance(c, dict) else c.name: c for c in checks}


# ------------------------------------------------------------------ the whole command


def _read_only(data: Path, argv: list[str]) -> list[str]:
    """argv run with `data` read-only: a read-only bind mount in a private mount
    namespace when we are root (chmod does not stop root), else chmod 0555."""
    if os.geteuid() != 0:
        data.chmod(0o555)
        return argv
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        msg = f"cannot make a mount namespace (unshare): {probe.stderr.decode().strip()}"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(data), *argv]


def test_doctor_on_a_broken_device_names_each_fault_and_exits_1(running_agent, tmp_path):
    key = tmp_path / "fleet.key"
    generate_key_file(key)
    key.chmod(0o644)
    data = tmp_path / "data"
    data.mkdir()
    refused = free_udp_port()
    # A socket that never answers: silence, as behind a firewall dropping UDP (a port
    # with no socket at all answers ICMP port unreachable instead).
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blackhole.bind((AGENT_HOST, 0))
    silent = blackhole.getsockname()[1]
    root = sysroot(tmp_path, temp_c=82.0, throttled="50005")
    (tmp_path / "agent.toml").write_text("")
    argv = [sys.executable, "-m", "agent", "doctor", "--json", "--config", str(tmp_path / "agent.toml"), "--board", "rpi-4b",
            "--sysroot", str(root), "--fleet-key-file", str(key), "--data-dir", str(data), "--no-mdns",
            "--bind", AGENT_HOST, "--port", str(AGENT_PORT),
            "--seed", SEED, "--seed", f"{AGENT_HOST}:{silent}", "--seed", f"{AGENT_HOST}:{refused}", "--seed", "no-such-host.invalid"]
    try:
        res = subprocess.run(_read_only(data, argv), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    finally:
        data.chmod(0o755)
        blackhole.close()
    assert res.returncode == 1, res.stdout + res.stderr
    out = json.loads(res.stdout)
    assert set(out) == {"ok", "failed", "warnings", "checks"} and out["ok"] is False
    for c in out["checks"]:
        assert set(c) == {"name", "status", "message"} and c["status"] in ("ok", "warn", "fail") and c["message"], c
    assert out["failed"] == sum(c["status"] == "fail" for c in out["checks"])
    assert out["warnings"] == sum(c["status"] == "warn" for c in out["checks"])
    checks = by_name(out["checks"])
    status = {name: c["status"] for name, c in checks.items()}
    msg = {name: c["message"] for name, c in checks.items()}

    assert status[f"seed {SEED}"] == "ok" and "answers a CoAP ping" in msg[f"seed {SEED}"]
    silent_seed = f"seed {AGENT_HOST}:{silent}"
    assert status[silent_seed] == "fail"
    assert "does not answer" in msg[silent_seed] and f"firewall dropping UDP port {silent}" in msg[silent_seed]
    refused_seed = f"seed {AGENT_HOST}:{refused}"
    assert status[refused_seed] == "fail" and "ICMP port unreachable" in msg[refused_seed] and "no agent listens" in msg[refused_seed]
    assert status["seed no-such-host.invalid"] == "fail" and "does not resolve" in msg["seed no-such-host.invalid"]
    assert status["mdns"] == "ok" and "off" in msg["mdns"]
    assert status["clock"] == "ok" and "synchronised" in msg["clock"]
    assert status["key"] == "fail" and "mode 0644" in msg["key"] and "chmod 600" in msg["key"]
    assert status["data dir"] == "fail" and "cannot write" in msg["data dir"]
    assert status["temperature"] == "warn" and "82.0 °C" in msg["temperature"]
    assert status["throttling"] == "fail" and "under-voltage" in msg["throttling"] and "5 V supply" in msg["throttling"]
    assert status["port"] == "ok" and "the agent, which is running" in msg["port"] and f"pid {running_agent.pid}" in msg["port"]
    assert status["agent"] in ("ok", "warn") and "RSS" in msg["agent"]  # CPU just after start may be over budget
    assert list(checks)[0] == "config" and status["config"] == "ok"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshagent")
    cli_doctor.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_doctor_on_a_healthy_device_exits_0_with_warnings_in_a_table(running_agent, tmp_path, capsys):
    """The agent is only the seed here: its CPU right after start could be over budget (a warning)."""
    root = sysroot(tmp_path, temp_c=55.0, throttled="0")
    (tmp_path / "agent.toml").write_text("")
    args = _parser().parse_args(["doctor", "--config", str(tmp_path / "agent.toml"), "--board", "rpi-4b", "--sysroot", str(root),
                                 "--insecure", "--no-mdns", "--data-dir", str(tmp_path / "data"),
                                 "--bind", AGENT_HOST, "--port", str(free_udp_port()), "--seed", SEED])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "0 failed, 1 warning(s)", lines
    assert any(line.startswith("warn  key ") and "node.insecure" in line for line in lines), lines
    assert not any(line.startswith("FAIL") for line in lines), lines


def test_doctor_is_a_meshagent_command():
    from agent.cli import build_parser

    args = build_parser().parse_args(["doctor", "--json", "--sysroot", "/x"])
    assert args.func is cli_doctor.cmd_doctor and args.json and args.sysroot == "/x"


def test_a_config_that_does_not_load_is_the_failing_check(tmp_path, capsys):
    (tmp_path / "agent.toml").write_text("[node]\nport = 0\n")
    args = _parser().parse_args(["doctor", "--json", "--config", str(tmp_path / "agent.toml")])
    assert args.func(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in out["checks"]] == ["config"]
    assert out["checks"][0]["status"] == "fail" and "node.port" in out["checks"][0]["message"]


# ------------------------------------------------------------------ single checks


def test_key_file_modes_owner_and_contents(tmp_path):
    key = tmp_path / "fleet.key"
    generate_key_file(key)
    me = doctor.Host(euid=os.geteuid())
    node = config(tmp_path, **{"node.fleet_key_file": str(key)}).node
    ok = doctor.check_key(node, me)
    assert ok.status == "ok" and "0600" in ok.message and "1 key(s)" in ok.message

    key.chmod(0o640)
    group = doctor.check_key(node, me)
    assert group.status == "warn" and "0640" in group.message and "chmod 600" in group.message
    key.chmod(0o604)
    world = doctor.check_key(node, me)
    assert world.status == "fail" and "0604" in world.message

    key.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(key, 65534, -1)
        stranger = doctor.check_key(node, me)
    else:  # the file is ours; the doctor pretends to be someone else
        stranger = doctor.check_key(node, doctor.Host(euid=os.geteuid() + 1))
    assert stranger.status == "fail" and "owned by" in stranger.message and "chown root" in stranger.message

    key.unlink()
    key.write_text("not a key\n")
    key.chmod(0o600)
    bad = doctor.check_key(node, me)
    assert bad.status == "fail" and str(key) in bad.message
    key.unlink()
    missing = doctor.check_key(node, me)
    assert missing.status == "fail" and "meshagent keygen" in missing.message

    insecure = doctor.check_key(config(tmp_path, **{"node.insecure": True}).node, me)
    assert insecure.status == "warn" and "insecure" in insecure.message


def test_data_dir_writable_creatable_or_not(tmp_path, monkeypatch):
    host = doctor.Host()
    ok = doctor.check_data_dir(tmp_path, host)
    assert ok.status == "ok" and "writable" in ok.message and not list(tmp_path.iterdir())  # the probe file is gone
    later = doctor.check_data_dir(tmp_path / "a" / "b", host)
    assert later.status == "ok" and "does not exist yet" in later.message and not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("")
    not_dir = doctor.check_data_dir(tmp_path / "file", host)
    assert not_dir.status == "fail" and "not a directory" in not_dir.message
    monkeypatch.setattr(doctor, "MIN_FREE_MB", 2**40)
    full = doctor.check_data_dir(tmp_path, host)
    assert full.status == "warn" and "MiB free" in full.message


@pytest.mark.parametrize("temp_c, status, words", [
    (None, "ok", "no temperature"),
    (60.0, "ok", "60.0 °C"),
    (81.5, "warn", "warning level"),
    (86.0, "fail", "critical"),
])
def test_temperature_against_the_board_profile(tmp_path, temp_c, status, words):
    checks = by_name(doctor.local_checks(config(tmp_path), doctor.Host(sysroot=sysroot(tmp_path, temp_c=temp_c))))
    assert checks["temperature"].status == status and words in checks["temperature"].message


@pytest.mark.parametrize("word, status, words", [
    ("50005", "fail", "5 V supply"),
    ("1", "fail", "5 V supply"),
    ("2", "warn", "now: freq-capped"),
    ("50000", "warn", "since boot: under-voltage"),
    ("0", "ok", "no throttling"),
    (None, "warn", "no readable get_throttled"),
])
def test_throttling_against_the_firmware_word(tmp_path, word, status, words):
    checks = by_name(doctor.local_checks(config(tmp_path), doctor.Host(sysroot=sysroot(tmp_path, throttled=word))))
    assert checks["throttling"].status == status and words in checks["throttling"].message


def test_throttling_is_not_read_where_the_board_has_no_source(tmp_path):
    checks = by_name(doctor.local_checks(config(tmp_path, board="generic"), doctor.Host(sysroot=sysroot(tmp_path, throttled="50005"))))
    assert checks["throttling"].status == "ok" and "not read" in checks["throttling"].message


def test_clock_plausible_and_synchronised(tmp_path):
    synced, unsynced = sysroot(tmp_path / "a"), sysroot(tmp_path / "b", synced=False)
    now = datetime.datetime(2026, 6, 1, tzinfo=datetime.timezone.utc).timestamp()
    past = datetime.datetime(1970, 1, 1, 0, 5, tzinfo=datetime.timezone.utc).timestamp()
    unset = doctor.check_clock(doctor.Host(sysroot=synced, now=lambda: past))
    assert unset.status == "fail" and "1970-01-01" in unset.message and "never set" in unset.message
    assert doctor.check_clock(doctor.Host(sysroot=synced, now=lambda: now)).status == "ok"
    no = doctor.check_clock(doctor.Host(sysroot=unsynced, now=lambda: now, ntp_synchronized=lambda: False))
    assert no.status == "warn" and "not synchronised" in no.message
    unknown = doctor.check_clock(doctor.Host(sysroot=unsynced, now=lambda: now, ntp_synchronized=lambda: None))
    assert unknown.status == "warn" and "cannot tell" in unknown.message
    yes = doctor.check_clock(doctor.Host(sysroot=unsynced, now=lambda: now, ntp_synchronized=lambda: True))
    assert yes.status == "ok"


def test_mdns_off_or_without_a_multicast_interface(tmp_path):
    off = asyncio.run(doctor.check_mdns(config(tmp_path, **{"discovery.mdns": False}), doctor.Host()))
    assert off.status == "ok" and off.message.startswith("off")
    nothing = doctor.Host(interfaces=lambda: {})
    alone = asyncio.run(doctor.check_mdns(config(tmp_path), nothing))
    assert alone.status == "fail" and "no interface is up" in alone.message
    seeded = asyncio.run(doctor.check_mdns(config(tmp_path, **{"discovery.seeds": [SEED]}), nothing))
    assert seeded.status == "warn"
    wrong = doctor.Host(interfaces=lambda: {"eth0": ["192.0.2.10"]})
    named = asyncio.run(doctor.check_mdns(config(tmp_path, **{"discovery.mdns_interfaces": ["wlan0"]}), wrong))
    assert named.status == "fail" and "wlan0" in named.message


def test_port_free_or_held_by_another_program(tmp_path):
    port = free_udp_port("127.0.0.71")
    node = config(tmp_path, **{"node.bind": "127.0.0.71", "node.port": port}).node
    free, in_use = doctor.port_state(node)
    assert free.status == "ok" and "is free" in free.message and not in_use
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.71", port))
        early, in_use = doctor.port_state(node)
        assert early is None and in_use
        answer, status = asyncio.run(doctor.fetch_status(node))
        held = doctor.check_port(node, answer, status)
    assert answer == "none"
    assert held.status == "fail" and f"pid {os.getpid()}" in held.message and "not by the agent" in held.message


def test_agent_over_its_budgets_is_a_warning(tmp_path):
    board = config(tmp_path).board  # rpi-4b: 128 MiB, 2 % CPU
    fat = {"node_id": "n1", "process": {"rss_bytes": 300 * 2**20, "cpu_percent": 0.5}}
    over = doctor.check_agent(board, True, "ok", fat)
    assert over.status == "warn" and "memory over budget" in over.message and "300 MiB of 128" in over.message
    fine = doctor.check_agent(board, True, "ok", {"node_id": "n1", "process": {"rss_bytes": 40 * 2**20, "cpu_percent": 0.5}})
    assert fine.status == "ok"
    assert doctor.check_agent(board, True, "none", None).status == "warn"


@pytest.mark.parametrize("cmdline, is_agent", [
    (["/opt/meshagent/venv/bin/python3", "/opt/meshagent/venv/bin/meshagent", "run", "--config", "/etc/meshagent/agent.toml"], True),
    (["/usr/bin/python3", "-m", "agent", "run"], True),
    (["/usr/bin/python3", "-m", "agent", "status"], False),
    (["/usr/sbin/avahi-daemon"], False),
])
def test_agent_processes_are_recognised_by_their_command_line(cmdline, is_agent):
    assert ports.is_agent(cmdline) is is_agent
