"""mDNS discovery: filtering logic offline, and a real multicast round trip.

The round trip uses real multicast between this process and helper processes
(zeroconf wants one instance per process), all bound to the loopback
interface so nothing leaves the machine. On Linux, multicast over `lo` works
once zeroconf pins IP_MULTICAST_IF to 127.0.0.1, even without the MULTICAST
flag on `lo`, so no interface is reconfigured. Mesh names are unique per run,
so other mDNS users on this host cannot disturb the assertions.
"""

from __future__ import annotations

import asyncio
import json
import queue
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent import PROTOCOL_VERSION
from agent.io import mdns
from agent.io.mdns import MdnsDiscovery, instance_label, txt_properties

HELPER = Path(__file__).parent / "helpers" / "mdns_peer.py"
WAIT_S = 10.0


# --- offline -------------------------------------------------------------------------------


def test_instance_label_is_the_id_when_it_fits_one_label():
    assert instance_label("pi-kitchen") == "pi-kitchen"
    assert instance_label("a" * 63) == "a" * 63


def test_instance_label_shortens_long_or_dotted_ids_and_keeps_them_distinct():
    long_a, long_b = "n" * 60 + "aaaa", "n" * 60 + "bbbb"
    for node_id in (long_a, long_b, "pi.kitchen.lan"):
        label = instance_label(node_id)
        assert len(label.encode()) <= 63 and "." not in label
    assert instance_label(long_a) != instance_label(long_b)
    assert instance_label("pi.a") != instance_label("pi-a")
    info = mdns.AsyncServiceInfo(mdns.SERVICE_TYPE, f"{instance_label(long_a)}.{mdns.SERVICE_TYPE}", port=1)
    assert info.name.startswith("n" * 10)


def test_txt_holds_id_version_mesh_and_no_port():
    props = txt_properties("node-1", "home", 3)
    assert props == {"id": "node-1", "v": "3", "mesh": "home"}
    with pytest.raises(ValueError, match="TXT"):
        txt_properties("n" * 64, "m" * 130, 1)


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "n" * 65])
def test_invalid_node_id_rejected(bad):
    with pytest.raises(ValueError):
        MdnsDiscovery(bad, "mesh", "127.0.0.1", 5683, None, lambda *a: None)


def fake_info(props: dict, port: int = 5683, addresses=("10.0.0.7",)):
    return SimpleNamespace(
        decoded_properties=props,
        port=port,
        parsed_addresses=lambda version=None: list(addresses),
        parsed_scoped_addresses=lambda version=None: list(addresses),
    )


def test_consider_filters_by_mesh_version_and_self():
    seen = []
    d = MdnsDiscovery("me", "home", "127.0.0.1", 5683, None, lambda *a: seen.append(a))
    v = str(PROTOCOL_VERSION)
    d._consider(fake_info({"id": "peer", "v": v, "mesh": "home"}, port=6000))
    d._consider(fake_info({"id": "other", "v": v, "mesh": "office"}))
    d._consider(fake_info({"id": "newer", "v": str(PROTOCOL_VERSION + 1), "mesh": "home"}))
    d._consider(fake_info({"id": "me", "v": v, "mesh": "home"}))
    d._consider(fake_info({"id": "bad id", "v": v, "mesh": "home"}))
    d._consider(fake_info({"v": v, "mesh": "home"}))
    d._consider(fake_info({"id": "noaddr", "v": v, "mesh": "home"}, addresses=()))
    assert seen == [("peer", "10.0.0.7", 6000)]
    assert d.counters["discovered"] == 1
    assert d.counters["other_mesh"] == 1
    assert d.counters["other_version"] == 1
    assert d.counters["invalid"] == 2
    assert d.counters["unresolved"] == 1


def test_callback_exception_is_counted_not_raised(caplog):
    def boom(*_):
        raise RuntimeError("runtime bug")

    d = MdnsDiscovery("me", "home", "127.0.0.1", 5683, None, boom)
    d._consider(fake_info({"id": "peer", "v": str(PROTOCOL_VERSION), "mesh": "home"}))
    assert d.counters["callback_errors"] == 1
    assert "runtime bug" in caplog.text


def test_name_conflict_raises_and_cleans_up(mocker):
    """Zeroconf's conflict check is best effort (it needs the other node's PTR in cache
    before probing ends), so the network case is not reproducible; the handling is."""
    mocker.patch.object(mdns.AsyncZeroconf, "async_register_service", side_effect=mdns.NonUniqueNameException)
    d = MdnsDiscovery("twin", "home", "127.0.0.1", 5683, ["lo"], lambda *a: None)

    async def run() -> None:
        with pytest.raises(RuntimeError, match="already taken"):
            await d.start()
        assert d._zc is None and d._browser is None

    asyncio.run(run())


def test_stop_without_start_returns():
    d = MdnsDiscovery("me", "home", "127.0.0.1", 5683, None, lambda *a: None)
    asyncio.run(d.stop())


# --- real multicast on loopback --------------------------------------------------------------


class Peer:
    """A helper process running one MdnsDiscovery; its JSON-line events land in a queue."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HELPER), "--interface", "lo", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    async def expect(self, predicate, timeout: float = WAIT_S) -> dict:
        """The first event matching predicate, polling so the caller's event loop keeps running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.05)
                continue
            if predicate(event):
                return event
        raise AssertionError(f"helper {self.proc.args} sent no matching event within {timeout} s")

    def close(self) -> None:
        """EOF on stdin asks the helper to stop; kill it if it does not within 3 s."""
        self.proc.stdin.close()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(3)
        self._reader.join(3)
        self.proc.stdout.close()


@pytest.fixture
def peers():
    started: list[Peer] = []

    def spawn(*args: str) -> Peer:
        started.append(Peer(*args))
        return started[-1]

    yield spawn
    for peer in started:
        peer.close()


async def wait_until(condition, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)


def test_round_trip_between_processes(peers):
    tag = uuid.uuid4().hex[:8]
    mesh = f"test-{tag}"
    me, same, other_mesh, other_version = (f"{n}-{tag}" for n in ("me", "same", "othermesh", "otherver"))
    same_peer = peers("--id", same, "--mesh", mesh, "--port", "5701")
    other_peers = [
        peers("--id", other_mesh, "--mesh", f"other-{tag}"),
        peers("--id", other_version, "--mesh", mesh, "--version", str(PROTOCOL_VERSION + 1)),
    ]
    found: list[tuple[str, str, int]] = []

    async def scenario() -> None:
        d = MdnsDiscovery(me, mesh, "127.0.0.1", 5700, ["lo"], lambda *peer: found.append(peer))
        await d.start()
        try:
            # Both directions: we see the helper, the helper sees us.
            await wait_until(lambda: (same, "127.0.0.1", 5701) in found)
            await same_peer.expect(lambda e: e["event"] == "peer" and e["id"] == me and e["port"] == 5700)
            await wait_until(lambda: d.counters["other_mesh"] >= 1 and d.counters["other_version"] >= 1)
            assert {peer[0] for peer in found} == {same}

            # A new address reaches the other side (cache-flush replaces the old A record).
            await d.update_address("127.0.0.2")
            await same_peer.expect(lambda e: e["event"] == "peer" and e["id"] == me and e["address"] == "127.0.0.2")
        finally:
            began = time.monotonic()
            await d.stop()
            stop_seconds = time.monotonic() - began
        assert stop_seconds < 2.0

        # Our goodbye packets make the helper's browser drop us.
        async def helper_saw_removal() -> bool:
            same_peer.send("counters")
            event = await same_peer.expect(lambda e: e["event"] == "counters")
            return event["removed"] >= 1

        deadline = time.monotonic() + 5
        while not await helper_saw_removal():
            assert time.monotonic() < deadline, "helper never saw our goodbye"
            await asyncio.sleep(0.2)

        for peer in [same_peer, *other_peers]:
            peer.send("stop")
        for peer in [same_peer, *other_peers]:
            stopped = await peer.expect(lambda e: e["event"] == "stopped", timeout=5)
            assert stopped["seconds"] < 2.0

    asyncio.run(scenario())
