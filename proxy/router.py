"""The stateful proxy core (RFC 3261 section 16): from a validated request to its branches.

`Router.route` is the server's route for every request not handled
elsewhere. In order, as section 16 has it:

16.3  Max-Forwards (483; OPTIONS at 0 answered here), Proxy-Require (420),
      loops (482: one of the Vias is ours with the same loop hash).
16.4  A Request-URI that is our Record-Route URI comes from a strict router:
      the last Route replaces it. Our own URIs on top of Route are removed.
      What they carried (our signature) is kept for the trust decision;
      being ours grants nothing.
trust proxy/trust.py decides whether the request is served: trusted
      network, a dialog along our signed Record-Route, an emergency number,
      or digest credentials (407, seed 001 line 3945). ACK cannot be
      challenged: it is forwarded only along a signed route or from a
      trusted peer.
16.5  Signed dialogs and trusted peers follow the remaining route set.
      Anyone else's Route headers are dropped (a preloaded Route must not
      take a stranger's call to a gateway), as Kamailio's sample config
      does. Our domain: emergency numbers -> emergency gateways; local
      users -> their bindings (480 without one); others -> dial-pattern
      routes (404 without). Foreign domains -> domain routes, the outbound
      proxy, or RFC 3263 on the Request-URI.
16.6  Each branch: new Request-URI, Max-Forwards - 1, Record-Route with ;lr
      on dialog-creating requests, our Via with a branch that carries the
      loop hash, our realm's Proxy-Authorization removed.

ACK for a 2xx and responses matching no transaction are forwarded
statelessly (16.11), so 2xx retransmissions reach the caller.
"""

import hashlib

from twisted.internet import defer
from twisted.logger import Logger

from proxy.auth import Authenticated, Challenge, DigestAuthenticator, parse_digest
from proxy.config import ForwardingConfig, ProxySettings
from proxy.credentials import ICredentials
from proxy.dns import NextHopResolver
from proxy.errors import SipError, SipParseError
from proxy.forking import ProxyCall, Target
from proxy.forwarding import FeatureCodes, Forwarding, ForwardingError, Plan, check_target
from proxy.location import ILocationService
from proxy.plugin import Forward, Respond
from proxy.routes import Hop, RouteTable, gateway_uri, hop_for_uri
from proxy.server import SipServer
from proxy.sip.grammar import for_log
from proxy.sip.message import Request, Response
from proxy.sip.uri import NameAddr, SipUri
from proxy.transaction import MAGIC_COOKIE, ServerTransaction
from proxy.transport import Destination, Source, is_ip_address
from proxy.trust import TOKEN_PARAM, Served, Trust

log = Logger()

DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER"})


class Router:
    def __init__(self, server: SipServer, location: ILocationService, authenticator: DigestAuthenticator,
                 credentials: ICredentials, settings: ProxySettings, routes: RouteTable, resolver: NextHopResolver,
                 *, trust: Trust, domain: str, advertise: tuple[str, dict[str, int]], nat_mode: str = "auto",
                 forwarding: Forwarding | None = None, forwarding_config: ForwardingConfig = ForwardingConfig()):
        self.server = server
        self.forwarding = forwarding
        self.forwarding_config = forwarding_config
        self.feature_codes = FeatureCodes.from_config(forwarding_config) if forwarding_config.feature_codes else None
        self.clock = server.clock
        self.identity = server.identity
        self.location = location
        self.authenticator = authenticator
        self.credentials = credentials
        self.settings = settings
        self.routes = routes
        self.resolver = resolver
        self.domain = domain
        self.advertise_host, self.advertise_ports = advertise
        self.nat_mode = nat_mode
        self.trust = trust
        self.calls: dict[int, ProxyCall] = {}
        self.observers: list = []  # observer(event, **fields): "answered", "finished"
        self.plugins = None  # a PluginHost: request policies are asked before routing
        self.stats = {"calls_answered": 0, "calls_failed": 0, "stateless_forwarded": 0}
        self.forwards: dict[str, int] = {}  # by kind: unconditional, user-busy, no-answer, unavailable
        self.redirects: dict[int, int] = {}  # 3xx answered as a redirect server, by code
        server.route = self.route
        server.cancel_hook = self.cancel
        server.ack_hook = self.ack
        server.stray_response_hook = self.stray_response

    # -- helpers ---------------------------------------------------------------

    def is_trusted(self, host: str) -> bool:
        return self.trust.is_trusted_network(host)

    def is_our_uri(self, uri) -> bool:
        """A URI naming this proxy (our Record-Route / Route URI): host ours, port ours or absent."""
        if not isinstance(uri, SipUri):
            return False
        host = uri.host
        ours = host == self.advertise_host or host in self.identity.addresses or host in self.identity.domains
        return ours and (uri.port is None or uri.port in self.identity.ports)

    def is_our_domain(self, uri: SipUri) -> bool:
        return self.identity.is_our_domain(uri, self.advertise_host)

    def is_own_destination(self, destination: Destination) -> bool:
        """A destination that is one of our own sockets: sending there would loop through us."""
        host = destination.host
        ours = host == self.advertise_host or host in self.identity.addresses
        return ours and destination.port in self.identity.ports

    def via_value(self, transport: str, branch: str) -> str:
        port = self.advertise_ports.get(transport) or self.advertise_ports.get("UDP", 5060)
        return f"SIP/2.0/{transport} {self.advertise_host}:{port};branch={branch}"

    def record_route_value(self, transport: str, call_id: str) -> str:
        """Our Record-Route, signed for this Call-ID: in-dialog requests along it are served unchallenged."""
        port = self.advertise_ports.get(transport) or self.advertise_ports.get("UDP", 5060)
        extra = "" if transport == "UDP" else f";transport={transport.lower()}"
        return f"<sip:{self.advertise_host}:{port};lr{extra};{TOKEN_PARAM}={self.trust.route_token(call_id)}>"

    def loop_hash(self, request: Request) -> str:
        """16.6 step 8: what makes a request the same request again (a loop, not a spiral)."""
        h = hashlib.blake2s(digest_size=6)
        for part in (request.uri_text, request.from_.tag or "", request.to.tag or "", request.call_id,
                     str(request.cseq.number), *request.headers.get_lines("route"),
                     *request.headers.get_lines("proxy-require")):
            h.update(part.encode("utf-8", "surrogateescape"))
            h.update(b"\x00")
        return h.hexdigest()

    def branch_for(self, tx: ServerTransaction, request: Request, index: int, attempt: int) -> str:
        key = hashlib.blake2s(repr(tx.key).encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
        return self._signed_branch(f"{key}{index}x{attempt}", request)

    def _signed_branch(self, prefix: str, request: Request) -> str:
        """Our Via branch: a unique prefix, a MAC over it and the Call-ID, the loop hash (16.6 step 8)."""
        mac = self.trust.signer.branch_mac(request.call_id, prefix)
        return f"{MAGIC_COOKIE}{prefix}.{mac}.{self.loop_hash(request)}"

    def _is_loop(self, request: Request) -> bool:
        mine = None
        for via in request.vias:
            if via.host == self.advertise_host and (via.port or 5060) in self.advertise_ports.values():
                if mine is None:
                    mine = self.loop_hash(request)
                branch = via.branch or ""
                if branch.rpartition(".")[2] == mine:
                    return True
        return False

    # -- entry points ------------------------------------------------------------

    def route(self, tx: ServerTransaction, request: Request) -> None:
        try:
            self._route(tx, request)
        except SipError as e:
            if e.status >= 400 and e.status not in (401, 407):
                log.info("{method} {uri} (Call-ID {call_id}) rejected: {status} {reason}", method=request.method,
                         uri=for_log(request.uri_text), call_id=for_log(request.call_id), status=e.status,
                         reason=e.reason)
            if tx.state in ("Trying", "Proceeding"):
                if tx.last_response is None:
                    # Nothing sent yet (no 100): nobody vouched for this request, so hold no state for it.
                    self.server.respond_statelessly(tx, e.status, e.reason, extra=e.headers)
                else:
                    self.server.respond(tx, e.status, e.reason, extra=e.headers)

    def _route(self, tx: ServerTransaction, request: Request) -> None:
        max_forwards = request.max_forwards
        if max_forwards == 0:
            if request.method == "OPTIONS":
                self.server.respond(tx, 200, "OK", extra=self.server.capabilities())
                return
            raise SipError(483, "Too Many Hops")
        required = request.headers.values("proxy-require")
        if required:
            raise SipError(420, "Bad Extension", (("Unsupported", ", ".join(required)),))
        if self._is_loop(request):
            raise SipError(482, "Loop Detected")
        received = request  # what the client signed its digest over
        request, consumed = self._preprocess_routes(request)
        source = tx.source
        in_dialog = request.to.tag is not None
        uri = request.uri
        if not isinstance(uri, SipUri):
            raise SipError(416, "Unsupported URI Scheme")
        ours = self.is_our_domain(uri)
        emergency = ours and not in_dialog and self.routes.is_emergency(uri.decoded_user)
        served = self.trust.decide(received, source, signed=self.trust.signed(request.call_id, consumed),
                                   emergency=emergency, for_our_domain=ours)
        if request.method == "INVITE":
            # Only now: a challenge or refusal before this point is sent statelessly.
            self.server.respond(tx, 100, "Trying")
        if served.basis in ("signed-dialog", "trusted-network") and (
                in_dialog or request.headers.get("route") is not None):
            self._route_along(tx, request)
            return
        if request.headers.get("route") is not None:
            # Nobody we trust set this route up: it grants nothing and decides nothing.
            log.info("Dropped a preloaded Route from {host} (Call-ID {call_id})", host=source.host,
                     call_id=for_log(request.call_id))
            request = request.with_headers(request.headers.remove("route"))
        if in_dialog:
            self._route_unsigned_dialog(tx, request)
            return
        self._route_initial(tx, request, source, served)

    def _preprocess_routes(self, request: Request) -> tuple[Request, list[SipUri]]:
        """16.4: strict-routing upstreams, and our own Routes on top; returns the URIs of ours consumed."""
        uri = request.uri
        consumed: list[SipUri] = []
        if self.is_our_uri(uri) and uri.user is None and uri.param("lr") is not None:
            routes = request.headers.values("route")
            if routes:
                last = routes[-1]
                target = NameAddr.parse(last, "Route").uri_text
                headers = _remove_last_route(request.headers)
                request = Request(request.method, target, headers, request.body)
                consumed.append(uri)
        while True:
            top = request.headers.first_value("route")
            if top is None:
                break
            try:
                top_uri = NameAddr.parse(top, "Route").uri
            except SipParseError:
                raise SipError(400, "Bad Route") from None
            if not self.is_our_uri(top_uri):
                break
            request = request.with_headers(request.headers.remove_first_value("route"))
            consumed.append(top_uri)
        return request, consumed

    def _route_along(self, tx, request: Request) -> None:
        """A signed dialog or a trusted peer: follow the Route set, else the Request-URI."""
        top = request.headers.first_value("route")
        uri = request.uri
        if top is not None:
            hop_uri = NameAddr.parse(top, "Route").uri
            if not isinstance(hop_uri, SipUri):
                raise SipError(416, "Unsupported URI Scheme in Route")
            if hop_uri.param("lr") is None:
                request = _to_strict_router(request)
            hop = hop_for_uri(hop_uri, request_uri=request.uri_text)
            target = Target(hops=(hop,), kind="dialog")
        elif self.is_our_domain(uri) and request.to.tag is None:
            self._route_initial(tx, request, tx.source, Served("trusted-network"))
            return
        else:
            target = self._dialog_target(uri)
        self._start(tx, request, [target], record_route=False)

    def _route_unsigned_dialog(self, tx, request: Request) -> None:
        """In-dialog, authenticated, but not along our Record-Route: straight to the remote target."""
        self._start(tx, request, [self._dialog_target(request.uri)], record_route=False)

    def _dialog_target(self, uri: SipUri) -> Target:
        """An in-dialog Request-URI is the peer's Contact: a binding of ours, or a foreign host."""
        if self.is_our_domain(uri) and self.location.find_contact(str(uri)) is None:
            # Our own domain is not a remote target; no dialog of ours ends here.
            raise SipError(481, "Call/Transaction Does Not Exist")
        return self.target_for_uri(uri, kind="dialog")

    def _route_initial(self, tx, request: Request, source: Source, served: Served) -> None:
        uri = request.uri
        dialled = uri.decoded_user
        ours = self.is_our_domain(uri)
        if served.basis == "emergency" or (ours and self.routes.is_emergency(dialled)):
            hops = self.routes.emergency_hops(dialled)
            if not hops:
                log.error("Emergency call to {number} from {host} but no emergency gateway is configured",
                          number=dialled, host=source.host)
                raise SipError(503, "No emergency route configured")
            log.warn("Emergency call to {number} from {host} (Call-ID {call_id})", number=dialled, host=source.host,
                     call_id=for_log(request.call_id))
            self._start(tx, request, [Target(hops=tuple(hops), kind="emergency")])
            return
        authenticated = served.user
        if self.plugins is not None:
            verdict = self.plugins.check_request(request, source, authenticated)
            if isinstance(verdict, Respond):
                log.info("{method} {uri} rejected by policy: {status} {reason}", method=request.method,
                         uri=for_log(request.uri_text), status=verdict.status, reason=verdict.reason)
                raise SipError(verdict.status, verdict.reason)
            if isinstance(verdict, Forward):
                self._start(tx, request, [self.target_for_uri(SipUri.parse(verdict.uri), kind="gateway")])
                return
        if ours:
            if dialled is None:
                raise SipError(404, "Not Found")
            if request.method == "INVITE" and self.feature_codes is not None:
                code = self.feature_codes.parse(dialled)
                if code is not None:
                    self._feature_code(tx, request, authenticated, code)
                    return
            if self.forwarding is not None and self.is_local_user(dialled):
                self._route_to_local_user(tx, request, dialled, uri)
                return
            targets = self.targets_for_user(dialled)
            if targets is None:
                found = self.routes.by_number(dialled)
                if found is None:
                    raise SipError(404, "Not Found")
                name, hops = found
                log.info("Routing {number} by route {route}", number=dialled, route=name)
                targets = [Target(hops=tuple(hops), kind="gateway")]
            elif not targets:
                raise SipError(480, "Temporarily Unavailable")
        else:
            found = self.routes.by_domain(uri.host, uri)
            if found is not None:
                targets = [Target(hops=tuple(found[1]), kind="gateway")]
            elif self.settings.outbound_proxy:
                hop = hop_for_uri(gateway_uri(self.settings.outbound_proxy), request_uri=request.uri_text)
                targets = [Target(hops=(hop,), kind="gateway")]
            else:
                targets = [self.target_for_uri(uri, kind="gateway")]
        self._start(tx, request, targets)

    def is_local_user(self, user: str) -> bool:
        return self.credentials.lookup(user) is not None or bool(self.location.lookup(f"sip:{user}@{self.domain}"))

    def _feature_code(self, tx, request: Request, authenticated: str | None, code) -> None:
        """*72<number> and friends: change the caller's own forwarding, answer with what was done."""
        if authenticated is None or self.forwarding is None:
            raise SipError(403, "Feature codes need a registered phone")
        from_uri = request.from_.uri
        user = from_uri.decoded_user if isinstance(from_uri, SipUri) and from_uri.decoded_user else authenticated
        action, kind, target = code
        label = {"always": "Forwarding", "busy": "Forwarding on busy", "no_answer": "Forwarding on no answer"}[kind]
        try:
            if action == "set":
                self.forwarding.store.update(user, **{kind: check_target(target)})
                reason = f"{label} to {target} set"
            else:
                self.forwarding.store.update(user, **{kind: ""})
                reason = f"{label} cleared"
        except ForwardingError as e:
            raise SipError(484, "Address Incomplete") from e
        log.info("{user} by feature code: {reason}", user=user, reason=reason)
        # A final non-2xx: no call is set up; the reason phrase says what was done.
        self.server.respond(tx, 480, reason)

    def _redirect_mode(self, uri: SipUri) -> bool:
        c = self.forwarding_config
        return c.redirect or uri.host in c.redirect_domains

    def _route_to_local_user(self, tx, request: Request, user: str, uri: SipUri) -> None:
        plan = self.forwarding.plan(user, is_local_user=self.is_local_user)
        if plan.loop:
            raise SipError(482, "Forwarding loop")
        if request.method == "INVITE" and self._redirect_mode(uri):
            self._answer_redirect(tx, plan)
            return
        if (request.method == "INVITE" and plan.diversions and plan.diversions[0].reason == "unconditional"
                and self.forwarding_config.unconditional == "redirect"):
            self._count_forward(plan)
            self._redirect(tx, [(1.0, plan.target_uri if not plan.user else f"sip:{plan.user}@{self.domain}")])
            return
        self._start(tx, request, [], plan=plan)

    def _answer_redirect(self, tx, plan: Plan) -> None:
        """Redirect server: 302 to the one contact, or 300 with the user's contacts then the forward targets."""
        contacts: list[tuple[float, str]] = []
        if plan.user:
            contacts += [(b.q, b.contact) for b in self.location.lookup(f"sip:{plan.user}@{self.domain}")]
        else:
            contacts.append((1.0, plan.target_uri))
        for follow in (plan.on_busy, plan.on_no_answer):
            if follow is not None:
                uri = follow.target_uri if not follow.user else f"sip:{follow.user}@{self.domain}"
                if all(uri != c for _, c in contacts):
                    contacts.append((0.1, uri))
        if not contacts:
            raise SipError(480, "Temporarily Unavailable")
        contacts.sort(key=lambda c: -c[0])
        self._redirect(tx, contacts)

    def _redirect(self, tx, contacts: list[tuple[float, str]]) -> None:
        status = 302 if len(contacts) == 1 else 300
        extra = tuple(("Contact", f"<{uri}>" + (f";q={q:g}" if len(contacts) > 1 else "")) for q, uri in contacts)
        self.redirects[status] = self.redirects.get(status, 0) + 1
        self.server.respond(tx, status, None, extra=extra)

    def _count_forward(self, plan: Plan) -> None:
        for step in plan.diversions:
            self.forwards[step.reason] = self.forwards.get(step.reason, 0) + 1

    def plan_targets(self, plan: Plan) -> list[Target]:
        """Targets of one step of a plan: the user's contacts, or a number via routes, or a foreign URI."""
        self._count_forward(plan)
        if plan.user:
            return self.targets_for_user(plan.user) or []
        uri = SipUri.parse(plan.target_uri)
        if self.is_our_domain(uri) and uri.user:
            found = self.routes.by_number(uri.decoded_user)
            if found is None:
                return []
            return [Target(hops=tuple(found[1]), kind="gateway")]
        return [self.target_for_uri(uri, kind="gateway")]

    def targets_for_user(self, user: str) -> list[Target] | None:
        """Bindings of a local user as targets; [] when registered nowhere; None when not a local user."""
        aor = f"sip:{user}@{self.domain}"
        bindings = self.location.lookup(aor)
        if not bindings and self.credentials.lookup(user) is None:
            return None
        targets = []
        for binding in bindings:
            contact = SipUri.parse(binding.contact)
            hop = hop_for_uri(contact)
            hop = Hop(uri=hop.uri, host=hop.host, port=hop.port, transport=binding.transport, binding=binding)
            targets.append(Target(hops=(hop,), q=binding.q, kind="user"))
        return targets

    def target_for_uri(self, uri: SipUri, q: float = 1.0, kind: str = "user") -> Target:
        """A target for a URI: a registered contact when it is one (NAT rules), else the URI's host."""
        if self.is_our_domain(uri) and uri.user is not None and kind == "redirect":
            targets = self.targets_for_user(uri.decoded_user)
            if targets:
                hops = tuple(h for t in targets for h in t.hops)
                return Target(hops=hops, q=q, kind=kind)
        binding = self.location.find_contact(str(uri))
        hop = hop_for_uri(uri)
        if binding is not None:
            hop = Hop(uri=hop.uri, host=hop.host, port=hop.port, transport=binding.transport, binding=binding)
        return Target(hops=(hop,), q=q, kind=kind)

    def destinations(self, hop: Hop) -> defer.Deferred:
        if hop.binding is not None:
            return defer.succeed([hop.binding.destination(hop.host, hop.port, self.nat_mode)])
        return self.resolver.resolve(hop.host, hop.port, hop.transport)

    def _start(self, tx, request: Request, targets: list[Target], record_route: bool | None = None,
               plan: Plan | None = None) -> ProxyCall:
        if record_route is None:
            record_route = self.settings.record_route and request.method in DIALOG_CREATING
        log.info("Routing {method} {uri} (Call-ID {call_id}) to {targets}", method=request.method,
                 uri=for_log(request.uri_text), call_id=for_log(request.call_id),
                 targets=", ".join(for_log(h.uri) for t in targets for h in t.hops[:1]) or "its forwarding plan")
        call = ProxyCall(self, tx, request, targets, record_route=record_route,
                         sequential=self.settings.forking == "sequential", redirects_left=self.settings.max_redirects)
        self.calls[id(tx)] = call
        call.start(plan)
        return call

    def forward_request(self, request: Request, hop: Hop, destination: Destination, branch: str, *,
                        record_route: bool) -> Request:
        """16.6: the copy that goes to one branch."""
        headers = request.headers
        max_forwards = request.max_forwards
        headers = headers.set("Max-Forwards", str(69 if max_forwards is None else max_forwards - 1))
        credentials = headers.get_lines("proxy-authorization")
        if credentials:
            # 22.3: our realm's credentials are consumed here; others go on.
            kept = [v for v in credentials if (parse_digest(v) or {}).get("realm") != self.authenticator.realm]
            headers = headers.remove("proxy-authorization")
            for value in kept:
                headers = headers.append("Proxy-Authorization", value)
        if record_route:
            headers = headers.prepend("Record-Route", self.record_route_value(destination.transport, request.call_id))
        headers = headers.prepend("Via", self.via_value(destination.transport, branch))
        return Request(request.method, hop.uri, headers, request.body)

    # -- events for plugins and counters ------------------------------------------

    def call_answered(self, call: ProxyCall, branch, response: Response) -> None:
        if call.request.method == "INVITE":
            self.stats["calls_answered"] += 1
            log.info("Call {call_id} answered ({kind})", call_id=for_log(call.call_id), kind=branch.target.kind)
        self._emit("answered", call=call, response=response)

    def call_finished(self, call: ProxyCall) -> None:
        self.calls.pop(id(call.tx), None)
        if call.request.method == "INVITE" and not call.answered:
            self.stats["calls_failed"] += 1
        self._emit("finished", call=call)

    def _emit(self, event: str, **fields) -> None:
        for observer in self.observers:
            try:
                observer(event, **fields)
            except Exception:
                log.failure("Router observer failed on {event}", event=event)

    # -- CANCEL, ACK, stray responses -------------------------------------------

    def cancel(self, invite_tx: ServerTransaction, request: Request) -> None:
        call = self.calls.get(id(invite_tx))
        if call is None:
            if invite_tx.state == "Proceeding":
                self.server.respond(invite_tx, 487, "Request Terminated")
            return
        call.cancel()

    def ack(self, request: Request, source: Source) -> None:
        """ACK for a 2xx: end to end, forwarded statelessly along the route set we signed."""
        try:
            if request.max_forwards == 0 or self._is_loop(request):
                return
            request, consumed = self._preprocess_routes(request)
            if not self.trust.may_forward_ack(source, self.trust.signed(request.call_id, consumed)):
                self.server.dropped["unsigned_ack"] += 1
                return
            top = request.headers.first_value("route")
            if top is not None:
                hop_uri = NameAddr.parse(top, "Route").uri
                if not isinstance(hop_uri, SipUri):
                    return
                hop = hop_for_uri(hop_uri, request_uri=request.uri_text)
            else:
                uri = request.uri
                if not isinstance(uri, SipUri) or self.is_our_domain(uri):
                    # An ACK for a 2xx carries the callee's Contact; one for our own domain
                    # acknowledges nothing we forwarded (a late ACK for a final we sent).
                    self.server.dropped["stray_ack"] += 1
                    return
                hop = self.target_for_uri(uri, kind="dialog").hops[0]
        except (SipError, SipParseError):
            return
        incoming = request.top_via.branch or ""
        prefix = hashlib.blake2s(f"ack:{incoming}:{request.call_id}".encode("utf-8", "surrogateescape"),
                                 digest_size=8).hexdigest()
        branch = self._signed_branch(prefix, request)

        def send(destinations):
            if not destinations:
                return
            destination = destinations[0]
            forwarded = self.forward_request(request, hop, destination, branch, record_route=False)
            self.stats["stateless_forwarded"] += 1
            self.server.transports.send(forwarded.serialize(), destination)

        self.destinations(hop).addCallback(send).addErrback(lambda f: log.failure("ACK forwarding failed", f))

    def stray_response(self, response: Response, source: Source) -> None:
        """A response for no transaction (16.7, as RFC 6026 narrows it).

        Only a 2xx to an INVITE whose top Via is ours, with a branch we signed
        for its Call-ID, goes on to the next Via (a late 2xx retransmission
        after Timer M). Anything else is dropped: a forged response must not
        make us send datagrams to whatever its second Via names.
        """
        via = response.top_via
        if (via.host != self.advertise_host or (via.port or 5060) not in self.advertise_ports.values()
                or not (200 <= response.status < 300 and response.cseq.method == "INVITE")
                or not self.trust.signer.verify_branch(via.branch or "", response.call_id)):
            self.server.dropped["stray_response"] += 1
            return
        headers = response.headers.remove_first_value("via")
        upstream = response.with_headers(headers)
        try:
            next_via = upstream.top_via
        except SipParseError:
            self.server.dropped["stray_response"] += 1
            return
        host = next_via.received or next_via.host
        rport = next_via.rport or ""
        port = int(rport) if rport.isascii() and rport.isdigit() else (next_via.port or 5060)
        if not is_ip_address(host) or not 0 < port < 65536:
            self.server.dropped["stray_response"] += 1
            return
        self.stats["stateless_forwarded"] += 1
        self.server.transports.send(upstream.serialize(), Destination(next_via.transport, host, port))


def _remove_last_route(headers):
    values = headers.values("route")
    rest = values[:-1]
    headers = headers.remove("route")
    for value in rest:
        headers = headers.append("Route", value)
    return headers


def _to_strict_router(request: Request) -> Request:
    """16.6 step 6: the next hop is a strict router: its URI becomes the Request-URI, ours goes last in Route."""
    routes = request.headers.values("route")
    first = NameAddr.parse(routes[0], "Route").uri_text
    headers = request.headers.remove("route")
    for value in routes[1:] + [f"<{request.uri_text}>"]:
        headers = headers.append("Route", value)
    return Request(request.method, first, headers, request.body)
