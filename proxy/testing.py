"""In-memory doubles shipped with the product (as treq ships StubTreq), so
tests and plugin authors drive the server without sockets.
"""

from typing import TYPE_CHECKING

from twisted.internet.task import Clock

from proxy.dispatch import Dispatcher
from proxy.identity import Identity
from proxy.replies import Replies
from proxy.server import SipServer
from proxy.sip.message import Request, Response
from proxy.sip.wire import parse_message
from proxy.transaction import Timers
from proxy.transport import Destination, Source

if TYPE_CHECKING:  # the core imports nearly everything: only for the annotation
    from proxy.core import Core


class RecordingTransports:
    """Stands in for `Transports`: remembers what was sent, and where."""

    def __init__(self):
        self.sent: list[tuple[bytes, Destination]] = []

    def send(self, data: bytes, dest: Destination, connection=None) -> None:
        self.sent.append((data, dest))

    def messages(self) -> list[tuple[Request | Response, Destination]]:
        return [(parse_message(data), dest) for data, dest in self.sent]

    def take(self) -> list[tuple[Request | Response, Destination]]:
        out = self.messages()
        self.sent.clear()
        return out


def make_server(clock: Clock | None = None, *, domains=("example.com",), ports=(5060,),
                addresses=("192.0.2.1",), timers: Timers = Timers(), max_transactions: int = 100_000,
                methods: dict | None = None, route=None) -> tuple[SipServer, RecordingTransports, Clock]:
    """A bare SipServer on a Clock with recording transports (no registrar, no proxy core), for tests.

    `methods` and `route` go to its Dispatcher; without them it answers what a
    server with nothing behind it answers (404/403/501, OPTIONS 200).
    """
    clock = clock or Clock()
    transports = RecordingTransports()
    identity = Identity(domains=frozenset(domains), addresses=frozenset(addresses), ports=frozenset(ports),
                        advertise_host=addresses[0])
    replies = Replies(clock, transports)
    dispatcher = Dispatcher(replies, identity, methods=methods or {}, route=route)
    server = SipServer(clock, transports, identity, timers, user=dispatcher, replies=replies,
                       max_transactions=max_transactions)
    return server, transports, clock


def make_core(directory: str, clock: Clock | None = None, *, domains=("example.com",), addresses=("192.0.2.1",),
              server_settings: dict | None = None, worker: int | None = None,
              **sections) -> tuple["Core", RecordingTransports, Clock]:
    """The whole core as the server builds it (`build_core`), on a Clock with recording transports.

    `sections` replace parts of the config: proxy=ProxySettings(...), routes=(...), emergency=..., forwarding=...;
    `server_settings` are fields of [server] (e.g. {"overload_lag": 0.1}); `worker`: the core of that
    worker process (proxy/workers/; 0 the primary).
    """
    import attrs

    from proxy.config import ListenerConfig, ProxyConfig, ServerConfig
    from proxy.core import build_core

    clock = clock or Clock()
    transports = RecordingTransports()
    server = ServerConfig(domains=tuple(domains), addresses=tuple(addresses), state_dir=directory,
                          listen=(ListenerConfig.parse("udp:5060"),), **(server_settings or {}))
    config = attrs.evolve(ProxyConfig(), server=server, **sections)
    from proxy.trace import Tracer

    return build_core(config, clock, transports, worker=worker, tracer=Tracer(clock)), transports, clock


def udp_source(host: str = "192.0.2.50", port: int = 5060) -> Source:
    return Source("UDP", host, port)


def sip_bytes(text: str, body: bytes = b"") -> bytes:
    """Wire bytes from a readable message: lines joined with CRLF, Content-Length filled in."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not any(line.lower().startswith(("content-length:", "l:")) for line in lines):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
