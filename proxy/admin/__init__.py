"""Administration: the admin HTTP API, the sipproxy-admin command, the phone inventory, remote reboot."""
