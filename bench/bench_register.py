"""REGISTER with digest under load: SIPp over 1,000 distinct users, stepping the rate.

Not a test. Run:  python bench/bench_register.py [--rates 100,200,400] [--seconds 10]
Starts the server with twistd on loopback (a throwaway state directory with
1,000 users), then for each rate runs SIPp for --seconds: each call is a
line's REGISTER, 401, REGISTER with credentials, 200. Reports per rate the
calls made, failures, and response-time percentiles (first REGISTER to 200).
The answer is the highest rate with 0 failures.

Credentials: SIPp 3.6 cannot take a per-call user name inside
[authentication] (SIPp issue 640: only one nested field is substituted, in
the wrong place). So this script, which owns the server's state directory
and so its nonce secret, mints a fresh valid nonce per call and precomputes
the qop=auth answer into the injection file. The server's work is the same:
it still challenges the first REGISTER, then verifies the nonce's HMAC, the
nonce count and the response, and writes the binding through to SQLite.
"""

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

import time  # noqa: E402

from proxy.registration.auth import DigestAuthenticator, digest_response, load_secret  # noqa: E402
from proxy.registration.credentials import UserRecord, compute_ha1, write_users  # noqa: E402
from tests.integration.harness import ServerProcess, free_port, require  # noqa: E402

PASSWORD = "bench-secret"
REALM = "localhost"


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))
    return values[k]


class _WallClock:
    def seconds(self):
        return time.time()


def authorization_rows(server, users, calls):
    """One row per call: user, domain, expires, and a valid Authorization for a fresh nonce."""
    minter = DigestAuthenticator(_WallClock(), None, REALM, load_secret(server.state_dir))
    uri = f"sip:127.0.0.1:{server.port}"
    rows = []
    for i in range(calls):
        user = users[i % len(users)]
        nonce = minter.make_nonce("127.0.0.1")
        params = {"username": user, "realm": REALM, "nonce": nonce, "uri": uri, "qop": "auth", "nc": "00000001",
                  "cnonce": f"c{i}"}
        response = digest_response(compute_ha1(user, REALM, PASSWORD), params, "REGISTER")
        rows.append(f'{user};{REALM};3600;Digest username="{user}", realm="{REALM}", nonce="{nonce}", uri="{uri}", '
                    f'response="{response}", algorithm=MD5, qop=auth, nc=00000001, cnonce="c{i}";\n')
    return rows


def run_rate(server, rate, seconds, users, workdir):
    sipp = require("sipp")
    calls = int(rate * seconds)
    inf = os.path.join(workdir, "users.csv")
    with open(inf, "w") as f:
        f.write("SEQUENTIAL\n" + "".join(authorization_rows(server, users, calls)))
    rundir = tempfile.mkdtemp(dir=workdir, prefix=f"rate{rate}-")
    args = [sipp, "-sf", os.path.join(os.path.dirname(__file__), "register_load.xml"), "-inf", inf,
            "-i", "127.0.0.1", "-p", str(free_port()), "-r", str(rate), "-m", str(calls),
            "-l", str(max(10, rate * 2)), "-nostdin", "-timeout", f"{int(seconds * 3 + 30)}s", "-trace_rtt",
            "-rtt_freq", "1", "-trace_stat", "-fd", "1", f"127.0.0.1:{server.port}"]
    subprocess.run(args, cwd=rundir, capture_output=True, timeout=seconds * 4 + 60)
    rtts = []
    for path in glob.glob(os.path.join(rundir, "*_rtt.csv")):
        with open(path) as f:
            for row in csv.DictReader(f, delimiter=";"):
                try:
                    rtts.append(float(row["response_time_ms"]))
                except (KeyError, ValueError):
                    pass
    stat_rows = []
    for path in glob.glob(os.path.join(rundir, "*_.csv")) + glob.glob(os.path.join(rundir, "*[0-9].csv")):
        with open(path) as f:
            stat_rows = list(csv.DictReader(f, delimiter=";"))
    last = stat_rows[-1] if stat_rows else {}
    ok = int(last.get("SuccessfulCall(C)", 0) or 0)
    failed = int(last.get("FailedCall(C)", 0) or 0)
    return calls, ok, failed, rtts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="100,200,400,800")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="bench-register-")
    users = [f"{2000 + i}" for i in range(args.users)]
    server = ServerProcess('[registrar]\nmin_expires = 60\n[auth]\nmax_failures = 1000000\n')
    os.makedirs(server.state_dir, exist_ok=True)
    load_secret(server.state_dir)  # created now, so the server and this script share it
    write_users(os.path.join(server.state_dir, "users.json"),
                {u: UserRecord(u, REALM, compute_ha1(u, REALM, PASSWORD)) for u in users})
    server.start()
    best = None
    try:
        print(f"REGISTER with digest, {args.users} users, {args.seconds:.0f} s per rate (SIPp on loopback)")
        print(f"{'rate/s':>7} {'calls':>7} {'ok':>7} {'failed':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}  (SIPp measures whole ms)")
        for rate in (int(r) for r in args.rates.split(",")):
            calls, ok, failed, rtts = run_rate(server, rate, args.seconds, users, workdir)
            print(f"{rate:>7} {calls:>7} {ok:>7} {failed:>7} {percentile(rtts, 50):>8.0f} "
                  f"{percentile(rtts, 90):>8.0f} {percentile(rtts, 99):>8.0f}", flush=True)
            if failed == 0 and ok == calls:
                best = rate
            else:
                break
    finally:
        server.stop()
    print(f"highest rate with 0 failures: {best}/s" if best else "no rate completed without failures")


if __name__ == "__main__":
    main()
