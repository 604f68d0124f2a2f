"""The plugin framework: discovery (first party and dropins), config checks, guarded calls, policy in the router."""

import os
import sys

import twisted.plugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from proxy.errors import ConfigError
from proxy.plugin import (
    Continue,
    IEventObserver,
    IProxyPlugin,
    IRequestPolicy,
    PluginHost,
    Respond,
    find_factories,
    resolve,
)

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "examples", "sipproxy-hello")


def with_example_dropin(test):
    """Put the example third-party package on the path, as an install would."""
    path = os.path.abspath(EXAMPLE)
    sys.path.insert(0, path)
    twisted.plugins.__path__.insert(0, os.path.join(path, "twisted", "plugins"))
    test.addCleanup(sys.path.remove, path)
    test.addCleanup(twisted.plugins.__path__.remove, os.path.join(path, "twisted", "plugins"))


@implementer(IProxyPlugin, IEventObserver, IRequestPolicy)
class Scripted:
    def __init__(self, name, verdict=Continue(), fail=False):
        self.name = name
        self.verdict = verdict
        self.fail = fail
        self.events = []

    def event(self, name, fields):
        if self.fail:
            raise RuntimeError("boom")
        self.events.append(name)

    def check_request(self, request, source, user):
        if self.fail:
            raise RuntimeError("boom")
        return self.verdict


class DiscoveryTests(SynchronousTestCase):
    def test_first_party_and_dropin_found(self):
        with_example_dropin(self)
        factories = find_factories()
        self.assertIn("ldapdir", factories)
        self.assertIn("hello", factories)

    def test_resolve_checks_names_and_tables(self):
        with_example_dropin(self)
        (enabled,) = resolve(("hello",), {"hello": {"blocked": ["900"]}}, "site.toml")
        self.assertEqual(enabled.config["blocked"], ("900",))
        e = self.assertRaises(ConfigError, resolve, ("nosuch",), {}, "site.toml")
        self.assertIn("no plugin called 'nosuch'", str(e))
        e = self.assertRaises(ConfigError, resolve, ("hello",), {"hello": {"colour": 1}}, "site.toml")
        self.assertEqual(str(e), "site.toml: plugins.hello.colour: unknown key")
        e = self.assertRaises(ConfigError, resolve, (), {"hello": {}}, "site.toml")
        self.assertIn("configured but not in plugins.enabled", str(e))

    def test_ldapdir_config_errors_name_the_key(self):
        e = self.assertRaises(ConfigError, resolve, ("ldapdir",), {"ldapdir": {"urls": ["ldap://x"]}}, "s.toml")
        self.assertEqual(str(e), "s.toml: plugins.ldapdir.base_dn: required when urls are set")
        e = self.assertRaises(ConfigError, resolve, ("ldapdir",), {"ldapdir": {"timeout": -1}}, "s.toml")
        self.assertIn("plugins.ldapdir.timeout", str(e))


class HostTests(SynchronousTestCase):
    def test_failing_event_hook_is_logged_and_others_still_called(self):
        host = PluginHost()
        bad, good = Scripted("bad", fail=True), Scripted("good")
        host.add(bad)
        host.add(good)
        host.emit("registration_added", binding=None)
        self.assertEqual(good.events, ["registration_added"])
        self.assertEqual(host.failures, {"bad": 1})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_policy_order_and_fail_closed(self):
        host = PluginHost()
        host.add(Scripted("first"))
        host.add(Scripted("second", verdict=Respond(403, "No")))
        self.assertEqual(host.check_request(None, None, None), Respond(403, "No"))
        broken = PluginHost()
        broken.add(Scripted("broken", fail=True))
        self.assertEqual(broken.check_request(None, None, None), Respond(500, "Policy Failure"))
        self.flushLoggedErrors(RuntimeError)
        odd = PluginHost()
        odd.add(Scripted("odd", verdict=403))
        self.assertEqual(odd.check_request(None, None, None), Respond(500, "Policy Failure"))


class RouterPolicyTests(SynchronousTestCase):
    def setUp(self):
        from tests.test_router import Net

        self.net = Net(self)
        self.net.register("1002", ("192.0.2.11", 5060))
        self.host = PluginHost()
        self.net.router.plugins = self.host

    def test_policy_rejects_with_its_code(self):
        self.host.add(Scripted("deny", verdict=Respond(403, "Number blocked")))
        sent = self.net.invite()
        self.assertEqual((sent[-1][0].status, sent[-1][0].reason), (403, "Number blocked"))

    def test_raising_policy_fails_closed_with_500(self):
        self.host.add(Scripted("broken", fail=True))
        self.assertEqual(self.net.invite()[-1][0].status, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_emergency_calls_skip_policies(self):
        self.host.add(Scripted("deny", verdict=Respond(403, "No")))
        sent = self.net.invite(to="911", auth=False)
        self.assertEqual([m.method for m, _ in sent if hasattr(m, "method")], ["INVITE"])
