"""Digest authentication: RFC 2617 vectors, nonce lifetime and stale, replay, lockout, UNPROVISIONED."""

import hashlib
import os

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from proxy.registration.auth import (
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
from proxy.registration.credentials import FileCredentials, UserRecord, compute_ha1, locked_users
from proxy.sip.wire import parse_message
from proxy.testing import sip_bytes

REALM = "example.com"


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def client_answer(user, password, nonce, method="REGISTER", uri="sip:example.com", qop=None, nc=1, cnonce="abc",
                  realm=REALM, header="Authorization"):
    """What a phone computes, written out independently of proxy.registration.auth."""
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

    def wrong(self, user="1001", address="192.0.2.50"):
        nonce = self.challenge(address)
        return self.check(request_with(client_answer(user, "wrong", nonce, qop="auth")), address)

    def right(self, user="1001", address="192.0.2.50", password="secret"):
        nonce = self.challenge(address)
        return self.check(request_with(client_answer(user, password, nonce, qop="auth")), address)

    def test_lockout_of_user_and_address_then_cools_off(self):
        with capturedLogs() as events:
            results = [self.wrong() for _ in range(3)]
        self.assertEqual(results[-1], Refused("Too many failed attempts"))
        self.assertEqual(self.right(), Refused("Too many failed attempts"))  # even the right password
        locked = [e for e in events if "locked out" in e["log_format"]]
        self.assertEqual([(e["user"], e["address"], e["count"], e["scope"]) for e in locked],
                         [("1001", "192.0.2.50", 3, "pair")])
        self.assertEqual(self.right(address="198.51.100.8"), Authenticated("1001"))  # others unaffected
        self.clock.advance(300)
        self.assertEqual(self.right(), Authenticated("1001"))

    def test_one_wrong_phone_behind_the_site_nat_does_not_lock_out_the_others(self):
        with locked_users(os.path.join(self.dir, "users.json")) as users:
            users["1002"] = UserRecord("1002", REALM, compute_ha1("1002", REALM, "other"))
        self.clock.advance(1)
        for _ in range(5):
            self.wrong("1001")
        self.assertEqual(self.right("1002", password="other"), Authenticated("1002"))

    def test_lockout_is_an_event_naming_user_address_and_count(self):
        seen = []
        self.auth.observer = lambda event, **fields: seen.append((event, fields))
        for _ in range(3):
            self.wrong()
        lockouts = [f for e, f in seen if e == "auth_lockout"]
        self.assertEqual(lockouts, [{"scope": "pair", "user": "1001", "address": "192.0.2.50", "count": 3}])
        self.assertEqual((self.auth.lockouts, self.auth.lockouts_by_scope), (1, {"pair": 1}))

    def test_forged_nonces_toward_a_victim_address_lock_nothing(self):
        # The attack: spoofed REGISTERs "from" the victim with a nonce never issued to it.
        victim = "192.0.2.50"
        for i in range(20):
            forged = f"{format(int(self.clock.seconds() * 1000), 'x')}.{i:08x}.AAAAAAAAAAAAAAAAAAAAAAAA"
            result = self.check(request_with(client_answer("1001", "guess", forged, qop="auth")), victim)
            self.assertIsInstance(result, Challenge)
        # A nonce issued to the attacker's own address is not the victim's either.
        theirs = self.challenge("203.0.113.66")
        for _ in range(10):
            self.assertIsInstance(self.check(request_with(client_answer("1001", "x", theirs, qop="auth")), victim),
                                  Challenge)
        self.assertEqual(self.auth.lockouts, 0)
        self.assertEqual(self.right(address=victim), Authenticated("1001"))

    def test_replays_are_refused_but_lock_nothing(self):
        nonce = self.challenge()
        line = client_answer("1001", "secret", nonce, qop="auth")
        self.assertEqual(self.check(request_with(line)), Authenticated("1001"))
        for _ in range(10):
            self.assertIsInstance(self.check(request_with(line)), Challenge)
        self.assertEqual((self.auth.lockouts, self.auth.failures_by_reason["replay"]), (0, 10))
        self.assertEqual(self.right(), Authenticated("1001"))

    def test_spraying_many_users_from_one_address_locks_the_address(self):
        auth = DigestAuthenticator(self.clock, self.credentials, REALM, load_secret(self.dir),
                                   AuthSettings(max_failures=3, address_max_failures=8))
        results = []
        for i in range(8):
            nonce = nonce_of(auth.authenticate(request_with(), "203.0.113.9", proxy=False))
            line = client_answer(f"20{i:02d}", "guess", nonce, qop="auth")
            results.append(auth.authenticate(request_with(line), "203.0.113.9", proxy=False))
        self.assertIsInstance(results[-2], Challenge)
        self.assertEqual(results[-1], Refused("Too many failed attempts"))
        # Now even a request without credentials from there is refused, and nothing else is.
        self.assertEqual(auth.authenticate(request_with(), "203.0.113.9", proxy=False), Refused("Too many failed attempts"))
        self.assertIsInstance(auth.authenticate(request_with(), "203.0.113.10", proxy=False), Challenge)
        self.assertEqual(auth.lockouts_by_scope, {"address": 1})

    def test_ipv6_spraying_is_counted_per_slash_64(self):
        auth = DigestAuthenticator(self.clock, self.credentials, REALM, load_secret(self.dir),
                                   AuthSettings(address_max_failures=4))
        for i in range(4):
            address = f"2001:db8:1:2::{i + 1:x}"
            nonce = nonce_of(auth.authenticate(request_with(), address, proxy=False))
            auth.authenticate(request_with(client_answer(f"30{i}", "guess", nonce, qop="auth")), address, proxy=False)
        self.assertEqual(auth.authenticate(request_with(), "2001:db8:1:2::99", proxy=False),
                         Refused("Too many failed attempts"))
        self.assertIsInstance(auth.authenticate(request_with(), "2001:db8:1:3::1", proxy=False), Challenge)

    def test_slow_guessing_is_caught_by_the_hourly_window(self):
        # Defaults: 10 a minute per (user, address) is never reached at 9 a minute...
        auth = DigestAuthenticator(self.clock, self.credentials, REALM, load_secret(self.dir), AuthSettings())
        self.auth = auth
        self.assertEqual(self.right(address="192.0.2.50"), Authenticated("1001"))  # the real phone
        results = []
        for _ in range(30):
            self.clock.advance(60 / 9)
            results.append(self.wrong(address="203.0.113.7"))
        self.assertTrue(all(isinstance(r, Challenge) for r in results[:29]), results)
        # ...but 30 in an hour lock the user everywhere it has not proved itself.
        self.assertEqual(results[-1], Refused("Too many failed attempts"))
        self.assertEqual(self.right(address="203.0.113.7"), Refused("Too many failed attempts"))
        self.assertEqual(self.right(address="203.0.113.8"), Refused("Too many failed attempts"))
        self.assertEqual(self.right(address="192.0.2.50"), Authenticated("1001"))
        self.assertEqual(auth.lockouts_by_scope, {"user": 1})

    def test_digest_uri_must_name_the_request_uri(self):
        nonce = self.challenge()
        line = client_answer("1001", "secret", nonce, qop="auth", uri="sip:other.example.net")
        self.assertEqual(self.check(request_with(line)), Refused("Digest uri mismatch", status=400))
        # The same URI written differently (case of the host, parameter order) is the same URI.
        for same in ("sip:EXAMPLE.com", "sip:example.com:5060"):
            nonce = self.challenge()
            line = client_answer("1001", "secret", nonce, qop="auth", uri=same)
            self.assertEqual(self.check(request_with(line)), Authenticated("1001"))
        for other in ("sip:example.com:5070", "sip:1002@example.com", "not a uri", "sips:example.com"):
            nonce = self.challenge()
            line = client_answer("1001", "secret", nonce, qop="auth", uri=other)
            self.assertEqual(self.check(request_with(line)), Refused("Digest uri mismatch", status=400), other)

    def test_a_digest_uri_naming_this_server_is_accepted_only_when_allowed(self):
        # SIPp's [authentication] puts the server's address in uri, whatever the Request-URI.
        def is_me(uri):
            return uri.user is None and uri.host == "192.0.2.1" and uri.port in (None, 5060)

        for allowed, expected in ((True, Authenticated("1001")), (False, Refused("Digest uri mismatch", status=400))):
            auth = DigestAuthenticator(self.clock, self.credentials, REALM, load_secret(self.dir),
                                       AuthSettings(accept_uri_of_proxy=allowed), names_this_server=is_me)
            self.auth = auth
            nonce = self.challenge()
            line = client_answer("1001", "secret", nonce, qop="auth", uri="sip:192.0.2.1:5060")
            self.assertEqual(self.check(request_with(line)), expected)
            # A user part makes it a target, not this server: never accepted for another Request-URI.
            nonce = self.challenge()
            line = client_answer("1001", "secret", nonce, qop="auth", uri="sip:9011@192.0.2.1:5060")
            self.assertEqual(self.check(request_with(line)), Refused("Digest uri mismatch", status=400))

    def test_replay_state_is_bounded_and_an_evicted_nonce_is_never_replayable(self):
        auth = DigestAuthenticator(self.clock, self.credentials, REALM, load_secret(self.dir),
                                   AuthSettings(max_tracked=100))
        self.auth = auth
        first = self.challenge()
        first_line = client_answer("1001", "secret", first, qop="auth")
        self.assertEqual(self.check(request_with(first_line)), Authenticated("1001"))
        for _ in range(150):
            self.clock.advance(0.01)
            self.assertEqual(self.right(), Authenticated("1001"))
        self.assertEqual(len(auth._replay), 100)
        self.assertGreater(auth.evicted, 0)
        # The first nonce's count was evicted: its replay gets a stale challenge, not a success.
        result = self.check(request_with(client_answer("1001", "secret", first, qop="auth", nc=2)))
        self.assertIsInstance(result, Challenge)
        self.assertIn("stale=true", result.header_value)

    def test_replay_state_expires_with_its_nonces(self):
        for _ in range(50):
            self.assertEqual(self.right(), Authenticated("1001"))
        self.assertEqual(len(self.auth._replay), 50)
        self.clock.advance(self.config.nonce_lifetime + 1)
        self.challenge()
        self.assertEqual(len(self.auth._replay), 0)

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
