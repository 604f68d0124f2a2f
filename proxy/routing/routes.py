"""Where calls that are not for a registered local user go: gateways by dial pattern or domain, and emergency.

A route yields an ordered list of `Hop`s (one per gateway): the router tries
them in turn when a gateway answers 408 or 503 or does not answer (within the
route's `failover_after`, else `[proxy] failover_after`).
"""

import re

import attrs

from proxy.config import EmergencyConfig, RouteConfig
from proxy.sip.uri import SipUri


@attrs.frozen
class Hop:
    """One way to reach a target: the Request-URI to send and the host to send it to."""

    uri: str
    host: str
    port: int | None
    transport: str = "UDP"
    binding: object = attrs.field(default=None, eq=False)  # the Binding, for a registered contact (NAT rules)


def hop_for_uri(uri: SipUri, request_uri: str | None = None) -> Hop:
    """A hop that sends to `uri`'s host (maddr first), by its transport param (sips -> TLS)."""
    transport = (uri.param("transport") or ("tls" if uri.scheme == "sips" else "udp")).upper()
    host = uri.param("maddr") or uri.host
    return Hop(uri=request_uri if request_uri is not None else str(uri), host=host, port=uri.port, transport=transport)


def gateway_uri(gateway: str) -> SipUri:
    return SipUri.parse(gateway if gateway.startswith(("sip:", "sips:")) else f"sip:{gateway}")


@attrs.frozen
class _CompiledRoute:
    config: RouteConfig
    regex: re.Pattern | None


class RouteTable:
    def __init__(self, routes: tuple[RouteConfig, ...], emergency: EmergencyConfig):
        self.load(routes, emergency)

    def load(self, routes: tuple[RouteConfig, ...], emergency: EmergencyConfig) -> None:
        """(Re)read the routes and emergency settings: a reload swaps them between two calls, never during one."""
        self.routes = [_CompiledRoute(r, re.compile(r.pattern) if r.pattern else None) for r in routes]
        self.emergency_patterns = [re.compile(p) for p in emergency.patterns]
        self.emergency_gateways = emergency.gateways
        # No emergency gateway set: emergency numbers go, as dialled, by the first dial-pattern route's gateways,
        # so a site with a PSTN route can always call 911 (seed 001 line 1492).
        self.emergency_route = None
        if not emergency.gateways:
            self.emergency_route = next((r.config for r in self.routes if r.regex is not None and r.config.gateways),
                                        None)

    def emergency_plan(self) -> str:
        """How emergency calls go, for the startup log."""
        if self.emergency_gateways:
            return "to the emergency gateways " + ", ".join(self.emergency_gateways)
        if self.emergency_route is not None:
            return (f"by route {self.emergency_route.name or self.emergency_route.pattern!r} "
                    f"({', '.join(self.emergency_route.gateways)}): no [emergency] gateways are set")
        return ""

    def is_emergency(self, dialled: str | None) -> bool:
        return bool(dialled) and any(p.fullmatch(dialled) for p in self.emergency_patterns)

    def emergency_hops(self, dialled: str) -> list[Hop]:
        gateways = self.emergency_gateways or (self.emergency_route.gateways if self.emergency_route else ())
        return [self._gateway_hop(gw, dialled) for gw in gateways]

    def by_number(self, dialled: str) -> tuple[RouteConfig, list[Hop]] | None:
        """(route, hops) of the first pattern route matching the dialled user part."""
        for route in self.routes:
            if route.regex is not None and route.regex.fullmatch(dialled):
                number = route.config.prefix + dialled[route.config.strip:]
                return route.config, [self._gateway_hop(gw, number) for gw in route.config.gateways]
        return None

    def by_domain(self, domain: str, request_uri: SipUri) -> tuple[RouteConfig, list[Hop]] | None:
        """(route, hops) for a foreign domain: the Request-URI is kept, sent to each gateway in turn."""
        for route in self.routes:
            if route.config.domain and route.config.domain == domain:
                hops = []
                for gw in route.config.gateways:
                    hop = hop_for_uri(gateway_uri(gw), request_uri=str(request_uri))
                    hops.append(hop)
                return route.config, hops
        return None

    @staticmethod
    def _gateway_hop(gateway: str, user: str) -> Hop:
        uri = gateway_uri(gateway)
        target = attrs.evolve(uri, user=user, params=tuple(p for p in uri.params if p[0] != "lr"))
        return hop_for_uri(uri, request_uri=str(target))
