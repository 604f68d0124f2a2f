"""Whom the proxy serves: the one place that decides (DESIGN.md, Trust).

A request is served when one of these holds, checked in this order:

- its source is in a configured trusted network (`[proxy] trusted`: the
  gateways and peer proxies; a source address equal to our own is *not*
  such proof, since a UDP source is trivially forged);
- it is in a dialog (To tag) and reached us along a Record-Route this proxy
  signed: the URI carries `sptk=<key id>.<HMAC over the Call-ID>` made with
  a secret of the state directory (`route-keys`), so it survives restarts and
  verifies in every worker or node that shares the file;
- it is an initial request for an emergency number of our domain;
- it carries digest credentials of one of our users (407 otherwise), whose
  From is that user or one of its lines (403 otherwise).

A Route naming us is consumed by the router and grants nothing by itself; an
in-dialog request without a valid signature is treated as an initial one.
Requests for a foreign domain that claim no local user in From are refused
before any challenge (403 "Relaying Not Allowed"): no open relay.

`route-keys` holds one key per line, `<key id> <hex secret>`; the first line
signs, every line verifies. To rotate, put a new line on top, restart, and
drop the old line once the longest call has ended.
"""

import hashlib
import hmac
import ipaddress
import os
import secrets
from typing import Callable

import attrs
from twisted.logger import Logger

from proxy.registration.auth import Authenticated, Challenge, DigestAuthenticator
from proxy.registration.credentials import ICredentials
from proxy.errors import ConfigError, SipError
from proxy.sip.grammar import for_log
from proxy.sip.message import Request
from proxy.sip.uri import SipUri
from proxy.transport import Source

log = Logger()

TOKEN_PARAM = "sptk"
KEYS_FILE = "route-keys"
_MAC_BYTES = 12  # 96 bits: far beyond guessing within a call's life


@attrs.frozen
class RouteSigner:
    """Signs and checks the dialog token carried in our Record-Route URI."""

    keys: tuple[tuple[str, bytes], ...]  # (key id, secret); the first signs

    def token(self, call_id: str) -> str:
        kid, secret = self.keys[0]
        return f"{kid}.{self._mac(secret, call_id)}"

    def verify(self, token: str | None, call_id: str) -> bool:
        if not token:
            return False
        kid, _, mac = token.partition(".")
        for key_id, secret in self.keys:
            if key_id == kid:
                return hmac.compare_digest(mac.encode("utf-8", "surrogateescape"),
                                           self._mac(secret, call_id).encode())
        return False

    def branch_mac(self, call_id: str, prefix: str) -> str:
        """A short MAC for our Via branches: a stray 2xx is forwarded only if we really sent its request."""
        return self._mac(self.keys[0][1], f"branch:{prefix}:{call_id}")[:10]

    def verify_branch(self, branch: str, call_id: str) -> bool:
        """`z9hG4bK<prefix>.<mac>.<loop hash>` made by `branch_mac` for this Call-ID."""
        parts = branch.split(".")
        if len(parts) != 3 or not parts[0].startswith("z9hG4bK"):
            return False
        prefix = parts[0][7:]
        return any(hmac.compare_digest(parts[1].encode("utf-8", "surrogateescape"),
                                       self._mac(secret, f"branch:{prefix}:{call_id}")[:10].encode())
                   for _, secret in self.keys)

    @staticmethod
    def _mac(secret: bytes, call_id: str) -> str:
        return hmac.new(secret, call_id.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()[:_MAC_BYTES].hex()


def load_route_signer(state_dir: str) -> RouteSigner:
    """The keys in `<state_dir>/route-keys`, created (0600) with one fresh key on first start."""
    path = os.path.join(state_dir, KEYS_FILE)
    if not os.path.exists(path):
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        line = f"k{secrets.token_hex(3)} {secrets.token_hex(32)}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(line)
    keys = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, 1):
            text = raw.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 2 or not parts[0].isalnum() or len(parts[1]) < 32:
                raise ConfigError(path, f"line {number}", "must be '<key id> <secret of 32 or more characters>'")
            keys.append((parts[0], parts[1].encode()))
    if not keys:
        raise ConfigError(path, "keys", "the file holds no key")
    return RouteSigner(tuple(keys))


@attrs.frozen
class Served:
    """Why a request is served: `basis` is trusted-network, signed-dialog, emergency or authenticated."""

    basis: str
    user: str | None = None  # the authenticated user


class Trust:
    """Decides, for each request the router sees, whether and why it is served."""

    def __init__(self, networks: tuple[str, ...], signer: RouteSigner, authenticator: DigestAuthenticator,
                 credentials: ICredentials, is_our_domain: Callable[[SipUri], bool]):
        self.load_networks(networks)
        self.signer = signer
        self.authenticator = authenticator
        self.credentials = credentials
        self.is_our_domain = is_our_domain
        self.refused: dict[str, int] = {}  # why requests were not served: relay, unsigned_ack...

    def load_networks(self, networks: tuple[str, ...]) -> None:
        """(Re)read `[proxy] trusted` (also on reload)."""
        self.networks = tuple(ipaddress.ip_network(n, strict=False) for n in networks)

    def is_trusted_network(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.networks)

    def route_token(self, call_id: str) -> str:
        return self.signer.token(call_id)

    def signed(self, call_id: str, consumed: list[SipUri]) -> bool:
        """Did one of our own URIs this request came along carry our signature for its Call-ID?"""
        return any(self.signer.verify(uri.param(TOKEN_PARAM), call_id) for uri in consumed)

    def may_forward_ack(self, source: Source, signed: bool) -> bool:
        """An ACK for a 2xx cannot be challenged: only along a signed route, or from a trusted peer."""
        if signed or self.is_trusted_network(source.host):
            return True
        self._count("unsigned_ack")
        return False

    def decide(self, request: Request, source: Source, *, signed: bool, emergency: bool,
               for_our_domain: bool) -> Served:
        """Served, or a SipError (407 challenge, 403 relay or wrong From, 400 bad credentials)."""
        if self.is_trusted_network(source.host):
            return Served("trusted-network")
        in_dialog = request.to.tag is not None
        if in_dialog and signed:
            return Served("signed-dialog")
        if emergency and not in_dialog:
            return Served("emergency")
        if not for_our_domain and not self._claims_local_user(request):
            # Neither from one of our users nor for us: an open relay attempt.
            self._count("relay")
            log.info("Relay attempt from {host} to {uri}", host=source.host, uri=for_log(request.uri_text))
            raise SipError(403, "Relaying Not Allowed")
        return Served("authenticated", self._authenticate(request, source))

    def _authenticate(self, request: Request, source: Source) -> str:
        result = self.authenticator.authenticate(request, source.host, proxy=True)
        if isinstance(result, Challenge):
            raise SipError(407, "Proxy Authentication Required", (("Proxy-Authenticate", result.header_value),))
        if not isinstance(result, Authenticated):
            raise SipError(result.status, result.reason)
        from_uri = request.from_.uri
        from_user = from_uri.decoded_user if isinstance(from_uri, SipUri) else None
        if from_user != result.user:
            record = self.credentials.lookup(result.user)
            if record is None or from_user is None or not record.may_register(from_user):
                self._count("from_mismatch")
                log.info("{user} sent a request From {from_user}", user=result.user,
                         from_user=for_log(from_user or "?"))
                raise SipError(403, "From does not match the credentials")
        return result.user

    def _claims_local_user(self, request: Request) -> bool:
        uri = request.from_.uri
        return isinstance(uri, SipUri) and self.is_our_domain(uri)

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
