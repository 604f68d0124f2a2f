"""The site's shared state in Redis: one process's two connections, its writes, and the change channel.

Every process (each worker of each node) has a command connection and a
subscriber. A change is written (`SET`/`DEL`/`HSET`...) and published on
`<prefix>changes` in the same pipeline; every other process applies the
published change to its in-memory copy, so reads never wait on Redis.

Writes are grouped per turn of the event loop (`Batch`): whoever must know
that a change is stored (the registrar, before its 200) asks `stored()` and
gets a Deferred that fires when Redis has acknowledged every write of the turn
(and, with `wait_replicas`, when that many replicas have them: one `WAIT` per
turn, not per REGISTER). The primary is asked every second how many replicas
it has: with fewer connected than `wait_replicas`, the turn waits for those
there are (none: the primary's acknowledgement alone), logged once and counted
as `degraded`, so a lost replica does not stop registrations; a binding taken
in that state is lost if the primary dies before a replica has copied it.

When the subscriber (re)connects, whatever was published meanwhile is lost to
it: the `on_resync` handlers then read the whole state back from Redis.
"""

import json
import os
import re

from twisted.internet import defer
from twisted.logger import Logger

from proxy.periodic import Every
from proxy.redis.client import RedisClient, RedisUnavailable
from proxy.redis.resp import ReplyError

log = Logger()


class Batch:
    """The writes of one turn, sent together at its end; `waiter()` Deferreds fire once they are acknowledged."""

    def __init__(self):
        self.commands: list[tuple] = []
        self.waiters: list[defer.Deferred] = []

    def waiter(self) -> defer.Deferred:
        d = defer.Deferred()
        self.waiters.append(d)
        return d


class RedisStore:
    def __init__(self, reactor, config, node: str, trust_root=None, quiet: bool = False, origin: str = ""):
        """`config`: proxy/config.py `LocationConfig`; `quiet`: a worker (its primary logs each outage once);
        `origin`: this store's name on the channel (default node/pid; several stores in one process need their own)."""
        self.reactor = reactor
        self.prefix = config.prefix
        self.channel = config.prefix + "changes"
        self.origin = origin or f"{node}/{os.getpid()}"  # its own messages come back and are ignored
        self._origin_json = json.dumps(self.origin)  # the head of every message it publishes
        self.wait_replicas = config.wait_replicas
        self.wait_ms = max(1, int(config.timeout * 1000 / 2))
        common = dict(urls=config.urls, sentinels=config.sentinels, service=config.service, password=config.password,
                      timeout=config.timeout, max_pending=config.max_pending, trust_root=trust_root)
        self.commands = RedisClient(reactor, name="Redis", quiet=quiet, **common)
        self.subscriber = RedisClient(reactor, name="Redis subscriber", subscribe=(self.channel,),
                                      on_message=self._message, quiet=True, **common)
        # A resync reads through the command connection, after the subscriber is in place (so nothing
        # published after the read is missed): whichever of the two comes up last starts it.
        self._resync_due = False
        self.subscriber.on_ready.append(self._subscribed)
        self.commands.on_ready.append(self._commands_ready)
        self.handlers: dict[str, object] = {}  # kind -> handler(payload)
        self.resync_handlers: list = []  # each returns a Deferred; run in order after a (re)connect
        self._batch: Batch | None = None
        self._syncing = False
        self._held: list = []  # messages that arrived during a resync, applied after it
        self.resyncs = 0
        self.write_failures = 0
        self.not_replicated = 0
        self.degraded = 0  # turns stored with fewer replicas than wait_replicas, because fewer were connected
        self.replicas = 0  # connected to the primary, as it last said
        self._degraded_logged = False
        self._replica_check = Every(reactor, 1.0, self._ask_replicas) if self.wait_replicas else None
        if self._replica_check is not None:
            self.commands.on_ready.append(self._ask_replicas)

    @property
    def writable(self) -> bool:
        return self.commands.connected

    def start(self) -> None:
        self.commands.start()
        self.subscriber.start()
        if self._replica_check is not None:
            self._replica_check.start()

    def stop(self) -> None:
        if self._replica_check is not None:
            self._replica_check.stop()
        self.commands.stop()
        self.subscriber.stop()

    def _ask_replicas(self) -> None:
        if not self.commands.connected:
            return
        d = self.commands.execute("INFO", "replication")
        d.addCallbacks(self._replicas_said, lambda _: None)

    def _replicas_said(self, info: bytes) -> None:
        found = re.search(rb"connected_slaves:(\d+)", info or b"")
        self.replicas = int(found.group(1)) if found else 0
        if self.replicas >= self.wait_replicas:
            if self._degraded_logged:
                log.info("Redis has {n} replica(s) again: every 200 waits for {want}", n=self.replicas,
                         want=self.wait_replicas)
            self._degraded_logged = False
        elif not self._degraded_logged:
            self._degraded_logged = True
            log.warn("Redis primary {where} has {n} replica(s) connected, wait_replicas is {want}: a binding is "
                     "answered once {n} have it (lost if the primary dies before a replica copies it)",
                     where=self.commands.where, n=self.replicas, want=self.wait_replicas)

    def counters(self) -> dict:
        return {"disconnected": int(not (self.commands.connected and self.subscriber.connected)),
                "outages": self.commands.outages, "failed_commands": self.commands.failed_commands,
                "write_failures": self.write_failures, "not_replicated": self.not_replicated,
                "degraded": self.degraded, "replicas": self.replicas,
                "resyncs": self.resyncs}

    # -- writing ----------------------------------------------------------

    def write(self, kind: str, payload, *commands: tuple, payload_json: str | None = None) -> None:
        """Run `commands` and publish (kind, payload) to the other processes, in this turn's pipeline.

        `payload_json`: the payload already as JSON (a binding's, also the value it stores)."""
        batch = self._batch
        if batch is None:
            batch = self._batch = Batch()
            self.reactor.callLater(0, self._flush, batch)
        batch.commands.extend(commands)
        if payload_json is None:
            payload_json = json.dumps(payload, separators=(",", ":"))
        batch.commands.append(("PUBLISH", self.channel, f'[{self._origin_json},"{kind}",{payload_json}]'))

    def stored(self) -> defer.Deferred | None:
        """None if nothing was written this turn; else fires when this turn's writes are stored."""
        if self._batch is None:
            return None
        return self._batch.waiter()

    def _flush(self, batch: Batch) -> None:
        if self._batch is batch:
            self._batch = None
        commands = batch.commands
        wanted = min(self.wait_replicas, self.replicas)
        if wanted < self.wait_replicas:
            self.degraded += 1
        if wanted:
            commands.append(("WAIT", wanted, self.wait_ms))
        done = self.commands.execute_many(commands)
        done.addCallbacks(self._flushed, self._not_flushed, (batch, wanted), errbackArgs=(batch,))

    def _not_flushed(self, failure, batch: Batch) -> None:
        self._flushed(None, batch, 0, failure.value)

    def _flushed(self, results, batch: Batch, wanted: int, error=None) -> None:
        if error is None:
            error = next((r for r in results if isinstance(r, ReplyError)), None)
        if error is None and wanted and results[-1] < wanted:
            self.not_replicated += 1
            error = RedisUnavailable(f"only {results[-1]} of {wanted} replicas acknowledged in time")
        if error is not None:
            self.write_failures += 1
            if not batch.waiters:
                log.warn("A change could not be stored in Redis: {error}", error=str(error))
        for waiter in batch.waiters:
            if error is None:
                waiter.callback(None)
            else:
                waiter.errback(error)

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

    def _subscribed(self) -> None:
        self._resync_due = True
        if self.commands.connected:
            self._resync()

    def _commands_ready(self) -> None:
        if self._resync_due and self.subscriber.connected:
            self._resync()

    @defer.inlineCallbacks
    def _resync(self):
        """Read everything back (messages that arrive meanwhile wait, then apply on top)."""
        if self._syncing:
            return
        self._syncing = True
        try:
            for handler in self.resync_handlers:
                yield handler()
            self.resyncs += 1
            self._resync_due = False
        except Exception as e:
            # Due still: the next (re)connection of the command connection tries again.
            log.warn("Resynchronising from Redis failed ({error}); trying again when it is back", error=str(e))
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
