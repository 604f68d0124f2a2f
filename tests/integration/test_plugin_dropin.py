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
        with open(self.events) as f:
            self.assertIn("registration_added", f.read().split())

    def test_policy_blocks_a_number(self):
        self.call("caller_403.xml", callee="9005551234")
        self.assertIn("rejected by policy: 403 Number blocked", self.server.log())


class FailingDropinTests(DropinTests):
    fail_in = '["event"]'

    def test_hooks_are_called(self):
        # The plugin raises in every event: registration still works, and the log names the plugin.
        self.register("1002", free_port())
        self.assertIn("Plugin hello failed in event registration_added", self.server.log())

    def test_policy_blocks_a_number(self):
        self.call("caller_403.xml", callee="9005551234")
