"""Header fields: the ordered multimap, compact forms, and the structured
headers a proxy decides on (Via, CSeq).

`Headers` keeps every field as it came off the wire, in order, as
`(key, name, value)`: `key` is the canonical lowercase long name used for
lookup, `name` is what the peer wrote (a compact `v` stays `v` when
forwarded). Only the fields a decision needs are ever parsed further.
"""

import re

import attrs

from proxy.errors import SipParseError
from proxy.sip.grammar import (
    TOKEN_RE,
    ascii_lower,
    is_token,
    format_params,
    has_param,
    param_value,
    parse_params,
    split_outside_quotes,
)
from proxy.sip.uri import format_host, parse_host, parse_port

# RFC 3261 section 7.3.3 and the IANA registry: compact form -> long name.
COMPACT_FORMS = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "n": "identity-info",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Fields whose value is a comma-separated list (section 7.3.1). Others, such
# as WWW-Authenticate or Date, carry commas inside one value.
LIST_HEADERS = frozenset(
    {
        "via", "route", "record-route", "contact", "allow", "supported", "require",
        "proxy-require", "unsupported", "accept", "accept-encoding", "accept-language",
        "content-encoding", "allow-events", "in-reply-to", "alert-info", "call-info",
        "error-info", "reply-to", "warning", "also",
    }
)

# Fields that may appear once only (section 20); a second one is a 400.
SINGLE_HEADERS = ("call-id", "cseq", "from", "to", "max-forwards", "content-type", "content-length")


_KEYS: dict[str, str] = {}
# The same names as str objects, one each: a parsed message keeps these instead of its own copies
# (every ringing call holds its INVITE's header names).
_NAMES: dict[str, str] = {}


def header_key(name: str) -> str:
    """Canonical lookup key for a header name: ASCII lowercase, compact forms expanded.

    Memoised: the same few dozen names recur in every message, and this runs
    once per header line and once per lookup (bench/bench_parse.py).
    """
    key = _KEYS.get(name)
    if key is not None:
        return key
    key = ascii_lower(name)
    if len(key) == 1:
        key = COMPACT_FORMS.get(key, key)
    if len(_KEYS) < 4096 and TOKEN_RE.match(name):
        _KEYS[name] = key
        _NAMES[name] = name
    return key


class Headers:
    """An immutable, ordered, case-insensitive multimap of header fields.

    Hot-path shortcut: a slotted class over a tuple rather than an attrs class,
    because it is built once per message and the proxy's edits (push a Via,
    set Max-Forwards, drop a Route) copy one tuple; see bench/bench_parse.py.
    """

    __slots__ = ("_fields", "_first", "_repeated")

    def __init__(self, fields: tuple[tuple[str, str, str], ...] = (), first: dict[str, str] | None = None,
                 repeated: str | None = None):
        # `first` and `repeated` are what the parser learnt in its one pass:
        # the first value per key, and the first single-value header seen twice.
        self._fields = fields
        self._first = first
        self._repeated = repeated

    def _index(self) -> dict[str, str]:
        """First value per key, built on the first lookup: later lookups are one dict get."""
        first = self._first
        if first is None:
            first = {}
            for k, _, value in reversed(self._fields):
                first[k] = value
            self._first = first
        return first

    @classmethod
    def of(cls, *pairs: tuple[str, str]) -> "Headers":
        return cls(tuple((header_key(n), n, v) for n, v in pairs))

    def __iter__(self):
        return ((name, value) for _, name, value in self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Headers) and self._fields == other._fields

    def __hash__(self) -> int:
        return hash(self._fields)

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"

    def __contains__(self, name: str) -> bool:
        return header_key(name) in self._index()

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field's whole value (not split on commas)."""
        first = self._first
        if first is None:
            first = self._index()
        return first.get(_KEYS.get(name) or header_key(name), default)

    def keyed(self) -> tuple[tuple[str, str, str], ...]:
        """Every field as (canonical key, name as received, value): for copying fields without looking keys up."""
        return self._fields

    def value_of_key(self, key: str) -> str | None:
        """The first value for a canonical key; without building the index when none is built yet (a message
        about to be serialized once, not looked into)."""
        first = self._first
        if first is not None:
            return first.get(key)
        for k, _, value in self._fields:
            if k == key:
                return value
        return None

    def get_lines(self, name: str) -> list[str]:
        """Every field of that name, each whole value as received."""
        key = header_key(name)
        return [value for k, _, value in self._fields if k == key]

    def values(self, name: str) -> list[str]:
        """Every value of a list header, across lines and commas (section 7.3.1)."""
        key = header_key(name)
        out = []
        for k, _, value in self._fields:
            if k == key:
                for part in split_outside_quotes(value, ","):
                    part = part.strip(" \t")
                    if part:
                        out.append(part)
        return out

    def repeated(self, names: tuple[str, ...]) -> str | None:
        """The first of `names` (canonical keys) that occurs more than once, in one pass."""
        if self._first is not None and names is SINGLE_HEADERS:
            return self._repeated
        seen = set()
        for k, _, _ in self._fields:
            if k in names:
                if k in seen:
                    return k
                seen.add(k)
        return None

    def count(self, name: str) -> int:
        key = header_key(name)
        return sum(1 for k, _, _ in self._fields if k == key)

    def prepend(self, name: str, value: str) -> "Headers":
        return Headers(((header_key(name), name, value),) + self._fields)

    def append(self, name: str, value: str) -> "Headers":
        return Headers(self._fields + ((header_key(name), name, value),))

    def set(self, name: str, value: str) -> "Headers":
        """Replace the first field of that name in place, or append; drop the others."""
        key = header_key(name)
        fields = self._fields
        for i, field in enumerate(fields):
            if field[0] == key:
                rest = fields[i + 1 :]
                if self._repeated == key or any(f[0] == key for f in rest):
                    rest = tuple(f for f in rest if f[0] != key)
                return Headers(fields[:i] + ((key, field[1], value),) + rest)
        return Headers(fields + ((key, name, value),))

    def remove(self, name: str) -> "Headers":
        key = header_key(name)
        return Headers(tuple(f for f in self._fields if f[0] != key))

    def remove_first_value(self, name: str) -> "Headers":
        """Drop the first value of a list header: the top Via or top Route.

        When several values share a line, the line keeps the others, as they
        came (section 7.3.1 says both forms are equivalent).
        """
        key = header_key(name)
        out = list(self._fields)
        for i, (k, n, value) in enumerate(out):
            if k == key:
                parts = split_outside_quotes(value, ",")
                rest = ",".join(parts[1:]).strip(" \t")
                if rest:
                    out[i] = (k, n, rest)
                else:
                    del out[i]
                break
        return Headers(tuple(out))

    def first_value(self, name: str) -> str | None:
        """The first value of a list header (the top Via, the top Route)."""
        value = self.get(name)
        if value is None:
            return None
        if "," not in value:
            return value.strip(" \t")
        for part in split_outside_quotes(value, ","):
            part = part.strip(" \t")
            if part:
                return part
        return None

    def serialize_into(self, lines: list[str]) -> None:
        lines += [f"{name}: {value}" for _, name, value in self._fields]


@attrs.frozen
class Via:
    """One Via value (section 20.42): sent-protocol, sent-by and params."""

    transport: str
    host: str
    port: int | None = None
    params: tuple[tuple[str, str | None], ...] = ()
    protocol: str = "SIP/2.0"

    @classmethod
    def parse(cls, text: str) -> "Via":
        # Fast path for the shape nearly every Via has; anything else
        # (LWS around '/', IPv6, odd spacing) takes the full grammar below.
        m = _VIA_FAST_RE.match(text)
        if m is not None:
            transport, host_text, port_text, param_text = m.groups()
            port = parse_port(port_text, "Via") if port_text is not None else None
            params = parse_params(param_text, "Via") if param_text is not None else ()
            if params and has_param(params, "branch") and not param_value(params, "branch"):
                raise SipParseError.because("Bad Via: empty branch")
            return cls(transport=transport.upper(), host=parse_host(host_text, "Via"), port=port, params=params)
        proto, sep, rest = _split_sent_protocol(text)
        sent_by, semi, param_text = rest.partition(";")
        sent_by = sent_by.strip(" \t")
        if not sent_by:
            raise SipParseError.because("Bad Via: missing sent-by")
        host, port = _parse_sent_by(sent_by)
        params = parse_params(param_text, "Via") if semi else ()
        if has_param(params, "branch") and not param_value(params, "branch"):
            raise SipParseError.because("Bad Via: empty branch")
        return cls(protocol=proto, transport=sep, host=host, port=port, params=params)

    def __str__(self) -> str:
        sent_by = format_host(self.host)
        if self.port is not None:
            sent_by += f":{self.port}"
        return f"{self.protocol}/{self.transport} {sent_by}{format_params(self.params)}"

    @property
    def branch(self) -> str | None:
        return param_value(self.params, "branch")

    @property
    def received(self) -> str | None:
        return param_value(self.params, "received")

    @property
    def rport(self) -> str | None:
        """'' when the client asked for rport (RFC 3581), its value once filled, None without."""
        return param_value(self.params, "rport")

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return (self.host, self.port)

    def param(self, name: str) -> str | None:
        return param_value(self.params, name)

    def with_param(self, name: str, value: str | None) -> "Via":
        """Set a parameter, keeping its position if it exists already."""
        out = []
        done = False
        for n, v in self.params:
            if n == name:
                if not done:
                    out.append((name, value))
                    done = True
            else:
                out.append((n, v))
        if not done:
            out.append((name, value))
        return attrs.evolve(self, params=tuple(out))


_VIA_FAST_RE = re.compile(r"SIP/2\.0/([A-Za-z]+) ([A-Za-z0-9.\-]+)(?::([0-9]+))?(?:;(.*))?\Z")


def _split_sent_protocol(text: str) -> tuple[str, str, str]:
    """`SIP / 2.0 / UDP host...` -> ('SIP/2.0', 'UDP', 'host...'). LWS around '/' is legal."""
    pieces = text.split("/", 2)
    if len(pieces) != 3:
        raise SipParseError.because("Bad Via: sent-protocol")
    name = pieces[0].strip(" \t")
    version = pieces[1].strip(" \t")
    rest = pieces[2].lstrip(" \t")
    cut = 0
    while cut < len(rest) and rest[cut] not in " \t;":
        cut += 1
    transport = rest[:cut]
    if not is_token(name) or not is_token(version) or not is_token(transport):
        raise SipParseError.because("Bad Via: sent-protocol")
    # Transports are tokens; unknown ones are legal (RFC 4475 3.1.1.10).
    return f"{ascii_lower(name).upper()}/{version}", transport.upper(), rest[cut:]


def _parse_sent_by(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError.because("Bad Via: host")
        host_text, rest = text[: end + 1], text[end + 1 :].strip(" \t")
    else:
        host_text, _, port_part = text.partition(":")
        host_text = host_text.strip(" \t")
        rest = ":" + port_part if _ else ""
    port = None
    if rest:
        if rest[0] != ":":
            raise SipParseError.because("Bad Via: host")
        port = parse_port(rest[1:].strip(" \t"), "Via")
    return parse_host(host_text, "Via"), port


@attrs.frozen
class CSeq:
    """CSeq (section 20.16): a 32-bit sequence number and the method."""

    number: int
    method: str

    @classmethod
    def parse(cls, text: str) -> "CSeq":
        number, _, method = text.strip(" \t").partition(" ")
        method = method.strip(" \t")
        if not number.isdigit() or not number.isascii() or not method:
            raise SipParseError.because("Bad CSeq")
        value = int(number)
        if value > 0xFFFFFFFF:
            raise SipParseError.because("Bad CSeq: number too large")
        return cls(number=value, method=method)

    def __str__(self) -> str:
        return f"{self.number} {self.method}"


def parse_uint(text: str, what: str, limit: int) -> int:
    """A non-negative decimal (leading zeros allowed) no larger than `limit`."""
    text = text.strip(" \t")
    if not text.isdigit() or not text.isascii():
        raise SipParseError.because(f"Bad {what}")
    value = int(text)
    if value > limit:
        raise SipParseError.because(f"Bad {what}: value too large")
    return value


__all__ = [
    "COMPACT_FORMS",
    "CSeq",
    "Headers",
    "LIST_HEADERS",
    "SINGLE_HEADERS",
    "Via",
    "ascii_lower",
    "header_key",
    "parse_uint",
]
