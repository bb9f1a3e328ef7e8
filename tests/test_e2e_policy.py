"""The marketplace's rules end to end: real SMTP into ``bsm-relay serve``, the Contact Buyer
commands, and a recording downstream (issue 5).

Each test seeds its own seller, buyer and orders, so tests never share counters or threads.
"""

from __future__ import annotations

import base64
import email
import email.policy
import io
import json
import quopri
import smtplib
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta

import pytest
from helpers import RelayProcess, Sink, make_relay, message, until

AUTH_OFF = ""   # sender authentication stays on (the harness DNS publishes SPF for the test domains)
POLICY = '\n[policy]\ncategory_add_reasons = ["furniture:delivery_scheduling"]\n'
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<<>>\n%%EOF\n"
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" + b"\x00" * 48 + b"This program cannot be run"


def docx_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types/>')
        z.writestr("word/document.xml", "<w:document><w:body>Spec</w:body></w:document>")
    return buf.getvalue()


def iso(days_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days_ago)).isoformat(timespec="seconds")


_SEED = """
import contextlib, io, json, sys
from bsm_relay.relay.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    if code != 0:
        sys.exit(f"{argv} failed")
    out.append(buf.getvalue())
print(json.dumps(out))
"""


def seed(relay: RelayProcess, *commands: list[str]) -> list[str]:
    """Run several bsm-relay commands in one process (each is a CLI call as in production)."""
    argvs = [["--config", str(relay.config), *c] for c in commands]
    res = subprocess.run([sys.executable, "-c", _SEED, json.dumps(argvs)], capture_output=True, text=True,
                         env=relay.env, cwd=relay.workdir, timeout=60)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


class Pair:
    """One seller, one buyer, their aliases and orders, made for one test."""

    def __init__(self, relay: RelayProcess, tag: str, *, opt_out: bool = False, locale: str = "en",
                 orders: tuple[tuple[str, ...], ...] = ()) -> None:
        self.seller_id, self.buyer_id = f"S-{tag}", f"B-{tag}"
        self.seller = f"shop-{tag}@seller-{tag}.example"
        self.buyer = f"buyer-{tag}@mail-{tag}.example"
        buyer_cmd = ["buyer", "add", self.buyer_id, "--email", self.buyer, "--name", "Bea Buyer",
                     "--locale", locale] + (["--opt-out"] if opt_out else [])
        cmds = [["seller", "add", self.seller_id, "--name", f"Shop {tag}", "--email", self.seller], buyer_cmd]
        for order_id, status, *rest in orders:
            cmd = ["order", "add", order_id, "--seller", self.seller_id, "--buyer", self.buyer_id,
                   "--status", status]
            if rest and rest[0]:
                cmd += ["--delivered-at", rest[0]]
            if len(rest) > 1:
                cmd += ["--category", rest[1]]
            cmds.append(cmd)
        cmds.append(["alias", self.seller_id, self.buyer_id, "--json"])
        aliases = json.loads(seed(relay, *cmds)[-1])
        self.buyer_alias, self.seller_alias = aliases["buyer_alias"], aliases["seller_alias"]


def send(relay: RelayProcess, mail_from: str, rcpt: str, data: bytes) -> None:
    with relay.smtp() as c:
        c.sendmail(mail_from, [rcpt], data)


def refused(relay: RelayProcess, mail_from: str, rcpt: str, data: bytes) -> tuple[int, str]:
    with relay.smtp() as c:
        with pytest.raises(smtplib.SMTPDataError) as info:
            c.sendmail(mail_from, [rcpt], data)
    text = info.value.smtp_error
    return info.value.smtp_code, text.decode() if isinstance(text, bytes) else text


def delivered_to(sink: Sink, before: int, address: str) -> email.message.EmailMessage:
    got = sink.wait_for(before + 1)[before]
    assert got.rcpt_tos == [address]
    return email.message_from_bytes(got.data, policy=email.policy.default)  # type: ignore[return-value]


def log_rows(relay: RelayProcess, seller_ext_id: str) -> list[tuple[str, str | None, str | None, int, str | None]]:
    """The message log of one seller: (decision, reason, contact reason, proactive, order)."""
    assert relay.database is not None
    return relay.database.query("SELECT m.decision, m.reason, m.contact_reason, m.proactive, m.order_ext_id "
                                "FROM message_log m JOIN sellers s ON s.id = m.seller_id WHERE s.ext_id = ? "
                                "ORDER BY m.id", seller_ext_id)


def mime_message(from_: str, to: str, subject: str, text: str, files: list[tuple[str, str, bytes]]) -> bytes:
    parts = [b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             + text.encode() + b"\r\n"]
    for name, ctype, data in files:
        parts.append(f'--b1\r\nContent-Type: {ctype}; name="{name}"\r\n'
                     f'Content-Disposition: attachment; filename="{name}"\r\n'
                     "Content-Transfer-Encoding: base64\r\n\r\n".encode()
                     + base64.encodebytes(data).replace(b"\n", b"\r\n"))
    return (f"From: {from_}\r\nTo: {to}\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n').encode() + b"".join(parts) + b"--b1--\r\n"


@pytest.fixture(scope="module")
def relay(tmp_path_factory, sink):
    r = make_relay(tmp_path_factory.mktemp("policy"), sink_port=sink.port, extra=AUTH_OFF + POLICY)
    r.start()
    yield r
    assert r.stop() == 0
    assert "Traceback" not in r.log()


# -- orders -------------------------------------------------------------------------------

def test_cancelled_order_refused_with_contact_us(relay, sink):
    p = Pair(relay, "cancel", orders=(("100-0000001-0000001", "canceled"),))
    before = len(sink.messages)
    code, text = refused(relay, p.seller, p.buyer_alias,
                         message(p.seller, p.buyer_alias, subject="About order 100-0000001-0000001"))
    assert code == 550 and text.startswith("5.7.1 ")
    assert "cancelled" in text and "Contact Us" in text and "100-0000001-0000001" in text
    assert p.buyer not in text
    assert len(sink.messages) == before
    # The refusal's log row is written by the writer's next group, which the refusal does not wait for.
    logged = [("refused", "order.canceled", None, 1, "100-0000001-0000001")]
    until(lambda: log_rows(relay, p.seller_id) == logged, "the refusal's log row")


@pytest.mark.parametrize("status, expected", [
    ("pending", ["additional_info", "customization", "unexpected_problem"]),
    ("unshipped", ["additional_info", "customization", "unexpected_problem"]),
    ("shipped", ["unexpected_problem", "delivery_scheduling", "shipping_address", "return_refund", "invoice"]),
    ("delivered", ["unexpected_problem", "delivery_scheduling", "shipping_address", "return_refund", "invoice"]),
    ("canceled", []),
])
def test_reasons_for_each_order_status(relay, status, expected):
    order_id = f"200-{['pending', 'unshipped', 'shipped', 'delivered', 'canceled'].index(status)}000000-0000002"
    p = Pair(relay, f"reasons-{status}", orders=((order_id, status, iso(3) if status == "delivered" else ""),))
    res = relay.cli("reasons", order_id, "--json")
    data = json.loads(res.stdout)
    assert data["status"] == status and data["order_id"] == order_id
    assert [r["id"] for r in data["reasons"]] == sorted(expected, key=_label_order)
    assert {r["id"] for r in data["reasons"] if r["critical"]} == \
        set(expected) & {"customization", "delivery_scheduling", "shipping_address"}
    text = relay.cli("reasons", order_id).stdout
    if expected:
        assert all(r in text for r in expected)
    else:
        assert "Contact Us" in text
    del p


def _label_order(reason: str) -> int:
    return ["additional_info", "customization", "unexpected_problem", "delivery_scheduling",
            "shipping_address", "return_refund", "invoice"].index(reason)


def test_reasons_category_table_from_config(relay):
    Pair(relay, "furniture", orders=(("200-9000000-0000009", "unshipped", "", "furniture"),))
    data = json.loads(relay.cli("reasons", "200-9000000-0000009", "--json").stdout)
    assert [r["id"] for r in data["reasons"]] == [
        "additional_info", "customization", "unexpected_problem", "delivery_scheduling"]


# -- opt-out ------------------------------------------------------------------------------

def test_opted_out_buyer(relay, sink, tmp_path):
    order_id = "300-0000003-0000003"
    p = Pair(relay, "optout", opt_out=True, orders=((order_id, "shipped"),))
    before = len(sink.messages)
    # A message the seller starts is refused, and says how to send a critical one.
    code, text = refused(relay, p.seller, p.buyer_alias,
                         message(p.seller, p.buyer_alias, subject=f"Order {order_id}: a coupon"))
    assert code == 550 and "opted out" in text and f"bsm-relay send {order_id} --reason" in text
    assert len(sink.messages) == before

    # The buyer starts a thread; the seller's reply on it is delivered.
    send(relay, p.buyer, p.seller_alias,
         message(p.buyer, p.seller_alias, subject="Where is my parcel?", body="Any news?\r\n",
                 extra_headers="Message-ID: <q1@mail-optout.example>\r\n"))
    to_seller = delivered_to(sink, before, p.seller)
    minted = to_seller["Message-ID"].strip("<>")
    send(relay, p.seller, p.buyer_alias,
         message(p.seller, p.buyer_alias, subject="Re: Where is my parcel?", body="It ships today.\r\n",
                 extra_headers=f"In-Reply-To: <{minted}>\r\nReferences: <{minted}>\r\n"))
    answer = delivered_to(sink, before + 1, p.buyer)
    assert answer["In-Reply-To"] == "<q1@mail-optout.example>"
    assert answer.get_content().strip() == "It ships today."

    # A critical reason through the Contact Buyer path is delivered; a non-critical one is not.
    body = tmp_path / "body.txt"
    body.write_text("Could you confirm a delivery day next week?\n")
    res = relay.cli("send", order_id, "--reason", "delivery_scheduling", "--body-file", str(body), "--json")
    queued = json.loads(res.stdout)
    assert queued["queued"] is True and queued["queue_id"].startswith("q")
    critical = delivered_to(sink, before + 2, p.buyer)
    assert critical["Subject"] == f"Delivery scheduling - order {order_id}"
    assert critical["From"].addresses[0].addr_spec == p.seller_alias
    assert "confirm a delivery day" in critical.get_content()
    assert p.seller not in critical.as_string()
    res = relay.cli("send", order_id, "--reason", "invoice", "--body-file", str(body), check=False)
    assert res.returncode == 1 and "opted out" in res.stderr
    assert len(sink.messages) == before + 3
    assert log_rows(relay, p.seller_id) == [
        ("refused", "optout.refused", None, 1, order_id),        # bound to the pair's only open order
        ("accepted", None, None, 0, None),                       # the buyer's message
        ("accepted", None, None, 0, None),                       # the reply: not proactive, not counted
        ("accepted", None, "delivery_scheduling", 1, order_id),
        ("refused", "optout.refused", "invoice", 1, order_id),
    ]


# -- attachments --------------------------------------------------------------------------

def test_exe_renamed_pdf_refused(relay, sink):
    p = Pair(relay, "exe", orders=(("400-0000004-0000004", "unshipped"),))
    before = len(sink.messages)
    data = mime_message(p.seller, p.buyer_alias, "Order 400-0000004-0000004 invoice", "See the invoice.",
                        [("invoice.pdf", "application/pdf", EXE)])
    code, text = refused(relay, p.seller, p.buyer_alias, data)
    assert code == 550 and "invoice.pdf" in text and "executable" in text and "PDF" in text
    assert len(sink.messages) == before


def test_six_attachments_refused(relay, sink):
    p = Pair(relay, "six", orders=(("400-0000006-0000006", "unshipped"),))
    before = len(sink.messages)
    files = [(f"page{i}.pdf", "application/pdf", PDF) for i in range(6)]
    code, text = refused(relay, p.seller, p.buyer_alias,
                         mime_message(p.seller, p.buyer_alias, "Order 400-0000006-0000006", "Pages.", files))
    assert code == 550 and "6 attachments" in text and "at most 5" in text
    # Five pass.
    send(relay, p.seller, p.buyer_alias,
         mime_message(p.seller, p.buyer_alias, "Order 400-0000006-0000006", "Pages.", files[:5]))
    msg = delivered_to(sink, before, p.buyer)
    assert len(list(msg.iter_attachments())) == 5


def test_docx_and_pdf_delivered_untouched(relay, sink):
    p = Pair(relay, "docx", orders=(("400-0000007-0000007", "unshipped"),))
    before = len(sink.messages)
    docx = docx_bytes()
    # The text is masked (the seller's address), the files are not touched.
    data = mime_message(p.seller, p.buyer_alias, "Order 400-0000007-0000007 files",
                        f"Specs attached. Questions: {p.seller}", [
                            ("spec.docx", "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
                             docx), ("label.pdf", "application/pdf", PDF)])
    send(relay, p.seller, p.buyer_alias, data)
    msg = delivered_to(sink, before, p.buyer)
    files = {part.get_filename(): part.get_content() for part in msg.iter_attachments()}
    assert files == {"spec.docx": docx, "label.pdf": PDF}
    assert msg.get_body(("plain",)).get_content().strip() == "Specs attached. Questions: [email removed]"
    raw = sink.messages[before].data
    assert p.seller.encode() not in raw
    # As transmitted, too: the attachment parts are the sender's bytes.
    assert data[data.index(b'--b1\r\nContent-Type: application/vnd'):] in raw


# -- content ------------------------------------------------------------------------------

def test_masking_in_multipart_qp_latin1_and_html(relay, sink):
    order_id = "500-0000005-0000005"
    p = Pair(relay, "mask", orders=((order_id, "unshipped"),))
    before = len(sink.messages)
    plain = (f"Grüße aus Köln! Ihre Bestellung {order_id} ist fertig. Fragen? Schreiben Sie an "
             "kontakt@laden.example oder rufen Sie +49 221 1234567 an. À bientôt, señor.")
    html = ("<html><body><p>Grüße aus Köln!</p><p>Mail: <a href=\"mailto:kontakt@laden.example\">"
            "kontakt@laden.example</a> — Tel. +49 221 1234567</p>"
            "<img src=\"https://tracker.example/pixel.gif\"></body></html>")
    qp = quopri.encodestring(plain.encode("iso-8859-1")).replace(b"\n", b"\r\n")
    data = (f"From: {p.seller}\r\nTo: {p.buyer_alias}\r\nSubject: Ihre Bestellung\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/alternative; boundary="alt-42"\r\n\r\n'
            "--alt-42\r\nContent-Type: text/plain; charset=ISO-8859-1\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode() + qp + (
            b"\r\n--alt-42\r\nContent-Type: text/html; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n\r\n") + \
        quopri.encodestring(html.encode()).replace(b"\n", b"\r\n") + b"\r\n--alt-42--\r\n"
    send(relay, p.seller, p.buyer_alias, data)
    msg = delivered_to(sink, before, p.buyer)
    raw = sink.messages[before].data
    for secret in (b"kontakt@laden.example", b"1234567", b"tracker.example"):
        assert secret not in raw
    assert not msg.defects
    text_part = msg.get_body(("plain",))
    assert text_part.get_content_charset() == "iso-8859-1"
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_part.get_content() == plain.replace("kontakt@laden.example", "[email removed]") \
        .replace("+49 221 1234567", "[phone removed]")
    html_part = msg.get_body(("html",))
    shown = html_part.get_content()
    assert "Grüße aus Köln!" in shown and "[email removed]" in shown and "[phone removed]" in shown
    assert "<img" not in shown and shown.startswith("<html><body><p>Grüße aus Köln!</p>")


def test_link_to_a_domain_not_allowed_is_refused(relay, sink):
    order_id = "500-0000008-0000008"
    p = Pair(relay, "link", orders=((order_id, "shipped"),))
    before = len(sink.messages)
    code, text = refused(relay, p.seller, p.buyer_alias, message(
        p.seller, p.buyer_alias, subject=f"Order {order_id}",
        body="Track it at https://cheap-deals.example/track?id=1\r\n"))
    assert code == 550 and "cheap-deals.example" in text and "not allowed" in text
    assert len(sink.messages) == before
    # A carrier's tracking page is fine.
    send(relay, p.seller, p.buyer_alias, message(
        p.seller, p.buyer_alias, subject=f"Order {order_id}",
        body="Track it at https://www.ups.com/track?tracknum=1Z999\r\n"))
    assert "https://www.ups.com/track?tracknum=1Z999" in delivered_to(sink, before, p.buyer).get_content()


# -- review requests ----------------------------------------------------------------------

def test_review_request_once_inside_the_window(relay, sink):
    inside, late, early = "600-0000006-0000001", "600-0000006-0000002", "600-0000006-0000003"
    p = Pair(relay, "review", locale="de-DE", orders=((inside, "delivered", iso(10)), (late, "delivered", iso(31.5)),
                                                       (early, "delivered", iso(2))))
    before = len(sink.messages)
    res = relay.cli("review-request", inside, "--json")
    assert json.loads(res.stdout)["queued"] is True
    msg = delivered_to(sink, before, p.buyer)
    assert msg["Subject"] == f"Ihre Bestellung {inside}: Wie war es?"      # the buyer's locale
    assert f"vielen Dank für Ihre Bestellung {inside} bei Shop review" in msg.get_content()
    # The second is refused, by command and by email.
    res = relay.cli("review-request", inside, check=False)
    assert res.returncode == 1 and "already sent" in res.stderr
    code, text = refused(relay, p.seller, p.buyer_alias, message(
        p.seller, p.buyer_alias, subject=f"Order {inside}",
        body="Please leave a review for your order!\r\n"))
    assert code == 550 and "review request" in text and "already sent" in text
    # Outside the window: too late, too early.
    res = relay.cli("review-request", late, check=False)
    assert res.returncode == 1 and "too late" in res.stderr and "from 5 to 30 days" in res.stderr
    res = relay.cli("review-request", early, check=False)
    assert res.returncode == 1 and "too early" in res.stderr
    assert len(sink.messages) == before + 1
    # Refused requests leave the order free for a later, valid one.
    assert relay.database is not None
    stamps = dict(relay.database.query("SELECT ext_id, review_requested_at FROM orders WHERE ext_id IN (?, ?, ?)",
                                       inside, late, early))
    assert stamps[inside] is not None and stamps[late] is None and stamps[early] is None


def test_review_request_falls_back_to_english(relay, sink):
    order_id = "600-0000006-0000004"
    p = Pair(relay, "review-xx", locale="xx", orders=((order_id, "delivered", iso(6)),))
    before = len(sink.messages)
    relay.cli("review-request", order_id)
    assert delivered_to(sink, before, p.buyer)["Subject"] == f"Your order {order_id}: how did it go?"


# -- the volume cap -----------------------------------------------------------------------

def test_volume_cap_at_its_boundary(tmp_path, sink):
    r = make_relay(tmp_path, sink_port=sink.port,
                   extra=AUTH_OFF + "\n[policy]\nvolume_base = 2\nvolume_per_order_factor = 0\n")
    r.start()
    try:
        order_id = "700-0000007-0000007"
        p = Pair(r, "cap", orders=((order_id, "unshipped"),))
        before = len(sink.messages)
        for i in range(2):   # the 2nd message of the day is the last that passes
            send(r, p.seller, p.buyer_alias, message(p.seller, p.buyer_alias, subject=f"Order {order_id} #{i}"))
        sink.wait_for(before + 2)
        with r.smtp() as c:
            with pytest.raises(smtplib.SMTPDataError) as info:
                c.sendmail(p.seller, [p.buyer_alias],
                           message(p.seller, p.buyer_alias, subject=f"Order {order_id} #3"))
        assert info.value.smtp_code == 450
        assert info.value.smtp_error.decode().startswith("4.7.1 ") and b"limit of 2" in info.value.smtp_error
        # Replies on a thread the buyer started are neither limited nor counted.
        send(r, p.buyer, p.seller_alias, message(p.buyer, p.seller_alias, subject="Question"))
        minted = delivered_to(sink, before + 2, p.seller)["Message-ID"].strip("<>")
        send(r, p.seller, p.buyer_alias, message(p.seller, p.buyer_alias, subject="Re: Question",
                                                 extra_headers=f"In-Reply-To: <{minted}>\r\n"))
        assert delivered_to(sink, before + 3, p.buyer)["Subject"] == "Re: Question"
    finally:
        assert r.stop() == 0
    assert "Traceback" not in r.log()
