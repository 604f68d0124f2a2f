"""Is each registered phone still there? Periodic OPTIONS, their round-trip time, and a NAT keepalive.

With `[registrar] keepalive_interval` set, every interval each phone (one
OPTIONS per destination, not per line) gets an OPTIONS to its binding's
destination (the NAT rule applies, so the packet also keeps the phone's NAT
mapping open, as Kamailio's nathelper pings do). The sends are spread over
the interval. Any response (200, or 405/501 from a UA that does not do
OPTIONS) means reachable, with its round-trip time; Timer F (32 s) without
one means unreachable. A phone that goes from reachable to silent is
logged, counted and sent to plugins as `phone_silent`; `phone_back` when it
answers again. State is kept only for the destinations of current bindings.
"""

import secrets

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.identity import Identity
from proxy.nat import NatPolicy
from proxy.periodic import Every
from proxy.registration.location import Binding, ILocationService
from proxy.sip.headers import Headers
from proxy.sip.message import Request, Response
from proxy.sip.uri import SipUri
from proxy.transaction import MAGIC_COOKIE
from proxy.transport import Destination

log = Logger()


@attrs.define
class Reachability:
    reachable: bool | None = None  # None: not asked yet
    rtt: float | None = None  # seconds, of the last answer
    last_answer: float | None = None
    sent_at: float | None = None


class Keepalive:
    def __init__(self, clock: IReactorTime, transactions, location: ILocationService, identity: Identity,
                 nat: NatPolicy, *, interval: float, on_event=None):
        self.clock = clock
        self.transactions = transactions
        self.location = location
        self.identity = identity
        self.nat = nat
        self.interval = interval
        self.on_event = on_event  # on_event(name, **fields)
        self.state: dict[Destination, Reachability] = {}
        self.counts = {"sent": 0, "answered": 0, "unanswered": 0, "went_silent": 0, "came_back": 0}
        self._rounds = Every(clock, interval, self.round) if interval > 0 else None
        self._pending = []

    def start(self) -> None:
        if self._rounds is not None:
            self._rounds.start()

    def stop(self) -> None:
        if self._rounds is not None:
            self._rounds.stop()
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending = []

    def destination(self, binding: Binding) -> Destination:
        contact = SipUri.parse(binding.contact)
        return binding.destination(contact.param("maddr") or contact.host, contact.port, self.nat)

    def status(self, binding: Binding) -> Reachability | None:
        return self.state.get(self.destination(binding))

    def round(self) -> None:
        """One OPTIONS per phone, spread over the interval."""
        phones: dict[Destination, Binding] = {}
        node = getattr(self.location, "node", "")
        for binding in self.location.all_bindings():
            if binding.node and node and binding.node != node:
                continue  # several nodes: each pings the phones that registered through it (their NAT pinhole)
            phones.setdefault(self.destination(binding), binding)
        for gone in set(self.state) - set(phones):
            del self.state[gone]
        self._pending = [c for c in self._pending if c.active()]
        spacing = self.interval / max(len(phones), 1)
        for n, (destination, binding) in enumerate(sorted(phones.items(), key=lambda item: item[1].contact)):
            self._pending.append(self.clock.callLater(n * spacing, self.ping, destination, binding))

    def ping(self, destination: Destination, binding: Binding) -> None:
        state = self.state.setdefault(destination, Reachability())
        state.sent_at = self.clock.seconds()
        self.counts["sent"] += 1
        self.transactions.start_client(self._options(binding, destination), destination,
                                       lambda response: self._answered(destination, binding, response),
                                       lambda: self._silent(destination, binding))

    def _options(self, binding: Binding, destination: Destination) -> Request:
        contact = SipUri.parse(binding.contact)
        me = self.identity.advertise_host
        branch = MAGIC_COOKIE + secrets.token_hex(8)
        headers = Headers.of(
            ("Via", self.identity.via_value(destination.transport, branch)),
            ("Max-Forwards", "70"),
            ("From", f"<sip:keepalive@{me}>;tag={secrets.token_hex(5)}"),
            ("To", f"<{binding.contact}>"),
            ("Call-ID", f"{secrets.token_hex(8)}@{me}"),
            ("CSeq", "1 OPTIONS"),
        )
        return Request("OPTIONS", str(contact), headers)

    def _answered(self, destination: Destination, binding: Binding, response: Response) -> None:
        state = self.state.get(destination)
        if state is None or response.status < 200:
            return
        now = self.clock.seconds()
        was = state.reachable
        state.reachable = True
        state.last_answer = now
        state.rtt = now - state.sent_at if state.sent_at is not None else None
        self.counts["answered"] += 1
        if was is False:
            self.counts["came_back"] += 1
            log.info("Phone {contact} answers again ({rtt:.0f} ms)", contact=binding.contact, rtt=state.rtt * 1000)
            self._emit("phone_back", binding=binding)

    def _silent(self, destination: Destination, binding: Binding) -> None:
        state = self.state.get(destination)
        if state is None:
            return
        was = state.reachable
        state.reachable = False
        self.counts["unanswered"] += 1
        if was is not False:
            self.counts["went_silent"] += 1
            log.warn("Phone {contact} ({aor}) does not answer OPTIONS", contact=binding.contact, aor=binding.aor)
            self._emit("phone_silent", binding=binding)

    def _emit(self, name: str, **fields) -> None:
        if self.on_event is not None:
            self.on_event(name, **fields)
