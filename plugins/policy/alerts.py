"""Toll-fraud and attack alerts to the administrator: a webhook (HTTP POST of JSON) and mail (SMTP).

Alerts are sent in batches, at most one per `interval` and channel, with at
most `max_batch` alerts in one (the rest are counted in it): a flood that
bans a thousand addresses sends one message, not a thousand. A channel that
fails is logged and the batch dropped: alerting must never hold up calls.
Only the primary sends (the workers' alerts reach it as plugin events).
"""

import json
import time
from io import BytesIO
from email.message import EmailMessage
from email.utils import formatdate

from twisted.internet import defer
from twisted.logger import Logger

from plugins.policy.config import AlertsConfig

log = Logger()

TIMEOUT = 10.0


class AlertSender:
    def __init__(self, config: AlertsConfig, reactor, server_name: str):
        self.config = config
        self.reactor = reactor
        self.server_name = server_name
        self.queue: list[dict] = []
        self.dropped = 0  # alerts beyond max_batch in the batch being built
        self.sent = {"webhook": 0, "mail": 0}
        self.failed = {"webhook": 0, "mail": 0}
        self._timer = None
        self._last: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.config.webhook or self.config.mail_to)

    def add(self, alert: dict) -> None:
        if not self.enabled:
            return
        if len(self.queue) < self.config.max_batch:
            self.queue.append(alert)
        else:
            self.dropped += 1
        if self._timer is None or not self._timer.active():
            self._timer = self.reactor.callLater(self.config.interval if self._recently_sent() else 0, self.flush)

    def _recently_sent(self) -> bool:
        return self._last is not None and self.reactor.seconds() - self._last < self.config.interval

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def flush(self) -> defer.Deferred:
        batch, more = self.queue, self.dropped
        self.queue, self.dropped = [], 0
        self._last = self.reactor.seconds()
        if not batch:
            return defer.succeed(None)
        sending = []
        if self.config.webhook:
            sending.append(self._send("webhook", self._post, batch, more))
        if self.config.mail_to:
            sending.append(self._send("mail", self._mail, batch, more))
        return defer.DeferredList(sending)

    def _send(self, channel: str, how, batch, more) -> defer.Deferred:
        try:
            d = defer.maybeDeferred(how, batch, more)
        except Exception:
            d = defer.fail()

        def ok(_):
            self.sent[channel] += 1

        def failed(failure):
            self.failed[channel] += 1
            log.error("Policy alert by {channel} failed: {error}", channel=channel,
                      error=failure.getErrorMessage() or failure.type.__name__)

        d.addCallbacks(ok, failed)
        return d

    def _post(self, batch, more) -> defer.Deferred:
        from twisted.web.client import Agent, FileBodyProducer, readBody
        from twisted.web.http_headers import Headers

        body = json.dumps({"server": self.server_name, "alerts": batch, "more": more}).encode()
        agent = Agent(self.reactor, connectTimeout=TIMEOUT)
        d = agent.request(b"POST", self.config.webhook.encode(),
                          Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"sipproxy-policy"]}),
                          FileBodyProducer(BytesIO(body)))

        def check(response):
            done = readBody(response)
            if not 200 <= response.code < 300:
                done.addCallback(lambda _: defer.fail(RuntimeError(f"the webhook answered {response.code}")))
            return done

        d.addCallback(check)
        d.addTimeout(TIMEOUT, self.reactor)
        return d

    def _mail(self, batch, more) -> defer.Deferred:
        from twisted.mail.smtp import sendmail

        message = EmailMessage()
        message["From"] = self.config.mail_from
        message["To"] = ", ".join(self.config.mail_to)
        message["Subject"] = f"sipproxy {self.server_name}: {len(batch) + more} policy alert(s)"
        message["Date"] = formatdate(localtime=True)
        lines = [describe(a) for a in batch]
        if more:
            lines.append(f"... and {more} more in the same {self.config.interval:g} s")
        message.set_content("\n".join(lines) + "\n")
        d = sendmail(self.config.smtp_host, self.config.mail_from, list(self.config.mail_to), message.as_bytes(),
                     port=self.config.smtp_port, reactor=self.reactor)
        d.addTimeout(TIMEOUT, self.reactor)
        return d


def describe(alert: dict) -> str:
    """One line per alert, as the log, the mail and a human read it."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert.get("at", 0)))
    who = " ".join(f"{k}={alert[k]}" for k in ("user", "address", "number") if alert.get(k))
    return f"{when} {alert.get('rule')}: {alert.get('detail')}" + (f" ({who})" if who else "")
