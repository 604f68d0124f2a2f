"""The location service: address-of-record -> bindings (RFC 3261 section 10).

`ILocationService` is what the registrar and the router use; a shared
backend (Redis, PostgreSQL) for several nodes would provide the same
interface. The embedded backend, `SqliteLocationService`, keeps every
binding in an in-memory index for reads and writes each change through to
SQLite (WAL) in the state directory, so a restart loses no binding. With
`group_commit` (the server's setting) the changes of one turn of the event
loop are committed together at its end, within a millisecond of the 200
going out: a commit per REGISTER was a sixth of the server's CPU at 3,000
registrations/s. Only a process killed inside that turn loses them. The
forwarding store shares the connection (`database`), so it never waits on
the open write transaction.
Expired bindings are swept on the injected clock.

With workers (proxy/workers/), every process keeps the index; only the
primary writes the file (`persist`). A process's own changes go to
`on_change` (the worker link sends them to the others), and what the others
changed comes in through `apply_peer`.

Times are absolute (`clock.seconds()`, the epoch in production), so
bindings keep their expiry across a restart.
"""

import operator
import os
import sqlite3

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import Interface, implementer

from proxy.errors import ConfigError
from proxy.nat import NatPolicy
from proxy.periodic import Every
from proxy.transport import Destination

log = Logger()

NAT_MODES = ("auto", "always", "never")


@attrs.frozen
class Binding:
    """One contact of an AoR, with what the admin and the NAT rules need to know."""

    aor: str
    contact: str  # the Contact URI as registered
    expires_at: float
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    source_host: str = ""
    source_port: int = 0
    transport: str = "UDP"
    user_agent: str = ""
    instance: str = ""
    registered_at: float = 0.0
    node: str = ""  # the node ([server] node) whose registrar took the REGISTER

    def expires_in(self, now: float) -> int:
        return max(0, int(self.expires_at - now + 0.5))

    def destination(self, contact_host: str, contact_port: int | None, nat: NatPolicy) -> Destination:
        """Where requests for this binding go: the Contact, or (NAT policy) where the REGISTER came from."""
        if self.source_host and nat.use_source(contact_host, self.source_host):
            return Destination(self.transport, self.source_host, self.source_port)
        return Destination(self.transport, contact_host, contact_port or 5060)


class ILocationService(Interface):
    def lookup(aor: str) -> list[Binding]:
        """Current bindings of an AoR, highest q first."""

    def all_bindings() -> list[Binding]:
        """Every current binding."""

    def find_contact(contact: str) -> Binding | None:
        """The current binding registered with this contact URI, if any (NAT rules for in-dialog requests)."""

    def save(binding: Binding) -> None:
        """Add or replace the binding (aor, contact)."""

    def remove(aor: str, contact: str) -> None:
        """Remove one binding."""

    def remove_all(aor: str) -> None:
        """Remove every binding of an AoR."""

    def add_observer(observer) -> None:
        """observer(event, binding) with event 'added', 'refreshed', 'removed' or 'expired' (this node's)."""

    writable: bool
    """False while the store cannot take a change (a shared store that is down): the registrar answers 503."""

    def stored():
        """None when the changes made so far are stored; else a Deferred that fires when they are
        (or fails: they may be lost). The registrar answers 200 only then."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    aor TEXT NOT NULL,
    contact TEXT NOT NULL,
    expires_at REAL NOT NULL,
    q REAL NOT NULL,
    call_id TEXT NOT NULL,
    cseq INTEGER NOT NULL,
    source_host TEXT NOT NULL,
    source_port INTEGER NOT NULL,
    transport TEXT NOT NULL,
    user_agent TEXT NOT NULL,
    instance TEXT NOT NULL,
    registered_at REAL NOT NULL,
    node TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (aor, contact)
)
"""
_FIELDS = [a.name for a in attrs.fields(Binding)]
# A binding as a tuple in field order: its SQLite row, its bus and Redis form (attrs.astuple is 6x slower).
binding_row = operator.attrgetter(*_FIELDS)
_UPSERT = f"INSERT OR REPLACE INTO bindings ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})"


LOCATION_FILE = "location.sqlite"


def open_state_database(path: str, checked: bool = True) -> sqlite3.Connection:
    """The SQLite file of bindings and forwarding, checked: a damaged one stops startup, never reads as empty.

    SQLite takes a zero-length file for a new, empty database; here that means a
    truncated file (ours always holds a schema), so every binding and every
    forwarding rule would silently be gone.

    `checked=False` (a worker, proxy/workers/): the primary has checked the file and
    put it in WAL mode; the worker only reads, beside the primary's writes.
    """
    if not checked:
        try:
            return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=2)
        except sqlite3.DatabaseError as e:
            raise ConfigError(path, "", f"cannot open the bindings ({e})") from None
    if os.path.exists(path) and os.path.getsize(path) == 0:
        raise ConfigError(path, "", "the file is empty (0 bytes; truncated?): restore it, or remove it to start "
                                    "with no bindings and no forwarding")
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        result = db.execute("PRAGMA quick_check").fetchone()
    except sqlite3.DatabaseError as e:
        raise ConfigError(path, "", f"not a readable SQLite database ({e}): restore it") from None
    if not result or result[0] != "ok":
        raise ConfigError(path, "", f"the database is damaged ({result[0] if result else 'no answer'}): restore it")
    return db


class BindingIndex:
    """Every current binding in memory: what lookups read (no I/O on a call's path), whatever stores them.

    A subclass stores the changes (`_store_save`, `_store_remove`, `_store_expire`).
    Changes this node made are told to the observers; a peer's are applied silently
    unless they come from this node too (another worker of it), so each change is
    announced once, by the node that took it.
    """

    def __init__(self, clock: IReactorTime, sweep_interval: float = 10.0, node: str = ""):
        self.clock = clock
        self.node = node
        self.on_change = None  # on_change(event, binding) for this process's own changes (proxy/workers/link.py)
        self.sweep_interval = sweep_interval
        self._observers: list = []
        self.expired = 0  # bindings that expired without a refresh (a phone that stopped registering)
        self._index: dict[str, dict[str, Binding]] = {}
        self._by_contact: dict[str, Binding] = {}
        self._sweeper = Every(clock, sweep_interval, self.sweep)

    writable = True
    shared = False  # True: the store itself tells every process of every node (Redis); no worker-link copies

    def stored(self):
        return None

    def store_counters(self) -> dict:
        """A shared store's connection counters (metrics); nothing for a local one."""
        return {}

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        self._sweeper.stop()

    def add_observer(self, observer) -> None:
        self._observers.append(observer)

    def _notify(self, event: str, binding: Binding, local: bool = True) -> None:
        if local and self.on_change is not None:
            self.on_change(event, binding)
        if binding.node and binding.node != self.node:
            return  # another node's: announced there
        for observer in self._observers:
            try:
                observer(event, binding)
            except Exception:
                log.failure("Location observer failed on {event}", event=event)

    def lookup(self, aor: str) -> list[Binding]:
        now = self.clock.seconds()
        found = [b for b in self._index.get(aor, {}).values() if b.expires_at > now]
        found.sort(key=lambda b: (-b.q, -b.registered_at))
        return found

    def all_bindings(self) -> list[Binding]:
        now = self.clock.seconds()
        return sorted((b for contacts in self._index.values() for b in contacts.values() if b.expires_at > now),
                      key=lambda b: (b.aor, -b.q, b.contact))

    def count(self) -> int:
        """Bindings held (expired ones not yet swept included): a gauge, without sorting them all."""
        return len(self._by_contact)

    def find_contact(self, contact: str) -> Binding | None:
        binding = self._by_contact.get(contact)
        if binding is None or binding.expires_at <= self.clock.seconds():
            return None
        return binding

    def _forget_contact(self, binding: Binding) -> None:
        if self._by_contact.get(binding.contact) is binding:
            del self._by_contact[binding.contact]

    def _store_save(self, binding: Binding) -> None:
        pass

    def _store_remove(self, aor: str, contact: str) -> None:
        pass

    def _store_expire(self, now: float, expired: list[Binding]) -> None:
        pass

    def _announces_expiry(self, binding: Binding) -> bool:
        return True

    def save(self, binding: Binding, local: bool = True) -> None:
        if local:
            self._store_save(binding)
        self._index_save(binding, local)

    def _index_save(self, binding: Binding, local: bool) -> None:
        contacts = self._index.setdefault(binding.aor, {})
        event = "refreshed" if binding.contact in contacts else "added"
        contacts[binding.contact] = binding
        self._by_contact[binding.contact] = binding
        self._notify(event, binding, local)

    def _unindex(self, aor: str, contact: str) -> Binding | None:
        contacts = self._index.get(aor, {})
        binding = contacts.pop(contact, None)
        if not contacts:
            self._index.pop(aor, None)
        if binding is not None:
            self._forget_contact(binding)
        return binding

    def remove(self, aor: str, contact: str, local: bool = True) -> None:
        if local:
            self._store_remove(aor, contact)
        binding = self._unindex(aor, contact)
        if binding is not None:
            self._notify("removed", binding, local)

    def apply_peer(self, event: str, binding: Binding) -> None:
        """A change another process made ('added', 'refreshed', 'removed'); not sent back to `on_change`."""
        if event == "removed":
            self.remove(binding.aor, binding.contact, local=False)
            return
        current = self._index.get(binding.aor, {}).get(binding.contact)
        if current is not None and (current.registered_at, current.cseq) > (binding.registered_at, binding.cseq):
            return  # a newer registration of the same contact got here first
        self.save(binding, local=False)

    def remove_all(self, aor: str) -> None:
        for binding in list(self._index.get(aor, {}).values()):
            self.remove(aor, binding.contact)

    def sweep(self) -> int:
        """Drop expired bindings (counted in `expired`); returns how many.

        Each expiry is logged, counted and told to the plugins once, by one process:
        the primary of the node that took the registration.
        """
        now = self.clock.seconds()
        expired = [b for contacts in self._index.values() for b in contacts.values() if b.expires_at <= now]
        if not expired:
            return 0
        self._store_expire(now, expired)
        for binding in expired:
            self._unindex(binding.aor, binding.contact)
            if self._announces_expiry(binding):
                self.expired += 1
                log.info("Binding expired: {aor} -> {contact}", aor=binding.aor, contact=binding.contact)
                self._notify("expired", binding, local=False)
        return len(expired)


@implementer(ILocationService)
class SqliteLocationService(BindingIndex):
    """Bindings in memory, written through to SQLite (WAL)."""

    def __init__(self, path: str, clock: IReactorTime, sweep_interval: float = 10.0, group_commit: bool = False,
                 persist: bool = True, node: str = ""):
        super().__init__(clock, sweep_interval, node)
        self.path = path
        self.group_commit = group_commit
        self.persist = persist  # False in a worker: the primary writes what the workers send it
        self._commit_call = None  # the pending end-of-turn commit (group_commit)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._db = open_state_database(path, checked=persist)
        try:
            if persist:
                self._db.execute(_SCHEMA)
                _add_node_column(self._db)
                os.chmod(path, 0o600)
            self._load()
        except sqlite3.DatabaseError as e:
            raise ConfigError(path, "", f"cannot read the bindings: {e}; restore the file") from None

    def _load(self) -> None:
        now = self.clock.seconds()
        rows = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM bindings").fetchall()
        kept = 0
        for row in rows:
            binding = Binding(*row)
            if binding.expires_at > now:
                self._index.setdefault(binding.aor, {})[binding.contact] = binding
                self._by_contact[binding.contact] = binding
                kept += 1
        if self.persist:
            self._db.execute("DELETE FROM bindings WHERE expires_at <= ?", (now,))
        log.info("Location service {path}: {kept} bindings restored", path=self.path, kept=kept)

    def stop(self) -> None:
        super().stop()
        self.flush()
        self._db.close()

    @property
    def database(self):
        """The SQLite connection (shared with the forwarding store)."""
        return self._db

    def _write(self, sql: str, args=()) -> None:
        if not self.persist:
            return
        if self.group_commit and self._commit_call is None:
            self._db.execute("BEGIN")
            self._commit_call = self.clock.callLater(0, self.flush)
        self._db.execute(sql, args)

    def flush(self) -> None:
        """Commit what this turn changed (group_commit; otherwise every write committed at once)."""
        call, self._commit_call = self._commit_call, None
        if call is None:
            return
        if call.active():
            call.cancel()
        self._db.execute("COMMIT")

    # Through the worker link, a worker's change reaches the primary as a peer's (`apply_peer`): the primary
    # writes it, so `local` does not decide here whether to store, `persist` does.

    def save(self, binding: Binding, local: bool = True) -> None:
        self._write(_UPSERT, binding_row(binding))
        self._index_save(binding, local)

    def remove(self, aor: str, contact: str, local: bool = True) -> None:
        self._write("DELETE FROM bindings WHERE aor = ? AND contact = ?", (aor, contact))
        binding = self._unindex(aor, contact)
        if binding is not None:
            self._notify("removed", binding, local)

    def _store_expire(self, now: float, expired: list[Binding]) -> None:
        self._write("DELETE FROM bindings WHERE expires_at <= ?", (now,))

    def _announces_expiry(self, binding: Binding) -> bool:
        return self.persist  # in a worker only the index is swept, silently: the primary announces


def _add_node_column(db: sqlite3.Connection) -> None:
    """A file from before bindings named their node gets the column (empty: this node's)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(bindings)")}
    if "node" not in columns:
        db.execute("ALTER TABLE bindings ADD COLUMN node TEXT NOT NULL DEFAULT ''")
