"""Bye/Also completed by the proxy (RFC 3725 flow I) when A would ignore Also, on a Clock through the whole core."""

from twisted.trial.unittest import SynchronousTestCase

from proxy.sip.message import Request, make_response
from proxy.testing import sip_bytes
from tests.test_router import A, B, REALM, Net, requests, statuses

C = ("192.0.2.13", 5060)
OFFER = b"v=0\r\no=A 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\nm=audio 20000 RTP/AVP 0\r\n"
ANSWER = b"v=0\r\no=C 1 1 IN IP4 192.0.2.13\r\ns=-\r\nc=IN IP4 192.0.2.13\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\n"


class ByeAlsoTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.net.register("1002", B)
        self.net.register("1003", C)
        self.records = []
        self.net.core.dialogs.on_record = self.records.append

    def call(self, agent="Generic-UA/1.0"):
        """1001 (A) calls 1002 (B), B answers: the dialog the transfer starts from."""
        sent = self.net.invite(extra=f"User-Agent: {agent}")
        ((invite, _),) = requests(sent, "INVITE")
        self.net.answer(invite, 200, B, contact="<sip:1002@192.0.2.11:5060>",
                        extra=(("Record-Route", f"<{self.net.rr()}>"),))

    def bye_also(self):
        self.net.send(sip_bytes(f"""
            BYE sip:1001@192.0.2.10:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.11:5060;branch=z9hG4bKbyealso
            Route: <{self.net.rr()}>
            Max-Forwards: 70
            From: <sip:1002@{REALM}>;tag=callee-tag
            To: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            Call-ID: call-1
            CSeq: 7 BYE
            Also: <sip:1003@{REALM}>
        """), B)
        return self.net.take()

    def reply(self, request: Request, status: int, source, *, tag=None, body=b"", contact=None):
        extra = ((("Contact", contact),) if contact else ()) + ((("Content-Type", "application/sdp"),) if body else ())
        response = make_response(request, status, to_tag=tag, extra=extra, body=body)
        self.net.send(response.serialize(), source)
        return self.net.take()

    def through_to_c(self):
        self.call()
        sent = self.bye_also()
        self.assertEqual(statuses(sent), [200])  # B's BYE answered by the proxy itself
        ((reinvite, dest),) = requests(sent, "INVITE")
        self.assertEqual(((dest.host, dest.port), reinvite.uri_text, reinvite.body), (A, "sip:1001@192.0.2.10:5060", b""))
        self.assertEqual((reinvite.from_.tag, reinvite.to.tag, reinvite.cseq.number), ("callee-tag", "caller-tag", 8))
        self.assertEqual([c["state"] for c in self.net.core.dialogs.calls()], ["transferring"])
        sent = self.reply(reinvite, 200, A, body=OFFER, contact="<sip:1001@192.0.2.10:5060>")
        ((invite_c, dest),) = requests(sent, "INVITE")
        self.assertEqual(((dest.host, dest.port), invite_c.body), (C, OFFER))
        self.assertEqual(invite_c.headers.get("referred-by"), f"<sip:1002@{REALM}>")
        self.assertEqual(invite_c.headers.get("requested-by"), f"<sip:1002@{REALM}>")
        self.assertEqual(invite_c.from_.uri_text, f"sip:1001@{REALM}")
        return reinvite, invite_c

    def test_a_that_ignores_also_gets_c_through_the_proxy(self):
        reinvite, invite_c = self.through_to_c()
        self.assertEqual(self.reply(invite_c, 180, C, tag="c-tag"), [])
        sent = self.reply(invite_c, 200, C, tag="c-tag", body=ANSWER, contact="<sip:1003@192.0.2.13:5060>")
        acks = {(d.host, d.port): m for m, d in requests(sent, "ACK")}
        self.assertEqual(set(acks), {A, C})
        self.assertEqual(acks[A].body, ANSWER)  # A gets C's answer: media flows A <-> C
        self.assertEqual(acks[A].cseq.number, 8)
        self.assertEqual(acks[C].uri_text, "sip:1003@192.0.2.13:5060")
        (call,) = self.net.core.dialogs.calls()
        self.assertEqual((call["state"], call["transfer"]), ("up", "bye-also-completed"))
        # A retransmits its 200 (our ACK was lost): it gets the ACK again.
        sent = self.reply(reinvite, 200, A, body=OFFER)
        self.assertEqual([m.body for m, _ in requests(sent, "ACK")], [ANSWER])
        # C hangs up: 200 to C, BYE to A in A's dialog.
        self.net.send(sip_bytes(f"""
            BYE sip:transfer@{self.net.core.identity.advertise_host}:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.13:5060;branch=z9hG4bKcbye
            Max-Forwards: 70
            From: <sip:1003@{REALM}>;tag=c-tag
            To: {invite_c.headers.get("from")}
            Call-ID: {invite_c.call_id}
            CSeq: 1 BYE
        """), C)
        sent = self.net.take()
        self.assertEqual(statuses(sent), [200])
        ((bye_a, dest),) = requests(sent, "BYE")
        self.assertEqual(((dest.host, dest.port), bye_a.call_id, bye_a.cseq.number), (A, "call-1", 9))
        (record,) = self.records
        self.assertEqual((record.transfer, record.ended_by), ("bye-also-completed", "transfer_target"))

    def test_c_busy_a_gets_a_bye(self):
        reinvite, invite_c = self.through_to_c()
        sent = self.reply(invite_c, 486, C, tag="c-tag")
        methods = sorted(m.method for m, _ in requests(sent))
        self.assertEqual(methods, ["ACK", "ACK", "BYE"])  # C's 486 ACKed; A's 200 ACKed, then BYE
        self.assertEqual(self.records[0].ended_by, "failed")

    def test_c_does_not_answer_in_time(self):
        reinvite, invite_c = self.through_to_c()
        self.reply(invite_c, 180, C, tag="c-tag")
        self.net.clock.advance(20)
        sent = self.net.take()
        self.assertEqual(sorted(m.method for m, _ in requests(sent)), ["ACK", "BYE", "CANCEL"])

    def test_a_hangs_up_while_c_rings(self):
        reinvite, invite_c = self.through_to_c()
        self.reply(invite_c, 180, C, tag="c-tag")
        self.net.send(sip_bytes(f"""
            BYE sip:transfer@{self.net.core.identity.advertise_host}:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKabye
            Route: <{self.net.rr()}>
            Max-Forwards: 70
            From: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            To: <sip:1002@{REALM}>;tag=callee-tag
            Call-ID: call-1
            CSeq: 3 BYE
        """), A)
        sent = self.net.take()
        self.assertEqual(statuses(sent), [200])
        ((cancel, dest),) = requests(sent, "CANCEL")
        self.assertEqual(((dest.host, dest.port), cancel.call_id), (C, invite_c.call_id))
        self.assertEqual(self.records[0].ended_by, "transferee")

    def test_glare_while_the_proxy_reinvites_a(self):
        self.call()
        ((reinvite, _),) = requests(self.bye_also(), "INVITE")
        self.net.send(sip_bytes(f"""
            INVITE sip:transfer@{self.net.core.identity.advertise_host}:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKglare
            Route: <{self.net.rr()}>
            Max-Forwards: 70
            From: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            To: <sip:1002@{REALM}>;tag=callee-tag
            Call-ID: call-1
            CSeq: 3 INVITE
        """), A)
        self.assertEqual(statuses(self.net.take()), [491])  # RFC 3261 14.1: the other side tries again later

    def test_a_refuses_the_reinvite(self):
        self.call()
        ((reinvite, _),) = requests(self.bye_also(), "INVITE")
        sent = self.reply(reinvite, 488, A)
        self.assertEqual(sorted(m.method for m, _ in requests(sent)), ["ACK", "BYE"])

    def test_the_transfer_is_held_to_what_b_may_dial(self):
        # The proxy calls C on B's word: a policy that refuses B that number keeps the proxy out of it.
        from zope.interface import implementer

        from proxy.plugin import Continue, IProxyPlugin, IRequestPolicy, Respond

        @implementer(IProxyPlugin, IRequestPolicy)
        class NoCallsTo1003:
            name = "no-1003"

            def check_request(self, request, source, user):
                self.asked = user
                return Respond(403, "Not allowed") if request.uri.user == "1003" else Continue()

        policy = NoCallsTo1003()
        self.net.core.plugins.add(policy)
        self.call()
        sent = self.bye_also()
        ((bye, _),) = requests(sent, "BYE")  # relayed as it came: A hangs up, no call to C is made for B
        self.assertEqual(requests(sent, "INVITE"), [])
        self.assertEqual((bye.headers.get("also"), policy.asked), (f"<sip:1003@{REALM}>", "1002"))  # asked for B

    def test_a_transferor_that_is_not_our_user_gets_no_call_made(self):
        self.call()
        self.net.send(sip_bytes(f"""
            BYE sip:1001@192.0.2.10:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.11:5060;branch=z9hG4bKbyealso2
            Route: <{self.net.rr()}>
            Max-Forwards: 70
            From: <sip:stranger@elsewhere.example>;tag=callee-tag
            To: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            Call-ID: call-1
            CSeq: 7 BYE
            Also: <sip:1003@{REALM}>
        """), B)
        sent = self.net.take()
        self.assertEqual((len(requests(sent, "BYE")), requests(sent, "INVITE")), (1, []))

    def test_a_cisco_phone_gets_the_bye_with_also_untouched(self):
        self.call(agent="Cisco-SIPIPPhone/7.5")
        sent = self.bye_also()
        ((bye, dest),) = requests(sent, "BYE")
        self.assertEqual(((dest.host, dest.port), bye.headers.get("also")), (A, f"<sip:1003@{REALM}>"))
        self.assertEqual(self.records[0].transfer, "bye-also")
