"""Parsing and framing, with the RFC 4475 torture messages and RFC 3261 cases."""

import csv
import os

from twisted.trial.unittest import SynchronousTestCase

from proxy.errors import SipParseError
from proxy.sip.message import Request, Response
from proxy.sip.uri import NameAddr
from proxy.sip.wire import ResponseParseError, StreamFramer, parse_message
from proxy.testing import sip_bytes

FIXTURES = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "rfc4475")


def torture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name + ".dat"), "rb") as f:
        return f.read()


def torture_index() -> dict[str, str]:
    with open(os.path.join(FIXTURES, "index.tsv")) as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#")]
    return {row[0]: row[2] for row in rows}


def parse_and_validate(data: bytes):
    message = parse_message(data)
    message.validate()
    if isinstance(message, Request):
        message.uri
    return message


# Invalid messages that the message layer accepts on purpose, and why.
# RFC 4475 3.1.2.12 allows ignoring a bad Date; the proxy never reads Date.
# 3.1.2.13's bad Contact is refused where Contacts are parsed (test below).
NOT_REFUSED_BY_PARSER = {"baddate", "regbadct"}

# What the parser must say for the invalid ones: the reason names the defect.
EXPECTED_REFUSALS = {
    "badinv01": (400, "Bad parameter in Via"),
    "clerr": (400, "Content-Length larger than message"),
    "ncl": (400, "Bad Content-Length"),
    "scalar02": (400, "Bad CSeq: number too large"),
    "scalarlg": (400, "Bad CSeq: number too large"),
    "quotbal": (400, "Unterminated quoted string"),
    "ltgtruri": (400, "Malformed Request-URI"),
    "lwsruri": (400, "Malformed request line"),
    "lwsstart": (400, "Malformed request line"),
    "trws": (400, "Malformed request line"),
    "escruri": (400, "Headers in Request-URI"),
    "badaspec": (400, "Bad URI in To"),
    "baddn": (400, "Bad display name in From"),
    "badvers": (505, "Version Not Supported"),
    "mismatch01": (400, "CSeq method does not match request method"),
    "mismatch02": (400, "CSeq method does not match request method"),
    "bigcode": (400, "Bad status code"),
    "insuf": (400, "Missing Call-ID"),
    "multi01": (400, "Multiple CSeq headers"),
    "mcl01": (400, "Conflicting Content-Length"),
}


class TortureTests(SynchronousTestCase):
    def test_index_covers_all_49(self):
        self.assertEqual(len(torture_index()), 49)

    def test_valid_messages_parse(self):
        for name, verdict in torture_index().items():
            if verdict == "valid":
                with self.subTest(name):
                    parse_and_validate(torture(name))

    def test_invalid_messages_are_refused_with_a_named_reason(self):
        for name, verdict in torture_index().items():
            if verdict != "invalid" or name in NOT_REFUSED_BY_PARSER:
                continue
            with self.subTest(name):
                e = self.assertRaises(SipParseError, parse_and_validate, torture(name))
                self.assertEqual((e.status, e.reason), EXPECTED_REFUSALS[name])

    def test_contact_with_escaped_header_outside_brackets_is_refused(self):
        # RFC 4475 3.1.2.13: the registrar parses Contact and must refuse this one.
        contact = parse_message(torture("regbadct")).headers.get("contact")
        e = self.assertRaises(SipParseError, NameAddr.parse, contact, "Contact")
        self.assertEqual(e.reason, "Bad URI in Contact")

    def test_bad_response_is_a_response_error(self):
        # 3.1.2.19: a response with a code over 699 is dropped, not answered.
        self.assertRaises(ResponseParseError, parse_message, torture("bigcode"))

    def test_wsinv_fields(self):
        m = parse_and_validate(torture("wsinv"))
        self.assertEqual(m.method, "INVITE")
        self.assertEqual(m.max_forwards, 68)
        self.assertEqual(m.cseq.number, 9)
        self.assertEqual(m.cseq.method, "INVITE")
        self.assertEqual(m.to.tag, "1918181833n")
        self.assertEqual(m.from_.display_name, 'J Rosenberg \\"')
        self.assertEqual(m.from_.tag, "98asjd8")
        vias = m.vias
        self.assertEqual([(v.transport, v.host, v.branch) for v in vias], [
            ("UDP", "192.0.2.2", "390skdjuw"),
            ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
            ("UDP", "192.168.255.111", "z9hG4bK30239"),
        ])
        self.assertEqual(m.headers.get("NewFangledHeader"), "newfangled value continued newfangled value")
        self.assertEqual(m.headers.get("UnknownHeaderWithUnusualValue"), ";;,,;;,;")
        contact = NameAddr.parse(m.headers.get("m"), "Contact")
        self.assertEqual(contact.display_name, 'Quoted string ""')
        self.assertEqual(contact.param("q"), "0.33")
        self.assertEqual(len(m.body), 150)

    def test_dblreq_keeps_only_the_first_message(self):
        m = parse_and_validate(torture("dblreq"))
        self.assertEqual(m.method, "REGISTER")
        self.assertEqual(m.body, b"")

    def test_mpart01_binary_body_is_kept_byte_for_byte(self):
        data = torture("mpart01")
        m = parse_and_validate(data)
        self.assertIn(b"\x00", m.body)
        self.assertTrue(data.endswith(m.body))

    def test_unreason_keeps_utf8_reason_phrase(self):
        m = parse_and_validate(torture("unreason"))
        self.assertIsInstance(m, Response)
        self.assertEqual(m.status, 200)
        self.assertIn("простое", m.reason)

    def test_noreason_has_empty_reason(self):
        m = parse_and_validate(torture("noreason"))
        self.assertEqual(m.reason, "")

    def test_longreq_has_34_vias(self):
        self.assertEqual(len(parse_and_validate(torture("longreq")).vias), 34)

    def test_inv2543_without_branch_tag_or_max_forwards(self):
        m = parse_and_validate(torture("inv2543"))
        self.assertIsNone(m.max_forwards)
        self.assertIsNone(m.top_via.branch)
        self.assertIsNone(m.from_.tag)

    def test_zeromf(self):
        self.assertEqual(parse_and_validate(torture("zeromf")).max_forwards, 0)


class FramingTests(SynchronousTestCase):
    def test_udp_without_content_length_takes_the_rest(self):
        data = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n\r\nbody"
        self.assertEqual(parse_message(data).body, b"body")

    def test_udp_content_length_truncates(self):
        data = sip_bytes("MESSAGE sip:a@b SIP/2.0\nContent-Length: 3") + b"abcdef"
        self.assertEqual(parse_message(data).body, b"abc")

    def test_stream_requires_content_length(self):
        data = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n\r\n"
        e = self.assertRaises(SipParseError, parse_message, data, stream=True)
        self.assertEqual(e.reason, "Missing Content-Length")

    def test_content_length_counts_bytes_not_characters(self):
        body = "é".encode()
        m = parse_message(sip_bytes("MESSAGE sip:a@b SIP/2.0", body))
        self.assertEqual(m.body, body)
        self.assertIn(b"Content-Length: 2\r\n", m.serialize())

    def test_compact_content_length(self):
        data = b"MESSAGE sip:a@b SIP/2.0\r\nl: 2\r\n\r\nhello"
        self.assertEqual(parse_message(data).body, b"he")

    def test_lf_only_line_ends_are_accepted(self):
        m = parse_message(b"OPTIONS sip:a@b SIP/2.0\nCall-ID: x\n\n")
        self.assertEqual(m.headers.get("call-id"), "x")

    def test_latin1_display_name_round_trips(self):
        # Seed 001 line 757: phones send ISO 8859-1 caller IDs.
        data = sip_bytes('OPTIONS sip:a@b SIP/2.0\nFrom: "J\xf6rg" <sip:j@b>;tag=1'.encode("latin-1").decode("latin-1"))
        raw = data.decode("utf-8").encode("latin-1")
        m = parse_message(raw)
        self.assertEqual(m.serialize(), raw)

    def test_serialize_round_trip_keeps_unknown_headers_and_order(self):
        data = torture("wsinv")
        m = parse_message(data)
        again = parse_message(m.serialize())
        self.assertEqual(list(again.headers), list(m.headers))
        self.assertEqual(again.body, m.body)

    def test_version_other_than_2_0(self):
        e = self.assertRaises(SipParseError, parse_message, b"OPTIONS sip:a@b SIP/3.0\r\n\r\n")
        self.assertEqual(e.status, 505)

    def test_header_line_without_colon(self):
        e = self.assertRaises(SipParseError, parse_message, b"OPTIONS sip:a@b SIP/2.0\r\nVia\r\n\r\n")
        self.assertEqual(e.reason, "Malformed header line")


class StreamFramerTests(SynchronousTestCase):
    def test_splits_and_joins(self):
        one = sip_bytes("OPTIONS sip:a@b SIP/2.0\nCall-ID: 1", b"xy")
        two = sip_bytes("OPTIONS sip:a@b SIP/2.0\nCall-ID: 2")
        framer = StreamFramer()
        stream = b"\r\n\r\n" + one + two
        got = []
        for i in range(0, len(stream), 7):
            got.extend(framer.feed(stream[i : i + 7]))
        self.assertEqual(got, [one, two])

    def test_missing_content_length_is_an_error(self):
        framer = StreamFramer()
        e = self.assertRaises(SipParseError, framer.feed, b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: 1\r\n\r\n")
        self.assertEqual(e.reason, "Missing Content-Length")

    def test_oversize_is_513(self):
        framer = StreamFramer(max_size=2000)
        e = self.assertRaises(SipParseError, framer.feed, sip_bytes("MESSAGE sip:a@b SIP/2.0\nContent-Length: 5000"))
        self.assertEqual(e.status, 513)

    def test_endless_header_is_513(self):
        framer = StreamFramer(max_size=2000)
        e = self.assertRaises(SipParseError, framer.feed, b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X: y\r\n" * 500)
        self.assertEqual(e.status, 513)
