"""The consensus commands as a user runs them against real agent processes on
loopback: leader, kv, propose, vote, proposals --watch, and recover. Exit codes:
3 a refused write, 4 a key that does not exist, each with a one-line reason."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import free_udp_port, meshagent, one_line_reason


class Agents:
    """`meshagent run` processes on 127.0.0.(base+i), explicit voters, one fleet key."""

    def __init__(self, tmp: Path, n: int, base: int):
        self.tmp, self.n, self.base = tmp, n, base
        self.port = free_udp_port(f"127.0.0.{base + 1}")
        self.key = tmp / "fleet.key"
        if not self.key.exists():
            assert meshagent("keygen", "--out", str(self.key)).returncode == 0
        voters = ", ".join(f'"c{i}"' for i in range(1, n + 1))
        (tmp / "agent.toml").write_text(f"[consensus]\nvoters = [{voters}]\n")
        self.procs: dict[int, subprocess.Popen] = {}

    def addr(self, i: int) -> str:
        return f"127.0.0.{self.base + i}:{self.port}"

    def run_args(self, i: int) -> list[str]:
        return ["--config", str(self.tmp / "agent.toml"), "--node-id", f"c{i}", "--bind", f"127.0.0.{self.base + i}",
                "--port", str(self.port), "--data-dir", str(self.tmp / f"d{i}"), "--no-mdns",
                "--seed", self.addr(1), "--fleet-key-file", str(self.key), "--board", "generic"]

    def start(self, i: int) -> None:
        log = open(self.tmp / f"c{i}.log", "a")
        self.procs[i] = subprocess.Popen([sys.executable, "-m", "agent", "run", *self.run_args(i)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def stop(self, i: int, sig=signal.SIGTERM) -> None:
        p = self.procs.pop(i)
        p.send_signal(sig)
        p.wait(15)

    def cli(self, i: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return meshagent(*args, "--agent", self.addr(i), "--fleet-key-file", str(self.key), timeout=timeout)

    def wait_leader(self, i: int, seconds: float = 20) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            res = self.cli(i, "leader", "--json", "--timeout", "2")
            if res.returncode == 0:
                answer = json.loads(res.stdout)
                if answer["leader"] and answer["mode"] == "read-write":
                    return answer
            time.sleep(0.3)
        raise AssertionError(f"no leader seen from c{i} in {seconds} s\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- c{i}\n" + (self.tmp / f"c{i}.log").read_text()[-2000:]
                         for i in range(1, self.n + 1) if (self.tmp / f"c{i}.log").exists())

    def close(self) -> None:
        for i in list(self.procs):
            self.procs[i].kill()
            self.procs.pop(i).wait(10)


@pytest.fixture
def one_voter(tmp_path):
    agents = Agents(tmp_path, 1, 150)
    agents.start(1)
    try:
        agents.wait_leader(1)
        yield agents
    finally:
        agents.close()


def test_kv_commands_and_their_exit_codes(one_voter):
    a = one_voter
    put = a.cli(1, "kv", "put", "lights/hall", "on")
    assert put.returncode == 0 and "revision" in put.stdout, put.stderr
    rev = int(put.stdout.split()[-1])
    got = a.cli(1, "kv", "get", "lights/hall")
    assert (got.returncode, got.stdout.strip()) == (0, "on")
    missing = a.cli(1, "kv", "get", "lights/attic")
    assert missing.returncode == 4 and "not found" in one_line_reason(missing)
    conflict = a.cli(1, "kv", "cas", "lights/hall", str(rev + 100), "off")
    assert conflict.returncode == 3 and "conflict" in one_line_reason(conflict)
    swapped = a.cli(1, "kv", "cas", "lights/hall", str(rev), "off")
    assert swapped.returncode == 0, swapped.stderr
    listed = a.cli(1, "kv", "ls", "lights/", "--json")
    items = json.loads(listed.stdout)["items"]
    assert [(i["key"], i["value"]) for i in items] == [("lights/hall", "off")]
    assert a.cli(1, "kv", "del", "lights/hall").returncode == 0
    assert a.cli(1, "kv", "del", "lights/hall").returncode == 4
    stale = a.cli(1, "kv", "get", "lights/hall", "--stale")
    assert stale.returncode == 4


def test_writes_need_the_fleet_key(one_voter):
    res = meshagent("kv", "put", "k", "v", "--agent", one_voter.addr(1))
    assert res.returncode == 1 and "fleet key" in one_line_reason(res)


def test_propose_vote_and_watch(one_voter):
    a = one_voter
    watch = subprocess.Popen([sys.executable, "-m", "agent", "proposals", "--watch", "--count", "3", "--json",
                              "--agent", a.addr(1), "--fleet-key-file", str(a.key)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        prop = a.cli(1, "propose", '{"task_assignment": "auth-service", "assigned_to": "c1"}', "--deadline", "60")
        assert prop.returncode == 0, prop.stderr
        pid = prop.stdout.strip()
        vote = a.cli(1, "vote", pid, "approve")
        assert vote.returncode == 0, vote.stderr
        out, err = watch.communicate(timeout=20)
    finally:
        watch.kill()
    states = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(states) == 3, (out, err)
    last = {p["id"]: p for p in states[-1]["proposals"]}[pid]
    assert last["outcome"] == "approved" and last["votes"]["c1"]["choice"] == "approve"
    again = a.cli(1, "vote", pid, "reject")
    assert again.returncode == 3 and "decided" in one_line_reason(again)
    bad = a.cli(1, "propose", '{"x": 1.5}')
    assert bad.returncode == 1 and "fraction" in one_line_reason(bad)


def test_leader_and_status_show_raft(one_voter):
    res = one_voter.cli(1, "leader")
    assert res.returncode == 0 and "leader c1" in res.stdout and "read-write" in res.stdout
    alone = one_voter.cli(1, "leader", "transfer")  # no NODE: the leader would pick; a lone voter has none
    assert alone.returncode == 3 and one_line_reason(alone) == "meshagent: no other voter to hand leadership to", alone.stderr
    st = json.loads(one_voter.cli(1, "status", "--json").stdout)
    assert {"role", "term", "leader", "commit_index", "voters", "mode"} <= st["raft"].keys()
    assert st["raft"]["voters"] == ["c1"] and st["raft"]["mode"] == "read-write"


@pytest.mark.slow
def test_recover_refuses_while_a_quorum_answers_then_restores_a_lone_survivor(tmp_path):
    a = Agents(tmp_path, 3, 160)
    try:
        for i in (1, 2, 3):
            a.start(i)
        a.wait_leader(1)
        assert a.cli(1, "kv", "put", "fleet/motto", "keep going").returncode == 0
        time.sleep(2)  # the voters' addresses are remembered once a second
        running = meshagent("recover", *a.run_args(1), "--yes")
        assert running.returncode == 1 and "stop it first" in running.stdout, running.stdout
        a.stop(1)
        quorum = meshagent("recover", *a.run_args(1), "--yes")
        assert quorum.returncode == 3 and "quorum" in quorum.stdout, quorum.stdout + a.logs()
        a.stop(2, signal.SIGKILL)
        a.stop(3, signal.SIGKILL)
        dry = meshagent("recover", *a.run_args(1))
        assert dry.returncode == 0 and "--yes" in dry.stdout, dry.stdout
        done = meshagent("recover", *a.run_args(1), "--yes")
        assert done.returncode == 0 and "only voter" in done.stdout, done.stdout
        a.start(1)
        leader = a.wait_leader(1)
        assert leader["leader"] == "c1" and leader["voters"] == ["c1"]
        got = a.cli(1, "kv", "get", "fleet/motto")
        assert got.stdout.strip() == "keep going", got.stderr
        assert a.cli(1, "kv", "put", "fleet/after", "yes").returncode == 0
    finally:
        a.close()
