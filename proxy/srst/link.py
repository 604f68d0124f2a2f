"""The SRST link: each node serves its change log and pulls its peers' (HTTP, or HTTPS with `[srst] tls`).

- `GET /srst/changes?generation=G&since=N`: the changes after N, or
  `{"resync": true}` when N is no longer in the log or G is not its
  generation; `GET /srst/snapshot`: everything, with the log position it
  matches. A puller asks for changes every `interval` seconds (0.5: a change is
  at the peer within a second) and for a snapshot when told to resync.
- Every request is signed: `X-SRST-Node`, `X-SRST-Time` and `X-SRST-Signature`
  = HMAC-SHA256(secret, node, time, path). A request with a wrong signature or
  a time more than 60 s off is refused (403), counted, and logged at most once
  a minute; the link is never open. The secret is a file both sides have.
- `PeerLink.status()` is what `sipproxy-admin peers` shows: up (caught up),
  catching up (a snapshot or a backlog being applied), down (the last pull
  failed: why), the lag since the last successful pull, how far behind.
"""

import hashlib
import hmac
import json
import urllib.parse

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, readBody
from twisted.web.client import _HTTP11ClientFactory
from twisted.web.http_headers import Headers

from proxy.srst.changelog import TooFarBehind

log = Logger()

MAX_SKEW = 60.0
_BACKOFF_MAX = 5.0


def signature(secret: bytes, node: str, stamp: str, path: str) -> str:
    return hmac.new(secret, f"{node}\n{stamp}\n{path}".encode("utf-8", "replace"), hashlib.sha256).hexdigest()


class SrstResource(resource.Resource):
    """The served side: /srst/changes and /srst/snapshot, for signed requests only."""

    isLeaf = True

    def __init__(self, clock, replicator, secret: bytes):
        super().__init__()
        self.clock = clock
        self.replicator = replicator
        self.secret = secret
        self.refused = 0
        self.served = 0
        self._last_refusal_log = -MAX_SKEW

    def _authentic(self, request) -> bool:
        node = (request.getHeader(b"x-srst-node") or b"").decode("utf-8", "replace")
        stamp = (request.getHeader(b"x-srst-time") or b"").decode("ascii", "replace")
        given = (request.getHeader(b"x-srst-signature") or b"").decode("ascii", "replace")
        try:
            fresh = abs(float(stamp) - self.clock.seconds()) <= MAX_SKEW
        except ValueError:
            fresh = False
        path = request.uri.decode("utf-8", "replace")
        expected = signature(self.secret, node, stamp, path)
        return fresh and bool(node) and hmac.compare_digest(given.encode(), expected.encode())

    def render_GET(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if not self._authentic(request):
            self.refused += 1
            now = self.clock.seconds()
            if now - self._last_refusal_log >= 60:
                self._last_refusal_log = now
                peer = request.getClientAddress()
                log.warn("SRST request from {host} refused: wrong secret or clock more than 60 s off "
                         "(logged once a minute)", host=getattr(peer, "host", "?"))
            request.setResponseCode(403)
            return b'{"error": "refused: wrong secret or clock"}\n'
        self.served += 1
        path = request.path.decode("utf-8", "replace").rstrip("/")
        if path == "/srst/snapshot":
            return _json(self.replicator.snapshot())
        if path == "/srst/changes":
            args = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
            log_ = self.replicator.log
            try:
                seq, changes = log_.since(args.get("generation", ""), int(args.get("since", "-1")))
            except (TooFarBehind, ValueError):
                return _json({"resync": True, "generation": log_.generation, "seq": log_.seq})
            return _json({"generation": log_.generation, "seq": seq, "head": log_.seq, "changes": changes})
        request.setResponseCode(404)
        return b'{"error": "use /srst/changes or /srst/snapshot"}\n'


def _json(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class PeerLink:
    """Pulls one peer's changes into the replicator, every `interval` seconds."""

    def __init__(self, reactor, peer: str, *, replicator, secret: bytes, node: str, tls: bool = False,
                 trust_root=None, interval: float = 0.5, timeout: float = 10.0):
        self.reactor = reactor
        self.peer = peer
        self.base = f"{'https' if tls else 'http'}://{peer}"
        self.replicator = replicator
        self.secret = secret
        self.node = node
        self.interval = interval
        self.timeout = timeout
        # One kept-alive connection, reused by every pull (no connection, and no log line, per pull).
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 1
        self.pool._factory = _QuietClientFactory
        self.agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
                           connectTimeout=timeout, pool=self.pool)  # (the policy serves https:// only)
        self.generation = ""
        self.seq = -1  # the last of the peer's changes applied here; -1: never synchronised
        self.head = 0  # the peer's last change, as it last said
        self.peer_node = ""
        self.state = "down"
        self.last_ok: float | None = None
        self.last_error = "not contacted yet"
        self.applied = 0
        self.resyncs = 0
        self._call = None
        self._running = False
        self._backoff = interval
        self._logged_down = False

    def start(self) -> None:
        self._running = True
        self._call = self.reactor.callLater(0, self._tick)

    def stop(self) -> None:
        self._running = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self.pool.closeCachedConnections()

    def status(self) -> dict:
        now = self.reactor.seconds()
        return {"peer": self.peer, "node": self.peer_node, "state": self.state,
                "lag_seconds": None if self.last_ok is None else round(now - self.last_ok, 1),
                "behind": max(0, self.head - self.seq) if self.seq >= 0 else None, "applied": self.applied,
                "resyncs": self.resyncs, "last_error": self.last_error if self.state == "down" else ""}

    @defer.inlineCallbacks
    def _get(self, path: str):
        stamp = f"{self.reactor.seconds():.3f}"
        headers = Headers({b"X-SRST-Node": [self.node.encode()], b"X-SRST-Time": [stamp.encode()],
                           b"X-SRST-Signature": [signature(self.secret, self.node, stamp, path).encode()]})
        d = self.agent.request(b"GET", (self.base + path).encode(), headers)
        d.addTimeout(self.timeout, self.reactor)
        response = yield d
        body = yield readBody(response).addTimeout(self.timeout, self.reactor)
        if response.code == 403:
            raise _LinkError("refused by the peer: the secrets differ (or the clocks, by more than 60 s)")
        if response.code != 200:
            raise _LinkError(f"HTTP {response.code} from the peer")
        return json.loads(body)

    @defer.inlineCallbacks
    def _pull(self):
        if self.seq < 0:
            yield self._resync()
            return
        query = urllib.parse.urlencode({"generation": self.generation, "since": self.seq})
        answer = yield self._get(f"/srst/changes?{query}")
        if answer.get("resync"):
            yield self._resync()
            return
        for change in answer["changes"]:
            self.replicator.apply(change)
        self.applied += len(answer["changes"])
        self.seq, self.head = answer["seq"], answer["head"]
        self.state = "up" if self.seq >= self.head else "catching up"

    @defer.inlineCallbacks
    def _resync(self):
        self.state = "catching up"
        snapshot = yield self._get("/srst/snapshot")
        self.replicator.apply_snapshot(snapshot)
        self.resyncs += 1
        self.generation, self.seq, self.head = snapshot["generation"], snapshot["seq"], snapshot["seq"]
        self.peer_node = snapshot["node"]
        self.applied += len(snapshot["bindings"])
        log.info("SRST: synchronised from {peer} (node {node}): {count} bindings", peer=self.peer,
                 node=self.peer_node, count=len(snapshot["bindings"]))
        self.state = "up"

    def _tick(self) -> None:
        d = self._pull()
        d.addCallbacks(self._pulled, self._failed)

    def _pulled(self, _) -> None:
        self.last_ok = self.reactor.seconds()
        self._backoff = self.interval
        if self._logged_down:
            self._logged_down = False
            log.info("SRST: {peer} reachable again", peer=self.peer)
        self._next(0 if self.state == "catching up" else self.interval)

    def _failed(self, failure) -> None:
        error = failure.value
        self.state = "down"
        self.last_error = str(error) if isinstance(error, _LinkError) else (
            f"{type(error).__name__}: {str(error) or 'no answer'}".split("\n")[0][:200])
        if not self._logged_down:
            self._logged_down = True
            log.warn("SRST: cannot pull from {peer}: {error} (logged once until it is back)", peer=self.peer,
                     error=self.last_error)
        self._next(self._backoff)
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)

    def _next(self, delay: float) -> None:
        if self._running:
            self._call = self.reactor.callLater(delay, self._tick)


class _LinkError(Exception):
    pass


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False
