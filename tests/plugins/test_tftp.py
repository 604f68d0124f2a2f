"""The TFTP server's state machine on a Clock (RFC 1350, 2347, 2348, 2349), its root confinement, and its log."""

import ipaddress
import os
import struct

from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.trial.unittest import SynchronousTestCase

from plugins.provisioning.tftp import (ACCESS_VIOLATION, ACK, DATA, ERROR, NOT_FOUND, OACK, RRQ, WRQ, TftpError,
                                       TftpServer, Transfer, negotiate, netascii, parse_request, resolve)
from plugins.provisioning.tftplog import RequestLog, diagnose

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
CLIENT = ("127.0.0.1", 40000)


def rrq(name: str, mode: str = "octet", **options) -> bytes:
    fields = [name, mode] + [x for k, v in options.items() for x in (k, str(v))]
    return struct.pack("!H", RRQ) + b"".join(f.encode() + b"\0" for f in fields)


def ack(block: int) -> bytes:
    return struct.pack("!HH", ACK, block)


def opcode(packet: bytes) -> int:
    return struct.unpack("!H", packet[:2])[0]


def block_of(packet: bytes) -> int:
    return struct.unpack("!HH", packet[:4])[1]


class TransferTests(SynchronousTestCase):
    def make(self, data: bytes, **kwargs):
        self.clock = Clock()
        self.sent = []
        self.results = []
        transfer = Transfer(self.clock, self.sent.append, data, on_done=lambda r, n: self.results.append((r, n)),
                            **kwargs)
        transfer.start()
        return transfer

    def test_small_file_one_block(self):
        t = self.make(b"hello")
        self.assertEqual(self.sent, [struct.pack("!HH", DATA, 1) + b"hello"])
        t.received(ack(1))
        self.assertEqual(self.results, [("sent", 5)])

    def test_retransmits_on_timeout_then_gives_up(self):
        self.make(b"x" * 600, timeout=2.0, retries=3)
        self.clock.advance(1.9)
        self.assertEqual(len(self.sent), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.sent), 2)
        self.assertEqual(self.sent[1], self.sent[0])  # the same block again
        self.clock.pump([2.0] * 3)
        self.assertEqual(len(self.sent), 4)
        self.assertEqual(self.results, [("timeout", 512)])

    def test_duplicate_ack_is_not_answered(self):
        # The Sorcerer's Apprentice: answering every duplicate ACK doubles the traffic for the rest of the file.
        t = self.make(b"y" * 1500)
        t.received(ack(1))
        t.received(ack(1))
        self.assertEqual([block_of(p) for p in self.sent], [1, 2])
        t.received(ack(2))
        t.received(ack(3))
        self.assertEqual([block_of(p) for p in self.sent], [1, 2, 3])
        self.assertEqual(self.results, [("sent", 1500)])

    def test_exact_multiple_ends_with_an_empty_block(self):
        t = self.make(b"z" * 1024)
        t.received(ack(1))
        t.received(ack(2))
        self.assertEqual(len(self.sent[-1]), 4)  # block 3, no data: the end
        t.received(ack(3))
        self.assertEqual(self.results, [("sent", 1024)])

    def test_options_are_confirmed_in_an_oack_and_ack_0_starts(self):
        t = self.make(b"a" * 3000, blksize=1428, oack={"blksize": "1428", "tsize": "3000"})
        self.assertEqual(self.sent, [struct.pack("!H", OACK) + b"blksize\x001428\x00tsize\x003000\x00"])
        t.received(ack(0))
        self.assertEqual((block_of(self.sent[1]), len(self.sent[1])), (1, 4 + 1428))

    def test_block_numbers_roll_over_past_65535(self):
        blocks = 65537
        t = self.make(b"b" * (8 * blocks - 3), blksize=8)
        for n in range(1, blocks + 1):
            t.received(ack(n & 0xFFFF))
        numbers = [block_of(p) for p in self.sent]
        self.assertEqual(numbers[65533:65537], [65534, 65535, 0, 1])
        self.assertEqual(self.results, [("sent", 8 * blocks - 3)])

    def test_client_error_ends_it(self):
        t = self.make(b"c" * 2000)
        t.received(struct.pack("!HH", ERROR, 0) + b"disk full\0")
        self.assertEqual(self.results[0][0], "error: the client gave up (0 disk full)")
        self.clock.advance(10)
        self.assertEqual(len(self.sent), 1)


class RequestTests(SynchronousTestCase):
    def test_parse(self):
        self.assertEqual(parse_request(rrq("SIPDefault.cnf", "NetASCII", blksize=1024, tsize=0)),
                         (RRQ, "SIPDefault.cnf", "netascii", {"blksize": "1024", "tsize": "0"}))
        for bad in (b"\x00\x01x", b"\x00\x03\x00\x01", rrq("x", "mail"), struct.pack("!H", RRQ) + b"x\0octet\0blksize\0"):
            self.assertRaises(TftpError, parse_request, bad)

    def test_names_never_leave_the_root(self):
        root = self.mktemp()
        os.makedirs(os.path.join(root, "sub"))
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, os.path.join(root, "escape"))
        self.assertEqual(resolve(root, "/sub/SIP1.cnf"), os.path.join(os.path.realpath(root), "sub", "SIP1.cnf"))
        for name in ("../etc/passwd", "sub/../../x", "escape/x", "a\\b", "", "./"):
            e = self.assertRaises(TftpError, resolve, root, name)
            self.assertEqual(e.code, ACCESS_VIOLATION, name)

    def test_option_negotiation_and_block_size_edges(self):
        # RFC 2348: 8 to 65464 octets; a server may answer a smaller size than asked, never larger.
        for asked, got in (("7", 8), ("8", 8), ("512", 512), ("65464", 65464), ("70000", 65464)):
            accepted, blksize, _ = negotiate({"blksize": asked}, 100)
            self.assertEqual((accepted, blksize), ({"blksize": str(got)}, got))
        accepted, blksize, timeout = negotiate({"tsize": "0", "timeout": "3", "colour": "red", "blksize": "x"}, 2048)
        self.assertEqual((accepted, blksize, timeout), ({"tsize": "2048", "timeout": "3"}, 512, 3.0))
        self.assertEqual(negotiate({"timeout": "0"}, 1)[0], {})  # RFC 2349: 1 to 255 seconds

    def test_netascii(self):
        self.assertEqual(netascii(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\0d")


class ServerTests(SynchronousTestCase):
    def setUp(self):
        self.root = self.mktemp()
        os.makedirs(self.root)
        with open(os.path.join(self.root, "SIPDefault.cnf"), "wb") as f:
            f.write(b"image_version: P0S3-08-12-00\n" * 40)
        self.clock = Clock()
        self.ports = []
        self.log = RequestLog(self.clock)
        self.server = TftpServer(self.clock, self.root, allowed=LOOPBACK, listen_transfer=self._listen,
                                 requests=self.log)
        self.server.transport = FakeDatagramTransport()

    def _listen(self, proto):
        proto.transport = FakeDatagramTransport()
        self.ports.append(proto)

        class Port:
            def stopListening(port_self):
                proto.stopped = True
        return Port()

    def answers(self):
        return [packet for packet, _ in self.server.transport.written]

    def test_read_with_tsize_from_a_port_of_its_own(self):
        self.server.datagramReceived(rrq("SIPDefault.cnf", tsize=0, blksize=4096), CLIENT)
        (transfer,) = self.ports
        oack, addr = transfer.transport.written[0]
        self.assertEqual(addr, CLIENT)
        self.assertIn(b"tsize\x001160\x00", oack)
        transfer.datagramReceived(ack(0), CLIENT)
        data, _ = transfer.transport.written[1]
        self.assertEqual(len(data), 4 + 1160)
        transfer.datagramReceived(ack(1), ("127.0.0.1", 40001))  # another port: not this transfer's client
        self.assertEqual(opcode(transfer.transport.written[2][0]), ERROR)
        transfer.datagramReceived(ack(1), CLIENT)
        self.assertTrue(transfer.stopped)
        self.assertEqual([(r.name, r.result, r.bytes) for r in self.log.records()["127.0.0.1"]],
                         [("SIPDefault.cnf", "sent", 1160)])

    def test_refusals(self):
        self.server.datagramReceived(struct.pack("!H", WRQ) + b"x\0octet\0", CLIENT)
        self.server.datagramReceived(rrq("../../etc/passwd"), CLIENT)
        self.server.datagramReceived(rrq("missing.bin"), CLIENT)
        self.server.datagramReceived(rrq("%2e%2e/etc/passwd"), CLIENT)  # TFTP has no escapes: a name not there
        codes = [struct.unpack("!HH", p[:4]) for p in self.answers()]
        self.assertEqual(codes, [(ERROR, ACCESS_VIOLATION), (ERROR, ACCESS_VIOLATION), (ERROR, NOT_FOUND),
                                 (ERROR, NOT_FOUND)])
        self.assertEqual(self.ports, [])

    def test_transfers_per_address_are_capped(self):
        for _ in range(9):
            self.server.datagramReceived(rrq("SIPDefault.cnf"), CLIENT)
        self.assertEqual(len(self.ports), 8)
        self.assertEqual(struct.unpack("!HH", self.answers()[-1][:4]), (ERROR, 0))
        self.ports[0].datagramReceived(ack(1), CLIENT)  # one done: room for the next
        self.ports[0].datagramReceived(ack(2), CLIENT)
        self.ports[0].datagramReceived(ack(3), CLIENT)
        self.server.datagramReceived(rrq("SIPDefault.cnf"), CLIENT)
        self.assertEqual(len(self.ports), 9)

    def test_sources_outside_allowed_get_nothing(self):
        self.server.datagramReceived(rrq("SIPDefault.cnf"), ("192.0.2.7", 40000))
        self.assertEqual((self.answers(), self.ports, self.server.refused), ([], [], 1))


class DiagnosisTests(SynchronousTestCase):
    MAC = "003094C25D2E"

    def test_loader_loop_missing_image_and_no_registration(self):
        clock = Clock()
        log = RequestLog(clock)
        for _ in range(12):
            log.seen("10.0.0.5", f"CTLSEP{self.MAC}.tlv", "not found")
            clock.advance(5)
        log.seen("10.0.0.5", "P0S3-08-12-00.loads", "not found")
        entry = log.seen("10.0.0.5", f"SIP{self.MAC}.cnf", "sending")
        log.done(entry, "sent", 300)
        clock.advance(300)
        (device, requests), = log.records().items()
        self.assertEqual(device, f"SEP{self.MAC}")
        found = diagnose(device, requests, lambda address, since: False, clock.seconds())
        self.assertEqual(len(found), 3, found)
        self.assertIn(f"has asked for CTLSEP{self.MAC}.tlv 12 times in 55 s: the loader is looping", found[0])
        self.assertIn("P0S3-08-12-00.loads, which is not in the TFTP root", found[1])
        self.assertIn("but has not registered since", found[2])
        self.assertEqual(len(diagnose(device, requests, lambda address, since: True, clock.seconds())), 2)
