"""The value every policy rule returns: accept, or a refusal naming a reason code.

Rules never write SMTP text themselves: they name a reason code from
:mod:`bsm_relay.policy.reasons`, which owns the reply code, the enhanced status
and the sentence the sender reads. Pure, stdlib only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Decision:
    """Outcome of a rule: ``reason`` is ``None`` when the message may pass.

    ``params`` fill the placeholders of the reason's sentence (for example the
    address that was refused, or the window in days). They must never carry the
    *other* party's real address: the sentence goes back to the sender.
    """

    reason: str | None = None
    params: Mapping[str, str] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.reason is None


ACCEPT = Decision()


def refuse(reason: str, **params: object) -> Decision:
    return Decision(reason, {k: str(v) for k, v in params.items()})
