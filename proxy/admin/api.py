"""The admin HTTP API: JSON over twisted.web, localhost by default, bearer token.

The token is created on first start in `<state_dir>/admin-token` (0600);
`sipproxy-admin` reads it from there, so whoever can read the state
directory can administer the server, and nobody else. Every request needs
`Authorization: Bearer <token>`; a missing or wrong token gets 401, compared
in constant time.

Routes:
  GET /api/health                  {"status": "ok", "version": ...}
  GET /api/registrations           every current binding
  DELETE /api/registrations/<aor>[?contact=URI]  remove the AoR's bindings (all, or that contact); the AoR is
                                   sip:user@domain or just the user -> {"aor": ..., "removed": n}
  GET /api/forwarding              everyone's forwarding settings
  GET|PUT|DELETE /api/forwarding/<user>   one user's (PUT a JSON object with any of
                                   always, busy, no_answer, no_answer_after, unavailable)
  GET /api/phones[?firmware=GLOB&model=7940&where=firmware<8.0]   one row per phone
  GET /api/gateways                the routes' gateways: up or down since when, failures in a row, calls
  POST|DELETE /api/trace           {"user"|"address"|"call_id": ..., "minutes": 5}: log matching messages
  GET|POST /api/log-level          {"level": "debug", "minutes": 10} or {"level": "info"}: a log line per
                                   request and routing decision for N minutes, in every process
  POST /api/reload                 re-read the config file: routes, emergency, trusted networks, reloadable
                                   plugins' tables -> what was reloaded and what needs a restart (also on SIGHUP)
  POST /api/reboot                 {"lines": [...], "phones": [...], "all": true, "firmware"/"model"/"where",
                                    "rate": 1, "wait": false, "timeout": 600, "dry_run": false,
                                    "push_dialplan": false} -> the job (202), 409 if a phone is busy in one
  GET /api/jobs[/<id>]             progress and results of reboot / push jobs
  GET /api/calls                   the calls in progress, in every worker: caller, callee, state, since when
"""

import hmac
import json
import secrets

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import resource, server

from proxy import __version__
from proxy.registration.location import Binding, ILocationService
from proxy.statedir import secret_file

log = Logger()

TOKEN_FILE = "admin-token"
METRICS_TOKEN_FILE = "metrics-token"  # read-only: /metrics and nothing else


def load_or_create_token(state_dir: str) -> str:
    return secret_file(state_dir, TOKEN_FILE, lambda: secrets.token_urlsafe(32).encode()).decode()


def load_or_create_metrics_token(state_dir: str) -> str:
    return secret_file(state_dir, METRICS_TOKEN_FILE, lambda: secrets.token_urlsafe(32).encode()).decode()


def binding_json(binding: Binding, now: float) -> dict:
    from proxy.registration.auth import mac_from_instance

    return {
        "aor": binding.aor,
        "contact": binding.contact,
        "expires_in": binding.expires_in(now),
        "q": binding.q,
        "source": f"{binding.source_host}:{binding.source_port}",
        "transport": binding.transport,
        "user_agent": binding.user_agent,
        "instance": binding.instance,
        "mac": mac_from_instance(binding.instance) if binding.instance else None,
        "call_id": binding.call_id,
        "registered_at": binding.registered_at,
        "node": binding.node,
    }


def _reachability(state) -> dict:
    """The phone keepalive's view of a binding: reachable (None: not asked yet) and the last round-trip time."""
    return {"reachable": None if state is None else state.reachable,
            "rtt_ms": None if state is None or state.rtt is None else round(state.rtt * 1000, 1)}


class _JsonResource(resource.Resource):
    isLeaf = True

    def __init__(self, api: "AdminApi", handler):
        super().__init__()
        self.api = api
        self.handler = handler

    def render(self, request):
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if not self.api.authorized(request):
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="sipproxy-admin"')
            return json.dumps({"error": "missing or wrong bearer token"}).encode()
        method = request.method.decode("ascii", "replace")
        result = self.handler(method, request)
        if not isinstance(result, defer.Deferred):
            return self._body(request, *result)

        def done(value):
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(self._body(request, *value))
                request.finish()

        result.addCallback(done)
        result.addErrback(lambda f: (log.failure("Admin API handler failed", f), done((500, {"error": "internal error"}))))
        return server.NOT_DONE_YET

    @staticmethod
    def _body(request, status: int, body) -> bytes:
        request.setResponseCode(status)
        return json.dumps(body, indent=1).encode() + b"\n"


class TokenGuard(resource.Resource):
    """Puts a plugin's admin resource behind the admin token (and, for GET and HEAD, the read-only token).

    Plugins never check tokens themselves: the admin site wraps everything it mounts.
    """

    def __init__(self, child, admin_token: bytes, read_token: bytes | None):
        super().__init__()
        self.child = child
        self.isLeaf = getattr(child, "isLeaf", False)
        self.admin_token = admin_token
        self.read_token = read_token

    def getChildWithDefault(self, path, request):
        if not self._allowed(request):
            return _Unauthorized()
        return self.child.getChildWithDefault(path, request)

    def render(self, request):
        if not self._allowed(request):
            return _Unauthorized().render(request)
        return self.child.render(request)

    def _allowed(self, request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        given = given.strip()
        # Both compared every time: the time taken does not say which one nearly matched.
        admin = hmac.compare_digest(given, self.admin_token)
        read = self.read_token is not None and hmac.compare_digest(given, self.read_token)
        if scheme.lower() != b"bearer":
            return False
        return admin or (read and request.method in (b"GET", b"HEAD"))


class _Unauthorized(resource.Resource):
    isLeaf = True

    def render(self, request):
        request.setResponseCode(401)
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="sipproxy-admin"')
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"error": "missing or wrong bearer token"}).encode()


class AdminApi(resource.Resource):
    """The /api tree. Handlers return (status, JSON-able body)."""

    def __init__(self, token: str, clock: IReactorTime, location: ILocationService, forwarding_store=None,
                 checksync=None, domain: str = "", *, checksync_rate: float = 1.0, checksync_wait: float = 600.0,
                 reachability=None, gateways=None, reload=None, tracer=None, verbosity=None, calls=None,
                 peers=None):
        self.peers = peers  # () -> [SRST peer states] (proxy/srst/link.py PeerLink.status), with [srst] role
        self.calls = calls  # () -> Deferred of [call dicts] (every process's calls in progress)
        self.tracer = tracer
        self.verbosity = verbosity  # proxy/trace.py RuntimeVerbosity
        self.reload = reload  # () -> {"reloaded": [...], "restart_needed": [...]} or {"error": ...}
        self.reachability = reachability  # binding -> Reachability | None, with the phone keepalive on
        self.gateways = gateways  # () -> [gateway states]
        super().__init__()
        self.checksync = checksync
        self.domain = domain
        self.checksync_rate = checksync_rate
        self.checksync_wait = checksync_wait
        self._token = token.encode()
        self.clock = clock
        self.location = location
        self.forwarding_store = forwarding_store
        api = resource.Resource()
        self.putChild(b"api", api)
        self.routes = api
        self.add_route("health", self._health)
        self.add_route("registrations", self._registrations)
        if forwarding_store is not None:
            self.add_route("forwarding", self._forwarding)
        self.add_route("phones", self._phones)
        self.add_route("gateways", self._gateways)
        self.add_route("reload", self._reload)
        self.add_route("trace", self._trace)
        self.add_route("log-level", self._log_level)
        if calls is not None:
            self.add_route("calls", self._calls)
        self.add_route("peers", self._peers)
        if checksync is not None:
            self.add_route("reboot", self._reboot)
            self.add_route("jobs", self._jobs)

    def mount_plugin_resource(self, path: bytes, child, read_token: str | None) -> None:
        """A plugin's admin resource at /<path>, behind the tokens (plugins never check tokens themselves)."""
        self.putChild(path, TokenGuard(child, self._token, read_token.encode() if read_token else None))

    def add_route(self, name: str, handler) -> None:
        """Mount `handler(method, request) -> (status, body)` at /api/<name>; the rest of the path is in request.postpath."""
        self.routes.putChild(name.encode(), _JsonResource(self, handler))

    def authorized(self, request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)

    def _calls(self, method, request):
        if method != "GET":
            return 405, {"error": "use GET"}
        d = self.calls()
        d.addCallback(lambda calls: (200, {"calls": sorted(calls, key=lambda c: c["started_at"])}))
        return d

    def _peers(self, method, request):
        if method != "GET":
            return 405, {"error": "use GET"}
        if self.peers is None:
            return 200, {"role": "", "peers": []}
        return 200, self.peers()

    def _health(self, method, request):
        return 200, {"status": "ok", "version": __version__}

    def _forwarding(self, method, request):
        from proxy.routing.forwarding import KINDS, ForwardingError

        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if not path:
            if method != "GET":
                return 405, {"error": "use GET, or /api/forwarding/<user>"}
            return 200, {"forwarding": [s.as_json() for s in self.forwarding_store.all()]}
        user = path[0]
        try:
            if method == "GET":
                return 200, self.forwarding_store.get(user).as_json()
            if method == "DELETE":
                return 200, self.forwarding_store.update(user, **{k: "" for k in KINDS}).as_json()
            if method == "PUT":
                try:
                    body = json.loads(request.content.read() or b"{}")
                except ValueError:
                    return 400, {"error": "the body must be JSON"}
                allowed = set(KINDS) | {"no_answer_after"}
                if not isinstance(body, dict) or set(body) - allowed:
                    return 400, {"error": f"keys must be among {sorted(allowed)}"}
                return 200, self.forwarding_store.update(user, **body).as_json()
        except (ForwardingError, TypeError) as e:
            return 400, {"error": str(e)}
        return 405, {"error": "use GET, PUT or DELETE"}

    def _phones(self, method, request):
        from proxy.admin.inventory import FilterError, matches, phones

        if method != "GET":
            return 405, {"error": "use GET"}
        args = {k.decode(): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items()}
        try:
            rows = [self._phone_row(p) for p in phones(self.location.all_bindings())
                    if matches(p, firmware=args.get("firmware"), model=args.get("model"), where=args.get("where"))]
        except FilterError as e:
            return 400, {"error": str(e)}
        return 200, {"phones": rows}

    def _reboot(self, method, request):
        from proxy.admin.checksync import JobConflict, SyncInfoError, bump_syncinfo
        from proxy.admin.inventory import FilterError, phones, select

        if method != "POST":
            return 405, {"error": "use POST"}
        try:
            body = json.loads(request.content.read() or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return 400, {"error": "the body must be a JSON object"}
        unknown = set(body) - {"lines", "phones", "all", "firmware", "model", "where", "rate", "wait", "timeout",
                               "dry_run", "push_dialplan"}
        if unknown:
            return 400, {"error": f"unknown keys: {sorted(unknown)}"}
        try:
            chosen, missing = select(phones(self.location.all_bindings()), lines=body.get("lines", ()),
                                     devices=body.get("phones", ()), everyone=bool(body.get("all")),
                                     firmware=body.get("firmware"), model=body.get("model"), where=body.get("where"),
                                     domain=self.domain)
        except FilterError as e:
            return 400, {"error": str(e)}
        if not chosen and not missing:
            return 400, {"error": "no phone matches: name lines, phones, all, or a filter"}
        push = bool(body.get("push_dialplan"))
        everyone = bool(body.get("all"))
        if body.get("dry_run"):
            planned = []
            if not push and self.checksync.tftp_root:
                try:
                    planned = bump_syncinfo(self.checksync.tftp_root, self.checksync.sync_images(chosen, everyone),
                                            write=False)
                except SyncInfoError as e:
                    return 409, {"error": str(e)}
            return 200, {"dry_run": True, "kind": "push-dialplan" if push else "reboot",
                         "syncinfo": None if push else f"{self.checksync.tftp_root or '(tftp_root not set)'}/syncinfo.xml",
                         # Every phone that reads one of these entries reboots on its next check-sync, not only
                         # the phones chosen here.
                         "syncinfo_changes": [{"version": v, "old": o, "new": n} for v, o, n in planned],
                         "phones": [{**p.as_json(), "notify": self.checksync.build_notify(p.notify_binding())
                                     .serialize().decode("utf-8", "replace")} for p in chosen],
                         "not_registered": missing}
        try:
            rate = float(body.get("rate", self.checksync_rate))
            if not 0.01 <= rate <= 100:
                raise ValueError
        except (TypeError, ValueError):
            return 400, {"error": "rate must be 0.01 to 100 per second"}
        try:
            job = self.checksync.start(chosen, missing, reboot=not push, rate=rate, wait=bool(body.get("wait")),
                                       everyone=everyone,
                                       wait_timeout=float(body.get("timeout", self.checksync_wait)))
        except JobConflict as e:
            return 409, {"error": str(e)}
        except SyncInfoError as e:
            return 500, {"error": str(e)}
        return 202, job.as_json()

    def _jobs(self, method, request):
        if method != "GET":
            return 405, {"error": "use GET"}
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if not path:
            return 200, {"jobs": [j.as_json() for j in self.checksync.jobs.values()]}
        job = self.checksync.jobs.get(int(path[0])) if path[0].isascii() and path[0].isdigit() else None
        if job is None:
            return 404, {"error": f"no job {path[0]}"}
        return 200, job.as_json()

    def _trace(self, method, request):
        from proxy.trace import TraceFilter

        if self.tracer is None:
            return 501, {"error": "this server cannot trace"}
        if method == "DELETE":
            self.tracer.stop()
            return 200, {"tracing": False}
        if method != "POST":
            return 405, {"error": "use POST (start) or DELETE (stop)"}
        try:
            body = json.loads(request.content.read() or b"{}")
            trace_filter = TraceFilter(user=str(body.get("user") or ""), address=str(body.get("address") or ""),
                                       call_id=str(body.get("call_id") or ""))
            minutes = float(body.get("minutes", 5))
        except (ValueError, TypeError, AttributeError):
            return 400, {"error": 'the body must be {"user"|"address"|"call_id": ..., "minutes": N}'}
        if not trace_filter.describe():
            return 400, {"error": "say what to trace: user, address or call_id"}
        if not 0 < minutes <= 60:
            return 400, {"error": "minutes must be more than 0 and at most 60"}
        return 200, {"tracing": trace_filter.describe(), "until": self.tracer.start(trace_filter, minutes)}

    def _log_level(self, method, request):
        if self.verbosity is None:
            return 501, {"error": "this server has no runtime log level"}
        if method == "GET":
            return 200, {"level": self.verbosity.level, "until": self.verbosity.until or None}
        if method != "POST":
            return 405, {"error": "use GET or POST"}
        try:
            body = json.loads(request.content.read() or b"{}")
            level = str(body.get("level", ""))
            minutes = float(body.get("minutes", 10))
        except (ValueError, TypeError, AttributeError):
            return 400, {"error": 'the body must be {"level": "debug"|"info", "minutes": N}'}
        if level not in ("debug", "info"):
            return 400, {"error": 'level must be "debug" or "info"'}
        if not 0 < minutes <= 60:
            return 400, {"error": "minutes must be more than 0 and at most 60"}
        until = self.verbosity.set(level, minutes)
        return 200, {"level": self.verbosity.level, "until": until or None}

    def _reload(self, method, request):
        if method != "POST":
            return 405, {"error": "use POST"}
        if self.reload is None:
            return 501, {"error": "this server cannot reload"}
        result = self.reload()
        return (400 if "error" in result else 200), result

    def _gateways(self, method, request):
        if method != "GET":
            return 405, {"error": "use GET"}
        return 200, {"gateways": self.gateways() if self.gateways is not None else []}

    def _registrations(self, method, request):
        path = [p.decode("utf-8", "replace") for p in request.postpath if p]
        if method == "DELETE" and len(path) == 1:
            if not path[0].startswith(("sip:", "sips:")) and not self.domain:
                return 400, {"error": "give the whole AoR (sip:user@domain)"}
            aor = path[0] if path[0].startswith(("sip:", "sips:")) else f"sip:{path[0]}@{self.domain}"
            contacts = [c.decode("utf-8", "replace") for c in (request.args or {}).get(b"contact", [])]
            bindings = self.location.lookup(aor)
            if contacts:
                gone = [b for b in bindings if b.contact in contacts]
                for binding in gone:
                    self.location.remove(aor, binding.contact)
                return 200, {"aor": aor, "removed": len(gone)}
            self.location.remove_all(aor)
            return 200, {"aor": aor, "removed": len(bindings)}
        if method != "GET" or path:
            return 405, {"error": "use GET /api/registrations or DELETE /api/registrations/<aor>"}
        now = self.clock.seconds()
        return 200, {"registrations": [self._binding_row(b, now) for b in self.location.all_bindings()]}

    def _phone_row(self, phone) -> dict:
        row = phone.as_json()
        if self.reachability is not None:
            row.update(_reachability(self.reachability(phone.notify_binding())))
        return row

    def _binding_row(self, binding: Binding, now: float) -> dict:
        row = binding_json(binding, now)
        if self.reachability is not None:
            row.update(_reachability(self.reachability(binding)))
        return row
