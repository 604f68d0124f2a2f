"""SIP URIs (RFC 3261 section 19.1) and name-addr / addr-spec (section 20.10).

`SipUri.parse` normalises what RFC 3261 says compares case-insensitively
(scheme, host, parameter names) and keeps the rest as received, so that
`str(uri)` gives back an equivalent URI. Comparison per section 19.1.4 is
`equivalent_to`, not `==`.
"""

import functools
import ipaddress
import re
from urllib.parse import unquote as _pct_unquote

import attrs

from proxy.bounded import RecentMemo
from proxy.errors import SipParseError
from proxy.sip.grammar import (
    ascii_lower,
    format_params,
    is_token,
    param_value,
    parse_params,
    quote,
    quoted_string_end,
    unquote,
)

# user = 1*( unreserved / escaped / user-unreserved )
_USER_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,;?/]|%[0-9A-Fa-f]{2})+\Z")
# password = *( unreserved / escaped / "&" / "=" / "+" / "$" / "," )
_PASSWORD_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()&=+$,]|%[0-9A-Fa-f]{2})*\Z")
# hostname = *( domainlabel "." ) toplabel [ "." ]  (kept liberal: labels of alphanum and '-')
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.?\Z")
_PARAM_CHARS_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/:&+$]|%[0-9A-Fa-f]{2})+\Z")
_HEADER_CHARS_RE = re.compile(r"(?:[A-Za-z0-9\-_.!~*'()\[\]/?:+$]|%[0-9A-Fa-f]{2})*\Z")
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*\Z")

# Parameters that, present in only one of two URIs, make them differ (19.1.4).
_STRICT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def _pct_decode(text: str) -> str:
    return _pct_unquote(text, errors="surrogateescape") if "%" in text else text


_HOSTS: dict[str, str] = {}


def parse_host(text: str, what: str = "URI") -> str:
    """Validate a host (name, IPv4 or [IPv6]) and return it normalised.

    Names are lowercased; IPv6 references lose their brackets and take the
    compressed form, so that equal addresses compare equal as strings.
    Memoised: a site's messages name the same few hosts over and over.
    """
    host = _HOSTS.get(text)
    if host is not None:
        return host
    host = _parse_host(text, what)
    if len(_HOSTS) < 8192:
        _HOSTS[text] = host
    return host


def _parse_host(text: str, what: str) -> str:
    if not text:
        raise SipParseError.because(f"Missing host in {what}")
    if text[0] == "[":
        if text[-1] != "]":
            raise SipParseError.because(f"Bad IPv6 reference in {what}")
        try:
            return ipaddress.IPv6Address(text[1:-1]).compressed
        except ValueError:
            raise SipParseError.because(f"Bad IPv6 reference in {what}") from None
    if not _HOSTNAME_RE.match(text):
        raise SipParseError.because(f"Bad host in {what}")
    return ascii_lower(text)


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def parse_port(text: str, what: str = "URI") -> int:
    if not text.isdigit() or not text.isascii():
        raise SipParseError.because(f"Bad port in {what}")
    port = int(text)
    if port > 65535:
        raise SipParseError.because(f"Bad port in {what}")
    return port


def split_hostport(text: str, what: str) -> tuple[str, int | None]:
    """`host[:port]` with IPv6 references in brackets."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError.because(f"Bad IPv6 reference in {what}")
        host_text, rest = text[: end + 1], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise SipParseError.because(f"Bad host in {what}")
        port_text = rest[1:] if rest else None
    else:
        host_text, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
    port = parse_port(port_text, what) if port_text is not None else None
    return parse_host(host_text, what), port


@attrs.frozen
class SipUri:
    """A sip: or sips: URI. Host is normalised; user and params keep their case."""

    host: str
    user: str | None = None
    password: str | None = None
    port: int | None = None
    scheme: str = "sip"
    params: tuple[tuple[str, str | None], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> "SipUri":
        scheme, colon, rest = text.partition(":")
        scheme = ascii_lower(scheme)
        if not colon or scheme not in ("sip", "sips"):
            raise SipParseError.because("Not a SIP URI", status=416)
        if not rest:
            raise SipParseError.because("Empty SIP URI")
        user = password = None
        at = rest.rfind("@")
        if at >= 0:
            userinfo, rest = rest[:at], rest[at + 1 :]
            user, pcolon, pw = userinfo.partition(":")
            if not user or not _USER_RE.match(user):
                raise SipParseError.because("Bad user part in URI")
            if pcolon:
                if not _PASSWORD_RE.match(pw):
                    raise SipParseError.because("Bad password in URI")
                password = pw
        hostport, qmark, header_text = rest.partition("?")
        hostport, semi, param_text = hostport.partition(";")
        host, port = split_hostport(hostport, "URI")
        params = ()
        if semi:
            params = parse_params(param_text, "URI")
            for name, value in params:
                if value is not None and not _PARAM_CHARS_RE.match(value):
                    raise SipParseError.because("Bad URI parameter")
        headers = ()
        if qmark:
            pairs = []
            for item in header_text.split("&"):
                name, eq, value = item.partition("=")
                if not name or not eq or not _HEADER_CHARS_RE.match(name + value):
                    raise SipParseError.because("Bad URI header")
                pairs.append((name, value))
            headers = tuple(pairs)
        return cls(
            scheme=scheme,
            user=user,
            password=password,
            host=host,
            port=port,
            params=params,
            headers=headers,
        )

    def __str__(self) -> str:
        parts = [self.scheme, ":"]
        if self.user is not None:
            parts.append(self.user)
            if self.password is not None:
                parts.append(":" + self.password)
            parts.append("@")
        parts.append(format_host(self.host))
        if self.port is not None:
            parts.append(f":{self.port}")
        parts.append(format_params(self.params))
        if self.headers:
            parts.append("?" + "&".join(f"{n}={v}" for n, v in self.headers))
        return "".join(parts)

    def param(self, name: str) -> str | None:
        return param_value(self.params, name)

    @property
    def hostport(self) -> str:
        host = format_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"

    @property
    def decoded_user(self) -> str | None:
        return None if self.user is None else _pct_decode(self.user)

    def equivalent_to(self, other: object) -> bool:
        """URI comparison of RFC 3261 section 19.1.4 (escapes resolved, host caseless)."""
        if not isinstance(other, SipUri):
            return False
        if self.scheme != other.scheme or self.host != other.host or self.port != other.port:
            return False
        if _pct_decode(self.user or "") != _pct_decode(other.user or ""):
            return False
        if _pct_decode(self.password or "") != _pct_decode(other.password or ""):
            return False
        mine = {n: _param_cmp(v) for n, v in self.params}
        theirs = {n: _param_cmp(v) for n, v in other.params}
        for name in _STRICT_PARAMS:
            if (name in mine) != (name in theirs):
                return False
        for name in mine.keys() & theirs.keys():
            if mine[name] != theirs[name]:
                return False
        mine_h = {ascii_lower(n): _pct_decode(v) for n, v in self.headers}
        theirs_h = {ascii_lower(n): _pct_decode(v) for n, v in other.headers}
        return mine_h == theirs_h


def _param_cmp(value: str | None) -> str | None:
    return None if value is None else ascii_lower(_pct_decode(value))


@attrs.frozen
class OtherUri:
    """An absolute URI of another scheme (tel:, mailto:...), kept as received."""

    scheme: str
    rest: str

    @classmethod
    def parse(cls, text: str) -> "OtherUri":
        scheme, colon, rest = text.partition(":")
        if not colon or not _SCHEME_RE.match(scheme) or not rest:
            raise SipParseError.because("Bad URI")
        if any(c in rest for c in " \t<>\""):
            raise SipParseError.because("Bad URI")
        return cls(scheme=ascii_lower(scheme), rest=rest)

    def __str__(self) -> str:
        return f"{self.scheme}:{self.rest}"

    def equivalent_to(self, other: object) -> bool:
        return self == other


Uri = SipUri | OtherUri


# Parsed URIs and name-addrs by their exact text: the same few recur in every message (a REGISTER's
# Request-URI is the domain; a phone's To and Contact are the same at every refresh; the second REGISTER of a
# digest round repeats the first's From). The values are immutable, so one object serves every message.
# Only successes are kept, in a bounded two-generation memo: a stranger's random values cost nothing but
# the parse they would have cost anyway. bench/count_register.sh: 9% fewer instructions per registration.
# Texts longer than _MEMO_TEXT are parsed every time: 4 x 2,048 entries of at most 200 characters stay a few
# MB, where 60 KB header values would pin hundreds.
_URIS = RecentMemo(2048)
_NAME_ADDRS = RecentMemo(2048)
_MEMO_TEXT = 200


def parse_uri(text: str) -> Uri:
    """A SIP URI when the scheme is sip/sips, else an opaque absolute URI."""
    uri = _URIS.get(text)
    if uri is not None:
        return uri
    scheme = ascii_lower(text[:5])
    if scheme.startswith("sip:") or scheme.startswith("sips:"):
        uri = SipUri.parse(text)
    else:
        uri = OtherUri.parse(text)
    if len(text) <= _MEMO_TEXT:
        _URIS.put(text, uri)
    return uri


@attrs.frozen
class NameAddr:
    """The value of From, To, Contact, Route, Record-Route (name-addr or addr-spec).

    The URI is kept as text and parsed when first asked for: a proxy needs
    the tags of From and To on every message but their URIs rarely (RFC 3261
    16.3 asks it to check only what it uses).
    """

    uri_text: str
    display_name: str | None = None
    params: tuple[tuple[str, str | None], ...] = ()
    bracketed: bool = True

    @classmethod
    def of(cls, uri: "Uri", display_name: str | None = None, params=()) -> "NameAddr":
        return cls(uri_text=str(uri), display_name=display_name, params=tuple(params))

    @functools.cached_property
    def uri(self) -> "Uri":
        return parse_uri(self.uri_text)

    @classmethod
    def parse(cls, text: str, what: str = "header") -> "NameAddr":
        parsed = _NAME_ADDRS.get(text)
        if parsed is None:
            parsed = cls._parse(text, what)
            if len(text) <= _MEMO_TEXT:
                _NAME_ADDRS.put(text, parsed)
        return parsed

    @classmethod
    def _parse(cls, text: str, what: str) -> "NameAddr":
        text = text.strip(" \t")
        if not text:
            raise SipParseError.because(f"Empty {what}")
        display = None
        if text[0] == '"':
            end = quoted_string_end(text, 0)
            display = unquote(text[:end])
            rest = text[end:].lstrip(" \t")
            if not rest.startswith("<"):
                raise SipParseError.because(f"Bad display name in {what}")
        else:
            lt = text.find("<")
            if lt >= 0:
                words = text[:lt].split()
                if not all(is_token(w) for w in words):
                    raise SipParseError.because(f"Bad display name in {what}")
                display = " ".join(words) if words else None
                rest = text[lt:]
            else:
                rest = None
        if rest is not None:
            gt = rest.find(">")
            if gt < 0:
                raise SipParseError.because(f"Missing '>' in {what}")
            uri_text = rest[1:gt]
            if not uri_text or uri_text != uri_text.strip(" \t") or " " in uri_text:
                raise SipParseError.because(f"Bad URI in {what}")
            after = rest[gt + 1 :].strip(" \t")
            bracketed = True
        else:
            # addr-spec: the URI cannot carry ';' params, '?' headers or ','
            # (section 20.10); what follows ';' belongs to the header.
            uri_text, semi, after = text.partition(";")
            uri_text = uri_text.rstrip(" \t")
            if semi:
                after = ";" + after
            if any(c in uri_text for c in "?, \t"):
                raise SipParseError.because(f"Bad URI in {what}")
            bracketed = False
        params = ()
        if after:
            if after[0] != ";":
                raise SipParseError.because(f"Junk after URI in {what}")
            params = parse_params(after[1:], what)
        if not uri_text or ":" not in uri_text:
            raise SipParseError.because(f"Bad URI in {what}")
        return cls(uri_text=uri_text, display_name=display, params=params, bracketed=bracketed)

    def __str__(self) -> str:
        if self.display_name is not None:
            name = self.display_name
            shown = name if name and all(is_token(w) for w in name.split(" ")) else quote(name)
            head = f"{shown} <{self.uri_text}>"
        else:
            head = f"<{self.uri_text}>"
        return head + format_params(self.params)

    @property
    def tag(self) -> str | None:
        return param_value(self.params, "tag")

    def param(self, name: str) -> str | None:
        return param_value(self.params, name)

    def with_param(self, name: str, value: str | None) -> "NameAddr":
        kept = tuple(p for p in self.params if p[0] != name)
        return attrs.evolve(self, params=kept + ((name, value),))
