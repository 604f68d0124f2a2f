"""The metrics collector on the in-memory server: label values stay bounded."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from plugins.metrics import MetricsFactory
from proxy.errors import ConfigError
from proxy.plugin import PluginContext
from tests.test_router import Net


def built_plugin(test):
    """The metrics plugin over the in-memory core of test_router, with a directory plugin beside it."""
    net = Net(test)
    context = PluginContext(clock=net.clock, reactor=net.clock, config=None, location=net.location,
                            counters=net.core.counters, plugins={"ldapdir": object()})
    plugin = MetricsFactory().build({"listen": ""}, context)
    plugin.event("directory_search", {"seconds": 0.01, "ok": True})
    return net, plugin


def exported_names(plugin) -> set[str]:
    text = generate_latest(plugin.registry).decode()
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


class CollectorTests(SynchronousTestCase):
    def test_unknown_methods_are_other_and_no_user_data_in_labels(self):
        net, plugin = built_plugin(self)
        net.server.requests["FOO-RANDOM-1"] += 3
        net.server.requests["INVITE"] += 1
        net.register("1002", ("192.0.2.11", 5060))
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


class DashboardTests(SynchronousTestCase):
    def test_dashboard_uses_only_exported_metric_names(self):
        import json
        import os
        import re

        path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "etc", "grafana-sipproxy.json")
        with open(path) as f:
            dashboard = json.load(f)
        names = set()
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                names.update(re.findall(r"\b(sipproxy_[a-z_]+|process_[a-z_]+)", target["expr"]))
        net, plugin = built_plugin(self)
        # Something in every counter, so that every labelled family has samples to scrape.
        net.server.requests["INVITE"] += 1
        net.core.replies.replies[("INVITE", 200)] += 1
        net.server.dropped["malformed"] += 1
        net.register("1002", ("192.0.2.11", 5060))
        net.core.registrar.results["ok"] = 1
        net.auth.failures_by_reason["wrong_password"] = 1
        net.router.targets.forwards["user-busy"] = 1
        net.router.redirect.redirects[302] = 1
        net.core.checksync.notifies["accepted"] = 1
        exported = exported_names(plugin)
        self.assertEqual(names - exported, set())
        self.assertGreater(len(dashboard["panels"]), 10)


class ZeroSeriesTests(SynchronousTestCase):
    def test_every_known_labelled_series_exists_at_zero_before_any_event(self):
        from plugins.metrics.exporter import KNOWN_LABELS

        net, plugin = built_plugin(self)
        text = generate_latest(plugin.registry).decode()
        samples = {(s.name, tuple(s.labels.values())): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        gauges = {"sipproxy_calls"}
        for name, values in KNOWN_LABELS.items():
            for value in values:
                key = (name if name in gauges else name + "_total", (value,))
                self.assertIn(key, samples)
                self.assertEqual(samples[key], 0)


class SharedStateSeriesTests(SynchronousTestCase):
    def test_the_redis_store_and_srst_series_appear_when_they_run(self):
        net, _ = built_plugin(self)
        extra = {"location_store": {"disconnected": 1, "outages": 2, "failed_commands": 5, "write_failures": 3,
                                    "not_replicated": 0, "degraded": 4, "replicas": 1, "resyncs": 2},
                 "srst": {"changes_sent": 7, "changes_applied": 9, "resyncs": 1, "refused": 2, "peers_up": 1,
                          "peers": 1, "backlog": 7}}
        context = PluginContext(clock=net.clock, reactor=net.clock, config=None, location=net.location,
                                counters=lambda: {**net.core.counters(), **extra}, plugins={})
        plugin = MetricsFactory().build({"listen": ""}, context)
        text = generate_latest(plugin.registry).decode()
        samples = {(s.name, tuple(s.labels.values())): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        self.assertEqual(samples[("sipproxy_location_store_up", ())], 0)
        self.assertEqual(samples[("sipproxy_location_store_events_total", ("degraded",))], 4)
        self.assertEqual(samples[("sipproxy_srst_changes_total", ("applied",))], 9)
        self.assertEqual(samples[("sipproxy_srst_peers_up", ())], 1)
        self.assertEqual(samples[("sipproxy_srst_refused_total", ())], 2)
        without = {s.name for family in text_string_to_metric_families(
            generate_latest(built_plugin(self)[1].registry).decode()) for s in family.samples}
        self.assertFalse({n for n in without if n.startswith(("sipproxy_srst", "sipproxy_location_store"))})
