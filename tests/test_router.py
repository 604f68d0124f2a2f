"""The proxy core on a Clock: calls, auth, forking, best response, Timer C, CANCEL, routes, loops, relay."""

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.registration.auth import parse_digest
from proxy.config import EmergencyConfig, ProxySettings, RouteConfig
from proxy.registration.credentials import UserRecord, compute_ha1, locked_users
from proxy.registration.location import Binding
from proxy.routing.dns import NextHopResolver
from proxy.sip.message import Request, make_response
from proxy.sip.wire import parse_message
from proxy.testing import make_core, sip_bytes, udp_source
from proxy.transport import Destination
from proxy.trust import load_route_signer
from tests.test_auth import client_answer

REALM = "example.com"
PROXY = "192.0.2.1"
A = ("192.0.2.10", 5060)
B = ("192.0.2.11", 5060)
B2 = ("192.0.2.12", 5060)
GW1 = ("192.0.2.20", 5060)
GW2 = ("192.0.2.21", 5060)


class Net:
    """The proxy on a Clock, plus helpers to play phones and gateways around it."""

    def __init__(self, test, settings=ProxySettings(), routes=(), emergency=EmergencyConfig(gateways=("192.0.2.30",)),
                 forwarding_config=None):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir)
        users_path = os.path.join(self.dir, "users.json")
        with locked_users(users_path) as users:
            for name in ("1001", "1002", "1003", "1004"):
                users[name] = UserRecord(name, REALM, compute_ha1(name, REALM, "secret"))
        sections = {"proxy": settings, "routes": tuple(routes), "emergency": emergency}
        if forwarding_config is not None:
            sections["forwarding"] = forwarding_config
        # The object graph exactly as the server builds it (proxy/core.py).
        self.core, self.transports, _ = make_core(self.dir, self.clock, domains=(REALM,), addresses=(PROXY,),
                                                  **sections)
        self.server = self.core.server
        self.location = self.core.location
        self.auth = self.core.authenticator
        self.forwarding = self.core.forwarding
        self.trust = self.core.trust
        self.router = self.core.router
        self.cseq = 0

    def rr(self, call_id="call-1"):
        """Our signed Record-Route URI for a call, as a phone would copy it into Route."""
        return f"sip:{PROXY}:5060;lr;sptk={self.trust.route_token(call_id)}"

    def register(self, user, host_port, q=1.0):
        self.location.save(Binding(aor=f"sip:{user}@{REALM}", contact=f"sip:{user}@{host_port[0]}:{host_port[1]}",
                                   expires_at=self.clock.seconds() + 3600, q=q, source_host=host_port[0],
                                   source_port=host_port[1]))

    def send(self, data: bytes, source):
        self.server.data_received(data, udp_source(*source))

    def take(self):
        return self.transports.take()

    def invite(self, to="1002", frm="1001", source=A, auth=True, call_id="call-1", extra="", method="INVITE",
               to_tag="", uri=None):
        """A phone's INVITE through the proxy; with auth, answers the 407 first. Returns what the proxy sent."""
        self.cseq += 1
        uri = uri or f"sip:{to}@{REALM}"
        text = f"""
            {method} {uri} SIP/2.0
            Via: SIP/2.0/UDP {source[0]}:{source[1]};branch=z9hG4bK{os.urandom(4).hex()}
            Max-Forwards: 70
            From: "Caller" <sip:{frm}@{REALM}>;tag=caller-tag
            To: <sip:{to}@{REALM}>{to_tag}
            Call-ID: {call_id}
            CSeq: {self.cseq} {method}
            Contact: <sip:{frm}@{source[0]}:{source[1]}>
            {extra}
        """
        self.send(sip_bytes(text), source)
        sent = self.take()
        if not auth:
            return sent
        challenge = [m for m, _ in sent if getattr(m, "status", 0) == 407]
        assert challenge, sent
        # The phone ACKs the 407 (seed 001, authentication flow step 3).
        first = parse_message(sip_bytes(text))
        ack = (f"ACK {first.uri_text} SIP/2.0\nVia: {first.headers.get('via')}\nMax-Forwards: 70\n"
               f"From: {first.headers.get('from')}\nTo: {challenge[0].headers.get('to')}\n"
               f"Call-ID: {call_id}\nCSeq: {self.cseq} ACK")
        self.send(sip_bytes(ack), source)
        assert self.take() == []
        nonce = parse_digest(challenge[0].headers.get("proxy-authenticate"))["nonce"]
        self.cseq += 1
        answer = client_answer(frm, "secret", nonce, method=method, uri=uri, qop="auth",
                               header="Proxy-Authorization")
        text = text.replace(f"CSeq: {self.cseq - 1}", f"CSeq: {self.cseq}").replace("branch=z9hG4bK", "branch=z9hG4bKa")
        self.send(sip_bytes(text + "\n" + answer), source)
        return self.take()

    def answer(self, request: Request, status: int, source, to_tag="callee-tag", contact=None, extra=()):
        """A downstream UA's response to a request the proxy forwarded to it."""
        headers = extra + ((("Contact", contact),) if contact else ())
        response = make_response(request, status, to_tag=to_tag, extra=headers)
        self.send(response.serialize(), source)
        return self.take()


def requests(sent, method=None):
    return [(m, d) for m, d in sent if isinstance(m, Request) and (method is None or m.method == method)]


def statuses(sent):
    return [m.status for m, _ in sent if not isinstance(m, Request)]


class BasicCallTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.net.register("1002", B)

    def test_unauthenticated_invite_gets_a_stateless_407(self):
        sent = self.net.invite(auth=False)
        self.assertEqual(statuses(sent), [407])  # no 100: nothing is held for a stranger's INVITE
        self.assertIn('realm="example.com"', sent[0][0].headers.get("proxy-authenticate"))
        self.assertEqual(self.net.server.transactions.counts()["server_invite"], 0)
        self.net.clock.advance(0.5)  # no Timer G retransmission either
        self.assertEqual(self.net.take(), [])

    def test_the_challenge_goes_to_the_source_never_to_a_received_or_maddr_the_client_chose(self):
        self.net.send(sip_bytes(f"""
            INVITE sip:1002@{REALM} SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKamp;received=203.0.113.99;maddr=203.0.113.98
            Max-Forwards: 70
            From: <sip:1001@{REALM}>;tag=1
            To: <sip:1002@{REALM}>
            Call-ID: amp
            CSeq: 1 INVITE
        """), A)
        sent = self.net.take()
        self.assertEqual([(m.status, d) for m, d in sent], [(407, Destination("UDP", *A))])
        self.net.clock.advance(40)
        self.assertEqual(self.net.take(), [])

    def test_the_ack_for_a_stateless_challenge_is_absorbed(self):
        self.net.invite()  # answers the 407 with an ACK and asserts nothing is sent for it
        self.assertEqual(self.net.server.dropped["ack_for_stateless_answer"], 1)
        self.assertEqual(self.net.server.dropped["unsigned_ack"], 0)

    def test_full_call_through_the_proxy(self):
        sent = self.net.invite()
        self.assertEqual(statuses(sent), [100])
        ((invite, dest),) = requests(sent, "INVITE")
        self.assertEqual(dest, Destination("UDP", *B))
        self.assertEqual(invite.uri_text, "sip:1002@192.0.2.11:5060")
        self.assertEqual(invite.max_forwards, 69)
        self.assertEqual(invite.headers.get("record-route"), f"<{self.net.rr()}>")
        self.assertEqual(invite.top_via.host, PROXY)
        self.assertIsNone(invite.headers.get("proxy-authorization"))  # our realm's credentials consumed

        ringing = self.net.answer(invite, 180, B)
        self.assertEqual(statuses(ringing), [180])
        (resp, to_a), = ringing
        self.assertEqual(to_a, Destination("UDP", *A))
        self.assertEqual(len(resp.vias), 1)  # our Via removed

        ok = self.net.answer(invite, 200, B, contact="<sip:1002@192.0.2.11:5060>",
                             extra=(("Record-Route", f"<{self.net.rr()}>"),))
        self.assertEqual(statuses(ok), [200])

        # ACK for the 2xx follows the route set, statelessly, to the callee's contact.
        self.net.send(sip_bytes(f"""
            ACK sip:1002@192.0.2.11:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKack1
            Route: <{self.net.rr()}>
            Max-Forwards: 70
            From: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            To: <sip:1002@{REALM}>;tag=callee-tag
            Call-ID: call-1
            CSeq: {self.net.cseq} ACK
            Proxy-Authorization: Digest username="1001", realm="example.com", nonce="x", uri="y", response="z"
        """), A)
        ((ack, dest),) = requests(self.net.take(), "ACK")
        self.assertEqual((ack.uri_text, dest), ("sip:1002@192.0.2.11:5060", Destination("UDP", *B)))
        self.assertIsNone(ack.headers.get("route"))

        # The callee hangs up: BYE along the route set back to the caller, 200 relayed.
        self.net.send(sip_bytes(f"""
            BYE sip:1001@192.0.2.10:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.11:5060;branch=z9hG4bKbye1
            Route: <{self.net.rr()}>
            Max-Forwards: 70
            From: <sip:1002@{REALM}>;tag=callee-tag
            To: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            Call-ID: call-1
            CSeq: 1 BYE
        """), B)
        ((bye, dest),) = requests(self.net.take(), "BYE")
        self.assertEqual(dest, Destination("UDP", *A))
        self.assertEqual(statuses(self.net.answer(bye, 200, A, to_tag=None)), [200])

    def test_hold_reinvite_follows_route_without_challenge(self):
        self.net.send(sip_bytes(f"""
            INVITE sip:1002@192.0.2.11:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKhold
            Route: <{self.net.rr()}>
            Max-Forwards: 70
            From: <sip:1001@{REALM}>;tag=caller-tag
            To: <sip:1002@{REALM}>;tag=callee-tag
            Call-ID: call-1
            CSeq: 5 INVITE
            Content-Type: application/sdp
        """, b"v=0\r\nc=IN IP4 0.0.0.0\r\n"), A)
        sent = self.net.take()
        self.assertEqual(statuses(sent), [100])
        ((reinvite, dest),) = requests(sent, "INVITE")
        self.assertEqual(dest, Destination("UDP", *B))
        self.assertIn(b"0.0.0.0", reinvite.body)
        self.assertIsNone(reinvite.headers.get("record-route"))

    def test_in_dialog_refer_notify_info_follow_the_route_set(self):
        for n, method in enumerate(("REFER", "NOTIFY", "INFO")):
            with self.subTest(method):
                extra = "Refer-To: <sip:1003@example.com>\nReferred-By: <sip:1001@example.com>" if method == "REFER" else ""
                self.net.send(sip_bytes(f"""
                    {method} sip:1002@192.0.2.11:5060 SIP/2.0
                    Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKdlg{n}
                    Route: <{self.net.rr()}>
                    Max-Forwards: 70
                    From: <sip:1001@{REALM}>;tag=caller-tag
                    To: <sip:1002@{REALM}>;tag=callee-tag
                    Call-ID: call-1
                    CSeq: {10 + n} {method}
                    Event: refer
                    {extra}
                """), A)
                sent = self.net.take()
                ((forwarded, dest),) = requests(sent, method)
                self.assertEqual(dest, Destination("UDP", *B))
                self.assertEqual(statuses(sent), [])  # no challenge, no 100 for non-INVITE
                if method == "REFER":
                    # Transfer headers pass through untouched (DESIGN: REFER, Refer-To, Referred-By).
                    self.assertEqual(forwarded.headers.get("refer-to"), "<sip:1003@example.com>")
                    self.assertEqual(forwarded.headers.get("referred-by"), "<sip:1001@example.com>")
                self.assertEqual(statuses(self.net.answer(forwarded, 202 if method == "REFER" else 200, B)),
                                 [202 if method == "REFER" else 200])

    def test_unknown_user_404_and_unregistered_user_480(self):
        self.assertEqual(statuses(self.net.invite(to="9999")), [100, 404])
        self.assertEqual(statuses(self.net.invite(to="1003")), [100, 480])

    def test_from_must_match_credentials(self):
        sent = self.net.invite(frm="1003")  # authenticates as 1003 with 1003's password: allowed
        self.assertEqual(statuses(sent), [100])
        self.net.send(sip_bytes(f"""
            INVITE sip:1002@{REALM} SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKspoof
            Max-Forwards: 70
            From: <sip:1002@{REALM}>;tag=x
            To: <sip:1002@{REALM}>
            Call-ID: spoof
            CSeq: 1 INVITE
        """), A)
        nonce = parse_digest(self.net.take()[0][0].headers.get("proxy-authenticate"))["nonce"]
        self.net.send(sip_bytes(f"""
            INVITE sip:1002@{REALM} SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKspoof2
            Max-Forwards: 70
            From: <sip:1002@{REALM}>;tag=x
            To: <sip:1002@{REALM}>
            Call-ID: spoof
            CSeq: 2 INVITE
            {client_answer("1001", "secret", nonce, method="INVITE", uri=f"sip:1002@{REALM}", qop="auth", header="Proxy-Authorization")}
        """), A)
        sent = self.net.take()
        self.assertEqual(sent[-1][0].reason, "From does not match the credentials")


class ValidationTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.net.register("1002", B)

    def test_max_forwards_zero(self):
        sent = self.net.invite(auth=False, extra="").copy()
        self.net.send(sip_bytes(f"""
            INVITE sip:1002@{REALM} SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKmf0
            Max-Forwards: 0
            From: <sip:1001@{REALM}>;tag=1
            To: <sip:1002@{REALM}>
            Call-ID: mf0
            CSeq: 1 INVITE
        """), A)
        self.assertEqual(statuses(self.net.take()), [483])
        self.net.send(sip_bytes(f"""
            OPTIONS sip:1002@{REALM} SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bKmf0o
            Max-Forwards: 0
            From: <sip:1001@{REALM}>;tag=1
            To: <sip:1002@{REALM}>
            Call-ID: mf0o
            CSeq: 1 OPTIONS
        """), A)
        self.assertEqual(statuses(self.net.take()), [200])
        self.assertTrue(sent)

    def test_proxy_require_is_420(self):
        sent = self.net.invite(auth=False, extra="Proxy-Require: foo")
        self.assertEqual(sent[-1][0].status, 420)
        self.assertEqual(sent[-1][0].headers.get("unsupported"), "foo")

    def test_loop_is_482_but_spiral_passes(self):
        sent = self.net.invite()
        ((invite, _),) = requests(sent, "INVITE")
        # A downstream proxy sends it back with the Request-URI we received: the same request, a loop.
        def via_downstream(request, branch):
            return request.with_headers(request.headers.prepend("Via", f"SIP/2.0/UDP 192.0.2.11:5060;branch={branch}"))

        looped = via_downstream(invite.with_uri(f"sip:1002@{REALM}"), "z9hG4bKdown1")
        self.net.send(looped.serialize(), B)
        self.assertEqual(statuses(self.net.take())[-1], 482)
        # With another Request-URI it is a spiral, and goes on (to authentication here).
        self.net.send(via_downstream(invite, "z9hG4bKdown2").serialize(), B)
        self.assertNotEqual(statuses(self.net.take())[-1], 482)

    def test_open_relay_attempt_is_403(self):
        self.net.send(sip_bytes("""
            INVITE sip:victim@elsewhere.example.net SIP/2.0
            Via: SIP/2.0/UDP 198.51.100.66:5060;branch=z9hG4bKrelay
            Max-Forwards: 70
            From: <sip:spammer@spam.example.org>;tag=1
            To: <sip:victim@elsewhere.example.net>
            Call-ID: relay
            CSeq: 1 INVITE
        """), ("198.51.100.66", 5060))
        sent = self.net.take()
        self.assertEqual((statuses(sent)[-1], sent[-1][0].reason), (403, "Relaying Not Allowed"))
        self.assertEqual(requests(sent), [])

    def test_in_dialog_request_not_through_us_to_elsewhere_is_403(self):
        self.net.send(sip_bytes("""
            BYE sip:victim@198.51.100.9 SIP/2.0
            Via: SIP/2.0/UDP 198.51.100.66:5060;branch=z9hG4bKdlg
            Max-Forwards: 70
            From: <sip:x@spam.example.org>;tag=1
            To: <sip:victim@elsewhere.example.net>;tag=2
            Call-ID: dlg
            CSeq: 1 BYE
        """), ("198.51.100.66", 5060))
        self.assertEqual(statuses(self.net.take()), [403])

    def test_strict_routing_upstream(self):
        # 16.4: the Request-URI is our Record-Route URI; the last Route is the real target.
        self.net.send(sip_bytes(f"""
            BYE {self.net.rr()} SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.11:5060;branch=z9hG4bKstrict
            Route: <sip:1001@192.0.2.10:5060>
            Max-Forwards: 70
            From: <sip:1002@{REALM}>;tag=callee-tag
            To: <sip:1001@{REALM}>;tag=caller-tag
            Call-ID: call-1
            CSeq: 2 BYE
        """), B)
        ((bye, dest),) = requests(self.net.take(), "BYE")
        self.assertEqual((bye.uri_text, dest), ("sip:1001@192.0.2.10:5060", Destination("UDP", *A)))
        self.assertIsNone(bye.headers.get("route"))


class ForkingTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self)
        self.net.register("1002", B)
        self.net.register("1002", B2)

    def forked(self):
        sent = self.net.invite()
        invites = {d: m for m, d in requests(sent, "INVITE")}
        self.assertEqual(set(invites), {Destination("UDP", *B), Destination("UDP", *B2)})
        return invites[Destination("UDP", *B)], invites[Destination("UDP", *B2)]

    def test_one_busy_one_answers(self):
        b, b2 = self.forked()
        self.net.answer(b, 180, B)
        self.assertEqual(statuses(self.net.answer(b2, 486, B2)), [])  # stored, ACKed hop by hop
        sent = self.net.answer(b, 200, B)
        self.assertEqual(statuses(sent), [200])

    def test_2xx_cancels_the_other_ringing_branch(self):
        b, b2 = self.forked()
        self.net.answer(b, 180, B)
        self.net.answer(b2, 180, B2)
        sent = self.net.answer(b, 200, B)
        cancels = requests(sent, "CANCEL")
        self.assertEqual([d for _, d in cancels], [Destination("UDP", *B2)])
        self.assertEqual(cancels[0][0].top_via.branch, b2.top_via.branch)

    def test_6xx_cancels_others_and_wins(self):
        b, b2 = self.forked()
        self.net.answer(b, 180, B)
        sent = self.net.answer(b2, 603, B2)
        self.assertEqual([d for _, d in requests(sent, "CANCEL")], [Destination("UDP", *B)])
        sent = self.net.answer(b, 487, B)
        self.assertEqual(statuses(sent), [603])

    def test_best_response_prefers_busy_over_timeout_and_converts_503(self):
        b, b2 = self.forked()
        self.net.answer(b, 486, B)
        self.net.clock.advance(32)  # b2 never answers: Timer B
        final = [m for m, _ in self.net.take() if not isinstance(m, Request)]
        self.assertEqual([m.status for m in final], [486])

    def test_challenges_are_combined(self):
        b, b2 = self.forked()
        self.net.answer(b, 407, B, extra=(("Proxy-Authenticate", 'Digest realm="b"'),))
        sent = self.net.answer(b2, 401, B2, extra=(("WWW-Authenticate", 'Digest realm="b2"'),))
        (resp, _), = [(m, d) for m, d in sent if not isinstance(m, Request)]
        self.assertEqual(resp.headers.get_lines("proxy-authenticate") + resp.headers.get_lines("www-authenticate"),
                         ['Digest realm="b"', 'Digest realm="b2"'])

    def test_no_answer_anywhere_is_408(self):
        self.forked()
        self.net.clock.advance(32)
        self.assertEqual(statuses(self.net.take()), [408])

    def test_503_becomes_500(self):
        b, b2 = self.forked()
        self.net.answer(b, 503, B)
        self.assertEqual(statuses(self.net.answer(b2, 503, B2)), [500])


class TimerCTests(SynchronousTestCase):
    def test_ringing_too_long_is_cancelled_then_487(self):
        net = Net(self, settings=ProxySettings(timer_c=60))
        net.register("1002", B)
        ((invite, _),) = requests(net.invite(), "INVITE")
        net.answer(invite, 180, B)
        net.clock.advance(59.9)
        self.assertEqual(requests(net.take(), "CANCEL"), [])
        net.clock.advance(0.2)
        ((cancel, dest),) = requests(net.take(), "CANCEL")
        self.assertEqual(dest, Destination("UDP", *B))
        self.assertEqual(statuses(net.answer(invite, 487, B)), [487])


class CancelTests(SynchronousTestCase):
    def test_caller_cancels_before_answer(self):
        net = Net(self)
        net.register("1002", B)
        sent = net.invite(call_id="c-cancel")
        ((invite, _),) = requests(sent, "INVITE")
        net.answer(invite, 180, B)
        upstream_invite_branch = None
        # The caller's CANCEL has the INVITE's branch (the authenticated INVITE's).
        for line in net.server.transactions.server:
            if line[-1] == "INVITE":
                upstream_invite_branch = line[0]
        net.send(sip_bytes(f"""
            CANCEL sip:1002@{REALM} SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch={upstream_invite_branch}
            Max-Forwards: 70
            From: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            To: <sip:1002@{REALM}>
            Call-ID: c-cancel
            CSeq: {net.cseq} CANCEL
        """), A)
        sent = net.take()
        self.assertEqual(statuses(sent), [200])
        ((cancel, dest),) = requests(sent, "CANCEL")
        self.assertEqual(dest, Destination("UDP", *B))
        self.assertEqual(statuses(net.answer(invite, 487, B)), [487])


class GatewayTests(SynchronousTestCase):
    def setUp(self):
        route = RouteConfig(pattern="9[0-9]+", strip=1, gateways=("192.0.2.20", "192.0.2.21:5060"), name="pstn")
        self.net = Net(self, routes=[route], settings=ProxySettings(trusted=("192.0.2.20/32",)))

    def test_route_strips_and_fails_over_on_503(self):
        ((invite, dest),) = requests(self.net.invite(to="95551234"), "INVITE")
        self.assertEqual((invite.uri_text, dest), ("sip:5551234@192.0.2.20", Destination("UDP", *GW1)))
        sent = self.net.answer(invite, 503, GW1)
        ((second, dest),) = requests(sent, "INVITE")
        self.assertEqual((second.uri_text, dest), ("sip:5551234@192.0.2.21:5060", Destination("UDP", *GW2)))
        self.assertEqual(statuses(self.net.answer(second, 200, GW2)), [200])

    def assert_second_gateway_after(self, seconds: float, failover_after: float, route_failover=None):
        """A silent first gateway gets only retransmissions until `seconds`, then the second gets the INVITE."""
        route = RouteConfig(pattern="9[0-9]+", strip=1, gateways=("192.0.2.20", "192.0.2.21:5060"), name="pstn",
                            failover_after=route_failover)
        net = Net(self, routes=[route], settings=ProxySettings(trusted=("192.0.2.20/32",),
                                                               failover_after=failover_after))
        net.invite(to="95551234")
        net.clock.advance(seconds - 0.001)
        self.assertEqual({d for _, d in requests(net.take(), "INVITE")}, {Destination("UDP", *GW1)})
        net.clock.advance(0.001)
        ((_, dest),) = requests(net.take(), "INVITE")
        self.assertEqual(dest, Destination("UDP", *GW2))

    def test_fails_over_at_timer_b_when_failover_after_is_off(self):
        self.assert_second_gateway_after(32, failover_after=0)

    def test_branch_cancelled_after_another_answers_does_not_fail_over(self):
        # Fork to phone B and to a two-gateway target; B answers, the gateway branch is CANCELled
        # and then answers 503: it must end there, not INVITE the second gateway.
        from proxy.routing.forking import Target
        from proxy.routing.routes import Hop

        self.net.register("1002", B)
        gateway = Target(hops=(Hop(uri="sip:1002@192.0.2.20", host="192.0.2.20", port=5060),
                               Hop(uri="sip:1002@192.0.2.21", host="192.0.2.21", port=5060)), kind="gateway")
        own = self.net.router.targets.for_user
        self.net.router.targets.for_user = lambda user: own(user) + [gateway]
        sent = self.net.invite(to="1002")
        invites = {d: m for m, d in requests(sent, "INVITE")}
        to_b, to_gw = invites[Destination("UDP", *B)], invites[Destination("UDP", *GW1)]
        self.net.answer(to_gw, 180, GW1)
        sent = self.net.answer(to_b, 200, B)
        self.assertEqual([d for _, d in requests(sent, "CANCEL")], [Destination("UDP", *GW1)])
        sent = self.net.answer(to_gw, 503, GW1)
        self.assertEqual(requests(sent, "INVITE"), [])

    def test_a_silent_gateway_is_left_after_failover_after_not_timer_b(self):
        ((invite, dest),) = requests(self.net.invite(to="95551234"), "INVITE")
        self.assertEqual(dest, Destination("UDP", *GW1))
        self.net.clock.advance(3.999)  # retransmissions (Timer A) to the first gateway only
        self.assertEqual({d for _, d in requests(self.net.take(), "INVITE")}, {Destination("UDP", *GW1)})
        self.net.clock.advance(0.001)
        ((second, dest),) = requests(self.net.take(), "INVITE")
        self.assertEqual(dest, Destination("UDP", *GW2))
        self.net.clock.advance(10)  # the first gateway's transaction is abandoned: no more retransmissions to it
        self.assertNotIn(Destination("UDP", *GW1), [d for _, d in requests(self.net.take(), "INVITE")])
        self.assertEqual(statuses(self.net.answer(second, 200, GW2)), [200])

    def test_a_route_can_have_its_own_failover_time(self):
        self.assert_second_gateway_after(1.5, failover_after=4, route_failover=1.5)

    def test_a_gateway_that_keeps_failing_is_tried_last_and_probed_until_it_answers(self):
        core = self.net.core
        prober = core.prober
        prober.start()
        for n in range(3):  # three calls the first gateway leaves unanswered
            ((invite, dest),) = requests(self.net.invite(to="95551234", call_id=f"gw-{n}"), "INVITE")
            self.assertEqual(dest, Destination("UDP", *GW1))
            self.net.clock.advance(4)  # failover_after; the first gateway got only retransmissions meanwhile
            ((second, dest),) = [(m, d) for m, d in requests(self.net.take(), "INVITE") if d != Destination("UDP", *GW1)]
            self.assertEqual(dest, Destination("UDP", *GW2))
            self.net.answer(second, 200, GW2)
        self.assertEqual([(g["gateway"], g["up"]) for g in core.gateways.gateways()],
                         [("192.0.2.20:5060", False), ("192.0.2.21:5060", True)])
        # Now the second gateway is tried first...
        ((invite, dest),) = requests(self.net.invite(to="95551234", call_id="gw-next"), "INVITE")
        self.assertEqual(dest, Destination("UDP", *GW2))
        self.net.answer(invite, 200, GW2)
        self.net.take()
        # ...and the first is probed with OPTIONS until it answers one; then it is up again.
        self.net.clock.advance(10)
        probes = [(m, d) for m, d in self.net.take() if isinstance(m, Request) and m.method == "OPTIONS"]
        self.assertEqual([d for _, d in probes], [Destination("UDP", *GW1)])
        self.net.answer(probes[0][0], 200, GW1)
        self.assertTrue(core.gateways.gateways()[0]["up"])
        ((invite, dest),) = requests(self.net.invite(to="95551234", call_id="gw-back"), "INVITE")
        self.assertEqual(dest, Destination("UDP", *GW1))
        prober.stop()

    def test_a_gateway_that_says_trying_is_not_left(self):
        ((invite, _),) = requests(self.net.invite(to="95551234"), "INVITE")
        self.net.answer(invite, 100, GW1)
        self.net.clock.advance(10)
        self.assertEqual([d for _, d in requests(self.net.take(), "INVITE")], [])

    def test_busy_from_gateway_does_not_fail_over(self):
        ((invite, _),) = requests(self.net.invite(to="95551234"), "INVITE")
        sent = self.net.answer(invite, 486, GW1)
        self.assertEqual(statuses(sent), [486])

    def test_trusted_gateway_calls_in_unchallenged(self):
        self.net.register("1002", B)
        sent = self.net.invite(to="1002", frm="5551234", source=GW1, auth=False)
        self.assertEqual(statuses(sent), [100])
        self.assertEqual([d for _, d in requests(sent, "INVITE")], [Destination("UDP", *B)])

    def test_emergency_never_challenged(self):
        sent = self.net.invite(to="911", auth=False, source=("192.0.2.99", 5060), frm="nobody")
        self.assertEqual(statuses(sent), [100])
        ((invite, dest),) = requests(sent, "INVITE")
        self.assertEqual((invite.uri_text, dest), ("sip:911@192.0.2.30", Destination("UDP", "192.0.2.30", 5060)))

    def test_emergency_without_emergency_gateway_goes_by_the_first_pstn_route(self):
        route = RouteConfig(pattern="9[0-9]+", strip=1, gateways=("192.0.2.20",), name="pstn")
        net = Net(self, routes=[route], emergency=EmergencyConfig())
        sent = net.invite(to="911", auth=False, source=("192.0.2.99", 5060), frm="nobody")
        ((invite, dest),) = requests(sent, "INVITE")
        # As dialled (not stripped like an ordinary 9-number), to the route's gateway.
        self.assertEqual((invite.uri_text, dest), ("sip:911@192.0.2.20", Destination("UDP", *GW1)))

    def test_emergency_without_gateway_is_503(self):
        net = Net(self, emergency=EmergencyConfig())
        self.assertEqual(statuses(net.invite(to="9911", auth=False))[-1], 503)


class RedirectTests(SynchronousTestCase):
    def test_3xx_recursed_in_q_order(self):
        net = Net(self)
        net.register("1002", B)
        net.register("1003", B2)
        ((invite, _),) = requests(net.invite(), "INVITE")
        sent = net.answer(invite, 300, B, extra=(("Contact", f"<sip:1003@{REALM}>;q=0.9"),
                                                 ("Contact", "<sip:x@192.0.2.40:5060>;q=0.5")))
        ((second, dest),) = requests(sent, "INVITE")
        self.assertEqual(dest, Destination("UDP", *B2))
        sent = net.answer(second, 486, B2)
        ((third, dest),) = requests(sent, "INVITE")
        self.assertEqual((third.uri_text, dest), ("sip:x@192.0.2.40:5060", Destination("UDP", "192.0.2.40", 5060)))
        self.assertEqual(statuses(net.answer(third, 200, ("192.0.2.40", 5060))), [200])


class SequentialTests(SynchronousTestCase):
    def test_sequential_by_q(self):
        net = Net(self, settings=ProxySettings(forking="sequential"))
        net.register("1002", B, q=0.5)
        net.register("1002", B2, q=1.0)
        ((first, dest),) = requests(net.invite(), "INVITE")
        self.assertEqual(dest, Destination("UDP", *B2))
        ((second, dest),) = requests(net.answer(first, 480, B2), "INVITE")
        self.assertEqual(dest, Destination("UDP", *B))


class StatelessTests(SynchronousTestCase):
    def test_2xx_retransmission_after_transaction_is_forwarded(self):
        net = Net(self)
        net.register("1002", B)
        ((invite, _),) = requests(net.invite(), "INVITE")
        net.answer(invite, 200, B)
        net.clock.advance(40)  # client transaction gone (Timer M)
        net.take()
        sent = net.answer(invite, 200, B)
        self.assertEqual(statuses(sent), [200])
        self.assertEqual(sent[0][1], Destination("UDP", *A))


class DnsTests(SynchronousTestCase):
    def test_srv_then_addresses(self):
        from twisted.names import dns

        class FakeResolver:
            def lookupService(self, name, timeout=None):
                assert name == "_sip._udp.gw.example.net", name
                records = [dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(20, 0, 5070, "b.example.net")),
                           dns.RRHeader(name, dns.SRV, payload=dns.Record_SRV(10, 0, 5080, "a.example.net"))]
                return defer.succeed((records, [], []))

            def lookupAddress(self, name, timeout=None):
                address = {"a.example.net": "192.0.2.81", "b.example.net": "192.0.2.82"}[name]
                return defer.succeed(([dns.RRHeader(name, dns.A, payload=dns.Record_A(address))], [], []))

            def lookupIPV6Address(self, name, timeout=None):
                return defer.succeed(([], [], []))

        resolver = NextHopResolver(FakeResolver())
        found = self.successResultOf(resolver.resolve("gw.example.net", None, "UDP"))
        self.assertEqual(found, [Destination("UDP", "192.0.2.81", 5080), Destination("UDP", "192.0.2.82", 5070)])
        self.assertEqual(self.successResultOf(resolver.resolve("192.0.2.9", None)), [Destination("UDP", "192.0.2.9", 5060)])


STRANGER = ("198.51.100.66", 5060)
FOREIGN = "evil.example.net"


class TrustAttackTests(SynchronousTestCase):
    """Issue 11, written as the attacks: nothing a stranger sends reaches a gateway or a foreign host."""

    def setUp(self):
        route = RouteConfig(pattern="9[0-9]+", strip=1, gateways=("192.0.2.20",), name="pstn")
        self.net = Net(self, routes=[route], settings=ProxySettings(trusted=("192.0.2.20/32",)))
        self.net.register("1002", B)

    def attack(self, method="INVITE", uri=f"sip:9011441234@{REALM}", routes=(f"<sip:{PROXY};lr>", "<sip:192.0.2.20;lr>"),
               to_tag="", source=STRANGER, frm=f"sip:1001@{REALM}", call_id="attack", extra=""):
        route_lines = "\n".join(f"Route: {r}" for r in routes)
        self.net.send(sip_bytes(f"""
            {method} {uri} SIP/2.0
            Via: SIP/2.0/UDP {source[0]}:{source[1]};branch=z9hG4bK{os.urandom(4).hex()}
            {route_lines}
            Max-Forwards: 70
            From: <{frm}>;tag=attacker
            To: <sip:9011441234@{REALM}>{to_tag}
            Call-ID: {call_id}
            CSeq: 1 {method}
            Contact: <sip:x@{source[0]}:{source[1]}>
            Event: presence
            Refer-To: <sip:9011441234@{REALM}>
            {extra}
        """, b"v=0\r\n"), source)
        return self.net.take()

    def assertNothingForwarded(self, sent):
        self.assertEqual(requests(sent), [], sent)

    def test_preloaded_route_to_the_gateway_is_challenged_for_every_method(self):
        for method in ("INVITE", "MESSAGE", "OPTIONS", "SUBSCRIBE", "REFER", "NOTIFY", "INFO"):
            with self.subTest(method):
                sent = self.attack(method)
                self.assertNothingForwarded(sent)
                self.assertEqual(statuses(sent)[-1], 407)

    def test_preloaded_route_to_a_foreign_host_is_challenged(self):
        sent = self.attack(uri=f"sip:victim@{FOREIGN}", routes=(f"<sip:{PROXY}:5060;lr>", f"<sip:{FOREIGN};lr>"))
        self.assertNothingForwarded(sent)
        self.assertEqual(statuses(sent)[-1], 407)

    def test_a_stranger_claiming_a_foreign_user_is_refused_as_relay(self):
        sent = self.attack(uri=f"sip:victim@{FOREIGN}", routes=(f"<sip:{PROXY};lr>",), frm=f"sip:spam@{FOREIGN}")
        self.assertNothingForwarded(sent)
        self.assertEqual((statuses(sent)[-1], sent[-1][0].reason), (403, "Relaying Not Allowed"))

    def test_forged_to_tag_without_a_token_is_an_initial_request(self):
        for method in ("INVITE", "BYE", "MESSAGE", "REFER", "NOTIFY"):
            with self.subTest(method):
                sent = self.attack(method, to_tag=";tag=forged")
                self.assertNothingForwarded(sent)
                self.assertEqual(statuses(sent)[-1], 407)

    def test_forged_to_tag_with_another_calls_token_is_an_initial_request(self):
        stolen = self.net.rr("some-other-call")
        sent = self.attack("BYE", to_tag=";tag=forged", routes=(f"<{stolen}>", "<sip:192.0.2.20;lr>"))
        self.assertNothingForwarded(sent)
        self.assertEqual(statuses(sent)[-1], 407)

    def test_forged_token_with_a_wrong_mac_or_key_id_is_refused(self):
        token = self.net.trust.route_token("attack")
        kid, _, mac = token.partition(".")
        for bad in (f"{kid}.{'0' * len(mac)}", f"kzzz.{mac}", "", kid, f"{kid}."):
            with self.subTest(bad):
                sent = self.attack("BYE", to_tag=";tag=forged",
                                   routes=(f"<sip:{PROXY}:5060;lr;sptk={bad}>", "<sip:192.0.2.20;lr>"))
                self.assertNothingForwarded(sent)

    def test_a_valid_token_for_its_own_call_follows_the_route(self):
        # The legitimate case: an in-dialog request along the Record-Route we signed for this Call-ID.
        sent = self.attack("BYE", to_tag=";tag=callee", routes=(f"<{self.net.rr('attack')}>", "<sip:192.0.2.20;lr>"))
        ((bye, dest),) = requests(sent, "BYE")
        self.assertEqual(dest, Destination("UDP", *GW1))

    def test_a_valid_token_does_not_make_an_initial_request_unchallenged(self):
        sent = self.attack("INVITE", routes=(f"<{self.net.rr('attack')}>", "<sip:192.0.2.20;lr>"))
        self.assertNothingForwarded(sent)
        self.assertEqual(statuses(sent)[-1], 407)

    def test_strict_route_request_uri_naming_the_proxy(self):
        sent = self.attack("INVITE", uri=f"sip:{PROXY}:5060;lr",
                           routes=("<sip:192.0.2.20;lr>", f"<sip:9011441234@{REALM}>"))
        self.assertNothingForwarded(sent)
        self.assertEqual(statuses(sent)[-1], 407)
        sent = self.attack("BYE", uri=f"sip:{PROXY}:5060;lr", to_tag=";tag=forged",
                           routes=("<sip:192.0.2.20;lr>", "<sip:5551234@192.0.2.20>"))
        self.assertNothingForwarded(sent)

    def test_stray_ack_with_a_preloaded_route_is_dropped(self):
        for to_tag in ("", ";tag=forged"):
            with self.subTest(to_tag=to_tag):
                sent = self.attack("ACK", to_tag=to_tag, extra="Content-Type: application/sdp")
                self.assertEqual(sent, [])
        self.assertEqual(self.net.server.dropped["unsigned_ack"], 2)

    def test_ack_along_our_signed_route_is_forwarded(self):
        sent = self.attack("ACK", to_tag=";tag=callee", routes=(f"<{self.net.rr('attack')}>", "<sip:192.0.2.20;lr>"))
        ((ack, dest),) = requests(sent, "ACK")
        self.assertEqual(dest, Destination("UDP", *GW1))

    def test_in_dialog_request_for_our_domain_without_a_binding_goes_nowhere(self):
        sent = self.attack("BYE", uri=f"sip:1003@{REALM}", routes=(), to_tag=";tag=forged")
        self.assertNothingForwarded(sent)
        self.assertEqual(statuses(sent)[-1], 407)

    def test_our_own_source_address_is_no_proof_of_anything(self):
        for source in ((PROXY, 5060), (PROXY, 5061)):
            with self.subTest(source=source):
                sent = self.attack(source=source)
                self.assertNothingForwarded(sent)
                self.assertEqual(statuses(sent)[-1], 407)
                sent = self.attack(source=source, routes=())
                self.assertNothingForwarded(sent)

    def test_authenticated_call_to_the_gateway_still_works_and_ignores_a_preloaded_route(self):
        sent = self.net.invite(to="9011441234", extra=f"Route: <sip:{PROXY};lr>, <sip:{FOREIGN};lr>")
        ((invite, dest),) = requests(sent, "INVITE")
        self.assertEqual((invite.uri_text, dest), ("sip:011441234@192.0.2.20", Destination("UDP", *GW1)))
        self.assertIsNone(invite.headers.get("route"))

    def test_authenticated_in_dialog_request_without_token_for_our_domain_is_481(self):
        # Before: sent, unchallenged, to the domain's host on port 5060. Now challenged, then 481.
        sent = self.net.invite(to="1003", method="BYE", to_tag=";tag=x")
        self.assertNothingForwarded(sent)
        self.assertEqual(statuses(sent)[-1], 481)

    def test_authenticated_in_dialog_request_without_token_goes_to_the_contact(self):
        # record_route off, or a phone using the proxy as its outbound proxy: served once authenticated.
        self.net.register("1002", B)
        sent = self.net.invite(to="1002", method="BYE", to_tag=";tag=x", uri="sip:1002@192.0.2.11:5060",
                               extra=f"Route: <sip:{PROXY};lr>, <sip:192.0.2.20;lr>")
        self.assertEqual(statuses(sent), [])
        ((bye, dest),) = requests(sent, "BYE")
        self.assertEqual(dest, Destination("UDP", *B))  # the preloaded Route to the gateway was dropped
        self.assertIsNone(bye.headers.get("route"))

    def test_emergency_calls_stay_open_to_strangers(self):
        # What a stranger can still do: call 911, which goes to the emergency gateway only.
        sent = self.attack(uri=f"sip:911@{REALM}", routes=(f"<sip:{PROXY};lr>", f"<sip:{FOREIGN};lr>"))
        ((invite, dest),) = requests(sent, "INVITE")
        self.assertEqual(dest, Destination("UDP", "192.0.2.30", 5060))
        self.assertIsNone(invite.headers.get("route"))

    def test_trusted_gateway_may_still_use_a_route_set(self):
        sent = self.attack("BYE", to_tag=";tag=x", source=GW1, uri="sip:1002@192.0.2.11:5060",
                           routes=(f"<sip:{PROXY};lr>",))
        ((bye, dest),) = requests(sent, "BYE")
        self.assertEqual(dest, Destination("UDP", *B))


class SelfRouteTests(SynchronousTestCase):
    def test_a_route_whose_gateway_is_this_proxy_is_482_and_nothing_is_sent(self):
        # Spirals through ourselves no longer pass as "already authenticated" by source address.
        net = Net(self, routes=[RouteConfig(pattern="8[0-9]+", gateways=(f"{PROXY}:5060",), name="self")])
        sent = net.invite(to="8123")
        self.assertEqual(requests(sent), [])
        self.assertEqual((statuses(sent)[-1], sent[-1][0].reason), (482, "Loop Detected"))


class SignedRouteTests(SynchronousTestCase):
    def test_token_verifies_after_restart_and_in_another_worker_sharing_the_keys(self):
        d = self.mktemp()
        signer = load_route_signer(d)
        again = load_route_signer(d)  # a restart, or another worker reading the same state directory
        self.assertTrue(again.verify(signer.token("c1"), "c1"))
        self.assertFalse(again.verify(signer.token("c1"), "c2"))
        self.assertEqual(oct(os.stat(os.path.join(d, "route-keys")).st_mode & 0o777), "0o600")

    def test_rotation_old_key_still_verifies_new_key_signs(self):
        d = self.mktemp()
        old = load_route_signer(d)
        token = old.token("c1")
        path = os.path.join(d, "route-keys")
        with open(path) as f:
            content = f.read()
        with open(path, "w") as f:
            f.write("k2 " + "ab" * 32 + "\n" + content)
        rotated = load_route_signer(d)
        self.assertTrue(rotated.verify(token, "c1"))
        self.assertTrue(rotated.token("c1").startswith("k2."))

    def test_a_damaged_key_file_stops_startup_with_the_line(self):
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "route-keys"), "w") as f:
            f.write("just-one-field\n")
        from proxy.errors import ConfigError
        error = self.assertRaises(ConfigError, load_route_signer, d)
        self.assertIn("line 1", str(error))


class ReloadTests(SynchronousTestCase):
    def test_reload_swaps_routes_and_trusted_networks_and_names_what_needs_a_restart(self):
        import attrs

        net = Net(self, routes=[RouteConfig(pattern="9[0-9]+", strip=1, gateways=("192.0.2.20",), name="a")])
        old = net.core  # the config the core was built with is rebuilt here the same way
        from proxy.config import ListenerConfig, ProxyConfig, ServerConfig

        base = attrs.evolve(ProxyConfig(), server=ServerConfig(domains=(REALM,), addresses=(PROXY,), state_dir=net.dir,
                                                               listen=(ListenerConfig.parse("udp:5060"),)),
                            routes=(RouteConfig(pattern="9[0-9]+", strip=1, gateways=("192.0.2.20",), name="a"),),
                            emergency=EmergencyConfig(gateways=("192.0.2.30",)))
        new = attrs.evolve(base, routes=(RouteConfig(pattern="9[0-9]+", strip=1, gateways=("192.0.2.21",), name="b"),),
                           proxy=attrs.evolve(base.proxy, trusted=("192.0.2.99/32",)),
                           server=attrs.evolve(base.server, listen=(ListenerConfig.parse("udp:5070"),)))
        reloaded, restart = old.reload(base, new)
        self.assertEqual((reloaded, restart), (["routes", "emergency", "proxy.trusted"], ["server"]))
        ((invite, dest),) = requests(net.invite(to="95551234"), "INVITE")
        self.assertEqual(dest, Destination("UDP", *GW2))
        self.assertTrue(net.trust.is_trusted_network("192.0.2.99"))
        self.assertEqual(old.reload(new, new), ([], []))
