"""`meshagent doctor`: run the checks of agent.doctor on this device and print them.

It loads the configuration exactly as `meshagent run` would (same options, same
file), so it checks what the agent would run with; a configuration that does
not load is itself the failing check. Exit code 0 when nothing failed
(warnings do not fail), 1 when something did.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path


def cmd_doctor(args) -> int:
    from agent import doctor
    from agent.cli import DEFAULT_CONFIG, _config_flags
    from agent.config import MODEL_PATH, ConfigError, load_config

    sysroot = Path(args.sysroot)
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    try:
        loaded = load_config(path, board=args.board, flags=_config_flags(args),
                             model_path=sysroot / MODEL_PATH.relative_to("/"), explicit_path=bool(args.config))
    except ConfigError as exc:
        checks = [doctor.Check("config", doctor.FAIL, f"{exc} (the agent would not start; nothing else checked)")]
    else:
        config = loaded.config
        head = doctor.config_check(path, loaded.sources, config.board.name)
        # timedatectl describes this host, not a tree under --sysroot: there, only the tree's flag file counts.
        host = doctor.Host(sysroot=sysroot) if sysroot == Path("/") else doctor.Host(sysroot=sysroot, ntp_synchronized=lambda: None)
        checks = [head, *asyncio.run(doctor.run_checks(config, host))]
    print(json.dumps(doctor.summary(checks), indent=2) if args.json else doctor.format_checks(checks))
    return 0 if doctor.summary(checks)["ok"] else 1


def add_commands(sub) -> None:
    from agent.cli import _add_config_args

    p = sub.add_parser("doctor", help="check this device for what keeps the agent from working, and name it")
    _add_config_args(p)
    p.add_argument("--sysroot", default="/", metavar="DIR", help="read /proc, /sys and /run under DIR (a test tree)")
    p.add_argument("--json", action="store_true", help="print {ok, failed, warnings, checks: [{name, status, message}]}")
    p.set_defaults(func=cmd_doctor)
