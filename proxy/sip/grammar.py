"""Small pieces of the RFC 3261 section 25 grammar shared by URIs and headers.

Pure functions on `str`; they raise `SipParseError` with a reason that names
the defect, so the caller can put it in a 400 reason phrase.
"""

import re

from proxy.errors import SipParseError

# RFC 3261 section 25.1: token = 1*(alphanum / "-" / "." / "!" / "%" / "*" / "_" / "+" / "`" / "'" / "~")
TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")
_LWS_RE = re.compile(r"[ \t]+")

# ASCII-only lowercasing (service-identity style): str.lower() would also fold
# non-ASCII letters, which SIP compares byte for byte.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    # str.lower is the fast path and is exact for ASCII text.
    return text.lower() if text.isascii() else text.translate(_ASCII_LOWER)


def is_token(text: str) -> bool:
    return TOKEN_RE.match(text) is not None


def quoted_string_end(text: str, start: int) -> int:
    """Index just past the closing quote of the quoted-string opening at `start`.

    Finds quotes with str.find (C speed) and counts the backslashes before
    each: an odd number means the quote is escaped (quoted-pair).
    """
    i = start + 1
    while True:
        j = text.find('"', i)
        if j < 0:
            raise SipParseError.because("Unterminated quoted string")
        k = j - 1
        while k > start and text[k] == "\\":
            k -= 1
        if (j - 1 - k) % 2 == 0:
            return j + 1
        i = j + 1


def unquote(text: str) -> str:
    """The content of a quoted-string, with quoted-pairs resolved."""
    inner = text[1:-1]
    if "\\" not in inner:
        return inner
    out = []
    i = 0
    while i < len(inner):
        c = inner[i]
        if c == "\\" and i + 1 < len(inner):
            out.append(inner[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def split_outside_quotes(text: str, separator: str) -> list[str]:
    """Split on `separator` where it is not inside a quoted string or <...>.

    Used for comma-separated header values (Via, Contact, Route) and for
    parameter lists; a comma inside "Doe, John" or <sip:a;x=1,2> stays put.
    """
    if '"' not in text:  # (a quote must always be scanned: an unterminated one is a 400)
        if separator not in text:
            return [text]  # one part (the usual Contact or Route): no scan
        if "<" not in text:
            return text.split(separator)
    parts = []
    depth = 0
    start = 0
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i = quoted_string_end(text, i)
            continue
        if c == "<":
            depth += 1
        elif c == ">":
            depth = max(0, depth - 1)
        elif c == separator and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


_PARAM_NAMES: dict[str, str] = {}


def _param_name(raw: str, what: str) -> str:
    """Lowercased parameter name; memoised for names that passed the token check."""
    name = _PARAM_NAMES.get(raw)
    if name is not None:
        return name
    stripped = raw.strip(" \t")
    if not is_token(stripped):
        raise SipParseError.because(f"Bad parameter in {what}")
    name = ascii_lower(stripped)
    if len(_PARAM_NAMES) < 4096:
        _PARAM_NAMES[raw] = name
    return name


def parse_params(text: str, what: str) -> tuple[tuple[str, str | None], ...]:
    """Parse `;name=value;flag` (the text after the first ';') into pairs.

    Names are lowercased (ASCII); values keep their case, quoted values keep
    their quotes so that serialising gives back what was received.
    """
    parts = split_outside_quotes(text, ";") if '"' in text else text.split(";")
    params = []
    for part in parts:
        raw, eq, value = part.partition("=")
        name = _param_name(raw, what)
        if eq:
            value = value.strip(" \t")
            if not value:
                raise SipParseError.because(f"Empty parameter value in {what}")
            if value[0] == '"':
                if quoted_string_end(value, 0) != len(value):
                    raise SipParseError.because(f"Bad quoted parameter in {what}")
            elif " " in value or "\t" in value:
                raise SipParseError.because(f"Bad parameter value in {what}")
            params.append((name, value))
        else:
            params.append((name, None))
    return tuple(params)


def format_params(params: tuple[tuple[str, str | None], ...]) -> str:
    return "".join(f";{n}" if v is None else f";{n}={v}" for n, v in params)


def param_value(params: tuple[tuple[str, str | None], ...], name: str) -> str | None:
    """Value of the first parameter called `name` ('' for a flag), or None."""
    for n, v in params:
        if n == name:
            return "" if v is None else v
    return None


def has_param(params: tuple[tuple[str, str | None], ...], name: str) -> bool:
    return any(n == name for n, _ in params)


def collapse_lws(text: str) -> str:
    return _LWS_RE.sub(" ", text)


def for_log(text: str) -> str:
    """Peer-supplied text made safe for log files.

    Non-UTF-8 bytes survive parsing as surrogate escapes (wire.py); a log
    file writer cannot encode those, so they are shown as \\xNN.
    """
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
