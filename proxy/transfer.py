"""Bye/Also transfers the far end would drop: completed by the proxy with third-party call control.

The 7940/7960 transfer a call with REFER and, when the other side answers 501, fall back to a BYE
carrying `Also: C` (seed 001 lines 3378-3584, Figure B-8): a phone on this firmware then INVITEs C with
`Requested-By: B`. Most other user agents (trunks, gateways, newer phones) just answer the BYE, and the
caller is cut off. So when B's BYE with Also goes to a party whose User-Agent is not in
`[transfer] also_capable`, the proxy:

1. answers B's BYE itself (B is done) and keeps A's dialog, now as B's stand-in;
2. re-INVITEs A with no SDP (RFC 3725 flow I); A's 200 carries its offer;
3. INVITEs C with that offer (From: A, Referred-By and Requested-By: B, Contact: the proxy);
4. ACKs C's 200, then ACKs A's 200 with C's answer: A and C now send media to each other;
5. relays between the two dialogs (a BYE from either ends both; a re-INVITE, hold or resume, is passed to
   the other side and its answer back), until either hangs up.

The proxy calls C on B's word, so only for a B that is one of our users, and only where the request
policies would let B dial C itself (proxy/routing/router.py `_transfer_refused`; emergency numbers always):
a transfer is no way around dial classes. Otherwise the BYE goes on untouched.

When C fails (busy, no answer within `ring_timeout`, unknown) or A refuses the re-INVITE, B is gone
already: A gets a BYE. A 2xx that is retransmitted gets its ACK again. Every request of either leg
carries that leg's Call-ID, so with workers it reaches the process that owns the transfer (the new
leg's Call-ID is chosen to hash to this process, proxy/workers/owner.py).
"""

import fnmatch
import secrets

import attrs
from twisted.logger import Logger

from proxy.errors import SipError
from proxy.sip.headers import Headers
from proxy.sip.message import Request, Response
from proxy.sip.uri import NameAddr, SipUri
from proxy.transaction import MAGIC_COOKIE
from proxy.workers.owner import call_id_owner

log = Logger()


@attrs.define
class Leg:
    """Our side of one dialog: we are `local`, the UA there is `remote`."""

    call_id: str
    local: str  # our From/To value, with our tag
    remote: str  # theirs, with their tag (empty tag until they answer)
    target: str  # their Contact: the Request-URI of what we send
    cseq: int  # of the last request we sent on this leg
    invite_cseq: int = 0  # of our last INVITE here: its ACK carries it
    destination: object = None
    ack: bytes = b""  # our last ACK for a 2xx of theirs, sent again when the 2xx is

    def remote_tag(self) -> str | None:
        return NameAddr.parse(self.remote, "To").tag


class Takeover:
    def __init__(self, service: "TransferService", bye: Request, target: SipUri, dialog):
        self.service = service
        self.clock = service.clock
        self.bye = bye
        self.c_uri = target
        self.dialog = dialog  # proxy/dialogs.py Dialog (the call list shows one transferred call)
        self.state = "reinviting"
        h = bye.headers
        self.referrer = str(bye.from_.uri)
        # Leg A: the dialog B had with A; we continue it as B (B's tag, B's next CSeq).
        self.a = Leg(call_id=bye.call_id, local=h.get("from"), remote=h.get("to"), target=bye.uri_text,
                     cseq=bye.cseq.number)
        # Leg C: new, as A towards C; its Call-ID hashes to this process.
        a_identity = NameAddr.parse(h.get("to"), "To")
        self.c = Leg(call_id=service.new_call_id(), local=f"<{a_identity.uri_text}>;tag={secrets.token_hex(6)}",
                     remote=f"<{target}>", target=str(target), cseq=0)
        self.offer = b""
        self.a_tx = self.c_tx = None
        self.ring_timer = None
        self.pending = None  # a relayed re-INVITE: (server tx it came on, the leg it came from)

    # -- the flow ------------------------------------------------------------------------

    def start(self) -> None:
        self._send(self.a, "INVITE", on_response=self._a_answered, on_timeout=lambda: self._fail("A did not answer"))

    def _a_answered(self, response: Response) -> None:
        if response.status < 200:
            return
        if self.state != "reinviting":
            if 200 <= response.status < 300 and self.a.ack:  # a retransmitted 200: our ACK again
                self.service.send_bytes(self.a.ack, self.a.destination)
            return
        if response.status >= 300 or not response.body:
            self._fail(f"A refused the re-INVITE ({response.status} {response.reason})" if response.status >= 300
                       else "A answered the re-INVITE without an offer")
            return
        self.a.remote = response.headers.get("to")
        self.a.target = _contact(response) or self.a.target
        self.offer = response.body
        self.state = "inviting"
        self._invite_c()

    def _invite_c(self) -> None:
        extra = (("Referred-By", f"<{self.referrer}>"), ("Requested-By", f"<{self.referrer}>"))
        destination = self.service.destination_for_uri(self.c_uri)

        def send(dest):
            if dest is None:
                self._fail(f"no way to reach {self.c_uri}")
                return
            self.c.destination = dest
            self.c_tx = self._send(self.c, "INVITE", body=self.offer, extra=extra, on_response=self._c_answered,
                                   on_timeout=lambda: self._fail("C did not answer"))
            self.ring_timer = self.clock.callLater(self.service.ring_timeout, self._ring_timeout)

        destination.addCallback(send)
        destination.addErrback(lambda f: self._fail(f"cannot reach {self.c_uri}: {f.getErrorMessage()}"))

    def _c_answered(self, response: Response) -> None:
        if response.status < 200:
            return
        if self.state != "inviting":
            if 200 <= response.status < 300 and self.c.ack:
                self.service.send_bytes(self.c.ack, self.c.destination)
            elif 200 <= response.status < 300 and self.state == "ended":
                self._ack_and_bye(self.c, response)  # answered after we gave up: end it cleanly
            return
        self._stop_ring()
        if response.status >= 300:
            self._fail(f"C answered {response.status} {response.reason}")
            return
        self.c.remote = response.headers.get("to")
        self.c.target = _contact(response) or self.c.target
        self.c.ack = self._ack(self.c, b"")
        self.a.ack = self._ack(self.a, response.body)  # A gets C's answer in the ACK (RFC 3725 flow I)
        self.state = "bridged"
        self.service.bridged(self)
        log.info("Transfer completed by the proxy: {a} now talks to {c} (Also from {b}, Call-IDs {x} and {y})",
                 a=self.a.remote, c=self.c_uri, b=self.referrer, x=self.a.call_id, y=self.c.call_id)

    def _ring_timeout(self) -> None:
        if self.state == "inviting":
            self._cancel_c()
            self._fail(f"C did not answer within {self.service.ring_timeout:g} s")

    # -- requests from either leg ---------------------------------------------------------------

    def request_received(self, tx, request: Request, leg: Leg) -> None:
        other = self.c if leg is self.a else self.a
        method = request.method
        if method == "BYE":
            self.service.replies.respond(tx, 200, "OK")
            if self.state == "inviting" and leg is self.a:
                self._cancel_c()
            elif self.state in ("bridged", "reinviting") and other.remote_tag():
                self._send(other, "BYE")
            self._end("transferee" if leg is self.a else "transfer_target")
        elif method == "INVITE":
            if self.state != "bridged" or self.pending is not None:
                self.service.replies.respond(tx, 491, "Request Pending")
                return
            self.service.replies.respond(tx, 100, "Trying")
            self.pending = (tx, leg)
            self._send(other, "INVITE", body=request.body, on_response=lambda r: self._relayed_answer(r, other),
                       on_timeout=lambda: self._relay_failed(500, "No answer from the other party"))
        elif method in ("OPTIONS",):
            self.service.replies.respond(tx, 200, "OK")
        else:
            self.service.replies.respond(tx, 501, "Not Implemented")

    def _relayed_answer(self, response: Response, leg: Leg) -> None:
        if response.status < 200 or self.pending is None:
            if 200 <= response.status < 300 and leg.ack:
                self.service.send_bytes(leg.ack, leg.destination)
            return
        tx, _ = self.pending
        self.pending = None
        if response.status < 300:
            leg.ack = self._ack(leg, b"")
            extra = (("Contact", self.service.contact()), ("Content-Type", "application/sdp")) if response.body else \
                (("Contact", self.service.contact()),)
            self.service.replies.respond(tx, 200, "OK", extra=extra, body=response.body)
        else:
            self.service.replies.respond(tx, response.status, response.reason)

    def _relay_failed(self, status: int, reason: str) -> None:
        if self.pending is not None:
            tx, _ = self.pending
            self.pending = None
            self.service.replies.respond(tx, status, reason)

    # -- ending -----------------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        if self.state in ("ended", "bridged"):
            return
        log.warn("Transfer to {c} could not be completed: {why}; ending the call with {a}", c=self.c_uri, why=why,
                 a=self.a.remote)
        self._stop_ring()
        if self.a.remote_tag():
            if self.state == "inviting":
                self.a.ack = self._ack(self.a, b"")  # close A's re-INVITE before the BYE
            self._send(self.a, "BYE")
        self._end("failed")

    def _cancel_c(self) -> None:
        if self.c_tx is not None and self.c_tx.state == "Proceeding":
            self.service.cancel(self.c_tx)

    def _ack_and_bye(self, leg: Leg, response: Response) -> None:
        leg.remote = response.headers.get("to")
        leg.target = _contact(response) or leg.target
        leg.ack = self._ack(leg, b"")
        self._send(leg, "BYE")

    def _stop_ring(self) -> None:
        if self.ring_timer is not None and self.ring_timer.active():
            self.ring_timer.cancel()

    def _end(self, by: str) -> None:
        if self.state == "ended":
            return
        self.state = "ended"
        self._stop_ring()
        self.service.ended(self, by)

    # -- messages ---------------------------------------------------------------------------

    def _send(self, leg: Leg, method: str, *, body: bytes = b"", extra=(), on_response=None, on_timeout=None):
        leg.cseq += 1
        if method == "INVITE":
            leg.invite_cseq = leg.cseq
        request = self._request(leg, method, body, extra)
        return self.service.send(request, leg, on_response or (lambda r: None), on_timeout or (lambda: None))

    def _request(self, leg: Leg, method: str, body: bytes, extra=(), cseq: int | None = None) -> Request:
        branch = MAGIC_COOKIE + secrets.token_hex(8)
        fields = [("Via", self.service.via(branch)), ("Max-Forwards", "70"), ("From", leg.local),
                  ("To", leg.remote), ("Call-ID", leg.call_id), ("CSeq", f"{cseq or leg.cseq} {method}"),
                  ("Contact", self.service.contact()), *extra]
        if body:
            fields.append(("Content-Type", "application/sdp"))
        return Request(method, leg.target, Headers.of(*fields), body)

    def _ack(self, leg: Leg, body: bytes) -> bytes:
        """The ACK for the 2xx to our INVITE on this leg (a new transaction, end to end: section 13.2.2.4)."""
        data = self._request(leg, "ACK", body, cseq=leg.invite_cseq).serialize()
        self.service.send_bytes(data, leg.destination)
        return data


def _contact(response: Response) -> str | None:
    value = response.headers.first_value("contact")
    if not value:
        return None
    try:
        return NameAddr.parse(value, "Contact").uri_text
    except SipError:
        return None


class TransferService:
    """The transfers the proxy is completing, by Call-ID (either leg's), and what they need from the core."""

    def __init__(self, clock, *, transactions, replies, identity, targets, dialogs=None, also_capable=(),
                 ring_timeout: float = 20.0, worker: int | None = None, workers: int = 1):
        self.clock = clock
        self._transactions = transactions  # () -> the TransactionLayer (made after the router that holds us)
        self.replies = replies
        self.identity = identity
        self.targets = targets
        self.dialogs = dialogs
        self.also_capable = tuple(p.lower() for p in also_capable)
        self.ring_timeout = ring_timeout
        self.worker = worker
        self.workers = workers
        self.by_call_id: dict[str, Takeover] = {}
        self.completed = 0
        self.failed = 0

    # -- the router's questions ----------------------------------------------------------------

    def should_complete(self, bye: Request, user_agent: str) -> SipUri | None:
        """C, when this BYE with Also goes to a party that will not act on Also; else None (relay it)."""
        also = bye.headers.first_value("also")
        if not also:
            return None
        if any(fnmatch.fnmatch(user_agent.lower(), pattern) for pattern in self.also_capable):
            return None
        try:
            uri = NameAddr.parse(also, "Also").uri
        except SipError:
            return None
        return uri if isinstance(uri, SipUri) else None

    def start(self, tx, bye: Request, target: SipUri, dialog) -> None:
        self.replies.respond(tx, 200, "OK")  # B is done with the call
        takeover = Takeover(self, bye, target, dialog)
        self.by_call_id[takeover.a.call_id] = takeover
        self.by_call_id[takeover.c.call_id] = takeover
        log.info("BYE with Also: {c} from {b}: completing the transfer for {a}, which does not act on Also",
                 c=target, b=takeover.referrer, a=takeover.a.remote)
        destination = self.destination_for_uri(SipUri.parse(takeover.a.target), dialog=True)

        def go(dest):
            if dest is None:
                takeover._end("failed")
                return
            takeover.a.destination = dest
            takeover.start()
        destination.addCallback(go)
        destination.addErrback(lambda f: takeover._end("failed"))

    def owns(self, request: Request) -> tuple[Takeover, Leg] | None:
        """A request in one of our legs (Call-ID and both tags match): ours to answer."""
        takeover = self.by_call_id.get(request.call_id)
        if takeover is None:
            return None
        for leg in (takeover.a, takeover.c):
            if leg.call_id == request.call_id and request.from_.tag == leg.remote_tag() and \
                    request.to.tag == NameAddr.parse(leg.local, "From").tag:
                return takeover, leg
        return None

    def ack_received(self, request: Request) -> bool:
        """An ACK for a 2xx we sent on a relayed re-INVITE: absorbed (the other leg got its own)."""
        return self.by_call_id.get(request.call_id) is not None

    # -- what a takeover uses ---------------------------------------------------------------

    def new_call_id(self) -> str:
        while True:
            call_id = f"{secrets.token_hex(10)}@{self.identity.advertise_host}"
            if self.workers <= 1 or call_id_owner(call_id.encode(), self.workers) == (self.worker or 0):
                return call_id

    def via(self, branch: str) -> str:
        return self.identity.via_value("UDP", branch)

    def contact(self) -> str:
        # With a user part: a request to it is routed (to `owns`), not answered as one for the server itself.
        return f"<sip:transfer@{self.identity.advertise_host}:{self.identity.port_for('UDP')}>"

    def destination_for_uri(self, uri: SipUri, dialog: bool = False):
        from twisted.internet import defer

        try:
            if dialog:
                target = self.targets.for_dialog(uri)
            elif self.identity.is_our_domain(uri) and uri.decoded_user:
                found = self.targets.for_user(uri.decoded_user) or self.targets.for_number(uri.decoded_user)
                if not found:
                    return defer.succeed(None)
                target = found[0]
            else:
                target = self.targets.for_uri(uri, kind="gateway")
        except SipError:
            return defer.succeed(None)
        hop = target.hops[0]
        d = self.targets.resolve(hop)
        d.addCallback(lambda destinations: destinations[0] if destinations else None)
        return d

    def send(self, request: Request, leg: Leg, on_response, on_timeout):
        if leg.destination is None:
            return None
        return self._transactions().start_client(request, leg.destination, on_response, on_timeout)

    def send_bytes(self, data: bytes, destination) -> None:
        if destination is not None:
            self._transactions().send_request_bytes(data, destination)

    def cancel(self, invite_tx) -> None:
        request = invite_tx.request
        if request is None:
            return
        headers = Headers.of(("Via", request.headers.first_value("via")), ("Max-Forwards", "70"),
                             ("From", request.headers.get("from")), ("To", request.headers.get("to")),
                             ("Call-ID", request.call_id), ("CSeq", f"{request.cseq.number} CANCEL"))
        invite_tx.cancel_retransmissions()
        self._transactions().start_client(Request("CANCEL", request.uri_text, headers), invite_tx.destination,
                                       lambda r: None, lambda: None)

    def bridged(self, takeover: Takeover) -> None:
        self.completed += 1
        if takeover.dialog is not None:
            takeover.dialog.state = "up"
            takeover.dialog.transfer_to = str(takeover.c_uri)

    def ended(self, takeover: Takeover, by: str) -> None:
        for call_id in (takeover.a.call_id, takeover.c.call_id):
            if self.by_call_id.get(call_id) is takeover:
                del self.by_call_id[call_id]
        if by == "failed":
            self.failed += 1
        if self.dialogs is not None and takeover.dialog is not None:
            self.dialogs.closed(takeover.dialog, ended_by=by)

    def counters(self) -> dict:
        return {"completed": self.completed, "failed": self.failed, "in_progress": len(self.by_call_id) // 2}
