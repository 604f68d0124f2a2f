"""Remote reboot against SIPp phones: one check-sync NOTIFY per phone, results, --wait."""

import glob
import json
import os
import tempfile

from tests.integration.harness import free_port, run_sipp, sipp_errors
from tests.integration.test_proxy_sipp import PASSWORDS, CallTestCase


class RebootTests(CallTestCase):
    def setUp(self):
        self.tftp = tempfile.mkdtemp(prefix="tftp-")
        with open(os.path.join(self.tftp, "syncinfo.xml"), "w") as f:
            f.write('<IMAGE VERSION="P0S3-07-5-00" SYNC="4"/>\n')
        # T1 = 0.1 s: a phone that never answers is reported after Timer F, 6.4 s.
        self.config = f'[checksync]\ntftp_root = "{self.tftp}"\nrate = 5\n[timers]\nt1 = 0.1\nt2 = 0.4\n'
        super().setUp()

    def register_75(self, user, port):
        result = run_sipp("register_75.xml", self.server.port, injection=[(user, "localhost", "3600")],
                          local_port=port, extra=["-au", user, "-ap", PASSWORDS[user]])
        self.assertEqual(result.returncode, 0, sipp_errors(result))

    def reboot(self, *args):
        result = self.server.admin("reboot", "--json", *args, check=False)
        return result.returncode, json.loads(result.stdout)

    def test_one_notify_per_phone_and_results(self):
        a, b = free_port(), free_port()
        self.register_75("1001", a)
        self.register_75("1002", a)  # phone A has two lines
        self.register_75("1003", b)
        phone_a = self.peer("phone_checksync.xml", port=a, extra=["-trace_msg"])
        phone_b = self.peer("phone_checksync_481.xml", port=b)
        code, job = self.reboot("1001", "1002", "1003", "4444")
        self.assertPeerDone(phone_a)
        self.assertPeerDone(phone_b)
        states = {p["device"]: (p["state"], p["status"]) for p in job["phones"]}
        self.assertEqual(states, {f"127.0.0.1:{a}": ("accepted", 200), f"127.0.0.1:{b}": ("refused", 481),
                                  "4444": ("not_registered", None)})
        self.assertEqual(code, 1)  # something did not work: the exit status says so
        (log,) = glob.glob(os.path.join(phone_a.workdir, "*_messages.log"))
        with open(log) as f:
            self.assertEqual(f.read().count("NOTIFY sip:"), 1)  # one per phone, not per line
        with open(os.path.join(self.tftp, "syncinfo.xml")) as f:
            text = f.read()
        self.assertIn('<IMAGE VERSION="P0S3-07-5-00" SYNC="5"/>', text)
        # A partial reboot bumps only what the chosen phones read (all run 7.5, which has its entry): the *
        # entry is added but not moved, so phones on other images do not reboot with them.
        self.assertIn('<IMAGE VERSION="*" SYNC="1"/>', text)

    def test_phone_that_does_not_answer(self):
        self.register_75("1001", free_port())  # nothing listens there now
        code, job = self.reboot("1001")
        self.assertEqual([p["state"] for p in job["phones"]], ["no_answer"])

    def test_wait_sees_the_phone_register_again(self):
        port = free_port()
        self.register_75("1003", port)
        phone = self.peer("phone_reboots.xml", port=port, extra=["-inf", self._injection("1003"), "-au", "1003",
                                                                  "-ap", PASSWORDS["1003"]])
        code, job = self.reboot("1003", "--wait", "--timeout", "20")
        self.assertPeerDone(phone)
        (result,) = job["phones"]
        self.assertEqual((code, result["state"], result["outcome"], result["firmware_before"], result["firmware_after"]),
                         (0, "accepted", "rebooted", "7.5", "8.0"))

    def test_phones_listing_and_dry_run(self):
        a = free_port()
        self.register_75("1001", a)
        self.register("1002", a)
        rows = json.loads(self.server.admin("phones", "--json").stdout)
        self.assertEqual([(r["device"], len(r["lines"])) for r in rows], [(f"127.0.0.1:{a}", 2)])
        self.assertEqual(json.loads(self.server.admin("phones", "--json", "--where", "firmware<8.0").stdout), [])
        dry = json.loads(self.server.admin("reboot", "--all", "--dry-run", "--json").stdout)
        self.assertIn("Event: check-sync", dry["phones"][0]["notify"])
        with open(os.path.join(self.tftp, "syncinfo.xml")) as f:
            self.assertIn('SYNC="4"', f.read())  # a dry run changes nothing

    def _injection(self, user):
        path = os.path.join(tempfile.mkdtemp(), "line.csv")
        with open(path, "w") as f:
            f.write(f"SEQUENTIAL\n{user};localhost;\n")
        return path
