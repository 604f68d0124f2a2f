"""Next hops by name (RFC 3263 section 4), with twisted.names.

- A numeric host is used as it is.
- A name with an explicit port: A (then AAAA) records, that port.
- A name without a port: SRV `_sip._udp` (`_sip._tcp`, `_sips._tcp` by
  transport) ordered by priority and weight, each target's addresses in
  turn; no SRV record: A/AAAA on 5060 (5061 for TLS).
NAPTR is not looked up (optional in RFC 3263 for a proxy that is told the
transport; the phones only do UDP).

Every answer is a list of `Destination`s to try in order (the router fails
over through it on 408/503/timeout). Lookups go through an `IResolver`
passed in, so tests use a fake.
"""

import ipaddress
import random

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DomainError

from proxy.transport import Destination, is_ip_address

log = Logger()

_SRV_PREFIX = {"UDP": "_sip._udp.", "TCP": "_sip._tcp.", "TLS": "_sips._tcp."}
_DEFAULT_PORT = {"UDP": 5060, "TCP": 5060, "TLS": 5061}


def order_srv(records: list, rng: random.Random) -> list:
    """RFC 2782 ordering: ascending priority, weighted random within a priority."""
    out = []
    for priority in sorted({r.priority for r in records}):
        group = [r for r in records if r.priority == priority]
        while group:
            total = sum(r.weight for r in group)
            if total == 0:
                out.extend(group)
                break
            pick = rng.uniform(0, total)
            acc = 0
            for r in group:
                acc += r.weight
                if acc >= pick:
                    out.append(r)
                    group.remove(r)
                    break
    return out


class NextHopResolver:
    def __init__(self, resolver=None, rng: random.Random | None = None, timeout: tuple[int, ...] = (2, 4)):
        self.resolver = resolver
        self.rng = rng or random.Random()
        self.timeout = timeout

    def resolve(self, host: str, port: int | None, transport: str = "UDP") -> defer.Deferred:
        """Deferred list of Destinations (empty when the name does not resolve)."""
        transport = transport.upper()
        if is_ip_address(host):
            return defer.succeed([Destination(transport, host, port or _DEFAULT_PORT.get(transport, 5060))])
        if self.resolver is None:
            return defer.succeed([])
        return defer.Deferred.fromCoroutine(self._resolve(host, port, transport))

    async def _resolve(self, host: str, port: int | None, transport: str) -> list[Destination]:
        if port is None:
            try:
                answers, _, _ = await self.resolver.lookupService(_SRV_PREFIX.get(transport, "_sip._udp.") + host,
                                                                  timeout=self.timeout)
            except (DomainError, defer.TimeoutError):
                answers = []
            except Exception as e:
                log.warn("SRV lookup for {host} failed: {error}", host=host, error=e)
                answers = []
            srv = [a.payload for a in answers if a.type == dns.SRV]
            if srv:
                out = []
                for record in order_srv(srv, self.rng):
                    for address in await self._addresses(str(record.target)):
                        # RFC 5922: a TLS peer found by SRV is verified against the domain asked for.
                        out.append(Destination(transport, address, record.port, tls_name=host))
                return out
        return [Destination(transport, a, port or _DEFAULT_PORT.get(transport, 5060), tls_name=host)
                for a in await self._addresses(host)]

    async def _addresses(self, name: str) -> list[str]:
        out = []
        for lookup in (self.resolver.lookupAddress, self.resolver.lookupIPV6Address):
            try:
                answers, _, _ = await lookup(name, timeout=self.timeout)
            except (DomainError, defer.TimeoutError):
                continue
            except Exception as e:
                log.warn("Address lookup for {name} failed: {error}", name=name, error=e)
                continue
            for a in answers:
                if a.type == dns.A:
                    out.append(a.payload.dottedQuad())
                elif a.type == dns.AAAA:
                    out.append(ipaddress.IPv6Address(a.payload.address).compressed)
        return out
