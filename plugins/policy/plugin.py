"""The policy plugin: who may call what, and the sources the server stops listening to.

Per request, in the order the core asks:
  admit   (every datagram, before parsing)  banned source -> dropped; a source past its request rate is banned
  screen  (every request, before auth)      a scanner's User-Agent is banned; a banned source gets 503
                                            when banned_answer = "503"
  check_request (initial INVITEs of our     dial class not allowed, or not now -> 403 with the class's reason;
                 authenticated users)       calls in progress per user (486) or route (403), costly calls
                                            per minute (403)
  event auth_failure (the primary hears     N wrong digest answers from one address, any users -> banned
                      every process's)

Every refusal and ban is an event `policy` (rule, action, user/address/number, detail): the metrics plugin
counts it, the log has it (at warning for alerts: blocked costly calls, bans, limits), and the primary
sends alerts by webhook and mail. With a rule in mode "log" nothing is refused: the action says
`would_block` / `would_ban`. Emergency calls never reach a policy (the core routes them first).
"""

import ipaddress
import json
import re

import attrs
from twisted.application import service
from twisted.logger import Logger
from zope.interface import implementer

from plugins.policy.alerts import AlertSender, describe
from plugins.policy.bans import Ban, BanList, BanStore, Exemptions, FailedLogins, RequestRate, unit_of
from plugins.policy.config import PolicyConfig, state_file
from plugins.policy.dialling import DialRules
from plugins.policy.limits import CallsInProgress, CostlyCalls
from proxy.periodic import Every
from proxy.web import JsonResource
from proxy.plugin import (Continue, Drop, IEventObserver, IProxyPlugin, IReloadablePlugin, IRequestPolicy,
                          IServicePlugin, ISharedPlugin, ISourceScreen, IWebResources, Respond)
from proxy.sip.grammar import for_log
from proxy.sip.uri import SipUri

log = Logger()


@implementer(IProxyPlugin, IRequestPolicy, ISourceScreen, IEventObserver, ISharedPlugin, IWebResources,
             IServicePlugin, IReloadablePlugin)
class PolicyPlugin:
    name = "policy"

    def __init__(self, config: PolicyConfig, context):
        self.context = context
        self.clock = context.clock
        self.primary = context.worker == 0
        self.store = BanStore(state_file(context.config.server.state_dir))
        self.bans = BanList(self.clock, config.flood.max_tracked)
        for ban in self.store.load(self.clock.seconds()):
            self.bans.add(ban)
        self._to_write: dict[str, Ban] = {}
        self._to_delete: set[str] = set()
        self.calls = CallsInProgress(self.clock, self._share, config.limits.max_call_seconds)
        self.costly = CostlyCalls(self.clock, self._share)
        self.alerts = AlertSender(config.alerts, context.reactor, context.config.server.domains[0]
                                  if context.config.server.domains else "sipproxy")
        self.banned_datagrams = 0  # what banned sources sent us since start (this process)
        self._configure(config)
        if self.bans.bans and self.primary:
            log.info("Policy: {count} bans in force from {path}", count=len(self.bans.bans), path=self.store.path)
        if context.workers > 1 and not self.primary:
            self._share(("hello",))  # a fresh process: the others forget its predecessor's calls, send theirs

    def _configure(self, config: PolicyConfig) -> None:
        self.config = config
        credentials = self.context.credentials
        self.dial = DialRules(config, lambda name: credentials is not None and credentials.lookup(name) is not None)
        flood = config.flood
        trusted = tuple(ipaddress.ip_network(n, strict=False) for n in self.context.config.proxy.trusted)
        self.exemptions = Exemptions(flood.never_ban + trusted, flood.max_tracked)
        self.rate = RequestRate(self.clock, flood.max_requests, flood.window, flood.max_tracked) \
            if flood.max_requests else None
        self.failed_logins = FailedLogins(self.clock, flood.auth_failures, flood.auth_window, flood.max_tracked) \
            if flood.auth_failures else None
        self.drop_banned = flood.banned_answer == "drop"
        self.agents = flood.user_agents
        self.routes = [(r.name or r.pattern or r.domain, re.compile(r.pattern) if r.pattern else None, r.domain)
                       for r in self.context.config.routes]
        self.alerts.config = config.alerts

    # -- ISourceScreen -------------------------------------------------------------

    def admit(self, host: str, data: bytes) -> bool:
        unit = host if ":" not in host else unit_of(host)
        ban = self.bans.bans.get(unit)
        if ban is not None:
            if ban.until > self.clock.seconds():
                self.banned_datagrams += 1
                return not self.drop_banned  # "503": let it in, `screen` answers it
            self.bans.remove(unit)
        rate = self.rate
        if rate is None or data[:4] == b"SIP/" or data[:1] in (b"\r", b"\n") or self.exemptions.exempt(host):
            return True
        if rate.over(unit):
            self._ban(unit, "flood", f"more than {rate.limit} requests in {rate.window:g} s")
            return not (self.config.enforced("flood") and self.drop_banned)
        return True

    def screen(self, request, source):
        unit = unit_of(source.host)
        if self.bans.active(unit) is not None:
            return Drop() if self.drop_banned else Respond(503, "Service Unavailable")
        agents = self.agents
        if agents:
            user_agent = request.headers.get("user-agent")
            if user_agent:
                lowered = user_agent.lower()
                if any(a in lowered for a in agents) and not self.exemptions.exempt(source.host):
                    self._ban(unit, "user_agents", f"scanner User-Agent {for_log(user_agent)}")
                    if self.config.enforced("user_agents"):
                        return Drop() if self.drop_banned else Respond(503, "Service Unavailable")
        return None

    # -- IRequestPolicy ----------------------------------------------------------------

    def check_request(self, request, source, user):
        if request.method != "INVITE" or user is None:
            return Continue()  # a trusted peer's call (a gateway's inbound call) is not one of our users'
        uri = request.uri
        dialled = uri.decoded_user if isinstance(uri, SipUri) else None
        ours = bool(self.context.is_our_domain and self.context.is_our_domain(uri))
        record = self.context.credentials.lookup(user) if self.context.credentials is not None else None
        now = self.clock.seconds()
        decision = self.dial.decide(user, record.classes if record else (), dialled, ours, now)
        costly = decision.number_class in self.config.limits.costly
        fields = {"user": user, "address": source.host, "number": for_log(dialled or str(uri))}
        if decision.refused_by is not None:
            rule = decision.refused_by
            if self._act(rule, f"{decision.number_class}: {decision.reason}", alert=costly, **fields):
                return Respond(403, decision.reason)
        limits = self.config.limits
        keys = []
        if limits.calls_per_user:
            key = ("user", user)
            keys.append(key)
            if self.calls.total(key) >= limits.calls_per_user and self._act(
                    "limits", f"{limits.calls_per_user} calls in progress already", **fields):
                return Respond(486, "Too many calls in progress")
        route = self._route_for(dialled, ours, uri)
        if route is not None and route in limits.calls_per_route:
            key = ("route", route)
            keys.append(key)
            if self.calls.total(key) >= limits.calls_per_route[route] and self._act(
                    "limits", f"route {route}: {limits.calls_per_route[route]} calls in progress already", **fields):
                return Respond(403, f"All lines of route {route} are busy")
        if costly and limits.costly_per_minute:
            if self.costly.count(user) >= limits.costly_per_minute and self._act(
                    "limits", f"{limits.costly_per_minute} {decision.number_class} calls in the last minute", **fields):
                return Respond(403, "Too many costly calls: try again later")
        if keys:
            self.calls.admitted(request.call_id, tuple(keys))
        if costly:
            self.costly.record(user)
        return Continue()

    def _route_for(self, dialled: str | None, ours: bool, uri) -> str | None:
        """The [[routes]] entry the core would take (a local user takes none)."""
        if ours and dialled and self.dial.is_local_user(dialled):
            return None
        for name, pattern, domain in self.routes:
            if ours and pattern is not None and dialled and pattern.fullmatch(dialled):
                return name
            if not ours and domain and isinstance(uri, SipUri) and uri.host == domain:
                return name
        return None

    # -- refusals, bans, alerts -----------------------------------------------------

    def _act(self, rule: str, detail: str, *, alert: bool = True, **fields) -> bool:
        """Tell the log, the metrics and (alerts) the administrator; True when the rule is enforced."""
        enforced = self.config.enforced(rule)
        action = "blocked" if enforced else "would_block"
        self._tell(rule, action, detail, alert, fields)
        return enforced

    def _ban(self, unit: str, rule: str, detail: str, minutes: float | None = None) -> None:
        if self.exemptions.covers_unit(unit):
            return
        enforced = rule == "admin" or self.config.enforced(rule)
        self._tell(rule, "banned" if enforced else "would_ban", detail, True, {"address": unit})
        if not enforced:
            return
        now = self.clock.seconds()
        ban = Ban(unit=unit, until=now + 60.0 * (minutes or self.config.flood.ban_minutes), reason=detail, rule=rule,
                  created=now)
        self._apply_ban(ban)
        self._share(("ban", attrs.astuple(ban)))

    def _tell(self, rule: str, action: str, detail: str, alert: bool, fields: dict) -> None:
        event = {"rule": rule, "action": action, "detail": detail, "alert": alert, "at": self.clock.seconds(),
                 **fields}
        if alert:
            log.warn("Policy {action}: {line}", action=action, line=describe(event))
        else:
            log.info("Policy {action}: {line}", action=action, line=describe(event))
        self.context.emit("policy", **event)

    def _apply_ban(self, ban: Ban) -> None:
        self.bans.add(ban)
        if self.primary:
            self._to_write[ban.unit] = ban
            self._to_delete.discard(ban.unit)

    def unban(self, unit: str) -> Ban | None:
        ban = self.bans.remove(unit)
        self._share(("unban", unit))
        if self.primary:
            self._to_write.pop(unit, None)
            self._to_delete.add(unit)
        return ban

    def flush(self) -> None:
        """Write the bans that changed (the primary, once a second): a burst of bans is one transaction."""
        if not (self._to_write or self._to_delete):
            return
        put, removed = list(self._to_write.values()), list(self._to_delete)
        self._to_write, self._to_delete = {}, set()
        try:
            self.store.write(put, removed, self.clock.seconds())
        except Exception as e:
            log.error("Policy: cannot write the bans to {path}: {error}", path=self.store.path, error=e)

    # -- IEventObserver ---------------------------------------------------------------

    def event(self, name: str, fields: dict) -> None:
        if name == "call_started":
            self.calls.started(fields["call"].call_id)
        elif name == "call_ended":
            call = fields["call"]
            if not call.answered:
                self.calls.ended(call.call_id)
        elif name == "call_bye":
            self.calls.ended(fields["call_id"])
        elif not self.primary:
            return  # the rest: the primary hears every process's events
        elif name == "auth_failure":
            self._auth_failure(fields)
        elif name == "policy" and fields.get("alert"):
            self.alerts.add({k: v for k, v in fields.items() if k != "alert"})

    def _auth_failure(self, fields: dict) -> None:
        # Only a wrong answer to a nonce we gave that very address names a user: a made-up or replayed nonce
        # does not, and may come from a forged source, which must not get the real one banned.
        address = fields.get("address")
        if self.failed_logins is None or not fields.get("user") or not address or self.exemptions.exempt(address):
            return
        unit = unit_of(address)
        count = self.failed_logins.failed(unit)
        if count:
            self._ban(unit, "auth", f"{count} failed authentications in {self.config.flood.auth_window:g} s")

    # -- ISharedPlugin ----------------------------------------------------------------

    def _share(self, value) -> None:
        self.context.share(self.name, value)

    def peer_message(self, value, sender: int) -> None:
        kind = value[0]
        if kind == "calls":
            self.calls.peer(value, sender)
        elif kind == "costly":
            self.costly.peer(value, sender)
        elif kind == "ban":
            self._apply_ban(Ban(*value[1]))
        elif kind == "unban":
            self.bans.remove(value[1])
            if self.primary:
                self._to_write.pop(value[1], None)
                self._to_delete.add(value[1])
        elif kind == "hello":
            self.calls.forget(sender)
            self.calls.resend()

    # -- IReloadablePlugin, IServicePlugin, IWebResources ---------------------------------

    def reload(self, config: PolicyConfig) -> None:
        self._configure(config)  # bans and calls in progress stay

    def service(self):
        return _PolicyService(self)

    def phone_resources(self):
        return {}

    def admin_resources(self):
        return {b"policy": PolicyResource(self)}

    def services_menu(self):
        return []

    def status(self) -> dict:
        return {
            "modes": self.config.modes,
            "bans": len(self.bans.all()),
            "banned_datagrams": self.banned_datagrams,
            "calls_in_progress": {f"{kind}:{name}": self.calls.total((kind, name))
                                  for kind, name in sorted(set(self.calls.mine) | {
                                      k for counts in self.calls.peers.values() for k in counts})},
            "alerts": {"sent": dict(self.alerts.sent), "failed": dict(self.alerts.failed)},
        }


class _PolicyService(service.Service):
    """The primary's: writes changed bans once a second, sends what alerts are queued when it stops."""

    def __init__(self, plugin: PolicyPlugin):
        self.plugin = plugin
        self._writer = Every(plugin.clock, 1.0, plugin.flush)

    def startService(self):
        super().startService()
        self._writer.start()

    def stopService(self):
        self._writer.stop()
        self.plugin.flush()
        self.plugin.alerts.stop()
        return super().stopService()


class PolicyResource(JsonResource):
    """/policy: GET the status; /policy/bans: GET the list, POST {"address", "minutes", "reason"} to ban,
    DELETE /policy/bans/<address> to lift one. Behind the admin site's token guard."""

    def __init__(self, plugin):
        super().__init__(self._handle)
        self.plugin = plugin

    def _handle(self, method: str, path: list[str], request):
        plugin = self.plugin
        if not path:
            return (200, plugin.status()) if method == "GET" else (405, {"error": "use GET"})
        if path[0] != "bans":
            return 404, {"error": "no such resource: /policy or /policy/bans"}
        if len(path) == 1 and method == "GET":
            return 200, {"bans": [b.as_json() for b in plugin.bans.all()]}
        if len(path) == 1 and method == "POST":
            try:
                body = json.loads(request.content.read() or b"{}")
            except ValueError:
                return 400, {"error": "the body must be JSON"}
            address = str(body.get("address") or "")
            minutes = body.get("minutes", plugin.config.flood.ban_minutes)
            if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or minutes <= 0:
                return 400, {"error": "minutes must be a number greater than 0"}
            unit = _unit(address)
            if unit is None:
                return 400, {"error": f"{address!r} is not an IP address"}
            if plugin.exemptions.covers_unit(unit):
                return 400, {"error": f"{unit} is in [plugins.policy.flood] never_ban or [proxy] trusted"}
            plugin._ban(unit, "admin", str(body.get("reason") or "banned by the administrator")[:200], minutes)
            return 200, {"banned": plugin.bans.active(unit).as_json()}
        if len(path) == 2 and method == "DELETE":
            unit = _unit(path[1]) or path[1]
            ban = plugin.unban(unit)
            if ban is None:
                return 404, {"error": f"{unit} is not banned"}
            log.info("Policy: ban of {unit} lifted by the administrator", unit=unit)
            return 200, {"lifted": ban.as_json()}
        return 405, {"error": "GET or POST /policy/bans, DELETE /policy/bans/<address>"}


def _unit(address: str) -> str | None:
    text = address.strip()
    try:
        if "/" in text:
            network = ipaddress.ip_network(text, strict=False)
            return str(network) if network.version == 6 and network.prefixlen == 64 else (
                str(network.network_address) if network.num_addresses == 1 else None)
        return unit_of(str(ipaddress.ip_address(text)))
    except ValueError:
        return None
