"""Calls through the real proxy, with SIPp playing the phones and gateways."""

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import ServerProcess, SippPeer, free_port, run_sipp, sipp_errors

PASSWORDS = {"1001": "pw-1001", "1002": "pw-1002", "1003": "pw-1003"}


class CallTestCase(SynchronousTestCase):
    config = ""
    server_extra = ""  # more keys of [server] (test_workers_sipp.py: workers = 2)
    pythonpath: tuple[str, ...] = ()

    def setUp(self):
        self.server = ServerProcess(self.config, port=getattr(self, "port", None), pythonpath=self.pythonpath,
                                    server_extra=self.server_extra)
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

    def test_callee_hangs_up_through_record_route(self):
        port = free_port()
        self.register("1002", port)
        callee = self.peer("callee_hangs_up.xml", port=port)
        self.call("caller_waits_bye.xml")
        self.assertPeerDone(callee)

    def test_caller_cancels_while_ringing(self):
        port = free_port()
        self.register("1002", port)
        callee = self.peer("callee_cancelled.xml", port=port)
        self.call("caller_cancel.xml")
        self.assertPeerDone(callee)

    def test_fork_one_busy_one_answers(self):
        busy_port, answer_port = free_port(), free_port()
        self.register("1002", busy_port)
        self.register("1002", answer_port)
        busy = self.peer("callee_busy.xml", port=busy_port)
        answers = self.peer("callee.xml", port=answer_port)
        self.call()
        self.assertPeerDone(busy)
        self.assertPeerDone(answers)

    def test_open_relay_attempt_is_403(self):
        result = run_sipp("caller_relay.xml", self.server.port)
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-3000:])


class NoAnswerTests(CallTestCase):
    # T1 = 0.1 s: Timer B (64*T1) ends an unanswered INVITE in 6.4 s.
    config = "[timers]\nt1 = 0.1\nt2 = 0.4\n"

    def test_callee_never_answers_408(self):
        self.register("1002", free_port())  # registered, but nothing listens there any more
        self.call("caller_408.xml")


class GatewayTests(CallTestCase):
    def setUp(self):
        self.gw1, self.gw2 = free_port(), free_port()
        self.config = (
            "[[routes]]\n"
            'pattern = "9[0-9]+"\nstrip = 1\n'
            f'gateways = ["127.0.0.1:{self.gw1}", "127.0.0.1:{self.gw2}"]\n'
        )
        super().setUp()

    def test_failover_to_second_gateway_on_503(self):
        first = self.peer("gateway_503.xml", port=self.gw1)
        second = self.peer("callee.xml", port=self.gw2)
        self.call(callee="95551234")
        self.assertPeerDone(first)
        self.assertPeerDone(second)

    def test_a_silent_gateway_is_left_for_the_next_before_the_caller_gives_up(self):
        # The first gateway receives the INVITE and says nothing at all: after failover_after (4 s), not Timer B
        # (32 s), the call goes to the second. The caller's scenario gives up after 20 s.
        from tests.integration.sipua import UdpAgent

        silent = UdpAgent(self.server.port, self.gw1)
        self.addCleanup(silent.close)
        second = self.peer("callee.xml", port=self.gw2)
        self.call(callee="95551234")
        self.assertPeerDone(second)
        self.assertTrue(silent.receive(1, lambda t: t.startswith("INVITE sip:5551234@")))


class LoopTests(CallTestCase):
    def setUp(self):
        # A route whose gateway is the proxy itself: the request comes back unchanged.
        self.port = free_port()
        self.config = f'[[routes]]\npattern = "8[0-9]+"\ngateways = ["127.0.0.1:{self.port}"]\n'
        super().setUp()

    def test_loop_is_482(self):
        self.call("caller_482.xml", callee="8123")
