"""The object graph of the server, built in one place: `build_core(config, clock, transports)`.

No listener, no reactor: the graph runs on any `IReactorTime` and any
transports (the real ones in service.py, recording ones in tests, both
through this function). Built in dependency order, so nothing is set on
anything after construction:

  identity, NAT policy -> replies -> users, digest auth, trust -> bindings, forwarding
  -> routing (targets, hops, router, stateless) and the registrar
  -> the dispatcher (the transaction user) -> the SipServer -> check-sync
"""

import os
import socket

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from proxy.registration.auth import DigestAuthenticator, load_secret
from proxy.admin.checksync import CheckSync
from proxy.config import ProxyConfig, is_loopback
from proxy.registration.credentials import USERS_FILE, FileCredentials
from proxy.dispatch import Dispatcher
from proxy.errors import ConfigError
from proxy.routing.forwarding import Forwarding, ForwardingStore
from proxy.identity import Identity
from proxy.registration.keepalive import Keepalive
from proxy.registration.location import LOCATION_FILE, ILocationService, SqliteLocationService
from proxy.nat import NatPolicy
from proxy.overload import LoadShedder
from proxy.plugin import PluginHost
from proxy.registration.registrar import Registrar
from proxy.replies import Replies
from proxy.routing.dns import NextHopResolver
from proxy.routing.gateways import GatewayHealth, GatewayProber
from proxy.routing.hops import Hops
from proxy.routing.redirect import RedirectServer
from proxy.dialogs import DialogTable
from proxy.transfer import TransferService
from proxy.routing.router import Router
from proxy.routing.routes import RouteTable
from proxy.routing.stateless import StatelessForwarder
from proxy.routing.targets import Targets
from proxy.server import SipServer
from proxy.trace import RuntimeVerbosity
from proxy.trust import Trust, load_route_signer

log = Logger()


@attrs.frozen
class Core:
    identity: Identity
    replies: Replies
    server: SipServer
    dispatcher: Dispatcher
    credentials: FileCredentials
    authenticator: DigestAuthenticator
    trust: Trust
    location: ILocationService  # SqliteLocationService, or RedisLocationService shared by the nodes
    forwarding_store: ForwardingStore  # or RedisForwardingStore, the same methods
    forwarding: Forwarding
    registrar: Registrar
    router: Router
    stateless: StatelessForwarder
    checksync: CheckSync
    keepalive: Keepalive
    gateways: GatewayHealth
    prober: GatewayProber
    plugins: PluginHost  # empty until service.py adds the enabled ones; the router asks it from the start
    shedder: LoadShedder  # overload control (started with the service)
    dialogs: DialogTable  # calls in progress and their records (its sweeper started with the service)
    transfers: TransferService | None  # Bye/Also transfers the proxy completes ([transfer] complete_also)
    verbosity: RuntimeVerbosity  # sipproxy-admin log-level
    srst: object = None  # proxy/srst/node.py SrstNode: SIP-SRST replication ([srst] role; the primary process only)

    def reload(self, old: ProxyConfig, new: ProxyConfig) -> tuple[list[str], list[str]]:
        """Apply what can change while calls go on; returns (reloaded, needs a restart) as config sections.

        Reloaded: routes and gateways, emergency settings, trusted networks. Calls in progress keep the
        targets they were given; new calls use the new tables.
        """
        reloaded, restart = [], []
        if (old.routes, old.emergency) != (new.routes, new.emergency):
            self.router.routes.load(new.routes, new.emergency)
            reloaded += ["routes", "emergency"]
        if old.proxy.trusted != new.proxy.trusted:
            self.trust.load_networks(new.proxy.trusted)
            reloaded.append("proxy.trusted")
        rest_old = attrs.evolve(old, path="", routes=(), emergency=new.emergency,
                                proxy=attrs.evolve(old.proxy, trusted=()))
        rest_new = attrs.evolve(new, path="", routes=(), proxy=attrs.evolve(new.proxy, trusted=()))
        for field in attrs.fields(ProxyConfig):
            if getattr(rest_old, field.name) != getattr(rest_new, field.name):
                restart.append(field.name)
        return reloaded, restart

    def counters(self) -> dict:
        """Every core counter the metrics plugin exports, by component: plain values, read at scrape time."""
        server = self.server
        auth = self.authenticator
        return {
            "requests": dict(server.requests),
            "replies": dict(self.replies.replies),
            "dropped": dict(self.replies.dropped),
            "transactions": server.transactions.counts(),
            "retransmissions": server.transactions.retransmissions,
            "registrations": dict(self.registrar.results),
            "auth": {"challenges": auth.challenges, "failures": dict(auth.failures_by_reason),
                     "lockouts": auth.lockouts, "lockouts_by_scope": dict(auth.lockouts_by_scope),
                     "evicted": auth.evicted},
            "trust_refused": dict(self.trust.refused),
            "calls": self.router.counters(),
            "stateless_forwarded": self.stateless.forwarded,
            "checksync": dict(self.checksync.notifies),
            "keepalive": dict(self.keepalive.counts),
            "gateways": self.gateways.gateways(),
            "bindings_expired": self.location.expired,
            "location_store": self.location.store_counters(),
            "plugin_failures": dict(self.plugins.failures),
            "overload": self.shedder.counters(),
            "transfers": self.transfers.counters() if self.transfers is not None else {},
            "srst": self.srst.counters() if self.srst is not None else {},
        }


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


def default_route_address() -> str | None:
    """The address this host sends from toward the rest of the network (a UDP connect sends no packet), or None."""
    for probe in ("192.0.2.1", "2001:db8::1"):  # documentation addresses: only the routing table is asked
        family = socket.AF_INET6 if ":" in probe else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                address = s.getsockname()[0]
        except OSError:
            continue
        if not address.startswith("127.") and address not in ("::1", "0.0.0.0", "::"):
            return address
    return None


def _advertised(config: ProxyConfig, addresses: frozenset[str], find_address,
                quiet: bool = False) -> tuple[str, dict[str, int]]:
    """The host phones reach us at (Via, Record-Route) and our port per transport.

    In order: `[proxy] advertise`, the first of `[server] addresses`, a listener's interface, the source address of
    the default route, another address of the host. Loopback only when every listener is on loopback: otherwise
    phones would send their ACK and BYE to their own 127.0.0.1, so startup stops and says what to set.
    """
    ports: dict[str, int] = {}
    for listener in config.server.listen:
        ports.setdefault(listener.transport, listener.port)
    host = config.proxy.advertise
    if host:
        name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
        if port.isascii() and port.isdigit():
            host = name
            ports = {t: int(port) if t == "UDP" else p for t, p in ports.items()}
        return host, ports
    if config.server.addresses:
        return config.server.addresses[0], ports
    for listener in config.server.listen:
        if listener.interface not in ("", "0.0.0.0", "::"):
            return listener.interface, ports
    others = sorted(a for a in addresses if ":" not in a and not a.startswith("127."))
    routed = find_address()
    if routed:
        also = [a for a in others if a != routed]
        if not quiet:
            log.info("Advertising {address} in Via and Record-Route: the source address of the default route"
                     "{others} (set proxy.advertise to choose)", address=routed,
                     others=f"; this host also has {', '.join(also)}" if also else "")
        return routed, ports
    if others:
        if not quiet:
            log.info("Advertising {address} in Via and Record-Route (set proxy.advertise to choose)", address=others[0])
        return others[0], ports
    if all(is_loopback(lst.interface) for lst in config.server.listen):
        return "127.0.0.1", ports
    raise ConfigError(config.path, "proxy.advertise", "no routable address of this host found (the hostname "
                      "resolves to loopback only): set it to the address the phones reach this proxy at")


def identity_from_config(config: ProxyConfig, find_address=default_route_address, quiet: bool = False,
                         worker: int | None = None) -> Identity:
    addresses = local_addresses(config)
    host, ports = _advertised(config, addresses, find_address, quiet)
    return Identity(domains=frozenset(config.server.domains), addresses=addresses | {host},
                    ports=frozenset(lst.port for lst in config.server.listen), domain=config.server.domains[0],
                    advertise_host=host, advertise_ports=tuple(sorted(ports.items())), worker=worker)


def build_core(config: ProxyConfig, clock: IReactorTime, transports, *, resolver=None, tracer=None,
               worker: int | None = None, workers: int = 1, reactor=None) -> Core:
    """The whole core for `config`; `resolver` is a twisted.names IResolver (None: names do not resolve).

    `worker`: this process's number when the server runs on several (proxy/workers/); 0 is the primary,
    the one that writes the state files and says things once. None: the only process.
    `reactor`: what connects to a shared store (`[location] backend = "redis"`); default `clock`.
    """
    state_dir = config.server.state_dir
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    primary = not worker
    identity = identity_from_config(config, quiet=not primary, worker=worker)
    nat = NatPolicy(config.registrar.nat_mode)
    replies = Replies(clock, transports, nat=nat, server_header=config.server.server_header)

    plugins = PluginHost()  # service.py adds the enabled plugins; everything here talks to the host from the start
    shared = config.server.shared  # what every node must agree on: users, nonce and route secrets
    os.makedirs(shared, mode=0o700, exist_ok=True)
    node = config.server.node_name
    several_nodes = config.location.backend == "redis"
    credentials = FileCredentials(os.path.join(shared, USERS_FILE), clock)
    authenticator = DigestAuthenticator(clock, credentials, config.realm, load_secret(shared), config.auth,
                                        names_this_server=identity.is_me, observer=plugins.emit, worker=worker,
                                        node=node if several_nodes else "")
    trust = Trust(config.proxy.trusted, load_route_signer(shared), authenticator, credentials,
                  is_our_domain=identity.is_our_domain)

    if several_nodes:
        from proxy.registration.redis_location import RedisLocationService
        from proxy.redis.store import RedisStore
        from proxy.routing.redis_forwarding import RedisForwardingStore
        from proxy.service import load_trust_root

        store = RedisStore(reactor or clock, config.location, node, trust_root=load_trust_root(config.tls.ca_file),
                           quiet=not primary)
        location = RedisLocationService(store, clock, node, primary=primary)
        forwarding_store = RedisForwardingStore(store)
    else:
        location = SqliteLocationService(os.path.join(state_dir, LOCATION_FILE), clock, group_commit=True,
                                         persist=primary, node=node)
        forwarding_store = ForwardingStore(os.path.join(state_dir, LOCATION_FILE), db=location.database)
    if primary:  # (a worker's changes reach the primary's location, whose observers tell the plugins)
        location.add_observer(lambda event, binding: plugins.listening and plugins.emit(f"registration_{event}",
                                                                                        binding=binding))
    forwarding = Forwarding(forwarding_store, identity, max_depth=config.forwarding.max_depth,
                            has_bindings=lambda user: bool(location.lookup(identity.aor(user))))

    routes = RouteTable(config.routes, config.emergency)
    plan = routes.emergency_plan()
    if not primary:
        pass  # the primary has said it
    elif not plan:
        log.error("EMERGENCY CALLS CANNOT BE PLACED: {numbers} get 503. Set [emergency] gateways (or a [[routes]] "
                  "entry to a PSTN gateway) in {path}", numbers="/".join(config.emergency.patterns), path=config.path)
    elif not config.emergency.gateways:
        log.warn("Emergency calls ({numbers}) go {plan}", numbers="/".join(config.emergency.patterns), plan=plan)
    gateways = GatewayHealth(clock)
    targets = Targets(identity, location, credentials, routes, NextHopResolver(resolver), nat, gateways)
    hops = Hops(identity, trust.signer, config.realm)
    dialogs = DialogTable(clock, max_seconds=config.proxy.max_call_seconds, worker=worker,
                          on_record=lambda record: plugins.listening and plugins.emit("call_record", record=record))
    transfers = None
    if config.transfer.complete_also:
        transfers = TransferService(clock, transactions=lambda: server.transactions, replies=replies,
                                    identity=identity, targets=targets, dialogs=dialogs,
                                    also_capable=config.transfer.also_capable, ring_timeout=config.transfer.ring_timeout,
                                    worker=worker, workers=workers)
    router = Router(clock=clock, replies=replies, identity=identity, trust=trust, hops=hops, targets=targets,
                    routes=routes, settings=config.proxy,
                    redirect=RedirectServer(identity, location, replies, config.forwarding),
                    forwarding=forwarding, forwarding_config=config.forwarding, plugins=plugins,
                    dialogs=dialogs, transfers=transfers, debug=config.server.debug)
    stateless = StatelessForwarder(identity, trust, hops, targets, transports, replies)
    on_ack = stateless.ack if transfers is None else (
        lambda request, source: transfers.ack_received(request) or stateless.ack(request, source))
    registrar = Registrar(clock=clock, replies=replies, location=location, authenticator=authenticator,
                          config=config.registrar, identity=identity)

    shedder = LoadShedder(clock, threshold=config.server.overload_lag, retry_after=config.server.overload_retry_after)
    dispatcher = Dispatcher(replies, identity, methods={"REGISTER": registrar.handle}, route=router.route,
                            on_cancel=router.cancel, on_ack=on_ack,
                            on_stray_response=stateless.stray_response, retry_after=shedder.retry_after_value)
    server = SipServer(clock, transports, identity, config.timers, user=dispatcher, replies=replies,
                       max_message_size=config.server.max_message_size, debug=config.server.debug,
                       max_transactions=config.server.max_transactions, tracer=tracer, shedder=shedder,
                       screens=plugins)
    prober = GatewayProber(clock, gateways, server.transactions, targets.resolve, identity)
    keepalive = Keepalive(clock, server.transactions, location, identity, nat,
                          interval=config.registrar.keepalive_interval, on_event=plugins.emit)
    checksync = CheckSync(clock, server.transactions, location,
                          advertise=(identity.advertise_host, identity.port_for("UDP")),
                          tftp_root=config.checksync.tftp_root, nat=nat, from_user=config.checksync.from_user,
                          via=identity.via_value)
    srst = None
    if config.srst.role and primary:
        from proxy.service import load_trust_root
        from proxy.srst.node import SrstNode

        srst = SrstNode(reactor or clock, config, location=location, forwarding_store=forwarding_store,
                        users_path=os.path.join(shared, USERS_FILE), node=node,
                        trust_root=load_trust_root(config.tls.ca_file) if config.srst.tls else None)
        if srst.secret_created:
            log.warn("SRST: a new shared secret was written to {path}: copy it to every peer (same path there, or "
                     "[srst] secret_file), or their pulls are refused", path=srst.secret_path)
    return Core(identity=identity, replies=replies, server=server, dispatcher=dispatcher, credentials=credentials,
                authenticator=authenticator, trust=trust, location=location, forwarding_store=forwarding_store,
                forwarding=forwarding, registrar=registrar, router=router, stateless=stateless, checksync=checksync,
                keepalive=keepalive, gateways=gateways, prober=prober, plugins=plugins, shedder=shedder, dialogs=dialogs,
                transfers=transfers, srst=srst,
                verbosity=RuntimeVerbosity(clock, (server, router), configured=config.server.debug))
