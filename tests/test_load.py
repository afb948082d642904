"""LoadSampler: smoothing, Pi firmware files, and never raising on a degraded host."""

from __future__ import annotations

from types import SimpleNamespace

import psutil
import pytest

from agent.io import load
from agent.io.load import Load, LoadSampler, changed_enough, process_stats, throttle_flags


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
