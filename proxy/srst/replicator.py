"""What this node tells its SRST peers, and what their changes do here.

Into the log (proxy/srst/changelog.py) go:
- every binding this node's registrar saves or removes (a location observer:
  it hears this node's own bindings only, so what came from a peer is never
  sent back to it);
- forwarding settings, by comparing the table once a second (a worker's
  feature code and `sipproxy-admin forward` write it directly);
- on the primary, the users file whenever it changes (the backup must
  authenticate the branch's phones and know who is a user).
Expiries are not sent: both sides expire a binding at the same absolute time,
and a backup must keep its own fresher copy when the primary's runs out.

A peer's change applies by `fresher` / `removal_applies`; a snapshot (after
a restart or a partition longer than the backlog) applies every binding it
has and removes the bindings that came from that peer and that it no longer
has. On a backup, a primary's snapshot also replaces the forwarding table and
the users file: the primary is their authority once the link is back.
"""

import json
import os

from twisted.logger import Logger

from proxy.periodic import Every
from proxy.registration.credentials import read_users
from proxy.registration.location import Binding, binding_row
from proxy.routing.forwarding import ForwardSettings
from proxy.srst.changelog import ChangeLog, fresher, removal_applies
from proxy.statedir import file_stamp, replace_file

log = Logger()


class Replicator:
    def __init__(self, clock, location, forwarding_store, users_path: str, changelog: ChangeLog, *, node: str,
                 role: str):
        self.clock = clock
        self.location = location
        self.forwarding_store = forwarding_store
        self.users_path = users_path
        self.log = changelog
        self.node = node
        self.role = role
        self.applied = 0  # peers' changes applied here
        self.logged = 0  # this node's changes put in the log
        self._forwarding = {s.user: s for s in forwarding_store.all()}
        self._users_stamp = file_stamp(self.users_path)
        location.add_observer(self._binding_event)
        self._poller = Every(clock, 1.0, self.poll)

    def start(self) -> None:
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()

    # -- this node's changes ----------------------------------------------

    def _binding_event(self, event: str, binding: Binding) -> None:
        if event in ("added", "refreshed"):
            self._append({"kind": "binding", "event": "saved", "binding": binding_row(binding)})
        elif event == "removed":
            self._append({"kind": "binding", "event": "removed", "binding": binding_row(binding)})

    def _append(self, change: dict) -> None:
        self.logged += 1
        self.log.append(change)

    def poll(self) -> None:
        current = {s.user: s for s in self.forwarding_store.all()}
        for user in sorted(set(current) | set(self._forwarding)):
            if current.get(user) != self._forwarding.get(user):
                settings = current.get(user) or ForwardSettings(user=user)
                self._append({"kind": "forwarding", "settings": settings.as_json()})
        self._forwarding = current
        if self.role == "primary":
            stamp = file_stamp(self.users_path)
            if stamp != self._users_stamp:
                self._users_stamp = stamp
                users = self._users_file()
                if users is not None:
                    self._append({"kind": "users", "users": users})

    def _users_file(self) -> dict | None:
        try:
            with open(self.users_path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def snapshot(self) -> dict:
        """Everything a peer needs to start from, with the log position it corresponds to."""
        self.poll()  # so that the position covers the settings as they are now
        return {"generation": self.log.generation, "seq": self.log.seq, "node": self.node, "role": self.role,
                "bindings": [binding_row(b) for b in self.location.all_bindings()],
                "forwarding": [s.as_json() for s in self.forwarding_store.all()],
                "users": self._users_file() if self.role == "primary" else None}

    # -- a peer's changes -------------------------------------------------

    def _current(self, aor: str, contact: str) -> Binding | None:
        return next((b for b in self.location.lookup(aor) if b.contact == contact), None)

    def apply(self, change: dict) -> None:
        kind = change.get("kind")
        if kind == "binding":
            binding = Binding(*change["binding"])
            current = self._current(binding.aor, binding.contact)
            if change["event"] == "saved":
                if binding.expires_at > self.clock.seconds() and fresher(binding, current):
                    self.location.save(binding)
            elif removal_applies(binding, current):
                self.location.remove(binding.aor, binding.contact)
        elif kind == "forwarding":
            self._put_forwarding(ForwardSettings(**change["settings"]))
        elif kind == "users" and self.role == "backup":
            self._write_users(change["users"])
        self.applied += 1

    def apply_snapshot(self, snapshot: dict) -> None:
        peer = snapshot["node"]
        theirs = set()
        for fields in snapshot["bindings"]:
            binding = Binding(*fields)
            theirs.add((binding.aor, binding.contact))
            self.apply({"kind": "binding", "event": "saved", "binding": fields})
        for binding in self.location.all_bindings():
            if binding.node == peer and (binding.aor, binding.contact) not in theirs:
                self.location.remove(binding.aor, binding.contact)  # gone there while the link was down
        if self.role == "backup":
            settings = {s["user"]: ForwardSettings(**s) for s in snapshot["forwarding"]}
            for user in set(self._forwarding) - set(settings):
                self._put_forwarding(ForwardSettings(user=user))
            for value in settings.values():
                self._put_forwarding(value)
            if snapshot.get("users") is not None:
                self._write_users(snapshot["users"])

    def _put_forwarding(self, settings: ForwardSettings) -> None:
        if self._forwarding.get(settings.user, ForwardSettings(user=settings.user)) == settings:
            return
        self.forwarding_store.put(settings)
        if settings.is_empty():
            self._forwarding.pop(settings.user, None)
        else:
            self._forwarding[settings.user] = settings  # known: the next poll does not send it back

    def _write_users(self, users: dict) -> None:
        data = (json.dumps(users, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            with open(self.users_path, "rb") as f:
                if f.read() == data:
                    return
        except OSError:
            pass
        temporary = self.users_path + ".srst"
        with open(temporary, "wb") as f:
            f.write(data)
        try:
            read_users(temporary)  # the same checks as the server's own reading: never a broken file in place
        except Exception as e:
            os.unlink(temporary)
            log.error("The primary's users file is not usable ({error}); keeping ours", error=str(e))
            return
        os.unlink(temporary)
        replace_file(self.users_path, data)
        log.info("Users copied from the primary ({count})", count=len(users.get("users", {})))
