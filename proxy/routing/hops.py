"""What happens to a request at this hop (RFC 3261 16.4, 16.6): our Routes, loops, branches, the forwarded copy.

- `consume_our_routes`: a Request-URI that is our Record-Route URI comes from
  a strict router (the last Route replaces it); our own URIs on top of Route
  are removed. The URIs consumed are returned: what they carried (our
  signature) is for the trust decision; being ours grants nothing.
- `loop_hash` / `is_loop`: 16.6 step 8. Our branch ends in a hash of what
  makes a request the same request again; one of our Vias with the same hash
  is a loop (482), another hash a spiral.
- `branch_for`: a unique prefix, a MAC over it and the Call-ID (so a stray 2xx
  can be checked as ours), the loop hash.
- `forward_request`: the copy a branch sends: new Request-URI, Max-Forwards - 1,
  our realm's Proxy-Authorization consumed (22.3), Record-Route signed for the
  Call-ID on dialog-creating requests, our Via on top.
"""

import hashlib

from proxy.registration.auth import parse_digest
from proxy.errors import SipError, SipParseError
from proxy.identity import Identity
from proxy.routing.routes import Hop
from proxy.sip.message import Request
from proxy.sip.uri import NameAddr, SipUri
from proxy.transaction import MAGIC_COOKIE, ServerTransaction
from proxy.transport import Destination
from proxy.trust import TOKEN_PARAM, RouteSigner


class Hops:
    def __init__(self, identity: Identity, signer: RouteSigner, realm: str):
        self.identity = identity
        self.signer = signer
        self.realm = realm

    # -- Route preprocessing (16.4) -----------------------------------------------

    def consume_our_routes(self, request: Request) -> tuple[Request, list[SipUri]]:
        uri = request.uri
        consumed: list[SipUri] = []
        if self.identity.is_our_uri(uri) and uri.user is None and uri.param("lr") is not None:
            routes = request.headers.values("route")
            if routes:
                target = NameAddr.parse(routes[-1], "Route").uri_text
                request = Request(request.method, target, _without_last_route(request.headers), request.body)
                consumed.append(uri)
        while True:
            top = request.headers.first_value("route")
            if top is None:
                break
            try:
                top_uri = NameAddr.parse(top, "Route").uri
            except SipParseError:
                raise SipError(400, "Bad Route") from None
            if not self.identity.is_our_uri(top_uri):
                break
            request = request.with_headers(request.headers.remove_first_value("route"))
            consumed.append(top_uri)
        return request, consumed

    # -- loops and branches (16.6 step 8) ------------------------------------------

    def loop_hash(self, request: Request) -> str:
        h = hashlib.blake2s(digest_size=6)
        for part in (request.uri_text, request.from_.tag or "", request.to.tag or "", request.call_id,
                     str(request.cseq.number), *request.headers.get_lines("route"),
                     *request.headers.get_lines("proxy-require")):
            h.update(part.encode("utf-8", "surrogateescape"))
            h.update(b"\x00")
        return h.hexdigest()

    def is_loop(self, request: Request) -> bool:
        mine = None
        for via in request.vias:
            if self.identity.is_our_via(via.host, via.port):
                if mine is None:
                    mine = self.loop_hash(request)
                if (via.branch or "").rpartition(".")[2] == mine:
                    return True
        return False

    def branch_for(self, tx: ServerTransaction, request: Request, index: int, attempt: int) -> str:
        key = hashlib.blake2s(repr(tx.key).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
        return self.signed_branch(f"{key}{index}x{attempt}", request)

    def signed_branch(self, prefix: str, request: Request) -> str:
        mac = self.signer.branch_mac(request.call_id, prefix)
        return f"{MAGIC_COOKIE}{prefix}.{mac}.{self.loop_hash(request)}"

    # -- the copy each branch sends (16.6) -------------------------------------------

    def record_route_value(self, transport: str, call_id: str) -> str:
        """Our Record-Route, signed for this Call-ID: in-dialog requests along it are served unchallenged."""
        return self.identity.record_route_value(transport, f";{TOKEN_PARAM}={self.signer.token(call_id)}")

    def forward_request(self, request: Request, hop: Hop, destination: Destination, branch: str, *,
                        record_route: bool) -> Request:
        headers = request.headers
        max_forwards = request.max_forwards
        headers = headers.set("Max-Forwards", str(69 if max_forwards is None else max_forwards - 1))
        credentials = headers.get_lines("proxy-authorization")
        if credentials:
            # 22.3: our realm's credentials are consumed here; others go on.
            kept = [v for v in credentials if (parse_digest(v) or {}).get("realm") != self.realm]
            headers = headers.remove("proxy-authorization")
            for value in kept:
                headers = headers.append("Proxy-Authorization", value)
        if record_route:
            headers = headers.prepend("Record-Route", self.record_route_value(destination.transport, request.call_id))
        headers = headers.prepend("Via", self.identity.via_value(destination.transport, branch))
        return Request(request.method, hop.uri, headers, request.body)


def to_strict_router(request: Request) -> Request:
    """16.6 step 6: the next hop is a strict router: its URI becomes the Request-URI, ours goes last in Route."""
    routes = request.headers.values("route")
    first = NameAddr.parse(routes[0], "Route").uri_text
    headers = request.headers.remove("route")
    for value in routes[1:] + [f"<{request.uri_text}>"]:
        headers = headers.append("Route", value)
    return Request(request.method, first, headers, request.body)


def _without_last_route(headers):
    values = headers.values("route")
    headers = headers.remove("route")
    for value in values[:-1]:
        headers = headers.append("Route", value)
    return headers
