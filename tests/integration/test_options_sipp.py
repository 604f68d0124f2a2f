"""The real server under twistd answers SIPp's OPTIONS over UDP and TCP."""

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import ServerProcess, options_probe, run_sipp, sipp_errors


class OptionsWithSippTests(SynchronousTestCase):
    def setUp(self):
        # Per test, not setUpClass: trial does not run class fixtures.
        self.server = ServerProcess().start()
        self.addCleanup(self.server.stop)

    def check(self, transport):
        result = run_sipp("options.xml", self.server.port, transport=transport, calls=5)
        self.assertEqual(result.returncode, 0, sipp_errors(result))

    def test_udp(self):
        self.check("u1")

    def test_tcp(self):
        self.check("t1")

    def test_garbage_does_not_stop_the_server(self):
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for junk in (b"\x00" * 100, b"INVITE\r\n\r\n", b"SIP/2.0 999\r\n\r\n", b"x" * 60000):
                s.sendto(junk, ("127.0.0.1", self.server.port))
        self.assertIsNotNone(options_probe(self.server.port, timeout=2))
