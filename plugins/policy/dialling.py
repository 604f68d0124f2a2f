"""Who may dial what, and when: dial classes, the users' and groups' allowances, office hours.

`DialRules.decide` answers for one call: the class of the dialled number and,
if the caller may not dial it (now), the reason phrase the phone shows.
Emergency numbers never get here: the core routes them before any policy
(proxy/routing/router.py `_initial`).
"""

import datetime

import attrs

from plugins.policy.config import PolicyConfig


@attrs.frozen
class DialDecision:
    number_class: str
    refused_by: str | None = None  # "classes" or "hours"
    reason: str = ""


class DialRules:
    def __init__(self, config: PolicyConfig, is_local_user):
        self.config = config
        self.is_local_user = is_local_user  # name -> bool

    def classify(self, dialled: str | None, ours: bool) -> str:
        """The first configured class whose pattern matches all of the dialled user part; else a built-in one."""
        if dialled:
            for name, pattern in self.config.classes:
                if pattern.fullmatch(dialled):
                    return name
        if not ours:
            return "foreign"
        if dialled and self.is_local_user(dialled):
            return "internal"
        return "unclassified"

    def allowed(self, user: str, own_classes: tuple[str, ...]) -> frozenset:
        """The user's own classes (sipproxy-admin user set --classes), else its [allow] entry, else its groups'
        (together), else "*"'s; without a "*", only internal calls."""
        if own_classes:
            return frozenset(own_classes)
        allow = self.config.allow
        if user in allow:
            return allow[user]
        found = frozenset().union(*(allow[g] for g, members in self.config.groups.items()
                                    if user in members and g in allow))
        if found:
            return found
        return allow.get("*", frozenset({"internal"}))

    def decide(self, user: str, own_classes: tuple[str, ...], dialled: str | None, ours: bool,
               now: float) -> DialDecision:
        number_class = self.classify(dialled, ours)
        if self.config.allow is not None and number_class not in self.allowed(user, own_classes):
            return DialDecision(number_class, "classes", self.reason(number_class))
        windows = self.config.hours.get(number_class)
        if windows and not in_windows(windows, now, self.config.timezone):
            return DialDecision(number_class, "hours", self.reason(number_class, "at this time"))
        return DialDecision(number_class)

    def reason(self, number_class: str, when: str = "") -> str:
        phrase = self.config.reasons.get(number_class)
        if phrase is None:
            phrase = {"unclassified": "Number not allowed", "foreign": "Calls to other domains not allowed"}.get(
                number_class, f"{number_class.replace('_', ' ').capitalize()} calls not allowed")
        return f"{phrase} {when}" if when else phrase


def in_windows(windows, now: float, tz) -> bool:
    """Is the wall-clock time at `now` (in the site's zone, its DST included) inside one of the windows?"""
    local = datetime.datetime.fromtimestamp(now, tz)
    minute = local.hour * 60 + local.minute
    weekday = local.weekday()
    return any(w.contains(weekday, minute) for w in windows)
