"""Banned sources and what bans them: a request rate per source (pike), scanners' User-Agents, password spraying.

A ban is on an address unit: an IPv4 address, or an IPv6 /64 (one host can
hold a whole /64). It holds until it expires, in every worker process (the
one that bans tells the others), and across restarts: the primary keeps the
bans in `<state_dir>/policy.sqlite`, which every process reads when it starts.
Addresses in `never_ban` and in `[proxy] trusted` are never banned or counted.

What a banned source still costs: one dict lookup per datagram, before any
parsing (`FloodGuard.admit`).
"""

import ipaddress
import os
import sqlite3

import attrs
from twisted.logger import Logger

from proxy.bounded import BoundedDict
from proxy.registration.auth import address_unit

log = Logger()


@attrs.frozen
class Ban:
    unit: str  # an address, or an IPv6 /64
    until: float
    reason: str
    rule: str  # flood, user_agents, auth, admin
    created: float

    def as_json(self) -> dict:
        return {"address": self.unit, "until": self.until, "reason": self.reason, "rule": self.rule,
                "created": self.created}


class BanStore:
    """The bans on disk. Only the primary writes (in one transaction a second at most, not per ban)."""

    def __init__(self, path: str):
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=2.0)
        db.execute("CREATE TABLE IF NOT EXISTS bans (unit TEXT PRIMARY KEY, until REAL NOT NULL, "
                   "reason TEXT NOT NULL, rule TEXT NOT NULL, created REAL NOT NULL)")
        return db

    def load(self, now: float) -> list[Ban]:
        if not os.path.exists(self.path):
            return []
        db = self._connect()
        try:
            rows = db.execute("SELECT unit, until, reason, rule, created FROM bans WHERE until > ?", (now,)).fetchall()
        finally:
            db.close()
        return [Ban(*row) for row in rows]

    def write(self, put: list[Ban], removed: list[str], now: float) -> None:
        db = self._connect()
        try:
            with db:
                db.executemany("INSERT OR REPLACE INTO bans VALUES (?, ?, ?, ?, ?)", [attrs.astuple(b) for b in put])
                db.executemany("DELETE FROM bans WHERE unit = ?", [(u,) for u in removed])
                db.execute("DELETE FROM bans WHERE until <= ?", (now,))
            os.chmod(self.path, 0o600)
        finally:
            db.close()


class BanList:
    """The bans in force in this process, by address unit."""

    def __init__(self, clock, max_entries: int):
        self.clock = clock
        self.bans: BoundedDict = BoundedDict(max_entries)  # unit -> Ban

    def active(self, unit: str) -> Ban | None:
        ban = self.bans.get(unit)
        if ban is None:
            return None
        if ban.until > self.clock.seconds():
            return ban
        del self.bans[unit]
        return None

    def add(self, ban: Ban) -> None:
        self.bans[ban.unit] = ban

    def remove(self, unit: str) -> Ban | None:
        return self.bans.pop(unit, None)

    def all(self) -> list[Ban]:
        now = self.clock.seconds()
        return sorted((b for b in self.bans.values() if b.until > now), key=lambda b: b.created)


class Exemptions:
    """never_ban and [proxy] trusted: asked once per address, then remembered."""

    def __init__(self, networks: tuple, max_entries: int):
        self.networks = networks
        self._known: BoundedDict = BoundedDict(max_entries)

    def exempt(self, host: str) -> bool:
        known = self._known.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                known = False
            else:
                known = any(address in network for network in self.networks)
            self._known[host] = known
        return known

    def covers_unit(self, unit: str) -> bool:
        """Would banning this address or /64 touch an exempt network?"""
        try:
            target = ipaddress.ip_network(unit, strict=False)
        except ValueError:
            return False
        return any(target.version == n.version and target.overlaps(n) for n in self.networks)


class RequestRate:
    """Requests per address unit in fixed windows (Kamailio pike's idea, without its tree): a counter and
    the window it belongs to, per unit, in a bounded table."""

    def __init__(self, clock, limit: int, window: float, max_entries: int):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.counts: BoundedDict = BoundedDict(max_entries)  # unit -> [window number, count]

    def over(self, unit: str) -> bool:
        """Count one request; True for the one that passes the limit of its window (once per window)."""
        slot = int(self.clock.seconds() / self.window)
        entry = self.counts.get(unit)
        if entry is None or entry[0] != slot:
            self.counts[unit] = [slot, 1]
            return False
        entry[1] += 1
        return entry[1] == self.limit + 1


class FailedLogins:
    """Wrong digest answers per address unit, any users, within a window (spraying and cracking)."""

    def __init__(self, clock, limit: int, window: float, max_entries: int):
        self.clock = clock
        self.limit = limit
        self.window = window
        self.times: BoundedDict = BoundedDict(max_entries)  # unit -> list of times

    def failed(self, unit: str) -> int:
        """Count one; the number within the window when that reaches the limit, else 0."""
        now = self.clock.seconds()
        times = [t for t in self.times.get(unit, ()) if now - t < self.window]
        times.append(now)
        if len(times) >= self.limit:
            self.times.pop(unit, None)
            return len(times)
        self.times[unit] = times[-self.limit:]
        return 0


def unit_of(host: str) -> str:
    return address_unit(host)
