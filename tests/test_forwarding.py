"""Call forwarding on a Clock, following the seed's flows (001 lines 3584-3681), and redirect-server mode."""

import os

from twisted.trial.unittest import SynchronousTestCase

from proxy.config import ForwardingConfig
from proxy.routing.forwarding import FeatureCodes, ForwardingStore
from proxy.transport import Destination
from tests.test_router import REALM, Net, requests, statuses

A = ("192.0.2.10", 5060)
B = ("192.0.2.11", 5060)
C = ("192.0.2.13", 5060)
D = ("192.0.2.14", 5060)


def net_with(test, config=ForwardingConfig(), **settings):
    net = Net(test, forwarding_config=config)
    net.register("1002", B)
    net.register("1003", C)
    net.register("1004", D)
    for user, values in settings.items():
        net.forwarding.store.update(user, **values)
    return net


class UnconditionalTests(SynchronousTestCase):
    def test_goes_to_target_at_once_with_diversion(self):
        net = net_with(self, **{"1002": {"always": "1003"}})
        ((invite, dest),) = requests(net.invite(), "INVITE")
        self.assertEqual(dest, Destination("UDP", *C))
        self.assertEqual(invite.headers.get("diversion"), f"<sip:1002@{REALM}>;reason=unconditional;counter=1")
        self.assertEqual(net.router.targets.forwards, {"unconditional": 1})

    def test_redirect_variant_answers_302(self):
        net = net_with(self, ForwardingConfig(unconditional="redirect"), **{"1002": {"always": "1003"}})
        sent = net.invite()
        self.assertEqual(requests(sent, "INVITE"), [])
        self.assertEqual(statuses(sent), [100, 302])
        self.assertEqual(sent[-1][0].headers.get("contact"), f"<sip:1003@{REALM}>")

    def test_chain_is_followed_and_loops_end_in_482(self):
        net = net_with(self, **{"1002": {"always": "1003"}, "1003": {"always": "1004"}})
        ((invite, dest),) = requests(net.invite(), "INVITE")
        self.assertEqual(dest, Destination("UDP", *D))
        self.assertEqual(invite.headers.get("diversion"),
                         f"<sip:1003@{REALM}>;reason=unconditional;counter=1, <sip:1002@{REALM}>;reason=unconditional;counter=1")
        net.forwarding.store.update("1004", always="1002")
        sent = net.invite(call_id="loop")
        self.assertEqual((sent[-1][0].status, sent[-1][0].reason), (482, "Forwarding loop"))

    def test_chain_depth_is_bounded(self):
        # max_depth counts forwarding steps: with 1, 1002 -> 1003 is followed, 1003 -> 1004 is not.
        net = net_with(self, ForwardingConfig(max_depth=1), **{"1002": {"always": "1003"}, "1003": {"always": "1004"}})
        ((invite, dest),) = requests(net.invite(), "INVITE")
        self.assertEqual(dest, Destination("UDP", *C))  # 1003's own forwarding is beyond the depth

    def test_to_a_number_via_routes(self):
        from proxy.config import RouteConfig

        net = Net(self, forwarding_config=ForwardingConfig(), routes=[RouteConfig(pattern="9[0-9]+", strip=1,
                                                                                  gateways=("192.0.2.20",))])
        net.register("1002", B)
        net.forwarding.store.update("1002", always="95551234")
        ((invite, dest),) = requests(net.invite(), "INVITE")
        self.assertEqual((invite.uri_text, dest), ("sip:5551234@192.0.2.20", Destination("UDP", "192.0.2.20", 5060)))


class BusyTests(SynchronousTestCase):
    def test_busy_then_target(self):
        net = net_with(self, **{"1002": {"busy": "1003"}})
        ((to_b, dest),) = requests(net.invite(), "INVITE")
        self.assertEqual(dest, Destination("UDP", *B))
        self.assertIsNone(to_b.headers.get("diversion"))
        sent = net.answer(to_b, 486, B)
        self.assertEqual(statuses(sent), [])  # the caller does not see the 486
        ((to_c, dest),) = requests(sent, "INVITE")
        self.assertEqual(dest, Destination("UDP", *C))
        self.assertEqual(to_c.headers.get("diversion"), f"<sip:1002@{REALM}>;reason=user-busy;counter=1")
        net.answer(to_c, 180, C)
        self.assertEqual(statuses(net.answer(to_c, 200, C)), [200])

    def test_600_also_counts_as_busy(self):
        net = net_with(self, **{"1002": {"busy": "1003"}})
        ((to_b, _),) = requests(net.invite(), "INVITE")
        self.assertEqual([d for _, d in requests(net.answer(to_b, 600, B), "INVITE")], [Destination("UDP", *C)])

    def test_other_failures_are_not_busy(self):
        net = net_with(self, **{"1002": {"busy": "1003"}})
        ((to_b, _),) = requests(net.invite(), "INVITE")
        self.assertEqual(statuses(net.answer(to_b, 403, B)), [403])


class NoAnswerTests(SynchronousTestCase):
    def test_ring_timeout_cancels_then_calls_target(self):
        net = net_with(self, **{"1002": {"no_answer": "1003", "no_answer_after": 20}})
        ((to_b, _),) = requests(net.invite(), "INVITE")
        self.assertEqual(statuses(net.answer(to_b, 180, B)), [180])
        net.clock.advance(19.9)
        self.assertEqual(requests(net.take(), "CANCEL"), [])
        net.clock.advance(0.1)
        ((cancel, dest),) = requests(net.take(), "CANCEL")
        self.assertEqual(dest, Destination("UDP", *B))
        sent = net.answer(to_b, 487, B)
        self.assertEqual(statuses(sent), [])  # B's 487 is not the caller's answer
        ((to_c, dest),) = requests(sent, "INVITE")
        self.assertEqual(dest, Destination("UDP", *C))
        self.assertEqual(to_c.headers.get("diversion"), f"<sip:1002@{REALM}>;reason=no-answer;counter=1")
        self.assertEqual(statuses(net.answer(to_c, 200, C)), [200])

    def test_answered_in_time_stays(self):
        net = net_with(self, **{"1002": {"no_answer": "1003", "no_answer_after": 20}})
        ((to_b, _),) = requests(net.invite(), "INVITE")
        net.answer(to_b, 180, B)
        net.clock.advance(10)
        self.assertEqual(statuses(net.answer(to_b, 200, B)), [200])
        net.clock.advance(20)
        self.assertEqual(requests(net.take(), "INVITE"), [])

    def test_busy_and_no_answer_together(self):
        net = net_with(self, **{"1002": {"busy": "1004", "no_answer": "1003", "no_answer_after": 20}})
        ((to_b, _),) = requests(net.invite(), "INVITE")
        self.assertEqual([d for _, d in requests(net.answer(to_b, 486, B), "INVITE")], [Destination("UDP", *D)])


class UnavailableTests(SynchronousTestCase):
    def test_no_binding_goes_to_target(self):
        net = net_with(self, **{"1001": {"unavailable": "1003"}})
        net.location.remove_all(f"sip:1001@{REALM}")
        ((invite, dest),) = requests(net.invite(to="1001", frm="1002", source=B), "INVITE")
        self.assertEqual(dest, Destination("UDP", *C))
        self.assertIn("reason=unavailable", invite.headers.get("diversion"))

    def test_no_binding_no_forwarding_is_480(self):
        net = net_with(self)
        self.assertEqual(statuses(net.invite(to="1001", frm="1002", source=B))[-1], 480)


class FeatureCodeTests(SynchronousTestCase):
    def test_set_and_clear_from_the_phone(self):
        net = net_with(self)
        sent = net.invite(to="*721003")
        self.assertEqual((sent[-1][0].status, sent[-1][0].reason), (480, "Forwarding to 1003 set"))
        self.assertEqual(requests(sent), [])
        self.assertEqual(net.forwarding.store.get("1001").always, "1003")
        # It takes effect on the next call to 1001.
        ((invite, dest),) = requests(net.invite(to="1001", frm="1002", source=B, call_id="next"), "INVITE")
        self.assertEqual(dest, Destination("UDP", *C))
        sent = net.invite(to="*73", call_id="clear")
        self.assertEqual(sent[-1][0].reason, "Forwarding cleared")
        self.assertEqual(net.forwarding.store.get("1001").always, "")

    def test_busy_and_no_answer_codes(self):
        net = net_with(self)
        net.invite(to="*901004")
        net.invite(to="*921003", call_id="na")
        stored = net.forwarding.store.get("1001")
        self.assertEqual((stored.busy, stored.no_answer), ("1004", "1003"))

    def test_needs_authentication(self):
        net = net_with(self)
        sent = net.invite(to="*721003", auth=False)
        self.assertEqual(statuses(sent), [407])
        self.assertEqual(net.forwarding.store.get("1001").always, "")

    def test_code_parsing(self):
        codes = FeatureCodes.from_config(ForwardingConfig())
        self.assertEqual(codes.parse("*721002"), ("set", "always", "1002"))
        self.assertEqual(codes.parse("*73"), ("clear", "always", None))
        self.assertIsNone(codes.parse("*72"))
        self.assertIsNone(codes.parse("*7399"))
        self.assertIsNone(codes.parse("1002"))


class RedirectServerTests(SynchronousTestCase):
    def redirect_net(self, **settings):
        return net_with(self, ForwardingConfig(redirect=True), **settings)

    def test_one_contact_302(self):
        net = self.redirect_net()
        sent = net.invite()
        self.assertEqual(statuses(sent), [100, 302])
        self.assertEqual(sent[-1][0].headers.get("contact"), "<sip:1002@192.0.2.11:5060>")
        self.assertEqual(requests(sent), [])

    def test_several_contacts_300_by_q(self):
        net = self.redirect_net()
        net.register("1002", ("192.0.2.15", 5060), q=0.5)
        sent = net.invite()
        self.assertEqual(sent[-1][0].status, 300)
        self.assertEqual(sent[-1][0].headers.get_lines("contact"),
                         ["<sip:1002@192.0.2.11:5060>;q=1", "<sip:1002@192.0.2.15:5060>;q=0.5"])

    def test_busy_forwarding_lists_user_then_target(self):
        # Seed 001 line 3625: "User B can be reached either at SIP phone B or Cisco SIP IP phone C".
        # The target, a local user, is listed by its registered contact (issue 20: its AoR would earn the phone a
        # second 302); one that is registered nowhere by its AoR.
        net = self.redirect_net(**{"1002": {"busy": "1003"}})
        sent = net.invite()
        self.assertEqual(sent[-1][0].headers.get_lines("contact"),
                         ["<sip:1002@192.0.2.11:5060>;q=1", "<sip:1003@192.0.2.13:5060>;q=0.1"])
        net.location.remove_all(f"sip:1003@{REALM}")
        sent = net.invite(call_id="again")
        self.assertEqual(sent[-1][0].headers.get_lines("contact"),
                         ["<sip:1002@192.0.2.11:5060>;q=1", f"<sip:1003@{REALM}>;q=0.1"])

    def test_unknown_404_unregistered_480(self):
        net = self.redirect_net()
        self.assertEqual(statuses(net.invite(to="9999"))[-1], 404)
        self.assertEqual(statuses(net.invite(to="1001", frm="1002", source=B, call_id="x"))[-1], 480)

    def test_unavailable_target_302(self):
        net = self.redirect_net(**{"1001": {"unavailable": "1003"}})
        sent = net.invite(to="1001", frm="1002", source=B)
        # A local target is answered with its current contact.
        self.assertEqual((sent[-1][0].status, sent[-1][0].headers.get("contact")), (302, "<sip:1003@192.0.2.13:5060>"))


class StoreTests(SynchronousTestCase):
    def test_survives_reopen_and_validates(self):
        path = os.path.join(self.mktemp(), "location.sqlite")
        store = ForwardingStore(path)
        store.update("1002", busy="1003", no_answer="sip:desk@example.com", no_answer_after=15)
        store.close()
        again = ForwardingStore(path)
        got = again.get("1002")
        self.assertEqual((got.busy, got.no_answer, got.no_answer_after), ("1003", "sip:desk@example.com", 15))
        from proxy.routing.forwarding import ForwardingError

        self.assertRaises(ForwardingError, again.update, "1002", always="bad target!")
        self.assertRaises(ForwardingError, again.update, "1002", no_answer_after=0)
        again.update("1002", busy="", no_answer="")
        self.assertEqual(again.all(), [])
