"""Directory search latency against slapd with 10,000 entries, through the server's phone-facing site.

Not a test. Run:  python bench/bench_directory.py [--entries 10000] [--searches 500] [--concurrency 4]
Each search is what a phone does: GET /directory/search?last=<prefix>, parse the
CiscoIPPhoneDirectory. Prefixes are two letters, so most searches page.
"""

import argparse
import os
import random
import string
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from tests.integration.harness import ServerProcess  # noqa: E402
from tests.integration.slapd import BASE_DN, Slapd, person_ldif  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10000)
    parser.add_argument("--searches", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    rng = random.Random(7)
    letters = string.ascii_uppercase
    people = "".join(person_ldif(f"u{i}", f"Given{i}", rng.choice(letters) + rng.choice(string.ascii_lowercase) +
                                 "".join(rng.choice(string.ascii_lowercase) for _ in range(5)), f"{10000 + i}")
                     for i in range(args.entries))
    slapd = Slapd(people).start()
    server = ServerProcess('[plugins]\nenabled = ["ldapdir"]\n[plugins.ldapdir]\n'
                           f'urls = ["{slapd.url}"]\nbase_dn = "ou=people,{BASE_DN}"\n'
                           'search_filter = "(objectClass=inetOrgPerson)"\ntimeout = 3\n').start()
    try:
        prefixes = [rng.choice(letters) + rng.choice(string.ascii_lowercase) for _ in range(args.searches)]

        def one(prefix):
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{server.web_port}/directory/search?last={prefix}",
                                        timeout=10) as response:
                body = response.read()
            assert b"CiscoIPPhone" in body, body[:200]
            return time.perf_counter() - started

        for p in prefixes[:20]:
            one(p)  # warm the connections
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            latencies = sorted(pool.map(one, prefixes))
        elapsed = time.perf_counter() - started
        pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000  # noqa: E731
        print(f"{args.searches} searches over {args.entries} entries, {args.concurrency} at a time: "
              f"{args.searches / elapsed:.0f} searches/s, p50 {pct(50):.1f} ms, p90 {pct(90):.1f} ms, "
              f"p99 {pct(99):.1f} ms")
    finally:
        server.stop()
        slapd.stop()


if __name__ == "__main__":
    main()
