"""relay/mime.py: what policy reads from a body, and masking that keeps the rest byte for byte."""

from __future__ import annotations

import base64
import binascii
import email
import email.policy
import io
import zipfile

import pytest

from bsm_relay.policy.content import ContentRules, mask_part
from bsm_relay.relay import mime
from bsm_relay.relay.headers import crlf_only, split_message

RULES = ContentRules()
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<<>>\n%%EOF\n"


def docx_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/document.xml", "<w:document/>")
    return buf.getvalue()


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def masker(part):  # type: ignore[no-untyped-def]
    return mask_part(part, RULES)[0].text


def split(raw: bytes) -> tuple[bytes, bytes]:
    return split_message(raw)


LATIN1_QP = ("Grüße aus Köln! Schreiben Sie an bob@example.com oder rufen Sie +49 221 1234567 an. "
             "Ihre Bestellung 123-1234567-1234567 ist unterwegs, à bientôt.")


def multipart_message(docx: bytes) -> bytes:
    html = "<p>Grüße &amp; Dank — <b>bob@example.com</b>, Tel. (030) 123-4567</p>"
    return (
        b"From: shop@seller.example\r\nSubject: test\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="==outer=="\r\n\r\n'
        b"This is a multi-part message in MIME format.\r\n"
        b"--==outer==\r\n"
        b'Content-Type: multipart/alternative; boundary="inner"\r\n\r\n'
        b"--inner\r\n"
        b"Content-Type: text/plain; charset=ISO-8859-1\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        + _qp_latin1(LATIN1_QP) + b"\r\n"
        b"--inner\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(html.encode("utf-8")) +
        b"--inner--\r\n"
        b"\r\n--==outer==\r\n"
        b"Content-Type: application/vnd.openxmlformats-officedocument.wordprocessingml.document;\r\n"
        b' name="spec.docx"\r\n'
        b'Content-Disposition: attachment; filename="spec.docx"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(docx) +
        b"--==outer==\r\n"
        b'Content-Type: application/pdf; name="label.pdf"\r\n'
        b'Content-Disposition: attachment; filename="label.pdf"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(PDF) +
        b"--==outer==--\r\nepilogue\r\n")


def _qp_latin1(text: str) -> bytes:
    import quopri
    return quopri.encodestring(text.encode("iso-8859-1")).replace(b"\n", b"\r\n")


def test_parse_finds_text_parts_and_attachments_decoded() -> None:
    docx = docx_bytes()
    header, body = split(multipart_message(docx))
    parsed = mime.parse(header, body)
    texts = parsed.text_parts
    assert [t.content_type for t in texts] == ["text/plain", "text/html"]
    assert texts[0].text == LATIN1_QP          # ISO-8859-1 QP decoded to the same str
    assert "Grüße" in texts[1].text and "bob@example.com" in texts[1].text
    assert [(a.filename, a.data) for a in parsed.attachments] == [("spec.docx", docx), ("label.pdf", PDF)]


def test_masking_multipart_keeps_structure_text_and_untouched_parts() -> None:
    docx = docx_bytes()
    raw = multipart_message(docx)
    header, body = split(raw)
    out = mime.rewrite_texts(mime.parse(header, body), masker)
    assert out.changed and out.headers == {}
    new = header + b"\r\n" + out.body
    msg = email.message_from_bytes(new, policy=email.policy.default)
    assert not msg.defects
    leaves = [p for p in msg.walk() if not p.is_multipart()]
    assert [p.get_content_type() for p in leaves] == [
        "text/plain", "text/html",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document", "application/pdf"]
    plain, html = leaves[0], leaves[1]
    # Charset and transfer encoding kept; non-ASCII intact; only the masked pieces differ.
    assert plain.get_content_charset() == "iso-8859-1" and plain["Content-Transfer-Encoding"] == "quoted-printable"
    expected = LATIN1_QP.replace("bob@example.com", "[email removed]").replace("+49 221 1234567", "[phone removed]")
    assert plain.get_content() == expected
    assert "123-1234567-1234567" in plain.get_content()
    assert html.get_content_charset() == "utf-8" and html["Content-Transfer-Encoding"] == "base64"
    assert html.get_content() == ("<p>Grüße &amp; Dank — <b>[email removed]</b>, Tel. [phone removed]</p>")
    # Every byte outside the two text parts is what the sender wrote: attachments identical
    # both decoded and as transmitted.
    assert leaves[2].get_content() == docx and leaves[3].get_content() == PDF
    tail = raw[raw.index(b"--==outer==\r\nContent-Type: application/vnd"):]
    assert new.endswith(tail)
    assert new.startswith(raw[:raw.index(b"--inner\r\n")])


def test_nothing_to_mask_leaves_the_body_alone() -> None:
    header, body = split(multipart_message(docx_bytes()).replace(b"bob@example.com", b"bob at home"))
    parsed = mime.parse(header, body)
    out = mime.rewrite_texts(parsed, lambda part: part.text)
    assert not out.changed and out.body == body


def test_single_part_8bit_without_charset_gets_charset_and_encoding_headers() -> None:
    raw = "Subject: x\r\n\r\nCafé: write to bob@example.com\r\n".encode()
    header, body = split(raw)
    parsed = mime.parse(header, body)
    assert parsed.text_parts[0].text == "Café: write to bob@example.com\r\n"
    out = mime.rewrite_texts(parsed, masker)
    # Declared 7bit (by default) and us-ascii: the new text goes out as UTF-8 quoted-printable.
    assert out.body == b"Caf=C3=A9: write to [email removed]\r\n"
    assert out.headers == {"Content-Type": 'text/plain; charset="utf-8"',
                           "Content-Transfer-Encoding": "quoted-printable"}
    block = mime.replace_header_lines(header, out.headers)
    msg = email.message_from_bytes(block + b"\r\n" + out.body, policy=email.policy.default)
    assert msg.get_content().replace("\r\n", "\n") == "Café: write to [email removed]\n"


def test_part_heads_shared_by_equal_blocks_are_never_changed_by_a_rewrite() -> None:
    # Equal header blocks share one parsed head (mime._head): a rewrite that gives a part a new
    # charset must build its own field, or the next message with the same block would read it.
    header = b"Content-Type: text/plain\r\n"
    first = mime.parse(header, "Café: bob@example.com\r\n".encode("latin-1"))
    out = mime.rewrite_texts(first, masker)
    assert out.headers["Content-Type"] == 'text/plain; charset="utf-8"'
    second = mime.parse(header, b"plain words\r\n")
    assert second.leaves[0].headers is first.leaves[0].headers             # the shared head
    assert second.leaves[0].headers.get_content_charset() is None
    assert str(second.leaves[0].headers["Content-Type"]) == "text/plain"
    assert second.leaves[0].charset == "ascii" and second.text_parts[0].text == "plain words\r\n"


def test_single_part_base64_stays_base64() -> None:
    text = "こんにちは。連絡先 bob@example.com まで。\r\n"
    raw = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(text.encode()))
    header, body = split(raw)
    out = mime.rewrite_texts(mime.parse(header, body), masker)
    assert out.headers == {}
    assert base64.b64decode(out.body).decode() == text.replace("bob@example.com", "[email removed]")
    assert all(len(line) <= 76 for line in out.body.split(b"\r\n"))


def test_7bit_part_that_needs_8bit_text_becomes_quoted_printable() -> None:
    raw = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
           b"mail bob@example.com\r\n--b--\r\n")
    header, body = split(raw)
    out = mime.rewrite_texts(mime.parse(header, body), lambda p: p.text.replace("bob@example.com", "→ gone"))
    msg = email.message_from_bytes(header + b"\r\n" + out.body, policy=email.policy.default)
    part = next(p for p in msg.walk() if p.get_content_type() == "text/plain")
    assert part["Content-Transfer-Encoding"] == "quoted-printable"
    assert part.get_content_charset() == "utf-8"
    assert part.get_content() == "mail → gone"   # the CRLF before "--b--" is the delimiter's
    assert out.body.isascii()


def test_lying_and_unknown_charsets_decode_with_replacement() -> None:
    raw = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain; charset=x-no-such-charset\r\n\r\nabc \xff\xfe def\r\n"
           b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nbad \xc3 utf8\r\n--b--\r\n")
    header, body = split(raw)
    texts = mime.parse(header, body).text_parts
    assert texts[0].text == "abc \ufffd\ufffd def"
    assert texts[1].text == "bad \ufffd utf8"


def test_part_without_headers_is_still_read() -> None:
    # A client shows this text; policy must see it too.
    raw = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nvisit https://evil.example/\r\n--b--\r\n")
    header, body = split(raw)
    assert mime.parse(header, body).text_parts[0].text == "visit https://evil.example/"


def test_forwarded_message_text_is_read() -> None:
    raw = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: message/rfc822\r\n\r\n"
           b"Subject: inner\r\nContent-Type: text/plain\r\n\r\ncall bob@example.com\r\n--b--\r\n")
    header, body = split(raw)
    parsed = mime.parse(header, body)
    assert parsed.text_parts[0].text == "call bob@example.com"
    out = mime.rewrite_texts(parsed, masker)
    assert b"Subject: inner\r\nContent-Type: text/plain\r\n\r\ncall [email removed]\r\n--b--" in out.body


def test_deep_nesting_is_refused_without_recursion_error() -> None:
    depth = 5000
    parts = [b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(depth)]
    raw = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n" + b"".join(parts) + b"x\r\n"
    header, body = split(raw)
    with pytest.raises(mime.MalformedMime):
        mime.parse(header, body)


def test_nesting_just_inside_the_limit_parses() -> None:
    depth = mime.MAX_DEPTH - 1
    parts = [b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1) for i in range(depth)]
    raw = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b0\r\n\r\n" + b"".join(parts)
           + b"--b%d\r\nContent-Type: text/plain\r\n\r\ndeep\r\n" % depth)
    header, body = split(raw)
    assert mime.parse(header, body).text_parts[0].text == "deep\r\n"   # unclosed: runs to the end


def test_too_many_parts_refused() -> None:
    parts = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n" for _ in range(mime.MAX_PARTS + 1))
    raw = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n" + parts + b"--b--\r\n"
    header, body = split(raw)
    with pytest.raises(mime.MalformedMime):
        mime.parse(header, body)


@pytest.mark.parametrize("raw", [
    b"Subject: x\r\nContent-Type: multipart/mixed\r\n\r\nno boundary\r\n",
    b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\nno delimiter at all\r\n",
    b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
    b"Content-Transfer-Encoding: base64\r\nContent-Type: application/pdf\r\n\r\nJVBERi0xL\r\n--b--\r\n",
])
def test_unreadable_structures_refused(raw: bytes) -> None:
    header, body = split(raw)
    with pytest.raises(mime.MalformedMime) as info:
        mime.parse(header, body)
    assert info.value.reason == "msg.malformed"


def test_boundary_text_inside_a_line_is_not_a_delimiter() -> None:
    raw = (b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nsee --b here and\r\n--bx not one\r\n--b--\r\n")
    header, body = split(raw)
    assert mime.parse(header, body).text_parts[0].text == "see --b here and\r\n--bx not one"


@pytest.mark.parametrize("signature, kept", [(b"%PDF-1.4\n", 4096), (b"\x00\x01 unknown", 1 << 16)])
def test_a_large_attachment_keeps_its_first_bytes_and_its_whole_size(signature: bytes, kept: int):
    """Over 1 MB, only the first 64 KB stay for sniffing (a ZIP stays whole for its directory;
    a type its first 4 KB decide keeps those): the size limit still counts every byte, and the
    type is still read from the content."""
    from bsm_relay.policy.attachments import sniff
    content = signature + bytes(range(256)) * 8000                   # about 2 MB
    header = b"Content-Type: multipart/mixed; boundary=b\r\n"
    body = (b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(content).replace(b"\n", b"\r\n") + b"--b--\r\n")
    (attachment,) = mime.parse(header, body).attachments
    assert attachment.length == len(content) and attachment.data == content[:kept]
    assert sniff(attachment.data) is sniff(content)


def attachment_of(encoded: bytes, ctype: bytes = b"application/octet-stream"):  # type: ignore[no-untyped-def]
    header = b"Content-Type: multipart/mixed; boundary=b\r\n"
    body = (b"--b\r\nContent-Type: " + ctype + b"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + encoded + b"--b--\r\n")
    (attachment,) = mime.parse(header, body).attachments
    return attachment


BINARY = bytes(range(256)) * 400          # 100 KB of every byte value


@pytest.mark.parametrize("content", [b"%PDF-1.7\n" + BINARY, b"\x89PNG\r\n\x1a\n" + BINARY,
                                     b"MZ" + BINARY, b"\xff\xd8\xff" + BINARY[:-1],
                                     b"BM" + bytes(12) + (40).to_bytes(4, "little") + BINARY[:-2]])
def test_a_base64_attachment_whose_head_decides_its_type_is_not_decoded_whole(content: bytes) -> None:
    # Its head and its size come out as a whole decode would give them (every padding length).
    from bsm_relay.policy.attachments import HEAD, sniff
    attachment = attachment_of(b64(content))
    assert attachment.data == content[:HEAD] and attachment.length == len(content)
    assert sniff(attachment.data) is sniff(content)


@pytest.mark.parametrize("content", [docx_bytes() + BINARY, b"plain text, line after line\r\n" * 3000,
                                     b"\x00\x01 no known signature" + BINARY])
def test_a_base64_attachment_of_any_other_type_is_decoded_whole(content: bytes) -> None:
    assert attachment_of(b64(content)).data == content


def test_unusual_base64_is_judged_by_the_whole_decode_as_before() -> None:
    content = b"%PDF-1.7\n" + BINARY
    encoded = b64(content)
    unpadded = encoded.rstrip(b"=\r\n") + b"\r\n"               # padding left off: mail clients add it
    assert attachment_of(unpadded).length == len(content)
    spaced = encoded.replace(b"\r\n", b" \t\r\n")                # other whitespace between lines
    assert attachment_of(spaced).data == content[:4096] and attachment_of(spaced).length == len(content)
    chars = encoded.rstrip(b"=\r\n")
    lone = b"Q" * ((1 - len(chars.replace(b"\r\n", b""))) % 4)     # a lone character left over
    with pytest.raises(mime.MalformedMime):
        attachment_of(chars + lone + b"\r\n")
    inside = encoded[:400] + b"=" + encoded[400:]                    # padding inside: the whole decode reads it
    assert attachment_of(inside).data[:4096] == binascii.a2b_base64(inside)[:4096]


@pytest.mark.parametrize("inserted", ["\r", "\x00", "\n"])
def test_rewritten_text_with_a_bare_cr_or_nul_goes_out_quoted_printable(inserted: str) -> None:
    # Delivery sends queued bodies as they are, so the re-encoded text must be CRLF lines
    # without NUL even when the new text holds such characters (a charset such as UTF-16, a
    # decoded =0D): a plain 7bit part becomes quoted-printable rather than carry them raw.
    raw = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
           b"write to bob@example.com\r\nbye\r\n")
    header, body = split(raw)
    out = mime.rewrite_texts(mime.parse(header, body), lambda part: part.text.replace("bob", "b" + inserted))
    assert crlf_only(out.body)
    if inserted == "\n":       # a line break: a line like any other, the part stays as it was
        assert out.headers == {} and out.body == b"write to b\r\n@example.com\r\nbye\r\n"
    else:
        assert out.headers == {"Content-Transfer-Encoding": "quoted-printable"}
        decoded = email.message_from_bytes(mime.replace_header_lines(header, out.headers) + b"\r\n" + out.body,
                                           policy=email.policy.default).get_payload(decode=True)
        assert decoded == ("write to b" + inserted + "@example.com\r\nbye\r\n").encode()


def test_a_re_encoded_part_that_is_not_crlf_lines_is_refused(monkeypatch) -> None:
    # Delivery trusts queued bodies to be CRLF lines without NUL: should an encoder ever write a
    # bare LF, the rewrite refuses the message (msg.malformed) rather than queue it.
    raw = (b"Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
           b"write to bob@example.com\r\nbye\r\n")
    header, body = split(raw)
    monkeypatch.setattr(mime, "_qp", lambda lines: b"\n".join(lines))
    with pytest.raises(mime.MalformedMime) as info:
        mime.rewrite_texts(mime.parse(header, body), lambda part: part.text.replace("bob", "b\x00"))
    assert info.value.reason == "msg.malformed"
