"""Memory per binding and restart time at N bindings (issue 14: <= 1 KiB per binding, answering within 3 s).

Not a test. Run:  python bench/bench_bindings.py [--bindings 100000]
Saves N bindings through the location service (SQLite file in a temporary directory), reports the
resident memory they added, then opens the file again as a restart does and reports how long that took,
and the cost of one lookup at that size.
"""

import argparse
import gc
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.dirname(__file__))

from twisted.internet.task import Clock  # noqa: E402

from proxy.registration.location import Binding, SqliteLocationService  # noqa: E402
from resident import rss_kib  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bindings", type=int, default=100_000)
    n = parser.parse_args().bindings
    path = os.path.join(tempfile.mkdtemp(prefix="bench-bindings-"), "location.sqlite")
    clock = Clock()
    clock.advance(time.time())
    location = SqliteLocationService(path, clock)
    gc.collect()
    before = rss_kib()
    started = time.perf_counter()
    location._db.execute("BEGIN")
    for i in range(n):
        user = 100000 + i
        location.save(Binding(aor=f"sip:{user}@example.com", contact=f"sip:{user}@10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:5060",
                              expires_at=clock.seconds() + 3600, call_id=f"{i:08x}-3c26700e@10.0.0.1", cseq=101,
                              source_host=f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", source_port=5060,
                              user_agent="Cisco-CP7960G/8.0", registered_at=clock.seconds()))
    location._db.execute("COMMIT")
    saved = time.perf_counter() - started
    gc.collect()
    added = rss_kib() - before
    location.stop()
    started = time.perf_counter()
    again = SqliteLocationService(path, clock)
    restored = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(10_000):
        again.lookup(f"sip:{100000 + (i * 7919) % n}@example.com")
    lookup = (time.perf_counter() - started) / 10_000
    print(f"{n} bindings: {added * 1024 / n:.0f} bytes each in memory; saved in {saved:.1f} s "
          f"(one transaction); restart (load) {restored:.2f} s; lookup {lookup * 1e6:.1f} us")


if __name__ == "__main__":
    main()
