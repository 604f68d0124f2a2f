"""The overload step of issue 14: a 3x flood of registrations, and how the server comes out of it.

Not a test. Run as root (it enters a private network namespace, as ../shared/bench does), with SIPp installed:
    python bench/overload.py --adapter sipproxy --capacity 4500
    python bench/overload.py --adapter kamailio --capacity 12000 --flood-rate 16500
What it does, with the SUT started by ../shared/bench's adapter (SIPPROXY_PYTHON and SIPPROXY_EXTRA_TOML
are passed on, as bench.sh does):
- a steady SIPp registers its own 1000 users at `--steady` per second for the whole run
  (`--before` seconds, the flood, `--after` seconds): the phones that must keep being served;
- after `--before` seconds a second SIPp offers `--factor` x `--capacity` registrations per second for
  `--flood` seconds (another 1000 users), then is told to start no more (its "q"): what it has open runs out
  with its retransmissions, as phones' would;
- both use B1's scenario (REGISTER, 401, REGISTER with digest, 200) and bench.sh's SIPp options.
  By default SIPp does what it does in ../shared/bench: a 503 fails the call and SIPp sends a BYE;
  `--phone` adds -nd, so a refused phone just gives up (as a phone that waits for Retry-After).
Then, from every completed registration's time (SIPp's rtt files):
- goodput: registrations completed per second while the flood is offered, and its share of `--capacity`;
- recovery: seconds from the end of the flood until the steady phones are served as before it (of those
  starting in every later second >= 90% complete with p99 under 200 ms), and until they are served within T1
  (p99 under 500 ms: none has to retransmit);
- what SIPp saw: failed calls, retransmissions; and the SUT's CPU.
Results go to <work>/summary.txt (and stdout); every SIPp file stays in <work>.
"""

import argparse
import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", default="sipproxy", help="an adapter of the shared harness (sipproxy, kamailio)")
    p.add_argument("--harness", default=os.path.join(HERE, os.pardir, os.pardir, "shared", "bench"))
    p.add_argument("--capacity", type=float, required=True, help="the highest B1 rate that passes (per second)")
    p.add_argument("--factor", type=float, default=3.0, help="the flood offers this times the capacity")
    p.add_argument("--flood-rate", type=float, help="offer this rate instead of factor x capacity")
    p.add_argument("--flood", type=float, default=20.0, help="seconds the flood is offered")
    p.add_argument("--before", type=float, default=5.0)
    p.add_argument("--after", type=float, default=15.0)
    p.add_argument("--steady", type=float, default=200.0, help="registrations/s of the steady phones")
    p.add_argument("--phone", action="store_true", help="SIPp with -nd: no BYE after a refusal")
    p.add_argument("--open-loop", action="store_true",
                   help="no cap on SIPp's open calls (its default, as in bench.sh: 3 x rate, which slows a flood "
                        "down once the server answers late)")
    p.add_argument("--sources", type=int, default=1,
                   help="flood SIPps, each from its own port (many phones), sharing the rate and the users")
    p.add_argument("--work", default=None)
    return p.parse_args(argv)


def isolate(argv):
    """Re-run inside a private network namespace with only loopback (as bench.sh), when root can."""
    if os.environ.get("ACC_ISOLATED") == "1" or os.geteuid() != 0 or not shutil.which("unshare"):
        return
    script = 'ip link set lo up && exec "$0" "$@"'
    os.execvpe("unshare", ["unshare", "-n", "--", "bash", "-c", script, sys.executable, *argv],
               {**os.environ, "ACC_ISOLATED": "1"})


def write_users(path, first, count):
    with open(path, "w") as f:
        f.write("SEQUENTIAL\n")
        for user in range(first, first + count):
            f.write(f"{user};pw{user}\n")


def sipp(work, name, harness, rate, calls, users_csv, port, phone, seconds, open_loop):
    cmd = ["sipp", "127.0.0.1:5060", "-sf", os.path.join(harness, "scenarios", "bench_reg.xml"),
           "-i", "127.0.0.1", "-p", str(port), "-cp", str(port + 10000), "-bind_local", "-nostdin",
           "-trace_stat", "-stf", f"{name}-stat.csv", "-fd", "1", "-trace_rtt", "-rtt_freq", "100",
           "-trace_screen", "-screen_file", f"{name}-screen.log", "-recv_timeout", "10000",
           "-key", "domain", "127.0.0.1", "-inf", users_csv, "-key", "expires", "3600", "-auth_uri", "127.0.0.1",
           "-r", str(int(rate)), "-m", str(int(calls)), "-timeout", f"{int(seconds)}s", "-timeout_error"]
    if open_loop:
        cmd += ["-l", str(int(calls))]
    if phone:
        cmd.append("-nd")
    with open(os.path.join(work, "commands.txt"), "a") as f:
        f.write(" ".join(cmd) + "\n")
    return subprocess.Popen(cmd, cwd=work, stdout=open(os.path.join(work, f"{name}.out"), "w"),
                            stderr=subprocess.STDOUT)


def rtt_times(work, name):
    """(completed at, seconds taken) of each registration SIPp completed (its rtt file counts from its start)."""
    out = []
    started = epoch(stat_rows(work, name)[0]["StartTime"])
    for entry in sorted(os.listdir(os.path.join(work, name))):
        if entry.endswith("_rtt.csv"):
            with open(os.path.join(work, name, entry)) as f:
                for row in csv.reader(f, delimiter=";"):
                    if len(row) >= 2 and row[0][:1].isdigit():
                        out.append((started + float(row[0]) / 1000.0, float(row[1]) / 1000.0))
    return out


def epoch(field):
    """SIPp's stat time fields are 'date<TAB>time<TAB>epoch'."""
    return float(field.split("\t")[-1])


def last_stat(work, name):
    """SIPp's cumulative counters at the end of its run (the last row of its stat file)."""
    path = os.path.join(work, name, f"{name}-stat.csv")
    with open(path) as f:
        rows = list(csv.reader(f, delimiter=";"))
    head, last = rows[0], rows[-1]
    return {k: v for k, v in zip(head, last)}


def stat_rows(work, name):
    path = os.path.join(work, name, f"{name}-stat.csv")
    with open(path) as f:
        rows = list(csv.reader(f, delimiter=";"))
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def percentile(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def cpu_of(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu():
    """The machine's CPU time so far (/proc/stat, in ticks): user, system, softirq, idle (+iowait)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = fields[:7]
    return {"user": user + nice, "system": system + irq, "softirq": softirq, "idle": idle + iowait}


def udp_drops():
    """Datagrams the kernel dropped so far on each local UDP port of this network namespace (/proc/net/udp)."""
    drops = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    port = int(fields[1].rsplit(":", 1)[1], 16)
                    drops[port] = drops.get(port, 0) + int(fields[-1])
        except OSError:
            pass
    return drops


def sut_pids(adapter, state):
    found = []
    for name in ("twistd.pid", "kamailio.pid"):
        path = os.path.join(state, "primary", name)
        if os.path.exists(path):
            found.append(int(open(path).read().strip()))
    if found:  # and their children (workers, Kamailio's processes)
        out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
        parents = set(found)
        for line in out.splitlines():
            pid, ppid = map(int, line.split())
            if ppid in parents:
                found.append(pid)
    return found


def main(argv):
    args = parse_args(argv)
    isolate(sys.argv)
    harness = os.path.abspath(args.harness)
    work = args.work or f"/tmp/sipproxy-overload/{args.adapter}-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(work, exist_ok=True)
    flood_rate = args.flood_rate or args.factor * args.capacity
    state = os.path.join(work, "sut-state")
    env = {**os.environ, "SUT_INSTANCE": "primary", "SUT_HOST": "127.0.0.1", "SUT_PORT": "5060",
           "SUT_STATE_DIR": state, "SUT_BENCH_USERS": "2000"}
    adapter = os.path.join(harness, "adapters", args.adapter)
    started = subprocess.run([os.path.join(adapter, "start.sh")], env=env, capture_output=True, text=True)
    if started.returncode:
        sys.exit(f"overload.py: the SUT did not start:\n{started.stdout}{started.stderr}")
    try:
        floods = [f"flood{k}" for k in range(args.sources)]
        share = 1000 // args.sources
        for k, name in enumerate(floods):
            os.makedirs(os.path.join(work, name), exist_ok=True)
            write_users(os.path.join(work, name, "users.csv"), 10000 + k * share, share)
        os.makedirs(os.path.join(work, "steady"), exist_ok=True)
        write_users(os.path.join(work, "steady", "users.csv"), 11000, 1000)
        total = args.before + args.flood + args.after
        pids = sut_pids(args.adapter, state)
        cpu0 = cpu_of(pids)
        each0 = {pid: cpu_of([pid]) for pid in pids}
        machine0 = machine_cpu()
        t0 = time.time()
        steady = sipp(os.path.join(work, "steady"), "steady", harness, args.steady, args.steady * total,
                      "users.csv", 26000, args.phone, total + 20, args.open_loop)
        time.sleep(args.before)
        flood_start = time.time()
        rate = flood_rate / args.sources
        flood = [sipp(os.path.join(work, name), name, harness, rate, rate * args.flood, "users.csv", 25000 + 2 * k,
                      args.phone, args.flood + 25, args.open_loop) for k, name in enumerate(floods)]
        time.sleep(args.flood)
        flood_end = time.time()
        for k in range(args.sources):  # SIPp's "q" on its control port: no new calls, the open ones run out
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control:
                control.sendto(b"q", ("127.0.0.1", 25000 + 2 * k + 10000))
        machine = {k: v - machine0[k] for k, v in machine_cpu().items()}
        dropped = udp_drops()
        cpu_flood = cpu_of(pids) - cpu0
        each = {pid: round((cpu_of([pid]) - each0[pid]) / (flood_end - t0), 2) for pid in pids}
        sipp_cpu = cpu_of([p.pid for p in flood] + [steady.pid])
        steady.wait(timeout=total + 40)
        for p in flood:
            p.wait(timeout=60)
        cpu_total = cpu_of(pids) - cpu0
    finally:
        subprocess.run([os.path.join(adapter, "stop.sh")], env=env, capture_output=True)
    summary = summarise(work, args, floods, flood_rate, t0, flood_start, flood_end, cpu_flood, cpu_total)
    summary["sipp_cpu_share_of_core_until_flood_end"] = round(sipp_cpu / (flood_end - t0), 2)
    summary["sut_cpu_share_of_core_per_process"] = sorted(each.values(), reverse=True)
    summary["kernel_drops_at_flood_end"] = {
        "sut": dropped.get(5060, 0), "steady_sipp": dropped.get(26000, 0),
        "flood_sipps": sum(dropped.get(25000 + 2 * k, 0) for k in range(args.sources))}
    ticks = sum(machine.values()) or 1
    summary["machine_cpu_until_flood_end"] = {k: round(v / ticks, 2) for k, v in machine.items()}
    text = json.dumps(summary, indent=2)
    print(text)
    with open(os.path.join(work, "summary.txt"), "w") as f:
        f.write(text + "\n")


def summarise(work, args, floods, flood_rate, t0, flood_start, flood_end, cpu_flood, cpu_total):
    steady = rtt_times(work, "steady")
    flood = [entry for name in floods for entry in rtt_times(work, name)]
    done_in_flood = sum(1 for at, _ in steady + flood if flood_start <= at < flood_end)
    goodput = done_in_flood / (flood_end - flood_start)
    # Recovery: the first whole second after the flood from which the steady phones registering are served as
    # before it: of those starting in each later second, >= 90% complete (the rest failed or are late) and
    # their p99 is under 200 ms. (By start time: a phone that began during the flood and finished after it
    # says nothing about service after it.)
    by_start = {}
    for at, took in steady:
        by_start.setdefault(math.floor(at - took - flood_end), []).append(took)
    end = int(args.after) - 2  # the last seconds' registrations may not all be written out by SIPp

    def first_good_second(p99_limit):
        for start in range(0, end):
            if all(len(by_start.get(s, [])) >= 0.9 * args.steady
                   and percentile(by_start.get(s, [1e9]), 99) < p99_limit for s in range(start, end)):
                return start
        return None

    recovered_at = first_good_second(0.2)
    served_at = first_good_second(0.5)  # inside T1: no phone needs to retransmit
    before = [took for at, took in steady if at < flood_start]
    during = [took for at, took in steady if flood_start <= at < flood_end]
    stats = {"steady": last_stat(work, "steady"), "flood": {}}
    for name in floods:
        for key, value in last_stat(work, name).items():
            if value.isdigit():
                stats["flood"][key] = stats["flood"].get(key, 0) + int(value)
    done_in, started_in = {}, {}  # by second since the flood began: completions, and steady phones' times
    for at, _ in steady + flood:
        second = math.floor(at - flood_start)
        done_in[second] = done_in.get(second, 0) + 1
    for at, took in steady:
        started_in.setdefault(math.floor(at - took - flood_start), []).append(took)
    timeline = []
    for second in range(-int(args.before), int(args.flood + args.after)):
        started = started_in.get(second, [])
        timeline.append(f"{second:+d}s: {done_in.get(second, 0)} done; steady phones starting then: "
                        f"{len(started)} done, p99 {percentile(started, 99) * 1000:.0f} ms")
    return {
        "timeline": timeline,
        "adapter": args.adapter, "phone_like": args.phone, "open_loop": args.open_loop, "sources": args.sources, "capacity": args.capacity, "flood_rate": flood_rate,
        "flood_seconds": round(flood_end - flood_start, 1),
        "goodput_per_s": round(goodput), "goodput_share_of_capacity": round(goodput / args.capacity, 3),
        "recovered_after_s": recovered_at, "served_within_t1_after_s": served_at,
        "times": {"start": t0, "flood_start": flood_start, "flood_end": flood_end},
        "steady_p50_ms_before": round(percentile(before, 50) * 1000, 1),
        "steady_p99_ms_before": round(percentile(before, 99) * 1000, 1),
        "steady_p99_ms_during": round(percentile(during, 99) * 1000, 1),
        "steady_completed_during": len(during),
        "sut_cpu_share_of_core_in_flood": round(cpu_flood / (flood_end - t0), 2),
        "sut_cpu_seconds_total": round(cpu_total, 1),
        **{f"{name}_{key}": stats[name].get(key) for name in stats
           for key in ("TotalCallCreated", "SuccessfulCall(C)", "FailedCall(C)", "Retransmissions(C)",
                       "FailedUnexpectedMessage(C)", "FailedMaxUDPRetrans(C)", "FailedCallRejected(C)")},
        "work": work,
    }


if __name__ == "__main__":
    main(sys.argv[1:])
