"""The transaction user: what the core does with each new request, as one visible table fixed at construction.

    REGISTER                        -> the registrar
    other methods in `methods`      -> their handler
    a Request-URI naming us (no ;lr) -> answered here: OPTIONS 200, BYE 481, 405/501
    anything else                   -> `route` (the proxy core), also our own
                                       Record-Route URI sent by a strict router
    CANCEL                          -> 200, then `on_cancel` for the INVITE (or 487 here)
    ACK matching no transaction     -> absorbed when it acknowledges a stateless answer,
                                       else `on_ack` (ACK for a 2xx, end to end)
    a response for no transaction   -> `on_stray_response`
    a full transaction table        -> 503 with Retry-After, statelessly

The transaction layer calls these methods; `SipServer` only parses and
hands over. Nothing here is set from outside after construction.
"""

import os
from typing import Callable, Mapping

from twisted.logger import Logger

from proxy.errors import SipError
from proxy.identity import Identity
from proxy.plugin import SIP_METHODS
from proxy.replies import Replies
from proxy.sip.grammar import for_log
from proxy.sip.message import Request, Response
from proxy.sip.uri import SipUri
from proxy.transaction import ServerTransaction
from proxy.transport import Source

log = Logger()

ALLOWED_METHODS = SIP_METHODS
SUPPORTED_EXTENSIONS = ("path",)

Handler = Callable[[ServerTransaction, Request], None]


def capabilities() -> tuple[tuple[str, str], ...]:
    """What OPTIONS answers (and a Max-Forwards: 0 OPTIONS through the proxy)."""
    return (
        ("Allow", ", ".join(ALLOWED_METHODS)),
        ("Accept", "application/sdp"),
        ("Supported", ", ".join(SUPPORTED_EXTENSIONS)),
    )


def unsupported_extensions(request: Request) -> list[str]:
    return [ext for ext in request.headers.values("require") if ext.lower() not in SUPPORTED_EXTENSIONS]


class Dispatcher:
    def __init__(self, replies: Replies, identity: Identity, *, methods: Mapping[str, Handler] = {},
                 route: Handler | None = None,
                 on_cancel: Callable[[ServerTransaction, Request], None] | None = None,
                 on_ack: Callable[[Request, Source], None] | None = None,
                 on_stray_response: Callable[[Response, Source], None] | None = None,
                 retry_after: Callable[[], str] | None = None):
        self.replies = replies
        self.retry_after = retry_after or spread_retry_after  # a shed request's Retry-After
        self.identity = identity
        self.methods = dict(methods)
        self.route = route or self._no_route
        self.on_cancel = on_cancel
        self.on_ack = on_ack
        self.on_stray_response = on_stray_response

    # -- the transaction layer's calls ---------------------------------------------

    def request_received(self, tx: ServerTransaction, request: Request) -> None:
        try:
            self._dispatch(tx, request)
        except SipError as e:
            self.replies.respond(tx, e.status, e.reason, extra=e.headers)
        except Exception:
            log.failure("Error handling {method} (Call-ID {call_id})", method=request.method,
                        call_id=for_log(request.call_id))
            if tx.state in ("Trying", "Proceeding"):
                self.replies.respond(tx, 500, "Server Internal Error")

    def cancel_received(self, tx: ServerTransaction, request: Request, invite_tx: ServerTransaction | None) -> None:
        """CANCEL (section 9.2): 200 when it matches a pending INVITE, which then gets 487."""
        if invite_tx is None:
            self.replies.respond(tx, 481, "Call/Transaction Does Not Exist")
            return
        self.replies.respond(tx, 200, "OK")
        invite_tx.cancelled = True
        if self.on_cancel is not None:
            self.on_cancel(invite_tx, request)
        elif invite_tx.state == "Proceeding":
            self.replies.respond(invite_tx, 487, "Request Terminated")

    def ack_received(self, request: Request, source: Source) -> None:
        if request.to.tag is not None and request.to.tag == self.replies.stateless_tag(request):
            self.replies.dropped["ack_for_stateless_answer"] += 1  # hop by hop: it ends here
            return
        if self.on_ack is not None:
            self.on_ack(request, source)

    def stray_response(self, response: Response, source: Source) -> None:
        if self.on_stray_response is not None:
            self.on_stray_response(response, source)
        else:
            self.replies.dropped["stray_response"] += 1

    def overloaded(self, request: Request, source: Source, reason: str = "transaction_table_full") -> None:
        """The transaction table is full, or the load shedder refuses: 503 with a spread Retry-After (21.5.4)."""
        if reason == "transaction_table_full":
            self.replies.dropped[reason] += 1
            if self.replies.log_limit.should_log("overload"):
                log.warn("Transaction table full: answering new requests with 503")
            retry = spread_retry_after()
        else:
            retry = self.retry_after()
        self.replies.answer(request, source, 503, "Service Unavailable", extra=(("Retry-After", retry),))

    # -- the table ----------------------------------------------------------------

    def _dispatch(self, tx: ServerTransaction, request: Request) -> None:
        uri = request.uri  # raises SipParseError for a malformed Request-URI
        if not isinstance(uri, SipUri):
            raise SipError(416, "Unsupported URI Scheme")
        handler = self.methods.get(request.method)
        if handler is not None:
            handler(tx, request)
            return
        if self.identity.is_me(uri) and uri.param("lr") is None:
            self._handle_local(tx, request)
            return
        self.route(tx, request)

    def _handle_local(self, tx: ServerTransaction, request: Request) -> None:
        """Requests addressed to this server itself (Request-URI without a user)."""
        unsupported = unsupported_extensions(request)
        if unsupported:
            self.replies.respond(tx, 420, "Bad Extension", extra=(("Unsupported", ", ".join(unsupported)),))
            return
        if request.method == "OPTIONS":
            self.replies.respond(tx, 200, "OK", extra=capabilities())
        elif request.method not in ALLOWED_METHODS:
            self.replies.respond(tx, 501, "Not Implemented", extra=(("Allow", ", ".join(ALLOWED_METHODS)),))
        elif request.method == "BYE":
            self.replies.respond(tx, 481, "Call/Transaction Does Not Exist")
        else:
            self.replies.respond(tx, 405, "Method Not Allowed", extra=(("Allow", "OPTIONS, REGISTER"),))

    def _no_route(self, tx: ServerTransaction, request: Request) -> None:
        """A server without a proxy core: a clear final answer, never silence."""
        uri = request.uri
        if request.method not in ALLOWED_METHODS:
            self.replies.respond(tx, 501, "Not Implemented")
        elif self.identity.is_local_host(uri.host, uri.port):
            self.replies.respond(tx, 404, "Not Found")
        else:
            self.replies.respond(tx, 403, "Relaying Not Allowed")


def spread_retry_after() -> str:
    """5-14 s: the phones refused together do not come back together (RFC 3261 21.5.4)."""
    return str(5 + os.urandom(1)[0] % 10)
