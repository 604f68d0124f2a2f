"""The metrics plugin: a collector that reads the core's own counters at scrape time.

Nothing is counted twice and nothing is added to the per-message path: the
core already keeps plain counters (requests, replies, drops, transactions,
retransmissions, registrations, auth, calls, forwards, redirects, NOTIFYs);
`SipProxyCollector.collect()` turns them into metric families when Prometheus
scrapes, from `context.counters()`. Only the two histograms and the directory
error count are fed by events (call_answered / call_ended with a CallInfo,
directory_search).

Label values are bounded: methods outside the known set become "other",
codes are numbers 100-699, reasons and kinds come from fixed sets, firmware is
the version parsed from User-Agent. No user names, Call-IDs or addresses.
"""

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.application import service, strports
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from proxy import __version__
from proxy.admin.inventory import phones
from proxy.plugin import SIP_METHODS, IEventObserver, IProxyPlugin, IServicePlugin, IWebResources

log = Logger()

_KNOWN_METHODS = frozenset(SIP_METHODS)


def _method(method: str) -> str:
    return method if method in _KNOWN_METHODS else "other"


# Every label value a series can take, so each series exists (at 0) from the first scrape: a rate() or an alert
# on a series that appears only with its first event misses that event.
KNOWN_LABELS = {
    "sipproxy_messages_dropped": ("ack_for_stateless_answer", "bad_response", "framing", "internal_error", "malformed",
                                  "malformed_ack", "screened", "stray_ack", "stray_response", "too_large",
                                  "transaction_table_full", "unsigned_ack"),
    "sipproxy_registrations": ("challenged", "ok", "refused", "rejected"),
    "sipproxy_auth_failures": ("bad_nonce", "malformed", "replay", "unknown_user", "unprovisioned", "uri_mismatch",
                               "wrong_password"),
    "sipproxy_auth_lockouts_by_scope": ("address", "pair", "user"),
    "sipproxy_trust_refused": ("from_mismatch", "relay", "unsigned_ack"),
    "sipproxy_forwards": ("no-answer", "unavailable", "unconditional", "user-busy"),
    "sipproxy_redirects": ("300", "302"),
    "sipproxy_checksync_notifies": ("accepted", "no_answer", "refused"),
    "sipproxy_keepalive": ("answered", "came_back", "sent", "unanswered", "went_silent"),
    "sipproxy_shed": ("after_refusal", "dropped", "invite", "other", "register"),
    "sipproxy_calls": ("on_hold", "ringing", "setup", "transferring", "up"),
    "sipproxy_transfers_completed_by_proxy": ("bridged", "failed"),
}


# The policy plugin's rules and what each does (docs/policy.md), each series there from the first scrape.
_POLICY_SERIES = tuple([(rule, action) for rule in ("classes", "hours", "limits") for action in ("blocked", "would_block")]
                       + [(rule, action) for rule in ("flood", "user_agents", "auth") for action in ("banned", "would_ban")]
                       + [("admin", "banned")])


def _family(kind, name: str, documentation: str, label: str, items) -> object:
    """A metric family with one label, from (label value, number) pairs, in label order; known values start at 0."""
    family = kind(name, documentation, labels=[label])
    values = {str(key): count for key, count in items}
    for key in KNOWN_LABELS.get(name, ()):
        values.setdefault(key, 0)
    for key, count in sorted(values.items()):
        family.add_metric([key], count)
    return family


class SipProxyCollector:
    """Reads `context.counters()` (plain values from the core) and the bindings, at scrape time."""

    def __init__(self, context, plugin):
        self.context = context
        self.plugin = plugin

    def collect(self):
        counters = self.context.counters()
        requests = CounterMetricFamily("sipproxy_requests", "SIP requests received, by method", labels=["method"])
        by_method: dict[str, int] = {}
        for method, count in counters["requests"].items():
            by_method[_method(method)] = by_method.get(_method(method), 0) + count
        for method, count in sorted(by_method.items()):
            requests.add_metric([method], count)
        yield requests

        replies = CounterMetricFamily("sipproxy_replies", "SIP responses this server sent, by request method and code",
                                      labels=["method", "code"])
        merged: dict[tuple[str, str], int] = {}
        for (method, code), count in counters["replies"].items():
            key = (_method(method), str(code))
            merged[key] = merged.get(key, 0) + count
        for (method, code), count in sorted(merged.items()):
            replies.add_metric([method, code], count)
        yield replies

        yield _family(CounterMetricFamily, "sipproxy_messages_dropped", "Messages dropped unanswered, by reason",
                      "reason", counters["dropped"].items())
        yield _family(GaugeMetricFamily, "sipproxy_transactions", "Transactions in progress, by kind", "kind",
                      counters["transactions"].items())
        yield CounterMetricFamily("sipproxy_retransmissions", "Requests and responses retransmitted by timers",
                                  value=counters["retransmissions"])

        bindings = self.context.location.all_bindings()
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
                      counters["registrations"].items())

        auth = counters["auth"]
        yield CounterMetricFamily("sipproxy_auth_challenges", "Digest challenges sent (401/407)", value=auth["challenges"])
        yield _family(CounterMetricFamily, "sipproxy_auth_failures", "Failed authentications, by reason", "reason",
                      auth["failures"].items())
        yield CounterMetricFamily("sipproxy_auth_lockouts", "Lockouts after repeated failures (all scopes)",
                                  value=auth["lockouts"])
        yield _family(CounterMetricFamily, "sipproxy_auth_lockouts_by_scope",
                      "Lockouts by scope: pair (user and address), address (spraying), user (slow guessing)",
                      "scope", auth["lockouts_by_scope"].items())
        yield CounterMetricFamily("sipproxy_auth_table_evictions",
                                  "Entries pushed out of the bounded auth tables before their time (a flood)",
                                  value=auth["evicted"])
        yield _family(CounterMetricFamily, "sipproxy_trust_refused", "Requests not served, by reason", "reason",
                      counters["trust_refused"].items())

        overload = counters["overload"]
        yield _family(CounterMetricFamily, "sipproxy_shed",
                      "New requests refused with 503 under overload, by class", "class",
                      overload["shed"].items())
        yield GaugeMetricFamily("sipproxy_reactor_lag_seconds", "How late the server's event loop runs (smoothed)",
                                value=overload["lag_seconds"])
        yield CounterMetricFamily("sipproxy_udp_kernel_drops", "Datagrams the kernel dropped: receive queue full",
                                  value=overload["kernel_drops"])
        yield GaugeMetricFamily("sipproxy_overload_level", "Load shedding level: 0 none, 1-3 (docs/performance.md)",
                                value=overload["level"])

        calls = counters["calls"]
        # state="setup": INVITE transactions under way; the others: calls by dialog state (proxy/dialogs.py).
        yield _family(GaugeMetricFamily, "sipproxy_calls", "Calls in progress: INVITE transactions being set up, "
                      "and calls by state", "state",
                      [("setup", calls["calls_in_setup"]), *calls.get("calls_by_state", {}).items()])
        results = CounterMetricFamily("sipproxy_calls_completed", "Call setups finished, by result", labels=["result"])
        results.add_metric(["answered"], calls["calls_answered"])
        results.add_metric(["failed"], calls["calls_failed"])
        yield results
        yield _family(CounterMetricFamily, "sipproxy_forwards", "Calls forwarded, by kind (RFC 5806 reasons)", "kind",
                      calls["forwards"].items())
        yield _family(CounterMetricFamily, "sipproxy_redirects", "3xx answered as a redirect server, by code", "code",
                      calls["redirects"].items())
        yield _family(CounterMetricFamily, "sipproxy_checksync_notifies", "check-sync NOTIFYs, by outcome", "result",
                      counters["checksync"].items())
        yield _family(CounterMetricFamily, "sipproxy_keepalive", "Phone keepalive OPTIONS, by outcome", "result",
                      counters["keepalive"].items())
        transfers = counters.get("transfers") or {}
        if transfers:
            yield _family(CounterMetricFamily, "sipproxy_transfers_completed_by_proxy", "Bye/Also transfers the proxy "
                          "carried out for a party that ignores Also, by outcome", "result",
                          [("bridged", transfers["completed"]), ("failed", transfers["failed"])])
        if "calls_by_state" in calls:
            yield CounterMetricFamily("sipproxy_call_records", "Calls ended (one record each)",
                                      value=calls["call_records"])
            yield CounterMetricFamily("sipproxy_calls_timed_out", "Calls closed after max_call_seconds without a "
                                      "BYE seen", value=calls["calls_timed_out"])
        yield CounterMetricFamily("sipproxy_bindings_expired", "Bindings that expired without a refresh",
                                  value=counters["bindings_expired"])
        srst = counters.get("srst")
        if srst:  # [srst] role (docs/srst.md)
            yield _family(CounterMetricFamily, "sipproxy_srst_changes", "SIP-SRST changes: sent (put in this "
                          "node's log for its peers) and applied (a peer's, here)", "direction",
                          [("sent", srst["changes_sent"]), ("applied", srst["changes_applied"])])
            yield CounterMetricFamily("sipproxy_srst_resyncs", "Full resynchronisations from a peer (a restart, "
                                      "a partition longer than the backlog)", value=srst["resyncs"])
            yield CounterMetricFamily("sipproxy_srst_refused", "Replication requests refused (wrong secret or clock)",
                                      value=srst["refused"])
            yield GaugeMetricFamily("sipproxy_srst_peers_up", "Peers whose last pull succeeded",
                                    value=srst["peers_up"])
            yield GaugeMetricFamily("sipproxy_srst_backlog", "Changes kept for the peers", value=srst["backlog"])
        store = counters.get("location_store")
        if store:  # [location] backend = "redis" (docs/scaling.md)
            yield GaugeMetricFamily("sipproxy_location_store_up", "1 while every process of this node is connected "
                                    "to Redis (REGISTERs get 503 otherwise)", value=0 if store["disconnected"] else 1)
            yield GaugeMetricFamily("sipproxy_location_store_replicas", "Replicas the Redis primary has connected",
                                    value=store["replicas"])
            yield _family(CounterMetricFamily, "sipproxy_location_store_events", "Redis outages, failed writes, "
                          "resynchronisations, turns stored with fewer replicas than wait_replicas", "event",
                          [(name, store[name]) for name in ("outages", "write_failures", "resyncs", "degraded",
                                                            "not_replicated")])
        # Gateways come from the config's routes, so the label stays bounded.
        yield _family(GaugeMetricFamily, "sipproxy_gateway_up", "1 while a gateway answers, 0 once it is down",
                      "gateway", [(g["gateway"], 1 if g["up"] else 0) for g in counters["gateways"]])
        yield _family(CounterMetricFamily, "sipproxy_gateway_failures", "Calls a gateway failed (no answer, 503)",
                      "gateway", [(g["gateway"], g["failed_calls"]) for g in counters["gateways"]])
        if "policy" in self.context.plugins:
            # Rules and actions are fixed sets (plugins/policy/config.py RULES): the labels stay bounded.
            actions = CounterMetricFamily("sipproxy_policy_actions", "What the policy plugin refused, banned, or "
                                          "would have (mode = log), by rule and action", labels=["rule", "action"])
            for (rule, action), count in sorted({**dict.fromkeys(_POLICY_SERIES, 0),
                                                 **self.plugin.policy_actions}.items()):
                actions.add_metric([rule, action], count)
            yield actions
        if "ldapdir" in self.context.plugins:
            yield CounterMetricFamily("sipproxy_directory_errors", "Directory searches that failed (LDAP down or slow)",
                                      value=self.plugin.directory_errors)
        info = InfoMetricFamily("sipproxy_build", "sipproxy version")
        info.add_metric([], {"version": __version__})
        yield info


class MetricsResource(resource.Resource):
    """The exposition. On the admin site the core guards it with its tokens; the plugin's own listener has none."""

    isLeaf = True

    def __init__(self, plugin):
        super().__init__()
        self.plugin = plugin

    def render_GET(self, request):
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        refreshed = self.plugin.context.refresh()  # the worker processes' latest counters and events
        if refreshed.called:
            return generate_latest(self.plugin.registry)

        gone = []
        request.notifyFinish().addBoth(gone.append)  # the scraper hung up meanwhile

        def write(_):
            if not gone:
                request.write(generate_latest(self.plugin.registry))
                request.finish()

        refreshed.addCallback(write)
        refreshed.addErrback(lambda failure: log.failure("Metrics scrape failed", failure))
        return server.NOT_DONE_YET


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
        self.directory_errors = 0
        self.policy_actions: dict[tuple[str, str], int] = {}  # (rule, action) -> count, from `policy` events
        self.registry.register(SipProxyCollector(context, self))
        self.call_setup = Histogram("sipproxy_call_setup_seconds", "INVITE to first final response",
                                    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 180), registry=self.registry)
        self.directory_search = Histogram("sipproxy_directory_search_seconds", "Directory search time (LDAP or local users)",
                                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                    registry=self.registry)
        self._timed: set[str] = set()  # keys of calls whose setup time is observed (answered, not yet ended)

    def event(self, name, fields):
        if name == "policy":
            key = (str(fields.get("rule")), str(fields.get("action")))
            self.policy_actions[key] = self.policy_actions.get(key, 0) + 1
            return
        if name == "directory_search":
            self.directory_search.observe(fields["seconds"])
            if not fields["ok"]:
                self.directory_errors += 1
            return
        if name not in ("call_answered", "call_ended"):
            return
        call = fields["call"]  # a frozen CallInfo
        if call.method != "INVITE" or call.key in self._timed:
            if name == "call_ended":
                self._timed.discard(call.key)
            return
        self.call_setup.observe(max(0.0, call.at - call.started_at))
        if name == "call_answered":
            self._timed.add(call.key)

    def phone_resources(self):
        return {}

    def services_menu(self):
        return []

    def admin_resources(self):
        return {b"metrics": MetricsResource(self)}

    def service(self):
        if not self.config["listen"]:
            return service.Service()
        from proxy.web import bounded_site

        site = bounded_site(MetricsResource(self))
        return strports.service(self.config["listen"], site, reactor=self.context.reactor)
