"""This node's changes, numbered, for its SRST peers to pull; and which of two copies of a binding wins.

`ChangeLog` keeps the last `backlog` changes. A peer asks for what came after
the last number it applied; a peer that is further behind than the log reaches
(a long partition), or that asks a log of another generation (this node
restarted: numbers start again), is told to resync from a snapshot instead.
Memory is bounded by `backlog` whatever the peers do.

`fresher(a, b)`: RFC 3261 section 10.3 orders the registrations of one
Call-ID by CSeq; two Call-IDs (a phone registers with its primary and with
its backup separately, seed 000 line 42) are ordered by which expires later:
the registration made last, at either node, wins at both, so they agree.
"""

import collections
import secrets

from proxy.registration.location import Binding


class TooFarBehind(Exception):
    """The changes asked for are no longer in the log (or it is another generation): take a snapshot."""


class ChangeLog:
    def __init__(self, backlog: int = 10_000):
        self.backlog = backlog
        self.generation = secrets.token_hex(8)  # a new one each start: a peer then resyncs
        self.seq = 0  # the number of the last change
        self._entries: collections.deque = collections.deque(maxlen=backlog)  # (seq, change)

    def append(self, change: dict) -> int:
        self.seq += 1
        self._entries.append((self.seq, change))
        return self.seq

    def since(self, generation: str, seq: int, limit: int = 5000) -> tuple[int, list[dict]]:
        """The changes after `seq` (at most `limit`), and the number of the last one given."""
        if generation != self.generation or seq > self.seq:
            raise TooFarBehind(f"generation {generation}:{seq} is not this log's ({self.generation}:{self.seq})")
        if seq == self.seq:
            return seq, []
        oldest = self._entries[0][0] if self._entries else self.seq + 1
        if seq + 1 < oldest:
            raise TooFarBehind(f"change {seq + 1} is no longer kept (the oldest is {oldest})")
        skip = seq + 1 - oldest
        changes = [change for _, change in list(self._entries)[skip:skip + limit]]
        return seq + len(changes), changes

    def __len__(self) -> int:
        return len(self._entries)


def fresher(new: Binding, current: Binding | None) -> bool:
    """Whether `new` should replace `current` (the same AoR and contact)."""
    if current is None:
        return True
    if new.call_id == current.call_id:
        return (new.cseq, new.expires_at) > (current.cseq, current.expires_at)
    return new.expires_at > current.expires_at


def removal_applies(removed: Binding, current: Binding | None) -> bool:
    """Whether a peer's removal of `removed` removes our `current` copy: not when ours is a later registration."""
    if current is None:
        return False
    if current.call_id == removed.call_id:
        return current.cseq <= removed.cseq
    return current.expires_at <= removed.expires_at
