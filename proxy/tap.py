"""twistd glue: `twistd -n sipproxy [--config FILE]`.

The config and the state files are read in `postOptions`, so a bad file is
reported (file, key, reason) before twistd daemonises, and startup stops.
"""

from twisted.python import usage

from proxy.config import load_config
from proxy.errors import ConfigError


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: embedded defaults, see etc/sipproxy.toml)"],
    ]

    def postOptions(self):
        from proxy.plugin import resolve

        from proxy.service import check_state

        try:
            config = load_config(self["config"])
            self["proxy_config"] = config
            self["plugins"] = resolve(config.plugins.enabled, config.plugins.tables, config.path)
            # Damaged state files stop startup here, with the file and the reason, before twistd forks.
            check_state(config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options):
    from twisted.internet import reactor

    from proxy.service import build_service, worker_count

    config = options["proxy_config"]
    top, _ = build_service(config, reactor, options["plugins"], workers=worker_count(config))
    _reload_on_sighup(reactor, top.reloader)
    return top


def _reload_on_sighup(reactor, reloader) -> None:
    """kill -HUP (systemctl reload) re-reads the config, as sipproxy-admin reload does."""
    import signal

    def handler(signum, frame):
        reactor.callFromThread(reloader.reload)

    signal.signal(signal.SIGHUP, handler)
