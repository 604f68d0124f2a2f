"""Builds the running server from a `ProxyConfig`: listeners and sites around the core `build_core` makes.

This is the only place that knows about sockets; everything it builds takes
the reactor as a parameter, so tests can pass a fake one (or the real one
for sockets with a Clock for time: tests/loopback.py).
"""

import errno
import gc
import os
import socket

import attrs

from twisted.application import service, strports
from twisted.internet import defer, endpoints, ssl
from twisted.internet.posixbase import PosixReactorBase
from twisted.logger import Logger
from twisted.names import client as dns_client

from proxy.admin.api import AdminApi, load_or_create_metrics_token, load_or_create_token
from proxy.config import ListenerConfig, ProxyConfig
from proxy.core import Core, build_core, identity_from_config
from proxy.registration.credentials import USERS_FILE, load_users_at_startup
from proxy.errors import ConfigError
from proxy.registration.location import LOCATION_FILE, open_state_database
from proxy.phone.site import build_site_root
from proxy.plugin import IProxyPlugin, IServicePlugin, IWebResources, PluginContext, PluginHost, nothing_to_refresh
from proxy.transport import SipDatagramProtocol, SipStreamFactory, TimestampedUdpPort, Transports
from proxy.trace import Tracer
from proxy.trust import KEYS_FILE, load_route_signer
from proxy.web import bounded_site

log = Logger()


def load_trust_root(ca_file: str):
    """The CAs to verify TLS peers against: a PEM file (one or more certificates), or the platform's."""
    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        pem = f.read()
    marker = b"-----END CERTIFICATE-----"
    certs = [ssl.Certificate.loadPEM(part + marker) for part in pem.split(marker) if b"BEGIN CERTIFICATE" in part]
    if not certs:
        raise ValueError("no PEM certificate in it")
    return ssl.trustRootFromCertificates(certs)


def _plugin_context(config: ProxyConfig, reactor, core: Core, *, counters, refresh, link=None) -> PluginContext:
    more = {} if link is None else {"share": link.share, "worker": link.index, "workers": link.count}
    return PluginContext(clock=reactor, reactor=reactor, config=config, credentials=core.credentials,
                         location=core.location, emit=core.plugins.emit, counters=counters, refresh=refresh,
                         is_our_domain=core.identity.is_our_domain, reboot=_reboot_for(core), **more)


def _reboot_for(core: Core):
    def reboot(phones, wait_timeout: float):
        return core.checksync.start(list(phones), [], reboot=True, wait=True, wait_timeout=wait_timeout,
                                    everyone=False)
    return reboot


def _build_plugins(config: ProxyConfig, reactor, top, core: Core, api: AdminApi, enabled, link=None) -> PluginHost:
    """Build the enabled plugins into the core's host; mount their services and web resources.

    `link` (proxy/workers/link.py): with workers, the plugins read every process's counters through it.
    """
    host = core.plugins
    context = _plugin_context(config, reactor, core, counters=link.counters if link else core.counters,
                              refresh=link.refresh if link else nothing_to_refresh, link=link)
    for item in enabled:
        plugin = item.factory.build(item.config, context)
        if not IProxyPlugin.providedBy(plugin):
            raise ConfigError(config.path, f"plugins.{item.name}", "its factory built something that is not a plugin")
        host.add(plugin)
        context.plugins[item.name] = plugin
        log.info("Plugin {name} enabled", name=item.name)
    for _, svc in host.collect(IServicePlugin, "service"):
        svc.setServiceParent(top)
    phone_resources = {}
    for _, resources in host.collect(IWebResources, "phone_resources"):
        phone_resources.update(resources)

    def entries():
        return [entry for _, items in host.collect(IWebResources, "services_menu") for entry in items]
    read_token = load_or_create_metrics_token(config.server.state_dir)
    for _, resources in host.collect(IWebResources, "admin_resources"):
        for path, child in resources.items():
            api.mount_plugin_resource(path, child, read_token)
    site = bounded_site(build_site_root(entries, phone_resources), max_body=16 * 1024)
    strports.service(config.phone_web.listen, site, reactor=reactor).setServiceParent(top)
    return host


def make_connector(reactor, factory_for, trust_root=None):
    """Opens outgoing TCP/TLS connections.

    TLS (trunks, never phones: they have no TLS) is verified: the chain
    against `trust_root`, the name against `tls_name` (or the host) through
    service-identity, as `optionsForClientTLS` does.
    """
    trust = trust_root if trust_root is not None else ssl.platformTrust()

    def connect(transport: str, host: str, port: int, tls_name: str | None = None):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, host, port, timeout=10)
        if transport == "TLS":
            options = ssl.optionsForClientTLS(tls_name or host, trustRoot=trust)
            endpoint = endpoints.wrapClientTLS(options, endpoint)
        return endpoint.connect(factory_for(transport))

    return connect


class UdpListener(service.Service):
    """A SIP UDP listener on a `TimestampedUdpPort` (queue delay for overload control).

    `fd`: a socket the primary opened, adopted by a worker (proxy/workers/): every process reads the same port.
    """

    def __init__(self, reactor, listener: ListenerConfig | None, protocol, shedder=None, receive_buffer: int = 0,
                 fd: tuple[int, int] | None = None, reuse_port: bool = False):
        self.reactor = reactor
        self.reuse_port = reuse_port
        self.receive_buffer = receive_buffer
        self.listener = listener
        self.protocol = protocol
        self.shedder = shedder if shedder is not None and shedder.enabled else None  # measures only when on
        self.fd = fd  # (file descriptor, address family)
        self.port = None

    def startService(self):
        super().startService()
        shedder = self.shedder
        options = dict(on_delay=shedder and shedder.queue_delay, on_dropped=shedder and shedder.kernel_dropped)
        if self.fd is not None:
            self.port = TimestampedUdpPort.adopt(self.reactor, *self.fd, self.protocol,
                                                 receive_buffer=self.receive_buffer, **options)
            self.port.startListening()
        elif isinstance(self.reactor, PosixReactorBase):
            self.port = TimestampedUdpPort(self.listener.port, self.protocol, self.listener.interface, 65535,
                                           self.reactor, receive_buffer=self.receive_buffer,
                                           reuse_port=self.reuse_port, **options)
            self.port.startListening()
        else:  # a test's memory reactor: no file descriptors to watch
            self.port = self.reactor.listenUDP(self.listener.port, self.protocol, self.listener.interface, 65535)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


def settle_memory() -> None:
    """After start-up: what was loaded (bindings, users, modules) is moved out of the collector's sight.

    A full collection scans every tracked object; 100,000 restored bindings
    and the code would otherwise be rescanned every few seconds under load.
    The youngest generation is also collected less often (every 10,000
    allocations instead of 700): each collection then costs a few ms, and a
    message makes a few hundred objects.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class _BackgroundJobs(service.Service):
    """Starts the jobs (binding sweeper, phone keepalive, gateway probes, load shedder, worker link) with the
    server, and stops them in reverse order, after the workers have exited (their last changes come first)."""

    def __init__(self, jobs: list, workers=None):
        self.jobs = jobs
        self.workers = workers  # proxy/workers/supervisor.py, started and stopped as its own service

    def startService(self):
        super().startService()
        for job in self.jobs:
            job.start()
        settle_memory()

    def stopService(self):
        super().stopService()
        if self.workers is None:
            self._stop_jobs()
            return None
        waiting = defer.maybeDeferred(lambda: self.workers.all_stopped)
        waiting.addBoth(lambda _: self._stop_jobs())
        return waiting

    def _stop_jobs(self) -> None:
        for job in reversed(self.jobs):
            job.stop()


def check_listeners(config: ProxyConfig) -> None:
    """Every SIP listener's port can be bound now: a busy or privileged port is a ConfigError, not a traceback.

    (A check, not a reservation: another program could still take the port before twistd does.)
    """
    listeners = [("server.listen", listener) for listener in config.server.listen]
    others = [("admin.listen", config.admin.listen), ("phone_web.listen", config.phone_web.listen)]
    if config.srst.role:
        others.append(("srst.listen", config.srst.listen))
    for key, description in others:
        try:
            listeners.append((key, ListenerConfig.parse(description)))
        except ValueError:
            continue  # unix: and other endpoints are left to twistd
    for key, listener in listeners:
        family = socket.AF_INET6 if ":" in listener.interface else socket.AF_INET
        kind = socket.SOCK_DGRAM if listener.transport == "UDP" else socket.SOCK_STREAM
        try:
            with socket.socket(family, kind) as probe:
                if kind == socket.SOCK_STREAM:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listenTCP
                probe.bind((listener.interface, listener.port))
        except OSError as e:
            where = f"{listener.interface or 'every interface'} port {listener.port}"
            hint = {errno.EADDRINUSE: "another program listens there (another sipproxy? a PBX?)",
                    errno.EACCES: "ports below 1024 need root (or CAP_NET_BIND_SERVICE)",
                    errno.EADDRNOTAVAIL: "this host has no such address"}.get(e.errno, "")
            raise ConfigError(config.path, key, f"{listener.description}: cannot listen on {where}: "
                              f"{e.strerror}" + (f" ({hint})" if hint else "")) from None


def check_tls(config: ProxyConfig) -> None:
    """TLS keys, certificates and the CA file load now, or startup stops naming the key and why."""
    if config.tls.ca_file:
        try:
            load_trust_root(config.tls.ca_file)
        except Exception as e:  # OSError, or whatever the SSL library raises for a non-PEM file
            raise ConfigError(config.path, "tls.ca_file", f"{config.tls.ca_file}: not a readable PEM file of "
                              f"CA certificates ({type(e).__name__}: {e})") from None
    for listener in config.server.listen:
        if listener.transport != "TLS":
            continue
        try:
            endpoints.serverFromString(None, listener.description)  # the ssl:/tls: parsers load the files here
        except Exception as e:
            raise ConfigError(config.path, "server.listen", f"{listener.description}: cannot load the key or "
                              f"certificate ({type(e).__name__}: {e})") from None
    if config.srst.role and config.srst.listen.partition(":")[0].lower() in ("ssl", "tls"):
        try:
            endpoints.serverFromString(None, config.srst.listen)
        except Exception as e:
            raise ConfigError(config.path, "srst.listen", f"{config.srst.listen}: cannot load the key or "
                              f"certificate ({type(e).__name__}: {e})") from None


def check_state(config: ProxyConfig) -> list[str]:
    """Read every state file once before startup: damage stops it (ConfigError: file and reason), never reads empty.

    Returns warnings to log (a last good copy in use). `tap.Options` calls this,
    so the message comes before twistd daemonises.
    """
    identity_from_config(config, quiet=True)  # an address to advertise, or ConfigError saying what to set
    state_dir = config.server.state_dir
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        probe = os.path.join(state_dir, ".writable")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(config.path, "server.state_dir", f"{state_dir}: {e.strerror} (the server keeps "
                          "users, bindings and keys there: it must be a writable directory)") from None
    shared = config.server.shared
    if shared != state_dir and not os.path.isdir(shared):
        raise ConfigError(config.path, "server.shared_dir", f"{shared}: not a directory (it holds users.json and "
                          "the secrets every node must agree on)")
    _, warning = load_users_at_startup(os.path.join(shared, USERS_FILE))
    database = os.path.join(state_dir, LOCATION_FILE)
    if os.path.exists(database) and config.location.backend == "sqlite":
        open_state_database(database).close()
    if os.path.exists(os.path.join(shared, KEYS_FILE)):
        load_route_signer(shared)
    check_tls(config)
    check_listeners(config)
    return [warning] if warning else []


class SipProxyService(service.MultiService):
    """The server's top service; `reloader` re-reads the config (tap.py connects SIGHUP to it)."""

    reloader: "Reloader | None" = None


class Reloader:
    """Re-reads the config file and applies what can change without a restart (sipproxy-admin reload, SIGHUP)."""

    def __init__(self, config: ProxyConfig, core: Core, also=None):
        self.config = config
        self.core = core
        self.also = also  # also(): the workers reload too (proxy/workers/supervisor.py signal_all)
        self._tables = dict(config.plugins.tables)  # the [plugins.<name>] tables the plugins run with

    def reload(self) -> dict:
        from proxy.config import load_config
        from proxy.plugin import resolve

        if self.config.path == "<defaults>":
            return {"error": "the server runs on its embedded defaults: there is no file to reload"}
        try:
            new = load_config(self.config.path)
            plugins = resolve(new.plugins.enabled, new.plugins.tables, new.path)  # a bad table refuses it all
        except ConfigError as e:
            log.error("Reload refused: {error}", error=str(e))
            return {"error": str(e)}
        reloaded, restart = self.core.reload(self.config, new)
        if new.plugins.enabled == self.config.plugins.enabled:
            more, needs = self._reload_plugins(plugins, new.plugins.tables)
            reloaded += more
            restart += needs
        if self.also is not None:
            self.also()
        self.config = attrs.evolve(new, server=self.config.server) if restart else new
        log.info("Reloaded {path}: {reloaded}{restart}", path=new.path, reloaded=", ".join(reloaded) or "nothing changed",
                 restart=f"; a restart is needed for {', '.join(restart)}" if restart else "")
        return {"reloaded": reloaded, "restart_needed": restart}

    def _reload_plugins(self, plugins, tables: dict) -> tuple[list[str], list[str]]:
        """Give each plugin whose table changed its new config (IReloadablePlugin), or name it for a restart."""
        from proxy.plugin import IReloadablePlugin

        running = {getattr(p, "name", None): p for p in self.core.plugins.plugins}
        reloaded, restart = [], []
        for item in plugins:
            table = tables.get(item.name, {})
            if self._tables.get(item.name, {}) == table:
                continue
            plugin = running.get(item.name)
            if plugin is None:
                continue  # not in this process (a worker keeps only request policies)
            if IReloadablePlugin.providedBy(plugin):
                plugin.reload(item.config)
                self._tables[item.name] = table
                reloaded.append(f"plugins.{item.name}")
            else:
                restart.append(f"plugins.{item.name}")
        return reloaded, restart


def worker_count(config: ProxyConfig) -> int:
    """How many processes serve SIP: `[server] workers` (0: one per core); 1 without a UDP listener
    or without SO_REUSEPORT (each worker's socket shares the port: proxy/workers/supervisor.py)."""
    if not any(listener.transport == "UDP" for listener in config.server.listen):
        return 1
    if not hasattr(socket, "SO_REUSEPORT"):
        return 1
    return config.server.workers or max(1, os.cpu_count() or 1)


def system_resolver(reactor):
    """twisted.names' createResolver (hosts file, cache, the resolv.conf servers) on `reactor`, not the global one:
    its re-reading of resolv.conf every minute runs on the reactor the server was given."""
    from twisted.names import cache, hosts, resolve

    return resolve.ResolverChain([hosts.Resolver(b"/etc/hosts"), cache.CacheResolver(reactor=reactor),
                                  dns_client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)])


class _Sip:
    """What the primary and a worker both build: tracer, transports, the core, the stream connector."""

    def __init__(self, config: ProxyConfig, reactor, worker: int | None, workers: int = 1):
        self.tracer = Tracer(reactor)
        self.transports = Transports(clock=reactor, tracer=self.tracer)
        self.core = build_core(config, reactor, self.transports, resolver=system_resolver(reactor),
                               tracer=self.tracer, worker=worker, workers=workers)
        self.config = config
        self._factories: dict[str, SipStreamFactory] = {}
        self.transports.connector = make_connector(reactor, self.factory_for, load_trust_root(config.tls.ca_file))

    def factory_for(self, name: str) -> SipStreamFactory:
        if name not in self._factories:
            server = self.config.server
            self._factories[name] = SipStreamFactory(name, self.core.server, self.transports, server.tcp_idle_timeout,
                                                     server.max_message_size, server.max_connections)
        return self._factories[name]


def build_service(config: ProxyConfig, reactor, enabled_plugins=None, *,
                  workers: int = 1) -> tuple[service.MultiService, Core]:
    """The listeners and sites around the core that `build_core` makes; returns the service and the core.

    `workers` > 1 (twistd: `worker_count`): this is the primary of that many processes (proxy/workers/).
    """
    from proxy.workers.bus import Bus, make_pairs
    from proxy.workers.link import WorkerLink
    from proxy.workers.supervisor import WorkerSupervisor

    top = SipProxyService()
    sip = _Sip(config, reactor, 0 if workers > 1 else None, workers)
    core, tracer = sip.core, sip.tracer
    server, location, checksync = core.server, core.location, core.checksync
    jobs = [location, core.keepalive, core.prober, core.shedder, core.dialogs]
    link = supervisor = None
    if workers > 1:
        pairs = make_pairs(workers)
        link = WorkerLink(reactor, Bus(reactor, 0, pairs[0][1], {k: pairs[k][0] for k in range(1, workers)}), core)
        jobs.append(link)
    udp_listeners = [UdpListener(reactor, listener, SipDatagramProtocol(link or server, sip.transports),
                                 receive_buffer=config.server.udp_receive_buffer, reuse_port=workers > 1,
                                 shedder=core.shedder)
                     for listener in config.server.listen if listener.transport == "UDP"]
    if link is not None:
        supervisor = WorkerSupervisor(reactor, link, pairs, udp_listeners,
                                      config_path=None if config.path == "<defaults>" else config.path)
    reloader = Reloader(config, core, also=supervisor and supervisor.signal_all)
    top.reloader = reloader
    state_dir = config.server.state_dir
    api = AdminApi(load_or_create_token(state_dir), reactor, location, core.forwarding_store, checksync,
                   core.identity.domain, reachability=core.keepalive.status if config.registrar.keepalive_interval else None,
                   gateways=core.gateways.gateways, reload=reloader.reload, tracer=tracer, verbosity=core.verbosity,
                   checksync_rate=config.checksync.rate, checksync_wait=config.checksync.wait_timeout,
                   calls=link.calls if link is not None else lambda: defer.succeed(core.dialogs.calls()),
                   peers=(lambda: {"role": config.srst.role, "node": core.location.node,
                                   "peers": core.srst.status()}) if core.srst is not None else None)
    if core.srst is not None:
        jobs.append(core.srst)
        # The replication link: its own listener (a peer is not an admin), bodies are ours to send, not take.
        site = bounded_site(core.srst.resource, max_body=4096)
        site.log = lambda request: None  # a pull every interval: no access log line each (refusals are logged)
        site.noisy = False
        strports.service(config.srst.listen, site, reactor=reactor).setServiceParent(top)
    _BackgroundJobs(jobs, workers=supervisor).setServiceParent(top)
    _build_plugins(config, reactor, top, core, api, enabled_plugins or [], link)
    strports.service(config.admin.listen, bounded_site(api, max_body=1024 * 1024), reactor=reactor).setServiceParent(top)
    for listener in config.server.listen:
        if listener.transport != "UDP":
            strports.service(listener.description, sip.factory_for(listener.transport),
                             reactor=reactor).setServiceParent(top)
    for udp in udp_listeners:
        udp.setServiceParent(top)
    if supervisor is not None:
        supervisor.setServiceParent(top)  # started after the UDP sockets exist, stopped first
    return top, core


def build_worker_service(config: ProxyConfig, reactor, enabled_plugins, *, index: int, count: int,
                         udp_fds: list[tuple[int, int]], inbox_fd: int, outbox_fds: dict[int, int],
                         events: bool) -> tuple[service.MultiService, Core]:
    """Worker `index` of `count` (proxy/workers/child.py): SIP on the primary's sockets, nothing else.

    No admin API, web sites, keepalive or TCP listeners (the primary's); plugins only as request policies
    (their events go to the primary's plugins).
    """
    from proxy.workers.bus import Bus
    from proxy.workers.link import WorkerLink

    top = SipProxyService()
    sip = _Sip(config, reactor, index, count)
    core = sip.core
    adopt = socket.socket
    bus = Bus(reactor, index, adopt(fileno=inbox_fd), {k: adopt(fileno=fd) for k, fd in outbox_fds.items()})
    link = WorkerLink(reactor, bus, core)
    host = core.plugins
    if events:
        host.relay = link.relay_event
        host.listening = True
    context = _plugin_context(config, reactor, core, counters=core.counters, refresh=nothing_to_refresh, link=link)
    for item in enabled_plugins:
        plugin = item.factory.build(item.config, context)
        context.plugins[item.name] = plugin
        host.add_policy(plugin)
    _BackgroundJobs([core.location, core.prober, core.shedder, core.dialogs, link]).setServiceParent(top)
    top.reloader = Reloader(config, core)
    for fd, family in udp_fds:
        UdpListener(reactor, None, SipDatagramProtocol(link, sip.transports), fd=(fd, family),
                    shedder=core.shedder, receive_buffer=config.server.udp_receive_buffer).setServiceParent(top)
    return top, core
