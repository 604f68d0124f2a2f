"""Workers (proxy/workers/): who owns a datagram, the bus on real socketpairs, and two cores sharing state.

The cores are the primary (worker 0) and worker 1 built by `build_core` on one
state directory and one Clock; their buses are real AF_UNIX socketpairs,
pumped by hand. The supervisor and the child program run for real in
tests/integration/test_workers_sipp.py.
"""

import io
import os
import sqlite3
import zlib

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.config import AuthSettings, RegistrarConfig
from proxy.registration.auth import parse_digest
from proxy.registration.credentials import UserRecord, compute_ha1, locked_users
from proxy.testing import make_core, sip_bytes, udp_source
from proxy.transport import Source
from proxy.workers.bus import Bus, make_pairs
from proxy.workers.link import WorkerLink, merge_counters
from proxy.workers.owner import call_id_owner, owner_of
from tests.test_auth import client_answer

REALM = "example.com"


def request(method="INVITE", call_id="abc@192.0.2.50", compact=False) -> bytes:
    header = "i" if compact else "cAlL-iD"
    return sip_bytes(f"""
        {method} sip:1002@example.com SIP/2.0
        Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK1
        From: <sip:1001@example.com>;tag=a
        To: <sip:1002@example.com>
        {header}: {call_id}
        CSeq: 1 {method}
        Max-Forwards: 70
    """)


def response(top_via: str, second_via: str = "SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK1") -> bytes:
    return sip_bytes(f"""
        SIP/2.0 180 Ringing
        Via: {top_via}
        Via: {second_via}
        From: <sip:1001@example.com>;tag=a
        To: <sip:1002@example.com>;tag=b
        Call-ID: abc@192.0.2.50
        CSeq: 1 INVITE
    """)


class OwnerTests(SynchronousTestCase):
    def test_a_request_belongs_to_its_call_id(self):
        owners = {owner_of(request(method, compact=compact), 4)
                  for method in ("INVITE", "CANCEL", "ACK") for compact in (False, True)}
        self.assertEqual(owners, {zlib.crc32(b"abc@192.0.2.50") % 4})
        self.assertEqual(call_id_owner(b" abc@192.0.2.50 ", 4), zlib.crc32(b"abc@192.0.2.50") % 4)
        spread = {owner_of(request(call_id=f"call-{n}"), 2) for n in range(50)}
        self.assertEqual(spread, {0, 1})

    def test_a_response_belongs_to_the_worker_in_our_top_via(self):
        ours = "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKx;worker=1"
        self.assertEqual(owner_of(response(ours), 2), 1)
        self.assertEqual(owner_of(response(ours.replace("worker=1", "worker = 0")), 2), 0)
        # Only the top Via counts; a marker past the count is nobody's.
        self.assertIsNone(owner_of(response("SIP/2.0/UDP 192.0.2.9:5060;branch=z9hG4bKy", ours), 2))
        self.assertIsNone(owner_of(response(ours.replace("worker=1", "worker=7")), 2))

    def test_what_cannot_be_told_belongs_to_whoever_read_it(self):
        self.assertIsNone(owner_of(b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n\r\n", 2))
        self.assertIsNone(owner_of(request(call_id=""), 2))
        self.assertIsNone(owner_of(b"\x00\xff garbage", 2))


class FakeReactor(Clock):
    """A Clock that also takes readers (the bus's inbox), pumped by hand."""

    def __init__(self):
        super().__init__()
        self.readers = set()

    def addReader(self, reader):
        self.readers.add(reader)

    def removeReader(self, reader):
        self.readers.discard(reader)


def pump(*buses) -> None:
    """Read every inbox until nothing is left, flushing batches in between."""
    for _ in range(10):
        for bus in buses:
            bus.flush()
        for bus in buses:
            bus._inbox.doRead()


class BusTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        pairs = make_pairs(2)
        self.addCleanup(lambda: [s.close() for pair in pairs for s in pair])
        self.primary = Bus(self.reactor, 0, pairs[0][1], {1: pairs[1][0]})
        self.worker = Bus(self.reactor, 1, pairs[1][1], {0: pairs[0][0]})

    def test_datagrams_of_one_turn_go_as_one_message_and_arrive_as_they_were(self):
        got = []
        self.worker.on_datagram = lambda data, host, port, arrived: got.append((data, host, port, arrived))
        self.primary.hand_over(1, b"first", "192.0.2.50", 5060, 10.5)
        self.primary.hand_over(1, b"second" * 1000, "2001:db8::1", 5062, 11.0)
        self.assertEqual(got, [])
        self.reactor.advance(0)  # the end of the turn
        self.worker._inbox.doRead()
        self.assertEqual(got, [(b"first", "192.0.2.50", 5060, 10.5), (b"second" * 1000, "2001:db8::1", 5062, 11.0)])
        self.assertEqual(self.primary.handed_over, 2)

    def test_a_large_batch_is_split(self):
        got = []
        self.worker.on_datagram = lambda data, *rest: got.append(data)
        for n in range(5):
            self.primary.hand_over(1, bytes([65 + n]) * 30_000, "192.0.2.50", 5060, 1.0)
        pump(self.primary, self.worker)
        self.assertEqual([d[:1] for d in got], [b"A", b"B", b"C", b"D", b"E"])

    def test_notes_reach_their_handler_with_the_sender(self):
        got = []
        self.primary.on("hello", lambda value, sender: got.append((value, sender)))
        self.worker.send(0, "hello", {"a": (1, 2)})
        self.worker.send(0, "unknown kind", None)  # nobody listens: ignored
        self.primary._inbox.doRead()
        self.assertEqual(got, [({"a": (1, 2)}, 1)])

    def test_a_full_inbox_drops_and_counts_instead_of_blocking(self):
        sent = 0
        while self.worker.send(0, "x", b"y" * 60_000):
            sent += 1
            self.assertLess(sent, 10_000)
        self.assertEqual(self.worker.dropped, 1)
        self.primary._inbox.doRead()  # drained: sending works again
        self.assertTrue(self.worker.send(0, "x", b"y"))


class TwoWorkers:
    """The primary's and worker 1's cores on one state directory, linked by a real bus."""

    def __init__(self, test, auth=AuthSettings()):
        self.clock = FakeReactor()
        self.clock.advance(1_700_000_000)
        self.dir = test.mktemp()
        os.makedirs(self.dir)
        with locked_users(os.path.join(self.dir, "users.json")) as users:
            for name in ("1001", "1002"):
                users[name] = UserRecord(name, REALM, compute_ha1(name, REALM, "secret"))
        pairs = make_pairs(2)
        test.addCleanup(lambda: [s.close() for pair in pairs for s in pair])
        self.cores, self.links, self.transports = [], [], []
        for index in (0, 1):
            core, transports, _ = make_core(self.dir, self.clock, worker=index, auth=auth,
                                            registrar=RegistrarConfig())
            others = {k: pairs[k][0] for k in (0, 1) if k != index}
            link = WorkerLink(self.clock, Bus(self.clock, index, pairs[index][1], others), core)
            link.alive = {0, 1}
            link.start()
            self.cores.append(core)
            self.links.append(link)
            self.transports.append(transports)
        test.addCleanup(self.stop)

    def stop(self):
        for link, core in zip(self.links, self.cores):
            link.stop()
            core.location.stop()

    def pump(self):
        self.clock.advance(0)
        pump(*(link.bus for link in self.links))
        self.clock.advance(0)

    def register(self, worker: int, user="1001", password="secret", call_id="reg-1", nonce_from=None):
        """REGISTER at `worker`, answering its 401 (or the nonce of `nonce_from`); returns the last response."""
        lines = [f"REGISTER sip:{REALM} SIP/2.0", "Via: SIP/2.0/UDP 192.0.2.50:5060;branch=z9hG4bK{branch}",
                 f"From: <sip:{user}@{REALM}>;tag=f", f"To: <sip:{user}@{REALM}>", f"Call-ID: {call_id}",
                 "CSeq: {cseq} REGISTER", f"Contact: <sip:{user}@192.0.2.50:5060>;expires=3600"]
        first = self.send(nonce_from if nonce_from is not None else worker, lines, 1)
        nonce = parse_digest(first.headers.get("www-authenticate"))["nonce"]
        answer = client_answer(user, password, nonce, qop="auth", uri=f"sip:{REALM}")
        return self.send(worker, lines + [answer], 2)

    def send(self, worker: int, lines, cseq: int):
        text = "\n".join(lines).replace("{branch}", os.urandom(4).hex()).replace("{cseq}", str(cseq))
        self.cores[worker].server.data_received(sip_bytes(text), udp_source())
        sent = self.transports[worker].take()
        assert len(sent) == 1, sent
        return sent[0][0]


class LinkTests(SynchronousTestCase):
    def test_a_registration_at_a_worker_is_known_everywhere_and_written_by_the_primary(self):
        w = TwoWorkers(self)
        self.assertEqual(w.register(1).status, 200)
        w.pump()
        aor = f"sip:1001@{REALM}"
        self.assertEqual([b.contact for b in w.cores[0].location.lookup(aor)], ["sip:1001@192.0.2.50:5060"])
        w.cores[0].location.flush()
        with sqlite3.connect(os.path.join(w.dir, "location.sqlite")) as db:
            self.assertEqual(db.execute("SELECT aor FROM bindings").fetchall(), [(aor,)])
        # A removal at the primary (the admin API's unregister) reaches the worker.
        w.cores[0].location.remove_all(aor)
        w.pump()
        self.assertEqual(w.cores[1].location.lookup(aor), [])

    def test_a_worker_never_writes_the_file(self):
        w = TwoWorkers(self)
        w.links[1].bus.stop()  # nothing reaches the primary
        w.links[1].bus = _Mute()
        self.assertEqual(w.register(1).status, 200)
        w.cores[1].location.flush()
        with sqlite3.connect(os.path.join(w.dir, "location.sqlite")) as db:
            self.assertEqual(db.execute("SELECT count(*) FROM bindings").fetchone(), (0,))

    def test_a_nonce_is_good_only_at_the_worker_that_issued_it(self):
        w = TwoWorkers(self)
        answer = w.register(0, nonce_from=1)  # challenged by worker 1, answered to worker 0
        self.assertEqual(answer.status, 401)
        self.assertIn("stale=true", answer.headers.get("www-authenticate"))
        self.assertEqual(w.register(0).status, 200)

    def test_failures_at_one_worker_lock_out_at_the_other(self):
        w = TwoWorkers(self, auth=AuthSettings(max_failures=4))
        for n, worker in enumerate((0, 1, 0)):
            self.assertEqual(w.register(worker, password="wrong", call_id=f"guess-{n}").status, 401)
            w.pump()
        last = w.register(1, password="wrong", call_id="guess-3")
        self.assertEqual((last.status, last.reason), (403, "Too many failed attempts"))
        w.pump()
        self.assertEqual(w.register(0, call_id="right").status, 403)  # locked at the primary as well
        self.assertEqual(w.cores[0].authenticator.lockouts + w.cores[1].authenticator.lockouts, 1)

    def test_a_datagram_read_by_the_wrong_worker_is_served_by_its_owner(self):
        w = TwoWorkers(self)
        data = request("OPTIONS", call_id=_call_id_owned_by(1))
        w.links[0].data_received(data, Source("UDP", "192.0.2.50", 5060))
        self.assertEqual(w.transports[0].sent, [])
        w.pump()
        (answer, destination), = w.transports[1].take()
        self.assertEqual((destination.host, destination.port), ("192.0.2.50", 5060))
        # A worker that is not alive is not given anything: the reader serves it.
        w.links[0].alive = {0}
        w.links[0].data_received(data, Source("UDP", "192.0.2.50", 5060))
        self.assertEqual(len(w.transports[0].take()), 1)

    def test_a_late_new_request_is_refused_where_it_was_read_not_handed_over(self):
        # The reader knows how long the datagram waited in its socket; the owner would only see its inbox.
        w = TwoWorkers(self)
        reader, source = w.cores[0].shedder, Source("UDP", "192.0.2.50", 5060)
        reader.busy = 1.0
        late = _call_id_owned_by(1)
        reader.queue_delay(0.2)
        w.links[0].data_received(request("OPTIONS", call_id=late), source)
        (refusal, destination), = w.transports[0].take()
        self.assertEqual((refusal.status, destination.port), (503, 5060))
        reader.queue_delay(0.2)
        w.links[0].data_received(request("BYE", call_id=late), source)  # what SIPp sends after a 503: dropped
        self.assertEqual((w.transports[0].take(), w.links[0].bus.handed_over), ([], 0))
        self.assertEqual(reader.shed, {"other": 1, "after_refusal": 1})
        w.pump()
        self.assertEqual(w.transports[1].take(), [])
        # On time, the same kind of request goes to its owner, which answers it.
        reader.queue_delay(0.01)
        w.links[0].data_received(request("OPTIONS", call_id=_call_id_owned_by(1, prefix="on-time")), source)
        self.assertEqual(w.links[0].bus.handed_over, 1)
        w.pump()
        self.assertEqual([r.status for r, _ in w.transports[1].take()], [407])  # served: challenged

    def test_our_via_names_the_worker_that_sent_the_request(self):
        w = TwoWorkers(self)
        via = w.cores[1].identity.via_value("UDP", "z9hG4bKabc")
        self.assertTrue(via.endswith(";worker=1"))
        self.assertEqual(owner_of(response(via), 2), 1)
        # Requests the primary makes up (check-sync NOTIFY) say so too: their answers come back to it.
        self.assertEqual(w.register(1).status, 200)
        w.pump()
        (binding,) = w.cores[0].location.lookup(f"sip:1001@{REALM}")
        notify = w.cores[0].checksync.build_notify(binding)
        self.assertTrue(notify.headers.get("via").endswith(";worker=0"))

    def test_the_primary_reads_every_workers_counters_and_events(self):
        w = TwoWorkers(self)
        heard = []
        w.cores[0].plugins.emit = lambda name, **fields: heard.append(name)
        w.cores[1].plugins.relay = w.links[1].relay_event
        self.assertEqual(w.register(1).status, 200)
        w.cores[1].plugins.emit("call_ended", call=None)
        refreshed = w.links[0].refresh()
        self.assertNoResult(refreshed)
        w.pump()
        self.successResultOf(refreshed)
        self.assertIn("call_ended", heard)
        merged = w.links[0].counters()
        self.assertEqual(merged["requests"].get("REGISTER"), 2)
        self.assertEqual(merged["registrations"], w.cores[1].registrar.results)

    def test_a_trace_started_at_the_primary_runs_at_the_workers(self):
        from proxy.trace import TraceFilter

        w = TwoWorkers(self)
        tracers = [core.server.tracer for core in w.cores]
        self.assertIsNotNone(tracers[1])
        until = tracers[0].start(TraceFilter(user="1001"), 5)
        w.pump()
        self.assertEqual((tracers[1].filter.user, tracers[1].until), ("1001", until))
        tracers[0].stop()
        w.pump()
        self.assertFalse(tracers[1].active)
        tracers[0].start(TraceFilter(user="1002"), 5)
        tracers[1].follow(TraceFilter(), 0.0)  # as a worker that has just started
        w.links[0].welcome(1)
        w.pump()
        self.assertEqual(tracers[1].filter.user, "1002")

    def test_a_log_level_set_at_the_primary_holds_at_the_workers(self):
        w = TwoWorkers(self)
        until = w.cores[0].verbosity.set("debug", minutes=1)
        w.pump()
        self.assertEqual((w.cores[1].verbosity.level, w.cores[1].verbosity.until), ("debug", until))
        self.assertTrue(w.cores[1].router.debug)
        w.clock.advance(60)  # each process goes back by itself
        self.assertEqual([core.verbosity.level for core in w.cores], ["info", "info"])
        w.cores[0].verbosity.set("debug", minutes=5)
        w.cores[1].verbosity.follow(False, 0.0)  # as a worker that has just started
        w.links[0].welcome(1)
        w.pump()
        self.assertEqual(w.cores[1].verbosity.level, "debug")
        w.cores[0].verbosity.set("info")
        w.pump()
        self.assertEqual(w.cores[1].verbosity.level, "info")

    def test_a_refresh_gives_up_on_a_silent_worker(self):
        w = TwoWorkers(self)
        refreshed = w.links[0].refresh(timeout=0.5)
        w.clock.advance(0.5)
        self.successResultOf(refreshed)

    def test_counters_add_up_and_levels_take_the_greatest(self):
        merged = merge_counters({"requests": {"INVITE": 2}, "overload": {"lag_seconds": 0.1, "shed": {"invite": 1}},
                                 "gateways": [{"gateway": "a"}]},
                                [{"requests": {"INVITE": 3, "BYE": 1}, "overload": {"lag_seconds": 0.3, "shed": {}},
                                  "gateways": [{"gateway": "b"}]}])
        self.assertEqual(merged, {"requests": {"INVITE": 5, "BYE": 1},
                                  "overload": {"lag_seconds": 0.3, "shed": {"invite": 1}},
                                  "gateways": [{"gateway": "a"}]})


class _Mute:
    """A bus that sends nothing anywhere."""

    dropped = handed_over = 0

    def broadcast(self, kind, value):
        pass

    def send(self, index, kind, value):
        return False

    def stop(self):
        pass


def _call_id_owned_by(index: int, count: int = 2, prefix: str = "call") -> str:
    for n in range(100):
        if call_id_owner(f"{prefix}-{n}".encode(), count) == index:
            return f"{prefix}-{n}"
    raise AssertionError("no Call-ID found")




class LogRelayTests(SynchronousTestCase):
    def test_a_workers_line_is_relayed_as_soon_as_it_is_whole(self):
        # Each record is "\x1e" + JSON + "\n"; one split over two reads waits for its end, not for the next record.
        from twisted.logger import Logger, globalLogPublisher, jsonFileLogObserver

        from proxy.workers.supervisor import _WorkerProcess

        out = io.StringIO()
        Logger(namespace="proxy.dialogs", observer=jsonFileLogObserver(out)).info("Call record: {n}", n=1)
        data = out.getvalue().encode()
        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        proc = _WorkerProcess(supervisor=None, index=1)
        proc.errReceived(data[:10])
        self.assertEqual([e for e in seen if e.get("n") == 1], [])
        proc.errReceived(data[10:])
        (event,) = [e for e in seen if e.get("n") == 1]
        self.assertEqual(event["log_system"], "worker 1: proxy.dialogs#info")
