"""Issue 12: nothing a peer sends stalls, crashes or pins the server.

The server is built by `service.build_service`, as twistd builds it, on real
UDP and TCP ports on loopback; time runs on a Clock (tests/loopback.py).
For any message or mutation: no exception escapes, nothing is logged at
error level, and once the clock has run past the RFC timers no transaction
is left.
"""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.loopback import LoopbackServer

T1 = 0.5
# Client INVITE to a silent hop: Timer B (64*T1); then the best response waits
# for its ACK, Timer H (64*T1). Everything else ends sooner.
QUIET = 2 * 64 * T1 + 10


def _request(method="INVITE", uri="sip:1002@example.com", via="SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bKp1;rport",
             extra=b"", body=b"", name=b'"Caller"', call_id=b"c1@x", content_length=None) -> bytes:
    head = (f"{method} {uri} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\n").encode()
    head += b"From: " + name + b" <sip:1001@example.com>;tag=1\r\nTo: <sip:1002@example.com>\r\n"
    head += b"Call-ID: " + call_id + b"\r\nCSeq: 1 " + method.encode() + b"\r\nContact: <sip:1001@127.0.0.1:5999>\r\n"
    length = len(body) if content_length is None else content_length
    return head + extra + b"Content-Length: " + str(length).encode() + b"\r\n\r\n" + body


_METHODS = st.sampled_from(["INVITE", "REGISTER", "OPTIONS", "BYE", "ACK", "CANCEL", "MESSAGE", "SUBSCRIBE"])
_GARBAGE = st.sampled_from([b"", b" ", b"\t", b"\xe9", b"\x00", b"\xff", b"%", b"%zz", b";", b",", b"[", b"]",
                            b"[::1", b"host.name", b"99999", b"0", b"-1", b"70000", b"\r\n ", b"\\", b'"'])
_VIA_HOSTS = st.sampled_from(["127.0.0.1", "some.host.name", "[::1]", "[zz::1]", "1.2.3", "999.1.1.1", "a..b", ""])
_VIA_PARAMS = st.sampled_from(["", ";received=evil.example", ";received=198.51.100.9", ";maddr=evil.example",
                               ";maddr=224.0.0.1", ";rport", ";rport=abc", ";rport=70000", ";received=\xe9",
                               ";branch=", ";branch=z9hG4bK\x00"])


@st.composite
def whitespace_folding(draw):
    run = b" " * draw(st.integers(1, 60_000))
    after = draw(st.sampled_from([b"\r\nX-B: b", b"\r\n b", b"\r\n\tb", b"", b"\n b"]))
    return _request(extra=b"X-A: a" + run + after + b"\r\n" + draw(st.sampled_from([b"", b"X-C: c\r\n d\r\n"])))


@st.composite
def via_garbage(draw):
    port = draw(st.sampled_from(["", ":5060", ":0", ":99999", ":abc", ":\u00b2"]))
    via = f"SIP/2.0/UDP {draw(_VIA_HOSTS)}{port};branch=z9hG4bK{draw(st.integers(0, 9999))}{draw(_VIA_PARAMS)}"
    contact = draw(st.sampled_from([b"", b"Contact: <sip:1005@some.host.name:5060>\r\n",
                                    b"Contact: <sip:1005@127.0.0.1;maddr=x.y>\r\n"]))
    return _request(draw(_METHODS), via=via, extra=contact)


@st.composite
def latin1_and_nul(draw):
    junk = draw(st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b'"', b"").replace(b"\r", b"")
                                                       .replace(b"\n", b"")))
    auth = (b'Proxy-Authorization: Digest username="1001", realm="example.com", nonce="' + junk
            + b'", uri="sip:1002@example.com", response="' + junk + b'", qop=auth, nc=00000001, cnonce="x"\r\n')
    which = draw(st.integers(0, 2))
    if which == 0:
        return _request(name=b'"' + junk + b'"')
    if which == 1:
        return _request(extra=auth)
    return _request("REGISTER", uri="sip:example.com", extra=auth.replace(b"Proxy-", b""))


@st.composite
def mutated(draw):
    data = bytearray(draw(st.sampled_from([_request(), _request("REGISTER", uri="sip:example.com"),
                                           _request("BYE", extra=b"Route: <sip:127.0.0.1;lr;sptk=k1.00>\r\n")])))
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 2))
        if op == 0 and data:
            del data[min(pos, len(data) - 1):pos + draw(st.integers(1, 20))]
        elif op == 1:
            data[pos:pos] = draw(_GARBAGE)
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=6))
    return bytes(data)


DATAGRAMS = st.one_of(whitespace_folding(), via_garbage(), latin1_and_nul(), mutated(), st.binary(max_size=300))


@st.composite
def tcp_streams(draw):
    """Framing: Content-Length lies, pipelining, tiny segments."""
    messages = []
    for _ in range(draw(st.integers(1, 3))):
        body = draw(st.sampled_from([b"", b"v=0\r\n"]))
        lie = draw(st.sampled_from([None, 0, 3, 10_000, 70_000]))
        messages.append(_request(draw(_METHODS), via=f"SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bKt{len(messages)}",
                                 body=body, content_length=lie))
    stream = draw(st.sampled_from([b"", b"\r\n\r\n"])).join(messages)
    size = draw(st.integers(1, 2000))
    return [stream[i:i + size] for i in range(0, len(stream), size)][:400]


class WholeServerTests(SynchronousTestCase):
    def setUp(self):
        self.errors = []
        globalLogPublisher.addObserver(self._observe)
        self.addCleanup(globalLogPublisher.removeObserver, self._observe)
        self.server = LoopbackServer(os.path.abspath(self.mktemp())).start()
        self.addCleanup(self.server.stop)

    def _observe(self, event):
        level = event.get("log_level")
        if event.get("log_failure") is not None or (level is not None and level >= LogLevel.error):
            self.errors.append(event)

    def settle(self):
        self.server.drain_udp()
        self.server.advance(QUIET)
        self.server.drain_udp()
        self.assertEqual(self.server.open_transactions(), {})
        self.assertEqual(self.errors, [])
        self.assertEqual(self.server.server.dropped["internal_error"], 0)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(DATAGRAMS, min_size=1, max_size=4))
    def test_any_datagrams(self, datagrams):
        for data in datagrams:
            self.server.send_udp(data)
        self.settle()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(tcp_streams())
    def test_any_tcp_stream(self, chunks):
        self.server.send_tcp(chunks)
        self.settle()

    def test_the_one_that_stalled_the_server(self):
        # 60,000 spaces, then a header that is not a fold, and a fold elsewhere: 15.7 s before.
        self.server.send_udp(_request(extra=b"X-A: a" + b" " * 60_000 + b"\r\nX-B: b\r\n c\r\n"))
        self.assertEqual([a[:12] for a in self.server.drain_udp()], [b"SIP/2.0 407 "])
        self.settle()

    def test_a_flood_of_forged_registers_pins_no_transaction(self):
        for n in range(300):
            self.server.udp.sendto(_request("REGISTER", uri="sip:example.com", call_id=b"f%d" % n,
                                            via=f"SIP/2.0/UDP 10.9.{n // 250}.{n % 250}:5060;branch=z9hG4bKf{n}"),
                                   ("127.0.0.1", self.server.port))
            if n % 50 == 0:
                self.server.pump()
        self.server.pump(20)
        self.assertEqual(self.server.open_transactions(), {})
        self.settle()


class WebBoundsTests(SynchronousTestCase):
    def setUp(self):
        self.server = LoopbackServer(os.path.abspath(self.mktemp())).start()
        self.addCleanup(self.server.stop)

    def test_a_large_body_is_413_before_it_is_read(self):
        for port in (self.server.web_port, self.server.admin_port):
            with self.subTest(port=port):
                raw = (b"POST /api/reboot HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 100_000)
                self.assertTrue(self.server.http(raw, port).startswith(b"HTTP/1.1 413 "))

    def test_a_chunked_body_past_the_bound_is_413(self):
        chunk = b"%x\r\n%s\r\n" % (60_000, b"y" * 60_000)
        raw = b"POST /services HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 3
        self.assertTrue(self.server.http(raw).startswith(b"HTTP/1.1 413 "))

    def test_huge_headers_are_431(self):
        raw = b"GET /services HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"p" * 20_000 + b"\r\n\r\n"
        self.assertTrue(self.server.http(raw).startswith(b"HTTP/1.1 431 "))

    def test_an_ordinary_request_still_works(self):
        answer = self.server.http(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                  self.server.admin_port)
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 "), answer[:100])  # no token: 401, not a hang
