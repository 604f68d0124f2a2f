"""Day-to-day operations against twistd (issue 20): removing a user stops its calls at once."""

import time

from tests.integration.sipua import status
from tests.integration.test_trust_udp import REALM, TrustTestCase, _response


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


class RegistrationCommandTests(TrustTestCase):
    def test_registrations_unregister_and_lookup_against_the_running_server(self):
        first, second, caller = self.agent(), self.agent(), self.agent()
        self.register(first, "1002")
        self.register(second, "1002")
        self.server.admin("forward", "set", "1002", "--no-answer", "1001", "--after", "15")
        listed = self.server.admin("registrations", "1002").stdout
        self.assertEqual(listed.count("sip:1002@localhost"), 2, listed)
        self.assertNotIn("sip:1001@", listed)
        contact = f"sip:1002@127.0.0.1:{first.port}"
        self.assertIn("1 binding(s) of sip:1002@localhost removed",
                      self.server.admin("unregister", "1002", contact).stdout)
        shown = self.server.admin("lookup", "1002").stdout
        self.assertIn(f"registered sip:1002@127.0.0.1:{second.port}", shown)
        self.assertNotIn(contact, shown)
        self.assertIn("forward no answer after 15 s -> 1001", shown)
        self.assertIn("1 binding(s)", self.server.admin("unregister", "1002").stdout)
        self.assertIn("not registered", self.server.admin("lookup", "1002").stdout)
        # Unregistered means unreachable now, not when the binding would have expired: neither phone rings.
        self.authenticated_invite(caller, "sip:1002@localhost", call_id="after-unregister")
        final = caller.final("INVITE", timeout=20)
        self.assertNotEqual(status(final), 200)
        self.assertEqual([m for m in first.expect_nothing(0.5) + second.expect_nothing(0.5) if m.startswith("INVITE")], [])
        self.assertEqual(self.server.admin("lookup", "nobody", check=False).returncode, 1)


class KeepaliveTests(TrustTestCase):
    # T1 = 0.1 s: an OPTIONS nobody answers is given up after Timer F, 6.4 s.
    extra_config = "[registrar]\nkeepalive_interval = 10\n[timers]\nt1 = 0.1\nt2 = 0.4\n"

    def test_a_phone_that_answers_options_is_listed_reachable_with_its_rtt(self):
        phone = self.agent()
        self.register(phone, "1002")
        options = phone.receive(15, lambda t: t.startswith("OPTIONS "))
        self.assertIsNotNone(options, self.server.log()[-2000:])
        phone.send(_response(options, 200), to=("127.0.0.1", self.server.port))
        deadline = time.monotonic() + 5
        while True:  # the answer and the listing race: look again until it is in
            listed = self.server.admin("registrations", "1002").stdout
            if " yes " in listed or time.monotonic() > deadline:
                break
        self.assertIn("REACHABLE", listed)
        self.assertRegex(listed, r" yes +[0-9.]+ms ")
        self.assertRegex(self.server.admin("phones").stdout, r" yes +[0-9.]+ms ")  # per phone too
        # The phone stops answering: after the next OPTIONS and its Timer F it is listed unreachable.
        self.assertIsNotNone(phone.receive(15, lambda t: t.startswith("OPTIONS ")))
        deadline = time.monotonic() + 15
        while True:
            listed = self.server.admin("registrations", "1002").stdout
            if " NO " in listed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assertIn(" NO ", listed)
        self.assertIn("does not answer OPTIONS", self.server.log())


class ReloadTests(TrustTestCase):
    def test_reload_changes_a_route_while_the_server_runs(self):
        from tests.integration.harness import free_port

        # A call rings at the old gateway while the route moves: it goes on there and completes.
        ringing = self.agent()
        self.authenticated_invite(ringing, f"sip:9011440000@{REALM}", call_id="before-reload", to="9011440000")
        old_invite = self.gateway.receive(5, lambda t: t.startswith("INVITE"))
        self.assertIsNotNone(old_invite, self.server.log()[-2000:])
        self.gateway.send(_response(old_invite, 180), to=("127.0.0.1", self.server.port))
        new_port = free_port()
        new_gateway = self.agent(new_port)
        with open(self.server.config_path) as f:
            text = f.read()
        with open(self.server.config_path, "w") as f:
            f.write(text.replace(f"127.0.0.1:{self.gw_port}", f"127.0.0.1:{new_port}"))
        result = self.server.admin("reload")
        self.assertIn("reloaded: routes, emergency", result.stdout)
        self.gateway.send(_response(old_invite, 200, f"<sip:gw@127.0.0.1:{self.gw_port}>"), body="v=0\r\n",
                          to=("127.0.0.1", self.server.port))
        self.assertEqual(status(ringing.final("INVITE")), 200)
        phone = self.agent()
        self.authenticated_invite(phone, f"sip:9011441234@{REALM}", call_id="after-reload", to="9011441234")
        invite = new_gateway.receive(5, lambda t: t.startswith("INVITE"))
        self.assertIsNotNone(invite, self.server.log()[-2000:])
        self.assertEqual([m for m in self.gateway.expect_nothing(0.5) if m.startswith("INVITE")], [])
        # A broken file is refused and the running tables stay.
        with open(self.server.config_path, "a") as f:
            f.write("[timers]\nt1 = -1\n")
        refused = self.server.admin("reload", check=False)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("timers.t1", refused.stderr)


class PluginReloadTests(TrustTestCase):
    extra_config = '[plugins]\nenabled = ["ldapdir", "metrics"]\n[plugins.ldapdir]\ntitle = "Directory"\n'

    def edit(self, old: str, new: str) -> None:
        with open(self.server.config_path) as f:
            text = f.read()
        with open(self.server.config_path, "w") as f:
            f.write(text.replace(old, new))

    def menu(self) -> bytes:
        return self.server.phone_get("/services")[1]

    def test_a_plugin_table_reloads_or_is_named_for_a_restart(self):
        self.assertIn(b"<Name>Directory</Name>", self.menu())
        self.edit('title = "Directory"\n', 'title = "Company phone book"\n[plugins.metrics]\nlisten = "tcp:19999"\n')
        result = self.server.admin("reload")
        self.assertIn("reloaded: plugins.ldapdir", result.stdout)
        self.assertIn("a restart is needed for: plugins.metrics", result.stdout)
        self.assertIn(b"<Name>Company phone book</Name>", self.menu())
        # A bad table refuses the whole reload, naming the key; the running directory is untouched.
        self.edit('title = "Company phone book"', "title = 5")
        refused = self.server.admin("reload", check=False)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("plugins.ldapdir.title", refused.stderr)
        self.assertIn(b"<Name>Company phone book</Name>", self.menu())


class LogLevelTests(TrustTestCase):
    server_extra = "workers = 2\n"

    def test_debug_at_runtime_in_every_process_then_info(self):
        self.assertEqual(self.server.admin("log-level").stdout.strip(), "info")
        result = self.server.admin("log-level", "debug", "--minutes", "1")
        self.assertTrue(result.stdout.startswith("debug until "), result.stdout)
        from proxy.workers.owner import call_id_owner

        for worker in (0, 1):
            call_id = next(f"reg-{n}" for n in range(100) if call_id_owner(f"reg-{n}".encode(), 2) == worker)
            self.register(self.agent(), "1002", call_id=call_id)
        # A worker's lines reach the primary's log through a pipe: wait for them.
        lines = self.wait_for_lines(lambda line: "worker 1: " in line and "REGISTER sip:localhost from" in line)
        self.assertTrue(lines)
        self.assertIn("REGISTER sip:localhost from 127.0.0.1", self.server.log())
        self.server.admin("log-level", "info")
        time.sleep(0.5)
        before = self.server.log().count("REGISTER sip:localhost from")
        for worker in (0, 1):
            call_id = next(f"quiet-{n}" for n in range(100) if call_id_owner(f"quiet-{n}".encode(), 2) == worker)
            self.register(self.agent(), "1002", call_id=call_id)
        time.sleep(0.5)
        self.assertEqual(self.server.log().count("REGISTER sip:localhost from"), before)

    def wait_for_lines(self, matches, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.server.log().splitlines() if matches(line)]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


class TraceTests(TrustTestCase):
    def test_trace_a_user_at_runtime(self):
        result = self.server.admin("trace", "--user", "1002", "--minutes", "1")
        self.assertIn("tracing user 1002 until", result.stdout)
        phone, other = self.agent(), self.agent()
        self.register(phone, "1002")
        self.register(other, "1001")
        log = self.server.log()
        self.assertIn("TRACE in 127.0.0.1", log)
        self.assertIn("REGISTER sip:localhost SIP/2.0", log)
        self.assertIn("Authorization: (masked)", log)
        self.assertNotIn("From: <sip:1001@localhost>", log)  # only the traced user's messages
        self.server.admin("trace", "--stop")
