"""Memory per call in progress (issue 14: <= 10 KiB per call), in one process's core.

Not a test. Run:  python bench/bench_calls.py [--calls 20000]
Builds the core as the server does (`make_core`: SQLite in a temporary directory, a Clock), registers one
callee, and sends N INVITEs from a trusted gateway (no digest round) that the callee answers with 180
Ringing: N calls ringing at once, each a server transaction, a ProxyCall, a branch and its client
transaction with Timer C running. Reports the resident memory they added, per call. With --answered the
callee answers 200 instead: once the transactions have lingered out, what stays per call is its entry in
the dialog table (proxy/dialogs.py), until its BYE.
"""

import argparse
import gc
import os
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
sys.path.insert(0, os.path.dirname(__file__))

from proxy.config import ProxySettings  # noqa: E402
from proxy.registration.location import Binding  # noqa: E402
from proxy.sip.message import Response  # noqa: E402
from proxy.testing import make_core, sip_bytes, udp_source  # noqa: E402
from resident import rss_kib  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--answered", action="store_true", help="answer every call (200) instead of ringing")
    parser.add_argument("--traced", action="store_true", help="also count with tracemalloc (slower)")
    args = parser.parse_args()
    n = args.calls
    status = "200 OK" if args.answered else "180 Ringing"
    core, transports, clock = make_core(tempfile.mkdtemp(prefix="bench-calls-"),
                                        proxy=ProxySettings(trusted=("192.0.2.0/24",)))
    clock.advance(time.time())
    core.location.save(Binding(aor="sip:1002@example.com", contact="sip:1002@10.0.0.2:5060",
                               expires_at=clock.seconds() + 3600, registered_at=clock.seconds()))
    server = core.server
    gateway = udp_source("192.0.2.10", 5060)
    callee = udp_source("10.0.0.2", 5060)
    gc.collect()
    before = rss_kib()
    if args.traced:
        tracemalloc.start()
    started = time.perf_counter()
    for i in range(n):
        server.data_received(sip_bytes(f"""
            INVITE sip:1002@example.com SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK{i:x}g
            From: <sip:+15551234567@192.0.2.10>;tag=g{i}
            To: <sip:1002@example.com>
            Call-ID: {i:08x}-call@192.0.2.10
            CSeq: 1 INVITE
            Contact: <sip:+15551234567@192.0.2.10:5060>
            Max-Forwards: 70
            Content-Type: application/sdp
        """, b"v=0\r\no=- 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
             b"m=audio 4000 RTP/AVP 0\r\n"), gateway)
        for message, _ in transports.take():
            if isinstance(message, Response) or message.method != "INVITE":
                continue
            ringing = message.serialize().decode().replace(f"INVITE {message.uri_text} SIP/2.0",
                                                           f"SIP/2.0 {status}", 1)
            ringing = ringing.replace("To: <sip:1002@example.com>", "To: <sip:1002@example.com>;tag=c1", 1)
            server.data_received(ringing.encode(), callee)
        transports.sent.clear()
        if i % 1000 == 999:
            clock.advance(1)  # let the 100 Trying linger out, as time would
    elapsed = time.perf_counter() - started
    clock.advance(40)  # every transaction that has ended is gone; the ringing ones remain (Timer C: 180 s)
    transports.sent.clear()
    gc.collect()
    added = rss_kib() - before
    if args.traced:  # what Python holds now, not what the process got from the OS and kept (freed arenas)
        print(f"traced: {tracemalloc.get_traced_memory()[0] / n:.0f} bytes per call still held")
        tracemalloc.stop()
    live = core.router.counters()
    print(f"{n} calls {'answered' if args.answered else 'ringing'}: {added} KiB resident added, {added * 1024 / n:.0f} bytes per call "
          f"({elapsed / n * 1e6:.0f} us to set one up); transactions {server.transactions.counts()}; calls {live}")


if __name__ == "__main__":
    main()
