"""Every transaction timer path of RFC 3261 section 17 (and RFC 6026), on a Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.sip.message import make_response
from proxy.sip.wire import parse_message
from proxy.testing import RecordingTransports, sip_bytes, udp_source
from proxy.transaction import Timers, TransactionLayer, server_key
from proxy.transport import Destination, Source


def request(method="INVITE", branch="z9hG4bKabc", cseq=1, via_host="192.0.2.50", extra=""):
    return parse_message(sip_bytes(f"""
        {method} sip:bob@example.com SIP/2.0
        Via: SIP/2.0/UDP {via_host}:5060;branch={branch}
        Max-Forwards: 70
        From: <sip:alice@example.com>;tag=1928301774
        To: <sip:bob@example.com>{extra}
        Call-ID: a84b4c76e66710
        CSeq: {cseq} {method}
    """))


class RecordingUser:
    def __init__(self):
        self.requests, self.acks, self.cancels, self.strays, self.refused = [], [], [], [], []

    def request_received(self, tx, req):
        self.requests.append((tx, req))

    def ack_received(self, req, source):
        self.acks.append(req)

    def cancel_received(self, tx, req, invite_tx):
        self.cancels.append((tx, req, invite_tx))

    def stray_response(self, response, source):
        self.strays.append(response)

    def overloaded(self, request, source, reason):
        self.refused.append(reason)


class Base(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.transports = RecordingTransports()
        self.user = RecordingUser()
        self.layer = TransactionLayer(self.clock, self.transports, Timers(), user=self.user)

    def sent_count(self):
        return len(self.transports.sent)


class ServerInviteTests(Base):
    def start(self, source=None):
        self.layer.request_received(request(), source or udp_source())
        tx, req = self.user.requests[-1]
        return tx, req

    def test_retransmitted_invite_gets_last_provisional(self):
        tx, req = self.start()
        tx.respond(make_response(req, 100))
        self.layer.request_received(request(), udp_source())
        self.assertEqual(len(self.user.requests), 1)
        self.assertEqual([m.status for m, _ in self.transports.messages()], [100, 100])

    def test_timer_g_doubles_to_t2_and_timer_h_ends(self):
        tx, req = self.start()
        tx.respond(make_response(req, 486, to_tag="t"))
        self.assertEqual(tx.state, "Completed")
        times = []
        for _ in range(128):
            before = self.sent_count()
            self.clock.advance(0.25)
            if self.sent_count() > before:
                times.append(round(self.clock.seconds(), 2))
        # G fires at 0.5, 1.5, 3.5, 7.5, then every T2=4 s; H at 32 s ends it.
        self.assertEqual(times[:6], [0.5, 1.5, 3.5, 7.5, 11.5, 15.5])
        self.assertEqual(tx.state, "Terminated")
        self.assertNotIn(tx.key, self.layer.server)

    def test_timer_h_exactly_64_t1(self):
        tx, req = self.start()
        tx.respond(make_response(req, 486, to_tag="t"))
        self.clock.advance(31.999)
        self.assertEqual(tx.state, "Completed")
        self.clock.advance(0.001)
        self.assertEqual(tx.state, "Terminated")

    def test_ack_confirms_and_timer_i_absorbs_then_ends(self):
        tx, req = self.start()
        tx.respond(make_response(req, 486, to_tag="t"))
        self.layer.request_received(request("ACK", extra=";tag=t"), udp_source())
        self.assertEqual(tx.state, "Confirmed")
        self.assertEqual(self.user.acks, [])  # non-2xx ACK is absorbed hop by hop
        sent = self.sent_count()
        self.layer.request_received(request("ACK", extra=";tag=t"), udp_source())
        self.assertEqual(self.sent_count(), sent)
        self.clock.advance(4.999)
        self.assertEqual(tx.state, "Confirmed")
        self.clock.advance(0.001)
        self.assertEqual(tx.state, "Terminated")
        self.assertEqual(self.sent_count(), sent)  # no more Timer G after ACK

    def test_retransmitted_invite_in_completed_resends_final(self):
        tx, req = self.start()
        tx.respond(make_response(req, 486, to_tag="t"))
        self.layer.request_received(request(), udp_source())
        self.assertEqual([m.status for m, _ in self.transports.messages()], [486, 486])

    def test_2xx_goes_to_accepted_and_timer_l(self):
        tx, req = self.start()
        tx.respond(make_response(req, 200, to_tag="t"))
        self.assertEqual(tx.state, "Accepted")
        self.layer.request_received(request(), udp_source())  # absorbed, not re-sent
        self.assertEqual(self.sent_count(), 1)
        tx.respond(make_response(req, 200, to_tag="u"))  # second fork's 2xx passes
        self.assertEqual(self.sent_count(), 2)
        ack = request("ACK", branch="z9hG4bKnew", extra=";tag=t")
        self.layer.request_received(ack, udp_source())
        self.assertEqual(self.user.acks, [ack])
        self.clock.advance(32)
        self.assertEqual(tx.state, "Terminated")

    def test_reliable_completed_has_no_timer_g(self):
        source = Source("TCP", "192.0.2.50", 40000)
        tx, req = self.start(source)
        tx.respond(make_response(req, 486, to_tag="t"))
        self.clock.advance(31)
        self.assertEqual(self.sent_count(), 1)
        self.layer.request_received(request("ACK", extra=";tag=t"), source)
        self.assertEqual(tx.state, "Terminated")

    def test_cancel_matches_invite(self):
        tx, _ = self.start()
        self.layer.request_received(request("CANCEL"), udp_source())
        cancel_tx, cancel, invite_tx = self.user.cancels[0]
        self.assertIs(invite_tx, tx)
        self.assertIsNot(cancel_tx, tx)

    def test_cancel_for_unknown_branch_finds_nothing(self):
        self.start()
        self.layer.request_received(request("CANCEL", branch="z9hG4bKother"), udp_source())
        self.assertIsNone(self.user.cancels[0][2])


class Rfc2543MatchingTests(Base):
    def test_branchless_retransmission_and_ack(self):
        legacy = request(branch="1")  # no magic cookie
        self.layer.request_received(legacy, udp_source())
        tx, req = self.user.requests[0]
        tx.respond(make_response(req, 404, to_tag="t"))
        self.layer.request_received(request(branch="1"), udp_source())
        self.assertEqual(len(self.user.requests), 1)
        self.layer.request_received(request("ACK", branch="1", extra=";tag=t"), udp_source())
        self.assertEqual(tx.state, "Confirmed")

    def test_bare_magic_cookie_is_treated_as_rfc2543(self):
        # RFC 4475 3.2.1: branch=z9hG4bK alone.
        key = server_key(request(branch="z9hG4bK"))
        self.assertEqual(key[0], "2543")

    def test_cancel_without_branch(self):
        self.layer.request_received(request(branch="1"), udp_source())
        tx, _ = self.user.requests[0]
        self.layer.request_received(request("CANCEL", branch="1"), udp_source())
        self.assertIs(self.user.cancels[0][2], tx)


class ServerNonInviteTests(Base):
    def test_timer_j_absorbs_retransmissions(self):
        self.layer.request_received(request("OPTIONS"), udp_source())
        tx, req = self.user.requests[0]
        self.assertEqual(tx.state, "Trying")
        self.layer.request_received(request("OPTIONS"), udp_source())  # nothing to resend yet
        self.assertEqual(self.sent_count(), 0)
        tx.respond(make_response(req, 200, to_tag="t"))
        self.layer.request_received(request("OPTIONS"), udp_source())
        self.assertEqual(self.sent_count(), 2)
        self.clock.advance(31.999)
        self.assertEqual(tx.state, "Completed")
        self.clock.advance(0.001)
        self.assertEqual(tx.state, "Terminated")
        self.layer.request_received(request("OPTIONS"), udp_source())
        self.assertEqual(len(self.user.requests), 2)  # a new transaction now

    def test_provisional_then_final(self):
        self.layer.request_received(request("BYE"), udp_source())
        tx, req = self.user.requests[0]
        tx.respond(make_response(req, 100))
        self.assertEqual(tx.state, "Proceeding")
        self.layer.request_received(request("BYE"), udp_source())
        self.assertEqual([m.status for m, _ in self.transports.messages()], [100, 100])
        tx.respond(make_response(req, 200, to_tag="t"))
        self.assertEqual(tx.state, "Completed")
        tx.respond(make_response(req, 500, to_tag="t"))  # late: dropped
        self.assertEqual(self.sent_count(), 3)

    def test_response_follows_received_and_rport(self):
        req = request("OPTIONS")
        via = req.top_via.with_param("rport", "40000").with_param("received", "203.0.113.9")
        req = req.with_headers(req.headers.remove_first_value("via").prepend("Via", str(via)))
        self.layer.request_received(req, Source("UDP", "203.0.113.9", 40000))
        tx, _ = self.user.requests[0]
        self.assertEqual(tx.destination, Destination("UDP", "203.0.113.9", 40000))

    def test_response_without_rport_goes_to_via_port(self):
        self.layer.request_received(request("OPTIONS"), udp_source("192.0.2.50", 49152))
        tx, _ = self.user.requests[0]
        self.assertEqual(tx.destination, Destination("UDP", "192.0.2.50", 5060))


class ClientTests(Base):
    dest = Destination("UDP", "192.0.2.99", 5060)

    def start(self, method="INVITE"):
        self.responses, self.timeouts = [], []
        return self.layer.start_client(request(method, branch="z9hG4bKclient"), self.dest,
                                       self.responses.append, lambda: self.timeouts.append(True))

    def response(self, status, method="INVITE"):
        resp = make_response(request(method, branch="z9hG4bKclient"), status, to_tag="callee")
        self.layer.response_received(parse_message(resp.serialize()), udp_source("192.0.2.99"))

    def sent_times(self, until):
        times = []
        while self.clock.seconds() < until:
            before = self.sent_count()
            self.clock.advance(0.25)
            if self.sent_count() > before:
                times.append(self.clock.seconds())
        return times

    def test_timer_a_doubles_and_timer_b_times_out(self):
        tx = self.start()
        self.assertEqual(self.sent_count(), 1)
        self.assertEqual(self.sent_times(31.75), [0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        self.assertEqual(self.timeouts, [])
        self.clock.advance(0.25)
        self.assertEqual(self.timeouts, [True])
        self.assertEqual(tx.state, "Terminated")

    def test_provisional_stops_a_and_b(self):
        tx = self.start()
        self.response(180)
        self.assertEqual(tx.state, "Proceeding")
        self.clock.advance(100)
        self.assertEqual(self.sent_count(), 1)
        self.assertEqual(self.timeouts, [])

    def test_non_2xx_final_is_acked_and_timer_d(self):
        tx = self.start()
        self.response(486)
        self.assertEqual(tx.state, "Completed")
        ack, dest = self.transports.messages()[-1]
        self.assertEqual((ack.method, ack.cseq.method, ack.to.tag, ack.top_via.branch), ("ACK", "ACK", "callee", "z9hG4bKclient"))
        self.assertEqual(dest, self.dest)
        self.response(486)  # retransmission: ACK again, not passed up
        self.assertEqual(len(self.responses), 1)
        self.assertEqual(self.transports.messages()[-1][0].method, "ACK")
        self.clock.advance(31.999)
        self.assertEqual(tx.state, "Completed")
        self.clock.advance(0.001)
        self.assertEqual(tx.state, "Terminated")

    def test_2xx_passes_up_including_retransmissions_in_accepted(self):
        tx = self.start()
        self.response(200)
        self.response(200)
        self.assertEqual([r.status for r in self.responses], [200, 200])
        self.assertEqual(tx.state, "Accepted")
        self.clock.advance(32)
        self.assertEqual(tx.state, "Terminated")
        self.response(200)
        self.assertEqual([r.status for r in self.layer.user.strays], [200])

    def test_non_invite_timer_e_caps_at_t2_and_f(self):
        self.start("OPTIONS")
        times = self.sent_times(31.75)
        self.assertEqual(times[:6], [0.5, 1.5, 3.5, 7.5, 11.5, 15.5])
        self.clock.advance(0.25)
        self.assertEqual(self.timeouts, [True])

    def test_non_invite_proceeding_retransmits_every_t2(self):
        self.start("OPTIONS")
        self.response(100, "OPTIONS")
        times = self.sent_times(12)
        self.assertEqual(times, [0.5, 4.5, 8.5])

    def test_non_invite_final_then_timer_k(self):
        tx = self.start("OPTIONS")
        self.response(200, "OPTIONS")
        self.assertEqual(tx.state, "Completed")
        self.response(200, "OPTIONS")
        self.assertEqual(len(self.responses), 1)
        self.clock.advance(4.999)
        self.assertEqual(tx.state, "Completed")
        self.clock.advance(0.001)
        self.assertEqual(tx.state, "Terminated")

    def test_configured_timers(self):
        self.layer.timers = Timers(t1=0.1, t2=0.4, t4=1.0)
        self.start("OPTIONS")
        self.clock.advance(6.399)
        self.assertEqual(self.timeouts, [])
        self.clock.advance(0.001)
        self.assertEqual(self.timeouts, [True])


class UnansweredTests(SynchronousTestCase):
    def test_a_non_invite_the_core_never_answers_ends_with_500(self):
        from twisted.internet.task import Clock

        from proxy.testing import make_server, sip_bytes, udp_source

        # A core that forgets to answer.
        server, transports, clock = make_server(Clock(), methods={"OPTIONS": lambda tx, request: None})
        server.data_received(sip_bytes("""
            OPTIONS sip:1002@example.com SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKlost
            From: <sip:a@example.com>;tag=1
            To: <sip:1002@example.com>
            Call-ID: lost
            CSeq: 1 OPTIONS
            Max-Forwards: 70
        """), udp_source())
        clock.advance(64 * 0.5 + 2 * 5 - 0.001)  # Timer U: 64*T1 + 2*T4
        self.assertEqual(transports.take(), [])
        clock.advance(0.001)
        ((answer, _),) = transports.take()
        self.assertEqual(answer.status, 500)
        self.assertEqual(server.transactions.server, {})
        self.assertEqual(server.transactions.unanswered, 1)


class LingeringTests(Base):
    """Absorbing states keep only what absorbing needs, on the layer's shared deadline queues."""

    def test_completed_non_invite_keeps_only_the_bytes_to_resend(self):
        self.layer.request_received(request("REGISTER"), udp_source())
        tx, req = self.user.requests[0]
        tx.respond(make_response(req, 200, to_tag="t"))
        self.assertIsNone(tx.request)
        self.assertTrue(tx.lingering)
        # The layer's queues (J, and U's whose entry was cancelled), not a callLater of its own.
        self.assertEqual(sorted(c.getTime() for c in self.clock.getDelayedCalls()), [32.0, 42.0])
        self.layer.request_received(request("REGISTER"), udp_source())
        self.assertEqual([m.status for m, _ in self.transports.messages()], [200, 200])

    def test_many_lingering_transactions_share_one_timer(self):
        for i in range(50):
            self.layer.request_received(request("OPTIONS", branch=f"z9hG4bK{i}"), udp_source())
            tx, req = self.user.requests[-1]
            tx.respond(make_response(req, 200, to_tag="t"))
            self.clock.advance(0.1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)  # J's queue and U's
        self.assertEqual(len(self.layer.server), 50)
        self.clock.advance(32 - 5)  # the first ends at 32 s, the others after it, in order
        self.assertEqual(len(self.layer.server), 49)
        self.clock.advance(5)
        self.assertEqual(len(self.layer.server), 0)
        self.clock.advance(10)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_full_table_ends_the_oldest_answered_transaction_before_refusing_new_work(self):
        # At 3,125 registrations/s their answered transactions alone (Timer J, 32 s) would fill 100,000.
        self.layer.max_server = 3
        for i in range(3):
            self.layer.request_received(request("REGISTER", branch=f"z9hG4bKdone{i}"), udp_source())
            tx, req = self.user.requests[-1]
            tx.respond(make_response(req, 200, to_tag="t"))
        oldest = self.user.requests[0][0]
        self.layer.request_received(request("REGISTER", branch="z9hG4bKnew"), udp_source())
        self.assertEqual(len(self.user.requests), 4)  # let in, not refused
        self.assertEqual((oldest.state, self.layer.made_room, len(self.layer.server)), ("Terminated", 1, 3))
        self.assertEqual(self.layer.deadlines.pending(), 3)  # its Timer J let go: two J left, the new one's U
        self.assertFalse(self.layer.has_branch("z9hG4bKdone0"))
        # Transactions under way are never ended early: with only those left, new work is refused.
        self.layer.request_received(request("REGISTER", branch="z9hG4bKnew2"), udp_source())
        self.layer.request_received(request("REGISTER", branch="z9hG4bKnew3"), udp_source())
        self.assertEqual(len(self.user.requests), 6)
        self.layer.request_received(request("REGISTER", branch="z9hG4bKnew4"), udp_source())
        self.assertEqual((len(self.user.requests), self.user.refused), (6, ["transaction_table_full"]))
        self.assertEqual(self.layer.made_room, 3)

    def test_the_queue_of_answered_transactions_empties_with_their_timers(self):
        for i in range(20):
            self.layer.request_received(request("OPTIONS", branch=f"z9hG4bKq{i}"), udp_source())
            tx, req = self.user.requests[-1]
            tx.respond(make_response(req, 200, to_tag="t"))
        self.assertEqual(len(self.layer.absorbing), 20)
        self.clock.advance(32)
        self.assertEqual((len(self.layer.server), len(self.layer.absorbing)), (0, 0))  # no history kept

    def test_accepted_invite_and_late_answer_from_the_core_is_ignored(self):
        self.layer.request_received(request(), udp_source())
        tx, req = self.user.requests[0]
        tx.respond(make_response(req, 200, to_tag="t"))
        self.assertEqual(tx.state, "Accepted")
        self.assertIsNone(tx.request)
        self.layer.request_received(request(), udp_source())  # retransmitted INVITE: absorbed
        self.assertEqual(self.sent_count(), 1)
        forked = make_response(req, 200, to_tag="other")
        tx.respond(forked)  # a 2xx from another fork still passes, and is not kept
        self.assertEqual(self.sent_count(), 2)
        self.assertIsNone(tx.request)

    def test_client_invite_completed_acks_a_retransmitted_final_without_its_request(self):
        dest = Destination("UDP", "192.0.2.99", 5060)
        responses = []
        tx = self.layer.start_client(request(branch="z9hG4bKclient"), dest, responses.append, lambda: None)
        final = make_response(request(branch="z9hG4bKclient"), 486, to_tag="callee")
        self.layer.response_received(parse_message(final.serialize()), udp_source("192.0.2.99"))
        self.assertIsNone(tx.request)
        self.layer.response_received(parse_message(final.serialize()), udp_source("192.0.2.99"))
        acks = [m for m, _ in self.transports.messages() if getattr(m, "method", "") == "ACK"]
        self.assertEqual(len(acks), 2)
        self.assertEqual(acks[0].serialize(), acks[1].serialize())
        self.assertEqual(len(responses), 1)
