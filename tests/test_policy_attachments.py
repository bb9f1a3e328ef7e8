"""Attachments: count, total size and type by content (policy/attachments.py)."""

from __future__ import annotations

import io
import zipfile

import pytest

from bsm_relay.policy.attachments import AttachmentRules, Kind, attachments_decision, sniff
from bsm_relay.policy.facts import Attachment

RULES = AttachmentRules()


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


DOCX = zip_bytes({
    "[Content_Types].xml": b'<Types><Override ContentType="application/vnd.openxmlformats-officedocument.'
                           b'wordprocessingml.document.main+xml"/></Types>',
    "word/document.xml": b"<w:document/>",
})
DOCM = zip_bytes({
    "[Content_Types].xml": b'<Types><Override ContentType="application/vnd.ms-word.document.'
                           b'macroEnabled.main+xml"/></Types>',
    "word/document.xml": b"<w:document/>",
    "word/vbaProject.bin": b"\xd0\xcf\x11\xe0",
})
DOCM_TYPES_ONLY = zip_bytes({
    "[Content_Types].xml": b"application/vnd.ms-word.document.macroEnabled.main+xml",
    "word/document.xml": b"<w:document/>",
})
XLSM = zip_bytes({"[Content_Types].xml": b"x", "xl/workbook.xml": b"x", "xl/vbaProject.bin": b"x"})
XLSX = zip_bytes({"[Content_Types].xml": b"x", "xl/workbook.xml": b"x"})
PLAIN_ZIP = zip_bytes({"invoice.pdf.exe": b"MZ\x90\x00"})
BMP = b"BM" + (70).to_bytes(4, "little") + b"\x00" * 8 + (40).to_bytes(4, "little") + b"\x00" * 52


@pytest.mark.parametrize("data, kind", [
    (b"%PDF-1.7\n...", Kind.PDF),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", Kind.JPEG),
    (b"\x89PNG\r\n\x1a\n\x00\x00", Kind.PNG),
    (b"GIF89a\x01\x00", Kind.GIF),
    (b"GIF87a\x01\x00", Kind.GIF),
    (b"II*\x00\x08\x00", Kind.TIFF),
    (b"MM\x00*\x00\x08", Kind.TIFF),
    (BMP, Kind.BMP),
    (b"BMW is a car brand, and this is a text file.", Kind.TEXT),
    (b"Hello,\r\nplain text\tfile\n", Kind.TEXT),
    ("Grüße, ça va? 日本語".encode(), Kind.TEXT),
    ("\ufeffwith BOM".encode("utf-8"), Kind.TEXT),
    ("Caf\xe9 cr\xe8me".encode("latin-1"), Kind.TEXT),
    ("utf-16 text".encode("utf-16"), Kind.TEXT),
    (b"", Kind.TEXT),
    (b"text with a \x00 NUL", Kind.UNKNOWN),
    (b"text with \x01 control", Kind.UNKNOWN),
    (DOCX, Kind.DOCX),
    (DOCM, Kind.MACRO_OFFICE),
    (DOCM_TYPES_ONLY, Kind.MACRO_OFFICE),
    (XLSM, Kind.MACRO_OFFICE),
    (XLSX, Kind.OFFICE_ZIP),
    (PLAIN_ZIP, Kind.ARCHIVE),
    (b"PK\x03\x04garbage that is not a zip", Kind.ARCHIVE),
    (b"MZ\x90\x00\x03\x00\x00\x00", Kind.EXECUTABLE),
    (b"\x7fELF\x02\x01\x01", Kind.EXECUTABLE),
    (b"\xcf\xfa\xed\xfe\x07\x00", Kind.EXECUTABLE),
    (b"#!/bin/sh\nrm -rf /\n", Kind.SCRIPT),
    (b"Rar!\x1a\x07\x01\x00", Kind.ARCHIVE),
    (b"7z\xbc\xaf\x27\x1c\x00\x04", Kind.ARCHIVE),
    (b"\x1f\x8b\x08\x00", Kind.ARCHIVE),
    (b"\x00" * 257 + b"ustar\x0000", Kind.ARCHIVE),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1\x00", Kind.OLE),
    (b"  <!DOCTYPE html><html><script>", Kind.HTML),
    (b"<svg xmlns='http://www.w3.org/2000/svg'>", Kind.HTML),
    (b"{\\rtf1\\ansi", Kind.UNKNOWN),
])
def test_sniff(data: bytes, kind: Kind) -> None:
    assert sniff(data) is kind


def att(data: bytes, name: str = "file.pdf", declared: str = "application/pdf") -> Attachment:
    return Attachment(name, declared, data)


PDF = b"%PDF-1.4\n" + b"x" * 100


@pytest.mark.parametrize("attachments, reason", [
    ((), None),
    ((att(PDF),), None),
    ((att(PDF),) * 5, None),                                            # the limit
    ((att(PDF),) * 6, "attach.too_many"),
    ((att(DOCX, "letter.docx"), att(PDF)), None),
    ((att(b"MZ\x90\x00" + b"\x00" * 64, "invoice.pdf"),), "attach.type"),   # renamed exe
    ((att(PDF, "setup.exe", "application/x-msdownload"),), None),        # content decides
    ((att(DOCM, "letter.docx"),), "attach.type"),
    ((att(PLAIN_ZIP, "photos.zip"),), "attach.type"),
    ((att(b"echo hi\r\n", "notes.bat", "text/plain"),), "attach.type"),  # text that runs
    ((att(b"Dear buyer", "notes.txt", "text/plain"),), None),
    ((att(b"<html><body>hi", "notes.txt", "text/plain"),), "attach.type"),
])
def test_attachments_default(attachments: tuple[Attachment, ...], reason: str | None) -> None:
    assert attachments_decision(attachments, RULES).reason == reason


def test_total_size_boundary() -> None:
    limit = RULES.max_total_bytes
    assert limit == 10 * 1024 * 1024
    exactly = [att(PDF[:9] + b"x" * (limit // 2 - 9)), att(PDF[:9] + b"x" * (limit // 2 - 9))]
    assert attachments_decision(exactly, RULES).accepted
    over = exactly + [att(b"%PDF-")]
    decision = attachments_decision(over, RULES)
    assert decision.reason == "attach.too_big"
    assert decision.params["limit_mb"] == "10"


def test_configured_limits_and_allowlist() -> None:
    rules = AttachmentRules(max_count=1, max_total_bytes=200,
                            allowed=frozenset({Kind.PDF, Kind.ARCHIVE}))
    assert attachments_decision([att(PDF), att(PDF)], rules).reason == "attach.too_many"
    assert attachments_decision([att(PDF + b"x" * 200)], rules).reason == "attach.too_big"
    assert attachments_decision([att(PLAIN_ZIP, "a.zip")], rules).accepted
    decision = attachments_decision([att(b"\x89PNG\r\n\x1a\n", "a.png")], rules)
    assert decision.reason == "attach.type"
    assert decision.params["allowed"] == "PDF"


def test_type_sentence_lists_what_is_allowed_and_names_the_file() -> None:
    decision = attachments_decision([att(b"MZ\x90\x00", "dir/invoice.pdf")], RULES)
    assert decision.params["filename"] == "invoice.pdf"
    assert decision.params["kind"] == "executable"
    assert decision.params["allowed"] == "PDF, JPEG, PNG, GIF, TIFF, BMP, plain text, Word (DOCX)"


def test_long_filename_is_shortened() -> None:
    decision = attachments_decision([att(b"MZ", "a" * 200 + ".exe")], RULES)
    assert len(decision.params["filename"]) == 60
