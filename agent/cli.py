"""The `meshagent` command. Exit codes: 0 success, 1 failure (one-line reason on
stderr), 2 usage error (argparse) or bad input (a task's kind or arguments), 3 a
refused write, 4 no such key, proposal or task."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from agent import __version__

DEFAULT_CONFIG = Path("/etc/meshagent/agent.toml")


class Failure(Exception):
    """A command failed for a reason the user can act on; printed as one line."""


def _agent_address(text: str | None) -> tuple[str, int]:
    from agent.config import parse_seed

    return parse_seed(text or "127.0.0.1")


def _config_flags(args) -> dict[str, object]:
    """Command-line flags as dotted config keys (only those given)."""
    pairs = {
        "node.id": args.node_id, "node.mesh": args.mesh, "node.bind": args.bind, "node.port": args.port,
        "node.advertise": args.advertise, "node.data_dir": args.data_dir, "node.fleet_key_file": args.fleet_key_file,
        "node.capabilities": args.capability, "discovery.seeds": args.seed, "log.level": args.log_level,
        "console.device": args.console,
    }
    flags = {k: v for k, v in pairs.items() if v is not None}
    if args.insecure:
        flags["node.insecure"] = True
    if args.no_mdns:
        flags["discovery.mdns"] = False
    return flags


def _load(args):
    from agent.config import load_config

    path = Path(args.config) if args.config else DEFAULT_CONFIG
    return load_config(path, board=args.board, flags=_config_flags(args), explicit_path=bool(args.config))


def _keys(config):
    from agent.envelope import load_keys

    if config.node.insecure:
        return None
    return load_keys(Path(config.node.fleet_key_file))


# ------------------------------------------------------------------ commands


def cmd_run(args) -> int:
    from agent import logbuffer
    from agent.identity import boot_count, node_id
    from agent.io.sdnotify import Notifier
    from agent.node import Agent, Identity

    notifier = Notifier.from_environ()
    loaded = _load(args)
    config = loaded.config
    _setup_logging(config.log.level)
    logbuffer.install(config.log.memory_lines)  # after _setup_logging: basicConfig(force=True) drops root handlers
    keys = _keys(config)
    data_dir = Path(config.node.data_dir)
    ident = Identity(node_id(data_dir, config.node.id or None), boot_count(data_dir))
    agent = Agent(config, ident, keys, notifier=notifier, reload_config=lambda: _load(args))
    agent.config_sources = loaded.sources
    return asyncio.run(_serve(agent))


async def _serve(agent) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    loop.add_signal_handler(signal.SIGHUP, agent.reload)
    await agent.run()
    return 0


def cmd_status(args) -> int:
    return _show(args, "status")


def cmd_peers(args) -> int:
    return _show(args, "peers")


def _show(args, view: str) -> int:
    """Print an agent's /status or /peers as JSON or as a table."""
    from agent import tables

    data = _fetch(args, view)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(tables.format_status(data) if view == "status" else tables.format_peers(data))
    return 0


def _fetch(args, path: str):
    """GET the view; with --fleet-key-file, a sealed POST that works even where
    the agent refuses public reads (api.public_read = false)."""
    import cbor2
    from aiocoap.error import NetworkError

    from agent.io.coap import coap_get

    host, port = _agent_address(args.agent)
    sealed = _sealed_read(args, path) if args.fleet_key_file else None
    try:
        code, payload = asyncio.run(coap_get(host, port, path, timeout=args.timeout, payload=sealed and sealed[0]))
    except (TimeoutError, asyncio.TimeoutError):
        raise Failure(f"no answer from the agent at {host}:{port} within {args.timeout:g} s (is `meshagent run` running there?)") from None
    except (OSError, NetworkError) as exc:
        raise Failure(f"cannot reach the agent at {host}:{port}: {_reason(exc)}") from None
    if code.startswith("4.01") and not sealed:
        raise Failure(f"the agent at {host}:{port} refuses public reads; pass --fleet-key-file")
    if not code.startswith("2.05"):
        raise Failure(f"the agent at {host}:{port} answered {code}: {payload.decode(errors='replace')}")
    if sealed:
        opened = sealed[1].open(payload)
        if opened is None:
            raise Failure(f"the answer from {host}:{port} is not sealed with this fleet key and mesh ({args.mesh})")
        payload = opened[1]
    try:
        return cbor2.loads(payload)
    except Exception as exc:
        raise Failure(f"the agent at {host}:{port} sent an unreadable {path}: {exc}") from None


def _reason(exc: BaseException) -> str:
    """The innermost cause: aiocoap wraps e.g. ECONNREFUSED in a bare NetworkError."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _sealed_read(args, path: str):
    """(sealed request, opener for the answer) under a one-off client identity."""
    import secrets

    import cbor2

    from agent.counters import Counters
    from agent.envelope import Opener, Sealer, load_keys
    from agent.node import API_MAX_ANSWER

    keys = load_keys(Path(args.fleet_key_file))
    sealer = Sealer(args.mesh, keys, f"cli-{secrets.token_hex(4)}", secrets.randbelow(2**31) + 1)
    opener = Opener(args.mesh, keys, Counters(), max_datagram=API_MAX_ANSWER + 1024)
    return sealer.seal(cbor2.dumps(["read", path])), opener


def cmd_recover(args) -> int:
    from agent.recover import recover

    loaded = _load(args)
    return recover(loaded.config, _keys(loaded.config), yes=args.yes, timeout=args.timeout, out=print)


def cmd_config_show(args) -> int:
    from agent.config import config_as_dict, format_config

    loaded = _load(args)
    if args.json:
        print(json.dumps(config_as_dict(loaded), indent=2, sort_keys=True, default=str))
    else:
        print(format_config(loaded))
    return 0


def cmd_board(args) -> int:
    from agent import board
    from agent.config import MODEL_PATH, load_config

    sysroot = Path(args.sysroot)
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    loaded = load_config(path, board=args.board, model_path=sysroot / MODEL_PATH.relative_to("/"), explicit_path=bool(args.config))
    data = board.report(loaded, sysroot)
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else board.format_report(data))
    return 0


def cmd_keygen(args) -> int:
    from agent.envelope import generate_key_file

    path = Path(args.out)
    generate_key_file(path, force=args.force)
    print(f"wrote a new fleet key to {path} (mode 0600); copy it to every device of the mesh")
    return 0


def cmd_demo(args) -> int:
    from agent.demo import run_demo

    try:
        return run_demo(args.nodes, base=args.base, port=args.port, insecure=args.insecure, duration=args.duration)
    except ValueError as exc:
        raise Failure(str(exc)) from None


# -------------------------------------------------------------------- parser


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=f"TOML config file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--board", metavar="NAME", help="board profile (default: detected from /proc/device-tree/model)")
    p.add_argument("--node-id", metavar="ID", help="override the node id")
    p.add_argument("--mesh", metavar="NAME", help="mesh name; nodes of other meshes are kept out")
    p.add_argument("--bind", metavar="ADDRESS", help="address to listen on")
    p.add_argument("--port", type=int, metavar="N", help="UDP port (default 5683)")
    p.add_argument("--advertise", metavar="ADDRESS", help="address peers should use to reach us")
    p.add_argument("--data-dir", metavar="DIR", help="where the node id and boot counter are kept")
    p.add_argument("--seed", action="append", metavar="HOST[:PORT]", help="a peer to join through (repeatable)")
    p.add_argument("--no-mdns", action="store_true", help="do not announce or browse with mDNS")
    p.add_argument("--fleet-key-file", metavar="FILE", help="the fleet key (see `meshagent keygen`)")
    p.add_argument("--insecure", action="store_true", help="run without a fleet key: demos only")
    p.add_argument("--capability", action="append", metavar="LABEL", help="a capability this node offers (repeatable)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--console", metavar="DEVICE", help='serial line console port (115200 8N1), "board" or "off" (default: config console.device)')


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--agent", metavar="HOST[:PORT]", help="the agent to ask (default 127.0.0.1:5683)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--fleet-key-file", metavar="FILE", help="read with the fleet key (needed where public reads are off)")
    p.add_argument("--mesh", default="default", metavar="NAME", help="the agent's mesh name, with --fleet-key-file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshagent", description="Peer-to-peer agent for device fleets.")
    parser.add_argument("--version", action="version", version=f"meshagent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the agent in the foreground")
    _add_config_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="ask an agent for its status")
    _add_client_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("peers", help="ask an agent for the members it knows")
    _add_client_args(p)
    p.set_defaults(func=cmd_peers)

    p = sub.add_parser("config", help="configuration")
    csub = p.add_subparsers(dest="config_command", required=True)
    q = csub.add_parser("show", help="print the effective configuration and where each value came from")
    _add_config_args(q)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_config_show)

    p = sub.add_parser("board", help="the board profile in use, why, and what the board reads now")
    p.add_argument("--config", metavar="FILE", help=f"TOML config file (default {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--board", metavar="NAME", help="explain this profile instead of the detected one")
    p.add_argument("--sysroot", default="/", metavar="DIR", help="read /proc and /sys under DIR (a mounted image, a test tree)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_board)

    p = sub.add_parser("keygen", help="write a new fleet key")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("demo", help="start N local agents on 127.0.0.x and watch them converge")
    p.add_argument("--nodes", type=int, default=5, metavar="N")
    p.add_argument("--base", default="127.0.0.1", metavar="ADDRESS", help="first loopback address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5683, metavar="N")
    p.add_argument("--insecure", action="store_true", help="run the demo mesh without a fleet key")
    p.add_argument("--duration", type=float, default=0, metavar="SECONDS", help="stop by itself after this long (0 = until Ctrl-C)")
    p.set_defaults(func=cmd_demo)

    from agent import cli_console, cli_consensus, cli_doctor, cli_tasks
    cli_console.add_commands(sub)
    cli_consensus.add_commands(sub, _add_client_args)
    cli_tasks.add_commands(sub, _add_client_args)
    cli_doctor.add_commands(sub)
    p = sub.add_parser("recover", help="offline: restart a mesh whose voters are permanently lost, with this node as the only voter")
    _add_config_args(p)
    p.add_argument("--yes", action="store_true", help="do it (without: only check and explain)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="how long to wait for each old voter's answer")
    p.set_defaults(func=cmd_recover)
    return parser


def _setup_logging(level: str) -> None:
    """journald-friendly: under systemd (JOURNAL_STREAM set) lines carry a <N>
    syslog priority prefix and no timestamp; on a terminal, a timestamp."""
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(priority)s%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(_priority)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _priority(record: logging.LogRecord) -> bool:
    record.priority = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>", logging.ERROR: "<3>"}.get(record.levelno, "<2>")
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent.config import ConfigError
    from agent.envelope import KeyFileError
    from agent.identity import IdentityError

    from agent.cli_consensus import CallFailed
    from agent.io.store import StoreError

    try:
        return args.func(args)
    except CallFailed as exc:
        print(f"meshagent: {exc}", file=sys.stderr)
        return exc.exit_code
    except (Failure, ConfigError, KeyFileError, IdentityError, StoreError) as exc:
        print(f"meshagent: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"meshagent: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 1
