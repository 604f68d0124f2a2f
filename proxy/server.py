"""The controller between transports and the transaction user.

`SipServer.data_received` is where every message enters: it parses, checks
what must be checked before anything else (size, version, the mandatory
fields), stamps `received`/`rport` on the top Via (RFC 3261 18.2.1, RFC 3581),
and hands the message to the transaction layer. As the transaction user it
then dispatches new requests: to the handler registered for the method
(the registrar for REGISTER, later issues add more), else to the local
handling of requests addressed to this server, else to `route`.

Nothing a peer sends may raise out of here: a bad request gets a 4xx/5xx
whose reason phrase names the defect, and what cannot be answered is
dropped, counted, and logged at most once per source per minute.
"""

import hashlib
import os
from collections import Counter

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.bounded import BoundedDict
from proxy.errors import SipError, SipParseError
from proxy.sip.grammar import for_log
from proxy.sip.message import Request, Response, make_response
from proxy.sip.uri import SipUri
from proxy.sip.wire import MAX_DATAGRAM, ResponseParseError, parse_message
from proxy.transaction import ServerTransaction, TransactionLayer, response_destination
from proxy.transport import Destination, Source

log = Logger()

ALLOWED_METHODS = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "REFER", "NOTIFY", "INFO", "SUBSCRIBE", "UPDATE", "PRACK", "MESSAGE")
SUPPORTED_EXTENSIONS = ("path",)
GARBAGE_LOG_INTERVAL = 60.0


def new_tag() -> str:
    return os.urandom(6).hex()


@attrs.define
class LocalIdentity:
    """What names this server: its domains, and the addresses and ports it listens on."""

    domains: frozenset[str]
    addresses: frozenset[str]
    ports: frozenset[int]

    def is_local_host(self, host: str, port: int | None) -> bool:
        if host in self.domains:
            return port is None or port in self.ports
        if host in self.addresses:
            return (port or 5060) in self.ports
        return False

    def is_our_domain(self, uri: SipUri, advertise_host: str) -> bool:
        """Our domain, or one of our addresses on one of our ports (another port there is someone else)."""
        if self.is_local_host(uri.host, uri.port):
            return True
        return uri.host == advertise_host and (uri.port or 5060) in self.ports

    def is_me(self, uri) -> bool:
        """A URI that addresses this server itself (no user part, our host)."""
        return isinstance(uri, SipUri) and uri.user is None and self.is_local_host(uri.host, uri.port)


@attrs.define
class _RateLimitedLog:
    """At most one log line per source per interval; counts everything."""

    clock: IReactorTime
    interval: float = GARBAGE_LOG_INTERVAL
    _last: BoundedDict = attrs.field(factory=lambda: BoundedDict(10_000))

    def should_log(self, host: str) -> bool:
        now = self.clock.seconds()
        last = self._last.get(host)
        if last is not None and now - last < self.interval:
            return False
        self._last[host] = now  # bounded: address rotation evicts the oldest, never a scan
        return True


class SipServer:
    """Parses, validates and dispatches; the transaction user of the core."""

    def __init__(self, clock: IReactorTime, transports, identity: LocalIdentity, timers, *,
                 max_message_size: int = MAX_DATAGRAM, server_header: str = "sipproxy", nat_mode: str = "auto",
                 debug: bool = False, max_transactions: int = 100_000):
        self.clock = clock
        self.transports = transports
        self.identity = identity
        # Per-message log lines only when asked for: twistd's log file keeps debug events,
        # and a line per message would cost a write per message (and the disk).
        self.debug = debug
        self.max_message_size = max_message_size
        self.server_header = server_header
        self.transactions = TransactionLayer(clock, transports, timers, user=self, nat_mode=nat_mode,
                                             max_server=max_transactions)
        self.handlers: dict[str, object] = {}  # method -> handler(tx, request), e.g. REGISTER -> registrar
        # Hooks the router sets: CANCEL matched to an INVITE, ACK for a 2xx, a response for no transaction.
        self.cancel_hook = None
        self.ack_hook = None
        self.stray_response_hook = None
        self.components: dict[str, object] = {}  # what service.py built, by name (admin API, plugins)
        self.route = self._no_route
        self.dropped: Counter = Counter()
        self.requests: Counter = Counter()
        self.replies: Counter = Counter()
        self._garbage_log = _RateLimitedLog(clock)
        self._tag_key = os.urandom(16)  # stateless To tags: recognisable by us, unguessable by others

    # -- from the transports --------------------------------------------

    def data_received(self, data: bytes, source: Source) -> None:
        try:
            self._data_received(data, source)
        except Exception:
            # A bug must cost one message, never the listener.
            log.failure("Unexpected error handling a message from {host}:{port}", host=source.host, port=source.port)
            self.dropped["internal_error"] += 1

    def stream_error(self, error: SipParseError, source: Source) -> None:
        self._drop("framing", source, str(error))

    def _data_received(self, data: bytes, source: Source) -> None:
        if len(data) > self.max_message_size:
            self._too_large(data, source)
            return
        if not data.strip(b"\r\n"):
            return  # keepalive
        try:
            message = parse_message(data, stream=source.reliable)
        except ResponseParseError as e:
            self._drop("bad_response", source, str(e))
            return
        except SipParseError as e:
            self._reject_unparsed(data, source, e)
            return
        if isinstance(message, Response):
            self._response_received(message, source)
        else:
            self._request_received(message, source)

    def _request_received(self, request: Request, source: Source) -> None:
        try:
            request.validate()
            request = self._stamp_via(request, source)
        except SipParseError as e:
            self._reject(request, source, e)
            return
        self.requests[request.method] += 1
        if self.debug:
            log.debug("{method} {uri} from {host}:{port} (Call-ID {call_id})", method=request.method,
                      uri=for_log(request.uri_text), host=source.host, port=source.port,
                      call_id=for_log(request.call_id))
        self.transactions.request_received(request, source)

    def _response_received(self, response: Response, source: Source) -> None:
        try:
            response.validate()
        except SipParseError as e:
            self._drop("bad_response", source, str(e))
            return
        self.transactions.response_received(response, source)

    def _stamp_via(self, request: Request, source: Source) -> Request:
        """Add received= when the source differs from sent-by; fill rport (RFC 3581).

        A `received` the client wrote itself is replaced by the real source:
        it must never choose where our answers go (amplification toward a victim).
        """
        via = request.top_via
        changed = via
        if via.rport is not None:
            changed = changed.with_param("received", source.host).with_param("rport", str(source.port))
        elif via.host != source.host or via.received is not None:
            changed = changed.with_param("received", source.host)
        if changed is via:
            return request
        headers = request.headers.remove_first_value("via").prepend("Via", str(changed))
        return request.with_headers(headers)

    # -- bad input -----------------------------------------------------------

    def _reject_unparsed(self, data: bytes, source: Source, error: SipParseError) -> None:
        """A request whose framing or start line is broken: answer if its Via allows."""
        try:
            request = parse_message(data, head_only=True)
            if not isinstance(request, Request):
                raise error
            request.validate()
        except SipParseError:
            self._drop("malformed", source, str(error))
            return
        self._reject(request, source, error)

    def _reject(self, request: Request, source: Source, error: SipError) -> None:
        if request.method == "ACK":
            self._drop("malformed_ack", source, str(error))
            return
        try:
            response = make_response(request, error.status, error.reason, to_tag=new_tag())
            destination = response_destination(self._stamp_via(request, source), source, self.transactions.nat_mode)
        except SipParseError:
            self._drop("malformed", source, str(error))
            return
        if self._garbage_log.should_log(source.host):
            log.info("Rejected {method} from {host}:{port}: {status} {reason}", method=request.method,
                     host=source.host, port=source.port, status=error.status, reason=error.reason)
        self.send_stateless_response(response, destination, source, method=request.method)

    def _too_large(self, data: bytes, source: Source) -> None:
        try:
            request = parse_message(data, head_only=True)
            if isinstance(request, Request):
                request.validate()
                self._reject(request, source, SipError(513, "Message Too Large"))
                return
        except SipParseError:
            pass
        self._drop("too_large", source, f"{len(data)} bytes")

    def _drop(self, reason: str, source: Source, detail: str) -> None:
        self.dropped[reason] += 1
        if self._garbage_log.should_log(source.host):
            log.info("Dropped message from {host}:{port}: {detail}", host=source.host, port=source.port, detail=detail)

    def send_stateless_response(self, response: Response, destination: Destination,
                                source: Source | None = None, *, method: str) -> None:
        self.replies[(method, response.status)] += 1
        connection = source.connection if source is not None and source.reliable else None
        self.transports.send(response.serialize(), destination, connection)

    # -- transaction user ----------------------------------------------------

    def respond(self, tx: ServerTransaction, status: int, reason: str | None = None, *,
                extra: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> Response:
        """Answer a server transaction with a response built from its request."""
        if self.server_header:
            extra = extra + (("Server", self.server_header),)
        response = make_response(tx.request, status, reason, to_tag=self._to_tag(tx), extra=extra, body=body)
        self.send_response(tx, response)
        return response

    def respond_statelessly(self, tx: ServerTransaction, status: int, reason: str | None = None, *,
                            extra: tuple[tuple[str, str], ...] = ()) -> None:
        """A final answer that holds no transaction (challenges and refusals, as Kamailio's sl does).

        Its To tag is derived from the request, so the ACK a phone sends for
        it (seed 001 line 3945, step 3) is recognised and absorbed.
        """
        if self.server_header:
            extra = extra + (("Server", self.server_header),)
        request = tx.request
        response = make_response(request, status, reason, to_tag=self.stateless_tag(request), extra=extra)
        self.replies[(request.method, status)] += 1
        tx.respond_statelessly(response)

    def stateless_tag(self, request: Request) -> str:
        text = f"{request.call_id}\x00{request.top_via.branch or ''}".encode("utf-8", "surrogateescape")
        return hashlib.blake2s(text, key=self._tag_key, digest_size=6).hexdigest()

    def send_response(self, tx: ServerTransaction, response: Response) -> None:
        self.replies[(tx.request.method, response.status)] += 1
        tx.respond(response)

    def _to_tag(self, tx: ServerTransaction) -> str:
        last = tx.last_response
        if last is not None:
            tag = last.to.tag
            if tag:
                return tag
        return new_tag()

    def request_received(self, tx: ServerTransaction, request: Request) -> None:
        try:
            self._dispatch(tx, request)
        except SipError as e:
            self.respond(tx, e.status, e.reason, extra=e.headers)
        except Exception:
            log.failure("Error handling {method} (Call-ID {call_id})", method=request.method,
                        call_id=for_log(request.call_id))
            if tx.state in ("Trying", "Proceeding"):
                self.respond(tx, 500, "Server Internal Error")

    def _dispatch(self, tx: ServerTransaction, request: Request) -> None:
        uri = request.uri  # raises SipParseError for a malformed Request-URI
        if not isinstance(uri, SipUri):
            raise SipError(416, "Unsupported URI Scheme")
        handler = self.handlers.get(request.method)
        if handler is not None:
            handler(tx, request)
            return
        if self.identity.is_me(uri) and uri.param("lr") is None:
            self._handle_local(tx, request)
            return
        # Anything else, including our own Record-Route URI sent by a strict router.
        self.route(tx, request)

    def _handle_local(self, tx: ServerTransaction, request: Request) -> None:
        """Requests addressed to this server itself (Request-URI without a user)."""
        unsupported = [ext for ext in request.headers.values("require") if ext.lower() not in SUPPORTED_EXTENSIONS]
        if unsupported:
            self.respond(tx, 420, "Bad Extension", extra=(("Unsupported", ", ".join(unsupported)),))
            return
        if request.method == "OPTIONS":
            self.respond(tx, 200, "OK", extra=self.capabilities())
        elif request.method not in ALLOWED_METHODS:
            self.respond(tx, 501, "Not Implemented", extra=(("Allow", ", ".join(ALLOWED_METHODS)),))
        elif request.method == "BYE":
            self.respond(tx, 481, "Call/Transaction Does Not Exist")
        else:
            self.respond(tx, 405, "Method Not Allowed", extra=(("Allow", "OPTIONS, REGISTER"),))

    def capabilities(self) -> tuple[tuple[str, str], ...]:
        return (
            ("Allow", ", ".join(ALLOWED_METHODS)),
            ("Accept", "application/sdp"),
            ("Supported", ", ".join(SUPPORTED_EXTENSIONS)),
        )

    def _no_route(self, tx: ServerTransaction, request: Request) -> None:
        """Until a router is installed: a clear final answer, never silence."""
        uri = request.uri
        if request.method not in ALLOWED_METHODS:
            self.respond(tx, 501, "Not Implemented")
        elif self.identity.is_local_host(uri.host, uri.port):
            self.respond(tx, 404, "Not Found")
        else:
            self.respond(tx, 403, "Relaying Not Allowed")

    def cancel_received(self, tx: ServerTransaction, request: Request, invite_tx: ServerTransaction | None) -> None:
        """CANCEL (section 9.2): 200 when it matches a pending INVITE, which then gets 487."""
        if invite_tx is None:
            self.respond(tx, 481, "Call/Transaction Does Not Exist")
            return
        self.respond(tx, 200, "OK")
        invite_tx.cancelled = True
        if self.cancel_hook is not None:
            self.cancel_hook(invite_tx, request)
        elif invite_tx.state == "Proceeding":
            self.respond(invite_tx, 487, "Request Terminated")

    def overloaded(self, request: Request, source: Source) -> None:
        """The transaction table is full: 503 with a spread Retry-After, statelessly (RFC 3261 21.5.4)."""
        self.dropped["transaction_table_full"] += 1
        if self._garbage_log.should_log("overload"):
            log.warn("Transaction table full ({count}): answering new requests with 503",
                     count=self.transactions.max_server)
        retry = str(5 + int.from_bytes(os.urandom(1), "big") % 10)
        response = make_response(request, 503, "Service Unavailable", to_tag=self.stateless_tag(request),
                                 extra=(("Retry-After", retry),))
        destination = response_destination(request, source, self.transactions.nat_mode)
        self.send_stateless_response(response, destination, source, method=request.method)

    def ack_received(self, request: Request, source: Source) -> None:
        if request.to.tag is not None and request.to.tag == self.stateless_tag(request):
            self.dropped["ack_for_stateless_answer"] += 1  # hop by hop: it ends here
            return
        if self.ack_hook is not None:
            self.ack_hook(request, source)

    def stray_response(self, response: Response, source: Source) -> None:
        if self.stray_response_hook is not None:
            self.stray_response_hook(response, source)
        else:
            self.dropped["stray_response"] += 1
