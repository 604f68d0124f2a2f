"""SIP-SRST with two twistd instances and SIPp phones: the central proxy (hq, 127.0.0.2) and a branch's backup
(branch, 127.0.0.3, two worker processes: what is copied reaches both), replicating over the signed link.

The seed's flows (001 lines 713-723, 3770-3790): a phone registered with the primary only is known at the
backup within a second; with the primary gone, a call through the backup reaches it (INVITE to the backup,
100, INVITE to B, 180, 200, ACK, BYE); forwarding set at the primary holds at the backup; what the backup
learned goes to the primary when it returns; a wrong secret is refused; a partition longer than the backlog
ends in a resync after which both hold the same bindings.
"""

import os
import re
import shutil
import signal
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import (ServerProcess, SippPeer, eventually, free_port, require, run_sipp,
                                       sipp_errors)
from tests.integration.test_proxy_sipp import PASSWORDS
from tests.integration.test_workers_sipp import call_id_format

HQ, BRANCH = "127.0.0.2", "127.0.0.3"


class SrstTestCase(SynchronousTestCase):
    backlog = 10_000

    def setUp(self):
        require("sipp")
        self.dir = tempfile.mkdtemp(prefix="srst-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.secret = os.path.join(self.dir, "srst-secret")
        with open(self.secret, "w") as f:
            f.write("a-secret-both-sides-were-given-1234567890\n")
        self.link_ports = {HQ: free_port(), BRANCH: free_port()}
        self.hq = self.node("hq", HQ, "primary", f'peers = ["{BRANCH}:{self.link_ports[BRANCH]}"]')
        self.branch = self.node("branch", BRANCH, "backup", f'peer = "{HQ}:{self.link_ports[HQ]}"')
        for user, password in PASSWORDS.items():
            self.hq.admin("user", "add", user, "--password", password)  # at the primary only
        self.hq.start()
        self.branch.start()
        if self.link_up_at_start:
            for node in (self.hq, self.branch):
                self.wait_for(lambda: " up " in node.admin("peers").stdout, f"the link at {node.host}")

    link_up_at_start = True

    def node(self, name, host, role, peers, secret=None) -> ServerProcess:
        node = ServerProcess(f'[proxy]\nadvertise = "{host}"\n[registrar]\nmax_contacts = 200\n'
                             f'[srst]\nrole = "{role}"\n{peers}\nlisten = "tcp:{self.link_ports[host]}:interface={host}"\n'
                             f'secret_file = "{secret or self.secret}"\ninterval = 0.2\nbacklog = {self.backlog}\n',
                             host=host, server_extra=f'node = "{name}"\nworkers = {2 if role == "backup" else 1}\n')
        self.addCleanup(node.stop)
        return node

    def logs(self) -> str:
        return "".join(f"\n--- {n.host} ---\n{n.log()[-3000:]}" for n in (self.hq, self.branch))

    def register(self, node: ServerProcess, user: str, port: int):
        result = run_sipp("register.xml", node.port, injection=[(user, "localhost", "3600")], local_port=port,
                          extra=["-au", user, "-ap", PASSWORDS[user]], server_host=node.host)
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.logs())

    def call(self, node: ServerProcess, callee="1002", caller="1001", extra=()):
        result = run_sipp("caller.xml", node.port, injection=[(caller, callee, "localhost")],
                          extra=["-au", caller, "-ap", PASSWORDS[caller], *extra], timeout=20, server_host=node.host)
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.logs())

    def callee(self, port: int, calls: int = 1) -> SippPeer:
        peer = SippPeer("callee.xml", self.branch.port, port=port, calls=calls)
        self.addCleanup(peer.stop)
        return peer

    def contacts(self, node: ServerProcess) -> set[str]:
        return set(re.findall(r"sip:\S+@127\.0\.0\.1:\d+", node.admin("registrations").stdout))

    def wait_for(self, condition, what: str, timeout: float = 10.0):
        return eventually(condition, what, timeout, self.logs)


class SrstTests(SrstTestCase):
    def test_a_phone_registered_only_with_the_primary_is_called_through_the_backup(self):
        port = free_port()
        started = time.monotonic()
        self.register(self.hq, "1002", port)
        self.wait_for(lambda: f"sip:1002@127.0.0.1:{port}" in self.contacts(self.branch), "the copy at the backup",
                      timeout=1.0 + (time.monotonic() - started))
        self.hq.stop()  # the primary is gone: the phones try the backup (seed 001 lines 3782-3790)
        callee = self.callee(port, calls=2)
        for worker in (0, 1):  # each of the backup's two processes serves one of the calls: both have the copy
            self.call(self.branch, extra=["-cid_str", call_id_format(worker, f"srst{time.monotonic_ns()}")])
        self.assertEqual(callee.wait(), 0, callee.errors() + self.logs())
        peers = self.branch.admin("peers").stdout
        self.assertIn("DOWN", peers)

    def test_forwarding_set_at_the_primary_applies_at_the_backup(self):
        target = free_port()
        self.register(self.hq, "1003", target)
        self.hq.admin("forward", "set", "1002", "--always", "1003")
        self.wait_for(lambda: "1003" in self.branch.admin("forward", "show", "1002").stdout, "the setting copied")
        self.wait_for(lambda: f"sip:1003@127.0.0.1:{target}" in self.contacts(self.branch), "1003's binding")
        callee = self.callee(target)
        self.call(self.branch)  # to 1002, forwarded to 1003
        self.assertEqual(callee.wait(), 0, callee.errors() + self.logs())

    def test_what_the_backup_learned_goes_to_the_primary_when_it_returns(self):
        self.hq.stop()
        port = free_port()
        self.register(self.branch, "1003", port)  # during the outage, at the backup
        self.hq.start()
        self.wait_for(lambda: f"sip:1003@127.0.0.1:{port}" in self.contacts(self.hq), "the primary catching up")
        listed = self.hq.admin("registrations", "1003").stdout
        self.assertIn("1003", listed)
        self.wait_for(lambda: " up " in self.hq.admin("peers").stdout, "the link up again")


class WrongSecretTests(SrstTestCase):
    link_up_at_start = True
    def test_a_backup_with_another_secret_is_refused(self):
        other = os.path.join(self.dir, "other-secret")
        with open(other, "w") as f:
            f.write("not-the-secret-the-primary-has-0987654321\n")
        self.branch.stop()
        intruder = self.node("branch", BRANCH, "backup", f'peer = "{HQ}:{self.link_ports[HQ]}"', secret=other)
        intruder.start()
        self.register(self.hq, "1002", free_port())
        peers = self.wait_for(lambda: "secrets differ" in (out := intruder.admin("peers").stdout) and out,
                              "the refusal shown")
        self.assertIn("DOWN", peers)
        self.assertEqual(self.contacts(intruder), set())
        self.assertIn("SRST request from 127.0.0.", self.hq.log())
        self.assertIn("refused: wrong secret", self.hq.log())


class PartitionTests(SrstTestCase):
    backlog = 100

    def test_a_partition_longer_than_the_backlog_ends_in_a_resync_and_both_agree(self):
        self.register(self.hq, "1002", free_port())
        self.wait_for(lambda: self.contacts(self.branch), "the first copy")
        os.kill(self.branch.process.pid, signal.SIGSTOP)  # the link is cut (the backup stops answering)
        try:
            result = run_sipp("register_lines.xml", self.hq.port, calls=150, timeout=20,
                              injection=[("1001", "localhost", "3600")] * 150, server_host=self.hq.host,
                              extra=["-r", "100", "-au", "1001", "-ap", PASSWORDS["1001"]])
            self.assertEqual(result.returncode, 0, sipp_errors(result))
        finally:
            os.kill(self.branch.process.pid, signal.SIGCONT)
        expected = self.contacts(self.hq)
        self.assertEqual(len(expected), 151)
        self.wait_for(lambda: self.contacts(self.branch) == expected, "the backup agreeing", timeout=15)
        peers = self.branch.admin("peers", "--json").stdout
        self.assertIn('"resyncs": 2', peers)  # the first sync, and the one after the partition
