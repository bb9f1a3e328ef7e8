"""What the atheris harness (fuzz/fuzz_rewrite.py) found, kept as tests (catalogue issue 8).

Each fixed finding has a minimal input in fuzz/corpus/ (replayed here through the harness's own
checks, without atheris) and a unit test of the function that was wrong, the Subject's masking in
relay/marketplace.py included.
"""

from __future__ import annotations

import base64
import email
import email.policy
import importlib.util
import sys
from pathlib import Path

import pytest

from bsm_relay.policy.content import Action, ContentRules, mask_html, mask_part
from bsm_relay.relay import mime
from bsm_relay.relay.headers import split_message

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted((ROOT / "fuzz" / "corpus").iterdir())
SELLER = "jane.seller@acme-shop.example"
BUYER = "bob.buyer@real-mail.example"
PARTIES = (SELLER, BUYER)


@pytest.fixture(scope="module")
def harness():  # type: ignore[no-untyped-def]
    """fuzz/fuzz_rewrite.py, loaded without atheris (so nothing gets instrumented)."""
    saved = sys.modules.get("atheris", "absent")
    sys.modules["atheris"] = None  # type: ignore[assignment]
    try:
        spec = importlib.util.spec_from_file_location("fuzz_rewrite", ROOT / "fuzz" / "fuzz_rewrite.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved == "absent":
            del sys.modules["atheris"]
        else:
            sys.modules["atheris"] = saved  # type: ignore[assignment]
    return module


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_the_seed_corpus_holds_the_harness_properties(harness, path: Path) -> None:  # type: ignore[no-untyped-def]
    harness.one_input(path.read_bytes())


def masker(part):  # type: ignore[no-untyped-def]
    return mask_part(part, ContentRules(), PARTIES)[0].text


def rewrite(raw: bytes) -> tuple[mime.Rewritten, bytes]:
    header, body = split_message(raw)
    out = mime.rewrite_texts(mime.parse(header, body), masker)
    return out, (mime.replace_header_lines(header, out.headers) if out.headers else header)


# -- content.py: an address written with character references inside markup -----------------------

@pytest.mark.parametrize("markup", [
    '<p title="bob.buyer&#64;real-mail.example">hi</p>',
    '<a href="mailto:bob.buyer&commat;real-mail.example">mail me</a>',
    "<a href=mailto:bob.buyer&#x40;real-mail.example>mail me</a>",
    "<textarea>bob.buyer&#64;real-mail.example</textarea>",
    "<title>BOB.BUYER&#64;REAL-MAIL.EXAMPLE</title>",
])
def test_an_address_in_markup_written_with_character_references_is_masked(markup: str) -> None:
    import html
    out, findings = mask_html(markup, ContentRules(), PARTIES)
    assert BUYER not in html.unescape(out).lower()
    assert findings


def test_markup_without_an_address_keeps_its_character_references() -> None:
    markup = '<a title="Tom &amp; Jerry&#33;" href="#top">x</a><textarea>a&#64;b</textarea>'
    assert mask_html(markup, ContentRules(), PARTIES) == (markup, [])


def test_an_encoded_address_in_a_tag_counts_for_the_refuse_rule() -> None:
    _, findings = mask_html('<a title="someone&#64;elsewhere.example">x</a>', ContentRules(emails=Action.REFUSE))
    assert [f.action for f in findings if f.kind == "email"] == [Action.REFUSE]


# -- mime.py ---------------------------------------------------------------------------------------

def test_a_non_ascii_boundary_is_refused_not_a_unicode_error() -> None:
    header, body = split_message(b'Content-Type: multipart/mixed; boundary="\x88b"\r\n\r\n--b\r\nhello\r\n--b--\r\n')
    with pytest.raises(mime.MalformedMime):
        mime.parse(header, body)


@pytest.mark.parametrize("part", [
    b"\xff bob.buyer@real-mail.example\r\n",             # no header field at all
    b":x\r\n\r\n\xff bob.buyer@real-mail.example\r\n",   # a line the parser skips, then content
])
def test_a_part_without_header_fields_can_change_charset(part: bytes) -> None:
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n" + part + b"--b--\r\n"
    out, block = rewrite(raw)
    assert out.changed and b'Content-Type: text/plain; charset="utf-8"\r\n' in out.body
    assert BUYER.encode() not in out.body
    msg = email.message_from_bytes(block + b"\r\n" + out.body, policy=email.policy.default)
    [leaf] = [p for p in msg.walk() if not p.is_multipart()]
    assert leaf.get_content_charset() == "utf-8" and "[email removed]" in leaf.get_content()


@pytest.mark.parametrize("ctype", ["message/rfc823", "message/global", "message/partial"])
def test_every_message_subtype_is_read_as_a_message(ctype: str) -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: " + ctype.encode()
           + b"\r\n\r\nFrom: someone@else.example\r\n\r\ninner text bob.buyer@real-mail.example\r\n--b--\r\n")
    out, _ = rewrite(raw)
    assert BUYER.encode() not in out.body and b"inner text [email removed]" in out.body


@pytest.mark.parametrize("ctype", [
    b'text/plain; x="\xc3\xa9\xff"',                                    # 8-bit bytes: a Header object
    b'text/plain; t="Jan\xff\xff Seller" u=v; charset=utf-1',
    b'text/plain; a="x\r\n y"',                                         # a line break inside a quoted value
])
def test_a_content_type_that_cannot_be_written_back_becomes_type_and_charset(ctype: bytes) -> None:
    out, block = rewrite(b"Content-Type: " + ctype + b"\r\n\r\n\xff bob.buyer@real-mail.example\r\n")
    assert block == b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: quoted-printable\r\n'
    assert BUYER.encode() not in out.body


# -- findings in relay/marketplace.py: the Subject's masking (fixed after the fuzz run) ---------------

def _word(charset: str, text: str) -> str:
    return f"=?{charset}?b?{base64.b64encode(text.encode()).decode()}?="


@pytest.mark.parametrize("subject", [
    _word("ut-8", "hi " + BUYER),                       # unknown charset: the modern parser shows it anyway
    _word("utf-8", "hi " + BUYER) + "om: caf\u00e9",    # 8-bit text beside the word (Latin-1 read by headers.py)
])
def test_the_subject_is_masked_however_it_is_encoded(subject: str) -> None:
    from bsm_relay.policy.content import mask_subject as _mask_parties
    shown = str(email.message_from_string(f"Subject: {_mask_parties(subject, PARTIES)}\n\n",
                                          policy=email.policy.default)["Subject"])
    assert BUYER not in shown.lower()


def test_a_non_ascii_charset_name_in_the_subject_does_not_raise() -> None:
    from bsm_relay.policy.content import mask_subject as _mask_parties
    _mask_parties("=?utf\u00ef8?q?hi?=", PARTIES)


@pytest.mark.parametrize("subject", [
    "=?utf-8?b?aGkgYm9iLmJ1eWVyQHJlYWwtbWFpbC\u00ff\u00ff\u00ff5leGFtcGxl?=",   # junk inside the base64 (fuzz, run 2)
    "=?utf-8?q?hi_" + BUYER.replace("@", "=40") + "=0D=0ABcc:_x?=",           # CR LF inside an encoded word
])
def test_a_subject_only_a_lenient_reader_decodes_leaves_masked_and_in_one_line(subject: str) -> None:
    from bsm_relay.policy.content import mask_subject as _mask_parties
    from bsm_relay.relay.marketplace import _encode_header
    out = _encode_header(_mask_parties(subject, PARTIES))
    assert "\r" not in out and "\n" not in out
    for policy in (email.policy.default, email.policy.compat32):
        shown = str(email.message_from_bytes(b"Subject: " + out.encode("latin-1", "replace") + b"\r\n\r\n",
                                             policy=policy)["Subject"])
        assert BUYER not in shown.lower()
