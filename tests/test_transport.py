"""Stream framing into the controller, idle timeout, connection reuse, queued connects, UDP size limit."""

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
import socket

from twisted.trial.unittest import SynchronousTestCase

from proxy.sip.wire import MAX_DATAGRAM
from proxy.testing import sip_bytes
from proxy.transport import Destination, SipDatagramProtocol, SipStreamFactory, Transports


class Controller:
    def __init__(self):
        self.messages, self.errors = [], []

    def data_received(self, data, source):
        self.messages.append((data, source))

    def stream_error(self, error, source):
        self.errors.append((error, source))


def connected_stream(factory, clock, peer=("192.0.2.7", 40000)):
    proto = factory.buildProtocol(None)
    proto.callLater = clock.callLater  # TimeoutMixin's clock
    transport = StringTransport(peerAddress=IPv4Address("TCP", *peer))
    proto.makeConnection(transport)
    return proto, transport


class StreamTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.controller = Controller()
        self.transports = Transports(clock=self.clock)
        self.factory = SipStreamFactory("TCP", self.controller, self.transports, idle_timeout=300, max_size=MAX_DATAGRAM)

    def test_messages_split_across_segments(self):
        proto, _ = connected_stream(self.factory, self.clock)
        one = sip_bytes("OPTIONS sip:a@b SIP/2.0\nCall-ID: 1")
        two = sip_bytes("OPTIONS sip:a@b SIP/2.0\nCall-ID: 2")
        data = one + two
        proto.dataReceived(data[:10])
        proto.dataReceived(data[10:])
        self.assertEqual([d for d, _ in self.controller.messages], [one, two])
        source = self.controller.messages[0][1]
        self.assertEqual((source.transport, source.host, source.port, source.connection), ("TCP", "192.0.2.7", 40000, proto))

    def test_framing_error_closes_the_connection(self):
        proto, transport = connected_stream(self.factory, self.clock)
        proto.dataReceived(b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: 1\r\n\r\n")
        self.assertEqual(self.controller.errors[0][0].reason, "Missing Content-Length")
        self.assertTrue(transport.disconnecting)

    def test_idle_timeout(self):
        proto, transport = connected_stream(self.factory, self.clock)
        self.clock.advance(299)
        proto.dataReceived(b"\r\n\r\n")  # keepalive resets the timer
        self.clock.advance(299)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_reuses_the_connection_a_peer_opened(self):
        proto, transport = connected_stream(self.factory, self.clock)
        self.transports.send(b"hello", Destination("TCP", "192.0.2.7", 40000))
        self.assertEqual(transport.value(), b"hello")
        proto.connectionLost(None)
        self.assertEqual(self.transports.open_connections(), 0)

    def test_connects_once_and_queues_until_connected(self):
        calls = []
        pending = defer.Deferred()

        def connector(transport, host, port):
            calls.append((transport, host, port))
            return pending

        self.transports.connector = connector
        dest = Destination("TCP", "192.0.2.8", 5060)
        self.transports.send(b"one", dest)
        self.transports.send(b"two", dest)
        self.assertEqual(calls, [("TCP", "192.0.2.8", 5060)])
        proto, transport = connected_stream(self.factory, self.clock, ("192.0.2.8", 5060))
        pending.callback(proto)
        self.assertEqual(transport.value(), b"onetwo")
        self.transports.send(b"three", dest)
        self.assertEqual(transport.value(), b"onetwothree")
        self.assertEqual(len(calls), 1)

    def test_failed_connect_drops_and_logs(self):
        pending = defer.Deferred()
        self.transports.connector = lambda *key: pending
        self.transports.send(b"one", Destination("TCP", "192.0.2.9", 5060))
        pending.errback(ConnectionRefusedError("refused"))
        self.assertEqual(self.transports._pending, {})


class FakeUdpTransport:
    def __init__(self):
        self.written = []

    def write(self, data, addr):
        self.written.append((data, addr))


class DatagramTests(SynchronousTestCase):
    def test_large_datagrams_stay_udp_and_oversize_is_refused(self):
        controller = Controller()
        transports = Transports(clock=Clock())
        proto = SipDatagramProtocol(controller, transports)
        proto.transport = FakeUdpTransport()
        proto.startProtocol()
        big = b"x" * 5000  # well over the 1300 bytes at which RFC 3261 would switch to TCP
        transports.send(big, Destination("UDP", "192.0.2.10", 5060))
        transports.send(b"y" * (MAX_DATAGRAM + 1), Destination("UDP", "192.0.2.10", 5060))
        self.assertEqual(proto.transport.written, [(big, ("192.0.2.10", 5060))])

    def test_datagram_reaches_controller_with_source(self):
        controller = Controller()
        proto = SipDatagramProtocol(controller, Transports(clock=Clock()))
        proto.datagramReceived(b"data", ("192.0.2.11", 49170))
        self.assertEqual(controller.messages[0][1].port, 49170)


class TlsNameTests(SynchronousTestCase):
    def test_tls_connections_are_verified_against_the_name_not_the_address(self):
        calls = []

        def connector(transport, host, port, tls_name=None):
            calls.append((transport, host, port, tls_name))
            return defer.Deferred()

        transports = Transports(clock=Clock(), connector=connector)
        transports.send(b"x", Destination("TLS", "192.0.2.40", 5061, tls_name="trunk.example.net"))
        self.assertEqual(calls, [("TLS", "192.0.2.40", 5061, "trunk.example.net")])

    def test_resolver_keeps_the_name(self):
        from twisted.names import dns

        from proxy.routing.dns import NextHopResolver

        class Fake:
            def lookupAddress(self, name, timeout=None):
                return defer.succeed(([dns.RRHeader(name, dns.A, payload=dns.Record_A("192.0.2.40"))], [], []))

            def lookupIPV6Address(self, name, timeout=None):
                return defer.succeed(([], [], []))

        (found,) = self.successResultOf(NextHopResolver(Fake()).resolve("trunk.example.net", 5061, "TLS"))
        self.assertEqual((found.host, found.tls_name), ("192.0.2.40", "trunk.example.net"))


class TimestampedUdpPortTests(SynchronousTestCase):
    """On a real socket (no reactor): each datagram's wait in the kernel queue is reported, and it is delivered."""

    def test_delay_reported_per_datagram(self):
        import select

        from twisted.internet import protocol

        from proxy.transport import TimestampedUdpPort

        got, delays = [], []

        class Receiver(protocol.DatagramProtocol):
            def datagramReceived(self, data, addr):
                got.append((data, addr[0]))

        port = TimestampedUdpPort(0, Receiver(), "127.0.0.1", on_delay=delays.append)
        port._bindSocket()
        self.addCleanup(port.socket.close)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(sender.close)
        for _ in range(2):
            sender.sendto(b"OPTIONS sip:x SIP/2.0\r\n\r\n", port.socket.getsockname())
        select.select([port.socket], [], [], 5)
        port.doRead()  # reads until the queue is empty
        self.assertEqual(got, [(b"OPTIONS sip:x SIP/2.0\r\n\r\n", "127.0.0.1")] * 2)
        self.assertEqual(len(delays), 2)
        self.assertTrue(all(0 <= d < 5 for d in delays), delays)
