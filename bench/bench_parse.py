"""Message-layer throughput: parse, modify and serialize a 7960 INVITE with SDP.

Not a test. Run:  python bench/bench_parse.py [--seconds 10] [--rounds 5]
Prints messages per second on this interpreter (one core). The target of
issue 2 is at least 30,000 per second per core.

Each round does what a proxy does per hop: parse the datagram, validate the
fields a decision needs (Via, CSeq, Call-ID, From, To, Max-Forwards,
Request-URI), decrement Max-Forwards, push a Via, serialize.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from proxy.sip.wire import parse_message  # noqa: E402

SDP = (
    "v=0\r\n"
    "o=CiscoSystemsSIP-IPPhone-UserAgent 17045 11795 IN IP4 192.168.10.21\r\n"
    "s=SIP Call\r\n"
    "c=IN IP4 192.168.10.21\r\n"
    "t=0 0\r\n"
    "m=audio 29924 RTP/AVP 0 8 18 101\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:8 PCMA/8000\r\n"
    "a=rtpmap:18 G729/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
    "a=fmtp:101 0-15\r\n"
).encode()

# Shaped like a 7960 running SIP 7.x/8.x firmware calling through its proxy.
INVITE = (
    "INVITE sip:1002@192.168.10.5;user=phone SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 192.168.10.21:5060;branch=z9hG4bK5a7e0c8b\r\n"
    'From: "Alice Example" <sip:1001@192.168.10.5>;tag=000f23a1b2c30002690bf58e-2a4b5c6d\r\n'
    "To: <sip:1002@192.168.10.5;user=phone>\r\n"
    "Call-ID: 000f23a1-b2c30002-5d6e7f80-1a2b3c4d@192.168.10.21\r\n"
    "Date: Sat, 21 Nov 2026 12:00:00 GMT\r\n"
    "CSeq: 101 INVITE\r\n"
    "User-Agent: Cisco-SIPIPPhone/8.0\r\n"
    "Contact: <sip:1001@192.168.10.21:5060;user=phone>\r\n"
    "Expires: 180\r\n"
    "Accept: application/sdp\r\n"
    "Allow: ACK,BYE,CANCEL,INVITE,NOTIFY,OPTIONS,REFER,REGISTER,UPDATE\r\n"
    "Remote-Party-ID: \"Alice Example\" <sip:1001@192.168.10.5>;party=calling;id-type=subscriber;privacy=off;screen=yes\r\n"
    "Supported: replaces,join,norefersub\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Type: application/sdp\r\n"
    f"Content-Length: {len(SDP)}\r\n"
    "\r\n"
).encode() + SDP

PROXY_VIA = "SIP/2.0/UDP 192.168.10.5:5060;branch=z9hG4bKproxy"


def one_hop(data: bytes) -> bytes:
    request = parse_message(data)
    request.validate()
    request.uri
    headers = request.headers.set("Max-Forwards", str(request.max_forwards - 1)).prepend("Via", PROXY_VIA)
    return request.with_headers(headers).serialize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="total measuring time")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported")
    args = parser.parse_args()
    out = one_hop(INVITE)
    assert b"Max-Forwards: 69" in out and out.count(b"Via:") == 2, out
    for _ in range(2000):
        one_hop(INVITE)
    rounds = []
    for _ in range(args.rounds):
        count = 0
        start = time.perf_counter()
        deadline = start + args.seconds / args.rounds
        while True:
            for _ in range(1000):
                one_hop(INVITE)
            count += 1000
            now = time.perf_counter()
            if now >= deadline:
                break
        rounds.append(count / (now - start))
    rounds.sort()
    median = rounds[len(rounds) // 2]
    print(f"{sys.implementation.name} {sys.version.split()[0]}, {len(INVITE)}-byte INVITE, "
          f"parse+validate+modify+serialize on one core:")
    print(f"  median {median:,.0f} messages/s ({1e6 / median:.1f} us each); "
          f"best {rounds[-1]:,.0f}, worst {rounds[0]:,.0f} over {args.rounds} rounds")


if __name__ == "__main__":
    main()
