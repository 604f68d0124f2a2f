"""Metrics after real traffic: SIPp registers a phone and makes a call; /metrics must count exactly that."""

import os
import shutil
import subprocess
import urllib.error
import urllib.request

from twisted.trial.unittest import SkipTest

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import free_port
from tests.integration.test_proxy_sipp import CallTestCase


def scrape(url: str, token: str | None = None) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsTests(CallTestCase):
    def setUp(self):
        self.metrics_port = free_port()
        self.config = f'[plugins]\nenabled = ["metrics"]\n[plugins.metrics]\nlisten = "tcp:{self.metrics_port}:interface=127.0.0.1"\n'
        super().setUp()

    def admin_scrape(self, token=True):
        with open(os.path.join(self.server.state_dir, "metrics-token")) as f:
            secret = f.read().strip()
        return scrape(f"http://127.0.0.1:{self.server.admin_port}/metrics", secret if token else None)

    def test_counters_move_by_exactly_the_traffic(self):
        before = self.admin_scrape()
        port = free_port()
        self.register("1002", port)                 # REGISTER -> 401, REGISTER -> 200
        callee = self.peer("callee.xml", port=port)
        self.call()                                 # INVITE -> 407 (stateless), ACK, INVITE -> 100, 180, 200, ACK, BYE -> 200
        self.assertPeerDone(callee)
        after = self.admin_scrape()

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(moved("sipproxy_requests_total", method="REGISTER"), 2)
        self.assertEqual(moved("sipproxy_requests_total", method="INVITE"), 2)
        self.assertEqual(moved("sipproxy_requests_total", method="ACK"), 2)
        self.assertEqual(moved("sipproxy_requests_total", method="BYE"), 1)
        self.assertEqual(moved("sipproxy_replies_total", method="REGISTER", code="401"), 1)
        self.assertEqual(moved("sipproxy_replies_total", method="REGISTER", code="200"), 1)
        self.assertEqual(moved("sipproxy_replies_total", method="INVITE", code="407"), 1)
        self.assertEqual(moved("sipproxy_replies_total", method="INVITE", code="100"), 1)
        self.assertEqual(moved("sipproxy_replies_total", method="INVITE", code="180"), 1)
        self.assertEqual(moved("sipproxy_replies_total", method="INVITE", code="200"), 1)
        self.assertEqual(moved("sipproxy_replies_total", method="BYE", code="200"), 1)
        self.assertEqual(moved("sipproxy_registrations_total", result="challenged"), 1)
        self.assertEqual(moved("sipproxy_registrations_total", result="ok"), 1)
        self.assertEqual(moved("sipproxy_auth_challenges_total"), 2)
        self.assertEqual(moved("sipproxy_calls_completed_total", result="answered"), 1)
        self.assertEqual(moved("sipproxy_call_setup_seconds_count"), 1)
        self.assertEqual(value(after, "sipproxy_registered_contacts"), 1)
        self.assertEqual(value(after, "sipproxy_registered_aors"), 1)
        self.assertEqual(value(after, "sipproxy_phones", firmware="8.0"), 1)
        self.assertEqual(value(after, "sipproxy_calls", state="setup"), 0)
        self.assertEqual(value(after, "sipproxy_build_info", version="0.1.0"), 1)
        self.assertGreater(value(after, "process_cpu_seconds_total"), 0)

    def test_admin_site_needs_the_token_own_listener_does_not(self):
        with self.assertRaises(urllib.error.HTTPError) as raised:
            self.admin_scrape(token=False)
        self.assertEqual(raised.exception.code, 401)
        samples = scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")
        self.assertIn(("sipproxy_build_info", (("version", "0.1.0"),)), samples)

    def test_the_metrics_token_opens_metrics_and_nothing_else(self):
        with open(os.path.join(self.server.state_dir, "metrics-token")) as f:
            secret = f.read().strip()
        self.assertIn(("sipproxy_build_info", (("version", "0.1.0"),)), self.admin_scrape())
        request = urllib.request.Request(f"http://127.0.0.1:{self.server.admin_port}/api/registrations",
                                         headers={"Authorization": f"Bearer {secret}"})
        with self.assertRaises(urllib.error.HTTPError) as raised:
            urllib.request.urlopen(request, timeout=10)
        self.assertEqual(raised.exception.code, 401)

    def test_auth_failures_and_drops_are_counted(self):
        before = self.admin_scrape()
        from tests.integration.harness import run_sipp

        run_sipp("register_refused.xml", self.server.port, injection=[("1002", "localhost", "3600")],
                 extra=["-au", "1002", "-ap", "wrong"])
        import socket

        import time

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x00garbage", ("127.0.0.1", self.server.port))
        deadline = time.monotonic() + 5  # the datagram and the scrape race: look again until it is counted
        while True:
            after = self.admin_scrape()
            if value(after, "sipproxy_messages_dropped_total", reason="malformed") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertEqual(value(after, "sipproxy_auth_failures_total", reason="wrong_password")
                         - value(before, "sipproxy_auth_failures_total", reason="wrong_password"), 1)
        self.assertEqual(value(after, "sipproxy_messages_dropped_total", reason="malformed")
                         - value(before, "sipproxy_messages_dropped_total", reason="malformed"), 1)


class PromtoolTests(MetricsTests):
    """On two processes: the counts above are still exact (the scrape waits for the worker's counters), and a
    real scrape after real traffic passes Prometheus's own linter (`promtool check metrics`)."""

    server_extra = "workers = 2\n"

    def test_promtool_accepts_the_exposition(self):
        promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
        if promtool is None:
            if os.environ.get("CI") == "true":
                raise AssertionError("promtool is not installed; .ci/run must provide it (PROMTOOL=...)")
            raise SkipTest("promtool is not installed (Debian: prometheus)")
        port = free_port()
        self.register("1002", port)
        callee = self.peer("callee.xml", port=port)
        self.call()
        self.assertPeerDone(callee)
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            text = response.read()
        self.assertIn(b'sipproxy_requests_total{method="INVITE"}', text)
        result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, b""))
