"""Where a request may go (RFC 3261 16.5): a user's bindings, a number's gateways, a URI's host.

A `Target` is one fork of a call with its hops in failover order. Bindings
carry their own destination rule (the NAT policy); anything else is
resolved per RFC 3263 (proxy/routing/dns.py). Counts which forwarding steps
were taken, for the metrics.
"""

from twisted.internet import defer

from proxy.registration.credentials import ICredentials
from proxy.errors import SipError
from proxy.identity import Identity
from proxy.registration.location import ILocationService
from proxy.nat import NatPolicy
from proxy.routing.dns import NextHopResolver
from proxy.routing.forking import Target
from proxy.routing.gateways import GatewayHealth
from proxy.routing.routes import Hop, RouteTable, hop_for_uri
from proxy.sip.uri import SipUri


class Targets:
    def __init__(self, identity: Identity, location: ILocationService, credentials: ICredentials,
                 routes: RouteTable, resolver: NextHopResolver, nat: NatPolicy, gateways: GatewayHealth):
        self.gateways = gateways
        self.identity = identity
        self.location = location
        self.credentials = credentials
        self.routes = routes
        self.resolver = resolver
        self.nat = nat
        self.forwards: dict[str, int] = {}  # forwarding steps taken, by kind: unconditional, user-busy, ...

    def is_local_user(self, user: str) -> bool:
        return self.credentials.lookup(user) is not None or bool(self.location.lookup(self.identity.aor(user)))

    def for_user(self, user: str) -> list[Target] | None:
        """Bindings of a local user as targets; [] when registered nowhere; None when not a local user."""
        bindings = self.location.lookup(self.identity.aor(user))
        if not bindings and self.credentials.lookup(user) is None:
            return None
        targets = []
        for binding in bindings:
            hop = hop_for_uri(SipUri.parse(binding.contact))
            hop = Hop(uri=hop.uri, host=hop.host, port=hop.port, transport=binding.transport, binding=binding)
            targets.append(Target(hops=(hop,), q=binding.q, kind="user"))
        return targets

    def for_number(self, number: str) -> list[Target] | None:
        found = self.routes.by_number(number)
        return None if found is None else [self.gateway_target(*found)]

    def gateway_target(self, route, hops) -> Target:
        """A route's gateways in failover order, those that are down last, with the route's failover time."""
        return Target(hops=self.gateways.order(tuple(hops)), kind="gateway", failover_after=route.failover_after)

    def for_uri(self, uri: SipUri, q: float = 1.0, kind: str = "user") -> Target:
        """A target for a URI: a registered contact when it is one (NAT rules), else the URI's host."""
        binding = self.location.find_contact(str(uri))
        hop = hop_for_uri(uri)
        if binding is not None:
            hop = Hop(uri=hop.uri, host=hop.host, port=hop.port, transport=binding.transport, binding=binding)
        return Target(hops=(hop,), q=q, kind=kind)

    def for_redirect(self, uri: SipUri, q: float) -> Target:
        """A 3xx Contact: one of our users is reached at its bindings, anything else at its URI."""
        if self.identity.is_our_domain(uri) and uri.user is not None:
            targets = self.for_user(uri.decoded_user)
            if targets:
                return Target(hops=tuple(h for t in targets for h in t.hops), q=q, kind="redirect")
        return self.for_uri(uri, q, kind="redirect")

    def for_dialog(self, uri: SipUri) -> Target:
        """An in-dialog Request-URI is the peer's Contact: a binding of ours, or a foreign host."""
        if self.identity.is_our_domain(uri) and self.location.find_contact(str(uri)) is None:
            # Our own domain is not a remote target; no dialog of ours ends here.
            raise SipError(481, "Call/Transaction Does Not Exist")
        return self.for_uri(uri, kind="dialog")

    def for_plan(self, plan) -> list[Target]:
        """Targets of one step of a forwarding plan: the user's contacts, a number via routes, or a foreign URI."""
        for step in plan.diversions:
            self.forwards[step.reason] = self.forwards.get(step.reason, 0) + 1
        if plan.user:
            return self.for_user(plan.user) or []
        uri = SipUri.parse(plan.target_uri)
        if self.identity.is_our_domain(uri) and uri.user:
            return self.for_number(uri.decoded_user) or []
        return [self.for_uri(uri, kind="gateway")]

    def resolve(self, hop: Hop) -> defer.Deferred:
        """A hop's destinations in failover order."""
        if hop.binding is not None:
            return defer.succeed([hop.binding.destination(hop.host, hop.port, self.nat)])
        return self.resolver.resolve(hop.host, hop.port, hop.transport)
