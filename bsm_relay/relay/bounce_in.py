"""Inbound bounces: a downstream's DSN that came back to a signed bounce address.

Every forwarded message leaves with ``MAIL FROM:<b-…@alias-domain>`` (``verp``).  When
the buyer's (or seller's) provider bounces it later, the DSN arrives here.  It is
never forwarded as it is (it would carry the real recipient's address and hosts):
it is matched to its queue item and turned into *our* DSN to the original, approved
sender, expressed in aliases.  Mail to a bounce address that is not a DSN (an
auto-reply sent to the envelope sender, say) is accepted and dropped: the relay
never answers automatic mail.
"""

from __future__ import annotations

import re
import time

from .context import Relay
from .notify import Failure, may_notify, notice_rows
from .queue import add_notice, get_item

_STATUS = re.compile(rb"^Status:\s*([245]\.\d{1,3}\.\d{1,3})", re.IGNORECASE | re.MULTILINE)
_DIAGNOSTIC = re.compile(rb"^Diagnostic-Code:\s*[^;\r\n]*;\s*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
                         re.IGNORECASE | re.MULTILINE)


async def is_known(relay: Relay, queue_id: str) -> bool:
    found = await get_item(relay.sessions, queue_id)
    return found is not None and found[0].kind == "forward"


async def handle(relay: Relay, queue_id: str, mail_from: str, content: bytes) -> str:
    """Returns what happened, for the log: ``notified``, ``ignored`` or ``already_failed``."""
    if mail_from not in ("", "<>"):
        return "ignored"                      # not a DSN: auto-replies and the like are dropped
    found = await get_item(relay.sessions, queue_id)
    if found is None:
        return "ignored"
    item, recipients = found
    pending = [r for r in recipients if r.status != "failed"]
    if not pending:
        return "already_failed"
    status_m = _STATUS.search(content)
    status = status_m.group(1).decode() if status_m else "5.0.0"
    if not status.startswith("5"):
        return "ignored"                      # a delay report: we keep waiting, so does the sender
    diag_m = _DIAGNOSTIC.search(content)
    diagnostic = diag_m.group(1).decode("utf-8", "replace") if diag_m else \
        "the recipient's mail server returned the message"
    if not may_notify(item.kind, item.envelope_from, item.origin_sender):
        return "ignored"
    assert item.origin_sender is not None
    failures = [Failure(r.address, r.alias, status, " ".join(diagnostic.split())) for r in pending]
    notice, rcpt = notice_rows(
        hostname=relay.settings.smtp.hostname, alias_domain=relay.settings.aliases.domain,
        origin_sender=item.origin_sender, original=item.body, created_at=item.created_at, now=time.time(),
        failures=failures, real_to_alias={r.address: r.alias for r in recipients})
    await add_notice(relay.enqueuer, notice, rcpt, fail_recipients_of=item.id, error=f"bounced later: {status}")
    relay.enqueuer.wakeup.set()
    return "notified"
