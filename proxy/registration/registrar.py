"""REGISTER processing (RFC 3261 section 10.3).

A 7940/7960 registers each of its up to six lines with its own REGISTER
(seed 001 line 2146, lineN_name), with its primary proxy and, for SIP-SRST,
with its backup proxy (line 709): the AoR's host may be our domain or one of
our addresses, and both mean the same AoR here.

Order of the checks, as section 10.3 has them: our domain (1), Require (2,
420 with Unsupported for an extension we do not know), authentication (3-4, 401 with WWW-Authenticate per
seed 001 line 3945), the To AoR (5), Contacts and Call-ID/CSeq order (6-7),
then the 200 listing every current binding with its expiry, and Date (the
phones set their clock from it).
"""

import email.utils
import functools
import random

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.registration.auth import Authenticated, Challenge, DigestAuthenticator, Refused, mac_from_instance
from proxy.config import RegistrarConfig
from proxy.errors import SipError, SipParseError
from proxy.registration.location import Binding, ILocationService
from proxy.dispatch import spread_retry_after, unsupported_extensions
from proxy.identity import Identity
from proxy.replies import Replies
from proxy.sip.grammar import for_log
from proxy.sip.headers import parse_uint
from proxy.sip.message import Request
from proxy.sip.uri import NameAddr, SipUri
from proxy.transaction import ServerTransaction
from proxy.transport import is_ip_address

log = Logger()

_MAX_EXPIRES_VALUE = 2**32 - 1


@attrs.frozen
class _ContactChange:
    contact: str
    expires: int
    q: float
    instance: str


class Registrar:
    def __init__(self, *, clock: IReactorTime, replies: Replies, location: ILocationService,
                 authenticator: DigestAuthenticator, config: RegistrarConfig, identity: Identity,
                 rng: random.Random | None = None):
        self.replies = replies
        self.clock = clock
        self.location = location
        self.authenticator = authenticator
        self.config = config
        self.identity = identity
        self.domain = identity.domain
        self.rng = rng or random.Random()
        self.results: dict[str, int] = {}

    def aor_of(self, uri) -> str:
        """Canonical AoR: `sip:user@domain`; our addresses count as our domain (backup proxy use)."""
        if not isinstance(uri, SipUri):
            raise SipError(400, "Bad To URI")
        if not uri.user:
            raise SipError(400, "No user in To")
        if self.identity.is_our_registrar_host(uri):
            return self.identity.aor(uri.decoded_user)
        return f"sip:{uri.decoded_user}@{uri.host}"

    def is_ours(self, uri) -> bool:
        return self.identity.is_our_registrar_host(uri)

    def _may_register(self, user: str, aor: str) -> bool:
        """Its own AoR, or a line listed for the user (shared line-1 credentials)."""
        line, _, domain = aor[len("sip:"):].rpartition("@")
        if domain != self.domain:
            return False
        if line == user:
            return True
        record = self.authenticator.credentials.lookup(user)
        return record is not None and record.may_register(line)

    def _count(self, result: str) -> None:
        self.results[result] = self.results.get(result, 0) + 1

    def handle(self, tx: ServerTransaction, request: Request) -> None:
        try:
            self._handle(tx, request)
        except SipError as e:
            self._count("rejected")
            self.replies.respond(tx, e.status, e.reason, extra=e.headers)

    def _handle(self, tx: ServerTransaction, request: Request) -> None:
        if not self.is_ours(request.uri):
            raise SipError(403, "Not a domain of this registrar")
        unsupported = unsupported_extensions(request)
        if unsupported:
            raise SipError(420, "Bad Extension", (("Unsupported", ", ".join(unsupported)),))
        try:
            to_uri = request.to.uri
        except SipParseError:
            raise SipError(400, "Bad To URI") from None
        aor = self.aor_of(to_uri)
        source = tx.source
        result = self.authenticator.authenticate(request, source.host, proxy=False)
        # Challenges and refusals hold no transaction: a flood of forged REGISTERs pins no memory.
        if isinstance(result, Challenge):
            self._count("challenged")
            self.replies.respond_statelessly(tx, 401, "Unauthorized", extra=(("WWW-Authenticate", result.header_value),))
            return
        if isinstance(result, Refused):
            self._count("refused")
            self.replies.respond_statelessly(tx, result.status, result.reason)
            return
        assert isinstance(result, Authenticated)
        if not self._may_register(result.user, aor):
            log.info("{user} may not register {aor}", user=result.user, aor=aor)
            raise SipError(403, "Not allowed to register this address")
        if not self.location.writable:
            # A shared store that is down: never a 200 for a binding that is not stored (the phone retries).
            raise SipError(503, "Location store unavailable", (("Retry-After", spread_retry_after()),))
        wildcard, changes = self._contacts(request)
        now = self.clock.seconds()
        call_id = request.call_id
        cseq = request.cseq.number
        existing = {b.contact: b for b in self.location.lookup(aor)}
        # Section 10.3 step 7: an older or repeated CSeq for the same Call-ID aborts the whole update.
        targets = existing.values() if wildcard else [existing[c.contact] for c in changes if c.contact in existing]
        for binding in targets:
            if binding.call_id == call_id and binding.cseq >= cseq:
                raise SipError(500, "Out of order CSeq")
        if not wildcard:
            self._check_contact_count(changes, existing)
        if wildcard:
            self.location.remove_all(aor)
            log.info("Unregistered every contact of {aor}", aor=aor)
        else:
            self._apply(aor, changes, existing, request, source, now)
        pending = self.location.stored()
        if pending is None:
            self._count("ok")
            self._answer(tx, aor, now)
            return
        # A shared store (proxy/registration/redis_location.py): the 200 waits until it has the change.
        pending.addCallbacks(lambda _: self._stored(tx, aor), lambda failure: self._not_stored(tx, aor, failure))

    def _stored(self, tx: ServerTransaction, aor: str) -> None:
        self._count("ok")
        self._answer(tx, aor, self.clock.seconds())

    def _not_stored(self, tx: ServerTransaction, aor: str, failure) -> None:
        self._count("not_stored")  # (counted, not logged: the store's client logs the outage once)
        self.replies.respond(tx, 503, "Location store unavailable", extra=(("Retry-After", spread_retry_after()),))

    def _check_contact_count(self, changes, existing: dict) -> None:
        """403 when this REGISTER would take the AoR past max_contacts (an AoR already past it may refresh)."""
        after = set(existing)
        for change in changes:
            if change.expires == 0:
                after.discard(change.contact)
                continue
            if change.instance:
                after -= {old.contact for old in existing.values()
                          if old.instance == change.instance and old.contact != change.contact}
            after.add(change.contact)
        if len(after) > self.config.max_contacts and len(after) > len(existing):
            raise SipError(403, "Too many registered contacts")

    def _contacts(self, request: Request) -> tuple[bool, list[_ContactChange]]:
        values = request.headers.values("contact")
        header_expires = self._header_expires(request)
        if any(v.strip() == "*" for v in values):
            if len(values) != 1 or header_expires != 0:
                raise SipError(400, "Wildcard Contact needs Expires: 0 and no other Contact")
            return True, []
        changes = []
        for value in values:
            try:
                contact = NameAddr.parse(value, "Contact")
                uri = contact.uri
            except SipParseError:
                raise SipError(400, "Bad Contact") from None
            if not isinstance(uri, SipUri):
                raise SipError(400, "Bad Contact URI scheme")
            expires = self._contact_expires(contact, header_expires)
            if expires > 0 and not is_ip_address(uri.param("maddr") or uri.host):
                # Requests to a binding go straight to the socket: a name would have to be resolved
                # on every call. The phones register numeric addresses (their own IP).
                raise SipError(400, "Contact must be a numeric address, not a host name")
            if 0 < expires < self.config.min_expires:
                raise SipError(423, "Interval Too Brief", (("Min-Expires", str(self.config.min_expires)),))
            q_text = contact.param("q")
            try:
                q = float(q_text) if q_text else 1.0
            except ValueError:
                raise SipError(400, "Bad q value") from None
            if not 0.0 <= q <= 1.0:
                raise SipError(400, "Bad q value")
            instance = (contact.param("+sip.instance") or "").strip('"')
            changes.append(_ContactChange(contact=str(uri), expires=expires, q=q, instance=instance))
        return False, changes

    def _header_expires(self, request: Request) -> int | None:
        value = request.headers.get("expires")
        if value is None:
            return None
        try:
            return parse_uint(value, "Expires", _MAX_EXPIRES_VALUE)
        except SipParseError as e:
            raise SipError(400, e.reason) from None

    def _contact_expires(self, contact: NameAddr, header_expires: int | None) -> int:
        value = contact.param("expires")
        if value is not None:
            try:
                return parse_uint(value, "Contact expires", _MAX_EXPIRES_VALUE)
            except SipParseError as e:
                raise SipError(400, e.reason) from None
        if header_expires is not None:
            return header_expires
        return self.config.default_expires

    def _granted(self, asked: int) -> int:
        granted = min(asked, self.config.max_expires)
        spread = self.config.expires_range
        if spread:
            low = max(self.config.min_expires, granted * (100 - spread) // 100)
            granted = self.rng.randint(low, granted) if low < granted else granted
        return granted

    def _apply(self, aor, changes, existing, request: Request, source, now) -> None:
        user_agent = request.headers.get("user-agent", "")
        for change in changes:
            if change.expires == 0:
                if change.contact in existing:
                    self.location.remove(aor, change.contact)
                    log.info("Unregistered {aor} -> {contact}", aor=aor, contact=for_log(change.contact))
                continue
            if change.instance:
                # Same device (RFC 5626 instance, the MAC on 8.x firmware), new contact:
                # the phone rebooted or moved; its old binding is stale.
                for old in existing.values():
                    if old.instance == change.instance and old.contact != change.contact:
                        self.location.remove(aor, old.contact)
            granted = self._granted(change.expires)
            previous = existing.get(change.contact)
            binding = Binding(
                aor=aor,
                contact=change.contact,
                expires_at=now + granted,
                q=change.q,
                call_id=request.call_id,
                cseq=request.cseq.number,
                source_host=source.host,
                source_port=source.port,
                transport=source.transport,
                user_agent=user_agent,
                instance=change.instance,
                node=self.location.node,
                registered_at=previous.registered_at if previous and previous.call_id == request.call_id else now,
            )
            self.location.save(binding)
            if previous is None:
                log.info("Registered {aor} -> {contact} for {expires} s from {host}:{port} ({user_agent}{mac})",
                         aor=aor, contact=for_log(change.contact), expires=granted, host=source.host,
                         port=source.port, user_agent=for_log(user_agent or "no User-Agent"),
                         mac=f", MAC {mac}" if (mac := mac_from_instance(change.instance)) else "")

    def _answer(self, tx: ServerTransaction, aor: str, now: float) -> None:
        contacts = []
        for b in self.location.lookup(aor):
            value = f"<{b.contact}>;expires={b.expires_in(now)}"
            if b.q != 1.0:
                value += f";q={b.q:g}"
            contacts.append(("Contact", value))
        self.replies.respond(tx, 200, "OK", extra=tuple(contacts) + (("Date", _http_date(int(now))),))


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> str:
    """The Date of a 200 (RFC 3261 10.3 step 8): formatted once per second, not once per REGISTER."""
    return email.utils.formatdate(second, usegmt=True)
