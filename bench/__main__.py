"""``make bench``: bsm-relay (full pipeline) and Postfix (an equivalent, simpler hop) side by side.

Both get the same load from ``bench/load.py`` (open connections reused; it times end of DATA ->
250): over 20 connections, Postfix's ``smtp-source`` carries 18 and two are timed probes of this
process (``--python-load``: all 20 from this process); one connection and the refusal cases are
this process's alone.  Both relay to a sink of their own (Postfix's ``smtp-sink``, which counts
deliveries).
bsm-relay runs as in production: ``bsm-relay init`` then ``serve --workers <cores>``, with
sender authentication (SPF against the benchmark's own DNS server, tests/dnsserver.py),
policy, rewrite, DKIM signing and its durable SQLite queue.

Prints one table and writes bench/results/latest.json.  ``--quick`` runs a short version.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import load
from .targets import ROOT, Postfix, SmtpSink, cpu_seconds, free_port, peak_kb, postfix_available, wait_port

# The benchmark's DNS server (tests/dnsserver.py) runs in a process of its own, so the load
# generator in this one never delays the relay's SPF lookups.
_DNS = """
import sys, time
sys.path.insert(0, sys.argv[1])
from dnsserver import DnsServer
server = DnsServer(spf_fallback="v=spf1 ip4:127.0.0.0/8 -all")
server.start_in_thread()
print(server.nameserver, flush=True)
time.sleep(3600)
"""


def start_dns() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", _DNS, str(ROOT / "tests")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()

BIN = Path(sys.executable).parent / "bsm-relay"
SELLER, OTHER, BUYER = "seller@acme.example", "stranger@acme.example", "buyer@example.org"
ORDER = "111-2223334-4445556"


def make_message(alias: str, size: int, sender: str = SELLER) -> bytes:
    head = (f"From: Acme Books <{sender}>\r\nTo: {alias}\r\nSubject: About order {ORDER}\r\n"
            f"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <bench-{size}@acme.example>\r\n"
            "MIME-Version: 1.0\r\n").encode()
    text = b"Hello, your parcel is on its way and should arrive within three days.\r\n"
    if size <= 8192:
        body = text * max(1, (size - len(head) - 60) // len(text))
        return head + b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + body
    raw = (size - 2048) * 3 // 4
    pdf = base64.encodebytes(b"%PDF-1.4\n" + bytes(range(256)) * (raw // 256)).replace(b"\n", b"\r\n")
    return (head + b"Content-Type: multipart/mixed; boundary=bb\r\n\r\n--bb\r\nContent-Type: text/plain\r\n\r\n"
            + text * 10 + b"--bb\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=\"invoice.pdf\"\r\n\r\n" + pdf + b"--bb--\r\n")


class Relay:
    def __init__(self, workdir: Path, sink_port: int, nameserver: str, workers: int) -> None:
        self.dir = workdir / "relay"
        self.dir.mkdir()
        self.port = free_port()
        self.workers = workers
        self.config = self.dir / "relay.toml"
        self.config.write_text(f"""
[smtp]
listen = "127.0.0.1:{self.port}"
hostname = "mx.relay.test"
postmaster = "ops@operator.test"
max_sessions_per_ip = 1000

[aliases]
domain = "marketplace.example"
marketplace_name = "Marketplace"

[storage]
state_dir = "{self.dir / 'state'}"

[delivery]
mode = "smarthost"
smarthost = "127.0.0.1:{sink_port}"
smarthost_tls = "off"
poll_interval = 0.2

[policy]
# The benchmark's seller writes thousands of proactive messages in minutes; the daily volume
# cap (600 by default) would refuse most of them and the run would measure refusals.
volume_base = 10000000

[dns]
nameservers = ["{nameserver}"]

[logging]
# The default level, as a mail admin runs it: a line when a message is accepted and one when it is
# delivered, like the maillog the benchmark's Postfix writes (session 8; "warning" before).
format = "json"
level = "info"
""")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BSM_RELAY_")}
        self.cli("init")
        self.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
        self.cli("buyer", "add", "B1", "--email", BUYER, "--name", "Bea Buyer")
        self.cli("order", "add", ORDER, "--seller", "S1", "--buyer", "B1", "--status", "shipped")
        self.alias = json.loads(self.cli("alias", "S1", "B1", "--json"))["buyer_alias"]
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        res = subprocess.run([str(BIN), "--config", str(self.config), *args], capture_output=True, text=True,
                             env=self.env, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"bsm-relay {' '.join(args)}: {res.stderr.strip()}")
        return res.stdout

    def start(self) -> None:
        self.proc = subprocess.Popen([str(BIN), "--config", str(self.config), "serve", "--workers", str(self.workers)],
                                     stdout=open(self.dir / "relay.log", "wb"), stderr=subprocess.STDOUT, env=self.env)
        wait_port(self.port)
        time.sleep(1.0)                    # every worker up

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)


def measure(target, sink: SmtpSink, mail_from: str, rcpt: str, message: bytes, total: int, conns: int,
            probes: int = 0) -> dict:
    """One run of a case.  ``probes``: with Postfix's smtp-source installed, it carries all but
    this many connections, which are this process's and timed (``load.run_with_smtp_source``)."""
    cpu0, count0 = cpu_seconds(target.pid), sink.count()
    start = time.monotonic()
    if probes and load.SMTP_SOURCE and conns > probes:
        result = asyncio.run(load.run_with_smtp_source(target.port, mail_from, rcpt, message, total, conns, probes))
    else:
        result = asyncio.run(load.run(target.port, mail_from, rcpt, message, total, conns))
    done = sink.wait_for(count0 + result.accepted, timeout=180)
    delivered = sink.count() - count0
    time.sleep(0.3)
    cpu = cpu_seconds(target.pid) - cpu0
    p50, p99 = result.percentile(50), result.percentile(99)
    return {
        "sent": result.sent, "accepted": result.accepted, "refused": result.refused, "errors": result.errors,
        "delivered": delivered,
        "accepted_per_s": round(result.accepted / result.seconds, 1),
        "delivered_per_s": round(delivered / max(done - start, 1e-9), 1),
        "refused_per_s": round(result.refused / result.seconds, 1),
        "p50_ms": round(p50 * 1000, 2) if p50 is not None else None,
        "p99_ms": round(p99 * 1000, 2) if p99 is not None else None,
        "cpu_ms_per_msg": round(cpu * 1000 / max(result.accepted or result.refused, 1), 3),
        "peak_mb": round(peak_kb(target.pid) / 1024, 1),
    }


def median_run(runs: list[dict], key: str) -> dict:
    """The run whose ``key`` is the median of the runs (all of them kept in ``runs``): on an
    unsteady VM one run of a case can be far off, for either program."""
    ordered = sorted(runs, key=lambda r: r[key])
    return {**ordered[(len(ordered) - 1) // 2], "runs": [r[key] for r in runs]}


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="a short run (a few hundred messages)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of each case, bsm-relay and Postfix in turn; the median is shown "
                             "(default 5, 1 with --quick)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument("--python-load", action="store_true",
                        help="drive every connection from this process's asyncio load generator, even where "
                             "Postfix's smtp-source is installed (as sessions 1-9 did)")
    parser.add_argument("--cases", default=None,
                        help="only these cases, comma-separated: 2k1, 2k20, 100k1, 100k20, refuse, refuse-hdr "
                             "(default: all); for A/B runs of one case")
    args = parser.parse_args()
    wanted = set(args.cases.split(",")) if args.cases else None
    if not postfix_available():
        print("make bench needs Postfix (postfix, smtp-sink) and root to run a throwaway instance", file=sys.stderr)
        return 1
    # Enough messages for each case to run several seconds on a fast machine (about 1,000 msg/s
    # at 2 KB): shorter cases measured start-up and the queue's drain more than the steady state.
    repeat = args.repeat or (1 if args.quick else 5)
    counts = {2048: 100, 102400: 40} if args.quick else {2048: 5000, 102400: 2000}
    refusals = 100 if args.quick else 4000
    # Accepted loads over 20 connections: smtp-source carries 18, two are this process's timed
    # probes (about 10 % of the messages: 500 latencies at 2 KB, 200 at 100 KB).  The refusal
    # cases stay with the asyncio generator (smtp-source stops at a refusal).
    probes = 0 if args.python_load or load.SMTP_SOURCE is None else 2
    dns, nameserver = start_dns()
    rows: list[dict] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bsm-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        # A sink for each: a case ends when its own deliveries are counted, so the other
        # program's late deliveries never end it early (its backlog would then run into the next case).
        sinks = {"bsm-relay": SmtpSink(work, "relay-sink"), "postfix": SmtpSink(work, "postfix-sink")}
        relay = Relay(work, sinks["bsm-relay"].port, nameserver, args.workers)
        postfix = Postfix(work, sinks["postfix"].port, SELLER, relay.alias, BUYER)
        try:
            relay.start()
            postfix.start()
            load_before = loadavg()
            for size, total in counts.items():
                message = make_message(relay.alias, size)
                for conns in (1, 20):
                    if wanted is not None and f"{size // 1024}k{conns}" not in wanted:
                        continue
                    # One connection: an eighth of the messages (a slow VM runs 2 KB x1 at 60-70 msg/s,
                    # and the whole benchmark must stay under 10 minutes there too).
                    n = total if conns == 20 else total // 8
                    runs: dict[str, list[dict]] = {"bsm-relay": [], "postfix": []}
                    for _ in range(repeat):
                        for name, target in (("bsm-relay", relay), ("postfix", postfix)):
                            runs[name].append(measure(target, sinks[name], SELLER, relay.alias, message, n, conns,
                                                      probes=probes if conns > 1 else 0))
                            print(f"  {name:9} {size // 1024:>3} KB x{conns:<2} {runs[name][-1]['delivered_per_s']:>8} "
                                  f"msg/s delivered, p99 {runs[name][-1]['p99_ms']} ms", file=sys.stderr)
                    for name, samples in runs.items():
                        rows.append({"target": name, "size": size, "connections": conns, "kind": "accept",
                                     **median_run(samples, "delivered_per_s")})
            # Two refusal cases.  "refuse": envelope and header From unapproved; Postfix refuses at
            # RCPT on the envelope.  "refuse-hdr": an approved envelope with an unapproved header
            # From (what bsm-relay's rule is about); both refuse after DATA.
            refused = make_message(relay.alias, 2048, sender=OTHER)
            for kind, mail_from in (("refuse", OTHER), ("refuse-hdr", SELLER)):
                if wanted is not None and kind not in wanted:
                    continue
                runs = {"bsm-relay": [], "postfix": []}
                for _ in range(repeat):
                    for name, target in (("bsm-relay", relay), ("postfix", postfix)):
                        runs[name].append(measure(target, sinks[name], mail_from, relay.alias, refused, refusals, 20))
                for name, samples in runs.items():
                    rows.append({"target": name, "size": 2048, "connections": 20, "kind": kind,
                                 **median_run(samples, "refused_per_s")})
        finally:
            relay.stop()
            postfix.stop()
            for sink in sinks.values():
                sink.stop()
            dns.kill()
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cpu_model": _cpu_model(), "loadavg_before": load_before, "loadavg_after": loadavg()},
        "relay_workers": args.workers, "quick": args.quick, "repeat": repeat,
        "seconds": round(time.monotonic() - started, 1), "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(rows)
    print(f"\n{report['machine']['cpus']} CPUs ({report['machine']['cpu_model']}), load before {load_before}, "
          f"bsm-relay --workers {args.workers}, median of {repeat} run(s) a case; {report['seconds']} s; "
          f"written to {out}")
    return 0


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def print_table(rows: list[dict]) -> None:
    keys = [("accepted_per_s", "accepted/s"), ("delivered_per_s", "delivered/s"), ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"), ("cpu_ms_per_msg", "CPU ms/msg"), ("peak_mb", "peak MB")]
    print(f"\n{'case':<22}" + "".join(f"{label:>26}" for _, label in keys))
    print(f"{'':<22}" + "".join(f"{'relay / postfix (ratio)':>26}" for _ in keys))
    cases = sorted({(r["kind"], r["size"], r["connections"]) for r in rows}, key=lambda c: (c[0], c[1], c[2]))
    for kind, size, conns in cases:
        pair = {r["target"]: r for r in rows if (r["kind"], r["size"], r["connections"]) == (kind, size, conns)}
        ours, theirs = pair.get("bsm-relay", {}), pair.get("postfix", {})
        label = f"{kind} {size // 1024} KB x{conns}"
        if kind.startswith("refuse"):   # columns: refusals/s, CPU ms per refusal, peak MB
            label = f"{'hdr ' if kind == 'refuse-hdr' else ''}refusals/s,CPU,MB x{conns}"
        cells = []
        for key, _ in (keys if kind == "accept" else [("refused_per_s", ""), *keys[4:]]):
            a, b = ours.get(key), theirs.get(key)
            ratio = f"{a / b:.2f}" if a is not None and b else "-"
            cells.append(f"{a} / {b} ({ratio})")
        print(f"{label:<22}" + "".join(f"{c:>26}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
