"""Two processes under twistd (`[server] workers = 2`), with SIPp: the calls of test_proxy_sipp, a phone
registered through one worker called through the other, and a killed worker restarted without loss.

SIPp's Call-IDs are chosen (-cid_str) so that each message's owner is known
(proxy/workers/owner.py: the CRC-32 of the Call-ID).
"""

import os
import re
import signal
import time

from tests.integration.harness import eventually, free_port, run_sipp, sipp_errors
from tests.integration.test_plugin_dropin import DropinTests
from tests.integration.test_proxy_sipp import PASSWORDS, BasicCallTests, CallTestCase
from proxy.workers.owner import call_id_owner

TWO = "workers = 2\n"


def call_id_format(owner: int, tag: str) -> str:
    """A SIPp -cid_str whose first call's Call-ID (%u = 1) belongs to worker `owner` of 2."""
    for n in range(1000):
        if call_id_owner(f"{tag}-{n}-1".encode(), 2) == owner:
            return f"{tag}-{n}-%u"
    raise AssertionError("no Call-ID found")


class TwoWorkerCallTests(BasicCallTests):
    server_extra = TWO


class WorkerTests(CallTestCase):
    server_extra = TWO

    def register_through(self, worker: int, user: str, port: int) -> None:
        result = run_sipp("register.xml", self.server.port, injection=[(user, "localhost", "3600")], local_port=port,
                          extra=["-au", user, "-ap", PASSWORDS[user], "-cid_str", call_id_format(worker, "reg")])
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.server.log()[-3000:])

    def call_through(self, worker: int) -> None:
        self.call(extra=["-cid_str", call_id_format(worker, f"call{time.monotonic_ns()}")])

    def worker_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"Worker 1 ready \(pid (\d+)\)", self.server.log())]

    def wait_for(self, condition, what: str, timeout: float = 15.0):
        return eventually(condition, what, timeout, lambda: "\n" + self.server.log()[-3000:])

    def test_a_phone_registered_through_one_worker_is_called_through_the_other(self):
        for registered, called in ((0, 1), (1, 0)):
            port = free_port()
            self.register_through(registered, "1002", port)
            callee = self.peer("callee.xml", port=port)
            self.call_through(called)
            self.assertPeerDone(callee)
        self.assertIn("[worker 1: ", self.server.log())  # the worker logs into the primary's log

    def test_a_killed_worker_is_restarted_and_loses_no_registration(self):
        first = self.wait_for(self.worker_pids, "worker 1 ready")[0]
        port = free_port()
        self.register_through(1, "1002", port)
        os.kill(first, signal.SIGKILL)
        self.wait_for(lambda: len(self.worker_pids()) == 2, "the restart of worker 1")
        self.assertIn("Worker 1 ended (signal 9); restarting it", self.server.log())
        listed = self.server.admin("registrations", "1002").stdout
        self.assertIn(f"127.0.0.1:{port}", listed)
        callee = self.peer("callee.xml", port=port)
        self.call_through(1)  # served by the new worker 1, from the bindings it loaded
        self.assertPeerDone(callee)

    def test_stopping_the_server_stops_its_workers(self):
        pid = self.wait_for(self.worker_pids, "worker 1 ready")[0]
        self.server.stop()
        self.wait_for(lambda: not _alive(pid), "the worker's exit", timeout=10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except OSError:
        return False


class TwoWorkerDropinTests(DropinTests):
    """The third-party plugin on two processes: its events come from both, its policy runs in both."""

    server_extra = TWO

    def test_policy_blocks_a_number_at_every_worker(self):
        for worker in (0, 1):
            self.call("caller_403.xml", callee="9005551234", extra=["-cid_str", call_id_format(worker, f"p{worker}")])
