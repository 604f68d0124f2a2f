"""A complete third-party sipproxy plugin: an event log and a number-blocking policy.

[plugins]
enabled = ["hello"]

[plugins.hello]
events_file = "/var/log/sipproxy-events.txt"   # one line per event
blocked = ["900", "976"]                       # dialled prefixes answered 403
fail_in = []                                   # for tests: "event" or "policy" make it raise
"""

from twisted.plugin import IPlugin
from zope.interface import implementer

from proxy.errors import ConfigError
from proxy.plugin import Continue, IEventObserver, IProxyPlugin, IProxyPluginFactory, IRequestPolicy, Respond


@implementer(IPlugin, IProxyPluginFactory)
class HelloFactory:
    name = "hello"

    def parse_config(self, table, path):
        for key in table:
            if key not in ("events_file", "blocked", "fail_in"):
                raise ConfigError(path, f"plugins.hello.{key}", "unknown key")
        if not isinstance(table.get("events_file", ""), str):
            raise ConfigError(path, "plugins.hello.events_file", "must be a string")
        blocked = table.get("blocked", [])
        if not isinstance(blocked, list) or not all(isinstance(b, str) for b in blocked):
            raise ConfigError(path, "plugins.hello.blocked", "must be a list of strings")
        return {"events_file": table.get("events_file", ""), "blocked": tuple(blocked),
                "fail_in": tuple(table.get("fail_in", []))}

    def build(self, config, context):
        return HelloPlugin(config)


@implementer(IProxyPlugin, IEventObserver, IRequestPolicy)
class HelloPlugin:
    name = "hello"

    def __init__(self, config):
        self.config = config

    def event(self, name, fields):
        if "event" in self.config["fail_in"]:
            raise RuntimeError("hello plugin asked to fail in event")
        if self.config["events_file"]:
            with open(self.config["events_file"], "a") as f:
                f.write(name + "\n")

    def check_request(self, request, source, user):
        if "policy" in self.config["fail_in"]:
            raise RuntimeError("hello plugin asked to fail in policy")
        dialled = request.uri.user or ""
        if any(dialled.startswith(prefix) for prefix in self.config["blocked"]):
            return Respond(403, "Number blocked")
        return Continue()


factory = HelloFactory()
