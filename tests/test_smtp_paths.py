"""The address fast paths read and write exactly what the libraries would: MAIL FROM in
(``RelaySMTP._getaddr``, against aiosmtpd's parser) and MAIL/RCPT out (``delivery._mail``/``_rcpt``).

The fast path takes the usual ``<dot-atom@dot-atom> params`` shape with a regex; everything
else goes to aiosmtpd's parser (the email package).  Over many generated paths, plain and
odd, both must give the same (address, parameters), local-part limit included.
"""

from __future__ import annotations

import random

import pytest
from aiosmtpd.smtp import SMTP

from bsm_relay.relay.smtpd import _PLAIN_PATH, RelaySMTP

ATEXT = "abcXYZ09!#$%&'*+/=?^_`{|}~-"
RESTS = ["", " SIZE=5", "x", "  A B ", " (c)", "\t", " a(b)", ' "x"', " a\\b", " BODY=8BITMIME SMTPUTF8  ",
         "\tSIZE=1\t", " SIZE=1 (comment)"]


def _paths(seed: int, count: int) -> list[str]:
    rnd = random.Random(seed)

    def dot_atom() -> str:
        return ".".join("".join(rnd.choice(ATEXT) for _ in range(rnd.randint(1, 5))) for _ in range(rnd.randint(1, 3)))
    out = []
    for _ in range(count):
        local = dot_atom() if rnd.random() < 0.9 else "a" * rnd.randint(60, 70)
        domain = dot_atom() if rnd.random() < 0.9 else rnd.choice(["[1.2.3.4]", "b..c", ".b", "b."])
        if rnd.random() < 0.1:
            local = rnd.choice(['"q r"', "a..b", ".a", "a b", "@x:a"])
        out.append(rnd.choice(["", " ", "\t"]) + f"<{local}@{domain}>" + rnd.choice(RESTS))
    return out


def _protocol(limit: int) -> RelaySMTP:
    proto = object.__new__(RelaySMTP)       # no connection: only the parser is exercised
    proto.local_part_limit = limit
    return proto


@pytest.mark.parametrize("limit", [0, 64])
def test_fast_path_agrees_with_aiosmtpd(limit):
    proto, fast = _protocol(limit), 0
    for path in _paths(limit + 1, 20_000):
        expected = SMTP._getaddr(proto, path)
        fast += _PLAIN_PATH.fullmatch(path) is not None
        assert proto._getaddr(path) == expected, path
    assert fast > 5_000         # the generator does exercise the fast path


def test_the_usual_shapes_take_the_fast_path():
    for path in ("<seller@acme.example>", "<a.b+c@mail.example.org> SIZE=2048 BODY=8BITMIME"):
        assert _PLAIN_PATH.fullmatch(path)
    assert _protocol(64)._getaddr("<seller@acme.example>  SIZE=2048") == ("seller@acme.example", "SIZE=2048")


def test_paths_the_email_package_trips_over_are_malformed_not_an_exception():
    proto = _protocol(64)
    for path in ("<#@[>", "<?_+@['}`#>", '<"c&=0"@[#.>'):
        with pytest.raises(AttributeError):
            SMTP._getaddr(proto, path)
        assert proto._getaddr(path) == (None, None)


def test_delivery_writes_plain_addresses_as_aiosmtplib_would():
    # Delivery's MAIL/RCPT fast path (delivery._PLAIN_ADDRESS) must send exactly the <address>
    # that aiosmtplib's quote_address makes of it; other addresses still go through aiosmtplib.
    from aiosmtplib.email import quote_address

    from bsm_relay.relay.delivery import _PLAIN_ADDRESS
    rnd, fast = random.Random(3), 0
    for _ in range(20_000):
        local = ".".join("".join(rnd.choice(ATEXT) for _ in range(rnd.randint(1, 5))) for _ in range(rnd.randint(1, 3)))
        domain = ".".join("".join(rnd.choice("abc09-") for _ in range(rnd.randint(1, 5))) for _ in range(2))
        address = f"{local}@{domain}"
        if _PLAIN_ADDRESS.fullmatch(address):
            fast += 1
            assert quote_address(address) == f"<{address}>", address
    assert fast == 20_000
    for odd in ('"a b"@c.d', "a@[1.2.3.4]", "<a@b.c>", "a b@c.d", "a@b.c SIZE=1", "jörg@b.c", ""):
        assert not _PLAIN_ADDRESS.fullmatch(odd), odd
