"""The policy plugin in the core on a Clock: dial classes, hours, limits, floods, scanners, spraying, bans, alerts."""

import datetime
import os
from zoneinfo import ZoneInfo

import attrs
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from plugins.policy.config import parse
from plugins.policy.dialling import in_windows
from plugins.policy.plugin import PolicyPlugin
from proxy.config import ListenerConfig, ProxyConfig, ProxySettings, RouteConfig, ServerConfig
from proxy.errors import ConfigError
from proxy.plugin import IEventObserver, IProxyPlugin, PluginContext
from proxy.registration.auth import parse_digest
from proxy.registration.credentials import locked_users
from proxy.sip.message import Request
from proxy.testing import sip_bytes
from tests.test_auth import client_answer
from tests.test_router import GW1, REALM, Net, requests, statuses

SCANNER = ("198.51.100.66", 5070)
PHONE = ("192.0.2.10", 5060)

CLASSES = {"internal": "1[0-9]{3}", "local": "9[2-9][0-9]{6}", "international": "9011[0-9]+",
           "premium": "91900[0-9]+"}


@implementer(IProxyPlugin, IEventObserver)
class Recorder:
    name = "recorder"

    def __init__(self):
        self.events = []

    def event(self, name, fields):
        if name == "policy":
            self.events.append(fields)


class PolicyNet:
    """The proxy core on a Clock (tests/test_router.py's Net) with the policy plugin in it."""

    def __init__(self, test, table, *, routes=(RouteConfig(gateways=(f"{GW1[0]}:{GW1[1]}",), pattern="9[0-9]+",
                                                          name="pstn"),),
                 trusted=(), share=None, worker=0, workers=1, state_dir=None):
        self.net = Net(test, routes=routes, settings=ProxySettings(trusted=trusted))
        self.clock = self.net.clock
        state_dir = state_dir or self.net.dir
        config = attrs.evolve(ProxyConfig(), routes=tuple(routes), proxy=ProxySettings(trusted=trusted),
                              server=ServerConfig(domains=(REALM,), state_dir=state_dir,
                                                  listen=(ListenerConfig.parse("udp:5060"),)))
        host = self.net.core.plugins
        self.context = PluginContext(clock=self.clock, reactor=self.clock, config=config,
                                     credentials=self.net.core.credentials, emit=host.emit,
                                     is_our_domain=self.net.core.identity.is_our_domain,
                                     share=share or (lambda name, value: None), worker=worker, workers=workers)
        self.plugin = PolicyPlugin(parse(table, "site.toml"), self.context)
        self.recorder = Recorder()
        host.add(self.plugin)
        host.add(self.recorder)

    def call(self, frm="1001", to="1002", call_id="call-1", source=PHONE):
        return self.net.invite(to=to, frm=frm, call_id=call_id, source=source)

    def options(self, source, user_agent="Cisco-CP7960G/8.0", n=1):
        sent = []
        for i in range(n):
            self.net.send(sip_bytes(f"""
                OPTIONS sip:1001@{REALM} SIP/2.0
                Via: SIP/2.0/UDP {source[0]}:{source[1]};branch=z9hG4bKo{i}x{os.urandom(3).hex()}
                Max-Forwards: 70
                From: <sip:probe@{source[0]}>;tag=o{i}
                To: <sip:1001@{REALM}>
                Call-ID: opt-{i}-{os.urandom(3).hex()}
                CSeq: 1 OPTIONS
                User-Agent: {user_agent}
            """), source)
            sent += self.net.take()
        return sent

    def actions(self):
        return [(e["rule"], e["action"]) for e in self.recorder.events]


def forwarded_to_gateway(sent):
    return [m for m, d in requests(sent, "INVITE") if (d.host, d.port) == GW1]


class ConfigTests(SynchronousTestCase):
    def check(self, table, key, text=""):
        e = self.assertRaises(ConfigError, parse, table, "site.toml")
        self.assertIn(f"site.toml: plugins.policy.{key}:", str(e))
        self.assertIn(text, str(e))

    def test_errors_name_the_key(self):
        self.check({"colour": 1}, "colour", "unknown key")
        self.check({"mode": "maybe"}, "mode")
        self.check({"rules": {"classes": "off"}}, "rules.classes")
        self.check({"rules": {"nosuch": "log"}}, "rules.nosuch", "no such rule")
        self.check({"classes": {"intl": "9011[0-9"}}, "classes.intl", "not a regular expression")
        self.check({"allow": {"*": ["intl"]}}, "allow.*", "no class called 'intl'")
        self.check({"classes": CLASSES, "hours": {"international": ["Mon-Fry 08:00-18:00"]}}, "hours.international")
        self.check({"classes": CLASSES, "hours": {"international": ["Mon 18:00-18:00"]}}, "hours.international")
        self.check({"timezone": "Mars/Olympus"}, "timezone", "unknown time zone")
        self.check({"flood": {"banned_answer": "tarpit"}}, "flood.banned_answer")
        self.check({"flood": {"never_ban": ["10.0.0.0/33"]}}, "flood.never_ban")
        self.check({"limits": {"costly": ["gold"]}}, "limits.costly")
        self.check({"alerts": {"mail_to": ["ops@example.com"]}}, "alerts.mail_from")
        self.check({"alerts": {"webhook": "ftp://x"}}, "alerts.webhook")


class WindowTests(SynchronousTestCase):
    def windows(self, *texts, tz="Europe/Berlin"):
        config = parse({"classes": CLASSES, "hours": {"international": list(texts)}, "timezone": tz}, "s.toml")
        return config.hours["international"], config.timezone

    def at(self, text, tz="Europe/Berlin"):
        return datetime.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()

    def test_office_hours(self):
        windows, tz = self.windows("Mon-Fri 08:00-18:00")
        self.assertTrue(in_windows(windows, self.at("2026-12-01T08:00"), tz))  # a Tuesday
        self.assertFalse(in_windows(windows, self.at("2026-12-01T18:00"), tz))
        self.assertFalse(in_windows(windows, self.at("2026-12-05T10:00"), tz))  # Saturday

    def test_across_midnight(self):
        windows, tz = self.windows("Fri 22:00-06:00")
        self.assertTrue(in_windows(windows, self.at("2026-12-04T23:30"), tz))  # Friday night
        self.assertTrue(in_windows(windows, self.at("2026-12-05T05:59"), tz))  # Saturday morning
        self.assertFalse(in_windows(windows, self.at("2026-12-05T06:00"), tz))
        self.assertFalse(in_windows(windows, self.at("2026-12-04T05:00"), tz))  # Friday morning: Thursday's night

    def test_wrapping_days_and_dst(self):
        windows, tz = self.windows("Sat-Sun 01:00-04:00")
        # 2026-03-29, Sunday: Berlin moves from 02:00 CET to 03:00 CEST. 02:30 UTC is 04:30 local, after the
        # window, though a fixed +01:00 offset would say 03:30 and let it in.
        utc = datetime.timezone.utc
        self.assertTrue(in_windows(windows, datetime.datetime(2026, 3, 29, 0, 30, tzinfo=utc).timestamp(), tz))
        self.assertTrue(in_windows(windows, datetime.datetime(2026, 3, 29, 1, 30, tzinfo=utc).timestamp(), tz))
        self.assertFalse(in_windows(windows, datetime.datetime(2026, 3, 29, 2, 30, tzinfo=utc).timestamp(), tz))
        # And in October the hour comes back: 00:30 UTC on 2026-10-25 is 02:30 CEST, 01:30 UTC is 02:30 CET.
        self.assertTrue(in_windows(windows, datetime.datetime(2026, 10, 25, 1, 30, tzinfo=utc).timestamp(), tz))
        self.assertFalse(in_windows(windows, datetime.datetime(2026, 10, 25, 3, 30, tzinfo=utc).timestamp(), tz))


class DialClassTests(SynchronousTestCase):
    TABLE = {"classes": CLASSES, "groups": {"managers": ["1004"]},
             "allow": {"*": ["internal", "local"], "managers": ["internal", "local", "international"],
                       "1001": ["internal", "local", "international"]},
             "limits": {"costly": ["international", "premium"]}}

    def setUp(self):
        self.p = PolicyNet(self, self.TABLE)

    def test_allowed_class_goes_to_the_gateway(self):
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1001", "90114420123456"))), 1)
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1003", "95551234", call_id="c2"))), 1)

    def test_class_outside_the_users_gets_403_with_the_reason_and_an_alert(self):
        sent = self.p.call("1003", "90114420123456")
        self.assertEqual(forwarded_to_gateway(sent), [])
        final = [m for m, _ in sent if not isinstance(m, Request)][-1]
        self.assertEqual((final.status, final.reason), (403, "International calls not allowed"))
        (event,) = self.p.recorder.events
        self.assertEqual((event["rule"], event["action"], event["user"], event["alert"]),
                         ("classes", "blocked", "1003", True))
        self.flushLoggedErrors()

    def test_groups_and_the_users_own_classes(self):
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1004", "90114420123456"))), 1)  # a manager
        with locked_users(os.path.join(self.p.net.dir, "users.json")) as users:
            users["1003"] = attrs.evolve(users["1003"], classes=("internal", "international"))
        self.p.clock.advance(2)  # the users file is looked at once a second
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1003", "90114420123456", call_id="c2"))), 1)
        self.assertEqual(statuses(self.p.call("1003", "95551234", call_id="c3"))[-1], 403)  # local is not in them

    def test_unclassified_numbers_are_refused_and_emergency_is_never(self):
        self.assertEqual(statuses(self.p.call("1001", "95"))[-1], 403)  # 9 + a number no class names
        strict = PolicyNet(self, {"classes": CLASSES, "allow": {"*": []}})
        sent = strict.net.invite(to="911", auth=False)
        self.assertEqual([m.method for m, _ in sent if isinstance(m, Request)], ["INVITE"])

    def test_log_mode_lets_the_call_through_and_says_so(self):
        p = PolicyNet(self, {**self.TABLE, "rules": {"classes": "log"}})
        self.assertEqual(len(forwarded_to_gateway(p.call("1003", "90114420123456"))), 1)
        self.assertEqual(p.actions(), [("classes", "would_block")])

    def test_hours(self):
        p = PolicyNet(self, {**self.TABLE, "timezone": "UTC", "hours": {"international": ["Mon-Fri 08:00-18:00"]}})
        p.clock.advance(datetime.datetime(2026, 12, 1, 19, 0, tzinfo=datetime.timezone.utc).timestamp()
                        - p.clock.seconds())
        self.assertEqual(statuses(p.call("1001", "90114420123456"))[-1], 403)
        self.assertEqual(p.recorder.events[-1]["detail"], "international: International calls not allowed at this time")
        p.clock.advance(14 * 3600)  # Wednesday 09:00
        self.assertEqual(len(forwarded_to_gateway(p.call("1001", "90114420123456", call_id="c2"))), 1)

    def test_trusted_peers_are_not_users(self):
        p = PolicyNet(self, {"classes": CLASSES, "allow": {"*": []}}, trusted=("192.0.2.20/32",))
        sent = p.net.invite(to="1002", frm="gw", source=GW1, auth=False)
        self.assertNotIn(403, statuses(sent))


class LimitTests(SynchronousTestCase):
    def setUp(self):
        self.p = PolicyNet(self, {"classes": CLASSES, "limits": {
            "calls_per_user": 1, "calls_per_route": {"pstn": 2}, "costly": ["international"], "costly_per_minute": 2}})

    def test_calls_in_progress_per_user_until_the_call_fails(self):
        first = forwarded_to_gateway(self.p.call("1001", "95551234", call_id="c1"))
        self.assertEqual(len(first), 1)
        sent = self.p.call("1001", "95551235", call_id="c2")
        self.assertEqual(statuses(sent)[-1], 486)
        self.assertEqual(self.p.actions(), [("limits", "blocked")])
        self.p.net.answer(first[0], 486, GW1)  # the first call fails at the gateway: it no longer counts
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1001", "95551235", call_id="c3"))), 1)

    def test_an_answered_call_counts_until_its_bye(self):
        (invite,) = forwarded_to_gateway(self.p.call("1001", "95551234", call_id="c1"))
        self.p.net.answer(invite, 200, GW1)
        self.p.clock.advance(40)  # the INVITE transaction is long over: the call is still up
        self.assertEqual(statuses(self.p.call("1001", "95551235", call_id="c2"))[-1], 486)
        self.p.plugin.event("call_bye", {"call_id": "c1", "at": self.p.clock.seconds()})
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1001", "95551235", call_id="c3"))), 1)

    def test_route_limit(self):
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1001", "95551234", call_id="c1"))), 1)
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1002", "95551234", call_id="c2"))), 1)
        sent = self.p.call("1003", "95551234", call_id="c3")
        self.assertEqual((statuses(sent)[-1]), 403)
        self.assertIn("route pstn", self.p.recorder.events[-1]["detail"])

    def test_costly_calls_per_minute(self):
        for n in range(2):
            (invite,) = forwarded_to_gateway(self.p.call("1001", "90114420123456", call_id=f"c{n}"))
            self.p.net.answer(invite, 486, GW1)
        self.assertEqual(statuses(self.p.call("1001", "90114420123456", call_id="c9"))[-1], 403)
        self.p.clock.advance(61)
        self.assertEqual(len(forwarded_to_gateway(self.p.call("1001", "90114420123456", call_id="c10"))), 1)

    def test_counts_are_summed_over_the_workers(self):
        # Two processes' plugins, each telling the other (as the worker bus would): a call counted in one
        # holds the limit in the other.
        peers = {}
        a = PolicyNet(self, {"limits": {"calls_per_user": 1}},
                      share=lambda name, value: peers["b"].plugin.peer_message(value, 0))
        peers["b"] = b = PolicyNet(self, {"limits": {"calls_per_user": 1}}, worker=1, workers=2,
                                   share=lambda name, value: a.plugin.peer_message(value, 1))
        self.assertEqual(len(forwarded_to_gateway(a.call("1001", "95551234", call_id="c1"))), 1)
        self.assertEqual(statuses(b.call("1001", "95551235", call_id="c2"))[-1], 486)
        a.plugin.event("call_bye", {"call_id": "c1", "at": 0})
        self.assertEqual(len(forwarded_to_gateway(b.call("1001", "95551235", call_id="c3"))), 1)


class FloodTests(SynchronousTestCase):
    def test_a_source_past_its_rate_is_banned_and_then_costs_a_lookup(self):
        p = PolicyNet(self, {"flood": {"max_requests": 20, "window": 2}})
        answered = p.options(SCANNER, n=25)
        self.assertEqual(len(answered), 20)  # the 21st banned it
        self.assertEqual(p.actions(), [("flood", "banned")])
        self.assertEqual(p.options(SCANNER), [])
        self.assertEqual(len(p.options(PHONE)), 1)  # everyone else is served
        self.assertEqual(p.net.core.replies.dropped["screened"], 6)
        p.clock.advance(601)  # ban_minutes = 10
        self.assertEqual(len(p.options(SCANNER)), 1)
        self.flushLoggedErrors()

    def test_never_ban_and_trusted_are_not_counted(self):
        p = PolicyNet(self, {"flood": {"max_requests": 5, "never_ban": ["198.51.100.0/24"]}},
                      trusted=("192.0.2.0/24",))
        self.assertEqual(len(p.options(SCANNER, n=10)), 10)
        self.assertEqual(len(p.options(PHONE, n=10)), 10)
        self.assertEqual(p.actions(), [])

    def test_banned_answer_503_and_log_mode(self):
        p = PolicyNet(self, {"flood": {"max_requests": 3, "banned_answer": "503"}})
        sent = p.options(SCANNER, n=5)
        self.assertEqual(statuses(sent), [407, 407, 407, 503, 503])
        logged = PolicyNet(self, {"flood": {"max_requests": 3}, "rules": {"flood": "log"}})
        self.assertEqual(statuses(logged.options(SCANNER, n=8)), [407] * 8)
        self.assertEqual(logged.actions(), [("flood", "would_ban")])  # once per window, not per request

    def test_scanner_user_agent_is_banned_at_its_first_request(self):
        p = PolicyNet(self, {})
        self.assertEqual(p.options(SCANNER, user_agent="friendly-scanner"), [])
        self.assertEqual(p.options(SCANNER), [])  # now banned whatever it says
        self.assertEqual(p.actions(), [("user_agents", "banned")])
        self.assertEqual(len(p.options(PHONE)), 1)

    def test_bans_survive_a_restart_and_are_shared(self):
        told = []
        p = PolicyNet(self, {}, share=lambda name, value: told.append(value))
        p.options(SCANNER, user_agent="sipvicious")
        p.plugin.flush()
        again = PolicyNet(self, {}, state_dir=p.net.dir)
        self.assertEqual([b.unit for b in again.plugin.bans.all()], [SCANNER[0]])
        self.assertEqual(again.options(SCANNER), [])
        other = PolicyNet(self, {}, worker=1, workers=2)
        for value in told:
            other.plugin.peer_message(value, 0)
        self.assertEqual(other.options(SCANNER), [])
        p.plugin.unban(SCANNER[0])
        p.plugin.flush()
        self.assertEqual(PolicyNet(self, {}, state_dir=p.net.dir).plugin.bans.all(), [])


class SprayingTests(SynchronousTestCase):
    def register(self, p, user, password, source=SCANNER, nonce=None):
        text = f"""
            REGISTER sip:{REALM} SIP/2.0
            Via: SIP/2.0/UDP {source[0]}:{source[1]};branch=z9hG4bK{os.urandom(4).hex()}
            Max-Forwards: 70
            From: <sip:{user}@{REALM}>;tag=r
            To: <sip:{user}@{REALM}>
            Call-ID: reg-{os.urandom(4).hex()}
            CSeq: 1 REGISTER
            Contact: <sip:{user}@{source[0]}:{source[1]}>
        """
        if nonce is None:
            p.net.send(sip_bytes(text), source)
            sent = p.net.take()
            if not sent:
                return None
            nonce = parse_digest(sent[0][0].headers.get("www-authenticate"))["nonce"]
        p.net.send(sip_bytes(text + "\n" + client_answer(user, password, nonce, uri=f"sip:{REALM}")), source)
        sent = p.net.take()
        return sent[0][0].status if sent else None

    def test_wrong_passwords_across_users_ban_the_address(self):
        p = PolicyNet(self, {"flood": {"auth_failures": 5}})
        results = [self.register(p, user, "guess") for user in ("1001", "1002", "1003", "1004", "1001", "1002")]
        self.assertEqual(results[:4], [401] * 4)
        self.assertEqual(results[5], None)  # banned after the fifth
        self.assertEqual(p.actions(), [("auth", "banned")])
        self.assertEqual(self.register(p, "1001", "secret", source=PHONE), 200)

    def test_made_up_nonces_ban_nobody(self):
        # A forger never sees our nonce: its failures must not get the (spoofed) source banned.
        p = PolicyNet(self, {"flood": {"auth_failures": 3}})
        for _ in range(6):
            self.assertEqual(self.register(p, "1001", "guess", nonce="1700000000.abc.def"), 401)
        self.assertEqual(p.actions(), [])


class AlertTests(SynchronousTestCase):
    def test_alerts_go_in_batches(self):
        p = PolicyNet(self, {"alerts": {"webhook": "http://127.0.0.1:9/hook", "interval": 10, "max_batch": 2}})
        batches = []

        def post(batch, more):
            batches.append((len(batch), more))
            return defer.succeed(None)

        p.plugin.alerts._post = post
        p.options(("198.51.100.1", 5060), user_agent="friendly-scanner")
        p.clock.advance(0)
        self.assertEqual(batches, [(1, 0)])  # the first at once
        for n in range(3):
            p.options((f"198.51.100.{n + 2}", 5060), user_agent="friendly-scanner")
        p.clock.advance(0)
        self.assertEqual(batches, [(1, 0)])
        p.clock.advance(10)
        self.assertEqual(batches, [(1, 0), (2, 1)])  # the rest within the interval: one batch, one counted
        self.assertEqual(p.plugin.alerts.sent["webhook"], 2)


class ReloadTests(SynchronousTestCase):
    def test_reload_changes_the_rules_and_keeps_bans_and_calls(self):
        p = PolicyNet(self, {"classes": CLASSES, "allow": {"*": ["internal", "local"]},
                             "limits": {"calls_per_user": 5}})
        p.options(SCANNER, user_agent="friendly-scanner")
        self.assertEqual(len(forwarded_to_gateway(p.call("1003", "95551234", call_id="c1"))), 1)
        self.assertEqual(statuses(p.call("1003", "90114420123456", call_id="c2"))[-1], 403)
        p.plugin.reload(parse({"classes": CLASSES, "allow": {"*": ["internal", "local", "international"]},
                               "limits": {"calls_per_user": 1}}, "site.toml"))
        self.assertEqual(statuses(p.call("1003", "90114420123456", call_id="c3"))[-1], 486)  # c1 still counts
        self.assertEqual(p.options(SCANNER), [])  # still banned
        p.plugin.event("call_bye", {"call_id": "c1", "at": 0})
        self.assertEqual(len(forwarded_to_gateway(p.call("1003", "90114420123456", call_id="c4"))), 1)
