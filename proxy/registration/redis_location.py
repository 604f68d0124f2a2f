"""Bindings in Redis, shared by every node of a site (`[location] backend = "redis"`, docs/scaling.md).

Each process keeps every binding in memory (`BindingIndex`): a call's lookup
is a dict read, as with SQLite, and calls to phones it knows still go
through while Redis is down. Why a local copy and not a Redis read per call:
a lookup in the index costs about a microsecond; a Redis round trip costs a
loopback RTT plus the client's work (tens of microseconds, measured in
docs/scaling.md), and would make every call fail while Redis is away.

- A binding is one key, `<prefix>b:<aor> <contact>`, holding the binding as a
  JSON array, with a TTL to its expiry (Redis forgets it when the phone stops
  refreshing, as the sweep does here). Saved and removed with the change
  published on the channel in the same pipeline (proxy/redis/store.py).
- The registrar answers 200 only when Redis has acknowledged the turn's
  writes (`stored()`); with Redis down it answers 503 with Retry-After before
  changing anything (`writable`).
- After a (re)connection of the subscriber the index is read back from Redis
  (SCAN): what changed while this process was away is caught up, and a change
  that was never stored (its REGISTER got 503) goes.
"""

import json

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from proxy.registration.location import Binding, BindingIndex, ILocationService, binding_row

log = Logger()

KIND = "binding"


@implementer(ILocationService)
class RedisLocationService(BindingIndex):
    shared = True  # every process, worker or not, reads and writes Redis itself (no worker-link copies)

    def __init__(self, store, clock, node: str, sweep_interval: float = 10.0, primary: bool = True):
        """`store`: proxy/redis/store.py `RedisStore`, shared with the forwarding settings."""
        super().__init__(clock, sweep_interval, node)
        self.store = store
        self.primary = primary  # of its node: announces the node's expiries
        self.loaded = False
        # During a resync: the bindings this process changed meanwhile. Their writes went to Redis after
        # the SCAN, so the snapshot is older than what the index holds for them: the index is kept.
        self._resyncing: set | None = None
        store.handlers[KIND] = self._peer_change
        store.resync_handlers.append(self.resync)

    def start(self) -> None:
        super().start()
        self.store.start()

    def stop(self) -> None:
        super().stop()
        self.store.stop()

    @property
    def writable(self) -> bool:
        return self.store.writable

    def stored(self):
        return self.store.stored()

    def store_counters(self) -> dict:
        return self.store.counters()

    def _key(self, aor: str, contact: str) -> str:
        return f"{self.store.prefix}b:{aor} {contact}"

    def _store_save(self, binding: Binding) -> None:
        if self._resyncing is not None:
            self._resyncing.add((binding.aor, binding.contact))
        ttl = max(1, int((binding.expires_at - self.clock.seconds()) * 1000))
        fields = json.dumps(binding_row(binding), separators=(",", ":"))
        self.store.write(KIND, None, ("SET", self._key(binding.aor, binding.contact), fields, "PX", ttl),
                         payload_json=f'["saved",{fields}]')

    def _store_remove(self, aor: str, contact: str) -> None:
        if self._resyncing is not None:
            self._resyncing.add((aor, contact))
        binding = self._index.get(aor, {}).get(contact)
        if binding is None:
            return
        self.store.write(KIND, ["removed", binding_row(binding)], ("DEL", self._key(aor, contact)))

    def _announces_expiry(self, binding: Binding) -> bool:
        return self.primary and binding.node in ("", self.node)

    def _peer_change(self, payload) -> None:
        event, fields = payload
        binding = Binding(*fields)
        if event == "removed":
            self.apply_peer("removed", binding)
        elif binding.expires_at > self.clock.seconds():
            self.apply_peer("refreshed", binding)

    @defer.inlineCallbacks
    def resync(self):
        """Make the index what Redis holds (but for what this process changed while it read)."""
        self._resyncing = changed = set()
        try:
            rows = yield self.store.scan(f"{self.store.prefix}b:*")
        finally:
            self._resyncing = None
        now = self.clock.seconds()
        seen = set()
        for _key, value in rows:
            try:
                binding = Binding(*json.loads(value))
            except (ValueError, TypeError):
                log.warn("An unreadable binding in Redis: {value!r}", value=value[:200])
                continue
            key = (binding.aor, binding.contact)
            if binding.expires_at <= now or key in changed:
                continue
            seen.add(key)
            # Quietly: a catch-up is not a registration (SQLite's load at start tells no one either).
            self._index.setdefault(binding.aor, {})[binding.contact] = binding
            self._by_contact[binding.contact] = binding
        gone = [b for contacts in self._index.values() for b in contacts.values()
                if (b.aor, b.contact) not in seen and (b.aor, b.contact) not in changed]
        for binding in gone:
            self._unindex(binding.aor, binding.contact)
        if not self.loaded or gone:
            log.info("Bindings from Redis: {count} ({gone} dropped that Redis did not have)",
                     count=len(seen), gone=len(gone))
        self.loaded = True
