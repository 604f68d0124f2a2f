"""The controller between the transports and the transaction layer (as Twisted Names' DNSServerFactory is).

`SipServer.data_received` is where every message enters: it parses, checks
what must be checked before anything else (size, version, the mandatory
fields), stamps `received`/`rport` on the top Via (RFC 3261 18.2.1, RFC 3581),
and hands the message to the transaction layer, whose transaction user (the
`Dispatcher` of proxy/dispatch.py) is given at construction.

Nothing a peer sends may raise out of here: a bad request gets a 4xx/5xx
whose reason phrase names the defect, and what cannot be answered is
dropped, counted, and logged at most once per source per minute.
"""

from collections import Counter

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.errors import SipError, SipParseError
from proxy.identity import Identity
from proxy.plugin import Respond
from proxy.replies import Replies, new_tag
from proxy.sip.grammar import for_log
from proxy.sip.message import Request, Response
from proxy.sip.wire import MAX_DATAGRAM, ResponseParseError, parse_message
from proxy.transaction import Timers, TransactionLayer
from proxy.transport import Destination, Source

log = Logger()


class SipServer:
    """Parses, validates and hands over; `user` decides (the transaction user)."""

    def __init__(self, clock: IReactorTime, transports, identity: Identity, timers: Timers, *, user, replies: Replies,
                 max_message_size: int = MAX_DATAGRAM, debug: bool = False, max_transactions: int = 100_000,
                 tracer=None, shedder=None, screens=None):
        # proxy/plugin.py PluginHost: its source screens (bans, flood limits) see every message first.
        self.screens = screens
        self.tracer = tracer  # proxy/trace.py: matching messages logged while a trace runs
        self.shedder = shedder if shedder is not None and shedder.enabled else None  # proxy/overload.py
        self.clock = clock
        self.transports = transports
        self.identity = identity
        self.replies = replies
        # Per-message log lines only when asked for: twistd's log file keeps debug events,
        # and a line per message would cost a write per message (and the disk).
        self.debug = debug
        self.max_message_size = max_message_size
        self.transactions = TransactionLayer(clock, transports, timers, user=user, nat=replies.nat,
                                             max_server=max_transactions,
                                             shed=self.shedder.sheds if self.shedder is not None else None)
        self.requests: Counter = Counter()

    @property
    def dropped(self) -> Counter:
        return self.replies.dropped

    # -- from the transports --------------------------------------------

    def admits(self, data: bytes, source: Source) -> bool:
        """Do the source screens let this message in? (The worker link asks before it hands one over.)"""
        screens = self.screens
        if screens is None or not screens.screening or screens.admit(source.host, data):
            return True
        self.replies.dropped["screened"] += 1
        return False

    def data_received(self, data: bytes, source: Source, screened: bool = False, judged: bool = False) -> None:
        """A message as read; `screened`: `admits` has been asked already (by the process that read it);
        `judged`: so has `refuses`, with the wait it had in this process's socket."""
        if not screened and not self.admits(data, source):
            return
        if self.tracer is not None and self.tracer.active:
            self.tracer.saw("in", data, source.host, source.port)
        try:
            self._data_received(data, source, judged)
        except Exception:
            # A bug must cost one message, never the listener.
            log.failure("Unexpected error handling a message from {host}:{port}", host=source.host, port=source.port)
            self.dropped["internal_error"] += 1

    def refuses(self, data: bytes, source: Source) -> bool:
        """Overload (proxy/overload.py): is this datagram answered 503, or dropped, before it is parsed?

        True: it is done with (the 503 sent). The worker link asks before it
        hands a datagram over, while the datagram's wait in this process's
        socket is the one the shedder knows: a refusal then costs no hand-over,
        and nothing that already waited too long here is served late elsewhere.
        """
        if self.shedder is None or source.reliable or len(data) > self.max_message_size:
            return False
        try:
            if not self._shed(data, source, trace=True):
                return False
        except Exception:
            log.failure("Unexpected error screening a message from {host}:{port}", host=source.host, port=source.port)
            self.dropped["internal_error"] += 1
        return True

    def _shed(self, data: bytes, source: Source, trace: bool = False) -> bool:
        """The shedder's verdict before parsing, carried out: True when the datagram was refused or dropped."""
        verdict = self.shedder.screen(data, self.transactions.has_branch, new_tag, self.replies.server_header)
        if verdict is None:
            return False
        if trace and self.tracer is not None and self.tracer.active:
            self.tracer.saw("in", data, source.host, source.port)  # `data_received` traces what it is given
        if verdict:
            self.transports.send(verdict, Destination("UDP", source.host, source.port))
        return True

    def stream_error(self, error: SipParseError, source: Source) -> None:
        self._drop("framing", source, str(error))

    def _data_received(self, data: bytes, source: Source, judged: bool) -> None:
        if len(data) > self.max_message_size:
            self._too_large(data, source)
            return
        if data[:1] in b"\r\n" and not data.strip(b"\r\n"):
            return  # keepalive (CRLFs only): tested on the first byte, not by copying every datagram
        if self.shedder is not None and not source.reliable and not judged and self._shed(data, source):
            return
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
        screens = self.screens
        if screens is not None and screens.screening and self._screened_out(request, source):
            return
        self.requests[request.method] += 1
        if self.debug:
            log.debug("{method} {uri} from {host}:{port} (Call-ID {call_id})", method=request.method,
                      uri=for_log(request.uri_text), host=source.host, port=source.port,
                      call_id=for_log(request.call_id))
        self.transactions.request_received(request, source)

    def _screened_out(self, request: Request, source: Source) -> bool:
        verdict = self.screens.screen(request, source)
        if verdict is None:
            return False
        self.replies.dropped["screened"] += 1
        if isinstance(verdict, Respond) and request.method != "ACK":
            try:
                self.replies.answer(request, source, verdict.status, verdict.reason)
            except SipParseError:
                pass  # no Via to answer along: dropped, as counted
        return True

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
            self.replies.answer(self._stamp_via(request, source), source, error.status, error.reason, to_tag=new_tag())
        except SipParseError:
            self._drop("malformed", source, str(error))
            return
        if self.replies.log_limit.should_log(source.host):
            log.info("Rejected {method} from {host}:{port}: {status} {reason}", method=request.method,
                     host=source.host, port=source.port, status=error.status, reason=error.reason)

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
        self.replies.drop(reason, source, detail)
