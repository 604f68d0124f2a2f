"""Prometheus metrics (/metrics), named like the Kamailio/OpenSIPS exporters with a sipproxy_ prefix."""

from twisted.plugin import IPlugin
from zope.interface import implementer

from proxy.errors import ConfigError
from proxy.plugin import IProxyPluginFactory


@implementer(IPlugin, IProxyPluginFactory)
class MetricsFactory:
    name = "metrics"

    def parse_config(self, table, path):
        for key in table:
            if key not in ("listen",):
                raise ConfigError(path, f"plugins.metrics.{key}", "unknown key")
        listen = table.get("listen", "")
        if not isinstance(listen, str) or (listen and listen.split(":", 1)[0] not in ("tcp", "tcp6", "unix")):
            raise ConfigError(path, "plugins.metrics.listen", "must be a stream endpoint such as tcp:9120")
        return {"listen": listen}

    def build(self, config, context):
        from plugins.metrics.exporter import MetricsPlugin

        return MetricsPlugin(config, context)


factory = MetricsFactory()
