"""Calls as dialogs, through the proxy core on a Clock: states, transfers seen, records, the timeout."""

from twisted.trial.unittest import SynchronousTestCase

from proxy.config import ProxySettings
from proxy.testing import sip_bytes
from tests.test_router import B, REALM, Net, requests

HOLD_SDP = b"v=0\r\no=- 1 2 IN IP4 192.0.2.11\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"
TALK_SDP = b"v=0\r\no=- 1 3 IN IP4 192.0.2.11\r\ns=-\r\nc=IN IP4 192.0.2.11\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n"


class DialogTests(SynchronousTestCase):
    def setUp(self):
        self.net = Net(self, settings=ProxySettings(max_call_seconds=3600))
        self.net.register("1002", B)
        self.records = []
        self.net.core.dialogs.on_record = self.records.append
        self.dialogs = self.net.core.dialogs

    def answer_call(self, call_id="call-1", agent="Cisco-SIPIPPhone/7.5"):
        (invite, _), = requests(self.net.invite(call_id=call_id, extra=f"User-Agent: {agent}"), "INVITE")
        self.assertEqual([c["state"] for c in self.dialogs.calls()], ["ringing"])
        self.net.answer(invite, 200, B, contact="<sip:1002@192.0.2.11:5060>",
                        extra=(("Record-Route", f"<{self.net.rr(call_id)}>"),))
        return invite

    def from_b(self, method, extra="", body=b"", call_id="call-1"):
        """An in-dialog request from the callee, along our signed Record-Route."""
        self.net.send(sip_bytes(f"""
            {method} sip:1001@192.0.2.10:5060 SIP/2.0
            Via: SIP/2.0/UDP 192.0.2.11:5060;branch=z9hG4bK{method.lower()}{len(self.records)}{len(body)}
            Route: <{self.net.rr(call_id)}>
            Max-Forwards: 70
            From: <sip:1002@{REALM}>;tag=callee-tag
            To: "Caller" <sip:1001@{REALM}>;tag=caller-tag
            Call-ID: {call_id}
            CSeq: {len(body) + len(extra) + 2} {method}
            {extra}
        """ + ("Content-Type: application/sdp" if body else ""), body), B)
        return self.net.take()

    def test_a_call_through_its_states_to_its_record(self):
        self.answer_call()
        self.net.clock.advance(30)
        (call,) = self.dialogs.calls()
        self.assertEqual((call["caller"], call["callee"], call["state"], call["seconds"]),
                         (f"sip:1001@{REALM}", f"sip:1002@{REALM}", "up", 30.0))
        self.from_b("INVITE", body=HOLD_SDP)
        self.assertEqual(self.dialogs.calls()[0]["state"], "on_hold")
        self.assertEqual(self.dialogs.counters()["calls_by_state"]["on_hold"], 1)
        self.from_b("INVITE", body=TALK_SDP)
        self.assertEqual(self.dialogs.calls()[0]["state"], "up")
        self.from_b("REFER", extra=f"Refer-To: <sip:1003@{REALM}>\nReferred-By: <sip:1002@{REALM}>")
        self.assertEqual((self.dialogs.calls()[0]["state"], self.dialogs.calls()[0]["transfer_to"]),
                         ("transferring", f"<sip:1003@{REALM}>"))
        self.net.clock.advance(10)
        sent = self.from_b("BYE")
        self.assertEqual(len(requests(sent, "BYE")), 1)  # relayed, untouched by the bookkeeping
        (record,) = self.records
        self.assertEqual((record.ended_by, record.status, record.duration, record.transfer),
                         ("callee", 200, 40.0, "refer"))
        self.assertEqual(self.dialogs.calls(), [])

    def test_bye_with_also_to_a_cisco_phone_is_a_transfer_relayed(self):
        self.answer_call()  # A acts on Also itself (tests/test_transfer.py: the proxy completes it otherwise)
        self.from_b("BYE", extra=f"Also: <sip:1003@{REALM}>")
        self.assertEqual((self.records[0].transfer, self.records[0].ended_by), ("bye-also", "callee"))

    def test_a_call_that_fails_is_recorded_with_its_status(self):
        (invite, _), = requests(self.net.invite(call_id="busy"), "INVITE")
        self.net.answer(invite, 486, B)
        (record,) = self.records
        self.assertEqual((record.status, record.answered_at, record.ended_by, record.duration), (486, None, "", 0.0))
        self.assertEqual(self.dialogs.counters()["call_records"], 1)

    def test_a_call_whose_bye_never_comes_is_closed(self):
        self.answer_call()
        self.dialogs.start()
        self.addCleanup(self.dialogs.stop)
        self.net.clock.advance(3600 + 60)
        (record,) = self.records
        self.assertEqual((record.ended_by, self.dialogs.counters()["calls_timed_out"]), ("timeout", 1))

    def test_records_are_logged_once_a_second_a_line_each(self):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for n in range(3):
            (invite, _), = requests(self.net.invite(call_id=f"busy{n}"), "INVITE")
            self.net.answer(invite, 486, B)
        self.assertEqual([e for e in events if "call_records" in e], [])
        self.net.clock.advance(1)
        (event,) = [e for e in events if "call_records" in e]
        lines = event["records"].split("\n")
        self.assertEqual((event["call_records"], len(lines)), (3, 3))
        self.assertTrue(all(line.startswith("Call record: sip:1001@example.com -> sip:1002@example.com, not answered "
                                            "(486)") for line in lines), lines)
