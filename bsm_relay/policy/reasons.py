"""The one catalogue of every answer the relay gives.

Reason code -> SMTP reply code, enhanced status code (RFC 3463) and the sentence
the sender reads.  Sellers see these sentences inside their own provider's bounce,
so each says plainly what happened and what to do, and none ever carries the other
party's real address (only the sender's own address or an alias may be filled in).

The same reason codes are the closed vocabulary of the log (``reason=`` on
``smtp.rejected`` and friends).  No SMTP reply text is written anywhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .decision import Decision


@dataclass(frozen=True, slots=True)
class Reason:
    code: int
    status: str
    text: str

    def reply(self, params: Mapping[str, str] | None = None) -> str:
        text = self.text.format_map(_Safe(params or {}))
        # A reply line must stay printable ASCII on one line.
        if not (text.isascii() and text.isprintable()):
            text = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
        return f"{self.code} {self.status} {text}"


class _Safe(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return "?"


REASONS: dict[str, Reason] = {
    # -- accepted -----------------------------------------------------------
    "ok.sender": Reason(250, "2.1.0", "Sender OK"),
    "ok.recipient": Reason(250, "2.1.5", "Recipient OK"),
    "ok.queued": Reason(250, "2.0.0", "Message accepted for delivery as {queue_id}"),
    "ok.bounce": Reason(250, "2.0.0", "Delivery report received"),
    # -- recipients ------------------------------------------------------------
    "rcpt.relay_denied": Reason(
        550, "5.7.1", "Relaying denied: this server only accepts mail for {domain} aliases"),
    "rcpt.syntax": Reason(
        550, "5.1.3", "Recipient address rejected: only plain alias addresses are accepted here"),
    "rcpt.unknown": Reason(550, "5.1.1", "Recipient address rejected: no such alias"),
    "rcpt.too_many": Reason(452, "4.5.3", "Too many recipients for one message; send the rest separately"),
    "rcpt.too_many_invalid": Reason(421, "4.7.0", "Too many invalid recipients; closing the connection"),
    "rcpt.need_mail": Reason(503, "5.5.1", "Error: need MAIL command first"),
    "rcpt.bad_bounce": Reason(550, "5.1.1", "Recipient address rejected: no such bounce address"),
    # -- senders (envelope and header From) ---------------------------------
    "mail.syntax": Reason(553, "5.1.7", "Sender address rejected: malformed address"),
    "mail.too_big": Reason(552, "5.3.4", "Message size exceeds the limit of {limit} bytes"),
    "from.missing": Reason(550, "5.7.1", "The message has no From header; add one and send it again"),
    "from.ambiguous": Reason(
        550, "5.7.1",
        "The From header must name exactly one mailbox; it names none, several, or is ambiguous. "
        "Send the message again with a single plain From address"),
    "sender.not_approved": Reason(
        550, "5.7.1",
        "The address {address} is not approved for this seller account. The seller can approve it "
        "under Messaging Permissions (or: bsm-relay sender approve), then send the message again"),
    "sender.blocked": Reason(
        550, "5.7.1",
        "The address {address} is blocked for this seller account; the seller can unblock it under "
        "Messaging Permissions"),
    "sender.not_buyer": Reason(
        550, "5.7.1",
        "The address {address} may not write to this alias: only the buyer of this conversation can "
        "reply to it. Reply from the address the message was sent to"),
    "sender.too_many_approved": Reason(
        550, "5.7.1", "This seller account already has the maximum number of approved addresses"),
    # -- sender authenticity (SPF / DKIM / DMARC alignment) --------------------
    "auth.failed": Reason(
        550, "5.7.26",
        "The message from {address} did not pass SPF or DKIM for {domain}; send it from your mail "
        "provider directly"),
    "auth.temperror": Reason(
        451, "4.7.5", "Could not verify the sender's SPF or DKIM records right now; try again later"),
    # -- connections (PROXY protocol) -------------------------------------------
    # Logged, never sent: with [smtp] proxy_protocol on, a peer that is not a trusted proxy is
    # disconnected before the greeting (a PROXY client must not be spoken to first).
    "proxy.untrusted": Reason(421, "4.7.0", "Connections are accepted only through the configured proxies"),
    # -- content and protocol --------------------------------------------------
    "msg.bad_line_ending": Reason(
        550, "5.6.0", "Message refused: bare CR, bare LF or NUL characters are not allowed in mail"),
    "msg.line_too_long": Reason(500, "5.5.2", "Line too long"),
    "msg.too_big": Reason(552, "5.3.4", "Message size exceeds the limit of {limit} bytes"),
    "msg.malformed": Reason(554, "5.6.0", "Message refused: the message structure could not be parsed"),
    "msg.loop": Reason(554, "5.4.6", "Mail loop detected: too many hops"),
    "msg.own_loop": Reason(554, "5.4.6", "Mail loop detected: this message already passed through this relay"),
    # -- the relay's own trouble -------------------------------------------------
    "local.error": Reason(451, "4.3.0", "Local error in processing; try again later"),
    "local.storage": Reason(451, "4.3.0", "Temporary storage problem; try again later"),
    "local.shutting_down": Reason(421, "4.3.2", "Service shutting down; try again later"),
    # -- queue backpressure (issue 7: [queue] max_depth): delivery is behind, acceptance waits ----
    "queue.full": Reason(
        452, "4.3.1", "Too much mail is waiting for delivery here right now; try again later"),
    # -- connection and session limits (issue 6: [smtp] max_sessions, max_sessions_per_ip,
    #    max_invalid_commands, timeout, data_timeout) --------------------------------------
    "conn.too_many_sessions": Reason(421, "4.7.0", "Too many connections; try again later"),
    "conn.too_many_from_ip": Reason(421, "4.7.0", "Too many connections from your address; try again later"),
    "conn.too_many_invalid": Reason(421, "4.7.0", "Too many invalid commands; closing the connection"),
    "conn.timeout": Reason(421, "4.4.2", "Timeout exceeded; closing the connection"),
    # -- hardening (issue 8: the acceptance catalogue, docs/catalogue.md) ------------------
    # [smtp] junk_command_limit: NOOP, VRFY, EXPN, HELP, ETRN per session (catalogue P19).
    "conn.too_many_junk": Reason(421, "4.7.0", "Too many commands without mail; closing the connection"),
    # [storage] min_free_bytes: little space left for the queue, answered at MAIL (catalogue D3).
    "storage.low_space": Reason(452, "4.3.1", "Insufficient system storage; try again later"),
    # Delivery, not a reply we give: the diagnostic of a DSN when the next hop does not offer
    # 8BITMIME and the message has 8-bit bytes (catalogue C5, docs/decisions/0009).
    "delivery.needs_8bitmime": Reason(
        554, "5.6.3", "The receiving server does not accept 8-bit mail and the message could not be converted"),
    # -- marketplace rules --------------------------------------------------------
    "order.missing": Reason(
        550, "5.7.1",
        "Could not tell which order this message is about. Put the order number (for example "
        "{example}) in the subject and send the message again"),
    "order.unknown": Reason(
        550, "5.7.1",
        "Order {order_id} is not an order this buyer placed with your account. Check the order "
        "number in the subject and send the message again"),
    "order.canceled": Reason(
        550, "5.7.1",
        "Order {order_id} is cancelled, so messages about it are not delivered. Questions about "
        "cancelled orders go through the marketplace's customer service (Contact Us)"),
    "order.reason_unknown": Reason(
        550, "5.7.1",
        "Unknown contact reason {contact_reason}. Use one of: {known}"),
    "order.reason_unavailable": Reason(
        550, "5.7.1",
        "The contact reason {contact_reason} is not available for order {order_id} while it is {status}. "
        "Available now: {available} (see: bsm-relay reasons {order_id})"),
    "order.window_closed": Reason(
        550, "5.7.1",
        "Order {order_id} was delivered more than {days} days ago. You may write to a buyer about "
        "an order from when it is placed until {days} days after delivery; you can still reply "
        "to messages the buyer sends you"),
    "optout.refused": Reason(
        550, "5.7.1",
        "This buyer has opted out of unsolicited messages, so this message was not delivered. "
        "Replies to the buyer's own messages still go through. To send a critical message "
        "({critical}), use the Contact Buyer page or: bsm-relay send {order_id} --reason REASON"),
    "attach.too_many": Reason(
        550, "5.7.1",
        "The message has {count} attachments; at most {limit} are allowed. Send fewer files, or "
        "spread them over several messages"),
    "attach.too_big": Reason(
        550, "5.7.1",
        "The attachments add up to {size_mb} MB; at most {limit_mb} MB together are allowed. "
        "Send smaller or fewer files"),
    "attach.type": Reason(
        550, "5.7.1",
        "The attachment {filename} is not an allowed file type (its content is: {kind}, whatever "
        "its name says). Allowed types: {allowed}. Send it in one of those formats"),
    "content.email": Reason(
        550, "5.7.1",
        "The message contains an email address, and addresses may not be shared in marketplace "
        "messages. Remove it and send the message again"),
    "content.phone": Reason(
        550, "5.7.1",
        "The message contains a phone number, and phone numbers may not be shared in marketplace "
        "messages. Remove it and send the message again"),
    "content.link": Reason(
        550, "5.7.1",
        "The message contains a link to {host}, which is not allowed. Only {schemes} links to the "
        "marketplace and carriers' tracking sites ({allowed}) are allowed. Remove the link and "
        "send the message again"),
    "content.remote_image": Reason(
        550, "5.7.1",
        "The message loads images or other content from the internet (such as tracking pixels), "
        "which is not allowed. Attach the images instead and send the message again"),
    "content.too_long": Reason(
        554, "5.6.0",
        "The message text is {length} characters long; at most {limit} are allowed. Shorten it, "
        "or attach the text as a PDF or text file"),
    "review.no_order": Reason(
        550, "5.7.1",
        "A review request must name an order: bsm-relay review-request ORDER_ID"),
    "review.already_sent": Reason(
        550, "5.7.1",
        "A review request for order {order_id} was already sent; only one is allowed per order"),
    "review.opted_out": Reason(
        550, "5.7.1",
        "This buyer has opted out of unsolicited messages, so no review request can be sent for "
        "order {order_id}"),
    "review.not_delivered": Reason(
        550, "5.7.1",
        "Order {order_id} has not been delivered yet. A review request can be sent from {start} "
        "days after delivery"),
    "review.too_early": Reason(
        550, "5.7.1",
        "It is too early to ask for a review of order {order_id}: a review request can be sent "
        "from {start} to {end} days after delivery. Try again later"),
    "review.too_late": Reason(
        550, "5.7.1",
        "It is too late to ask for a review of order {order_id}: a review request can be sent "
        "only from {start} to {end} days after delivery"),
    "review.ask_after_request": Reason(
        550, "5.7.1",
        "This message asks the buyer for a review, but the marketplace's review request for "
        "order {order_id} was already sent and only one is allowed per order. Remove the request "
        "and send the message again"),
    "volume.daily_cap": Reason(
        450, "4.7.1",
        "This seller account has reached its limit of {cap} new messages to buyers today; "
        "further messages are accepted again from tomorrow. Replies to buyers' messages are "
        "not limited"),
}


def reply_for(decision: Decision) -> str:
    """The full SMTP reply line for a refusal (``decision.reason`` must be set)."""
    assert decision.reason is not None
    return REASONS[decision.reason].reply(decision.params)


def reply(reason: str, **params: object) -> str:
    return REASONS[reason].reply({k: str(v) for k, v in params.items()})
