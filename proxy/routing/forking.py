"""The response context of a proxied request (RFC 3261 section 16.7): branches, forking, best response.

A `ProxyCall` owns one server transaction and its branches. Each `Branch`
is one target with its hops (gateways, SRV targets) in failover order: a
408, a 503 or no answer moves it to the next hop. Responses:

- 100 is absorbed; other provisionals are relayed and restart Timer C;
- every 2xx is relayed at once, and the other INVITE branches are CANCELled;
- a 6xx CANCELs the other branches and is the answer;
- a 3xx is recursed on (its Contacts become new branches, bounded) when
  configured, else kept like a 4xx;
- when every branch has ended without a 2xx, the best stored response goes
  upstream: a 6xx if any, else the lowest class, preferring anything over a
  408; 401/407 challenges of all branches are combined (16.7 step 7); a 503
  becomes 500 (16.7 step 6); no response at all is a 408.

Sequential forking (by q) starts the next q group only when the current one
has ended without a 2xx or 6xx.
"""

import os

from typing import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from proxy.config import ProxySettings
from proxy.errors import SipParseError
from proxy.replies import Replies
from proxy.routing.routes import Hop, hop_for_uri
from proxy.sip.message import Request, Response, make_cancel, make_response
from proxy.sip.uri import NameAddr, SipUri
from proxy.transaction import ClientTransaction, ServerTransaction
from proxy.transport import Destination

log = Logger()


@attrs.frozen
class Target:
    """One destination of a fork: its hops in failover order, and its q."""

    hops: tuple[Hop, ...]
    q: float = 1.0
    kind: str = "user"  # user, gateway, emergency, dialog, redirect
    failover_after: float | None = None  # a gateway route's own (RouteConfig); None: [proxy] failover_after


@attrs.frozen
class CallInfo:
    """A call as plugins see it (events call_answered / call_ended): values, never the live response context."""

    key: str  # unique per response context
    call_id: str
    method: str
    caller: str  # the From URI
    callee: str  # the Request-URI as received
    started_at: float
    at: float  # when the event happened
    answered: bool
    status: int | None = None  # the final status, when known


@attrs.frozen
class CallContext:
    """What a response context needs from the proxy core: given once, typed, and nothing more.

    The router builds one; the response context never sees the router.
    """

    clock: IReactorTime
    replies: Replies  # respond / send_response on the server transaction
    settings: ProxySettings  # timer_c, recurse_3xx
    resolve: Callable[[Hop], Deferred]  # a hop's destinations in failover order (NAT rule, RFC 3263)
    forward: Callable[..., Request]  # (request, hop, destination, branch, *, record_route): the copy (16.6)
    branch_id: Callable[[ServerTransaction, Request, int, int], str]
    is_own_destination: Callable[[Destination], bool]
    plan_targets: Callable[[object], list["Target"]]  # one step of a forwarding plan -> targets
    redirect_target: Callable[[SipUri, float], "Target"]  # a 3xx Contact -> a target
    on_answered: Callable[["ProxyCall", "Branch", Response], None]
    on_finished: Callable[["ProxyCall"], None]
    gateway_answered: Callable[[Hop], None] = lambda hop: None  # gateway health (routing/gateways.py)
    gateway_failed: Callable[[Hop], None] = lambda hop: None


class Branch:
    def __init__(self, call: "ProxyCall", target: Target, index: int):
        self.call = call
        self.target = target
        self.index = index
        self.hop_index = 0
        self.destinations: list[Destination] = []
        self.tx: ClientTransaction | None = None
        self.request: Request | None = None
        self.provisional = False
        self.done = False
        self.cancel_pending = False
        self.cancelling = False  # CANCELled: it may only end now, never fail over to another hop
        self.timer_c: IDelayedCall | None = None
        self.failover_timer: IDelayedCall | None = None
        self.attempt = 0

    @property
    def hop(self) -> Hop:
        return self.target.hops[self.hop_index]

    def start(self) -> None:
        d = self.call.context.resolve(self.hop).addCallbacks(self._resolved, self._resolve_failed)
        d.addErrback(self._broken)

    def _broken(self, failure) -> None:
        """A bug while starting the branch: log it, and end the branch so the caller gets an answer."""
        log.failure("Branch {index} of Call-ID {call_id} failed", failure, index=self.index, call_id=self.call.call_id)
        self._finish(None)

    def _resolve_failed(self, failure) -> None:
        log.failure("Resolving {host} failed", failure, host=self.hop.host)
        self._resolved([])

    def _resolved(self, destinations: list[Destination]) -> None:
        if self.done:
            return
        if self.call.cancelled:
            self._finish(None)
            return
        self.destinations = [d for d in destinations if not self.call.context.is_own_destination(d)]
        if not self.destinations:
            if destinations:
                # A hop that is this proxy itself (a route whose gateway is us): the request
                # would come back as a stranger's, so the loop ends here (RFC 3261 16.3 step 4).
                log.info("{host} is this proxy: loop", host=self.hop.host)
                looped = self.call.context.forward(self.call.request, self.hop, destinations[0],
                                                   self.call.branch_id(self), record_route=False)
                self._next_hop_or_finish(make_response(looped, 482, "Loop Detected", to_tag=os.urandom(6).hex()))
                return
            log.info("No address for {host}", host=self.hop.host)
            self._next_hop_or_finish(None)
            return
        self._send(self.destinations.pop(0))

    def _send(self, destination: Destination) -> None:
        call = self.call
        self.attempt += 1
        self.provisional = False
        self.request = call.context.forward(call.request, self.hop, destination, call.branch_id(self),
                                            record_route=call.record_route)
        # Client transactions live in the layer of the server transaction they serve.
        self.tx = call.tx.layer.start_client(self.request, destination, self._on_response, self._on_timeout)
        if call.method == "INVITE":
            self._restart_timer_c()
            self._start_failover_timer()

    def _start_failover_timer(self) -> None:
        """A gateway that says nothing at all (not even 100) within failover_after is left for the next one.

        Timer B would make the caller wait 32 s, by which time a person has hung up; Kamailio's sample config
        moves on after 4 s the same way (fr_timer).
        """
        after = self._failover_after()
        if after > 0 and self.target.kind == "gateway" and self._has_another_hop():
            self.failover_timer = self.call.clock.callLater(after, self._failover)

    def _failover_after(self) -> float:
        own = self.target.failover_after
        return self.call.context.settings.failover_after if own is None else own

    def _stop_failover_timer(self) -> None:
        if self.failover_timer is not None and self.failover_timer.active():
            self.failover_timer.cancel()
        self.failover_timer = None

    def _has_another_hop(self) -> bool:
        return bool(self.destinations) or self.hop_index + 1 < len(self.target.hops)

    def _failover(self) -> None:
        self.failover_timer = None
        if self.done or self.cancelling or self.call.cancelled:
            return
        log.info("No response from {host} within {seconds:g} s; trying the next hop", host=self.hop.host,
                 seconds=self._failover_after())
        self._stop_timer_c()
        self.tx.abandon()
        self.call.context.gateway_failed(self.hop)
        self._next_destination_or_hop()

    def _restart_timer_c(self) -> None:
        self._stop_timer_c()
        self.timer_c = self.call.clock.callLater(self.call.context.settings.timer_c, self._timer_c_fired)

    def _stop_timer_c(self) -> None:
        if self.timer_c is not None and self.timer_c.active():
            self.timer_c.cancel()
        self.timer_c = None

    def _timer_c_fired(self) -> None:
        self.timer_c = None
        if self.done:
            return
        log.info("Timer C fired for branch {index} of Call-ID {call_id}", index=self.index,
                 call_id=self.call.call_id)
        if self.provisional:
            self.cancel()
        else:
            self._on_timeout()

    def _on_response(self, response: Response) -> None:
        self._stop_failover_timer()
        if self.done and not (200 <= response.status < 300):
            return
        status = response.status
        if self.target.kind == "gateway" and not self.provisional and status != 100:
            # Once per attempt: the first response other than 100 tells whether the gateway works.
            (self.call.context.gateway_failed if status == 503 else self.call.context.gateway_answered)(self.hop)
        if status < 200:
            if status == 100:
                return
            self.provisional = True
            if self.call.method == "INVITE":
                self._restart_timer_c()
            if self.cancel_pending:
                self._send_cancel()
                return
            self.call.relay(response)
            return
        self._stop_timer_c()
        if status < 300:
            first = not self.done
            self.done = True
            self.call.answered_by(self, response, first)
            return
        if status in (408, 503) and not self.cancelling and not self.call.cancelled and self._next_destination_or_hop():
            log.info("{status} from {host}; trying the next hop", status=status, host=self.hop.host)
            return
        self._finish(response)

    def _on_timeout(self) -> None:
        if self.done:
            return
        if self.target.kind == "gateway" and not self.provisional:
            self.call.context.gateway_failed(self.hop)
        self._stop_timer_c()
        if not self.cancelling and not self.call.cancelled and self._next_destination_or_hop():
            log.info("No answer from {host}; trying the next hop", host=self.hop.host)
            return
        self._finish(None)

    def _next_destination_or_hop(self) -> bool:
        """Fail over: the next address of this hop, else the next hop. False when none is left."""
        if self.destinations:
            self._send(self.destinations.pop(0))
            return True
        if self.hop_index + 1 < len(self.target.hops):
            self.hop_index += 1
            self.start()
            return True
        return False

    def _next_hop_or_finish(self, response: Response | None) -> None:
        if self.hop_index + 1 < len(self.target.hops):
            self.hop_index += 1
            self.start()
        else:
            self._finish(response)

    def _finish(self, response: Response | None) -> None:
        if self.done:
            return
        self.done = True
        self._stop_timer_c()
        self._stop_failover_timer()
        self.call.branch_ended(self, response)

    def cancel(self) -> None:
        """CANCEL this branch (section 9.1): now if it has had a provisional, else when it gets one."""
        if self.done:
            return
        self.cancelling = True
        if self.tx is None:
            self._finish(None)
            return
        if self.provisional:
            self._send_cancel()
        else:
            self.cancel_pending = True
            self.tx.cancel_retransmissions()

    def _send_cancel(self) -> None:
        self.cancel_pending = False
        if self.tx is None or self.request is None:
            return
        cancel = make_cancel(self.request)
        self.call.tx.layer.start_client(cancel, self.tx.destination, lambda r: None, lambda: None)


def _response_class(status: int) -> int:
    return status // 100


class ProxyCall:
    """The response context for one server transaction."""

    def __init__(self, context: "CallContext", tx: ServerTransaction, request: Request, targets: list[Target], *,
                 record_route: bool, sequential: bool, redirects_left: int):
        self.context = context
        self.clock = context.clock
        self.created_at = self.clock.seconds()  # for call-setup time (metrics)
        self.tx = tx
        self.request = request
        self.method = request.method
        self.call_id = request.call_id
        self.record_route = record_route
        self.redirects_left = redirects_left
        self.branches: list[Branch] = []
        self.finals: list[Response] = []
        self.answered = False
        self.cancelled = False
        self.finished = False
        self.tried_uris: set[str] = set()
        self.sequential = sequential
        self.base_request = request
        # Forwarding (forwarding.py): where to go on busy / no answer, and the ring timer.
        self.on_busy = None
        self.on_no_answer = None
        self.diverting = None
        self.ring_timer: IDelayedCall | None = None
        self.forced_final: tuple[int, str] | None = None
        self._set_targets(targets)

    def _set_targets(self, targets: list[Target]) -> None:
        if self.sequential:
            groups: dict[float, list[Target]] = {}
            for t in targets:
                groups.setdefault(t.q, []).append(t)
            self.pending_groups = [groups[q] for q in sorted(groups, reverse=True)]
        else:
            self.pending_groups = [targets] if targets else []

    def info(self, status: int | None = None) -> CallInfo:
        try:
            caller = str(self.request.from_.uri)
        except SipParseError:
            caller = ""
        return CallInfo(key=f"{id(self):x}", call_id=self.call_id, method=self.request.method, caller=caller,
                        callee=self.base_request.uri_text, started_at=self.created_at, at=self.clock.seconds(),
                        answered=self.answered, status=status)

    def branch_id(self, branch: Branch) -> str:
        return self.context.branch_id(self.tx, self.base_request, branch.index, branch.attempt)

    def start(self, plan=None) -> None:
        if plan is not None and not self._begin_plan(plan):
            self._maybe_done()
            return
        self._start_next_group()

    def _begin_plan(self, plan) -> bool:
        """Follow one step of a forwarding plan: its targets, Diversion, and what comes next. False: nothing to try."""
        if plan.loop:
            self.forced_final = (482, "Forwarding loop")
            return False
        self.request = self.base_request
        if plan.diversions:
            from proxy.routing.forwarding import diversion_header

            value = diversion_header(plan.diversions)
            existing = self.base_request.headers.get("diversion")
            headers = self.base_request.headers.set("Diversion", f"{value}, {existing}" if existing else value)
            self.request = self.base_request.with_headers(headers)
        self.on_busy = plan.on_busy
        self.on_no_answer = plan.on_no_answer
        self._stop_ring_timer()
        targets = self.context.plan_targets(plan)
        if not targets:
            if plan.on_no_answer is not None:
                # Registered nowhere: as good as not answering.
                return self._begin_plan(plan.on_no_answer)
            self.forced_final = (480, "Temporarily Unavailable") if plan.user else (404, "Not Found")
            return False
        self.forced_final = None
        self._set_targets(targets)
        if plan.on_no_answer is not None and plan.no_answer_after and self.request.method == "INVITE":
            self.ring_timer = self.clock.callLater(plan.no_answer_after, self._ring_timeout)
        return True

    def _stop_ring_timer(self) -> None:
        if self.ring_timer is not None and self.ring_timer.active():
            self.ring_timer.cancel()
        self.ring_timer = None

    def _ring_timeout(self) -> None:
        """No answer in time (seed 001 line 3660): CANCEL the user's phones; when they are done, call the target."""
        self.ring_timer = None
        if self.answered or self.cancelled or self.finished or self.on_no_answer is None:
            return
        log.info("No answer within the forwarding time for Call-ID {call_id}", call_id=self.call_id)
        self.diverting = self.on_no_answer
        self.pending_groups = []
        for branch in self.branches:
            branch.cancel()
        self._maybe_done()

    def _divert(self, plan) -> bool:
        """Start the next step of the plan once every branch of this one has ended."""
        self.finals = []
        self.diverting = None
        if self._begin_plan(plan):
            return self._start_next_group()
        return False

    def _start_next_group(self) -> bool:
        if not self.pending_groups:
            return False
        group = self.pending_groups.pop(0)
        new = []
        for target in group:
            branch = Branch(self, target, len(self.branches))
            self.branches.append(branch)
            self.tried_uris.update(h.uri for h in target.hops)
            new.append(branch)
        for branch in new:
            branch.start()
        return True

    # -- from the branches ---------------------------------------------------

    def relay(self, response: Response) -> None:
        """Relay a provisional or 2xx upstream (without our Via)."""
        if self.finished and not (200 <= response.status < 300):
            return
        upstream = response.with_headers(response.headers.remove_first_value("via"))
        self.context.replies.send_response(self.tx, upstream)

    def answered_by(self, branch: Branch, response: Response, first: bool) -> None:
        self.relay(response)
        if not self.answered:
            self.answered = True
            self._stop_ring_timer()
            self.context.on_answered(self, branch, response)
            if self.method == "INVITE":
                for other in self.branches:
                    if other is not branch:
                        other.cancel()
                self.pending_groups = []
        self._maybe_done()

    def branch_ended(self, branch: Branch, response: Response | None) -> None:
        if response is not None:
            status = response.status
            if 300 <= status < 400 and self.context.settings.recurse_3xx and self._recurse(response):
                self._maybe_done()
                return
            self.finals.append(response)
            if status >= 600 and not self.answered:
                for other in self.branches:
                    other.cancel()
                self.pending_groups = []
        self._maybe_done()

    def _recurse(self, response: Response) -> bool:
        """Contacts of a 3xx become new branches, best q first, each URI once (16.5 and 16.7 step 4)."""
        if self.redirects_left <= 0 or self.answered or self.cancelled:
            return False
        contacts = []
        for value in response.headers.values("contact"):
            try:
                na = NameAddr.parse(value, "Contact")
                uri = na.uri
                q = float(na.param("q") or 1.0)
            except (SipParseError, ValueError):
                continue
            if isinstance(uri, SipUri) and str(uri) not in self.tried_uris:
                contacts.append((q, uri))
        if not contacts:
            return False
        self.redirects_left -= 1
        contacts.sort(key=lambda c: -c[0])
        targets = [self.context.redirect_target(uri, q) for q, uri in contacts]
        log.info("Recursing on {status} for Call-ID {call_id}: {count} contact(s)", status=response.status,
                 call_id=self.call_id, count=len(targets))
        # Redirect targets are tried one after another, best q first, as the seed's flows show.
        self.pending_groups = [[t] for t in targets] + self.pending_groups
        return True

    def _maybe_done(self) -> None:
        if self.finished:
            return
        if any(not b.done for b in self.branches):
            return
        if not self.answered and self._start_next_group():
            return
        if not self.answered and not self.cancelled:
            if self.diverting is not None and self._divert(self.diverting):
                return
            statuses = {r.status for r in self.finals}
            if self.on_busy is not None and statuses & {486, 600} and self._divert(self.on_busy):
                return
            if (self.on_no_answer is not None and self.finals and statuses <= {408, 480, 487}
                    and self._divert(self.on_no_answer)):
                return
        self.finished = True
        self._stop_ring_timer()
        self.context.on_finished(self)
        self._answer_upstream()
        self._release()

    def _answer_upstream(self) -> None:
        if self.answered:
            return
        if self.cancelled:
            self.context.replies.respond(self.tx, 487, "Request Terminated")
            return
        if self.forced_final is not None and not self.finals:
            self.context.replies.respond(self.tx, *self.forced_final)
            return
        best = self.best_response()
        if best is None:
            self.context.replies.respond(self.tx, 408, "Request Timeout")
            return
        self.context.replies.send_response(self.tx, best)

    def _release(self) -> None:
        """Finished: keep only what relaying a late 2xx from another fork needs (the transactions, the branches).

        A finished call can stay referenced for 64*T1 by its branches' client
        transactions (RFC 6026 Accepted); its messages need not be.
        """
        self.finals = []
        self.tried_uris = set()
        self.pending_groups = []
        self.on_busy = self.on_no_answer = self.diverting = None
        for branch in self.branches:
            branch.request = None
            branch.destinations = []

    def final_status(self) -> int:
        """The status the caller gets (or got): what `_answer_upstream` sends, for call records."""
        if self.answered:
            return 200
        if self.cancelled:
            return 487
        if self.forced_final is not None and not self.finals:
            return self.forced_final[0]
        chosen = self._chosen_final()
        return 408 if chosen is None else chosen.status

    def _chosen_final(self) -> Response | None:
        if not self.finals:
            return None
        six = [r for r in self.finals if r.status >= 600]
        if six:
            return six[0]
        lowest = min(_response_class(r.status) for r in self.finals)
        candidates = [r for r in self.finals if _response_class(r.status) == lowest]
        preferred = [r for r in candidates if r.status != 408] or candidates
        auth = [r for r in preferred if r.status in (401, 407)]
        return auth[0] if auth else preferred[0]

    def best_response(self) -> Response | None:
        chosen = self._chosen_final()
        if chosen is None:
            return None
        headers = chosen.headers.remove_first_value("via")
        if chosen.status in (401, 407):
            # 16.7 step 7: every branch's challenge goes up in the one response.
            for other in self.finals:
                if other is chosen or other.status not in (401, 407):
                    continue
                for name in ("WWW-Authenticate", "Proxy-Authenticate"):
                    for value in other.headers.get_lines(name):
                        headers = headers.append(name, value)
        response = Response(chosen.status, chosen.reason, headers, chosen.body)
        if chosen.status == 503:
            response = Response(500, "Server Internal Error", headers, chosen.body)
        return response

    # -- from upstream -------------------------------------------------------

    def cancel(self) -> None:
        """The caller CANCELled (16.10): cancel every branch; the 487s end the call."""
        if self.answered or self.finished:
            return
        self.cancelled = True
        self.pending_groups = []
        self._stop_ring_timer()
        for branch in self.branches:
            branch.cancel()
        self._maybe_done()


__all__ = ["Branch", "CallContext", "CallInfo", "ProxyCall", "Target", "hop_for_uri"]
