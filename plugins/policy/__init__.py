"""Policy: dial classes, office hours, call limits, floods, scanners and toll-fraud alerts (docs/policy.md)."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from proxy.plugin import IProxyPluginFactory


@implementer(IPlugin, IProxyPluginFactory)
class PolicyFactory:
    name = "policy"

    def parse_config(self, table, path):
        from plugins.policy.config import parse

        return parse(table, path)

    def build(self, config, context):
        from plugins.policy.plugin import PolicyPlugin

        return PolicyPlugin(config, context)


factory = PolicyFactory()
