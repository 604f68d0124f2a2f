"""The server's answers and its drop counts: one object every part of the core answers through.

- `respond(tx, ...)`: a response on a server transaction (retransmitted by it);
- `respond_statelessly(tx, ...)`: a final answer that holds no transaction, for
  requests nobody vouched for yet (challenges, refusals), as Kamailio's sl
  module does; its To tag is derived from the request (`stateless_tag`), so
  the ACK a phone sends for it is recognised and absorbed;
- `answer(request, source, ...)`: a stateless answer before any transaction
  exists (a malformed request, a full transaction table);
- `drop(reason, source, detail)`: what cannot be answered is counted, and
  logged at most once per source per minute.
"""

import hashlib
import os
from collections import Counter

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.bounded import BoundedDict
from proxy.nat import NatPolicy
from proxy.sip.message import Request, Response, make_response
from proxy.transaction import ServerTransaction, response_destination
from proxy.transport import Source

log = Logger()

GARBAGE_LOG_INTERVAL = 60.0


def new_tag() -> str:
    return os.urandom(6).hex()


@attrs.define
class RateLimitedLog:
    """At most one log line per source per interval; bounded, so address rotation costs nothing."""

    clock: IReactorTime
    interval: float = GARBAGE_LOG_INTERVAL
    _last: BoundedDict = attrs.field(factory=lambda: BoundedDict(10_000))

    def should_log(self, host: str) -> bool:
        now = self.clock.seconds()
        last = self._last.get(host)
        if last is not None and now - last < self.interval:
            return False
        self._last[host] = now
        return True


class Replies:
    def __init__(self, clock: IReactorTime, transports, *, nat: NatPolicy = NatPolicy(),
                 server_header: str = "sipproxy"):
        self.clock = clock
        self.transports = transports
        self.nat = nat
        self.server_header = server_header
        self.replies: Counter = Counter()  # (method, status) -> responses this server made
        self.dropped: Counter = Counter()  # reason -> messages dropped unanswered
        self.log_limit = RateLimitedLog(clock)
        self._tag_key = os.urandom(16)  # stateless To tags: recognisable by us, unguessable by others

    def _extra(self, extra: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        return extra + (("Server", self.server_header),) if self.server_header else extra

    def respond(self, tx: ServerTransaction, status: int, reason: str | None = None, *,
                extra: tuple[tuple[str, str], ...] = (), body: bytes = b"") -> Response | None:
        """Answer a server transaction with a response built from its request (none once it lingers: too late)."""
        if tx.lingering:
            return None
        response = make_response(tx.request, status, reason, to_tag=_to_tag(tx), extra=self._extra(extra), body=body)
        self.send_response(tx, response)
        return response

    def send_response(self, tx: ServerTransaction, response: Response) -> None:
        self.replies[(tx.method, response.status)] += 1
        tx.respond(response)

    def respond_statelessly(self, tx: ServerTransaction, status: int, reason: str | None = None, *,
                            extra: tuple[tuple[str, str], ...] = ()) -> None:
        if tx.lingering:
            return
        request = tx.request
        response = make_response(request, status, reason, to_tag=self.stateless_tag(request), extra=self._extra(extra))
        self.replies[(request.method, status)] += 1
        tx.respond_statelessly(response)

    def stateless_tag(self, request: Request) -> str:
        text = f"{request.call_id}\x00{request.top_via.branch or ''}".encode("utf-8", "surrogateescape")
        return hashlib.blake2s(text, key=self._tag_key, digest_size=6).hexdigest()

    def answer(self, request: Request, source: Source, status: int, reason: str, *,
               extra: tuple[tuple[str, str], ...] = (), to_tag: str | None = None) -> None:
        """A stateless answer to a request that has no transaction (raises SipParseError if it cannot be formed)."""
        response = make_response(request, status, reason, to_tag=to_tag or self.stateless_tag(request), extra=extra)
        destination = response_destination(request, source, self.nat)
        self.replies[(request.method, status)] += 1
        connection = source.connection if source.reliable else None
        self.transports.send(response.serialize(), destination, connection)

    def drop(self, reason: str, source: Source, detail: str) -> None:
        self.dropped[reason] += 1
        if self.log_limit.should_log(source.host):
            log.info("Dropped message from {host}:{port}: {detail}", host=source.host, port=source.port, detail=detail)


def _to_tag(tx: ServerTransaction) -> str:
    return tx.last_to_tag or new_tag()
