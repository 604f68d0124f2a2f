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

Unknown users and wrong passwords get the same fresh challenge, after the
same work (a digest against a dummy HA1), so names cannot be enumerated.
After `max_failures` failures from one address within `failure_window`
seconds, that address gets 403 for `lockout` seconds, logged once.

A line whose auth name is UNPROVISIONED is a phone nobody configured
(seed 001 lines 1112-1113, 2146: the default linex_authname): it gets 403
"Unprovisioned line" and a log line naming the phone.
"""

import base64
import hashlib
import hmac
import secrets

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.config import AuthSettings
from proxy.credentials import ICredentials
from proxy.sip.grammar import for_log, quote, quoted_string_end, unquote
from proxy.sip.message import Request
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
    """Answer 403 with this reason phrase."""

    reason: str


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
                 config: AuthSettings = AuthSettings()):
        self.clock = clock
        self.credentials = credentials
        self.realm = realm
        self.config = config
        self._secret = secret
        self._nonce_counts: dict[str, int] = {}  # qop nonces: highest nc seen
        self._used_nonces: dict[str, float] = {}  # no-qop nonces: used, with expiry
        self._failures: dict[str, list[float]] = {}
        self._locked_until: dict[str, float] = {}
        self.challenges = 0
        self.failures_by_reason: dict[str, int] = {}
        self.lockouts = 0
        self.observer = None  # observer(event, **fields): auth_failure, auth_lockout (plugins, metrics)

    # -- nonces -----------------------------------------------------------

    def _mac(self, stamp: str, salt: str, address: str) -> str:
        msg = f"{stamp}:{salt}:{self.realm}:{address}".encode()
        return base64.urlsafe_b64encode(hmac.new(self._secret, msg, hashlib.sha256).digest()[:18]).decode()

    def make_nonce(self, address: str) -> str:
        stamp = format(int(self.clock.seconds() * 1000), "x")
        salt = secrets.token_hex(4)
        return f"{stamp}.{salt}.{self._mac(stamp, salt, address)}"

    def _nonce_age(self, nonce: str, address: str) -> float | None:
        """Seconds since the nonce was issued to this address, or None if it is not ours."""
        parts = nonce.split(".")
        if len(parts) != 3:
            return None
        stamp, salt, mac = parts
        if not hmac.compare_digest(mac.encode("utf-8", "surrogateescape"), self._mac(stamp, salt, address).encode()):
            return None
        try:
            issued = int(stamp, 16) / 1000
        except ValueError:
            return None
        return self.clock.seconds() - issued

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
        self._expire(self.clock.seconds())
        locked = self._locked_until.get(address)
        if locked is not None and locked > self.clock.seconds():
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
            return self._fail(address, "malformed", f"Digest without {missing[0]}")
        if params.get("algorithm", "MD5").lower() not in ("md5", "md5-sess"):
            return self._fail(address, "malformed", "Unsupported digest algorithm")
        nonce = params["nonce"]
        age = self._nonce_age(nonce, address)
        if age is None:
            return self._fail(address, "bad_nonce", "Nonce not issued to this address")
        qop = params.get("qop")
        if qop:
            if qop.lower() != "auth" or not params.get("cnonce") or not params.get("nc"):
                return self._fail(address, "malformed", "Bad qop parameters")
            lifetime = self.config.nonce_lifetime
        else:
            if not self.config.accept_rfc2069:
                return self._fail(address, "malformed", "Digest without qop refused")
            lifetime = self.config.nonce_lifetime_no_qop
        if age > lifetime:
            return Challenge(self.challenge_value(address, stale=True), "stale nonce")
        record = self.credentials.lookup(username)
        ha1 = record.ha1 if record is not None and record.realm == self.realm else _DUMMY_HA1
        expected = digest_response(ha1, params, request.method)
        if record is None or not hmac.compare_digest(expected.encode(), params["response"].lower().encode("utf-8", "surrogateescape")):
            reason = "unknown_user" if record is None else "wrong_password"
            log.info("Digest failed for {user} from {address}", user=for_log(username), address=address)
            return self._fail(address, reason, "bad credentials")
        # Only a correct response may consume a nonce-count or a nonce.
        if qop:
            try:
                nc = int(params["nc"], 16)
            except ValueError:
                return self._fail(address, "malformed", "Bad nonce count")
            if nc <= self._nonce_counts.get(nonce, 0):
                return self._fail(address, "replay", "Nonce count replayed")
            self._nonce_counts[nonce] = nc
        else:
            if nonce in self._used_nonces:
                return self._fail(address, "replay", "Nonce replayed")
            self._used_nonces[nonce] = self.clock.seconds() + lifetime
        self._failures.pop(address, None)
        return Authenticated(username)

    def _unprovisioned(self, request: Request, address: str) -> Refused:
        log.warn(
            "Phone at {address} ({user_agent}{mac}) uses the default auth name UNPROVISIONED: "
            "set lineN_authname and lineN_password in its SIP<MAC>.cnf",
            address=address,
            user_agent=for_log(request.headers.get("user-agent", "unknown firmware")),
            mac=f", MAC {mac}" if (mac := mac_from_request(request)) else "",
        )
        self.failures_by_reason["unprovisioned"] = self.failures_by_reason.get("unprovisioned", 0) + 1
        self._emit("auth_failure", reason="unprovisioned", address=address)
        return Refused("Unprovisioned line")

    def _emit(self, event: str, **fields) -> None:
        if self.observer is not None:
            self.observer(event, **fields)

    def _fail(self, address: str, reason: str, detail: str) -> AuthResult:
        now = self.clock.seconds()
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
        self._emit("auth_failure", reason=reason, address=address)
        recent = [t for t in self._failures.get(address, []) if now - t < self.config.failure_window]
        recent.append(now)
        self._failures[address] = recent
        if len(recent) >= self.config.max_failures:
            self._locked_until[address] = now + self.config.lockout
            self._failures.pop(address, None)
            self.lockouts += 1
            self._emit("auth_lockout", address=address)
            log.warn("{address} locked out for {seconds:.0f} s after {count} failed authentications",
                     address=address, seconds=self.config.lockout, count=len(recent))
            return Refused("Too many failed attempts")
        return Challenge(self.challenge_value(address), detail)

    def _expire(self, now: float) -> None:
        """Forget replay state of expired nonces (cheap: runs at most every few seconds' worth)."""
        if len(self._used_nonces) > 1000 or len(self._nonce_counts) > 10000:
            self._used_nonces = {n: t for n, t in self._used_nonces.items() if t > now}
            self._nonce_counts = {n: c for n, c in self._nonce_counts.items()
                                  if (age := self._issued_age(n, now)) is not None and age <= self.config.nonce_lifetime}
        if self._locked_until and len(self._locked_until) > 1000:
            self._locked_until = {a: t for a, t in self._locked_until.items() if t > now}

    @staticmethod
    def _issued_age(nonce: str, now: float) -> float | None:
        try:
            return now - int(nonce.partition(".")[0], 16) / 1000
        except ValueError:
            return None


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
