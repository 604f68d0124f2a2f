"""The admin HTTP API: JSON over twisted.web, localhost by default, bearer token.

The token is created on first start in `<state_dir>/admin-token` (0600);
`sipproxy-admin` reads it from there, so whoever can read the state
directory can administer the server, and nobody else. Every request needs
`Authorization: Bearer <token>`; a missing or wrong token gets 401, compared
in constant time.

Routes (later issues add more):
  GET /api/health                  {"status": "ok", "version": ...}
  GET /api/registrations           every current binding
  GET /api/forwarding              everyone's forwarding settings
  GET|PUT|DELETE /api/forwarding/<user>   one user's (PUT a JSON object with any of
                                   always, busy, no_answer, no_answer_after, unavailable)
"""

import hmac
import json
import secrets

from twisted.internet.interfaces import IReactorTime
from twisted.web import resource

from proxy import __version__
from proxy.location import Binding, ILocationService
from proxy.statedir import secret_file

TOKEN_FILE = "admin-token"


def load_or_create_token(state_dir: str) -> str:
    return secret_file(state_dir, TOKEN_FILE, lambda: secrets.token_urlsafe(32).encode()).decode()


def binding_json(binding: Binding, now: float) -> dict:
    from proxy.auth import mac_from_instance

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
    }


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
        status, body = self.handler(method, request)
        request.setResponseCode(status)
        return json.dumps(body, indent=1).encode() + b"\n"


class AdminApi(resource.Resource):
    """The /api tree. Handlers return (status, JSON-able body)."""

    def __init__(self, token: str, clock: IReactorTime, location: ILocationService, forwarding_store=None):
        super().__init__()
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

    def add_route(self, name: str, handler) -> None:
        """Mount `handler(method, request) -> (status, body)` at /api/<name>; the rest of the path is in request.postpath."""
        self.routes.putChild(name.encode(), _JsonResource(self, handler))

    def authorized(self, request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token)

    def _health(self, method, request):
        return 200, {"status": "ok", "version": __version__}

    def _forwarding(self, method, request):
        from proxy.forwarding import KINDS, ForwardingError

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

    def _registrations(self, method, request):
        if method != "GET":
            return 405, {"error": "use GET"}
        now = self.clock.seconds()
        return 200, {"registrations": [binding_json(b, now) for b in self.location.all_bindings()]}
