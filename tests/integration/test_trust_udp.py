"""Issue 11 against the real server (twistd): a stranger reaches no gateway; calls along the signed Record-Route
keep working in both directions, across a restart of the server between INVITE and BYE."""

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import ServerProcess, free_port
from tests.integration.sipua import UdpAgent, digest, header, headers, status

REALM = "localhost"
PASSWORDS = {"1001": "pw-1001", "1002": "pw-1002"}


class TrustTestCase(SynchronousTestCase):
    extra_config = ""
    server_extra = ""  # more keys of [server]

    def setUp(self):
        self.gw_port = free_port()
        config = f'[[routes]]\nname = "pstn"\npattern = "9[0-9]+"\nstrip = 1\ngateways = ["127.0.0.1:{self.gw_port}"]\n'
        self.server = ServerProcess(self.extra_config + config, server_extra=self.server_extra)
        for user, password in PASSWORDS.items():
            self.server.admin("user", "add", user, "--password", password)
        self.server.start()
        self.addCleanup(self.server.stop)
        self.gateway = self.agent(self.gw_port)
        self.proxy = f"127.0.0.1:{self.server.port}"

    def agent(self, port=0) -> UdpAgent:
        agent = UdpAgent(self.server.port, port)
        self.addCleanup(agent.close)
        return agent

    def message(self, agent, method, uri, *, call_id, cseq=1, to_tag="", routes=(), extra="", frm="1001",
                to="9011441234", branch=None, body=""):
        route_lines = "\n".join(f"Route: {r}" for r in routes)
        agent.send(f"""
            {method} {uri} SIP/2.0
            Via: {agent.via(branch)}
            {route_lines}
            Max-Forwards: 70
            From: <sip:{frm}@{REALM}>;tag=from-{frm}
            To: <sip:{to}@{REALM}>{to_tag}
            Call-ID: {call_id}
            CSeq: {cseq} {method}
            Contact: <sip:{frm}@127.0.0.1:{agent.port}>
            {extra}
        """, body)

    def register(self, agent, user, call_id=None):
        uri = f"sip:{REALM}"
        call_id = call_id or f"reg-{user}"
        self.message(agent, "REGISTER", uri, call_id=call_id, frm=user, to=user, extra="Expires: 3600")
        challenge = agent.final("REGISTER")
        self.assertEqual(status(challenge), 401, challenge)
        answer = digest(user, PASSWORDS[user], REALM, header(challenge, "WWW-Authenticate"), "REGISTER", uri,
                        "Authorization")
        self.message(agent, "REGISTER", uri, call_id=call_id, cseq=2, frm=user, to=user,
                     extra="Expires: 3600\n" + answer)
        self.assertEqual(status(agent.final("REGISTER")), 200)

    def authenticated_invite(self, agent, uri, *, call_id, frm="1001", to="1002"):
        """INVITE, 407, ACK, INVITE with credentials, as the phone does (seed 001 line 3945)."""
        branch = os.urandom(6).hex()
        self.message(agent, "INVITE", uri, call_id=call_id, frm=frm, to=to, branch=branch, body="v=0\r\n")
        challenge = agent.final("INVITE")
        self.assertEqual(status(challenge), 407, challenge)
        self.message(agent, "ACK", uri, call_id=call_id, frm=frm, to=to, branch=branch,
                     to_tag=";tag=" + header(challenge, "To").split("tag=")[1])
        answer = digest(frm, PASSWORDS[frm], REALM, header(challenge, "Proxy-Authenticate"), "INVITE", uri)
        self.message(agent, "INVITE", uri, call_id=call_id, cseq=2, frm=frm, to=to, extra=answer, body="v=0\r\n")


class StrangerTests(TrustTestCase):
    def test_a_stranger_reaches_no_gateway_whatever_the_route(self):
        stranger = self.agent()
        gw = f"127.0.0.1:{self.gw_port}"
        attacks = [
            ("INVITE", f"sip:9011441234@{REALM}", (f"<sip:{self.proxy};lr>", f"<sip:{gw};lr>"), ""),
            ("INVITE", f"sip:9011441234@{REALM}", (f"<sip:{self.proxy};lr>", f"<sip:{gw};lr>"), ";tag=forged"),
            ("INVITE", f"sip:{self.proxy};lr", (f"<sip:{gw};lr>", f"<sip:011441234@{gw}>"), ""),
            ("BYE", f"sip:011441234@{gw}", (f"<sip:{self.proxy};lr;sptk=k1.00ff00ff00ff00ff00ff00ff>",), ";tag=forged"),
            ("MESSAGE", f"sip:9011441234@{REALM}", (f"<sip:{self.proxy};lr>", f"<sip:{gw};lr>"), ""),
            ("OPTIONS", f"sip:011441234@{gw}", (f"<sip:{self.proxy};lr>",), ";tag=forged"),
        ]
        for n, (method, uri, routes, to_tag) in enumerate(attacks):
            self.message(stranger, method, uri, call_id=f"attack-{n}", routes=routes, to_tag=to_tag)
            answer = stranger.final(method)
            self.assertIn(status(answer), (403, 407), (method, uri, answer))
        for to_tag in ("", ";tag=forged"):
            self.message(stranger, "ACK", f"sip:011441234@{gw}", call_id="attack-ack",
                         routes=(f"<sip:{self.proxy};lr>", f"<sip:{gw};lr>"), to_tag=to_tag, body="v=0\r\n")
        self.assertEqual(self.gateway.expect_nothing(1.5), [])

    def test_an_authenticated_call_to_the_same_gateway_still_works(self):
        phone = self.agent()
        uri = f"sip:9011441234@{REALM}"
        self.authenticated_invite(phone, uri, call_id="to-gw", to="9011441234")
        invite = self.gateway.receive(5, lambda t: t.startswith("INVITE"))
        self.assertIsNotNone(invite, self.server.log()[-3000:])
        self.assertTrue(invite.startswith("INVITE sip:011441234@"), invite)
        record_route = header(invite, "Record-Route")
        self.assertIn(";sptk=", record_route)
        # The gateway answers; the phone ACKs and hangs up along the Record-Route.
        self.gateway.send(_response(invite, 200, f"<sip:gw@127.0.0.1:{self.gw_port}>"), body="v=0\r\n",
                          to=("127.0.0.1", self.server.port))
        ok = phone.final("INVITE")
        self.assertEqual(status(ok), 200)
        to_tag = ";tag=" + header(ok, "To").split("tag=")[1]
        contact = f"sip:gw@127.0.0.1:{self.gw_port}"
        self.message(phone, "ACK", contact, call_id="to-gw", cseq=2, to_tag=to_tag, routes=(record_route,),
                     to="9011441234")
        self.assertIsNotNone(self.gateway.receive(3, lambda t: t.startswith("ACK")))
        self.message(phone, "BYE", contact, call_id="to-gw", cseq=3, to_tag=to_tag, routes=(record_route,),
                     to="9011441234")
        bye = self.gateway.receive(3, lambda t: t.startswith("BYE"))
        self.assertIsNotNone(bye)
        self.gateway.send(_response(bye, 200), to=("127.0.0.1", self.server.port))
        self.assertEqual(status(phone.final("BYE")), 200)


class SignedDialogTests(TrustTestCase):
    def test_reinvite_and_bye_both_ways_along_the_signed_route_across_a_restart(self):
        a, b = self.agent(), self.agent()
        self.register(b, "1002")
        self.authenticated_invite(a, f"sip:1002@{REALM}", call_id="dialog-1")
        invite = b.receive(5, lambda t: t.startswith("INVITE"))
        self.assertIsNotNone(invite, self.server.log()[-3000:])
        route_set = headers(invite, "Record-Route")
        self.assertEqual(len(route_set), 1)
        self.assertIn(";sptk=", route_set[0])
        b_contact = f"sip:1002@127.0.0.1:{b.port}"
        a_contact = f"sip:1001@127.0.0.1:{a.port}"
        b.send(_response(invite, 200, f"<{b_contact}>", to_tag="b-tag"), body="v=0\r\n",
               to=("127.0.0.1", self.server.port))
        ok = a.final("INVITE")
        self.assertEqual(status(ok), 200)
        self.assertEqual(headers(ok, "Record-Route"), route_set)

        def a_to_b(method, cseq, body=""):
            self.message(a, method, b_contact, call_id="dialog-1", cseq=cseq, to_tag=";tag=b-tag",
                         routes=route_set, to="1002", body=body)

        def b_to_a(method, cseq, body=""):
            # B's dialog: From is B, To is A with A's tag; the route set is the Record-Route reversed.
            b.send(f"""
                {method} {a_contact} SIP/2.0
                Via: {b.via()}
                Route: {route_set[0]}
                Max-Forwards: 70
                From: <sip:1002@{REALM}>;tag=b-tag
                To: <sip:1001@{REALM}>;tag=from-1001
                Call-ID: dialog-1
                CSeq: {cseq} {method}
                Contact: <{b_contact}>
            """, body)

        def answered(receiver, sender, method):
            request = receiver.receive(3, lambda t: t.startswith(method))
            self.assertIsNotNone(request, f"{method} did not arrive\n" + self.server.log()[-3000:])
            receiver.send(_response(request, 200), to=("127.0.0.1", self.server.port))
            self.assertEqual(status(sender.final(method)), 200)

        a_to_b("ACK", 2)
        self.assertIsNotNone(b.receive(3, lambda t: t.startswith("ACK")))
        a_to_b("INVITE", 3, "v=0\r\nc=IN IP4 0.0.0.0\r\n")  # hold
        answered(b, a, "INVITE")
        a_to_b("ACK", 3)
        b_to_a("INVITE", 1, "v=0\r\n")  # the other way
        answered(a, b, "INVITE")
        b_to_a("ACK", 1)
        self.assertIsNotNone(a.receive(3, lambda t: t.startswith("ACK")))

        # The server restarts mid-call: the signature still verifies (the key is in the state directory).
        self.server.stop()
        self.server.start()
        b_to_a("BYE", 2)
        answered(a, b, "BYE")


def _response(request: str, code: int, contact: str | None = None, to_tag: str = "gw-tag") -> str:
    reasons = {200: "OK", 180: "Ringing"}
    lines = [f"SIP/2.0 {code} {reasons.get(code, 'OK')}"]
    lines += [f"Via: {v}" for v in headers(request, "Via")]
    lines += [f"Record-Route: {v}" for v in headers(request, "Record-Route")]
    to = header(request, "To")
    lines += [f"From: {header(request, 'From')}", f"To: {to}" + ("" if "tag=" in to else f";tag={to_tag}"),
              f"Call-ID: {header(request, 'Call-ID')}", f"CSeq: {header(request, 'CSeq')}"]
    if contact:
        lines.append(f"Contact: {contact}")
    return "\n".join(lines)
