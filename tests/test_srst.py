"""SIP-SRST replication (proxy/srst/): the change log, the conflict rule, the replicator between two cores
built as the server builds them (SQLite files on disk, time on a Clock), and the signed HTTP link on loopback."""

import json
import os

from twisted.internet import defer, reactor, task
from twisted.internet import endpoints
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server

from proxy.config import SrstConfig, parse_config
from proxy.errors import ConfigError
from proxy.registration.credentials import UserRecord, compute_ha1, locked_users, read_users
from proxy.registration.location import Binding
from proxy.srst.changelog import ChangeLog, TooFarBehind, fresher, removal_applies
from proxy.srst.link import PeerLink, SrstResource
from proxy.srst.replicator import Replicator
from proxy.testing import make_core
from tests.test_registrar import REALM, Phone


def binding(contact="sip:1001@192.0.2.50:5060", call_id="c1", cseq=1, expires_at=2_000_000_000.0, node="hq"):
    return Binding(aor=f"sip:1001@{REALM}", contact=contact, expires_at=expires_at, call_id=call_id, cseq=cseq,
                   source_host="192.0.2.50", source_port=5060, registered_at=1_700_000_000.0, node=node)


class ChangeLogTests(SynchronousTestCase):
    def test_changes_after_a_number_and_a_resync_past_the_backlog_or_after_a_restart(self):
        log = ChangeLog(backlog=100)
        for n in range(150):
            log.append({"n": n})
        seq, changes = log.since(log.generation, 120)
        self.assertEqual((seq, [c["n"] for c in changes]), (150, list(range(120, 150))))
        self.assertEqual(log.since(log.generation, 150), (150, []))
        self.assertEqual(len(log), 100)  # bounded, whatever the peers do
        self.assertRaises(TooFarBehind, log.since, log.generation, 40)  # change 41 is gone
        self.assertRaises(TooFarBehind, log.since, "another start", 149)
        self.assertRaises(TooFarBehind, log.since, log.generation, 151)
        seq, changes = log.since(log.generation, 50, limit=10)
        self.assertEqual((seq, changes[0]["n"]), (60, 50))

    def test_one_call_id_by_cseq_two_by_the_later_expiry(self):
        old = binding(cseq=2, expires_at=100)
        self.assertTrue(fresher(binding(cseq=3, expires_at=90), old))
        self.assertFalse(fresher(binding(cseq=2, expires_at=100), old))  # the same: nothing to do
        self.assertTrue(fresher(binding(call_id="c2", cseq=1, expires_at=101), old))
        self.assertFalse(fresher(binding(call_id="c2", cseq=9, expires_at=99), old))
        self.assertTrue(fresher(old, None))
        self.assertTrue(removal_applies(binding(cseq=2), old))
        self.assertFalse(removal_applies(binding(cseq=1), old))  # the removed one was older than ours
        self.assertFalse(removal_applies(binding(call_id="c2", expires_at=99), old))  # ours registered later
        self.assertFalse(removal_applies(old, None))


class ConfigTests(SynchronousTestCase):
    def test_the_srst_table(self):
        config = parse_config({"srst": {"role": "backup", "peer": "127.0.0.2:5070",
                                        "listen": "tcp:5070:interface=127.0.0.3"}})
        self.assertEqual(config.srst.peers, ("127.0.0.2:5070",))
        config = parse_config({"srst": {"role": "backup", "peer": "localhost", "listen": "tcp:5070:interface=127.0.0.1"}})
        self.assertEqual(config.srst.peers, ("localhost:5070",))  # the link's default port
        self.assertEqual(parse_config({}).srst, SrstConfig())
        for table, key in (({"role": "spare"}, "srst.role"), ({"role": "primary"}, "srst.role"),
                           ({"role": "backup", "peers": ["a:1", "b:2"], "listen": "tcp:1:interface=127.0.0.1"},
                            "srst.peers"),
                           ({"role": "backup", "peer": "hq:5070"}, "srst.listen"),
                           ({"role": "backup", "peer": "hq.example.com:5070", "listen": "ssl:5070:privateKey=k"},
                            "srst.tls"),
                           ({"peer": ":5070"}, "srst.peer"), ({"backlog": 5}, "srst.backlog")):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"srst": table}, "branch.toml")
            self.assertIn(f"branch.toml: {key}:", str(caught.exception))


class StartupChecksTests(SynchronousTestCase):
    def test_a_tls_link_whose_key_cannot_be_read_stops_startup_naming_the_key(self):
        from proxy.service import check_tls

        config = parse_config({"srst": {"role": "backup", "peer": "hq.example.com", "tls": True,
                                        "listen": "ssl:5070:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem"}},
                              "branch.toml")
        with self.assertRaises(ConfigError) as caught:
            check_tls(config)
        self.assertIn("branch.toml: srst.listen:", str(caught.exception))
        self.assertIn("cannot load the key or certificate", str(caught.exception))


class Node:
    """A core as the server builds it, with a replicator, as one side of the link."""

    def __init__(self, test, name: str, role: str, clock):
        self.dir = os.path.abspath(test.mktemp())
        os.makedirs(self.dir)
        self.users_path = os.path.join(self.dir, "users.json")
        with locked_users(self.users_path) as users:
            users["1001"] = UserRecord("1001", REALM, compute_ha1("1001", REALM, "secret"))
        self.core, self.transports, _ = make_core(self.dir, clock, domains=(REALM,), addresses=("192.0.2.1",),
                                                  server_settings={"node": name})
        self.log = ChangeLog(backlog=1000)
        self.replicator = Replicator(clock, self.core.location, self.core.forwarding_store, self.users_path, self.log,
                                     node=name, role=role)
        self.position = (self.log.generation, 0)

    def changes_for_peer(self) -> list[dict]:
        generation, seq = self.position
        seq, changes = self.log.since(generation, seq)
        self.position = (generation, seq)
        return changes

    def register(self, user="1001", host="192.0.2.50", **kwargs):
        harness = type("H", (), {"server": self.core.server, "transports": self.transports})()
        return Phone(harness, host=host).register(user, **kwargs)


class ReplicatorTests(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.hq = Node(self, "hq", "primary", self.clock)
        self.branch = Node(self, "branch", "backup", self.clock)

    def send(self, source: Node, target: Node) -> None:
        for change in source.changes_for_peer():
            target.replicator.apply(change)

    def test_a_registration_at_the_primary_reaches_the_backup_and_not_back(self):
        self.assertEqual(self.hq.register().status, 200)
        self.send(self.hq, self.branch)
        (copy,) = self.branch.core.location.lookup(f"sip:1001@{REALM}")
        self.assertEqual((copy.node, copy.source_host), ("hq", "192.0.2.50"))
        self.assertEqual(self.branch.changes_for_peer(), [])  # what came from hq is not sent back to it
        self.branch.core.location.stop()
        reopened = make_core(self.branch.dir, self.clock, domains=(REALM,), server_settings={"node": "branch"})[0]
        self.assertEqual(len(reopened.location.lookup(f"sip:1001@{REALM}")), 1)  # on disk at the backup too

    def test_the_phones_own_registration_at_the_backup_wins_over_an_older_copy_and_goes_back(self):
        self.hq.register()
        self.send(self.hq, self.branch)
        self.clock.advance(60)
        self.assertEqual(self.branch.register(call_id="backup-reg@192.0.2.50").status, 200)  # proxy_backup
        self.send(self.hq, self.branch)
        (mine,) = self.branch.core.location.lookup(f"sip:1001@{REALM}")
        self.assertEqual(mine.node, "branch")
        self.send(self.branch, self.hq)
        (theirs,) = self.hq.core.location.lookup(f"sip:1001@{REALM}")
        self.assertEqual((theirs.node, theirs.call_id), ("branch", "backup-reg@192.0.2.50"))  # both agree

    def test_an_unregistration_is_copied_but_does_not_remove_a_later_registration(self):
        phone = self.hq.register()
        self.send(self.hq, self.branch)
        self.hq.core.location.remove_all(f"sip:1001@{REALM}")
        self.send(self.hq, self.branch)
        self.assertEqual(self.branch.core.location.lookup(f"sip:1001@{REALM}"), [])
        self.assertEqual(phone.status, 200)

    def test_forwarding_and_users_go_to_the_backup_and_forwarding_comes_back(self):
        self.hq.core.forwarding_store.update("1001", always="1003")
        with locked_users(self.hq.users_path) as users:
            users["1002"] = UserRecord("1002", REALM, compute_ha1("1002", REALM, "pw"))
        self.hq.replicator.poll()
        self.send(self.hq, self.branch)
        self.assertEqual(self.branch.core.forwarding_store.get("1001").always, "1003")
        self.assertEqual(sorted(read_users(self.branch.users_path)), ["1001", "1002"])
        self.branch.replicator.poll()
        self.assertEqual(self.branch.changes_for_peer(), [])  # applied, not echoed
        self.branch.core.forwarding_store.update("1002", busy="1001")  # a feature code during an outage
        self.branch.replicator.poll()
        self.send(self.branch, self.hq)
        self.assertEqual(self.hq.core.forwarding_store.get("1002").busy, "1001")

    def test_a_snapshot_after_a_partition_makes_the_two_agree(self):
        self.hq.register()
        self.hq.register("1001", host="192.0.2.51")
        self.send(self.hq, self.branch)
        self.hq.core.location.remove(f"sip:1001@{REALM}", "sip:1001@192.0.2.51:5060")  # during the partition
        self.hq.core.forwarding_store.update("1001", no_answer="1003")
        self.branch.register("1001", host="192.0.2.60")  # a phone of the branch only
        self.branch.replicator.apply_snapshot(json.loads(json.dumps(self.hq.replicator.snapshot())))
        contacts = sorted(b.contact for b in self.branch.core.location.all_bindings())
        self.assertEqual(contacts, ["sip:1001@192.0.2.50:5060", "sip:1001@192.0.2.60:5060"])
        self.assertEqual(self.branch.core.forwarding_store.get("1001").no_answer, "1003")
        self.hq.replicator.apply_snapshot(json.loads(json.dumps(self.branch.replicator.snapshot())))
        self.assertEqual(sorted(b.contact for b in self.hq.core.location.all_bindings()), contacts)


class LinkTests(TestCase):
    """The signed link over real HTTP on loopback."""

    timeout = 20

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.hq = Node(self, "hq", "primary", self.clock)
        self.branch = Node(self, "branch", "backup", self.clock)
        self.secret = b"k" * 32
        self.served = SrstResource(reactor, self.hq.replicator, self.secret)
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        d = endpoint.listen(server.Site(self.served))
        d.addCallback(self._listening)
        return d

    def _listening(self, port):
        self.addCleanup(port.stopListening)
        self.peer = f"127.0.0.1:{port.getHost().port}"

    def link(self, secret=None):
        link = PeerLink(reactor, self.peer, replicator=self.branch.replicator, secret=secret or self.secret,
                        node="branch", interval=0.05)
        link.start()
        self.addCleanup(link.stop)
        return link

    @defer.inlineCallbacks
    def until(self, condition, what: str):
        for _ in range(400):
            if condition():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{what} did not happen")

    @defer.inlineCallbacks
    def test_snapshot_then_changes_then_a_resync_past_the_backlog(self):
        self.hq.register()
        link = self.link()
        yield self.until(lambda: link.state == "up" and link.resyncs == 1, "the first snapshot")
        self.assertEqual(len(self.branch.core.location.all_bindings()), 1)
        self.hq.register("1001", host="192.0.2.51")
        yield self.until(lambda: len(self.branch.core.location.all_bindings()) == 2, "the change pulled")
        self.assertEqual(link.resyncs, 1)
        status = link.status()
        self.assertEqual((status["node"], status["state"], status["behind"], status["last_error"]), ("hq", "up", 0, ""))
        link.stop()
        self.hq.log.backlog = 3
        self.hq.log._entries = type(self.hq.log._entries)(self.hq.log._entries, maxlen=3)
        for n in range(5):  # a partition longer than the backlog
            self.hq.register("1001", host=f"192.0.2.{70 + n}")
        link.start()
        yield self.until(lambda: link.resyncs == 2, "a resync")
        self.assertEqual(sorted(b.contact for b in self.branch.core.location.all_bindings()),
                         sorted(b.contact for b in self.hq.core.location.all_bindings()))

    @defer.inlineCallbacks
    def test_over_tls_checked_against_the_ca(self):
        from twisted.internet import ssl

        from tests.integration.certs import make_self_signed

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = make_self_signed(directory, "localhost")
        with open(cert, "rb") as f:
            certificate = f.read()
        with open(key, "rb") as f:
            options = ssl.PrivateCertificate.loadPEM(certificate + f.read()).options()
        port = yield endpoints.SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(
            server.Site(self.served))
        self.addCleanup(port.stopListening)
        self.hq.register()
        trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(certificate)])
        link = PeerLink(reactor, f"localhost:{port.getHost().port}", replicator=self.branch.replicator,
                        secret=self.secret, node="branch", tls=True, trust_root=trust, interval=0.05)
        link.start()
        self.addCleanup(link.stop)
        yield self.until(lambda: link.state == "up", "the sync over TLS")
        self.assertEqual(len(self.branch.core.location.all_bindings()), 1)
        other_directory = os.path.abspath(self.mktemp())
        os.makedirs(other_directory)
        other, _ = make_self_signed(other_directory, "localhost")
        with open(other, "rb") as f:
            wrong = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        untrusting = PeerLink(reactor, f"localhost:{port.getHost().port}", replicator=self.branch.replicator,
                              secret=self.secret, node="branch", tls=True, trust_root=wrong, interval=0.05)
        untrusting.start()
        self.addCleanup(untrusting.stop)
        yield self.until(lambda: untrusting.state == "down" and untrusting.last_error != "not contacted yet",
                         "the refusal of an unknown certificate")
        self.assertEqual(untrusting.resyncs, 0)

    @defer.inlineCallbacks
    def test_a_wrong_secret_is_refused_and_said(self):
        link = self.link(secret=b"not the same secret at all")
        yield self.until(lambda: link.state == "down" and "secrets differ" in link.last_error, "the refusal")
        self.assertEqual(self.served.refused >= 1, True)
        self.assertEqual(self.branch.core.location.all_bindings(), [])
