"""Timers that all share a few fixed durations, kept as FIFO queues: one `callLater` per duration, not per timer.

Most transaction timers are one of a handful of lengths (64*T1 for J, L, M and
U; T4 for I and K; 32 s for D). Timers of one length expire in the order they
were started, so a deque per length, with the next deadline of each deque on
the clock, does what a `callLater` per transaction did, at a fraction of the
memory and none of the garbage: tens of thousands of transactions linger at
a few hundred calls per second, and a `DelayedCall` with its bound methods is
half a dozen objects the cyclic collector scans on every full collection.

Cancelling marks the entry dead; it is dropped when it reaches the front.
"""

from collections import deque

from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Deadline:
    """One pending timer: `cancel()` it, or let it fire."""

    __slots__ = ("at", "fn", "arg")

    def __init__(self, at: float, fn, arg):
        self.at = at
        self.fn = fn
        self.arg = arg

    def cancel(self) -> None:
        self.fn = None
        self.arg = None

    @property
    def active(self) -> bool:
        return self.fn is not None


class Deadlines:
    def __init__(self, clock: IReactorTime):
        self.clock = clock
        self._queues: dict[float, deque[Deadline]] = {}
        self._calls: dict[float, IDelayedCall] = {}

    def pending(self) -> int:
        """Timers not yet fired nor cancelled (counts them: for tests and inspection, not the hot path)."""
        return sum(1 for q in self._queues.values() for d in q if d.fn is not None)

    def add(self, seconds: float, fn, arg=None) -> Deadline:
        """Call fn(arg) in `seconds` (never earlier). Durations should be few: one queue exists per value."""
        deadline = Deadline(self.clock.seconds() + seconds, fn, arg)
        queue = self._queues.get(seconds)
        if queue is None:
            queue = self._queues[seconds] = deque()
        queue.append(deadline)
        if seconds not in self._calls:
            self._calls[seconds] = self.clock.callLater(seconds, self._expire, seconds)
        return deadline

    def _expire(self, seconds: float) -> None:
        del self._calls[seconds]
        queue = self._queues[seconds]
        now = self.clock.seconds()
        while queue and queue[0].at <= now:
            deadline = queue.popleft()
            fn = deadline.fn
            if fn is not None:
                deadline.fn = None
                fn(deadline.arg)
        while queue and queue[0].fn is None:
            queue.popleft()
        if not queue:
            del self._queues[seconds]
        elif seconds not in self._calls:  # (a timer that fired may have started another of its length)
            self._calls[seconds] = self.clock.callLater(max(0.0, queue[0].at - now), self._expire, seconds)

    def stop(self) -> None:
        """Cancel everything (shutdown)."""
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        self._queues.clear()
