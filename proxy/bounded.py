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
