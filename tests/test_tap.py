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
        top, server = build_service(config, reactor, options["plugins"])
        verifyObject(IService, top)
        # location sweeper, the directory's thread pool, phone web, admin API, udp:5060, tcp:5060
        self.assertEqual(len(list(top)), 6)
        self.assertEqual([p.name for p in server.components["plugins"].plugins], ["ldapdir"])
        top.startService()
        self.assertEqual([(p[0], p[3]) for p in reactor.udpServers], [(5060, 65535)])
        self.assertEqual(sorted(p[0] for p in reactor.tcpServers if p[1] is not None), [5060, 8060, 8081])
        self.assertIn("REGISTER", server.handlers)
        top.stopService()
