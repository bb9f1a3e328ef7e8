"""Attachments: how many, how big together, and of which type -- by content, never by name.

The type of a file is read from its first bytes against a small table of
signatures (:func:`sniff`); the filename and the declared Content-Type are
ignored, so an ``.exe`` renamed ``.pdf`` is still an executable.  DOCX is a ZIP,
so its central directory is read (stdlib :mod:`zipfile`, no extraction) to tell
a Word document from a macro-enabled one or a plain archive.  Pure, stdlib only.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from .decision import ACCEPT, Decision, refuse
from .facts import Attachment


class Kind(StrEnum):
    # allowed by default
    PDF = "pdf"
    JPEG = "jpeg"
    PNG = "png"
    GIF = "gif"
    TIFF = "tiff"
    BMP = "bmp"
    TEXT = "text"
    DOCX = "docx"
    # recognised, refused by default
    EXECUTABLE = "executable"
    SCRIPT = "script"
    HTML = "html"
    ARCHIVE = "archive"
    MACRO_OFFICE = "macro-enabled office document"
    OFFICE_ZIP = "office document (not DOCX)"
    OLE = "legacy office document"
    UNKNOWN = "unknown"


LABELS: dict[Kind, str] = {
    Kind.PDF: "PDF", Kind.JPEG: "JPEG", Kind.PNG: "PNG", Kind.GIF: "GIF", Kind.TIFF: "TIFF",
    Kind.BMP: "BMP", Kind.TEXT: "plain text", Kind.DOCX: "Word (DOCX)",
}


@dataclass(frozen=True, slots=True)
class AttachmentRules:
    max_count: int = 5
    max_total_bytes: int = 10 * 1024 * 1024
    allowed: frozenset[Kind] = frozenset(
        {Kind.PDF, Kind.JPEG, Kind.PNG, Kind.GIF, Kind.TIFF, Kind.BMP, Kind.TEXT, Kind.DOCX})
    # A file that sniffs as text but whose name says it runs when opened.
    script_extensions: frozenset[str] = frozenset({
        "bat", "cmd", "com", "js", "jse", "vbs", "vbe", "wsf", "wsh", "ps1", "psm1", "sh", "py",
        "pl", "rb", "hta", "html", "htm", "svg", "xml", "url", "lnk", "reg", "inf", "scr"})


# -- sniffing -------------------------------------------------------------------------

# (offset, signature, kind); the first match wins, so specific entries come first.
_SIGNATURES: tuple[tuple[int, bytes, Kind], ...] = (
    (0, b"%PDF-", Kind.PDF),
    (0, b"\xff\xd8\xff", Kind.JPEG),
    (0, b"\x89PNG\r\n\x1a\n", Kind.PNG),
    (0, b"GIF87a", Kind.GIF),
    (0, b"GIF89a", Kind.GIF),
    (0, b"II*\x00", Kind.TIFF),
    (0, b"MM\x00*", Kind.TIFF),
    (0, b"MZ", Kind.EXECUTABLE),                       # PE / DOS
    (0, b"\x7fELF", Kind.EXECUTABLE),
    (0, b"\xfe\xed\xfa\xce", Kind.EXECUTABLE),         # Mach-O
    (0, b"\xfe\xed\xfa\xcf", Kind.EXECUTABLE),
    (0, b"\xce\xfa\xed\xfe", Kind.EXECUTABLE),
    (0, b"\xcf\xfa\xed\xfe", Kind.EXECUTABLE),
    (0, b"\xca\xfe\xba\xbe", Kind.EXECUTABLE),         # Mach-O fat / Java class
    (0, b"\x00asm", Kind.EXECUTABLE),                  # WebAssembly
    (0, b"#!", Kind.SCRIPT),
    (0, b"Rar!\x1a\x07", Kind.ARCHIVE),
    (0, b"7z\xbc\xaf\x27\x1c", Kind.ARCHIVE),
    (0, b"\x1f\x8b", Kind.ARCHIVE),                    # gzip
    (0, b"BZh", Kind.ARCHIVE),
    (0, b"\xfd7zXZ\x00", Kind.ARCHIVE),
    (0, b"\x28\xb5\x2f\xfd", Kind.ARCHIVE),            # zstd
    (0, b"MSCF", Kind.ARCHIVE),                        # cab
    (257, b"ustar", Kind.ARCHIVE),                     # tar
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", Kind.OLE),  # doc / xls / msi
    (0, b"{\\rtf", Kind.UNKNOWN),
)

_BMP_DIB_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_MARKUP_STARTS = (b"<!doctype html", b"<html", b"<script", b"<svg", b"<?xml", b"<head", b"<body",
                  b"<iframe")
# Read at most this much of [Content_Types].xml: it is a few KB in real files.
_CONTENT_TYPES_LIMIT = 256 * 1024


def sniff(data: bytes) -> Kind:
    """The kind of a file from its bytes alone."""
    for offset, signature, kind in _SIGNATURES:
        if data.startswith(signature, offset):
            return kind
    if data.startswith(b"BM") and len(data) >= 18 \
            and int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES:
        return Kind.BMP
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return _sniff_zip(data)
    return _sniff_text(data)


# Every signature above lies within the first bytes of a file (tar's, the furthest, ends at 262).
HEAD = 4096


def decided_by_head(head: bytes) -> bool:
    """Whether ``sniff`` of a file that begins with ``head`` (at least ``HEAD`` bytes of it, or
    all of it) depends on nothing after it: a signature or a BMP header.  A ZIP container (its
    directory is at the end) and text (every byte is read) are not."""
    if head.startswith(b"BM") and len(head) >= 18 \
            and int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES:
        return True
    return any(head.startswith(signature, offset) for offset, signature, _ in _SIGNATURES)


def _sniff_zip(data: bytes) -> Kind:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            lowered = [n.lower() for n in names]
            if any(n.endswith(("vbaproject.bin", "vbadata.xml")) or "activex" in n for n in lowered):
                return Kind.MACRO_OFFICE
            if "word/document.xml" not in lowered:
                if any(n.startswith(("xl/", "ppt/")) for n in lowered):
                    return Kind.OFFICE_ZIP
                return Kind.ARCHIVE
            if "[content_types].xml" in lowered:
                name = names[lowered.index("[content_types].xml")]
                with archive.open(name) as member:
                    content_types = member.read(_CONTENT_TYPES_LIMIT)
                if b"macroenabled" in content_types.lower():
                    return Kind.MACRO_OFFICE
            return Kind.DOCX
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
            EOFError, OSError, ValueError):
        # Corrupt, encrypted or exotic: not something we can vouch for.
        return Kind.ARCHIVE


def _sniff_text(data: bytes) -> Kind:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            return Kind.UNKNOWN
    else:
        if b"\x00" in data:
            return Kind.UNKNOWN
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            # Legacy 8-bit text (Latin-1, Windows-1252) decodes; binary has control bytes.
            text = data.decode("latin-1")
    if _has_control(text):
        return Kind.UNKNOWN
    head = text.lstrip()[:32].lower().encode("utf-8", "replace")
    if head.startswith(_MARKUP_STARTS):
        return Kind.HTML
    if head.startswith(b"#!"):
        return Kind.SCRIPT
    return Kind.TEXT


_CONTROL = frozenset(chr(c) for c in range(32) if chr(c) not in "\t\n\r\f\v\x1a") | {"\x7f"}
_CONTROL_TABLE = {ord(c): None for c in _CONTROL}


def _has_control(text: str) -> bool:
    # str.translate deletes every control character; a shorter result means there was one.
    return len(text.translate(_CONTROL_TABLE)) != len(text)


# -- the rule ------------------------------------------------------------------------

def _extension(filename: str) -> str:
    base = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def kind_of(attachment: Attachment, rules: AttachmentRules) -> Kind:
    kind = sniff(attachment.data)
    if kind is Kind.TEXT and _extension(attachment.filename) in rules.script_extensions:
        return Kind.SCRIPT
    return kind


def allowed_labels(rules: AttachmentRules) -> str:
    return ", ".join(label for kind, label in LABELS.items() if kind in rules.allowed)


_ADDRESS_LIKE_RE = re.compile(r"[^\s@]*+@[^\s@]*+")


def _display_name(filename: str) -> str:
    """The filename as the refusal shows it: no directories, no addresses, not too long."""
    name = filename.rsplit("/", 1)[-1].rsplit("\\", 1)[-1] or "(no name)"
    # The sentence goes back to the sender; a name like "buyer@example.com.exe" must not echo.
    name = _ADDRESS_LIKE_RE.sub("[email removed]", name)
    return name if len(name) <= 60 else name[:57] + "..."


def attachments_decision(attachments: Iterable[Attachment], rules: AttachmentRules) -> Decision:
    items = list(attachments)
    if len(items) > rules.max_count:
        return refuse("attach.too_many", count=len(items), limit=rules.max_count)
    total = sum(a.length for a in items)
    if total > rules.max_total_bytes:
        return refuse("attach.too_big", size_mb=f"{total / 1048576:.1f}",
                      limit_mb=f"{rules.max_total_bytes / 1048576:g}")
    for attachment in items:
        kind = kind_of(attachment, rules)
        if kind not in rules.allowed:
            return refuse("attach.type", filename=_display_name(attachment.filename),
                          kind=kind.value, allowed=allowed_labels(rules))
    return ACCEPT
