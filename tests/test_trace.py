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
