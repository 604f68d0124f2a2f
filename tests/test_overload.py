"""proxy/overload.py: pressure measured on a Clock, refusal shares that follow it, and who is never refused."""

import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.overload import LoadShedder
from proxy.sip.wire import parse_message
from proxy.testing import make_core, sip_bytes, udp_source


def request(method="REGISTER", credentials=False, to_tag=""):
    auth = "Proxy-Authorization" if method == "INVITE" else "Authorization"
    extra = f'\n        {auth}: Digest username="1001", realm="r", nonce="n", uri="sip:x", response="0"' \
        if credentials else ""
    return parse_message(sip_bytes(f"""
        {method} sip:1002@example.com SIP/2.0
        Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK{method}{credentials}{to_tag}
        Max-Forwards: 70
        From: <sip:1001@example.com>;tag=1
        To: <sip:1002@example.com>{';tag=' + to_tag if to_tag else ''}
        Call-ID: c1
        CSeq: 1 {method}{extra}
    """))


class FakeCpu:
    """process_time for the shedder: busy for `share` of every second of the Clock."""

    def __init__(self, clock, share=1.0):
        self.clock, self.share = clock, share

    def __call__(self):
        return self.clock.seconds() * self.share


def shedder_on(clock=None, busy=1.0, **kw):
    clock = clock or Clock()
    kw.setdefault("smoothing", 1.0)
    return LoadShedder(clock, threshold=0.1, interval=0.05, cpu_time=FakeCpu(clock, busy), rng=random.Random(1), **kw)


class PressureTests(SynchronousTestCase):
    def test_on_time_refuses_nothing(self):
        clock = Clock()
        shedder = shedder_on(clock)
        shedder.start()
        for _ in range(20):
            shedder.queue_delay(0.001)
            clock.advance(0.05)
        self.assertEqual((shedder.refuse_low, shedder.level), (0.0, 0))

    def test_a_long_wait_on_a_busy_server_raises_the_share_step_by_step_and_calm_lowers_it(self):
        clock = Clock()
        shedder = shedder_on(clock)
        shedder.start()
        for _ in range(4):
            shedder.queue_delay(0.15)
            clock.advance(0.05)
        self.assertAlmostEqual(shedder.refuse_low, 0.2)
        self.assertEqual(shedder.level, 1)
        for _ in range(16):
            shedder.queue_delay(0.15)
            clock.advance(0.05)
        self.assertEqual((shedder.refuse_low, shedder.refuse_high, shedder.level), (1.0, 0.0, 1))
        shedder.queue_delay(0.15)
        clock.advance(0.05)
        self.assertEqual(shedder.level, 2)  # every new REGISTER refused: new INVITEs next
        for _ in range(19):
            shedder.queue_delay(0.15)
            clock.advance(0.05)
        self.assertEqual(shedder.level, 3)
        for _ in range(20):
            clock.advance(0.05)  # calm: INVITEs come back first, then REGISTERs
        self.assertEqual((shedder.refuse_high, shedder.level), (0.0, 1))
        for _ in range(20):
            clock.advance(0.05)
        self.assertEqual((shedder.refuse_low, shedder.level), (0.0, 0))

    def test_a_wait_with_an_idle_cpu_is_no_overload(self):
        clock = Clock()
        shedder = shedder_on(clock, busy=0.3)  # a slow disk or a paused VM: refusing phones would not help
        shedder.start()
        for _ in range(10):
            shedder.queue_delay(0.5)
            clock.advance(0.05)
        self.assertEqual(shedder.refuse_low, 0.0)

    def test_an_event_loop_that_runs_late_counts_as_a_wait(self):
        clock = Clock()
        shedder = shedder_on(clock)
        shedder.start()
        clock.advance(0.05 + 0.2)  # the tick itself ran 200 ms late
        self.assertGreater(shedder.refuse_low, 0)
        self.assertAlmostEqual(shedder.max_lag, 0.2)

    def test_drops_by_the_kernel_count_only_with_some_wait(self):
        clock = Clock()
        shedder = shedder_on(clock)
        shedder.start()
        for _ in range(95):
            shedder.queue_delay(0.001)
        shedder.kernel_dropped(5)  # a burst overflowed the buffer, nothing waits: no overload
        clock.advance(0.05)
        self.assertEqual(shedder.refuse_low, 0.0)
        for _ in range(95):
            shedder.queue_delay(0.03)
        shedder.kernel_dropped(10)
        clock.advance(0.05)
        self.assertGreater(shedder.refuse_low, 0.0)
        self.assertEqual(shedder.counters()["kernel_drops"], 10)

    def test_smoothing_ignores_one_slow_tick(self):
        shedder = shedder_on(smoothing=0.3)
        shedder.observe(0.25)
        self.assertEqual(shedder.refuse_low, 0.0)
        for _ in range(10):
            shedder.observe(0.25)  # a server that stays late (and busy: the default)
        self.assertGreater(shedder.refuse_low, 0.0)

    def test_stop(self):
        clock = Clock()
        shedder = shedder_on(clock)
        shedder.start()
        shedder.stop()
        self.assertEqual(clock.getDelayedCalls(), [])


class ClassTests(SynchronousTestCase):
    def shedder(self, low, high):
        shedder = shedder_on(Clock())
        shedder.refuse_low, shedder.refuse_high = low, high
        return shedder

    def test_who_is_refused_with_every_share_at_one(self):
        cases = {
            # (method, credentials, in dialog): refused by sheds() when low = high = 1
            ("OPTIONS", False, False): True,
            ("INVITE", False, False): True,
            ("REGISTER", False, False): False,  # refusal_for decides, before parsing
            ("REGISTER", True, False): False,
            ("INVITE", True, False): False,
            ("INVITE", False, True): False,  # re-INVITE
            ("BYE", False, True): False,
            ("CANCEL", False, False): False,
            ("ACK", False, False): False,
        }
        for (method, credentials, in_dialog), refused in cases.items():
            with self.subTest(method=method, credentials=credentials, in_dialog=in_dialog):
                req = request(method, credentials, to_tag="t" if in_dialog else "")
                self.assertEqual(self.shedder(1.0, 1.0).sheds(req), refused)

    def test_invites_only_once_every_low_one_is_refused(self):
        self.assertFalse(self.shedder(0.9, 0.0).sheds(request("INVITE")))
        self.assertTrue(self.shedder(1.0, 1.0).sheds(request("INVITE")))

    def test_a_share_refuses_about_that_share(self):
        shedder = self.shedder(0.3, 0.0)
        refused = sum(shedder.sheds(request("OPTIONS")) for _ in range(2000))
        self.assertTrue(450 < refused < 750, refused)

    def test_the_refusal_of_a_new_register_is_spliced_from_its_own_lines(self):
        shedder = self.shedder(1.0, 0.0)
        data = request("REGISTER").serialize()
        refusal = parse_message(shedder.refusal_for(data, "abc", "sipproxy"))
        self.assertEqual((refusal.status, refusal.reason), (503, "Service Unavailable"))
        self.assertEqual(refusal.call_id, "c1")
        self.assertEqual(refusal.to.tag, "abc")
        self.assertEqual(refusal.top_via.branch, "z9hG4bKREGISTERFalse")
        self.assertTrue(10 <= int(refusal.headers.get("retry-after")) <= 20)
        self.assertEqual(shedder.shed, {"register": 1})

    def test_what_is_never_refused_before_parsing(self):
        shedder = self.shedder(1.0, 1.0)
        for data in (request("REGISTER", credentials=True).serialize(), request("INVITE").serialize(),
                     request("REGISTER", to_tag="x").serialize(), b"REGISTER sip:x SIP/2.0\r\nVia: a\r\n"):
            with self.subTest(data=data[:40]):
                self.assertIsNone(shedder.refusal_for(data, "t"))
        self.assertIsNone(self.shedder(0.0, 0.0).refusal_for(request("REGISTER").serialize(), "t"))

    def test_a_register_that_waited_past_a_retransmission_is_dropped(self):
        shedder = self.shedder(1.0, 0.0)
        shedder.queue_delay(0.25)
        self.assertEqual(shedder.refusal_for(request("REGISTER").serialize(), "t"), b"")
        self.assertEqual(shedder.shed, {"register_stale": 1})

    def test_retry_after_is_spread(self):
        shedder = LoadShedder(Clock(), retry_after=10)
        values = {int(shedder.retry_after_value()) for _ in range(300)}
        self.assertTrue(all(10 <= v <= 20 for v in values))
        self.assertGreater(len(values), 5)


class ServerShedsTests(SynchronousTestCase):
    """The whole server, shedding on ([server] overload_lag): 503 with Retry-After, no state held."""

    def test_register_refused_and_counted(self):
        core, transports, _ = make_core(self.mktemp(), server_settings={"overload_lag": 0.1})
        self.assertTrue(core.shedder.enabled)
        core.shedder.refuse_low = 1.0
        core.server.data_received(request("REGISTER").serialize(), udp_source())
        (response, destination), = transports.messages()
        self.assertEqual(response.status, 503)
        self.assertEqual((destination.host, destination.port), ("192.0.2.50", 5060))
        self.assertEqual(core.counters()["overload"]["shed"], {"register": 1})
        self.assertEqual(len(core.server.transactions.server), 0)

    def test_off_by_default(self):
        core, _, _ = make_core(self.mktemp())
        self.assertFalse(core.shedder.enabled)
        self.assertIsNone(core.server.shedder)
