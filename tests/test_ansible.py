"""The Ansible role and playbooks (ansible/, issue 5 §2): ansible-lint's production profile,
a syntax check, check mode, and a real run of site.yml with a local connection into throwaway
roots, whose installed agents the test then starts (with a third voter) and watches join one
mesh; the health gates of rolling-upgrade.yml (`--tags health`) then pass against them, batch
by batch, and the restart handler's first step moves Raft leadership off a leader.

Service tasks are skipped by meshagent_manage_service=false: PID 1 here is not systemd.
The real run copies the fleet key as root (owner root, 0600): it needs root, and with CI set
it FAILS rather than skips without it. Agents bind 127.0.0.81-83, UDP ports 56181-56183.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent
MESH = "anstest"
NODES = {"node81": ("127.0.0.81", 56181), "node82": ("127.0.0.82", 56182)}


def _unusable(problem: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"cannot run in CI: {problem}", pytrace=False)
    pytest.skip(f"{problem} (set CI=true to make this a failure)")


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        _unusable(f"{name} is not installed beside {sys.executable} (pip install '.[test]')")
    return str(path)


def _env(tmp: Path) -> dict[str, str]:
    """Ansible's own scratch files go under tmp; no colour, the venv's tools first on PATH."""
    return dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                ANSIBLE_LOCAL_TEMP=str(tmp / "ansible-tmp"), ANSIBLE_REMOTE_TEMP=str(tmp / "ansible-tmp"),
                ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PY_COLORS="0", PYTHONUNBUFFERED="1")


def _run(argv: list[str], tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ANSIBLE, env=_env(tmp), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _playbook(playbook: str, inventory: Path, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    return _run([_tool("ansible-playbook"), "-i", str(inventory), playbook, *extra], tmp)


def _recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP lines as {host: {"ok": n, "changed": n, ...}}."""
    recap = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", output, re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    return recap


def _host(tmp: Path, name: str, **overrides) -> dict:
    """Inventory vars of one local host installing into tmp/root-NAME."""
    address, port = NODES[name]
    peer = next(f"{a}:{p}" for n, (a, p) in NODES.items() if n != name)
    return {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "meshagent_root": str(tmp / f"root-{name}"),
        "meshagent_manage_service": False,
        "meshagent_install_os_packages": False,
        "meshagent_fleet_key_src": str(tmp / "fleet.key"),
        "meshagent_wheel_build_dir": str(tmp / "wheels"),
        "meshagent_mesh": MESH,
        "meshagent_node_id": name,
        "meshagent_bind": address,
        "meshagent_port": port,
        "meshagent_seeds": [peer],
        "meshagent_mdns": False,
        "meshagent_capabilities": ["lab"],
        # Several agents on one host: count only our own CPU; vote in a first voter at once.
        "meshagent_config_extra": {"load": {"cpu_scope": "tree"}, "consensus": {"stabilization_ms": 500}},
        "meshagent_health_retries": 20,
        "meshagent_health_delay": 1,
        **overrides,
    }


def _inventory(path: Path, hosts: dict[str, dict]) -> Path:
    path.write_text(json.dumps({"meshagent": {"hosts": hosts}}, indent=1))  # JSON is YAML
    return path


def _keygen(tmp: Path) -> Path:
    key = tmp / "fleet.key"
    subprocess.run([sys.executable, "-m", "agent", "keygen", "--out", str(key)], check=True,
                   capture_output=True, timeout=30)
    return key


class Fleet:
    """Two hosts installed by a real run of site.yml."""

    def __init__(self, tmp: Path, result: subprocess.CompletedProcess):
        self.tmp, self.result = tmp, result
        self.wheel = next((tmp / "wheels").glob("meshagent-*.whl"))

    def root(self, name: str) -> Path:
        return self.tmp / f"root-{name}"

    def cli(self, name: str) -> Path:
        return self.root(name) / "opt/meshagent/venv/bin/meshagent"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Fleet:
    if os.geteuid() != 0:
        _unusable("the real run installs the fleet key as root: run as root")
    tmp = tmp_path_factory.mktemp("ansible")
    _keygen(tmp)
    inventory = _inventory(tmp / "inventory.yml", {name: _host(tmp, name) for name in NODES})
    result = _playbook("site.yml", inventory, tmp)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    return Fleet(tmp, result)


# --------------------------------------------------------------------------- static checks


def test_ansible_lint_production_profile_passes(tmp_path):
    res = _run([_tool("ansible-lint"), "--offline", "--profile", "production", "--nocolor", "."], tmp_path)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "Profile 'production' was required, and it passed" in res.stdout + res.stderr


def test_both_playbooks_pass_the_syntax_check(tmp_path):
    res = _run([_tool("ansible-playbook"), "-i", "inventory/example.yml", "--syntax-check",
                "site.yml", "rolling-upgrade.yml"], tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "playbook: site.yml" in res.stdout and "playbook: rolling-upgrade.yml" in res.stdout


def test_example_inventory_has_one_group_per_board_profile(tmp_path):
    res = _run([_tool("ansible-inventory"), "-i", "inventory/example.yml", "--list"], tmp_path)
    assert res.returncode == 0, res.stderr
    inventory = json.loads(res.stdout)
    boards = sorted(p.stem for p in (REPO / "boards").glob("*.toml"))
    groups = inventory["meshagent"]["children"]
    assert sorted(groups) == sorted(b.replace("-", "_") for b in boards)
    for group in groups:
        for host in inventory[group]["hosts"]:
            assert inventory["_meta"]["hostvars"][host]["meshagent_board"] == group.replace("_", "-"), host


# --------------------------------------------------------------------------- check mode


def test_check_mode_changes_nothing_installed_shows_a_fresh_root_and_hides_the_key(fleet, tmp_path):
    """One check-mode run over two hosts: the installed node81 (idempotence: nothing to change)
    and a fresh root (every change shown as a diff, nothing written)."""
    hosts = {
        "node81": _host(fleet.tmp, "node81", meshagent_wheel=str(fleet.wheel)),
        "fresh": _host(fleet.tmp, "node81", meshagent_wheel=str(fleet.wheel), meshagent_root=str(tmp_path / "fresh")),
    }
    res = _playbook("site.yml", _inventory(tmp_path / "inventory.yml", hosts), tmp_path, "--check", "--diff")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    recap = _recap(res.stdout)
    assert recap["node81"]["changed"] == 0, res.stdout[-6000:]
    assert recap["fresh"]["changed"] > 0
    assert f'+mesh = "{MESH}"' in res.stdout  # the rendered agent.toml, as a diff
    assert not (tmp_path / "fresh").exists()
    secret = (fleet.tmp / "fleet.key").read_text().strip()
    assert secret and secret not in res.stdout + res.stderr


def test_check_mode_refuses_a_bad_inventory_value_before_touching_anything(tmp_path):
    _keygen(tmp_path)
    host = _host(tmp_path, "node81", meshagent_mesh="Green House")
    res = _playbook("site.yml", _inventory(tmp_path / "inventory.yml", {"node81": host}), tmp_path, "--check")
    assert res.returncode != 0
    assert "meshagent_mesh 1-32 of a-z 0-9 -" in res.stdout and "mesh=Green House" in res.stdout
    assert "Build the agent wheel from the repository" not in res.stdout


# --------------------------------------------------------------------------- a real run


def test_real_run_installs_the_layout_the_unit_expects(fleet):
    root = fleet.root("node81")
    key = root / "etc/meshagent/fleet.key"
    st = key.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert key.read_bytes() == (fleet.tmp / "fleet.key").read_bytes()
    assert (root / "etc/systemd/system/meshagent.service").read_bytes() == (REPO / "systemd/meshagent.service").read_bytes()
    config = (root / "etc/meshagent/agent.toml").read_text()
    assert config.startswith("#\n# Ansible managed")
    assert f'mesh = "{MESH}"' in config and 'seeds = ["127.0.0.82:56182"]' in config
    assert fleet.cli("node81").exists() and (root / "opt/meshagent/README.md").exists()
    assert fleet.result.stdout.count("Build the agent wheel from the repository") == 1
    assert (fleet.tmp / "fleet.key").read_text().strip() not in fleet.result.stdout


def _start(fleet: Fleet, name: str) -> subprocess.Popen:
    """The agent the role installed into NAME's root, with the config it rendered."""
    config = fleet.root(name) / "etc/meshagent/agent.toml"
    return _spawn(fleet, name, [str(fleet.cli(name)), "run", "--config", str(config)])


def _start_third(fleet: Fleet) -> subprocess.Popen:
    """A third voter outside the inventory (the test venv's agent), so leadership can move."""
    (fleet.tmp / "node83.toml").write_text(
        f'[node]\nid = "node83"\nmesh = "{MESH}"\nbind = "127.0.0.83"\nport = 56183\n'
        f'data_dir = "{fleet.tmp / "node83"}"\nfleet_key_file = "{fleet.tmp / "fleet.key"}"\n'
        '[discovery]\nseeds = ["127.0.0.81:56181"]\nmdns = false\n'
        '[consensus]\nstabilization_ms = 500\n[load]\ncpu_scope = "tree"\n')
    return _spawn(fleet, "node83", [sys.executable, "-m", "agent", "run", "--config", str(fleet.tmp / "node83.toml")])


def _spawn(fleet: Fleet, name: str, argv: list[str]) -> subprocess.Popen:
    with open(fleet.tmp / f"{name}.log", "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO)


def _ask(fleet: Fleet, address: str, *command: str) -> dict | None:
    """`meshagent COMMAND --json` against an agent (the installed CLI); None if it fails."""
    res = subprocess.run([str(fleet.cli("node81")), *command, "--json", "--agent", address,
                          "--fleet-key-file", str(fleet.tmp / "fleet.key"), "--mesh", MESH, "--timeout", "2"],
                         capture_output=True, text=True, timeout=30)
    return json.loads(res.stdout) if res.returncode == 0 else None


def _wait(what: str, check, procs: list[subprocess.Popen], fleet: Fleet, seconds: float = 30):
    """Poll check() every 0.5 s until it returns something true; bounded by `seconds`."""
    deadline, last = time.monotonic() + seconds, None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        if any(p.poll() is not None for p in procs):
            logs = {n: (fleet.tmp / f"{n}.log").read_text()[-2000:] for n in ("node81", "node82", "node83")}
            pytest.fail(f"an agent exited while waiting for {what}: {logs}")
        time.sleep(0.5)
    pytest.fail(f"not within {seconds:g} s: {what} (last: {last})")


ADDRESSES = {name: f"{a}:{p}" for name, (a, p) in NODES.items()} | {"node83": "127.0.0.83:56183"}


@pytest.fixture(scope="module")
def mesh(fleet):
    """The two installed agents and a third voter, running until the module ends."""
    procs = []
    try:
        procs = [_start(fleet, name) for name in NODES] + [_start_third(fleet)]

        def all_alive():
            seen = {n: _ask(fleet, a, "status") for n, a in ADDRESSES.items()}
            return seen if all(s and s["members"]["alive"] == 3 for s in seen.values()) else None

        seen = _wait("three agents alive in each other's view", all_alive, procs, fleet)
        yield fleet, procs, seen
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)


def test_installed_agents_join_one_mesh(mesh):
    fleet, _, seen = mesh
    assert {n: s["node_id"] for n, s in seen.items()} == {n: n for n in ADDRESSES}
    assert {n: s["members"]["alive"] for n, s in seen.items()} == {n: 3 for n in ADDRESSES}
    assert seen["node81"]["capabilities"] == ["lab"] and seen["node81"]["mesh"] == MESH


def test_rolling_upgrade_health_gates_pass_batch_by_batch(mesh):
    """--tags health runs only the gates: the node's own view, then another node's view of it
    (delegate_to) and a known Raft leader, once per batch (serial 1, then 25%)."""
    fleet, _, _ = mesh
    res = _playbook("rolling-upgrade.yml", fleet.tmp / "inventory.yml", fleet.tmp, "--tags", "health",
                    "-e", "meshagent_health_gate=true")
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
    assert {h: c["changed"] for h, c in _recap(res.stdout).items()} == {"node81": 0, "node82": 0}
    for task in ("Wait until the agent sees the fleet alive", "Wait until another node sees this one alive",
                 "Wait until consensus is healthy"):
        assert res.stdout.count(f"TASK [meshagent : {task}") == 2, task  # once per batch
    assert "ok: [node81 -> node82]" in res.stdout and "ok: [node82 -> node81]" in res.stdout


def test_a_leader_hands_leadership_to_another_voter_before_its_restart(mesh):
    """The handler's first step (tasks/handoff.yml), run for real on node81 once it leads."""
    fleet, procs, _ = mesh
    def three_voters():
        answer = _ask(fleet, ADDRESSES["node81"], "leader")
        return answer and len(answer["voters"]) == 3 and answer["leader"]

    _wait("three voters and a leader", three_voters, procs, fleet)
    subprocess.run([str(fleet.cli("node81")), "leader", "transfer", "node81", "--agent", ADDRESSES["node81"],
                    "--fleet-key-file", str(fleet.tmp / "fleet.key"), "--mesh", MESH], capture_output=True, timeout=30)
    _wait("node81 leading", lambda: (_ask(fleet, ADDRESSES["node81"], "leader") or {}).get("leader") == "node81",
          procs, fleet)

    play = fleet.tmp / "handoff.yml"
    play.write_text(json.dumps([{"name": "Hand leadership on", "hosts": "node81", "gather_facts": False, "tasks": [
        {"name": "Run the handoff", "ansible.builtin.include_role": {"name": "meshagent", "tasks_from": "handoff"}}]}]))
    res = _playbook(str(play), fleet.tmp / "inventory.yml", fleet.tmp)
    assert res.returncode == 0, res.stdout[-8000:] + res.stderr[-2000:]
    assert "TASK [meshagent : Start the leadership transfer]" in res.stdout
    after = _ask(fleet, ADDRESSES["node81"], "leader")
    assert after and after["leader"] in ("node82", "node83"), after
