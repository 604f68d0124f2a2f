"""proxy/deadlines.py: fixed-length timers in FIFO queues, on a Clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from proxy.deadlines import Deadlines


class DeadlinesTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock)
        self.fired = []

    def test_fires_each_at_its_time_never_earlier(self):
        self.deadlines.add(5, self.fired.append, "a")
        self.clock.advance(1)
        self.deadlines.add(5, self.fired.append, "b")
        self.deadlines.add(2, self.fired.append, "c")
        self.clock.advance(1.999)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.001)
        self.assertEqual(self.fired, ["c"])
        self.clock.advance(1.999)
        self.assertEqual(self.fired, ["c"])
        self.clock.advance(0.001)
        self.assertEqual(self.fired, ["c", "a"])
        self.clock.advance(1)
        self.assertEqual(self.fired, ["c", "a", "b"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_delayed_call_per_length(self):
        for i in range(100):
            self.deadlines.add(32, self.fired.append, i)
            self.deadlines.add(5, self.fired.append, -i)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)
        self.assertEqual(self.deadlines.pending(), 200)

    def test_cancelled_never_fires(self):
        first = self.deadlines.add(5, self.fired.append, "a")
        self.deadlines.add(5, self.fired.append, "b")
        first.cancel()
        self.assertFalse(first.active)
        self.clock.advance(5)
        self.assertEqual(self.fired, ["b"])

    def test_a_timer_may_start_another_of_its_length(self):
        def again(n):
            self.fired.append(n)
            if n < 3:
                self.deadlines.add(1, again, n + 1)
        self.deadlines.add(1, again, 1)
        for _ in range(3):
            self.clock.advance(1)
        self.assertEqual(self.fired, [1, 2, 3])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_everything(self):
        self.deadlines.add(5, self.fired.append, "a")
        self.deadlines.stop()
        self.clock.advance(10)
        self.assertEqual(self.fired, [])
