"""Overload control: refuse the new work a server cannot do in time, cheaply, by class.

A SIP server that falls behind on UDP collapses: answers come late, the
clients retransmit (T1 = 500 ms, doubling), the retransmissions are more work,
and goodput falls while the CPU is busy. RFC 6357 (section 4) advises to refuse
early and cheaply, and to keep serving what finishes work already started. Here:

- The signal is each datagram's own wait: the UDP port reports how long it sat
  in the kernel's receive queue (SO_TIMESTAMP, `transport.TimestampedUdpPort`);
  with workers the process that read a datagram judges it before any hand-over
  (proxy/workers/link.py), and its owner judges it again by its wait in the bus
  inbox. A new request that waited `threshold` seconds is
  refused, one that waited less is served. No share to tune and no control loop
  to lag behind a flood: as soon as refusing (a tenth of the cost of serving)
  brings the wait under the threshold, new work is served again, so the server
  settles at what it can do with every answer well inside T1. While the kernel
  drops datagrams (its buffer full, so the wait is bounded by the buffer's size)
  half the threshold is enough. Never while the process is mostly idle
  (`busy_limit`): a wait with a free CPU (a slow disk, a paused VM) is not helped
  by refusing phones.
- Classes, cheapest to refuse first:
    new REGISTERs and other new out-of-dialog requests   refused past `threshold`;
    new INVITEs                                           past 3 x `threshold`, and never before
                                                          0.6 s (past T1: its caller has retransmitted
                                                          it; B2's calls at capacity wait up to 0.3 s,
                                                          and must not be refused);
    never: responses, ACK, CANCEL, BYE and every other in-dialog request (a To
    tag), requests carrying credentials (their sender passed the challenge: work
    half done), and retransmissions of a transaction under way.
- The 503 is spliced from the datagram's own Via, From, To, Call-ID and CSeq lines
  before anything is parsed (`screen`, about 7 us against 60-100 us to serve),
  with a Retry-After spread over [retry_after, 2 * retry_after] seconds so the
  phones turned away do not return together (the 7940/7960 take both: 503 and
  Retry-After are in their lists of supported responses and headers, seed 001
  lines 2966 and 3016). A 503 ends the client's
  transaction: no retransmissions. Only a request that waited four thresholds
  (so late that its sender has retransmitted it already) is dropped unanswered.
- The Call-IDs refused in the last few seconds are remembered (bounded), so what a
  client sends after our 503 (the ACK of a refused INVITE, or the BYE SIPp sends
  to end a failed "call") is dropped before parsing: it belongs to nothing here.

What was refused is counted by class (metrics: `sipproxy_shed_total`); `level`
sums up for logs and metrics: 0 nothing refused for a second, 1 new non-INVITE
requests refused, 2 new INVITEs too. docs/performance.md has the measurements.
"""

import random
import re
import time

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

_CREDENTIALS = re.compile(rb"\n(?:proxy-)?authorization[ \t]*:", re.IGNORECASE)
_CALL_ID = re.compile(rb"\n(?:call-id|i)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_TAG = re.compile(rb";[ \t]*tag[ \t]*=", re.IGNORECASE)
_BRANCH = re.compile(rb"^[^,]*?;[ \t]*branch[ \t]*=[ \t]*([^;, \t]+)", re.IGNORECASE)
# The lines a response copies (RFC 3261 8.2.6.2), long and compact names, with their values.
_COPIED_LINES = re.compile(rb"\r\n(via|v|from|f|to|t|call-id|i|cseq)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_VIA, _TO, _CALL_ID_NAME = b"Via", b"To", b"Call-ID"
_FROM, _CSEQ = b"From", b"CSeq"
_COPIED = {b"via": _VIA, b"v": _VIA, b"from": _FROM, b"f": _FROM, b"to": _TO, b"t": _TO,
           b"call-id": _CALL_ID_NAME, b"i": _CALL_ID_NAME, b"cseq": _CSEQ}
_COPIED.update({name: name for name in (_VIA, _FROM, _TO, _CALL_ID_NAME, _CSEQ)})  # as usually written
_BIT = {_VIA: 1, _FROM: 2, _TO: 4, _CALL_ID_NAME: 8, _CSEQ: 16}
_ALL_COPIED = 31
# Requests that only ever follow one we answered (never new work of their own).
_FOLLOWERS = (b"ACK ", b"BYE ", b"CANCEL ")
_INVITE_FACTOR = 3  # new INVITEs: only when so late that the caller has retransmitted (T1 = 500 ms) ...
_INVITE_FLOOR = 0.6  # ... whatever the threshold of the others
_HOPELESS = 4  # a new request that waited this many thresholds is dropped, not answered
_TO_LINE = re.compile(rb"\r\n(?:to|t)[ \t]*:([^\r\n]*)", re.IGNORECASE)
_CALM = 1.0  # seconds without a refusal before "no longer overloaded"


class LoadShedder:
    """One per process: told each datagram's wait, it decides before parsing (`screen`) or after (`sheds`)."""

    def __init__(self, clock: IReactorTime, *, threshold: float = 0.2, interval: float = 0.05,
                 retry_after: int = 10, smoothing: float = 0.3, busy_limit: float = 0.5,
                 cpu_time=time.process_time, remember: float = 4.0, max_remembered: int = 50_000):
        self.clock = clock
        self.threshold = threshold  # seconds a new non-INVITE request may have waited and still be served
        self.invite_threshold = max(threshold * _INVITE_FACTOR, _INVITE_FLOOR) if threshold > 0 else 0.0
        self.interval = interval
        self.retry_after = retry_after
        self._random = random.Random()  # spreading, not secrets
        self._retry_after_lines = [b"Retry-After: %d" % (retry_after + n) for n in range(max(1, retry_after) + 1)]
        self.smoothing = smoothing  # weight of the newest tick in `lag` and `busy`
        # Share of a core the process must be using before it refuses: a process starved of CPU by others on
        # a full machine still shows 0.7-0.8; one waiting on a slow disk far less.
        self.busy_limit = busy_limit
        self.cpu_time = cpu_time
        self.remember = remember  # seconds a refused Call-ID is remembered (two generations of this)
        self.max_remembered = max_remembered  # per generation: memory stays bounded under any flood
        self.busy = 0.0  # smoothed share of a core used (the event loop is one thread)
        self.lag = 0.0  # smoothed longest wait of a tick (metrics, logs)
        self.max_lag = 0.0
        self.level = 0
        self.shed: dict[str, int] = {}
        self.kernel_drops = 0  # since start (metrics)
        self._last_wait = 0.0  # the wait of the datagram being handled now
        self._window = 0.0  # the longest wait seen since the last tick
        self._dropping = False  # the kernel dropped datagrams during this tick or the last
        self._dropped = 0  # datagrams dropped since the last tick
        self._dropped_total = 0  # the kernel's count (our socket is new at start), as last reported
        self._refused: set[bytes] = set()  # Call-IDs refused in this generation
        self._refused_before: set[bytes] = set()  # and in the one before
        self._generation_ends = 0.0
        self._refused_in_tick = 0  # 1: non-INVITE refused since the last tick, 2: an INVITE too
        self._calm_since = 0.0  # when the last refusal was
        self._cpu_at = cpu_time()
        self._expected = 0.0
        self._call = None

    @property
    def enabled(self) -> bool:
        return self.threshold > 0

    def start(self) -> None:
        if self.enabled and self._call is None:
            self._generation_ends = self.clock.seconds() + self.remember
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
        """One datagram's wait before it is handled (per datagram: keep it cheap)."""
        self._last_wait = seconds
        if seconds > self._window:
            self._window = seconds

    def kernel_dropped(self, total: int) -> None:
        """The socket's count of datagrams dropped on a full queue changed (cumulative, 32 bits)."""
        new = (total - self._dropped_total) % 2**32
        self._dropped += new
        self.kernel_drops += new
        self._dropped_total = total
        if new:
            self._dropping = True  # at once: the datagrams behind this one are being lost now

    def _tick(self) -> None:
        now = self.clock.seconds()
        elapsed = now - self._expected + self.interval
        busy = (self.cpu_time() - self._cpu_at) / elapsed if elapsed > 0 else 0.0
        late = max(0.0, now - self._expected, self._window)
        self._dropping = self._dropped > 0  # none since the last tick: calm again
        self._window = 0.0
        self._dropped = 0
        self.max_lag = max(self.max_lag, late)
        self.lag = self.smoothing * late + (1 - self.smoothing) * self.lag
        self.busy = self.smoothing * busy + (1 - self.smoothing) * self.busy
        if now >= self._generation_ends:
            self._refused_before, self._refused = self._refused, set()
            self._generation_ends = now + self.remember
        refused, self._refused_in_tick = self._refused_in_tick, 0
        if refused:
            self._calm_since = now
        elif self.level and now - self._calm_since < _CALM:
            refused = self.level  # not calm for long enough yet: one overload, one log line
        self._set_level(refused)
        self._schedule()

    def _set_level(self, level: int) -> None:
        if level == self.level:
            return
        if level > self.level:
            log.warn("Overloaded (new requests wait {lag:.0f} ms): refusing new {what} with 503",
                     lag=self.lag * 1000, what="INVITEs and other requests" if level == 2 else "REGISTERs and others")
        elif level == 0:
            log.info("No longer overloaded: refused {shed} so far", shed=dict(self.shed))
        self.level = level

    def _pressed(self, limit: float) -> bool:
        """Has the datagram in hand waited past `limit` while this process is busy?"""
        wait = self._last_wait
        return (wait >= limit or (self._dropping and wait >= limit / 2)) and self.busy >= self.busy_limit

    # -- decisions ------------------------------------------------------------

    def screen(self, data: bytes, known_branch, new_tag, server: str = "") -> bytes | None:
        """Before parsing: None to handle this datagram, b"" to drop it, or the 503 to send back.

        `known_branch(branch)`: does a server transaction with this Via branch
        exist (a retransmission is never refused)? `new_tag()`: the 503's To tag.
        Anything unusual (folded or
        missing lines) returns None: the normal path decides.
        """
        if self._last_wait < self.threshold / 2 and not self._refused and not self._refused_before:
            return None  # the common case: on time, nothing to remember
        if data.startswith(_FOLLOWERS):
            if self._refused or self._refused_before:
                found = _CALL_ID.search(data)
                if found is not None:
                    call_id = found.group(1).strip()
                    if call_id in self._refused or call_id in self._refused_before:
                        self._count("after_refusal")
                        return b""
            return None
        if data.startswith(b"SIP/"):
            return None
        invite = data.startswith(b"INVITE ")
        limit = self.invite_threshold if invite else self.threshold
        if not self._pressed(limit):
            return None
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        end += 2
        if data.find(b"\r\n ", 0, end) >= 0 or data.find(b"\r\n\t", 0, end) >= 0 \
                or _CREDENTIALS.search(data, 0, end):
            return None  # folded lines are the parser's; credentials are work half done
        if self._last_wait >= _HOPELESS * limit:
            # So far behind (or the kernel dropping) that even answering costs what we do not have.
            if invite or not data.startswith(b"REGISTER "):
                to = _TO_LINE.search(data, 0, end)
                if to is None or _TAG.search(to.group(1)):
                    return None
            self._refused_in_tick = max(self._refused_in_tick, 2 if invite else 1)
            self._count("dropped")
            return b""
        out = [b"SIP/2.0 503 Service Unavailable"]
        seen = 0
        call_id = None
        for name, value in _COPIED_LINES.findall(data, 0, end):
            canonical = _COPIED.get(name) or _COPIED[name.lower()]
            seen |= _BIT[canonical]
            value = value.rstrip()
            if canonical is _TO:
                if b"tag" in value.lower() and _TAG.search(value):
                    return None  # in a dialog
                value += b";tag=" + new_tag().encode()
            elif canonical is _VIA and len(out) == 1:
                branch = _BRANCH.search(value)
                if branch is not None and known_branch(branch.group(1).decode("ascii", "replace")):
                    return None  # a retransmission: its transaction answers it
            elif canonical is _CALL_ID_NAME:
                call_id = value
            out.append(canonical + b": " + value)
        if seen != _ALL_COPIED:
            return None  # a mandatory line missing: the parser says which
        out.append(self._retry_after_lines[self._random.randrange(len(self._retry_after_lines))])
        if server:
            out.append(b"Server: " + server.encode())
        out.append(b"Content-Length: 0\r\n\r\n")
        if len(self._refused) < self.max_remembered:
            self._refused.add(call_id)
        self._refused_in_tick = max(self._refused_in_tick, 2 if invite else 1)
        self._count("invite" if invite else "register" if data.startswith(b"REGISTER ") else "other")
        return b"\r\n".join(out)

    def sheds(self, request) -> bool:
        """After parsing (TCP, or a datagram `screen` left alone): is this new request to be answered 503?"""
        method = request.method
        invite = method == "INVITE"
        if not self._pressed(self.invite_threshold if invite else self.threshold):
            return False  # first: the common case, and every datagram `screen` found on time comes here too
        if method in ("ACK", "CANCEL", "BYE") or request.to.tag or _has_credentials(request):
            return False
        self._refused_in_tick = max(self._refused_in_tick, 2 if invite else 1)
        self._count("invite" if invite else "register" if method == "REGISTER" else "other")
        return True

    def retry_after_value(self) -> str:
        """Seconds for Retry-After, spread so the refused phones do not return together."""
        return str(self.retry_after + self._random.randrange(max(1, self.retry_after) + 1))

    def _count(self, what: str) -> None:
        self.shed[what] = self.shed.get(what, 0) + 1

    def counters(self) -> dict:
        return {"lag_seconds": self.lag, "max_lag_seconds": self.max_lag, "level": self.level, "busy": self.busy,
                "shed": dict(self.shed), "kernel_drops": self.kernel_drops,
                "remembered": len(self._refused) + len(self._refused_before)}


def _has_credentials(request) -> bool:
    headers = request.headers
    return headers.get("authorization") is not None or headers.get("proxy-authorization") is not None
