"""Cisco IP Phone XML objects as the 7940/7960 SIP firmware takes them (seed 001 line 597).

SIP firmware supports CallManager XML up to 3.0: CiscoIPPhoneText, Menu,
Input, Directory (and Image/GraphicMenu), but not SoftKeyItem, IconMenu,
Execute, Error or Response. It collapses white space and shows ISO 8859-1
(Latin-1) characters (line 757). So every document here is Latin-1 with
characters outside it transliterated (é stays, ő becomes o, others become
?), XML-escaped, and cut to the phone's field lengths.
"""

import unicodedata
from xml.sax.saxutils import escape

CONTENT_TYPE = b"text/xml; charset=ISO-8859-1"

# Field limits of the phone's XML objects (CallManager XML 3.0 services guide).
TITLE_MAX = 32
PROMPT_MAX = 32
NAME_MAX = 32
TELEPHONE_MAX = 32
MENU_ITEM_MAX = 64
TEXT_MAX = 4000
URL_MAX = 256
DIRECTORY_ENTRIES_MAX = 32
MENU_ITEMS_MAX = 100


# Letters that have no Unicode decomposition to a Latin-1 base.
_SPELLED = {"Ł": "L", "ł": "l", "Đ": "D", "đ": "d", "Œ": "OE", "œ": "oe", "ı": "i", "Ŧ": "T", "ŧ": "t",
            "Ħ": "H", "ħ": "h", "Ŋ": "N", "ŋ": "n", "ĸ": "k", "Ŀ": "L", "ŀ": "l", "\u2018": "'", "\u2019": "'",
            "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "-", "\u20ac": "EUR"}


def latin1(text: str, limit: int) -> str:
    """Text the phone can show: Latin-1 only, white space collapsed, at most `limit` characters."""
    out = []
    for ch in " ".join(text.split()):
        if ord(ch) < 256:
            out.append(ch)
            continue
        if ch in _SPELLED:
            out.append(_SPELLED[ch])
            continue
        base = unicodedata.normalize("NFKD", ch)
        kept = "".join(c for c in base if ord(c) < 256 and not unicodedata.combining(c))
        out.append(kept or "?")
    return "".join(out)[:limit]


def _field(tag: str, value: str, limit: int) -> str:
    return f"<{tag}>{escape(latin1(value, limit))}</{tag}>"


def document(body: str) -> bytes:
    return ('<?xml version="1.0" encoding="ISO-8859-1"?>\n' + body + "\n").encode("latin-1")


def text(title: str, message: str, prompt: str = "") -> bytes:
    parts = [_field("Title", title, TITLE_MAX)]
    if prompt:
        parts.append(_field("Prompt", prompt, PROMPT_MAX))
    parts.append(_field("Text", message, TEXT_MAX))
    return document("<CiscoIPPhoneText>" + "".join(parts) + "</CiscoIPPhoneText>")


def menu(title: str, items: list[tuple[str, str]], prompt: str = "") -> bytes:
    parts = [_field("Title", title, TITLE_MAX)]
    if prompt:
        parts.append(_field("Prompt", prompt, PROMPT_MAX))
    for name, url in items[:MENU_ITEMS_MAX]:
        parts.append("<MenuItem>" + _field("Name", name, MENU_ITEM_MAX) + _field("URL", url, URL_MAX) + "</MenuItem>")
    return document("<CiscoIPPhoneMenu>" + "".join(parts) + "</CiscoIPPhoneMenu>")


def input_form(title: str, prompt: str, url: str, items: list[tuple[str, str, str]]) -> bytes:
    """items: (display name, query parameter, input flags: A alphabetic, N numeric, T telephone...)."""
    parts = [_field("Title", title, TITLE_MAX), _field("Prompt", prompt, PROMPT_MAX), _field("URL", url, URL_MAX)]
    for display, param, flags in items:
        parts.append("<InputItem>" + _field("DisplayName", display, NAME_MAX) + _field("QueryStringParam", param, NAME_MAX)
                     + "<DefaultValue></DefaultValue>" + _field("InputFlags", flags, 4) + "</InputItem>")
    return document("<CiscoIPPhoneInput>" + "".join(parts) + "</CiscoIPPhoneInput>")


def directory(title: str, prompt: str, entries: list[tuple[str, str]]) -> bytes:
    parts = [_field("Title", title, TITLE_MAX), _field("Prompt", prompt, PROMPT_MAX)]
    for name, number in entries[:DIRECTORY_ENTRIES_MAX]:
        parts.append("<DirectoryEntry>" + _field("Name", name, NAME_MAX) + _field("Telephone", number, TELEPHONE_MAX)
                     + "</DirectoryEntry>")
    return document("<CiscoIPPhoneDirectory>" + "".join(parts) + "</CiscoIPPhoneDirectory>")
