"""The policy plugin in the real server: SIPp calls in and out of class, the administrator's commands, and the
real SIPVicious tools (svmap, svwar, svcrack) and a UDP flood against it on loopback.

The attacker is 127.0.0.1 (where sipvicious sends from); the legitimate phone is SIPp on 127.0.0.2.
"""

import http.server
import json
import os
import socket
import subprocess
import threading
import time

from tests.integration.harness import ServerProcess, eventually, free_port, require, run_sipp, sipp_errors
from tests.integration.test_metrics_sipp import scrape, value
from tests.integration.test_proxy_sipp import PASSWORDS, CallTestCase
from twisted.trial.unittest import SynchronousTestCase

POLICY = """
[plugins.policy.classes]
local = "9[2-9][0-9]{6}"
international = "9011[0-9]+"
[plugins.policy.allow]
"*" = ["internal", "local"]
"1001" = ["internal", "local", "international"]
[plugins.policy.reasons]
international = "International calls not allowed"
[plugins.policy.limits]
costly = ["international"]
"""


class PolicyCallTests(CallTestCase):
    def setUp(self):
        self.gateway = free_port()
        self.config = (f'[[routes]]\nname = "pstn"\npattern = "9[0-9]+"\nstrip = 1\ngateways = ["127.0.0.1:{self.gateway}"]\n'
                       '[plugins]\nenabled = ["policy", "metrics"]\n' + POLICY)
        super().setUp()

    def scrape(self):
        with open(os.path.join(self.server.state_dir, "metrics-token")) as f:
            return scrape(f"http://127.0.0.1:{self.server.admin_port}/metrics", f.read().strip())

    def test_calls_in_and_out_of_class(self):
        gateway = self.peer("callee.xml", port=self.gateway)
        self.call(caller="1001", callee="90114420123456")  # 1001 may call abroad
        self.assertPeerDone(gateway)
        self.call("caller_403.xml", caller="1002", callee="90114420123456")  # 1002 may not
        self.assertIn("403 International calls not allowed", self.server.log())
        samples = self.scrape()
        self.assertEqual(value(samples, "sipproxy_policy_actions_total", rule="classes", action="blocked"), 1)
        self.assertEqual(value(samples, "sipproxy_policy_actions_total", rule="flood", action="banned"), 0)

    def test_user_set_classes_takes_effect_without_a_restart(self):
        self.server.admin("user", "set", "1002", "--classes", "internal,international")
        time.sleep(1.2)  # the server looks at the users file once a second
        gateway = self.peer("callee.xml", port=self.gateway)
        self.call(caller="1002", callee="90114420123456")
        self.assertPeerDone(gateway)
        bad = self.server.admin("user", "set", "1002", "--classes", "gold", check=False)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("no dial class gold", bad.stderr)

    def test_ban_commands_and_bans_survive_a_restart(self):
        self.server.admin("ban", "add", "127.0.0.3", "--minutes", "5", "--reason", "test")
        listing = self.server.admin("ban", "list", "--json").stdout
        self.assertEqual([(b["address"], b["rule"], b["reason"]) for b in json.loads(listing)],
                         [("127.0.0.3", "admin", "test")])
        self.assertIsNone(options_from("127.0.0.3", self.server.port))  # banned: not a byte back
        self.assertIsNotNone(options_from("127.0.0.2", self.server.port))
        time.sleep(1.5)  # written to policy.sqlite within a second
        self.server.stop()
        self.server.start()
        self.assertIn("127.0.0.3", self.server.admin("ban", "list").stdout)
        self.assertIsNone(options_from("127.0.0.3", self.server.port))
        self.assertIn("lifted the ban of 127.0.0.3", self.server.admin("ban", "remove", "127.0.0.3").stdout)
        self.assertIsNotNone(options_from("127.0.0.3", self.server.port))
        refused = self.server.admin("ban", "add", "not-an-address", check=False)
        self.assertIn("is not an IP address", refused.stderr)


def options_from(host: str, port: int, user_agent: str = "Cisco-CP7960G/8.0", timeout: float = 0.5) -> bytes | None:
    """One OPTIONS from `host` (any 127/8 address is ours); the answer, or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        s.settimeout(timeout)
        local = s.getsockname()[1]
        s.sendto((f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {host}:{local};branch=z9hG4bK{time.monotonic_ns()}\r\n"
                  f"Max-Forwards: 70\r\nFrom: <sip:probe@{host}>;tag=p\r\nTo: <sip:127.0.0.1>\r\nCall-ID: o{time.monotonic_ns()}\r\n"
                  f"CSeq: 1 OPTIONS\r\nUser-Agent: {user_agent}\r\nContent-Length: 0\r\n\r\n").encode(), ("127.0.0.1", port))
        try:
            return s.recv(65535)
        except OSError:
            return None


class _Inbox:
    """A webhook (HTTP) and a mail server (just enough SMTP) on loopback, remembering what they got."""

    def __init__(self, test):
        self.posts, self.mails = [], []
        inbox = self

        class Hook(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                inbox.posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        test.addCleanup(self.http.shutdown)
        self.smtp = socket.socket()
        self.smtp.bind(("127.0.0.1", 0))
        self.smtp.listen(5)
        threading.Thread(target=self._smtp, daemon=True).start()
        test.addCleanup(self.smtp.close)
        self.webhook = f"http://127.0.0.1:{self.http.server_address[1]}/hook"
        self.smtp_port = self.smtp.getsockname()[1]

    def _smtp(self):
        while True:
            try:
                conn, _ = self.smtp.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as lines:
                conn.sendall(b"220 test ESMTP\r\n")
                data = None
                for line in lines:
                    if data is not None:
                        if line in (b".\r\n", b".\n"):
                            self.mails.append(b"".join(data).decode(errors="replace"))
                            data = None
                            conn.sendall(b"250 queued\r\n")
                        else:
                            data.append(line)
                        continue
                    verb = line[:4].upper()
                    if verb == b"DATA":
                        data = []
                        conn.sendall(b"354 go on\r\n")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        break
                    else:
                        conn.sendall(b"250 ok\r\n")


class ScannerTests(SynchronousTestCase):
    """The tools attackers point at SIP servers, as they come from PyPI (sipvicious)."""

    flood = ""

    def start(self, flood: str, alerts: str = "", server_extra: str = ""):
        self.server = ServerProcess('[plugins]\nenabled = ["policy"]\n[plugins.policy.flood]\n' + flood + "\n" + alerts,
                                    server_extra=server_extra)
        for user, password in PASSWORDS.items():
            self.server.admin("user", "add", user, "--password", password)
        self.server.admin("user", "add", "1005", "--password", "letmein")
        self.server.start()
        self.addCleanup(self.server.stop)

    def tool(self, name: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        program = require(f"sipvicious_{name}")
        return subprocess.run([program, *args, "-p", str(self.server.port), "127.0.0.1"], capture_output=True,
                              text=True, timeout=timeout)

    def bans(self) -> list[dict]:
        return json.loads(self.server.admin("ban", "list", "--json").stdout)

    def phone_registers(self):
        port = free_port()
        result = run_sipp("register.xml", self.server.port, injection=[("1001", "localhost", "3600")],
                          local_port=port, local_ip="127.0.0.2", extra=["-au", "1001", "-ap", PASSWORDS["1001"]])
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-2000:])

    def test_svmap_is_banned_by_its_user_agent_and_the_administrator_hears_of_it(self):
        inbox = _Inbox(self)
        self.start("", alerts=(f'[plugins.policy.alerts]\nwebhook = "{inbox.webhook}"\nmail_to = ["ops@example.com"]\n'
                               f'mail_from = "sipproxy@example.com"\nsmtp_host = "127.0.0.1"\nsmtp_port = {inbox.smtp_port}\n'
                               "interval = 1\n"))
        result = self.tool("svmap")
        self.assertIn("found nothing", result.stdout + result.stderr)  # (unbanned, it lists the server's address)
        (ban,) = self.bans()
        self.assertEqual((ban["address"], ban["rule"]), ("127.0.0.1", "user_agents"))
        self.assertIn("friendly-scanner", ban["reason"])
        self.phone_registers()
        posted = eventually(lambda: inbox.posts, "the webhook's POST")
        self.assertEqual([(a["rule"], a["action"], a["address"]) for a in posted[0]["alerts"]],
                         [("user_agents", "banned", "127.0.0.1")])
        mail = eventually(lambda: inbox.mails, "the alert mail")
        self.assertIn("user_agents: scanner User-Agent", mail[0])
        self.assertIn("Subject: sipproxy", mail[0])

    def test_svwar_cannot_tell_existing_from_missing_extensions(self):
        self.start("user_agents = []\nmax_requests = 0")
        for method in ("REGISTER", "INVITE", "OPTIONS"):
            result = self.tool("svwar", "--force", "-m", method, "-e", "1000-1010")
            self.assertIn("found nothing", result.stdout + result.stderr, result.stdout + result.stderr)

    def test_svcrack_is_banned_before_it_finds_the_password(self):
        self.start("user_agents = []\nauth_failures = 5")
        words = os.path.join(self.server.dir, "words.txt")
        with open(words, "w") as f:  # the right one is the eighth
            f.write("1234\nfoo\nbar\nbaz\nqux\nquux\nfred\nletmein\nwaldo\n")
        program = require("sipvicious_svcrack")
        cracking = subprocess.Popen([program, "-u", "1005", "-d", words, "-p", str(self.server.port), "127.0.0.1"],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: cracking.poll() is None and cracking.kill())
        self.assertTrue(eventually(self.bans, "a ban", context=lambda: self.server.log()[-3000:]))
        self.assertIsNone(cracking.poll())  # still at it, unanswered
        self.phone_registers()  # the real phone, from another address, meanwhile
        output = cracking.communicate(timeout=60)[0]
        self.assertNotIn("letmein", output)
        self.assertIn("found nothing", output)
        self.assertEqual([(b["address"], b["rule"]) for b in self.bans()], [("127.0.0.1", "auth")])

    def test_a_flood_from_one_source_is_cut_off(self):
        self.start("max_requests = 100\nwindow = 2", server_extra="workers = 1\n")
        pid = self.server.process.pid
        cpu_before, started, began = _cpu_seconds(pid), time.monotonic(), time.time()
        sent = []
        flood = threading.Thread(target=lambda: sent.append(_flood("127.0.0.4", self.server.port, seconds=4.0)))
        flood.start()
        time.sleep(0.5)
        self.phone_registers()  # from another address, while the flood goes on
        flood.join()
        wall, cpu, sent = time.monotonic() - started, _cpu_seconds(pid) - cpu_before, sent[0]
        (ban,) = self.bans()
        self.assertEqual((ban["address"], ban["rule"]), ("127.0.0.4", "flood"))
        # Not a timing benchmark: a bound on how much of a core the banned flood cost, with a wide margin.
        self.assertLess(cpu / wall, 0.5, f"{sent} datagrams in {wall:.1f} s took {cpu:.2f} s of CPU")
        print(f"\nflood: {sent} datagrams in {wall:.1f} s, banned after {ban['created'] - began:.3f} s, "
              f"server CPU {cpu:.2f} s ({cpu / sent * 1e6:.1f} us per datagram)")


def _flood(host: str, port: int, seconds: float) -> int:
    """OPTIONS as fast as one Python loop sends them (bounded: loopback, a few seconds)."""
    message = (f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\nVia: SIP/2.0/UDP {host}:5099;branch=z9hG4bKflood\r\n"
               "Max-Forwards: 70\r\nFrom: <sip:f@x>;tag=f\r\nTo: <sip:127.0.0.1>\r\nCall-ID: flood\r\n"
               "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(100):
                s.sendto(message, ("127.0.0.1", port))
            sent += 100
            time.sleep(0.001)
    return sent


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

