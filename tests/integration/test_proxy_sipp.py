"""Calls through the real proxy, with SIPp playing the phones and gateways."""

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import ServerProcess, SippPeer, free_port, run_sipp, sipp_errors

PASSWORDS = {"1001": "pw-1001", "1002": "pw-1002"}


class CallTestCase(SynchronousTestCase):
    config = ""

    def setUp(self):
        self.server = ServerProcess(self.config)
        for user, password in PASSWORDS.items():
            self.server.admin("user", "add", user, "--password", password)
        self.server.start()
        self.addCleanup(self.server.stop)

    def register(self, user, port):
        result = run_sipp("register.xml", self.server.port, injection=[(user, "localhost", "3600")], local_port=port,
                          extra=["-au", user, "-ap", PASSWORDS[user]])
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-2000:])

    def peer(self, scenario, port=None, **kwargs):
        peer = SippPeer(scenario, self.server.port, port=port, **kwargs)
        self.addCleanup(peer.stop)
        return peer

    def call(self, scenario="caller.xml", callee="1002", caller="1001", expect_ok=True, extra=()):
        result = run_sipp(scenario, self.server.port, injection=[(caller, callee, "localhost")],
                          extra=["-au", caller, "-ap", PASSWORDS[caller], *extra], timeout=20)
        if expect_ok:
            self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-4000:])
        return result

    def assertPeerDone(self, peer):
        self.assertEqual(peer.wait(), 0, peer.errors() + self.server.log()[-4000:])


class BasicCallTests(CallTestCase):
    def test_call_with_407_ringing_answer_ack_bye(self):
        port = free_port()
        self.register("1002", port)
        callee = self.peer("callee.xml", port=port)
        self.call()
        self.assertPeerDone(callee)
