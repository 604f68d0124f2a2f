"""Overload control: measure how far behind the server is, and refuse just enough new work, by class.

A SIP server that falls behind on UDP collapses: answers come late, the
clients retransmit (T1 doubling), the retransmissions are more work, and
the goodput falls to nothing while the CPU is busy. RFC 6357 (section 4)
advises to refuse early and cheaply, and to keep serving what finishes work
already started. Here:

- Pressure is measured, not guessed. The UDP port reports how long each
  datagram waited in the kernel's receive queue (SO_TIMESTAMP) and the
  kernel's count of datagrams dropped on a full queue (SO_RXQ_OVFL),
  `transport.TimestampedUdpPort`; a tick every `interval` seconds also notes
  how late the event loop itself runs. A tick is under pressure when the
  (smoothed) wait reaches `threshold`, or when more than 1% of the datagrams
  of its interval were dropped while the wait is at least a quarter of it.
  (Drops alone are no sign: a burst overflows a small buffer at any load,
  which is why the UDP listener asks for a large one, `[server] udp_receive_buffer`.)
- Refusal is proportional: a share of new requests of a class is refused,
  raised by `step_up` on every tick under pressure and lowered by
  `step_down` on every calm one, so the server settles at about the work it
  can do (all-or-nothing would swing between refusing everyone and drowning).
  Classes, cheapest to refuse first:
    low   new REGISTERs (no credentials yet) and other new out-of-dialog non-INVITEs;
    high  new INVITEs (no credentials yet): refused only while every low one is.
  A new REGISTER is refused before it is parsed: its 503 is spliced from the
  datagram's own Via, From, To, Call-ID and CSeq lines (`refusal_for`), at a
  tenth of the cost of parsing it, so refusing thousands a second leaves the
  CPU to the registrations under way. (Dropping it instead would be cheaper
  still, and worse: the phone retransmits it ten times.)
  Never refused: responses, ACK, CANCEL, BYE and every other in-dialog request,
  retransmissions (they match a transaction before this is asked), and requests
  carrying credentials (their sender passed the challenge: work already half done).
- A 503 carries Retry-After spread over [retry_after, 2 * retry_after]
  seconds, so the phones turned away do not all come back in the same second.

`level` sums it up for logs and metrics: 0 nothing refused, 1 some low,
2 every low and some high, 3 everything new.
What was refused is counted by class (metrics: `sipproxy_shed_total`).
"""

import os
import random
import re
import time

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

_CREDENTIALS = re.compile(rb"\n(?:proxy-)?authorization[ \t]*:", re.IGNORECASE)
# The lines a response copies (RFC 3261 8.2.6.2), long and compact names.
_COPIED = {b"via": b"Via", b"v": b"Via", b"from": b"From", b"f": b"From", b"to": b"To", b"t": b"To",
           b"call-id": b"Call-ID", b"i": b"Call-ID", b"cseq": b"CSeq"}


class LoadShedder:
    def __init__(self, clock: IReactorTime, *, threshold: float = 0.1, interval: float = 0.05,
                 retry_after: int = 10, smoothing: float = 0.3, step_up: float = 0.05, step_down: float = 0.05,
                 rng: random.Random | None = None, busy_limit: float = 0.9, cpu_time=time.process_time):
        self.clock = clock
        self.busy_limit = busy_limit  # share of a core the server may spend before it refuses new work
        self.cpu_time = cpu_time
        self.busy = 0.0  # smoothed share of a core used (the event loop is one thread)
        self._cpu_at = cpu_time()
        self.threshold = threshold
        self.interval = interval
        self.retry_after = retry_after
        self.smoothing = smoothing  # weight of the newest measurement
        self.step_up = step_up
        self.step_down = step_down
        self.rng = rng or random.Random()
        self.lag = 0.0  # smoothed seconds a message waits (queue or event loop, the worse)
        self.max_lag = 0.0  # the worst single measurement since start (metrics)
        self.refuse_low = 0.0  # share of new low-class requests refused
        self.refuse_high = 0.0  # share of new high-class requests refused
        self.level = 0
        self.shed: dict[str, int] = {}
        self.kernel_drops = 0  # since start (metrics)
        self._window = 0.0  # the longest queue wait seen since the last tick
        self._last_wait = 0.0  # the wait of the datagram being handled now
        self._arrived = 0  # datagrams read since the last tick
        self._dropped = 0  # datagrams the kernel dropped since the last tick
        self._dropped_total = 0  # the kernel's count (our socket is new at start), as last reported
        self._expected = 0.0
        self._call = None

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def start(self) -> None:
        if self.enabled and self._call is None:
            self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._cpu_at = self.cpu_time()
        self._expected = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._tick)

    # -- measurements ---------------------------------------------------------

    def queue_delay(self, seconds: float) -> None:
        """One datagram's wait in the kernel's queue (per datagram: keep it cheap)."""
        self._arrived += 1
        self._last_wait = seconds
        if seconds > self._window:
            self._window = seconds

    def kernel_dropped(self, total: int) -> None:
        """The socket's count of datagrams dropped on a full queue changed (cumulative, 32 bits)."""
        new = (total - self._dropped_total) % 2**32
        self._dropped += new
        self.kernel_drops += new
        self._dropped_total = total

    def _tick(self) -> None:
        elapsed = self.clock.seconds() - self._expected + self.interval
        busy = (self.cpu_time() - self._cpu_at) / elapsed if elapsed > 0 else 0.0
        late = max(0.0, self.clock.seconds() - self._expected, self._window)
        loss = self._dropped / (self._dropped + self._arrived) if self._dropped else 0.0
        self._window = 0.0
        self._arrived = self._dropped = 0
        self.max_lag = max(self.max_lag, late)
        self.observe(late, loss, busy)
        self._schedule()

    def observe(self, late: float, loss: float = 0.0, busy: float = 1.0) -> None:
        """One tick's measurements: the longest wait (s), the share the kernel dropped, the share of a core used.

        Under pressure only while the server is also busy: a wait with an idle
        CPU (a slow disk, a paused VM) is not helped by refusing phones.
        """
        self.lag = self.smoothing * late + (1 - self.smoothing) * self.lag
        self.busy = self.smoothing * busy + (1 - self.smoothing) * self.busy
        waiting = self.lag >= self.threshold or (loss > 0.01 and self.lag >= self.threshold / 4)
        if waiting and self.busy >= self.busy_limit:
            if self.refuse_low < 1.0:
                self.refuse_low = min(1.0, self.refuse_low + self.step_up)
            else:
                self.refuse_high = min(1.0, self.refuse_high + self.step_up)
        elif self.refuse_high > 0:
            self.refuse_high = max(0.0, self.refuse_high - self.step_down)
        else:
            self.refuse_low = max(0.0, self.refuse_low - self.step_down)
        level = (3 if self.refuse_high >= 1.0 else 2 if self.refuse_high > 0 else 1 if self.refuse_low > 0 else 0)
        if level != self.level:
            if level > self.level:
                log.warn("Overloaded (messages wait {lag:.0f} ms, {loss:.0%} dropped by the kernel): "
                         "refusing new work, level {shed_level}", lag=self.lag * 1000, loss=loss, shed_level=level)
            elif level == 0:
                log.info("No longer overloaded: refused {shed} so far", shed=dict(self.shed))
            self.level = level

    # -- decisions ------------------------------------------------------------

    def refusal_for(self, data: bytes, to_tag: str, server: str = "") -> bytes | None:
        """The 503 for a new REGISTER (no credentials) this datagram carries, if it is to be refused now; else None.

        b"" (send nothing) when it waited in the queue so long that a retransmission is already behind it.

        Built from the datagram's bytes, without parsing it. Anything unusual
        (folded or missing lines, a To tag) returns None: the normal path decides.
        """
        if (self.refuse_low == 0.0 or not data.startswith(b"REGISTER ") or _CREDENTIALS.search(data)
                or self.rng.random() >= self.refuse_low):
            return None
        if self._last_wait >= 2 * self.threshold:
            # It waited so long that the phone has retransmitted it (T1 = 500 ms): the copy behind it gets the 503.
            self._count("register_stale")
            return b""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        out = [b"SIP/2.0 503 Service Unavailable"]
        seen = set()
        for line in data[:end].split(b"\r\n")[1:]:
            name, colon, value = line.partition(b":")
            if not colon or line[:1] in b" \t":
                return None  # folded or broken: leave it to the parser
            canonical = _COPIED.get(name.strip().lower())
            if canonical is None:
                continue
            value = value.strip()
            if canonical == b"To":
                if b";tag=" in value.lower():
                    return None
                value += b";tag=" + to_tag.encode()
            seen.add(canonical)
            out.append(canonical + b": " + value)
        if len(seen) < 5:
            return None
        out.append(b"Retry-After: " + self.retry_after_value().encode())
        if server:
            out.append(b"Server: " + server.encode())
        out.append(b"Content-Length: 0")
        self._count("register")
        return b"\r\n".join(out) + b"\r\n\r\n"

    def sheds(self, request) -> bool:
        """True when this new request (not a retransmission) is to be answered 503 now."""
        if self.refuse_low == 0.0:
            return False
        method = request.method
        if method in ("ACK", "CANCEL", "BYE") or _has_credentials(request) or request.to.tag:
            return False
        if method == "INVITE":
            if self.refuse_high > 0 and self.rng.random() < self.refuse_high:
                self._count("invite")
                return True
            return False
        if method == "REGISTER":
            return False  # refusal_for had its chance, before parsing
        if self.rng.random() < self.refuse_low:
            self._count("register" if method == "REGISTER" else "other")
            return True
        return False

    def retry_after_value(self) -> str:
        """Seconds for Retry-After, spread so the refused phones do not return together."""
        spread = max(1, self.retry_after)
        return str(self.retry_after + int.from_bytes(os.urandom(2), "big") % (spread + 1))

    def _count(self, what: str) -> None:
        self.shed[what] = self.shed.get(what, 0) + 1

    def counters(self) -> dict:
        return {"lag_seconds": self.lag, "max_lag_seconds": self.max_lag, "level": self.level, "busy": self.busy,
                "refused_share": {"low": self.refuse_low, "high": self.refuse_high},
                "shed": dict(self.shed), "kernel_drops": self.kernel_drops}


def _has_credentials(request) -> bool:
    headers = request.headers
    return headers.get("authorization") is not None or headers.get("proxy-authorization") is not None
