"""Builds the running server from a `ProxyConfig`: listeners around one SipServer.

This is the only place that knows about reactors and sockets; everything it
builds takes the reactor as a parameter, so tests can pass a fake one.
"""

import os
import socket

from twisted.application import internet, service, strports
from twisted.internet import endpoints, ssl
from twisted.names import client as dns_client
from twisted.logger import Logger


from proxy.adminapi import AdminApi, load_or_create_token
from proxy.auth import DigestAuthenticator, load_secret
from proxy.checksync import CheckSync
from proxy.errors import ConfigError
from proxy.phoneweb import build_site_root
from proxy.plugin import IProxyPlugin, IServicePlugin, IWebResources, PluginContext, PluginHost
from proxy.config import ProxyConfig
from proxy.credentials import USERS_FILE, FileCredentials, load_users_at_startup
from proxy.location import LOCATION_FILE, SqliteLocationService, open_state_database
from proxy.dns import NextHopResolver
from proxy.forwarding import Forwarding, ForwardingStore
from proxy.registrar import Registrar
from proxy.router import Router
from proxy.routes import RouteTable
from proxy.server import LocalIdentity, SipServer
from proxy.transport import SipDatagramProtocol, SipStreamFactory, Transports
from proxy.trust import KEYS_FILE, Trust, load_route_signer
from proxy.web import bounded_site

log = Logger()


def local_addresses(config: ProxyConfig) -> frozenset[str]:
    """Addresses that name this host: configured ones, listener interfaces, loopback, the host's own."""
    found = {"127.0.0.1", "::1"}
    found.update(config.server.addresses)
    found.update(lst.interface for lst in config.server.listen if lst.interface not in ("", "0.0.0.0", "::"))
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(info[4][0])
    except OSError:
        pass
    return frozenset(found)


def build_identity(config: ProxyConfig) -> LocalIdentity:
    return LocalIdentity(
        domains=frozenset(config.server.domains),
        addresses=local_addresses(config),
        ports=frozenset(lst.port for lst in config.server.listen),
    )


def load_trust_root(ca_file: str):
    """The CAs to verify TLS peers against: a PEM file (one or more certificates), or the platform's."""
    if not ca_file:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        pem = f.read()
    marker = b"-----END CERTIFICATE-----"
    certs = [ssl.Certificate.loadPEM(part + marker) for part in pem.split(marker) if b"BEGIN CERTIFICATE" in part]
    return ssl.trustRootFromCertificates(certs)


def advertised(config: ProxyConfig, identity: LocalIdentity) -> tuple[str, dict[str, int]]:
    """The host phones reach us at (Via, Record-Route) and our port per transport."""
    ports: dict[str, int] = {}
    for listener in config.server.listen:
        ports.setdefault(listener.transport, listener.port)
    host = config.proxy.advertise
    if host:
        name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if port.isdigit():
            host = name
            ports = {t: int(port) if t == "UDP" else p for t, p in ports.items()}
        return host, ports
    if config.server.addresses:
        return config.server.addresses[0], ports
    for listener in config.server.listen:
        if listener.interface not in ("", "0.0.0.0", "::"):
            return listener.interface, ports
    candidates = sorted(a for a in identity.addresses if ":" not in a and not a.startswith("127."))
    if candidates:
        return candidates[0], ports
    log.warn("No address to advertise in Via/Record-Route; using 127.0.0.1 (set proxy.advertise)")
    return "127.0.0.1", ports


def _build_plugins(config: ProxyConfig, reactor, top, server: SipServer, api: AdminApi, enabled) -> PluginHost:
    """Build the enabled plugins and connect them: events, request policy, services, web resources."""
    c = server.components
    host = PluginHost()
    context = PluginContext(clock=reactor, reactor=reactor, config=config, server=server, location=c["location"],
                            credentials=c["credentials"], router=c["router"], registrar=c["registrar"],
                            authenticator=c["authenticator"], checksync=c["checksync"], forwarding=c["forwarding"])
    for item in enabled:
        plugin = item.factory.build(item.config, context)
        if not IProxyPlugin.providedBy(plugin):
            raise ConfigError(config.path, f"plugins.{item.name}", "its factory built something that is not a plugin")
        host.add(plugin)
        context.plugins[item.name] = plugin
        log.info("Plugin {name} enabled", name=item.name)
    server.components["plugins"] = host
    c["router"].plugins = host
    c["location"].add_observer(lambda event, binding: host.emit(f"registration_{event}", binding=binding))
    c["router"].observers.append(lambda event, **fields: host.emit(f"call_{'ended' if event == 'finished' else event}",
                                                                   **fields))
    c["authenticator"].observer = host.emit
    for _, svc in host.collect(IServicePlugin, "service"):
        svc.setServiceParent(top)
    entries, phone_resources = [], {}
    for _, resources in host.collect(IWebResources, "phone_resources"):
        phone_resources.update(resources)
    for _, items in host.collect(IWebResources, "services_menu"):
        entries.extend(items)
    for _, resources in host.collect(IWebResources, "admin_resources"):
        for path, child in resources.items():
            api.putChild(path, child)
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


class _LocationService(service.Service):
    """Starts the binding sweeper with the server, closes the database on stop."""

    def __init__(self, location: SqliteLocationService):
        self.location = location

    def startService(self):
        super().startService()
        self.location.start()

    def stopService(self):
        self.location.stop()
        return super().stopService()


def check_state(config: ProxyConfig) -> list[str]:
    """Read every state file once before startup: damage stops it (ConfigError: file and reason), never reads empty.

    Returns warnings to log (a last good copy in use). `tap.Options` calls this,
    so the message comes before twistd daemonises.
    """
    state_dir = config.server.state_dir
    _, warning = load_users_at_startup(os.path.join(state_dir, USERS_FILE))
    database = os.path.join(state_dir, LOCATION_FILE)
    if os.path.exists(database):
        open_state_database(database).close()
    if os.path.exists(os.path.join(state_dir, KEYS_FILE)):
        load_route_signer(state_dir)
    return [warning] if warning else []


def build_service(config: ProxyConfig, reactor, enabled_plugins=None) -> tuple[service.MultiService, SipServer]:
    top = service.MultiService()
    state_dir = config.server.state_dir
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    transports = Transports(clock=reactor)
    timers = config.timers
    identity = build_identity(config)
    server = SipServer(
        reactor, transports, identity, timers,
        max_message_size=config.server.max_message_size,
        server_header=config.server.server_header,
        nat_mode=config.registrar.nat_mode,
        debug=config.server.debug,
        max_transactions=config.server.max_transactions,
    )
    credentials = FileCredentials(os.path.join(state_dir, USERS_FILE), reactor)
    authenticator = DigestAuthenticator(reactor, credentials, config.realm, load_secret(state_dir), config.auth,
                                        names_this_server=identity.is_me)
    location = SqliteLocationService(os.path.join(state_dir, LOCATION_FILE), reactor)
    _LocationService(location).setServiceParent(top)
    registrar = Registrar(server, location, authenticator, config.registrar, identity, config.server.domains[0])
    server.handlers["REGISTER"] = registrar.handle
    domain = config.server.domains[0]
    forwarding_store = ForwardingStore(os.path.join(state_dir, LOCATION_FILE))
    forwarding = Forwarding(forwarding_store, domain, max_depth=config.forwarding.max_depth,
                            has_bindings=lambda user: bool(location.lookup(f"sip:{user}@{domain}")))
    advertise = advertised(config, identity)
    trust = Trust(config.proxy.trusted, load_route_signer(state_dir), authenticator, credentials,
                  is_our_domain=lambda uri: identity.is_our_domain(uri, advertise[0]))
    router = Router(
        server, location, authenticator, credentials, config.proxy, RouteTable(config.routes, config.emergency),
        NextHopResolver(dns_client.createResolver()),
        trust=trust, domain=domain, advertise=advertise, nat_mode=config.registrar.nat_mode,
        forwarding=forwarding, forwarding_config=config.forwarding,
    )
    server.components = {"credentials": credentials, "authenticator": authenticator, "location": location,
                         "registrar": registrar, "router": router, "forwarding": forwarding, "trust": trust}

    host, ports = advertised(config, identity)
    checksync = CheckSync(reactor, server, location, advertise=(host, ports.get("UDP") or next(iter(ports.values()))),
                          tftp_root=config.checksync.tftp_root, nat_mode=config.registrar.nat_mode,
                          from_user=config.checksync.from_user)
    server.components["checksync"] = checksync
    api = AdminApi(load_or_create_token(state_dir), reactor, location, forwarding_store, checksync, domain,
                   checksync_rate=config.checksync.rate, checksync_wait=config.checksync.wait_timeout)

    host = _build_plugins(config, reactor, top, server, api, enabled_plugins or [])
    strports.service(config.admin.listen, bounded_site(api, max_body=1024 * 1024), reactor=reactor).setServiceParent(top)
    factories = {}

    def factory_for(name: str) -> SipStreamFactory:
        if name not in factories:
            factories[name] = SipStreamFactory(name, server, transports, config.server.tcp_idle_timeout,
                                               config.server.max_message_size, config.server.max_connections)
        return factories[name]

    transports.connector = make_connector(reactor, factory_for, load_trust_root(config.tls.ca_file))
    for listener in config.server.listen:
        if listener.transport == "UDP":
            udp = internet.UDPServer(listener.port, SipDatagramProtocol(server, transports),
                                     interface=listener.interface, maxPacketSize=65535, reactor=reactor)
            udp.setServiceParent(top)
        else:
            strports.service(listener.description, factory_for(listener.transport), reactor=reactor).setServiceParent(top)
    return top, server
