"""Digest authentication: RFC 2617 vectors, nonce lifetime and stale, replay, lockout, UNPROVISIONED."""

import hashlib
import os

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from proxy.auth import (
    Authenticated,
    Challenge,
    DigestAuthenticator,
    Refused,
    digest_response,
    load_secret,
    mac_from_instance,
    parse_digest,
)
from proxy.config import AuthSettings
from proxy.credentials import FileCredentials, UserRecord, compute_ha1, locked_users
from proxy.sip.wire import parse_message
from proxy.testing import sip_bytes

REALM = "example.com"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def client_answer(user, password, nonce, method="REGISTER", uri="sip:example.com", qop=None, nc=1, cnonce="abc",
                  realm=REALM, header="Authorization"):
    """What a phone computes, written out independently of proxy.auth."""
    ha1 = md5(f"{user}:{realm}:{password}")
    ha2 = md5(f"{method}:{uri}")
    if qop:
        ncv = f"{nc:08x}"
        response = md5(f"{ha1}:{nonce}:{ncv}:{cnonce}:{qop}:{ha2}")
        extra = f', qop={qop}, nc={ncv}, cnonce="{cnonce}"'
    else:
        response = md5(f"{ha1}:{nonce}:{ha2}")
        extra = ""
    return (f'{header}: Digest username="{user}", realm="{realm}", nonce="{nonce}", uri="{uri}", '
            f'response="{response}", algorithm=MD5{extra}')


def request_with(auth_line="", method="REGISTER", contact_extra=""):
    return parse_message(sip_bytes(f"""
        {method} sip:example.com SIP/2.0
        Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK{os.urandom(4).hex()}
        From: <sip:1001@example.com>;tag=1
        To: <sip:1001@example.com>
        Call-ID: reg-1
        CSeq: 1 {method}
        Contact: <sip:1001@192.0.2.50:5060>{contact_extra}
        User-Agent: Cisco-CP7960G/8.0
        {auth_line}
    """))


def nonce_of(challenge: Challenge) -> str:
    return parse_digest(challenge.header_value)["nonce"]


class DigestMathTests(SynchronousTestCase):
    def test_rfc2617_example(self):
        # RFC 2617 section 3.5.
        params = {"username": "Mufasa", "realm": "testrealm@host.com", "nonce": "dcd98b7102dd2f0e8b11d0f600bfb0c093",
                  "uri": "/dir/index.html", "qop": "auth", "nc": "00000001", "cnonce": "0a4f113b"}
        ha1 = compute_ha1("Mufasa", "testrealm@host.com", "Circle Of Life")
        self.assertEqual(digest_response(ha1, params, "GET"), "6629fae49393a05397450978507c4ef1")

    def test_parse_digest(self):
        params = parse_digest('Digest username="bob, jr", realm="r", nonce="n", uri="sip:a", response="x", nc=00000001')
        self.assertEqual(params["username"], "bob, jr")
        self.assertEqual(params["nc"], "00000001")
        self.assertIsNone(parse_digest("Basic abc"))

    def test_mac_from_instance(self):
        self.assertEqual(mac_from_instance("<urn:uuid:00000000-0000-0000-0000-003094c25d2e>"), "003094C25D2E")
        self.assertIsNone(mac_from_instance("urn:uuid:f81d4fae-7dec-11d0-a765"))


class AuthenticatorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.dir = self.mktemp()
        path = os.path.join(self.dir, "users.json")
        with locked_users(path) as users:
            users["1001"] = UserRecord("1001", REALM, compute_ha1("1001", REALM, "secret"))
        self.credentials = FileCredentials(path, self.clock)
        self.config = AuthSettings(max_failures=3, failure_window=60, lockout=300)
        self.auth = DigestAuthenticator(self.clock, self.credentials, REALM, load_secret(self.dir), self.config)

    def check(self, request, address="192.0.2.50"):
        return self.auth.authenticate(request, address, proxy=False)

    def challenge(self, address="192.0.2.50"):
        result = self.check(request_with(), address)
        self.assertIsInstance(result, Challenge)
        return nonce_of(result)

    def test_challenge_offers_qop_and_md5(self):
        result = self.check(request_with())
        self.assertIn('qop="auth"', result.header_value)
        self.assertIn("algorithm=MD5", result.header_value)
        self.assertIn(f'realm="{REALM}"', result.header_value)

    def test_qop_auth_accepted(self):
        nonce = self.challenge()
        result = self.check(request_with(client_answer("1001", "secret", nonce, qop="auth")))
        self.assertEqual(result, Authenticated("1001"))

    def test_rfc2069_answer_accepted(self):
        nonce = self.challenge()
        self.assertEqual(self.check(request_with(client_answer("1001", "secret", nonce))), Authenticated("1001"))

    def test_lowercase_md5_and_md5_sess(self):
        nonce = self.challenge()
        line = client_answer("1001", "secret", nonce, qop="auth").replace("algorithm=MD5", "algorithm=md5")
        self.assertEqual(self.check(request_with(line)), Authenticated("1001"))
        nonce = self.challenge()
        ha1 = md5(f"{md5('1001:' + REALM + ':secret')}:{nonce}:cn")
        response = md5(f"{ha1}:{nonce}:00000001:cn:auth:{md5('REGISTER:sip:example.com')}")
        line = (f'Authorization: Digest username="1001", realm="{REALM}", nonce="{nonce}", uri="sip:example.com", '
                f'response="{response}", algorithm=MD5-sess, qop=auth, nc=00000001, cnonce="cn"')
        self.assertEqual(self.check(request_with(line)), Authenticated("1001"))

    def test_nc_replay_rejected(self):
        nonce = self.challenge()
        answer = client_answer("1001", "secret", nonce, qop="auth", nc=1)
        self.assertEqual(self.check(request_with(answer)), Authenticated("1001"))
        self.assertIsInstance(self.check(request_with(answer)), Challenge)
        self.assertEqual(self.check(request_with(client_answer("1001", "secret", nonce, qop="auth", nc=2))),
                         Authenticated("1001"))

    def test_no_qop_nonce_is_single_use(self):
        nonce = self.challenge()
        answer = client_answer("1001", "secret", nonce)
        self.assertEqual(self.check(request_with(answer)), Authenticated("1001"))
        self.assertIsInstance(self.check(request_with(answer)), Challenge)

    def test_nonces_differ_within_one_millisecond(self):
        # Six lines of one phone are challenged at once.
        nonces = {self.challenge() for _ in range(6)}
        self.assertEqual(len(nonces), 6)

    def test_nonce_bound_to_address(self):
        nonce = self.challenge("192.0.2.50")
        result = self.check(request_with(client_answer("1001", "secret", nonce, qop="auth")), "198.51.100.7")
        self.assertIsInstance(result, Challenge)

    def test_nonce_lifetime_and_stale(self):
        nonce = self.challenge()
        self.clock.advance(299.9)
        self.assertEqual(self.check(request_with(client_answer("1001", "secret", nonce, qop="auth"))), Authenticated("1001"))
        nonce = self.challenge()
        self.clock.advance(300.1)
        result = self.check(request_with(client_answer("1001", "secret", nonce, qop="auth")))
        self.assertIsInstance(result, Challenge)
        self.assertIn("stale=true", result.header_value)

    def test_no_qop_nonce_is_short_lived(self):
        nonce = self.challenge()
        self.clock.advance(30.1)
        result = self.check(request_with(client_answer("1001", "secret", nonce)))
        self.assertIn("stale=true", result.header_value)

    def test_forged_nonce(self):
        result = self.check(request_with(client_answer("1001", "secret", "18bcfe56800.0badf00d.forged")))
        self.assertIsInstance(result, Challenge)
        self.assertNotIn("stale", result.header_value)

    def test_unknown_user_answered_like_wrong_password(self):
        nonce = self.challenge()
        unknown = self.check(request_with(client_answer("9999", "secret", nonce, qop="auth")))
        nonce = self.challenge()
        wrong = self.check(request_with(client_answer("1001", "wrong", nonce, qop="auth")))
        self.assertEqual((type(unknown), unknown.reason), (type(wrong), wrong.reason))
        self.assertEqual(unknown.header_value.split("nonce=")[0], wrong.header_value.split("nonce=")[0])

    def test_lockout_after_failures_then_cools_off(self):
        with capturedLogs() as events:
            for _ in range(3):
                nonce = self.challenge()
                self.check(request_with(client_answer("1001", "wrong", nonce, qop="auth")))
        self.assertEqual(self.check(request_with()), Refused("Too many failed attempts"))
        self.assertEqual(len([e for e in events if "locked out" in e["log_format"]]), 1)
        self.assertIsInstance(self.check(request_with(), "198.51.100.8"), Challenge)  # others unaffected
        self.clock.advance(300)
        nonce = self.challenge()
        self.assertEqual(self.check(request_with(client_answer("1001", "secret", nonce, qop="auth"))), Authenticated("1001"))

    def test_unprovisioned_line(self):
        nonce = self.challenge()
        line = client_answer("UNPROVISIONED", "UNPROVISIONED", nonce)
        instance = ';+sip.instance="<urn:uuid:00000000-0000-0000-0000-003094c25d2e>"'
        with capturedLogs() as events:
            result = self.check(request_with(line, contact_extra=instance))
        self.assertEqual(result, Refused("Unprovisioned line"))
        text = [e for e in events if "UNPROVISIONED" in e["log_format"]][0]
        self.assertEqual(text["address"], "192.0.2.50")
        self.assertIn("003094C25D2E", text["mac"])

    def test_other_realm_or_scheme_gets_our_challenge(self):
        # RFC 4475 3.3.7: credentials we cannot use are answered with our own challenge.
        line = client_answer("1001", "secret", "n", realm="other.example.net")
        self.assertIsInstance(self.check(request_with(line)), Challenge)
        self.assertIsInstance(self.check(request_with("Authorization: NoOneKnowsThisScheme opaque-data=here")), Challenge)

    def test_password_change_is_seen_without_restart(self):
        path = os.path.join(self.dir, "users.json")
        with locked_users(path) as users:
            users["1001"] = UserRecord("1001", REALM, compute_ha1("1001", REALM, "new"))
        self.clock.advance(1.0)
        nonce = self.challenge()
        self.assertEqual(self.check(request_with(client_answer("1001", "new", nonce, qop="auth"))), Authenticated("1001"))
