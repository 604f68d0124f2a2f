"""Calls through the proxy under load: SIPp UAC -> proxy -> SIPp UAS, stepping the call rate.

Not a test. Run:  python bench/bench_proxy.py [--rates 50,100,200] [--seconds 10] [--ring-ms 0]
Each call: INVITE, 180, 200 (response time: INVITE to 200 at the caller), ACK,
BYE, 200, all through the proxy with Record-Route. The caller's address is a
trusted network here, so no digest challenge (bench_register.py measures
that). Reports per rate: calls, failures, response-time percentiles, and the
server's resident memory; with --ring-ms the callee rings that long before
answering, which holds rate*ring calls in progress, and the memory per call in
progress is reported.
"""

import argparse
import csv
import glob
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from tests.integration.harness import ServerProcess, free_port, require, run_sipp  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU the server has used (from /proc): a fairer comparison than wall time on a shared VM."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def step(server, callee_port, rate, seconds, ring_ms, scrape_url=None):
    sipp = require("sipp")
    calls = int(rate * seconds)
    workdir = tempfile.mkdtemp(prefix=f"bench-proxy-{rate}-")
    uas = subprocess.Popen(
        [sipp, "-sf", os.path.join(HERE, "uas_ring_then_answer.xml"), "-i", "127.0.0.1", "-p", str(callee_port),
         "-m", str(calls), "-d", str(ring_ms), "-nostdin", "-timeout", f"{int(seconds * 4 + 60)}s",
         f"127.0.0.1:{server.port}"], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    inf = os.path.join(workdir, "callee.csv")
    with open(inf, "w") as f:
        f.write("SEQUENTIAL\n1002;localhost;\n")
    uac = subprocess.Popen(
        [sipp, "-sf", os.path.join(HERE, "uac_call.xml"), "-inf", inf, "-i", "127.0.0.1", "-p", str(free_port()),
         "-r", str(rate), "-m", str(calls), "-l", str(max(100, rate * (ring_ms // 1000 + 3))), "-nostdin",
         "-timeout", f"{int(seconds * 4 + 60)}s", "-trace_rtt", "-rtt_freq", "1", "-trace_stat", "-fd", "1",
         f"127.0.0.1:{server.port}"], cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    cpu_before = cpu_seconds(server.process.pid)
    last_scrape = time.monotonic()
    while uac.poll() is None:
        peak = max(peak, rss_kib(server.process.pid))
        if scrape_url and time.monotonic() - last_scrape >= 5:
            urllib.request.urlopen(scrape_url, timeout=5).read()  # as Prometheus would, every 5 s here
            last_scrape = time.monotonic()
        time.sleep(0.2)
    cpu = cpu_seconds(server.process.pid) - cpu_before
    uas.wait(30) if uas.poll() is None else None
    if uas.poll() is None:
        uas.kill()
    rtts, last = [], {}
    for path in glob.glob(os.path.join(workdir, "*_rtt.csv")):
        with open(path) as f:
            rtts += [float(r["response_time_ms"]) for r in csv.DictReader(f, delimiter=";") if r.get("response_time_ms")]
    for path in glob.glob(os.path.join(workdir, "uac_call_*_.csv")):
        with open(path) as f:
            rows = list(csv.DictReader(f, delimiter=";"))
            last = rows[-1] if rows else {}
    ok = int(last.get("SuccessfulCall(C)", 0) or 0)
    failed = int(last.get("FailedCall(C)", 0) or 0)
    return calls, ok, failed, rtts, peak, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="50,100,200,400")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--ring-ms", type=int, default=0)
    parser.add_argument("--metrics", action="store_true", help="enable the metrics plugin and scrape it every 5 s")
    args = parser.parse_args()
    extra, scrape_url = "", None
    if args.metrics:
        metrics_port = free_port()
        extra = f'[plugins]\nenabled = ["metrics"]\n[plugins.metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
        scrape_url = f"http://127.0.0.1:{metrics_port}/metrics"
    server = ServerProcess('[proxy]\ntrusted = ["127.0.0.1/32"]\n[auth]\nmax_failures = 1000000\n' + extra)
    server.admin("user", "add", "1002", "--password", "bench")
    server.start()
    callee_port = free_port()
    reg = run_sipp("register.xml", server.port, injection=[("1002", "localhost", "3600")], local_port=callee_port,
                   extra=["-au", "1002", "-ap", "bench"])
    if reg.returncode != 0:
        server.stop()
        sys.exit("callee registration failed")
    idle = rss_kib(server.process.pid)
    best = None
    try:
        print(f"Calls through the proxy (SIPp UAC -> proxy -> SIPp UAS on loopback), {args.seconds:.0f} s per rate, "
              f"callee rings {args.ring_ms} ms; server RSS idle {idle / 1024:.1f} MiB")
        print(f"{'calls/s':>8} {'calls':>7} {'ok':>7} {'failed':>7} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} "
              f"{'peak RSS MiB':>13} {'KiB/call in progress':>21} {'server CPU ms/call':>19}"
              + ("   (metrics plugin on, scraped every 5 s)" if args.metrics else ""))
        for rate in (int(r) for r in args.rates.split(",")):
            calls, ok, failed, rtts, peak, cpu = step(server, callee_port, rate, args.seconds, args.ring_ms, scrape_url)
            in_progress = rate * args.ring_ms / 1000
            per_call = f"{(peak - idle) / in_progress:.1f}" if in_progress >= 1 else "-"
            print(f"{rate:>8} {calls:>7} {ok:>7} {failed:>7} {percentile(rtts, 50):>7.0f} {percentile(rtts, 90):>7.0f} "
                  f"{percentile(rtts, 99):>7.0f} {peak / 1024:>13.1f} {per_call:>21} {1000 * cpu / max(ok, 1):>19.2f}",
                  flush=True)
            if failed == 0 and ok == calls:
                best = rate
            else:
                break
            time.sleep(2)
    finally:
        server.stop()
    print(f"highest rate with 0 failed calls: {best}/s" if best else "no rate completed without failures")


if __name__ == "__main__":
    main()
