"""Runtime tracing: every SIP message of one user, address or Call-ID in the log, for N minutes.

`sipproxy-admin trace --user 1001 --minutes 5` (POST /api/trace) switches it
on without a restart or a debug log for everything; the server logs each
matching message, in and out, with its peer. Authorization headers are
masked and bodies are not logged (their length is). With no trace running
the per-message cost is one comparison.
"""

import re

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

_CREDENTIALS = re.compile(rb"^((?:proxy-)?authorization[ \t]*:).*$", re.IGNORECASE | re.MULTILINE)


@attrs.frozen
class TraceFilter:
    user: str = ""
    address: str = ""
    call_id: str = ""

    def describe(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in (("user", self.user), ("address", self.address),
                                                 ("Call-ID", self.call_id)) if v)


class Tracer:
    """With workers (proxy/workers/), the primary's tracer is the one the admin API drives; `on_change`
    passes each start and stop to the workers' tracers (`follow`), whose lines reach the same log."""

    def __init__(self, clock: IReactorTime):
        self.clock = clock
        self.until = 0.0  # 0: off
        self.filter = TraceFilter()
        self.traced = 0
        self.on_change = None  # on_change(filter, until): the primary tells its workers

    @property
    def active(self) -> bool:
        return self.until != 0.0

    def start(self, trace_filter: TraceFilter, minutes: float) -> float:
        self.filter = trace_filter
        self.until = self.clock.seconds() + minutes * 60
        log.info("Tracing {what} until {minutes:g} minutes from now", what=trace_filter.describe(), minutes=minutes)
        if self.on_change is not None:
            self.on_change(trace_filter, self.until)
        return self.until

    def stop(self) -> None:
        if self.active:
            log.info("Tracing of {what} stopped ({count} messages)", what=self.filter.describe(), count=self.traced)
            if self.on_change is not None:
                self.on_change(self.filter, 0.0)
        self.until = 0.0

    def follow(self, trace_filter: TraceFilter, until: float) -> None:
        """What the primary's tracer does (a worker's tracer): no log line of its own."""
        self.filter = trace_filter
        self.until = until

    def saw(self, direction: str, data: bytes, host: str, port: int) -> None:
        """Called with every message in and out while a trace runs."""
        if self.clock.seconds() > self.until:
            self.stop()
            return
        f = self.filter
        if f.address and host != f.address:
            return
        if f.user and f"sip:{f.user}@".encode() not in data:
            return
        if f.call_id and f.call_id.encode("utf-8", "surrogateescape") not in data:
            return
        head, sep, body = data.partition(b"\r\n\r\n")
        head = _CREDENTIALS.sub(rb"\1 (masked)", head)
        self.traced += 1
        log.info("TRACE {direction} {host}:{port} ({size} body bytes)\n{text}", direction=direction, host=host,
                 port=port, size=len(body), text=head.decode("utf-8", "replace"))


class RuntimeVerbosity:
    """`sipproxy-admin log-level debug --minutes N`: the per-message decision lines of `[server] debug`
    (what each request was and where it went) for N minutes, without a restart; `info` ends it.

    `components` are the objects with a `debug` flag (the SipServer, the Router). With workers the
    primary's `on_change` passes it on, and each worker `follow`s.
    """

    def __init__(self, clock: IReactorTime, components, configured: bool = False):
        self.clock = clock
        self.components = tuple(components)
        self.configured = configured  # [server] debug: where it returns when the minutes are over
        self.until = 0.0
        self.on_change = None  # on_change(debug, until)
        self._call = None

    @property
    def level(self) -> str:
        return "debug" if self.components and self.components[0].debug else "info"

    def set(self, level: str, minutes: float = 10.0) -> float:
        """`debug` for `minutes` (returns until when), or `info` (returns 0)."""
        if level == "debug":
            self.follow(True, self.clock.seconds() + minutes * 60)
            log.info("Log level debug for {minutes:g} minutes ([server] debug: {configured})", minutes=minutes,
                     configured=self.configured)
        else:
            self.follow(self.configured, 0.0)
            log.info("Log level back to {verbosity}", verbosity="debug" if self.configured else "info")
        if self.on_change is not None:
            self.on_change(level == "debug", self.until)
        return self.until

    def follow(self, debug: bool, until: float) -> None:
        """Apply a level (a worker: what the primary set), back to the configured one at `until`."""
        for component in self.components:
            component.debug = debug
        self.until = until
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        if until:
            self._call = self.clock.callLater(max(0.0, until - self.clock.seconds()), self.follow,
                                              self.configured, 0.0)
