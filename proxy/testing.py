"""In-memory doubles shipped with the product (as treq ships StubTreq), so
tests and plugin authors drive the server without sockets.
"""

from twisted.internet.task import Clock

from proxy.server import LocalIdentity, SipServer
from proxy.sip.message import Request, Response
from proxy.sip.wire import parse_message
from proxy.transaction import Timers
from proxy.transport import Destination, Source


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
                addresses=("192.0.2.1",), timers: Timers = Timers(),
                max_transactions: int = 100_000) -> tuple[SipServer, RecordingTransports, Clock]:
    """A SipServer on a Clock with recording transports, for tests."""
    clock = clock or Clock()
    transports = RecordingTransports()
    identity = LocalIdentity(domains=frozenset(domains), addresses=frozenset(addresses), ports=frozenset(ports))
    server = SipServer(clock, transports, identity, timers, max_transactions=max_transactions)
    return server, transports, clock


def udp_source(host: str = "192.0.2.50", port: int = 5060) -> Source:
    return Source("UDP", host, port)


def sip_bytes(text: str, body: bytes = b"") -> bytes:
    """Wire bytes from a readable message: lines joined with CRLF, Content-Length filled in."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not any(line.lower().startswith(("content-length:", "l:")) for line in lines):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
