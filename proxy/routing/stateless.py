"""What the proxy forwards without a transaction (RFC 3261 16.11): the ACK for a 2xx, and late 2xx responses.

- An ACK for a 2xx is end to end and cannot be challenged: it goes on only
  along a Record-Route we signed, or from a trusted network (proxy/trust.py).
- A response matching no client transaction (RFC 6026 narrows 16.7) goes on
  only when it is a 2xx to an INVITE whose top Via is ours, with a branch we
  signed for its Call-ID (a 2xx retransmission after Timer M). Anything else
  is dropped: a forged response must not aim datagrams at its second Via.
"""

import hashlib

from twisted.logger import Logger

from proxy.errors import SipError, SipParseError
from proxy.identity import Identity
from proxy.replies import Replies
from proxy.routing.hops import Hops
from proxy.routing.routes import hop_for_uri
from proxy.routing.targets import Targets
from proxy.sip.message import Request, Response
from proxy.sip.uri import NameAddr, SipUri
from proxy.transport import Destination, Source, is_ip_address
from proxy.trust import Trust

log = Logger()


class StatelessForwarder:
    def __init__(self, identity: Identity, trust: Trust, hops: Hops, targets: Targets, transports, replies: Replies):
        self.identity = identity
        self.trust = trust
        self.hops = hops
        self.targets = targets
        self.transports = transports
        self.replies = replies
        self.forwarded = 0

    def ack(self, request: Request, source: Source) -> None:
        try:
            if request.max_forwards == 0 or self.hops.is_loop(request):
                return
            request, consumed = self.hops.consume_our_routes(request)
            if not self.trust.may_forward_ack(source, self.trust.signed(request.call_id, consumed)):
                self.replies.dropped["unsigned_ack"] += 1
                return
            top = request.headers.first_value("route")
            if top is not None:
                hop_uri = NameAddr.parse(top, "Route").uri
                if not isinstance(hop_uri, SipUri):
                    return
                hop = hop_for_uri(hop_uri, request_uri=request.uri_text)
            else:
                uri = request.uri
                if not isinstance(uri, SipUri) or self.identity.is_our_domain(uri):
                    # An ACK for a 2xx carries the callee's Contact; one for our own domain
                    # acknowledges nothing we forwarded (a late ACK for a final we sent).
                    self.replies.dropped["stray_ack"] += 1
                    return
                hop = self.targets.for_uri(uri, kind="dialog").hops[0]
        except (SipError, SipParseError):
            return
        incoming = request.top_via.branch or ""
        prefix = hashlib.blake2s(f"ack:{incoming}:{request.call_id}".encode("utf-8", "surrogateescape"),
                                 digest_size=8).hexdigest()
        branch = self.hops.signed_branch(prefix, request)

        def send(destinations):
            if not destinations:
                return
            destination = destinations[0]
            forwarded = self.hops.forward_request(request, hop, destination, branch, record_route=False)
            self.forwarded += 1
            self.transports.send(forwarded.serialize(), destination)

        self.targets.resolve(hop).addCallback(send).addErrback(lambda f: log.failure("ACK forwarding failed", f))

    def stray_response(self, response: Response, source: Source) -> None:
        via = response.top_via
        if (not self.identity.is_our_via(via.host, via.port)
                or not (200 <= response.status < 300 and response.cseq.method == "INVITE")
                or not self.trust.signer.verify_branch(via.branch or "", response.call_id)):
            self.replies.dropped["stray_response"] += 1
            return
        upstream = response.with_headers(response.headers.remove_first_value("via"))
        try:
            next_via = upstream.top_via
        except SipParseError:
            self.replies.dropped["stray_response"] += 1
            return
        host = next_via.received or next_via.host
        rport = next_via.rport or ""
        port = int(rport) if rport.isascii() and rport.isdigit() else (next_via.port or 5060)
        if not is_ip_address(host) or not 0 < port < 65536:
            self.replies.dropped["stray_response"] += 1
            return
        self.forwarded += 1
        self.transports.send(upstream.serialize(), Destination(next_via.transport, host, port))
