"""Call forwarding: per-user settings, the plan a call follows, and the phone's feature codes.

The seed's call flows are the specification (001 lines 3584-3681):
- unconditional: the call goes to C at once (or the caller gets a 302 to C,
  which the phones follow themselves, 001 line 2918);
- busy: B is tried; on 486 (or 600) the call goes to C;
- no answer: B rings for the configured time, is CANCELled, then C is called;
- unavailable (our addition): B has no registration, the call goes to C.
The forwarded INVITE carries a Diversion header (RFC 5806) naming B and the
reason, which the phones show (001 line 709).

Chains (B -> C -> D) are followed up to `max_depth`; a loop (B -> C -> B)
ends the call with 482 "Forwarding loop" instead of a storm.

Settings live in the state store (SQLite, in the location database file),
so they survive restarts and `sipproxy-admin forward ...` can change them
while the server runs: every lookup reads the table (an indexed row). With
`[location] backend = "redis"` they live in Redis for every node
(proxy/routing/redis_forwarding.py).
"""

import os
import re

import attrs
from twisted.logger import Logger

from proxy.errors import SipParseError
from proxy.identity import Identity
from proxy.registration.location import open_state_database
from proxy.sip.uri import SipUri

log = Logger()

KINDS = ("always", "busy", "no_answer", "unavailable")
DIVERSION_REASON = {"always": "unconditional", "busy": "user-busy", "no_answer": "no-answer",
                    "unavailable": "unavailable"}
_TARGET_RE = re.compile(r"(?:sips?:)?[A-Za-z0-9\-_.!~*'()&=+$,;?/%]+(?:@[A-Za-z0-9.\-\[\]:]+)?\Z")


class ForwardingError(Exception):
    """A setting that cannot be stored; the message says why."""


@attrs.frozen
class ForwardSettings:
    user: str
    always: str = ""
    busy: str = ""
    no_answer: str = ""
    no_answer_after: int = 20
    unavailable: str = ""

    def is_empty(self) -> bool:
        return not (self.always or self.busy or self.no_answer or self.unavailable)

    def as_json(self) -> dict:
        return attrs.asdict(self)


def check_target(target: str) -> str:
    target = target.strip()
    if not target or not _TARGET_RE.match(target):
        raise ForwardingError(f"{target!r} is not a number, user or SIP URI")
    return target


def check_settings(settings: ForwardSettings) -> None:
    """ForwardingError if any target or the no-answer time cannot be stored."""
    for kind in KINDS:
        value = getattr(settings, kind)
        if value:
            check_target(value)
    if not 1 <= settings.no_answer_after <= 600:
        raise ForwardingError("the no-answer time must be 1 to 600 seconds")


_SCHEMA = """
CREATE TABLE IF NOT EXISTS forwarding (
    user TEXT PRIMARY KEY,
    always TEXT NOT NULL DEFAULT '',
    busy TEXT NOT NULL DEFAULT '',
    no_answer TEXT NOT NULL DEFAULT '',
    no_answer_after INTEGER NOT NULL DEFAULT 20,
    unavailable TEXT NOT NULL DEFAULT ''
)
"""


class ForwardingStore:
    """Forwarding settings in SQLite (WAL), read through on every lookup."""

    def __init__(self, path: str, db=None):
        """`db`: the location service's connection to the same file, shared so that its group commit
        (proxy/registration/location.py) never holds a write lock this store would wait on."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        self.path = path
        self._owned = db is None
        self._db = open_state_database(path) if db is None else db
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        if self._owned:
            self._db.close()

    def get(self, user: str) -> ForwardSettings:
        row = self._db.execute(
            "SELECT user, always, busy, no_answer, no_answer_after, unavailable FROM forwarding WHERE user = ?", (user,)
        ).fetchone()
        return ForwardSettings(*row) if row else ForwardSettings(user=user)

    def all(self) -> list[ForwardSettings]:
        rows = self._db.execute(
            "SELECT user, always, busy, no_answer, no_answer_after, unavailable FROM forwarding ORDER BY user"
        ).fetchall()
        return [ForwardSettings(*row) for row in rows]

    def put(self, settings: ForwardSettings) -> None:
        check_settings(settings)
        if settings.is_empty():
            self._db.execute("DELETE FROM forwarding WHERE user = ?", (settings.user,))
            return
        self._db.execute(
            "INSERT OR REPLACE INTO forwarding (user, always, busy, no_answer, no_answer_after, unavailable) "
            "VALUES (?, ?, ?, ?, ?, ?)", attrs.astuple(settings))

    def update(self, user: str, **changes) -> ForwardSettings:
        settings = attrs.evolve(self.get(user), **changes)
        self.put(settings)
        return settings


@attrs.frozen
class FeatureCodes:
    """Dialled codes that set and clear a user's own forwarding (PBX style; defaults in ForwardingConfig)."""

    always_on: str
    always_off: str
    busy_on: str
    busy_off: str
    no_answer_on: str
    no_answer_off: str

    @classmethod
    def from_config(cls, config) -> "FeatureCodes":
        return cls(**{f.name: getattr(config, f.name) for f in attrs.fields(cls)})

    def parse(self, dialled: str) -> tuple[str, str, str | None] | None:
        """('set'|'clear', kind, target) for a feature code, else None. Longest code first."""
        codes = [
            (self.always_on, "set", "always"), (self.always_off, "clear", "always"),
            (self.busy_on, "set", "busy"), (self.busy_off, "clear", "busy"),
            (self.no_answer_on, "set", "no_answer"), (self.no_answer_off, "clear", "no_answer"),
        ]
        for code, action, kind in sorted(codes, key=lambda c: -len(c[0])):
            if code and dialled.startswith(code):
                rest = dialled[len(code):]
                if action == "clear":
                    return (action, kind, None) if not rest else None
                return (action, kind, rest) if rest else None
        return None


_CODE_LABELS = {"always": "Forwarding", "busy": "Forwarding on busy", "no_answer": "Forwarding on no answer"}


def apply_feature_code(store: "ForwardingStore", user: str, code: tuple[str, str, str | None]) -> str:
    """Set or clear a user's own forwarding from a parsed feature code; the reason phrase that says what was done.

    Raises ForwardingError for a target that is not a number or SIP URI.
    """
    action, kind, target = code
    label = _CODE_LABELS[kind]
    if action == "set":
        store.update(user, **{kind: check_target(target)})
        return f"{label} to {target} set"
    store.update(user, **{kind: ""})
    return f"{label} cleared"


@attrs.frozen
class Diversion:
    """One forwarding step, as the Diversion header names it (RFC 5806)."""

    user_uri: str
    reason: str


@attrs.frozen
class Plan:
    """How to reach a user: its own contacts (user) or a forward target, plus what to do on busy / no answer."""

    user: str  # the user whose contacts are rung ("" when the plan is a foreign target)
    target_uri: str  # the Request-URI to use when `user` is "" (a number or foreign URI)
    diversions: tuple[Diversion, ...] = ()
    on_busy: "Plan | None" = None
    no_answer_after: int = 0
    on_no_answer: "Plan | None" = None
    loop: bool = False  # forwarding came back to a user already in the chain


class Forwarding:
    """Turns a user's settings into the Plan a call follows."""

    def __init__(self, store: ForwardingStore, identity: Identity, *, max_depth: int = 5, has_bindings=None):
        self.store = store
        self.identity = identity
        self.max_depth = max_depth
        self.has_bindings = has_bindings or (lambda user: True)

    def uri_for(self, target: str) -> tuple[str, str]:
        """(local user or "", Request-URI) for a stored target: a number, user@host, or a SIP URI."""
        if target.startswith(("sip:", "sips:")):
            text = target
        elif "@" in target:
            text = f"sip:{target}"
        else:
            return target, self.identity.aor(target)
        try:
            uri = SipUri.parse(text)
        except SipParseError:
            return "", text
        if uri.user is not None and self.identity.is_our_domain(uri):
            return uri.decoded_user, self.identity.aor(uri.decoded_user)
        return "", text

    def plan(self, user: str, *, is_local_user, chain: tuple[str, ...] = (), diversions=()) -> Plan:
        """The plan to reach `user` (a local user), following unconditional/unavailable chains eagerly."""
        if user in chain:
            log.info("Forwarding loop: {chain}", chain=" -> ".join(chain + (user,)))
            return Plan(user=user, target_uri="", diversions=tuple(diversions), loop=True)
        chain = chain + (user,)
        settings = self.store.get(user)
        me = self.identity.aor(user)
        if len(chain) > self.max_depth:
            return Plan(user=user, target_uri=me, diversions=tuple(diversions))
        if settings.always:
            return self._follow(settings.always, Diversion(me, "unconditional"), is_local_user, chain, diversions)
        if settings.unavailable and not self.has_bindings(user):
            return self._follow(settings.unavailable, Diversion(me, "unavailable"), is_local_user, chain, diversions)
        on_busy = on_no_answer = None
        if settings.busy:
            on_busy = self._follow(settings.busy, Diversion(me, "user-busy"), is_local_user, chain, diversions)
        if settings.no_answer:
            on_no_answer = self._follow(settings.no_answer, Diversion(me, "no-answer"), is_local_user, chain,
                                        diversions)
        return Plan(user=user, target_uri=me, diversions=tuple(diversions), on_busy=on_busy,
                    no_answer_after=settings.no_answer_after if on_no_answer else 0, on_no_answer=on_no_answer)

    def _follow(self, target: str, step: Diversion, is_local_user, chain, diversions) -> Plan:
        local, uri = self.uri_for(target)
        diversions = tuple(diversions) + (step,)
        if local and is_local_user(local):
            return self.plan(local, is_local_user=is_local_user, chain=chain, diversions=diversions)
        return Plan(user="", target_uri=uri, diversions=diversions)


def diversion_header(diversions: tuple[Diversion, ...]) -> str:
    """RFC 5806: the most recent diversion first, each with its reason and counter."""
    return ", ".join(f"<{d.user_uri}>;reason={d.reason};counter=1" for d in reversed(diversions))
