"""Postfix on both sides of bsm-relay, configured as docs/postfix.md says.

One throwaway Postfix instance (its own ``config_directory``, ``queue_directory``,
``data_directory`` and log file under a temporary directory, loopback ports only; the
system Postfix is neither started nor touched) plays both roles of the document:

- its MX listener is the internet-facing MX of the alias domain: ``relay_domains`` and a
  transport map hand ``marketplace.example`` to bsm-relay, and recipient address
  verification probes bsm-relay before a RCPT is accepted;
- its second listener is bsm-relay's smarthost (``[delivery] mode = "smarthost"``), which
  delivers to Maildirs under the temporary directory (virtual(8)).

The relay behind it runs with ``[auth] sender_authentication = "none"``: in this setup
checking SPF/DKIM of the sending MTA is Postfix's job (the relay only sees 127.0.0.1).
Test clients connect from 127.0.0.2, so the MX listener treats them as the internet
(``mynetworks = 127.0.0.1/32`` is bsm-relay's address only).

Skipped where Postfix is not installed, or when not run as root (Postfix's master must
start as root to drop privileges to ``mail_owner``).
"""

from __future__ import annotations

import email
import email.policy
import grp
import json
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import dkim
import pytest
from helpers import RelayProcess, free_port, make_relay

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
POSTQUEUE = Path("/usr/sbin/postqueue")
if not (POSTFIX.exists() and POSTCONF.exists() and Path("/etc/postfix/master.cf").exists()):
    pytest.skip("Postfix is not installed (/usr/sbin/postfix)", allow_module_level=True)
if os.geteuid() != 0:
    pytest.skip("a throwaway Postfix instance must be started as root", allow_module_level=True)

ALIAS_DOMAIN = "marketplace.example"
SELLER = "seller@acme.example"
STRANGER = "stranger@acme.example"
BUYER = "buyer@example.org"
ORDER = "111-2223334-4445556"
CLIENT_IP = "127.0.0.2"  # "the internet", as far as the MX listener is concerned
# Maildirs of the final-delivery domains (relative to virtual_mailbox_base).
MAILBOXES = {BUYER: "example.org/buyer/", SELLER: "acme.example/seller/", STRANGER: "acme.example/stranger/"}


class PostfixInstance:
    """A Postfix instance of its own under ``base``, driven with postconf/postfix/postqueue -c."""

    def __init__(self, base: Path, relay_port: int, out_port: int) -> None:
        self.base = base
        self.conf = base / "etc"
        self.queue = base / "spool"
        self.data = base / "data"
        self.mail = base / "mail"
        self.maillog = base / "maillog"
        self.mx_port = free_port()
        self.proxy_port = free_port()
        self.out_port = out_port
        self.relay_port = relay_port
        self.started = False

    def run(self, *cmd: str | Path) -> str:
        res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} failed ({res.returncode}):\n{res.stdout}{res.stderr}"
                                 f"\n--- maillog ---\n{self.log()}")
        return res.stdout + res.stderr

    def postconf(self, *args: str) -> str:
        return self.run(POSTCONF, "-c", self.conf, *args)

    def configure(self) -> None:
        for d in (self.conf, self.queue, self.data, self.mail):
            d.mkdir(parents=True)
        # Daemons run as mail_owner (data_directory) and virtual(8) as virtual_uid_maps (mail).
        shutil.chown(self.data, "postfix", "postfix")
        shutil.chown(self.mail, "postfix", "postfix")
        shutil.copy("/etc/postfix/master.cf", self.conf / "master.cf")
        (self.conf / "main.cf").write_text("")
        # The transport map exactly as docs/postfix.md writes it (texthash: needs no postmap).
        (self.conf / "transport").write_text(f"{ALIAS_DOMAIN} smtp:[127.0.0.1]:{self.relay_port}\n")
        mailbox_map = ", ".join(f"{addr}={path}" for addr, path in MAILBOXES.items())
        self.postconf(
            "-e",
            "compatibility_level = 3.6",
            # -- an instance of its own: nothing shared with the system Postfix
            f"queue_directory = {self.queue}",
            f"data_directory = {self.data}",
            f"multi_instance_name = postfix-bsmtest-{os.getpid()}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            f"maillog_file = {self.maillog}",
            f"maillog_file_prefixes = {self.base}",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "myhostname = pf.postfix.test",
            "mydestination =",
            "alias_maps =",
            "alias_database =",
            "smtputf8_enable = no",
            # No DNS anywhere: next hops are [address] literals, clients are loopback.
            "smtp_dns_support_level = disabled",
            "smtp_host_lookup = native",
            "smtpd_peername_lookup = no",
            # A deferred message is retried soon (the test also flushes).
            "queue_run_delay = 1s",
            "minimal_backoff_time = 1s",
            "maximal_backoff_time = 2s",
            # -- (a) Postfix as the MX of the alias domain, handing it to bsm-relay (docs/postfix.md)
            "mynetworks = 127.0.0.1/32",
            f"relay_domains = {ALIAS_DOMAIN}",
            f"transport_maps = texthash:{self.conf / 'transport'}",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination, "
            "reject_unverified_recipient",
            "unverified_recipient_reject_code = 550",
            # The first probe of an alias must finish before smtpd gives up with a 450.
            "address_verify_poll_count = 10",
            "address_verify_poll_delay = 1s",
            # -- final delivery for the test: Maildirs under the temporary directory
            "virtual_mailbox_domains = example.org, acme.example",
            f"virtual_mailbox_base = {self.mail}",
            f"virtual_mailbox_maps = inline:{{ {mailbox_map} }}",
            f"virtual_uid_maps = static:{pwd.getpwnam('postfix').pw_uid}",
            f"virtual_gid_maps = static:{grp.getgrnam('postfix').gr_gid}",
        )
        # master.cf: no chroot (the temporary queue directory holds no libraries), and the
        # port-25 listener replaced by two loopback listeners.
        self.postconf("-F", "*/*/chroot = n")
        self.postconf("-MX", "smtp/inet")
        self.postconf("-Me", f"127.0.0.1:{self.mx_port}/inet = 127.0.0.1:{self.mx_port} inet n - n - - smtpd"
                      " -o syslog_name=postfix/mx")
        # (a') the before-queue variant: smtpd proxies the session to bsm-relay, queues nothing.
        self.postconf("-Me", f"127.0.0.1:{self.proxy_port}/inet = 127.0.0.1:{self.proxy_port} inet n - n - - smtpd"
                      " -o syslog_name=postfix/mx-proxy"
                      f" -o smtpd_proxy_filter=127.0.0.1:{self.relay_port}"
                      " -o smtpd_recipient_restrictions=permit_mynetworks,reject_unauth_destination")
        # (b) bsm-relay's smarthost: loopback clients only, no content filter, no milters.
        self.postconf("-Me", f"127.0.0.1:{self.out_port}/inet = 127.0.0.1:{self.out_port} inet n - n - - smtpd"
                      " -o syslog_name=postfix/from-bsm-relay"
                      " -o mynetworks=127.0.0.0/8"
                      " -o smtpd_relay_restrictions=permit_mynetworks,reject"
                      " -o smtpd_recipient_restrictions=permit_mynetworks,reject"
                      " -o content_filter="
                      " -o smtpd_milters=")
        self.run(POSTFIX, "-c", self.conf, "check")

    def start(self) -> None:
        self.run(POSTFIX, "-c", self.conf, "start")
        self.started = True
        deadline = time.monotonic() + 30
        for port in (self.mx_port, self.proxy_port, self.out_port):
            while True:
                try:
                    smtplib.SMTP("127.0.0.1", port, timeout=5).quit()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"Postfix is not listening on {port}:\n{self.log()}") from None
                    time.sleep(0.1)

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        pid_file = self.queue / "pid" / "master.pid"
        pid = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
        subprocess.run([str(POSTFIX), "-c", str(self.conf), "stop"], capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while pid is not None and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        if pid is not None:  # stop did not take: take the instance down hard
            subprocess.run([str(POSTFIX), "-c", str(self.conf), "abort"], capture_output=True, timeout=60)

    def flush(self) -> None:
        self.run(POSTQUEUE, "-c", self.conf, "-f")

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def mailbox(self, address: str) -> list[Path]:
        new = self.mail / MAILBOXES[address] / "new"
        return sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns) if new.is_dir() else []

    def wait_for_mail(self, address: str, count: int, relay: RelayProcess, timeout: float = 90.0) -> list[Path]:
        """Poll ``address``'s Maildir until it holds ``count`` messages, flushing the queue now and then."""
        deadline = time.monotonic() + timeout
        next_flush = time.monotonic() + 3
        while time.monotonic() < deadline:
            files = self.mailbox(address)
            if len(files) >= count:
                return files
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush = time.monotonic() + 3
            time.sleep(0.1)
        raise AssertionError(f"{address}: expected {count} messages, got {len(self.mailbox(address))}\n"
                             f"--- maillog ---\n{self.log()}\n--- relay log ---\n{relay.log()}")

    def smtp(self, port: int | None = None) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", port or self.mx_port, timeout=60, source_address=(CLIENT_IP, 0))
        client.ehlo("client.test")
        return client


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    out_port = free_port()
    relay = make_relay(tmp_path_factory.mktemp("relay"), sink_port=out_port,
                       extra='\n[auth]\nsender_authentication = "none"\n')
    relay.cli("seller", "add", "S1", "--name", "Acme Books", "--email", SELLER)
    relay.cli("buyer", "add", "B1", "--email", BUYER, "--name", "Bea Buyer")
    relay.cli("order", "add", ORDER, "--seller", "S1", "--buyer", "B1", "--status", "shipped")
    # Not under pytest's tmp dir: its parents are root-only, and virtual(8) writes as "postfix".
    base = Path(tempfile.mkdtemp(prefix="bsm-postfix-"))
    postfix = PostfixInstance(base, relay.port, out_port)
    try:
        base.chmod(0o755)
        postfix.configure()
        relay.start()
        postfix.start()
        yield postfix, relay
    finally:
        postfix.stop()
        code = relay.stop()
        shutil.rmtree(base, ignore_errors=True)
    assert code == 0
    assert "Traceback" not in relay.log()


@pytest.fixture(scope="module")
def aliases(stack):
    _, relay = stack
    pair = json.loads(relay.cli("alias", "S1", "B1", "--json").stdout)
    return {"buyer": pair["buyer_alias"], "seller": pair["seller_alias"]}


def flat(text: str) -> str:
    """Bounce text with Postfix's line folding undone."""
    return re.sub(r"\s+", " ", text)


def seller_mail(from_: str, to: str, subject: str, body: str) -> bytes:
    return (f"From: Acme Books <{from_}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <orig-{time.monotonic_ns()}@ws17.acme.example>\r\n"
            f"Date: Fri, 27 Nov 2026 10:00:00 +0000\r\n\r\n{body}").encode()


def test_postfix_mx_relay_postfix_smarthost_to_buyer_maildir(stack, aliases):
    postfix, relay = stack
    before = len(postfix.mailbox(BUYER))
    with postfix.smtp() as c:
        refused = c.sendmail(SELLER, [aliases["buyer"]],
                             seller_mail(SELLER, aliases["buyer"], f"Your order {ORDER}", "Your book ships today.\r\n"))
    assert refused == {}
    path = postfix.wait_for_mail(BUYER, before + 1, relay)[-1]
    raw = path.read_bytes()
    text = raw.decode()
    msg = email.message_from_bytes(raw, policy=email.policy.default)

    # Our rewrite reached the buyer: the seller alias, never the seller.
    assert msg["From"].addresses[0].addr_spec == aliases["seller"]
    assert msg["From"].addresses[0].display_name == "Acme Books via Marketplace"
    assert msg["Reply-To"].addresses[0].addr_spec == aliases["seller"]
    assert msg["Subject"] == f"Your order {ORDER}"
    for leak in (SELLER, "acme.example", "ws17", CLIENT_IP, "client.test"):
        assert leak not in text, leak
    # Postfix(out) wrote the envelope: our signed bounce address, to the buyer.
    assert msg["Delivered-To"] == BUYER
    assert msg["Return-Path"].strip("<>").endswith("@" + ALIAS_DOMAIN)
    received = msg.get_all("Received")
    assert len(received) == 2  # Postfix(out)'s, then ours; Postfix(in)'s was scrubbed
    assert "by pf.postfix.test" in received[0] and "mx.relay.test" in received[0]
    assert "mx.relay.test" in received[1]
    assert text.endswith("\n\nYour book ships today.\n")

    # Our DKIM signature for the alias domain survives Postfix and verifies.
    signatures = msg.get_all("DKIM-Signature")
    assert len(signatures) == 1 and f"d={ALIAS_DOMAIN};" in signatures[0]
    record = json.loads(relay.cli("init", "--json").stdout)["dkim_txt_record"]

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name.decode().rstrip(".") == record["name"].rstrip(".")
        return record["value"].encode()
    assert dkim.verify(raw, dnsfunc=dnsfunc)

    # Postfix's log shows both legs: handed to bsm-relay, then delivered from it.
    log = postfix.log()
    assert re.search(rf"relay=127\.0\.0\.1\[127\.0\.0\.1\]:{relay.port},.*status=sent", log), log
    assert re.search(r"to=<buyer@example\.org>, relay=virtual,.*status=sent \(delivered to maildir\)", log), log


def test_buyer_reply_through_postfix_reaches_seller_maildir(stack, aliases):
    postfix, relay = stack
    before = len(postfix.mailbox(SELLER))
    reply = (f"From: Bea Buyer <{BUYER}>\r\nTo: {aliases['seller']}\r\nSubject: Re: Your order {ORDER}\r\n"
             f"Date: Fri, 27 Nov 2026 11:00:00 +0000\r\n\r\nThanks!\r\n").encode()
    with postfix.smtp() as c:
        assert c.sendmail(BUYER, [aliases["seller"]], reply) == {}
    raw = postfix.wait_for_mail(SELLER, before + 1, relay)[-1].read_bytes()
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec == aliases["buyer"]
    assert BUYER not in raw.decode() and "example.org" not in raw.decode()
    assert msg["Delivered-To"] == SELLER


def test_unapproved_sender_through_postfix_gets_postfix_bounce_with_our_sentence(stack, aliases):
    postfix, relay = stack
    buyer_before = len(postfix.mailbox(BUYER))
    before = len(postfix.mailbox(STRANGER))
    with postfix.smtp() as c:
        # Postfix in front accepts: the recipient verifies (a valid alias); the sender is judged
        # by bsm-relay on the From header, after DATA.
        assert c.sendmail(STRANGER, [aliases["buyer"]],
                          seller_mail(STRANGER, aliases["buyer"], f"Order {ORDER}", "Hi from a stranger.\r\n")) == {}
    bounce = postfix.wait_for_mail(STRANGER, before + 1, relay)[-1].read_bytes().decode()
    msg = email.message_from_string(bounce, policy=email.policy.default)
    assert msg["From"].addresses[0].addr_spec.lower().startswith("mailer-daemon@")
    assert msg.get_content_type() == "multipart/report"
    text = flat(bounce)
    assert "550 5.7.1 The address stranger@acme.example is not approved for this seller account" in text
    assert "Messaging Permissions" in text
    assert "Diagnostic-Code: smtp; 550 5.7.1" in text
    # Postfix bounced to the alias it was given; the buyer's real address appears nowhere.
    assert BUYER not in bounce and aliases["buyer"] in bounce

    # Nothing reached the buyer, nothing was queued by bsm-relay, the address is now pending.
    assert len(postfix.mailbox(BUYER)) == buyer_before
    assert json.loads(relay.cli("queue", "list", "--json").stdout) == []
    pending = json.loads(relay.cli("sender", "list", "S1", "--status", "pending", "--json").stdout)
    assert STRANGER in json.dumps(pending)
    assert re.search(r"to=<[^>]+@marketplace\.example>, relay=127\.0\.0\.1.*status=bounced \(host 127\.0\.0\.1"
                     r"\[127\.0\.0\.1\] said: 550 5\.7\.1 ", postfix.log()), postfix.log()


def test_unknown_alias_refused_in_session_by_postfix_recipient_verification(stack, aliases):
    postfix, relay = stack
    token = aliases["buyer"].split("@")[0]
    forged = ("b" if token[0] != "b" else "c") + token[1:] + "@" + ALIAS_DOMAIN  # a one-letter change
    with postfix.smtp() as c:
        c.mail(SELLER)
        code, reply = c.rcpt(forged)
        foreign_code, _ = c.rcpt("someone@victim.example")
    text = flat(reply.decode())
    # bsm-relay's generic 5.1.1 came back through Postfix's probe, in the session: no bounce later.
    assert code == 550, text
    assert "undeliverable address" in text and re.search(r"said: 550 5\.1\.1 ", text), text
    assert foreign_code == 554  # reject_unauth_destination: Postfix is no open relay either


def test_before_queue_proxy_passes_our_refusal_in_session_and_delivers_the_rest(stack, aliases):
    """``smtpd_proxy_filter``: Postfix queues nothing, bsm-relay's answers reach the client live."""
    postfix, relay = stack
    stranger_before = len(postfix.mailbox(STRANGER))
    with postfix.smtp(postfix.proxy_port) as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail(STRANGER, [aliases["buyer"]],
                       seller_mail(STRANGER, aliases["buyer"], f"Order {ORDER}", "Second try.\r\n"))
    assert info.value.smtp_code == 550
    text = flat(info.value.smtp_error.decode())
    assert text.startswith("5.7.1 The address stranger@acme.example is not approved for this seller account"), text

    before = len(postfix.mailbox(BUYER))
    with postfix.smtp(postfix.proxy_port) as c:
        assert c.sendmail(SELLER, [aliases["buyer"]],
                          seller_mail(SELLER, aliases["buyer"], f"Order {ORDER}", "Via the proxy.\r\n")) == {}
    raw = postfix.wait_for_mail(BUYER, before + 1, relay)[-1].read_bytes()
    assert raw.endswith(b"\n\nVia the proxy.\n")
    assert b"acme.example" not in raw and CLIENT_IP.encode() not in raw
    # The refusal was the client's to handle: Postfix queued nothing and wrote no bounce of its own.
    log = postfix.log()
    assert re.search(r"proxy-reject: END-OF-MESSAGE: 550 5\.7\.1 The address stranger@acme\.example", log), log
    assert len(postfix.mailbox(STRANGER)) == stranger_before
