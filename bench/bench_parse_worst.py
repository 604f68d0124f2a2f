"""Worst cases for the message layer: 64 KB datagrams shaped to make a parser go quadratic.

Not a test. Run:  python bench/bench_parse_worst.py [--repo DIR] [--size 65000]
For each shape it prints the time one datagram takes through the server's
entry point (`SipServer.data_received`: parse, validate, answer), best of 3.
`--repo` points at another checkout (e.g. a worktree of an older commit)
to compare before and after on the same machine.
"""

import argparse
import os
import sys
import time

HEAD = (b"INVITE sip:1002@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.5:5060;branch=z9hG4bKw\r\n"
        b"From: <sip:1001@example.com>;tag=1\r\nTo: <sip:1002@example.com>\r\nCall-ID: w@x\r\n"
        b"CSeq: 1 INVITE\r\nMax-Forwards: 70\r\n")


def shapes(n: int) -> dict[str, bytes]:
    return {
        "spaces, then a header, a fold elsewhere": HEAD + b"X-A: a" + b" " * n + b"\r\nX-B: b\r\n c\r\n\r\n",
        "spaces before a fold": HEAD + b"X-A: a" + b" " * n + b"\r\n b\r\n\r\n",
        "many folds in one header": HEAD + b"X-A: a" + b"\r\n x" * (n // 4) + b"\r\n\r\n",
        "whitespace-only lines": HEAD + b" \r\n" * (n // 3) + b"\r\n",
        "tabs and spaces, no newline": HEAD + b"X-A: " + b" \t" * (n // 2) + b"\r\n \r\n\r\n",
        "one long Via": HEAD.replace(b"Via: ", b"Via: " + b"SIP/2.0/UDP 1.1.1.1;x=1, " * (n // 26)) + b"\r\n",
        "many header lines": HEAD + b"X: y\r\n" * (n // 6) + b"\r\n",
        "quoted pairs in a display name": HEAD.replace(b"From: <", b'From: "' + b"\\\"" * (n // 2) + b'" <') + b"\r\n",
        "digest with many parameters": HEAD + b"Proxy-Authorization: Digest " + b"a=b," * (n // 4) + b"\r\n\r\n",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repo", default=os.path.join(os.path.dirname(__file__), os.pardir))
    parser.add_argument("--size", type=int, default=65000)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.repo))
    from proxy.testing import make_server, udp_source

    server, transports, _ = make_server()
    print(f"{'shape':42s} {'bytes':>7s} {'ms':>10s}")
    for name, data in shapes(args.size).items():
        data = data[:65507]
        best = None
        for _ in range(3):
            started = time.perf_counter()
            server.data_received(data, udp_source("192.0.2.5", 5060))
            elapsed = time.perf_counter() - started
            best = elapsed if best is None else min(best, elapsed)
            transports.take()
        print(f"{name:42s} {len(data):7d} {best * 1000:10.2f}")


if __name__ == "__main__":
    main()
