import os

from twisted.trial.unittest import SynchronousTestCase

from proxy.config import ListenerConfig, load_config, parse_config
from proxy.errors import ConfigError

SAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "etc", "sipproxy.toml")


class ConfigTests(SynchronousTestCase):
    def test_sample_config_is_valid_and_equals_defaults(self):
        import attrs

        config = load_config(SAMPLE)
        defaults = load_config(None)
        # The sample's state_dir = "state" means etc/state: relative to the file, not to the working directory.
        self.assertEqual(config.server.state_dir, os.path.join(os.path.dirname(os.path.abspath(SAMPLE)), "state"))
        self.assertEqual(attrs.evolve(config.server, state_dir="state"), defaults.server)
        self.assertEqual(config.timers, defaults.timers)

    def test_relative_paths_are_relative_to_the_config_file(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "site.toml")
        with open(path, "w") as f:
            f.write('[server]\nstate_dir = "var/state"\n[checksync]\ntftp_root = "tftp"\n')
        os.makedirs(os.path.join(directory, "tftp"))
        config = load_config(path)
        self.assertEqual(config.server.state_dir, os.path.join(directory, "var", "state"))
        self.assertEqual(config.checksync.tftp_root, os.path.join(directory, "tftp"))

    def error(self, data):
        return self.assertRaises(ConfigError, parse_config, data, "site.toml")

    def test_unknown_key_names_file_and_key(self):
        e = self.error({"timers": {"t3": 1}})
        self.assertEqual(str(e), "site.toml: timers.t3: unknown key")

    def test_unknown_section(self):
        self.assertEqual(self.error({"sever": {}}).key, "sever")

    def test_wrong_type(self):
        self.assertEqual(str(self.error({"timers": {"t1": "fast"}})), "site.toml: timers.t1: must be a number")

    def test_out_of_range(self):
        e = self.error({"timers": {"t1": 0}})
        self.assertEqual(e.reason, "must be a number greater than 0")
        e = self.error({"timers": {"t1": 5, "t2": 4}})
        self.assertEqual(e.key, "timers.t2")

    def test_workers(self):
        from proxy.service import worker_count

        self.assertEqual(parse_config({}, "site.toml").server.workers, 0)  # "auto"
        self.assertEqual(parse_config({"server": {"workers": "auto"}}, "site.toml").server.workers, 0)
        self.assertEqual(parse_config({"server": {"workers": 3}}, "site.toml").server.workers, 3)
        for bad in (0, 65, "many", True, 1.5):
            e = self.error({"server": {"workers": bad}})
            self.assertEqual(e.key, "server.workers")
        self.assertIn('"auto"', self.error({"server": {"workers": 0}}).reason)
        auto = parse_config({}, "site.toml")
        self.assertEqual(worker_count(auto), os.cpu_count() or 1)
        tcp_only = parse_config({"server": {"listen": ["tcp:5060"], "workers": 4}}, "site.toml")
        self.assertEqual(worker_count(tcp_only), 1)  # workers share UDP sockets; streams stay with the primary

    def test_a_route_may_set_its_failover_time(self):
        routes = {"routes": [{"pattern": "9[0-9]+", "gateways": ["192.0.2.20"], "failover_after": 2}]}
        self.assertEqual(parse_config(routes, "site.toml").routes[0].failover_after, 2.0)
        self.assertIsNone(parse_config({"routes": [{"pattern": "9", "gateways": ["g"]}]}, "site.toml")
                          .routes[0].failover_after)
        routes["routes"][0]["failover_after"] = -1
        self.assertEqual(self.error(routes).key, "routes[0].failover_after")

    def test_bad_listener(self):
        e = self.error({"server": {"listen": ["sctp:5060"]}})
        self.assertEqual(e.key, "server.listen")
        self.assertIn("sctp", e.reason)

    def test_listeners(self):
        self.assertEqual(ListenerConfig.parse("udp:5070:interface=127.0.0.1"),
                         ListenerConfig("UDP", 5070, "127.0.0.1", "udp:5070:interface=127.0.0.1"))
        tls = ListenerConfig.parse("ssl:5061:privateKey=k.pem:certKey=c.pem")
        self.assertEqual((tls.transport, tls.port), ("TLS", 5061))

    def test_unreadable_and_bad_toml(self):
        e = self.assertRaises(ConfigError, load_config, "/nonexistent/sipproxy.toml")
        self.assertIn("cannot read", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[server\n")
        e = self.assertRaises(ConfigError, load_config, path)
        self.assertIn("not valid TOML", str(e))


class AdminListenTests(SynchronousTestCase):
    def error(self, admin):
        return self.assertRaises(ConfigError, parse_config, {"admin": admin}, "site.toml")

    def test_loopback_listeners_are_accepted(self):
        for listen in ("tcp:8060:interface=127.0.0.1", r"tcp6:8060:interface=\:\:1", "unix:/run/sipproxy/admin",
                       "tcp:8060:interface=127.0.0.2"):
            with self.subTest(listen):
                self.assertEqual(parse_config({"admin": {"listen": listen}}, "site.toml").admin.listen, listen)

    def test_any_other_interface_is_refused_with_the_key_and_why(self):
        for listen in ("tcp:8060", "tcp:8060:interface=0.0.0.0", "tcp:8060:interface=192.0.2.1", r"tcp6:8060"):
            with self.subTest(listen):
                e = self.error({"listen": listen})
                self.assertEqual(e.key, "admin.listen")
                self.assertIn("allow_remote", e.reason)

    def test_remote_needs_allow_remote_and_tls(self):
        e = self.error({"listen": "tcp:8060:interface=192.0.2.1", "allow_remote": True})
        self.assertEqual(e.key, "admin.allow_remote")
        self.assertIn("TLS", e.reason)
        listen = "ssl:8060:interface=192.0.2.1:privateKey=key.pem:certKey=cert.pem"
        config = parse_config({"admin": {"listen": listen, "allow_remote": True}}, "site.toml")
        self.assertTrue(config.admin.allow_remote)

    def test_new_auth_limits_are_checked(self):
        e = self.assertRaises(ConfigError, parse_config, {"auth": {"max_tracked": 5}}, "site.toml")
        self.assertEqual(e.key, "auth.max_tracked")
        config = parse_config({"auth": {"slow_max_failures": 20, "slow_window": 1800}}, "site.toml")
        self.assertEqual((config.auth.slow_max_failures, config.auth.slow_window), (20, 1800.0))


class AdvertisedAddressTests(SynchronousTestCase):
    """Issue 20: never advertise loopback to phones by accident (Debian resolves the hostname to 127.0.1.1)."""

    LOOPBACK_ONLY = frozenset({"127.0.0.1", "127.0.1.1", "::1"})

    def advertised(self, data, addresses, route):
        from proxy.core import _advertised

        return _advertised(parse_config(data, "site.toml"), addresses, lambda: route)

    def test_no_routable_address_and_public_listeners_stops_startup_saying_what_to_set(self):
        e = self.assertRaises(ConfigError, self.advertised, {}, self.LOOPBACK_ONLY, None)
        self.assertEqual(e.key, "proxy.advertise")
        self.assertIn("the address the phones reach this proxy at", e.reason)

    def test_loopback_only_listeners_may_advertise_loopback(self):
        data = {"server": {"listen": ["udp:5060:interface=127.0.0.1", "tcp:5060:interface=127.0.0.1"]}}
        self.assertEqual(self.advertised(data, self.LOOPBACK_ONLY, None)[0], "127.0.0.1")

    def test_the_default_route_address_is_chosen_and_the_choice_is_explained(self):
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            host, ports = self.advertised({}, self.LOOPBACK_ONLY | {"10.1.2.3", "192.168.7.7"}, "192.168.7.7")
        self.assertEqual((host, ports), ("192.168.7.7", {"UDP": 5060, "TCP": 5060}))
        (event,) = [e for e in events if "default route" in e["log_format"]]
        self.assertEqual((event["address"], event["others"]), ("192.168.7.7", "; this host also has 10.1.2.3"))

    def test_an_explicit_setting_wins(self):
        self.assertEqual(self.advertised({"proxy": {"advertise": "198.51.100.5:5070"}}, self.LOOPBACK_ONLY, None),
                         ("198.51.100.5", {"UDP": 5070, "TCP": 5060}))
