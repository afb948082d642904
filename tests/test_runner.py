"""Runner: real handler processes and the in-process built-ins, ending the way a task engine needs."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time

import psutil
import pytest

from agent.core.taskspec import MAX_STDERR, MAX_STDOUT
from agent.io.runner import BUILTINS, HandlerSpec, Runner, RunResult, substitute

PY = sys.executable
GRACE = 0.5


class Done:
    """on_done collector: wait for one task's result."""

    def __init__(self):
        self.results: dict[str, tuple[int, RunResult]] = {}
        self.calls = 0

    def __call__(self, task_id: str, attempt: int, result: RunResult) -> None:
        self.calls += 1
        self.results[task_id] = (attempt, result)

    async def wait(self, task_id: str, seconds: float = 10) -> RunResult:
        deadline = time.monotonic() + seconds
        while task_id not in self.results:
            assert time.monotonic() < deadline, f"{task_id} did not finish in {seconds} s"
            await asyncio.sleep(0.01)
        return self.results[task_id][1]


def _with_runner(tmp_path, handlers, body):
    async def main():
        done = Done()
        runner = Runner(handlers, done, workdir=tmp_path, kill_grace_s=GRACE)
        try:
            return await body(runner, done)
        finally:
            await runner.stop()

    return asyncio.run(main())


def _run_one(tmp_path, handlers, kind, args=None, timeout_s=0) -> RunResult:
    async def body(runner, done):
        runner.start("t1", 1, kind, args or {}, timeout_s)
        return await done.wait("t1")

    return _with_runner(tmp_path, handlers, body)


def _h(name, *command, **kw) -> dict[str, HandlerSpec]:
    return {name: HandlerSpec(name, tuple(command), **kw)}


def _alive(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def _descendants(count: int) -> list[psutil.Process]:
    """Our process's descendants once there are `count` of them (handlers are our children)."""
    for _ in range(200):
        kids = [p for p in psutil.Process().children(recursive=True) if _alive(p.pid)]
        if len(kids) >= count:
            return kids
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {count} descendants, have {kids}")


# ----------------------------------------------------------------- built-ins


def test_echo_returns_args_as_sorted_compact_json(tmp_path):
    res = _run_one(tmp_path, {}, "echo", {"b": [1, True], "a": b"\x00\xff", "c": {"z": "x"}})
    assert res.outcome == "ok" and res.exit_code == 0
    assert res.stdout == b'{"a":"AP8=","b":[1,true],"c":{"z":"x"}}'
    assert res.stdout_bytes == len(res.stdout) and res.stderr == b""
    assert res.started_ms <= res.finished_ms


def test_sleep_takes_seconds_as_int_or_decimal_text(tmp_path):
    t0 = time.monotonic()
    res = _run_one(tmp_path, {}, "sleep", {"seconds": "0.2"})
    assert res.outcome == "ok" and time.monotonic() - t0 >= 0.2
    assert _run_one(tmp_path, {}, "sleep", {"seconds": 0}).outcome == "ok"


@pytest.mark.parametrize("seconds", [None, -1, 86_401, "1e3", "abc", True, [1]])
def test_sleep_refuses_bad_seconds_with_a_message(tmp_path, seconds):
    res = _run_one(tmp_path, {}, "sleep", {} if seconds is None else {"seconds": seconds})
    assert res.outcome == "failed" and res.exit_code == 1
    assert b"seconds" in res.stderr


def test_sleep_is_ended_by_a_short_timeout(tmp_path):
    t0 = time.monotonic()
    res = _run_one(tmp_path, {}, "sleep", {"seconds": 60}, timeout_s=1)
    assert res.outcome == "timeout" and "1 s" in res.reason
    assert time.monotonic() - t0 < 3


def test_sysinfo_reports_the_host(tmp_path):
    res = _run_one(tmp_path, {}, "sysinfo")
    info = json.loads(res.stdout)
    assert res.outcome == "ok"
    assert set(info) == {"hostname", "platform", "machine", "python", "cpu_count", "load1", "load5", "load15",
                         "mem_total_mb", "mem_available_mb", "disk_free_mb", "boot_time"}
    assert info["cpu_count"] == os.cpu_count() and info["mem_total_mb"] >= info["mem_available_mb"] > 0
    assert b" " not in res.stdout  # compact


def test_kinds_include_builtins_and_a_config_can_tune_one(tmp_path):
    runner = Runner({"sleep": HandlerSpec("sleep", concurrency=2), **_h("x", "true")}, Done(), workdir=tmp_path)
    assert runner.kinds() == {"echo": 64, "sysinfo": 64, "sleep": 2, "x": 1}
    assert BUILTINS["echo"].timeout_s == 3600
    with pytest.raises(ValueError, match="not a built-in"):
        Runner({"nothing": HandlerSpec("nothing")}, Done(), workdir=tmp_path)


# ----------------------------------------------------------------- refusals


def test_unknown_kind_is_an_error(tmp_path):
    res = _run_one(tmp_path, {}, "nope")
    assert res.outcome == "error" and "nope" in res.reason


def test_missing_executable_and_bad_cwd_are_errors(tmp_path):
    res = _run_one(tmp_path, _h("x", str(tmp_path / "no-such-program")), "x")
    assert res.outcome == "error" and "No such file" in res.reason
    res = _run_one(tmp_path, _h("x", "true", cwd="missing-dir"), "x")
    assert res.outcome == "error" and "missing-dir" in res.reason


def test_concurrency_guard_refuses_a_kind_at_its_limit(tmp_path):
    async def body(runner, done):
        runner.start("a", 1, "sleep", {"seconds": 5}, 0)
        runner.start("b", 1, "sleep", {"seconds": 5}, 0)
        second = await done.wait("b")
        assert runner.running() == {"a": 1}
        assert runner.kill("a", 1)
        return second, await done.wait("a")

    second, first = _with_runner(tmp_path, {"sleep": HandlerSpec("sleep", concurrency=1)}, body)
    assert second.outcome == "error" and second.reason == "kind at its concurrency limit"
    assert first.outcome == "cancelled"


def test_start_returns_at_once_and_reports_later(tmp_path):
    async def body(runner, done):
        runner.start("a", 1, "nope", {}, 0)
        reported_in_start = done.calls
        return reported_in_start, await done.wait("a")

    calls, res = _with_runner(tmp_path, {}, body)
    assert calls == 0 and res.outcome == "error"


def test_on_done_raising_does_not_break_the_runner(tmp_path):
    seen = []

    def on_done(task_id, attempt, result):
        seen.append(task_id)
        raise RuntimeError("engine bug")

    async def main():
        runner = Runner({}, on_done, workdir=tmp_path)
        runner.start("a", 1, "echo", {}, 0)
        runner.start("b", 1, "nope", {}, 0)
        await runner.stop()
        runner.start("c", 1, "echo", {}, 0)  # refused after stop, still reported
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert sorted(seen) == ["a", "b", "c"]


# ----------------------------------------------------------------- processes


def test_placeholders_are_substituted_after_argv0():
    args = {"n": 5, "flag": False, "lst": [1, "a"], "raw": b"hi", "s": "x y"}
    argv = substitute(("{n}", "{n}", "{flag}", "{lst}", "{raw}", "pre-{s}-post", "{{n}}", "{print $1}"), args)
    assert argv == ["{n}", "5", "false", '[1,"a"]', "aGk=", "pre-x y-post", "{n}", "{print $1}"]


def test_placeholder_values_reach_the_handler_verbatim(tmp_path):
    res = _run_one(tmp_path, _h("p", "printf", "%s\\n", "{a}", "{b};rm -rf x", "{{a}}"), "p", {"a": "$(id)", "b": True})
    assert res.outcome == "ok"
    assert res.stdout == b"$(id)\ntrue;rm -rf x\n{a}\n"


def test_missing_argument_starts_nothing(tmp_path):
    res = _run_one(tmp_path, _h("t", "touch", "marker", "{missing}"), "t", {"other": 1})
    assert res.outcome == "error" and res.reason == "missing argument 'missing'"
    assert not (tmp_path / "marker").exists()


def test_nonzero_exit_is_failed(tmp_path):
    res = _run_one(tmp_path, _h("f", "sh", "-c", "echo oops >&2; exit 3"), "f")
    assert (res.outcome, res.exit_code, res.reason, res.stderr) == ("failed", 3, "exit 3", b"oops\n")


def test_handler_ignoring_stdin_is_fine(tmp_path):
    res = _run_one(tmp_path, _h("t", "true"), "t", {"big": "x" * 400})
    assert res.outcome == "ok" and res.exit_code == 0


def test_output_keeps_stdout_head_and_stderr_tail_and_counts_all(tmp_path):
    mb = 1 << 20
    code = ("import sys; o, e = sys.stdout.buffer, sys.stderr.buffer\n"
            f"o.write(b'A' * 10 + b'B' * ({mb} - 10)); e.write(b'C' * ({mb} - 10) + b'D' * 10)")
    res = _run_one(tmp_path, _h("big", PY, "-c", code), "big")
    assert res.outcome == "ok"
    assert res.stdout == b"A" * 10 + b"B" * (MAX_STDOUT - 10)
    assert res.stderr == b"C" * (MAX_STDERR - 10) + b"D" * 10
    assert (res.stdout_bytes, res.stderr_bytes) == (mb, mb)


def test_env_cwd_stdin_and_args_reach_the_handler(tmp_path, monkeypatch):
    monkeypatch.setenv("MESHAGENT_LEAK", "from-the-agent")
    (tmp_path / "sub").mkdir()
    script = 'echo "$FOO|$HOME|$(pwd)|$MESHAGENT_TASK_ID|$MESHAGENT_ATTEMPT|$MESHAGENT_LEAK"; echo "$MESHAGENT_ARGS"; cat'
    handlers = _h("e", "sh", "-c", script, env=(("FOO", "bar"),), cwd="sub")
    args = {"k": b"\x01\x02", "n": [1, {"m": True}]}

    async def body(runner, done):
        runner.start("t9", 4, "e", args, 0)
        return await done.wait("t9")

    res = _with_runner(tmp_path, handlers, body)
    line, env_args, stdin_args = res.stdout.decode().splitlines()
    assert line == f"bar|{tmp_path}|{tmp_path / 'sub'}|t9|4|"
    assert json.loads(env_args) == {"k": base64.b64encode(b"\x01\x02").decode(), "n": [1, {"m": True}]}
    assert stdin_args == env_args == '{"k":"AQI=","n":[1,{"m":true}]}'


def test_timeout_kills_the_whole_process_tree(tmp_path):
    # One sleep stays in the handler's process group; one leaves it with setsid (found by the
    # descendants snapshot); sh itself exits on SIGTERM.
    handlers = _h("tree", "sh", "-c", "sleep 60 & setsid sleep 60 & sleep 60 & wait")

    async def body(runner, done):
        t0 = time.monotonic()
        runner.start("t", 1, "tree", {}, 1)
        pids = [p.pid for p in await _descendants(4)]
        res = await done.wait("t")
        return res, pids, time.monotonic() - t0

    res, pids, took = _with_runner(tmp_path, handlers, body)
    assert res.outcome == "timeout" and res.exit_code < 0
    assert took < 1 + GRACE + 1.5
    assert [p for p in pids if _alive(p)] == []


def test_a_handler_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    handlers = _h("stubborn", "sh", "-c", "trap '' TERM; sleep 60 & sleep 60")

    async def body(runner, done):
        runner.start("t", 1, "stubborn", {}, 1)
        pids = [p.pid for p in await _descendants(3)]
        return await done.wait("t"), pids

    res, pids = _with_runner(tmp_path, handlers, body)
    assert res.outcome == "timeout" and res.exit_code == -9
    assert [p for p in pids if _alive(p)] == []


def test_a_leftover_child_holding_stdout_does_not_hold_the_run(tmp_path):
    async def body(runner, done):
        t0 = time.monotonic()
        runner.start("t", 1, "bg", {}, 30)
        res = await done.wait("t")
        return res, time.monotonic() - t0

    res, took = _with_runner(tmp_path, _h("bg", "sh", "-c", "sleep 60 & echo $!"), body)
    assert res.outcome == "ok" and res.exit_code == 0
    assert took < GRACE + 2
    assert not _alive(int(res.stdout))


def test_kill_cancels_a_running_handler(tmp_path):
    async def body(runner, done):
        runner.start("t", 2, "s", {}, 0)
        await _descendants(1)
        assert runner.running() == {"t": 2}
        assert not runner.kill("t", 1) and not runner.kill("other", 2)
        assert runner.kill("t", 2, "revoked by n3")
        res = await done.wait("t")
        assert runner.running() == {} and not runner.kill("t", 2)
        return res

    res = _with_runner(tmp_path, _h("s", "sleep", "60"), body)
    assert res.outcome == "cancelled" and res.reason == "revoked by n3" and res.exit_code == -15


def test_stop_kills_everything_running(tmp_path):
    handlers = {**_h("s", "sleep", "60", concurrency=2)}

    async def body(runner, done):
        t0 = time.monotonic()
        runner.start("a", 1, "s", {}, 0)
        runner.start("b", 1, "s", {}, 0)
        runner.start("c", 1, "sleep", {"seconds": 60}, 0)
        pids = [p.pid for p in await _descendants(2)]
        await runner.stop()
        assert runner.running() == {}
        return pids, time.monotonic() - t0

    async def main():
        done = Done()
        runner = Runner(handlers, done, workdir=tmp_path, kill_grace_s=GRACE)
        return await body(runner, done), done.results

    (pids, took), results = asyncio.run(main())
    assert {k: (r.outcome, r.reason) for k, (_, r) in results.items()} == {
        k: ("cancelled", "agent stopping") for k in "abc"}
    assert took < 3 and [p for p in pids if _alive(p)] == []
