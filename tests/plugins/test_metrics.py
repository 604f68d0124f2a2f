"""The metrics collector on the in-memory server: label values stay bounded."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from plugins.metrics import MetricsFactory
from proxy.errors import ConfigError
from proxy.plugin import PluginContext
from tests.test_router import Net


class CollectorTests(SynchronousTestCase):
    def test_unknown_methods_are_other_and_no_user_data_in_labels(self):
        net = Net(self)
        net.server.requests["FOO-RANDOM-1"] += 3
        net.server.requests["INVITE"] += 1
        net.register("1002", ("192.0.2.11", 5060))
        from proxy.checksync import CheckSync

        context = PluginContext(clock=net.clock, reactor=net.clock, config=None, server=net.server,
                                location=net.location, router=net.router, registrar=type("R", (), {"results": {}})(),
                                authenticator=net.auth,
                                checksync=CheckSync(net.clock, net.server, net.location, advertise=("192.0.2.1", 5060)))
        plugin = MetricsFactory().build({"listen": ""}, context)
        text = generate_latest(plugin.registry).decode()
        labels = set()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if family.name == "sipproxy_requests":
                    labels.add(sample.labels["method"])
                self.assertNotIn("1002", str(sample.labels))
                self.assertNotIn("192.0.2.11", str(sample.labels))
        self.assertEqual(labels, {"other", "INVITE"})

    def test_config_is_checked(self):
        self.assertRaises(ConfigError, MetricsFactory().parse_config, {"port": 1}, "s.toml")
        self.assertRaises(ConfigError, MetricsFactory().parse_config, {"listen": "udp:9"}, "s.toml")
