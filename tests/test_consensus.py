"""The consensus driver and API with real CoAP on loopback: agents in one process
elect a leader, replicate writes, survive restarts, refuse writes without a
quorum, pick voters by themselves, and catch a lagging node up by snapshot."""

import asyncio

import cbor2
import pytest

from agent.api import COSE
from agent.config import load_config
from agent.counters import Counters
from agent.envelope import FleetKey, Opener, Sealer
from agent.io.coap import RAFT_PATH
from agent.node import Agent, Identity

PORT = 56931


def _agent(tmp_path, i, keys, voters=("n1", "n2", "n3"), **flags):
    loaded = load_config(
        tmp_path / "none.toml", board="generic",
        flags={"node.bind": f"127.0.0.{60 + i}", "node.port": PORT, "node.data_dir": tmp_path / f"d{i}",
               "discovery.mdns": False, "node.insecure": keys is None, "consensus.voters": voters,
               "discovery.seeds": [f"127.0.0.61:{PORT}"]} | flags,
    )
    return Agent(loaded.config, Identity(f"n{i}", 1), keys)


async def _until(pred, seconds):
    for _ in range(int(seconds / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def _leaders(agents):
    return [a.node_id for a in agents if a.consensus.raft.role == "leader"]


async def _start(agents):
    tasks = [asyncio.create_task(a.run()) for a in agents]
    for a in agents:
        await asyncio.wait_for(a.ready.wait(), 5)
    return tasks


async def _stop(agents, tasks):
    for a in agents:
        a.stop()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


def _run(agents, body):
    async def main():
        tasks = await _start(agents)
        try:
            return await body()
        finally:
            await _stop(agents, tasks)
    return asyncio.run(main())


async def _api(agent, request):
    """A request as the CoAP resource would get it, sealed when the mesh has a key."""
    api = agent.api
    if api.insecure:
        body, _ = await api.handle(cbor2.dumps(request, canonical=True), 60)
        return cbor2.loads(body)
    body, cf = await api.handle(_CLIENT.seal(cbor2.dumps(request, canonical=True)), COSE)
    assert cf == COSE
    return cbor2.loads(Opener("default", _KEYS, Counters(), max_datagram=1 << 20).open(body)[1])


_KEYS = [FleetKey.generate()]
_CLIENT = Sealer("default", _KEYS, "cli-test", 7)  #: one client identity: its counter must keep growing


def test_three_voters_replicate_and_survive_a_restart(tmp_path):
    agents = [_agent(tmp_path, i, _KEYS) for i in (1, 2, 3)]

    async def body():
        assert await _until(lambda: len(_leaders(agents)) == 1, 10)
        follower = next(a for a in agents if a.consensus.raft.role != "leader")
        put = await _api(follower, {"op": "kv.put", "key": "door", "value": "open"})
        assert put["ok"] and put["revision"] > 0
        got = await _api(agents[2], {"op": "kv.get", "key": "door"})
        assert got["value"] == b"open" and got["revision"] == put["revision"]
        missing = await _api(agents[0], {"op": "kv.get", "key": "window"})
        assert missing["exit"] == 4 and "not found" in missing["error"]
        conflict = await _api(agents[1], {"op": "kv.cas", "key": "door", "rev": 0, "value": "x"})
        assert conflict["exit"] == 3 and "conflict" in conflict["error"]
        return follower.status()["raft"]

    raft = _run(agents, body)
    assert raft["mode"] == "read-write" and raft["voters"] == ["n1", "n2", "n3"] and raft["leader"]
    assert raft["disk"]["bytes_written"] > 0 and raft["disk"]["fsyncs"] > 0

    again = [_agent(tmp_path, i, _KEYS) for i in (1, 2, 3)]

    async def after_restart():
        assert await _until(lambda: len(_leaders(again)) == 1, 10)
        return await _api(again[0], {"op": "kv.get", "key": "door"})

    assert _run(again, after_restart)["value"] == b"open", "an acknowledged write survives a restart of every node"


def test_a_node_without_a_quorum_is_read_only_and_says_why(tmp_path):
    agents = [_agent(tmp_path, i, _KEYS) for i in (1, 2, 3)]

    async def body():
        tasks = await _start(agents)
        try:
            assert await _until(lambda: len(_leaders(agents)) == 1, 10)
            assert (await _api(agents[0], {"op": "kv.put", "key": "k", "value": "v1"}))["ok"]
            assert await _until(lambda: all(a.consensus.applied >= agents[0].consensus.applied for a in agents), 5)
            leader = _leaders(agents)[0]
            for a, t in zip(agents[1:], tasks[1:]):
                a.stop()
                await asyncio.wait_for(t, 10)
            lone = agents[0]
            assert await _until(lambda: lone.consensus.mode() == "read-only", 6)
            refused = await _api(lone, {"op": "kv.put", "key": "k", "value": "v2"})
            stale = await _api(lone, {"op": "kv.get", "key": "k", "stale": True})
            fresh = await _api(lone, {"op": "kv.get", "key": "k"})
            return leader, refused, stale, fresh, lone.status()["raft"]
        finally:
            agents[0].stop()
            await asyncio.wait_for(tasks[0], 10)

    leader, refused, stale, fresh, raft = asyncio.run(body())
    assert refused["exit"] == 3 and "read-only" in refused["error"] and leader in refused["error"]
    assert stale["value"] == b"v1", "--stale reads the local copy on the minority side"
    assert fresh["exit"] == 3, "a linearizable read needs a leader"
    assert raft["mode"] == "read-only" and raft["why"]


def test_auto_voters_bootstrap_and_grow_to_three(tmp_path):
    agents = [_agent(tmp_path, i, _KEYS, voters="auto", **{"consensus.stabilization_ms": 300}) for i in (1, 2, 3)]

    async def body():
        ok = await _until(lambda: all(len(a.consensus.raft.voters) == 3 for a in agents) and len(_leaders(agents)) == 1, 25)
        return ok, [a.status()["raft"] for a in agents]

    ok, rafts = _run(agents, body)
    assert ok, rafts
    assert {tuple(r["voters"]) for r in rafts} == {("n1", "n2", "n3")}


def test_proposal_decided_by_auto_votes_and_observed(tmp_path):
    agents = [_agent(tmp_path, i, _KEYS, **{"consensus.vote_policy": "alive-assignee"}) for i in (1, 2, 3)]

    async def body():
        assert await _until(lambda: len(_leaders(agents)) == 1, 10)
        assert await _until(lambda: all(len([p for p in a.peers() if p["state"] == "alive"]) == 2 for a in agents), 10)
        good = await _api(agents[1], {"op": "prop.new", "value": {"task_assignment": "auth-service", "assigned_to": "n3"}})
        bad = await _api(agents[2], {"op": "prop.new", "value": {"assigned_to": "nobody"}, "deadline_s": 60})
        assert good["ok"] and bad["ok"]

        def outcome(pid):
            p = agents[0].consensus.sm.proposal(pid)
            return p and p.outcome

        assert await _until(lambda: outcome(good["id"]) and outcome(bad["id"]), 10)
        listed = await _api(agents[0], {"op": "prop.get", "id": good["id"]})
        return outcome(good["id"]), outcome(bad["id"]), listed["proposal"]

    good, bad, proposal = _run(agents, body)
    assert good == "approved" and bad == "rejected"
    assert proposal["value"]["assigned_to"] == "n3" and len(proposal["votes"]) >= 2


def test_a_lagging_node_catches_up_from_a_snapshot(tmp_path):
    flags = {"consensus.snapshot_entries": 100, "consensus.keep_entries": 0}
    agents = [_agent(tmp_path, i, _KEYS, **flags) for i in (1, 2, 3)]

    async def body():
        tasks = await _start(agents[:2])
        try:
            assert await _until(lambda: len(_leaders(agents[:2])) == 1, 10)
            for i in range(150):
                answer = await _api(agents[0], {"op": "kv.put", "key": f"k{i % 20}", "value": f"v{i}"})
                assert answer.get("ok"), (i, answer)
            leader = next(a for a in agents if a.node_id == _leaders(agents[:2])[0])
            assert leader.consensus.snapshot_index >= 100
            tasks += await _start(agents[2:])
            late = agents[2]
            assert await _until(lambda: late.consensus.applied >= leader.consensus.applied, 15)
            return late.consensus.sm.get("k9").value, late.drops.snapshot()
        finally:
            await _stop([a for a in agents], tasks)

    value, drops = asyncio.run(body())
    assert value == b"v149"
    assert "snapshot_fetch_failed" not in drops


def test_hostile_raft_datagrams_are_dropped_and_counted(tmp_path):
    agents = [_agent(tmp_path, i, _KEYS) for i in (1, 2, 3)]
    other_fleet = Sealer("default", [FleetKey.generate()], "n2", 1, max_packet=3800, purpose="raft")
    # A key holder that is not a member (a forged higher boot for a real member would
    # make its real datagrams look like replays: insiders can do that, and it is tested
    # in test_envelope).
    ours = Sealer("default", _KEYS, "n9", 1, max_packet=3800, purpose="raft")

    async def body():
        assert await _until(lambda: len(_leaders(agents)) == 1, 10)
        target = agents[0]
        before = dict(target.drops.snapshot())
        send = agents[1].endpoint.send
        send("127.0.0.61", PORT, b"garbage" * 40, RAFT_PATH)  # not CBOR at all: "malformed"
        send("127.0.0.61", PORT, other_fleet.seal(b"\x80"), RAFT_PATH)
        send("127.0.0.61", PORT, ours.seal(cbor2.dumps([[99, "n9", "n1", 5]])), RAFT_PATH)  # unknown message code
        send("127.0.0.61", PORT, ours.seal(cbor2.dumps([[0, "n3", "n1", 5, 0, 0, False]])), RAFT_PATH)  # claims another sender
        await asyncio.sleep(0.5)
        put = await _api(target, {"op": "kv.put", "key": "still", "value": "fine"})
        return before, target.drops.snapshot(), put

    before, after, put = _run(agents, body)
    grew = {k for k in after if after[k] > before.get(k, 0)}
    assert put.get("ok"), ("the node keeps working", put)
    assert {"malformed", "unknown_key", "raft_misaddressed"} <= grew, after
    assert any(k.startswith("raft_") and k != "raft_misaddressed" for k in grew), after
    assert "internal_error" not in after


@pytest.mark.parametrize("op, fields, expect", [
    ("kv.put", {"key": "", "value": "x"}, "key"),
    ("kv.put", {"key": "k"}, "value"),
    ("kv.cas", {"key": "k", "rev": -1, "value": "x"}, "rev"),
    ("prop.new", {"value": {"a": 1}, "deadline_s": 0}, "deadline"),
    ("prop.vote", {"id": "abc", "choice": "maybe"}, "approve or reject"),
    ("nope", {}, "unknown op"),
])
def test_bad_requests_get_a_clear_error(tmp_path, op, fields, expect):
    agents = [_agent(tmp_path, 1, _KEYS, voters=("n1",))]

    async def body():
        assert await _until(lambda: len(_leaders(agents)) == 1, 10)
        return await _api(agents[0], {"op": op} | fields)

    answer = _run(agents, body)
    assert answer.get("exit") == 1 and expect in answer["error"], answer
