"""The whole server as service.py builds it, on real loopback sockets, with time on a task.Clock.

The property tests need both: messages must cross the real UDP and TCP
listeners (framing, source addresses, the transports), and the RFC timers
must run on demand (advance 64*T1 and see every transaction gone). The
reactor handed to `build_service` is the real one for sockets and a Clock
for time; the test pumps the real reactor by hand (`iterate`), so no
reactor is ever run and nothing is left behind.
"""

import os
import socket
import time

from twisted.internet import reactor as real_reactor
from twisted.internet.task import Clock

from proxy.config import parse_config
from proxy.service import build_service
from tests.integration.harness import free_port  # retries until a port is free for both UDP and TCP


class ClockedReactor:
    """Sockets from the real reactor, time from a Clock."""

    def __init__(self, real, clock: Clock):
        self._real = real
        self._clock = clock

    def __getattr__(self, name):
        return getattr(self._real, name)

    def callLater(self, delay, f, *args, **kwargs):
        return self._clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self._clock.seconds()

    def getDelayedCalls(self):
        return self._clock.getDelayedCalls()


class LoopbackServer:
    """Start with `start()`, feed with `send_udp`/`send_tcp`, pump with `pump()`, end with `stop()`."""

    def __init__(self, state_dir: str, extra: dict | None = None):
        self.port = free_port()
        self.admin_port = free_port()
        self.web_port = free_port()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        data = {
            "server": {"listen": [f"udp:{self.port}:interface=127.0.0.1", f"tcp:{self.port}:interface=127.0.0.1"],
                       "state_dir": state_dir, "domains": ["example.com", "127.0.0.1"]},
            "admin": {"listen": f"tcp:{self.admin_port}:interface=127.0.0.1"},
            "phone_web": {"listen": f"tcp:{self.web_port}:interface=127.0.0.1"},
            "proxy": {"advertise": f"127.0.0.1:{self.port}"},
            "routes": [{"name": "pstn", "pattern": "9[0-9]+", "strip": 1, "gateways": ["127.0.0.1:9"]}],
            "emergency": {"gateways": ["127.0.0.1:9"]},
        }
        for key, value in (extra or {}).items():
            data.setdefault(key, {}).update(value)
        config = parse_config(data, os.path.join(state_dir, "test.toml"))
        self.reactor = ClockedReactor(real_reactor, self.clock)
        self.service, self.core = build_service(config, self.reactor)
        self.server = self.core.server
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.udp.setblocking(False)

    def start(self) -> "LoopbackServer":
        self.service.startService()
        return self

    def stop(self) -> None:
        self.udp.close()
        d = self.service.stopService()
        deadline = time.monotonic() + 5
        done = []
        if d is not None:
            d.addBoth(done.append)
        while d is not None and not done and time.monotonic() < deadline:
            real_reactor.iterate(0.01)
        # Let the closed ports' last callbacks run.
        for _ in range(5):
            real_reactor.iterate(0)

    def pump(self, rounds: int = 5, delay: float = 0.002) -> None:
        for _ in range(rounds):
            real_reactor.iterate(delay)

    def send_udp(self, data: bytes) -> None:
        try:
            self.udp.sendto(data, ("127.0.0.1", self.port))
        except OSError:
            return  # larger than a datagram: nothing to deliver
        self.pump()

    def drain_udp(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.udp.recv(65535))
            except BlockingIOError:
                return out

    def send_tcp(self, chunks: list[bytes]) -> None:
        """One connection: the chunks as separate segments, then close."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pump(2)
            try:
                for chunk in chunks:
                    s.sendall(chunk)
                    self.pump(2)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the server closed a stream it cannot resynchronise: that is its answer
            self.pump(5)
        self.pump(3)

    def http(self, raw: bytes, port: int | None = None, read_timeout: float = 2.0) -> bytes:
        """Send raw bytes to one of the HTTP sites and return what came back before it closed."""
        with socket.create_connection(("127.0.0.1", port or self.web_port), timeout=2) as s:
            s.setblocking(False)
            self.pump(2)
            sent = 0
            answer = b""
            deadline = time.monotonic() + read_timeout
            while time.monotonic() < deadline:
                if sent < len(raw):
                    try:
                        sent += s.send(raw[sent:sent + 65536])
                    except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                        pass
                self.pump(1)
                try:
                    chunk = s.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                answer += chunk
            return answer

    def advance(self, seconds: float, step: float = 1.0) -> None:
        """Move the Clock forward in steps, pumping the sockets between them (retransmissions go out)."""
        left = seconds
        while left > 0:
            amount = min(step, left)
            self.clock.advance(amount)
            left -= amount
            real_reactor.iterate(0)

    def open_transactions(self) -> dict[str, int]:
        return {k: v for k, v in self.server.transactions.counts().items() if v}
