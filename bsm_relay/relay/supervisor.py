"""``bsm-relay serve --workers N``: a parent that runs N serve processes and watches them.

Each child is a plain ``serve`` (SMTP in and delivery workers) started as a fresh
interpreter; the children bind the same port with SO_REUSEPORT (the kernel spreads
connections over them) and share the database (delivery workers claim queue items
atomically with a lease, so no item is delivered twice).  The parent:

- starts them, restarts one that dies (with a back-off), and gives up with exit 1 if
  one fails before the service was ever ready (a configuration or database problem
  every child would hit again);
- forwards SIGTERM/SIGINT (each child drains) and SIGHUP (each child reloads);
- is systemd's main process: the children's ``$NOTIFY_SOCKET`` is the parent's own
  datagram socket, so READY=1 goes to systemd once every child is listening, and the
  parent pings the watchdog while every child pings it (a child whose event loop
  stops pinging is killed and restarted).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from ..config.settings import Settings
from . import log, sdnotify
from .server import SUPERVISED_ENV, StartupError, load_tls

RESTART_BACKOFF = (1.0, 30.0)   # first delay, cap (doubling) between restarts of a crashing slot
STOP_MARGIN = 15.0              # beyond drain_grace, before a child that does not exit is killed


@dataclass
class Worker:
    slot: int
    proc: asyncio.subprocess.Process | None = None
    ready: bool = False
    last_ping: float = field(default_factory=time.monotonic)
    failures: int = 0


class Supervisor:
    def __init__(self, settings: Settings, workers: int, config_path: str | None) -> None:
        self.settings = settings
        self.workers = [Worker(slot) for slot in range(workers)]
        self.config_path = config_path
        self.log = log.get()
        self.stopping = asyncio.Event()
        self.failed: str | None = None
        self.ever_ready = False
        self.exit_codes: list[int] = []
        self.watchdog = sdnotify.watchdog_interval()
        self._sock = self._notify_socket()

    # -- the children's notify socket ----------------------------------------------------
    def _notify_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.notify_name = f"@bsm-relay-{os.getpid()}-{secrets.token_hex(4)}"
        sock.bind(b"\0" + self.notify_name[1:].encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # the sender's pid comes with each datagram
        return sock

    def _on_datagram(self) -> None:
        while True:
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            pid = next((struct.unpack("3i", cdata[:12])[0] for level, kind, cdata in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)
            worker = next((w for w in self.workers if w.proc is not None and w.proc.pid == pid), None)
            if worker is None:
                continue
            fields = set(data.decode("ascii", "replace").split("\n"))
            if "WATCHDOG=1" in fields:
                worker.last_ping = time.monotonic()
            if "READY=1" in fields and not worker.ready:
                worker.ready = True
                worker.last_ping = time.monotonic()
                if not self.ever_ready and all(w.ready for w in self.workers):
                    self.ever_ready = True
                    sdnotify.notify("READY=1", f"STATUS={len(self.workers)} workers serving",
                                    f"MAINPID={os.getpid()}")

    # -- children ---------------------------------------------------------------------------
    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = self.notify_name
        env[SUPERVISED_ENV] = str(os.getpid())
        env.pop("WATCHDOG_PID", None)   # the children ping us, on systemd's interval
        if self.watchdog:
            env["WATCHDOG_USEC"] = str(int(self.watchdog * 2_000_000))
        else:
            env.pop("WATCHDOG_USEC", None)
        return env

    async def _spawn(self, worker: Worker) -> None:
        argv = [sys.executable, "-m", "bsm_relay.relay.cli"]
        if self.config_path:
            argv += ["--config", self.config_path]
        argv += ["serve", "--workers", "1"]
        worker.ready = False
        worker.last_ping = time.monotonic()
        worker.proc = await asyncio.create_subprocess_exec(*argv, env=self._child_env())
        self.log.info("worker.started", slot=worker.slot, pid=worker.proc.pid)

    async def _run_slot(self, worker: Worker) -> None:
        """Keep one slot's child running until the stop; record its exit code at the end."""
        delay = RESTART_BACKOFF[0]
        while True:
            await self._spawn(worker)
            assert worker.proc is not None
            started = time.monotonic()
            code = await worker.proc.wait()
            (self.log.info if code == 0 else self.log.error)(
                "worker.exited", slot=worker.slot, pid=worker.proc.pid, code=code, stopping=self.stopping.is_set())
            if self.stopping.is_set():
                self.exit_codes.append(code)
                return
            if not self.ever_ready:
                # Every child would fail the same way (bad configuration, database, port): give up.
                self.failed = f"worker {worker.slot} exited with code {code} before the service was ready"
                self.stopping.set()
                self.exit_codes.append(code)
                return
            if time.monotonic() - started > 60:
                delay = RESTART_BACKOFF[0]
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return
            except TimeoutError:
                delay = min(delay * 2, RESTART_BACKOFF[1])

    def _signal_all(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                try:
                    w.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def _watch(self) -> None:
        """Ping systemd while every child pings us; kill a child whose loop went silent."""
        assert self.watchdog is not None
        while not self.stopping.is_set():
            now = time.monotonic()
            for w in self.workers:
                if w.ready and w.proc is not None and w.proc.returncode is None \
                        and now - w.last_ping > 2 * self.watchdog:
                    self.log.error("worker.unresponsive", slot=w.slot, pid=w.proc.pid,
                                   silent_for=round(now - w.last_ping, 1))
                    w.proc.kill()
            sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self._sock.fileno(), self._on_datagram)

        def stop() -> None:
            if not self.stopping.is_set():
                sdnotify.notify("STOPPING=1")
                self.stopping.set()
            self._signal_all(signal.SIGTERM)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        slots = [asyncio.create_task(self._run_slot(w)) for w in self.workers]
        watch = asyncio.create_task(self._watch()) if self.watchdog else None
        await self.stopping.wait()
        self._signal_all(signal.SIGTERM)
        done, pending = await asyncio.wait(slots, timeout=self.settings.smtp.drain_grace + STOP_MARGIN)
        if pending:
            self._signal_all(signal.SIGKILL)
            await asyncio.wait(pending)
        if watch is not None:
            watch.cancel()
        loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self.failed:
            raise StartupError(self.failed)
        if any(code != 0 for code in self.exit_codes):
            raise StartupError(f"workers exited with codes {sorted(set(self.exit_codes))}")


async def supervise(settings: Settings, workers: int, config_path: str | None) -> None:
    """Run ``workers`` serve processes until SIGTERM (:class:`StartupError` when they could not run)."""
    # Fail here, once and clearly, on what would make every child fail.
    await asyncio.to_thread(load_tls, settings)
    log.configure(settings.logging.format, settings.logging.level)
    await Supervisor(settings, workers, config_path).run()
