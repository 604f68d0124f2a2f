"""Digest authentication (RFC 2617, RFC 3261 section 22).

Nonces are stateless: `<time>.<salt>.<hmac>` where the HMAC (SHA-256, a
secret kept in the state directory) covers the time, a random salt (so two
challenges in the same millisecond differ: a phone registers six lines at
once), the realm and the client's address. A nonce is accepted for `nonce_lifetime` seconds; an older one with
a valid HMAC gets a fresh challenge with `stale=true` (the phone retries
without asking its user).

Replay protection:
- qop=auth: the nonce-count must grow for each use of a nonce; the highest
  seen is remembered until the nonce expires.
- no qop (RFC 2069 answers, older 7940/7960 firmware): the nonce is bound to
  the source address, lives `nonce_lifetime_no_qop` seconds, and is accepted
  once.
The replay table is bounded (`max_tracked`) and expires from its oldest end,
so a REGISTER costs the same at any rate. When the bound forces an entry out
before its nonce expired, every nonce issued up to then is answered with a
fresh `stale=true` challenge: an evicted nonce can never be replayed.

The digest `uri` must name the Request-URI (RFC 2617 3.2.2.5, compared as
URIs, RFC 3261 22.4), else 400 "Digest uri mismatch": a response captured
for one request cannot be spent on another. With `accept_uri_of_proxy`
(default on) a `uri` naming this server itself is accepted too, for clients
that authenticate to the server rather than to the request.

Unknown users and wrong passwords get the same fresh challenge, after the
same work (a digest against a dummy HA1), so names cannot be enumerated.
Lockout (each an event: log line, counter, plugin event `auth_lockout`):
- `max_failures` failures for one user from one address within
  `failure_window` lock that pair for `lockout` seconds: one phone with a
  wrong password behind the site's NAT does not lock the site out;
- `address_max_failures` failures from one address (an IPv6 /64), any
  users, within `failure_window` lock the address (spraying);
- `slow_max_failures` failures for one user from anywhere within
  `slow_window` lock that user (patient guessing), except from addresses
  where the user authenticated within `slow_window`, so the real phone
  keeps working.
Only a wrong answer to a nonce this server issued to that very address
counts: a made-up, foreign or replayed nonce is refused (fresh challenge)
but cannot lock anyone out, since a forger never sees the nonce.

A line whose auth name is UNPROVISIONED is a phone nobody configured
(seed 001 lines 1112-1113, 2146: the default linex_authname): it gets 403
"Unprovisioned line" and a log line naming the phone.
"""

import base64
import hashlib
import hmac
import ipaddress
import secrets
from collections import deque
from typing import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.bounded import BoundedDict
from proxy.config import AuthSettings
from proxy.registration.credentials import ICredentials
from proxy.sip.grammar import for_log, quote, quoted_string_end, unquote
from proxy.errors import SipParseError
from proxy.sip.message import Request
from proxy.sip.uri import SipUri, Uri, parse_uri
from proxy.statedir import secret_file

log = Logger()

UNPROVISIONED = "UNPROVISIONED"
SECRET_FILE = "nonce-secret"
_DUMMY_HA1 = "0" * 32


@attrs.frozen
class Authenticated:
    user: str


@attrs.frozen
class Challenge:
    """Answer with 401/407 carrying this challenge header value."""

    header_value: str
    reason: str  # why: "no credentials", "stale nonce", "bad credentials"...


@attrs.frozen
class Refused:
    """Answer with this status (403, or 400 for credentials that do not fit the request) and reason phrase."""

    reason: str
    status: int = 403


AuthResult = Authenticated | Challenge | Refused


def load_secret(state_dir: str) -> bytes:
    """The HMAC key for nonces, created (0600) on first use so restarts keep nonces valid."""
    return secret_file(state_dir, SECRET_FILE, lambda: secrets.token_hex(32).encode())


def parse_digest(value: str) -> dict[str, str] | None:
    """The parameters of a `Digest ...` credentials value (lowercase names), or None for another scheme."""
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params = {}
    i = 0
    n = len(rest)
    while i < n:
        while i < n and rest[i] in " \t,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        j = eq + 1
        while j < n and rest[j] in " \t":
            j += 1
        if j < n and rest[j] == '"':
            end = quoted_string_end(rest, j)
            params[name] = unquote(rest[j:end])
            i = end
        else:
            end = rest.find(",", j)
            end = n if end < 0 else end
            params[name] = rest[j:end].strip()
            i = end
    return params


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8", "surrogateescape")).hexdigest()


def digest_response(ha1: str, params: dict[str, str], method: str) -> str:
    """The expected `response` (RFC 2617 3.2.2.1) for these credentials and HA1."""
    algorithm = params.get("algorithm", "MD5").lower()
    nonce = params.get("nonce", "")
    if algorithm == "md5-sess":
        ha1 = _md5(f"{ha1}:{nonce}:{params.get('cnonce', '')}")
    ha2 = _md5(f"{method}:{params.get('uri', '')}")
    qop = params.get("qop")
    if qop:
        return _md5(f"{ha1}:{nonce}:{params.get('nc', '')}:{params.get('cnonce', '')}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


class DigestAuthenticator:
    def __init__(self, clock: IReactorTime, credentials: ICredentials, realm: str, secret: bytes,
                 config: AuthSettings = AuthSettings(), names_this_server: Callable[[Uri], bool] | None = None,
                 observer: Callable[..., None] | None = None, worker: int | None = None, node: str = ""):
        self.clock = clock
        # With workers (proxy/workers/) each keeps its own replay table, so a nonce is good only at the worker
        # that issued it (its number is in the salt, under the HMAC); another worker answers it stale=true, and
        # the phone asks again there. Failures are shared (`share_failure`, `peer_failure`): lockouts hold for all.
        # With several nodes (`node`, docs/scaling.md) the node is in it too: a phone that fails over to another
        # node with its nonce gets a fresh challenge there, and a nonce can never be replayed at a second node.
        tag = (f"n{hashlib.sha256(node.encode()).hexdigest()[:6]}" if node else "") + (
            "" if worker is None else f"w{worker}")
        self._nonce_tag = f"{tag}-" if tag else ""
        self.share_failure: Callable[[str, str], None] | None = None
        self.share_success: Callable[[str, str], None] | None = None
        self.names_this_server = names_this_server  # a URI naming this server itself (no user)
        self.credentials = credentials
        self.realm = realm
        self.config = config
        self._secret = secret
        self._keyed = hmac.new(secret, digestmod=hashlib.sha256)
        bound = config.max_tracked
        # nonce -> highest nc seen (qop=auth), or _USED (no qop); oldest first.
        self._replay = BoundedDict(bound, on_evict=self._replay_evicted)
        self._replay_floor = 0.0  # nonces issued at or before this may have lost their replay state
        self._pair_failures = BoundedDict(bound)  # (user, address) -> recent failure times
        self._address_failures = BoundedDict(bound)  # address (IPv6: /64) -> recent failure times
        self._user_failures = BoundedDict(bound)  # user -> recent failure times (slow window)
        self._good = BoundedDict(bound)  # (user, address) -> last successful authentication
        self._locks = BoundedDict(bound)  # ("pair", user, address) | ("address", a) | ("user", u) -> until
        self.challenges = 0
        self.failures_by_reason: dict[str, int] = {}
        self.lockouts = 0
        self.lockouts_by_scope: dict[str, int] = {}
        self.observer = observer  # observer(event, **fields): auth_failure, auth_lockout (plugins, metrics)

    @property
    def evicted(self) -> int:
        """Entries pushed out of the bounded tables before their time (a sign of a flood)."""
        return sum(t.evicted for t in (self._replay, self._pair_failures, self._address_failures,
                                       self._user_failures, self._good, self._locks))

    # -- nonces -----------------------------------------------------------

    def _mac(self, stamp: str, salt: str, address: str) -> str:
        mac = self._keyed.copy()  # the key schedule is done once (a sixth of a nonce's cost otherwise)
        mac.update(f"{stamp}:{salt}:{self.realm}:{address}".encode("utf-8", "surrogateescape"))
        return base64.urlsafe_b64encode(mac.digest()[:18]).decode()

    def make_nonce(self, address: str) -> str:
        stamp = format(int(self.clock.seconds() * 1000), "x")
        salt = self._nonce_tag + secrets.token_hex(4)
        return f"{stamp}.{salt}.{self._mac(stamp, salt, address)}"

    def _nonce_age(self, nonce: str, address: str) -> float | None:
        """Seconds since the nonce was issued to this address, or None if it is not ours."""
        parts = nonce.split(".")
        if len(parts) != 3:
            return None
        stamp, salt, mac = parts
        if not hmac.compare_digest(mac.encode("utf-8", "surrogateescape"), self._mac(stamp, salt, address).encode()):
            return None
        issued = _issued_at(nonce)
        return None if issued is None else self.clock.seconds() - issued

    def challenge_value(self, address: str, stale: bool = False) -> str:
        parts = [f"Digest realm={quote(self.realm)}", f"nonce={quote(self.make_nonce(address))}", "algorithm=MD5"]
        if self.config.offer_qop:
            parts.append('qop="auth"')
        if stale:
            parts.append("stale=true")
        self.challenges += 1
        return ", ".join(parts)

    # -- verification -------------------------------------------------------

    def authenticate(self, request: Request, address: str, *, proxy: bool) -> AuthResult:
        """Check the request's (Proxy-)Authorization for our realm."""
        now = self.clock.seconds()
        self._expire_replay(now)
        if self._locked(("address", address_unit(address)), now):
            return Refused("Too many failed attempts")
        header = "proxy-authorization" if proxy else "authorization"
        params = None
        for value in request.headers.get_lines(header):
            candidate = parse_digest(value)
            if candidate is not None and candidate.get("realm") == self.realm:
                params = candidate
                break
        if params is None:
            # No credentials, or only for another realm or scheme (RFC 4475 3.3.7): challenge.
            return Challenge(self.challenge_value(address), "no credentials")
        username = params.get("username", "")
        if username.upper() == UNPROVISIONED:
            return self._unprovisioned(request, address)
        missing = [p for p in ("username", "nonce", "uri", "response") if not params.get(p)]
        if missing:
            return self._refuse(address, "malformed", f"Digest without {missing[0]}")
        if params.get("algorithm", "MD5").lower() not in ("md5", "md5-sess"):
            return self._refuse(address, "malformed", "Unsupported digest algorithm")
        if self._locked(("pair", username, address), now) or (
                self._locked(("user", username), now) and not self._recently_good(username, address, now)):
            return Refused("Too many failed attempts")
        if not self._uri_fits(params["uri"], request.uri_text):
            self._count("uri_mismatch")
            return Refused("Digest uri mismatch", status=400)
        nonce = params["nonce"]
        age = self._nonce_age(nonce, address)
        if age is None:
            return self._refuse(address, "bad_nonce", "Nonce not issued to this address")
        if self._nonce_tag and nonce.split(".")[1][:len(self._nonce_tag)] != self._nonce_tag:
            return Challenge(self.challenge_value(address, stale=True), "nonce of another worker or node")
        qop = params.get("qop")
        if qop:
            if qop.lower() != "auth" or not params.get("cnonce") or not params.get("nc"):
                return self._refuse(address, "malformed", "Bad qop parameters")
            lifetime = self.config.nonce_lifetime
        else:
            if not self.config.accept_rfc2069:
                return self._refuse(address, "malformed", "Digest without qop refused")
            lifetime = self.config.nonce_lifetime_no_qop
        if age > lifetime or (nonce not in self._replay and now - age <= self._replay_floor):
            return Challenge(self.challenge_value(address, stale=True), "stale nonce")
        record = self.credentials.lookup(username)
        ha1 = record.ha1 if record is not None and record.realm == self.realm else _DUMMY_HA1
        expected = digest_response(ha1, params, request.method)
        if record is None or not hmac.compare_digest(expected.encode(), params["response"].lower().encode("utf-8", "surrogateescape")):
            reason = "unknown_user" if record is None else "wrong_password"
            log.info("Digest failed for {user} from {address}", user=for_log(username), address=address)
            return self._fail(username, address, reason)
        # Only a correct response may consume a nonce-count or a nonce.
        if qop:
            try:
                nc = int(params["nc"], 16)
            except ValueError:
                return self._refuse(address, "malformed", "Bad nonce count")
            if nc <= self._replay.get(nonce, 0):
                return self._refuse(address, "replay", "Nonce count replayed")
            self._replay[nonce] = nc
        else:
            if nonce in self._replay:
                return self._refuse(address, "replay", "Nonce replayed")
            self._replay[nonce] = _USED
        self._pair_failures.pop((username, address), None)
        last_good = self._good.get((username, address))
        self._good[(username, address)] = now
        if self.share_success is not None and (last_good is None or now - last_good > self.config.slow_window / 2):
            self.share_success(username, address)  # seldom: what `_recently_good` needs at the other workers
        return Authenticated(username)

    def _uri_fits(self, digest_uri: str, request_uri: str) -> bool:
        """The digest-uri names the Request-URI, or (accept_uri_of_proxy) this server itself.

        Some clients (SIPp's [authentication] among them) put the address of the
        server they authenticate to in `uri`, not the Request-URI. Their answers
        bind the server, not the target; the phones' (the Request-URI) bind both.
        """
        if digest_uri == request_uri:
            return True
        try:
            parsed = parse_uri(digest_uri)
        except SipParseError:
            return False
        if _names_request(parsed, request_uri):
            return True
        return self.config.accept_uri_of_proxy and self.names_this_server is not None and self.names_this_server(parsed)

    def _unprovisioned(self, request: Request, address: str) -> Refused:
        log.warn(
            "Phone at {address} ({user_agent}{mac}) uses the default auth name UNPROVISIONED: "
            "set lineN_authname and lineN_password in its SIP<MAC>.cnf",
            address=address,
            user_agent=for_log(request.headers.get("user-agent", "unknown firmware")),
            mac=f", MAC {mac}" if (mac := mac_from_request(request)) else "",
        )
        self._count("unprovisioned")
        self._emit("auth_failure", reason="unprovisioned", address=address)
        return Refused("Unprovisioned line")

    def _emit(self, event: str, **fields) -> None:
        if self.observer is not None:
            self.observer(event, **fields)

    def _count(self, reason: str) -> None:
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1

    def _refuse(self, address: str, reason: str, detail: str) -> Challenge:
        """Credentials we cannot accept but that prove nothing against anyone: a fresh challenge, no lockout."""
        self._count(reason)
        self._emit("auth_failure", reason=reason, address=address)
        return Challenge(self.challenge_value(address), detail)

    def _fail(self, user: str, address: str, reason: str) -> AuthResult:
        """A wrong answer to our own nonce for this address: counts toward the three lockouts."""
        self._count(reason)
        self._emit("auth_failure", reason=reason, address=address, user=user)
        if self.share_failure is not None:
            self.share_failure(user, address)
        if self._record_failure(user, address, announce=True):
            return Refused("Too many failed attempts")
        return Challenge(self.challenge_value(address), "bad credentials")

    def peer_failure(self, user: str, address: str) -> None:
        """A failure another worker saw: it counts here too; the lockout it may cause is announced there."""
        self._record_failure(user, address, announce=False)

    def peer_success(self, user: str, address: str) -> None:
        """Another worker authenticated this user from this address (the slow lockout spares it)."""
        self._good[(user, address)] = self.clock.seconds()

    def _record_failure(self, user: str, address: str, announce: bool) -> bool:
        """Add the failure to the three windows; lock what crossed its limit. True if anything locked."""
        now = self.clock.seconds()
        c = self.config
        checks = (
            ("pair", (user, address), self._pair_failures, c.max_failures, c.failure_window),
            ("address", address_unit(address), self._address_failures, c.address_max_failures, c.failure_window),
            ("user", user, self._user_failures, c.slow_max_failures, c.slow_window),
        )
        locked = False
        for scope, key, table, limit, window in checks:
            times = table.get(key)
            if times is None or times.maxlen != limit:
                times = deque(maxlen=limit)
            times.append(now)
            table[key] = times
            if len(times) == limit and now - times[0] < window:
                table.pop(key, None)
                self._lock(scope, key, user, address, limit, announce)
                locked = True
        return locked

    def _lock(self, scope: str, key, user: str, address: str, count: int, announce: bool = True) -> None:
        self._locks[(scope, *key) if isinstance(key, tuple) else (scope, key)] = self.clock.seconds() + self.config.lockout
        if not announce:
            return
        self.lockouts += 1
        self.lockouts_by_scope[scope] = self.lockouts_by_scope.get(scope, 0) + 1
        self._emit("auth_lockout", scope=scope, user=user, address=address, count=count)
        what = {"pair": "{user} from {address}", "address": "address {address} (any user)",
                "user": "{user} (any address it has not authenticated from)"}[scope]
        log.warn(what + " locked out for {seconds:.0f} s after {count} failed authentications",
                 user=for_log(user), address=address, seconds=self.config.lockout, count=count, scope=scope)

    def _locked(self, key: tuple, now: float) -> bool:
        until = self._locks.get(key)
        if until is None:
            return False
        if until > now:
            return True
        del self._locks[key]
        return False

    def _recently_good(self, user: str, address: str, now: float) -> bool:
        last = self._good.get((user, address))
        return last is not None and now - last < self.config.slow_window

    def _replay_evicted(self, nonce: str, _value) -> None:
        issued = _issued_at(nonce)
        if issued is not None:
            self._replay_floor = max(self._replay_floor, issued)

    def _expire_replay(self, now: float) -> None:
        """Forget replay state of expired nonces from the oldest end: O(1) per request, amortised."""
        horizon = now - max(self.config.nonce_lifetime, self.config.nonce_lifetime_no_qop)
        replay = self._replay
        while replay:
            nonce = next(iter(replay))
            issued = _issued_at(nonce)
            if issued is not None and issued >= horizon:
                break
            replay.popitem(last=False)


_USED = -1


def _issued_at(nonce: str) -> float | None:
    try:
        return int(nonce.partition(".")[0], 16) / 1000
    except ValueError:
        return None


def address_unit(address: str) -> str:
    """The unit of spraying: an IPv4 address, or an IPv6 /64 (one host can hold a whole /64)."""
    if ":" not in address:
        return address
    try:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    except ValueError:
        return address


def _names_request(digest_uri: Uri, request_uri: str) -> bool:
    """RFC 2617 3.2.2.5 / RFC 3261 22.4: the digest-uri names the Request-URI.

    Compared as URIs (19.1.4), except that an absent port is the scheme's
    default: `sip:example.com` and `sip:example.com:5060` name the same thing.
    """
    try:
        target = parse_uri(request_uri)
    except SipParseError:
        return False
    if isinstance(digest_uri, SipUri) and isinstance(target, SipUri):
        default = 5061 if target.scheme == "sips" else 5060
        digest_uri = attrs.evolve(digest_uri, port=digest_uri.port or default)
        target = attrs.evolve(target, port=target.port or default)
    return digest_uri.equivalent_to(target)


def mac_from_request(request: Request) -> str | None:
    """The phone's MAC from `+sip.instance` (8.x firmware: urn:uuid ending in the MAC), if any."""
    for value in request.headers.values("contact"):
        lowered = value.lower()
        at = lowered.find("+sip.instance=")
        if at < 0:
            continue
        urn = lowered[at + len("+sip.instance="):].split(";")[0].strip('"<> ')
        return mac_from_instance(urn)
    return None


def mac_from_instance(instance: str) -> str | None:
    """`urn:uuid:00000000-0000-0000-0000-003094c25d2e` -> `003094C25D2E`."""
    tail = instance.strip('"<> ').rsplit("-", 1)[-1]
    if len(tail) == 12 and all(c in "0123456789abcdefABCDEF" for c in tail):
        return tail.upper()
    return None
