"""A dict with a size bound, for every table a peer can grow.

A stranger who rotates source addresses (or IPv6 interface ids) must not be
able to grow the server's memory without limit: per-address failure counts,
lockouts and replay state all live in a `BoundedDict`. When it is full the
oldest entry (least recently written) makes room, and the eviction is
counted so that the metrics show a table under pressure.
"""

from collections import OrderedDict


class BoundedDict(OrderedDict):
    """Insertion-ordered; writing a key moves it to the end; the front is evicted past `max_entries`."""

    def __init__(self, max_entries: int, on_evict=None):
        super().__init__()
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.evicted = 0
        self._on_evict = on_evict  # on_evict(key, value): a last look at what is dropped

    def __setitem__(self, key, value):
        if key in self:
            self.move_to_end(key)
        super().__setitem__(key, value)
        while len(self) > self.max_entries:
            old_key, old_value = self.popitem(last=False)
            self.evicted += 1
            if self._on_evict is not None:
                self._on_evict(old_key, old_value)

    def oldest(self):
        """(key, value) at the front, or None when empty."""
        for key in self:
            return key, OrderedDict.__getitem__(self, key)
        return None


class RecentMemo:
    """A cache of what was used lately, in two generations of at most `size` entries each.

    When the young generation is full it becomes the old one and the oldest is forgotten whole, so the
    memory is bounded without any per-entry bookkeeping; an entry found in the old generation moves back
    to the young one. A flood of values never seen again pushes the useful ones out only after `size` of
    them, not at once. For parsed header values that recur (proxy/sip/uri.py).
    """

    __slots__ = ("size", "_young", "_old")

    def __init__(self, size: int):
        self.size = size
        self._young: dict = {}
        self._old: dict = {}

    def get(self, key):
        value = self._young.get(key)
        if value is None:
            value = self._old.get(key)
            if value is not None:
                self.put(key, value)
        return value

    def put(self, key, value) -> None:
        if len(self._young) >= self.size:
            self._old = self._young
            self._young = {}
        self._young[key] = value

    def __len__(self) -> int:
        return len(self._young) + len(self._old)
