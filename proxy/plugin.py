"""Plugins: the interfaces, their discovery, and the guarded calls the core makes into them.

A plugin ships a factory providing `IProxyPluginFactory` (and `IPlugin`),
found by name with `twisted.plugin.getPlugins` among the first-party
`plugins/` package and every `twisted.plugins` dropin, so a third party can
ship one as its own package. It runs only when `[plugins] enabled` names it;
its `[plugins.<name>]` table is checked by `parse_config` at startup, and a
bad one stops startup with file, key and reason (Kamailio's fixup idea).

`build(config, context)` returns the plugin: an object providing
`IProxyPlugin` and any of the capability interfaces below. The core calls
them guarded: a plugin that raises is logged with its name and never takes
the request path down; a request policy that raises fails closed (500).
"""

import time

import attrs
from twisted.application.service import IService
from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute, Interface

from proxy.errors import ConfigError

log = Logger()


class IProxyPluginFactory(Interface):
    name = Attribute("The name [plugins] enabled uses, and the [plugins.<name>] table")

    def parse_config(table: dict, path: str) -> object:
        """Check the plugin's table and return its config; raise ConfigError(path, key, reason)."""

    def build(config: object, context: "PluginContext") -> "IProxyPlugin":
        """Build the plugin (import its implementation here, not at module level)."""


class IAdminCommands(Interface):
    """A plugin factory's own `sipproxy-admin` commands (the provisioning plugin's phone, tftp, upgrade)."""

    def add_commands(subparsers) -> None:
        """Add argparse subcommands; each sets `plugin_command=run` with run(config, args, admin) -> exit status.

        `admin` (proxy/admin/cli.py AdminTools) calls the running server's admin API; raise
        proxy.errors.CommandError to fail with a message. The command runs only when the plugin is enabled.
        """


class IProxyPlugin(Interface):
    name = Attribute("The plugin's name, for logs")


class IRequestPolicy(Interface):
    """Sees each initial request before routing (after authentication)."""

    def check_request(request, source, user: str | None) -> "Verdict":
        """Continue(), Respond(status, reason) or Forward(uri). `user` is the authenticated user, if any."""


class ISourceScreen(Interface):
    """Sees every message before the rest of the core does: the place for bans, flood limits, scanner blocks.

    `admit` runs for each message as read, before parsing (one dict lookup's worth of work: a flood pays it
    per datagram); `screen` for each request once parsed and validated, before transactions and
    authentication. A screen that raises is logged and admits: a broken screen must not silence a site.
    """

    def admit(host: str, data: bytes) -> bool:
        """False: drop the message unread (counted as `screened`)."""

    def screen(request, source) -> "Verdict | None":
        """None or Continue(): go on; Respond(status, reason): a stateless answer; Drop(): silence."""


class ISharedPlugin(Interface):
    """Keeps state across the worker processes (docs/performance.md, Workers): what one process's copy of the
    plugin sends with `context.share(value)` reaches this method in every other process's copy."""

    def peer_message(value: object, sender: int) -> None:
        """`value` as shared (plain data: it is pickled); `sender` is the sending worker's index (0: primary)."""


class IEventObserver(Interface):
    """Hears what happens: registration_added/removed, call_answered/ended, auth_failure, and others."""

    def event(name: str, fields: dict) -> None:
        """Called for each event; must return quickly."""


class IWebResources(Interface):
    """Mounts twisted.web resources on the phone-facing or admin HTTP site."""

    def phone_resources() -> dict:
        """{b"path": resource} under the phone-facing site (directory_url, services_url point there)."""

    def admin_resources() -> dict:
        """{b"path": resource} under the admin site (token-protected by the plugin itself)."""

    def services_menu() -> list:
        """[(title, path)] entries for the phones' Services menu."""


class IReloadablePlugin(Interface):
    """Takes a new `[plugins.<name>]` table without a restart (sipproxy-admin reload, SIGHUP)."""

    def reload(config: object) -> None:
        """Use this config (what the factory's parse_config returned for the new table) from now on."""


class IServicePlugin(Interface):
    def service() -> IService:
        """A service started and stopped with the server."""


@attrs.frozen
class Continue:
    pass


@attrs.frozen
class Respond:
    status: int
    reason: str


@attrs.frozen
class Forward:
    """Route the request to this URI instead of its Request-URI's target."""

    uri: str


@attrs.frozen
class Drop:
    """From a screen: send nothing (a banned scanner learns nothing, not even that something listens)."""


Verdict = Continue | Respond | Forward


# The SIP methods the core knows: label values for per-method counters (anything else is "other").
SIP_METHODS = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER", "REFER", "NOTIFY", "INFO", "SUBSCRIBE",
               "UPDATE", "PRACK", "MESSAGE")


def _no_counters() -> dict:
    return {}


def nothing_to_refresh():
    """`PluginContext.refresh` of a server on one process: its counters are always fresh."""
    from twisted.internet import defer

    return defer.succeed(None)


def _no_events(name: str, **fields) -> None:
    return None


def _alone(name: str, value: object) -> None:
    """`PluginContext.share` on a server of one process: nobody else to tell."""
    return None


@attrs.define
class PluginContext:
    """What plugins may use of the core: narrow on purpose. Plugins find each other here, never by import.

    - `counters()`: every core counter, as plain values (proxy/core.py `Core.counters`), summed over the
      worker processes; `refresh()` returns a Deferred that fires when the workers' latest counters
      (and events) are in: wait on it before reading counters for a scrape;
    - `emit(name, **fields)`: send an event to every plugin (the directory's `directory_search`);
    - `share(name, value)`: send plain data to the plugin called `name` in every other worker process
      (`ISharedPlugin.peer_message`); `worker` is this process's index (0: the primary, which alone runs
      services and web resources and hears every process's events) and `workers` their number;
    - `credentials`, `location`: users and bindings, read-only by convention; `is_our_domain(uri)`;
    - `reboot(phones, wait_timeout)`: a check-sync reboot of these phones (proxy/admin/checksync.py), waiting
      for each to register again; the job's `results` say how each did;
    - `plugins`: the other enabled plugins, by name.
    """

    clock: object
    reactor: object
    config: object
    credentials: object = None
    location: object = None
    counters: object = _no_counters
    refresh: object = nothing_to_refresh
    emit: object = _no_events
    share: object = _alone
    is_our_domain: object = None  # (SipUri) -> bool: a Request-URI for one of our domains (or this server)
    reboot: object = None  # (inventory phones, wait_timeout) -> check-sync RebootJob, waiting for them (primary)
    worker: int = 0
    workers: int = 1
    plugins: dict = attrs.field(factory=dict)


@attrs.frozen
class EnabledPlugin:
    name: str
    factory: object
    config: object


def find_factories(extra_packages=()) -> dict[str, object]:
    """Every plugin factory: first-party `plugins/`, then `twisted.plugins` dropins. First name wins."""
    import plugins as first_party
    import twisted.plugins as dropins

    found: dict[str, object] = {}
    for package in (first_party, *extra_packages, dropins):
        for factory in getPlugins(IProxyPluginFactory, package):
            if IPlugin.providedBy(factory):
                found.setdefault(factory.name, factory)
    return found


def resolve(enabled: tuple[str, ...], tables: dict, path: str, factories: dict | None = None) -> list[EnabledPlugin]:
    """The enabled plugins with their checked config; ConfigError for unknown names or bad tables."""
    factories = find_factories() if factories is None else factories
    out = []
    for name in enabled:
        factory = factories.get(name)
        if factory is None:
            known = ", ".join(sorted(factories)) or "none"
            raise ConfigError(path, "plugins.enabled", f"no plugin called {name!r} (found: {known})")
        out.append(EnabledPlugin(name=name, factory=factory, config=factory.parse_config(tables.get(name, {}), path)))
    for name in tables:
        if name not in enabled:
            raise ConfigError(path, f"plugins.{name}", "configured but not in plugins.enabled")
    return out


class PluginHost:
    """The built plugins, and the guarded ways the core calls them."""

    def __init__(self):
        self.plugins: list = []
        self.failures: dict[str, int] = {}
        self.listening = False  # any IEventObserver: callers skip building event values when nobody listens
        self.policing = False  # any IRequestPolicy
        self.screening = False  # any ISourceScreen: the server asks before parsing
        self._screens: tuple = ()
        self._providers: dict = {}  # interface -> the plugins providing it: asked per event and per request
        self._quiet_logged: dict[str, float] = {}
        # In a worker (proxy/workers/): events go to the primary, where the observers are; `listening` then
        # says whether the primary has any.
        self.relay = None  # relay(name, fields)

    def add(self, plugin) -> None:
        self.plugins.append(plugin)
        self.listening = self.listening or IEventObserver.providedBy(plugin)
        self.policing = self.policing or IRequestPolicy.providedBy(plugin)
        self._added(plugin)

    def add_policy(self, plugin) -> None:
        """In a worker (proxy/workers/): only a plugin that polices requests (a request policy or a source
        screen); the events of this process reach it, and the primary's plugins too."""
        if IRequestPolicy.providedBy(plugin) or ISourceScreen.providedBy(plugin):
            self.plugins.append(plugin)
            self.policing = self.policing or IRequestPolicy.providedBy(plugin)
            self._added(plugin)

    def _added(self, plugin) -> None:
        self._providers.clear()
        if ISourceScreen.providedBy(plugin):
            self.screening = True
            self._screens = tuple(self.providers(ISourceScreen))

    def providers(self, interface) -> tuple:
        found = self._providers.get(interface)
        if found is None:
            found = self._providers[interface] = tuple(p for p in self.plugins if interface.providedBy(p))
        return found

    def _failed(self, plugin, what: str) -> None:
        name = getattr(plugin, "name", type(plugin).__name__)
        self.failures[name] = self.failures.get(name, 0) + 1
        log.failure("Plugin {plugin} failed in {what}", plugin=name, what=what)

    def emit(self, name: str, **fields) -> None:
        if self.relay is not None:
            self.relay(name, fields)
        for plugin in self.providers(IEventObserver):
            try:
                plugin.event(name, fields)
            except Exception:
                self._failed(plugin, f"event {name}")

    def admit(self, host: str, data: bytes) -> bool:
        for plugin in self._screens:
            try:
                if not plugin.admit(host, data):
                    return False
            except Exception:
                self._failed_quietly(plugin, "admit")
        return True

    def screen(self, request, source) -> Verdict | None:
        """The first screen's verdict that is not Continue (Respond or Drop), else None."""
        for plugin in self._screens:
            try:
                verdict = plugin.screen(request, source)
            except Exception:
                self._failed_quietly(plugin, "screen")
                continue
            if verdict is not None and not isinstance(verdict, Continue):
                if isinstance(verdict, (Respond, Drop)):
                    return verdict
                log.error("Plugin {plugin} returned {verdict!r} from screen: ignored",
                          plugin=getattr(plugin, "name", "?"), verdict=verdict)
        return None

    def peer_message(self, name: str, value, sender: int) -> None:
        for plugin in self.providers(ISharedPlugin):
            if getattr(plugin, "name", None) == name:
                try:
                    plugin.peer_message(value, sender)
                except Exception:
                    self._failed(plugin, "peer_message")

    def _failed_quietly(self, plugin, what: str) -> None:
        """A failure on the per-message path: counted every time, logged once a minute at most."""
        name = getattr(plugin, "name", type(plugin).__name__)
        self.failures[name] = self.failures.get(name, 0) + 1
        now = time.monotonic()
        if now - self._quiet_logged.get(name, -60.0) >= 60.0:
            self._quiet_logged[name] = now
            log.failure("Plugin {plugin} failed in {what} (admitting; logged once a minute)", plugin=name, what=what)

    def check_request(self, request, source, user) -> Verdict:
        """Policies in config order; the first that does not Continue decides. A failure rejects (fails closed)."""
        for plugin in self.providers(IRequestPolicy):
            try:
                verdict = plugin.check_request(request, source, user)
            except Exception:
                self._failed(plugin, "check_request")
                return Respond(500, "Policy Failure")
            if not isinstance(verdict, (Continue, Respond, Forward)):
                log.error("Plugin {plugin} returned {verdict!r} from check_request: rejecting",
                          plugin=getattr(plugin, "name", "?"), verdict=verdict)
                return Respond(500, "Policy Failure")
            if not isinstance(verdict, Continue):
                return verdict
        return Continue()

    def collect(self, interface, method: str) -> list:
        out = []
        for plugin in self.providers(interface):
            try:
                result = getattr(plugin, method)()
            except Exception:
                self._failed(plugin, method)
                continue
            out.append((plugin, result))
        return out
