"""The Contact Buyer commands: ``reasons``, ``send`` and ``review-request``.

``send`` and ``review-request`` compose a message from the seller's primary address
to the pair's buyer alias and run it through the same intake, policy stage and
queue as mail arriving over SMTP (with the order and the contact reason known, and
no SPF/DKIM to check: the marketplace authenticated the seller).  A refusal prints
the catalogue's sentence and exits 1.  Registered from :func:`bsm_relay.relay.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formataddr, formatdate
from pathlib import Path
from string import Template
from typing import Any

from ..aliases.codec import Direction
from ..config import settings as config
from ..policy.facts import Order
from ..policy.optout import OptOutRules
from ..policy.orders import REVIEW_REQUEST, reasons_for
from ..policy.reasons import reply_for
from . import intake
from .marketplace import policy_config, policy_order
from .server import open_relay
from .store import StoreError

TEMPLATES = Path(__file__).parent / "templates"
DEFAULT_LOCALE = "en"


def _fail(message: str) -> None:
    from .cli import CommandError  # cli imports this module: import at call time
    raise CommandError(message)


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str) if args.json else text)


async def _relay_for_sending(s: config.Settings) -> Any:
    relay = await open_relay(s)
    relay.enqueuer.start()
    return relay


async def _close(relay: Any) -> None:
    await relay.enqueuer.stop()
    await relay.engine.dispose()


async def _order_row(relay: Any, order_id: str) -> Any:
    row = await relay.store.order(order_id)
    if row is None:
        raise StoreError(f"no order {order_id}")
    return row


# -- reasons ----------------------------------------------------------------------------

async def cmd_reasons(s: config.Settings, args: argparse.Namespace) -> None:
    relay = await open_relay(s)
    try:
        row = await _order_row(relay, args.order_id)
    finally:
        await relay.engine.dispose()
    rules = policy_config(s)
    order = policy_order(row)
    critical = set(rules.optout.critical_reasons)
    reasons = [{"id": r.id, "label": r.label, "critical": r.id in critical}
               for r in reasons_for(order, rules.orders)]
    data = {"order_id": order.order_id, "status": order.status.value, "category": order.category,
            "reasons": reasons}
    if reasons:
        lines = [f"contact reasons for order {order.order_id} ({order.status.value}):"]
        lines += [f"  {r['id']:22} {r['label']}{'  (critical)' if r['critical'] else ''}" for r in reasons]
    else:
        lines = [f"order {order.order_id} is {order.status.value}: no contact reasons; questions about it "
                 "go through the marketplace's customer service (Contact Us)"]
    _print(args, data, "\n".join(lines))


# -- composing and submitting ----------------------------------------------------------------

def compose(seller: Any, alias: str, subject: str, text: str,
            attachments: list[tuple[str, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    """The message as the seller's own client would send it: From the primary address."""
    msg = EmailMessage(policy=SMTP)
    msg["From"] = formataddr((seller.name, seller.email))
    msg["To"] = alias
    msg["Subject"] = subject
    msg["Date"] = formatdate(usegmt=True)
    msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    for name, data in attachments:
        declared = mimetypes.guess_type(name)[0] or "application/octet-stream"
        maintype, _, subtype = declared.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    content = msg.as_bytes(policy=SMTP)
    return content if content.endswith(b"\r\n") else content + b"\r\n"


async def submit(relay: Any, row: Any, order: Order, contact_reason: str, subject: str, text: str,
                 attachments: list[tuple[str, bytes]] = ()) -> intake.Outcome:  # type: ignore[assignment]
    """Run a composed seller message for ``row`` (a stored order) through intake."""
    seller = await relay.store.seller(id=row.seller_id)
    buyer = await relay.store.buyer(id=row.buyer_id)
    if seller is None or buyer is None:
        raise StoreError(f"order {row.ext_id} has no seller or buyer")
    # Resolved exactly as smtpd resolves a RCPT to the buyer alias.
    alias = relay.alias(Direction.TO_BUYER, seller.id, buyer.id)
    token = alias.partition("@")[0]
    ref = relay.codec.decode(token)
    if ref is None or await relay.store.is_revoked(token):
        raise StoreError(f"the buyer alias of order {row.ext_id} is revoked")
    recipient = intake.Recipient(alias.lower(), ref, seller, buyer)
    content = compose(seller, alias, subject, text, attachments)
    tx = intake.Transaction(session_id="cmd-" + secrets.token_hex(5), mail_from=seller.email,
                            recipients=[recipient], content=content, contact_reason=contact_reason,
                            order_hint=order, local=True)
    return await intake.process(relay, tx)


def _report(args: argparse.Namespace, outcome: intake.Outcome, order_id: str, reason: str) -> None:
    if outcome.decision.accepted:
        qid = outcome.queue_ids[0]
        _print(args, {"queued": True, "queue_id": qid, "order_id": order_id, "contact_reason": reason},
               f"queued as {qid}")
        return
    sentence = reply_for(outcome.decision)
    if args.json:
        _print(args, {"queued": False, "reason": outcome.decision.reason, "reply": sentence,
                      "order_id": order_id, "contact_reason": reason}, "")
    _fail(sentence)


def subject_for(reason_label: str, order_id: str) -> str:
    return f"{reason_label} - order {order_id}"


# -- send ---------------------------------------------------------------------------------

async def cmd_send(s: config.Settings, args: argparse.Namespace) -> None:
    try:
        text = Path(args.body_file).read_text("utf-8")
        files = [(Path(p).name, Path(p).read_bytes()) for p in args.attach or ()]
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {getattr(exc, 'filename', None) or args.body_file}: "
              f"{exc.strerror if isinstance(exc, OSError) else 'the body file is not UTF-8 text'}")
        return
    rules = policy_config(s)
    label = rules.orders.reason_labels.get(args.reason, "Message")
    relay = await _relay_for_sending(s)
    try:
        row = await _order_row(relay, args.order_id)
        outcome = await submit(relay, row, policy_order(row), args.reason,
                               subject_for(label, row.ext_id), text, files)
    finally:
        await _close(relay)
    _report(args, outcome, args.order_id, args.reason)


# -- review-request ------------------------------------------------------------------------

def review_template(locale: str | None) -> tuple[str, str]:
    """(subject template, body template) for the buyer's locale ("de-DE" reads "de"), else English."""
    lang = (locale or DEFAULT_LOCALE).replace("_", "-").split("-")[0].lower()
    path = TEMPLATES / f"review_request.{lang}.txt"
    if not lang.isalpha() or not path.is_file():
        path = TEMPLATES / f"review_request.{DEFAULT_LOCALE}.txt"
    subject, _, body = path.read_text("utf-8").partition("\n")
    return subject.strip(), body.lstrip("\n")


async def cmd_review_request(s: config.Settings, args: argparse.Namespace) -> None:
    relay = await _relay_for_sending(s)
    try:
        row = await _order_row(relay, args.order_id)
        seller = await relay.store.seller(id=row.seller_id)
        buyer = await relay.store.buyer(id=row.buyer_id)
        if seller is None or buyer is None:
            raise StoreError(f"order {row.ext_id} has no seller or buyer")
        subject_t, body_t = review_template(buyer.locale)
        values = {"order_id": row.ext_id, "seller_name": seller.name}
        subject = Template(subject_t).safe_substitute(values)
        text = Template(body_t).safe_substitute(values)
        order = policy_order(row)
        # Claimed before sending, released if it is not sent: two runs at once send one request.
        at = time.time()
        claimed = not order.review_request_sent and await relay.store.claim_review_request(row.ext_id, at)
        if not claimed:
            order = replace(order, review_request_sent=True)
        try:
            outcome = await submit(relay, row, order, REVIEW_REQUEST, subject, text)
        except BaseException:
            if claimed:
                await relay.store.release_review_request(row.ext_id, at)
            raise
        if claimed and not outcome.decision.accepted:
            await relay.store.release_review_request(row.ext_id, at)
    finally:
        await _close(relay)
    _report(args, outcome, args.order_id, REVIEW_REQUEST)


# -- registration ------------------------------------------------------------------------------

def register(sub: Any, cmd: Callable[..., Any]) -> None:
    """Add the commands to ``bsm-relay``'s subparsers, with cli's ``cmd`` helper."""
    sp = cmd(sub, "reasons", cmd_reasons, "list the contact reasons available for an order now")
    sp.add_argument("order_id")
    sp = cmd(sub, "send", cmd_send,
             "send a message to the buyer of an order (Contact Buyer), through the marketplace rules")
    sp.add_argument("order_id")
    sp.add_argument("--reason", required=True,
                    help="contact reason id (see: bsm-relay reasons ORDER_ID); critical reasons "
                         f"({', '.join(OptOutRules().critical_reasons)} by default) reach opted-out buyers")
    sp.add_argument("--body-file", required=True, help="the message text, UTF-8")
    sp.add_argument("--attach", action="append", metavar="FILE", help="attach a file (repeatable)")
    sp = cmd(sub, "review-request", cmd_review_request,
             "send the marketplace's review request for an order (once, 5 to 30 days after delivery)")
    sp.add_argument("order_id")
