"""The site's shared state in Redis: one process's two connections, its writes, and the change channel.

Every process (each worker of each node) has a command connection and a
subscriber. A change is written (`SET`/`DEL`/`HSET`...) and published on
`<prefix>changes` in the same pipeline; every other process applies the
published change to its in-memory copy, so reads never wait on Redis.

Writes are grouped per turn of the event loop (`Batch`): whoever must know
that a change is stored (the registrar, before its 200) asks `stored()` and
gets a Deferred that fires when Redis has acknowledged every write of the turn
(and, with `wait_replicas`, when that many replicas have them: one `WAIT` per
turn, not per REGISTER).

When the subscriber (re)connects, whatever was published meanwhile is lost to
it: the `on_resync` handlers then read the whole state back from Redis.
"""

import json
import os

from twisted.internet import defer
from twisted.logger import Logger

from proxy.redis.client import RedisClient, RedisUnavailable

log = Logger()


class Batch:
    """The writes of one turn; `waiter()` Deferreds fire once they are all acknowledged."""

    def __init__(self):
        self.writes: list[defer.Deferred] = []
        self.waiters: list[defer.Deferred] = []

    def waiter(self) -> defer.Deferred:
        d = defer.Deferred()
        self.waiters.append(d)
        return d


class RedisStore:
    def __init__(self, reactor, config, node: str, trust_root=None, wait_replicas: int | None = None):
        """`config`: proxy/config.py `LocationConfig`."""
        self.reactor = reactor
        self.prefix = config.prefix
        self.channel = config.prefix + "changes"
        self.node = node
        self.origin = f"{node}/{os.getpid()}"  # this process: its own messages come back and are ignored
        self.wait_replicas = config.wait_replicas if wait_replicas is None else wait_replicas
        self.wait_ms = max(1, int(config.timeout * 1000 / 2))
        common = dict(urls=config.urls, sentinels=config.sentinels, service=config.service, password=config.password,
                      timeout=config.timeout, max_pending=config.max_pending, trust_root=trust_root)
        self.commands = RedisClient(reactor, name="Redis", **common)
        self.subscriber = RedisClient(reactor, name="Redis subscriber", subscribe=(self.channel,),
                                      on_message=self._message, **common)
        self.subscriber.on_ready.append(self._resync)
        self.handlers: dict[str, object] = {}  # kind -> handler(payload)
        self.resync_handlers: list = []  # each returns a Deferred; run in order after a (re)connect
        self._batch: Batch | None = None
        self._syncing = False
        self._held: list = []  # messages that arrived during a resync, applied after it
        self.resyncs = 0
        self.write_failures = 0
        self.not_replicated = 0

    @property
    def writable(self) -> bool:
        return self.commands.connected

    def start(self) -> None:
        self.commands.start()
        self.subscriber.start()

    def stop(self) -> None:
        self.commands.stop()
        self.subscriber.stop()

    def counters(self) -> dict:
        return {"connected": int(self.commands.connected and self.subscriber.connected),
                "outages": self.commands.outages, "failed_commands": self.commands.failed_commands,
                "write_failures": self.write_failures, "not_replicated": self.not_replicated,
                "resyncs": self.resyncs}

    # -- writing ----------------------------------------------------------

    def write(self, kind: str, payload, *commands: tuple) -> None:
        """Run `commands` and publish (kind, payload) to the other processes, in one pipeline."""
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch()
            self.reactor.callLater(0, self._flush, batch)
        for command in commands:
            batch.writes.append(self.commands.execute(*command))
        message = json.dumps([self.origin, kind, payload], separators=(",", ":"))
        batch.writes.append(self.commands.execute("PUBLISH", self.channel, message))

    def stored(self) -> defer.Deferred | None:
        """None if nothing was written this turn; else fires when this turn's writes are stored."""
        if self._batch is None:
            return None
        return self._batch.waiter()

    def _flush(self, batch: Batch) -> None:
        if self._batch is batch:
            self._batch = None
        writes = list(batch.writes)
        if self.wait_replicas:
            writes.append(self.commands.execute("WAIT", self.wait_replicas, self.wait_ms))
        done = defer.DeferredList(writes, consumeErrors=True)
        done.addCallback(self._flushed, batch)

    def _flushed(self, results, batch: Batch) -> None:
        error = next((result.value for ok, result in results if not ok), None)
        if error is None and self.wait_replicas and results[-1][1] < self.wait_replicas:
            self.not_replicated += 1
            error = RedisUnavailable(f"only {results[-1][1]} of {self.wait_replicas} replicas acknowledged")
        if error is not None:
            self.write_failures += 1
            if not batch.waiters:
                log.warn("A change could not be stored in Redis: {error}", error=str(error))
        for waiter in batch.waiters:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error if isinstance(error, Exception) else RedisUnavailable(str(error)))

    # -- reading ----------------------------------------------------------

    def _message(self, channel: str, data: bytes) -> None:
        try:
            origin, kind, payload = json.loads(data)
        except (ValueError, TypeError):
            log.warn("Unreadable message on {channel}", channel=channel)
            return
        if origin == self.origin:
            return
        if self._syncing:
            self._held.append((kind, payload))
            return
        self._apply(kind, payload)

    def _apply(self, kind: str, payload) -> None:
        handler = self.handlers.get(kind)
        if handler is None:
            return
        try:
            handler(payload)
        except Exception:
            log.failure("Cannot apply a shared {kind} change", kind=kind)

    @defer.inlineCallbacks
    def _resync(self):
        """Read everything back (messages that arrive meanwhile wait, then apply on top)."""
        self._syncing = True
        try:
            for handler in self.resync_handlers:
                yield handler()
            self.resyncs += 1
        except Exception as e:
            log.warn("Resynchronising from Redis failed ({error}); retrying on the next connection",
                     error=str(e))
            self.subscriber.stop()
            self.subscriber.start()  # a fresh connection resyncs again
        finally:
            self._syncing = False
            held, self._held = self._held, []
            for kind, payload in held:
                self._apply(kind, payload)

    @defer.inlineCallbacks
    def scan(self, pattern: str, count: int = 1000):
        """Every (key, value) of string keys matching `pattern` (SCAN + MGET, `count` at a time)."""
        found = []
        cursor = b"0"
        while True:
            cursor, keys = yield self.commands.execute("SCAN", cursor, "MATCH", pattern, "COUNT", count)
            if keys:
                values = yield self.commands.execute("MGET", *keys)
                found.extend((k, v) for k, v in zip(keys, values) if v is not None)
            if cursor == b"0":
                return found
