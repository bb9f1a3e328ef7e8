"""Sender approval (Messaging Permissions): may this From address write to this alias?

Pure: the relay looks up the address's status and hands it in.
"""

from __future__ import annotations

from enum import StrEnum

from .decision import ACCEPT, Decision, refuse


class SenderStatus(StrEnum):
    PRIMARY = "primary"     # the seller's primary address: always approved
    APPROVED = "approved"
    PENDING = "pending"
    BLOCKED = "blocked"
    UNKNOWN = "unknown"     # never seen: the relay records it as pending


def seller_sender(address: str, status: SenderStatus) -> Decision:
    """Mail to a buyer alias: the From must be approved for the alias's seller."""
    if status in (SenderStatus.PRIMARY, SenderStatus.APPROVED):
        return ACCEPT
    if status is SenderStatus.BLOCKED:
        return refuse("sender.blocked", address=address)
    return refuse("sender.not_approved", address=address)


def buyer_sender(address: str, buyer_address: str) -> Decision:
    """Mail to a seller alias: only the pair's buyer may write to it."""
    if address.lower() == buyer_address.lower():
        return ACCEPT
    return refuse("sender.not_buyer", address=address)


def records_as_pending(status: SenderStatus) -> bool:
    """An address that tries to send and is not approved becomes (or stays) pending."""
    return status in (SenderStatus.UNKNOWN, SenderStatus.PENDING)
