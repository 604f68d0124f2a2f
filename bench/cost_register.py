"""CPU per registration in one process's core, as B1 sends it (REGISTER, 401, REGISTER with digest, 200).

Not a test. Run:  python bench/cost_register.py [--registrations 20000] [--users 1000] [--profile]
The wall-clock bench (../shared/bench) is noisy on a shared machine and mixes in SIPp's CPU; this
feeds B1's two datagrams per registration straight into the server (`make_core`: SQLite in a
temporary directory, a Clock, no sockets) and reports the process CPU spent inside the server per
registration, so a change to the hot path can be judged in one run. The client side (answering
the 401) is timed out. --profile prints the top functions by own time (cProfile).
"""

import argparse
import cProfile
import hashlib
import os
import pstats
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from proxy.registration.credentials import UserRecord, compute_ha1, locked_users  # noqa: E402
from proxy.testing import make_core, udp_source  # noqa: E402

REALM = "127.0.0.1"
NONCE = re.compile(rb'nonce="([^"]+)"')

REGISTER = ("REGISTER sip:{realm} SIP/2.0\r\n"
         "Via: SIP/2.0/UDP 127.0.0.1:5061;branch=z9hG4bK-{i}-{cseq}\r\n"
         "From: <sip:{user}@{realm}>;tag=1SIPpTag00{i}\r\n"
         "To: <sip:{user}@{realm}>\r\n"
         "Call-ID: {i}-bench@127.0.0.1\r\n"
         "CSeq: {cseq} REGISTER\r\n"
         "Contact: <sip:{user}@127.0.0.1:5061>\r\n"
         "{auth}"
         "Max-Forwards: 70\r\n"
         "Expires: 3600\r\n"
         "User-Agent: Cisco-CP7960G/8.0 (acceptance bench)\r\n"
         "Content-Length: 0\r\n\r\n")


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def answer(user: str, nonce: str) -> str:
    ha1 = md5(f"{user}:{REALM}:pw{user}")
    ha2 = md5(f"REGISTER:sip:{REALM}")
    response = md5(f"{ha1}:{nonce}:00000001:abcd:auth:{ha2}")
    return (f'Authorization: Digest username="{user}",realm="{REALM}",uri="sip:{REALM}",nonce="{nonce}",'
            f'response="{response}",algorithm=MD5,cnonce="abcd",qop=auth,nc=00000001\r\n')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--registrations", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5, help="report the cheapest round (the machine is shared)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--each", action="store_true",
                        help="print every round: with many users and registrations the later rounds run with every "
                             "binding in place and the nonces of the earlier rounds alive (cost must not grow)")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-cost-")
    with locked_users(os.path.join(directory, "users.json")) as users:
        for n in range(args.users):
            name = str(10000 + n)
            users[name] = UserRecord(name, REALM, compute_ha1(name, REALM, f"pw{name}"))
    core, transports, clock = make_core(directory, domains=(REALM,), addresses=("127.0.0.1",))
    clock.advance(time.time())
    server = core.server
    source = udp_source("127.0.0.1", 5061)
    profile = cProfile.Profile() if args.profile else None

    def serve(data: bytes) -> tuple[float, bytes]:
        """The server's CPU time for one datagram, and its answer."""
        started = time.process_time()
        if profile:
            profile.enable()
        server.data_received(data, source)
        if profile:
            profile.disable()
        spent = time.process_time() - started
        answer_bytes = transports.sent[-1][0]
        transports.sent.clear()
        return spent, answer_bytes

    per_round = max(1, args.registrations // args.rounds)
    rounds = []
    ok = 0
    i = 0
    for _ in range(args.rounds):
        spent = spent_first = 0.0
        for _ in range(per_round):
            user = str(10000 + i % args.users)
            cpu, challenge = serve(REGISTER.format(realm=REALM, i=i, user=user, cseq=1, auth="").encode())
            spent_first += cpu
            found = NONCE.search(challenge)
            if found is None:
                sys.exit(f"registration {i}: no challenge but {challenge.splitlines()[0]!r}")
            nonce = found.group(1).decode()
            cpu, final = serve(REGISTER.format(realm=REALM, i=i, user=user, cseq=2, auth=answer(user, nonce)).encode())
            spent += cpu
            ok += final.startswith(b"SIP/2.0 200")
            i += 1
            if i % 1000 == 0:
                clock.advance(0.25)
        rounds.append((spent + spent_first, spent_first))
        if args.each:
            print(f"round {len(rounds)}: {(spent + spent_first) / per_round * 1e6:.1f} us per registration, "
                  f"{core.location.count():,} bindings held, {i:,} nonces issued", flush=True)
    total, first_part = min(rounds)
    print(f"{i} registrations, {ok} answered 200, {args.users} users: "
          f"{total / per_round * 1e6:.1f} us CPU per registration in the server, cheapest of {args.rounds} rounds "
          f"({per_round / total:,.0f}/s on one core; the challenge {first_part / per_round * 1e6:.1f} us of it)")
    if profile:
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
