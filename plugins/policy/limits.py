"""Calls in progress per user and per route, and costly calls per minute, counted across the worker processes.

The proxy keeps no dialogs (issue 17 will): a call counts from the moment the
router starts it (`call_started`, right after this plugin admitted it) until
it fails before an answer (`call_ended` unanswered), its BYE passes
(`call_bye`), or `max_call_seconds` pass. Every request of a call has its
Call-ID and so reaches the process that counted it; each process tells the
others its own totals (absolute numbers: a lost or repeated message heals
with the next), and a limit is checked against the sum. Two processes may
admit the last free call at the same moment: a limit can be passed by one
call per process, never more.
"""

from collections import Counter, deque

import attrs


@attrs.define
class _Call:
    keys: tuple
    started: float


class CallsInProgress:
    def __init__(self, clock, share, max_call_seconds: float):
        self.clock = clock
        self.share = share  # share(value): to the other processes
        self.max_call_seconds = max_call_seconds
        self.calls: dict[str, _Call] = {}  # Call-ID -> the keys it counts for (this process's calls)
        self.mine: Counter = Counter()  # key -> this process's calls
        self.peers: dict[int, dict] = {}  # sender -> {key: its calls}
        self._pending: tuple[str, tuple] | None = None
        self._swept = clock.seconds()

    def total(self, key) -> int:
        return self.mine[key] + sum(counts.get(key, 0) for counts in self.peers.values())

    def admitted(self, call_id: str, keys: tuple) -> None:
        """The policy let this INVITE through; it counts once the router starts it (`started`)."""
        self._pending = (call_id, keys)

    def started(self, call_id: str) -> None:
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != call_id or call_id in self.calls:
            return
        self.calls[call_id] = _Call(pending[1], self.clock.seconds())
        self._change(pending[1], +1)
        self._sweep()

    def ended(self, call_id: str) -> None:
        call = self.calls.pop(call_id, None)
        if call is not None:
            self._change(call.keys, -1)

    def _change(self, keys: tuple, delta: int) -> None:
        for key in keys:
            self.mine[key] += delta
            n = self.mine[key]
            if n <= 0:
                del self.mine[key]
            self.share(("calls", key, max(n, 0)))

    def _sweep(self) -> None:
        """Calls whose end we never saw stop counting after max_call_seconds (checked once a minute at most)."""
        now = self.clock.seconds()
        if now - self._swept < 60.0:
            return
        self._swept = now
        limit = now - self.max_call_seconds
        for call_id in [c for c, call in self.calls.items() if call.started < limit]:
            self.ended(call_id)

    def peer(self, value, sender: int) -> None:
        _, key, n = value
        counts = self.peers.setdefault(sender, {})
        if n:
            counts[key] = n
        else:
            counts.pop(key, None)

    def forget(self, sender: int) -> None:
        """A process that (re)started has no calls: what its predecessor counted is gone with it."""
        self.peers.pop(sender, None)

    def resend(self) -> None:
        for key, n in self.mine.items():
            self.share(("calls", key, n))


class CostlyCalls:
    """Calls per user to costly classes within the last minute, in every process."""

    WINDOW = 60.0

    def __init__(self, clock, share, max_users: int = 100_000):
        self.clock = clock
        self.share = share
        self.max_users = max_users
        self.times: dict[str, deque] = {}

    def count(self, user: str) -> int:
        times = self.times.get(user)
        if not times:
            return 0
        cutoff = self.clock.seconds() - self.WINDOW
        while times and times[0] <= cutoff:
            times.popleft()
        if not times:
            del self.times[user]
        return len(times)

    def record(self, user: str) -> None:
        now = self.clock.seconds()
        self._add(user, now)
        self.share(("costly", user, now))

    def peer(self, value, sender: int) -> None:
        _, user, at = value
        self._add(user, at)

    def _add(self, user: str, at: float) -> None:
        times = self.times.get(user)
        if times is None:
            if len(self.times) >= self.max_users:
                self._trim()
            times = self.times[user] = deque()
        times.append(at)

    def _trim(self) -> None:
        for user in list(self.times):
            self.count(user)
