"""Day-to-day operations against twistd (issue 20): removing a user stops its calls at once."""

from tests.integration.sipua import status
from tests.integration.test_trust_udp import REALM, TrustTestCase


class UserRemoveTests(TrustTestCase):
    def test_user_remove_takes_its_bindings_and_forwarding_with_it(self):
        phone, caller = self.agent(), self.agent()
        self.register(phone, "1002")
        self.assertIn("sip:1002@localhost", self.server.admin("registrations").stdout)
        self.server.admin("forward", "set", "1002", "--busy", "1001")
        result = self.server.admin("user", "remove", "1002")
        self.assertIn("1 binding(s) of sip:1002@localhost removed", result.stdout)
        self.assertIn("forwarding of 1002 cleared", result.stdout)
        self.assertNotIn("1002", self.server.admin("registrations").stdout)
        self.assertNotIn("1002", self.server.admin("forward", "show").stdout)
        # A call to the removed user reaches no phone: 480 while the server still has the users file of a second
        # ago (it re-reads it at most once a second), 404 after; and the phone hears nothing.
        self.authenticated_invite(caller, f"sip:1002@{REALM}", call_id="after-remove")
        self.assertIn(status(caller.final("INVITE")), (404, 480))
        self.assertEqual([m for m in phone.expect_nothing(1.0) if m.startswith("INVITE")], [])
