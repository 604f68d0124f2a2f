"""Client and server transactions (RFC 3261 section 17, RFC 6026).

Each transaction is a small explicit state machine: `state` is one of the
names in the RFC's figures, every transition is a method. Timers:

  client INVITE      A (retransmit, UDP, T1 doubling)  B (64*T1 timeout)  D (32 s UDP, wait for retransmitted finals)
                     M (RFC 6026: 64*T1 in Accepted, absorbs 2xx from other forks)
  client non-INVITE  E (retransmit, T1 doubling to T2) F (64*T1 timeout)  K (T4 UDP)
  server INVITE      G (retransmit final, UDP)  H (64*T1 wait for ACK)  I (T4 UDP)  L (RFC 6026 Accepted)
  server non-INVITE  J (64*T1 UDP)  U (ours: 64*T1 + 2*T4 without a final from the core -> 500, so none lives for ever)

The phones' own defaults are T1 = 500 ms and T2 = 4 s (seed 001 lines 1990-1991).
Hot path: plain classes and a dict lookup per message, no framework; the
state names are kept so logs and tests read like the RFC.

Memory: the retransmission timers (A, E, G) and the guards B, F, H are a
`callLater` each; the timers of the absorbing states (D, I, J, K, L, M) and U
have fixed lengths and live in `proxy.deadlines` queues. A transaction that
enters an absorbing state *lingers*: it drops the parsed request and
responses and keeps only what absorbing needs (its key, where to answer, the
bytes to resend). At a few hundred calls per second tens of thousands of
transactions linger for 32 s; holding their parsed messages made every full
garbage collection scan hundreds of thousands of objects and stall the
server for a quarter of a second.
"""

import os
from collections import deque

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.deadlines import Deadlines
from proxy.sip.grammar import for_log
from proxy.sip.message import Request, Response, make_ack, make_response
from proxy.nat import NatPolicy
from proxy.transport import Destination, Source

log = Logger()

MAGIC_COOKIE = "z9hG4bK"


@attrs.frozen
class Timers:
    """T1, T2, T4 in seconds (RFC 3261 table 4)."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def b(self) -> float:
        return 64 * self.t1


def server_key(request: Request) -> tuple:
    """Key matching a request to its server transaction (section 17.2.3).

    With the magic cookie: branch, sent-by, and method (ACK matches INVITE).
    Without it (RFC 2543 peers): Request-URI, tags, Call-ID, CSeq number,
    top Via; the To tag is left out so the ACK to a non-2xx, which carries
    the tag we added, matches the INVITE it acknowledges.
    """
    via = request.top_via
    method = "INVITE" if request.method == "ACK" else request.method
    branch = via.branch
    if branch and branch.startswith(MAGIC_COOKIE) and len(branch) > len(MAGIC_COOKIE):
        return (branch, via.host, via.port, method)
    return (
        "2543",
        request.uri_text,
        request.from_.tag,
        request.call_id,
        request.cseq.number,
        str(via),
        method,
    )


def client_key(branch: str, method: str) -> tuple:
    """Key matching a response to its client transaction (section 17.1.3)."""
    return (branch, "INVITE" if method == "ACK" else method)


def response_destination(request: Request, source: Source, nat: NatPolicy = NatPolicy("never")) -> Destination:
    """Where a response goes, per RFC 3261 18.2.2 and RFC 3581 section 4.

    Reliable: back to the source (the connection is tried first by the
    caller). UDP: `received` (or the source) and the `rport` value when the
    client asked for it, else the Via port; never `maddr` (a third party). The top Via here already carries
    received/rport filled in on receipt.

    The phones send no rport, and behind NAT their Via names a private
    address and port that cannot be reached (seed 001 line 709). With
    the NAT policy (proxy/nat.py) the source address and port are used.
    """
    via = request.top_via
    if source.reliable:
        return Destination(source.transport, source.host, source.port)
    # maddr is not honoured: it would let one datagram aim our answers (and their
    # retransmissions) at a third party. received is always ours (SipServer stamps it).
    host = via.received or source.host
    rport = via.rport
    if rport:
        return Destination("UDP", host, int(rport))
    if nat.use_source(via.host, source.host):
        return Destination("UDP", source.host, source.port)
    return Destination("UDP", host, via.port or 5060)


class _Transaction:
    __slots__ = ("layer", "key", "state", "_timers")

    def __init__(self, layer: "TransactionLayer", key):
        self.layer = layer
        self.key = key
        self.state = ""
        self._timers: dict[str, object] = {}

    @property
    def clock(self) -> IReactorTime:
        return self.layer.clock

    @property
    def timers(self) -> Timers:
        return self.layer.timers

    def _start(self, name: str, delay: float, fn) -> None:
        self._stop(name)
        self._timers[name] = self.clock.callLater(delay, self._fire, name, fn)

    def _fire(self, name: str, fn) -> None:
        self._timers.pop(name, None)
        fn()

    def _stop(self, name: str) -> None:
        call = self._timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def _cancel_timers(self) -> None:
        for call in self._timers.values():
            if call.active():
                call.cancel()
        self._timers.clear()

    def _terminate(self) -> None:
        self.state = "Terminated"
        self._cancel_timers()
        self.layer._remove(self)

    def _linger(self, seconds: float):
        """Enter an absorbing state for `seconds`: no timers of its own, the parsed messages let go.

        Returns the deadline that ends it (None: it ended at once)."""
        self._cancel_timers()
        self._release()
        if seconds > 0:
            return self.layer.deadlines.add(seconds, _Transaction._end_lingering, self)
        self._terminate()
        return None

    def _end_lingering(self) -> None:
        if self.state != "Terminated":
            self._terminate()

    def _release(self) -> None:
        """Drop what an absorbing state does not need (overridden)."""


class ServerTransaction(_Transaction):
    """INVITE (figure 7 with RFC 6026's Accepted) and non-INVITE (figure 8) server transactions."""

    __slots__ = ("request", "method", "source", "is_invite", "last_status", "last_to_tag", "_wire", "destination",
                 "_interval", "cancelled", "_unanswered_timer")

    def __init__(self, layer, key, request: Request, source: Source):
        super().__init__(layer, key)
        self.request: Request | None = request  # None once the transaction lingers (see the module docstring)
        self.method = request.method
        self.source = source
        self.is_invite = request.method == "INVITE"
        # Of the last response sent, only what is asked of it later: whether there was one, and its To tag
        # (the next response repeats it). Its bytes are in _wire; a parsed copy per ringing call would be 2 KB.
        self.last_status: int | None = None
        self.last_to_tag: str | None = None
        self._wire: bytes | None = None
        self.destination = response_destination(request, source, layer.nat)
        self._interval = 0.0
        self.cancelled = False
        self.state = "Proceeding" if self.is_invite else "Trying"
        self._unanswered_timer = None
        if not self.is_invite:
            # A non-INVITE the core never answers (a bug, a plugin that never calls back) would
            # otherwise live for ever: the RFC gives its server transaction no timer before the final.
            self._unanswered_timer = layer.deadlines.add(self.timers.b + 2 * self.timers.t4,
                                                         ServerTransaction._unanswered, self)

    @property
    def lingering(self) -> bool:
        """Past its final response: nothing more may be built from its request."""
        return self.request is None

    def _release(self) -> None:
        self.request = None
        if self.state != "Completed":
            self._wire = None  # Completed (non-INVITE) resends it; Accepted and Confirmed send nothing

    def _stop_unanswered(self) -> None:
        if self._unanswered_timer is not None:
            self._unanswered_timer.cancel()
            self._unanswered_timer = None

    def _terminate(self) -> None:
        self._stop_unanswered()
        super()._terminate()

    def respond(self, response: Response) -> None:
        """Send a response from the TU; the transaction follows the RFC's transitions."""
        if self.state in ("Completed", "Confirmed", "Terminated"):
            log.debug("Late {status} for {method} dropped: transaction {state}",
                      status=response.status, method=self.method, state=self.state)
            return
        if self.state == "Accepted":
            # Only further 2xx (to a forked INVITE) may pass in Accepted; nothing is kept of them.
            if 200 <= response.status < 300:
                self.layer.send_response_bytes(response.serialize(), self)
            return
        self._send(response)
        status = response.status
        if status < 200:
            if self.state == "Trying":
                self.state = "Proceeding"
            return
        reliable = self.source.reliable
        if self.is_invite:
            if status < 300:
                # RFC 6026: Accepted absorbs INVITE retransmissions for 64*T1.
                self.state = "Accepted"
                self._linger(self.timers.b)
            else:
                self.state = "Completed"
                if not reliable:
                    self._interval = self.timers.t1
                    self._start("G", self._interval, self._timer_g)
                self._start("H", self.timers.b, self._timer_h)
        else:
            self.state = "Completed"
            self._stop_unanswered()
            deadline = self._linger(0 if reliable else self.timers.b)
            if deadline is not None:
                self.layer.absorbing.append((self, deadline))  # the first to go if the table fills (`_make_room`)

    def respond_statelessly(self, response: Response) -> None:
        """Send one final response and forget the transaction: no retransmission, no state held.

        For answers to requests nobody has vouched for yet (challenges, refusals):
        a stranger's datagram must not pin 7 KB for 32 s or make us send twelve.
        A retransmitted request is simply answered again.
        """
        if self.state in ("Completed", "Confirmed", "Terminated", "Accepted"):
            return
        self._remember(response)
        self.layer.send_response_bytes(response.serialize(), self)
        self._terminate()

    def _unanswered(self) -> None:
        self._unanswered_timer = None
        if self.state not in ("Trying", "Proceeding"):
            return
        log.warn("{method} (Call-ID {call_id}) got no final response from the core; answering 500",
                 method=self.method, call_id=for_log(self.request.call_id))
        self.layer.unanswered += 1
        response = make_response(self.request, 500, "Server Internal Error", to_tag=os.urandom(6).hex())
        self.respond_statelessly(response)

    def _remember(self, response: Response) -> None:
        self.last_status = response.status
        if response.status < 200 or self.is_invite:
            # Only a provisional (or an INVITE's 2xx in Accepted) is followed by another response that must
            # repeat this To tag: a non-INVITE's final is the last, and parsing its To again costs 5 us.
            self.last_to_tag = response.to.tag

    def _send(self, response: Response) -> None:
        self._remember(response)
        self._wire = response.serialize()
        self.layer.send_response_bytes(self._wire, self)

    def _resend(self) -> None:
        if self._wire is not None:
            self.layer.retransmitted()
            self.layer.send_response_bytes(self._wire, self)

    def request_retransmitted(self, request: Request) -> None:
        """A retransmission of the request (or the ACK) arrived."""
        if request.method == "ACK":
            if self.state == "Completed":
                self.state = "Confirmed"
                self._linger(0 if self.source.reliable else self.timers.t4)
            return
        if self.state in ("Proceeding", "Completed"):
            self._resend()

    def _timer_g(self) -> None:
        self._resend()
        self._interval = min(2 * self._interval, self.timers.t2)
        self._start("G", self._interval, self._timer_g)

    def _timer_h(self) -> None:
        log.info("No ACK for {status} to INVITE (Call-ID {call_id})",
                 status=self.last_status, call_id=for_log(self.request.call_id))
        self._terminate()


class ClientTransaction(_Transaction):
    """INVITE (figure 5 with RFC 6026) and non-INVITE (figure 6) client transactions.

    The owner gets `on_response(response)` for every response passed up and
    `on_timeout()` when Timer B or F fires. The request must carry its top
    Via with a unique branch already.
    """

    __slots__ = ("request", "destination", "is_invite", "_wire", "_interval", "on_response", "on_timeout", "branch",
                 "_ack_wire")

    def __init__(self, layer, key, request: Request, destination: Destination, on_response, on_timeout):
        super().__init__(layer, key)
        self.request = request
        self.destination = destination
        self.is_invite = request.method == "INVITE"
        self.on_response = on_response
        self.on_timeout = on_timeout
        self.branch = key[0]
        self._wire = request.serialize()
        self._ack_wire: bytes | None = None
        self._interval = self.timers.t1
        self.state = "Calling" if self.is_invite else "Trying"

    def _release(self) -> None:
        self.request = None
        self._wire = None
        self.on_timeout = None
        if self.state != "Accepted":
            self.on_response = None  # only Accepted passes responses up (2xx from other forks)

    @property
    def reliable(self) -> bool:
        return self.destination.transport != "UDP"

    def start(self) -> None:
        self.layer.send_request_bytes(self._wire, self.destination)
        if not self.reliable:
            self._start("A" if self.is_invite else "E", self._interval, self._retransmit)
        self._start("B" if self.is_invite else "F", self.timers.b, self._timeout)

    def _retransmit(self) -> None:
        if self.state not in ("Calling", "Trying", "Proceeding") or self._wire is None:
            return
        self.layer.retransmitted()
        self.layer.send_request_bytes(self._wire, self.destination)
        if self.is_invite:
            self._interval *= 2
            self._start("A", self._interval, self._retransmit)
        else:
            if self.state == "Proceeding":
                self._interval = self.timers.t2
            else:
                self._interval = min(2 * self._interval, self.timers.t2)
            self._start("E", self._interval, self._retransmit)

    def _timeout(self) -> None:
        if self.state in ("Calling", "Trying", "Proceeding"):
            self._terminate()
            self.on_timeout()

    def abandon(self) -> None:
        """Give up on a request that got no response at all (failover to another hop): no timers, no callbacks."""
        if self.state in ("Calling", "Trying"):
            self._terminate()

    def cancel_retransmissions(self) -> None:
        """Stop Timer A (used when a CANCEL is sent after a provisional)."""
        self._stop("A")

    def response_received(self, response: Response) -> None:
        status = response.status
        if self.is_invite:
            self._invite_response(response, status)
        else:
            self._non_invite_response(response, status)

    def _invite_response(self, response: Response, status: int) -> None:
        state = self.state
        if state in ("Calling", "Proceeding"):
            self._stop("A")
            if status < 200:
                self.state = "Proceeding"
                # Timer B only guards Calling; Timer C (the proxy's) takes over. Nothing is retransmitted
                # any more (17.1.1.2), so the bytes go: a ringing call holds 600 bytes less.
                self._stop("B")
                self._wire = None
                self.on_response(response)
            elif status < 300:
                self.state = "Accepted"
                on_response = self.on_response
                self._linger(self.timers.b)
                on_response(response)
            else:
                self.state = "Completed"
                self._send_ack(response)
                on_response = self.on_response
                self._linger(0 if self.reliable else 32.0)
                on_response(response)
        elif state == "Completed" and status >= 300 and self._ack_wire is not None:
            self.layer.send_request_bytes(self._ack_wire, self.destination)
        elif state == "Accepted" and 200 <= status < 300:
            self.on_response(response)

    def _non_invite_response(self, response: Response, status: int) -> None:
        if self.state not in ("Trying", "Proceeding"):
            return
        if status < 200:
            self.state = "Proceeding"
            self.on_response(response)
            return
        self.state = "Completed"
        on_response = self.on_response
        self._linger(0 if self.reliable else self.timers.t4)
        on_response(response)

    def _send_ack(self, response: Response) -> None:
        """ACK for a non-2xx final, per section 17.1.1.3; sent hop by hop (and kept: a retransmitted final gets it)."""
        self._ack_wire = make_ack(self.request, response).serialize()
        self.layer.send_request_bytes(self._ack_wire, self.destination)


class TransactionLayer:
    """Matches messages to transactions and owns their tables.

    `user` is the transaction user (the server core). It gets:
      request_received(tx, request)   a new server transaction
      ack_received(request, source)   an ACK matching no transaction (ACK for 2xx)
      cancel_received(tx, request, invite_tx)  a CANCEL (its own transaction), and the INVITE's
      stray_response(response, source)  a response matching no client transaction
      overloaded(request, source, reason)  a new request while the server table is full (max_server)
                                      or that `shed(request)` refuses (proxy/overload.py)
    """

    def __init__(self, clock: IReactorTime, transports, timers: Timers = Timers(), user=None, nat: NatPolicy = NatPolicy(),
                 max_server: int = 100_000, shed=None):
        self.clock = clock
        self.shed = shed  # shed(request) -> True: answer this new request 503 (load shedding)
        self.max_server = max_server  # a flood gets 503s, never an unbounded table
        self.nat = nat
        self.transports = transports
        self.timers = timers
        self.user = user
        self.deadlines = Deadlines(clock)  # the fixed-length timers of every transaction here
        self.server: dict[tuple, ServerTransaction] = {}
        self._branches: dict[str, int] = {}  # the RFC 3261 branches of self.server, counted (CANCEL shares one)
        # Answered non-INVITE server transactions over UDP, absorbing retransmissions for Timer J (64*T1), oldest
        # first. At a steady 3,125 registrations/s they alone would fill a 100,000 table: when it is full the
        # oldest of them makes room for new work instead of new work getting 503. A retransmission that arrives
        # after its transaction went is served again (a REGISTER's replayed nonce count is refused, OPTIONS
        # answered twice): a stray answer to a client that has its final one already.
        self.absorbing: deque[tuple[ServerTransaction, object]] = deque()  # with the deadline that ends each
        self.made_room = 0  # absorbing transactions ended early to let a new one in
        self.client: dict[tuple, ClientTransaction] = {}
        self.retransmissions = 0
        self.unanswered = 0  # non-INVITE server transactions the core never answered (Timer U)

    def counts(self) -> dict[str, int]:
        kinds = {"server_invite": 0, "server_non_invite": 0, "client_invite": 0, "client_non_invite": 0}
        for tx in self.server.values():
            kinds["server_invite" if tx.is_invite else "server_non_invite"] += 1
        for tx in self.client.values():
            kinds["client_invite" if tx.is_invite else "client_non_invite"] += 1
        return kinds

    # -- incoming ---------------------------------------------------------

    def request_received(self, request: Request, source: Source) -> None:
        key = server_key(request)
        tx = self.server.get(key)
        if request.method == "ACK":
            if tx is not None and tx.is_invite and tx.state in ("Completed", "Confirmed"):
                tx.request_retransmitted(request)
                return
            if tx is not None and tx.state == "Accepted":
                # ACK for a 2xx: end to end, not part of the transaction.
                self.user.ack_received(request, source)
                return
            self.user.ack_received(request, source)
            return
        if tx is not None:
            tx.request_retransmitted(request)
            return
        if len(self.server) >= self.max_server and not self._make_room():
            self.user.overloaded(request, source, "transaction_table_full")
            return
        if self.shed is not None and self.shed(request):
            self.user.overloaded(request, source, "shed")
            return
        tx = ServerTransaction(self, key, request, source)
        self.server[key] = tx
        if key[0] != "2543":
            self._branches[key[0]] = self._branches.get(key[0], 0) + 1
        if request.method == "CANCEL":
            self.user.cancel_received(tx, request, self.find_invite_for_cancel(request))
            return
        self.user.request_received(tx, request)

    def find_invite_for_cancel(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE server transaction a CANCEL refers to (section 9.2)."""
        key = server_key(cancel)
        if key[0] == "2543":
            invite_key = key[:-1] + ("INVITE",)
        else:
            invite_key = key[:3] + ("INVITE",)
        return self.server.get(invite_key)

    def response_received(self, response: Response, source: Source) -> None:
        via = response.top_via
        tx = self.client.get(client_key(via.branch or "", response.cseq.method))
        if tx is None:
            self.user.stray_response(response, source)
            return
        tx.response_received(response)

    # -- outgoing ---------------------------------------------------------

    def start_client(self, request: Request, destination: Destination, on_response, on_timeout) -> ClientTransaction:
        branch = request.top_via.branch
        key = client_key(branch, request.method)
        tx = ClientTransaction(self, key, request, destination, on_response, on_timeout)
        self.client[key] = tx
        tx.start()
        return tx

    def send_response_bytes(self, data: bytes, tx: ServerTransaction) -> None:
        connection = tx.source.connection if tx.source.reliable else None
        self.transports.send(data, tx.destination, connection)

    def send_request_bytes(self, data: bytes, destination: Destination) -> None:
        self.transports.send(data, destination)

    def retransmitted(self) -> None:
        self.retransmissions += 1

    def has_branch(self, branch: str) -> bool:
        """Is a server transaction with this (RFC 3261) Via branch under way? Asked before parsing."""
        return branch in self._branches

    def _make_room(self) -> bool:
        """End the oldest absorbing non-INVITE transaction early; False if none is left (all are under way)."""
        absorbing = self.absorbing
        while absorbing:
            tx, deadline = absorbing.popleft()
            if tx.state == "Completed" and self.server.get(tx.key) is tx:
                if not self.made_room:
                    log.warn("Transaction table full ({size}, [server] max_transactions): ending answered "
                             "transactions before their Timer J to let new requests in", size=self.max_server)
                self.made_room += 1
                deadline.cancel()  # its queue entry lets go of the transaction too: the memory is freed now
                tx._terminate()
                return True
        return False

    def _remove(self, tx) -> None:
        table = self.server if isinstance(tx, ServerTransaction) else self.client
        if table.get(tx.key) is tx:
            del table[tx.key]
            if table is self.server:
                if tx.key[0] != "2543":
                    left = self._branches.get(tx.key[0], 0) - 1
                    if left > 0:
                        self._branches[tx.key[0]] = left
                    else:
                        self._branches.pop(tx.key[0], None)
                absorbing = self.absorbing
                while absorbing and absorbing[0][0].state == "Terminated":  # Timer J ends them in this order
                    absorbing.popleft()
