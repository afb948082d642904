"""The task ops of POST /api against three agents in this process on loopback
(127.0.0.91-93, fleet key on, consensus off, two home members per task): submit,
get, list, cancel and local, the exit codes of bad input (2), refusals (3) and
unknown tasks (4), a configured handler, and a record read from a node that
holds no copy of it.

The mesh is started once for the module (in a loop on its own thread) so the
file stays fast; every test submits its own tasks."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import cbor2
import pytest

from agent.api import CBOR, COSE, Api
from agent.config import load_config
from agent.counters import Counters
from agent.envelope import FleetKey, Opener, Sealer
from agent.node import Agent, Identity

PORT = 56951
KEYS = [FleetKey.generate()]
GREET = ("import json, sys; a = json.load(sys.stdin); "
         "print('hello', sys.argv[1], a['times'] * '!'); print('to stderr', file=sys.stderr)")


class Mesh:
    """Three agents served by one event loop on a background thread."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = Sealer("default", KEYS, "cli-test", 7)  # one identity: its counter keeps growing
        self.opener = Opener("default", KEYS, Counters(), max_datagram=1 << 20)
        self.agents = self.run(self._start())

    def run(self, coro, timeout: float = 20):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _agent(self, i: int) -> Agent:
        conf = self.tmp / f"agent{i}.toml"
        if i == 3:  # only n3 has the configured handler and the camera
            argv = ", ".join(f'"{a}"' for a in (sys.executable, "-c", GREET, "{name}"))
            conf.write_text(f'[node]\ncapabilities = ["camera"]\n\n[handlers.greet]\ncommand = [{argv}]\ntimeout_s = 20\n')
        flags = {"node.bind": f"127.0.0.{90 + i}", "node.port": PORT, "node.data_dir": self.tmp / f"d{i}",
                 "discovery.mdns": False, "node.insecure": False, "consensus.enabled": False,
                 "discovery.seeds": [f"127.0.0.91:{PORT}"], "tasks.replicas": 2, "tasks.slots": 2}
        return Agent(load_config(conf, board="generic", flags=flags).config, Identity(f"n{i}", 1), KEYS)

    async def _start(self) -> list[Agent]:
        agents = [self._agent(i) for i in (1, 2, 3)]
        self.runs = [asyncio.create_task(a.run()) for a in agents]
        for a in agents:
            await asyncio.wait_for(a.ready.wait(), 5)
        kinds = lambda a: set().union(*(m.kinds for m in a.tasks.engine.ctx.view.values()))  # noqa: E731
        assert await until(lambda: all(len(a.tasks._view()) == 2 and "greet" in kinds(a) for a in agents), 10)
        return agents

    async def _stop(self) -> None:
        for a in self.agents:
            a.stop()
        await asyncio.wait_for(asyncio.gather(*self.runs, return_exceptions=True), 10)

    def close(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    def api(self, i: int, request: dict, sealed: bool = True) -> dict:
        """A request to agent n{i} as its CoAP resource gets it."""
        return self.run(self._api(self.agents[i - 1], request, sealed))

    async def _api(self, agent: Agent, request: dict, sealed: bool) -> dict:
        body = cbor2.dumps(request, canonical=True)
        if not sealed:
            answer, cf = await agent.api.handle(body, CBOR)
            assert cf == CBOR
            return cbor2.loads(answer)
        answer, cf = await agent.api.handle(self.client.seal(body), COSE)
        assert cf == COSE
        return cbor2.loads(self.opener.open(answer)[1])

    def submit(self, i: int, kind: str, **fields) -> str:
        answer = self.api(i, {"op": "task.submit", "kind": kind} | fields)
        assert answer.get("ok"), answer
        return answer["id"]

    def wait(self, i: int, task_id: str, states=("done", "failed", "cancelled"), seconds: float = 10) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            answer = self.api(i, {"op": "task.get", "id": task_id})
            assert answer.get("ok"), answer
            if answer["task"]["state"] in states or time.monotonic() > deadline:
                return answer["task"]
            time.sleep(0.05)

    def agent(self, node: str) -> Agent:
        return next(a for a in self.agents if a.node_id == node)


async def until(pred, seconds: float) -> bool:
    for _ in range(int(seconds / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def eventually(pred, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("api_tasks"))
    try:
        yield m
    finally:
        m.close()


# ------------------------------------------------------------------ the happy paths


def test_echo_submitted_through_the_api_is_done_with_its_args_and_a_history(mesh):
    tid = mesh.submit(1, "echo", args={"x": 1, "name": "kitchen"}, priority=7)
    task = mesh.wait(2, tid)
    assert task["state"] == "done" and task["kind"] == "echo" and task["priority"] == 7
    assert task["result"]["outcome"] == "ok" and task["result"]["exit_code"] == 0
    assert task["result"]["stdout"] == '{"name":"kitchen","x":1}', "echo prints its arguments as key-sorted JSON"
    assert task["result"]["node"] == task["node"] in {"n1", "n2", "n3"}
    events = [e["event"] for e in task["history"]]
    assert events[0] == "submitted" and events[-1] == "done" and "started" in events, events


def test_the_same_key_names_the_same_task(mesh):
    first = mesh.submit(1, "echo", args={"n": 1}, key="nightly-backup-2024-06-01")
    again = mesh.submit(2, "echo", args={"n": 1}, key="nightly-backup-2024-06-01")
    assert first == again
    assert mesh.wait(3, first)["state"] == "done"


def test_a_configured_handler_runs_where_it_is_and_its_output_comes_back(mesh):
    tid = mesh.submit(1, "greet", args={"name": "world", "times": 3})
    task = mesh.wait(1, tid)
    r = task["result"]
    assert task["state"] == "done" and r["node"] == "n3", task
    assert r["stdout"] == "hello world !!!\n" and r["stderr"] == "to stderr\n"
    assert r["stdout_bytes"] == len(r["stdout"]) and r["duration_ms"] >= 0


def test_a_task_needing_the_camera_runs_on_the_node_that_has_one(mesh):
    tid = mesh.submit(2, "echo", caps=["camera"])
    assert mesh.wait(2, tid)["result"]["node"] == "n3"


def test_results_are_fetched_from_a_node_that_holds_no_copy(mesh):
    tid = mesh.submit(1, "echo", args={"far": "away"})
    assert mesh.wait(1, tid)["state"] == "done"
    outsider = next(a for a in mesh.agents if tid not in a.tasks.engine.records)
    task = mesh.api(int(outsider.node_id[1:]), {"op": "task.get", "id": tid})["task"]
    assert task["state"] == "done" and task["result"]["stdout"] == '{"far":"away"}'
    assert tid not in outsider.tasks.engine.records, "it asked the home members, it did not become one"


def test_list_shows_the_mesh_tasks_and_filters_by_state_and_node(mesh):
    done = mesh.submit(3, "echo", args={"listed": True})
    assert mesh.wait(3, done)["state"] == "done"
    answer = mesh.api(2, {"op": "task.list"})
    assert answer["ok"] and answer["total"] >= 1
    row = next(t for t in answer["tasks"] if t["id"] == done)
    assert row["kind"] == "echo" and row["state"] == "done" and row["attempt"] == 1 and row["submitted_ms"] > 0
    stamps = [t["submitted_ms"] for t in answer["tasks"]]
    assert stamps == sorted(stamps, reverse=True), "newest first"
    running = mesh.api(1, {"op": "task.list", "state": "running"})["tasks"]
    assert all(t["state"] == "running" for t in running) and done not in {t["id"] for t in running}
    there = mesh.api(1, {"op": "task.list", "node": row["node"], "limit": 1})
    assert [t["node"] for t in there["tasks"]] == [row["node"]] and there["total"] >= 1


def test_cancel_kills_a_running_handler(mesh):
    tid = mesh.submit(1, "sleep", args={"seconds": 30})
    task = mesh.wait(2, tid, states=("running",))
    assert task["state"] == "running", task
    executor = mesh.agent(task["node"])
    assert tid in executor.tasks.runner.running()
    local = mesh.api(int(executor.node_id[1:]), {"op": "task.local"})
    assert local["node"] == executor.node_id
    assert {"id": tid, "state": "running"}.items() <= next(t for t in local["tasks"] if t["id"] == tid).items()

    assert mesh.api(3, {"op": "task.cancel", "id": tid}) == {"ok": True, "id": tid}
    task = mesh.wait(1, tid)
    assert task["state"] == "cancelled" and task["result"]["outcome"] == "cancelled"
    assert eventually(lambda: tid not in executor.tasks.runner.running()), "the handler's run was killed"
    again = mesh.api(1, {"op": "task.cancel", "id": tid})
    assert again["exit"] == 3 and "already cancelled" in again["error"], again


# ------------------------------------------------------------------ refusals and bad input


def test_an_unknown_kind_is_bad_input_naming_it(mesh):
    answer = mesh.api(1, {"op": "task.submit", "kind": "transcode"})
    assert answer["exit"] == 2 and "'transcode'" in answer["error"] and "greet" in answer["error"], answer


def test_a_capability_nobody_has_is_refused_naming_it(mesh):
    answer = mesh.api(1, {"op": "task.submit", "kind": "echo", "caps": ["gpu"]})
    assert answer["exit"] == 3 and "gpu" in answer["error"], answer


def test_oversized_args_are_bad_input(mesh):
    answer = mesh.api(1, {"op": "task.submit", "kind": "echo", "args": {"blob": "x" * 600}})
    assert answer["exit"] == 2 and answer["error"].startswith("args:") and "512" in answer["error"], answer


def test_an_unknown_task_is_not_found(mesh):
    answer = mesh.api(1, {"op": "task.get", "id": "0123456789abcdef"})
    assert answer["exit"] == 4 and "0123456789abcdef" in answer["error"], answer
    assert mesh.api(2, {"op": "task.cancel", "id": "0123456789abcdef"})["exit"] == 4


def test_writes_without_the_fleet_key_are_refused(mesh):
    answer = mesh.api(1, {"op": "task.submit", "kind": "echo"}, sealed=False)
    assert answer["exit"] == 1 and "fleet key" in answer["error"], answer
    assert mesh.api(1, {"op": "task.cancel", "id": "0123456789abcdef"}, sealed=False)["exit"] == 1
    listed = mesh.api(1, {"op": "task.local"}, sealed=False)
    assert listed["ok"], "reads stay public where api.public_read is on"


def test_consensus_ops_on_a_node_without_consensus_say_so(mesh):
    answer = mesh.api(1, {"op": "kv.get", "key": "x"})
    assert answer["exit"] == 1 and "consensus.enabled = false" in answer["error"], answer


@pytest.mark.parametrize("request_, field", [
    ({"op": "task.submit"}, "kind"),
    ({"op": "task.submit", "kind": 5}, "kind"),
    ({"op": "task.submit", "kind": "Echo!"}, "kind"),
    ({"op": "task.submit", "kind": "echo", "args": ["x"]}, "args"),
    ({"op": "task.submit", "kind": "echo", "caps": "gpu"}, "caps"),
    ({"op": "task.submit", "kind": "echo", "caps": ["a b"]}, "caps"),
    ({"op": "task.submit", "kind": "echo", "caps": [f"c{i}" for i in range(9)]}, "caps"),
    ({"op": "task.submit", "kind": "echo", "strategy": "random"}, "strategy"),
    ({"op": "task.submit", "kind": "echo", "priority": 10}, "priority"),
    ({"op": "task.submit", "kind": "echo", "priority": True}, "priority"),
    ({"op": "task.submit", "kind": "echo", "timeout_s": -1}, "timeout_s"),
    ({"op": "task.submit", "kind": "echo", "max_attempts": 0}, "max_attempts"),
    ({"op": "task.submit", "kind": "echo", "key": "has space"}, "key"),
    ({"op": "task.submit", "kind": "echo", "kinds": "x"}, "'kinds'"),
    ({"op": "task.get", "id": "XYZ"}, "id"),
    ({"op": "task.get"}, "id"),
    ({"op": "task.cancel", "id": 7}, "id"),
    ({"op": "task.list", "state": "bogus"}, "state"),
    ({"op": "task.list", "node": "no such node!"}, "node"),
    ({"op": "task.list", "limit": 0}, "limit"),
])
def test_bad_fields_are_bad_input_naming_the_field(mesh, request_, field):
    answer = mesh.api(2, request_)
    assert answer.get("exit") == 2, answer
    assert field in answer["error"] and "\n" not in answer["error"] and len(answer["error"]) <= 200, answer


@pytest.mark.parametrize("op, setting", [("task.list", "tasks.enabled = false"), ("leader", "consensus.enabled = false")])
def test_an_op_of_a_disabled_family_names_the_setting(op, setting):
    api = Api(None, None, "n1", "default", None, lambda: True, 1)  # neither family: no mesh needed

    body, cf = asyncio.run(api.handle(cbor2.dumps({"op": op}), CBOR))
    answer = cbor2.loads(body)
    assert cf == CBOR and answer["exit"] == 1 and setting in answer["error"], answer
