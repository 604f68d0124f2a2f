"""A third-party plugin installed as a twisted.plugins dropin, in the real server."""

import os
import tempfile

from tests.integration.harness import REPO, free_port
from tests.integration.test_proxy_sipp import CallTestCase

EXAMPLE = os.path.join(REPO, "docs", "examples", "sipproxy-hello")


class DropinTests(CallTestCase):
    fail_in = "[]"
    pythonpath = (EXAMPLE,)  # as if the example package were installed

    def setUp(self):
        self.events = os.path.join(tempfile.mkdtemp(), "events.txt")
        self.config = ('[plugins]\nenabled = ["hello"]\n[plugins.hello]\n'
                       f'events_file = "{self.events}"\nblocked = ["900"]\nfail_in = {self.fail_in}\n')
        super().setUp()

    def test_hooks_are_called(self):
        self.register("1002", free_port())
        # With workers the event is heard in the primary, a moment after the phone has its 200.
        self.assertIn("registration_added", eventually(lambda: _read(self.events)).split())

    def test_policy_blocks_a_number(self):
        self.call("caller_403.xml", callee="9005551234")
        self.assertIn("rejected by policy: 403 Number blocked", self.server.log())


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def eventually(probe, timeout: float = 5.0):
    """What `probe()` returns once it is something (or its last answer after `timeout`)."""
    import time

    deadline = time.monotonic() + timeout
    value = probe()
    while not value and time.monotonic() < deadline:
        time.sleep(0.05)
        value = probe()
    return value or ""


class FailingDropinTests(DropinTests):
    fail_in = '["event"]'

    def test_hooks_are_called(self):
        # The plugin raises in every event: registration still works, and the log names the plugin.
        self.register("1002", free_port())
        self.assertIn("Plugin hello failed in event registration_added",
                      eventually(lambda: "Plugin hello failed" in self.server.log() and self.server.log()))

    def test_policy_blocks_a_number(self):
        self.call("caller_403.xml", callee="9005551234")
