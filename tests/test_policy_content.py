"""Content rules: addresses, phone numbers, links, remote images, length (policy/content.py)."""

from __future__ import annotations

import html
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bsm_relay.policy import content as _content
from bsm_relay.policy.content import (
    Action,
    ContentRules,
    Finding,
    content_decision,
    html_text,
    link_allowed,
    link_host,
    mask_html,
    mask_part,
    mask_text,
)
from bsm_relay.policy.facts import Parties, TextPart

RULES = ContentRules()
PARTIES = Parties(seller_addresses=("shop@seller.example",), buyer_addresses=("Jane.Buyer@mail.example",))


# -- emails -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("write to me: joe@example.com.", "write to me: [email removed]."),
    ("<joe.o'neil+x@sub.example.co.uk>", "<joe.o'[email removed]>"),
    ("jörg@beispiel.de", "[email removed]"),
    ("no address here @ all", "no address here @ all"),
    ("user@localhost", "user@localhost"),
    ("a@b.c", "a@b.c"),                                   # one-letter TLD is not an address
    ("joe@example.com-ish", "joe@example.com-ish"),
])
def test_email_mask_default(text: str, expected: str) -> None:
    assert mask_text(text, RULES)[0] == expected


@pytest.mark.parametrize("action, expected_text, finding", [
    (Action.MASK, "mail [email removed] now", Finding("email", Action.MASK)),
    (Action.ALLOW, "mail joe@example.com now", None),
    (Action.REFUSE, "mail joe@example.com now", Finding("email", Action.REFUSE)),
])
def test_email_actions(action: Action, expected_text: str, finding: Finding | None) -> None:
    text, findings = mask_text("mail joe@example.com now", replace(RULES, emails=action))
    assert text == expected_text
    assert findings == ([finding] if finding else [])


@pytest.mark.parametrize("action", list(Action))
def test_party_addresses_are_always_masked(action: Action) -> None:
    text, _ = mask_text("I am jane.buyer@MAIL.example and shop@seller.example",
                        replace(RULES, emails=action), PARTIES)
    assert text == "I am [email removed] and [email removed]"
    html_out, _ = mask_html('<a href="mailto:jane.buyer@mail.example">x</a>',
                            replace(RULES, emails=action), PARTIES)
    assert "mail.example" not in html_out.lower()


def test_refuse_setting_still_refuses_a_party_address() -> None:
    decision = content_decision([TextPart("text/plain", "shop@seller.example")],
                                replace(RULES, emails=Action.REFUSE), PARTIES)
    assert decision.reason == "content.email"


# -- phone numbers ----------------------------------------------------------------------

@pytest.mark.parametrize("text, masked", [
    ("call +49 30 1234567", True),
    ("call +1 (555) 123-4567 now", True),
    ("call (555) 123-4567", True),
    ("call 555-123-4567", True),
    ("call 555.123.4567", True),
    ("appelez 06 12 34 56 78", True),
    ("appelez 06.12.34.56.78", True),
    ("call 0044 20 7946 0958", True),
    ("call +442079460958", True),
    ("電話 03-1234-5678 まで", True),
    ("order 123-1234567-1234567", False),      # the order id format
    ("shipped 2024-05-01", False),
    ("shipped 01/05/2024", False),
    ("shipped 1.5.2024", False),
    ("shipped 2024-05-01 12 items", False),
    ("years 1990-2024", False),
    ("tracking 1Z999AA10123456784", False),
    ("FedEx tracking 123456789012", False),    # bare digits are left alone by default
    ("USPS 9400 1000 0000 0000 0000 00", False),
    ("price 1,299.00 EUR", False),
    ("short 123-4567", True),                  # 7 digits, formatted
    ("too short 12-3456", False),
    ("SKU 555-123-4567X", False),
])
def test_phone_mask_default(text: str, masked: bool) -> None:
    out, findings = mask_text(text, RULES)
    assert ("[phone removed]" in out) is masked
    assert (Finding("phone", Action.MASK) in findings) is masked


def test_phone_configured() -> None:
    bare = replace(RULES, phone_bare_digits=True)
    assert mask_text("call 5551234567", bare)[0] == "call [phone removed]"
    assert mask_text("call 5551234567", RULES)[0] == "call 5551234567"
    assert mask_text("call 555-1234", replace(RULES, phone_min_digits=8))[0] == "call 555-1234"
    assert mask_text("call 555-1234", replace(RULES, phones=Action.ALLOW)) == ("call 555-1234", [])
    text, findings = mask_text("call 555-123-4567", replace(RULES, phones=Action.REFUSE))
    assert text == "call 555-123-4567" and findings == [Finding("phone", Action.REFUSE)]


def test_phone_inside_allowed_link_is_not_masked() -> None:
    url = "https://www.ups.com/track/555-123-4567?loc=en_US"
    assert mask_text(f"see {url} or 555-123-4567", RULES)[0] == f"see {url} or [phone removed]"


# -- links ----------------------------------------------------------------------------------

@pytest.mark.parametrize("url, allowed", [
    ("https://www.ups.com/track?tracknum=1Z999", True),
    ("https://ups.com", True),
    ("HTTPS://WWW.FEDEX.COM/fedextrack/", True),
    ("https://tools.usps.com/go/TrackConfirmAction", True),
    ("https://www.dhl.de/de/privatkunden.html", True),
    ("https://marketplace.example/orders/123", True),
    ("https://www.royalmail.com/track-your-item", True),
    ("https://ups.com:443/x", True),
    ("http://www.ups.com/track", False),           # https only
    ("ftp://ups.com/x", False),
    ("https://amazon.com/dp/B000", False),
    ("https://evil.example/ups.com", False),
    ("https://ups.com.evil.example/", False),
    ("https://notups.com/", False),
    ("https://ups.com@evil.example/", False),
    ("https://evil.example\\@ups.com/", False),    # browsers read \ as /
    ("https://evil.example%2F.ups.com/", False),
    ("https://ups%2Ecom/", True),                  # decodes to ups.com, as browsers do
    ("www.ups.com/track", False),
    ("https://", False),
])
def test_link_allowed_default(url: str, allowed: bool) -> None:
    assert link_allowed(url, RULES) is allowed


def test_link_host() -> None:
    assert link_host("https://User@Sub.UPS.com:8443/x") == "sub.ups.com"
    assert link_host("www.Example.org/x") == "www.example.org"
    assert link_host("https://[::1]/") == ""


@pytest.mark.parametrize("action, text, findings", [
    (Action.REFUSE, "see https://evil.example/x.", [Finding("link", Action.REFUSE, "evil.example")]),
    (Action.MASK, "see [link removed].", [Finding("link", Action.MASK, "evil.example")]),
    (Action.ALLOW, "see https://evil.example/x.", []),
])
def test_link_actions(action: Action, text: str, findings: list[Finding]) -> None:
    assert mask_text("see https://evil.example/x.", replace(RULES, links=action)) == (text, findings)


def test_link_configured_hosts_and_schemes() -> None:
    rules = replace(RULES, link_hosts=("shop.example",), link_schemes=("https", "http"))
    assert link_allowed("http://www.shop.example/a", rules)
    assert not link_allowed("https://ups.com/a", rules)


# -- HTML ---------------------------------------------------------------------------------

def test_html_masks_text_and_keeps_markup() -> None:
    source = ('<html><head><style>p { color: #123456; }</style></head><body>'
              '<p class="x">Write to <b>joe&#64;example.com</b> or call 555-123-4567 &amp; '
              'see <a href="https://www.ups.com/track">UPS</a>.</p>'
              '<p>Grüße — 日本語 &lt;3</p></body></html>')
    out, findings = mask_html(source, RULES)
    assert "joe" not in out and "555-123-4567" not in out
    assert "[email removed]" in out and "[phone removed]" in out
    assert '<a href="https://www.ups.com/track">UPS</a>' in out
    assert "color: #123456;" in out
    assert "<p>Grüße — 日本語 &lt;3</p>" in out
    assert {f.kind for f in findings} == {"email", "phone"}
    assert html.unescape(html_text(out)).count("[phone removed]") == 1


def test_html_untouched_when_nothing_found() -> None:
    source = '<div style="x">Hello &nbsp; <i>there</i> &lt;3</div><!-- note --><br/>'
    assert mask_html(source, RULES) == (source, [])


@pytest.mark.parametrize("source, stripped", [
    ('<p>a<img src="https://t.example/p.gif" width="1" height="1">b</p>', "<p>ab</p>"),
    ("<p>a<IMG SRC='http://t.example/p.gif'/>b</p>", "<p>ab</p>"),
    ('<p>a<img src=//t.example/p.gif>b</p>', "<p>ab</p>"),
    ('<p>a<img alt=">" src="https://t.example/p.gif">b</p>', "<p>ab</p>"),
    ('<p>a<img srcset="https://t.example/p.gif 2x">b</p>', "<p>ab</p>"),
    ('<td background="https://t.example/bg.png">x</td>', "<td>x</td>"),
    ('<div style="background:url(\'https://t.example/b.png\')">x</div>',
     '<div style="background:url(\'\')">x</div>'),
    ('<link rel="stylesheet" href="https://t.example/s.css"><p>x</p>', "<p>x</p>"),
    ('<style>@import "https://t.example/s.css"; a{background:url(http://t.example/y)}</style>',
     "<style>; a{background:url()}</style>"),
])
def test_remote_images_stripped_by_default(source: str, stripped: str) -> None:
    out, findings = mask_html(source, RULES)
    assert out == stripped
    assert Finding("remote_image", Action.MASK) in findings


def test_inline_and_attached_images_are_kept() -> None:
    source = '<img src="cid:logo@x"><img src="data:image/png;base64,iVBORw0KGgo=">'
    assert mask_html(source, RULES) == (source, [])


@pytest.mark.parametrize("action, kept, finding", [
    (Action.ALLOW, True, None),
    (Action.REFUSE, True, Finding("remote_image", Action.REFUSE)),
    (Action.MASK, False, Finding("remote_image", Action.MASK)),
])
def test_remote_image_actions(action: Action, kept: bool, finding: Finding | None) -> None:
    source = '<img src="https://t.example/p.gif">'
    out, findings = mask_html(source, replace(RULES, remote_images=action))
    assert (out == source) is kept
    assert findings == ([finding] if finding else [])


@pytest.mark.parametrize("href, ok", [
    ("https://www.fedex.com/track", True),
    ("https://evil.example/", False),
    ("//evil.example/", False),
    ("javascript:alert(1)", False),
    ("#top", True),
    ("mailto:[email removed]", True),
    ("HTTPS://UPS.COM/?a=1&amp;b=2", True),
])
def test_html_hrefs(href: str, ok: bool) -> None:
    out, findings = mask_html(f'<a href="{href}">x</a>', RULES)
    assert (findings == []) is ok
    masked, _ = mask_html(f'<a href="{href}">x</a>', replace(RULES, links=Action.MASK))
    assert (masked == f'<a href="{href}">x</a>') is ok
    if not ok:
        assert masked == '<a href="#">x</a>'


def test_tel_links_are_phones() -> None:
    out, findings = mask_html('<a href="tel:+15551234567">call</a>', RULES)
    assert out == '<a href="#">call</a>' and findings == [Finding("phone", Action.MASK)]


def test_visible_link_text_is_checked_too() -> None:
    _, findings = mask_html('<a href="https://ups.com/">https://evil.example/</a>', RULES)
    assert findings == [Finding("link", Action.REFUSE, "evil.example")]


def test_mask_part_picks_by_content_type() -> None:
    html_part, _ = mask_part(TextPart("text/html; charset=utf-8", "<b>a@b.example</b>"), RULES)
    assert html_part.text == "<b>[email removed]</b>"
    plain_part, _ = mask_part(TextPart("text/plain", "<b>a@b.example</b>"), RULES)
    assert plain_part.text == "<b>[email removed]</b>"


# -- the rule --------------------------------------------------------------------------------

@pytest.mark.parametrize("rules, text, reason", [
    (RULES, "mail joe@example.com, call 555-123-4567", None),             # masked, not refused
    (RULES, "track at https://www.ups.com/track", None),
    (RULES, "see https://evil.example/", "content.link"),
    (replace(RULES, emails=Action.REFUSE), "mail joe@example.com", "content.email"),
    (replace(RULES, phones=Action.REFUSE), "call 555-123-4567", "content.phone"),
    (replace(RULES, links=Action.MASK), "see https://evil.example/", None),
    (RULES, "x" * 100_000, None),
    (RULES, "x" * 100_001, "content.too_long"),
    (replace(RULES, max_text_chars=10), "x" * 11, "content.too_long"),
])
def test_content_decision(rules: ContentRules, text: str, reason: str | None) -> None:
    assert content_decision([TextPart("text/plain", text)], rules).reason == reason


def test_content_decision_html_remote_image_refused_when_configured() -> None:
    part = TextPart("text/html", '<img src="https://t.example/p.gif">')
    assert content_decision([part], RULES).accepted
    assert content_decision([part], replace(RULES, remote_images=Action.REFUSE)).reason == \
        "content.remote_image"


def test_link_refusal_names_the_host_and_the_allowlist() -> None:
    decision = content_decision([TextPart("text/plain", "https://evil.example/x")], RULES)
    assert decision.params["host"] == "evil.example"
    assert "ups.com" in decision.params["allowed"]


# -- hostile input: every pattern must stay linear ----------------------------------------------

MB = 1_000_000
ADVERSARIAL = [
    "a" * MB,
    "a." * (MB // 2),
    "a@" * (MB // 2),
    "a@b." * (MB // 4),
    "." * MB + "@",
    "1 " * (MB // 2) + "x",
    "1-" * (MB // 2),
    "1" * MB,
    "+(" * (MB // 2),
    "https://" * (MB // 8),
    "https://a" + "/" * MB,
    "www." * (MB // 4),
    "<" * MB,
    "<a" * (MB // 2),
    '<a href="' * (MB // 9),
    "<a " + 'x="' * (MB // 3),
    "<img src=" * (MB // 9),
    "<style>" + "url(//" * (MB // 7),
    "&#64;" * (MB // 5),
    "<!--" * (MB // 4),
    "\u00e9\U0001F600\ud800" * (MB // 3),
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=lambda t: repr(t[:12]))
def test_hostile_input_is_handled(text: str) -> None:
    # Linear patterns finish this in well under a second; a quadratic one would not finish at all.
    out, findings = mask_text(text, RULES)
    assert isinstance(out, str) and len(out) <= len(text) + 100
    out_html, _ = mask_html(text, RULES)
    assert isinstance(out_html, str)
    assert isinstance(findings, list)


# -- the cheap scans that let the full patterns be skipped ------------------------------------

_SCAN_TEXT = st.text(alphabet=st.sampled_from(list("aW:/.w 09-٣५\u00e9\r\n")), max_size=40) | st.text(max_size=40)


@given(_SCAN_TEXT)
def test_digit_and_link_scans_agree_with_their_patterns(text):
    # The ASCII fast paths must answer exactly as the regexes they stand in for, or a phone
    # number or a link would pass unmasked.
    assert _content._has_digit(text) == (_content._DIGIT_RE.search(text) is not None)
    assert _content._has_link_hint(text) == (_content._LINK_HINT_RE.search(text) is not None)


def test_digit_and_link_scans_on_known_texts():
    assert _content._has_digit("call 5") and _content._has_digit("call ٣") and not _content._has_digit("no digits")
    assert _content._has_link_hint("see WWW.x") and _content._has_link_hint("ftp://h")
    assert _content._has_link_hint("é www.x")
    assert not _content._has_link_hint("www x") and not _content._has_link_hint("é :/ /")


def test_a_masked_part_is_kept_per_parties_and_its_findings_are_fresh_lists():
    # The rules and the rewrite mask each part with the same arguments and share one result;
    # another pair's addresses must never be answered from it.
    rules = ContentRules()
    part = TextPart("text/plain", "write to ann@shop.example or bob@home.example")
    ann, bob = Parties(("ann@shop.example",), ()), Parties(("bob@home.example",), ())
    masked_ann, found = mask_part(part, rules, ann)
    found.append("junk")
    again, found_again = mask_part(part, rules, ann)
    assert again == masked_ann and "junk" not in found_again
    plain = mask_part(part, ContentRules(emails=Action.ALLOW), ann)[0].text
    assert "ann@shop.example" not in plain and "bob@home.example" in plain   # parties always masked
    assert "bob@home.example" not in mask_part(part, ContentRules(emails=Action.ALLOW), bob)[0].text
