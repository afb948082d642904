"""The CoAP endpoint on real UDP sockets over loopback."""

import asyncio
import os
import socket

import cbor2
import pytest
from aiocoap import Message
from aiocoap.numbers.codes import Code

from agent.io.coap import CoapEndpoint, coap_get

PORT = 56901


async def _endpoints(received):
    a = CoapEndpoint("127.0.0.21", PORT, lambda data, src: None)
    b = CoapEndpoint("127.0.0.22", PORT, lambda data, src: received.append((data, src)))
    await a.start()
    await b.start()
    return a, b


async def _wait(pred, seconds):
    for _ in range(int(seconds / 0.02)):
        if pred():
            return True
        await asyncio.sleep(0.02)
    return pred()


def test_more_datagrams_than_message_ids_all_arrive():
    """Message IDs are 16 bits; aiocoap would drop the 65,537th NON from one peer
    inside 247 s as a duplicate. Mesh datagrams bypass that dedup, so all arrive."""
    total = 70_000

    async def main():
        received = []
        a, b = await _endpoints(received)
        try:
            for start in range(0, total, 500):
                for i in range(start, min(total, start + 500)):
                    a.send("127.0.0.22", PORT, i.to_bytes(4, "big"))
                    # Sender and receiver share this loop, which reads one datagram
                    # per turn: yield so the receive buffer never overflows.
                    await asyncio.sleep(0)
                assert await _wait(lambda: len(received) >= min(total, start + 500) - 50, 5.0), len(received)
            await _wait(lambda: len(received) >= total, 5.0)
        finally:
            await a.stop()
            await b.stop()
        return received

    received = asyncio.run(main())
    seen = {int.from_bytes(d, "big") for d, _ in received}
    assert len(seen) >= total * 0.999, f"only {len(seen)} of {total} arrived"
    assert max(seen) == total - 1, "datagrams after the 65,536th must arrive too"
    assert received[0][1] == ("127.0.0.21", PORT), "the source is the sender's server port"


def test_well_known_core_and_read_resources():
    async def main():
        ep = CoapEndpoint("127.0.0.23", PORT, lambda d, s: None)
        allowed = {"v": True}
        ep.add_read("status", "meshagent.status", lambda: cbor2.dumps({"node_id": "x"}), lambda: allowed["v"])
        await ep.start()
        try:
            code, wkc = await coap_get("127.0.0.23", PORT, ".well-known/core")
            code2, status = await coap_get("127.0.0.23", PORT, "status")
            allowed["v"] = False
            code3, _ = await coap_get("127.0.0.23", PORT, "status")
        finally:
            await ep.stop()
        return code, wkc.decode(), code2, status, code3

    code, wkc, code2, status, code3 = asyncio.run(main())
    assert code.startswith("2.05")
    assert '</status>' in wkc and 'rt="meshagent.status"' in wkc and ('ct=60' in wkc or 'ct="60"' in wkc)
    assert "</mesh>" in wkc
    assert code2.startswith("2.05") and cbor2.loads(status) == {"node_id": "x"}
    assert code3.startswith("4.01"), "reads are refused when api.public_read is off"


def test_garbage_on_the_port_does_not_stop_the_endpoint():
    async def main():
        received = []
        a, b = await _endpoints(received)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for blob in (b"", b"\x00", b"\xff" * 100, bytes(range(256)) * 4, b"\x50\x02\x00\x01\xb4mesh\xff"):
                s.sendto(blob, ("127.0.0.22", PORT))
            s.close()
            await asyncio.sleep(0.2)
            a.send("127.0.0.22", PORT, b"after")
            await _wait(lambda: any(d == b"after" for d, _ in received), 3.0)
        finally:
            await a.stop()
            await b.stop()
        return received

    received = asyncio.run(main())
    assert any(d == b"after" for d, _ in received)


def test_send_to_an_unreachable_address_is_counted_not_raised():
    async def main():
        ep = CoapEndpoint("127.0.0.24", PORT, lambda d, s: None)
        await ep.start()
        try:
            ep.send("::1", 9, b"x")  # the socket is IPv4-bound through udp6; may or may not route
            ep.send("127.0.0.25", 9, b"x")
            await asyncio.sleep(0.2)
        finally:
            await ep.stop()
        return ep

    ep = asyncio.run(main())
    assert ep.sent + ep.send_errors == 2


def test_a_dead_peer_does_not_cost_the_next_datagram():
    """An ICMP port-unreachable from a peer that died must not make the next send
    (to a live peer) fail: a Raft candidate asks every voter in turn, and with a
    dead one before a live one it never got an answer."""
    received = []

    async def main():
        a, b = await _endpoints(received)
        try:
            a.send("127.0.0.23", PORT, b"resolve")  # the first send to an address resolves it first
            a.send("127.0.0.22", PORT, b"resolve")
            await _wait(lambda: len(received) >= 1, 5)
            received.clear()
            for i in range(50):
                # Nobody listens on .23: on loopback the ICMP error is back before
                # the next line runs, as it is on a LAN by the time of the next tick.
                a.send("127.0.0.23", PORT, b"to-the-dead")
                a.send("127.0.0.22", PORT, i.to_bytes(4, "big"))
                await asyncio.sleep(0.005)
            await _wait(lambda: len(received) >= 50, 5)
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(main())
    assert sorted(int.from_bytes(d, "big") for d, _ in received) == list(range(50))


def test_a_second_endpoint_on_a_taken_port_is_refused_naming_the_holder():
    """aiocoap binds with SO_REUSEPORT: without the check, a second agent on the same
    address and port would start and silently take half of the first one's datagrams."""
    from agent.io.ports import PortInUse

    async def body():
        first = CoapEndpoint("127.0.0.25", PORT, lambda d, s: None)
        await first.start()
        try:
            second = CoapEndpoint("127.0.0.25", PORT, lambda d, s: None)
            with pytest.raises(PortInUse) as caught:
                await second.start()
            return str(caught.value)
        finally:
            await first.stop()

    message = asyncio.run(body())
    assert f"UDP 127.0.0.25:{PORT} is already in use by pid {os.getpid()} (" in message
