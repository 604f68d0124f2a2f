"""Connections to Redis that fail fast and come back by themselves.

`RedisClient` sends commands on one pipelined connection; `execute()` returns
a Deferred. What the location service needs from it:

- Never a hang. With no usable connection (down, failing over, not yet up), a
  command fails at once with `RedisUnavailable`; a command Redis has not
  answered within `timeout` seconds drops the connection, which fails every
  command waiting on it. At most `max_pending` commands wait at once: past it,
  new ones fail at once (a stalled Redis cannot pile up the server's memory).
- Back by itself: reconnects with backoff (0.1 s doubling to 2 s, jittered, so
  a restarted Redis is not hit by every node in the same millisecond). An
  outage is logged once when it starts and once when it ends, and counted.
- Sentinel: with `sentinels`, each connection first asks them (in turn) where
  the primary of `service` is; whatever it connects to must say `ROLE` master,
  so a demoted primary that comes back as a replica is never written to.
- `subscribe` makes a connection in pub/sub mode instead: `on_message(channel,
  data)` per message, pinged every second so a silent partition is noticed.

`on_ready` callbacks run each time a connection becomes usable (a subscriber
resynchronises there: what was published while it was away is lost to it).
"""

import collections
import random
import urllib.parse

import attrs
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.logger import Logger

from proxy.periodic import Every
from proxy.redis.resp import ProtocolError, ReplyError, ReplyReader, encode

log = Logger()

_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 2.0
_PING_INTERVAL = 1.0


class RedisUnavailable(Exception):
    """No usable connection to Redis now: the reason says which (down, failing over, too slow, queue full)."""


@attrs.frozen
class RedisAddress:
    host: str
    port: int = 6379
    tls: bool = False
    password: str = ""
    db: int = 0
    path: str = ""  # a Unix socket (unix:///run/redis/redis.sock?db=0): a Redis on this host

    @classmethod
    def parse(cls, url: str, password: str = "") -> "RedisAddress":
        """`redis://[:password@]host[:port][/db]`, `rediss://...` (TLS) or `unix:///path.sock[?db=N]`;
        ValueError says what is wrong."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "unix":
            if not parts.path.startswith("/"):
                raise ValueError(f"{url!r}: a Unix socket needs an absolute path (unix:///run/redis/redis.sock)")
            query = urllib.parse.parse_qs(parts.query)
            db = query.get("db", ["0"])[0]
            if not db.isdigit():
                raise ValueError(f"{url!r}: db must be a number")
            return cls(host="", port=0, path=parts.path, db=int(db),
                       password=query.get("password", [""])[0] or password)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{url!r}: must start with redis://, rediss:// or unix://")
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"{url!r}: bad port") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"{url!r}: the database must be a number (redis://host:6379/0)")
        return cls(host=parts.hostname, port=port, tls=parts.scheme == "rediss",
                   password=urllib.parse.unquote(parts.password or "") or password, db=int(path or 0))


class _RespProtocol(protocol.Protocol):
    """One connection: commands answered in order (a FIFO of Deferreds), or pub/sub pushes."""

    def __init__(self, clock):
        self.clock = clock
        self.reader = ReplyReader()
        # (deferred, sent_at, None) for one command; (deferred, sent_at, replies so far, count) for a group
        self.pending = collections.deque()
        self.on_push = None  # pub/sub: on_push(reply) for every message
        self.lost = defer.Deferred()
        self.replies = 0  # replies read so far (the watchdog's sign of life)

    def send(self, *args) -> defer.Deferred:
        d = defer.Deferred()
        self.pending.append((d, self.clock.seconds(), None))
        self.transport.write(encode(*args))
        return d

    def send_many(self, commands: list) -> defer.Deferred:
        """Several commands in one write; one Deferred for the list of their replies (errors as ReplyError)."""
        d = defer.Deferred()
        self.pending.append((d, self.clock.seconds(), [], len(commands)))
        self.transport.write(b"".join([encode(*command) for command in commands]))
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self.reader.feed(data)
        except ProtocolError as e:
            log.warn("Redis sent something that is not RESP ({error}); reconnecting", error=str(e))
            self.transport.abortConnection()
            return
        self.replies += len(replies)
        for reply in replies:
            if self.on_push is not None and isinstance(reply, list) and reply and reply[0] in (b"message", b"pmessage"):
                self.on_push(reply)
                continue
            if not self.pending:
                log.warn("Redis answered a command never sent; reconnecting")
                self.transport.abortConnection()
                return
            entry = self.pending[0]
            group = entry[2]
            if group is not None:
                group.append(reply)
                if len(group) < entry[3]:
                    continue
                self.pending.popleft()
                entry[0].callback(group)
                continue
            self.pending.popleft()
            if isinstance(reply, ReplyError):
                entry[0].errback(reply)
            else:
                entry[0].callback(reply)

    def oldest_wait(self, now: float) -> float:
        return now - self.pending[0][1] if self.pending else 0.0

    def connectionLost(self, reason=protocol.connectionDone) -> None:
        pending, self.pending = self.pending, collections.deque()
        for entry in pending:
            entry[0].errback(RedisUnavailable("the connection to Redis was lost"))
        self.lost.callback(None)


class RedisClient:
    """One connection to the Redis primary, kept up; `subscribe=(channels)` makes it a subscriber instead."""

    def __init__(self, reactor, *, urls=(), sentinels=(), service: str = "", password: str = "",
                 timeout: float = 0.5, max_pending: int = 10_000, trust_root=None, name: str = "Redis",
                 subscribe: tuple[str, ...] = (), on_message=None, rng: random.Random | None = None,
                 quiet: bool = False):
        """`quiet`: outages and reconnections are not logged (the subscriber, a worker's connections:
        the primary's command connection says the same, once), only counted."""
        if not urls and not sentinels:
            raise ValueError("need urls or sentinels")
        self.reactor = reactor
        self.addresses = [RedisAddress.parse(u, password) for u in urls]
        self.sentinels = [_host_port(s) for s in sentinels]
        self.service = service
        self.password = password
        self.timeout = timeout
        self.max_pending = max_pending
        self.trust_root = trust_root
        self.name = name
        self.channels = tuple(subscribe)
        self.quiet = quiet
        self.on_message = on_message
        self.on_ready: list = []  # callbacks, each time a connection becomes usable
        self.rng = rng or random.Random()
        self._protocol: _RespProtocol | None = None  # the usable connection, or None
        self._connecting = False
        self._stopped = True
        self._retry_call = None
        self._backoff = _BACKOFF_FIRST
        self._next_address = 0
        self._down_since: float | None = None  # an outage in progress (logged once)
        self.outages = 0
        self.failed_commands = 0
        self.where = ""  # host:port of the current primary, for the admin and the logs
        self._watchdog = Every(reactor, min(timeout / 2, _PING_INTERVAL), self._watch)
        self._suspect = None  # (connection, replies read) when a command was seen overdue
        self._ping_due = 0.0

    # -- life -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def start(self) -> None:
        self._stopped = False
        self._down_since = self.reactor.seconds()
        self._watchdog.start()
        self._connect()

    def stop(self) -> None:
        self._stopped = True
        self._watchdog.stop()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        if self._protocol is not None:
            self._protocol.transport.loseConnection()
            self._protocol = None

    # -- commands ---------------------------------------------------------

    def execute(self, *args) -> defer.Deferred:
        """Send one command; its reply (bytes, int, str, list or None), or a failure, soon."""
        proto = self._protocol
        if proto is None:
            self.failed_commands += 1
            return defer.fail(RedisUnavailable(f"{self.name} is not connected"))
        if len(proto.pending) >= self.max_pending:
            self.failed_commands += 1
            return defer.fail(RedisUnavailable(f"{self.name}: {self.max_pending} commands already waiting"))
        return proto.send(*args)

    def execute_many(self, commands: list) -> defer.Deferred:
        """Send several commands at once; the list of their replies (a failed one as a ReplyError in it)."""
        proto = self._protocol
        if proto is None:
            self.failed_commands += len(commands)
            return defer.fail(RedisUnavailable(f"{self.name} is not connected"))
        if len(proto.pending) >= self.max_pending:
            self.failed_commands += len(commands)
            return defer.fail(RedisUnavailable(f"{self.name}: {self.max_pending} commands already waiting"))
        return proto.send_many(commands)

    # -- connecting -------------------------------------------------------

    def _connect(self) -> None:
        if self._stopped or self._connecting or self._protocol is not None:
            return
        self._connecting = True
        d = self._find_primary()
        d.addCallback(self._open)
        d.addCallback(self._prepare)
        d.addCallbacks(self._ready, self._failed)

    def _endpoint(self, host: str, port: int, tls: bool = False, server_name: str = ""):
        endpoint = endpoints.HostnameEndpoint(self.reactor, host, port, timeout=max(1, int(self.timeout * 4)))
        if tls:
            trust = self.trust_root if self.trust_root is not None else ssl.platformTrust()
            endpoint = endpoints.wrapClientTLS(ssl.optionsForClientTLS(server_name or host, trustRoot=trust), endpoint)
        return endpoint

    def _dial(self, host: str, port: int, tls: bool = False, path: str = "") -> defer.Deferred:
        factory = protocol.Factory.forProtocol(lambda: _RespProtocol(self.reactor))
        factory.noisy = False
        if path:
            endpoint = endpoints.UNIXClientEndpoint(self.reactor, path, timeout=max(1, int(self.timeout * 4)))
        else:
            endpoint = self._endpoint(host, port, tls)
        d = endpoint.connect(factory)
        return _with_timeout(self.reactor, d, self.timeout * 4, f"connecting to {path or f'{host}:{port}'}")

    @defer.inlineCallbacks
    def _find_primary(self):
        """The address to connect to: from the sentinels (first that knows), else the next URL."""
        if not self.sentinels:
            address = self.addresses[self._next_address % len(self.addresses)]
            self._next_address += 1
            return address
        errors = []
        template = self.addresses[0] if self.addresses else RedisAddress(host="", password=self.password)
        for host, port in self.sentinels:
            try:
                proto = yield self._dial(host, port)
            except Exception as e:
                errors.append(f"sentinel {host}:{port}: {_reason(e)}")
                continue
            try:
                reply = yield _with_timeout(self.reactor, proto.send("SENTINEL", "get-master-addr-by-name",
                                                                     self.service), self.timeout, "sentinel")
            except Exception as e:
                errors.append(f"sentinel {host}:{port}: {_reason(e)}")
                continue
            finally:
                proto.transport.loseConnection()
            if isinstance(reply, list) and len(reply) == 2:
                return attrs.evolve(template, host=reply[0].decode(), port=int(reply[1]))
            errors.append(f"sentinel {host}:{port} does not know service {self.service!r}")
        raise RedisUnavailable("; ".join(errors))

    @defer.inlineCallbacks
    def _open(self, address: RedisAddress):
        proto = yield self._dial(address.host, address.port, address.tls, address.path)
        return address, proto

    @defer.inlineCallbacks
    def _prepare(self, opened):
        address, proto = opened
        try:
            if address.password:
                yield self._ask(proto, "AUTH", address.password)
            if address.db:
                yield self._ask(proto, "SELECT", address.db)
            role = yield self._ask(proto, "ROLE")
            if not role or role[0] != b"master":
                where = address.path or f"{address.host}:{address.port}"
                raise RedisUnavailable(f"{where} is a {role[0].decode() if role else '?'}, not the primary")
            if self.channels:
                proto.on_push = self._push
                for channel in self.channels:
                    yield self._ask(proto, "SUBSCRIBE", channel)
        except Exception:
            proto.transport.abortConnection()
            raise
        return address, proto

    def _ask(self, proto, *args) -> defer.Deferred:
        return _with_timeout(self.reactor, proto.send(*args), self.timeout * 4, args[0])

    def _ready(self, opened) -> None:
        address, proto = opened
        self._connecting = False
        if self._stopped:
            proto.transport.loseConnection()
            return
        self._protocol = proto
        self._backoff = _BACKOFF_FIRST
        self._logged_outage = False
        self.where = address.path or f"{address.host}:{address.port}"
        proto.lost.addCallback(lambda _: self._lost(proto))
        if self._down_since is not None:
            took = self.reactor.seconds() - self._down_since
            self._down_since = None
            if not self.quiet:
                log.info("{name}: connected to {where} ({took} s without)", name=self.name, where=self.where,
                         took=f"{took:.1f}")
        for callback in list(self.on_ready):
            try:
                callback()
            except Exception:
                log.failure("{name}: a connect callback failed", name=self.name)

    def _failed(self, failure) -> None:
        self._connecting = False
        if self._down_since is None:
            self._down_since = self.reactor.seconds()
        self._log_outage(_reason(failure.value))
        self._retry()

    def _lost(self, proto) -> None:
        if self._protocol is not proto:
            return
        self._protocol = None
        if self._stopped:
            return
        self._down_since = self.reactor.seconds()
        self._log_outage(f"the connection to {self.where} was lost")
        self._retry(first=True)

    _logged_outage = False

    def _log_outage(self, reason: str) -> None:
        if not self._logged_outage:
            self._logged_outage = True
            self.outages += 1
            if not self.quiet:
                log.warn("{name} unavailable: {reason}; retrying (logged once per outage)", name=self.name,
                         reason=reason)

    def _retry(self, first: bool = False) -> None:
        if self._stopped:
            return
        delay = 0.0 if first else self._backoff * self.rng.uniform(0.8, 1.2)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        self._retry_call = self.reactor.callLater(delay, self._connect)

    # -- watching ---------------------------------------------------------

    def _watch(self) -> None:
        """A command unanswered for `timeout`, with nothing read since the last look: the connection is
        stuck; drop it (every waiter fails).

        Two looks, because this runs before the reactor reads its sockets: after a stall of this process
        (a burst of work), the replies are waiting unread, and a live connection must not be taken for dead.
        """
        proto = self._protocol
        if proto is None:
            return
        now = self.reactor.seconds()
        if proto.oldest_wait(now) <= self.timeout:
            self._suspect = None
        elif self._suspect is None or self._suspect[0] is not proto or self._suspect[1] != proto.replies:
            self._suspect = (proto, proto.replies)  # look again after the reactor has read what is there
        else:
            self._suspect = None
            if not self.quiet:
                log.warn("{name}: no answer from {where} for {timeout} s; reconnecting", name=self.name,
                         where=self.where, timeout=self.timeout)
            proto.transport.abortConnection()
            return
        if self.channels and now >= self._ping_due:
            self._ping_due = now + _PING_INTERVAL
            proto.send("PING").addErrback(lambda _: None)

    def _push(self, reply) -> None:
        if self.on_message is None:
            return
        channel, data = reply[-2], reply[-1]
        try:
            self.on_message(channel.decode(), data)
        except Exception:
            log.failure("{name}: a message handler failed", name=self.name)


def _with_timeout(reactor, d: defer.Deferred, seconds: float, what: str) -> defer.Deferred:
    def expired(result, timeout):
        return defer.fail(RedisUnavailable(f"{what}: no answer within {timeout:g} s"))

    return d.addTimeout(seconds, reactor, onTimeoutCancel=expired)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r}: must be host:port")
    return host.strip("[]"), int(port)


def _reason(error) -> str:
    if isinstance(error, RedisUnavailable):
        return str(error)
    text = str(error) or type(error).__name__
    return text.split("\n")[0]
