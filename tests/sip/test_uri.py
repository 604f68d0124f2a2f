from twisted.trial.unittest import SynchronousTestCase

from proxy.bounded import RecentMemo
from proxy.errors import SipParseError
from proxy.sip.uri import NameAddr, OtherUri, SipUri, parse_uri


class SipUriTests(SynchronousTestCase):
    def test_full_uri(self):
        uri = SipUri.parse("SIP:Alice:secret@Atlanta.COM:05060;Transport=TCP;lr?subject=project%20x&priority=urgent")
        self.assertEqual(uri.scheme, "sip")
        self.assertEqual(uri.user, "Alice")
        self.assertEqual(uri.password, "secret")
        self.assertEqual(uri.host, "atlanta.com")
        self.assertEqual(uri.port, 5060)
        self.assertEqual(uri.params, (("transport", "TCP"), ("lr", None)))
        self.assertEqual(uri.headers, (("subject", "project%20x"), ("priority", "urgent")))
        self.assertEqual(str(uri), "sip:Alice:secret@atlanta.com:5060;transport=TCP;lr?subject=project%20x&priority=urgent")

    def test_ipv6_reference(self):
        uri = SipUri.parse("sip:1001@[2001:DB8:0:0::1]:5060")
        self.assertEqual(uri.host, "2001:db8::1")
        self.assertEqual(str(uri), "sip:1001@[2001:db8::1]:5060")

    def test_user_with_semicolon_params(self):
        # RFC 4475 3.1.1.9: ';' is legal in the user part.
        uri = SipUri.parse("sip:user;par=u%40example.net@example.com")
        self.assertEqual(uri.user, "user;par=u%40example.net")
        self.assertEqual(uri.decoded_user, "user;par=u@example.net")

    def test_bad_escape_in_user(self):
        self.assertRaises(SipParseError, SipUri.parse, "sip:us%zzer@example.com")

    def test_bad_port(self):
        self.assertRaises(SipParseError, SipUri.parse, "sip:a@example.com:99999")

    def test_bad_ipv6(self):
        self.assertRaises(SipParseError, SipUri.parse, "sip:a@[2001:db8::zz]")

    def test_other_scheme(self):
        self.assertIsInstance(parse_uri("tel:+1-201-555-0123"), OtherUri)
        e = self.assertRaises(SipParseError, SipUri.parse, "tel:+1")
        self.assertEqual(e.status, 416)

    def test_equivalence_rfc3261_19_1_4(self):
        same = [
            ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp"),
            ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
            ("sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
             "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"),
            ("sip:alice@atlanta.com?subject=project%20x&priority=urgent",
             "sip:alice@atlanta.com?priority=urgent&subject=project%20x"),
        ]
        for a, b in same:
            with self.subTest(a):
                self.assertTrue(SipUri.parse(a).equivalent_to(SipUri.parse(b)))
        different = [
            ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
            ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
            ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
        ]
        for a, b in different:
            with self.subTest(a):
                self.assertFalse(SipUri.parse(a).equivalent_to(SipUri.parse(b)))


class NameAddrTests(SynchronousTestCase):
    def test_quoted_display_name_with_escapes(self):
        na = NameAddr.parse('"Doe, \\"Johnny\\"" <sip:john@example.com>;tag=abc')
        self.assertEqual(na.display_name, 'Doe, "Johnny"')
        self.assertEqual(na.tag, "abc")
        self.assertEqual(str(na), '"Doe, \\"Johnny\\"" <sip:john@example.com>;tag=abc')

    def test_token_display_name(self):
        na = NameAddr.parse("Bob  Smith <sip:bob@example.com>")
        self.assertEqual(na.display_name, "Bob Smith")

    def test_no_space_before_bracket(self):
        # RFC 4475 3.1.1.6.
        self.assertEqual(NameAddr.parse('"caller"<sip:caller@example.com>;tag=1').display_name, "caller")

    def test_addr_spec_params_belong_to_header(self):
        na = NameAddr.parse("sip:bob@example.com;tag=xyz")
        self.assertEqual(na.uri, SipUri.parse("sip:bob@example.com"))
        self.assertEqual(na.tag, "xyz")

    def test_uri_params_inside_brackets_stay_in_uri(self):
        na = NameAddr.parse("<sip:bob@example.com;transport=udp>;expires=60")
        self.assertEqual(na.uri.param("transport"), "udp")
        self.assertEqual(na.param("expires"), "60")

    def test_errors(self):
        for text in ['"unterminated <sip:a@b>', "<sip:a@b", "a,b <sip:a@b>", "< sip:a@b >", "<sip:a@b> junk", "<sip:a@b>;;"]:
            with self.subTest(text):
                self.assertRaises(SipParseError, NameAddr.parse, text)

    def test_with_param(self):
        na = NameAddr.parse("<sip:a@b>").with_param("tag", "1")
        self.assertEqual(str(na), "<sip:a@b>;tag=1")


class ParseMemoTests(SynchronousTestCase):
    """Parsed values are shared by their text; failures are not remembered; the memo stays bounded."""

    def test_the_same_text_gives_the_same_object_and_another_text_its_own(self):
        first = NameAddr.parse("<sip:1001@example.com>;tag=memo-1", "To")
        self.assertIs(NameAddr.parse("<sip:1001@example.com>;tag=memo-1", "From"), first)
        other = NameAddr.parse("<sip:1001@example.com>;tag=memo-2", "To")
        self.assertEqual((other.tag, first.tag), ("memo-2", "memo-1"))
        self.assertIs(parse_uri("sip:memo@example.com"), parse_uri("sip:memo@example.com"))

    def test_a_long_value_is_not_kept(self):
        long_uri = "sip:" + "a" * 300 + "@example.com"
        self.assertIsNot(parse_uri(long_uri), parse_uri(long_uri))  # a stranger's 60 KB values pin nothing
        self.assertEqual(parse_uri(long_uri), parse_uri(long_uri))

    def test_a_failure_is_raised_every_time_with_its_own_label(self):
        for what in ("To", "Contact"):
            with self.assertRaises(SipParseError) as caught:
                NameAddr.parse("<sip:1001@example.com", what)
            self.assertIn(what, caught.exception.reason)

    def test_two_generations_bound_the_memo_and_keep_what_is_used(self):
        memo = RecentMemo(3)
        memo.put("kept", 1)
        for n in range(3):
            memo.put(n, n)  # the young generation fills: "kept" is in the old one now
        self.assertEqual(memo.get("kept"), 1)  # found, and moved back to the young one
        for n in range(10, 16):
            memo.put(n, n)
        self.assertLessEqual(len(memo), 6)
        self.assertIsNone(memo.get(0))  # two generations on: forgotten
        self.assertEqual(memo.get(15), 15)
