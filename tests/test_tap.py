import os

import attrs

from twisted.application.service import IServiceMaker, IService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from proxy import tap
from proxy.service import build_service

class UdpMemoryReactor(MemoryReactorClock):
    """MemoryReactor has no IReactorUDP; record UDP listens the same way."""

    def __init__(self):
        super().__init__()
        self.udpServers = []

    def listenUDP(self, port, protocol, interface="", maxPacketSize=8192):
        self.udpServers.append((port, protocol, interface, maxPacketSize))
        return self.listenTCP(port, None, interface=interface)


SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "etc", "sipproxy.toml")


class TapTests(SynchronousTestCase):
    def test_dropin_is_found(self):
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "sipproxy"]
        self.assertEqual(len(makers), 1)
        verifyObject(IServiceMaker, makers[0])
        verifyObject(IPlugin, makers[0])

    def test_options_report_bad_config_before_start(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[timers]\nt1 = -1\n")
        options = tap.Options()
        e = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertEqual(str(e), f"{path}: timers.t1: must be a number greater than 0")

    def test_builds_service_from_sample(self):
        options = tap.Options()
        options.parseOptions(["--config", SAMPLE])
        config = options["proxy_config"]
        config = attrs.evolve(config, server=attrs.evolve(config.server, state_dir=self.mktemp()))
        reactor = UdpMemoryReactor()
        top, core = build_service(config, reactor, options["plugins"])
        verifyObject(IService, top)
        # location sweeper, the directory's thread pool, phone web, admin API, udp:5060, tcp:5060
        self.assertEqual(len(list(top)), 6)
        self.assertEqual([p.name for p in core.plugins.plugins], ["ldapdir"])
        top.startService()
        self.assertEqual([(p[0], p[3]) for p in reactor.udpServers], [(5060, 65535)])
        self.assertEqual(sorted(p[0] for p in reactor.tcpServers if p[1] is not None), [5060, 8060, 8081])
        self.assertIn("REGISTER", core.dispatcher.methods)
        top.stopService()


class DamagedStateTests(SynchronousTestCase):
    """Issue 12: a damaged state file stops startup with its path and the reason; nothing reads as empty."""

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.state = os.path.join(self.dir, "state")
        os.makedirs(self.state)
        self.config = os.path.join(self.dir, "sipproxy.toml")
        with open(self.config, "w") as f:
            f.write(f'[server]\nstate_dir = "{self.state}"\nlisten = ["udp:0:interface=127.0.0.1"]\n')

    def write(self, name, data: bytes):
        with open(os.path.join(self.state, name), "wb") as f:
            f.write(data)

    def refused(self):
        return self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", self.config])

    def test_users_file_garbage_or_empty(self):
        for data in (b"", b"\x00\xffgarbage", b'{"users": [1, 2]}', b'{"version": 1, "users": {"1001": {}}}'):
            with self.subTest(data=data):
                self.write("users.json", data)
                error = str(self.refused())
                self.assertIn(os.path.join(self.state, "users.json"), error)
                self.assertIn("restore it", error)

    def test_a_damaged_users_file_with_a_last_good_copy_serves_that_copy_and_says_so(self):
        from twisted.internet.task import Clock
        from twisted.logger import capturedLogs

        from proxy.registration.credentials import FileCredentials, UserRecord, locked_users

        path = os.path.join(self.state, "users.json")
        with locked_users(path) as users:
            users["1001"] = UserRecord("1001", "example.com", "0" * 32)
        self.write("users.json", b"{ half a file")
        options = tap.Options()
        options.parseOptions(["--config", self.config])  # starts
        with capturedLogs() as events:
            credentials = FileCredentials(path, Clock())
        self.assertIsNotNone(credentials.lookup("1001"))
        self.assertTrue(any("last good copy" in (e.get("problem") or "") for e in events))

    def test_location_database_empty_or_garbage(self):
        for data in (b"", b"SQLite format 3\x00" + b"\xff" * 200, b"not a database at all" * 50):
            with self.subTest(data=data[:20]):
                self.write("location.sqlite", data)
                error = str(self.refused())
                self.assertIn(os.path.join(self.state, "location.sqlite"), error)

    def test_route_keys_damaged(self):
        self.write("route-keys", b"# nothing but a comment\n")
        self.assertIn("route-keys", str(self.refused()))

    def test_a_fresh_state_directory_starts(self):
        tap.Options().parseOptions(["--config", self.config])

    def test_an_unwritable_state_directory_stops_startup(self):
        blocker = os.path.join(self.dir, "not-a-directory")
        open(blocker, "w").close()
        with open(self.config, "w") as f:
            f.write(f'[server]\nstate_dir = "{blocker}/state"\nlisten = ["udp:0:interface=127.0.0.1"]\n')
        error = str(self.refused())
        self.assertIn("server.state_dir", error)
        self.assertIn("writable directory", error)

    def test_a_busy_port_stops_startup_naming_the_listener(self):
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
            busy.bind(("127.0.0.1", 0))
            port = busy.getsockname()[1]
            with open(self.config, "w") as f:
                f.write(f'[server]\nstate_dir = "{self.state}"\nlisten = ["udp:{port}:interface=127.0.0.1"]\n')
            error = str(self.refused())
        self.assertIn(f"server.listen: udp:{port}:interface=127.0.0.1: cannot listen on 127.0.0.1 port {port}", error)
        self.assertIn("another program listens there", error)


class TlsStartupTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "sipproxy.toml")

    def refused(self, text):
        with open(self.config, "w") as f:
            f.write(f'[server]\nstate_dir = "state"\nlisten = ["udp:0:interface=127.0.0.1"]\n{text}')
        return str(self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", self.config]))

    def test_a_ca_file_that_is_not_pem_names_the_key(self):
        bad = os.path.join(self.dir, "ca.der")
        with open(bad, "wb") as f:
            f.write(b"\x30\x82\x01\x0a garbage")
        error = self.refused(f'[tls]\nca_file = "{bad}"\n')
        self.assertIn("tls.ca_file", error)
        self.assertIn("not a readable PEM file", error)

    def test_a_missing_key_file_names_the_listener(self):
        with open(self.config, "w") as f:
            f.write('[server]\nstate_dir = "state"\nlisten = ["udp:0:interface=127.0.0.1", '
                    '"ssl:0:interface=127.0.0.1:privateKey=nokey.pem:certKey=nocert.pem"]\n')
        error = str(self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", self.config]))
        self.assertIn("server.listen", error)
        self.assertIn("cannot load the key or certificate", error)
