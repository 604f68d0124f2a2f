"""Resident memory of this process, for the memory benchmarks (bench_bindings.py, bench_calls.py)."""


def rss_kib() -> int:
    """VmRSS from /proc (Linux), in KiB; 0 where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0
