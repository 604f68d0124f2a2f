"""The controller: local answers, bad input, received/rport, CANCEL, and fuzzing."""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from proxy.sip.message import Request, Response
from proxy.testing import make_server, sip_bytes, udp_source
from proxy.transport import Destination, Source

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "rfc4475")


def options(uri="sip:example.com", extra="", method="OPTIONS", via="SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKopt1"):
    return sip_bytes(f"""
        {method} {uri} SIP/2.0
        Via: {via}
        Max-Forwards: 70
        From: <sip:probe@example.com>;tag=abc
        To: <{uri}>
        Call-ID: opt-1@192.0.2.50
        CSeq: 1 {method}
        {extra}
    """)


class LocalAnswerTests(SynchronousTestCase):
    def setUp(self):
        self.server, self.transports, self.clock = make_server()

    def answer(self, data, source=None):
        self.server.data_received(data, source or udp_source())
        sent = self.transports.take()
        self.assertEqual(len(sent), 1, sent)
        return sent[0]

    def test_options_to_self(self):
        resp, dest = self.answer(options())
        self.assertEqual(resp.status, 200)
        self.assertIn("INVITE", resp.headers.get("allow"))
        self.assertEqual(resp.headers.get("accept"), "application/sdp")
        self.assertIsNotNone(resp.headers.get("supported"))
        self.assertIsNotNone(resp.to.tag)
        self.assertEqual(resp.call_id, "opt-1@192.0.2.50")
        self.assertEqual(dest, Destination("UDP", "192.0.2.50", 5060))

    def test_options_to_self_by_address_and_port(self):
        self.assertEqual(self.answer(options("sip:192.0.2.1:5060"))[0].status, 200)

    def test_options_with_max_forwards_zero_is_answered(self):
        data = options().replace(b"Max-Forwards: 70", b"Max-Forwards: 0")
        self.assertEqual(self.answer(data)[0].status, 200)

    def test_unknown_method_to_self_is_501(self):
        resp, _ = self.answer(options(method="FOOBAR"))
        self.assertEqual((resp.status, resp.reason), (501, "Not Implemented"))
        self.assertIn("OPTIONS", resp.headers.get("allow"))

    def test_user_in_our_domain_without_routing_is_404(self):
        self.assertEqual(self.answer(options("sip:1001@example.com", method="INVITE"))[0].status, 404)

    def test_foreign_domain_is_refused(self):
        resp, _ = self.answer(options("sip:bob@elsewhere.example.net", method="INVITE"))
        self.assertEqual((resp.status, resp.reason), (403, "Relaying Not Allowed"))

    def test_unknown_uri_scheme_is_416(self):
        # RFC 4475 3.3.2.
        with open(os.path.join(FIXTURES, "unkscm.dat"), "rb") as f:
            resp, _ = self.answer(f.read())
        self.assertEqual(resp.status, 416)

    def test_unknown_require_is_420_with_unsupported(self):
        resp, _ = self.answer(options(extra="Require: nothingweknow"))
        self.assertEqual(resp.status, 420)
        self.assertEqual(resp.headers.get("unsupported"), "nothingweknow")

    def test_retransmission_gets_the_same_response(self):
        first, _ = self.answer(options())
        again, _ = self.answer(options())
        self.assertEqual(first.serialize(), again.serialize())

    def test_tcp_request_is_answered_on_its_connection_source(self):
        source = Source("TCP", "192.0.2.50", 40001)
        resp, dest = self.answer(options(via="SIP/2.0/TCP 192.0.2.50:5060;branch=z9hG4bKt"), source)
        self.assertEqual(dest, Destination("TCP", "192.0.2.50", 40001))


class CancelTests(SynchronousTestCase):
    def test_cancel_gets_200_and_invite_487(self):
        server, transports, _ = make_server(route=lambda tx, request: None)  # a route that has not answered yet
        invite = options("sip:1001@example.com", method="INVITE")
        server.data_received(invite, udp_source())
        server.data_received(options("sip:1001@example.com", method="CANCEL"), udp_source())
        sent = [(m.status, m.cseq.method) for m, _ in transports.take()]
        self.assertEqual(sent, [(200, "CANCEL"), (487, "INVITE")])

    def test_cancel_without_invite_is_481(self):
        server, transports, _ = make_server()
        server.data_received(options("sip:1001@example.com", method="CANCEL"), udp_source())
        self.assertEqual(transports.take()[0][0].status, 481)


class ViaStampingTests(SynchronousTestCase):
    def setUp(self):
        self.seen = []
        self.server, self.transports, _ = make_server(methods={"OPTIONS": lambda tx, request: self.seen.append(request)})

    def test_received_added_when_source_differs(self):
        self.server.data_received(options(), udp_source("203.0.113.7", 5060))
        via = self.seen[0].top_via
        self.assertEqual(via.received, "203.0.113.7")
        self.assertIsNone(via.rport)

    def test_nothing_added_when_source_matches(self):
        self.server.data_received(options(), udp_source("192.0.2.50", 5060))
        self.assertEqual(str(self.seen[0].top_via), "SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKopt1")

    def test_rport_filled_and_response_goes_there(self):
        via = "SIP/2.0/UDP 192.0.2.50:5060;rport;branch=z9hG4bKr"
        self.server.data_received(options(via=via), udp_source("203.0.113.7", 61000))
        top = self.seen[0].top_via
        self.assertEqual((top.received, top.rport), ("203.0.113.7", "61000"))

    def test_phone_without_rport_from_another_port(self):
        # 7940 8.x sends no rport; the source port is kept with the request's transaction.
        self.server, self.transports, _ = make_server()  # OPTIONS answered by the server itself
        self.server.data_received(options(), udp_source("192.0.2.50", 49170))
        _, dest = self.transports.take()[0]
        self.assertEqual(dest, Destination("UDP", "192.0.2.50", 5060))


class AmplificationTests(SynchronousTestCase):
    def setUp(self):
        self.server, self.transports, _ = make_server()

    def test_a_received_the_client_wrote_is_replaced_by_the_source(self):
        seen = []
        self.server, self.transports, _ = make_server(methods={"OPTIONS": lambda tx, request: seen.append(request)})
        via = "SIP/2.0/UDP 192.0.2.50:5060;received=198.51.100.77;branch=z9hG4bKrcv"
        self.server.data_received(options(via=via), udp_source("192.0.2.50", 5060))
        self.assertEqual(seen[0].top_via.received, "192.0.2.50")

    def test_answers_never_go_to_a_maddr_or_received_the_client_chose(self):
        via = "SIP/2.0/UDP 192.0.2.50:5060;received=198.51.100.77;maddr=198.51.100.78;branch=z9hG4bKamp"
        self.server.data_received(options(uri="sip:nobody@example.com", via=via), udp_source("192.0.2.50", 5060))
        self.assertEqual([d for _, d in self.transports.take()], [Destination("UDP", "192.0.2.50", 5060)])


class TableBoundTests(SynchronousTestCase):
    def test_a_full_transaction_table_answers_503_statelessly_and_counts(self):
        # A handler that holds every transaction open.
        server, transports, clock = make_server(max_transactions=100, methods={"OPTIONS": lambda tx, request: None})
        for n in range(150):
            server.data_received(options(via=f"SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKfull{n}"), udp_source())
        self.assertEqual(len(server.transactions.server), 100)
        answers = [m for m, _ in transports.take()]
        self.assertEqual(len(answers), 50)
        self.assertTrue(all(m.status == 503 and 5 <= int(m.headers.get("retry-after")) < 15 for m in answers))
        self.assertEqual(server.dropped["transaction_table_full"], 50)

    def test_the_per_source_log_limiter_is_bounded(self):
        server, _, clock = make_server()
        for n in range(12_000):
            server.data_received(b"garbage\r\n\r\n", udp_source(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"))
        self.assertLessEqual(len(server.replies.log_limit._last), 10_000)


class BadInputTests(SynchronousTestCase):
    def setUp(self):
        self.server, self.transports, self.clock = make_server()

    def test_missing_call_id(self):
        data = options().replace(b"Call-ID: opt-1@192.0.2.50\r\n", b"")
        self.server.data_received(data, udp_source())
        resp, _ = self.transports.take()[0]
        self.assertEqual((resp.status, resp.reason), (400, "Missing Call-ID"))

    def test_malformed_header_line_is_answered(self):
        self.server.data_received(options(extra="this line has no colon"), udp_source())
        resp, _ = self.transports.take()[0]
        self.assertEqual((resp.status, resp.reason), (400, "Malformed header line"))

    def test_an_unterminated_quote_in_the_top_via_is_caught_before_the_transaction_layer(self):
        # Found by the fuzz test below: the one-value fast path of split_outside_quotes let the quote through,
        # and the Via stamped with received= then failed to parse inside the transaction layer.
        self.server.data_received(options(via='SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bK"open'), udp_source())
        self.assertEqual(self.server.dropped["internal_error"], 0)
        self.assertEqual(self.server.dropped["malformed"], 1)  # no Via to answer along: dropped, counted

    def test_bad_cseq(self):
        self.server.data_received(options().replace(b"CSeq: 1 OPTIONS", b"CSeq: x OPTIONS"), udp_source())
        self.assertEqual(self.transports.take()[0][0].reason, "Bad CSeq")

    def test_unknown_version_is_505(self):
        self.server.data_received(options().replace(b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1), udp_source())
        self.assertEqual(self.transports.take()[0][0].status, 505)

    def test_content_length_beyond_datagram_is_400(self):
        self.server.data_received(options().replace(b"Content-Length: 0", b"Content-Length: 999"), udp_source())
        resp, _ = self.transports.take()[0]
        self.assertEqual((resp.status, resp.reason), (400, "Content-Length larger than message"))

    def test_oversize_is_513(self):
        server, transports, _ = make_server()
        server.max_message_size = 2000
        data = options(extra="X-Padding: " + "a" * 3000)
        server.data_received(data, udp_source())
        self.assertEqual(transports.take()[0][0].status, 513)

    def test_garbage_dropped_counted_logged_once_per_minute(self):
        with capturedLogs() as events:
            for _ in range(5):
                self.server.data_received(b"\x00\xffgarbage", udp_source("198.51.100.9"))
            self.clock.advance(61)
            self.server.data_received(b"more garbage", udp_source("198.51.100.9"))
        self.assertEqual(self.transports.sent, [])
        self.assertEqual(self.server.dropped["malformed"], 6)
        dropped_logs = [e for e in events if "Dropped message" in e.get("log_format", "")]
        self.assertEqual(len(dropped_logs), 2)

    def test_quote_before_via_is_refused_not_raised(self):
        # Found by the hypothesis test: a Via value opening with '"'.
        data = options(via='" SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKq')
        self.server.data_received(data, udp_source())
        self.assertEqual(self.server.dropped["internal_error"], 0)
        self.assertEqual(self.server.dropped["malformed"], 1)

    def test_bad_response_is_dropped_not_answered(self):
        with open(os.path.join(FIXTURES, "bigcode.dat"), "rb") as f:
            self.server.data_received(f.read(), udp_source())
        self.assertEqual(self.transports.sent, [])
        self.assertEqual(self.server.dropped["bad_response"], 1)

    def test_stray_response_is_dropped(self):
        resp = sip_bytes("""
            SIP/2.0 200 OK
            Via: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKnotours
            From: <sip:a@example.com>;tag=1
            To: <sip:b@example.com>;tag=2
            Call-ID: x
            CSeq: 1 OPTIONS
        """)
        self.server.data_received(resp, udp_source())
        self.assertEqual(self.server.dropped["stray_response"], 1)

    def test_ack_to_nothing_gets_no_answer(self):
        self.server.data_received(options(method="ACK"), udp_source())
        self.assertEqual(self.transports.sent, [])

    def test_every_torture_message_gets_an_answer_or_a_drop(self):
        for name in sorted(os.listdir(FIXTURES)):
            if not name.endswith(".dat"):
                continue
            with open(os.path.join(FIXTURES, name), "rb") as f:
                data = f.read()
            with self.subTest(name):
                self.server.data_received(data, udp_source())
        self.assertEqual(self.server.dropped["internal_error"], 0)

    def test_handler_bug_gives_500_and_the_server_lives(self):
        def broken(tx, request):
            raise RuntimeError("bug")

        self.server, self.transports, _ = make_server(methods={"OPTIONS": broken})
        self.server.data_received(options(), udp_source())
        self.assertEqual(self.transports.take()[0][0].status, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


with open(os.path.join(FIXTURES, "wsinv.dat"), "rb") as _f:
    _SEED = _f.read()
_SEEDS = [_SEED, options(), options(method="INVITE", uri="sip:1001@example.com")]


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(data)))
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[pos:pos] = draw(st.sampled_from([b"\r\n", b":", b";", b",", b"<", b">", b'"', b" ", b"\x00", b"%", b"[", b"SIP/2.0"]))
    return bytes(data)


class FuzzTests(SynchronousTestCase):
    """Nothing a peer sends may raise out of the protocol layer."""

    @settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.binary(max_size=400), mutated()))
    def test_datagram_handler_never_raises(self, data):
        server, transports, _ = make_server()
        server.data_received(data, udp_source())
        server.data_received(data, Source("TCP", "192.0.2.50", 40000))
        self.assertEqual(server.dropped["internal_error"], 0)
        for raw, _ in transports.sent:
            self.assertTrue(raw.startswith(b"SIP/2.0 "))

    @settings(max_examples=400, deadline=None)
    @given(mutated())
    def test_parser_raises_only_parse_errors(self, data):
        from proxy.errors import SipParseError
        from proxy.sip.wire import parse_message

        try:
            message = parse_message(data)
            message.validate()
            if isinstance(message, Request):
                message.uri
            message.serialize()
        except SipParseError:
            pass
        self.assertTrue(Response or Request)
