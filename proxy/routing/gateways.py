"""Gateway health, as Kamailio's dispatcher keeps it: a gateway that keeps failing is tried last until it answers.

Every call through a route's gateway reports how it went: any response is
a sign of life; no response at all (failover_after, Timer B) or a 503 is a
failure. After `down_after` failures in a row the gateway is down: calls try
the route's other gateways first (a down gateway is still tried when every
gateway is down: better a slow call than none), and it gets an OPTIONS
every `probe_interval` seconds until it answers one. `gateways()` is what
`sipproxy-admin gateways` and the metrics show.
"""

import secrets

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.identity import Identity
from proxy.periodic import Every
from proxy.routing.routes import Hop
from proxy.sip.headers import Headers
from proxy.sip.message import Request
from proxy.transaction import MAGIC_COOKIE

log = Logger()


def gateway_key(hop: Hop) -> str:
    return f"{hop.host}:{hop.port or 5060}"


@attrs.define
class GatewayState:
    hop: Hop
    failures: int = 0  # in a row
    down_since: float | None = None
    last_failure: float | None = None
    last_ok: float | None = None
    calls: int = 0
    failed_calls: int = 0

    @property
    def up(self) -> bool:
        return self.down_since is None


class GatewayHealth:
    def __init__(self, clock: IReactorTime, *, down_after: int = 3):
        self.clock = clock
        self.down_after = down_after
        self.states: dict[str, GatewayState] = {}  # only gateways of configured routes reach here: bounded

    # -- what calls report ------------------------------------------------------

    def _state(self, hop: Hop) -> GatewayState:
        key = gateway_key(hop)
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = GatewayState(hop=hop)
        return state

    def answered(self, hop: Hop) -> None:
        state = self._state(hop)
        state.calls += 1
        state.failures = 0
        state.last_ok = self.clock.seconds()
        if state.down_since is not None:
            log.info("Gateway {gateway} answers again", gateway=gateway_key(hop))
            state.down_since = None

    def failed(self, hop: Hop) -> None:
        state = self._state(hop)
        now = self.clock.seconds()
        state.calls += 1
        state.failed_calls += 1
        state.failures += 1
        state.last_failure = now
        if state.down_since is None and state.failures >= self.down_after:
            state.down_since = now
            log.warn("Gateway {gateway} is down after {count} failures in a row: tried last, probed with OPTIONS",
                     gateway=gateway_key(hop), count=state.failures)

    def order(self, hops: tuple[Hop, ...]) -> tuple[Hop, ...]:
        """The route's gateways, the ones that are down last (stable otherwise)."""
        if not any(not self._is_up(h) for h in hops):
            return hops
        return tuple(sorted(hops, key=lambda h: not self._is_up(h)))

    def _is_up(self, hop: Hop) -> bool:
        state = self.states.get(gateway_key(hop))
        return state is None or state.up

    def gateways(self) -> list[dict]:
        return [{"gateway": key, "up": s.up, "down_since": s.down_since, "failures_in_a_row": s.failures,
                 "last_failure": s.last_failure, "last_ok": s.last_ok, "calls": s.calls,
                 "failed_calls": s.failed_calls} for key, s in sorted(self.states.items())]


class GatewayProber:
    """An OPTIONS every `interval` seconds to each gateway that is down, until it answers one."""

    def __init__(self, clock: IReactorTime, health: GatewayHealth, transactions, resolve, identity: Identity, *,
                 interval: float = 10.0):
        self.clock = clock
        self.health = health
        self.transactions = transactions
        self.resolve = resolve  # hop -> Deferred[list[Destination]]
        self.identity = identity
        self._rounds = Every(clock, interval, self.probe)

    def start(self) -> None:
        self._rounds.start()

    def stop(self) -> None:
        self._rounds.stop()

    def probe(self) -> None:
        for state in list(self.health.states.values()):
            if not state.up:
                self.resolve(state.hop).addCallback(self._send, state).addErrback(
                    lambda f: log.failure("Probing a gateway failed", f))

    def _send(self, destinations, state: GatewayState) -> None:
        if not destinations:
            return
        destination = destinations[0]
        me = self.identity.advertise_host
        headers = Headers.of(
            ("Via", self.identity.via_value(destination.transport, MAGIC_COOKIE + secrets.token_hex(8))),
            ("Max-Forwards", "70"),
            ("From", f"<sip:gateway-probe@{me}>;tag={secrets.token_hex(5)}"),
            ("To", f"<sip:{state.hop.host}>"),
            ("Call-ID", f"{secrets.token_hex(8)}@{me}"),
            ("CSeq", "1 OPTIONS"),
        )
        uri = f"sip:{state.hop.host}" + (f":{state.hop.port}" if state.hop.port else "")
        self.transactions.start_client(Request("OPTIONS", uri, headers), destination,
                                       lambda response: response.status >= 200 and self.health.answered(state.hop),
                                       lambda: None)
