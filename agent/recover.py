"""`meshagent recover`: bring back a mesh whose voters are permanently lost.

Raft cannot elect a leader without a majority of its voters; if they are gone
for good (SD cards dead, devices stolen) the replicated state is stuck
read-only forever. Recovery makes THIS node the only voter of a new
configuration, keeping every entry its log holds (committed or not, as etcd's
--force-new-cluster does), so the state is the most recent this node has seen.

Run it on the surviving node with the most recent state, with the agent
stopped. It refuses while the agent runs (the data dir is locked) and while a
quorum of the old voters answers over the network: then nothing is lost and
recovery would only fork the state. After it, start the agent; with
`consensus.voters = "auto"` the new leader adds voters one at a time. Old
voters that come back later must have their data dir's `raft/` removed
first, or they may elect a leader of the old configuration among themselves.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path

import cbor2

from agent.config import Config
from agent.core import raft_messages as rm
from agent.core.raft import HardState
from agent.core.statemachine import StateMachine


def recover(config: Config, keys, *, yes: bool, timeout: float, out: Callable[[str], None]) -> int:
    from agent.identity import node_id
    from agent.io.store import RaftStore, StoreError

    data_dir = Path(config.node.data_dir)
    raft_dir = data_dir / "raft"
    if not (raft_dir / "wal").exists() and not (raft_dir / "snap").exists():
        out(f"nothing to recover: {raft_dir} holds no Raft state")
        return 1
    me = node_id(data_dir, config.node.id or None)
    store = RaftStore(raft_dir)
    try:
        try:
            sm, voters, last, hard = _replay(store)
        except StoreError as exc:
            out(f"cannot open the Raft state: {exc}; if the agent is running, stop it first (systemctl stop meshagent)")
            return 1
        answered = asyncio.run(_ask_voters(raft_dir, voters, me, config, keys, timeout))
        quorum = len(voters) // 2 + 1
        alive = [v for v, a in answered.items() if a is not None]
        writable = [f"{v} (leader {a.get('leader')}, term {a.get('term')})" for v, a in answered.items() if a and a.get("mode") == "read-write"]
        if writable or len(alive) >= quorum:
            out(f"refused: a quorum of the voters is reachable ({', '.join(writable or alive)}); "
                "recovery is only for voters that are permanently lost")
            return 3
        out(f"voters {', '.join(voters) or '(none)'}: {len(alive)} of {len(voters)} answer, {quorum} needed")
        out(f"this node ({me}) holds entries up to index {last[0]} (term {last[1]})")
        if not yes:
            out("rerun with --yes to make this node the only voter of a new configuration")
            return 0
        meta = rm.SnapshotMeta(last[0], last[1], (me,))
        store.save_snapshot(meta, sm.snapshot())
        store.save(HardState(term=max(hard.term, last[1]) + 1, vote=None, commit=last[0]), [])
        store.compact(last[0])
        out(f"recovered: {me} is now the only voter at index {last[0]}; start the agent. "
            "Remove raft/ from the data dir of any old voter before it rejoins.")
        return 0
    finally:
        store.close()


def _replay(store):
    """The state machine with every entry of the local log applied, the last
    configuration's voters, (last index, last term), and the hard state."""
    recovered = store.load()
    snap = store.load_snapshot()
    sm = StateMachine()
    voters: set[str] = set()
    last = (0, 0)
    if snap is not None:
        meta, data = snap
        sm.restore(data)
        voters = set(meta.voters)
        last = (meta.index, meta.term)
    for e in recovered.entries:
        if e.index <= last[0]:
            continue
        if e.kind == rm.EntryKind.CONF:
            change = rm.ConfChange.decode(e.data)
            (voters.add if change.op == "add" else voters.discard)(change.node)
            sm.set_voters(tuple(sorted(voters)), e.index)
        elif e.data:
            sm.apply(e.index, e.data)
        last = (e.index, e.term)
    return sm, sorted(voters), last, recovered.hard_state


async def _ask_voters(raft_dir: Path, voters: list[str], me: str, config: Config, keys, timeout: float) -> dict:
    """{voter: its `leader` answer, or None} for every other voter whose last
    address the agent remembered (raft/voters.cbor)."""
    from agent.counters import Counters
    from agent.envelope import Opener, Sealer
    from agent.io.coap import coap_get

    try:
        addresses = cbor2.loads((raft_dir / "voters.cbor").read_bytes())
    except (OSError, ValueError, cbor2.CBORDecodeError):
        addresses = {}
    sealer = Sealer(config.node.mesh, keys, f"recover-{secrets.token_hex(4)}", secrets.randbelow(2**31) + 1)
    opener = Opener(config.node.mesh, keys, Counters(), max_datagram=300_000)

    async def ask(voter: str):
        addr = addresses.get(voter)
        if not addr:
            return None
        try:
            code, payload = await coap_get(addr[0], addr[1], "api", timeout=timeout, payload=sealer.seal(cbor2.dumps({"op": "leader"})), content_format=16)
            opened = opener.open(payload)
            return cbor2.loads(opened[1]) if opened else None
        except Exception:
            return None

    others = [v for v in voters if v != me]
    answers = await asyncio.gather(*(ask(v) for v in others))
    return dict(zip(others, answers))
