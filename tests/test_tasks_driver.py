"""The task driver with real agents on loopback: the local queue survives an
agent restart (journal in the data dir), and finished results survive a
restart of the whole mesh."""

from __future__ import annotations

import asyncio
import sys

from agent.config import load_config
from agent.envelope import FleetKey
from agent.node import Agent, Identity

PORT = 56971
KEYS = [FleetKey.generate()]


def _agent(tmp_path, i, slow_here=False, boot=1):
    config = tmp_path / f"agent{i}.toml"
    text = ""
    if slow_here:  # only this node can run `slow`, one at a time: its queue grows
        text = (f'[handlers.slow]\ncommand = ["{sys.executable}", "-c", "import time; time.sleep(0.4); print(\'ok\')"]\n'
                "concurrency = 1\n")
    config.write_text(text)
    loaded = load_config(config, board="generic", explicit_path=True, flags={
        "node.bind": f"127.0.0.{110 + i}", "node.port": PORT, "node.data_dir": tmp_path / f"d{i}",
        "discovery.mdns": False, "consensus.enabled": False, "discovery.seeds": [f"127.0.0.111:{PORT}"],
        "tasks.slots": 1, "tasks.steal": False,
    })
    return Agent(loaded.config, Identity(f"n{i}", boot), KEYS)


async def _until(pred, seconds):
    for _ in range(int(seconds / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def test_a_queue_survives_an_agent_restart_and_every_task_finishes(tmp_path):
    async def main():
        agents = [_agent(tmp_path, 1), _agent(tmp_path, 2), _agent(tmp_path, 3, slow_here=True)]
        runs = {a.node_id: asyncio.create_task(a.run()) for a in agents}
        try:
            assert await _until(lambda: all(len(a.core.members) == 3 for a in agents) and "slow" in _kinds(agents[0]), 10)
            client = agents[0].tasks
            ids = [await client.submit(client.build_spec("slow", {}, [], "", 5, 0, 3, "")) for _ in range(6)]
            busy = agents[2]
            assert await _until(lambda: busy.tasks.engine.queued_count() >= 3, 5)
            busy.stop()
            await runs.pop(busy.node_id)
            again = _agent(tmp_path, 3, slow_here=True, boot=2)
            agents[2] = again
            runs[again.node_id] = asyncio.create_task(again.run())
            await again.ready.wait()
            assert again.tasks.journal.stats["live"] >= 3  # the queue came back from the journal
            records = [await client.wait(t, 30) for t in ids]
            assert [r.state for r in records] == ["done"] * 6, [(r.spec.id, r.state, [(e.what, e.node, e.detail) for e in r.history], r.result) for r in records if r.state != "done"]
            assert {r.result.node for r in records} == {"n3"}
            assert all(r.result.stdout == b"ok\n" for r in records)

            # the whole mesh restarts: finished records come back from the home members' journals
            for a in agents:
                a.stop()
            await asyncio.wait_for(asyncio.gather(*runs.values(), return_exceptions=True), 15)
            agents[:] = [_agent(tmp_path, 1, boot=2), _agent(tmp_path, 2, boot=2), _agent(tmp_path, 3, slow_here=True, boot=3)]
            runs.clear()
            runs.update({a.node_id: asyncio.create_task(a.run()) for a in agents})
            assert await _until(lambda: all(len(a.core.members) == 3 for a in agents), 10)
            again = [await agents[1].tasks.get(t) for t in ids]
            assert [(r.state, r.result) for r in again] == [(r.state, r.result) for r in records]
        finally:
            for a in agents:
                a.stop()
            await asyncio.wait_for(asyncio.gather(*runs.values(), return_exceptions=True), 15)

    asyncio.run(main())


def _kinds(agent):
    agent.tasks.engine.set_view(agent.tasks._view())
    return set().union(*(m.kinds for m in agent.tasks.engine.ctx.view.values()))
