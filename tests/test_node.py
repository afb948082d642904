"""The driver with real CoAP on loopback: agents in one process join, and hostile
datagrams are dropped and counted without harm."""

import asyncio
import os
import random

import cbor2

from agent.config import load_config
from agent.envelope import FleetKey, Sealer
from agent.messages import Alive, Packet, Ping
from agent.node import Agent, Identity
from agent.wire import encode_packet

PORT = 56911


def _agent(tmp_path, i, keys, mesh="default", seeds=()):
    loaded = load_config(
        tmp_path / "none.toml", board="generic",
        flags={"node.bind": f"127.0.0.{40 + i}", "node.port": PORT, "node.data_dir": tmp_path / f"d{i}",
               "discovery.mdns": False, "node.mesh": mesh, "node.insecure": keys is None},
    )
    return Agent(loaded.config, Identity(f"n{i}", 1), keys, seeds=list(seeds))


async def _until(pred, seconds):
    for _ in range(int(seconds / 0.05)):
        if pred():
            return True
        await asyncio.sleep(0.05)
    return pred()


def _alive(agent):
    return sorted(p["id"] for p in agent.peers() if p["state"] == "alive")


async def _run(agents, body):
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        for a in agents:
            await asyncio.wait_for(a.ready.wait(), 5)
        return await body()
    finally:
        for a in agents:
            a.stop()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


def test_three_agents_join_through_one_seed_and_see_load(tmp_path):
    keys = [FleetKey.generate()]
    seed = [("127.0.0.41", PORT)]
    agents = [_agent(tmp_path, i, keys, seeds=seed) for i in (1, 2, 3)]

    async def body():
        ok = await _until(lambda: all(len(_alive(a)) == 2 for a in agents), 10)
        return ok, [a.peers() for a in agents], agents[0].status()

    ok, peers, status = asyncio.run(_run(agents, body))
    assert ok, peers
    p = peers[0][0]
    assert {"id", "address", "port", "state", "incarnation", "load", "rtt_ms", "last_seen_s"} <= p.keys()
    assert p["load"]["mem"] is not None and 0 <= p["load"]["mem"] <= 100, "load travels in gossiped metadata"
    assert status["members"]["alive"] == 3 and status["insecure"] is False


def test_hostile_datagrams_are_dropped_counted_and_harmless(tmp_path):
    keys = [FleetKey.generate()]
    a = _agent(tmp_path, 4, keys)
    b = _agent(tmp_path, 5, keys, seeds=[("127.0.0.44", PORT)])
    rng = random.Random(7)

    async def body():
        assert await _until(lambda: _alive(a) == ["n5"], 10)
        members_before = len(a.core.members)
        stranger = Sealer("default", [FleetKey.generate()], "n9", 1)  # another fleet's key
        forger = Sealer("default", [FleetKey(keys[0].kid, os.urandom(32))], "n9", 1)  # our key id, wrong key
        other_mesh = Sealer("other", keys, "n9", 1)
        good = Sealer("default", keys, "n8", 1)
        for i in range(3000):
            kind = i % 6
            if kind == 0:
                blob = os.urandom(rng.randrange(0, 1100)) if i % 12 else forger.seal(encode_packet(Packet("n9", (Ping(i, "n4"),))))
            elif kind == 1:
                blob = stranger.seal(encode_packet(Packet("n9", (Ping(i, "n4"),))))
            elif kind == 2:
                blob = other_mesh.seal(encode_packet(Packet("n9", (Ping(i, "n4"),))))
            elif kind == 3:
                blob = good.seal(b"\x83\x01")  # authentic but not a packet
            elif kind == 4:
                blob = cbor2.dumps([1, "n8", [[99, 1, 2]]])  # unsealed
            else:
                sealed = good.seal(encode_packet(Packet("n8", (Alive("n8", 1, "127.0.0.99", 9),))))
                a._on_datagram(sealed, ("127.0.0.99", 9))
                blob = sealed  # the same datagram again: a replay
            a._on_datagram(blob, ("127.0.0.99", 9))
            if i % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.5)
        return members_before, a.status(), _alive(a)

    before, status, alive = asyncio.run(_run([a, b], body))
    drops = status["drops"]
    for reason in ("unknown_key", "wrong_mesh", "replay"):
        assert drops.get(reason, 0) >= 400, (reason, drops)
    assert drops.get("auth_failed", 0) >= 200, drops
    assert sum(drops.values()) >= 2500
    assert "n5" in alive, "the real peer is still alive"
    assert "n9" not in alive, "nothing from another fleet or mesh got in"


def test_reads_need_the_key_when_public_reads_are_off(tmp_path):
    """api.public_read = false: a plain GET gets 4.01, the CLI with the key file reads."""
    import subprocess
    import sys

    from agent.envelope import write_key_file

    key = FleetKey.generate()
    write_key_file(tmp_path / "fleet.key", [key])
    loaded = load_config(
        tmp_path / "none.toml", board="generic",
        flags={"node.bind": "127.0.0.46", "node.port": PORT, "node.data_dir": tmp_path / "d",
               "discovery.mdns": False, "api.public_read": False},
    )
    agent = Agent(loaded.config, Identity("n6", 1), [key])

    def cli(*extra):
        return subprocess.run(
            [sys.executable, "-m", "agent", "status", "--json", "--agent", f"127.0.0.46:{PORT}", *extra],
            capture_output=True, text=True, timeout=20,
        )

    async def body():
        loop = asyncio.get_running_loop()
        plain = await loop.run_in_executor(None, cli)
        keyed = await loop.run_in_executor(None, cli, "--fleet-key-file", str(tmp_path / "fleet.key"))
        write_key_file(tmp_path / "other.key", [FleetKey.generate()])
        wrong = await loop.run_in_executor(None, cli, "--fleet-key-file", str(tmp_path / "other.key"))
        return plain, keyed, wrong

    plain, keyed, wrong = asyncio.run(_run([agent], body))
    assert plain.returncode == 1 and "refuses public reads" in plain.stderr
    assert keyed.returncode == 0, keyed.stderr
    import json

    assert json.loads(keyed.stdout)["node_id"] == "n6"
    assert wrong.returncode == 1 and "4.01" in wrong.stderr


def test_a_new_address_of_ours_reaches_the_peers_without_a_restart(tmp_path, mocker):
    """Wi-Fi reconnect: the watcher reports a new address; peers learn it by gossip."""
    keys = [FleetKey.generate()]
    a = _agent(tmp_path, 7, keys)
    b = _agent(tmp_path, 8, keys, seeds=[("127.0.0.47", PORT)])

    async def body():
        assert await _until(lambda: _alive(b) == ["n7"], 10)
        inc = a.core.incarnation
        mocker.patch.object(a.addr_watch, "check", return_value="127.0.0.49")
        await a._check_address()
        seen = await _until(lambda: any(p["id"] == "n7" and p["address"] == "127.0.0.49" for p in b.peers()), 10)
        return seen, inc, a.core.incarnation, a.status()["address"]

    seen, before, after, address = asyncio.run(_run([a, b], body))
    assert seen, "the peer lists our new address"
    assert after > before and address == "127.0.0.49"
