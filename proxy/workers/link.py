"""What ties one process's core to the others: datagrams to their owner, and the state they must share.

- `data_received` sits between the UDP protocol and the `SipServer`: a
  datagram another worker owns (proxy/workers/owner.py) is handed over; what
  comes over the bus goes into the server as if read from the socket.
  Overload (proxy/overload.py) is judged first, where the datagram was read:
  only the reader knows how long it waited in the kernel's queue, and a
  refusal there costs no hand-over. (The reader knows only its own
  transactions, so a late retransmission of another worker's new request may
  get a 503; its first copy is answered by its owner.)
- Bindings: the changes this process makes (its registrar, the primary's admin
  API) go to every other process as they happen; each applies them to its
  index, and the primary writes them to the SQLite file.
- Digest: failures (for the lockouts) and the odd success (the slow lockout
  spares a phone's own address) go to every other process.
- Workers send the primary their counters every `COUNTER_INTERVAL` seconds and
  their plugin events as they happen; the primary sums the counters (`counters`)
  and emits the events to its plugins.
- A trace or a log level the admin API sets at the primary holds in every process.
- The supervisor tells everyone who is alive; nothing is handed to a worker that
  is not (the reader serves it itself: a retransmission may then be answered
  twice, which SIP allows).
"""

import os

from twisted.internet import defer
from twisted.logger import Logger

from proxy.periodic import Every
from proxy.registration.location import Binding, binding_row
from proxy.transport import Source
from proxy.workers.owner import owner_of

log = Logger()

COUNTER_INTERVAL = 2.0
# Counters that are levels of the whole process group, not sums: the greatest wins.
_GREATEST = frozenset({"lag_seconds", "max_lag_seconds", "level", "busy", "low", "high", "kernel_drops", "replicas"})


def merge_counters(mine: dict, others: list[dict]) -> dict:
    """Sum the processes' counters (dicts of numbers, nested); lists and strings are the primary's."""
    merged = dict(mine)
    for other in others:
        for key, value in other.items():
            merged[key] = _merge_value(key, merged.get(key), value)
    return merged


def _merge_value(key, mine, other):
    if mine is None:
        return other
    if isinstance(mine, dict) and isinstance(other, dict):
        out = dict(mine)
        for k, v in other.items():
            out[k] = _merge_value(k, out.get(k), v)
        return out
    if isinstance(mine, (int, float)) and isinstance(other, (int, float)) and not isinstance(mine, bool):
        return max(mine, other) if key in _GREATEST else mine + other
    return mine


class WorkerLink:
    """One process's side; `core` is its proxy/core.py `Core`, `bus` its proxy/workers/bus.py `Bus`."""

    def __init__(self, clock, bus, core):
        self.clock = clock
        self.bus = bus
        self.core = core
        self.server = core.server
        self.index = bus.index
        self.count = bus.count
        self.alive = {0, self.index}  # until the supervisor says who else is ready
        self._counters: dict[int, dict] = {}  # primary: the last counters of each worker
        self._refreshing: list[tuple[set, defer.Deferred]] = []  # primary: scrapes waiting for the workers
        self._pusher = Every(clock, COUNTER_INTERVAL, self._push_counters) if self.index else None
        bus.on_datagram = self._from_bus
        bus.on("binding", self._binding)
        bus.on("auth_failure", lambda value, sender: core.authenticator.peer_failure(*value))
        bus.on("auth_success", lambda value, sender: core.authenticator.peer_success(*value))
        bus.on("alive", self._set_alive)
        bus.on("counters", self._store_counters)
        bus.on("counters?", lambda value, sender: self._push_counters())
        bus.on("event", self._event)
        bus.on("plugin", lambda value, sender: core.plugins.peer_message(value[0], value[1], sender))
        bus.on("calls?", lambda value, sender: bus.send(sender, "calls", (value, core.dialogs.calls())))
        bus.on("calls", self._calls_reply)
        self._asking: dict[int, tuple[set, list, defer.Deferred]] = {}  # primary: call lists being gathered
        self._asked = 0
        bus.on("trace", lambda value, sender: core.server.tracer.follow(*value))
        bus.on("log_level", lambda value, sender: core.verbosity.follow(*value))
        if not core.location.shared:  # a shared store (Redis) tells every process itself
            core.location.on_change = self._binding_changed
        if self.index == 0:
            core.verbosity.on_change = lambda debug, until: bus.broadcast("log_level", (debug, until))
            if core.server.tracer is not None:
                core.server.tracer.on_change = lambda trace_filter, until: bus.broadcast("trace", (trace_filter, until))
        core.authenticator.share_failure = lambda user, address: bus.broadcast("auth_failure", (user, address))
        core.authenticator.share_success = lambda user, address: bus.broadcast("auth_success", (user, address))

    def start(self) -> None:
        self.bus.start()
        if self._pusher is not None:
            self._pusher.start()
        if self.index:  # once every service has started (this runs inside startService)
            self.clock.callLater(0, self.bus.send, 0, "ready", os.getpid())

    def stop(self) -> None:
        if self._pusher is not None:
            self._pusher.stop()
        self.bus.stop()

    # -- datagrams ------------------------------------------------------------

    def data_received(self, data: bytes, source: Source) -> None:
        server = self.server
        if not server.admits(data, source):  # screened where it was read: a ban costs no hand-over
            return
        if server.refuses(data, source):  # overload: judged by its wait in our socket, refused without a hand-over
            return
        owner = owner_of(data, self.count)
        if owner is None or owner == self.index or owner not in self.alive:
            server.data_received(data, source, screened=True, judged=True)
        else:
            self.bus.hand_over(owner, data, source.host, source.port, self.clock.seconds())

    def stream_error(self, error, source: Source) -> None:
        self.server.stream_error(error, source)

    def _from_bus(self, data: bytes, host: str, port: int, arrived: float) -> None:
        shedder = self.server.shedder
        if shedder is not None:
            shedder.queue_delay(self.clock.seconds() - arrived)
        self.server.data_received(data, Source("UDP", host, port), screened=True)

    def welcome(self, index: int) -> None:
        """A worker that has just started (the supervisor calls this): tell it of a trace or log level that runs."""
        tracer = self.core.server.tracer
        if tracer is not None and tracer.active:
            self.bus.send(index, "trace", (tracer.filter, tracer.until))
        verbosity = self.core.verbosity
        if verbosity.until:
            self.bus.send(index, "log_level", (verbosity.level == "debug", verbosity.until))

    def _set_alive(self, alive, sender) -> None:
        self.alive = set(alive)

    # -- bindings ------------------------------------------------------------

    def _binding_changed(self, event: str, binding) -> None:
        # Sent at once, before the 200 that follows it leaves: every process knows the binding by the time
        # the phone does.
        self.bus.broadcast("binding", (event, binding_row(binding)))  # a tuple pickles faster than the instance

    def _binding(self, change, sender) -> None:
        event, fields = change
        self.core.location.apply_peer(event, Binding(*fields))

    # -- counters and events ------------------------------------------------------

    def _push_counters(self) -> None:
        self.bus.send(0, "counters", self.core.counters())

    def _store_counters(self, counters, sender) -> None:
        self._counters[sender] = counters
        for waiting, done in list(self._refreshing):
            waiting.discard(sender)
            if not waiting:
                self._refreshing.remove((waiting, done))
                done.callback(None)

    def refresh(self, timeout: float = 0.5) -> defer.Deferred:
        """Fires when every live worker has sent its counters (and, before them, its events), or after `timeout`.

        A scrape waits for it, so /metrics counts what happened up to the scrape, in every process.
        """
        waiting = {k for k in self.alive if k != self.index}
        if self.index or not waiting:
            return defer.succeed(None)
        done = defer.Deferred()
        entry = (waiting, done)
        self._refreshing.append(entry)
        self.bus.broadcast("counters?", None)

        def give_up():
            if entry in self._refreshing:
                self._refreshing.remove(entry)
                done.callback(None)

        call = self.clock.callLater(timeout, give_up)
        done.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return done

    def calls(self, timeout: float = 1.0) -> defer.Deferred:
        """Every process's calls in progress (the primary's at once, the workers' as they answer, or `timeout`)."""
        mine = self.core.dialogs.calls()
        waiting = {k for k in self.alive if k != self.index}
        if self.index or not waiting:
            return defer.succeed(mine)
        self._asked += 1
        ask, done = self._asked, defer.Deferred()
        self._asking[ask] = (waiting, mine, done)
        self.bus.broadcast("calls?", ask)

        def give_up():
            entry = self._asking.pop(ask, None)
            if entry is not None:
                done.callback(entry[1])

        call = self.clock.callLater(timeout, give_up)
        done.addBoth(lambda result: (call.active() and call.cancel(), result)[1])
        return done

    def _calls_reply(self, value, sender) -> None:
        ask, calls = value
        entry = self._asking.get(ask)
        if entry is None:
            return
        waiting, gathered, done = entry
        gathered.extend(calls)
        waiting.discard(sender)
        if not waiting:
            del self._asking[ask]
            done.callback(gathered)

    def forget_counters(self, index: int) -> None:
        """A worker that died: its counts start again from 0 with the new one (a counter reset, to Prometheus)."""
        self._counters.pop(index, None)

    def counters(self) -> dict:
        """The primary's counters with the workers' added in (what the metrics plugin reads)."""
        return merge_counters(self.core.counters(), list(self._counters.values()))

    def share(self, name: str, value) -> None:
        """Plugin `name`'s state change, to its copies in every other process (`ISharedPlugin`)."""
        try:
            self.bus.broadcast("plugin", (name, value))
        except Exception:
            log.failure("Cannot share plugin {name}'s state with the other workers", name=name)

    def relay_event(self, name: str, fields: dict) -> None:
        """A worker's plugin event, to the primary's plugins."""
        try:
            self.bus.send(0, "event", (name, fields))
        except Exception:  # a value that cannot be pickled: the event is lost, not the request
            log.failure("Cannot pass event {name} to the primary", name=name)

    def _event(self, value, sender) -> None:
        name, fields = value
        self.core.plugins.emit(name, **fields)
