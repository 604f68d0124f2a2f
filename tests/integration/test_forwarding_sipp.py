"""The seed's forwarding flows (001 lines 3584-3681) end to end, SIPp playing phones A, B and C."""

import json

from tests.integration.harness import ServerProcess, free_port
from tests.integration.test_proxy_sipp import PASSWORDS, CallTestCase

PASSWORDS.setdefault("1003", "pw-1003")


class ForwardingFlowTests(CallTestCase):
    def forward(self, *args):
        self.server.admin("forward", "set", "1002", *args)

    def test_unconditional_reaches_c_with_diversion(self):
        c_port = free_port()
        self.register("1003", c_port)
        self.forward("--always", "1003")
        c = self.peer("target_unconditional.xml", port=c_port)
        self.call()
        self.assertPeerDone(c)

    def test_busy_b_then_c(self):
        b_port, c_port = free_port(), free_port()
        self.register("1002", b_port)
        self.register("1003", c_port)
        self.forward("--busy", "1003")
        b = self.peer("callee_busy.xml", port=b_port)
        c = self.peer("target_user-busy.xml", port=c_port)
        self.call()
        self.assertPeerDone(b)
        self.assertPeerDone(c)

    def test_no_answer_b_cancelled_then_c(self):
        b_port, c_port = free_port(), free_port()
        self.register("1002", b_port)
        self.register("1003", c_port)
        self.forward("--no-answer", "1003", "--after", "2")
        b = self.peer("callee_cancelled.xml", port=b_port)
        c = self.peer("target_no-answer.xml", port=c_port)
        self.call()
        self.assertPeerDone(b)
        self.assertPeerDone(c)

    def test_feature_codes_set_then_next_call_follows_then_clear(self):
        c_port = free_port()
        self.register("1003", c_port)
        # 1002 sets its own forwarding from its phone: *72 1003.
        self.call("caller_feature_code.xml", caller="1002", callee="*721003")
        (row,) = json.loads(self.server.admin("forward", "show", "1002", "--json").stdout)
        self.assertEqual(row["always"], "1003")
        c = self.peer("target_unconditional.xml", port=c_port)
        self.call()  # 1001 calls 1002, reaches 1003
        self.assertPeerDone(c)
        self.call("caller_feature_code.xml", caller="1002", callee="*73")
        (row,) = json.loads(self.server.admin("forward", "show", "1002", "--json").stdout)
        self.assertEqual(row["always"], "")

    def test_restart_keeps_forwarding(self):
        c_port = free_port()
        self.register("1003", c_port)
        self.forward("--always", "1003")
        self.server.stop()
        again = ServerProcess(port=self.server.port, state_dir=self.server.state_dir, admin_port=self.server.admin_port)
        again.start()
        self.addCleanup(again.stop)
        self.server = again
        c = self.peer("target_unconditional.xml", port=c_port)
        self.call()
        self.assertPeerDone(c)


class RedirectVariantTests(CallTestCase):
    config = '[forwarding]\nunconditional = "redirect"\n'

    def test_unconditional_answered_with_302(self):
        self.server.admin("forward", "set", "1002", "--always", "1003")
        self.call("caller_302.xml")


class RedirectServerTests(CallTestCase):
    config = "[forwarding]\nredirect = true\n"

    def test_300_lists_user_then_busy_target(self):
        # The busy target is registered: the 300 lists its contact, not its AoR (issue 20).
        self.register("1002", free_port())
        self.register("1003", free_port())
        self.server.admin("forward", "set", "1002", "--busy", "1003")
        self.call("caller_300.xml")
