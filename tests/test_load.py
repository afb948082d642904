"""LoadSampler: smoothing, Pi firmware files, and never raising on a degraded host."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import psutil
import pytest

from agent.io import load
from agent.io.load import Load, LoadSampler, TreeCpu, changed_enough, process_stats, throttle_flags


@pytest.fixture
def pi_files(tmp_path):
    thermal, throttled = tmp_path / "temp", tmp_path / "get_throttled"
    thermal.write_text("48312\n")
    throttled.write_text("50005\n")
    return thermal, throttled


@pytest.fixture
def fake_psutil(mocker):
    cpu = mocker.patch.object(load.psutil, "cpu_percent", return_value=0.0)
    mocker.patch.object(load.psutil, "virtual_memory", return_value=SimpleNamespace(percent=42.5))
    mocker.patch.object(load.os, "getloadavg", return_value=(0.75, 0.5, 0.25))
    mocker.patch.object(load.psutil, "sensors_temperatures", return_value={})
    return cpu


def test_cpu_is_ewma_and_never_blocks(fake_psutil, pi_files):
    sampler = LoadSampler(0.25, *pi_files)
    fake_psutil.side_effect = [80.0, 0.0, 40.0]
    cpus = [sampler.sample().cpu for _ in range(3)]
    assert cpus == pytest.approx([80.0, 60.0, 55.0])  # first sample seeds, then 0.25 new + 0.75 old
    assert all(call.args == (None,) for call in fake_psutil.call_args_list)


def test_sample_reads_pi_files(fake_psutil, pi_files):
    got = LoadSampler(0.3, *pi_files).sample()
    assert got == Load(cpu=0.0, mem=42.5, load1=0.75, temp_c=pytest.approx(48.312), throttled=0x50005)
    assert got.as_dict() == {"cpu": 0.0, "mem": 42.5, "load1": 0.75, "temp_c": got.temp_c, "throttled": 0x50005}


def test_throttle_flags_decode():
    assert throttle_flags(0x50005) == [
        "under-voltage", "throttled", "under-voltage-occurred", "throttled-occurred"
    ]
    assert throttle_flags(0xF000F) == list(load.THROTTLE_BITS.values())
    assert throttle_flags(0) == [] and throttle_flags(None) == []


def test_missing_files_give_none(fake_psutil, tmp_path):
    got = LoadSampler(0.3, tmp_path / "nope", tmp_path / "nope2").sample()
    assert got.temp_c is None and got.throttled is None


@pytest.mark.parametrize("thermal, throttled", [("hot", "0xZZ"), ("", ""), ("999999", "\xff")])
def test_garbage_files_give_none(fake_psutil, tmp_path, thermal, throttled):
    (tmp_path / "t").write_text(thermal)
    (tmp_path / "g").write_text(throttled)
    got = LoadSampler(0.3, tmp_path / "t", tmp_path / "g").sample()
    assert got.temp_c is None and got.throttled is None


def test_psutil_sensors_are_the_fallback(fake_psutil, tmp_path, mocker):
    reading = SimpleNamespace
    mocker.patch.object(load.psutil, "sensors_temperatures", return_value={
        "nvme": [reading(current=38.0)],
        "coretemp": [reading(current=0.0), reading(current=61.0)],
    })
    assert LoadSampler(0.3, tmp_path / "x", tmp_path / "y").sample().temp_c == 61.0


def test_psutil_failure_keeps_last_value(fake_psutil, pi_files, mocker):
    sampler = LoadSampler(0.5, *pi_files)
    fake_psutil.return_value = 30.0
    first = sampler.sample()
    fake_psutil.side_effect = PermissionError("/proc/stat hidden")
    mocker.patch.object(load.psutil, "virtual_memory", side_effect=psutil.AccessDenied())
    mocker.patch.object(load.os, "getloadavg", side_effect=OSError("no loadavg"))
    second = sampler.sample()
    assert (second.cpu, second.mem, second.load1) == (first.cpu, first.mem, first.load1)


def test_psutil_failure_from_the_start_gives_none(mocker, tmp_path):
    mocker.patch.object(load.psutil, "cpu_percent", side_effect=OSError)
    mocker.patch.object(load.psutil, "virtual_memory", side_effect=OSError)
    mocker.patch.object(load.os, "getloadavg", side_effect=OSError)
    mocker.patch.object(load.psutil, "sensors_temperatures", side_effect=OSError)
    got = LoadSampler(0.3, tmp_path / "x", tmp_path / "y").sample()
    assert got == Load(None, None, None, None, None)


def test_changed_enough():
    base = Load(cpu=50.0, mem=50.0, load1=1.0, temp_c=None, throttled=None)
    assert not changed_enough(base, Load(54.9, 45.1, 9.0, 80.0, 1), 5.0)
    assert changed_enough(base, Load(55.1, 50.0, 1.0, None, None), 5.0)
    assert changed_enough(base, Load(50.0, 44.0, 1.0, None, None), 5.0)
    assert changed_enough(base, Load(None, 50.0, 1.0, None, None), 5.0)


def test_smoothing_must_be_a_weight():
    with pytest.raises(ValueError):
        LoadSampler(0.0)


def test_real_host_values_are_plausible():
    sampler = LoadSampler()
    sum(range(200_000))  # some CPU time between the baseline and the sample
    got = sampler.sample()
    assert 0.0 <= got.cpu <= 100.0
    assert 0.0 < got.mem <= 100.0
    assert got.load1 >= 0.0
    assert got.temp_c is None or -40.0 <= got.temp_c <= 150.0
    stats = process_stats()
    assert stats["rss_bytes"] > 1_000_000
    assert 0.0 <= stats["cpu_percent"] <= 100.0 * psutil.cpu_count()


# ------------------------------------------------------------------ cpu_scope "tree"


class FakeProc:
    """A process whose CPU seconds the test sets; identity stands for (pid, start time)."""

    def __init__(self, seconds=0.0, children=()):
        self.seconds, self.kids, self.gone = seconds, list(children), False

    def cpu_times(self):
        if self.gone:
            raise psutil.NoSuchProcess(1)
        return SimpleNamespace(user=self.seconds * 0.75, system=self.seconds * 0.25)

    def children(self, recursive):
        assert recursive
        return list(self.kids)


def test_tree_cpu_counts_each_process_from_its_first_sighting(mocker):
    root, clock = FakeProc(10.0), iter([0.0, 1.0, 2.0, 3.0, 4.0]).__next__
    mocker.patch.object(load.psutil, "Process", return_value=root)
    tree = TreeCpu(1234, clock)
    assert tree.percent() is None  # the baseline
    child = FakeProc(50.0)  # time spent before we saw it is not ours to count
    root.kids, root.seconds = [child], 10.25
    assert tree.percent() == pytest.approx(25.0)
    child.seconds += 0.5
    assert tree.percent() == pytest.approx(50.0)
    child.gone = True  # exits between the listing and the read: dropped
    newcomer = FakeProc(7.0)
    root.kids = [child, newcomer]
    root.seconds += 0.1
    assert tree.percent() == pytest.approx(10.0)
    newcomer.seconds += 0.9
    root.kids = [newcomer, FakeProc(3.0), FakeProc(4.0)]
    root.seconds += 0.9  # 1.8 s of CPU in 1 s: more than one core, clamped
    assert tree.percent() == 100.0


def test_tree_scope_keeps_the_last_value_when_psutil_fails(mocker, tmp_path):
    root = FakeProc(1.0)
    mocker.patch.object(load.psutil, "Process", return_value=root)
    mocker.patch.object(load.psutil, "virtual_memory", return_value=SimpleNamespace(percent=10.0))
    sampler = LoadSampler(1.0, tmp_path / "x", tmp_path / "y", cpu_scope="tree")
    time.sleep(0.01)
    first = sampler.sample().cpu
    assert first is not None and 0.0 <= first <= 100.0
    root.gone = True
    assert sampler.sample().cpu == first


def test_cpu_scope_is_checked():
    with pytest.raises(ValueError, match="cpu_scope"):
        LoadSampler(cpu_scope="process")


BUSY = "import time\nend = time.monotonic() + 5\nwhile time.monotonic() < end: pass\n"


def test_tree_scope_sees_a_busy_child_process_and_nothing_outside_the_tree(tmp_path):
    sampler = LoadSampler(1.0, tmp_path / "x", tmp_path / "y", cpu_scope="tree")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    other_tree = TreeCpu(sleeper.pid)  # a sibling of the busy child: must not see it
    time.sleep(0.3)
    idle = sampler.sample().cpu
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        sampler.sample()  # first sighting of the child: its start-up is not counted
        other_tree.percent()
        time.sleep(0.6)
        busy = sampler.sample().cpu
        outside = other_tree.percent()
    finally:
        for proc in (child, sleeper):
            proc.kill()
            proc.wait()
    assert idle < 20.0
    assert busy > idle + 40.0 and busy <= 100.0
    assert outside < 20.0
