"""proxy/overload.py: each datagram judged by its own wait, on a Clock; who is refused, dropped, or never touched."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.overload import LoadShedder
from proxy.sip.wire import parse_message
from proxy.testing import make_core, sip_bytes, udp_source


def request(method="REGISTER", credentials=False, to_tag="", call_id="c1", branch=None):
    auth = "Proxy-Authorization" if method == "INVITE" else "Authorization"
    extra = f'\n        {auth}: Digest username="1001", realm="r", nonce="n", uri="sip:x", response="0"' \
        if credentials else ""
    branch = branch or f"z9hG4bK{method}{credentials}{to_tag}"
    return sip_bytes(f"""
        {method} sip:1002@example.com SIP/2.0
        Via: SIP/2.0/UDP 192.0.2.50:5060;branch={branch}
        Max-Forwards: 70
        From: <sip:1001@example.com>;tag=1
        To: <sip:1002@example.com>{';tag=' + to_tag if to_tag else ''}
        Call-ID: {call_id}
        CSeq: 1 {method}{extra}
    """)


class FakeCpu:
    """process_time for the shedder: busy for `share` of every second of the Clock."""

    def __init__(self, clock, share=1.0):
        self.clock, self.share = clock, share

    def __call__(self):
        return self.clock.seconds() * self.share


def busy_shedder(clock=None, busy=1.0, **kw):
    """Started, with threshold 0.1 s, after one tick of a process `busy` for that share of a core."""
    clock = clock or Clock()
    shedder = LoadShedder(clock, threshold=0.1, interval=0.05, smoothing=1.0, cpu_time=FakeCpu(clock, busy), **kw)
    shedder.start()
    clock.advance(0.05)
    return shedder


def screen(shedder, data, waited, known=()):
    shedder.queue_delay(waited)
    return shedder.screen(data, lambda branch: branch in known, lambda: "ourtag", "sipproxy")


class WaitTests(SynchronousTestCase):
    def test_on_time_nothing_is_refused(self):
        shedder = busy_shedder()
        self.assertIsNone(screen(shedder, request("REGISTER"), 0.02))
        self.assertIsNone(screen(shedder, request("INVITE"), 0.09))
        self.assertEqual((shedder.shed, shedder.level), ({}, 0))

    def test_a_new_register_that_waited_the_threshold_gets_a_spliced_503(self):
        shedder = busy_shedder()
        refusal = parse_message(screen(shedder, request("REGISTER"), 0.12))
        self.assertEqual((refusal.status, refusal.reason), (503, "Service Unavailable"))
        self.assertEqual(refusal.call_id, "c1")
        self.assertEqual(refusal.to.tag, "ourtag")
        self.assertEqual(refusal.from_.tag, "1")
        self.assertEqual(refusal.cseq.method, "REGISTER")
        self.assertEqual(refusal.top_via.branch, "z9hG4bKREGISTERFalse")
        self.assertTrue(10 <= int(refusal.headers.get("retry-after")) <= 20)
        self.assertEqual(refusal.headers.get("server"), "sipproxy")
        self.assertEqual(shedder.shed, {"register": 1})

    def test_invites_are_refused_only_once_the_caller_has_retransmitted(self):
        shedder = busy_shedder()
        # Past T1 (0.6 s) whatever the threshold of the others (0.1 s here): three thresholds would be 0.3 s,
        # a wait B2's calls see at capacity.
        self.assertIsNone(screen(shedder, request("INVITE"), 0.59))
        self.assertIsNotNone(screen(shedder, request("OPTIONS"), 0.29))
        self.assertEqual(parse_message(screen(shedder, request("INVITE"), 0.61)).status, 503)
        self.assertEqual(shedder.shed, {"other": 1, "invite": 1})
        self.assertAlmostEqual(LoadShedder(Clock(), threshold=0.3).invite_threshold, 0.9)  # past that, three thresholds

    def test_a_wait_on_an_idle_process_is_no_overload(self):
        shedder = busy_shedder(busy=0.3)  # a slow disk or a paused VM: refusing phones would not help
        self.assertIsNone(screen(shedder, request("REGISTER"), 0.3))

    def test_what_is_never_refused(self):
        shedder = busy_shedder()
        cases = {
            "register with credentials": request("REGISTER", credentials=True),
            "invite with credentials": request("INVITE", credentials=True),
            "re-INVITE (in a dialog)": request("INVITE", to_tag="x"),
            "BYE": request("BYE", to_tag="x"),
            "CANCEL": request("CANCEL"),
            "ACK": request("ACK", to_tag="x"),
            "a response": b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx\r\n\r\n",
            "folded lines": request("REGISTER").replace(b"\r\nTo:", b"\r\n To:"),
            "a mandatory line missing": request("REGISTER").replace(b"CSeq: 1 REGISTER\r\n", b""),
            "no end of headers": request("REGISTER").split(b"\r\n\r\n")[0],
        }
        for name, data in cases.items():
            with self.subTest(name):
                self.assertIsNone(screen(shedder, data, 0.35))
        self.assertEqual(shedder.shed, {})

    def test_a_retransmission_of_a_transaction_under_way_is_left_to_it(self):
        shedder = busy_shedder()
        data = request("INVITE", branch="z9hG4bKunderway")
        self.assertIsNone(screen(shedder, data, 0.65, known={"z9hG4bKunderway"}))
        self.assertIsNotNone(screen(shedder, data, 0.65))

    def test_far_behind_a_new_request_is_dropped_not_answered(self):
        shedder = busy_shedder()
        self.assertEqual(screen(shedder, request("REGISTER"), 0.41), b"")
        self.assertIsNone(screen(shedder, request("REGISTER", credentials=True), 0.41))  # still served
        self.assertEqual(shedder.shed, {"dropped": 1})

    def test_while_the_kernel_drops_half_the_threshold_is_enough(self):
        clock = Clock()
        shedder = busy_shedder(clock)
        shedder.kernel_dropped(40)  # the receive buffer was full: the wait is bounded by its size
        self.assertEqual(parse_message(screen(shedder, request("REGISTER"), 0.06)).status, 503)  # at once
        clock.advance(0.05)
        self.assertIsNone(screen(shedder, request("REGISTER"), 0.04))
        self.assertEqual(parse_message(screen(shedder, request("REGISTER"), 0.06)).status, 503)
        self.assertEqual(shedder.counters()["kernel_drops"], 40)
        clock.advance(0.05)  # a tick without drops
        self.assertIsNone(screen(shedder, request("REGISTER"), 0.06))


class AfterRefusalTests(SynchronousTestCase):
    def test_what_follows_a_503_is_dropped_before_parsing_and_then_forgotten(self):
        clock = Clock()
        shedder = busy_shedder(clock, remember=4.0)
        self.assertIsNotNone(screen(shedder, request("INVITE", call_id="refused"), 0.65))
        for method in ("ACK", "BYE"):
            self.assertEqual(screen(shedder, request(method, to_tag="ourtag", call_id="refused"), 0.0), b"")
        self.assertIsNone(screen(shedder, request("BYE", to_tag="x", call_id="another"), 0.0))
        self.assertEqual(shedder.shed, {"invite": 1, "after_refusal": 2})
        clock.pump([0.05] * 100)  # 5 s: still in the generation before
        self.assertEqual(screen(shedder, request("BYE", to_tag="ourtag", call_id="refused"), 0.0), b"")
        clock.pump([0.05] * 80)  # 9 s: forgotten
        self.assertIsNone(screen(shedder, request("BYE", to_tag="ourtag", call_id="refused"), 0.0))
        self.assertEqual(shedder.counters()["remembered"], 0)

    def test_memory_is_bounded_under_any_flood(self):
        shedder = busy_shedder(max_remembered=10)
        for n in range(50):
            self.assertIsNotNone(screen(shedder, request("REGISTER", call_id=f"c{n}"), 0.2))
        self.assertEqual(shedder.counters()["remembered"], 10)


class LevelTests(SynchronousTestCase):
    def test_level_follows_the_classes_refused_and_calms_after_a_second(self):
        clock = Clock()
        shedder = busy_shedder(clock)
        screen(shedder, request("REGISTER"), 0.2)
        clock.advance(0.05)
        self.assertEqual(shedder.level, 1)
        screen(shedder, request("INVITE"), 0.65)
        clock.advance(0.05)
        self.assertEqual(shedder.level, 2)
        clock.pump([0.05] * 18)  # 0.9 s calm: still the same overload (one log line, not one per tick)
        self.assertEqual(shedder.level, 2)
        clock.pump([0.05] * 3)
        self.assertEqual(shedder.level, 0)

    def test_an_event_loop_that_runs_late_is_measured(self):
        clock = Clock()
        shedder = busy_shedder(clock)
        clock.advance(0.05 + 0.2)  # the tick itself ran 200 ms late
        self.assertAlmostEqual(shedder.max_lag, 0.2)
        self.assertGreater(shedder.counters()["lag_seconds"], 0.1)

    def test_retry_after_is_spread(self):
        shedder = LoadShedder(Clock(), retry_after=10)
        values = {int(shedder.retry_after_value()) for _ in range(300)}
        self.assertTrue(all(10 <= v <= 20 for v in values))
        self.assertGreater(len(values), 5)

    def test_stop(self):
        clock = Clock()
        shedder = busy_shedder(clock)
        shedder.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class ServerShedsTests(SynchronousTestCase):
    """The whole server, shedding on ([server] overload_lag): 503 with Retry-After, no state held."""

    def core(self):
        core, transports, self.clock = make_core(self.mktemp(), server_settings={"overload_lag": 0.1})
        core.shedder.busy = 1.0
        return core, transports

    def test_register_refused_and_counted(self):
        core, transports = self.core()
        core.shedder.queue_delay(0.2)
        core.server.data_received(request("REGISTER"), udp_source())
        (response, destination), = transports.messages()
        self.assertEqual(response.status, 503)
        self.assertEqual((destination.host, destination.port), ("192.0.2.50", 5060))
        self.assertEqual(core.counters()["overload"]["shed"], {"register": 1})
        self.assertEqual(len(core.server.transactions.server), 0)

    def test_a_retransmission_gets_its_transactions_answer_not_a_503(self):
        core, transports = self.core()
        options = request("OPTIONS").replace(b"sip:1002@example.com SIP", b"sip:127.0.0.1 SIP", 1)
        core.shedder.queue_delay(0.0)
        core.server.data_received(options, udp_source())
        self.assertTrue(core.server.transactions.has_branch("z9hG4bKOPTIONSFalse"))
        core.shedder.queue_delay(0.2)  # the copy the client sent 500 ms later, read late
        core.server.data_received(options, udp_source())
        self.assertEqual([r.status for r, _ in transports.messages()], [200, 200])
        self.clock.advance(64)  # Timer J: the transaction ends, and the branch is forgotten with it
        self.assertFalse(core.server.transactions.has_branch("z9hG4bKOPTIONSFalse"))

    def test_on_by_default_and_off_with_zero(self):
        core, _, _ = make_core(self.mktemp())
        self.assertEqual((core.shedder.threshold, core.shedder.invite_threshold), (0.15, 0.6))
        self.assertIsNotNone(core.server.shedder)
        core, _, _ = make_core(self.mktemp(), server_settings={"overload_lag": 0})
        self.assertFalse(core.shedder.enabled)
        self.assertIsNone(core.server.shedder)
