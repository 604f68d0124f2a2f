"""Two sipproxy nodes (127.0.0.2 and 127.0.0.3, each under twistd) sharing a real Redis, with SIPp phones.

What a site with several nodes relies on (docs/scaling.md): a phone registered
through one node is called through the other; a forwarding setting made on one
applies on the other; a node killed during registrations loses none that were
answered 200; Redis down means 503 for REGISTERs, calls to known phones still
connect, and everything comes back by itself; with Sentinel, a killed primary
is replaced and no binding answered 200 is lost.
"""

import csv
import os
import shutil
import tempfile
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.harness import (ServerProcess, SippPeer, eventually, free_port, require, run_sipp,
                                       sipp_errors)
from tests.integration.redis import RedisServer, Sentinels
from tests.integration.test_proxy_sipp import PASSWORDS

NODES = (("a", "127.0.0.2"), ("b", "127.0.0.3"))
LINES = 150  # registrations in the runs that count what was lost


def successful(result) -> int:
    """SIPp's count of successful calls (here: registrations answered 200), from its -trace_stat file."""
    for name in os.listdir(result.workdir):
        if name.endswith("_.csv"):  # (not the injection file)
            with open(os.path.join(result.workdir, name)) as f:
                rows = list(csv.reader(f, delimiter=";"))
            column = rows[0].index("SuccessfulCall(C)")
            return int(rows[-1][column])
    raise AssertionError("no SIPp statistics file:\n" + sipp_errors(result))


class NodesTestCase(SynchronousTestCase):
    location = ""  # the [location] table; set by setUp from the Redis it starts
    wait_replicas = 0

    def start_redis(self):
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        return f'backend = "redis"\nurls = ["{self.redis.url}"]\n'

    def setUp(self):
        require("sipp")
        location = self.start_redis()
        self.shared = tempfile.mkdtemp(prefix="sipproxy-shared-")
        self.addCleanup(shutil.rmtree, self.shared, True)
        self.nodes = {}
        for name, host in NODES:
            # Node b runs two worker processes: each has its own connections to Redis.
            workers = 2 if name == "b" else 1
            node = ServerProcess(f"[location]\n{location}wait_replicas = {self.wait_replicas}\n"
                                 f"[registrar]\nmax_contacts = {LINES + 10}\n"
                                 f'[proxy]\nadvertise = "{host}"\n', host=host,
                                 server_extra=f'node = "{name}"\nshared_dir = "{self.shared}"\nworkers = {workers}\n')
            self.nodes[name] = node
            self.addCleanup(node.stop)
        a = self.nodes["a"]
        for user, password in PASSWORDS.items():
            a.admin("user", "add", user, "--password", password)
        for node in self.nodes.values():
            node.start()

    def logs(self) -> str:
        return "".join(f"\n--- node {name} ---\n{node.log()[-3000:]}" for name, node in self.nodes.items())

    def register(self, node: str, user: str, port: int, expect_ok: bool = True):
        server = self.nodes[node]
        result = run_sipp("register.xml", server.port, injection=[(user, "localhost", "3600")], local_port=port,
                          extra=["-au", user, "-ap", PASSWORDS[user]], server_host=server.host)
        if expect_ok:
            self.assertEqual(result.returncode, 0, sipp_errors(result) + self.logs())
        return result

    def call(self, node: str, callee: str = "1002", caller: str = "1001"):
        server = self.nodes[node]
        result = run_sipp("caller.xml", server.port, injection=[(caller, callee, "localhost")],
                          extra=["-au", caller, "-ap", PASSWORDS[caller]], timeout=20, server_host=server.host)
        self.assertEqual(result.returncode, 0, sipp_errors(result) + self.logs())

    def callee(self, port: int) -> SippPeer:
        peer = SippPeer("callee.xml", self.nodes["a"].port, port=port)
        self.addCleanup(peer.stop)
        return peer

    def assertPeerDone(self, peer: SippPeer):
        self.assertEqual(peer.wait(), 0, peer.errors() + self.logs())

    def registrations(self, node: str) -> str:
        return self.nodes[node].admin("registrations").stdout

    def wait_for(self, condition, what: str, timeout: float = 10.0):
        return eventually(condition, what, timeout, self.logs)

    def register_lines(self, node: str, rate: int = 100, timeout: float = 30.0, count: int = LINES):
        """`count` registrations of 1001, each with its own contact (sip:1001-N@127.0.0.1:port)."""
        server = self.nodes[node]
        return run_sipp("register_lines.xml", server.port, calls=count, timeout=timeout,
                        injection=[("1001", "localhost", "3600")] * count,
                        extra=["-r", str(rate), "-l", "200", "-au", "1001", "-ap", PASSWORDS["1001"]],
                        server_host=server.host)

    def keys_in(self, redis: RedisServer) -> set[str]:
        """The contacts of the stored bindings of 1001's registration runs."""
        out = redis.command("--scan", "--pattern", "sipproxy:b:*").decode().split("\n")
        return {key.split(" ", 1)[1] for key in out if " sip:1001-" in key}



class TwoNodeTests(NodesTestCase):
    def test_registered_through_one_node_called_through_the_other(self):
        port = free_port()
        self.register("a", "1002", port)
        listed = self.wait_for(lambda: "1002" in (out := self.registrations("b")) and out, "the binding at node b",
                               timeout=1.0)
        self.assertIn(f"127.0.0.1:{port}", listed)
        self.assertIn(" a ", listed.replace("\t", " "))  # which node took it
        callee = self.callee(port)
        self.call("b")
        self.assertPeerDone(callee)

    def test_forwarding_set_on_one_node_applies_on_the_other(self):
        target_port = free_port()
        self.register("b", "1003", target_port)
        self.nodes["a"].admin("forward", "set", "1002", "--always", "1003")
        self.wait_for(lambda: "1003" in self.nodes["b"].admin("forward", "show", "1002").stdout,
                      "the setting at node b", timeout=2.0)
        target = self.callee(target_port)
        self.call("b", callee="1002")  # 1002 never registered: its calls go to 1003
        self.assertPeerDone(target)

    def test_a_phone_that_fails_over_with_its_nonce_is_challenged_afresh(self):
        # The phone's second REGISTER (with the first node's nonce) goes to the other node: a fresh 401, then 200.
        port = free_port()
        self.register("a", "1002", port)
        self.register("b", "1002", port)
        self.assertNotIn("Traceback", self.logs())

    def test_a_killed_node_loses_no_registration_it_answered(self):
        a = self.nodes["a"]
        killer = threading.Timer(0.8, a.kill)
        killer.start()
        self.addCleanup(killer.cancel)
        result = self.register_lines("a", rate=100, timeout=8)
        answered = successful(result)
        self.assertGreater(answered, 20, sipp_errors(result))
        self.assertLess(answered, LINES, "the node was not killed during the run")
        stored = self.keys_in(self.redis)
        # Every 200 is in Redis (the 200 waits for it); a binding Redis took as the node died may be there
        # without its 200 having left: at most a few more than answered.
        self.assertGreaterEqual(len(stored), answered)
        self.assertLessEqual(len(stored), answered + 5)
        listed = self.wait_for(lambda: (out := self.registrations("b")).count("sip:1001-") >= answered and out,
                               "node b listing them")
        self.assertGreaterEqual(listed.count("sip:1001-"), answered)
        # Restarted, node a reads them all back from Redis.
        a.start()
        self.wait_for(lambda: self.registrations("a").count("sip:1001-") == len(stored), "node a reloading")


class RedisDownTests(NodesTestCase):
    def start_redis(self):
        self.redis = RedisServer(persist=True).start()
        self.addCleanup(self.redis.cleanup)
        return f'backend = "redis"\nurls = ["{self.redis.url}"]\n'

    def test_redis_down_means_503_calls_still_connect_then_it_comes_back(self):
        port = free_port()
        self.register("a", "1002", port)
        self.wait_for(lambda: "1002" in self.registrations("b"), "the binding at node b")
        self.redis.stop()
        time.sleep(0.5)
        result = self.register("a", "1003", free_port(), expect_ok=False)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("503 Location store unavailable", sipp_errors(result) + self.trace(result))
        callee = self.callee(port)
        self.call("b")  # node b still knows 1002 from its copy
        self.assertPeerDone(callee)
        self.redis.start()
        self.wait_for(lambda: self.nodes["a"].log().count("Redis: connected to") >= 2, "node a reconnecting")
        self.register("a", "1003", free_port())
        self.wait_for(lambda: "1003" in self.registrations("b"), "the new binding at node b")
        for node in self.nodes.values():
            self.assertEqual(node.log().count("Redis unavailable"), 1, node.log()[-3000:])  # logged once
        self.assertIn("1002", self.registrations("b"))

    def trace(self, result) -> str:
        out = []
        for name in os.listdir(result.workdir):
            if name.endswith(("_messages.log", "_errors.log")):
                with open(os.path.join(result.workdir, name), errors="replace") as f:
                    out.append(f.read())
        return "\n".join(out)


class SentinelTests(NodesTestCase):
    wait_replicas = 1

    def start_redis(self):
        require("redis-sentinel")
        self.redis = RedisServer().start()
        self.addCleanup(self.redis.cleanup)
        self.replica = RedisServer(replica_of=self.redis).start()
        self.addCleanup(self.replica.cleanup)
        self.replica.wait_synced()
        self.sentinels = Sentinels(self.redis).start()
        self.addCleanup(self.sentinels.cleanup)
        time.sleep(1.5)  # the sentinels find the replica and each other
        listed = ", ".join(f'"{a}"' for a in self.sentinels.addresses)
        return f'backend = "redis"\nsentinels = [{listed}]\nservice = "sipproxy"\n'

    def test_the_primary_killed_during_registrations_loses_none_answered(self):
        killer = threading.Timer(1.0, self.redis.kill)
        killer.start()
        self.addCleanup(killer.cancel)
        result = self.register_lines("a", rate=50, timeout=25)
        answered = successful(result)
        self.assertGreater(answered, 20, sipp_errors(result))
        self.wait_for(lambda: self.sentinels.primary_port() == self.replica.port, "the failover", timeout=20)
        stored = self.keys_in(self.replica)
        self.assertGreaterEqual(len(stored), answered, "a binding answered 200 is missing after the failover")
        # The nodes follow the new primary: a new registration is stored there.
        self.wait_for(lambda: "connected to 127.0.0.1:%d" % self.replica.port in self.nodes["a"].log(),
                      "node a following the new primary", timeout=20)
        port = free_port()
        self.register("a", "1002", port)
        self.assertIn(b"sip:1002@", self.replica.command("--scan", "--pattern", "sipproxy:b:sip:1002@*"))
