"""Transfers through the real proxy with SIPp playing A (transferee), B (transferor) and C (target): the seed's
REFER-then-Bye/Also flow (seed 001 Figure B-8) with a 7960 as A, and with an A that ignores Also, which the
proxy completes itself (RFC 3725 flow I); `sipproxy-admin calls` during the call."""

import json
import time

from tests.integration.harness import free_port, run_sipp, sipp_errors
from tests.integration.test_proxy_sipp import PASSWORDS, CallTestCase


class ByeAlsoTests(CallTestCase):
    def setUp(self):
        super().setUp()
        self.b, self.c = free_port(), free_port()
        self.register("1002", self.b)
        self.register("1003", self.c)

    def transfer(self, a_scenario, c_scenario, fields, then=None, b_scenario="xfer_b_bye_also.xml"):
        target = self.peer(c_scenario, port=self.c, timeout=30)
        transferor = self.peer(b_scenario, port=self.b, extra=["-inf", self._fields("1003;localhost;")],
                               timeout=30)
        result = run_sipp(a_scenario, self.server.port, injection=[fields], extra=["-au", "1001", "-ap",
                                                                                  PASSWORDS["1001"]], timeout=30)
        if result.returncode != 0:
            transferor.stop()
            target.stop()
        self.assertEqual(result.returncode, 0, sipp_errors(result) + "\nB: " + transferor.errors() + "\nC: " +
                         target.errors() + self.server.log()[-5000:])
        self.assertPeerDone(transferor)
        if then is not None:
            try:
                then()
            except AssertionError:
                target.stop()
                raise AssertionError(target.errors())
        self.assertPeerDone(target)

    def derived(self, name: str, *replacements) -> str:
        """tests/scenarios/<name> with text replaced: a variant for one test (a header more, a longer talk)."""
        import os
        import tempfile

        from tests.integration.harness import SCENARIOS

        with open(os.path.join(SCENARIOS, name)) as f:
            text = f.read()
        for old, new in replacements:
            assert old in text, old
            text = text.replace(old, new)
        path = os.path.join(tempfile.mkdtemp(), name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_attended_transfer_with_replaces(self):
        # B consults C (its own call), then REFERs A with Refer-To: C?Replaces=<that call>; A INVITEs C with
        # Replaces. The proxy passes every header through; the call list sees the transfer.
        from tests.integration.harness import SippPeer

        target = SippPeer("callee.xml", self.server.port, port=self.c, calls=2, extra=["-trace_msg"], timeout=30)
        self.addCleanup(target.stop)
        c_tag = f"{target.process.pid}SIPpTag011"  # callee.xml's To tag of its first call, the consultation
        replaces = f"consult-1@127.0.0.1;to-tag={c_tag};from-tag=b-consult"
        escaped = replaces.replace("@", "%40").replace(";", "%3B").replace("=", "%3D")
        transferor = self.peer("xfer_b_attended.xml", port=self.b, timeout=30,
                               extra=["-inf", self._fields(f"1003;localhost;{escaped};")])
        consult = SippPeer(self.derived("caller.xml", ("tag=[pid]SIPpTag00[call_number]", "tag=b-consult"),
                                        ('<pause milliseconds="200"/>', '<pause milliseconds="5000"/>')),
                           self.server.port, extra=["-inf", self._fields("1002;1003;localhost;"), "-au", "1002",
                                                     "-ap", PASSWORDS["1002"], "-cid_str", "consult-1@%s"])
        self.addCleanup(consult.stop)
        result = run_sipp("xfer_a_refer.xml", self.server.port, injection=[("1001", "1002", "localhost")],
                          extra=["-au", "1001", "-ap", PASSWORDS["1001"]], timeout=30)
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-4000:])
        self.assertPeerDone(transferor)
        calls = json.loads(self.server.admin("calls", "--json").stdout)
        self.assertEqual([(c["caller"], c["callee"]) for c in calls], [("sip:1002@localhost", "sip:1003@localhost")])
        replacing = run_sipp(self.derived("caller.xml", ("User-Agent: Cisco-CP7960G/8.0",
                                                         f"User-Agent: Cisco-SIPIPPhone/7.5\n      Replaces: {replaces}")),
                             self.server.port, injection=[("1001", "1003", "localhost")],
                             extra=["-au", "1001", "-ap", PASSWORDS["1001"]], timeout=20)
        self.assertEqual(replacing.returncode, 0, sipp_errors(replacing) + self.server.log()[-4000:])
        self.assertEqual(consult.wait(), 0, consult.errors())
        self.assertPeerDone(target)
        import glob

        (messages,) = glob.glob(f"{target.workdir}/*_messages.log")
        with open(messages) as f:
            self.assertIn(f"Replaces: {replaces}", f.read())
        self.logged("transferred (refer)")

    def a_invites_c(self, header="Requested-By"):
        """What a 7960 does with Also: C (seed 001 Figure B-8): a new call to C with Requested-By: B."""
        import os
        import tempfile

        from tests.integration.harness import SCENARIOS

        with open(os.path.join(SCENARIOS, "caller.xml")) as f:
            text = f.read()
        text = text.replace("User-Agent: Cisco-CP7960G/8.0", "User-Agent: Cisco-SIPIPPhone/7.5\n      "
                            f"{header}: <sip:1002@localhost>")
        path = os.path.join(tempfile.mkdtemp(), "a_invites_c.xml")
        with open(path, "w") as f:
            f.write(text)
        result = run_sipp(path, self.server.port, injection=[("1001", "1003", "localhost")],
                          extra=["-au", "1001", "-ap", PASSWORDS["1001"]], timeout=20)
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-4000:])

    def _fields(self, row):
        import os
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "fields.csv")
        with open(path, "w") as f:
            f.write(f"SEQUENTIAL\n{row}\n")
        return path

    def logged(self, text: str, timeout: float = 5.0) -> str:
        """The server log once it holds `text` (a worker's lines reach it a moment later)."""
        deadline = time.monotonic() + timeout
        while text not in self.server.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        log = self.server.log()
        self.assertIn(text, log)
        return log

    def test_blind_transfer_with_refer(self):
        # Seed 001 Figure B-7: hold, REFER (202), NOTIFY, BYE; then A INVITEs C with Referred-By.
        self.transfer("xfer_a_refer.xml", "xfer_c_answers.xml", ("1001", "1002", "localhost"),
                      then=lambda: self.a_invites_c("Referred-By"), b_scenario="xfer_b_refer.xml")
        self.logged("transferred (refer)")

    def test_a_7960_acts_on_also_itself(self):
        self.transfer("xfer_a_acts_on_also.xml", "xfer_c_answers.xml", ("1001", "1002", "localhost"),
                      then=self.a_invites_c)
        log = self.logged("transferred (bye-also)")
        self.assertNotIn("completing the transfer", log)

    def test_an_a_that_ignores_also_is_connected_to_c_by_the_proxy(self):
        from tests.integration.harness import SippPeer

        # C talks 3 s before it hangs up: long enough to see the one transferred call in the list.
        target = self.peer(self.derived("xfer_c_hangs_up.xml", ('<pause milliseconds="300"/>',
                                                                '<pause milliseconds="3000"/>')), port=self.c, timeout=30)
        transferor = self.peer("xfer_b_bye_also.xml", port=self.b, extra=["-inf", self._fields("1003;localhost;")],
                               timeout=30)
        a = SippPeer("xfer_a_ignores_also.xml", self.server.port, timeout=30,
                     extra=["-inf", self._fields("1001;1002;localhost;"), "-au", "1001", "-ap", PASSWORDS["1001"]])
        self.addCleanup(a.stop)
        calls, deadline = [], time.monotonic() + 15
        while time.monotonic() < deadline and not any(c["transfer"] == "bye-also-completed" and c["state"] == "up"
                                                      for c in calls):
            calls = json.loads(self.server.admin("calls", "--json").stdout)
            time.sleep(0.1)
        self.assertEqual([(c["caller"], c["state"], c["transfer"], c["transfer_to"]) for c in calls],
                         [("sip:1001@localhost", "up", "bye-also-completed", "sip:1003@localhost")])
        self.assertEqual(a.wait(), 0, a.errors() + self.server.log()[-4000:])
        self.assertPeerDone(transferor)
        self.assertPeerDone(target)
        log = self.logged("hung up by the transfer target, ")
        self.assertIn("completing the transfer", log)
        self.assertIn("Transfer completed by the proxy", log)
        self.assertIn("transferred (bye-also-completed)", log)
        self.assertEqual(json.loads(self.server.admin("calls", "--json").stdout), [])

class CallListTests(CallTestCase):
    def test_calls_lists_a_call_in_progress(self):
        import os
        import tempfile

        from tests.integration.harness import SCENARIOS, SippPeer

        port = free_port()
        self.register("1002", port)
        callee = self.peer("callee.xml", port=port)
        with open(os.path.join(SCENARIOS, "caller.xml")) as f:
            text = f.read().replace('<pause milliseconds="200"/>', '<pause milliseconds="4000"/>')  # talk 4 s
        scenario = os.path.join(tempfile.mkdtemp(), "caller_talks.xml")
        with open(scenario, "w") as f:
            f.write(text)
        fields = os.path.join(tempfile.mkdtemp(), "fields.csv")
        with open(fields, "w") as f:
            f.write("SEQUENTIAL\n1001;1002;localhost;\n")
        caller = SippPeer(scenario, self.server.port, extra=["-inf", fields, "-au", "1001", "-ap", PASSWORDS["1001"]])
        self.addCleanup(caller.stop)
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [c for c in seen if c["state"] == "up"]:
            seen = json.loads(self.server.admin("calls", "--json").stdout)
            time.sleep(0.1)
        self.assertEqual([(c["caller"], c["callee"], c["state"]) for c in seen],
                         [("sip:1001@localhost", "sip:1002@localhost", "up")])
        self.assertIn("1001@localhost", self.server.admin("calls").stdout)
        self.assertEqual(caller.wait(), 0)
        self.assertPeerDone(callee)
