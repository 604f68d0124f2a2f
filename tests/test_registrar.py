"""REGISTER processing with a real SQLite location file and users file, on a Clock."""

import os
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.registration.auth import parse_digest
from proxy.config import RegistrarConfig
from proxy.registration.credentials import UserRecord, compute_ha1, locked_users
from proxy.registration.location import Binding, SqliteLocationService
from proxy.nat import NatPolicy
from proxy.testing import make_core, sip_bytes, udp_source
from proxy.transport import Destination
from tests.test_auth import client_answer

REALM = "example.com"


class Phone:
    """Plays a 7960: REGISTER, answer the 401, count CSeq per line."""

    def __init__(self, harness, host="192.0.2.50", port=5060, user_agent="Cisco-CP7960G/8.0", instance=""):
        self.h = harness
        self.host, self.port = host, port
        self.user_agent = user_agent
        self.instance = instance
        self.cseq = {}

    def register(self, user, *, password="secret", expires=3600, contact=None, call_id=None, header_expires=None,
                 cseq=None, source_port=None, extra_contacts=(), authenticate=True):
        contact = contact or f"<sip:{user}@{self.host}:{self.port}>"
        if self.instance:
            contact += f';+sip.instance="<urn:uuid:00000000-0000-0000-0000-{self.instance}>"'
        if expires is not None:
            contact += f";expires={expires}"
        self.cseq[user] = cseq if cseq is not None else self.cseq.get(user, 0) + 1
        lines = [
            f"REGISTER sip:{REALM} SIP/2.0",
            f"Via: SIP/2.0/UDP {self.host}:{self.port};branch=z9hG4bK{os.urandom(5).hex()}",
            f"From: <sip:{user}@{REALM}>;tag=ft",
            f"To: <sip:{user}@{REALM}>",
            f"Call-ID: {call_id or user + '-reg@' + self.host}",
            f"CSeq: {self.cseq[user]} REGISTER",
            f"Contact: {contact}",
            *[f"Contact: {c}" for c in extra_contacts],
            f"User-Agent: {self.user_agent}",
        ]
        if header_expires is not None:
            lines.append(f"Expires: {header_expires}")
        first = self.send(lines, source_port)
        if first.status != 401 or not authenticate:
            return first
        nonce = parse_digest(first.headers.get("www-authenticate"))["nonce"]
        self.cseq[user] += 1
        lines[1] = f"Via: SIP/2.0/UDP {self.host}:{self.port};branch=z9hG4bK{os.urandom(5).hex()}"
        lines[5] = f"CSeq: {self.cseq[user]} REGISTER"
        lines.append(client_answer(user, password, nonce, qop="auth", uri=f"sip:{REALM}"))
        return self.send(lines, source_port)

    def send(self, lines, source_port=None):
        self.h.server.data_received(sip_bytes("\n".join(lines)), udp_source(self.host, source_port or self.port))
        sent = self.h.transports.take()
        assert len(sent) == 1, sent
        return sent[0][0]


class Harness:
    def __init__(self, test, config=RegistrarConfig(), clock=None, state_dir=None):
        self.clock = clock or Clock()
        if clock is None:
            self.clock.advance(1_700_000_000)
        self.dir = state_dir or test.mktemp()
        os.makedirs(self.dir, exist_ok=True)
        users_path = os.path.join(self.dir, "users.json")
        with locked_users(users_path) as users:
            for name in ("1001", "1002", "1003", "1004", "1005", "1006"):
                users[name] = UserRecord(name, REALM, compute_ha1(name, REALM, "secret"))
        # The object graph exactly as the server builds it (proxy/core.py).
        self.core, self.transports, _ = make_core(self.dir, self.clock, domains=(REALM,), addresses=("192.0.2.1",),
                                                  registrar=config)
        self.server = self.core.server
        self.location = self.core.location
        self.registrar = self.core.registrar
        self.registrar.rng = random.Random(7)  # the expiry spread, made repeatable


class RegisterTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness(self)
        self.phone = Phone(self.h)

    def test_challenge_then_200_with_contact_and_date(self):
        first = self.phone.register("1001", authenticate=False)
        self.assertEqual(first.status, 401)
        self.assertIn("WWW-Authenticate", dict(first.headers))
        ok = self.phone.register("1001")
        self.assertEqual(ok.status, 200)
        self.assertEqual(ok.headers.get_lines("contact"), ["<sip:1001@192.0.2.50:5060>;expires=3600"])
        self.assertTrue(ok.headers.get("date").endswith("GMT"))
        (binding,) = self.h.location.lookup("sip:1001@example.com")
        self.assertEqual((binding.user_agent, binding.source_host, binding.source_port),
                         ("Cisco-CP7960G/8.0", "192.0.2.50", 5060))

    def test_wrong_password_never_200(self):
        self.assertEqual(self.phone.register("1001", password="nope").status, 401)
        self.assertEqual(self.h.location.lookup("sip:1001@example.com"), [])

    def test_user_may_register_only_own_aor(self):
        self.phone.cseq["1002"] = 0
        first = self.phone.register("1002", authenticate=False)
        nonce = parse_digest(first.headers.get("www-authenticate"))["nonce"]
        lines = [
            f"REGISTER sip:{REALM} SIP/2.0", "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKown",
            f"From: <sip:1002@{REALM}>;tag=1", f"To: <sip:1002@{REALM}>", "Call-ID: x", "CSeq: 9 REGISTER",
            "Contact: <sip:1002@192.0.2.50>", client_answer("1001", "secret", nonce, qop="auth", uri=f"sip:{REALM}"),
        ]
        resp = self.phone.send(lines)
        self.assertEqual((resp.status, resp.reason), (403, "Not allowed to register this address"))

    def test_line_1_credentials_register_listed_lines(self):
        # Seed 001 line 2146: lines without linex_authname use line 1's.
        with locked_users(os.path.join(self.h.dir, "users.json")) as users:
            users["1001"] = UserRecord("1001", REALM, compute_ha1("1001", REALM, "secret"), lines=("1002",))
        self.h.clock.advance(1)
        phone = Phone(self.h)
        first = phone.register("1002", authenticate=False)
        nonce = parse_digest(first.headers.get("www-authenticate"))["nonce"]
        lines = [
            f"REGISTER sip:{REALM} SIP/2.0", "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKl1",
            f"From: <sip:1002@{REALM}>;tag=1", f"To: <sip:1002@{REALM}>", "Call-ID: l1", "CSeq: 9 REGISTER",
            "Contact: <sip:1002@192.0.2.50>", client_answer("1001", "secret", nonce, qop="auth", uri=f"sip:{REALM}"),
        ]
        self.assertEqual(phone.send(lines).status, 200)
        self.assertEqual(len(self.h.location.lookup("sip:1002@example.com")), 1)

    def test_expiry_header_and_param_and_default(self):
        self.assertEqual(self.phone.register("1001", expires=None, header_expires=600).headers.get("contact"),
                         "<sip:1001@192.0.2.50:5060>;expires=600")
        self.assertEqual(self.phone.register("1002", expires=None).headers.get("contact"),
                         "<sip:1002@192.0.2.50:5060>;expires=3600")
        resp = self.phone.register("1003", expires=90000)
        self.assertEqual(resp.headers.get("contact"), "<sip:1003@192.0.2.50:5060>;expires=3600")

    def test_below_min_expires_is_423(self):
        resp = self.phone.register("1001", expires=30)
        self.assertEqual((resp.status, resp.headers.get("min-expires")), (423, "60"))

    def test_binding_expires_on_the_clock(self):
        self.phone.register("1001", expires=120)
        self.h.clock.advance(119)
        self.assertEqual(len(self.h.location.lookup("sip:1001@example.com")), 1)
        self.h.clock.advance(1)
        self.assertEqual(self.h.location.lookup("sip:1001@example.com"), [])
        self.assertEqual(self.h.location.sweep(), 1)

    def test_unregister_one_and_wildcard(self):
        self.phone.register("1001", extra_contacts=("<sip:1001@192.0.2.60:5060>;expires=3600",))
        self.assertEqual(len(self.h.location.lookup("sip:1001@example.com")), 2)
        resp = self.phone.register("1001", expires=0)
        self.assertEqual(resp.headers.get_lines("contact"), ["<sip:1001@192.0.2.60:5060>;expires=3600"])
        resp = self.phone.register("1001", contact="*", expires=None, header_expires=0)
        self.assertEqual((resp.status, resp.headers.get_lines("contact")), (200, []))
        self.assertEqual(self.h.location.lookup("sip:1001@example.com"), [])

    def test_wildcard_needs_expires_zero(self):
        resp = self.phone.register("1001", contact="*", expires=None, header_expires=60)
        self.assertEqual(resp.status, 400)

    def test_out_of_order_cseq_is_refused(self):
        self.phone.register("1001")
        resp = self.phone.register("1001", cseq=1)
        self.assertEqual((resp.status, resp.reason), (500, "Out of order CSeq"))

    def test_new_call_id_may_restart_cseq(self):
        self.phone.register("1001")
        self.assertEqual(self.phone.register("1001", cseq=1, call_id="after-reboot").status, 200)

    def test_q_values_order_lookup(self):
        self.phone.register("1001", contact="<sip:1001@192.0.2.50:5060>;q=0.5",
                            extra_contacts=("<sip:1001@192.0.2.61:5060>;q=0.9;expires=3600",))
        self.assertEqual([b.contact for b in self.h.location.lookup("sip:1001@example.com")],
                         ["sip:1001@192.0.2.61:5060", "sip:1001@192.0.2.50:5060"])

    def test_six_lines_of_one_phone(self):
        for n in range(1, 7):
            self.assertEqual(self.phone.register(f"100{n}").status, 200)
        bindings = self.h.location.all_bindings()
        self.assertEqual(len(bindings), 6)
        self.assertEqual({b.source_host for b in bindings}, {"192.0.2.50"})

    def test_backup_proxy_registration_by_address(self):
        # SIP-SRST: phones register with the proxy's IP as the domain.
        phone = Phone(self.h)
        lines = [
            "REGISTER sip:192.0.2.1 SIP/2.0", "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKbk1",
            "From: <sip:1001@192.0.2.1>;tag=1", "To: <sip:1001@192.0.2.1>", "Call-ID: bk", "CSeq: 1 REGISTER",
            "Contact: <sip:1001@192.0.2.50:5060>",
        ]
        first = phone.send(lines)
        nonce = parse_digest(first.headers.get("www-authenticate"))["nonce"]
        lines[1] = "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKbk2"
        lines[5] = "CSeq: 2 REGISTER"
        lines.append(client_answer("1001", "secret", nonce, qop="auth", uri="sip:192.0.2.1"))
        self.assertEqual(phone.send(lines).status, 200)
        self.assertEqual(len(self.h.location.lookup("sip:1001@example.com")), 1)

    def test_foreign_domain_refused(self):
        lines = [
            "REGISTER sip:elsewhere.example.net SIP/2.0", "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bKf",
            "From: <sip:1001@elsewhere.example.net>;tag=1", "To: <sip:1001@elsewhere.example.net>", "Call-ID: f",
            "CSeq: 1 REGISTER", "Contact: <sip:1001@192.0.2.50>",
        ]
        self.assertEqual(self.phone.send(lines).status, 403)

    def test_unknown_scheme_in_to_is_400(self):
        # RFC 4475 3.3.4.
        with open(os.path.join(os.path.dirname(__file__), "fixtures", "rfc4475", "unksm2.dat"), "rb") as f:
            data = f.read().replace(b"REGISTER sip:example.com", b"REGISTER sip:example.com", 1)
        self.h.server.data_received(data, udp_source())
        self.assertEqual(self.h.transports.take()[0][0].status, 400)

    def test_instance_replaces_old_contact_after_reboot(self):
        phone = Phone(self.h, instance="003094c25d2e")
        phone.register("1001")
        moved = Phone(self.h, host="192.0.2.77", instance="003094c25d2e")
        moved.register("1001", call_id="new-boot")
        (binding,) = self.h.location.lookup("sip:1001@example.com")
        self.assertEqual(binding.contact, "sip:1001@192.0.2.77:5060")

    def test_source_port_kept_for_nat(self):
        self.phone.register("1001", source_port=40123)
        (binding,) = self.h.location.lookup("sip:1001@example.com")
        self.assertEqual(binding.source_port, 40123)


class HardeningTests(SynchronousTestCase):
    def setUp(self):
        self.h = Harness(self)
        self.phone = Phone(self.h)

    def test_a_contact_named_by_host_name_is_refused_with_a_clear_400(self):
        for contact in ("<sip:1005@some.host.name:5060>", "<sip:1005@192.0.2.50:5060;maddr=some.host.name>"):
            with self.subTest(contact):
                answer = self.phone.register("1005", contact=contact)
                self.assertEqual((answer.status, answer.reason),
                                 (400, "Contact must be a numeric address, not a host name"))
        self.assertEqual(self.h.location.lookup(f"sip:1005@{REALM}"), [])
        # Removing such a contact (expires=0) is still allowed.
        self.assertEqual(self.phone.register("1005", contact="<sip:1005@some.host.name:5060>", expires=0).status, 200)

    def test_an_unauthenticated_register_holds_no_transaction(self):
        for n in range(50):
            answer = self.phone.register(f"10{n:02d}", authenticate=False)
            self.assertEqual(answer.status, 401)
        self.assertEqual(self.h.server.transactions.counts()["server_non_invite"], 0)
        self.h.clock.advance(1)
        self.assertEqual(self.h.transports.take(), [])  # and nothing is retransmitted


class SpreadTests(SynchronousTestCase):
    def test_expires_range_spreads_below_the_request(self):
        h = Harness(self, RegistrarConfig(expires_range=20))
        phone = Phone(h)
        granted = set()
        for n in range(1, 7):
            contact = phone.register(f"100{n}").headers.get("contact")
            granted.add(int(contact.rsplit("=", 1)[1]))
        self.assertTrue(all(2880 <= g <= 3600 for g in granted), granted)
        self.assertGreater(len(granted), 1)


class PersistenceTests(SynchronousTestCase):
    def test_bindings_survive_a_restart_and_expired_ones_do_not(self):
        clock = Clock()
        clock.advance(1_700_000_000)
        state = self.mktemp()
        h = Harness(self, clock=clock, state_dir=state)
        phone = Phone(h)
        phone.register("1001", expires=3600)
        phone.register("1002", expires=120)
        h.location.stop()
        clock.advance(200)
        again = SqliteLocationService(os.path.join(state, "location.sqlite"), clock)
        (binding,) = again.all_bindings()
        self.assertEqual((binding.aor, binding.user_agent, binding.expires_in(clock.seconds())),
                         ("sip:1001@example.com", "Cisco-CP7960G/8.0", 3400))
        self.assertEqual(oct(os.stat(os.path.join(state, "location.sqlite")).st_mode & 0o777), "0o600")

    def test_group_commit_at_the_end_of_the_turn(self):
        """The server commits a turn's bindings together; another reader sees them once the turn ends."""
        import sqlite3

        clock = Clock()
        clock.advance(1_700_000_000)
        state = self.mktemp()
        h = Harness(self, clock=clock, state_dir=state)
        self.assertTrue(h.location.group_commit)
        phone = Phone(h)
        phone.register("1001", expires=3600)
        phone.register("1002", expires=3600)
        reader = sqlite3.connect(os.path.join(state, "location.sqlite"))
        self.addCleanup(reader.close)
        count = "SELECT COUNT(*) FROM bindings"
        self.assertEqual(reader.execute(count).fetchone()[0], 0)  # the turn is not over
        clock.advance(0)
        self.assertEqual(reader.execute(count).fetchone()[0], 2)
        h.core.forwarding_store.update("1001", always="1002")  # the shared connection: never "database is locked"
        phone.register("1001", expires=0)
        clock.advance(0)
        self.assertEqual(reader.execute(count).fetchone()[0], 1)
        self.assertEqual(reader.execute("SELECT always FROM forwarding").fetchone()[0], "1002")


class NatTargetTests(SynchronousTestCase):
    def binding(self, host="203.0.113.9", port=40000):
        return Binding(aor="sip:1001@example.com", contact="sip:1001@192.168.1.20:5060", expires_at=1e12,
                       source_host=host, source_port=port)

    def test_auto_uses_source_for_private_contact_elsewhere(self):
        self.assertEqual(self.binding().destination("192.168.1.20", 5060, NatPolicy("auto")), Destination("UDP", "203.0.113.9", 40000))

    def test_auto_trusts_contact_when_it_is_the_source(self):
        b = self.binding("192.168.1.20", 5060)
        self.assertEqual(b.destination("192.168.1.20", 5060, NatPolicy("auto")), Destination("UDP", "192.168.1.20", 5060))

    def test_auto_trusts_public_contact(self):
        self.assertEqual(self.binding().destination("198.51.100.4", None, NatPolicy("auto")), Destination("UDP", "198.51.100.4", 5060))

    def test_always_and_never(self):
        self.assertEqual(self.binding().destination("198.51.100.4", 5060, NatPolicy("always")), Destination("UDP", "203.0.113.9", 40000))
        self.assertEqual(self.binding().destination("192.168.1.20", 5060, NatPolicy("never")), Destination("UDP", "192.168.1.20", 5060))

    def test_response_to_natted_phone_goes_to_source(self):
        h = Harness(self)
        phone = Phone(h, host="192.168.1.20")
        phone.h.server.data_received(sip_bytes(f"""
            REGISTER sip:{REALM} SIP/2.0
            Via: SIP/2.0/UDP 192.168.1.20:5060;branch=z9hG4bKnat
            From: <sip:1001@{REALM}>;tag=1
            To: <sip:1001@{REALM}>
            Call-ID: nat
            CSeq: 1 REGISTER
            Contact: <sip:1001@192.168.1.20:5060>
        """), udp_source("203.0.113.9", 40000))
        _, dest = h.transports.take()[0]
        self.assertEqual(dest, Destination("UDP", "203.0.113.9", 40000))


class ContactLimitTests(SynchronousTestCase):
    def test_an_aor_may_hold_max_contacts_and_no_more_but_may_refresh_them(self):
        h = Harness(self, config=RegistrarConfig(max_contacts=3))
        phones = [Phone(h, host=f"192.0.2.{60 + n}") for n in range(4)]
        for phone in phones[:3]:
            self.assertEqual(phone.register("1001").status, 200)
        refused = phones[3].register("1001")
        self.assertEqual((refused.status, refused.reason), (403, "Too many registered contacts"))
        self.assertEqual(len(h.location.lookup("sip:1001@example.com")), 3)
        self.assertEqual(phones[0].register("1001").status, 200)  # a refresh does not grow the list
        self.assertEqual(phones[0].register("1001", expires=0).status, 200)  # one goes...
        self.assertEqual(phones[3].register("1001").status, 200)  # ...and another may come
