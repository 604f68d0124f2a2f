"""Bytes to messages and back: start line, header section, body framing.

`parse_message` does only the framing work (RFC 3261 sections 7.1-7.5 and
18.3): start line, header lines with folding undone, Content-Length. Field
values are parsed later, on demand (see message.py).

Framing rules:
- datagram: the body is the rest of the datagram when Content-Length is
  absent, and is cut to Content-Length when present (extra octets ignored,
  RFC 4475 3.1.1.8); a Content-Length larger than what arrived is a 400.
- stream: Content-Length is required; `StreamFramer` cuts the byte stream
  into messages with it.
"""

import re

from proxy.errors import SipParseError
from proxy.sip.grammar import TOKEN_RE
from proxy.sip.headers import _KEYS, _NAMES, SINGLE_HEADERS, Headers, header_key
from proxy.sip.message import SIP_VERSION, Request, Response

MAX_DATAGRAM = 65507
_SINGLE = frozenset(SINGLE_HEADERS)
_KNOWN_METHODS = frozenset(("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "REFER", "NOTIFY", "INFO",
                            "SUBSCRIBE", "UPDATE", "PRACK", "MESSAGE", "PUBLISH"))
_VERSION_RE = re.compile(r"SIP/(\d+)\.(\d+)\Z", re.IGNORECASE)


class ResponseParseError(SipParseError):
    """A malformed response: it is dropped, never answered."""


def parse_message(data: bytes, *, stream: bool = False, head_only: bool = False) -> Request | Response:
    """Parse one message. Raises SipParseError (ResponseParseError for responses).

    `head_only` reads just the start line and headers, skipping the version
    and body checks: how the server recovers enough of a refused request
    (bad Content-Length, SIP/7.0, too large) to tell its sender why.
    """
    head_end = data.find(b"\r\n\r\n")
    if head_end >= 0:
        body_start = head_end + 4
    else:
        head_end = data.find(b"\n\n")
        if head_end >= 0:
            body_start = head_end + 2
        elif stream:
            raise SipParseError.because("Incomplete message")
        else:
            # A datagram that ends without the empty line: all header.
            head_end = body_start = len(data.rstrip(b"\r\n"))
    # surrogateescape: Latin-1 caller IDs from the phones (seed 001 line 757)
    # are not UTF-8; they survive the round trip byte for byte.
    text = data[:head_end].decode("utf-8", "surrogateescape")
    lines = text.split("\r\n")
    if len(lines) == 1 and "\n" in text:
        lines = text.split("\n")
    if "\n " in text or "\n\t" in text:
        # Undo folding (section 7.3.1) once for the whole header section.
        lines = _unfold(lines)
    start = lines[0]
    if start.startswith("SIP/"):
        return _parse_response(start, lines, data, body_start, stream)
    if head_only:
        return _parse_request_head(start, lines)
    return _parse_request(start, lines, data, body_start, stream)


def _unfold(lines: list[str]) -> list[str]:
    """Join continuation lines (leading SP/HT) to the line before, the whitespace around the break becoming one SP.

    Linear in the header size: each line is stripped once. (A regular
    expression for "whitespace, newline, whitespace" backtracks over every
    long run of spaces that is not followed by a fold: quadratic, 4 s for a
    30 KB datagram.)
    """
    out: list[list[str]] = []
    for line in lines:
        if out and line[:1] in (" ", "\t"):
            pieces = out[-1]
            pieces[-1] = pieces[-1].rstrip(" \t")
            pieces.append(line.lstrip(" \t"))
        else:
            out.append([line])
    return [" ".join(pieces) for pieces in out]


def _parse_request(start, lines, data, body_start, stream) -> Request:
    parts = start.split(" ")
    if len(parts) != 3:
        raise SipParseError.because("Malformed request line")
    method, uri, version = parts
    if method not in _KNOWN_METHODS and not TOKEN_RE.match(method):
        raise SipParseError.because("Malformed request line")
    if not uri or uri[0] == "<" or "\t" in uri:
        raise SipParseError.because("Malformed Request-URI")
    if version != SIP_VERSION and version.upper() != SIP_VERSION:
        if _VERSION_RE.match(version):
            raise SipParseError.because("Version Not Supported", status=505)
        raise SipParseError.because("Malformed request line")
    headers = _parse_headers(lines, SipParseError)
    body = _frame_body(headers, data, body_start, stream, SipParseError)
    return Request(method, uri, headers, body)


def _parse_request_head(start, lines) -> Request:
    parts = start.split(" ")
    if len(parts) != 3 or not TOKEN_RE.match(parts[0]):
        raise SipParseError.because("Malformed request line")
    # Lenient: drop lines that are not headers, keep what can address a 400.
    kept = [start] + [line for line in lines[1:] if ":" in line and TOKEN_RE.match(line.partition(":")[0].rstrip(" \t"))]
    return Request(parts[0], parts[1], _parse_headers(kept, SipParseError))


def _parse_response(start, lines, data, body_start, stream) -> Response:
    parts = start.split(" ", 2)
    if len(parts) < 2:
        raise ResponseParseError.because("Malformed status line")
    version, code = parts[0], parts[1]
    reason = parts[2] if len(parts) == 3 else ""
    if version.upper() != SIP_VERSION:
        raise ResponseParseError.because("Version Not Supported", status=505)
    if len(code) != 3 or not code.isdigit() or not "100" <= code <= "699":
        raise ResponseParseError.because("Bad status code")
    headers = _parse_headers(lines, ResponseParseError)
    body = _frame_body(headers, data, body_start, stream, ResponseParseError)
    return Response(int(code), reason, headers, body)


def _parse_headers(lines: list[str], error) -> Headers:
    # Hot path: one partition per line; the token check runs only for names
    # not seen before (the key cache holds only names that passed it); the
    # first-value index is built in the same pass.
    keys = _KEYS
    names = _NAMES
    fields = []
    first = {}
    repeated = None
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        key = keys.get(name) if colon else None
        if key is None:
            if not colon:
                if not line.strip(" \t"):
                    continue
                raise error.because("Malformed header line")
            name = name.rstrip(" \t")
            if not TOKEN_RE.match(name):
                raise error.because("Malformed header name")
            key = header_key(name)
        else:
            name = names[name]
        value = value.strip(" \t")
        fields.append((key, name, value))
        if key not in first:
            first[key] = value
        elif key in _SINGLE and repeated is None:
            repeated = key
            if key == "content-length" and value != first[key]:
                raise error.because("Conflicting Content-Length")
    return Headers(tuple(fields), first, repeated)


def _frame_body(headers: Headers, data: bytes, body_start: int, stream: bool, error) -> bytes:
    text = headers.get("content-length")
    if text is None:
        if stream:
            raise error.because("Missing Content-Length")
        return data[body_start:]
    if not text.isdigit() or not text.isascii():
        raise error.because("Bad Content-Length")
    length = int(text)
    available = len(data) - body_start
    if length > available:
        raise error.because("Content-Length larger than message")
    return data[body_start : body_start + length]


class StreamFramer:
    """Cuts a TCP/TLS byte stream into whole messages by Content-Length.

    `feed(data)` returns the complete messages now available as bytes.
    CRLF keepalives between messages (RFC 5626 section 3.5.1) are skipped.
    A header section longer than `max_size`, or a message larger, raises
    SipParseError(513); a missing or bad Content-Length raises 400 and the
    stream cannot be resynchronised, so the connection should be closed.
    """

    def __init__(self, max_size: int = MAX_DATAGRAM):
        self.max_size = max_size
        self._buffer = b""
        self._searched = 0  # bytes of the buffer already searched for the end of the header section

    def feed(self, data: bytes) -> list[bytes]:
        # Linear in the bytes received, however they are cut: the header end is searched
        # for only in what is new (tiny segments), and the buffer is cut once per call.
        buf = self._buffer + data if self._buffer else data
        out = []
        pos = 0
        while True:
            start = _NOT_CRLF.search(buf, pos)
            if start is None:
                pos = len(buf)
                self._searched = 0
                break
            if start.start() != pos:
                self._searched = 0
            pos = start.start()
            end = buf.find(b"\r\n\r\n", max(pos, pos + self._searched - 3))
            if end < 0:
                self._searched = len(buf) - pos
                if self._searched > self.max_size:
                    raise SipParseError.because("Message Too Large", status=513)
                break
            length = _stream_content_length(buf[pos:end])
            total = end + 4 + length - pos
            if total > self.max_size:
                raise SipParseError.because("Message Too Large", status=513)
            if len(buf) - pos < total:
                self._searched = end - pos  # the header end is known: no new search next time
                break
            out.append(buf[pos:pos + total])
            pos += total
            self._searched = 0
        self._buffer = buf[pos:]
        return out


_NOT_CRLF = re.compile(rb"[^\r\n]")
_CL_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)


def _stream_content_length(head: bytes) -> int:
    found = _CL_RE.findall(head)
    if not found:
        raise SipParseError.because("Missing Content-Length")
    values = {v.strip() for v in found}
    if len(values) > 1:
        raise SipParseError.because("Conflicting Content-Length")
    value = values.pop()
    if not value.isdigit():
        raise SipParseError.because("Bad Content-Length")
    return int(value)
