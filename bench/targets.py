"""What the benchmark drives: a throwaway Postfix hop, bsm-relay, and Postfix's smtp-sink behind both.

Everything lives under one temporary directory and listens on loopback ports.  Process figures
(CPU time, peak memory) come from /proc: a target's CPU is its processes' own time plus that of
the children they reaped; its peak memory is the sum of VmHWM over its live processes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def process_tree(pid: int) -> list[int]:
    tree, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(tree.get(p, []))
    return out


def cpu_seconds(root: int) -> float:
    """CPU of ``root`` and its descendants, reaped ones included (cutime/cstime)."""
    total = 0.0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += utime + stime + (cutime + cstime)
    return total / TICK


def peak_kb(root: int) -> int:
    total = 0
    for pid in process_tree(root):
        try:
            m = re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
        total += int(m.group(1)) if m else 0
    return total


class SmtpSink:
    """Postfix's smtp-sink, counting completed DATA commands (``-c``)."""

    def __init__(self, workdir: Path, name: str = "sink") -> None:
        self.port = free_port()
        self.out = workdir / f"{name}.out"
        self.proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
                                     stdout=open(self.out, "wb"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def count(self) -> int:
        # Only the end of the file (it grows by a line per message; read every 20 ms while a case
        # runs, the whole file cost the machine the benchmark is measuring more and more CPU).
        with open(self.out, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 200))
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0

    def wait_for(self, count: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.count() < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return time.monotonic()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


class Postfix:
    """A Postfix instance as an equivalent hop: approved senders (check_sender_access on the
    envelope at RCPT, header_checks on the header From after DATA), an alias map
    (virtual_alias_maps: alias -> real address), a header rewrite (header_checks and
    sender_canonical_maps), its normal disk queue, relaying to the sink."""

    def __init__(self, workdir: Path, sink_port: int, approved: str, alias: str, real: str) -> None:
        self.dir = workdir / "postfix"
        self.conf = self.dir / "etc"
        self.conf.mkdir(parents=True)
        self.port = free_port()
        (self.conf / "senders").write_text(f"{approved} OK\n")
        (self.conf / "virtual").write_text(f"{alias} {real}\n")
        (self.conf / "canonical").write_text(f"{approved} {alias}\n")
        # The header From is approved too, as bsm-relay's rule has it: the approved address is
        # rewritten, any other From refused after DATA (the envelope check refuses at RCPT).
        (self.conf / "header_checks").write_text(
            "/^Received:/ IGNORE\n/^X-Originating-IP:/ IGNORE\n/^Reply-To:/ IGNORE\n"
            f"/^From:.*<{re.escape(approved)}>/ REPLACE From: \"Seller via Marketplace\" <{alias}>\n"
            "/^From:/ REJECT 5.7.1 This From address is not approved\n")
        (self.conf / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {self.dir / 'queue'}
data_directory = {self.dir / 'data'}
mail_owner = postfix
setgid_group = postdrop
myhostname = bench.postfix.test
mydomain = postfix.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
relay_domains = marketplace.example
mynetworks = 127.0.0.0/8
virtual_alias_maps = texthash:{self.conf / 'virtual'}
sender_canonical_maps = texthash:{self.conf / 'canonical'}
header_checks = regexp:{self.conf / 'header_checks'}
smtpd_sender_restrictions = check_sender_access texthash:{self.conf / 'senders'}, reject
smtpd_recipient_restrictions = permit_mynetworks, reject
relayhost = [127.0.0.1]:{sink_port}
smtp_tls_security_level = none
smtpd_tls_security_level = none
default_destination_concurrency_limit = 20
smtp_destination_concurrency_limit = 20
default_process_limit = 100
# The refusal case measures how fast each hop refuses, not Postfix's tarpit: without these,
# smtpd sleeps a second per error after 10 in a session and hangs up after 20.
smtpd_error_sleep_time = 0
smtpd_soft_error_limit = 100000
smtpd_hard_error_limit = 100000
smtpd_junk_command_limit = 100000
# Nor its flow control: a message refused after DATA (header_checks) takes an in-flow token that
# no delivery gives back, and once they are spent smtpd pauses 1 s before each message.
in_flow_delay = 0
maillog_file = {self.dir / 'maillog'}
maillog_file_prefixes = {self.dir}
smtputf8_enable = no
biff = no
""")
        master = Path("/etc/postfix/master.cf").read_text()
        master = re.sub(r"(?m)^smtp\s+inet\s.*$", f"127.0.0.1:{self.port} inet n - n - - smtpd", master)
        master = re.sub(r"(?m)^#?postlog\s+unix-dgram.*$", "postlog   unix-dgram n  -       n       -       1       postlogd",
                        master)
        # No chroot: the temporary queue directory holds no libraries.
        lines = []
        for line in master.splitlines():
            cols = line.split()
            if line[:1].isalnum() and len(cols) >= 8:
                cols[4] = "n"
                line = "  ".join(cols)
            lines.append(line)
        (self.conf / "master.cf").write_text("\n".join(lines) + "\n")
        self.master_pid: int | None = None

    def start(self) -> None:
        env = {**os.environ, "MAIL_CONFIG": str(self.conf)}
        for sub in ("queue", "data"):
            (self.dir / sub).mkdir(exist_ok=True)
        shutil.chown(self.dir / "data", "postfix")
        res = subprocess.run(["postfix", "-c", str(self.conf), "start"], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"postfix start: {res.stderr.strip()}")
        wait_port(self.port)
        pid_file = self.dir / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.master_pid = int(pid_file.read_text().split()[0])

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], capture_output=True,
                       env={**os.environ, "MAIL_CONFIG": str(self.conf)})
        time.sleep(0.5)

    @property
    def pid(self) -> int:
        assert self.master_pid is not None
        return self.master_pid


def postfix_available() -> bool:
    return all(shutil.which(tool) for tool in ("postfix", "smtp-sink")) and os.geteuid() == 0
