"""The metrics plugin: a collector that reads the core's own counters at scrape time.

Nothing is counted twice and nothing is added to the per-message path: the
core already keeps plain counters (requests, replies, drops, transactions,
retransmissions, registrations, auth, calls, forwards, redirects, NOTIFYs);
`SipProxyCollector.collect()` turns them into metric families when Prometheus
scrapes. Only the two histograms are fed by events (once per call, once per
directory search).

Label values are bounded: methods outside the known set become "other",
codes are numbers 100-699, reasons and kinds come from fixed sets, firmware is
the version parsed from User-Agent. No user names, Call-IDs or addresses.
"""

import hmac

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.application import service, strports
from twisted.web import resource
from zope.interface import implementer

from proxy import __version__
from proxy.inventory import phones
from proxy.plugin import IEventObserver, IProxyPlugin, IServicePlugin, IWebResources
from proxy.server import ALLOWED_METHODS

_KNOWN_METHODS = frozenset(ALLOWED_METHODS)


def _method(method: str) -> str:
    return method if method in _KNOWN_METHODS else "other"


def _family(kind, name: str, documentation: str, label: str, items) -> object:
    """A metric family with one label, from (label value, number) pairs, in label order."""
    family = kind(name, documentation, labels=[label])
    for key, count in sorted(items, key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], count)
    return family


class SipProxyCollector:
    def __init__(self, context):
        self.context = context

    def collect(self):
        c = self.context
        srv = c.server
        requests = CounterMetricFamily("sipproxy_requests", "SIP requests received, by method", labels=["method"])
        by_method: dict[str, int] = {}
        for method, count in srv.requests.items():
            by_method[_method(method)] = by_method.get(_method(method), 0) + count
        for method, count in sorted(by_method.items()):
            requests.add_metric([method], count)
        yield requests

        replies = CounterMetricFamily("sipproxy_replies", "SIP responses this server sent, by request method and code",
                                      labels=["method", "code"])
        merged: dict[tuple[str, str], int] = {}
        for (method, code), count in srv.replies.items():
            key = (_method(method), str(code))
            merged[key] = merged.get(key, 0) + count
        for (method, code), count in sorted(merged.items()):
            replies.add_metric([method, code], count)
        yield replies

        yield _family(CounterMetricFamily, "sipproxy_messages_dropped", "Messages dropped unanswered, by reason",
                      "reason", srv.dropped.items())
        yield _family(GaugeMetricFamily, "sipproxy_transactions", "Transactions in progress, by kind", "kind",
                      srv.transactions.counts().items())
        yield CounterMetricFamily("sipproxy_retransmissions", "Requests and responses retransmitted by timers",
                                  value=srv.transactions.retransmissions)

        bindings = c.location.all_bindings()
        yield GaugeMetricFamily("sipproxy_registered_contacts", "Current registered contacts", value=len(bindings))
        yield GaugeMetricFamily("sipproxy_registered_aors", "Addresses of record with a registration",
                                value=len({b.aor for b in bindings}))
        by_firmware: dict[str, int] = {}
        for phone in phones(bindings):
            key = phone.firmware or "unknown"
            by_firmware[key] = by_firmware.get(key, 0) + 1
        yield _family(GaugeMetricFamily, "sipproxy_phones", "Registered phones, by firmware", "firmware",
                      by_firmware.items())
        yield _family(CounterMetricFamily, "sipproxy_registrations", "REGISTER outcomes", "result",
                      c.registrar.results.items())

        auth = c.authenticator
        yield CounterMetricFamily("sipproxy_auth_challenges", "Digest challenges sent (401/407)", value=auth.challenges)
        yield _family(CounterMetricFamily, "sipproxy_auth_failures", "Failed authentications, by reason", "reason",
                      auth.failures_by_reason.items())
        yield CounterMetricFamily("sipproxy_auth_lockouts", "Lockouts after repeated failures (all scopes)",
                                  value=auth.lockouts)
        yield _family(CounterMetricFamily, "sipproxy_auth_lockouts_by_scope",
                      "Lockouts by scope: pair (user and address), address (spraying), user (slow guessing)",
                      "scope", auth.lockouts_by_scope.items())
        yield CounterMetricFamily("sipproxy_auth_table_evictions",
                                  "Entries pushed out of the bounded auth tables before their time (a flood)",
                                  value=auth.evicted)
        trust = c.router.trust
        yield _family(CounterMetricFamily, "sipproxy_trust_refused", "Requests not served, by reason", "reason",
                      trust.refused.items())

        router = c.router
        calls = GaugeMetricFamily("sipproxy_calls", "Calls (INVITE transactions) being set up", labels=["state"])
        calls.add_metric(["setup"], sum(1 for call in router.calls.values() if call.request.method == "INVITE"))
        yield calls
        results = CounterMetricFamily("sipproxy_calls_completed", "Call setups finished, by result", labels=["result"])
        results.add_metric(["answered"], router.stats["calls_answered"])
        results.add_metric(["failed"], router.stats["calls_failed"])
        yield results
        yield _family(CounterMetricFamily, "sipproxy_forwards", "Calls forwarded, by kind (RFC 5806 reasons)", "kind",
                      router.forwards.items())
        yield _family(CounterMetricFamily, "sipproxy_redirects", "3xx answers as a redirect server", "code",
                      router.redirects.items())
        yield _family(CounterMetricFamily, "sipproxy_checksync_notifies", "check-sync NOTIFYs, by result", "result",
                      c.checksync.notifies.items())

        directory = c.plugins.get("ldapdir")
        if directory is not None:
            yield CounterMetricFamily("sipproxy_ldap_errors", "Directory searches that failed (LDAP down or slow)",
                                      value=directory.errors)
        info = InfoMetricFamily("sipproxy_build", "sipproxy version")
        info.add_metric([], {"version": __version__})
        yield info


class MetricsResource(resource.Resource):
    isLeaf = True

    def __init__(self, plugin, tokens: tuple[bytes, ...] | None):
        super().__init__()
        self.plugin = plugin
        self.tokens = tokens  # None: no token asked (the plugin's own listener)

    def render_GET(self, request):
        if self.tokens is not None:
            header = request.getHeader(b"authorization") or b""
            scheme, _, given = header.partition(b" ")
            given = given.strip()
            # Every token is compared, so the time taken does not say which one nearly matched.
            matches = [hmac.compare_digest(given, token) for token in self.tokens]
            if scheme.lower() != b"bearer" or not any(matches):
                request.setResponseCode(401)
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="sipproxy-admin"')
                return b"missing or wrong bearer token\n"
        self.plugin.drain()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.plugin.registry)


@implementer(IProxyPlugin, IEventObserver, IWebResources, IServicePlugin)
class MetricsPlugin:
    name = "metrics"

    def __init__(self, config, context):
        self.config = config
        self.context = context
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.registry.register(SipProxyCollector(context))
        self.call_setup = Histogram("sipproxy_call_setup_seconds", "INVITE to first final response",
                                    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180), registry=self.registry)
        self.ldap_query = Histogram("sipproxy_ldap_query_seconds", "Directory search time",
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                    registry=self.registry)
        self._timed: set[int] = set()

    def event(self, name, fields):
        if name not in ("call_answered", "call_ended"):
            return
        call = fields["call"]
        if call.request.method != "INVITE" or id(call) in self._timed:
            if name == "call_ended":
                self._timed.discard(id(call))
            return
        self.call_setup.observe(max(0.0, call.clock.seconds() - call.created_at))
        if name == "call_answered":
            self._timed.add(id(call))

    def drain(self) -> None:
        """Move the directory's recorded search times into the histogram."""
        directory = self.context.plugins.get("ldapdir")
        if directory is not None and directory.query_seconds:
            times, directory.query_seconds = directory.query_seconds, []
            for seconds in times:
                self.ldap_query.observe(seconds)

    def phone_resources(self):
        return {}

    def services_menu(self):
        return []

    def admin_resources(self):
        from proxy.adminapi import load_or_create_metrics_token, load_or_create_token

        # The scrape credential is read-only: <state_dir>/metrics-token. The admin token works too.
        state_dir = self.context.config.server.state_dir
        tokens = (load_or_create_metrics_token(state_dir).encode(), load_or_create_token(state_dir).encode())
        return {b"metrics": MetricsResource(self, tokens)}

    def service(self):
        if not self.config["listen"]:
            return service.Service()
        from proxy.web import bounded_site

        site = bounded_site(MetricsResource(self, None))
        return strports.service(self.config["listen"], site, reactor=self.context.reactor)
