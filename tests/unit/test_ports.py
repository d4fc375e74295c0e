"""`wrpo.data.serving.free_port`: the one allocator of listening ports for local servers and the test
harnesses (docs/cluster-harness.md, "Ports")."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from wrpo.data import serving
from wrpo.data.serving import free_port

RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral() -> tuple[int, int]:
    if not RANGE.exists():
        pytest.skip("no /proc/sys/net/ipv4/ip_local_port_range (not Linux)")
    low, high = map(int, RANGE.read_text().split())
    return low, high


def test_ports_are_outside_the_ephemeral_range_so_no_outgoing_connection_takes_one():
    low, high = _ephemeral()
    if serving._listening_range() is None:
        pytest.skip(f"the ephemeral range {low}-{high} leaves no room outside it")
    ports = [free_port() for _ in range(200)]
    inside = [p for p in ports if low <= p <= high]
    assert not inside, f"{len(inside)} of 200 ports in the ephemeral range {low}-{high}: {inside[:5]}"


def test_a_port_is_never_handed_out_twice_and_is_free_when_handed_out():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    with socket.socket() as s:  # free: a server can bind it
        s.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    monkeypatch.delenv("WRPO_PORT_RANGE", raising=False)  # the unconfigured path (scripts/test.sh sets a range)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        monkeypatch.setattr(serving, "_listening_range", lambda: (port, port + 1))
        assert all(free_port() != port for _ in range(3))


def test_processes_seeded_alike_draw_different_ports():
    """A run seeds Python's global generator; the draws must not follow it (two seeded pipelines side by side
    would otherwise try the same ports in the same order)."""
    code = "import random; random.seed(0); from wrpo.data.serving import free_port; print(free_port())"
    draws = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
             for _ in range(4)}
    assert len(draws) > 1


def test_a_configured_range_is_where_every_port_comes_from(monkeypatch):
    """$WRPO_PORT_RANGE: two processes side by side (scripts/test.sh's two test tiers) draw disjoint ports;
    a range too small for the draws is used up port by port and then named in the error."""
    with socket.socket() as held:  # a port in use inside the range is skipped
        busy = free_port()  # outside the ephemeral range: its neighbours are not some connection's
        held.bind(("127.0.0.1", busy))
        monkeypatch.setenv("WRPO_PORT_RANGE", f"{busy - 2}-{busy + 2}")
        monkeypatch.setattr(serving, "_HANDED_OUT", set())
        ports = [free_port() for _ in range(4)]
        assert sorted(ports) == [busy - 2, busy - 1, busy + 1, busy + 2]
        with pytest.raises(serving.WrpoError, match=f"WRPO_PORT_RANGE={busy - 2}-{busy + 2}: no free port"):
            free_port()


@pytest.mark.parametrize("text", ["20000", "20000-", "a-b", "30000-20000", "80-90", "60000-70000"])
def test_a_malformed_range_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("WRPO_PORT_RANGE", text)
    with pytest.raises(serving.WrpoError, match=r"WRPO_PORT_RANGE=.*expected LOW-HIGH"):
        free_port()
