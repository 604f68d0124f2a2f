"""The phone keepalive on a Clock: one OPTIONS per phone, spread; reachable with RTT; silent after Timer F."""

import os

from twisted.trial.unittest import SynchronousTestCase

from proxy.config import RegistrarConfig
from proxy.registration.location import Binding
from proxy.sip.message import Request, make_response
from proxy.testing import make_core, udp_source
from proxy.transport import Destination


class KeepaliveTests(SynchronousTestCase):
    def setUp(self):
        self.core, self.transports, self.clock = make_core(os.path.abspath(self.mktemp()),
                                                           registrar=RegistrarConfig(keepalive_interval=60))
        self.clock.advance(1_700_000_000)
        self.events = []
        self.core.plugins.emit = lambda name, **fields: self.events.append((name, fields["binding"].aor))
        self.core.keepalive.on_event = self.core.plugins.emit
        for user, port in (("1001", 5060), ("1002", 5060), ("1003", 5062)):  # 1001 and 1002: one phone, two lines
            self.core.location.save(Binding(aor=f"sip:{user}@example.com", contact=f"sip:{user}@192.0.2.5:{port}",
                                            expires_at=self.clock.seconds() + 3600, source_host="192.0.2.5",
                                            source_port=port))
        self.core.keepalive.start()

    def options(self):
        return [(m, d) for m, d in self.transports.take() if isinstance(m, Request) and m.method == "OPTIONS"]

    def answer(self, request, dest, status=200):
        self.core.server.data_received(make_response(request, status, to_tag="t").serialize(),
                                       udp_source(dest.host, dest.port))

    def test_one_options_per_phone_spread_over_the_interval(self):
        self.clock.advance(59.999)
        self.assertEqual(self.options(), [])
        self.clock.advance(0.001)
        first = self.options()
        self.assertEqual([d for _, d in first], [Destination("UDP", "192.0.2.5", 5060)])
        self.clock.advance(30)  # the second phone half an interval later (and the first one's retransmissions)
        self.assertIn(Destination("UDP", "192.0.2.5", 5062), {d for _, d in self.options()})

    def test_an_answer_means_reachable_with_its_rtt_and_silence_means_unreachable(self):
        self.clock.advance(60)
        ((options, dest),) = self.options()
        self.clock.advance(0.25)
        self.answer(options, dest, 405)  # a UA without OPTIONS still answers: it is there
        binding = self.core.location.lookup("sip:1001@example.com")[0]
        state = self.core.keepalive.status(binding)
        self.assertEqual((state.reachable, state.rtt), (True, 0.25))
        # The other phone never answers: Timer F, then it is unreachable, once, as an event.
        for _ in range(63):  # in steps: a Clock runs a call made during advance() at the time advanced to
            self.clock.advance(1)
        silent = self.core.keepalive.status(self.core.location.lookup("sip:1003@example.com")[0])
        self.assertFalse(silent.reachable)
        self.assertEqual(self.events, [("phone_silent", "sip:1003@example.com")])
        self.assertEqual(self.core.counters()["keepalive"]["went_silent"], 1)

    def test_off_by_default(self):
        core, transports, clock = make_core(os.path.abspath(self.mktemp()))
        core.location.save(Binding(aor="sip:1001@example.com", contact="sip:1001@192.0.2.5:5060",
                                   expires_at=clock.seconds() + 3600, source_host="192.0.2.5", source_port=5060))
        core.keepalive.start()
        clock.advance(600)
        self.assertEqual(transports.take(), [])
