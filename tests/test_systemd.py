"""The systemd side: the unit passes ``systemd-analyze verify`` (where systemd-analyze exists), and
``serve`` speaks sd_notify over a real AF_UNIX datagram socket given as ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from helpers import _RUNNING, BIN, ROOT, make_relay

UNITS = ROOT / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_service_unit_verifies(tmp_path):
    # verify checks that ExecStart's program exists; /usr/local/bin/bsm-relay is where an install
    # puts it, so verify a copy that points at this checkout's bsm-relay instead (nothing else changed).
    text = (UNITS / "bsm-relay.service").read_text()
    assert "ExecStart=/usr/local/bin/bsm-relay --config /etc/bsm-relay/relay.toml serve --workers 2" in text
    unit = tmp_path / "bsm-relay.service"
    unit.write_text(text.replace("/usr/local/bin/bsm-relay", str(BIN)))
    res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "bsm-relay.service" not in res.stderr, res.stderr   # no warning about our unit
    for option in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID",
                   "User=bsm-relay", "StateDirectory=bsm-relay", "ConfigurationDirectory=bsm-relay",
                   "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
                   "AmbientCapabilities=CAP_NET_BIND_SERVICE", "MemoryDenyWriteExecute=yes",
                   "SystemCallFilter=@system-service", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                   "Restart=on-failure", "UMask=0077", "LimitNOFILE=65536"):
        assert option in text, option


def _receive(sock: socket.socket, wanted: str, timeout: float = 30.0) -> list[str]:
    """Datagrams until one carries ``wanted``; every field seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        seen += data.split("\n")
        if wanted in seen:
            return seen
    raise AssertionError(f"no {wanted} in {seen}")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sd_notify_ready_after_listening_and_stopping_on_sigterm(tmp_path, workers):
    relay = make_relay(tmp_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    env = dict(relay.env, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="2000000")
    log = open(tmp_path / "relay.log", "ab")  # noqa: SIM115 - the child process holds it
    proc = subprocess.Popen([str(BIN), "--config", str(relay.config), "serve", "--workers", workers],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    _RUNNING.append(proc)
    try:
        seen = _receive(sock, "READY=1")
        # READY=1 means the port listens, for every worker.
        socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
        assert "STOPPING=1" not in seen
        # The watchdog is pinged while running (every WATCHDOG_USEC / 2).
        _receive(sock, "WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        _receive(sock, "STOPPING=1")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert "Traceback" not in Path(tmp_path / "relay.log").read_text()
