"""Forwarding settings in Redis, for every node (`[location] backend = "redis"`).

One hash, `<prefix>forwarding`: user -> the settings as JSON. Every process
keeps all of them in memory (a few per user at most, read on every INVITE),
changed by its own writes and by the changes the others publish
(proxy/redis/store.py); after a reconnection it reads the hash back. A change
while Redis is down is refused with a reason (ForwardingError), never kept
only here.
"""

import json
import os

import attrs
from twisted.internet import defer

from proxy.routing.forwarding import ForwardingError, ForwardSettings, check_settings

KIND = "forwarding"


def forwarding_key(prefix: str) -> str:
    return prefix + "forwarding"


class RedisForwardingStore:
    """The same methods as `ForwardingStore` (get, all, put, update, close)."""

    def __init__(self, store):
        self.store = store
        self.key = forwarding_key(store.prefix)
        self._settings: dict[str, ForwardSettings] = {}
        store.handlers[KIND] = self._peer_change
        store.resync_handlers.append(self.resync)

    def close(self) -> None:
        pass

    def get(self, user: str) -> ForwardSettings:
        return self._settings.get(user) or ForwardSettings(user=user)

    def all(self) -> list[ForwardSettings]:
        return [self._settings[user] for user in sorted(self._settings)]

    def put(self, settings: ForwardSettings) -> None:
        check_settings(settings)
        if not self.store.writable:
            raise ForwardingError("the shared store (Redis) is unavailable; nothing was changed, try again")
        if settings.is_empty():
            self._settings.pop(settings.user, None)
            self.store.write(KIND, {"user": settings.user}, ("HDEL", self.key, settings.user))
            return
        self._settings[settings.user] = settings
        value = settings.as_json()
        self.store.write(KIND, value, ("HSET", self.key, settings.user, json.dumps(value)))

    def update(self, user: str, **changes) -> ForwardSettings:
        settings = attrs.evolve(self.get(user), **changes)
        self.put(settings)
        return settings

    def _peer_change(self, payload: dict) -> None:
        settings = ForwardSettings(**payload)
        if settings.is_empty():
            self._settings.pop(settings.user, None)
        else:
            self._settings[settings.user] = settings

    @defer.inlineCallbacks
    def resync(self):
        values = yield self.store.commands.execute("HGETALL", self.key)
        settings = {}
        for user, value in zip(values[::2], values[1::2]):
            try:
                settings[user.decode()] = ForwardSettings(**json.loads(value))
            except (ValueError, TypeError):
                continue
        self._settings = settings


class BlockingForwardingStore:
    """The same methods for `sipproxy-admin` (proxy/redis/blocking.py): writes Redis and tells the running nodes."""

    def __init__(self, config):
        from proxy.redis.blocking import BlockingRedis

        self.redis = BlockingRedis(config)
        self.key = forwarding_key(config.prefix)
        self.channel = config.prefix + "changes"

    def close(self) -> None:
        self.redis.close()

    def get(self, user: str) -> ForwardSettings:
        value = self.redis.execute("HGET", self.key, user)
        return ForwardSettings(**json.loads(value)) if value else ForwardSettings(user=user)

    def all(self) -> list[ForwardSettings]:
        values = self.redis.execute("HGETALL", self.key)
        found = [ForwardSettings(**json.loads(v)) for v in values[1::2]]
        return sorted(found, key=lambda s: s.user)

    def put(self, settings: ForwardSettings) -> None:
        check_settings(settings)
        if settings.is_empty():
            self.redis.execute("HDEL", self.key, settings.user)
            payload = {"user": settings.user}
        else:
            payload = settings.as_json()
            self.redis.execute("HSET", self.key, settings.user, json.dumps(payload))
        self.redis.execute("PUBLISH", self.channel, json.dumps([f"admin/{os.getpid()}", KIND, payload]))

    def update(self, user: str, **changes) -> ForwardSettings:
        settings = attrs.evolve(self.get(user), **changes)
        self.put(settings)
        return settings
