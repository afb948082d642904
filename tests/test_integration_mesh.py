"""Multi-host integration: real `meshagent run` processes, one per network namespace,
on a private bridged LAN (10.231.0.0/16, see tests/netns.py for the topology, how loss,
partitions and multicast are made, and the cleanup guarantees).

Needs root, iproute2 and, for the loss soak, tc netem or nftables; scenario 8 needs
libcoap's coap-client (Debian: libcoap3-bin). With CI set these preconditions FAIL the
tests; elsewhere they skip with the reason.

Timing budget (2 cores): about 1.5 minutes, plus the 20%-loss soak, which the product
requires of every run: its two minutes run in the background while the simulator tests
run (tests/loss_soak.py; MESHAGENT_SOAK_S shortens or lengthens it locally).
"""

from __future__ import annotations

import re
import time

import cbor2
import pytest

import netns
from netns import Lab, node_addr

pytestmark = pytest.mark.netns

DETECT_BOUND_S = 15.0  #: a SIGKILLed node is dead in every survivor's view within this
CONVERGE_BOUND_S = 20.0
HEAL_BOUND_S = 60.0


@pytest.fixture(scope="session", autouse=True)
def lab_environment():
    netns.require_lab(pytest)
    netns.install_sigterm_cleanup()
    yield
    netns.sweep()  # this run's leftovers only (the Lab context managers should have left none)


@pytest.fixture
def make_lab(tmp_path):
    """Factory: make_lab(n) -> an entered Lab whose logs live in tmp_path; always closed."""
    labs: list[Lab] = []

    def make(n: int) -> Lab:
        lab = Lab(n, workdir=tmp_path / f"lab{len(labs)}")
        labs.append(lab)
        return lab.__enter__()

    yield make
    for lab in labs:
        lab.close()


def start_all(lab: Lab, indices, **kw) -> float:
    """Start agents at indices; return the monotonic time the last one was started."""
    for i in indices:
        lab.start_agent(i, **kw)
    return time.monotonic()


def log_events(lab: Lab, pattern: str) -> list[tuple[int, str]]:
    """(node, line) for every log line of every agent process matching pattern."""
    rx = re.compile(pattern)
    out = []
    for p in lab.history:
        for line in p.log.read_text(errors="replace").splitlines():
            if rx.search(line):
                out.append((p.i, line))
    return out


# ------------------------------------------------------------------------------ 1, 2


def test_discovery_by_mdns_alone(make_lab, record_property):
    lab = make_lab(4)
    last = start_all(lab, range(4), mdns=True)  # no seeds at all
    took = lab.wait_converged(range(4), timeout=CONVERGE_BOUND_S)
    record_property("mdns_converge_s", round(time.monotonic() - last, 2))
    statuses = [lab.status(i) for i in range(4)]
    assert all(s is not None and s["mdns"] for s in statuses), statuses
    assert all(s["members"]["alive"] == 4 for s in statuses), [s["members"] for s in statuses]
    print(f"4 agents found each other by mDNS alone {took:.1f} s after the last start")


def test_join_by_seeds_alone(make_lab, record_property):
    lab = make_lab(5)
    last = start_all(lab, range(5), seeds=[0], mdns=False)
    lab.wait_converged(range(5), timeout=CONVERGE_BOUND_S)
    took = time.monotonic() - last
    record_property("seed_converge_s", round(took, 2))
    print(f"5 agents joined through one seed in {took:.1f} s after the last start")
    # the real CLI, run on another host of the LAN, agrees
    peers = lab.cli(4, "peers", target=2)
    assert sorted(p["id"] for p in peers if p["state"] == "alive") == ["n0", "n1", "n3", "n4"], peers
    status = lab.cli(3, "status", target=0)
    assert status["node_id"] == "n0" and status["members"]["alive"] == 5 and status["mdns"] is False, status


# ------------------------------------------------------------------------------ 3, 4


def watch_transition(lab: Lab, observers, subject: int, want: str, timeout: float, forbidden: set[str]):
    """Poll every observer until each sees `subject` in state `want`; return {observer: seconds}.
    Fails at once if an observer shows a state in `forbidden`."""
    sid = f"n{subject}"
    seen: dict[int, float] = {}
    start = time.monotonic()

    def pred():
        lab.check_running(observers)
        views = lab.states(lab.views(observers, timeout=1.0))
        t = time.monotonic() - start
        for i in observers:
            state = (views[i] or {}).get(sid)
            assert state not in forbidden, f"node {i} shows {sid} as {state!r} after {t:.1f} s\n{lab.diagnose()}"
            if state == want and i not in seen:
                seen[i] = round(t, 2)
        return len(seen) == len(observers), {"first_seen_s": dict(seen), "views": views}

    lab.wait_until(pred, timeout, interval=0.2, what=f"every survivor to see {sid} {want}")
    return seen


def test_sigkill_is_detected_and_the_node_rejoins_with_a_higher_incarnation(make_lab, record_property):
    lab = make_lab(5)
    start_all(lab, range(5), seeds=[0])
    lab.wait_converged(range(5), timeout=CONVERGE_BOUND_S)
    before = {i: lab.views([i])[i]["n2"]["incarnation"] for i in (0, 1, 3, 4)}

    lab.kill(2)
    survivors = [0, 1, 3, 4]
    seen = watch_transition(lab, survivors, 2, "dead", DETECT_BOUND_S, forbidden={"left"})
    record_property("crash_detect_s", seen)
    print(f"SIGKILL detected by every survivor: {seen} (bound {DETECT_BOUND_S} s)")

    lab.start_agent(2, seeds=[0])  # same node id, same data dir: a reboot
    lab.wait_converged(range(5), timeout=CONVERGE_BOUND_S)
    views = lab.views(survivors)
    after = {i: views[i]["n2"]["incarnation"] for i in survivors}
    assert all(after[i] > before[i] for i in survivors), (before, after)
    print(f"restarted n2 rejoined alive; incarnation {before[0]} -> {after[0]}")


def test_sigterm_is_a_graceful_leave_not_a_death(make_lab):
    lab = make_lab(4)
    start_all(lab, range(4), seeds=[0])
    lab.wait_converged(range(4), timeout=CONVERGE_BOUND_S)
    assert lab.term(3) == 0, lab.procs[3].tail()
    watch_transition(lab, [0, 1, 2], 3, "left", 10, forbidden={"dead"})
    # and it stays `left` (never turns `dead`) for a while
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        views = lab.states(lab.views([0, 1, 2], timeout=1.0))
        assert all(v is not None and v.get("n3") == "left" for v in views.values()), views
        time.sleep(0.5)
    assert "leaving the mesh" in lab.procs[3].log.read_text()


# ------------------------------------------------------------------------------ 5


def test_twenty_percent_loss_on_every_link_gives_no_false_death(loss_soak, record_property):
    """Every agent's egress drops 20% of datagrams (see netns.py: one lossy hop per
    datagram, independently per direction) for SOAK_S seconds. No agent may ever
    report another as dead; suspicions are allowed and counted. The soak runs in
    the background while other tests run (tests/loss_soak.py, conftest.py)."""
    summary = loss_soak.verdict()
    record_property("loss_soak", summary)
    print(f"20% loss soak: {summary}")
    lab = loss_soak.lab
    assert not loss_soak.dead_seen and not summary["deaths_in_logs"], (
        f"false deaths under 20% loss: polls {loss_soak.dead_seen[:20]}, logs {log_events(lab, r'-> (dead|left)')[:20]}\n{lab.diagnose()}")
    assert loss_soak.answered >= loss_soak.polls * 0.5, f"too few status reads answered ({summary['polls_answered']}): is the API reachable?"
    lab.wait_converged(range(loss_soak.lab.n), timeout=CONVERGE_BOUND_S)


# ------------------------------------------------------------------------------ 6


def test_partition_and_heal(make_lab, record_property):
    lab = make_lab(5)
    start_all(lab, range(5), seeds=[0])
    lab.wait_converged(range(5), timeout=CONVERGE_BOUND_S)
    left, right = [0, 1], [2, 3, 4]
    lab.partition([left, right])
    t0 = time.monotonic()

    def both_sides(state):
        a, b = lab.all_see(left, right, state), lab.all_see(right, left, state)

        def pred():
            (da, va), (db, vb) = a(), b()
            return da and db, {**va, **vb}
        return pred

    lab.wait_until(both_sides(lambda s: s is not None and s != "alive"), 20, 0.5, what="each side to stop seeing the other alive")
    t_not_alive = time.monotonic() - t0
    lab.wait_until(both_sides("dead"), 45, 0.5, what="each side to mark the other dead")
    t_dead = time.monotonic() - t0
    # inside each side everyone stays alive
    lab.wait_until(lab.all_see(left, left, "alive"), 5, what="the left side to stay whole")
    lab.wait_until(lab.all_see(right, right, "alive"), 5, what="the right side to stay whole")

    lab.heal()
    t1 = time.monotonic()
    lab.wait_converged(range(5), timeout=HEAL_BOUND_S, interval=0.5)
    t_heal = time.monotonic() - t1
    record_property("partition", {"not_alive_s": round(t_not_alive, 1), "dead_s": round(t_dead, 1), "heal_s": round(t_heal, 1)})
    print(f"partition: other side not alive after {t_not_alive:.1f} s, dead after {t_dead:.1f} s; "
          f"healed to all-alive {t_heal:.1f} s after the links came back")


# ------------------------------------------------------------------------------ 7


def test_other_mesh_wrong_key_and_insecure_nodes_stay_out(make_lab):
    lab = make_lab(6)
    members, outsiders = [0, 1, 2], [3, 4, 5]
    start_all(lab, members, seeds=[0], mdns=True)
    lab.wait_converged(members, timeout=CONVERGE_BOUND_S)
    other_key = lab.make_key("other.key")
    lab.start_agent(3, seeds=[0, 1], mdns=True, mesh="othermesh")  # right key, other mesh
    lab.start_agent(4, seeds=[0, 1], mdns=True, key=other_key)  # same mesh name, other key
    lab.start_agent(5, seeds=[0, 1], mdns=True, key=None)  # same mesh name, --insecure
    outsider_ids = {"n3", "n4", "n5"}
    member_ids = {"n0", "n1", "n2"}

    def drops_counted():
        lab.check_running()
        views = lab.views(range(6), timeout=1.0)
        for i in members:
            assert views[i] is None or not (set(views[i]) & outsider_ids), f"an outsider got into node {i}'s view: {views[i]}"
        for i in outsiders:
            assert views[i] is None or not (set(views[i]) & member_ids), f"outsider {i} got members into its view: {views[i]}"
        drops = {}
        for i in members:
            s = lab.status(i, timeout=1.0) or {}
            for reason, count in s.get("drops", {}).items():
                drops[reason] = drops.get(reason, 0) + count
        key_drops = drops.get("unknown_key", 0) + drops.get("auth_failed", 0)
        done = drops.get("wrong_mesh", 0) > 0 and key_drops > 0 and drops.get("insecure_mismatch", 0) > 0
        return done, {"members' drops": drops, "views": lab.states(views)}

    _, state = lab.wait_until(drops_counted, 20, 1.0, what="members to count wrong_mesh, unknown_key/auth_failed and insecure_mismatch drops")
    # keep watching a while: nobody gets in later either (mDNS re-announcements, join retries)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        drops_counted()
        time.sleep(1)
    assert all(lab.status(i)["insecure"] is False for i in members)
    assert lab.status(5)["insecure"] is True
    counted = state["members' drops"]
    print(f"outsiders kept out; members' drop counters: {counted}")


# ------------------------------------------------------------------------------ 8


def test_libcoap_client_reads_status_and_discovery(make_lab):
    netns.require_lab(pytest, need_coap_client=True)
    client = netns.coap_client_binary()
    lab = make_lab(2)
    start_all(lab, range(2), seeds=[0])
    lab.wait_converged(range(2), timeout=CONVERGE_BOUND_S)
    raw = lab.workdir / "status.cbor"
    res = lab.run_in(1, client, "-m", "get", "-B", "10", "-o", str(raw), f"coap://{node_addr(0)}/status")
    assert res.returncode == 0, res.stderr
    status = cbor2.loads(raw.read_bytes())
    assert status["node_id"] == "n0" and status["mesh"] == "lab" and status["members"]["alive"] == 2, status

    raw = lab.workdir / "peers.cbor"
    res = lab.run_in(1, client, "-m", "get", "-B", "10", "-o", str(raw), f"coap://{node_addr(0)}/peers")
    assert res.returncode == 0, res.stderr
    assert [p["id"] for p in cbor2.loads(raw.read_bytes())] == ["n1"]

    res = lab.run_in(1, client, "-m", "get", "-B", "10", f"coap://{node_addr(0)}/.well-known/core")
    assert res.returncode == 0, res.stderr
    links = {}
    for link in res.stdout.strip().split(","):
        target, *attrs = link.split(";")
        links[target.strip()] = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') if "=" in a else True for a in attrs}
    for path in ("</status>", "</peers>"):
        assert path in links, res.stdout
        assert links[path].get("ct") == "60" and links[path].get("rt"), (path, links[path])
