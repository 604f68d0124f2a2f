"""The Redis client (proxy/redis/) and the shared location and forwarding built on it.

RESP framing and the connection's failure paths run in memory on a Clock.
The store, the location service and the forwarding settings run against a
real `redis-server` on a free loopback port (tests/integration/redis.py):
skipped when it is not installed, a failure in CI.
"""

import os

import attrs
from twisted.internet import defer, reactor, task
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from proxy.config import LocationConfig, parse_config
from proxy.errors import ConfigError
from proxy.redis.client import RedisAddress, RedisClient, RedisUnavailable, _RespProtocol
from proxy.redis.resp import ProtocolError, ReplyError, ReplyReader, encode
from proxy.registration.location import Binding
from proxy.routing.forwarding import ForwardingError, ForwardSettings


class RespTests(SynchronousTestCase):
    def test_a_command_is_an_array_of_bulk_strings(self):
        self.assertEqual(encode("SET", "k", b"v\r\n", 5), b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n$1\r\n5\r\n")

    def test_replies_of_every_type_arrive_whole_however_they_are_split(self):
        stream = b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n$1\r\nx\r\n*1\r\n:1\r\n*-1\r\n$0\r\n\r\n"
        reader = ReplyReader()
        replies = []
        for i in range(len(stream)):
            replies += reader.feed(stream[i:i + 1])
        self.assertEqual(replies[0], "OK")
        self.assertIsInstance(replies[1], ReplyError)
        self.assertEqual(str(replies[1]), "ERR no")
        self.assertEqual(replies[2:], [42, b"abc", None, [b"x", [1]], None, b""])

    def test_a_stream_that_is_not_resp_raises(self):
        for bad in (b"?what\r\n", b":12x\r\n", b"$3\r\nabcXY", b"\r\n", b"*1\r\n" * 20 + b":1\r\n"):
            self.assertRaises(ProtocolError, ReplyReader().feed, bad)


class ConnectionTests(SynchronousTestCase):
    def connected(self, clock, **kwargs):
        client = RedisClient(clock, urls=["redis://127.0.0.1:1/0"], timeout=0.5, **kwargs)
        proto = _RespProtocol(clock)
        proto.makeConnection(StringTransport())
        client._protocol = proto  # as _ready leaves it
        client._watchdog.start()
        return client, proto

    def test_a_command_without_a_connection_fails_at_once(self):
        client = RedisClient(task.Clock(), urls=["redis://127.0.0.1:1/0"])
        failure = self.failureResultOf(client.execute("GET", "k"), RedisUnavailable)
        self.assertIn("not connected", str(failure.value))
        self.assertEqual(client.failed_commands, 1)

    def test_replies_answer_the_commands_in_order(self):
        client, proto = self.connected(task.Clock())
        first, second = client.execute("GET", "a"), client.execute("NOPE")
        self.assertEqual(proto.transport.value(), encode("GET", "a") + encode("NOPE"))
        proto.dataReceived(b"$1\r\nx\r\n-ERR unknown command\r\n")
        self.assertEqual(self.successResultOf(first), b"x")
        self.failureResultOf(second, ReplyError)

    def test_a_full_queue_fails_new_commands_at_once(self):
        client, proto = self.connected(task.Clock(), max_pending=100)
        waiting = [client.execute("GET", str(n)) for n in range(100)]
        self.failureResultOf(client.execute("GET", "one more"), RedisUnavailable)
        self.assertNoResult(waiting[0])

    def test_an_unanswered_command_drops_the_connection_and_fails_every_waiter(self):
        clock = task.Clock()
        client, proto = self.connected(clock)
        waiting = [client.execute("GET", "a"), client.execute("GET", "b")]
        clock.advance(0.5)
        self.assertFalse(proto.transport.disconnecting)
        clock.advance(0.25)  # overdue: looked at once more, after whatever the reactor reads meanwhile
        self.assertFalse(proto.transport.disconnecting)
        clock.advance(0.25)
        self.assertTrue(proto.transport.disconnecting)  # aborted by the watchdog
        proto.connectionLost(None)
        for d in waiting:
            self.failureResultOf(d, RedisUnavailable)

    def test_replies_read_after_a_stall_of_this_process_keep_the_connection(self):
        clock = task.Clock()
        client, proto = self.connected(clock)
        first, second = client.execute("GET", "a"), client.execute("GET", "b")
        clock.advance(2.0)  # this process was busy: the watchdog's first look finds both overdue
        proto.dataReceived(b"$1\r\nx\r\n")  # what the reactor then reads
        clock.advance(0.25)
        self.assertFalse(proto.transport.disconnecting)
        self.assertEqual(self.successResultOf(first), b"x")
        self.assertNoResult(second)

    def test_urls_are_read_with_their_password_database_and_tls(self):
        self.assertEqual(RedisAddress.parse("rediss://:s%40cret@10.0.0.5:6380/3"),
                         RedisAddress(host="10.0.0.5", port=6380, tls=True, password="s@cret", db=3))
        self.assertEqual(RedisAddress.parse("redis://h", password="p").password, "p")
        self.assertEqual(RedisAddress.parse("unix:///run/redis/redis.sock?db=2"),
                         RedisAddress(host="", port=0, path="/run/redis/redis.sock", db=2))
        for bad in ("http://h", "redis://", "redis://h/x", "redis://h:99999", "unix://relative.sock",
                    "unix:///r.sock?db=x"):
            self.assertRaises(ValueError, RedisAddress.parse, bad)


class LocationConfigTests(SynchronousTestCase):
    def test_the_location_table(self):
        config = parse_config({"location": {"backend": "redis", "sentinels": ["10.0.0.1:26379"],
                                             "wait_replicas": 1}})
        self.assertEqual(config.location.sentinels, ("10.0.0.1:26379",))
        self.assertEqual(parse_config({}).location, LocationConfig())
        for table, key in (({"backend": "redis"}, "location.backend"), ({"backend": "mysql"}, "location.backend"),
                           ({"urls": ["redis://h/x"]}, "location.urls"), ({"sentinels": ["h"]}, "location.sentinels"),
                           ({"timeout": 0}, "location.timeout"), ({"prefix": "a b"}, "location.prefix"),
                           ({"colour": 1}, "location.colour")):
            with self.assertRaises(ConfigError) as caught:
                parse_config({"location": table}, "site.toml")
            self.assertIn(f"site.toml: {key}:", str(caught.exception))

    def test_node_names_go_into_nonces_so_must_be_plain(self):
        self.assertEqual(parse_config({"server": {"node": "hq-1.site"}}).server.node_name, "hq-1.site")
        self.assertRaises(ConfigError, parse_config, {"server": {"node": "a b"}})


class NodeNonceTests(SynchronousTestCase):
    def test_a_nonce_from_another_node_gets_a_fresh_challenge_not_a_refusal(self):
        from proxy.registration.auth import Authenticated, Challenge, DigestAuthenticator
        from proxy.registration.credentials import FileCredentials, UserRecord, compute_ha1, locked_users
        from tests.test_auth import REALM, client_answer, nonce_of, request_with

        clock = task.Clock()
        clock.advance(1_700_000_000)
        path = os.path.join(self.mktemp(), "users.json")
        os.makedirs(os.path.dirname(path))
        with locked_users(path) as users:
            users["1001"] = UserRecord("1001", REALM, compute_ha1("1001", REALM, "secret"))
        credentials = FileCredentials(path, clock)
        secret = b"s" * 32  # shared_dir: every node has the same
        a = DigestAuthenticator(clock, credentials, REALM, secret, node="a")
        b = DigestAuthenticator(clock, credentials, REALM, secret, node="b")
        nonce = nonce_of(a.authenticate(request_with(), "192.0.2.50", proxy=False))
        answer = request_with(client_answer("1001", "secret", nonce, qop="auth"))
        result = b.authenticate(answer, "192.0.2.50", proxy=False)
        self.assertIsInstance(result, Challenge)  # never a refusal: the phone answers the fresh one
        self.assertIn("stale=true", result.header_value)
        self.assertIsInstance(a.authenticate(answer, "192.0.2.50", proxy=False), Authenticated)


def _redis_or_skip():
    from tests.integration.harness import require

    require("redis-server")
    require("redis-cli")
    from tests.integration.redis import RedisServer

    return RedisServer


class SharedStoreTests(TestCase):
    """Two processes' worth of stores (origins a/1 and b/1) on one real Redis, on the real reactor."""

    timeout = 30

    def setUp(self):
        server_class = _redis_or_skip()
        self.redis = server_class().start()
        self.addCleanup(self.redis.cleanup)
        self.config = LocationConfig(backend="redis", urls=(self.redis.url,), timeout=0.5)

    def node(self, name: str, **config):
        from proxy.redis.store import RedisStore
        from proxy.registration.redis_location import RedisLocationService
        from proxy.routing.redis_forwarding import RedisForwardingStore

        store = RedisStore(reactor, attrs.evolve(self.config, **config), name, origin=f"{name}/1")
        location = RedisLocationService(store, reactor, name)
        forwarding = RedisForwardingStore(store)
        location.start()
        self.addCleanup(location.stop)
        return store, location, forwarding

    @defer.inlineCallbacks
    def until(self, condition, what: str, seconds: float = 3.0):
        for _ in range(int(seconds / 0.01)):
            if condition():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"{what} did not happen within {seconds} s")

    def binding(self, contact="sip:1001@192.0.2.10:5060", seconds=3600, node="a", cseq=1):
        now = reactor.seconds()
        return Binding(aor="sip:1001@example.com", contact=contact, expires_at=now + seconds, call_id="c",
                       cseq=cseq, registered_at=now, node=node)

    @defer.inlineCallbacks
    def test_a_binding_saved_by_one_is_stored_with_its_ttl_and_known_to_the_other(self):
        store_a, a, _ = self.node("a")
        store_b, b, _ = self.node("b")
        yield self.until(lambda: a.loaded and b.loaded, "both connected")
        heard = []
        b.add_observer(lambda event, binding: heard.append(event))
        a.save(self.binding())
        yield a.stored()
        ttl = int(self.redis.command("PTTL", "sipproxy:b:sip:1001@example.com sip:1001@192.0.2.10:5060"))
        self.assertTrue(3_590_000 < ttl <= 3_600_000, ttl)
        yield self.until(lambda: b.lookup("sip:1001@example.com"), "node b hearing of it")
        self.assertEqual(b.lookup("sip:1001@example.com")[0].node, "a")
        self.assertEqual(heard, [])  # node a's registration is announced at node a, not again at b
        a.remove("sip:1001@example.com", "sip:1001@192.0.2.10:5060")
        yield a.stored()
        yield self.until(lambda: not b.lookup("sip:1001@example.com"), "node b forgetting it")

    @defer.inlineCallbacks
    def test_a_registration_taken_while_the_node_reads_redis_back_is_kept(self):
        _, b, _ = self.node("b")
        yield self.until(lambda: b.loaded, "connected")
        reading = b.resync()  # the SCAN is on its way...
        b.save(self.binding(node="b"))  # ...and this REGISTER's SET goes after it: the snapshot lacks it
        yield b.stored()
        yield reading
        self.assertEqual([x.contact for x in b.all_bindings()], ["sip:1001@192.0.2.10:5060"])

    @defer.inlineCallbacks
    def test_a_redis_on_this_host_through_its_unix_socket(self):
        store, a, _ = self.node("a", urls=(f"unix://{self.redis.socket}?db=0",))
        yield self.until(lambda: a.loaded, "connected through the socket")
        a.save(self.binding())
        yield a.stored()
        self.assertEqual(store.commands.where, self.redis.socket)
        self.assertEqual(self.redis.command("DBSIZE").strip(), b"1")

    @defer.inlineCallbacks
    def test_tls_checked_against_the_ca_and_a_password(self):
        from twisted.internet import ssl

        from proxy.redis.store import RedisStore
        from proxy.registration.redis_location import RedisLocationService
        from tests.integration.certs import make_self_signed

        cert, key = make_self_signed(self.mktemp_dir(), "localhost")
        secure = self.redis.__class__(tls=(cert, key), password="s3cret").start()
        self.addCleanup(secure.cleanup)
        with open(cert, "rb") as f:
            trust = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        config = LocationConfig(backend="redis", urls=(f"rediss://localhost:{secure.port}/0",), password="s3cret")
        store = RedisStore(reactor, config, "a", trust_root=trust)
        location = RedisLocationService(store, reactor, "a")
        location.start()
        self.addCleanup(location.stop)
        yield self.until(lambda: location.loaded, "connected over TLS")
        location.save(self.binding())
        yield location.stored()
        self.assertEqual(secure.command("DBSIZE").strip(), b"1")
        # Another CA: the connection is refused, never used.
        other, _ = make_self_signed(self.mktemp_dir(), "localhost")
        with open(other, "rb") as f:
            wrong = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(f.read())])
        untrusting = RedisStore(reactor, config, "b", trust_root=wrong)
        untrusting.start()
        self.addCleanup(untrusting.stop)
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertFalse(untrusting.writable)

    def mktemp_dir(self) -> str:
        path = os.path.abspath(self.mktemp())  # redis-server runs elsewhere: an absolute path
        os.makedirs(path)
        return path

    @defer.inlineCallbacks
    def test_a_node_that_was_away_catches_up_and_drops_what_redis_never_had(self):
        _, a, _ = self.node("a")
        store_b, b, _ = self.node("b")
        yield self.until(lambda: a.loaded and b.loaded, "both connected")
        store_b.subscriber.stop()  # node b misses what follows
        a.save(self.binding())
        yield a.stored()
        b.save(self.binding(contact="sip:1002@192.0.2.11:5060", node="b"), local=False)  # never stored
        self.assertEqual(len(b.all_bindings()), 1)
        store_b.subscriber.start()
        yield self.until(lambda: store_b.resyncs == 2, "node b's resync")
        self.assertEqual([x.contact for x in b.all_bindings()], ["sip:1001@192.0.2.10:5060"])

    @defer.inlineCallbacks
    def test_with_redis_down_nothing_is_writable_and_a_pending_write_fails(self):
        store, a, forwarding = self.node("a")
        yield self.until(lambda: a.loaded, "connected")
        self.assertTrue(a.writable)
        self.redis.kill()
        yield self.until(lambda: not a.writable, "the outage noticed")
        self.assertRaises(ForwardingError, forwarding.update, "1001", always="1002")
        a.save(self.binding())  # (the registrar would have answered 503 already; a late write fails)
        yield self.assertFailure(a.stored(), RedisUnavailable)
        self.assertEqual(store.counters()["disconnected"], 1)
        self.assertEqual(store.commands.outages, 1)
        self.redis.start()
        yield self.until(lambda: a.writable and store.resyncs == 2, "back and resynchronised", seconds=10)
        self.assertEqual(a.all_bindings(), [])  # Redis never had it: a 503 was the right answer

    @defer.inlineCallbacks
    def test_forwarding_set_on_one_applies_on_the_other_and_survives_a_restart(self):
        _, _, fa = self.node("a")
        store_b, b, fb = self.node("b")
        yield self.until(lambda: store_b.resyncs, "connected")
        fa.update("1001", always="1003")
        yield self.until(lambda: fb.get("1001").always == "1003", "node b seeing the setting")
        fa.put(ForwardSettings(user="1001"))
        yield self.until(lambda: fb.get("1001").is_empty(), "node b seeing it cleared")
        fa.update("1002", busy="1003")
        yield self.until(lambda: fb.get("1002").busy == "1003", "node b seeing 1002's")
        store_c, _, fc = self.node("c")
        yield self.until(lambda: store_c.resyncs, "node c loaded")
        self.assertEqual([s.user for s in fc.all()], ["1002"])

    @defer.inlineCallbacks
    def test_sipproxy_admin_sets_forwarding_in_redis_and_the_running_nodes_hear_it(self):
        from proxy.routing.redis_forwarding import BlockingForwardingStore

        store_a, _, fa = self.node("a")
        yield self.until(lambda: store_a.resyncs, "connected")
        admin = BlockingForwardingStore(self.config)
        self.addCleanup(admin.close)
        admin.update("1005", no_answer="1003", no_answer_after=6)
        yield self.until(lambda: fa.get("1005").no_answer == "1003", "node a hearing of it")
        self.assertEqual(admin.all(), [fa.get("1005")])
        self.assertRaises(ForwardingError, admin.update, "1005", always="not a target!")
        down = BlockingForwardingStore(attrs.evolve(self.config, urls=("redis://127.0.0.1:1/0",)))
        with self.assertRaises(RedisUnavailable) as caught:
            down.get("1005")
        self.assertIn("127.0.0.1:1", str(caught.exception))

    @defer.inlineCallbacks
    def test_without_the_replicas_asked_for_a_200_waits_for_the_primary_alone_and_says_so(self):
        store, a, _ = self.node("a", wait_replicas=1)
        yield self.until(lambda: a.loaded and store.counters()["replicas"] == 0, "connected")
        a.save(self.binding())
        yield a.stored()
        self.assertEqual(store.degraded, 1)

    @defer.inlineCallbacks
    def test_with_a_replica_the_200_waits_for_it(self):
        replica = self.redis.__class__(replica_of=self.redis).start()
        self.addCleanup(replica.cleanup)
        replica.wait_synced()
        store, a, _ = self.node("a", wait_replicas=1)
        yield self.until(lambda: a.loaded and store.replicas == 1, "the replica seen")
        a.save(self.binding())
        yield a.stored()
        self.assertEqual((store.degraded, store.not_replicated), (0, 0))
        self.assertTrue(replica.command("EXISTS", "sipproxy:b:sip:1001@example.com sip:1001@192.0.2.10:5060")
                        .strip() == b"1")


class RegistrarWithSharedStoreTests(SynchronousTestCase):
    def test_a_register_while_the_store_is_down_gets_503_and_changes_nothing(self):
        from proxy.registration.credentials import UserRecord, compute_ha1, locked_users
        from proxy.testing import make_core
        from tests.test_registrar import REALM, Phone

        directory = self.mktemp()
        os.makedirs(directory)
        with locked_users(os.path.join(directory, "users.json")) as users:
            users["1001"] = UserRecord("1001", REALM, compute_ha1("1001", REALM, "secret"))
        clock = task.Clock()
        clock.advance(1_700_000_000)
        location = LocationConfig(backend="redis", urls=("redis://127.0.0.1:1/0",))
        core, transports, _ = make_core(directory, clock, domains=(REALM,), addresses=("192.0.2.1",),
                                        location=location)
        self.assertFalse(core.location.writable)  # never started: no connection
        harness = type("H", (), {"server": core.server, "transports": transports})()
        response = Phone(harness).register("1001")
        self.assertEqual((response.status, response.reason), (503, "Location store unavailable"))
        self.assertTrue(5 <= int(response.headers.get("retry-after")) <= 14)
        self.assertEqual(core.location.all_bindings(), [])


class GroupTests(SynchronousTestCase):
    def test_a_turns_writes_go_as_one_group_with_one_deferred(self):
        clock = task.Clock()
        client = RedisClient(clock, urls=["redis://127.0.0.1:1/0"])
        proto = _RespProtocol(clock)
        proto.makeConnection(StringTransport())
        client._protocol = proto
        d = client.execute_many([("SET", "k", "v"), ("NOPE",), ("PUBLISH", "c", "m")])
        self.assertEqual(proto.transport.value(), encode("SET", "k", "v") + encode("NOPE") + encode("PUBLISH", "c", "m"))
        proto.dataReceived(b"+OK\r\n-ERR unknown\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b":2\r\n")
        ok, error, listeners = self.successResultOf(d)
        self.assertEqual((ok, listeners), ("OK", 2))
        self.assertIsInstance(error, ReplyError)
