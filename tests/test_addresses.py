"""Choosing the address to advertise, and noticing when it changes."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from agent.io import addresses
from agent.io.addresses import AddressWatcher, default_route_interface, local_ipv4_addresses, pick_advertise

ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def route_file(tmp_path, *rows: str):
    path = tmp_path / "route"
    path.write_text(ROUTE_HEADER + "".join(row + "\n" for row in rows))
    return path


def default_row(iface: str, metric: int = 0, flags: str = "0003") -> str:
    return f"{iface}\t00000000\t0100A8C0\t{flags}\t0\t0\t{metric}\t00000000\t0\t0\t0"


def net_row(iface: str) -> str:
    return f"{iface}\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0"


def addr(ip: str, family=socket.AF_INET):
    return SimpleNamespace(family=family, address=ip)


@pytest.fixture
def ifaces(mocker):
    table = {
        "wlan0": [addr("192.168.1.20"), addr("fe80::1", socket.AF_INET6)],
        "lo": [addr("127.0.0.1")],
        "eth0": [addr("10.0.0.5")],
    }
    mocker.patch.object(addresses.psutil, "net_if_addrs", side_effect=lambda: table)
    return table


def test_local_addresses_sorted_by_interface_without_loopback(ifaces):
    assert local_ipv4_addresses() == ["10.0.0.5", "192.168.1.20"]
    assert local_ipv4_addresses(["wlan0"]) == ["192.168.1.20"]


def test_loopback_only_when_nothing_else(ifaces):
    assert local_ipv4_addresses(["lo"]) == ["127.0.0.1"]
    assert local_ipv4_addresses(["wlan1"]) == []


def test_interface_listing_failure_is_empty(mocker):
    mocker.patch.object(addresses.psutil, "net_if_addrs", side_effect=PermissionError("netlink denied"))
    assert local_ipv4_addresses() == []


def test_default_route_interface_lowest_metric(tmp_path):
    path = route_file(tmp_path, net_row("eth0"), default_row("eth0", 600), default_row("wlan0", 100),
                      default_row("usb0", 1, flags="0002"), "garbage line")
    assert default_route_interface(path) == "wlan0"
    assert default_route_interface(route_file(tmp_path, net_row("eth0"))) is None
    assert default_route_interface(tmp_path / "missing") is None


def test_pick_advertise_order(ifaces, tmp_path):
    route = route_file(tmp_path, default_row("wlan0"))
    assert pick_advertise("0.0.0.0", "203.0.113.9", None, route) == "203.0.113.9"
    assert pick_advertise("10.0.0.5", "", None, route) == "10.0.0.5"
    assert pick_advertise("0.0.0.0", "", None, route) == "192.168.1.20"  # default route wins over name order
    assert pick_advertise("::", "", None, route_file(tmp_path)) == "10.0.0.5"  # no default route: by name
    assert pick_advertise("0.0.0.0", "", ["eth0"], route) == "10.0.0.5"  # default iface not allowed
    assert pick_advertise("0.0.0.0", "", ["lo"], route) == "127.0.0.1"
    assert pick_advertise("", "", ["wlan9"], route) == "127.0.0.1"


def test_watcher_reports_changes_once(ifaces, tmp_path):
    route = route_file(tmp_path, default_row("wlan0"))
    watcher = AddressWatcher("0.0.0.0", "", None, route)
    assert watcher.current == "192.168.1.20"
    assert watcher.check() is None
    ifaces["wlan0"] = [addr("192.168.1.77")]  # Wi-Fi reconnect, new lease
    assert watcher.check() == "192.168.1.77"
    assert watcher.check() is None
    del ifaces["wlan0"]  # link gone: fall back to the next interface
    assert watcher.check() == "10.0.0.5"
    assert watcher.current == "10.0.0.5"


def test_real_host_gives_an_ipv4():
    chosen = pick_advertise("0.0.0.0", "", None)
    assert socket.inet_aton(chosen)
