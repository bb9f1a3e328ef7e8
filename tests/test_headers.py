"""Reading the header block: splitting, fields, the strict From parser, message ids."""

from __future__ import annotations

import pytest

from bsm_relay.relay.headers import (
    AmbiguousFrom,
    Header,
    Mailbox,
    MalformedHeader,
    MissingFrom,
    crlf_only,
    get_all,
    parse_from,
    parse_headers,
    parse_mailbox,
    parse_msg_ids,
    received_count,
    split_message,
)

# -- crlf_only -------------------------------------------------------------------------


@pytest.mark.parametrize("data, expected", [
    (b"", True), (b"a", True), (b"a\r\n", True), (b"a\r\nb", True), (b"\r\n\r\n", True),
    (b"a\n", False), (b"a\r", False), (b"\n\r", False), (b"\r\r\n", False), (b"\r\n\n", False),
    (b"a\r\nb\rc\nd\r\n", False), (b"a\0\r\n", False), (b"\r", False), (b"\n", False),
])
def test_crlf_only_examples(data, expected):
    assert crlf_only(data) is expected


# -- split_message ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "block", "body"),
    [
        pytest.param(b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n", b"body\r\n", id="normal"),
        pytest.param(b"A: 1\r\n\r\nx\r\n\r\ny\r\n", b"A: 1\r\n", b"x\r\n\r\ny\r\n", id="first-blank-line-only"),
        pytest.param(b"A: 1\r\n\r\n", b"A: 1\r\n", b"", id="empty-body"),
        pytest.param(b"A: 1\r\nB: 2\r\n", b"A: 1\r\nB: 2\r\n", b"", id="no-blank-line-all-headers"),
        pytest.param(b"A: 1", b"A: 1", b"", id="no-final-crlf"),
        pytest.param(b"\r\nbody only\r\n", b"", b"body only\r\n", id="starts-with-blank-line"),
        pytest.param(b"\r\n", b"", b"", id="blank-line-only"),
        pytest.param(b"", b"", b"", id="empty"),
        pytest.param(b"A: 1\r\n \r\n\r\nb", b"A: 1\r\n \r\n", b"b", id="whitespace-line-is-not-blank"),
    ],
)
def test_split_message(raw: bytes, block: bytes, body: bytes) -> None:
    assert split_message(raw) == (block, body)


# -- parse_headers ---------------------------------------------------------------------


def test_parse_headers_keeps_raw_bytes_and_unfolds_values() -> None:
    block = (
        b"Subject: a long\r\n\tfolded  subject \r\n"
        b"content-TYPE: text/plain;\r\n charset=utf-8\r\n"
        b"X-Empty:\r\n"
        b"X-Tight:value\r\n"
    )
    headers = parse_headers(block)
    assert headers == [
        Header("Subject", "a long\tfolded  subject", b"Subject: a long\r\n\tfolded  subject \r\n"),
        Header("content-TYPE", "text/plain; charset=utf-8", b"content-TYPE: text/plain;\r\n charset=utf-8\r\n"),
        Header("X-Empty", "", b"X-Empty:\r\n"),
        Header("X-Tight", "value", b"X-Tight:value\r\n"),
    ]
    assert b"".join(h.raw for h in headers) == block


@pytest.mark.parametrize(
    ("raw_value", "value"),
    [
        pytest.param("Grüße ✓".encode(), "Grüße ✓", id="utf-8"),
        pytest.param("Grüße".encode("latin-1"), "Grüße", id="latin-1-fallback"),
        pytest.param(b"\xff\xfe\x80", "\xff\xfe\x80", id="junk-bytes-never-raise"),
    ],
)
def test_parse_headers_decodes_8bit_values_safely(raw_value: bytes, value: str) -> None:
    (header,) = parse_headers(b"Subject: " + raw_value + b"\r\n")
    assert header.value == value
    assert header.raw == b"Subject: " + raw_value + b"\r\n"
    header.value.encode("utf-8")  # no lone surrogates


def test_parse_headers_last_line_without_crlf() -> None:
    assert parse_headers(b"A: 1\r\nB: 2") == [Header("A", "1", b"A: 1\r\n"), Header("B", "2", b"B: 2")]


def test_parse_headers_empty_block() -> None:
    assert parse_headers(b"") == []


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"no colon here\r\n", id="no-colon"),
        pytest.param(b" continuation first\r\nA: 1\r\n", id="continuation-before-header"),
        pytest.param(b"\tcontinuation first\r\n", id="tab-continuation-before-header"),
        pytest.param(b": empty name\r\n", id="empty-name"),
        pytest.param(b"From : a@b.example\r\n", id="space-before-colon"),
        pytest.param(b"Bad Name: x\r\n", id="space-in-name"),
        pytest.param(b"A: 1\r\n\r\nB: 2\r\n", id="blank-line-inside"),
        pytest.param(b"A: 1\nB: 2\r\n", id="bare-lf"),
        pytest.param(b"A: 1\rB: 2\r\n", id="bare-cr"),
        pytest.param(b"A: 1\x00\r\n", id="nul"),
        pytest.param(b"Subj\xc3\xa9ct: x\r\n", id="8bit-name"),
        pytest.param(b"From sender@x.example Mon Jan  1 00:00:00 2024\r\nA: 1\r\n", id="mbox-from-line"),
    ],
)
def test_parse_headers_refuses_malformed_lines(block: bytes) -> None:
    with pytest.raises(MalformedHeader):
        parse_headers(block)


def test_malformed_header_is_a_value_error() -> None:
    assert issubclass(MalformedHeader, ValueError)


def test_get_all_is_case_insensitive_and_ordered() -> None:
    headers = parse_headers(b"Received: 1\r\nSubject: s\r\nRECEIVED: 2\r\nreceived: 3\r\n")
    assert [h.value for h in get_all(headers, "Received")] == ["1", "2", "3"]
    assert [h.value for h in get_all(headers, "subject")] == ["s"]
    assert get_all(headers, "To") == []
    assert received_count(headers) == 3
    assert received_count([]) == 0


# -- parse_from ------------------------------------------------------------------------


def _from(value: str) -> Mailbox:
    return parse_from(parse_headers(b"From: " + value.encode() + b"\r\n"))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("jane@example.com", Mailbox("", "jane@example.com")),
        ("<jane@example.com>", Mailbox("", "jane@example.com")),
        ("< jane@example.com >", Mailbox("", "jane@example.com")),
        ("Jane Seller <jane@example.com>", Mailbox("Jane Seller", "jane@example.com")),
        ("Jane.Seller@Example.COM", Mailbox("", "Jane.Seller@example.com")),  # local part kept
        ('"Seller, Jane" <jane@example.com>', Mailbox("Seller, Jane", "jane@example.com")),
        ('"Jane \\"JJ\\" Seller" <jane@example.com>', Mailbox('Jane "JJ" Seller', "jane@example.com")),
        ("John Q. Public <jqp@example.org>", Mailbox("John Q. Public", "jqp@example.org")),
        ("Jane   Seller<jane@example.com>", Mailbox("Jane Seller", "jane@example.com")),
        ("jane@example.com (Jane Seller)", Mailbox("Jane Seller", "jane@example.com")),
        ("(Jane Seller) jane@example.com", Mailbox("Jane Seller", "jane@example.com")),
        ("Jane <jane@example.com> (Sales (EU))", Mailbox("Jane", "jane@example.com")),
        ('"jane"@example.com', Mailbox("", "jane@example.com")),  # quoted dot-atom: same mailbox
        ('<"jane.s"@example.com>', Mailbox("", "jane.s@example.com")),
        ("jane+shop@mail.example.co.uk", Mailbox("", "jane+shop@mail.example.co.uk")),
        # Display-name tricks are judged on the real angle address, which is what counts.
        ('"approved@x.example" <evil@y.example>', Mailbox("approved@x.example", "evil@y.example")),
        ('"<approved@x.example>" <evil@y.example>', Mailbox("<approved@x.example>", "evil@y.example")),
        # RFC 2047 is decoded for the display name only.
        ("=?utf-8?q?Ren=C3=A9_M=C3=BCller?= <rene@example.com>", Mailbox("René Müller", "rene@example.com")),
        ("=?ISO-8859-1?Q?Ren=E9?= <rene@example.com>", Mailbox("René", "rene@example.com")),
        ("=?utf-8?b?5bGx55Sw?= <yamada@example.jp>", Mailbox("山田", "yamada@example.jp")),
        ('"=?utf-8?q?Ren=C3=A9?=" <rene@example.com>', Mailbox("René", "rene@example.com")),
        # a character split over two words, and the space between words dropped
        ("=?utf-8?b?4pw=?= =?utf-8?b?kw==?= <a@example.com>", Mailbox("✓", "a@example.com")),
        ("=?utf-8?q?approved=40x.example?= <evil@y.example>", Mailbox("approved@x.example", "evil@y.example")),
        # undecodable words stay as written
        ("=?utf-8?b?!!!?= <a@example.com>", Mailbox("=?utf-8?b?!!!?=", "a@example.com")),
        ("=?x-nonsense?q?abc?= <a@example.com>", Mailbox("=?x-nonsense?q?abc?=", "a@example.com")),
        # an encoded line break never reaches the display name
        ("=?utf-8?q?Jane=0D=0ABcc=3A_x?= <a@example.com>", Mailbox("Jane Bcc: x", "a@example.com")),
        ("René <rene@example.com>", Mailbox("René", "rene@example.com")),  # RFC 6532 UTF-8
    ],
)
def test_parse_from_accepts_one_plain_mailbox(value: str, expected: Mailbox) -> None:
    assert _from(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("<>", id="empty-angle"),
        pytest.param("Jane <>", id="name-and-empty-angle"),
        pytest.param("(only a comment)", id="comment-only"),
        pytest.param("jane", id="no-at"),
        pytest.param("<jane>", id="angle-no-at"),
        pytest.param("jane@@example.com", id="two-at-adjacent"),
        pytest.param("jane@x@example.com", id="two-at"),
        pytest.param("<jane@x@example.com>", id="angle-two-at"),
        pytest.param("@example.com", id="no-local-part"),
        pytest.param("jane@", id="no-domain"),
        pytest.param("a@b.example, c@d.example", id="two-mailboxes"),
        pytest.param("<a@b.example>, <c@d.example>", id="two-angle-mailboxes"),
        pytest.param("<a@b.example> <c@d.example>", id="two-angles-no-comma"),
        pytest.param("Sellers: a@b.example;", id="group"),
        pytest.param("Sellers: ;", id="empty-group"),
        pytest.param("undisclosed-recipients:;", id="undisclosed"),
        # the CVE-2023-27043 class and its relatives
        pytest.param("approved@x.example)<evil@y.example>", id="cve-2023-27043-paren"),
        pytest.param("approved@x.example <evil@y.example>", id="unquoted-at-in-display-name"),
        pytest.param("evil@y.example <approved@x.example>", id="unquoted-at-in-display-name-2"),
        pytest.param("approved@x.example (<evil@y.example>)", id="comment-with-angle-address"),
        pytest.param("(approved@x.example) evil@y.example", id="comment-with-address-before"),
        pytest.param("evil@y.example (approved@x.example)", id="comment-with-address-after"),
        pytest.param("Jane <jane@x.example> (approved@x.example)", id="comment-with-address-after-angle"),
        pytest.param('"approved@x.example"@evil.example', id="quoted-local-part-with-at"),
        pytest.param('"jane doe"@example.com', id="quoted-local-part-with-space"),
        pytest.param("<@route.example:jane@example.com>", id="source-route"),
        pytest.param("jane@[192.0.2.1]", id="domain-literal"),
        pytest.param("jane@example.com.", id="trailing-dot-domain"),
        pytest.param("jane.@example.com", id="trailing-dot-local"),
        pytest.param("jane@-example.com", id="bad-label"),
        pytest.param("jane (x) @example.com", id="comment-inside-address"),
        pytest.param("jane @example.com", id="space-inside-address"),
        pytest.param("<jane(x)@example.com>", id="comment-inside-angle"),
        pytest.param("<jane @example.com>", id="space-inside-angle"),
        pytest.param("<<evil@y.example>", id="double-open-angle"),
        pytest.param("<evil@y.example>>", id="double-close-angle"),
        pytest.param("Jane <jane@example.com", id="unbalanced-angle-open"),
        pytest.param("Jane jane@example.com>", id="unbalanced-angle-close"),
        pytest.param('"Jane <jane@example.com>', id="unbalanced-quote"),
        pytest.param('Jane" <jane@example.com>', id="stray-quote"),
        pytest.param("(Jane <jane@example.com>", id="unbalanced-paren-open"),
        pytest.param("Jane) <jane@example.com>", id="unbalanced-paren-close"),
        pytest.param("((Jane) <jane@example.com>", id="unbalanced-nested-paren"),
        pytest.param("Jane <jane@example.com> trailer", id="text-after-angle"),
        pytest.param("Jane <jane@example.com> <x@y.example>", id="second-angle-after"),
        pytest.param("Jane \\ <jane@example.com>", id="backslash-outside-quotes"),
        pytest.param("Jane; <jane@example.com>", id="semicolon"),
        pytest.param("=?utf-8?q?evil=40y.example?=", id="encoded-word-cannot-be-the-address"),
        pytest.param("<=?utf-8?q?evil=40y.example?=>", id="encoded-word-in-angle-is-no-address"),
        pytest.param("jané@example.com", id="non-ascii-address"),
        pytest.param("jane@exämple.com", id="non-ascii-domain"),
        pytest.param("a" * 65 + "@example.com", id="local-part-too-long"),
    ],
)
def test_parse_from_refuses_anything_ambiguous(value: str) -> None:
    with pytest.raises(AmbiguousFrom):
        _from(value)


def test_parse_from_missing() -> None:
    with pytest.raises(MissingFrom):
        parse_from(parse_headers(b"Subject: hi\r\nSender: a@b.example\r\n"))
    with pytest.raises(AmbiguousFrom):  # MissingFrom is a kind of AmbiguousFrom
        parse_from([])
    assert issubclass(AmbiguousFrom, ValueError)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"From: a@b.example\r\nFrom: a@b.example\r\n", id="same-twice"),
        pytest.param(b"From: a@b.example\r\nSubject: x\r\nfrom: c@d.example\r\n", id="case-differs"),
    ],
)
def test_parse_from_refuses_two_from_headers(block: bytes) -> None:
    with pytest.raises(AmbiguousFrom) as info:
        parse_from(parse_headers(block))
    assert not isinstance(info.value, MissingFrom)


def test_parse_from_folded_and_8bit() -> None:
    headers = parse_headers(b"FROM: =?utf-8?q?Ren=C3=A9?=\r\n <rene@Example.com>\r\n")
    assert parse_from(headers) == Mailbox("René", "rene@example.com")
    headers = parse_headers("From: Grüße <g@example.com>\r\n".encode("latin-1"))
    assert parse_from(headers) == Mailbox("Grüße", "g@example.com")


def test_parse_mailbox_reason_codes() -> None:
    assert MissingFrom.reason == "from.missing"
    assert AmbiguousFrom.reason == "from.ambiguous"
    assert MalformedHeader.reason == "msg.malformed"
    assert parse_mailbox("a@b.example") == Mailbox("", "a@b.example")


# -- parse_msg_ids ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ids"),
    [
        ("<abc@example.com>", ["abc@example.com"]),
        ("  <a@x>\r\n <b@x>\t<c@x>", ["a@x", "b@x", "c@x"]),
        ("<a@x> <b@x> <a@x>", ["a@x", "b@x"]),  # de-duplicated, first position kept
        ("junk <a@x> (comment) more junk <b@x> trailing", ["a@x", "b@x"]),
        ("<a@x><b@x>", ["a@x", "b@x"]),
        ("<a b@x> <c@x>", ["c@x"]),  # whitespace inside: dropped
        ("<a\tb@x>", []),
        ("<> <a@x>", ["a@x"]),  # empty id dropped
        ("<<a@x>", ["a@x"]),  # the id starts at the last "<"
        ("<junk <a@x>", ["a@x"]),
        ("<a@x", []),
        ("a@x>", []),
        ("", []),
        ("no ids at all", []),
        ("<" + "a" * 246 + "@x.y>", ["a" * 246 + "@x.y"]),  # exactly 250
        ("<" + "a" * 247 + "@x.y> <ok@x>", ["ok@x"]),  # 251: dropped
        ("<ré@x> <ok@x>", ["ok@x"]),  # non-ASCII: dropped
        ("<a\x7f@x> <ok@x>", ["ok@x"]),  # control: dropped
        ("<CAJx7Kd0=8Qw+K3f5vR@mail.gmail.com>", ["CAJx7Kd0=8Qw+K3f5vR@mail.gmail.com"]),
        ("<noatsign>", ["noatsign"]),
    ],
)
def test_parse_msg_ids(value: str, ids: list[str]) -> None:
    assert parse_msg_ids(value) == ids
