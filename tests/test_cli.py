"""The `meshagent` command as a user runs it: real processes on this host's loopback
(127.0.0.x), no root needed. Exit codes: 0 success, 1 failure with a one-line reason
on stderr, 2 usage error."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest


def meshagent(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL)


def one_line_reason(res: subprocess.CompletedProcess) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("meshagent: "), lines[0]
    return lines[0]


def free_udp_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ help, exit codes


def test_help_exits_0_and_lists_the_commands():
    res = meshagent("--help")
    assert res.returncode == 0, res.stderr
    for command in ("run", "status", "peers", "config", "keygen", "demo"):
        assert command in res.stdout
    res = meshagent("run", "--help")
    assert res.returncode == 0 and "--seed" in res.stdout and "--no-mdns" in res.stdout


def test_version_exits_0():
    res = meshagent("--version")
    assert res.returncode == 0 and res.stdout.startswith("meshagent "), res


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["run", "--port", "many"], ["status", "--timeout"], ["keygen"]])
def test_usage_errors_exit_2(args):
    res = meshagent(*args)
    assert res.returncode == 2, (args, res.returncode, res.stderr)
    assert "usage:" in res.stderr and "Traceback" not in res.stderr


# ------------------------------------------------------------------------ status against nothing


@pytest.mark.parametrize("command", ["status", "peers"])
def test_client_against_a_closed_port_exits_1_with_one_line(command):
    port = free_udp_port()
    start = time.monotonic()
    res = meshagent(command, "--json", "--agent", f"127.0.0.1:{port}", "--timeout", "2")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    line = one_line_reason(res)
    assert f"127.0.0.1:{port}" in line, line
    assert res.stdout == ""
    assert time.monotonic() - start < 15


def test_client_against_a_silent_socket_times_out_with_one_line():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # receives, never answers
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        start = time.monotonic()
        res = meshagent("status", "--agent", f"127.0.0.1:{port}", "--timeout", "1.5")
        took = time.monotonic() - start
    assert res.returncode == 1, (res.returncode, res.stderr)
    line = one_line_reason(res)
    assert "1.5 s" in line or "no answer" in line, line
    assert took < 15, took


def test_client_with_a_bad_agent_address_exits_1_or_2():
    res = meshagent("status", "--agent", "not an address:99999")
    assert res.returncode in (1, 2), res
    assert "Traceback" not in res.stderr


# ------------------------------------------------------------------------ keygen


def test_keygen_writes_0600_and_refuses_to_overwrite(tmp_path):
    key = tmp_path / "fleet.key"
    res = meshagent("keygen", "--out", str(key))
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600, oct(key.stat().st_mode)
    first = key.read_text()
    assert re.search(r"^meshagent-fleet-key v1 [0-9a-f]+ [0-9a-f]{64}$", first, re.M), first

    res = meshagent("keygen", "--out", str(key))
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert str(key) in one_line_reason(res)
    assert key.read_text() == first, "a refused keygen must leave the old key untouched"

    res = meshagent("keygen", "--out", str(key), "--force")
    assert res.returncode == 0, res.stderr
    assert key.read_text() != first and stat.S_IMODE(key.stat().st_mode) == 0o600


def test_keygen_into_a_missing_directory_exits_1(tmp_path):
    res = meshagent("keygen", "--out", str(tmp_path / "no" / "such" / "dir" / "fleet.key"))
    assert res.returncode == 1, res
    one_line_reason(res)


# ------------------------------------------------------------------------ config show


def test_config_show_with_a_good_file_exits_0(tmp_path):
    conf = tmp_path / "agent.toml"
    conf.write_text('[node]\nmesh = "kitchen"\nport = 5700\n')
    res = meshagent("config", "show", "--config", str(conf), "--board", "generic", "--json")
    assert res.returncode == 0, res.stderr
    assert "kitchen" in res.stdout and "5700" in res.stdout
    json.loads(res.stdout)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[node]\nmesh = "kitchen"\nmesh_name = "x"\n', "node.mesh_name"),
        ("[membership]\nprobe_intervall_ms = 500\n", "membership.probe_intervall_ms"),
        ("[node]\nport = 70000\n", "node.port"),
        ('[nodes]\nmesh = "x"\n', "nodes"),
    ],
)
def test_config_show_with_a_bad_key_exits_1_naming_it(tmp_path, text, key):
    conf = tmp_path / "agent.toml"
    conf.write_text(text)
    res = meshagent("config", "show", "--config", str(conf), "--board", "generic")
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    line = one_line_reason(res)
    assert key in line, line
    assert str(conf) in line, f"the message should say where the value came from: {line}"


def test_config_show_with_a_missing_explicit_file_exits_1(tmp_path):
    res = meshagent("config", "show", "--config", str(tmp_path / "absent.toml"))
    assert res.returncode == 1
    one_line_reason(res)


# ------------------------------------------------------------------------ demo


def _agents_on_port(port: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "agent" in cmd and "run" in cmd and "--port" in cmd and str(port) in cmd:
            found.append(p)
    return found


def test_demo_converges_and_leaves_no_process_behind():
    base_last = random.randrange(100, 240)
    base = f"127.0.0.{base_last}"
    port = free_udp_port(base)
    res = meshagent("demo", "--nodes", "3", "--duration", "8", "--base", base, "--port", str(port), timeout=90)
    assert res.returncode == 0, f"demo exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "3/3 agents see all 2 peers alive" in res.stdout, res.stdout
    assert re.search(r"converged in \d+(\.\d+)? s", res.stdout), res.stdout
    assert "stopped 3 agents" in res.stdout
    # nothing left behind: no agent process, no temporary directory
    leftovers = _agents_on_port(port)
    for p in leftovers:
        p.kill()
    assert not leftovers, [p.info["cmdline"] for p in leftovers]
    m = re.search(r"logs in (\S+)", res.stdout)
    assert m, res.stdout
    assert not Path(m.group(1)).exists(), f"the demo left its directory {m.group(1)}"
