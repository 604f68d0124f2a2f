"""Where users and their HA1 come from.

The embedded backend is one JSON file in the state directory, `users.json`:
mode 0600, replaced atomically (write a temporary file, fsync, rename) under
an exclusive lock, so `sipproxy-admin user ...` and a backup never see half a
file. Only HA1 = MD5(user:realm:password) is stored, never the password
(RFC 2617 section 3.2.2.2); HA1 is bound to the realm, so changing the realm
means setting the passwords again.

The running server notices changes without a restart: `FileCredentials`
looks at the file's modification time at most once per second (on the
injected clock) and reloads when it changed.
"""

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from proxy.errors import ConfigError
from proxy.statedir import file_stamp, replace_file

log = Logger()

USERS_FILE = "users.json"
_VALID_NAME = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.!~*'()&=+$,;?/")


def compute_ha1(user: str, realm: str, password: str) -> str:
    return hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()


def valid_user_name(name: str) -> bool:
    """A name usable as the user part of a SIP URI without escaping."""
    return bool(name) and len(name) <= 64 and all(c in _VALID_NAME for c in name)


@attrs.frozen
class UserRecord:
    """A user. `lines`: other line names these credentials may register.

    A phone whose lines 2-6 have no linex_authname authenticates them all with
    line 1's name (seed 001 line 2146); listing those lines here lets it.
    """

    name: str
    realm: str
    ha1: str
    display_name: str = ""
    lines: tuple[str, ...] = ()
    # The dial classes this user may call (the policy plugin, plugins/policy/); empty: its [plugins.policy.allow]
    # entry, its groups', or "*".
    classes: tuple[str, ...] = ()

    def may_register(self, line: str) -> bool:
        return line == self.name or line in self.lines


class ICredentials(Interface):
    """A source of users (file today; LDAP or SQL could provide it later)."""

    def lookup(name: str) -> UserRecord | None:
        """The user called `name`, or None."""

    def users() -> list[UserRecord]:
        """Every user, sorted by name."""


class UserFileError(Exception):
    """The users file cannot be read or written; the message says why."""


def read_users(path: str) -> dict[str, UserRecord]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise UserFileError(f"{path}: cannot read users: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
        raise UserFileError(f"{path}: not a sipproxy users file")
    out = {}
    for name, entry in data["users"].items():
        try:
            out[name] = UserRecord(name=name, realm=entry["realm"], ha1=entry["ha1"],
                                   display_name=entry.get("display_name", ""),
                                   lines=tuple(entry.get("lines", ())),
                                   classes=tuple(entry.get("classes", ())))
        except (KeyError, TypeError):
            raise UserFileError(f"{path}: user {name!r} is incomplete") from None
    return out


LAST_GOOD_SUFFIX = ".last-good"


def write_users(path: str, users: dict[str, UserRecord]) -> None:
    """Atomically replace the users file (mode 0600), and its last good copy beside it."""
    _write_users_file(path, users)
    _write_users_file(path + LAST_GOOD_SUFFIX, users)


def load_users_at_startup(path: str) -> tuple[dict[str, UserRecord], str | None]:
    """The users, and a warning when they came from the last good copy; ConfigError when neither reads.

    A damaged users file must never be read as "no users": every phone would get
    401 and the failures would lock the site out once the file is repaired.
    """
    try:
        return read_users(path), None
    except UserFileError as damage:
        backup = path + LAST_GOOD_SUFFIX
        try:
            users = read_users(backup) if os.path.exists(backup) else None
        except UserFileError:
            users = None
        if users is None:
            raise ConfigError(path, "", f"{_why(damage, path)}; restore it (or remove it to start with no users)") from None
        return users, f"{_why(damage, path)}; serving the last good copy {backup} ({len(users)} users)"


def _why(error: UserFileError, path: str) -> str:
    text = str(error)
    return text[len(path) + 2:] if text.startswith(path + ": ") else text


def _write_users_file(path: str, users: dict[str, UserRecord]) -> None:
    data = {
        "version": 1,
        "users": {
            u.name: {
                "realm": u.realm,
                "ha1": u.ha1,
                **({"display_name": u.display_name} if u.display_name else {}),
                **({"lines": list(u.lines)} if u.lines else {}),
                **({"classes": list(u.classes)} if u.classes else {}),
            }
            for u in sorted(users.values(), key=lambda u: u.name)
        },
    }
    replace_file(path, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


@contextmanager
def locked_users(path: str):
    """Read-modify-write the users file under an exclusive lock; yields the dict to change."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        users = read_users(path)
        yield users
        write_users(path, users)


@implementer(ICredentials)
class FileCredentials:
    """The users file, reloaded when it changes (checked at most once per second)."""

    def __init__(self, path: str, clock: IReactorTime, check_interval: float = 1.0):
        self.path = path
        self.clock = clock
        self.check_interval = check_interval
        self._users, warning = load_users_at_startup(path)  # ConfigError: damaged, no good copy
        if warning:
            log.error("{problem}", problem=warning)  # not "warning": trial reads that key as a Python warning
        else:
            log.info("Loaded {count} users from {path}", count=len(self._users), path=path)
        self._stamp = file_stamp(self.path)
        self._checked_at = clock.seconds()

    def _reload(self) -> None:
        stamp = file_stamp(self.path)
        self._checked_at = self.clock.seconds()
        if stamp == self._stamp:
            return
        try:
            self._users = read_users(self.path)
        except UserFileError as e:
            # Keep serving the last good copy; say why once per change.
            log.error("{error}; keeping the previous users", error=str(e))
        else:
            log.info("Loaded {count} users from {path}", count=len(self._users), path=self.path)
        self._stamp = stamp

    def _fresh(self) -> None:
        if self.clock.seconds() - self._checked_at >= self.check_interval:
            self._reload()

    def lookup(self, name: str) -> UserRecord | None:
        self._fresh()
        return self._users.get(name)

    def users(self) -> list[UserRecord]:
        self._fresh()
        return sorted(self._users.values(), key=lambda u: u.name)
