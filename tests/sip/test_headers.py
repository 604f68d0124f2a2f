from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import SipParseError
from proxy.sip.headers import CSeq, Headers, Via, header_key


class HeadersTests(SynchronousTestCase):
    def setUp(self):
        self.headers = Headers.of(
            ("v", "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2"),
            ("Via", "SIP/2.0/UDP c;branch=z9hG4bK3"),
            ("X-Unknown", "keep me"),
            ("Contact", '"Doe, John" <sip:j@x>, <sip:k@y>'),
        )

    def test_compact_and_case_insensitive(self):
        self.assertEqual(header_key("V"), "via")
        self.assertEqual(header_key("CALL-ID"), "call-id")
        self.assertEqual(self.headers.get("VIA"), "SIP/2.0/UDP a;branch=z9hG4bK1, SIP/2.0/UDP b;branch=z9hG4bK2")
        self.assertIn("x-unknown", self.headers)

    def test_values_across_lines_and_commas(self):
        self.assertEqual(len(self.headers.values("via")), 3)
        self.assertEqual(self.headers.values("contact"), ['"Doe, John" <sip:j@x>', "<sip:k@y>"])

    def test_remove_first_value_keeps_the_rest_of_the_line(self):
        h = self.headers.remove_first_value("via")
        self.assertEqual(h.values("via"), ["SIP/2.0/UDP b;branch=z9hG4bK2", "SIP/2.0/UDP c;branch=z9hG4bK3"])
        self.assertEqual(list(h)[0][0], "v")  # the compact name is kept as sent

    def test_prepend_and_set(self):
        h = self.headers.prepend("Via", "SIP/2.0/UDP p;branch=z9hG4bKp").set("Max-Forwards", "69")
        self.assertEqual(h.first_value("via"), "SIP/2.0/UDP p;branch=z9hG4bKp")
        self.assertEqual(h.get("max-forwards"), "69")
        self.assertEqual(list(h)[-1], ("Max-Forwards", "69"))
        self.assertEqual(h.get("X-Unknown"), "keep me")

    def test_headers_are_immutable_values(self):
        before = list(self.headers)
        self.headers.set("X-Unknown", "changed")
        self.assertEqual(list(self.headers), before)


class ViaTests(SynchronousTestCase):
    def test_parse_and_serialize(self):
        via = Via.parse("SIP/2.0/udp 192.0.2.4:5060;branch=z9hG4bKnashds7;rport;received=10.0.0.1")
        self.assertEqual(via.transport, "UDP")
        self.assertEqual(via.sent_by, ("192.0.2.4", 5060))
        self.assertEqual(via.branch, "z9hG4bKnashds7")
        self.assertEqual(via.rport, "")
        self.assertEqual(via.received, "10.0.0.1")
        self.assertEqual(str(via), "SIP/2.0/UDP 192.0.2.4:5060;branch=z9hG4bKnashds7;rport;received=10.0.0.1")

    def test_ipv6_sent_by(self):
        via = Via.parse("SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas")
        self.assertEqual(via.sent_by, ("2001:db8::9:1", 5070))
        self.assertEqual(str(via), "SIP/2.0/UDP [2001:db8::9:1]:5070;branch=z9hG4bKas")

    def test_with_param_keeps_position(self):
        via = Via.parse("SIP/2.0/UDP h;rport;branch=z9hG4bK1").with_param("rport", "5070")
        self.assertEqual(str(via), "SIP/2.0/UDP h;rport=5070;branch=z9hG4bK1")

    def test_errors(self):
        for text in ["SIP/2.0 host", "SIP/2.0/UDP", "SIP/2.0/UDP host;;", "SIP/2.0/UDP host:abc", "SIP/2.0/UDP host;branch=",
                     '" SIP / 2.0 /UDP host;branch=z9hG4bK1']:  # found by the fuzz test
            with self.subTest(text):
                self.assertRaises(SipParseError, Via.parse, text)


class CSeqTests(SynchronousTestCase):
    def test_leading_zeros(self):
        self.assertEqual(CSeq.parse("0009 INVITE"), CSeq(9, "INVITE"))

    def test_too_large(self):
        self.assertRaises(SipParseError, CSeq.parse, "4294967296 INVITE")
        self.assertEqual(CSeq.parse("4294967295 INVITE").number, 4294967295)

    def test_missing_method(self):
        self.assertRaises(SipParseError, CSeq.parse, "12")
