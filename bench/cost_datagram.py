"""What one UDP datagram costs the process that sends or reads it on this machine: the floor under a refusal.

Not a test. `python bench/cost_datagram.py [N]`: this process sends N datagrams the size of the
shedder's 503 to a socket another process drains (sendto, as the 503 goes out), then reads N the
size of a REGISTER that the other process sends (recvmsg with SO_TIMESTAMP, as
`proxy.transport.TimestampedUdpPort` reads them). It prints this process's CPU time (user +
system) per datagram for each. On loopback the kernel delivers a datagram into the receiving
socket inside the sender's system call, so a send costs more here than onto a network card.
"""

import os
import socket
import sys

SIZE_503, SIZE_REGISTER = 330, 420
_SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
_ANCILLARY = socket.CMSG_SPACE(16)


def cpu() -> float:
    times = os.times()
    return times.user + times.system


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def peer(sock: socket.socket, ours, count: int, ready: int) -> None:
    """The other process: drain `count` datagrams, then send `count` back in windows the reader asks for."""
    sock.settimeout(5.0)
    for _ in range(count):
        sock.recv(2048)
    payload = b"R" * SIZE_REGISTER
    while os.read(ready, 4):  # one byte per window of 1,000
        for _ in range(1000):
            sock.sendto(payload, ours)


def main(count: int) -> None:
    count -= count % 1000
    mine, theirs = udp_socket(), udp_socket()
    mine.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMP, 1)
    ready, ask = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ask)
        peer(theirs, mine.getsockname(), count, ready)
        os._exit(0)
    os.close(ready)
    dest, payload = theirs.getsockname(), b"S" * SIZE_503
    start = cpu()
    for n in range(count):
        mine.sendto(payload, dest)
        if n % 1000 == 999:
            os.sched_yield()  # let the peer drain: a full queue would drop, not cost
    send = (cpu() - start) / count
    reading = 0.0
    for _ in range(count // 1000):
        os.write(ask, b"x")
        got = 0
        while got < 1000:
            if got == 0:
                mine.recvmsg(2048, _ANCILLARY)  # blocks until the window starts: not counted
                got = 1
                start = cpu()
                continue
            mine.recvmsg(2048, _ANCILLARY)
            got += 1
        reading += cpu() - start
    os.close(ask)
    os.waitpid(pid, 0)
    receive = reading / (count - count // 1000)
    print(f"sendto  {send * 1e6:6.2f} us per {SIZE_503}-byte datagram (CPU of the sending process)")
    print(f"recvmsg {receive * 1e6:6.2f} us per {SIZE_REGISTER}-byte datagram (CPU of the reading process)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
