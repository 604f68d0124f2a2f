"""Where directory entries come from: LDAP through ldap3 (in threads), or the local users.

Both answer `search(first, last, number)` with a Deferred list of
(name, number), sorted by name. LDAP calls run on a bounded thread pool the
plugin owns, never on the reactor, and are given up after `timeout`.
"""

import ssl
import threading

from twisted.internet import defer, threads
from twisted.logger import Logger

from plugins.ldapdir.config import DirectoryConfig

log = Logger()


class DirectoryUnavailable(Exception):
    """The backend is down or too slow; the phone gets a clear text, not a hang."""


def escape_filter_value(value: str) -> str:
    """RFC 4515 section 3: what the user typed is matched literally, never as filter syntax."""
    out = []
    for ch in value:
        if ch in "*()\\\x00":
            out.append("\\%02x" % ord(ch))
        else:
            out.append(ch)
    return "".join(out)


def build_filter(config: DirectoryConfig, first: str, last: str, number: str) -> str:
    terms = []
    if first:
        terms.append(f"({config.first_name_attribute}={escape_filter_value(first)}*)")
    if last:
        terms.append(f"({config.last_name_attribute}={escape_filter_value(last)}*)")
    if number:
        esc = escape_filter_value(number)
        terms.append("(|" + "".join(f"({a}={esc}*)" for a in config.number_attributes) + ")")
    return f"(&{config.search_filter}{''.join(terms)})"


def _sorted(entries):
    return sorted(entries, key=lambda e: (e[0].casefold(), e[1]))


class LocalDirectory:
    """The users of this server: display name (or user name) and the user name as the number."""

    def __init__(self, credentials):
        self.credentials = credentials

    def search(self, first: str, last: str, number: str) -> defer.Deferred:
        out = []
        for user in self.credentials.users():
            name = user.display_name or user.name
            words = name.split()
            if first and not (words and words[0].casefold().startswith(first.casefold())):
                continue
            if last and not any(w.casefold().startswith(last.casefold()) for w in words[1:] or words):
                continue
            if number and not user.name.startswith(number):
                continue
            out.append((name, user.name))
        return defer.succeed(_sorted(out))


class LdapDirectory:
    """LDAP (OpenLDAP, Active Directory) through ldap3, one connection per worker thread, failover across urls."""

    def __init__(self, config: DirectoryConfig, threadpool, reactor):
        import ldap3

        self.ldap3 = ldap3
        self.config = config
        self.threadpool = threadpool
        self.reactor = reactor
        self._local = threading.local()
        tls = None
        if any(u.startswith("ldaps://") for u in config.urls) or config.starttls:
            tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=config.ca_file or None)
        # ldap3 packs these into socket options: whole seconds.
        self._timeout = max(1, int(round(config.timeout)))
        servers = [ldap3.Server(url, connect_timeout=self._timeout, tls=tls, get_info=ldap3.NONE)
                   for url in config.urls]
        self.pool = ldap3.ServerPool(servers, ldap3.FIRST, active=1, exhaust=30)
        self.down = False

    def _connection(self):
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and conn.bound:
            return conn
        ldap3 = self.ldap3
        conn = ldap3.Connection(self.pool, user=self.config.bind_dn or None, password=self.config.bind_password or None,
                                receive_timeout=self._timeout, read_only=True, check_names=False,
                                raise_exceptions=True, auto_bind=ldap3.AUTO_BIND_NONE)
        conn.open()
        if self.config.starttls:
            conn.start_tls()
        conn.bind()
        self._local.conn = conn
        return conn

    def _search_blocking(self, ldap_filter: str) -> list[tuple[str, str]]:
        attributes = list(self.config.name_attributes) + list(self.config.number_attributes)
        for attempt in (1, 2):
            try:
                conn = self._connection()
                conn.search(self.config.base_dn, ldap_filter, attributes=attributes, size_limit=self.config.size_limit,
                            time_limit=max(1, int(self.config.timeout)))
                return self._entries(conn.response or [])
            except self.ldap3.core.exceptions.LDAPSizeLimitExceededResult:
                return self._entries(conn.response or [])
            except self.ldap3.core.exceptions.LDAPException:
                self._local.conn = None
                if attempt == 2:
                    raise
        return []

    def _entries(self, response) -> list[tuple[str, str]]:
        out = []
        for item in response:
            if item.get("type") != "searchResEntry":
                continue
            values = item.get("attributes", {})
            name = next((_first(values.get(a)) for a in self.config.name_attributes if _first(values.get(a))), "")
            for attribute in self.config.number_attributes:
                for number in _all(values.get(attribute)):
                    out.append((name or number, number))
        return _sorted(out)

    def search(self, first: str, last: str, number: str) -> defer.Deferred:
        ldap_filter = build_filter(self.config, first, last, number)
        d = threads.deferToThreadPool(self.reactor, self.threadpool, self._search_blocking, ldap_filter)
        d.addTimeout(self.config.timeout + 0.5, self.reactor)

        def ok(entries):
            if self.down:
                self.down = False
                log.info("LDAP directory is answering again")
            return entries

        def failed(failure):
            if not self.down:
                self.down = True
                log.error("LDAP directory unavailable: {error} (logged once until it answers again)",
                          error=failure.getErrorMessage() or failure.type.__name__)
            raise DirectoryUnavailable(str(failure.value))

        return d.addCallbacks(ok, failed)


def _first(value):
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value) if value else ""


def _all(value):
    if isinstance(value, list):
        return [str(v) for v in value if v]
    return [str(value)] if value else []
