"""Coverage-guided fuzzing of the message parser and rewriter (atheris), for a fixed time.

Not part of ``make test``: see fuzz/README.md.  Each input is one message as it would arrive
after DATA.  The properties are those of tests/test_fuzz_properties.py: ``render`` either raises
the documented ``MalformedHeader`` (answered 554 5.6.0) or returns a message the stdlib parses,
with the body bytes kept, one Received (ours), and no real address in the fields we write;
``mime.walk``-level parsing (the policy stage) may refuse with ``MalformedMime`` and nothing else.
Any other exception, or a broken property, is a finding: atheris saves the input as crash-*.
"""

from __future__ import annotations

import email
import email.policy
import sys

try:
    import atheris
except ImportError:          # replaying saved inputs works without it: python fuzz/fuzz_rewrite.py FILE...
    atheris = None

if atheris is not None:
    with atheris.instrument_imports():
        from bsm_relay.relay import mime
        from bsm_relay.relay.headers import MalformedHeader, split_message
        from bsm_relay.relay.rewrite import RewritePlan, render
else:
    from bsm_relay.relay import mime
    from bsm_relay.relay.headers import MalformedHeader, split_message
    from bsm_relay.relay.rewrite import RewritePlan, render

SELLER = b"jane.seller@acme-shop.example"
ALIAS = "b7k2qxm4d9f3h8j2k5l7m1n4p6q8r2t5@marketplace.example"
PLAN = RewritePlan(from_display="Acme via Marketplace", from_alias=ALIAS, to_address="reader@inbox.example",
                   reply_to=ALIAS, message_id="0123abcd@marketplace.example", in_reply_to=[], references=[],
                   received="by mx.marketplace.example (bsm-relay) with ESMTP id q0123456789ab; "
                            "Fri, 27 Nov 2026 10:00:00 +0000",
                   date_if_missing="Fri, 27 Nov 2026 10:00:00 +0000")


def one_input(data: bytes) -> None:
    try:
        out = render(data, PLAN)
    except MalformedHeader:
        return
    head, body = split_message(out)
    assert body == split_message(data)[1], "body changed"
    assert head.count(b"\r") == head.count(b"\n") == head.count(b"\r\n"), "bare CR/LF in our header block"
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert len(msg.get_all("Received") or []) == 1, "not exactly one Received"
    for name in ("From", "Reply-To", "To", "Received", "Message-ID"):
        assert SELLER.decode() not in str(msg.get(name, "")).lower(), f"real address in {name}"
    # The policy stage's MIME walk: a refusal is MalformedMime (554 5.6.0), never anything else.
    try:
        mime.parse(*split_message(data))
    except (mime.MalformedMime, MalformedHeader):
        pass


def main() -> None:
    if atheris is None:
        for path in sys.argv[1:]:
            with open(path, "rb") as fh:
                one_input(fh.read())
            print(f"{path}: ok")
        return
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
