"""Registration against the real server, with SIPp playing 7960 lines."""

import json

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import ServerProcess, free_port, run_sipp, sipp_errors

USERS = [(f"10{n:02d}", f"pw-{n}") for n in range(1, 7)]


class RegistrarWithSippTests(SynchronousTestCase):
    def setUp(self):
        self.server = ServerProcess()
        for name, password in USERS:
            self.server.admin("user", "add", name, "--password", password, "--display-name", f"Line {name}")
        self.server.start()
        self.addCleanup(self.server.stop)

    def register(self, rows, scenario="register.xml", local_port=None):
        """One SIPp run per (user, domain, password, expires) row; all from local_port if given (one phone).

        One run per line because SIPp 3.6 substitutes only one injection field
        inside [authentication ...]; the credentials go in -au/-ap instead.
        """
        for user, domain, password, expires in rows:
            result = run_sipp(scenario, self.server.port, injection=[(user, domain, expires)], local_port=local_port,
                              extra=["-au", user, "-ap", password])
            self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-3000:])

    def registrations(self):
        return json.loads(self.server.admin("registrations", "--json").stdout)

    def test_register_with_digest_then_listed(self):
        self.register([("1001", "localhost", "pw-1", "3600")])
        (row,) = self.registrations()
        self.assertEqual((row["aor"], row["user_agent"], row["transport"]), ("sip:1001@localhost", "Cisco-CP7960G/8.0", "UDP"))
        self.assertTrue(3590 <= row["expires_in"] <= 3600)
        self.assertTrue(row["source"].startswith("127.0.0.1:"))
        table = self.server.admin("registrations").stdout
        self.assertIn("sip:1001@localhost", table)
        self.assertIn("Cisco-CP7960G/8.0", table)

    def test_wrong_password_never_gets_200(self):
        self.register([("1001", "localhost", "not-the-password", "3600")], scenario="register_refused.xml")
        self.assertEqual(self.registrations(), [])

    def test_six_lines_from_one_phone_then_unregister_one(self):
        port = free_port()
        self.register([(name, "localhost", pw, "3600") for name, pw in USERS], local_port=port)
        rows = self.registrations()
        self.assertEqual(sorted(r["aor"] for r in rows), [f"sip:{name}@localhost" for name, _ in USERS])
        self.assertEqual({r["source"] for r in rows}, {f"127.0.0.1:{port}"})
        self.register([("1003", "localhost", "pw-3", "0")], local_port=port)
        self.assertNotIn("sip:1003@localhost", [r["aor"] for r in self.registrations()])
        self.assertEqual(len(self.registrations()), 5)

    def test_restart_keeps_bindings(self):
        self.register([("1001", "localhost", "pw-1", "3600"), ("1002", "localhost", "pw-2", "3600")])
        before = {r["aor"]: r["contact"] for r in self.registrations()}
        self.server.stop()
        again = ServerProcess(port=self.server.port, state_dir=self.server.state_dir, admin_port=self.server.admin_port)
        again.start()
        self.addCleanup(again.stop)
        after = {r["aor"]: r["contact"] for r in json.loads(again.admin("registrations", "--json").stdout)}
        self.assertEqual(after, before)
        self.assertEqual(len(after), 2)
