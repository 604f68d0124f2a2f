"""Remote reboot: syncinfo.xml, one paced NOTIFY per phone, results, waiting for the phones to come back."""

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.admin.checksync import CheckSync, JobConflict, SyncInfoError, bump_syncinfo, next_sync
from proxy.admin.inventory import FilterError, image_name, matches, parse_user_agent, phones, select
from proxy.registration.location import Binding, SqliteLocationService
from proxy.sip.message import make_response
from proxy.testing import make_server
from proxy.transport import Destination

MAC = "003094C25D2E"


class SyncInfoTests(SynchronousTestCase):
    def setUp(self):
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.path = os.path.join(self.root, "syncinfo.xml")

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def read(self):
        with open(self.path) as f:
            return f.read()

    def test_missing_file_gets_a_wildcard_entry(self):
        self.assertEqual(bump_syncinfo(self.root), [("*", "1", "2")])
        self.assertEqual(self.read(), '<IMAGE VERSION="*" SYNC="2"/>\n')

    def test_every_entry_bumped_and_kept_wildcard_added(self):
        # The seed's form: <IMAGE VERSION="image_version" SYNC="sync_number" /> (001 line 2625).
        self.write('<IMAGE VERSION="P0S3-08-1-00" SYNC="7" />\n<IMAGE VERSION="P0S3-07-5-00" SYNC="abc" />\n')
        changes = bump_syncinfo(self.root)
        self.assertEqual([(v, o) for v, o, _ in changes], [("P0S3-08-1-00", "7"), ("P0S3-07-5-00", "abc"), ("*", "1")])
        text = self.read()
        self.assertIn('<IMAGE VERSION="P0S3-08-1-00" SYNC="8"/>', text)
        self.assertNotIn('SYNC="abc"', text)
        self.assertIn('<IMAGE VERSION="*" SYNC="2"/>', text)

    def test_a_partial_reboot_bumps_only_what_the_chosen_phones_read(self):
        # Issue 20: bumping every entry made every phone reboot on its next check-sync.
        self.write('<IMAGE VERSION="P0S3-08-3-00" SYNC="7"/>\n<IMAGE VERSION="P0S3-07-5-00" SYNC="3"/>\n'
                   '<IMAGE VERSION="*" SYNC="1"/>\n')
        self.assertEqual(bump_syncinfo(self.root, {"P0S3-08-3-00"}), [("P0S3-08-3-00", "7", "8")])
        text = self.read()
        self.assertIn('<IMAGE VERSION="P0S3-07-5-00" SYNC="3"/>', text)
        self.assertIn('<IMAGE VERSION="*" SYNC="1"/>', text)
        # A phone whose image has no entry (or is unknown) reads the * entry: that one moves.
        self.assertEqual(bump_syncinfo(self.root, {"P0S3-06-3-00", ""}), [("*", "1", "2")])
        # A dry run computes the same and writes nothing.
        before = self.read()
        self.assertEqual(bump_syncinfo(self.root, {"P0S3-07-5-00"}, write=False), [("P0S3-07-5-00", "3", "4")])
        self.assertEqual(self.read(), before)

    def test_odd_existing_content(self):
        self.write('<?xml version="1.0"?>\n<!-- ours -->\n<SYNCINFO><image version="*" sync="41"/></SYNCINFO>\n')
        self.assertEqual(bump_syncinfo(self.root), [("*", "41", "42")])

    def test_unreadable_xml_is_an_error_not_a_clobber(self):
        self.write('<IMAGE VERSION="*" SYNC="1"')
        e = self.assertRaises(SyncInfoError, bump_syncinfo, self.root)
        self.assertIn("syncinfo.xml: not readable XML", str(e))
        self.assertEqual(self.read(), '<IMAGE VERSION="*" SYNC="1"')

    def test_next_sync(self):
        self.assertEqual(next_sync("1"), "2")
        self.assertNotEqual(next_sync("x"), "x")
        self.assertLessEqual(len(next_sync("9" * 32)), 32)


def binding(aor, host, port, call_id="c1", user_agent="Cisco-SIPIPPhone/7.5", instance="", registered_at=100.0):
    user = aor[4:].split("@")[0]
    return Binding(aor=aor, contact=f"sip:{user}@{host}:{port}", expires_at=1e12, call_id=call_id, cseq=1,
                   source_host=host, source_port=port, user_agent=user_agent, instance=instance,
                   registered_at=registered_at)


class InventoryTests(SynchronousTestCase):
    def test_user_agents(self):
        self.assertEqual(parse_user_agent("Cisco-SIPIPPhone/7.5"), ("", "7.5"))
        self.assertEqual(parse_user_agent("Cisco-CP7960G/8.0"), ("7960", "8.0"))
        self.assertEqual(parse_user_agent("Linphone/5"), ("", ""))
        self.assertEqual(image_name("7.5"), "P0S3-07-5-00")

    def test_grouping_by_instance_then_source(self):
        inst = f"<urn:uuid:00000000-0000-0000-0000-{MAC.lower()}>"
        rows = phones([
            binding(f"sip:100{n}@example.com", "192.0.2.5", 5060) for n in range(1, 7)
        ] + [binding("sip:2001@example.com", "192.0.2.6", 5060, user_agent="Cisco-CP7940G/8.0", instance=inst),
             binding("sip:2002@example.com", "192.0.2.66", 5061, user_agent="Cisco-CP7940G/8.0", instance=inst)])
        self.assertEqual([(p.device, len(p.lines)) for p in rows], [("192.0.2.5:5060", 6), (f"SEP{MAC}", 2)])

    def test_filters(self):
        old = phones([binding("sip:1@example.com", "192.0.2.5", 5060)])[0]
        new = phones([binding("sip:2@example.com", "192.0.2.6", 5060, user_agent="Cisco-CP7940G/8.0")])[0]
        self.assertTrue(matches(old, firmware="P0S3-07*"))
        self.assertTrue(matches(old, firmware="7.*"))
        self.assertFalse(matches(new, firmware="P0S3-07*"))
        self.assertTrue(matches(old, where="firmware<8.0"))
        self.assertFalse(matches(new, where="firmware<8.0"))
        self.assertTrue(matches(new, model="7940"))
        self.assertTrue(matches(new, where="model=7940"))
        self.assertRaises(FilterError, matches, new, where="colour=blue")

    def test_select(self):
        all_phones = phones([binding("sip:1001@example.com", "192.0.2.5", 5060),
                             binding("sip:1002@example.com", "192.0.2.5", 5060),
                             binding("sip:1003@example.com", "192.0.2.6", 5060)])
        chosen, missing = select(all_phones, lines=["1001", "1002", "9999"], domain="example.com")
        self.assertEqual(([p.device for p in chosen], missing), (["192.0.2.5:5060"], ["9999"]))
        chosen, _ = select(all_phones, everyone=True)
        self.assertEqual(len(chosen), 2)


class RebootJobTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(100)
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.server, self.transports, _ = make_server(self.clock)
        self.location = SqliteLocationService(os.path.join(self.root, "loc.sqlite"), self.clock)
        self.checksync = CheckSync(self.clock, self.server.transactions, self.location, advertise=("192.0.2.1", 5060),
                                   tftp_root=self.root)
        for n in range(1, 7):  # phone A: six lines, one socket
            self.location.save(binding(f"sip:100{n}@example.com", "192.0.2.5", 5060))
        self.location.save(binding("sip:2001@example.com", "192.0.2.6", 5062))  # phone B
        self.location.save(binding("sip:3001@example.com", "192.0.2.7", 5060))  # phone C

    def start(self, **kwargs):
        chosen, missing = select(phones(self.location.all_bindings()), everyone=True)
        return self.checksync.start(chosen, missing, reboot=True, **kwargs)

    def notifies(self):
        return [(m, d) for m, d in self.transports.take() if getattr(m, "method", None) == "NOTIFY"]

    def answer(self, notify, status):
        self.server.data_received(make_response(notify, status, to_tag="p").serialize(),
                                  __import__("proxy.testing", fromlist=["udp_source"]).udp_source("192.0.2.5"))

    def test_one_notify_per_phone_paced_and_in_the_seed_shape(self):
        self.start(rate=1.0)
        first = self.notifies()
        self.assertEqual(len(first), 1)
        notify, dest = first[0]
        self.assertEqual(dest, Destination("UDP", "192.0.2.5", 5060))
        self.assertEqual(notify.uri_text, "sip:1001@192.0.2.5:5060")
        self.assertEqual(notify.headers.get("event"), "check-sync")
        self.assertEqual(notify.headers.get("to"), "<sip:1001@192.0.2.5>")
        self.assertTrue(notify.headers.get("from").startswith("<sip:webadmin@192.0.2.1>"))
        self.assertIsNotNone(notify.headers.get("date"))
        self.clock.advance(0.99)
        self.assertEqual([d.host for _, d in self.notifies()], ["192.0.2.5"])  # a retransmission of the first only
        self.clock.advance(0.01)
        self.assertIn("192.0.2.6", [d.host for _, d in self.notifies()])
        self.clock.advance(1)
        self.assertIn("192.0.2.7", [d.host for _, d in self.notifies()])
        with open(os.path.join(self.root, "syncinfo.xml")) as f:
            self.assertIn('SYNC="2"', f.read())

    def test_results_accepted_refused_no_answer_not_registered(self):
        chosen, missing = select(phones(self.location.all_bindings()), lines=["1001", "2001", "3001", "9999"],
                                 domain="example.com")
        job = self.checksync.start(chosen, missing, reboot=True, rate=10)
        self.clock.advance(0.2)
        sent = {d.host: m for m, d in self.notifies()}
        self.answer(sent["192.0.2.5"], 200)
        self.answer(sent["192.0.2.6"], 481)
        self.assertFalse(job.done)
        self.clock.advance(32)  # phone C never answers: Timer F
        states = {r.device: (r.state, r.status) for r in job.results.values()}
        self.assertEqual(states, {"192.0.2.5:5060": ("accepted", 200), "192.0.2.6:5062": ("refused", 481),
                                  "192.0.2.7:5060": ("no_answer", None), "9999": ("not_registered", None)})
        self.assertTrue(job.done)
        self.assertEqual(self.checksync.notifies, {"accepted": 1, "refused": 1, "no_answer": 1})

    def test_notify_is_retransmitted_like_any_non_invite(self):
        chosen, _ = select(phones(self.location.all_bindings()), lines=["3001"], domain="example.com")
        self.checksync.start(chosen, [], reboot=True)
        self.clock.advance(0.5)
        self.assertEqual(len(self.notifies()), 2)

    def test_wait_sees_the_phone_come_back(self):
        chosen, _ = select(phones(self.location.all_bindings()), lines=["2001"], domain="example.com")
        job = self.checksync.start(chosen, [], reboot=True, wait=True, wait_timeout=300)
        ((notify, _),) = self.notifies()
        self.answer(notify, 200)
        self.assertFalse(job.done)
        self.clock.advance(40)
        # A refresh with the old Call-ID is not the phone coming back.
        self.location.save(binding("sip:2001@example.com", "192.0.2.6", 5062, registered_at=self.clock.seconds()))
        self.assertFalse(job.done)
        self.location.save(binding("sip:2001@example.com", "192.0.2.6", 5062, call_id="after-boot",
                                   user_agent="Cisco-CP7940G/8.0", registered_at=self.clock.seconds()))
        (result,) = job.results.values()
        self.assertEqual((result.outcome, result.firmware_after), ("rebooted", "8.0"))
        self.assertTrue(job.done)

    def test_wait_times_out(self):
        chosen, _ = select(phones(self.location.all_bindings()), lines=["2001"], domain="example.com")
        job = self.checksync.start(chosen, [], reboot=True, wait=True, wait_timeout=60)
        ((notify, _),) = self.notifies()
        self.answer(notify, 200)
        self.clock.advance(60)
        self.assertEqual(list(job.results.values())[0].outcome, "not_back")

    def test_second_job_for_same_phone_is_refused(self):
        self.start(rate=0.1)
        e = self.assertRaises(JobConflict, self.start)
        self.assertIn("is in running job 1", str(e))

    def test_reboot_needs_tftp_root_push_does_not(self):
        bare = CheckSync(self.clock, self.server.transactions, self.location, advertise=("192.0.2.1", 5060))
        chosen, _ = select(phones(self.location.all_bindings()), lines=["3001"], domain="example.com")
        self.assertRaises(SyncInfoError, bare.start, chosen, [], reboot=True)
        job = bare.start(chosen, [], reboot=False)
        self.assertEqual((job.kind, job.sync_changes), ("push-dialplan", []))
