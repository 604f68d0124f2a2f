"""The provisioning plugin in the server: the TFTP server, its request log and diagnosis, and upgrade runs.

The files themselves are written by `sipproxy-admin phone ...` (plugins/provisioning/commands.py), which
needs no running server; the server serves them, explains what each phone fetched, and drives the
reboots of an `upgrade run` (which need it: check-sync NOTIFYs, registrations). Only the primary process
runs any of it (a plugin service).
"""

import errno
import json
import os
import urllib.parse

from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from zope.interface import implementer

from plugins.provisioning.config import ProvisioningConfig, with_root
from plugins.provisioning.rollout import RUN_FILE, Rollout
from plugins.provisioning.tftp import TftpServer
from plugins.provisioning.tftplog import RequestLog, diagnose
from plugins.provisioning.upgrade import PlanError, version
from proxy.periodic import Every
from proxy.web import JsonResource
from proxy.plugin import IProxyPlugin, IServicePlugin, IWebResources

log = Logger()


@implementer(IProxyPlugin, IServicePlugin, IWebResources)
class ProvisioningPlugin:
    name = "provisioning"

    def __init__(self, config: ProvisioningConfig, context):
        self.context = context
        self.config = with_root(config, context.config)
        self.requests = RequestLog(context.clock)
        self.tftp: TftpServer | None = None
        self.rollout: Rollout | None = None
        self._site = None

    @property
    def site(self):
        if self._site is None:  # built when first needed: it looks up the server's own address
            from plugins.provisioning.site import Site

            self._site = Site(self.context.config, self.config)
        return self._site

    def registered_phones(self) -> dict:
        """User name -> the registered phone (proxy/admin/inventory.py) that has that line."""
        from proxy.admin.inventory import phones

        out = {}
        for phone in phones(self.context.location.all_bindings()):
            for aor in phone.lines:
                out.setdefault(aor.split(":", 1)[-1].split("@", 1)[0], phone)
        return out

    def registered_since(self, address: str, since: float) -> bool:
        return any(b.source_host == address and b.registered_at >= since for b in self.context.location.all_bindings())

    def tftp_log(self, device: str | None = None) -> dict:
        now = self.context.clock.seconds()
        return {key: {"requests": [r.as_json() for r in entries],
                      "diagnosis": diagnose(key, entries, self.registered_since, now)}
                for key, entries in self.requests.records(device).items()}

    # -- upgrade runs ----------------------------------------------------------------------

    def start_upgrade(self, target: str, devices: list[str] | None, parallel: int, timeout: float) -> Rollout:
        if self.rollout is not None and not self.rollout.done:
            raise RunConflict("an upgrade run is in progress (upgrade status; upgrade cancel)")
        provisioned = [p for p in self.site.phones().values() if not devices or p.device in devices]
        if not provisioned:
            raise RunRefused("no provisioned phone matches (sipproxy-admin phone list)")
        paths = Rollout.plan_for(provisioned, self.registered_phones(), target)
        rollout = Rollout(self.context.clock, self.site, self._run_path(), reboot=self.context.reboot,
                          registered=self.registered_phones, target=target, parallel=parallel, timeout=timeout,
                          phones=paths)
        missing = rollout.missing_files()
        if missing:
            raise RunRefused(f"not in the TFTP root {self.site.root}: {', '.join(missing)}")
        self.rollout = rollout
        rollout.save()
        log.info("Upgrade to {target}: {count} phone(s), {parallel} at a time", target=target, count=len(paths),
                 parallel=parallel)
        return rollout

    def _run_path(self) -> str:
        return os.path.join(self.context.config.server.state_dir, RUN_FILE)

    def resume(self) -> None:
        rollout = Rollout.load(self.context.clock, self.site, self._run_path(), reboot=self.context.reboot,
                               registered=self.registered_phones)
        if rollout is not None and not rollout.done:
            log.info("Upgrade to {target} resumed ({summary})", target=rollout.target,
                     summary=rollout.as_json()["summary"])
        self.rollout = rollout

    def tick(self) -> None:
        if self.rollout is not None and not self.rollout.done:
            self.rollout.tick()

    # -- IServicePlugin, IWebResources --------------------------------------------------------

    def service(self):
        return _ProvisioningService(self)

    def phone_resources(self):
        return {}

    def admin_resources(self):
        return {b"provisioning": ProvisioningResource(self)}

    def services_menu(self):
        return []


class RunConflict(Exception):
    pass


class RunRefused(Exception):
    pass


def _listen_parts(description: str) -> tuple[int, str]:
    parts = description.split(":")
    interface = next((p.split("=", 1)[1].strip("[]") for p in parts[2:] if p.startswith("interface=")), "")
    if not interface and parts[0] == "udp6":
        interface = "::"
    return int(parts[1]), interface


class _ProvisioningService(service.Service):
    def __init__(self, plugin: ProvisioningPlugin):
        self.plugin = plugin
        self.port = None
        self._ticker = Every(plugin.context.clock, 1.0, plugin.tick)

    def startService(self):
        super().startService()
        plugin = self.plugin
        reactor = plugin.context.reactor
        port, interface = _listen_parts(plugin.config.tftp_listen)
        plugin.tftp = TftpServer(reactor, plugin.config.tftp_root, allowed=plugin.config.allowed,
                                 listen_transfer=lambda proto: reactor.listenUDP(0, proto, interface=interface),
                                 requests=plugin.requests, timeout=plugin.config.timeout, retries=plugin.config.retries)
        try:
            self.port = reactor.listenUDP(port, plugin.tftp, interface=interface)
        except CannotListenError as e:
            code = getattr(e.socketError, "errno", None)
            if code == errno.EADDRINUSE:
                hint = " (another TFTP server, such as tftpd-hpa, has the port: stop it, or choose another port)"
            elif code == errno.EACCES and port < 1024:
                hint = (" (port 69 needs root or CAP_NET_BIND_SERVICE: docs/provisioning.md; or choose another "
                        "port in [plugins.provisioning] tftp_listen)")
            else:
                hint = ""
            log.error("TFTP server cannot listen on {listen}: {error}{hint}", listen=plugin.config.tftp_listen,
                      error=e.socketError, hint=hint)
            raise
        log.info("TFTP server on {listen} serving {root}", listen=plugin.config.tftp_listen, root=plugin.config.tftp_root)
        plugin.resume()
        self._ticker.start()

    def stopService(self):
        self._ticker.stop()
        if self.port is not None:
            d = self.port.stopListening()
            self.port = None
            super().stopService()
            return d
        return super().stopService()


class ProvisioningResource(JsonResource):
    """/provisioning/tftp-log[?phone=SEP...]; /provisioning/upgrade: GET the run, POST {"to", "phones", "parallel",
    "timeout"} to start one, DELETE to stop starting steps. Behind the admin site's token guard."""

    def __init__(self, plugin):
        super().__init__(self._handle)
        self.plugin = plugin

    def _handle(self, method: str, path: list[str], request):
        plugin = self.plugin
        if path == ["tftp-log"] and method == "GET":
            query = urllib.parse.parse_qs(urllib.parse.urlparse(request.uri.decode("utf-8", "replace")).query)
            device = (query.get("phone") or [None])[0]
            return 200, {"phones": plugin.tftp_log(device)}
        if path != ["upgrade"]:
            return 404, {"error": "GET /provisioning/tftp-log, GET|POST|DELETE /provisioning/upgrade"}
        if method == "GET":
            return 200, {"run": plugin.rollout.as_json() if plugin.rollout else None}
        if method == "DELETE":
            if plugin.rollout is None or plugin.rollout.done:
                return 404, {"error": "no upgrade run in progress"}
            plugin.rollout.cancelled = True
            plugin.rollout.save()
            return 200, {"run": plugin.rollout.as_json()}
        if method != "POST":
            return 405, {"error": "GET, POST or DELETE"}
        try:
            body = json.loads(request.content.read() or b"{}")
            target = str(body["to"]).upper()
            version(target)
            parallel = int(body.get("parallel", 5))
            timeout = float(body.get("timeout", 900))
            devices = [str(d) for d in body.get("phones", [])]
            if parallel < 1 or timeout <= 0:
                raise ValueError("parallel and timeout must be positive")
        except PlanError as e:
            return 400, {"error": str(e)}
        except (ValueError, KeyError, TypeError) as e:
            return 400, {"error": f'the body must be {{"to": IMAGE, "phones": [...], "parallel": N, "timeout": S}} ({e})'}
        try:
            rollout = plugin.start_upgrade(target, devices or None, parallel, timeout)
        except RunConflict as e:
            return 409, {"error": str(e)}
        except RunRefused as e:
            return 400, {"error": str(e)}
        return 202, {"run": rollout.as_json()}
