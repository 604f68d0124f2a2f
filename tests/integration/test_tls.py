"""TLS both ways on loopback: the server's TLS listener, and verified outgoing TLS."""

import socket
import ssl as stdlib_ssl
import tempfile

from service_identity.exceptions import VerificationError
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy.service import load_trust_root, make_connector
from proxy.transport import SipStreamFactory, Transports
from tests.integration.certs import make_self_signed
from tests.integration.harness import ServerProcess, free_port


class TlsListenerTests(SynchronousTestCase):
    def test_options_over_tls(self):
        directory = tempfile.mkdtemp()
        cert, key = make_self_signed(directory)
        tls_port = free_port()
        server = ServerProcess(f'[tls]\nca_file = "{cert}"\n')
        with open(server.config_path) as f:
            text = f.read()
        text = text.replace('listen = [', f'listen = ["ssl:{tls_port}:interface=127.0.0.1:privateKey={key}:certKey={cert}", ', 1)
        with open(server.config_path, "w") as f:
            f.write(text)
        server.start()
        self.addCleanup(server.stop)
        context = stdlib_ssl.create_default_context(cafile=cert)
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                local = tls.getsockname()[1]
                tls.sendall((
                    f"OPTIONS sip:127.0.0.1:{tls_port};transport=tls SIP/2.0\r\n"
                    f"Via: SIP/2.0/TLS 127.0.0.1:{local};branch=z9hG4bKtls1\r\n"
                    "Max-Forwards: 70\r\nFrom: <sip:t@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\n"
                    "Call-ID: tls-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode())
                reply = tls.recv(65535)
        self.assertTrue(reply.startswith(b"SIP/2.0 200 OK\r\n"), reply)


class RecordingController:
    def __init__(self):
        self.received = defer.Deferred()

    def data_received(self, data, source):
        if not self.received.called:
            self.received.callback((data, source))

    def stream_error(self, error, source):
        pass


def when_lost(proto) -> defer.Deferred:
    """A Deferred that fires with (reason,) when `proto` loses its connection.

    The reason is wrapped: a Deferred given a Failure would take the errback path.
    """
    lost = defer.Deferred()
    original = proto.connectionLost

    def on_lost(reason=None):
        original(reason)
        if not lost.called:
            lost.callback((reason,))

    proto.connectionLost = on_lost
    return lost


class VerifiedClientTests(TestCase):
    """The connector used toward TLS trunks checks the chain and the name."""

    def setUp(self):
        from twisted.internet import ssl

        directory = tempfile.mkdtemp()
        self.cert, key = make_self_signed(directory, "trunk.example.test")
        with open(self.cert, "rb") as f:
            cert_pem = f.read()
        with open(key, "rb") as f:
            key_pem = f.read()
        options = ssl.PrivateCertificate.loadPEM(cert_pem + key_pem).options()
        self.controller = RecordingController()
        self.server_transports = Transports(clock=reactor)
        factory = SipStreamFactory("TLS", self.controller, self.server_transports, 30, 65507)
        self.port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client_factory = SipStreamFactory("TLS", RecordingController(), Transports(clock=reactor), 30, 65507)

    def connect(self, name):
        connector = make_connector(reactor, lambda _: self.client_factory, load_trust_root(self.cert))
        return connector("TLS", "127.0.0.1", self.port.getHost().port, tls_name=name)

    async def close_all(self, client):
        waits = []
        if client.transport.connected:
            waits.append(when_lost(client))
            client.transport.loseConnection()
        for proto in list(self.server_transports._connections.values()):
            waits.append(when_lost(proto))
            proto.transport.loseConnection()
        await defer.DeferredList(waits).addTimeout(10, reactor)

    def test_right_name_and_ca_connects(self):
        async def run():
            proto = await self.connect("trunk.example.test")
            proto.send(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n")
            data, source = await self.controller.received.addTimeout(10, reactor)
            self.assertEqual(source.transport, "TLS")
            self.assertTrue(data.startswith(b"OPTIONS sip:x"))
            await self.close_all(proto)

        return defer.Deferred.fromCoroutine(run())

    def test_wrong_name_is_refused(self):
        async def run():
            proto = await self.connect("other.example.test")
            lost = when_lost(proto)
            proto.send(b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 0\r\n\r\n")
            (reason,) = await lost.addTimeout(10, reactor)  # verification fails: the client drops the connection
            # Why: service-identity's name mismatch.
            self.assertTrue(reason.check(VerificationError), reason)
            self.assertIn("DNSMismatch", str(reason.value))
            self.assertFalse(self.controller.received.called)
            self.flushLoggedErrors(VerificationError)
            await self.close_all(proto)

        return defer.Deferred.fromCoroutine(run())
