"""The redirect server (RFC 3261 8.3, seed 001 forwarding flows): 302 to one contact, 300 to several.

With `[forwarding] redirect = true` (or for `redirect_domains`) INVITEs for
local users are not proxied: the answer lists the user's contacts by q, then
its busy / no-answer forward targets. With `unconditional = "redirect"` an
unconditionally forwarded user's callers get a 302 to the target.
"""

from proxy.config import ForwardingConfig
from proxy.errors import SipError
from proxy.identity import Identity
from proxy.registration.location import ILocationService
from proxy.replies import Replies
from proxy.sip.uri import SipUri
from proxy.transaction import ServerTransaction


class RedirectServer:
    def __init__(self, identity: Identity, location: ILocationService, replies: Replies, config: ForwardingConfig):
        self.identity = identity
        self.location = location
        self.replies = replies
        self.config = config
        self.redirects: dict[int, int] = {}  # 3xx answered, by code

    def applies_to(self, uri: SipUri) -> bool:
        return self.config.redirect or uri.host in self.config.redirect_domains

    def redirects_unconditional(self, plan) -> bool:
        return (self.config.unconditional == "redirect" and bool(plan.diversions)
                and plan.diversions[0].reason == "unconditional")

    def _uri_of(self, plan) -> str:
        return self.identity.aor(plan.user) if plan.user else plan.target_uri

    def answer_unconditional(self, tx: ServerTransaction, plan) -> None:
        self.answer(tx, [(1.0, self._uri_of(plan))])

    def answer_plan(self, tx: ServerTransaction, plan) -> None:
        """302 to the one contact, or 300 with the user's contacts then the forward targets."""
        contacts: list[tuple[float, str]] = []
        if plan.user:
            contacts += [(b.q, b.contact) for b in self.location.lookup(self.identity.aor(plan.user))]
        else:
            contacts.append((1.0, plan.target_uri))
        for follow in (plan.on_busy, plan.on_no_answer):
            if follow is None:
                continue
            # A local target is listed by its registered contacts: its AoR would only earn the phone a
            # second 302 from us.
            uris = [b.contact for b in self.location.lookup(self.identity.aor(follow.user))] if follow.user else []
            for uri in uris or [self._uri_of(follow)]:
                if all(uri != c for _, c in contacts):
                    contacts.append((0.1, uri))
        if not contacts:
            raise SipError(480, "Temporarily Unavailable")
        contacts.sort(key=lambda c: -c[0])
        self.answer(tx, contacts)

    def answer(self, tx: ServerTransaction, contacts: list[tuple[float, str]]) -> None:
        status = 302 if len(contacts) == 1 else 300
        extra = tuple(("Contact", f"<{uri}>" + (f";q={q:g}" if len(contacts) > 1 else "")) for q, uri in contacts)
        self.redirects[status] = self.redirects.get(status, 0) + 1
        self.replies.respond(tx, status, None, extra=extra)
