"""Our own notices about a queued message: RFC 3464 DSNs to the original sender.

Glue between the queue and the pure DSN builder (``bounce.build_dsn``): who may get a
notice (only the approved, authenticated sender of a forwarded message, never a
null or unverified sender: no backscatter), what it says (aliases only: the real
recipient address is replaced by the alias the sender wrote to), and the queue rows
that carry it (``MAIL FROM:<>``, kind ``notice``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from .bounce import FailedRecipient, build_dsn
from .headers import split_message
from .models import QueueItem, QueueRecipient
from .queue import mint_message_id, new_queue_id


@dataclass(frozen=True)
class Failure:
    address: str       # the real recipient (scrubbed from the notice)
    alias: str         # what the sender wrote to
    status: str        # RFC 3463, e.g. 5.1.1
    diagnostic: str    # the downstream's reply text
    action: str = "failed"   # failed | delayed


def may_notify(kind: str, envelope_from: str, origin_sender: str | None) -> bool:
    """Only forwarded mail from an approved, authenticated sender ever gets a notice."""
    return kind == "forward" and bool(envelope_from) and bool(origin_sender)


def notice_rows(*, hostname: str, alias_domain: str, origin_sender: str, original: bytes,
                created_at: float, now: float, failures: Sequence[Failure],
                real_to_alias: dict[str, str] | None = None,
                retry_until: float | None = None) -> tuple[QueueItem, QueueRecipient]:
    """``real_to_alias`` names every real recipient of the message (not only the failed ones):
    each is replaced by its alias wherever it appears in the notice."""
    header_block, _ = split_message(original)
    scrub: dict[str, str] = {}
    pairs = dict(real_to_alias or {})
    pairs.update({f.address: f.alias for f in failures})
    for address, alias in pairs.items():
        scrub[address] = alias
        local = address.rpartition("@")[0]
        if len(local) >= 3:
            scrub.setdefault(local, "[address removed]")
    until = datetime.fromtimestamp(retry_until, UTC) if retry_until else None
    dsn = build_dsn(
        reporting_mta=hostname, postmaster_from=f"mailer-daemon@{alias_domain}", to=origin_sender,
        original_headers=header_block,
        recipients=[FailedRecipient(f.alias, f.status, f.action, f.diagnostic,
                                    will_retry_until=until if f.action == "delayed" else None)
                    for f in failures],
        arrival=datetime.fromtimestamp(created_at, UTC), scrub=scrub,
        message_id=mint_message_id(alias_domain),
        now=datetime.fromtimestamp(now, UTC))
    qid = new_queue_id()
    item = QueueItem(id=qid, kind="notice", envelope_from="", origin_sender=None, body=dsn, size=len(dsn),
                     created_at=now, next_attempt_at=now, attempts=0, status="queued", errors=0,
                     delay_notified=False)
    return item, QueueRecipient(queue_id=qid, address=origin_sender, alias=origin_sender, status="pending")
