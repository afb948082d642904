"""A second process for the mDNS tests (zeroconf wants one instance per process).

Runs one MdnsDiscovery and talks JSON lines: it prints {"event": "started"},
then {"event": "peer", ...} for each on_peer call; it answers the stdin
command "counters" with {"event": "counters", ...}, and "stop" (or EOF) with
stop() and {"event": "stopped", "seconds": ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from agent import PROTOCOL_VERSION
from agent.io.mdns import MdnsDiscovery


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--mesh", required=True)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5683)
    parser.add_argument("--interface", action="append")
    parser.add_argument("--version", type=int, default=PROTOCOL_VERSION)
    args = parser.parse_args()

    mdns = MdnsDiscovery(
        args.id,
        args.mesh,
        args.address,
        args.port,
        args.interface,
        lambda node_id, address, port: emit("peer", id=node_id, address=address, port=port),
        protocol_version=args.version,
    )
    await mdns.start()
    emit("started")
    while True:
        command = (await asyncio.to_thread(sys.stdin.readline)).strip()
        if command == "counters":
            emit("counters", **mdns.counters)
        elif command in ("stop", ""):
            break
    began = time.monotonic()
    await mdns.stop()
    emit("stopped", seconds=time.monotonic() - began)


if __name__ == "__main__":
    asyncio.run(main())
