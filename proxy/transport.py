"""UDP, TCP and TLS transports (RFC 3261 section 18).

The protocols here are thin, as in Twisted Names: they turn bytes into
`(data, Source)` and hand them to a controller (`proxy.server.SipServer`);
they decide nothing. Sending goes through `Transports.send`, which picks the
socket or connection for a destination.

Phones: the 7940/7960 speak UDP only (seed 001 line 3041) and reassemble
fragmented datagrams up to 1932 bytes (seed 000 line 38). A request toward a
phone is therefore never moved to TCP because it is large (RFC 3261 18.1.1's
1300-byte rule is deliberately not applied); datagrams up to 65,507 bytes are
sent and received.
"""

import errno
import functools
import ipaddress
import os
import socket
import struct
import sys
import time

import attrs
from twisted.internet import protocol, udp
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from proxy.errors import SipParseError
from proxy.sip.wire import MAX_DATAGRAM, StreamFramer

log = Logger()

RELIABLE = frozenset({"TCP", "TLS"})


# Addresses that sit behind NAT when seen from elsewhere: RFC 1918, RFC 6598
# (carrier-grade NAT), link-local, loopback, IPv6 ULA and link-local.
# (ipaddress's is_private would also count documentation ranges.)
_NAT_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "127.0.0.0/8",
    "fc00::/7", "fe80::/10", "::1/128",
))


@functools.lru_cache(maxsize=4096)
def is_ip_address(host: str) -> bool:
    """A numeric IPv4/IPv6 address (what a socket takes), not a name. Cached: this is on every send."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_private_address(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in _NAT_NETWORKS)


@attrs.frozen
class Source:
    """Where a message came from: transport, address, port, and for streams the connection."""

    transport: str
    host: str
    port: int
    connection: object = attrs.field(default=None, eq=False, repr=False)

    @property
    def reliable(self) -> bool:
        return self.transport in RELIABLE


@attrs.frozen
class Destination:
    """Where to send: transport name, numeric address, port; for TLS, the name the certificate must match."""

    transport: str
    host: str
    port: int
    tls_name: str | None = attrs.field(default=None, eq=False)


class SipDatagramProtocol(protocol.DatagramProtocol):
    """UDP: one datagram is one message."""

    def __init__(self, controller, transports: "Transports"):
        self.controller = controller
        self.transports = transports

    def startProtocol(self):
        self.transports.udp = self
        # The socket's own sendto when there is one: Twisted's Port.write checks the address on every
        # datagram, and ours are numeric already (Transports resolves names first).
        sock = getattr(self.transport, "socket", None)
        self._sendto = getattr(sock, "sendto", None) or self.transport.write

    def stopProtocol(self):
        if self.transports.udp is self:
            self.transports.udp = None

    def datagramReceived(self, data: bytes, addr):
        self.controller.data_received(data, Source("UDP", addr[0], addr[1]))

    def send(self, data: bytes, host: str, port: int) -> None:
        if len(data) > MAX_DATAGRAM:
            log.warn("Dropping {size}-byte message to {host}:{port}: larger than a UDP datagram",
                     size=len(data), host=host, port=port)
            return
        try:
            self._sendto(data, (host, port))
        except OSError as e:
            log.warn("UDP send to {host}:{port} failed: {error}", host=host, port=port, error=e)


# SO_TIMESTAMP (= SCM_TIMESTAMP): Python's socket module does not name it; 29 on Linux (asm-generic, x86-64).
_SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29 if sys.platform.startswith("linux") else None)
# SO_RXQ_OVFL: each datagram carries the socket's count of datagrams the kernel dropped (queue full).
_SO_RXQ_OVFL = getattr(socket, "SO_RXQ_OVFL", 40 if sys.platform.startswith("linux") else None)
_TIMEVAL = struct.Struct("@ll")
_COUNT = struct.Struct("@I")
_ANCILLARY = socket.CMSG_SPACE(_TIMEVAL.size) + socket.CMSG_SPACE(_COUNT.size)
_READ_AGAIN = (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.ECONNREFUSED)


class TimestampedUdpPort(udp.Port):
    """A UDP port that learns how long each datagram waited in the kernel's queue (SO_TIMESTAMP).

    That wait is the one delay a busy server cannot see from inside its event
    loop: the loop keeps turning while seconds of datagrams pile up in the
    receive buffer. `on_delay(seconds)` gets it per datagram, and
    `on_dropped(total)` the kernel's count of datagrams it dropped because the
    buffer was full, whenever that count changes (proxy/overload.py sheds by
    both). Without SO_TIMESTAMP (not Linux) it reads as Twisted's port does.
    """

    def __init__(self, port, proto, interface="", maxPacketSize=65535, reactor=None, on_delay=None,
                 on_dropped=None, receive_buffer: int = 0, reuse_port: bool = False):
        super().__init__(port, proto, interface, maxPacketSize, reactor)
        self.reuse_port = reuse_port  # the primary of several workers: their sockets join this one's port
        self.on_delay = on_delay
        self.on_dropped = on_dropped
        self.receive_buffer = receive_buffer
        self.kernel_dropped = 0

    @classmethod
    def adopt(cls, reactor, fd: int, family: int, proto, **options) -> "TimestampedUdpPort":
        """A port on a socket another process opened and bound (a worker: proxy/workers/); `fd` is closed."""
        sock = socket.fromfd(fd, family, socket.SOCK_DGRAM)
        os.close(fd)
        port = cls(None, proto, sock.getsockname()[0], 65535, reactor, **options)
        port._preexistingSocket = sock
        return port

    def createInternetSocket(self):
        sock = super().createInternetSocket()
        if self.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return sock

    def _bindSocket(self):
        super()._bindSocket()
        if self.receive_buffer:
            self._grow_receive_buffer()
        if self.on_delay is not None:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMP, 1)
            except (TypeError, OSError):
                self.on_delay = None
        if self.on_dropped is not None:
            try:
                self.socket.setsockopt(socket.SOL_SOCKET, _SO_RXQ_OVFL, 1)
            except (TypeError, OSError):
                self.on_dropped = None

    def _grow_receive_buffer(self) -> None:
        """A burst of phones (a reboot storm) must queue, not be dropped: ask for a large buffer, say what we got."""
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
            got = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # Linux reports it doubled
        except OSError as e:
            log.warn("Cannot set the UDP receive buffer: {error}", error=e)
            return
        if got < self.receive_buffer:
            log.warn("UDP receive buffer is {got} bytes, not the {asked} asked for ([server] udp_receive_buffer): "
                     "raise net.core.rmem_max (sysctl) so bursts queue instead of being dropped",
                     got=got, asked=self.receive_buffer)

    def doRead(self):
        on_delay = self.on_delay
        if on_delay is None:
            return super().doRead()
        read = 0
        recvmsg = self.socket.recvmsg
        size = self.maxPacketSize
        datagram_received = self.protocol.datagramReceived
        unpack = _TIMEVAL.unpack_from
        while read < self.maxThroughput:
            try:
                data, ancillary, _flags, addr = recvmsg(size, _ANCILLARY)
            except OSError as e:
                if e.errno in _READ_AGAIN:
                    return
                raise
            read += len(data)
            for _level, kind, value in ancillary:
                if kind == _SO_TIMESTAMP:
                    seconds, micros = unpack(value)
                    on_delay(time.time() - seconds - micros * 1e-6)
                elif kind == _SO_RXQ_OVFL:
                    dropped = _COUNT.unpack(value)[0]
                    if dropped != self.kernel_dropped:
                        self.kernel_dropped = dropped
                        self.on_dropped(dropped)
            if self.addressFamily == socket.AF_INET6:
                addr = addr[:2]
            try:
                datagram_received(data, addr)
            except BaseException:
                log.failure("Unhandled error reading a datagram")


class SipStreamProtocol(protocol.Protocol, TimeoutMixin):
    """TCP or TLS: a byte stream framed by Content-Length; idle connections close."""

    def __init__(self, factory: "SipStreamFactory"):
        self.factory = factory
        self.framer = StreamFramer(factory.max_size)
        self.peer: tuple[str, int] | None = None

    def connectionMade(self):
        self.factory.open += 1
        peer = self.transport.getPeer()
        self.peer = (peer.host, peer.port)
        self.setTimeout(self.factory.idle_timeout)
        self.factory.transports.connection_made(self.factory.name, self.peer, self)

    def connectionLost(self, reason=None):
        self.factory.open -= 1
        self.setTimeout(None)
        self.factory.transports.connection_lost(self.factory.name, self.peer, self)

    def timeoutConnection(self):
        log.debug("Closing idle {transport} connection from {peer}", transport=self.factory.name, peer=self.peer)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes):
        self.resetTimeout()
        try:
            messages = self.framer.feed(data)
        except SipParseError as e:
            # The stream cannot be resynchronised after a framing error.
            self.factory.controller.stream_error(e, Source(self.factory.name, *self.peer, connection=self))
            self.transport.loseConnection()
            return
        for message in messages:
            self.factory.controller.data_received(
                message, Source(self.factory.name, self.peer[0], self.peer[1], connection=self)
            )

    def send(self, data: bytes) -> None:
        self.resetTimeout()
        self.transport.write(data)


class SipStreamFactory(protocol.Factory):
    """Builds stream protocols for both listening and connecting."""

    def __init__(self, name: str, controller, transports: "Transports", idle_timeout: float, max_size: int,
                 max_connections: int = 2_000):
        self.name = name
        self.controller = controller
        self.transports = transports
        self.idle_timeout = idle_timeout
        self.max_size = max_size
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0  # connections closed at once: max_connections reached

    def buildProtocol(self, addr):
        if self.open >= self.max_connections:
            self.refused += 1
            return None  # Twisted closes the connection
        return SipStreamProtocol(self)


@attrs.define
class Transports:
    """The sending side: the UDP socket and the open stream connections.

    Stream connections are reused in both directions (RFC 3261 18.2.2 and
    18.1.1): a response goes back on the connection its request came on; a
    request to an address that already has a connection uses it. A new
    connection is opened through `connector(transport, host, port)`, which
    returns a Deferred firing with a connected SipStreamProtocol.
    """

    clock: IReactorTime
    connector: object = None
    udp: SipDatagramProtocol | None = None
    _connections: dict = attrs.field(factory=dict)
    _pending: dict = attrs.field(factory=dict)
    unsendable: int = 0  # messages for a destination that is not a numeric address and port
    tracer: object = None  # proxy/trace.py: matching messages logged while a trace runs

    def connection_made(self, transport: str, peer, proto) -> None:
        self._connections[(transport, peer[0], peer[1])] = proto

    def connection_lost(self, transport: str, peer, proto) -> None:
        key = (transport, peer[0], peer[1])
        if self._connections.get(key) is proto:
            del self._connections[key]

    def open_connections(self) -> int:
        return len(self._connections)

    def send(self, data: bytes, dest: Destination, connection=None) -> None:
        """Send bytes toward `dest`; for streams prefer `connection` when it is still up."""
        if self.tracer is not None and self.tracer.active:
            self.tracer.saw("out", data, dest.host, dest.port)
        if not is_ip_address(dest.host) or not 0 < dest.port < 65536:
            # Names are resolved before this (RFC 3263, proxy/routing/dns.py); one that slips through is a
            # bug upstream, which must cost this one message, never a traceback per retransmission.
            self.unsendable += 1
            log.debug("Not sending to {host}:{port}: not a numeric address", host=dest.host, port=dest.port)
            return
        if dest.transport == "UDP":
            if self.udp is None:
                log.warn("No UDP listener to send to {host}:{port}", host=dest.host, port=dest.port)
                return
            self.udp.send(data, dest.host, dest.port)
            return
        if connection is not None and connection.transport is not None and connection.transport.connected:
            connection.send(data)
            return
        key = (dest.transport, dest.host, dest.port)
        existing = self._connections.get(key)
        if existing is not None:
            existing.send(data)
            return
        self._connect_and_send(key, data, dest.tls_name)

    def _connect_and_send(self, key, data: bytes, tls_name: str | None = None) -> None:
        queue = self._pending.get(key)
        if queue is not None:
            queue.append(data)
            return
        if self.connector is None:
            log.warn("No {transport} client to reach {host}:{port}", transport=key[0], host=key[1], port=key[2])
            return
        self._pending[key] = [data]
        d = self.connector(*key, tls_name=tls_name) if tls_name else self.connector(*key)

        def connected(proto):
            for item in self._pending.pop(key, []):
                proto.send(item)

        def failed(failure):
            dropped = self._pending.pop(key, [])
            log.warn("{transport} connection to {host}:{port} failed, {count} message(s) dropped: {error}",
                     transport=key[0], host=key[1], port=key[2], count=len(dropped),
                     error=failure.getErrorMessage())

        d.addCallbacks(connected, failed)
