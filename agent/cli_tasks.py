"""The task commands of `meshagent`: submit, tasks, task, cancel.

Each sends requests to an agent's POST /api (see agent.api) the way the
consensus commands do (`agent.cli_consensus.call`: sealed with the fleet key
when one is available; submit and cancel need it). Exit codes: 0 done, 1
failure (and a task that ended failed or cancelled, or is still unfinished
when `submit --wait` gives up), 2 bad input (an unknown kind, a malformed
--arg, arguments over the size limit), 3 refused by the mesh (no member can
run it, a cancel of a finished task), 4 no such task; the reason is one line
on stderr.

`submit --timeout` is the task's run timeout (whole seconds), so for this
command the wait for the agent's answer is `--agent-timeout`.
"""

from __future__ import annotations

import json
import time

from agent.cli_consensus import CallFailed, _jsonable, call
from agent.core.taskspec import MAX_STDERR, MAX_STDOUT, STATES, STRATEGIES, TERMINAL, SpecError, TaskSpec, check_spec, parse_arg_value

EXIT_BAD_INPUT = 2
POLL_FIRST_S, POLL_MAX_S = 0.1, 1.0  #: `submit --wait` polls task.get with this backoff


# ------------------------------------------------------------------ submit


def task_args(pairs: list[str] | None) -> dict:
    """`--arg KEY=VALUE` flags as the task's argument map (values: integer, true/false, else text)."""
    out: dict[str, object] = {}
    for pair in pairs or ():
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise CallFailed(f"--arg {pair!r}: expected KEY=VALUE (e.g. --arg seconds=5)", EXIT_BAD_INPUT)
        if key in out:
            raise CallFailed(f"--arg {key}: given twice", EXIT_BAD_INPUT)
        out[key] = parse_arg_value(value)
    return out


def submit_request(args) -> dict:
    """The task.submit request, checked here first so bad input fails before any network."""
    request = {
        "op": "task.submit", "kind": args.kind, "args": task_args(args.arg), "caps": args.cap or [],
        "strategy": args.strategy or "", "priority": args.priority, "timeout_s": args.task_timeout,
        "max_attempts": args.attempts, "key": args.key or "",
    }
    probe = TaskSpec("0" * 16, args.kind, request["args"], tuple(request["caps"]), args.priority, args.task_timeout,
                     args.attempts, request["key"], request["strategy"])
    try:
        check_spec(probe)
    except SpecError as e:
        raise CallFailed(f"bad task: {e}"[:300], EXIT_BAD_INPUT) from None
    return request


def cmd_submit(args) -> int:
    answer = call(args, submit_request(args))
    if not args.wait:
        print(json.dumps(answer, indent=2, sort_keys=True) if args.json else answer["id"])
        return 0
    return _wait(args, answer["id"])


def _wait(args, task_id: str) -> int:
    """Poll until the task is finished or --wait-timeout passes; exit 0 only for done."""
    deadline = time.monotonic() + args.wait_timeout
    delay = POLL_FIRST_S
    while True:
        task = _poll(args, task_id)
        if task is not None and task["state"] in TERMINAL:
            break
        left = deadline - time.monotonic()
        if left <= 0:
            if task is not None and args.json:
                print(json.dumps(_jsonable(task), indent=2, sort_keys=True))
            state = task["state"] if task is not None else "not visible"
            raise CallFailed(f"task {task_id} still {state} after {args.wait_timeout:g} s (see `meshagent task {task_id}`)")
        time.sleep(min(delay, left))
        delay = min(POLL_MAX_S, delay * 1.5)
    print(json.dumps(_jsonable(task), indent=2, sort_keys=True) if args.json else format_outcome(task))
    if task["state"] != "done":
        raise CallFailed(f"task {task_id} {task['state']}: {_why(task)}")
    return 0


def _poll(args, task_id: str) -> dict | None:
    """The task's record, or None while the mesh does not show it yet (just submitted)."""
    try:
        return call(args, {"op": "task.get", "id": task_id})["task"]
    except CallFailed as exc:
        if exc.exit_code == 4:
            return None
        raise


def _why(task: dict) -> str:
    r = task.get("result")
    if r is None:
        last = (task.get("history") or [{}])[-1]
        return last.get("detail") or last.get("event") or "no result"
    if r["outcome"] == "cancelled":
        return r["reason"] or "cancelled"
    why = f"{r['outcome']}, exit {r['exit_code']} on {r['node']}"
    return why + (f" ({r['reason']})" if r["reason"] and r["reason"] != f"exit {r['exit_code']}" else "")


def format_outcome(task: dict) -> str:
    """What `submit --wait` prints: one summary line, then the handler's output."""
    r = task.get("result")
    if r is None:
        return f"{task['id']}: {task['state']} (no result)"
    head = (f"{task['id']}: {task['state']} ({r['outcome']}, exit {r['exit_code']}) on {r['node']} "
            f"in {_duration(r['duration_ms'])}, attempt {r['attempt']}")
    return "\n".join([head, *_output_lines(r)])


def _output_lines(r: dict) -> list[str]:
    lines = []
    for name, limit, which in (("stdout", MAX_STDOUT, "first"), ("stderr", MAX_STDERR, "last")):
        total = r[f"{name}_bytes"]
        if not total:
            continue
        note = f" ({total} bytes in all, {which} {limit} kept)" if total > limit else ""
        lines += [f"-- {name}{note}", r[name].rstrip("\n")]
    return lines


def _duration(ms: int) -> str:
    return f"{ms} ms" if ms < 10_000 else f"{ms / 1000:.1f} s"


# ------------------------------------------------------------------ tasks, task, cancel


def cmd_tasks(args) -> int:
    request = {"op": "task.list", "state": args.state or "", "node": args.node or "", "limit": args.limit}
    answer = call(args, request)
    if args.json:
        print(json.dumps(_jsonable(answer), indent=2, sort_keys=True))
    else:
        print(format_tasks(answer["tasks"], answer.get("total", len(answer["tasks"]))))
    return 0


def format_tasks(rows: list[dict], total: int) -> str:
    from agent.tables import format_table

    if not rows:
        return "(no tasks)"
    table = format_table(
        ["ID", "KIND", "STATE", "NODE", "ATTEMPT", "SUBMITTED"],
        [[t["id"], t["kind"], t["state"], t["node"] or "-", str(t["attempt"]), _local(t["submitted_ms"])] for t in rows],
    )
    return table + (f"\n(showing {len(rows)} of {total}; --limit N shows more)" if total > len(rows) else "")


def cmd_task(args) -> int:
    task = call(args, {"op": "task.get", "id": args.id})["task"]
    print(json.dumps(_jsonable(task), indent=2, sort_keys=True) if args.json else format_task(task))
    return 0


def format_task(t: dict) -> str:
    """A task's record: its spec, history and result."""
    from agent.tables import format_table

    timeout = f"{t['timeout_s']} s" if t["timeout_s"] else "the handler's own"
    rows = [
        ("id", t["id"]), ("kind", t["kind"]), ("state", f"{t['state']} (attempt {t['attempt']} of {t['max_attempts']})"),
        ("node", t["node"] or "-"), ("args", json.dumps(_jsonable(t["args"]), sort_keys=True)),
        ("caps", ", ".join(t["caps"]) or "-"), ("strategy", t["strategy"]), ("priority", str(t["priority"])),
        ("timeout", timeout), ("key", t["key"]), ("origin", t["origin"]), ("submitted", _local(t["submitted_ms"])),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k.ljust(width)}  {v}" for k, v in rows]
    history = [[_local(e["at_ms"], clock=True), e["event"], e["node"], e["detail"]] for e in t["history"]]
    out += ["", format_table(["TIME", "EVENT", "NODE", "DETAIL"], history)]
    r = t.get("result")
    if r is None:
        out += ["", "result    (none yet)"]
    else:
        out += ["", f"result    {r['outcome']}, exit {r['exit_code']} on {r['node']}, attempt {r['attempt']}, {_duration(r['duration_ms'])}"]
        if r.get("reason"):
            out.append(f"reason    {r['reason']}")
        out += _output_lines(r)
    return "\n".join(out)


def cmd_cancel(args) -> int:
    answer = call(args, {"op": "task.cancel", "id": args.id})
    print(json.dumps(answer, indent=2, sort_keys=True) if args.json else f"cancelled {args.id}")
    return 0


def _local(ms: int, clock: bool = False) -> str:
    """Wall-clock ms as local time (a clock with milliseconds for history lines)."""
    if clock:
        return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


# -------------------------------------------------------------------- parser


def _whole_seconds(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def _submit_client_args(p) -> None:
    """The usual client flags, except that --timeout here is the task's timeout."""
    p.add_argument("--agent", metavar="HOST[:PORT]", help="the agent to ask (default 127.0.0.1:5683)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--agent-timeout", dest="timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for each answer of the agent (default 5)")
    p.add_argument("--fleet-key-file", metavar="FILE", help="the fleet key (submitting needs it)")
    p.add_argument("--mesh", default="default", metavar="NAME", help="the agent's mesh name, with --fleet-key-file")


def add_commands(sub, add_client_args) -> None:
    p = sub.add_parser("submit", help="run a task somewhere in the mesh; prints its id (--wait: its result)")
    _submit_client_args(p)
    p.add_argument("kind", help="the handler to run (built-in: echo, sleep, sysinfo; others from [handlers.NAME])")
    p.add_argument("--arg", action="append", metavar="KEY=VALUE", help="an argument (repeatable); VALUE: integer, true/false, else text")
    p.add_argument("--cap", action="append", metavar="CAP", help="a capability the node must offer: NAME, NAME=VALUE or NAME>=NUMBER (repeatable)")
    p.add_argument("--strategy", choices=STRATEGIES, help="how to place it (default: the agent's tasks.strategy)")
    p.add_argument("--priority", type=int, default=5, metavar="N", help="0 (lowest) to 9; default 5")
    p.add_argument("--timeout", dest="task_timeout", type=_whole_seconds, default=0, metavar="S",
                   help="kill a run after S seconds (default 0: the handler's own timeout)")
    p.add_argument("--attempts", type=int, default=3, metavar="N",
                   help="runs at most (1-10; default 3): a run that times out, errors or loses its node is retried; "
                        "a handler's non-zero exit is final")
    p.add_argument("--key", metavar="KEY", help="idempotency key: submitting the same key again names the same task")
    p.add_argument("--wait", action="store_true", help="wait for the result; exit 0 if done, 1 if failed, cancelled or still running")
    p.add_argument("--wait-timeout", type=float, default=60.0, metavar="S", help="with --wait: give up after S seconds (default 60)")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("tasks", help="list the tasks the mesh knows, newest first")
    add_client_args(p)
    p.add_argument("--node", metavar="ID", help="only tasks placed on this node")
    p.add_argument("--state", choices=STATES, help="only tasks in this state")
    p.add_argument("--limit", type=int, default=1000, metavar="N", help="show at most N (1-1000; default 1000)")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("task", help="one task's record: history and result")
    add_client_args(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("cancel", help="cancel a task (a running handler is killed)")
    add_client_args(p)
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)
