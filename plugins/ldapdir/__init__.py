"""The Cisco IP Phone directory (directory_url), backed by LDAP or by the local users."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from proxy.plugin import IProxyPluginFactory


@implementer(IPlugin, IProxyPluginFactory)
class LdapDirectoryFactory:
    name = "ldapdir"

    def parse_config(self, table, path):
        from plugins.ldapdir.config import parse

        return parse(table, path)

    def build(self, config, context):
        from plugins.ldapdir.directory import DirectoryPlugin

        return DirectoryPlugin(config, context)


factory = LdapDirectoryFactory()
