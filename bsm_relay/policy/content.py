"""Content rules for message text: addresses, phone numbers, links, remote images, length.

Each rule is ``allow | mask | refuse``.  :func:`mask_text` and :func:`mask_html`
take one decoded body part and return the rewritten text plus what was found;
the relay applies them to each text/plain and text/html part (it does the MIME
walking, decoding and re-encoding) once :func:`content_decision` -- run by
:func:`bsm_relay.policy.rules.evaluate` -- has found nothing to refuse.
The real addresses of both parties are masked whatever the email rule says.

Every pattern here is precompiled and linear on hostile input: runs are entered
only at their start (look-behind) and consumed possessively, and HTML is split by
a hand-written scanner built on ``str.find`` rather than by a backtracking regex.
Findings never carry the text found (no addresses or numbers), only a link's
host.  Pure, stdlib only.
"""

from __future__ import annotations

import email.policy
import html as html_lib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.errors import HeaderParseError, MessageError
from email.header import decode_header, make_header
from enum import StrEnum
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from .decision import ACCEPT, Decision, refuse
from .facts import Parties, TextPart


class Action(StrEnum):
    ALLOW = "allow"
    MASK = "mask"      # for remote images: strip them
    REFUSE = "refuse"


DEFAULT_LINK_HOSTS: tuple[str, ...] = (
    "marketplace.example",
    "ups.com", "fedex.com", "usps.com", "dhl.com", "dhl.de", "royalmail.com",
    "canadapost-postescanada.ca", "canadapost.ca", "japanpost.jp", "laposte.fr", "correos.es",
)


@dataclass(frozen=True, slots=True)
class ContentRules:
    emails: Action = Action.MASK
    phones: Action = Action.MASK
    links: Action = Action.REFUSE          # applies to links that are not allowed
    remote_images: Action = Action.MASK
    max_text_chars: int = 100_000
    link_schemes: tuple[str, ...] = ("https",)
    # A link is allowed when its host is one of these or a subdomain of one.
    link_hosts: tuple[str, ...] = DEFAULT_LINK_HOSTS
    phone_min_digits: int = 7
    phone_max_digits: int = 15
    # Bare digit runs ("5551234567") are far more often tracking, invoice or
    # order numbers than phone numbers; only formatted numbers are masked unless set.
    phone_bare_digits: bool = False
    # Numbers matching these are never phone numbers (the order id format, dates).
    protected_patterns: tuple[str, ...] = (
        r"\d{3}-\d{7}-\d{7}",
        r"\d{4}[-./]\d{1,2}[-./]\d{1,2}",
        r"\d{1,2}[-./]\d{1,2}[-./]\d{2,4}",
        r"(?:19|20)\d\d ?[-/] ?(?:19|20)\d\d",
    )
    email_mask: str = "[email removed]"
    phone_mask: str = "[phone removed]"
    link_mask: str = "[link removed]"
    _protected_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        joined = "|".join(f"(?:{p})" for p in self.protected_patterns) or r"(?!)"
        object.__setattr__(self, "_protected_re", re.compile(joined))


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str          # "email" | "phone" | "link" | "remote_image"
    action: Action
    detail: str = ""   # the host of a link; never an address or a number


# -- patterns -----------------------------------------------------------------------

_EMAIL_RE = re.compile(
    r"(?<![\w.%+\-])[\w.%+\-]++@(?:[\w\-]+\.)+[^\W\d_]{2,63}(?![\w\-])")
# Entered only where a run starts and consumed possessively, so a long run of
# digits and separators is one attempt; the candidates are filtered in Python.
_PHONE_RE = re.compile(r"(?<![\w+])\+?\(?\d(?:[ \t.\-/()\u00a0]{0,3}\d)*+")
_PHONE_SEPARATORS = frozenset(" \t.-/()\u00a0")
_LINK_RE = re.compile(r"\b(?:(?:https?|ftp)://|www\.)[^\s<>\"'`]*+", re.IGNORECASE)
_HOST_RE = re.compile(r"[\w\-]+(?:\.[\w\-]+)*")
# Cheap scans that let the full patterns be skipped: every link holds one, every phone a digit.
_LINK_HINT_RE = re.compile(r"://|www\.", re.IGNORECASE)
_DIGIT_RE = re.compile(r"\d")
_ASCII_DIGITS = "0123456789"


def _has_digit(text: str) -> bool:
    # ASCII text (str.isascii is O(1)): ten substring searches cost a fifteenth of a regex scan.
    if text.isascii():
        return any(d in text for d in _ASCII_DIGITS)
    return _DIGIT_RE.search(text) is not None


def _has_link_hint(text: str) -> bool:
    if text.isascii():
        return "://" in text or "www." in text.lower()
    return _LINK_HINT_RE.search(text) is not None
_URL_TRAILING = ".,;:!?)]}*_~"


def _parties_re(parties: Parties | Iterable[str]) -> re.Pattern[str] | None:
    addresses = parties.all() if isinstance(parties, Parties) else tuple(parties)
    return _addresses_re(frozenset(a for a in addresses if a))


@lru_cache(maxsize=4096)
def _addresses_re(addresses: frozenset[str]) -> re.Pattern[str] | None:
    """One pattern per set of addresses (a pair's messages and parts share it)."""
    if not addresses:
        return None
    # Longest first, so one address that contains another is masked whole; ties in a fixed
    # order (the same set always gives the same pattern).
    ordered = sorted(addresses, key=lambda a: (-len(a), a))
    return re.compile("|".join(re.escape(a) for a in ordered), re.IGNORECASE)


def link_host(url: str) -> str:
    """The host a browser would open for ``url`` ('' when there is none)."""
    # Browsers read a backslash as a slash in http(s) URLs; so must we, or
    # "https://evil.example\\@ups.com" would pass as ups.com.
    candidate = url.replace("\\", "/")
    if candidate.lower().startswith("www."):
        candidate = "http://" + candidate
    try:
        host = urlsplit(candidate).hostname or ""
    except ValueError:
        return ""
    host = unquote(host).rstrip(".").lower()
    # Anything a browser would refuse or read differently ("%2F", "@") is no host of ours.
    return host if _HOST_RE.fullmatch(host) else ""


def link_allowed(url: str, rules: ContentRules) -> bool:
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme not in rules.link_schemes:
        return False
    host = link_host(url)
    return bool(host) and any(host == h or host.endswith("." + h) for h in rules.link_hosts)


# -- plain text -------------------------------------------------------------------

class _Masker:
    """One pass over one part: the rules, the parties' pattern and the findings so far."""

    def __init__(self, rules: ContentRules, parties: Parties | Iterable[str]) -> None:
        self.rules = rules
        self.party_re = _parties_re(parties)
        self.findings: list[Finding] = []

    def note(self, kind: str, action: Action, detail: str = "") -> None:
        finding = Finding(kind, action, detail)
        if finding not in self.findings:
            self.findings.append(finding)

    # emails ----------------------------------------------------------------------
    def emails(self, text: str) -> str:
        rules = self.rules
        if self.party_re is not None and "@" in text:
            def party(_: re.Match[str]) -> str:
                self.note("email", Action.REFUSE if rules.emails is Action.REFUSE else Action.MASK)
                return rules.email_mask
            text = self.party_re.sub(party, text)
        if rules.emails is Action.ALLOW or "@" not in text:
            return text

        def other(match: re.Match[str]) -> str:
            self.note("email", rules.emails)
            return rules.email_mask if rules.emails is Action.MASK else match.group(0)
        return _EMAIL_RE.sub(other, text)

    # phones ------------------------------------------------------------------------
    def _is_phone(self, match: re.Match[str]) -> bool:
        rules, candidate = self.rules, match.group(0)
        end = match.end()
        if end < len(match.string) and (match.string[end].isalnum() or match.string[end] in "_@"):
            return False
        digits = sum(ch.isdigit() for ch in candidate)
        if not rules.phone_min_digits <= digits <= rules.phone_max_digits:
            return False
        formatted = candidate[0] == "+" or any(ch in _PHONE_SEPARATORS for ch in candidate)
        if not formatted and not rules.phone_bare_digits:
            return False
        # A date or an order id next to other numbers is not a phone number; a
        # French "06.12.34.56.78" must not be taken for a date, hence fullmatch per chunk.
        protected = rules._protected_re
        return not any(protected.fullmatch(chunk) for chunk in candidate.split())

    def phones(self, text: str) -> str:
        rules = self.rules
        if rules.phones is Action.ALLOW or not _has_digit(text):   # no digit, no number
            return text

        def one(match: re.Match[str]) -> str:
            if not self._is_phone(match):
                return match.group(0)
            self.note("phone", rules.phones)
            return rules.phone_mask if rules.phones is Action.MASK else match.group(0)
        return _PHONE_RE.sub(one, text)

    # links ---------------------------------------------------------------------------
    def link(self, url: str) -> str:
        """Apply the link rule to one URL (emails inside it are masked first)."""
        url = self.emails(url)
        if link_allowed(url, self.rules) or self.rules.links is Action.ALLOW:
            return url
        self.note("link", self.rules.links, link_host(url))
        return self.rules.link_mask if self.rules.links is Action.MASK else url

    def words(self, text: str) -> str:
        return self.phones(self.emails(text))

    def plain(self, text: str) -> str:
        """Mask a run of plain text: links are cut out first so phones never eat into them."""
        if not _has_link_hint(text):          # no scheme, no "www.": no link to cut out
            return self.words(text)
        out: list[str] = []
        pos = 0
        for match in _LINK_RE.finditer(text):
            url = match.group(0)
            trimmed = url.rstrip(_URL_TRAILING)
            out.append(self.words(text[pos:match.start()]))
            out.append(self.link(trimmed))
            out.append(url[len(trimmed):])
            pos = match.end()
        out.append(self.words(text[pos:]))
        return "".join(out)


def mask_subject(text: str, addresses: Iterable[str]) -> str:
    """The Subject with the parties' addresses replaced, as any reader could decode it.

    Mail clients decode leniently (an unknown charset, 8-bit text beside an encoded word, junk
    inside one): the address is looked for in what the stdlib's strict decoder and its lenient
    one (``email.policy.default``) show, also with the non-ASCII bytes left out.  When any
    reading shows one, or the lenient decoder reports a defect, the Subject leaves as the
    lenient reading, masked and encoded again by us: the reader then sees exactly that text,
    whatever its decoder would have made of the original (fail closed).
    """
    wanted = [a.lower() for a in addresses if a]
    if text.isascii() and "=?" not in text:       # no encoded word: every reader sees the text
        if not any(a in text.lower() for a in wanted):
            return text
        return _CONTROL.sub(" ", re.sub("|".join(map(re.escape, wanted)), "[email removed]", text,
                                        flags=re.IGNORECASE))
    lenient, defective = _decode_lenient(text)
    readings = (lenient, _decode_lenient(_ASCII_ONLY.sub("", text))[0], _decode_header(text), text)
    shown = next((r for r in readings if any(a in r.lower() for a in wanted)), None)
    if shown is None and not defective:
        return text
    out = _CONTROL.sub(" ", shown if shown is not None else lenient)
    for address in wanted:
        out = re.sub(re.escape(address), "[email removed]", out, flags=re.IGNORECASE)
    return out


_ASCII_ONLY = re.compile(r"[^\x20-\x7e]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _decode_header(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except (HeaderParseError, LookupError, ValueError, MessageError):
        return value


def _decode_lenient(value: str) -> tuple[str, bool]:
    """The Subject as ``email.policy.default`` reads it, and whether it found defects."""
    try:
        header = email.policy.default.header_factory("Subject", value)
        return str(header), bool(header.defects)
    except Exception:  # noqa: BLE001 - whatever the parser trips on, the raw text is the reading
        return value, True


def mask_text(text: str, rules: ContentRules,
              parties: Parties | Iterable[str] = ()) -> tuple[str, list[Finding]]:
    """Apply the content rules to a decoded text/plain part."""
    masker = _Masker(rules, parties)
    return masker.plain(text), masker.findings


# -- HTML -------------------------------------------------------------------------------

_TAG_NAME_RE = re.compile(r"<\s*/?\s*([A-Za-z][\w:.-]*+)")
_TAG_START_RE = re.compile(r"<[^\W\d_/!?]|<[/!?]")
_TAG_DELIM_RE = re.compile(r"[>\"']")
_RAW_TEXT_TAGS = frozenset({"style", "script", "textarea", "title", "xmp"})
_RAW_TEXT_END = {name: re.compile(r"</\s*" + name, re.IGNORECASE) for name in _RAW_TEXT_TAGS}
_INLINE_TAGS = frozenset({"a", "b", "i", "u", "s", "em", "strong", "span", "font", "small", "big",
                          "sub", "sup", "code", "mark", "abbr", "wbr"})
_REMOTE = r"\s*(?:https?:)?//"
_RESOURCE_TAGS = frozenset({"img", "image", "link", "iframe", "frame", "embed", "object", "script",
                            "video", "audio", "source", "track", "input", "picture"})
_REMOTE_SRC_RE = re.compile(
    r"\b(?:src|srcset|data-src|lowsrc|dynsrc|poster|data)\s*=\s*[\"']?" + _REMOTE, re.IGNORECASE)
_REMOTE_LINK_HREF_RE = re.compile(r"\bhref\s*=\s*[\"']?" + _REMOTE, re.IGNORECASE)
_REMOTE_BACKGROUND_RE = re.compile(
    r"\sbackground\s*=\s*(?:\"" + _REMOTE + r"[^\"]*+\"?|'" + _REMOTE + r"[^']*+'?|"
    + r"(?:https?:)?//[^\s>]*+)", re.IGNORECASE)
_REMOTE_CSS_URL_RE = re.compile(r"(url\(\s*(?:&quot;|[\"'])?)" + _REMOTE + r"[^)\"'\s]*+",
                                re.IGNORECASE)
_REMOTE_CSS_IMPORT_RE = re.compile(r"@import\s+(?:&quot;|[\"'])" + _REMOTE + r"[^\"';\s&]*+(?:&quot;|[\"'])?",
                                   re.IGNORECASE)
_HREF_RE = re.compile(r"(\bhref\s*=\s*)(\"[^\"]*+\"|'[^']*+'|[^\s\"'>]++)", re.IGNORECASE)
# A character reference ("&#64;", "&commat;", "&#x40") is how an address hides in an attribute value
# or an RCDATA element, which browsers decode; see _HtmlMasker.refs.
_CHAR_REF_RE = re.compile(r"&(?:#[0-9]{1,8};?|#[xX][0-9a-fA-F]{1,8};?|[A-Za-z][A-Za-z0-9]{0,31};?)")


def _plain_ref(match: re.Match[str]) -> str:
    """The character a reference stands for, unless it is one markup reads (quotes, <, >, &, space)."""
    decoded = html_lib.unescape(match.group(0))
    if decoded == match.group(0) or any(c in "\"'<>&" or c.isspace() for c in decoded):
        return match.group(0)
    return decoded


def _segments(markup: str) -> Iterator[tuple[str, str, str]]:
    """Split HTML into ("text" | "tag" | "comment" | "raw", segment, tag name), linearly.

    A '<' that cannot start a tag ("<3", "a < b") stays inside its text segment.
    """
    n = len(markup)
    i = text_start = 0
    while True:
        start = _TAG_START_RE.search(markup, i)
        if start is None:
            break
        lt = start.start()
        if lt > text_start:
            yield "text", markup[text_start:lt], ""
        if markup.startswith("<!--", lt):
            close = markup.find("-->", lt + 4)
            i = n if close < 0 else close + 3
            yield "comment", markup[lt:i], ""
        else:
            i = _tag_end(markup, lt)
            tag = markup[lt:i]
            name_match = _TAG_NAME_RE.match(tag)
            name = name_match.group(1).lower() if name_match else ""
            yield "tag", tag, name
            if name in _RAW_TEXT_TAGS and not tag.startswith("</") and not tag.endswith("/>"):
                closing = _RAW_TEXT_END[name].search(markup, i)
                stop = n if closing is None else closing.start()
                if stop > i:
                    yield "raw", markup[i:stop], name
                i = stop
        text_start = i
    if text_start < n:
        yield "text", markup[text_start:], ""


def _tag_end(markup: str, start: int) -> int:
    """Index just past the tag starting at ``start``; quoted '>' do not end it."""
    pos = start + 1
    while True:
        delim = _TAG_DELIM_RE.search(markup, pos)
        if delim is None:
            return len(markup)
        if delim.group(0) == ">":
            return delim.end()
        close = markup.find(delim.group(0), delim.end())
        if close < 0:
            return len(markup)
        pos = close + 1


class _HtmlMasker(_Masker):
    def text(self, segment: str) -> str:
        plain = html_lib.unescape(segment) if "&" in segment else segment
        masked = self.plain(plain)
        # Re-escape only what changed, so untouched text keeps its exact bytes.
        return segment if masked == plain else html_lib.escape(masked, quote=False)

    def refs(self, segment: str) -> str:
        """Mask addresses in markup other than text: as written, and as written with character
        references (``<a href="mailto:bob&#64;x.example">``, a ``title`` or a ``<textarea>``).
        The references are decoded only in a segment where that finds something to mask."""
        segment = self.emails(segment)
        if "&" in segment:
            decoded = _CHAR_REF_RE.sub(_plain_ref, segment)
            if decoded != segment:
                masked = self.emails(decoded)
                if masked != decoded:
                    return masked
        return segment

    def remote(self, segment: str, subs: Iterable[tuple[re.Pattern[str], str]]) -> str:
        """Strip remote references from a tag or style block (or note them)."""
        action = self.rules.remote_images
        if action is Action.ALLOW:
            return segment
        for pattern, replacement in subs:
            if pattern.search(segment):
                self.note("remote_image", action)
                if action is Action.MASK:
                    segment = pattern.sub(replacement, segment)
        return segment

    def tag(self, tag: str, name: str) -> str:
        action = self.rules.remote_images
        if action is not Action.ALLOW and name in _RESOURCE_TAGS and (
                _REMOTE_SRC_RE.search(tag) or (name == "link" and _REMOTE_LINK_HREF_RE.search(tag))):
            self.note("remote_image", action)
            if action is Action.MASK:
                # The whole tag goes; a stray closing tag left behind is harmless.
                return ""
        tag = self.remote(tag, ((_REMOTE_BACKGROUND_RE, ""), (_REMOTE_CSS_URL_RE, r"\1")))
        tag = self.refs(tag)
        if name != "link" and "href" in tag.lower():
            tag = _HREF_RE.sub(self._href, tag)
        return tag

    def _href(self, match: re.Match[str]) -> str:
        prefix, quoted = match.group(1), match.group(2)
        quote = quoted[0] if quoted[0] in "\"'" else ""
        value = html_lib.unescape(quoted[1:-1] if quote else quoted).strip()
        lowered = value.lower()
        if not value or lowered.startswith(("#", "cid:", "mailto:", self.rules.email_mask.lower())):
            return match.group(0)
        if lowered.startswith("tel:"):
            if self.rules.phones is Action.ALLOW:
                return match.group(0)
            self.note("phone", self.rules.phones)
            return prefix + '"#"' if self.rules.phones is Action.MASK else match.group(0)
        if link_allowed(value, self.rules) or self.rules.links is Action.ALLOW:
            return match.group(0)
        self.note("link", self.rules.links, link_host(value))
        return prefix + '"#"' if self.rules.links is Action.MASK else match.group(0)


def _walk_html(markup: str, masker: _HtmlMasker) -> str:
    out: list[str] = []
    for kind, segment, name in _segments(markup):
        if kind == "text":
            out.append(masker.text(segment))
        elif kind == "tag":
            out.append(masker.tag(segment, name))
        elif kind == "raw" and name == "style":
            out.append(masker.refs(masker.remote(
                segment, ((_REMOTE_CSS_URL_RE, r"\1"), (_REMOTE_CSS_IMPORT_RE, "")))))
        else:
            # Comments (Outlook's conditional markup) and scripts are not shown,
            # but they reach the recipient: addresses still go.  Titles and textareas are.
            out.append(masker.refs(segment))
    return "".join(out)


def mask_html(markup: str, rules: ContentRules,
              parties: Parties | Iterable[str] = ()) -> tuple[str, list[Finding]]:
    """Apply the content rules to a decoded text/html part.

    Visible text is masked after decoding character references (so
    ``a&#64;b.example`` is an address too); tags keep their structure, with
    remote images dropped and disallowed hrefs replaced by ``#`` when masking.
    """
    masker = _HtmlMasker(rules, parties)
    return _walk_html(markup, masker), masker.findings


def html_text(markup: str) -> str:
    """The visible text of an HTML part, roughly, for phrase detection."""
    out: list[str] = []
    for kind, segment, name in _segments(markup):
        if kind == "text":
            out.append(html_lib.unescape(segment))
        elif kind == "tag" and name not in _INLINE_TAGS:
            out.append(" ")
    return "".join(out)


def is_html(part: TextPart) -> bool:
    return part.content_type.lower().split(";", 1)[0].strip() == "text/html"


def mask_part(part: TextPart, rules: ContentRules,
              parties: Parties | Iterable[str] = ()) -> tuple[TextPart, list[Finding]]:
    if isinstance(parties, Parties):
        masked, findings = _mask_part(part, rules, parties)
        return masked, list(findings)
    masked, found = _mask_part.__wrapped__(part, rules, parties)
    return masked, list(found)


# The rules' decision and the rewrite both mask each text part of a message, with the same
# arguments: the second call is answered from here (a few parts of the last messages; a text part
# holds at most ``max_text_chars`` characters).
@lru_cache(maxsize=8)
def _mask_part(part: TextPart, rules: ContentRules,
               parties: Parties | Iterable[str]) -> tuple[TextPart, tuple[Finding, ...]]:
    masker: Callable[..., tuple[str, list[Finding]]] = mask_html if is_html(part) else mask_text
    text, findings = masker(part.text, rules, parties)
    return TextPart(part.content_type, text), tuple(findings)


# -- the rule ---------------------------------------------------------------------------

_REFUSALS = {"email": "content.email", "phone": "content.phone", "link": "content.link",
             "remote_image": "content.remote_image"}


def content_decision(parts: Iterable[TextPart], rules: ContentRules,
                     parties: Parties | Iterable[str] = ()) -> Decision:
    parts = list(parts)
    for part in parts:
        if len(part.text) > rules.max_text_chars:
            return refuse("content.too_long", length=len(part.text), limit=rules.max_text_chars)
    for part in parts:
        _, findings = mask_part(part, rules, parties)
        for finding in findings:
            if finding.action is Action.REFUSE:
                return refuse(_REFUSALS[finding.kind], host=finding.detail or "an unknown host",
                              allowed=_short_list(rules.link_hosts),
                              schemes="/".join(rules.link_schemes))
    return ACCEPT


def _short_list(hosts: tuple[str, ...], limit: int = 8) -> str:
    shown = ", ".join(hosts[:limit])
    return shown + (", ..." if len(hosts) > limit else "")
