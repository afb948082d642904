"""The task commands as a user runs them against a real agent process on
loopback (tasks on, consensus off): submit --wait, tasks, task, cancel, and
their exit codes: 1 a task that failed or is still unfinished, 2 bad input,
3 a refusal, 4 no such task, each with a one-line reason."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from test_cli import free_udp_port, meshagent, one_line_reason

ADDR = "127.0.0.171"


class OneAgent:
    def __init__(self, tmp):
        self.tmp = tmp
        self.port = free_udp_port(ADDR)
        self.key = tmp / "fleet.key"
        assert meshagent("keygen", "--out", str(self.key)).returncode == 0
        conf = tmp / "agent.toml"
        loud = ", ".join(f'"{a}"' for a in (sys.executable, "-c", "print('x' * 5000)"))
        conf.write_text(f"[consensus]\nenabled = false\n\n[handlers.loud]\ncommand = [{loud}]\n")
        self.log = open(tmp / "agent.log", "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(conf), "--node-id", "t1", "--bind", ADDR,
             "--port", str(self.port), "--data-dir", str(tmp / "d1"), "--no-mdns", "--fleet-key-file", str(self.key),
             "--board", "generic"], stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

    def cli(self, *args: str, key: bool = True) -> subprocess.CompletedProcess:
        extra = ["--fleet-key-file", str(self.key)] if key else []
        return meshagent(*args, "--agent", f"{ADDR}:{self.port}", *extra, timeout=30)

    def wait_ready(self, seconds: float = 15) -> dict:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            res = self.cli("status", "--json", "--timeout", "1")
            if res.returncode == 0:
                return json.loads(res.stdout)
            time.sleep(0.2)
        raise AssertionError("the agent did not answer:\n" + (self.tmp / "agent.log").read_text()[-2000:])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    a = OneAgent(tmp_path_factory.mktemp("cli_tasks"))
    try:
        a.status = a.wait_ready()
        yield a
    finally:
        a.close()


def test_status_shows_the_tasks_block(agent):
    tasks = agent.status["tasks"]
    assert {"queued", "running", "done", "failed", "slots", "kinds"} <= tasks.keys(), tasks
    assert {"echo", "sleep", "sysinfo", "loud"} <= set(tasks["kinds"])
    assert agent.status["raft"] is None


def test_submit_wait_then_list_and_show_the_task(agent):
    res = agent.cli("submit", "echo", "--arg", "x=1", "--arg", "on=true", "--arg", "name=hall", "--wait", "--json")
    assert res.returncode == 0, res.stderr
    task = json.loads(res.stdout)
    assert task["state"] == "done" and task["node"] == "t1"
    assert task["result"]["stdout"] == '{"name":"hall","on":true,"x":1}', "--arg values: integer, boolean, text"

    listed = agent.cli("tasks", "--json")
    assert listed.returncode == 0, listed.stderr
    row = next(t for t in json.loads(listed.stdout)["tasks"] if t["id"] == task["id"])
    assert (row["kind"], row["state"], row["node"]) == ("echo", "done", "t1")
    table = agent.cli("tasks", "--state", "done")
    assert table.stdout.split()[:6] == ["ID", "KIND", "STATE", "NODE", "ATTEMPT", "SUBMITTED"], table.stdout
    assert task["id"] in table.stdout

    shown = agent.cli("task", task["id"])
    assert shown.returncode == 0, shown.stderr
    for text in ("submitted", "started", "-- stdout", '{"name":"hall","on":true,"x":1}', "result    ok, exit 0 on t1"):
        assert text in shown.stdout, shown.stdout


def test_truncated_output_says_how_much_there_was(agent):
    res = agent.cli("submit", "loud", "--wait")
    assert res.returncode == 0, res.stderr
    assert "(5001 bytes in all, first 1024 kept)" in res.stdout, res.stdout
    assert re.fullmatch(r"[0-9a-f]{16}: done \(ok, exit 0\) on t1 in \d+ ms, attempt 1", res.stdout.splitlines()[0]), res.stdout


def test_wait_gives_up_then_cancel_ends_the_task(agent):
    res = agent.cli("submit", "sleep", "--arg", "seconds=30", "--wait", "--wait-timeout", "1")
    assert res.returncode == 1
    reason = one_line_reason(res)
    assert "still" in reason and "after 1 s" in reason, reason
    tid = reason.split("task ")[1].split()[0]
    cancelled = agent.cli("cancel", tid)
    assert cancelled.returncode == 0 and tid in cancelled.stdout, cancelled.stderr
    task = json.loads(agent.cli("task", tid, "--json").stdout)
    assert task["state"] == "cancelled" and task["result"]["outcome"] == "cancelled"
    again = agent.cli("cancel", tid)
    assert again.returncode == 3 and "already cancelled" in one_line_reason(again)


def test_a_failed_task_exits_1_and_says_why(agent):
    res = agent.cli("submit", "sleep", "--arg", "seconds=soon", "--attempts", "1", "--wait")
    assert res.returncode == 1
    assert "failed" in one_line_reason(res) and "seconds" in res.stdout, res.stdout


@pytest.mark.parametrize("args, code, words", [
    (["submit", "echo", "--arg", "novalue"], 2, "KEY=VALUE"),
    (["submit", "echo", "--arg", "blob=" + "x" * 600], 2, "args"),
    (["submit", "transcode"], 2, "transcode"),
    (["submit", "echo", "--cap", "gpu"], 3, "gpu"),
    (["task", "0123456789abcdef"], 4, "no such task"),
    (["task", "nope"], 2, "id"),
    (["kv", "get", "x"], 1, "consensus is disabled"),
])
def test_bad_input_and_refusals_exit_with_one_line(agent, args, code, words):
    res = agent.cli(*args)
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert words in one_line_reason(res)


def test_submitting_needs_the_fleet_key(agent):
    res = agent.cli("submit", "echo", key=False)
    assert res.returncode == 1 and "fleet key" in one_line_reason(res)
