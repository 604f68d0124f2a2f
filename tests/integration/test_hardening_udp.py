"""Issue 12 against the real server (twistd): host-name contacts, damaged state files, forged floods."""

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import ServerProcess
from tests.integration.sipua import UdpAgent, digest, header, status

REALM = "localhost"


class HostNameContactTests(SynchronousTestCase):
    def setUp(self):
        self.server = ServerProcess()
        self.server.admin("user", "add", "1005", "--password", "pw-1005")
        self.server.start()
        self.addCleanup(self.server.stop)
        self.phone = UdpAgent(self.server.port)
        self.addCleanup(self.phone.close)

    def register(self, contact: str, cseq: int, answer: str = "") -> str:
        self.phone.send(f"""
            REGISTER sip:{REALM} SIP/2.0
            Via: {self.phone.via()}
            Max-Forwards: 70
            From: <sip:1005@{REALM}>;tag=reg
            To: <sip:1005@{REALM}>
            Call-ID: hostname-reg
            CSeq: {cseq} REGISTER
            Contact: {contact}
            Expires: 3600
            {answer}
        """)
        return self.phone.final("REGISTER")

    def test_a_contact_named_by_host_name_is_refused_at_register_never_a_traceback(self):
        for n, contact in enumerate(("<sip:1005@some.host.name:5060>",
                                     f"<sip:1005@127.0.0.1:{self.phone.port};maddr=some.host.name>")):
            challenge = self.register(contact, 2 * n + 1)
            self.assertEqual(status(challenge), 401)
            answer = digest("1005", "pw-1005", REALM, header(challenge, "WWW-Authenticate"), "REGISTER",
                            f"sip:{REALM}", "Authorization")
            refused = self.register(contact, 2 * n + 2, answer)
            self.assertEqual(status(refused), 400)
            self.assertIn("Contact must be a numeric address", refused.splitlines()[0])
        self.assertNotIn("Traceback", self.server.log())
        self.assertNotIn("1005", self.server.admin("registrations").stdout)


class DamagedStateTests(SynchronousTestCase):
    def test_a_garbage_users_file_stops_twistd_with_the_file_and_the_reason(self):
        server = ServerProcess()
        os.makedirs(server.state_dir, exist_ok=True)
        path = os.path.join(server.state_dir, "users.json")
        with open(path, "w") as f:
            f.write("{ not json")
        with self.assertRaises(AssertionError) as raised:
            server.start(timeout=20)
        self.addCleanup(server.stop)
        self.assertIn(path, str(raised.exception))
        self.assertIn("restore it", str(raised.exception))

    def test_a_truncated_location_database_stops_twistd(self):
        server = ServerProcess()
        os.makedirs(server.state_dir, exist_ok=True)
        path = os.path.join(server.state_dir, "location.sqlite")
        open(path, "wb").close()
        with self.assertRaises(AssertionError) as raised:
            server.start(timeout=20)
        self.addCleanup(server.stop)
        self.assertIn(path, str(raised.exception))
        self.assertIn("0 bytes", str(raised.exception))
