"""What sharing bindings through Redis costs (docs/scaling.md): figures for the capacity model.

Not a test. Run against a Redis of your own (an empty database: it is flushed):
    python bench/bench_redis.py --url unix:///tmp/bench-redis/redis.sock [--bindings 100000]
Measures, with two location services ("nodes" a and b, two connections each) in one process:
- a lookup in the local copy against a Redis GET round trip (why calls never ask Redis);
- propagation: from node a's save being acknowledged to node b's copy having it (p50/p99);
- Redis commands per registration and per call, and Redis memory per binding (bindings per GiB);
- how long a node takes to read N bindings back (a restart or a reconnection).
"""

import argparse
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from twisted.internet import defer, reactor, task  # noqa: E402

from proxy.config import LocationConfig  # noqa: E402
from proxy.redis.store import RedisStore  # noqa: E402
from proxy.registration.location import Binding  # noqa: E402
from proxy.registration.redis_location import RedisLocationService  # noqa: E402


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def binding(n: int, node: str) -> Binding:
    now = reactor.seconds()
    return Binding(aor=f"sip:{10000 + n}@site.example", contact=f"sip:{10000 + n}@10.1.{n // 250 % 250}.{n % 250}:5060",
                   expires_at=now + 3600, call_id=f"{n:08x}-reg@10.1.0.1", cseq=2, source_host="10.1.0.1",
                   source_port=5060, user_agent="Cisco-CP7960G/8.0", registered_at=now, node=node)


def node(config, name):
    store = RedisStore(reactor, config, name, origin=f"{name}/bench")
    location = RedisLocationService(store, reactor, name)
    location.start()
    return store, location


@defer.inlineCallbacks
def until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        yield task.deferLater(reactor, 0.001, lambda: None)


def commandstats(text: bytes) -> dict:
    return {m.group(1).decode(): int(m.group(2)) for m in re.finditer(rb"cmdstat_(\w+):calls=(\d+)", text)}


@defer.inlineCallbacks
def run(args):
    config = LocationConfig(backend="redis", urls=(args.url,), timeout=2.0, max_pending=1_000_000)
    store_a, a = node(config, "a")
    yield until(lambda: a.loaded)
    yield store_a.commands.execute("FLUSHDB")
    store_b, b = node(config, "b")
    yield until(lambda: b.loaded)

    # Lookup: the local copy against a round trip.
    a.save(binding(0, "a"))
    yield a.stored()
    aor = binding(0, "a").aor
    t = time.perf_counter()
    for _ in range(100_000):
        a.lookup(aor)
    local_us = (time.perf_counter() - t) / 100_000 * 1e6
    samples = []
    for _ in range(2000):
        t = time.perf_counter()
        yield store_a.commands.execute("GET", "x")
        samples.append((time.perf_counter() - t) * 1e6)
    print(f"lookup in the local copy: {local_us:.2f} us; a Redis GET round trip: p50 {percentile(samples, 50):.0f} us, "
          f"p99 {percentile(samples, 99):.0f} us")

    # Propagation, one registration at a time.
    acks, known = [], []
    for n in range(1, 2001):
        x = binding(n, "a")
        t = time.perf_counter()
        a.save(x)
        yield a.stored()
        acks.append((time.perf_counter() - t) * 1000)
        yield until(lambda: b.find_contact(x.contact) is not None)
        known.append((time.perf_counter() - t) * 1000)
    print(f"from a's save: Redis acknowledges (a's 200 may go) p50 {percentile(acks, 50):.2f} ms, p99 "
          f"{percentile(acks, 99):.2f} ms; b knows the binding p50 {percentile(known, 50):.2f} ms, p99 "
          f"{percentile(known, 99):.2f} ms, max {max(known):.2f} ms (2000 registrations, one at a time)")

    # Commands per registration, memory per binding, at N bindings.
    before = commandstats((yield store_a.commands.execute("INFO", "commandstats")))
    memory_before = int(re.search(rb"used_memory:(\d+)", (yield store_a.commands.execute("INFO", "memory"))).group(1))
    t = time.perf_counter()
    for start in range(10_000, 10_000 + args.bindings, 1000):
        for n in range(start, min(start + 1000, 10_000 + args.bindings)):
            a.save(binding(n, "a"))
        yield a.stored()
    took = time.perf_counter() - t
    after = commandstats((yield store_a.commands.execute("INFO", "commandstats")))
    memory_after = int(re.search(rb"used_memory:(\d+)", (yield store_a.commands.execute("INFO", "memory"))).group(1))
    per = {k: (after.get(k, 0) - before.get(k, 0)) / args.bindings for k in after if after.get(k, 0) != before.get(k, 0)}
    per.pop("info", None)
    per_binding = (memory_after - memory_before) / args.bindings
    print(f"{args.bindings} registrations written in {took:.2f} s ({args.bindings / took:,.0f}/s from one process); "
          f"Redis commands per registration: {', '.join(f'{k} {v:g}' for k, v in sorted(per.items()))}")
    print(f"Redis memory per binding: {per_binding:.0f} bytes ({(1 << 30) / per_binding:,.0f} bindings per GiB)")
    yield until(lambda: b.count() >= args.bindings, seconds=120)

    # Reading everything back: a third node starting.
    t = time.perf_counter()
    store_c, c = node(config, "c")
    yield until(lambda: c.loaded, seconds=120)
    print(f"a node starting reads {c.count()} bindings from Redis in {time.perf_counter() - t:.2f} s")
    for location in (a, b, c):
        location.stop()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--bindings", type=int, default=100_000)
    args = parser.parse_args()
    done = run(args)
    done.addErrback(lambda f: print(f.getTraceback()))
    done.addBoth(lambda _: reactor.stop())
    reactor.run()


if __name__ == "__main__":
    main()
