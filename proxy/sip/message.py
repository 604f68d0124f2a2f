"""SIP requests and responses (RFC 3261 section 7).

A message is its start line, its `Headers` as received and its body as
bytes. The few fields a decision needs (Via, CSeq, Call-ID, From, To,
Max-Forwards, the Request-URI) are parsed the first time they are asked for
and remembered. `validate()` parses them all, which is what the server does
before a request reaches a transaction; a `SipParseError` from it names the
defect for the 400's reason phrase.

Hot-path shortcut: slotted classes with lazily filled slots rather than
frozen attrs classes, because attrs.evolve on every hop costs more than the
parse itself (bench/bench_parse.py). They are still never changed in place:
`with_*` methods return new messages.
"""

from proxy.errors import SipParseError
from proxy.sip.headers import SINGLE_HEADERS, CSeq, Headers, Via, header_key, parse_uint
from proxy.sip.uri import NameAddr, Uri, parse_uri

SIP_VERSION = "SIP/2.0"
_UNSET = object()

REASONS = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 200: "OK", 202: "Accepted", 300: "Multiple Choices",
    301: "Moved Permanently", 302: "Moved Temporarily", 305: "Use Proxy",
    380: "Alternative Service", 400: "Bad Request", 401: "Unauthorized",
    402: "Payment Required", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    406: "Not Acceptable", 407: "Proxy Authentication Required", 408: "Request Timeout",
    410: "Gone", 413: "Request Entity Too Large", 414: "Request-URI Too Long",
    415: "Unsupported Media Type", 416: "Unsupported URI Scheme", 420: "Bad Extension",
    421: "Extension Required", 423: "Interval Too Brief", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 491: "Request Pending", 493: "Undecipherable",
    500: "Server Internal Error", 501: "Not Implemented", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Server Time-out", 505: "Version Not Supported",
    513: "Message Too Large", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable",
}


class Message:
    """What requests and responses share: headers, body, and the lazily parsed fields."""

    __slots__ = ("headers", "body", "_vias", "_top_via", "_cseq", "_from", "_to", "_call_id")

    def __init__(self, headers: Headers, body: bytes = b""):
        self.headers = headers
        self.body = body
        self._vias = self._top_via = self._cseq = self._from = self._to = self._call_id = _UNSET

    @property
    def vias(self) -> list[Via]:
        """Every Via, top first."""
        if self._vias is _UNSET:
            values = self.headers.values("via")
            if not values:
                raise SipParseError.because("Missing Via")
            self._vias = [Via.parse(v) for v in values]
        return self._vias

    @property
    def top_via(self) -> Via:
        if self._top_via is _UNSET:
            value = self.headers.first_value("via")
            if value is None:
                raise SipParseError.because("Missing Via")
            self._top_via = Via.parse(value)
        return self._top_via

    @property
    def cseq(self) -> CSeq:
        if self._cseq is _UNSET:
            self._cseq = CSeq.parse(self._single("cseq", "CSeq"))
        return self._cseq

    @property
    def call_id(self) -> str:
        if self._call_id is _UNSET:
            value = self._single("call-id", "Call-ID").strip(" \t")
            if not value or " " in value:
                raise SipParseError.because("Bad Call-ID")
            self._call_id = value
        return self._call_id

    @property
    def from_(self) -> NameAddr:
        if self._from is _UNSET:
            self._from = NameAddr.parse(self._single("from", "From"), "From")
        return self._from

    @property
    def to(self) -> NameAddr:
        if self._to is _UNSET:
            self._to = NameAddr.parse(self._single("to", "To"), "To")
        return self._to

    def _single(self, key: str, label: str) -> str:
        value = self.headers.get(key)
        if value is None:
            raise SipParseError.because(f"Missing {label}")
        return value

    def validate(self) -> None:
        """Parse every field the proxy relies on; raise SipParseError on the first defect.

        RFC 3261 section 8.1.1: To, From, CSeq, Call-ID, Max-Forwards (optional
        here, RFC 2543 peers omit it) and the top Via: a proxy checks what it
        uses (section 16.3); lower Vias are the next hops' business. A
        single-value header given twice is refused (RFC 4475 3.3.8).
        """
        repeated = self.headers.repeated(SINGLE_HEADERS)
        if repeated is not None:
            raise SipParseError.because(f"Multiple {_LABELS[repeated]} headers")
        self.top_via
        self.cseq
        self.call_id
        self.from_
        self.to

    def serialize(self) -> bytes:
        """Wire form. Content-Length is made to count the body's bytes."""
        lines = [self.start_line()]
        headers = self.headers
        length = str(len(self.body))
        if headers.value_of_key("content-length") != length:
            headers = headers.set("Content-Length", length)
        headers.serialize_into(lines)
        lines.append("")
        lines.append("")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape") + self.body


_LABELS = {
    "call-id": "Call-ID", "cseq": "CSeq", "from": "From", "to": "To",
    "max-forwards": "Max-Forwards", "content-type": "Content-Type", "content-length": "Content-Length",
}


class Request(Message):
    __slots__ = ("method", "uri_text", "_uri")

    def __init__(self, method: str, uri: str, headers: Headers, body: bytes = b""):
        # Fields set here rather than through super().__init__: one call less per hop.
        self.headers = headers
        self.body = body
        self._vias = self._top_via = self._cseq = self._from = self._to = self._call_id = _UNSET
        self.method = method
        self.uri_text = uri
        self._uri = _UNSET

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri_text}>"

    def start_line(self) -> str:
        return f"{self.method} {self.uri_text} {SIP_VERSION}"

    @property
    def uri(self) -> Uri:
        if self._uri is _UNSET:
            uri = parse_uri(self.uri_text)
            if getattr(uri, "headers", ()):
                # RFC 3261 19.1.5 / RFC 4475 3.1.2.11: no headers in a Request-URI.
                raise SipParseError.because("Headers in Request-URI")
            self._uri = uri
        return self._uri

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("max-forwards")
        return None if value is None else parse_uint(value, "Max-Forwards", 255)

    def validate(self) -> None:
        super().validate()
        if self.cseq.method != self.method:
            raise SipParseError.because("CSeq method does not match request method")
        self.max_forwards
        # The Request-URI scheme is checked where the request is handled (416).

    def with_headers(self, headers: Headers) -> "Request":
        return Request(self.method, self.uri_text, headers, self.body)

    def with_uri(self, uri: str) -> "Request":
        return Request(self.method, uri, self.headers, self.body)



class Response(Message):
    __slots__ = ("status", "reason")

    def __init__(self, status: int, reason: str, headers: Headers, body: bytes = b""):
        super().__init__(headers, body)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"

    def start_line(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def with_headers(self, headers: Headers) -> "Response":
        return Response(self.status, self.reason, headers, self.body)


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    extra: tuple[tuple[str, str], ...] = (),
    body: bytes = b"",
) -> Response:
    """A response to `request` per RFC 3261 section 8.2.6.2.

    Via (all values, in order), From, Call-ID and CSeq are copied; To too,
    with `to_tag` added when the request's To has none and this is not a 100.
    """
    fields = []
    to_seen = False
    for field in request.headers.keyed():  # the request's fields carry their keys: none is looked up again
        key = field[0]
        if key in _RESPONSE_COPIES:
            fields.append(field)
        elif key == "to" and not to_seen:
            to_seen = True
            if to_tag and status > 100 and not _has_tag(request):
                field = (key, field[1], f"{field[2]};tag={to_tag}")
            fields.append(field)
    for name, value in extra:
        fields.append((header_key(name), name, value))
    return Response(status, reason or REASONS.get(status, "Unknown"), Headers(tuple(fields)), body)


_RESPONSE_COPIES = frozenset(("via", "from", "call-id", "cseq"))


def _copied(request: Request, keys: frozenset[str]) -> list[tuple[str, str]]:
    """The request's lines for these header keys, in order, as they came (name and value untouched)."""
    return [(name, value) for name, value in request.headers if header_key(name) in keys]


_CANCEL_COPIES = frozenset(("from", "to", "call-id", "route"))
_ACK_COPIES = frozenset(("from", "call-id", "route", "max-forwards"))


def make_cancel(invite: Request) -> Request:
    """CANCEL for an INVITE we sent (section 9.1): same Request-URI, top Via, From, To, Call-ID, Route, CSeq number."""
    fields = [("Via", invite.headers.first_value("via"))] + _copied(invite, _CANCEL_COPIES)
    fields += [("CSeq", f"{invite.cseq.number} CANCEL"), ("Max-Forwards", "70")]
    return Request("CANCEL", invite.uri_text, Headers.of(*fields))


def make_ack(invite: Request, response: Response) -> Request:
    """ACK for a non-2xx final to an INVITE we sent (section 17.1.1.3): hop by hop, the response's To."""
    fields = [("Via", invite.headers.first_value("via"))] + _copied(invite, _ACK_COPIES)
    fields += [("To", response.headers.get("to")), ("CSeq", f"{invite.cseq.number} ACK")]
    return Request("ACK", invite.uri_text, Headers.of(*fields))


def _has_tag(request: Request) -> bool:
    """Whether To has a tag; an unparsable To is echoed as it came (the 400 names it)."""
    try:
        return request.to.tag is not None
    except SipParseError:
        return True
