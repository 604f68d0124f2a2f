"""Who this server is: the one authority for "is this ours?" and for the URIs it writes about itself.

Its domains, the addresses and ports it listens on, and the address it
advertises (Via, Record-Route). The registrar, the router and the trust
decision all ask here, so a backup proxy reached by address (seed 001 line
709: phones register with `proxy_backup` by IP) and the primary domain mean
the same AoR everywhere.
"""

import attrs

from proxy.sip.uri import SipUri
from proxy.transport import Destination


@attrs.frozen
class Identity:
    domains: frozenset[str]
    addresses: frozenset[str]
    ports: frozenset[int]
    domain: str = ""  # the primary domain: AoRs are written sip:user@domain
    advertise_host: str = "127.0.0.1"
    advertise_ports: tuple[tuple[str, int], ...] = (("UDP", 5060),)  # by transport
    # With workers: this process's number, written into our Via (`;worker=N`) so that the response comes
    # to the process holding the client transaction (proxy/workers/owner.py).
    worker: int | None = None
    # Derived once (per-message path): the advertised ports as a dict and as a set.
    _port_of: dict = attrs.field(init=False, eq=False, repr=False)
    _our_via_ports: frozenset = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self):
        if not self.domain and self.domains:
            object.__setattr__(self, "domain", min(self.domains))
        object.__setattr__(self, "_port_of", dict(self.advertise_ports))
        object.__setattr__(self, "_our_via_ports", frozenset(self._port_of.values()))

    # -- questions --------------------------------------------------------------

    def is_local_host(self, host: str, port: int | None) -> bool:
        if host in self.domains:
            return port is None or port in self.ports
        if host in self.addresses:
            return (port or 5060) in self.ports
        return False

    def is_me(self, uri) -> bool:
        """A URI that addresses this server itself (no user part, our host)."""
        return isinstance(uri, SipUri) and uri.user is None and self.is_local_host(uri.host, uri.port)

    def is_our_domain(self, uri: SipUri) -> bool:
        """Our domain, or one of our addresses on one of our ports (another port there is someone else)."""
        if self.is_local_host(uri.host, uri.port):
            return True
        return uri.host == self.advertise_host and (uri.port or 5060) in self.ports

    def is_our_uri(self, uri) -> bool:
        """A URI naming this proxy (our Record-Route / Route URI): host ours, port ours or absent."""
        if not isinstance(uri, SipUri):
            return False
        host = uri.host
        ours = host == self.advertise_host or host in self.addresses or host in self.domains
        return ours and (uri.port is None or uri.port in self.ports)

    def is_our_registrar_host(self, uri) -> bool:
        """A REGISTER's Request-URI or To host that is us: a domain, or an address (the backup proxy case)."""
        return isinstance(uri, SipUri) and (self.is_local_host(uri.host, uri.port) or uri.host in self.addresses)

    def is_own_destination(self, destination: Destination) -> bool:
        """A destination that is one of our own sockets: sending there would loop through us."""
        host = destination.host
        return (host == self.advertise_host or host in self.addresses) and destination.port in self.ports

    def is_our_via(self, host: str, port: int | None) -> bool:
        return host == self.advertise_host and (port or 5060) in self._our_via_ports

    # -- what we write -------------------------------------------------------------

    def aor(self, user: str) -> str:
        return f"sip:{user}@{self.domain}"

    def port_for(self, transport: str) -> int:
        ports = self._port_of
        return ports.get(transport) or ports.get("UDP", 5060)

    def via_value(self, transport: str, branch: str) -> str:
        marker = "" if self.worker is None else f";worker={self.worker}"
        return f"SIP/2.0/{transport} {self.advertise_host}:{self.port_for(transport)};branch={branch}{marker}"

    def record_route_value(self, transport: str, extra: str = "") -> str:
        """Our Record-Route (loose routing, RFC 3261 16.6 step 4), with `extra` URI parameters (`;name=value`)."""
        param = "" if transport == "UDP" else f";transport={transport.lower()}"
        return f"<sip:{self.advertise_host}:{self.port_for(transport)};lr{param}{extra}>"
