"""The sockets between the primary and its workers, and the two kinds of message they carry.

One AF_UNIX SOCK_DGRAM socketpair per process, made by the primary before it
starts the workers: process k reads end B of pair k (its inbox) and sends to
process j through end A of pair j. Both ends stay open in the primary, so a
worker that dies and is restarted finds the same inbox, and a message sent
meanwhile waits there instead of failing. The pairs have no name in the file
system: only the primary and its children hold them, so the bus trusts what
it reads (pickle is safe here, and nothing else could write to it).

- Datagrams (`hand_over`): SIP datagrams read by a process that does not own
  them, with their source and arrival time. Batched: the datagrams for one
  worker read in one turn of the event loop go as one bus message.
- Notes (`send`, `broadcast`): a kind and a picklable value (bindings that
  changed, a digest failure, counters, plugin events, who is alive).

A full inbox (its owner stuck or gone) drops what is sent, as a full UDP
buffer would; SIP retransmits, and `dropped` counts it.
"""

import pickle
import socket
import struct

from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

_DATAGRAMS = b"D"
_NOTE = b"N"
_RECORD = struct.Struct("!IdHB")  # data length, arrival time, source port, source host length
_MAX_MESSAGE = 200_000  # what one recv takes; a batch is closed before it reaches 60 KB
_BATCH_LIMIT = 60_000
_SEND_BUFFER = 4 * 1024 * 1024  # asked for: ~3,000 queued datagrams (capped by net.core.wmem_max)


def make_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    """One (A, B) socketpair per process: A is written by the others, B read by its owner."""
    pairs = []
    for _ in range(count):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for end in (a, b):
            end.setblocking(False)
            end.set_inheritable(True)
        try:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        except OSError:
            pass
        pairs.append((a, b))
    return pairs


@implementer(IReadDescriptor)
class _Inbox:
    def __init__(self, sock: socket.socket, deliver):
        self.sock = sock
        self.deliver = deliver

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "worker-bus"

    def doRead(self):
        recv = self.sock.recv
        for _ in range(64):  # then let the other sockets have a turn
            try:
                message = recv(_MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warn("Worker bus: {error}", error=e)
                return
            try:
                self.deliver(message)
            except Exception:
                log.failure("Worker bus: a message could not be handled")

    def connectionLost(self, reason):
        pass


class Bus:
    """This process's end of the bus: `index` is its worker number, 0 the primary."""

    def __init__(self, reactor, index: int, inbox: socket.socket, outboxes: dict[int, socket.socket]):
        self.reactor = reactor
        self.index = index
        self.count = len(outboxes) + 1
        self._inbox = _Inbox(inbox, self._deliver)
        self._outboxes = outboxes
        self._batches: dict[int, list[bytes]] = {}
        self._batch_sizes: dict[int, int] = {}
        self._flush_call = None
        self.on_datagram = None  # on_datagram(data, host, port, arrived)
        self._handlers: dict[str, object] = {}
        self.dropped = 0  # messages a full inbox refused
        self.handed_over = 0

    def start(self) -> None:
        self.reactor.addReader(self._inbox)

    def stop(self) -> None:
        self.reactor.removeReader(self._inbox)
        self.flush()

    def on(self, kind: str, handler) -> None:
        """handler(value, sender) for notes of this kind."""
        self._handlers[kind] = handler

    # -- sending -------------------------------------------------------------

    def hand_over(self, index: int, data: bytes, host: str, port: int, arrived: float) -> None:
        """Queue a SIP datagram for worker `index`; sent with the others of this turn."""
        raw_host = host.encode("ascii", "replace")
        record = _RECORD.pack(len(data), arrived, port, len(raw_host)) + raw_host + data
        batch = self._batches.get(index)
        if batch is None:
            batch = self._batches[index] = []
            self._batch_sizes[index] = 0
        elif self._batch_sizes[index] + len(record) > _BATCH_LIMIT:
            self._send_raw(index, _DATAGRAMS + b"".join(batch))
            batch.clear()
            self._batch_sizes[index] = 0
        batch.append(record)
        self._batch_sizes[index] += len(record)
        self.handed_over += 1
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        call, self._flush_call = self._flush_call, None
        if call is not None and call.active():
            call.cancel()
        batches, self._batches = self._batches, {}
        self._batch_sizes = {}
        for index, batch in batches.items():
            if batch:
                self._send_raw(index, _DATAGRAMS + b"".join(batch))

    def send(self, index: int, kind: str, value) -> bool:
        return self._send_raw(index, _NOTE + pickle.dumps((kind, self.index, value), pickle.HIGHEST_PROTOCOL))

    def broadcast(self, kind: str, value) -> None:
        """To every other process."""
        message = _NOTE + pickle.dumps((kind, self.index, value), pickle.HIGHEST_PROTOCOL)
        for index in self._outboxes:
            self._send_raw(index, message)

    def _send_raw(self, index: int, message: bytes) -> bool:
        outbox = self._outboxes.get(index)
        if outbox is None:
            return False
        try:
            outbox.send(message)
            return True
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as e:
            self.dropped += 1
            log.warn("Worker bus: cannot send to worker {index}: {error}", index=index, error=e)
        return False

    # -- receiving -------------------------------------------------------------

    def _deliver(self, message: bytes) -> None:
        kind = message[:1]
        if kind == _DATAGRAMS:
            self._datagrams(message)
        elif kind == _NOTE:
            name, sender, value = pickle.loads(memoryview(message)[1:])
            handler = self._handlers.get(name)
            if handler is not None:
                handler(value, sender)

    def _datagrams(self, message: bytes) -> None:
        deliver = self.on_datagram
        view = memoryview(message)
        offset = 1
        end = len(message)
        size = _RECORD.size
        while offset + size <= end:
            length, arrived, port, host_length = _RECORD.unpack_from(message, offset)
            offset += size
            host = bytes(view[offset:offset + host_length]).decode("ascii")
            offset += host_length
            data = bytes(view[offset:offset + length])
            offset += length
            if deliver is not None:
                deliver(data, host, port, arrived)
