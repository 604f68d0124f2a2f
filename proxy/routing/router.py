"""The stateful proxy core (RFC 3261 section 16): from a validated request to its branches.

`Router.route` is the dispatcher's route for every request not handled
elsewhere. It runs these steps in order, as Kamailio's request_route reads;
each either answers (a SipError) or hands on:

  16.3  Max-Forwards (483; OPTIONS at 0 answered here), Proxy-Require (420), loops (482)
  16.4  our Routes consumed (routing/hops.py); what they carried is kept
  trust proxy/trust.py: trusted network, signed dialog, emergency number, or digest (407)
  100   Trying, only once the request is served (a challenge holds no state)
  16.5  signed dialogs and trusted peers follow the remaining route set; anyone else's
        Route headers are dropped; in-dialog requests go to the peer's Contact;
        initial ones: emergency -> emergency gateways; policy plugins; feature codes;
        local users (their forwarding plan, or the redirect server); numbers -> routes;
        foreign domains -> domain routes, the outbound proxy, or RFC 3263
  16.6  each branch: routing/forking.py with the copy routing/hops.py makes

The response context (routing/forking.py) sees a narrow `CallContext`,
never the router. Events go out as frozen `CallInfo` values.
"""

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.config import ForwardingConfig, ProxySettings
from proxy.dispatch import capabilities
from proxy.errors import SipError
from proxy.routing.forwarding import FeatureCodes, Forwarding, ForwardingError, Plan, apply_feature_code
from proxy.identity import Identity
from proxy.plugin import Forward, PluginHost, Respond
from proxy.replies import Replies
from proxy.routing.forking import CallContext, CallInfo, ProxyCall, Target
from proxy.routing.hops import Hops, to_strict_router
from proxy.routing.redirect import RedirectServer
from proxy.routing.routes import RouteTable, gateway_uri, hop_for_uri
from proxy.routing.targets import Targets
from proxy.sip.grammar import for_log
from proxy.sip.headers import Headers
from proxy.sip.message import Request, Response
from proxy.sip.uri import NameAddr, SipUri
from proxy.transaction import ServerTransaction
from proxy.transport import Source
from proxy.trust import Served, Trust

log = Logger()

DIALOG_CREATING = frozenset({"INVITE", "SUBSCRIBE", "REFER"})


class Router:
    def __init__(self, *, clock: IReactorTime, replies: Replies, identity: Identity, trust: Trust, hops: Hops,
                 targets: Targets, routes: RouteTable, settings: ProxySettings, redirect: RedirectServer,
                 forwarding: Forwarding | None = None, forwarding_config: ForwardingConfig = ForwardingConfig(),
                 plugins: PluginHost | None = None, dialogs=None, transfers=None, debug: bool = False):
        self.clock = clock
        # A line per call only when asked for ([server] debug): formatting and writing it cost
        # an eighth of the CPU of a call (issue 14's profile); counters and `trace` tell the rest.
        self.debug = debug
        self.replies = replies
        self.identity = identity
        self.trust = trust
        self.hops = hops
        self.targets = targets
        self.routes = routes
        self.settings = settings
        self.redirect = redirect
        self.forwarding = forwarding
        self.feature_codes = FeatureCodes.from_config(forwarding_config) if forwarding_config.feature_codes else None
        self.plugins = plugins if plugins is not None else PluginHost()  # request policies, events
        self.dialogs = dialogs  # proxy/dialogs.py: the calls in progress, and their records
        self.transfers = transfers  # proxy/transfer.py: Bye/Also transfers the proxy completes
        self.calls: dict[int, ProxyCall] = {}
        self.stats = {"calls_answered": 0, "calls_failed": 0}
        self.context = CallContext(
            clock=clock, replies=replies, settings=settings, resolve=targets.resolve, forward=hops.forward_request,
            branch_id=hops.branch_for, is_own_destination=identity.is_own_destination, plan_targets=targets.for_plan,
            redirect_target=targets.for_redirect, on_answered=self._answered, on_finished=self._finished,
            gateway_answered=targets.gateways.answered, gateway_failed=targets.gateways.failed,
        )

    # -- the dispatcher's calls ----------------------------------------------------

    def route(self, tx: ServerTransaction, request: Request) -> None:
        try:
            self._route(tx, request)
        except SipError as e:
            if e.status >= 400 and e.status not in (401, 407):
                log.info("{method} {uri} (Call-ID {call_id}) rejected: {status} {reason}", method=request.method,
                         uri=for_log(request.uri_text), call_id=for_log(request.call_id), status=e.status,
                         reason=e.reason)
            if tx.state in ("Trying", "Proceeding"):
                if tx.last_status is None:
                    # Nothing sent yet (no 100): nobody vouched for this request, so hold no state for it.
                    self.replies.respond_statelessly(tx, e.status, e.reason, extra=e.headers)
                else:
                    self.replies.respond(tx, e.status, e.reason, extra=e.headers)

    def cancel(self, invite_tx: ServerTransaction, request: Request) -> None:
        call = self.calls.get(id(invite_tx))
        if call is None:
            if invite_tx.state == "Proceeding":
                self.replies.respond(invite_tx, 487, "Request Terminated")
            return
        call.cancel()

    # -- the steps -------------------------------------------------------------------

    def _route(self, tx: ServerTransaction, request: Request) -> None:
        if self.transfers is not None and self.transfers.by_call_id and request.to.tag is not None:
            owned = self.transfers.owns(request)
            if owned is not None:  # a leg of a transfer we complete: we are that party's peer now
                owned[0].request_received(tx, request, owned[1])
                return
        if self._checks_16_3(tx, request):
            return
        received = request  # what the client signed its digest over
        request, consumed = self.hops.consume_our_routes(request)
        source = tx.source
        in_dialog = request.to.tag is not None
        uri = request.uri
        if not isinstance(uri, SipUri):
            raise SipError(416, "Unsupported URI Scheme")
        ours = self.identity.is_our_domain(uri)
        emergency = ours and not in_dialog and self.routes.is_emergency(uri.decoded_user)
        served = self.trust.decide(received, source, signed=self.trust.signed(request.call_id, consumed),
                                   emergency=emergency, for_our_domain=ours)
        if request.method == "INVITE":
            # Only now: a challenge or refusal before this point is sent statelessly.
            self.replies.respond(tx, 100, "Trying")
        if in_dialog:
            if request.method == "BYE" and self._completes_transfer(tx, request, served):
                return
            self._in_dialog(request)
        if served.basis in ("signed-dialog", "trusted-network") and (
                in_dialog or request.headers.get("route") is not None):
            self._along_route_set(tx, request)
            return
        if request.headers.get("route") is not None:
            # Nobody we trust set this route up: it grants nothing and decides nothing.
            log.info("Dropped a preloaded Route from {host} (Call-ID {call_id})", host=source.host,
                     call_id=for_log(request.call_id))
            request = request.with_headers(request.headers.remove("route"))
        if in_dialog:
            # Authenticated, but not along our Record-Route: straight to the remote target.
            self._start(tx, request, [self.targets.for_dialog(request.uri)], record_route=False)
            return
        self._initial(tx, request, source, served)

    def _completes_transfer(self, tx, request: Request, served: Served) -> bool:
        """A BYE with Also to a party that ignores Also: the proxy carries the transfer out (proxy/transfer.py).

        The call to C is made by the proxy on B's word, so it is held to what B may call: B must be one of our
        users, C is checked by the request policies as if B dialled it (a transfer is no way around dial
        classes), and an emergency number is always allowed. Otherwise the BYE goes on as it came.
        """
        if self.transfers is None or served.basis != "signed-dialog" or request.headers.first_value("also") is None:
            return False
        agent = self.dialogs.agent_of_peer(request.call_id, request.from_.tag) if self.dialogs is not None else ""
        target = self.transfers.should_complete(request, agent)
        if target is None:
            return False
        refused = self._transfer_refused(request, target, tx.source)
        if refused:
            log.warn("Not completing the transfer of Call-ID {call_id} to {target}: {why}; the BYE goes on as it came",
                     call_id=for_log(request.call_id), target=for_log(str(target)), why=refused)
            return False
        dialog = self.dialogs.take_over(request.call_id, str(target)) if self.dialogs is not None else None
        self.transfers.start(tx, request, target, dialog)
        return True

    def _transfer_refused(self, bye: Request, target: SipUri, source: Source) -> str:
        """Why the proxy must not call `target` for the BYE's sender; "" when it may."""
        sender = bye.from_.uri
        user = sender.decoded_user if isinstance(sender, SipUri) and self.identity.is_our_domain(sender) else None
        if not user or self.targets.credentials.lookup(user) is None:
            return "the transferor is not one of our users"
        dialled = target.decoded_user
        if self.identity.is_our_domain(target) and self.routes.is_emergency(dialled):
            return ""
        if not self.plugins.policing:
            return ""
        invite = Request("INVITE", str(target), Headers.of(
            ("Via", bye.headers.first_value("via")), ("From", bye.headers.get("from")), ("To", f"<{target}>"),
            ("Call-ID", bye.call_id), ("CSeq", "1 INVITE")))
        verdict = self.plugins.check_request(invite, source, user)
        return f"{verdict.status} {verdict.reason} for {user}" if isinstance(verdict, Respond) else (
            "a policy would route it elsewhere" if isinstance(verdict, Forward) else "")

    def _in_dialog(self, request: Request) -> None:
        """A served in-dialog request: the dialog table follows it (hold, transfer, BYE)."""
        method = request.method
        if method not in ("BYE", "INVITE", "REFER"):
            return
        if self.dialogs is not None:
            headers = request.headers
            self.dialogs.in_dialog(method, request.call_id, request.from_.tag, request.body,
                                   headers.first_value("also") if method == "BYE" else None,
                                   headers.first_value("refer-to") if method == "REFER" else None)
        if method == "BYE" and self.plugins.listening:
            self.plugins.emit("call_bye", call_id=request.call_id, at=self.clock.seconds())

    def _checks_16_3(self, tx: ServerTransaction, request: Request) -> bool:
        """True when answered here (OPTIONS with Max-Forwards 0)."""
        if request.max_forwards == 0:
            if request.method == "OPTIONS":
                self.replies.respond(tx, 200, "OK", extra=capabilities())
                return True
            raise SipError(483, "Too Many Hops")
        required = request.headers.values("proxy-require")
        if required:
            raise SipError(420, "Bad Extension", (("Unsupported", ", ".join(required)),))
        if self.hops.is_loop(request):
            raise SipError(482, "Loop Detected")
        return False

    def _along_route_set(self, tx, request: Request) -> None:
        """A signed dialog or a trusted peer: follow the Route set, else the Request-URI."""
        top = request.headers.first_value("route")
        if top is not None:
            hop_uri = NameAddr.parse(top, "Route").uri
            if not isinstance(hop_uri, SipUri):
                raise SipError(416, "Unsupported URI Scheme in Route")
            if hop_uri.param("lr") is None:
                request = to_strict_router(request)
            target = Target(hops=(hop_for_uri(hop_uri, request_uri=request.uri_text),), kind="dialog")
        elif self.identity.is_our_domain(request.uri) and request.to.tag is None:
            self._initial(tx, request, tx.source, Served("trusted-network"))
            return
        else:
            target = self.targets.for_dialog(request.uri)
        self._start(tx, request, [target], record_route=False)

    def _initial(self, tx, request: Request, source: Source, served: Served) -> None:
        uri = request.uri
        dialled = uri.decoded_user
        ours = self.identity.is_our_domain(uri)
        if served.basis == "emergency" or (ours and self.routes.is_emergency(dialled)):
            self._emergency(tx, request, source, dialled)
            return
        verdict = self.plugins.check_request(request, source, served.user) if self.plugins.policing else None
        if isinstance(verdict, Respond):
            log.info("{method} {uri} rejected by policy: {status} {reason}", method=request.method,
                     uri=for_log(request.uri_text), status=verdict.status, reason=verdict.reason)
            raise SipError(verdict.status, verdict.reason)
        if isinstance(verdict, Forward):
            self._start(tx, request, [self.targets.for_uri(SipUri.parse(verdict.uri), kind="gateway")])
            return
        if ours:
            self._for_our_domain(tx, request, served.user, dialled)
        else:
            self._start(tx, request, self._foreign_targets(request))

    def _emergency(self, tx, request: Request, source: Source, dialled: str) -> None:
        hops = self.routes.emergency_hops(dialled)
        if not hops:
            log.error("Emergency call to {number} from {host} but no emergency gateway is configured",
                      number=dialled, host=source.host)
            raise SipError(503, "No emergency route configured")
        log.warn("Emergency call to {number} from {host} (Call-ID {call_id})", number=dialled, host=source.host,
                 call_id=for_log(request.call_id))
        self._start(tx, request, [Target(hops=tuple(hops), kind="emergency")])

    def _for_our_domain(self, tx, request: Request, user: str | None, dialled: str | None) -> None:
        if dialled is None:
            raise SipError(404, "Not Found")
        if request.method == "INVITE" and self.feature_codes is not None:
            code = self.feature_codes.parse(dialled)
            if code is not None:
                self._feature_code(tx, request, user, code)
                return
        if self.forwarding is not None and self.targets.is_local_user(dialled):
            self._local_user(tx, request, dialled)
            return
        targets = self.targets.for_user(dialled)
        if targets is None:
            targets = self.targets.for_number(dialled)
            if targets is None:
                raise SipError(404, "Not Found")
            log.info("Routing {number} by a dial-pattern route", number=dialled)
        elif not targets:
            raise SipError(480, "Temporarily Unavailable")
        self._start(tx, request, targets)

    def _foreign_targets(self, request: Request) -> list[Target]:
        uri = request.uri
        found = self.routes.by_domain(uri.host, uri)
        if found is not None:
            return [self.targets.gateway_target(*found)]
        if self.settings.outbound_proxy:
            hop = hop_for_uri(gateway_uri(self.settings.outbound_proxy), request_uri=request.uri_text)
            return [Target(hops=(hop,), kind="gateway")]
        return [self.targets.for_uri(uri, kind="gateway")]

    def _feature_code(self, tx, request: Request, authenticated: str | None, code) -> None:
        """*72<number> and friends: change the caller's own forwarding, answer with what was done."""
        if authenticated is None or self.forwarding is None:
            raise SipError(403, "Feature codes need a registered phone")
        from_uri = request.from_.uri
        user = from_uri.decoded_user if isinstance(from_uri, SipUri) and from_uri.decoded_user else authenticated
        try:
            reason = apply_feature_code(self.forwarding.store, user, code)
        except ForwardingError as e:
            raise SipError(484, "Address Incomplete") from e
        log.info("{user} by feature code: {reason}", user=user, reason=reason)
        # A final non-2xx: no call is set up; the reason phrase says what was done.
        self.replies.respond(tx, 480, reason)

    def _local_user(self, tx, request: Request, user: str) -> None:
        plan = self.forwarding.plan(user, is_local_user=self.targets.is_local_user)
        if plan.loop:
            raise SipError(482, "Forwarding loop")
        if request.method == "INVITE" and self.redirect.applies_to(request.uri):
            self.redirect.answer_plan(tx, plan)
            return
        if request.method == "INVITE" and self.redirect.redirects_unconditional(plan):
            for step in plan.diversions:
                self.targets.forwards[step.reason] = self.targets.forwards.get(step.reason, 0) + 1
            self.redirect.answer_unconditional(tx, plan)
            return
        self._start(tx, request, [], plan=plan)

    def _start(self, tx, request: Request, targets: list[Target], record_route: bool | None = None,
               plan: Plan | None = None) -> ProxyCall:
        if record_route is None:
            record_route = self.settings.record_route and request.method in DIALOG_CREATING
        if self.debug:
            log.debug("Routing {method} {uri} (Call-ID {call_id}) to {targets}", method=request.method,
                      uri=for_log(request.uri_text), call_id=for_log(request.call_id),
                      targets=", ".join(for_log(h.uri) for t in targets for h in t.hops[:1]) or "its forwarding plan")
        call = ProxyCall(self.context, tx, request, targets, record_route=record_route,
                         sequential=self.settings.forking == "sequential", redirects_left=self.settings.max_redirects)
        self.calls[id(tx)] = call
        if call.method == "INVITE" and request.to.tag is None:
            if self.dialogs is not None:
                caller = request.from_  # its URI as written: parsing it for the call list would cost every call
                self.dialogs.invite_routed(request.call_id, caller.uri_text, request.uri_text, caller.tag or "",
                                           request.headers.get("user-agent") or "")
            if self.plugins.listening:
                self.plugins.emit("call_started", call=call.info())
        call.start(plan)
        return call

    # -- from the response contexts ----------------------------------------------------

    def _answered(self, call: ProxyCall, branch, response: Response) -> None:
        if call.method == "INVITE":
            self.stats["calls_answered"] += 1
            if self.dialogs is not None:
                headers = response.headers
                self.dialogs.answered(call.call_id, response.to.tag,
                                      headers.get("user-agent") or headers.get("server") or "")
            if self.debug:
                log.debug("Call {call_id} answered ({kind})", call_id=for_log(call.call_id), kind=branch.target.kind)
        if self.plugins.listening:
            self.plugins.emit("call_answered", call=call.info(status=response.status))

    def _finished(self, call: ProxyCall) -> None:
        self.calls.pop(id(call.tx), None)
        if call.method == "INVITE" and not call.answered:
            self.stats["calls_failed"] += 1
            if self.dialogs is not None:
                self.dialogs.failed(call.call_id, call.final_status())
        if self.plugins.listening:
            self.plugins.emit("call_ended", call=call.info())

    def counters(self) -> dict:
        """What the metrics read: calls in progress and their outcomes, forwarding and redirects."""
        return {"calls_in_setup": len(self.calls), **self.stats, "forwards": dict(self.targets.forwards),
                "redirects": dict(self.redirect.redirects),
                **(self.dialogs.counters() if self.dialogs is not None else {})}


__all__ = ["Router", "CallInfo", "DIALOG_CREATING"]
