"""The TOML configuration, read into frozen attrs classes.

Every key is known: an unknown key, a wrong type or a bad value stops
startup with `ConfigError(file, key, reason)`, e.g.
`etc/sipproxy.toml: timers.t1: must be a number greater than 0`.
Every key has a default, so the server runs with no file at all.
"""

import ipaddress
import os
import re
import tomllib

import attrs

from proxy.errors import ConfigError
from proxy.transaction import Timers  # [timers] is read straight into the transaction layer's value

DEFAULT_LISTEN = ("udp:5060", "tcp:5060")


@attrs.frozen
class ListenerConfig:
    """One listener: `udp:PORT[:interface=ADDR]`, or a Twisted stream endpoint (tcp:, ssl:, tls:)."""

    transport: str  # UDP, TCP or TLS
    port: int
    interface: str
    description: str

    @classmethod
    def parse(cls, text: str) -> "ListenerConfig":
        kind, _, rest = text.partition(":")
        kind = kind.lower()
        transport = {"udp": "UDP", "udp6": "UDP", "tcp": "TCP", "tcp6": "TCP", "ssl": "TLS", "tls": "TLS"}.get(kind)
        if transport is None:
            raise ValueError(f"unknown listener type {kind!r} (use udp:, tcp:, ssl: or tls:)")
        parts = rest.split(":") if rest else []
        port = None
        interface = ""
        for part in parts:
            name, eq, value = part.partition("=")
            if not eq and port is None and name.isdigit():
                port = int(name)
            elif eq and name in ("port",):
                port = int(value) if value.isdigit() else None
            elif eq and name == "interface":
                interface = value
            elif eq:
                continue  # other endpoint options (certKey, privateKey...) go to strports
            else:
                raise ValueError(f"cannot read {text!r}")
        if port is None or not 0 <= port <= 65535:
            raise ValueError(f"{text!r} has no valid port")
        if kind.startswith("udp") and any("=" in p and not p.startswith("interface=") for p in parts):
            raise ValueError(f"{text!r}: udp takes only interface=")
        return cls(transport=transport, port=port, interface=interface, description=text)


@attrs.frozen
class ServerConfig:
    domains: tuple[str, ...] = ("localhost",)
    addresses: tuple[str, ...] = ()
    listen: tuple[ListenerConfig, ...] = tuple(ListenerConfig.parse(d) for d in DEFAULT_LISTEN)
    state_dir: str = "state"
    max_message_size: int = 65507
    tcp_idle_timeout: float = 300.0
    max_transactions: int = 100_000  # server transactions at once; past it new requests get 503
    max_connections: int = 2_000  # TCP/TLS connections at once, per listener
    server_header: str = "sipproxy"
    debug: bool = False  # a log line per SIP message
    overload_lag: float = 0.15  # load shedding (proxy/overload.py): a new request's wait that gets it a 503; 0: off
    overload_retry_after: int = 10  # a shed request's Retry-After: spread over [this, 2 * this] seconds
    udp_receive_buffer: int = 4 * 1024 * 1024  # bytes asked for (capped at net.core.rmem_max): a flood queues, not dropped
    workers: int = 0  # processes serving SIP (proxy/workers/); 0 ("auto"): one per core
    node: str = ""  # this node's name among several (docs/scaling.md); empty: the host name
    # Where the files every node must agree on live: users.json, nonce-secret, route-secret. Empty: state_dir.
    shared_dir: str = ""

    @property
    def shared(self) -> str:
        return self.shared_dir or self.state_dir

    @property
    def node_name(self) -> str:
        import socket

        return self.node or socket.gethostname()


@attrs.frozen
class LocationConfig:
    """Where bindings and forwarding settings are kept: the embedded SQLite file, or Redis shared by all nodes."""

    backend: str = "sqlite"  # or "redis"
    urls: tuple[str, ...] = ()  # redis://[:password@]host:port/db, rediss:// for TLS ([tls] ca_file checks it)
    sentinels: tuple[str, ...] = ()  # "host:port" of Redis Sentinels; then `service` names the primary
    service: str = "sipproxy"
    password: str = ""
    prefix: str = "sipproxy:"  # every key and the channel start with it (several sites on one Redis)
    timeout: float = 0.5  # a command unanswered this long: the connection is dropped, the REGISTER gets 503
    wait_replicas: int = 0  # a 200 waits until this many replicas have the binding (Redis WAIT)
    max_pending: int = 10_000  # commands waiting at once, per process; past it new ones fail at once


@attrs.frozen
class SrstConfig:
    """SIP-SRST replication with the other side (docs/srst.md): off unless `role` is set."""

    role: str = ""  # "primary" (the central proxy) or "backup" (a branch's); "": no replication
    peers: tuple[str, ...] = ()  # host[:port] of each peer's [srst] listen (port 5070); a backup has one: `peer`
    listen: str = "tcp:5070"  # where this node serves its changes (beyond loopback: ssl: only)
    secret_file: str = ""  # the secret both sides share; empty: <shared_dir>/srst-secret
    tls: bool = False  # pull from the peers over HTTPS, checked against [tls] ca_file
    backlog: int = 10_000  # changes kept for a peer; further behind, it resynchronises from a snapshot
    interval: float = 0.5  # seconds between pulls


@attrs.frozen
class RegistrarConfig:
    min_expires: int = 60
    max_expires: int = 3600
    default_expires: int = 3600
    # Answer with an expiry randomised down to this percentage below the
    # requested one, so phones rebooted together do not refresh together.
    expires_range: int = 0
    # Where requests (and responses) for NATed phones go: auto, always, never.
    nat_mode: str = "auto"
    # Seconds between OPTIONS to every registered phone (reachability, RTT, NAT keepalive); 0: off.
    keepalive_interval: float = 0.0
    # Contacts one AoR may have at once (phones sharing a line each add one): past it, 403. A bound on what one
    # authenticated user can make the server hold.
    max_contacts: int = 10


@attrs.frozen
class AuthSettings:
    realm: str = ""  # empty: the first domain
    offer_qop: bool = True
    accept_rfc2069: bool = True
    nonce_lifetime: float = 300.0
    nonce_lifetime_no_qop: float = 30.0
    max_failures: int = 10  # per user and source address, within failure_window
    failure_window: float = 60.0
    lockout: float = 300.0
    address_max_failures: int = 100  # per source address (IPv6: /64), any users: spraying
    slow_max_failures: int = 30  # per user, any address, within slow_window: patient guessing
    slow_window: float = 3600.0
    max_tracked: int = 100_000  # bound of each per-peer table (failures, lockouts, replay state)
    accept_uri_of_proxy: bool = True  # a digest uri naming this server (SIPp does that), not only the Request-URI


@attrs.frozen
class AdminConfig:
    listen: str = "tcp:8060:interface=127.0.0.1"
    allow_remote: bool = False  # a non-loopback listener; only with TLS (ssl: or tls:)


@attrs.frozen
class RouteConfig:
    """Where calls that are not for a local user go: a dial pattern or a domain -> gateways, in failover order."""

    gateways: tuple[str, ...]  # "host[:port]" or a SIP URI; names are resolved per RFC 3263
    pattern: str = ""  # regular expression on the dialled user part (full match)
    domain: str = ""  # or: requests for this foreign domain
    strip: int = 0  # leading digits removed before sending
    prefix: str = ""  # digits put in front after stripping
    name: str = ""
    failover_after: float | None = None  # this route's gateways: silent this long -> the next; None: [proxy]'s


@attrs.frozen
class EmergencyConfig:
    """Numbers that always reach the emergency gateways, never challenged or blocked (seed 001 line 1492)."""

    patterns: tuple[str, ...] = ("911", "9911")
    gateways: tuple[str, ...] = ()


@attrs.frozen
class ProxySettings:
    record_route: bool = True
    failover_after: float = 4.0  # a gateway silent this long (not even 100 Trying) -> the next one; 0: Timer B
    forking: str = "parallel"  # or "sequential" (by q)
    timer_c: float = 180.0  # the phones' timer_invite_expires default (seed 001 line 1988)
    trusted: tuple[str, ...] = ()  # networks whose requests are not challenged (gateways, peers)
    outbound_proxy: str = ""  # next hop for foreign domains without a route
    recurse_3xx: bool = True
    max_redirects: int = 5
    advertise: str = ""  # host[:port] put in Via and Record-Route; default: first address or interface
    max_call_seconds: float = 4 * 3600.0  # a call whose BYE never passes is closed (and recorded) after this


@attrs.frozen
class TransferConfig:
    """Bye/Also (seed 001 lines 3456-3457) toward a party that will not act on it: completed by the proxy (proxy/transfer.py)."""

    complete_also: bool = True
    # User-Agents (globs, any case) that act on Also themselves: their BYE is relayed untouched.
    also_capable: tuple[str, ...] = ("Cisco-SIPIPPhone*", "Cisco-CP79*")
    ring_timeout: float = 20.0  # C must answer within this (A retransmits its 200 for 32 s at most)


@attrs.frozen
class ForwardingConfig:
    redirect: bool = False  # answer INVITEs for local users with 302/300 (redirect server, seed 001 line 554)
    redirect_domains: tuple[str, ...] = ()  # or only for these of our domains
    unconditional: str = "proxy"  # or "redirect": the caller gets a 302 to the target (seed 001 line 2918)
    max_depth: int = 5
    feature_codes: bool = True
    always_on: str = "*72"
    always_off: str = "*73"
    busy_on: str = "*90"
    busy_off: str = "*91"
    no_answer_on: str = "*92"
    no_answer_off: str = "*93"


@attrs.frozen
class CheckSyncConfig:
    tftp_root: str = ""  # where syncinfo.xml lives (the phones' TFTP server root)
    rate: float = 1.0  # NOTIFYs per second
    wait_timeout: float = 600.0  # how long --wait waits for a phone to register again
    from_user: str = "webadmin"  # the seed's sample NOTIFY comes from sip:webadmin@...


@attrs.frozen
class PluginsConfig:
    enabled: tuple[str, ...] = ()
    tables: dict = attrs.field(factory=dict, eq=False)  # [plugins.<name>] -> checked by the plugin at startup


@attrs.frozen
class PhoneWebConfig:
    """The phone-facing HTTP site (services_url, directory_url)."""

    listen: str = "tcp:8081"


@attrs.frozen
class TlsConfig:
    """Outgoing TLS (trunks): whom to trust. Empty = the platform's trust store."""

    ca_file: str = ""


@attrs.frozen
class ProxyConfig:
    path: str = "<defaults>"
    server: ServerConfig = ServerConfig()
    timers: Timers = Timers()
    tls: TlsConfig = TlsConfig()
    registrar: RegistrarConfig = RegistrarConfig()
    location: LocationConfig = LocationConfig()
    srst: SrstConfig = SrstConfig()
    auth: AuthSettings = AuthSettings()
    admin: AdminConfig = AdminConfig()
    proxy: ProxySettings = ProxySettings()
    routes: tuple[RouteConfig, ...] = ()
    emergency: EmergencyConfig = EmergencyConfig()
    forwarding: ForwardingConfig = ForwardingConfig()
    transfer: TransferConfig = TransferConfig()
    checksync: CheckSyncConfig = CheckSyncConfig()
    plugins: PluginsConfig = PluginsConfig()
    phone_web: PhoneWebConfig = PhoneWebConfig()

    @property
    def realm(self) -> str:
        return self.auth.realm or self.server.domains[0]


class _Table:
    """Reads one TOML table, remembering which keys were used."""

    def __init__(self, path: str, prefix: str, data: object):
        if not isinstance(data, dict):
            raise ConfigError(path, prefix, "must be a table")
        self.path = path
        self.prefix = prefix
        self.data = data
        self.used: set[str] = set()

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(self.path, f"{self.prefix}.{key}" if self.prefix else key, reason)

    def get(self, key: str, default, kind: type | tuple, check=None, reason: str = ""):
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool:
            raise self.error(key, f"must be {_kind_name(kind)}")
        if not isinstance(value, kind):
            raise self.error(key, f"must be {_kind_name(kind)}")
        if check is not None and not check(value):
            raise self.error(key, reason)
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(key, list(default), (list, tuple))
        if not all(isinstance(v, str) and v for v in value):
            raise self.error(key, "must be a list of non-empty strings")
        return tuple(value)

    def table(self, key: str) -> "_Table":
        self.used.add(key)
        return _Table(self.path, f"{self.prefix}.{key}" if self.prefix else key, self.data.get(key, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kind) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}.get(kind, str(kind))


def load_config(path: str | None) -> ProxyConfig:
    """Read `path` (or only the embedded defaults when None)."""
    if path is None:
        return ProxyConfig()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, "", f"cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}") from None
    _paths_relative_to(data, os.path.dirname(os.path.abspath(path)))
    return parse_config(data, path)


_PATH_KEYS = (("server", "state_dir"), ("server", "shared_dir"), ("srst", "secret_file"), ("checksync", "tftp_root"), ("tls", "ca_file"))


def _paths_relative_to(data: dict, base: str) -> None:
    """Relative paths in a config file mean relative to the file, not to wherever the command was run.

    Otherwise `sipproxy-admin` run from another directory would silently edit another users file.
    (Only well-formed string values are rewritten; anything else is left for parse_config to refuse.)
    """
    for section, key in _PATH_KEYS:
        table = data.get(section)
        if isinstance(table, dict):
            value = table.get(key)
            if isinstance(value, str) and value and not os.path.isabs(value):
                table[key] = os.path.normpath(os.path.join(base, value))


def parse_config(data: dict, path: str = "<config>") -> ProxyConfig:
    root = _Table(path, "", data)
    server = _parse_server(root.table("server"))
    timers = _parse_timers(root.table("timers"))
    tls = _parse_tls(root.table("tls"))
    registrar = _parse_registrar(root.table("registrar"))
    location = _parse_location(root.table("location"))
    srst = _parse_srst(root.table("srst"))
    auth = _parse_auth(root.table("auth"))
    admin = _parse_admin(root.table("admin"))
    proxy = _parse_proxy(root.table("proxy"))
    routes = _parse_routes(root, path)
    emergency = _parse_emergency(root.table("emergency"))
    forwarding = _parse_forwarding(root.table("forwarding"))
    transfer = _parse_transfer(root.table("transfer"))
    checksync = _parse_checksync(root.table("checksync"))
    plugins = _parse_plugins(root.table("plugins"))
    phone_web = _parse_phone_web(root.table("phone_web"))
    root.finish()
    return ProxyConfig(path=path, server=server, timers=timers, tls=tls, registrar=registrar, location=location, srst=srst,
                       auth=auth, admin=admin,
                       proxy=proxy, routes=routes, emergency=emergency, forwarding=forwarding, checksync=checksync,
                       plugins=plugins, phone_web=phone_web, transfer=transfer)


def _parse_transfer(t: _Table) -> TransferConfig:
    d = TransferConfig()
    config = TransferConfig(
        complete_also=t.get("complete_also", d.complete_also, bool),
        also_capable=t.strings("also_capable", d.also_capable),
        ring_timeout=t.get("ring_timeout", d.ring_timeout, float, lambda v: 1 <= v <= 30,
                           "must be 1 to 30 seconds (A gives up on its 200 after 32 s)"),
    )
    t.finish()
    return config


def _parse_plugins(t: _Table) -> PluginsConfig:
    enabled = t.strings("enabled", ())
    tables = {}
    for key, value in t.data.items():
        if key == "enabled":
            continue
        if not isinstance(value, dict):
            raise t.error(key, "must be a table ([plugins.<name>])")
        t.used.add(key)
        tables[key] = value
    t.finish()
    return PluginsConfig(enabled=enabled, tables=tables)


def _parse_phone_web(t: _Table) -> PhoneWebConfig:
    listen = t.get("listen", PhoneWebConfig().listen, str, bool, "must not be empty")
    if listen.split(":", 1)[0] not in ("tcp", "tcp6", "ssl", "tls", "unix"):
        raise t.error("listen", "must be a stream endpoint such as tcp:8081")
    t.finish()
    return PhoneWebConfig(listen=listen)


def _parse_checksync(t: _Table) -> CheckSyncConfig:
    d = CheckSyncConfig()
    root = t.get("tftp_root", d.tftp_root, str)
    if root and not os.path.isdir(root):
        raise t.error("tftp_root", f"no such directory: {root}")
    config = CheckSyncConfig(
        tftp_root=root,
        rate=t.get("rate", d.rate, float, lambda v: 0.01 <= v <= 100, "must be 0.01 to 100 per second"),
        wait_timeout=t.get("wait_timeout", d.wait_timeout, float, lambda v: v >= 10, "must be at least 10 seconds"),
        from_user=t.get("from_user", d.from_user, str, lambda v: bool(re.fullmatch(r"[A-Za-z0-9._-]+", v)),
                        "must be a plain user name"),
    )
    t.finish()
    return config


def _parse_forwarding(t: _Table) -> ForwardingConfig:
    d = ForwardingConfig()
    codes = {}
    for key in ("always_on", "always_off", "busy_on", "busy_off", "no_answer_on", "no_answer_off"):
        codes[key] = t.get(key, getattr(d, key), str, lambda v: bool(re.fullmatch(r"[*#0-9]{1,6}", v)),
                           "must be 1 to 6 of *, # and digits")
    if len(set(codes.values())) != len(codes):
        raise t.error("always_on", "feature codes must all differ")
    config = ForwardingConfig(
        redirect=t.get("redirect", d.redirect, bool),
        redirect_domains=tuple(x.lower() for x in t.strings("redirect_domains", d.redirect_domains)),
        unconditional=t.get("unconditional", d.unconditional, str, lambda v: v in ("proxy", "redirect"),
                            "must be proxy or redirect"),
        max_depth=t.get("max_depth", d.max_depth, int, lambda v: 1 <= v <= 20, "must be 1 to 20"),
        feature_codes=t.get("feature_codes", d.feature_codes, bool),
        **codes,
    )
    t.finish()
    return config


def _check_regex(t: "_Table", key: str, pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise t.error(key, f"not a valid regular expression: {e}") from None
    return pattern


def _check_hops(t: "_Table", key: str, hops: tuple[str, ...]) -> tuple[str, ...]:
    from proxy.sip.uri import SipUri

    for hop in hops:
        text = hop if hop.startswith(("sip:", "sips:")) else f"sip:{hop}"
        try:
            SipUri.parse(text)
        except Exception:
            raise t.error(key, f"{hop!r} is not host[:port] or a SIP URI") from None
    return hops


def _parse_proxy(t: _Table) -> ProxySettings:
    d = ProxySettings()
    trusted = t.strings("trusted", d.trusted)
    for network in trusted:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise t.error("trusted", f"{network!r} is not an address or network") from None
    outbound = t.get("outbound_proxy", d.outbound_proxy, str)
    if outbound:
        _check_hops(t, "outbound_proxy", (outbound,))
    config = ProxySettings(
        record_route=t.get("record_route", d.record_route, bool),
        failover_after=t.get("failover_after", d.failover_after, float, lambda v: v >= 0, "must be 0 or more"),
        forking=t.get("forking", d.forking, str, lambda v: v in ("parallel", "sequential"), "must be parallel or sequential"),
        timer_c=t.get("timer_c", d.timer_c, float, lambda v: v >= 1, "must be at least 1 (seconds)"),
        trusted=trusted,
        outbound_proxy=outbound,
        recurse_3xx=t.get("recurse_3xx", d.recurse_3xx, bool),
        max_redirects=t.get("max_redirects", d.max_redirects, int, lambda v: 0 <= v <= 20, "must be 0 to 20"),
        advertise=t.get("advertise", d.advertise, str),
        max_call_seconds=t.get("max_call_seconds", d.max_call_seconds, float, lambda v: v >= 60,
                               "must be at least 60 (seconds)"),
    )
    t.finish()
    return config


def _parse_routes(root: _Table, path: str) -> tuple[RouteConfig, ...]:
    root.used.add("routes")
    items = root.data.get("routes", [])
    if not isinstance(items, list):
        raise ConfigError(path, "routes", "must be an array of tables ([[routes]])")
    routes = []
    for i, item in enumerate(items):
        t = _Table(path, f"routes[{i}]", item)
        pattern = t.get("pattern", "", str)
        domain = t.get("domain", "", str).lower()
        if bool(pattern) == bool(domain):
            raise t.error("pattern", "give exactly one of pattern (dialled digits) or domain")
        gateways = t.strings("gateways", ())
        if not gateways:
            raise t.error("gateways", "must name at least one gateway")
        routes.append(RouteConfig(
            pattern=_check_regex(t, "pattern", pattern) if pattern else "",
            domain=domain,
            gateways=_check_hops(t, "gateways", gateways),
            strip=t.get("strip", 0, int, lambda v: v >= 0, "must be 0 or more"),
            prefix=t.get("prefix", "", str),
            name=t.get("name", pattern or domain, str),
            failover_after=t.get("failover_after", None, float, lambda v: v >= 0, "must be 0 (Timer B) or more"),
        ))
        t.finish()
    return tuple(routes)


def _parse_emergency(t: _Table) -> EmergencyConfig:
    d = EmergencyConfig()
    patterns = tuple(_check_regex(t, "patterns", p) for p in t.strings("patterns", d.patterns))
    gateways = _check_hops(t, "gateways", t.strings("gateways", d.gateways))
    t.finish()
    return EmergencyConfig(patterns=patterns, gateways=gateways)


_POSITIVE = (lambda v: v > 0, "must be greater than 0")


def _parse_registrar(t: _Table) -> RegistrarConfig:
    d = RegistrarConfig()
    min_e = t.get("min_expires", d.min_expires, int, lambda v: v >= 1, "must be at least 1")
    max_e = t.get("max_expires", d.max_expires, int, lambda v: v >= 1, "must be at least 1")
    default_e = t.get("default_expires", d.default_expires, int, lambda v: v >= 1, "must be at least 1")
    if max_e < min_e:
        raise t.error("max_expires", "must not be smaller than min_expires")
    if not min_e <= default_e <= max_e:
        raise t.error("default_expires", "must lie between min_expires and max_expires")
    config = RegistrarConfig(
        min_expires=min_e, max_expires=max_e, default_expires=default_e,
        expires_range=t.get("expires_range", d.expires_range, int, lambda v: 0 <= v <= 90, "must be 0 to 90 (percent)"),
        nat_mode=t.get("nat_mode", d.nat_mode, str, lambda v: v in ("auto", "always", "never"),
                       "must be auto, always or never"),
        keepalive_interval=t.get("keepalive_interval", d.keepalive_interval, float,
                                 lambda v: v == 0 or v >= 10, "must be 0 (off) or at least 10 seconds"),
        max_contacts=t.get("max_contacts", d.max_contacts, int, lambda v: 1 <= v <= 10_000, "must be 1 to 10000"),
    )
    t.finish()
    return config


def _parse_auth(t: _Table) -> AuthSettings:
    d = AuthSettings()
    config = AuthSettings(
        realm=t.get("realm", d.realm, str),
        offer_qop=t.get("offer_qop", d.offer_qop, bool),
        accept_rfc2069=t.get("accept_rfc2069", d.accept_rfc2069, bool),
        nonce_lifetime=t.get("nonce_lifetime", d.nonce_lifetime, float, *_POSITIVE),
        nonce_lifetime_no_qop=t.get("nonce_lifetime_no_qop", d.nonce_lifetime_no_qop, float, *_POSITIVE),
        max_failures=t.get("max_failures", d.max_failures, int, *_POSITIVE),
        failure_window=t.get("failure_window", d.failure_window, float, *_POSITIVE),
        lockout=t.get("lockout", d.lockout, float, lambda v: v >= 0, "must be 0 or more"),
        address_max_failures=t.get("address_max_failures", d.address_max_failures, int, *_POSITIVE),
        slow_max_failures=t.get("slow_max_failures", d.slow_max_failures, int, *_POSITIVE),
        slow_window=t.get("slow_window", d.slow_window, float, *_POSITIVE),
        max_tracked=t.get("max_tracked", d.max_tracked, int, lambda v: v >= 100, "must be at least 100"),
        accept_uri_of_proxy=t.get("accept_uri_of_proxy", d.accept_uri_of_proxy, bool),
    )
    if '"' in config.realm or "\\" in config.realm:
        raise t.error("realm", "must not contain quotes or backslashes")
    t.finish()
    return config


def _parse_admin(t: _Table) -> AdminConfig:
    listen = t.get("listen", AdminConfig().listen, str, bool, "must not be empty")
    kind = listen.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix", "ssl", "tls"):
        raise t.error("listen", "must be a stream endpoint such as tcp:8060:interface=127.0.0.1")
    allow_remote = t.get("allow_remote", False, bool)
    if kind != "unix" and not is_loopback(endpoint_interface(listen)):
        # The admin API reboots phones and changes forwarding: never on the network by accident.
        if not allow_remote:
            raise t.error("listen", "listens beyond loopback; use interface=127.0.0.1, or set allow_remote = true "
                                    "with an ssl: or tls: listener")
        if kind not in ("ssl", "tls"):
            raise t.error("allow_remote", "a remote admin listener must use TLS (ssl: or tls:), not " + kind)
    t.finish()
    return AdminConfig(listen=listen, allow_remote=allow_remote)


def endpoint_interface(description: str) -> str:
    """The `interface=` of a Twisted stream endpoint description ("" when absent: every interface)."""
    parts, current, i = [], [], 0
    while i < len(description):
        ch = description[i]
        if ch == "\\" and i + 1 < len(description):
            current.append(description[i + 1])
            i += 2
            continue
        if ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    for part in parts[1:]:
        name, eq, value = part.partition("=")
        if eq and name == "interface":
            return value
    return ""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_tls(t: _Table) -> TlsConfig:
    ca_file = t.get("ca_file", "", str)
    if ca_file and not os.path.isfile(ca_file):
        raise t.error("ca_file", f"no such file: {ca_file}")
    t.finish()
    return TlsConfig(ca_file=ca_file)


def _parse_server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    domains = tuple(x.lower() for x in t.strings("domains", d.domains))
    if not domains:
        raise t.error("domains", "must name at least one domain")
    listen_text = t.strings("listen", DEFAULT_LISTEN)
    listeners = []
    for text in listen_text:
        try:
            listeners.append(ListenerConfig.parse(text))
        except ValueError as e:
            raise t.error("listen", str(e)) from None
    if not listeners:
        raise t.error("listen", "must name at least one listener")
    server = ServerConfig(
        domains=domains,
        addresses=t.strings("addresses", d.addresses),
        listen=tuple(listeners),
        state_dir=t.get("state_dir", d.state_dir, str, bool, "must not be empty"),
        max_message_size=t.get("max_message_size", d.max_message_size, int, lambda v: 1024 <= v <= 65507,
                               "must be between 1024 and 65507"),
        tcp_idle_timeout=t.get("tcp_idle_timeout", d.tcp_idle_timeout, float, lambda v: v > 0, "must be greater than 0"),
        max_transactions=t.get("max_transactions", d.max_transactions, int, lambda v: v >= 100, "must be at least 100"),
        max_connections=t.get("max_connections", d.max_connections, int, lambda v: v >= 1, "must be at least 1"),
        server_header=t.get("server_header", d.server_header, str),
        debug=t.get("debug", d.debug, bool),
        overload_lag=t.get("overload_lag", d.overload_lag, float, lambda v: 0 <= v <= 10,
                           "must be between 0 (never shed) and 10 seconds"),
        udp_receive_buffer=t.get("udp_receive_buffer", d.udp_receive_buffer, int,
                                 lambda v: 65536 <= v <= 1 << 30, "must be between 65536 and 1073741824 bytes"),
        overload_retry_after=t.get("overload_retry_after", d.overload_retry_after, int, lambda v: 1 <= v <= 3600,
                                   "must be between 1 and 3600 seconds"),
        workers=_parse_workers(t, d.workers),
        node=t.get("node", d.node, str, lambda v: v == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", v),
                   "must be letters, digits, '.', '_' or '-' (at most 63)"),
        shared_dir=t.get("shared_dir", d.shared_dir, str),
    )
    t.finish()
    return server


def _parse_location(t: _Table) -> LocationConfig:
    from proxy.redis.client import RedisAddress

    d = LocationConfig()
    backend = t.get("backend", d.backend, str, lambda v: v in ("sqlite", "redis"), 'must be "sqlite" or "redis"')
    urls = t.strings("urls", d.urls)
    password = t.get("password", d.password, str)
    for url in urls:
        try:
            RedisAddress.parse(url, password)
        except ValueError as e:
            raise t.error("urls", str(e)) from None
    sentinels = t.strings("sentinels", d.sentinels)
    for sentinel in sentinels:
        host, _, port = sentinel.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise t.error("sentinels", f"{sentinel!r}: must be host:port")
    if backend == "redis" and not urls and not sentinels:
        raise t.error("backend", 'redis needs urls = ["redis://host:6379/0"] or sentinels = ["host:26379", ...]')
    config = LocationConfig(
        backend=backend, urls=urls, sentinels=sentinels, password=password,
        service=t.get("service", d.service, str, bool, "must not be empty"),
        prefix=t.get("prefix", d.prefix, str, lambda v: 0 < len(v) <= 64 and " " not in v,
                     "must be 1 to 64 characters, no spaces"),
        timeout=t.get("timeout", d.timeout, float, lambda v: 0.05 <= v <= 10, "must be 0.05 to 10 seconds"),
        wait_replicas=t.get("wait_replicas", d.wait_replicas, int, lambda v: 0 <= v <= 16, "must be 0 to 16"),
        max_pending=t.get("max_pending", d.max_pending, int, lambda v: 100 <= v <= 1_000_000,
                          "must be 100 to 1000000"),
    )
    t.finish()
    return config


def _parse_srst(t: _Table) -> SrstConfig:
    d = SrstConfig()
    role = t.get("role", d.role, str, lambda v: v in ("", "primary", "backup"), 'must be "primary" or "backup"')
    peers = t.strings("peers", d.peers)
    peer = t.get("peer", "", str)
    if peer:
        if peers:
            raise t.error("peer", "give peer (a backup's primary) or peers (a primary's backups), not both")
        peers = (peer,)
    # "hq.example.com" means the default port of the link (5070)
    peers = tuple(v if v.rpartition(":")[2].isdigit() and not v.endswith("]") else f"{v}:5070" for v in peers)
    for value in peers:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise t.error("peers" if not peer else "peer", f"{value!r}: must be host:port (the peer's [srst] listen)")
    if role and not peers:
        raise t.error("role", f"a {role} needs {'peer' if role == 'backup' else 'peers'} to replicate with")
    if role == "backup" and len(peers) != 1:
        raise t.error("peers", "a backup replicates with one primary: peer = \"hq.example.com:5070\"")
    listen = t.get("listen", d.listen, str, bool, "must not be empty")
    tls = t.get("tls", d.tls, bool)
    if role:
        kind = listen.partition(":")[0].lower()
        interface = endpoint_interface(listen)
        if kind not in ("ssl", "tls") and not is_loopback(interface):
            raise t.error("listen", "the link carries the users' HA1 hashes: beyond loopback it must be TLS "
                                    '("ssl:5070:privateKey=key.pem:certKey=cert.pem"), or bind it to 127.0.0.1')
        for value in peers:
            if not tls and not is_loopback(value.rpartition(":")[0].strip("[]")):
                raise t.error("tls", f"the peer {value} is not on this host: set tls = true (HTTPS, checked "
                                     "against [tls] ca_file)")
    config = SrstConfig(
        role=role, peers=peers, listen=listen, tls=tls,
        secret_file=t.get("secret_file", d.secret_file, str),
        backlog=t.get("backlog", d.backlog, int, lambda v: 100 <= v <= 10_000_000, "must be 100 to 10000000"),
        interval=t.get("interval", d.interval, float, lambda v: 0.1 <= v <= 60, "must be 0.1 to 60 seconds"),
    )
    t.finish()
    return config


def _parse_workers(t: _Table, default: int) -> int:
    """`workers = "auto"` (one process per core: 0 here) or a count from 1 (one process) to 64."""
    value = t.get("workers", "auto" if default == 0 else default, (int, str))
    if value == "auto":
        return 0
    if isinstance(value, str) or not 1 <= value <= 64:
        raise t.error("workers", 'must be "auto" (one per core) or a number of processes from 1 to 64')
    return value


def _parse_timers(t: _Table) -> Timers:
    d = Timers()
    positive = (lambda v: v > 0, "must be a number greater than 0")
    t1 = t.get("t1", d.t1, float, *positive)
    t2 = t.get("t2", d.t2, float, *positive)
    t4 = t.get("t4", d.t4, float, *positive)
    if t2 < t1:
        raise t.error("t2", "must not be smaller than t1")
    t.finish()
    return Timers(t1=t1, t2=t2, t4=t4)
