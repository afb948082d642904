"""Readable tables for `meshagent status` and `meshagent peers`."""

from __future__ import annotations


def _num(value, fmt: str = "{:.1f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def format_status(s: dict) -> str:
    members = s.get("members", {})
    load = s.get("load", {})
    proc = s.get("process", {})
    rows = [
        ("node", s.get("node_id")),
        ("mesh", s.get("mesh") + ("   ** INSECURE: no fleet key **" if s.get("insecure") else "")),
        ("address", f"{s.get('address')}:{s.get('port')}"),
        ("version", f"{s.get('version')} (protocol {s.get('protocol')})"),
        ("board", s.get("board")),
        ("uptime", f"{s.get('uptime_s', 0):.0f} s"),
        ("members", "  ".join(f"{k} {members.get(k, 0)}" for k in ("alive", "suspect", "dead", "left"))),
        ("load", f"cpu {_num(load.get('cpu'))}%  mem {_num(load.get('mem'))}%  load1 {_num(load.get('load1'), '{:.2f}')}  temp {_num(load.get('temp_c'))} C"),
        ("process", f"rss {_num((proc.get('rss_bytes') or 0) / 1e6)} MB  cpu {_num(proc.get('cpu_percent'))}%"),
        ("health", f"awareness {s.get('awareness', 0)} (0 is healthy)"),
    ]
    raft = s.get("raft")
    if raft:
        rows.append(("raft", f"{raft['role']} term {raft['term']}  leader {raft['leader'] or 'none'}  commit {raft['commit_index']}  {raft['mode']}"))
        rows.append(("voters", ", ".join(raft.get("voters") or []) or "none yet"))
        if raft.get("why"):
            rows.append(("why", raft["why"]))
    tasks = s.get("tasks")
    if tasks:
        rows.append(("tasks", "  ".join(f"{k} {tasks.get(k, 0)}" for k in ("queued", "running", "done", "failed", "pending"))
                     + f"  (slots {tasks.get('slots')}; kinds {', '.join(tasks.get('kinds') or [])})"))
    drops = s.get("drops") or {}
    if drops:
        rows.append(("dropped", "  ".join(f"{k} {v}" for k, v in sorted(drops.items()))))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def format_peers(peers: list[dict]) -> str:
    rows = []
    for p in peers:
        load = p.get("load") or {}
        rows.append([
            p["id"], f"{p['address']}:{p['port']}", p["state"], str(p["incarnation"] & 0xFFFFFFFF) + f"/{p['incarnation'] >> 32}",
            _num(load.get("cpu")), _num(load.get("mem")), _num(p.get("rtt_ms"), "{:.2f}"), _num(p.get("last_seen_s")),
            ",".join(p.get("capabilities") or []),
        ])
    headers = ["ID", "ADDRESS", "STATE", "INC/BOOT", "CPU%", "MEM%", "RTT ms", "SEEN s ago", "CAPABILITIES"]
    return format_table(headers, rows) if rows else "no peers known yet"
