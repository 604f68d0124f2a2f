"""Runtime tracing on a Clock: only matching messages, credentials masked, bodies left out, off after N minutes."""

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from proxy.trace import TraceFilter, Tracer

MESSAGE = (b"INVITE sip:1002@example.com SIP/2.0\r\nFrom: <sip:1001@example.com>;tag=1\r\nCall-ID: abc@x\r\n"
           b'Proxy-Authorization: Digest username="1001", response="secret-digest"\r\n\r\nv=0\r\n')


class TracerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.tracer = Tracer(self.clock)

    def traced(self, data, host="192.0.2.5"):
        with capturedLogs() as events:
            self.tracer.saw("in", data, host, 5060)
        return [e for e in events if e["log_format"].startswith("TRACE")]

    def test_only_matching_messages_and_no_secrets(self):
        self.tracer.start(TraceFilter(user="1001"), minutes=5)
        (event,) = self.traced(MESSAGE)
        self.assertIn("Call-ID: abc@x", event["text"])
        self.assertNotIn("secret-digest", event["text"])
        self.assertIn("Proxy-Authorization: (masked)", event["text"])
        self.assertNotIn("v=0", event["text"])
        self.assertEqual(event["size"], 5)
        self.assertEqual(self.traced(MESSAGE.replace(b"1001", b"1003")), [])

    def test_by_address_and_call_id(self):
        self.tracer.start(TraceFilter(address="192.0.2.9"), minutes=1)
        self.assertEqual(self.traced(MESSAGE), [])
        self.assertEqual(len(self.traced(MESSAGE, host="192.0.2.9")), 1)
        self.tracer.start(TraceFilter(call_id="abc@x"), minutes=1)
        self.assertEqual(len(self.traced(MESSAGE)), 1)

    def test_it_ends_by_itself(self):
        self.tracer.start(TraceFilter(user="1001"), minutes=2)
        self.clock.advance(120.001)
        self.assertEqual(self.traced(MESSAGE), [])
        self.assertFalse(self.tracer.active)


class RuntimeVerbosityTests(SynchronousTestCase):
    """sipproxy-admin log-level: the per-message lines of [server] debug for N minutes, in the real core."""

    def test_debug_for_n_minutes_then_back(self):
        from proxy.testing import make_core, sip_bytes, udp_source

        core, _, clock = make_core(self.mktemp())
        verbosity = core.verbosity
        options = sip_bytes("""
            OPTIONS sip:192.0.2.1 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKv1
            From: <sip:a@example.com>;tag=1
            To: <sip:192.0.2.1>
            Call-ID: verbose-1
            CSeq: 1 OPTIONS
            Max-Forwards: 70
        """)

        def lines():
            with capturedLogs() as events:
                core.server.data_received(options.replace(b"z9hG4bKv1", b"z9hG4bK" + str(clock.seconds()).encode()),
                                          udp_source())
            return [e for e in events if "Call-ID" in e.get("log_format", "")]

        self.assertEqual((verbosity.level, lines()), ("info", []))
        until = verbosity.set("debug", minutes=2)
        self.assertEqual((verbosity.level, until), ("debug", clock.seconds() + 120))
        (line,) = lines()
        self.assertEqual(line["call_id"], "verbose-1")
        clock.advance(120)
        self.assertEqual((verbosity.level, lines()), ("info", []))
        verbosity.set("debug", minutes=5)
        verbosity.set("info")
        self.assertEqual((verbosity.level, verbosity.until), ("info", 0.0))
        self.assertFalse(core.router.debug)

    def test_the_configured_level_is_where_it_returns(self):
        from proxy.trace import RuntimeVerbosity

        class Component:
            debug = True

        clock = Clock()
        verbosity = RuntimeVerbosity(clock, [Component()], configured=True)
        verbosity.set("info")
        self.assertEqual(verbosity.level, "debug")  # [server] debug = true: info cannot go below the file
