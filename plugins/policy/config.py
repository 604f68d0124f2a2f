"""[plugins.policy]: checked at startup and on every reload; every key named in errors.

    mode = "enforce"                    # or "log": every rule only logs what it would have done
    rules = { hours = "log" }           # the same, rule by rule (classes, hours, limits, flood, user_agents, auth)
    timezone = "Europe/Berlin"          # for [hours]; default: the host's zone (/etc/localtime), else UTC

    [plugins.policy.classes]            # name = regular expression, full match on the dialled user part
    [plugins.policy.groups]             # name = [users]
    [plugins.policy.allow]              # "*", a group or a user = [classes]
    [plugins.policy.hours]              # class = ["Mon-Fri 08:00-18:00", ...]: only then
    [plugins.policy.reasons]            # class = the reason phrase the phone shows when it is refused
    [plugins.policy.limits]             # calls in progress per user and per route, costly calls per minute
    [plugins.policy.flood]              # per-source rate, bans, scanners, failed authentications
    [plugins.policy.alerts]             # webhook and mail

Classes are tried in the order written; the first that matches names the
class. With none matching: a local user is `internal`, a request for a
domain not ours is `foreign`, anything else is `unclassified`, which
nobody may dial unless allowed by name. Without an [allow] table the dial
rules are off (the plugin then only guards against floods and scanners).
"""

import ipaddress
import os
import re
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs

from proxy.errors import ConfigError

BUILT_IN_CLASSES = ("internal", "foreign", "unclassified")
RULES = ("classes", "hours", "limits", "flood", "user_agents", "auth")
MODES = ("enforce", "log")
MAX_CALL_SECONDS = 4 * 3600.0
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

# Scanners and attack tools as they name themselves (substring, any case). SIPVicious says friendly-scanner.
DEFAULT_USER_AGENTS = ("friendly-scanner", "sipvicious", "sipcli", "vaxsipuseragent", "sip-scan", "sipscan",
                       "sundayddr", "iwar", "sivus", "smap", "pplsip", "siparmyknife", "sip auditor")


@attrs.frozen
class Window:
    """Days of the week (0 = Monday) and minutes since midnight; `end` <= `start` runs past midnight."""

    days: frozenset[int]
    start: int
    end: int

    def contains(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # Across midnight: the evening of a listed day, or the early morning after one.
        return (weekday in self.days and minute >= self.start) or ((weekday - 1) % 7 in self.days and minute < self.end)


@attrs.frozen
class LimitsConfig:
    calls_per_user: int = 0  # calls in progress per user; 0: no limit
    calls_per_route: dict = attrs.field(factory=dict)  # route name -> calls in progress through it
    costly: tuple[str, ...] = ()  # the classes whose calls are counted per minute, and alerted on when blocked
    costly_per_minute: int = 0  # per user; 0: no limit
    max_call_seconds: float = MAX_CALL_SECONDS  # a call whose BYE we never see stops counting after this


@attrs.frozen
class FloodConfig:
    max_requests: int = 200  # requests from one address (IPv6: its /64) within `window`; 0: no limit
    window: float = 2.0
    ban_minutes: float = 10.0
    banned_answer: str = "drop"  # or "503"
    never_ban: tuple = ()  # ip_network objects; [proxy] trusted is never banned either
    user_agents: tuple[str, ...] = DEFAULT_USER_AGENTS  # lower case
    auth_failures: int = 10  # wrong digest answers from one address, any users, within auth_window; 0: off
    auth_window: float = 300.0
    max_tracked: int = 100_000  # addresses counted at once (a spoofed flood cannot grow memory past this)


@attrs.frozen
class AlertsConfig:
    webhook: str = ""  # http(s) URL: POST {"alerts": [...]} as JSON
    mail_to: tuple[str, ...] = ()
    mail_from: str = ""
    smtp_host: str = "localhost"
    smtp_port: int = 25
    interval: float = 10.0  # alerts are sent in batches, at most one per interval and channel
    max_batch: int = 100  # alerts in one batch; the rest are counted in it


@attrs.frozen
class PolicyConfig:
    modes: dict  # rule -> "enforce" | "log"
    timezone: object  # tzinfo
    classes: tuple  # (name, compiled pattern), in order
    groups: dict  # group -> frozenset of users
    allow: dict | None  # "*" / group / user -> frozenset of classes; None: dial rules off
    hours: dict  # class -> tuple[Window]
    reasons: dict  # class -> reason phrase
    limits: LimitsConfig = LimitsConfig()
    flood: FloodConfig = FloodConfig()
    alerts: AlertsConfig = AlertsConfig()

    def enforced(self, rule: str) -> bool:
        return self.modes[rule] == "enforce"

    def class_names(self) -> set[str]:
        return {name for name, _ in self.classes} | set(BUILT_IN_CLASSES)


_TOP = {"mode", "rules", "timezone", "classes", "groups", "allow", "hours", "reasons", "limits", "flood", "alerts"}


def parse(table: dict, path: str) -> PolicyConfig:
    def error(key, reason):
        return ConfigError(path, f"plugins.policy.{key}", reason)

    for key in table:
        if key not in _TOP:
            raise error(key, "unknown key")
    mode = table.get("mode", "enforce")
    if mode not in MODES:
        raise error("mode", 'must be "enforce" or "log"')
    modes = dict.fromkeys(RULES, mode)
    for rule, value in _table(table, "rules", error).items():
        if rule not in RULES:
            raise error(f"rules.{rule}", f"no such rule (rules: {', '.join(RULES)})")
        if value not in MODES:
            raise error(f"rules.{rule}", 'must be "enforce" or "log"')
        modes[rule] = value

    classes = []
    for name, pattern in _table(table, "classes", error).items():
        if not isinstance(pattern, str) or not pattern:
            raise error(f"classes.{name}", "must be a regular expression (full match on the dialled number)")
        try:
            classes.append((name, re.compile(pattern)))
        except re.error as e:
            raise error(f"classes.{name}", f"not a regular expression: {e}") from None
    known = {name for name, _ in classes} | set(BUILT_IN_CLASSES)

    def class_list(key, value) -> frozenset:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise error(key, "must be a list of class names")
        unknown = [v for v in value if v not in known]
        if unknown:
            raise error(key, f"no class called {unknown[0]!r} (classes: {', '.join(sorted(known))})")
        return frozenset(value)

    groups = {}
    for name, members in _table(table, "groups", error).items():
        if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
            raise error(f"groups.{name}", "must be a list of user names")
        groups[name] = frozenset(members)
    allow = None
    if "allow" in table:
        allow = {who: class_list(f"allow.{who}", value) for who, value in _table(table, "allow", error).items()}

    hours = {}
    for name, windows in _table(table, "hours", error).items():
        if name not in known:
            raise error(f"hours.{name}", f"no class called {name!r}")
        if not isinstance(windows, list) or not windows:
            raise error(f"hours.{name}", 'must be a list such as ["Mon-Fri 08:00-18:00"]')
        hours[name] = tuple(_window(w, lambda reason, n=name: error(f"hours.{n}", reason)) for w in windows)
    reasons = {}
    for name, phrase in _table(table, "reasons", error).items():
        if name not in known:
            raise error(f"reasons.{name}", f"no class called {name!r}")
        if not isinstance(phrase, str) or not phrase or any(c in phrase for c in "\r\n") or len(phrase) > 100:
            raise error(f"reasons.{name}", "must be one line of text (at most 100 characters)")
        reasons[name] = phrase

    return PolicyConfig(modes=modes, timezone=_timezone(table.get("timezone"), error), classes=tuple(classes),
                        groups=groups, allow=allow, hours=hours, reasons=reasons,
                        limits=_limits(_table(table, "limits", error), known, error),
                        flood=_flood(_table(table, "flood", error), error),
                        alerts=_alerts(_table(table, "alerts", error), error))


def _table(table: dict, key: str, error) -> dict:
    value = table.get(key, {})
    if not isinstance(value, dict):
        raise error(key, "must be a table")
    return value


def _timezone(name, error):
    if name is None:
        try:
            with open("/etc/localtime", "rb") as f:
                return ZoneInfo.from_file(f, key="localtime")
        except (OSError, ValueError):
            return ZoneInfo("UTC")
    if not isinstance(name, str):
        raise error("timezone", 'must be a zone name such as "Europe/Berlin"')
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise error("timezone", f"unknown time zone {name!r} (a name from the tz database, e.g. Europe/Berlin)") from None


_WINDOW = re.compile(r"\s*([A-Za-z]{3})(?:\s*-\s*([A-Za-z]{3}))?\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


def _window(text, error) -> Window:
    match = _WINDOW.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise error(f"{text!r} is not a window such as 'Mon-Fri 08:00-18:00' or 'Sat 09:00-12:00'")
    first, last, h1, m1, h2, m2 = match.groups()
    try:
        a = DAYS.index(first.lower())
        b = DAYS.index((last or first).lower())
    except ValueError:
        raise error(f"{text!r}: days are Mon Tue Wed Thu Fri Sat Sun") from None
    days = frozenset((a + i) % 7 for i in range((b - a) % 7 + 1))
    start, end = int(h1) * 60 + int(m1), int(h2) * 60 + int(m2)
    if int(m1) > 59 or int(m2) > 59 or start > 24 * 60 or end > 24 * 60 or start == end:
        raise error(f"{text!r}: times are 00:00 to 24:00, and a window must not be empty")
    return Window(days=days, start=start, end=end)


def _count(table, key, error, default):
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(key, "must be a whole number, 0 or more")
    return value


def _seconds(table, key, error, default, minimum=0.0):
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
        raise error(key, f"must be a number greater than {minimum:g}")
    return float(value)


def _limits(table: dict, known: set, error) -> LimitsConfig:
    def err(key, reason):
        return error(f"limits.{key}", reason)

    for key in table:
        if key not in {f.name for f in attrs.fields(LimitsConfig)}:
            raise err(key, "unknown key")
    routes = table.get("calls_per_route", {})
    if not isinstance(routes, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in routes.values()):
        raise err("calls_per_route", "must be a table of route name = calls (1 or more)")
    costly = table.get("costly", [])
    if not isinstance(costly, list) or not all(isinstance(c, str) for c in costly):
        raise err("costly", "must be a list of class names")
    unknown = [c for c in costly if c not in known]
    if unknown:
        raise err("costly", f"no class called {unknown[0]!r}")
    return LimitsConfig(calls_per_user=_count(table, "calls_per_user", err, 0), calls_per_route=dict(routes),
                        costly=tuple(costly), costly_per_minute=_count(table, "costly_per_minute", err, 0),
                        max_call_seconds=_seconds(table, "max_call_seconds", err, MAX_CALL_SECONDS, 60))


def _flood(table: dict, error) -> FloodConfig:
    def err(key, reason):
        return error(f"flood.{key}", reason)

    for key in table:
        if key not in {f.name for f in attrs.fields(FloodConfig)}:
            raise err(key, "unknown key")
    answer = table.get("banned_answer", "drop")
    if answer not in ("drop", "503"):
        raise err("banned_answer", 'must be "drop" (send nothing) or "503"')
    networks = []
    for value in table.get("never_ban", []) if isinstance(table.get("never_ban", []), list) else [None]:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except (TypeError, ValueError):
            raise err("never_ban", f"{value!r} is not an address or network such as 192.168.1.0/24") from None
    agents = table.get("user_agents", list(DEFAULT_USER_AGENTS))
    if not isinstance(agents, list) or not all(isinstance(a, str) and a.strip() for a in agents):
        raise err("user_agents", "must be a list of non-empty strings (matched anywhere in User-Agent, any case)")
    return FloodConfig(max_requests=_count(table, "max_requests", err, 200),
                       window=_seconds(table, "window", err, 2.0),
                       ban_minutes=_seconds(table, "ban_minutes", err, 10.0),
                       banned_answer=answer, never_ban=tuple(networks),
                       user_agents=tuple(a.strip().lower() for a in agents),
                       auth_failures=_count(table, "auth_failures", err, 10),
                       auth_window=_seconds(table, "auth_window", err, 300.0),
                       max_tracked=max(1, _count(table, "max_tracked", err, 100_000)))


def _alerts(table: dict, error) -> AlertsConfig:
    def err(key, reason):
        return error(f"alerts.{key}", reason)

    for key in table:
        if key not in {f.name for f in attrs.fields(AlertsConfig)}:
            raise err(key, "unknown key")
    webhook = table.get("webhook", "")
    if not isinstance(webhook, str) or (webhook and not re.match(r"https?://[^/\s]+", webhook)):
        raise err("webhook", "must be an http:// or https:// URL")
    mail_to = table.get("mail_to", [])
    if not isinstance(mail_to, list) or not all(isinstance(a, str) and "@" in a for a in mail_to):
        raise err("mail_to", "must be a list of mail addresses")
    mail_from = table.get("mail_from", "")
    if mail_to and (not isinstance(mail_from, str) or "@" not in mail_from):
        raise err("mail_from", "must be a mail address when mail_to is set")
    host = table.get("smtp_host", "localhost")
    if not isinstance(host, str) or not host:
        raise err("smtp_host", "must be a host name or address")
    port = table.get("smtp_port", 25)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise err("smtp_port", "must be a port number")
    return AlertsConfig(webhook=webhook, mail_to=tuple(mail_to), mail_from=mail_from or "", smtp_host=host,
                        smtp_port=port, interval=_seconds(table, "interval", err, 10.0),
                        max_batch=max(1, _count(table, "max_batch", err, 100)))


def state_file(state_dir: str) -> str:
    """The bans, kept across restarts (the primary writes it; every process reads it at start)."""
    return os.path.join(state_dir, "policy.sqlite")
