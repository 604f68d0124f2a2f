"""One sipproxy on every core: the primary process (the twistd service) and `[server] workers - 1` helpers.

How the work is split (docs/performance.md, "Workers"):
- Every process has its own UDP socket on the same address and port
  (SO_REUSEPORT, bound by the primary): phones see one server, and the
  kernel gives each peer address to one socket, so a peer's datagrams are
  read in the order it sent them.
- A datagram belongs to one worker (`owner.py`): a request to the one its
  Call-ID hashes to (retransmissions, CANCEL and the non-2xx ACK follow the
  INVITE), a response to the one whose `worker=` parameter is in our top Via.
  Whoever reads a datagram it does not own hands it over (`bus.py`).
- Bindings, digest failures and plugin events are shared over the same bus
  (`link.py`); the primary is the only writer of the SQLite file, the one place
  for the admin API, the web sites, plugins' services and events, and it sums
  the workers' counters for the metrics.
- `supervisor.py` starts the workers, restarts one that dies, and stops them
  with the server; `child.py` is a worker's main program.
"""
