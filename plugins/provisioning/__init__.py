"""Provisioning: the phones' TFTP files, a TFTP server that explains what each phone does, safe upgrades."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from proxy.plugin import IAdminCommands, IProxyPluginFactory


@implementer(IPlugin, IProxyPluginFactory, IAdminCommands)
class ProvisioningFactory:
    name = "provisioning"

    def parse_config(self, table, path):
        from plugins.provisioning.config import parse

        return parse(table, path)

    def build(self, config, context):
        from plugins.provisioning.plugin import ProvisioningPlugin

        return ProvisioningPlugin(config, context)

    def add_commands(self, subparsers):
        from plugins.provisioning.commands import add_commands

        add_commands(subparsers)


factory = ProvisioningFactory()
